"""Similarity measures shared by every method: row cosine, Gram matrices, HSIC and CKA (docs: Methods §1, §4).

Inputs of shape `(n, ...)` are flattened to `(n, d)`. Everything is computed in float32, or in float64
when an input is float64, with autocast disabled, whatever the input dtype.

Tensors are positional, every option keyword-only. Each public function checks its inputs once, switches
autocast off once (`full_precision`) and calls a private core (`_cosine_rows`, `_gram`, `_gram_row_cosines`,
`_kernel_matrix`, `_hsic_from_kernels`, `_kernel_alignment`, `_cka`, `_linear_cka`) that takes checked inputs and
runs with autocast already off: what the package's own callers use (other layers through `functional._core`).

**Two forms of every linear-kernel estimate** (docs: Methods §4, "Linear kernels never need an n × n matrix").
With `K = XXᵀ`, `L = YYᵀ` every sum that HSIC and CKA need follows from `XᵀY`, `Xᵀ1`, `Yᵀ1` and the row norms
(`linear_hsic`): time `O(n·p·q)`, memory `O(n·(p+q) + p·q)`, no `n × n` matrix. The pairwise form builds the
kernel matrices (`O(n²·(p+q))` time, `O(n²)` memory). One rule picks the form, `feature_space_cheaper`: the
feature-space form whenever both kernels are linear and its products cost no more multiply-adds than the
pairwise ones (`Σ p_a·p_b ≤ n·(p + q + #products)`: always for features no wider than about the batch,
e.g. every suppression loss at its defaults from a batch of 10 up), the pairwise form otherwise (RBF
kernels, and linear kernels of features much wider than the batch, where the `n × n` matrices are the smaller
ones). Both forms are exact; they differ only in rounding.

**RBF kernels** keep the pairwise form, formed a tile of rows at a time (`tiled_hsic_sums`): tiles of
`tile_rows(n) = min(n, 2²² // n)` rows, each recomputed in the backward pass when there are several, so the forward
and the backward pass hold `O(tile_rows(n)·n)` numbers (at most about `2²²`, 16 MiB in float32, plus `O(n·d)`),
not `O(n²)`; time stays `O(n²·d)` (plus one recomputation of each tile in the backward pass). The median-heuristic
bandwidth (`sigma=None`) reads every distinct pair's distance: `n(n-1)/2` numbers, detached, sorted once per
call (`median_distance`); with a `sigma` given, the bound above is the whole memory. The same tiles serve the
suppression losses' RBF forms, conditional ones included (a group per task class: `tiled_hsic_sums(slots=...)`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, TypeAlias

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .._validation import (
    check_choice,
    check_min_batch,
    check_same_batch_and_device,
    check_tensor,
    compute_dtype,
    full_precision,
)
from ..distributed import Gather, gather_batch, is_distributed, max_across_ranks, sum_across_ranks

__all__ = [
    "GRAM_SCOPES",
    "KERNELS",
    "GramScope",
    "Kernel",
    "cka",
    "cosine_rows",
    "gram",
    "gram_row_cosines",
    "hsic",
    "hsic_from_kernels",
    "kernel_alignment",
    "kernel_matrix",
    "linear_cka",
]

Kernel: TypeAlias = Literal["linear", "rbf"]
GramScope: TypeAlias = Literal["sample", "batch"]

KERNELS: tuple[Kernel, ...] = ("linear", "rbf")
GRAM_SCOPES: tuple[GramScope, ...] = ("sample", "batch")


def _flat(x: Tensor) -> Tensor:
    """`(n, ...)` as `(n, d)` in the compute dtype (float32, or float64 for float64 input)."""
    return x.to(compute_dtype(x)).reshape(x.shape[0], -1)


def cosine_rows(a: Tensor, b: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of matching rows, with each norm floored at `eps`.

    `s_i = <a_i, b_i> / (max(|a_i|, eps) * max(|b_i|, eps))`, so a zero row gives `s_i = 0`. `eps` is in the
    inputs' own units, as everywhere in the package (`scaled_floor`): each row is scaled by its own power of
    two (`unit_scale(·, per_row=True)`, exact) and the floor with it, which changes nothing but the range of
    the squares.

    Args:
        a: `(n, ...)`, flattened to `(n, d)`.
        b: same shape as `a`.
        eps: floor of each row norm, in the inputs' units.

    Returns:
        `(n,)` in float32 (float64 for float64 input).

    Raises:
        TypeError: `a` or `b` is not a floating-point tensor.
        ValueError: `a` and `b` differ in shape, or have no dimension.
    """
    check_tensor(a, "a")
    check_tensor(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"'a' and 'b' must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    with full_precision(a, b):
        return _cosine_rows(a, b, eps)


def _cosine_rows(a: Tensor, b: Tensor, eps: float | Tensor, eps_b: float | Tensor | None = None) -> Tensor:
    """`cosine_rows` of checked inputs; the floors `eps` (of `a`'s rows) and `eps_b` (of `b`'s; None: `eps`) are
    in `a`'s and `b`'s units: Python numbers, or 0-d tensors from `scaled_floor` when `a` and `b` are rows of
    maps scaled by `unit_scale`."""
    eps_b = eps if eps_b is None else eps_b
    dtype = compute_dtype(a, b)
    a2, b2 = a.to(dtype).reshape(a.shape[0], -1), b.to(dtype).reshape(b.shape[0], -1)
    # each row scaled to magnitude < 1 and its floor with it: the same cosine, no overflow of |a|²
    scale_a, scale_b = unit_scale(a2, per_row=True), unit_scale(b2, per_row=True)
    a2, b2 = a2 * scale_a[:, None], b2 * scale_b[:, None]
    dot = (a2 * b2).sum(dim=1)
    norm_a = torch.maximum(torch.linalg.vector_norm(a2, dim=1), scaled_floor(eps, scale_a))
    norm_b = torch.maximum(torch.linalg.vector_norm(b2, dim=1), scaled_floor(eps_b, scale_b))
    return torch.div(dot, norm_a * norm_b)


def unit_scale(x: Tensor, *, per_row: bool = False, dtype: torch.dtype | None = None) -> Tensor:
    """The package's one scale rule: `2^-e` with `e ≥ 0` the exponent of `max|x|` (`2^e > max|x| ≥ 2^(e-1)`,
    as `torch.frexp` gives it), so `x · 2^-e` has magnitude < 1; 1 where the maximum is already below 1, is
    NaN or inf, or has no element.

    The maximum is over the whole of `x` (a 0-d result: what the Gram, aggregated and pairwise cosines scale
    their maps by) or, with `per_row=True`, over each row of `(n, ...)` (an `(n,)` result: what `cosine_rows`
    scales its rows by). A tensor of `dtype` (default: `x`'s compute dtype) on `x`'s device, detached, built
    from the exponent's bits (exact on every device, also `2^-128` for float32 values near float32's largest,
    whose `2^e` is no float32); no host synchronization. The fused kernels scale by the same power of two
    without a pass of their own (each program finds the exponent of what it loads;
    `ops._kernel_common.frexp_exponent`). Norm floors follow the scale (`scaled_floor`), so `eps` keeps one
    meaning, the inputs' own units, on every path.
    """
    dtype = compute_dtype(x) if dtype is None else dtype
    if per_row:
        rows = x.detach().reshape(x.shape[0], -1)
        if rows.shape[1] == 0:
            return torch.ones(rows.shape[0], dtype=dtype, device=x.device)
        largest = rows.abs().amax(dim=1)
    else:
        if x.numel() == 0:
            return torch.ones((), dtype=dtype, device=x.device)
        largest = x.detach().abs().amax()
    exponent = torch.frexp(largest.to(dtype)).exponent.clamp_min(0)
    wide = dtype == torch.float64
    bias, shift = (1023, 52) if wide else (127, 23)
    exponent = exponent.to(torch.int64 if wide else torch.int32)
    half = exponent // 2  # two factors, each a normal number: 2^-e itself may be subnormal
    low = ((bias - half) << shift).view(torch.float64 if wide else torch.float32)
    high = ((bias - (exponent - half)) << shift).view(torch.float64 if wide else torch.float32)
    return (low * high).to(dtype)


def floor_minimum(dtype: torch.dtype) -> float:
    """`sqrt(tiny)` of `dtype`'s compute dtype (`2^-63` for float32, `2^-511` for float64): the least norm floor in
    scaled units, below which a norm's square is no normal number (a norm computed from squares cannot tell
    such a floor from 0, and a GPU may flush it to 0)."""
    return 2.0**-511 if dtype == torch.float64 else 2.0**-63


def scaled_floor(eps: float | Tensor, scale: Tensor, *, degree: int = 1) -> Tensor:
    """`eps` in the units of a map multiplied by `scale` (from `unit_scale`): `eps · scale^degree`, for rows of
    degree `degree` in the map (1: its rows, channel aggregates and pairwise rows; 2: its Gram rows).

    This is what keeps `eps` in the inputs' own units on every path (METHODS §1: `max(|a_i|, eps)` of the rows
    of the unscaled maps). The product is raised to `floor_minimum` where it falls below (scaled maps near
    float32's largest values, or `eps` below about 1e-19): a zero row then still gives a cosine of 0.

    Args:
        eps: the floor in the unscaled units (a number, or a 0-d tensor).
        scale: a power of two (0-d, or `(n,)` per row), in the compute dtype.
        degree: 1 or 2.

    Returns:
        a tensor shaped like `scale`, in its dtype.
    """
    floor = eps * scale
    if degree == 2:
        floor = floor * scale
    return floor.clamp_min(floor_minimum(scale.dtype))


def gram(x: Tensor, *, gram_scope: GramScope = "sample") -> Tensor:
    """Gram matrices of channel activations.

    With `V = reshape(x, [B, C, N])`, `N = prod(spatial)` (`N = 1` for `(B, C)` input):

    - `gram_scope="sample"`: `G_b = V_b V_bᵀ`, shape `(B, C, C)`;
    - `gram_scope="batch"`: `G = W Wᵀ` with `W = reshape(x, [B*C, N])`, shape `(B*C, B*C)` (the
      anti-transfer authors' form: it also compares channels across samples).

    Args:
        x: `(B, C, *spatial)`.
        gram_scope: `"sample"` or `"batch"`.

    Returns:
        float32 (float64 for float64 input).

    Raises:
        TypeError: `x` is not a floating-point tensor.
        ValueError: `x` has fewer than 2 dimensions, or `gram_scope` is not a valid choice.
    """
    check_tensor(x, "x", min_dim=2)
    check_choice(gram_scope, "gram_scope", GRAM_SCOPES)
    with full_precision(x):
        return _gram(x, gram_scope)


def _gram(x: Tensor, gram_scope: GramScope) -> Tensor:
    """`gram` of a checked input."""
    v = x.to(compute_dtype(x)).reshape(x.shape[0], x.shape[1], -1)
    if gram_scope == "sample":
        return v @ v.transpose(1, 2)
    w = v.reshape(-1, v.shape[-1])
    return w @ w.T


def gram_row_cosines(
    student: Tensor, reference: Tensor, *, gram_scope: GramScope = "batch", eps: float = 1e-8
) -> Tensor:
    """`cosine_rows` of the rows of `gram(student)` and `gram(reference)`, without forming them when cheaper.

    With `W = reshape(student, [m, N])` (`m = B·C` for `"batch"`, `m = C` per sample for `"sample"`) and
    `U` likewise for the reference, row `i` of `G = W Wᵀ` is `W w_i`, so `<G_s[i], G_r[i]> = w_iᵀ (Wᵀ U) u_i`
    and `|G_s[i]|² = w_iᵀ (Wᵀ W) w_i`: `N×N` products instead of `m×m` Gram matrices whenever `N < m` (the
    authors' B=30, C=512, 8×8 case: 64×64 instead of 15360×15360). Both inputs are first scaled by
    `unit_scale` (exact; float32 maps near 1e30 give finite cosines), as the fused kernel does; `eps` floors
    the Gram row norms in the inputs' own units (`scaled_floor` of degree 2). The reference side gets no
    gradient.

    Args:
        student: `(B, C, *spatial)`.
        reference: same shape as `student`.
        gram_scope: `"batch"` or `"sample"`, as in `gram`.
        eps: floor of each Gram row norm, in the units of `gram(student)`.

    Returns:
        `(B·C,)` cosines, sample-major for `"sample"`; float32 (float64 for float64 input).

    Raises:
        TypeError: an input is not a floating-point tensor.
        ValueError: the shapes differ or have fewer than 2 dimensions, or `gram_scope` is not a valid choice.
    """
    _check_gram_pair(student, reference, gram_scope)
    with full_precision(student, reference):
        return _gram_row_cosines(student, reference.detach(), gram_scope, eps)


def _gram_row_cosines(student: Tensor, reference: Tensor, gram_scope: GramScope, eps: float) -> Tensor:
    """`gram_row_cosines` of inputs checked by `_check_gram_pair` (the torch path of the fused kernel)."""
    dtype = compute_dtype(student, reference)
    batch, channels = student.shape[0], student.shape[1]
    student, reference = student.to(dtype), reference.to(dtype)
    scale_s, scale_r = unit_scale(student), unit_scale(reference)
    floor_s, floor_r = scaled_floor(eps, scale_s, degree=2), scaled_floor(eps, scale_r, degree=2)
    w = (student * scale_s).reshape(batch, channels, -1)
    u = (reference * scale_r).reshape(batch, channels, -1)
    if gram_scope == "batch":
        w, u = w.reshape(1, batch * channels, -1), u.reshape(1, batch * channels, -1)
    rows, length = w.shape[1], w.shape[2]
    if length >= rows:
        gram_s, gram_r = w @ w.transpose(1, 2), u @ u.transpose(1, 2)
        return _cosine_rows(gram_s.reshape(-1, rows), gram_r.reshape(-1, rows), floor_s, floor_r)
    wt, ut = w.transpose(1, 2), u.transpose(1, 2)
    dot = ((w @ (wt @ u)) * u).sum(dim=2)
    sq_norm_s = ((w @ (wt @ w)) * w).sum(dim=2)
    sq_norm_r = ((u @ (ut @ u)) * u).sum(dim=2)
    # floored before the root (floor² is a normal number): a zero row gives s = 0 with a finite gradient
    norm_s = sq_norm_s.clamp_min(floor_s * floor_s).sqrt()
    norm_r = sq_norm_r.clamp_min(floor_r * floor_r).sqrt()
    return (dot / (norm_s * norm_r)).reshape(-1)


def _check_gram_pair(student: Tensor, reference: Tensor, gram_scope: str) -> None:
    """The checks of `gram_row_cosines`, shared with its `ops` twin: two `(B, C, ...)` maps of one shape."""
    check_tensor(student, "student", min_dim=2)
    check_tensor(reference, "reference", min_dim=2)
    check_choice(gram_scope, "gram_scope", GRAM_SCOPES)
    if student.shape != reference.shape:
        raise ValueError(
            f"'student' and 'reference' must have the same shape, got {tuple(student.shape)} and "
            f"{tuple(reference.shape)}"
        )


def _check_kernel(kernel: object, sigma: float | None, names: tuple[str, str] = ("kernel", "sigma")) -> None:
    check_choice(kernel, names[0], KERNELS)
    if sigma is not None and not sigma > 0:
        raise ValueError(f"'{names[1]}' must be a positive bandwidth or None (median heuristic), got {sigma}")


def kernel_matrix(x: Tensor, *, kernel: Kernel = "linear", sigma: float | None = None) -> Tensor:
    """Kernel matrix of the rows of `x`.

    - `"linear"`: `K = X Xᵀ`;
    - `"rbf"`: `K_ij = exp(-|x_i - x_j|² / (2 σ²))`, with `σ` the median distance between distinct rows
      when `sigma` is None (computed without gradient; floored at 1e-12 so identical rows give `K = 1`).

    Args:
        x: `(n, ...)`, flattened to `(n, d)`.
        kernel: `"linear"` or `"rbf"`.
        sigma: the RBF bandwidth; None takes the median heuristic.

    Returns:
        `(n, n)` in float32 (float64 for float64 input).

    Raises:
        TypeError: `x` is not a floating-point tensor.
        ValueError: `kernel` is not a valid choice, or `sigma` is not positive.
    """
    check_tensor(x, "x")
    _check_kernel(kernel, sigma)
    with full_precision(x):
        return _kernel_matrix(x, kernel, sigma)


def _kernel_matrix(x: Tensor, kernel: Kernel, sigma: float | None) -> Tensor:
    """`kernel_matrix` of a checked input (options checked too)."""
    x2 = _flat(x)
    if kernel == "linear":
        return x2 @ x2.T
    return _rbf_kernel(x2, sigma)


def _rbf_kernel(x: Tensor, sigma: float | None) -> Tensor:
    centred = x - x.mean(dim=0, keepdim=True)  # distances are shift-invariant; centring avoids cancellation
    sq_dist = squared_distances(centred, x.detach().abs().amax())
    if sigma is None:
        n = x.shape[0]
        upper = torch.triu_indices(n, n, offset=1, device=x.device)
        pair_dist = sq_dist.detach()[upper[0], upper[1]].sqrt()
        bandwidth = torch.quantile(pair_dist, 0.5).clamp_min(1e-12) if n > 1 else x.new_tensor(1.0)
    else:
        bandwidth = x.new_tensor(float(sigma))
    return gaussian(sq_dist, bandwidth)


def squared_distances(centred: Tensor, largest: Tensor) -> Tensor:
    """`|x_j - x_k|²` between the rows of `(n, d)` centred data, from their norms and dot products, with a
    zero diagonal; distances at the rounding level of the data (`8 eps · largest`, `largest` the data's largest
    magnitude before centring: a 0-d tensor, or `(n,)` one per row) are set to zero, so constant rows give
    `K = 1` exactly. The one distance computation of the RBF kernels, `kernel_matrix` and the within-group
    kernels of `functional.suppression` alike."""
    sq_norms = (centred * centred).sum(dim=1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * centred @ centred.T).clamp_min(0.0)
    sq_dist = sq_dist - torch.diag_embed(torch.diagonal(sq_dist))
    rounding = 8 * torch.finfo(centred.dtype).eps * largest
    threshold = (rounding * rounding * centred.shape[1]).reshape(-1, 1)  # a row's own threshold when per row
    return torch.where(sq_dist > threshold, sq_dist, torch.zeros_like(sq_dist))


def gaussian(sq_dist: Tensor, bandwidth: Tensor) -> Tensor:
    """`exp(-sq_dist / (2 σ²))` with `σ` a 0-d tensor, or `(n,)` one per row."""
    bandwidth = bandwidth.reshape(-1, 1)
    return torch.exp(-sq_dist / (2.0 * bandwidth * bandwidth))


def _check_kernels(k: Tensor, l: Tensor, unbiased: bool) -> None:
    """Two square kernel matrices of one size, enough samples for the estimator."""
    check_tensor(k, "k", min_dim=2)
    check_tensor(l, "l", min_dim=2)
    n = k.shape[0]
    for name, m in (("k", k), ("l", l)):
        if m.dim() != 2 or m.shape[0] != m.shape[1] or m.shape[0] != n:
            raise ValueError(
                f"'k' and 'l' must be square kernel matrices of one size (n, n); got shapes "
                f"{tuple(k.shape)} and {tuple(l.shape)} ('{name}' is off)"
            )
    check_min_batch(n, 4 if unbiased else 2, what=f"{'unbiased' if unbiased else 'biased'} HSIC", name="k")


def hsic_from_kernels(k: Tensor, l: Tensor, *, unbiased: bool = True) -> Tensor:
    """HSIC of two `(n, n)` kernel matrices.

    - biased: `HSIC_0 = tr(K H L H) / (n-1)²`, `H = I - 11ᵀ/n`; needs n ≥ 2;
    - unbiased (Song et al. 2012): with `K̃, L̃` the kernels with a zero diagonal,
      `HSIC_1 = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n-1)(n-2)) - (2/(n-2)) 1ᵀK̃L̃1] / (n(n-3))`; needs n ≥ 4.

    Args:
        k: `(n, n)`.
        l: `(n, n)`.
        unbiased: the unbiased estimator instead of the biased one.

    Returns:
        a scalar tensor, float32 (float64 for float64 input).

    Raises:
        TypeError: `k` or `l` is not a floating-point tensor.
        ValueError: the matrices are not square of one size, or too small for the estimator.
    """
    _check_kernels(k, l, unbiased)
    with full_precision(k, l):
        return _hsic_from_kernels(k, l, unbiased)


def _hsic_from_kernels(k: Tensor, l: Tensor, unbiased: bool) -> Tensor:
    """`hsic_from_kernels` of checked kernels."""
    n = k.shape[0]
    dtype = compute_dtype(k, l)
    k, l = k.to(dtype), l.to(dtype)
    if not unbiased:
        return (_double_centre(k) * _double_centre(l)).sum() / (n - 1) ** 2
    k0 = k - torch.diag_embed(torch.diagonal(k))
    l0 = l - torch.diag_embed(torch.diagonal(l))
    trace_term = (k0 * l0.T).sum()
    sums_term = k0.sum() * l0.sum() / ((n - 1) * (n - 2))
    cross_term = 2.0 / (n - 2) * (k0.sum(dim=0) * l0.sum(dim=1)).sum()
    return (trace_term + sums_term - cross_term) / (n * (n - 3))


def _double_centre(k: Tensor) -> Tensor:
    """`H K H` for a square `K`."""
    return k - k.mean(dim=0, keepdim=True) - k.mean(dim=1, keepdim=True) + k.mean()


def hsic(
    x: Tensor,
    y: Tensor,
    *,
    kernel: Kernel = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    kernel_y: Kernel | None = None,
    sigma_y: float | None = None,
    gather: Gather = "local",
) -> Tensor:
    """Hilbert-Schmidt independence criterion between the rows of `x` and `y` (docs: Methods §4).

    With linear kernels on both sides it is computed in feature space (`linear_hsic`: `O(n·p·q)` time, no
    `n × n` matrix) unless the features are so much wider than the batch that the kernel matrices are cheaper
    (`feature_space_cheaper`); an RBF kernel forms the kernel matrices a tile of rows at a time
    (`tiled_hsic_sums`: `O(tile_rows(n)·n)` memory in the forward and backward pass, plus the median
    heuristic's `n(n-1)/2` detached distances when its `sigma` is None).

    Args:
        x: `(n, ...)`, flattened to `(n, p)`.
        y: `(n, ...)`, flattened to `(n, q)`.
        kernel: kernel on `x` (and on `y` unless `kernel_y` is given): `"linear"` or `"rbf"`.
        unbiased: Song et al.'s unbiased estimator (n ≥ 4) instead of the biased one (n ≥ 2).
        sigma: RBF bandwidth for `x` (and `y` unless `sigma_y` is given); None = median heuristic.
        kernel_y: kernel on `y` when it differs from `kernel`.
        sigma_y: RBF bandwidth for `y` when it differs from `sigma`.
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`);
            linear kernels in feature space from all-reduced sums, without gathering the batch.

    Returns:
        a scalar tensor, float32 (float64 for float64 input).

    Raises:
        TypeError: `x` or `y` is not a floating-point tensor.
        ValueError: an option is not valid, the batch sizes differ, or the batch is too small.
    """
    kernel_y = kernel if kernel_y is None else kernel_y
    sigma_y = sigma if sigma_y is None else sigma_y
    _check_kernel(kernel, sigma)
    _check_kernel(kernel_y, sigma_y, ("kernel_y", "sigma_y"))
    minimum, what = 4 if unbiased else 2, f"{'unbiased' if unbiased else 'biased'} HSIC"
    _check_pair(x, y)
    with full_precision(x, y):
        if kernel == "linear" and kernel_y == "linear":
            pair = _across_ranks(x, y, gather, minimum, what, self_terms=False)
            if pair is not None:
                return linear_across_ranks(*pair, unbiased=unbiased, measure="hsic", gather=gather)
        x, y = _paired_batch(x, y, gather, minimum, what)
        if kernel == "linear" and kernel_y == "linear":
            return _linear_kernel_hsic(x, y, unbiased)
        x2, y2 = _flat(x), _flat(y)
        sides = [
            rbf_side(v, s) if k == "rbf" else KernelSide(v, "linear")
            for v, k, s in ((x2, kernel, sigma), (y2, kernel_y, sigma_y))
        ]
        count = torch.tensor(float(x2.shape[0]), dtype=x2.dtype, device=x2.device)
        return tiled_hsic_sums(sides[0], sides[1], count, unbiased=unbiased)[0]


def _linear_kernel_hsic(x: Tensor, y: Tensor, unbiased: bool) -> Tensor:
    """`hsic` with linear kernels on both sides, of a checked pair: in feature space when
    `feature_space_cheaper`, else through the kernel matrices."""
    x2, y2 = _flat(x), _flat(y)
    n, p, q = x2.shape[0], x2.shape[1], y2.shape[1]
    x2, y2 = x2 - x2.mean(dim=0), y2 - y2.mean(dim=0)  # HSIC of linear kernels is shift-invariant
    if not feature_space_cheaper(n, p, q):
        return _hsic_from_kernels(x2 @ x2.T, y2 @ y2.T, unbiased)
    return linear_hsic(x2, y2, torch.tensor(float(n), dtype=x2.dtype, device=x2.device), unbiased=unbiased)


def cka(
    x: Tensor,
    y: Tensor,
    *,
    kernel: Kernel = "linear",
    unbiased: bool = False,
    sigma: float | None = None,
    gather: Gather = "local",
) -> Tensor:
    """Centred kernel alignment: `HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))` (Kornblith et al. 2019).

    `x` and `y` may differ in width. Constant features (a zero denominator) give 0, not NaN. With
    `unbiased=True` the value can fall slightly outside [0, 1]; a non-positive denominator gives 0. Linear
    kernels are computed in feature space (`linear_alignment`, no `n × n` matrix) unless the features are so
    much wider than the batch that the kernel matrices are cheaper (`feature_space_cheaper`); RBF kernels are
    formed a tile of rows at a time (`tiled_hsic_sums`: `O(tile_rows(n)·n)` memory, plus the median heuristic's
    `n(n-1)/2` detached distances per side when `sigma` is None).

    Args:
        x: `(n, ...)`, flattened to `(n, p)`.
        y: `(n, ...)`, flattened to `(n, q)`.
        kernel: `"linear"` or `"rbf"` (the same on both sides; `sigma` None = median heuristic per side).
        unbiased: use the unbiased HSIC (n ≥ 4).
        sigma: the RBF bandwidth of both sides; None takes the median heuristic.
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`);
            linear kernels in feature space from all-reduced sums, without gathering the batch.

    Returns:
        a scalar tensor, float32 (float64 for float64 input).

    Raises:
        TypeError: `x` or `y` is not a floating-point tensor.
        ValueError: an option is not valid, the batch sizes differ, or the batch is too small.
    """
    _check_kernel(kernel, sigma)
    minimum, what = 4 if unbiased else 2, f"{'unbiased' if unbiased else 'biased'} CKA"
    _check_pair(x, y)
    with full_precision(x, y):
        if kernel == "linear":
            pair = _across_ranks(x, y, gather, minimum, what, self_terms=True)
            if pair is not None:
                return linear_across_ranks(*pair, unbiased=unbiased, measure="alignment", gather=gather)
        x, y = _paired_batch(x, y, gather, minimum, what)
        return _cka(x, y, kernel, unbiased, sigma)


def _cka(x: Tensor, y: Tensor, kernel: Kernel, unbiased: bool, sigma: float | None) -> Tensor:
    """`cka` of a checked pair (`_paired_batch`)."""
    x2, y2 = _flat(x), _flat(y)
    if kernel == "linear":  # HSIC with a linear kernel is shift-invariant, biased or not
        x2, y2 = _centred_unit_frobenius(x2), _centred_unit_frobenius(y2)
        n = x2.shape[0]
        if feature_space_cheaper(n, x2.shape[1], y2.shape[1], self_terms=True):
            count = torch.tensor(float(n), dtype=x2.dtype, device=x2.device)
            return linear_alignment(x2, y2, count, unbiased=unbiased)
        return _kernel_alignment(x2 @ x2.T, y2 @ y2.T, unbiased)
    count = torch.tensor(float(x2.shape[0]), dtype=x2.dtype, device=x2.device)
    sums = tiled_hsic_sums(rbf_side(x2, sigma), rbf_side(y2, sigma), count, unbiased=unbiased)
    return tiled_alignment(*sums, count)


def tiled_alignment(
    cross: Tensor, self_k: Tensor, self_l: Tensor, square_k: Tensor, square_l: Tensor, n: Tensor
) -> Tensor:
    """`kernel_alignment` from `tiled_hsic_sums`' five sums over `n` samples: a self-HSIC at the rounding level of
    its kernel's entries (`≤ 64 eps · mean(K²)`, `mean(K²) = Σ K² / n²`) counts as zero."""
    eps = 64 * torch.finfo(self_k.dtype).eps
    entries = n.detach().square()
    varies = (self_k > eps * square_k / entries) & (self_l > eps * square_l / entries)
    zero = torch.zeros_like(self_k)
    return safe_ratio(cross, torch.where(varies, self_k, zero), torch.where(varies, self_l, zero))


def kernel_alignment(k: Tensor, l: Tensor, *, unbiased: bool) -> Tensor:
    """`HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))` for `(n, n)` kernels, 0 where a side is constant.

    A self-HSIC at the rounding level of its kernel's entries (`≤ 64 eps · mean(K²)`) counts as zero: a
    constant kernel's self-HSIC is exactly 0 in exact arithmetic, but not in floating point.

    Args:
        k: `(n, n)`.
        l: `(n, n)`.
        unbiased: use the unbiased HSIC (n ≥ 4) instead of the biased one (n ≥ 2).

    Returns:
        a scalar tensor, float32 (float64 for float64 input).

    Raises:
        TypeError: `k` or `l` is not a floating-point tensor.
        ValueError: the matrices are not square of one size, or too small for the estimator.
    """
    _check_kernels(k, l, unbiased)
    with full_precision(k, l):
        return _kernel_alignment(k, l, unbiased)


def _kernel_alignment(k: Tensor, l: Tensor, unbiased: bool) -> Tensor:
    """`kernel_alignment` of checked kernels."""
    self_k, self_l = _hsic_from_kernels(k, k, unbiased), _hsic_from_kernels(l, l, unbiased)
    eps = 64 * torch.finfo(self_k.dtype).eps
    varies = (self_k > eps * k.detach().square().mean()) & (self_l > eps * l.detach().square().mean())
    return safe_ratio(
        _hsic_from_kernels(k, l, unbiased), torch.where(varies, self_k, 0.0), torch.where(varies, self_l, 0.0)
    )


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False, gather: Gather = "local") -> Tensor:
    """Linear CKA: `‖Yᶜᵀ Xᶜ‖²_F / (‖Xᶜᵀ Xᶜ‖_F ‖Yᶜᵀ Yᶜ‖_F)` with column-centred `Xᶜ, Yᶜ` (biased form).

    Computed in feature space or through the `(n, n)` Gram matrices, whichever is cheaper
    (`feature_space_cheaper`); both
    sides are rescaled to unit Frobenius norm first, so features of any scale neither overflow nor
    underflow. `unbiased=True` uses the unbiased HSIC (n ≥ 4). Constant features give 0.

    Args:
        x: `(n, ...)`, flattened to `(n, p)`.
        y: `(n, ...)`, flattened to `(n, q)`; `p ≠ q` allowed.
        unbiased: use the unbiased HSIC (n ≥ 4).
        gather: `"global"` computes it on every rank's batch concatenated (`negtransfer_losses.distributed`);
            in feature space from all-reduced sums (`linear_across_ranks`), without gathering the batch.

    Returns:
        a scalar tensor, float32 (float64 for float64 input).

    Raises:
        TypeError: `x` or `y` is not a floating-point tensor.
        ValueError: the batch sizes differ, or the batch is too small.
    """
    what = f"{'unbiased' if unbiased else 'biased'} CKA"
    _check_pair(x, y)
    with full_precision(x, y):
        pair = _across_ranks(x, y, gather, 4 if unbiased else 2, what, self_terms=True)
        if pair is not None:
            measure: GlobalMeasure = "alignment" if unbiased else "linear_cka"
            return linear_across_ranks(*pair, unbiased=unbiased, measure=measure, gather=gather)
        x, y = _paired_batch(x, y, gather, 4 if unbiased else 2, what)
        return _linear_cka(x, y, unbiased)


def _linear_cka(x: Tensor, y: Tensor, unbiased: bool) -> Tensor:
    """`linear_cka` of a checked pair (same batch, large enough for the estimator)."""
    if unbiased:
        return _cka(x, y, "linear", True, None)
    n, dtype = x.shape[0], compute_dtype(x, y)
    xc = _centred_unit_frobenius(x.to(dtype).reshape(n, -1))
    yc = _centred_unit_frobenius(y.to(dtype).reshape(n, -1))
    p, q = xc.shape[1], yc.shape[1]
    if feature_space_cheaper(n, p, q, self_terms=True):
        cross = (yc.T @ xc).square().sum()
        self_x = (xc.T @ xc).square().sum()
        self_y = (yc.T @ yc).square().sum()
    else:
        kx, ky = xc @ xc.T, yc @ yc.T
        cross = (kx * ky).sum()
        self_x = kx.square().sum()
        self_y = ky.square().sum()
    return safe_ratio(cross, self_x, self_y)


def _check_pair(x: Tensor, y: Tensor) -> None:
    """The checks of the two `(n, ...)` inputs of `hsic`, `cka` and `linear_cka`: floating-point tensors with one
    batch size on one device."""
    check_tensor(x, "x")
    check_tensor(y, "y")
    check_same_batch_and_device(x, y, ("x", "y"))


def _paired_batch(x: Tensor, y: Tensor, gather: Gather, minimum: int, what: str) -> tuple[Tensor, Tensor]:
    """A checked pair (`_check_pair`) gathered across ranks if asked, with its (global) batch size checked."""
    x, y = gather_batch(x, gather), gather_batch(y, gather)
    check_min_batch(x.shape[0], minimum, what=what)
    dtype = compute_dtype(x, y)  # float64 if either side is; mixed inputs meet in one dtype
    return x.to(dtype), y.to(dtype)


def _across_ranks(
    x: Tensor, y: Tensor, gather: Gather, minimum: int, what: str, *, self_terms: bool
) -> tuple[Tensor, Tensor] | None:
    """The checked pair (`_check_pair`) flattened in one compute dtype when a linear-kernel estimate runs on every
    rank's batch from all-reduced sums (`linear_across_ranks`): `gather="global"` under a process group of several
    ranks, and the feature-space form chosen at the global batch size. None otherwise (the caller gathers the
    batch)."""
    if gather != "global" or not is_distributed():
        return None
    n = global_count(x.shape[0], gather, x.device)
    check_min_batch(n, minimum, what=what)
    dtype = compute_dtype(x, y)
    x2, y2 = x.to(dtype).reshape(x.shape[0], -1), y.to(dtype).reshape(y.shape[0], -1)
    return (x2, y2) if feature_space_cheaper(n, x2.shape[1], y2.shape[1], self_terms=self_terms) else None


def _centred_unit_frobenius(x: Tensor) -> Tensor:
    """`(x - mean) / ‖x - mean‖_F` over every row of `x`: CKA is invariant to isotropic scaling, and this keeps
    any scale finite (`unit_frobenius`). `functional.suppression._members_centred_unit_frobenius` is the same on
    the member rows of a masked batch."""
    centred = x - x.mean(dim=0, keepdim=True)
    return unit_frobenius(centred, x.detach().abs().amax(), x.numel())


def unit_frobenius(centred: Tensor, largest: Tensor, count: int | Tensor) -> Tensor:
    """`centred / ‖centred‖_F`, or exactly zero (with a zero gradient) when its spread is at the rounding level
    of the values it was centred from: their largest magnitude `largest`, over `count` entries (the mean of
    equal values is not always exactly that value, so constant features would otherwise keep a rounding
    residue). The one rescaling of the linear CKA and HSIC ratios, `cka` and the within-group estimates of
    `functional.suppression` alike."""
    sum_sq = (centred * centred).sum()
    rounding = 8 * torch.finfo(centred.dtype).eps * largest
    noise_floor = (rounding * rounding * count).clamp_min(torch.finfo(centred.dtype).tiny)
    varies = sum_sq > noise_floor
    spread = torch.where(varies, sum_sq, torch.ones_like(sum_sq)).sqrt()
    return torch.where(varies, centred / spread, torch.zeros_like(centred))


def safe_ratio(num: Tensor, den_x: Tensor, den_y: Tensor) -> Tensor:
    """`num / sqrt(den_x · den_y)`, and 0 (with zero gradient) where the product is not positive."""
    den = den_x * den_y
    positive = den > torch.finfo(den.dtype).tiny
    return torch.where(positive, num / torch.where(positive, den, torch.ones_like(den)).sqrt(), 0.0)


# --- kernel matrices in row tiles: RBF kernels with bounded memory ----------------------------------------

TILE_NUMBERS = 1 << 22
"""The most entries of one `(rows, n)` kernel tile: 4 Mi numbers (16 MiB in float32)."""


def tile_rows(n: int) -> int:
    """Rows of one kernel tile for a batch of `n`: all of them up to `n = 2048`, then `TILE_NUMBERS // n`."""
    return max(1, min(n, TILE_NUMBERS // max(n, 1)))


class KernelSide(NamedTuple):
    """One side of a tiled HSIC: its rows and how its kernel is formed from them, a tile at a time.

    `"linear"`: `K = XXᵀ` of `rows`; `"rbf"`: `exp(-‖x_i - x_j‖² / (2 σ²))` of the centred `rows`, squared
    distances at or below `threshold` set to zero (`squared_distances`' rounding rule), bandwidth `σ`; the
    bandwidth and the threshold are 0-d, or `(n,)` one per row (each row's group's).
    """

    rows: Tensor
    kernel: Kernel
    bandwidth: Tensor | None = None
    threshold: Tensor | None = None

    def tile(self, start: int, stop: int) -> Tensor:
        """Rows `start:stop` of the `(n, n)` kernel matrix, with the diagonal's entries as in `kernel_matrix`."""
        part = self.rows[start:stop]
        if self.kernel == "linear":
            return part @ self.rows.T
        assert self.bandwidth is not None and self.threshold is not None
        sq_dist = _tile_distances(self.rows, start, stop, _rows_of(self.threshold, start, stop))
        index = torch.arange(self.rows.shape[0], device=part.device)
        diagonal = index[start:stop, None] == index[None, :]
        sq_dist = torch.where(diagonal, torch.zeros_like(sq_dist), sq_dist)
        return gaussian(sq_dist, _rows_of(self.bandwidth, start, stop))


def _rows_of(value: Tensor, start: int, stop: int) -> Tensor:
    """A 0-d value itself, or rows `start:stop` of an `(n,)` one as a column."""
    return value if value.dim() == 0 else value[start:stop, None]


def _tile_distances(rows: Tensor, start: int, stop: int, threshold: Tensor) -> Tensor:
    """Squared distances of rows `start:stop` to every row, those at or below `threshold` zero (`squared_distances`)."""
    sq_norms = (rows * rows).sum(dim=1)
    sq_dist = (sq_norms[start:stop, None] + sq_norms[None, :] - 2.0 * rows[start:stop] @ rows.T).clamp_min(0.0)
    return torch.where(sq_dist > threshold, sq_dist, torch.zeros_like(sq_dist))


def rbf_side(x: Tensor, sigma: float | None, members: Tensor | None = None, slots: Tensor | None = None) -> KernelSide:
    """The RBF `KernelSide` of `(n, d)` rows, as `kernel_matrix(kernel="rbf")` forms it on each group's rows: rows
    centred (over `members`, within each slot of `slots` when given; other rows zero), the rounding threshold from
    the largest magnitude of the group's rows, and `σ` = `sigma` or the median distance between distinct rows of
    the group, without gradient, floored at 1e-12 (1 for fewer than two rows). The median reads every pairwise
    distance within the groups: `n(n-1)/2` numbers, detached, a tile at a time (`median_distance`)."""
    dtype, device = x.dtype, x.device
    if members is None and slots is None:
        centred, largest = x - x.mean(dim=0, keepdim=True), x.detach().abs().amax()
    else:
        members = torch.ones(x.shape[0], dtype=torch.bool, device=device) if members is None else members
        slots = torch.zeros(x.shape[0], dtype=torch.int64, device=device) if slots is None else slots
        rows = torch.where(members[:, None], x, torch.zeros((), dtype=dtype, device=device))
        sums = torch.zeros_like(rows).index_add(0, slots, rows)
        counts = torch.zeros(x.shape[0], dtype=dtype, device=device).index_add(0, slots, members.to(dtype))
        means = (sums / counts.clamp_min(1.0)[:, None]).index_select(0, slots)
        centred = torch.where(members[:, None], rows - means, torch.zeros((), dtype=dtype, device=device))
        magnitudes = rows.detach().abs().amax(dim=1)
        largest = torch.zeros_like(magnitudes).scatter_reduce(0, slots, magnitudes, "amax").index_select(0, slots)
    rounding = 8 * torch.finfo(dtype).eps * largest
    side = KernelSide(centred, "rbf", x.new_ones(()), rounding * rounding * x.shape[1])
    if sigma is not None:
        return side._replace(bandwidth=x.new_tensor(float(sigma)))
    return side._replace(bandwidth=median_distance(side, members, slots))


def median_distance(side: KernelSide, members: Tensor | None = None, slots: Tensor | None = None) -> Tensor:
    """The median distance between distinct rows of an RBF `KernelSide`, as `torch.quantile(·, 0.5)` of the
    distances (sorted, the two middle values interpolated linearly), floored at 1e-12, 1 without a pair: 0-d over
    every pair of rows, or with `members` (and `slots`) `(n,)`, each row's over the pairs of members of its slot.

    The `n(n-1)/2` distances are computed a tile at a time and sorted once (by distance, then stably by group), so
    each group's are one sorted run; no gradient, no host read."""
    rows = side.rows.detach()
    n, dtype, device = rows.shape[0], rows.dtype, rows.device
    assert side.threshold is not None
    grouped = members is not None or slots is not None
    if n < 2:
        ones = torch.ones(n, dtype=dtype, device=device)
        return ones if grouped else ones.new_ones(())
    one_group = slots is None  # then pairs outside it (distance inf) sort last by distance alone: no group keys
    members = torch.ones(n, dtype=torch.bool, device=device) if members is None else members
    slots = torch.zeros(n, dtype=torch.int64, device=device) if slots is None else slots
    step, distances, keys = tile_rows(n), [], []
    for start in range(0, n, step):
        stop = min(n, start + step)
        sq_dist = _tile_distances(rows, start, stop, _rows_of(side.threshold.detach(), start, stop))
        pair = members[start:stop, None] & members[None, :] & (slots[start:stop, None] == slots[None, :])
        first, second = torch.triu_indices(stop - start, n, offset=start + 1, device=device)
        in_group = pair[first, second]
        distances.append(torch.where(in_group, sq_dist[first, second].sqrt(), float("inf")))
        if not one_group:
            keys.append(torch.where(in_group, slots[start + first], n).to(torch.int32))
    distance = torch.cat(distances)
    del distances
    if one_group:
        sorted_distance = torch.sort(distance).values
        start_of = torch.zeros(n, dtype=torch.int64, device=device)
    else:
        key = torch.cat(keys)
        del keys
        by_distance = torch.sort(distance, stable=True).indices
        order = by_distance[torch.sort(key[by_distance], stable=True).indices]
        del by_distance
        sorted_distance, sorted_key = distance[order], key[order]
        start_of = torch.searchsorted(sorted_key.contiguous(), slots.to(torch.int32).contiguous())
    size = torch.zeros(n, dtype=torch.int64, device=device).index_add(0, slots, members.to(torch.int64))
    size = size.index_select(0, slots)
    pairs = size * (size - 1) // 2
    rank = 0.5 * (pairs - 1).to(dtype)
    below = rank.floor()
    last = sorted_distance.shape[0] - 1
    low = sorted_distance[(start_of + below.to(start_of.dtype)).clamp(0, last)]
    high = sorted_distance[(start_of + rank.ceil().to(start_of.dtype)).clamp(0, last)]
    median = torch.where(pairs >= 1, torch.lerp(low, high, rank - below).clamp_min(1e-12), torch.ones_like(low))
    return median if grouped else median[0]


def _tile_sums(
    k_side: KernelSide,
    l_side: KernelSide,
    start: int,
    stop: int,
    members: Tensor | None,
    slots: Tensor | None,
    centre: Tensor | None,
) -> Tensor:
    """Rows `start:stop`: `[Σ_j K̃L̃, Σ_j K̃², Σ_j L̃², Σ_j K̃, Σ_j L̃, Σ_j K², Σ_j L²]` per row, `(rows, 7)`, the
    sums over the columns `j` of the row's group (`members` of its slot; None: every row).

    Without `centre`, `K̃` is `K` with a zero diagonal (the unbiased estimator's); with `centre` (`(n, 4)`: per row
    the mean of its row of `K` and `L` over its group, and the mean of those over the group), the double-centred
    `K̂ = K - r 1ᵀ - 1 rᵀ + s` (the biased one's). `Σ_j K²`, `Σ_j L²` are of the kernels themselves, detached."""
    k, l = k_side.tile(start, stop), l_side.tile(start, stop)
    inside = None
    if members is not None:
        inside = members[start:stop, None] & members[None, :]
        if slots is not None:
            inside = inside & (slots[start:stop, None] == slots[None, :])
        k, l = torch.where(inside, k, torch.zeros_like(k)), torch.where(inside, l, torch.zeros_like(l))
    square_k, square_l = k.detach().square().sum(dim=1), l.detach().square().sum(dim=1)
    if centre is None:
        index = torch.arange(k.shape[1], device=k.device)
        off = index[start:stop, None] != index[None, :]
        k, l = torch.where(off, k, torch.zeros_like(k)), torch.where(off, l, torch.zeros_like(l))
    else:
        part = centre[start:stop]
        k = k - part[:, 0:1] - centre[None, :, 0] + part[:, 2:3]
        l = l - part[:, 1:2] - centre[None, :, 1] + part[:, 3:4]
        if inside is not None:
            k, l = torch.where(inside, k, torch.zeros_like(k)), torch.where(inside, l, torch.zeros_like(l))
    sums = [k * l, k.square(), l.square(), k, l]
    return torch.stack([*(s.sum(dim=1) for s in sums), square_k, square_l], dim=1)


def _tiled(
    k_side: KernelSide, l_side: KernelSide, members: Tensor | None, slots: Tensor | None, centre: Tensor | None
) -> Tensor:
    """`_tile_sums` of every row, a tile at a time; each tile recomputed in the backward pass when there are
    several (activation checkpointing), so neither pass holds more than a tile's `(rows, n)` entries."""
    n = k_side.rows.shape[0]
    step = tile_rows(n)
    if step >= n:
        return _tile_sums(k_side, l_side, 0, n, members, slots, centre)
    parts = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        if torch.is_grad_enabled():
            parts.append(
                checkpoint(_tile_sums, k_side, l_side, start, stop, members, slots, centre, use_reentrant=False)
            )
        else:
            parts.append(_tile_sums(k_side, l_side, start, stop, members, slots, centre))
    return torch.cat(parts)


def tiled_hsic_sums(
    k_side: KernelSide,
    l_side: KernelSide,
    n: Tensor,
    *,
    unbiased: bool,
    mask: Tensor | None = None,
    slots: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(HSIC(K, L), HSIC(K, K), HSIC(L, L), Σ K², Σ L²)` of the kernels of two `KernelSide`s, formed a tile of
    rows at a time (`tile_rows`): memory `O(tile_rows(n) · n)` in the forward and the backward pass. `Σ K²` and
    `Σ L²` (every entry of the group, no gradient) are the ratio's rounding test.

    `mask` `(n,)` keeps the entries between its samples and zeroes the others (None: every row); with `slots`
    `(n,)` only those between members of one slot (a group per slot, e.g. per task class), and each result is
    then `(n,)`: per row, its group's, with `n` `(n,)` each row's group size (else `n` 0-d, the sample count).

    - unbiased: from `tr(K̃L̃)`, `1ᵀK̃1`, `1ᵀL̃1`, `1ᵀK̃L̃1` (row sums of the zero-diagonal kernels), as
      `hsic_from_kernels`;
    - biased: a first pass for the row means `r` of `K` and `L`, a second for `Σ K̂ ⊙ L̂` of the double-centred
      `K̂ = K - r 1ᵀ - 1 rᵀ + mean(K)` (`H K H`), over `(n - 1)²`.
    """

    def total(per_row: Tensor) -> Tensor:
        if slots is None:
            return per_row.sum(dim=0)
        return torch.zeros_like(per_row).index_add(0, slots, per_row).index_select(0, slots)

    first = _tiled(k_side, l_side, mask, slots, None)
    if unbiased:
        cross, self_k, self_l, rows_k, rows_l, square_k, square_l = first.unbind(dim=1)
        sum_k, sum_l = total(rows_k), total(rows_l)

        def combine(trace: Tensor, a: Tensor, b: Tensor, rows_a: Tensor, rows_b: Tensor) -> Tensor:
            return (trace + a * b / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * total(rows_a * rows_b)) / (n * (n - 3))

        return (
            combine(total(cross), sum_k, sum_l, rows_k, rows_l),
            combine(total(self_k), sum_k, sum_k, rows_k, rows_k),
            combine(total(self_l), sum_l, sum_l, rows_l, rows_l),
            total(square_k),
            total(square_l),
        )
    count = n if n.dim() == 0 else n[:, None]
    means = (first[:, 3:5] + _diagonals(k_side, l_side, mask)) / count  # row sums of K with its diagonal
    if mask is not None:
        means = torch.where(mask[:, None], means, torch.zeros_like(means))
    group_means = total(means) / count
    centre = torch.cat([means, group_means.expand_as(means)], dim=1)
    rows = _tiled(k_side, l_side, mask, slots, centre)
    scale = (n - 1) ** 2
    return (
        total(rows[:, 0]) / scale,
        total(rows[:, 1]) / scale,
        total(rows[:, 2]) / scale,
        total(rows[:, 5]),
        total(rows[:, 6]),
    )


def _diagonals(k_side: KernelSide, l_side: KernelSide, mask: Tensor | None) -> Tensor:
    """`(n, 2)`: the diagonals of `K` and `L` (`‖x_i‖²` for a linear kernel, 1 for an RBF one), zero outside
    `mask`."""
    columns = []
    for side in (k_side, l_side):
        rows = side.rows
        columns.append((rows * rows).sum(dim=1) if side.kernel == "linear" else torch.ones_like(rows[:, 0]))
    diagonal = torch.stack(columns, dim=1)
    return diagonal if mask is None else torch.where(mask[:, None], diagonal, torch.zeros_like(diagonal))


# --- linear kernels in feature space (docs: Methods §4) -------------------------------------------------


def feature_space_cheaper(n: int, p: int, q: int, *, self_terms: bool = False, grams: int = 1) -> bool:
    """The one rule that picks the form of a linear-kernel HSIC or CKA: True for the feature-space form.

    The feature-space form costs `n·Σ p_a·p_b` multiply-adds for its products (`XᵀY`, and `XᵀX`, `YᵀY` with
    `self_terms`, as a CKA or a normalized HSIC needs); the pairwise form `n²·(p + q)` for the kernel matrices
    and `n²` for each product of two of them. The feature-space form is taken when it costs no more:
    `Σ p_a·p_b ≤ n·(p + q + #products)`. Its memory, `O(n·(p+q) + Σ p_a·p_b)`, is then within a small factor
    of the pairwise form's `O(n²)` at worst, and far below it for features narrower than the batch.

    A per-group ratio (the normalized conditional HSIC) needs `XᵀX` once per group, `grams` of them: the same
    multiply-adds (each row enters one group), but `grams·p²` numbers. It takes the feature-space form when the
    count above holds and `grams·p² ≤ 4·n²` as well: the pairwise form holds at least four `n × n` tensors at
    once (the two kernels and their zero-diagonal or centred copies).

    Args:
        n: the batch size (rows of both sides).
        p: the width of `X`.
        q: the width of `Y`.
        self_terms: whether `XᵀX` and `YᵀY` are needed too (CKA, normalized HSIC).
        grams: the number of groups that need their own `XᵀX` (1: the whole batch).

    Returns:
        True for the feature-space form, False for the pairwise one.
    """
    products = p * q + (p * p + q * q if self_terms else 0)
    cheaper = products <= n * (p + q + (3 if self_terms else 1))
    return cheaper and (grams == 1 or grams * p * p <= 4 * n * n)


def linear_hsic(
    x: Tensor, y: Tensor, n: Tensor, *, unbiased: bool, cross: Tensor | None = None, centred: bool = False
) -> Tensor:
    """HSIC of the linear kernels `K = XXᵀ`, `L = YYᵀ` from the features: no `n × n` matrix.

    `x` `(m, p)` and `y` `(m, q)` hold the rows of the `n` samples (a 0-d tensor, `4 ≤ n ≤ m` unbiased,
    `2 ≤ n` biased) and zero rows for the others. With `M = XᵀY`, `s_X = Xᵀ1`, `s_Y = Yᵀ1` and the squared
    row norms `d_K`, `d_L` (the kernels' diagonals):

    - unbiased (Song et al. 2012), the sums over the kernels with a zero diagonal:
      `tr(K̃L̃) = ‖M‖²_F - Σ d_K d_L`, `1ᵀK̃1 = ‖s_X‖² - Σ d_K`, `1ᵀL̃1 = ‖s_Y‖² - Σ d_L`,
      `1ᵀK̃L̃1 = Σ_i (K̃1)_i (L̃1)_i` with `(K̃1)_i = x_iᵀ s_X - d_K,i`, combined as in `hsic_from_kernels`.
      The estimator is exactly invariant to adding a constant row to either side (the U-statistic's
      terms in the shift cancel), so callers centre the rows first: the sums then round like the
      estimate itself instead of like `‖x̄‖²`.
    - biased: `HSIC_0 = ‖XᵀY‖²_F / (n-1)²`, which is `tr(KHLH) / (n-1)²` for rows centred over the `n` samples
      (the callers' duty).

    Rows of zeros add nothing to any sum, so a masked batch is its members' estimate. Time `O(m·p·q)`, memory
    `O(m·(p+q) + p·q)`.

    Args:
        x: `(m, p)` rows, zero outside the samples.
        y: `(m, q)` rows, zero outside the samples.
        n: the number of samples, a 0-d tensor in the rows' dtype.
        unbiased: the unbiased estimator instead of the biased one.
        cross: `xᵀy` when the caller has it already (e.g. a Gram matrix shared between estimates).
        centred: the rows are centred over the `n` samples, so `s_X = s_Y = 0` and the unbiased sums reduce to
            `1ᵀK̃1 = -Σ d_K`, `1ᵀL̃1 = -Σ d_L`, `1ᵀK̃L̃1 = Σ d_K d_L`: the same value up to rounding with two
            passes over `x` fewer in each direction. The gradient is then the estimator's only after it flows
            back through the centring (`x - mean`, not detached), which projects out what `s_X` contributed.

    Returns:
        a scalar tensor in the rows' dtype.
    """
    cross = x.T @ y if cross is None else cross
    if not unbiased:
        return cross.square().sum() / (n - 1) ** 2
    norms_x, norms_y = x.square().sum(dim=1), y.square().sum(dim=1)
    if centred:
        both = (norms_x * norms_y).sum()
        sum_k, sum_l = -norms_x.sum(), -norms_y.sum()
        trace_term = cross.square().sum() - both
        return (trace_term + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * both) / (n * (n - 3))
    sum_x, sum_y = x.sum(dim=0), y.sum(dim=0)
    trace_term = cross.square().sum() - (norms_x * norms_y).sum()
    sum_k = sum_x.square().sum() - norms_x.sum()
    sum_l = sum_y.square().sum() - norms_y.sum()
    rows_k, rows_l = x @ sum_x - norms_x, y @ sum_y - norms_y
    cross_term = 2.0 / (n - 2) * (rows_k * rows_l).sum()
    return (trace_term + sum_k * sum_l / ((n - 1) * (n - 2)) - cross_term) / (n * (n - 3))


def linear_alignment(x: Tensor, y: Tensor, n: Tensor, *, unbiased: bool) -> Tensor:
    """`kernel_alignment` of the linear kernels of `x` and `y` from the features (`linear_hsic`): no `n × n` matrix.

    `HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L))` with `XᵀY`, `XᵀX` and `YᵀY` (`O(m·(p+q)²)` time, `O(p² + q²)`
    memory); rows as in `linear_hsic` (centred over the `n` samples, zero elsewhere). As in
    `kernel_alignment`, a self-HSIC at the rounding level of its kernel's entries (`≤ 64 eps · mean(K²)`, the
    mean over the `n × n` entries) counts as zero; `mean(K²) = ‖XᵀX‖²_F / n²`, of the centred rows: callers also
    zero rows whose spread is at the rounding level of the uncentred features (`unit_frobenius`), which the
    test on a centred kernel cannot tell from a spread.

    Args:
        x: `(m, p)` rows, zero outside the samples.
        y: `(m, q)` rows, zero outside the samples.
        n: the number of samples, a 0-d tensor in the rows' dtype.
        unbiased: the unbiased HSIC instead of the biased one.

    Returns:
        a scalar tensor in the rows' dtype.
    """
    gram_x, gram_y = x.T @ x, y.T @ y
    self_x = linear_hsic(x, x, n, unbiased=unbiased, cross=gram_x)
    self_y = linear_hsic(y, y, n, unbiased=unbiased, cross=gram_y)
    eps = 64 * torch.finfo(self_x.dtype).eps
    entries = n.detach().square()
    varies = (self_x > eps * gram_x.detach().square().sum() / entries) & (
        self_y > eps * gram_y.detach().square().sum() / entries
    )
    zero = torch.zeros_like(self_x)
    return safe_ratio(
        linear_hsic(x, y, n, unbiased=unbiased), torch.where(varies, self_x, zero), torch.where(varies, self_y, zero)
    )


# --- the same sums across ranks: gather="global" without gathering the batch ------------------------------

GlobalMeasure: TypeAlias = Literal["hsic", "alignment", "linear_cka"]


class _RowSums(NamedTuple):
    """Every sum over rows that `linear_hsic` needs of `(X, Y)`: they add across ranks."""

    cross: Tensor  # XᵀY (p, q)
    sum_x: Tensor  # Xᵀ1 (p,)
    sum_y: Tensor  # Yᵀ1 (q,)
    norms_x: Tensor  # Σ d_K
    norms_y: Tensor  # Σ d_L
    norms_xy: Tensor  # Σ d_K d_L
    x_norms_y: Tensor  # Xᵀ d_L (p,)
    y_norms_x: Tensor  # Yᵀ d_K (q,)


def _row_sums(x: Tensor, y: Tensor) -> _RowSums:
    norms_x, norms_y = x.square().sum(dim=1), y.square().sum(dim=1)
    return _RowSums(
        x.T @ y,
        x.sum(dim=0),
        y.sum(dim=0),
        norms_x.sum(),
        norms_y.sum(),
        (norms_x * norms_y).sum(),
        x.T @ norms_y,
        y.T @ norms_x,
    )


def _hsic_of_sums(s: _RowSums, n: Tensor, unbiased: bool) -> Tensor:
    """`linear_hsic` from the row sums alone: `1ᵀK̃L̃1 = Σ_i (x_iᵀs_X - d_K,i)(y_iᵀs_Y - d_L,i)` expands to
    `s_Xᵀ M s_Y - s_Xᵀ (Xᵀd_L) - s_Yᵀ (Yᵀd_K) + Σ d_K d_L`."""
    if not unbiased:
        return s.cross.square().sum() / (n - 1) ** 2
    trace_term = s.cross.square().sum() - s.norms_xy
    sum_k = s.sum_x.square().sum() - s.norms_x
    sum_l = s.sum_y.square().sum() - s.norms_y
    rows = s.sum_x @ s.cross @ s.sum_y - s.sum_x @ s.x_norms_y - s.sum_y @ s.y_norms_x + s.norms_xy
    return (trace_term + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows) / (n * (n - 3))


def _summed(sums: list[_RowSums], gather: Gather) -> list[_RowSums]:
    """The row sums of every rank added up, in one all-reduce (`distributed.sum_across_ranks`)."""
    parts = [t for s in sums for t in s]
    total = sum_across_ranks(torch.cat([t.reshape(-1) for t in parts]), gather)
    pieces = iter(torch.split(total, [t.numel() for t in parts]))
    return [_RowSums(*(next(pieces).reshape(t.shape) for t in s)) for s in sums]


def linear_across_ranks(
    x: Tensor,
    y: Tensor,
    *,
    unbiased: bool,
    measure: GlobalMeasure,
    gather: Gather,
    members: Tensor | None = None,
    minimum: int = 2,
    largest: Tensor | None = None,
) -> Tensor:
    """A linear-kernel HSIC or CKA of every rank's rows together, from sums that add across ranks.

    `gather="global"` in feature space: instead of gathering the `(B, D)` batches, two all-reduces of sums
    whose size does not grow with the batch or the world size (`distributed.sum_across_ranks`): the count and
    the column sums (for the global means), then the `_RowSums` of the centred rows (`XᵀY`, and `XᵀX`, `YᵀY`
    for a ratio: `D × K` or `D × D` numbers). With `gather="local"` (or no process group) it is the local
    estimate, the same value as the single-process functions.

    - `"hsic"`: `linear_hsic` of the rows centred over all ranks' samples;
    - `"alignment"`: `linear_alignment` (as `cka` with linear kernels, and `irrelevant_hsic(normalized=True)`),
      after the rows are scaled by one power of two from the global largest magnitude (exact; no overflow),
      and 0 where a side's spread is at the rounding level of that magnitude (`unit_frobenius`'s test);
    - `"linear_cka"`: `linear_cka`'s biased ratio `‖XᵀY‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)`, with the same scaling and test
      (`unbiased` does not apply: `linear_cka(unbiased=True)` is the `"alignment"`).

    Args:
        x: `(m, p)` this rank's rows.
        y: `(m, q)` this rank's rows.
        unbiased: the unbiased HSIC instead of the biased one.
        measure: `"hsic"`, `"alignment"` or `"linear_cka"`.
        gather: `"global"` for every rank's rows, `"local"` for this rank's.
        members: `(m,)` booleans, the rows that are samples (the others may hold anything), or None for all.
        minimum: the fewest samples (over all ranks) the estimate needs; fewer give 0 with a zero gradient.
        largest: `(2,)` this rank's largest magnitudes of the values that `x` and `y` were computed from (e.g.
            the features before they were centred within their classes), for the scale and the rounding test
            of a ratio; None: those of `x` and `y`'s member rows.

    Returns:
        a scalar tensor in the rows' dtype, equal on every rank.
    """
    dtype = x.dtype
    members = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if members is None else members
    x = torch.where(members[:, None], x, torch.zeros((), dtype=dtype, device=x.device))
    y = torch.where(members[:, None], y, torch.zeros((), dtype=dtype, device=y.device))
    ratio = measure != "hsic"
    if ratio:  # scale-free: one power of two for every rank, from the largest magnitude of them all
        local = torch.stack([x.detach().abs().amax(), y.detach().abs().amax()]) if largest is None else largest
        top = max_across_ranks(local.to(dtype), gather)
        scale_x, scale_y = unit_scale(top[0]), unit_scale(top[1])
        x, y = x * scale_x, y * scale_y
        top = top * torch.stack([scale_x, scale_y])
    weights = members.to(dtype)
    first = sum_across_ranks(torch.cat([weights.sum()[None], weights @ x, weights @ y]), gather)
    count, p = first[0], x.shape[1]
    enough = count >= minimum
    n = torch.where(enough, count, float(minimum))
    xc = torch.where(members[:, None], x - first[1 : 1 + p] / n, torch.zeros((), dtype=dtype, device=x.device))
    yc = torch.where(members[:, None], y - first[1 + p :] / n, torch.zeros((), dtype=dtype, device=y.device))
    if not ratio:
        (sums,) = _summed([_row_sums(xc, yc)], gather)
        value = _hsic_of_sums(sums, n, unbiased)
        return torch.where(enough, value, torch.zeros_like(value))
    sums, self_x, self_y = _summed([_row_sums(xc, yc), _row_sums(xc, xc), _row_sums(yc, yc)], gather)
    rounding = 8 * torch.finfo(dtype).eps * top
    noise_floor = rounding * rounding * n.detach() * torch.tensor([p, y.shape[1]], dtype=dtype, device=x.device)
    noise_floor = noise_floor.clamp_min(torch.finfo(dtype).tiny)
    varies = enough & (self_x.norms_x > noise_floor[0]) & (self_y.norms_x > noise_floor[1])
    if measure == "linear_cka":
        value = safe_ratio(sums.cross.square().sum(), self_x.cross.square().sum(), self_y.cross.square().sum())
        return torch.where(varies, value, torch.zeros_like(value))
    hsic_x, hsic_y = _hsic_of_sums(self_x, n, unbiased), _hsic_of_sums(self_y, n, unbiased)
    eps = 64 * torch.finfo(dtype).eps
    entries = n.detach().square()
    varies = (
        varies
        & (hsic_x > eps * self_x.cross.detach().square().sum() / entries)
        & (hsic_y > eps * self_y.cross.detach().square().sum() / entries)
    )
    zero = torch.zeros_like(hsic_x)
    value = safe_ratio(
        _hsic_of_sums(sums, n, unbiased), torch.where(varies, hsic_x, zero), torch.where(varies, hsic_y, zero)
    )
    return torch.where(varies, value, zero)


def global_count(count: int, gather: Gather, device: torch.device) -> int:
    """The number of rows over every rank (this rank's `count` under `"local"` or without a process group): a
    host read, as the batch sizes `gather_batch` exchanges."""
    if gather == "local" or not is_distributed():
        return count
    return int(sum_across_ranks(torch.tensor([count], device=device), gather).item())
