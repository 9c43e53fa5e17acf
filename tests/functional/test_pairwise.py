"""`pairwise` and `stochastic_pairwise` in closed form against a float64 transcription of the authors'
materialized rows (every student channel repeated beside every reference channel, `C²·N` values a sample)."""

from __future__ import annotations

import oracles
import pytest
import torch
from helpers import assert_matches_oracle, value_and_grads

import negtransfer_losses.functional as ntf
from negtransfer_losses.functional.pairwise import stochastic_window


def materialized_rows(s: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`a_b = [S_1 ×C, S_2 ×C, …]`, `b_b = [R_1, …, R_C] ×C`: one `(C·C·N)` row per sample, by loops."""
    batch, channels = s.shape[0], s.shape[1]
    s3, r3 = s.reshape(batch, channels, -1), r.reshape(batch, channels, -1)
    rows_a, rows_b = [], []
    for k in range(batch):
        a_parts, b_parts = [], []
        for i in range(channels):
            for j in range(channels):
                a_parts.append(s3[k, i])
                b_parts.append(r3[k, j])
        rows_a.append(torch.cat(a_parts))
        rows_b.append(torch.cat(b_parts))
    return torch.stack(rows_a), torch.stack(rows_b)


def pairwise_oracle(s: torch.Tensor, r: torch.Tensor, distance: str) -> torch.Tensor:
    a, b = materialized_rows(s.double(), r.double().detach())
    if distance == "cka":
        return oracles.linear_cka_feature_space(a, b)
    if distance == "mse_sigmoid":
        return -torch.sigmoid(((a - b) ** 2).mean())
    mean_abs = oracles.cosine_rows(a, b, 1e-8).abs().mean()
    return mean_abs**2 if distance == "cos_squared" else mean_abs


def maps(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g, dtype=torch.float64)
    return s, torch.randn(*shape, generator=g, dtype=torch.float64) + 0.5 * s + 0.3


@pytest.mark.parametrize("distance", ["cos_squared", "cos", "mse_sigmoid", "cka"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 2), (4, 3, 7), (2, 5, 1, 1)], ids=["map", "audio", "1x1"])
def test_pairwise_matches_the_materialized_rows(distance: str, shape: tuple[int, ...]) -> None:
    s, r = maps(*shape)
    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(a, b, aggregation="pairwise", distance=distance),  # type: ignore[arg-type]
        lambda a, b: pairwise_oracle(a, b, distance),
        s,
        r,
        rtol=1e-9,
        atol=1e-10,
    )


def test_eps_floors_the_materialized_rows_norms_in_the_inputs_units() -> None:
    """Maps of magnitude ~1e3 are scaled by 2^-10 inside; `eps` still floors `|a_b|`, `|b_b|` of the unscaled
    rows: with `eps` between the middle ones of the student's row norms, half the rows are floored, as in
    the oracle."""
    s, r = maps(4, 3, 5)
    s, r = 1e3 * s * torch.logspace(-3, 0, 4, dtype=torch.float64)[:, None, None], 1e3 * r
    norms = torch.linalg.vector_norm(materialized_rows(s, r)[0], dim=1).sort().values
    eps = float((norms[1] * norms[2]).sqrt())  # two rows below, two above

    def oracle(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rows_a, rows_b = materialized_rows(a.double(), b.double().detach())
        return oracles.cosine_rows(rows_a, rows_b, eps).abs().mean()

    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(a, b, aggregation="pairwise", distance="cos", eps=eps), oracle, s, r
    )


@pytest.mark.parametrize("distance", ["cos_squared", "mse_sigmoid", "cka"])
def test_stochastic_pairwise_is_pairwise_on_a_seeded_window(distance: str) -> None:
    s, r = maps(3, 10, 4)
    window = stochastic_window(10, 3, torch.Generator().manual_seed(7))
    assert window.stop - window.start == 10 // 3
    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(
            a,
            b,
            aggregation="stochastic_pairwise",
            distance=distance,  # type: ignore[arg-type]
            generator=torch.Generator().manual_seed(7),
        ),
        lambda a, b: pairwise_oracle(a[:, window], b[:, window], distance),
        s,
        r,
    )


def test_stochastic_window_is_reproducible_under_a_seed_and_covers_every_start() -> None:
    torch.manual_seed(0)
    first = [stochastic_window(8, 3, None) for _ in range(50)]
    torch.manual_seed(0)
    assert [stochastic_window(8, 3, None) for _ in range(50)] == first
    assert {w.start for w in first} == set(range(8 - 2 + 1))  # q = 8 // 3 = 2; the last start included
    single = stochastic_window(8, 1, None)
    assert single.stop - single.start == 1  # B = 1: the authors' q = 1
    narrow = stochastic_window(3, 8, None)
    assert narrow.stop - narrow.start == 1  # C < B: one channel (the authors' q = C // B would be 0)


def test_zero_rows_give_a_finite_loss_and_gradient() -> None:
    """A zero sample: its materialized row is zero, its cosine 0 (the floored norm), and the loss and gradients
    are the oracle's; the zero sample's own gradient is 0 (`|s|` at `s = 0`)."""
    s, r = maps(2, 3, 4)
    s[0] = 0.0
    assert_matches_oracle(
        lambda a, b: ntf.anti_transfer(a, b, aggregation="pairwise", distance="cos_squared"),
        lambda a, b: pairwise_oracle(a, b, "cos_squared"),
        s,
        r,
    )
    value, (grad, _) = value_and_grads(
        lambda a, b: ntf.anti_transfer(a, b, aggregation="pairwise", distance="cos_squared"), s, r
    )
    assert value > 1e-4 and torch.equal(grad[0], torch.zeros_like(grad[0])) and grad[1].abs().sum() > 0


def test_pairwise_never_materializes_the_c_squared_rows() -> None:
    # C = 512, N = 64, B = 4: the materialized rows would hold 4·512²·64 = 67M float32 values (268 MB)
    s, r = torch.randn(4, 512, 8, 8), torch.randn(4, 512, 8, 8)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: _at_most(t, 4 * 512 * 64), lambda t: t):
        s.requires_grad_(True)
        ntf.anti_transfer(s, r, aggregation="pairwise", distance="cos_squared").backward()


def _at_most(t: torch.Tensor, numel: int) -> torch.Tensor:
    assert t.numel() <= numel, f"a saved tensor of {t.numel()} values: the rows were materialized"
    return t


def test_flat_features_are_rejected_for_pairwise() -> None:
    with pytest.raises(ValueError, match=r"aggregation='pairwise' over the 6 features of a 2-D 'student'"):
        ntf.anti_transfer(torch.randn(3, 6), torch.randn(3, 6), aggregation="pairwise")
