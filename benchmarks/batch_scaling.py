"""Time and peak memory of the suppression losses as the batch grows: forward + backward, eager PyTorch.

Each (loss, batch) runs in a fresh subprocess. Features are `(B, 128)` float32 random, 10 irrelevant classes
(`u`), 10 task classes (`y`), and for CKA a frozen network's `(B, 128)` features (random); the losses are
`HSICSuppression(10)`, `HSICSuppression(10, conditional=True)`, `HSICSuppression(10, conditional=True,
normalized=True)`, `CKASuppression()` and `CKASuppression(conditional=True)` at their defaults (linear kernels),
and `HSICSuppression(10, kernel="rbf")` (the RBF kernel matrices a tile of rows at a time; the median
bandwidth), also with `sigma=16.0` given (about the median distance of these features: no median to compute).
The time is the median of the repeats after one warm-up call; the peak memory is the growth of the peak
resident set (`ru_maxrss`) over the resident set just before the first call (inputs not counted), on CUDA
`torch.cuda.max_memory_allocated` over the allocation before it. glibc's allocator keeps freed blocks of up to
32 MiB in the process, so the resident set of a loop over tiles can exceed what is ever live at once; with
`MALLOC_MMAP_THRESHOLD_=65536` in the environment large blocks go back to the system when freed and the peak is
close to the live peak. A batch is skipped when the previous one, scaled by `(B / B_prev)²`, would take more than
`--max-seconds` per call or more than `--max-gib` of memory (the pairwise form grows with `B²`).

    python benchmarks/batch_scaling.py [--label after] [--batches 256 1024 ...] [--cases hsic cka ...]
                                       [--device cpu] [--csv benchmarks/results/batch_scaling.csv]

The library measured is whatever `import negtransfer_losses` finds: to measure another version, put its checkout
first on `PYTHONPATH` (e.g. `git worktree add /tmp/before <commit>` and `PYTHONPATH=/tmp/before`). To compare
versions under the same load, `--versions before=/tmp/before after=.` runs each (loss, batch) for every version
in turn, each child with that checkout first on `PYTHONPATH`.

    python benchmarks/batch_scaling.py --precision

prints the float32 error of the feature-space and pairwise forms against float64, for features with a growing
mean (both forms forced in turn; needs a version that has both).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

CASES = (
    "hsic",
    "hsic-conditional",
    "hsic-normalized-conditional",
    "cka",
    "cka-conditional",
    "hsic-rbf",
    "hsic-rbf-sigma",
)
BATCHES = (256, 512, 1024, 2048, 4096, 8192, 16384)
WIDTH = 128
CLASSES = 10


def measure(case: str, batch: int, device: str, repeats: int, threads: int) -> dict[str, float]:
    """One (loss, batch) in this process: the median forward + backward time and the peak extra memory."""
    import torch

    import negtransfer_losses as ntl

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(batch, WIDTH, generator=g).to(device).requires_grad_(True)
    r = torch.randn(batch, WIDTH, generator=g).to(device)
    u = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
    losses: dict[str, Callable[[], torch.Tensor]] = {
        "hsic": lambda: ntl.HSICSuppression(CLASSES)(z, u),
        "hsic-conditional": lambda: ntl.HSICSuppression(CLASSES, conditional=True)(z, u, task_labels=y),
        "hsic-normalized-conditional": lambda: ntl.HSICSuppression(CLASSES, conditional=True, normalized=True)(
            z, u, task_labels=y
        ),
        "hsic-rbf": lambda: ntl.HSICSuppression(CLASSES, kernel="rbf")(z, u),
        "hsic-rbf-sigma": lambda: ntl.HSICSuppression(CLASSES, kernel="rbf", sigma=16.0)(z, u),
        "cka": lambda: ntl.CKASuppression()(z, r),
        "cka-conditional": lambda: ntl.CKASuppression(conditional=True)(z, r, task_labels=y),
    }
    loss = losses[case]

    def step() -> float:
        z.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = float(torch.cuda.memory_allocated())
    else:
        before = _rss_kib() * 1024.0
    first = step()  # warm-up (and the only call when it is slow)
    count = repeats if first < 1.0 else max(1, min(repeats, 3))
    times = [step() for _ in range(count)] if first < 30.0 else [first]
    if device == "cuda":
        peak = float(torch.cuda.max_memory_allocated()) - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0 - before
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "repeats": float(len(times)),
        "peak_mib": max(peak, 0.0) / 2**20,
    }


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def _load() -> float:
    return os.getloadavg()[0]


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    versions: dict[str, str | None] = {args.label: None}
    if args.versions:
        versions = dict(item.split("=", 1) for item in args.versions)  # type: ignore[misc]
    rows: list[dict[str, object]] = []
    for case in args.cases:
        previous: dict[str, tuple[int, float, float]] = {}
        stopped: set[str] = set()
        for batch in args.batches:
            for label, path in versions.items():
                base = {"label": label, "case": case, "batch": batch}
                last = previous.get(label)
                if label in stopped:
                    continue
                if last is not None:
                    factor = (batch / last[0]) ** 2
                    if last[1] * factor / 1e3 > args.max_seconds or last[2] * factor / 1024 > args.max_gib:
                        print(
                            f"{label:7s} {case:18s} B={batch:6d}  skipped (previous batch × (B/B_prev)²: over limits)"
                        )
                        rows.append({**base, "skipped": 1})
                        continue
                load = _load()
                command = [sys.executable, __file__, "--child", case, str(batch), args.device, str(args.repeats)]
                command.append(str(args.threads))
                env = dict(os.environ)
                if path is not None:
                    env["PYTHONPATH"] = os.pathsep.join([str(Path(path).resolve()), env.get("PYTHONPATH", "")])
                done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
                if done.returncode != 0:
                    print(f"{label:7s} {case:18s} B={batch:6d}  failed: {done.stderr.strip().splitlines()[-1:]}")
                    rows.append({**base, "failed": 1})
                    stopped.add(label)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({**base, **result, "load": load})
                print(
                    f"{label:7s} {case:18s} B={batch:6d}  {result['median_ms']:10.2f} ms (min {result['min_ms']:.2f}, "
                    f"{int(result['repeats'])} runs)  peak +{result['peak_mib']:9.1f} MiB  load {load:.2f}",
                    flush=True,
                )
                previous[label] = (batch, float(result["median_ms"]), float(result["peak_mib"]))
    return rows


def write_csv(rows: list[dict[str, object]], path: Path, args: argparse.Namespace) -> None:
    import torch

    import negtransfer_losses

    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["label", "case", "batch", "median_ms", "min_ms", "repeats", "peak_mib", "load", "skipped", "failed"]
    extra = {
        "device": args.device,
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "library": " ".join(args.versions) if args.versions else str(Path(negtransfer_losses.__file__).parent.parent),
    }
    new_file = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*fields, *extra])
        if new_file:
            writer.writeheader()
        for row in rows:
            writer.writerow({**{k: row.get(k, "") for k in fields}, **extra})


def precision() -> None:
    """float32 against float64, feature-space and pairwise forms forced in turn, features with a growing mean."""
    from contextlib import ExitStack
    from unittest import mock

    import torch

    import negtransfer_losses.functional as ntf
    from negtransfer_losses.functional import similarity, suppression

    def forced(form: str) -> ExitStack:
        stack = ExitStack()
        for module in (similarity, suppression):
            rule = mock.patch.object(module, "feature_space_cheaper", lambda *a, **k: form == "features")
            stack.enter_context(rule)
        return stack

    g = torch.Generator().manual_seed(0)
    n, d = 4096, 128
    u = torch.randint(0, CLASSES, (n,), generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    noise = torch.randn(n, d, generator=g, dtype=torch.float64)
    signal = 0.2 * torch.randn(CLASSES, d, generator=g, dtype=torch.float64)[u]
    r = torch.randn(n, d, generator=g, dtype=torch.float64) + noise[:, :1]
    cases: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "HSIC (unbiased)": lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=CLASSES),
        "HSIC (biased)": lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=CLASSES, unbiased=False),
        "HSIC normalized": lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=CLASSES, normalized=True),
        "conditional HSIC": lambda f: ntf.irrelevant_hsic(f, u, num_irrelevant=CLASSES, task_labels=y),
        "conditional HSIC normalized": lambda f: ntf.irrelevant_hsic(
            f, u, num_irrelevant=CLASSES, normalized=True, task_labels=y
        ),
        "CKA": lambda f: ntf.irrelevant_cka(f, r.to(f.dtype)),
        "CKA (unbiased)": lambda f: ntf.irrelevant_cka(f, r.to(f.dtype), unbiased=True),
        "conditional CKA": lambda f: ntf.irrelevant_cka(f, r.to(f.dtype), task_labels=y),
    }
    both = hasattr(similarity, "feature_space_cheaper")  # a version with both forms: force each in turn
    print(f"float32 relative error against float64, n={n}, d={d}, features N(0, 1) + 0.2·signal(u) + mean")
    print("| measure | mean | as chosen | feature space | pairwise |" if both else "| measure | mean | as chosen |")
    print("|---|---|---|---|---|" if both else "|---|---|---|")
    for name, fn in cases.items():
        for shift in (0.0, 10.0, 100.0, 1000.0):
            z = noise + signal + shift
            exact = fn(z).item()  # float64, as chosen

            def error(
                fn: Callable[[torch.Tensor], torch.Tensor] = fn, z: torch.Tensor = z, exact: float = exact
            ) -> str:
                single = fn(z.float()).double().item()
                if exact == 0.0:  # the float64 value itself was zeroed (a rounding test took it for constant)
                    return f"float64 value 0, float32 {single:.2g}"
                return f"{abs(single - exact) / abs(exact):.1e}"

            errors = [error()]
            for form in ("features", "pairwise") if both else ():
                with forced(form):
                    errors.append(error())
            print(f"| {name} | {shift:g} | {' | '.join(errors)} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="after", help="the name of the version measured, in the CSV")
    parser.add_argument("--versions", nargs="+", metavar="LABEL=PATH", help="compare checkouts, interleaved")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--max-gib", type=float, default=14.0)
    parser.add_argument("--csv", type=Path, default=None, help="append the rows to this CSV")
    parser.add_argument("--precision", action="store_true", help="the float32 error of both forms instead")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        case, batch, device, repeats, threads = args.child
        print(json.dumps(measure(case, int(batch), device, int(repeats), int(threads))))
        return
    if args.precision:
        precision()
        return
    rows = run(args)
    if args.csv is not None:
        write_csv(rows, args.csv, args)


if __name__ == "__main__":
    main()
