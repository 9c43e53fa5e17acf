"""Distribution matching for multi-task learning with non-overlapping labels (docs: Methods §3).

Kollias, Sharmanska, Zafeiriou (AAAI 2024, arXiv 2401.01219; FaceBehaviorNet). Task A is single-label
(K classes, `p_A = softmax(z_A)`); task B is multilabel (M attributes, `p_B = σ(z_B)`) or multiclass
(M classes, `p_B = softmax(z_B)`). They are coupled through a task-relatedness matrix `R` (K×M):
`R[k, m] = P(b_m = 1 | a = k)` (multilabel) or `P(b = m | a = k)` (multiclass), and a class prior `π`.

Shapes: `logits_a (N, K)`, `logits_b (N, M)`, `labels_a (N,)` integers with `ignore_index` for unknown,
`labels_b` `(N, M)` floats with NaN or -1 for unknown entries (multilabel) or `(N,)` integers
(multiclass). Everything is computed in float32 (float64 for float64 input) from logits.

Calling convention, the same in every function here and in `negtransfer_losses.ops`: the tensors a call is
about are positional (logits, labels, and `relatedness`, the `(K, M)` matrix `R`); every option is
keyword-only, `prior` (task A's class prior `π`, uniform when None) included. The modules in
`negtransfer_losses.losses` take a `TaskRelatedness` as `relatedness`, which holds `R` (`.matrix`), `π`
(`.prior`) and the task kind (`.kind`) together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .._labels import IGNORE_INDEX, check_labels, multilabel_targets
from .._validation import check_choice, check_tensor, compute_dtype, full_precision

__all__ = [
    "B_TO_A_GATES",
    "DIRECTIONS",
    "DIVERGENCES",
    "EPS",
    "INVERSIONS",
    "MULTI_TASK_PARTS",
    "TASK_KINDS",
    "BToAGate",
    "Direction",
    "Divergence",
    "Inversion",
    "TaskKind",
    "distribution_matching",
    "infer_a_from_b",
    "infer_b_from_a",
    "label_advantage",
    "masked_binary_cross_entropy",
    "masked_cross_entropy",
    "multi_task_terms",
    "soft_co_annotation",
]

TaskKind: TypeAlias = Literal["multilabel", "multiclass"]
Inversion: TypeAlias = Literal["bayes", "product"]
Divergence: TypeAlias = Literal["kl", "ce"]
Direction: TypeAlias = Literal["a_to_b", "b_to_a"]
BToAGate: TypeAlias = Literal["label_advantage"]

TASK_KINDS: tuple[TaskKind, ...] = ("multilabel", "multiclass")
INVERSIONS: tuple[Inversion, ...] = ("bayes", "product")
DIVERGENCES: tuple[Divergence, ...] = ("kl", "ce")
DIRECTIONS: tuple[Direction, ...] = ("a_to_b", "b_to_a")
B_TO_A_GATES: tuple[BToAGate, ...] = ("label_advantage",)

EPS = 1e-6
"""The default `eps`: probabilities are clamped to `[eps, 1 - eps]` inside logarithms (and `R` in the Bayes
inversion)."""


# --- options, resolved once --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MatchingOptions:
    """The validated options of distribution matching: `resolve` checks them once (per functional call, or
    when a module is built); the functional and the fused paths both read this one record."""

    kind: TaskKind
    directions: tuple[Direction, ...]
    inversion: Inversion
    divergence: Divergence
    detach_target: bool
    eps: float

    @classmethod
    def resolve(
        cls,
        *,
        kind: TaskKind = "multilabel",
        directions: Sequence[Direction] = DIRECTIONS,
        inversion: Inversion = "bayes",
        divergence: Divergence = "kl",
        detach_target: bool = False,
        eps: float = EPS,
    ) -> _MatchingOptions:
        """Check every option; raise `ValueError` (or `TypeError`) naming the first that is invalid."""
        check_choice(kind, "kind", TASK_KINDS)
        check_choice(inversion, "inversion", INVERSIONS)
        check_choice(divergence, "divergence", DIVERGENCES)
        if isinstance(directions, str):
            raise TypeError(
                f"'directions' must be a sequence of directions, e.g. ({directions!r},), got the string {directions!r}"
            )
        for direction in directions:
            check_choice(direction, "directions", DIRECTIONS)
        unique = tuple(dict.fromkeys(directions))
        if not unique:
            raise ValueError("'directions' is empty: give 'a_to_b', 'b_to_a' or both")
        if not 0 < eps < 0.5:
            raise ValueError(f"'eps' must lie in (0, 0.5) (probabilities are clamped to [eps, 1 - eps]), got {eps}")
        return cls(kind, unique, inversion, divergence, bool(detach_target), float(eps))


# --- checks of the tensors ---------------------------------------------------------------------------------


def _check_relatedness(relatedness: object) -> Tensor:
    """Raise unless `relatedness` is a floating-point `(K, M)` tensor with K, M ≥ 1."""
    if not isinstance(relatedness, Tensor):
        hint = (
            "; for a TaskRelatedness r pass r.matrix, prior=r.prior, kind=r.kind (or use the loss modules)"
            if hasattr(relatedness, "matrix")
            else ""
        )
        raise TypeError(f"'relatedness' must be a (K, M) tensor, got {type(relatedness).__name__}{hint}")
    if not relatedness.is_floating_point():
        raise TypeError(f"'relatedness' must be a floating-point tensor of probabilities, got {relatedness.dtype}")
    if relatedness.dim() != 2 or 0 in relatedness.shape:
        raise ValueError(f"'relatedness' must be a (K, M) matrix with K, M ≥ 1, got shape {tuple(relatedness.shape)}")
    return relatedness


def _check_heads(logits_a: Tensor, logits_b: Tensor, relatedness: Tensor) -> None:
    """Raise `ValueError` unless the logits are `(N, K)` and `(N, M)` for a `(K, M)` relatedness matrix."""
    check_tensor(logits_a, "logits_a", min_dim=2)
    check_tensor(logits_b, "logits_b", min_dim=2)
    _check_relatedness(relatedness)
    if logits_a.shape[0] != logits_b.shape[0]:
        raise ValueError(
            f"'logits_a' and 'logits_b' must have the same batch size: got {tuple(logits_a.shape)} "
            f"and {tuple(logits_b.shape)}"
        )
    num_a, num_b = relatedness.shape
    if logits_a.dim() != 2 or logits_a.shape[1] != num_a:
        raise ValueError(
            f"'logits_a' must be (N, {num_a}) for a relatedness matrix of shape {tuple(relatedness.shape)}, "
            f"got {tuple(logits_a.shape)}"
        )
    if logits_b.dim() != 2 or logits_b.shape[1] != num_b:
        raise ValueError(
            f"'logits_b' must be (N, {num_b}) for a relatedness matrix of shape {tuple(relatedness.shape)}, "
            f"got {tuple(logits_b.shape)}"
        )


def _prior_or_uniform(prior: Tensor | None, relatedness: Tensor, device: torch.device) -> Tensor:
    """`prior`, checked against `relatedness`'s rows, or the uniform prior on `device` when None."""
    num_a = relatedness.shape[0]
    if prior is None:
        return torch.full((num_a,), 1.0 / num_a, device=device)
    if not isinstance(prior, Tensor):
        raise TypeError(f"'prior' must be a ({num_a},) tensor or None, got {type(prior).__name__}")
    if prior.shape != (num_a,):
        raise ValueError(
            f"'prior' must have shape ({num_a},) to match the rows of 'relatedness' {tuple(relatedness.shape)}, "
            f"got {tuple(prior.shape)}"
        )
    return prior


def _check_matching_tensors(logits_a: Tensor, logits_b: Tensor, relatedness: Tensor, prior: Tensor | None) -> Tensor:
    """The per-call checks of the two heads against `R` (shapes only: no device synchronization); returns the
    prior (uniform if None)."""
    _check_heads(logits_a, logits_b, relatedness)
    return _prior_or_uniform(prior, relatedness, logits_a.device)


# --- supervised losses with missing labels ---------------------------------------------------------------


def masked_cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Cross-entropy averaged over the samples whose label is known (`L_A`; Methods §3).

    No known label gives 0 with a zero gradient, never NaN.

    Args:
        logits: `(N, K)`.
        labels: `(N,)` integers in `[0, K)`, or `ignore_index` where the class is unknown.
        ignore_index: the label of samples whose class is unknown.

    Returns:
        a scalar tensor, float32 (float64 for float64 logits).

    Raises:
        TypeError: `logits` is not a floating-point tensor, or `labels` not an integer tensor.
        ValueError: a shape does not match, or a label lies outside `[0, K)` and is not `ignore_index`.
    """
    check_tensor(logits, "logits", min_dim=2)
    check_labels(
        labels, logits.shape[1], logits.shape[0], name="labels", ignore_index=ignore_index, device=logits.device
    )
    with full_precision(logits):
        known = labels != ignore_index
        index = _safe_index(labels, known, logits.shape[1])
        return _masked_cross_entropy(logits.to(compute_dtype(logits)), index, known)


def masked_binary_cross_entropy(logits: Tensor, targets: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """BCE over the annotated entries only, with FaceBehaviorNet's normalization (`L_B`; Methods §3).

    Each sample's BCE is summed over its annotated entries and divided by their number, then averaged
    over the samples with at least one annotated entry. No entry annotated gives 0 with a zero gradient.

    Args:
        logits: `(N, M)`.
        targets: `(N, M)`: floats in [0, 1] with NaN or -1 for missing entries, integers with -1 for
            missing entries, or booleans (all annotated); `mask` overrides what the values say.
        mask: optional `(N, M)` booleans, True where annotated.

    Returns:
        a scalar tensor, float32 (float64 for float64 logits).

    Raises:
        TypeError: `logits` or `targets` has the wrong type.
        ValueError: a shape does not match, or an annotated target lies outside [0, 1].
    """
    check_tensor(logits, "logits", min_dim=2)
    dtype = compute_dtype(logits)
    values, annotated = multilabel_targets(
        targets, (logits.shape[0], logits.shape[1]), dtype, name="targets", mask=mask
    )
    with full_precision(logits):
        return _masked_binary_cross_entropy(logits.to(dtype), values, annotated)


def _safe_index(labels: Tensor, known: Tensor, num_classes: int) -> Tensor:
    """The known labels as gather indices, 0 elsewhere, clamped into `[0, num_classes)`: a label out of range
    is reported by the deferred check (`check_labels`) instead of tripping a GPU's device-side index assert."""
    return torch.where(known, labels, 0).clamp(0, num_classes - 1)


def _masked_cross_entropy(logits: Tensor, index: Tensor, known: Tensor) -> Tensor:
    """Mean over `known` samples of `-log softmax(logits)[index]` (checked inputs, compute dtype)."""
    picked = F.log_softmax(logits, dim=1).gather(1, index[:, None])[:, 0]
    return _masked_mean(-picked, known)


def _masked_binary_cross_entropy(logits: Tensor, values: Tensor, annotated: Tensor) -> Tensor:
    """`masked_binary_cross_entropy` on decoded targets (checked inputs, compute dtype)."""
    per_entry = F.binary_cross_entropy_with_logits(logits, values, reduction="none")
    counts = annotated.sum(dim=1)
    per_sample = torch.where(annotated, per_entry, 0.0).sum(dim=1) / counts.clamp_min(1)
    return _masked_mean(per_sample, counts > 0)


def _masked_mean(values: Tensor, keep: Tensor) -> Tensor:
    """Mean of the kept `values`, or a zero connected to `values` (zero gradient) when nothing is kept;
    fixed shapes, no device synchronization.

    The values not kept are replaced by zeros with `torch.where` before the sum, so NaN or inf there (a sample
    without a label, whose divergence is undefined) never reaches the mean or its gradient (unlike
    `functional.suppression._member_weighted_mean`, which multiplies by 0/1 weights).
    """
    kept = torch.where(keep, values, torch.zeros_like(values))
    return kept.sum() / keep.sum().clamp_min(1)


# --- the two inferences ------------------------------------------------------------------------------------


def infer_b_from_a(probs_a: Tensor, relatedness: Tensor) -> Tensor:
    """`q_B = p_A R`: the distribution of task B implied by task A's prediction.

    Args:
        probs_a: `(N, K)` probabilities of task A's classes.
        relatedness: `R`, `(K, M)`.

    Returns:
        `(N, M)` in `probs_a`'s dtype: attribute probabilities (multilabel B) or a distribution over B's
        classes (multiclass B, whose rows of `R` sum to 1).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: the shapes do not fit `(N, K) @ (K, M)`.
    """
    check_tensor(probs_a, "probs_a", min_dim=2)
    _check_relatedness(relatedness)
    if probs_a.dim() != 2 or probs_a.shape[1] != relatedness.shape[0]:
        raise ValueError(
            f"'probs_a' must be (N, {relatedness.shape[0]}) for 'relatedness' of shape "
            f"{tuple(relatedness.shape)}, got {tuple(probs_a.shape)}"
        )
    return _infer_b_from_a(probs_a, relatedness)


def _infer_b_from_a(probs_a: Tensor, relatedness: Tensor) -> Tensor:
    return probs_a @ relatedness.to(device=probs_a.device, dtype=probs_a.dtype)


def infer_a_from_b(
    probs_b: Tensor,
    relatedness: Tensor,
    *,
    prior: Tensor | None = None,
    kind: TaskKind = "multilabel",
    inversion: Inversion = "bayes",
    mask: Tensor | None = None,
    eps: float = EPS,
) -> Tensor:
    """`q_A`: the distribution of task A implied by task B's prediction (or labels).

    - `"bayes"` (the library's own, naive Bayes), multilabel B:
      `log q_A(k) = log π_k + Σ_m [p_m log R[k,m] + (1 - p_m) log(1 - R[k,m])]`, softmax over k,
      `R` clamped to `[eps, 1 - eps]`; multiclass B: `q_A(k) = Σ_m p_B(m) π_k R[k,m] / Σ_j π_j R[j,m]`.
    - `"product"` (the papers' form as far as it could be confirmed): `log q̃_k = Σ_m R[k,m] log p_m` over
      the entries with `R[k,m] > 0`, softmax over the classes whose row is not all zero (others get 0).

    Args:
        probs_b: `(N, M)`: attribute probabilities (multilabel B) or a distribution over B's classes.
        relatedness: `R`, `(K, M)`.
        prior: `π`, `(K,)`; uniform when None.
        kind: `"multilabel"` or `"multiclass"` task B.
        inversion: `"bayes"` or `"product"`.
        mask: optional `(N, M)` booleans: for a multilabel B given as labels, the sums run over the
            annotated attributes only.
        eps: the clamp of `R` and of probabilities inside logarithms.

    Returns:
        `(N, K)`, rows summing to 1, in `probs_b`'s dtype.

    Raises:
        TypeError: an input has the wrong type.
        ValueError: an option is not one of its choices, or a shape does not match.
    """
    options = _MatchingOptions.resolve(kind=kind, inversion=inversion, eps=eps)
    check_tensor(probs_b, "probs_b", min_dim=2)
    _check_relatedness(relatedness)
    if probs_b.dim() != 2 or probs_b.shape[1] != relatedness.shape[1]:
        raise ValueError(
            f"'probs_b' must be (N, {relatedness.shape[1]}) for 'relatedness' of shape "
            f"{tuple(relatedness.shape)}, got {tuple(probs_b.shape)}"
        )
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != probs_b.shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"'mask' must be a boolean tensor of the shape of 'probs_b' {tuple(probs_b.shape)}, got {got}")
    pi = _prior_or_uniform(prior, relatedness, probs_b.device)
    return _infer_a_from_b(probs_b, relatedness, pi, options.kind, options.inversion, mask, options.eps)


def _infer_a_from_b(
    probs_b: Tensor,
    relatedness: Tensor,
    prior: Tensor,
    kind: TaskKind,
    inversion: Inversion,
    mask: Tensor | None,
    eps: float,
) -> Tensor:
    """`infer_a_from_b` for checked inputs."""
    dtype = probs_b.dtype
    r = relatedness.to(device=probs_b.device, dtype=dtype)
    pi = prior.to(device=probs_b.device, dtype=dtype)
    weights = torch.ones_like(probs_b) if mask is None else mask.to(dtype)
    if inversion == "bayes" and kind == "multiclass":
        joint = pi[:, None] * r  # (K, M): π_k R[k, m]
        tiny = torch.finfo(dtype).tiny
        posterior = joint / joint.sum(dim=0, keepdim=True).clamp_min(tiny)
        mixed = (probs_b * weights) @ posterior.T
        return mixed / mixed.sum(dim=1, keepdim=True).clamp_min(tiny)  # B classes no A class produces lose mass
    if inversion == "bayes":
        log_r = torch.log(r.clamp(eps, 1 - eps))
        log_not_r = torch.log((1 - r).clamp(eps, 1 - eps))  # = log(1 - clamp(r)), without 1 - (1 - eps) cancelling
        p = probs_b * weights
        log_q = torch.log(pi).clamp_min(-1e4) + p @ log_r.T + (weights - p) @ log_not_r.T
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


def _soft_binary_divergence(logits: Tensor, target: Tensor, divergence: Divergence, eps: float) -> Tensor:
    """Per-entry `BCE(σ(z); q)` (`"ce"`) or `KL(q ‖ σ(z))` (`"kl"`), `(N, M)`, from logits."""
    ce = -(target * F.logsigmoid(logits) + (1 - target) * F.logsigmoid(-logits))
    if divergence == "ce":
        return ce
    return ce + _xlogx(target, eps) + _xlogx(1 - target, eps)


def _soft_categorical_divergence(logits: Tensor, target: Tensor, divergence: Divergence, eps: float) -> Tensor:
    """Per-sample `-Σ q log softmax(z)` (`"ce"`) or `KL(q ‖ softmax(z))` (`"kl"`), `(N,)`, from logits."""
    ce = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
    if divergence == "ce":
        return ce
    return ce + _xlogx(target, eps).sum(dim=1)


def _task_b_divergence(logits_b: Tensor, target: Tensor, kind: TaskKind, divergence: Divergence, eps: float) -> Tensor:
    """Per-sample divergence of task B's prediction from `target`, `(N,)`: mean over attributes if multilabel."""
    if kind == "multilabel":
        return _soft_binary_divergence(logits_b, target, divergence, eps).mean(dim=1)
    return _soft_categorical_divergence(logits_b, target, divergence, eps)


def _task_b_probs(logits_b: Tensor, kind: TaskKind) -> Tensor:
    return torch.sigmoid(logits_b) if kind == "multilabel" else torch.softmax(logits_b, dim=1)


# --- distribution matching ---------------------------------------------------------------------------------


def distribution_matching(
    logits_a: Tensor,
    logits_b: Tensor,
    relatedness: Tensor,
    *,
    prior: Tensor | None = None,
    kind: TaskKind = "multilabel",
    directions: Sequence[Direction] = DIRECTIONS,
    inversion: Inversion = "bayes",
    divergence: Divergence = "kl",
    detach_target: bool = False,
    eps: float = EPS,
) -> dict[Direction, Tensor]:
    """The unweighted matching terms `{"a_to_b": L_AB, "b_to_a": L_BA}`, on every sample, labelled or not.

    - A→B: `q_B = p_A R`; `L_AB` = mean over samples (and attributes, multilabel) of the divergence of
      `p_B` from `q_B`.
    - B→A: `q_A` = `infer_a_from_b(p_B)`; `L_BA` = mean over samples of the divergence of `p_A` from `q_A`.

    `divergence="kl"` is zero when the two tasks agree; `"ce"` is the papers' cross-entropy form (KL plus
    the target's entropy). Gradients flow into both heads unless `detach_target=True`. An empty batch gives
    zeros, never NaN. `negtransfer_losses.ops.distribution_matching` is the same function with a fused kernel.

    Args:
        logits_a: `(N, K)` task A's logits.
        logits_b: `(N, M)` task B's logits.
        relatedness: `R`, `(K, M)`: `P(b_m = 1 | a = k)` (multilabel) or `P(b = m | a = k)` (multiclass).
        prior: `π`, task A's class prior `(K,)`; uniform when None.
        kind: `"multilabel"` (`p_B = σ(z_B)`) or `"multiclass"` (`p_B = softmax(z_B)`) task B.
        directions: which terms to compute: `"a_to_b"`, `"b_to_a"` or both.
        inversion: how B→A inverts `R`: `"bayes"` (the library's own) or `"product"` (the papers').
        divergence: `"kl"` or `"ce"`.
        detach_target: treat the inferred distributions `q_B`, `q_A` as constants.
        eps: probabilities are clamped to `[eps, 1 - eps]` inside logarithms (and `R` in `"bayes"`).

    Returns:
        `{direction: scalar}` for the directions asked for, float32 (float64 for float64 logits).

    Raises:
        TypeError: an input has the wrong type.
        ValueError: an option is not one of its choices, or a shape does not match.
    """
    options = _MatchingOptions.resolve(
        kind=kind,
        directions=directions,
        inversion=inversion,
        divergence=divergence,
        detach_target=detach_target,
        eps=eps,
    )
    prior = _check_matching_tensors(logits_a, logits_b, relatedness, prior)
    with full_precision(logits_a, logits_b):
        return _matching_terms_unchecked(logits_a, logits_b, relatedness, prior, options)


def _matching_terms_unchecked(
    logits_a: Tensor, logits_b: Tensor, relatedness: Tensor, prior: Tensor, options: _MatchingOptions
) -> dict[Direction, Tensor]:
    """`distribution_matching` for inputs already checked by `_check_matching_tensors` (the one check of a call),
    with autocast off (switched by the entry point of the call)."""
    dtype = compute_dtype(logits_a, logits_b)
    z_a, z_b = logits_a.to(dtype), logits_b.to(dtype)
    r, pi = relatedness.to(device=z_a.device, dtype=dtype), prior.to(device=z_a.device, dtype=dtype)
    kind, divergence, eps = options.kind, options.divergence, options.eps
    terms: dict[Direction, Tensor] = {}
    everyone = torch.ones(z_a.shape[0], dtype=torch.bool, device=z_a.device)  # an empty batch gives 0, not NaN
    if "a_to_b" in options.directions:
        p_a = torch.softmax(z_a, dim=1)
        q_b = _infer_b_from_a(p_a.detach() if options.detach_target else p_a, r)
        terms["a_to_b"] = _masked_mean(_task_b_divergence(z_b, q_b, kind, divergence, eps), everyone)
    if "b_to_a" in options.directions:
        p_b = _task_b_probs(z_b, kind)
        p_b = p_b.detach() if options.detach_target else p_b
        q_a = _infer_a_from_b(p_b, r, pi, kind, options.inversion, None, eps)
        terms["b_to_a"] = _masked_mean(_soft_categorical_divergence(z_a, q_a, divergence, eps), everyone)
    return terms


# --- soft co-annotation ------------------------------------------------------------------------------------


class _TaskLabels(NamedTuple):
    """Both tasks' labels, checked once and decoded to fixed shapes (no data-dependent shape)."""

    a: Tensor  # (N,) class indices of task A, 0 where unknown
    known_a: Tensor  # (N,) bool
    b: Tensor  # (N, M) multilabel entries or one-hot classes of task B, 0 where unknown (compute dtype)
    known_b: Tensor  # (N, M) bool: annotated entries (multiclass: the whole row of a known sample)


def _task_labels(
    labels_a: Tensor,
    labels_b: Tensor,
    logits_a: Tensor,
    relatedness: Tensor,
    kind: TaskKind,
    ignore_index: int,
) -> _TaskLabels:
    """Check `labels_a` and `labels_b` against the batch and `R`'s shape (through `_labels`, the package's one
    label check) and decode them, in the logits' compute dtype; messages name `labels_a` and `labels_b`."""
    n, device, dtype = logits_a.shape[0], logits_a.device, compute_dtype(logits_a)
    num_a, num_b = relatedness.shape
    check_labels(
        labels_a, num_a, n, name="labels_a", what="classes of task A", ignore_index=ignore_index, device=device
    )
    known_a = labels_a != ignore_index
    if kind == "multiclass":
        check_labels(
            labels_b, num_b, n, name="labels_b", what="classes of task B", ignore_index=ignore_index, device=device
        )
        known = labels_b != ignore_index
        classes = torch.arange(num_b, device=device)
        onehot = (labels_b[:, None] == classes).to(dtype)  # not F.one_hot, which reads the labels on the host
        return _TaskLabels(_safe_index(labels_a, known_a, num_a), known_a, onehot, known[:, None].expand(n, num_b))
    if isinstance(labels_b, Tensor) and labels_b.device != device:
        raise ValueError(f"'labels_b' must be on the same device as the logits ({device}), got {labels_b.device}")
    values, annotated = multilabel_targets(labels_b, (n, num_b), dtype, name="labels_b")
    return _TaskLabels(_safe_index(labels_a, known_a, num_a), known_a, values, annotated)


def soft_co_annotation(
    logits_a: Tensor,
    logits_b: Tensor,
    labels_a: Tensor,
    labels_b: Tensor,
    relatedness: Tensor,
    *,
    prior: Tensor | None = None,
    kind: TaskKind = "multilabel",
    inversion: Inversion = "bayes",
    ignore_index: int = IGNORE_INDEX,
    eps: float = EPS,
) -> dict[str, Tensor]:
    """The unweighted co-annotation terms `{"a": L_CA_A, "b": L_CA_B}`: soft labels for the task a sample lacks.

    - A-only sample (A known, no B entry known) with `a = k`: task B's target is `R[k, :]` (soft BCE
      averaged over attributes, or soft CE); `L_CA_B` averages over those samples.
    - B-only sample (some B known, A unknown): task A's target is `q_A(· | b)`, the inversion evaluated on
      the true `b` (restricted to its annotated attributes); `L_CA_A = -Σ_k q_A log p_A`, averaged.

    Targets are constants. No such sample gives 0 with a zero gradient.

    Args:
        logits_a: `(N, K)` task A's logits.
        logits_b: `(N, M)` task B's logits.
        labels_a: `(N,)` integers in `[0, K)`, or `ignore_index` where unknown.
        labels_b: multilabel B: `(N, M)` floats in [0, 1] with NaN or -1 for unknown entries, integers with
            -1, or booleans; multiclass B: `(N,)` integers in `[0, M)` or `ignore_index`.
        relatedness: `R`, `(K, M)`.
        prior: `π`, `(K,)`; uniform when None.
        kind: `"multilabel"` or `"multiclass"` task B.
        inversion: `"bayes"` or `"product"`, as in `infer_a_from_b`.
        ignore_index: the label of samples whose class is unknown.
        eps: the clamp of probabilities inside logarithms.

    Returns:
        `{"a": scalar, "b": scalar}`, float32 (float64 for float64 logits).

    Raises:
        TypeError: an input has the wrong type.
        ValueError: an option is not one of its choices, a shape does not match, or a label is out of range.
    """
    options = _MatchingOptions.resolve(kind=kind, inversion=inversion, eps=eps)
    prior = _check_matching_tensors(logits_a, logits_b, relatedness, prior)
    labels = _task_labels(labels_a, labels_b, logits_a, relatedness, options.kind, ignore_index)
    with full_precision(logits_a, logits_b):
        return _co_annotation_unchecked(logits_a, logits_b, labels, relatedness, prior, options)


def _co_annotation_unchecked(
    logits_a: Tensor,
    logits_b: Tensor,
    labels: _TaskLabels,
    relatedness: Tensor,
    prior: Tensor,
    options: _MatchingOptions,
) -> dict[str, Tensor]:
    """`soft_co_annotation` for checked inputs and decoded labels (its options: kind, inversion, eps), with
    autocast off (switched by the entry point of the call)."""
    dtype = compute_dtype(logits_a, logits_b)
    z_a, z_b = logits_a.to(dtype), logits_b.to(dtype)
    r, pi = relatedness.to(device=z_a.device, dtype=dtype), prior.to(device=z_a.device, dtype=dtype)
    kind, eps = options.kind, options.eps
    known_b = labels.known_b.any(dim=1)
    target_b = r.index_select(0, labels.a)
    loss_b = _masked_mean(_task_b_divergence(z_b, target_b, kind, "ce", eps), labels.known_a & ~known_b)
    target_a = _infer_a_from_b(labels.b.to(dtype), r, pi, kind, options.inversion, labels.known_b, eps)
    loss_a = _masked_mean(_soft_categorical_divergence(z_a, target_a, "ce", eps), known_b & ~labels.known_a)
    return {"a": loss_a, "b": loss_b}


# --- the multi-task loss's parts ---------------------------------------------------------------------------

MULTI_TASK_PARTS = ("supervised_a", "supervised_b", "matching", "co_annotation")
"""The parts of the multi-task loss, in the order `multi_task_terms` returns them."""


def multi_task_terms(
    logits_a: Tensor,
    logits_b: Tensor,
    labels_a: Tensor,
    labels_b: Tensor,
    relatedness: Tensor,
    *,
    prior: Tensor | None = None,
    kind: TaskKind = "multilabel",
    parts: Sequence[str] = MULTI_TASK_PARTS,
    directions: Sequence[Direction] = DIRECTIONS,
    inversion: Inversion = "bayes",
    divergence: Divergence = "kl",
    detach_target: bool = False,
    eps: float = EPS,
    ignore_index: int = IGNORE_INDEX,
    b_to_a_gate: BToAGate | None = None,
) -> dict[str, Tensor]:
    """The multi-task loss's unweighted parts, each differentiable, by name (Methods §3).

    - `"supervised_a"`: `L_A`, the cross-entropy over the samples whose A label is known;
    - `"supervised_b"`: `L_B`, BCE over the annotated B entries with FaceBehaviorNet's per-sample normalization
      (multilabel), or the cross-entropy of the known B class (multiclass);
    - `"matching/a_to_b"`, `"matching/b_to_a"`: the terms of `distribution_matching` (the directions asked for);
    - `"co_annotation/a"`, `"co_annotation/b"`: the terms of `soft_co_annotation`.

    `L = λ_A L_A + λ_B L_B + λ_DM (L_AB + L_BA) + λ_CA (L_CA_A + L_CA_B)`; `MultiTaskLoss` adds them so.
    Handed to a multi-objective optimizer as separate losses (e.g. Jacobian descent), they keep their
    gradients. Each tensor is checked once per call. With `b_to_a_gate="label_advantage"` the B→A term is
    `g · L_BA`, `g = label_advantage(...)` of the batch's labels (the library's own; docs: Methods).

    Args:
        logits_a: `(N, K)` task A's logits.
        logits_b: `(N, M)` task B's logits.
        labels_a: `(N,)` integers in `[0, K)`, or `ignore_index` where unknown.
        labels_b: multilabel B: `(N, M)` entries with NaN or -1 where unknown; multiclass B: `(N,)` integers.
        relatedness: `R`, `(K, M)`.
        prior: `π`, `(K,)`; uniform when None.
        kind: `"multilabel"` or `"multiclass"` task B.
        parts: which parts to compute, from `MULTI_TASK_PARTS`.
        directions: the matching terms: `"a_to_b"`, `"b_to_a"` or both.
        inversion: `"bayes"` or `"product"` (matching and co-annotation).
        divergence: `"kl"` or `"ce"` (matching).
        detach_target: treat the matching terms' inferred distributions as constants.
        eps: the clamp of probabilities inside logarithms.
        ignore_index: the label of samples whose class is unknown.
        b_to_a_gate: None (`L_BA` at full weight), or `"label_advantage"`: `L_BA` scaled by how many more
            labelled samples task B has than task A in the batch (`label_advantage`).

    Returns:
        `{name: scalar}` as listed above, for the parts asked for; float32 (float64 for float64 logits).

    Raises:
        TypeError: an input has the wrong type.
        ValueError: an option is not one of its choices, a part is unknown, a shape does not match, a label
            is out of range, or `b_to_a_gate` is set without the B→A matching term.
    """
    options = _MatchingOptions.resolve(
        kind=kind,
        directions=directions,
        inversion=inversion,
        divergence=divergence,
        detach_target=detach_target,
        eps=eps,
    )
    wanted = _check_parts(parts)
    gate = _check_b_to_a_gate(b_to_a_gate, options, wanted)
    checked_prior = _check_matching_tensors(logits_a, logits_b, relatedness, prior)
    labels = _task_labels(labels_a, labels_b, logits_a, relatedness, options.kind, ignore_index)
    with full_precision(logits_a, logits_b):
        matching = (
            _matching_terms_unchecked(logits_a, logits_b, relatedness, checked_prior, options)
            if "matching" in wanted
            else {}
        )
        return _multi_task_unchecked(
            logits_a, logits_b, labels, relatedness, checked_prior, options, wanted, matching, gate
        )


def _check_b_to_a_gate(gate: object, options: _MatchingOptions, parts: Sequence[str]) -> BToAGate | None:
    """`gate` checked: None or one of `B_TO_A_GATES`, and only where the B→A matching term is computed."""
    if gate is None:
        return None
    check_choice(gate, "b_to_a_gate", B_TO_A_GATES)
    if "matching" not in parts or "b_to_a" not in options.directions:
        raise ValueError(
            f"b_to_a_gate={gate!r} scales the B→A matching term, which is not computed here "
            f"(parts={tuple(parts)}, directions={options.directions}): leave b_to_a_gate=None"
        )
    return cast(BToAGate, gate)


def label_advantage(known_a: Tensor, known_b: Tensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """`g = max(0, n_B − n_A) / (n_A + n_B)`: how many more of the batch's samples carry a label of task B than
    of task A, as a share of all the labels; 0 for a batch with no label.

    The weight of the B→A matching term under `b_to_a_gate="label_advantage"`: B's head teaches A (through the
    naive-Bayes inversion of `R`, which multiplies the evidence of every attribute as if independent) only in
    proportion to the labels it has learned from beyond A's own.

    Args:
        known_a: `(N,)` bool, the samples whose A label is known.
        known_b: `(N,)` bool, the samples with at least one known B label.
        dtype: the result's floating-point dtype.

    Returns:
        a scalar in `[0, 1)`, no gradient.

    Raises:
        TypeError: a mask is not a bool tensor, or `dtype` is not floating-point.
        ValueError: a mask is not 1-D, or the two differ in length.
    """
    for name, mask in (("known_a", known_a), ("known_b", known_b)):
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"'{name}' must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.dim() != 1:
            raise ValueError(f"'{name}' must be 1-D (one flag per sample), got shape {tuple(mask.shape)}")
    if known_a.shape != known_b.shape:
        raise ValueError(
            f"'known_a' and 'known_b' must have one flag per sample of the same batch: got shapes "
            f"{tuple(known_a.shape)} and {tuple(known_b.shape)}"
        )
    if not dtype.is_floating_point:
        raise TypeError(f"'dtype' must be a floating-point dtype, got {dtype}")
    return _label_advantage(known_a, known_b, dtype)


def _label_advantage(known_a: Tensor, known_b: Tensor, dtype: torch.dtype) -> Tensor:
    n_a = known_a.sum(dtype=dtype)
    n_b = known_b.sum(dtype=dtype)
    return (n_b - n_a).clamp_min(0) / (n_a + n_b).clamp_min(1)


def _check_parts(parts: Sequence[str]) -> tuple[str, ...]:
    """`parts` as a tuple, every one of `MULTI_TASK_PARTS`, none twice."""
    if isinstance(parts, str):
        raise TypeError(f"'parts' must be a sequence of part names, e.g. ({parts!r},), got the string {parts!r}")
    for part in parts:
        check_choice(part, "parts", MULTI_TASK_PARTS)
    return tuple(dict.fromkeys(parts))


def _multi_task_unchecked(
    logits_a: Tensor,
    logits_b: Tensor,
    labels: _TaskLabels,
    relatedness: Tensor,
    prior: Tensor,
    options: _MatchingOptions,
    parts: tuple[str, ...],
    matching: dict[Direction, Tensor],
    b_to_a_gate: BToAGate | None = None,
) -> dict[str, Tensor]:
    """`multi_task_terms` for checked inputs, decoded labels and the matching terms already computed (by the
    functional path or a kernel), with autocast off (switched by the entry point of the call)."""
    terms: dict[str, Tensor] = {}
    if b_to_a_gate is not None and "b_to_a" in matching:
        gate = _label_advantage(labels.known_a, labels.known_b.any(dim=1), matching["b_to_a"].dtype)
        matching = {**matching, "b_to_a": gate * matching["b_to_a"]}
    dtype = compute_dtype(logits_a, logits_b)
    z_a, z_b = logits_a.to(dtype), logits_b.to(dtype)
    if "supervised_a" in parts:
        terms["supervised_a"] = _masked_cross_entropy(z_a, labels.a, labels.known_a)
    if "supervised_b" in parts:
        if options.kind == "multilabel":
            terms["supervised_b"] = _masked_binary_cross_entropy(z_b, labels.b.to(dtype), labels.known_b)
        else:  # one-hot targets: the cross-entropy of the known class
            per_sample = _soft_categorical_divergence(z_b, labels.b.to(dtype), "ce", options.eps)
            terms["supervised_b"] = _masked_mean(per_sample, labels.known_b.any(dim=1))
    terms.update({f"matching/{direction}": value for direction, value in matching.items()})
    if "co_annotation" in parts:
        co_annotation = _co_annotation_unchecked(logits_a, logits_b, labels, relatedness, prior, options)
        terms.update({f"co_annotation/{name}": value for name, value in co_annotation.items()})
    return terms
