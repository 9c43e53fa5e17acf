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


def hsic_biased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    n = k.shape[0]
    h = centring(n)
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:  # noqa: E741
    n = k.shape[0]
    mask = 1.0 - torch.eye(n, dtype=torch.float64)
    kt, lt = k * mask, l * mask
    one = torch.ones(n, 1, dtype=torch.float64)
    term1 = torch.trace(kt @ lt)
    term2 = (one.T @ kt @ one).squeeze() * (one.T @ lt @ one).squeeze() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (one.T @ kt @ lt @ one).squeeze()
    return (term1 + term2 - term3) / (n * (n - 3))


def hsic(x: Tensor, y: Tensor, kernel_name: str = "linear", unbiased: bool = True) -> Tensor:
    k, l = kernel(x, kernel_name), kernel(y, kernel_name)  # noqa: E741
    return hsic_unbiased(k, l) if unbiased else hsic_biased(k, l)


def cka(x: Tensor, y: Tensor, kernel_name: str = "linear", unbiased: bool = False) -> Tensor:
    k, l = kernel(x, kernel_name), kernel(y, kernel_name)  # noqa: E741
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
        na = torch.maximum(torch.sqrt((a[i] ** 2).sum()), torch.tensor(eps, dtype=torch.float64))
        nb = torch.maximum(torch.sqrt((b[i] ** 2).sum()), torch.tensor(eps, dtype=torch.float64))
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


def aggregate(x: Tensor, method: str, p: float = 0.001) -> Tensor:
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
        prod = prod * (x[:, c : c + 1] + 1e-10) ** p
    return prod


def anti_transfer(s: Tensor, r: Tensor, aggregation: str, distance: str, scope: str, eps: float = 1e-8) -> Tensor:
    """METHODS.md §1, term by term; the frozen reference is a constant."""
    s, r = s.double(), r.double().detach()
    if aggregation == "gram":
        g = gram_batch if scope == "batch" else gram_sample
        a, b = g(s), g(r)
    else:
        a, b = aggregate(s, aggregation), aggregate(r, aggregation)
    if distance == "cka":
        return linear_cka_feature_space(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))
    if distance == "mse_sigmoid":
        if aggregation == "gram":  # the authors' scale: / (B·C·N) / 0.001
            a, b = a / s.numel() / 0.001, b / s.numel() / 0.001
        return -torch.sigmoid(((a - b) ** 2).mean())
    rows_a, rows_b = [], []
    if aggregation == "gram" and scope == "batch":
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


def irrelevant_hsic(z: Tensor, labels: Tensor, num_classes: int, kernel_name: str = "linear",
                    normalized: bool = False, ignore_index: int = -100) -> Tensor:
    keep = [i for i in range(labels.shape[0]) if int(labels[i]) != ignore_index]
    z_known = flat(z)[keep]
    k = kernel(z_known, kernel_name)
    l = onehot_kernel(labels[keep], num_classes)  # noqa: E741
    value = hsic_unbiased(k, l)
    if normalized:
        value = value / torch.sqrt(hsic_unbiased(k, k) * hsic_unbiased(l, l))
    return value


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    terms = []
    for i in range(labels.shape[0]):
        if int(labels[i]) == ignore_index:
            continue
        row = logits[i].double()
        terms.append(torch.log(torch.exp(row).sum()) - row[int(labels[i])])
    return torch.stack(terms).mean()


def mean_p_log_p(logits: Tensor) -> Tensor:
    p = torch.exp(logits.double()) / torch.exp(logits.double()).sum(dim=1, keepdim=True)
    return (p * torch.log(p)).sum(dim=1).mean()
