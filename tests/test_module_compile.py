"""Every module of `tests/module_cases.py` compiles without a graph break and trains as in eager mode.

Per case: `torch._dynamo.explain` finds no graph break in one training forward, and two training steps
(forward compiled with `fullgraph=True`, backward, SGD step) give the eager losses. The steps compile with
the `aot_eager` backend (Dynamo's whole-graph capture and AOTAutograd's forward and backward graphs, the
parts where a module can break), which takes seconds per case on CPU; one case also runs through
inductor, which takes about half a minute on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from module_cases import CASES, Case
from torch import Tensor

STEPS = 2
LEARNING_RATE = 0.1


@pytest.mark.parametrize("name", list(CASES))
def test_a_training_forward_has_no_graph_break(name: str) -> None:
    case = CASES[name]()
    case.step()  # warm-up, as a training loop would: lazy state exists before tracing
    torch._dynamo.reset()
    explained = torch._dynamo.explain(case.forward)(case.module, case.network)
    reasons = "; ".join(str(reason.reason).splitlines()[0] for reason in explained.break_reasons)
    assert explained.graph_break_count == 0, f"{name}: {explained.graph_break_count} graph break(s): {reasons}"


def _train(case: Case, forward: Callable[..., Tensor]) -> list[Tensor]:
    optimizer = torch.optim.SGD(case.parameters(), lr=LEARNING_RATE)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = forward(case.module, case.network)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _compiled_steps_match_eager(name: str, backend: str) -> None:
    eager_case, compiled_case = CASES[name](), CASES[name]()  # two identical cases
    eager_case.step(), compiled_case.step()  # warm-up, on both so that their state stays the same
    expected = _train(eager_case, eager_case.forward)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_case.forward, backend=backend, fullgraph=True)
    losses = _train(compiled_case, compiled)
    for step, (loss, eager) in enumerate(zip(losses, expected, strict=True)):
        torch.testing.assert_close(loss, eager, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}, step {step}: {m}")
    assert not torch.equal(expected[0], expected[1]), "the first step changed nothing: the test would be blind"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_a_fullgraph_compiled_training_step_gives_the_eager_losses(name: str) -> None:
    _compiled_steps_match_eager(name, "aot_eager")


@pytest.mark.slow
def test_inductor_trains_the_paper_setting_as_eager() -> None:
    _compiled_steps_match_eager("AntiTransferLoss", "inductor")
