"""Penalties that keep features from carrying a factor the task must ignore: HSIC, CKA, and their factory.

`HSICSuppression`, `CKASuppression`, and `make_suppression` over them and `AdversarialSuppression` (in
`adversarial.py`). Formulas: docs/task-irrelevant-labels.md.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal, TypeAlias, overload

from torch import Tensor

from .._labels import IGNORE_INDEX
from .._validation import NanPolicy, check_choice, guard_finite
from ..distributed import GATHERS, Gather
from ..functional import KERNELS, Kernel, irrelevant_cka, irrelevant_hsic
from ..functional._core import check_kernel
from ._base import SuppressionLoss, check_count
from .adversarial import AdversarialSuppression

SuppressionMethod: TypeAlias = Literal["adversarial", "hsic", "cka"]
SUPPRESSION_METHODS: tuple[SuppressionMethod, ...] = ("adversarial", "hsic", "cka")


class HSICSuppression(SuppressionLoss):
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
        unbiased: the unbiased estimator (True) or the biased one. The default differs from `CKASuppression`'s
            on purpose: the biased HSIC of independent features and labels is positive, of order `1/n`, so a
            penalty on it pushes towards a floor it cannot reach; the unbiased one is 0 there on average. But the
            unbiased estimate can be negative, and with the linear kernel it has no lower bound (it scales with
            the square of the features): on batches that repeat a few samples (a group-balanced sampler over
            small groups) a penalty on it can grow the features without limit (docs/no-bias-labels.md measured
            it); take `unbiased=False` there.
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
        super().__init__(weight=weight, conditional=conditional, ignore_index=ignore_index, nan_policy=nan_policy)
        self.num_irrelevant = check_count(
            num_irrelevant, "num_irrelevant", minimum=1, meaning="the number of irrelevant classes"
        )
        _check_options(kernel, sigma, gather)
        self.kernel: Kernel = kernel
        self.sigma = sigma
        self.normalized = bool(normalized)
        self.unbiased = bool(unbiased)
        self.gather: Gather = gather

    def forward(self, features: Tensor, irrelevant_labels: Tensor, *, task_labels: Tensor | None = None) -> Tensor:
        """The weighted penalty.

        Args:
            features: `(B, ...)`, flattened to `(B, D)`.
            irrelevant_labels: `(B,)` integers in `[0, num_irrelevant)` or `ignore_index`.
            task_labels: `(B,)` task classes (`ignore_index` for unknown); required with `conditional=True`,
                unused otherwise (one loop serves both forms).

        Returns:
            a scalar tensor; `last_terms` then holds `"loss"` (it) and `"value"` (the unweighted HSIC).

        Raises:
            ValueError: for missing `task_labels` (conditional), labels outside their range, non-finite
                features (`nan_policy="raise"`), or a batch smaller than the estimator needs.
            TypeError: for non-floating features or non-integer labels.
        """
        task_labels = self.task_labels_for(task_labels, "suppression(features, irrelevant_labels, task_labels=y)")
        guarded, finite = guard_finite({"features": features}, self.nan_policy)
        value = irrelevant_hsic(
            guarded["features"],
            irrelevant_labels,
            num_irrelevant=self.num_irrelevant,
            kernel=self.kernel,
            normalized=self.normalized,
            sigma=self.sigma,
            unbiased=self.unbiased,
            gather=self.gather,
            ignore_index=self.ignore_index,
            task_labels=task_labels,
        )
        return self.weighted(value, finite)

    def options(self) -> list[str]:
        shown = [f"kernel={self.kernel!r}", f"normalized={self.normalized}", f"unbiased={self.unbiased}"]
        return shown + _optional_options(self.sigma, self.gather)

    def extra_repr(self) -> str:
        return f"num_irrelevant={self.num_irrelevant}, " + super().extra_repr()


class CKASuppression(SuppressionLoss):
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
        unbiased: the unbiased HSIC (a batch of at least 4) instead of the biased one (at least 2). The default
            (biased) differs from `HSICSuppression`'s on purpose: CKA divides out the biased estimator's scale
            and is Kornblith et al.'s form, bounded in [0, 1]; the unbiased CKA can be negative and is noisy
            at small batches.
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
        super().__init__(weight=weight, conditional=conditional, ignore_index=ignore_index, nan_policy=nan_policy)
        _check_options(kernel, sigma, gather)
        self.kernel: Kernel = kernel
        self.sigma = sigma
        self.unbiased = bool(unbiased)
        self.gather: Gather = gather

    def forward(self, features: Tensor, irrelevant_features: Tensor, *, task_labels: Tensor | None = None) -> Tensor:
        """The weighted penalty.

        Args:
            features: `(B, ...)`, flattened to `(B, D)`.
            irrelevant_features: `(B, ...)`, flattened to `(B, D')`: the frozen irrelevant network's features.
            task_labels: `(B,)` task classes (`ignore_index` for unknown); required with `conditional=True`,
                unused otherwise (one loop serves both forms).

        Returns:
            a scalar tensor; `last_terms` then holds `"loss"` (it) and `"value"` (the unweighted CKA).

        Raises:
            ValueError: for missing `task_labels` (conditional), batches of different sizes, non-finite inputs
                (`nan_policy="raise"`), or a batch smaller than the estimator needs.
            TypeError: for non-floating features or non-integer task labels.
        """
        task_labels = self.task_labels_for(task_labels, "suppression(features, irrelevant_features, task_labels=y)")
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
        return self.weighted(value, finite)

    def options(self) -> list[str]:
        return [f"kernel={self.kernel!r}", f"unbiased={self.unbiased}", *_optional_options(self.sigma, self.gather)]


def _check_options(kernel: str, sigma: float | None, gather: str) -> None:
    check_choice(kernel, "kernel", KERNELS)
    check_choice(gather, "gather", GATHERS)
    if sigma is not None and kernel != "rbf":
        raise ValueError(f"'sigma' is the RBF bandwidth: it needs kernel='rbf', got kernel={kernel!r}")
    check_kernel(kernel, sigma)


def _optional_options(sigma: float | None, gather: str) -> list[str]:
    """The kernel options shown only where they differ from their defaults."""
    return ([] if sigma is None else [f"sigma={sigma}"]) + ([] if gather == "local" else [f"gather={gather!r}"])


@overload
def make_suppression(method: Literal["adversarial"], /, **options: Any) -> AdversarialSuppression: ...
@overload
def make_suppression(method: Literal["hsic"], /, **options: Any) -> HSICSuppression: ...
@overload
def make_suppression(method: Literal["cka"], /, **options: Any) -> CKASuppression: ...
@overload
def make_suppression(method: SuppressionMethod, /, **options: Any) -> SuppressionLoss: ...
def make_suppression(method: SuppressionMethod, /, **options: Any) -> SuppressionLoss:
    """The suppression module of `method`, built with `options`: for sweeps and configuration files.

    `make_suppression("hsic", num_irrelevant=10, weight=3.0)` is `HSICSuppression(num_irrelevant=10,
    weight=3.0)`; the three methods are `"adversarial"` (`AdversarialSuppression`), `"hsic"`
    (`HSICSuppression`) and `"cka"` (`CKASuppression`), each with only its own options.

    Args:
        method: `"adversarial"`, `"hsic"` or `"cka"`.
        **options: the chosen class's constructor arguments, by name.

    Returns:
        the module.

    Raises:
        ValueError: for an unknown `method`, or an option value the class refuses.
        TypeError: for an option the class does not have, or a required one missing, naming the method and
            its options.
    """
    check_choice(method, "method", SUPPRESSION_METHODS)
    module = _CLASSES[method]
    signature = inspect.signature(module)
    try:
        signature.bind(**options)
    except TypeError as error:
        valid = ", ".join(signature.parameters)
        raise TypeError(
            f"make_suppression({method!r}) builds {module.__name__}: {error}; its options are {valid}"
        ) from None
    return module(**options)


_CLASSES: dict[str, type[SuppressionLoss]] = {
    "adversarial": AdversarialSuppression,
    "hsic": HSICSuppression,
    "cka": CKASuppression,
}
