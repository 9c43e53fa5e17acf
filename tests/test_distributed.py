"""gather="global" under DDP: 2 processes (gloo, CPU) with unequal batches against one process on the whole batch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import distributed_worker
import pytest
import torch
import torch.multiprocessing as mp


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, dict[str, torch.Tensor]]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(distributed_worker.run_rank, args=(2, f"{tmp}/init", tmp), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hsic", "linear_cka", "cka_unbiased", "anti_transfer", "irrelevant_hsic"])
def test_global_gather_equals_single_process_on_the_whole_batch(
    two_ranks: list[dict[str, dict[str, torch.Tensor]]], name: str
) -> None:
    expected = distributed_worker.single_process()[name]
    assert set(expected) >= {"loss", "body.0.weight"}
    assert expected["body.0.weight"].abs().max() > 1e-6  # a zero gradient would prove nothing
    for rank, results in enumerate(two_ranks):
        got = results[name]
        torch.testing.assert_close(got["loss"], expected["loss"], msg=lambda m, r=rank: f"rank {r} loss: {m}")
        for key, value in expected.items():
            # DDP averaged the gradients over ranks: they must equal the single-process gradients
            torch.testing.assert_close(got[key], value, msg=lambda m, r=rank, k=key: f"rank {r} {k}: {m}")


def test_local_gather_without_process_group_is_identity() -> None:
    from negtransfer_losses.distributed import gather_batch

    x = torch.randn(3, 2)
    assert gather_batch(x, "global") is x
    with pytest.raises(ValueError, match=r"'gather' must be one of 'local', 'global'"):
        gather_batch(x, "all")  # type: ignore[arg-type]
