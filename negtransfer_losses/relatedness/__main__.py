"""Estimate a task-relatedness matrix from a CSV of co-annotated labels.

python -m negtransfer_losses.relatedness labels.csv --task-a expression --task-b AU1 AU2 AU4 ...
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .._labels import IGNORE_INDEX
from ..functional import TASK_KINDS, TaskKind
from ._matrix import TaskRelatedness


def _read_csv(
    path: Path, task_a: str, task_b: Sequence[str], kind: TaskKind
) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """`(labels_a, labels_b, class names of A, names of B's attributes or classes)`; empty cells are missing."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in (task_a, *task_b) if c not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"error: column(s) {missing} not in {path} (columns: {reader.fieldnames})")
        records = list(reader)
    a_values = sorted({r[task_a].strip() for r in records if r[task_a].strip()}, key=_natural)
    a_index = {v: i for i, v in enumerate(a_values)}
    labels_a = torch.tensor([a_index.get(r[task_a].strip(), IGNORE_INDEX) for r in records])
    if kind == "multiclass":
        b_values = sorted({r[task_b[0]].strip() for r in records if r[task_b[0]].strip()}, key=_natural)
        b_index = {v: i for i, v in enumerate(b_values)}
        labels_b = torch.tensor([b_index.get(r[task_b[0]].strip(), IGNORE_INDEX) for r in records])
        return labels_a, labels_b, a_values, b_values
    labels_b = torch.tensor([[_cell(r[c]) for c in task_b] for r in records], dtype=torch.float64)
    return labels_a, labels_b, a_values, list(task_b)


def _cell(value: str) -> float:
    value = value.strip()
    return math.nan if value == "" else float(value)


def _natural(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def main(argv: Sequence[str] | None = None) -> int:
    """Estimate `R` from a CSV of co-annotated labels, print it, and save it as JSON and a heatmap if asked.

    Args:
        argv: the command line without the program name (`sys.argv[1:]` when None).

    Returns:
        the exit status, 0.

    Raises:
        SystemExit: bad arguments, a column missing from the CSV, or `--heatmap` without matplotlib.
    """
    parser = argparse.ArgumentParser(
        prog="python -m negtransfer_losses.relatedness",
        description="Estimate a task-relatedness matrix R[k, m] from a CSV of co-annotated labels. Empty cells "
        "are missing labels.",
    )
    parser.add_argument("csv", type=Path, help="CSV file with a header row")
    parser.add_argument("--task-a", required=True, help="column of task A's class labels")
    parser.add_argument(
        "--task-b",
        required=True,
        nargs="+",
        help="task B's columns: one 0/1 column per attribute (multilabel), or one column of class labels (multiclass)",
    )
    parser.add_argument("--kind", choices=TASK_KINDS, default="multilabel")
    parser.add_argument("--smoothing", type=float, default=1.0, help="Laplace smoothing α (default 1)")
    parser.add_argument("--output", type=Path, help="save the matrix as JSON (TaskRelatedness.from_dict reads it)")
    parser.add_argument("--heatmap", type=Path, help="save a heatmap image (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.kind == "multiclass" and len(args.task_b) != 1:
        parser.error("a multiclass task B is one column of class labels")

    labels_a, labels_b, class_names, attribute_names = _read_csv(args.csv, args.task_a, args.task_b, args.kind)
    relatedness = TaskRelatedness.estimate(
        labels_a,
        labels_b,
        num_a=len(class_names),
        num_b=len(attribute_names),
        kind=args.kind,
        smoothing=args.smoothing,
    )
    print(
        f"{len(labels_a)} rows; task A '{args.task_a}' ({len(class_names)} classes), task B "
        f"{args.kind} ({len(attribute_names)}); smoothing {args.smoothing}"
    )
    print(relatedness.format_table(class_names=class_names, attribute_names=attribute_names))
    if args.output:
        data = relatedness.to_dict() | {"class_names": class_names, "attribute_names": attribute_names}
        args.output.write_text(json.dumps(data, indent=2))
        print(f"saved {args.output}")
    if args.heatmap:
        _save_heatmap(relatedness, class_names, attribute_names, args.heatmap)
        print(f"saved {args.heatmap}")
    return 0


def _save_heatmap(relatedness: TaskRelatedness, rows: Sequence[str], cols: Sequence[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit("error: --heatmap needs matplotlib (pip install 'negtransfer-losses[examples]')") from error
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(cols), 1 + 0.45 * len(rows)))
    image = ax.imshow(relatedness.matrix.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("task B")
    ax.set_ylabel("task A")
    for k in range(len(rows)):
        for m in range(len(cols)):
            value = relatedness.matrix[k, m].item()
            ax.text(
                m, k, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.5 else "black", fontsize=8
            )
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
