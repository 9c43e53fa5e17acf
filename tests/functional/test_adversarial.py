"""The adversary's functions (gradient reversal, `adversarial_suppression`) against float64 oracles of METHODS.md §2."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import GRAD_SCALE, conditional_data, count_syncs, value_and_grads
from torch import nn

import negtransfer_losses.functional as ntf


def data(n: int = 10, d: int = 4, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + torch.eye(k, d, dtype=torch.float64)[labels]
    return z, labels


def linear_head(d: int = 4, k: int = 3, seed: int = 3) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, k).double()


@pytest.mark.parametrize("strength", [0.25, torch.tensor(0.25)], ids=["float", "tensor"])
def test_gradient_reversal_flips_and_scales_the_gradient(strength: float | torch.Tensor) -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = ntf.gradient_reversal(x, strength)
    torch.testing.assert_close(y, x)
    (grad,) = torch.autograd.grad(GRAD_SCALE * (y * y).sum(), x)
    torch.testing.assert_close(grad, -0.25 * GRAD_SCALE * 2 * x.detach())
    with pytest.raises(TypeError, match=r"'strength' must be a number or a one-value tensor, got shape \(2,\)"):
        ntf.gradient_reversal(x, torch.ones(2))


@pytest.mark.parametrize("strength", [1.0, 0.3])
@pytest.mark.parametrize("entropy_weight", [0.0, 0.5])
def test_adversarial_loss_value_and_gradient_signs(strength: float, entropy_weight: float) -> None:
    z, u = data(10, 4)
    u[2] = -100
    head = linear_head()
    z = z.requires_grad_(True)
    loss = ntf.adversarial_suppression(z, u, head, num_irrelevant=3, strength=strength, entropy_weight=entropy_weight)
    grads = torch.autograd.grad(GRAD_SCALE * loss, [z, head.weight, head.bias])

    z_ref = z.detach().clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    b_ref = head.bias.detach().clone().requires_grad_(True)
    ce = oracles.cross_entropy(z_ref @ w_ref.T + b_ref, u)
    entropy = oracles.mean_p_log_p(z_ref @ w_ref.T.detach() + b_ref.detach())
    torch.testing.assert_close(loss.detach(), (ce + entropy_weight * entropy).detach(), rtol=1e-12, atol=1e-12)
    ce_grad_z, ce_grad_w, ce_grad_b = torch.autograd.grad(GRAD_SCALE * ce, [z_ref, w_ref, b_ref])
    (ent_grad_z,) = (
        torch.autograd.grad(GRAD_SCALE * entropy_weight * entropy, [z_ref]) if entropy_weight else (0 * z_ref,)
    )
    # the head learns to predict u; the features get the reversed gradient (and the entropy term's)
    torch.testing.assert_close(grads[1], ce_grad_w)
    torch.testing.assert_close(grads[2], ce_grad_b)
    torch.testing.assert_close(grads[0], -strength * ce_grad_z + ent_grad_z)
    assert grads[0][2].abs().sum() > 0 if entropy_weight else torch.equal(grads[0][2], torch.zeros(4).double())


def test_unknown_rows_never_reach_the_cross_entropy() -> None:
    """A NaN in a sample whose label is unknown leaves the value and every gradient finite (no boolean indexing)."""
    z, u = data(10, 4)
    u[[1, 6]] = -100
    z[[1, 6]] = float("nan")
    head = linear_head()
    value, (grad,) = value_and_grads(lambda f: ntf.adversarial_suppression(f, u, head, num_irrelevant=3), z)
    known = u != -100
    expected = oracles.cross_entropy(z[known] @ head.weight.detach().T + head.bias.detach(), u[known])
    torch.testing.assert_close(value, expected.detach())
    assert torch.isfinite(grad).all() and torch.equal(grad[1], torch.zeros(4).double())


def test_adversarial_with_no_known_label_is_zero() -> None:
    z, _ = data(6)
    head = linear_head()
    value, (grad,) = value_and_grads(
        lambda f: ntf.adversarial_suppression(f, torch.full((6,), -100), head, num_irrelevant=3), z
    )
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))
    loss = ntf.adversarial_suppression(z, torch.full((6,), -100), head, num_irrelevant=3)
    (head_grad,) = torch.autograd.grad(loss, head.weight)
    assert torch.equal(head_grad, torch.zeros_like(head_grad))


def test_labels_none_gives_the_entropy_term_only() -> None:
    z, _ = data(6)
    head = linear_head()
    assert ntf.adversarial_suppression(z, None, head, num_irrelevant=3).item() == 0.0
    value = ntf.adversarial_suppression(z, None, head, num_irrelevant=3, entropy_weight=2.0)
    expected = 2.0 * oracles.mean_p_log_p(z @ head.weight.detach().T + head.bias.detach())
    torch.testing.assert_close(value.detach(), expected)


def test_adversarial_head_of_wrong_shape_is_a_clear_error() -> None:
    z, u = data(6)
    with pytest.raises(ValueError, match=r"must map features of shape \(6, 4\) to logits \(6, 3\), got \(6, 5\)"):
        ntf.adversarial_suppression(z, u, nn.Linear(4, 5).double(), num_irrelevant=3)
    with pytest.raises(ValueError, match=r"could not take features of shape \(6, 4\) \(flattened\)"):
        ntf.adversarial_suppression(z, u, nn.Linear(7, 3).double(), num_irrelevant=3)


def test_options_are_keyword_only() -> None:
    z, u = data(6)
    with pytest.raises(TypeError):
        ntf.adversarial_suppression(z, u, linear_head(), 3)  # type: ignore[misc]


def test_head_parameters_replace_the_heads_own() -> None:
    z, u = data(10)
    head, other = linear_head(seed=3), linear_head(seed=4)
    replaced = ntf.adversarial_suppression(z, u, head, num_irrelevant=3, head_parameters=dict(other.named_parameters()))
    torch.testing.assert_close(replaced, ntf.adversarial_suppression(z, u, other, num_irrelevant=3))
    assert not torch.allclose(replaced, ntf.adversarial_suppression(z, u, head, num_irrelevant=3))


@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_conditional_adversarial_matches_oracle(strength: float) -> None:
    z, u, y = conditional_data()
    head = linear_head()
    z = z.requires_grad_(True)
    loss = ntf.adversarial_suppression(z, u, head, num_irrelevant=3, strength=strength, task_labels=y)
    grads = torch.autograd.grad(GRAD_SCALE * loss, [z, head.weight, head.bias])
    z_ref = z.detach().clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    b_ref = head.bias.detach().clone().requires_grad_(True)
    ce = oracles.conditional_adversarial_ce(z_ref, u, y, w_ref, b_ref)  # the log-prior offset included
    torch.testing.assert_close(loss.detach(), ce.detach(), rtol=1e-10, atol=1e-12)
    gz, gw, gb = torch.autograd.grad(GRAD_SCALE * ce, [z_ref, w_ref, b_ref])
    torch.testing.assert_close(grads[1], gw)
    torch.testing.assert_close(grads[2], gb)
    torch.testing.assert_close(grads[0], -strength * gz)  # the features get the reversed gradient
    assert torch.equal(grads[0][y == 2], torch.zeros_like(grads[0][y == 2]))  # single-u class: no gradient


def test_conditional_entropy_term_averages_over_the_eligible_samples() -> None:
    z, u, y = conditional_data()
    head = linear_head()

    def with_entropy(f: torch.Tensor) -> torch.Tensor:
        return ntf.adversarial_suppression(f, u, head, num_irrelevant=3, entropy_weight=0.5, task_labels=y)

    def oracle(f: torch.Tensor) -> torch.Tensor:
        w, b = head.weight.detach(), head.bias.detach()
        return oracles.conditional_adversarial_ce(f, u, y, w, b) + 0.5 * oracles.conditional_adversarial_entropy(
            f, u, y, w, b
        )

    value, (grad,) = value_and_grads(with_entropy, z)
    expected, _ = value_and_grads(oracle, z)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    # the entropy term's gradient reaches the features (not reversed), the CE's is reversed
    ce_value, (ce_grad,) = value_and_grads(
        lambda f: ntf.adversarial_suppression(f, u, head, num_irrelevant=3, task_labels=y), z
    )
    _, (entropy_grad,) = value_and_grads(
        lambda f: oracles.conditional_adversarial_entropy(f, u, y, head.weight.detach(), head.bias.detach()), z
    )
    torch.testing.assert_close(grad, ce_grad + 0.5 * entropy_grad, rtol=1e-9, atol=1e-11)
    assert ce_value.item() != value.item()


def test_conditional_adversarial_hostile_inputs() -> None:
    z, u, y = conditional_data()
    head = linear_head()
    for labels, tasks in ((u, torch.full_like(y, -100)), (y.clamp(0), y), (torch.full_like(u, -100), y)):
        value, (grad,) = value_and_grads(
            lambda f, a=labels, b=tasks: ntf.adversarial_suppression(f, a, head, num_irrelevant=3, task_labels=b), z
        )
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))
    with pytest.raises(ValueError, match=r"needs 'irrelevant_labels' as well as 'task_labels'"):
        ntf.adversarial_suppression(z, None, head, num_irrelevant=3, task_labels=y)
    with pytest.raises(TypeError, match=r"'task_labels' must hold integer class indices"):
        ntf.adversarial_suppression(z, u, head, num_irrelevant=3, task_labels=y.double())
    with pytest.raises(ValueError, match=r"'task_labels' holds -1, task classes are ≥ 0; mark unknown"):
        ntf.adversarial_suppression(z, u, head, num_irrelevant=3, task_labels=y.clamp(0) - 1)
    with pytest.raises(ValueError, match=r"'irrelevant_labels' holds 3, outside \[0, 3\) for 3 irrelevant classes"):
        ntf.adversarial_suppression(z, u.clamp(0) + 1, head, num_irrelevant=3, task_labels=y)
    with pytest.raises(ValueError, match=r"'task_labels' must have shape \(24,\) to match the batch of 24"):
        ntf.adversarial_suppression(z, u, head, num_irrelevant=3, task_labels=y[:5])


@pytest.mark.parametrize("conditional", [False, True])
def test_no_host_device_sync(conditional: bool) -> None:
    z, u, y = conditional_data()
    z = z.float().requires_grad_(True)
    head = nn.Linear(4, 3)
    strength = torch.tensor(0.3)

    def step() -> None:
        task_labels = y if conditional else None
        ntf.adversarial_suppression(
            z, u, head, num_irrelevant=3, strength=strength, entropy_weight=0.1, task_labels=task_labels
        ).backward()

    step()
    syncs = count_syncs(step)
    assert syncs.total == 0, dict(syncs.counts)
