"""Feature taps: get intermediate features out of any model through forward hooks.

Every hook of the library is registered here. Layers are named as in `model.named_modules()` of the
bare model; the same names work through `DistributedDataParallel`/`DataParallel` (`module.`),
`torch.compile` (`_orig_mod.`), FSDP and activation-checkpoint wrappers.
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeAlias

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import Self

from ._validation import compiling

LayerSpec: TypeAlias = str | nn.Module
RepeatPolicy: TypeAlias = Literal["last", "all"]

_WRAPPER_ATTRIBUTES = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_GLOB_CHARACTERS = frozenset("*?[")


class StaleFeaturesError(RuntimeError):
    """Raised by `FeatureTap.pop()` when stored features come from an earlier forward pass than the latest."""


class MissingFeaturesError(RuntimeError):
    """Raised by `FeatureTap.pop()` when a tapped layer captured nothing since the last `pop()`."""


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once every requested layer has run."""


@dataclass
class ForwardRun:
    """What `FeatureTap.stop_forward_after` yields: `stopped` tells whether the forward pass was ended early."""

    stopped: bool = False


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside `DistributedDataParallel`, `DataParallel` and `torch.compile` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        compiled_inner = getattr(model, "_orig_mod", None)
        if not isinstance(compiled_inner, nn.Module):
            return model
        model = compiled_inner


def canonical_name(name: str) -> str:
    """A module name without the path components that wrappers insert (`_orig_mod`, FSDP, checkpoint)."""
    return ".".join(part for part in name.split(".") if part and part not in _WRAPPER_ATTRIBUTES)


def resolve_layers(model: nn.Module, layers: LayerSpec | Iterable[LayerSpec]) -> dict[str, nn.Module]:
    """Map each requested layer to `{canonical name: module}`, in request order.

    Accepts dotted names (`"layer3.1.conv2"`), glob patterns (`"layer*.0"`), and module objects, as a
    single spec or an iterable of them. Raises `ValueError` for unknown names (listing the closest
    existing ones), patterns matching nothing, and modules that are not part of `model`.
    """
    root = unwrap_model(model)
    by_name: dict[str, nn.Module] = {}
    names_by_id: dict[int, str] = {}
    for name, module in root.named_modules(remove_duplicate=False):
        by_name.setdefault(canonical_name(name), module)
        # every module, wrapped ones too (FSDP1 keeps the original under `_fsdp_wrapped_module`): found by object
        names_by_id.setdefault(id(module), canonical_name(name))

    specs: list[LayerSpec] = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    if not specs:
        raise ValueError("'layers' is empty: name at least one layer to tap")
    resolved: dict[str, nn.Module] = {}
    for spec in specs:
        for name in _names_for_spec(spec, by_name, names_by_id):
            if name == "":
                raise ValueError(
                    "tapping the whole model is not supported: its output is what the forward returns; "
                    "name a submodule instead"
                )
            resolved[name] = by_name[name]
    return resolved


def _names_for_spec(spec: LayerSpec, by_name: Mapping[str, nn.Module], names_by_id: Mapping[int, str]) -> list[str]:
    if isinstance(spec, nn.Module):
        if id(spec) not in names_by_id:
            raise ValueError(
                f"the module object {type(spec).__name__} passed in 'layers' is not a submodule of the model"
            )
        return [names_by_id[id(spec)]]
    if not isinstance(spec, str):
        raise TypeError(
            f"'layers' entries must be module names (str), glob patterns or nn.Module objects, "
            f"got {type(spec).__name__}"
        )
    name = canonical_name(spec)
    if _GLOB_CHARACTERS & set(name):
        matches = [n for n in by_name if n and fnmatch.fnmatchcase(n, name)]
        if not matches and name.startswith("module."):
            matches = [n for n in by_name if n and fnmatch.fnmatchcase(n, name[len("module.") :])]
        if not matches:
            raise ValueError(f"layer pattern {spec!r} matches no module; {_closest_names(name, by_name)}")
        return matches
    if name in by_name:
        return [name]
    if name.startswith("module.") and name[len("module.") :] in by_name:
        return [name[len("module.") :]]
    raise ValueError(f"unknown layer {spec!r}; {_closest_names(name, by_name)}")


def _closest_names(name: str, by_name: Mapping[str, nn.Module]) -> str:
    candidates = [n for n in by_name if n]
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.4)
    if close:
        return "closest existing names: " + ", ".join(repr(c) for c in close)
    top_level = [n for n in candidates if "." not in n][:10]
    return "top-level modules: " + ", ".join(repr(c) for c in top_level)


class FeatureTap:
    """Capture the outputs of chosen layers of a model during its forward pass.

    ```python
    with FeatureTap(model, ["layer2", "layer3"]) as tap:
        logits = model(x)
    feats = tap.pop()    # {"layer2": Tensor, "layer3": Tensor}; clears the store
    ```

    The hooks are attached on construction and on `__enter__`, and removed by `remove()` and on leaving
    the `with` block, also when the forward raised. A tap can be reused across steps (`with tap:` each
    step), or kept attached for the whole run and popped every step.

    Args:
        model: any `nn.Module`, bare or wrapped in DDP, DataParallel or `torch.compile`.
        layers: dotted names, glob patterns or module objects (one, or an iterable).
        detach: store detached outputs (no gradient back into the model through them).
        on_repeat: for a module run several times in one forward pass, keep the `"last"` output or
            `"all"` of them as a list.
        transform: applied to each captured output; needed when a layer returns a non-tensor
            (e.g. `transform=lambda out: out[0]` for an LSTM).

    Raises:
        TypeError: when `model` is not an `nn.Module`.
        ValueError: for an unknown layer name or pattern (with the closest names), or an invalid `on_repeat`.

    `pop()` raises `MissingFeaturesError` when a layer did not run since the last `pop()`, and
    `StaleFeaturesError` when a layer's stored output comes from an earlier forward pass of the model
    than the latest (the layer did not run in the latest one). With `DataParallel` on several GPUs the
    replicas overwrite each other's capture: use `DistributedDataParallel`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Iterable[LayerSpec],
        *,
        detach: bool = False,
        on_repeat: RepeatPolicy = "last",
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        if on_repeat not in ("last", "all"):
            raise ValueError(f"'on_repeat' must be 'last' or 'all', got {on_repeat!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"'model' must be an nn.Module, got {type(model).__name__}")
        self._root = unwrap_model(model)
        self._modules = resolve_layers(model, layers)
        self.detach = detach
        self.on_repeat: RepeatPolicy = on_repeat
        self.transform = transform
        self._handles: list[RemovableHandle] = []
        # Outputs of the current forward pass, one list per layer. The lists are only ever appended to
        # and cleared in place: under torch.compile the traced hooks mutate them without reading any
        # counter, which would be guarded on and force a recompile at every step.
        self._current: dict[str, list[Any]] = {name: [] for name in self._modules}
        # Layers whose unpopped outputs came from an earlier forward pass: {layer: that pass's number}.
        self._earlier: dict[str, int] = {}
        self._forward_index = 0
        self._stop_after: Mapping[str, int] | None = None
        self._warned_no_grad = False
        self.attach()

    @property
    def layers(self) -> tuple[str, ...]:
        """The tapped layers' names, in order (globs expanded, wrappers stripped)."""
        return tuple(self._modules)

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently registered."""
        return bool(self._handles)

    def attach(self) -> Self:
        """Register the hooks (no-op when already attached)."""
        if self._handles:
            return self
        # The hooks hold the tap weakly, so a tap dropped without remove() is collected and its __del__ removes them.
        tap: weakref.ref[FeatureTap] = weakref.ref(self)
        self._handles.append(self._root.register_forward_pre_hook(_start_hook(tap)))
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_hook(_capture_hook(tap, name)))
        return self

    def remove(self) -> None:
        """Remove every hook; captured features stay available to `pop()`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self.attach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()

    def __del__(self) -> None:
        handles = getattr(self, "_handles", None)
        if handles:
            self.remove()

    @property
    def holds_features(self) -> bool:
        """Whether any captured output is stored (and so kept alive) until the next `pop()` or `clear()`."""
        return any(self._current.values())

    def clear(self) -> None:
        """Drop every captured feature without returning it."""
        for values in self._current.values():
            values.clear()
        self._earlier.clear()

    def pop(self) -> dict[str, Any]:
        """Return `{layer: output}` from the latest forward pass and clear the store.

        With `on_repeat="all"` each value is a list of outputs in call order.
        """
        features = {name: list(values) for name, values in self._current.items()}
        earlier = dict(self._earlier)
        self.clear()
        _check_popped(features, earlier, self._forward_index)
        if self.on_repeat == "last":
            return {name: values[-1] for name, values in features.items()}
        return features

    def _start_forward(self) -> None:
        """A forward pass of the model begins: unpopped outputs become earlier ones."""
        for name, values in self._current.items():
            if values:
                self._earlier[name] = self._forward_index
                values.clear()
        self._forward_index += 1

    def _capture(self, name: str, output: Any) -> None:
        if self.transform is not None:
            output = self.transform(output)
        if self.detach and isinstance(output, Tensor):
            output = output.detach()
        values = self._current[name]
        if self.on_repeat == "last":
            values.clear()
        values.append(output)
        if self._stop_after is not None and self._all_layers_done(self._stop_after):
            raise _StopForward

    def _all_layers_done(self, calls_needed: Mapping[str, int]) -> bool:
        """With `on_repeat="all"`: whether every layer has run as often as `calls_needed` says."""
        return all(len(self._current[name]) >= needed for name, needed in calls_needed.items())

    def call_counts(self) -> dict[str, int]:
        """`{layer: outputs stored}` since the last `pop()` or `clear()`: with `on_repeat="all"`, how often each
        layer has run (with `"last"`, at most 1)."""
        return {name: len(values) for name, values in self._current.items()}

    @contextmanager
    def stop_forward_after(self, calls: Mapping[str, int] | None) -> Iterator[ForwardRun]:
        """Within the block, end the model's forward pass as soon as every layer in `calls` has run that often.

        The capture hook of the last layer needed raises an exception that ends the forward pass; this
        context manager catches it (nothing else does) and sets `stopped` on what it yields, so the code
        after the model call in the block is skipped. Counts are those of `call_counts()` (use
        `on_repeat="all"` for layers run several times per pass). `calls=None` stops nothing.

        ```python
        with torch.no_grad(), tap.stop_forward_after({"layer2": 1}) as run:
            model(x)               # runs up to the end of layer2 only
        run.stopped                # True when the pass ended early
        ```

        Args:
            calls: `{layer: calls}` for tapped layers, or None.

        Yields:
            a `ForwardRun` whose `stopped` is True after the block if the forward pass was ended early.

        Raises:
            ValueError: `calls` names a layer that is not tapped, or a count below 1.
        """
        if calls is not None:
            _check_stop_calls(calls, list(self._modules))
        run = ForwardRun()
        self._stop_after = calls
        try:
            yield run
        except _StopForward:
            run.stopped = True
        finally:
            self._stop_after = None

    def __repr__(self) -> str:
        state = "attached" if self.attached else "removed"
        return f"FeatureTap(layers={list(self._modules)}, detach={self.detach}, on_repeat={self.on_repeat!r}, {state})"


def _start_hook(tap: weakref.ref[FeatureTap]) -> Callable[[nn.Module, Any], None]:
    """The model's forward pre-hook: a pass begins (it keeps the pass counter, so it runs outside compiled graphs)."""

    def on_model_forward(module: nn.Module, args: Any) -> None:
        live = tap()
        if live is not None:
            live._start_forward()

    return torch.compiler.disable(on_model_forward)  # type: ignore[no-untyped-call,no-any-return]


def _capture_hook(tap: weakref.ref[FeatureTap], name: str) -> Callable[[nn.Module, Any, Any], None]:
    """Layer `name`'s forward hook: hand its output to the tap (warning once when it carries no gradient)."""

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        live = tap()
        if live is None or _in_backward():  # activation checkpointing re-runs the layer during backward
            return
        if not live.detach and not live._warned_no_grad and not torch.is_grad_enabled():
            _warn_no_graph(live, name)
        live._capture(name, output)

    return hook


def _warn_no_graph(tap: FeatureTap, name: str) -> None:
    """Once per tap: a trainable model's layer ran without autograd, so a loss on it trains nothing."""
    if any(p.requires_grad for p in tap._root.parameters()):
        tap._warned_no_grad = True
        warnings.warn(
            f"layer {name!r} ran without autograd (torch.no_grad, or reentrant activation checkpointing), "
            f"so its captured features carry no gradient: a loss on them will not train the model. With "
            f"torch.utils.checkpoint, pass use_reentrant=False.",
            stacklevel=4,
        )


def _check_popped(features: Mapping[str, list[Any]], earlier: Mapping[str, int], forward_index: int) -> None:
    """Refuse a pop where a layer's output is from an earlier pass (stale) or where a layer captured nothing."""
    stale = {name: earlier[name] for name, values in features.items() if not values and name in earlier}
    if stale:
        detail = ", ".join(f"{name!r} (forward #{index})" for name, index in stale.items())
        raise StaleFeaturesError(
            f"stale features: {detail} did not run in the latest forward pass of the model "
            f"(#{forward_index}); their stored output is from an earlier pass and is not returned. "
            f"Call pop() after every forward pass, or clear() before one whose features you do not need"
        )
    missing = [name for name, values in features.items() if not values]
    if missing:
        raise MissingFeaturesError(
            f"layer(s) {', '.join(map(repr, missing))} captured nothing since the last pop(): they did "
            f"not run in the forward pass (check the model's control flow), the forward ran outside "
            f"the tap's `with` block, or pop() was called twice"
        )


def _check_stop_calls(calls: Mapping[str, int], layers: list[str]) -> None:
    """Refuse `stop_forward_after` counts for untapped layers or below 1."""
    unknown = sorted(set(calls) - set(layers))
    bad = {name: n for name, n in calls.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
    if unknown or bad:
        raise ValueError(
            f"stop_forward_after: {f'untapped layer(s) {unknown}' if unknown else f'counts {bad} below 1'}; "
            f"the tapped layers are {layers}"
        )


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread (private API; False when unavailable).

    Not asked while `torch.compile` traces: the answer would be the tracer's, and compiled graphs do not
    re-run Python hooks in their backward.
    """
    if compiling():
        return False
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


class FrozenReference(nn.Module):
    """A frozen network whose features at chosen layers serve as a reference (e.g. anti-transfer).

    The model is put in eval mode with `requires_grad_(False)` and stays in eval mode when `.train()` is
    called on this module or a parent. Calling it runs the model under `torch.no_grad()` and returns
    `{layer: tensor}`. With `stop_early=True` the forward pass ends as soon as every requested layer
    has run `calls_per_pass` times, from the first call on: the model never runs past the deepest
    requested layer. A module run several times per pass (a shared block, a loop) needs its count in
    `calls_per_pass`; its last output is returned, as `FeatureTap` does.

    A pass whose call counts differ from `calls_per_pass` raises `ValueError` naming the layer and the
    counts, instead of answering with an earlier call's output: always when the whole pass ran (with
    `stop_early=False`, or when the stop never came because a layer ran less often than declared), and
    with `stop_early=True` when a layer runs more often than declared before the last requested layer has
    finished (extra calls after the stop are never run, so never seen).

    Args:
        model: the frozen network (bare or wrapped).
        layers: as for `FeatureTap`.
        stop_early: end the forward pass after the deepest requested layer.
        calls_per_pass: how often each layer runs in one forward pass: one count for every layer, or
            `{layer: count}` (layers not named run once).
        transform: as for `FeatureTap`.

    Returns:
        called like the model, `{layer: tensor}`: each requested layer's (last) output of that pass.

    Raises:
        TypeError: when `model` is not an `nn.Module`.
        ValueError: for an unknown layer, a count below 1, or (when called) a pass whose call counts differ
            from `calls_per_pass`.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Iterable[LayerSpec],
        *,
        stop_early: bool = True,
        calls_per_pass: int | Mapping[str, int] = 1,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"'model' must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.stop_early = stop_early
        model.eval()
        model.requires_grad_(False)
        # "all" lets the early stop count each layer's calls; the last call's output is returned
        self._tap = FeatureTap(model, layers, detach=True, on_repeat="all", transform=transform)
        self.calls_per_pass = _calls_per_layer(calls_per_pass, self._tap.layers)

    @property
    def layers(self) -> tuple[str, ...]:
        """The reference layers' names, in order."""
        return self._tap.layers

    def train(self, mode: bool = True) -> Self:
        """Record `mode` on this wrapper only: the frozen model always stays in eval mode."""
        self.training = mode
        self.model.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Run the frozen model on the inputs and return `{layer: features}` (no gradient)."""
        self.model.eval()
        self._tap.attach()
        self._tap.clear()
        try:
            with torch.no_grad(), self._tap.stop_forward_after(self.calls_per_pass if self.stop_early else None) as run:
                self.model(*args, **kwargs)
        except BaseException:
            self._tap.clear()  # do not keep a failed pass's features alive
            raise
        whole_pass = not run.stopped  # the forward ran to its end, so every count is final
        counts = self._tap.call_counts()
        wrong = {
            name: count
            for name, count in counts.items()
            if count and (count > self.calls_per_pass[name] or (whole_pass and count != self.calls_per_pass[name]))
        }
        if wrong:
            self._tap.clear()
            detail = ", ".join(
                f"{name!r} ran {count} time(s), expected {self.calls_per_pass[name]}" for name, count in wrong.items()
            )
            raise ValueError(
                f"FrozenReference: in this forward pass {detail}; pass calls_per_pass={{layer: count}} for a "
                f"module the model runs several times per pass"
            )
        return {name: outputs[-1] for name, outputs in self._tap.pop().items()}

    def extra_repr(self) -> str:
        calls = {name: n for name, n in self.calls_per_pass.items() if n != 1}
        extra = f", calls_per_pass={calls}" if calls else ""
        return f"layers={list(self.layers)}, stop_early={self.stop_early}{extra}"


def _calls_per_layer(calls: int | Mapping[str, int], layers: Sequence[str]) -> dict[str, int]:
    """`{layer: count}` for every tapped layer from one count or a partial mapping (checked)."""
    if isinstance(calls, Mapping):
        unknown = sorted(set(calls) - set(layers))
        if unknown:
            raise ValueError(f"'calls_per_pass' names layer(s) {unknown} that are not among the layers {list(layers)}")
        counts = {name: calls.get(name, 1) for name in layers}
    else:
        counts = dict.fromkeys(layers, calls)
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"'calls_per_pass' must be whole numbers ≥ 1, got {count!r} for layer {name!r}")
    return counts
