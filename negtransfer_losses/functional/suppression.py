"""Suppressing what task-irrelevant labels describe (METHODS.md §2).

The TIRTL / PurifiedLearning papers (Li et al.) did not publish their mechanism; these are principled,
published stand-ins, each with its reference. Labels equal to `ignore_index` are unknown and left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._labels import IGNORE_INDEX, check_labels
from .._validation import check_min_batch, check_tensor, compute_dtype, full_precision, zero_with_grad
from ..distributed import Gather, gather_batch
from .similarity import Kernel, cka, hsic_from_kernels, kernel_alignment, kernel_matrix


def irrelevant_hsic(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    kernel: Kernel = "linear",
    normalized: bool = False,
    sigma: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    gather: Gather = "local",
) -> Tensor:
    """Unbiased HSIC between features and one-hot irrelevant labels, over the samples whose label is known.

    `HSIC_1(K_z, L_u)` with `K_z` a linear (or RBF) kernel on `z` and `L_u = onehot(u) onehot(u)ᵀ`, the
    delta kernel on `u` (ReBias, Bahng et al. ICML 2020, uses HSIC this way against a biased network).
    `normalized=True` gives `HSIC_1(K, L) / sqrt(HSIC_1(K, K) · HSIC_1(L, L))`, a CKA-style value in
    about [0, 1] (0 where a side is constant, e.g. only one class known).

    The batch (`features.shape[0]`) must hold at least 4 samples. With fewer than 4 known labels the
    estimator is undefined and the result is a zero loss with a zero gradient, as with no label known.

    Args:
        features: `(B, ...)`, flattened to `(B, D)`.
        labels: `(B,)` integers in `[0, num_classes)` or `ignore_index`.
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`).

    Returns:
        a scalar tensor.
    """
    check_tensor(features, "features")
    check_labels(
        labels,
        num_classes,
        features.shape[0],
        name="irrelevant_labels",
        what="irrelevant classes",
        ignore_index=ignore_index,
        device=features.device,
    )
    features, labels = gather_batch(features, gather), gather_batch(labels, gather)
    check_min_batch(features.shape[0], 4, what="unbiased HSIC", name="features")
    known = labels != ignore_index
    if int(known.sum()) < 4:
        return zero_with_grad(features)
    with full_precision(features):
        z = features[known]
        onehot = F.one_hot(labels[known], num_classes).to(compute_dtype(features))
        k = kernel_matrix(z, kernel, sigma)
        l = kernel_matrix(onehot, "linear")
        if not normalized:
            return hsic_from_kernels(k, l, unbiased=True)
        return kernel_alignment(k, l, unbiased=True)


def irrelevant_cka(
    features: Tensor, irrelevant_features: Tensor, unbiased: bool = False, gather: Gather = "local"
) -> Tensor:
    """Linear CKA between the features and a frozen irrelevant network's features on the same batch.

    Kornblith et al. 2019. The irrelevant side is detached. Widths may differ.
    """
    check_tensor(irrelevant_features, "irrelevant_features")
    return cka(features, irrelevant_features.detach(), kernel="linear", unbiased=unbiased, gather=gather)


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, strength: float) -> Tensor:
        ctx.strength = strength  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.strength * grad, None  # type: ignore[attr-defined]


def gradient_reversal(x: Tensor, strength: float = 1.0) -> Tensor:
    """Identity forward; the backward pass multiplies the gradient by `-strength` (Ganin & Lempitsky 2015)."""
    check_tensor(x, "x")
    reversed_grad: Tensor = _GradientReversal.apply(x, float(strength))  # type: ignore[no-untyped-call]
    return reversed_grad


def adversarial_suppression(
    features: Tensor,
    labels: Tensor | None,
    head: nn.Module,
    num_classes: int,
    strength: float = 1.0,
    entropy_weight: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """`CE(h(GRL_λ(z)), u)` over known labels, plus `λ_ent · mean Σ p log p` of `h(z)` on every sample.

    The head `h` learns to predict `u`; the reversed gradient makes `z` uninformative of `u` (Ganin &
    Lempitsky 2015). The entropy term (Kim et al., "Learning Not to Learn", CVPR 2019) pushes `z` towards
    features on which the head is uncertain; it reaches the features only, not the head. No label
    known: the CE term is zero with a zero gradient.

    Args:
        features: `(B, ...)`, flattened to `(B, D)` for the head.
        labels: `(B,)` or None (entropy term only).
        head: maps `(B, D)` to `(B, num_classes)` logits.
        strength: λ of the gradient reversal.
    """
    check_tensor(features, "features")
    z = features.reshape(features.shape[0], -1)
    loss = zero_with_grad(features)
    if labels is not None:
        check_labels(
            labels,
            num_classes,
            features.shape[0],
            name="irrelevant_labels",
            what="irrelevant classes",
            ignore_index=ignore_index,
            device=features.device,
        )
        known = labels != ignore_index
        if bool(known.any()):
            logits = _head_logits(head, gradient_reversal(z, strength), num_classes)
            loss = loss + F.cross_entropy(logits[known].float(), labels[known], reduction="mean")
    if entropy_weight:
        frozen_params = {name: p.detach() for name, p in head.named_parameters()}
        logits = _head_logits(head, z, num_classes, frozen_params)
        log_p = F.log_softmax(logits.float(), dim=1)
        loss = loss + entropy_weight * (log_p.exp() * log_p).sum(dim=1).mean()
    return loss


def _head_logits(head: nn.Module, z: Tensor, num_classes: int, params: Mapping[str, Tensor] | None = None) -> Tensor:
    try:
        logits = head(z) if params is None else torch.func.functional_call(head, dict(params), (z,))
    except RuntimeError as error:  # e.g. a Linear head built for another feature size
        raise ValueError(
            f"the adversarial head could not take features of shape {tuple(z.shape)} (flattened): {error}"
        ) from error
    if not isinstance(logits, Tensor) or logits.shape != (z.shape[0], num_classes):
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the adversarial head must map features of shape {tuple(z.shape)} to logits "
            f"({z.shape[0]}, {num_classes}), got {shape}"
        )
    return logits


def erasure_basis(class_means: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis `Q (D, r)` of `span{μ_k - μ̄}` for class means `(K, D)`; `r ≤ K - 1`.

    Directions whose singular value is below `rtol` times the largest are dropped (equal means give
    `r = 0`). Any weighting of `μ̄` spans the same space.
    """
    check_tensor(class_means, "class_means", min_dim=2)
    differences = class_means - class_means.mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(differences, full_matrices=False)
    keep = singular > rtol * singular.max().clamp_min(torch.finfo(singular.dtype).tiny)
    return torch.transpose(vh[keep], 0, 1)


def erase(features: Tensor, basis: Tensor) -> Tensor:
    """`z - z P` with `P = Q Qᵀ` the orthogonal projector onto the basis (no gradient through `Q`).

    Args:
        features: `(B, ...)`, flattened to `(B, D)` and returned in its own shape and dtype.
        basis: `(D, r)` orthonormal columns.
    """
    check_tensor(features, "features")
    z = features.reshape(features.shape[0], -1)
    if basis.shape[0] != z.shape[1]:
        raise ValueError(
            f"'features' have {z.shape[1]} values per sample (shape {tuple(features.shape)}) but the erasure "
            f"basis is for dimension {basis.shape[0]}"
        )
    with full_precision(features):
        dtype = compute_dtype(features)
        zc, q = z.to(dtype), basis.detach().to(dtype)
        return (zc - (zc @ q) @ q.T).to(features.dtype).reshape(features.shape)
