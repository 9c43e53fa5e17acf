"""What the suppression losses share: one contract for `HSICSuppression`, `CKASuppression` and the adversary.

Each is called `loss(features, signal, *, task_labels=None)`, where the signal is what describes the factor to
ignore (its labels, or a frozen network's features on the same batch), and returns `weight ×` its penalty.
Swapping one method for another changes the constructor only.

**The conditional rule, in one place.** The constructor's `conditional` decides; `task_labels` is data. A
conditional module needs `task_labels` (a `ValueError` says so when they are missing); an unconditional one
accepts them and leaves them unused, so one training loop serves both forms. The `functional` twins take the
same decision from whether `task_labels` is given: the modules pass them on only when conditional.
"""

from __future__ import annotations

from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import NAN_POLICIES, NanPolicy, check_choice, zero_unless


def check_count(value: object, name: str, *, minimum: int, meaning: str | None = None, why: str | None = None) -> int:
    """`value` if it is an int (not a bool) of at least `minimum`; else the error every constructor raises.

    Args:
        value: the argument as given.
        name: its name, for the message.
        minimum: the least value allowed.
        meaning: what it counts, for the message (e.g. "the number of irrelevant classes").
        why: why `minimum` is the least, for the message.

    Returns:
        `value`.

    Raises:
        ValueError: for a bool, a non-int or a value below `minimum`, as "'name' must be <meaning> (an int ≥
            minimum), got value" or "'name' must be an int ≥ minimum (<why>), got value".
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        wanted = f"an int ≥ {minimum}" + (f" ({why})" if why else "")
        if meaning:
            wanted = f"{meaning} ({wanted})"
        raise ValueError(f"'{name}' must be {wanted}, got {value!r}")
    return value


class SuppressionLoss(nn.Module):
    """The base of the suppression losses: weight, conditional rule, `nan_policy`, `last_terms` and `repr`.

    Subclasses compute the unweighted value and hand it to `weighted`; `last_terms` then holds `"loss"` (what
    the module returned) and `"value"` (the unweighted penalty), plus what the subclass adds.

    Args:
        weight: the factor of the penalty.
        conditional: the within-task-class form (forward then needs `task_labels`).
        ignore_index: the label of unknown samples.
        nan_policy: non-finite inputs `"raise"`, give a zero loss with a zero gradient (`"skip"`), or pass
            through (`"propagate"`).

    Raises:
        ValueError: for an unknown `nan_policy`.
    """

    def __init__(
        self,
        *,
        weight: float = 1.0,
        conditional: bool = False,
        ignore_index: int = IGNORE_INDEX,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        self.weight = float(weight)
        self.conditional = bool(conditional)
        self.ignore_index = ignore_index
        self.nan_policy: NanPolicy = nan_policy
        self.last_terms: dict[str, Tensor] = {}

    def task_labels_for(self, task_labels: Tensor | None, call: str) -> Tensor | None:
        """`task_labels` when the module is conditional (where they are required), None otherwise.

        Args:
            task_labels: as passed to `forward`.
            call: how to call the module with them, for the message.

        Returns:
            what the functional form is given: it is conditional exactly when this is not None.

        Raises:
            ValueError: for a conditional module called without `task_labels`.
        """
        if not self.conditional:
            return None
        if task_labels is None:
            raise ValueError(
                f"conditional=True needs 'task_labels' (the task classes, {self.ignore_index} for unknown): "
                f"call it as {call}"
            )
        return task_labels

    def weighted(self, value: Tensor, finite: Tensor | None, **terms: Tensor) -> Tensor:
        """`weight × value`, zero (with a zero gradient) where `finite` is false; records `last_terms`."""
        value = zero_unless(finite, value)
        loss = self.weight * value
        self.last_terms = {"loss": loss.detach(), "value": value.detach(), **{k: v.detach() for k, v in terms.items()}}
        return loss

    def options(self) -> list[str]:
        """The subclass's own options for `repr`, shown before the common ones."""
        return []

    def extra_repr(self) -> str:
        shown = [f"weight={self.weight}", f"conditional={self.conditional}", *self.options()]
        shown += [] if self.ignore_index == IGNORE_INDEX else [f"ignore_index={self.ignore_index}"]
        shown += [] if self.nan_policy == "raise" else [f"nan_policy={self.nan_policy!r}"]
        return ", ".join(shown)
