"""Every module of `tests/module_cases.py` resumes exactly: a checkpoint at step k, loaded into fresh objects,
continues as the uninterrupted run (bitwise, on the CPU).

The run trains the case's network and the module's own parameters with Adam. At step `SAVE_AT` the network's,
the module's and the optimizer's `state_dict`s and torch's RNG state are saved with `torch.save` and loaded with
`torch.load(..., weights_only=True)` into objects built afresh from the same factory; both runs then take
`CONTINUE` more steps and must agree in every parameter, every buffer and every value they return. A module
whose state (an adversary's own optimizer, running statistics) were left out of its `state_dict` fails here.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from module_cases import CASES, Case

SAVE_AT, CONTINUE = 7, 30


def optimizer_for(case: Case) -> torch.optim.Optimizer:
    return torch.optim.Adam(case.parameters(), lr=1e-2)


def train(case: Case, optimizer: torch.optim.Optimizer, steps: int) -> list[torch.Tensor]:
    values = []
    for _ in range(steps):
        value = case.step()
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.detach().clone())
    return values


def checkpoint(case: Case, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state = {
        "network": case.network.state_dict(),
        "module": case.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded: dict[str, Any] = torch.load(buffer, weights_only=True)
    return loaded


def same(a: object, b: object) -> bool:
    """Bitwise equal tensors, or containers of them (a module's extra state)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def everything(case: Case) -> dict[str, object]:
    return {**{f"network.{k}": v for k, v in case.network.state_dict().items()}, **case.module.state_dict()}


@pytest.mark.parametrize("name", list(CASES))
def test_a_resumed_run_is_the_uninterrupted_run(name: str) -> None:
    torch.manual_seed(0)
    uninterrupted = CASES[name]()
    optimizer = optimizer_for(uninterrupted)
    train(uninterrupted, optimizer, SAVE_AT)
    saved = checkpoint(uninterrupted, optimizer)
    expected = train(uninterrupted, optimizer, CONTINUE)

    resumed = CASES[name]()
    resumed_optimizer = optimizer_for(resumed)
    resumed.network.load_state_dict(saved["network"])
    resumed.module.load_state_dict(saved["module"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    got = train(resumed, resumed_optimizer, CONTINUE)

    for step, (a, b) in enumerate(zip(expected, got, strict=True)):
        assert torch.equal(a, b), f"{name}: step {SAVE_AT + step + 1} returned {b.item()!r}, uninterrupted {a.item()!r}"
    first, second = everything(uninterrupted), everything(resumed)
    assert set(first) == set(second)
    for key, value in first.items():
        assert same(value, second[key]), f"{name}: {key} differs from the uninterrupted run's"


def resumed_with(
    name: str, load_module: Callable[[torch.nn.Module, dict[str, Any]], None]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The last 3 steps of the uninterrupted run and of the run resumed at `SAVE_AT`, the module's state loaded
    by `load_module(module, saved_state)` (the network and the optimizer from the checkpoint as they are)."""
    uninterrupted = CASES[name]()
    optimizer = optimizer_for(uninterrupted)
    train(uninterrupted, optimizer, SAVE_AT)
    saved = checkpoint(uninterrupted, optimizer)
    expected = train(uninterrupted, optimizer, 3)
    resumed = CASES[name]()
    resumed_optimizer = optimizer_for(resumed)
    resumed.network.load_state_dict(saved["network"])
    load_module(resumed.module, saved["module"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    return expected, train(resumed, resumed_optimizer, 3)


def test_a_forgotten_state_is_caught() -> None:
    """The harness can fail: an adversary whose own optimizer state is not restored does not resume exactly."""

    def without_head_optimizer(module: torch.nn.Module, saved: dict[str, Any]) -> None:
        state = {k: v for k, v in saved.items() if not k.startswith("head_optimizer.")}
        with pytest.warns(UserWarning, match="its steps start afresh"):
            module.load_state_dict(state)  # as a checkpoint of the older layout

    expected, got = resumed_with("AdversarialSuppression", without_head_optimizer)
    assert not all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


@pytest.mark.parametrize("forgotten", ["twin_loss_ema", "twin_optimizer.exp_avg_0", "twin.0.weight"])
def test_a_bias_twin_that_forgets_part_of_its_state_is_caught(forgotten: str) -> None:
    """The harness can fail for BiasTwin too: a resumed twin without its averages, its Adam state or its weights
    does not continue as the uninterrupted one."""

    def with_one_entry_afresh(module: torch.nn.Module, saved: dict[str, Any]) -> None:
        module.load_state_dict({**saved, forgotten: module.state_dict()[forgotten]})  # that entry as built afresh

    expected, got = resumed_with("BiasTwin", with_one_entry_afresh)
    assert not all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
