"""Helpers shared by the tests: value-and-gradient comparison against an oracle, counting host-device syncs."""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from negtransfer_losses import _validation

STUDIES = Path(__file__).resolve().parents[1] / "studies"


def study_module(name: str) -> ModuleType:
    """`studies/{name}.py` imported as the studies import each other (their folder on `sys.path`)."""
    if str(STUDIES) not in sys.path:
        sys.path.insert(0, str(STUDIES))
    return importlib.import_module(name)


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


class FakeEvent:
    """A device event whose completion the test decides (`done`); `synchronize()` completes it."""

    def __init__(self, done: bool) -> None:
        self.done = done
        self.recorded = False
        self.waits = 0  # how often the host waited on it (synchronize)

    def record(self) -> None:
        self.recorded = True

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits += 1
        self.done = True


@contextmanager
def checks_deferred_on_cpu(*, complete: bool = True) -> Iterator[list[FakeEvent]]:
    """Run the value checks on CPU tensors as they run on a GPU: copied without blocking, read later.

    Every check records a `FakeEvent`, complete at once (`complete=True`) or when the test sets `done`;
    the events are yielded in the order they were recorded. Pending checks are dropped on exit.
    """
    events: list[FakeEvent] = []

    def new_event(device: torch.device) -> FakeEvent:
        events.append(FakeEvent(complete))
        return events[-1]

    with _validation.pending_checks.override(new_event=new_event):
        yield events


# Ops that make the host wait for the device: reading a value, or an output whose shape depends on values.
SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default: "_local_scalar_dense (.item(), bool(t), int(t), if t: ...)",
    torch.ops.aten.nonzero.default: "nonzero (data-dependent shape)",
    torch.ops.aten.masked_select.default: "masked_select (data-dependent shape)",
    torch.ops.aten._unique2.default: "unique (data-dependent shape)",
    torch.ops.aten.unique_dim.default: "unique (data-dependent shape)",
    torch.ops.aten.unique_consecutive.default: "unique_consecutive (data-dependent shape)",
    torch.ops.aten.bincount.default: "bincount (data-dependent shape)",
    torch.ops.aten.repeat_interleave.Tensor: "repeat_interleave of a tensor of repeats (data-dependent shape)",
    torch.ops.aten.equal.default: "equal (torch.equal returns a Python bool)",
    # LAPACK-style decompositions read their error flag back to the host on CUDA (invisible on CPU)
    torch.ops.aten._linalg_svd.default: "linalg.svd (reads an error flag on CUDA)",
    torch.ops.aten._linalg_eigh.default: "linalg.eigh (reads an error flag on CUDA)",
    torch.ops.aten.linalg_eig.default: "linalg.eig (reads an error flag on CUDA)",
}


class SyncCounter(TorchDispatchMode):
    """Counts the ops in `SYNC_OPS` (and indexing with a boolean mask) that run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func in SYNC_OPS and not (
            func is torch.ops.aten.repeat_interleave.Tensor and kwargs and kwargs.get("output_size")
        ):
            self.counts[SYNC_OPS[func]] += 1
        elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, Tensor) and i.dtype == torch.bool for i in indices):
                self.counts["boolean-mask indexing x[mask] (data-dependent shape)"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_syncs(step: Callable[[], object]) -> SyncCounter:
    """The host-device syncs one call of `step` makes, with the value checks deferred as on a GPU.

    Counts `aten._local_scalar_dense` (what `.item()`, `bool(t)`, `int(t)` run) and the ops whose output
    shape depends on values (`nonzero`, `unique`, `masked_select`, `x[mask]`): each makes a CUDA host wait.
    Call `step` once before (a warm-up), so that first-call work (caches, lazy buffers) is not counted.
    """
    with checks_deferred_on_cpu(), SyncCounter() as counter:
        step()
    return counter


def conditional_data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task classes 0-2 with u tied to y on most samples, a class with a single u value, unknown entries."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    u = y.clone()
    u[[0, 4, 7, 10, 13]] = torch.tensor([1, 2, 2, 0, 1])  # classes 0 and 1 get a second u value
    u[[2, 5]] = -100
    y[[3, 9]] = -100
    u[y == 2] = 2  # class 2: a single u value, contributes nothing
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) + torch.eye(3, 4, dtype=torch.float64)[u.clamp(0)]
    return z, u, y
