"""The anti-transfer authors' `pairwise` aggregations in closed form (docs: methods page, anti-transfer).

Their code pairs every student channel with every reference channel of one sample: with
`S = reshape(student_b, [C_s, N])` and `R = reshape(reference_b, [C_r, N])` it builds the row
`a_b = [S_1 ×C_r, S_2 ×C_r, …]` (each student channel repeated `C_r` times) and `b_b = [R_1, …, R_{C_r}]`
repeated `C_s` times: `C_s·C_r·N` values per sample. Every distance of those rows has a closed form in
`O(C·N)` memory:

- `<a_b, b_b> = Σ_i Σ_j <S_i, R_j> = <Σ_i S_i, Σ_j R_j>`;
- `|a_b|² = C_r Σ_i |S_i|²`, `|b_b|² = C_s Σ_j |R_j|²`;
- the linear CKA of the rows equals that of the flattened maps (their Gram matrices are `C_r·K_S` and
  `C_s·K_R`, and CKA ignores isotropic scale).

`stochastic_pairwise` applies `pairwise` to a window of `q = C // B` consecutive channels (`q = 1` when
`B = 1`, as in the authors' code, and when `C < B`), its start drawn uniformly from `[0, C - q]` by
torch's generator on each call: the same window for student and reference, so both need the same channel
count. Two departures from the authors' code,
both at its edges: their start is drawn from `[0, C - q)` (the last window is never drawn), and for
`C < B` their `q` is 0 (an empty window).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_channel_pair, compute_dtype, full_precision
from .similarity import scaled_floor, unit_scale

__all__ = ["pairwise_row_cosines"]


def _channels_by_length(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


def _pairwise_dot_and_norms(student: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`(<a_b, b_b>, |a_b|², |b_b|²)` per sample, each `(B,)`, in the inputs' dtype."""
    s, r = _channels_by_length(student), _channels_by_length(reference)
    dot = (s.sum(dim=1) * r.sum(dim=1)).sum(dim=1)
    sq_a = r.shape[1] * s.square().sum(dim=(1, 2))
    sq_b = s.shape[1] * r.square().sum(dim=(1, 2))
    return dot, sq_a, sq_b


def pairwise_row_cosines(student: Tensor, reference: Tensor, *, eps: float = 1e-8) -> Tensor:
    """`s_b = <a_b, b_b> / (max(|a_b|, eps) · max(|b_b|, eps))` per sample, never materializing `a_b`.

    Both maps are first scaled by `similarity.unit_scale` (exact; float32 maps near 1e30 give finite
    cosines); `eps` floors the norms in the inputs' own units (`similarity.scaled_floor`), as for the Gram and
    aggregated rows.

    Args:
        student: `(B, C_s, *spatial)`.
        reference: `(B, C_r, *spatial)`: the same batch and spatial size; the channel counts may differ.
        eps: floor of each norm, in the inputs' units.

    Returns:
        `(B,)`, float32 (float64 for float64 input).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: an input has fewer than 2 dimensions, or the batch or spatial sizes differ.
    """
    check_channel_pair(student, reference)
    with full_precision(student, reference):
        return _pairwise_row_cosines(student, reference.detach(), eps)


def _pairwise_row_cosines(student: Tensor, reference: Tensor, eps: float) -> Tensor:
    """`pairwise_row_cosines` of checked inputs."""
    dtype = compute_dtype(student, reference)
    student, reference = student.to(dtype), reference.to(dtype)
    scale_s, scale_r = unit_scale(student), unit_scale(reference)
    dot, sq_a, sq_b = _pairwise_dot_and_norms(student * scale_s, reference * scale_r)
    floor_a, floor_b = scaled_floor(eps, scale_s), scaled_floor(eps, scale_r)
    # floored before the root (floor² is a normal number): a zero row gives s = 0 with a finite gradient
    return dot / (sq_a.clamp_min(floor_a * floor_a).sqrt() * sq_b.clamp_min(floor_b * floor_b).sqrt())


def _pairwise_mse(student: Tensor, reference: Tensor) -> Tensor:
    """`mean((a - b)²)` over every sample's `C_s·C_r·N` values: `(|a_b|² + |b_b|² - 2<a_b, b_b>) / (C_s C_r N)`."""
    dot, sq_a, sq_b = _pairwise_dot_and_norms(student, reference)
    s = _channels_by_length(student)
    size = s.shape[1] * reference.shape[1] * s.shape[2]
    return ((sq_a + sq_b - 2.0 * dot) / size).mean().clamp_min(0.0)


def stochastic_window(channels: int, batch: int, generator: torch.Generator | None = None) -> slice:
    """The window of `q = channels // batch` consecutive channels (1 when `batch` is 1 or `channels < batch`),
    its start uniform in `[0, channels - q]`.

    Drawn on the CPU from `generator` (torch's default generator when None), so `torch.manual_seed`
    makes it reproducible whatever the features' device.
    """
    width = 1 if batch == 1 else max(channels // batch, 1)
    start = int(torch.randint(0, channels - width + 1, (), generator=generator))
    return slice(start, start + width)
