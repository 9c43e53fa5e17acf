"""Anti-transfer with the backend choice: `negtransfer_losses.functional.anti_transfer`'s contract, with the
row cosines of `gram`, `mean`, `sum` and `max` run by a fused kernel where the dispatcher takes one."""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from .._validation import NanPolicy
from ..distributed import Gather
from ..functional.aggregation import ROW_AGGREGATIONS, Aggregation, check_row_aggregation_pair
from ..functional.anti_transfer import (
    AntiTransferAggregation,
    AntiTransferOptions,
    AntiTransferTerms,
    Distance,
    compute_anti_transfer_terms,
    torch_row_cosines,
)
from ..functional.similarity import GramScope, check_gram_pair
from .dispatch import Backend, check_backend, choose


def gram_row_cosines(
    student: Tensor, reference: Tensor, gram_scope: GramScope = "batch", eps: float = 1e-8, backend: Backend = "auto"
) -> Tensor:
    """`functional.gram_row_cosines`; on the Triton backend, tiled so that no Gram matrix is ever formed."""
    check_gram_pair(student, reference, gram_scope)
    options = AntiTransferOptions.resolve("gram", "cos", gram_scope, eps)
    return dispatched_row_cosines(student, reference.detach(), options, backend=backend)


def aggregated_row_cosines(
    student: Tensor, reference: Tensor, aggregation: Aggregation = "mean", eps: float = 1e-8, backend: Backend = "auto"
) -> Tensor:
    """`functional.aggregated_row_cosines`, fused in one Triton kernel per pass when the backend is Triton."""
    check_row_aggregation_pair(student, reference, aggregation)
    options = AntiTransferOptions.resolve(aggregation, "cos", None, eps)
    return dispatched_row_cosines(student, reference.detach(), options, backend=backend)


def dispatched_row_cosines(
    student: Tensor, reference: Tensor, options: AntiTransferOptions, *, backend: Backend
) -> Tensor:
    """The row cosines of `options.aggregation` (in `gram`, `mean`, `sum`, `max`) by the path `choose` takes."""
    aggregation, scope, eps = options.aggregation, options.gram_scope, options.eps

    def torch_path(s: Tensor, r: Tensor) -> Tensor:
        return torch_row_cosines(s, r, options)

    def kernel_path(s: Tensor, r: Tensor) -> Tensor:
        if aggregation == "gram":
            from .gram_cosine import GramRowCosines

            cosines: Tensor = GramRowCosines.apply(s, r, scope, eps)  # type: ignore[no-untyped-call]
            return cosines
        from .channel_cosine import AggregatedRowCosines

        cosines = AggregatedRowCosines.apply(s, r, aggregation, eps)  # type: ignore[no-untyped-call]
        return cosines

    if aggregation == "gram":
        op = f"gram_row_cosines/{scope}"
    elif aggregation in ROW_AGGREGATIONS:
        op = f"aggregated_row_cosines/{aggregation}"
    else:
        return torch_path(student, reference)
    paths = {"torch": torch_path, "triton": kernel_path}
    chosen = choose(op, backend, (student, reference), torch_path=torch_path, kernel_path=kernel_path)
    return paths[chosen](student, reference)


def anti_transfer(
    student: Tensor,
    reference: Tensor,
    aggregation: AntiTransferAggregation = "gram",
    distance: Distance = "cos_squared",
    gram_scope: GramScope | None = None,
    eps: float = 1e-8,
    *,
    mul_exponent: float | None = None,
    nan_policy: NanPolicy = "raise",
    layer: str | None = None,
    gather: Gather = "local",
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """`functional.anti_transfer` with the backend choice (`negtransfer_losses.ops.dispatch`); the terms
    beside the loss come from `anti_transfer_terms_for`, which takes the options resolved once."""
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
    """The terms for options validated once, `backend` included (what `AntiTransferLoss` calls on every step)."""
    return compute_anti_transfer_terms(
        student,
        reference,
        options,
        layer=layer,
        generator=generator,
        row_cosines=partial(dispatched_row_cosines, backend=backend),
    )
