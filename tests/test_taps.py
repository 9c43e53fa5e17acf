"""FeatureTap and FrozenReference on plain, DDP-wrapped, compiled and misbehaving models."""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

import negtransfer_losses as ntl
from negtransfer_losses.taps import resolve_layers


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class Net(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layer1 = nn.Sequential(Block(width), Block(width))
        self.layer2 = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class SharedTwice(nn.Module):
    """Runs `shared` twice per forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.shared(x) + 1.0)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, branch: str = "both") -> torch.Tensor:
        if branch == "a":
            return self.a(x)
        if branch == "b":
            return self.b(x)
        return self.b(self.a(x))


def x_batch(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def expected_layer1(model: Net, x: torch.Tensor) -> torch.Tensor:
    return model.layer1(model.stem(x))


# --- names ----------------------------------------------------------------------------------------


def test_names_globs_and_module_objects_resolve() -> None:
    model = Net()
    tap = ntl.FeatureTap(model, ["layer1", "layer2.*.conv", model.stem])
    assert tap.layers == ("layer1", "layer2.0.conv", "layer2.1.conv", "stem")
    tap.remove()


def test_unknown_name_lists_closest_existing_names() -> None:
    with pytest.raises(ValueError, match=r"unknown layer 'layer3'; closest existing names: 'layer2', 'layer1'"):
        ntl.FeatureTap(Net(), ["layer3"])
    with pytest.raises(ValueError, match=r"'layer9\*' matches no module"):
        ntl.FeatureTap(Net(), "layer9*")
    with pytest.raises(ValueError, match=r"not a submodule of the model"):
        ntl.FeatureTap(Net(), nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"'layers' entries must be module names"):
        ntl.FeatureTap(Net(), [3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"'layers' is empty"):
        ntl.FeatureTap(Net(), [])
    with pytest.raises(ValueError, match=r"'on_repeat' must be 'last' or 'all'"):
        ntl.FeatureTap(Net(), "stem", on_repeat="first")  # type: ignore[arg-type]


def test_features_are_the_layer_outputs_with_gradient() -> None:
    model, x = Net(), x_batch()
    with ntl.FeatureTap(model, ["layer1", "head"]) as tap:
        logits = model(x)
    feats = tap.pop()
    torch.testing.assert_close(feats["layer1"], expected_layer1(model, x))
    torch.testing.assert_close(feats["head"], logits)
    assert feats["layer1"].requires_grad
    feats["layer1"].sum().backward()
    assert model.stem.weight.grad is not None


def test_detach_option_stores_features_without_graph() -> None:
    model = Net()
    with ntl.FeatureTap(model, "layer1", detach=True) as tap:
        model(x_batch())
    assert not tap.pop()["layer1"].requires_grad


def test_transform_handles_non_tensor_outputs() -> None:
    model = nn.Sequential()
    model.add_module("rnn", nn.LSTM(3, 5, batch_first=True))
    with ntl.FeatureTap(model, "rnn", transform=lambda out: out[0]) as tap:
        model(torch.randn(2, 4, 3))
    assert tap.pop()["rnn"].shape == (2, 4, 5)


# --- lifecycle ------------------------------------------------------------------------------------


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_handles_are_removed_when_the_forward_raises() -> None:
    model = Net()
    with pytest.raises(RuntimeError, match="channels"), ntl.FeatureTap(model, ["layer1", "layer2"]):
        assert hook_count(model) == 3
        model(torch.randn(2, 5, 8, 8))  # wrong channel count: the stem raises
    assert hook_count(model) == 0


def test_a_dropped_tap_removes_its_hooks() -> None:
    model = Net()
    ntl.FeatureTap(model, ["layer1"])
    gc.collect()
    assert hook_count(model) == 0


def test_tap_is_reusable_across_with_blocks() -> None:
    model = Net()
    tap = ntl.FeatureTap(model, "layer1")
    for seed in range(3):
        with tap:
            model(x_batch(seed))
        assert hook_count(model) == 0
        torch.testing.assert_close(tap.pop()["layer1"], expected_layer1(model, x_batch(seed)))


def test_module_called_twice_keeps_last_or_all() -> None:
    model, x = SharedTwice(), torch.randn(4, 3)
    first = model.shared(x)
    second = model.shared(first + 1.0)
    with ntl.FeatureTap(model, "shared") as last, ntl.FeatureTap(model, "shared", on_repeat="all") as every:
        model(x)
    torch.testing.assert_close(last.pop()["shared"], second)
    both = every.pop()["shared"]
    assert len(both) == 2
    torch.testing.assert_close(both[0], first)
    torch.testing.assert_close(both[1], second)


def test_all_mode_starts_a_new_list_each_forward() -> None:
    model = SharedTwice()
    with ntl.FeatureTap(model, "shared", on_repeat="all") as tap:
        model(torch.randn(4, 3))
        model(torch.randn(4, 3))
    assert len(tap.pop()["shared"]) == 2


def test_layer_that_did_not_run_is_named_on_pop() -> None:
    model = Branchy()
    with ntl.FeatureTap(model, ["a", "b"]) as tap:
        model(torch.randn(2, 3), branch="a")
    with pytest.raises(ntl.MissingFeaturesError, match=r"'b' captured nothing"):
        tap.pop()


def test_second_pop_without_forward_raises() -> None:
    model = Branchy()
    with ntl.FeatureTap(model, "a") as tap:
        model(torch.randn(2, 3))
    tap.pop()
    with pytest.raises(ntl.MissingFeaturesError, match="pop\\(\\) was called twice"):
        tap.pop()


def test_stale_read_is_detected() -> None:
    model = Branchy()
    tap = ntl.FeatureTap(model, ["a", "b"])
    model(torch.randn(2, 3), branch="a")  # step 1: only `a` runs, nobody pops
    model(torch.randn(2, 3), branch="b")  # step 2: only `b` runs
    with pytest.raises(ntl.StaleFeaturesError, match=r"'a' \(forward #1\) did not run in the latest forward pass"):
        tap.pop()
    model(torch.randn(2, 3))
    assert set(tap.pop()) == {"a", "b"}  # recovers on the next full forward
    tap.remove()


def test_thousand_steps_do_not_grow_memory_or_hooks() -> None:
    model = Net(width=8)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tap = ntl.FeatureTap(model, ["layer1", "layer2"])
    x = torch.randn(4, 3, 16, 16)

    def step() -> None:
        logits = model(x)
        feats = tap.pop()
        loss = logits.square().mean() + sum(f.square().mean() for f in feats.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(50):
        step()
    gc.collect()
    before = _rss_bytes()
    for _ in range(1000):
        step()
    gc.collect()
    growth = _rss_bytes() - before
    assert hook_count(model) == 3
    assert not tap.holds_features
    assert growth < 20 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 1,000 steps"
    tap.remove()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --- wrappers -------------------------------------------------------------------------------------


@pytest.fixture
def process_group() -> Iterator[None]:
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


@pytest.mark.parametrize("name", ["layer1", "module.layer1"])
def test_tap_through_distributed_data_parallel(process_group: None, name: str) -> None:
    model = Net()
    ddp = nn.parallel.DistributedDataParallel(model)
    x = x_batch()
    with ntl.FeatureTap(ddp, [name]) as tap:
        out = ddp(x)
    feats = tap.pop()
    torch.testing.assert_close(feats["layer1"], expected_layer1(model, x))
    (out.sum() + feats["layer1"].sum()).backward()
    assert model.stem.weight.grad is not None


def test_tap_through_data_parallel() -> None:
    model = Net()
    with ntl.FeatureTap(nn.DataParallel(model), "module.layer1.0") as tap:
        nn.DataParallel(model)(x_batch())
    assert tap.layers == ("layer1.0",)
    assert tap.pop()["layer1.0"].shape == (2, 4, 8, 8)


@pytest.mark.slow
def test_tap_on_a_compiled_model_matches_eager_and_detects_stale_reads() -> None:
    torch._dynamo.reset()
    model = Net()
    compiled = torch.compile(model)
    tap = ntl.FeatureTap(compiled, ["_orig_mod.layer1", "layer2.0"])
    assert tap.layers == ("layer1", "layer2.0")
    for seed in range(3):
        x = x_batch(seed)
        compiled(x)
        feats = tap.pop()
        torch.testing.assert_close(feats["layer1"], expected_layer1(model, x))
        assert feats["layer1"].requires_grad
    with pytest.raises(ntl.MissingFeaturesError):
        tap.pop()
    tap.remove()

    branchy = Branchy()
    compiled_branchy = torch.compile(branchy)
    tap = ntl.FeatureTap(compiled_branchy, ["a", "b"])
    compiled_branchy(torch.randn(2, 3), branch="a")
    compiled_branchy(torch.randn(2, 3), branch="b")
    with pytest.raises(ntl.StaleFeaturesError):
        tap.pop()
    tap.remove()


def test_same_names_resolve_wrapped_or_not() -> None:
    model = Net()
    plain = resolve_layers(model, ["layer1.0.conv"])
    assert resolve_layers(nn.DataParallel(model), ["module.layer1.0.conv"]) == plain
    assert resolve_layers(torch.compile(model), ["_orig_mod.layer1.0.conv"]) == plain
    assert resolve_layers(torch.compile(nn.DataParallel(model)), ["layer1.0.conv"]) == plain


# --- FrozenReference ------------------------------------------------------------------------------


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def test_frozen_reference_returns_features_without_gradient_and_stops_early() -> None:
    net = Net()
    net.layer2.add_module("counter", Counting())
    frozen = ntl.FrozenReference(net, ["layer1", "stem"])
    x = x_batch()
    for _ in range(3):
        ref = frozen(x)
        assert set(ref) == {"layer1", "stem"}
        torch.testing.assert_close(ref["layer1"], expected_layer1(net, x))
        assert not ref["layer1"].requires_grad and ref["layer1"].grad_fn is None
    assert net.layer2.counter.calls == 0  # not even the first call runs past the deepest requested layer
    assert all(not p.requires_grad for p in net.parameters())


def test_frozen_reference_without_early_stop_runs_everything() -> None:
    net = Net()
    net.layer2.add_module("counter", Counting())
    frozen = ntl.FrozenReference(net, "layer1", stop_early=False)
    frozen(x_batch())
    frozen(x_batch())
    assert net.layer2.counter.calls == 2


def test_frozen_reference_stays_in_eval_mode_under_a_training_parent() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.BatchNorm1d(3), nn.Linear(3, 3))
    parent = nn.Module()
    parent.reference = ntl.FrozenReference(net, "2")
    parent.train()
    assert parent.reference.training and not any(m.training for m in net.modules())
    net.train()  # even when the user flips the inner model, the forward runs it in eval mode
    x = torch.randn(8, 3)
    torch.testing.assert_close(parent.reference(x)["2"], parent.reference(x)["2"])
    assert not any(m.training for m in net.modules())


def test_frozen_reference_keeps_the_last_call_of_a_repeated_layer() -> None:
    model = SharedTwice()
    frozen = ntl.FrozenReference(model, "shared", calls_per_pass={"shared": 2})
    x = torch.randn(4, 3)
    expected = model.shared(model.shared(x) + 1.0)
    torch.testing.assert_close(frozen(x)["shared"], expected)
    torch.testing.assert_close(frozen(x)["shared"], expected)
    assert "calls_per_pass={'shared': 2}" in repr(frozen)


def test_frozen_reference_detects_call_counts_that_differ_from_the_declared_ones() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"'shared' ran 2 time\(s\), expected 1; pass calls_per_pass"):
        ntl.FrozenReference(SharedTwice(), "shared", stop_early=False)(x)
    with pytest.raises(ValueError, match=r"'shared' ran 2 time\(s\), expected 3"):
        ntl.FrozenReference(SharedTwice(), "shared", stop_early=False, calls_per_pass=3)(x)
    two = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"'0' ran 1 time\(s\), expected 2"):  # the stop never came
        ntl.FrozenReference(two, ["0", "1"], calls_per_pass={"0": 2})(x)
    with pytest.raises(ValueError, match=r"'calls_per_pass' names layer\(s\) \['other'\]"):
        ntl.FrozenReference(SharedTwice(), "shared", calls_per_pass={"other": 2})
    with pytest.raises(ValueError, match=r"'calls_per_pass' must be whole numbers ≥ 1, got 0"):
        ntl.FrozenReference(SharedTwice(), "shared", calls_per_pass=0)


def test_frozen_reference_never_runs_a_failing_head_past_the_deepest_layer() -> None:
    class FailingHead(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the head must not run")

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), FailingHead())
    x = torch.randn(2, 3)
    ref = ntl.FrozenReference(model, "1")(x)  # the first call too
    torch.testing.assert_close(ref["1"], torch.relu(model[0](x)))
    with pytest.raises(RuntimeError, match="the head must not run"):
        ntl.FrozenReference(model, "1", stop_early=False)(torch.randn(2, 3))


def test_stop_forward_after_is_the_public_way_to_end_a_pass_early() -> None:
    net = Net()
    net.layer2.add_module("counter", Counting())
    x = x_batch()
    with ntl.FeatureTap(net, ["stem", "layer1"], on_repeat="all", detach=True) as tap:
        with torch.no_grad(), tap.stop_forward_after({"layer1": 1}) as run:
            net(x)
            pytest.fail("the block goes on after the model call only when the pass ran to its end")
        assert run.stopped and tap.call_counts() == {"stem": 1, "layer1": 1} and net.layer2.counter.calls == 0
        tap.clear()
        with tap.stop_forward_after(None) as whole:
            net(x)
        assert not whole.stopped and net.layer2.counter.calls == 1
        tap.clear()
        net(x)  # the stop is disarmed after the block
        assert net.layer2.counter.calls == 2
        with (
            pytest.raises(ValueError, match=r"untapped layer\(s\) \['layer2'\]"),
            tap.stop_forward_after({"layer2": 1}),
        ):
            pass
        with pytest.raises(ValueError, match=r"counts \{'stem': 0\} below 1"), tap.stop_forward_after({"stem": 0}):
            pass


def test_frozen_reference_uses_only_the_taps_public_interface() -> None:
    import ast
    import inspect

    from negtransfer_losses.taps import FrozenReference

    tree = ast.parse(inspect.getsource(FrozenReference).strip())
    private = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "_tap"
        and node.attr.startswith("_")
    }
    assert private == set(), f"FrozenReference reaches into the tap's private members {private}"
