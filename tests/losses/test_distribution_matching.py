"""Distribution-matching modules: buffers, weights, terms, and the composed multi-task loss."""

from __future__ import annotations

import math

import oracles
import pytest
import torch
from helpers import assert_matches_oracle

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf

R = ntl.TaskRelatedness([[0.0, 0.0], [0.9, 0.2], [0.1, 0.8]], prior=[0.2, 0.3, 0.5])


def heads(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, requires_grad=True), torch.randn(n, 2, generator=g, requires_grad=True)


def test_distribution_matching_loss_is_weighted_sum_of_directions() -> None:
    za, zb = heads()
    loss = ntl.DistributionMatchingLoss(R, weight=0.5, divergence="ce", inversion="product")
    terms = ntf.distribution_matching(za, zb, R.matrix, prior=R.prior, inversion="product", divergence="ce")
    torch.testing.assert_close(loss(za, zb), 0.5 * (terms["a_to_b"] + terms["b_to_a"]).float())
    assert set(loss.last_terms) == {"loss", "a_to_b/loss", "a_to_b/value", "b_to_a/loss", "b_to_a/value"}
    torch.testing.assert_close(loss.last_terms["a_to_b/value"], terms["a_to_b"].detach().float())
    torch.testing.assert_close(loss.last_terms["a_to_b/loss"], 0.5 * terms["a_to_b"].detach().float())
    one_way = ntl.DistributionMatchingLoss(R, directions=["a_to_b"])
    one_way(za, zb)
    assert set(one_way.last_terms) == {"loss", "a_to_b/loss", "a_to_b/value"}


def test_relatedness_lives_in_buffers() -> None:
    loss = ntl.DistributionMatchingLoss(R)
    state = loss.state_dict()
    assert set(state) == {"matrix", "prior"}
    other = ntl.DistributionMatchingLoss(ntl.TaskRelatedness([[0.5, 0.5]] * 3))
    other.load_state_dict(state)
    torch.testing.assert_close(other.matrix, R.matrix.float())
    assert loss.to(torch.float64).matrix.dtype == torch.float64


def test_gradients_reach_both_heads_unless_detached() -> None:
    za, zb = heads()
    ntl.DistributionMatchingLoss(R, directions=["a_to_b"])(za, zb).backward()
    assert za.grad is not None and za.grad.abs().sum() > 0
    za2, zb2 = heads()
    ntl.DistributionMatchingLoss(R, directions=["a_to_b"], detach_target=True)(za2, zb2).backward()
    assert za2.grad is None or za2.grad.abs().sum() == 0


def test_multitask_loss_composes_the_terms() -> None:
    za, zb = heads()
    la = torch.tensor([0, -100, 2, 1, -100, -100])
    lb = torch.tensor([[math.nan] * 2, [1.0, 0.0], [math.nan, 1.0], [0.0, 1.0], [math.nan] * 2, [1.0, 1.0]])
    full = ntl.MultiTaskLoss(R, weight=2.0, matching_weight=0.3, co_annotation_weight=0.7, supervised_b_weight=1.5)
    total = full(za, zb, la, lb)
    t = full.last_terms
    # independent of last_terms: the functional pieces, weighted by hand
    matching = ntf.distribution_matching(za, zb, R.matrix, prior=R.prior)
    co = ntf.soft_co_annotation(za, zb, la, lb, R.matrix, prior=R.prior)
    expected = 2.0 * (
        ntf.masked_cross_entropy(za, la)
        + 1.5 * ntf.masked_binary_cross_entropy(zb, lb)
        + 0.3 * (matching["a_to_b"] + matching["b_to_a"])
        + 0.7 * (co["a"] + co["b"])
    )
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(t["loss"], total.detach())
    torch.testing.assert_close(t["matching/value"], (matching["a_to_b"] + matching["b_to_a"]).detach())
    torch.testing.assert_close(t["matching/loss"], 2.0 * 0.3 * t["matching/value"])
    torch.testing.assert_close(t["matching/b_to_a/loss"], 2.0 * 0.3 * matching["b_to_a"].detach())
    torch.testing.assert_close(t["co_annotation/a/value"], co["a"].detach())
    torch.testing.assert_close(t["supervised_b/loss"], 2.0 * 1.5 * t["supervised_b/value"])
    plain = ntl.MultiTaskLoss(R, matching_weight=0.0, co_annotation_weight=0.0)
    plain(za, zb, la, lb)
    assert set(plain.last_terms) == {
        "loss",
        "supervised_a/loss",
        "supervised_a/value",
        "supervised_b/loss",
        "supervised_b/value",
    }
    torch.testing.assert_close(plain.last_terms["supervised_b/value"], ntf.masked_binary_cross_entropy(zb, lb).detach())


def _assert_parts_add_up(terms: dict[str, torch.Tensor], prefix: str = "") -> int:
    """Each level's `"{part}/loss"` add up to their parent's `"loss"`; returns how many sums were checked."""
    parent = terms[f"{prefix}loss"]
    parts = {
        key[len(prefix) :].split("/")[0]
        for key in terms
        if key.startswith(prefix) and key.count("/") == prefix.count("/") + 1 and key.endswith("/loss")
    }
    if not parts:
        return 0
    total = sum(terms[f"{prefix}{part}/loss"] for part in parts)
    torch.testing.assert_close(total, parent, msg=lambda m: f"parts of {prefix or 'the loss'}: {m}")
    return 1 + sum(_assert_parts_add_up(terms, f"{prefix}{part}/") for part in parts)


def _labelled(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    la = torch.tensor([0, -100, 2, 1, -100, -100])
    if kind == "multiclass":
        return la, torch.tensor([-100, 1, 0, 1, -100, 0])
    return la, torch.tensor([[math.nan] * 2, [1.0, 0.0], [math.nan, 1.0], [0.0, 1.0], [math.nan] * 2, [1.0, 1.0]])


@pytest.mark.parametrize("kind", ["multilabel", "multiclass"])
def test_last_terms_parts_add_up_to_the_loss_at_non_default_weights(kind: str) -> None:
    r = R if kind == "multilabel" else ntl.TaskRelatedness([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], kind="multiclass")
    za, zb = heads()
    la, lb = _labelled(kind)
    calls = [
        (ntl.DistributionMatchingLoss(r, weight=0.37), (za, zb), 1),
        (ntl.SoftCoAnnotationLoss(r, weight=2.5), (za, zb, la, lb), 1),
        (
            ntl.MultiTaskLoss(
                r,
                weight=1.7,
                matching_weight=0.3,
                co_annotation_weight=0.6,
                supervised_a_weight=0.8,
                supervised_b_weight=1.9,
            ),
            (za, zb, la, lb),
            3,  # the total, the matching terms, the co-annotation terms
        ),
    ]
    for module, args, levels in calls:
        out = module(*args)
        terms = module.last_terms
        torch.testing.assert_close(terms["loss"], out.detach())
        assert _assert_parts_add_up(terms) == levels, type(module).__name__
        for key in terms:
            if key.endswith("/value"):  # every unweighted value sits beside its weighted part
                assert f"{key[: -len('value')]}loss" in terms, key
        assert all(not value.requires_grad and value.dim() == 0 for value in terms.values())
    mt = calls[2][0].last_terms
    torch.testing.assert_close(mt["matching/loss"], 1.7 * 0.3 * mt["matching/value"])
    torch.testing.assert_close(mt["co_annotation/loss"], 1.7 * 0.6 * mt["co_annotation/value"])
    torch.testing.assert_close(mt["supervised_a/loss"], 1.7 * 0.8 * mt["supervised_a/value"])


def test_multiclass_task_b() -> None:
    """`MultiTaskLoss` with a multiclass task B at its defaults (every weight 1, KL, Bayes inversion): the sum of
    the float64 oracles' terms (both cross-entropies, both matching directions, both co-annotation terms), in
    value and gradients."""
    r = ntl.TaskRelatedness([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], kind="multiclass")
    la, lb = torch.tensor([0, 1, -100, -100, 2, 0]), torch.tensor([-100, 1, 0, -100, 1, 1])
    module = ntl.MultiTaskLoss(r).double()
    matrix, prior = module.matrix, module.prior  # R and π as the module holds them (float32 buffers, widened)

    def oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (
            oracles.masked_ce(a, la)
            + oracles.masked_ce(b, lb)
            + oracles.dm_a_to_b(a, b, matrix, "multiclass", "kl", False)
            + oracles.dm_b_to_a(a, b, matrix, prior, "multiclass", "bayes", "kl", False)
            + sum(oracles.co_annotation(a, b, la, lb, matrix, prior, "multiclass", "bayes"))
        )

    assert_matches_oracle(lambda a, b: module(a, b, la, lb), oracle, *heads())


def test_configuration_errors() -> None:
    with pytest.raises(TypeError, match=r"'relatedness' must be a TaskRelatedness"):
        ntl.DistributionMatchingLoss(torch.ones(3, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'directions' is empty"):
        ntl.DistributionMatchingLoss(R, directions=[])
    with pytest.raises(ValueError, match=r"'directions' must be one of 'a_to_b', 'b_to_a'"):
        ntl.DistributionMatchingLoss(R, directions=["a_to_c"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"inversion='product' needs at least one class"):
        ntl.DistributionMatchingLoss(ntl.TaskRelatedness([[0.0, 0.0]]), inversion="product")
    for module in (ntl.SoftCoAnnotationLoss, ntl.MultiTaskLoss):
        with pytest.raises(TypeError, match=r"'relatedness' must be a TaskRelatedness"):
            module(R.matrix)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"'inversion' must be one of 'bayes', 'product'"):
            module(R, inversion="naive")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'eps' must lie in \(0, 0.5\)"):
        ntl.MultiTaskLoss(R, eps=1.0)


MODULES = [ntl.DistributionMatchingLoss, ntl.SoftCoAnnotationLoss, ntl.MultiTaskLoss]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_one_calling_convention(module: type[torch.nn.Module]) -> None:
    import inspect

    parameters = list(inspect.signature(module).parameters.values())
    assert [p.name for p in parameters if p.kind is not inspect.Parameter.KEYWORD_ONLY] == ["relatedness"]
    keyword_only = {p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert {"weight", "inversion", "eps", "nan_policy"} <= keyword_only
    forward = inspect.signature(module.forward).parameters.values()
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in forward)
    assert all(section in (module.__doc__ or "") for section in ("Args:", "Raises:"))
    assert all(section in (module.forward.__doc__ or "") for section in ("Args:", "Returns:", "Raises:"))
    # a matching module accepts every option of the functional twin that its TaskRelatedness does not hold
    twin = set(inspect.signature(ntf.distribution_matching).parameters) - {"logits_a", "logits_b", "relatedness"}
    if module is not ntl.SoftCoAnnotationLoss:
        assert twin - {"prior", "kind"} <= keyword_only


def test_errors_name_the_arguments_of_forward() -> None:
    za, zb = heads()
    la, lb = _labelled("multilabel")
    loss = ntl.MultiTaskLoss(R)
    with pytest.raises(ValueError, match=r"'labels_a' holds 3, outside \[0, 3\) for 3 classes of task A"):
        loss(za, zb, torch.tensor([0, 3, 1, 1, -100, 2]), lb)
    with pytest.raises(ValueError, match=r"annotated entries of 'labels_b' must lie in \[0, 1\]"):
        loss(za, zb, la, torch.full((6, 2), 2.0))
    with pytest.raises(ValueError, match=r"'labels_a' must have shape \(6,\)"):
        loss(za, zb, la[:5], lb)
    with pytest.raises(ValueError, match=r"'logits_b' must be \(N, 2\) for a relatedness matrix of shape \(3, 2\)"):
        ntl.DistributionMatchingLoss(R)(za, za)
    multiclass = ntl.TaskRelatedness([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], kind="multiclass")
    with pytest.raises(ValueError, match=r"'labels_b' holds 2, outside \[0, 2\) for 2 classes of task B"):
        ntl.MultiTaskLoss(multiclass)(za, zb, la, torch.tensor([0, 2, 1, -100, 0, 1]))


@pytest.mark.parametrize(
    "options",
    [{}, {"inversion": "product", "divergence": "ce", "detach_target": True}, {"directions": ["b_to_a"]}],
    ids=["defaults", "product-ce-detached", "one-direction"],
)
@pytest.mark.parametrize("kind", ["multilabel", "multiclass"])
def test_a_training_step_makes_no_host_sync(options: dict[str, object], kind: str) -> None:
    from helpers import count_syncs

    r = R if kind == "multilabel" else ntl.TaskRelatedness([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], kind="multiclass")
    la, lb = _labelled(kind)
    matching = {k: v for k, v in options.items()}
    calls = [
        (ntl.DistributionMatchingLoss(r, **matching), False),  # type: ignore[arg-type]
        (ntl.SoftCoAnnotationLoss(r, **{k: v for k, v in options.items() if k == "inversion"}), True),  # type: ignore[arg-type]
        (ntl.MultiTaskLoss(r, **matching), True),  # type: ignore[arg-type]
    ]
    for module, takes_labels in calls:
        za, zb = heads()

        def step(module: torch.nn.Module = module, takes_labels: bool = takes_labels) -> None:
            args = (za, zb, la, lb) if takes_labels else (za, zb)
            (3.0 * module(*args)).backward()

        step()  # warm-up
        counter = count_syncs(step)
        assert counter.total == 0, f"{type(module).__name__}: {dict(counter.counts)}"


@pytest.mark.parametrize("kind", ["multilabel", "multiclass"])
def test_multitask_terms_are_differentiable_parts_that_add_up_to_the_loss(kind: str) -> None:
    r = R if kind == "multilabel" else ntl.TaskRelatedness([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]], kind="multiclass")
    la, lb = _labelled(kind)
    module = ntl.MultiTaskLoss(r, weight=1.7, matching_weight=0.3, co_annotation_weight=0.6, supervised_b_weight=1.9)
    za, zb = heads()
    total = module(za, zb, la, lb)
    logged = dict(module.last_terms)
    parts = module.terms(za, zb, la, lb)
    assert list(parts) == ["supervised_a", "supervised_b", "matching", "co_annotation"]
    assert module.last_terms == logged  # terms() does not log
    assert torch.equal(sum(parts.values(), torch.zeros(())), total)
    for name, part in parts.items():
        assert torch.equal(part.detach(), logged[f"{name}/loss"]), name
    # each part carries its own gradient: the sum of the parts' gradients is the loss's
    grads = [torch.autograd.grad(part, (za, zb), retain_graph=True, allow_unused=True) for part in parts.values()]
    expected = torch.autograd.grad(total, (za, zb))
    for i, tensor in enumerate(expected):
        summed = sum((g[i] for g in grads if g[i] is not None), torch.zeros_like(tensor))
        torch.testing.assert_close(summed, tensor, rtol=1e-6, atol=1e-7)
    assert list(ntl.MultiTaskLoss(r, matching_weight=0.0).terms(za, zb, la, lb)) == [
        "supervised_a",
        "supervised_b",
        "co_annotation",
    ]


def test_functional_multi_task_terms_are_the_functions_they_are_made_of() -> None:
    za, zb = heads()
    la, lb = _labelled("multilabel")
    r, pi = R.matrix.double(), R.prior.double()
    za, zb = za.detach().double(), zb.detach().double()
    terms = ntf.multi_task_terms(za, zb, la, lb, r, prior=pi, divergence="ce")
    assert list(terms) == [
        "supervised_a",
        "supervised_b",
        "matching/a_to_b",
        "matching/b_to_a",
        "co_annotation/a",
        "co_annotation/b",
    ]
    matching = ntf.distribution_matching(za, zb, r, prior=pi, divergence="ce")
    co_annotation = ntf.soft_co_annotation(za, zb, la, lb, r, prior=pi)
    expected = {
        "supervised_a": ntf.masked_cross_entropy(za, la),
        "supervised_b": ntf.masked_binary_cross_entropy(zb, lb),
        **{f"matching/{k}": v for k, v in matching.items()},
        **{f"co_annotation/{k}": v for k, v in co_annotation.items()},
    }
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-12, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")
    only = ntf.multi_task_terms(za, zb, la, lb, r, parts=("supervised_b",))
    assert list(only) == ["supervised_b"]
    ops_terms = ntl.ops.multi_task_terms(za, zb, la, lb, r, prior=pi, divergence="ce", backend="torch")
    assert all(torch.equal(ops_terms[k], terms[k]) for k in terms)
    with pytest.raises(ValueError, match=r"'parts'"):
        ntf.multi_task_terms(za, zb, la, lb, r, parts=("supervised_c",))
    with pytest.raises(TypeError, match=r"'parts' must be a sequence of part names"):
        ntf.multi_task_terms(za, zb, la, lb, r, parts="matching")
