"""`BiasTwin` against what it promises: LfF's weights (a float64 oracle written from the authors' algorithm), the
twin's own step (torch.optim.Adam on the GCE), its features and pseudo-labels from one forward, and hostile input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import checks_deferred_on_cpu
from torch import Tensor, nn

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf

N, B, D, K = 20, 8, 5, 3


def mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, K)).to(dtype)


def batches(steps: int, dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor, Tensor]]:
    """`(x, y, indices)` per step: indices drawn from [0, N) (some seen several times), one unknown label."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        indices = torch.randperm(N, generator=g)[:B]
        y = (indices % K).clone()
        x = torch.randn(B, D, generator=g, dtype=dtype) + torch.eye(K, D, dtype=dtype)[y]
        y[0] = -100
        out.append((x, y, indices))
    return out


class LfFOracle:
    """LfF's weights as the authors' train.py and util.EMA compute them, in float64 with loops over samples."""

    def __init__(self, momentum: float) -> None:
        self.alpha = 1.0 - momentum
        self.ema = {"twin": [0.0] * N, "main": [0.0] * N}
        self.updated = {"twin": [0] * N, "main": [0] * N}
        self.label = [-1] * N

    def step(self, twin_ce: list[float], main_ce: list[float], y: list[int], indices: list[int]) -> list[float]:
        for i, (index, label) in enumerate(zip(indices, y, strict=True)):
            if label == -100:
                continue
            self.label[index] = label
            for name, ce in (("twin", twin_ce), ("main", main_ce)):
                old = self.ema[name][index]
                self.ema[name][index] = self.alpha * old + (1 - self.alpha * self.updated[name][index]) * ce[i]
                self.updated[name][index] = 1
        weights = []
        for index, label in zip(indices, y, strict=True):
            if label == -100:
                weights.append(0.0)
                continue
            normalised = {}
            for name in ("twin", "main"):
                largest = max(self.ema[name][j] for j in range(N) if self.label[j] == label)
                normalised[name] = self.ema[name][index] / largest
            weights.append(normalised["twin"] / (normalised["twin"] + normalised["main"] + 1e-8))
        return weights


def per_sample_ce(logits: Tensor, y: Tensor) -> list[float]:
    return [
        0.0 if int(t) == -100 else float(-torch.log_softmax(row, 0)[int(t)]) for row, t in zip(logits, y, strict=True)
    ]


@pytest.mark.parametrize("momentum", [0.3, 1.0])
def test_weights_match_lffs_algorithm_and_the_twin_steps_as_adam_on_the_gce(momentum: float) -> None:
    twin = ntl.BiasTwin(mlp(), N, layers=["1"], momentum=momentum, lr=1e-2)
    main = mlp(seed=5)
    reference = mlp()  # the twin's copy, trained by torch.optim.Adam on the GCE
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    oracle = LfFOracle(momentum)
    for step, (x, y, indices) in enumerate(batches(6)):
        logits = main(x).detach()
        with torch.no_grad():
            expected_logits = reference(x)
            expected_features = reference[:2](x)
        out = twin(x, y, indices, logits)
        expected = oracle.step(
            per_sample_ce(expected_logits, y), per_sample_ce(logits, y), y.tolist(), indices.tolist()
        )
        assert out.weights is not None and out.weights.dtype == torch.float32
        torch.testing.assert_close(
            out.weights.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(out.features["1"], expected_features, rtol=1e-12, atol=1e-12)
        assert torch.equal(out.pseudo_labels, expected_logits.argmax(1))
        gce = ntf.generalized_cross_entropy(reference(x), y)
        torch.testing.assert_close(out.twin_loss.double(), gce.detach(), rtol=1e-6, atol=1e-7)
        adam.zero_grad()
        gce.backward()
        adam.step()
        for name, p in reference.named_parameters():
            torch.testing.assert_close(
                twin.twin.get_parameter(name), p.detach(), rtol=1e-12, atol=1e-14, msg=f"{step} {name}"
            )
    known = [i for _, y, idx in batches(6) for i, t in zip(idx.tolist(), y.tolist(), strict=True) if t != -100]
    assert int(twin.twin_optimizer.step) == 6 and twin.twin_seen.sum() == len(set(known))
    assert all(int(twin.sample_labels[i]) == i % K for i in known)


def test_without_logits_there_are_no_weights_and_the_main_average_stays() -> None:
    twin = ntl.BiasTwin(mlp, N)
    x, y, indices = batches(1)[0]
    out = twin(x, y, indices)
    assert out.weights is None and out.features == {} and not twin.main_seen.any() and twin.twin_seen.any()
    assert torch.equal(twin.sample_pseudo_labels[indices[1:]], out.pseudo_labels[1:])
    assert int(twin.sample_pseudo_labels[indices[0]]) == -1  # unknown label: not recorded


def test_eval_mode_only_reads() -> None:
    twin = ntl.BiasTwin(mlp(), N, layers=["0"])
    for x, y, indices in batches(2):
        twin(x, y, indices, torch.randn(B, K, dtype=torch.float64))
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    twin.eval()
    x, y, indices = batches(3)[2]
    out = twin(x, y, indices, torch.randn(B, K, dtype=torch.float64))
    assert out.weights is not None and out.features["0"].shape == (B, 6)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in before.items())


def test_a_frozen_twin_only_reads_in_training_mode_until_unfrozen() -> None:
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, K)).double()

    twin, reader = ntl.BiasTwin(net, N, layers=["2"]), ntl.BiasTwin(net, N, layers=["2"])
    for x, y, indices in batches(2):
        logits = torch.randn(B, K, dtype=torch.float64)
        twin(x, y, indices, logits)
        reader(x, y, indices, logits)
    assert twin.freeze() is twin and twin.frozen and twin.training and not twin.twin.training
    twin.train()  # a parent's train() does not unfreeze it: its network stays in eval mode (BatchNorm too)
    assert twin.frozen and not twin.twin.training
    before = {k: v.clone() for k, v in twin.state_dict().items()}
    reader.eval()
    x, y, indices = batches(3)[2]
    logits = torch.randn(B, K, dtype=torch.float64)
    out, read = twin(x, y, indices, logits), reader(x, y, indices, logits)
    assert all(torch.equal(v, twin.state_dict()[k]) for k, v in before.items() if k != "frozen_flag")
    assert torch.equal(out.pseudo_labels, read.pseudo_labels) and torch.equal(out.features["2"], read.features["2"])
    assert out.weights is not None and read.weights is not None and torch.equal(out.weights, read.weights)
    assert "frozen=True" in repr(twin)
    twin.freeze(False)
    twin(x, y, indices, logits)
    assert twin.twin.training and int(twin.twin_optimizer.step) == 3


def test_a_frozen_twin_reads_in_eval_mode_whatever_set_its_layers_modes() -> None:
    """A parent-first `modules()` loop sets the twin's layers back to training after `BiasTwin.train()` ran: the
    frozen call still reads in eval mode (BatchNorm's running statistics, not the batch's, and left as they are)."""

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, K)).double()

    twin = ntl.BiasTwin(net, N)
    for x, y, indices in batches(2):
        twin(x, y, indices)
    twin.freeze()
    reference = twin.twin[1].running_mean.clone(), int(twin.twin[1].num_batches_tracked)
    x, y, indices = batches(3)[2]
    expected = twin(x, y, indices).pseudo_labels
    parent = nn.ModuleDict({"twin": twin})
    for module in parent.modules():
        module.train()
    assert twin.twin[1].training
    twin(x * 3.0 + 1.0, y, indices)  # in training mode, this batch's statistics would move the running ones
    assert torch.equal(twin.twin[1].running_mean, reference[0])
    assert int(twin.twin[1].num_batches_tracked) == reference[1] and not twin.twin[1].training
    assert torch.equal(twin(x, y, indices).pseudo_labels, expected)
    twin.twin[1].train()  # a load that leaves the frozen state as it is leaves the layers' modes too
    twin.load_state_dict(twin.state_dict())
    assert twin.twin[1].training


def test_frozen_or_not_is_in_the_state_dict() -> None:
    twin = ntl.BiasTwin(mlp, N)
    twin(*batches(1)[0])
    state = twin.freeze().state_dict()
    assert bool(state["frozen_flag"])
    resumed = ntl.BiasTwin(mlp, N)
    resumed.load_state_dict(state)
    assert resumed.frozen and not resumed.twin.training
    resumed(*batches(2)[1])
    assert int(resumed.twin_optimizer.step) == 1  # read only: the step count is the saved one
    resumed.load_state_dict(ntl.BiasTwin(mlp, N).state_dict())
    assert not resumed.frozen and resumed.twin.training
    with pytest.raises(TypeError, match=r"'frozen' must be a bool, got int"):
        twin.freeze(1)  # type: ignore[arg-type]
    older = {k: v for k, v in ntl.BiasTwin(mlp, N).state_dict().items() if k != "frozen_flag"}
    resumed.freeze().load_state_dict(older)  # a checkpoint from before freeze() existed: never frozen
    assert not resumed.frozen


def test_the_twin_is_out_of_your_optimizers_reach() -> None:
    source = mlp()
    twin = ntl.BiasTwin(source, N, layers="2")
    assert all(p.requires_grad for p in source.parameters())  # the copy, not your model, is frozen
    assert not any(p.requires_grad for p in twin.parameters())
    x, y, indices = batches(1)[0]
    out = twin(x, y, indices, source(x))
    assert not out.features["2"].requires_grad and out.weights is not None and not out.weights.requires_grad


def test_batchnorm_statistics_move_as_in_a_training_forward_and_a_skipped_batch_leaves_them() -> None:
    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(D, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, K)).double()

    twin, plain = ntl.BiasTwin(net, N, nan_policy="skip"), net()
    x, y, indices = batches(1)[0]
    twin(x, y, indices)
    plain(x)
    torch.testing.assert_close(twin.twin[1].running_mean, plain[1].running_mean)
    assert int(twin.twin[1].num_batches_tracked) == 1
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    bad = x.clone()
    bad[2, 1] = math.nan
    out = twin(bad, y, indices, torch.randn(B, K, dtype=torch.float64))
    assert out.weights is not None and not out.weights.any()
    for key, value in state.items():
        if key != "twin.1.num_batches_tracked":
            assert torch.equal(value, twin.state_dict()[key]), key


def test_non_finite_logits_raise_naming_them() -> None:
    twin = ntl.BiasTwin(lambda: nn.Sequential(nn.Linear(D, 6), nn.BatchNorm1d(6), nn.Linear(6, K)).double(), N)
    x, y, indices = batches(1)[0]
    state = {k: v.clone() for k, v in twin.state_dict().items()}
    logits = torch.randn(B, K, dtype=torch.float64)
    logits[3, 0] = math.inf
    with pytest.raises(ValueError, match=r"'logits' contain NaN or inf"):
        twin(x, y, indices, logits)
    bad = x.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"'twin logits' contain NaN or inf"):
        twin(bad, y, indices)
    with pytest.raises(ValueError, match=rf"'labels' holds {K}"):
        twin(x, torch.full((B,), K), indices)
    for key, value in state.items():  # nothing taken in, BatchNorm's statistics included
        if key != "twin.1.num_batches_tracked":
            assert torch.equal(value, twin.state_dict()[key]), key


def test_under_autocast_the_weights_are_float32() -> None:
    twin = ntl.BiasTwin(mlp(dtype=torch.float32), N, layers=["0"])
    x, y, indices = batches(1, torch.float32)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = twin(x, y, indices, mlp(seed=2, dtype=torch.float32)(x))
    assert out.weights is not None and out.weights.dtype == torch.float32 and out.twin_loss.dtype == torch.float32
    assert out.features["0"].dtype == torch.bfloat16 and torch.isfinite(out.weights).all()


def test_the_outputs_feed_the_librarys_losses_and_sampler() -> None:
    twin = ntl.BiasTwin(mlp(dtype=torch.float32), N, layers=["1"])
    student = mlp(seed=3, dtype=torch.float32)
    tap = ntl.FeatureTap(student, ["1"])
    for x, y, indices in batches(4, torch.float32):
        with tap:
            logits = student(x)
        features = tap.pop()["1"]
        out = twin(x, y, indices, logits)
        for loss in (
            ntl.AntiTransferLoss(aggregation="none", distance="cos")(features, out.features["1"]),
            ntl.CKASuppression()(features, out.features["1"]),
            ntl.HSICSuppression(K)(features, out.pseudo_labels),
        ):
            loss.backward(retain_graph=True)
            assert torch.isfinite(loss)
    sampler = ntl.GroupBalancedBatchSampler(twin.sample_labels, twin.sample_pseudo_labels, batch_size=12, seed=0)
    assert len(next(iter(sampler))) == 12


def test_a_module_with_hooks_is_refused_and_a_factory_accepted() -> None:
    model = mlp()
    with (
        ntl.FeatureTap(model, ["1"]),
        pytest.raises(ValueError, match=r"forward hooks \(on \['\(the model\)', '1'\]\).*Pass a function that builds"),
    ):
        ntl.BiasTwin(model, N)
    ntl.BiasTwin(model, N)  # the tap is gone


def hostile_cases() -> list[tuple[str, object, type[Exception], str]]:
    x, y, indices = batches(1)[0]
    logits = torch.randn(B, K, dtype=torch.float64)
    twin = ntl.BiasTwin(mlp(), N)
    return [
        ("index out of range", lambda: twin(x, y, torch.arange(B) + N - 2, logits), ValueError,
         rf"'indices' holds {N}, outside \[0, {N}\) for num_samples={N}"),
        ("negative index", lambda: twin(x, y, torch.arange(B) - 1, logits), ValueError, r"'indices' holds -1"),
        ("float index", lambda: twin(x, y, indices.float(), logits), TypeError,
         r"'indices' must hold integer dataset indices, got dtype torch.float32"),
        ("index shape", lambda: twin(x, y, indices[:3], logits), ValueError,
         rf"'indices' must have shape \({B},\) to match 'inputs' of batch {B}, got \(3,\)"),
        ("label shape", lambda: twin(x, y[:, None], indices, logits), ValueError,
         rf"'labels' must have shape \({B},\)"),
        ("float labels", lambda: twin(x, y.float(), indices, logits), TypeError, r"'labels' must hold integer"),
        ("label out of range", lambda: twin(x, torch.full((B,), K), indices, logits), ValueError,
         rf"'labels' holds {K}, outside \[0, {K}\)"),
        ("logits of another width", lambda: twin(x, y, indices, torch.randn(B, K + 1, dtype=torch.float64)),
         ValueError, rf"the twin must map 'inputs' to logits of shape \({B}, {K + 1}\).*got shape \({B}, {K}\)"),
        ("logits of another batch", lambda: twin(x, y, indices, logits[:2]), ValueError,
         rf"'logits' must have shape \({B}, K\) to match 'inputs' of batch {B}, got \(2, {K}\)"),
        ("twin output not logits", lambda: ntl.BiasTwin(lambda: nn.Linear(D, K).double(), N)(x[:, None], y, indices),
         ValueError, rf"logits of shape \({B}, K\) for 'labels' of shape \({B},\), got shape \({B}, 1, {K}\)"),
        ("num_samples 0", lambda: ntl.BiasTwin(mlp, 0), ValueError, r"'num_samples' must be the size"),
        ("num_samples float", lambda: ntl.BiasTwin(mlp, 20.0), ValueError, r"'num_samples'"),  # type: ignore[arg-type]
        ("q 0", lambda: ntl.BiasTwin(mlp, N, q=0.0), ValueError, r"'q' must be a number in \(0, 1\]"),
        ("momentum 0", lambda: ntl.BiasTwin(mlp, N, momentum=0.0), ValueError, r"'momentum' must be in \(0, 1\]"),
        ("lr", lambda: ntl.BiasTwin(mlp, N, lr=-1.0), ValueError, r"'lr' must be > 0"),
        ("nan_policy", lambda: ntl.BiasTwin(mlp, N, nan_policy="ignore"), ValueError, r"'nan_policy' must be one of"),  # type: ignore[arg-type]
        ("layer object", lambda: ntl.BiasTwin(mlp, N, layers=[nn.Tanh()]), TypeError, r"'layers' must be names"),  # type: ignore[list-item]
        ("unknown layer", lambda: ntl.BiasTwin(mlp, N, layers=["fc9"]), ValueError, r"unknown layer"),
        ("not a module", lambda: ntl.BiasTwin(3, N), TypeError, r"'twin' must be an nn.Module or a function"),  # type: ignore[arg-type]
        ("factory of no module", lambda: ntl.BiasTwin(lambda: 3, N), TypeError, r"returned int, not an nn.Module"),  # type: ignore[arg-type,return-value]
        ("nothing to train", lambda: ntl.BiasTwin(mlp().requires_grad_(False), N), ValueError, r"nothing to train"),
    ]  # fmt: skip


@pytest.mark.parametrize(("name", "call", "error", "match"), hostile_cases(), ids=[c[0] for c in hostile_cases()])
def test_hostile_input_gets_a_clear_error(name: str, call: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()  # type: ignore[operator]


def test_an_index_out_of_range_is_reported_later_on_a_gpu_and_the_step_never_waits() -> None:
    twin = ntl.BiasTwin(mlp(), N)
    x, y, _ = batches(1)[0]
    with checks_deferred_on_cpu(complete=False) as events:
        twin(x, y, torch.arange(B) + N, torch.randn(B, K, dtype=torch.float64))  # no error yet, no wait
        assert events and not any(event.waits for event in events)
        for event in events:
            event.done = True
        with pytest.raises(ValueError, match=rf"'indices' holds {N}, outside"):
            ntl.raise_pending_errors()


class CountingNet(nn.Module):
    """An MLP that counts its forward passes."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        out: Tensor = self.body(x)
        return out


def test_one_forward_of_the_twin_per_call_and_a_copy_starts_from_your_weights() -> None:
    source = CountingNet()
    twin = ntl.BiasTwin(source, N, layers=["body.1"])
    assert twin.layers == ("body.1",) and "num_samples=20, layers=['body.1'], q=0.7, momentum=0.3" in repr(twin)
    copied = twin.twin
    assert isinstance(copied, CountingNet) and copied is not source
    for (name, p), q in zip(copied.named_parameters(), source.parameters(), strict=True):
        assert torch.equal(p, q), name
    for calls, (x, y, indices) in enumerate(batches(3), start=1):
        twin(x, y, indices, torch.randn(B, K, dtype=torch.float64))
        assert copied.calls == calls and source.calls == 0


def test_an_index_twice_in_a_batch_enters_with_the_mean_of_its_losses() -> None:
    twin = ntl.BiasTwin(mlp(), N)
    x, y, _ = batches(1)[0]
    y[0] = 1
    indices = torch.tensor([5, 5, 6, 7, 8, 9, 10, 11])
    y[1] = y[0]
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(twin.twin(x), y, reduction="none")
    main = torch.randn(B, K, dtype=torch.float64)
    twin(x, y, indices, main)
    main_ce = torch.nn.functional.cross_entropy(main, y, reduction="none")
    torch.testing.assert_close(twin.twin_loss_ema[5].double(), ce[:2].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(twin.main_loss_ema[5].double(), main_ce[:2].mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(twin.twin_loss_ema[6].double(), ce[2], rtol=1e-6, atol=1e-7)
