"""Every code block of README.md and docs/ runs: `diff` blocks as the code they add up to, `python` blocks as is.

Blocks that are not run are shell commands (checked to be only commands) and the Python fragments listed in
`NOT_RUN`, each with the reason; `test_every_code_block_is_run_or_accounted_for` fails on any other block, so
a page cannot gain a block that no test executes.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import negtransfer_losses.functional as ntf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUN = ("python", "diff")  # the languages whose blocks are executed
SHELL = re.compile(r"^([A-Z_]+=\S*\s+)*(make|pip|python|python3|mkdocs|torchrun|git)\b")
NOT_RUN = {  # (page, first line) of a Python fragment that is not executed: why
    ("integrations.md", "frozen = ntl.FrozenReference(fully_shard_reference, layers, stop_early=False)"): (
        "needs an FSDP2-sharded model in a process group; tests/test_fsdp.py runs this call"
    ),
    ("integrations.md", "terms = ntl.collect_terms({"): (
        "shows the keys of the result; the README loop and getting-started run collect_terms"
    ),
}
FENCE = re.compile(r"^( *)```(\S*)\n(.*?)^\1```", flags=re.S | re.M)


def all_blocks(page: Path) -> list[tuple[str, str]]:
    """`(language, code)` of every fenced block of a page, indented ones (in lists) dedented."""
    return [(m.group(2), textwrap.dedent(m.group(3))) for m in FENCE.finditer(page.read_text())]


def code_blocks(language: str, page: Path = README) -> list[str]:
    return [code for lang, code in all_blocks(page) if lang == language]


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


def seeded_models() -> Iterator[TinyNet]:
    """`make_model` for the snippets: the k-th call returns a TinyNet initialized from seed k."""
    for seed in range(100):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            yield TinyNet()


def tiny_loader() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        yield torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def run_diff(diff: str, page: Path) -> tuple[dict[str, object], str]:
    """Executes the new side of a training-loop diff; returns its namespace and what it printed."""
    models = seeded_models()
    namespace: dict[str, object] = {"make_model": lambda: next(models), "loader": list(tiny_loader())}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(applied_diff(diff), page.name, "exec"), namespace)
    return namespace, printed.getvalue()


def test_readme_opens_with_the_two_commands() -> None:
    head = README.read_text().splitlines()[:8]
    assert any(line.startswith("make demo") for line in head)
    assert any(line.startswith("make test") for line in head)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_code_block_is_run_or_accounted_for(page: Path) -> None:
    for language, code in all_blocks(page):
        if language in RUN:
            continue
        lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if lines and all(SHELL.match(line) for line in lines):
            continue  # shell commands: make, pip, python scripts
        first = code.splitlines()[0].strip() if code.strip() else ""
        reason = next(
            (why for (name, start), why in NOT_RUN.items() if name == page.name and first.startswith(start)), None
        )
        assert reason is not None, (
            f"{page.name}: a ```{language} block that no test runs (tag it python, or list it in NOT_RUN "
            f"with the reason):\n{code}"
        )
        compile(code, page.name, "exec")  # a fragment that is not run still parses


def test_the_not_run_list_names_only_blocks_that_exist() -> None:
    firsts = {
        (page.name, code.splitlines()[0].strip()) for page in PAGES for _, code in all_blocks(page) if code.strip()
    }
    for name, start in NOT_RUN:
        assert any(n == name and first.startswith(start) for n, first in firsts), (name, start)


@pytest.mark.parametrize(
    "page, index",
    [(page, i) for page in PAGES for i in range(len(code_blocks("diff", page)))],
    ids=lambda v: v.name if isinstance(v, Path) else str(v),
)
def test_training_loop_diff_runs(page: Path, index: int) -> None:
    namespace, _ = run_diff(code_blocks("diff", page)[index], page)
    loss, model = namespace["loss"], namespace["model"]
    assert isinstance(loss, torch.Tensor) and torch.isfinite(loss)
    assert isinstance(model, nn.Module)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def replay_readme_loop(penalty_weight: float) -> tuple[TinyNet, torch.Tensor, list[float]]:
    """The README's loop written out by hand: the penalty is `functional.anti_transfer` on layer1's outputs.

    No tap, no FrozenReference, no module: the features come from calling the layers directly.
    """
    models = seeded_models()
    model, irrelevant = next(models), next(models)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    penalties = []
    for x, y in tiny_loader():
        features = model.layer1(x)
        with torch.no_grad():
            reference = irrelevant.layer1(x)
        penalty = penalty_weight * ntf.anti_transfer(
            features, reference, aggregation="gram", distance="cos_squared", gram_scope="batch"
        )
        loss = F.cross_entropy(model.head(features), y) + penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        penalties.append(penalty.item())
    return model, loss, penalties


def test_readme_loop_adds_the_anti_transfer_penalty_of_layer1_and_nothing_else() -> None:
    """The README diff's loss, logged terms and trained parameters equal those of the loop written out by hand.

    A tap on the wrong layer, a reference that is not `irrelevant`'s layer1, a weight applied twice, terms
    logged from another step, or a penalty that does not reach the optimizer each change one of these.
    """
    (diff,) = code_blocks("diff")
    namespace, printed = run_diff(diff, README)
    model, loss = namespace["model"], namespace["loss"]
    assert isinstance(model, TinyNet) and isinstance(loss, torch.Tensor)

    expected_model, expected_loss, expected_penalties = replay_readme_loop(penalty_weight=1.0)
    logged = [ast.literal_eval(line) for line in printed.splitlines()]
    assert len(logged) == len(expected_penalties)  # one line of floats per step
    assert [terms["anti_transfer/loss"] for terms in logged] == pytest.approx(expected_penalties, rel=1e-5)
    assert min(expected_penalties) > 1e-3  # a penalty that is there (random networks: about 0.01)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for (name, p), expected in zip(model.named_parameters(), expected_model.parameters(), strict=True):
        torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")

    # the penalty moved the parameters: the same loop without it ends elsewhere
    unpenalized, _, _ = replay_readme_loop(penalty_weight=0.0)
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), unpenalized.parameters(), strict=True))
    assert moved > 1e-4


@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks("python", p)], ids=lambda p: p.name)
def test_python_blocks_run(page: Path) -> None:
    namespace: dict[str, object] = {}
    for block in code_blocks("python", page):
        exec(compile(block, page.name, "exec"), namespace)
