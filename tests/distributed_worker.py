"""What each rank runs in tests/test_distributed.py (a module of its own so spawned processes can import it)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf

SIZES = (5, 7)  # unequal local batches


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh())
        self.head = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).flatten(1))


def make_model(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def full_batch() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SIZES), 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(sum(SIZES), 3, generator=g, dtype=torch.float64)
    u = torch.randint(0, 3, (sum(SIZES),), generator=g)
    return x, y, u


def losses(gather: str, reference: Net) -> dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]]:
    """Each loss as a function of (features, input batch, targets, irrelevant labels).

    `reference` must differ from the student: identical features give cosines of 1 and a zero gradient,
    which would make the anti-transfer case pass whatever the gather did.
    """
    at = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", gram_scope="batch", gather=gather)  # type: ignore[arg-type]
    frozen = ntl.FrozenReference(reference, "body")
    suppression = ntl.HSICSuppression(3, normalized=True, gather=gather)  # type: ignore[arg-type]
    return {
        "hsic": lambda z, x, y, u: ntf.hsic(z, y, kernel="rbf", gather=gather),  # type: ignore[arg-type]
        "linear_cka": lambda z, x, y, u: ntf.linear_cka(z, y, gather=gather),  # type: ignore[arg-type]
        "cka_unbiased": lambda z, x, y, u: ntf.cka(z, y, unbiased=True, gather=gather),  # type: ignore[arg-type]
        "anti_transfer": lambda z, x, y, u: at({"body": z}, frozen(x)),
        "irrelevant_hsic": lambda z, x, y, u: suppression(z, u),
    }


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    run_and_leave(rank, world, init_file, out_dir, ddp_results)


def ddp_results(rank: int) -> dict[str, dict[str, Tensor]]:
    x, y, u = full_batch()
    start, stop = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    results: dict[str, dict[str, Tensor]] = {}
    for name, loss_fn in losses("global", make_model(seed=1)).items():
        model.zero_grad(set_to_none=True)
        with ntl.FeatureTap(ddp, "body") as tap:
            out = ddp(x[start:stop])
        loss = loss_fn(tap.pop()["body"], x[start:stop], y[start:stop], u[start:stop])
        (3.7 * loss + 0.0 * out.sum()).backward()  # a task loss would use the output; DDP expects it used
        results[name] = {"loss": loss.detach(), **body_grads(model)}
    return results


def run_and_leave(
    rank: int, world: int, init_file: str, out_dir: str, compute: Callable[[int], dict[str, Any]]
) -> None:
    """Join the gloo group, save `compute(rank)` as `rank{rank}.pt` in `out_dir`, meet at a barrier, leave."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(compute(rank), Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Leave without running destructors: gloo's teardown at process exit sometimes aborts a rank with
    # "terminate called without an active exception" (seen ~1 run in 12, also after a barrier). The
    # results are saved and every rank has passed the barrier, so nothing is lost.
    os._exit(0)


def single_process() -> dict[str, dict[str, Tensor]]:
    """The same losses on the concatenated batch in one process."""
    x, y, u = full_batch()
    results: dict[str, dict[str, Tensor]] = {}
    for name, loss_fn in losses("local", make_model(seed=1)).items():
        model = make_model()
        with ntl.FeatureTap(model, "body") as tap:
            out = model(x)
        loss = loss_fn(tap.pop()["body"], x, y, u)
        (3.7 * loss + 0.0 * out.sum()).backward()
        results[name] = {"loss": loss.detach(), **body_grads(model)}
    return results


def body_grads(model: Net) -> dict[str, Tensor]:
    return {f"body.{n}": p.grad.clone() for n, p in model.body.named_parameters() if p.grad is not None}
