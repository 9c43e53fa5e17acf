"""`negtransfer_losses.diagnostics`: linear probes per layer and minibatch CKA maps."""

from __future__ import annotations

import oracles
import pytest
import torch
from torch import nn

import negtransfer_losses.diagnostics as ntd
import negtransfer_losses.functional as ntf


def planted(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs whose dims 0-1 carry a 4-class factor u (well separated); `noise` labels are independent."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, 4, (n,), generator=g)
    noise = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 8, generator=g)
    x[:, :2] += 4.0 * torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])[u]
    return x, u, noise


def net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 6))


def test_probe_reads_a_planted_factor_and_not_noise() -> None:
    x, u, noise = planted()
    model = net().train()
    factor = ntd.probe_layers(model, ["0", "2"], x, u)
    chance = ntd.probe_layers(model, ["0", "2"], x, noise)
    assert list(factor) == ["0", "2"]
    assert min(factor.values()) > 0.95
    assert max(chance.values()) < 0.40  # chance is 0.25
    assert model.training  # the mode is restored
    assert not model[0]._forward_hooks  # the tap is removed


def test_probe_is_deterministic_and_takes_batches_of_pairs() -> None:
    x, u, _ = planted(200)
    model = net()
    first = ntd.probe_layers(model, "0", x, u, seed=3)
    assert first == ntd.probe_layers(model, "0", x, u, seed=3)
    loader = [(x[i : i + 50], u[i : i + 50]) for i in range(0, 200, 50)]
    assert ntd.probe_layers(model, "0", loader, seed=3) == first
    unknown = u.clone()
    unknown[:100] = -100
    assert 0.9 < ntd.probe_layers(model, "0", x, unknown)["0"] <= 1.0
    with pytest.raises(ValueError, match=r"'labels' has 199 entries but the inputs hold 200 samples"):
        ntd.probe_layers(model, "0", x, u[:199])
    with pytest.raises(ValueError, match=r"every batch must be an \(inputs, labels\) pair"):
        ntd.probe_layers(model, "0", x)


def minibatch_cka_oracle(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """Σ_b HSIC_1(K_b, L_b) / sqrt(Σ_b HSIC_1(K_b, K_b) Σ_b HSIC_1(L_b, L_b)) with the float64 oracles."""
    cross = sum(
        oracles.hsic_unbiased(oracles.linear_kernel(a), oracles.linear_kernel(b)) for a, b in zip(xs, ys, strict=True)
    )
    self_x = sum(oracles.hsic_unbiased(oracles.linear_kernel(a), oracles.linear_kernel(a)) for a in xs)
    self_y = sum(oracles.hsic_unbiased(oracles.linear_kernel(b), oracles.linear_kernel(b)) for b in ys)
    return cross / torch.sqrt(self_x * self_y)  # type: ignore[operator]


def test_minibatch_cka_matches_its_formula_and_the_full_batch_value() -> None:
    x, _, _ = planted(92)
    x = x.double()
    a, b = net(0).double(), net(1).double()
    with torch.no_grad():
        feats_a = {"0": a[0](x), "2": a(x)}
        feats_b = {"1": torch.tanh(b[0](x)), "2": b(x)}
    # one batch: exactly the unbiased linear CKA of the whole set
    single = ntd.layer_similarity(a, b, x, layers_a=["0", "2"], layers_b=["1", "2"], batch_size=92)
    assert (single.layers_a, single.layers_b) == (["0", "2"], ["1", "2"])
    for i, la in enumerate(single.layers_a):
        for j, lb in enumerate(single.layers_b):
            expected = ntf.cka(feats_a[la], feats_b[lb], unbiased=True)
            torch.testing.assert_close(single.matrix[i, j], expected, rtol=1e-10, atol=1e-12)
    # several batches (the last one of 2 samples is skipped): the minibatch estimator, batch by batch
    several = ntd.layer_similarity(a, b, x, layers_a=["0", "2"], layers_b=["1", "2"], batch_size=30)
    for i, la in enumerate(several.layers_a):
        for j, lb in enumerate(several.layers_b):
            xs = [feats_a[la][k : k + 30] for k in range(0, 90, 30)]
            ys = [feats_b[lb][k : k + 30] for k in range(0, 90, 30)]
            torch.testing.assert_close(several.matrix[i, j], minibatch_cka_oracle(xs, ys), rtol=1e-10, atol=1e-12)
            assert abs(several.matrix[i, j] - single.matrix[i, j]) < 0.1  # and close to the full-batch value


def test_similarity_of_a_model_with_itself_has_a_unit_diagonal() -> None:
    x, _, _ = planted(200)
    model = net()
    batches = [x[i : i + 40] for i in range(0, 200, 40)]  # an iterable of batches
    same = ntd.layer_similarity(model, model, batches, layers_a=["0", "1", "2"], layers_b=["0", "1", "2"])
    torch.testing.assert_close(torch.diagonal(same.matrix), torch.ones(3, dtype=torch.float64), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(same.matrix, same.matrix.T, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"at least one batch of 4 or more samples"):
        ntd.layer_similarity(model, model, x[:3], layers_a="0", layers_b="0")


def test_plots_draw_the_results() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    x, u, noise = planted(200)
    model = net()
    probes = {"u": ntd.probe_layers(model, ["0", "2"], x, u), "noise": ntd.probe_layers(model, ["0", "2"], x, noise)}
    ax = ntd.plot_probes(probes, chance=0.25, title="probes")
    assert len(ax.patches) == 4 and ax.get_title() == "probes"
    similarity = ntd.layer_similarity(model, net(1), x, layers_a=["0", "2"], layers_b=["0", "2"])
    ax = ntd.plot_similarity(similarity, labels=("student", "colour network"))
    assert len(ax.texts) == 4 and ax.get_xlabel() == "colour network"
