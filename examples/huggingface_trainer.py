"""negtransfer_losses with a Hugging Face `transformers` model: `Trainer` (default) or a plain loop (`--loop`).

A BERT classifier learns a task label `y` from token sequences that also carry an irrelevant factor `u`
(think speaker or domain). Two penalties keep it from relying on `u`:
- anti-transfer on the hidden states `bert.encoder.layer.N.output` (batch, tokens, hidden) against a
  frozen BERT trained on `u`: `AntiTransferLoss` on `FeatureTap` + `FrozenReference` features;
- task-irrelevant suppression (HSIC against `u`'s labels) on the pooled output `bert.pooler`.
Every term of both losses is logged through `negtransfer_losses.collect_terms`: with `Trainer` they join
its own logs (averaged over the logging interval, like its `loss`), so they reach TensorBoard, Weights &
Biases or whatever `report_to` names; the loop prints them.

The models are tiny and randomly initialised from a `BertConfig` built in code: nothing is downloaded
(`HF_HUB_OFFLINE=1`). The data are synthetic; this shows the wiring, not the method's benefit.

    python examples/huggingface_trainer.py [--steps 20] [--loop]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built in code: never reach the hub

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

import negtransfer_losses as ntl

HIDDEN_LAYERS = ["bert.encoder.layer.0.output", "bert.encoder.layer.1.output"]  # (batch, tokens, hidden)
POOLED_LAYER = "bert.pooler"  # (batch, hidden)
NUM_LABELS, NUM_IRRELEVANT, VOCAB, LENGTH = 2, 3, 64, 16


def tiny_bert(num_labels: int, seed: int) -> BertForSequenceClassification:
    """A 2-layer, 32-wide BERT classifier, randomly initialised (no download)."""
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        num_labels=num_labels,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


class TokenData(Dataset[dict[str, Tensor]]):
    """Random token sequences; token 1 + y marks the task label, token 3 + u the irrelevant factor."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, NUM_LABELS, (n,), generator=g)
        self.irrelevant = torch.randint(0, NUM_IRRELEVANT, (n,), generator=g)
        self.input_ids = torch.randint(8, VOCAB, (n, LENGTH), generator=g)
        self.input_ids[:, 1] = 1 + self.labels
        self.input_ids[:, 2] = 3 + self.irrelevant

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "labels": self.labels[i],
            "irrelevant_labels": self.irrelevant[i],  # not a model input: taken out before the forward
        }


class NegTransferPenalty(nn.Module):
    """Anti-transfer on hidden states and suppression on the pooled output, for one student model.

    Run the student's forward inside `with penalty.tap:`, then call `penalty(inputs, irrelevant_labels)`.
    `terms()` gives every term of both losses as floats for logging.
    """

    def __init__(
        self,
        student: nn.Module,
        irrelevant_model: nn.Module,
        *,
        anti_transfer_weight: float = 1.0,
        suppression_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.tap = ntl.FeatureTap(student, [*HIDDEN_LAYERS, POOLED_LAYER])
        self.tap.remove()  # attached only around the training forward (`with penalty.tap:`)
        self.frozen = ntl.FrozenReference(irrelevant_model, HIDDEN_LAYERS)  # eval, no grad, stops early
        # Tokens take the place of channels: the per-sample Gram matrix compares token-to-token
        # similarities, which do not depend on how either network orders its hidden units.
        self.anti_transfer = ntl.AntiTransferLoss(
            aggregation="gram", distance="cos_squared", gram_scope="sample", weight=anti_transfer_weight
        )
        self.suppression = ntl.HSICSuppression(NUM_IRRELEVANT, normalized=True, weight=suppression_weight)

    def forward(self, inputs: Mapping[str, Tensor], irrelevant_labels: Tensor) -> Tensor:
        student = self.tap.pop()
        reference = self.frozen(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        hidden = {layer: student[layer] for layer in HIDDEN_LAYERS}
        return self.anti_transfer(hidden, reference) + self.suppression(student[POOLED_LAYER], irrelevant_labels)

    def terms(self) -> dict[str, float]:
        return ntl.collect_terms({"anti_transfer": self.anti_transfer, "suppression": self.suppression})


class NegTransferTrainer(Trainer):
    """`Trainer` whose training loss adds `penalty`, and whose logs carry every term of it.

    The task loss comes from `Trainer.compute_loss` (the model's own loss, label smoothing and
    `compute_loss_func` still apply); evaluation uses the task loss alone. The terms are averaged over the
    calls since the last log and added to the training logs, beside `loss`.
    """

    # the task loss and the penalties are per-batch means: Trainer divides them for gradient accumulation
    loss_is_scaled_for_ga = False

    def __init__(self, *args: Any, penalty: NegTransferPenalty, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.penalty = penalty.to(self.args.device)
        self._term_sums: dict[str, float] = {}
        self._term_calls = 0

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        inputs = dict(inputs)
        irrelevant_labels = inputs.pop("irrelevant_labels")
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs)
        with self.penalty.tap:
            task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
        loss = task_loss + self.penalty(inputs, irrelevant_labels)
        for key, value in {"task_loss": task_loss.item(), **self.penalty.terms()}.items():
            self._term_sums[key] = self._term_sums.get(key, 0.0) + value
        self._term_calls += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._term_calls:  # a training log, not an evaluation or the final summary
            logs = {**logs, **{key: total / self._term_calls for key, total in self._term_sums.items()}}
            self._term_sums, self._term_calls = {}, 0
        super().log(logs, start_time)


def train_irrelevant_model(steps: int, seed: int) -> BertForSequenceClassification:
    """The network that FrozenReference freezes: a BERT trained to predict `u` (briefly, here)."""
    model = tiny_bert(NUM_IRRELEVANT, seed=seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for batch in _batches(TokenData(256, seed=seed + 1), steps):
        loss = model(input_ids=batch["input_ids"], labels=batch["irrelevant_labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    return model


def train_with_trainer(
    steps: int, *, logging_steps: int = 5, irrelevant_steps: int = 30, seed: int = 0, output_dir: str | None = None
) -> NegTransferTrainer:
    student = tiny_bert(NUM_LABELS, seed=seed)
    penalty = NegTransferPenalty(student, train_irrelevant_model(irrelevant_steps, seed))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=output_dir or tmp,
            max_steps=steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=logging_steps,
            save_strategy="no",
            report_to="none",  # "tensorboard" / "wandb" receive the same logs, terms included
            remove_unused_columns=False,  # keep "irrelevant_labels": the model's forward does not take it
            disable_tqdm=True,
            dataloader_pin_memory=False,  # pinning is for GPU training; on CPU it only warns
            seed=seed,
        )
        trainer = NegTransferTrainer(model=student, args=args, train_dataset=TokenData(256, seed), penalty=penalty)
        trainer.train()
    return trainer


def train_with_loop(
    steps: int, *, logging_steps: int = 5, irrelevant_steps: int = 30, seed: int = 0
) -> tuple[BertForSequenceClassification, list[dict[str, float]]]:
    """The same training as `train_with_trainer`, in a plain PyTorch loop; returns the logged rows."""
    student = tiny_bert(NUM_LABELS, seed=seed)
    penalty = NegTransferPenalty(student, train_irrelevant_model(irrelevant_steps, seed))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    logs: list[dict[str, float]] = []
    student.train()
    for step, batch in enumerate(_batches(TokenData(256, seed), steps), start=1):
        inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}
        with penalty.tap:
            task_loss = student(**inputs).loss
        loss = task_loss + penalty(inputs, batch["irrelevant_labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % logging_steps == 0:
            row = {"step": float(step), "loss": loss.item(), "task_loss": task_loss.item(), **penalty.terms()}
            logs.append(row)  # or writer.add_scalar(key, value, step) / wandb.log(row, step=step)
            print(_format(row))
    return student, logs


def _batches(data: TokenData, steps: int) -> list[dict[str, Tensor]]:
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches: list[dict[str, Tensor]] = []
    while len(batches) < steps:
        batches.extend(loader)
    return batches[:steps]


def _format(row: Mapping[str, float]) -> str:
    return " ".join(f"{key}={value:.4g}" for key, value in row.items())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--irrelevant-steps", type=int, default=30, help="training steps of the frozen network")
    parser.add_argument("--loop", action="store_true", help="a plain PyTorch loop instead of Trainer")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.loop:
        train_with_loop(args.steps, logging_steps=args.logging_steps, irrelevant_steps=args.irrelevant_steps)
        return
    # with disable_tqdm=True, Trainer's PrinterCallback prints every log, the terms included
    train_with_trainer(args.steps, logging_steps=args.logging_steps, irrelevant_steps=args.irrelevant_steps)


if __name__ == "__main__":
    main()
