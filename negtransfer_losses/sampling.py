"""Batches that hold every (task class, irrelevant factor) group: the data-side twin of the suppression losses.

Under a spurious correlation most training samples sit in a few "aligned" groups (digit d with colour d) and
the rare "conflicting" samples (digit d with another colour) fall into a batch only now and then. The
conditional suppression methods compare samples of one task class that differ in the irrelevant factor,
so they see nothing in a batch without a conflicting sample. `GroupBalancedBatchSampler` puts every
present group in every batch (when the batch is large enough), so those rare samples shape every step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Sampler

__all__ = ["GroupBalancedBatchSampler"]

_STATE_VERSION = 1
_STATE_KEYS = (
    "version",
    "num_samples",
    "batch_size",
    "num_replicas",
    "groups",
    "labels_checksum",
    "queues",
    "next_group",
    "batches_in_epoch",
    "generator",
)
_PRIME = 2_147_483_647  # 2**31 - 1: the checksum's terms stay below 2**62, their sum below 2**63 up to 2**32 samples


def _as_labels(labels: Tensor | Sequence[int], name: str) -> Tensor:
    if isinstance(labels, Tensor):
        tensor = labels.detach().cpu()
    else:
        try:
            values = list(labels)
            tensor = torch.as_tensor(values, dtype=torch.long if not values else None)  # [] would be float32
        except (TypeError, ValueError) as error:
            raise TypeError(f"'{name}' must be a 1-d tensor or sequence of integer labels: {error}") from None
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"'{name}' must hold integer labels, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"'{name}' must be 1-d (one label per sample), got shape {tuple(tensor.shape)}")
    return tensor.long()


def _check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"'{name}' must be an int, got {type(value).__name__}")
    return value


def _groups(task_labels: Tensor | Sequence[int], irrelevant_labels: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
    """The distinct `(y, u)` pairs, sorted, and each sample's index into them (the labels checked first)."""
    y = _as_labels(task_labels, "task_labels")
    u = _as_labels(irrelevant_labels, "irrelevant_labels")
    if y.shape != u.shape:
        raise ValueError(
            f"'task_labels' and 'irrelevant_labels' must have one label per sample each, got "
            f"{tuple(y.shape)} and {tuple(u.shape)}"
        )
    if y.numel() == 0:
        raise ValueError("'task_labels' and 'irrelevant_labels' are empty: there is nothing to sample")
    pairs, group = torch.unique(torch.stack([y, u], dim=1), dim=0, return_inverse=True)
    return pairs, group


def _resolve_replicas(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """`num_replicas` and `rank` as given, else from torch.distributed when initialized, else 1 and 0."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    _check_int(num_replicas, "num_replicas")
    _check_int(rank, "rank")
    if num_replicas < 1:
        raise ValueError(f"'num_replicas' must be at least 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"'rank' must be in [0, num_replicas) = [0, {num_replicas}), got {rank}")
    return num_replicas, rank


def _labels_checksum(group: Tensor) -> int:
    """A position-weighted checksum of each sample's group index (with the groups' pairs it pins the labels)."""
    position = torch.arange(1, group.numel() + 1, dtype=torch.long) % _PRIME
    value = (group.long() + 1) % _PRIME
    first = (position * value % _PRIME).sum() % _PRIME
    second = (position * position % _PRIME * value % _PRIME).sum() % _PRIME
    return int(first) * _PRIME + int(second)


def _resolve_generator(
    generator: torch.Generator | None, seed: int | None, num_replicas: int
) -> tuple[torch.Generator | None, int | None]:
    """The generator the sampler draws from and its seed: `generator` as given, else one seeded with `seed`
    (0 when `num_replicas > 1` and neither is given), else None (torch's default generator)."""
    if seed is not None:
        _check_int(seed, "seed")
        if generator is not None:
            raise ValueError(
                f"pass either 'generator' or 'seed' (seeds the sampler's own generator), not both; got seed={seed}"
            )
    elif generator is None and num_replicas > 1:
        seed = 0
    if seed is not None:
        try:
            generator = torch.Generator().manual_seed(seed)
        except RuntimeError as error:
            raise ValueError(f"'seed' ({seed}) is not a valid generator seed: {error}") from None
    return generator, seed


@dataclass
class _Snapshot:
    """The sampler's position at the start of an epoch (or at a loaded state): what `state_dict` replays from."""

    batches_in_epoch: int
    queues: list[list[int]]
    next_group: int
    generator_state: Tensor


class _Position:
    """Where a sampler stands in its global sequence of draws, and the draws themselves.

    Per group the queue of indices still to hand out (popped from its end), the round-robin position
    `next_group`, the batches of the current epoch handed out, and a `_Snapshot` taken at the start of the
    epoch (or at a load) from which a position earlier in the epoch is replayed. `members[g]` holds the
    indices of group `g`; each step draws `slots` indices.
    """

    def __init__(self, members: list[Tensor], slots: int) -> None:
        self.members = members
        self.slots = slots
        self.queues: list[list[int]] = [[] for _ in members]
        self.next_group = 0
        self.batches_in_epoch = 0
        self.snapshot: _Snapshot | None = None

    def draw(
        self, queues: list[list[int]], next_group: int, generator: torch.Generator | None
    ) -> tuple[list[int], int]:
        """The global step: `slots` indices, round-robin from `next_group` (`queues` change)."""
        slots = []
        for _ in range(self.slots):
            queue = queues[next_group]
            if not queue:
                members = self.members[next_group]
                queue.extend(members[torch.randperm(len(members), generator=generator)].tolist())
            slots.append(queue.pop())
            next_group = (next_group + 1) % len(self.members)
        return slots, next_group

    def step(self, generator: torch.Generator | None) -> list[int]:
        """Draw the next global step and count it as handed out."""
        slots, self.next_group = self.draw(self.queues, self.next_group, generator)
        self.batches_in_epoch += 1
        return slots

    def capture(self, generator: torch.Generator) -> None:
        """Remember the current position and `generator`'s state as the point to replay from."""
        self.snapshot = _Snapshot(
            self.batches_in_epoch, [list(q) for q in self.queues], self.next_group, generator.get_state()
        )

    def restore(
        self, queues: list[list[int]], next_group: int, batches_in_epoch: int, generator: torch.Generator | None
    ) -> None:
        """Stand at a loaded position (the point to replay from, when there is an own `generator`)."""
        self.queues, self.next_group, self.batches_in_epoch = queues, next_group, batches_in_epoch
        self.snapshot = None
        if generator is not None:
            self.capture(generator)

    def counted_back(
        self, batches_consumed: int, generator: torch.Generator | None
    ) -> tuple[list[list[int]], int, Tensor | None]:
        """The queues, `next_group` and generator state after `batches_consumed` batches of the epoch."""
        handed_out = self.batches_in_epoch
        if generator is None:
            raise ValueError(
                f"'batches_consumed' ({batches_consumed}) differs from the batches handed out in this epoch "
                f"({handed_out}), and counting back needs the sampler's own generator: construct it with "
                f"'generator' or 'seed' (or save with DataLoader(num_workers=0), where the two agree)"
            )
        earliest = self.snapshot.batches_in_epoch if self.snapshot is not None else handed_out
        if not earliest <= batches_consumed <= handed_out:
            raise ValueError(
                f"'batches_consumed' ({batches_consumed}) must be in [{earliest}, {handed_out}]: at most the "
                f"batches handed out in this epoch, and no earlier than the start of the epoch (or the last "
                f"load_state_dict)"
            )
        snapshot = self.snapshot
        assert snapshot is not None
        replay = torch.Generator(device=generator.device)
        replay.set_state(snapshot.generator_state)
        queues, next_group = [list(q) for q in snapshot.queues], snapshot.next_group
        for _ in range(batches_consumed - snapshot.batches_in_epoch):
            _, next_group = self.draw(queues, next_group, replay)
        return queues, next_group, replay.get_state()


def _check_layout(state: object) -> None:
    """Refuse what is not a `state_dict()` of this layout: not a mapping, keys missing, another version."""
    if not isinstance(state, Mapping):
        raise TypeError(f"'state' must be a dict from GroupBalancedBatchSampler.state_dict(), got {type(state)}")
    missing = [key for key in _STATE_KEYS if key not in state]
    if state.get("generator") == "own" and "generator_state" not in state:
        missing.append("generator_state")
    if missing:
        raise ValueError(
            f"'state' lacks the keys {missing}: it is not a GroupBalancedBatchSampler.state_dict() of this "
            f"version (layout {_STATE_VERSION}), but an older or foreign one. Save the state again with this "
            f"version, or start without load_state_dict (the sampler then begins a fresh epoch)"
        )
    if state["version"] != _STATE_VERSION:
        raise ValueError(
            f"'state' has layout version {state['version']!r}, this version reads {_STATE_VERSION}: save the "
            f"state again with this version, or start without load_state_dict"
        )


def _check_same_data(state: Mapping[str, Any], sampler: GroupBalancedBatchSampler) -> None:
    """Refuse a state saved for other labels, groups, `batch_size` or `num_replicas`, naming each difference."""
    saved_groups = state["groups"]
    if not isinstance(saved_groups, Tensor) or saved_groups.dim() != 2 or saved_groups.shape[1:] != (2,):
        shape = tuple(saved_groups.shape) if isinstance(saved_groups, Tensor) else type(saved_groups).__name__
        raise ValueError(f"state['groups'] must be a (groups, 2) tensor of (task, irrelevant) pairs, got {shape}")
    for name in ("num_samples", "batch_size", "num_replicas"):
        if isinstance(state[name], bool) or not isinstance(state[name], int):
            raise ValueError(f"state[{name!r}] must be an int, got {type(state[name]).__name__}")
    saved_groups = [(int(a), int(b)) for a, b in saved_groups.tolist()]
    differences = [
        f"{name} {saved!r} (saved) vs {mine!r} (this sampler)"
        for name, saved, mine in (
            ("num_samples", state["num_samples"], sampler.num_samples),
            ("batch_size", state["batch_size"], sampler.batch_size),
            ("num_replicas", state["num_replicas"], sampler.num_replicas),
        )
        if saved != mine
    ]
    if saved_groups != sampler.groups:
        differences.append(
            f"groups: {len(saved_groups)} saved vs {len(sampler.groups)} here"
            f" (only saved: {sorted(set(saved_groups) - set(sampler.groups))[:5]},"
            f" only here: {sorted(set(sampler.groups) - set(saved_groups))[:5]})"
        )
    elif state["num_samples"] == sampler.num_samples and state["labels_checksum"] != sampler._labels_checksum:
        differences.append("labels: same groups and length, but the samples' labels (or their order) differ")
    if differences:
        raise ValueError(
            "'state' was saved by a sampler over other data or settings: "
            + "; ".join(differences)
            + ". Build this sampler with the same task and irrelevant labels (in the same dataset order), "
            "batch_size and num_replicas as the run that saved it, or start without load_state_dict"
        )


def _check_generator_kind(kind: object, has_own: bool) -> None:
    """Refuse a state whose generator kind (`"own"` or `"default"`) is unknown or differs from the sampler's."""
    if kind not in ("own", "default"):
        raise ValueError(f"state['generator'] must be 'own' or 'default', got {kind!r}")
    if kind == "own" and not has_own:
        raise ValueError(
            "'state' holds the state of the saving sampler's own generator, but this sampler draws from "
            "torch's default generator: construct it with 'generator' or 'seed' (the saved state replaces "
            "the generator's)"
        )
    if kind == "default" and has_own:
        raise ValueError(
            "'state' comes from a sampler that drew from torch's default generator (whose state it does not "
            "hold), but this sampler has its own generator: construct it without 'generator' and 'seed' "
            "(num_replicas 1) and restore torch's RNG state from your own checkpoint"
        )


def _loaded_queues(queues: object, sampler: GroupBalancedBatchSampler) -> list[list[int]]:
    """The saved queues as lists, each checked to hold only indices of its own group (no more than it has)."""
    groups = sampler.groups
    if not isinstance(queues, list | tuple) or len(queues) != len(groups):
        raise ValueError(f"state['queues'] must be a list of {len(groups)} tensors, one per group")
    loaded: list[list[int]] = []
    for index, queue in enumerate(queues):
        if (
            not isinstance(queue, Tensor)
            or queue.dim() != 1
            or queue.is_floating_point()
            or queue.is_complex()
            or queue.dtype == torch.bool
        ):
            raise ValueError(f"state['queues'][{index}] must be a 1-d integer tensor")
        queue = queue.long().cpu()
        if queue.numel() > len(sampler._position.members[index]) or (
            queue.numel()
            and (
                int(queue.min()) < 0
                or int(queue.max()) >= sampler.num_samples
                or not bool((sampler._group_of[queue] == index).all())
            )
        ):
            raise ValueError(
                f"state['queues'][{index}] holds indices that are not samples of group {groups[index]}: "
                f"the state is inconsistent with these labels"
            )
        loaded.append(queue.tolist())
    return loaded


def _loaded_counters(state: Mapping[str, Any], num_groups: int, epoch: int) -> tuple[int, int]:
    """The saved `next_group` (in `[0, num_groups)`) and `batches_in_epoch` (in `[0, epoch]`), checked."""
    next_group, batches = state["next_group"], state["batches_in_epoch"]
    if isinstance(next_group, bool) or not isinstance(next_group, int) or not 0 <= next_group < num_groups:
        raise ValueError(f"state['next_group'] must be an int in [0, {num_groups}), got {next_group!r}")
    if isinstance(batches, bool) or not isinstance(batches, int) or not 0 <= batches <= epoch:
        raise ValueError(f"state['batches_in_epoch'] must be an int in [0, {epoch}], got {batches!r}")
    return next_group, batches


def _restore_generator(generator: torch.Generator, saved: object) -> None:
    """Set `generator` to the saved state, refusing a state that is not a `get_state()` tensor or does not fit."""
    if not isinstance(saved, Tensor) or saved.dtype != torch.uint8:
        raise ValueError("state['generator_state'] must be a uint8 tensor from torch.Generator.get_state()")
    try:
        generator.set_state(saved.cpu())
    except RuntimeError as error:
        raise ValueError(
            f"state['generator_state'] does not fit this sampler's generator (device {generator.device}): {error}"
        ) from None


class GroupBalancedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices in which every present `(task label, irrelevant label)` group appears.

    The groups are the distinct pairs `(y_i, u_i)` of the dataset (pairs that never occur are not groups).
    Each batch is filled slot by slot, round-robin over the groups in a fixed order (sorted by `(y, u)`),
    and the round-robin carries on from one batch to the next; each group hands out its indices in a
    random order and reshuffles when it runs out. So every group is drawn equally often (a group with one
    sample repeats it; a large group shows part of its samples per epoch), and, when
    `batch_size ≥ number of groups`, every batch holds every group at least once. Used as
    `DataLoader(dataset, batch_sampler=GroupBalancedBatchSampler(y, u, 64))`.

    **With `AdversarialSuppression` pass `warmup_steps=200`** (or a few hundred): at full strength from the first
    step, with every group in every batch, the adversary can silence the features before they learn the task;
    the warm-up lets them learn it first (the measurements: docs/task-irrelevant-labels.md, `warmup_steps`).

    **With `HSICSuppression(conditional=True)` (unbiased estimator) use `batch_size ≥ 2 × groups`**: when a
    batch holds each group once, every task class's irrelevant labels are all distinct, the within-class
    delta kernel without its diagonal is zero, and the penalty is exactly zero, so training is plain training
    (the measurements: docs/case-studies.md, section 0).

    A label you mark unknown (e.g. `-100`) is a value like any other here: the samples with an unknown `u` form
    groups of their own, `(y, -100)`, drawn as often as the others.

    **Epochs.** An epoch has `len(dataset) // (batch_size × num_replicas)` batches (at least one), the same on
    every rank. Iterating again continues from where the last iteration stopped: after a whole epoch, a new
    epoch with fresh draws (so epochs differ); after an iteration left part-way (a `break`), the rest of that
    epoch. A `generator` or a `seed` makes the whole sequence reproducible.

    **DDP.** Construct the sampler on every rank with the *whole* dataset's labels (it shards itself; do not
    also wrap the dataset in a `DistributedSampler`). At each step every rank draws the same global sequence of
    `batch_size × num_replicas` slots (round-robin, as above) and keeps its own contiguous `batch_size` slots,
    rank `r` the slots `[r × batch_size, (r + 1) × batch_size)`. So every rank's batch holds every group, the
    ranks' batches of one step are disjoint wherever a group has enough samples not to reshuffle within the
    step, and together they are exactly the batch one sampler would draw at `batch_size × num_replicas`. The
    ranks need the same draws: with `num_replicas > 1` the sampler seeds its own generator with `seed` (0
    unless given, as in `DistributedSampler`: pass the same seed on every rank), or draws from the `generator`
    you pass, which must then be seeded identically on every rank (the sampler cannot check this).

    **Resuming.** `state_dict()` holds the sampler's position: each group's queue of indices still to hand out,
    the round-robin position, the batches of the current epoch handed out and, when the sampler has its own
    generator (`generator` or `seed`), that generator's state. A fresh sampler built with the same labels,
    `batch_size` and `num_replicas` continues exactly after `load_state_dict(state)`: the rest of the
    interrupted epoch, then whole epochs, all equal to the uninterrupted run's. The state is the same on every
    rank, so one rank's can be loaded on every rank; it loads with `torch.load(..., weights_only=True)`.

    - *Handed out, not consumed.* The state counts the batches *handed out*, with `DataLoader(num_workers=0)`
      the batches consumed. With workers the loader fetches up to `prefetch_factor × num_workers` batches
      ahead: pass `state_dict(batches_consumed=step_in_epoch)` (a replay from the epoch's start, which needs
      the sampler's own generator).
    - *torch's default generator.* Without `generator` and `seed` (single process only) the sampler draws from
      torch's global generator, which it neither saves nor restores (that would overwrite the state your
      dropout and augmentations draw from): it belongs to your own RNG checkpoint (`torch.get_rng_state()` /
      `torch.set_rng_state()`, saved at the same step). As everything else, `DataLoader` included, draws from
      it too, pass a `generator` or `seed` for dependable runs.

    Args:
        task_labels: `(N,)` integer task labels `y` of the dataset (a tensor on any device, or a sequence).
        irrelevant_labels: `(N,)` integer irrelevant-factor labels `u` (colour, speaker, ...).
        batch_size: indices per batch on each rank; must be at least the number of groups, so that every
            batch can hold every group.
        generator: the random generator for the shuffles; its state is saved in `state_dict()` and restored by
            `load_state_dict()`. None: the sampler's own generator seeded with `seed` when `seed` is given or
            `num_replicas > 1`, else torch's default generator.
        seed: seeds the sampler's own generator (`torch.Generator().manual_seed(seed)`); must be the same on
            every rank. None: 0 when `num_replicas > 1` and no `generator` is given. Give either `generator`
            or `seed`, not both.
        num_replicas: the number of ranks sharing each step (the DDP world size). None: torch.distributed's
            world size when it is initialized, else 1.
        rank: this process's rank in `[0, num_replicas)`. None: torch.distributed's rank when it is
            initialized, else 0.

    Returns:
        An iterable sampler: each item is a `list[int]` of `batch_size` indices into the dataset.

    Raises:
        TypeError: for labels that are not integers; a `batch_size`, `seed`, `num_replicas` or `rank` that is
            not an int (bools included); a `generator` that is not a `torch.Generator`.
        ValueError: for labels that are not 1-d, of different lengths, or empty; for a `batch_size` below 1
            or below the number of groups (the message names both counts); for `num_replicas` below 1, a
            `rank` outside `[0, num_replicas)`, or both `generator` and `seed`.
    """

    def __init__(
        self,
        task_labels: Tensor | Sequence[int],
        irrelevant_labels: Tensor | Sequence[int],
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        pairs, group = _groups(task_labels, irrelevant_labels)
        _check_int(batch_size, "batch_size")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"'generator' must be a torch.Generator or None, got {type(generator).__name__}")
        num_replicas, rank = _resolve_replicas(num_replicas, rank)
        generator, seed = _resolve_generator(generator, seed, num_replicas)
        if batch_size < max(1, len(pairs)):
            raise ValueError(
                f"'batch_size' ({batch_size}) must be at least the number of (task_labels, irrelevant_labels) "
                f"groups present ({len(pairs)}), so that every batch can hold every group (on every rank)"
            )
        order = torch.argsort(group, stable=True)
        counts = torch.bincount(group, minlength=len(pairs)).tolist()
        self.groups: list[tuple[int, int]] = [(int(a), int(b)) for a, b in pairs.tolist()]
        self._group_of = group
        self._labels_checksum = _labels_checksum(group)
        self.batch_size = batch_size
        self.num_samples = group.numel()
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.generator = generator
        self._position = _Position(list(torch.split(order, counts)), batch_size * num_replicas)

    def __len__(self) -> int:
        """Batches per epoch on each rank: `len(dataset) // (batch_size × num_replicas)`, at least one."""
        return max(1, self.num_samples // (self.batch_size * self.num_replicas))

    def __iter__(self) -> Iterator[list[int]]:
        position = self._position
        if position.batches_in_epoch >= len(self):
            position.batches_in_epoch = 0
        if position.batches_in_epoch == 0 and self.generator is not None:
            position.capture(self.generator)
        start = self.rank * self.batch_size
        while position.batches_in_epoch < len(self):
            yield position.step(self.generator)[start : start + self.batch_size]

    def state_dict(self, *, batches_consumed: int | None = None) -> dict[str, Any]:
        """The sampler's position, for `load_state_dict` on a fresh sampler (see the class docstring).

        Args:
            batches_consumed: how many batches of the current epoch the training loop has consumed, when that is
                fewer than the sampler has handed out (a `DataLoader` with workers prefetches ahead). None: the
                batches handed out. Counting back needs the sampler's own generator (`generator` or `seed`)
                and reaches back to the start of the epoch (or to the last `load_state_dict` in it).

        Returns:
            A dict of tensors, ints, lists and strings (`torch.save` it; it loads with `weights_only=True`):
            `version`, `num_samples`, `batch_size`, `num_replicas`, `groups` (`(G, 2)` pairs),
            `labels_checksum`, `queues` (per group, the indices still to hand out, the last first),
            `next_group`, `batches_in_epoch`, `generator` (`"own"` or `"default"`) and, for `"own"`,
            `generator_state`.

        Raises:
            TypeError: for a `batches_consumed` that is not an int.
            ValueError: for a `batches_consumed` outside what can be counted back to (the message names the
                range), or below the batches handed out when the sampler draws from torch's default generator.
        """
        position = self._position
        handed_out, queues, next_group = position.batches_in_epoch, position.queues, position.next_group
        generator_state = self.generator.get_state() if self.generator is not None else None
        if batches_consumed is not None and _check_int(batches_consumed, "batches_consumed") != handed_out:
            queues, next_group, generator_state = position.counted_back(batches_consumed, self.generator)
            handed_out = batches_consumed
        state: dict[str, Any] = {
            "version": _STATE_VERSION,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "groups": torch.tensor(self.groups, dtype=torch.long).reshape(-1, 2),
            "labels_checksum": self._labels_checksum,
            "queues": [torch.tensor(q, dtype=torch.long) for q in queues],
            "next_group": next_group,
            "batches_in_epoch": handed_out,
            "generator": "default" if generator_state is None else "own",
        }
        if generator_state is not None:
            state["generator_state"] = generator_state.clone()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state_dict()`: the next iteration yields the rest of its epoch, then whole epochs.

        Args:
            state: what `state_dict()` returned (possibly through `torch.save` / `torch.load`), from a sampler
                built with the same labels, `batch_size` and `num_replicas` (any rank).

        Raises:
            TypeError: for a `state` that is not a mapping.
            ValueError: for a state with missing keys or another version (an older or foreign layout); one saved
                for other labels, groups, `batch_size` or `num_replicas` (the message names each difference);
                one whose generator kind (own or torch's default) differs from this sampler's; or one whose
                contents are inconsistent (queues holding indices of other groups, positions out of range).
        """
        _check_layout(state)
        _check_same_data(state, self)
        _check_generator_kind(state["generator"], self.generator is not None)
        queues = _loaded_queues(state["queues"], self)
        next_group, batches = _loaded_counters(state, len(self.groups), len(self))
        if self.generator is not None:
            _restore_generator(self.generator, state["generator_state"])
        self._position.restore(queues, next_group, batches, self.generator)

    def __repr__(self) -> str:
        replicas = f", num_replicas={self.num_replicas}, rank={self.rank}" if self.num_replicas > 1 else ""
        return (
            f"GroupBalancedBatchSampler(groups={len(self.groups)}, batch_size={self.batch_size}{replicas}, "
            f"batches={len(self)})"
        )
