"""`Purify`: erase the linear trace of task-irrelevant labels from features (METHODS.md §2, `projection`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._labels import IGNORE_INDEX, check_labels
from .._validation import NAN_POLICIES, NanPolicy, check_choice, check_min_batch, check_tensor, checks_values
from ..functional.suppression import erase, erasure_basis


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

    Args:
        num_irrelevant: number of irrelevant classes `K_u`.
        dim: features per sample (after flattening); `(B, dim)` or maps `(B, *shape)` with `prod(shape) = dim`.
        momentum: EMA weight of a new batch.
        ignore_index: the label of unknown samples.
        rtol: directions with singular value below `rtol × largest` are not erased.
        nan_policy: a training batch with NaN/inf features `"raise"`s, is left out of the running means
            (`"skip"`), or updates them anyway (`"propagate"`, which corrupts them).
    """

    class_means: Tensor
    batches_seen: Tensor

    def __init__(
        self,
        num_irrelevant: int,
        dim: int,
        momentum: float = 0.01,
        *,
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
        self.ignore_index = ignore_index
        self.rtol = rtol
        self.register_buffer("class_means", torch.zeros(num_irrelevant, dim))
        self.register_buffer("batches_seen", torch.zeros(num_irrelevant, dtype=torch.long))

    @property
    def ready(self) -> bool:
        """Whether every class has been seen, so that the output differs from the input."""
        return bool((self.batches_seen > 0).all())

    def basis(self) -> Tensor:
        """The erased directions, an orthonormal `(dim, r)` basis (`r = 0` until `ready`)."""
        if not self.ready:
            return self.class_means.new_zeros(self.dim, 0)
        return erasure_basis(self.class_means.double(), self.rtol).to(self.class_means.dtype)

    def forward(self, features: Tensor, irrelevant_labels: Tensor | None = None) -> Tensor:
        """The features with the irrelevant classes' mean differences projected out, in their own shape."""
        check_tensor(features, "features")
        check_min_batch(features.shape[0], 1, what="Purify", name="features")
        flat = features.reshape(features.shape[0], -1)
        if features.dim() < 2 or flat.shape[1] != self.dim:
            raise ValueError(
                f"'features' must be (B, {self.dim}) or maps with {self.dim} values per sample, "
                f"got shape {tuple(features.shape)}"
            )
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
            if self._finite_for_update(flat):
                self._update(flat.detach(), irrelevant_labels)
        if not self.ready:
            return features
        return erase(features, self.basis())

    def _finite_for_update(self, flat: Tensor) -> bool:
        """Whether the batch may update the running means: a NaN there would poison every later output."""
        if self.nan_policy == "propagate" or not checks_values() or bool(torch.isfinite(flat).all()):
            return True
        if self.nan_policy == "raise":
            raise ValueError(
                "'features' contain NaN or inf, which would corrupt Purify's running means; pass "
                "nan_policy='skip' to leave such a batch out of them"
            )
        return False

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

    def extra_repr(self) -> str:
        return f"num_irrelevant={self.num_irrelevant}, dim={self.dim}, momentum={self.momentum}, ready={self.ready}"
