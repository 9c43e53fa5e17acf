"""Fused GPU kernels (Triton) with the same contract as their `functional` twins, and the backend dispatcher.

`backend="auto"` uses a fused kernel for CUDA tensors when Triton is importable and the functional path
otherwise; `"torch"` and `"triton"` force one. The environment variable `NEGTRANSFER_BACKEND` (`auto`,
`torch` or `triton`) replaces the default `"auto"`. Triton is imported only when a kernel runs; with
`TRITON_INTERPRET=1` the kernels also run, slowly, on CPU tensors (how the tests check them).

Kernels:
- row cosines of Gram matrices (both scopes) without forming them (`gram_row_cosines`), used by
  `anti_transfer` for the Gram aggregation with the cosine distances;
- channel aggregation (mean/sum/max) fused with the row cosine (`aggregated_row_cosines`), used by
  `anti_transfer` for those aggregations with the cosine distances;
- distribution matching for a multilabel task B with the Bayes inversion (`distribution_matching`), used by
  `DistributionMatchingLoss` and `MultiTaskLoss`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal, TypeAlias

from torch import Tensor

from .._validation import check_choice
from ..functional.aggregation import aggregated_row_cosines as _torch_aggregated_row_cosines
from ..functional.aggregation import check_row_aggregation_pair
from ..functional.distribution_matching import (
    DIRECTIONS,
    EPS,
    Direction,
    Divergence,
    Inversion,
    TaskKind,
    check_matching_inputs,
)
from ..functional.distribution_matching import distribution_matching as _torch_distribution_matching
from ..functional.similarity import GramScope, check_gram_pair
from ..functional.similarity import gram_row_cosines as _torch_gram_row_cosines

Backend: TypeAlias = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: Backend, *tensors: Tensor) -> Literal["torch", "triton"]:
    """The backend that will run: `"auto"` (or `NEGTRANSFER_BACKEND`) picks Triton for CUDA tensors."""
    if backend == "auto":
        backend = os.environ.get("NEGTRANSFER_BACKEND", "auto")  # type: ignore[assignment]
        check_choice(backend, "NEGTRANSFER_BACKEND", BACKENDS)
    check_choice(backend, "backend", BACKENDS)
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs Triton: pip install 'negtransfer-losses[triton]'")
        if not on_cuda and not interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {', '.join(devices)}); set TRITON_INTERPRET=1 to run "
                f"the kernels in Triton's CPU interpreter, or use backend='torch'"
            )
    return backend


def aggregated_row_cosines(
    student: Tensor, reference: Tensor, aggregation: str = "mean", eps: float = 1e-8, backend: Backend = "auto"
) -> Tensor:
    """`functional.aggregated_row_cosines`, fused in one Triton kernel per pass when the backend is Triton."""
    check_row_aggregation_pair(student, reference, aggregation)
    if resolve_backend(backend, student, reference) == "torch":
        return _torch_aggregated_row_cosines(student, reference, aggregation, eps)  # type: ignore[arg-type]
    from .channel_cosine import AggregatedRowCosines

    cosines: Tensor = AggregatedRowCosines.apply(student, reference, aggregation, eps)  # type: ignore[no-untyped-call]
    return cosines


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
    fused = kind == "multilabel" and inversion == "bayes"
    if not fused or resolve_backend(backend, logits_a, logits_b) == "torch":
        return _torch_distribution_matching(
            logits_a, logits_b, matrix, prior, kind, directions, inversion, divergence, detach_target, eps
        )
    prior = check_matching_inputs(logits_a, logits_b, matrix, prior, kind, directions, inversion, divergence)
    from .fused_distribution_matching import FusedDistributionMatching

    per_sample: Tensor = FusedDistributionMatching.apply(  # type: ignore[no-untyped-call]
        logits_a, logits_b, matrix, prior, divergence == "kl", detach_target, eps
    )
    means = per_sample.sum(dim=0) / max(per_sample.shape[0], 1)  # an empty batch gives 0, not NaN
    return {direction: means[DIRECTIONS.index(direction)] for direction in directions}


def gram_row_cosines(
    x: Tensor, y: Tensor, scope: GramScope = "batch", eps: float = 1e-8, backend: Backend = "auto"
) -> Tensor:
    """`functional.gram_row_cosines`; on the Triton backend, tiled so that no Gram matrix is ever formed."""
    check_gram_pair(x, y, scope)
    if resolve_backend(backend, x, y) == "torch":
        return _torch_gram_row_cosines(x, y, scope, eps)
    from .gram_cosine import GramRowCosines

    cosines: Tensor = GramRowCosines.apply(x, y, scope, eps)  # type: ignore[no-untyped-call]
    return cosines
