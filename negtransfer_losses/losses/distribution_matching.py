"""Multi-task losses coupling two tasks through a `TaskRelatedness` matrix (docs: Methods §3).

`last_terms`, after each call (the package's one layout): `"loss"` is what the module returned; each
`"{part}/loss"` is that part's weighted contribution to it, so the parts at one level add up to their
parent (`"{part}/{sub}/loss"` add up to `"{part}/loss"`); `"{part}/value"` is the part's unweighted value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import (
    NAN_POLICIES,
    NanPolicy,
    check_choice,
    full_precision,
    guard_finite,
    zero_unless,
)
from ..functional import DIRECTIONS, BToAGate, Direction, Divergence, Inversion, TaskKind
from ..functional._core import (
    EPS,
    MatchingOptions,
    check_b_to_a_gate,
    check_heads,
    co_annotation_unchecked,
    task_labels,
)
from ..ops import Backend
from ..ops._core import check_backend, matching_terms, multi_task_parts
from ..relatedness import TaskRelatedness

_COUPLINGS = ("matching", "co_annotation")


def _parts(weight: float, values: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`{"{part}/loss": weight · value, "{part}/value": value}` (detached) for logging."""
    terms: dict[str, Tensor] = {}
    for part, value in values.items():
        terms[f"{part}/loss"] = (weight * value).detach()
        terms[f"{part}/value"] = value.detach()
    return terms


class _Coupled(nn.Module):
    """Holds `R` and `π` as buffers (moved by `.to()`, saved in the `state_dict`), the task kind, the
    matching options (resolved once) and the NaN policy."""

    matrix: Tensor
    prior: Tensor

    def __init__(self, relatedness: TaskRelatedness, options: MatchingOptions, nan_policy: NanPolicy) -> None:
        super().__init__()
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        if options.inversion == "product" and not bool((relatedness.matrix > 0).any()):
            raise ValueError("inversion='product' needs at least one class of task A with a non-zero row in R")
        self.nan_policy: NanPolicy = nan_policy
        self._options = options
        self.register_buffer("matrix", relatedness.matrix.float())
        self.register_buffer("prior", relatedness.prior.float())
        self.last_terms: dict[str, Tensor] = {}

    @property
    def kind(self) -> TaskKind:
        """Task B's kind, from the `TaskRelatedness`."""
        return self._options.kind

    @property
    def inversion(self) -> Inversion:
        """How B→A inverts `R`: `"bayes"` or `"product"`."""
        return self._options.inversion

    @property
    def eps(self) -> float:
        """The clamp of probabilities inside logarithms."""
        return self._options.eps

    def _guard(self, logits_a: Tensor, logits_b: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        guarded, finite = guard_finite({"logits_a": logits_a, "logits_b": logits_b}, self.nan_policy)
        return guarded["logits_a"], guarded["logits_b"], finite


class _Matching(_Coupled):
    """A coupled loss with distribution-matching terms: their options, readable."""

    @property
    def directions(self) -> tuple[Direction, ...]:
        """The matching terms computed: `"a_to_b"`, `"b_to_a"` or both."""
        return self._options.directions

    @property
    def divergence(self) -> Divergence:
        """`"kl"` or `"ce"`: how each matching direction is measured."""
        return self._options.divergence

    @property
    def detach_target(self) -> bool:
        """Whether the matching terms' inferred distributions are constants."""
        return self._options.detach_target


def _relatedness(relatedness: object) -> TaskRelatedness:
    if not isinstance(relatedness, TaskRelatedness):
        raise TypeError(
            f"'relatedness' must be a TaskRelatedness, got {type(relatedness).__name__}; build one with "
            f"TaskRelatedness(matrix, kind=..., prior=...), .from_table or .estimate"
        )
    return relatedness


class DistributionMatchingLoss(_Matching):
    """`weight · (L_AB + L_BA)`: each task's prediction matches the distribution the other task implies.

    On every sample, labelled or not: `q_B = p_A R` for A→B, and `q_A` from `p_B` by naive Bayes
    (`inversion="bayes"`, the library's own) or the papers' product form (`"product"`) for B→A. Each term
    is a mean over samples (and attributes for a multilabel B), as in
    `negtransfer_losses.functional.distribution_matching`. `divergence="kl"` is zero when the tasks
    agree; `"ce"` is the papers' cross-entropy form. Gradients reach both heads unless `detach_target=True`.

    After each call `last_terms` holds `"loss"` (the output), and for each direction computed
    `"{direction}/loss"` (its weighted contribution: they add up to `"loss"`) and `"{direction}/value"`
    (unweighted), `direction` in `"a_to_b"`, `"b_to_a"`.

    Args:
        relatedness: the `TaskRelatedness` (`R`, `π` and task B's kind); kept as buffers `matrix`, `prior`.
        weight: the coupling's weight `λ_DM`.
        directions: which terms: `"a_to_b"`, `"b_to_a"` or both.
        inversion: `"bayes"` or `"product"`.
        divergence: `"kl"` or `"ce"`.
        detach_target: treat the inferred distributions as constants.
        eps: the clamp of probabilities inside logarithms (and of `R` in `"bayes"`).
        nan_policy: non-finite logits `"raise"` a `ValueError`, `"skip"` the batch (zero loss, zero
            gradient), or `"propagate"`.
        backend: `"auto"`, `"torch"` or `"triton"`: the fused kernel (multilabel B, Bayes inversion) or the
            functional path; see `negtransfer_losses.ops`.

    Raises:
        TypeError: `relatedness` is not a `TaskRelatedness`.
        ValueError: an option is not one of its choices, `directions` is empty, or `inversion="product"`
            with no non-zero row in `R`.
    """

    def __init__(
        self,
        relatedness: TaskRelatedness,
        *,
        weight: float = 1.0,
        directions: Sequence[Direction] = DIRECTIONS,
        inversion: Inversion = "bayes",
        divergence: Divergence = "kl",
        detach_target: bool = False,
        eps: float = EPS,
        nan_policy: NanPolicy = "raise",
        backend: Backend = "auto",
    ) -> None:
        relatedness = _relatedness(relatedness)
        options = MatchingOptions.resolve(
            kind=relatedness.kind,
            directions=directions,
            inversion=inversion,
            divergence=divergence,
            detach_target=detach_target,
            eps=eps,
        )
        super().__init__(relatedness, options, nan_policy)
        self.backend: Backend = check_backend(backend)
        self.weight = float(weight)

    def forward(self, logits_a: Tensor, logits_b: Tensor) -> Tensor:
        """The weighted matching loss.

        Args:
            logits_a: `(N, K)` task A's logits.
            logits_b: `(N, M)` task B's logits.

        Returns:
            a scalar, float32 (float64 for float64 logits).

        Raises:
            TypeError: the logits are not floating-point tensors.
            ValueError: the shapes do not fit `R`, or the logits hold NaN/inf with `nan_policy="raise"`.
        """
        logits_a, logits_b, finite = self._guard(logits_a, logits_b)
        terms = matching_terms(logits_a, logits_b, self.matrix, self.prior, self._options, backend=self.backend)
        values: dict[str, Tensor] = {name: zero_unless(finite, value) for name, value in terms.items()}
        loss = self.weight * sum(values.values(), torch.zeros((), device=logits_a.device))
        self.last_terms = {"loss": loss.detach(), **_parts(self.weight, values)}
        return loss

    def extra_repr(self) -> str:
        o = self._options
        return (
            f"K={self.matrix.shape[0]}, M={self.matrix.shape[1]}, kind={o.kind!r}, directions={o.directions}, "
            f"inversion={o.inversion!r}, divergence={o.divergence!r}, detach_target={o.detach_target}, "
            f"weight={self.weight}"
        )


class SoftCoAnnotationLoss(_Coupled):
    """`weight · (L_CA_A + L_CA_B)`: soft labels, from `R`, for the task a sample is not annotated for.

    An A-only sample with `a = k` gets task-B target `R[k, :]`; a B-only sample gets the task-A target
    inferred from its B labels (`inversion`), as in `negtransfer_losses.functional.soft_co_annotation`.

    After each call `last_terms` holds `"loss"` (the output), `"a/loss"`, `"b/loss"` (each term's weighted
    contribution: they add up to `"loss"`) and `"a/value"`, `"b/value"` (unweighted).

    Args:
        relatedness: the `TaskRelatedness` (`R`, `π` and task B's kind); kept as buffers `matrix`, `prior`.
        weight: the term's weight `λ_CA`.
        inversion: `"bayes"` or `"product"`: how a B-only sample's labels give its task-A target.
        ignore_index: the label of samples whose class is unknown.
        eps: the clamp of probabilities inside logarithms.
        nan_policy: non-finite logits `"raise"`, `"skip"` the batch, or `"propagate"`.

    Raises:
        TypeError: `relatedness` is not a `TaskRelatedness`.
        ValueError: an option is not one of its choices, or `inversion="product"` with no non-zero row in `R`.
    """

    def __init__(
        self,
        relatedness: TaskRelatedness,
        *,
        weight: float = 1.0,
        inversion: Inversion = "bayes",
        ignore_index: int = IGNORE_INDEX,
        eps: float = EPS,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        relatedness = _relatedness(relatedness)
        options = MatchingOptions.resolve(kind=relatedness.kind, inversion=inversion, eps=eps)
        super().__init__(relatedness, options, nan_policy)
        self.weight = float(weight)
        self.ignore_index = ignore_index

    def forward(self, logits_a: Tensor, logits_b: Tensor, labels_a: Tensor, labels_b: Tensor) -> Tensor:
        """The weighted co-annotation loss.

        Args:
            logits_a: `(N, K)` task A's logits.
            logits_b: `(N, M)` task B's logits.
            labels_a: `(N,)` integers, `ignore_index` where unknown.
            labels_b: `(N, M)` multilabel entries (NaN or -1 where unknown) or `(N,)` multiclass labels.

        Returns:
            a scalar, float32 (float64 for float64 logits).

        Raises:
            TypeError: an input has the wrong type.
            ValueError: a shape does not fit `R`, a label is out of range, or the logits hold NaN/inf with
                `nan_policy="raise"`.
        """
        logits_a, logits_b, finite = self._guard(logits_a, logits_b)
        check_heads(logits_a, logits_b, self.matrix)
        labels = task_labels(labels_a, labels_b, logits_a, self.matrix, self.kind, self.ignore_index)
        with full_precision(logits_a, logits_b):
            terms = co_annotation_unchecked(logits_a, logits_b, labels, self.matrix, self.prior, self._options)
        values = {name: zero_unless(finite, value) for name, value in terms.items()}
        loss = self.weight * (values["a"] + values["b"])
        self.last_terms = {"loss": loss.detach(), **_parts(self.weight, values)}
        return loss

    def extra_repr(self) -> str:
        return (
            f"K={self.matrix.shape[0]}, M={self.matrix.shape[1]}, kind={self.kind!r}, "
            f"inversion={self.inversion!r}, weight={self.weight}"
        )


class MultiTaskLoss(_Matching):
    """`weight · (λ_A L_A + λ_B L_B + λ_DM (L_AB + L_BA) + λ_CA (L_CA_A + L_CA_B))` for two partially labelled tasks.

    `L_A`: cross-entropy over samples with a known A label; `L_B`: BCE over annotated B entries with
    FaceBehaviorNet's per-sample normalization (multilabel) or cross-entropy (multiclass); `L_AB`, `L_BA`
    as in `DistributionMatchingLoss`; `L_CA_A`, `L_CA_B` as in `SoftCoAnnotationLoss`. Each label tensor is
    checked once per call. Set a `λ` to 0 to drop its term (0 for both couplings gives plain multi-task
    learning with masked losses).

    After each call `last_terms` holds `"loss"` (the output) and, for each part computed,
    `"{part}/loss"` (its weighted contribution: the parts add up to `"loss"`) and `"{part}/value"`
    (unweighted), `part` in `"supervised_a"`, `"supervised_b"`, `"matching"`, `"co_annotation"`; the
    couplings' own terms follow, as `"matching/a_to_b/loss"` (weighted contribution to the output: they
    add up to `"matching/loss"`), `"matching/a_to_b/value"`, ..., `"co_annotation/a/loss"`, ....

    Args:
        relatedness: the `TaskRelatedness` (`R`, `π` and task B's kind); kept as buffers `matrix`, `prior`.
        weight: the whole loss's weight.
        matching_weight: `λ_DM`.
        co_annotation_weight: `λ_CA`.
        supervised_a_weight: `λ_A`.
        supervised_b_weight: `λ_B`.
        directions: the matching terms: `"a_to_b"`, `"b_to_a"` or both.
        inversion: `"bayes"` or `"product"` (matching and co-annotation).
        divergence: `"kl"` or `"ce"` (matching).
        detach_target: treat the inferred distributions of the matching terms as constants.
        eps: the clamp of probabilities inside logarithms.
        ignore_index: the label of samples whose class is unknown.
        b_to_a_gate: None (`L_BA` at full weight), or `"label_advantage"`: `L_BA` scaled, on each batch, by
            `max(0, n_B − n_A) / (n_A + n_B)` with `n_A`, `n_B` the samples carrying a label of each task
            (`negtransfer_losses.functional.label_advantage`). The setting the docs lead with: it kept either
            task from falling below its single-task model in every label regime measured (docs: Distribution
            matching).
        nan_policy: non-finite logits `"raise"`, `"skip"` the batch, or `"propagate"`.
        backend: `"auto"`, `"torch"` or `"triton"` for the matching terms; see `negtransfer_losses.ops`.

    Raises:
        TypeError: `relatedness` is not a `TaskRelatedness`.
        ValueError: an option is not one of its choices, `directions` is empty, `inversion="product"` with no
            non-zero row in `R`, or `b_to_a_gate` is set without the B→A matching term (`matching_weight=0` or
            `directions` without `"b_to_a"`).
    """

    def __init__(
        self,
        relatedness: TaskRelatedness,
        *,
        weight: float = 1.0,
        matching_weight: float = 1.0,
        co_annotation_weight: float = 1.0,
        supervised_a_weight: float = 1.0,
        supervised_b_weight: float = 1.0,
        directions: Sequence[Direction] = DIRECTIONS,
        inversion: Inversion = "bayes",
        divergence: Divergence = "kl",
        detach_target: bool = False,
        eps: float = EPS,
        ignore_index: int = IGNORE_INDEX,
        b_to_a_gate: BToAGate | None = None,
        nan_policy: NanPolicy = "raise",
        backend: Backend = "auto",
    ) -> None:
        relatedness = _relatedness(relatedness)
        options = MatchingOptions.resolve(
            kind=relatedness.kind,
            directions=directions,
            inversion=inversion,
            divergence=divergence,
            detach_target=detach_target,
            eps=eps,
        )
        super().__init__(relatedness, options, nan_policy)
        self.backend: Backend = check_backend(backend)
        self.weight = float(weight)
        self.term_weights = {
            "supervised_a": float(supervised_a_weight),
            "supervised_b": float(supervised_b_weight),
            "matching": float(matching_weight),
            "co_annotation": float(co_annotation_weight),
        }
        self.ignore_index = ignore_index
        self.b_to_a_gate: BToAGate | None = check_b_to_a_gate(b_to_a_gate, options, self._wanted_parts())

    def _wanted_parts(self) -> tuple[str, ...]:
        """The supervised parts and the couplings whose weight is not 0."""
        return ("supervised_a", "supervised_b", *(name for name in _COUPLINGS if self.term_weights[name]))

    def forward(self, logits_a: Tensor, logits_b: Tensor, labels_a: Tensor, labels_b: Tensor) -> Tensor:
        """The weighted multi-task loss.

        Args:
            logits_a: `(N, K)` task A's logits.
            logits_b: `(N, M)` task B's logits.
            labels_a: `(N,)` integers, `ignore_index` where unknown.
            labels_b: `(N, M)` multilabel entries (NaN or -1 where unknown) or `(N,)` multiclass labels.

        Returns:
            a scalar, float32 (float64 for float64 logits).

        Raises:
            TypeError: an input has the wrong type.
            ValueError: a shape does not fit `R`, a label is out of range, or the logits hold NaN/inf with
                `nan_policy="raise"`.
        """
        parts, nested = self._unweighted(logits_a, logits_b, labels_a, labels_b)
        weighted = {name: self.weight * self.term_weights[name] * value for name, value in parts.items()}
        total = sum(weighted.values(), torch.zeros((), device=logits_a.device))
        logged = {"loss": total.detach()}
        for name, value in parts.items():
            scale = self.weight * self.term_weights[name]
            logged.update(_parts(scale, {name: value}))
            if name in nested:
                logged.update({f"{name}/{key}": term for key, term in _parts(scale, nested[name]).items()})
        self.last_terms = logged
        return total

    def terms(self, logits_a: Tensor, logits_b: Tensor, labels_a: Tensor, labels_b: Tensor) -> dict[str, Tensor]:
        """The loss's weighted parts, each differentiable: their sum is what `forward` returns.

        For a multi-objective optimizer that takes the parts as separate losses (e.g. Jacobian descent over
        every parameter, `torchjd.autojac.backward(list(parts.values()), inputs=params)`: the couplings share
        both heads, so `mtl_backward`, which needs each objective's head to be its own, does not apply;
        docs/distribution-matching.md).

        Args:
            logits_a: `(N, K)` task A's logits.
            logits_b: `(N, M)` task B's logits.
            labels_a: `(N,)` integers, `ignore_index` where unknown.
            labels_b: `(N, M)` multilabel entries (NaN or -1 where unknown) or `(N,)` multiclass labels.

        Returns:
            `{part: weight · λ_part · value}` for `"supervised_a"`, `"supervised_b"` and the couplings whose
            weight is not 0 (`"matching"`, `"co_annotation"`), in that order. `last_terms` is not changed.

        Raises:
            TypeError: an input has the wrong type.
            ValueError: a shape does not fit `R`, a label is out of range, or the logits hold NaN/inf with
                `nan_policy="raise"`.
        """
        parts, _ = self._unweighted(logits_a, logits_b, labels_a, labels_b)
        return {name: self.weight * self.term_weights[name] * value for name, value in parts.items()}

    def _unweighted(
        self, logits_a: Tensor, logits_b: Tensor, labels_a: Tensor, labels_b: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        """The parts' unweighted values (a coupling: the sum of its terms) and the couplings' own terms; zero
        with a zero gradient for a batch skipped as non-finite."""
        logits_a, logits_b, finite = self._guard(logits_a, logits_b)
        flat = multi_task_parts(
            logits_a,
            logits_b,
            labels_a,
            labels_b,
            self.matrix,
            self.prior,
            self._options,
            parts=self._wanted_parts(),
            ignore_index=self.ignore_index,
            backend=self.backend,
            b_to_a_gate=self.b_to_a_gate,
        )
        parts: dict[str, Tensor] = {}
        nested: dict[str, dict[str, Tensor]] = {}
        for key, value in flat.items():
            name, _, term = key.partition("/")
            if term:
                nested.setdefault(name, {})[term] = zero_unless(finite, value)
            else:
                parts[name] = zero_unless(finite, value)
        for name, terms in nested.items():
            parts[name] = sum(terms.values(), torch.zeros((), device=logits_a.device))
        return parts, nested

    def extra_repr(self) -> str:
        o = self._options
        weights = ", ".join(f"{name}_weight={value}" for name, value in self.term_weights.items())
        return (
            f"K={self.matrix.shape[0]}, M={self.matrix.shape[1]}, kind={o.kind!r}, weight={self.weight}, {weights}, "
            f"directions={o.directions}, inversion={o.inversion!r}, divergence={o.divergence!r}, "
            f"detach_target={o.detach_target}, b_to_a_gate={self.b_to_a_gate!r}"
        )
