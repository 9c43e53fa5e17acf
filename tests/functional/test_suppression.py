"""Suppression functions against float64 oracles of METHODS.md §2."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import GRAD_SCALE, assert_matches_oracle, value_and_grads
from torch import nn

import negtransfer_losses.functional as ntf


def data(n: int = 10, d: int = 4, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % k
    z = torch.randn(n, d, generator=g, dtype=torch.float64) + torch.eye(k, d, dtype=torch.float64)[labels]
    return z, labels


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("normalized", [False, True])
def test_irrelevant_hsic_matches_oracle_over_known_labels(kernel: str, normalized: bool) -> None:
    z, u = data(12)
    u[[1, 5, 6]] = -100
    assert_matches_oracle(
        lambda f: ntf.irrelevant_hsic(f, u, 3, kernel=kernel, normalized=normalized),  # type: ignore[arg-type]
        lambda f: oracles.irrelevant_hsic(f, u, 3, kernel, normalized),
        z,
        rtol=1e-8,
        atol=1e-11,
    )


def test_irrelevant_hsic_on_maps_flattens_them() -> None:
    z, u = data(8, 12)
    torch.testing.assert_close(ntf.irrelevant_hsic(z.reshape(8, 3, 2, 2), u, 3), ntf.irrelevant_hsic(z, u, 3))


def test_no_known_label_gives_zero_loss_and_zero_gradient() -> None:
    z, _ = data(8)
    none_known = torch.full((8,), -100)
    value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_hsic(f, none_known, 3), z)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))
    three_known = none_known.clone()
    three_known[:3] = torch.tensor([0, 1, 2])
    value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_hsic(f, three_known, 3), z)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


def test_one_class_only_is_finite() -> None:
    z, _ = data(8)
    u = torch.zeros(8, dtype=torch.long)
    for normalized in (False, True):
        value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_hsic(f, u, 3, normalized=normalized), z)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert ntf.irrelevant_hsic(z, u, 3, normalized=True).item() == 0.0


def test_hostile_labels_and_batches() -> None:
    z, u = data(8)
    with pytest.raises(ValueError, match=r"'irrelevant_labels' holds 7, outside \[0, 3\) for 3 irrelevant classes"):
        ntf.irrelevant_hsic(z, torch.tensor([0, 1, 2, 7, 0, 1, 2, 0]), 3)
    with pytest.raises(ValueError, match=r"holds -1, outside"):
        ntf.irrelevant_hsic(z, torch.tensor([0, 1, 2, -1, 0, 1, 2, 0]), 3)
    with pytest.raises(ValueError, match=r"unbiased HSIC needs at least 4 samples in 'features', got a batch of 3"):
        ntf.irrelevant_hsic(z[:3], u[:3], 3)
    with pytest.raises(TypeError, match=r"integer class indices, got dtype torch.float32"):
        ntf.irrelevant_hsic(z, u.float(), 3)
    with pytest.raises(ValueError, match=r"shape \(8,\) to match the batch of 8, got \(7,\)"):
        ntf.irrelevant_hsic(z, u[:7], 3)


def test_irrelevant_cka_is_linear_cka_with_the_reference_detached() -> None:
    z, _ = data(9, 4)
    ref = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    value = ntf.irrelevant_cka(z, ref)
    torch.testing.assert_close(value, oracles.linear_cka_feature_space(z, ref.detach()))
    assert not value.requires_grad or value.grad_fn is not None
    z.requires_grad_(True)
    ntf.irrelevant_cka(z, ref).backward()
    assert ref.grad is None


def test_gradient_reversal_flips_and_scales_the_gradient() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = ntf.gradient_reversal(x, 0.25)
    torch.testing.assert_close(y, x)
    (grad,) = torch.autograd.grad(GRAD_SCALE * (y * y).sum(), x)
    torch.testing.assert_close(grad, -0.25 * GRAD_SCALE * 2 * x.detach())


@pytest.mark.parametrize("strength", [1.0, 0.3])
@pytest.mark.parametrize("entropy_weight", [0.0, 0.5])
def test_adversarial_loss_value_and_gradient_signs(strength: float, entropy_weight: float) -> None:
    z, u = data(10, 4)
    u[2] = -100
    head = nn.Linear(4, 3).double()
    z = z.requires_grad_(True)
    loss = ntf.adversarial_suppression(z, u, head, 3, strength=strength, entropy_weight=entropy_weight)
    grads = torch.autograd.grad(GRAD_SCALE * loss, [z, head.weight])

    z_ref = z.detach().clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    ce = oracles.cross_entropy(z_ref @ w_ref.T + head.bias.detach(), u)
    entropy = oracles.mean_p_log_p(z_ref @ w_ref.T.detach() + head.bias.detach())
    torch.testing.assert_close(loss.detach(), (ce + entropy_weight * entropy).detach())
    ce_grad_z, ce_grad_w = torch.autograd.grad(GRAD_SCALE * ce, [z_ref, w_ref])
    (ent_grad_z,) = (
        torch.autograd.grad(GRAD_SCALE * entropy_weight * entropy, [z_ref]) if entropy_weight else (0 * z_ref,)
    )
    # the head learns to predict u; the features get the reversed gradient (and the entropy term's)
    torch.testing.assert_close(grads[1], ce_grad_w)
    torch.testing.assert_close(grads[0], -strength * ce_grad_z + ent_grad_z)


def test_adversarial_with_no_known_label_is_zero() -> None:
    z, _ = data(6)
    head = nn.Linear(4, 3).double()
    value, (grad,) = value_and_grads(lambda f: ntf.adversarial_suppression(f, torch.full((6,), -100), head, 3), z)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


def test_adversarial_head_of_wrong_shape_is_a_clear_error() -> None:
    z, u = data(6)
    with pytest.raises(ValueError, match=r"must map features of shape \(6, 4\) to logits \(6, 3\), got \(6, 5\)"):
        ntf.adversarial_suppression(z, u, nn.Linear(4, 5).double(), 3)


def test_erasure_removes_mean_differences_and_keeps_orthogonal_directions() -> None:
    means = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    basis = ntf.erasure_basis(means)
    assert basis.shape == (4, 2)
    torch.testing.assert_close(basis.T @ basis, torch.eye(2, dtype=torch.float64))
    out = ntf.erase(means, basis)
    torch.testing.assert_close(out - out.mean(0), torch.zeros_like(out))
    z = torch.tensor([[0.3, -1.0, 5.0, 7.0]], dtype=torch.float64)
    torch.testing.assert_close(ntf.erase(z, basis)[0, 2:], z[0, 2:])
    assert ntf.erasure_basis(torch.ones(3, 4)).shape == (4, 0)


# --- conditional forms (docs/task-irrelevant-labels.md, "Conditional suppression") -----------------------


def conditional_data(n: int = 24, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task classes 0-2 with u tied to y on most samples, a class with a single u value, unknown entries."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    u = y.clone()
    u[[0, 4, 7, 10, 13]] = torch.tensor([1, 2, 2, 0, 1])  # classes 0 and 1 get a second u value
    u[[2, 5]] = -100
    y[[3, 9]] = -100
    u[y == 2] = 2  # class 2: a single u value, contributes nothing
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) + torch.eye(3, 4, dtype=torch.float64)[u.clamp(0)]
    return z, u, y


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("unbiased", [True, False])
def test_conditional_hsic_matches_oracle(kernel: str, normalized: bool, unbiased: bool) -> None:
    z, u, y = conditional_data()
    assert_matches_oracle(
        lambda f: ntf.irrelevant_hsic(
            f,
            u,
            3,
            kernel,  # type: ignore[arg-type]
            normalized,
            unbiased=unbiased,
            task_labels=y,
        ),
        lambda f: oracles.conditional_irrelevant_hsic(f, u, y, 3, kernel, normalized, unbiased),
        z,
        rtol=1e-8,
    )


def test_conditional_hsic_is_the_within_class_measure() -> None:
    """Features that carry u only through y: the plain HSIC sees it, the conditional one does not."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(40) % 4
    u = y.clone()
    u[::5] = (u[::5] + 1) % 4  # 80 % tied to y
    z = torch.randn(40, 3, generator=g, dtype=torch.float64) * 0.1 + torch.eye(4, 3, dtype=torch.float64)[y]
    plain = ntf.irrelevant_hsic(z, u, 4, normalized=True)
    conditional = ntf.irrelevant_hsic(z, u, 4, normalized=True, task_labels=y)
    assert plain > 0.3 and abs(conditional.item()) < 0.1
    z_u = z + 2 * torch.eye(4, 3, dtype=torch.float64)[u]  # now z also says u within each class
    assert ntf.irrelevant_hsic(z_u, u, 4, normalized=True, task_labels=y) > 0.3


@pytest.mark.parametrize(
    "case",
    ["all u unknown", "all y unknown", "one u value per class", "classes of 3 (unbiased)"],
)
def test_conditional_hsic_hostile_inputs_give_zero_with_zero_gradient(case: str) -> None:
    z, u, y = conditional_data()
    if case == "all u unknown":
        u = torch.full_like(u, -100)
    elif case == "all y unknown":
        y = torch.full_like(y, -100)
    elif case == "one u value per class":
        u = y.clamp(0)
    else:
        y = torch.arange(24) // 3  # 8 classes of 3 samples
        u = torch.arange(24) % 3
    for normalized in (False, True):
        value, (grad,) = value_and_grads(
            lambda f, normalized=normalized: ntf.irrelevant_hsic(f, u, 3, normalized=normalized, task_labels=y), z
        )
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


@pytest.mark.parametrize("strength", [1.0, 0.3])
def test_conditional_adversarial_matches_oracle(strength: float) -> None:
    z, u, y = conditional_data()
    head = nn.Linear(4, 3).double()
    z = z.requires_grad_(True)
    loss = ntf.adversarial_suppression(z, u, head, 3, strength=strength, task_labels=y)
    grads = torch.autograd.grad(GRAD_SCALE * loss, [z, head.weight, head.bias])
    z_ref = z.detach().clone().requires_grad_(True)
    w_ref = head.weight.detach().clone().requires_grad_(True)
    b_ref = head.bias.detach().clone().requires_grad_(True)
    ce = oracles.conditional_adversarial_ce(z_ref, u, y, w_ref, b_ref)
    torch.testing.assert_close(loss.detach(), ce.detach(), rtol=1e-10, atol=1e-12)
    gz, gw, gb = torch.autograd.grad(GRAD_SCALE * ce, [z_ref, w_ref, b_ref])
    torch.testing.assert_close(grads[1], gw)
    torch.testing.assert_close(grads[2], gb)
    torch.testing.assert_close(grads[0], -strength * gz)  # the features get the reversed gradient
    assert torch.equal(grads[0][y == 2], torch.zeros_like(grads[0][y == 2]))  # single-u class: no gradient


def test_conditional_adversarial_hostile_inputs() -> None:
    z, u, y = conditional_data()
    head = nn.Linear(4, 3).double()
    for labels, tasks in ((u, torch.full_like(y, -100)), (y.clamp(0), y), (torch.full_like(u, -100), y)):
        value, (grad,) = value_and_grads(
            lambda f, a=labels, b=tasks: ntf.adversarial_suppression(f, a, head, 3, task_labels=b), z
        )
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))
    with pytest.raises(ValueError, match=r"needs 'irrelevant_labels' as well as 'task_labels'"):
        ntf.adversarial_suppression(z, None, head, 3, task_labels=y)
    with pytest.raises(TypeError, match=r"'task_labels' must hold integer class indices"):
        ntf.adversarial_suppression(z, u, head, 3, task_labels=y.double())
    with pytest.raises(ValueError, match=r"'task_labels' holds -1, task classes are ≥ 0; mark unknown"):
        ntf.irrelevant_hsic(z, u, 3, task_labels=y.clamp(0) - 1)
    with pytest.raises(ValueError, match=r"'task_labels' must have shape \(24,\) to match the batch of 24"):
        ntf.irrelevant_cka(z, z, task_labels=y[:5])


@pytest.mark.parametrize("unbiased", [False, True])
def test_conditional_cka_matches_oracle(unbiased: bool) -> None:
    z, _, y = conditional_data()
    g = torch.Generator().manual_seed(5)
    r = torch.randn(24, 6, generator=g, dtype=torch.float64) + z[:, :1]
    assert_matches_oracle(
        lambda f: ntf.irrelevant_cka(f, r, unbiased=unbiased, task_labels=y),
        lambda f: oracles.conditional_cka(f, r, y, unbiased),
        z,
        rtol=1e-8,
    )
    value, (grad,) = value_and_grads(lambda f: ntf.irrelevant_cka(f, r, task_labels=torch.full_like(y, -100)), z)
    assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


def test_within_class_cross_covariance_matches_oracle() -> None:
    from negtransfer_losses.functional.erasure import within_class_cross_covariance

    z, u, y = conditional_data()
    value, count = within_class_cross_covariance(z, u, y, 3)
    expected, expected_count = oracles.within_class_cross_covariance(z, u, y, 3)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)
    assert count == expected_count
    empty, none = within_class_cross_covariance(z, y.clamp(0), y, 3)
    assert none == 0 and torch.equal(empty, torch.zeros(4, 3, dtype=torch.float64))


def test_biased_hsic_reaches_the_math() -> None:
    z, u = data(12)
    biased = ntf.irrelevant_hsic(z, u, 3, unbiased=False)
    torch.testing.assert_close(
        biased, oracles.hsic_biased(oracles.linear_kernel(z), oracles.onehot_kernel(u, 3)), rtol=1e-10, atol=1e-12
    )
    assert not torch.isclose(biased, ntf.irrelevant_hsic(z, u, 3))
