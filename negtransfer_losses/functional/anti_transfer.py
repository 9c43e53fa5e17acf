"""Anti-transfer (Guizzo, Weyde, Tarroni 2021): penalize similarity to a frozen irrelevant network (METHODS.md §1).

`L_AT = d(A(S), A(R))` for the student's map `S` and the frozen reference's map `R` at one layer, with
an aggregation `A` and a distance `d`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor

from .. import ops
from .._validation import (
    NAN_POLICIES,
    NanPolicy,
    check_choice,
    check_min_batch,
    check_same_device,
    check_tensor,
    compute_dtype,
    describe,
    full_precision,
    guard_finite,
    zero_unless,
)
from ..distributed import Gather, gather_batch
from ..ops import Backend
from .aggregation import AGGREGATIONS, aggregate_channels
from .similarity import GRAM_SCOPES, GramScope, cosine_rows, gram, linear_cka

AntiTransferAggregation: TypeAlias = Literal["none", "mean", "sum", "max", "mul", "gram"]
Distance: TypeAlias = Literal["cos_squared", "cos", "mse_sigmoid", "cka"]

ANTI_TRANSFER_AGGREGATIONS: tuple[AntiTransferAggregation, ...] = (*AGGREGATIONS, "gram")
DISTANCES: tuple[Distance, ...] = ("cos_squared", "cos", "mse_sigmoid", "cka")

# The authors' Gram scale, 1 / (B·C·N) / 0.001: it cancels in every cosine and matters only for `mse_sigmoid`.
GRAM_MSE_SCALE = 1e3


class AntiTransferTerms(NamedTuple):
    """One layer's anti-transfer loss and what to log beside it (all scalars).

    - `loss`: the unweighted `L_AT`;
    - `similarity`: the raw similarity: `mean_i |s_i|` for the cosine distances, the CKA value for
      `cka`, the MSE for `mse_sigmoid`;
    - `student_norm`: the mean L2 norm of a student sample's features, detached. Zero rows give
      `s_i = 0`, so a network can lower the cosine losses by killing channels: watch this fall.
    """

    loss: Tensor
    similarity: Tensor
    student_norm: Tensor


def anti_transfer(
    student: Tensor,
    reference: Tensor,
    aggregation: AntiTransferAggregation = "gram",
    distance: Distance = "cos_squared",
    gram_scope: GramScope = "batch",
    eps: float = 1e-8,
    *,
    mul_exponent: float = 0.001,
    nan_policy: NanPolicy = "raise",
    layer: str | None = None,
    gather: Gather = "local",
    backend: Backend = "auto",
) -> Tensor:
    """The unweighted anti-transfer loss `L_AT = d(A(S), A(R))` of one layer (METHODS.md §1).

    Aggregations `A`: `"none"`, `"mean"`, `"sum"`, `"max"`, `"mul"` over channels (dim 1), or `"gram"`
    (`gram_scope="batch"`: one `(B·C)×(B·C)` matrix, the authors' form; `"sample"`: `B` matrices `C×C`).

    Distances `d`, with rows `a_i, b_i` = the rows of the Gram matrices, or else each `(b, c')` slice of
    `A(·)` flattened over the spatial dims (for `(B, D)` features, each sample's vector), and
    `s_i = <a_i, b_i> / (max(|a_i|, eps) · max(|b_i|, eps))`:

    - `"cos_squared"`: `(mean_i |s_i|)²` (the paper's final setting);
    - `"cos"`: `mean_i |s_i|`;
    - `"mse_sigmoid"`: `-sigmoid(MSE(A(S), A(R)))`, Gram matrices scaled by `1/(B·C·N)/0.001` as in
      the authors' code;
    - `"cka"`: linear CKA between `A(S)` and `A(R)` flattened to `(B, ·)`; the two maps may differ in
      channels and spatial size.

    Args:
        student: `(B, C, *sp)` or `(B, D)` features of the trained network.
        reference: the frozen network's features at the matching layer; never receives gradient.
        mul_exponent: `p` of the `"mul"` aggregation.
        nan_policy: non-finite values in either input `"raise"` a `ValueError`, `"skip"` the layer
            (zero loss, zero gradient), or `"propagate"` (no check; avoids a device synchronization).
            Under `torch.compile`, `"raise"` cannot read the data and behaves as `"propagate"`.
        layer: the layer's name, for error messages.
        gather: `"global"` computes the loss on every rank's batch concatenated (the batch-scope Gram,
            CKA and the mean over rows all depend on the batch; `negtransfer_losses.distributed`).
        backend: `"auto"`, `"torch"` or `"triton"` (`negtransfer_losses.ops`): with a cosine distance,
            `gram`, `mean`, `sum` and `max` run as fused kernels on the Triton backend.

    Returns:
        a scalar tensor, float32 (float64 for float64 input).
    """
    return anti_transfer_terms(
        student,
        reference,
        aggregation,
        distance,
        gram_scope,
        eps,
        mul_exponent=mul_exponent,
        nan_policy=nan_policy,
        layer=layer,
        gather=gather,
        backend=backend,
    ).loss


def anti_transfer_terms(
    student: Tensor,
    reference: Tensor,
    aggregation: AntiTransferAggregation = "gram",
    distance: Distance = "cos_squared",
    gram_scope: GramScope = "batch",
    eps: float = 1e-8,
    *,
    mul_exponent: float = 0.001,
    nan_policy: NanPolicy = "raise",
    layer: str | None = None,
    gather: Gather = "local",
    backend: Backend = "auto",
) -> AntiTransferTerms:
    """`anti_transfer` with the raw similarity and the student's activation norm, in one computation."""
    check_anti_transfer_options(aggregation, distance, gram_scope, nan_policy)
    _check_shapes(student, reference, aggregation, distance, gram_scope, layer)
    student, reference = gather_batch(student, gather), gather_batch(reference.detach(), gather)
    with full_precision(student, reference):
        # inputs stay in their dtype here: every computation below reduces in float32/64 itself, and the
        # fused kernel reads fp16/bf16 directly (half the bytes of an upcast copy)
        guarded, finite = guard_finite({"student": student, "reference": reference}, nan_policy, layer=layer)
        student, reference = guarded["student"], guarded["reference"]
        flat = student.detach().reshape(student.shape[0], -1)
        student_norm = torch.linalg.vector_norm(flat, dim=1, dtype=compute_dtype(student, reference)).mean()
        loss, similarity = _distance(
            student, reference, aggregation, distance, gram_scope, eps, mul_exponent, layer, backend
        )
        return AntiTransferTerms(zero_unless(finite, loss), zero_unless(finite, similarity).detach(), student_norm)


def check_anti_transfer_options(aggregation: str, distance: str, gram_scope: str, nan_policy: str = "raise") -> None:
    """Raise `ValueError` naming the option when one is not valid (or the combination is not)."""
    check_choice(aggregation, "aggregation", ANTI_TRANSFER_AGGREGATIONS)
    check_choice(distance, "distance", DISTANCES)
    check_choice(gram_scope, "gram_scope", GRAM_SCOPES)
    check_choice(nan_policy, "nan_policy", NAN_POLICIES)
    if distance == "cka" and aggregation == "gram" and gram_scope == "batch":
        raise ValueError(
            "distance='cka' compares per-sample representations, but gram_scope='batch' makes one matrix "
            "for the whole batch; use gram_scope='sample' or another aggregation"
        )


def _distance(
    student: Tensor,
    reference: Tensor,
    aggregation: AntiTransferAggregation,
    distance: Distance,
    gram_scope: GramScope,
    eps: float,
    mul_exponent: float,
    layer: str | None,
    backend: Backend,
) -> tuple[Tensor, Tensor]:
    """`(loss, raw similarity)`; every path reduces in float32 (float64) whatever the inputs' dtype."""
    if distance in ("cos", "cos_squared"):
        cosines = _row_cosines(student, reference, aggregation, gram_scope, eps, mul_exponent, layer, backend)
        mean_abs_cos = cosines.abs().mean()
        return (mean_abs_cos.square() if distance == "cos_squared" else mean_abs_cos), mean_abs_cos
    if aggregation == "gram":
        a, b = gram(student, gram_scope), gram(reference, gram_scope)
    else:
        a = aggregate_channels(student, aggregation, mul_exponent=mul_exponent, name="student", layer=layer)
        b = aggregate_channels(reference, aggregation, mul_exponent=mul_exponent, name="reference", layer=layer)
    if distance == "cka":
        similarity = linear_cka(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
        return similarity, similarity
    if aggregation == "gram":  # mse_sigmoid on the Gram matrices: the authors' scale
        scale = GRAM_MSE_SCALE / student.numel()
        a, b = a * scale, b * scale
    mse = (a - b).square().mean()
    return -torch.sigmoid(mse), mse


def _row_cosines(
    student: Tensor,
    reference: Tensor,
    aggregation: AntiTransferAggregation,
    gram_scope: GramScope,
    eps: float,
    mul_exponent: float,
    layer: str | None,
    backend: Backend,
) -> Tensor:
    """The cosines `s_i` of matching rows: of the Gram matrices, or of each `(b, c')` slice of `A(·)`."""
    if aggregation == "gram":
        return ops.gram_row_cosines(student, reference, gram_scope, eps, backend)
    if aggregation in ("mean", "sum", "max"):  # 2-D features with these were rejected by _check_shapes
        return ops.aggregated_row_cosines(student, reference, aggregation, eps, backend)
    a = aggregate_channels(student, aggregation, mul_exponent=mul_exponent, name="student", layer=layer)
    b = aggregate_channels(reference, aggregation, mul_exponent=mul_exponent, name="reference", layer=layer)
    if a.dim() == 2:  # (B, D): no spatial extent, each sample's vector is a row
        return cosine_rows(a, b, eps)
    return cosine_rows(a.reshape(a.shape[0] * a.shape[1], -1), b.reshape(b.shape[0] * b.shape[1], -1), eps)


def _check_shapes(
    student: Tensor,
    reference: Tensor,
    aggregation: AntiTransferAggregation,
    distance: Distance,
    gram_scope: GramScope,
    layer: str | None,
) -> None:
    check_tensor(student, "student", layer=layer, min_dim=2)
    check_tensor(reference, "reference", layer=layer, min_dim=2)
    check_same_device({"student": student, "reference": reference}, layer=layer)
    check_min_batch(student.shape[0], 1, what="anti-transfer", name="student")
    where = "" if layer is None else f" at layer '{layer}'"
    if student.shape[0] != reference.shape[0]:
        raise ValueError(
            f"'student' and 'reference' must have the same batch size{where}: got shapes "
            f"{tuple(student.shape)} and {tuple(reference.shape)}; both networks must see the same batch"
        )
    if distance == "cka":
        return
    if student.shape != reference.shape:
        raise ValueError(
            f"'student' and 'reference' must have the same shape for distance={distance!r}{where}: got "
            f"{tuple(student.shape)} and {tuple(reference.shape)}; distance='cka' compares layers of "
            f"different widths or sizes"
        )
    if student.dim() == 2 and aggregation in ("mean", "sum", "max", "mul"):
        raise ValueError(
            f"aggregation={aggregation!r} over the {student.shape[1]} features of a 2-D {describe('student', layer)} "
            f"(shape {tuple(student.shape)}) leaves one number per sample, whose cosine is only its sign; "
            f"use aggregation='none' or 'gram', or distance='cka'"
        )
