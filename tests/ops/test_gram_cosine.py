"""The tiled Gram row-cosine kernel (Triton interpreter on CPU) against the float64 functional path."""

from __future__ import annotations

import pytest
import torch

import negtransfer_losses.functional as ntf
from negtransfer_losses import ops

pytest.importorskip("triton", reason="the kernels need Triton: pip install 'negtransfer-losses[triton]'")

# (shape, scope): odd sizes; several row tiles (> 16 rows) and position tiles (> 32 positions)
CASES = [
    ((2, 3, 37, 5), "sample"),
    ((3, 20, 7), "sample"),
    ((2, 18, 40), "sample"),
    ((2, 5, 6), "batch"),
    ((3, 7, 2, 3), "batch"),
    ((4, 6), "batch"),
]
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (2e-2, 1e-3)}


def run(fn, s: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    leaf = s.detach().clone().requires_grad_(True)
    cosines = fn(leaf, r)
    (grad,) = torch.autograd.grad(3.7 * cosines.abs().mean().square(), leaf)
    return cosines.detach(), grad


@pytest.mark.parametrize(("shape", "scope"), CASES, ids=[f"{scope}-{'x'.join(map(str, s))}" for s, scope in CASES])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_kernel_matches_float64_reference(shape: tuple[int, ...], scope: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g)
    r = (0.5 * s + torch.randn(*shape, generator=g)).to(dtype)
    s = s.to(dtype)
    value, grad = run(lambda a, b: ops.gram_row_cosines(a, b, scope, backend="triton"), s, r)  # type: ignore[arg-type]
    expected, expected_grad = run(lambda a, b: ntf.gram_row_cosines(a, b, scope), s.double(), r.double())  # type: ignore[arg-type]
    rtol, atol = TOLERANCES[dtype]
    assert value.shape == expected.shape and grad.dtype == dtype
    torch.testing.assert_close(value.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=atol * expected_grad.abs().max().item())


def test_zero_rows_give_zero_cosine_and_finite_gradient() -> None:
    s, r = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    s[0, 2] = 0.0
    value, grad = run(lambda a, b: ops.gram_row_cosines(a, b, "sample", backend="triton"), s, r)
    assert value[2].item() == 0.0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_anti_transfer_uses_the_kernel_with_the_same_result(scope: str) -> None:
    g = torch.Generator().manual_seed(1)
    s, r = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    for distance in ("cos", "cos_squared"):
        torch.testing.assert_close(
            ntf.anti_transfer(s, r, "gram", distance, scope, backend="triton"),  # type: ignore[arg-type]
            ntf.anti_transfer(s, r, "gram", distance, scope, backend="torch"),  # type: ignore[arg-type]
        )
