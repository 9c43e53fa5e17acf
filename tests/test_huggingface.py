"""The Hugging Face example (examples/huggingface_trainer.py): Trainer and plain loop, a few CPU steps each.

Tiny randomly initialised BERT models built in code; nothing is downloaded (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="optional: pip install 'transformers[torch]' (in the test extra)")

ROOT = Path(__file__).resolve().parents[1]
STUDENT_LAYER = "bert.encoder.layer.0.output.dense.weight"  # below every tapped layer


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    # tiny matrices: on a busy machine a second intra-op thread made these steps ~30× slower (measured)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("huggingface_trainer", ROOT / "examples" / "huggingface_trainer.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def assert_terms(row: dict[str, float], example: ModuleType) -> None:
    for layer in example.HIDDEN_LAYERS:
        for term in ("loss", "similarity", "student_norm"):
            assert f"anti_transfer/{layer}/{term}" in row, sorted(row)
    assert {"task_loss", "anti_transfer/loss", "suppression/loss"} <= set(row), sorted(row)
    assert all(math.isfinite(v) for v in row.values()), row
    assert row["anti_transfer/loss"] > 0.0


def test_trainer_logs_every_term_and_trains_the_student(example: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    before = example.tiny_bert(example.NUM_LABELS, seed=0).state_dict()[STUDENT_LAYER]
    trainer = example.train_with_trainer(4, logging_steps=2, irrelevant_steps=1, output_dir=str(tmp_path))
    training_logs = [row for row in trainer.state.log_history if "loss" in row]
    assert [row["step"] for row in training_logs] == [2, 4]
    for row in training_logs:
        assert_terms(row, example)
        # the logged loss is the task loss plus both weighted penalties, averaged over the same steps
        assert row["loss"] == pytest.approx(
            row["task_loss"] + row["anti_transfer/loss"] + row["suppression/loss"], rel=1e-4, abs=1e-4
        )
    after = trainer.model.state_dict()[STUDENT_LAYER]
    assert not torch.equal(before, after)
    frozen = trainer.penalty.frozen.model
    assert not frozen.training and all(not p.requires_grad and p.grad is None for p in frozen.parameters())


def test_plain_loop_logs_every_term(example: ModuleType) -> None:
    _, logs = example.train_with_loop(4, logging_steps=2, irrelevant_steps=1)
    assert [row["step"] for row in logs] == [2.0, 4.0]
    for row in logs:
        assert_terms(row, example)


@pytest.mark.parametrize(
    ("weights", "reached"),
    [
        # anti-transfer alone: the hidden states' gradient reaches the encoder below them, not the pooler
        ({"suppression_weight": 0.0}, {STUDENT_LAYER}),
        # suppression alone, on the pooled output: the pooler and the encoder below it
        ({"anti_transfer_weight": 0.0}, {STUDENT_LAYER, "bert.pooler.dense.weight"}),
    ],
)
def test_each_penalty_sends_gradient_into_the_student(
    example: ModuleType, weights: dict[str, float], reached: set[str]
) -> None:
    student = example.tiny_bert(example.NUM_LABELS, seed=0)
    penalty = example.NegTransferPenalty(student, example.tiny_bert(example.NUM_IRRELEVANT, seed=1), **weights)
    batch = next(iter(torch.utils.data.DataLoader(example.TokenData(8, seed=0), batch_size=8)))
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask")}
    student.train()
    with penalty.tap:
        student(**inputs)
    (3.0 * penalty(inputs, batch["irrelevant_labels"])).backward()
    grads = {name: p.grad for name, p in student.named_parameters()}
    for name in reached:
        assert grads[name] is not None and grads[name].abs().max() > 0, name
    pooler = grads["bert.pooler.dense.weight"]
    if "bert.pooler.dense.weight" not in reached:
        assert pooler is None or pooler.abs().max() == 0
    assert grads["classifier.weight"] is None  # the penalties do not touch the task head
    assert all(p.grad is None for p in penalty.frozen.model.parameters())
