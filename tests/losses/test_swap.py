"""Swapping one suppression method or form for another changes the constructor and nothing else.

One training loop, written once, trains an encoder with every suppression loss of the package, conditional or
not; the only thing chosen per module is the kind of signal that describes the factor (its labels, or a frozen
network's features), which `SIGNALS` maps from the class.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import negtransfer_losses as ntl

B, D, K, CLASSES = 24, 8, 3, 2

FACTORIES: dict[str, Callable[[], ntl.SuppressionLoss]] = {
    "HSICSuppression": lambda: ntl.HSICSuppression(K),
    "HSICSuppression, conditional": lambda: ntl.HSICSuppression(K, conditional=True),
    "CKASuppression": lambda: ntl.CKASuppression(),
    "CKASuppression, conditional": lambda: ntl.CKASuppression(conditional=True),
    "AdversarialSuppression": lambda: ntl.AdversarialSuppression(K, dim=D),
    "AdversarialSuppression, conditional": lambda: ntl.AdversarialSuppression(K, dim=D, conditional=True),
    "make_suppression('hsic')": lambda: ntl.make_suppression("hsic", num_irrelevant=K, conditional=True),
}


def batch(step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(step)
    y = torch.randint(0, CLASSES, (B,), generator=g)
    u = torch.where(torch.rand(B, generator=g) < 0.8, y, torch.randint(0, K, (B,), generator=g))  # tied to y
    x = torch.randn(B, 5, generator=g) + u[:, None].float()  # the factor is in the input
    frozen_features = torch.nn.functional.one_hot(u, K).float() + 0.1 * torch.randn(B, K, generator=g)
    return x, y, u, frozen_features


def train(suppression: ntl.SuppressionLoss, steps: int = 15) -> tuple[nn.Module, list[float]]:
    """The loop a user writes once: the module is the only thing that changes between runs."""
    torch.manual_seed(0)
    encoder, head = nn.Sequential(nn.Linear(5, D), nn.Tanh()), nn.Linear(D, CLASSES)
    optimizer = torch.optim.Adam(
        [{"params": [*encoder.parameters(), *head.parameters()]}, *_own_groups(suppression)], lr=1e-2
    )
    penalties = []
    for step in range(steps):
        x, y, u, frozen_features = batch(step)
        signal = frozen_features if isinstance(suppression, ntl.CKASuppression) else u  # the signal's kind
        z = encoder(x)
        penalty = suppression(z, signal, task_labels=y)
        loss = nn.functional.cross_entropy(head(z), y) + penalty
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        penalties.append(penalty.item())
    return encoder, penalties


def _own_groups(suppression: ntl.SuppressionLoss) -> list[dict[str, object]]:
    """A module's own parameters (an adversary's head) as optimizer groups; none for the others."""
    groups = getattr(suppression, "parameter_groups", None)
    return groups(1e-2) if groups is not None else []


@pytest.mark.parametrize("name", list(FACTORIES))
def test_one_loop_trains_every_suppression_method_and_form(name: str) -> None:
    suppression = FACTORIES[name]()
    assert isinstance(suppression, ntl.SuppressionLoss)
    encoder, penalties = train(suppression)
    assert all(torch.isfinite(torch.tensor(penalties)))
    assert set(suppression.last_terms) >= {"loss", "value"}
    # the penalty reached the encoder: the same loop without it ends elsewhere
    plain, _ = train(ntl.HSICSuppression(K, weight=0.0))
    moved = max((p - q).abs().max().item() for p, q in zip(encoder.parameters(), plain.parameters(), strict=True))
    assert moved > 1e-4, name


def test_an_unconditional_module_leaves_task_labels_unused() -> None:
    x, y, u, _ = batch(0)
    z = nn.Linear(5, D)(x)
    for module in (ntl.HSICSuppression(K), ntl.AdversarialSuppression(K, dim=D).eval()):
        assert torch.equal(module(z, u, task_labels=y), module(z, u))
    with pytest.raises(ValueError, match=r"conditional=True needs 'task_labels'"):
        ntl.HSICSuppression(K, conditional=True)(z, u)
