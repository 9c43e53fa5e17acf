"""Distribution-matching modules: buffers, weights, terms, and the composed multi-task loss."""

from __future__ import annotations

import math

import pytest
import torch

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf

R = ntl.TaskRelatedness([[0.0, 0.0], [0.9, 0.2], [0.1, 0.8]], prior=[0.2, 0.3, 0.5])


def heads(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, requires_grad=True), torch.randn(n, 2, generator=g, requires_grad=True)


def test_distribution_matching_loss_is_weighted_sum_of_directions() -> None:
    za, zb = heads()
    loss = ntl.DistributionMatchingLoss(R, weight=0.5, divergence="ce", inversion="product")
    terms = ntf.distribution_matching(za, zb, R.matrix, R.prior, "multilabel", inversion="product", divergence="ce")
    torch.testing.assert_close(loss(za, zb), 0.5 * (terms["a_to_b"] + terms["b_to_a"]).float())
    assert set(loss.last_terms) == {"loss", "a_to_b", "b_to_a"}
    one_way = ntl.DistributionMatchingLoss(R, directions=["a_to_b"])
    one_way(za, zb)
    assert set(one_way.last_terms) == {"loss", "a_to_b"}


def test_relatedness_lives_in_buffers() -> None:
    loss = ntl.DistributionMatchingLoss(R)
    state = loss.state_dict()
    assert set(state) == {"matrix", "prior"}
    other = ntl.DistributionMatchingLoss(ntl.TaskRelatedness([[0.5, 0.5]] * 3))
    other.load_state_dict(state)
    torch.testing.assert_close(other.matrix, R.matrix.float())
    assert loss.to(torch.float64).matrix.dtype == torch.float64


def test_gradients_reach_both_heads_unless_detached() -> None:
    za, zb = heads()
    ntl.DistributionMatchingLoss(R, directions=["a_to_b"])(za, zb).backward()
    assert za.grad is not None and za.grad.abs().sum() > 0
    za2, zb2 = heads()
    ntl.DistributionMatchingLoss(R, directions=["a_to_b"], detach_target=True)(za2, zb2).backward()
    assert za2.grad is None or za2.grad.abs().sum() == 0


def test_multitask_loss_composes_the_terms() -> None:
    za, zb = heads()
    la = torch.tensor([0, -100, 2, 1, -100, -100])
    lb = torch.tensor([[math.nan] * 2, [1.0, 0.0], [math.nan, 1.0], [0.0, 1.0], [math.nan] * 2, [1.0, 1.0]])
    full = ntl.MultiTaskLoss(R, weight=2.0, matching_weight=0.3, co_annotation_weight=0.7)
    total = full(za, zb, la, lb)
    t = full.last_terms
    expected = 2.0 * (
        t["supervised_a"]
        + t["supervised_b"]
        + 0.3 * (t["matching/a_to_b"] + t["matching/b_to_a"])
        + 0.7 * (t["co_annotation/a"] + t["co_annotation/b"])
    )
    torch.testing.assert_close(total.detach(), expected)
    torch.testing.assert_close(t["loss"], total.detach())
    torch.testing.assert_close(t["matching/loss"], t["matching/a_to_b"] + t["matching/b_to_a"])
    plain = ntl.MultiTaskLoss(R, matching_weight=0.0, co_annotation_weight=0.0)
    plain(za, zb, la, lb)
    assert set(plain.last_terms) == {"loss", "supervised_a", "supervised_b"}
    torch.testing.assert_close(
        plain.last_terms["supervised_b"], ntf.masked_binary_cross_entropy(za[:, :2].detach() * 0 + zb.detach(), lb)
    )


def test_multiclass_task_b() -> None:
    r = ntl.TaskRelatedness([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], kind="multiclass")
    za, zb = heads()
    loss = ntl.MultiTaskLoss(r)(za, zb, torch.tensor([0, 1, -100, -100, 2, 0]), torch.tensor([-100, 1, 0, -100, 1, 1]))
    loss.backward()
    assert torch.isfinite(loss) and za.grad is not None and zb.grad is not None


def test_configuration_errors() -> None:
    with pytest.raises(TypeError, match=r"'relatedness' must be a TaskRelatedness"):
        ntl.DistributionMatchingLoss(torch.ones(3, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'directions' is empty"):
        ntl.DistributionMatchingLoss(R, directions=[])
    with pytest.raises(ValueError, match=r"'directions' must be one of 'a_to_b', 'b_to_a'"):
        ntl.DistributionMatchingLoss(R, directions=["a_to_c"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"inversion='product' needs at least one class"):
        ntl.DistributionMatchingLoss(ntl.TaskRelatedness([[0.0, 0.0]]), inversion="product")
