"""Smoke runs of the examples: a few steps each, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_anti_transfer_hooks_example_runs() -> None:
    out = run_example("anti_transfer_hooks.py", "--steps", "5", "--train-size", "64")
    assert "anti-transfer" in out and "student_norm" in out


def test_suppression_synthetic_example_runs() -> None:
    out = run_example("suppression_synthetic.py", "--steps", "5", "--seeds", "1")
    assert "| purify |" in out and "| adversarial |" in out


@pytest.mark.parametrize("args", [[]])
def test_demo_runs(args: list[str]) -> None:
    assert "negtransfer_losses demo" in run_example("demo.py", *args)
