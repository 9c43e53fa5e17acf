"""Fused channel aggregation + row cosine: the Triton twin of `functional.aggregated_row_cosines`.

For each sample `b`, with `a = A(S_b)` and `c = A(R_b)` the channel aggregations (mean, sum or max over `C`)
of the student's and reference's maps flattened over space (`N` positions):

    s_b = <a, c> / (max(|a|, eps) · max(|c|, eps))

computed, as the torch path does, on both inputs scaled by a power of two to magnitude ≤ 1 (so float32 maps
near 1e30 give finite cosines), with `eps` (in the units of the unscaled aggregates) scaled with them
(`functional.similarity.scaled_floor`).

Forward: a grid over (sample, block of positions); each program streams its `C × BLOCK_N` slabs of both maps
once, writes the aggregated maps `a`, `c` of its positions (float32, saved for backward; for `max` also the
number of tied channels), and its partial `<a, c>`, `|a|²`, `|c|²` at its own power-of-two scale (the
exponent of its slabs' largest magnitude, found while loading them). The partials are combined in a fixed
order at the global scale (the largest exponent): deterministic, and no extra pass over memory.

Backward: the same grid; `∂L/∂a` comes from the saved maps alone, so for `mean` and `sum` the kernel only
writes `∂L/∂S` (broadcast over channels); `max` reads the student once more to route the gradient to the
maxima, split evenly between ties like `amax`. NaN: `tl.max` and `tl.maximum` drop NaN on a GPU where
`torch.amax` keeps it, so `max` carries a NaN flag per position and returns NaN there (`nan_policy=
"propagate"` behaves like torch). The reference gets no gradient. Offsets are 64-bit; the grid is
one-dimensional.

Imported only when the Triton backend is used; importing the package never imports Triton.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional._core import scaled_floor
from ._kernel_common import check_grid, frexp_exponent, program_block

AGGREGATION_CODES = {"sum": 0, "mean": 1, "max": 2}
BLOCK_POSITIONS = 128
BLOCK_CHANNELS = 32


@triton.jit
def _aggregate(base, stride_c, offs_n, mask_n, C, AGG: tl.constexpr, BLOCK_C: tl.constexpr,
               BLOCK_N: tl.constexpr):  # fmt: skip
    """`(aggregate, ties, largest |x|)` of one slab: float32 `(BLOCK_N,)`, zero outside `mask_n`; NaN where a
    channel is NaN for `max` (which `tl.maximum` would drop); `ties` counts the channels equal to the max."""
    if AGG == 2:
        acc = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), tl.float32)
    ties = tl.zeros((BLOCK_N,), tl.float32)
    nan = tl.zeros((BLOCK_N,), tl.int32)
    largest = tl.zeros((), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        ptrs = base + offs_c.to(tl.int64)[:, None] * stride_c + offs_n[None, :]
        tile = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        largest = tl.maximum(largest, tl.max(tl.abs(tile)))
        if AGG == 2:
            tile = tl.where(mask, tile, float("-inf"))
            nan = nan | tl.max((tile != tile).to(tl.int32), axis=0)
            top = tl.max(tile, axis=0)
            here = tl.sum(tl.where(tile == top[None, :], 1.0, 0.0), axis=0)
            ties = tl.where(top > acc, here, tl.where(top == acc, ties + here, ties))
            acc = tl.maximum(acc, top)
        else:
            acc += tl.sum(tile, axis=0)
    if AGG == 1:
        acc = acc / C
    if AGG == 2:
        acc = tl.where(nan > 0, float("nan"), acc)
    return tl.where(mask_n, acc, 0.0), ties, largest


@triton.jit
def _forward_kernel(
    s_ptr, r_ptr, a_ptr, c_ptr, ties_ptr, part_ptr, exp_ptr,
    C, C_R, N, blocks, stride_sb, stride_sc, stride_rb, stride_rc,
    AGG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b, offs_n, mask_n = program_block(pid, blocks, N, BLOCK_N)
    a, ties, top_s = _aggregate(s_ptr + b * stride_sb, stride_sc, offs_n, mask_n, C, AGG, BLOCK_C, BLOCK_N)
    c, _, top_r = _aggregate(r_ptr + b * stride_rb, stride_rc, offs_n, mask_n, C_R, AGG, BLOCK_C, BLOCK_N)
    out = b * N + offs_n
    tl.store(a_ptr + out, a, mask=mask_n)
    tl.store(c_ptr + out, c, mask=mask_n)
    if AGG == 2:
        tl.store(ties_ptr + out, ties, mask=mask_n)
    e_s, e_r = frexp_exponent(top_s), frexp_exponent(top_r)
    a_unit = a * _pow2(-e_s)
    c_unit = c * _pow2(-e_r)
    part = part_ptr + pid.to(tl.int64) * 3
    tl.store(part, tl.sum(a_unit * c_unit, axis=0))
    tl.store(part + 1, tl.sum(a_unit * a_unit, axis=0))
    tl.store(part + 2, tl.sum(c_unit * c_unit, axis=0))
    tl.store(exp_ptr + pid.to(tl.int64) * 2, e_s)
    tl.store(exp_ptr + pid.to(tl.int64) * 2 + 1, e_r)


@triton.jit
def _pow2(e):
    """`2^e` as float32 for an int32 `-254 ≤ e ≤ 0` (exact; two factors keep each exponent field valid)."""
    half = e // 2
    low = ((127 + half) << 23).to(tl.float32, bitcast=True)
    high = ((127 + (e - half)) << 23).to(tl.float32, bitcast=True)
    return low * high


@triton.jit
def _backward_kernel(
    s_ptr, a_ptr, c_ptr, ties_ptr, stats_ptr, grad_ptr, ds_ptr,
    C, N, blocks, stride_sb, stride_sc, stride_db, stride_dc, grad_stride,
    AGG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b, offs_n, mask_n = program_block(tl.program_id(0), blocks, N, BLOCK_N)
    # per sample: cosine, |a|, |c| (global units), then the global scales 2^-E_s, 2^-E_r and the norms' floors
    # in those units
    cosine = tl.load(stats_ptr + b * 3)
    norm_s = tl.load(stats_ptr + b * 3 + 1)
    tail = stats_ptr + tl.num_programs(0) // blocks * 3
    f_s, f_r = tl.load(tail), tl.load(tail + 1)
    floor_s, floor_r = tl.load(tail + 2), tl.load(tail + 3)
    clamped_s = tl.maximum(norm_s, floor_s)
    clamped_r = tl.maximum(tl.load(stats_ptr + b * 3 + 2), floor_r)
    g = tl.load(grad_ptr + b * grad_stride).to(tl.float32)
    a = tl.load(a_ptr + b * N + offs_n, mask=mask_n, other=0.0)
    c = tl.load(c_ptr + b * N + offs_n, mask=mask_n, other=0.0)
    # ∂s/∂a' = c' / (|a'|·|c'|) − s · a' / |a'|² (the second term only where |a'| > its floor), a' = a · f_s
    through_norm = tl.where(norm_s > floor_s, cosine / (clamped_s * clamped_s), 0.0)
    grad_a = g * (c * f_r / (clamped_s * clamped_r) - through_norm * a * f_s) * f_s
    if AGG == 1:
        grad_a = grad_a / C
    if AGG == 2:
        grad_a = grad_a / tl.maximum(tl.load(ties_ptr + b * N + offs_n, mask=mask_n, other=1.0), 1.0)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        if AGG == 2:
            ptrs = s_ptr + b * stride_sb + offs_c.to(tl.int64)[:, None] * stride_sc + offs_n[None, :]
            tile = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
            grad = tl.where(tile == a[None, :], grad_a[None, :], 0.0)
        else:
            grad = tl.zeros((BLOCK_C, BLOCK_N), tl.float32) + grad_a[None, :]
        out = ds_ptr + b * stride_db + offs_c.to(tl.int64)[:, None] * stride_dc + offs_n[None, :]
        tl.store(out, grad.to(ds_ptr.dtype.element_ty), mask=mask)


def _blocks(positions: int) -> int:
    return int(min(triton.next_power_of_2(max(positions, 1)), BLOCK_POSITIONS))


class AggregatedRowCosines(torch.autograd.Function):
    """`(B,)` cosines of the channel-aggregated maps; saves the inputs (read again only by `max`'s
    backward), the aggregated maps, and three scalars per sample."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, reference: Tensor, aggregation: str, eps: float) -> Tensor:
        batch, channels = student.shape[0], student.shape[1]
        s = student.reshape(batch, channels, -1).contiguous()
        r = reference.detach().reshape(batch, reference.shape[1], -1).contiguous()
        positions = s.shape[2]
        code = AGGREGATION_CODES[aggregation]
        block_n = _blocks(positions)
        blocks = triton.cdiv(positions, block_n)
        maps = torch.empty(3 if code == 2 else 2, batch, positions, device=s.device, dtype=torch.float32)
        partials = torch.empty(batch, blocks, 3, device=s.device, dtype=torch.float32)
        exponents = torch.zeros(batch, blocks, 2, device=s.device, dtype=torch.int32)
        if batch * positions:
            _forward_kernel[check_grid(batch * blocks, "aggregated_row_cosines")](
                s, r, maps[0], maps[1], maps[-1], partials, exponents, channels, r.shape[1], positions, blocks,
                s.stride(0), s.stride(1), r.stride(0), r.stride(1),
                AGG=code, BLOCK_C=BLOCK_CHANNELS, BLOCK_N=block_n,
            )  # fmt: skip
        else:
            partials.zero_()
        # fixed-order combination at the global scale (the largest exponent over the whole batch)
        e_s, e_r = exponents[..., 0], exponents[..., 1]
        top_s, top_r = (
            e_s.amax() if e_s.numel() else e_s.new_zeros(()),
            e_r.amax() if e_r.numel() else e_r.new_zeros(()),
        )
        shifts = torch.stack([e_s + e_r - top_s - top_r, 2 * (e_s - top_s), 2 * (e_r - top_r)], dim=2)
        sums = (partials * torch.ldexp(torch.ones(shifts.shape, device=s.device), shifts.clamp_min(-300))).sum(dim=1)
        one = torch.ones((), device=s.device, dtype=torch.float32)
        scales = torch.stack([torch.ldexp(one, -top_s), torch.ldexp(one, -top_r)]).float()
        floors = scaled_floor(eps, scales)  # eps in the units of the scaled aggregates, per side
        norm_s, norm_r = sums[:, 1].sqrt(), sums[:, 2].sqrt()
        cosines = sums[:, 0] / (norm_s.clamp_min(floors[0]) * norm_r.clamp_min(floors[1]))
        stats = torch.cat([torch.stack([cosines, norm_s, norm_r], dim=1).reshape(-1), scales, floors])
        ctx.save_for_backward(s if code == 2 else s[:0], maps, stats)
        ctx.meta = (student.shape, code, block_n, blocks, student.dtype)
        return cosines

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        s, maps, stats = ctx.saved_tensors
        shape, code, block_n, blocks, dtype = ctx.meta
        batch, channels = shape[0], shape[1]
        positions = maps.shape[2]
        grad_s = torch.empty(batch, channels, positions, device=grad.device, dtype=dtype)
        if grad_s.numel():
            source = s if code == 2 else grad_s  # mean/sum read no input: any pointer will do
            _backward_kernel[check_grid(batch * blocks, "aggregated_row_cosines")](
                source, maps[0], maps[1], maps[-1], stats, grad, grad_s, channels, positions, blocks,
                source.stride(0), source.stride(1), grad_s.stride(0), grad_s.stride(1), grad.stride(0),
                AGG=code, BLOCK_C=BLOCK_CHANNELS, BLOCK_N=block_n,
            )  # fmt: skip
        return grad_s.reshape(shape), None, None, None


def compile_specializations() -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """What `tests/ops/compile_kernels.py` compiles: every aggregation for every input dtype."""
    for element in ("fp32", "fp16", "bf16"):
        data = "*" + element
        for name, code in AGGREGATION_CODES.items():
            blocks = {"AGG": code, "BLOCK_C": BLOCK_CHANNELS, "BLOCK_N": BLOCK_POSITIONS}
            yield (f"channel_forward[{element},{name}]", _forward_kernel,
                   {"s_ptr": data, "r_ptr": data, "a_ptr": "*fp32", "c_ptr": "*fp32", "ties_ptr": "*fp32",
                    "part_ptr": "*fp32", "exp_ptr": "*i32"}, blocks)  # fmt: skip
            yield (f"channel_backward[{element},{name}]", _backward_kernel,
                   {"s_ptr": data, "a_ptr": "*fp32", "c_ptr": "*fp32", "ties_ptr": "*fp32", "stats_ptr": "*fp32",
                    "grad_ptr": "*fp32", "ds_ptr": data}, blocks)  # fmt: skip
