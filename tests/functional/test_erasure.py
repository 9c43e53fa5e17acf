"""Linear erasure (`functional/erasure.py`): the erased space against an SVD oracle, the within-class statistic."""

from __future__ import annotations

import math
from typing import Any

import oracles
import pytest
import torch
from helpers import GRAD_SCALE, count_syncs
from torch.utils._python_dispatch import TorchDispatchMode

import negtransfer_losses.functional as ntf
from negtransfer_losses.functional.erasure import column_basis, within_class_cross_covariance


def with_singular_values(d: int, k: int, singular: list[float], seed: int = 0) -> torch.Tensor:
    """A `(d, k)` float64 matrix with the given singular values (the rest zero) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    r = len(singular)
    return (u[:, :r] * torch.tensor(singular, dtype=torch.float64)) @ v[:, :r].T


def test_erasure_removes_mean_differences_and_keeps_orthogonal_directions() -> None:
    means = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    q = ntf.erasure_basis(means)
    assert q.shape == (4, 3)
    projector = torch.zeros(4, 4, dtype=torch.float64)
    projector[0, 0] = projector[1, 1] = 1.0  # the differences span the first two axes
    torch.testing.assert_close(q @ q.T, projector, rtol=0, atol=1e-14)
    torch.testing.assert_close(q @ q.T, oracles.erasure_projector(means), rtol=0, atol=1e-14)
    out = ntf.erase(means, q)
    torch.testing.assert_close(out - out.mean(0), torch.zeros_like(out))
    z = torch.tensor([[0.3, -1.0, 5.0, 7.0]], dtype=torch.float64)
    torch.testing.assert_close(ntf.erase(z, q), torch.tensor([[0.0, 0.0, 5.0, 7.0]], dtype=torch.float64))
    assert torch.equal(ntf.erasure_basis(torch.ones(3, 4)), torch.zeros(4, 3, dtype=torch.float64))  # equal means


@pytest.mark.parametrize(
    ("d", "k", "singular", "atol"),
    [
        (6, 3, [1.0, 0.4], 1e-13),  # rank K - 1, as for mean differences
        (64, 10, [10.0 ** (-i / 2) for i in range(9)], 1e-12),  # down to 1e-4 of the largest
        (5, 10, [3.0, 2.0, 1.0, 0.5, 0.1], 1e-13),  # wide: D < K, full row rank
        (100, 10, [1.0, 1.0, 1.0, 1e-5], 1e-11),  # repeated singular values, one at 10 × rtol
        (512, 40, [2.0**-i for i in range(39)], 1e-10),  # a long tail, cut between 2^-19 and 2^-20 (rtol = 1e-6)
        (4, 3, [], 0.0),  # zero
    ],
)
def test_column_basis_gives_the_svd_projector(d: int, k: int, singular: list[float], atol: float) -> None:
    """The projector equals the SVD's; rounding errors grow like 1e-16 / σ for a direction kept at σ (relative)."""
    m = with_singular_values(d, k, singular)
    q = column_basis(m)
    assert q.shape == (d, k) and q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, oracles.column_projector(m), rtol=0, atol=atol)
    torch.testing.assert_close((q @ q.T) @ (q @ q.T), q @ q.T, rtol=0, atol=1e-12)  # a projector
    for scale in (1e-150, 1e150):  # no underflow or overflow in the Gram matrix
        scaled = column_basis(m * scale)
        torch.testing.assert_close(scaled @ scaled.T, q @ q.T, rtol=0, atol=max(atol, 1e-12))


@pytest.mark.parametrize("rtol", [1e-6, 1e-3, 0.3])
def test_the_cut_is_sharp_at_rtol(rtol: float) -> None:
    """Directions 5 % above `rtol × σ_max` are erased completely, those 5 % below not at all."""
    singular = [1.0, 0.5, 1.5 * rtol, 1.05 * rtol, 0.95 * rtol, rtol / 1.5]
    m = with_singular_values(10, 7, singular, seed=1)
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    q = column_basis(m, rtol=rtol)
    weights = torch.stack([u[:, i] @ q @ q.T @ u[:, i] for i in range(6)])
    torch.testing.assert_close(weights, torch.tensor([1.0, 1, 1, 1, 0, 0], dtype=torch.float64), rtol=0, atol=1e-9)


def test_float32_rounding_of_a_null_direction_is_not_erased() -> None:
    """Statistics kept in float32 give their null directions singular values near 1e-7, below the default rtol."""
    m = with_singular_values(16, 5, [1.0, 0.3]).float()  # exact rank 2, float32 rounding elsewhere
    torch.testing.assert_close(column_basis(m) @ column_basis(m).T, oracles.column_projector(m), rtol=0, atol=1e-6)


@pytest.mark.parametrize("rtol", [0.0, 1e-13, 1.0, math.nan, -1e-6])
def test_rtol_outside_its_range_is_refused(rtol: float) -> None:
    with pytest.raises(ValueError, match=r"'rtol' must be in \[1e-12, 1\)"):
        column_basis(torch.eye(3), rtol=rtol)
    with pytest.raises(ValueError, match=r"'rtol' must be in \[1e-12, 1\)"):
        ntf.erasure_basis(torch.eye(3), rtol=rtol)


def test_column_basis_refuses_a_non_matrix() -> None:
    with pytest.raises(ValueError, match=r"'matrix' must be 2-D \(D, K\), got shape \(2, 3, 4\)"):
        column_basis(torch.zeros(2, 3, 4))


def test_erase_projects_values_and_gradients() -> None:
    m = with_singular_values(5, 3, [2.0, 1.0], seed=1)
    q = column_basis(m)
    p = oracles.column_projector(m)
    z = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    out = ntf.erase(z, q)
    torch.testing.assert_close(out, z - z @ p, rtol=0, atol=1e-12)
    grad_out = torch.randn(7, 5, dtype=torch.float64)
    (GRAD_SCALE * (out * grad_out).sum()).backward()
    assert z.grad is not None
    torch.testing.assert_close(z.grad, GRAD_SCALE * (grad_out - grad_out @ p), rtol=0, atol=1e-11)
    maps = z.detach().reshape(7, 5, 1).float()
    erased_maps = ntf.erase(maps, q)
    assert erased_maps.shape == (7, 5, 1) and erased_maps.dtype == torch.float32
    torch.testing.assert_close(erased_maps.reshape(7, 5).double(), out.detach(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"have 5 values per sample .* basis has shape \(4, 3\), not \(5, r\)"):
        ntf.erase(z, torch.zeros(4, 3))


def conditional_data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features with a task class y (4 values, 2 unknown) and an irrelevant label u (3 values, 3 unknown)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=g)
    u = torch.randint(0, 3, (n,), generator=g)
    y[[0, 5]] = -100
    u[[1, 2, 9]] = -100
    return z, u, y


def test_within_class_cross_covariance_matches_oracle() -> None:
    z, u, y = conditional_data()
    value, count = within_class_cross_covariance(z, u, y, 3)
    expected, expected_count = oracles.within_class_cross_covariance(z, u, y, 3)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    assert isinstance(count, torch.Tensor) and count.dtype == torch.int64 and int(count) == expected_count > 0
    empty, none = within_class_cross_covariance(z, y.clamp(0, 2), y, 3)  # one u value per task class
    assert int(none) == 0 and torch.equal(empty, torch.zeros(4, 3, dtype=torch.float64))


class LinalgOps(TorchDispatchMode):
    """Records the LAPACK-backed decompositions that run: on a GPU each reads an error flag back to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        if func.name().startswith(("aten::_linalg_svd", "aten::_linalg_eigh", "aten::linalg_eig", "aten::lstsq")):
            self.seen.append(func.name())
        return func(*args, **(kwargs or {}))


def test_erasure_makes_no_host_sync_and_traces_in_one_graph() -> None:
    z, u, y = conditional_data()

    def step() -> torch.Tensor:
        covariance, count = within_class_cross_covariance(z, u, y, 3)
        q = torch.where(count > 0, column_basis(covariance), 0.0)
        return ntf.erase(z, q) + ntf.erase(z, ntf.erasure_basis(z[:3]))

    step()
    assert count_syncs(step).total == 0
    with LinalgOps() as linalg:
        step()
    assert linalg.seen == []
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)()
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
