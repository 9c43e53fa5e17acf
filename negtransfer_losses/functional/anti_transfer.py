"""Anti-transfer (Guizzo, Weyde, Tarroni 2021): penalize similarity to a frozen irrelevant network.

`L_AT = d(A(S), A(R))` for the student's map `S` and the frozen reference's map `R` at one layer, with
an aggregation `A` and a distance `d` (docs: Methods §1).

Plain PyTorch. A call checks its inputs once (`_check_anti_transfer_inputs`), switches autocast off once
(`full_precision`), and runs in two stages that other layers may also call apart (`functional._core`):
`prepare_anti_transfer` (the gather, the NaN policy, the student's norm, the stochastic window) and
`finish_anti_transfer` (the distance), which takes the row cosines `s_i` ready-made when given them, so
that `negtransfer_losses.ops` can compute those by another implementation without this module knowing of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor

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
from ..distributed import GATHERS, Gather, gather_batch
from .aggregation import AGGREGATIONS, DEFAULT_MUL_EXPONENT, _aggregate_channels, _aggregated_row_cosines
from .pairwise import _pairwise_mse, _pairwise_row_cosines, stochastic_window
from .similarity import GRAM_SCOPES, GramScope, _cosine_rows, _gram, _gram_row_cosines, _linear_cka

__all__ = [
    "ANTI_TRANSFER_AGGREGATIONS",
    "DISTANCES",
    "AntiTransferAggregation",
    "AntiTransferTerms",
    "Distance",
    "anti_transfer",
]

AntiTransferAggregation: TypeAlias = Literal[
    "none", "mean", "sum", "max", "mul", "gram", "pairwise", "stochastic_pairwise"
]
Distance: TypeAlias = Literal["cos_squared", "cos", "mse_sigmoid", "cka"]

ANTI_TRANSFER_AGGREGATIONS: tuple[AntiTransferAggregation, ...] = (
    *AGGREGATIONS,
    "gram",
    "pairwise",
    "stochastic_pairwise",
)
DISTANCES: tuple[Distance, ...] = ("cos_squared", "cos", "mse_sigmoid", "cka")
# distances computed from the cosines `s_i` of matching rows
COSINE_DISTANCES: tuple[Distance, ...] = ("cos_squared", "cos")
# aggregations that leave one number per sample and spatial position: meaningless on (B, D) features
_SPATIAL_ONLY: tuple[AntiTransferAggregation, ...] = ("mean", "sum", "max", "mul", "pairwise", "stochastic_pairwise")

# The authors' Gram scale, 1 / (B·C·N) / 0.001: it cancels in every cosine and matters only for `mse_sigmoid`.
GRAM_MSE_SCALE = 1e3


class AntiTransferTerms(NamedTuple):
    """One layer's anti-transfer loss and what to log beside it (all scalars).

    - `loss`: the unweighted `L_AT`;
    - `similarity`: the raw similarity: `mean_i |s_i|` for the cosine distances, the CKA value for
      `cka`, the MSE for `mse_sigmoid`;
    - `student_norm`: the mean L2 norm of a student sample's features, detached. Zero rows give
      `s_i = 0`, so a network can lower the cosine losses by killing channels: watch this fall.

    Attributes:
        loss: the unweighted `L_AT`, a scalar tensor (with gradient to the student).
        similarity: the raw similarity, detached scalar.
        student_norm: the student's mean sample norm, detached scalar.
    """

    loss: Tensor
    similarity: Tensor
    student_norm: Tensor


@dataclass(frozen=True)
class AntiTransferOptions:
    """The validated options of one anti-transfer configuration; `resolve` checks them once.

    Defaults depend on the choice they belong to: `gram_scope` is `"batch"` (the authors' form) for the
    cosine and MSE distances and `"sample"` for `cka` (which compares per-sample representations);
    `mul_exponent` is 0.001. Options that do not apply to the chosen aggregation raise.
    """

    aggregation: AntiTransferAggregation
    distance: Distance
    gram_scope: GramScope | None
    eps: float
    mul_exponent: float
    nan_policy: NanPolicy
    gather: Gather

    @classmethod
    def resolve(
        cls,
        aggregation: AntiTransferAggregation,
        distance: Distance,
        gram_scope: GramScope | None = None,
        eps: float = 1e-8,
        mul_exponent: float | None = None,
        nan_policy: NanPolicy = "raise",
        gather: Gather = "local",
    ) -> AntiTransferOptions:
        """Check every option (and their combination) and fill the defaults that depend on the others."""
        check_choice(aggregation, "aggregation", ANTI_TRANSFER_AGGREGATIONS)
        check_choice(distance, "distance", DISTANCES)
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        check_choice(gather, "gather", GATHERS)
        if not eps > 0:
            raise ValueError(f"'eps' must be > 0, got {eps}")
        if aggregation == "gram":
            if gram_scope is None:
                gram_scope = "sample" if distance == "cka" else "batch"
            check_choice(gram_scope, "gram_scope", GRAM_SCOPES)
            if distance == "cka" and gram_scope == "batch":
                raise ValueError(
                    "distance='cka' compares per-sample representations, but gram_scope='batch' makes one matrix "
                    "for the whole batch; use gram_scope='sample' (the default for 'cka') or another aggregation"
                )
        elif gram_scope is not None:
            raise ValueError(
                f"'gram_scope' applies to aggregation='gram' only, got gram_scope={gram_scope!r} with "
                f"aggregation={aggregation!r}; leave it out"
            )
        if aggregation == "mul":
            mul_exponent = DEFAULT_MUL_EXPONENT if mul_exponent is None else float(mul_exponent)
            if not mul_exponent > 0:
                raise ValueError(f"'mul_exponent' must be > 0 (0 makes every map 1), got {mul_exponent}")
        elif mul_exponent is not None:
            raise ValueError(
                f"'mul_exponent' applies to aggregation='mul' only, got it with aggregation={aggregation!r}"
            )
        return cls(
            aggregation,
            distance,
            gram_scope,
            float(eps),
            DEFAULT_MUL_EXPONENT if mul_exponent is None else mul_exponent,
            nan_policy,
            gather,
        )


class PreparedPair(NamedTuple):
    """One layer's inputs after `prepare_anti_transfer`: checked, gathered, guarded and windowed.

    - `student`, `reference`: in their own dtype (every computation reduces in float32/64 itself, and a fused
      kernel reads float16/bfloat16 directly); the reference is detached;
    - `finite`: the `nan_policy="skip"` flag of `guard_finite` (None when no masking is needed);
    - `student_norm`: the mean L2 norm of a student sample's features (over every channel), detached.
    """

    student: Tensor
    reference: Tensor
    finite: Tensor | None
    student_norm: Tensor


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
) -> Tensor:
    """The unweighted anti-transfer loss `L_AT = d(A(S), A(R))` of one layer.

    Aggregations `A`: `"none"`, `"mean"`, `"sum"`, `"max"`, `"mul"` over channels (dim 1); `"gram"`
    (`gram_scope="batch"`: one `(B·C)×(B·C)` matrix, the authors' form; `"sample"`: `B` matrices `C×C`);
    `"pairwise"` (every student channel paired with every reference channel, one row of `C²·N` values
    per sample, in closed form: `negtransfer_losses.functional.pairwise`); `"stochastic_pairwise"`
    (`pairwise` on a random window of `C // B` consecutive channels drawn from `generator`).

    Distances `d`, with rows `a_i, b_i` = the rows of the Gram matrices, each sample's pairwise row, or
    else each `(b, c')` slice of `A(·)` flattened over the spatial dims (for `(B, D)` features, each
    sample's vector), and `s_i = <a_i, b_i> / (max(|a_i|, eps) · max(|b_i|, eps))`:

    - `"cos_squared"`: `(mean_i |s_i|)²` (the paper's final setting);
    - `"cos"`: `mean_i |s_i|`;
    - `"mse_sigmoid"`: `-sigmoid(MSE(A(S), A(R)))`, Gram matrices scaled by `1/(B·C·N)/0.001` as in
      the authors' code;
    - `"cka"`: linear CKA between `A(S)` and `A(R)` flattened to `(B, ·)`; the two maps may differ in
      channels and spatial size.

    For `gram`, `mean`, `sum`, `max` and the pairwise aggregations both maps are first scaled by
    `similarity.unit_scale` (exact; float32 features near 1e30 give finite cosines), the other rows each by
    their own power of two; `eps` keeps its meaning above, the rows' own units, on every path
    (`similarity.scaled_floor`).

    Args:
        student: `(B, C, *sp)` or `(B, D)` features of the trained network.
        reference: the frozen network's features at the matching layer; never receives gradient.
        aggregation: `A`, one of the above.
        distance: `d`, one of the above.
        gram_scope: `"batch"` or `"sample"`, for `aggregation="gram"` only; None takes `"batch"`, or
            `"sample"` for `distance="cka"`.
        eps: floor of the row norms `|a_i|`, `|b_i|` in the cosine distances, in the rows' own units.
        mul_exponent: `p` of the `"mul"` aggregation (for it only; None takes 0.001).
        nan_policy: non-finite values in either input `"raise"` a `ValueError`, `"skip"` the layer
            (zero loss, zero gradient), or `"propagate"` (no check).
            Under `torch.compile`, `"raise"` cannot read the data and behaves as `"propagate"`.
        layer: the layer's name, for error messages.
        gather: `"global"` computes the loss on every rank's batch concatenated (the batch-scope Gram,
            CKA and the mean over rows all depend on the batch; `negtransfer_losses.distributed`).
        generator: draws the window of `"stochastic_pairwise"` (torch's default generator when None). With
            `gather="global"` every rank draws its own window: seed every rank alike (as DDP scripts do)
            so that all ranks compute the same loss.

    Returns:
        a scalar tensor, float32 (float64 for float64 input).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: an option or a combination of options is not valid, the shapes do not suit the options
            (naming the layer and the shapes), or an input holds NaN or inf with `nan_policy="raise"`.
    """
    options = AntiTransferOptions.resolve(aggregation, distance, gram_scope, eps, mul_exponent, nan_policy, gather)
    _check_anti_transfer_inputs(student, reference, options, layer)
    with full_precision(student, reference):
        return compute_anti_transfer_terms(student, reference, options, layer=layer, generator=generator).loss


def compute_anti_transfer_terms(
    student: Tensor,
    reference: Tensor,
    options: AntiTransferOptions,
    *,
    layer: str | None = None,
    generator: torch.Generator | None = None,
) -> AntiTransferTerms:
    """`anti_transfer` with the raw similarity and the student's activation norm, for options validated once
    (`AntiTransferOptions.resolve`) and inputs checked once (`_check_anti_transfer_inputs`), with autocast off
    (`full_precision`): `prepare_anti_transfer`, then `finish_anti_transfer`."""
    prepared = prepare_anti_transfer(student, reference, options, layer=layer, generator=generator)
    return finish_anti_transfer(prepared, options, layer=layer)


def prepare_anti_transfer(
    student: Tensor,
    reference: Tensor,
    options: AntiTransferOptions,
    *,
    layer: str | None = None,
    generator: torch.Generator | None = None,
) -> PreparedPair:
    """The gather, the NaN policy, the student's norm and (for `stochastic_pairwise`) the channel window of inputs
    checked once (`_check_anti_transfer_inputs`), with autocast off: what every path of the distance starts from."""
    student, reference = gather_batch(student, options.gather), gather_batch(reference.detach(), options.gather)
    guarded, finite = guard_finite({"student": student, "reference": reference}, options.nan_policy, layer=layer)
    student, reference = guarded["student"], guarded["reference"]
    flat = student.detach().reshape(student.shape[0], -1)
    student_norm = torch.linalg.vector_norm(flat, dim=1, dtype=compute_dtype(student, reference)).mean()
    if options.aggregation == "stochastic_pairwise":  # after the norm: it watches every channel
        window = stochastic_window(student.shape[1], student.shape[0], generator)
        student, reference = student[:, window], reference[:, window]
    return PreparedPair(student, reference, finite, student_norm)


def finish_anti_transfer(
    prepared: PreparedPair, options: AntiTransferOptions, *, layer: str | None = None, row_cosines: Tensor | None = None
) -> AntiTransferTerms:
    """The distance of prepared inputs, as `AntiTransferTerms`.

    `row_cosines`, for the cosine distances only, are the cosines `s_i` of the matching rows computed
    elsewhere (`negtransfer_losses.ops` runs them by the backend it chooses); when None they are computed
    here. Every path reduces in float32 (float64) whatever the inputs' dtype, with autocast off (switched by the
    entry point of the call).
    """
    student, reference = prepared.student, prepared.reference
    if options.distance in COSINE_DISTANCES:
        cosines = _row_cosines(student, reference, options, layer) if row_cosines is None else row_cosines
        similarity = cosines.abs().mean()
        loss = similarity.square() if options.distance == "cos_squared" else similarity
    else:
        if row_cosines is not None:
            raise ValueError(f"row cosines apply to the cosine distances only, not distance={options.distance!r}")
        loss, similarity = _distance(student, reference, options, layer)
    finite = prepared.finite
    return AntiTransferTerms(zero_unless(finite, loss), zero_unless(finite, similarity).detach(), prepared.student_norm)


def _distance(
    student: Tensor, reference: Tensor, options: AntiTransferOptions, layer: str | None
) -> tuple[Tensor, Tensor]:
    """`(loss, raw similarity)` of the CKA and MSE distances."""
    aggregation, distance = options.aggregation, options.distance
    dtype = compute_dtype(student, reference)
    if distance == "cka":
        check_min_batch(student.shape[0], 2, what="distance='cka'", name="student")
    if aggregation in ("pairwise", "stochastic_pairwise"):
        s, r = student.to(dtype), reference.to(dtype)
        if distance == "cka":  # the pairwise rows' Gram matrices are multiples of the flattened maps'
            similarity = _linear_cka(s.reshape(s.shape[0], -1), r.reshape(r.shape[0], -1), False)
            return similarity, similarity
        mse = _pairwise_mse(s, r)
        return -torch.sigmoid(mse), mse
    if aggregation == "gram":
        assert options.gram_scope is not None
        a, b = _gram(student, options.gram_scope), _gram(reference, options.gram_scope)
    else:
        a = _aggregate(student, "student", options, layer)
        b = _aggregate(reference, "reference", options, layer)
    if distance == "cka":
        similarity = _linear_cka(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), False)
        return similarity, similarity
    if aggregation == "gram":  # mse_sigmoid on the Gram matrices: the authors' scale
        scale = GRAM_MSE_SCALE / student.numel()
        a, b = a * scale, b * scale
    mse = (a - b).square().mean()
    return -torch.sigmoid(mse), mse


def _aggregate(x: Tensor, name: str, options: AntiTransferOptions, layer: str | None) -> Tensor:
    return _aggregate_channels(
        x,
        options.aggregation,  # type: ignore[arg-type]
        mul_exponent=options.mul_exponent,
        name=name,
        layer=layer,
    )


def _row_cosines(student: Tensor, reference: Tensor, options: AntiTransferOptions, layer: str | None) -> Tensor:
    """The cosines `s_i` of matching rows: of the Gram matrices, pairwise rows, or `(b, c')` slices of `A(·)`."""
    aggregation = options.aggregation
    if aggregation == "gram":
        assert options.gram_scope is not None
        return _gram_row_cosines(student, reference, options.gram_scope, options.eps)
    if aggregation in ("mean", "sum", "max"):  # 2-D features were rejected by the checks
        return _aggregated_row_cosines(student, reference, aggregation, options.eps)
    if aggregation in ("pairwise", "stochastic_pairwise"):
        return _pairwise_row_cosines(student, reference, options.eps)
    a = _aggregate(student, "student", options, layer)
    b = _aggregate(reference, "reference", options, layer)
    if a.dim() == 2:  # (B, D): no spatial extent, each sample's vector is a row
        return _cosine_rows(a, b, options.eps)
    return _cosine_rows(a.reshape(a.shape[0] * a.shape[1], -1), b.reshape(b.shape[0] * b.shape[1], -1), options.eps)


def _check_anti_transfer_inputs(
    student: Tensor, reference: Tensor, options: AntiTransferOptions, layer: str | None = None
) -> None:
    """Raise naming the layer and the shapes unless `student` and `reference` suit `options`."""
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
    if options.distance == "cka" and options.aggregation != "stochastic_pairwise":
        return
    if student.shape != reference.shape:
        raise ValueError(
            f"'student' and 'reference' must have the same shape for distance={options.distance!r} and "
            f"aggregation={options.aggregation!r}{where}: got {tuple(student.shape)} and "
            f"{tuple(reference.shape)}; distance='cka' compares layers of different widths or sizes"
        )
    if student.dim() == 2 and options.aggregation in _SPATIAL_ONLY:
        raise ValueError(
            f"aggregation={options.aggregation!r} over the {student.shape[1]} features of a 2-D "
            f"{describe('student', layer)} (shape {tuple(student.shape)}) leaves one number per sample, whose "
            f"cosine is only its sign; use aggregation='none' or 'gram', or distance='cka'"
        )
