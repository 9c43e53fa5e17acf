"""What the studies share: the suppression module of a method, built by name, and writing a study's results (its
record as JSON, its table as markdown, its plot as PNG, side by side)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import negtransfer_losses as ntl

# what each suppression module is given besides the features: the factor's labels, or a frozen network's features
# on the same batch. Every one is called alike, `module(features, signal, task_labels=y)`: an unconditional
# module leaves the task labels unused, so a study's loop has no other per-method branch.
SIGNALS: dict[str, Literal["labels", "features"]] = {"adversarial": "labels", "hsic": "labels", "cka": "features"}


def suppression_module(method: str, *, num_irrelevant: int, dim: int, **options: Any) -> ntl.SuppressionLoss:
    """The library's suppression module of `method` ("adversarial", "hsic" or "cka"), by `ntl.make_suppression`.

    Only the sizes differ by method: HSIC and the adversary count the factor's `num_irrelevant` values, the
    adversary's default head takes `dim` features, CKA needs neither. `options` (weight, conditional, ...) go to
    the class as given."""
    if method not in SIGNALS:
        raise ValueError(f"unknown suppression method {method!r}: one of {sorted(SIGNALS)}")
    sizes: dict[str, dict[str, int]] = {
        "adversarial": {"num_irrelevant": num_irrelevant, "dim": dim},
        "hsic": {"num_irrelevant": num_irrelevant},
        "cka": {},
    }
    name = cast(Literal["adversarial", "hsic", "cka"], method)
    return ntl.make_suppression(name, **sizes[method], **options)


def study_record(script: str, argv: list[str] | None, args: argparse.Namespace, **results: Any) -> dict[str, Any]:
    """A study's JSON record: the command line that reproduces it (`argv`, or the process's own when None),
    every option it ran with, then `results` (its grid, summary rows, raw runs)."""
    given = list(sys.argv[1:] if argv is None else argv)
    options = {name: str(v) if isinstance(v, Path) else v for name, v in vars(args).items() if name != "argv"}
    return {"command": shlex.join(["python", f"studies/{script}", *given]), "options": options, **results}


Record = dict[str, Any]
SETTINGS = {"default": "at the library's default weight", "tuned": "weight chosen on validation"}


def runs_at(
    by_weight: dict[float, list[Record]], validation: Callable[[list[Record]], float], weight: float | None
) -> list[Record]:
    """One configuration's runs (one per seed, sorted by seed) at `weight`, or, when `weight` is None, at the
    weight whose runs score best by `validation` (a baseline, run at one weight only, gives that one)."""
    if weight is None:
        weight = max(by_weight, key=lambda w: validation(by_weight[w]))
    elif weight not in by_weight:
        raise KeyError(f"no runs at weight {weight:g}; the grid held {sorted(by_weight)}")
    return sorted(by_weight[weight], key=lambda r: int(r["seed"]))


def write_study(
    out: Path, stem: str, title: str, table: str, record: dict[str, Any], plot: Callable[[Path], None]
) -> None:
    """Print `title` and the markdown `table`, then write `out/{stem}.json` (`record`), `out/{stem}.md` and
    `out/{stem}.png` (drawn by `plot`) and say where they went."""
    print(f"\n{title}")
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
    plot(out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md and .png")
