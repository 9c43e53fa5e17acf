"""Value checks that never block: at once on the CPU, read later (without a sync) where reading would wait.

The deferred path runs on CPU tensors here through `checks_deferred_on_cpu`, which gives the checks' queue
(`_validation.pending_checks`) fake events, so that the CPU defers its checks, whose completion the test controls.
"""

from __future__ import annotations

import pytest
import torch
from helpers import SyncCounter, checks_deferred_on_cpu

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses import _validation
from negtransfer_losses._labels import check_labels, multilabel_targets
from negtransfer_losses._validation import MAX_PENDING_CHECKS, guard_finite

NAN_MESSAGE = r"'student' \(layer 'layer3'\) contain NaN or inf; pass nan_policy='skip'"


def features(nan: bool = False) -> dict[str, torch.Tensor]:
    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    if nan:
        x[1, 2, 0, 1] = float("nan")
    return {"layer3": x}


def reference() -> dict[str, torch.Tensor]:
    return {"layer3": torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(1))}


def good_check() -> None:
    guard_finite({"x": torch.ones(3)}, "raise")


def test_cpu_raises_at_once_naming_the_argument_layer_and_shapes() -> None:
    loss = ntl.AntiTransferLoss(aggregation="mean", distance="cos")
    with pytest.raises(ValueError, match=NAN_MESSAGE) as raised:
        loss(features(nan=True), reference())
    assert "'student' (layer 'layer3') (4, 3, 2, 2)" in str(raised.value)
    assert "found on" not in str(raised.value)  # not a late report
    assert not _validation.pending_checks


def test_nothing_raises_while_the_device_has_not_finished_the_bad_step() -> None:
    loss = ntl.AntiTransferLoss(aggregation="mean", distance="cos")
    with checks_deferred_on_cpu(complete=False) as events:
        loss(features(nan=True), reference())  # the bad step
        for _ in range(3):
            loss(features(), reference())
        assert len(events) == 4
        assert all(event.recorded for event in events)
        assert len(_validation.pending_checks) == 4


def test_the_error_arrives_at_the_first_check_after_the_device_finished() -> None:
    loss = ntl.AntiTransferLoss(aggregation="mean", distance="cos")
    with checks_deferred_on_cpu(complete=False) as events:
        loss(features(nan=True), reference())
        loss(features(), reference())
        events[0].done = True
        with pytest.raises(ValueError, match=NAN_MESSAGE) as raised:
            good_check()  # any check reports it, not only the same module's
        assert "found on cpu by a check 2 check call(s) before this one" in str(raised.value)
        assert len(_validation.pending_checks) == 1  # the good step's check is still waiting, and passes
        events[1].done = True
        good_check()
        assert len(_validation.pending_checks) == 1  # only the last good check


def test_the_bound_forces_the_error_within_max_pending_checks_calls() -> None:
    with checks_deferred_on_cpu(complete=False) as events:
        guard_finite({"logits_a": torch.tensor([float("inf")])}, "raise")
        for call in range(1, MAX_PENDING_CHECKS + 1):
            if call < MAX_PENDING_CHECKS:
                good_check()
                continue
            with pytest.raises(ValueError, match=r"'logits_a' contain NaN or inf"):
                good_check()
        assert events[0].done  # the oldest check was waited for
        assert not any(event.done for event in events[1:])
        assert len(_validation.pending_checks) == MAX_PENDING_CHECKS


def test_a_step_with_many_checks_waits_for_none_of_them() -> None:
    """Nine layers of anti-transfer and a multi-task loss in one step: no check waits for the device."""
    g = torch.Generator().manual_seed(0)
    student = {f"layer{i}": torch.randn(4, 3, 2, 2, generator=g, requires_grad=True) for i in range(9)}
    frozen = {name: torch.randn(4, 3, 2, 2, generator=g) for name in student}
    relatedness = ntl.TaskRelatedness([[0.9, 0.1], [0.2, 0.7], [0.5, 0.5]])
    multi_task = ntl.MultiTaskLoss(relatedness)
    labels_a, labels_b = torch.tensor([0, 1, 2, -100]), torch.tensor([[1.0, 0.0], [-1.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    with checks_deferred_on_cpu(complete=False) as events:
        for _ in range(2):  # two steps while the device has finished nothing
            loss = ntl.AntiTransferLoss()(student, frozen)
            loss = loss + multi_task(torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g), labels_a, labels_b)
        assert len(events) >= 2 * (9 + 3)
        assert not any(event.done for event in events)


def test_a_non_finite_batch_whose_error_comes_later_leaves_the_modules_state_alone() -> None:
    """Purify's running means and the adversary's head never take in the batch while its error is on its way."""
    g = torch.Generator().manual_seed(0)
    z, u, y = torch.randn(12, 4, generator=g), torch.arange(12) % 3, torch.arange(12) // 6
    purify, conditional = ntl.Purify(3, 4), ntl.Purify(3, 4, conditional=True)
    adversary = ntl.AdversarialSuppression(3, dim=4)
    purify(z, u), conditional(z, u, task_labels=y), adversary(z, u)
    before = [t.clone() for m in (purify, conditional, adversary) for t in m.state_dict().values()]
    bad = z.clone()
    bad[0, 0] = float("nan")
    with checks_deferred_on_cpu(complete=False):
        purify(bad, u), conditional(bad, u, task_labels=y), adversary(bad, u)
        after = [t for m in (purify, conditional, adversary) for t in m.state_dict().values()]
        for old, new in zip(before, after, strict=True):
            if old.is_floating_point():
                torch.testing.assert_close(new, old)
        with pytest.raises(ValueError, match=r"'features' contain NaN or inf"):
            ntl.raise_pending_errors()


@pytest.mark.parametrize(
    "call",
    [
        "masked_cross_entropy",
        "soft_co_annotation",
        "MultiTaskLoss",
        "AdversarialSuppression",
        "adversarial_suppression",
    ],
)
def test_a_label_out_of_range_is_reported_not_used_as_an_index(call: str) -> None:
    """While the label check's error is on its way, no loss indexes with the bad label (on a GPU that is a
    device-side assert, which kills the process before the error can be read)."""
    g = torch.Generator().manual_seed(0)
    z, logits_b = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    bad = torch.tensor([0, 7, -100, 2])
    relatedness = ntl.TaskRelatedness([[0.9, 0.1], [0.2, 0.7], [0.5, 0.5]])
    targets_b = torch.tensor([[1.0, 0.0], [-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]])
    calls = {
        "masked_cross_entropy": lambda: ntf.masked_cross_entropy(z, bad),
        "soft_co_annotation": lambda: ntf.soft_co_annotation(z, logits_b, bad, targets_b, relatedness.matrix),
        "MultiTaskLoss": lambda: ntl.MultiTaskLoss(relatedness)(z, logits_b, bad, targets_b),
        "AdversarialSuppression": lambda: ntl.AdversarialSuppression(3, dim=3)(z, bad),
        "adversarial_suppression": lambda: ntf.adversarial_suppression(z, bad, torch.nn.Linear(3, 3), num_irrelevant=3),
    }
    with checks_deferred_on_cpu(complete=False):
        calls[call]()  # no IndexError or index-out-of-bounds RuntimeError here
        with pytest.raises(ValueError, match=r"holds 7, outside \[0, 3\)"):
            ntl.raise_pending_errors()


def test_raise_pending_errors_waits_and_raises_every_failure_once() -> None:
    with checks_deferred_on_cpu(complete=False) as events:
        check_labels(torch.tensor([0, 7, -100, 2]), 3, 4, name="irrelevant_labels", what="irrelevant classes")
        guard_finite({"features": torch.tensor([[1.0, float("nan")]])}, "raise", layer="fc")
        good_check()
        with pytest.raises(ValueError) as raised:
            ntl.raise_pending_errors()
        message = str(raised.value)
        assert "'irrelevant_labels' holds 7, outside [0, 3) for 3 irrelevant classes" in message
        assert "labels of shape (4,)" in message
        assert "'features' (layer 'fc') contain NaN or inf" in message
        assert message.index("irrelevant_labels") < message.index("'features'")  # oldest first
        assert all(event.done for event in events)
        ntl.raise_pending_errors()  # nothing left: raised once


def test_valid_inputs_never_raise_and_leave_nothing_behind() -> None:
    loss = ntl.AntiTransferLoss(aggregation="mean", distance="cos")
    with checks_deferred_on_cpu() as events:
        for _ in range(2 * MAX_PENDING_CHECKS):
            loss(features(), reference())
        assert len(events) == 2 * MAX_PENDING_CHECKS
        ntl.raise_pending_errors()
        assert not _validation.pending_checks


def test_the_deferred_path_makes_no_host_read() -> None:
    loss = ntl.AntiTransferLoss(aggregation="mean", distance="cos")
    with checks_deferred_on_cpu(complete=False), SyncCounter() as counter:
        loss(features(nan=True), reference())
        check_labels(torch.tensor([0, 5]), 3, 2, name="labels_a")
        multilabel_targets(torch.tensor([[0.0, 2.0]]), (1, 2), torch.float32, name="labels_b")
        for _ in range(3):
            loss(features(), reference())
    assert counter.total == 0, dict(counter.counts)


def test_label_and_target_messages_name_the_first_bad_value() -> None:
    with checks_deferred_on_cpu() as events:
        check_labels(torch.tensor([1, -100, -3, 9]), 4, 4, name="labels_a", what="classes of task A")
        assert events
        with pytest.raises(ValueError, match=r"'labels_a' holds -3, outside \[0, 4\) for 4 classes of task A"):
            good_check()
        multilabel_targets(torch.tensor([[0.5, -1.0], [1.5, 3.0]]), (2, 2), torch.float32, name="targets")
        with pytest.raises(ValueError, match=r"annotated entries of 'targets' must lie in \[0, 1\], got 1.5"):
            ntl.raise_pending_errors()


def test_the_checks_at_once_on_cpu_give_the_same_messages() -> None:
    with pytest.raises(ValueError, match=r"'labels_a' holds -3, outside \[0, 4\) for 4 classes of task A"):
        check_labels(torch.tensor([1, -100, -3, 9]), 4, 4, name="labels_a", what="classes of task A")
    with pytest.raises(ValueError, match=r"annotated entries of 'targets' must lie in \[0, 1\], got 1.5"):
        multilabel_targets(torch.tensor([[0.5, -1.0], [1.5, 3.0]]), (2, 2), torch.float32, name="targets")
    check_labels(torch.tensor([], dtype=torch.long), 3, 0, name="labels")  # an empty batch has nothing to read


def test_skip_policy_stays_on_the_device() -> None:
    x = torch.tensor([1.0, float("nan")])
    with checks_deferred_on_cpu() as events, SyncCounter() as counter:
        guarded, finite = guard_finite({"x": x}, "skip")
    assert not events and counter.total == 0
    assert finite is not None and not finite.item()
    assert torch.equal(guarded["x"], torch.zeros(2))


def test_checks_are_skipped_while_compiling() -> None:
    def step(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        check_labels(labels, 3, 2, name="labels")
        guarded, _ = guard_finite({"x": x}, "raise")
        return guarded["x"].sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    with checks_deferred_on_cpu() as events:
        value = compiled(torch.tensor([1.0, float("nan")]), torch.tensor([0, 9]))
        assert not events
    assert value.isnan()


@pytest.mark.parametrize(
    ("kind", "bad_a", "bad_b"),
    [
        ("multiclass", [0, 1, 7, -100, 1], [1, 0, 1, 0, -100]),
        ("multiclass", [0, 1, 2, -100, 1], [1, 0, 7, 0, -100]),
        ("multilabel", [0, 1, 7, -100, 1], [[1.0, 0.0]] * 5),  # multilabel B holds values, not indices
    ],
)
def test_estimate_reports_a_label_out_of_range_instead_of_indexing_with_it(
    kind: str, bad_a: list[int], bad_b: list[int]
) -> None:
    """With the range check deferred (a GPU), `TaskRelatedness.estimate` builds its one-hot rows by comparison
    (F.one_hot indexes at once: a device-side assert there, a RuntimeError here) and waits for the check: the
    ValueError naming the label is what the caller sees. Valid labels give the matrix of the immediate checks."""
    labels_a, labels_b = torch.tensor(bad_a), torch.tensor(bad_b)
    side = "labels_a" if 7 in bad_a else "labels_b"
    with checks_deferred_on_cpu(complete=False), pytest.raises(ValueError, match=rf"'{side}' holds 7, outside"):
        ntl.TaskRelatedness.estimate(labels_a, labels_b, num_a=3, num_b=2, kind=kind)  # type: ignore[arg-type]
    good_a, good_b = labels_a.clamp(max=2), labels_b.clamp(max=1)
    with checks_deferred_on_cpu(complete=False):
        deferred = ntl.TaskRelatedness.estimate(good_a, good_b, num_a=3, num_b=2, kind=kind)  # type: ignore[arg-type]
    at_once = ntl.TaskRelatedness.estimate(good_a, good_b, num_a=3, num_b=2, kind=kind)  # type: ignore[arg-type]
    assert torch.equal(deferred.matrix, at_once.matrix) and torch.equal(deferred.prior, at_once.prior)
    assert not torch.equal(at_once.matrix, torch.full_like(at_once.matrix, 0.5))  # the data moved it
