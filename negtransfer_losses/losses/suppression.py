"""`TaskIrrelevantSuppression`: keep features from carrying a factor the task must ignore (METHODS.md §2)."""

from __future__ import annotations

import math
import warnings
from typing import Literal, TypeAlias

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import NAN_POLICIES, NanPolicy, check_choice, guard_finite, zero_unless
from ..distributed import GATHERS, Gather
from ..functional.similarity import KERNELS, Kernel
from ..functional.suppression import adversarial_suppression, irrelevant_cka, irrelevant_hsic

SuppressionMethod: TypeAlias = Literal["adversarial", "hsic", "cka"]
SUPPRESSION_METHODS: tuple[SuppressionMethod, ...] = ("adversarial", "hsic", "cka")


class TaskIrrelevantSuppression(nn.Module):
    """`weight · penalty(z, u)`: a penalty on what the features `z` say about irrelevant labels `u`.

    - `"adversarial"`: a head `h` on gradient-reversed features, `CE(h(GRL_λ(z)), u)` over known labels
      (Ganin & Lempitsky 2015), optionally `+ entropy_weight · mean Σ p log p` of `h(z)` (Kim et al.,
      CVPR 2019). λ rises from 0 to `strength` over `warmup_steps` training calls with DANN's schedule
      `2 / (1 + exp(-10 t)) - 1`. **This module owns the head's parameters: give them to the optimizer**,
      e.g. `torch.optim.Adam([*model.parameters(), *suppression.parameters()])`. If they have not changed
      after `check_head_after` training calls, a warning says so.
    - `"hsic"`: unbiased `HSIC_1(z, onehot(u))`, linear (or RBF) kernel on `z`; `normalized=True` for the
      CKA-style ratio (ReBias, Bahng et al. 2020). No parameters.
    - `"cka"`: linear CKA between `z` and a frozen irrelevant network's features on the same batch
      (Kornblith et al. 2019). No parameters, no labels.

    None of these is claimed to be the exact mechanism of the TIRTL / PurifiedLearning papers (Li et al.),
    which was not published; see docs/task-irrelevant-labels.md.

    Forward: `(features, irrelevant_labels=None, irrelevant_features=None)` → scalar. Features `(B, D)` or
    maps (flattened). Labels equal to `ignore_index` are unknown; a batch with none known gives a zero loss
    and a zero gradient. `gather="global"` computes `hsic` and `cka` on every rank's batch concatenated
    (DDP; the adversarial loss is per sample and needs no gather). Non-finite features raise a `ValueError`
    (`nan_policy="raise"`), give a zero loss (`"skip"`), or pass through (`"propagate"`). After each call
    `last_terms` holds `{"loss", "value"}` (and `"strength"` for the adversarial method) as detached scalars.
    """

    steps: Tensor

    def __init__(
        self,
        method: SuppressionMethod = "hsic",
        num_irrelevant: int | None = None,
        *,
        weight: float = 1.0,
        dim: int | None = None,
        head: nn.Module | None = None,
        strength: float = 1.0,
        warmup_steps: int = 0,
        entropy_weight: float = 0.0,
        kernel: Kernel = "linear",
        normalized: bool = False,
        sigma: float | None = None,
        unbiased: bool = False,
        ignore_index: int = IGNORE_INDEX,
        check_head_after: int = 100,
        gather: Gather = "local",
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        check_choice(method, "method", SUPPRESSION_METHODS)
        check_choice(kernel, "kernel", KERNELS)
        check_choice(gather, "gather", GATHERS)
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        if method != "cka" and (not isinstance(num_irrelevant, int) or num_irrelevant < 1):
            raise ValueError(
                f"method={method!r} needs 'num_irrelevant', the number of irrelevant classes (an int ≥ 1), "
                f"got {num_irrelevant!r}"
            )
        if warmup_steps < 0:
            raise ValueError(f"'warmup_steps' must be ≥ 0, got {warmup_steps}")
        self.method: SuppressionMethod = method
        self.num_irrelevant = num_irrelevant
        self.weight = float(weight)
        self.strength = float(strength)
        self.warmup_steps = warmup_steps
        self.entropy_weight = float(entropy_weight)
        self.kernel: Kernel = kernel
        self.normalized = normalized
        self.sigma = sigma
        self.unbiased = unbiased
        self.ignore_index = ignore_index
        self.check_head_after = check_head_after
        self.gather: Gather = gather
        self.nan_policy: NanPolicy = nan_policy
        self.head: nn.Module | None = None
        if method == "adversarial":
            if head is None and dim is None:
                raise ValueError(
                    "method='adversarial' needs 'dim' (the flattened size of a sample's features) "
                    "for its linear head, or a 'head' module mapping (B, dim) to (B, num_irrelevant)"
                )
            assert num_irrelevant is not None
            self.head = head if head is not None else nn.Linear(int(dim), num_irrelevant)  # type: ignore[arg-type]
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._head_snapshot: list[Tensor] | None = None
        self.last_terms: dict[str, Tensor] = {}

    def current_strength(self) -> float:
        """λ of the gradient reversal at the current step (DANN warm-up schedule)."""
        if self.warmup_steps == 0:
            return self.strength
        progress = min(1.0, int(self.steps) / self.warmup_steps)
        return self.strength * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)

    def forward(
        self,
        features: Tensor,
        irrelevant_labels: Tensor | None = None,
        irrelevant_features: Tensor | None = None,
    ) -> Tensor:
        """The weighted penalty (scalar)."""
        inputs = {"features": features}
        if irrelevant_features is not None:
            inputs["irrelevant_features"] = irrelevant_features
        guarded, finite = guard_finite(inputs, self.nan_policy)
        features, irrelevant_features = guarded["features"], guarded.get("irrelevant_features")
        if self.method == "cka":
            if irrelevant_features is None:
                raise ValueError("method='cka' needs 'irrelevant_features': a frozen irrelevant network's features")
            value = irrelevant_cka(features, irrelevant_features, unbiased=self.unbiased, gather=self.gather)
            self.last_terms = {}
        else:
            if irrelevant_labels is None:
                raise ValueError(
                    f"method={self.method!r} needs 'irrelevant_labels' (use {self.ignore_index} for unknown ones)"
                )
            assert self.num_irrelevant is not None
            if self.method == "hsic":
                value = irrelevant_hsic(
                    features,
                    irrelevant_labels,
                    self.num_irrelevant,
                    self.kernel,
                    self.normalized,
                    self.sigma,
                    self.ignore_index,
                    self.gather,
                )
                self.last_terms = {}
            else:
                value = self._adversarial(features, irrelevant_labels)
        value = zero_unless(finite, value)
        loss = self.weight * value
        self.last_terms = {"loss": loss.detach(), "value": value.detach(), **self.last_terms}
        return loss

    def _adversarial(self, features: Tensor, labels: Tensor) -> Tensor:
        assert self.head is not None and self.num_irrelevant is not None
        strength = self.current_strength()
        if self.training:
            self._check_head_is_trained()
            self.steps += 1
        value = adversarial_suppression(
            features, labels, self.head, self.num_irrelevant, strength, self.entropy_weight, self.ignore_index
        )
        self.last_terms = {"strength": torch.tensor(strength)}
        return value

    def _check_head_is_trained(self) -> None:
        assert self.head is not None
        step = int(self.steps)
        if step == 0:
            self._head_snapshot = [p.detach().clone() for p in self.head.parameters()]
        elif step == self.check_head_after and self._head_snapshot is not None:
            unchanged = all(torch.equal(a, p) for a, p in zip(self._head_snapshot, self.head.parameters(), strict=True))
            self._head_snapshot = None
            if unchanged:
                warnings.warn(
                    f"the adversarial head's parameters have not changed in {step} training steps: add "
                    f"them to the optimizer, e.g. torch.optim.Adam([*model.parameters(), "
                    f"*suppression.parameters()])",
                    stacklevel=4,
                )

    def extra_repr(self) -> str:
        options = [f"method={self.method!r}", f"num_irrelevant={self.num_irrelevant}", f"weight={self.weight}"]
        if self.method == "adversarial":
            options += [f"strength={self.strength}", f"warmup_steps={self.warmup_steps}"]
            if self.entropy_weight:
                options.append(f"entropy_weight={self.entropy_weight}")
        if self.method == "hsic":
            options += [f"kernel={self.kernel!r}", f"normalized={self.normalized}"]
        return ", ".join(options)
