"""What each module adds to a training step: one optimizer step of a small ResNet, plain vs with the module.

The network is a ResNet-style CNN (a 3×3 stem, three residual stages of widths w, 2w, 4w, the last two at
stride 2, global average pooling to `(B, 4w)` features, a 10-class head for task A and an 8-attribute head
for task B) on `(B, 3, S, S)` inputs. The plain step is cross-entropy on task A, backward, SGD with
momentum. Each method adds its module at its defaults where a user would put it:

- `AntiTransferLoss` (Gram/cos², and `mean`): the student's `layer2` map against a frozen copy of the
  network run under `no_grad` up to `layer2` (what `FrozenReference(stop_early=True)` does);
- `HSICSuppression`, `AdversarialSuppression`: the pooled features against 10-class irrelevant labels
  (a few unknown); `conditional=True` adds the task labels;
- `CKASuppression`: the pooled features against a frozen network's pooled features (a full frozen forward);
- `Purify`: erases the irrelevant classes' directions from the pooled features before the head;
- `DistributionMatchingLoss`: couples the two heads (R of 10 × 8); `MultiTaskLoss` replaces the plain loss
  by supervised A + B (partially labelled) + matching + soft co-annotation.

Each method runs eagerly and under `torch.compile` (forward and loss compiled; backward through
AOTAutograd; the optimizer step eager), and is reported as its median step time and the ratio to the plain
step of the same mode. Modules that this version of the library does not have are listed as skipped.

    python benchmarks/step_overhead.py [--batch 64] [--width 32] [--size 32] [--repeats 30] [--device cuda]
                                       [--methods HSIC Purify] [--no-compile] [--mode reduce-overhead]

A tiny run to check that it works end to end (seconds eagerly, a few minutes with compile on CPU):

    python benchmarks/step_overhead.py --batch 8 --width 8 --size 16 --repeats 2 --warmup 1 --backend aot_eager
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import negtransfer_losses as ntl

NUM_CLASSES = 10  # task A, and the irrelevant factor u
NUM_ATTRIBUTES = 8  # task B (multilabel)
IGNORE = -100


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet(nn.Module):
    """Stem, three residual stages, pooled features and two heads; `forward` returns every stage."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = Block(width, width, 1)
        self.layer2 = Block(width, 2 * width, 2)
        self.layer3 = Block(2 * width, 4 * width, 2)
        self.purify: nn.Module | None = None
        self.head_a = nn.Linear(4 * width, NUM_CLASSES)
        self.head_b = nn.Linear(4 * width, NUM_ATTRIBUTES)

    def up_to_layer2(self, x: Tensor) -> Tensor:
        return self.layer2(self.layer1(self.stem(x)))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        layer2 = self.up_to_layer2(x)
        features = self.layer3(layer2).mean(dim=(2, 3))
        return {"layer2": layer2, "features": features}


@dataclass
class Batch:
    x: Tensor
    labels_a: Tensor  # task labels, all known
    irrelevant: Tensor  # u, a few unknown
    partial_a: Tensor  # task A labels with a third unknown (multi-task)
    targets_b: Tensor  # task B multilabel targets, -1 where unknown


def make_batch(batch: int, size: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(0)
    labels_a = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    irrelevant = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    irrelevant[torch.rand(batch, generator=g) < 0.1] = IGNORE
    partial_a = labels_a.clone()
    partial_a[torch.rand(batch, generator=g) < 0.33] = IGNORE
    targets_b = (torch.rand(batch, NUM_ATTRIBUTES, generator=g) < 0.3).float()
    targets_b[torch.rand(batch, NUM_ATTRIBUTES, generator=g) < 0.3] = -1.0
    return Batch(
        torch.randn(batch, 3, size, size, generator=g).to(device),
        labels_a.to(device),
        irrelevant.to(device),
        partial_a.to(device),
        targets_b.to(device),
    )


def relatedness() -> ntl.TaskRelatedness:
    g = torch.Generator().manual_seed(1)
    return ntl.TaskRelatedness((torch.rand(NUM_CLASSES, NUM_ATTRIBUTES, generator=g) * 0.9).tolist())


# A method: builds its module (None for the plain step) and the loss of one step, given the network's outputs.
Loss = Callable[[ResNet, nn.Module | None, ResNet, Batch], Tensor]


@dataclass
class Method:
    name: str
    build: Callable[[int], nn.Module | None]  # width -> module at its defaults (raises AttributeError if absent)
    loss: Loss


def _plain(net: ResNet, module: nn.Module | None, frozen: ResNet, batch: Batch) -> Tensor:
    out = net(batch.x)
    return F.cross_entropy(net.head_a(out["features"]), batch.labels_a)


def _anti_transfer(net: ResNet, module: nn.Module | None, frozen: ResNet, batch: Batch) -> Tensor:
    assert module is not None
    out = net(batch.x)
    with torch.no_grad():
        reference = frozen.up_to_layer2(batch.x)  # the frozen network stops at the deepest layer needed
    penalty = module({"layer2": out["layer2"]}, {"layer2": reference})
    return F.cross_entropy(net.head_a(out["features"]), batch.labels_a) + penalty


def _on_labels(conditional: bool) -> Loss:
    def loss(net: ResNet, module: nn.Module | None, frozen: ResNet, batch: Batch) -> Tensor:
        assert module is not None
        out = net(batch.x)
        extra = {"task_labels": batch.labels_a} if conditional else {}
        penalty = module(out["features"], batch.irrelevant, **extra)
        return F.cross_entropy(net.head_a(out["features"]), batch.labels_a) + penalty

    return loss


def _on_frozen_features(conditional: bool) -> Loss:
    def loss(net: ResNet, module: nn.Module | None, frozen: ResNet, batch: Batch) -> Tensor:
        assert module is not None
        out = net(batch.x)
        with torch.no_grad():
            reference = frozen(batch.x)["features"]
        extra = {"task_labels": batch.labels_a} if conditional else {}
        penalty = module(out["features"], reference, **extra)
        return F.cross_entropy(net.head_a(out["features"]), batch.labels_a) + penalty

    return loss


def _purify(conditional: bool) -> Loss:
    def loss(net: ResNet, module: nn.Module | None, frozen: ResNet, batch: Batch) -> Tensor:
        assert module is not None
        out = net(batch.x)
        extra = {"task_labels": batch.labels_a} if conditional else {}
        purified = module(out["features"], batch.irrelevant, **extra)
        return F.cross_entropy(net.head_a(purified), batch.labels_a)

    return loss


def _matching(net: ResNet, module: nn.Module | None, frozen: ResNet, batch: Batch) -> Tensor:
    assert module is not None
    out = net(batch.x)
    logits_a, logits_b = net.head_a(out["features"]), net.head_b(out["features"])
    return F.cross_entropy(logits_a, batch.labels_a) + module(logits_a, logits_b)


def _multi_task(net: ResNet, module: nn.Module | None, frozen: ResNet, batch: Batch) -> Tensor:
    assert module is not None
    out = net(batch.x)
    result: Tensor = module(net.head_a(out["features"]), net.head_b(out["features"]), batch.partial_a, batch.targets_b)
    return result


def methods() -> list[Method]:
    """Every method of the table; a module missing from this version of the library is skipped when built."""
    return [
        Method("plain step (cross-entropy)", lambda width: None, _plain),
        Method("AntiTransferLoss() (gram, cos², layer2)", lambda width: ntl.AntiTransferLoss(), _anti_transfer),
        Method(
            "AntiTransferLoss(aggregation='mean') (layer2)",
            lambda width: ntl.AntiTransferLoss(aggregation="mean"),
            _anti_transfer,
        ),
        Method(
            "HSICSuppression(num_irrelevant=10)",
            lambda width: ntl.HSICSuppression(num_irrelevant=NUM_CLASSES),
            _on_labels(False),
        ),
        Method(
            "HSICSuppression(..., conditional=True)",
            lambda width: ntl.HSICSuppression(num_irrelevant=NUM_CLASSES, conditional=True),
            _on_labels(True),
        ),
        Method("CKASuppression()", lambda width: ntl.CKASuppression(), _on_frozen_features(False)),
        Method(
            "CKASuppression(conditional=True)",
            lambda width: ntl.CKASuppression(conditional=True),
            _on_frozen_features(True),
        ),
        Method(
            "AdversarialSuppression(10, dim=4w)",
            lambda width: ntl.AdversarialSuppression(NUM_CLASSES, dim=4 * width),
            _on_labels(False),
        ),
        Method(
            "AdversarialSuppression(..., conditional=True)",
            lambda width: ntl.AdversarialSuppression(NUM_CLASSES, dim=4 * width, conditional=True),
            _on_labels(True),
        ),
        Method("Purify(10, dim=4w)", lambda width: ntl.Purify(NUM_CLASSES, dim=4 * width), _purify(False)),
        Method(
            "Purify(..., conditional=True)",
            lambda width: ntl.Purify(NUM_CLASSES, dim=4 * width, conditional=True),
            _purify(True),
        ),
        Method("DistributionMatchingLoss(R)", lambda width: ntl.DistributionMatchingLoss(relatedness()), _matching),
        Method("MultiTaskLoss(R)", lambda width: ntl.MultiTaskLoss(relatedness()), _multi_task),
    ]


def time_steps(step: Callable[[], object], *, warmup: int, repeats: int, device: torch.device) -> float:
    """Median milliseconds of one call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(method: Method, args: argparse.Namespace, batch: Batch, compiled: bool) -> float:
    """Median ms of one optimizer step with this method, eager or compiled."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    net, frozen = ResNet(args.width).to(device), ResNet(args.width).to(device)
    frozen.eval().requires_grad_(False)
    module = method.build(args.width)
    if module is not None:
        module = module.to(device)
    parameters = [*net.parameters(), *(module.parameters() if module is not None else [])]
    optimizer = torch.optim.SGD(parameters, lr=0.01, momentum=0.9)
    loss_fn: Loss = method.loss
    if compiled:
        torch._dynamo.reset()
        loss_fn = torch.compile(method.loss, backend=args.backend, mode=args.mode)  # type: ignore[assignment]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net, module, frozen, batch)
        loss.backward()
        optimizer.step()

    return time_steps(step, warmup=args.warmup, repeats=args.repeats, device=device)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="channels of the first stage (then 2w, 4w)")
    parser.add_argument("--size", type=int, default=32, help="input height and width")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compiles, caches, the dispatcher)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="*", default=None, help="keep methods whose name contains one of these")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)")
    parser.add_argument("--mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    batch = make_batch(args.batch, args.size, device)
    plain, *others = methods()  # the plain step always runs first: every ratio is to it
    chosen = [plain, *(m for m in others if args.methods is None or any(s in m.name for s in args.methods))]
    modes = ["eager"] if args.no_compile else ["eager", "compile"]
    rows: list[tuple[str, dict[str, float]]] = []
    skipped: list[str] = []
    for method in chosen:
        try:
            method.build(args.width)
        except AttributeError as error:  # a module this version of the library does not have
            skipped.append(f"{method.name}: {error}")
            continue
        times = {mode: measure(method, args, batch, compiled=mode == "compile") for mode in modes}
        rows.append((method.name, times))
        print(f"{method.name}: " + ", ".join(f"{mode} {ms:.2f} ms" for mode, ms in times.items()), flush=True)

    base = rows[0][1]
    header = "| method | " + " | ".join(f"{mode} ms | {mode} × plain" for mode in modes) + " |"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [
        f"Batch {args.batch}, input 3×{args.size}×{args.size}, width {args.width}; device {device} ({machine}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} steps after "
        f"{args.warmup}; compile: backend {args.backend}, mode {args.mode}.",
        "",
        header,
        "|---|" + "---|---|" * len(modes),
    ]
    for name, times in rows:
        cells = " | ".join(f"{times[mode]:.2f} | {times[mode] / base[mode]:.2f}×" for mode in modes)
        lines.append(f"| {name} | {cells} |")
    if skipped:
        lines += ["", "Skipped: " + "; ".join(skipped)]
    table = "\n".join(lines)
    print()
    print(table)
    return table


if __name__ == "__main__":
    main()
