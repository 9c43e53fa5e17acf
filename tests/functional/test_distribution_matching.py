"""Distribution matching, co-annotation and masked losses against the float64 oracles of METHODS.md §3."""

from __future__ import annotations

import math

import oracles
import pytest
import torch
from helpers import GRAD_SCALE, assert_matches_oracle, value_and_grads

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf

NAN = math.nan


def relatedness(kind: str, k: int = 4, m: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if kind == "multilabel":
        r = torch.rand(k, m, generator=g, dtype=torch.float64)
        r[0] = 0.0  # a neutral class: no attribute active
        r[1, 0] = 0.0
    else:
        r = torch.rand(k, m, generator=g, dtype=torch.float64) + 0.05
        r = r / r.sum(1, keepdim=True)
    prior = torch.rand(k, generator=g, dtype=torch.float64) + 0.2
    return r, prior / prior.sum()


def logits(n: int, k: int, m: int, seed: int = 1, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, k, generator=g, dtype=torch.float64), scale * torch.randn(
        n, m, generator=g, dtype=torch.float64
    )


KINDS = ["multilabel", "multiclass"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("detach", [False, True], ids=["coupled", "detached"])
def test_a_to_b_matches_oracle(kind: str, divergence: str, detach: bool) -> None:
    r, prior = relatedness(kind)
    za, zb = logits(6, 4, 3)
    assert_matches_oracle(
        lambda a, b: ntf.distribution_matching(
            a, b, r, prior=prior, kind=kind, directions=("a_to_b",), divergence=divergence, detach_target=detach
        )["a_to_b"],  # type: ignore[arg-type]
        lambda a, b: oracles.dm_a_to_b(a, b, r, kind, divergence, detach),
        za,
        zb,
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inversion", ["bayes", "product"])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("detach", [False, True], ids=["coupled", "detached"])
def test_b_to_a_matches_oracle(kind: str, inversion: str, divergence: str, detach: bool) -> None:
    r, prior = relatedness(kind)
    za, zb = logits(6, 4, 3, seed=2)
    assert_matches_oracle(
        lambda a, b: ntf.distribution_matching(
            a,
            b,
            r,
            prior=prior,
            kind=kind,  # type: ignore[arg-type]
            directions=("b_to_a",),
            inversion=inversion,  # type: ignore[arg-type]
            divergence=divergence,  # type: ignore[arg-type]
            detach_target=detach,
        )["b_to_a"],
        lambda a, b: oracles.dm_b_to_a(a, b, r, prior, kind, inversion, divergence, detach),
        za,
        zb,
        rtol=1e-8,
        atol=1e-10,
    )


@pytest.mark.parametrize("kind", KINDS)
def test_kl_is_zero_when_the_tasks_agree(kind: str) -> None:
    r, prior = relatedness(kind)
    za, _ = logits(5, 4, 3)
    q_b = torch.softmax(za, 1) @ r
    zb = torch.logit(q_b) if kind == "multilabel" else torch.log(q_b)
    value = ntf.distribution_matching(za, zb, r, prior=prior, kind=kind, directions=("a_to_b",))["a_to_b"]  # type: ignore[arg-type]
    assert abs(value.item()) < 1e-12
    ce = ntf.distribution_matching(za, zb, r, prior=prior, kind=kind, directions=("a_to_b",), divergence="ce")[  # type: ignore[arg-type]
        "a_to_b"
    ]
    assert ce.item() > 0.1  # the cross-entropy form keeps the target's entropy


def test_neutral_class_is_likely_exactly_when_no_attribute_is_active() -> None:
    r, _prior = relatedness("multilabel")
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    off = ntf.infer_a_from_b(torch.full((1, 3), 1e-9, dtype=torch.float64), r, prior=uniform)
    on = ntf.infer_a_from_b(torch.full((1, 3), 1 - 1e-9, dtype=torch.float64), r, prior=uniform)
    assert off.argmax().item() == 0 and on[0, 0].item() < 1e-3
    product = ntf.infer_a_from_b(torch.full((1, 3), 0.5, dtype=torch.float64), r, inversion="product")
    assert product[0, 0].item() == 0.0  # the product form cannot express the neutral class
    torch.testing.assert_close(product.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inversion", ["bayes", "product"])
def test_soft_co_annotation_matches_oracle(kind: str, inversion: str) -> None:
    r, prior = relatedness(kind)
    za, zb = logits(7, 4, 3, seed=3)
    la = torch.tensor([2, -100, 1, -100, 3, -100, 0])
    if kind == "multilabel":
        lb = torch.tensor(
            [[NAN] * 3, [1.0, 0.0, NAN], [NAN] * 3, [0.0, -1.0, 1.0], [1.0, 1.0, 0.0], [NAN] * 3, [NAN] * 3]
        )
    else:
        lb = torch.tensor([-100, 2, -100, 0, 1, -100, -100])

    def ours(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        terms = ntf.soft_co_annotation(a, b, la, lb, r, prior=prior, kind=kind, inversion=inversion)  # type: ignore[arg-type]
        return terms["a"] + 10 * terms["b"]

    def oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss_a, loss_b = oracles.co_annotation(a, b, la, lb, r, prior, kind, inversion)
        return loss_a + 10 * loss_b

    assert_matches_oracle(ours, oracle, za, zb, rtol=1e-8, atol=1e-10)


def test_masked_losses_match_oracle() -> None:
    za, zb = logits(6, 4, 3, seed=4)
    la = torch.tensor([0, -100, 3, 1, -100, 2])
    lb = torch.tensor([[1.0, NAN, 0.0], [NAN] * 3, [0.0, 0.0, 1.0], [-1.0, 1.0, -1.0], [1.0, 1.0, 1.0], [NAN] * 3])
    assert_matches_oracle(lambda a: ntf.masked_cross_entropy(a, la), lambda a: oracles.masked_ce(a, la), za)
    assert_matches_oracle(lambda b: ntf.masked_binary_cross_entropy(b, lb), lambda b: oracles.masked_bce(b, lb), zb)
    mask = ~torch.isnan(lb) & (lb >= 0)
    torch.testing.assert_close(
        ntf.masked_binary_cross_entropy(zb, torch.nan_to_num(lb).clamp_min(0), mask=mask),
        ntf.masked_binary_cross_entropy(zb, lb),
    )


# --- hostile input -----------------------------------------------------------------------------------------


def test_no_labels_for_a_task_gives_zero_loss_and_gradient() -> None:
    r, prior = relatedness("multilabel")
    za, zb = logits(5, 4, 3)
    no_a, no_b = torch.full((5,), -100), torch.full((5, 3), NAN)
    for fn, x in (
        (lambda a: ntf.masked_cross_entropy(a, no_a), za),
        (lambda b: ntf.masked_binary_cross_entropy(b, no_b), zb),
    ):
        value, (grad,) = value_and_grads(fn, x)
        assert value.item() == 0.0 and torch.equal(grad, torch.zeros_like(x))
    value, grads = value_and_grads(
        lambda a, b: sum(ntf.soft_co_annotation(a, b, no_a, no_b, r, prior=prior).values()), za, zb
    )
    assert value.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("inversion", ["bayes", "product"])
def test_extreme_logits_stay_finite(dtype: torch.dtype, kind: str, inversion: str) -> None:
    """Logits of ±1e4 (probabilities of exactly 0 and 1 in float32): the terms, computed from the logits, are
    the float64 oracle's (its logarithms in log-sum-exp form), values of order 1e4, with its gradients."""
    r, prior = relatedness(kind)
    za = torch.tensor([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, 1e4]], dtype=dtype)
    zb = torch.tensor([[1e4, -1e4, 1e4], [-1e4, -1e4, -1e4]], dtype=dtype)
    grad_tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}

    def matches(fn, oracle) -> None:  # type: ignore[no-untyped-def]
        leaves = [za.clone().requires_grad_(True), zb.clone().requires_grad_(True)]  # in their own dtype
        value = fn(*leaves)
        grads = torch.autograd.grad(GRAD_SCALE * value, leaves)
        expected, expected_grads = value_and_grads(oracle, za, zb)  # float64
        assert value.dtype == torch.float32 and expected.abs() > 1.0
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
        for g, e in zip(grads, expected_grads, strict=True):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), e, **grad_tol)

    for divergence in ("kl", "ce"):
        matches(
            lambda a, b, d=divergence: sum(
                ntf.distribution_matching(a, b, r, prior=prior, kind=kind, inversion=inversion, divergence=d).values()  # type: ignore[arg-type]
            ),
            lambda a, b, d=divergence: (
                oracles.dm_a_to_b(a, b, r, kind, d, False)
                + oracles.dm_b_to_a(a, b, r, prior, kind, inversion, d, False)
            ),
        )
    la = torch.tensor([0, -100])
    lb = torch.tensor([[NAN] * 3, [1.0, 0.0, 1.0]]) if kind == "multilabel" else torch.tensor([-100, 2])
    matches(
        lambda a, b: sum(ntf.soft_co_annotation(a, b, la, lb, r, prior=prior, kind=kind, inversion=inversion).values()),  # type: ignore[arg-type]
        lambda a, b: sum(oracles.co_annotation(a, b, la, lb, r, prior, kind, inversion)),
    )


@pytest.mark.parametrize(("k", "m"), [(1, 3), (4, 1), (1, 1)])
@pytest.mark.parametrize("kind", KINDS)
def test_one_class_or_one_attribute(k: int, m: int, kind: str) -> None:
    """One class of A or one attribute/class of B: both terms are the float64 oracle's, values and gradients
    (with one class of A, `p_A = 1` whatever the logits: its gradient is zero)."""
    if kind == "multiclass" and m == 1:
        r = torch.ones(k, 1, dtype=torch.float64)
    else:
        r, _ = relatedness(kind, k + 1, m)
        r = r[1:] if kind == "multilabel" else r[:k]
    prior = torch.full((k,), 1.0 / k, dtype=torch.float64)
    za, zb = logits(4, k, m)
    for inversion in ("bayes", "product"):
        if inversion == "product" and not bool((r > 0).any()):
            continue
        assert_matches_oracle(
            lambda a, b, inv=inversion: sum(
                ntf.distribution_matching(a, b, r, prior=prior, kind=kind, inversion=inv).values()  # type: ignore[arg-type]
            ),
            lambda a, b, inv=inversion: (
                oracles.dm_a_to_b(a, b, r, kind, "kl", False)
                + oracles.dm_b_to_a(a, b, r, prior, kind, inv, "kl", False)
            ),
            za,
            zb,
        )
        if k == 1:
            _, (grad_a, _) = value_and_grads(
                lambda a, b, inv=inversion: sum(
                    ntf.distribution_matching(a, b, r, prior=prior, kind=kind, inversion=inv).values()  # type: ignore[arg-type]
                ),
                za,
                zb,
            )
            assert torch.equal(grad_a, torch.zeros_like(grad_a))


def test_shape_and_option_errors() -> None:
    r, prior = relatedness("multilabel")
    za, zb = logits(5, 4, 3)
    with pytest.raises(
        ValueError, match=r"'logits_a' must be \(N, 4\) for a relatedness matrix of shape \(4, 3\), got \(5, 3\)"
    ):
        ntf.distribution_matching(zb, zb, r, prior=prior)
    with pytest.raises(ValueError, match=r"'logits_b' must be \(N, 3\)"):
        ntf.distribution_matching(za, za, r, prior=prior)
    with pytest.raises(ValueError, match=r"same batch size"):
        ntf.distribution_matching(za, zb[:4], r, prior=prior)
    with pytest.raises(ValueError, match=r"'divergence' must be one of 'kl', 'ce'"):
        ntf.distribution_matching(za, zb, r, prior=prior, divergence="js")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'labels' holds 4, outside \[0, 4\)"):
        ntf.masked_cross_entropy(za, torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match=r"annotated entries of 'targets' must lie in \[0, 1\]"):
        ntf.masked_binary_cross_entropy(zb, torch.full((5, 3), 2.0))
    with pytest.raises(ValueError, match=r"'labels_b' must have shape \(5, 3\)"):
        ntf.soft_co_annotation(za, zb, torch.zeros(5, dtype=torch.long), torch.zeros(5, 2), r, prior=prior)


# --- one calling convention: tensors positional, options keyword-only ------------------------------------

PUBLIC = [
    ntf.distribution_matching,
    ntf.soft_co_annotation,
    ntf.infer_a_from_b,
    ntf.infer_b_from_a,
    ntf.masked_cross_entropy,
    ntf.masked_binary_cross_entropy,
]


@pytest.mark.parametrize("function", PUBLIC, ids=lambda f: f.__name__)
def test_tensors_are_positional_and_options_keyword_only(function: object) -> None:
    import inspect

    for name, parameter in inspect.signature(function).parameters.items():  # type: ignore[arg-type]
        positional = parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert positional == (parameter.default is inspect.Parameter.empty), f"{name} of {function}"
        assert name not in ("matrix",), "R is 'relatedness' everywhere"
    docstring = function.__doc__ or ""
    assert all(section in docstring for section in ("Args:", "Returns:", "Raises:")), function


def test_options_passed_by_position_are_refused() -> None:
    r, prior = relatedness("multilabel")
    za, zb = logits(3, 4, 3)
    with pytest.raises(TypeError, match=r"positional argument"):
        ntf.distribution_matching(za, zb, r, prior)  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"positional argument"):
        ntf.masked_cross_entropy(za, torch.zeros(3, dtype=torch.long), -1)  # type: ignore[misc]


def test_errors_name_the_arguments_of_the_function_raising_them() -> None:
    r, prior = relatedness("multilabel")
    za, zb = logits(5, 4, 3)
    with pytest.raises(ValueError, match=r"'relatedness' must be a \(K, M\) matrix with K, M ≥ 1, got shape \(12,\)"):
        ntf.distribution_matching(za, zb, r.reshape(-1))
    with pytest.raises(TypeError, match=r"for a TaskRelatedness r pass r.matrix, prior=r.prior, kind=r.kind"):
        ntf.distribution_matching(za, zb, ntl.TaskRelatedness(r))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'prior' must have shape \(4,\) to match the rows of 'relatedness'"):
        ntf.distribution_matching(za, zb, r, prior=prior[:3])
    with pytest.raises(ValueError, match=r"'directions' is empty"):
        ntf.distribution_matching(za, zb, r, directions=())
    with pytest.raises(TypeError, match=r"'directions' must be a sequence of directions, e.g. \('a_to_b',\)"):
        ntf.distribution_matching(za, zb, r, directions="a_to_b")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'eps' must lie in \(0, 0.5\)"):
        ntf.soft_co_annotation(za, zb, torch.zeros(5, dtype=torch.long), torch.zeros(5, 3), r, eps=0.0)
    with pytest.raises(ValueError, match=r"'probs_b' must be \(N, 3\) for 'relatedness' of shape \(4, 3\)"):
        ntf.infer_a_from_b(torch.rand(5, 4), r)
    with pytest.raises(ValueError, match=r"'probs_a' must be \(N, 4\)"):
        ntf.infer_b_from_a(torch.rand(5, 3), r)
    with pytest.raises(ValueError, match=r"'labels_b' holds 3, outside \[0, 3\) for 3 classes of task B"):
        rows = r + 0.1
        ntf.soft_co_annotation(
            za,
            zb,
            torch.zeros(5, dtype=torch.long),
            torch.tensor([0, 1, 2, 3, -100]),
            rows / rows.sum(1, keepdim=True),
            kind="multiclass",
        )


def test_default_prior_is_uniform_and_directions_are_deduplicated() -> None:
    r, _ = relatedness("multilabel")
    za, zb = logits(4, 4, 3)
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    default = ntf.distribution_matching(za, zb, r, directions=("b_to_a", "b_to_a"))
    given = ntf.distribution_matching(za, zb, r, prior=uniform, directions=("b_to_a",))
    assert list(default) == ["b_to_a"]
    torch.testing.assert_close(default["b_to_a"], given["b_to_a"], rtol=0, atol=0)
    assert default["b_to_a"].item() == pytest.approx(
        oracles.dm_b_to_a(za, zb, r, uniform, "multilabel", "bayes", "kl", False).item(), rel=1e-9
    )
