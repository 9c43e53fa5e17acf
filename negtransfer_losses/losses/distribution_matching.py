"""Multi-task losses coupling two tasks through a `TaskRelatedness` matrix (docs: Methods §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import NAN_POLICIES, NanPolicy, check_choice, guard_finite, zero_unless
from ..functional.distribution_matching import (
    DIRECTIONS,
    EPS,
    INVERSIONS,
    Direction,
    Divergence,
    Inversion,
    TaskKind,
    check_matching_options,
    masked_binary_cross_entropy,
    masked_cross_entropy,
    soft_co_annotation,
)
from ..ops.dispatch import Backend, check_backend
from ..ops.distribution_matching import matching_terms
from ..relatedness import TaskRelatedness


class _Coupled(nn.Module):
    """Holds `R` and `π` as buffers (moved by `.to()`, saved in the `state_dict`) and the task kind."""

    matrix: Tensor
    prior: Tensor

    def __init__(self, relatedness: TaskRelatedness, inversion: Inversion, nan_policy: NanPolicy = "raise") -> None:
        super().__init__()
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        self.nan_policy: NanPolicy = nan_policy
        if not isinstance(relatedness, TaskRelatedness):
            raise TypeError(f"'relatedness' must be a TaskRelatedness, got {type(relatedness).__name__}")
        check_choice(inversion, "inversion", INVERSIONS)
        if inversion == "product" and not bool((relatedness.matrix > 0).any()):
            raise ValueError("inversion='product' needs at least one class of task A with a non-zero row in R")
        self.kind: TaskKind = relatedness.kind
        self.inversion: Inversion = inversion
        self.register_buffer("matrix", relatedness.matrix.float())
        self.register_buffer("prior", relatedness.prior.float())
        self.last_terms: dict[str, Tensor] = {}

    def _guard(self, logits_a: Tensor, logits_b: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        guarded, finite = guard_finite({"logits_a": logits_a, "logits_b": logits_b}, self.nan_policy)
        return guarded["logits_a"], guarded["logits_b"], finite


class DistributionMatchingLoss(_Coupled):
    """`weight · (L_AB + L_BA)`: each task's prediction matches the distribution the other task implies.

    On every sample, labelled or not: `q_B = p_A R` for A→B, and `q_A` from `p_B` by naive Bayes
    (`inversion="bayes"`, the library's own) or the papers' product form (`"product"`) for B→A. Each term
    is a mean over samples (and attributes for a multilabel B). `divergence="kl"` is zero when the tasks
    agree; `"ce"` is the papers' cross-entropy form. Gradients reach both heads unless
    `detach_target=True`. After each call `last_terms` holds `"loss"` (weighted) and `"a_to_b"`, `"b_to_a"`
    (unweighted) for the directions computed. `backend` picks the
    fused Triton kernel (multilabel B, Bayes inversion) or the functional path; see `negtransfer_losses.ops`.
    Non-finite logits follow `nan_policy` (`"raise"`, `"skip"`, `"propagate"`).

    Forward: `(logits_a (N, K), logits_b (N, M))` → scalar.
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
        super().__init__(relatedness, inversion, nan_policy)
        self.backend: Backend = check_backend(backend)
        directions = tuple(directions)
        if not directions:
            raise ValueError("'directions' is empty: give 'a_to_b', 'b_to_a' or both")
        check_matching_options(self.kind, directions, inversion, divergence)
        self.directions: tuple[Direction, ...] = directions
        self.divergence: Divergence = divergence
        self.detach_target = detach_target
        self.weight = float(weight)
        self.eps = eps

    def forward(self, logits_a: Tensor, logits_b: Tensor) -> Tensor:
        logits_a, logits_b, finite = self._guard(logits_a, logits_b)
        terms = matching_terms(
            logits_a,
            logits_b,
            self.matrix,
            self.prior,
            self.kind,
            self.directions,
            self.inversion,
            self.divergence,
            self.detach_target,
            self.eps,
            self.backend,
        )
        terms = {name: zero_unless(finite, value) for name, value in terms.items()}
        loss = self.weight * sum(terms.values(), torch.zeros((), device=logits_a.device))
        self.last_terms = {"loss": loss.detach(), **{name: value.detach() for name, value in terms.items()}}
        return loss

    def extra_repr(self) -> str:
        return (
            f"K={self.matrix.shape[0]}, M={self.matrix.shape[1]}, kind={self.kind!r}, directions={self.directions}, "
            f"inversion={self.inversion!r}, divergence={self.divergence!r}, detach_target={self.detach_target}, "
            f"weight={self.weight}"
        )


class SoftCoAnnotationLoss(_Coupled):
    """`weight · (L_CA_A + L_CA_B)`: soft labels, from `R`, for the task a sample is not annotated for.

    An A-only sample with `a = k` gets task-B target `R[k, :]`; a B-only sample gets the task-A target
    inferred from its B labels (`inversion`). Forward: `(logits_a, logits_b, labels_a, labels_b)` → scalar,
    with labels as in `negtransfer_losses.functional.distribution_matching`. After each call `last_terms`
    holds `"loss"` (weighted), `"a"` and `"b"` (unweighted).
    """

    def __init__(
        self,
        relatedness: TaskRelatedness,
        *,
        weight: float = 1.0,
        inversion: Inversion = "bayes",
        ignore_index: int = IGNORE_INDEX,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__(relatedness, inversion, nan_policy)
        self.weight = float(weight)
        self.ignore_index = ignore_index

    def forward(self, logits_a: Tensor, logits_b: Tensor, labels_a: Tensor, labels_b: Tensor) -> Tensor:
        logits_a, logits_b, finite = self._guard(logits_a, logits_b)
        terms = soft_co_annotation(
            logits_a,
            logits_b,
            labels_a,
            labels_b,
            self.matrix,
            self.prior,
            self.kind,
            self.inversion,
            self.ignore_index,
        )
        terms = {name: zero_unless(finite, value) for name, value in terms.items()}
        loss = self.weight * (terms["a"] + terms["b"])
        self.last_terms = {"loss": loss.detach(), **{name: value.detach() for name, value in terms.items()}}
        return loss

    def extra_repr(self) -> str:
        return f"K={self.matrix.shape[0]}, M={self.matrix.shape[1]}, kind={self.kind!r}, inversion={self.inversion!r}"


class MultiTaskLoss(nn.Module):
    """`weight · (λ_A L_A + λ_B L_B + λ_DM (L_AB + L_BA) + λ_CA (L_CA_A + L_CA_B))` for two partially labelled tasks.

    `L_A`: cross-entropy over samples with a known A label; `L_B`: BCE over annotated B entries with
    FaceBehaviorNet's per-sample normalization (multilabel) or cross-entropy (multiclass). The λ are
    `supervised_a_weight`, `supervised_b_weight`, `matching_weight` and `co_annotation_weight` (all 1);
    set one to 0 to drop its term (0 for both couplings gives plain multi-task learning with masked
    losses). After each call `last_terms` holds `"loss"` (the total), `"supervised_a"`, `"supervised_b"`
    (unweighted), and the submodules' terms as `"matching/…"` and `"co_annotation/…"`. `nan_policy` and
    `backend` as in `DistributionMatchingLoss`.

    Forward: `(logits_a, logits_b, labels_a, labels_b)` → scalar.
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
        inversion: Inversion = "bayes",
        divergence: Divergence = "kl",
        detach_target: bool = False,
        ignore_index: int = IGNORE_INDEX,
        nan_policy: NanPolicy = "raise",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        self.nan_policy: NanPolicy = nan_policy
        self.kind: TaskKind = relatedness.kind
        self.weight = float(weight)
        self.term_weights = {
            "supervised_a": float(supervised_a_weight),
            "supervised_b": float(supervised_b_weight),
            "matching": float(matching_weight),
            "co_annotation": float(co_annotation_weight),
        }
        self.ignore_index = ignore_index
        # the NaN guard runs once, in forward; the parts see guarded logits
        self.matching = DistributionMatchingLoss(
            relatedness,
            inversion=inversion,
            divergence=divergence,
            detach_target=detach_target,
            nan_policy="propagate",
            backend=backend,
        )
        self.co_annotation = SoftCoAnnotationLoss(
            relatedness, inversion=inversion, ignore_index=ignore_index, nan_policy="propagate"
        )
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, logits_a: Tensor, logits_b: Tensor, labels_a: Tensor, labels_b: Tensor) -> Tensor:
        guarded, finite = guard_finite({"logits_a": logits_a, "logits_b": logits_b}, self.nan_policy)
        logits_a, logits_b = guarded["logits_a"], guarded["logits_b"]
        w = self.term_weights
        supervised_a = masked_cross_entropy(logits_a, labels_a, self.ignore_index)
        if self.kind == "multilabel":
            supervised_b = masked_binary_cross_entropy(logits_b, labels_b)
        else:
            supervised_b = masked_cross_entropy(logits_b, labels_b, self.ignore_index)
        total = w["supervised_a"] * supervised_a + w["supervised_b"] * supervised_b
        terms = {"supervised_a": supervised_a, "supervised_b": supervised_b}
        if w["matching"]:
            total = total + w["matching"] * self.matching(logits_a, logits_b)
            terms.update({f"matching/{k}": v for k, v in self.matching.last_terms.items()})
        if w["co_annotation"]:
            total = total + w["co_annotation"] * self.co_annotation(logits_a, logits_b, labels_a, labels_b)
            terms.update({f"co_annotation/{k}": v for k, v in self.co_annotation.last_terms.items()})
        total = zero_unless(finite, self.weight * total)
        terms = {name: zero_unless(finite, value).detach() for name, value in terms.items()}
        self.last_terms = {"loss": total.detach(), **terms}
        return total

    def extra_repr(self) -> str:
        weights = ", ".join(f"{name}_weight={value}" for name, value in self.term_weights.items())
        return f"weight={self.weight}, {weights}"
