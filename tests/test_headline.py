"""The home page and the README quote the committed study results, not numbers typed by hand.

`studies/headline.py` reads the case studies' committed JSON (docs/img/); every number of the headline
paragraph and of the decision guide must be what it reads, and the headline plot must exist.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import pytest
from helpers import study_module

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "docs" / "index.md"]


def headline_module() -> ModuleType:
    return study_module("headline")


def problems(text: str) -> list[str]:
    """What a page says that the committed results do not (empty when it quotes them all)."""
    headline = headline_module()
    numbers = headline.headline()
    found = []
    for method in numbers.values():
        pair = f"{method[0.98]:.1f} / {method[0.99]:.1f} %"
        if pair not in text:
            found.append(f"does not quote {pair}")
    found += [f"does not say: {row}" for row in headline.guide().values() if row not in text]
    # the paragraph's percentages are all among the committed ones (none typed by hand)
    paragraph = text[text.index("## What to use") : text.index("| what you have")]
    quoted = {float(x) for x in re.findall(r"(\d+\.\d) ", paragraph)}
    committed = {value for method in numbers.values() for value in method.values()}
    found += [f"quotes {value}, which is no committed result" for value in sorted(quoted - committed)]
    if "img/headline.png" not in text:
        found.append("does not show the headline plot")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_headline_numbers_are_the_committed_ones(page: Path) -> None:
    assert problems(page.read_text()) == []


def test_the_headline_plot_is_committed() -> None:
    assert (ROOT / "docs" / "img" / "headline.png").stat().st_size > 10_000


def test_a_number_that_is_not_committed_is_caught() -> None:
    text = (ROOT / "README.md").read_text()
    assert problems(text.replace("71.2", "72.1")) != []  # in the paragraph and the guide
    paragraph_only = text.replace("(70.0 / 55.8 %)", "(70.0 / 55.8 %, 61.5 %)")
    assert any("61.5" in problem for problem in problems(paragraph_only))
