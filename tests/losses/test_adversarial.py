"""`AdversarialSuppression`: the value, the user's head left alone, its parameter group, its own steps, no sync."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
import warnings

import pytest
import torch
from helpers import checks_deferred_on_cpu, count_syncs
from torch import Tensor, nn

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf


def batch(n: int = 12, d: int = 5, k: int = 3, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.arange(n) % k
    return torch.randn(n, d, generator=g) + torch.eye(k, d)[u], u


def conditional_batch(n: int = 24) -> tuple[Tensor, Tensor, Tensor]:
    z, u = batch(n)
    return z, u, (torch.arange(n) // 2) % 3


def known_ce(head: nn.Module, z: Tensor, u: Tensor) -> Tensor:
    known = u != -100
    return nn.functional.cross_entropy(head(z[known]), u[known])


# --- the value ---------------------------------------------------------------------------------------------


def test_eval_value_is_weight_times_the_functional() -> None:
    z, u = batch()
    u[3] = -100
    loss = ntl.AdversarialSuppression(3, dim=5, weight=0.5, entropy_weight=0.2).eval()
    expected = ntf.adversarial_suppression(z, u, loss.head, num_irrelevant=3, entropy_weight=0.2)
    before = [p.detach().clone() for p in loss.parameters()]
    torch.testing.assert_close(loss(z, u), 0.5 * expected)
    assert all(torch.equal(a, p) for a, p in zip(before, loss.parameters(), strict=True))
    assert loss.last_terms["value"].item() == pytest.approx(expected.item())


def test_conditional_eval_value_is_weight_times_the_conditional_functional() -> None:
    z, u, y = conditional_batch()
    loss = ntl.AdversarialSuppression(3, dim=5, weight=0.5, conditional=True).eval()
    expected = ntf.adversarial_suppression(z, u, loss.head, num_irrelevant=3, task_labels=y)
    out = loss(z, u, task_labels=y)
    torch.testing.assert_close(out, 0.5 * expected)
    assert out.item() != 0.0


def test_without_inner_steps_the_training_value_is_the_functional() -> None:
    z, u = batch()
    loss = ntl.AdversarialSuppression(3, dim=5, head_steps=0)
    torch.testing.assert_close(loss(z, u), ntf.adversarial_suppression(z, u, loss.head, num_irrelevant=3))


def test_training_value_comes_after_the_heads_own_steps() -> None:
    z, u, y = conditional_batch()
    for conditional in (False, True):
        torch.manual_seed(0)
        loss = ntl.AdversarialSuppression(3, dim=5, conditional=conditional)
        task_labels = y if conditional else None
        before = ntf.adversarial_suppression(z, u, loss.head, num_irrelevant=3, task_labels=task_labels)
        out = loss(z, u, task_labels=task_labels)
        after = ntf.adversarial_suppression(z, u, loss.head, num_irrelevant=3, task_labels=task_labels)
        torch.testing.assert_close(out, after)  # the function on the head as its own steps left it
        assert out.item() < before.item() - 0.05  # the head caught up on this batch


def test_inner_steps_are_adam_at_head_lr_times_the_multiplier() -> None:
    """The head's own steps equal `torch.optim.Adam` at `head_lr × head_lr_multiplier` on its real parameters,
    its state carried from call to call."""
    z, u = batch()
    u[4] = -100
    loss = ntl.AdversarialSuppression(3, dim=5, head_steps=4, head_lr=2e-3, head_lr_multiplier=5.0)
    reference = copy.deepcopy(loss.head)
    adam = torch.optim.Adam(reference.parameters(), lr=2e-3 * 5.0)
    for call in range(3):
        features = z + 0.1 * call
        loss(features, u)
        for _ in range(4):
            adam.zero_grad()
            known_ce(reference, features, u).backward()
            adam.step()
        for a, b in zip(loss.head.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(loss.head_optimizer.step) == 12


def test_inner_steps_move_the_head_as_a_head_stored_divided_by_m_would() -> None:
    """The scaled-storage reparametrization (store `p / m`, call the head with `m × stored`, Adam at `head_lr` on the
    stored values) moves `p` by `m × head_lr × adam(g)`: Adam at `head_lr × m` on `p` (Adam ignores the scale of g)."""
    z, u = batch()
    m, lr, steps = 10.0, 3e-3, 10
    loss = ntl.AdversarialSuppression(3, dim=5, head_steps=steps, head_lr=lr, head_lr_multiplier=m)
    stored = [nn.Parameter(p.detach().clone() / m) for p in loss.head.parameters()]
    adam = torch.optim.Adam(stored, lr=lr)
    for _ in range(steps):
        w, b = (m * s.detach() + (s - s.detach()) for s in stored)  # value m·s, gradient that of the effective one
        adam.zero_grad()
        nn.functional.cross_entropy(z @ w.T + b, u).backward()
        adam.step()
    loss(z, u)
    for p, s in zip(loss.head.parameters(), stored, strict=True):
        torch.testing.assert_close(p.detach(), m * s.detach(), rtol=1e-4, atol=1e-5)


def test_inner_steps_train_the_head_in_training_mode_with_grad_only() -> None:
    z, u = batch()
    loss = ntl.AdversarialSuppression(3, dim=5, head_steps=5)
    before = [p.detach().clone() for p in loss.parameters()]
    first = loss(z, u).item()
    assert all(not torch.equal(a, p) for a, p in zip(before, loss.parameters(), strict=True))
    assert loss(z, u).item() < first
    for mode in ("eval", "no_grad"):
        frozen = [p.detach().clone() for p in loss.parameters()]
        if mode == "eval":
            loss.eval()
            loss(z, u)
            loss.train()
        else:
            with torch.no_grad():
                loss(z, u)
        assert all(torch.equal(a, p) for a, p in zip(frozen, loss.parameters(), strict=True)), mode


def test_inner_steps_keep_the_users_accumulated_gradients() -> None:
    z, u = batch()
    loss = ntl.AdversarialSuppression(3, dim=5)
    loss(z, u).backward()
    accumulated = [p.grad.clone() for p in loss.parameters()]  # type: ignore[union-attr]
    second = loss(z, u)  # inner steps run here
    assert all(torch.equal(a, p.grad) for a, p in zip(accumulated, loss.parameters(), strict=True))
    second.backward()
    assert all(not torch.equal(a, p.grad) for a, p in zip(accumulated, loss.parameters(), strict=True))


def test_two_calls_then_one_backward_give_each_calls_gradients() -> None:
    """A second call's head steps do not invalidate the first call's graph (e.g. one adversary on two views)."""
    z, u = batch()
    together, apart = ntl.AdversarialSuppression(3, dim=5), ntl.AdversarialSuppression(3, dim=5)
    apart.load_state_dict(together.state_dict())
    x_together, x_apart = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    (3.0 * (together(2.0 * x_together, u) + together(x_together, u))).backward()
    (3.0 * apart(2.0 * x_apart, u)).backward()  # the first call's gradients, taken before the second call
    (3.0 * apart(x_apart, u)).backward()
    torch.testing.assert_close(x_together.grad, x_apart.grad)
    for p, q in zip(together.parameters(), apart.parameters(), strict=True):
        torch.testing.assert_close(p, q)
        torch.testing.assert_close(p.grad, q.grad)


def test_the_head_gets_the_ce_gradient_and_the_features_its_reverse() -> None:
    z, u = batch()
    z.requires_grad_(True)
    loss = ntl.AdversarialSuppression(3, dim=5, strength=0.5, head_steps=0, warmup_steps=0)
    assert {name for name, _ in loss.named_parameters()} == {"head.weight", "head.bias"}
    loss(z, u).backward()
    z2 = z.detach().clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(loss.head(z2), u)
    ce_grad, weight_grad = torch.autograd.grad(ce, [z2, loss.head.weight])
    torch.testing.assert_close(z.grad, -0.5 * ce_grad)
    torch.testing.assert_close(loss.head.weight.grad, weight_grad)


def test_default_strength_is_one_value_for_the_module_and_the_function() -> None:
    function_default = inspect.signature(ntf.adversarial_suppression).parameters["strength"].default
    module = ntl.AdversarialSuppression(3, dim=5)  # no warm-up by default: λ = strength from the first call
    assert module.strength == function_default == 0.3 and module.warmup_steps == 0
    z, u = batch()
    module(z, u)
    assert module.last_terms["strength"].item() == pytest.approx(0.3)


def test_a_200_call_warmup_starts_at_zero_and_reaches_the_strength_after_200_training_calls() -> None:
    # the setting docs/task-irrelevant-labels.md recommends with group-balanced batches
    module = ntl.AdversarialSuppression(3, dim=5, head_steps=0, warmup_steps=200)
    z, u = batch()
    module(z, u)
    assert module.last_terms["strength"].item() == 0.0
    module.steps.fill_(100)  # halfway: DANN's schedule is already at 2 / (1 + e^-5) - 1 of the strength
    module(z, u)
    assert module.last_terms["strength"].item() == pytest.approx(0.3 * (2 / (1 + math.exp(-5)) - 1))
    module.steps.fill_(200)  # and stays at its end value, 2 / (1 + e^-10) - 1 ≈ 0.99991 of the strength
    module(z, u)
    assert module.last_terms["strength"].item() == pytest.approx(0.3 * (2 / (1 + math.exp(-10)) - 1))


def test_warmup_schedule_is_a_device_tensor_rising_from_zero_to_strength() -> None:
    loss = ntl.AdversarialSuppression(3, dim=5, strength=2.0, warmup_steps=10, head_steps=0)
    z, u = batch()
    strengths = []
    for _ in range(12):
        z_step = z.clone().requires_grad_(True)
        loss(z_step, u).backward()
        strength = loss.last_terms["strength"]
        assert isinstance(strength, Tensor) and strength.shape == ()
        (ce_grad,) = torch.autograd.grad(nn.functional.cross_entropy(loss.head(z_step), u), z_step)
        torch.testing.assert_close(z_step.grad, -strength * ce_grad)  # the reversal uses the tensor λ
        strengths.append(strength.item())
    assert strengths[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(strengths[:11]))
    assert strengths[10] == pytest.approx(2.0 * (2 / (1 + math.exp(-10.0)) - 1))
    assert strengths[11] == strengths[10]
    assert int(loss.state_dict()["steps"]) == 12
    loss.eval()
    loss(z, u)
    assert int(loss.steps) == 12  # eval calls do not advance the schedule


def test_last_terms_layout() -> None:
    z, u = batch()
    loss = ntl.AdversarialSuppression(3, dim=5, weight=2.0)
    out = loss(z, u)
    assert set(loss.last_terms) == {"loss", "value", "strength"}
    assert loss.last_terms["loss"].item() == pytest.approx(out.item())
    assert loss.last_terms["value"].item() == pytest.approx(out.item() / 2.0)
    assert all(not t.requires_grad for t in loss.last_terms.values())


# --- the user's head is left alone; its parameter group ---------------------------------------------------


class MLPHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.relu(self.hidden(x)))


def test_a_users_head_is_not_modified_and_the_state_dict_holds_its_real_values() -> None:
    head = MLPHead()
    original = {name: p.detach().clone() for name, p in head.named_parameters()}
    loss = ntl.AdversarialSuppression(3, head=head, head_lr_multiplier=10.0)
    assert loss.head is head
    assert all(torch.equal(p, original[name]) for name, p in head.named_parameters())  # bit-identical
    state = loss.state_dict()
    # the head's own optimizer state is saved too: step count and both moments of every trained parameter
    adam = {"head_optimizer.step", *(f"head_optimizer.exp_avg{sq}_{i}" for sq in ("", "_sq") for i in range(4))}
    assert set(state) == {"steps", *(f"head.{name}" for name in original), *adam}
    assert all(torch.equal(state[f"head.{name}"], value) for name, value in original.items())
    z, u = batch()
    loss.eval()
    torch.testing.assert_close(loss(z, u), ntf.adversarial_suppression(z, u, head, num_irrelevant=3))
    # a reloaded module computes the same
    again = ntl.AdversarialSuppression(3, head=MLPHead()).eval()
    again.load_state_dict(loss.state_dict())
    torch.testing.assert_close(again(z, u), loss(z, u))


def test_parameter_groups_give_the_head_the_multiplied_learning_rate() -> None:
    loss = ntl.AdversarialSuppression(3, dim=5, head_lr_multiplier=4.0)
    (group,) = loss.parameter_groups(1e-3)
    assert group["lr"] == pytest.approx(4e-3)
    assert [id(p) for p in group["params"]] == [id(p) for p in loss.head.parameters()]
    model = nn.Linear(5, 5)
    optimizer = torch.optim.Adam([{"params": model.parameters()}, *loss.parameter_groups(1e-3)], lr=1e-3)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, pytest.approx(4e-3)]


@pytest.mark.parametrize("optimizer_type", [torch.optim.SGD, torch.optim.Adam])
def test_a_step_with_the_parameter_group_moves_the_head_as_scaled_storage_would(optimizer_type: type) -> None:
    """A head stored as `p / m` and called with `m × stored` moves `p` by `m × lr × update(g)` in a step of lr on the
    stored values (SGD: `update(g) = g`; Adam ignores the gradient's scale). The parameter group at
    `m × lr` on the real `p` moves it by the same."""
    z, u = batch()
    m, lr = 10.0, 0.01
    loss = ntl.AdversarialSuppression(3, dim=5, head_lr_multiplier=m, head_steps=0)
    stored = [nn.Parameter(p.detach().clone() / m) for p in loss.head.parameters()]
    w, b = (m * s.detach() + (s - s.detach()) for s in stored)
    old = optimizer_type(stored, lr=lr)
    nn.functional.cross_entropy(z @ w.T + b, u).backward()
    old.step()

    before = [p.detach().clone() for p in loss.head.parameters()]
    new = optimizer_type(loss.parameter_groups(lr), lr=lr)
    loss(z, u).backward()
    new.step()
    for p, p0, s in zip(loss.head.parameters(), before, stored, strict=True):
        moved = p.detach() - p0
        torch.testing.assert_close(moved, m * s.detach() - p0, rtol=1e-5, atol=1e-7)
        assert moved.abs().max() > 0
    if optimizer_type is torch.optim.SGD:  # derived: p moves by m·lr·g exactly
        weight = before[0].clone().requires_grad_(True)
        (ce_grad,) = torch.autograd.grad(
            nn.functional.cross_entropy(nn.functional.linear(z, weight, before[1]), u), weight
        )
        torch.testing.assert_close(loss.head.weight.detach() - before[0], -m * lr * ce_grad)


# --- the head must reach the optimizer: a warning, without a sync -------------------------------------------


def test_a_head_the_optimizer_never_moves_is_reported() -> None:
    z, u = batch()
    loss = ntl.AdversarialSuppression(3, dim=5, check_head_after=3)  # its own steps move it: they do not count
    with pytest.warns(UserWarning, match=r"have not changed in 3 training steps \(between calls, where only your"):
        for _ in range(4):
            loss(z, u)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            loss(z, u)  # said once

    trained = ntl.AdversarialSuppression(3, dim=5, check_head_after=3)
    model = nn.Linear(5, 5)
    optimizer = torch.optim.SGD([{"params": model.parameters()}, *trained.parameter_groups(0.01)], lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(6):
            optimizer.zero_grad()
            trained(model(z), u).backward()
            optimizer.step()


def test_the_head_check_reads_its_flag_without_waiting() -> None:
    """On a GPU the flag is copied without blocking and read once its event is done: the warning comes later."""
    z, u = batch()
    loss = ntl.AdversarialSuppression(3, dim=5, check_head_after=2, head_steps=0)
    with checks_deferred_on_cpu(complete=False) as events:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(4):  # the third call issues the read; its event is not done
                loss(z, u)
        for event in events:  # the device finished: the next call reads the flag
            event.done = True
        with pytest.warns(UserWarning, match=r"have not changed in 2 training steps"):
            loss(z, u)


def test_no_check_while_compiling_and_none_when_disabled() -> None:
    z, u = batch()
    loss = ntl.AdversarialSuppression(3, dim=5, check_head_after=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):
            loss(z, u)


# --- no sync, no graph break ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conditional", "warmup_steps"),
    [(False, 0), (True, 0), (False, 5), (True, 5)],
    ids=["plain", "conditional", "plain-warmup", "conditional-warmup"],
)
def test_a_training_step_makes_no_host_device_sync(conditional: bool, warmup_steps: int) -> None:
    z, u, y = conditional_batch(16)
    u[3] = -100
    z.requires_grad_(True)
    loss = ntl.AdversarialSuppression(3, dim=5, conditional=conditional, warmup_steps=warmup_steps)

    def step() -> None:
        loss(z, u, task_labels=y if conditional else None).backward()

    step()
    syncs = count_syncs(step)
    assert syncs.total == 0, dict(syncs.counts)


@pytest.mark.parametrize("conditional", [False, True], ids=["plain", "conditional"])
def test_no_graph_break_and_a_compiled_training_step_equals_eager(conditional: bool) -> None:
    z, u, y = conditional_batch(16)
    u[3] = -100
    torch._dynamo.reset()
    explained = torch._dynamo.explain(ntl.AdversarialSuppression(3, dim=5, conditional=conditional, warmup_steps=5))(
        z, u, task_labels=y if conditional else None
    )
    assert explained.graph_break_count == 0, explained.break_reasons

    def train(compiled: bool) -> tuple[Tensor, list[Tensor]]:
        torch.manual_seed(0)
        encoder = nn.Linear(5, 5)
        loss = ntl.AdversarialSuppression(3, dim=5, conditional=conditional, warmup_steps=5)
        # SGD: the encoder's bias gets a zero gradient in the conditional form (centring removes it), which
        # Adam would turn into full steps of rounding noise
        optimizer = torch.optim.SGD([{"params": encoder.parameters()}, *loss.parameter_groups(0.1)], lr=0.1)

        def forward(x: Tensor) -> Tensor:
            return loss(encoder(x), u, task_labels=y if conditional else None)

        run = torch.compile(forward, fullgraph=True) if compiled else forward
        values = []
        for i in range(3):
            optimizer.zero_grad()
            value = run(z + 0.1 * i)
            value.backward()
            optimizer.step()
            values.append(value.detach())
        return torch.stack(values), [*encoder.parameters(), *loss.parameters()]

    torch._dynamo.reset()
    eager, eager_params = train(False)
    compiled, compiled_params = train(True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- hostile inputs -------------------------------------------------------------------------------------------


def test_no_known_label_gives_zero_loss_zero_gradient_and_leaves_the_head_alone() -> None:
    z, _ = batch()
    for conditional in (False, True):
        loss = ntl.AdversarialSuppression(3, dim=5, conditional=conditional)
        before = [p.detach().clone() for p in loss.parameters()]
        features = z.clone().requires_grad_(True)
        unknown = torch.full((12,), -100)
        out = loss(features, unknown, task_labels=torch.arange(12) % 2 if conditional else None)
        out.backward()
        assert out.item() == 0.0 and torch.equal(features.grad, torch.zeros_like(z))  # type: ignore[arg-type]
        assert all(torch.equal(a, p) for a, p in zip(before, loss.parameters(), strict=True))
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in loss.parameters())  # type: ignore[arg-type]
        assert int(loss.head_optimizer.step) == 0


def test_one_class_present_only_gives_the_heads_cross_entropy() -> None:
    """One class in the batch: the CE of the head after its own steps, and the features get its reverse."""
    z, _ = batch()
    u = torch.ones(12, dtype=torch.long)
    loss = ntl.AdversarialSuppression(3, dim=5, warmup_steps=0)
    leaf = z.clone().requires_grad_(True)
    out = loss(leaf, u)
    (3.0 * out).backward()
    head = loss.head
    torch.testing.assert_close(out, known_ce(head, z, u))
    features = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(3.0 * known_ce(head, features, u), features)
    torch.testing.assert_close(leaf.grad, -ntf.adversarial.DEFAULT_STRENGTH * expected)


def test_bad_labels_are_clear_errors() -> None:
    z, u = batch()
    loss = ntl.AdversarialSuppression(3, dim=5)
    with pytest.raises(ValueError, match=r"'irrelevant_labels' holds 3, outside \[0, 3\) for 3 irrelevant classes"):
        loss(z, u + 1)
    with pytest.raises(ValueError, match=r"'irrelevant_labels' holds -1"):
        loss(z, u - 1)
    with pytest.raises(TypeError, match=r"'irrelevant_labels' must hold integer class indices"):
        loss(z, u.float())
    with pytest.raises(ValueError, match=r"'irrelevant_labels' must have shape \(12,\)"):
        loss(z, u[:5])
    with pytest.raises(ValueError, match=r"needs 'irrelevant_labels'"):
        loss(z, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"must map features of shape \(12, 4\) to logits|could not take features"):
        loss(z[:, :4], u)
    with pytest.raises(ValueError, match=r"conditional=True needs 'task_labels'"):
        ntl.AdversarialSuppression(3, dim=5, conditional=True)(z, u)
    loss.eval()  # the constructor decides the form: an unconditional module leaves task labels unused
    assert torch.equal(loss(z, u, task_labels=u), loss(z, u))
    loss.train()
    with pytest.raises(ValueError, match=r"'task_labels' holds -3, task classes are ≥ 0"):
        ntl.AdversarialSuppression(3, dim=5, conditional=True)(z, u, task_labels=u - 3)


def test_non_finite_features_under_each_nan_policy() -> None:
    z, u = batch()
    z[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'features' contain NaN or inf"):
        ntl.AdversarialSuppression(3, dim=5)(z, u)

    skip = ntl.AdversarialSuppression(3, dim=5, nan_policy="skip")
    before = [p.detach().clone() for p in skip.parameters()]
    features = z.clone().requires_grad_(True)
    out = skip(features, u)
    out.backward()
    assert out.item() == 0.0 and torch.equal(features.grad, torch.zeros_like(z))  # type: ignore[arg-type]
    assert all(torch.equal(a, p) for a, p in zip(before, skip.parameters(), strict=True))  # no inner step either

    propagate = ntl.AdversarialSuppression(3, dim=5, nan_policy="propagate", head_steps=0)
    assert torch.isnan(propagate(z, u))
    u[2] = -100  # a NaN in a sample of unknown label never reaches the cross-entropy
    out = propagate(z, u)
    torch.testing.assert_close(out, known_ce(propagate.head, z, u))


def test_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match=r"needs either 'dim' .* not neither"):
        ntl.AdversarialSuppression(3)
    with pytest.raises(ValueError, match=r"not both"):
        ntl.AdversarialSuppression(3, dim=5, head=nn.Linear(5, 3))
    with pytest.raises(TypeError, match=r"'head' must be an nn.Module"):
        ntl.AdversarialSuppression(3, head=lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'num_irrelevant' must be the number of irrelevant classes"):
        ntl.AdversarialSuppression(0, dim=5)
    with pytest.raises(ValueError, match=r"'dim' must be"):
        ntl.AdversarialSuppression(3, dim=0)
    with pytest.raises(ValueError, match=r"'warmup_steps' must be an int ≥ 0, got -1"):
        ntl.AdversarialSuppression(3, dim=5, warmup_steps=-1)
    with pytest.raises(ValueError, match=r"'head_steps' must be an int ≥ 0"):
        ntl.AdversarialSuppression(3, dim=5, head_steps=-2)
    with pytest.raises(ValueError, match=r"'head_lr_multiplier' must be > 0"):
        ntl.AdversarialSuppression(3, dim=5, head_lr_multiplier=0.0)
    with pytest.raises(ValueError, match=r"'head_lr' must be > 0"):
        ntl.AdversarialSuppression(3, dim=5, head_lr=0.0)
    with pytest.raises(ValueError, match=r"'nan_policy' must be one of"):
        ntl.AdversarialSuppression(3, dim=5, nan_policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ntl.AdversarialSuppression(3, 5)  # type: ignore[misc]  # options are keyword-only


def test_custom_head_maps_and_dtype_moves() -> None:
    head = nn.Sequential(nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    loss = ntl.AdversarialSuppression(3, head=head, entropy_weight=0.1).double()
    maps = torch.randn(8, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    u = torch.arange(8) % 3
    out = loss(maps, u)  # the inner Adam state moved with .double()
    assert out.dtype == torch.float64
    out.backward()
    assert maps.grad is not None and maps.grad.shape == maps.shape
    assert all(b.dtype == torch.float64 for name, b in loss.named_buffers() if "exp_avg" in name)


def test_a_float16_head_takes_its_own_steps_in_float32() -> None:
    # a float16 head's g² and Adam's eps underflow to 0 in float16 (0 / 0 = NaN): the steps run in float32, and
    # √v, stored in float16 between calls, is floored at float16's smallest normal (else m / √v explodes next call)
    torch.manual_seed(0)
    full = ntl.AdversarialSuppression(2, dim=1)
    half = copy.deepcopy(full).to(torch.float16)
    z = torch.tensor([[0.0015], [0.002], [-0.001]])
    labels = torch.tensor([1, 0, 1])
    for _ in range(4):
        expected = full(z, labels)
        value = half(z.half().requires_grad_(), labels)
        assert torch.isfinite(value)
        torch.testing.assert_close(value.float(), expected.detach(), rtol=3e-3, atol=3e-3)


def test_a_float16_head_survives_large_features_over_several_calls() -> None:
    torch.manual_seed(8)
    z = (100 * torch.randn(3, 18, generator=torch.Generator().manual_seed(8))).half()
    labels = torch.zeros(3, dtype=torch.long)
    adversary = ntl.AdversarialSuppression(4, dim=18).half()
    values = [adversary(z, labels) for _ in range(3)]
    assert all(torch.isfinite(v) for v in values)
    assert all(torch.isfinite(p).all() for p in adversary.head.parameters())
    assert values[-1] <= values[0]  # the head learns the one label: its cross-entropy does not grow


def test_float64_features_get_exactly_minus_strength_times_their_gradient() -> None:
    z, u = batch()
    z = z.double().requires_grad_()
    module = ntl.AdversarialSuppression(3, dim=z.shape[1], head_steps=0, check_head_after=0).double()
    module(z, u).backward()
    expected = z.detach().clone().requires_grad_()
    ntf.adversarial_suppression(expected, u, module.head, num_irrelevant=3, strength=0.3).backward()
    assert torch.equal(z.grad, expected.grad)  # λ = 0.3 in float64, not float32's 0.30000001192...
    assert module.last_terms["strength"].dtype == torch.float64


def test_a_device_out_of_memory_error_is_not_disguised_as_a_shape_error() -> None:
    class Exhausted(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    z, u = batch()
    with pytest.raises(torch.cuda.OutOfMemoryError, match="out of memory"):
        ntl.AdversarialSuppression(3, head=Exhausted(), head_steps=0)(z, u)
