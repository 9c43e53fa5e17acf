"""The math of every method as plain functions of tensors: the reference implementation (METHODS.md).

Runs on every device; the fused kernels in `negtransfer_losses.ops` are tested against it.
"""

from .aggregation import AGGREGATIONS, Aggregation, aggregate_channels
from .anti_transfer import (
    ANTI_TRANSFER_AGGREGATIONS,
    DISTANCES,
    NAN_POLICIES,
    AntiTransferAggregation,
    AntiTransferTerms,
    Distance,
    NanPolicy,
    anti_transfer,
    anti_transfer_terms,
    check_anti_transfer_options,
)
from .suppression import (
    IGNORE_INDEX,
    adversarial_suppression,
    erase,
    erasure_basis,
    gradient_reversal,
    irrelevant_cka,
    irrelevant_hsic,
)
from .similarity import (
    GRAM_SCOPES,
    KERNELS,
    GramScope,
    Kernel,
    cka,
    cosine_rows,
    gram,
    gram_row_cosines,
    hsic,
    hsic_from_kernels,
    kernel_matrix,
    linear_cka,
)

__all__ = [
    "AGGREGATIONS",
    "ANTI_TRANSFER_AGGREGATIONS",
    "DISTANCES",
    "NAN_POLICIES",
    "AntiTransferAggregation",
    "AntiTransferTerms",
    "Distance",
    "NanPolicy",
    "anti_transfer",
    "anti_transfer_terms",
    "check_anti_transfer_options",
    "GRAM_SCOPES",
    "KERNELS",
    "Aggregation",
    "GramScope",
    "IGNORE_INDEX",
    "Kernel",
    "adversarial_suppression",
    "aggregate_channels",
    "cka",
    "cosine_rows",
    "erase",
    "erasure_basis",
    "gradient_reversal",
    "gram",
    "gram_row_cosines",
    "hsic",
    "hsic_from_kernels",
    "irrelevant_cka",
    "irrelevant_hsic",
    "kernel_matrix",
    "linear_cka",
]
