"""`TaskRelatedness`: validation, the prototype table, estimation from samples, serialization, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import negtransfer_losses as ntl
from negtransfer_losses.relatedness.__main__ import main

TRUE_MULTILABEL = torch.tensor(
    [[0.0, 0.0, 0.0], [0.9, 0.1, 0.5], [0.2, 0.8, 0.7], [0.6, 0.4, 0.05]], dtype=torch.float64
)
TRUE_MULTICLASS = torch.tensor(
    [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3], [0.05, 0.9, 0.05]], dtype=torch.float64
)


def sample(kind: str, n: int = 20_000, seed: int = 0, missing: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 4, (n,), generator=g)
    if kind == "multilabel":
        b = (torch.rand(n, 3, generator=g, dtype=torch.float64) < TRUE_MULTILABEL[a]).double()
        b[torch.rand(n, 3, generator=g) < missing] = math.nan
    else:
        b = torch.multinomial(TRUE_MULTICLASS[a], 1, generator=g)[:, 0]
        b[torch.rand(n, generator=g) < missing] = -100
    a[torch.rand(n, generator=g) < missing] = -100
    return a, b


@pytest.mark.parametrize(("kind", "truth"), [("multilabel", TRUE_MULTILABEL), ("multiclass", TRUE_MULTICLASS)])
def test_estimate_recovers_a_known_matrix_from_20000_samples(kind: str, truth: torch.Tensor) -> None:
    a, b = sample(kind)
    estimated = ntl.TaskRelatedness.estimate(a, b, num_a=4, num_b=3, kind=kind)  # type: ignore[arg-type]
    error = (estimated.matrix - truth).abs().max().item()
    assert error < 0.02, f"max abs error {error:.4f}"
    known = a != -100
    assert estimated.support is not None and int(estimated.support.sum()) <= int(known.sum())
    torch.testing.assert_close(estimated.prior, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02, rtol=0)


def test_estimate_laplace_smoothing_by_hand() -> None:
    a = torch.tensor([0, 0, 0, 1, -100])
    b = torch.tensor([[1.0, math.nan], [1.0, 0.0], [0.0, 0.0], [math.nan, math.nan], [1.0, 1.0]])
    r = ntl.TaskRelatedness.estimate(a, b, num_a=2, num_b=2, smoothing=1.0)
    expected = torch.tensor([[(2 + 1) / (3 + 2), (0 + 1) / (2 + 2)], [0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(r.matrix, expected)
    assert r.support is not None and r.support.tolist() == [3.0, 0.0]
    torch.testing.assert_close(r.prior, torch.tensor([4 / 6, 2 / 6], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"class 1 of task A has no co-annotated sample; use smoothing > 0"):
        ntl.TaskRelatedness.estimate(a, b, num_a=2, num_b=2, smoothing=0.0)


def test_from_table_with_names() -> None:
    table = {"happy": {"AU6": 0.5, "AU12": 1.0}, "neutral": {}}
    r = ntl.TaskRelatedness.from_table(
        table, num_a=2, num_b=3, class_names=["neutral", "happy"], attribute_names=["AU1", "AU6", "AU12"]
    )
    torch.testing.assert_close(r.matrix, torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.5, 1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unknown attribute 'AU99'"):
        ntl.TaskRelatedness.from_table({0: {"AU99": 1.0}}, num_a=2, num_b=3, attribute_names=["AU1", "AU6", "AU12"])
    with pytest.raises(ValueError, match=r"class index 5 is outside \[0, 2\)"):
        ntl.TaskRelatedness.from_table({5: {0: 1.0}}, num_a=2, num_b=3)
    with pytest.raises(
        ValueError, match=r"'table' weights are probabilities .* class 'happy', attribute 'AU6' has 1.5"
    ):
        ntl.TaskRelatedness.from_table(
            {"happy": {"AU6": 1.5}},
            num_a=2,
            num_b=3,
            class_names=["neutral", "happy"],
            attribute_names=["AU1", "AU6", "AU12"],
        )


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; found 1.5"):
        ntl.TaskRelatedness([[0.5, 1.5]])
    with pytest.raises(ValueError, match=r"row 1 sums to 0.9"):
        ntl.TaskRelatedness([[0.5, 0.5], [0.4, 0.5]], kind="multiclass")
    with pytest.raises(ValueError, match=r"\(K, M\) matrix"):
        ntl.TaskRelatedness([0.5, 0.5])
    with pytest.raises(ValueError, match=r"'prior' must have shape \(2,\)"):
        ntl.TaskRelatedness([[0.5], [0.2]], prior=[1.0])
    with pytest.raises(ValueError, match=r"'prior' must be non-negative and sum to 1"):
        ntl.TaskRelatedness([[0.5], [0.2]], prior=[0.5, 0.6])
    with pytest.raises(ValueError, match=r"'kind' must be one of"):
        ntl.TaskRelatedness([[0.5]], kind="ordinal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must be 0 or 1 where known"):
        ntl.TaskRelatedness.estimate(torch.tensor([0, 1]), torch.tensor([[0.5], [1.0]]), num_a=2, num_b=1)


def test_serialization_round_trip() -> None:
    a, b = sample("multilabel", n=500)
    r = ntl.TaskRelatedness.estimate(a, b, num_a=4, num_b=3)
    again = ntl.TaskRelatedness.from_dict(json.loads(json.dumps(r.to_dict())))
    torch.testing.assert_close(again.matrix, r.matrix)
    torch.testing.assert_close(again.prior, r.prior)
    assert again.kind == r.kind and again.support is not None


def test_cli_prints_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = ["expression,AU1,AU12", "happy,0,1", "happy,,1", "sad,1,0", "sad,1,", ",1,1", "neutral,0,0"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    out_json, out_png = tmp_path / "R.json", tmp_path / "R.png"
    code = main(
        [
            str(tmp_path / "labels.csv"),
            "--task-a",
            "expression",
            "--task-b",
            "AU1",
            "AU12",
            "--output",
            str(out_json),
            "--heatmap",
            str(out_png),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "task A 'expression' (3 classes)" in printed and "happy" in printed and "support" in printed
    saved = json.loads(out_json.read_text())
    assert saved["class_names"] == ["happy", "neutral", "sad"] and saved["attribute_names"] == ["AU1", "AU12"]
    r = ntl.TaskRelatedness.from_dict(saved)
    torch.testing.assert_close(r.matrix[0], torch.tensor([1 / 3, 3 / 4], dtype=torch.float64))
    assert out_png.stat().st_size > 1000


def test_cli_rejects_unknown_columns(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("a,b\n0,1\n")
    with pytest.raises(SystemExit, match=r"column\(s\) \['c'\] not in"):
        main([str(tmp_path / "labels.csv"), "--task-a", "a", "--task-b", "c"])


def test_options_are_keyword_only() -> None:
    import inspect

    for function, positional in (
        (ntl.TaskRelatedness, ["matrix"]),
        (ntl.TaskRelatedness.from_table, ["table"]),
        (ntl.TaskRelatedness.estimate, ["labels_a", "labels_b"]),
    ):
        parameters = inspect.signature(function).parameters.values()
        assert [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY] == positional
        assert all(section in (function.__doc__ or "") for section in ("Args:", "Raises:")), function
    with pytest.raises(TypeError, match=r"positional argument"):
        ntl.TaskRelatedness([[0.5]], "multiclass")  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"positional argument"):
        ntl.TaskRelatedness.estimate(torch.tensor([0]), torch.tensor([[1.0]]), 1, 1)  # type: ignore[misc]
