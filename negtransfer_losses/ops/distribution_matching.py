"""Distribution matching with the backend choice: `functional.distribution_matching`'s contract, with one
fused kernel per pass for a multilabel task B and the Bayes inversion where the dispatcher takes it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._labels import IGNORE_INDEX
from .._validation import full_precision
from ..functional import DIRECTIONS, MULTI_TASK_PARTS, BToAGate, Direction, Divergence, Inversion, TaskKind
from ..functional._core import (
    EPS,
    MatchingOptions,
    check_b_to_a_gate,
    check_matching_tensors,
    check_parts,
    matching_terms_unchecked,
    multi_task_unchecked,
    task_labels,
)
from .dispatch import Backend, check_backend, default_dispatcher


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
    backend: Backend = "auto",
) -> dict[Direction, Tensor]:
    """`negtransfer_losses.functional.distribution_matching` with a choice of backend.

    A multilabel task B with the Bayes inversion runs as one fused Triton kernel per pass where the
    backend takes it; every other configuration takes the functional path.

    Args:
        logits_a: `(N, K)` task A's logits.
        logits_b: `(N, M)` task B's logits.
        relatedness: `R`, `(K, M)`.
        prior: `π`, `(K,)`; uniform when None.
        kind: `"multilabel"` or `"multiclass"` task B.
        directions: `"a_to_b"`, `"b_to_a"` or both.
        inversion: `"bayes"` or `"product"`.
        divergence: `"kl"` or `"ce"`.
        detach_target: treat the inferred distributions as constants.
        eps: the clamp of probabilities inside logarithms (and of `R` in `"bayes"`).
        backend: `"auto"`, `"torch"` or `"triton"` (see `negtransfer_losses.ops`).

    Returns:
        `{direction: scalar}` for the directions asked for, float32 (float64 for float64 logits).

    Raises:
        TypeError: an input has the wrong type.
        ValueError: an option is not one of its choices, a shape does not match, or `backend="triton"`
            cannot run here.
    """
    options = MatchingOptions.resolve(
        kind=kind,
        directions=directions,
        inversion=inversion,
        divergence=divergence,
        detach_target=detach_target,
        eps=eps,
    )
    return matching_terms(logits_a, logits_b, relatedness, prior, options, backend=check_backend(backend))


def matching_terms(
    logits_a: Tensor,
    logits_b: Tensor,
    relatedness: Tensor,
    prior: Tensor | None,
    options: MatchingOptions,
    *,
    backend: Backend,
) -> dict[Direction, Tensor]:
    """`distribution_matching` for options resolved once: what the modules call on every step.

    The tensors are checked once, autocast is switched off once, then one backend computes the terms.

    Args:
        logits_a: `(N, K)` task A's logits.
        logits_b: `(N, M)` task B's logits.
        relatedness: `R`, `(K, M)`.
        prior: `π`, `(K,)`; uniform when None.
        options: from `MatchingOptions.resolve` (kind, directions, inversion, divergence, detach_target, eps).
        backend: a checked backend (`check_backend`).

    Returns:
        `{direction: scalar}` for `options.directions`.

    Raises:
        TypeError: an input has the wrong type.
        ValueError: a shape does not match, or `backend="triton"` cannot run here.
    """
    checked_prior = check_matching_tensors(logits_a, logits_b, relatedness, prior)
    with full_precision(logits_a, logits_b):
        return _matching_checked(logits_a, logits_b, relatedness, checked_prior, options, backend)


def _matching_checked(
    logits_a: Tensor,
    logits_b: Tensor,
    relatedness: Tensor,
    prior: Tensor,
    options: MatchingOptions,
    backend: Backend,
) -> dict[Direction, Tensor]:
    """The matching terms of checked tensors (autocast off), by the backend the dispatcher takes."""
    if options.kind != "multilabel" or options.inversion != "bayes":  # no kernel for these
        return matching_terms_unchecked(logits_a, logits_b, relatedness, prior, options)

    def torch_path(a: Tensor, b: Tensor) -> dict[Direction, Tensor]:
        return matching_terms_unchecked(a, b, relatedness, prior, options)

    def kernel_path(a: Tensor, b: Tensor) -> dict[Direction, Tensor]:
        from ._kernel_distribution_matching import FusedDistributionMatching

        per_sample: Tensor = FusedDistributionMatching.apply(  # type: ignore[no-untyped-call]
            a, b, relatedness, prior, options.divergence == "kl", options.detach_target, options.eps
        )
        means = per_sample.sum(dim=0) / max(per_sample.shape[0], 1)  # an empty batch gives 0, not NaN
        return {direction: means[DIRECTIONS.index(direction)] for direction in options.directions}

    op = f"distribution_matching/{options.divergence}{'/detached' if options.detach_target else ''}"
    chosen = default_dispatcher.choose(
        op, backend, (logits_a, logits_b), torch_path=torch_path, kernel_path=kernel_path
    )
    return (kernel_path if chosen == "triton" else torch_path)(logits_a, logits_b)


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
    backend: Backend = "auto",
) -> dict[str, Tensor]:
    """`negtransfer_losses.functional.multi_task_terms` with a choice of backend for the matching terms.

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
        inversion: `"bayes"` or `"product"`.
        divergence: `"kl"` or `"ce"`.
        detach_target: treat the matching terms' inferred distributions as constants.
        eps: the clamp of probabilities inside logarithms.
        ignore_index: the label of samples whose class is unknown.
        b_to_a_gate: None, or `"label_advantage"` (the B→A term scaled by `functional.label_advantage`).
        backend: `"auto"`, `"torch"` or `"triton"` (see `negtransfer_losses.ops`).

    Returns:
        `{name: scalar}`: `"supervised_a"`, `"supervised_b"`, `"matching/{direction}"`, `"co_annotation/a"`,
        `"co_annotation/b"` for the parts asked for.

    Raises:
        TypeError: an input has the wrong type.
        ValueError: an option is not one of its choices, a shape does not match, a label is out of range, or
            `backend="triton"` cannot run here.
    """
    options = MatchingOptions.resolve(
        kind=kind,
        directions=directions,
        inversion=inversion,
        divergence=divergence,
        detach_target=detach_target,
        eps=eps,
    )
    checked_parts = check_parts(parts)
    return multi_task_parts(
        logits_a,
        logits_b,
        labels_a,
        labels_b,
        relatedness,
        prior,
        options,
        parts=checked_parts,
        ignore_index=ignore_index,
        backend=check_backend(backend),
        b_to_a_gate=check_b_to_a_gate(b_to_a_gate, options, checked_parts),
    )


def multi_task_parts(
    logits_a: Tensor,
    logits_b: Tensor,
    labels_a: Tensor,
    labels_b: Tensor,
    relatedness: Tensor,
    prior: Tensor | None,
    options: MatchingOptions,
    *,
    parts: tuple[str, ...],
    ignore_index: int,
    backend: Backend,
    b_to_a_gate: BToAGate | None = None,
) -> dict[str, Tensor]:
    """`multi_task_terms` for options resolved once: what `MultiTaskLoss` calls on every step.

    Every tensor is checked once and autocast switched off once; the matching terms by the backend the dispatcher
    takes.

    Args:
        logits_a: `(N, K)` task A's logits.
        logits_b: `(N, M)` task B's logits.
        labels_a: `(N,)` task A's labels.
        labels_b: task B's labels.
        relatedness: `R`, `(K, M)`.
        prior: `π`, `(K,)`; uniform when None.
        options: from `MatchingOptions.resolve`.
        parts: checked part names.
        ignore_index: the label of samples whose class is unknown.
        backend: a checked backend.
        b_to_a_gate: a checked gate of the B→A term, or None.

    Returns:
        the parts, as `multi_task_terms` gives them.
    """
    checked_prior = check_matching_tensors(logits_a, logits_b, relatedness, prior)
    labels = task_labels(labels_a, labels_b, logits_a, relatedness, options.kind, ignore_index)
    with full_precision(logits_a, logits_b):
        matching = (
            _matching_checked(logits_a, logits_b, relatedness, checked_prior, options, backend)
            if "matching" in parts
            else {}
        )
        return multi_task_unchecked(
            logits_a, logits_b, labels, relatedness, checked_prior, options, parts, matching, b_to_a_gate
        )
