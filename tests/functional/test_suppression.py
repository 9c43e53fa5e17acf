"""The HSIC and CKA suppression functions against float64 oracles (docs: Methods §2, task-irrelevant labels)."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import assert_matches_oracle, conditional_data, count_syncs, value_and_grads

import negtransfer_losses.functional as ntf
from negtransfer_losses.functional._groups import within_class_groups


def data(n: int = 10, d: int = 4, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + torch.eye(k, d, dtype=torch.float64)[labels]
    return z, labels


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("unknown", [[1, 5, 6], [1, 5]], ids=["36-pairs", "45-pairs"])
def test_irrelevant_hsic_matches_oracle_over_known_labels(kernel: str, normalized: bool, unknown: list[int]) -> None:
    """Unknown rows left out; the RBF median over an even and an odd number of pairs."""
    z, u = data(12)
    u[unknown] = -100
    assert_matches_oracle(
        lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, kernel=kernel, normalized=normalized),  # type: ignore[arg-type]
        lambda f: oracles.irrelevant_hsic(f, u, 3, kernel, normalized),
        z,
        rtol=1e-8,
        atol=1e-11,
    )


def test_irrelevant_hsic_on_maps_flattens_them() -> None:
    z, u = data(8, 12)
    torch.testing.assert_close(
        ntf.irrelevant_hsic(z.reshape(8, 3, 2, 2), u, num_irrelevant=3), ntf.irrelevant_hsic(z, u, num_irrelevant=3)
    )


def test_no_known_label_gives_zero_loss_and_zero_gradient() -> None:
    z, _ = data(8)
    none_known = torch.full((8,), -100)
    value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_hsic(f, none_known, num_irrelevant=3), z)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))
    three_known = none_known.clone()
    three_known[:3] = torch.tensor([0, 1, 2])
    value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_hsic(f, three_known, num_irrelevant=3), z)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


def test_one_class_only_is_finite() -> None:
    """One class: the delta kernel is constant, so the HSIC is the oracle's (0 up to rounding) and the
    normalized ratio, 0/0, its documented 0 with a zero gradient."""
    z, _ = data(8)
    u = torch.zeros(8, dtype=torch.long)
    assert_matches_oracle(
        lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3),
        lambda f: oracles.irrelevant_hsic(f, u, 3, "linear", False),
        z,
        atol=1e-12,
    )
    value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, normalized=True), z)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_hostile_labels_and_batches() -> None:
    z, u = data(8)
    with pytest.raises(ValueError, match=r"'irrelevant_labels' holds 7, outside \[0, 3\) for 3 irrelevant classes"):
        ntf.irrelevant_hsic(z, torch.tensor([0, 1, 2, 7, 0, 1, 2, 0]), num_irrelevant=3)
    with pytest.raises(ValueError, match=r"holds -1, outside"):
        ntf.irrelevant_hsic(z, torch.tensor([0, 1, 2, -1, 0, 1, 2, 0]), num_irrelevant=3)
    with pytest.raises(ValueError, match=r"unbiased HSIC needs at least 4 samples in 'features', got a batch of 3"):
        ntf.irrelevant_hsic(z[:3], u[:3], num_irrelevant=3)
    with pytest.raises(TypeError, match=r"integer class indices, got dtype torch.float32"):
        ntf.irrelevant_hsic(z, u.float(), num_irrelevant=3)
    with pytest.raises(ValueError, match=r"shape \(8,\) to match the batch of 8, got \(7,\)"):
        ntf.irrelevant_hsic(z, u[:7], num_irrelevant=3)


def test_unknown_rows_never_reach_the_value_or_the_gradient() -> None:
    z, u = data(12)
    u[[1, 5]] = -100
    poisoned = z.clone()
    poisoned[[1, 5]] = torch.tensor([float("nan"), float("inf"), 1e30, -1e30], dtype=torch.float64)
    for kernel in ("linear", "rbf"):
        value, (grad,) = value_and_grads(
            lambda f, k=kernel: ntf.irrelevant_hsic(f, u, num_irrelevant=3, kernel=k), poisoned
        )
        expected, (expected_grad,) = value_and_grads(
            lambda f, k=kernel: ntf.irrelevant_hsic(f, u, num_irrelevant=3, kernel=k), z
        )
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=0.0)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=0.0)
        assert torch.equal(grad[[1, 5]], torch.zeros(2, 4, dtype=torch.float64))


def test_options_are_keyword_only() -> None:
    z, u = data(8)
    with pytest.raises(TypeError, match=r"positional"):
        ntf.irrelevant_hsic(z, u, 3)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"positional"):
        ntf.irrelevant_cka(z, z, True)  # type: ignore[misc]


def test_irrelevant_cka_is_linear_cka_with_the_reference_detached() -> None:
    z, _ = data(9, 4)
    ref = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    value = ntf.irrelevant_cka(z, ref)
    torch.testing.assert_close(value, oracles.linear_cka_feature_space(z, ref.detach()))
    assert not value.requires_grad or value.grad_fn is not None
    z.requires_grad_(True)
    ntf.irrelevant_cka(z, ref).backward()
    assert ref.grad is None


# --- conditional forms (docs/task-irrelevant-labels.md, "Conditional suppression") -----------------------


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("unbiased", [True, False])
def test_conditional_hsic_matches_oracle(kernel: str, normalized: bool, unbiased: bool) -> None:
    z, u, y = conditional_data()
    assert_matches_oracle(
        lambda f: ntf.irrelevant_hsic(
            f,
            u,
            num_irrelevant=3,
            kernel=kernel,  # type: ignore[arg-type]
            normalized=normalized,
            unbiased=unbiased,
            task_labels=y,
        ),
        lambda f: oracles.conditional_irrelevant_hsic(f, u, y, 3, kernel, normalized, unbiased),
        z,
        rtol=1e-8,
    )


def test_conditional_hsic_is_the_within_class_measure() -> None:
    """Features that carry u only through y: the plain HSIC sees it, the conditional one does not."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    u = y.clone()
    u[::5] = (u[::5] + 1) % 4  # 80 % tied to y
    z = torch.randn(40, 3, generator=g, dtype=torch.float64) * 0.1 + torch.eye(4, 3, dtype=torch.float64)[y]
    plain = ntf.irrelevant_hsic(z, u, num_irrelevant=4, normalized=True)
    conditional = ntf.irrelevant_hsic(z, u, num_irrelevant=4, normalized=True, task_labels=y)
    assert plain > 0.3 and abs(conditional.item()) < 0.1
    z_u = z + 2 * torch.eye(4, 3, dtype=torch.float64)[u]  # now z also says u within each class
    assert ntf.irrelevant_hsic(z_u, u, num_irrelevant=4, normalized=True, task_labels=y) > 0.3


@pytest.mark.parametrize(
    "case",
    ["all u unknown", "all y unknown", "one u value per class", "classes of 3 (unbiased)"],
)
def test_conditional_hsic_hostile_inputs_give_zero_with_zero_gradient(case: str) -> None:
    z, u, y = conditional_data()
    if case == "all u unknown":
        u = torch.full_like(u, -100)
    elif case == "all y unknown":
        y = torch.full_like(y, -100)
    elif case == "one u value per class":
        u = y.clamp(0)
    else:
        y = torch.arange(24) // 3  # 8 classes of 3 samples
        u = torch.arange(24) % 3
    for normalized in (False, True):
        value, (grad,) = value_and_grads(
            lambda f, normalized=normalized: ntf.irrelevant_hsic(
                f, u, num_irrelevant=3, normalized=normalized, task_labels=y
            ),
            z,
        )
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("unbiased", [False, True])
def test_conditional_cka_matches_oracle(kernel: str, unbiased: bool) -> None:
    z, _, y = conditional_data()
    g = torch.Generator().manual_seed(5)
    r = torch.randn(24, 6, generator=g, dtype=torch.float64) + z[:, :1]
    assert_matches_oracle(
        lambda f: ntf.irrelevant_cka(f, r, kernel=kernel, unbiased=unbiased, task_labels=y),  # type: ignore[arg-type]
        lambda f: oracles.conditional_cka(f, r, y, unbiased, kernel_name=kernel),
        z,
        rtol=1e-8,
    )
    value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_cka(f, r, task_labels=torch.full_like(y, -100)), z)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


def test_biased_hsic_reaches_the_math() -> None:
    z, u = data(12)
    biased = ntf.irrelevant_hsic(z, u, num_irrelevant=3, unbiased=False)
    torch.testing.assert_close(
        biased, oracles.hsic_biased(oracles.linear_kernel(z), oracles.onehot_kernel(u, 3)), rtol=1e-10, atol=1e-12
    )
    assert not torch.isclose(biased, ntf.irrelevant_hsic(z, u, num_irrelevant=3))


def test_hostile_task_labels_and_batches() -> None:
    z, u, y = conditional_data()
    with pytest.raises(ValueError, match=r"'task_labels' holds -1, task classes are ≥ 0; mark unknown"):
        ntf.irrelevant_hsic(z, u, num_irrelevant=3, task_labels=y.clamp(0) - 1)
    with pytest.raises(ValueError, match=r"'task_labels' must have shape \(24,\) to match the batch of 24"):
        ntf.irrelevant_cka(z, z, task_labels=y[:5])
    with pytest.raises(
        ValueError, match=r"'features' and 'irrelevant_features' must have the same batch size: got shapes \(24, 4\)"
    ):
        ntf.irrelevant_cka(z, z[:20])
    with pytest.raises(ValueError, match=r"unbiased CKA needs at least 4 samples in 'features', got a batch of 3"):
        ntf.irrelevant_cka(z[:3], z[:3], unbiased=True, task_labels=y[:3])
    with pytest.raises(ValueError, match=r"'sigma' must be a positive bandwidth or None"):
        ntf.irrelevant_hsic(z, u, num_irrelevant=3, kernel="rbf", sigma=0.0)
    with pytest.raises(ValueError, match=r"'kernel' must be one of 'linear', 'rbf'; got 'cosine'"):
        ntf.irrelevant_cka(z, z, kernel="cosine")  # type: ignore[arg-type]


@pytest.mark.parametrize("min_size", [1, 2, 4, 7])
def test_within_class_groups_is_the_documented_rule(min_size: int) -> None:
    """Eligible: u and y known, in a task class with ≥ min_size such samples and ≥ 2 distinct u values."""
    _, u, y = conditional_data()
    u[[1, 16]] = 1  # class 1 gets a third u value
    eligible, classmates = within_class_groups(u, y, 3, min_size=min_size)
    expected = oracles._eligible_classes(u, y, min_size)
    members = sorted(i for idx in expected.values() for i in idx)
    assert eligible.nonzero().flatten().tolist() == members
    for idx in expected.values():
        for i in idx:
            assert classmates[i].nonzero().flatten().tolist() == idx


@pytest.mark.parametrize("sigma", [None, 0.8])
def test_conditional_rbf_bandwidth_is_the_median_of_each_class(sigma: float | None) -> None:
    """Each class's bandwidth is torch.quantile(·, 0.5) of its pair distances, or sigma."""
    z, u, y = conditional_data()
    value = ntf.irrelevant_hsic(z, u, num_irrelevant=3, kernel="rbf", sigma=sigma, task_labels=y)
    eligible, _ = within_class_groups(u, y, 3, min_size=4)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for c in y[eligible].unique().tolist():
        idx = (eligible & (y == c)).nonzero().flatten()
        k = ntf.kernel_matrix(z[idx], kernel="rbf", sigma=sigma)
        l = oracles.onehot_kernel(u[idx], 3)
        total, count = total + len(idx) * ntf.hsic_from_kernels(k, l, unbiased=True), count + len(idx)
    torch.testing.assert_close(value, total / count, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("sigma", [None, 0.8])
def test_conditional_hsic_unknown_u_in_an_eligible_class_is_left_out(unbiased: bool, sigma: float | None) -> None:
    """Samples of an eligible class whose u is unknown change neither the value nor the RBF median."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(24) % 3
    u = (torch.arange(24) // 3) % 3
    z = torch.randn(24, 4, generator=g, dtype=torch.float64)
    u[[0, 1, 4]] = -100  # classes 0 and 1 stay eligible
    keep = u != -100
    for kernel in ("linear", "rbf"):
        if kernel == "linear" and sigma is not None:
            continue
        value = ntf.irrelevant_hsic(
            z, u, num_irrelevant=3, kernel=kernel, sigma=sigma, unbiased=unbiased, task_labels=y
        )
        without = ntf.irrelevant_hsic(
            z[keep], u[keep], num_irrelevant=3, kernel=kernel, sigma=sigma, unbiased=unbiased, task_labels=y[keep]
        )
        assert value.abs() > 1e-3
        torch.testing.assert_close(value, without, rtol=1e-12, atol=1e-15)


def fixed_shape_cases() -> list[tuple[str, object]]:
    _, u, y = conditional_data()
    r = torch.randn(24, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return [
        ("hsic", lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3)),
        ("hsic-conditional", lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, task_labels=y)),
        (
            "hsic-conditional-biased",
            lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, unbiased=False, task_labels=y),
        ),
        ("hsic-normalized", lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, normalized=True)),
        (
            "hsic-normalized-conditional",
            lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, normalized=True, task_labels=y),
        ),
        (
            "hsic-rbf-normalized-biased",
            lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, kernel="rbf", normalized=True, unbiased=False),
        ),
        ("hsic-rbf-conditional", lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=3, kernel="rbf", task_labels=y)),
        ("cka", lambda f: ntf.irrelevant_cka(f, r)),
        ("cka-conditional", lambda f: ntf.irrelevant_cka(f, r, task_labels=y)),
        ("cka-conditional-unbiased", lambda f: ntf.irrelevant_cka(f, r, unbiased=True, task_labels=y)),
        (
            "cka-rbf-conditional-unbiased",
            lambda f: ntf.irrelevant_cka(f, r, kernel="rbf", unbiased=True, task_labels=y),
        ),
    ]


@pytest.mark.parametrize(("name", "fn"), fixed_shape_cases(), ids=[name for name, _ in fixed_shape_cases()])
def test_no_host_device_sync_and_one_graph(name: str, fn) -> None:  # type: ignore[no-untyped-def]
    """Fixed shapes only: no host read, and forward and backward trace as one graph with the same values."""
    z, _, _ = conditional_data()
    expected, expected_grads = value_and_grads(fn, z)
    leaf = z.clone().requires_grad_(True)
    syncs = count_syncs(lambda: fn(leaf).backward())
    assert syncs.total == 0, dict(syncs.counts)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(z)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    torch._dynamo.reset()
    value, grads = value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), z)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-10, atol=1e-12)
