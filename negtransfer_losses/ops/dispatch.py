"""The backend dispatcher: which implementation runs an op, the functional (torch) path or a fused kernel.

`backend="auto"` takes a fused kernel only where it beats the torch path (`fused_wins`); `"torch"` and
`"triton"` force one. The environment variable `NEGTRANSFER_BACKEND` (`auto`, `torch` or `triton`)
replaces the default `"auto"`. Triton is imported only when a kernel runs; with `TRITON_INTERPRET=1` the
kernels also run, slowly, on CPU tensors (how the tests check them).
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from .._validation import check_choice, checks_values

Backend: TypeAlias = Literal["auto", "torch", "triton"]
BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compiling() -> bool:
    """Whether `torch.compile` is tracing: inductor fuses the torch path itself, so `auto` takes it."""
    return not checks_values()


def check_backend(backend: object) -> Backend:
    """Raise `ValueError` unless `backend` is a valid choice; returns it."""
    check_choice(backend, "backend", BACKENDS)
    return backend  # type: ignore[return-value]  # check_choice narrowed it


# The cost rule (docs/kernels.md, "When auto takes a kernel"). No kernel has been timed on a GPU yet, so each
# threshold sits where the paper analysis (FLOPs, bytes moved, tensor cores, launches) shows a clear win.
HALF_DTYPES = (torch.float16, torch.bfloat16)
GRAM_FLOAT32_MAX_WORK = 1 << 28  # groups · m · N²: float32 takes the kernel only while launches dominate
CHANNEL_MIN_ELEMENTS = 1 << 18  # elements of the student map: below it both paths are launch-bound
CHANNEL_MIN_PROGRAMS = 128  # samples × blocks of 128 positions: fewer would leave most SMs idle
MATCHING_MAX_TILE = 4096  # next_pow2(K) · next_pow2(M): a larger per-sample tile spills registers


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def fused_wins(op: str, *tensors: Tensor) -> bool:
    """Whether `auto` takes the fused kernel of `op` for these inputs (the cost rule of docs/kernels.md).

    - `"gram_row_cosines/batch"`, `"gram_row_cosines/sample"` (`tensors`: student, reference): fewer
      positions than rows per group (`N < m`: the `N×N` identity kernel, 4 launches per pass where the torch
      path makes about 34 forward and 30 backward, with the same arithmetic, ~24 m N²); float16/bfloat16 at
      any size (the kernel's dots run on tensor cores, the torch path upcasts copies to float32); float32
      while `groups · m · N²` ≤ `GRAM_FLOAT32_MAX_WORK` (launch-bound; beyond it both run the same float32
      arithmetic and cuBLAS's efficiency against Triton's has not been measured). `N ≥ m` takes torch (the
      tile kernel does ~1.7× the torch path's arithmetic).
    - `"aggregated_row_cosines"` (student, reference): at least `CHANNEL_MIN_ELEMENTS` elements and
      `CHANNEL_MIN_PROGRAMS` programs; any fused dtype (memory-bound: the kernel reads each map once where
      the torch path reads it about four times and writes a scaled copy).
    - `"distribution_matching"` (logits_a, logits_b): when a sample's `K × M` tile fits (`MATCHING_MAX_TILE`):
      one launch per pass against dozens of small ones.

    Unknown ops take torch.
    """
    if not tensors:
        return False
    student = tensors[0]
    if op.startswith("gram_row_cosines/"):
        if student.dim() < 2 or student.dtype not in FUSED_DTYPES:
            return False
        batch, channels = student.shape[0], student.shape[1]
        positions = math.prod(student.shape[2:])
        groups, rows = (1, batch * channels) if op.endswith("/batch") else (batch, channels)
        if not 0 < positions < rows:
            return False
        return student.dtype in HALF_DTYPES or groups * rows * positions * positions <= GRAM_FLOAT32_MAX_WORK
    if op == "aggregated_row_cosines":
        if student.dim() < 2:
            return False
        positions = math.prod(student.shape[2:])
        programs = student.shape[0] * -(-positions // 128)
        return student.numel() >= CHANNEL_MIN_ELEMENTS and programs >= CHANNEL_MIN_PROGRAMS
    if op == "distribution_matching" and len(tensors) >= 2 and student.dim() == 2 and tensors[1].dim() == 2:
        tile = _next_power_of_2(student.shape[1]) * _next_power_of_2(tensors[1].shape[1])
        return tile <= MATCHING_MAX_TILE
    return False


def resolve_backend(backend: Backend, op: str, *tensors: Tensor) -> Literal["torch", "triton"]:
    """The backend that runs `op` on `tensors`.

    `"auto"` (or `NEGTRANSFER_BACKEND`) picks Triton only for CUDA tensors of a fused dtype (float16,
    bfloat16, float32), outside `torch.compile`, with Triton importable and where `fused_wins`; `"triton"`
    raises where the kernel cannot run (no Triton, not CUDA without the interpreter, float64).
    """
    if backend == "auto":
        backend = os.environ.get("NEGTRANSFER_BACKEND", "auto")  # type: ignore[assignment]  # checked next
        check_choice(backend, "NEGTRANSFER_BACKEND", BACKENDS)
    check_backend(backend)
    fused_dtype = all(t.dtype in FUSED_DTYPES for t in tensors)
    if backend == "auto":
        on_cuda = all(t.is_cuda for t in tensors)
        if on_cuda and fused_dtype and not compiling() and triton_available() and fused_wins(op, *tensors):
            return "triton"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs Triton: pip install 'negtransfer-losses[triton]'")
        if not all(t.is_cuda for t in tensors) and not interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {', '.join(devices)}); set TRITON_INTERPRET=1 to run "
                f"the kernels in Triton's CPU interpreter, or use backend='torch'"
            )
        if not fused_dtype:
            dtypes = sorted({str(t.dtype) for t in tensors})
            raise ValueError(
                f"backend='triton' runs float16, bfloat16 and float32 only (got {', '.join(dtypes)}); float64 "
                f"would lose precision in the kernel: use backend='torch' (or 'auto', which takes it)"
            )
    return backend
