"""Fused distribution matching (multilabel task B, Bayes inversion): the Triton twin of
`functional.distribution_matching` for that configuration.

Each program takes a block of `SAMPLES` samples (task A with `K` classes, task B with `M` attributes, held
as `(SAMPLES, K, M)` register tiles):

- A→B: `p_A = softmax(z_A)`, `q_B = p_A R`, per-attribute BCE (or KL) of `σ(z_B)` from `q_B`, mean over `M`;
- B→A: `log q̃_k = log π_k + Σ_m [p_m log R̂_km + (1 − p_m) log(1 − R̂_km)]`, `R̂ = clamp(R, eps, 1 − eps)`,
  rewritten `log q̃_k = b_k + Σ_m p_m D_km` with `D = log R̂ − log(1 − R̂)` and `b_k = log π_k + Σ_m log(1 − R̂_km)`;
  `q_A = softmax(log q̃)`, cross-entropy (or KL) of `p_A` from `q_A`.

`D` and `b` (every logarithm of `R` and `π`) are computed once per program, for its whole block of samples
(not once per sample; `SAMPLES` is 16 at K = 7, M = 17, up to 64 for smaller tasks). The forward launch
writes both per-sample terms; the backward launch recomputes them and writes `∂L/∂z_A` and `∂L/∂z_B`
analytically, through the targets too unless `detach_target`. The gradient of the per-sample terms is read
through its strides (the mean's backward hands a broadcast `(N, 2)` view; no copy).
`q log q` terms use `q · log(clamp(q, eps, 1))`, whose derivative passes through the clamp only where
`eps ≤ q ≤ 1`, as torch's does. Offsets are 64-bit; the grid is one-dimensional. Imported only when the
Triton backend is used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._kernel_common import check_grid

TILE_BUDGET = 4096  # elements of one (SAMPLES, K, M) tile


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _xlogx(q, eps):
    return q * tl.log(tl.minimum(tl.maximum(q, eps), 1.0))


@triton.jit
def _dxlogx(q, eps):
    inside = (q >= eps) & (q <= 1.0)
    return tl.log(tl.minimum(tl.maximum(q, eps), 1.0)) + tl.where(inside, 1.0, 0.0)


@triton.jit
def _block_state(za_ptr, zb_ptr, r_ptr, prior_ptr, rows, mask_s, K, M, stride_a, stride_b, eps,
                 BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Everything both passes need for one block of samples (`rows`), `R` and `π` loaded once."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_m = offs_m < M
    mask_km = mask_k[:, None] & mask_m[None, :]
    r = tl.load(r_ptr + offs_k[:, None] * M + offs_m[None, :], mask=mask_km, other=0.0).to(tl.float32)
    prior = tl.load(prior_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)
    log_r = tl.log(tl.minimum(tl.maximum(r, eps), 1.0 - eps))
    # log(1 − clamp(r)) as log(clamp(1 − r)): equal, without 1 − (1 − eps) cancelling in float32
    log_not_r = tl.log(tl.minimum(tl.maximum(1.0 - r, eps), 1.0 - eps))
    log_ratio = tl.where(mask_km, log_r - log_not_r, 0.0)
    base = tl.maximum(tl.log(prior), -1e4) + tl.sum(tl.where(mask_km, log_not_r, 0.0), axis=1)
    rows64 = rows.to(tl.int64)
    mask_sk = mask_s[:, None] & mask_k[None, :]
    mask_sm = mask_s[:, None] & mask_m[None, :]
    za = tl.load(za_ptr + rows64[:, None] * stride_a + offs_k[None, :], mask=mask_sk, other=float("-inf"))
    za = tl.where(mask_k[None, :], za.to(tl.float32), float("-inf"))
    za = tl.where(mask_s[:, None], za, tl.where(mask_k[None, :], 0.0, float("-inf")))  # idle rows: finite
    zb = tl.load(zb_ptr + rows64[:, None] * stride_b + offs_m[None, :], mask=mask_sm, other=0.0).to(tl.float32)
    # task A
    shifted = za - tl.max(za, axis=1)[:, None]
    exp_a = tl.where(mask_k[None, :], tl.exp(shifted), 0.0)
    sum_a = tl.sum(exp_a, axis=1)[:, None]
    p_a = exp_a / sum_a
    log_p_a = tl.where(mask_k[None, :], shifted - tl.log(sum_a), 0.0)
    # task B
    log_sig = -_softplus(-zb)
    log_sig_neg = -_softplus(zb)
    p_b = tl.where(mask_m[None, :], tl.exp(log_sig), 0.0)
    # A→B target: q_B = p_A R
    q_b = tl.sum(p_a[:, :, None] * r[None, :, :], axis=1)
    # B→A target: log q̃ = b + p_B Dᵀ
    log_q = base[None, :] + tl.sum(p_b[:, None, :] * log_ratio[None, :, :], axis=2)
    log_q = tl.where(mask_k[None, :], log_q, float("-inf"))
    exp_q = tl.exp(log_q - tl.max(log_q, axis=1)[:, None])
    q_a = exp_q / tl.sum(exp_q, axis=1)[:, None]
    return mask_k, mask_m, r, log_ratio, p_a, log_p_a, log_sig, log_sig_neg, p_b, q_b, q_a


@triton.jit
def _forward_kernel(za_ptr, zb_ptr, r_ptr, prior_ptr, out_ptr, N, K, M, stride_a, stride_b, eps,
                    KL: tl.constexpr, SAMPLES: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * SAMPLES + tl.arange(0, SAMPLES)
    mask_s = rows < N
    state = _block_state(za_ptr, zb_ptr, r_ptr, prior_ptr, rows, mask_s, K, M, stride_a, stride_b, eps,
                         BLOCK_K, BLOCK_M)  # fmt: skip
    mask_k, mask_m = state[0], state[1]
    log_p_a, log_sig, log_sig_neg, q_b, q_a = state[5], state[6], state[7], state[9], state[10]
    per_attribute = -(q_b * log_sig + (1.0 - q_b) * log_sig_neg)
    per_class = -q_a * log_p_a
    if KL:
        per_attribute += _xlogx(q_b, eps) + _xlogx(1.0 - q_b, eps)
        per_class += _xlogx(q_a, eps)
    a_to_b = tl.sum(tl.where(mask_m[None, :], per_attribute, 0.0), axis=1) / M
    b_to_a = tl.sum(tl.where(mask_k[None, :], per_class, 0.0), axis=1)
    out = out_ptr + rows.to(tl.int64) * 2
    tl.store(out, a_to_b, mask=mask_s)
    tl.store(out + 1, b_to_a, mask=mask_s)


@triton.jit
def _backward_kernel(za_ptr, zb_ptr, r_ptr, prior_ptr, grad_ptr, dza_ptr, dzb_ptr, N, K, M, stride_a, stride_b,
                     stride_g0, stride_g1, stride_da, stride_db, eps, KL: tl.constexpr, DETACH: tl.constexpr,
                     SAMPLES: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0).to(tl.int64) * SAMPLES + tl.arange(0, SAMPLES)
    mask_s = rows < N
    state = _block_state(za_ptr, zb_ptr, r_ptr, prior_ptr, rows, mask_s, K, M, stride_a, stride_b, eps,
                         BLOCK_K, BLOCK_M)  # fmt: skip
    mask_k, mask_m, r, log_ratio = state[0], state[1], state[2], state[3]
    p_a, log_p_a, log_sig, log_sig_neg, p_b, q_b, q_a = (
        state[4], state[5], state[6], state[7], state[8], state[9], state[10]
    )  # fmt: skip
    rows64 = rows.to(tl.int64)
    g_ab = tl.load(grad_ptr + rows64 * stride_g0, mask=mask_s, other=0.0).to(tl.float32)[:, None]
    g_ba = tl.load(grad_ptr + rows64 * stride_g0 + stride_g1, mask=mask_s, other=0.0).to(tl.float32)[:, None]
    # each direction's prediction, against its target
    d_zb = g_ab * (p_b - q_b) / M
    d_za = g_ba * (p_a - q_a)
    if not DETACH:
        # A→B through q_B = p_A R, then the softmax of task A
        g_qb = -log_sig + log_sig_neg
        if KL:
            g_qb += _dxlogx(q_b, eps) - _dxlogx(1.0 - q_b, eps)
        g_qb = tl.where(mask_m[None, :], g_qb * g_ab / M, 0.0)
        g_pa = tl.sum(r[None, :, :] * g_qb[:, None, :], axis=2)
        d_za += p_a * (g_pa - tl.sum(g_pa * p_a, axis=1)[:, None])
        # B→A through q_A, its softmax, log q̃ = b + p_B Dᵀ, then σ of task B
        g_qa = -log_p_a
        if KL:
            g_qa += _dxlogx(q_a, eps)
        g_qa = tl.where(mask_k[None, :], g_qa * g_ba, 0.0)
        g_logits = q_a * (g_qa - tl.sum(g_qa * q_a, axis=1)[:, None])
        g_pb = tl.sum(g_logits[:, :, None] * log_ratio[None, :, :], axis=1)
        d_zb += g_pb * p_b * (1.0 - p_b)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_sk = mask_s[:, None] & mask_k[None, :]
    mask_sm = mask_s[:, None] & mask_m[None, :]
    tl.store(dza_ptr + rows64[:, None] * stride_da + offs_k[None, :], d_za.to(dza_ptr.dtype.element_ty), mask=mask_sk)
    tl.store(dzb_ptr + rows64[:, None] * stride_db + offs_m[None, :], d_zb.to(dzb_ptr.dtype.element_ty), mask=mask_sm)


def block_sizes(num_a: int, num_b: int) -> dict[str, int]:
    """`BLOCK_K`, `BLOCK_M` (powers of two) and `SAMPLES` per program, so one `(SAMPLES, K, M)` tile holds
    about `TILE_BUDGET` elements (at least one sample)."""
    block_k, block_m = int(triton.next_power_of_2(num_a)), int(triton.next_power_of_2(num_b))
    samples = max(1, min(64, TILE_BUDGET // (block_k * block_m)))
    return {"SAMPLES": int(triton.next_power_of_2(samples + 1)) // 2, "BLOCK_K": block_k, "BLOCK_M": block_m}


class FusedDistributionMatching(torch.autograd.Function):
    """Per-sample `(L_AB, L_BA)`, `(N, 2)` float32; saves only its inputs, recomputes in backward."""

    @staticmethod
    def forward(
        ctx: Any, logits_a: Tensor, logits_b: Tensor, matrix: Tensor, prior: Tensor, kl: bool, detach: bool, eps: float
    ) -> Tensor:
        za, zb = logits_a.contiguous(), logits_b.contiguous()
        r = matrix.to(device=za.device, dtype=torch.float32).contiguous()
        pi = prior.to(device=za.device, dtype=torch.float32).contiguous()
        num_a, num_b = r.shape
        rows = za.shape[0]
        out = torch.empty(rows, 2, device=za.device, dtype=torch.float32)
        blocks = block_sizes(num_a, num_b)
        if rows:
            _forward_kernel[check_grid(triton.cdiv(rows, blocks["SAMPLES"]), "distribution_matching")](
                za, zb, r, pi, out, rows, num_a, num_b, za.stride(0), zb.stride(0), eps, KL=kl, **blocks
            )
        ctx.save_for_backward(za, zb, r, pi)
        ctx.meta = (kl, detach, eps, blocks)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None, None]:
        za, zb, r, pi = ctx.saved_tensors
        kl, detach, eps, blocks = ctx.meta
        grad_a, grad_b = torch.empty_like(za), torch.empty_like(zb)
        rows = za.shape[0]
        if rows:
            _backward_kernel[check_grid(triton.cdiv(rows, blocks["SAMPLES"]), "distribution_matching")](
                za, zb, r, pi, grad, grad_a, grad_b, rows, r.shape[0], r.shape[1], za.stride(0), zb.stride(0),
                grad.stride(0), grad.stride(1), grad_a.stride(0), grad_b.stride(0), eps, KL=kl, DETACH=detach,
                **blocks,
            )  # fmt: skip
        return grad_a, grad_b, None, None, None, None, None


def compile_specializations() -> Iterator[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """What `tests/ops/compile_kernels.py` compiles: both divergences, both target modes, every input dtype,
    at the benchmark's sizes (K = 7, M = 17)."""
    for element in ("fp32", "fp16", "bf16"):
        data = "*" + element
        for kl in (True, False):
            blocks = {"KL": kl, **block_sizes(7, 17)}
            types = {"za_ptr": data, "zb_ptr": data, "r_ptr": "*fp32", "prior_ptr": "*fp32", "eps": "fp32"}
            yield (f"dm_forward[{element},kl={kl}]", _forward_kernel, {**types, "out_ptr": "*fp32"}, blocks)
            for detach in (True, False):
                grads = {**types, "grad_ptr": "*fp32", "dza_ptr": data, "dzb_ptr": data}
                yield (f"dm_backward[{element},kl={kl},detach={detach}]", _backward_kernel, grads,
                       {**blocks, "DETACH": detach})  # fmt: skip
