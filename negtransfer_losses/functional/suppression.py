"""Suppressing what task-irrelevant labels describe (docs/task-irrelevant-labels.md).

The TIRTL / PurifiedLearning papers (Li et al.) did not publish their mechanism; these are principled,
published stand-ins, each with its reference, and conditional variants that are the library's own. Labels
equal to `ignore_index` are unknown and left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._labels import IGNORE_INDEX
from .._validation import (
    check_min_batch,
    check_tensor,
    compute_dtype,
    full_precision,
    zero_with_grad,
)
from ..distributed import Gather, gather_batch
from ._groups import centre_within_groups, check_irrelevant_labels, check_task_labels, classmates_of
from .similarity import Kernel, cka, hsic_from_kernels, kernel_alignment, kernel_matrix


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
    check_irrelevant_labels(labels, num_irrelevant, features, ignore_index=ignore_index)
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
        classmates = classmates_of(task_labels, known)
        z = centre_within_groups(features.reshape(features.shape[0], -1).to(dtype), classmates, known)[known]
        r = centre_within_groups(reference.reshape(reference.shape[0], -1).to(dtype), classmates, known)[known]
        return cka(z, r, kernel=kernel, unbiased=unbiased, sigma=sigma)
