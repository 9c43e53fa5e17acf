"""`AdversarialSuppression`: a head that predicts task-irrelevant labels, played against the features.

Formulas: docs/task-irrelevant-labels.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import NAN_POLICIES, NanPolicy, check_choice, guard_finite, value_checks_run, zero_unless
from ..distributed import average_gradients_across_ranks, is_distributed, summed_across_ranks
from ..functional.adversarial import (
    DEFAULT_STRENGTH,
    AdversarialBatch,
    adversarial_batch,
    adversarial_cross_entropy,
    adversarial_loss,
)
from ._adversary_head import HeadAdam, HeadWatch, Parameters


class AdversarialSuppression(nn.Module):
    """`weight · CE(h(GRL_λ(z)), u)`: a head `h` learns to predict the irrelevant labels `u`, the features unlearn them.

    The loss is the cross-entropy of a head `h` (linear by default) on gradient-reversed features, averaged over
    the samples whose `u` is known (Ganin & Lempitsky 2015), optionally `+ entropy_weight · mean Σ p log p` of
    `h(z)` (Kim et al., CVPR 2019):

        L = weight · [ Σ_i w_i CE(h(GRL_λ(z_i)), u_i) / max(Σ_i w_i, 1)  +  λ_ent · mean_i Σ_k p_ik log p_ik ]

    with `w_i = 1` where `u_i` is known. The head's gradient trains it to predict `u`; the features receive
    `-λ` times theirs, so they lose what predicts `u`. λ rises from 0 to `strength` over `warmup_steps` training
    calls with DANN's schedule `λ = strength · (2 / (1 + exp(-10 t)) - 1)`, `t = min(steps / warmup_steps, 1)`,
    computed on the device from the `steps` buffer.

    **Conditional** (`conditional=True`, the library's own) removes only what `u` says *beyond the task label*
    `y` (`task_labels=`): the head sees the features centred within their task class, `z_i - z̄_{y_i}`, and its
    logits are offset by the batch's within-class log-prior `log p̂(u | y)`; only samples whose `u` and `y` are
    known, in task classes holding at least two `u` values in the batch, count (see
    `negtransfer_losses.functional.adversarial_suppression`).

    **Give the head to your optimizer through `parameter_groups`**, which sets its learning rate to
    `head_lr_multiplier` (default 10) times yours, so that the head keeps up with the encoder it plays against
    (under SGD and Adam alike)::

        adversary = ntl.AdversarialSuppression(num_irrelevant=10, dim=256)
        optimizer = torch.optim.Adam([{"params": model.parameters()}, *adversary.parameter_groups(lr)], lr=lr)

    The head's parameters are its real ones: a `head` you pass is not modified at construction, and the
    `state_dict` holds its actual values. If, after `check_head_after` training calls, no call found the head
    moved since the one before (between calls only your optimizer moves it), a warning says so; the check
    reads its flag without making the host wait (on a GPU the warning comes a call or two later), and is not
    run while `torch.compile` traces.

    **Before each training call's loss, the head takes `head_steps` (default 10) Adam steps of its own** on the
    batch's detached features, at the learning rate `head_lr × head_lr_multiplier` (3e-2 at the defaults), so
    the features are pushed against a head that has caught up with them (a gradient-reversal adversary that
    lags behind is fooled without the factor being removed). These steps are written on tensors (no host
    read, one graph under `torch.compile`) by `head_optimizer` (a `HeadAdam`), whose state (Adam's moments and
    step count) is in buffers: it follows `.to(device)` and is saved in the `state_dict`, so a run resumed from a
    checkpoint continues as the uninterrupted one would. A batch with no known label (or skipped for non-finite
    features) leaves the head and that state unchanged. `head_steps=0` turns them off; your optimizer still
    trains the head as well. Hence **in training mode the value is that of the head after its own steps**, lower
    than `functional.adversarial_suppression` on the head as it was; in eval mode, or with `head_steps=0`, it
    equals the function's value times `weight`.

    **Under `torch.distributed`** (a process group of several ranks) the ranks' heads stay equal: the head's own
    steps follow the cross-entropy of the ranks' batches together (the ranks' gradients summed, one
    all-reduce per step, plus one for the batch sizes), a batch counts as empty only when every rank's is, and
    the gradient your optimizer gets for the head is averaged over ranks in the backward pass, as DDP does for
    the model (so the adversary need not be inside the DDP-wrapped module). Every rank must therefore call the
    module on every training step.

    None of this is claimed to be the exact mechanism of the TIRTL / PurifiedLearning papers (Li et al.), which
    was not published; see docs/task-irrelevant-labels.md.

    Args:
        num_irrelevant: number of irrelevant classes `K` (≥ 1).
        dim: the flattened size of a sample's features, for the default linear head `nn.Linear(dim, K)`.
        head: your own head mapping `(B, dim)` to `(B, K)` logits, instead of `dim`.
        weight: multiplies the penalty.
        conditional: remove only what `u` says beyond the task label (needs `task_labels` in `forward`).
        strength: λ of the gradient reversal once warmed up (default 0.3, shared with the functional form).
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

    Forward:
        `(features, irrelevant_labels, *, task_labels=None)` → the weighted penalty, a scalar (float32, float64
        for float64 features). Features `(B, ...)` are flattened to `(B, dim)`; labels `(B,)` in `[0, K)` or
        `ignore_index`; a batch with no known label gives a zero loss and a zero gradient. After each call
        `last_terms` holds `{"loss", "value", "strength"}` (the output, the unweighted penalty, the current λ)
        as detached scalars.
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
        super().__init__()
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        if isinstance(num_irrelevant, bool) or not isinstance(num_irrelevant, int) or num_irrelevant < 1:
            raise ValueError(
                f"'num_irrelevant' must be the number of irrelevant classes (an int ≥ 1), got {num_irrelevant!r}"
            )
        if (head is None) == (dim is None):
            raise ValueError(
                "AdversarialSuppression needs either 'dim' (the flattened size of a sample's features) for its "
                "linear head, or a 'head' module mapping (B, dim) to (B, num_irrelevant) logits, not "
                + ("both" if head is not None else "neither")
            )
        if head is not None and not isinstance(head, nn.Module):
            raise TypeError(
                f"'head' must be an nn.Module mapping (B, dim) to (B, num_irrelevant), got {type(head).__name__}"
            )
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"'dim' must be the flattened size of a sample's features (an int ≥ 1), got {dim!r}")
        for name, value in (
            ("warmup_steps", warmup_steps),
            ("head_steps", head_steps),
            ("check_head_after", check_head_after),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"'{name}' must be an int ≥ 0, got {value!r}")
        if not head_lr_multiplier > 0:
            raise ValueError(f"'head_lr_multiplier' must be > 0, got {head_lr_multiplier}")
        if head_steps and not head_lr > 0:
            raise ValueError(f"'head_lr' must be > 0 when head_steps > 0, got {head_lr}")
        self.num_irrelevant = num_irrelevant
        self.weight = float(weight)
        self.conditional = bool(conditional)
        self.strength = float(strength)
        self.warmup_steps = warmup_steps
        self.entropy_weight = float(entropy_weight)
        self.head_lr_multiplier = float(head_lr_multiplier)
        self.head_steps = head_steps
        self.head_lr = float(head_lr)
        self.check_head_after = check_head_after
        self.ignore_index = ignore_index
        self.nan_policy: NanPolicy = nan_policy
        self.head: nn.Module = head if head is not None else nn.Linear(dim, num_irrelevant)  # type: ignore[arg-type]
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        trained = [(name, p) for name, p in self.head.named_parameters() if p.requires_grad]
        self._trained_names = [name for name, _ in trained]
        self.head_optimizer = HeadAdam(trained, lr=self.head_lr * self.head_lr_multiplier)
        self._watch = HeadWatch(check_head_after)
        self.last_terms: dict[str, Tensor] = {}

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

    def current_strength(self) -> Tensor:
        """λ of the gradient reversal at the current step (DANN warm-up), a 0-d float32 tensor on the module's device.

        Computed on the device from the `steps` buffer: no host read.
        """
        if self.warmup_steps == 0:
            return torch.full((), self.strength, dtype=torch.float32, device=self.steps.device)
        progress = (self.steps.to(torch.float32) / self.warmup_steps).clamp(max=1.0)
        return self.strength * (2.0 / (1.0 + torch.exp(-10.0 * progress)) - 1.0)

    def forward(self, features: Tensor, irrelevant_labels: Tensor, *, task_labels: Tensor | None = None) -> Tensor:
        """The weighted penalty (scalar); in training, after the head's own steps on this batch.

        Args:
            features: `(B, ...)`, flattened to `(B, dim)`.
            irrelevant_labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`.
            task_labels: `(B,)` task classes (or `ignore_index`), with `conditional=True` only.

        Returns:
            `weight ×` the penalty: float32, or float64 for float64 features.

        Raises:
            ValueError: for missing or unexpected `task_labels`, labels out of range, non-finite features with
                `nan_policy="raise"` (at once on the CPU, from a later check on other devices), or a head that
                does not map `(B, dim)` to `(B, num_irrelevant)`.
            TypeError: for non-float features or non-integer labels.
        """
        if self.conditional and task_labels is None:
            raise ValueError(
                f"conditional=True needs 'task_labels' (the task classes, {self.ignore_index} for unknown): "
                f"call it as adversary(features, irrelevant_labels, task_labels=y)"
            )
        if not self.conditional and task_labels is not None:
            raise ValueError("'task_labels' are used only with conditional=True; construct the module with it")
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
        strength = self.current_strength()
        head_parameters = None
        if self.training:
            watch = self._watch.active and value_checks_run(features.device)
            if watch:
                self._watch.before_call(self.head)
            with torch.no_grad():
                self.steps += 1
            if self.head_steps and torch.is_grad_enabled():
                self._own_head_steps(batch, usable)
                # the loss sees copies (the gradient still reaches the parameters): the next call's steps update
                # the parameters in place, which must not invalidate this call's graph (two calls, one backward)
                head_parameters = {name: self.head.get_parameter(name).clone() for name in self._trained_names}
            if watch:
                self._watch.after_call(self.head)
            if is_distributed():
                current = head_parameters or {name: self.head.get_parameter(name) for name in self._trained_names}
                head_parameters = dict(
                    zip(current, average_gradients_across_ranks(list(current.values())), strict=True)
                )
        value = adversarial_loss(
            batch,
            self.head,
            num_irrelevant=self.num_irrelevant,
            strength=strength,
            entropy_weight=self.entropy_weight,
            head_parameters=head_parameters,
        )
        value = zero_unless(finite, value)
        loss = self.weight * value
        self.last_terms = {"loss": loss.detach(), "value": value.detach(), "strength": strength.detach()}
        return loss

    def _own_head_steps(self, batch: AdversarialBatch, finite: Tensor | None) -> None:
        """`head_steps` steps of `head_optimizer` on the batch's detached features (gradients by `torch.func`).

        Under `torch.distributed` the gradient is that of the ranks' batches together: each rank's gradient of
        its mean cross-entropy times its count of weighted samples, summed over ranks, divided by the total count.
        """
        assert batch.weights is not None
        detached = batch._replace(features=batch.features.detach())
        constant = {name: p.detach() for name, p in self.head.named_parameters()}

        def head_loss(trained: Parameters) -> Tensor:
            return adversarial_cross_entropy(
                detached,
                self.head,
                num_irrelevant=self.num_irrelevant,
                strength=0.0,
                head_parameters={**constant, **trained},
            )

        gradient = torch.func.grad(head_loss)
        count = batch.weights.sum()
        # a batch with no known label (or skipped as non-finite) leaves the head and Adam's state unchanged
        active = count > 0
        if finite is not None:
            active = active & finite
        if is_distributed():
            gradient, active = self._summed_over_ranks(gradient, count, finite)
        params = {name: constant[name] for name in self._trained_names}
        self.head_optimizer.lr = self.head_lr * self.head_lr_multiplier  # the options may have been changed since
        proposal = self.head_optimizer.propose(params, gradient, self.head_steps)
        targets = {name: self.head.get_parameter(name) for name in self._trained_names}
        self.head_optimizer.commit(proposal, targets, active)

    def _summed_over_ranks(self, gradient: Any, count: Tensor, finite: Tensor | None) -> tuple[Any, Tensor]:
        """The gradient of the ranks' batches together, and whether any rank's batch counts (and none is non-finite)."""
        usable = torch.ones((), dtype=torch.bool, device=count.device) if finite is None else finite
        totals = summed_across_ranks(torch.stack([count.to(torch.float64), (~usable).to(torch.float64)]))
        total = totals[0].clamp_min(1.0)
        local = count.to(torch.float64).clamp_min(1.0)

        def summed(params: Parameters) -> Parameters:
            grads = gradient(params)
            flat = torch.cat([grads[name].reshape(-1).to(torch.float64) for name in self._trained_names])
            flat = torch.where(usable, flat * local, torch.zeros((), dtype=flat.dtype, device=flat.device))
            flat = summed_across_ranks(flat) / total
            parts = torch.split(flat, [grads[name].numel() for name in self._trained_names])
            return {
                name: part.reshape(grads[name].shape).to(grads[name].dtype)
                for name, part in zip(self._trained_names, parts, strict=True)
            }

        return summed, (totals[0] > 0) & (totals[1] == 0)

    def extra_repr(self) -> str:
        options = [
            f"num_irrelevant={self.num_irrelevant}",
            f"weight={self.weight}",
            f"conditional={self.conditional}",
            f"strength={self.strength}",
            f"warmup_steps={self.warmup_steps}",
            f"head_lr_multiplier={self.head_lr_multiplier}",
            f"head_steps={self.head_steps}",
            f"head_lr={self.head_lr}",
        ]
        if self.entropy_weight:
            options.append(f"entropy_weight={self.entropy_weight}")
        return ", ".join(options)
