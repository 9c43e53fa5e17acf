"""Pieces shared by the Triton kernels: dot precision, power-of-two scaling, launch-grid limits.

Imported only when a kernel runs (it imports Triton).

- Dot operands: float16/bfloat16 tiles go to `tl.dot` in their own dtype (tensor cores, float32
  accumulation); float32 tiles use TF32 only when `torch.backends.cuda.matmul.allow_tf32` is True (what
  torch's own matmuls do), otherwise `input_precision="ieee"` (exact float32 FMA). Triton's CPU
  interpreter multiplies bfloat16 dot operands as raw 16-bit integers (Triton 3.9), so under
  `TRITON_INTERPRET=1` bfloat16 tiles are widened to float32 before the dot; compiled kernels keep them.
- Scaling: `x · 2^-e` with `2^e > max|x| ≥ 2^(e-1)`, `e ≥ 0` (`functional.similarity.unit_scale`, the
  package's one convention), the exponent read from the float's bits (exact), so float32 inputs near 1e30
  give finite squares; norms are floored at `eps` scaled with the inputs (`scaled_floor`, as
  `functional.similarity.scaled_floor`), so `eps` means the inputs' own units on both paths.
- Grids: every kernel launches a one-dimensional grid (CUDA allows 2³¹ − 1 programs along x, 65,535 along
  y and z); `check_grid` raises before a launch that would exceed it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..functional._core import unit_scale as _unit_scale
from .dispatch import interpreting

MAX_GRID_X = 2**31 - 1


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` for float32 tiles: `"tf32"` where torch allows it for matmuls, else `"ieee"`."""
    del dtype
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreting() else "ieee"


def widen_dot_operands(dtype: torch.dtype) -> bool:
    """Whether 16-bit tiles are widened to float32 before `tl.dot` (only bfloat16 in the interpreter)."""
    return dtype == torch.bfloat16 and interpreting()


def check_grid(programs: int, what: str) -> tuple[int]:
    """The one-dimensional grid `(programs,)`, or `ValueError` past CUDA's limit along x."""
    if programs > MAX_GRID_X:
        raise ValueError(
            f"{what}: the launch needs {programs} programs, more than CUDA's {MAX_GRID_X} along the grid's x "
            f"dimension; split the batch or use backend='torch'"
        )
    return (max(programs, 1),)


@triton.jit
def frexp_exponent(x_max):  # type: ignore[no-untyped-def]  # a Triton device function
    """`e ≥ 0` with `2^e > x_max` (`torch.frexp`'s exponent, floored at 0), from the bits of a float32 ≥ 0;
    0 for inf and NaN, as `torch.frexp` gives (so one non-finite value does not rescale the rest to zero)."""
    field = (x_max.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.where(field == 255, 0, tl.maximum(field - 126, 0))


@triton.jit  # type: ignore[untyped-decorator]
def program_block(pid, blocks, size, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]  # a Triton device function
    """`(group, offsets, mask)` of a program of a grid over groups × `blocks` blocks of `BLOCK` of `size` items."""
    offs = (pid % blocks) * BLOCK + tl.arange(0, BLOCK)
    return (pid // blocks).to(tl.int64), offs, offs < size


@triton.jit
def pow2_neg(e):  # type: ignore[no-untyped-def]  # a Triton device function
    """`2^-e` as float32 for an int32 `0 ≤ e ≤ 254` (exactly; two factors keep each exponent field valid)."""
    half = e // 2
    low = ((127 - half) << 23).to(tl.float32, bitcast=True)
    high = ((127 - (e - half)) << 23).to(tl.float32, bitcast=True)
    return low * high


@triton.jit
def pow2_signed(e):  # type: ignore[no-untyped-def]  # a Triton device function
    """`2^e` as float32 for an int32 `-252 ≤ e ≤ 254` (exactly, as two factors of valid exponent fields)."""
    half = e // 2
    low = ((127 + half) << 23).to(tl.float32, bitcast=True)
    high = ((127 + (e - half)) << 23).to(tl.float32, bitcast=True)
    return low * high


@triton.jit  # type: ignore[untyped-decorator]
def scaled_floor(eps, factor, DEGREE: tl.constexpr):  # type: ignore[no-untyped-def]  # a Triton device function
    """`functional.similarity.scaled_floor` in float32: `eps · factor^DEGREE`, at least `2^-63` (the square root of
    float32's smallest normal number, `functional.similarity.floor_minimum`)."""
    floor = eps * factor
    if DEGREE == 2:
        floor = floor * factor
    return tl.maximum(floor, 1.0842021724855044e-19)


def unit_scale(x: torch.Tensor) -> torch.Tensor:
    """`functional.similarity.unit_scale` in float32: the one scale convention, for the tile kernel's inputs."""
    return _unit_scale(x, dtype=torch.float32)
