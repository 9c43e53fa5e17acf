"""Input checks shared by every public function: messages name the argument, the shapes and what is valid."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal, TypeAlias

import torch
from torch import Tensor

NanPolicy: TypeAlias = Literal["raise", "skip", "propagate"]
NAN_POLICIES: tuple[NanPolicy, ...] = ("raise", "skip", "propagate")


def describe(name: str, layer: str | None = None) -> str:
    """`'student'` or `'student' (layer 'layer3')`, for error messages."""
    return f"'{name}'" if layer is None else f"'{name}' (layer '{layer}')"


def check_tensor(x: object, name: str, *, layer: str | None = None, min_dim: int = 1) -> Tensor:
    """Raise `TypeError` unless `x` is a floating-point tensor with at least `min_dim` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{describe(name, layer)} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{describe(name, layer)} must be a real floating-point tensor, got dtype {x.dtype}; "
            f"convert it with .float()"
        )
    if x.dim() < min_dim:
        raise ValueError(
            f"{describe(name, layer)} must have at least {min_dim} dimension(s) (batch first), "
            f"got shape {tuple(x.shape)}"
        )
    return x


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: the precision every reduction runs in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def as_batch_matrix(x: Tensor, name: str, *, layer: str | None = None) -> Tensor:
    """Flatten `(n, ...)` to `(n, d)` in the compute dtype (float32, or float64 for float64 input)."""
    check_tensor(x, name, layer=layer)
    x = x.to(compute_dtype(x))
    return x.reshape(x.shape[0], -1)


def check_same_batch(x: Tensor, y: Tensor, names: Sequence[str], *, layer: str | None = None) -> None:
    """Raise `ValueError` unless `x` and `y` have the same first (batch) dimension."""
    if x.shape[0] != y.shape[0]:
        where = "" if layer is None else f" at layer '{layer}'"
        raise ValueError(
            f"'{names[0]}' and '{names[1]}' must have the same batch size{where}: "
            f"got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )


def check_same_device(tensors: Mapping[str, Tensor], *, layer: str | None = None) -> None:
    """Raise `ValueError` unless every tensor lives on one device (naming them and their devices)."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{describe(name, layer)} on {device}" for name, device in devices.items())
        raise ValueError(f"inputs must be on the same device: {listed}; move them with .to(device)")


def check_min_batch(n: int, minimum: int, *, what: str, name: str = "x") -> None:
    """Raise `ValueError` when an estimator needs more samples than it was given."""
    if n < minimum:
        samples = "sample" if minimum == 1 else "samples"
        raise ValueError(f"{what} needs at least {minimum} {samples} in '{name}', got a batch of {n}")


def checks_values() -> bool:
    """Whether checks that read tensor values (label ranges, NaN, signs) run: not while `torch.compile` traces.

    Such a check needs the data on the host, which breaks the graph; compiled code skips it. Run a step
    eagerly first to validate a new data pipeline.
    """
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return not (is_compiling() if is_compiling is not None else torch._dynamo.is_compiling())


def guard_finite(
    tensors: Mapping[str, Tensor], nan_policy: NanPolicy, *, layer: str | None = None
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Apply a NaN/inf policy to a loss's inputs before it computes.

    - `"raise"`: `ValueError` naming the inputs with NaN or inf (skipped while `torch.compile` traces);
    - `"skip"`: non-finite inputs are replaced by zeros and the returned flag (a 0-d bool tensor, no device
      synchronization) is False; pass it to `zero_unless` so the batch gives a zero loss and zero gradient;
    - `"propagate"`: no check.

    Returns:
        the (possibly zeroed) inputs and the flag, or None when no masking is needed.
    """
    check_choice(nan_policy, "nan_policy", NAN_POLICIES)
    if nan_policy == "propagate" or (nan_policy == "raise" and not checks_values()):
        return dict(tensors), None
    check_same_device(tensors, layer=layer)
    flags = {name: torch.isfinite(t).all() for name, t in tensors.items()}
    finite = torch.stack(list(flags.values())).all()
    if nan_policy == "raise":
        if not bool(finite):  # one device synchronization; per input only to name the culprits
            bad = [name for name, flag in flags.items() if not bool(flag)]
            raise ValueError(
                f"{' and '.join(describe(n, layer) for n in bad)} contain NaN or inf; pass nan_policy='skip' "
                f"to give such a batch zero loss, or nan_policy='propagate' to skip the check"
            )
        return dict(tensors), None
    return {name: torch.where(finite, t, torch.zeros_like(t)) for name, t in tensors.items()}, finite


def zero_unless(finite: Tensor | None, value: Tensor) -> Tensor:
    """`value`, or zero (with a zero gradient) where `guard_finite` flagged a skipped batch."""
    return value if finite is None else torch.where(finite, value, torch.zeros_like(value))


def zero_with_grad(x: Tensor) -> Tensor:
    """A scalar zero connected to `x`, so backward() gives a zero gradient rather than an error.

    An empty sum, not `x.sum() * 0`: a large float16 sum overflows to inf, and inf · 0 is NaN.
    """
    return x.reshape(-1)[:0].sum().to(compute_dtype(x))


def check_choice(value: object, name: str, choices: Sequence[str]) -> None:
    """Raise `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ValueError(f"'{name}' must be one of {valid}; got {value!r}")


@contextmanager
def full_precision(*tensors: Tensor) -> Iterator[None]:
    """Disable autocast on the inputs' device types, so that reductions really run in float32/64."""
    device_types = sorted({t.device.type for t in tensors if _has_autocast(t.device.type)})
    with _autocast_off(device_types):
        yield


@contextmanager
def _autocast_off(device_types: Sequence[str]) -> Iterator[None]:
    if not device_types:
        yield
        return
    with torch.autocast(device_type=device_types[0], enabled=False), _autocast_off(device_types[1:]):
        yield


def _has_autocast(device_type: str) -> bool:
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is None:  # torch < 2.4
        return device_type in ("cpu", "cuda")
    return bool(is_available(device_type))
