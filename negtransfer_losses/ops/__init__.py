"""Fused GPU kernels (Triton) with the same contract as their `functional` twins, and the backend dispatcher.

Every backend choice of the package is made here (by `negtransfer_losses.ops.dispatch.default_dispatcher`):
`backend="auto"` takes a fused kernel only where, measured once per input key on the user's device, it agrees
with the exact result and is faster than the functional path (candidates come from the cost rule `fused_wins`:
CUDA, never float64 or inside `torch.compile`); `"torch"` and `"triton"` force one, and the environment
variable `NEGTRANSFER_BACKEND` replaces the default. Triton is imported only when a kernel runs; with
`TRITON_INTERPRET=1` the kernels also run, slowly, on CPU tensors (how the tests check them). `decisions()`
lists what `auto` chose for each input key and why; `forget_decisions()` drops them, so that they are measured
again.

Kernels (one private file each, `_kernel_<name>.py`, beside the public wrappers `anti_transfer.py` and
`distribution_matching.py`; `_kernel_common.py` holds what they share):
- row cosines of Gram matrices (both scopes) without forming them (`gram_row_cosines`), used by
  `anti_transfer` for the Gram aggregation with the cosine distances;
- channel aggregation (mean/sum/max) fused with the row cosine (`aggregated_row_cosines`), used by
  `anti_transfer` for those aggregations with the cosine distances;
- distribution matching for a multilabel task B with the Bayes inversion (`distribution_matching`, and the
  matching part of `multi_task_terms`), used by
  `DistributionMatchingLoss` and `MultiTaskLoss`.
"""

from .anti_transfer import aggregated_row_cosines, anti_transfer, gram_row_cosines
from .dispatch import (
    BACKENDS,
    Backend,
    KernelRejectedWarning,
    decisions,
    forget_decisions,
    interpreting,
    resolve_backend,
    triton_available,
)
from .distribution_matching import distribution_matching, multi_task_terms

__all__ = [
    "BACKENDS",
    "Backend",
    "KernelRejectedWarning",
    "aggregated_row_cosines",
    "anti_transfer",
    "decisions",
    "distribution_matching",
    "forget_decisions",
    "gram_row_cosines",
    "interpreting",
    "multi_task_terms",
    "resolve_backend",
    "triton_available",
]
