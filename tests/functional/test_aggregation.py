"""Channel aggregations against the float64 oracle of METHODS.md §1."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import GRAD_SCALE, assert_matches_oracle

import negtransfer_losses.functional as ntf


@pytest.mark.parametrize("method", ["none", "mean", "sum", "max", "mul"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (2, 6, 7), (4, 5)], ids=["map", "audio", "flat"])
def test_aggregation_matches_oracle(method: str, shape: tuple[int, ...]) -> None:
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.1
    assert_matches_oracle(
        lambda t: ntf.aggregate_channels(t, aggregation=method),  # type: ignore[arg-type]
        lambda t: oracles.aggregate(t, method),
        x,
    )
    out = ntf.aggregate_channels(x, aggregation=method)  # type: ignore[arg-type]
    assert out.shape == (shape if method == "none" else (shape[0], 1, *shape[2:]))


def test_mul_rejects_negative_maps_naming_the_layer() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"non-negative.*'student' \(layer 'layer2'\).*shape \(2, 3, 4\)"):
        ntf.aggregate_channels(x, aggregation="mul", name="student", layer="layer2")


def test_mul_of_zero_map_is_finite() -> None:
    """`prod_c (0 + δ)^p = δ^(p·C)` (δ = 1e-10, p = 0.001, C = 3: ≈ 0.933) and `∂/∂x_c = p · out / δ` (≈ 9.3e6),
    by hand, in float32."""
    x = torch.zeros(2, 3, 4, requires_grad=True)
    out = ntf.aggregate_channels(x, aggregation="mul")
    (grad,) = torch.autograd.grad(GRAD_SCALE * out.sum(), x)
    expected = 1e-10 ** (0.001 * 3)
    torch.testing.assert_close(out, torch.full((2, 1, 4), expected), rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, torch.full((2, 3, 4), GRAD_SCALE * 0.001 * expected / 1e-10), rtol=1e-5, atol=0)


def test_max_splits_the_gradient_of_ties_evenly_and_deterministically() -> None:
    x = torch.tensor([[[1.0], [3.0], [3.0], [2.0]]], requires_grad=True)
    grads = []
    for _ in range(3):
        (g,) = torch.autograd.grad(ntf.aggregate_channels(x, aggregation="max").sum(), x)
        grads.append(g)
    torch.testing.assert_close(grads[0].flatten(), torch.tensor([0.0, 0.5, 0.5, 0.0]))
    assert all(torch.equal(grads[0], g) for g in grads)


def test_unknown_aggregation_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'aggregation' must be one of 'none', 'mean', 'sum', 'max', 'mul'"):
        ntf.aggregate_channels(torch.ones(2, 3), aggregation="median")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_maps_reduce_in_float32(dtype: torch.dtype) -> None:
    x = (torch.rand(2, 300, 4) * 100).to(dtype)
    out = ntf.aggregate_channels(x, aggregation="sum")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float().sum(1, keepdim=True))
