"""`AntiTransferLoss`: the anti-transfer penalty over any number of layers (METHODS.md §1)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from .._validation import NanPolicy, check_choice
from ..distributed import GATHERS, Gather
from ..functional.anti_transfer import (
    AntiTransferAggregation,
    Distance,
    anti_transfer_terms,
    check_anti_transfer_options,
)
from ..functional.similarity import GramScope
from ..ops import BACKENDS, Backend
from ._features import Features, pair_features


class AntiTransferLoss(nn.Module):
    """`weight · Σ_l w_l · L_AT(S_l, R_l)`: penalize the student's similarity to a frozen irrelevant network.

    ```python
    at = AntiTransferLoss(aggregation="gram", distance="cos_squared", weight=1.0)
    loss = task_loss + at(tap.pop(), frozen(x))   # dicts matched by layer name, or two tensors
    at.last_terms["layer3"]["similarity"]          # for logging
    ```

    `weight` (β) is applied once. The authors' standalone `ATLoss` multiplies β twice for
    `cos_squared` (an effective β²); their research code, and this library, apply it once.

    After each call `last_terms` maps every layer to detached scalars: `"similarity"` (raw similarity:
    mean |cos| of the rows, the CKA value or the MSE), `"loss"` (that layer's weighted contribution) and
    `"student_norm"` (mean L2 norm of a student sample's features: the collapse signal, since zero rows
    give zero cosine). Nothing of the reference side is kept.

    Args:
        aggregation: `"none"`, `"mean"`, `"sum"`, `"max"`, `"mul"` or `"gram"`, as in
            `negtransfer_losses.functional.anti_transfer`.
        distance: `"cos_squared"`, `"cos"`, `"mse_sigmoid"` or `"cka"`.
        weight: β, the penalty's weight.
        gram_scope: `"batch"` (the authors' form) or `"sample"`.
        layer_weights: optional `{layer: w_l}`; layers not named get 1.
        eps: floor of the row norms in the cosine distances.
        mul_exponent: `p` of the `"mul"` aggregation.
        nan_policy: `"raise"`, `"skip"` or `"propagate"` for non-finite features.
        gather: `"global"` computes each layer's loss on every rank's batch concatenated (DDP).
        backend: `"auto"`, `"torch"` or `"triton"`; see `negtransfer_losses.ops`.
    """

    def __init__(
        self,
        aggregation: AntiTransferAggregation = "gram",
        distance: Distance = "cos_squared",
        weight: float = 1.0,
        gram_scope: GramScope = "batch",
        layer_weights: Mapping[str, float] | None = None,
        *,
        eps: float = 1e-8,
        mul_exponent: float = 0.001,
        nan_policy: NanPolicy = "raise",
        gather: Gather = "local",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_anti_transfer_options(aggregation, distance, gram_scope, nan_policy)
        self.aggregation: AntiTransferAggregation = aggregation
        self.distance: Distance = distance
        self.weight = float(weight)
        self.gram_scope: GramScope = gram_scope
        self.layer_weights = dict(layer_weights or {})
        self.eps = eps
        self.mul_exponent = mul_exponent
        self.nan_policy: NanPolicy = nan_policy
        check_choice(gather, "gather", GATHERS)
        self.gather: Gather = gather
        check_choice(backend, "backend", BACKENDS)
        self.backend: Backend = backend
        self.last_terms: dict[str, dict[str, Tensor]] = {}

    def forward(self, student: Features, reference: Features) -> Tensor:
        """The weighted penalty summed over layers; `student` and `reference` are dicts or tensors."""
        pairs = pair_features(student, reference)
        unknown = sorted(set(self.layer_weights) - {name for name, _, _ in pairs})
        if unknown:
            raise ValueError(
                f"'layer_weights' names layer(s) {unknown} that are not among the features "
                f"{[name for name, _, _ in pairs]}"
            )
        total: Tensor | None = None
        terms: dict[str, dict[str, Tensor]] = {}
        for name, s, r in pairs:
            layer_terms = anti_transfer_terms(
                s,
                r,
                self.aggregation,
                self.distance,
                self.gram_scope,
                self.eps,
                mul_exponent=self.mul_exponent,
                nan_policy=self.nan_policy,
                layer=name,
                gather=self.gather,
                backend=self.backend,
            )
            weighted = self.weight * self.layer_weights.get(name, 1.0) * layer_terms.loss
            terms[name] = {
                "similarity": layer_terms.similarity,
                "loss": weighted.detach(),
                "student_norm": layer_terms.student_norm,
            }
            total = weighted if total is None else total + weighted
        self.last_terms = terms
        assert total is not None  # pair_features never returns an empty list
        return total

    def extra_repr(self) -> str:
        scope = f", gram_scope={self.gram_scope!r}" if self.aggregation == "gram" else ""
        layers = f", layer_weights={self.layer_weights}" if self.layer_weights else ""
        return f"aggregation={self.aggregation!r}, distance={self.distance!r}{scope}, weight={self.weight}{layers}"
