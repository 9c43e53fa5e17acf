"""negtransfer_losses inside PyTorch Lightning: anti-transfer in a `LightningModule.training_step`.

Optional: needs `pip install lightning`. The losses are ordinary `nn.Module`s, so Lightning moves them to
the device and saves their buffers with the checkpoint; the frozen reference is a submodule that stays in
eval mode when Lightning calls `.train()` (Lightning notes those eval-mode modules at the start of
training: that is intended). The tap is attached in `__init__` and popped every step.

    python examples/lightning_module.py [--steps 20]
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import negtransfer_losses as ntl


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 4),
    )


class AntiTransferClassifier(L.LightningModule):
    def __init__(self, irrelevant: nn.Module, weight: float = 0.1) -> None:
        super().__init__()
        self.model = cnn()
        self.frozen = ntl.FrozenReference(irrelevant, ["0", "2"])
        self.tap = ntl.FeatureTap(self.model, ["0", "2"])
        self.anti_transfer = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", weight=weight)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        task = F.cross_entropy(self.model(x), y)
        penalty = self.anti_transfer(self.tap.pop(), self.frozen(x))
        self.log("task", task, prog_bar=True)
        # every term as a float: "anti_transfer/loss", "anti_transfer/{layer}/similarity", .../student_norm
        self.log_dict(ntl.collect_terms({"anti_transfer": self.anti_transfer}))
        return task + penalty

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)  # the frozen network has no trainable parameters


def main(argv: list[str] | None = None) -> AntiTransferClassifier:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(256, 1, 8, 8, generator=g), torch.randint(0, 4, (256,), generator=g))
    module = AntiTransferClassifier(irrelevant=cnn())
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=32))
    terms = ntl.collect_terms({"anti_transfer": module.anti_transfer})
    print("trained", args.steps, "steps; last terms:", {key: round(value, 4) for key, value in terms.items()})
    return module


if __name__ == "__main__":
    main()
