"""Which samples share a task class, computed without leaving the device: the grouping of every conditional estimate.

Only fixed shapes: no `unique`, `nonzero`, boolean indexing or host reads. A batch's grouping is given in one of
two forms, both traced by `torch.compile` as one graph and run by a GPU without waiting for the host; the
conditional variants need no count of task classes in either:

- the `(n, n)` boolean matrix `classmates[i, j]` ("sample `j` counts in the class statistics of sample `i`"),
  so every per-class statistic is one matrix product over the batch (`within_class_groups`): what the
  pairwise (kernel-matrix) estimates, the adversary and the erasure use;
- *slots*: each sample's task class as a dense index in `[0, n)` (`dense_ranks`, from a sort), so every
  per-class statistic is a sum into `n` slots (`slot_sums`, an `index_add`) and read back per sample with
  `index_select`: `O(n·D)` time and memory, no `n × n` tensor (`within_class_slots`): what the
  feature-space estimates of `functional.suppression` use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._labels import IGNORE_INDEX, check_labels


def check_task_labels(
    labels: object, batch: int, *, ignore_index: int = IGNORE_INDEX, device: torch.device | None = None
) -> Tensor:
    """Raise unless `labels` is an integer tensor `(batch,)` of task classes (`≥ 0`) or `ignore_index`."""
    return check_labels(
        labels, None, batch, name="task_labels", what="task classes", ignore_index=ignore_index, device=device
    )


def check_irrelevant_labels(
    labels: object, num_irrelevant: int, features: Tensor, *, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Raise unless `labels` is `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`, on the features' device."""
    return check_labels(
        labels,
        num_irrelevant,
        features.shape[0],
        name="irrelevant_labels",
        what="irrelevant classes",
        ignore_index=ignore_index,
        device=features.device,
    )


def classmates_of(task_labels: Tensor, members: Tensor) -> Tensor:
    """`(n, n)` booleans: `[i, j]` is True when sample `j` is a member and has the task class of sample `i`.

    Args:
        task_labels: `(n,)` integer task classes.
        members: `(n,)` booleans, the samples that enter the class statistics.

    Returns:
        `(n, n)` booleans (a row of a non-member still lists the members of its class).
    """
    return (task_labels[:, None] == task_labels[None, :]) & members[None, :]


def one_hot_known(labels: Tensor, num_classes: int, known: Tensor, dtype: torch.dtype) -> Tensor:
    """`(n, num_classes)` one-hot rows of `labels`, zero rows where `known` is False (any value there).

    A comparison with `arange(num_classes)`, not `F.one_hot`, which reads the labels' range on the host.
    """
    classes = torch.arange(num_classes, device=labels.device)
    return ((labels[:, None] == classes[None, :]) & known[:, None]).to(dtype)


def within_class_groups(
    labels: Tensor,
    task_labels: Tensor,
    num_irrelevant: int,
    ignore_index: int = IGNORE_INDEX,
    *,
    min_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """`(eligible, classmates)`: which samples enter a conditional estimate, and who shares their class.

    The one eligibility rule of every conditional estimate: a sample is eligible when its `u` and `y` are both
    known and its task class holds, among the samples whose `u` and `y` are known, at least `min_size` samples
    and at least two distinct `u` values (a class with a single `u` value says nothing about `u` beyond `y`).
    `min_size` is what the estimator needs of a class: 4 for the unbiased HSIC, 2 for the biased one, 1 (no
    further condition: two distinct values are two samples) for the adversary and the erasure. Eligibility is
    a property of the class, so `classmates[i, j]` (`j` eligible and in `i`'s class) lists for every eligible
    `i` exactly the eligible members of its class.

    Args:
        labels: `(n,)` irrelevant labels `u` in `[0, num_irrelevant)` or `ignore_index`.
        task_labels: `(n,)` task classes `y` (`≥ 0`) or `ignore_index`.
        num_irrelevant: number of irrelevant classes.
        ignore_index: the label of unknown samples.
        min_size: the fewest samples with known `u` and `y` an eligible class holds.

    Returns:
        `eligible` `(n,)` booleans and `classmates` `(n, n)` booleans.
    """
    known = (labels != ignore_index) & (task_labels != ignore_index)
    classmates = classmates_of(task_labels, known)
    counts = classmates.to(torch.float32) @ one_hot_known(labels, num_irrelevant, known, torch.float32)
    eligible = known & ((counts > 0).sum(dim=1) >= 2) & (counts.sum(dim=1) >= min_size)
    return eligible, classmates & eligible[None, :]


def centre_within_groups(x: Tensor, classmates: Tensor, members: Tensor) -> Tensor:
    """`x_i - mean{x_j : classmates[i, j]}` for the member rows of `(n, D)` `x`; zero rows for the others.

    Rows outside `members` never reach the result, even when they hold NaN or inf.
    """
    x = member_rows(x, members)
    weights = classmates.to(x.dtype)
    means = (weights @ x) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return member_rows(x - means, members)


def member_rows(x: Tensor, members: Tensor) -> Tensor:
    """`x` with the rows outside `members` set to zero (NaN or inf there never reaches the result)."""
    return torch.where(members[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def within_class_log_prior(labels: Tensor, classmates: Tensor, num_irrelevant: int, dtype: torch.dtype) -> Tensor:
    """Per sample, `log p̂(u = k | y) = log((n_{y,k} + ½) / (n_y + K/2))` over its classmates, `(n, num_irrelevant)`."""
    members = classmates.any(dim=0)
    counts = classmates.to(dtype) @ one_hot_known(labels, num_irrelevant, members, dtype)
    smoothed = counts + 0.5
    return torch.log(smoothed / smoothed.sum(dim=1, keepdim=True))


def dense_ranks(keys: Tensor) -> Tensor:
    """Per entry of the `(n,)` integer `keys`, the rank of its value among the distinct values (0 for the least).

    Equal keys get equal ranks, and the ranks of `n` keys lie in `[0, n)`: the slot of each sample's group
    when `keys` names the groups. A stable sort, a cumulative count of new values, and a scatter back to the
    samples' order: fixed shapes, no host read.

    Args:
        keys: `(n,)` integers.

    Returns:
        `(n,)` int64 ranks.
    """
    ordered, order = torch.sort(keys, stable=True)
    new_value = torch.cat([torch.ones_like(ordered[:1], dtype=torch.bool), ordered[1:] != ordered[:-1]])
    ranks = torch.cumsum(new_value.to(torch.int64), dim=0) - 1
    return torch.zeros_like(ranks).scatter(0, order, ranks)


def slot_sums(values: Tensor, slots: Tensor) -> Tensor:
    """`out[s] = Σ_{i : slots_i = s} values_i` over `n` slots, `(n,)` or `(n, m)` like `values` (an `index_add`,
    differentiable; its backward reads the gradient back per sample)."""
    return torch.zeros_like(values).index_add(0, slots, values)


def within_class_slots(
    labels: Tensor,
    task_labels: Tensor,
    num_irrelevant: int,
    ignore_index: int = IGNORE_INDEX,
    *,
    min_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """`(eligible, slots)`: `within_class_groups`' eligibility rule, with each sample's task class as a slot.

    `eligible` is exactly `within_class_groups(...)[0]`; `slots` (`dense_ranks` of the task labels) is equal
    for samples of one task class, so the eligible members of a class are the eligible samples of its slot.
    No `(n, n)` tensor: `O(n · num_irrelevant)` memory.

    Args:
        labels: `(n,)` irrelevant labels `u` in `[0, num_irrelevant)` or `ignore_index`.
        task_labels: `(n,)` task classes `y` (`≥ 0`) or `ignore_index`.
        num_irrelevant: number of irrelevant classes.
        ignore_index: the label of unknown samples.
        min_size: the fewest samples with known `u` and `y` an eligible class holds.

    Returns:
        `eligible` `(n,)` booleans and `slots` `(n,)` int64 in `[0, n)`.
    """
    known = (labels != ignore_index) & (task_labels != ignore_index)
    slots = dense_ranks(task_labels)
    counts = slot_sums(one_hot_known(labels, num_irrelevant, known, torch.float32), slots).index_select(0, slots)
    eligible = known & ((counts > 0).sum(dim=1) >= 2) & (counts.sum(dim=1) >= min_size)
    return eligible, slots


def centre_within_slots(x: Tensor, slots: Tensor, members: Tensor) -> Tensor:
    """`centre_within_groups` with the classes given as slots: `x_i - mean{x_j : j a member, slots_j = slots_i}`
    for the member rows of `(n, D)` `x`; zero rows for the others (NaN or inf there never reaches the result)."""
    x = member_rows(x, members)
    means = slot_sums(x, slots) / slot_sums(members.to(x.dtype), slots).clamp_min(1.0)[:, None]
    return member_rows(x - means.index_select(0, slots), members)
