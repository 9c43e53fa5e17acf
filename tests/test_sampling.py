"""GroupBalancedBatchSampler: every batch holds every (task, irrelevant) group, reproducibly, with valid indices."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import negtransfer_losses as ntl
from negtransfer_losses.sampling import GroupBalancedBatchSampler


def biased_labels(per_class: int = 50, conflicting: int = 2, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Each class mostly with its own factor value; `conflicting` samples per class with the next value."""
    y = torch.arange(classes).repeat_interleave(per_class)
    u = y.clone()
    for c in range(classes):
        u[c * per_class : c * per_class + conflicting] = (c + 1) % classes
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return y[perm], u[perm]


def test_every_batch_holds_every_group_and_indices_are_valid() -> None:
    y, u = biased_labels()
    groups = set(zip(y.tolist(), u.tolist(), strict=True))
    assert len(groups) == 8
    sampler = GroupBalancedBatchSampler(y, u, 11, generator=torch.Generator().manual_seed(1))
    batches = list(sampler)
    assert len(batches) == len(sampler) == 200 // 11
    for batch in batches:
        assert len(batch) == 11
        assert all(isinstance(i, int) and 0 <= i < len(y) for i in batch)
        assert {(int(y[i]), int(u[i])) for i in batch} == groups
    # round-robin: over an epoch every group is drawn equally often (±1)
    drawn = Counter((int(y[i]), int(u[i])) for batch in batches for i in batch)
    assert max(drawn.values()) - min(drawn.values()) <= 1
    # a large group hands out distinct samples before repeating one
    aligned = [i for batch in batches for i in batch if (int(y[i]), int(u[i])) == (0, 0)]
    assert len(set(aligned)) == len(aligned) == drawn[(0, 0)]


def test_the_rare_groups_samples_repeat_and_are_all_used() -> None:
    y, u = biased_labels(conflicting=2)
    sampler = GroupBalancedBatchSampler(y, u, 8, generator=torch.Generator().manual_seed(0))
    rare = {i for i in range(len(y)) if int(y[i]) != int(u[i])}
    used = Counter(i for batch in sampler for i in batch if i in rare)
    assert set(used) == rare and min(used.values()) >= 5


def test_batch_smaller_than_the_number_of_groups_is_a_clear_error() -> None:
    y, u = biased_labels()
    with pytest.raises(ValueError, match=r"'batch_size' \(7\) must be at least the number of .* groups present \(8\)"):
        GroupBalancedBatchSampler(y, u, 7)


@pytest.mark.parametrize(
    ("task", "irrelevant", "batch", "error", "match"),
    [
        (torch.zeros(4, dtype=torch.long), torch.zeros(5, dtype=torch.long), 4, ValueError, "one label per sample"),
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), 4, TypeError, "'task_labels' must hold integer"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long), 4, ValueError, "must be 1-d"),
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 4, ValueError, "empty"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 0, ValueError, r"'batch_size' \(0\)"),
        (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), 2.0, TypeError, "'batch_size' must be"),
    ],
)
def test_invalid_arguments_are_named(
    task: torch.Tensor, irrelevant: torch.Tensor, batch: int, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        GroupBalancedBatchSampler(task, irrelevant, batch)


def test_a_generator_makes_it_reproducible_and_epochs_differ() -> None:
    y, u = biased_labels()

    def epochs(seed: int) -> list[list[list[int]]]:
        sampler = GroupBalancedBatchSampler(y, u, 16, generator=torch.Generator().manual_seed(seed))
        return [list(sampler), list(sampler)]

    first, again, other = epochs(3), epochs(3), epochs(4)
    assert first == again
    assert first != other
    assert first[0] != first[1]


def test_sequences_work_and_a_dataloader_takes_it_as_batch_sampler() -> None:
    y = [0, 0, 0, 1, 1, 1]
    u = [0, 0, 1, 1, 1, 0]
    sampler = GroupBalancedBatchSampler(y, u, 4, generator=torch.Generator().manual_seed(0))
    assert sampler.groups == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert len(sampler) == 1
    data = TensorDataset(torch.arange(6.0), torch.tensor(y), torch.tensor(u))
    (x, yb, ub), *_ = list(DataLoader(data, batch_sampler=sampler))
    assert sorted(zip(yb.tolist(), ub.tolist(), strict=True)) == sampler.groups
    assert x.tolist() == [float(i) for i in x.long().tolist()]
    assert ntl.GroupBalancedBatchSampler is GroupBalancedBatchSampler
