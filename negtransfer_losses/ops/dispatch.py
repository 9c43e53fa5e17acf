"""The backend dispatcher: which implementation runs an op, the functional (torch) path or a fused kernel.

Every op of `negtransfer_losses.ops` with a kernel asks `default_dispatcher.choose(op, backend, tensors,
torch_path=..., kernel_path=...)`, where the two paths are callables of the same tensors with the same result:

- `backend="torch"` or `"triton"` forces a path; with `backend="auto"` the environment variable
  `NEGTRANSFER_BACKEND` (`auto`, `torch` or `triton`) may force one instead.
- `"auto"` takes the torch path unless the inputs are a *candidate* for the kernel (the prior, `is_candidate`:
  CUDA tensors of a fused dtype, Triton importable, `torch.compile` not tracing, and the cost rule
  `fused_wins`). The first time a candidate's key comes (op, dtypes, device, every dimension rounded up to a
  power of two, whether gradients are needed), both paths run on copies of the inputs, forward and
  backward, and the kernel is kept only if its value and gradients agree with the exact result within
  `TOLERANCES` and it is faster (`MeasureSettings.margin`, 0.95). Otherwise the torch path, with one
  `KernelRejectedWarning` naming the op, dtype, shape and why. The decision is kept for the process
  (`decisions()`; at most `MAX_DECISIONS` keys, the least recently used dropped first), and across processes
  when `NEGTRANSFER_DISPATCH_CACHE` names a file.

Everything the dispatcher keeps (how it measures, its decisions, what it read from the disk cache) belongs to
one `Dispatcher`; `default_dispatcher` is the one the ops use, and `decisions()`, `forget_decisions()`,
`is_candidate()` and `resolve_backend()` ask it. Its settings are replaced for a while by
`default_dispatcher.override(...)` (how the tests inject a timer, a prior and CPU candidates).

The measurement is the one host synchronization of `auto`, once per key. While `torch.compile` traces,
`auto` takes the torch path (inductor fuses it; a kernel launch would break the graph); during CUDA-graph
capture it never measures: a decision already made holds, otherwise the torch path. Under DDP every rank
decides for itself (no collective: ranks may meet keys in different orders). docs/kernels.md, "How auto
decides", says exactly what is measured.

Triton is imported only when a kernel runs; with `TRITON_INTERPRET=1` the kernels also run, slowly, on CPU
tensors (how the tests check them).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import statistics
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple, Protocol, TypeAlias

import torch
from torch import Tensor

from .._validation import capturing, check_choice, compiling
from .._version import __version__

__all__ = [
    "BACKENDS",
    "CACHE_VARIABLE",
    "MAX_DECISIONS",
    "TOLERANCES",
    "Backend",
    "Decision",
    "Dispatcher",
    "KernelRejectedWarning",
    "MeasureSettings",
    "Timer",
    "decisions",
    "default_dispatcher",
    "forget_decisions",
    "fused_wins",
    "interpreting",
    "is_candidate",
    "resolve_backend",
    "time_path",
    "triton_available",
]

Backend: TypeAlias = Literal["auto", "torch", "triton"]
Chosen: TypeAlias = Literal["torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CACHE_VARIABLE = "NEGTRANSFER_DISPATCH_CACHE"

# (relative, absolute) tolerance of a kernel's value and gradients against the exact result (the torch path
# in float64), by input dtype; gradients' absolute tolerance is relative to their largest magnitude. The
# same table as the kernels' tests (docs/kernels.md). float32 with TF32 allowed takes float16's row.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (2e-2, 1e-3),
}
# a kernel as accurate as the float32 torch path is never refused for rounding: at large sizes both round
# more than the table allows; the kernel passes while its excess is at most this multiple of the torch path's
ROUNDING_SLACK = 2.0


class KernelRejectedWarning(UserWarning):
    """`backend="auto"` measured a fused kernel and kept the torch path (wrong result, slower, or it raised)."""


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it); looked up once per process.

    Returns:
        True when `import triton` would find a package.
    """
    return _find_triton()


@functools.cache
def _find_triton() -> bool:
    # cached: `auto` asks on every call with CUDA inputs, and the lookup searches sys.path (~65 µs) until
    # Triton is imported
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`).

    Returns:
        True when the environment variable `TRITON_INTERPRET` is set to something other than `""` or `"0"`.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_backend(backend: object) -> Backend:
    """Raise `ValueError` unless `backend` is a valid choice; returns it."""
    check_choice(backend, "backend", BACKENDS)
    return backend  # type: ignore[return-value]  # check_choice narrowed it


# The cost rule (docs/kernels.md, "The prior"): which inputs are worth measuring. Each threshold sits where a
# paper analysis (FLOPs, bytes moved, tensor cores, launches) expects a win; the measurement has the last word.
HALF_DTYPES = (torch.float16, torch.bfloat16)
GRAM_FLOAT32_MAX_WORK = 1 << 28  # groups · m · N²: float32 is a candidate only while launches dominate
CHANNEL_MIN_ELEMENTS = 1 << 18  # elements of the student map: below it both paths are launch-bound
CHANNEL_MIN_PROGRAMS = 128  # samples × blocks of 128 positions: fewer would leave most SMs idle
MATCHING_MAX_TILE = 4096  # next_pow2(K) · next_pow2(M): a larger per-sample tile spills registers


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def fused_wins(op: str, *tensors: Tensor) -> bool:
    """Whether the cost rule of docs/kernels.md expects the fused kernel of `op` to win on these inputs.

    `op` is the kernel's name, optionally followed by `/` and its variant (what the decisions key on):

    - `"gram_row_cosines/batch"`, `"gram_row_cosines/sample"` (`tensors`: student, reference): fewer
      positions than rows per group (`N < m`: the `N×N` identity kernel, 4 launches per pass where the torch
      path makes about 34 forward and 30 backward, with the same arithmetic, ~24 m N²); float16/bfloat16 at
      any size (the kernel's dots run on tensor cores, the torch path upcasts copies to float32); float32
      while `groups · m · N²` ≤ `GRAM_FLOAT32_MAX_WORK` (launch-bound). `N ≥ m` takes torch (the tile kernel
      does ~1.7× the torch path's arithmetic).
    - `"aggregated_row_cosines[/mean|sum|max]"` (student, reference): at least `CHANNEL_MIN_ELEMENTS`
      elements and `CHANNEL_MIN_PROGRAMS` programs (memory-bound: the kernel reads each map once where the
      torch path reads it about four times and writes a scaled copy).
    - `"distribution_matching[/…]"` (logits_a, logits_b): when a sample's `K × M` tile fits
      (`MATCHING_MAX_TILE`): one launch per pass against dozens of small ones.

    Unknown ops take torch.

    Args:
        op: the kernel's name and variant.
        *tensors: the inputs, as the op passes them to `Dispatcher.choose`.

    Returns:
        True where the kernel is worth measuring.
    """
    if not tensors:
        return False
    name = op.split("/", 1)[0]
    student = tensors[0]
    if name == "gram_row_cosines":
        if student.dim() < 2 or student.dtype not in FUSED_DTYPES:
            return False
        batch, channels = student.shape[0], student.shape[1]
        positions = math.prod(student.shape[2:])
        groups, rows = (1, batch * channels) if op.endswith("/batch") else (batch, channels)
        if not 0 < positions < rows:
            return False
        return student.dtype in HALF_DTYPES or groups * rows * positions * positions <= GRAM_FLOAT32_MAX_WORK
    if name == "aggregated_row_cosines":
        if student.dim() < 2:
            return False
        positions = math.prod(student.shape[2:])
        programs = student.shape[0] * -(-positions // 128)
        return student.numel() >= CHANNEL_MIN_ELEMENTS and programs >= CHANNEL_MIN_PROGRAMS
    if name == "distribution_matching" and len(tensors) >= 2 and student.dim() == 2 and tensors[1].dim() == 2:
        tile = _next_power_of_2(student.shape[1]) * _next_power_of_2(tensors[1].shape[1])
        return tile <= MATCHING_MAX_TILE
    return False


# --- the measurement -----------------------------------------------------------------------------------


class Timer(Protocol):
    """`timer(kernel, torch_path, *, device) -> (kernel_ms, torch_ms)`: milliseconds per call of the kernel's
    run and of the torch path's (each a forward and backward on `device`), the kernel's timed first.

    An exception raised by the kernel's run keeps the torch path (`KernelRejectedWarning`); one raised by the
    torch path's reaches the caller.
    """

    def __call__(
        self, kernel: Callable[[], object], torch_path: Callable[[], object], /, *, device: torch.device
    ) -> tuple[float, float]: ...


def time_path(run: Callable[[], object], *, device: torch.device, warmup: int = 2, repeats: int = 5) -> float:
    """Milliseconds per call of `run`: the median of `repeats` calls after `warmup` untimed ones, timed with
    CUDA events on `device`'s current stream (wall clock elsewhere)."""
    for _ in range(warmup):
        run()
    times = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                stop = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
                run()
                stop.record()
                stop.synchronize()
                times.append(float(start.elapsed_time(stop)))
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - begin))
    return float(statistics.median(times))


@dataclass(frozen=True)
class MeasureSettings:
    """How a `Dispatcher` picks candidates and measures them; `Dispatcher.override` replaces fields for a while.

    Attributes:
        margin: the kernel is kept only if its time is at most `margin` × the torch path's.
        warmup: untimed calls of each path before timing (the first compiles the kernel).
        repeats: timed calls of each path; the median counts.
        timer: what times the two paths (`Timer`); None: `time_path` on each, the kernel first, with `warmup`
            and `repeats`.
        prior: the cost rule that picks candidates, `prior(op, *tensors) -> bool` (`fused_wins`).
        cpu_candidates: treat CPU tensors as candidates too (tests, with `TRITON_INTERPRET=1`).
        compiling: whether `torch.compile` is tracing (`compiling`); then no input is a candidate.
        capturing: whether a CUDA graph is being captured for work on the given devices (`capturing`); then
            nothing is measured.
    """

    margin: float = 0.95
    warmup: int = 2
    repeats: int = 5
    timer: Timer | None = None
    prior: Callable[..., bool] = field(default=fused_wins)
    cpu_candidates: bool = False
    compiling: Callable[[], bool] = field(default=compiling)
    capturing: Callable[..., bool] = field(default=capturing)


class Decision(NamedTuple):
    """What `auto` chose for one key, and why (the measured difference, both timings, or the exception)."""

    backend: Chosen
    reason: str


MAX_DECISIONS = 1024
"""How many decisions a `Dispatcher` keeps by default (one per key met). Past it the least recently used
decision is dropped; a key met again after that is read from the disk cache if there is one, else measured
again (with its warning again). Keys are power-of-two shape buckets, so a run meets a few dozen; the bound only
matters for a long run whose shapes keep changing."""

Key: TypeAlias = tuple[Any, ...]


def _forced(backend: Backend, tensors: Sequence[Tensor]) -> Chosen | None:
    """The forced path (`backend` or `NEGTRANSFER_BACKEND`), checked; None for `auto`."""
    if backend == "auto":
        backend = os.environ.get("NEGTRANSFER_BACKEND", "auto")  # type: ignore[assignment]  # checked next
        check_choice(backend, "NEGTRANSFER_BACKEND", BACKENDS)
    check_backend(backend)
    if backend == "auto":
        return None
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs Triton: pip install 'negtransfer-losses[triton]'")
        if not all(t.is_cuda for t in tensors) and not interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {', '.join(devices)}); set TRITON_INTERPRET=1 to run "
                f"the kernels in Triton's CPU interpreter, or use backend='torch'"
            )
        if not all(t.dtype in FUSED_DTYPES for t in tensors):
            dtypes = sorted({str(t.dtype) for t in tensors})
            raise ValueError(
                f"backend='triton' runs float16, bfloat16 and float32 only (got {', '.join(dtypes)}); float64 "
                f"would lose precision in the kernel: use backend='torch' (or 'auto', which takes it)"
            )
    return backend


def _needs_grad(tensors: Sequence[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _key(op: str, tensors: Sequence[Tensor], needs_grad: bool) -> tuple[Any, ...]:
    """(op, dtypes, device, shape bucket: every dimension rounded up to a power of two, gradients needed)."""
    return (
        op,
        tuple(str(t.dtype).removeprefix("torch.") for t in tensors),
        str(tensors[0].device),
        tuple(tuple(_next_power_of_2(d) for d in t.shape) for t in tensors),
        needs_grad,
    )


def _key_text(key: tuple[Any, ...]) -> str:
    op, dtypes, device, shapes, needs_grad = key
    buckets = " ".join("x".join(map(str, shape)) for shape in shapes)
    return f"{op} {','.join(dtypes)} {device} [{buckets}] {'grad' if needs_grad else 'no-grad'}"


def _outputs(result: Any) -> tuple[Tensor, ...]:
    """A path's result as a tuple of tensors (a dict in key order)."""
    if isinstance(result, Tensor):
        return (result,)
    if isinstance(result, Mapping):
        return tuple(result[k] for k in sorted(result))
    return tuple(result)


class _Run(NamedTuple):
    outputs: tuple[Tensor, ...]
    grads: tuple[Tensor, ...]


def _grad_outputs(outputs: Sequence[Tensor]) -> list[Tensor]:
    """A fixed random gradient for each output (so a backward that drops grad_output is caught)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(o.shape, generator=generator).to(device=o.device, dtype=o.dtype) for o in outputs]


def _runner(
    path: Callable[..., Any], tensors: Sequence[Tensor], needs_grad: bool, dtype: torch.dtype | None = None
) -> Callable[[], _Run]:
    """A call of `path` on detached copies of `tensors` (in `dtype` when given), forward and backward."""
    leaves = [
        t.detach().to(dtype=dtype or t.dtype, copy=True).requires_grad_(needs_grad and t.requires_grad) for t in tensors
    ]
    wanted = [leaf for leaf in leaves if leaf.requires_grad]
    grad_outputs: list[Tensor] = []

    def run() -> _Run:
        with torch.set_grad_enabled(needs_grad):
            outputs = _outputs(path(*leaves))
            if not wanted:
                return _Run(tuple(o.detach() for o in outputs), ())
            if not grad_outputs:
                grad_outputs.extend(_grad_outputs(outputs))
            grads = torch.autograd.grad(outputs, wanted, grad_outputs, allow_unused=True)
        filled = tuple(torch.zeros_like(w) if g is None else g for w, g in zip(wanted, grads, strict=True))
        return _Run(tuple(o.detach() for o in outputs), filled)

    return run


def _tolerance(tensors: Sequence[Tensor]) -> tuple[float, float]:
    """The loosest row of `TOLERANCES` among the inputs' dtypes (float32 with TF32 allowed: float16's)."""
    rows = []
    for t in tensors:
        dtype = t.dtype
        if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and t.is_cuda:
            dtype = torch.float16
        rows.append(TOLERANCES.get(dtype, TOLERANCES[torch.float32]))
    return max(r[0] for r in rows), max(r[1] for r in rows)


def _excess(got: _Run, exact: _Run, rtol: float, atol: float) -> tuple[float, float]:
    """`(excess, largest |difference|)`: the excess is the largest `|got − exact| / (atol' + rtol |exact|)`
    over values and gradients (`atol'` = atol × max(1, max |value|) for values, atol × max |gradient| for
    gradients); ≤ 1 is within tolerance. NaN matches NaN; a shape mismatch is infinite."""
    if len(got.outputs) != len(exact.outputs) or len(got.grads) != len(exact.grads):
        return math.inf, math.inf
    ratios, differences = [], []
    pairs = [(g, e, True) for g, e in zip(got.outputs, exact.outputs, strict=True)]
    pairs += [(g, e, False) for g, e in zip(got.grads, exact.grads, strict=True)]
    for g, e, is_value in pairs:
        if g.shape != e.shape:
            return math.inf, math.inf
        if e.numel() == 0:
            continue
        g64, e64 = g.detach().double(), e.detach().double().to(g.device)
        finite = torch.isfinite(e64)
        top = torch.where(finite, e64.abs(), 0.0).amax()
        scale = top.clamp_min(1.0) if is_value else top.clamp_min(torch.finfo(torch.float64).tiny)
        diff = (g64 - e64).abs()
        same = (g64 == e64) | (torch.isnan(g64) & torch.isnan(e64))
        diff = torch.where(same, 0.0, torch.where(torch.isnan(diff), math.inf, diff))
        ratios.append((diff / (atol * scale + rtol * e64.abs())).amax())
        differences.append(diff.amax())
    if not ratios:
        return 0.0, 0.0
    summary = torch.stack([torch.stack(ratios).amax(), torch.stack(differences).amax()]).cpu()
    return float(summary[0]), float(summary[1])


class _KernelRaised(Exception):
    """The kernel's run raised while timed (told apart from the torch path's exceptions)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def _attributed(run: Callable[[], object]) -> Callable[[], object]:
    """`run`, whose exceptions come out as `_KernelRaised`."""

    def kernel() -> object:
        try:
            return run()
        except Exception as error:
            raise _KernelRaised(error) from error

    return kernel


def _fingerprint(device: torch.device) -> str:
    """The device's name and the library, torch and Triton versions: a decision holds only for all four."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    triton_version = "none"
    if triton_available():
        from importlib.metadata import PackageNotFoundError, version

        try:
            triton_version = version("triton")
        except PackageNotFoundError:  # pragma: no cover - an unusual install
            triton_version = "unknown"
    return f"{name}|negtransfer-losses {__version__}|torch {torch.__version__}|triton {triton_version}"


def _disk_entry(key: Key, tensors: Sequence[Tensor]) -> str:
    op, dtypes, _, shapes, needs_grad = key  # the device is in the fingerprint, by name
    return json.dumps([_fingerprint(tensors[0].device), op, dtypes, shapes, needs_grad])


# --- the dispatcher --------------------------------------------------------------------------------------


class Dispatcher:
    """The backend choice of `backend="auto"`, and everything it keeps: how it measures (`settings`), its
    decisions (at most `max_decisions`, the least recently used dropped first) and the decisions read from the
    opt-in disk cache (`NEGTRANSFER_DISPATCH_CACHE`). Thread-safe: a key is measured once.

    The ops use `default_dispatcher`; a new one starts with no decision.

    Args:
        settings: how candidates are picked and measured (`MeasureSettings()` when None).
        max_decisions: how many decisions are kept (`MAX_DECISIONS`).

    Raises:
        ValueError: `max_decisions` is not a positive int.
    """

    def __init__(self, settings: MeasureSettings | None = None, *, max_decisions: int = MAX_DECISIONS) -> None:
        if isinstance(max_decisions, bool) or not isinstance(max_decisions, int) or max_decisions < 1:
            raise ValueError(f"'max_decisions' must be a positive int, got {max_decisions!r}")
        self.settings = settings if settings is not None else MeasureSettings()
        self.max_decisions = max_decisions
        self._decisions: OrderedDict[Key, Decision] = OrderedDict()  # least recently used first
        self._disk = _DiskCache()
        self._lock = threading.RLock()

    def decisions(self) -> dict[str, Decision]:
        """Every decision kept (measured, or read from the disk cache), by key, least recently used first."""
        with self._lock:
            return {_key_text(key): decision for key, decision in self._decisions.items()}

    def forget_decisions(self) -> None:
        """Drop the decisions kept (the disk cache's file, if any, is left as it is; it is read again)."""
        with self._lock:
            self._decisions.clear()
            self._disk.clear()

    @contextmanager
    def override(self, **changes: Any) -> Iterator[MeasureSettings]:
        """Within the block, measure with `changes` (fields of `MeasureSettings`); the settings are back after.

        The decisions are kept as they are: `forget_decisions()` first where the block must measure afresh.

        Yields:
            the settings in force within the block.

        Raises:
            TypeError: a change names no field of `MeasureSettings`.
        """
        with self._lock:
            saved = self.settings
            self.settings = replace(saved, **changes)
        try:
            yield self.settings
        finally:
            with self._lock:
                self.settings = saved

    def is_candidate(self, op: str, tensors: Sequence[Tensor]) -> bool:
        """The prior: whether `auto` may take the kernel of `op` for `tensors` (then it measures, once per key).

        CUDA tensors (CPU ones too with `settings.cpu_candidates`) of float16, bfloat16 or float32 (never
        float64), Triton importable, `torch.compile` not tracing, and `settings.prior` (the cost rule).
        """
        settings = self.settings
        if settings.compiling() or not tensors:
            return False
        on_device = all(t.is_cuda or (settings.cpu_candidates and t.device.type == "cpu") for t in tensors)
        if not on_device or not all(t.dtype in FUSED_DTYPES for t in tensors) or not triton_available():
            return False
        return bool(settings.prior(op, *tensors))

    def resolve(self, backend: Backend, op: str, *tensors: Tensor) -> Chosen:
        """The path `choose` would take now, without measuring (see `resolve_backend`)."""
        forced = _forced(backend, tensors)
        if forced is not None:
            return forced
        if not self.is_candidate(op, tensors):
            return "torch"
        decision = self._recall(_key(op, tensors, _needs_grad(tensors)))
        return "torch" if decision is None else decision.backend

    def choose(
        self,
        op: str,
        backend: Backend,
        tensors: Sequence[Tensor],
        *,
        torch_path: Callable[..., Any],
        kernel_path: Callable[..., Any],
    ) -> Chosen:
        """The path that runs `op` on `tensors`: `"torch"` or `"triton"` (see the module's docstring).

        Args:
            op: the kernel's name and variant (`"gram_row_cosines/batch"`, `"aggregated_row_cosines/max"`…): the
                first part of the decision's key.
            backend: `"auto"`, `"torch"` or `"triton"`.
            tensors: the inputs both paths take, positionally.
            torch_path: the functional path, `torch_path(*tensors)`: a tensor, a tuple or a dict of tensors.
            kernel_path: the fused path with the same contract.

        Returns:
            `"torch"` or `"triton"`; the caller runs that path.

        Raises:
            ValueError: as `resolve_backend`.
        """
        forced = _forced(backend, tensors)
        if forced is not None:
            return forced
        if not self.is_candidate(op, tensors):
            return "torch"
        needs_grad = _needs_grad(tensors)
        key = _key(op, tensors, needs_grad)
        decision = self._recall(key)
        if decision is not None:
            return decision.backend
        if self.settings.capturing(*(t.device for t in tensors)):  # a captured graph replays device work only
            return "torch"
        with self._lock:
            decision = self._recall(key) or self._disk.read(key, tensors)
            if decision is None:
                decision = self._measure(op, tensors, needs_grad, torch_path, kernel_path)
                self._disk.write(key, tensors, decision)
                if decision.backend == "torch":
                    shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
                    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))
                    warnings.warn(
                        f"backend='auto' keeps the torch path for {op} ({dtypes}, shape {shapes}) on "
                        f"{tensors[0].device}: {decision.reason}; backend='triton' forces the kernel",
                        KernelRejectedWarning,
                        stacklevel=3,
                    )
            self._keep(key, decision)
        return decision.backend

    def _recall(self, key: Key) -> Decision | None:
        """The decision kept for `key` (now the most recently used), or None."""
        with self._lock:
            decision = self._decisions.get(key)
            if decision is not None:
                self._decisions.move_to_end(key)
            return decision

    def _keep(self, key: Key, decision: Decision) -> None:
        """Keep `decision` for `key`, dropping the least recently used past `max_decisions`."""
        with self._lock:
            self._decisions[key] = decision
            self._decisions.move_to_end(key)
            while len(self._decisions) > self.max_decisions:
                self._decisions.popitem(last=False)

    def _measure(
        self,
        op: str,
        tensors: Sequence[Tensor],
        needs_grad: bool,
        torch_path: Callable[..., Any],
        kernel_path: Callable[..., Any],
    ) -> Decision:
        """Check the kernel against the exact result and time both paths (the one host synchronization)."""
        settings = self.settings
        device = tensors[0].device
        kernel_run = _runner(kernel_path, tensors, needs_grad)
        torch_run = _runner(torch_path, tensors, needs_grad)
        try:
            kernel = kernel_run()
        except Exception as error:  # a compile error, a launch past a limit, out of memory: the torch path runs
            return Decision("torch", f"the kernel raised {type(error).__name__}: {error}")
        try:
            exact = _runner(torch_path, tensors, needs_grad, torch.float64)()
        except Exception as error:  # e.g. no memory for float64 copies: unchecked kernels are not taken
            return Decision("torch", f"the kernel could not be checked: the float64 reference raised {error!r}")
        rtol, atol = _tolerance(tensors)
        kernel_excess, kernel_difference = _excess(kernel, exact, rtol, atol)
        torch_excess, _ = _excess(torch_run(), exact, rtol, atol)
        if not kernel_excess <= max(1.0, ROUNDING_SLACK * torch_excess):
            return Decision(
                "torch",
                f"the kernel's value or gradient differs from the exact result by up to {kernel_difference:.3g} "
                f"({kernel_excess:.3g}× the tolerance: rtol {rtol:g}, atol {atol:g}; the torch path's "
                f"{torch_excess:.3g}×)",
            )
        timer = settings.timer or functools.partial(_time_both, warmup=settings.warmup, repeats=settings.repeats)
        try:
            kernel_ms, torch_ms = timer(_attributed(kernel_run), torch_run, device=device)
        except _KernelRaised as raised:
            return Decision("torch", f"the kernel raised {type(raised.error).__name__} while timed: {raised.error}")
        kernel_ms, torch_ms = float(kernel_ms), float(torch_ms)
        timings = f"kernel {kernel_ms:.4g} ms, torch {torch_ms:.4g} ms per forward and backward"
        if kernel_ms <= settings.margin * torch_ms:
            return Decision("triton", timings)
        return Decision("torch", f"the kernel is not faster by the margin {settings.margin:g} ({timings})")

    # --- the disk cache (opt-in: NEGTRANSFER_DISPATCH_CACHE=<path>) -------------------------------------


class _DiskCache:
    """The opt-in cache file of decisions (`NEGTRANSFER_DISPATCH_CACHE`), as read from disk, by path."""

    def __init__(self) -> None:
        self._files: dict[str, dict[str, Any]] = {}  # path -> {fingerprint|key: decision}

    def clear(self) -> None:
        """Forget what was read (the file itself is left alone)."""
        self._files.clear()

    def read(self, key: Key, tensors: Sequence[Tensor]) -> Decision | None:
        """The decision the cache file holds for the key on this device and versions, or None."""
        path = os.environ.get(CACHE_VARIABLE, "")
        if not path:
            return None
        if path not in self._files:
            try:
                with open(path, encoding="utf-8") as file:
                    loaded = json.load(file)
                self._files[path] = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self._files[path] = {}
        entry = self._files[path].get(_disk_entry(key, tensors))
        if not isinstance(entry, dict) or entry.get("backend") not in ("torch", "triton"):
            return None
        return Decision(entry["backend"], f"{entry.get('reason', '')} (from {path})")

    def write(self, key: Key, tensors: Sequence[Tensor], decision: Decision) -> None:
        """Add the decision to the cache file (read again first, replaced atomically: concurrent ranks may lose
        an entry to each other, never corrupt the file)."""
        path = os.environ.get(CACHE_VARIABLE, "")
        if not path:
            return
        try:
            with open(path, encoding="utf-8") as file:
                stored = json.load(file)
            if not isinstance(stored, dict):
                stored = {}
        except (OSError, ValueError):
            stored = {}
        stored[_disk_entry(key, tensors)] = {"backend": decision.backend, "reason": decision.reason}
        self._files[path] = stored
        temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(stored, file, indent=1, sort_keys=True)
            os.replace(temporary, path)
        except OSError as error:
            warnings.warn(
                f"{CACHE_VARIABLE}={path!r}: the dispatch decision could not be saved ({error})", stacklevel=4
            )


def _time_both(
    kernel: Callable[[], object], torch_path: Callable[[], object], *, device: torch.device, warmup: int, repeats: int
) -> tuple[float, float]:
    """The default `Timer`: `time_path` on the kernel's run, then on the torch path's."""
    return (
        time_path(kernel, device=device, warmup=warmup, repeats=repeats),
        time_path(torch_path, device=device, warmup=warmup, repeats=repeats),
    )


default_dispatcher = Dispatcher()
"""The dispatcher the ops use (the owner of the process's decisions); the functions below ask it."""


def decisions() -> dict[str, Decision]:
    """Every decision `backend="auto"` has made (or read from the disk cache) in this process, by key.

    A key reads `op dtypes device [shape buckets] grad|no-grad`, every dimension rounded up to a power of two;
    each `Decision` says the path taken (`"torch"` or `"triton"`) and why (both timings, the difference from
    the exact result, or the kernel's exception). At most `MAX_DECISIONS` are kept, least recently used first.

    Returns:
        `{key: Decision}`, a copy (docs/kernels.md, "Cache", shows one).
    """
    return default_dispatcher.decisions()


def forget_decisions() -> None:
    """Drop the decisions `backend="auto"` has kept in this process, so that each key is measured again (or read
    again from the disk cache `NEGTRANSFER_DISPATCH_CACHE`, whose file is left as it is)."""
    default_dispatcher.forget_decisions()


def is_candidate(op: str, tensors: Sequence[Tensor]) -> bool:
    """The prior: whether `auto` may take the kernel of `op` for `tensors` (then it measures, once per key).

    CUDA tensors of float16, bfloat16 or float32 (never float64), Triton importable, `torch.compile` not tracing,
    and the cost rule (`fused_wins`); `default_dispatcher`'s settings decide.
    """
    return default_dispatcher.is_candidate(op, tensors)


def resolve_backend(backend: Backend, op: str, *tensors: Tensor) -> Chosen:
    """The path `backend` takes now for `op`, without measuring: the forced one, or for `"auto"` the decision
    already made for this key (torch when there is none, or when the inputs are no candidate).

    Args:
        backend: `"auto"`, `"torch"` or `"triton"` (`NEGTRANSFER_BACKEND` replaces `"auto"`).
        op: the op's name and variant, e.g. `"gram_row_cosines/batch"`.
        tensors: the op's input tensors (the key is built from their dtypes, device and shapes).

    Returns:
        `"torch"` or `"triton"`.

    Raises:
        ValueError: for an invalid `backend` or `NEGTRANSFER_BACKEND`, and where a forced `"triton"` cannot run
            (no Triton, not CUDA without the interpreter, float64).
    """
    return default_dispatcher.resolve(backend, op, *tensors)
