"""The tiled Gram row-cosine kernel (Triton interpreter on CPU) against the float64 functional path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import negtransfer_losses.functional as ntf
from negtransfer_losses import ops

pytest.importorskip("triton", reason="the kernels need Triton: pip install 'negtransfer-losses[triton]'")

# (shape, scope): odd sizes; several row tiles (> 16 rows) and position tiles (> 32 positions)
CASES = [
    ((2, 3, 37, 5), "sample"),
    ((3, 20, 7), "sample"),
    ((2, 18, 40), "sample"),
    ((2, 5, 6), "batch"),
    ((3, 7, 2, 3), "batch"),
    ((4, 6), "batch"),
    ((3, 50, 9), "batch"),  # identity kernel, three row splits
    ((2, 40, 70), "batch"),  # identity kernel, 2×2 tiles of P, A, Bᵣ
    ((2, 40, 3, 3), "sample"),  # identity kernel per sample (N < C)
]
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (2e-2, 1e-3)}


def run(fn, s: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    leaf = s.detach().clone().requires_grad_(True)
    cosines = fn(leaf, r)
    (grad,) = torch.autograd.grad(3.7 * cosines.abs().mean().square(), leaf)
    return cosines.detach(), grad


@pytest.mark.parametrize(("shape", "scope"), CASES, ids=[f"{scope}-{'x'.join(map(str, s))}" for s, scope in CASES])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_kernel_matches_float64_reference(shape: tuple[int, ...], scope: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g)
    r = (0.5 * s + torch.randn(*shape, generator=g)).to(dtype)
    s = s.to(dtype)
    value, grad = run(lambda a, b: ops.gram_row_cosines(a, b, gram_scope=scope, backend="triton"), s, r)  # type: ignore[arg-type]
    expected, expected_grad = run(lambda a, b: ntf.gram_row_cosines(a, b, gram_scope=scope), s.double(), r.double())  # type: ignore[arg-type]
    rtol, atol = TOLERANCES[dtype]
    assert value.shape == expected.shape and grad.dtype == dtype
    torch.testing.assert_close(value.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=atol * expected_grad.abs().max().item())


def test_zero_rows_give_zero_cosine_and_finite_gradient() -> None:
    s, r = torch.randn(2, 5, 6), torch.randn(2, 5, 6)
    s[0, 2] = 0.0
    value, grad = run(lambda a, b: ops.gram_row_cosines(a, b, gram_scope="sample", backend="triton"), s, r)
    assert value[2].item() == 0.0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("scope", ["batch", "sample"])
def test_anti_transfer_uses_the_kernel_with_the_same_result(scope: str) -> None:
    g = torch.Generator().manual_seed(1)
    s, r = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    for distance in ("cos", "cos_squared"):
        torch.testing.assert_close(
            ops.anti_transfer(s, r, aggregation="gram", distance=distance, gram_scope=scope, backend="triton"),  # type: ignore[arg-type]
            ops.anti_transfer(s, r, aggregation="gram", distance=distance, gram_scope=scope, backend="torch"),  # type: ignore[arg-type]
        )


def test_rows_past_one_column_chunk_accumulate_over_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    from negtransfer_losses.ops import _kernel_gram_cosine as gram_cosine

    monkeypatch.setattr(gram_cosine, "TILE_COLUMNS", 16)  # 40 rows: three chunks, as 600 rows with 256
    g = torch.Generator().manual_seed(2)
    s, r = torch.randn(1, 40, 33, generator=g), torch.randn(1, 40, 33, generator=g)
    value, grad = run(lambda a, b: ops.gram_row_cosines(a, b, gram_scope="sample", backend="triton"), s, r)
    expected, expected_grad = run(lambda a, b: ntf.gram_row_cosines(a, b, gram_scope="sample"), s.double(), r.double())
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6 * expected_grad.abs().max().item())


@pytest.mark.parametrize(("shape", "scope"), [((3, 50, 9), "batch"), ((2, 5, 37), "sample")], ids=["identity", "tiles"])
def test_huge_float32_maps_give_the_cosines_of_the_unscaled_maps(shape: tuple[int, ...], scope: str) -> None:
    g = torch.Generator().manual_seed(4)
    s, r = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    value, grad = run(lambda a, b: ops.gram_row_cosines(a, b, gram_scope=scope, backend="triton"), s * 1e30, r * 3e29)  # type: ignore[arg-type]
    expected, expected_grad = run(lambda a, b: ntf.gram_row_cosines(a, b, gram_scope=scope), s.double(), r.double())  # type: ignore[arg-type]
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    top = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double() * 1e30, expected_grad, rtol=1e-4, atol=1e-6 * top)


def test_identity_plan_and_grids_stay_within_cuda_limits_at_huge_sizes() -> None:
    from negtransfer_losses.ops._kernel_common import MAX_GRID_X, check_grid
    from negtransfer_losses.ops._kernel_gram_cosine import BLOCK_DIM, BLOCK_ROWS, PARTIAL_BUDGET, identity_plan

    assert identity_plan(1, 15_360, 64) == (30, 512, 1, 64)  # the paper's batch scope: 30 chunks of 8·N rows
    for groups, rows, dim in [(1, 15_360, 64), (1, 2**31, 64), (1, 3 * 2**30, 1000), (4096, 2**20, 16), (1, 100, 99)]:
        splits, rows_per_split, tiles, block = identity_plan(groups, rows, dim)
        assert splits * rows_per_split >= rows > (splits - 1) * rows_per_split and rows_per_split % BLOCK_ROWS == 0
        assert groups * splits * tiles * tiles <= MAX_GRID_X and tiles * block >= dim
        assert block in (16, 32, BLOCK_DIM) and (block == BLOCK_DIM or block >= dim)
        padded = tiles * block
        assert splits == 1 or groups * splits * 3 * padded * padded <= PARTIAL_BUDGET
        assert groups * -(-rows // BLOCK_ROWS) <= MAX_GRID_X  # the rows kernels' grid
    with pytest.raises(ValueError, match=r"needs 2147483648 programs, more than CUDA's 2147483647"):
        check_grid(2**31, "gram_row_cosines")


def test_batch_scope_identity_arithmetic_and_reads_are_bounded() -> None:
    """At the paper's layout scaled down (B=30, C=32, 8×8: m = 960 rows, N = 64), counted in the interpreter:
    the fused path's dot FLOPs (forward + backward) against the torch path's (FlopCounterMode), and how many
    times the kernels load each input element."""
    from triton.runtime import interpreter

    from negtransfer_losses.ops._kernel_gram_cosine import identity_plan

    g = torch.Generator().manual_seed(5)
    s, r = torch.randn(30, 32, 8, 8, generator=g).requires_grad_(True), torch.randn(30, 32, 8, 8, generator=g)
    ranges = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (s, r)]
    counted = {"flops": 0, "input": 0, "other": 0}
    builder = interpreter.interpreter_builder
    dot, load = builder.create_dot, builder.create_masked_load

    def counting_dot(a, b, *args):  # type: ignore[no-untyped-def]
        counted["flops"] += 2 * int(np.prod(a.data.shape)) * int(b.data.shape[-1])
        return dot(a, b, *args)

    def counting_load(ptrs, mask, *args):  # type: ignore[no-untyped-def]
        addresses = ptrs.data[mask.data]
        inside = sum(int(((addresses >= lo) & (addresses < hi)).sum()) for lo, hi in ranges)
        counted["input"] += inside
        counted["other"] += int(mask.data.sum()) - inside
        return load(ptrs, mask, *args)

    builder.create_dot, builder.create_masked_load = counting_dot, counting_load
    try:
        (3.7 * ops.gram_row_cosines(s, r, gram_scope="batch", backend="triton").abs().mean().square()).backward()
    finally:
        builder.create_dot, builder.create_masked_load = dot, load
    with FlopCounterMode(display=False) as counter:
        run(lambda a, b: ntf.gram_row_cosines(a, b, gram_scope="batch"), s, r)
    rows, dim = 960, 64
    assert counted["flops"] == 24 * rows * dim * dim  # forward 12 m N², backward 12 m N²
    assert counted["flops"] <= 2 * counter.get_total_flops()
    # each input element once per kernel: two kernels forward, two backward
    assert counted["input"] == 4 * (s.numel() + r.numel())
    # besides: the N×N matrices once per block of 64 rows (3 forward, 4 backward), the split partials once
    # (3 forward, 2 backward), 12 scalars per row (gradient, cosine, two norms; thrice), and the exponents
    splits = identity_plan(1, rows, dim)[0]
    assert splits == 1  # 960 rows < 8·N·2: one chunk
    assert counted["other"] <= (rows // 64) * 7 * dim * dim + 5 * splits * dim * dim + 12 * rows + 512


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("shape", [(3, 50, 9), (2, 40, 70)], ids=["one-tile", "2x2-tiles"])
def test_identity_partials_over_several_row_chunks(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    # at test sizes the plan takes one chunk (8·N rows each); force chunks of 64 rows, combined in order
    from negtransfer_losses.ops import _kernel_gram_cosine as gram_cosine

    plan = gram_cosine.identity_plan

    def small_chunks(groups: int, rows: int, dim: int) -> tuple[int, int, int, int]:
        tiles, block = plan(groups, rows, dim)[2:]
        return -(-rows // 64), 64, tiles, block

    monkeypatch.setattr(gram_cosine, "identity_plan", small_chunks)
    g = torch.Generator().manual_seed(6)
    s = torch.randn(*shape, generator=g)
    r = (0.5 * s + torch.randn(*shape, generator=g)).to(dtype)
    s = s.to(dtype)
    s[1] *= 1e3  # chunks at different scales: their exponents differ
    value, grad = run(lambda a, b: ops.gram_row_cosines(a, b, gram_scope="batch", backend="triton"), s, r)
    expected, expected_grad = run(lambda a, b: ntf.gram_row_cosines(a, b, gram_scope="batch"), s.double(), r.double())
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(value.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=rtol, atol=atol * expected_grad.abs().max().item())


@pytest.mark.parametrize(("shape", "scope"), [((3, 50, 9), "batch"), ((3, 40, 3, 3), "sample"), ((2, 5, 37), "sample")])
def test_nan_propagates_like_the_torch_path(shape: tuple[int, ...], scope: str) -> None:
    g = torch.Generator().manual_seed(7)
    s, r = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
    s.view(shape[0], -1)[1, 3] = float("nan")
    got = ops.gram_row_cosines(s, r, gram_scope=scope, backend="triton")  # type: ignore[arg-type]
    expected = ops.gram_row_cosines(s, r, gram_scope=scope, backend="torch")  # type: ignore[arg-type]
    assert torch.isnan(got).any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)  # the rest unchanged
