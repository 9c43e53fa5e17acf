"""What each rank runs in tests/test_global_sums.py: linear-kernel HSIC and CKA under gather="global" from
all-reduced sums (a module of its own so spawned processes can import it; the model, batch and process-group
helpers are tests/distributed_worker.py's)."""

from __future__ import annotations

from collections.abc import Callable

import distributed_worker as base
import torch
from torch import Tensor, nn

import negtransfer_losses as ntl
import negtransfer_losses.distributed as ntd
import negtransfer_losses.functional as ntf

UNKNOWN = [1, 8]  # irrelevant labels unknown on both ranks' slices (rank 0 holds 0-4, rank 1 holds 5-11)
# task class 0 on both ranks (u 0, 1, 0, 1), class 1 (u 1, 1, 1, 1, 2), class 2 one sample with a known u
TASK = [0, 2, 0, 1, 1, 0, 1, 1, -100, 0, 2, 1]


def losses(gather: str) -> dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]]:
    """Each loss as a function of (features, a second side, irrelevant labels, task labels); linear kernels,
    features narrow enough for the feature-space form."""
    g = {"gather": gather}
    cases: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
        "hsic": lambda z, y, u: ntf.hsic(z, y, **g),  # type: ignore[arg-type]
        "hsic_biased": lambda z, y, u: ntf.hsic(z, y, unbiased=False, **g),  # type: ignore[arg-type]
        "cka": lambda z, y, u: ntf.cka(z, y, **g),  # type: ignore[arg-type]
        "cka_unbiased": lambda z, y, u: ntf.cka(z, y, unbiased=True, **g),  # type: ignore[arg-type]
        "linear_cka": lambda z, y, u: ntf.linear_cka(z, y, **g),  # type: ignore[arg-type]
        "linear_cka_unbiased": lambda z, y, u: ntf.linear_cka(z, y, unbiased=True, **g),  # type: ignore[arg-type]
        "suppression_hsic": lambda z, y, u: ntl.HSICSuppression(3, **g)(z, u),  # type: ignore[arg-type]
        "suppression_hsic_biased": lambda z, y, u: ntl.HSICSuppression(3, unbiased=False, **g)(z, u),  # type: ignore[arg-type]
        "suppression_hsic_normalized": lambda z, y, u: ntl.HSICSuppression(3, normalized=True, **g)(z, u),  # type: ignore[arg-type]
        "suppression_cka": lambda z, y, u: ntl.CKASuppression(**g)(z, y),  # type: ignore[arg-type]
        "suppression_cka_unbiased": lambda z, y, u: ntl.CKASuppression(unbiased=True, **g)(z, y),  # type: ignore[arg-type]
    }
    conditional: dict[str, Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]] = {
        f"conditional_hsic{'_normalized' if normalized else ''}{'' if unbiased else '_biased'}": (
            lambda z, y, u, t, n=normalized, b=unbiased: ntl.HSICSuppression(
                3,
                conditional=True,
                normalized=n,
                unbiased=b,
                **g,  # type: ignore[arg-type]
            )(z, u, task_labels=t)
        )
        for normalized in (False, True)
        for unbiased in (True, False)
    }
    for unbiased in (True, False):
        conditional[f"conditional_cka{'_unbiased' if unbiased else ''}"] = (
            lambda z, y, u, t, b=unbiased: ntl.CKASuppression(conditional=True, unbiased=b, **g)(z, y, task_labels=t)  # type: ignore[arg-type]
        )
    return {**{name: (lambda z, y, u, t, f=f: f(z, y, u)) for name, f in cases.items()}, **conditional}


def batch() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x, y, u = base.full_batch()
    u[UNKNOWN] = -100
    return x, y + 3.0, u, torch.tensor(TASK)  # a side with a mean: the global centring matters


def features(model: nn.Module, x: Tensor) -> Tensor:
    """The body's map pooled to `(B, 3)`, plus a constant offset (a mean to centre away)."""
    return model.body(x).mean(dim=(2, 3)) + 2.0  # type: ignore[operator, no-any-return]


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    base.run_and_leave(rank, world, init_file, out_dir, ddp_results)


def ddp_results(rank: int) -> dict[str, dict[str, Tensor]]:
    x, y, u, t = batch()
    start, stop = sum(base.SIZES[:rank]), sum(base.SIZES[: rank + 1])
    model = base.make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    gathers = [0]
    gather_padded = ntd._all_gather_padded

    def counting(t: Tensor) -> tuple[Tensor, list[int]]:
        gathers[0] += int(t.is_floating_point())  # labels may travel (one integer a sample), features not
        return gather_padded(t)

    ntd._all_gather_padded = counting
    results: dict[str, dict[str, Tensor]] = {}
    for name, loss_fn in losses("global").items():
        model.zero_grad(set_to_none=True)
        gathers[0] = 0
        out = ddp(x[start:stop])
        loss = loss_fn(features(model, x[start:stop]), y[start:stop], u[start:stop], t[start:stop])
        (3.7 * loss + 0.0 * out.sum()).backward()  # DDP expects the output used
        results[name] = {"loss": loss.detach(), "gathers": torch.tensor(gathers[0]), **base.body_grads(model)}
    return results


def single_process() -> dict[str, dict[str, Tensor]]:
    """The same losses on the concatenated batch in one process."""
    x, y, u, t = batch()
    results: dict[str, dict[str, Tensor]] = {}
    for name, loss_fn in losses("local").items():
        model = base.make_model()
        loss = loss_fn(features(model, x), y, u, t)
        (3.7 * loss).backward()
        results[name] = {"loss": loss.detach(), **base.body_grads(model)}
    return results
