"""Each suppression method on synthetic data whose task and irrelevant factors lie in known subspaces.

Inputs `x ∈ R^16`: the task label `y` (4 classes) shifts dims 0-1 by ±2, the irrelevant label `u` (4
classes, independent of `y`) shifts dims 2-3 by ±1.5, the rest is noise (the best possible task accuracy
is Φ(2)² ≈ 95 %). An MLP encoder gives features `z ∈ R^16` and a linear head predicts `y`; every module's
parameters are in one Adam optimizer at one learning rate, the adversarial head in its own parameter group
(`parameter_groups`: `head_lr_multiplier` times that rate). After
training, a logistic-regression probe fitted on the training features measures how well `u` can still be
read from `z` on test data (chance: 25 %). Every suppression module is built by name and called alike,
`module(z, signal, task_labels=y)`: the signal is `u`'s labels (HSIC, the adversary) or a frozen `u`-network's
features (CKA); `Purify` is a transform before the head.

    python studies/suppression_synthetic.py [--steps 300] [--seeds 3]          # documented defaults
    python studies/suppression_synthetic.py --tune                              # + weights tuned on validation
    python studies/suppression_synthetic.py --ablation                          # the adversary's head speed-ups

`--tune` picks each method's weight from a grid on a validation split (seeds 100-102, never the test
seeds) and reports it beside the default.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import negtransfer_losses as ntl

sys.path.insert(0, str(Path(__file__).parent))
from study_results import SIGNALS, suppression_module

NUM_CLASSES = 4
PROTOTYPES = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
LR = 3e-3
# the documented default weight of each method (weight=1 everywhere; Purify's knob is its momentum)
DEFAULTS: dict[str, float] = {
    "hsic": 1.0,
    "adversarial": 1.0,
    "cka": 1.0,
    "purify": 0.01,
}
GRIDS: dict[str, list[float]] = {
    "hsic": [0.3, 1.0, 3.0, 10.0],
    "adversarial": [0.3, 1.0, 3.0, 10.0],
    "cka": [0.3, 1.0, 3.0, 10.0],
    "purify": [0.003, 0.01, 0.03],
}
METHODS = ["plain", *(f"{m}{c}" for m in DEFAULTS for c in ("", "_conditional"))]
# the adversary without the module's own head speed-ups (--ablation)
ABLATION: dict[str, dict[str, float]] = {
    "plain gradient reversal (m=1, head_steps=0)": {"head_lr_multiplier": 1.0, "head_steps": 0},
    "head_lr_multiplier=10 only": {"head_steps": 0},
    "head_steps=10 only": {"head_lr_multiplier": 1.0},
}


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    u = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    x = torch.randn(n, 16, generator=generator)
    x[:, 0:2] += 2.0 * PROTOTYPES[y]
    x[:, 2:4] += 1.5 * PROTOTYPES[u]
    return x, y, u


class Model(nn.Module):
    def __init__(self, purify: ntl.Purify | None = None) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        self.purify = purify
        self.head = nn.Linear(16, NUM_CLASSES)

    def features(self, x: torch.Tensor, u: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        z = self.encoder(x)
        if self.purify is None:
            return z
        return self.purify(z, u if self.training else None, task_labels=y)  # type: ignore[no-any-return]


def frozen_u_network(x: torch.Tensor, u: torch.Tensor, steps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """An encoder trained to predict `u`, frozen: its features are the reference of the `cka` method."""
    net = Model()
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    for _ in range(steps):
        loss = F.cross_entropy(net.head(net.features(x)), u)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frozen = ntl.FrozenReference(net.encoder, "2")
    return lambda batch: frozen(batch)["2"]


def train(
    method: str,
    weight: float,
    data: tuple[torch.Tensor, ...],
    steps: int,
    seed: int,
    adversary: dict[str, float] | None = None,
) -> Model:
    x, y, u = data
    torch.manual_seed(seed)
    conditional = method.endswith("_conditional")
    base = method.removesuffix("_conditional")
    purify = ntl.Purify(NUM_CLASSES, 16, momentum=weight, conditional=conditional) if base == "purify" else None
    model = Model(purify)
    suppression: ntl.SuppressionLoss | None = None
    if base in SIGNALS:  # hsic, adversarial, cka: built by name (the ablation's options are the adversary's)
        options: dict[str, Any] = dict(adversary or {})
        sizes = {"num_irrelevant": NUM_CLASSES, "dim": 16}
        suppression = suppression_module(base, **sizes, weight=weight, conditional=conditional, **options)
    # the adversary's head, the one module with parameters of its own, joins the optimizer in its own group
    heads = suppression.parameter_groups(LR) if isinstance(suppression, ntl.AdversarialSuppression) else []
    reference = frozen_u_network(x, u, steps) if SIGNALS.get(base) == "features" else None
    optimizer = torch.optim.Adam([{"params": model.parameters()}, *heads], lr=LR)  # one optimizer
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=generator)
        z = model.features(x[idx], u[idx], y[idx])
        loss = F.cross_entropy(model.head(z), y[idx])
        if suppression is not None:
            loss = loss + suppression(z, u[idx] if reference is None else reference(x[idx]), task_labels=y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def probe_accuracy(z_train: torch.Tensor, u_train: torch.Tensor, z_test: torch.Tensor, u_test: torch.Tensor) -> float:
    """Multinomial logistic regression (L-BFGS, light L2) fitted on train features, scored on test."""
    mean, std = z_train.mean(0), z_train.std(0).clamp_min(1e-6)
    a, b = (z_train - mean) / std, (z_test - mean) / std
    probe = nn.Linear(a.shape[1], NUM_CLASSES)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(a), u_train) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return (probe(b).argmax(1) == u_test).float().mean().item()


def evaluate(
    model: Model, train_data: tuple[torch.Tensor, ...], test_data: tuple[torch.Tensor, ...]
) -> tuple[float, float]:
    with torch.no_grad():
        z_train, z_test = model.features(train_data[0]), model.features(test_data[0])
        task = (model.head(z_test).argmax(1) == test_data[1]).float().mean().item()
    return task, probe_accuracy(z_train, train_data[2], z_test, test_data[2])


def run(
    method: str, weight: float, seeds: list[int], steps: int, adversary: dict[str, float] | None = None
) -> list[tuple[float, float]]:
    runs = []
    for seed in seeds:
        g = torch.Generator().manual_seed(1000 + seed)
        train_data, test_data = make_data(2000, g), make_data(2000, g)
        runs.append(evaluate(train(method, weight, train_data, steps, seed, adversary), train_data, test_data))
    return runs


def score(runs: list[tuple[float, float]]) -> float:
    """Validation criterion: the probe's distance to chance, plus any task accuracy lost below 0.9."""
    task = statistics.mean(r[0] for r in runs)
    probe = statistics.mean(r[1] for r in runs)
    return max(probe - 1 / NUM_CLASSES, 0.0) + 2 * max(0.9 - task, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--tune", action="store_true", help="also pick each weight on validation seeds")
    parser.add_argument("--ablation", action="store_true", help="only the adversary without its head speed-ups")
    args = parser.parse_args()

    torch.set_num_threads(1)
    test_seeds = list(range(args.seeds))
    print(f"steps={args.steps}, seeds={args.seeds}; mean ± std over seeds; chance is 25 % for the probe")
    print("| method | setting | weight | task accuracy (test) | irrelevant probe (test) |")
    print("|---|---|---|---|---|")

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    def row(method: str, setting: str, weight: float | None, runs: list[tuple[float, float]]) -> None:
        task, probe = [100 * r[0] for r in runs], [100 * r[1] for r in runs]
        shown = "—" if weight is None else f"{weight:g}"
        print(
            f"| {method} | {setting} | {shown} | {statistics.mean(task):.1f} ± {spread(task):.1f} % "
            f"| {statistics.mean(probe):.1f} ± {spread(probe):.1f} % |",
            flush=True,
        )

    if args.ablation:
        for setting, options in ABLATION.items():
            row("adversarial", setting, 1.0, run("adversarial", 1.0, test_seeds, args.steps, options))
        return
    for method in args.methods:
        base = method.removesuffix("_conditional")
        if method == "plain":
            row(method, "—", None, run(method, 0.0, test_seeds, args.steps))
            continue
        row(method, "default", DEFAULTS[base], run(method, DEFAULTS[base], test_seeds, args.steps))
        if args.tune:
            validation = {w: score(run(method, w, [100, 101, 102], args.steps)) for w in GRIDS[base]}
            best = min(validation, key=lambda w: validation[w])
            row(method, "tuned", best, run(method, best, test_seeds, args.steps))


if __name__ == "__main__":
    main()
