"""Distribution matching with the backend choice: `functional.distribution_matching`'s contract, with one
fused kernel per pass for a multilabel task B and the Bayes inversion where the dispatcher takes it."""

from __future__ import annotations

from torch import Tensor

from ..functional.distribution_matching import (
    DIRECTIONS,
    EPS,
    Direction,
    Divergence,
    Inversion,
    TaskKind,
    check_matching_options,
    check_matching_tensors,
    distribution_matching_unchecked,
)
from .dispatch import Backend, resolve_backend


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
    backend: Backend = "auto",
) -> dict[Direction, Tensor]:
    """`functional.distribution_matching`; one fused kernel per pass for a multilabel task B with the Bayes
    inversion on the Triton backend (other configurations take the functional path)."""
    check_matching_options(kind, directions, inversion, divergence)
    return matching_terms(
        logits_a, logits_b, matrix, prior, kind, directions, inversion, divergence, detach_target, eps, backend
    )


def matching_terms(
    logits_a: Tensor,
    logits_b: Tensor,
    matrix: Tensor,
    prior: Tensor | None,
    kind: TaskKind,
    directions: tuple[Direction, ...],
    inversion: Inversion,
    divergence: Divergence,
    detach_target: bool,
    eps: float,
    backend: Backend,
) -> dict[Direction, Tensor]:
    """`distribution_matching` for options already checked by `check_matching_options` (what
    `DistributionMatchingLoss` calls on every step): the tensors are checked, once."""
    prior = check_matching_tensors(logits_a, logits_b, matrix, prior)
    fused = kind == "multilabel" and inversion == "bayes"
    if not fused or resolve_backend(backend, "distribution_matching", logits_a, logits_b) == "torch":
        return distribution_matching_unchecked(
            logits_a, logits_b, matrix, prior, kind, directions, inversion, divergence, detach_target, eps
        )
    from .fused_distribution_matching import FusedDistributionMatching

    per_sample: Tensor = FusedDistributionMatching.apply(  # type: ignore[no-untyped-call]
        logits_a, logits_b, matrix, prior, divergence == "kl", detach_target, eps
    )
    means = per_sample.sum(dim=0) / max(per_sample.shape[0], 1)  # an empty batch gives 0, not NaN
    return {direction: means[DIRECTIONS.index(direction)] for direction in directions}
