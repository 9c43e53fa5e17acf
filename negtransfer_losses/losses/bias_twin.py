"""`BiasTwin`: a twin of your model that learns the shortcut, for when no one labelled the bias.

Formulas and use: docs/no-bias-labels.md. The twin's own Adam is the adversary's `HeadAdam` (`_adversary_head.py`);
the helpers below the class check a batch, build and tap the twin, and keep the ranks' states equal.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import Self

from .._labels import IGNORE_INDEX, check_labels
from .._validation import (
    NAN_POLICIES,
    NanPolicy,
    check_choice,
    check_same_device,
    check_tensor,
    full_precision,
    guard_finite,
    raise_if_invalid,
)
from ..distributed import is_distributed, sum_across_ranks_detached
from ..functional._core import DEFAULT_Q, check_q, generalized_cross_entropy_unchecked
from ..taps import FeatureTap, unwrap_model
from ._adversary_head import HeadAdam
from ._base import check_count
from ._checkpoints import LoadsOlderCheckpoints

WEIGHT_EPS = 1e-8  # LfF's: w = b / (b + d + 1e-8)
Grads = dict[str, Tensor]


class TwinOutput(NamedTuple):
    """What a `BiasTwin` call gives, all detached (from the twin as it was before this call's step).

    Attributes:
        features: `{layer: tensor}`, the twin's features at `layers` (the reference of `AntiTransferLoss` or
            `CKASuppression`); `{}` without `layers`.
        pseudo_labels: `(B,)` int64, the twin's predicted class: labels of the bias for `HSICSuppression`,
            `AdversarialSuppression` or `Purify`.
        weights: `(B,)` float32, LfF's per-sample weights for your model's cross-entropy (None unless `logits` was
            given; 0 where the label is unknown or the batch was skipped).
        twin_loss: the twin's mean GCE on the batch's known labels (0-d float32), for logging.
    """

    features: dict[str, Tensor]
    pseudo_labels: Tensor
    weights: Tensor | None
    twin_loss: Tensor


class BiasTwin(LoadsOlderCheckpoints):
    """A twin of your model, trained by this module with the GCE on the task labels: it learns the easy cue first.

    Learning from Failure (LfF; Nam et al., NeurIPS 2020) trains a second network with the generalized
    cross-entropy `GCE(p, y) = (1 − p_y^q) / q` (`negtransfer_losses.functional.generalized_cross_entropy`): it
    fits the samples it already finds easy, so on a biased data set it learns the shortcut (a colour, a
    background) and fails on the samples that contradict it. Each training call takes **one Adam step of the
    twin by itself** on the batch (its own `HeadAdam` at `lr`; no optimizer of yours to wire) and gives, from
    the same single forward of the twin (before the step), detached:

    (a) `features` at `layers`: the reference of `AntiTransferLoss` or `CKASuppression` (the twin stands for a
        network trained on the factor to ignore);
    (b) `weights`, LfF's per-sample weights, when you pass your model's `logits`:

            ℓ_i ← CE_i the first time index i is seen, then ℓ_i ← (1 − momentum) ℓ_i + momentum · CE_i
            w_i = ℓ̂_twin,i / (ℓ̂_twin,i + ℓ̂_main,i + 1e-8),    ℓ̂_i = ℓ_i / max_{j : y_j = y_i} ℓ_j

        from moving averages `ℓ` of both models' per-sample cross-entropies, kept per dataset index (buffers of
        `num_samples`; an index held twice in one step enters with the mean of its losses), each normalised by
        the largest of its class (LfF's `EMA` and `max_loss`; LfF's α = 0.7 is `1 − momentum`). Train your
        model on `(weights * cross_entropy(logits, y, reduction="none")).mean()`;
    (c) `pseudo_labels`, the twin's argmax: labels of the bias for the suppression methods. The buffers
        `sample_labels` and `sample_pseudo_labels` keep each dataset index's label and the twin's latest
        prediction of it (-1 until the index is seen): after an epoch, `GroupBalancedBatchSampler(
        twin.sample_labels, twin.sample_pseudo_labels, batch_size)` balances the groups the twin found.

    Nothing is read on the host (LfF's released code moves the losses to the host every step). The state (the
    twin's weights and buffers, its Adam state and step count, both averages, which indices were seen, their
    labels and pseudo-labels) is in `state_dict`: a resumed run continues bitwise. Under `torch.distributed`
    each rank updates the indices of its batch and the updates are summed over ranks (one all-reduce of
    `(num_samples, 5)` values), the twin's step follows the ranks' batches together and its floating-point
    buffers (BatchNorm statistics) are averaged: the state stays identical on every rank, which must all call it
    on every training step. In eval mode it only reads (the twin in eval mode, no step, no update).

    `freeze()` makes every later call read only, in training mode too (the twin in eval mode whatever
    `train()` says, no step, no update: `pseudo_labels`, `sample_pseudo_labels`, `features` and `weights` stay
    those of the twin as it was), until `freeze(False)`; whether it is frozen is in `state_dict` (under
    `torch.distributed`, freeze every rank at the same step: a frozen call joins no collective). Freeze it after
    it has seen every index (an epoch at least): an index never seen keeps label and guess -1. Freeze the twin
    before you balance batches on its guesses: trained on those batches, where the samples it fails on are
    frequent, it learns them, and its guesses no longer tell them apart (docs/no-bias-labels.md measures it).

    Example::

        twin = ntl.BiasTwin(make_model, num_samples=len(train_set), layers=["layer2"])
        for x, y, index in loader:  # the data set returns each sample's index
            with tap:
                logits = model(x)
            out = twin(x, y, index, logits)
            ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            loss = (out.weights * ce).mean() + anti_transfer(tap.pop(), out.features)

    Args:
        twin: a module to copy (`copy.deepcopy`: the twin starts from its weights) or a function returning a new
            one (a fresh initialisation, as LfF's). It maps `inputs` to `(B, K)` logits. Its parameters with
            `requires_grad=True` are the ones trained; all are then set to `requires_grad=False` (only this
            module moves them: giving them to your optimizer does nothing).
        num_samples: the size of the training set: dataset indices lie in `[0, num_samples)`.
        layers: the twin's layers whose outputs are `features` (names or glob patterns, as `FeatureTap`'s).
        q: the GCE exponent, in `(0, 1]`.
        momentum: weight of a new loss in the per-sample moving averages, in `(0, 1]`.
        lr: the learning rate of the twin's Adam (> 0).
        ignore_index: the label of samples whose class is unknown (no twin loss, no update, weight 0).
        nan_policy: non-finite logits (yours or the twin's) `"raise"` a `ValueError` (at once on the CPU, from a
            later check on other devices; the twin skips such a batch meanwhile), skip the batch: no step, no
            update, weights 0 (`"skip"`), or pass through (`"propagate"`).

    Raises:
        TypeError: `twin` is neither an `nn.Module` nor a function returning one; a layer is not a string.
        ValueError: an invalid option, an unknown layer, a twin with no trainable parameter, or a module to copy
            that has forward hooks (a `FeatureTap` on your model would fire in the copy: pass a function that
            builds the twin, or build the `BiasTwin` before tapping your model).
    """

    twin_loss_ema: Tensor
    main_loss_ema: Tensor
    twin_seen: Tensor
    main_seen: Tensor
    sample_labels: Tensor
    sample_pseudo_labels: Tensor
    frozen_flag: Tensor

    def __init__(
        self,
        twin: nn.Module | Callable[[], nn.Module],
        num_samples: int,
        *,
        layers: str | Iterable[str] | None = None,
        q: float = DEFAULT_Q,
        momentum: float = 0.3,
        lr: float = 1e-3,
        ignore_index: int = IGNORE_INDEX,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        self.num_samples = check_count(num_samples, "num_samples", minimum=1, meaning="the size of the training set")
        self.q = check_q(q)
        self.momentum = _check_fraction(momentum, "momentum", "the weight of a new loss; LfF's α = 0.7 is 0.3")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"'lr' must be > 0 (the twin's Adam learning rate), got {lr!r}")
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        self.lr, self.ignore_index, self.nan_policy = float(lr), ignore_index, nan_policy
        self.twin = _build_twin(twin)
        trained = [(name, p.detach()) for name, p in self.twin.named_parameters() if p.requires_grad]
        if not trained:
            raise ValueError("the twin has no parameter with requires_grad=True: BiasTwin would have nothing to train")
        self.twin.requires_grad_(False)
        self.twin_optimizer = HeadAdam(trained, lr=self.lr)
        self._frozen = False  # what a call reads; `frozen_flag` is its copy in state_dict
        self.register_buffer("frozen_flag", torch.zeros((), dtype=torch.bool))
        self.register_load_state_dict_post_hook(_restore_frozen)  # type: ignore[no-untyped-call]
        self._tap = None if layers is None else _tap_of(self.twin, layers)
        self.register_buffer("twin_loss_ema", torch.zeros(self.num_samples))
        self.register_buffer("main_loss_ema", torch.zeros(self.num_samples))
        self.register_buffer("twin_seen", torch.zeros(self.num_samples, dtype=torch.bool))
        self.register_buffer("main_seen", torch.zeros(self.num_samples, dtype=torch.bool))
        self.register_buffer("sample_labels", torch.full((self.num_samples,), -1, dtype=torch.long))
        self.register_buffer("sample_pseudo_labels", torch.full((self.num_samples,), -1, dtype=torch.long))

    @property
    def layers(self) -> tuple[str, ...]:
        """The twin's layers whose outputs are `features`, in order."""
        return () if self._tap is None else tuple(name.removeprefix("twin.") for name in self._tap.layers)

    @property
    def frozen(self) -> bool:
        """Whether every call only reads (`freeze`)."""
        return self._frozen

    def freeze(self, frozen: bool = True) -> Self:
        """Stop (`frozen=True`) or resume training the twin; saved in `state_dict`. Returns the module.

        Raises:
            TypeError: `frozen` is not a bool.
        """
        if not isinstance(frozen, bool):
            raise TypeError(f"'frozen' must be a bool, got {type(frozen).__name__}")
        self._frozen = frozen
        self.frozen_flag.fill_(frozen)
        self.twin.train(self.training and not frozen)
        return self

    def train(self, mode: bool = True) -> Self:
        """Set training mode; a frozen twin's network stays in eval mode."""
        super().train(mode)
        if self._frozen:
            self.twin.eval()
        return self

    def forward(self, inputs: Tensor, labels: Tensor, indices: Tensor, logits: Tensor | None = None) -> TwinOutput:
        """Run the twin once on `inputs`; in training (unless frozen), take its step and update the averages.

        Args:
            inputs: the batch, as your model takes it (one tensor, batch first).
            labels: `(B,)` task classes in `[0, K)`, or `ignore_index`.
            indices: `(B,)` integer dataset indices in `[0, num_samples)` (have your data set return them).
            logits: your model's `(B, K)` logits on the batch, for `weights` (optional).

        Returns:
            a `TwinOutput`: `features`, `pseudo_labels`, `weights`, `twin_loss`, all detached.

        Raises:
            TypeError: a non-tensor `inputs`, non-integer `labels` or `indices`, non-float `logits`.
            ValueError: shapes that do not match (naming them), a twin whose output is not `(B, K)` logits with
                your logits' `K`, a label or an index out of range or non-finite logits (`"raise"`); the last
                three at once on the CPU, from a later check on other devices.
        """
        batch = _check_batch(inputs, labels, indices, logits, self.num_samples)
        known = labels != self.ignore_index
        if self._frozen and any(m.training for m in self.twin.modules()):
            self.twin.eval()  # a frozen twin reads in eval mode, whatever set its layers' modes since
        stepping = self.training and not self._frozen
        if stepping:  # autocast is switched off once, inside the twin's step (`_twin_gradient`)
            saved = [b.detach().clone() for b in self.twin.buffers() if b.is_floating_point()]
            twin_logits, features, grads, losses = self._twin_gradient(inputs, labels, known, logits)
        else:
            with torch.no_grad():
                if self._tap is not None:
                    self._tap.clear()
                twin_logits = _twin_logits(self.twin(inputs), batch, logits)
                features = {} if self._tap is None else self._features(self._tap.pop())
        try:
            check_labels(labels, twin_logits.shape[1], batch, name="labels", ignore_index=self.ignore_index)
            finite = self._finite(twin_logits, logits)
        except ValueError:
            if stepping:  # an error at once (on the CPU): BatchNorm's statistics as they were before the batch
                _keep_buffers(self.twin, saved, torch.zeros((), dtype=torch.bool, device=twin_logits.device))
            raise
        pseudo_labels = twin_logits.argmax(dim=1)
        if stepping:
            twin_loss, twin_ce, main_ce = losses
            self._twin_step(grads, saved, known, finite)
            _update_averages(self, indices, labels, known & finite, twin_ce, main_ce, pseudo_labels)
        else:
            with full_precision(twin_logits):
                twin_loss = _twin_loss(twin_logits, labels, known, self.q)
        num_classes = twin_logits.shape[1]
        weights = None if logits is None else _lff_weights(self, indices, labels, known & finite, num_classes)
        return TwinOutput(features, pseudo_labels, weights, twin_loss)

    def _twin_gradient(
        self, inputs: Tensor, labels: Tensor, known: Tensor, logits: Tensor | None
    ) -> tuple[Tensor, dict[str, Tensor], Grads, tuple[Tensor, Tensor, Tensor | None]]:
        """The twin's logits and features (detached) and its GCE gradient, from one forward (`torch.func.grad`),
        with the losses the call reports and averages (the twin's GCE, both models' per-sample cross-entropies),
        all under the call's one switch of autocast."""
        params = {name: self.twin.get_parameter(name).detach() for name in self.twin_optimizer.names}

        def objective(trained: Grads, buffers: Grads) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor], Grads]]:
            if self._tap is not None:
                self._tap.clear()
            out = torch.func.functional_call(self.twin, (trained, buffers), (inputs,))
            features = {} if self._tap is None else self._features(self._tap.pop())
            z = _twin_logits(out, labels.shape[0], logits)
            with full_precision(z):
                value = _twin_loss(z, labels, known, self.q)
                losses = {"twin_loss": value.detach(), "twin_ce": _cross_entropy(z.detach(), labels, known)}
                if logits is not None:
                    losses["main_ce"] = _cross_entropy(logits.detach(), labels, known)
            return value, (out.detach(), features, losses)

        grads, (twin_logits, features, losses) = torch.func.grad(objective, has_aux=True)(
            params, dict(self.twin.named_buffers())
        )
        return twin_logits, features, grads, (losses["twin_loss"], losses["twin_ce"], losses.get("main_ce"))

    def _features(self, popped: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name.removeprefix("twin."): value.detach() for name, value in popped.items()}

    def _finite(self, twin_logits: Tensor, logits: Tensor | None) -> Tensor:
        """Whether the batch is usable (0-d bool, on the device): `nan_policy`'s check of both models' logits."""
        tensors = {"twin logits": twin_logits} | ({} if logits is None else {"logits": logits.detach()})
        _, finite = guard_finite(tensors, self.nan_policy)
        if finite is not None:
            return finite
        if self.nan_policy == "propagate":
            return torch.ones((), dtype=torch.bool, device=twin_logits.device)
        # "raise": the error may come later (a GPU, torch.compile); the twin never takes in the batch meanwhile
        return torch.stack([torch.isfinite(t).all() for t in tensors.values()]).all()

    def _twin_step(self, grads: Grads, saved: list[Tensor], known: Tensor, finite: Tensor) -> None:
        """One Adam step of the twin where the batch has a known label and is finite (over every rank's batch)."""
        names = self.twin_optimizer.names
        count = known.sum()
        active = (count > 0) & finite
        if is_distributed():
            grads, active, finite = _over_ranks(grads, names, count, finite)
        self.twin_optimizer.lr = self.lr  # the option may have changed since
        params = {name: self.twin.get_parameter(name) for name in names}
        proposal = self.twin_optimizer.propose({n: p.detach() for n, p in params.items()}, lambda _: grads, 1)
        self.twin_optimizer.commit(proposal, params, active)
        _keep_buffers(self.twin, saved, finite)

    def _older_checkpoint_defaults(self) -> dict[str, Any]:
        # a checkpoint written before `freeze` existed holds no `frozen_flag`: its twin was never frozen
        return {"frozen_flag": torch.zeros((), dtype=torch.bool)}

    def extra_repr(self) -> str:
        shown = [f"num_samples={self.num_samples}", f"layers={list(self.layers)}", f"q={self.q}"]
        shown += [f"momentum={self.momentum}", f"lr={self.lr}"] + (["frozen=True"] if self._frozen else [])
        shown += [] if self.ignore_index == IGNORE_INDEX else [f"ignore_index={self.ignore_index}"]
        return ", ".join(shown + ([] if self.nan_policy == "raise" else [f"nan_policy={self.nan_policy!r}"]))


def _restore_frozen(module: nn.Module, _: object) -> None:
    """After `load_state_dict`: freeze or unfreeze as the loaded `frozen_flag` says (one host read, at load); the
    twin's modes are left as they are unless that changes."""
    if isinstance(module, BiasTwin) and bool(module.frozen_flag) != module.frozen:
        module.freeze(bool(module.frozen_flag))


@torch.no_grad()
def _update_averages(
    module: BiasTwin,
    indices: Tensor,
    labels: Tensor,
    update: Tensor,
    twin_ce: Tensor,
    main_ce: Tensor | None,
    pseudo_labels: Tensor,
) -> None:
    """LfF's moving averages of `module` at the batch's indices (summed over ranks first), each index's label and
    prediction, in place."""
    weight = update.to(torch.float64)
    main = torch.zeros_like(weight) if main_ce is None else main_ce.double() * weight
    values = [twin_ce.double() * weight, main, weight, labels.double() * weight, pseudo_labels.double() * weight]
    stats = weight.new_zeros(module.num_samples, 5).index_add_(
        0, indices.clamp(0, module.num_samples - 1), torch.stack(values, 1)
    )
    if is_distributed():
        stats = sum_across_ranks_detached(stats)
    count = stats[:, 2]
    hit = count > 0
    means = stats / count.clamp_min(1.0)[:, None]
    averages = [(module.twin_loss_ema, module.twin_seen, means[:, 0])]
    averages += [] if main_ce is None else [(module.main_loss_ema, module.main_seen, means[:, 1])]
    for average, seen, new in averages:
        new = new.to(average.dtype)
        average.copy_(torch.where(hit, torch.where(seen, torch.lerp(average, new, module.momentum), new), average))
        seen.copy_(seen | hit)
    module.sample_labels.copy_(torch.where(hit, means[:, 3].round().long(), module.sample_labels))
    module.sample_pseudo_labels.copy_(torch.where(hit, means[:, 4].round().long(), module.sample_pseudo_labels))


@torch.no_grad()
def _lff_weights(module: BiasTwin, indices: Tensor, labels: Tensor, usable: Tensor, num_classes: int) -> Tensor:
    """`w = ℓ̂_twin / (ℓ̂_twin + ℓ̂_main + 1e-8)` at the batch's indices, each average over its class's maximum."""
    slots = torch.where(module.sample_labels >= 0, module.sample_labels, num_classes).clamp(max=num_classes)
    classes = torch.where(usable, labels, num_classes).clamp(0, num_classes)
    rows = indices.clamp(0, module.num_samples - 1)

    def normalised(average: Tensor) -> Tensor:
        largest = average.new_zeros(num_classes + 1).scatter_reduce(0, slots, average, "amax")
        return average[rows] / largest[classes].clamp_min(torch.finfo(average.dtype).tiny)

    twin, main = normalised(module.twin_loss_ema), normalised(module.main_loss_ema)
    return torch.where(usable, twin / (twin + main + WEIGHT_EPS), torch.zeros_like(twin))


@torch.no_grad()
def _keep_buffers(twin: nn.Module, saved: list[Tensor], finite: Tensor) -> None:
    """The twin's floating-point buffers as saved where the batch was skipped, then averaged over ranks."""
    buffers = [b for b in twin.buffers() if b.is_floating_point()]
    for buffer, before in zip(buffers, saved, strict=True):
        buffer.copy_(torch.where(finite, buffer, before))
    if is_distributed() and buffers:
        flat = sum_across_ranks_detached(torch.cat([b.reshape(-1).float() for b in buffers]))
        parts = torch.split(flat / dist.get_world_size(), [b.numel() for b in buffers])
        for buffer, part in zip(buffers, parts, strict=True):
            buffer.copy_(part.reshape(buffer.shape))


def _check_fraction(value: object, name: str, meaning: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"'{name}' must be in (0, 1] ({meaning}), got {value!r}")
    return float(value)


def _build_twin(twin: object) -> nn.Module:
    """A deep copy of a module (refusing one with forward hooks), or what a factory returns."""
    if isinstance(twin, nn.Module):
        bare = unwrap_model(twin)
        hooked = [name or "(the model)" for name, m in bare.named_modules() if m._forward_hooks or m._forward_pre_hooks]
        if hooked:
            raise ValueError(
                f"the module to copy as the twin has forward hooks (on {hooked[:5]}): a FeatureTap's hooks would fire "
                "in the copy. Pass a function that builds the twin (twin=lambda: make_model()), or build the "
                "BiasTwin before tapping your model"
            )
        return copy.deepcopy(bare)
    if callable(twin):
        built = twin()
        if not isinstance(built, nn.Module):
            raise TypeError(f"'twin' was called as a factory and returned {type(built).__name__}, not an nn.Module")
        return built
    raise TypeError(f"'twin' must be an nn.Module or a function returning one, got {type(twin).__name__}")


class _TapRoot(nn.Module):
    """The tap's root: it holds the twin and is never called, so only the layers' capture hooks run (the root's
    forward pre-hook, which counts passes outside compiled graphs, never does: no graph break)."""

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        self.twin = twin


def _tap_of(twin: nn.Module, layers: str | Iterable[str]) -> FeatureTap:
    specs = [layers] if isinstance(layers, str) else list(layers)
    for spec in specs:
        if not isinstance(spec, str):
            raise TypeError(f"'layers' must be names or glob patterns of the twin's layers, got {type(spec).__name__}")
    return FeatureTap(_TapRoot(twin), [f"twin.{spec}" for spec in specs], detach=True)


def _twin_logits(out: object, batch: int, logits: Tensor | None) -> Tensor:
    """The twin's output if it is `(batch, K)` floating-point logits (`K` that of your `logits` when given)."""
    shaped = isinstance(out, Tensor) and out.is_floating_point() and out.dim() == 2 and out.shape[0] == batch
    if shaped and isinstance(out, Tensor) and (logits is None or out.shape[1] == logits.shape[1]):
        return out
    got = f"shape {tuple(out.shape)} ({out.dtype})" if isinstance(out, Tensor) else type(out).__name__
    width, mine = ("K", "") if logits is None else (str(logits.shape[1]), f" as your 'logits' {tuple(logits.shape)}")
    raise ValueError(
        f"the twin must map 'inputs' to logits of shape ({batch}, {width}) for 'labels' of shape ({batch},){mine}, "
        f"got {got}"
    )


def _check_integers(t: object, name: str, batch: int, what: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor of {what}, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"'{name}' must hold integer {what}, got dtype {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(
            f"'{name}' must have shape ({batch},) to match 'inputs' of batch {batch}, got {tuple(t.shape)}"
        )
    return t


def _check_batch(inputs: object, labels: object, indices: object, logits: object, num_samples: int) -> int:
    """The batch size; raises for wrong types, shapes and devices at once, and defers the index range check."""
    if not isinstance(inputs, Tensor) or inputs.dim() < 1:
        got = f"shape {tuple(inputs.shape)}" if isinstance(inputs, Tensor) else type(inputs).__name__
        raise TypeError(f"'inputs' must be a tensor with a batch dimension first, got {got}")
    batch = inputs.shape[0]
    tensors = {"inputs": inputs, "labels": _check_integers(labels, "labels", batch, "class indices")}
    tensors["indices"] = _check_integers(indices, "indices", batch, "dataset indices")
    if logits is not None:
        main = tensors["logits"] = check_tensor(logits, "logits", min_dim=2)
        if main.dim() != 2 or main.shape[0] != batch:
            raise ValueError(
                f"'logits' must have shape ({batch}, K) to match 'inputs' of batch {batch}, got {tuple(main.shape)}"
            )
    check_same_device(tensors)
    index = tensors["indices"]
    if index.numel():
        invalid = (index < 0) | (index >= num_samples)
        first = index.gather(0, invalid.to(torch.int32).argmax().reshape(1))
        values = torch.cat([invalid.any().reshape(1).to(torch.int64), first.to(torch.int64)])
        raise_if_invalid(values, functools.partial(_index_message, num_samples, batch))
    return batch


def _index_message(num_samples: int, batch: int, values: list[int]) -> str | None:
    invalid, value = values
    if not invalid:
        return None
    return (
        f"'indices' holds {value}, outside [0, {num_samples}) for num_samples={num_samples} (indices of shape "
        f"({batch},)): give BiasTwin the size of the training set, and the data set's indices of the samples"
    )


def _twin_loss(twin_logits: Tensor, labels: Tensor, known: Tensor, q: float) -> Tensor:
    """The twin's mean GCE over the known samples, in float32 at least."""
    z = twin_logits.to(torch.promote_types(twin_logits.dtype, torch.float32))
    return generalized_cross_entropy_unchecked(z, labels, known, q=q).sum() / _count(known, z.dtype)


def _count(known: Tensor, dtype: torch.dtype) -> Tensor:
    return known.sum().clamp_min(1).to(dtype)


def _cross_entropy(logits: Tensor, labels: Tensor, known: Tensor) -> Tensor:
    """Per-sample cross-entropy in float32 (float64 logits: float64), 0 where the label is unknown."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    index = torch.where(known, labels, 0).clamp(0, z.shape[1] - 1)
    return torch.where(
        known, F.cross_entropy(z, index, reduction="none"), torch.zeros((), dtype=z.dtype, device=z.device)
    )


def _over_ranks(grads: Grads, names: list[str], count: Tensor, finite: Tensor) -> tuple[Grads, Tensor, Tensor]:
    """The gradient of the mean GCE over every rank's known samples, whether to step, and whether every rank's
    batch is finite: each rank's mean gradient times its count, summed over ranks, over the total count."""
    totals = sum_across_ranks_detached(torch.stack([count.to(torch.float64), (~finite).to(torch.float64)]))
    dtype = torch.promote_types(grads[names[0]].dtype, torch.float32)
    flat = torch.cat([grads[name].reshape(-1).to(dtype) for name in names])
    flat = torch.where(finite, flat * count.to(dtype), torch.zeros((), dtype=dtype, device=flat.device))
    parts = torch.split(
        sum_across_ranks_detached(flat) / totals[0].clamp_min(1.0).to(dtype), [grads[n].numel() for n in names]
    )
    summed = {
        name: part.reshape(grads[name].shape).to(grads[name].dtype) for name, part in zip(names, parts, strict=True)
    }
    all_finite = totals[1] == 0
    return summed, (totals[0] > 0) & all_finite, all_finite
