"""Benchmark runner: op families × providers × modes, appended to a CSV, summarised as markdown.

Providers: `eager` (the functional path), `compile` (`torch.compile` of the functional path), `fused` (the
Triton kernel, where one exists and the device is CUDA). Modes: `forward`, `backward` (the backward pass
alone, from a kept graph), `full` (forward + backward). Times are median and p20/p80 over `--repeats` runs
after warm-up; peak memory is the CUDA allocator's peak above the inputs, or, on CPU, the growth of the
process's peak resident set measured in a fresh subprocess per configuration (`--cpu-memory`).

    python benchmarks/run.py [--families channel_cosine gram_batch ...] [--dtypes float32 bfloat16]
                             [--device cpu|cuda] [--csv benchmarks/results.csv] [--markdown summary.md]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

import negtransfer_losses.functional as ntf
from negtransfer_losses import ops


@dataclass(frozen=True)
class Family:
    """One op at one shape: builds its inputs and its loss for a provider."""

    name: str
    shape: str
    make_inputs: Callable[[torch.device, torch.dtype], tuple[Tensor, ...]]
    loss: Callable[..., Tensor]
    fused: Callable[..., Tensor] | None = None


def _maps(b: int, c: int, h: int, w: int) -> Callable[[torch.device, torch.dtype], tuple[Tensor, ...]]:
    def make(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        g = torch.Generator(device="cpu").manual_seed(0)
        s = torch.randn(b, c, h, w, generator=g).relu().to(device, dtype).requires_grad_(True)
        r = torch.randn(b, c, h, w, generator=g).relu().to(device, dtype)
        return s, r

    return make


def _heads(n: int, k: int, m: int) -> Callable[[torch.device, torch.dtype], tuple[Tensor, ...]]:
    def make(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, ...]:
        g = torch.Generator(device="cpu").manual_seed(0)
        za = torch.randn(n, k, generator=g).to(device, dtype).requires_grad_(True)
        zb = torch.randn(n, m, generator=g).to(device, dtype).requires_grad_(True)
        return za, zb, torch.rand(k, m, generator=g).to(device)

    return make


FAMILIES = {
    "channel_cosine": Family(
        "channel_cosine",
        "B=64 C=256 28×28, mean, cos²",
        _maps(64, 256, 28, 28),
        lambda s, r: ntf.anti_transfer(s, r, "mean", "cos_squared", nan_policy="propagate", backend="torch"),
        lambda s, r: ops.aggregated_row_cosines(s, r, "mean", backend="triton").abs().mean().square(),
    ),
    "gram_batch": Family(
        "gram_batch",
        "B=30 C=512 8×8, gram batch, cos²",
        _maps(30, 512, 8, 8),
        lambda s, r: ntf.anti_transfer(s, r, "gram", "cos_squared", "batch", nan_policy="propagate", backend="torch"),
        lambda s, r: ops.gram_row_cosines(s, r, "batch", backend="triton").abs().mean().square(),
    ),
    "gram_sample": Family(
        "gram_sample",
        "B=64 C=256 28×28, gram sample, cos²",
        _maps(64, 256, 28, 28),
        lambda s, r: ntf.anti_transfer(s, r, "gram", "cos_squared", "sample", nan_policy="propagate", backend="torch"),
        lambda s, r: ops.gram_row_cosines(s, r, "sample", backend="triton").abs().mean().square(),
    ),
    "distribution_matching": Family(
        "distribution_matching",
        "N=256 K=7 M=17, both directions, KL",
        _heads(256, 7, 17),
        lambda za, zb, r: sum(ntf.distribution_matching(za, zb, r).values()),
        lambda za, zb, r: sum(ops.distribution_matching(za, zb, r, backend="triton").values()),
    ),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _percentiles(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)


def provider_function(family: Family, provider: str) -> Callable[..., Tensor]:
    """The loss as run by `provider`; a compiled function is built once and reused across modes."""
    if provider == "compile":
        torch._dynamo.reset()
        return torch.compile(family.loss)  # type: ignore[return-value]
    fn = {"eager": family.loss, "fused": family.fused}[provider]
    assert fn is not None
    return fn


def measure(
    family: Family, fn: Callable[..., Tensor], mode: str, device: torch.device, dtype: torch.dtype, repeats: int
) -> dict:
    inputs = family.make_inputs(device, dtype)
    leaves = [t for t in inputs if t.requires_grad]

    def run_once() -> float:
        for t in leaves:
            t.grad = None
        _sync(device)
        if mode == "backward":
            loss = fn(*inputs)
            _sync(device)
            start = time.perf_counter()
            loss.backward()
        else:
            start = time.perf_counter()
            loss = fn(*inputs)
            if mode == "full":
                loss.backward()
        _sync(device)
        return time.perf_counter() - start

    for _ in range(3):
        run_once()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = [run_once() for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else float("nan")
    median, p20, p80 = _percentiles(times)
    return {"median_ms": 1e3 * median, "p20_ms": 1e3 * p20, "p80_ms": 1e3 * p80, "peak_mib": peak / 2**20}


def cpu_peak_mib(family: str, provider: str, mode: str, dtype: str) -> float:
    """Peak resident-set growth of one configuration, in a fresh process."""
    code = (
        "import resource, json, sys; sys.path.insert(0, 'benchmarks'); import run, torch;"
        f"f = run.FAMILIES['{family}']; before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
        f"fn = run.provider_function(f, '{provider}');"
        f"run.measure(f, fn, '{mode}', torch.device('cpu'), getattr(torch, '{dtype}'), 3);"
        "print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--providers", nargs="+", default=["eager", "compile", "fused"])
    parser.add_argument("--modes", nargs="+", default=["forward", "backward", "full"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cpu-memory", action="store_true", help="measure CPU peak memory (a subprocess each)")
    parser.add_argument("--csv", type=Path, default=Path("benchmarks/results.csv"))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    rows = []
    for name in args.families:
        family = FAMILIES[name]
        for dtype_name in args.dtypes:
            for provider in args.providers:
                if provider == "fused" and (family.fused is None or device.type != "cuda"):
                    continue
                fn = provider_function(family, provider)
                for mode in args.modes:
                    result = measure(family, fn, mode, device, getattr(torch, dtype_name), args.repeats)
                    if device.type == "cpu" and args.cpu_memory:
                        result["peak_mib"] = cpu_peak_mib(name, provider, mode, dtype_name)
                    row = {
                        "family": name, "shape": family.shape, "dtype": dtype_name, "provider": provider, "mode": mode,
                        **{k: round(v, 3) for k, v in result.items()},
                        "device": device_name, "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "triton": triton_version,
                        "date": time.strftime("%Y-%m-%d"),
                    }  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row))
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    new_file = not args.csv.exists()
    with args.csv.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    table = ["| op | dtype | provider | mode | median ms (p20–p80) | peak MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['mode']} | {r['median_ms']:.2f} "
            f"({r['p20_ms']:.2f}–{r['p80_ms']:.2f}) | {r['peak_mib']:.0f} |"
        )
    summary = f"device: {device_name}, torch {torch.__version__}, triton {triton_version}\n\n" + "\n".join(table)
    print(summary)
    if args.markdown:
        args.markdown.write_text(summary + "\n")


if __name__ == "__main__":
    main()
