"""The adversary against task-irrelevant labels: gradient reversal and a head that predicts them.

Ganin & Lempitsky 2015 (gradient reversal), Kim et al. CVPR 2019 (the entropy term); the conditional form is the
library's own (docs/task-irrelevant-labels.md). Labels equal to `ignore_index` are unknown and left out.

Everything here has fixed shapes and never reads a value on the host: samples are left out by weights (a
cross-entropy averaged as `Σ w_i ce_i / max(Σ w_i, 1)`), not by boolean indexing, so a GPU runs it without
waiting and `torch.compile(fullgraph=True)` traces it as one graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import check_tensor, compute_dtype, zero_with_grad
from ._groups import (
    centre_within_groups,
    check_irrelevant_labels,
    check_task_labels,
    member_rows,
    within_class_groups,
    within_class_log_prior,
)

DEFAULT_STRENGTH = 0.3
"""λ of the adversary's gradient reversal unless given (functional and module alike)."""


class _GradientReversal(torch.autograd.Function):
    # forward and setup_context apart: the form torch.func transforms (the module's inner head steps) accept
    @staticmethod
    def forward(x: Tensor, strength: float | Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, float | Tensor], output: Tensor) -> None:
        strength = inputs[1]
        if isinstance(strength, Tensor):
            ctx.save_for_backward(strength)
            ctx.strength = None
        else:
            ctx.strength = strength

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        if ctx.strength is None:
            (strength,) = ctx.saved_tensors
            return -strength.to(grad.dtype) * grad, None
        return -ctx.strength * grad, None


def gradient_reversal(x: Tensor, strength: float | Tensor) -> Tensor:
    """The identity forward; the backward pass multiplies the gradient by `-strength` (Ganin & Lempitsky 2015).

    Args:
        x: any floating-point tensor.
        strength: λ, a Python number or a 0-d tensor on `x`'s device (e.g. a warm-up schedule computed on the
            device, which then needs no host read). No gradient flows to it.

    Returns:
        `x` (a view), whose gradient is `-strength` times the incoming one.

    Raises:
        TypeError: if `x` is not a floating-point tensor, or `strength` a tensor of more than one value.
    """
    check_tensor(x, "x")
    if isinstance(strength, Tensor):
        if strength.numel() != 1:
            raise TypeError(f"'strength' must be a number or a one-value tensor, got shape {tuple(strength.shape)}")
        strength = strength.detach().reshape(())
    else:
        strength = float(strength)
    reversed_grad: Tensor = _GradientReversal.apply(x, strength)  # type: ignore[no-untyped-call]
    return reversed_grad


class AdversarialBatch(NamedTuple):
    """A batch as the adversary's head sees it: checked and laid out once, for the loss and the head's own steps.

    Attributes:
        features: `(B, D)` what the head is shown: the flattened features, or (conditional) the features
            centred within their task class, zero outside the eligible samples. The cross-entropy shows the
            head zeros in the rows of weight 0, so that NaN or inf there never reaches it.
        labels: `(B,)` the irrelevant labels with unknown ones replaced by 0 (their weight is 0), or None.
        weights: `(B,)` 1 for the samples the cross-entropy averages over (known `u`; conditional: eligible),
            0 for the others; None when there are no labels.
        prior: `(B, K)` the within-class log-prior added to the logits (conditional), or None.
        entropy_weights: `(B,)` the samples the entropy term averages over (every sample, or the eligible ones).
    """

    features: Tensor
    labels: Tensor | None
    weights: Tensor | None
    prior: Tensor | None
    entropy_weights: Tensor


def adversarial_batch(
    features: Tensor,
    irrelevant_labels: Tensor | None,
    *,
    num_irrelevant: int,
    ignore_index: int = IGNORE_INDEX,
    task_labels: Tensor | None = None,
) -> AdversarialBatch:
    """Check the inputs of `adversarial_suppression` and lay them out for the head (fixed shapes, no host read).

    Args:
        features: `(B, ...)`, flattened to `(B, D)`.
        irrelevant_labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`, or None.
        num_irrelevant: number of irrelevant classes `K`.
        ignore_index: the label of unknown samples.
        task_labels: `(B,)` task classes for the conditional form, or None.

    Returns:
        The `AdversarialBatch`.

    Raises:
        TypeError: for non-float features or non-integer labels.
        ValueError: for labels of the wrong shape or device or out of range (see `check_labels`), or task
            labels without irrelevant labels.
    """
    check_tensor(features, "features")
    z = features.reshape(features.shape[0], -1)
    ones = torch.ones(z.shape[0], dtype=compute_dtype(z), device=z.device)
    if task_labels is not None:
        if irrelevant_labels is None:
            raise ValueError("the conditional adversarial loss needs 'irrelevant_labels' as well as 'task_labels'")
        check_irrelevant_labels(irrelevant_labels, num_irrelevant, features, ignore_index=ignore_index)
        check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
        eligible, classmates = within_class_groups(irrelevant_labels, task_labels, num_irrelevant, ignore_index)
        weights = eligible.to(ones.dtype)
        prior = within_class_log_prior(irrelevant_labels, classmates, num_irrelevant, ones.dtype)
        z = centre_within_groups(z, classmates, eligible)
        return AdversarialBatch(z, _known_or_zero(irrelevant_labels, eligible, num_irrelevant), weights, prior, weights)
    if irrelevant_labels is None:
        return AdversarialBatch(z, None, None, None, ones)
    check_irrelevant_labels(irrelevant_labels, num_irrelevant, features, ignore_index=ignore_index)
    known = irrelevant_labels != ignore_index
    return AdversarialBatch(
        z, _known_or_zero(irrelevant_labels, known, num_irrelevant), known.to(ones.dtype), None, ones
    )


def adversarial_cross_entropy(
    batch: AdversarialBatch,
    head: nn.Module,
    *,
    num_irrelevant: int,
    strength: float | Tensor = DEFAULT_STRENGTH,
    head_parameters: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """`Σ_i w_i CE(h(GRL_λ(z_i)) + prior_i, u_i) / max(Σ_i w_i, 1)`: the head's loss on a prepared batch.

    Zero, with a zero gradient, when no sample has weight (or the batch has no labels).

    Args:
        batch: from `adversarial_batch`.
        head: maps `(B, D)` to `(B, num_irrelevant)` logits.
        num_irrelevant: number of irrelevant classes `K`.
        strength: λ of the gradient reversal (a number or a 0-d tensor).
        head_parameters: values to call `head` with instead of its own parameters, or None.

    Returns:
        A scalar in the compute dtype (float32, float64 for float64 features).

    Raises:
        ValueError: if the head cannot take the features or does not return `(B, num_irrelevant)` logits.
    """
    z = batch.features
    if batch.labels is None or batch.weights is None:
        return zero_with_grad(z)
    # rows of weight 0 never reach the cross-entropy, even when they hold NaN or inf
    z = member_rows(z, batch.weights > 0)
    logits = _head_logits(
        gradient_reversal(z, strength), head=head, num_irrelevant=num_irrelevant, params=head_parameters
    )
    logits = logits.to(compute_dtype(logits, z))
    if batch.prior is not None:
        logits = logits + batch.prior.to(logits.dtype)
    ce = F.cross_entropy(logits, batch.labels, reduction="none")
    weights = batch.weights.to(ce.dtype)
    return (weights * ce).sum() / weights.sum().clamp_min(1.0)


def adversarial_loss(
    batch: AdversarialBatch,
    head: nn.Module,
    *,
    num_irrelevant: int,
    strength: float | Tensor = DEFAULT_STRENGTH,
    entropy_weight: float = 0.0,
    head_parameters: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """`adversarial_cross_entropy` plus `entropy_weight · mean Σ p log p` of the head on a prepared batch.

    The value of `adversarial_suppression`, on a batch prepared once by `adversarial_batch`.

    Args:
        batch: from `adversarial_batch`.
        head: maps `(B, D)` to `(B, num_irrelevant)` logits.
        num_irrelevant: number of irrelevant classes `K`.
        strength: λ of the gradient reversal (a number or a 0-d tensor).
        entropy_weight: `λ_ent`; the term reaches the features only (the head's parameters are detached in it).
        head_parameters: values to call `head` with instead of its own parameters, or None.

    Returns:
        A scalar in the compute dtype.

    Raises:
        ValueError: if the head cannot take the features or does not return `(B, num_irrelevant)` logits.
    """
    loss = adversarial_cross_entropy(
        batch, head, num_irrelevant=num_irrelevant, strength=strength, head_parameters=head_parameters
    )
    if entropy_weight:
        params = head_parameters if head_parameters is not None else dict(head.named_parameters())
        logits = _head_logits(batch.features, head=head, num_irrelevant=num_irrelevant, params=params, detach=True)
        log_p = F.log_softmax(logits.to(compute_dtype(logits, batch.features)), dim=1)
        per_sample = (log_p.exp() * log_p).sum(dim=1)
        weights = batch.entropy_weights.to(per_sample.dtype)
        loss = loss + entropy_weight * (weights * per_sample).sum() / weights.sum().clamp_min(1.0)
    return loss


def adversarial_suppression(
    features: Tensor,
    irrelevant_labels: Tensor | None,
    head: nn.Module,
    *,
    num_irrelevant: int,
    strength: float | Tensor = DEFAULT_STRENGTH,
    entropy_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    task_labels: Tensor | None = None,
    head_parameters: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """`CE(h(GRL_λ(z)), u)` over known labels, plus `λ_ent · mean Σ p log p` of `h(z)` on every sample.

    The head `h` learns to predict `u`; the reversed gradient makes `z` uninformative of `u` (Ganin &
    Lempitsky 2015). The entropy term (Kim et al., "Learning Not to Learn", CVPR 2019) pushes `z` towards
    features on which the head is uncertain; it reaches the features only, not the head. No label
    known: the CE term is zero with a zero gradient. The CE is `Σ_i w_i ce_i / max(Σ_i w_i, 1)` with `w_i` = 1
    for the samples it averages over: fixed shapes, no host read, one graph under `torch.compile`.

    **Conditional** (`task_labels` given; the library's own): the head sees the features centred within
    their task class, `z_i - z̄_{y_i}`, over the eligible samples of `within_class_groups` (`u` and `y`
    known, at least two `u` values in the class) and only those, and its logits are offset by the batch's
    log-prior of `u` in the class, `log p̂(u = k | y) = log((n_{y,k} + ½) / (n_y + K/2))` (counts over the
    eligible samples, a constant): `CE(h(GRL_λ(z - z̄_y)) + log p̂(· | y), u)` averaged over them (the
    entropy term, if any, on `h(z - z̄_y)` over them too). What separates the task classes is invisible to
    the head, and what `y` says about `u` is given to it, so the reversed gradient removes only what
    predicts `u` within a class beyond its prior.

    This is the loss of the head as it is. `AdversarialSuppression` in training mode first lets its head take
    `head_steps` Adam steps of its own on the batch, so its value there is that of the head after them, lower;
    in eval mode, or with `head_steps=0`, the module's value is this function's times its `weight`.

    Args:
        features: `(B, ...)`, flattened to `(B, D)` for the head.
        irrelevant_labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index` (unknown), or None
            (entropy term only; not allowed in the conditional form).
        head: maps `(B, D)` to `(B, num_irrelevant)` logits.
        num_irrelevant: number of irrelevant classes `K`.
        strength: λ of the gradient reversal, a number or a 0-d tensor. The default, 0.3, is the library's
            choice: a stronger reversal cost the conditional adversary much of the task on the biased-digits
            case study, where 0.3 helped at every correlation (docs/task-irrelevant-labels.md has the numbers).
        entropy_weight: `λ_ent` of the entropy term (0: none).
        ignore_index: the label of unknown samples (`u` and `y`).
        task_labels: `(B,)` task classes (`ignore_index` for unknown) for the conditional form, or None.
        head_parameters: values to call `head` with instead of its own parameters (`torch.func.functional_call`).

    Returns:
        A scalar: float32, or float64 for float64 features.

    Raises:
        TypeError: for non-float features or non-integer labels.
        ValueError: for labels of the wrong shape, device or range (at once on the CPU, from a later check
            on other devices; see `negtransfer_losses.raise_pending_errors`), task labels without irrelevant
            labels, or a head that does not map `(B, D)` to `(B, num_irrelevant)`.
    """
    batch = adversarial_batch(
        features, irrelevant_labels, num_irrelevant=num_irrelevant, ignore_index=ignore_index, task_labels=task_labels
    )
    return adversarial_loss(
        batch,
        head,
        num_irrelevant=num_irrelevant,
        strength=strength,
        entropy_weight=entropy_weight,
        head_parameters=head_parameters,
    )


def _known_or_zero(labels: Tensor, keep: Tensor, num_classes: int) -> Tensor:
    """The kept labels, 0 elsewhere, clamped into `[0, num_classes)`: a label out of range is reported by the
    deferred check (`check_labels`) instead of tripping a GPU's device-side assert in the cross-entropy."""
    kept = torch.where(keep, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    return kept.clamp(0, num_classes - 1)


def _head_logits(
    z: Tensor,
    *,
    head: nn.Module,
    num_irrelevant: int,
    params: Mapping[str, Tensor] | None = None,
    detach: bool = False,
) -> Tensor:
    if params is not None and detach:
        params = {name: p.detach() for name, p in params.items()}
    try:
        logits = head(z) if params is None else torch.func.functional_call(head, dict(params), (z,))
    except torch.OutOfMemoryError:
        raise  # not a shape problem: the device's own error says what it is
    except RuntimeError as error:  # e.g. a Linear head built for another feature size
        raise ValueError(
            f"the adversarial head could not take features of shape {tuple(z.shape)} (flattened): {error}"
        ) from error
    if not isinstance(logits, Tensor) or logits.shape != (z.shape[0], num_irrelevant):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the adversarial head must map features of shape {tuple(z.shape)} to logits "
            f"({z.shape[0]}, {num_irrelevant}), got {shape}"
        )
    return logits
