"""The generalized cross-entropy (Zhang & Sabuncu, NeurIPS 2018): the loss a bias-capturing twin learns with.

For logits `z` of one sample, `p = softmax(z)` and its label `y`:

    GCE(p, y) = (1 − p_y^q) / q,        0 < q ≤ 1,

computed as `−expm1(q · log_softmax(z)_y) / q` (stable for any logits). `q → 0` gives the cross-entropy,
`q = 1` the mean absolute error `1 − p_y`. Its gradient is `p_y^q` times the cross-entropy's: samples the model
already finds easy (large `p_y`) weigh more, so a network trained with it learns the easy cue of a biased
data set first (Nam et al., "Learning from Failure", NeurIPS 2020, train their biased network with q = 0.7).

LfF's released code (alinlab/LfF, `module/loss.py`) returns `CE · q · p_y^q` with `p_y^q` detached: a
different value (not the GCE), and a gradient `q` times the GCE's (0.7 times at q = 0.7; the same direction,
and the same Adam steps but for Adam's `eps`). This function returns the formula above and its exact gradient.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from .._labels import IGNORE_INDEX, check_labels
from .._validation import (
    NAN_POLICIES,
    NanPolicy,
    check_choice,
    check_tensor,
    compute_dtype,
    full_precision,
    guard_finite,
    zero_unless,
)

__all__ = ["REDUCTIONS", "Reduction", "generalized_cross_entropy"]

Reduction: TypeAlias = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum", "none")
DEFAULT_Q = 0.7


def generalized_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    *,
    q: float = DEFAULT_Q,
    reduction: Reduction = "mean",
    ignore_index: int = IGNORE_INDEX,
    nan_policy: NanPolicy = "raise",
) -> Tensor:
    """`GCE(p, y) = (1 − p_y^q) / q` with `p = softmax(logits)`, per sample or reduced over the known samples.

    Args:
        logits: `(N, K)`, `K ≥ 1` classes.
        labels: `(N,)` integers in `[0, K)`, or `ignore_index` where the class is unknown.
        q: the exponent, `0 < q ≤ 1` (0.7, LfF's value, by default).
        reduction: `"none"`: `(N,)`, 0 where the label is unknown; `"mean"`: the mean over the samples whose label
            is known (0 with a zero gradient when none is); `"sum"`: their sum.
        ignore_index: the label of samples whose class is unknown.
        nan_policy: non-finite logits `"raise"` a `ValueError` (at once on the CPU, from a later check on other
            devices), give zeros with a zero gradient (`"skip"`), or pass through (`"propagate"`).

    Returns:
        float32 (float64 for float64 logits): a scalar, or `(N,)` with `reduction="none"`.

    Raises:
        TypeError: `logits` is not a floating-point tensor, or `labels` not an integer tensor.
        ValueError: `logits` is not 2-D, `labels` is not `(N,)`, a label lies outside `[0, K)` and is not
            `ignore_index`, `q` is outside `(0, 1]`, an unknown `reduction` or `nan_policy`, or non-finite logits
            with `nan_policy="raise"`.
    """
    check_generalized_cross_entropy(logits, labels, q=q, reduction=reduction, ignore_index=ignore_index)
    check_choice(nan_policy, "nan_policy", NAN_POLICIES)
    with full_precision(logits):
        guarded, finite = guard_finite({"logits": logits}, nan_policy)
        z = guarded["logits"].to(compute_dtype(logits))
        known = labels != ignore_index
        per_sample = generalized_cross_entropy_unchecked(z, labels, known, q=float(q))
        if reduction == "none":
            return zero_unless(finite, per_sample)
        total = per_sample.sum()
        value = total if reduction == "sum" else total / known.sum().clamp_min(1).to(total.dtype)
        return zero_unless(finite, value)


def check_generalized_cross_entropy(
    logits: object, labels: object, *, q: object, reduction: object, ignore_index: int
) -> None:
    """The checks of `generalized_cross_entropy` (shapes and types at once; label values deferred on a GPU)."""
    logits = check_tensor(logits, "logits", min_dim=2)
    if logits.dim() != 2:
        raise ValueError(f"'logits' must have shape (N, K), got {tuple(logits.shape)}")
    check_labels(
        labels, logits.shape[1], logits.shape[0], name="labels", ignore_index=ignore_index, device=logits.device
    )
    check_q(q)
    check_choice(reduction, "reduction", REDUCTIONS)


def check_q(q: object) -> float:
    """`q` as a float if it is a real number in `(0, 1]`; else a `ValueError` naming it."""
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < float(q) <= 1.0:
        raise ValueError(f"'q' must be a number in (0, 1] (the GCE exponent; LfF uses 0.7), got {q!r}")
    return float(q)


def generalized_cross_entropy_unchecked(logits: Tensor, labels: Tensor, known: Tensor, *, q: float) -> Tensor:
    """Per-sample GCE `(N,)` of checked logits in the compute dtype, 0 where `known` is false.

    Unknown (and, on a GPU, not yet reported out-of-range) labels are gathered at a clamped index and masked out:
    no device-side assert, no host read.
    """
    index = torch.where(known, labels, 0).clamp(0, logits.shape[1] - 1)
    picked = F.log_softmax(logits, dim=1).gather(1, index[:, None])[:, 0]
    return torch.where(known, -torch.expm1(q * picked) / q, torch.zeros((), dtype=logits.dtype, device=logits.device))
