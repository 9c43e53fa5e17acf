"""`Purify`: mean-difference erasure, its running state, and what survives it."""

from __future__ import annotations

import pytest
import torch

import negtransfer_losses as ntl


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


def test_eval_mode_is_deterministic_and_does_not_update() -> None:
    z, u, _, _ = synthetic(60)
    purify = ntl.Purify(3, 6)
    purify(z, u)
    purify.eval()
    means = purify.class_means.clone()
    a = purify(z + 1.0, u)
    b = purify(z + 1.0, u)
    assert torch.equal(a, b) and torch.equal(purify.class_means, means)


def test_state_dict_round_trip() -> None:
    z, u, _, _ = synthetic(60)
    purify = ntl.Purify(3, 6)
    purify(z, u)
    restored = ntl.Purify(3, 6)
    restored.load_state_dict(purify.state_dict())
    purify.eval()
    restored.eval()
    assert restored.ready
    torch.testing.assert_close(restored(z), purify(z))


def test_gradient_is_projected_not_blocked() -> None:
    z, u, _, _ = synthetic(60)
    purify = ntl.Purify(3, 6, momentum=1.0)
    purify(z, u)
    x = z.clone().requires_grad_(True)
    out = purify(x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    q = purify.basis()
    torch.testing.assert_close(x.grad, grad_out - grad_out @ q @ q.T)


def test_maps_and_low_precision_keep_shape_and_dtype() -> None:
    z, u, _, _ = synthetic(40)
    maps = torch.cat([z, z], dim=1).reshape(40, 3, 2, 2)
    purify = ntl.Purify(3, 12)
    out = purify(maps.to(torch.bfloat16), u)
    assert out.shape == maps.shape and out.dtype == torch.bfloat16


def test_hostile_input() -> None:
    with pytest.raises(ValueError, match=r"'num_irrelevant' must be ≥ 2"):
        ntl.Purify(1, 4)
    with pytest.raises(ValueError, match=r"'momentum' must be in \(0, 1\]"):
        ntl.Purify(3, 4, momentum=0.0)
    purify = ntl.Purify(3, 6)
    with pytest.raises(ValueError, match=r"must be \(B, 6\) or maps with 6 values per sample, got shape \(4, 5\)"):
        purify(torch.randn(4, 5))
    with pytest.raises(ValueError, match=r"holds 5, outside \[0, 3\)"):
        purify(torch.randn(4, 6), torch.tensor([0, 1, 5, 2]))


# --- conditional erasure (docs/task-irrelevant-labels.md, "Conditional suppression") -----------------


def test_conditional_erases_the_within_class_cross_covariance_span() -> None:
    import oracles

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
    from negtransfer_losses.functional.erasure import within_class_cross_covariance

    sa, na = within_class_cross_covariance(z[a].double(), u[a], y[a], 3)
    sb, nb = within_class_cross_covariance(z[b].double(), u[b], y[b], 3)
    torch.testing.assert_close(purify.cross_covariance_sum, 0.5 * sa + 0.5 * sb)
    torch.testing.assert_close(purify.cross_covariance_count, torch.tensor(0.5 * na + 0.5 * nb, dtype=torch.float64))


def test_conditional_hostile_batches_leave_it_the_identity() -> None:
    z, u, y, _ = synthetic(12)
    purify = ntl.Purify(3, 6, conditional=True)
    assert torch.equal(purify(z, torch.full_like(u, -100), task_labels=y), z)
    assert torch.equal(purify(z, u, task_labels=torch.full_like(y, -100)), z)
    assert torch.equal(purify(z, y.clamp(max=2), task_labels=y), z)  # one u value per class
    assert not purify.ready
    with pytest.raises(ValueError, match=r"needs 'task_labels' with the irrelevant labels in training"):
        purify(z, u)
    with pytest.raises(ValueError, match=r"'task_labels' are used only by Purify\(conditional=True\)"):
        ntl.Purify(3, 6)(z, u, task_labels=y)


def test_nan_policy_is_the_shared_one() -> None:
    z, u, _, _ = synthetic(12)
    z[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'features' contain NaN or inf; pass nan_policy='skip'"):
        ntl.Purify(3, 6)(z, u)
    skipping = ntl.Purify(3, 6, nan_policy="skip")
    skipping(z, u)
    assert not skipping.ready and torch.equal(skipping.class_means, torch.zeros(3, 6))
