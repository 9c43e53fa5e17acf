"""Where users train: torch.compile, autocast (bf16 on CPU) and activation checkpointing."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf

G = torch.Generator().manual_seed(0)
X, Y = torch.randn(8, 6, generator=G), torch.randn(8, 3, generator=G)
S, R = torch.randn(4, 3, 5, 5, generator=G), torch.randn(4, 3, 5, 5, generator=G)
ZA, ZB = torch.randn(8, 4, generator=G), torch.randn(8, 3, generator=G)
REL = torch.rand(4, 3, generator=G)
LA = torch.tensor([0, 1, -100, 3, 2, -100, 1, 0])
LB = torch.rand(8, 3, generator=G).round()

# (name, function of differentiable inputs, inputs): what compiles with fullgraph=True
FULLGRAPH = [
    ("cosine_rows", lambda a, b: ntf.cosine_rows(a, b).sum(), (X, X.flip(0))),
    ("gram_row_cosines", lambda a, b: ntf.gram_row_cosines(a, b).sum(), (S, R)),
    ("hsic linear", lambda a, b: ntf.hsic(a, b), (X, Y)),
    ("hsic rbf", lambda a, b: ntf.hsic(a, b, kernel="rbf"), (X, Y)),
    ("linear_cka", lambda a, b: ntf.linear_cka(a, b), (X, Y)),
    ("cka unbiased", lambda a, b: ntf.cka(a, b, unbiased=True), (X, Y)),
    ("anti_transfer gram", lambda a, b: ntf.anti_transfer(a, b), (S, R)),
    (
        "anti_transfer mean cos skip",
        lambda a, b: ntf.anti_transfer(a, b, aggregation="mean", distance="cos", nan_policy="skip"),
        (S, R),
    ),
    ("distribution_matching", lambda a, b: sum(ntf.distribution_matching(a, b, REL).values()), (ZA, ZB)),
    ("masked losses", lambda a, b: ntf.masked_cross_entropy(a, LA) + ntf.masked_binary_cross_entropy(b, LB), (ZA, ZB)),
]


def value_and_grads(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...]) -> tuple[Tensor, list[Tensor]]:
    leaves = [x.clone().requires_grad_(True) for x in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(3.7 * value, leaves, allow_unused=True)  # the reference side gets none
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "fn", "inputs"), FULLGRAPH, ids=[c[0] for c in FULLGRAPH])
def test_functional_losses_compile_with_fullgraph(
    name: str, fn: Callable[..., Tensor], inputs: tuple[Tensor, ...]
) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    value, grads = value_and_grads(compiled, inputs)
    expected, expected_grads = value_and_grads(fn, inputs)
    torch.testing.assert_close(value, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("conditional", [False, True])
def test_irrelevant_hsic_compiles_with_fullgraph(conditional: bool) -> None:
    # fixed shapes: how many labels are known, and which task classes are eligible, are masks, not branches
    torch._dynamo.reset()
    u = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]) if conditional else None
    fn = lambda z: ntf.irrelevant_hsic(z, u, num_irrelevant=3, unbiased=False, task_labels=y)  # noqa: E731
    value, grads = value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), (X,))
    expected, expected_grads = value_and_grads(fn, (X,))
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grads[0], expected_grads[0])


class Net(nn.Module):
    def __init__(self, checkpointed: bool = False, reentrant: bool = False) -> None:
        super().__init__()
        self.checkpointed, self.reentrant = checkpointed, reentrant
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = checkpoint(self.block, x, use_reentrant=self.reentrant) if self.checkpointed else self.block(x)
        return self.head(h.mean(dim=(2, 3)))


def training_step(model: nn.Module, tap: ntl.FeatureTap, frozen: ntl.FrozenReference, x: Tensor, y: Tensor) -> Tensor:
    at = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", gram_scope="sample")
    loss = nn.functional.cross_entropy(model(x), y) + at(tap.pop(), frozen(x))
    loss.backward()
    return loss.detach()


def batch(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)


@pytest.mark.slow
def test_compiled_model_with_taps_gives_eager_loss_and_gradients() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager, reference = Net(), Net()
    compiled_net = Net()
    compiled_net.load_state_dict(eager.state_dict())
    frozen = ntl.FrozenReference(reference, ["block.0", "block.2"])
    compiled = torch.compile(compiled_net)  # inductor
    x, y = batch(0)
    eager_tap, compiled_tap = (
        ntl.FeatureTap(eager, ["block.0", "block.2"]),
        ntl.FeatureTap(compiled, ["block.0", "block.2"]),
    )
    loss_eager = training_step(eager, eager_tap, frozen, x, y)
    loss_compiled = training_step(compiled, compiled_tap, frozen, x, y)
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    for p, q in zip(compiled_net.parameters(), eager.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_no_recompiles_over_20_steps() -> None:
    torch._dynamo.reset()
    graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]) -> Callable[..., object]:
        graphs.append(len(gm.graph.nodes))
        return gm.forward

    torch.manual_seed(0)
    model, reference = Net(), Net()
    compiled = torch.compile(model, backend=counting_backend)
    tap, frozen = ntl.FeatureTap(compiled, ["block.0", "block.2"]), ntl.FrozenReference(reference, ["block.2"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    at = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", gram_scope="batch", nan_policy="propagate")
    after_first_steps = None
    for step in range(20):
        x, y = batch(step)
        logits = compiled(x)
        feats = tap.pop()
        loss = nn.functional.cross_entropy(logits, y) + at({"block.2": feats["block.2"]}, frozen(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1:
            after_first_steps = len(graphs)
    assert graphs, "the backend never ran"
    assert len(graphs) == after_first_steps, (
        f"recompiled: {len(graphs)} graphs after 20 steps, {after_first_steps} after 2"
    )


# --- autocast ------------------------------------------------------------------------------------

# (name, loss of features (B, C, H, W) and a second tensor, tolerance on |bf16 − fp32|)
AMP_CASES: list[tuple[str, Callable[[Tensor, Tensor], Tensor], float]] = [
    ("anti_transfer gram", lambda s, r: ntl.AntiTransferLoss()(s, r), 0.02),
    ("anti_transfer mean cos", lambda s, r: ntl.AntiTransferLoss(aggregation="mean", distance="cos")(s, r), 0.02),
    ("anti_transfer cka", lambda s, r: ntl.AntiTransferLoss(aggregation="none", distance="cka")(s, r), 0.02),
    ("hsic", lambda s, r: ntl.HSICSuppression(3, normalized=True)(s, LA[:6].clamp(0, 2)), 0.03),
    ("cka", lambda s, r: ntl.CKASuppression()(s, r), 0.02),
    ("adversarial", lambda s, r: _adversarial(s), 0.03),
    ("purify", lambda s, r: ntl.Purify(3, 48, momentum=1.0)(s, LA[:6].clamp(0, 2)).float().square().mean(), 0.03),
    (
        "distribution matching",
        lambda s, r: ntl.MultiTaskLoss(ntl.TaskRelatedness(REL.double()))(*_heads(s), LA[:6], LB[:6]),
        0.05,
    ),
]


def _adversarial(s: Tensor) -> Tensor:
    torch.manual_seed(3)
    return ntl.AdversarialSuppression(3, dim=48)(s, LA[:6].clamp(0, 2))


def _heads(s: Tensor) -> tuple[Tensor, Tensor]:
    torch.manual_seed(4)
    head_a, head_b = nn.Linear(48, 4), nn.Linear(48, 3)
    flat = s.flatten(1)
    return head_a(flat), head_b(flat)


@pytest.mark.parametrize(("name", "loss_fn", "tolerance"), AMP_CASES, ids=[c[0] for c in AMP_CASES])
def test_losses_under_bf16_autocast_match_fp32(
    name: str, loss_fn: Callable[[Tensor, Tensor], Tensor], tolerance: float
) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1)
    x = torch.randn(6, 3, 4, 4)
    reference = torch.randn(6, 3, 4, 4)
    s32 = conv(x)
    expected = loss_fn(s32, reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s16 = conv(x)
        assert s16.dtype == torch.bfloat16
        value = loss_fn(s16, reference)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert abs(value.item() - expected.item()) <= tolerance * max(1.0, abs(expected.item())), (
        value.item(),
        expected.item(),
    )
    value.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


# --- activation checkpointing ---------------------------------------------------------------------


def test_non_reentrant_checkpointing_gives_the_same_gradients_and_leaves_nothing_behind() -> None:
    torch.manual_seed(0)
    plain, reference = Net(), Net()
    checkpointed = Net(checkpointed=True)
    checkpointed.load_state_dict(plain.state_dict())
    frozen = ntl.FrozenReference(reference, ["block.1", "block.3"])
    x, y = batch(1)
    results = []
    for model in (plain, checkpointed):
        tap = ntl.FeatureTap(model, ["block.1", "block.3"], on_repeat="all")
        logits = model(x)
        feats = {name: values[-1] for name, values in tap.pop().items()}
        loss = nn.functional.cross_entropy(logits, y) + ntl.AntiTransferLoss()(feats, frozen(x))
        loss.backward()
        assert not tap.holds_features, "the recomputation in backward was captured"
        tap.remove()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))  # type: ignore[union-attr]
    torch.testing.assert_close(results[1][0], results[0][0])
    for g, e in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(g, e)


def test_reentrant_checkpointing_warns_that_features_carry_no_gradient() -> None:
    model = Net(checkpointed=True, reentrant=True)
    expected = r"layer 'block.1' ran without autograd .* use_reentrant=False"
    with pytest.warns(UserWarning, match=expected), ntl.FeatureTap(model, "block.1") as tap, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad")
        model(batch(0)[0])
    assert not tap.pop()["block.1"].requires_grad
