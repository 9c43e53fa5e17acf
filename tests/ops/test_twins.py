"""Twins agree: every fused op's functional function, its `ops` twin with `backend="torch"` and the kernel
(`backend="triton"`, Triton's interpreter) give the same value and gradient on the same inputs, at magnitudes
1, 1e30 and 1e-30 (one scale convention, `functional.similarity.unit_scale`, used by both paths)."""

from __future__ import annotations

from collections.abc import Callable

import oracles
import pytest
import torch
from torch import Tensor

import negtransfer_losses.functional as ntf
from negtransfer_losses import ops

pytest.importorskip("triton", reason="the kernels need Triton: pip install 'negtransfer-losses[triton]'")

SCALES = [1.0, 1e30, 1e-30]

# name -> (shape, functional, ops twin taking backend=)
Fn = Callable[..., Tensor]
COSINE_OPS: dict[str, tuple[tuple[int, ...], Fn, Fn]] = {
    "gram-batch-identity": (
        (3, 7, 2, 2),  # N = 4 < m = 21
        lambda s, r: ntf.gram_row_cosines(s, r, gram_scope="batch"),
        lambda s, r, backend: ops.gram_row_cosines(s, r, gram_scope="batch", backend=backend),
    ),
    "gram-sample-identity": (
        (2, 9, 2, 2),  # N = 4 < m = 9
        lambda s, r: ntf.gram_row_cosines(s, r, gram_scope="sample"),
        lambda s, r, backend: ops.gram_row_cosines(s, r, gram_scope="sample", backend=backend),
    ),
    "gram-sample-tiles": (
        (2, 3, 5, 4),  # N = 20 ≥ m = 3
        lambda s, r: ntf.gram_row_cosines(s, r, gram_scope="sample"),
        lambda s, r, backend: ops.gram_row_cosines(s, r, gram_scope="sample", backend=backend),
    ),
    "gram-batch-tiles": (
        (2, 3, 40),  # N = 40 ≥ m = 6
        lambda s, r: ntf.gram_row_cosines(s, r, gram_scope="batch"),
        lambda s, r, backend: ops.gram_row_cosines(s, r, gram_scope="batch", backend=backend),
    ),
    **{
        aggregation: (
            (3, 4, 5, 6),
            lambda s, r, a=aggregation: ntf.aggregated_row_cosines(s, r, aggregation=a),
            lambda s, r, backend, a=aggregation: ops.aggregated_row_cosines(s, r, aggregation=a, backend=backend),
        )
        for aggregation in ("mean", "sum", "max")
    },
}


def value_and_grad(fn: Fn, s: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    leaf = s.detach().clone().requires_grad_(True)
    cosines = fn(leaf, r)
    (grad,) = torch.autograd.grad(3.7 * cosines.abs().mean().square(), leaf)
    return cosines.detach(), grad


@pytest.mark.parametrize("scale", SCALES, ids=str)
@pytest.mark.parametrize("name", list(COSINE_OPS))
def test_functional_ops_torch_and_kernel_agree(name: str, scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape, functional, twin = COSINE_OPS[name]
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g)
    s, r = base * scale, (0.5 * base + torch.randn(*shape, generator=g)) * scale
    value, grad = value_and_grad(functional, s, r)
    torch_value, torch_grad = value_and_grad(lambda a, b: twin(a, b, "torch"), s, r)
    kernel_value, kernel_grad = value_and_grad(lambda a, b: twin(a, b, "triton"), s, r)
    # the functional function and its ops twin on the torch backend are one computation
    assert torch.equal(value, torch_value) and torch.equal(grad, torch_grad)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(kernel_value, value, rtol=1e-5, atol=1e-6)
    top = grad.abs().max().item()
    torch.testing.assert_close(kernel_grad, grad, rtol=1e-5, atol=max(1e-6 * top, 1e-45))
    unit, _ = value_and_grad(functional, s.double() / scale, r.double() / scale)
    if scale == 1e-30:  # every norm is below eps: zero rows have cosine 0, on every path
        assert torch.equal(value, torch.zeros_like(value))
    else:  # the cosines of the unscaled maps
        torch.testing.assert_close(value.double(), unit, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_distribution_matching_twins_agree(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(1)
    za, zb = torch.randn(6, 5, generator=g) * scale, torch.randn(6, 7, generator=g) * scale
    relatedness = torch.rand(5, 7, generator=g)

    def run(fn: Fn) -> tuple[Tensor, ...]:
        a, b = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
        terms = fn(a, b)
        total = 3.7 * terms["a_to_b"] + 1.3 * terms["b_to_a"]
        return (total.detach(), *torch.autograd.grad(total, [a, b]))

    functional = run(lambda a, b: ntf.distribution_matching(a, b, relatedness))
    twin = run(lambda a, b: ops.distribution_matching(a, b, relatedness, backend="torch"))
    kernel = run(lambda a, b: ops.distribution_matching(a, b, relatedness, backend="triton"))
    for f, t, k in zip(functional, twin, kernel, strict=True):
        assert torch.equal(f, t) and torch.isfinite(f).all()
        torch.testing.assert_close(k, f, rtol=1e-5, atol=1e-6 * max(1.0, f.abs().max().item()))


def test_anti_transfer_twins_agree_for_every_row_cosine_aggregation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(2)
    s, r = torch.randn(3, 4, 5, 2, generator=g) * 1e30, torch.randn(3, 4, 5, 2, generator=g) * 1e30
    for aggregation in ("gram", "mean", "sum", "max", "pairwise", "none"):
        functional = ntf.anti_transfer(s, r, aggregation=aggregation)  # type: ignore[arg-type]
        assert torch.isfinite(functional)
        assert torch.equal(ops.anti_transfer(s, r, aggregation=aggregation, backend="torch"), functional)  # type: ignore[arg-type]
        if aggregation in ("gram", "mean", "sum", "max"):
            kernel = ops.anti_transfer(s, r, aggregation=aggregation, backend="triton")  # type: ignore[arg-type]
            torch.testing.assert_close(kernel, functional, rtol=1e-5, atol=1e-6)


def _oracle_rows(name: str, x: Tensor) -> Tensor:
    """The rows whose norms `eps` floors (METHODS §1), from the float64 oracle."""
    if name.startswith("gram"):
        g = oracles.gram_batch(x) if "batch" in name else oracles.gram_sample(x)
        return g.reshape(-1, g.shape[-1])
    return oracles.aggregate(x, name).reshape(x.shape[0], -1)


@pytest.mark.parametrize("name", list(COSINE_OPS))
def test_eps_is_in_the_inputs_units_on_every_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps of magnitude ~1e3 (scaled by 2^-10 or more inside) whose channels span three decades; `eps` between
    the middle ones of the student's row norms (unscaled units) floors half the rows: the functional function,
    the kernel and the float64 oracle's `cosine_rows` of the unscaled rows agree."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape = COSINE_OPS[name][0]
    g = torch.Generator().manual_seed(3)
    decades = torch.logspace(-3, 0, shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
    base = torch.randn(*shape, generator=g)
    s, r = 1e3 * base * decades, 1e3 * (0.5 * base + torch.randn(*shape, generator=g)) * decades
    norms = torch.linalg.vector_norm(_oracle_rows(name, s), dim=1).sort().values
    eps = float((norms[norms.shape[0] // 2 - 1] * norms[norms.shape[0] // 2]).sqrt())
    if name.startswith("gram"):
        scope = "batch" if "batch" in name else "sample"
        functional: Fn = lambda a, b: ntf.gram_row_cosines(a, b, gram_scope=scope, eps=eps)  # type: ignore[arg-type]  # noqa: E731
        kernel: Fn = lambda a, b: ops.gram_row_cosines(a, b, gram_scope=scope, eps=eps, backend="triton")  # type: ignore[arg-type]  # noqa: E731
    else:
        functional = lambda a, b: ntf.aggregated_row_cosines(a, b, aggregation=name, eps=eps)  # type: ignore[arg-type]  # noqa: E731
        kernel = lambda a, b: ops.aggregated_row_cosines(a, b, aggregation=name, eps=eps, backend="triton")  # type: ignore[arg-type]  # noqa: E731
    value, grad = value_and_grad(functional, s, r)
    kernel_value, kernel_grad = value_and_grad(kernel, s, r)
    torch.testing.assert_close(kernel_value, value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel_grad, grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item())
    expected = oracles.cosine_rows(_oracle_rows(name, s.double()), _oracle_rows(name, r.double()), eps)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [1e30, 3e38], ids=str)
@pytest.mark.parametrize("name", list(COSINE_OPS))
def test_zero_rows_of_maps_near_float32s_largest_give_cosine_zero(
    name: str, scale: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`eps · 2^-2e` underflows float32 for such maps: the floor is raised to `2^-63` (`floor_minimum`), so a zero
    row still gives `s = 0` (not 0/0) on every path, and the other rows the cosines of the unscaled maps."""
    if scale > 1e37 and name in ("mean", "sum"):
        pytest.skip("the channel kernel sums raw float32 values: C channels near 3e38 overflow (1e30 is covered)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape, functional, twin = COSINE_OPS[name]
    g = torch.Generator().manual_seed(4)
    s, r = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    s, r = (s / s.abs().max() * scale).contiguous(), r / r.abs().max() * scale
    zero = (slice(None), 0) if name.startswith("gram") else (0,)  # a zero channel: zero Gram rows; a zero sample
    s[zero] = 0.0
    value, grad = value_and_grad(functional, s, r)
    kernel_value, kernel_grad = value_and_grad(lambda a, b: twin(a, b, "triton"), s, r)
    unit = functional(s.double() / scale, r.double() / scale)
    zeros = unit == 0
    assert zeros.any() and torch.equal(value[zeros], torch.zeros_like(value[zeros]))
    assert torch.isfinite(grad).all() and torch.isfinite(kernel_grad).all()
    torch.testing.assert_close(value.double(), unit, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel_value, value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kernel_grad, grad, rtol=1e-5, atol=max(1e-6 * grad.abs().max().item(), 1e-45))
