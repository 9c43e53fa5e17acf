"""`AntiTransferLoss`: the anti-transfer penalty over any number of layers (docs: Methods §1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .._validation import NanPolicy
from ..distributed import Gather
from ..functional import AntiTransferAggregation, Distance, GramScope
from ..functional._core import AntiTransferOptions
from ..ops import Backend
from ..ops._core import anti_transfer_terms_for, check_backend
from ._checkpoints import LoadsOlderCheckpoints
from ._features import Features, pair_features


class AntiTransferLoss(LoadsOlderCheckpoints):
    """`weight · Σ_l w_l · L_AT(S_l, R_l)`: penalize the student's similarity to a frozen irrelevant network.

    ```python
    at = AntiTransferLoss(aggregation="gram", distance="cos_squared", weight=1.0)
    loss = task_loss + at(tap.pop(), frozen(x))   # dicts matched by layer name, or two tensors
    at.last_terms["layer3/similarity"]             # for logging
    ```

    `weight` (β) is applied once. The authors' standalone `ATLoss` multiplies β twice for
    `cos_squared` (an effective β²); their research code, and this library, apply it once.

    After each call `last_terms` (the package's one layout: a flat dict of detached scalars) holds `"loss"`
    (the weighted total) and, per layer, `"{layer}/loss"` (its weighted contribution), `"{layer}/similarity"`
    (raw similarity: mean |cos| of the rows, the CKA value or the MSE) and `"{layer}/student_norm"` (mean
    L2 norm of a student sample's features: the collapse signal, since zero rows give zero cosine).
    Nothing of the reference side is kept.

    Args:
        aggregation: `"none"`, `"mean"`, `"sum"`, `"max"`, `"mul"`, `"gram"`, `"pairwise"` or
            `"stochastic_pairwise"`, as in `negtransfer_losses.functional.anti_transfer`.
        distance: `"cos_squared"`, `"cos"`, `"mse_sigmoid"` or `"cka"`.
        weight: β, the penalty's weight.
        gram_scope: `"batch"` (the authors' form) or `"sample"`, for `aggregation="gram"` only; None takes
            `"batch"`, or `"sample"` for `distance="cka"`.
        layer_weights: optional `{layer: w_l}`; layers not named get 1.
        eps: floor of the row norms in the cosine distances, in the rows' own units (as in
            `functional.anti_transfer`).
        mul_exponent: `p` of the `"mul"` aggregation (for it only; None takes 0.001).
        generator: draws the channel window of `"stochastic_pairwise"` (torch's default when None).
        nan_policy: `"raise"`, `"skip"` or `"propagate"` for non-finite features.
        gather: `"global"` computes each layer's loss on every rank's batch concatenated (DDP).
        backend: `"auto"`, `"torch"` or `"triton"`; see `negtransfer_losses.ops`.

    Returns:
        called as `at(student, reference)` (two `{layer: tensor}` dicts matched by key, or two tensors), the
        weighted scalar loss.

    Raises:
        ValueError: for an option that is not valid or does not apply to the chosen aggregation and distance
            (e.g. `gram_scope` without `"gram"`); when called, for dicts whose layers differ, shapes that do
            not match, or non-finite features under `nan_policy="raise"` (naming the layer).
        TypeError: when called with inputs that are not floating-point tensors (or dicts of them).
    """

    def __init__(
        self,
        *,
        aggregation: AntiTransferAggregation = "gram",
        distance: Distance = "cos_squared",
        weight: float = 1.0,
        gram_scope: GramScope | None = None,
        layer_weights: Mapping[str, float] | None = None,
        eps: float = 1e-8,
        mul_exponent: float | None = None,
        nan_policy: NanPolicy = "raise",
        gather: Gather = "local",
        backend: Backend = "auto",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.options = AntiTransferOptions.resolve(
            aggregation, distance, gram_scope, eps, mul_exponent, nan_policy, gather
        )
        self.weight = float(weight)
        self.layer_weights = dict(layer_weights or {})
        self.backend: Backend = check_backend(backend)
        self.generator = generator
        self.last_terms: dict[str, Tensor] = {}

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
        terms: dict[str, Tensor] = {}
        for name, s, r in pairs:
            layer_terms = anti_transfer_terms_for(
                s, r, self.options, layer=name, generator=self.generator, backend=self.backend
            )
            weighted = self.weight * self.layer_weights.get(name, 1.0) * layer_terms.loss
            terms[f"{name}/loss"] = weighted.detach()
            terms[f"{name}/similarity"] = layer_terms.similarity
            terms[f"{name}/student_norm"] = layer_terms.student_norm
            total = weighted if total is None else total + weighted
        assert total is not None  # pair_features never returns an empty list
        self.last_terms = {"loss": total.detach(), **terms}
        return total

    def get_extra_state(self) -> dict[str, Tensor]:
        """What `state_dict` saves beside the (absent) parameters: the state of a `generator` you passed, so
        that a resumed run draws the same `"stochastic_pairwise"` windows as the uninterrupted one."""
        return {} if self.generator is None else {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state: Any) -> None:
        """Restore the generator's state from `get_extra_state` (nothing without a generator)."""
        if self.generator is not None and isinstance(state, dict) and "generator_state" in state:
            self.generator.set_state(state["generator_state"])

    def _older_checkpoint_defaults(self) -> dict[str, Any]:
        # a checkpoint written before the generator's state was saved has no extra state: it loads as it did
        return {"_extra_state": {}}

    def extra_repr(self) -> str:
        options = self.options
        scope = f", gram_scope={options.gram_scope!r}" if options.gram_scope is not None else ""
        layers = f", layer_weights={self.layer_weights}" if self.layer_weights else ""
        return (
            f"aggregation={options.aggregation!r}, distance={options.distance!r}{scope}, weight={self.weight}{layers}"
        )

    @property
    def aggregation(self) -> AntiTransferAggregation:
        return self.options.aggregation

    @property
    def distance(self) -> Distance:
        return self.options.distance

    @property
    def gram_scope(self) -> GramScope | None:
        return self.options.gram_scope
