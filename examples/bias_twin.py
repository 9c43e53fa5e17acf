"""No bias labels: a BiasTwin learns the shortcut, then its guesses balance your batches.

A toy data set where a strong "colour" cue agrees with the label on 95 % of the samples and a weak "shape" cue
always does. Nobody labelled the colour. The twin (GCE) picks the colour up in the first epochs on the data as it
is; then it is frozen, batches are balanced over (label, the twin's guess), and conditional HSIC keeps the
features independent of the guess within each class. A plain model is trained beside it for comparison.

    python examples/bias_twin.py --epochs 12 --warmup-epochs 4
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import negtransfer_losses as ntl

K, N, BATCH = 4, 2048, 128


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
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--warmup-epochs", type=int, default=4, help="epochs on the data as it is, twin training")
    args = parser.parse_args()
    torch.manual_seed(0)
    x, y, _ = toy_data(0.05, seed=0)
    data = TensorDataset(x, y, torch.arange(N))  # the data set returns each sample's index
    shuffled = DataLoader(data, batch_size=BATCH, shuffle=True)

    model, plain = make_model(), make_model()
    twin = ntl.BiasTwin(make_model, num_samples=N)  # a fresh network, trained by the module itself
    tap = ntl.FeatureTap(model, ["1"])
    hsic = ntl.HSICSuppression(K, conditional=True, unbiased=False)  # within each class, beyond the twin's guess
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # your model only: the twin has its own steps
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)

    for epoch in range(args.epochs):
        loader = shuffled
        if epoch >= args.warmup_epochs:  # the twin's guesses are groups now: keep them, balance the batches
            twin.freeze()
            sampler = ntl.GroupBalancedBatchSampler(twin.sample_labels, twin.sample_pseudo_labels, BATCH)
            loader = DataLoader(data, batch_sampler=sampler)
        for inputs, labels, indices in loader:
            with tap:
                logits = model(inputs)
            out = twin(inputs, labels, indices)  # one forward of the twin; one step of it unless frozen
            loss = F.cross_entropy(logits, labels) + hsic(tap.pop()["1"], out.pseudo_labels, task_labels=labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        for inputs, labels, _ in shuffled:
            plain_loss = F.cross_entropy(plain(inputs), labels)
            plain_optimizer.zero_grad()
            plain_loss.backward()
            plain_optimizer.step()
        state = "frozen" if twin.frozen else "training"
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, twin GCE {out.twin_loss.item():.3f} ({state})")

    test_x, test_y, test_colour = toy_data(1.0, seed=1)  # the colour is uninformative at test time
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
        plain_accuracy = (plain(test_x).argmax(1) == test_y).float().mean().item()
        guess = twin(test_x, test_y, torch.arange(N)).pseudo_labels
    print(f"the twin's guesses agree with the colour on {(guess == test_colour).float().mean():.0%} of test samples")
    print(f"accuracy where the colour is random: {accuracy:.1%} with the twin's groups, {plain_accuracy:.1%} plain")


if __name__ == "__main__":
    main()
