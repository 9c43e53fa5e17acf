"""`AdversarialSuppression`: a head that predicts task-irrelevant labels, played against the features.

Formulas: docs/task-irrelevant-labels.md. Its head's own optimizer and the watch on yours: `_adversary_head.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import NanPolicy, guard_finite, value_checks_run
from ..distributed import average_gradients_across_ranks, is_distributed
from ..functional._core import DEFAULT_STRENGTH, adversarial_batch, adversarial_loss
from ._adversary_head import HeadAdam, HeadWatch, own_head_steps
from ._base import SuppressionLoss, check_count


class AdversarialSuppression(SuppressionLoss):
    """`weight · CE(h(GRL_λ(z)), u)`: a head `h` learns to predict the irrelevant labels `u`, the features unlearn them.

    The cross-entropy of a head `h` (linear by default) on gradient-reversed features, over the samples whose
    `u` is known (Ganin & Lempitsky 2015), optionally plus the entropy term of Kim et al. (CVPR 2019):

        L = weight · [ Σ_i w_i CE(h(GRL_λ(z_i)), u_i) / max(Σ_i w_i, 1)  +  λ_ent · mean_i Σ_k p_ik log p_ik ]

    with `w_i = 1` where `u_i` is known. λ rises from 0 to `strength` over `warmup_steps` training calls with
    DANN's schedule `λ = strength · (2 / (1 + exp(-10 t)) - 1)`, `t = min(steps / warmup_steps, 1)`, on the
    device. **Conditional** (the library's own) removes only what `u` says beyond the task label `y`: the head
    sees the features centred within their task class and its logits are offset by the batch's within-class
    log-prior `log p̂(u | y)` (see `negtransfer_losses.functional.adversarial_suppression`).

    **Give the head to your optimizer through `parameter_groups`** (its learning rate `head_lr_multiplier`
    times yours, so that it keeps up with the encoder)::

        adversary = ntl.AdversarialSuppression(num_irrelevant=10, dim=256)
        optimizer = torch.optim.Adam([{"params": model.parameters()}, *adversary.parameter_groups(lr)], lr=lr)

    A `head` you pass is used as it is; if your optimizer has not moved it after `check_head_after` training
    calls, a warning says so (read without making the host wait; not while `torch.compile` traces).

    **Before each training call's loss, the head takes `head_steps` Adam steps of its own** on the batch's
    detached features, at `head_lr × head_lr_multiplier`, so the features are pushed against a head that has
    caught up with them. `head_optimizer` (a `HeadAdam`) takes them; its state is in the `state_dict`, so a
    resumed run continues as the uninterrupted one. A batch with no known label (or skipped as non-finite)
    leaves the head and that state unchanged. Hence in training the value is that of the head after its own
    steps; in eval mode, or with `head_steps=0`, it is `weight ×` the functional form's.

    **Under `torch.distributed`** the ranks' heads stay equal: the own steps follow the ranks' batches together
    (one all-reduce per step), and the gradient your optimizer gets for the head is averaged over ranks, as DDP
    does for the model. Every rank must call the module on every training step.

    Not claimed to be the exact mechanism of the TIRTL / PurifiedLearning papers (Li et al.), which was not
    published; see docs/task-irrelevant-labels.md.

    Args:
        num_irrelevant: number of irrelevant classes `K` (≥ 1).
        dim: the flattened size of a sample's features, for the default linear head `nn.Linear(dim, K)`.
        head: your own head mapping `(B, dim)` to `(B, K)` logits, instead of `dim`.
        weight: multiplies the penalty.
        conditional: remove only what `u` says beyond the task label (needs `task_labels` in `forward`).
        strength: λ of the gradient reversal once warmed up (shared with the functional form).
        warmup_steps: training calls over which λ rises from 0 (0: λ = `strength` from the first call). With
            group-balanced batches give it a few hundred (docs/task-irrelevant-labels.md, "warmup_steps").
        entropy_weight: `λ_ent` of the entropy term (0: none).
        head_lr_multiplier: the head's learning rate relative to the encoder's, in `parameter_groups` and in the
            head's own steps (> 0).
        head_steps: Adam steps the head takes by itself on each training batch before the loss (≥ 0).
        head_lr: the base learning rate of those steps (> 0), multiplied by `head_lr_multiplier`.
        check_head_after: training calls after which a head your optimizer never moved is reported (0: never).
        ignore_index: the label of unknown samples (`u` and `y`).
        nan_policy: non-finite features `"raise"` a `ValueError` (where it comes later, on a GPU or under
            `torch.compile`, the head's own steps skip that batch meanwhile), give a zero loss with a zero
            gradient and leave the head unchanged (`"skip"`), or pass through (`"propagate"`).

    Raises:
        ValueError: for an invalid option, neither or both of `dim` and `head`.
        TypeError: for a `head` that is not an `nn.Module`.
    """

    steps: Tensor

    def __init__(
        self,
        num_irrelevant: int,
        *,
        dim: int | None = None,
        head: nn.Module | None = None,
        weight: float = 1.0,
        conditional: bool = False,
        strength: float = DEFAULT_STRENGTH,
        warmup_steps: int = 0,
        entropy_weight: float = 0.0,
        head_lr_multiplier: float = 10.0,
        head_steps: int = 10,
        head_lr: float = 3e-3,
        check_head_after: int = 100,
        ignore_index: int = IGNORE_INDEX,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__(weight=weight, conditional=conditional, ignore_index=ignore_index, nan_policy=nan_policy)
        self.num_irrelevant = check_count(
            num_irrelevant, "num_irrelevant", minimum=1, meaning="the number of irrelevant classes"
        )
        self.head = _head(head, dim, num_irrelevant)
        self.warmup_steps = check_count(warmup_steps, "warmup_steps", minimum=0)
        self.head_steps = check_count(head_steps, "head_steps", minimum=0)
        check_count(check_head_after, "check_head_after", minimum=0)
        if not head_lr_multiplier > 0:
            raise ValueError(f"'head_lr_multiplier' must be > 0, got {head_lr_multiplier}")
        if head_steps and not head_lr > 0:
            raise ValueError(f"'head_lr' must be > 0 when head_steps > 0, got {head_lr}")
        self.strength = float(strength)
        self.entropy_weight = float(entropy_weight)
        self.head_lr_multiplier = float(head_lr_multiplier)
        self.head_lr = float(head_lr)
        self.check_head_after = check_head_after
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        trained = [(name, p) for name, p in self.head.named_parameters() if p.requires_grad]
        self.head_optimizer = HeadAdam(trained, lr=self.head_lr * self.head_lr_multiplier)
        self._watch = HeadWatch(check_head_after)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """The head's parameter group for your optimizer, at `head_lr_multiplier` times your learning rate.

        Args:
            lr: your optimizer's (the encoder's) learning rate.

        Returns:
            `[{"params": [the head's parameters], "lr": lr * head_lr_multiplier}]`: pass it with your model's
            group, `torch.optim.Adam([{"params": model.parameters()}, *adversary.parameter_groups(lr)], lr=lr)`
            (and not `adversary.parameters()` besides: a parameter may be in one group only).
        """
        return [{"params": list(self.head.parameters()), "lr": float(lr) * self.head_lr_multiplier}]

    def current_strength(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """λ of the gradient reversal at the current step (DANN warm-up), a 0-d tensor on the module's device.

        Computed on the device from the `steps` buffer: no host read. The loss uses it in its compute dtype
        (float64 for float64 features, so that their reversed gradient is exactly `-λ` times theirs).

        Args:
            dtype: the tensor's dtype (float32 unless given).

        Returns:
            `strength` once warmed up, `strength · (2 / (1 + exp(-10 t)) - 1)` before.
        """
        if self.warmup_steps == 0:
            return torch.full((), self.strength, dtype=dtype, device=self.steps.device)
        progress = (self.steps.to(dtype) / self.warmup_steps).clamp(max=1.0)
        return self.strength * (2.0 / (1.0 + torch.exp(-10.0 * progress)) - 1.0)

    def forward(self, features: Tensor, irrelevant_labels: Tensor, *, task_labels: Tensor | None = None) -> Tensor:
        """The weighted penalty (scalar); in training, after the head's own steps on this batch.

        Args:
            features: `(B, ...)`, flattened to `(B, dim)`.
            irrelevant_labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`.
            task_labels: `(B,)` task classes (or `ignore_index`): required with `conditional=True`, unused
                otherwise.

        Returns:
            `weight ×` the penalty: float32, or float64 for float64 features. `last_terms` then holds `"loss"`,
            `"value"` (unweighted) and `"strength"` (the current λ).

        Raises:
            ValueError: for missing `task_labels` (conditional), labels out of range, non-finite features with
                `nan_policy="raise"` (at once on the CPU, from a later check on other devices), or a head that
                does not map `(B, dim)` to `(B, num_irrelevant)`.
            TypeError: for non-float features or non-integer labels.
        """
        task_labels = self.task_labels_for(task_labels, "adversary(features, irrelevant_labels, task_labels=y)")
        if irrelevant_labels is None:
            raise ValueError(
                f"AdversarialSuppression needs 'irrelevant_labels' (use {self.ignore_index} for unknown ones)"
            )
        guarded, finite = guard_finite({"features": features}, self.nan_policy)
        # the head's own steps never take in a non-finite batch, also while its "raise" error is on its way
        # (a GPU reads the flag a few checks on; compiled code skips the check)
        usable = torch.isfinite(features.detach()).all() if finite is None and self.nan_policy == "raise" else finite
        batch = adversarial_batch(
            guarded["features"],
            irrelevant_labels,
            num_irrelevant=self.num_irrelevant,
            ignore_index=self.ignore_index,
            task_labels=task_labels,
        )
        strength = self.current_strength(torch.promote_types(features.dtype, torch.float32))
        trained: dict[str, Tensor] = {name: self.head.get_parameter(name) for name in self.head_optimizer.names}
        if self.training:
            watch = self._watch.active and value_checks_run(features.device)
            if watch:
                self._watch.before_call(self.head)
            with torch.no_grad():
                self.steps += 1
            if self.head_steps and torch.is_grad_enabled():
                self.head_optimizer.lr = self.head_lr * self.head_lr_multiplier  # options may have changed since
                own_head_steps(
                    self.head,
                    self.head_optimizer,
                    batch,
                    usable,
                    num_irrelevant=self.num_irrelevant,
                    steps=self.head_steps,
                )
                # the loss sees copies (the gradient still reaches the parameters): the next call's steps update
                # the parameters in place, which must not invalidate this call's graph (two calls, one backward)
                trained = {name: p.clone() for name, p in trained.items()}
            if watch:
                self._watch.after_call(self.head)
            if is_distributed():
                trained = dict(zip(trained, average_gradients_across_ranks(list(trained.values())), strict=True))
        value = adversarial_loss(
            batch,
            self.head,
            num_irrelevant=self.num_irrelevant,
            strength=strength,
            entropy_weight=self.entropy_weight,
            head_parameters=trained if self.training and (self.head_steps or is_distributed()) else None,
        )
        return self.weighted(value, finite, strength=strength)

    def options(self) -> list[str]:
        shown = [
            f"strength={self.strength}",
            f"warmup_steps={self.warmup_steps}",
            f"head_lr_multiplier={self.head_lr_multiplier}",
            f"head_steps={self.head_steps}",
            f"head_lr={self.head_lr}",
        ]
        return shown + ([f"entropy_weight={self.entropy_weight}"] if self.entropy_weight else [])

    def extra_repr(self) -> str:
        return f"num_irrelevant={self.num_irrelevant}, " + super().extra_repr()


def _head(head: nn.Module | None, dim: int | None, num_irrelevant: int) -> nn.Module:
    """The user's head, or a linear one for features of size `dim`; exactly one of the two must be given."""
    if (head is None) == (dim is None):
        raise ValueError(
            "AdversarialSuppression needs either 'dim' (the flattened size of a sample's features) for its "
            "linear head, or a 'head' module mapping (B, dim) to (B, num_irrelevant) logits, not "
            + ("both" if head is not None else "neither")
        )
    if head is not None:
        if not isinstance(head, nn.Module):
            raise TypeError(
                f"'head' must be an nn.Module mapping (B, dim) to (B, num_irrelevant), got {type(head).__name__}"
            )
        return head
    dim = check_count(dim, "dim", minimum=1, meaning="the flattened size of a sample's features")
    return nn.Linear(dim, num_irrelevant)
