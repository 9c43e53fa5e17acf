"""Every suppression method in one training loop: swapping methods changes the constructor and nothing else.

Inputs `x ∈ R^16`: the task label `y` (4 classes) shifts dims 0–1, an irrelevant label `u` (4 classes, the
factor to remove, e.g. a site or a speaker) shifts dims 2–3, the rest is noise. An MLP encoder gives features
`z`, a linear head predicts `y`. Every suppression module is called the same way,

    loss = task_loss + suppression(z, signal, task_labels=y)

where `signal` says what to remove: `u`'s labels (HSIC, the adversary) or a frozen `u`-network's features on
the same batch (CKA). An unconditional module leaves `task_labels` unused; a conditional one
(`conditional=True`) removes only what `u` says beyond `y`. `Purify` is a transform, not a penalty:
`z = purify(z, u, task_labels=y)` before the head. The lines a method adds are marked `# +`.

Printed: task accuracy and how well a linear probe still reads `u` from the test features (chance 25 %). A
toy that shows the API; the measured comparison is studies/suppression_synthetic.py.

    python examples/suppression_methods.py [--steps 300]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import negtransfer_losses as ntl

PROTOTYPES = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
LR = 3e-3
# each method's constructor: its sizes (the adversary's default head needs the feature size; CKA needs none)
SIZES: dict[str, dict[str, int]] = {"hsic": {"num_irrelevant": 4}, "adversarial": {"num_irrelevant": 4, "dim": 16}}


def make_data(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    y, u = torch.randint(0, 4, (n,), generator=g), torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 16, generator=g)
    x[:, 0:2] += 2.0 * PROTOTYPES[y]
    x[:, 2:4] += 1.5 * PROTOTYPES[u]
    return x, y, u


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))


def fit(model: nn.Module, x: Tensor, labels: Tensor, steps: int) -> nn.Module:
    """Plain training of `model` on `labels`: the network whose features CKA's signal comes from."""
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def train(
    data: tuple[Tensor, Tensor, Tensor],
    steps: int,
    suppression: ntl.SuppressionLoss | None = None,
    reference: Callable[[Tensor], Tensor] | None = None,
    purify: ntl.Purify | None = None,
) -> tuple[nn.Module, nn.Module]:
    x, y, u = data
    torch.manual_seed(0)
    model, head = encoder(), nn.Linear(16, 4)
    groups = [{"params": [*model.parameters(), *head.parameters()]}]
    if isinstance(suppression, ntl.AdversarialSuppression):  # + its head learns in your optimizer
        groups += suppression.parameter_groups(LR)
    optimizer = torch.optim.Adam(groups, lr=LR)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        i = torch.randint(0, len(x), (128,), generator=g)
        z = model(x[i])
        if purify is not None:
            z = purify(z, u[i], task_labels=y[i])  # + a transform before the head
        loss = F.cross_entropy(head(z), y[i])
        if suppression is not None:
            signal = u[i] if reference is None else reference(x[i])  # + u's labels, or a frozen network's features
            loss = loss + suppression(z, signal, task_labels=y[i])  # +
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if purify is not None:  # evaluation: purify(z) uses the running estimate, no labels
        model = nn.Sequential(model, purify.eval())
    return model.eval(), head


def probe(z_train: Tensor, u_train: Tensor, z_test: Tensor, u_test: Tensor) -> float:
    """Test accuracy of a linear probe fitted to read `u` from the training features."""
    mean, std = z_train.mean(0), z_train.std(0).clamp_min(1e-6)
    linear = fit(nn.Linear(16, 4), (z_train - mean) / std, u_train, 300)
    return float((linear((z_test - mean) / std).argmax(1) == u_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    train_data, test_data = make_data(2000, g), make_data(2000, g)
    # CKA's signal: the features of a network trained to predict u, frozen
    u_net = fit(nn.Sequential(encoder(), nn.Linear(16, 4)), train_data[0], train_data[2], args.steps)
    frozen = ntl.FrozenReference(u_net, "0")  # eval, no gradient

    def u_features(batch: Tensor) -> Tensor:
        return frozen(batch)["0"]

    print("| method | form | task accuracy | u probe (chance 25 %) |\n|---|---|---|---|")

    def report(method: str, form: str, **options: Any) -> None:
        model, head = train(train_data, args.steps, **options)
        with torch.no_grad():
            z_train, z_test = model(train_data[0]), model(test_data[0])
            task = float((head(z_test).argmax(1) == test_data[1]).float().mean())
        readable = probe(z_train, train_data[2], z_test, test_data[2])
        print(f"| {method} | {form} | {100 * task:.1f} % | {100 * readable:.1f} % |", flush=True)

    report("plain", "—")
    for method in ("hsic", "adversarial", "cka"):
        for form in ("unconditional", "conditional"):
            suppression = ntl.make_suppression(method, conditional=form == "conditional", **SIZES.get(method, {}))
            report(method, form, suppression=suppression, reference=u_features if method == "cka" else None)
    for form in ("unconditional", "conditional"):
        report("purify", form, purify=ntl.Purify(4, 16, conditional=form == "conditional"))


if __name__ == "__main__":
    main()
