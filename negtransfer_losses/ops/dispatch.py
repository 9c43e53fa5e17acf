"""The backend dispatcher: which implementation runs an op, the functional (torch) path or a fused kernel.

Every call site of `negtransfer_losses.ops` asks `choose(op, backend, tensors, torch_path=..., kernel_path=...)`,
where the two paths are callables of the same tensors with the same result:

- `backend="torch"` or `"triton"` forces a path; with `backend="auto"` the environment variable
  `NEGTRANSFER_BACKEND` (`auto`, `torch` or `triton`) may force one instead.
- `"auto"` takes the torch path unless the inputs are a *candidate* for the kernel (the prior, `is_candidate`:
  CUDA tensors of a fused dtype, Triton importable, `torch.compile` not tracing, and the cost rule
  `fused_wins`). The first time a candidate's key comes (op, dtypes, device, every dimension rounded up to a
  power of two, whether gradients are needed), both paths run on copies of the inputs, forward and
  backward, and the kernel is kept only if its value and gradients agree with the exact result within
  `TOLERANCES` and it is faster (`settings.margin`, 0.95). Otherwise the torch path, with one
  `KernelRejectedWarning` naming the op, dtype, shape and why. The decision is kept for the process
  (`decisions()`), and across processes when `NEGTRANSFER_DISPATCH_CACHE` names a file.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor

from .._validation import check_choice, checks_values

__all__ = [
    "BACKENDS",
    "CACHE_VARIABLE",
    "TOLERANCES",
    "Backend",
    "Decision",
    "KernelRejectedWarning",
    "MeasureSettings",
    "choose",
    "decisions",
    "forget_decisions",
    "fused_wins",
    "interpreting",
    "is_candidate",
    "resolve_backend",
    "settings",
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


def compiling() -> bool:
    """Whether `torch.compile` is tracing: inductor fuses the torch path itself, so `auto` takes it."""
    return not checks_values()


def capturing(tensors: Sequence[Tensor]) -> bool:
    """Whether a CUDA graph is being captured on the current stream (then `auto` never measures)."""
    return any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing()


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

    `op` is the kernel's name, optionally followed by `/` and its variant (what `choose` keys on):

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
        *tensors: the inputs, as the call site passes them to `choose`.

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

Timer: TypeAlias = Callable[..., float]
"""`timer(run, *, path, device) -> milliseconds`: the time of one call of `run` (forward and backward of
`path`, `"torch"` or `"triton"`, on `device`)."""


def time_path(run: Callable[[], object], *, path: str, device: torch.device) -> float:
    """Milliseconds per call of `run`: the median of `settings.repeats` calls after `settings.warmup`, timed
    with CUDA events on `device`'s current stream (wall clock elsewhere)."""
    del path
    for _ in range(settings.warmup):
        run()
    times = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            for _ in range(settings.repeats):
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                stop = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
                run()
                stop.record()
                stop.synchronize()
                times.append(float(start.elapsed_time(stop)))
    else:
        for _ in range(settings.repeats):
            begin = time.perf_counter()
            run()
            times.append(1e3 * (time.perf_counter() - begin))
    return float(statistics.median(times))


@dataclass
class MeasureSettings:
    """How `auto` measures; `settings` is the one instance (tests replace its fields through monkeypatch).

    Attributes:
        margin: the kernel is kept only if its time is at most `margin` × the torch path's.
        warmup: untimed calls of each path before timing (the first compiles the kernel).
        repeats: timed calls of each path; the median counts.
        timer: what times a path (`time_path`: CUDA events).
        cpu_candidates: treat CPU tensors as candidates (tests, with `TRITON_INTERPRET=1`).
        prior: the cost rule that picks candidates (`fused_wins`).
    """

    margin: float = 0.95
    warmup: int = 2
    repeats: int = 5
    timer: Timer = field(default=time_path)
    cpu_candidates: bool = False
    prior: Callable[..., bool] = field(default=fused_wins)


settings = MeasureSettings()


class Decision(NamedTuple):
    """What `auto` chose for one key, and why (the measured difference, both timings, or the exception)."""

    backend: Chosen
    reason: str


_decisions: dict[tuple[Any, ...], Decision] = {}
_lock = threading.RLock()
_disk: dict[str, dict[str, dict[str, str]]] = {}  # path -> {fingerprint|key: decision} as read from disk


def decisions() -> dict[str, Decision]:
    """Every decision `auto` has made (or read from the disk cache) in this process, by key."""
    with _lock:
        return {_key_text(key): decision for key, decision in _decisions.items()}


def forget_decisions() -> None:
    """Drop the decisions kept in this process (the disk cache, if any, is left as it is)."""
    with _lock:
        _decisions.clear()
        _disk.clear()


def is_candidate(op: str, tensors: Sequence[Tensor]) -> bool:
    """The prior: whether `auto` may take the kernel of `op` for `tensors` (then it measures, once per key).

    CUDA tensors (CPU ones too with `settings.cpu_candidates`) of float16, bfloat16 or float32 (never
    float64), Triton importable, `torch.compile` not tracing, and `settings.prior` (the cost rule).
    """
    if compiling() or not tensors:
        return False
    on_device = all(t.is_cuda or (settings.cpu_candidates and t.device.type == "cpu") for t in tensors)
    if not on_device or not all(t.dtype in FUSED_DTYPES for t in tensors) or not triton_available():
        return False
    return bool(settings.prior(op, *tensors))


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


def resolve_backend(backend: Backend, op: str, *tensors: Tensor) -> Chosen:
    """The path `choose` would take now, without measuring: the forced one, or for `"auto"` the decision
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
    forced = _forced(backend, tensors)
    if forced is not None:
        return forced
    if not is_candidate(op, tensors):
        return "torch"
    decision = _decisions.get(_key(op, tensors, _needs_grad(tensors)))
    return "torch" if decision is None else decision.backend


def choose(
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
    if not is_candidate(op, tensors):
        return "torch"
    needs_grad = _needs_grad(tensors)
    key = _key(op, tensors, needs_grad)
    decision = _decisions.get(key)
    if decision is not None:
        return decision.backend
    if capturing(tensors):  # a captured graph replays device work only: never measure inside one
        return "torch"
    with _lock:
        decision = _decisions.get(key) or _read_disk(key, tensors)
        if decision is None:
            decision = _measure(op, tensors, needs_grad, torch_path, kernel_path)
            _write_disk(key, tensors, decision)
            if decision.backend == "torch":
                shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
                dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors}))
                warnings.warn(
                    f"backend='auto' keeps the torch path for {op} ({dtypes}, shape {shapes}) on "
                    f"{tensors[0].device}: {decision.reason}; backend='triton' forces the kernel",
                    KernelRejectedWarning,
                    stacklevel=3,
                )
        _decisions[key] = decision
    return decision.backend


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


def _measure(
    op: str,
    tensors: Sequence[Tensor],
    needs_grad: bool,
    torch_path: Callable[..., Any],
    kernel_path: Callable[..., Any],
) -> Decision:
    """Check the kernel against the exact result and time both paths (the one host synchronization)."""
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
    try:
        kernel_ms = float(settings.timer(kernel_run, path="triton", device=device))
    except Exception as error:
        return Decision("torch", f"the kernel raised {type(error).__name__} while timed: {error}")
    torch_ms = float(settings.timer(torch_run, path="torch", device=device))
    timings = f"kernel {kernel_ms:.4g} ms, torch {torch_ms:.4g} ms per forward and backward"
    if kernel_ms <= settings.margin * torch_ms:
        return Decision("triton", timings)
    return Decision("torch", f"the kernel is not faster by the margin {settings.margin:g} ({timings})")


# --- the disk cache (opt-in: NEGTRANSFER_DISPATCH_CACHE=<path>) -----------------------------------------


def _fingerprint(device: torch.device) -> str:
    """The device's name and the library, torch and Triton versions: a decision holds only for all four."""
    from .. import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    triton_version = "none"
    if triton_available():
        from importlib.metadata import PackageNotFoundError, version

        try:
            triton_version = version("triton")
        except PackageNotFoundError:  # pragma: no cover - an unusual install
            triton_version = "unknown"
    return f"{name}|negtransfer-losses {__version__}|torch {torch.__version__}|triton {triton_version}"


def _disk_entry(key: tuple[Any, ...], tensors: Sequence[Tensor]) -> str:
    op, dtypes, _, shapes, needs_grad = key  # the device is in the fingerprint, by name
    return json.dumps([_fingerprint(tensors[0].device), op, dtypes, shapes, needs_grad])


def _read_disk(key: tuple[Any, ...], tensors: Sequence[Tensor]) -> Decision | None:
    path = os.environ.get(CACHE_VARIABLE, "")
    if not path:
        return None
    if path not in _disk:
        try:
            with open(path, encoding="utf-8") as file:
                loaded = json.load(file)
            _disk[path] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            _disk[path] = {}
    entry = _disk[path].get(_disk_entry(key, tensors))
    if not isinstance(entry, dict) or entry.get("backend") not in ("torch", "triton"):
        return None
    return Decision(entry["backend"], f"{entry.get('reason', '')} (from {path})")  # type: ignore[arg-type]


def _write_disk(key: tuple[Any, ...], tensors: Sequence[Tensor], decision: Decision) -> None:
    """Add the decision to the cache file (read again first, replaced atomically: concurrent ranks may lose an
    entry to each other, never corrupt the file)."""
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
    _disk[path] = stored
    temporary = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(stored, file, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        warnings.warn(f"{CACHE_VARIABLE}={path!r}: the dispatch decision could not be saved ({error})", stacklevel=4)
