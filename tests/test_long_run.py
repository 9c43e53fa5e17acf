"""A long run: 2,000 steps of a small model with taps, a frozen reference and every loss. Memory, live tensors
and hooks stay flat; a forward that raises halfway leaves no hook behind."""

from __future__ import annotations

import gc
import os
import warnings

import pytest
import torch
from torch import Tensor, nn

import negtransfer_losses as ntl

STEPS = 2_000  # a leak of one tensor or one hook per step shows within it; tests/test_soak.py runs 10,000 per module


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
        self.purify = ntl.Purify(3, 16, momentum=0.05)
        self.head_a = nn.Linear(16, 4)
        self.head_b = nn.Linear(16, 2)
        self.fail_after_body = False

    def forward(self, x: Tensor, u: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        z = self.body(x)
        if self.fail_after_body:
            raise RuntimeError("failure halfway through the forward pass")
        clean = self.purify(z, u)
        return z, self.head_a(clean), self.head_b(clean)


def hooks(*models: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for model in models for m in model.modules())


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # some torch objects warn when inspected
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, Tensor))


@pytest.mark.slow
def test_two_thousand_steps_with_every_loss_stay_flat() -> None:
    torch.manual_seed(0)
    model, reference = Net(), Net()
    frozen = ntl.FrozenReference(reference, ["body.0", "body.2"])
    tap = ntl.FeatureTap(model, ["body.0", "body.2"])
    relatedness = ntl.TaskRelatedness([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.0, 0.0]])
    anti_transfer = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", weight=0.1)
    hsic = ntl.HSICSuppression(3, normalized=True)
    adversarial = ntl.AdversarialSuppression(3, dim=16, warmup_steps=100)
    cka = ntl.CKASuppression()
    multitask = ntl.MultiTaskLoss(relatedness)
    optimizer = torch.optim.Adam([{"params": model.parameters()}, *adversarial.parameter_groups(1e-3)], lr=1e-3)
    g = torch.Generator().manual_seed(1)

    def step() -> float:
        x = torch.randn(16, 16, generator=g)
        u = torch.randint(0, 3, (16,), generator=g)
        labels_a = torch.where(torch.rand(16, generator=g) < 0.5, torch.randint(0, 4, (16,), generator=g), -100)
        labels_b = torch.rand(16, 2, generator=g).round()
        labels_b[labels_a != -100] = float("nan")  # non-overlapping labels
        z, logits_a, logits_b = model(x, u)
        reference_features = frozen(x)
        loss = (
            multitask(logits_a, logits_b, labels_a, labels_b)
            + anti_transfer(tap.pop(), reference_features)
            + hsic(z, u)
            + adversarial(z, u)
            + cka(z, reference_features["body.2"])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(500):  # warm up allocator and caches
        step()
    hooks_before, tensors_before, rss_before = hooks(model, reference), live_tensors(), rss_mib()
    losses = [step() for _ in range(STEPS)]
    hooks_after, tensors_after, rss_after = hooks(model, reference), live_tensors(), rss_mib()

    print(
        f"\n{STEPS} steps: resident memory {rss_before:.1f} -> {rss_after:.1f} MiB, live tensors {tensors_before} -> "
        f"{tensors_after}, hooks {hooks_before} -> {hooks_after}"
    )
    assert all(map(lambda v: v == v and abs(v) < 1e6, losses)), "a loss became NaN or exploded"
    assert hooks_after == hooks_before == 6  # each of the two taps: a pre-hook on the root and 2 layer hooks
    assert tensors_after - tensors_before <= 10, f"{tensors_after - tensors_before} more live tensors"
    assert rss_after - rss_before < 30, f"resident memory grew by {rss_after - rss_before:.1f} MiB"
    assert not tap.holds_features


def test_a_forward_that_raises_halfway_leaves_no_hook_behind() -> None:
    model, reference = Net(), Net()
    frozen = ntl.FrozenReference(reference, ["body.2"])
    x = torch.randn(4, 16)
    frozen(x)  # the first call runs the whole network to count each layer's calls
    baseline_model, baseline_reference = hooks(model), hooks(reference)
    model.fail_after_body = reference.fail_after_body = True
    for _ in range(3):
        with pytest.raises(RuntimeError, match="halfway"), ntl.FeatureTap(model, ["body.0", "body.2"]):
            model(x)
        assert hooks(model) == baseline_model
        # the frozen reference stops after body.2, before the failure; its own hooks are permanent
        frozen(x)
        assert hooks(reference) == baseline_reference
    failing = ntl.FrozenReference(reference, ["body.0", "head_a"])  # head_a lies after the failure
    with pytest.raises(RuntimeError, match="halfway"):
        failing(x)
    assert not failing._tap.holds_features, "the failed pass's features were kept alive"
