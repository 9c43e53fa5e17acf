"""GroupBalancedBatchSampler: every batch holds every (task, irrelevant) group, reproducibly, with valid indices."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

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


# --- resuming (state_dict / load_state_dict) -------------------------------------------------------------------


def old_sequence(y: torch.Tensor, u: torch.Tensor, batch_size: int, seed: int, epochs: int) -> list[list[int]]:
    """The sampler's algorithm before num_replicas and state_dict, written out: the single-rank reference."""
    _, group = torch.unique(torch.stack([y, u], dim=1), dim=0, return_inverse=True)
    members = list(torch.split(torch.argsort(group, stable=True), torch.bincount(group).tolist()))
    generator = torch.Generator().manual_seed(seed)
    queues: list[list[int]] = [[] for _ in members]
    next_group, batches = 0, []
    for _ in range(epochs * max(1, len(y) // batch_size)):
        batch = []
        for _ in range(batch_size):
            if not queues[next_group]:
                m = members[next_group]
                queues[next_group].extend(m[torch.randperm(len(m), generator=generator)].tolist())
            batch.append(queues[next_group].pop())
            next_group = (next_group + 1) % len(members)
        batches.append(batch)
    return batches


def test_a_single_rank_draws_what_it_drew_before() -> None:
    y, u = biased_labels()
    sampler = GroupBalancedBatchSampler(y, u, 11, generator=torch.Generator().manual_seed(5))
    assert [b for _ in range(3) for b in sampler] == old_sequence(y, u, 11, 5, 3)
    seeded = GroupBalancedBatchSampler(y, u, 11, seed=5)
    assert [b for _ in range(3) for b in seeded] == old_sequence(y, u, 11, 5, 3)


def through_torch_save(state: dict[str, object]) -> dict[str, object]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, object] = torch.load(buffer, weights_only=True)
    return loaded


def make(y: torch.Tensor, u: torch.Tensor, how: str, seed: int, **kwargs: Any) -> GroupBalancedBatchSampler:
    if how == "generator":
        return GroupBalancedBatchSampler(y, u, 16, generator=torch.Generator().manual_seed(seed), **kwargs)
    if how == "seed":
        return GroupBalancedBatchSampler(y, u, 16, seed=seed, **kwargs)
    return GroupBalancedBatchSampler(y, u, 16, **kwargs)


@pytest.mark.parametrize("how", ["generator", "seed", "default"])
@pytest.mark.parametrize(("epoch", "k"), [(0, 0), (0, 1), (0, 5), (0, 12), (1, 0), (1, 7)])
def test_a_resumed_sampler_continues_the_uninterrupted_run(how: str, epoch: int, k: int) -> None:
    y, u = biased_labels()
    torch.manual_seed(100)
    reference = make(y, u, how, 1)
    full = [list(reference) for _ in range(4)]
    assert len(full[0]) == 12

    torch.manual_seed(100)
    first = make(y, u, how, 1)
    for _ in range(epoch):
        list(first)
    iterator = iter(first)
    assert [next(iterator) for _ in range(k)] == full[epoch][:k]
    rng = torch.get_rng_state()  # the user's own checkpoint covers torch's default generator
    state = through_torch_save(first.state_dict())
    assert state["batches_in_epoch"] == (12 if epoch and not k else k)  # 12: the last epoch is over
    assert state["generator"] == ("default" if how == "default" else "own")

    torch.manual_seed(999)
    resumed = make(y, u, how, 2)  # another seed: the state restores the generator
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    remaining = ([full[epoch][k:]] if k < 12 else []) + full[epoch + 1 :]
    assert [list(resumed) for _ in remaining] == remaining


def test_saved_at_the_end_of_an_epoch_the_next_iteration_is_a_whole_new_epoch() -> None:
    y, u = biased_labels()
    reference = make(y, u, "seed", 3)
    full = [list(reference) for _ in range(3)]
    first = make(y, u, "seed", 3)
    iterator = iter(first)
    for _ in range(len(first)):
        next(iterator)  # the loop stops before the sampler's StopIteration
    resumed = make(y, u, "seed", 3)
    resumed.load_state_dict(through_torch_save(first.state_dict()))
    assert [list(resumed), list(resumed)] == full[1:]
    assert [list(first), list(first)] == full[1:]


def test_an_interrupted_iteration_is_continued_by_the_next_one() -> None:
    y, u = biased_labels()
    reference = make(y, u, "seed", 3)
    full = [list(reference) for _ in range(2)]
    sampler = make(y, u, "seed", 3)
    for step, _ in enumerate(sampler):
        if step == 4:
            break
    assert list(sampler) == full[0][5:]
    assert list(sampler) == full[1]


def test_batches_consumed_counts_back_the_prefetched_batches() -> None:
    y, u = biased_labels()
    reference = make(y, u, "generator", 4)
    full = [list(reference) for _ in range(3)]
    first = make(y, u, "generator", 4)
    list(first)
    iterator = iter(first)
    handed_out = [next(iterator) for _ in range(9)]  # e.g. 2 workers × prefetch_factor 2 ahead of the loop
    assert handed_out == full[1][:9]
    with pytest.raises(ValueError, match=r"'batches_consumed' \(10\) must be in \[0, 9\]"):
        first.state_dict(batches_consumed=10)
    with pytest.raises(TypeError, match="'batches_consumed' must be an int"):
        first.state_dict(batches_consumed=True)
    state = through_torch_save(first.state_dict(batches_consumed=5))
    assert state["batches_in_epoch"] == 5
    assert next(iterator) == full[1][9]  # saving changed nothing of the running sampler
    resumed = make(y, u, "generator", 0)
    resumed.load_state_dict(state)
    assert [list(resumed), list(resumed)] == [full[1][5:], full[2]]
    # after a load, counting back reaches to the loaded position, not before
    iterator = iter(resumed)
    next(iterator)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        resumed.state_dict(batches_consumed=2)
    again = make(y, u, "generator", 0)
    again.load_state_dict(state)
    iterator = iter(again)
    next(iterator), next(iterator)
    with pytest.raises(ValueError, match=r"must be in \[5, 7\]"):
        again.state_dict(batches_consumed=4)
    third = make(y, u, "generator", 0)
    third.load_state_dict(again.state_dict(batches_consumed=6))
    assert list(third) == full[1][6:]


def test_batches_consumed_needs_the_samplers_own_generator() -> None:
    y, u = biased_labels()
    sampler = make(y, u, "default", 0)
    iterator = iter(sampler)
    next(iterator), next(iterator)
    assert sampler.state_dict(batches_consumed=2)["batches_in_epoch"] == 2
    with pytest.raises(ValueError, match=r"'batches_consumed' \(1\) differs .* handed out .* \(2\).*'generator' or"):
        sampler.state_dict(batches_consumed=1)


def test_a_dataloader_without_workers_hands_out_what_it_consumes() -> None:
    y, u = biased_labels()
    data = TensorDataset(torch.arange(len(y)))
    reference = make(y, u, "seed", 6)
    full = [b for _ in range(2) for b in reference]
    sampler = make(y, u, "seed", 6)
    seen = []
    for step, (x,) in enumerate(DataLoader(data, batch_sampler=sampler)):
        seen.append(x.tolist())
        if step == 3:
            state = through_torch_save(sampler.state_dict())
            break
    resumed = make(y, u, "seed", 6)
    resumed.load_state_dict(state)
    seen += [x.tolist() for _ in range(2) for (x,) in DataLoader(data, batch_sampler=resumed)]
    assert seen == full[:4] + full[4:]  # 4 batches, the rest of epoch 0, then epoch 1


def test_a_state_for_other_labels_or_settings_is_refused_with_what_differs() -> None:
    y, u = biased_labels()
    state = make(y, u, "seed", 0).state_dict()
    with pytest.raises(ValueError, match=r"batch_size 16 \(saved\) vs 17 \(this sampler\).*same task and irrelevant"):
        GroupBalancedBatchSampler(y, u, 17, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_replicas 1 \(saved\) vs 2"):
        make(y, u, "seed", 0, num_replicas=2, rank=1).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_samples 200 \(saved\) vs 199"):
        make(y[1:], u[1:], "seed", 0).load_state_dict(state)
    other_u = u.clone()
    other_u[0] = 7
    with pytest.raises(ValueError, match=r"groups: 8 saved vs 9 here .*only here: \[\(\d, 7\)\]"):
        make(y, other_u, "seed", 0).load_state_dict(state)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"labels: same groups and length, but the samples' labels .* differ"):
        make(y[perm], u[perm], "seed", 0).load_state_dict(state)


def test_a_state_of_another_layout_or_generator_kind_is_refused_with_what_to_do() -> None:
    y, u = biased_labels()
    own = make(y, u, "seed", 0)
    state = own.state_dict()
    with pytest.raises(ValueError, match=r"lacks the keys \['queues'\].*older or foreign.*without load_state_dict"):
        own.load_state_dict({k: v for k, v in state.items() if k != "queues"})
    with pytest.raises(ValueError, match=r"lacks the keys \['generator_state'\]"):
        own.load_state_dict({k: v for k, v in state.items() if k != "generator_state"})
    with pytest.raises(ValueError, match="layout version 0"):
        own.load_state_dict({**state, "version": 0})
    with pytest.raises(TypeError, match="'state' must be a dict"):
        own.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="torch's default generator: construct it with 'generator' or 'seed'"):
        make(y, u, "default", 0).load_state_dict(state)
    with pytest.raises(ValueError, match="construct it without 'generator' and 'seed'"):
        own.load_state_dict(make(y, u, "default", 0).state_dict())
    queues = [q.clone() for q in state["queues"]]
    queues[0] = torch.tensor([int(torch.nonzero(own._group_of == 1)[0])])
    with pytest.raises(ValueError, match=r"state\['queues'\]\[0\] holds indices that are not samples of group"):
        own.load_state_dict({**state, "queues": queues})
    with pytest.raises(ValueError, match=r"state\['batches_in_epoch'\] must be an int in \[0, 12\]"):
        own.load_state_dict({**state, "batches_in_epoch": 13})
    # a refused state changes nothing
    assert [list(own)] == [list(make(y, u, "seed", 0))]


# --- several ranks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("replicas", [2, 3])
def test_each_rank_holds_every_group_and_the_ranks_make_up_the_global_batch(replicas: int) -> None:
    y, u = biased_labels()
    groups = set(zip(y.tolist(), u.tolist(), strict=True))
    ranks = [GroupBalancedBatchSampler(y, u, 9, num_replicas=replicas, rank=r) for r in range(replicas)]
    assert {len(s) for s in ranks} == {200 // (9 * replicas)}
    assert all(s.seed == 0 for s in ranks)
    one = GroupBalancedBatchSampler(y, u, 9 * replicas, seed=0)
    assert len(one) == len(ranks[0])
    for _ in range(3):
        per_rank = [list(s) for s in ranks]
        for batches in per_rank:
            assert all(len(b) == 9 and {(int(y[i]), int(u[i])) for i in b} == groups for b in batches)
        assert [[i for b in step for i in b] for step in zip(*per_rank, strict=True)] == list(one)


@pytest.mark.parametrize("replicas", [2, 3])
def test_the_ranks_batches_of_one_step_are_disjoint_when_the_groups_are_large(replicas: int) -> None:
    y = torch.arange(4).repeat_interleave(30 * replicas)  # 4 groups of 30 × replicas; 2 slots per group per rank
    u = y % 2
    ranks = [GroupBalancedBatchSampler(y, u, 8, num_replicas=replicas, rank=r, seed=3) for r in range(replicas)]
    for _ in range(4):
        for step in zip(*[list(s) for s in ranks], strict=True):
            together = [i for b in step for i in b]
            assert len(set(together)) == len(together) == 8 * replicas


def test_every_rank_resumes_from_one_ranks_state() -> None:
    y, u = biased_labels()
    full = []
    for r in range(3):
        reference = GroupBalancedBatchSampler(y, u, 8, num_replicas=3, rank=r, seed=11)
        full.append([list(reference) for _ in range(3)])
    assert len(full[0][0]) == 8
    first = [GroupBalancedBatchSampler(y, u, 8, num_replicas=3, rank=r, seed=11) for r in range(3)]
    iterators = [iter(s) for s in first]
    for step in range(3):
        assert [next(it) for it in iterators] == [full[r][0][step] for r in range(3)]
    states = [s.state_dict() for s in first]
    for key in ("queues", "generator_state", "next_group", "batches_in_epoch"):
        assert str(states[0][key]) == str(states[2][key])  # the state is the same on every rank
    saved = through_torch_save(states[0])
    for r in range(3):
        resumed = GroupBalancedBatchSampler(y, u, 8, num_replicas=3, rank=r, seed=0)
        resumed.load_state_dict(saved)
        assert [list(resumed), list(resumed)] == [full[r][0][3:], full[r][1]]


def test_a_generator_or_seed_chooses_the_shared_sequence() -> None:
    y, u = biased_labels()

    def sequence(**kwargs: Any) -> list[list[int]]:
        return list(GroupBalancedBatchSampler(y, u, 8, num_replicas=2, rank=1, **kwargs))

    assert sequence() == sequence(seed=0) == sequence(generator=torch.Generator().manual_seed(0))
    assert sequence(seed=1) != sequence()


def test_num_replicas_and_rank_default_to_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    y, u = biased_labels()
    sampler = GroupBalancedBatchSampler(y, u, 8)
    assert (sampler.num_replicas, sampler.rank, sampler.seed, sampler.generator) == (1, 0, None, None)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 3)
    sampler = GroupBalancedBatchSampler(y, u, 8)
    assert (sampler.num_replicas, sampler.rank, sampler.seed, len(sampler)) == (4, 3, 0, 200 // 32)
    assert "num_replicas=4, rank=3" in repr(sampler)
    with pytest.raises(ValueError, match=r"'rank' must be in \[0, num_replicas\) = \[0, 2\), got 3"):
        GroupBalancedBatchSampler(y, u, 8, num_replicas=2)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_replicas": 0, "rank": 0}, ValueError, r"'num_replicas' must be at least 1, got 0"),
        ({"num_replicas": 2, "rank": 2}, ValueError, r"'rank' must be in \[0, num_replicas\) = \[0, 2\), got 2"),
        ({"num_replicas": 2, "rank": -1}, ValueError, r"'rank' must be in"),
        ({"num_replicas": True, "rank": 0}, TypeError, "'num_replicas' must be an int, got bool"),
        ({"num_replicas": 2, "rank": 1.0}, TypeError, "'rank' must be an int, got float"),
        ({"seed": True}, TypeError, "'seed' must be an int, got bool"),
        ({"seed": 1, "generator": torch.Generator()}, ValueError, "either 'generator' or 'seed'"),
        ({"generator": 1}, TypeError, "'generator' must be a torch.Generator"),
    ],
)
def test_invalid_ddp_arguments_are_named(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    y, u = biased_labels()
    with pytest.raises(error, match=match):
        GroupBalancedBatchSampler(y, u, 8, **kwargs)


def test_hostile_inputs_found_by_review_get_value_errors() -> None:
    y, u = torch.arange(60) % 3, (torch.arange(60) // 3) % 2
    with pytest.raises(ValueError, match=r"are empty: there is nothing to sample"):
        GroupBalancedBatchSampler([], [], 8)
    state = GroupBalancedBatchSampler(y, u, 8, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"state\['groups'\] must be a \(groups, 2\) tensor"):
        GroupBalancedBatchSampler(y, u, 8, seed=0).load_state_dict({**state, "groups": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError, match=r"state\['batch_size'\] must be an int, got Tensor"):
        GroupBalancedBatchSampler(y, u, 8, seed=0).load_state_dict({**state, "batch_size": torch.tensor([8, 8])})
