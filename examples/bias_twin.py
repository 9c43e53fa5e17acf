"""No bias labels: a BiasTwin learns the shortcut, and your model learns from where it fails.

A toy data set where a strong "colour" cue agrees with the label on 95 % of the samples and a weak "shape" cue
always does. Nobody labelled the colour. The twin (GCE) picks the colour up; the model is trained with LfF's
weights, anti-transfer from the twin's features and conditional HSIC against the twin's pseudo-labels (within
each class).

    python examples/bias_twin.py --steps 300
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import negtransfer_losses as ntl

K, N = 4, 2048


def toy_data(conflicting: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x, y, colour)`: the colour equals y except on a `conflicting` share; shape is weak but always right."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, K, (N,), generator=g)
    colour = torch.where(torch.rand(N, generator=g) < conflicting, torch.randint(0, K, (N,), generator=g), y)
    x = torch.cat([3.0 * F.one_hot(colour, K), 1.5 * F.one_hot(y, K)], dim=1)
    return x + torch.randn(N, 2 * K, generator=g), y, colour


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(2 * K, 32), nn.ReLU(), nn.Linear(32, K))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y, _ = toy_data(0.05, seed=0)
    loader = DataLoader(TensorDataset(x, y, torch.arange(N)), batch_size=128, shuffle=True)  # indices too

    model = make_model()
    twin = ntl.BiasTwin(make_model, num_samples=N, layers=["1"])  # a fresh network, trained by the module itself
    tap = ntl.FeatureTap(model, ["1"])
    anti_transfer = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", weight=0.1)
    hsic = ntl.HSICSuppression(K, weight=0.1, conditional=True)  # the guess is a class: within each class only
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # your model only: the twin has its own steps

    step = 0
    while step < args.steps:
        for inputs, labels, indices in loader:
            with tap:
                logits = model(inputs)
            features = tap.pop()["1"]
            out = twin(inputs, labels, indices, logits)  # (a) features, (b) weights, (c) pseudo-labels
            assert out.weights is not None
            ce = F.cross_entropy(logits, labels, reduction="none")
            loss = (out.weights * ce).mean() + anti_transfer(features, out.features["1"])
            loss = loss + hsic(features, out.pseudo_labels, task_labels=labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step % 50 == 0 or step == args.steps:
                print(f"step {step}: loss {loss.item():.3f}, twin GCE {out.twin_loss.item():.3f}")
            if step == args.steps:
                break

    test_x, test_y, test_colour = toy_data(1.0, seed=1)  # the colour is uninformative at test time
    twin.eval()
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
        guess = twin(test_x, test_y, torch.arange(N)).pseudo_labels
    print(
        f"the twin's predictions agree with the colour on {(guess == test_colour).float().mean():.0%} of test samples"
    )
    print(f"the model's accuracy where the colour is random: {accuracy:.1%}")


if __name__ == "__main__":
    main()
