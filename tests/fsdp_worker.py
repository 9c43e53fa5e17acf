"""What each rank runs in tests/test_fsdp.py (a module of its own so spawned processes can import it).

FSDP2 (`torch.distributed.fsdp.fully_shard`) runs on CPU with gloo in the pinned torch, so it is what is
tested; one FSDP1 (`FullyShardedDataParallel`) check covers the `_fsdp_wrapped_module.` names that its
wrappers insert.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from distributed_worker import run_and_leave
from torch import Tensor, nn

import negtransfer_losses as ntl
from negtransfer_losses.distributed import Gather

SIZES = (5, 7)  # unequal local batches
LAYERS = ("blocks.0", "blocks.1")  # bare names: what `named_modules()` of the unsharded model says
STEPS = 2
LR = 0.1


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2)])
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def make_model(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def full_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SIZES), 6, generator=g, dtype=torch.float64)
    u = torch.randint(0, 3, (sum(SIZES),), generator=g)
    return x, u


def train(model: nn.Module, frozen: ntl.FrozenReference, x: Tensor, u: Tensor, gather: Gather) -> dict[str, Any]:
    """STEPS steps of SGD on anti-transfer (two layers) + HSIC suppression; what each step measured.

    The loss is multiplied by 3.7 before backward (a missing grad-output multiply would go unnoticed
    with 1). The reference differs from the student: identical features give cosines of 1 and a zero
    gradient, which would pass whatever the gather did.
    """
    at = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", gram_scope="batch", gather=gather)
    sup = ntl.HSICSuppression(3, normalized=True, gather=gather)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    tap = ntl.FeatureTap(model, list(LAYERS))
    steps: list[dict[str, Any]] = []
    for _ in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        out = model(x)
        student = tap.pop()
        reference_features = frozen(x)
        if hasattr(frozen.model, "reshard"):
            # FSDP2 does not reshard the root module's own parameters after a forward pass (the backward
            # would gather them again); a frozen model has no backward, so free them here.
            frozen.model.reshard()
        loss = at(student, reference_features) + sup(student["blocks.1"], u)
        (3.7 * loss + 0.0 * out.sum()).backward()
        steps.append(
            {
                "loss": loss.detach(),
                "reference": {k: v.clone() for k, v in reference_features.items()},
                "grads": full_grads(model),
            }
        )
        optimizer.step()
    tap.remove()
    return {"layers": tap.layers, "reference_layers": frozen.layers, "steps": steps}


def full_grads(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter's gradient as a full tensor (a collective call for sharded DTensor gradients)."""
    grads: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        grad = p.grad
        full = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        grads[name] = full.detach().clone()
    return grads


def parameter_types(student: nn.Module, reference: nn.Module) -> dict[str, str]:
    return {
        f"{side}.{name}": type(p).__name__
        for side, model in (("student", student), ("reference", reference))
        for name, p in model.named_parameters()
    }


def shard(model: Net, mesh: Any) -> Net:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp1_tap_check() -> dict[str, Any]:
    """FSDP1 wrappers add `_fsdp_wrapped_module.` to names: bare names must still resolve."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    x, _ = full_batch()
    wrapped = FullyShardedDataParallel(
        make_model(seed=0),
        auto_wrap_policy=ModuleWrapPolicy({nn.Sequential}),
        device_id=torch.device("cpu"),
        use_orig_params=True,
    )
    names = [n for n, _ in wrapped.named_modules()]
    with ntl.FeatureTap(wrapped, list(LAYERS)) as tap:
        wrapped(x)
    return {"module_names": names, "layers": tap.layers, "features": tap.pop()}


def run_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    run_and_leave(rank, world, init_file, out_dir, fsdp_results)


def fsdp_results(rank: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    x, u = full_batch()
    start, stop = sum(SIZES[:rank]), sum(SIZES[: rank + 1])
    model = shard(make_model(seed=0), mesh)
    # stop_early=False: an early stop raises out of the root's forward, so FSDP2's post-forward hook of
    # the root never runs and its state stays "in forward" (its reshard() then does nothing)
    frozen = ntl.FrozenReference(shard(make_model(seed=1), mesh), list(LAYERS), stop_early=False)
    results = train(model, frozen, x[start:stop], u[start:stop], "global")
    results["sharded"] = parameter_types(model, frozen.model)
    # the early stop still gives the right features, call after call
    stopping = ntl.FrozenReference(shard(make_model(seed=1), mesh), list(LAYERS))
    results["early_stop_reference"] = [stopping(x[start:stop]) for _ in range(2)]
    results["fsdp1"] = fsdp1_tap_check()
    return results


def single_process() -> dict[str, Any]:
    """The same training on the concatenated batch in one process, unsharded."""
    x, u = full_batch()
    return train(make_model(seed=0), ntl.FrozenReference(make_model(seed=1), list(LAYERS)), x, u, "local")
