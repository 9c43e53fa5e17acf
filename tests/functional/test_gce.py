"""`generalized_cross_entropy` against a float64 oracle written from its formula, and against hostile input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GRAD_SCALE, assert_matches_oracle, checks_deferred_on_cpu, count_syncs
from torch import Tensor

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf


def oracle(logits: Tensor, labels: Tensor, q: float, reduction: str = "mean") -> Tensor:
    """(1 − p_y^q) / q per sample, with p the softmax written out, a loop over samples, float64."""
    values = []
    for i in range(logits.shape[0]):
        if int(labels[i]) == -100:
            values.append(logits[i].sum() * 0.0)
            continue
        row = logits[i].double()
        p = torch.exp(row - row.max()) / torch.exp(row - row.max()).sum()
        values.append((1.0 - p[int(labels[i])] ** q) / q)
    per_sample = torch.stack(values)
    if reduction == "none":
        return per_sample
    known = sum(int(v) != -100 for v in labels)
    return per_sample.sum() if reduction == "sum" else per_sample.sum() / max(known, 1)


def data(n: int = 9, k: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(n, k, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[3] = -100
    return logits, labels


@pytest.mark.parametrize("q", [0.7, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_values_and_gradients_match_the_oracle(q: float, reduction: str) -> None:
    logits, labels = data()
    assert_matches_oracle(
        lambda z: ntf.generalized_cross_entropy(z, labels, q=q, reduction=reduction),  # type: ignore[arg-type]
        lambda z: oracle(z, labels, q, reduction),
        logits,
    )


def test_its_gradient_is_p_y_to_the_q_times_the_cross_entropys() -> None:
    """The property LfF relies on (and the factor q by which its released loss differs)."""
    logits, labels = data()
    labels[3] = 1
    z = logits.clone().requires_grad_(True)
    (gce_grad,) = torch.autograd.grad(GRAD_SCALE * ntf.generalized_cross_entropy(z, labels, reduction="sum"), z)
    ce = torch.nn.functional.cross_entropy(z, labels, reduction="none")
    p_y = torch.exp(-ce.detach())
    (ce_grad,) = torch.autograd.grad(GRAD_SCALE * (p_y**0.7 * ce).sum(), z, retain_graph=True)
    torch.testing.assert_close(gce_grad, ce_grad, rtol=1e-12, atol=1e-14)
    # LfF's released loss, CE · q · p_y^q with p_y^q detached: q times this gradient
    (lff_grad,) = torch.autograd.grad(GRAD_SCALE * (ce * 0.7 * p_y**0.7).sum(), z)
    torch.testing.assert_close(lff_grad, 0.7 * gce_grad, rtol=1e-12, atol=1e-14)


def test_limits_cross_entropy_as_q_goes_to_zero_and_mae_at_one() -> None:
    logits, labels = data()
    known = labels != -100
    ce = torch.nn.functional.cross_entropy(logits[known], labels[known])
    torch.testing.assert_close(ntf.generalized_cross_entropy(logits, labels, q=1e-9), ce, rtol=1e-7, atol=1e-8)
    p = torch.softmax(logits[known], dim=1).gather(1, labels[known][:, None])[:, 0]
    torch.testing.assert_close(ntf.generalized_cross_entropy(logits, labels, q=1.0), (1 - p).mean())


def test_float32_extreme_logits_are_finite_and_no_known_label_gives_zero_with_zero_grad() -> None:
    z = torch.tensor([[1e4, -1e4, 0.0], [-3e4, 3e4, 0.0]], requires_grad=True)
    value = ntf.generalized_cross_entropy(z, torch.tensor([1, 1]))
    value.backward()
    assert torch.isfinite(value) and z.grad is not None and torch.isfinite(z.grad).all()
    torch.testing.assert_close(value, torch.tensor((1 / 0.7 + 0.0) / 2))  # sample 0: p_y = 0; sample 1: p_y = 1
    z2 = torch.randn(3, 2, requires_grad=True)
    none_known = ntf.generalized_cross_entropy(z2, torch.full((3,), -100))
    none_known.backward()
    assert none_known.item() == 0.0 and z2.grad is not None and not z2.grad.any()


def test_float16_logits_compute_in_float32() -> None:
    logits, labels = data()
    half = ntf.generalized_cross_entropy(logits.half(), labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), oracle(logits.half().double(), labels, 0.7), rtol=1e-5, atol=1e-6)


def test_ignore_index_of_your_choice() -> None:
    logits, labels = data()
    labels[3] = -1
    torch.testing.assert_close(
        ntf.generalized_cross_entropy(logits, labels, ignore_index=-1, reduction="none"),
        oracle(logits, torch.where(labels == -1, -100, labels), 0.7, "none"),
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_raise_skip_or_propagate(bad: float) -> None:
    logits, labels = data()
    logits[1, 2] = bad
    with pytest.raises(ValueError, match=r"'logits'"):
        ntf.generalized_cross_entropy(logits, labels)
    z = logits.clone().requires_grad_(True)
    skipped = ntf.generalized_cross_entropy(z, labels, nan_policy="skip")
    skipped.backward()
    assert skipped.item() == 0.0 and z.grad is not None and not z.grad.any()
    assert not torch.isfinite(ntf.generalized_cross_entropy(logits, labels, nan_policy="propagate"))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: ntf.generalized_cross_entropy(torch.randn(4), torch.zeros(4, dtype=torch.long)), ValueError,
         r"'logits' must have at least 2 dimension\(s\).*got shape \(4,\)"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3, 2), torch.zeros(4, dtype=torch.long)), ValueError,
         r"'logits' must have shape \(N, K\), got \(4, 3, 2\)"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), ValueError,
         r"'labels' must have shape \(4,\) to match the batch of 4, got \(5,\)"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.zeros(4)), TypeError,
         r"'labels' must hold integer class indices, got dtype torch.float32"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, 3, 0])), ValueError,
         r"'labels' holds 3, outside \[0, 3\)"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.tensor([0, 1, -1, 0])), ValueError,
         r"'labels' holds -1"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), q=0.0),
         ValueError, r"'q' must be a number in \(0, 1\].*got 0.0"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), q=-0.5),
         ValueError, r"'q' must be a number in \(0, 1\]"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), q=1.5),
         ValueError, r"'q' must be a number in \(0, 1\]"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), q=math.nan),
         ValueError, r"'q' must be a number in \(0, 1\]"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), reduction="avg"),
         ValueError, r"'reduction' must be one of 'mean', 'sum', 'none'; got 'avg'"),
        (lambda: ntf.generalized_cross_entropy(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), nan_policy="x"),
         ValueError, r"'nan_policy' must be one of"),
        (lambda: ntf.generalized_cross_entropy(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, dtype=torch.long)),
         TypeError, r"'logits' must be a real floating-point tensor"),
    ],
)  # fmt: skip
def test_hostile_input_gets_a_clear_error(call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


def test_no_host_sync_with_the_checks_deferred() -> None:
    logits, labels = data()
    z = logits.float().requires_grad_(True)

    def step() -> None:
        ntf.generalized_cross_entropy(z, labels).backward()

    with checks_deferred_on_cpu():
        step()
        assert count_syncs(step).total == 0
    ntl.raise_pending_errors()
