"""The case studies' sweep flags: tiny runs end to end, and the weight selection on validation."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> ModuleType:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


def test_multitask_sweep_writes_one_row_per_ratio_and_config(tmp_path: Path) -> None:
    mt = example("multitask_digits")
    argv = ["--sweep", "--seeds", "2", "--steps", "3", "--ratios", "30/100", "100/30", "--grid", "0.5", "2"]
    mt.main([*argv, "--out", str(tmp_path)])
    record = json.loads((tmp_path / "multitask_sweep.json").read_text())
    rows = record["summary"]
    assert [(r["num_a"], r["config"]) for r in rows] == [(n, c) for n in (30, 100) for c in mt.SWEEP_CONFIGS]
    # every (ratio, config, weight, seed) trained once: baselines once, couplings once per weight
    assert len(record["runs"]) == 2 * 2 * (3 + 3 * 2)
    for row in rows:
        if row["config"] == "single A":
            assert row["digit_gain_mean"] == 0.0 and "attributes_mean" not in row
        if row["config"].startswith("+"):
            assert row["weight"] in (0.5, 2.0)
    assert (tmp_path / "multitask_sweep.png").stat().st_size > 0
    assert "| 30 / 100 | + matching |" in (tmp_path / "multitask_sweep.md").read_text()


def test_multitask_data_layout_keeps_evaluation_splits_apart() -> None:
    mt = example("multitask_digits")
    data = mt.make_data(0, list(mt.ATTRIBUTES), num_a=30, num_b=1000)
    assert data.x_train.shape[0] == 1030 and data.x_test.shape[0] == 400 and data.x_val.shape[0] == 300
    assert int((data.labels_a != -100).sum()) == 30 and int(data.labels_b[:, 0].isfinite().sum()) == 1000
    # no training image is a validation or test image
    train = {tuple(row) for row in data.x_train.tolist()}
    overlap = sum(tuple(row) in train for row in data.x_test.tolist() + data.x_val.tolist())
    duplicates = len(data.x_train) - len(train)  # 8×8 digits has a few identical images
    assert overlap <= duplicates + 5
    with pytest.raises(ValueError, match="num_a=1000 and num_b=1000"):
        mt.make_data(0, list(mt.ATTRIBUTES), num_a=1000, num_b=1000)


def test_multitask_sweep_selects_the_weight_on_validation_not_test() -> None:
    mt = example("multitask_digits")

    def run(config: str, weight: float, seed: int, val: float, test: float) -> dict[str, float | int | str]:
        return {
            "num_a": 30,
            "num_b": 1000,
            "config": config,
            "weight": weight,
            "seed": seed,
            "val_digit_accuracy": val,
            "val_attribute_accuracy": val,
            "test_digit_accuracy": test,
            "test_attribute_accuracy": test,
        }

    records = [run("single A", 0.0, s, 0.5, 0.5) for s in range(2)] + [
        run("single B", 0.0, s, 0.5, 0.5) for s in range(2)
    ]
    # weight 1: better on validation, worse on test; weight 3: the reverse
    records += [run("+ matching", 1.0, s, 0.9, 0.6) for s in range(2)]
    records += [run("+ matching", 3.0, s, 0.7, 0.8) for s in range(2)]
    rows = {r["config"]: r for r in mt.sweep_summary(records)}
    assert rows["+ matching"]["weight"] == 1.0
    assert rows["+ matching"]["digit_mean"] == pytest.approx(60.0)
    assert rows["+ matching"]["digit_gain_mean"] == pytest.approx(10.0)
    assert rows["+ matching"]["attributes_gain_mean"] == pytest.approx(10.0)
