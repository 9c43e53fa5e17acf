"""Each suppression method on synthetic data whose task and irrelevant factors lie in known subspaces.

Inputs `x ∈ R^16`: the task label `y` (4 classes) shifts dims 0-1, the irrelevant label `u` (4 classes,
independent of `y`) shifts dims 2-3, the rest is noise. An MLP encoder gives features `z ∈ R^16` and a
linear head predicts `y`. After training, a logistic-regression probe fitted on the training features
measures how well `u` can still be read from `z` on test data (chance: 25 %).

    python examples/suppression_synthetic.py [--steps 300] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import negtransfer_losses as ntl

NUM_CLASSES = 4
PROTOTYPES = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def make_data(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    u = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    x = torch.randn(n, 16, generator=generator)
    x[:, 0:2] += 1.5 * PROTOTYPES[y]
    x[:, 2:4] += 1.5 * PROTOTYPES[u]
    return x, y, u


class Model(nn.Module):
    def __init__(self, purify: bool = False, momentum: float = 0.01) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        self.purify = ntl.Purify(NUM_CLASSES, 16, momentum=momentum) if purify else None
        self.head = nn.Linear(16, NUM_CLASSES)

    def features(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        z = self.encoder(x)
        return self.purify(z, u) if self.purify is not None else z


def frozen_u_network(x: torch.Tensor, u: torch.Tensor, steps: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """An encoder trained to predict `u`, frozen: its features are the reference of the `cka` method."""
    net = Model()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(net.head(net.features(x)), u)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    frozen = ntl.FrozenReference(net.encoder, "2")
    return lambda batch: frozen(batch)["2"]


def train(method: str, data: tuple[torch.Tensor, ...], steps: int, seed: int, momentum: float = 0.01) -> Model:
    x, y, u = data
    torch.manual_seed(seed)
    model = Model(purify=method == "purify", momentum=momentum)
    suppression = {
        "hsic": ntl.TaskIrrelevantSuppression("hsic", NUM_CLASSES, weight=1.0, normalized=True),
        "adversarial": ntl.TaskIrrelevantSuppression(
            "adversarial", NUM_CLASSES, weight=1.0, feature_dim=16, strength=1.0, warmup_steps=steps // 3
        ),
        "cka": ntl.TaskIrrelevantSuppression("cka", weight=1.0),
    }.get(method)
    reference = frozen_u_network(x, u, steps) if method == "cka" else None
    groups: list[dict] = [{"params": model.parameters()}]
    if suppression is not None:  # the adversarial head learns 10x faster than the encoder it plays against
        groups.append({"params": suppression.parameters(), "lr": 3e-2})
    optimizer = torch.optim.Adam(groups, lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (128,), generator=generator)
        z = model.features(x[idx], u[idx])
        loss = F.cross_entropy(model.head(z), y[idx])
        if suppression is not None:
            loss = loss + suppression(z, u[idx], reference(x[idx]) if reference is not None else None)
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


METHODS = ["plain", "hsic", "adversarial", "cka", "purify"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--momentum", type=float, default=0.01, help="Purify's EMA momentum")
    args = parser.parse_args()

    torch.set_num_threads(min(2, torch.get_num_threads()))
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in args.methods}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        train_data, test_data = make_data(2000, g), make_data(2000, g)
        for method in args.methods:
            model = train(method, train_data, args.steps, seed, args.momentum)
            results[method].append(evaluate(model, train_data, test_data))

    print(f"steps={args.steps}, seeds={args.seeds}; mean ± std over seeds; chance is 25 % for both")
    print("| method | task accuracy (test) | irrelevant-label probe accuracy (test) |")
    print("|---|---|---|")

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    for method, runs in results.items():
        task, probe = [100 * r[0] for r in runs], [100 * r[1] for r in runs]
        print(
            f"| {method} | {statistics.mean(task):.1f} ± {spread(task):.1f} % "
            f"| {statistics.mean(probe):.1f} ± {spread(probe):.1f} % |"
        )


if __name__ == "__main__":
    main()
