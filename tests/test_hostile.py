"""Hostile input for every public loss: valid input gives a finite value and gradient; invalid input raises a
documented error (ValueError, TypeError, or the taps' own errors), never a bare error from inside torch.

Every case is counted; the totals are printed at the end of the run (conftest.py) for the report.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import oracles
import pytest
import torch
from helpers import HOSTILE_CASES
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses.functional.pairwise import stochastic_window

CASES = HOSTILE_CASES
DOCUMENTED_ERRORS = (ValueError, TypeError, ntl.StaleFeaturesError, ntl.MissingFeaturesError)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SCALES = [1e-6, 1e-3, 1.0, 1e2, 1e4]


def finite_case(name: str, loss_fn: Callable[..., Tensor], *inputs: Tensor) -> None:
    """`loss_fn(*inputs)` and its gradient with respect to the floating inputs are finite."""
    CASES["tried"] += 1
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    value = loss_fn(*leaves)
    assert value.dim() == 0, f"{name}: not a scalar"
    assert torch.isfinite(value), f"{name}: {value.item()}"
    floating = [x for x in leaves if x.requires_grad]
    if value.requires_grad and floating:
        grads = torch.autograd.grad(value, floating, allow_unused=True)
        for g in grads:
            assert g is None or torch.isfinite(g).all(), f"{name}: non-finite gradient"
    CASES["finite"] += 1


def assert_value(name: str, value: Tensor, expected: Tensor | float, rtol: float = 1e-3, atol: float = 1e-4) -> None:
    """`value` (computed in float32 at least) is the float64 oracle's `expected`."""
    expected = torch.as_tensor(expected, dtype=torch.float64).detach()
    torch.testing.assert_close(value.detach().double(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def constant(x: Tensor) -> bool:
    """Every sample equal: the centred features are 0, a CKA or normalized HSIC 0/0, whose documented value is 0."""
    return bool((x == x[:1]).all())


def clear_error(name: str, call: Callable[[], Any], match: str) -> None:
    """`call()` raises a documented error whose message matches `match`."""
    CASES["tried"] += 1
    with pytest.raises(DOCUMENTED_ERRORS, match=match):
        call()
    CASES["clear error"] += 1


@st.composite
def features(draw: st.DrawFn, min_batch: int = 1, max_batch: int = 6, layout: str | None = None) -> Tensor:
    batch = draw(st.integers(min_batch, max_batch))
    layout = layout or draw(st.sampled_from(["flat", "audio", "map"]))
    shape = {
        "flat": (batch, draw(st.integers(1, 6))),
        "audio": (batch, draw(st.integers(1, 4)), draw(st.integers(1, 5))),
    }.get(layout, (batch, draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3))))
    dtype = draw(st.sampled_from(DTYPES))
    # float16 below its normal range (6e-5) is out of the domain: it cannot hold such features, and the
    # scale-invariant losses' gradients (∝ 1/scale) exceed its range (docs/errors.md)
    scale = draw(st.sampled_from([s for s in SCALES if dtype != torch.float16 or s >= 1e-3]))
    kind = draw(st.sampled_from(["normal", "normal", "zeros", "constant", "sparse"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif kind == "constant":
        x = torch.full(shape, draw(st.floats(-3, 3)), dtype=torch.float64)
    elif kind == "sparse":
        x = x * (torch.rand(shape, generator=g) < 0.2)
    if dtype == torch.float16:  # every non-zero value in float16's normal range too (a constant 5e-5 · 1e-3 is not)
        x = torch.where(x == 0, x, x.sign() * x.abs().clamp_min(1e-4 / scale))
    return (scale * x).to(dtype)


def labels(draw: st.DrawFn, batch: int, num_classes: int) -> Tensor:
    kind = draw(st.sampled_from(["random", "random", "one class", "all missing", "some missing"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    u = torch.randint(0, num_classes, (batch,), generator=g)
    if kind == "one class":
        u[:] = draw(st.integers(0, num_classes - 1))
    elif kind == "all missing":
        u[:] = -100
    elif kind == "some missing":
        u[torch.rand(batch, generator=g) < 0.5] = -100
    return u


# --- valid input: finite value and gradient ----------------------------------------------------------


@settings(max_examples=150)
@given(st.data())
def test_anti_transfer_is_finite_on_valid_input(data: st.DataObject) -> None:
    aggregation = data.draw(
        st.sampled_from(["none", "mean", "sum", "max", "mul", "gram", "pairwise", "stochastic_pairwise"])
    )
    distance = data.draw(st.sampled_from(["cos_squared", "cos", "mse_sigmoid", "cka"]))
    scope = None if aggregation != "gram" or distance == "cka" else data.draw(st.sampled_from(["batch", "sample"]))
    layout = (
        "flat"
        if aggregation in ("none", "gram") and data.draw(st.booleans())
        else data.draw(st.sampled_from(["audio", "map"]))
    )
    s = data.draw(features(min_batch=2 if distance == "cka" else 1, layout=layout))
    r = data.draw(features(min_batch=s.shape[0], max_batch=s.shape[0], layout=layout))
    r = r.reshape(s.shape) if r.numel() == s.numel() else torch.randn(s.shape).to(r.dtype)
    if aggregation == "mul":
        s, r = s.abs(), r.abs()
    loss = ntl.AntiTransferLoss(aggregation=aggregation, distance=distance, gram_scope=scope)  # type: ignore[arg-type]
    finite_case(f"anti_transfer {aggregation}/{distance}/{scope}", loss, s, r)
    # the value: the float64 oracle on the same (rounded) inputs; 0 where CKA's oracle is 0/0 (a constant side)
    seeded = ntl.AntiTransferLoss(
        aggregation=aggregation,  # type: ignore[arg-type]
        distance=distance,  # type: ignore[arg-type]
        gram_scope=scope,
        generator=torch.Generator().manual_seed(5),
    )
    a, b = s.double(), r.double()
    if aggregation == "stochastic_pairwise":
        window = stochastic_window(s.shape[1], s.shape[0], torch.Generator().manual_seed(5))
        a, b = a[:, window], b[:, window]
    oracle_aggregation = "pairwise" if aggregation == "stochastic_pairwise" else aggregation
    offsets = (max(1e-10, torch.finfo(s.dtype).tiny), max(1e-10, torch.finfo(r.dtype).tiny))  # "mul"'s documented δ
    sides = [
        oracles.aggregated(x, oracle_aggregation, scope or "sample", o) for x, o in zip((a, b), offsets, strict=True)
    ]
    expected = (
        0.0  # CKA of a constant side: 0/0, documented as 0
        if distance == "cka" and any(constant(x) for x in sides)
        else oracles.anti_transfer(a, b, oracle_aggregation, distance, scope or "sample", offsets=offsets)
    )
    assert_value(f"anti_transfer {aggregation}/{distance}/{scope}", seeded(s, r), expected)


@settings(max_examples=150)
@given(st.data())
def test_suppression_is_finite_on_valid_input(data: st.DataObject) -> None:
    method = data.draw(st.sampled_from(["hsic", "adversarial", "cka"]))
    z = data.draw(features(min_batch=4 if method != "adversarial" else 1))
    k = data.draw(st.integers(2, 5))
    u = labels(data.draw, z.shape[0], k)
    dim = z[0].numel()
    kwargs: dict[str, Any] = {"kernel": data.draw(st.sampled_from(["linear", "rbf"]))}
    if method == "hsic":
        kwargs["normalized"] = data.draw(st.booleans())
    if method == "adversarial":
        kwargs = {"dim": dim, "entropy_weight": data.draw(st.sampled_from([0.0, 0.5]))}
    if method == "cka":
        loss = ntl.make_suppression("cka", **kwargs)
        reference = data.draw(features(min_batch=z.shape[0], max_batch=z.shape[0]))
        finite_case("suppression cka", lambda f, r: loss(f, r), z, reference)
        expected = oracles.cka(z.double(), reference.double(), kwargs["kernel"])
        if constant(z) or constant(reference):
            expected = torch.zeros((), dtype=torch.float64)  # 0/0: documented as 0
        assert_value("suppression cka", loss(z, reference), expected)
        return
    loss = ntl.make_suppression(method, num_irrelevant=k, **kwargs).to(z.dtype)  # type: ignore[call-overload]
    finite_case(f"suppression {method}", lambda f: loss(f, u), z)
    known = u != -100
    if method == "hsic":
        expected = torch.zeros((), dtype=torch.float64)  # fewer than 4 known labels: documented as 0
        if int(known.sum()) >= 4:
            expected = oracles.irrelevant_hsic(z.double(), u, k, kwargs["kernel"], kwargs["normalized"])
        if kwargs["normalized"] and (constant(z[known]) or constant(u[known]) or not torch.isfinite(expected)):
            expected = torch.zeros((), dtype=torch.float64)  # a constant side: 0/0, documented as 0
        # float32 rounding of the linear kernel's entries (|z_i|² up to 1e8 here) sets the unnormalized HSIC's atol
        entries = float(z.double().reshape(z.shape[0], -1).square().sum(dim=1).max())
        linear = kwargs["kernel"] == "linear" and not kwargs["normalized"]
        assert_value("suppression hsic", loss(z, u), expected, atol=1e-4 * max(1.0, entries) if linear else 1e-4)
        return
    # the adversary in eval mode (no steps of its own): the cross-entropy of its head on the known labels, plus the
    # entropy term on every sample (the head's parameters in float64; the module rounds 16-bit features)
    value = loss.eval()(z, u)
    logits = copy.deepcopy(loss.head).double()(z.double().reshape(z.shape[0], -1))
    expected = oracles.cross_entropy(logits, u) if bool(known.any()) else torch.zeros((), dtype=torch.float64)
    expected = expected + kwargs["entropy_weight"] * oracles.mean_p_log_p(logits)
    # a 16-bit head computes its logits in its dtype: their rounding (a few ulps of the largest) bounds the error
    wide = z.dtype in (torch.float32, torch.float64)
    atol = 1e-4 if wide else 1e-2 + 2**-6 * float(logits.detach().abs().max())
    assert_value("suppression adversarial", value, expected, rtol=1e-4 if wide else 1e-2, atol=atol)


@settings(max_examples=150)
@given(st.data())
def test_purify_is_finite_on_valid_input(data: st.DataObject) -> None:
    z = data.draw(features())
    k = data.draw(st.integers(2, 4))
    purify = ntl.Purify(k, z[0].numel(), momentum=data.draw(st.sampled_from([0.01, 0.5, 1.0])))
    seen: set[int] = set()
    for _ in range(3):
        u = labels(data.draw, z.shape[0], k)
        purify(z, u)
        seen |= {int(label) for label in u if label != -100}
    finite_case("purify", lambda f: purify(f).float().sum(), z)
    assert torch.isfinite(purify.class_means).all()
    # the value: z − z P, P the (SVD) projector onto the class means' differences once every class was seen,
    # the identity before; in the features' dtype
    flat = z.double().reshape(z.shape[0], -1)
    p = oracles.erasure_projector(purify.class_means) if len(seen) == k else torch.zeros(flat.shape[1], flat.shape[1])
    out = purify(z)
    assert out.dtype == z.dtype and out.shape == z.shape
    tol = 1e-2 if z.dtype in (torch.float16, torch.bfloat16) else 1e-5
    scale = float(flat.abs().max())
    torch.testing.assert_close(out.double().reshape(flat.shape), flat - flat @ p.double(), rtol=tol, atol=tol * scale)


@st.composite
def relatedness(draw: st.DrawFn) -> ntl.TaskRelatedness:
    k, m = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kind = draw(st.sampled_from(["multilabel", "multiclass"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    r = torch.rand(k, m, generator=g, dtype=torch.float64)
    if draw(st.booleans()):
        r[0] = 0.0  # a neutral class
    if kind == "multiclass":
        r = (r + 1e-3) / (r + 1e-3).sum(1, keepdim=True)
    else:
        r = r.round() if draw(st.booleans()) else r  # hard 0/1 tables too
    return ntl.TaskRelatedness(r, kind=kind)  # type: ignore[arg-type]


@settings(max_examples=150)
@given(st.data(), relatedness())
def test_distribution_matching_is_finite_on_valid_input(data: st.DataObject, rel: ntl.TaskRelatedness) -> None:
    batch = data.draw(st.integers(1, 6))
    dtype, scale = data.draw(st.sampled_from(DTYPES)), data.draw(st.sampled_from([1.0, 1e2, 1e4]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    za = (scale * torch.randn(batch, rel.num_a, generator=g)).to(dtype)
    zb = (scale * torch.randn(batch, rel.num_b, generator=g)).to(dtype)
    la = labels(data.draw, batch, rel.num_a)
    if rel.kind == "multilabel":
        lb = torch.rand(batch, rel.num_b, generator=g).round()
        lb[torch.rand(batch, rel.num_b, generator=g) < data.draw(st.sampled_from([0.0, 0.5, 1.0]))] = math.nan
    else:
        lb = labels(data.draw, batch, rel.num_b)
    inversion = "product" if bool((rel.matrix > 0).any()) and data.draw(st.booleans()) else "bayes"
    divergence = data.draw(st.sampled_from(["kl", "ce"]))
    loss = ntl.MultiTaskLoss(rel, inversion=inversion, divergence=divergence)  # type: ignore[arg-type]
    finite_case(f"multitask {rel.kind}/{inversion}/{divergence}", lambda a, b: loss(a, b, la, lb), za, zb)
    # the value: the float64 oracles' terms, every weight 1 (R and π as the module holds them); a supervised term
    # without a known label is 0
    r, prior, kind = loss.matrix.double(), loss.prior.double(), rel.kind
    a, b = za.double(), zb.double()
    known_b = (~lb.isnan() & (lb >= 0)).any(dim=1) if kind == "multilabel" else lb != -100
    zero = torch.zeros((), dtype=torch.float64)
    expected = (
        (oracles.masked_ce(a, la) if bool((la != -100).any()) else zero)
        + (
            zero
            if not bool(known_b.any())
            else oracles.masked_bce(b, lb)
            if kind == "multilabel"
            else oracles.masked_ce(b, lb)
        )
        + oracles.dm_a_to_b(a, b, r, kind, divergence, False)
        + oracles.dm_b_to_a(a, b, r, prior, kind, inversion, divergence, False)
        + sum(oracles.co_annotation(a, b, la, lb, r, prior, kind, inversion))
    )
    assert_value(f"multitask {kind}/{inversion}/{divergence}", loss(za, zb, la, lb), expected, rtol=1e-4)


@settings(max_examples=150)
@given(features(min_batch=4), features(min_batch=4), st.sampled_from(["hsic", "cka", "linear_cka", "cka_unbiased"]))
def test_similarity_functions_are_finite_on_valid_input(x: Tensor, y: Tensor, name: str) -> None:
    y = y[: x.shape[0]] if y.shape[0] >= x.shape[0] else torch.randn(x.shape[0], 3).to(y.dtype)
    x = x[: y.shape[0]]
    fn = {
        "hsic": lambda a, b: ntf.hsic(a, b, kernel="rbf"),
        "cka": lambda a, b: ntf.cka(a, b, kernel="rbf"),
        "linear_cka": ntf.linear_cka,
        "cka_unbiased": lambda a, b: ntf.linear_cka(a, b, unbiased=True),
    }[name]
    finite_case(name, fn, x, y)
    oracle = {
        "hsic": lambda a, b: oracles.hsic(a, b, "rbf", unbiased=True),
        "cka": lambda a, b: oracles.cka(a, b, "rbf"),
        "linear_cka": oracles.linear_cka_feature_space,
        "cka_unbiased": lambda a, b: oracles.cka(a, b, "linear", unbiased=True),
    }[name]
    expected = oracle(x.double(), y.double())
    if name != "hsic" and (constant(x) or constant(y) or not torch.isfinite(expected)):
        expected = torch.zeros((), dtype=torch.float64)  # a constant side, or a non-positive unbiased self-HSIC
    assert_value(name, fn(x, y), expected)


# --- empty batches and non-finite values -------------------------------------------------------------


def test_empty_batches() -> None:
    rel = ntl.TaskRelatedness([[0.5, 0.2], [0.1, 0.9]])
    za, zb = torch.zeros(0, 2), torch.zeros(0, 2)
    finite_case(
        "multitask empty",
        lambda a, b: ntl.MultiTaskLoss(rel)(a, b, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2)),
        za,
        zb,
    )
    finite_case("masked ce empty", lambda a: ntf.masked_cross_entropy(a, torch.zeros(0, dtype=torch.long)), za)
    # documented: an empty batch gives zeros, never NaN
    assert ntl.MultiTaskLoss(rel)(za, zb, torch.zeros(0, dtype=torch.long), torch.zeros(0, 2)).item() == 0.0
    assert ntf.masked_cross_entropy(za, torch.zeros(0, dtype=torch.long)).item() == 0.0
    clear_error(
        "anti_transfer empty",
        lambda: ntf.anti_transfer(torch.zeros(0, 2, 3), torch.zeros(0, 2, 3)),
        "at least 1 sample",
    )
    clear_error(
        "purify empty",
        lambda: ntl.Purify(2, 3)(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)),
        "at least 1 sample",
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_features_raise_or_are_skipped(bad: float) -> None:
    z = torch.randn(6, 4)
    z[2, 1] = bad
    u = torch.tensor([0, 1, 2, 0, 1, 2])
    rel = ntl.TaskRelatedness([[0.5, 0.2], [0.1, 0.9], [0.3, 0.3]])
    za = torch.randn(6, 3)
    za[0, 0] = bad
    raising: list[tuple[str, Callable[[], Tensor]]] = [
        ("anti_transfer", lambda: ntl.AntiTransferLoss()(z[:, :, None], z[:, :, None].flip(0))),
        ("hsic", lambda: ntl.HSICSuppression(3)(z, u)),
        ("adversarial", lambda: ntl.AdversarialSuppression(3, dim=4)(z, u)),
        ("cka", lambda: ntl.CKASuppression()(z, torch.randn(6, 2))),
        ("multitask", lambda: ntl.MultiTaskLoss(rel)(za, torch.randn(6, 2), u, torch.ones(6, 2))),
        ("matching", lambda: ntl.DistributionMatchingLoss(rel)(za, torch.randn(6, 2))),
        ("purify", lambda: ntl.Purify(3, 4)(z, u)),
    ]
    for name, call in raising:
        clear_error(f"{name} non-finite", call, "NaN or inf")
    skipping: list[tuple[str, Callable[[Tensor], Tensor]]] = [
        ("anti_transfer", lambda f: ntl.AntiTransferLoss(nan_policy="skip")(f[:, :, None], f[:, :, None].flip(0))),
        ("hsic", lambda f: ntl.HSICSuppression(3, nan_policy="skip")(f, u)),
        ("adversarial", lambda f: ntl.AdversarialSuppression(3, dim=4, nan_policy="skip")(f, u)),
        ("cka", lambda f: ntl.CKASuppression(nan_policy="skip")(f, torch.randn(6, 2))),
    ]
    for name, fn in skipping:
        finite_case(f"{name} skip", fn, z)
        assert fn(z).item() == 0.0
    finite_case(
        "matching skip", lambda a: ntl.DistributionMatchingLoss(rel, nan_policy="skip")(a, torch.randn(6, 2)), za
    )
    finite_case(
        "multitask skip",
        lambda a: ntl.MultiTaskLoss(rel, nan_policy="skip")(a, torch.randn(6, 2), u, torch.ones(6, 2)),
        za,
    )
    # documented: "skip" gives a zero loss (and a zero gradient) for the batch
    assert ntl.DistributionMatchingLoss(rel, nan_policy="skip")(za, torch.randn(6, 2)).item() == 0.0
    assert ntl.MultiTaskLoss(rel, nan_policy="skip")(za, torch.randn(6, 2), u, torch.ones(6, 2)).item() == 0.0
    purify = ntl.Purify(3, 4, nan_policy="skip")
    purify(z, u)
    assert not purify.ready and torch.equal(purify.class_means, torch.zeros(3, 4)), (
        "a NaN batch reached the running means"
    )


# --- invalid input: documented errors ----------------------------------------------------------------


def invalid_cases() -> list[tuple[str, Callable[[], Any], str]]:
    x, u = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    rel = ntl.TaskRelatedness([[0.5, 0.2], [0.1, 0.9], [0.3, 0.3]])
    meta = torch.randn(6, 4, device="meta")
    return [
        ("features not a tensor", lambda: ntl.AntiTransferLoss()([[1.0]], [[1.0]]), "both be tensors or both be dicts"),
        (
            "integer features",
            lambda: ntf.anti_transfer(torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 4)),
            "floating-point",
        ),
        (
            "complex features",
            lambda: ntf.hsic(torch.ones(5, 2, dtype=torch.complex64), torch.ones(5, 2)),
            "real floating-point",
        ),
        ("1-D features", lambda: ntf.anti_transfer(torch.ones(4), torch.ones(4)), "at least 2 dimension"),
        ("0-D features", lambda: ntf.linear_cka(torch.tensor(1.0), torch.tensor(1.0)), "at least 1 dimension"),
        ("batch mismatch", lambda: ntf.linear_cka(x, x[:5]), "same batch size"),
        ("device mismatch", lambda: ntf.linear_cka(x, meta), "same device"),
        ("device mismatch AT", lambda: ntf.anti_transfer(x[:, :, None], meta[:, :, None]), "same device"),
        ("device mismatch cka", lambda: ntl.CKASuppression()(x, meta), "same device"),
        ("labels float", lambda: ntf.irrelevant_hsic(x, u.float(), num_irrelevant=3), "integer class indices"),
        ("labels wrong shape", lambda: ntf.irrelevant_hsic(x, u[:, None], num_irrelevant=3), r"shape \(6,\)"),
        ("labels out of range", lambda: ntl.HSICSuppression(3)(x, u + 1), "holds 3, outside"),
        ("labels negative", lambda: ntl.Purify(3, 4)(x, u - 1), "holds -1, outside"),
        ("labels on another device", lambda: ntf.irrelevant_hsic(x, u.to("meta"), num_irrelevant=3), "same device"),
        ("hsic batch 3", lambda: ntl.HSICSuppression(3)(x[:3], u[:3]), "at least 4 samples"),
        (
            "cka batch 1",
            lambda: ntl.AntiTransferLoss(aggregation="none", distance="cka")(x[:1, :, None], x[:1, :, None]),
            "at least 2 samples",
        ),
        ("shape mismatch AT", lambda: ntl.AntiTransferLoss()(x[:, :, None], x[:, :2, None]), "distance='cka'"),
        ("unknown aggregation", lambda: ntl.AntiTransferLoss(aggregation="median"), "'aggregation' must be one of"),  # type: ignore[arg-type]
        ("unknown gather", lambda: ntl.AntiTransferLoss(gather="world"), "'gather' must be one of"),  # type: ignore[arg-type]
        ("unknown nan_policy", lambda: ntl.HSICSuppression(3, nan_policy="ignore"), "'nan_policy'"),  # type: ignore[arg-type]
        (
            "negative map for mul",
            lambda: ntf.anti_transfer(-x[:, :, None], x[:, :, None], aggregation="mul"),
            "non-negative",
        ),
        ("head dims", lambda: ntl.AdversarialSuppression(3, dim=5)(x, u), r"\(6, 4\)"),
        (
            "logits mismatch R",
            lambda: ntl.DistributionMatchingLoss(rel)(torch.randn(6, 2), torch.randn(6, 2)),
            r"\(N, 3\)",
        ),
        (
            "logits 1-D",
            lambda: ntl.DistributionMatchingLoss(rel)(torch.randn(6), torch.randn(6)),
            "at least 2 dimension",
        ),
        (
            "labels_b range",
            lambda: ntl.MultiTaskLoss(rel)(torch.randn(6, 3), torch.randn(6, 2), u, torch.full((6, 2), 2.0)),
            r"\[0, 1\]",
        ),
        ("relatedness NaN", lambda: ntl.TaskRelatedness([[math.nan, 0.5]]), r"\[0, 1\]"),
        ("relatedness rows", lambda: ntl.TaskRelatedness([[0.3, 0.3]], kind="multiclass"), "sums to"),
        ("purify dim", lambda: ntl.Purify(3, 5)(x, u), "5 values per sample"),
        ("tap unknown layer", lambda: ntl.FeatureTap(nn.Linear(2, 2), "weight"), "unknown layer"),
        ("tap pop twice", lambda: _pop_twice(), "captured nothing"),
        ("frozen not a module", lambda: ntl.FrozenReference("model", "x"), "must be an nn.Module"),  # type: ignore[arg-type]
    ]


def _pop_twice() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with ntl.FeatureTap(model, "0") as tap:
        model(torch.randn(1, 2))
    tap.pop()
    tap.pop()


@pytest.mark.parametrize(("name", "call", "match"), invalid_cases(), ids=[c[0] for c in invalid_cases()])
def test_invalid_input_raises_a_documented_error(name: str, call: Callable[[], Any], match: str) -> None:
    clear_error(name, call, match)
