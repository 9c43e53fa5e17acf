"""Labels with unknown entries: class indices with `ignore_index`, and multilabel targets with a mask.

Every loss that takes labels checks them here, so every message reads the same.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import checks_values

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
    invalid = (labels != ignore_index) & (labels < 0)
    if num_classes is not None:
        invalid |= labels >= num_classes
    if checks_values() and bool(invalid.any()):
        value = int(labels[invalid][0])
        valid = f"{what} are ≥ 0" if num_classes is None else f"outside [0, {num_classes}) for {num_classes} {what}"
        raise ValueError(f"'{name}' holds {value}, {valid}; mark unknown labels with ignore_index={ignore_index}")
    return labels


def multilabel_targets(
    targets: object, shape: tuple[int, int], dtype: torch.dtype, *, name: str, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """`(values, annotated)`, both `(N, M)`, from multilabel targets with unknown entries.

    Targets may be floats in [0, 1] with NaN or a negative value (`-1`) for unknown entries, integers
    with `-1` for unknown entries, or booleans (all known). `mask` (booleans, True where annotated)
    overrides what the values say. Unknown entries get value 0 in `values`.
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
    if checks_values() and bool(((values < 0) | (values > 1)).any()):
        raise ValueError(
            f"annotated entries of '{name}' must lie in [0, 1]; mark unknown entries with -1 (or NaN for floats)"
        )
    return values, annotated
