"""`b_to_a_gate="label_advantage"`: the B→A matching term scaled by task B's share of extra labels in the batch.

Its host syncs, graph breaks, resume and checks are counted with every module's, through the case
"MultiTaskLoss, B→A gated" of tests/module_cases.py."""

from __future__ import annotations

import math

import oracles
import pytest
import torch
from helpers import assert_matches_oracle

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf

R = ntl.TaskRelatedness([[0.0, 0.0], [0.9, 0.2], [0.1, 0.8]], prior=[0.2, 0.3, 0.5])
NAN = math.nan


def gate_oracle(labels_a: torch.Tensor, labels_b: torch.Tensor) -> float:
    """`max(0, n_B − n_A) / (n_A + n_B)` counted in plain Python from the label lists."""
    n_a = sum(1 for a in labels_a.tolist() if a != -100)
    rows = labels_b.tolist()
    if labels_b.dim() == 1:
        n_b = sum(1 for b in rows if b != -100)
    else:
        n_b = sum(1 for row in rows if any(not math.isnan(v) and v != -1 for v in row))
    return max(0, n_b - n_a) / max(1, n_a + n_b)


def batch(n_a: int, n_b: int, n_none: int = 0, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """`n_a` A-only, `n_b` B-only and `n_none` unlabelled samples, float64 logits."""
    g = torch.Generator().manual_seed(seed)
    n = n_a + n_b + n_none
    za = torch.randn(n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    zb = torch.randn(n, 2, generator=g, dtype=torch.float64, requires_grad=True)
    la = torch.cat([torch.randint(0, 3, (n_a,), generator=g), torch.full((n_b + n_none,), -100)])
    lb = torch.cat(
        [
            torch.full((n_a, 2), NAN, dtype=torch.float64),
            torch.randint(0, 2, (n_b, 2), generator=g).double(),
            torch.full((n_none, 2), NAN, dtype=torch.float64),
        ]
    )
    return za, zb, la, lb


@pytest.mark.parametrize(("n_a", "n_b", "n_none"), [(2, 7, 1), (5, 5, 0), (7, 2, 3), (0, 4, 0), (0, 0, 3)])
def test_gated_b_to_a_term_equals_the_oracle(n_a: int, n_b: int, n_none: int) -> None:
    za, zb, la, lb = batch(n_a, n_b, n_none)
    r, pi = R.matrix.double(), R.prior.double()
    gate = gate_oracle(la, lb)

    def gated(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return ntf.multi_task_terms(za, zb, la, lb, r, prior=pi, b_to_a_gate="label_advantage")["matching/b_to_a"]

    def oracle(za: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        return gate * oracles.dm_b_to_a(za, zb, r, pi, "multilabel", "bayes", "kl", False)

    assert_matches_oracle(gated, oracle, za, zb)
    plain = ntf.multi_task_terms(za, zb, la, lb, r, prior=pi)
    gated_terms = ntf.multi_task_terms(za, zb, la, lb, r, prior=pi, b_to_a_gate="label_advantage")
    for name in plain:  # every other part is untouched
        if name != "matching/b_to_a":
            assert torch.equal(plain[name], gated_terms[name]), name


def test_label_advantage_counts_samples_not_entries_and_is_zero_without_labels() -> None:
    known_a = torch.tensor([True, True, False, False, False])
    known_b = torch.tensor([False, False, True, True, True])
    assert ntf.label_advantage(known_a, known_b).item() == pytest.approx(1 / 5)
    assert ntf.label_advantage(known_b, known_a).item() == 0.0
    none = torch.zeros(4, dtype=torch.bool)
    assert ntf.label_advantage(none, none).item() == 0.0
    _, _, la, lb = batch(1, 3)
    lb[1, 0] = NAN  # a sample with one of its two attributes annotated still counts once
    gated = ntf.multi_task_terms(*batch(1, 3)[:2], la, lb, R.matrix.double(), b_to_a_gate="label_advantage")
    plain = ntf.multi_task_terms(*batch(1, 3)[:2], la, lb, R.matrix.double())
    torch.testing.assert_close(gated["matching/b_to_a"], 0.5 * plain["matching/b_to_a"])


def test_label_advantage_rejects_hostile_masks() -> None:
    mask = torch.ones(3, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"'known_a' must be a bool tensor, got torch.int64"):
        ntf.label_advantage(torch.ones(3, dtype=torch.long), mask)
    with pytest.raises(ValueError, match=r"'known_b' must be 1-D .* got shape \(3, 1\)"):
        ntf.label_advantage(mask, mask[:, None])
    with pytest.raises(ValueError, match=r"same batch: got shapes \(3,\) and \(2,\)"):
        ntf.label_advantage(mask, mask[:2])
    with pytest.raises(TypeError, match=r"'dtype' must be a floating-point dtype"):
        ntf.label_advantage(mask, mask, dtype=torch.int64)


def test_multiclass_task_b_is_gated_by_its_known_classes() -> None:
    r = ntl.TaskRelatedness([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], kind="multiclass")
    za, zb, _, _ = batch(2, 4)
    la = torch.tensor([0, 2, -100, -100, -100, -100])
    lb = torch.tensor([-100, -100, 1, 0, 1, 0])
    loss = ntl.MultiTaskLoss(r, b_to_a_gate="label_advantage", co_annotation_weight=0.0)
    loss(za, zb, la, lb)
    plain = ntl.MultiTaskLoss(r, co_annotation_weight=0.0)
    plain(za, zb, la, lb)
    torch.testing.assert_close(
        loss.last_terms["matching/b_to_a/value"], (2 / 6) * plain.last_terms["matching/b_to_a/value"]
    )
    torch.testing.assert_close(loss.last_terms["matching/a_to_b/value"], plain.last_terms["matching/a_to_b/value"])


def test_module_terms_and_backends_agree_with_the_functional_gate() -> None:
    za, zb, la, lb = batch(3, 6, 1)
    loss = ntl.MultiTaskLoss(R, b_to_a_gate="label_advantage").double()
    total = loss(za, zb, la, lb)
    parts = loss.terms(za, zb, la, lb)
    torch.testing.assert_close(sum(parts.values()), total)
    expected = ntf.multi_task_terms(
        za, zb, la, lb, R.matrix.double(), prior=R.prior.double(), b_to_a_gate="label_advantage"
    )
    torch.testing.assert_close(loss.last_terms["matching/b_to_a/value"], expected["matching/b_to_a"].detach())
    ops_terms = ntl.ops.multi_task_terms(
        za, zb, la, lb, R.matrix.double(), prior=R.prior.double(), b_to_a_gate="label_advantage", backend="torch"
    )
    assert all(torch.equal(ops_terms[k], expected[k]) for k in expected)
    assert "b_to_a_gate='label_advantage'" in repr(loss)


def test_a_gate_that_does_not_apply_raises() -> None:
    za, zb, la, lb = batch(2, 2)
    with pytest.raises(ValueError, match=r"'b_to_a_gate'"):
        ntl.MultiTaskLoss(R, b_to_a_gate="confidence")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"b_to_a_gate='label_advantage' scales the B→A matching term"):
        ntl.MultiTaskLoss(R, b_to_a_gate="label_advantage", directions=("a_to_b",))
    with pytest.raises(ValueError, match=r"b_to_a_gate='label_advantage' scales the B→A matching term"):
        ntl.MultiTaskLoss(R, b_to_a_gate="label_advantage", matching_weight=0.0)
    with pytest.raises(ValueError, match=r"parts=\('supervised_a',\)"):
        ntf.multi_task_terms(za, zb, la, lb, R.matrix, parts=("supervised_a",), b_to_a_gate="label_advantage")
