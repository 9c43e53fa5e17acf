"""Time saved by `FrozenReference(stop_early=True)` on a network tapped halfway.

A 16-block CNN; the reference layer is the output of block 8. Compares the whole forward pass under
`torch.no_grad()` with a tap (what a user would do without early stop) against `FrozenReference`.

    python benchmarks/frozen_reference_early_stop.py [--blocks 16] [--tap 8] [--batch 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import negtransfer_losses as ntl


def make_cnn(blocks: int, width: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    layers += [
        nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()) for _ in range(blocks)
    ]
    return nn.Sequential(*layers)


def time_call(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--tap", type=int, default=8, help="index of the tapped block (1-based)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = make_cnn(args.blocks, args.width).to(device).eval()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    layer = str(args.tap)

    tap = ntl.FeatureTap(model, layer, detach=True)

    def full_pass() -> object:
        with torch.no_grad():
            model(x)
        return tap.pop()

    full = time_call(full_pass, args.repeats, device)
    tap.remove()
    frozen = ntl.FrozenReference(model, layer)
    early = time_call(lambda: frozen(x), args.repeats, device)
    torch.testing.assert_close(frozen(x)[layer], full_pass_reference(model, x, args.tap))

    full_ms, early_ms = statistics.median(full) * 1e3, statistics.median(early) * 1e3
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(
        f"model: {args.blocks} conv blocks, width {args.width}, input {args.batch}x3x{args.size}x{args.size}; "
        f"tap after block {args.tap}"
    )
    print("| forward of the reference network | median ms |")
    print("|---|---|")
    print(f"| full pass + tap | {full_ms:.1f} |")
    print(f"| FrozenReference(stop_early=True) | {early_ms:.1f} |")
    print(f"time saved: {100 * (1 - early_ms / full_ms):.0f} %")


def full_pass_reference(model: nn.Sequential, x: torch.Tensor, tap: int) -> torch.Tensor:
    with torch.no_grad():
        return model[: tap + 1](x)


if __name__ == "__main__":
    main()
