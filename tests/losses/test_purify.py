"""`Purify`: mean-difference erasure, its running state, and what survives it."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import count_syncs

import negtransfer_losses as ntl
from negtransfer_losses.losses import purify as purify_module


def synthetic(n: int = 600, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features whose irrelevant class u shifts the mean in dims 0-1 and whose task y lives in dim 2."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 3, (n,), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    offsets = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    z = torch.randn(n, 6, generator=g)
    z[:, :2] += offsets[u]
    z[:, 2] += 4.0 * y - 2.0
    return z, u, y, offsets


def least_squares_probe(z: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """One-hot least-squares probe with intercept: (its predictions, accuracy).

    Directions with singular value below 1e-5 of the largest are dropped: after erasure the features are
    rank-deficient, and their float32 rounding noise is not a signal.
    """
    x = torch.cat([z.double(), torch.ones(len(z), 1, dtype=torch.float64)], dim=1)
    target = torch.nn.functional.one_hot(labels, k).double()
    w = torch.linalg.lstsq(x, target, rcond=1e-5, driver="gelsd").solution
    predictions = x @ w
    return predictions, (predictions.argmax(1) == labels).double().mean().item()


def test_after_erasure_no_linear_probe_separates_the_irrelevant_classes() -> None:
    z, u, y, _ = synthetic()
    assert least_squares_probe(z, u, 3)[1] > 0.9
    purify = ntl.Purify(3, 6, momentum=1.0)
    out = purify(z, u)  # one batch, momentum 1: the running means are this batch's means
    class_means = torch.stack([out[u == k].mean(0) for k in range(3)])
    torch.testing.assert_close(class_means - class_means.mean(0), torch.zeros(3, 6), atol=1e-5, rtol=0)
    predictions, accuracy = least_squares_probe(out, u, 3)
    assert (predictions - predictions.mean(0)).abs().max() < 1e-4  # the probe is constant
    assert accuracy < 0.40  # chance is about 1/3: a constant probe predicts the majority class
    # the task direction (dim 2) is orthogonal to the true mean offsets; the estimated span tilts into it
    # only by sampling noise, so it survives almost untouched
    assert torch.corrcoef(torch.stack([out[:, 2], z[:, 2]]))[0, 1] > 0.99
    assert least_squares_probe(out, y, 2)[1] > 0.95


def test_identity_until_every_class_was_seen_and_ignore_index() -> None:
    z, u, _, _ = synthetic(30)
    purify = ntl.Purify(3, 6)
    partial = torch.where(u == 2, torch.tensor(-100), u)
    assert torch.equal(purify(z, partial), z) and not purify.ready
    assert int(purify.batches_seen[2]) == 0
    purify(z, torch.full_like(u, -100))  # no known label: no update
    assert not purify.ready
    out = purify(z, u)
    assert purify.ready and not torch.equal(out, z)


def test_running_means_average_then_follow_the_momentum() -> None:
    purify = ntl.Purify(2, 2, momentum=0.25)
    for value in (0.0, 8.0, 2.0, 4.0):  # weights 1, 1/2, 1/3, then the momentum 1/4
        purify(torch.tensor([[value, 0.0], [4.0, 4.0]]), torch.tensor([0, 1]))
    expected_0 = 0.75 * ((0.0 + 8.0 + 2.0) / 3) + 0.25 * 4.0
    torch.testing.assert_close(purify.class_means, torch.tensor([[expected_0, 0.0], [4.0, 4.0]]))
    assert purify.batches_seen.tolist() == [4, 4]
    purify(torch.tensor([[8.0, 8.0], [0.0, 9.0]]), torch.tensor([1, -100]))  # class 0 absent: unchanged
    torch.testing.assert_close(purify.class_means, torch.tensor([[expected_0, 0.0], [5.0, 5.0]]))
    assert purify.batches_seen.tolist() == [4, 5]


def test_output_is_the_projection_of_the_running_means_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    z, u, _, _ = synthetic(90)
    purify = ntl.Purify(3, 6, momentum=0.5)
    purify(z[:30], u[:30])
    out = purify(z[30:60], u[30:60])
    p = oracles.erasure_projector(purify.class_means)
    expected = z[30:60].double() - z[30:60].double() @ p
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    calls: list[int] = []
    counting = purify_module.erasure_basis_unchecked

    def erasure_basis(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return counting(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(purify_module, "erasure_basis_unchecked", erasure_basis)
    cached = purify.projection.clone()
    purify(z[60:])  # training without labels: no update, the cached Q
    purify.eval()
    eval_out = purify(z[60:], u[60:])  # eval: no update, the cached Q
    assert calls == [] and torch.equal(purify.projection, cached)
    torch.testing.assert_close(eval_out.double(), z[60:].double() - z[60:].double() @ p, atol=1e-5, rtol=0)
    purify.train()
    purify(z[60:], u[60:])  # a training update refreshes Q once
    assert calls == [1]
    torch.testing.assert_close(
        (purify.projection @ purify.projection.T).double(),
        oracles.erasure_projector(purify.class_means),
        atol=1e-6,
        rtol=0,
    )


def test_fewer_dimensions_than_classes_erases_everything() -> None:
    z = torch.randn(12, 2, generator=torch.Generator().manual_seed(1))
    u = torch.arange(12) % 4
    purify = ntl.Purify(4, 2, momentum=1.0)
    out = purify(z, u)  # four generic means in R^2: their differences span it
    torch.testing.assert_close(out, torch.zeros(12, 2), atol=1e-6, rtol=0)


def test_eval_mode_is_deterministic_and_does_not_update() -> None:
    z, u, _, _ = synthetic(60)
    purify = ntl.Purify(3, 6)
    purify(z, u)
    purify.eval()
    means = purify.class_means.clone()
    a = purify(z + 1.0, u)
    b = purify(z + 1.0, u)
    assert torch.equal(a, b) and torch.equal(purify.class_means, means)
    p = oracles.erasure_projector(means)
    torch.testing.assert_close(
        a.double(), (z + 1.0).double() @ (torch.eye(6, dtype=torch.float64) - p), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("conditional", [False, True])
def test_state_dict_round_trip(conditional: bool) -> None:
    z, u, y, _ = synthetic(60)
    labels = {"task_labels": y} if conditional else {}
    purify = ntl.Purify(3, 6, conditional=conditional)
    purify(z, u, **labels)
    state = purify.state_dict()
    assert "projection" not in state  # derived from the statistics: recomputed on load
    restored = ntl.Purify(3, 6, conditional=conditional)
    assert not restored.ready
    restored.load_state_dict(state)
    purify.eval()
    restored.eval()
    assert restored.ready
    out = restored(z)
    torch.testing.assert_close(out, purify(z), rtol=0, atol=0)
    if conditional:
        p = oracles.column_projector(purify.cross_covariance_sum)
    else:
        p = oracles.erasure_projector(purify.class_means)
    torch.testing.assert_close(out.double(), z.double() - z.double() @ p, atol=1e-5, rtol=0)
    assert (out - z).abs().max() > 0.1


@pytest.mark.parametrize("conditional", [False, True])
def test_the_projection_follows_the_statistics_dtype(conditional: bool) -> None:
    """A float64 Purify keeps float64 statistics and a float64 cached projection: float64 features are erased to
    float64 precision (the SVD oracle's projector to 1e-12), not through a float32 copy of it."""
    z, u, y, _ = synthetic(60)
    z = z.double()
    labels = {"task_labels": y} if conditional else {}
    purify = ntl.Purify(3, 6, momentum=1.0, conditional=conditional).double()
    out = purify(z, u, **labels)
    assert purify.projection.dtype == torch.float64 and out.dtype == torch.float64
    if conditional:
        p = oracles.column_projector(purify.cross_covariance_sum)
    else:
        p = oracles.erasure_projector(purify.class_means)
    torch.testing.assert_close(out, z - z @ p, atol=1e-12, rtol=0)
    assert (out - z).abs().max() > 0.1
    single = ntl.Purify(3, 6, momentum=1.0, conditional=conditional)
    single(z, u, **labels)
    assert single.projection.dtype == torch.float32 and single(z).dtype == torch.float64  # float32 statistics


def test_gradient_is_projected_not_blocked() -> None:
    z, u, _, _ = synthetic(60)
    purify = ntl.Purify(3, 6, momentum=1.0)
    purify(z, u)
    x = z.clone().requires_grad_(True)
    out = purify(x)
    grad_out = torch.randn_like(out)
    (3.0 * (out * grad_out).sum()).backward()
    p = oracles.erasure_projector(purify.class_means).float()
    torch.testing.assert_close(x.grad, 3.0 * (grad_out - grad_out @ p), atol=1e-5, rtol=1e-5)
    q = purify.basis()  # for inspection: orthonormal, of the span's rank
    assert q.shape == (6, 2)
    torch.testing.assert_close(q.T @ q, torch.eye(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(q @ q.T, p, atol=1e-6, rtol=0)


def test_maps_and_low_precision_keep_shape_and_dtype() -> None:
    z, u, _, _ = synthetic(40)
    maps = torch.cat([z, z], dim=1).reshape(40, 3, 2, 2)
    purify = ntl.Purify(3, 12)
    low = maps.to(torch.bfloat16)
    out = purify(low, u)
    assert out.shape == maps.shape and out.dtype == torch.bfloat16
    flat = low.double().reshape(40, 12)
    expected = flat - flat @ oracles.erasure_projector(purify.class_means)
    torch.testing.assert_close(out.double().reshape(40, 12), expected, atol=0.05, rtol=0.02)
    class_means = torch.stack([out.float().reshape(40, 12)[u == k].mean(0) for k in range(3)])
    assert (class_means - class_means.mean(0)).abs().max() < 0.05  # against about 3 before


def test_hostile_input() -> None:
    with pytest.raises(ValueError, match=r"'num_irrelevant' must be an int ≥ 2 \(one class has no mean differences\)"):
        ntl.Purify(1, 4)
    with pytest.raises(ValueError, match=r"'momentum' must be in \(0, 1\]"):
        ntl.Purify(3, 4, momentum=0.0)
    with pytest.raises(TypeError, match=r"positional"):
        ntl.Purify(3, 4, 0.1)  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"'rtol' must be in \[1e-12, 1\), got 0"):
        ntl.Purify(3, 4, rtol=0.0)
    purify = ntl.Purify(3, 6)
    with pytest.raises(ValueError, match=r"must be \(B, 6\) or maps with 6 values per sample, got shape \(4, 5\)"):
        purify(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"holds 5, outside \[0, 3\)"):
        purify(torch.randn(4, 6), torch.tensor([0, 1, 5, 2]))


# --- conditional erasure (docs/task-irrelevant-labels.md, "Conditional suppression") -----------------


def test_conditional_erases_the_within_class_cross_covariance_span() -> None:
    g = torch.Generator().manual_seed(4)
    y = torch.arange(60) % 3
    u = torch.where(torch.rand(60, generator=g) < 0.7, y, torch.randint(0, 3, (60,), generator=g))
    u[[1, 8]] = -100
    y[[2, 11]] = -100
    z = torch.randn(60, 6, generator=g, dtype=torch.float64)
    z[:, :3] += 3.0 * torch.eye(3, dtype=torch.float64)[y.clamp(0)]  # the task
    z[:, 3:5] += torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]], dtype=torch.float64)[u.clamp(0)]
    purify = ntl.Purify(3, 6, momentum=1.0, conditional=True).double()
    assert not purify.ready
    out = purify(z, u, task_labels=y)
    covariance, count = oracles.within_class_cross_covariance(z, u, y, 3)
    q, singular, _ = torch.linalg.svd(covariance / count, full_matrices=False)
    q = q[:, singular > 1e-6 * singular.max()]
    assert q.shape[1] == 2 and purify.ready
    torch.testing.assert_close(out, z - z @ q @ q.T, rtol=1e-9, atol=1e-10)
    erased, erased_count = oracles.within_class_cross_covariance(out, u, y, 3)
    assert erased_count == count and erased.abs().max() < 1e-9  # nothing of u left within classes
    purify.eval()
    torch.testing.assert_close(purify(z), out)  # eval: no labels, same projection


def test_conditional_running_estimate_weights_batches_by_eligible_samples() -> None:
    z, u, y, _ = synthetic(40)
    purify = ntl.Purify(3, 6, momentum=0.5, conditional=True).double()
    a, b = slice(0, 20), slice(20, 40)
    purify(z[a].double(), u[a], task_labels=y[a])
    purify(z[b].double(), u[b], task_labels=y[b])
    sa, na = oracles.within_class_cross_covariance(z[a].double(), u[a], y[a], 3)
    sb, nb = oracles.within_class_cross_covariance(z[b].double(), u[b], y[b], 3)
    assert na > 0 and nb > 0
    torch.testing.assert_close(purify.cross_covariance_sum, 0.5 * sa + 0.5 * sb)
    assert set(purify.state_dict()) == {"cross_covariance_sum", "batches_seen"}  # no count: the span needs none
    assert int(purify.batches_seen) == 2
    purify(z[a].double(), y[a].clamp(max=2), task_labels=y[a])  # no eligible sample: no update, no batch counted
    torch.testing.assert_close(purify.cross_covariance_sum, 0.5 * sa + 0.5 * sb)
    assert int(purify.batches_seen) == 2


def test_conditional_hostile_batches_leave_it_the_identity() -> None:
    z, u, y, _ = synthetic(12)
    purify = ntl.Purify(3, 6, conditional=True)
    assert torch.equal(purify(z, torch.full_like(u, -100), task_labels=y), z)
    assert torch.equal(purify(z, u, task_labels=torch.full_like(y, -100)), z)
    assert torch.equal(purify(z, y.clamp(max=2), task_labels=y), z)  # one u value per class
    assert not purify.ready
    with pytest.raises(ValueError, match=r"needs 'task_labels' with the irrelevant labels in training"):
        purify(z, u)
    plain, again = ntl.Purify(3, 6), ntl.Purify(3, 6)  # unconditional: task labels are left unused
    assert torch.equal(plain(z, u, task_labels=y), again(z, u))
    assert torch.equal(plain.class_means, again.class_means)


def test_nan_policy_is_the_shared_one() -> None:
    z, u, _, _ = synthetic(12)
    z[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'features' contain NaN or inf; pass nan_policy='skip'"):
        ntl.Purify(3, 6)(z, u)
    skipping = ntl.Purify(3, 6, nan_policy="skip")
    skipping(z, u)
    assert not skipping.ready and torch.equal(skipping.class_means, torch.zeros(3, 6))


# --- a training step on a GPU: no host sync, one graph under torch.compile --------------------------------


def training_case(conditional: bool) -> tuple[ntl.Purify, torch.nn.Linear, list[tuple[torch.Tensor, ...]]]:
    g = torch.Generator().manual_seed(7)
    layer = torch.nn.Linear(5, 8)
    batches = []
    for _ in range(3):
        u = torch.randint(0, 3, (16,), generator=g)
        u[:2] = -100
        batches.append((torch.randn(16, 5, generator=g), u, torch.randint(0, 2, (16,), generator=g)))
    return ntl.Purify(3, 8, conditional=conditional), layer, batches


def training_step(purify: ntl.Purify, layer: torch.nn.Linear, x: torch.Tensor, u: torch.Tensor, y: torch.Tensor):  # type: ignore[no-untyped-def]
    labels = {"task_labels": y} if purify.conditional else {}
    return purify(layer(x), u, **labels).square().mean()


@pytest.mark.parametrize("conditional", [False, True])
def test_a_training_step_makes_no_host_sync_and_compiles_to_one_graph(conditional: bool) -> None:
    purify, layer, batches = training_case(conditional)
    x, u, y = batches[0]
    training_step(purify, layer, x, u, y).backward()  # warm-up
    syncs = count_syncs(lambda: training_step(purify, layer, x, u, y).backward())
    assert syncs.total == 0, dict(syncs.counts)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(training_step)(purify, layer, x, u, y)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]

    eager, eager_layer, _ = training_case(conditional)
    compiled, compiled_layer, _ = training_case(conditional)
    compiled_layer.load_state_dict(eager_layer.state_dict())
    torch._dynamo.reset()
    step = torch.compile(training_step, fullgraph=True, backend="aot_eager")
    for x, u, y in batches:  # the first call is the identity (not ready), the later ones erase
        expected = training_step(eager, eager_layer, x, u, y)
        expected.backward()
        value = step(compiled, compiled_layer, x, u, y)
        value.backward()
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    assert bool(compiled.ready)
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6, msg=name)
    assert eager_layer.weight.grad is not None and compiled_layer.weight.grad is not None
    torch.testing.assert_close(compiled_layer.weight.grad, eager_layer.weight.grad, rtol=1e-5, atol=1e-6)


def test_repr_reads_nothing_from_the_device() -> None:
    from helpers import count_syncs

    purify = ntl.Purify(3, 6, conditional=True)
    assert repr(purify) == "Purify(num_irrelevant=3, dim=6, momentum=0.01, conditional=True)"
    assert count_syncs(lambda: repr(purify)).total == 0  # `ready` is a tensor: read it when you want to wait
