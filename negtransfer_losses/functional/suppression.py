"""Suppressing what task-irrelevant labels describe: the HSIC and CKA penalties (docs: Methods §2).

The TIRTL / PurifiedLearning papers (Li et al.) did not publish their mechanism; these are principled,
published stand-ins, each with its reference, and conditional variants that are the library's own. Labels
equal to `ignore_index` are unknown and left out.

Every estimate runs on the whole batch with fixed shapes: the samples that enter it form *groups* (all the
samples whose label is known, or the eligible samples of one task class), and every per-group sum is a masked
sum over the batch. Samples left out are zero rows that reach neither the value nor the gradient, and "too
few samples" gives zero through `torch.where`: no data-dependent shape and no host read, so a step runs
without waiting for the device and `torch.compile(fullgraph=True)` traces it as one graph.

Two forms, one rule (`similarity.feature_space_cheaper`; docs: Methods §4):

- **feature space** (linear kernels, the defaults): the sums of `similarity.linear_hsic` over the group's
  rows, `O(B·D·(D+K))` time and `O(B·D + D²)` memory, no `B × B` tensor. A task class is a *slot*
  (`_groups.within_class_slots`), its sums an `index_add` into `B` slots: per class `Σ_k ‖Σ_{i∈(c,k)} x_i‖²`,
  `Σ_i ‖x_i‖²`, `‖Σ_{i∈c} x_i‖²` and the class's label counts give its unbiased or biased HSIC. Used by
  `irrelevant_hsic` (plain, normalized, conditional) and `irrelevant_cka` (plain, conditional). The normalized
  conditional HSIC also needs each class's self-HSIC `HSIC(K_c, K_c)`, from its `D × D` Gram matrix: one
  per class, in `B // n_min + 1` slots (`_conditional_hsic_in_slots`; the rule then also bounds their
  `(B // n_min + 1)·D²` numbers by `4·B²`).
- **pairwise**: the `(B, B)` kernel matrices, masked by the `(B, B)` boolean matrix `groups[i, j]` ("`j` is
  in the group of `i`"): features much wider than the batch. RBF kernels are formed a tile of rows at a time
  instead (`similarity.tiled_hsic_sums`: `O(tile_rows(B)·B)` memory in both passes, plus the median heuristic's
  `B(B-1)/2` detached distances; the conditional HSIC as a group per task class, the conditional CKA as one group
  after the within-class centring). `_pairwise_hsic` still takes any kernel: the reference form.

Under `gather="global"` the feature-space forms all-reduce their sums (`similarity.linear_across_ranks`; per
task class `_conditional_hsic_in_slots` and `_conditional_cka_across_ranks`, whose task labels travel, one
integer a sample); the pairwise forms gather the batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._labels import IGNORE_INDEX
from .._validation import (
    check_min_batch,
    check_same_batch_and_device,
    check_tensor,
    compute_dtype,
    full_precision,
)
from ..distributed import Gather, gather_batch, gather_labels, is_distributed, max_across_ranks, sum_across_ranks
from ._groups import (
    centre_within_groups,
    centre_within_slots,
    check_irrelevant_labels,
    check_task_labels,
    classmates_of,
    dense_ranks,
    member_rows,
    one_hot_known,
    slot_sums,
    within_class_groups,
    within_class_slots,
)
from .similarity import (
    GlobalMeasure,
    Kernel,
    KernelSide,
    _check_kernel,
    _cka,
    _flat,
    feature_space_cheaper,
    gaussian,
    global_count,
    linear_across_ranks,
    linear_alignment,
    linear_hsic,
    rbf_side,
    safe_ratio,
    squared_distances,
    tiled_alignment,
    tiled_hsic_sums,
    unit_frobenius,
    unit_scale,
)


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
    CKA-style value in about [0, 1] (0 where a side is constant, e.g. only one class known; with a linear
    kernel the features are centred, within each task class for the conditional form, and a spread at the
    rounding level of their magnitude counts as constant, as in `cka`). With fewer than
    `n_min` known labels the estimator is undefined and the result is a zero loss with a zero gradient, as
    with no label known. None of this is claimed to be the TIRTL / PurifiedLearning papers' mechanism.

    **Conditional** (`task_labels` given; the library's own): the mean over task classes `c` of the
    within-class values, weighted by class size, `Σ_c n_c · HSIC(K_z[E_c], L_u[E_c]) / Σ_c n_c`, over the
    eligible classes of `within_class_groups` with `min_size = n_min`: at least `n_min` samples whose `u` and
    `y` are known, and at least two distinct `u` values among them (`E_c` those samples, `n_c = |E_c|`). With
    `normalized=True` each class's term is its own ratio. With no eligible class the result is a zero loss
    with a zero gradient. It measures what `z` says about `u` within each task class, i.e. beyond `y`.

    A linear kernel is computed in feature space, `O(B·D·(D+K))` time and `O(B·D + D²)` memory with no
    `B × B` tensor (`similarity.linear_hsic`, per task class as sums into slots; the normalized conditional
    form holds a `D × D` Gram matrix per class slot, `(B // n_min + 1)·D²` numbers), unless the features are
    much wider than the batch (`similarity.feature_space_cheaper`), which forms the masked `(B, B)` kernel
    matrices; RBF kernels form them a tile of rows at a time (`similarity.tiled_hsic_sums`: `O(tile_rows(B)·B)`
    memory, plus the median heuristic's `B(B-1)/2` detached distances when `sigma` is None).

    Args:
        features: `(B, ...)`, flattened to `(B, D)`.
        irrelevant_labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`.
        num_irrelevant: number of irrelevant classes.
        kernel: the kernel on the features, `"linear"` or `"rbf"`.
        normalized: the CKA-style ratio instead of HSIC.
        sigma: RBF bandwidth; None takes the median distance between distinct rows of each group.
        unbiased: Song et al.'s unbiased estimator (True) or the biased one.
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`);
            a linear kernel in feature space from all-reduced sums (per task class for the conditional form,
            whose labels are gathered), without gathering the features.
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
    minimum = 4 if unbiased else 2
    what = f"{'unbiased' if unbiased else 'biased'} HSIC"
    with full_precision(features):
        if kernel == "linear" and gather == "global" and is_distributed():
            n = global_count(features.shape[0], gather, features.device)
            check_min_batch(n, minimum, what=what, name="features")
            x = _flat(features)
            grams = n // minimum + 1 if normalized and task_labels is not None else 1
            if feature_space_cheaper(n, x.shape[1], num_irrelevant, self_terms=normalized, grams=grams):
                # every rank's batch from all-reduced sums, not gathered
                if task_labels is not None:
                    return _conditional_hsic_in_slots(
                        x, irrelevant_labels, task_labels, num_irrelevant, ignore_index, minimum, unbiased, normalized,
                        gather,
                    )  # fmt: skip
                members = irrelevant_labels != ignore_index
                onehot = one_hot_known(irrelevant_labels, num_irrelevant, members, x.dtype)
                measure: GlobalMeasure = "alignment" if normalized else "hsic"
                return linear_across_ranks(
                    x, onehot, unbiased=unbiased, measure=measure, gather=gather, members=members, minimum=minimum
                )
        features, labels = gather_batch(features, gather), gather_batch(irrelevant_labels, gather)
        task_labels = None if task_labels is None else gather_batch(task_labels, gather)
        check_min_batch(features.shape[0], minimum, what=what, name="features")
        x = _flat(features)
        n, width = x.shape
        grams = n // minimum + 1 if normalized and task_labels is not None else 1
        if kernel == "linear" and feature_space_cheaper(n, width, num_irrelevant, self_terms=normalized, grams=grams):
            if task_labels is None:
                return _linear_hsic(x, labels, num_irrelevant, ignore_index, minimum, unbiased, normalized)
            if normalized:
                return _conditional_hsic_in_slots(
                    x, labels, task_labels, num_irrelevant, ignore_index, minimum, unbiased, True, "local"
                )
            return _conditional_linear_hsic(x, labels, task_labels, num_irrelevant, ignore_index, minimum, unbiased)
        if kernel == "rbf":
            return _tiled_rbf_hsic(
                x, labels, task_labels, num_irrelevant, ignore_index, minimum, sigma, unbiased, normalized
            )
        return _pairwise_hsic(
            x, labels, task_labels, num_irrelevant, ignore_index, minimum, kernel, sigma, unbiased, normalized
        )


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

    Linear kernels are computed in feature space (`similarity.linear_alignment`: `O(B·(D+D')²)` time,
    `O(B·(D+D') + (D+D')²)` memory, no `B × B` tensor; the within-class means as sums into slots) unless the
    features are much wider than the batch (`similarity.feature_space_cheaper`); RBF kernels form the
    `(B, B)` kernel matrices a tile of rows at a time (as `similarity.cka`; the within-class means as sums into
    slots).

    Args:
        features: `(B, ...)`, flattened to `(B, D)`.
        irrelevant_features: `(B, ...)`, flattened to `(B, D')`: the frozen network's features.
        kernel: `"linear"` or `"rbf"`, the same on both sides.
        sigma: RBF bandwidth; None takes the median distance between distinct rows, per side.
        unbiased: the unbiased HSIC (a batch of at least 4) instead of the biased one (at least 2).
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`);
            linear kernels in feature space from all-reduced sums (per task class for the conditional form,
            whose labels are gathered), without gathering the features.
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
    check_same_batch_and_device(features, irrelevant_features, ("features", "irrelevant_features"))
    if task_labels is not None:
        check_task_labels(task_labels, features.shape[0], ignore_index=ignore_index, device=features.device)
    minimum = 4 if unbiased else 2
    with full_precision(features, irrelevant_features):
        if kernel == "linear" and gather == "global" and is_distributed():
            n = global_count(features.shape[0], gather, features.device)
            check_min_batch(n, minimum, what=f"{'unbiased' if unbiased else 'biased'} CKA", name="features")
            dtype = compute_dtype(features, irrelevant_features)
            x = _flat(features).to(dtype)
            x_ref = _flat(irrelevant_features.detach()).to(dtype)
            if feature_space_cheaper(n, x.shape[1], x_ref.shape[1], self_terms=True):
                # every rank's batch from all-reduced sums, not gathered
                if task_labels is not None:
                    return _conditional_cka_across_ranks(x, x_ref, task_labels, ignore_index, minimum, unbiased, gather)
                return linear_across_ranks(x, x_ref, unbiased=unbiased, measure="alignment", gather=gather)
        task_labels = None if task_labels is None else gather_batch(task_labels, gather)
        features, reference = gather_batch(features, gather), gather_batch(irrelevant_features.detach(), gather)
        check_min_batch(features.shape[0], minimum, what=f"{'unbiased' if unbiased else 'biased'} CKA", name="features")
        dtype = compute_dtype(features, reference)
        if task_labels is None:  # checked above: the core of `cka`
            return _cka(features.to(dtype), reference.to(dtype), kernel, unbiased, sigma)
        return _conditional_cka(
            _flat(features).to(dtype),
            _flat(reference).to(dtype),
            task_labels,
            ignore_index,
            minimum,
            kernel,
            sigma,
            unbiased,
        )


def _conditional_cka(
    x: Tensor,
    x_ref: Tensor,
    task_labels: Tensor,
    ignore_index: int,
    minimum: int,
    kernel: Kernel,
    sigma: float | None,
    unbiased: bool,
) -> Tensor:
    """`irrelevant_cka` with task labels, of checked `(B, D)` and `(B, D')` rows in one compute dtype: in feature
    space (linear kernels, sums into slots) or through the masked `(B, B)` kernel matrices."""
    dtype = x.dtype
    members = _at_least(task_labels != ignore_index, minimum)
    if kernel == "linear" and feature_space_cheaper(x.shape[0], x.shape[1], x_ref.shape[1], self_terms=True):
        slots = dense_ranks(task_labels)
        z = _members_centred_unit_frobenius(centre_within_slots(x, slots, members), members, x)
        r = _members_centred_unit_frobenius(centre_within_slots(x_ref, slots, members), members, x_ref)
        count = members.to(dtype).sum()
        enough = count >= minimum  # no member at all when fewer than `minimum` (`_at_least`)
        value = linear_alignment(z, r, torch.where(enough, count, float(minimum)), unbiased=unbiased)
        return torch.where(enough, value, torch.zeros_like(value))
    if kernel == "rbf":  # one group, the members, after the within-class centring: the tiled kernel matrices
        slots = dense_ranks(task_labels)
        z, r = centre_within_slots(x, slots, members), centre_within_slots(x_ref, slots, members)
        count = members.to(dtype).sum()
        enough = count >= minimum
        n = torch.where(enough, count, float(minimum))
        sums = tiled_hsic_sums(
            rbf_side(z, sigma, members), rbf_side(r, sigma, members), n, unbiased=unbiased, mask=members
        )
        value = tiled_alignment(*sums, n)
        return torch.where(enough, value, torch.zeros_like(value))
    classmates = classmates_of(task_labels, members)
    z = centre_within_groups(x, classmates, members)
    r = centre_within_groups(x_ref, classmates, members)
    if kernel == "linear":  # linear HSIC is shift-invariant: rescale (as cka does) so no scale overflows
        z, r = _members_centred_unit_frobenius(z, members, x), _members_centred_unit_frobenius(r, members, x_ref)
    groups = members[:, None] & members[None, :]
    k = _group_kernel(z, groups, kernel=kernel, sigma=sigma)
    l = _group_kernel(r, groups, kernel=kernel, sigma=sigma)
    return _member_weighted_mean(_group_alignment(k, l, groups, unbiased=unbiased), members)


# --- feature space: linear kernels, no B × B tensor ------------------------------------------------------


def _linear_hsic(
    x: Tensor,
    labels: Tensor,
    num_irrelevant: int,
    ignore_index: int,
    minimum: int,
    unbiased: bool,
    normalized: bool,
) -> Tensor:
    """`irrelevant_hsic` without task labels, linear kernel, in feature space: the samples whose label is known
    (all of them or none, `_at_least`) centred over themselves, the one-hot labels likewise."""
    dtype = x.dtype
    members = _at_least(labels != ignore_index, minimum)
    count = members.to(dtype).sum()
    enough = count >= minimum
    n = torch.where(enough, count, float(minimum))  # denominators stay positive; the value is then dropped
    z = member_rows(x, members)
    onehot = one_hot_known(labels, num_irrelevant, members, dtype)
    uc = member_rows(onehot - onehot.sum(dim=0) / n, members)
    if normalized:  # a ratio: rows centred and scaled to unit norm, a spread at the rounding level is none
        value = linear_alignment(_members_centred_unit_frobenius(z, members), uc, n, unbiased=unbiased)
    else:
        value = linear_hsic(member_rows(z - z.sum(dim=0) / n, members), uc, n, unbiased=unbiased, centred=True)
    return torch.where(enough, value, torch.zeros_like(value))


def _conditional_linear_hsic(
    x: Tensor,
    labels: Tensor,
    task_labels: Tensor,
    num_irrelevant: int,
    ignore_index: int,
    minimum: int,
    unbiased: bool,
) -> Tensor:
    """`irrelevant_hsic` with task labels, linear kernel, not normalized, in feature space.

    Each task class `c` is a slot; its eligible rows `x_i` are centred within the class (`x̂`, HSIC is invariant
    to it), and with `S_ck = Σ_{i∈c, u_i=k} x̂_i` (a slot per `(c, k)` pair), `s_c = Σ_{i∈c} x̂_i`,
    `d_i = ‖x̂_i‖²`, `n_ck` the label counts, the delta kernel being `L = UUᵀ` for the one-hot `U`:

    - unbiased: `tr(K̃L̃) = Σ_k ‖S_ck‖² - Σ d_i`, `1ᵀK̃1 = ‖s_c‖² - Σ d_i`, `1ᵀL̃1 = Σ_k n_ck² - n_c`,
      `1ᵀK̃L̃1 = Σ_i (x̂_iᵀ s_c - d_i)(n_{c,u_i} - 1)`;
    - biased: `‖X̂_cᵀ Û_c‖²_F / (n_c-1)²` with `X̂_cᵀ Û_c = [S_ck - s_c n_ck / n_c]_k`.

    Per-pair sums are read back per sample and divided by the pair's count, so that one more sum into the
    class slots gives `Σ_k`. Returns `Σ_c n_c HSIC_c / Σ_c n_c` over the eligible classes (0 for none).
    """
    dtype = x.dtype
    eligible, slots = within_class_slots(labels, task_labels, num_irrelevant, ignore_index, min_size=minimum)
    weights = eligible.to(dtype)
    z = centre_within_slots(x, slots, eligible)
    outside = torch.full_like(slots, x.shape[0] * num_irrelevant)  # one slot for every non-eligible row
    pairs = dense_ranks(torch.where(eligible, slots * num_irrelevant + labels, outside))
    pair_sums = slot_sums(z, pairs).index_select(0, pairs)  # S_{c, u_i} per sample
    pair_size = slot_sums(weights, pairs).index_select(0, pairs).clamp_min(1.0)  # n_{c, u_i}
    class_sums = slot_sums(z, slots)  # s_c per slot
    class_size = slot_sums(weights, slots)  # n_c per slot (0 for a class that is not eligible)
    enough = class_size >= minimum
    n = torch.where(enough, class_size, float(minimum))
    if unbiased:
        norms = z.square().sum(dim=1)
        rows_k = (z * class_sums.index_select(0, slots)).sum(dim=1) - norms
        per_sample = torch.stack(
            [
                pair_sums.square().sum(dim=1) / pair_size * weights,  # Σ over the class: Σ_k ‖S_ck‖²
                norms,
                pair_size * weights,  # Σ over the class: Σ_k n_ck²
                rows_k * (pair_size - 1.0) * weights,
            ],
            dim=1,
        )
        pair_square, norm_sum, label_square, cross = slot_sums(per_sample, slots).unbind(dim=1)
        trace_term = pair_square - norm_sum
        sum_k = class_sums.square().sum(dim=1) - norm_sum
        sum_l = label_square - class_size
        value = (trace_term + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))
    else:
        share = pair_size / class_size.index_select(0, slots).clamp_min(1.0)
        centred = pair_sums - class_sums.index_select(0, slots) * share[:, None]
        value = slot_sums(centred.square().sum(dim=1) / pair_size * weights, slots) / (n - 1) ** 2
    value = torch.where(enough, value, torch.zeros_like(value))
    return (class_size * value).sum() / class_size.sum().clamp_min(1.0)


# --- per class as sums into one slot per class: what adds across ranks ---------------------------------------


class _ClassSums(NamedTuple):
    """The sums over each class's rows `z_i` (centred within the class) that its HSIC needs; they add across ranks.

    `C` classes, `K` irrelevant labels, `D` features; the last three only for a ratio (`normalized=True`).
    """

    pairs: Tensor  # (C, K, D): S_ck = Σ_{i∈c, u_i=k} z_i
    pair_norms: Tensor  # (C, K): Σ_{i∈c, u_i=k} ‖z_i‖²
    grams: Tensor | None  # (C, D, D): G_c = Σ_{i∈c} z_i z_iᵀ
    norm_rows: Tensor | None  # (C, D): Σ_{i∈c} ‖z_i‖² z_i
    norm_squares: Tensor | None  # (C,): Σ_{i∈c} ‖z_i‖⁴


def _class_sums(z: Tensor, labels: Tensor, slots: Tensor, classes: int, num_irrelevant: int, ratio: bool) -> _ClassSums:
    """`_ClassSums` of the rows of `z` (zero rows outside the classes' members add nothing)."""
    dtype, width = z.dtype, z.shape[1]
    pair = slots * num_irrelevant + labels.clamp(0, num_irrelevant - 1)
    norms = z.square().sum(dim=1)
    pairs = z.new_zeros(classes * num_irrelevant, width).index_add(0, pair, z)
    pair_norms = z.new_zeros(classes * num_irrelevant).index_add(0, pair, norms)
    shape = (classes, num_irrelevant)
    if not ratio:
        return _ClassSums(pairs.reshape(*shape, width), pair_norms.reshape(shape), None, None, None)
    grams = z.new_zeros(classes, width * width)
    chunk = max(1, 4 * z.shape[0] // max(width, 1))  # outer products of `chunk` rows at a time: ≤ 4·B·D numbers
    for start in range(0, z.shape[0], chunk):
        part = z[start : start + chunk]
        grams.index_add_(0, slots[start : start + chunk], (part[:, :, None] * part[:, None, :]).flatten(1))
    norm_rows = z.new_zeros(classes, width).index_add(0, slots, norms[:, None] * z)
    norm_squares = torch.zeros(classes, dtype=dtype, device=z.device).index_add(0, slots, norms.square())
    return _ClassSums(
        pairs.reshape(*shape, width),
        pair_norms.reshape(shape),
        grams.reshape(classes, width, width),
        norm_rows,
        norm_squares,
    )


def _summed_class_sums(sums: _ClassSums, gather: Gather) -> _ClassSums:
    """The `_ClassSums` of every rank added up, in one all-reduce (`distributed.sum_across_ranks`)."""
    if gather == "local" or not is_distributed():
        return sums
    parts = [t for t in sums if t is not None]
    total = sum_across_ranks(torch.cat([t.reshape(-1) for t in parts]), gather)
    pieces = iter(torch.split(total, [t.numel() for t in parts]))
    summed = [None if t is None else next(pieces).reshape(t.shape) for t in sums]
    pairs, pair_norms = summed[0], summed[1]
    assert pairs is not None and pair_norms is not None
    return _ClassSums(pairs, pair_norms, summed[2], summed[3], summed[4])


def _unbiased_of_sums(trace: Tensor, sum_k: Tensor, sum_l: Tensor, cross: Tensor, n: Tensor) -> Tensor:
    """Song et al.'s `HSIC_1` from `tr(K̃L̃)`, `1ᵀK̃1`, `1ᵀL̃1` and `1ᵀK̃L̃1` (per class)."""
    return (trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * cross) / (n * (n - 3))


def _class_hsic(sums: _ClassSums, counts: Tensor, minimum: int, unbiased: bool, ratio: bool) -> Tensor:
    """`Σ_c n_c v_c / Σ_c n_c` over the classes with at least `minimum` members, `v_c` the class's HSIC of its
    (centred) rows and its delta kernel `L = UUᵀ` (or, with `ratio`, `HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`).

    With `s_c = Σ_k S_ck`, `d_i = ‖z_i‖²`, `n_ck` the `(C, K)` label `counts` and `n_c = Σ_k n_ck`:

    - `HSIC(K, L)`: unbiased from `tr(K̃L̃) = Σ_k ‖S_ck‖² - Σ d_i`, `1ᵀK̃1 = ‖s_c‖² - Σ d_i`,
      `1ᵀL̃1 = Σ_k n_ck² - n_c`, `1ᵀK̃L̃1 = Σ_k (n_ck - 1)(S_ckᵀ s_c - Σ_{i∈(c,k)} d_i)`; biased
      `Σ_k ‖S_ck - s_c n_ck / n_c‖² / (n_c - 1)²`;
    - `HSIC(K, K)`: unbiased from `tr(K̃K̃) = ‖G_c‖²_F - Σ d_i²`, `1ᵀK̃K̃1 = s_cᵀ G_c s_c - 2 s_cᵀ Σ d_i z_i + Σ d_i²`;
      biased `‖G_c - s_c s_cᵀ / n_c‖²_F / (n_c - 1)²`;
    - `HSIC(L, L)`: unbiased from `tr(L̃L̃) = Σ_k n_ck² - n_c`, `1ᵀL̃L̃1 = Σ_k n_ck (n_ck - 1)²`; biased
      `‖diag(n_c·) - n_c· n_c·ᵀ / n_c‖²_F / (n_c - 1)²`.

    A self-HSIC at the rounding level of its kernel's entries (`≤ 64 eps · mean(K²)`, `mean(K²) = ‖G_c‖²_F / n_c²`
    and `Σ_k n_ck² / n_c²`) counts as zero, as in `_group_alignment`.
    """
    class_size = counts.sum(dim=1)
    enough = class_size >= minimum
    n = torch.where(enough, class_size, float(minimum))  # denominators stay positive; the value is then dropped
    class_sums = sums.pairs.sum(dim=1)
    norm_sum = sums.pair_norms.sum(dim=1)
    label_square = counts.square().sum(dim=1)
    if unbiased:
        sum_k, sum_l = class_sums.square().sum(dim=1) - norm_sum, label_square - class_size
        cross = ((counts - 1.0) * ((sums.pairs * class_sums[:, None, :]).sum(dim=2) - sums.pair_norms)).sum(dim=1)
        value = _unbiased_of_sums(sums.pairs.square().sum(dim=(1, 2)) - norm_sum, sum_k, sum_l, cross, n)
    else:
        share = counts / class_size.clamp_min(1.0)[:, None]
        value = (sums.pairs - class_sums[:, None, :] * share[:, :, None]).square().sum(dim=(1, 2)) / (n - 1) ** 2
    if ratio:
        assert sums.grams is not None and sums.norm_rows is not None and sums.norm_squares is not None
        grams = sums.grams
        if unbiased:
            rows = ((grams @ class_sums[:, :, None]).squeeze(2) * class_sums).sum(dim=1)  # s_cᵀ G_c s_c
            rows = rows - 2.0 * (class_sums * sums.norm_rows).sum(dim=1) + sums.norm_squares
            trace = grams.square().sum(dim=(1, 2)) - sums.norm_squares
            self_k = _unbiased_of_sums(trace, sum_k, sum_k, rows, n)
            labels_cross = (counts * (counts - 1.0).square()).sum(dim=1)
            self_l = _unbiased_of_sums(sum_l, sum_l, sum_l, labels_cross, n)
        else:
            centred = grams - class_sums[:, :, None] * class_sums[:, None, :] / n[:, None, None]
            self_k = centred.square().sum(dim=(1, 2)) / (n - 1) ** 2
            label_gram = torch.diag_embed(counts) - counts[:, :, None] * counts[:, None, :] / n[:, None, None]
            self_l = label_gram.square().sum(dim=(1, 2)) / (n - 1) ** 2
        eps = 64 * torch.finfo(value.dtype).eps
        entries = class_size.square().clamp_min(1.0)
        varies = enough & (self_k > eps * grams.detach().square().sum(dim=(1, 2)) / entries)
        varies = varies & (self_l > eps * label_square / entries)
        zero = torch.zeros_like(self_k)
        value = safe_ratio(value, torch.where(varies, self_k, zero), torch.where(varies, self_l, zero))
    value = torch.where(enough, value, torch.zeros_like(value))
    return (class_size * value).sum() / class_size.sum().clamp_min(1.0)


def _conditional_hsic_in_slots(
    x: Tensor,
    labels: Tensor,
    task_labels: Tensor,
    num_irrelevant: int,
    ignore_index: int,
    minimum: int,
    unbiased: bool,
    normalized: bool,
    gather: Gather,
) -> Tensor:
    """`irrelevant_hsic` with task labels, linear kernel, in feature space from per-class sums (`_ClassSums`).

    What the normalized conditional form takes (its per-class self-HSIC needs a `D × D` Gram matrix per class),
    and every conditional form under `gather="global"`: then every rank numbers the classes alike from all
    ranks' labels (`distributed.gather_labels`: one integer a sample), and all-reduces its per-class sums (the
    class sums for the means; with `normalized`, the spreads; then the `_ClassSums`: `C·(K·D + D²)` numbers),
    never the features. The classes are those of `within_class_slots`' eligible samples, in
    `B // minimum + 1` slots (each eligible class holds `minimum` samples or more; one slot for the others), or
    under `gather="global"` in as many slots as there are eligible classes (a host read, as the batch sizes).

    Each class's rows are centred within the class; with `normalized` they are then scaled to unit Frobenius
    norm per class, a class whose spread is at the rounding level of its values' magnitude being zero
    (`_unit_within_groups`), and all rows first by one power of two from the largest magnitude (exact).
    """
    dtype, width = x.dtype, x.shape[1]
    both, start = gather_labels(torch.stack([labels.to(torch.int64), task_labels.to(torch.int64)], dim=1), gather)
    eligible_all, _ = within_class_slots(both[:, 0], both[:, 1], num_irrelevant, ignore_index, min_size=minimum)
    slots_all = dense_ranks(torch.where(eligible_all, both[:, 1], -1))
    across_ranks = gather == "global" and is_distributed()  # then a host read, as gather="global"'s batch sizes are
    classes = int(slots_all.max()) + 1 if across_ranks else x.shape[0] // minimum + 1
    counts = x.new_zeros(classes, num_irrelevant).index_add(
        0, slots_all, one_hot_known(both[:, 0], num_irrelevant, eligible_all, dtype)
    )
    rows = slice(start, start + x.shape[0])
    eligible, slots = eligible_all[rows], slots_all[rows]
    class_size = counts.sum(dim=1)
    xm = member_rows(x, eligible)
    if normalized:
        magnitudes = x.new_zeros(classes).scatter_reduce(0, slots, xm.detach().abs().amax(dim=1), "amax")
        magnitudes = max_across_ranks(magnitudes, gather)
        scale = unit_scale(magnitudes)
        xm, magnitudes = xm * scale, magnitudes * scale
    means = sum_across_ranks(x.new_zeros(classes, width).index_add(0, slots, xm), gather)
    z = member_rows(xm - (means / class_size.clamp_min(1.0)[:, None]).index_select(0, slots), eligible)
    if normalized:
        spread = sum_across_ranks(x.new_zeros(classes).index_add(0, slots, z.square().sum(dim=1)), gather)
        rounding = 8 * torch.finfo(dtype).eps * magnitudes
        varies = spread > (rounding * rounding * class_size * width).clamp_min(torch.finfo(dtype).tiny)
        norm = torch.where(varies, spread, torch.ones_like(spread)).sqrt()
        z = torch.where(varies.index_select(0, slots)[:, None], z / norm.index_select(0, slots)[:, None], 0.0)
    sums = _summed_class_sums(_class_sums(z, labels, slots, classes, num_irrelevant, normalized), gather)
    return _class_hsic(sums, counts, minimum, unbiased, normalized)


def _conditional_cka_across_ranks(
    x: Tensor, x_ref: Tensor, task_labels: Tensor, ignore_index: int, minimum: int, unbiased: bool, gather: Gather
) -> Tensor:
    """`irrelevant_cka` with task labels, linear kernels, in feature space from sums added across ranks: every rank
    numbers the classes alike from all ranks' task labels (`distributed.gather_labels`), all-reduces the class
    sums (`C × (D + D')`) to centre its rows within their classes, then `linear_across_ranks` (never the
    features)."""
    dtype, width = x.dtype, x.shape[1]
    all_labels, start = gather_labels(task_labels.to(torch.int64), gather)
    members_all = _at_least(all_labels != ignore_index, minimum)
    slots_all = dense_ranks(torch.where(members_all, all_labels, -1))
    classes = int(slots_all.max()) + 1  # a host read, as gather="global"'s batch sizes are
    class_size = x.new_zeros(classes).index_add(0, slots_all, members_all.to(dtype))
    rows = slice(start, start + x.shape[0])
    members, slots = members_all[rows], slots_all[rows]
    both = member_rows(torch.cat([x, x_ref], dim=1), members)
    sums = sum_across_ranks(x.new_zeros(classes, both.shape[1]).index_add(0, slots, both), gather)
    centred = member_rows(both - (sums / class_size.clamp_min(1.0)[:, None]).index_select(0, slots), members)
    largest = both.detach().abs()
    return linear_across_ranks(
        centred[:, :width],
        centred[:, width:],
        unbiased=unbiased,
        measure="alignment",
        gather=gather,
        members=members,
        minimum=minimum,
        largest=torch.stack([largest[:, :width].amax(), largest[:, width:].amax()]),
    )


# --- pairwise: masked kernel matrices, one value per group, every group at once -------------------------


def _pairwise_hsic(
    x: Tensor,
    labels: Tensor,
    task_labels: Tensor | None,
    num_irrelevant: int,
    ignore_index: int,
    minimum: int,
    kernel: Kernel,
    sigma: float | None,
    unbiased: bool,
    normalized: bool,
) -> Tensor:
    """`irrelevant_hsic` through the masked `(B, B)` kernel matrices (any kernel; the reference form)."""
    if task_labels is None:
        members = _at_least(labels != ignore_index, minimum)
        groups = members[:, None] & members[None, :]
    else:
        members, groups = within_class_groups(labels, task_labels, num_irrelevant, ignore_index, min_size=minimum)
    z = member_rows(x, members)
    if kernel == "linear" and normalized:  # as the feature-space form: centred, unit norm, rounding-level spread 0
        z = (
            _members_centred_unit_frobenius(z, members)
            if task_labels is None
            else _unit_within_groups(z, groups, members)
        )
    elif kernel == "linear":  # linear HSIC is shift-invariant: centred rows round like the estimate, not like ‖z̄‖²
        z = centre_within_groups(z, groups, members)
    onehot = one_hot_known(labels, num_irrelevant, members, x.dtype)
    k = _group_kernel(z, groups, kernel=kernel, sigma=sigma)
    l = onehot @ onehot.T
    value = _group_alignment(k, l, groups, unbiased=unbiased) if normalized else _group_hsic(k, l, groups, unbiased)
    return _member_weighted_mean(value, members)


def _tiled_rbf_hsic(
    x: Tensor,
    labels: Tensor,
    task_labels: Tensor | None,
    num_irrelevant: int,
    ignore_index: int,
    minimum: int,
    sigma: float | None,
    unbiased: bool,
    normalized: bool,
) -> Tensor:
    """`irrelevant_hsic` with an RBF kernel: the kernel matrices a tile of rows at a time
    (`similarity.tiled_hsic_sums`, `O(tile_rows(B)·B)` memory in both passes; the same value as `_pairwise_hsic`
    up to rounding). Without task labels one group, the samples whose label is known (all of them or none,
    `_at_least`); with them a group per task class (`within_class_slots`: its eligible samples), each with its
    own centring, rounding threshold and median bandwidth, and the class-size weighted mean of the groups'
    values."""
    dtype = x.dtype
    if task_labels is None:
        members, slots = _at_least(labels != ignore_index, minimum), None
        size = members.to(dtype).sum()
    else:
        members, slots = within_class_slots(labels, task_labels, num_irrelevant, ignore_index, min_size=minimum)
        size = slot_sums(members.to(dtype), slots).index_select(0, slots)  # each row's class size
    enough = size >= minimum
    n = torch.where(enough, size, float(minimum))  # denominators stay positive; the value is then dropped
    onehot = KernelSide(one_hot_known(labels, num_irrelevant, members, dtype), "linear")
    k_side = rbf_side(x, sigma, members, slots)
    sums = tiled_hsic_sums(k_side, onehot, n, unbiased=unbiased, mask=members, slots=slots)
    value = tiled_alignment(*sums, n) if normalized else sums[0]
    value = torch.where(enough, value, torch.zeros_like(value))
    return value if task_labels is None else _member_weighted_mean(value, members)


def _at_least(known: Tensor, minimum: int) -> Tensor:
    """`known`, or all False when it holds fewer than `minimum` True entries (no host read)."""
    return known & (known.sum() >= minimum)


def _member_weighted_mean(values: Tensor, members: Tensor) -> Tensor:
    """`Σ_{i ∈ members} values_i / |members|` (0 for no member): per-sample group values give the class-size
    weighted mean over groups, `Σ_c n_c v_c / Σ_c n_c`.

    The values are multiplied by 0/1 weights, so NaN or inf in a non-member's value would propagate (unlike
    `functional.distribution_matching._masked_mean`, which selects with `torch.where`); here a non-member's value
    is always a finite 0 (its group is empty: `_group_hsic` gives 0 there).
    """
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


def _unit_within_groups(x: Tensor, groups: Tensor, members: Tensor) -> Tensor:
    """The member rows of `x` centred within their group and scaled to unit Frobenius norm per group (each group's
    rows by that group's norm); a group whose spread is at the rounding level of its rows' magnitude
    (`similarity.unit_frobenius`'s floor) becomes exactly zero, with a zero gradient. Zero rows elsewhere.

    The linear kernel of the result gives each group's CKA-style ratio as that of `x` (the ratio ignores
    centring and scale), and its rounding test then sees a constant group as constant.
    """
    centred = centre_within_groups(x, groups, members)
    weights = groups.to(x.dtype)
    spread = weights @ centred.square().sum(dim=1)
    magnitudes = member_rows(x.detach(), members).abs().amax(dim=1)
    largest = torch.where(groups, magnitudes[None, :], torch.zeros((), dtype=x.dtype, device=x.device)).amax(dim=1)
    rounding = 8 * torch.finfo(x.dtype).eps * largest
    noise_floor = (rounding * rounding * weights.sum(dim=1) * x.shape[1]).clamp_min(torch.finfo(x.dtype).tiny)
    varies = spread > noise_floor
    norm = torch.where(varies, spread, torch.ones_like(spread)).sqrt()
    return torch.where(varies[:, None], centred / norm[:, None], torch.zeros_like(centred))


def _members_centred_unit_frobenius(x: Tensor, members: Tensor, source: Tensor | None = None) -> Tensor:
    """The member rows of `x` centred over the members and scaled to unit Frobenius norm; zero rows elsewhere.

    `cka`'s rescaling (`similarity._centred_unit_frobenius`, which takes every row; both end in
    `similarity.unit_frobenius`) on the member rows of a masked batch: features whose
    spread is at the rounding level of their magnitude are constant and become exactly zero, with a zero
    gradient. The magnitude is that of `source` when `x` was computed from it (the features before they were
    centred within their classes: constant features leave a rounding residue there, which is no spread),
    else of `x`.
    """
    weights = members.to(x.dtype)
    count = weights.sum()
    centred = member_rows(x - (weights @ x / count.clamp_min(1.0))[None, :], members)
    largest = member_rows((x if source is None else source).detach(), members).abs().amax()
    return unit_frobenius(centred, largest, count * x.shape[1])
