"""The adversary against task-irrelevant labels: gradient reversal and a head that predicts them.

Ganin & Lempitsky 2015 (gradient reversal), Kim et al. CVPR 2019 (the entropy term); the conditional form is the
library's own (docs/task-irrelevant-labels.md). Labels equal to `ignore_index` are unknown and left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import check_tensor, compute_dtype, zero_with_grad
from ._groups import (
    centre_within_groups,
    check_irrelevant_labels,
    check_task_labels,
    within_class_groups,
    within_class_log_prior,
)

# λ of the adversary's gradient reversal unless given (functional and module alike)
DEFAULT_STRENGTH = 0.3


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None  # type: ignore[attr-defined]


def gradient_reversal(x: Tensor, strength: float) -> Tensor:
    """Identity forward; the backward pass multiplies the gradient by `-strength` (Ganin & Lempitsky 2015)."""
    check_tensor(x, "x")
    reversed_grad: Tensor = _GradientReversal.apply(x, float(strength))  # type: ignore[no-untyped-call]
    return reversed_grad


def adversarial_suppression(
    features: Tensor,
    labels: Tensor | None,
    head: nn.Module,
    num_irrelevant: int,
    strength: float = DEFAULT_STRENGTH,
    entropy_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
    *,
    task_labels: Tensor | None = None,
    head_parameters: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """`CE(h(GRL_λ(z)), u)` over known labels, plus `λ_ent · mean Σ p log p` of `h(z)` on every sample.

    The head `h` learns to predict `u`; the reversed gradient makes `z` uninformative of `u` (Ganin &
    Lempitsky 2015). The entropy term (Kim et al., "Learning Not to Learn", CVPR 2019) pushes `z` towards
    features on which the head is uncertain; it reaches the features only, not the head. No label
    known: the CE term is zero with a zero gradient.

    **Conditional** (`task_labels` given; the library's own): the head sees the features centred within
    their task class, `z_i - z̄_{y_i}`, over the eligible samples of `within_class_groups` (`u` and `y`
    known, at least two `u` values in the class) and only those, and its logits are offset by the batch's
    log-prior of `u` in the class, `log p̂(u = k | y) = log((n_{y,k} + ½) / (n_y + K/2))` (counts over the
    eligible samples, a constant): `CE(h(GRL_λ(z - z̄_y)) + log p̂(· | y), u)` averaged over them (the
    entropy term, if any, on `h(z - z̄_y)` over them too). What separates the task classes is invisible to
    the head, and what `y` says about `u` is given to it, so the reversed gradient removes only what
    predicts `u` within a class beyond its prior.

    Args:
        features: `(B, ...)`, flattened to `(B, D)` for the head.
        labels: `(B,)` or None (entropy term only; not allowed in the conditional form).
        head: maps `(B, D)` to `(B, num_irrelevant)` logits.
        strength: λ of the gradient reversal. The default, 0.3, is the library's choice: at an effective
            0.9 (weight 3 × strength 0.3) the module's conditional adversary lost 22–36 points of
            unbiased accuracy on the biased-digits case study at 90–95 % correlation, at 0.3 it gained
            8–18 points at every correlation (docs/task-irrelevant-labels.md).
        task_labels: `(B,)` task classes (`ignore_index` for unknown) for the conditional form, or None.
        head_parameters: values to call `head` with instead of its own parameters (`torch.func.functional_call`),
            e.g. a reparametrization of them.
    """
    check_tensor(features, "features")
    z = features.reshape(features.shape[0], -1)
    loss = zero_with_grad(features)
    prior: Tensor | None = None
    if task_labels is not None:
        if labels is None:
            raise ValueError("the conditional adversarial loss needs 'irrelevant_labels' as well as 'task_labels'")
        check_irrelevant_labels(labels, num_irrelevant, features, ignore_index=ignore_index)
        check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
        eligible, classmates = within_class_groups(labels, task_labels, num_irrelevant, ignore_index)
        if not bool(eligible.any()):
            return loss
        z = centre_within_groups(z, classmates, eligible)[eligible]
        prior = within_class_log_prior(labels, classmates, num_irrelevant, z.dtype)[eligible]
        labels = labels[eligible]
    elif labels is not None:
        check_irrelevant_labels(labels, num_irrelevant, features, ignore_index=ignore_index)
    if labels is not None:
        known = labels != ignore_index
        if bool(known.any()):
            logits = _head_logits(head, gradient_reversal(z, strength), num_irrelevant, head_parameters)
            if prior is not None:
                logits = logits + prior
            loss = loss + F.cross_entropy(logits[known].to(compute_dtype(logits)), labels[known], reduction="mean")
    if entropy_weight:
        params = head_parameters if head_parameters is not None else dict(head.named_parameters())
        logits = _head_logits(head, z, num_irrelevant, {name: p.detach() for name, p in params.items()})
        log_p = F.log_softmax(logits.to(compute_dtype(logits)), dim=1)
        loss = loss + entropy_weight * (log_p.exp() * log_p).sum(dim=1).mean()
    return loss


def _head_logits(head: nn.Module, z: Tensor, num_irrelevant: int, params: Mapping[str, Tensor] | None = None) -> Tensor:
    try:
        logits = head(z) if params is None else torch.func.functional_call(head, dict(params), (z,))
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
