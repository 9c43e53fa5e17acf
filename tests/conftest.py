from __future__ import annotations

import os
import sys

# Triton kernels run in Triton's CPU interpreter in the tests; this must be set before a kernel module is
# imported (the package imports them only when the Triton backend is used).
os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest
import torch
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The hostile-input count (tests/test_hostile.py), for the report."""
    from helpers import HOSTILE_CASES

    if HOSTILE_CASES["tried"]:
        good = HOSTILE_CASES["finite"] + HOSTILE_CASES["clear error"]
        terminalreporter.write_line(
            f"hostile inputs: {HOSTILE_CASES['tried']} cases tried, {good} gave a finite result and gradient "
            f"({HOSTILE_CASES['finite']}) or a documented error ({HOSTILE_CASES['clear error']})"
        )
