"""`TaskIrrelevantSuppression`: each method's value, missing labels, the adversarial head's lifecycle."""

from __future__ import annotations

import inspect
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
    options = {"num_irrelevant": 3} if kwargs["method"] != "cka" else {}
    loss = ntl.TaskIrrelevantSuppression(weight=0.5, **options, **kwargs)
    out = loss(z, irrelevant_features=r) if kwargs["method"] == "cka" else loss(z, u)
    torch.testing.assert_close(out, 0.5 * reference(z, u, r))
    assert set(loss.last_terms) >= {"loss", "value"}


@pytest.mark.parametrize("method", ["hsic", "adversarial"])
def test_all_labels_missing_gives_zero_loss_and_gradient(method: str) -> None:
    z, _ = batch()
    z.requires_grad_(True)
    loss = ntl.TaskIrrelevantSuppression(method, 3, **({"dim": 5} if method == "adversarial" else {}))  # type: ignore[arg-type]
    out = loss(z, torch.full((12,), -100))
    out.backward()
    assert out.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["hsic", "adversarial"])
def test_one_class_present_only_is_finite(method: str) -> None:
    z, _ = batch()
    z.requires_grad_(True)
    loss = ntl.TaskIrrelevantSuppression(method, 3, **({"dim": 5} if method == "adversarial" else {}))  # type: ignore[arg-type]
    out = loss(z, torch.ones(12, dtype=torch.long))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(z.grad).all()  # type: ignore[arg-type]


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"'method' must be one of 'adversarial', 'hsic', 'cka'"):
        ntl.TaskIrrelevantSuppression("mmd", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"method='hsic' needs 'num_irrelevant'"):
        ntl.TaskIrrelevantSuppression("hsic")
    with pytest.raises(ValueError, match=r"needs 'dim'"):
        ntl.TaskIrrelevantSuppression("adversarial", 3)
    z, u = batch()
    with pytest.raises(ValueError, match=r"needs 'irrelevant_labels'"):
        ntl.TaskIrrelevantSuppression("hsic", 3)(z)
    with pytest.raises(ValueError, match=r"needs 'irrelevant_features'"):
        ntl.TaskIrrelevantSuppression("cka")(z, u)
    with pytest.raises(ValueError, match=r"holds 3, outside \[0, 3\) for 3 irrelevant classes"):
        ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5)(z, u + 1)
    with pytest.raises(ValueError, match=r"at least 4 samples"):
        ntl.TaskIrrelevantSuppression("hsic", 3)(z[:3], u[:3])


def test_adversarial_head_is_a_parameter_and_reverses_the_gradient() -> None:
    z, u = batch()
    z.requires_grad_(True)
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, strength=0.5, head_lr_multiplier=1.0, head_steps=0)
    assert {name for name, _ in loss.named_parameters()} == {"head.weight", "head.bias"}
    out = loss(z, u)
    out.backward()
    assert loss.head is not None and loss.head.weight.grad is not None
    # the features' gradient is the reverse of the CE gradient, scaled by the strength
    z2 = z.detach().clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(loss.head(z2), u)
    (ce_grad,) = torch.autograd.grad(ce, z2)
    torch.testing.assert_close(z.grad, -0.5 * ce_grad)


def test_default_strength_is_one_value_for_the_module_and_the_function() -> None:
    z, u = batch()
    z.requires_grad_(True)
    module = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, head_lr_multiplier=1.0, head_steps=0)
    function_default = inspect.signature(ntf.adversarial_suppression).parameters["strength"].default
    assert module.strength == function_default == 0.3
    module(z, u).backward()
    assert module.last_terms["strength"].item() == pytest.approx(0.3)
    z2 = z.detach().clone().requires_grad_(True)
    assert module.head is not None
    (ce_grad,) = torch.autograd.grad(nn.functional.cross_entropy(module.head(z2), u), z2)
    torch.testing.assert_close(z.grad, -0.3 * ce_grad)


def test_warmup_schedule_rises_from_zero_to_strength() -> None:
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, strength=2.0, warmup_steps=10)
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
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, check_head_after=3)  # inner steps move it
    with pytest.warns(
        UserWarning,
        match=r"have not changed in 3 training steps \(between calls, where only your optimizer moves them\): add",
    ):
        for _ in range(4):
            loss(z, u)

    trained = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, check_head_after=3)
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


# --- options reach the math or raise (issue 12) ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs", "option"),
    [
        ("hsic", {"strength": 2.0}, "strength"),
        ("hsic", {"warmup_steps": 10}, "warmup_steps"),
        ("hsic", {"dim": 5}, "dim"),
        ("hsic", {"head": nn.Linear(5, 3)}, "head"),
        ("hsic", {"entropy_weight": 0.1}, "entropy_weight"),
        ("hsic", {"head_lr_multiplier": 3.0}, "head_lr_multiplier"),
        ("cka", {"normalized": True}, "normalized"),
        ("cka", {"num_irrelevant": 3}, "num_irrelevant"),
        ("cka", {"strength": 1.0}, "strength"),
        ("adversarial", {"kernel": "rbf"}, "kernel"),
        ("adversarial", {"unbiased": False}, "unbiased"),
        ("adversarial", {"normalized": True}, "normalized"),
        ("adversarial", {"gather": "global"}, "gather"),
    ],
)
def test_an_option_the_method_does_not_use_raises(method: str, kwargs: dict, option: str) -> None:
    base = {"num_irrelevant": 3} if method != "cka" and "num_irrelevant" not in kwargs else {}
    if method == "adversarial":
        base["dim"] = 5
    with pytest.raises(ValueError, match=rf"'{option}' does not apply to method='{method}'"):
        ntl.TaskIrrelevantSuppression(method, **base, **kwargs)  # type: ignore[arg-type]


def test_sigma_needs_the_rbf_kernel() -> None:
    with pytest.raises(ValueError, match=r"'sigma' is the RBF bandwidth: it needs kernel='rbf'"):
        ntl.TaskIrrelevantSuppression("hsic", 3, sigma=1.0)
    ntl.TaskIrrelevantSuppression("hsic", 3, kernel="rbf", sigma=1.0)


def test_hsic_unbiased_false_reaches_the_math() -> None:
    z, u = batch()
    biased = ntl.TaskIrrelevantSuppression("hsic", 3, unbiased=False)(z, u)
    torch.testing.assert_close(biased, ntf.irrelevant_hsic(z, u, 3, unbiased=False))
    assert not torch.isclose(biased, ntl.TaskIrrelevantSuppression("hsic", 3)(z, u))


def test_cka_kernel_and_unbiased_reach_the_math() -> None:
    z, _ = batch()
    r = torch.randn(12, 7, generator=torch.Generator().manual_seed(3)) + z[:, :1]
    rbf = ntl.TaskIrrelevantSuppression("cka", kernel="rbf")(z, irrelevant_features=r)
    torch.testing.assert_close(rbf, ntf.cka(z, r, kernel="rbf"))
    linear = ntl.TaskIrrelevantSuppression("cka")(z, irrelevant_features=r)
    unbiased = ntl.TaskIrrelevantSuppression("cka", unbiased=True)(z, irrelevant_features=r)
    assert len({round(rbf.item(), 6), round(linear.item(), 6), round(unbiased.item(), 6)}) == 3


def test_last_terms_layout() -> None:
    z, u = batch()
    for loss, args in (
        (ntl.TaskIrrelevantSuppression("hsic", 3, weight=2.0), (z, u)),
        (ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, weight=2.0), (z, u)),
        (ntl.TaskIrrelevantSuppression("cka", weight=2.0), (z, None, torch.randn(12, 3))),
    ):
        out = loss(*args)
        assert set(loss.last_terms) == (
            {"loss", "value", "strength"} if loss.method == "adversarial" else {"loss", "value"}
        )
        assert all(t.dim() == 0 and not t.requires_grad for t in loss.last_terms.values())
        torch.testing.assert_close(loss.last_terms["loss"], out.detach())
        torch.testing.assert_close(loss.last_terms["loss"], 2.0 * loss.last_terms["value"])


def test_task_labels_and_conditional_must_agree() -> None:
    z, u = batch()
    with pytest.raises(ValueError, match=r"conditional=True needs 'task_labels'"):
        ntl.TaskIrrelevantSuppression("hsic", 3, conditional=True)(z, u)
    with pytest.raises(ValueError, match=r"'task_labels' are used only with conditional=True"):
        ntl.TaskIrrelevantSuppression("hsic", 3)(z, u, task_labels=u)


@pytest.mark.parametrize("method", ["hsic", "adversarial", "cka"])
def test_conditional_module_is_weight_times_the_conditional_functional(method: str) -> None:
    z, u = batch(24)
    y = (torch.arange(24) // 2) % 3
    r = torch.randn(24, 4, generator=torch.Generator().manual_seed(2))
    if method == "hsic":
        loss = ntl.TaskIrrelevantSuppression("hsic", 3, weight=0.5, conditional=True)
        expected = ntf.irrelevant_hsic(z, u, 3, task_labels=y)
        out = loss(z, u, task_labels=y)
    elif method == "cka":
        loss = ntl.TaskIrrelevantSuppression("cka", weight=0.5, conditional=True)
        expected = ntf.irrelevant_cka(z, r, task_labels=y)
        out = loss(z, irrelevant_features=r, task_labels=y)
    else:
        loss = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, weight=0.5, conditional=True).eval()
        assert loss.head is not None
        expected = ntf.adversarial_suppression(
            z, u, loss.head, 3, task_labels=y, head_parameters=loss.head_parameters()
        )
        out = loss(z, u, task_labels=y)
    torch.testing.assert_close(out, 0.5 * expected)
    assert out.item() != 0.0


# --- the adversary's head learns fast by itself (issue 14) -------------------------------------------


def test_head_lr_multiplier_moves_the_effective_head_m_times_as_far() -> None:
    z, u = batch()
    moved = {}
    for m in (1.0, 10.0):
        torch.manual_seed(0)
        loss = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, head_lr_multiplier=m, head_steps=0)
        before = {k: v.detach().clone() for k, v in loss.head_parameters().items()}
        optimizer = torch.optim.SGD(loss.parameters(), lr=0.01)
        optimizer.zero_grad()
        loss(z, u).backward()
        optimizer.step()
        moved[m] = {k: v.detach() - before[k] for k, v in loss.head_parameters().items()}
        if m == 10.0:  # the effective initial head is the ordinary one
            torch.manual_seed(0)
            torch.testing.assert_close(before["weight"], nn.Linear(5, 3).weight.detach())
    for name in moved[1.0]:
        torch.testing.assert_close(moved[10.0][name], 10.0 * moved[1.0][name])


def test_inner_head_steps_train_the_head_in_training_mode_only() -> None:
    z, u = batch()
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5, head_steps=5)
    before = [p.detach().clone() for p in loss.parameters()]
    first = loss(z, u).item()
    assert any(not torch.equal(a, p) for a, p in zip(before, loss.parameters(), strict=True))
    assert loss(z, u).item() < first  # the head improved on this batch by itself
    loss.eval()
    frozen = [p.detach().clone() for p in loss.parameters()]
    loss(z, u)
    assert all(torch.equal(a, p) for a, p in zip(frozen, loss.parameters(), strict=True))


def test_inner_head_steps_keep_the_users_accumulated_gradients() -> None:
    z, u = batch()
    loss = ntl.TaskIrrelevantSuppression("adversarial", 3, dim=5)
    loss(z, u).backward()
    accumulated = [p.grad.clone() for p in loss.parameters()]  # type: ignore[union-attr]
    second = loss(z, u)  # inner steps run here
    assert all(torch.equal(a, p.grad) for a, p in zip(accumulated, loss.parameters(), strict=True))
    second.backward()
    assert all(not torch.equal(a, p.grad) for a, p in zip(accumulated, loss.parameters(), strict=True))
