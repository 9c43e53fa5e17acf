"""Row cosines of Gram matrices without forming them: the Triton twin of `functional.gram_row_cosines`.

With rows `v_i` of `V (G groups, m rows, N)` (`"sample"` scope: `G = B`, `m = C`; `"batch"`: `G = 1`,
`m = B·C`), `S = V Vᵀ` and likewise `U` and `T = U Uᵀ` for the reference:

    s_i = <S_i, T_i> / (max(|S_i|, eps) · max(|T_i|, eps))

Forward: one program per block of rows computes the Gram tiles `S[I, J]`, `T[I, J]` block by block (reducing
over `N`), accumulates `<S_i, T_i>`, `|S_i|²`, `|T_i|²` and drops the tiles — memory is `O(tile)`, not
`O(m²)`, like flash attention's treatment of the score matrix. Backward: with `g_i = ∂L/∂s_i`, the gradient
with respect to the Gram entries is `W[i, j] = α_i T[i, j] + β_i S[i, j]` (`α_i = g_i / (|S_i| |T_i|)`,
`β_i = −g_i s_i / |S_i|²` where `|S_i| > eps`), and since `S = V Vᵀ` is symmetric, `∂L/∂V = (W + Wᵀ) V` with
`(W + Wᵀ)[i, j] = (α_i + α_j) T[i, j] + (β_i + β_j) S[i, j]`: each program recomputes its tiles and owns its
rows of the gradient (no atomics). The reference gets no gradient. Float32 accumulation throughout.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_ROWS = 16
BLOCK_POSITIONS = 32


@triton.jit
def _gram_tiles(v_ptr, u_ptr, rows_i, rows_j, mask_i, mask_j, N, stride_r, BLOCK_N: tl.constexpr):
    """`S[I, J]` and `T[I, J]` of one group, float32, reduced over all positions."""
    s = tl.zeros((rows_i.shape[0], rows_j.shape[0]), tl.float32)
    t = tl.zeros((rows_i.shape[0], rows_j.shape[0]), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mi = mask_i[:, None] & mask_n[None, :]
        mj = mask_j[:, None] & mask_n[None, :]
        vi = tl.load(v_ptr + rows_i[:, None] * stride_r + offs_n[None, :], mask=mi, other=0.0).to(tl.float32)
        vj = tl.load(v_ptr + rows_j[:, None] * stride_r + offs_n[None, :], mask=mj, other=0.0).to(tl.float32)
        ui = tl.load(u_ptr + rows_i[:, None] * stride_r + offs_n[None, :], mask=mi, other=0.0).to(tl.float32)
        uj = tl.load(u_ptr + rows_j[:, None] * stride_r + offs_n[None, :], mask=mj, other=0.0).to(tl.float32)
        s += tl.dot(vi, tl.trans(vj), input_precision="ieee")
        t += tl.dot(ui, tl.trans(uj), input_precision="ieee")
    return s, t


@triton.jit
def _forward_kernel(v_ptr, u_ptr, cos_ptr, norm_s_ptr, norm_t_ptr, M, N, stride_g, stride_r, eps,
                    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    group = tl.program_id(0)
    rows_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < M
    v_base, u_base = v_ptr + group * stride_g, u_ptr + group * stride_g
    dot = tl.zeros((BLOCK_I,), tl.float32)
    sq_s = tl.zeros((BLOCK_I,), tl.float32)
    sq_t = tl.zeros((BLOCK_I,), tl.float32)
    for j0 in range(0, M, BLOCK_J):
        rows_j = j0 + tl.arange(0, BLOCK_J)
        s, t = _gram_tiles(v_base, u_base, rows_i, rows_j, mask_i, rows_j < M, N, stride_r, BLOCK_N)
        dot += tl.sum(s * t, axis=1)
        sq_s += tl.sum(s * s, axis=1)
        sq_t += tl.sum(t * t, axis=1)
    norm_s, norm_t = tl.sqrt(sq_s), tl.sqrt(sq_t)
    cosine = dot / (tl.maximum(norm_s, eps) * tl.maximum(norm_t, eps))
    out = group * M + rows_i
    tl.store(cos_ptr + out, cosine, mask=mask_i)
    tl.store(norm_s_ptr + out, norm_s, mask=mask_i)
    tl.store(norm_t_ptr + out, norm_t, mask=mask_i)


@triton.jit
def _backward_kernel(v_ptr, u_ptr, alpha_ptr, beta_ptr, dv_ptr, M, N, stride_g, stride_r,
                     BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    group = tl.program_id(0)
    rows_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = rows_i < M
    v_base, u_base = v_ptr + group * stride_g, u_ptr + group * stride_g
    alpha_i = tl.load(alpha_ptr + group * M + rows_i, mask=mask_i, other=0.0)
    beta_i = tl.load(beta_ptr + group * M + rows_i, mask=mask_i, other=0.0)
    for j0 in range(0, M, BLOCK_J):
        rows_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = rows_j < M
        s, t = _gram_tiles(v_base, u_base, rows_i, rows_j, mask_i, mask_j, N, stride_r, BLOCK_N)
        alpha_j = tl.load(alpha_ptr + group * M + rows_j, mask=mask_j, other=0.0)
        beta_j = tl.load(beta_ptr + group * M + rows_j, mask=mask_j, other=0.0)
        w = (alpha_i[:, None] + alpha_j[None, :]) * t + (beta_i[:, None] + beta_j[None, :]) * s
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            vj = tl.load(
                v_base + rows_j[:, None] * stride_r + offs_n[None, :], mask=mask_j[:, None] & mask_n[None, :], other=0.0
            ).to(tl.float32)
            out = dv_ptr + group * stride_g + rows_i[:, None] * stride_r + offs_n[None, :]
            mask_out = mask_i[:, None] & mask_n[None, :]
            partial = tl.dot(w, vj, input_precision="ieee")
            tl.store(out, tl.load(out, mask=mask_out, other=0.0) + partial, mask=mask_out)


def _grouped(x: Tensor, scope: str) -> Tensor:
    """`(G, m, N)`: per sample `(B, C, N)`, or the whole batch as one group `(1, B·C, N)`."""
    v = x.reshape(x.shape[0], x.shape[1], -1)
    return (v.reshape(1, -1, v.shape[-1]) if scope == "batch" else v).contiguous()


class GramRowCosines(torch.autograd.Function):
    """`(B·C,)` row cosines of the Gram matrices; saves its inputs (and three scalars per row)."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, reference: Tensor, scope: str, eps: float) -> Tensor:
        v, u = _grouped(student, scope), _grouped(reference.detach(), scope)
        groups, rows, positions = v.shape
        cosines = torch.empty(groups * rows, device=v.device, dtype=torch.float32)
        norms_s, norms_t = torch.empty_like(cosines), torch.empty_like(cosines)
        grid = (groups, triton.cdiv(rows, BLOCK_ROWS))
        _forward_kernel[grid](
            v, u, cosines, norms_s, norms_t, rows, positions, v.stride(0), v.stride(1), eps,
            BLOCK_I=BLOCK_ROWS, BLOCK_J=BLOCK_ROWS, BLOCK_N=BLOCK_POSITIONS,
        )  # fmt: skip
        ctx.save_for_backward(v, u, cosines, norms_s, norms_t)
        ctx.meta = (student.shape, eps)
        return cosines

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        v, u, cosines, norms_s, norms_t = ctx.saved_tensors
        shape, eps = ctx.meta
        clamped_s, clamped_t = norms_s.clamp_min(eps), norms_t.clamp_min(eps)
        g = grad.to(torch.float32)
        alpha = (g / (clamped_s * clamped_t)).contiguous()
        beta = torch.where(norms_s > eps, -g * cosines / (clamped_s * clamped_s), 0.0).contiguous()
        grad_v = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        groups, rows, positions = v.shape
        _backward_kernel[(groups, triton.cdiv(rows, BLOCK_ROWS))](
            v, u, alpha, beta, grad_v, rows, positions, v.stride(0), v.stride(1),
            BLOCK_I=BLOCK_ROWS, BLOCK_J=BLOCK_ROWS, BLOCK_N=BLOCK_POSITIONS,
        )  # fmt: skip
        return grad_v.to(v.dtype).reshape(shape), None, None, None
