"""Input checks shared by every public function: messages name the argument, the shapes and what is valid.

Checks that read tensor values (NaN/inf, label ranges) go through `raise_if_invalid`, which never makes the
host wait for the device: on the CPU it reads the values at once and raises at once; on a GPU (any device
but the CPU) it copies the few values it needs into pinned host memory without blocking, records an event,
and queues the check in `pending_checks` (a `PendingChecks`, the one queue of the process), which raises the
error at the first check call after the device has finished that work (at the latest after
`MAX_PENDING_CHECKS` more checks, or when `raise_pending_errors` flushes it). While `torch.compile` traces
or a CUDA graph is being captured, such checks are skipped (`value_checks_run`).
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeAlias

import torch
from torch import Tensor

NanPolicy: TypeAlias = Literal["raise", "skip", "propagate"]
NAN_POLICIES: tuple[NanPolicy, ...] = ("raise", "skip", "propagate")


def describe(name: str, layer: str | None = None) -> str:
    """`'student'` or `'student' (layer 'layer3')`, for error messages."""
    return f"'{name}'" if layer is None else f"'{name}' (layer '{layer}')"


def check_tensor(x: object, name: str, *, layer: str | None = None, min_dim: int = 1) -> Tensor:
    """Raise `TypeError` unless `x` is a floating-point tensor with at least `min_dim` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{describe(name, layer)} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{describe(name, layer)} must be a real floating-point tensor, got dtype {x.dtype}; "
            f"convert it with .float()"
        )
    if x.dim() < min_dim:
        raise ValueError(
            f"{describe(name, layer)} must have at least {min_dim} dimension(s) (batch first), "
            f"got shape {tuple(x.shape)}"
        )
    return x


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the precision every reduction runs in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_same_batch(x: Tensor, y: Tensor, names: Sequence[str], *, layer: str | None = None) -> None:
    """Raise `ValueError` unless `x` and `y` have the same first (batch) dimension."""
    if x.shape[0] != y.shape[0]:
        where = "" if layer is None else f" at layer '{layer}'"
        raise ValueError(
            f"'{names[0]}' and '{names[1]}' must have the same batch size{where}: "
            f"got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )


def check_same_device(tensors: Mapping[str, Tensor], *, layer: str | None = None) -> None:
    """Raise `ValueError` unless every tensor lives on one device (naming them and their devices)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{describe(name, layer)} on {device}" for name, device in devices.items())
        raise ValueError(f"inputs must be on the same device: {listed}; move them with .to(device)")


def check_same_batch_and_device(x: Tensor, y: Tensor, names: Sequence[str], *, layer: str | None = None) -> None:
    """`check_same_device`, then `check_same_batch`: two tensors of one batch on one device (one check of a pair).

    Raises:
        ValueError: as `check_same_device` (naming both tensors and their devices), or as `check_same_batch`.
    """
    check_same_device({names[0]: x, names[1]: y}, layer=layer)
    check_same_batch(x, y, names, layer=layer)


def check_channel_pair(student: Tensor, reference: Tensor) -> None:
    """Raise unless `student` and `reference` are `(B, C, ...)` maps with one batch size and one spatial size.

    Their channel counts may differ (aggregations over channels, pairwise rows).
    """
    check_tensor(student, "student", min_dim=2)
    check_tensor(reference, "reference", min_dim=2)
    if student.shape[0] != reference.shape[0] or student.shape[2:] != reference.shape[2:]:
        raise ValueError(
            f"'student' and 'reference' must agree in batch and spatial size, got {tuple(student.shape)} and "
            f"{tuple(reference.shape)}"
        )


def check_min_batch(n: int, minimum: int, *, what: str, name: str = "x") -> None:
    """Raise `ValueError` when an estimator needs more samples than it was given."""
    if n < minimum:
        samples = "sample" if minimum == 1 else "samples"
        raise ValueError(f"{what} needs at least {minimum} {samples} in '{name}', got a batch of {n}")


def compiling() -> bool:
    """Whether `torch.compile` is tracing the code that runs now.

    Then checks that read tensor values are skipped (they need the data on the host, which breaks the graph:
    run a step eagerly first to validate a new data pipeline), and `backend="auto"` takes the torch path.
    """
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling() if is_compiling is not None else torch._dynamo.is_compiling())


def capturing(*devices: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream, for work on any of `devices`.

    Only CUDA devices can be captured; a captured graph replays device work only, so nothing that the host
    would read later (a check's values, a measurement) may be recorded during capture.
    """
    return any(device.type == "cuda" for device in devices) and torch.cuda.is_current_stream_capturing()


def value_checks_run(device: torch.device) -> bool:
    """Whether a check that reads tensor values on `device` runs now: not while `torch.compile` traces
    (`compiling`), nor during CUDA-graph capture (`capturing`)."""
    return not compiling() and not capturing(device)


# ---------------------------------------------------------------------------------------------------------
# Value checks that never block: read at once on the CPU, later (without waiting) on other devices.

MAX_PENDING_CHECKS = 64
"""How many deferred checks may wait for their device; one more makes the oldest be waited for and read.

A training step makes a few checks per module and layer (NaN/inf, labels), so the oldest of 64 is from steps
back and normally complete: a smaller bound would make a step with many checks (an `AntiTransferLoss` over
nine layers, or several modules) wait for the device on a check of that same step."""


class DeviceEvent(Protocol):
    """What the deferred checks need of an event (`torch.cuda.Event`, `torch.Event`)."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


EventSource: TypeAlias = Callable[[torch.device], DeviceEvent | None]
"""`new_event(device)`: an unrecorded event to read values on `device` later, or None to read them at once."""


def new_event(device: torch.device) -> DeviceEvent | None:
    """An unrecorded event of `device`'s current stream, behind which a check's values are read later without
    waiting; None where they are read at once.

    On the CPU the values are in host memory already, so a check reads them at once and raises at once (None);
    a device without events (None too) makes its checks block. Every other device defers its checks.
    """
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        return torch.cuda.Event()  # type: ignore[no-untyped-call]
    event_type = getattr(torch, "Event", None)  # torch >= 2.4: events of any accelerator
    if event_type is None:
        return None
    try:
        event: DeviceEvent = event_type(device=device)
    except (RuntimeError, ValueError, TypeError):
        return None
    return event


class HostCopy:
    """A small tensor's values on their way to the host: copied without blocking where reading would wait.

    Where `new_event` gives no event (the CPU, a device without events) the values are read at once;
    elsewhere they are copied into pinned host memory behind an event of the device's current stream, and
    `ready()` says, without waiting, whether the copy has arrived.

    Args:
        values: the tensor to read.
        new_event: where the event comes from; by default `pending_checks`'s event source (`new_event`).
    """

    def __init__(self, values: Tensor, *, new_event: EventSource | None = None) -> None:
        device = values.device
        event = (new_event or pending_checks.new_event)(device)
        if event is None:
            self.event: DeviceEvent | None = None
            self.host = values.detach().cpu()
            return
        self.event = event
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=device.type == "cuda")
        self.host.copy_(values, non_blocking=True)
        event.record()

    def ready(self) -> bool:
        """Whether the values are on the host (never waits)."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Wait until the values are on the host (normally they are long since)."""
        if self.event is not None:
            self.event.synchronize()

    def tolist(self) -> list[Any]:
        """The values, once `ready()` (or after `wait()`)."""
        values: list[Any] = self.host.tolist()
        return values


@dataclass
class _PendingCheck:
    copy: HostCopy  # the check's values, on their way to the host
    message: Callable[[list[Any]], str | None]
    device: torch.device
    issued: int  # the check call that issued it


class PendingChecks:
    """The queue of value checks whose values are still on their way to the host, and their explicit flush.

    `add` reads a check's values at once where they are in host memory (raising at once) and queues it
    otherwise; `poll` (made by every check call first) raises the errors of queued checks whose device work has
    completed, waiting for none; `flush` waits for every queued check and raises what they found. The queue
    holds at most `limit` checks: one more makes the oldest be waited for and read. Thread-safe.

    The package has one queue, `pending_checks`, so that a check of any module reports the readable errors of
    every earlier one; `raise_pending_errors` flushes it.

    Args:
        limit: how many checks may wait for their device (`MAX_PENDING_CHECKS`).
        new_event: the event source (`new_event`); `override` replaces it for a while (tests run the deferred
            path on CPU tensors so).
    """

    def __init__(self, *, limit: int = MAX_PENDING_CHECKS, new_event: EventSource = new_event) -> None:
        self.limit = limit
        self.new_event = new_event
        self._queue: deque[_PendingCheck] = deque()
        self._lock = threading.Lock()
        self._calls = 0  # check calls so far (each polls once): how late an error is reported

    def __len__(self) -> int:
        """How many checks wait for their device."""
        return len(self._queue)

    def add(self, values: Tensor, message: Callable[[list[Any]], str | None]) -> None:
        """Check `values` (after a `poll`): at once where they are read at once, else queued (see the class).

        Raises:
            ValueError: the errors of earlier checks that have become readable, this check's where its values
                were read at once, or the oldest check's where the queue was full.
        """
        self.poll()
        copy = HostCopy(values, new_event=self.new_event)
        if copy.event is None:
            _raise_messages([message(copy.tolist())])
            return
        with self._lock:
            self._queue.append(_PendingCheck(copy, message, values.device, self._calls))
            overdue = [self._queue.popleft() for _ in range(len(self._queue) - self.limit)]
        for check in overdue:
            check.copy.wait()  # normally complete long ago: a few steps have been queued since
        _raise_messages([self._late_message(check) for check in overdue])

    def poll(self) -> None:
        """Count a check call, and raise the errors of queued checks whose device work has completed; wait for none.

        Raises:
            ValueError: naming every failed check that has become readable, oldest first.
        """
        with self._lock:
            self._calls += 1
            if not self._queue:
                return
            done = [check for check in self._queue if check.copy.ready()]
            for check in done:
                self._queue.remove(check)
        _raise_messages([self._late_message(check) for check in done])

    def flush(self) -> None:
        """Wait for every queued check's values and raise the errors they found; the queue is left empty.

        Raises:
            ValueError: naming every failed check that had not been raised yet, oldest first.
        """
        with self._lock:
            waiting = list(self._queue)
            self._queue.clear()
        for check in waiting:
            check.copy.wait()
        _raise_messages([self._late_message(check) for check in waiting])

    @contextmanager
    def override(self, *, new_event: EventSource) -> Iterator[PendingChecks]:
        """Within the block, take events from `new_event`; on exit the old source is back, and the checks
        queued within the block are dropped unread (their events came from the replaced source)."""
        with self._lock:
            saved_source, saved_queue = self.new_event, self._queue
            self.new_event, self._queue = new_event, deque()
        try:
            yield self
        finally:
            with self._lock:
                self.new_event, self._queue = saved_source, saved_queue

    def _late_message(self, check: _PendingCheck) -> str | None:
        message = check.message(check.copy.tolist())
        if message is None:
            return None
        later = self._calls - check.issued
        return (
            f"{message} [found on {check.device} by a check {later} check call(s) before this one: checks on "
            f"{check.device.type} read their result without waiting; see raise_pending_errors]"
        )


pending_checks = PendingChecks()
"""The package's one queue of deferred value checks (its owner): every value check goes through it, and
`raise_pending_errors` flushes it."""


def raise_if_invalid(values: Tensor, message: Callable[[list[Any]], str | None]) -> None:
    """Raise `ValueError(message(values))` unless the message is None, without making the host wait.

    Args:
        values: a small 1-D tensor computed on the inputs' device by fixed-shape operations (a flag, and
            what the message needs, such as the first invalid label).
        message: builds the error message from the values as a Python list, or returns None when they
            are valid. It must capture no tensor (only names, shapes and options).

    Raises:
        ValueError: at once on the CPU (or a device without events); elsewhere from a later check, as in
            the module's docstring. Errors of earlier checks that have become readable are raised first.
    """
    device = values.device
    if device.type == "meta" or not value_checks_run(device):
        return
    pending_checks.add(values, message)


def poll_pending_checks() -> None:
    """Raise the errors of deferred checks whose device work has completed; wait for none (`pending_checks.poll`).

    Every value check calls it first, so an error surfaces at the first check after the device has
    finished the failing step.

    Raises:
        ValueError: naming every failed check that has become readable, oldest first.
    """
    pending_checks.poll()


def raise_pending_errors() -> None:
    """Wait for every deferred value check and raise the errors they found (for the end of an epoch, or tests).

    On a GPU, checks of the inputs (NaN/inf with `nan_policy="raise"`, label ranges) read their result
    without making the host wait, so their error is raised by a later check call. Call this where a training
    loop ends, or where it must know that every step so far had valid inputs. It waits for the device work
    of the pending checks only (usually complete). Do not call it during CUDA-graph capture.

    Raises:
        ValueError: naming every failed check that had not been raised yet, oldest first.
    """
    pending_checks.flush()


def _raise_messages(messages: Sequence[str | None]) -> None:
    failed = [message for message in messages if message is not None]
    if failed:
        raise ValueError("\n".join(failed))


def guard_finite(
    tensors: Mapping[str, Tensor], nan_policy: NanPolicy, *, layer: str | None = None
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Apply a NaN/inf policy to a loss's inputs before it computes, without a device synchronization.

    - `"raise"`: `ValueError` naming the inputs with NaN or inf, their layer and shapes: at once on the CPU,
      from a later check on other devices (see `raise_if_invalid`); skipped while `torch.compile` traces
      and during CUDA-graph capture;
    - `"skip"`: non-finite inputs are replaced by zeros and the returned flag (a 0-d bool tensor, no device
      synchronization) is False; pass it to `zero_unless` so the batch gives a zero loss and zero gradient;
    - `"propagate"`: no check.

    Args:
        tensors: the inputs by argument name (all on one device).
        nan_policy: `"raise"`, `"skip"` or `"propagate"`.
        layer: the layer the inputs belong to, for messages.

    Returns:
        the (possibly zeroed) inputs and the flag, or None when no masking is needed.

    Raises:
        ValueError: for an unknown policy, inputs on several devices, or non-finite inputs (`"raise"`).
    """
    check_choice(nan_policy, "nan_policy", NAN_POLICIES)
    if not tensors:
        return {}, None
    device = next(iter(tensors.values())).device
    if nan_policy != "raise" and value_checks_run(device):
        poll_pending_checks()  # every check call reports the earlier checks' errors that are readable
    if nan_policy == "propagate" or (nan_policy == "raise" and not value_checks_run(device)):
        return dict(tensors), None
    check_same_device(tensors, layer=layer)
    flags = torch.stack([torch.isfinite(t).all() for t in tensors.values()])
    if nan_policy == "raise":
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise_if_invalid(flags, functools.partial(_non_finite_message, shapes, layer))
        return dict(tensors), None
    finite = flags.all()
    return {name: torch.where(finite, t, torch.zeros_like(t)) for name, t in tensors.items()}, finite


def _non_finite_message(shapes: Mapping[str, tuple[int, ...]], layer: str | None, finite: list[bool]) -> str | None:
    bad = [name for name, ok in zip(shapes, finite, strict=True) if not ok]
    if not bad:
        return None
    listed = ", ".join(f"{describe(name, layer)} {shape}" for name, shape in shapes.items())
    return (
        f"{' and '.join(describe(n, layer) for n in bad)} contain NaN or inf; pass nan_policy='skip' "
        f"to give such a batch zero loss, or nan_policy='propagate' to skip the check (inputs: {listed})"
    )


def zero_unless(finite: Tensor | None, value: Tensor) -> Tensor:
    """`value`, or zero (with a zero gradient) where `guard_finite` flagged a skipped batch."""
    return value if finite is None else torch.where(finite, value, torch.zeros_like(value))


def zero_with_grad(x: Tensor) -> Tensor:
    """A scalar zero connected to `x`, so backward() gives a zero gradient rather than an error.

    An empty sum, not `x.sum() * 0`: a large float16 sum overflows to inf, and inf · 0 is NaN.
    """
    return x.reshape(-1)[:0].sum().to(compute_dtype(x))


def check_choice(value: object, name: str, choices: Sequence[str]) -> None:
    """Raise `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"'{name}' must be one of {valid}; got {value!r}")


@contextmanager
def full_precision(*tensors: Tensor) -> Iterator[None]:
    """Disable autocast on the inputs' device types, so that reductions really run in float32/64.

    Entered once per public call, by its entry point (a public function of `functional` or `ops`, or a module's
    `forward`) around its whole computation, after its checks; the private cores below never enter it again
    (`tests/ops/test_checks_once.py` counts).
    """
    device_types = sorted({t.device.type for t in tensors if _has_autocast(t.device.type)})
    with _autocast_off(device_types):
        yield


@contextmanager
def _autocast_off(device_types: Sequence[str]) -> Iterator[None]:
    if not device_types:
        yield
        return
    with torch.autocast(device_type=device_types[0], enabled=False), _autocast_off(device_types[1:]):
        yield


def _has_autocast(device_type: str) -> bool:
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is None:  # torch < 2.4
        return device_type in ("cpu", "cuda")
    return bool(is_available(device_type))
