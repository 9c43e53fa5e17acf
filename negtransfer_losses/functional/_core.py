"""The one internal door into `functional` for the layers above it (`ops`, the modules, `diagnostics`,
`relatedness`).

Another layer uses `functional` through its public names (`negtransfer_losses.functional.__all__`) or through
this module, never through a private name or module of `functional` itself (`tests/test_architecture.py`
holds every module to it). A name is here because another layer needs more than the public function: its
checks apart from its computation (to check once at its own door), its core without the checks, a stage of
a computation, or a helper whose rule must be the same on every path. The contract, by kind:

- **Checks** (`check_*`): the checks of a public function, raising the same `TypeError` / `ValueError` with
  the same messages; an entry point of another layer calls them once at its door, then a core.
- **Cores** (`*_unchecked`, and the staged anti-transfer `prepare_anti_transfer` → row cosines →
  `finish_anti_transfer`, `compute_anti_transfer_terms`; the adversary's `adversarial_batch` (which checks)
  → `adversarial_loss` / `adversarial_cross_entropy`): they take inputs that the entry point of the call has
  already checked (shapes, dtypes, devices, labels decoded), check nothing again, and compute in the compute
  dtype (float32, float64 for float64 input) **with autocast off**: the entry point of the call (a public
  function of `functional` or `ops`, or a module's `forward`) switches precision once,
  `with _validation.full_precision(...)`, around its whole computation; a core never switches it again.
- **Shared rules**: `unit_scale` and `scaled_floor` (the one scale and norm floor of every cosine, kernels
  included), `feature_space_cheaper` (the one choice of the linear-kernel form), `linear_hsic` and
  `safe_ratio` (pure arithmetic on checked rows), `newton_schulz_cut` (the check of `rtol` and its cut),
  `member_rows`, `one_hot_known`: plain functions of tensors that neither check nor switch precision.
- **Records and constants**: the validated option records (`AntiTransferOptions`, `MatchingOptions`), what a
  stage hands to the next (`AdversarialBatch`), and the defaults the modules share with the
  functions (`EPS`, `DEFAULT_STRENGTH`, `ROW_AGGREGATIONS`, `COSINE_DISTANCES`).

The public functions of `functional` are the same computations with their checks and the precision switch at
the door.
"""

from __future__ import annotations

from ._groups import check_irrelevant_labels, check_task_labels, member_rows, one_hot_known
from .adversarial import (
    DEFAULT_STRENGTH,
    AdversarialBatch,
    adversarial_batch,
    adversarial_cross_entropy,
    adversarial_loss,
)
from .aggregation import ROW_AGGREGATIONS
from .aggregation import _aggregated_row_cosines as aggregated_row_cosines_unchecked
from .aggregation import _check_row_aggregation_pair as check_row_aggregation_pair
from .anti_transfer import (
    COSINE_DISTANCES,
    AntiTransferOptions,
    compute_anti_transfer_terms,
    finish_anti_transfer,
    prepare_anti_transfer,
)
from .anti_transfer import _check_anti_transfer_inputs as check_anti_transfer_inputs
from .distribution_matching import EPS
from .distribution_matching import _check_b_to_a_gate as check_b_to_a_gate
from .distribution_matching import _check_heads as check_heads
from .distribution_matching import _check_matching_tensors as check_matching_tensors
from .distribution_matching import _check_parts as check_parts
from .distribution_matching import _co_annotation_unchecked as co_annotation_unchecked
from .distribution_matching import _matching_terms_unchecked as matching_terms_unchecked
from .distribution_matching import _MatchingOptions as MatchingOptions
from .distribution_matching import _multi_task_unchecked as multi_task_unchecked
from .distribution_matching import _task_labels as task_labels
from .erasure import _column_basis as column_basis_unchecked
from .erasure import _erase as erase_unchecked
from .erasure import _erasure_basis as erasure_basis_unchecked
from .erasure import _within_class_cross_covariance as within_class_cross_covariance_unchecked
from .erasure import newton_schulz_cut
from .gce import DEFAULT_Q, check_q, generalized_cross_entropy_unchecked
from .similarity import _check_gram_pair as check_gram_pair
from .similarity import _check_kernel as check_kernel
from .similarity import _gram_row_cosines as gram_row_cosines_unchecked
from .similarity import feature_space_cheaper, linear_hsic, safe_ratio, scaled_floor, unit_scale

__all__ = [
    "COSINE_DISTANCES",
    "DEFAULT_Q",
    "DEFAULT_STRENGTH",
    "EPS",
    "ROW_AGGREGATIONS",
    "AdversarialBatch",
    "AntiTransferOptions",
    "MatchingOptions",
    "adversarial_batch",
    "adversarial_cross_entropy",
    "adversarial_loss",
    "aggregated_row_cosines_unchecked",
    "check_anti_transfer_inputs",
    "check_b_to_a_gate",
    "check_gram_pair",
    "check_heads",
    "check_irrelevant_labels",
    "check_kernel",
    "check_matching_tensors",
    "check_parts",
    "check_q",
    "check_row_aggregation_pair",
    "check_task_labels",
    "co_annotation_unchecked",
    "column_basis_unchecked",
    "compute_anti_transfer_terms",
    "erase_unchecked",
    "erasure_basis_unchecked",
    "feature_space_cheaper",
    "finish_anti_transfer",
    "generalized_cross_entropy_unchecked",
    "gram_row_cosines_unchecked",
    "linear_hsic",
    "matching_terms_unchecked",
    "member_rows",
    "multi_task_unchecked",
    "newton_schulz_cut",
    "one_hot_known",
    "prepare_anti_transfer",
    "safe_ratio",
    "scaled_floor",
    "task_labels",
    "unit_scale",
    "within_class_cross_covariance_unchecked",
]
