"""The backend dispatcher: which implementation runs an op, the functional (torch) path or a fused kernel.

`backend="auto"` takes a fused kernel only where it beats the torch path (`fused_wins`); `"torch"` and
`"triton"` force one. The environment variable `NEGTRANSFER_BACKEND` (`auto`, `torch` or `triton`)
replaces the default `"auto"`. Triton is imported only when a kernel runs; with `TRITON_INTERPRET=1` the
kernels also run, slowly, on CPU tensors (how the tests check them).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal, TypeAlias

import torch
from torch import Tensor

from .._validation import check_choice

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
    return bool(torch.compiler.is_compiling())


def check_backend(backend: object) -> Backend:
    """Raise `ValueError` unless `backend` is a valid choice; returns it."""
    check_choice(backend, "backend", BACKENDS)
    return backend  # type: ignore[return-value]  # check_choice narrowed it


def fused_wins(op: str, *tensors: Tensor) -> bool:
    """Whether `auto` takes the fused kernel of `op` for these inputs (the cost rule of docs/kernels.md).

    The kernels have not yet been measured on a GPU, so `auto` takes none of them; `backend="triton"`
    runs them on request.
    """
    del op, tensors
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
