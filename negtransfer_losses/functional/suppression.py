"""Suppressing what task-irrelevant labels describe: the HSIC and CKA penalties (docs: Methods §2).

The TIRTL / PurifiedLearning papers (Li et al.) did not publish their mechanism; these are principled,
published stand-ins, each with its reference, and conditional variants that are the library's own. Labels
equal to `ignore_index` are unknown and left out.

Every estimate runs on the whole batch with fixed shapes: the samples that enter it form *groups* (all the
samples whose label is known, or the eligible samples of one task class), given as an `(n, n)` boolean
matrix `groups[i, j]` ("`j` is in the group of `i`"), and every per-group sum is a masked sum or a matrix
product over the batch. Samples left out are zero rows that reach neither the value nor the gradient, and
"too few samples" gives zero through `torch.where`: no data-dependent shape and no host read, so a step runs
without waiting for the device and `torch.compile(fullgraph=True)` traces it as one graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._labels import IGNORE_INDEX
from .._validation import (
    as_batch_matrix,
    check_min_batch,
    check_same_batch,
    check_same_device,
    check_tensor,
    compute_dtype,
    full_precision,
)
from ..distributed import Gather, gather_batch
from ._groups import (
    centre_within_groups,
    check_irrelevant_labels,
    check_task_labels,
    classmates_of,
    member_rows,
    one_hot_known,
    within_class_groups,
)
from .similarity import Kernel, _check_kernel, _cka, gaussian, safe_ratio, squared_distances, unit_frobenius


def irrelevant_hsic(
    features: Tensor,
    irrelevant_labels: Tensor,
    *,
    num_irrelevant: int,
    kernel: Kernel = "linear",
    normalized: bool = False,
    sigma: float | None = None,
    unbiased: bool = True,
    gather: Gather = "local",
    ignore_index: int = IGNORE_INDEX,
    task_labels: Tensor | None = None,
) -> Tensor:
    """HSIC between features and one-hot irrelevant labels, over the samples whose label is known.

    `HSIC(K_z, L_u)` with `K_z` a linear (or RBF) kernel on `z` and `L_u = onehot(u) onehot(u)ᵀ`, the
    delta kernel on `u` (ReBias, Bahng et al. ICML 2020, uses HSIC this way against a biased network);
    Song et al.'s unbiased estimator `HSIC_1` by default (`n_min = 4` samples), the biased `HSIC_0` with
    `unbiased=False` (`n_min = 2`). `normalized=True` gives `HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`, a
    CKA-style value in about [0, 1] (0 where a side is constant, e.g. only one class known). With fewer than
    `n_min` known labels the estimator is undefined and the result is a zero loss with a zero gradient, as
    with no label known. None of this is claimed to be the TIRTL / PurifiedLearning papers' mechanism.

    **Conditional** (`task_labels` given; the library's own): the mean over task classes `c` of the
    within-class values, weighted by class size, `Σ_c n_c · HSIC(K_z[E_c], L_u[E_c]) / Σ_c n_c`, over the
    eligible classes of `within_class_groups` with `min_size = n_min`: at least `n_min` samples whose `u` and
    `y` are known, and at least two distinct `u` values among them (`E_c` those samples, `n_c = |E_c|`). With
    `normalized=True` each class's term is its own ratio. With no eligible class the result is a zero loss
    with a zero gradient. It measures what `z` says about `u` within each task class, i.e. beyond `y`.

    Args:
        features: `(B, ...)`, flattened to `(B, D)`.
        irrelevant_labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`.
        num_irrelevant: number of irrelevant classes.
        kernel: the kernel on the features, `"linear"` or `"rbf"`.
        normalized: the CKA-style ratio instead of HSIC.
        sigma: RBF bandwidth; None takes the median distance between distinct rows of each group.
        unbiased: Song et al.'s unbiased estimator (True) or the biased one.
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`).
        ignore_index: the label of samples whose class is unknown.
        task_labels: `(B,)` task classes (`ignore_index` for unknown) for the conditional form, or None.

    Returns:
        a scalar tensor (float32, or float64 for float64 features).

    Raises:
        TypeError: for non-tensor or non-floating `features`, or labels that are not integer tensors.
        ValueError: for an unknown `kernel`, a non-positive `sigma`, labels of the wrong shape or device or
            outside their range, or a batch smaller than `n_min`.
    """
    check_tensor(features, "features")
    _check_kernel(kernel, sigma)
    check_irrelevant_labels(irrelevant_labels, num_irrelevant, features, ignore_index=ignore_index)
    if task_labels is not None:
        check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
        task_labels = gather_batch(task_labels, gather)
    minimum = 4 if unbiased else 2
    features, labels = gather_batch(features, gather), gather_batch(irrelevant_labels, gather)
    check_min_batch(features.shape[0], minimum, what=f"{'unbiased' if unbiased else 'biased'} HSIC", name="features")
    with full_precision(features):
        dtype = compute_dtype(features)
        if task_labels is None:
            members = _at_least(labels != ignore_index, minimum)
            groups = members[:, None] & members[None, :]
        else:
            members, groups = within_class_groups(labels, task_labels, num_irrelevant, ignore_index, min_size=minimum)
        z = member_rows(as_batch_matrix(features, "features").to(dtype), members)
        onehot = one_hot_known(labels, num_irrelevant, members, dtype)
        k = _group_kernel(z, groups, kernel=kernel, sigma=sigma)
        l = onehot @ onehot.T
        value = _group_alignment(k, l, groups, unbiased=unbiased) if normalized else _group_hsic(k, l, groups, unbiased)
        return _mean_over(value, members)


def irrelevant_cka(
    features: Tensor,
    irrelevant_features: Tensor,
    *,
    kernel: Kernel = "linear",
    sigma: float | None = None,
    unbiased: bool = False,
    gather: Gather = "local",
    ignore_index: int = IGNORE_INDEX,
    task_labels: Tensor | None = None,
) -> Tensor:
    """CKA between the features and a frozen irrelevant network's features on the same batch.

    `CKA(Z, R) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))` (Kornblith et al. 2019), linear kernels by
    default (RBF with `kernel="rbf"`, bandwidth `sigma` or the median heuristic), the biased estimator unless
    `unbiased=True`. The irrelevant side is detached; the widths may differ. Constant features give 0. Not
    claimed to be the TIRTL / PurifiedLearning papers' mechanism.

    **Conditional** (`task_labels` given; the library's own): both sides are centred within each task class
    first, over the samples whose task label is known (the others are left out), so the measure compares
    only the within-class variation of the two networks: `CKA(Z - M_y Z, R - M_y R)` over those samples, with
    `M_y` the within-class averaging matrix. Fewer known samples than the estimator needs (2 biased, 4
    unbiased) give a zero loss with a zero gradient.

    Args:
        features: `(B, ...)`, flattened to `(B, D)`.
        irrelevant_features: `(B, ...)`, flattened to `(B, D')`: the frozen network's features.
        kernel: `"linear"` or `"rbf"`, the same on both sides.
        sigma: RBF bandwidth; None takes the median distance between distinct rows, per side.
        unbiased: the unbiased HSIC (a batch of at least 4) instead of the biased one (at least 2).
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`).
        ignore_index: the task label of samples whose class is unknown.
        task_labels: `(B,)` task classes (`ignore_index` for unknown) for the conditional form, or None.

    Returns:
        a scalar tensor (float32, or float64 when an input is float64).

    Raises:
        TypeError: for non-tensor or non-floating features, or task labels that are not integer tensors.
        ValueError: for an unknown `kernel`, a non-positive `sigma`, batches of different sizes or devices,
            task labels of the wrong shape, device or range, or a batch smaller than the estimator needs.
    """
    check_tensor(features, "features")
    check_tensor(irrelevant_features, "irrelevant_features")
    _check_kernel(kernel, sigma)
    check_same_device({"features": features, "irrelevant_features": irrelevant_features})
    check_same_batch(features, irrelevant_features, ("features", "irrelevant_features"))
    if task_labels is not None:
        check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
        task_labels = gather_batch(task_labels, gather)
    minimum = 4 if unbiased else 2
    features, reference = gather_batch(features, gather), gather_batch(irrelevant_features.detach(), gather)
    check_min_batch(features.shape[0], minimum, what=f"{'unbiased' if unbiased else 'biased'} CKA", name="features")
    if task_labels is None:  # checked above: the core of `cka`
        dtype = compute_dtype(features, reference)
        return _cka(features.to(dtype), reference.to(dtype), kernel, unbiased, sigma)
    with full_precision(features, reference):
        dtype = compute_dtype(features, reference)
        members = _at_least(task_labels != ignore_index, minimum)
        classmates = classmates_of(task_labels, members)
        z = centre_within_groups(as_batch_matrix(features, "features").to(dtype), classmates, members)
        r = centre_within_groups(as_batch_matrix(reference, "irrelevant_features").to(dtype), classmates, members)
        if kernel == "linear":  # linear HSIC is shift-invariant: rescale (as cka does) so no scale overflows
            z, r = _centred_unit_scale(z, members), _centred_unit_scale(r, members)
        groups = members[:, None] & members[None, :]
        k = _group_kernel(z, groups, kernel=kernel, sigma=sigma)
        l = _group_kernel(r, groups, kernel=kernel, sigma=sigma)
        return _mean_over(_group_alignment(k, l, groups, unbiased=unbiased), members)


# --- masked estimators: one value per group, every group at once ---------------------------------------


def _at_least(known: Tensor, minimum: int) -> Tensor:
    """`known`, or all False when it holds fewer than `minimum` True entries (no host read)."""
    return known & (known.sum() >= minimum)


def _mean_over(values: Tensor, members: Tensor) -> Tensor:
    """`Σ_{i ∈ members} values_i / |members|` (0 for no member): per-sample group values give the class-size
    weighted mean over groups, `Σ_c n_c v_c / Σ_c n_c`."""
    weights = members.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _group_sums(groups: Tensor, per_row: Tensor) -> Tensor:
    """`Σ_{j in the group of i} per_row_j` for every `i`: `(n,)` or `(n, m)` rows summed within groups."""
    return groups.to(per_row.dtype) @ per_row


def _group_hsic(k: Tensor, l: Tensor, groups: Tensor, unbiased: bool) -> Tensor:
    """Per sample `i`, the HSIC of the kernels restricted to the group of `i` (0 for a group too small).

    With `W = groups` and `n_i` the size of the group of `i`, over the rows `j` and columns `k` of that group:

    - unbiased: with `K̃ = K ⊙ W` and `L̃ = L ⊙ W` with zero diagonals,
      `HSIC_1 = [Σ K̃ ⊙ L̃ + (Σ K̃)(Σ L̃) / ((n-1)(n-2)) - (2 / (n-2)) Σ_j (K̃1)_j (L̃1)_j] / (n(n-3))`, `n ≥ 4`;
    - biased: with `K̂_jk = K_jk - r_j - r_k + s` the kernel double-centred within the group (`r` its row
      means, `s` its mean), `HSIC_0 = Σ K̂ ⊙ L̂ / (n-1)²`, `n ≥ 2`.

    Returns:
        `(n,)` in the kernels' dtype.
    """
    dtype = k.dtype
    mask = groups.to(dtype)
    size = mask.sum(dim=1)
    minimum = 4 if unbiased else 2
    enough = size >= minimum
    n = torch.where(enough, size, torch.full_like(size, float(minimum)))  # denominators stay positive
    if unbiased:
        off_diagonal = mask * (1.0 - torch.eye(k.shape[0], dtype=dtype, device=k.device))
        k0, l0 = k * off_diagonal, l * off_diagonal
        row_k, row_l = k0.sum(dim=1), l0.sum(dim=1)
        sums = _group_sums(groups, torch.stack([(k0 * l0).sum(dim=1), row_k, row_l, row_k * row_l], dim=1))
        trace_term, sum_k, sum_l, cross = sums.unbind(dim=1)
        value = (trace_term + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))
    else:
        centred = _double_centre_within(k, mask, n) * _double_centre_within(l, mask, n)
        value = _group_sums(groups, centred.sum(dim=1)) / (n - 1) ** 2
    return torch.where(enough, value, torch.zeros_like(value))


def _double_centre_within(k: Tensor, mask: Tensor, n: Tensor) -> Tensor:
    """`W ⊙ (K - r 1ᵀ - 1 rᵀ + s)` with `r_j` the mean of row `j` of `K` over its group, `s_j` the group's mean."""
    inside = k * mask
    row_means = inside.sum(dim=1) / n
    means = (mask @ row_means) / n
    return mask * (inside - row_means[:, None] - row_means[None, :] + means[:, None])


def _group_alignment(k: Tensor, l: Tensor, groups: Tensor, *, unbiased: bool) -> Tensor:
    """Per sample, `HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))` over its group, 0 where a side is constant.

    As `kernel_alignment`: a self-HSIC at the rounding level of its group's kernel entries
    (`≤ 64 eps · mean(K²)` over the group) counts as zero.
    """
    self_k, self_l = _group_hsic(k, k, groups, unbiased), _group_hsic(l, l, groups, unbiased)
    eps = 64 * torch.finfo(k.dtype).eps
    entries = groups.to(k.dtype).sum(dim=1).square().clamp_min(1.0)
    scale_k = _group_sums(groups, (k.detach().square() * groups).sum(dim=1)) / entries
    scale_l = _group_sums(groups, (l.detach().square() * groups).sum(dim=1)) / entries
    varies = (self_k > eps * scale_k) & (self_l > eps * scale_l)
    zero = torch.zeros_like(self_k)
    return safe_ratio(
        _group_hsic(k, l, groups, unbiased), torch.where(varies, self_k, zero), torch.where(varies, self_l, zero)
    )


def _group_kernel(x: Tensor, groups: Tensor, *, kernel: Kernel, sigma: float | None) -> Tensor:
    """`(n, n)` kernel of the rows of `x` (zero outside the groups' members), valid within each group.

    - `"linear"`: `X Xᵀ`;
    - `"rbf"`: `exp(-|x_j - x_k|² / (2 σ²))` with `σ` = `sigma`, or the median distance between distinct
      rows of the group (without gradient; floored at 1e-12; 1 for a group of one), as `kernel_matrix` on the
      group's rows alone: distances from the rows centred within their group, those at the rounding level
      of the group's values set to zero, so identical rows give `K = 1` exactly.
    """
    if kernel == "linear":
        return x @ x.T
    members = groups.any(dim=1)
    centred = centre_within_groups(x, groups, members)
    largest = torch.where(
        groups, x.detach().abs().amax(dim=1)[None, :], torch.zeros((), dtype=x.dtype, device=x.device)
    )
    sq_dist = squared_distances(centred, largest.amax(dim=1))  # each row at the rounding level of its group
    if sigma is None:
        bandwidth = _group_median_distance(sq_dist.detach(), groups)
    else:
        bandwidth = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
    return gaussian(sq_dist, bandwidth)


def _group_median_distance(sq_dist: Tensor, groups: Tensor) -> Tensor:
    """Per sample, the median distance between distinct rows of its group, as `torch.quantile(·, 0.5)`.

    The pairs `j < k` of a group are sorted by distance and then, stably, by group (a group is named by its
    first member; pairs outside every group go last), so each group's distances are one sorted run, found with
    `searchsorted`; the median interpolates linearly between the two middle values, as `torch.quantile` does.

    Returns:
        `(n,)`: the median floored at 1e-12, or 1 for a group without pairs.
    """
    n = sq_dist.shape[0]
    device = sq_dist.device
    ones = torch.ones(n, dtype=sq_dist.dtype, device=device)
    if n < 2:
        return ones
    first, second = torch.triu_indices(n, n, offset=1, device=device)
    # both ends members: a row outside the members may still list its class's members (conditional grouping)
    in_group = groups[first, second] & groups[second, first]
    name = groups.to(torch.int32).argmax(dim=1)  # a group's first member
    distance = torch.where(in_group, sq_dist[first, second].sqrt(), torch.full_like(ones[:1], float("inf")))
    key = torch.where(in_group, name[first], torch.full_like(name[first], n))
    by_distance = torch.sort(distance, stable=True).indices
    by_group = torch.sort(key[by_distance], stable=True).indices
    order = by_distance[by_group]
    sorted_distance, sorted_key = distance[order], key[order]
    start = torch.searchsorted(sorted_key.contiguous(), name.contiguous())
    size = groups.sum(dim=1)
    pairs = size * (size - 1) // 2
    rank = 0.5 * (pairs - 1).to(sq_dist.dtype)
    below = rank.floor()
    last = sorted_distance.shape[0] - 1
    low = sorted_distance[(start + below.to(start.dtype)).clamp(0, last)]
    high = sorted_distance[(start + rank.ceil().to(start.dtype)).clamp(0, last)]
    median = torch.lerp(low, high, rank - below)
    return torch.where(pairs >= 1, median.clamp_min(1e-12), ones)


def _centred_unit_scale(x: Tensor, members: Tensor) -> Tensor:
    """The member rows of `x` centred over the members and scaled to unit Frobenius norm; zero rows elsewhere.

    `cka`'s rescaling (`similarity.unit_frobenius`, the same core) on the member rows alone: features whose
    spread is at the rounding level of their magnitude are constant and become exactly zero, with a zero
    gradient.
    """
    weights = members.to(x.dtype)
    count = weights.sum()
    centred = member_rows(x - (weights @ x / count.clamp_min(1.0))[None, :], members)
    largest = member_rows(x.detach(), members).abs().amax()
    return unit_frobenius(centred, largest, count * x.shape[1])
