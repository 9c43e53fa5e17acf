"""Why conditional `Purify` fails or works on Biased MNIST: what its erased subspace takes from the features.

On one seed of studies/biased_mnist.py (background colour, `--rho`), a network is trained with
`Purify(10, 64, conditional=True)` between its 64 features and its head, and after every epoch this logs, on
the training images: the training cross-entropy, the rank `r` of the erased basis, and how much of the
features' structure lies in the erased subspace — the share of their total (centred) variance, of the digit
classes' between-class scatter (the task's directions) and of the colours' within-digit scatter (what it
should remove). Variants of `Purify`'s settings (`--variants`) run the same way, each from the same start.

    python studies/purify_diagnostic.py [--rho 0.99] [--epochs 4] [--variants default rtol=0.1 momentum=0.1]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import negtransfer_losses as ntl

sys.path.insert(0, str(Path(__file__).parent))
from biased_mnist import Net, Split, make_splits


def scatter_share(z: Tensor, basis: Tensor, groups: Tensor) -> float:
    """Share of the between-group scatter of `z` (group means around the grand mean, weighted by size) in
    the span of `basis`."""
    zc = z - z.mean(0)
    onehot = F.one_hot(groups).to(z.dtype)
    means = (onehot.T @ zc) / onehot.sum(0).clamp_min(1)[:, None]
    scatter = (onehot.sum(0)[:, None] * means**2).sum()
    inside = (onehot.sum(0)[:, None] * (means @ basis) ** 2).sum()
    return float(inside / scatter) if float(scatter) > 0 else 0.0


def singular_ratio(purify: ntl.Purify) -> float:
    """Smallest over largest singular value among the erased directions of conditional Purify's estimate."""
    if not purify.ready:
        return 0.0
    s = torch.linalg.svdvals(purify.cross_covariance_sum.double())
    s = s[s > purify.rtol * s.max()]
    return float(s[-1] / s[0])


def alignment(basis: Tensor, model: Net, copy: Split) -> float:
    """Mean squared cosine of the principal angles between the erased basis and the colour's directions
    (1: the same subspace; about r/64 for a random one)."""
    if basis.shape[1] == 0:
        return 0.0
    reference = colour_basis(model.features(copy.images), copy.digits, copy.factors)
    return float((basis.T @ reference).pow(2).sum() / basis.shape[1])


def within_scatter_share(z: Tensor, basis: Tensor, digits: Tensor, colours: Tensor) -> float:
    """Share of the colours' within-digit scatter (colour means around their digit's mean) in `basis`'s span."""
    total, inside = 0.0, 0.0
    for d in digits.unique():
        here = digits == d
        zd = z[here] - z[here].mean(0)
        cols = colours[here]
        for c in cols.unique():
            m = zd[cols == c].mean(0)
            n = int((cols == c).sum())
            total += n * float(m @ m)
            inside += n * float((m @ basis) @ (m @ basis))
    return inside / total if total > 0 else 0.0


def colour_basis(z: Tensor, digits: Tensor, colours: Tensor, rank: int = 9) -> Tensor:
    """The colour's directions estimated from many samples: the top `rank` left singular vectors of the
    within-digit colour-mean differences (every colour in every digit, from the randomly coloured copy)."""
    columns = []
    for d in digits.unique():
        here = digits == d
        mean = z[here].mean(0)
        columns += [z[here & (colours == c)].mean(0) - mean for c in colours[here].unique()]
    u, _, _ = torch.linalg.svd(torch.stack(columns, 1), full_matrices=False)
    return u[:, :rank]


def diagnose(rho: float, epochs: int, variant: str, seed: int = 0) -> list[dict[str, float]]:
    train_split, copy = make_splits(seed, rho, "background")[:2]
    options: dict[str, float] = {}
    if variant != "default":
        name, value = variant.split("=")
        options[name] = float(value)
    momentum = options.pop("momentum", 0.01)
    purify = ntl.Purify(10, 64, momentum=momentum, conditional=True, **options)  # type: ignore[arg-type]
    torch.manual_seed(seed)
    model = Net()
    model.purify = purify  # a submodule of the model (its running estimates in its state); applied by hand below
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    log = []
    for epoch in range(epochs + 1):
        if epoch:
            model.train()
            total = 0.0
            for idx in torch.randperm(len(train_split.digits), generator=g).split(64):
                y, u = train_split.digits[idx], train_split.factors[idx]
                z = purify(model.features(train_split.images[idx]), u, task_labels=y)
                ce = F.cross_entropy(model.head(z), y)
                optimizer.zero_grad()
                ce.backward()
                optimizer.step()
                total += float(ce.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            z = model.features(train_split.images)
            basis = purify.basis()
            zc = z - z.mean(0)
            erased_variance = float(((zc @ basis) ** 2).sum() / (zc**2).sum()) if basis.shape[1] else 0.0
            logits = model.head(purify(z))
            row = {
                "epoch": epoch,
                "train_loss": total / len(train_split.digits)
                if epoch
                else float(F.cross_entropy(logits, train_split.digits)),
                "train_accuracy": float((logits.argmax(1) == train_split.digits).float().mean()),
                "rank": basis.shape[1],
                "variance_erased": erased_variance,
                "digit_scatter_erased": scatter_share(z, basis, train_split.digits),
                "colour_within_digit_scatter_erased": within_scatter_share(
                    z, basis, train_split.digits, train_split.factors
                ),
                "singular_ratio_last_first": singular_ratio(purify),
                "alignment_with_colour_directions": alignment(basis, model, copy),
                "digit_scatter_in_colour_directions": scatter_share(
                    z, colour_basis(model.features(copy.images), copy.digits, copy.factors), train_split.digits
                ),
                "feature_effective_rank": float(
                    torch.linalg.svdvals(zc).pow(2).sum() ** 2 / torch.linalg.svdvals(zc).pow(4).sum()
                ),
            }
        print(rho, variant, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        log.append(row)
    return log


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rho", type=float, default=0.99)
    parser.add_argument("--rhos", type=float, nargs="+", default=None, help="several ρ (default: --rho)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=["default"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logs = {f"{rho} {v}": diagnose(rho, args.epochs, v) for rho in args.rhos or [args.rho] for v in args.variants}
    if args.out is not None:
        command = shlex.join(["python", "studies/purify_diagnostic.py", *(sys.argv[1:] if argv is None else argv)])
        args.out.write_text(json.dumps({"command": command, "epochs": args.epochs, "logs": logs}, indent=1))
    return logs


if __name__ == "__main__":
    main()
