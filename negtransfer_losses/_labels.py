"""Labels with unknown entries: class indices with `ignore_index`, and multilabel targets with a mask.

Every loss that takes labels checks them here, so every message reads the same. The value checks (label
ranges, target ranges) never make the host wait for the device: see `negtransfer_losses._validation`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ._validation import poll_pending_checks, raise_if_invalid, value_checks_run

IGNORE_INDEX = -100


def check_labels(
    labels: object,
    num_classes: int | None,
    batch: int,
    *,
    name: str,
    what: str = "classes",
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | None = None,
) -> Tensor:
    """Raise unless `labels` is an integer tensor `(batch,)` of values in `[0, num_classes)` or `ignore_index`.

    Args:
        labels: the class indices.
        num_classes: how many classes there are; None accepts any class index ≥ 0 (for a use that needs
            only which samples share a class).
        batch: the batch size the labels must match.
        name: the argument's name, for messages (`"irrelevant_labels"`, `"labels_a"`, ...).
        what: what the classes are, for messages (`"irrelevant classes"`, `"classes of task A"`).
        ignore_index: the label of samples whose class is unknown.
        device: the device the labels must be on (that of the features or logits).

    Returns:
        `labels`, unchanged.

    Raises:
        TypeError: for a non-tensor or non-integer `labels`.
        ValueError: for a wrong device or shape (at once), and for a label outside the range, naming it:
            at once on the CPU, from a later check on other devices without a synchronization (see
            `negtransfer_losses.raise_pending_errors`); not checked while `torch.compile` traces or a CUDA
            graph is captured.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"'{name}' must hold integer class indices, got dtype {labels.dtype}")
    if device is not None and labels.device != device:
        raise ValueError(f"'{name}' must be on the same device as the features ({device}), got {labels.device}")
    if labels.shape != (batch,):
        raise ValueError(
            f"'{name}' must have shape ({batch},) to match the batch of {batch}, got {tuple(labels.shape)}"
        )
    if labels.numel() == 0 or not value_checks_run(labels.device):
        return labels
    invalid = (labels != ignore_index) & (labels < 0)
    if num_classes is not None:
        invalid |= labels >= num_classes
    # fixed shapes only: the flag and the first invalid label, read on the host later (see raise_if_invalid)
    first = labels.gather(0, invalid.to(torch.int32).argmax().reshape(1))
    values = torch.cat([invalid.any().reshape(1).to(torch.int64), first.to(torch.int64)])
    raise_if_invalid(values, functools.partial(_label_message, name, num_classes, what, ignore_index, batch))
    return labels


def _label_message(
    name: str, num_classes: int | None, what: str, ignore_index: int, batch: int, values: list[int]
) -> str | None:
    invalid, value = values
    if not invalid:
        return None
    valid = f"{what} are ≥ 0" if num_classes is None else f"outside [0, {num_classes}) for {num_classes} {what}"
    return (
        f"'{name}' holds {value}, {valid}; mark unknown labels with ignore_index={ignore_index} "
        f"(labels of shape ({batch},))"
    )


def multilabel_targets(
    targets: object, shape: tuple[int, int], dtype: torch.dtype, *, name: str, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`(values, annotated)`, both `(N, M)`, from multilabel targets with unknown entries.

    Targets may be floats in [0, 1] with NaN or a negative value (`-1`) for unknown entries, integers
    with `-1` for unknown entries, or booleans (all known). `mask` (booleans, True where annotated)
    overrides what the values say. Unknown entries get value 0 in `values`.

    Args:
        targets: the multilabel targets `(N, M)`.
        shape: the expected `(N, M)`.
        dtype: the dtype of the returned values.
        name: the argument's name, for messages.
        mask: optional booleans `(N, M)`, True where annotated.

    Returns:
        `(values, annotated)`.

    Raises:
        TypeError: for a non-tensor or complex `targets`.
        ValueError: for a wrong shape or mask (at once), and for an annotated entry outside [0, 1]: at once on
            the CPU, from a later check on other devices (as for `check_labels`).
    """
    if not isinstance(targets, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(targets).__name__}")
    if targets.is_complex():
        raise TypeError(
            f"'{name}' must be real (floats, integers with -1 for unknown, or booleans), got {targets.dtype}"
        )
    if tuple(targets.shape) != shape:
        raise ValueError(f"'{name}' must have shape {shape}, got {tuple(targets.shape)}")
    if mask is not None:
        if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
            got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"'mask' must be a boolean tensor of the shape of '{name}' {shape}, got {got}")
        annotated = mask.bool()
    elif targets.dtype == torch.bool:
        annotated = torch.ones_like(targets)
    elif targets.is_floating_point():
        annotated = ~torch.isnan(targets) & (targets >= 0)
    else:
        annotated = targets >= 0
    values = torch.where(annotated, targets.to(dtype), torch.zeros((), dtype=dtype, device=targets.device))
    if values.numel() and value_checks_run(values.device):
        outside = ((values < 0) | (values > 1)).reshape(-1)
        first = values.reshape(-1).gather(0, outside.to(torch.int32).argmax().reshape(1))
        flagged = torch.cat([outside.any().reshape(1).to(torch.float32), first.to(torch.float32)])
        raise_if_invalid(flagged, functools.partial(_target_message, name, shape))
    elif value_checks_run(values.device):
        poll_pending_checks()
    return values, annotated


def _target_message(name: str, shape: tuple[int, int], values: list[float]) -> str | None:
    outside, value = values
    if not outside:
        return None
    return (
        f"annotated entries of '{name}' must lie in [0, 1], got {value:g} (targets of shape {shape}); mark "
        f"unknown entries with -1 (or NaN for floats)"
    )
