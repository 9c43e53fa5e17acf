"""`TaskIrrelevantSuppression`: keep features from carrying a factor the task must ignore.

Formulas: docs/task-irrelevant-labels.md.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, TypeAlias

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import NAN_POLICIES, NanPolicy, check_choice, guard_finite, zero_unless
from ..distributed import GATHERS, Gather
from ..functional.adversarial import DEFAULT_STRENGTH, adversarial_suppression
from ..functional.similarity import KERNELS, Kernel
from ..functional.suppression import check_kernel, irrelevant_cka, irrelevant_hsic

SuppressionMethod: TypeAlias = Literal["adversarial", "hsic", "cka"]
SUPPRESSION_METHODS: tuple[SuppressionMethod, ...] = ("adversarial", "hsic", "cka")

# which options reach the math of each method; any other option given (not None) raises
_OPTIONS: dict[str, tuple[str, ...]] = {
    "adversarial": (
        "num_irrelevant",
        "dim",
        "head",
        "strength",
        "warmup_steps",
        "entropy_weight",
        "head_lr_multiplier",
        "head_steps",
        "head_lr",
        "check_head_after",
    ),
    "hsic": ("num_irrelevant", "kernel", "normalized", "sigma", "unbiased", "gather"),
    "cka": ("kernel", "sigma", "unbiased", "gather"),
}
_DEFAULTS: dict[str, dict[str, object]] = {
    "adversarial": {
        "strength": DEFAULT_STRENGTH,
        "warmup_steps": 0,
        "entropy_weight": 0.0,
        "head_lr_multiplier": 10.0,
        "head_steps": 10,
        "head_lr": 3e-3,
        "check_head_after": 100,
    },
    "hsic": {"kernel": "linear", "normalized": False, "unbiased": True, "gather": "local"},
    "cka": {"kernel": "linear", "unbiased": False, "gather": "local"},
}


class HSICSuppression(nn.Module):
    """`weight · HSIC(z, onehot(u))`: a penalty on what the features `z` say about irrelevant labels `u`.

    `HSIC(K_z, L_u)` between a linear (or RBF) kernel on the features and the delta kernel on `u`,
    `L_u[i, j] = [u_i = u_j]`, over the samples whose `u` is known: Song et al.'s unbiased estimator `HSIC_1`
    by default (at least 4 known labels), the biased `HSIC_0 = tr(K H L H) / (n-1)²` with `unbiased=False`
    (at least 2); `normalized=True` gives the CKA-style ratio `HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))`
    in about [0, 1]. No adversary, no parameters (ReBias, Bahng et al. ICML 2020, uses HSIC this way against
    a biased network). Not claimed to be the exact mechanism of the TIRTL / PurifiedLearning papers (Li et
    al.), which was not published: see docs/task-irrelevant-labels.md.

    **`conditional=True`** (the library's own) removes only what `u` says beyond the task label `y`, passed
    as `task_labels=`: `Σ_c n_c · HSIC(K_z[E_c], L_u[E_c]) / Σ_c n_c`, the within-class values weighted by
    class size, over the task classes `c` that hold at least as many samples with known `u` and `y` as the
    estimator needs and at least two distinct `u` values (`E_c` those samples, `n_c = |E_c|`).

    Labels equal to `ignore_index` are unknown; fewer known samples than the estimator needs (or no eligible
    class) give a zero loss with a zero gradient. Features `(B, D)` or maps (flattened). A training step
    makes no host-device synchronization and compiles as one graph.

    Args:
        num_irrelevant: number of irrelevant classes `K_u` (labels in `[0, num_irrelevant)`).
        weight: the factor of the penalty.
        conditional: the within-task-class form (forward then needs `task_labels`).
        kernel: the kernel on the features, `"linear"` or `"rbf"`.
        sigma: the RBF bandwidth (only with `kernel="rbf"`); None takes the median distance between rows.
        normalized: the CKA-style ratio instead of HSIC.
        unbiased: the unbiased estimator (True) or the biased one.
        gather: `"global"` computes it on every rank's batch concatenated (DDP); `"local"` on this rank's.
        ignore_index: the label of samples whose class is unknown (`u` and `y`).
        nan_policy: non-finite features raise a `ValueError` (`"raise"`), give a zero loss (`"skip"`), or
            pass through (`"propagate"`).

    Raises:
        ValueError: for a `num_irrelevant` below 1, an unknown `kernel`, `gather` or `nan_policy`, or a
            `sigma` without `kernel="rbf"` or not positive.
    """

    def __init__(
        self,
        num_irrelevant: int,
        *,
        weight: float = 1.0,
        conditional: bool = False,
        kernel: Kernel = "linear",
        sigma: float | None = None,
        normalized: bool = False,
        unbiased: bool = True,
        gather: Gather = "local",
        ignore_index: int = IGNORE_INDEX,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        if isinstance(num_irrelevant, bool) or not isinstance(num_irrelevant, int) or num_irrelevant < 1:
            raise ValueError(
                f"'num_irrelevant' must be the number of irrelevant classes (an int ≥ 1), got {num_irrelevant!r}"
            )
        _check_options(kernel, sigma, gather, nan_policy)
        self.num_irrelevant = num_irrelevant
        self.weight = float(weight)
        self.conditional = bool(conditional)
        self.kernel: Kernel = kernel
        self.sigma = sigma
        self.normalized = bool(normalized)
        self.unbiased = bool(unbiased)
        self.gather: Gather = gather
        self.ignore_index = ignore_index
        self.nan_policy: NanPolicy = nan_policy
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, features: Tensor, irrelevant_labels: Tensor, *, task_labels: Tensor | None = None) -> Tensor:
        """The weighted penalty.

        Args:
            features: `(B, ...)`, flattened to `(B, D)`.
            irrelevant_labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`.
            task_labels: `(B,)` task classes (`ignore_index` for unknown); required with `conditional=True`,
                refused otherwise.

        Returns:
            a scalar tensor; `last_terms` then holds `"loss"` (it) and `"value"` (the unweighted HSIC).

        Raises:
            ValueError: for missing or unexpected `task_labels`, labels outside their range, non-finite
                features (`nan_policy="raise"`), or a batch smaller than the estimator needs.
            TypeError: for non-floating features or non-integer labels.
        """
        _check_task_labels_given(
            self.conditional, task_labels, "suppression(features, irrelevant_labels, task_labels=y)"
        )
        guarded, finite = guard_finite({"features": features}, self.nan_policy)
        value = irrelevant_hsic(
            guarded["features"],
            irrelevant_labels,
            self.num_irrelevant,
            kernel=self.kernel,
            normalized=self.normalized,
            sigma=self.sigma,
            unbiased=self.unbiased,
            gather=self.gather,
            ignore_index=self.ignore_index,
            task_labels=task_labels,
        )
        value = zero_unless(finite, value)
        loss = self.weight * value
        self.last_terms = {"loss": loss.detach(), "value": value.detach()}
        return loss

    def extra_repr(self) -> str:
        options = [
            f"num_irrelevant={self.num_irrelevant}",
            f"weight={self.weight}",
            f"conditional={self.conditional}",
            f"kernel={self.kernel!r}",
            f"normalized={self.normalized}",
            f"unbiased={self.unbiased}",
        ]
        return ", ".join(options + _optional_repr(self.sigma, self.gather, self.ignore_index, self.nan_policy))


class CKASuppression(nn.Module):
    """`weight · CKA(z, r)`: a penalty on the similarity of the features `z` to a frozen irrelevant network's `r`.

    `CKA(Z, R) = HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))` (Kornblith et al. 2019) between the features
    and the features `r` of a network trained on the irrelevant factor, on the same batch; linear kernels
    and the biased estimator by default (`unbiased=True`: the unbiased HSIC; `kernel="rbf"`: RBF kernels,
    bandwidth `sigma` or the median heuristic). It needs no labels; `r` is detached and may differ in width.
    Constant features give 0. Not claimed to be the exact mechanism of the TIRTL / PurifiedLearning papers
    (Li et al.), which was not published: see docs/task-irrelevant-labels.md.

    **`conditional=True`** (the library's own) compares only the within-class variation of the two
    networks: both sides are centred within each task class (`task_labels=`) over the samples whose task
    label is known, `CKA(Z - M_y Z, R - M_y R)` with `M_y` the within-class averaging matrix. Fewer known
    samples than the estimator needs (2 biased, 4 unbiased) give a zero loss with a zero gradient.

    A training step makes no host-device synchronization and compiles as one graph.

    Args:
        weight: the factor of the penalty.
        conditional: the within-task-class form (forward then needs `task_labels`).
        kernel: `"linear"` or `"rbf"`, the same on both sides.
        sigma: the RBF bandwidth (only with `kernel="rbf"`); None takes the median distance, per side.
        unbiased: the unbiased HSIC (a batch of at least 4) instead of the biased one (at least 2).
        gather: `"global"` computes it on every rank's batch concatenated (DDP); `"local"` on this rank's.
        ignore_index: the task label of samples whose class is unknown.
        nan_policy: non-finite inputs raise a `ValueError` (`"raise"`), give a zero loss (`"skip"`), or pass
            through (`"propagate"`).

    Raises:
        ValueError: for an unknown `kernel`, `gather` or `nan_policy`, or a `sigma` without `kernel="rbf"` or
            not positive.
    """

    def __init__(
        self,
        *,
        weight: float = 1.0,
        conditional: bool = False,
        kernel: Kernel = "linear",
        sigma: float | None = None,
        unbiased: bool = False,
        gather: Gather = "local",
        ignore_index: int = IGNORE_INDEX,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        _check_options(kernel, sigma, gather, nan_policy)
        self.weight = float(weight)
        self.conditional = bool(conditional)
        self.kernel: Kernel = kernel
        self.sigma = sigma
        self.unbiased = bool(unbiased)
        self.gather: Gather = gather
        self.ignore_index = ignore_index
        self.nan_policy: NanPolicy = nan_policy
        self.last_terms: dict[str, Tensor] = {}

    def forward(self, features: Tensor, irrelevant_features: Tensor, *, task_labels: Tensor | None = None) -> Tensor:
        """The weighted penalty.

        Args:
            features: `(B, ...)`, flattened to `(B, D)`.
            irrelevant_features: `(B, ...)`, flattened to `(B, D')`: the frozen irrelevant network's features.
            task_labels: `(B,)` task classes (`ignore_index` for unknown); required with `conditional=True`,
                refused otherwise.

        Returns:
            a scalar tensor; `last_terms` then holds `"loss"` (it) and `"value"` (the unweighted CKA).

        Raises:
            ValueError: for missing or unexpected `task_labels`, batches of different sizes, non-finite inputs
                (`nan_policy="raise"`), or a batch smaller than the estimator needs.
            TypeError: for non-floating features or non-integer task labels.
        """
        _check_task_labels_given(
            self.conditional, task_labels, "suppression(features, irrelevant_features, task_labels=y)"
        )
        guarded, finite = guard_finite(
            {"features": features, "irrelevant_features": irrelevant_features}, self.nan_policy
        )
        value = irrelevant_cka(
            guarded["features"],
            guarded["irrelevant_features"],
            kernel=self.kernel,
            sigma=self.sigma,
            unbiased=self.unbiased,
            gather=self.gather,
            ignore_index=self.ignore_index,
            task_labels=task_labels,
        )
        value = zero_unless(finite, value)
        loss = self.weight * value
        self.last_terms = {"loss": loss.detach(), "value": value.detach()}
        return loss

    def extra_repr(self) -> str:
        options = [
            f"weight={self.weight}",
            f"conditional={self.conditional}",
            f"kernel={self.kernel!r}",
            f"unbiased={self.unbiased}",
        ]
        return ", ".join(options + _optional_repr(self.sigma, self.gather, self.ignore_index, self.nan_policy))


def _check_options(kernel: str, sigma: float | None, gather: str, nan_policy: str) -> None:
    check_choice(kernel, "kernel", KERNELS)
    check_choice(gather, "gather", GATHERS)
    check_choice(nan_policy, "nan_policy", NAN_POLICIES)
    if sigma is not None and kernel != "rbf":
        raise ValueError(f"'sigma' is the RBF bandwidth: it needs kernel='rbf', got kernel={kernel!r}")
    check_kernel(kernel, sigma)


def _check_task_labels_given(conditional: bool, task_labels: Tensor | None, call: str) -> None:
    if conditional and task_labels is None:
        raise ValueError(f"conditional=True needs 'task_labels' (the task classes): call it as {call}")
    if not conditional and task_labels is not None:
        raise ValueError("'task_labels' are used only with conditional=True; construct the module with it")


def _optional_repr(sigma: float | None, gather: str, ignore_index: int, nan_policy: str) -> list[str]:
    """The options shown only where they differ from their defaults."""
    shown = [] if sigma is None else [f"sigma={sigma}"]
    shown += [] if gather == "local" else [f"gather={gather!r}"]
    shown += [] if ignore_index == IGNORE_INDEX else [f"ignore_index={ignore_index}"]
    return shown + ([] if nan_policy == "raise" else [f"nan_policy={nan_policy!r}"])


class TaskIrrelevantSuppression(nn.Module):
    """`weight · penalty(z, u)`: a penalty on what the features `z` say about irrelevant labels `u`.

    - `"adversarial"`: a head `h` on gradient-reversed features, `CE(h(GRL_λ(z)), u)` over known labels
      (Ganin & Lempitsky 2015), optionally `+ entropy_weight · mean Σ p log p` of `h(z)` (Kim et al.,
      CVPR 2019). λ rises from 0 to `strength` over `warmup_steps` training calls with DANN's schedule
      `2 / (1 + exp(-10 t)) - 1`. **This module owns the head's parameters: give them to the optimizer**,
      e.g. `torch.optim.Adam([*model.parameters(), *suppression.parameters()])`. If they have not changed
      after `check_head_after` training calls, a warning says so.
      **The head learns `head_lr_multiplier` (m, default 10) times faster than the optimizer's learning
      rate**, so that it keeps up with the encoder it plays against: the module stores the head's
      parameters divided by m and calls the head with `m × stored` (the stored values get the gradient of
      the head's own, unscaled), so one optimizer step moves the head m times as far, under SGD and
      Adam alike. A `head` you pass has its parameters divided by m in place at construction; read the
      head's effective parameters with `head_parameters()`. `head_lr_multiplier=1` turns this off.
      **Before each training call's loss, the head also takes `head_steps` (default 10) Adam steps of its
      own** (learning rate `head_lr` = 3e-3 on the stored parameters, so `m × head_lr` on the effective
      ones) on the batch's detached features, so the features are pushed against a head that has caught
      up with them (a gradient-reversal adversary that lags behind is fooled without the factor being
      removed). That inner optimizer's state lives in the module and is not saved in the `state_dict`;
      `head_steps=0` turns it off. The user's optimizer still trains the head as well.
    - `"hsic"`: `HSIC(z, onehot(u))`, Song et al.'s unbiased estimator (`unbiased=False`: the biased one),
      linear (or RBF, bandwidth `sigma` or the median heuristic) kernel on `z`; `normalized=True` for the
      CKA-style ratio (ReBias, Bahng et al. 2020). No parameters.
    - `"cka"`: CKA (linear by default, biased estimator unless `unbiased=True`) between `z` and a frozen
      irrelevant network's features on the same batch (Kornblith et al. 2019). No parameters, no labels.

    **`conditional=True`** (the library's own; formulas in docs/task-irrelevant-labels.md) removes only what
    `u` says *beyond the task label* `y`, passed as `task_labels=`: `hsic` sums within-class HSIC over
    task classes (weighted by size), `adversarial` shows its head the features centred within their task
    class, `cka` compares the two networks' features centred within task classes. Samples with unknown
    `y` or `u` are left out; a task class with a single `u` value in the batch contributes nothing.

    Every option applies to some methods only: giving one that the chosen method does not use raises a
    `ValueError` (`None` means "the method's default"). Defaults: adversarial `strength=0.3`,
    `warmup_steps=0`, `entropy_weight=0`, `head_lr_multiplier=10`, `head_steps=10`, `head_lr=3e-3`,
    `check_head_after=100`; hsic
    `kernel="linear"`, `normalized=False`, `unbiased=True`; cka `kernel="linear"`, `unbiased=False`;
    `gather="local"` (hsic, cka).

    None of these is claimed to be the exact mechanism of the TIRTL / PurifiedLearning papers (Li et al.),
    which was not published; see docs/task-irrelevant-labels.md.

    Forward: `(features, irrelevant_labels=None, irrelevant_features=None, *, task_labels=None)` → scalar.
    Features `(B, D)` or maps (flattened). Labels equal to `ignore_index` are unknown; a batch with none
    known gives a zero loss and a zero gradient. `gather="global"` computes `hsic` and `cka` on every
    rank's batch concatenated (DDP; the adversarial loss is per sample and needs no gather). Non-finite
    features raise a `ValueError` (`nan_policy="raise"`), give a zero loss (`"skip"`), or pass through
    (`"propagate"`). After each call `last_terms` holds `{"loss", "value"}` (the weighted output and the
    unweighted penalty; `"strength"`, the current λ, for the adversarial method) as detached scalars.
    """

    steps: Tensor

    def __init__(
        self,
        method: SuppressionMethod = "hsic",
        num_irrelevant: int | None = None,
        *,
        weight: float = 1.0,
        conditional: bool = False,
        dim: int | None = None,
        head: nn.Module | None = None,
        strength: float | None = None,
        warmup_steps: int | None = None,
        entropy_weight: float | None = None,
        head_lr_multiplier: float | None = None,
        head_steps: int | None = None,
        head_lr: float | None = None,
        check_head_after: int | None = None,
        kernel: Kernel | None = None,
        normalized: bool | None = None,
        sigma: float | None = None,
        unbiased: bool | None = None,
        gather: Gather | None = None,
        ignore_index: int = IGNORE_INDEX,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        check_choice(method, "method", SUPPRESSION_METHODS)
        given = {
            "num_irrelevant": num_irrelevant,
            "dim": dim,
            "head": head,
            "strength": strength,
            "warmup_steps": warmup_steps,
            "entropy_weight": entropy_weight,
            "head_lr_multiplier": head_lr_multiplier,
            "head_steps": head_steps,
            "head_lr": head_lr,
            "check_head_after": check_head_after,
            "kernel": kernel,
            "normalized": normalized,
            "sigma": sigma,
            "unbiased": unbiased,
            "gather": gather,
        }
        for name, value in given.items():
            if value is not None and name not in _OPTIONS[method]:
                users = [m for m, names in _OPTIONS.items() if name in names]
                raise ValueError(
                    f"'{name}' does not apply to method={method!r} (it is an option of "
                    f"{' and '.join(repr(m) for m in users)}); the options of {method!r} are "
                    f"{', '.join(_OPTIONS[method])}"
                )
        options = {**_DEFAULTS[method], **{k: v for k, v in given.items() if v is not None}}
        check_choice(options.get("kernel", "linear"), "kernel", KERNELS)
        check_choice(options.get("gather", "local"), "gather", GATHERS)
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        if sigma is not None and options["kernel"] != "rbf":
            raise ValueError(f"'sigma' is the RBF bandwidth: it needs kernel='rbf', got kernel={options['kernel']!r}")
        if method != "cka" and (not isinstance(num_irrelevant, int) or num_irrelevant < 1):
            raise ValueError(
                f"method={method!r} needs 'num_irrelevant', the number of irrelevant classes (an int ≥ 1), "
                f"got {num_irrelevant!r}"
            )
        self.method: SuppressionMethod = method
        self.num_irrelevant = num_irrelevant
        self.weight = float(weight)
        self.conditional = bool(conditional)
        self.ignore_index = ignore_index
        self.nan_policy: NanPolicy = nan_policy
        self.kernel: Kernel = options.get("kernel", "linear")  # type: ignore[assignment]
        self.normalized = bool(options.get("normalized", False))
        self.sigma = sigma
        self.unbiased = bool(options.get("unbiased", False))
        self.gather: Gather = options.get("gather", "local")  # type: ignore[assignment]
        self.strength = float(options.get("strength", 0.0))  # type: ignore[arg-type]
        self.warmup_steps = int(options.get("warmup_steps", 0))  # type: ignore[call-overload]
        self.entropy_weight = float(options.get("entropy_weight", 0.0))  # type: ignore[arg-type]
        self.head_lr_multiplier = float(options.get("head_lr_multiplier", 1.0))  # type: ignore[arg-type]
        self.head_steps = int(options.get("head_steps", 0))  # type: ignore[call-overload]
        self.head_lr = float(options.get("head_lr", 0.0))  # type: ignore[arg-type]
        self.check_head_after = int(options.get("check_head_after", 0))  # type: ignore[call-overload]
        if self.head_steps < 0 or (self.head_steps and not self.head_lr > 0):
            raise ValueError(f"'head_steps' must be ≥ 0 and 'head_lr' > 0, got {self.head_steps} and {self.head_lr}")
        self._head_optimizer: torch.optim.Optimizer | None = None
        if self.warmup_steps < 0:
            raise ValueError(f"'warmup_steps' must be ≥ 0, got {self.warmup_steps}")
        if not self.head_lr_multiplier > 0:
            raise ValueError(f"'head_lr_multiplier' must be > 0, got {self.head_lr_multiplier}")
        self.head: nn.Module | None = None
        if method == "adversarial":
            if head is None and dim is None:
                raise ValueError(
                    "method='adversarial' needs 'dim' (the flattened size of a sample's features) "
                    "for its linear head, or a 'head' module mapping (B, dim) to (B, num_irrelevant)"
                )
            if head is not None and dim is not None:
                raise ValueError("give the adversarial method either 'dim' (for its linear head) or 'head', not both")
            assert num_irrelevant is not None
            self.head = head if head is not None else nn.Linear(int(dim), num_irrelevant)  # type: ignore[arg-type]
            with torch.no_grad():
                for p in self.head.parameters():
                    p.div_(self.head_lr_multiplier)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._head_snapshot: list[Tensor] | None = None
        self._head_watch = self.head is not None and self.check_head_after > 0
        self.last_terms: dict[str, Tensor] = {}

    def current_strength(self) -> float:
        """λ of the gradient reversal at the current step (DANN warm-up schedule)."""
        if self.warmup_steps == 0:
            return self.strength
        progress = min(1.0, int(self.steps) / self.warmup_steps)
        return self.strength * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)

    def head_parameters(self) -> dict[str, Tensor]:
        """The adversarial head's effective parameters, `head_lr_multiplier × stored` (differentiable)."""
        if self.head is None:
            raise ValueError(f"method={self.method!r} has no head: only 'adversarial' does")
        m = self.head_lr_multiplier
        if m == 1.0:
            return dict(self.head.named_parameters())
        # value m·p, gradient to p that of the effective parameter: the stored values move like it, m× slower
        return {name: m * p.detach() + (p - p.detach()) for name, p in self.head.named_parameters()}

    def forward(
        self,
        features: Tensor,
        irrelevant_labels: Tensor | None = None,
        irrelevant_features: Tensor | None = None,
        *,
        task_labels: Tensor | None = None,
    ) -> Tensor:
        """The weighted penalty (scalar)."""
        if self.conditional and task_labels is None:
            raise ValueError(
                f"conditional=True needs 'task_labels' (the task classes, {self.ignore_index} for unknown): "
                f"call it as suppression(features, irrelevant_labels=u, task_labels=y)"
            )
        if not self.conditional and task_labels is not None:
            raise ValueError("'task_labels' are used only with conditional=True; construct the module with it")
        inputs = {"features": features}
        if irrelevant_features is not None:
            inputs["irrelevant_features"] = irrelevant_features
        guarded, finite = guard_finite(inputs, self.nan_policy)
        features, irrelevant_features = guarded["features"], guarded.get("irrelevant_features")
        terms: dict[str, Tensor] = {}
        if self.method == "cka":
            if irrelevant_features is None:
                raise ValueError("method='cka' needs 'irrelevant_features': a frozen irrelevant network's features")
            value = irrelevant_cka(
                features,
                irrelevant_features,
                unbiased=self.unbiased,
                gather=self.gather,
                kernel=self.kernel,
                sigma=self.sigma,
                task_labels=task_labels,
                ignore_index=self.ignore_index,
            )
        else:
            if irrelevant_labels is None:
                raise ValueError(
                    f"method={self.method!r} needs 'irrelevant_labels' (use {self.ignore_index} for unknown ones)"
                )
            if irrelevant_features is not None:
                raise ValueError(f"method={self.method!r} takes no 'irrelevant_features' (only 'cka' does)")
            assert self.num_irrelevant is not None
            if self.method == "hsic":
                value = irrelevant_hsic(
                    features,
                    irrelevant_labels,
                    self.num_irrelevant,
                    kernel=self.kernel,
                    normalized=self.normalized,
                    sigma=self.sigma,
                    ignore_index=self.ignore_index,
                    gather=self.gather,
                    unbiased=self.unbiased,
                    task_labels=task_labels,
                )
            else:
                strength = self.current_strength()
                value = self._adversarial(features, irrelevant_labels, task_labels, strength)
                terms["strength"] = torch.tensor(strength, device=value.device)
        value = zero_unless(finite, value)
        loss = self.weight * value
        self.last_terms = {"loss": loss.detach(), "value": value.detach(), **terms}
        return loss

    def _adversarial(self, features: Tensor, labels: Tensor, task_labels: Tensor | None, strength: float) -> Tensor:
        assert self.head is not None and self.num_irrelevant is not None
        if self.training:
            self._check_head_is_trained()
            self.steps += 1
            if self.head_steps and torch.is_grad_enabled():
                self._inner_head_steps(features.detach(), labels, task_labels)
            if self._head_watch:  # the head as the inner steps left it: the user's optimizer must move it
                self._head_snapshot = [p.detach().clone() for p in self.head.parameters()]
        return adversarial_suppression(
            features,
            labels,
            self.head,
            self.num_irrelevant,
            strength,
            self.entropy_weight,
            self.ignore_index,
            task_labels=task_labels,
            head_parameters=self.head_parameters(),
        )

    def _inner_head_steps(self, features: Tensor, labels: Tensor, task_labels: Tensor | None) -> None:
        """`head_steps` Adam steps of the head alone on this batch's (detached) features: the head catches up."""
        assert self.head is not None and self.num_irrelevant is not None
        params = list(self.head.parameters())
        if self._head_optimizer is None or any(
            s["exp_avg"].device != p.device for p in params for s in [self._head_optimizer.state.get(p, {})] if s
        ):
            self._head_optimizer = torch.optim.Adam(params, lr=self.head_lr)
        accumulated = [p.grad for p in params]  # the user's gradients (e.g. accumulation) survive
        for _ in range(self.head_steps):
            loss = adversarial_suppression(
                features,
                labels,
                self.head,
                self.num_irrelevant,
                0.0,
                0.0,
                self.ignore_index,
                task_labels=task_labels,
                head_parameters=self.head_parameters(),
            )
            if not loss.requires_grad:
                break
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            self._head_optimizer.step()
        for p, saved in zip(params, accumulated, strict=True):
            p.grad = saved

    def _check_head_is_trained(self) -> None:
        """Warn once, after `check_head_after` training calls, if no call found the head moved since the last.

        Between two calls only the user's optimizer can change the head (the inner steps run inside a
        call), so a head that never moved there is not in the optimizer.
        """
        assert self.head is not None
        if not self._head_watch:
            return
        if self._head_snapshot is not None and not all(
            torch.equal(a, p) for a, p in zip(self._head_snapshot, self.head.parameters(), strict=True)
        ):
            self._head_watch, self._head_snapshot = False, None
            return
        if int(self.steps) >= self.check_head_after:
            self._head_watch, self._head_snapshot = False, None
            advice = "torch.optim.Adam([*model.parameters(), *suppression.parameters()])"
            message = (
                f"the adversarial head's parameters have not changed in {int(self.steps)} training steps "
                f"(between calls, where only your optimizer moves them): add them to the optimizer, e.g. {advice}"
            )
            warnings.warn(message, stacklevel=5)

    def extra_repr(self) -> str:
        options = [f"method={self.method!r}"]
        if self.method != "cka":
            options.append(f"num_irrelevant={self.num_irrelevant}")
        options += [f"weight={self.weight}", f"conditional={self.conditional}"]
        if self.method == "adversarial":
            options += [
                f"strength={self.strength}",
                f"warmup_steps={self.warmup_steps}",
                f"head_lr_multiplier={self.head_lr_multiplier}",
                f"head_steps={self.head_steps}",
            ]
            if self.entropy_weight:
                options.append(f"entropy_weight={self.entropy_weight}")
        else:
            options += [f"kernel={self.kernel!r}", f"unbiased={self.unbiased}"]
            if self.method == "hsic":
                options.append(f"normalized={self.normalized}")
        return ", ".join(options)
