"""`TaskIrrelevantSuppression`: each method's value, missing labels, the adversarial head's lifecycle."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf


def batch(n: int = 12, d: int = 5, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.arange(n) % k
    return torch.randn(n, d, generator=g) + torch.eye(k, d)[u], u


@pytest.mark.parametrize(
    ("kwargs", "reference"),
    [
        ({"method": "hsic"}, lambda z, u, r: ntf.irrelevant_hsic(z, u, 3)),
        (
            {"method": "hsic", "kernel": "rbf", "normalized": True},
            lambda z, u, r: ntf.irrelevant_hsic(z, u, 3, "rbf", True),
        ),
        ({"method": "cka"}, lambda z, u, r: ntf.linear_cka(z, r)),
    ],
    ids=["hsic", "hsic-rbf-normalized", "cka"],
)
def test_value_is_weight_times_the_functional(kwargs: dict, reference) -> None:  # type: ignore[no-untyped-def]
    z, u = batch()
    r = torch.randn(12, 7)
    loss = ntl.TaskIrrelevantSuppression(num_irrelevant=3, weight=0.5, **kwargs)
    torch.testing.assert_close(loss(z, u, r), 0.5 * reference(z, u, r))
    assert set(loss.last_terms) >= {"loss", "value"}


@pytest.mark.parametrize("method", ["hsic", "adversarial"])
def test_all_labels_missing_gives_zero_loss_and_gradient(method: str) -> None:
    z, _ = batch()
    z.requires_grad_(True)
    loss = ntl.TaskIrrelevantSuppression(method, 3, feature_dim=5)  # type: ignore[arg-type]
    out = loss(z, torch.full((12,), -100))
    out.backward()
    assert out.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["hsic", "adversarial"])
def test_one_class_present_only_is_finite(method: str) -> None:
    z, _ = batch()
    z.requires_grad_(True)
    out = ntl.TaskIrrelevantSuppression(method, 3, feature_dim=5)(z, torch.ones(12, dtype=torch.long))  # type: ignore[arg-type]
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()  # type: ignore[arg-type]


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"'method' must be one of 'adversarial', 'hsic', 'cka'"):
        ntl.TaskIrrelevantSuppression("mmd", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"method='hsic' needs 'num_irrelevant'"):
        ntl.TaskIrrelevantSuppression("hsic")
    with pytest.raises(ValueError, match=r"needs 'feature_dim'"):
        ntl.TaskIrrelevantSuppression("adversarial", 3)
    z, u = batch()
    with pytest.raises(ValueError, match=r"needs 'irrelevant_labels'"):
        ntl.TaskIrrelevantSuppression("hsic", 3)(z)
    with pytest.raises(ValueError, match=r"needs 'irrelevant_features'"):
        ntl.TaskIrrelevantSuppression("cka")(z, u)
    with pytest.raises(ValueError, match=r"holds 3, outside \[0, 3\) for 3 irrelevant classes"):
        ntl.TaskIrrelevantSuppression("adversarial", 3, feature_dim=5)(z, u + 1)
    with pytest.raises(ValueError, match=r"at least 4 samples"):
        ntl.TaskIrrelevantSuppression("hsic", 3)(z[:3], u[:3])


def test_adversarial_head_is_a_parameter_and_reverses_the_gradient() -> None:
    z, u = batch()
    z.requires_grad_(True)
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, feature_dim=5, strength=0.5)
    assert {name for name, _ in loss.named_parameters()} == {"head.weight", "head.bias"}
    out = loss(z, u)
    out.backward()
    assert loss.head is not None and loss.head.weight.grad is not None
    # the features' gradient is the reverse of the CE gradient, scaled by the strength
    z2 = z.detach().clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(loss.head(z2), u)
    (ce_grad,) = torch.autograd.grad(ce, z2)
    torch.testing.assert_close(z.grad, -0.5 * ce_grad)


def test_warmup_schedule_rises_from_zero_to_strength() -> None:
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, feature_dim=5, strength=2.0, warmup_steps=10)
    z, u = batch()
    strengths = []
    for _ in range(12):
        loss(z, u)
        strengths.append(loss.last_terms["strength"].item())
    assert strengths[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(strengths[:11]))  # rising during the warm-up
    assert strengths[10] == pytest.approx(2.0 * (2 / (1 + torch.exp(torch.tensor(-10.0)).item()) - 1))
    assert int(loss.state_dict()["steps"]) == 12
    loss.eval()
    loss(z, u)
    assert int(loss.steps) == 12  # eval calls do not advance the schedule


def test_forgotten_head_parameters_are_reported() -> None:
    z, u = batch()
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, feature_dim=5, check_head_after=3)
    with pytest.warns(UserWarning, match=r"have not changed in 3 training steps: add them to the optimizer"):
        for _ in range(4):
            loss(z, u)

    trained = ntl.TaskIrrelevantSuppression("adversarial", 3, feature_dim=5, check_head_after=3)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            optimizer.zero_grad()
            trained(z, u).backward()
            optimizer.step()


def test_custom_head_and_maps() -> None:
    z, u = batch(12, 12)
    head = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, head=head, entropy_weight=0.1)
    assert torch.isfinite(loss(z.reshape(12, 3, 2, 2), u))
    assert "entropy_weight=0.1" in repr(loss)
