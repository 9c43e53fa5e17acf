"""Purification by linear erasure: the directions that separate irrelevant classes, and their projection.

Used by `Purify` (docs/task-irrelevant-labels.md): cf. INLP (Ravfogel et al. 2020), LEACE (Belrose et al. 2023);
the conditional form (within task classes) is the library's own.

Every function here runs without leaving the device and with fixed shapes: the erased space is given by a
`(D, K)` matrix `Q` whose `Q Qᵀ` is the orthogonal projector (no data-dependent rank), computed by matrix
products only (no SVD or eigensolver, which on a GPU read an error flag back to the host).
"""

from __future__ import annotations

import math

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

MIN_RTOL = 1e-12
"""The smallest `rtol` accepted: below it float64 rounding (about `1e-16` of the largest singular value) competes."""

POWER_STEPS = 8
"""Power iterations that estimate the largest singular value, the scale `rtol` is relative to."""

PURIFY_STEPS = 10
"""Steps of `y ↦ 2.5 y³ − 1.5 y⁵` that sharpen the cut of `column_basis` (each widens a gap around it 5/3-fold)."""

MAX_SCALED = math.sqrt(2.9)
"""The largest scaled singular value `column_basis` can meet, inside the Newton–Schulz basin `(0, √3)`."""


def erasure_basis(class_means: Tensor, *, rtol: float = 1e-6) -> Tensor:
    """`Q (D, K)` with `Q Qᵀ` the orthogonal projector onto `span{μ_k − μ̄}`, for class means `(K, D)`.

    The span of the mean differences has rank `r ≤ K − 1`; `Q = U_r V_rᵀ` is the polar factor of the
    differences `(μ_k − μ̄)_k` restricted to their singular directions above `rtol ×` the largest (see
    `column_basis`). Equal means give `Q = 0`. Any weighting of `μ̄` spans the same space.

    Args:
        class_means: `(K, D)` class means (a map per class is flattened to `D`).
        rtol: singular values at or below `rtol ×` the largest are not erased (see `column_basis`).

    Returns:
        `(D, K)` float64 `Q`, for `erase`.

    Raises:
        TypeError: `class_means` is not a floating-point tensor.
        ValueError: `class_means` has fewer than 2 dimensions, or `rtol` is outside `[1e-12, 1)`.
    """
    check_tensor(class_means, "class_means", min_dim=2)
    newton_schulz_cut(rtol)  # checks rtol
    with full_precision(class_means):
        return _erasure_basis(class_means, rtol)


def _erasure_basis(class_means: Tensor, rtol: float) -> Tensor:
    """`erasure_basis` of checked class means and `rtol`, with autocast off (switched by the entry point)."""
    means = class_means.reshape(class_means.shape[0], -1).to(torch.float64)
    differences = means - means.mean(dim=0, keepdim=True)
    return _column_basis(differences.T, rtol)


def column_basis(matrix: Tensor, *, rtol: float = 1e-6) -> Tensor:
    """`Q (D, K)` with `Q Qᵀ` the orthogonal projector onto the column space of a `(D, K)` matrix `M`.

    With `M = U Σ Vᵀ`, `Q = U_r V_rᵀ` over the singular directions with `σ > rtol · σ_max`: the polar factor of `M`
    restricted to them. It is computed by matrix products only, in float64, from `X = c M / s` (`s ≈ σ_max`, see
    below): `n` Newton–Schulz steps `X ← X (1.5 I − 0.5 XᵀX)` (Higham 2008, §8.3), each mapping a singular value
    `x ↦ 1.5 x − 0.5 x³`, bring `x = c · rtol` exactly to `√(2/3)`; then `PURIFY_STEPS` steps
    `X ← X (2.5 G − 1.5 G²)`, `G = XᵀX`, send every singular value above `√(2/3)` to 1 and every one below it to
    0 (`y ↦ 2.5 y³ − 1.5 y⁵` has `√(2/3)` as its unstable fixed point). The cut is sharp: a direction at
    `1.02 · rtol · σ_max` is erased to 1 %, one at `0.98 · rtol · σ_max` left to 1 %, both to `1e-10` at ±5 %.
    Both maps are increasing on `[0, 1]`, which `c ≤ 1 / √2.9` keeps every scaled singular value in. `s²` is the
    larger of the power-iteration estimate of `σ_max²` (exact up to rounding but for contrived spectra) and
    `‖MᵀM‖_F / 2.9`; the latter is larger only for about nine or more near-equal top singular values, where it
    moves the cut up by at most a factor `(number of them)^{1/4} / √2.9`. The Gram matrices are those of the
    smaller side (`XᵀX` or `XXᵀ`). No host synchronization and no data-dependent shape: an SVD or eigensolver
    reads an error flag back to the host on a GPU. A zero matrix gives `Q = 0`.

    Args:
        matrix: `(D, K)`.
        rtol: singular values at or below `rtol ×` the largest are not erased, in `[1e-12, 1)`.

    Returns:
        `(D, K)` float64 `Q`; `Q Qᵀ` is the projector (idempotent to rounding), `Q`'s columns are not orthonormal.

    Raises:
        TypeError: `matrix` is not a floating-point tensor.
        ValueError: `matrix` is not 2-D, or `rtol` is outside `[1e-12, 1)`.
    """
    check_tensor(matrix, "matrix", min_dim=2)
    if matrix.dim() != 2:
        raise ValueError(f"'matrix' must be 2-D (D, K), got shape {tuple(matrix.shape)}")
    newton_schulz_cut(rtol)  # checks rtol
    with full_precision(matrix):
        return _column_basis(matrix, rtol)


def _column_basis(matrix: Tensor, rtol: float) -> Tensor:
    """`column_basis` of a checked `(D, K)` matrix and `rtol`, with autocast off (switched by the entry point of
    the call)."""
    steps, gain = newton_schulz_cut(rtol)
    tiny = torch.finfo(torch.float64).tiny
    x = matrix.to(torch.float64)
    x = x / x.abs().amax().clamp_min(tiny)  # no overflow in the Gram matrix
    tall = x.shape[0] >= x.shape[1]

    def gram(x: Tensor) -> Tensor:
        return x.T @ x if tall else x @ x.T

    def times(x: Tensor, polynomial: Tensor) -> Tensor:
        return x @ polynomial if tall else polynomial @ x

    g = gram(x)
    # power iteration from the column of largest norm: its Rayleigh quotient only grows (g is PSD)
    v = g.index_select(1, g.diagonal().argmax().reshape(1))
    for _ in range(POWER_STEPS):
        v = g @ v
        v = v / torch.linalg.vector_norm(v).clamp_min(tiny)
    largest_squared = torch.maximum((v.T @ g @ v).reshape(()), torch.linalg.matrix_norm(g) / MAX_SCALED**2)
    x = x * (gain / largest_squared.clamp_min(tiny).sqrt())
    eye = torch.eye(g.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(steps):
        x = times(x, 1.5 * eye - 0.5 * gram(x))
    for _ in range(PURIFY_STEPS):
        g = gram(x)
        x = times(x, 2.5 * g - 1.5 * (g @ g))
    return x


def newton_schulz_cut(rtol: float) -> tuple[int, float]:
    """`(n, c)`: `n` steps of `x ↦ 1.5 x − 0.5 x³` take `c · rtol` exactly to `√(2/3)`, with `c ≤ 1 / √2.9`.

    Computed backwards from `√(2/3)` by the map's inverse on `[0, 1]`, `y ↦ 2 sin(arcsin(y) / 3)` (since
    `1.5 (2 sin θ) − 0.5 (2 sin θ)³ = sin 3θ`).

    Raises:
        ValueError: `rtol` is outside `[1e-12, 1)`.
    """
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and MIN_RTOL <= rtol < 1.0):
        raise ValueError(f"'rtol' must be in [{MIN_RTOL:g}, 1), got {rtol!r}")
    x, steps = math.sqrt(2.0 / 3.0), 0
    while x > rtol / MAX_SCALED:
        x, steps = 2.0 * math.sin(math.asin(x) / 3.0), steps + 1
    return steps, x / rtol


def within_class_cross_covariance(
    features: Tensor,
    labels: Tensor,
    task_labels: Tensor,
    num_irrelevant: int,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """`(S, n)`: the pooled within-class cross-covariance sum of `z` and `onehot(u)`, and its sample count.

    `S = Σ_{i ∈ E} (z_i − z̄_{y_i}) (e_{u_i} − ē_{y_i})ᵀ`, `(D, K)`, over the eligible samples `E` of
    `within_class_groups` (known `u` and `y`, in a task class holding at least two `u` values in the batch),
    with class means taken over `E` (the library's own). Its column space is `span{μ_{k,y} − μ_y}`, the
    within-class `u`-mean differences pooled over classes: what `Purify(conditional=True)` erases. Computed
    without gradient and without a host synchronization, in float32 (float64 for float64 input).

    Args:
        features: `(n, ...)` features, flattened to `(n, D)`.
        labels: `(n,)` irrelevant labels `u` in `[0, num_irrelevant)` or `ignore_index`.
        task_labels: `(n,)` task classes `y` (`≥ 0`) or `ignore_index`.
        num_irrelevant: number of irrelevant classes `K`.
        ignore_index: the label of unknown samples.

    Returns:
        `S` `(D, K)` and `n = |E|`, a 0-d int64 tensor (both zero when no sample is eligible).

    Raises:
        TypeError: `features` is not a floating-point tensor, or the labels are not integer tensors.
        ValueError: labels of the wrong shape or outside their range.
    """
    check_tensor(features, "features")
    check_irrelevant_labels(labels, num_irrelevant, features, ignore_index=ignore_index)
    check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
    with full_precision(features):
        return _within_class_cross_covariance(features, labels, task_labels, num_irrelevant, ignore_index)


def _within_class_cross_covariance(
    features: Tensor, labels: Tensor, task_labels: Tensor, num_irrelevant: int, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """`within_class_cross_covariance` for checked inputs, with autocast off (switched by the entry point)."""
    with torch.no_grad():
        dtype = compute_dtype(features)
        eligible, classmates = within_class_groups(labels, task_labels, num_irrelevant, ignore_index)
        z = features.detach().reshape(features.shape[0], -1).to(dtype)
        onehot = one_hot_known(labels, num_irrelevant, eligible, dtype)
        z_centred = centre_within_groups(z, classmates, eligible)
        return z_centred.T @ centre_within_groups(onehot, classmates, eligible), eligible.sum()


def erase(features: Tensor, basis: Tensor) -> Tensor:
    """`z − z Q Qᵀ`: the features with the projection onto the erased space removed (no gradient through `Q`).

    `Q Qᵀ` must be an orthogonal projector: `Q` with orthonormal columns (zero columns allowed), or the
    partial isometry of `column_basis` / `erasure_basis`.

    Args:
        features: `(B, ...)`, flattened to `(B, D)` and returned in its own shape and dtype.
        basis: `(D, r)` `Q`.

    Returns:
        The erased features, shaped and typed like `features` (computed in float32, float64 for float64 input).

    Raises:
        TypeError: `features` is not a floating-point tensor.
        ValueError: `basis` is not `(D, r)` for the features' `D` values per sample.
    """
    check_tensor(features, "features")
    z = features.reshape(features.shape[0], -1)
    if basis.dim() != 2 or basis.shape[0] != z.shape[1]:
        raise ValueError(
            f"'features' have {z.shape[1]} values per sample (shape {tuple(features.shape)}) but the erasure "
            f"basis has shape {tuple(basis.shape)}, not ({z.shape[1]}, r)"
        )
    with full_precision(features):
        return _erase(features, basis)


def _erase(features: Tensor, basis: Tensor) -> Tensor:
    """`erase` of checked features and a `(D, r)` basis that fits them, with autocast off (switched by the entry
    point of the call)."""
    dtype = compute_dtype(features)
    zc, q = features.reshape(features.shape[0], -1).to(dtype), basis.detach().to(dtype)
    return (zc - (zc @ q) @ q.T).to(features.dtype).reshape(features.shape)
