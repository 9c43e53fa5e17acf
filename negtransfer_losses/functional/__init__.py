"""The math of every method as plain functions of tensors: the reference implementation (METHODS.md).

Runs on every device; the fused kernels in `negtransfer_losses.ops` are tested against it.
"""

from .aggregation import AGGREGATIONS, Aggregation, aggregate_channels
from .similarity import (
    GRAM_SCOPES,
    KERNELS,
    GramScope,
    Kernel,
    cka,
    cosine_rows,
    gram,
    hsic,
    hsic_from_kernels,
    kernel_matrix,
    linear_cka,
)

__all__ = [
    "AGGREGATIONS",
    "GRAM_SCOPES",
    "KERNELS",
    "Aggregation",
    "GramScope",
    "Kernel",
    "aggregate_channels",
    "cka",
    "cosine_rows",
    "gram",
    "hsic",
    "hsic_from_kernels",
    "kernel_matrix",
    "linear_cka",
]
