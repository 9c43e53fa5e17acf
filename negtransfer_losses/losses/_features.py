"""Pairing of the student's and the reference's features, given as dicts (by layer) or as single tensors."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeAlias

from torch import Tensor

Features: TypeAlias = Tensor | Mapping[str, Tensor]

SINGLE_LAYER = "features"


def pair_features(student: Features, reference: Features) -> list[tuple[str, Tensor, Tensor]]:
    """`[(layer, student_l, reference_l), ...]` in the student's order.

    Two tensors form one pair named `"features"`. Two dicts are matched by key; a key on one side only
    raises `ValueError` naming it.
    """
    if isinstance(student, Tensor) and isinstance(reference, Tensor):
        return [(SINGLE_LAYER, student, reference)]
    if isinstance(student, Mapping) and isinstance(reference, Mapping):
        only_student = [k for k in student if k not in reference]
        only_reference = [k for k in reference if k not in student]
        if only_student or only_reference:
            raise ValueError(
                "'student' and 'reference' must have the same layers: "
                + "; ".join(
                    f"{side} only: {keys}"
                    for side, keys in (("student", only_student), ("reference", only_reference))
                    if keys
                )
            )
        if not student:
            raise ValueError("'student' and 'reference' are empty dicts: pass the features of at least one layer")
        return [(name, student[name], reference[name]) for name in student]
    raise TypeError(
        f"'student' and 'reference' must both be tensors or both be dicts of tensors by layer, got "
        f"{type(student).__name__} and {type(reference).__name__}"
    )
