"""FSDP2 (`fully_shard`) on 2 CPU processes (gloo): bare layer names, `gather="global"`, a sharded frozen reference."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import fsdp_worker
import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fsdp_worker.run_rank, args=(2, f"{tmp}/init", tmp), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def expected() -> dict[str, Any]:
    return fsdp_worker.single_process()


def test_the_models_really_are_sharded(ranks: list[dict[str, Any]]) -> None:
    for results in ranks:
        # after the optimizer step, and after reshard() for the frozen model's root
        assert set(results["sharded"].values()) == {"DTensor"}, results["sharded"]


def test_taps_find_layers_by_their_bare_names(ranks: list[dict[str, Any]]) -> None:
    for results in ranks:
        assert results["layers"] == fsdp_worker.LAYERS
        assert results["reference_layers"] == fsdp_worker.LAYERS


def test_global_gather_gives_every_rank_the_single_process_loss_and_gradients(
    ranks: list[dict[str, Any]], expected: dict[str, Any]
) -> None:
    for step, want in enumerate(expected["steps"]):
        assert want["grads"]["blocks.0.0.weight"].abs().max() > 1e-6  # a zero gradient would prove nothing
        for rank, results in enumerate(ranks):
            got = results["steps"][step]
            where = f"rank {rank}, step {step}"
            torch.testing.assert_close(got["loss"], want["loss"], msg=lambda m, w=where: f"{w} loss: {m}")
            assert set(got["grads"]) == set(want["grads"])
            for name, grad in want["grads"].items():
                # FSDP averaged the gradients over ranks: they must equal the single-process gradients
                torch.testing.assert_close(got["grads"][name], grad, msg=lambda m, w=where, n=name: f"{w} {n}: {m}")
    # the second step ran after an optimizer step on the sharded parameters: the loss moved
    assert not torch.equal(expected["steps"][0]["loss"], expected["steps"][1]["loss"])


def test_frozen_reference_on_a_sharded_model_gives_the_unsharded_features(
    ranks: list[dict[str, Any]], expected: dict[str, Any]
) -> None:
    bounds = [0, fsdp_worker.SIZES[0], sum(fsdp_worker.SIZES)]
    for rank, results in enumerate(ranks):
        for step, got in enumerate(results["steps"]):  # step 1 follows an early-stopped pass of step 0
            for layer, want in expected["steps"][step]["reference"].items():
                torch.testing.assert_close(got["reference"][layer], want[bounds[rank] : bounds[rank + 1]])
        for stopped in results["early_stop_reference"]:  # stop_early=True, called twice
            for layer, want in expected["steps"][0]["reference"].items():
                torch.testing.assert_close(stopped[layer], want[bounds[rank] : bounds[rank + 1]])


def test_fsdp1_wrapper_names_resolve_to_bare_names(ranks: list[dict[str, Any]]) -> None:
    x, _ = fsdp_worker.full_batch()
    model = fsdp_worker.make_model(seed=0)
    with torch.no_grad():
        h0 = model.blocks[0](model.embed(x))
        want = {"blocks.0": h0, "blocks.1": model.blocks[1](h0)}
    for results in ranks:
        fsdp1 = results["fsdp1"]
        assert any("_fsdp_wrapped_module" in name for name in fsdp1["module_names"])  # the wrappers are there
        assert fsdp1["layers"] == fsdp_worker.LAYERS
        for layer, value in want.items():
            torch.testing.assert_close(fsdp1["features"][layer].detach(), value)
