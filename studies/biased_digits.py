"""Case study: digits whose colour is spuriously tied to the label (task-irrelevant labels, anti-transfer).

scikit-learn's 8×8 digits (1,797 images, shipped with the package) are rendered in one of 10 colours. In
training, a share `--correlation` of the images of digit d get colour d (the shortcut); the validation and
test images get random colours. The colour is the task-irrelevant factor; its labels are known for every
training image.

Methods (all on the same CNN, the same data and seeds):
- plain: cross-entropy only;
- anti-transfer: `AntiTransferLoss` between the student's conv layers (`FeatureTap`) and those of a frozen
  network trained to predict colour on its own randomly coloured copy of the training images
  (`FrozenReference`);
- hsic / adversarial: `HSICSuppression` / `AdversarialSuppression` with the colour labels on the penultimate
  features;
- cka: `CKASuppression` against the frozen colour network's penultimate features;
- purify: `Purify` with the colour labels before the classifier;
- hsic_conditional / adversarial_conditional / cka_conditional / purify_conditional: the conditional variants
  (`conditional=True`, given the digit labels too), which remove what the colour says beyond the digit.

Every suppression module is built by name and called alike, `module(z, signal, task_labels=digits)` (an
unconditional one leaves the digits unused): the signal is the colour labels (HSIC, the adversary) or the
frozen colour network's features (CKA). `Purify` is a transform before the head, `purify(z, u, task_labels=y)`.

Reported: test accuracy (random colours, so unbiased), mean ± std over seeds, and the colour
linear-probe accuracy of the learned features (logistic regression fitted on validation features, scored
on test; chance 10 %). Every method runs at the library's defaults (`DEFAULTS`): nothing is tuned.

    python studies/biased_digits.py [--seeds 5] [--correlation 0.99] [--epochs 30] [--out results]

`--sweep` runs the correlation study: every method at each of `--correlations` (0.90 0.95 0.98 0.99), each
weight of `SWEEP_GRID` (which holds the default) trained once per seed; per method and correlation it
reports the test accuracy at the default weight beside that of the weight with the best mean validation
accuracy (never the test split). Runs are cached in `--out`/biased_sweep_runs.json, so an
interrupted or extended sweep (new methods, seeds) only trains what is missing.

    python studies/biased_digits.py --sweep [--seeds 3] [--out docs/img]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from tqdm import tqdm

import negtransfer_losses as ntl

sys.path.insert(0, str(Path(__file__).parent))
from study_results import SETTINGS, SIGNALS, Record, runs_at, study_record, suppression_module, write_study

PALETTE = torch.tensor(
    [
        [0.90, 0.10, 0.10],
        [0.10, 0.75, 0.10],
        [0.15, 0.25, 0.95],
        [0.95, 0.85, 0.10],
        [0.85, 0.15, 0.85],
        [0.10, 0.85, 0.85],
        [0.95, 0.50, 0.05],
        [0.55, 0.25, 0.05],
        [0.60, 0.60, 0.60],
        [0.50, 0.05, 0.55],
    ]
)
METHODS = ["plain", "anti_transfer", "hsic", "adversarial", "cka", "purify"]
CONDITIONAL = ["hsic_conditional", "adversarial_conditional", "cka_conditional", "purify_conditional"]
# the library's default setting of each method (weight 1; Purify's knob is its momentum): `make demo` runs these
DEFAULTS = {
    "anti_transfer": 1.0,
    "hsic": 1.0,
    "adversarial": 1.0,
    "cka": 1.0,
    "purify": 0.01,
}
DEFAULTS |= {f"{m}_conditional": DEFAULTS[m] for m in ("hsic", "adversarial", "cka", "purify")}
# runs cached under an older version (another default setting of some method) are never reused
RUNS_VERSION = 2
CORRELATIONS = [0.90, 0.95, 0.98, 0.99]
# each grid holds the default, so the sweep reports the default beside the weight chosen on validation
SWEEP_GRID = {
    "anti_transfer": [1.0, 10.0],
    "hsic": [1.0, 10.0],
    "adversarial": [0.3, 1.0, 3.0],
    "cka": [1.0, 3.0],
    "purify": [0.003, 0.01, 0.03],
}
SWEEP_GRID |= {f"{m}_conditional": SWEEP_GRID[m] for m in ("hsic", "adversarial", "cka", "purify")}


@dataclass
class Split:
    images: Tensor  # (N, 3, 8, 8)
    digits: Tensor
    colours: Tensor


def make_splits(seed: int, correlation: float) -> tuple[Split, Split, Split, Split]:
    """Train (biased), colour-network data (random colours), validation and test (random colours)."""
    data = load_digits()
    gray = torch.tensor(data.images, dtype=torch.float32) / 16.0
    digits = torch.tensor(data.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits), generator=g)
    parts = {"train": order[:1000], "val": order[1000:1300], "test": order[1300:]}

    def render(idx: Tensor, colours: Tensor) -> Split:
        rgb = gray[idx, None] * PALETTE[colours][:, :, None, None]
        return Split(rgb, digits[idx], colours)

    train_digits = digits[parts["train"]]
    tied = torch.rand(len(train_digits), generator=g) < correlation
    train_colours = torch.where(tied, train_digits, torch.randint(0, 10, (len(train_digits),), generator=g))
    random_colours = {name: torch.randint(0, 10, (len(idx),), generator=g) for name, idx in parts.items()}
    return (
        render(parts["train"], train_colours),
        render(parts["train"], random_colours["train"]),
        render(parts["val"], random_colours["val"]),
        render(parts["test"], random_colours["test"]),
    )


class Net(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc = nn.Linear(32 * 4 * 4, 64)
        self.purify: ntl.Purify | None = None  # a transform before the head (the purify methods)
        self.head = nn.Linear(64, num_classes)

    def features(self, x: Tensor, colours: Tensor | None = None, digits: Tensor | None = None) -> Tensor:
        h = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        z = F.relu(self.fc(h.flatten(1)))
        if self.purify is None:
            return z
        return self.purify(z, colours, task_labels=digits)  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def fit(
    model: Net,
    split: Split,
    labels: Tensor,
    epochs: int,
    seed: int,
    penalty: Callable[[Net, Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
    suppression: ntl.SuppressionLoss | None = None,
) -> Net:
    # an adversary's head (the one suppression module with parameters) is trained by the same optimizer, in its own
    # parameter group at `head_lr_multiplier` times the learning rate, and takes steps of its own on each batch
    lr = 1e-3
    heads = suppression.parameter_groups(lr) if isinstance(suppression, ntl.AdversarialSuppression) else []
    optimizer = torch.optim.Adam([{"params": model.parameters()}, *heads], lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=g).split(64):
            x = split.images[idx]
            z = model.features(x, split.colours[idx], labels[idx])
            loss = F.cross_entropy(model.head(z), labels[idx])
            if penalty is not None:
                loss = loss + penalty(model, x, z, split.colours[idx], labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def colour_network(data: Split, epochs: int, seed: int) -> Net:
    torch.manual_seed(10_000 + seed)
    return fit(Net(), data, data.colours, epochs, seed)


def train_method(method: str, weight: float, train: Split, colour_net: Net, epochs: int, seed: int) -> Net:
    torch.manual_seed(seed)
    model = Net()
    conditional = method.endswith("_conditional")
    base = method.removesuffix("_conditional")
    if method == "plain":
        return fit(model, train, train.digits, epochs, seed)
    if base == "purify":
        model.purify = ntl.Purify(10, 64, momentum=weight, conditional=conditional)
        return fit(model, train, train.digits, epochs, seed)
    if method == "anti_transfer":
        layers = ["conv1", "conv2"]
        frozen = ntl.FrozenReference(colour_net, layers)
        tap = ntl.FeatureTap(model, layers)
        at = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", weight=weight, gram_scope="batch")

        def anti_transfer(net: Net, x: Tensor, z: Tensor, colours: Tensor, digits: Tensor) -> Tensor:
            return at(tap.pop(), frozen(x))

        try:
            return fit(model, train, train.digits, epochs, seed, anti_transfer)
        finally:
            tap.remove()
    # hsic, adversarial, cka: the signal is the colour labels, or the frozen colour network's features
    reference = ntl.FrozenReference(colour_net, "fc") if SIGNALS[base] == "features" else None
    suppression = suppression_module(base, num_irrelevant=10, dim=64, weight=weight, conditional=conditional)

    def suppress(net: Net, x: Tensor, z: Tensor, colours: Tensor, digits: Tensor) -> Tensor:
        signal = colours if reference is None else reference(x)["fc"]
        return suppression(z, signal, task_labels=digits)  # type: ignore[no-any-return]

    return fit(model, train, train.digits, epochs, seed, suppress, suppression)


@torch.no_grad()
def accuracy(model: Net, split: Split) -> float:
    return (model(split.images).argmax(1) == split.digits).float().mean().item()


@torch.no_grad()
def colour_probe(model: Net, fit_on: Split, score_on: Split) -> float:
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    probe.fit(model.features(fit_on.images).numpy(), fit_on.colours.numpy())
    return float(probe.score(model.features(score_on.images).numpy(), score_on.colours.numpy()))


def run(
    methods: list[str],
    seeds: int,
    correlation: float,
    epochs: int,
    weights: dict[str, float],
    evaluate_on: str = "test",
) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {m: [] for m in methods}
    with tqdm(total=seeds * len(methods), desc="biased digits", unit="run") as bar:
        for seed in range(seeds):
            train, colour_data, val, test = make_splits(seed, correlation)
            target = test if evaluate_on == "test" else val
            colour_net = colour_network(colour_data, epochs, seed)
            for method in methods:
                model = train_method(method, weights.get(method, 0.0), train, colour_net, epochs, seed)
                results[method].append(
                    {
                        "accuracy": accuracy(model, target),
                        "colour_probe": colour_probe(model, val, target),
                        "train_accuracy": accuracy(model, train),
                    }
                )
                bar.update()
    return results


def summary(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    out = {}
    for method, runs in results.items():
        acc = [100 * r["accuracy"] for r in runs]
        probe = [100 * r["colour_probe"] for r in runs]
        out[method] = {
            "accuracy_mean": statistics.mean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "colour_probe_mean": statistics.mean(probe),
            "colour_probe_std": statistics.stdev(probe) if len(probe) > 1 else 0.0,
        }
    return out


def print_table(table: dict[str, dict[str, float]], weights: dict[str, float]) -> None:
    base = table.get("plain", {}).get("accuracy_mean")
    print("| method | weight | test accuracy (unbiased) | Δ vs plain | colour probe (chance 10 %) |")
    print("|---|---|---|---|---|")
    for method, row in table.items():
        delta = "" if base is None or method == "plain" else f"{row['accuracy_mean'] - base:+.1f}"
        weight = (
            "—"
            if method == "plain"
            else (f"momentum {weights[method]}" if method.startswith("purify") else str(weights[method]))
        )
        print(
            f"| {method} | {weight} | {row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f} % | {delta} "
            f"| {row['colour_probe_mean']:.1f} ± {row['colour_probe_std']:.1f} % |"
        )


def plot(table: dict[str, dict[str, float]], path: Path, correlation: float) -> None:
    """`make demo`'s one point: a bar per method (its site-wide look, studies/plot_style.py) for the unbiased test
    accuracy and for the colour probe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot_style import CHANCE, bar_style, tidy

    methods = list(table)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, key, measured, title in (
        (axes[0], "accuracy", "test accuracy, random colours (%)", "what the model gets right"),
        (axes[1], "colour_probe", "colour-probe accuracy (%)", "colour a linear probe reads from the features"),
    ):
        ax.set_title(title, fontsize=10)
        for x, method in enumerate(methods):
            mean, std = table[method][f"{key}_mean"], table[method][f"{key}_std"]
            ax.bar(x, mean, yerr=std, capsize=3, **bar_style(method, label="_nolegend_"))
            ax.text(x, min(mean + std, 100) + 1.5, f"{mean:.0f}", ha="center", fontsize=7)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 108)
        ax.set_ylabel(measured)
        ax.axhline(10, **CHANCE, label="chance (10 %)")
        tidy(ax)
    axes[0].axhline(table[methods[0]]["accuracy_mean"], color="#1a1a1a", linestyle="--", linewidth=1, label=methods[0])
    axes[0].legend(loc="upper left", fontsize=8, frameon=False)
    fig.suptitle(
        f"Biased digits, colour–digit correlation {correlation:.0%} in training: every method at its default\n"
        "mean ± std over seeds; baselines grey and hatched",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_sweep(
    methods: list[str],
    seeds: int,
    correlations: list[float],
    epochs: int,
    grid: dict[str, list[float]],
    cache: Path,
) -> list[Record]:
    """Train every (correlation, method, weight, seed) not yet in `cache` at this `RUNS_VERSION`; return the
    runs of this call's seeds, epochs and grid (validation and test accuracy, colour probe of each)."""
    records: list[Record] = json.loads(cache.read_text()) if cache.exists() else []

    def weights(method: str) -> list[float]:
        return grid.get(method, [0.0]) if method != "plain" else [0.0]

    def key(r: Record) -> tuple[float, str, float, int, int]:
        return (float(r["correlation"]), str(r["method"]), float(r["weight"]), int(r["seed"]), int(r["epochs"]))

    current = [r for r in records if r.get("version") == RUNS_VERSION]
    done = {key(r) for r in current}
    jobs = [
        (seed, c, m, w)
        for seed in range(seeds)
        for c in correlations
        for m in methods
        for w in weights(m)
        if (c, m, w, seed, epochs) not in done
    ]
    colour_nets: dict[int, Net] = {}
    with tqdm(total=len(jobs), desc="correlation sweep", unit="run") as bar:
        for seed, correlation, method, weight in jobs:
            train, colour_data, val, test = make_splits(seed, correlation)
            if seed not in colour_nets:  # the colour network's data do not depend on the correlation
                colour_nets[seed] = colour_network(colour_data, epochs, seed)
            model = train_method(method, weight, train, colour_nets[seed], epochs, seed)
            run = {
                "version": RUNS_VERSION,
                "correlation": correlation,
                "method": method,
                "weight": weight,
                "seed": seed,
                "epochs": epochs,
                "val_accuracy": accuracy(model, val),
                "test_accuracy": accuracy(model, test),
                "colour_probe": colour_probe(model, val, test),
            }
            records.append(run)
            current.append(run)
            cache.write_text(json.dumps(records, indent=0))
            bar.update()
    return [
        r
        for r in current
        if int(r["epochs"]) == epochs and int(r["seed"]) < seeds and float(r["weight"]) in weights(str(r["method"]))
    ]


def sweep_summary(
    records: list[Record], methods: list[str], correlations: list[float], weights: dict[str, float] | None = None
) -> list[Record]:
    """Per correlation and method: the runs at `weights` (setting "default"), or (None) at the weight with the
    best mean validation accuracy over the seeds (setting "tuned"); their test accuracy, colour probe and
    gain over plain (paired by seed), mean ± std."""
    rows: list[Record] = []
    for correlation in correlations:
        here = [r for r in records if float(r["correlation"]) == correlation]
        chosen: dict[str, list[Record]] = {}
        for method in methods:
            by_weight: dict[float, list[Record]] = {}
            for r in here:
                if r["method"] == method:
                    by_weight.setdefault(float(r["weight"]), []).append(r)
            if by_weight:
                weight = None if weights is None else weights.get(method)
                chosen[method] = runs_at(
                    by_weight, lambda runs: statistics.mean(float(r["val_accuracy"]) for r in runs), weight
                )
        plain = {int(r["seed"]): 100 * float(r["test_accuracy"]) for r in chosen.get("plain", [])}
        for method, runs in chosen.items():
            acc = [100 * float(r["test_accuracy"]) for r in runs]
            probe = [100 * float(r["colour_probe"]) for r in runs]
            gains = [a - plain[int(r["seed"])] for a, r in zip(acc, runs, strict=True) if int(r["seed"]) in plain]
            rows.append(
                {
                    "setting": "tuned" if weights is None else "default",
                    "correlation": correlation,
                    "method": method,
                    "weight": float(runs[0]["weight"]),
                    "seeds": len(runs),
                    "accuracy_mean": statistics.mean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "gain_mean": statistics.mean(gains) if gains else float("nan"),
                    "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                    "colour_probe_mean": statistics.mean(probe),
                }
            )
    return rows


def sweep_markdown(rows: list[Record]) -> str:
    """Methods by correlation, each cell at the default and with the weight tuned on validation side by side."""
    correlations = list(dict.fromkeys(float(r["correlation"]) for r in rows))
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    lines = [
        "| method | " + " | ".join(f"{c:.0%} {setting}" for c in correlations for setting in SETTINGS) + " |",
        "|---|" + "---|" * (len(correlations) * len(SETTINGS)),
    ]
    for method in methods:
        cells = []
        for c in correlations:
            for setting in SETTINGS:
                row = next(
                    (r for r in rows if (r["setting"], r["method"], r["correlation"]) == (setting, method, c)), None
                )
                if row is None:
                    cells.append("—")
                elif method == "plain":
                    cells.append(f"{row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f}")
                else:
                    shown = f" [{row['weight']:g}]" if setting == "tuned" else ""
                    cells.append(f"{row['accuracy_mean']:.1f} ({row['gain_mean']:+.1f} ± {row['gain_std']:.1f}){shown}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[Record], path: Path) -> None:
    """Unbiased test accuracy against the correlation, a panel per setting (the library's default weight, the
    weight chosen on validation), each method in its site-wide look (studies/plot_style.py)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from plot_style import CHANCE, style, tidy

    correlations = sorted(dict.fromkeys(float(r["correlation"]) for r in rows))
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    seeds = max(int(r["seeds"]) for r in rows)
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(11, 5.4), sharey=True)
    for ax, (setting, says) in zip(axes, SETTINGS.items(), strict=True):
        for i, method in enumerate(methods):
            found = {float(r["correlation"]): r for r in rows if (r["setting"], r["method"]) == (setting, method)}
            xs = [j for j, c in enumerate(correlations) if c in found]
            offset = (i - (len(methods) - 1) / 2) * 0.012
            ax.errorbar(
                [x + offset for x in xs],
                [float(found[correlations[x]]["accuracy_mean"]) for x in xs],
                yerr=[float(found[correlations[x]]["accuracy_std"]) for x in xs],
                capsize=2,
                elinewidth=0.8,
                **style(method),
            )
        ax.set_xticks(range(len(correlations)), [f"{c:.0%}" for c in correlations])
        ax.set_xlabel("colour–digit correlation in training")
        ax.set_ylim(0, 100)
        ax.axhline(10, **CHANCE)
        ax.set_title(says)
        tidy(ax)
    axes[0].set_ylabel(f"test accuracy, random colours (%; mean ± std, {seeds} seeds)")
    handles = [Line2D([], [], **{k: v for k, v in style(m).items() if k != "markersize"}) for m in methods]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle("Biased digits: unbiased accuracy against the correlation; baselines grey and dashed; chance dotted")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_sweep(args: argparse.Namespace) -> list[Record]:
    methods = list(args.methods)
    args.out.mkdir(parents=True, exist_ok=True)
    records = run_sweep(
        methods, args.seeds, args.correlations, args.epochs, SWEEP_GRID, args.out / "biased_sweep_runs.json"
    )
    rows = sweep_summary(records, methods, args.correlations, DEFAULTS) + sweep_summary(
        records, methods, args.correlations
    )
    table = sweep_markdown(rows)
    title = f"Correlation sweep: {args.seeds} seeds, {args.epochs} epochs; test accuracy %, defaults and tuned"
    grid = {m: SWEEP_GRID[m] for m in methods if m in SWEEP_GRID}
    record = study_record("biased_digits.py", args.argv, args, grid=grid, summary=rows)
    write_study(args.out, "biased_sweep", title, table, record, lambda path: plot_sweep(rows, path))
    return rows


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--correlation", type=float, default=0.99)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--methods", nargs="+", default=METHODS + CONDITIONAL, choices=METHODS + CONDITIONAL)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--sweep", action="store_true", help="the correlation study (see above)")
    parser.add_argument("--correlations", type=float, nargs="+", default=CORRELATIONS, help="with --sweep")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="train nothing: redraw the PNG from --out's JSON (with --sweep: the sweep's)",
    )
    args = parser.parse_args(argv)
    args.argv = argv
    if args.replot:
        if args.sweep:
            plot_sweep(
                json.loads((args.out / "biased_sweep.json").read_text())["summary"], args.out / "biased_sweep.png"
            )
            return {}
        committed = json.loads((args.out / "biased_digits.json").read_text())
        plot(committed["results"], args.out / "biased_digits.png", committed["correlation"])
        return dict(committed["results"])
    torch.set_num_threads(1 if args.sweep else min(2, torch.get_num_threads()))
    np.random.seed(0)
    if args.sweep:
        main_sweep(args)
        return {}

    runs = run(args.methods, args.seeds, args.correlation, args.epochs, DEFAULTS)
    table = summary(runs)
    print(f"\nBiased digits: correlation {args.correlation}, {args.seeds} seeds, {args.epochs} epochs; mean ± std")
    print_table(table, DEFAULTS)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "correlation": args.correlation,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "weights": DEFAULTS,
        "threads": torch.get_num_threads(),
        "results": table,
        # per method, seed 0, 1, ...: the spread a fresh run's cell is allowed (tests/test_case_studies.py)
        "runs": {method: [100 * r["accuracy"] for r in method_runs] for method, method_runs in runs.items()},
    }
    (args.out / "biased_digits.json").write_text(json.dumps(record, indent=2))
    plot(table, args.out / "biased_digits.png", args.correlation)
    print(f"wrote {args.out / 'biased_digits.json'} and {args.out / 'biased_digits.png'}")
    return table


if __name__ == "__main__":
    main()
