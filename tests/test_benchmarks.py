"""The step-overhead benchmark runs end to end at a tiny size (eager only; timings are never asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "step_overhead.py"


def test_step_overhead_runs_every_method_and_prints_a_table() -> None:
    spec = importlib.util.spec_from_file_location("step_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_overhead"] = module
    spec.loader.exec_module(module)
    argv = ["--batch", "6", "--width", "4", "--size", "8", "--repeats", "1", "--warmup", "1", "--no-compile"]
    table = module.main([*argv, "--device", "cpu"])
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert rows[0].startswith("| plain step (cross-entropy) |") and rows[0].endswith("| 1.00× |")
    assert len(rows) == len(module.methods()), f"a method was skipped or failed:\n{table}"
