"""Fused distribution matching (multilabel task B, Bayes inversion): the Triton twin of
`functional.distribution_matching` for that configuration.

One program per sample, task A with `K` classes and task B with `M` attributes held in registers:

- A→B: `p_A = softmax(z_A)`, `q_B = p_A R`, per-attribute BCE (or KL) of `σ(z_B)` from `q_B`, mean over `M`;
- B→A: `log q̃_k = log π_k + Σ_m [p_m log R̂_km + (1 − p_m) log(1 − R̂_km)]`, `R̂ = clamp(R, eps, 1 − eps)`,
  `q_A = softmax(log q̃)`, cross-entropy (or KL) of `p_A` from `q_A`.

The forward launch writes both per-sample terms; the backward launch recomputes them and writes `∂L/∂z_A`
and `∂L/∂z_B` analytically, through the targets too unless `detach_target`. `q log q` terms use
`q · log(clamp(q, eps, 1))`, whose derivative passes through the clamp only where `eps ≤ q ≤ 1`, as
torch's does. Imported only when the Triton backend is used.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor


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
def _row_state(za_ptr, zb_ptr, r_ptr, prior_ptr, row, K, M, stride_a, stride_b, eps,
               BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """Everything both passes need for one sample."""
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    mask_k = offs_k < K
    mask_m = offs_m < M
    mask_km = mask_k[:, None] & mask_m[None, :]
    za = tl.load(za_ptr + row * stride_a + offs_k, mask=mask_k, other=float("-inf")).to(tl.float32)
    zb = tl.load(zb_ptr + row * stride_b + offs_m, mask=mask_m, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs_k[:, None] * M + offs_m[None, :], mask=mask_km, other=0.0).to(tl.float32)
    prior = tl.load(prior_ptr + offs_k, mask=mask_k, other=1.0).to(tl.float32)
    # task A
    shifted = za - tl.max(za, axis=0)
    exp_a = tl.where(mask_k, tl.exp(shifted), 0.0)
    sum_a = tl.sum(exp_a, axis=0)
    p_a = exp_a / sum_a
    log_p_a = tl.where(mask_k, shifted - tl.log(sum_a), 0.0)
    # task B
    log_sig = -_softplus(-zb)
    log_sig_neg = -_softplus(zb)
    p_b = tl.where(mask_m, tl.exp(log_sig), 0.0)
    # A→B target
    q_b = tl.sum(p_a[:, None] * r, axis=0)
    # B→A target
    log_r = tl.log(tl.minimum(tl.maximum(r, eps), 1.0 - eps))
    # log(1 − clamp(r)) as log(clamp(1 − r)): equal, without 1 − (1 − eps) cancelling in float32
    log_not_r = tl.log(tl.minimum(tl.maximum(1.0 - r, eps), 1.0 - eps))
    terms = tl.where(mask_km, p_b[None, :] * log_r + (1.0 - p_b)[None, :] * log_not_r, 0.0)
    log_q = tl.maximum(tl.log(prior), -1e4) + tl.sum(terms, axis=1)
    log_q = tl.where(mask_k, log_q, float("-inf"))
    exp_q = tl.exp(log_q - tl.max(log_q, axis=0))
    q_a = exp_q / tl.sum(exp_q, axis=0)
    return mask_k, mask_m, mask_km, r, log_r, log_not_r, p_a, log_p_a, log_sig, log_sig_neg, p_b, q_b, q_a


@triton.jit
def _forward_kernel(za_ptr, zb_ptr, r_ptr, prior_ptr, out_ptr, K, M, stride_a, stride_b, eps,
                    KL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    state = _row_state(za_ptr, zb_ptr, r_ptr, prior_ptr, row, K, M, stride_a, stride_b, eps, BLOCK_K, BLOCK_M)
    mask_k, mask_m = state[0], state[1]
    log_p_a, log_sig, log_sig_neg, q_b, q_a = state[7], state[8], state[9], state[11], state[12]
    per_attribute = -(q_b * log_sig + (1.0 - q_b) * log_sig_neg)
    per_class = -q_a * log_p_a
    if KL:
        per_attribute += _xlogx(q_b, eps) + _xlogx(1.0 - q_b, eps)
        per_class += _xlogx(q_a, eps)
    a_to_b = tl.sum(tl.where(mask_m, per_attribute, 0.0), axis=0) / M
    b_to_a = tl.sum(tl.where(mask_k, per_class, 0.0), axis=0)
    tl.store(out_ptr + row * 2, a_to_b)
    tl.store(out_ptr + row * 2 + 1, b_to_a)


@triton.jit
def _backward_kernel(za_ptr, zb_ptr, r_ptr, prior_ptr, grad_ptr, dza_ptr, dzb_ptr, K, M, stride_a, stride_b,
                     stride_da, stride_db, eps, KL: tl.constexpr, DETACH: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    state = _row_state(za_ptr, zb_ptr, r_ptr, prior_ptr, row, K, M, stride_a, stride_b, eps, BLOCK_K, BLOCK_M)
    mask_k, mask_m, mask_km, r, log_r, log_not_r = state[0], state[1], state[2], state[3], state[4], state[5]
    p_a, log_p_a, log_sig, log_sig_neg, p_b, q_b, q_a = (
        state[6], state[7], state[8], state[9], state[10], state[11], state[12]
    )  # fmt: skip
    g_ab = tl.load(grad_ptr + row * 2).to(tl.float32)
    g_ba = tl.load(grad_ptr + row * 2 + 1).to(tl.float32)
    # each direction's prediction, against its target
    d_zb = g_ab * (p_b - q_b) / M
    d_za = g_ba * (p_a - q_a)
    if not DETACH:
        # A→B through q_B = p_A R, then the softmax of task A
        g_qb = -log_sig + log_sig_neg
        if KL:
            g_qb += _dxlogx(q_b, eps) - _dxlogx(1.0 - q_b, eps)
        g_qb = tl.where(mask_m, g_qb * g_ab / M, 0.0)
        g_pa = tl.sum(r * g_qb[None, :], axis=1)
        d_za += p_a * (g_pa - tl.sum(g_pa * p_a, axis=0))
        # B→A through q_A, its softmax, log q̃ = ... + Σ_m p_m (log R̂ − log(1 − R̂)), then σ of task B
        g_qa = -log_p_a
        if KL:
            g_qa += _dxlogx(q_a, eps)
        g_qa = tl.where(mask_k, g_qa * g_ba, 0.0)
        g_logits = q_a * (g_qa - tl.sum(g_qa * q_a, axis=0))
        g_pb = tl.sum(tl.where(mask_km, g_logits[:, None] * (log_r - log_not_r), 0.0), axis=0)
        d_zb += g_pb * p_b * (1.0 - p_b)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    tl.store(dza_ptr + row * stride_da + offs_k, d_za, mask=mask_k)
    tl.store(dzb_ptr + row * stride_db + offs_m, d_zb, mask=mask_m)


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
        out = torch.empty(za.shape[0], 2, device=za.device, dtype=torch.float32)
        blocks = {"BLOCK_K": triton.next_power_of_2(num_a), "BLOCK_M": triton.next_power_of_2(num_b)}
        if za.shape[0]:
            _forward_kernel[(za.shape[0],)](
                za, zb, r, pi, out, num_a, num_b, za.stride(0), zb.stride(0), eps, KL=kl, **blocks
            )
        ctx.save_for_backward(za, zb, r, pi)
        ctx.meta = (kl, detach, eps, blocks)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None, None]:
        za, zb, r, pi = ctx.saved_tensors
        kl, detach, eps, blocks = ctx.meta
        grad_a, grad_b = torch.empty_like(za), torch.empty_like(zb)
        if za.shape[0]:
            _backward_kernel[(za.shape[0],)](
                za, zb, r, pi, grad.contiguous(), grad_a, grad_b, r.shape[0], r.shape[1], za.stride(0), zb.stride(0),
                grad_a.stride(0), grad_b.stride(0), eps, KL=kl, DETACH=detach, **blocks,
            )  # fmt: skip
        return grad_a, grad_b, None, None, None, None, None
