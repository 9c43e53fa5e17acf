"""Every loss module of the package at its defaults, in one registry: the sync, compile and terms tests run them all.

A case is a factory returning a `Case`: the module (at its defaults, plus what it needs to exist: sizes, a
relatedness matrix), a small trainable `Network` that produces the inputs that carry a gradient, and a
`forward(module, network)` that runs one training forward on fixed inputs (B = 16, fixed seeds) and returns
the scalar to minimize. Everything that is not trained (labels, a frozen network's features) is built once
in the factory and captured by `forward`. Calling a factory twice gives two identical cases.

Adding a module is a few lines (`tests/test_syncs.py`, `tests/test_module_compile.py` and
`tests/test_terms.py` pick it up):

```python
@case("HSICSuppression, conditional")
def _hsic_conditional() -> Case:
    u, y = labels(3, seed=5), labels(4, seed=6)
    return Case(
        ntl.HSICSuppression(num_irrelevant=3),
        Network(features=(B, 8)),
        lambda module, net: module(net["features"](), u, task_labels=y),
    )
```

`weighted_case(name)` registers a case with options away from their defaults (weights other than 1), for
`tests/test_terms.py` only: at weight 1 a weighted and an unweighted term cannot be told apart.

`Network(name=shape, ...)` holds one tiny trainable producer per name (a linear layer of fixed random
inputs, reshaped to `shape`); `labels(num_classes, seed=...)` gives `(B,)` class indices with a few unknown
(`-100`); `frozen(*shape, seed=...)` gives a fixed tensor (a frozen network's features). For a transform
rather than a loss (`Purify`), `forward` returns a scalar of its output (e.g. `out.square().mean()`); a
module without `last_terms` is left out of the terms test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

import negtransfer_losses as ntl

B = 16
IGNORE = -100


class Features(nn.Module):
    """A tiny trainable network: fixed random inputs `(batch, 8)` through a linear layer, reshaped to `shape`."""

    x: Tensor

    def __init__(self, shape: tuple[int, ...], seed: int, in_features: int = 8) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.shape = shape
        self.register_buffer("x", torch.randn(shape[0], in_features, generator=generator))
        self.linear = nn.Linear(in_features, math.prod(shape[1:]))
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=generator) / in_features**0.5)
            self.linear.bias.copy_(0.1 * torch.randn(self.linear.bias.shape, generator=generator))

    def forward(self) -> Tensor:
        return self.linear(self.x).reshape(self.shape)


class Network(nn.ModuleDict):
    """One `Features` producer per keyword: `Network(student=(B, 4, 3, 3))["student"]()`."""

    def __init__(self, seed: int = 0, **shapes: tuple[int, ...]) -> None:
        super().__init__({name: Features(shape, seed + i) for i, (name, shape) in enumerate(shapes.items())})


def labels(num_classes: int, *, seed: int, unknown: int = 2, batch: int = B) -> Tensor:
    """`(batch,)` class indices in `[0, num_classes)` with `unknown` of them set to `-100`, every class present."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.arange(batch) % num_classes
    values = values[torch.randperm(batch, generator=generator)]
    values[torch.randperm(batch, generator=generator)[:unknown]] = IGNORE
    return values


def multilabel(num_attributes: int, *, seed: int, batch: int = B) -> Tensor:
    """`(batch, num_attributes)` float targets in {0, 1} with about a quarter unknown (`-1`), a few rows all unknown."""
    generator = torch.Generator().manual_seed(seed)
    values = (torch.rand(batch, num_attributes, generator=generator) < 0.4).float()
    values[torch.rand(batch, num_attributes, generator=generator) < 0.25] = -1.0
    values[:2] = -1.0  # samples with no task-B annotation at all
    return values


def frozen(*shape: int, seed: int) -> Tensor:
    """A fixed tensor: a frozen network's features (no gradient)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """A module at its defaults, the trainable network that feeds it, and one training forward."""

    module: nn.Module
    network: Network
    forward: Callable[[nn.Module, Network], Tensor]
    output_is_loss: bool = True  # False for a transform (Purify): `forward` returns a scalar of its output

    def step(self) -> Tensor:
        """One training forward: the scalar to minimize."""
        return self.forward(self.module, self.network)

    def parameters(self) -> list[nn.Parameter]:
        """What an optimizer trains: the network's and the module's own parameters (an adversary's head)."""
        return [*self.network.parameters(), *self.module.parameters()]


CASES: dict[str, Callable[[], Case]] = {}
WEIGHTED_CASES: dict[str, Callable[[], Case]] = {}


def case(name: str) -> Callable[[Callable[[], Case]], Callable[[], Case]]:
    """Register a case factory (a module at its defaults) under `name`, the tests' parameter id."""
    return _register(CASES, name)


def weighted_case(name: str) -> Callable[[Callable[[], Case]], Callable[[], Case]]:
    """Register a case whose weights are not 1, for the terms test (which runs `CASES` too)."""
    return _register(WEIGHTED_CASES, name)


def _register(registry: dict[str, Callable[[], Case]], name: str) -> Callable[[Callable[[], Case]], Callable[[], Case]]:
    def register(factory: Callable[[], Case]) -> Callable[[], Case]:
        if name in CASES or name in WEIGHTED_CASES:
            raise ValueError(f"case {name!r} is registered twice")
        registry[name] = factory
        return factory

    return register


# Anti-transfer: two layers, the reference network's features fixed.


def _anti_transfer(module: ntl.AntiTransferLoss) -> Case:
    reference = {"layer2": frozen(B, 4, 3, 3, seed=10), "layer3": frozen(B, 6, 2, 2, seed=11)}
    return Case(
        module,
        Network(layer2=(B, 4, 3, 3), layer3=(B, 6, 2, 2)),
        lambda loss, net: loss({name: net[name]() for name in reference}, reference),
    )


@case("AntiTransferLoss")
def _anti_transfer_gram() -> Case:
    return _anti_transfer(ntl.AntiTransferLoss())  # gram, cos_squared, batch scope


@case("AntiTransferLoss, mean")
def _anti_transfer_mean() -> Case:
    return _anti_transfer(ntl.AntiTransferLoss(aggregation="mean"))


@weighted_case("AntiTransferLoss, weighted layers")
def _anti_transfer_weighted() -> Case:
    return _anti_transfer(ntl.AntiTransferLoss(weight=0.5, layer_weights={"layer2": 3.0}))


# Distribution matching: K = 3 classes of task A, M = 4 attributes of task B, partially labelled.

RELATEDNESS = [[0.0, 0.0, 0.0, 0.0], [0.9, 0.2, 0.1, 0.6], [0.1, 0.8, 0.7, 0.3]]


def _two_heads() -> Network:
    return Network(logits_a=(B, 3), logits_b=(B, 4))


@case("DistributionMatchingLoss")
def _distribution_matching() -> Case:
    return Case(
        ntl.DistributionMatchingLoss(ntl.TaskRelatedness(RELATEDNESS)),
        _two_heads(),
        lambda loss, net: loss(net["logits_a"](), net["logits_b"]()),
    )


@weighted_case("DistributionMatchingLoss, weight 0.7")
def _distribution_matching_weighted() -> Case:
    return Case(
        ntl.DistributionMatchingLoss(ntl.TaskRelatedness(RELATEDNESS), weight=0.7),
        _two_heads(),
        lambda loss, net: loss(net["logits_a"](), net["logits_b"]()),
    )


@case("SoftCoAnnotationLoss")
def _soft_co_annotation() -> Case:
    labels_a, labels_b = labels(3, seed=20), multilabel(4, seed=21)
    return Case(
        ntl.SoftCoAnnotationLoss(ntl.TaskRelatedness(RELATEDNESS)),
        _two_heads(),
        lambda loss, net: loss(net["logits_a"](), net["logits_b"](), labels_a, labels_b),
    )


@case("MultiTaskLoss")
def _multi_task() -> Case:
    labels_a, labels_b = labels(3, seed=20), multilabel(4, seed=21)
    return Case(
        ntl.MultiTaskLoss(ntl.TaskRelatedness(RELATEDNESS)),
        _two_heads(),
        lambda loss, net: loss(net["logits_a"](), net["logits_b"](), labels_a, labels_b),
    )


@case("MultiTaskLoss, B→A gated")
def _multi_task_gated() -> Case:
    labels_a, labels_b = labels(3, seed=20, unknown=6), multilabel(4, seed=21)  # task B labels more samples
    return Case(
        ntl.MultiTaskLoss(ntl.TaskRelatedness(RELATEDNESS), co_annotation_weight=0.0, b_to_a_gate="label_advantage"),
        _two_heads(),
        lambda loss, net: loss(net["logits_a"](), net["logits_b"](), labels_a, labels_b),
    )


@case("MultiTaskLoss, multiclass task B")
def _multi_task_multiclass() -> Case:
    relatedness = ntl.TaskRelatedness(
        [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]], kind="multiclass"
    )
    labels_a, labels_b = labels(3, seed=22), labels(4, seed=23, unknown=5)
    return Case(
        ntl.MultiTaskLoss(relatedness),
        _two_heads(),
        lambda loss, net: loss(net["logits_a"](), net["logits_b"](), labels_a, labels_b),
    )


@weighted_case("MultiTaskLoss, every weight set")
def _multi_task_weighted() -> Case:
    labels_a, labels_b = labels(3, seed=20), multilabel(4, seed=21)
    module = ntl.MultiTaskLoss(
        ntl.TaskRelatedness(RELATEDNESS),
        weight=0.5,
        matching_weight=0.6,
        co_annotation_weight=0.3,
        supervised_a_weight=2.0,
        supervised_b_weight=0.8,
    )
    return Case(module, _two_heads(), lambda loss, net: loss(net["logits_a"](), net["logits_b"](), labels_a, labels_b))


# Purify: a transform; the scalar is a function of its output. Warm-up calls make it ready (every class seen).


@case("Purify")
def _purify() -> Case:
    u = labels(3, seed=30)
    return Case(
        ntl.Purify(3, dim=8),
        Network(features=(B, 8)),
        lambda purify, net: purify(net["features"](), u).square().mean(),
        output_is_loss=False,
    )


@case("Purify, conditional")
def _purify_conditional() -> Case:
    u, y = labels(3, seed=31), labels(2, seed=32)
    return Case(
        ntl.Purify(3, dim=8, conditional=True),
        Network(features=(B, 8)),
        lambda purify, net: purify(net["features"](), u, task_labels=y).square().mean(),
        output_is_loss=False,
    )


# HSIC and CKA suppression: irrelevant labels u (3 classes), task labels y (2 classes), a frozen network's features.


@case("HSICSuppression")
def _hsic() -> Case:
    u = labels(3, seed=40)
    return Case(ntl.HSICSuppression(3), Network(features=(B, 8)), lambda loss, net: loss(net["features"](), u))


@case("HSICSuppression, conditional")
def _hsic_conditional() -> Case:
    u, y = labels(3, seed=41), labels(2, seed=42)
    return Case(
        ntl.HSICSuppression(3, conditional=True),
        Network(features=(B, 8)),
        lambda loss, net: loss(net["features"](), u, task_labels=y),
    )


@case("CKASuppression")
def _cka() -> Case:
    reference = frozen(B, 6, seed=43)
    return Case(ntl.CKASuppression(), Network(features=(B, 8)), lambda loss, net: loss(net["features"](), reference))


@case("CKASuppression, conditional")
def _cka_conditional() -> Case:
    reference, y = frozen(B, 6, seed=44), labels(2, seed=45)
    return Case(
        ntl.CKASuppression(conditional=True),
        Network(features=(B, 8)),
        lambda loss, net: loss(net["features"](), reference, task_labels=y),
    )


@weighted_case("HSICSuppression, weight 0.4")
def _hsic_weighted() -> Case:
    u = labels(3, seed=40)
    return Case(
        ntl.HSICSuppression(3, weight=0.4), Network(features=(B, 8)), lambda loss, net: loss(net["features"](), u)
    )


# The adversary: irrelevant labels u (3 classes), task labels y (2 classes); its head's initial values fixed.


def _adversary(**options: bool) -> ntl.AdversarialSuppression:
    module = ntl.AdversarialSuppression(3, dim=8, **options)
    generator = torch.Generator().manual_seed(50)
    with torch.no_grad():
        for p in module.head.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / 8**0.5)
    return module


@case("AdversarialSuppression")
def _adversarial() -> Case:
    u = labels(3, seed=51)
    return Case(_adversary(), Network(features=(B, 8)), lambda loss, net: loss(net["features"](), u))


@case("AdversarialSuppression, conditional")
def _adversarial_conditional() -> Case:
    u, y = labels(3, seed=52), labels(2, seed=53)
    return Case(
        _adversary(conditional=True),
        Network(features=(B, 8)),
        lambda loss, net: loss(net["features"](), u, task_labels=y),
    )


# The bias-capturing twin: a tiny MLP twin (fixed initial values) on fixed inputs; its features, LfF's weights and
# the twin's own step all enter the scalar (the features and weights are detached: a value, not a gradient).


def _twin_network() -> nn.Module:
    generator = torch.Generator().manual_seed(60)
    twin = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / 8**0.5)
    return twin


@case("BiasTwin")
def _bias_twin() -> Case:
    y = labels(3, seed=61)
    inputs = frozen(B, 8, seed=62)
    indices = torch.randperm(2 * B, generator=torch.Generator().manual_seed(63))[:B]

    def forward(twin: nn.Module, net: Network) -> Tensor:
        logits = net["logits"]()
        out: ntl.TwinOutput = twin(inputs, y, indices, logits)
        assert out.weights is not None
        ce = nn.functional.cross_entropy(logits, y, reduction="none")
        return (out.weights * ce).mean() + 0.1 * out.features["1"].square().mean() + 0.01 * out.twin_loss

    return Case(ntl.BiasTwin(_twin_network, 2 * B, layers=["1"]), Network(logits=(B, 3)), forward)


@case("BiasTwin, frozen")
def _bias_twin_frozen() -> Case:
    """The read-only path a frozen twin takes in training mode (the sampler's recipe), after two training calls
    (so that its weights are not all 0)."""
    case = _bias_twin()
    twin = case.module
    assert isinstance(twin, ntl.BiasTwin)
    inputs, y = frozen(B, 8, seed=62), labels(3, seed=61)
    for seed in (64, 65):
        indices = torch.randperm(2 * B, generator=torch.Generator().manual_seed(seed))[:B]
        twin(inputs, y, indices, frozen(B, 3, seed=seed))
    return replace(case, module=twin.freeze())
