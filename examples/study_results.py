"""Writing a study's results: its record as JSON, its table as markdown, its plot as PNG, side by side."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_study(out: Path, stem: str, record: dict[str, Any], table: str, plot: Callable[[Path], None]) -> None:
    """`out/{stem}.json`, `out/{stem}.md` and `out/{stem}.png` (drawn by `plot`), then say where they went."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1))
    (out / f"{stem}.md").write_text(table + "\n")
    plot(out / f"{stem}.png")
    print(f"wrote {out / stem}.json, .md and .png")
