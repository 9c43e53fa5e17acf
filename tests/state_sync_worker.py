"""What each rank runs in tests/test_state_across_ranks.py (a module of its own so spawned processes can import it).

Every rank trains the same encoder (DDP) on its own data for `STEPS` steps, with a stateful module of the
package beside or inside the DDP wrapper, and saves that module's state for the test to compare across ranks.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import negtransfer_losses as ntl

STEPS = 20
BATCH, DIM, K, CLASSES = 12, 6, 3, 2


def encoder() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(5, DIM), nn.Tanh())


def data(rank: int, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's batch at `step`: different on every rank; at step 3 rank 1 knows no irrelevant label."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, 5, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    u = torch.randint(0, K, (BATCH,), generator=g)
    u[:2] = -100
    if step == 3 and rank == 1:
        u[:] = -100
    return x, y, u


def adversary(conditional: bool) -> ntl.AdversarialSuppression:
    torch.manual_seed(1)
    return ntl.AdversarialSuppression(K, dim=DIM, conditional=conditional, check_head_after=0)


def train_adversary_beside(rank: int, conditional: bool) -> dict[str, Tensor]:
    """The encoder in DDP, the adversary outside it: only the library keeps its head in step."""
    model = DistributedDataParallel(encoder())
    adv = adversary(conditional)
    optimizer = torch.optim.Adam([{"params": model.parameters()}, *adv.parameter_groups(1e-2)], lr=1e-2)
    for step in range(STEPS):
        x, y, u = data(rank, step)
        z = model(x)
        loss = z.square().mean() + adv(z, u, task_labels=y if conditional else None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(adv.state_dict())


class EncoderWithAdversary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = encoder()
        self.adversary = adversary(False)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        z = self.encoder(x)
        return z.square().mean() + self.adversary(z, u)


def train_adversary_inside(rank: int) -> dict[str, Tensor]:
    """The adversary inside the DDP-wrapped module (DDP averages its gradient too; its buffers are not broadcast)."""
    model = DistributedDataParallel(EncoderWithAdversary(), broadcast_buffers=False)
    inner = model.module
    assert isinstance(inner, EncoderWithAdversary)
    groups = inner.adversary.parameter_groups(1e-2)
    optimizer = torch.optim.Adam([{"params": inner.encoder.parameters()}, *groups], lr=1e-2)
    for step in range(STEPS):
        x, _, u = data(rank, step)
        loss = model(x, u)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(inner.adversary.state_dict())


def train_purify(rank: int, conditional: bool) -> dict[str, Tensor]:
    model = DistributedDataParallel(encoder())
    purify = ntl.Purify(K, DIM, conditional=conditional, momentum=0.2)
    head = nn.Linear(DIM, CLASSES)
    optimizer = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
    for step in range(STEPS):
        x, y, u = data(rank, step)
        clean = purify(model(x), u, task_labels=y if conditional else None)
        loss = nn.functional.cross_entropy(head(clean), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {**purify.state_dict(), "projection": purify.projection.clone()}


NUM_SAMPLES = 30  # the twin's data set: the ranks' batches of 12 share some indices at every step


def twin_network() -> nn.Module:
    torch.manual_seed(2)  # the same initial twin on every rank; BatchNorm's statistics differ per rank unless synced
    return nn.Sequential(nn.Linear(5, DIM), nn.BatchNorm1d(DIM), nn.Tanh(), nn.Linear(DIM, CLASSES))


FROZEN_AT = 10  # "bias twin frozen midway": every rank freezes the twin before this step (the sampler's recipe)


def train_bias_twin(rank: int, freeze_at: int | None = None) -> dict[str, Tensor]:
    """The model in DDP, the twin beside it: LfF's weights on the model's loss, the twin's own steps (until
    `freeze_at`, on every rank, if given)."""
    model = DistributedDataParallel(nn.Sequential(encoder(), nn.Linear(DIM, CLASSES)))
    twin = ntl.BiasTwin(twin_network, NUM_SAMPLES, layers=["2"], lr=1e-2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(STEPS):
        if step == freeze_at:
            twin.freeze()
        x, y, u = data(rank, step)
        y = torch.where(u == -100, -100, y)  # unknown task labels too; none on rank 1 at step 3
        indices = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(100 * rank + step))[:BATCH]
        logits = model(x)
        out = twin(x, y, indices, logits)
        assert out.weights is not None
        loss = (out.weights * nn.functional.cross_entropy(logits, y, reduction="none")).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return dict(twin.state_dict())


CASES: dict[str, Callable[[int], dict[str, Tensor]]] = {
    "adversarial beside DDP": lambda rank: train_adversary_beside(rank, False),
    "adversarial conditional beside DDP": lambda rank: train_adversary_beside(rank, True),
    "adversarial inside DDP": train_adversary_inside,
    "purify": lambda rank: train_purify(rank, False),
    "purify conditional": lambda rank: train_purify(rank, True),
    "bias twin beside DDP": train_bias_twin,
    "bias twin frozen midway": lambda rank: train_bias_twin(rank, FROZEN_AT),
}


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {name: train(rank) for name, train in CASES.items()}
        # the control: the same training with the library blind to the process group drifts apart
        blind = [
            mock.patch(f"negtransfer_losses.{where}.is_distributed", return_value=False)
            for where in ("distributed", "losses.adversarial", "losses.purify", "losses.bias_twin")
        ]
        with blind[0], blind[1], blind[2], blind[3]:
            results["adversarial unsynchronized"] = train_adversary_beside(rank, False)
            results["purify unsynchronized"] = train_purify(rank, False)
            results["bias twin unsynchronized"] = train_bias_twin(rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
