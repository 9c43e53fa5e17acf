"""`AdversarialSuppression`: a head that predicts task-irrelevant labels, played against the features.

Formulas: docs/task-irrelevant-labels.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import NAN_POLICIES, HostCopy, NanPolicy, check_choice, guard_finite, reads_values, zero_unless
from ..functional.adversarial import (
    DEFAULT_STRENGTH,
    AdversarialBatch,
    adversarial_batch,
    adversarial_cross_entropy,
    adversarial_loss,
)

# torch.optim.Adam's defaults, which the head's own steps use
_BETAS = (0.9, 0.999)
_EPS = 1e-8


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
    read, one graph under `torch.compile`); their state (Adam's moments and step count) lives in non-persistent
    buffers, so it follows `.to(device)` and is not saved in the `state_dict`. A batch with no known label (or
    skipped for non-finite features) leaves the head and that state unchanged. `head_steps=0` turns them off;
    your optimizer still trains the head as well. Hence **in training mode the value is that of the head after
    its own steps**, lower than `functional.adversarial_suppression` on the head as it was (at the defaults, on
    a fresh head and a batch of 16 samples of 8 features: 0.75 against the function's 1.45); in eval mode, or with
    `head_steps=0`, it equals the function's value times `weight`.

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
    head_adam_step: Tensor

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
        # the state of the head's own Adam steps: follows .to(), not saved (as an optimizer's state would be)
        self.register_buffer("head_adam_step", torch.zeros((), dtype=torch.long), persistent=False)
        self._trained_names = [name for name, p in self.head.named_parameters() if p.requires_grad]
        for i, name in enumerate(self._trained_names):
            p = self.head.get_parameter(name)
            self.register_buffer(
                f"head_adam_exp_avg_{i}", torch.zeros_like(p, memory_format=torch.preserve_format), persistent=False
            )
            self.register_buffer(
                f"head_adam_exp_avg_sq_{i}", torch.zeros_like(p, memory_format=torch.preserve_format), persistent=False
            )
        # the check that the user's optimizer trains the head (eager only, never waits for the device)
        self._watching = check_head_after > 0
        self._calls_watched = 0
        self._snapshot: list[Tensor] | None = None
        self._moved: Tensor | None = None
        self._moved_read: HostCopy | None = None
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
            watch = self._watching and reads_values(features.device)
            if watch:
                self._compare_with_snapshot()
            with torch.no_grad():
                self.steps += 1
            if self.head_steps and torch.is_grad_enabled():
                self._inner_head_steps(batch, usable)
                # the loss sees copies (the gradient still reaches the parameters): the next call's steps update
                # the parameters in place, which must not invalidate this call's graph (two calls, one backward)
                head_parameters = {name: self.head.get_parameter(name).clone() for name in self._trained_names}
            if watch and self._watching:  # the head as its own steps left it: only the user's optimizer moves it now
                self._snapshot = [p.detach().clone() for p in self.head.parameters()]
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

    def _inner_head_steps(self, batch: AdversarialBatch, finite: Tensor | None) -> None:
        """`head_steps` Adam steps of the head alone on the batch's detached features (gradients by `torch.func`).

        Adam as `torch.optim.Adam` computes it (default betas and eps), at `head_lr × head_lr_multiplier`,
        written on tensors so that nothing is read on the host and `torch.compile` traces it.
        """
        assert batch.weights is not None
        detached = batch._replace(features=batch.features.detach())
        constant = {name: p.detach() for name, p in self.head.named_parameters()}
        params = {name: constant[name] for name in self._trained_names}

        def head_loss(trained: dict[str, Tensor]) -> Tensor:
            return adversarial_cross_entropy(
                detached,
                self.head,
                num_irrelevant=self.num_irrelevant,
                strength=0.0,
                head_parameters={**constant, **trained},
            )

        head_gradient = torch.func.grad(head_loss)
        beta1, beta2 = _BETAS
        lr = self.head_lr * self.head_lr_multiplier
        exp_avg = [self.get_buffer(f"head_adam_exp_avg_{i}") for i in range(len(self._trained_names))]
        exp_avg_sq = [self.get_buffer(f"head_adam_exp_avg_sq_{i}") for i in range(len(self._trained_names))]
        moments = [m.detach().to(torch.promote_types(m.dtype, torch.float32)) for m in exp_avg]
        squares = [v.detach().to(torch.promote_types(v.dtype, torch.float32)) for v in exp_avg_sq]
        # the second moment is stored in the head's dtype between calls: below that dtype's smallest normal it is
        # lost (a float16 head's g² of 1e-5 is 0), and Adam's step m / √v would explode; √v is floored there, so a
        # step stays within the learning rate (a float32 head's floor, 1e-19, changes nothing)
        floors = [math.sqrt(torch.finfo(v.dtype).tiny) for v in exp_avg_sq]
        step = self.head_adam_step.detach()
        for _ in range(self.head_steps):
            grads = head_gradient(params)
            step = step + 1
            t = step.to(torch.float32)
            bias_correction1 = 1.0 - torch.pow(beta1, t)
            bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, t))
            updated = {}
            for i, name in enumerate(self._trained_names):
                # in float32 at least: a float16 head's g² and eps underflow to 0 (0 / 0 is NaN)
                p, g = params[name], grads[name].to(moments[i].dtype)
                moments[i] = torch.lerp(moments[i], g, 1.0 - beta1)
                squares[i] = squares[i] * beta2 + (1.0 - beta2) * g * g
                denom = (squares[i].sqrt() / bias_correction2_sqrt).clamp_min(floors[i]) + _EPS
                updated[name] = (p.to(moments[i].dtype) - (lr / bias_correction1) * moments[i] / denom).to(p.dtype)
            params = updated
        # a batch with no known label (or skipped as non-finite) leaves the head and Adam's state unchanged
        active = batch.weights.sum() > 0
        if finite is not None:
            active = active & finite
        with torch.no_grad():
            for i, name in enumerate(self._trained_names):
                p = self.head.get_parameter(name)
                p.copy_(torch.where(active, params[name], p))
                exp_avg[i].copy_(torch.where(active, moments[i].to(exp_avg[i].dtype), exp_avg[i]))
                exp_avg_sq[i].copy_(torch.where(active, squares[i].to(exp_avg_sq[i].dtype), exp_avg_sq[i]))
            self.head_adam_step.copy_(torch.where(active, step, self.head_adam_step))

    def _compare_with_snapshot(self) -> None:
        """Eager bookkeeping of `check_head_after`: device-side flags, read later without waiting."""
        if self._moved_read is not None:
            self._read_moved_flag()
            return
        params = [p.detach() for p in self.head.parameters()]
        if self._snapshot is not None and params:
            changed = torch.stack([(a != p).any() for a, p in zip(self._snapshot, params, strict=True)]).any()
            self._moved = changed if self._moved is None else self._moved | changed
        if self._calls_watched >= self.check_head_after:
            moved = self._moved if self._moved is not None else torch.zeros((), dtype=torch.bool)
            self._snapshot = None
            self._moved_read = HostCopy(moved)
            self._read_moved_flag()
            return
        self._calls_watched += 1

    def _read_moved_flag(self) -> None:
        assert self._moved_read is not None
        if not self._moved_read.ready():
            return  # not computed yet: a later call reads it
        moved = self._moved_read.tolist()
        self._watching, self._moved_read, self._moved = False, None, None
        if not moved:
            advice = 'torch.optim.Adam([{"params": model.parameters()}, *adversary.parameter_groups(lr)], lr=lr)'
            warnings.warn(
                f"the adversarial head's parameters have not changed in {self.check_head_after} training steps "
                f"(between calls, where only your optimizer moves them): give them to the optimizer, e.g. {advice}",
                stacklevel=6,
            )

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
