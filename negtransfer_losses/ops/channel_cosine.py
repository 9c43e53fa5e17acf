"""Fused channel aggregation + row cosine: the Triton twin of `functional.aggregated_row_cosines`.

For each sample `b`, with `a = A(S_b)` and `c = A(R_b)` the channel aggregations (mean, sum or max over `C`)
of the student's and reference's maps flattened over space (`N` positions):

    s_b = <a, c> / (max(|a|, eps) · max(|c|, eps))

Forward: one program per sample streams its `C × N` maps once, tile by tile, accumulating `<a, c>`, `|a|²`
and `|c|²` in float32; nothing but the inputs is saved. Backward recomputes `a` and `c` tile by tile and
writes `∂L/∂S` in the same pass (`max` splits the gradient evenly between tied channels, like `amax`;
this takes one more pass over the channels to count ties). The reference gets no gradient.

Imported only when the Triton backend is used; importing the package never imports Triton.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

AGGREGATION_CODES = {"sum": 0, "mean": 1, "max": 2}


@triton.jit
def _aggregate_tile(base, stride_c, offs_n, mask_n, C, AGG: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channel aggregation of one tile of positions: float32 `(BLOCK_N,)`, zero outside `mask_n`."""
    if AGG == 2:
        acc = tl.full(offs_n.shape, float("-inf"), tl.float32)
    else:
        acc = tl.zeros(offs_n.shape, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_n[None, :]
        ptrs = base + offs_c[:, None] * stride_c + offs_n[None, :]
        if AGG == 2:
            tile = tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)
            acc = tl.maximum(acc, tl.max(tile, axis=0))
        else:
            tile = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(tile, axis=0)
    if AGG == 1:
        acc = acc / C
    return tl.where(mask_n, acc, 0.0)


@triton.jit
def _forward_kernel(
    s_ptr, r_ptr, cos_ptr, norm_s_ptr, norm_r_ptr,
    C, C_R, N, stride_sb, stride_sc, stride_rb, stride_rc, eps,
    AGG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    dot = tl.zeros((BLOCK_N,), tl.float32)
    sq_s = tl.zeros((BLOCK_N,), tl.float32)
    sq_r = tl.zeros((BLOCK_N,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        a = _aggregate_tile(s_ptr + b * stride_sb, stride_sc, offs_n, mask_n, C, AGG, BLOCK_C)
        c = _aggregate_tile(r_ptr + b * stride_rb, stride_rc, offs_n, mask_n, C_R, AGG, BLOCK_C)
        dot += a * c
        sq_s += a * a
        sq_r += c * c
    norm_s = tl.sqrt(tl.sum(sq_s, axis=0))
    norm_r = tl.sqrt(tl.sum(sq_r, axis=0))
    cosine = tl.sum(dot, axis=0) / (tl.maximum(norm_s, eps) * tl.maximum(norm_r, eps))
    tl.store(cos_ptr + b, cosine)
    tl.store(norm_s_ptr + b, norm_s)
    tl.store(norm_r_ptr + b, norm_r)


@triton.jit
def _backward_kernel(
    s_ptr, r_ptr, grad_ptr, cos_ptr, norm_s_ptr, norm_r_ptr, ds_ptr,
    C, C_R, N, stride_sb, stride_sc, stride_rb, stride_rc, stride_db, stride_dc, eps,
    AGG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    g = tl.load(grad_ptr + b).to(tl.float32)
    cosine = tl.load(cos_ptr + b)
    norm_s = tl.load(norm_s_ptr + b)
    clamped_s = tl.maximum(norm_s, eps)
    clamped_r = tl.maximum(tl.load(norm_r_ptr + b), eps)
    # ∂s/∂a = c / (|a|·|c|) − s · a / |a|², the second term only where |a| > eps (the floor is constant)
    through_norm = tl.where(norm_s > eps, cosine / (clamped_s * clamped_s), 0.0)
    s_base = s_ptr + b * stride_sb
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        a = _aggregate_tile(s_base, stride_sc, offs_n, mask_n, C, AGG, BLOCK_C)
        c = _aggregate_tile(r_ptr + b * stride_rb, stride_rc, offs_n, mask_n, C_R, AGG, BLOCK_C)
        grad_a = g * (c / (clamped_s * clamped_r) - through_norm * a)
        if AGG == 2:
            ties = tl.zeros((BLOCK_N,), tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask = (offs_c[:, None] < C) & mask_n[None, :]
                tile = tl.load(s_base + offs_c[:, None] * stride_sc + offs_n[None, :], mask=mask, other=float("-inf"))
                ties += tl.sum(tl.where(tile.to(tl.float32) == a[None, :], 1.0, 0.0), axis=0)
            grad_a = grad_a / tl.maximum(ties, 1.0)
        elif AGG == 1:
            grad_a = grad_a / C
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = (offs_c[:, None] < C) & mask_n[None, :]
            if AGG == 2:
                tile = tl.load(s_base + offs_c[:, None] * stride_sc + offs_n[None, :], mask=mask, other=float("-inf"))
                grad = tl.where(tile.to(tl.float32) == a[None, :], grad_a[None, :], 0.0)
            else:
                grad = tl.zeros((BLOCK_C, BLOCK_N), tl.float32) + grad_a[None, :]
            tl.store(ds_ptr + b * stride_db + offs_c[:, None] * stride_dc + offs_n[None, :], grad, mask=mask)


def _blocks(channels: int, positions: int) -> tuple[int, int]:
    block_n = min(triton.next_power_of_2(max(positions, 1)), 128)
    block_c = min(triton.next_power_of_2(max(channels, 1)), max(16, 4096 // block_n))
    return block_c, block_n


class AggregatedRowCosines(torch.autograd.Function):
    """`(B,)` cosines of the channel-aggregated maps; saves only its inputs, recomputes in backward."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, reference: Tensor, aggregation: str, eps: float) -> Tensor:
        batch, channels = student.shape[0], student.shape[1]
        s = student.reshape(batch, channels, -1).contiguous()
        r = reference.detach().reshape(batch, reference.shape[1], -1).contiguous()
        positions = s.shape[2]
        cosines = torch.empty(batch, device=s.device, dtype=torch.float32)
        norms_s, norms_r = torch.empty_like(cosines), torch.empty_like(cosines)
        block_c, block_n = _blocks(channels, positions)
        code = AGGREGATION_CODES[aggregation]
        _forward_kernel[(batch,)](
            s, r, cosines, norms_s, norms_r, channels, r.shape[1], positions,
            s.stride(0), s.stride(1), r.stride(0), r.stride(1), eps,
            AGG=code, BLOCK_C=block_c, BLOCK_N=block_n,
        )  # fmt: skip
        ctx.save_for_backward(s, r, cosines, norms_s, norms_r)
        ctx.meta = (student.shape, code, eps, block_c, block_n)
        return cosines

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        s, r, cosines, norms_s, norms_r = ctx.saved_tensors
        shape, code, eps, block_c, block_n = ctx.meta
        grad_s = torch.empty_like(s)
        _backward_kernel[(s.shape[0],)](
            s, r, grad.contiguous(), cosines, norms_s, norms_r, grad_s, s.shape[1], r.shape[1], s.shape[2],
            s.stride(0), s.stride(1), r.stride(0), r.stride(1), grad_s.stride(0), grad_s.stride(1), eps,
            AGG=code, BLOCK_C=block_c, BLOCK_N=block_n,
        )  # fmt: skip
        return grad_s.reshape(shape), None, None, None
