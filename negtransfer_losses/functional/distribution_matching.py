"""Distribution matching for multi-task learning with non-overlapping labels (docs: Methods §3).

Kollias, Sharmanska, Zafeiriou (AAAI 2024, arXiv 2401.01219; FaceBehaviorNet). Task A is single-label
(K classes, `p_A = softmax(z_A)`); task B is multilabel (M attributes, `p_B = σ(z_B)`) or multiclass
(M classes, `p_B = softmax(z_B)`). They are coupled through a task-relatedness matrix `R` (K×M):
`R[k, m] = P(b_m = 1 | a = k)` (multilabel) or `P(b = m | a = k)` (multiclass), and a class prior `π`.

Shapes: `logits_a (N, K)`, `logits_b (N, M)`, `labels_a (N,)` integers with `ignore_index` for unknown,
`labels_b` `(N, M)` floats with NaN or -1 for unknown entries (multilabel) or `(N,)` integers
(multiclass). Everything is computed in float32 (float64 for float64 input) from logits.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch
import torch.nn.functional as F
from torch import Tensor

from .._labels import IGNORE_INDEX, check_labels, multilabel_targets
from .._validation import check_choice, check_tensor, compute_dtype, full_precision

TaskKind: TypeAlias = Literal["multilabel", "multiclass"]
Inversion: TypeAlias = Literal["bayes", "product"]
Divergence: TypeAlias = Literal["kl", "ce"]
Direction: TypeAlias = Literal["a_to_b", "b_to_a"]

TASK_KINDS: tuple[TaskKind, ...] = ("multilabel", "multiclass")
INVERSIONS: tuple[Inversion, ...] = ("bayes", "product")
DIVERGENCES: tuple[Divergence, ...] = ("kl", "ce")
DIRECTIONS: tuple[Direction, ...] = ("a_to_b", "b_to_a")

EPS = 1e-6


# --- supervised losses with missing labels ---------------------------------------------------------------


def masked_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy averaged over the samples whose label is known; none known gives 0 with zero gradient.

    Args:
        logits: `(N, K)`.
        labels: `(N,)` integers in `[0, K)` or `ignore_index`.
        ignore_index: the label of samples whose class is unknown.
    """
    check_tensor(logits, "logits", min_dim=2)
    check_labels(
        labels, logits.shape[1], logits.shape[0], name="labels", ignore_index=ignore_index, device=logits.device
    )
    with full_precision(logits):
        log_p = F.log_softmax(logits.to(compute_dtype(logits)), dim=1)
        known = labels != ignore_index
        picked = log_p.gather(1, torch.where(known, labels, 0)[:, None])[:, 0]
        return _mean_over(-picked, known)


def masked_binary_cross_entropy(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """BCE over the annotated entries only, with FaceBehaviorNet's normalization.

    Each sample's BCE is summed over its annotated entries and divided by their number, then averaged
    over the samples with at least one annotated entry. No entry annotated gives 0 with zero gradient.

    Args:
        logits: `(N, M)`.
        targets: `(N, M)`: floats in [0, 1] with NaN or -1 for missing entries, integers with -1 for
            missing entries, or booleans (all annotated); `mask` overrides what the values say.
        mask: optional `(N, M)` booleans, True where annotated.
    """
    check_tensor(logits, "logits", min_dim=2)
    dtype = compute_dtype(logits)
    t, annotated = multilabel_targets(targets, (logits.shape[0], logits.shape[1]), dtype, name="targets", mask=mask)
    with full_precision(logits):
        z = logits.to(dtype)
        per_entry = F.binary_cross_entropy_with_logits(z, t, reduction="none")
        counts = annotated.sum(dim=1)
        per_sample = torch.where(annotated, per_entry, 0.0).sum(dim=1) / counts.clamp_min(1)
        return _mean_over(per_sample, counts > 0)


def _mean_over(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of `values[keep]`, or a zero connected to `values` (zero gradient) when nothing is kept."""
    kept = torch.where(keep, values, torch.zeros_like(values))
    return kept.sum() / keep.sum().clamp_min(1)


# --- the two inferences ------------------------------------------------------------------------------------


def infer_b_from_a(probs_a: Tensor, matrix: Tensor) -> Tensor:
    """`q_B = p_A R`: `(N, K) @ (K, M)`, the distribution of task B implied by task A's prediction."""
    return probs_a @ matrix.to(probs_a.dtype)


def infer_a_from_b(
    probs_b: Tensor,
    matrix: Tensor,
    prior: Tensor,
    kind: TaskKind,
    inversion: Inversion = "bayes",
    mask: Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """`q_A (N, K)`: the distribution of task A implied by task B's prediction (or labels).

    - `"bayes"` (the library's own, naive Bayes), multilabel B:
      `log q_A(k) = log π_k + Σ_m [p_m log R[k,m] + (1 - p_m) log(1 - R[k,m])]`, softmax over k,
      `R` clamped to `[eps, 1 - eps]`; multiclass B: `q_A(k) = Σ_m p_B(m) π_k R[k,m] / Σ_j π_j R[j,m]`.
    - `"product"` (the papers' form as far as it could be confirmed): `log q̃_k = Σ_m R[k,m] log p_m` over
      the entries with `R[k,m] > 0`, softmax over the classes whose row is not all zero (others get 0).

    `mask (N, M)`, for multilabel B given as labels, restricts the sums to the annotated attributes.
    """
    dtype = probs_b.dtype
    r = matrix.to(dtype)
    if mask is None:
        mask = torch.ones_like(probs_b, dtype=torch.bool)
    weights = mask.to(dtype)
    if inversion == "bayes" and kind == "multiclass":
        joint = prior.to(dtype)[:, None] * r  # (K, M): π_k R[k, m]
        tiny = torch.finfo(dtype).tiny
        posterior = joint / joint.sum(dim=0, keepdim=True).clamp_min(tiny)
        mixed = (probs_b * weights) @ posterior.T
        return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(tiny)  # B classes no A class produces lose mass
    if inversion == "bayes":
        log_r = torch.log(r.clamp(eps, 1 - eps))
        log_not_r = torch.log((1 - r).clamp(eps, 1 - eps))  # = log(1 - clamp(r)), without 1 - (1 - eps) cancelling
        p = probs_b * weights
        log_q = torch.log(prior.to(dtype)).clamp_min(-1e4) + p @ log_r.T + (weights - p) @ log_not_r.T
        return torch.softmax(log_q, dim=1)
    log_p = torch.log(probs_b.clamp(eps, 1.0)) * weights
    logits = log_p @ r.T  # terms with R = 0 vanish; R > 0 terms are the product form's
    active = (r > 0).any(dim=1)
    logits = torch.where(active, logits, torch.finfo(dtype).min)
    return torch.softmax(logits, dim=1)


# --- divergences ---------------------------------------------------------------------------------------


def _xlogx(q: Tensor, eps: float) -> Tensor:
    """`q log q` with `0 log 0 = 0`; the log's argument clamped to `[eps, 1]`."""
    return q * torch.log(q.clamp(eps, 1.0))


def soft_binary_divergence(logits: Tensor, target: Tensor, divergence: Divergence, eps: float = EPS) -> Tensor:
    """Per-entry `BCE(σ(z); q)` (`"ce"`) or `KL(q ‖ σ(z))` (`"kl"`), `(N, M)`, from logits."""
    ce = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits))
    if divergence == "ce":
        return ce
    return ce + _xlogx(target, eps) + _xlogx(1 - target, eps)


def soft_categorical_divergence(logits: Tensor, target: Tensor, divergence: Divergence, eps: float = EPS) -> Tensor:
    """Per-sample `-Σ q log softmax(z)` (`"ce"`) or `KL(q ‖ softmax(z))` (`"kl"`), `(N,)`, from logits."""
    ce = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    if divergence == "ce":
        return ce
    return ce + _xlogx(target, eps).sum(dim=1)


def task_b_divergence(
    logits_b: Tensor, target: Tensor, kind: TaskKind, divergence: Divergence, eps: float = EPS
) -> Tensor:
    """Per-sample divergence of task B's prediction from `target`, `(N,)`: mean over attributes if multilabel."""
    if kind == "multilabel":
        return soft_binary_divergence(logits_b, target, divergence, eps).mean(dim=1)
    return soft_categorical_divergence(logits_b, target, divergence, eps)


def task_b_probs(logits_b: Tensor, kind: TaskKind) -> Tensor:
    return torch.sigmoid(logits_b) if kind == "multilabel" else torch.softmax(logits_b, dim=1)


# --- the losses --------------------------------------------------------------------------------------------


def distribution_matching(
    logits_a: Tensor,
    logits_b: Tensor,
    matrix: Tensor,
    prior: Tensor | None = None,
    kind: TaskKind = "multilabel",
    directions: tuple[Direction, ...] = DIRECTIONS,
    inversion: Inversion = "bayes",
    divergence: Divergence = "kl",
    detach_target: bool = False,
    eps: float = EPS,
) -> dict[Direction, Tensor]:
    """`{"a_to_b": L_AB, "b_to_a": L_BA}` on every sample, labelled or not (docs: Methods §3).

    - A→B: `q_B = p_A R`; `L_AB` = mean over samples (and attributes, multilabel) of the divergence of
      `p_B` from `q_B`.
    - B→A: `q_A = infer_a_from_b(p_B)`; `L_BA` = mean over samples of the divergence of `p_A` from `q_A`.

    `divergence="kl"` is zero when the two tasks agree; `"ce"` is the papers' cross-entropy form (KL plus
    the target's entropy). Gradients flow into both heads unless `detach_target=True`.
    """
    prior = check_matching_inputs(logits_a, logits_b, matrix, prior, kind, directions, inversion, divergence)
    return distribution_matching_unchecked(
        logits_a, logits_b, matrix, prior, kind, directions, inversion, divergence, detach_target, eps
    )


def distribution_matching_unchecked(
    logits_a: Tensor,
    logits_b: Tensor,
    matrix: Tensor,
    prior: Tensor,
    kind: TaskKind,
    directions: tuple[Direction, ...],
    inversion: Inversion,
    divergence: Divergence,
    detach_target: bool,
    eps: float,
) -> dict[Direction, Tensor]:
    """`distribution_matching` for inputs already checked by `check_matching_inputs` (the one check of a call)."""
    with full_precision(logits_a, logits_b):
        dtype = compute_dtype(logits_a, logits_b)
        z_a, z_b = logits_a.to(dtype), logits_b.to(dtype)
        r, pi = matrix.to(device=z_a.device, dtype=dtype), prior.to(device=z_a.device, dtype=dtype)
        terms: dict[Direction, Tensor] = {}
        ones = torch.ones(z_a.shape[0], dtype=torch.bool, device=z_a.device)  # an empty batch gives 0, not NaN
        if "a_to_b" in directions:
            p_a = torch.softmax(z_a, dim=1)
            q_b = infer_b_from_a(p_a.detach() if detach_target else p_a, r)
            terms["a_to_b"] = _mean_over(task_b_divergence(z_b, q_b, kind, divergence, eps), ones)
        if "b_to_a" in directions:
            p_b = task_b_probs(z_b, kind)
            q_a = infer_a_from_b(p_b.detach() if detach_target else p_b, r, pi, kind, inversion, eps=eps)
            terms["b_to_a"] = _mean_over(soft_categorical_divergence(z_a, q_a, divergence, eps), ones)
        return terms


def check_matching_inputs(
    logits_a: Tensor,
    logits_b: Tensor,
    matrix: Tensor,
    prior: Tensor | None,
    kind: str,
    directions: tuple[str, ...],
    inversion: str,
    divergence: str,
) -> Tensor:
    """The checks of `distribution_matching`, shared with its fused twin; returns the prior (uniform if None)."""
    check_matching_options(kind, directions, inversion, divergence)
    return check_matching_tensors(logits_a, logits_b, matrix, prior)


def check_matching_options(kind: str, directions: tuple[str, ...], inversion: str, divergence: str) -> None:
    """Raise `ValueError` naming the option unless each is valid (what a module checks once, when built)."""
    check_choice(kind, "kind", TASK_KINDS)
    check_choice(inversion, "inversion", INVERSIONS)
    check_choice(divergence, "divergence", DIVERGENCES)
    for direction in directions:
        check_choice(direction, "directions", DIRECTIONS)


def check_matching_tensors(logits_a: Tensor, logits_b: Tensor, matrix: Tensor, prior: Tensor | None) -> Tensor:
    """The per-call checks of the two heads against `R`; returns the prior (uniform if None)."""
    check_tensor(logits_a, "logits_a", min_dim=2)
    check_tensor(logits_b, "logits_b", min_dim=2)
    check_heads(logits_a, logits_b, matrix)
    return torch.full((matrix.shape[0],), 1.0 / matrix.shape[0]) if prior is None else prior


def soft_co_annotation(
    logits_a: Tensor,
    logits_b: Tensor,
    labels_a: Tensor,
    labels_b: Tensor,
    matrix: Tensor,
    prior: Tensor | None = None,
    kind: TaskKind = "multilabel",
    inversion: Inversion = "bayes",
    ignore_index: int = IGNORE_INDEX,
    eps: float = EPS,
) -> dict[str, Tensor]:
    """Soft labels for the task a sample lacks: `{"a": L_CA_A, "b": L_CA_B}`.

    - A-only sample (A known, no B entry known) with `a = k`: task B's target is `R[k, :]` (soft BCE
      averaged over attributes, or soft CE); `L_CA_B` averages over those samples.
    - B-only sample (some B known, A unknown): task A's target is `q_A(· | b)`, the inversion evaluated on
      the true `b` (restricted to its annotated attributes); `L_CA_A = -Σ_k q_A log p_A`, averaged.

    Targets are constants. No such sample gives 0 with zero gradient.
    """
    check_tensor(logits_a, "logits_a", min_dim=2)
    check_tensor(logits_b, "logits_b", min_dim=2)
    check_choice(kind, "kind", TASK_KINDS)
    check_choice(inversion, "inversion", INVERSIONS)
    check_heads(logits_a, logits_b, matrix)
    n, num_a, num_b = logits_a.shape[0], matrix.shape[0], matrix.shape[1]
    check_labels(labels_a, num_a, n, name="labels_a", what="classes of task A", ignore_index=ignore_index)
    if prior is None:
        prior = torch.full((num_a,), 1.0 / num_a)
    with full_precision(logits_a, logits_b):
        dtype = compute_dtype(logits_a, logits_b)
        z_a, z_b = logits_a.to(dtype), logits_b.to(dtype)
        r, pi = matrix.to(device=z_a.device, dtype=dtype), prior.to(device=z_a.device, dtype=dtype)
        known_a = labels_a != ignore_index
        b_values, b_mask = _task_b_labels(labels_b, kind, n, num_b, ignore_index, dtype)
        known_b = b_mask.any(dim=1)
        target_b = r[torch.where(known_a, labels_a, 0)]
        loss_b = _mean_over(task_b_divergence(z_b, target_b, kind, "ce", eps), known_a & ~known_b)
        target_a = infer_a_from_b(b_values, r, pi, kind, inversion, mask=b_mask, eps=eps)
        loss_a = _mean_over(soft_categorical_divergence(z_a, target_a, "ce", eps), known_b & ~known_a)
        return {"a": loss_a, "b": loss_b}


def _task_b_labels(
    labels_b: Tensor, kind: TaskKind, n: int, num_b: int, ignore_index: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """`(values (N, M), annotated (N, M))`: multilabel entries, or one-hot multiclass labels."""
    if kind == "multiclass":
        check_labels(labels_b, num_b, n, name="labels_b", what="classes of task B", ignore_index=ignore_index)
        known = labels_b != ignore_index
        onehot = F.one_hot(torch.where(known, labels_b, 0), num_b).to(dtype)
        return onehot, known[:, None].expand(n, num_b)
    return multilabel_targets(labels_b, (n, num_b), dtype, name="labels_b")


def check_heads(logits_a: Tensor, logits_b: Tensor, matrix: Tensor) -> None:
    """Raise `ValueError` unless the logits are `(N, K)` and `(N, M)` for a `(K, M)` relatedness matrix."""
    if matrix.dim() != 2:
        raise ValueError(f"the relatedness matrix must be (K, M), got shape {tuple(matrix.shape)}")
    if logits_a.shape[0] != logits_b.shape[0]:
        raise ValueError(
            f"'logits_a' and 'logits_b' must have the same batch size: got {tuple(logits_a.shape)} "
            f"and {tuple(logits_b.shape)}"
        )
    if logits_a.dim() != 2 or logits_a.shape[1] != matrix.shape[0]:
        raise ValueError(
            f"'logits_a' must be (N, {matrix.shape[0]}) for a relatedness matrix of shape {tuple(matrix.shape)}, "
            f"got {tuple(logits_a.shape)}"
        )
    if logits_b.dim() != 2 or logits_b.shape[1] != matrix.shape[1]:
        raise ValueError(
            f"'logits_b' must be (N, {matrix.shape[1]}) for a relatedness matrix of shape {tuple(matrix.shape)}, "
            f"got {tuple(logits_b.shape)}"
        )
