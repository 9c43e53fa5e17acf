"""The fused channel-aggregation + row-cosine kernel (Triton interpreter on CPU) against the float64 twin."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import negtransfer_losses.functional as ntf
from negtransfer_losses import ops

pytest.importorskip("triton", reason="the kernels need Triton: pip install 'negtransfer-losses[triton]'")

# (batch, channels, spatial): odd sizes, one tile and several tiles along channels and positions
SHAPES = [(2, 3, (37, 5)), (3, 1, (7,)), (1, 17, (4, 4)), (2, 40, (130,))]
# (dtype, rtol, atol) for value and gradient, against float64 on the same (rounded) inputs
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (2e-2, 1e-3)}


def maps(
    batch: int, channels: int, spatial: tuple[int, ...], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, channels, *spatial, generator=g)
    r = 0.5 * s + torch.randn(batch, channels, *spatial, generator=g)
    return s.to(dtype), r.to(dtype)


def value_and_grad(fn, s: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    leaf = s.detach().clone().requires_grad_(True)
    cosines = fn(leaf, r)
    loss = 3.7 * cosines.abs().mean().square()  # the cos_squared reduction, scaled
    (grad,) = torch.autograd.grad(loss, leaf)
    return cosines.detach(), grad


@pytest.mark.parametrize("aggregation", ["mean", "sum", "max"])
@pytest.mark.parametrize(
    ("batch", "channels", "spatial"), SHAPES, ids=[f"{b}x{c}x{'x'.join(map(str, sp))}" for b, c, sp in SHAPES]
)
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_kernel_matches_float64_reference(
    aggregation: str, batch: int, channels: int, spatial: tuple[int, ...], dtype: torch.dtype
) -> None:
    s, r = maps(batch, channels, spatial, dtype)
    value, grad = value_and_grad(
        lambda a, b: ops.aggregated_row_cosines(a, b, aggregation=aggregation, backend="triton"), s, r
    )
    expected, expected_grad = value_and_grad(
        lambda a, b: ntf.aggregated_row_cosines(a, b, aggregation=aggregation),  # type: ignore[arg-type]
        s.double(),
        r.double(),
    )
    rtol, atol = TOLERANCES[dtype]
    assert value.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(value.double(), expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(
        grad.double(), expected_grad, rtol=rtol, atol=atol * max(1.0, expected_grad.abs().max().item())
    )


def test_max_ties_split_the_gradient_evenly_like_amax() -> None:
    s = torch.tensor([[[2.0, 1.0, 0.5], [2.0, 0.5, 0.5], [0.0, 1.0, 0.5]]])  # ties at positions 0, 1 and 2
    r = torch.tensor([[[1.0, 3.0, 2.0], [0.5, 1.0, 1.0], [2.0, 0.0, 1.0]]])
    got = value_and_grad(lambda a, b: ops.aggregated_row_cosines(a, b, aggregation="max", backend="triton"), s, r)[1]
    expected = value_and_grad(lambda a, b: ntf.aggregated_row_cosines(a, b, aggregation="max"), s.double(), r.double())[
        1
    ]
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)
    assert got[0, 0, 0] == got[0, 1, 0] != 0 and got[0, 0, 2] == got[0, 1, 2] == got[0, 2, 2]


def test_zero_maps_give_zero_cosine_and_finite_gradient() -> None:
    s, r = torch.zeros(2, 3, 5), torch.randn(2, 3, 5)
    value, grad = value_and_grad(
        lambda a, b: ops.aggregated_row_cosines(a, b, aggregation="mean", backend="triton"), s, r
    )
    assert torch.equal(value, torch.zeros(2)) and torch.isfinite(grad).all()


def test_anti_transfer_uses_the_kernel_with_the_same_result() -> None:
    s, r = maps(3, 6, (5, 3), torch.float32)
    for distance in ("cos", "cos_squared"):
        torch.testing.assert_close(
            ops.anti_transfer(s, r, aggregation="mean", distance=distance, backend="triton"),  # type: ignore[arg-type]
            ops.anti_transfer(s, r, aggregation="mean", distance=distance, backend="torch"),  # type: ignore[arg-type]
        )


def test_backend_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    assert ops.resolve_backend("auto", "aggregated_row_cosines", cpu) == "torch"  # CPU tensors take the functional path
    assert ops.resolve_backend("torch", "aggregated_row_cosines", cpu) == "torch"
    assert ops.resolve_backend("triton", "aggregated_row_cosines", cpu) == "triton"  # under TRITON_INTERPRET=1
    monkeypatch.setenv("NEGTRANSFER_BACKEND", "triton")
    assert ops.resolve_backend("auto", "aggregated_row_cosines", cpu) == "triton"
    monkeypatch.setenv("NEGTRANSFER_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"'NEGTRANSFER_BACKEND' must be one of 'auto', 'torch', 'triton'"):
        ops.resolve_backend("auto", "aggregated_row_cosines", cpu)
    monkeypatch.delenv("NEGTRANSFER_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors \(got cpu\); set TRITON_INTERPRET=1"):
        ops.resolve_backend("triton", "aggregated_row_cosines", cpu)
    with pytest.raises(ValueError, match=r"'backend' must be one of"):
        ops.resolve_backend("cuda", "aggregated_row_cosines", cpu)  # type: ignore[arg-type]


def test_importing_the_package_does_not_import_triton() -> None:
    code = (
        "import sys, torch, negtransfer_losses as n; "
        "n.AntiTransferLoss(aggregation='mean', distance='cos')(torch.randn(2, 3, 4), torch.randn(2, 3, 4)); "
        "print('triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("aggregation", ["mean", "sum", "max"])
def test_reference_with_another_channel_count(aggregation: str) -> None:
    # the contract allows it; the kernel once reduced the reference over the student's channel count
    g = torch.Generator().manual_seed(3)
    s, r = torch.randn(3, 4, 6, 5, generator=g), torch.randn(3, 9, 6, 5, generator=g)
    value, grad = value_and_grad(
        lambda a, b: ops.aggregated_row_cosines(a, b, aggregation=aggregation, backend="triton"), s, r
    )
    expected, expected_grad = value_and_grad(
        lambda a, b: ntf.aggregated_row_cosines(a, b, aggregation=aggregation),  # type: ignore[arg-type]
        s.double(),
        r.double(),
    )
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_both_paths_give_the_documented_errors(backend: str) -> None:
    s = torch.randn(2, 3, 4)
    with pytest.raises(TypeError, match=r"'student' must be a real floating-point tensor"):
        ops.aggregated_row_cosines(s.long(), s, aggregation="mean", backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must agree in batch and spatial size"):
        ops.aggregated_row_cosines(s, s[:, :, :3], aggregation="mean", backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'aggregation' must be one of 'mean', 'sum', 'max'"):
        ops.aggregated_row_cosines(s, s, aggregation="mul", backend=backend)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'student' must be a torch.Tensor"):
        ops.gram_row_cosines([[1.0]], s, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'student' and 'reference' must have the same shape"):
        ops.gram_row_cosines(s, s[:1], backend=backend)  # type: ignore[arg-type]


@pytest.mark.parametrize("aggregation", ["mean", "sum", "max"])
def test_nan_propagates_like_torch(aggregation: str) -> None:
    # tl.max / tl.maximum drop NaN on a GPU where torch.amax keeps it; the kernel carries a NaN flag
    # (the interpreter's numpy max keeps NaN either way, so this checks the contract, not the GPU flag)
    s, r = maps(3, 5, (4, 3), torch.float32)
    s[1, 2, 1, 1] = float("nan")
    got = ops.anti_transfer(s, r, aggregation=aggregation, distance="cos", nan_policy="propagate", backend="triton")  # type: ignore[arg-type]
    expected = ops.anti_transfer(s, r, aggregation=aggregation, distance="cos", nan_policy="propagate", backend="torch")  # type: ignore[arg-type]
    assert torch.isnan(got) and torch.isnan(expected)
    cosines = ops.aggregated_row_cosines(s, r, aggregation=aggregation, backend="triton")  # type: ignore[arg-type]
    assert torch.isnan(cosines[1]) and torch.isfinite(cosines[[0, 2]]).all()
    reference = ops.aggregated_row_cosines(s, r, aggregation=aggregation, backend="torch")  # type: ignore[arg-type]
    torch.testing.assert_close(cosines, reference, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("aggregation", ["mean", "sum", "max"])
def test_huge_float32_maps_give_the_cosines_of_the_unscaled_maps(aggregation: str) -> None:
    s, r = maps(3, 6, (50, 3), torch.float32, seed=4)
    value, grad = value_and_grad(
        lambda a, b: ops.aggregated_row_cosines(a, b, aggregation=aggregation, backend="triton"),  # type: ignore[arg-type]
        s * 1e30,
        r * 3e29,
    )
    expected, expected_grad = value_and_grad(
        lambda a, b: ntf.aggregated_row_cosines(a, b, aggregation=aggregation),  # type: ignore[arg-type]
        s.double(),
        r.double(),
    )
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    top = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double() * 1e30, expected_grad, rtol=1e-4, atol=1e-6 * top)


@pytest.mark.parametrize(("aggregation", "reads"), [("mean", 0), ("sum", 0), ("max", 1)])
def test_backward_reads_the_student_only_for_max(aggregation: str, reads: int) -> None:
    from triton.runtime import interpreter

    s, r = maps(2, 7, (9, 20), torch.float32)
    leaf = s.clone().requires_grad_(True)
    cosines = ops.aggregated_row_cosines(leaf, r, aggregation=aggregation, backend="triton")  # type: ignore[arg-type]
    lo, hi = leaf.data_ptr(), leaf.data_ptr() + leaf.numel() * leaf.element_size()
    loaded = [0]
    builder = interpreter.interpreter_builder
    load = builder.create_masked_load

    def counting_load(ptrs, mask, *args):  # type: ignore[no-untyped-def]
        addresses = ptrs.data[mask.data]
        loaded[0] += int(((addresses >= lo) & (addresses < hi)).sum())
        return load(ptrs, mask, *args)

    builder.create_masked_load = counting_load
    try:
        (2.5 * cosines.abs().mean().square()).backward()
    finally:
        builder.create_masked_load = load
    assert loaded[0] == reads * leaf.numel()


def test_launch_grid_is_one_dimensional_within_cuda_limits() -> None:
    from negtransfer_losses.ops._kernel_channel_cosine import _blocks
    from negtransfer_losses.ops._kernel_common import MAX_GRID_X

    # one program per (sample, block of 128 positions): past 2³¹ − 1 programs only with more than 2³⁸ positions,
    # 512 GiB of float16 for one channel (more than any GPU holds); check_grid raises before such a launch
    for batch, positions in [(64, 784), (65_536, 1 << 20), (1 << 15, (1 << 22) - 1), (1 << 30, 1), (3, 1)]:
        block = _blocks(positions)
        assert batch * -(-positions // block) <= MAX_GRID_X
