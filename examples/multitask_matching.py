"""Two tasks labelled on different samples: couple their heads through a task-relatedness matrix.

Task A is a class (5 classes); task B is 3 binary attributes that each class has or lacks (`DEFINITION`), with
10 % of the attribute labels flipped. The training samples carry one task's labels only: 10 have a class
(attributes NaN), 300 others attributes (class -100): task A's labels are scarce. The relatedness
`R[k, m] = P(b_m = 1 | a = k)` comes from prior knowledge (`TaskRelatedness.from_table`: the definition,
softened by the known 10 % noise); with co-annotated samples `TaskRelatedness.estimate` measures it instead.
One network (a shared trunk, two heads) is trained with `MultiTaskLoss`,

    loss = loss_fn(logits_a, logits_b, labels_a, labels_b)

with the couplings off (plain multi-task learning: masked losses), with distribution matching on (λ = 1:
each head learns from the other task's predictions through `R`, on every sample), and with the B→A direction
gated by task B's label advantage (`b_to_a_gate="label_advantage"`, the setting the docs lead with).
`last_terms` holds every part for logging. With `--upgrad` the gated model is trained instead by Jacobian
descent (TorchJD, `pip install torchjd`): `loss_fn.terms(...)` hands the parts to UPGrad as separate losses.
A toy that shows the API; the measured study is studies/multitask_digits.py.

    python examples/multitask_matching.py [--steps 300] [--seed 0] [--upgrad]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import negtransfer_losses as ntl

DEFINITION = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.float32)
NUM_A, NUM_B, NOISE = 5, 3, 0.10


def make_data(n: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs in R^20 around one prototype per class, their class and their (noisy) attributes."""
    prototypes = torch.randn(NUM_A, 20, generator=torch.Generator().manual_seed(0))
    a = torch.randint(0, NUM_A, (n,), generator=g)
    x = prototypes[a] + 1.5 * torch.randn(n, 20, generator=g)
    flip = torch.rand(n, NUM_B, generator=g) < NOISE
    b = torch.where(flip, 1 - DEFINITION[a], DEFINITION[a])
    return x, a, b


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(20, 64), nn.ReLU())
        self.head_a, self.head_b = nn.Linear(64, NUM_A), nn.Linear(64, NUM_B)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.head_a(h), self.head_b(h)


def train(loss_fn: ntl.MultiTaskLoss, x: Tensor, labels_a: Tensor, labels_b: Tensor, steps: int) -> TwoHeads:
    torch.manual_seed(0)
    model = TwoHeads()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        logits_a, logits_b = model(x)
        loss = loss_fn(logits_a, logits_b, labels_a, labels_b)  # unknown labels: -100 (A), NaN (B)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def train_upgrad(loss_fn: ntl.MultiTaskLoss, x: Tensor, labels_a: Tensor, labels_b: Tensor, steps: int) -> TwoHeads:
    """The same training by Jacobian descent: one gradient per part of the loss, aggregated by UPGrad."""
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import backward, jac_to_grad

    torch.manual_seed(0)
    model = TwoHeads()
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        logits_a, logits_b = model(x)
        parts = loss_fn.terms(logits_a, logits_b, labels_a, labels_b)  # {"supervised_a": ..., "matching": ...}
        optimizer.zero_grad()
        backward(list(parts.values()), inputs=params)  # the couplings share the heads: every parameter
        jac_to_grad(params, aggregator=UPGrad())
        optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--upgrad", action="store_true", help="train the gated model by Jacobian descent (torchjd)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    x_a, a, _ = make_data(10, g)  # class labels only
    x_b, _, b = make_data(300, g)  # attribute labels only
    x_test, a_test, _ = make_data(1000, g)
    x = torch.cat([x_a, x_b])
    labels_a = torch.cat([a, torch.full((300,), -100)])
    labels_b = torch.cat([torch.full((10, NUM_B), float("nan")), b])
    table = {k: {m: 1 - NOISE if DEFINITION[k, m] else NOISE for m in range(NUM_B)} for k in range(NUM_A)}
    relatedness = ntl.TaskRelatedness.from_table(table, num_a=NUM_A, num_b=NUM_B)

    models = {
        "plain multi-task": ntl.MultiTaskLoss(relatedness, matching_weight=0.0, co_annotation_weight=0.0),
        "+ distribution matching": ntl.MultiTaskLoss(relatedness, co_annotation_weight=0.0),
        "+ matching, B→A gated": ntl.MultiTaskLoss(
            relatedness, co_annotation_weight=0.0, b_to_a_gate="label_advantage"
        ),
    }
    for name, loss_fn in models.items():
        if args.upgrad and name == "+ matching, B→A gated":
            name, model = name + ", UPGrad", train_upgrad(loss_fn, x, labels_a, labels_b, args.steps)
        else:
            model = train(loss_fn, x, labels_a, labels_b, args.steps)
        with torch.no_grad():
            logits_a, logits_b = model(x_test)
        class_accuracy = float((logits_a.argmax(1) == a_test).float().mean())
        attribute_accuracy = float(((logits_b > 0).float() == DEFINITION[a_test]).float().mean())
        print(f"{name}: class {100 * class_accuracy:.1f} %, attributes {100 * attribute_accuracy:.1f} % (clean test)")
        if loss_fn.last_terms:  # filled by calls of the module; `terms(...)` leaves it as it was
            print("  last terms:", {k: round(v, 3) for k, v in ntl.collect_terms({"mtl": loss_fn}).items()})


if __name__ == "__main__":
    main()
