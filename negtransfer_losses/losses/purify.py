"""`Purify`: erase the linear trace of task-irrelevant labels from features (docs/task-irrelevant-labels.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX
from .._validation import (
    NAN_POLICIES,
    NanPolicy,
    check_choice,
    check_min_batch,
    check_tensor,
    full_precision,
    guard_finite,
)
from ..distributed import is_distributed, sum_across_ranks_detached
from ..functional._core import (
    check_irrelevant_labels,
    check_task_labels,
    column_basis_unchecked,
    erase_unchecked,
    erasure_basis_unchecked,
    member_rows,
    newton_schulz_cut,
    within_class_cross_covariance_unchecked,
)
from ._base import check_count


class Purify(nn.Module):
    """Project out of the features the span of the irrelevant classes' mean differences: `z − z Q Qᵀ`.

    Keeps running (EMA) estimates of the class-conditional means `μ_k` of the features for each value `k`
    of the irrelevant labels `u`; the output is `z − z P` with `P = Q Qᵀ` the orthogonal projector onto
    `span{μ_k − μ̄}` (no gradient through `P`). After it, no linear probe separates the `u`-classes by
    their means (cf. INLP, Ravfogel et al. 2020; LEACE, Belrose et al. 2023, which also matches
    covariances). A transform, not a penalty: place it before the task head.

    - Training mode with labels: the batch's class means update the running means,
      `μ_k ← (1 − w_k) μ_k + w_k · mean(z | u = k)` with `w_k = max(1 / n_k, momentum)`, `n_k` the number of
      batches that held class `k` so far: a plain average at first, an EMA once `n_k > 1 / momentum`; then
      `Q` is recomputed from the new means (`functional.erasure.erasure_basis`) and cached.
    - A small momentum matters: a batch's class means fluctuate along the features' high-variance
      directions, which are usually the task's, and erasing those fluctuations erases the task
      (docs/task-irrelevant-labels.md).
    - **Identity until every class has been seen once.** `ready` (a 0-d bool tensor) says whether it has.
    - Eval mode, or no labels: no update; the cached `Q` is used; deterministic.
    - Running means and which classes were seen are buffers, saved in the `state_dict`; `Q` is recomputed
      from them when a state dict is loaded.
    - Under `torch.distributed` (a process group of several ranks) each update uses the ranks' batches
      together (their class sums and counts, one all-reduce per training call), so every rank keeps the same
      statistics; every rank must call it on every training step.
    - A training step makes no host–device synchronization and traces into one graph under
      `torch.compile(fullgraph=True)`: updates are masked, fixed-shape computations, and `Q` comes from
      matrix products only (see `column_basis`).

    **`conditional=True`** (the library's own) erases only what `u` says beyond the task label `y`: the
    directions of the within-class `u`-mean differences `μ_{k,y} − μ_y`, summed over task classes with
    weights `n_{y,k}` (column `k` of `C` below is `Σ_y n_{y,k} (μ_{k,y} − μ_y) / |E|`). **Limit:** a
    direction whose `u`-effect has opposite signs in two task classes cancels in that sum and is not
    erased; the erased space has rank ≤ `num_irrelevant − 1`, not the full span of every class's
    differences. It keeps a running estimate of the pooled within-class cross-covariance
    `C = Σ_{i∈E} (z_i − z̄_{y_i})(e_{u_i} − ē_{y_i})ᵀ / |E|` (`(dim, num_irrelevant)`, `E` the samples whose
    `u` and `y` are known, in task classes holding at least two `u` values in the batch), updated like the
    means on each batch's sum (`S ← (1 − w) S + w S_batch`, `S_batch = |E| · C_batch`, `w = max(1 / t, momentum)`,
    `t` the batches that had eligible samples; the column space erased does not depend on the division by
    `|E|`, so no count is kept), and erases the column space of `S` (rank ≤
    `num_irrelevant − 1`). Training calls take `purify(z, u, task_labels=y)`; eval needs no labels. It is
    the identity until one batch had eligible samples.

    Args:
        num_irrelevant: number of irrelevant classes `K_u`.
        dim: features per sample (after flattening); `(B, dim)` or maps `(B, *shape)` with `prod(shape) = dim`.
        momentum: EMA weight of a new batch, in `(0, 1]`.
        conditional: erase the within-task-class differences only (needs `task_labels` in training).
        ignore_index: the label of unknown samples (`u` and `y`).
        rtol: directions with singular value at or below `rtol ×` the largest are not erased, in `[1e-12, 1)`
            (`functional.erasure.column_basis`).
        nan_policy: a training batch with NaN/inf features `"raise"`s (and, where the error comes later, on
            a GPU or under `torch.compile`, is left out of the running means meanwhile), is left out of
            them (`"skip"`), or updates them anyway (`"propagate"`, which corrupts them). The output is the
            erased input either way (NaN stays NaN).

    Raises:
        ValueError: `num_irrelevant` or `dim` not an int (or a bool), `num_irrelevant < 2`, `dim < 1`,
            `momentum` outside `(0, 1]`, `rtol` outside `[1e-12, 1)` or an unknown `nan_policy`.
    """

    class_means: Tensor
    batches_seen: Tensor
    cross_covariance_sum: Tensor
    projection: Tensor

    def __init__(
        self,
        num_irrelevant: int,
        dim: int,
        *,
        momentum: float = 0.01,
        conditional: bool = False,
        ignore_index: int = IGNORE_INDEX,
        rtol: float = 1e-6,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        check_count(num_irrelevant, "num_irrelevant", minimum=2, why="one class has no mean differences")
        check_count(dim, "dim", minimum=1, meaning="the number of features per sample")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"'momentum' must be in (0, 1], got {momentum}")
        newton_schulz_cut(rtol)  # validates rtol
        check_choice(nan_policy, "nan_policy", NAN_POLICIES)
        self.nan_policy: NanPolicy = nan_policy
        self.num_irrelevant = num_irrelevant
        self.dim = dim
        self.momentum = momentum
        self.conditional = bool(conditional)
        self.ignore_index = ignore_index
        self.rtol = rtol
        if self.conditional:
            self.register_buffer("cross_covariance_sum", torch.zeros(dim, num_irrelevant))
            self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        else:
            self.register_buffer("class_means", torch.zeros(num_irrelevant, dim))
            self.register_buffer("batches_seen", torch.zeros(num_irrelevant, dtype=torch.long))
        # the cached Q of `erase` (zero until ready): derived from the statistics, recomputed on load
        self.register_buffer("projection", torch.zeros(dim, num_irrelevant), persistent=False)
        self.register_load_state_dict_post_hook(_refresh_after_load)  # type: ignore[no-untyped-call]

    @property
    def ready(self) -> Tensor:
        """0-d bool tensor: whether the output can differ from the input (every class seen; conditional: one
        batch with eligible samples). Read it with `bool(...)` outside the training step (that waits for the device)."""
        ready: Tensor = torch.all(self.batches_seen > 0)
        return ready

    def basis(self) -> Tensor:
        """The erased directions as an orthonormal `(dim, r)` basis (`r = 0` until `ready`), for inspection.

        Its shape depends on the data, so it reads the device (a host synchronization): not for the training
        step, which uses the cached `(dim, num_irrelevant)` matrix `projection` (`Q` with `Q Qᵀ` the projector).
        """
        u, singular, _ = torch.linalg.svd(self.projection.detach().double(), full_matrices=False)
        basis: Tensor = u[:, singular > 0.5].to(self.projection.dtype)
        return basis

    def forward(
        self, features: Tensor, irrelevant_labels: Tensor | None = None, *, task_labels: Tensor | None = None
    ) -> Tensor:
        """The features with the irrelevant classes' mean differences projected out.

        Args:
            features: `(B, dim)` or maps `(B, *shape)` with `dim` values per sample.
            irrelevant_labels: `(B,)` labels `u` in `[0, num_irrelevant)` or `ignore_index`; in training
                mode they update the running statistics (none: no update).
            task_labels: `(B,)` task classes `y` or `ignore_index`; required with `irrelevant_labels` in
                training when `conditional=True`, unused otherwise (as in the suppression losses).

        Returns:
            `features − features Q Qᵀ` in the features' shape and dtype; `features` itself until `ready`.

        Raises:
            TypeError: `features` is not a floating-point tensor, or labels are not integer tensors.
            ValueError: `features` do not hold `dim` values per sample, labels of the wrong shape, device or
                range, `task_labels` missing for a conditional `Purify` in training, or NaN/inf features in
                training with `nan_policy="raise"`.
        """
        check_tensor(features, "features")
        check_min_batch(features.shape[0], 1, what="Purify", name="features")
        flat = features.reshape(features.shape[0], -1)
        if features.dim() < 2 or flat.shape[1] != self.dim:
            raise ValueError(
                f"'features' must be (B, {self.dim}) or maps with {self.dim} values per sample, "
                f"got shape {tuple(features.shape)}"
            )
        if self.training and irrelevant_labels is not None:
            check_irrelevant_labels(irrelevant_labels, self.num_irrelevant, features, ignore_index=self.ignore_index)
            if self.conditional:
                if task_labels is None:
                    raise ValueError(
                        "Purify(conditional=True) needs 'task_labels' with the irrelevant labels in training: "
                        "purify(z, u, task_labels=y) (eval needs no labels)"
                    )
                check_task_labels(
                    task_labels, features.shape[0], ignore_index=self.ignore_index, device=features.device
                )
            guarded, finite = guard_finite({"features": flat.detach()}, self.nan_policy)
            z = guarded["features"]
            if finite is None and self.nan_policy == "raise":
                # the error may come later (a GPU reads its flag a few checks on, compiled code skips it):
                # meanwhile the running statistics never take in a non-finite batch
                finite = torch.isfinite(z).all()
            if not self.conditional:  # under the caller's autocast, as it always ran (its class sums are a matmul)
                _update_class_means(self, z, irrelevant_labels, finite)
        with full_precision(features):  # once, for the conditional statistics, the basis and the erasure
            if self.training and irrelevant_labels is not None:
                if self.conditional:
                    assert task_labels is not None
                    _update_cross_covariance(self, z, irrelevant_labels, task_labels, finite)
                self._refresh_projection()
            erased = erase_unchecked(features, self.projection)
        return torch.where(self.ready, erased, features)

    @torch.no_grad()
    def _refresh_projection(self) -> None:
        """Recompute the cached `Q` from the running statistics (zero until `ready`); the caller has switched
        autocast off (`forward`, or `_refresh_after_load`)."""
        if self.conditional:
            q = column_basis_unchecked(self.cross_covariance_sum, self.rtol)  # |E| would only scale it
        else:
            q = erasure_basis_unchecked(self.class_means, self.rtol)
        q = torch.where(self.ready, q, torch.zeros((), dtype=q.dtype, device=q.device))
        self.projection.copy_(q.to(self.projection.dtype))

    def extra_repr(self) -> str:
        return (
            f"num_irrelevant={self.num_irrelevant}, dim={self.dim}, momentum={self.momentum}, "
            f"conditional={self.conditional}"
        )


@torch.no_grad()
def _update_class_means(purify: Purify, z: Tensor, labels: Tensor, finite: Tensor | None) -> None:
    """`μ_k ← (1 − w_k) μ_k + w_k · mean(z | u = k)` for the classes present (and a finite batch), in place."""
    dtype = purify.class_means.dtype
    classes = torch.arange(purify.num_irrelevant, device=labels.device)
    members = (labels[:, None] == classes[None, :]).to(dtype)  # (n, K); ignore_index matches no class
    counts = members.sum(dim=0)
    present = counts > 0
    if finite is not None:
        present = present & finite
    z = member_rows(z.to(dtype), labels != purify.ignore_index)  # unknown rows: no NaN
    sums = members.T @ z
    if is_distributed():
        sums, counts, present = _summed_over_ranks(sums, counts, finite)
    batch_means = sums / counts.clamp_min(1.0)[:, None]
    seen = purify.batches_seen + present.long()
    weight = (1.0 / seen.clamp_min(1).to(dtype)).clamp_min(purify.momentum)[:, None]
    updated = (1.0 - weight) * purify.class_means + weight * batch_means
    purify.class_means.copy_(torch.where(present[:, None], updated, purify.class_means))
    purify.batches_seen.copy_(seen)


@torch.no_grad()
def _update_cross_covariance(
    purify: Purify, z: Tensor, labels: Tensor, task_labels: Tensor, finite: Tensor | None
) -> None:
    """`S ← (1 − w) S + w S_batch` (the sums) when the batch has eligible samples (and is finite), in place."""
    # the labels were checked in forward
    batch_sum, count = within_class_cross_covariance_unchecked(  # autocast off (forward)
        z, labels, task_labels, purify.num_irrelevant, purify.ignore_index
    )
    dtype = purify.cross_covariance_sum.dtype
    update = count > 0
    if finite is not None:
        update = update & finite
    if is_distributed():
        batch_sum, count, update = _summed_over_ranks(batch_sum, count, finite)
    seen = purify.batches_seen + update.long()
    weight = (1.0 / seen.clamp_min(1).to(dtype)).clamp_min(purify.momentum)
    new_sum = (1.0 - weight) * purify.cross_covariance_sum + weight * batch_sum.to(dtype)
    purify.cross_covariance_sum.copy_(torch.where(update, new_sum, purify.cross_covariance_sum))
    purify.batches_seen.copy_(seen)


def _refresh_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    assert isinstance(module, Purify)
    with full_precision(module.projection):
        module._refresh_projection()


def _summed_over_ranks(sums: Tensor, counts: Tensor, finite: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """A batch's statistics over every rank's batch together: `(sums, counts, present)` summed in one all-reduce.

    `present` (per class, or one flag) is whether the ranks' batches together hold the class and none of them
    is non-finite; a non-finite rank's sums are left out, so NaN never reaches another rank.
    """
    usable = torch.ones((), dtype=torch.bool, device=sums.device) if finite is None else finite
    zero = torch.zeros((), dtype=sums.dtype, device=sums.device)
    packed = torch.cat(
        [
            torch.where(usable, sums, zero).reshape(-1),
            counts.to(sums.dtype).reshape(-1),
            (~usable).to(sums.dtype).reshape(1),
        ]
    )
    total = sum_across_ranks_detached(packed)
    summed = total[: sums.numel()].reshape(sums.shape)
    summed_counts = total[sums.numel() : -1].reshape(counts.shape).to(counts.dtype)
    return summed, summed_counts, (summed_counts > 0) & (total[-1] == 0)
