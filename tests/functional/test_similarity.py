"""HSIC, CKA, Gram and row cosine against the float64 oracles of METHODS.md §4, plus their properties."""

from __future__ import annotations

import math

import oracles
import pytest
import torch
from helpers import GRAD_SCALE, assert_matches_oracle, value_and_grads
from hypothesis import given
from hypothesis import strategies as st

import negtransfer_losses.functional as ntf


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# (n, p, q, scale_x, scale_y): n = 4 is the smallest unbiased batch, p ≫ n, and wildly different scales.
SHAPES = [
    pytest.param(4, 3, 5, 1.0, 1.0, id="n4"),
    pytest.param(9, 7, 2, 1.0, 1.0, id="n9"),
    pytest.param(6, 400, 300, 1.0, 1.0, id="d>>n"),
    pytest.param(8, 5, 6, 1e4, 1e-4, id="scales"),
]


@pytest.mark.parametrize(("n", "p", "q", "sx", "sy"), SHAPES)
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_hsic_matches_oracle(n: int, p: int, q: int, sx: float, sy: float, unbiased: bool, kernel: str) -> None:
    x, y = randn(n, p, seed=1, scale=sx), randn(n, q, seed=2, scale=sy)
    assert_matches_oracle(
        lambda a, b: ntf.hsic(a, b, kernel=kernel, unbiased=unbiased),  # type: ignore[arg-type]
        lambda a, b: oracles.hsic(a, b, kernel, unbiased),
        x,
        y,
        rtol=1e-7,
        atol=1e-12 * (sx * sy) ** 2 if kernel == "linear" else 1e-12,
    )


@pytest.mark.parametrize(("n", "p", "q", "sx", "sy"), SHAPES)
@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_cka_matches_oracle(n: int, p: int, q: int, sx: float, sy: float, unbiased: bool, kernel: str) -> None:
    x, y = randn(n, p, seed=3, scale=sx), randn(n, q, seed=4, scale=sy)
    expected = oracles.cka(x, y, kernel, unbiased)
    if unbiased and not torch.isfinite(expected):
        pytest.skip("the unbiased self-HSIC of this draw is negative: CKA is undefined (the library gives 0)")
    value, grads = value_and_grads(lambda a, b: ntf.cka(a, b, kernel=kernel, unbiased=unbiased), x, y)  # type: ignore[arg-type]
    expected, expected_grads = value_and_grads(lambda a, b: oracles.cka(a, b, kernel, unbiased), x, y)
    torch.testing.assert_close(value, expected, rtol=1e-7, atol=1e-10)
    for g, e in zip(grads, expected_grads, strict=True):
        # gradients scale as 1/scale of their input; compare relative to their own size
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-9 * e.abs().max().item())


@pytest.mark.parametrize(("n", "p", "q"), [(4, 3, 5), (50, 3, 4), (5, 300, 200), (30, 40, 7)])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_linear_cka_matches_oracle_on_both_evaluation_paths(n: int, p: int, q: int, unbiased: bool) -> None:
    x = randn(n, p, seed=5)
    y = randn(n, q, seed=6) + 0.5 * x[:, :1]  # correlated, so the value is far from 0
    oracle = (lambda a, b: oracles.cka(a, b, "linear", True)) if unbiased else oracles.linear_cka_feature_space
    assert_matches_oracle(lambda a, b: ntf.linear_cka(a, b, unbiased=unbiased), oracle, x, y, rtol=1e-8, atol=1e-11)


def test_feature_space_oracle_agrees_with_hsic_form() -> None:
    x, y = randn(7, 4, seed=1), randn(7, 9, seed=2)
    torch.testing.assert_close(oracles.linear_cka_feature_space(x, y), oracles.cka(x, y, "linear", False))


def test_hsic_biased_and_unbiased_differ() -> None:
    x, y = randn(6, 3, seed=1), randn(6, 3, seed=2)
    assert not math.isclose(ntf.hsic(x, y, unbiased=True).item(), ntf.hsic(x, y, unbiased=False).item())


def test_hsic_separate_kernels_for_each_side() -> None:
    x, y = randn(8, 3, seed=1), randn(8, 2, seed=2)
    value = ntf.hsic(x, y, kernel="rbf", kernel_y="linear", unbiased=True)
    expected = oracles.hsic_unbiased(oracles.rbf_kernel(x), oracles.linear_kernel(y))
    torch.testing.assert_close(value, expected)


def test_hsic_from_kernels_zeroes_a_non_constant_diagonal() -> None:
    # A kernel whose diagonal is not constant: subtracting a broadcast vector instead of zeroing the
    # diagonal (a known public bug) would give a different value.
    k = oracles.linear_kernel(randn(6, 2, seed=1))
    l = oracles.linear_kernel(randn(6, 3, seed=2))
    torch.testing.assert_close(ntf.hsic_from_kernels(k, l), oracles.hsic_unbiased(k, l))


def test_rbf_kernel_with_given_sigma() -> None:
    x = randn(5, 3, seed=1)
    torch.testing.assert_close(ntf.kernel_matrix(x, kernel="rbf", sigma=0.7), oracles.rbf_kernel(x, 0.7))


# --- properties ------------------------------------------------------------------------------------

matrices = st.tuples(st.integers(4, 12), st.integers(1, 20), st.integers(0, 10_000)).map(
    lambda t: randn(t[0], t[1], seed=t[2])
)


@given(matrices, st.sampled_from(["linear", "rbf"]), st.booleans())
def test_cka_of_a_matrix_with_itself_is_one(x: torch.Tensor, kernel: str, unbiased: bool) -> None:
    value = ntf.cka(x, x, kernel=kernel, unbiased=unbiased)  # type: ignore[arg-type]
    assert value.item() == pytest.approx(1.0, abs=1e-9)


@given(matrices, st.integers(0, 10_000), st.floats(1e-3, 1e3), st.booleans())
def test_cka_invariant_to_orthogonal_transform_and_isotropic_scaling(
    x: torch.Tensor, seed: int, scale: float, unbiased: bool
) -> None:
    y = randn(x.shape[0], 5, seed=seed + 1)
    q, _ = torch.linalg.qr(randn(x.shape[1], x.shape[1], seed=seed))
    base = ntf.linear_cka(x, y, unbiased=unbiased)
    for kernel in ("linear", "rbf"):
        torch.testing.assert_close(
            ntf.cka(scale * x @ q, y, kernel=kernel, unbiased=unbiased),  # type: ignore[arg-type]
            ntf.cka(x, y, kernel=kernel, unbiased=unbiased),  # type: ignore[arg-type]
            rtol=1e-7,
            atol=1e-9,
        )
    torch.testing.assert_close(ntf.linear_cka(scale * x @ q, y, unbiased=unbiased), base, rtol=1e-7, atol=1e-9)


@given(st.integers(4, 10), st.integers(1, 6), st.floats(-1e3, 1e3), st.sampled_from(["linear", "rbf"]), st.booleans())
def test_constant_features_give_zero_not_nan(n: int, d: int, value: float, kernel: str, unbiased: bool) -> None:
    x = torch.full((n, d), value, dtype=torch.float64, requires_grad=True)
    y = randn(n, 3)
    for out in (ntf.cka(x, y, kernel=kernel, unbiased=unbiased), ntf.linear_cka(x, y, unbiased=unbiased)):  # type: ignore[arg-type]
        assert out.item() == 0.0
        (grad,) = torch.autograd.grad(GRAD_SCALE * out, x)
        assert torch.equal(grad, torch.zeros_like(grad))  # the documented limit, with a zero gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_constant_features_with_inexact_mean_give_exactly_zero(kernel: str, dtype: torch.dtype) -> None:
    # the mean of 7 copies of 0.1 or 410.0013 is not exactly that value; the rounding noise must not
    # be blown up into a "signal"
    y = randn(7, 3).to(dtype)
    for value in (0.1, 410.00129463736744, -3.3e7):
        x = torch.full((7, 5), value, dtype=dtype)
        for unbiased in (False, True):
            assert ntf.cka(x, y, kernel=kernel, unbiased=unbiased).item() == 0.0  # type: ignore[arg-type]
            assert ntf.linear_cka(x, y, unbiased=unbiased).item() == 0.0


@given(st.integers(1, 3), st.integers(1, 5))
def test_unbiased_estimators_reject_fewer_than_four_samples(n: int, d: int) -> None:
    x = randn(n, d)
    for call in (
        lambda: ntf.hsic(x, x, unbiased=True),
        lambda: ntf.cka(x, x, unbiased=True),
        lambda: ntf.linear_cka(x, x, unbiased=True),
    ):
        with pytest.raises(ValueError, match=f"at least 4 samples.*got a batch of {n}"):
            call()


def test_debiased_cka_of_independent_features_is_near_zero() -> None:
    x, y = randn(2000, 4, seed=1), randn(2000, 4, seed=2)
    assert abs(ntf.linear_cka(x, y, unbiased=True).item()) < 0.01
    assert ntf.linear_cka(x, y, unbiased=False).item() < 0.02


def test_large_scale_features_do_not_overflow_in_float32() -> None:
    x, y = randn(16, 64, seed=1).float() * 1e15, randn(16, 32, seed=2).float() * 1e-15
    expected = oracles.linear_cka_feature_space(x.double(), y.double())  # scale-invariant: the unscaled value
    for value in (ntf.linear_cka(x, y), ntf.cka(x, y)):
        torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-6)
    assert ntf.linear_cka(x, x).item() == pytest.approx(1.0, abs=1e-5)


# --- Gram and cosine -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 3, 7), (3, 5), (1, 2, 3, 3)])
def test_gram_equals_the_naive_definition(shape: tuple[int, ...]) -> None:
    x = randn(*shape)
    torch.testing.assert_close(ntf.gram(x, gram_scope="sample"), oracles.gram_sample(x), rtol=0, atol=1e-10)
    torch.testing.assert_close(ntf.gram(x, gram_scope="batch"), oracles.gram_batch(x), rtol=0, atol=1e-10)
    assert ntf.gram(x, gram_scope="batch").shape == (shape[0] * shape[1],) * 2


def test_cosine_rows_matches_oracle_values_and_gradients() -> None:
    a, b = randn(5, 3, 4, seed=1), randn(5, 3, 4, seed=2)
    assert_matches_oracle(ntf.cosine_rows, oracles.cosine_rows, a, b)


def test_cosine_of_a_zero_row_is_zero_with_finite_gradient() -> None:
    a = randn(3, 4)
    a[1] = 0.0
    value, _ = value_and_grads(ntf.cosine_rows, a, randn(3, 4, seed=2))
    assert value[1].item() == 0.0
    assert_matches_oracle(ntf.cosine_rows, oracles.cosine_rows, a, randn(3, 4, seed=2))  # gradients included


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    x, y = randn(8, 5, seed=1).to(dtype), randn(8, 3, seed=2).to(dtype)
    for fn in (ntf.hsic, ntf.cka, ntf.linear_cka):
        out = fn(x, y)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), fn(x.double(), y.double()), rtol=1e-4, atol=1e-5)
    assert ntf.gram(x.reshape(8, 5, 1), gram_scope="batch").dtype == torch.float32
    assert ntf.cosine_rows(x, x).dtype == torch.float32


def test_autocast_does_not_lower_the_precision() -> None:
    x, y = randn(8, 5, seed=1).float(), randn(8, 3, seed=2).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ntf.hsic(x, y)
        g = ntf.gram(x.reshape(8, 5, 1))
    assert out.dtype == torch.float32 and g.dtype == torch.float32
    torch.testing.assert_close(out, ntf.hsic(x, y))


# --- hostile input ---------------------------------------------------------------------------------------


def test_errors_name_the_argument_and_shapes() -> None:
    with pytest.raises(
        ValueError, match=r"'x' and 'y' must have the same batch size: got shapes \(5, 2\) and \(6, 2\)"
    ):
        ntf.hsic(randn(5, 2), randn(6, 2))
    with pytest.raises(ValueError, match=r"'kernel' must be one of 'linear', 'rbf'; got 'poly'"):
        ntf.cka(randn(5, 2), randn(5, 2), kernel="poly")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'x' must be a torch.Tensor, got list"):
        ntf.linear_cka([[1.0]], randn(1, 1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'x' must be a real floating-point tensor, got dtype torch.int64"):
        ntf.hsic(torch.ones(5, 2, dtype=torch.long), randn(5, 2))
    with pytest.raises(ValueError, match=r"'a' and 'b' must have the same shape"):
        ntf.cosine_rows(randn(3, 2), randn(3, 4))
    with pytest.raises(ValueError, match=r"'gram_scope' must be one of 'sample', 'batch'"):
        ntf.gram(randn(3, 2, 2), gram_scope="global")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'x' must have at least 2 dimension"):
        ntf.gram(randn(3))
    with pytest.raises(ValueError, match=r"'sigma' must be a positive bandwidth"):
        ntf.kernel_matrix(randn(3, 2), kernel="rbf", sigma=0.0)
    with pytest.raises(ValueError, match=r"square kernel matrices"):
        ntf.hsic_from_kernels(torch.ones(4, 4), torch.ones(4, 5))


@pytest.mark.parametrize("scope", ["batch", "sample"])
@pytest.mark.parametrize("shape", [(3, 4, 2, 1), (2, 6, 2), (2, 3, 4, 5), (3, 5)], ids=["N<BC", "N<C", "N>C", "flat"])
def test_gram_row_cosines_equal_cosines_of_the_naive_gram_rows(scope: str, shape: tuple[int, ...]) -> None:
    x, y = randn(*shape, seed=1), randn(*shape, seed=2) + 0.5 * randn(*shape, seed=1)
    naive = oracles.gram_batch if scope == "batch" else oracles.gram_sample

    def oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ga, gb = naive(a), naive(b.detach())  # the reference side gets no gradient
        return oracles.cosine_rows(ga.reshape(-1, ga.shape[-1]), gb.reshape(-1, gb.shape[-1]))

    assert_matches_oracle(
        lambda a, b: ntf.gram_row_cosines(a, b, gram_scope=scope), oracle, x, y, rtol=1e-9, atol=1e-10
    )  # type: ignore[arg-type]


def test_gram_row_cosines_of_zero_rows_are_zero_with_finite_gradient() -> None:
    """A zero channel gives a zero Gram row: its cosine is exactly 0 (the floored norm), the other rows' are the
    naive Gram rows' cosines, and the gradient is the oracle's (the N < C path: the identity, no Gram matrix)."""
    x, y = randn(2, 6, 2), randn(2, 6, 2, seed=3)
    x[0, 1] = 0.0

    def oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ga, gb = oracles.gram_sample(a), oracles.gram_sample(b.detach())
        return oracles.cosine_rows(ga.reshape(-1, 6), gb.reshape(-1, 6))

    value, _ = value_and_grads(lambda a, b: ntf.gram_row_cosines(a, b, gram_scope="sample"), x, y)
    assert value[1] == 0.0 and bool((value[[0, *range(2, 12)]] != 0).all())
    assert_matches_oracle(lambda a, b: ntf.gram_row_cosines(a, b, gram_scope="sample"), oracle, x, y)
