"""Peak memory and time of the Gram anti-transfer loss (cos_squared, forward + backward), eager PyTorch.

Each configuration runs in a fresh subprocess; on CPU the figure is the growth of the peak resident set
(ru_maxrss) over the process's resident set just before the call, on CUDA `torch.cuda.max_memory_allocated`
over the allocation before the call. Inputs are not counted.

    python benchmarks/anti_transfer_memory.py [--materialized] [--device cpu] [--configs 30,512,8,8:batch ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(
    batch: int, channels: int, height: int, width: int, scope: str, device: str, materialized: bool
) -> dict[str, float]:
    import torch

    import negtransfer_losses.functional as ntf

    def loss(s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        if materialized:  # the definition: both Gram matrices in memory
            return ntf.cosine_rows(ntf.gram(s, gram_scope=scope), ntf.gram(r, gram_scope=scope)).abs().mean().square()
        return ntf.anti_transfer(s, r, aggregation="gram", distance="cos_squared", gram_scope=scope)

    s = torch.randn(batch, channels, height, width, device=device, requires_grad=True)
    r = torch.randn(batch, channels, height, width, device=device)
    loss(s[:2, :2], r[:2, :2]).backward()  # warm-up, tiny
    s.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_kib() * 1024
    start = time.perf_counter()
    loss(s, r).backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"seconds": time.perf_counter() - start, "peak_bytes": float(peak)}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", nargs="+", default=["30,512,8,8:batch", "64,256,28,28:sample"])
    parser.add_argument("--materialized", action="store_true", help="form both Gram matrices (the definition)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        dims, scope = args.child.split(":")
        print(json.dumps(measure(*map(int, dims.split(",")), scope, args.device, args.materialized)))
        return
    path = "materialized Gram matrices" if args.materialized else "anti_transfer (N×N identity when cheaper)"
    print(f"path: {path}; device: {args.device}")
    print("| B | C | H×W | gram_scope | Gram size, one network | forward+backward s | peak extra memory |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs:
        out = subprocess.run(
            [sys.executable, __file__, "--device", args.device, "--child", config]
            + (["--materialized"] if args.materialized else []),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        result = json.loads(out)
        dims, scope = config.split(":")
        b, c, h, w = map(int, dims.split(","))
        gram_bytes = (b * c) ** 2 * 4 if scope == "batch" else b * c * c * 4
        print(
            f"| {b} | {c} | {h}×{w} | {scope} | {gram_bytes / 2**30:.2f} GiB | {result['seconds']:.2f} | "
            f"{result['peak_bytes'] / 2**30:.2f} GiB |"
        )


if __name__ == "__main__":
    main()
