"""The fused distribution-matching kernel (Triton interpreter on CPU) against the float64 functional path.

Every comparison here has the kernel on one side, and a test that means the kernel asserts that it ran
(`kernel_calls`): a dispatcher that quietly took the torch path would otherwise pass them all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import oracles
import pytest
import torch

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses import ops

pytest.importorskip("triton", reason="the kernels need Triton: pip install 'negtransfer-losses[triton]'")

# (N, K, M): odd sizes, one class, one attribute, a wide task A, an empty batch, several blocks of samples
SHAPES = [(5, 7, 17), (3, 1, 3), (4, 4, 1), (2, 37, 5), (0, 3, 2), (70, 3, 5)]
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 1e-4), torch.bfloat16: (2e-2, 1e-3)}
WEIGHTS = (3.7, 1.3)  # unequal weights of the two directions: each direction's gradient is checked


class KernelCalls:
    """How many times the fused kernel's autograd function ran."""

    count = 0


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> KernelCalls:
    from negtransfer_losses.ops._kernel_distribution_matching import FusedDistributionMatching

    calls = KernelCalls()
    original = FusedDistributionMatching.apply

    def counted(*args: Any) -> Any:
        calls.count += 1
        return original(*args)

    monkeypatch.setattr(FusedDistributionMatching, "apply", staticmethod(counted))
    return calls


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


Terms = Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def run(fn: Terms, za: torch.Tensor, zb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """`(L_AB, L_BA)` and the gradients of `3.7 L_AB + 1.3 L_BA` with respect to both logits."""
    a, b = za.detach().clone().requires_grad_(True), zb.detach().clone().requires_grad_(True)
    terms = fn(a, b)
    total = WEIGHTS[0] * terms["a_to_b"] + WEIGHTS[1] * terms["b_to_a"]
    grads = torch.autograd.grad(total, [a, b], allow_unused=True)
    return torch.stack([terms["a_to_b"], terms["b_to_a"]]).detach(), [
        torch.zeros_like(x) if g is None else g for x, g in zip([a, b], grads, strict=True)
    ]


def assert_close_to_reference(
    got: tuple[torch.Tensor, list[torch.Tensor]],
    expected: tuple[torch.Tensor, list[torch.Tensor]],
    dtype: torch.dtype,
) -> None:
    value, grads = got
    expected_value, expected_grads = expected
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(value.double(), expected_value, rtol=rtol, atol=atol)
    for g, e in zip(grads, expected_grads, strict=True):
        assert g.dtype == dtype
        scale = max(1.0, e.abs().max().item() if e.numel() else 1.0)
        torch.testing.assert_close(g.double(), e, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize(("n", "k", "m"), SHAPES, ids=[f"N{n}K{k}M{m}" for n, k, m in SHAPES])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("detach", [False, True], ids=["coupled", "detached"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_kernel_matches_float64_reference(
    n: int, k: int, m: int, divergence: str, detach: bool, dtype: torch.dtype, kernel_calls: KernelCalls
) -> None:
    za, zb, r, prior = problem(n, k, m, dtype)
    options: dict[str, Any] = {"prior": prior, "divergence": divergence, "detach_target": detach}
    got = run(lambda a, b: ops.distribution_matching(a, b, r, backend="triton", **options), za, zb)  # type: ignore[arg-type]
    assert kernel_calls.count == 1
    expected = run(lambda a, b: ntf.distribution_matching(a, b, r, **options), za.double(), zb.double())  # type: ignore[arg-type]
    assert_close_to_reference(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_extreme_logits_match_the_float64_reference(dtype: torch.dtype, kernel_calls: KernelCalls) -> None:
    za, zb, r, prior = problem(4, 5, 6, torch.float32)
    za, zb = (za.sign() * 1e4).to(dtype), (zb.sign() * 1e4).to(dtype)
    got = run(lambda a, b: ops.distribution_matching(a, b, r, prior=prior, backend="triton"), za, zb)  # type: ignore[arg-type]
    assert kernel_calls.count == 1
    assert torch.isfinite(got[0]).all() and all(torch.isfinite(g).all() for g in got[1])
    expected = run(lambda a, b: ntf.distribution_matching(a, b, r, prior=prior), za.double(), zb.double())  # type: ignore[arg-type]
    assert_close_to_reference(got, expected, dtype)


def test_other_configurations_take_the_functional_path(kernel_calls: KernelCalls) -> None:
    za, zb, r, prior = problem(4, 3, 3, torch.float32)
    rows = r / r.sum(1, keepdim=True).clamp_min(1e-9)
    rows[0] = 1.0 / 3
    for kind, matrix, inversion in (("multiclass", rows, "bayes"), ("multilabel", r, "product")):
        got = ops.distribution_matching(za, zb, matrix, prior=prior, kind=kind, inversion=inversion, backend="triton")  # type: ignore[arg-type]
        expected = {
            "a_to_b": oracles.dm_a_to_b(za.double(), zb.double(), matrix, kind, "kl", False),
            "b_to_a": oracles.dm_b_to_a(za.double(), zb.double(), matrix, prior, kind, inversion, "kl", False),
        }
        assert got.keys() == expected.keys()
        for direction, value in got.items():
            torch.testing.assert_close(value.double(), expected[direction], rtol=1e-5, atol=1e-6)
    assert kernel_calls.count == 0  # no kernel for these configurations: the functional path ran


def test_modules_use_the_kernel_with_the_torch_paths_result(kernel_calls: KernelCalls) -> None:
    za, zb, r, prior = problem(6, 4, 3, torch.float32)
    relatedness = ntl.TaskRelatedness(r, prior=prior)
    labels_a = torch.tensor([0, -100, 2, 3, -100, 1])
    labels_b = torch.tensor([[float("nan")] * 3, [1.0, 0.0, 1.0]] * 3)
    weights = {"weight": 1.7, "matching_weight": 0.6}
    for module, args in (
        (lambda backend: ntl.DistributionMatchingLoss(relatedness, weight=1.7, backend=backend), ()),
        (lambda backend: ntl.MultiTaskLoss(relatedness, **weights, backend=backend), (labels_a, labels_b)),
    ):
        results = {}
        for backend in ("triton", "torch"):
            calls_before = kernel_calls.count
            a, b = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
            loss_fn = module(backend)
            loss = loss_fn(a, b, *args)
            grads = torch.autograd.grad(3.0 * loss, [a, b])
            results[backend] = (loss.detach(), grads, loss_fn.last_terms)
            assert (kernel_calls.count > calls_before) == (backend == "triton")
        (fused, fused_grads, fused_terms), (plain, plain_grads, plain_terms) = results["triton"], results["torch"]
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        for g, e in zip(fused_grads, plain_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        assert fused_terms.keys() == plain_terms.keys()
        for key in fused_terms:
            torch.testing.assert_close(fused_terms[key], plain_terms[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_both_paths_give_the_documented_errors(backend: str) -> None:
    za, zb, r, prior = problem(3, 4, 2, torch.float32)
    with pytest.raises(TypeError, match=r"'logits_a' must be a real floating-point tensor"):
        ops.distribution_matching(za.long(), zb, r, prior=prior, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'divergence' must be one of 'kl', 'ce'"):
        ops.distribution_matching(za, zb, r, prior=prior, divergence="js", backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'logits_b' must be \(N, 2\)"):
        ops.distribution_matching(za, za, r, prior=prior, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'prior' must have shape \(4,\)"):
        ops.distribution_matching(za, zb, r, prior=prior[:2], backend=backend)  # type: ignore[arg-type]


def test_blocks_of_samples_and_grid_within_cuda_limits() -> None:
    from negtransfer_losses.ops._kernel_common import MAX_GRID_X
    from negtransfer_losses.ops._kernel_distribution_matching import TILE_BUDGET, block_sizes

    assert block_sizes(7, 17) == {"SAMPLES": 16, "BLOCK_K": 8, "BLOCK_M": 32}
    assert block_sizes(3, 5)["SAMPLES"] == 64 and block_sizes(300, 200)["SAMPLES"] == 1
    for k, m in [(1, 1), (7, 17), (37, 5), (1000, 3)]:
        sizes = block_sizes(k, m)
        assert sizes["SAMPLES"] & (sizes["SAMPLES"] - 1) == 0
        assert sizes["SAMPLES"] == 1 or sizes["SAMPLES"] * sizes["BLOCK_K"] * sizes["BLOCK_M"] <= TILE_BUDGET
        assert -(-(2**31 - 1) // sizes["SAMPLES"]) <= MAX_GRID_X  # row indices are 64-bit past that


def test_broadcast_gradient_is_read_through_its_strides() -> None:
    from negtransfer_losses.ops._kernel_distribution_matching import FusedDistributionMatching

    za, zb, r, prior = problem(9, 5, 6, torch.float32)
    a, b = za.clone().requires_grad_(True), zb.clone().requires_grad_(True)
    per_sample = FusedDistributionMatching.apply(a, b, r, prior, True, False, 1e-6)
    weights = torch.tensor([0.7, -1.9]).expand(9, 2)  # stride (0, 1), as the mean's backward hands it
    assert weights.stride() == (0, 1)
    got = torch.autograd.grad(per_sample, [a, b], weights)
    # the reference: Σ_i (0.7 L_AB,i − 1.9 L_BA,i) = N (0.7 L_AB − 1.9 L_BA), in float64 on the torch path
    a64, b64 = za.double().requires_grad_(True), zb.double().requires_grad_(True)
    terms = ntf.distribution_matching(a64, b64, r, prior=prior)
    expected = torch.autograd.grad(9 * (0.7 * terms["a_to_b"] - 1.9 * terms["b_to_a"]), [a64, b64])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)
    contiguous = torch.autograd.grad(
        FusedDistributionMatching.apply(a, b, r, prior, True, False, 1e-6), [a, b], weights.contiguous()
    )
    for g, e in zip(got, contiguous, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)
