"""`Purify`: erase the linear trace of task-irrelevant labels from features (docs/task-irrelevant-labels.md)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX, check_labels
from .._validation import NAN_POLICIES, NanPolicy, check_choice, check_min_batch, check_tensor, guard_finite
from ..functional._groups import check_task_labels
from ..functional.erasure import column_basis, erase, erasure_basis, within_class_cross_covariance


class Purify(nn.Module):
    """Project out of the features the span of the irrelevant classes' mean differences.

    Keeps running (EMA) estimates of the class-conditional means `μ_k` of the features for each value `k`
    of the irrelevant labels `u`; the output is `z - z P` with `P` the orthogonal projector onto
    `span{μ_k - μ̄}` (no gradient through `P`). After it, no linear probe separates the `u`-classes by
    their means (cf. INLP, Ravfogel et al. 2020; LEACE, Belrose et al. 2023, which also matches
    covariances). A transform, not a penalty: place it before the task head.

    - Training mode with labels: the batch's class means update the running means,
      `μ_k ← (1 - w_k) μ_k + w_k · mean(z | u = k)` with `w_k = max(1 / n_k, momentum)`, `n_k` the number of
      batches that held class `k` so far: a plain average at first, an EMA once `n_k > 1 / momentum`.
    - A small momentum matters: a batch's class means fluctuate along the features' high-variance
      directions, which are usually the task's, and erasing those fluctuations erases the task. On the
      synthetic benchmark (docs/task-irrelevant-labels.md) momentum 0.1 cost 23 points of task accuracy,
      0.01 none.
    - **Identity until every class has been seen once.** `ready` says whether it has.
    - Eval mode, or no labels: no update; deterministic.
    - Running means and which classes were seen are buffers, saved in the `state_dict`.

    **`conditional=True`** (the library's own) erases only what `u` says beyond the task label `y`: the
    directions of the within-class `u`-mean differences `μ_{k,y} - μ_y`, summed over task classes with
    weights `n_{y,k}` (column `k` of `C` below is `Σ_y n_{y,k} (μ_{k,y} - μ_y) / |E|`). **Limit:** a
    direction whose `u`-effect has opposite signs in two task classes cancels in that sum and is not
    erased; the erased space has rank ≤ `num_irrelevant - 1`, not the full span of every class's
    differences. It keeps a
    running estimate of the pooled within-class cross-covariance
    `C = Σ_{i∈E} (z_i - z̄_{y_i})(e_{u_i} - ē_{y_i})ᵀ / |E|` (`(dim, num_irrelevant)`, `E` the samples whose
    `u` and `y` are known, in task classes holding at least two `u` values in the batch), updated like the
    means (`C ← (1 - w) C + w C_batch`, `w = max(1 / t, momentum)`, `t` the batches that had eligible samples,
    each batch's sum and count averaged separately), and erases the column space of `C` (rank ≤
    `num_irrelevant - 1`). Training calls take `purify(z, u, task_labels=y)`; eval needs no labels. It is
    the identity until one batch had eligible samples.

    Args:
        num_irrelevant: number of irrelevant classes `K_u`.
        dim: features per sample (after flattening); `(B, dim)` or maps `(B, *shape)` with `prod(shape) = dim`.
        momentum: EMA weight of a new batch.
        conditional: erase the within-task-class differences only (needs `task_labels` in training).
        ignore_index: the label of unknown samples (`u` and `y`).
        rtol: directions with singular value below `rtol × largest` are not erased.
        nan_policy: a training batch with NaN/inf features `"raise"`s, is left out of the running means
            (`"skip"`), or updates them anyway (`"propagate"`, which corrupts them). The output is the
            erased input either way (NaN stays NaN).
    """

    class_means: Tensor
    batches_seen: Tensor
    cross_covariance_sum: Tensor
    cross_covariance_count: Tensor

    def __init__(
        self,
        num_irrelevant: int,
        dim: int,
        momentum: float = 0.01,
        *,
        conditional: bool = False,
        ignore_index: int = IGNORE_INDEX,
        rtol: float = 1e-6,
        nan_policy: NanPolicy = "raise",
    ) -> None:
        super().__init__()
        if num_irrelevant < 2:
            raise ValueError(f"'num_irrelevant' must be ≥ 2 (one class has no mean differences), got {num_irrelevant}")
        if dim < 1:
            raise ValueError(f"'dim' must be ≥ 1, got {dim}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"'momentum' must be in (0, 1], got {momentum}")
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
            self.register_buffer("cross_covariance_count", torch.zeros(()))
            self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        else:
            self.register_buffer("class_means", torch.zeros(num_irrelevant, dim))
            self.register_buffer("batches_seen", torch.zeros(num_irrelevant, dtype=torch.long))

    @property
    def ready(self) -> bool:
        """Whether the output can differ from the input: every class seen (conditional: one eligible batch)."""
        return bool((self.batches_seen > 0).all())

    def basis(self) -> Tensor:
        """The erased directions, an orthonormal `(dim, r)` basis (`r = 0` until `ready`)."""
        if self.conditional:
            if not self.ready:
                return self.cross_covariance_sum.new_zeros(self.dim, 0)
            covariance = self.cross_covariance_sum.double() / float(self.cross_covariance_count)
            return column_basis(covariance, self.rtol).to(self.cross_covariance_sum.dtype)
        if not self.ready:
            return self.class_means.new_zeros(self.dim, 0)
        return erasure_basis(self.class_means.double(), self.rtol).to(self.class_means.dtype)

    def forward(
        self, features: Tensor, irrelevant_labels: Tensor | None = None, *, task_labels: Tensor | None = None
    ) -> Tensor:
        """The features with the irrelevant classes' mean differences projected out, in their own shape."""
        check_tensor(features, "features")
        check_min_batch(features.shape[0], 1, what="Purify", name="features")
        flat = features.reshape(features.shape[0], -1)
        if features.dim() < 2 or flat.shape[1] != self.dim:
            raise ValueError(
                f"'features' must be (B, {self.dim}) or maps with {self.dim} values per sample, "
                f"got shape {tuple(features.shape)}"
            )
        if task_labels is not None and not self.conditional:
            raise ValueError("'task_labels' are used only by Purify(conditional=True)")
        if self.training and irrelevant_labels is not None:
            check_labels(
                irrelevant_labels,
                self.num_irrelevant,
                features.shape[0],
                name="irrelevant_labels",
                what="irrelevant classes",
                ignore_index=self.ignore_index,
                device=features.device,
            )
            if self.conditional:
                if task_labels is None:
                    raise ValueError(
                        "Purify(conditional=True) needs 'task_labels' with the irrelevant labels in training: "
                        "purify(z, u, task_labels=y) (eval needs no labels)"
                    )
                check_task_labels(
                    task_labels, features.shape[0], ignore_index=self.ignore_index, device=features.device
                )
            _, finite = guard_finite({"features": flat}, self.nan_policy)
            if finite is None or bool(finite):
                if self.conditional:
                    assert task_labels is not None
                    self._update_conditional(flat.detach(), irrelevant_labels, task_labels)
                else:
                    self._update(flat.detach(), irrelevant_labels)
        if not self.ready:
            return features
        return erase(features, self.basis())

    @torch.no_grad()
    def _update(self, z: Tensor, labels: Tensor) -> None:
        known = labels != self.ignore_index
        z, labels = z[known].to(self.class_means.dtype), labels[known]
        if labels.numel() == 0:
            return
        sums = torch.zeros_like(self.class_means).index_add_(0, labels, z)
        counts = torch.bincount(labels, minlength=self.num_irrelevant)
        present = counts > 0
        batch_means = sums[present] / counts[present, None].to(sums.dtype)
        self.batches_seen += present.long()
        weight = (1.0 / self.batches_seen[present].to(sums.dtype)).clamp_min(self.momentum)[:, None]
        self.class_means[present] = (1.0 - weight) * self.class_means[present] + weight * batch_means

    @torch.no_grad()
    def _update_conditional(self, z: Tensor, labels: Tensor, task_labels: Tensor) -> None:
        batch_sum, count = within_class_cross_covariance(z, labels, task_labels, self.num_irrelevant, self.ignore_index)
        if count == 0:
            return
        self.batches_seen += 1
        weight = max(1.0 / int(self.batches_seen), self.momentum)
        self.cross_covariance_sum.mul_(1.0 - weight).add_(weight * batch_sum.to(self.cross_covariance_sum.dtype))
        self.cross_covariance_count.mul_(1.0 - weight).add_(weight * count)

    def extra_repr(self) -> str:
        return (
            f"num_irrelevant={self.num_irrelevant}, dim={self.dim}, momentum={self.momentum}, "
            f"conditional={self.conditional}, ready={self.ready}"
        )
