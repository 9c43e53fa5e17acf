"""Independent float64 oracles, written from METHODS.md with explicit matrices and loops.

They share no code with the package. Each is differentiable (torch float64) so gradients can be compared
too; the RBF bandwidth is a constant (median of distances, via numpy) as the contract says.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def flat(x: Tensor) -> Tensor:
    return x.double().reshape(x.shape[0], -1)


def centring(n: int) -> Tensor:
    return torch.eye(n, dtype=torch.float64) - torch.ones(n, n, dtype=torch.float64) / n


def linear_kernel(x: Tensor) -> Tensor:
    x = flat(x)
    return x @ x.T


def rbf_kernel(x: Tensor, sigma: float | None = None) -> Tensor:
    x = flat(x)
    n = x.shape[0]
    rows = []
    for i in range(n):
        rows.append(torch.stack([((x[i] - x[j]) ** 2).sum() for j in range(n)]))
    sq = torch.stack(rows)
    if sigma is None:
        d = sq.detach().numpy()
        pairs = [np.sqrt(d[i, j]) for i in range(n) for j in range(i + 1, n)]
        sigma = max(float(np.median(pairs)), 1e-12)
    return torch.exp(-sq / (2 * sigma**2))


def kernel(x: Tensor, name: str, sigma: float | None = None) -> Tensor:
    return linear_kernel(x) if name == "linear" else rbf_kernel(x, sigma)


def hsic_biased(k: Tensor, l: Tensor) -> Tensor:
    n = k.shape[0]
    h = centring(n)
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    n = k.shape[0]
    mask = 1.0 - torch.eye(n, dtype=torch.float64)
    kt, lt = k * mask, l * mask
    one = torch.ones(n, 1, dtype=torch.float64)
    term1 = torch.trace(kt @ lt)
    term2 = (one.T @ kt @ one).squeeze() * (one.T @ lt @ one).squeeze() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one.T @ kt @ lt @ one).squeeze()
    return (term1 + term2 - term3) / (n * (n - 3))


def hsic(x: Tensor, y: Tensor, kernel_name: str = "linear", unbiased: bool = True) -> Tensor:
    k, l = kernel(x, kernel_name), kernel(y, kernel_name)
    return hsic_unbiased(k, l) if unbiased else hsic_biased(k, l)


def cka(x: Tensor, y: Tensor, kernel_name: str = "linear", unbiased: bool = False) -> Tensor:
    k, l = kernel(x, kernel_name), kernel(y, kernel_name)
    f = hsic_unbiased if unbiased else hsic_biased
    return f(k, l) / torch.sqrt(f(k, k) * f(l, l))


def linear_cka_feature_space(x: Tensor, y: Tensor) -> Tensor:
    xc = flat(x) - flat(x).mean(0)
    yc = flat(y) - flat(y).mean(0)
    return torch.linalg.norm(yc.T @ xc) ** 2 / (torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc))


def cosine_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    a, b = flat(a), flat(b)
    out = []
    for i in range(a.shape[0]):
        # max(|a_i|, eps) as sqrt(max(|a_i|², eps²)): the same number, and a gradient at a zero row (sqrt's is inf)
        na = torch.sqrt(torch.clamp((a[i] ** 2).sum(), min=eps**2))
        nb = torch.sqrt(torch.clamp((b[i] ** 2).sum(), min=eps**2))
        out.append((a[i] * b[i]).sum() / (na * nb))
    return torch.stack(out)


def gram_sample(x: Tensor) -> Tensor:
    b, c = x.shape[:2]
    v = x.double().reshape(b, c, -1)
    g = torch.zeros(b, c, c, dtype=torch.float64)
    for s in range(b):
        for i in range(c):
            for j in range(c):
                g[s, i, j] = (v[s, i] * v[s, j]).sum()
    return g


def gram_batch(x: Tensor) -> Tensor:
    b, c = x.shape[:2]
    v = x.double().reshape(b * c, -1)
    m = b * c
    g = torch.zeros(m, m, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            g[i, j] = (v[i] * v[j]).sum()
    return g


def aggregate(x: Tensor, method: str, p: float = 0.001, offset: float = 1e-10) -> Tensor:
    x = x.double()
    if method == "none":
        return x
    if method == "mean":
        return x.mean(1, keepdim=True)
    if method == "sum":
        return x.sum(1, keepdim=True)
    if method == "max":
        return x.amax(1, keepdim=True)
    prod = torch.ones_like(x[:, :1])
    for c in range(x.shape[1]):
        prod = prod * (x[:, c : c + 1] + offset) ** p
    return prod


def aggregated(x: Tensor, aggregation: str, scope: str, offset: float = 1e-10, channels: int | None = None) -> Tensor:
    """`A(x)` of METHODS.md §1 in float64: the Gram matrices, a channel aggregation, or the materialized pairwise rows
    (`a = [S_1 ×C, S_2 ×C, …]` with `C = channels` of the other side, one row a sample)."""
    x = x.double()
    if aggregation == "pairwise":
        b_, c_ = x.shape[0], x.shape[1]
        x3, repeat = x.reshape(b_, c_, -1), c_ if channels is None else channels
        return torch.stack([torch.cat([x3[k, i] for i in range(c_) for _ in range(repeat)]) for k in range(b_)])
    if aggregation == "gram":
        return gram_batch(x) if scope == "batch" else gram_sample(x)
    return aggregate(x, aggregation, offset=offset)


def anti_transfer(
    s: Tensor,
    r: Tensor,
    aggregation: str,
    distance: str,
    scope: str,
    eps: float = 1e-8,
    offsets: tuple[float, float] = (1e-10, 1e-10),
) -> Tensor:
    """METHODS.md §1, term by term; the frozen reference is a constant. `offsets`: the `δ` of `"mul"` for the
    student and the reference (the library raises it to float16's smallest normal number for float16 maps)."""
    s, r = s.double(), r.double().detach()
    if aggregation == "pairwise":  # b = [R_1, …, R_C] ×C: the reference's channels in turn, C times
        r3 = r.reshape(r.shape[0], r.shape[1], -1)
        a = aggregated(s, "pairwise", scope, channels=r.shape[1])
        b = torch.stack(
            [torch.cat([r3[k, j] for _ in range(s.shape[1]) for j in range(r.shape[1])]) for k in range(r.shape[0])]
        )
    else:
        a, b = aggregated(s, aggregation, scope, offsets[0]), aggregated(r, aggregation, scope, offsets[1])
    if distance == "cka":
        return linear_cka_feature_space(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    if distance == "mse_sigmoid":
        if aggregation == "gram":  # the authors' scale: / (B·C·N) / 0.001
            a, b = a / s.numel() / 0.001, b / s.numel() / 0.001
        return -torch.sigmoid(((a - b) ** 2).mean())
    rows_a, rows_b = [], []
    if aggregation == "pairwise" or (aggregation == "gram" and scope == "batch"):
        rows_a, rows_b = [a[i] for i in range(a.shape[0])], [b[i] for i in range(b.shape[0])]
    elif aggregation == "gram":
        for k in range(a.shape[0]):
            rows_a += [a[k, i] for i in range(a.shape[1])]
            rows_b += [b[k, i] for i in range(b.shape[1])]
    elif a.dim() == 2:
        rows_a, rows_b = [a[k] for k in range(a.shape[0])], [b[k] for k in range(b.shape[0])]
    else:
        for k in range(a.shape[0]):
            rows_a += [a[k, c].flatten() for c in range(a.shape[1])]
            rows_b += [b[k, c].flatten() for c in range(b.shape[1])]
    cosines = cosine_rows(torch.stack(rows_a), torch.stack(rows_b), eps)
    mean_abs = cosines.abs().mean()
    return mean_abs**2 if distance == "cos_squared" else mean_abs


def onehot_kernel(labels: Tensor, num_classes: int) -> Tensor:
    """The delta kernel: L_ij = 1 when u_i = u_j."""
    n = labels.shape[0]
    out = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            out[i, j] = float(labels[i] == labels[j])
    return out


def irrelevant_hsic(z: Tensor, labels: Tensor, num_classes: int, kernel_name: str, normalized: bool) -> Tensor:
    """HSIC (unbiased) between `z` and the delta kernel of the known `labels` (-100 left out)."""
    keep = [i for i in range(labels.shape[0]) if int(labels[i]) != -100]
    z_known = flat(z)[keep]
    k = kernel(z_known, kernel_name)
    l = onehot_kernel(labels[keep], num_classes)
    value = hsic_unbiased(k, l)
    if normalized:
        value = value / torch.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l))
    return value


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    terms = []
    for i in range(labels.shape[0]):
        if int(labels[i]) == ignore_index:
            continue
        terms.append(-_log_softmax(logits[i].double())[int(labels[i])])
    return torch.stack(terms).mean()


def mean_p_log_p(logits: Tensor) -> Tensor:
    rows = [_log_softmax(row) for row in logits.double()]
    return torch.stack([(torch.exp(log_p) * log_p).sum() for log_p in rows]).mean()


# --- distribution matching (METHODS.md §3), sample by sample ------------------------------------------


def _softmax(z: Tensor) -> Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def _sigmoid(z: Tensor) -> Tensor:
    return torch.exp(_log_sigmoid(z))  # not 1 / (1 + exp(-z)): its gradient is inf / inf at z = -1e4


def _log_softmax(z: Tensor) -> Tensor:
    """`log softmax(z)` as `z - max - log Σ exp(z - max)`: finite for logits of any size (1e4 and beyond)."""
    shifted = z - z.max()
    return shifted - torch.log(torch.exp(shifted).sum())


def _log_sigmoid(z: Tensor) -> Tensor:
    """`log σ(z) = -log(1 + exp(-z))`, as `min(z, 0) - log(1 + exp(-|z|))`: finite for logits of any size;
    `log(1 - σ(z))` is `_log_sigmoid(-z)`."""
    return torch.clamp(z, max=0.0) - torch.log1p(torch.exp(-z.abs()))


def _clamp_log(x: Tensor, eps: float = 1e-6) -> Tensor:
    return torch.log(torch.clamp(x, min=eps, max=1.0))


def dm_a_to_b(za: Tensor, zb: Tensor, r: Tensor, kind: str, divergence: str, detach: bool) -> Tensor:
    per_sample = []
    for i in range(za.shape[0]):
        pa = _softmax(za[i].double())
        if detach:
            pa = pa.detach()
        qb = torch.stack([sum(pa[k] * r[k, m] for k in range(r.shape[0])) for m in range(r.shape[1])])
        if kind == "multilabel":
            zi = zb[i].double()
            terms = [-(qb[m] * _log_sigmoid(zi[m]) + (1 - qb[m]) * _log_sigmoid(-zi[m])) for m in range(r.shape[1])]
            if divergence == "kl":
                terms = [
                    t + qb[m] * _clamp_log(qb[m]) + (1 - qb[m]) * _clamp_log(1 - qb[m]) for m, t in enumerate(terms)
                ]
            per_sample.append(torch.stack(terms).mean())
        else:
            log_pb = _log_softmax(zb[i].double())
            value = -(qb * log_pb).sum()
            if divergence == "kl":
                value = value + (qb * _clamp_log(qb)).sum()
            per_sample.append(value)
    return torch.stack(per_sample).mean()


def infer_a(
    pb: Tensor, r: Tensor, prior: Tensor, kind: str, inversion: str, mask: Tensor | None = None, eps: float = 1e-6
) -> Tensor:
    """q_A for one sample's p_B (M,)."""
    k_classes, m_attrs = r.shape
    mask = torch.ones(m_attrs, dtype=torch.bool) if mask is None else mask
    if inversion == "bayes" and kind == "multiclass":
        q = []
        for k in range(k_classes):
            total = 0.0
            for m in range(m_attrs):
                if not mask[m]:
                    continue
                norm = sum(prior[j] * r[j, m] for j in range(k_classes))
                if norm > 0:
                    total = total + pb[m] * prior[k] * r[k, m] / norm
            q.append(torch.as_tensor(total, dtype=torch.float64))
        q = torch.stack(q)
        return q / q.sum()
    if inversion == "bayes":
        logits = []
        for k in range(k_classes):
            value = torch.log(prior[k])
            for m in range(m_attrs):
                if mask[m]:
                    rc = torch.clamp(r[k, m], eps, 1 - eps)
                    value = value + pb[m] * torch.log(rc) + (1 - pb[m]) * torch.log(1 - rc)
            logits.append(value)
        return _softmax(torch.stack(logits))
    active = [k for k in range(k_classes) if bool((r[k] > 0).any())]
    logits = []
    for k in active:
        logits.append(
            sum(r[k, m] * _clamp_log(pb[m]) for m in range(m_attrs) if mask[m] and r[k, m] > 0)
            + torch.zeros((), dtype=torch.float64)
        )
    q_active = _softmax(torch.stack(logits))
    q = torch.zeros(k_classes, dtype=torch.float64)
    for j, k in enumerate(active):
        q = q + q_active[j] * torch.eye(k_classes, dtype=torch.float64)[k]
    return q


def dm_b_to_a(
    za: Tensor, zb: Tensor, r: Tensor, prior: Tensor, kind: str, inversion: str, divergence: str, detach: bool
) -> Tensor:
    per_sample = []
    for i in range(za.shape[0]):
        pb = _sigmoid(zb[i].double()) if kind == "multilabel" else _softmax(zb[i].double())
        if detach:
            pb = pb.detach()
        qa = infer_a(pb, r, prior, kind, inversion)
        log_pa = _log_softmax(za[i].double())
        value = -(qa * log_pa).sum()
        if divergence == "kl":
            value = value + (qa * _clamp_log(qa)).sum()
        per_sample.append(value)
    return torch.stack(per_sample).mean()


def masked_ce(z: Tensor, labels: Tensor) -> Tensor:
    terms = [-_log_softmax(z[i].double())[int(labels[i])] for i in range(len(labels)) if int(labels[i]) != -100]
    return torch.stack(terms).mean()


def masked_bce(z: Tensor, targets: Tensor) -> Tensor:
    per_sample = []
    for i in range(z.shape[0]):
        entries = [m for m in range(z.shape[1]) if not torch.isnan(targets[i, m]) and targets[i, m] >= 0]
        if not entries:
            continue
        zi = z[i].double()
        total = sum(
            -(targets[i, m] * _log_sigmoid(zi[m]) + (1 - targets[i, m]) * _log_sigmoid(-zi[m])) for m in entries
        )
        per_sample.append(total / len(entries))
    return torch.stack(per_sample).mean()


def co_annotation(
    za: Tensor, zb: Tensor, la: Tensor, lb: Tensor, r: Tensor, prior: Tensor, kind: str, inversion: str
) -> tuple[Tensor, Tensor]:
    loss_a, loss_b = [], []
    for i in range(za.shape[0]):
        a_known = int(la[i]) != -100
        if kind == "multilabel":
            b_mask = torch.tensor([not torch.isnan(lb[i, m]) and lb[i, m] >= 0 for m in range(r.shape[1])])
            b_values = torch.where(b_mask, torch.nan_to_num(lb[i].double(), nan=0.0), 0.0)
        else:
            b_mask = torch.full((r.shape[1],), int(lb[i]) != -100)
            b_values = (
                torch.eye(r.shape[1], dtype=torch.float64)[int(lb[i])]
                if int(lb[i]) != -100
                else torch.zeros(r.shape[1], dtype=torch.float64)
            )
        b_known = bool(b_mask.any())
        if a_known and not b_known:
            target = r[int(la[i])]
            if kind == "multilabel":
                zi = zb[i].double()
                loss_b.append(
                    torch.stack(
                        [
                            -(target[m] * _log_sigmoid(zi[m]) + (1 - target[m]) * _log_sigmoid(-zi[m]))
                            for m in range(r.shape[1])
                        ]
                    ).mean()
                )
            else:
                loss_b.append(-(target * _log_softmax(zb[i].double())).sum())
        if b_known and not a_known:
            qa = infer_a(b_values, r, prior, kind, inversion, b_mask)
            loss_a.append(-(qa * _log_softmax(za[i].double())).sum())
    zero = (za.sum() + zb.sum()).double() * 0
    mean = lambda xs: torch.stack(xs).mean() if xs else zero  # noqa: E731
    return mean(loss_a), mean(loss_b)


# --- conditional suppression (docs/task-irrelevant-labels.md, "Conditional suppression") ---------------


def _eligible_classes(u: Tensor, y: Tensor, minimum: int, ignore_index: int = -100) -> dict[int, list[int]]:
    """The one eligibility rule of the conditional forms: task class → indices of its samples with u and y
    known, for classes with ≥ minimum such samples and at least two distinct u values among them."""
    members: dict[int, list[int]] = {}
    for i in range(u.shape[0]):
        if int(u[i]) != ignore_index and int(y[i]) != ignore_index:
            members.setdefault(int(y[i]), []).append(i)
    return {c: idx for c, idx in members.items() if len(idx) >= minimum and len({int(u[i]) for i in idx}) >= 2}


def conditional_irrelevant_hsic(
    z: Tensor,
    u: Tensor,
    y: Tensor,
    num_classes: int,
    kernel_name: str = "linear",
    normalized: bool = False,
    unbiased: bool = True,
) -> Tensor:
    """Σ_c n_c HSIC(z_c, u_c) / Σ_c n_c over eligible task classes; 0 when none."""
    f = hsic_unbiased if unbiased else hsic_biased
    total = torch.zeros((), dtype=torch.float64) + 0.0 * flat(z).sum()
    weights = 0
    for idx in _eligible_classes(u, y, 4 if unbiased else 2).values():
        k = kernel(flat(z)[idx], kernel_name)
        l = onehot_kernel(u[idx], num_classes)
        value = f(k, l)
        if normalized:  # a non-positive denominator (possible for the unbiased estimator) gives 0
            den = f(k, k) * f(l, l)
            value = value / torch.sqrt(den) if den > 0 else 0.0 * value
        total = total + len(idx) * value
        weights += len(idx)
    return total / weights if weights else total


def _centre_by_class(x: Tensor, classes: list[int]) -> Tensor:
    """Each row minus the mean of the rows of its class (loops)."""
    rows = []
    for i in range(x.shape[0]):
        same = [j for j in range(x.shape[0]) if classes[j] == classes[i]]
        rows.append(x[i] - torch.stack([x[j] for j in same]).mean(0))
    return torch.stack(rows)


def conditional_adversarial_ce(z: Tensor, u: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """CE of a linear head on the features centred within task class plus the batch's log p̂(u | y), over the
    eligible samples."""
    eligible = _eligible_classes(u, y, 1)
    idx = sorted(i for members in eligible.values() for i in members)
    if not idx:
        return 0.0 * flat(z).sum()
    classes = [int(y[i]) for i in idx]
    zc = _centre_by_class(flat(z)[idx], classes)
    k = weight.shape[0]
    prior = torch.zeros(len(idx), k, dtype=torch.float64)  # log p̂(u | y), add-½ counts over the eligible samples
    for row, c in enumerate(classes):
        counts = [sum(1 for i in idx if int(y[i]) == c and int(u[i]) == j) + 0.5 for j in range(k)]
        for j in range(k):
            prior[row, j] = float(np.log(counts[j] / sum(counts)))
    return cross_entropy(zc @ weight.double().T + bias.double() + prior, u[idx])


def conditional_adversarial_entropy(z: Tensor, u: Tensor, y: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """mean Σ p log p of a linear head on the features centred within task class, over the eligible samples."""
    eligible = _eligible_classes(u, y, 1)
    idx = sorted(i for members in eligible.values() for i in members)
    if not idx:
        return 0.0 * flat(z).sum()
    zc = _centre_by_class(flat(z)[idx], [int(y[i]) for i in idx])
    return mean_p_log_p(zc @ weight.double().T + bias.double())


def conditional_cka(
    z: Tensor, r: Tensor, y: Tensor, unbiased: bool = False, ignore_index: int = -100, kernel_name: str = "linear"
) -> Tensor:
    """CKA of the two sides centred within task class, over the samples whose task label is known."""
    idx = [i for i in range(y.shape[0]) if int(y[i]) != ignore_index]
    classes = [int(y[i]) for i in idx]
    return cka(_centre_by_class(flat(z)[idx], classes), _centre_by_class(flat(r)[idx], classes), kernel_name, unbiased)


def within_class_cross_covariance(z: Tensor, u: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, int]:
    """Σ_{eligible i} (z_i - z̄_{y_i})(e_{u_i} - ē_{y_i})ᵀ and the number of eligible samples."""
    eligible = _eligible_classes(u, y, 1)
    idx = sorted(i for members in eligible.values() for i in members)
    out = torch.zeros(flat(z).shape[1], num_classes, dtype=torch.float64)
    if not idx:
        return out, 0
    classes = [int(y[i]) for i in idx]
    zc = _centre_by_class(flat(z)[idx], classes)
    onehot = torch.zeros(len(idx), num_classes, dtype=torch.float64)
    for row, i in enumerate(idx):
        onehot[row, int(u[i])] = 1.0
    ec = _centre_by_class(onehot, classes)
    for row in range(len(idx)):
        out += torch.outer(zc[row], ec[row])
    return out, len(idx)


def column_projector(matrix: Tensor, rtol: float = 1e-6) -> Tensor:
    """`U_r U_rᵀ`: the orthogonal projector onto the left singular vectors of `matrix` (D, K) whose singular value
    is above `rtol ×` the largest (numpy's SVD, float64)."""
    u, singular, _ = np.linalg.svd(matrix.detach().double().numpy(), full_matrices=False)
    kept = u[:, (singular > rtol * singular.max()) & (singular > 0)] if singular.size else u[:, :0]
    return torch.from_numpy(kept @ kept.T)


def erasure_projector(class_means: Tensor, rtol: float = 1e-6) -> Tensor:
    """The projector onto `span{μ_k − μ̄}` of class means `(K, D)`: what `Purify` erases."""
    means = class_means.detach().double()
    return column_projector((means - means.mean(dim=0, keepdim=True)).T, rtol)
