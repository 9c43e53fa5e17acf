"""Under DDP every rank keeps the same state: the adversary's head and its own optimizer, Purify's statistics, the
bias twin's weights, BatchNorm statistics, own optimizer and per-sample averages.

Two gloo processes on the CPU train for 20 steps on different data each (tests/state_sync_worker.py); the
modules' states must agree across ranks to 1e-6, and a control run with the library blind to the process
group must drift apart (else the test could not fail).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import state_sync_worker
import torch
import torch.multiprocessing as mp


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, dict[str, torch.Tensor]]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(state_sync_worker.run_rank, args=(2, f"{tmp}/init", tmp), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(2)]


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(state_sync_worker.CASES))
def test_every_rank_keeps_the_same_state(ranks: list[dict[str, dict[str, torch.Tensor]]], name: str) -> None:
    first, second = ranks[0][name], ranks[1][name]
    assert largest_difference(first, second) <= 1e-6
    moving = ("head.", "class_means", "cross_covariance_sum", "twin.", "twin_loss_ema", "main_loss_ema")
    trained = [k for k in first if k.startswith(moving) and first[k].is_floating_point()]
    assert trained and all(first[k].abs().max() > 0 for k in trained)  # the state moved
    if "head_optimizer.step" in first:
        # 20 calls of 10 own steps each, the step where rank 1 knew no label included (the other rank's did)
        assert int(first["head_optimizer.step"]) == int(second["head_optimizer.step"]) == 200
    if "twin_optimizer.step" in first:
        # one own step per call until frozen, the step where rank 1 knew no label included
        steps = state_sync_worker.FROZEN_AT if "frozen" in name else 20
        assert int(first["twin_optimizer.step"]) == int(second["twin_optimizer.step"]) == steps
        assert bool(first["frozen_flag"]) == ("frozen" in name)
        assert first["twin_seen"].all() and first["main_seen"].all()  # every index seen by some rank


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adversarial unsynchronized", "purify unsynchronized", "bias twin unsynchronized"])
def test_without_the_synchronization_the_ranks_drift_apart(
    ranks: list[dict[str, dict[str, torch.Tensor]]], name: str
) -> None:
    assert largest_difference(ranks[0][name], ranks[1][name]) > 1e-3
