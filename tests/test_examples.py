"""Smoke runs of the examples (examples/) and of the studies' entry points (studies/): a few steps each, in a fresh
interpreter."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(path: str, *args: str) -> str:
    """Run `path` (relative to the repository: `examples/...` or `studies/...`) with `args`; its stdout."""
    result = subprocess.run(
        [sys.executable, str(ROOT / path), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_anti_transfer_hooks_example_runs() -> None:
    out = run_example("examples/anti_transfer_hooks.py", "--steps", "5", "--train-size", "64")
    assert "anti-transfer" in out and "student_norm" in out


def test_suppression_methods_example_swaps_every_method_in_one_loop() -> None:
    out = run_example("examples/suppression_methods.py", "--steps", "5")
    for method in ("hsic", "adversarial", "cka", "purify"):
        assert f"| {method} | unconditional |" in out and f"| {method} | conditional |" in out


def test_multitask_matching_example_runs() -> None:
    out = run_example("examples/multitask_matching.py", "--steps", "5")
    assert "plain multi-task" in out and "+ distribution matching" in out and "mtl/matching/loss" in out
    assert "+ matching, B→A gated:" in out


def test_multitask_matching_example_trains_with_torchjd() -> None:
    pytest.importorskip("torchjd")
    out = run_example("examples/multitask_matching.py", "--steps", "5", "--upgrad")
    assert "+ matching, B→A gated, UPGrad:" in out


def test_suppression_synthetic_study_runs() -> None:
    out = run_example("studies/suppression_synthetic.py", "--steps", "5", "--seeds", "1")
    assert "| purify |" in out and "| adversarial |" in out


def test_biased_digits_smoke(tmp_path: Path) -> None:
    out = run_example("studies/biased_digits.py", "--seeds", "1", "--epochs", "1", "--out", str(tmp_path))
    assert "| cka |" in out and "| anti_transfer |" in out
    assert (tmp_path / "biased_digits.json").exists() and (tmp_path / "biased_digits.png").exists()


def test_multitask_digits_smoke(tmp_path: Path) -> None:
    out = run_example("studies/multitask_digits.py", "--seeds", "1", "--steps", "5", "--out", str(tmp_path))
    assert "| + both |" in out and "negative transfer" in out
    assert (tmp_path / "multitask_digits.json").exists() and (tmp_path / "multitask_digits.png").exists()


def test_demo_entry_point_runs_both_studies(tmp_path: Path) -> None:
    # the full demo is `make demo`; here a smoke run of each study (one seed, one epoch / five steps) through the
    # same entry point, so the verdict does not depend on the machine's load
    out = run_example("studies/demo.py", "--out", str(tmp_path), "--quick")
    assert "Case study 1" in out and "Case study 2" in out and "make demo finished" in out


def test_lightning_example_runs_when_lightning_is_installed() -> None:
    pytest.importorskip("lightning", reason="optional: pip install lightning")
    out = run_example("examples/lightning_module.py", "--steps", "3")
    assert "trained 3 steps" in out


def test_bias_twin_example_runs() -> None:
    out = run_example("examples/bias_twin.py", "--epochs", "2", "--warmup-epochs", "1")
    assert "epoch 1: loss" in out and "(training)" in out and "epoch 2: loss" in out and "(frozen)" in out
    assert "agree with the colour" in out and "with the twin's groups" in out and "plain" in out
