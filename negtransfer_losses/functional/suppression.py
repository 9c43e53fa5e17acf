"""Suppressing what task-irrelevant labels describe (docs/task-irrelevant-labels.md).

The TIRTL / PurifiedLearning papers (Li et al.) did not publish their mechanism; these are principled,
published stand-ins, each with its reference, and conditional variants that are the library's own. Labels
equal to `ignore_index` are unknown and left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._labels import IGNORE_INDEX, check_labels
from .._validation import (
    check_min_batch,
    check_tensor,
    compute_dtype,
    full_precision,
    zero_with_grad,
)
from ..distributed import Gather, gather_batch
from .similarity import Kernel, cka, hsic_from_kernels, kernel_alignment, kernel_matrix

# λ of the adversary's gradient reversal unless given (functional and module alike)
DEFAULT_STRENGTH = 0.3


def check_task_labels(
    labels: object, batch: int, *, ignore_index: int = IGNORE_INDEX, device: torch.device | None = None
) -> Tensor:
    """Raise unless `labels` is an integer tensor `(batch,)` of task classes (`≥ 0`) or `ignore_index`.

    The conditional variants need no count of task classes: only which samples share a class.
    """
    return check_labels(
        labels, None, batch, name="task_labels", what="task classes", ignore_index=ignore_index, device=device
    )


def _check_irrelevant(labels: object, num_irrelevant: int, features: Tensor, ignore_index: int) -> Tensor:
    return check_labels(
        labels,
        num_irrelevant,
        features.shape[0],
        name="irrelevant_labels",
        what="irrelevant classes",
        ignore_index=ignore_index,
        device=features.device,
    )


def _hsic_value(
    z: Tensor, onehot: Tensor, kernel: Kernel, normalized: bool, sigma: float | None, unbiased: bool
) -> Tensor:
    k = kernel_matrix(z, kernel, sigma)
    l = kernel_matrix(onehot, "linear")
    if not normalized:
        return hsic_from_kernels(k, l, unbiased=unbiased)
    return kernel_alignment(k, l, unbiased=unbiased)


def irrelevant_hsic(
    features: Tensor,
    labels: Tensor,
    num_irrelevant: int,
    kernel: Kernel = "linear",
    normalized: bool = False,
    sigma: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    gather: Gather = "local",
    *,
    unbiased: bool = True,
    task_labels: Tensor | None = None,
) -> Tensor:
    """HSIC between features and one-hot irrelevant labels, over the samples whose label is known.

    `HSIC(K_z, L_u)` with `K_z` a linear (or RBF) kernel on `z` and `L_u = onehot(u) onehot(u)ᵀ`, the
    delta kernel on `u` (ReBias, Bahng et al. ICML 2020, uses HSIC this way against a biased network);
    Song et al.'s unbiased estimator `HSIC_1` by default (`n ≥ 4`), the biased `HSIC_0` with
    `unbiased=False` (`n ≥ 2`). `normalized=True` gives `HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`, a
    CKA-style value in about [0, 1] (0 where a side is constant, e.g. only one class known).

    **Conditional** (`task_labels` given; the library's own): the sum over task classes `c` of the
    within-class values, weighted by class size,
    `Σ_c n_c · HSIC(K_z[c], L_u[c]) / Σ_c n_c` over the *eligible* classes: those with at least `n_min`
    samples whose `u` and `y` are both known (`n_min = 4` unbiased, 2 biased) and at least two distinct
    `u` values among them. Other classes contribute nothing; with no eligible class the result is a zero
    loss with a zero gradient. It measures what `z` says about `u` within each task class, i.e. beyond `y`.

    With fewer than `n_min` known labels the estimator is undefined and the result is a zero loss with a
    zero gradient, as with no label known; the batch itself must hold at least `n_min` samples.

    Args:
        features: `(B, ...)`, flattened to `(B, D)`.
        labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`.
        num_irrelevant: number of irrelevant classes.
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`).
        unbiased: the estimator.
        task_labels: `(B,)` task classes (`ignore_index` for unknown) for the conditional form, or None.

    Returns:
        a scalar tensor.
    """
    check_tensor(features, "features")
    _check_irrelevant(labels, num_irrelevant, features, ignore_index)
    if task_labels is not None:
        check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
    minimum = 4 if unbiased else 2
    features, labels = gather_batch(features, gather), gather_batch(labels, gather)
    if task_labels is not None:
        task_labels = gather_batch(task_labels, gather)
    check_min_batch(features.shape[0], minimum, what=f"{'unbiased' if unbiased else 'biased'} HSIC", name="features")
    known = labels != ignore_index
    if task_labels is not None:
        known = known & (task_labels != ignore_index)
    if int(known.sum()) < minimum:
        return zero_with_grad(features)
    with full_precision(features):
        z = features[known].reshape(int(known.sum()), -1)
        onehot = F.one_hot(labels[known], num_irrelevant).to(compute_dtype(features))
        if task_labels is None:
            return _hsic_value(z, onehot, kernel, normalized, sigma, unbiased)
        y, u = task_labels[known], labels[known]
        total, weights = zero_with_grad(features), 0
        for c in torch.unique(y).tolist():
            members = y == c
            n_c = int(members.sum())
            if n_c < minimum or torch.unique(u[members]).numel() < 2:
                continue
            total = total + n_c * _hsic_value(z[members], onehot[members], kernel, normalized, sigma, unbiased)
            weights += n_c
        return total / weights if weights else total


def within_class_groups(
    labels: Tensor, task_labels: Tensor, num_irrelevant: int, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """`(eligible, group)`: which samples enter a conditional estimate, and their task class as `0..G-1`.

    A sample is eligible when its `u` and `y` are both known and its task class holds at least two distinct
    known `u` values in the batch (a class with a single `u` value says nothing about `u` beyond `y`).
    `group[i]` numbers the task classes present among the eligible samples (arbitrary for the others).
    """
    known = (labels != ignore_index) & (task_labels != ignore_index)
    classes, group = torch.unique(torch.where(known, task_labels, -1), return_inverse=True)
    counts = torch.zeros(classes.numel() * num_irrelevant, dtype=torch.long, device=labels.device)
    cell = group * num_irrelevant + labels.clamp(0, num_irrelevant - 1)
    counts.index_add_(0, cell[known], torch.ones_like(cell[known]))
    distinct = (counts.reshape(classes.numel(), num_irrelevant) > 0).sum(dim=1)
    eligible = known & (distinct[group] >= 2)
    return eligible, group


def centre_within_groups(x: Tensor, group: Tensor) -> Tensor:
    """`x_i - mean{x_j : group_j = group_i}` for `(n, D)` rows and `(n,)` group indices."""
    num_groups = int(group.max()) + 1 if group.numel() else 0
    sums = x.new_zeros(num_groups, x.shape[1]).index_add(0, group, x)
    counts = torch.bincount(group, minlength=num_groups).to(x.dtype)
    return x - (sums / counts.clamp_min(1.0)[:, None])[group]


def irrelevant_cka(
    features: Tensor,
    irrelevant_features: Tensor,
    unbiased: bool = False,
    gather: Gather = "local",
    *,
    kernel: Kernel = "linear",
    sigma: float | None = None,
    task_labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """CKA between the features and a frozen irrelevant network's features on the same batch.

    Kornblith et al. 2019 (linear kernel by default; RBF with `kernel="rbf"`, bandwidth `sigma` or the
    median heuristic). The irrelevant side is detached. Widths may differ.

    **Conditional** (`task_labels` given; the library's own): both sides are centred within each task class
    first, over the samples whose task label is known (the others are left out), so the measure compares
    only the within-class variation of the two networks: `CKA(Z - M_y Z, R - M_y R)` with `M_y` the
    within-class averaging matrix. Fewer known samples than the estimator needs (2 biased, 4 unbiased)
    give a zero loss with a zero gradient.
    """
    check_tensor(features, "features")
    check_tensor(irrelevant_features, "irrelevant_features")
    reference = irrelevant_features.detach()
    if task_labels is None:
        return cka(features, reference, kernel=kernel, unbiased=unbiased, sigma=sigma, gather=gather)
    check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
    if reference.shape[0] != features.shape[0]:
        raise ValueError(
            f"'features' and 'irrelevant_features' must have the same batch size: got shapes "
            f"{tuple(features.shape)} and {tuple(reference.shape)}"
        )
    features, reference = gather_batch(features, gather), gather_batch(reference, gather)
    task_labels = gather_batch(task_labels, gather)
    known = task_labels != ignore_index
    if int(known.sum()) < (4 if unbiased else 2):
        return zero_with_grad(features)
    with full_precision(features, reference):
        dtype = compute_dtype(features, reference)
        _, group = torch.unique(task_labels[known], return_inverse=True)
        z = centre_within_groups(features[known].reshape(int(known.sum()), -1).to(dtype), group)
        r = centre_within_groups(reference[known].reshape(int(known.sum()), -1).to(dtype), group)
        return cka(z, r, kernel=kernel, unbiased=unbiased, sigma=sigma)


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
        _check_irrelevant(labels, num_irrelevant, features, ignore_index)
        check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
        eligible, group = within_class_groups(labels, task_labels, num_irrelevant, ignore_index)
        if not bool(eligible.any()):
            return loss
        z = centre_within_groups(z[eligible], group[eligible])
        labels = labels[eligible]
        prior = _log_prior(labels, group[eligible], num_irrelevant, z.dtype)
    elif labels is not None:
        _check_irrelevant(labels, num_irrelevant, features, ignore_index)
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


def _log_prior(labels: Tensor, group: Tensor, num_irrelevant: int, dtype: torch.dtype) -> Tensor:
    """Per sample, `log p̂(u = k | y)` from the batch's counts with add-½ smoothing, `(n, num_irrelevant)`."""
    num_groups = int(group.max()) + 1
    counts = torch.zeros(num_groups, num_irrelevant, dtype=dtype, device=labels.device)
    counts.index_put_((group, labels), torch.ones_like(labels, dtype=dtype), accumulate=True)
    smoothed = counts + 0.5
    return torch.log(smoothed / smoothed.sum(dim=1, keepdim=True))[group]


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


def erasure_basis(class_means: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis `Q (D, r)` of `span{μ_k - μ̄}` for class means `(K, D)`; `r ≤ K - 1`.

    Directions whose singular value is below `rtol` times the largest are dropped (equal means give
    `r = 0`). Any weighting of `μ̄` spans the same space.
    """
    check_tensor(class_means, "class_means", min_dim=2)
    differences = class_means - class_means.mean(dim=0, keepdim=True)
    return column_basis(differences.T, rtol)


def column_basis(matrix: Tensor, rtol: float = 1e-6) -> Tensor:
    """Orthonormal basis `(D, r)` of the column space of a `(D, K)` matrix (singular values ≥ `rtol × largest`).

    A zero matrix gives `r = 0`.
    """
    check_tensor(matrix, "matrix", min_dim=2)
    u, singular, _ = torch.linalg.svd(matrix, full_matrices=False)
    keep = (singular > rtol * singular.max()) & (singular > 0)
    basis: Tensor = u[:, keep]
    return basis


def within_class_cross_covariance(
    features: Tensor,
    labels: Tensor,
    task_labels: Tensor,
    num_irrelevant: int,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, int]:
    """`(S, n)`: the pooled within-class cross-covariance sum of `z` and `onehot(u)`, and its sample count.

    `S = Σ_{i ∈ E} (z_i - z̄_{y_i}) (e_{u_i} - ē_{y_i})ᵀ`, `(D, K)`, over the eligible samples `E` of
    `within_class_groups`, with class means taken over `E` (the library's own). Its column space is
    `span{μ_{k,y} - μ_y}`, the within-class `u`-mean differences pooled over classes: what `Purify(conditional=True)`
    erases. Computed without gradient, in float32 (float64 for float64 input).
    """
    check_tensor(features, "features")
    _check_irrelevant(labels, num_irrelevant, features, ignore_index)
    check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
    with torch.no_grad(), full_precision(features):
        dtype = compute_dtype(features)
        eligible, group = within_class_groups(labels, task_labels, num_irrelevant, ignore_index)
        z = features.detach().reshape(features.shape[0], -1)[eligible].to(dtype)
        onehot = F.one_hot(labels[eligible], num_irrelevant).to(dtype)
        g = group[eligible]
        return centre_within_groups(z, g).T @ centre_within_groups(onehot, g), int(eligible.sum())


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
