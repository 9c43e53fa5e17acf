"""`TaskRelatedness`: the K×M matrix coupling two tasks (docs: Methods §3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .._labels import IGNORE_INDEX, check_labels, multilabel_targets
from .._validation import raise_pending_errors
from ..functional import TASK_KINDS, TaskKind
from ..functional._core import one_hot_known

ROW_SUM_TOLERANCE = 1e-4


class TaskRelatedness:
    """The relatedness matrix `R` (K×M) between task A (K classes) and task B (M attributes or classes).

    - `kind="multilabel"`: `R[k, m] = P(b_m = 1 | a = k)`; rows need not sum to 1.
    - `kind="multiclass"`: `R[k, m] = P(b = m | a = k)`; rows sum to 1.

    Build it from prior knowledge with `from_table`, or from co-annotated samples with `estimate`.
    Serialize with `to_dict` / `from_dict` (JSON-compatible). The loss modules take it as `relatedness`;
    the functions of `negtransfer_losses.functional` take its parts: `relatedness=r.matrix`,
    `prior=r.prior`, `kind=r.kind`.

    Args:
        matrix: `R`, `(K, M)` probabilities (stored as float64 in `.matrix`).
        kind: `"multilabel"` or `"multiclass"` task B.
        prior: task A's class prior `π`, `(K,)`, non-negative, summing to 1; uniform when None.
        support: `(K,)`, the number of co-annotated samples behind each row (set by `estimate`).

    Raises:
        ValueError: `kind` is not one of its choices, `matrix` is not `(K, M)` or holds values outside
            [0, 1], a multiclass row does not sum to 1, or `prior` has the wrong shape or does not sum to 1.
    """

    def __init__(
        self,
        matrix: Tensor | Sequence[Sequence[float]],
        *,
        kind: TaskKind = "multilabel",
        prior: Tensor | Sequence[float] | None = None,
        support: Tensor | None = None,
    ) -> None:
        self.matrix = _checked_matrix(matrix, kind)
        self.kind: TaskKind = kind
        self.prior = _checked_prior(prior, self.matrix.shape[0])
        self.support = support

    @property
    def num_a(self) -> int:
        """K, the number of task A's classes (rows of `R`)."""
        return int(self.matrix.shape[0])

    @property
    def num_b(self) -> int:
        """M, the number of task B's attributes or classes (columns of `R`)."""
        return int(self.matrix.shape[1])

    @classmethod
    def from_table(
        cls,
        table: Mapping[Any, Mapping[Any, float]],
        *,
        num_a: int,
        num_b: int,
        kind: TaskKind = "multilabel",
        prior: Tensor | Sequence[float] | None = None,
        class_names: Sequence[str] | None = None,
        attribute_names: Sequence[str] | None = None,
    ) -> TaskRelatedness:
        """From a prototype table `{class: {attribute: weight}}`; entries not listed are 0.

        E.g. Du et al. 2014's table of the action units each basic expression activates, weighted by the
        proportion of subjects.

        Args:
            table: `{class: {attribute: weight}}`; classes and attributes are indices, or names listed in
                `class_names` / `attribute_names`.
            num_a: K, the number of task A's classes.
            num_b: M, the number of task B's attributes or classes.
            kind: `"multilabel"` or `"multiclass"` task B.
            prior: task A's class prior `π`, `(K,)`; uniform when None.
            class_names: the names of task A's classes, in index order.
            attribute_names: the names of task B's attributes or classes, in index order.

        Returns:
            the `TaskRelatedness`.

        Raises:
            ValueError: a name is unknown, an index out of range, a weight outside [0, 1], a multiclass row
                that does not sum to 1, or an invalid `prior`.
        """
        r = torch.zeros(num_a, num_b, dtype=torch.float64)
        for cls_key, row in table.items():
            k = _index(cls_key, num_a, class_names, "class")
            for attr_key, weight in row.items():
                if not 0 <= float(weight) <= 1:
                    raise ValueError(
                        f"'table' weights are probabilities and must lie in [0, 1]; class {cls_key!r}, attribute "
                        f"{attr_key!r} has {weight}"
                    )
                r[k, _index(attr_key, num_b, attribute_names, "attribute")] = float(weight)
        return cls(r, kind=kind, prior=prior)

    @classmethod
    def estimate(
        cls,
        labels_a: Tensor,
        labels_b: Tensor,
        *,
        num_a: int,
        num_b: int,
        kind: TaskKind = "multilabel",
        smoothing: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> TaskRelatedness:
        """Estimate `R` and `π` from samples, with Laplace smoothing `α = smoothing`.

        - multilabel: `R[k, m] = (n(a=k, b_m=1) + α) / (n(a=k, b_m known) + 2α)`;
        - multiclass: `R[k, m] = (n(a=k, b=m) + α) / (n(a=k, b known) + Mα)`;
        - `π_k = (n(a=k) + α) / (n(a known) + Kα)` over every sample whose A label is known.

        Missing entries (`ignore_index`; NaN or -1 in multilabel B) are ignored. `support[k]` is the number
        of samples with `a = k` and at least one known B entry.

        Args:
            labels_a: `(N,)` integers in `[0, K)`, or `ignore_index` where unknown.
            labels_b: `(N, M)` multilabel values (0 or 1; NaN or -1 where unknown) or `(N,)` multiclass
                integers in `[0, M)` (or `ignore_index`).
            num_a: K, the number of task A's classes.
            num_b: M, the number of task B's attributes or classes.
            kind: `"multilabel"` or `"multiclass"` task B.
            smoothing: Laplace's `α` ≥ 0.
            ignore_index: the label of samples whose class is unknown.

        Returns:
            the `TaskRelatedness`, with `support` set.

        Raises:
            TypeError: a label tensor has the wrong type.
            ValueError: `smoothing` < 0, `kind` is not one of its choices, a label is out of range or has the
                wrong shape, or `smoothing=0` leaves a row with no co-annotated sample. On a GPU the range
                checks run without blocking (`negtransfer_losses.raise_pending_errors`); `estimate`, run once
                before training, waits for them before it returns.
        """
        r, prior, support = _estimate(labels_a, labels_b, num_a, num_b, kind, smoothing, ignore_index)
        return cls(r, kind=kind, prior=prior, support=support)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-compatible dict: `matrix`, `kind`, `prior`, and `support` when known.

        Returns:
            the dict that `from_dict` reads back.
        """
        out: dict[str, Any] = {"matrix": self.matrix.tolist(), "kind": self.kind, "prior": self.prior.tolist()}
        if self.support is not None:
            out["support"] = self.support.tolist()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskRelatedness:
        """The `TaskRelatedness` that `to_dict` (or the CLI's `--output`) wrote.

        Args:
            data: a mapping with `matrix`, and optionally `kind`, `prior` and `support`.

        Returns:
            the `TaskRelatedness`.

        Raises:
            KeyError: `data` has no `matrix`.
            ValueError: as the constructor.
        """
        support = data.get("support")
        return cls(
            data["matrix"],
            kind=data.get("kind", "multilabel"),
            prior=data.get("prior"),
            support=None if support is None else torch.as_tensor(support, dtype=torch.float64),
        )

    def format_table(
        self, *, class_names: Sequence[str] | None = None, attribute_names: Sequence[str] | None = None
    ) -> str:
        """The matrix as a readable text table, with the prior and support columns.

        Args:
            class_names: row labels (task A's classes); indices when None.
            attribute_names: column labels (task B's attributes or classes); indices when None.

        Returns:
            the table, one line per class of task A under a header line.
        """
        rows = [class_names[k] if class_names else str(k) for k in range(self.num_a)]
        cols = [attribute_names[m] if attribute_names else str(m) for m in range(self.num_b)]
        width = max(6, *(len(c) for c in cols))
        label_width = max(5, *(len(r) for r in rows))
        header = "A \\ B".ljust(label_width) + "".join(c.rjust(width + 1) for c in cols) + "  prior".rjust(width + 2)
        if self.support is not None:
            header += "  support"
        lines = [header]
        for k, name in enumerate(rows):
            line = name.ljust(label_width) + "".join(
                f"{self.matrix[k, m].item():{width + 1}.3f}" for m in range(self.num_b)
            )
            line += f"{self.prior[k].item():{width + 2}.3f}"
            if self.support is not None:
                line += f"{int(self.support[k].item()):9d}"
            lines.append(line)
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"TaskRelatedness(K={self.num_a}, M={self.num_b}, kind={self.kind!r})"


def _index(key: Any, size: int, names: Sequence[str] | None, what: str) -> int:
    if isinstance(key, str) and not key.lstrip("-").isdigit():
        if names is None or key not in names:
            raise ValueError(f"unknown {what} {key!r}: pass {what}_names listing it, or use indices")
        return list(names).index(key)
    index = int(key)
    if not 0 <= index < size:
        raise ValueError(f"{what} index {index} is outside [0, {size})")
    return index


def _checked_matrix(matrix: Tensor | Sequence[Sequence[float]], kind: str) -> Tensor:
    """`matrix` as float64 `(K, M)` probabilities, checked (a multiclass row sums to 1), after `kind`."""
    if kind not in TASK_KINDS:
        raise ValueError(f"'kind' must be one of 'multilabel', 'multiclass'; got {kind!r}")
    r = torch.as_tensor(matrix, dtype=torch.float64)
    if r.dim() != 2 or r.shape[0] < 1 or r.shape[1] < 1:
        raise ValueError(f"'matrix' must be a (K, M) matrix with K, M ≥ 1, got shape {tuple(r.shape)}")
    if not bool(torch.isfinite(r).all()) or bool(((r < 0) | (r > 1)).any()):
        bad = r[~torch.isfinite(r) | (r < 0) | (r > 1)][0].item()
        raise ValueError(f"'matrix' entries are probabilities and must lie in [0, 1]; found {bad}")
    if kind == "multiclass":
        sums = r.sum(dim=1)
        off = (sums - 1).abs() > ROW_SUM_TOLERANCE
        if bool(off.any()):
            k = int(off.nonzero()[0])
            raise ValueError(
                f"a multiclass relatedness matrix has rows P(b | a = k) that sum to 1; row {k} sums to "
                f"{sums[k].item():.6g}"
            )
    return r


def _checked_prior(prior: Tensor | Sequence[float] | None, num_a: int) -> Tensor:
    """`prior` as a float64 `(K,)` distribution (uniform when None), checked."""
    pi = (
        torch.full((num_a,), 1.0 / num_a, dtype=torch.float64)
        if prior is None
        else torch.as_tensor(prior, dtype=torch.float64)
    )
    if pi.shape != (num_a,):
        raise ValueError(f"'prior' must have shape ({num_a},) to match the matrix's rows, got {tuple(pi.shape)}")
    if bool((pi < 0).any()) or abs(pi.sum().item() - 1) > ROW_SUM_TOLERANCE:
        raise ValueError(f"'prior' must be non-negative and sum to 1, got sum {pi.sum().item():.6g}")
    return pi


def _estimate(
    labels_a: Tensor,
    labels_b: Tensor,
    num_a: int,
    num_b: int,
    kind: str,
    smoothing: float,
    ignore_index: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """`R`, `π` and `support` from co-annotated samples (the formulas of `TaskRelatedness.estimate`), checked."""
    if smoothing < 0:
        raise ValueError(f"'smoothing' must be ≥ 0, got {smoothing}")
    n = labels_a.shape[0] if isinstance(labels_a, Tensor) else 0
    check_labels(labels_a, num_a, n, name="labels_a", what="classes of task A", ignore_index=ignore_index)
    # one-hot rows by comparison, never by indexing: where the range check is deferred (a GPU), a label out
    # of range gives a zero row here, and the check's ValueError (raised below) is what the caller sees
    a_onehot = one_hot_known(labels_a, num_a, labels_a != ignore_index, torch.float64)
    if kind == "multiclass":
        check_labels(labels_b, num_b, n, name="labels_b", what="classes of task B", ignore_index=ignore_index)
        b_onehot = one_hot_known(labels_b, num_b, labels_b != ignore_index, torch.float64)
        joint = a_onehot.T @ b_onehot
        rows = joint.sum(dim=1, keepdim=True)
        r = (joint + smoothing) / (rows + num_b * smoothing).clamp_min(torch.finfo(torch.float64).tiny)
        support = rows[:, 0]
    elif kind == "multilabel":
        positive, annotated = multilabel_targets(labels_b, (n, num_b), torch.float64, name="labels_b")
        raise_pending_errors()  # the range checks first: they name the value (estimate is no training step)
        if bool(((positive != 0) & (positive != 1)).any()):
            raise ValueError("multilabel 'labels_b' must be 0 or 1 where known (NaN or -1 where missing)")
        ones = a_onehot.T @ positive
        counts = a_onehot.T @ annotated.double()
        r = (ones + smoothing) / (counts + 2 * smoothing).clamp_min(torch.finfo(torch.float64).tiny)
        support = a_onehot.T @ annotated.any(dim=1).double()
    else:
        raise ValueError(f"'kind' must be one of 'multilabel', 'multiclass'; got {kind!r}")
    # not a training step: wait for the label checks (deferred on a GPU) rather than return a wrong R
    raise_pending_errors()
    if smoothing == 0:  # a row or entry with no data has no estimate: say so instead of dividing by zero
        empty = (counts == 0) if kind == "multilabel" else (support[:, None] == 0).expand_as(r)
        if bool(empty.any()):
            k = int(empty.nonzero()[0, 0])
            raise ValueError(f"class {k} of task A has no co-annotated sample; use smoothing > 0")
    class_counts = a_onehot.sum(dim=0)
    prior = (class_counts + smoothing) / (class_counts.sum() + num_a * smoothing)
    if not bool(torch.isfinite(prior).all()):
        prior = torch.full((num_a,), 1.0 / num_a, dtype=torch.float64)
    return r, prior, support
