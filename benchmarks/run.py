"""Benchmark runner: op families × providers × modes, appended to a CSV, summarised as markdown.

Providers: `eager` (the functional path), `compile` (`torch.compile` of the functional path), `fused` (the
Triton kernel, where one exists and the device is CUDA), `auto` (what `backend="auto"` picks: checks the
dispatch rule of docs/kernels.md against the other three). Modes: `forward`, `backward` (the backward pass
alone, from a kept graph), `full` (forward + backward). Times are median and p20/p80 over `--repeats` runs
after warm-up; peak memory is the CUDA allocator's peak above the inputs, or, on CPU, the growth of the
process's peak resident set measured in a fresh subprocess per configuration (`--cpu-memory`).

    python benchmarks/run.py [--families channel_cosine gram_batch ...] [--dtypes float32 bfloat16]
                             [--device cpu|cuda] [--csv benchmarks/results.csv] [--markdown summary.md]

On a GPU, the whole run of docs/benchmarks.md is one command (it also measures the device-to-device copy
bandwidth, the memory roofline, and reports each fused row against the faster of eager and compile and as a
share of that bandwidth, counting the bytes the op must move at least):

    python benchmarks/run.py --device cuda --csv benchmarks/results/gpu.csv --markdown benchmarks/results/gpu.md
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

from negtransfer_losses import ops


@dataclass(frozen=True)
class Family:
    """One op at one shape: builds its inputs and its loss for a provider."""

    name: str
    shape: str
    make_inputs: Callable[[torch.device, torch.dtype], tuple[Tensor, ...]]
    loss: Callable[..., Tensor]
    fused: Callable[..., Tensor] | None = None
    auto: Callable[..., Tensor] | None = None
    min_bytes: Callable[[int], int] | None = None  # least bytes a forward must move, given the element size


def _map_bytes(b: int, c: int, h: int, w: int) -> Callable[[int], int]:
    return lambda size: 2 * b * c * h * w * size  # both maps read once; the outputs are negligible


def _head_bytes(n: int, k: int, m: int) -> Callable[[int], int]:
    return lambda size: n * (k + m) * size + 8 * n  # both heads read once, two float32 terms per sample written


def _at(aggregation: str, scope: str | None, backend: str) -> Callable[..., Tensor]:
    return lambda s, r: ops.anti_transfer(
        s,
        r,
        aggregation=aggregation,
        distance="cos_squared",
        gram_scope=scope,
        nan_policy="propagate",
        backend=backend,  # type: ignore[arg-type]
    )


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


def _family(name: str, shape: str, dims: tuple[int, int, int, int], aggregation: str, scope: str | None) -> Family:
    def fused(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if aggregation == "gram":
            cosines = ops.gram_row_cosines(s, r, gram_scope=scope, backend="triton")  # type: ignore[arg-type]
        else:
            cosines = ops.aggregated_row_cosines(s, r, aggregation=aggregation, backend="triton")  # type: ignore[arg-type]
        return cosines.abs().mean().square()

    return Family(name, shape, _maps(*dims), _at(aggregation, scope, "torch"), fused, _at(aggregation, scope, "auto"),
                  _map_bytes(*dims))  # fmt: skip


def _matching(name: str, n: int, k: int, m: int) -> Family:
    return Family(
        name,
        f"N={n} K={k} M={m}, both directions, KL",
        _heads(n, k, m),
        lambda za, zb, r: sum(ops.distribution_matching(za, zb, r, backend="torch").values()),
        lambda za, zb, r: sum(ops.distribution_matching(za, zb, r, backend="triton").values()),
        lambda za, zb, r: sum(ops.distribution_matching(za, zb, r, backend="auto").values()),
        _head_bytes(n, k, m),
    )


FAMILIES = {
    "channel_cosine": _family("channel_cosine", "B=64 C=256 28×28, mean, cos²", (64, 256, 28, 28), "mean", None),
    "channel_cosine_max": _family("channel_cosine_max", "B=64 C=256 28×28, max, cos²", (64, 256, 28, 28), "max", None),
    "gram_batch": _family("gram_batch", "B=30 C=512 8×8, gram batch, cos²", (30, 512, 8, 8), "gram", "batch"),
    "gram_batch_wide": _family(
        "gram_batch_wide", "B=64 C=256 28×28, gram batch, cos²", (64, 256, 28, 28), "gram", "batch"
    ),
    "gram_sample": _family("gram_sample", "B=64 C=256 28×28, gram sample, cos²", (64, 256, 28, 28), "gram", "sample"),
    "gram_sample_small_maps": _family(
        "gram_sample_small_maps", "B=64 C=512 4×4, gram sample, cos²", (64, 512, 4, 4), "gram", "sample"
    ),
    "distribution_matching": _matching("distribution_matching", 256, 7, 17),
    "distribution_matching_large": _matching("distribution_matching_large", 65_536, 7, 17),
}


def copy_bandwidth_gbs(device: torch.device, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer, GB/s: the memory roofline."""
    if device.type != "cuda":
        return float("nan")
    source = torch.empty(1 << 28, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    return 2 * source.numel() * source.element_size() / seconds / 1e9


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
    fn = {"eager": family.loss, "fused": family.fused, "auto": family.auto}[provider]
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
    parser.add_argument("--providers", nargs="+", default=["eager", "compile", "fused", "auto"])
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
                if provider in ("fused", "auto") and (family.fused is None or device.type != "cuda"):
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
    bandwidth = copy_bandwidth_gbs(device)
    best = {}  # (family, dtype, mode) -> the faster of eager and compile
    for r in rows:
        if r["provider"] in ("eager", "compile"):
            key = (r["family"], r["dtype"], r["mode"])
            best[key] = min(best.get(key, float("inf")), r["median_ms"])
    table = [
        "| op | dtype | provider | mode | median ms (p20–p80) | peak MiB | speed-up vs best of eager/compile "
        "| share of copy bandwidth (forward) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup, share = "", ""
        if r["provider"] in ("fused", "auto") and (r["family"], r["dtype"], r["mode"]) in best:
            speedup = f"{best[(r['family'], r['dtype'], r['mode'])] / r['median_ms']:.2f}×"
        family = FAMILIES[r["family"]]
        if r["provider"] == "fused" and r["mode"] == "forward" and family.min_bytes and bandwidth == bandwidth:
            moved = family.min_bytes(torch.empty((), dtype=getattr(torch, r["dtype"])).element_size())
            share = f"{100 * moved / (r['median_ms'] / 1e3) / 1e9 / bandwidth:.0f} %"
        table.append(
            f"| {r['shape']} | {r['dtype']} | {r['provider']} | {r['mode']} | {r['median_ms']:.2f} "
            f"({r['p20_ms']:.2f}–{r['p80_ms']:.2f}) | {r['peak_mib']:.0f} | {speedup} | {share} |"
        )
    summary = (
        f"device: {device_name}, torch {torch.__version__}, triton {triton_version}, "
        f"copy bandwidth {bandwidth:.0f} GB/s\n\n" + "\n".join(table)
    )
    print(summary)
    if args.markdown:
        args.markdown.write_text(summary + "\n")


if __name__ == "__main__":
    main()
