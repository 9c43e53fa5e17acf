"""Row cosines of Gram matrices without forming them: the Triton twin of `functional.gram_row_cosines`.

With rows `w_i` of `W (G groups, m rows, N)` (`"sample"` scope: `G = B`, `m = C`; `"batch"`: `G = 1`,
`m = B·C`), `S = W Wᵀ` and likewise `U` and `T = U Uᵀ` for the reference:

    s_i = <S_i, T_i> / (max(|S_i|, eps) · max(|T_i|, eps))

Both inputs are first scaled by a power of two to magnitude ≤ 1, as the torch path does, so float32 maps
near 1e30 give finite cosines; `eps` (in the units of the unscaled Gram rows) is scaled with them, by the
square of each side's power of two (`_kernel_common.scaled_floor`). Two kernels, chosen like the torch path
(`N < m` or not):

**Identity (`N < m`; the paper's batch scope, B=30, C=512, 8×8: m = 15,360, N = 64).** Row `i` of `S` is
`W w_i`, so `<S_i, T_i> = w_iᵀ P u_i` with `P = Wᵀ U`, `|S_i|² = w_iᵀ A w_i` with `A = Wᵀ W`, and
`|T_i|² = u_iᵀ Bᵣ u_i` with `Bᵣ = Uᵀ U` — `N×N` products instead of `m×m`.
- Reduce: `P`, `A`, `Bᵣ` over row chunks (at least `8·N` rows each) split across programs; each program
  keeps its own power-of-two scale, updated online from the tiles it loads (a running-max exponent; the
  accumulators are rescaled exactly when it grows), writes its partial with its exponents, and raises the
  global exponent by an atomic maximum (the same in any order): no extra pass over memory.
- Finalize: one program per tile of each matrix sums the partials in chunk order (deterministic) at the
  global scale and stores the dot operands (float32; for 16-bit inputs `hi + lo` in the input dtype, scaled
  per tile by a power of two, so the next pass multiplies 16-bit rows by them on tensor cores).
- Rows: each program streams a block of rows once more and writes cosines and norms.
- Backward (`g_i = ∂L/∂s_i`, `α_i = g_i / (|S_i| |T_i|)`, `β_i = −g_i s_i / |S_i|²` where `|S_i| >` its floor,
  computed in-kernel from the saved cosines and norms): `∂L/∂W = diag(α) U Pᵀ + U Q + diag(β) W A + W R`
  with `Q = Uᵀ diag(α) W`, `R = Wᵀ diag(β) W`: a reduce of `Q`, `R` as above (each chunk scales `α`, `β`
  by its own power of two into [−1, 1] first), a finalize, then one pass that writes each block of `∂L/∂W`
  once (no read-modify-write). `P`, `A` come from forward's saved operands.
- Launches: 4 per pass (a memset and three kernels); the torch path dispatches about 34 forward and 30
  backward. Arithmetic: forward `12 m N²`, backward `12 m N²` (the torch path: about `12 m N²` and
  `14 m N²`, counted with `FlopCounterMode`). Each input is read twice per pass.

**Tiles (`N ≥ m`; sample scope with large maps).** Each program owns `TILE_ROWS` rows of one group and
computes the Gram tiles `S[I, J]`, `T[I, J]` for a chunk of up to 256 columns at a time, reducing over
`N`; it accumulates `<S_i, T_i>`, `|S_i|²`, `|T_i|²` and drops the tiles (memory `O(tile)`). Backward
recomputes `S[I, J]`, `T[I, J]` per chunk, forms `(W + Wᵀ)[I, J] = (α_i + α_j) T + (β_i + β_j) S` (`S`
symmetric: `∂L/∂W = (W + Wᵀ) W`) and writes `∂L/∂W[I, :]`: once when `m ≤ 256`, else accumulated over
`⌈m/256⌉` chunks by the program that owns the rows (no atomics). For 16-bit inputs `(W + Wᵀ)[I, J]` is
split `hi + lo` per tile, so that product runs on tensor cores too. The scale comes from one `amax` per
input (an extra read; this regime is compute-bound).

Offsets are 64-bit; grids are one-dimensional (`_kernel_common.check_grid`). The reference gets no
gradient. Float32 accumulation throughout; 16-bit operands go to `tl.dot` as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..functional._core import scaled_floor as _scaled_floor
from ._kernel_common import (
    check_grid,
    dot_precision,
    frexp_exponent,
    pow2_neg,
    pow2_signed,
    program_block,
    scaled_floor,
    unit_scale,
    widen_dot_operands,
)

BLOCK_ROWS = 64  # rows per block in the identity kernels
BLOCK_DIM = 64  # columns of P, A, Bᵣ per tile (fewer for N < 64: a power of two ≥ 16, tl.dot's least)
TILE_ROWS = 16  # rows per program in the tile kernels
TILE_COLUMNS = 256  # Gram columns held at once in the tile kernels
TILE_POSITIONS = 32  # positions per step of the tile kernels' reductions
TARGET_PROGRAMS = 1024  # enough reduce programs to fill a large GPU several times over
PARTIAL_BUDGET = 1 << 24  # float32 elements of reduce partials at most (64 MiB), unless one split needs more
SPLIT_ROWS_PER_DIM = 8  # a split reduces at least 8·N rows: its N×N partials cost little next to its reads


def identity_plan(groups: int, rows: int, dim: int) -> tuple[int, int, int, int]:
    """`(splits, rows_per_split, tiles, block)` of the identity reduce: row chunks (multiples of `BLOCK_ROWS`) per
    group, so that `groups · splits · tiles²` programs fill the GPU, the partials stay within budget, and
    each chunk has at least `8·N` rows (its `3·N²` float32 partials then weigh ≤ 3/8 of its 16-bit reads).
    A pure function of the sizes (tested at huge sizes without allocating)."""
    block = min(BLOCK_DIM, max(16, int(triton.next_power_of_2(max(dim, 1)))))
    tiles = triton.cdiv(max(dim, 1), block)
    padded = tiles * block
    row_blocks = triton.cdiv(max(rows, 1), BLOCK_ROWS)
    by_programs = triton.cdiv(TARGET_PROGRAMS, groups * tiles * tiles)
    by_memory = max(1, PARTIAL_BUDGET // (groups * 3 * padded * padded))
    by_traffic = max(1, rows // (SPLIT_ROWS_PER_DIM * padded))  # partials ≤ 3/8 of the bytes read
    splits = max(1, min(row_blocks, by_programs, by_memory, by_traffic))
    blocks_per_split = triton.cdiv(row_blocks, splits)
    splits = triton.cdiv(row_blocks, blocks_per_split)
    return splits, blocks_per_split * BLOCK_ROWS, tiles, block


@triton.jit
def _scaled(x, factor, DOT_DTYPE: tl.constexpr):
    """A tile times a power of two (exact), in the dot operands' dtype."""
    return (x.to(tl.float32) * factor).to(DOT_DTYPE)


@triton.jit
def _chunk_tile(pid, tiles, splits, BLOCK_N: tl.constexpr):
    """`(tile, row chunk, group, columns i, columns j)` of a program of the identity reductions: programs run over
    groups × row chunks × (tiles × tiles) tiles of the N×N matrices."""
    tile = pid % (tiles * tiles)
    rest = pid // (tiles * tiles)
    cols_i = (tile // tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_j = (tile % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    return tile, rest % splits, (rest // splits).to(tl.int64), cols_i, cols_j


@triton.jit
def _identity_reduce_kernel(w_ptr, u_ptr, part_ptr, exp_ptr, top_ptr, M, N, rows_per_split, splits, tiles,
                            DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ONE_TILE: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Partial `P = WᵀU`, `A = WᵀW`, `Bᵣ = UᵀU` of one tile over one row chunk, at the program's own scale."""
    tile, split, group, cols_i, cols_j = _chunk_tile(tl.program_id(0), tiles, splits, BLOCK_N)
    mask_i, mask_j = cols_i < N, cols_j < N
    base = group * M * N
    acc_p = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    acc_a = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    e_w = tl.full((), 0, tl.int32)
    e_u = tl.full((), 0, tl.int32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < stop
        offs = base + rows.to(tl.int64)[:, None] * N
        m_i, m_j = mask_r[:, None] & mask_i[None, :], mask_r[:, None] & mask_j[None, :]
        wi = tl.load(w_ptr + offs + cols_i[None, :], mask=m_i, other=0.0)
        ui = tl.load(u_ptr + offs + cols_i[None, :], mask=m_i, other=0.0)
        if ONE_TILE:
            wj, uj = wi, ui
        else:
            wj = tl.load(w_ptr + offs + cols_j[None, :], mask=m_j, other=0.0)
            uj = tl.load(u_ptr + offs + cols_j[None, :], mask=m_j, other=0.0)
        max_w = tl.maximum(tl.max(tl.abs(wi.to(tl.float32))), tl.max(tl.abs(wj.to(tl.float32))))
        max_u = tl.maximum(tl.max(tl.abs(ui.to(tl.float32))), tl.max(tl.abs(uj.to(tl.float32))))
        new_w = tl.maximum(e_w, frexp_exponent(max_w))
        new_u = tl.maximum(e_u, frexp_exponent(max_u))
        grow_w, grow_u = tl.minimum(new_w - e_w, 127), tl.minimum(new_u - e_u, 127)
        acc_p = acc_p * pow2_neg(grow_w + grow_u)
        acc_a = acc_a * pow2_neg(2 * grow_w)
        acc_b = acc_b * pow2_neg(2 * grow_u)
        e_w, e_u = new_w, new_u
        f_w, f_u = pow2_neg(e_w), pow2_neg(e_u)
        wi_s, ui_s = _scaled(wi, f_w, DOT_DTYPE), _scaled(ui, f_u, DOT_DTYPE)
        if ONE_TILE:
            wj_s, uj_s = wi_s, ui_s
        else:
            wj_s, uj_s = _scaled(wj, f_w, DOT_DTYPE), _scaled(uj, f_u, DOT_DTYPE)
        wi_t, ui_t = tl.trans(wi_s), tl.trans(ui_s)
        acc_p = tl.dot(wi_t, uj_s, acc_p, input_precision=PRECISION)
        acc_a = tl.dot(wi_t, wj_s, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(ui_t, uj_s, acc_b, input_precision=PRECISION)
    padded = tiles * BLOCK_N
    out = part_ptr + (group * splits + split) * 3 * padded * padded
    offs_out = cols_i.to(tl.int64)[:, None] * padded + cols_j[None, :]
    tl.store(out + offs_out, acc_p)
    tl.store(out + padded * padded + offs_out, acc_a)
    tl.store(out + 2 * padded * padded + offs_out, acc_b)
    exp_out = exp_ptr + ((group * splits + split) * tiles * tiles + tile) * 2
    tl.store(exp_out, e_w)
    tl.store(exp_out + 1, e_u)
    tl.atomic_max(top_ptr, e_w)  # the global scale: a maximum, the same in any order
    tl.atomic_max(top_ptr + 1, e_u)


@triton.jit
def _finalize_kernel(part_ptr, exp_ptr, top_ptr, parts_ptr, factor_ptr, splits, tiles,
                     MATS: tl.constexpr, FORWARD: tl.constexpr, DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_N: tl.constexpr):  # fmt: skip
    """Combine one tile of one matrix over the splits, in split order (deterministic), at the global scale
    (the largest exponent); store it as dot operands: with `SPLIT`, scaled by the power of two `2^-e` that
    brings its largest entry into [0.5, 1) and split `hi + lo` in the 16-bit dtype (`2^e` goes to
    `factor_ptr`, one per tile), else float32 as it is (factor 1).

    Forward matrices `P, A, Bᵣ` carry input exponents `(e_w, e_u)`; backward `Q, R` carry `(e_α, e_β)`."""
    pid = tl.program_id(0)
    tile = pid % (tiles * tiles)
    rest = pid // (tiles * tiles)
    k = rest % MATS
    group = (rest // MATS).to(tl.int64)
    padded = tiles * BLOCK_N
    rows_i = (tile // tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_j = (tile % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = rows_i.to(tl.int64)[:, None] * padded + cols_j[None, :]
    top_0, top_1 = tl.load(top_ptr), tl.load(top_ptr + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    for split in range(0, splits):
        exps = exp_ptr + ((group * splits + split) * tiles * tiles + tile) * 2
        e_0, e_1 = tl.load(exps), tl.load(exps + 1)
        if FORWARD:
            drop = tl.where(k == 0, top_0 + top_1 - e_0 - e_1, tl.where(k == 1, 2 * (top_0 - e_0), 2 * (top_1 - e_1)))
        else:
            drop = tl.where(k == 0, top_0 - e_0, top_1 - e_1)
        part = tl.load(part_ptr + ((group * splits + split) * MATS + k) * padded * padded + offs)
        acc += part * pow2_neg(tl.minimum(drop, 254))
    NUM: tl.constexpr = 2 if SPLIT else 1
    out = parts_ptr + (group * MATS + k) * NUM * padded * padded + offs
    factor_out = factor_ptr + (group * MATS + k) * tiles * tiles + tile
    if SPLIT:
        largest = tl.max(tl.abs(acc))
        exponent = tl.where(largest > 0, ((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126, 0)
        acc = acc * pow2_signed(-exponent)
        hi = acc.to(DOT_DTYPE)
        tl.store(out, hi)
        tl.store(out + padded * padded, (acc - hi.to(tl.float32)).to(DOT_DTYPE))
        tl.store(factor_out, pow2_signed(exponent))
    else:
        tl.store(out, acc)
        tl.store(factor_out, 1.0)


@triton.jit
def _row_coefficients(grad_ptr, grad_stride, cos_ptr, norm_s_ptr, norm_t_ptr, index, mask, floor_s, floor_t):
    """`α_i = g_i / (|S_i| |T_i|)` and `β_i = −g_i s_i / |S_i|²` where `|S_i| > floor_s` (0 elsewhere), the norms
    floored at `floor_s`, `floor_t` (in the scaled units)."""
    g = tl.load(grad_ptr + index * grad_stride, mask=mask, other=0.0).to(tl.float32)
    cosine = tl.load(cos_ptr + index, mask=mask, other=0.0)
    norm_s = tl.load(norm_s_ptr + index, mask=mask, other=0.0)
    clamped_s = tl.maximum(norm_s, floor_s)
    clamped_t = tl.maximum(tl.load(norm_t_ptr + index, mask=mask, other=0.0), floor_t)
    alpha = g / (clamped_s * clamped_t)
    beta = tl.where(norm_s > floor_s, -g * cosine / (clamped_s * clamped_s), 0.0)
    return alpha, beta


@triton.jit
def _mat_dot(x, parts_ptr, factor_ptr, index, tile, offs, padded, tiles, acc, SPLIT: tl.constexpr,
             PRECISION: tl.constexpr):  # fmt: skip
    """`acc + x @ M` for one tile of matrix `index`: its parts `hi` (and, with `SPLIT`, `lo`) hold `M / f`,
    `f` the tile's factor, so 16-bit `x` multiplies a float32 matrix on tensor cores to ~16 bits or more."""
    NUM: tl.constexpr = 2 if SPLIT else 1
    base = parts_ptr + index * NUM * padded * padded
    product = tl.dot(x, tl.load(base + offs), input_precision=PRECISION)
    if SPLIT:
        product = tl.dot(x, tl.load(base + padded * padded + offs), product, input_precision=PRECISION)
    return acc + product * tl.load(factor_ptr + index * tiles * tiles + tile)


@triton.jit
def _identity_rows_kernel(w_ptr, u_ptr, parts_ptr, factor_ptr, top_ptr, cos_ptr, norm_s_ptr, norm_t_ptr,
                          M, N, blocks, tiles, eps, DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr,
                          PRECISION: tl.constexpr, ONE_TILE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """`<S_i, T_i> = w_iᵀ P u_i`, `|S_i|² = w_iᵀ A w_i`, `|T_i|² = u_iᵀ Bᵣ u_i` for one block of rows."""
    group, rows, mask_r = program_block(tl.program_id(0), blocks, M, BLOCK_R)
    offs_r = group * M * N + rows.to(tl.int64)[:, None] * N
    f_w, f_u = pow2_neg(tl.load(top_ptr)), pow2_neg(tl.load(top_ptr + 1))
    padded = tiles * BLOCK_N
    mats = parts_ptr + group * 3 * (2 if SPLIT else 1) * padded * padded
    factors = factor_ptr + group * 3 * tiles * tiles
    dot = tl.zeros((BLOCK_R,), tl.float32)
    sq_s = tl.zeros((BLOCK_R,), tl.float32)
    sq_t = tl.zeros((BLOCK_R,), tl.float32)
    for j0 in range(0, N, BLOCK_N):
        cols_j = j0 + tl.arange(0, BLOCK_N)
        m_j = mask_r[:, None] & (cols_j < N)[None, :]
        wj = tl.load(w_ptr + offs_r + cols_j[None, :], mask=m_j, other=0.0).to(tl.float32) * f_w
        uj = tl.load(u_ptr + offs_r + cols_j[None, :], mask=m_j, other=0.0).to(tl.float32) * f_u
        wp = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        wa = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        ub = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        for k0 in range(0, N, BLOCK_N):
            cols_k = k0 + tl.arange(0, BLOCK_N)
            if ONE_TILE:
                wk, uk = wj.to(DOT_DTYPE), uj.to(DOT_DTYPE)
            else:
                m_k = mask_r[:, None] & (cols_k < N)[None, :]
                wk = (tl.load(w_ptr + offs_r + cols_k[None, :], mask=m_k, other=0.0).to(tl.float32) * f_w).to(DOT_DTYPE)
                uk = (tl.load(u_ptr + offs_r + cols_k[None, :], mask=m_k, other=0.0).to(tl.float32) * f_u).to(DOT_DTYPE)
            offs_kj = cols_k.to(tl.int64)[:, None] * padded + cols_j[None, :]
            tile = (k0 // BLOCK_N) * tiles + j0 // BLOCK_N
            wp = _mat_dot(wk, mats, factors, 0, tile, offs_kj, padded, tiles, wp, SPLIT, PRECISION)
            wa = _mat_dot(wk, mats, factors, 1, tile, offs_kj, padded, tiles, wa, SPLIT, PRECISION)
            ub = _mat_dot(uk, mats, factors, 2, tile, offs_kj, padded, tiles, ub, SPLIT, PRECISION)
        dot += tl.sum(wp * uj, axis=1)
        sq_s += tl.sum(wa * wj, axis=1)
        sq_t += tl.sum(ub * uj, axis=1)
    floor_s, floor_t = scaled_floor(eps, f_w, 2), scaled_floor(eps, f_u, 2)
    cosine = dot / (tl.sqrt(tl.maximum(sq_s, floor_s * floor_s)) * tl.sqrt(tl.maximum(sq_t, floor_t * floor_t)))
    out = group * M + rows
    tl.store(cos_ptr + out, cosine, mask=mask_r)
    tl.store(norm_s_ptr + out, tl.sqrt(tl.maximum(sq_s, 0.0)), mask=mask_r)
    tl.store(norm_t_ptr + out, tl.sqrt(tl.maximum(sq_t, 0.0)), mask=mask_r)


@triton.jit
def _identity_grad_reduce_kernel(w_ptr, u_ptr, grad_ptr, grad_stride, cos_ptr, norm_s_ptr, norm_t_ptr, top_ptr,
                                 part_ptr, exp_ptr, coef_top_ptr, M, N, rows_per_split, splits, tiles, eps,
                                 DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr, ONE_TILE: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """Partial `Q = Uᵀ diag(α) W` and `R = Wᵀ diag(β) W` of one tile over one row chunk, at the forward's
    global input scale. `α`, `β` come from the saved cosines and norms; a first sweep over the chunk's rows
    finds their largest exponents `e_α`, `e_β` (≥ 0), and the dots take `α · 2^-e_α`, `β · 2^-e_β` (in
    [−1, 1]: 16-bit operands cannot overflow); the exponents go with the partial."""
    tile, split, group, cols_i, cols_j = _chunk_tile(tl.program_id(0), tiles, splits, BLOCK_N)
    mask_i, mask_j = cols_i < N, cols_j < N
    f_w, f_u = pow2_neg(tl.load(top_ptr)), pow2_neg(tl.load(top_ptr + 1))
    floor_s, floor_t = scaled_floor(eps, f_w, 2), scaled_floor(eps, f_u, 2)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    top_a = tl.zeros((), tl.float32)
    top_b = tl.zeros((), tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < stop
        alpha, beta = _row_coefficients(grad_ptr, grad_stride, cos_ptr, norm_s_ptr, norm_t_ptr, group * M + rows,
                                        mask_r, floor_s, floor_t)  # fmt: skip
        top_a = tl.maximum(top_a, tl.max(tl.abs(alpha)))
        top_b = tl.maximum(top_b, tl.max(tl.abs(beta)))
    e_a, e_b = frexp_exponent(top_a), frexp_exponent(top_b)
    f_a, f_b = pow2_neg(tl.minimum(e_a, 254)), pow2_neg(tl.minimum(e_b, 254))
    acc_q = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    acc_r = tl.zeros((BLOCK_N, BLOCK_N), tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < stop
        alpha, beta = _row_coefficients(grad_ptr, grad_stride, cos_ptr, norm_s_ptr, norm_t_ptr, group * M + rows,
                                        mask_r, floor_s, floor_t)  # fmt: skip
        offs = group * M * N + rows.to(tl.int64)[:, None] * N
        m_i, m_j = mask_r[:, None] & mask_i[None, :], mask_r[:, None] & mask_j[None, :]
        wi = tl.load(w_ptr + offs + cols_i[None, :], mask=m_i, other=0.0).to(tl.float32) * f_w
        ui = tl.load(u_ptr + offs + cols_i[None, :], mask=m_i, other=0.0).to(tl.float32) * f_u
        if ONE_TILE:
            wj = wi
        else:
            wj = tl.load(w_ptr + offs + cols_j[None, :], mask=m_j, other=0.0).to(tl.float32) * f_w
        wj_d = wj.to(DOT_DTYPE)
        alpha_unit, beta_unit = alpha * f_a, beta * f_b
        acc_q = tl.dot(tl.trans((ui * alpha_unit[:, None]).to(DOT_DTYPE)), wj_d, acc_q, input_precision=PRECISION)
        acc_r = tl.dot(tl.trans((wi * beta_unit[:, None]).to(DOT_DTYPE)), wj_d, acc_r, input_precision=PRECISION)
    padded = tiles * BLOCK_N
    out = part_ptr + (group * splits + split) * 2 * padded * padded
    offs_out = cols_i.to(tl.int64)[:, None] * padded + cols_j[None, :]
    tl.store(out + offs_out, acc_q)
    tl.store(out + padded * padded + offs_out, acc_r)
    exp_out = exp_ptr + ((group * splits + split) * tiles * tiles + tile) * 2
    tl.store(exp_out, e_a)
    tl.store(exp_out + 1, e_b)
    tl.atomic_max(coef_top_ptr, e_a)
    tl.atomic_max(coef_top_ptr + 1, e_b)


@triton.jit
def _identity_grad_rows_kernel(w_ptr, u_ptr, fwd_parts_ptr, fwd_factor_ptr, parts_ptr, factor_ptr, top_ptr,
                               coef_top_ptr, grad_ptr, grad_stride, cos_ptr, norm_s_ptr, norm_t_ptr, dw_ptr, M, N,
                               blocks, tiles, eps,
                               DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """`∂L/∂W[I] = α_I ⊙ (U_I Pᵀ) + U_I Q + β_I ⊙ (W_I A) + W_I R` (times the input scale), written once;
    `P`, `A` are the forward's operands (`Pᵀ` read transposed), `Q`, `R` the backward reduce's."""
    group, rows, mask_r = program_block(tl.program_id(0), blocks, M, BLOCK_R)
    offs_r = group * M * N + rows.to(tl.int64)[:, None] * N
    f_w, f_u = pow2_neg(tl.load(top_ptr)), pow2_neg(tl.load(top_ptr + 1))
    # Q, R were stored times 2^-(E_α + bound exponent): undo the E_α part here, the bound below
    c_q = 1.0 / pow2_neg(tl.minimum(tl.load(coef_top_ptr), 254))
    c_r = 1.0 / pow2_neg(tl.minimum(tl.load(coef_top_ptr + 1), 254))
    floor_s, floor_t = scaled_floor(eps, f_w, 2), scaled_floor(eps, f_u, 2)
    alpha, beta = _row_coefficients(grad_ptr, grad_stride, cos_ptr, norm_s_ptr, norm_t_ptr, group * M + rows, mask_r,
                                    floor_s, floor_t)  # fmt: skip
    NUM: tl.constexpr = 2 if SPLIT else 1
    padded = tiles * BLOCK_N
    fwd = fwd_parts_ptr + group * 3 * NUM * padded * padded
    fwd_factors = fwd_factor_ptr + group * 3 * tiles * tiles
    mats = parts_ptr + group * 2 * NUM * padded * padded
    factors = factor_ptr + group * 2 * tiles * tiles
    for j0 in range(0, N, BLOCK_N):
        cols_j = j0 + tl.arange(0, BLOCK_N)
        up = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        wa = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        uq = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        wr = tl.zeros((BLOCK_R, BLOCK_N), tl.float32)
        for k0 in range(0, N, BLOCK_N):
            cols_k = k0 + tl.arange(0, BLOCK_N)
            m_k = mask_r[:, None] & (cols_k < N)[None, :]
            wk = (tl.load(w_ptr + offs_r + cols_k[None, :], mask=m_k, other=0.0).to(tl.float32) * f_w).to(DOT_DTYPE)
            uk = (tl.load(u_ptr + offs_r + cols_k[None, :], mask=m_k, other=0.0).to(tl.float32) * f_u).to(DOT_DTYPE)
            offs_kj = cols_k.to(tl.int64)[:, None] * padded + cols_j[None, :]
            offs_jk = cols_j.to(tl.int64)[None, :] * padded + cols_k[:, None]  # Pᵀ[k, j] = P[j, k]
            tile_kj = (k0 // BLOCK_N) * tiles + j0 // BLOCK_N
            tile_jk = (j0 // BLOCK_N) * tiles + k0 // BLOCK_N
            up = _mat_dot(uk, fwd, fwd_factors, 0, tile_jk, offs_jk, padded, tiles, up, SPLIT, PRECISION)
            wa = _mat_dot(wk, fwd, fwd_factors, 1, tile_kj, offs_kj, padded, tiles, wa, SPLIT, PRECISION)
            uq = _mat_dot(uk, mats, factors, 0, tile_kj, offs_kj, padded, tiles, uq, SPLIT, PRECISION)
            wr = _mat_dot(wk, mats, factors, 1, tile_kj, offs_kj, padded, tiles, wr, SPLIT, PRECISION)
        grad = (alpha[:, None] * up + beta[:, None] * wa + c_q * uq + c_r * wr) * f_w
        m_j = mask_r[:, None] & (cols_j < N)[None, :]
        tl.store(dw_ptr + offs_r + cols_j[None, :], grad.to(dw_ptr.dtype.element_ty), mask=m_j)


@triton.jit
def _tile_pair(w_ptr, u_ptr, offs_i, offs_j, mask_i, mask_j, N, f_w, f_u,
               DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """`S[I, J]` and `T[I, J]` of one group (scaled inputs), float32, reduced over all positions."""
    s = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
    t = tl.zeros((BLOCK_I, BLOCK_J), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mi, mj = mask_i[:, None] & mask_n[None, :], mask_j[:, None] & mask_n[None, :]
        wi = _scaled(tl.load(w_ptr + offs_i[:, None] + offs_n[None, :], mask=mi, other=0.0), f_w, DOT_DTYPE)
        wj = _scaled(tl.load(w_ptr + offs_j[:, None] + offs_n[None, :], mask=mj, other=0.0), f_w, DOT_DTYPE)
        ui = _scaled(tl.load(u_ptr + offs_i[:, None] + offs_n[None, :], mask=mi, other=0.0), f_u, DOT_DTYPE)
        uj = _scaled(tl.load(u_ptr + offs_j[:, None] + offs_n[None, :], mask=mj, other=0.0), f_u, DOT_DTYPE)
        s = tl.dot(wi, tl.trans(wj), s, input_precision=PRECISION)
        t = tl.dot(ui, tl.trans(uj), t, input_precision=PRECISION)
    return s, t


@triton.jit
def _tile_forward_kernel(w_ptr, u_ptr, scale_ptr, cos_ptr, norm_s_ptr, norm_t_ptr, M, N, blocks, eps,
                         DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                         BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    group, rows_i, mask_i = program_block(tl.program_id(0), blocks, M, BLOCK_I)
    base = group * M * N
    offs_i = base + rows_i.to(tl.int64) * N
    f_w, f_u = tl.load(scale_ptr), tl.load(scale_ptr + 1)
    dot = tl.zeros((BLOCK_I,), tl.float32)
    sq_s = tl.zeros((BLOCK_I,), tl.float32)
    sq_t = tl.zeros((BLOCK_I,), tl.float32)
    for j0 in range(0, M, BLOCK_J):
        rows_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = rows_j < M
        s, t = _tile_pair(w_ptr, u_ptr, offs_i, base + rows_j.to(tl.int64) * N, mask_i, mask_j, N, f_w, f_u,
                          DOT_DTYPE, PRECISION, BLOCK_I, BLOCK_J, BLOCK_N)  # fmt: skip
        dot += tl.sum(s * t, axis=1)
        sq_s += tl.sum(s * s, axis=1)
        sq_t += tl.sum(t * t, axis=1)
    norm_s, norm_t = tl.sqrt(sq_s), tl.sqrt(sq_t)
    floor_s, floor_t = scaled_floor(eps, f_w, 2), scaled_floor(eps, f_u, 2)
    cosine = dot / (tl.maximum(norm_s, floor_s) * tl.maximum(norm_t, floor_t))
    out = group * M + rows_i
    tl.store(cos_ptr + out, cosine, mask=mask_i)
    tl.store(norm_s_ptr + out, norm_s, mask=mask_i)
    tl.store(norm_t_ptr + out, norm_t, mask=mask_i)


@triton.jit
def _tile_backward_kernel(w_ptr, u_ptr, scale_ptr, coef_ptr, dw_ptr, acc_ptr, M, N, blocks,
                          DOT_DTYPE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                          ONE_CHUNK: tl.constexpr,
                          BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """`∂L/∂W[I, :] = Σ_J (W + Wᵀ)[I, J] W[J, :]`; with one chunk of columns the result is written once,
    otherwise accumulated in the float32 `acc_ptr` rows this program owns, then written."""
    group, rows_i, mask_i = program_block(tl.program_id(0), blocks, M, BLOCK_I)
    base = group * M * N
    offs_i = base + rows_i.to(tl.int64) * N
    f_w, f_u = tl.load(scale_ptr), tl.load(scale_ptr + 1)
    coef_i = (group * M + rows_i) * 2
    alpha_i = tl.load(coef_ptr + coef_i, mask=mask_i, other=0.0)
    beta_i = tl.load(coef_ptr + coef_i + 1, mask=mask_i, other=0.0)
    for j0 in range(0, M, BLOCK_J):
        rows_j = j0 + tl.arange(0, BLOCK_J)
        mask_j = rows_j < M
        offs_j = base + rows_j.to(tl.int64) * N
        s, t = _tile_pair(w_ptr, u_ptr, offs_i, offs_j, mask_i, mask_j, N, f_w, f_u,
                          DOT_DTYPE, PRECISION, BLOCK_I, BLOCK_J, BLOCK_N)  # fmt: skip
        coef_j = (group * M + rows_j) * 2
        alpha_j = tl.load(coef_ptr + coef_j, mask=mask_j, other=0.0)
        beta_j = tl.load(coef_ptr + coef_j + 1, mask=mask_j, other=0.0)
        sym = (alpha_i[:, None] + alpha_j[None, :]) * t + (beta_i[:, None] + beta_j[None, :]) * s
        if SPLIT:
            # 16-bit W: sym as hi + lo in W's dtype, scaled by the power of two of its largest entry, so the
            # (W + Wᵀ) W product runs on tensor cores too (two dots) to ~16 significant bits or more
            largest = tl.max(tl.max(tl.abs(sym), axis=1), axis=0)
            exponent = tl.where(largest > 0, ((largest.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126, 0)
            sym = sym * pow2_signed(-exponent)
            sym_hi = sym.to(DOT_DTYPE)
            sym_lo = (sym - sym_hi.to(tl.float32)).to(DOT_DTYPE)
            undo = pow2_signed(exponent) * f_w
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            wj = tl.load(w_ptr + offs_j[:, None] + offs_n[None, :], mask=mask_j[:, None] & mask_n[None, :], other=0.0)
            if SPLIT:
                wj_d = _scaled(wj, f_w, DOT_DTYPE)
                partial = tl.dot(sym_lo, wj_d, tl.dot(sym_hi, wj_d), input_precision=PRECISION) * undo
            else:
                partial = tl.dot(sym, wj.to(tl.float32) * f_w, input_precision=PRECISION) * f_w
            mask_out = mask_i[:, None] & mask_n[None, :]
            offs_out = offs_i[:, None] + offs_n[None, :]
            if ONE_CHUNK:
                tl.store(dw_ptr + offs_out, partial.to(dw_ptr.dtype.element_ty), mask=mask_out)
            else:
                total = tl.load(acc_ptr + offs_out, mask=mask_out, other=0.0) + partial
                tl.store(acc_ptr + offs_out, total, mask=mask_out)
    if not ONE_CHUNK:
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_out = mask_i[:, None] & (offs_n < N)[None, :]
            offs_out = offs_i[:, None] + offs_n[None, :]
            total = tl.load(acc_ptr + offs_out, mask=mask_out, other=0.0)
            tl.store(dw_ptr + offs_out, total.to(dw_ptr.dtype.element_ty), mask=mask_out)


def _grouped(x: Tensor, scope: str) -> Tensor:
    """`(G, m, N)`: per sample `(B, C, N)`, or the whole batch as one group `(1, B·C, N)`."""
    v = x.reshape(x.shape[0], x.shape[1], -1)
    return (v.reshape(1, -1, v.shape[-1]) if scope == "batch" else v).contiguous()


def _dot_dtype(dtype: torch.dtype) -> Any:
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not widen_dot_operands(dtype):
        return tl.bfloat16
    return tl.float32


def _tile_columns(rows: int) -> int:
    return min(TILE_COLUMNS, max(16, int(triton.next_power_of_2(rows))))


def _identity_buffers(w: Tensor, mats: int) -> tuple[int, int, int, int, Tensor, Tensor, Tensor]:
    """The identity path's plan `(splits, rows per split, tiles, block)` and buffers for `mats` N×N matrices:
    the two exponent maxima, the row-chunk partials, and each partial's exponents."""
    groups, rows, dim = w.shape
    splits, rows_per_split, tiles, block = identity_plan(groups, rows, dim)
    padded = tiles * block
    top = torch.zeros(2, device=w.device, dtype=torch.int32)
    partials = torch.empty(groups, splits, mats, padded, padded, device=w.device, dtype=torch.float32)
    exponents = torch.empty(groups, splits, tiles, tiles, 2, device=w.device, dtype=torch.int32)
    return splits, rows_per_split, tiles, block, top, partials, exponents


def _finalize(
    partials: Tensor, exponents: Tensor, top: Tensor, dtype: torch.dtype, dot_dtype: Any, block: int, *, forward: bool
) -> tuple[Tensor, Tensor]:
    """Combine the row-chunk partials `(groups, splits, mats, padded, padded)` in chunk order into the N×N
    matrices (`mats` = 3 forward, 2 backward), split hi + lo in the input dtype for 16-bit dots."""
    groups, splits, mats, padded, _ = partials.shape
    tiles = exponents.shape[2]
    split = dot_dtype != tl.float32
    parts = torch.empty(groups, mats, 1 + split, padded, padded, device=partials.device,
                        dtype=dtype if split else torch.float32)  # fmt: skip
    factors = torch.empty(groups, mats, tiles, tiles, device=partials.device, dtype=torch.float32)
    _finalize_kernel[check_grid(groups * mats * tiles * tiles, "gram_row_cosines")](
        partials, exponents, top, parts, factors, splits, tiles,
        MATS=mats, FORWARD=forward, DOT_DTYPE=dot_dtype, SPLIT=split, BLOCK_N=block,
    )  # fmt: skip
    return parts, factors


class GramRowCosines(torch.autograd.Function):
    """`(B·C,)` row cosines of the Gram matrices; saves its inputs, three scalars per row, and (identity
    kernel) the `N×N` matrices `P`, `A`, `Bᵣ` of each group as dot operands."""

    @staticmethod
    def forward(ctx: Any, student: Tensor, reference: Tensor, scope: str, eps: float) -> Tensor:
        w, u = _grouped(student, scope), _grouped(reference.detach(), scope)
        groups, rows, dim = w.shape
        ctx.meta = (student.shape, eps)
        ctx.identity = dim < rows
        if groups * rows == 0 or dim == 0:
            cosines = torch.zeros(groups * rows, device=w.device, dtype=torch.float32)
            ctx.save_for_backward(w, u, cosines, cosines, cosines)
            return cosines
        cosines = torch.empty(groups * rows, device=w.device, dtype=torch.float32)  # every row is written
        norms_s, norms_t = torch.empty_like(cosines), torch.empty_like(cosines)
        dot_dtype, precision = _dot_dtype(w.dtype), dot_precision(w.dtype)
        if ctx.identity:
            splits, rows_per_split, tiles, block, top, partials, exponents = _identity_buffers(w, 3)
            split = dot_dtype != tl.float32
            _identity_reduce_kernel[check_grid(groups * splits * tiles * tiles, "gram_row_cosines")](
                w, u, partials, exponents, top, rows, dim, rows_per_split, splits, tiles,
                DOT_DTYPE=dot_dtype, PRECISION=precision, ONE_TILE=tiles == 1, BLOCK_R=BLOCK_ROWS, BLOCK_N=block,
            )  # fmt: skip
            parts, factors = _finalize(partials, exponents, top, w.dtype, dot_dtype, block, forward=True)
            blocks = triton.cdiv(rows, BLOCK_ROWS)
            _identity_rows_kernel[check_grid(groups * blocks, "gram_row_cosines")](
                w, u, parts, factors, top, cosines, norms_s, norms_t, rows, dim, blocks, tiles, eps,
                DOT_DTYPE=dot_dtype, SPLIT=split, PRECISION=precision, ONE_TILE=tiles == 1,
                BLOCK_R=BLOCK_ROWS, BLOCK_N=block,
            )  # fmt: skip
            ctx.save_for_backward(w, u, cosines, norms_s, norms_t, top, parts, factors)
        else:
            scale = torch.stack([unit_scale(w), unit_scale(u)])
            blocks = triton.cdiv(rows, TILE_ROWS)
            _tile_forward_kernel[check_grid(groups * blocks, "gram_row_cosines")](
                w, u, scale, cosines, norms_s, norms_t, rows, dim, blocks, eps, DOT_DTYPE=dot_dtype,
                PRECISION=precision, BLOCK_I=TILE_ROWS, BLOCK_J=_tile_columns(rows), BLOCK_N=TILE_POSITIONS,
            )  # fmt: skip
            ctx.save_for_backward(w, u, cosines, norms_s, norms_t, scale)
        return cosines

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        w, u, cosines, norms_s, norms_t, *extra = ctx.saved_tensors
        shape, eps = ctx.meta
        groups, rows, dim = w.shape
        if cosines.numel() == 0 or dim == 0:
            return torch.zeros(shape, device=w.device, dtype=w.dtype), None, None, None
        grad_w = torch.empty_like(w)
        dot_dtype, precision = _dot_dtype(w.dtype), dot_precision(w.dtype)
        if ctx.identity:
            top, fwd_parts, fwd_factors = extra
            splits, rows_per_split, tiles, block, coef_top, partials, exponents = _identity_buffers(w, 2)
            split = dot_dtype != tl.float32
            _identity_grad_reduce_kernel[check_grid(groups * splits * tiles * tiles, "gram_row_cosines")](
                w, u, grad, grad.stride(0), cosines, norms_s, norms_t, top, partials, exponents, coef_top,
                rows, dim, rows_per_split, splits, tiles, eps,
                DOT_DTYPE=dot_dtype, PRECISION=precision, ONE_TILE=tiles == 1, BLOCK_R=BLOCK_ROWS, BLOCK_N=block,
            )  # fmt: skip
            parts, factors = _finalize(partials, exponents, coef_top, w.dtype, dot_dtype, block, forward=False)
            blocks = triton.cdiv(rows, BLOCK_ROWS)
            _identity_grad_rows_kernel[check_grid(groups * blocks, "gram_row_cosines")](
                w, u, fwd_parts, fwd_factors, parts, factors, top, coef_top, grad, grad.stride(0), cosines, norms_s,
                norms_t, grad_w, rows, dim, blocks, tiles, eps,
                DOT_DTYPE=dot_dtype, SPLIT=split, PRECISION=precision, BLOCK_R=BLOCK_ROWS, BLOCK_N=block,
            )  # fmt: skip
        else:
            (scale,) = extra
            floor_s, floor_t = _scaled_floor(eps, scale[0], degree=2), _scaled_floor(eps, scale[1], degree=2)
            clamped_s, clamped_t = norms_s.clamp_min(floor_s), norms_t.clamp_min(floor_t)
            g = grad.to(torch.float32)
            alpha = g / (clamped_s * clamped_t)
            beta = torch.where(norms_s > floor_s, -g * cosines / (clamped_s * clamped_s), 0.0)
            coef = torch.stack([alpha, beta], dim=1).contiguous()
            columns = _tile_columns(rows)
            one_chunk = rows <= columns
            acc = grad_w if one_chunk else torch.zeros(w.shape, device=w.device, dtype=torch.float32)
            blocks = triton.cdiv(rows, TILE_ROWS)
            _tile_backward_kernel[check_grid(groups * blocks, "gram_row_cosines")](
                w, u, scale, coef, grad_w, acc, rows, dim, blocks, DOT_DTYPE=dot_dtype,
                SPLIT=dot_dtype != tl.float32, PRECISION=precision,
                ONE_CHUNK=one_chunk, BLOCK_I=TILE_ROWS, BLOCK_J=columns, BLOCK_N=TILE_POSITIONS,
            )  # fmt: skip
        return grad_w.reshape(shape), None, None, None
