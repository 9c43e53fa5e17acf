"""Anti-transfer with the backend choice: `negtransfer_losses.functional.anti_transfer`'s contract, with the
row cosines of `gram`, `mean`, `sum` and `max` run by a fused kernel where the dispatcher takes one.

The one door from the modules to the anti-transfer math is `anti_transfer_terms_for`: it checks the inputs
once and switches autocast off once; for the cosine distances of those four aggregations it lets
`functional.anti_transfer.prepare_anti_transfer` prepare the inputs, computes the row cosines by the path the
dispatcher chooses (the functional core or the kernel), and hands them to `finish_anti_transfer`; everything
else is the functional computation as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._validation import NanPolicy, full_precision
from ..distributed import Gather
from ..functional import Aggregation, AntiTransferAggregation, AntiTransferTerms, Distance, GramScope
from ..functional._core import (
    COSINE_DISTANCES,
    ROW_AGGREGATIONS,
    AntiTransferOptions,
    aggregated_row_cosines_unchecked,
    check_anti_transfer_inputs,
    check_gram_pair,
    check_row_aggregation_pair,
    compute_anti_transfer_terms,
    finish_anti_transfer,
    gram_row_cosines_unchecked,
    prepare_anti_transfer,
)
from .dispatch import Backend, check_backend, default_dispatcher

__all__ = ["aggregated_row_cosines", "anti_transfer", "gram_row_cosines"]

Path = Callable[[Tensor, Tensor], Tensor]


def gram_row_cosines(
    student: Tensor,
    reference: Tensor,
    *,
    gram_scope: GramScope = "batch",
    eps: float = 1e-8,
    backend: Backend = "auto",
) -> Tensor:
    """`functional.gram_row_cosines` with the backend choice; the kernel never forms a Gram matrix.

    Args:
        student: `(B, C, *spatial)`.
        reference: same shape as `student`; gets no gradient.
        gram_scope: `"batch"` or `"sample"`.
        eps: floor of each Gram row norm, in the units of `gram(student)`.
        backend: `"auto"`, `"torch"` or `"triton"` (`negtransfer_losses.ops.dispatch`).

    Returns:
        `(B·C,)` cosines, float32 (float64 for float64 input, always on the torch path).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: the shapes differ, an option is not valid, or `backend="triton"` cannot run here.
    """
    check_backend(backend)
    check_gram_pair(student, reference, gram_scope)
    with full_precision(student, reference):
        return _gram_cosines(student, reference.detach(), gram_scope, eps, backend)


def aggregated_row_cosines(
    student: Tensor,
    reference: Tensor,
    *,
    aggregation: Aggregation = "mean",
    eps: float = 1e-8,
    backend: Backend = "auto",
) -> Tensor:
    """`functional.aggregated_row_cosines` with the backend choice; the kernel fuses the channel aggregation
    and the cosine in one launch per pass.

    Args:
        student: `(B, C, *spatial)`.
        reference: same batch and spatial size (its channel count may differ); gets no gradient.
        aggregation: `"mean"`, `"sum"` or `"max"`.
        eps: floor of each norm, in the units of `A(student)`.
        backend: `"auto"`, `"torch"` or `"triton"` (`negtransfer_losses.ops.dispatch`).

    Returns:
        `(B,)`, float32 (float64 for float64 input, always on the torch path).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: the sizes disagree, an option is not valid, or `backend="triton"` cannot run here.
    """
    check_backend(backend)
    check_row_aggregation_pair(student, reference, aggregation)
    with full_precision(student, reference):
        return _channel_cosines(student, reference.detach(), aggregation, eps, backend)


def _dispatched(
    op: str, backend: Backend, student: Tensor, reference: Tensor, torch_path: Path, kernel_path: Path
) -> Tensor:
    chosen = default_dispatcher.choose(
        op, backend, (student, reference), torch_path=torch_path, kernel_path=kernel_path
    )
    return (kernel_path if chosen == "triton" else torch_path)(student, reference)


def _gram_cosines(student: Tensor, reference: Tensor, gram_scope: GramScope, eps: float, backend: Backend) -> Tensor:
    """Checked inputs' Gram row cosines by the chosen path (the reference already detached; autocast off)."""

    def torch_path(s: Tensor, r: Tensor) -> Tensor:
        return gram_row_cosines_unchecked(s, r, gram_scope, eps)

    def kernel_path(s: Tensor, r: Tensor) -> Tensor:
        from ._kernel_gram_cosine import GramRowCosines

        cosines: Tensor = GramRowCosines.apply(s, r, gram_scope, eps)  # type: ignore[no-untyped-call]
        return cosines

    return _dispatched(f"gram_row_cosines/{gram_scope}", backend, student, reference, torch_path, kernel_path)


def _channel_cosines(
    student: Tensor, reference: Tensor, aggregation: Aggregation, eps: float, backend: Backend
) -> Tensor:
    """Checked inputs' aggregated row cosines by the chosen path (the reference already detached; autocast off)."""

    def torch_path(s: Tensor, r: Tensor) -> Tensor:
        return aggregated_row_cosines_unchecked(s, r, aggregation, eps)

    def kernel_path(s: Tensor, r: Tensor) -> Tensor:
        from ._kernel_channel_cosine import AggregatedRowCosines

        cosines: Tensor = AggregatedRowCosines.apply(s, r, aggregation, eps)  # type: ignore[no-untyped-call]
        return cosines

    op = f"aggregated_row_cosines/{aggregation}"
    return _dispatched(op, backend, student, reference, torch_path, kernel_path)


def anti_transfer(
    student: Tensor,
    reference: Tensor,
    *,
    aggregation: AntiTransferAggregation = "gram",
    distance: Distance = "cos_squared",
    gram_scope: GramScope | None = None,
    eps: float = 1e-8,
    mul_exponent: float | None = None,
    nan_policy: NanPolicy = "raise",
    layer: str | None = None,
    gather: Gather = "local",
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """`functional.anti_transfer` with the backend choice (`negtransfer_losses.ops.dispatch`).

    Args:
        student: `(B, C, *sp)` or `(B, D)` features of the trained network.
        reference: the frozen network's features at the matching layer; never receives gradient.
        aggregation: as in `functional.anti_transfer`.
        distance: as in `functional.anti_transfer`.
        gram_scope: as in `functional.anti_transfer`.
        eps: as in `functional.anti_transfer`.
        mul_exponent: as in `functional.anti_transfer`.
        nan_policy: as in `functional.anti_transfer`.
        layer: the layer's name, for error messages.
        gather: as in `functional.anti_transfer`.
        generator: as in `functional.anti_transfer`.
        backend: `"auto"`, `"torch"` or `"triton"`: who computes the row cosines of `gram`, `mean`, `sum`
            and `max` with the cosine distances (every other configuration is the functional path).

    Returns:
        a scalar tensor, float32 (float64 for float64 input).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: as `functional.anti_transfer`, or `backend="triton"` cannot run here.
    """
    check_backend(backend)
    options = AntiTransferOptions.resolve(aggregation, distance, gram_scope, eps, mul_exponent, nan_policy, gather)
    return anti_transfer_terms_for(student, reference, options, layer=layer, generator=generator, backend=backend).loss


def anti_transfer_terms_for(
    student: Tensor,
    reference: Tensor,
    options: AntiTransferOptions,
    *,
    layer: str | None = None,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> AntiTransferTerms:
    """The terms for options resolved once (`AntiTransferOptions.resolve`) and a checked `backend`: what
    `AntiTransferLoss` calls on every step. The inputs are checked once, here, and autocast is switched off once,
    here, around every stage."""
    check_anti_transfer_inputs(student, reference, options, layer)
    with full_precision(student, reference):
        has_kernel = options.aggregation == "gram" or options.aggregation in ROW_AGGREGATIONS
        if options.distance not in COSINE_DISTANCES or not has_kernel:
            return compute_anti_transfer_terms(student, reference, options, layer=layer, generator=generator)
        prepared = prepare_anti_transfer(student, reference, options, layer=layer, generator=generator)
        if options.aggregation == "gram":
            assert options.gram_scope is not None
            cosines = _gram_cosines(prepared.student, prepared.reference, options.gram_scope, options.eps, backend)
        else:
            aggregation: Aggregation = options.aggregation  # type: ignore[assignment]  # one of ROW_AGGREGATIONS
            cosines = _channel_cosines(prepared.student, prepared.reference, aggregation, options.eps, backend)
        return finish_anti_transfer(prepared, options, layer=layer, row_cosines=cosines)
