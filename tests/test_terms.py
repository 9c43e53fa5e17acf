"""`last_terms` of every module (`tests/module_cases.py`): `"loss"` is what the module returned, and the
`"{part}/loss"` entries add up to the loss they are parts of (the layout documented in
`negtransfer_losses/terms.py`), also with weights other than 1.
"""

from __future__ import annotations

import pytest
import torch
from module_cases import CASES, WEIGHTED_CASES

from negtransfer_losses.terms import loss_parts

ALL_CASES = {**CASES, **WEIGHTED_CASES}


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_the_parts_add_up_to_the_loss_they_belong_to(name: str) -> None:
    case = ALL_CASES[name]()
    output = case.step()
    terms = getattr(case.module, "last_terms", None)
    if terms is None:
        pytest.skip(f"{type(case.module).__name__} keeps no last_terms")
    assert "loss" in terms, f"{name}: last_terms has no 'loss': {sorted(terms)}"
    if case.output_is_loss:
        torch.testing.assert_close(terms["loss"], output.detach(), msg=f"{name}: last_terms['loss'] != output")
    for whole, parts in loss_parts(terms).items():
        total = sum(terms[part] for part in parts)
        listed = ", ".join(f"{part} = {float(terms[part]):.6g}" for part in parts)
        torch.testing.assert_close(
            total,
            terms[whole],
            rtol=1e-5,
            atol=1e-6,
            msg=f"{name}: {whole} = {float(terms[whole]):.6g} but its parts add up to {float(total):.6g} ({listed})",
        )


def test_loss_parts_finds_the_nearest_enclosing_loss() -> None:
    terms = {
        key: torch.tensor(0.0)
        for key in ["loss", "a/loss", "a/value", "a/x/loss", "a/y/loss", "b/loss", "b/similarity", "c/d/loss"]
    }
    assert loss_parts(terms) == {"loss": ["a/loss", "b/loss", "c/d/loss"], "a/loss": ["a/x/loss", "a/y/loss"]}


def test_the_check_can_fail() -> None:
    terms = {"loss": torch.tensor(1.0), "a/loss": torch.tensor(0.3), "b/loss": torch.tensor(0.5)}
    parts = loss_parts(terms)["loss"]
    assert float(sum(terms[p] for p in parts)) != pytest.approx(float(terms["loss"]))
