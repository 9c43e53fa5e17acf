"""Helpers shared by the tests: value-and-gradient comparison against an oracle."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch import Tensor

# Every loss is multiplied by this before backward(): a backward pass that forgets to multiply by
# grad_output goes unnoticed when grad_output is 1.
GRAD_SCALE = 3.7


def value_and_grads(fn: Callable[..., Tensor], *inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """`fn(*leaves)` and the gradients of `GRAD_SCALE * fn` with respect to fresh float64 leaves."""
    leaves = [x.detach().double().clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(GRAD_SCALE * value.sum(), leaves, allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]


def assert_matches_oracle(
    fn: Callable[..., Tensor],
    oracle: Callable[..., Tensor],
    *inputs: Tensor,
    rtol: float = 1e-9,
    atol: float = 1e-11,
) -> None:
    """Values and gradients of `fn` equal those of `oracle` in float64."""
    value, grads = value_and_grads(fn, *inputs)
    expected, expected_grads = value_and_grads(oracle, *inputs)
    torch.testing.assert_close(value, expected, rtol=rtol, atol=atol)
    for i, (g, e) in enumerate(zip(grads, expected_grads, strict=True)):
        torch.testing.assert_close(g, e, rtol=rtol * 10, atol=atol * 10, msg=lambda m, i=i: f"grad {i}: {m}")


# Counts of tests/test_hostile.py's cases: tried, finite, clear error (printed at the end of the run).
HOSTILE_CASES: Counter[str] = Counter()
