"""Linear kernels in feature space (docs: Methods §4): equal to the pairwise form and to the float64 oracles.

Every linear-kernel HSIC and CKA has two forms, chosen by `similarity.feature_space_cheaper`: sums from `XᵀY`,
`Xᵀ1`, `Yᵀ1` and the row norms (no `n × n` tensor), and the kernel matrices. Here the rule is forced each way
(`forced`), and the two forms must agree in float64 to 1e-10 relative, values and gradients, on the test
matrix of the suppression losses: unknown labels, classes too small for the estimator, constant features,
scales from 1e-30 to 1e30; and the feature-space sums must be the oracles' pairwise definitions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import oracles
import pytest
import torch
from helpers import conditional_data, value_and_grads
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import negtransfer_losses.diagnostics as ntd
import negtransfer_losses.functional as ntf
from negtransfer_losses.functional import similarity, suppression
from negtransfer_losses.functional._groups import dense_ranks, slot_sums, within_class_groups, within_class_slots

RULE_USERS = (similarity, suppression, ntd)


@contextmanager
def forced(form: str) -> Iterator[None]:
    """Every linear-kernel estimate in the given form, `"features"` or `"pairwise"`, whatever the rule says."""
    with pytest.MonkeyPatch.context() as patch:
        for module in RULE_USERS:
            patch.setattr(module, "feature_space_cheaper", lambda *args, **kwargs: form == "features")
        yield


def both_forms(fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[tuple[Tensor, list[Tensor]], ...]:
    with forced("features"):
        features = value_and_grads(fn, *inputs)
    with forced("pairwise"):
        pairwise = value_and_grads(fn, *inputs)
    return features, pairwise


def assert_forms_agree(fn: Callable[..., Tensor], *inputs: Tensor, rtol: float = 1e-10, atol: float = 0.0) -> None:
    """Feature-space and pairwise forms: equal values and gradients (float64), relative to their own size."""
    (value, grads), (expected, expected_grads) = both_forms(fn, *inputs)
    torch.testing.assert_close(value, expected, rtol=rtol, atol=atol)
    for g, e in zip(grads, expected_grads, strict=True):
        scale = float(e.abs().max())
        torch.testing.assert_close(g, e, rtol=rtol, atol=max(atol, rtol * scale))


def randn(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * (torch.randn(*shape, generator=g, dtype=torch.float64) + shift)


# --- the sums themselves against the pairwise definitions (independent float64 oracles) ------------------


@pytest.mark.parametrize(("n", "p", "q"), [(4, 3, 5), (9, 7, 2), (6, 40, 30), (33, 5, 5)])
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_linear_hsic_is_the_pairwise_definition(n: int, p: int, q: int, unbiased: bool) -> None:
    x, y = randn(n, p, seed=1, shift=2.0), randn(n, q, seed=2, shift=-1.0)

    def features(a: Tensor, b: Tensor) -> Tensor:
        count = torch.tensor(float(n), dtype=torch.float64)
        return similarity.linear_hsic(a - a.mean(dim=0), b - b.mean(dim=0), count, unbiased=unbiased)

    def oracle(a: Tensor, b: Tensor) -> Tensor:
        k, l = oracles.linear_kernel(a), oracles.linear_kernel(b)
        return oracles.hsic_unbiased(k, l) if unbiased else oracles.hsic_biased(k, l)

    (value, grads), (expected, expected_grads) = value_and_grads(features, x, y), value_and_grads(oracle, x, y)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0.0)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()))


def test_unbiased_hsic_is_invariant_to_a_shift_of_either_side() -> None:
    """The U-statistic's terms in a shift `x → x + c` cancel exactly (so the rows may be centred first): checked
    on the pairwise definition, which centres nothing."""
    x, y = randn(11, 4, seed=1), randn(11, 3, seed=2)
    base = oracles.hsic_unbiased(oracles.linear_kernel(x), oracles.linear_kernel(y))
    shifted = oracles.hsic_unbiased(oracles.linear_kernel(x + randn(1, 4, seed=3) * 5), oracles.linear_kernel(y - 7))
    torch.testing.assert_close(shifted, base, rtol=1e-10, atol=0.0)


def test_zero_rows_are_left_out_of_every_sum() -> None:
    """Masked rows (zeros) with `n` the count of the others: the estimate of those others alone."""
    x, y = randn(10, 4, seed=1), randn(10, 3, seed=2)
    keep = torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    xc, yc = x[keep] - x[keep].mean(dim=0), y[keep] - y[keep].mean(dim=0)
    padded_x = torch.zeros_like(x).masked_scatter(keep[:, None], xc)
    padded_y = torch.zeros_like(y).masked_scatter(keep[:, None], yc)
    count = torch.tensor(7.0, dtype=torch.float64)
    for unbiased in (True, False):
        expected = (oracles.hsic_unbiased if unbiased else oracles.hsic_biased)(
            oracles.linear_kernel(x[keep]), oracles.linear_kernel(y[keep])
        )
        value = similarity.linear_hsic(padded_x, padded_y, count, unbiased=unbiased)
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=0.0)


# --- the public functions: both forms on the test matrix --------------------------------------------------

SHAPES = [(4, 3, 5), (9, 7, 2), (6, 40, 30), (30, 40, 7)]
SCALES = [1e-30, 1e-4, 1.0, 1e4, 1e30]


@pytest.mark.parametrize(("n", "p", "q"), SHAPES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_hsic_cka_and_linear_cka_agree_in_both_forms(n: int, p: int, q: int, scale: float, unbiased: bool) -> None:
    x, y = randn(n, p, seed=1, scale=scale, shift=3.0), randn(n, q, seed=2) + 0.5 * randn(n, q, seed=1)[:, :1]
    assert_forms_agree(lambda a, b: ntf.hsic(a, b, unbiased=unbiased), x, y)
    if unbiased and not torch.isfinite(oracles.cka(x / scale, y, "linear", True)):
        return  # a negative unbiased self-HSIC: CKA is 0 in both forms, checked below
    assert_forms_agree(lambda a, b: ntf.cka(a, b, unbiased=unbiased), x, y)
    assert_forms_agree(lambda a, b: ntf.linear_cka(a, b, unbiased=unbiased), x, y)
    assert_forms_agree(lambda a, b: ntf.irrelevant_cka(a, b.detach(), unbiased=unbiased), x, y)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("value", [0.1, 410.00129463736744, -3.3e7])
def test_constant_features_give_exactly_zero_in_both_forms(value: float, unbiased: bool) -> None:
    x, y = torch.full((7, 5), value, dtype=torch.float64), randn(7, 3)
    u = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for form in ("features", "pairwise"):
        with forced(form):
            assert ntf.cka(x, y, unbiased=unbiased).item() == 0.0
            assert ntf.linear_cka(x, y, unbiased=unbiased).item() == 0.0
            assert ntf.irrelevant_hsic(x, u, num_irrelevant=3, normalized=True, unbiased=unbiased).item() == 0.0
            assert ntf.irrelevant_cka(x, y, unbiased=unbiased, task_labels=u).item() == 0.0
    # the unnormalized HSIC of constant features is 0 up to the pairwise form's rounding of |x|²-sized entries
    for form in ("features", "pairwise"):
        with forced(form):
            hsic = ntf.irrelevant_hsic(x, u, num_irrelevant=3, unbiased=unbiased)
        assert abs(hsic.item()) <= 1e-12 * value**2 * 5


UNKNOWN = [[], [1, 5, 6], [1, 5], list(range(9))]


@pytest.mark.parametrize("unknown", UNKNOWN, ids=["all-known", "3-unknown", "2-unknown", "too-few-known"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("scale", SCALES)
def test_irrelevant_hsic_agrees_in_both_forms(
    unknown: list[int], normalized: bool, unbiased: bool, scale: float
) -> None:
    z = randn(12, 4, seed=0, scale=scale, shift=1.5)
    u = torch.arange(12) % 3
    u[unknown] = -100
    assert_forms_agree(
        lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, normalized=normalized, unbiased=unbiased), z
    )
    if len(unknown) < 9:
        oracle = oracles.irrelevant_hsic(z, u, 3, "linear", normalized) if unbiased else None
        if oracle is not None:
            value = ntf.irrelevant_hsic(z, u, num_irrelevant=3, normalized=normalized)
            torch.testing.assert_close(value, oracle, rtol=1e-9, atol=0.0)
    else:
        value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3), z)
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def conditional_cases() -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    z, u, y = conditional_data()
    cases = {"mixed": (z, u, y)}
    cases["three-per-class"] = (z, torch.arange(24) % 3, torch.arange(24) // 3)  # too small for unbiased
    cases["all-u-unknown"] = (z, torch.full_like(u, -100), y)
    cases["one-u-per-class"] = (z, y.clamp(0), y)
    big_labels = y.clone()
    big_labels[y >= 0] = big_labels[y >= 0] * 1_000_003 + 7  # task classes need not be small or dense
    cases["sparse-task-labels"] = (z, u, big_labels)
    return cases


@pytest.mark.parametrize("case", list(conditional_cases()))
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("scale", SCALES)
def test_conditional_hsic_and_cka_agree_in_both_forms(case: str, unbiased: bool, scale: float) -> None:
    z, u, y = conditional_cases()[case]
    z = scale * (z + 2.0)
    r = randn(24, 6, seed=5) + z[:, :1] / scale
    assert_forms_agree(lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, unbiased=unbiased, task_labels=y), z)
    assert_forms_agree(
        lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, unbiased=unbiased, normalized=True, task_labels=y), z
    )
    assert_forms_agree(lambda f: ntf.irrelevant_cka(f, r, unbiased=unbiased, task_labels=y), z)


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_normalized_conditional_hsic_of_a_constant_class_is_that_class_left_at_zero(unbiased: bool) -> None:
    """A class whose features are constant (at the rounding level of their magnitude) has a ratio of 0 in both
    forms: the other classes' ratios, weighted by their sizes over every eligible sample."""
    z, u, y = conditional_data()
    z = z + 3.0
    u[[6, 12]] = 1  # class 0: u values 0 and 1, twice or more each
    z[y == 1] = 410.00129463736744  # class 1 constant; class 0 varies; class 2 has one u value
    for form in ("features", "pairwise"):
        with forced(form):
            value = ntf.irrelevant_hsic(z, u, num_irrelevant=3, unbiased=unbiased, normalized=True, task_labels=y)
            only_0 = ntf.irrelevant_hsic(
                z, u, num_irrelevant=3, unbiased=unbiased, normalized=True, task_labels=torch.where(y == 0, y, -100)
            )
        eligible = ((y == 0) | (y == 1)) & (u != -100)
        share = float(((y == 0) & (u != -100)).sum()) / float(eligible.sum())
        assert value.item() != 0.0
        torch.testing.assert_close(value, only_0 * share, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_conditional_feature_space_matches_the_oracles(unbiased: bool) -> None:
    z, u, y = conditional_data()
    r = randn(24, 6, seed=5) + z[:, :1]
    with forced("features"):
        hsic, (grad,) = value_and_grads(
            lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, unbiased=unbiased, task_labels=y), z
        )
        cka, (cka_grad,) = value_and_grads(lambda f: ntf.irrelevant_cka(f, r, unbiased=unbiased, task_labels=y), z)
    expected, (expected_grad,) = value_and_grads(
        lambda f: oracles.conditional_irrelevant_hsic(f, u, y, 3, "linear", False, unbiased), z
    )
    torch.testing.assert_close(hsic, expected, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)
    expected, (expected_grad,) = value_and_grads(lambda f: oracles.conditional_cka(f, r, y, unbiased), z)
    torch.testing.assert_close(cka, expected, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(cka_grad, expected_grad, rtol=1e-9, atol=1e-12)


def test_unknown_rows_never_reach_the_feature_space_value_or_gradient() -> None:
    z, u, y = conditional_data()
    r = randn(24, 6, seed=5)
    unknown_u, unknown_u_or_y = u == -100, (u == -100) | (y == -100)
    with forced("features"):
        for outside, fn in (
            (unknown_u, lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3)),
            (unknown_u, lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, normalized=True)),
            (unknown_u_or_y, lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, task_labels=y)),
            (unknown_u_or_y, lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, task_labels=y, unbiased=False)),
            (unknown_u_or_y, lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, task_labels=y, normalized=True)),
        ):
            poisoned = z.clone()
            poisoned[outside] = torch.tensor([float("nan"), float("inf"), 1e30, -1e30], dtype=torch.float64)
            value, (grad,) = value_and_grads(fn, poisoned)
            expected, (expected_grad,) = value_and_grads(fn, z)
            torch.testing.assert_close(value, expected, rtol=1e-12, atol=0.0)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=0.0)
            assert torch.equal(grad[outside], torch.zeros_like(grad[outside]))
        poisoned_y = z.clone()
        poisoned_y[y == -100] = float("nan")
        value = ntf.irrelevant_cka(poisoned_y, r, task_labels=y)
        torch.testing.assert_close(value, ntf.irrelevant_cka(z, r, task_labels=y), rtol=1e-12, atol=0.0)


def test_layer_similarity_agrees_in_both_forms() -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    b = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4)).double()
    x = randn(70, 6, seed=3) + 4.0
    results = []
    for form in ("features", "pairwise"):
        with forced(form):
            results.append(ntd.layer_similarity(a, b, x, layers_a=["0", "2"], layers_b=["1", "2"], batch_size=24))
    torch.testing.assert_close(results[0].matrix, results[1].matrix, rtol=1e-10, atol=0.0)


# --- slots: the fixed-shape grouping without a B × B matrix -------------------------------------------------


def test_dense_ranks_name_each_distinct_key_by_its_rank() -> None:
    keys = torch.tensor([7, -100, 7, 3, 1_000_000_007, 3, -100])
    assert dense_ranks(keys).tolist() == [2, 0, 2, 1, 3, 1, 0]
    values = torch.arange(7, dtype=torch.float64)
    assert slot_sums(values, dense_ranks(keys)).tolist() == [7.0, 8.0, 2.0, 4.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("min_size", [1, 2, 4, 7])
def test_within_class_slots_is_within_class_groups(min_size: int) -> None:
    _, u, y = conditional_data()
    u[[1, 16]] = 1
    eligible, slots = within_class_slots(u, y, 3, min_size=min_size)
    expected, classmates = within_class_groups(u, y, 3, min_size=min_size)
    assert torch.equal(eligible, expected)
    same_slot = (slots[:, None] == slots[None, :]) & eligible[None, :] & eligible[:, None]
    assert torch.equal(same_slot, classmates & eligible[:, None])


# --- no B × B tensor ---------------------------------------------------------------------------------------


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while active (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def no_batch_squared_cases(n: int) -> dict[str, Callable[[Tensor], Tensor]]:
    g = torch.Generator().manual_seed(0)
    u, y = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    u[::7] = -100
    y[::11] = -100
    r = torch.randn(n, 12, generator=g)
    return {
        "hsic": lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=10),
        "hsic-normalized-biased": lambda f: ntf.irrelevant_hsic(
            f, u, num_irrelevant=10, normalized=True, unbiased=False
        ),
        "hsic-conditional": lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=10, task_labels=y),
        "hsic-conditional-biased": lambda f: ntf.irrelevant_hsic(
            f, u, num_irrelevant=10, task_labels=y, unbiased=False
        ),
        "hsic-conditional-normalized": lambda f: ntf.irrelevant_hsic(
            f, u, num_irrelevant=10, task_labels=y, normalized=True
        ),
        "cka": lambda f: ntf.irrelevant_cka(f, r),
        "cka-unbiased-conditional": lambda f: ntf.irrelevant_cka(f, r, unbiased=True, task_labels=y),
        "functional-hsic": lambda f: ntf.hsic(f, r),
        "linear-cka-unbiased": lambda f: ntf.linear_cka(f, r, unbiased=True),
    }


@pytest.mark.parametrize("name", list(no_batch_squared_cases(8)))
def test_linear_kernels_never_form_a_batch_by_batch_tensor(name: str) -> None:
    """At the defaults' shapes (features narrower than the batch), forward and backward never hold a tensor of
    `n²` elements: the largest is `O(n·D)` or `O(D²)`."""
    n, d = 600, 16
    fn = no_batch_squared_cases(n)[name]
    z = torch.randn(n, d, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    with LargestTensor() as mode:
        fn(z).backward()
    assert mode.largest <= 12 * n * d, f"{name}: a tensor of {mode.largest} elements (n² = {n * n})"


def test_the_rule_picks_feature_space_for_narrow_features_and_pairwise_for_wide_ones() -> None:
    assert similarity.feature_space_cheaper(8192, 128, 10)
    assert similarity.feature_space_cheaper(256, 128, 128, self_terms=True)
    assert not similarity.feature_space_cheaper(256, 16384, 16384, self_terms=True)  # conv maps, flattened
    assert not similarity.feature_space_cheaper(6, 400, 300)
    # per-class Gram matrices (normalized conditional HSIC): B // 4 + 1 of D × D within 4·B²
    assert similarity.feature_space_cheaper(8192, 128, 10, self_terms=True, grams=8192 // 4 + 1)
    assert not similarity.feature_space_cheaper(1024, 128, 10, self_terms=True, grams=1024 // 4 + 1)


# --- float32: the two forms' rounding ----------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 10.0, 1000.0])
def test_float32_feature_space_error_stays_at_float32_rounding(shift: float) -> None:
    """Features with a large mean: the feature-space form centres them first, so its float32 error against the
    float64 value stays small; the pairwise form's grows with `‖x̄‖²` (measured, not asserted)."""
    g = torch.Generator().manual_seed(0)
    n, d = 512, 32
    u = torch.randint(0, 10, (n,), generator=g)
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3 * torch.eye(10, d, dtype=torch.float64)[u] + shift
    exact = ntf.irrelevant_hsic(z, u, num_irrelevant=10)
    with forced("features"):
        single = ntf.irrelevant_hsic(z.float(), u, num_irrelevant=10)
    assert abs(single.double().item() - exact.item()) <= 1e-4 * abs(exact.item())


# --- RBF kernels: the kernel matrices a tile of rows at a time ------------------------------------------------


@contextmanager
def small_tiles(numbers: int) -> Iterator[None]:
    """Kernel tiles of at most `numbers` entries (many tiles, each recomputed in the backward pass)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(similarity, "TILE_NUMBERS", numbers)
        yield


def full_rbf_hsic(x: Tensor, y: Tensor, kernel_y: str, unbiased: bool, sigma: float | None) -> Tensor:
    k = similarity.kernel_matrix(x, kernel="rbf", sigma=sigma)
    return similarity.hsic_from_kernels(k, similarity.kernel_matrix(y, kernel=kernel_y, sigma=sigma), unbiased=unbiased)  # type: ignore[arg-type]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("sigma", [None, 0.7], ids=["median", "sigma"])
def test_tiled_rbf_hsic_and_cka_are_the_kernel_matrices(scale: float, unbiased: bool, sigma: float | None) -> None:
    # at 1e-30 the median bandwidth is its floor, 1e-12: K is constant, its HSIC 0 up to rounding (atol)
    x, y = randn(23, 5, seed=1, scale=scale, shift=2.0), randn(23, 3, seed=2) + 0.5 * randn(23, 3, seed=1)[:, :1]
    bandwidth = None if sigma is None else sigma * scale
    for tiles in (similarity.TILE_NUMBERS, 23 * 4):  # one tile; six tiles of 4 rows
        with small_tiles(tiles):
            for kernel_y in ("rbf", "linear"):
                (value, grads), (expected, expected_grads) = (
                    value_and_grads(
                        lambda a, b, k=kernel_y: ntf.hsic(
                            a, b, kernel="rbf", kernel_y=k, sigma=bandwidth, sigma_y=sigma, unbiased=unbiased
                        ),
                        x,
                        y,
                    ),
                    value_and_grads(
                        lambda a, b, k=kernel_y: similarity.hsic_from_kernels(
                            similarity.kernel_matrix(a, kernel="rbf", sigma=bandwidth),
                            similarity.kernel_matrix(b, kernel=k, sigma=sigma),  # type: ignore[arg-type]
                            unbiased=unbiased,
                        ),
                        x,
                        y,
                    ),
                )
                torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-13)
                for g, e in zip(grads, expected_grads, strict=True):
                    torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()))
            (value, grads), (expected, expected_grads) = (
                value_and_grads(lambda a, b: ntf.cka(a, b, kernel="rbf", unbiased=unbiased, sigma=sigma), x / scale, y),
                value_and_grads(
                    lambda a, b: similarity.kernel_alignment(
                        similarity.kernel_matrix(a, kernel="rbf", sigma=sigma),
                        similarity.kernel_matrix(b, kernel="rbf", sigma=sigma),
                        unbiased=unbiased,
                    ),
                    x / scale,
                    y,
                ),
            )
            torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-13)
            for g, e in zip(grads, expected_grads, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10 * float(e.abs().max()))


@pytest.mark.parametrize("unknown", UNKNOWN, ids=["all-known", "3-unknown", "2-unknown", "too-few-known"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_tiled_rbf_irrelevant_hsic_is_the_masked_kernel_matrices(
    unknown: list[int], normalized: bool, unbiased: bool, scale: float
) -> None:
    z = randn(12, 4, seed=0, scale=scale, shift=1.5)
    u = torch.arange(12) % 3
    u[unknown] = -100
    minimum = 4 if unbiased else 2
    with small_tiles(12 * 5):  # three tiles
        value, (grad,) = value_and_grads(
            lambda f: ntf.irrelevant_hsic(
                f, u, num_irrelevant=3, kernel="rbf", normalized=normalized, unbiased=unbiased
            ),
            z,
        )
    expected, (expected_grad,) = value_and_grads(
        lambda f: suppression._pairwise_hsic(f, u, None, 3, -100, minimum, "rbf", None, unbiased, normalized), z
    )
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10 * float(expected_grad.abs().max()))
    if unknown:
        assert torch.equal(grad[unknown], torch.zeros_like(grad[unknown]))


@pytest.mark.parametrize("case", list(conditional_cases()))
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_tiled_rbf_conditional_hsic_is_the_masked_kernel_matrices(
    case: str, normalized: bool, unbiased: bool, scale: float
) -> None:
    """A group per task class, each with its own centring, threshold and median bandwidth, in tiles of 5 rows."""
    z, u, y = conditional_cases()[case]
    z = scale * (z + 1.0)
    minimum = 4 if unbiased else 2
    with small_tiles(24 * 5):
        value, (grad,) = value_and_grads(
            lambda f: ntf.irrelevant_hsic(
                f, u, num_irrelevant=3, kernel="rbf", normalized=normalized, unbiased=unbiased, task_labels=y
            ),
            z,
        )
    expected, (expected_grad,) = value_and_grads(
        lambda f: suppression._pairwise_hsic(f, u, y, 3, -100, minimum, "rbf", None, unbiased, normalized), z
    )
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10 * float(expected_grad.abs().max()))


def test_rbf_kernels_hold_one_tile_at_a_time() -> None:
    """With a bandwidth given, forward and backward hold no tensor larger than a tile (`TILE_NUMBERS` entries) or
    the `(n, d)` rows: the memory bound of the docstring, conditional forms included. (The median heuristic adds
    its `n(n-1)/2` distances, and their sort keys.)"""
    n, d, tile = 600, 16, 600 * 40
    g = torch.Generator().manual_seed(0)
    u, y = torch.randint(0, 10, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    u[::7] = -100
    y[::11] = -100
    r = torch.randn(n, 12, generator=g)
    cases: dict[str, Callable[[Tensor], Tensor]] = {
        "hsic": lambda f: ntf.hsic(f, r, kernel="rbf", sigma=1.5),
        "cka-biased": lambda f: ntf.cka(f, r, kernel="rbf", sigma=1.5),
        "irrelevant-hsic": lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=10, kernel="rbf", sigma=1.5),
        "irrelevant-cka": lambda f: ntf.irrelevant_cka(f, r, kernel="rbf", sigma=1.5, unbiased=True),
        "conditional-hsic": lambda f: ntf.irrelevant_hsic(
            f, u, num_irrelevant=10, kernel="rbf", sigma=1.5, task_labels=y
        ),
        "conditional-hsic-normalized-biased": lambda f: ntf.irrelevant_hsic(
            f, u, num_irrelevant=10, kernel="rbf", sigma=1.5, task_labels=y, normalized=True, unbiased=False
        ),
        "conditional-cka": lambda f: ntf.irrelevant_cka(f, r, kernel="rbf", sigma=1.5, task_labels=y),
    }
    for name, fn in cases.items():
        z = torch.randn(n, d, generator=g).requires_grad_(True)
        with small_tiles(tile), LargestTensor() as mode:
            fn(z).backward()
        assert mode.largest <= tile, f"{name}: a tensor of {mode.largest} elements (a tile: {tile}, n² = {n * n})"
    for fn in (
        lambda f: ntf.hsic(f, r, kernel="rbf"),
        lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=10, kernel="rbf", task_labels=y),
    ):
        z = torch.randn(n, d, generator=g).requires_grad_(True)
        with small_tiles(tile), LargestTensor() as mode:
            fn(z).backward()
        assert mode.largest == n * (n - 1) // 2  # the median's distances, detached: no n × n tensor


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("sigma", [None, 1.3], ids=["median", "sigma"])
def test_tiled_rbf_conditional_cka_matches_the_oracle(unbiased: bool, sigma: float | None) -> None:
    """Conditional CKA with RBF kernels: the within-class centring as slot sums, then one group (the samples whose
    task label is known) whose kernel matrices are formed three rows at a time."""
    z, _, y = conditional_data()
    r = randn(24, 6, seed=5) + z[:, :1]
    with small_tiles(24 * 3):
        value, (grad,) = value_and_grads(
            lambda f: ntf.irrelevant_cka(f, r, kernel="rbf", sigma=sigma, unbiased=unbiased, task_labels=y), z
        )
    if sigma is None:
        expected, (expected_grad,) = value_and_grads(
            lambda f: oracles.conditional_cka(f, r, y, unbiased, -100, "rbf"), z
        )
    else:  # the oracle takes the median bandwidth: compare with the kernel matrices of the centred rows instead
        known = y != -100
        slots = dense_ranks(y)
        centre = suppression.centre_within_slots

        def expected_fn(f: Tensor) -> Tensor:
            a, b = centre(f, slots, known)[known], centre(r, slots, known)[known]
            ka = similarity.kernel_matrix(a, kernel="rbf", sigma=sigma)
            kb = similarity.kernel_matrix(b, kernel="rbf", sigma=sigma)
            return similarity.kernel_alignment(ka, kb, unbiased=unbiased)

        expected, (expected_grad,) = value_and_grads(expected_fn, z)
    assert expected.item() != 0.0
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0.0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-10 * float(expected_grad.abs().max()))
