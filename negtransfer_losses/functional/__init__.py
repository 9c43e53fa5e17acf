"""The math of every method as plain functions of tensors: the reference implementation (docs: Methods).

Runs on every device; the fused kernels in `negtransfer_losses.ops` are tested against it.
"""

from .._labels import IGNORE_INDEX
from .._validation import NAN_POLICIES, NanPolicy
from .adversarial import adversarial_suppression, gradient_reversal
from .aggregation import AGGREGATIONS, Aggregation, aggregate_channels, aggregated_row_cosines
from .anti_transfer import (
    ANTI_TRANSFER_AGGREGATIONS,
    DISTANCES,
    AntiTransferAggregation,
    AntiTransferTerms,
    Distance,
    anti_transfer,
)
from .distribution_matching import (
    DIRECTIONS,
    DIVERGENCES,
    INVERSIONS,
    MULTI_TASK_PARTS,
    TASK_KINDS,
    Direction,
    Divergence,
    Inversion,
    TaskKind,
    distribution_matching,
    infer_a_from_b,
    infer_b_from_a,
    masked_binary_cross_entropy,
    masked_cross_entropy,
    multi_task_terms,
    soft_co_annotation,
)
from .erasure import erase, erasure_basis
from .gce import REDUCTIONS, Reduction, generalized_cross_entropy
from .pairwise import pairwise_row_cosines
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
    kernel_alignment,
    kernel_matrix,
    linear_cka,
)
from .suppression import irrelevant_cka, irrelevant_hsic

__all__ = [
    "AGGREGATIONS",
    "ANTI_TRANSFER_AGGREGATIONS",
    "DIRECTIONS",
    "DISTANCES",
    "DIVERGENCES",
    "GRAM_SCOPES",
    "IGNORE_INDEX",
    "INVERSIONS",
    "KERNELS",
    "MULTI_TASK_PARTS",
    "NAN_POLICIES",
    "REDUCTIONS",
    "TASK_KINDS",
    "Aggregation",
    "AntiTransferAggregation",
    "AntiTransferTerms",
    "Direction",
    "Distance",
    "Divergence",
    "GramScope",
    "Inversion",
    "Kernel",
    "NanPolicy",
    "Reduction",
    "TaskKind",
    "adversarial_suppression",
    "aggregate_channels",
    "aggregated_row_cosines",
    "anti_transfer",
    "cka",
    "cosine_rows",
    "distribution_matching",
    "erase",
    "erasure_basis",
    "generalized_cross_entropy",
    "gradient_reversal",
    "gram",
    "gram_row_cosines",
    "hsic",
    "hsic_from_kernels",
    "infer_a_from_b",
    "infer_b_from_a",
    "irrelevant_cka",
    "irrelevant_hsic",
    "kernel_alignment",
    "kernel_matrix",
    "linear_cka",
    "masked_binary_cross_entropy",
    "masked_cross_entropy",
    "multi_task_terms",
    "pairwise_row_cosines",
    "soft_co_annotation",
]
