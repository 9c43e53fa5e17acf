"""Writing a study's results: its record as JSON, its table as markdown, its plot as PNG, side by side."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
