"""The cost rule of `backend="auto"` (`ops.dispatch.fused_wins`, docs/kernels.md), on shapes only: meta
tensors, so the paper's sizes and larger cost no memory."""

from __future__ import annotations

import pytest
import torch

from negtransfer_losses.ops import dispatch
from negtransfer_losses.ops.dispatch import fused_wins


def maps(*shape: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(shape, dtype=dtype, device="meta"), torch.empty(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize(
    ("shape", "dtype", "scope", "expected"),
    [
        ((30, 512, 8, 8), torch.bfloat16, "batch", True),  # the paper's setting: identity kernel, tensor cores
        ((30, 512, 8, 8), torch.float16, "batch", True),
        ((30, 512, 8, 8), torch.float32, "batch", True),  # launch-bound: 8 launches against about 64
        ((64, 256, 28, 28), torch.float32, "batch", False),  # m N² = 10¹⁰: same float32 arithmetic, unmeasured
        ((64, 256, 28, 28), torch.bfloat16, "batch", True),  # N = 784 < m = 16,384
        ((64, 256, 28, 28), torch.bfloat16, "sample", False),  # N ≥ m: the tile kernel does more arithmetic
        ((64, 512, 4, 4), torch.bfloat16, "sample", True),  # N = 16 < m = 512, per sample
        ((2, 8, 2, 2), torch.bfloat16, "batch", True),  # fewer launches
        ((30, 512, 8, 8), torch.float64, "batch", False),
        ((0, 512, 8, 8), torch.bfloat16, "batch", False),
    ],
)
def test_gram_rule(shape: tuple[int, ...], dtype: torch.dtype, scope: str, expected: bool) -> None:
    assert fused_wins(f"gram_row_cosines/{scope}", *maps(*shape, dtype=dtype)) is expected


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((64, 256, 28, 28), True),  # memory-bound: one read instead of about four
        ((2, 3, 4, 4), False),  # launch-bound
        ((4, 4096, 8, 8), False),  # 4 programs: most SMs idle
        ((0, 4, 8, 8), False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_rule(shape: tuple[int, ...], expected: bool, dtype: torch.dtype) -> None:
    assert fused_wins("aggregated_row_cosines", *maps(*shape, dtype=dtype)) is expected


def test_distribution_matching_rule() -> None:
    def heads(n: int, k: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(n, k, device="meta"), torch.empty(n, m, device="meta")

    assert fused_wins("distribution_matching", *heads(256, 7, 17))
    assert fused_wins("distribution_matching", *heads(65_536, 7, 17))
    assert not fused_wins("distribution_matching", *heads(256, 1000, 300))  # the tile would spill
    assert not fused_wins("unknown_op", *heads(256, 7, 17)) and not fused_wins("distribution_matching")


def test_auto_takes_torch_off_cuda_inside_compile_and_for_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.empty(30, 512, 8, 8, dtype=torch.bfloat16, device="meta")
    monkeypatch.delenv("NEGTRANSFER_BACKEND", raising=False)
    assert dispatch.resolve_backend("auto", "gram_row_cosines/batch", big, big) == "torch"  # not CUDA
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.resolve_backend("auto", "gram_row_cosines/batch", big, big) == "triton"
    wide = big.double()
    assert dispatch.resolve_backend("auto", "gram_row_cosines/batch", wide, wide) == "torch"
    monkeypatch.setattr(dispatch, "compiling", lambda: True)
    assert dispatch.resolve_backend("auto", "gram_row_cosines/batch", big, big) == "torch"
