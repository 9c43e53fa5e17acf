"""`HSICSuppression`, `CKASuppression` and `make_suppression`: values against the functions and the oracles."""

from __future__ import annotations

import inspect
from typing import Any

import oracles
import pytest
import torch
from helpers import assert_matches_oracle, count_syncs, value_and_grads

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf


def batch(n: int = 12, d: int = 5, k: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    u = torch.arange(n) % k
    return torch.randn(n, d, generator=g) + torch.eye(k, d)[u], u


def conditional_batch(n: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, u (tied to y on most samples, some unknown), y (some unknown), a frozen network's features."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    u = y.clone()
    u[[0, 4, 7, 10, 13]] = torch.tensor([1, 2, 2, 0, 1])
    u[[2, 5]] = -100
    y[[3, 9]] = -100
    z = torch.randn(n, 4, generator=g, dtype=torch.float64) + torch.eye(3, 4, dtype=torch.float64)[u.clamp(0)]
    r = torch.randn(n, 6, generator=g, dtype=torch.float64) + z[:, :1]
    return z, u, y, r


HSIC_OPTIONS = [
    {},
    {"kernel": "rbf", "normalized": True},
    {"kernel": "rbf", "sigma": 0.7, "unbiased": False},
    {"normalized": True, "unbiased": False},
]


@pytest.mark.parametrize("options", HSIC_OPTIONS, ids=["default", "rbf-normalized", "rbf-sigma-biased", "normalized"])
@pytest.mark.parametrize("conditional", [False, True])
def test_hsic_is_weight_times_the_functional(options: dict[str, Any], conditional: bool) -> None:
    z, u, y, _ = conditional_batch()
    task = {"task_labels": y} if conditional else {}
    loss = ntl.HSICSuppression(3, weight=0.5, conditional=conditional, **options)
    out = loss(z, u, **task)
    expected = ntf.irrelevant_hsic(z, u, num_irrelevant=3, **options, **task)
    torch.testing.assert_close(out, 0.5 * expected, rtol=0.0, atol=0.0)
    assert out.item() != 0.0
    assert set(loss.last_terms) == {"loss", "value"}
    assert torch.equal(loss.last_terms["loss"], out.detach())
    assert torch.equal(loss.last_terms["value"], expected)
    assert all(t.dim() == 0 and not t.requires_grad for t in loss.last_terms.values())


CKA_OPTIONS = [{}, {"kernel": "rbf"}, {"unbiased": True}, {"kernel": "rbf", "sigma": 1.3, "unbiased": True}]


@pytest.mark.parametrize("options", CKA_OPTIONS, ids=["default", "rbf", "unbiased", "rbf-sigma-unbiased"])
@pytest.mark.parametrize("conditional", [False, True])
def test_cka_is_weight_times_the_functional(options: dict[str, Any], conditional: bool) -> None:
    z, _, y, r = conditional_batch()
    task = {"task_labels": y} if conditional else {}
    loss = ntl.CKASuppression(weight=2.0, conditional=conditional, **options)
    out = loss(z, r, **task)
    expected = ntf.irrelevant_cka(z, r, **options, **task)
    torch.testing.assert_close(out, 2.0 * expected, rtol=0.0, atol=0.0)
    assert out.item() != 0.0
    assert set(loss.last_terms) == {"loss", "value"}
    assert torch.equal(loss.last_terms["value"], expected)


@pytest.mark.parametrize("conditional", [False, True])
def test_hsic_matches_the_oracle_on_values_and_gradients(conditional: bool) -> None:
    z, u, y, _ = conditional_batch()
    if conditional:
        loss = ntl.HSICSuppression(3, weight=0.5, conditional=True)
        assert_matches_oracle(
            lambda f: loss(f, u, task_labels=y),
            lambda f: 0.5 * oracles.conditional_irrelevant_hsic(f, u, y, 3),
            z,
            rtol=1e-8,
        )
    else:
        loss = ntl.HSICSuppression(3, weight=0.5)
        assert_matches_oracle(
            lambda f: loss(f, u), lambda f: 0.5 * oracles.irrelevant_hsic(f, u, 3, "linear", False), z, rtol=1e-8
        )


@pytest.mark.parametrize("conditional", [False, True])
def test_cka_matches_the_oracle_on_values_and_gradients(conditional: bool) -> None:
    z, _, y, r = conditional_batch()
    if conditional:
        loss = ntl.CKASuppression(weight=3.0, conditional=True)
        assert_matches_oracle(
            lambda f: loss(f, r, task_labels=y), lambda f: 3.0 * oracles.conditional_cka(f, r, y), z, rtol=1e-8
        )
    else:
        loss = ntl.CKASuppression(weight=3.0)
        assert_matches_oracle(lambda f: loss(f, r), lambda f: 3.0 * oracles.cka(f, r), z, rtol=1e-8)


def test_all_labels_missing_gives_zero_loss_and_gradient() -> None:
    z, _, y, r = conditional_batch()
    unknown = torch.full_like(y, -100)
    for fn in (
        lambda f: ntl.HSICSuppression(3)(f, unknown),
        lambda f: ntl.HSICSuppression(3, conditional=True)(f, unknown, task_labels=y),
        lambda f: ntl.CKASuppression(conditional=True)(f, r, task_labels=unknown),
    ):
        value, (grad,) = value_and_grads(fn, z)
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(z))


def test_one_class_present_only() -> None:
    z, _ = batch()
    one = torch.ones(12, dtype=torch.long)
    assert ntl.HSICSuppression(3, normalized=True)(z, one).item() == 0.0
    value, (grad,) = value_and_grads(lambda f: ntl.HSICSuppression(3)(f, one), z)
    assert abs(value.item()) < 1e-12 and grad.abs().max() < 1e-12  # a constant delta kernel: HSIC is 0


def test_each_class_has_only_its_own_options() -> None:
    hsic = set(inspect.signature(ntl.HSICSuppression).parameters)
    cka = set(inspect.signature(ntl.CKASuppression).parameters)
    shared = {"weight", "conditional", "kernel", "sigma", "unbiased", "gather", "ignore_index", "nan_policy"}
    assert hsic == shared | {"num_irrelevant", "normalized"}
    assert cka == shared
    assert inspect.signature(ntl.HSICSuppression).parameters["unbiased"].default is True
    assert inspect.signature(ntl.CKASuppression).parameters["unbiased"].default is False
    for cls in (ntl.HSICSuppression, ntl.CKASuppression):
        kinds = {name: p.kind for name, p in inspect.signature(cls).parameters.items() if name != "num_irrelevant"}
        assert set(kinds.values()) == {inspect.Parameter.KEYWORD_ONLY}
    with pytest.raises(TypeError, match=r"positional"):
        ntl.HSICSuppression(3, 2.0)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'strength'"):
        ntl.HSICSuppression(3, strength=1.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'num_irrelevant'"):
        ntl.CKASuppression(num_irrelevant=3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: ntl.HSICSuppression(0), r"'num_irrelevant' must be the number of irrelevant classes \(an int ≥ 1\)"),
        (lambda: ntl.HSICSuppression(True), r"'num_irrelevant' must be the number of irrelevant classes"),
        (lambda: ntl.HSICSuppression(3, kernel="cosine"), r"'kernel' must be one of 'linear', 'rbf'; got 'cosine'"),
        (lambda: ntl.HSICSuppression(3, sigma=1.0), r"'sigma' is the RBF bandwidth: it needs kernel='rbf'"),
        (lambda: ntl.CKASuppression(kernel="rbf", sigma=-1.0), r"'sigma' must be a positive bandwidth or None"),
        (lambda: ntl.CKASuppression(gather="all"), r"'gather' must be one of 'local', 'global'; got 'all'"),
        (lambda: ntl.CKASuppression(nan_policy="zero"), r"'nan_policy' must be one of 'raise', 'skip', 'propagate'"),
    ],
)
def test_configuration_errors_name_the_option(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_forward_errors_are_clear() -> None:
    z, u, y, r = conditional_batch()
    with pytest.raises(ValueError, match=r"conditional=True needs 'task_labels'"):
        ntl.HSICSuppression(3, conditional=True)(z, u)
    with pytest.raises(ValueError, match=r"conditional=True needs 'task_labels'"):
        ntl.CKASuppression(conditional=True)(z, r)
    # the constructor decides the form: an unconditional module leaves task labels unused
    assert torch.equal(ntl.HSICSuppression(3)(z, u, task_labels=y), ntl.HSICSuppression(3)(z, u))
    assert torch.equal(ntl.CKASuppression()(z, r, task_labels=y), ntl.CKASuppression()(z, r))
    with pytest.raises(ValueError, match=r"'irrelevant_labels' holds 3, outside \[0, 3\) for 3 irrelevant classes"):
        ntl.HSICSuppression(3)(z, u.clamp(0) + 1)
    with pytest.raises(ValueError, match=r"unbiased HSIC needs at least 4 samples in 'features', got a batch of 3"):
        ntl.HSICSuppression(3)(z[:3], u[:3])
    with pytest.raises(ValueError, match=r"'features' and 'irrelevant_features' must have the same batch size"):
        ntl.CKASuppression()(z, r[:10])


def test_nan_policy() -> None:
    z, u, y, r = conditional_batch()
    bad = z.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'features' contain NaN or inf"):
        ntl.HSICSuppression(3)(bad, u)
    with pytest.raises(ValueError, match=r"'irrelevant_features' contain NaN or inf"):
        ntl.CKASuppression()(z, bad)
    for fn in (
        lambda f: ntl.HSICSuppression(3, nan_policy="skip", conditional=True)(f, u, task_labels=y),
        lambda f: ntl.CKASuppression(nan_policy="skip")(f, r),
    ):
        value, (grad,) = value_and_grads(fn, bad)
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(bad))
        torch.testing.assert_close(fn(z), fn(z.clone()))  # finite input: the ordinary value
    assert torch.isnan(ntl.HSICSuppression(3, nan_policy="propagate")(bad, u))
    assert ntl.HSICSuppression(3, nan_policy="skip")(z, u).item() == ntl.HSICSuppression(3)(z, u).item()


def test_gather_global_without_a_process_group_is_the_local_value() -> None:
    z, u, y, r = conditional_batch()
    torch.testing.assert_close(
        ntl.HSICSuppression(3, gather="global", conditional=True)(z, u, task_labels=y),
        ntl.HSICSuppression(3, conditional=True)(z, u, task_labels=y),
        rtol=0.0,
        atol=0.0,
    )
    torch.testing.assert_close(ntl.CKASuppression(gather="global")(z, r), ntl.CKASuppression()(z, r), rtol=0, atol=0)


def test_maps_are_flattened_and_low_precision_is_computed_in_float32() -> None:
    z, u = batch(12, 12)
    loss = ntl.HSICSuppression(3)
    torch.testing.assert_close(loss(z.reshape(12, 3, 2, 2), u), loss(z, u))
    low = loss(z.bfloat16(), u)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, loss(z.bfloat16().float(), u))


def test_extra_repr() -> None:
    assert repr(ntl.HSICSuppression(3)) == (
        "HSICSuppression(num_irrelevant=3, weight=1.0, conditional=False, kernel='linear', normalized=False, "
        "unbiased=True)"
    )
    assert repr(ntl.CKASuppression(kernel="rbf", sigma=0.5, gather="global", nan_policy="skip")) == (
        "CKASuppression(weight=1.0, conditional=False, kernel='rbf', unbiased=False, sigma=0.5, gather='global', "
        "nan_policy='skip')"
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: (ntl.HSICSuppression(3, kernel="rbf", normalized=True, unbiased=False, conditional=True), "u"),
        lambda: (ntl.HSICSuppression(3, nan_policy="skip"), "u"),
        lambda: (ntl.CKASuppression(kernel="rbf", unbiased=True, conditional=True), "r"),
        lambda: (ntl.CKASuppression(nan_policy="skip", conditional=True), "r"),
    ],
    ids=["hsic-rbf-normalized-biased-conditional", "hsic-skip", "cka-rbf-unbiased-conditional", "cka-skip-conditional"],
)
def test_options_away_from_the_defaults_stay_sync_free_in_one_graph(build: Any) -> None:
    """The registry (tests/module_cases.py) holds the defaults; these are the other branches."""
    z, u, y, r = conditional_batch()
    module, second = build()
    other = u if second == "u" else r
    task = {"task_labels": y} if module.conditional else {}
    leaf = z.float().requires_grad_(True)

    def step() -> None:
        module(leaf, other if second == "u" else other.float(), **task).backward()

    step()
    syncs = count_syncs(step)
    assert syncs.total == 0, dict(syncs.counts)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda f: module(f, other, **task))(z)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


# --- the factory -------------------------------------------------------------------------------------


def test_make_suppression_builds_the_class_with_its_options() -> None:
    z, u, _, r = conditional_batch()
    hsic = ntl.make_suppression("hsic", num_irrelevant=3, weight=2.0, kernel="rbf")
    assert type(hsic) is ntl.HSICSuppression
    torch.testing.assert_close(hsic(z, u), ntl.HSICSuppression(3, weight=2.0, kernel="rbf")(z, u), rtol=0, atol=0)
    cka = ntl.make_suppression("cka", unbiased=True)
    assert type(cka) is ntl.CKASuppression
    torch.testing.assert_close(cka(z, r), ntl.CKASuppression(unbiased=True)(z, r), rtol=0, atol=0)
    adversary = ntl.make_suppression("adversarial", num_irrelevant=3, dim=4, strength=0.5)
    assert type(adversary) is ntl.AdversarialSuppression
    assert adversary.strength == 0.5 and adversary.num_irrelevant == 3


def test_make_suppression_names_the_method_and_its_options() -> None:
    with pytest.raises(
        TypeError,
        match=r"make_suppression\('hsic'\) builds HSICSuppression: got an unexpected keyword argument 'strength'; "
        r"its options are num_irrelevant, weight, conditional, kernel, sigma, normalized, unbiased, gather, "
        r"ignore_index, nan_policy",
    ):
        ntl.make_suppression("hsic", num_irrelevant=3, strength=0.3)
    with pytest.raises(TypeError, match=r"make_suppression\('cka'\) builds CKASuppression: .*'num_irrelevant'"):
        ntl.make_suppression("cka", num_irrelevant=3)
    with pytest.raises(
        TypeError, match=r"builds AdversarialSuppression: missing a required argument: 'num_irrelevant'"
    ):
        ntl.make_suppression("adversarial", dim=4)
    with pytest.raises(ValueError, match=r"'method' must be one of 'adversarial', 'hsic', 'cka'; got 'mmd'"):
        ntl.make_suppression("mmd")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match=r"'num_irrelevant' must be the number of irrelevant classes"):
        ntl.make_suppression("hsic", num_irrelevant=0)  # the class's own value check
