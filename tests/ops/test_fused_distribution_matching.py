"""The fused distribution-matching kernel (Triton interpreter on CPU) against the float64 functional path."""

from __future__ import annotations

import pytest
import torch

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses import ops

pytest.importorskip("triton", reason="the kernels need Triton: pip install 'negtransfer-losses[triton]'")

# (N, K, M): odd sizes, one class, one attribute, a wide task A, an empty batch, several blocks of samples
SHAPES = [(5, 7, 17), (3, 1, 3), (4, 4, 1), (2, 37, 5), (0, 3, 2), (70, 3, 5)]
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (2e-2, 1e-3)}


def problem(n: int, k: int, m: int, dtype: torch.dtype, scale: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    za = (scale * torch.randn(n, k, generator=g)).to(dtype)
    zb = (scale * torch.randn(n, m, generator=g)).to(dtype)
    r = torch.rand(k, m, generator=g, dtype=torch.float64)
    r[0] = 0.0  # a neutral class: no attribute
    if k > 1:
        r[1, : max(1, m // 2)] = 1.0  # hard 0/1 entries: the clamps' edges
    prior = torch.rand(k, generator=g, dtype=torch.float64) + 0.1
    return za, zb, r, prior / prior.sum()


def run(fn, za, zb) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
    a, b = za.detach().clone().requires_grad_(True), zb.detach().clone().requires_grad_(True)
    terms = fn(a, b)
    total = 3.7 * terms["a_to_b"] + 1.3 * terms["b_to_a"]  # unequal weights: each direction's grad is checked
    grads = torch.autograd.grad(total, [a, b], allow_unused=True)
    return torch.stack([terms["a_to_b"], terms["b_to_a"]]).detach(), [
        torch.zeros_like(x) if g is None else g for x, g in zip([a, b], grads, strict=True)
    ]


@pytest.mark.parametrize(("n", "k", "m"), SHAPES, ids=[f"N{n}K{k}M{m}" for n, k, m in SHAPES])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("detach", [False, True], ids=["coupled", "detached"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_kernel_matches_float64_reference(
    n: int, k: int, m: int, divergence: str, detach: bool, dtype: torch.dtype
) -> None:
    za, zb, r, prior = problem(n, k, m, dtype)
    kwargs = {"divergence": divergence, "detach_target": detach}
    value, grads = run(lambda a, b: ops.distribution_matching(a, b, r, prior, backend="triton", **kwargs), za, zb)
    expected, expected_grads = run(
        lambda a, b: ntf.distribution_matching(a, b, r, prior, **kwargs), za.double(), zb.double()
    )
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(value.double(), expected, rtol=rtol, atol=atol)
    for g, e in zip(grads, expected_grads, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(
            g.double(), e, rtol=rtol, atol=atol * max(1.0, e.abs().max().item() if e.numel() else 1.0)
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_extreme_logits_stay_finite(dtype: torch.dtype) -> None:
    za, zb, r, prior = problem(4, 5, 6, torch.float32)
    za, zb = (za.sign() * 1e4).to(dtype), (zb.sign() * 1e4).to(dtype)
    value, grads = run(lambda a, b: ops.distribution_matching(a, b, r, prior, backend="triton"), za, zb)
    assert torch.isfinite(value).all() and all(torch.isfinite(g).all() for g in grads)


def test_other_configurations_take_the_functional_path() -> None:
    za, zb, r, prior = problem(4, 3, 3, torch.float32)
    rows = r / r.sum(1, keepdim=True).clamp_min(1e-9)
    rows[0] = 1.0 / 3
    for kind, matrix, inversion in (("multiclass", rows, "bayes"), ("multilabel", r, "product")):
        got = ops.distribution_matching(za, zb, matrix, prior, kind, inversion=inversion, backend="triton")  # type: ignore[arg-type]
        expected = ntf.distribution_matching(za, zb, matrix, prior, kind, inversion=inversion)  # type: ignore[arg-type]
        assert got.keys() == expected.keys() and all(torch.equal(got[d], expected[d]) for d in got)


def test_modules_use_the_kernel_with_the_same_result() -> None:
    za, zb, r, prior = problem(6, 4, 3, torch.float32)
    relatedness = ntl.TaskRelatedness(r, prior=prior)
    labels_a = torch.tensor([0, -100, 2, 3, -100, 1])
    labels_b = torch.tensor([[float("nan")] * 3, [1.0, 0.0, 1.0]] * 3)
    for backend in ("triton", "torch"):
        torch.testing.assert_close(
            ntl.DistributionMatchingLoss(relatedness, backend=backend)(za, zb),  # type: ignore[arg-type]
            ntl.DistributionMatchingLoss(relatedness, backend="torch")(za, zb),
        )
    torch.testing.assert_close(
        ntl.MultiTaskLoss(relatedness, backend="triton")(za, zb, labels_a, labels_b),
        ntl.MultiTaskLoss(relatedness, backend="torch")(za, zb, labels_a, labels_b),
    )


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_both_paths_give_the_documented_errors(backend: str) -> None:
    za, zb, r, prior = problem(3, 4, 2, torch.float32)
    with pytest.raises(TypeError, match=r"'logits_a' must be a real floating-point tensor"):
        ops.distribution_matching(za.long(), zb, r, prior, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'divergence' must be one of 'kl', 'ce'"):
        ops.distribution_matching(za, zb, r, prior, divergence="js", backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'logits_b' must be \(N, 2\)"):
        ops.distribution_matching(za, za, r, prior, backend=backend)  # type: ignore[arg-type]


def test_blocks_of_samples_and_grid_within_cuda_limits() -> None:
    from negtransfer_losses.ops._kernel_common import MAX_GRID_X
    from negtransfer_losses.ops.fused_distribution_matching import TILE_BUDGET, block_sizes

    assert block_sizes(7, 17) == {"SAMPLES": 16, "BLOCK_K": 8, "BLOCK_M": 32}
    assert block_sizes(3, 5)["SAMPLES"] == 64 and block_sizes(300, 200)["SAMPLES"] == 1
    for k, m in [(1, 1), (7, 17), (37, 5), (1000, 3)]:
        sizes = block_sizes(k, m)
        assert sizes["SAMPLES"] & (sizes["SAMPLES"] - 1) == 0
        assert sizes["SAMPLES"] == 1 or sizes["SAMPLES"] * sizes["BLOCK_K"] * sizes["BLOCK_M"] <= TILE_BUDGET
        assert -(-(2**31 - 1) // sizes["SAMPLES"]) <= MAX_GRID_X  # row indices are 64-bit past that


def test_broadcast_gradient_is_read_through_its_strides() -> None:
    from negtransfer_losses.ops.fused_distribution_matching import FusedDistributionMatching

    za, zb, r, prior = problem(9, 5, 6, torch.float32)
    a, b = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    per_sample = FusedDistributionMatching.apply(a, b, r, prior, True, False, 1e-6)
    weights = torch.tensor([0.7, -1.9]).expand(9, 2)  # stride (0, 1), as the mean's backward hands it
    assert weights.stride() == (0, 1)
    got = torch.autograd.grad(per_sample, [a, b], weights)
    expected = torch.autograd.grad(
        FusedDistributionMatching.apply(a, b, r, prior, True, False, 1e-6), [a, b], weights.contiguous()
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
