"""A soak: 10,000 training steps of every module of `tests/module_cases.py`, with nothing left behind.

Not part of `make test` (15 to 60 minutes on two cores, with the adversary the slowest): run it with

    python -m pytest -m soak tests/test_soak.py -s

Each case trains for `STEPS` steps with Adam, the value checks deferred as on a GPU (each check's values read
later, through the package's queue). After a warm-up of `WARMUP` steps, resident memory, live tensors, the
deferred-check queue and the dispatcher's decision cache must stay flat (memory within `RSS_SLACK_MIB`) and
bounded; the figures are printed (`-s`) for the record.
"""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from helpers import checks_deferred_on_cpu
from module_cases import CASES

import negtransfer_losses as ntl
from negtransfer_losses import _validation
from negtransfer_losses.ops import dispatch

STEPS, WARMUP = 10_000, 500
RSS_SLACK_MIB = 8.0  # allocator noise of a process that has settled; a leak of one tensor per step is far more


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.mark.soak
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", list(CASES))
def test_ten_thousand_steps_leave_nothing_behind(name: str) -> None:
    torch.manual_seed(0)
    case = CASES[name]()
    optimizer = torch.optim.Adam(case.parameters(), lr=1e-3)
    queue_sizes = []
    with checks_deferred_on_cpu(complete=True):
        for step in range(STEPS):
            value = case.step()
            optimizer.zero_grad()
            value.backward()
            optimizer.step()
            queue_sizes.append(len(_validation.pending_checks))
            if step + 1 == WARMUP:
                rss_warm, tensors_warm = rss_mib(), live_tensors()
        ntl.raise_pending_errors()
        rss_end, tensors_end = rss_mib(), live_tensors()
    decisions = len(ntl.ops.decisions())
    print(
        f"\n{name}: {STEPS} steps; RSS {rss_warm:.1f} MiB after {WARMUP} -> {rss_end:.1f} MiB "
        f"({rss_end - rss_warm:+.1f}); live tensors {tensors_warm} -> {tensors_end}; deferred-check queue at most "
        f"{max(queue_sizes)} (limit {_validation.MAX_PENDING_CHECKS}); dispatcher decisions {decisions} "
        f"(limit {dispatch.MAX_DECISIONS})"
    )
    assert torch.isfinite(value)
    assert rss_end - rss_warm <= RSS_SLACK_MIB
    assert tensors_end <= tensors_warm
    assert max(queue_sizes) <= _validation.MAX_PENDING_CHECKS
    assert decisions <= dispatch.MAX_DECISIONS


def test_the_soak_is_not_part_of_make_test(pytestconfig: pytest.Config) -> None:
    assert "not soak" in pytestconfig.getini("addopts") or "soak" in (pytestconfig.getoption("markexpr") or "")
