"""The docs as a reader meets them: every image and every relative link of README.md and docs/*.md resolves.

Each page is rendered with the Markdown extensions of mkdocs.yml (snippets included, as the site shows them), and
every `<a href>` and `<img src>` of the result is checked: a file must exist (for a docs page, inside docs/, the
only folder the site serves), and a `#anchor` must be the id of a heading of the page it points to, as the toc
extension writes it. Links to the web and to the API reference's autorefs are not followed. The plots' one look
per method (studies/plot_style.py) is checked here too: no two methods alike.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import study_module

markdown = pytest.importorskip("markdown")
yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:, ...


class _Targets(HTMLParser):
    """Every link target (`href`), image (`src`) and element id of an HTML fragment."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.paragraphs: list[str] = []  # the text of every <p>, inline code left out
        self._in_p = self._in_code = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "p":
            self._in_p += 1
            self.paragraphs.append("")
        self._in_code += tag == "code"
        found = dict(attrs)
        if tag == "a" and found.get("href"):
            self.links.append(str(found["href"]))
        if tag == "img" and found.get("src"):
            self.images.append(str(found["src"]))
        if found.get("id"):
            self.ids.add(str(found["id"]))

    def handle_endtag(self, tag: str) -> None:
        self._in_p -= tag == "p" and self._in_p > 0
        self._in_code -= tag == "code" and self._in_code > 0

    def handle_data(self, data: str) -> None:
        if self._in_p and not self._in_code:
            self.paragraphs[-1] += data


def _extensions() -> tuple[list[str], dict[str, dict[str, Any]]]:
    """mkdocs.yml's markdown_extensions, snippets read from the repository root as `mkdocs build` does."""
    names, configs = [], {}
    for entry in yaml.safe_load((ROOT / "mkdocs.yml").read_text())["markdown_extensions"]:
        name, config = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
        names.append(name)
        if config:
            configs[name] = dict(config)
    if "pymdownx.snippets" in configs:
        configs["pymdownx.snippets"]["base_path"] = [str(ROOT)]
    return names, configs


_RENDERED: dict[Path, _Targets] = {}


def rendered(page: Path, text: str | None = None) -> _Targets:
    """The links, images and heading ids of `page` (or of `text` as if it were that page) as the site renders it
    (cached per page)."""
    if page not in _RENDERED:
        names, configs = _extensions()
        source = page.read_text() if text is None else text
        html = markdown.Markdown(extensions=names, extension_configs=configs).convert(source)
        parser = _Targets()
        parser.feed(html)
        _RENDERED[page] = parser
    return _RENDERED[page]


def problems(page: Path) -> list[str]:
    """What does not resolve on `page`: a missing file, a file the site does not serve, an unknown #anchor."""
    found = []
    targets = rendered(page)  # `rendered(page, text)` first to check a page that is not on disk
    for kind, target in [("link", t) for t in targets.links] + [("image", t) for t in targets.images]:
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if resolved == page:
            if anchor not in targets.ids:
                found.append(f"{page.relative_to(ROOT)}: {kind} {target!r}: no heading with id {anchor!r} here")
            continue
        where = f"{page.relative_to(ROOT)}: {kind} {target!r}"
        if not resolved.exists():
            found.append(f"{where}: no file {resolved.relative_to(ROOT) if ROOT in resolved.parents else resolved}")
            continue
        if page.parent == DOCS and DOCS not in resolved.parents and resolved != page:
            found.append(f"{where}: outside docs/, so not on the site")
            continue
        if anchor and resolved.suffix == ".md" and anchor not in rendered(resolved).ids:
            found.append(f"{where}: no heading with id {anchor!r} in {resolved.relative_to(ROOT)}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_image_and_relative_link_resolves(page: Path) -> None:
    assert problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_list_renders_as_a_list(page: Path) -> None:
    # Python-Markdown, unlike GitHub, reads a list that follows a paragraph line without a blank line between them
    # as more of the paragraph: the site shows "What it shows: - **...** - **...**" as one block of text
    run_on = [p for p in rendered(page).paragraphs if re.search(r"\n\s*(?:[-*+]|\d+\.) ", p)]
    assert run_on == [], f"{page.name}: a list without a blank line before it:\n" + "\n\n".join(run_on)


def test_the_check_sees_the_case_studies_plots() -> None:
    images = rendered(DOCS / "case-studies.md").images
    assert "img/biased_mnist.png" in images and len(images) >= 8


def test_a_broken_link_an_unknown_anchor_and_a_missing_image_are_caught() -> None:
    page = DOCS / "_not_on_disk.md"  # rendered from the text below, as if it were a page of docs/
    text = (
        "# A page\n\n[gone](no-such-page.md) [anchor](case-studies.md#no-such-heading) "
        "[fine](case-studies.md#how-these-numbers-were-made-0-0a-0b) [here](#a-page) [there](#nowhere) "
        "[out](../README.md)\n\n![plot](img/no-such-plot.png)\n"
    )
    try:
        rendered(page, text)
        found = problems(page)
    finally:
        _RENDERED.pop(page, None)
    assert len(found) == 5, found
    for expected in ("no-such-page.md", "no-such-heading", "#nowhere", "outside docs/", "no-such-plot.png"):
        assert any(expected in problem for problem in found), expected


def plot_style() -> ModuleType:
    return study_module("plot_style")


def test_no_two_methods_look_alike_on_the_plots() -> None:
    style = plot_style()
    looks = style.LOOKS
    colours = [look.colour.lower() for look in looks.values()]
    assert len(set(colours)) == len(colours), "two methods share a colour"
    assert len({(look.colour, look.marker, look.linestyle, look.hatch) for look in looks.values()}) == len(looks)
    for name, look in looks.items():
        red, green, blue = (int(look.colour[i : i + 2], 16) for i in (1, 3, 5))
        grey = max(red, green, blue) - min(red, green, blue) < 8
        # baselines grey, dashed and hatched; the library's methods in colour, solid, plain bars
        assert grey == look.baseline, name
        assert (look.linestyle != "-" and bool(look.hatch)) == look.baseline, name
    for alias, key in style.ALIASES.items():
        assert style.look(alias) == looks[key]
    with pytest.raises(KeyError, match="no plot style for method 'unknown'"):
        style.look("unknown")


def test_a_list_glued_to_its_paragraph_is_caught() -> None:
    page = DOCS / "_not_on_disk_list.md"
    try:
        glued = rendered(page, "What it shows:\n- one\n- two\n").paragraphs
    finally:
        _RENDERED.pop(page, None)
    try:
        apart = rendered(page, "What it shows:\n\n- one\n- two\n").paragraphs
    finally:
        _RENDERED.pop(page, None)
    assert glued == ["What it shows:\n- one\n- two"] and apart == ["What it shows:"]


REPLOTS = {  # each committed plot of docs/img that a study draws from its committed JSON: (study, --replot flags)
    "biased_mnist.png": ("biased_mnist", []),
    "biased_mnist_28.png": ("biased_mnist", ["--size", "28"]),
    "biased_mnist_heldout.png": ("biased_mnist", ["--split", "heldout"]),
    "biased_digits.png": ("biased_digits", []),
    "biased_sweep.png": ("biased_digits", ["--sweep"]),
    "anti_transfer_layers.png": ("anti_transfer_layers", []),
    "anti_transfer_diagnostics.png": ("anti_transfer_layers", []),
    "multitask_digits.png": ("multitask_digits", []),
    "multitask_sweep.png": ("multitask_digits", ["--sweep"]),
    "multitask_mnist_sweep.png": ("multitask_digits", ["--sweep", "--dataset", "mnist"]),
}


@pytest.mark.parametrize("name", sorted(REPLOTS))
def test_every_plot_is_drawn_again_from_the_committed_json_alone(tmp_path: Path, name: str) -> None:
    study = study_module(REPLOTS[name][0])
    committed = {p.name: p.read_bytes() for p in (DOCS / "img").glob("*.json")}  # the JSON, no PNG: nothing else
    for file, content in committed.items():
        (tmp_path / file).write_bytes(content)
    study.main(["--replot", *REPLOTS[name][1], "--out", str(tmp_path)])
    assert (tmp_path / name).stat().st_size > 20_000
    # nothing trained or summarized again: every JSON as committed, and no other file but the plots
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.json")} == committed
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".png"}
