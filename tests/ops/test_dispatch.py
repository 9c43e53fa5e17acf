"""How `backend="auto"` decides (`ops.dispatch`): the prior on shapes only (meta tensors, so the paper's sizes
cost no memory), then the measurement, on CPU tensors through Triton's interpreter with an injected timer,
and injected wrong, slow and failing kernels."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import negtransfer_losses.functional as ntf
from negtransfer_losses import ops
from negtransfer_losses.ops import dispatch
from negtransfer_losses.ops.dispatch import KernelRejectedWarning, fused_wins

pytest.importorskip("triton", reason="the kernels need Triton: pip install 'negtransfer-losses[triton]'")


def maps(*shape: int, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(shape, dtype=dtype, device="meta"), torch.empty(shape, dtype=dtype, device="meta")


# --- the prior (the cost rule): which inputs are worth measuring ----------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "scope", "expected"),
    [
        ((30, 512, 8, 8), torch.bfloat16, "batch", True),  # the paper's setting: identity kernel, tensor cores
        ((30, 512, 8, 8), torch.float16, "batch", True),
        ((30, 512, 8, 8), torch.float32, "batch", True),  # launch-bound: 8 launches against about 64
        ((64, 256, 28, 28), torch.float32, "batch", False),  # m N² = 10¹⁰: same float32 arithmetic
        ((64, 256, 28, 28), torch.bfloat16, "batch", True),  # N = 784 < m = 16,384
        ((64, 256, 28, 28), torch.bfloat16, "sample", False),  # N ≥ m: the tile kernel does more arithmetic
        ((64, 512, 4, 4), torch.bfloat16, "sample", True),  # N = 16 < m = 512, per sample
        ((2, 8, 2, 2), torch.bfloat16, "batch", True),  # fewer launches
        ((30, 512, 8, 8), torch.float64, "batch", False),
        ((0, 512, 8, 8), torch.bfloat16, "batch", False),
    ],
)
def test_gram_rule(shape: tuple[int, ...], dtype: torch.dtype, scope: str, expected: bool) -> None:
    assert fused_wins(f"gram_row_cosines/{scope}", *maps(*shape, dtype=dtype)) is expected


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ((64, 256, 28, 28), True),  # memory-bound: one read instead of about four
        ((2, 3, 4, 4), False),  # launch-bound
        ((4, 4096, 8, 8), False),  # 4 programs: most SMs idle
        ((0, 4, 8, 8), False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["aggregated_row_cosines", "aggregated_row_cosines/max"])
def test_channel_rule(shape: tuple[int, ...], expected: bool, dtype: torch.dtype, op: str) -> None:
    assert fused_wins(op, *maps(*shape, dtype=dtype)) is expected


def test_distribution_matching_rule() -> None:
    def heads(n: int, k: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.empty(n, k, device="meta"), torch.empty(n, m, device="meta")

    assert fused_wins("distribution_matching", *heads(256, 7, 17))
    assert fused_wins("distribution_matching/kl", *heads(65_536, 7, 17))
    assert not fused_wins("distribution_matching", *heads(256, 1000, 300))  # the tile would spill
    assert not fused_wins("unknown_op", *heads(256, 7, 17)) and not fused_wins("distribution_matching")


def test_candidates_are_cuda_tensors_of_a_fused_dtype_outside_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    big = torch.empty(30, 512, 8, 8, dtype=torch.bfloat16, device="meta")
    monkeypatch.delenv("NEGTRANSFER_BACKEND", raising=False)
    assert not dispatch.is_candidate("gram_row_cosines/batch", (big, big))  # not CUDA
    assert dispatch.resolve_backend("auto", "gram_row_cosines/batch", big, big) == "torch"
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert dispatch.triton_available()  # this module is skipped without Triton
    assert dispatch.is_candidate("gram_row_cosines/batch", (big, big))
    # a candidate without a decision yet: resolve_backend (which never measures) answers torch
    assert dispatch.resolve_backend("auto", "gram_row_cosines/batch", big, big) == "torch"
    wide = big.double()
    assert not dispatch.is_candidate("gram_row_cosines/batch", (wide, wide))
    with dispatch.default_dispatcher.override(compiling=lambda: True):
        assert not dispatch.is_candidate("gram_row_cosines/batch", (big, big))


# --- the measurement ------------------------------------------------------------------------------------


@dataclass
class Measured:
    """The injected timer's answers (milliseconds by path) and the paths it timed, in order."""

    timings: dict[str, float] = field(default_factory=lambda: {"torch": 1.0, "triton": 0.5})
    timed: list[str] = field(default_factory=list)

    def timer(self, kernel: Any, torch_path: Any, /, *, device: torch.device) -> tuple[float, float]:
        assert device.type == "cpu"
        for path, run in (("triton", kernel), ("torch", torch_path)):
            run()
            self.timed.append(path)
        return self.timings["triton"], self.timings["torch"]


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> Iterator[Measured]:
    """`auto` measuring CPU tensors in Triton's interpreter with an injected timer; decisions start empty."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("NEGTRANSFER_BACKEND", raising=False)
    monkeypatch.delenv(dispatch.CACHE_VARIABLE, raising=False)
    state = Measured()
    settings = {"cpu_candidates": True, "prior": lambda op, *tensors: True, "timer": state.timer}
    dispatch.forget_decisions()
    with dispatch.default_dispatcher.override(**settings):
        yield state
    dispatch.forget_decisions()


def student_and_reference(*shape: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g)
    return s.requires_grad_(True), 0.5 * s.detach() + torch.randn(*shape, generator=g)


def channel_cosines(s: Tensor, r: Tensor, backend: str = "auto") -> Tensor:
    return ops.aggregated_row_cosines(s, r, aggregation="mean", backend=backend)  # type: ignore[arg-type]


def test_a_faster_correct_kernel_is_kept_and_the_decision_is_made_once(measured: Measured) -> None:
    s, r = student_and_reference(3, 4, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelRejectedWarning)
        first = channel_cosines(s, r)
        again = channel_cosines(s, r)
    assert measured.timed == ["triton", "torch"]  # one measurement for the key
    (decision,) = dispatch.decisions().values()
    assert decision.backend == "triton" and "kernel 0.5 ms, torch 1 ms" in decision.reason
    assert dispatch.resolve_backend("auto", "aggregated_row_cosines/mean", s, r) == "triton"
    kernel = channel_cosines(s, r, backend="triton")
    assert torch.equal(first, kernel) and torch.equal(again, kernel)  # the kernel ran
    torch.testing.assert_close(first, ntf.aggregated_row_cosines(s, r, aggregation="mean"), rtol=1e-5, atol=1e-6)


def test_keys_are_op_dtype_shape_bucket_and_gradients(measured: Measured) -> None:
    s, r = student_and_reference(3, 4, 5, 6)
    channel_cosines(s, r)
    channel_cosines(*student_and_reference(3, 3, 7, 5, seed=1))  # the same bucket (4, 4, 8, 8): no measurement
    assert len(measured.timed) == 2
    channel_cosines(*student_and_reference(3, 4, 9, 6))  # another bucket
    with torch.no_grad():
        channel_cosines(s, r)  # no gradient needed: another key
    ops.aggregated_row_cosines(s, r, aggregation="max")  # another op variant
    channel_cosines(s.detach().half().requires_grad_(True), r.half())  # another dtype
    assert len(measured.timed) == 2 * 5 and len(dispatch.decisions()) == 5
    keys = sorted(dispatch.decisions())
    assert any("[4x4x8x8 4x4x8x8] grad" in k for k in keys) and any("no-grad" in k for k in keys)


class _WrongValue(torch.autograd.Function):
    """The torch path's cosines, 1 % off: a kernel whose value is wrong."""

    @staticmethod
    def forward(ctx: Any, s: Tensor, r: Tensor, aggregation: str, eps: float) -> Tensor:
        with torch.enable_grad():
            leaf = s.detach().requires_grad_(True)
            out = ntf.aggregated_row_cosines(leaf, r, aggregation=aggregation, eps=eps)  # type: ignore[arg-type]
        ctx.save_for_backward(leaf, out)
        return out.detach() * 1.01

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        leaf, out = ctx.saved_tensors
        (g,) = torch.autograd.grad(out, leaf, grad)
        return g * 1.01, None, None, None


class _WrongGradient(_WrongValue):
    """The right value, but a backward that forgets to multiply by the incoming gradient."""

    @staticmethod
    def forward(ctx: Any, s: Tensor, r: Tensor, aggregation: str, eps: float) -> Tensor:
        return _WrongValue.forward(ctx, s, r, aggregation, eps) / 1.01

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        leaf, out = ctx.saved_tensors
        (g,) = torch.autograd.grad(out, leaf, torch.ones_like(grad))
        return g, None, None, None


@pytest.mark.parametrize("wrong", [_WrongValue, _WrongGradient], ids=["value", "gradient"])
def test_a_wrong_kernel_is_never_kept_however_fast(
    measured: Measured, monkeypatch: pytest.MonkeyPatch, wrong: type[torch.autograd.Function]
) -> None:
    from negtransfer_losses.ops import _kernel_channel_cosine as channel_cosine

    monkeypatch.setattr(channel_cosine, "AggregatedRowCosines", wrong)
    measured.timings["triton"] = 0.01
    s, r = student_and_reference(3, 4, 5, 6)
    with pytest.warns(KernelRejectedWarning) as caught:
        value = channel_cosines(s, r)
    (message,) = [str(w.message) for w in caught]
    assert "aggregated_row_cosines/mean (float32, shape (3, 4, 5, 6), (3, 4, 5, 6))" in message
    assert "differs from the exact result by up to" in message and "rtol 1e-05, atol 1e-06" in message
    assert measured.timed == []  # refused before any timing
    assert torch.equal(value, channel_cosines(s, r, backend="torch"))  # the torch path ran
    assert dispatch.resolve_backend("auto", "aggregated_row_cosines/mean", s, r) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelRejectedWarning)  # one warning per key: no second one
        channel_cosines(s, r)


def test_a_slower_kernel_is_never_kept(measured: Measured) -> None:
    measured.timings.update(torch=1.0, triton=0.97)  # faster, but not by the 0.95 margin
    s, r = student_and_reference(3, 4, 5, 6)
    with pytest.warns(KernelRejectedWarning, match=r"not faster by the margin 0\.95 \(kernel 0\.97 ms, torch 1 ms"):
        value = channel_cosines(s, r)
    assert measured.timed == ["triton", "torch"]
    assert torch.equal(value, channel_cosines(s, r, backend="torch"))


def test_a_kernel_that_raises_is_not_kept(measured: Measured, monkeypatch: pytest.MonkeyPatch) -> None:
    from negtransfer_losses.ops import _kernel_channel_cosine as channel_cosine

    class Broken(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, *args: Any) -> Tensor:
            raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(channel_cosine, "AggregatedRowCosines", Broken)
    s, r = student_and_reference(3, 4, 5, 6)
    with pytest.warns(KernelRejectedWarning, match=r"float32, shape .*the kernel raised RuntimeError: PassManager"):
        value = channel_cosines(s, r)
    assert measured.timed == []
    assert torch.equal(value, channel_cosines(s, r, backend="torch"))


def test_gram_kernel_is_measured_on_its_own_key(measured: Measured) -> None:
    s, r = student_and_reference(2, 6, 3)
    value = ops.gram_row_cosines(s, r, gram_scope="batch")
    assert measured.timed == ["triton", "torch"]
    (key,) = dispatch.decisions()
    assert key.startswith("gram_row_cosines/batch float32,float32 cpu [2x8x4 2x8x4] grad")
    assert torch.equal(value, ops.gram_row_cosines(s, r, gram_scope="batch", backend="triton"))


def test_choose_keeps_a_kernel_that_rounds_like_the_torch_path(measured: Measured) -> None:
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(3), requires_grad=True)

    def torch_path(t: Tensor) -> Tensor:
        return (t * t).sum(dim=1)

    def rounded(t: Tensor) -> Tensor:  # the same sum in another order
        return (t * t).flip(1).cumsum(dim=1)[:, -1]

    def off(t: Tensor) -> Tensor:
        return torch_path(t) * (1 + 1e-4)

    choose = dispatch.default_dispatcher.choose
    assert choose("squares/rounded", "auto", (x,), torch_path=torch_path, kernel_path=rounded) == "triton"
    with pytest.warns(KernelRejectedWarning, match=r"squares/off \(float32, shape \(64, 33\)\)"):
        assert choose("squares/off", "auto", (x,), torch_path=torch_path, kernel_path=off) == "torch"


def test_a_kernel_that_raises_while_timed_is_not_kept(measured: Measured) -> None:
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(5), requires_grad=True)
    calls = []

    def torch_path(t: Tensor) -> Tensor:
        return t.square().sum(dim=1)

    def flaky(t: Tensor) -> Tensor:  # right the first time (checked), raises when timed
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("out of memory")
        return torch_path(t)

    dispatcher = dispatch.Dispatcher(dispatch.MeasureSettings(cpu_candidates=True, prior=lambda op, *t: True))
    with pytest.warns(KernelRejectedWarning, match=r"the kernel raised RuntimeError while timed: out of memory"):
        assert dispatcher.choose("squares/flaky", "auto", (x,), torch_path=torch_path, kernel_path=flaky) == "torch"
    assert measured.timed == [] and dispatch.decisions() == {}  # its own dispatcher: the default one is untouched


def test_the_decisions_are_bounded_the_least_recently_used_dropped_first(measured: Measured) -> None:
    settings = dispatch.MeasureSettings(cpu_candidates=True, prior=lambda op, *t: True, timer=measured.timer)
    dispatcher = dispatch.Dispatcher(settings, max_decisions=2)

    def choose(op: str) -> str:
        x = torch.ones(4, 2, requires_grad=True)
        return dispatcher.choose(op, "auto", (x,), torch_path=torch.square, kernel_path=torch.square)

    assert choose("a") == choose("b") == "triton"
    choose("a")  # "a" used again: "b" is now the least recently used
    choose("c")
    assert [key.split(" ")[0] for key in dispatcher.decisions()] == ["a", "c"]
    assert len(measured.timed) == 2 * 3
    choose("b")  # dropped: measured again
    assert len(measured.timed) == 2 * 4 and len(dispatcher.decisions()) == 2
    with pytest.raises(ValueError, match="'max_decisions' must be a positive int, got 0"):
        dispatch.Dispatcher(max_decisions=0)


def test_nothing_is_measured_inside_torch_compile(measured: Measured) -> None:
    s, r = student_and_reference(3, 4, 5, 6)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: channel_cosines(a, b).square().sum(), backend="aot_eager", fullgraph=True)
    value = compiled(s, r)
    assert measured.timed == [] and dispatch.decisions() == {}
    torch.testing.assert_close(value, channel_cosines(s, r, backend="torch").square().sum())


def test_nothing_is_measured_with_a_forced_backend(measured: Measured, monkeypatch: pytest.MonkeyPatch) -> None:
    s, r = student_and_reference(3, 4, 5, 6)
    channel_cosines(s, r, backend="torch")
    channel_cosines(s, r, backend="triton")
    monkeypatch.setenv("NEGTRANSFER_BACKEND", "torch")
    channel_cosines(s, r)
    monkeypatch.setenv("NEGTRANSFER_BACKEND", "triton")
    assert torch.equal(channel_cosines(s, r), channel_cosines(s, r, backend="triton"))
    assert measured.timed == [] and dispatch.decisions() == {}


def test_cuda_graph_capture_never_measures_but_keeps_a_decision(measured: Measured) -> None:
    s, r = student_and_reference(3, 4, 5, 6)
    dispatcher = dispatch.default_dispatcher
    with dispatcher.override(capturing=lambda *devices: True):
        assert dispatcher.choose("aggregated_row_cosines/mean", "auto", (s, r), torch_path=None, kernel_path=None) == (
            "torch"
        )
    assert measured.timed == [] and dispatch.decisions() == {}
    channel_cosines(s, r)  # measured outside the capture: the kernel wins
    with dispatcher.override(capturing=lambda *devices: True):
        assert dispatcher.choose("aggregated_row_cosines/mean", "auto", (s, r), torch_path=None, kernel_path=None) == (
            "triton"
        )
    assert len(measured.timed) == 2


def test_decisions_persist_in_the_opt_in_disk_cache(
    measured: Measured, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "dispatch.json"
    monkeypatch.setenv(dispatch.CACHE_VARIABLE, str(cache))
    s, r = student_and_reference(3, 4, 5, 6)
    channel_cosines(s, r)
    assert len(measured.timed) == 2
    stored = json.loads(cache.read_text())
    (entry,) = stored
    fingerprint = json.loads(entry)[0]
    assert fingerprint.startswith("cpu|negtransfer-losses ") and "|torch " in fingerprint and "|triton " in fingerprint
    assert stored[entry]["backend"] == "triton"
    dispatch.forget_decisions()  # a new process: read from the file, not measured again
    channel_cosines(s, r)
    assert len(measured.timed) == 2
    (decision,) = dispatch.decisions().values()
    assert decision.backend == "triton" and str(cache) in decision.reason


def test_time_path_takes_the_median_after_a_warm_up() -> None:
    calls = []
    milliseconds = dispatch.time_path(lambda: calls.append(1), device=torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and 0 <= milliseconds < 100


def test_distribution_matching_is_measured_per_divergence(measured: Measured) -> None:
    g = torch.Generator().manual_seed(4)
    za = torch.randn(6, 5, generator=g, requires_grad=True)
    zb = torch.randn(6, 7, generator=g, requires_grad=True)
    relatedness = torch.rand(5, 7, generator=g)
    terms = ops.distribution_matching(za, zb, relatedness)
    ops.distribution_matching(za, zb, relatedness, divergence="ce")
    ops.distribution_matching(za, zb, relatedness, divergence="ce")
    assert measured.timed == ["triton", "torch"] * 2
    keys = sorted(dispatch.decisions())
    assert [k.split(" ")[0] for k in keys] == ["distribution_matching/ce", "distribution_matching/kl"]
    expected = ops.distribution_matching(za, zb, relatedness, backend="triton")
    assert all(torch.equal(terms[k], expected[k]) for k in expected)
