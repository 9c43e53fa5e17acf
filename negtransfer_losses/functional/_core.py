"""The one internal door into `functional` for the layers above it (`ops`, the modules).

Contract: everything here takes inputs that the public entry point of the call has already checked once
(shapes, dtypes, devices, labels decoded) and computes in the compute dtype with autocast already off where
the entry point turned it off. Nothing here checks again. A name is here because another layer calls it on
every step; the public functions of `functional` are the same computations with their checks at the door.
Other layers import `functional`'s private names from here only (the architecture test holds them to it).
"""

from __future__ import annotations

from .distribution_matching import _check_heads as check_heads
from .distribution_matching import _check_matching_tensors as check_matching_tensors
from .distribution_matching import _check_parts as check_parts
from .distribution_matching import _co_annotation_unchecked as co_annotation_unchecked
from .distribution_matching import _matching_terms_unchecked as matching_terms_unchecked
from .distribution_matching import _MatchingOptions as MatchingOptions
from .distribution_matching import _multi_task_unchecked as multi_task_unchecked
from .distribution_matching import _task_labels as task_labels
from .distribution_matching import _TaskLabels as TaskLabels

__all__ = [
    "MatchingOptions",
    "TaskLabels",
    "check_heads",
    "check_matching_tensors",
    "check_parts",
    "co_annotation_unchecked",
    "matching_terms_unchecked",
    "multi_task_unchecked",
    "task_labels",
]
