"""Fused GPU kernels (Triton) with the same contract as their `functional` twins, and the backend dispatcher.

Every backend choice of the package is made here (`negtransfer_losses.ops.dispatch.choose`): `backend="auto"`
takes a fused kernel only where, measured once per input key on the user's device, it agrees with the exact
result and is faster than the functional path (candidates come from the cost rule `fused_wins`: CUDA, never
float64 or inside `torch.compile`); `"torch"` and `"triton"` force one, and the environment variable
`NEGTRANSFER_BACKEND` replaces the default. Triton is imported only when a kernel runs; with
`TRITON_INTERPRET=1` the kernels also run, slowly, on CPU tensors (how the tests check them).

Kernels:
- row cosines of Gram matrices (both scopes) without forming them (`gram_row_cosines`), used by
  `anti_transfer` for the Gram aggregation with the cosine distances;
- channel aggregation (mean/sum/max) fused with the row cosine (`aggregated_row_cosines`), used by
  `anti_transfer` for those aggregations with the cosine distances;
- distribution matching for a multilabel task B with the Bayes inversion (`distribution_matching`), used by
  `DistributionMatchingLoss` and `MultiTaskLoss`.
"""

from .anti_transfer import aggregated_row_cosines, anti_transfer, gram_row_cosines
from .dispatch import BACKENDS, Backend, KernelRejectedWarning, choose, interpreting, resolve_backend, triton_available
from .distribution_matching import distribution_matching

__all__ = [
    "BACKENDS",
    "Backend",
    "KernelRejectedWarning",
    "aggregated_row_cosines",
    "anti_transfer",
    "choose",
    "distribution_matching",
    "gram_row_cosines",
    "interpreting",
    "resolve_backend",
    "triton_available",
]
