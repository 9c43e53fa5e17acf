"""Purification by linear erasure: the directions that separate irrelevant classes, and their projection.

Used by `Purify` (docs/task-irrelevant-labels.md): cf. INLP (Ravfogel et al. 2020), LEACE (Belrose et al. 2023);
the conditional form (within task classes) is the library's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._labels import IGNORE_INDEX
from .._validation import check_tensor, compute_dtype, full_precision
from ._groups import (
    centre_within_groups,
    check_irrelevant_labels,
    check_task_labels,
    one_hot_known,
    within_class_groups,
)


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
    check_irrelevant_labels(labels, num_irrelevant, features, ignore_index=ignore_index)
    check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
    with torch.no_grad(), full_precision(features):
        dtype = compute_dtype(features)
        eligible, classmates = within_class_groups(labels, task_labels, num_irrelevant, ignore_index)
        z = features.detach().reshape(features.shape[0], -1).to(dtype)
        onehot = one_hot_known(labels, num_irrelevant, eligible, dtype)
        z_centred = centre_within_groups(z, classmates, eligible)
        return z_centred.T @ centre_within_groups(onehot, classmates, eligible), int(eligible.sum())


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
