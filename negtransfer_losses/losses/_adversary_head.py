"""What `AdversarialSuppression` keeps besides its loss: its head's own optimizer and the watch on yours.

- `HeadAdam`: Adam, as `torch.optim.Adam` computes it, written on tensors for the head's own steps (no host
  read, one graph under `torch.compile`), its state in buffers that the adversary's `state_dict` saves, so a
  resumed run continues bitwise.
- `own_head_steps`: those steps on a batch (over every rank's batch under `torch.distributed`).
- `HeadWatch`: warns when the user's optimizer never moves the head, reading its flag without waiting.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import HostCopy
from ..distributed import is_distributed, sum_across_ranks_detached
from ..functional._core import AdversarialBatch, adversarial_cross_entropy

Parameters = dict[str, Tensor]
Gradient = Callable[[Parameters], Mapping[str, Tensor]]


class HeadAdam(nn.Module):
    """Adam (`torch.optim.Adam`'s update, default betas and eps) over named tensors, with its state as buffers.

    For parameters `θ` with gradients `g` (any dtype; computed in float32 at least) at step `t`:

        m ← β₁ m + (1 − β₁) g,   v ← β₂ v + (1 − β₂) g²,
        θ ← θ − lr / (1 − β₁ᵗ) · m / (max(√v / √(1 − β₂ᵗ), √tiny) + eps)

    with `tiny` the smallest normal number of the dtype `v` is stored in: a float16 head's `g²` of 1e-5 is 0 in
    float16, and `m / √v` would explode; the floor keeps a step within the learning rate (for float32 it is
    1e-19 and changes nothing).

    The state is `step` (0-d int64: the steps taken), `exp_avg_{i}` and `exp_avg_sq_{i}` (one pair per
    parameter, in its dtype), all buffers: they follow `.to(device)` and are in `state_dict()`. A
    checkpoint written before this state was saved (it has the head's parameters but no `head_optimizer.*`
    keys) still loads: the state then starts afresh, with a warning that the resumed run is not the
    uninterrupted one.

    `propose` computes steps without touching the state; `commit` writes a proposal where a 0-d bool tensor
    says so (on the device: nothing is read on the host).

    Args:
        parameters: the `(name, tensor)` pairs the steps train, in a fixed order.
        lr: the learning rate (> 0).
    """

    step: Tensor
    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, parameters: Iterable[tuple[str, Tensor]], *, lr: float) -> None:
        super().__init__()
        self.names = [name for name, _ in parameters]
        self.lr = float(lr)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        for i, (_, p) in enumerate(parameters):
            self.register_buffer(f"exp_avg_{i}", torch.zeros_like(p, memory_format=torch.preserve_format))
            self.register_buffer(f"exp_avg_sq_{i}", torch.zeros_like(p, memory_format=torch.preserve_format))

    def moments(self) -> tuple[list[Tensor], list[Tensor]]:
        """The first and second moments, one tensor per parameter in `names`' order (the buffers themselves)."""
        count = len(self.names)
        return (
            [self.get_buffer(f"exp_avg_{i}") for i in range(count)],
            [self.get_buffer(f"exp_avg_sq_{i}") for i in range(count)],
        )

    def propose(
        self, params: Parameters, gradient: Gradient, steps: int
    ) -> tuple[Parameters, list[Tensor], list[Tensor], Tensor]:
        """`steps` Adam steps from `params` and the stored state; the state itself is left as it is.

        Args:
            params: the starting values, by name (every name of `names`).
            gradient: the gradient of the objective at given values, by name.
            steps: how many steps.

        Returns:
            `(params, exp_avg, exp_avg_sq, step)` after the steps: the new values (in the parameters'
            dtypes), the moments (float32 at least) and the step count.
        """
        beta1, beta2 = self.betas
        exp_avg, exp_avg_sq = self.moments()
        moments = [m.detach().to(torch.promote_types(m.dtype, torch.float32)) for m in exp_avg]
        squares = [v.detach().to(torch.promote_types(v.dtype, torch.float32)) for v in exp_avg_sq]
        floors = [math.sqrt(torch.finfo(v.dtype).tiny) for v in exp_avg_sq]
        step = self.step.detach()
        for _ in range(steps):
            grads = gradient(params)
            step = step + 1
            t = step.to(torch.float64)  # the bias corrections in float64, as torch.optim.Adam's Python floats
            step_size = self.lr / (1.0 - torch.pow(beta1, t))
            bias_correction2_sqrt = torch.sqrt(1.0 - torch.pow(beta2, t))
            updated = {}
            for i, name in enumerate(self.names):
                p, g = params[name], grads[name].to(moments[i].dtype)
                moments[i] = torch.lerp(moments[i], g, 1.0 - beta1)
                squares[i] = squares[i] * beta2 + (1.0 - beta2) * g * g
                denom = (squares[i].sqrt() / bias_correction2_sqrt.to(squares[i].dtype)).clamp_min(floors[i]) + self.eps
                shift = step_size.to(moments[i].dtype) * (moments[i] / denom)
                updated[name] = (p.to(moments[i].dtype) - shift).to(p.dtype)
            params = updated
        return params, moments, squares, step

    @torch.no_grad()
    def commit(
        self,
        proposal: tuple[Parameters, list[Tensor], list[Tensor], Tensor],
        targets: Mapping[str, Tensor],
        active: Tensor,
    ) -> None:
        """Write a `propose` result into `targets` (the parameters) and the state where `active` (0-d bool) is true."""
        params, moments, squares, step = proposal
        exp_avg, exp_avg_sq = self.moments()
        for i, name in enumerate(self.names):
            target = targets[name]
            target.copy_(torch.where(active, params[name], target))
            exp_avg[i].copy_(torch.where(active, moments[i].to(exp_avg[i].dtype), exp_avg[i]))
            exp_avg_sq[i].copy_(torch.where(active, squares[i].to(exp_avg_sq[i].dtype), exp_avg_sq[i]))
        self.step.copy_(torch.where(active, step, self.step))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        own = [prefix + name for name, _ in self.named_buffers()]
        if not any(key in state_dict for key in own):
            warnings.warn(
                f"this checkpoint has no state of the adversarial head's own optimizer ('{prefix}step', ...; "
                "checkpoints written before it was saved): its steps start afresh, so the resumed run is not "
                "the one it would have been. Save a new checkpoint to resume exactly from then on.",
                stacklevel=2,
            )
            for key in own:
                state_dict[key] = self.get_buffer(key[len(prefix) :]).detach().clone()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"lr={self.lr}, parameters={self.names}"


def own_head_steps(
    head: nn.Module,
    optimizer: HeadAdam,
    batch: AdversarialBatch,
    finite: Tensor | None,
    *,
    num_irrelevant: int,
    steps: int,
) -> None:
    """`steps` steps of `optimizer` on the head's cross-entropy over the batch's detached features.

    Gradients by `torch.func.grad`; the head and the optimizer's state change only where the batch has a
    sample of weight and `finite` (if given) is true, decided on the device. Under `torch.distributed` the
    gradient is that of the ranks' batches together and the decision theirs together (see `_over_ranks`).

    Args:
        head: the adversary's head; its parameters named in `optimizer.names` are trained.
        optimizer: the head's own `HeadAdam`.
        batch: from `functional.adversarial.adversarial_batch` (with labels).
        finite: whether the batch's features are finite (0-d bool), or None when that is not checked.
        num_irrelevant: the head's number of classes.
        steps: how many steps.
    """
    assert batch.weights is not None and batch.labels is not None
    detached = batch._replace(features=batch.features.detach())
    constant = {name: p.detach() for name, p in head.named_parameters()}

    def head_loss(trained: Parameters) -> Tensor:
        return adversarial_cross_entropy(
            detached, head, num_irrelevant=num_irrelevant, strength=0.0, head_parameters={**constant, **trained}
        )

    gradient: Gradient = torch.func.grad(head_loss)
    count = batch.weights.sum()
    active = count > 0 if finite is None else (count > 0) & finite
    if is_distributed():
        gradient, active = _over_ranks(gradient, optimizer.names, count, finite)
    proposal = optimizer.propose({name: constant[name] for name in optimizer.names}, gradient, steps)
    optimizer.commit(proposal, {name: head.get_parameter(name) for name in optimizer.names}, active)


def _over_ranks(gradient: Gradient, names: list[str], count: Tensor, finite: Tensor | None) -> tuple[Gradient, Tensor]:
    """The gradient of the ranks' batches together, and whether any has a weighted sample and none is non-finite.

    Each rank's gradient of its mean cross-entropy is multiplied by its count of weighted samples, the products
    summed over ranks (one all-reduce per step, plus one for the counts) and divided by the total count: the
    gradient of the mean over every rank's samples, the same on every rank.
    """
    usable = torch.ones((), dtype=torch.bool, device=count.device) if finite is None else finite
    totals = sum_across_ranks_detached(torch.stack([count.to(torch.float64), (~usable).to(torch.float64)]))
    total, local = totals[0].clamp_min(1.0), count.to(torch.float64).clamp_min(1.0)

    def summed(params: Parameters) -> Parameters:
        grads = gradient(params)
        flat = torch.cat([grads[name].reshape(-1).to(torch.float64) for name in names])
        flat = torch.where(usable, flat * local, torch.zeros((), dtype=flat.dtype, device=flat.device))
        parts = torch.split(sum_across_ranks_detached(flat) / total, [grads[name].numel() for name in names])
        return {
            name: part.reshape(grads[name].shape).to(grads[name].dtype) for name, part in zip(names, parts, strict=True)
        }

    return summed, (totals[0] > 0) & (totals[1] == 0)


class HeadWatch:
    """Warns when the user's optimizer has not moved the head after `after` training calls (eager only).

    Before each watched call the head is compared with a snapshot taken after the previous call's own steps
    (between calls only the user's optimizer moves it); the comparisons accumulate in a device flag, copied
    to the host without waiting once `after` calls were watched and read at a later call when ready.

    Args:
        after: training calls to watch (0: never warn).
    """

    def __init__(self, after: int) -> None:
        self.after = after
        self.active = after > 0
        self._calls = 0
        self._snapshot: list[Tensor] | None = None
        self._moved: Tensor | None = None
        self._moved_read: HostCopy | None = None

    def before_call(self, head: nn.Module) -> None:
        """Compare the head with the last snapshot (or read the flag once it is on its way)."""
        if self._moved_read is not None:
            self._read_flag()
            return
        params = [p.detach() for p in head.parameters()]
        if self._snapshot is not None and params:
            changed = torch.stack([(a != p).any() for a, p in zip(self._snapshot, params, strict=True)]).any()
            self._moved = changed if self._moved is None else self._moved | changed
        if self._calls >= self.after:
            moved = self._moved if self._moved is not None else torch.zeros((), dtype=torch.bool)
            self._snapshot = None
            self._moved_read = HostCopy(moved)
            self._read_flag()
            return
        self._calls += 1

    def after_call(self, head: nn.Module) -> None:
        """Snapshot the head as its own steps left it: from now on only the user's optimizer moves it."""
        if self.active:
            self._snapshot = [p.detach().clone() for p in head.parameters()]

    def _read_flag(self) -> None:
        assert self._moved_read is not None
        if not self._moved_read.ready():
            return  # not computed yet: a later call reads it
        moved = self._moved_read.tolist()
        self.active, self._moved_read, self._moved = False, None, None
        if not moved:
            advice = 'torch.optim.Adam([{"params": model.parameters()}, *adversary.parameter_groups(lr)], lr=lr)'
            warnings.warn(
                f"the adversarial head's parameters have not changed in {self.after} training steps "
                f"(between calls, where only your optimizer moves them): give them to the optimizer, e.g. {advice}",
                stacklevel=7,
            )
