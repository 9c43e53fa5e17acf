"""Every code block of README.md and docs/ runs: `diff` blocks as the code they add up to, `python` blocks as is."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def code_blocks(language: str, page: Path = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def applied_diff(diff: str) -> str:
    """The new side of a diff: context and added lines, without their one-character marker."""
    lines = [line[1:] for line in diff.splitlines() if not line.startswith("-")]
    return "\n".join(lines)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(x))


def tiny_loader() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        yield torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_readme_opens_with_the_two_commands() -> None:
    head = README.read_text().splitlines()[:8]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


@pytest.mark.parametrize("index", range(len(code_blocks("diff"))))
def test_training_loop_diff_runs(index: int) -> None:
    namespace: dict[str, object] = {"make_model": TinyNet, "loader": list(tiny_loader())}
    exec(compile(applied_diff(code_blocks("diff")[index]), "README.md", "exec"), namespace)
    loss = namespace["loss"]
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
    model = namespace["model"]
    assert isinstance(model, nn.Module)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks("python", p)], ids=lambda p: p.name)
def test_python_blocks_run(page: Path) -> None:
    namespace: dict[str, object] = {}
    for block in code_blocks("python", page):
        exec(compile(block, page.name, "exec"), namespace)
