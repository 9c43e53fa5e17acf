"""Channel aggregations: permutation-invariant summaries of a feature map (docs: Methods §1).

Two independently trained networks order their channels arbitrarily, so anti-transfer compares
summaries that do not depend on channel order.
"""

from __future__ import annotations

import functools
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from .._validation import (
    check_channel_pair,
    check_choice,
    check_tensor,
    compute_dtype,
    describe,
    full_precision,
    raise_if_invalid,
)
from .similarity import _cosine_rows, scaled_floor, unit_scale

Aggregation: TypeAlias = Literal["none", "mean", "sum", "max", "mul"]
AGGREGATIONS: tuple[Aggregation, ...] = ("none", "mean", "sum", "max", "mul")

MUL_OFFSET = 1e-10


__all__ = ["AGGREGATIONS", "Aggregation", "aggregate_channels", "aggregated_row_cosines"]

DEFAULT_MUL_EXPONENT = 0.001


def aggregate_channels(
    x: Tensor,
    *,
    aggregation: Aggregation = "mean",
    mul_exponent: float = DEFAULT_MUL_EXPONENT,
    name: str = "x",
    layer: str | None = None,
) -> Tensor:
    """Reduce the channel dimension (dim 1) of a feature map.

    - `"none"`: identity, `(B, C, *sp)`;
    - `"mean"`, `"sum"`, `"max"`: reduce over channels, `(B, 1, *sp)`; `max` splits the gradient
      evenly between tied maxima (deterministic);
    - `"mul"`: `prod_c (x_c + δ) ** p`, `p = mul_exponent`, computed as `exp(p · Σ_c log(x_c + δ))`;
      only for non-negative maps (a negative value raises `ValueError`). `δ = 1e-10` as in the authors'
      code, raised to float16's smallest normal number (6.1e-5) for float16 maps: the gradient at a zero
      entry, `p / δ` times the rest, would overflow float16's range (the library's own).

    Args:
        x: `(B, C, *sp)`; `(B, D)` is treated as `D` channels with no spatial extent.
        aggregation: the aggregation.
        mul_exponent: `p` of `"mul"`.
        name: how error messages call `x`.
        layer: the layer's name, for error messages.

    Returns:
        float32 (float64 for float64 input).

    Raises:
        TypeError: `x` is not a floating-point tensor.
        ValueError: `x` has fewer than 2 dimensions, `aggregation` is not a valid choice, or `"mul"` meets a
            negative value (on a GPU: at a later check, without a device synchronization).
    """
    check_tensor(x, name, layer=layer, min_dim=2)
    check_choice(aggregation, "aggregation", AGGREGATIONS)
    with full_precision(x):
        return _aggregate_channels(x, aggregation, mul_exponent=mul_exponent, name=name, layer=layer)


def _aggregate_channels(
    x: Tensor,
    aggregation: Aggregation,
    *,
    mul_exponent: float = DEFAULT_MUL_EXPONENT,
    name: str = "x",
    layer: str | None = None,
) -> Tensor:
    """`aggregate_channels` of a checked input (`name` and `layer` still name it in the `"mul"` sign check)."""
    offset = max(MUL_OFFSET, torch.finfo(x.dtype).tiny)
    x = x.to(compute_dtype(x))
    if aggregation == "none":
        return x
    if aggregation == "mean":
        return x.mean(dim=1, keepdim=True)
    if aggregation == "sum":
        return x.sum(dim=1, keepdim=True)
    if aggregation == "max":
        return x.amax(dim=1, keepdim=True)
    if x.numel():  # read on the host without a sync (later on a GPU): see raise_if_invalid
        sign = torch.stack([(x < 0).any().to(x.dtype), x.amin()])
        raise_if_invalid(sign, functools.partial(_negative_map_message, describe(name, layer), tuple(x.shape)))
    return torch.exp(mul_exponent * torch.log(x + offset).sum(dim=1, keepdim=True))


def _negative_map_message(described: str, shape: tuple[int, ...], sign: list[float]) -> str | None:
    negative, minimum = sign
    if not negative:
        return None
    return (
        f"aggregation='mul' needs a non-negative feature map, but {described} (shape {shape}) has minimum "
        f"{minimum:.4g}; tap the layer after its ReLU or use aggregation='mean'"
    )


ROW_AGGREGATIONS: tuple[Aggregation, ...] = ("mean", "sum", "max")


def _check_row_aggregation_pair(student: Tensor, reference: Tensor, aggregation: str) -> None:
    """The checks of `aggregated_row_cosines`, shared with its `ops` twin: same batch and spatial size."""
    check_choice(aggregation, "aggregation", ROW_AGGREGATIONS)
    check_channel_pair(student, reference)


def aggregated_row_cosines(
    student: Tensor, reference: Tensor, *, aggregation: Aggregation = "mean", eps: float = 1e-8
) -> Tensor:
    """Per-sample cosine of the channel-aggregated maps: the reference for the fused kernel.

    `s_b = <a_b, c_b> / (max(|a_b|, eps) · max(|c_b|, eps))` with `a_b = A(S_b)`, `c_b = A(R_b)` flattened over
    the spatial dims, `A` in `"mean"`, `"sum"`, `"max"`. Both maps are first scaled by
    `similarity.unit_scale` (exact; float32 maps near 1e30 give finite cosines), as the fused kernel does;
    `eps` floors the norms in the inputs' own units (`similarity.scaled_floor`). The reference side gets no
    gradient.

    Args:
        student: `(B, C, *spatial)` with at least one spatial dimension.
        reference: same batch and spatial size (its channel count may differ).
        aggregation: `"mean"`, `"sum"` or `"max"`.
        eps: floor of each norm, in the units of `A(student)`.

    Returns:
        `(B,)`, float32 (float64 for float64 input).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: `aggregation` is not one of the three, or the batch or spatial sizes differ.
    """
    _check_row_aggregation_pair(student, reference, aggregation)
    with full_precision(student, reference):
        return _aggregated_row_cosines(student, reference.detach(), aggregation, eps)


def _aggregated_row_cosines(student: Tensor, reference: Tensor, aggregation: Aggregation, eps: float) -> Tensor:
    """`aggregated_row_cosines` of inputs checked by `_check_row_aggregation_pair` (the torch path of the
    fused kernel)."""
    dtype = compute_dtype(student, reference)
    student, reference = student.to(dtype), reference.to(dtype)
    scale_s, scale_r = unit_scale(student), unit_scale(reference)
    a = _aggregate_channels(student * scale_s, aggregation)
    c = _aggregate_channels(reference * scale_r, aggregation)
    floor_s, floor_r = scaled_floor(eps, scale_s), scaled_floor(eps, scale_r)
    return _cosine_rows(a.reshape(a.shape[0], -1), c.reshape(c.shape[0], -1), floor_s, floor_r)
