"""Every module of `tests/module_cases.py` trains without a host-device sync at its defaults.

One forward and backward, after a warm-up call, with the value checks deferred as on a GPU
(`helpers.count_syncs`): no `aten._local_scalar_dense` (`.item()`, `bool(t)`, `if t:`), and no op whose
output shape depends on values (`nonzero`, `unique`, `masked_select`, `bincount`, `x[mask]`), nor `torch.equal`.
"""

from __future__ import annotations

import pytest
from helpers import checks_deferred_on_cpu, count_syncs
from module_cases import CASES


@pytest.mark.parametrize("name", list(CASES))
def test_a_training_step_makes_no_host_device_sync(name: str) -> None:
    case = CASES[name]()

    def step() -> None:
        case.step().backward()

    step()  # warm-up: first-call work (lazy buffers, the dispatcher's choice) is not counted
    syncs = count_syncs(step)
    assert syncs.total == 0, f"{name}: {syncs.total} sync(s) in one forward + backward: {dict(syncs.counts)}"


@pytest.mark.parametrize("name", list(CASES))
def test_training_steps_never_wait_on_a_deferred_check(name: str) -> None:
    # the op counter cannot see a host wait on a device event: count them, with a device that has finished nothing
    case = CASES[name]()
    with checks_deferred_on_cpu(complete=False) as events:
        for _ in range(4):
            case.step().backward()
        waits = sum(event.waits for event in events)
        assert events, f"{name}: no value check ran, so this test checks nothing"
    assert waits == 0, f"{name}: the host waited on {waits} check event(s) in 4 training steps"


def test_the_counter_sees_a_sync() -> None:
    """The harness can fail: a step that reads a value and indexes with a mask is counted."""
    case = CASES["DistributionMatchingLoss"]()

    def step() -> None:
        loss = case.step()
        logits = case.network["logits_a"]()
        if loss > 0:  # a Python branch on a tensor
            loss = loss + logits[logits > 0].sum()
        loss.backward()

    step()
    syncs = count_syncs(step)
    assert syncs.counts["_local_scalar_dense (.item(), bool(t), int(t), if t: ...)"] == 1, dict(syncs.counts)
    # the mask's indexing in forward and its index_put in backward
    assert syncs.counts["boolean-mask indexing x[mask] (data-dependent shape)"] == 2, dict(syncs.counts)
