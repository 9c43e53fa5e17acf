"""gather="global" for linear kernels in feature space: 2 processes (gloo, CPU) exchange the sums (`XᵀY`, `Xᵀ1`,
..., and per task class for the conditional forms, whose labels travel), never the features, and give the
single-process values and gradients on the concatenated batch."""

from __future__ import annotations

import tempfile
from pathlib import Path

import global_sums_worker
import pytest
import torch
import torch.multiprocessing as mp
from helpers import conditional_data, value_and_grads

import negtransfer_losses.functional as ntf
from negtransfer_losses.functional import suppression
from negtransfer_losses.functional.similarity import linear_across_ranks


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, dict[str, torch.Tensor]]]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(global_sums_worker.run_rank, args=(2, f"{tmp}/init", tmp), nprocs=2, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(global_sums_worker.losses("local")))
def test_all_reduced_sums_equal_single_process_on_the_whole_batch(
    two_ranks: list[dict[str, dict[str, torch.Tensor]]], name: str
) -> None:
    expected = global_sums_worker.single_process()[name]
    assert expected["body.0.weight"].abs().max() > 1e-6  # a zero gradient would prove nothing
    for rank, results in enumerate(two_ranks):
        got = results[name]
        assert got["gathers"].item() == 0, f"rank {rank}: the batch was gathered"
        torch.testing.assert_close(got["loss"], expected["loss"], rtol=1e-10, atol=1e-14)
        for key, value in expected.items():
            # DDP averaged the gradients over ranks: they must equal the single-process gradients
            torch.testing.assert_close(
                got[key], value, rtol=1e-9, atol=1e-14, msg=lambda m, r=rank, k=key: f"rank {r} {k}: {m}"
            )


@pytest.mark.parametrize("measure", ["hsic", "alignment", "linear_cka"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_the_sums_alone_give_the_local_estimates(measure: str, unbiased: bool) -> None:
    """Without a process group the all-reduce path is the local estimate (sums of one rank)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64) + 4.0
    y = torch.randn(20, 3, generator=g, dtype=torch.float64) + 0.5 * x[:, :1]
    value = linear_across_ranks(x, y, unbiased=unbiased, measure=measure, gather="local")  # type: ignore[arg-type]
    if measure == "hsic":
        expected = ntf.hsic(x, y, unbiased=unbiased)
    elif measure == "alignment":
        expected = ntf.cka(x, y, unbiased=unbiased)
    else:  # linear_cka's biased ratio (its unbiased form is the "alignment")
        expected = ntf.linear_cka(x, y)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=0.0)
    members = torch.ones(20, dtype=torch.bool)
    members[[2, 7]] = False
    masked = linear_across_ranks(x, y, unbiased=unbiased, measure=measure, gather="local", members=members)  # type: ignore[arg-type]
    expected_masked = linear_across_ranks(x[members], y[members], unbiased=unbiased, measure=measure, gather="local")  # type: ignore[arg-type]
    torch.testing.assert_close(masked, expected_masked, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_the_class_sums_alone_give_the_local_conditional_estimates(unbiased: bool, scale: float) -> None:
    """Without a process group the per-class sums (what `gather="global"` all-reduces) give the conditional HSIC
    of the per-sample form, `_conditional_linear_hsic` (values and gradients, float64)."""
    z, u, y = conditional_data()
    u[[6, 12]] = 1
    minimum = 4 if unbiased else 2
    for task in (y, torch.where(y >= 0, y * 1_000_003 + 7, y)):
        (value, (grad,)), (expected, (expected_grad,)) = (
            value_and_grads(
                lambda f: suppression._conditional_hsic_in_slots(
                    f, u, task, 3, -100, minimum, unbiased, False, "local"
                ),
                scale * (z + 2.0),
            ),
            value_and_grads(
                lambda f: suppression._conditional_linear_hsic(f, u, task, 3, -100, minimum, unbiased),
                scale * (z + 2.0),
            ),
        )
        assert expected.item() != 0.0
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=0.0)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10 * float(expected_grad.abs().max()))
