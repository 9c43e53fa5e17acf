"""Anti-transfer in the paper's terms on biased digits: one layer at a time, chosen with the diagnostics.

The setting of `studies/biased_digits.py` (colour tied to the digit on `--correlation` of the training
images; random colours in validation and test). The frozen network is trained to predict the colour on its
own randomly coloured copy of the training images, as in the paper (an irrelevant task, its own data).

1. Diagnostics (`negtransfer_losses.diagnostics`, on the validation images) on a plainly trained student
   and the colour network:
   the held-out accuracy of a linear probe of the colour (and of the digit) at each layer, and the linear
   CKA of every (student layer, colour-network layer) pair. They say where the colour lives in the student
   and which student layers resemble the colour network.
2. `AntiTransferLoss` on one layer at a time (the paper's protocol), with the paper's Gram / cos² (batch
   scope) and with the library's CKA distance, side by side; the weight chosen on the validation split per
   (layer, distance), test accuracy reported, mean ± std over seeds, gain over plain paired by seed.

    python studies/anti_transfer_layers.py [--seeds 3] [--correlation 0.99] [--epochs 30] [--out results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))

import biased_digits as bd
from study_results import study_record, write_study

import negtransfer_losses as ntl
from negtransfer_losses import diagnostics

LAYERS = ["conv1", "conv2", "fc"]
DISTANCES = {
    "gram_cos2": {"aggregation": "gram", "distance": "cos_squared", "gram_scope": "batch"},
    "cka": {"aggregation": "none", "distance": "cka"},
}
GRID = {"gram_cos2": [10.0, 100.0], "cka": [1.0, 10.0]}


def train_anti_transfer(
    layer: str, distance: str, weight: float, train: bd.Split, colour_net: bd.Net, epochs: int, seed: int
) -> bd.Net:
    """The student with `AntiTransferLoss` between its `layer` and the frozen colour network's."""
    torch.manual_seed(seed)
    model = bd.Net()
    frozen = ntl.FrozenReference(colour_net, [layer])
    tap = ntl.FeatureTap(model, [layer])
    loss = ntl.AntiTransferLoss(**DISTANCES[distance], weight=weight)  # type: ignore[arg-type]

    def penalty(net: bd.Net, x: Tensor, z: Tensor, colours: Tensor, digits: Tensor) -> Tensor:
        return loss(tap.pop(), frozen(x))  # type: ignore[no-any-return]

    try:
        return bd.fit(model, train, train.digits, epochs, seed, penalty)
    finally:
        tap.remove()


def run(
    seeds: int, correlation: float, epochs: int, layers: list[str], grid: dict[str, list[float]]
) -> tuple[list[dict[str, float | int | str]], dict[int, tuple[bd.Net, bd.Net, bd.Split]]]:
    """Every (layer, distance, weight, seed) and plain; also returns each seed's plain student, colour
    network and validation split for the diagnostics."""
    records: list[dict[str, float | int | str]] = []
    jobs = [(layer, d, w) for layer in layers for d in grid for w in grid[d]]
    nets: dict[int, tuple[bd.Net, bd.Net, bd.Split]] = {}
    with tqdm(total=seeds * (len(jobs) + 1), desc="anti-transfer per layer", unit="run") as bar:
        for seed in range(seeds):
            train, colour_data, val, test = bd.make_splits(seed, correlation)
            colour_net = bd.colour_network(colour_data, epochs, seed)
            plain = bd.train_method("plain", 0.0, train, colour_net, epochs, seed)
            nets[seed] = (plain, colour_net, val)
            records.append(record("plain", "—", 0.0, seed, plain, val, test))
            bar.update()
            for layer, distance, weight in jobs:
                model = train_anti_transfer(layer, distance, weight, train, colour_net, epochs, seed)
                records.append(record(layer, distance, weight, seed, model, val, test))
                bar.update()
    return records, nets


def record(
    layer: str, distance: str, weight: float, seed: int, model: bd.Net, val: bd.Split, test: bd.Split
) -> dict[str, float | int | str]:
    return {
        "layer": layer,
        "distance": distance,
        "weight": weight,
        "seed": seed,
        "val_accuracy": bd.accuracy(model, val),
        "test_accuracy": bd.accuracy(model, test),
    }


def summary(records: list[dict[str, float | int | str]]) -> list[dict[str, float | int | str]]:
    """Per (layer, distance): the weight with the best mean validation accuracy; its test accuracy and gain."""
    plain = {int(r["seed"]): 100 * float(r["test_accuracy"]) for r in records if r["layer"] == "plain"}
    rows: list[dict[str, float | int | str]] = []
    for layer, distance in dict.fromkeys((str(r["layer"]), str(r["distance"])) for r in records):
        by_weight: dict[float, list[dict[str, float | int | str]]] = {}
        for r in records:
            if r["layer"] == layer and r["distance"] == distance:
                by_weight.setdefault(float(r["weight"]), []).append(r)
        best = max(by_weight, key=lambda w: statistics.mean(float(r["val_accuracy"]) for r in by_weight[w]))
        runs = by_weight[best]
        acc = [100 * float(r["test_accuracy"]) for r in runs]
        gains = [a - plain[int(r["seed"])] for a, r in zip(acc, runs, strict=True)]
        rows.append(
            {
                "layer": layer,
                "distance": distance,
                "weight": best,
                "accuracy_mean": statistics.mean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "gain_mean": statistics.mean(gains),
                "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                "val_accuracy_mean": 100 * statistics.mean(float(r["val_accuracy"]) for r in runs),
            }
        )
    return rows


def markdown(rows: list[dict[str, float | int | str]]) -> str:
    lines = [
        "| layer | distance | weight (validation) | test accuracy | Δ vs plain (paired) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        plain = row["layer"] == "plain"
        distance = "—" if plain else str(row["distance"])
        weight = "—" if plain else f"{row['weight']:g}"
        gain = "" if plain else f"{row['gain_mean']:+.1f} ± {row['gain_std']:.1f}"
        accuracy = f"{row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f} %"
        lines.append(f"| {row['layer']} | {distance} | {weight} | {accuracy} | {gain} |")
    return "\n".join(lines)


def diagnose(nets: dict[int, tuple[bd.Net, bd.Net, bd.Split]], layers: list[str]) -> dict[str, object]:
    """On each seed's validation images (random colours): linear probes of the colour and of the digit at
    every layer of the plain student and of the colour network, and the minibatch-CKA map student × colour
    network (`negtransfer_losses.diagnostics`); averaged over the seeds."""
    probes: dict[str, dict[str, list[float]]] = {}
    maps = []
    for plain, colour_net, val in nets.values():
        for net_name, net in (("student", plain), ("colour network", colour_net)):
            for label_name, labels in (("colour", val.colours), ("digit", val.digits)):
                result = diagnostics.probe_layers(net, layers, val.images, labels, num_classes=10)
                for layer, value in result.items():
                    probes.setdefault(f"{net_name}: {label_name}", {}).setdefault(layer, []).append(value)
        maps.append(diagnostics.layer_similarity(plain, colour_net, val.images, layers_a=layers, layers_b=layers))
    return {
        "probes": {name: {k: statistics.mean(v) for k, v in r.items()} for name, r in probes.items()},
        "cka": diagnostics.LayerSimilarity(torch.stack([m.matrix for m in maps]).mean(0), layers, layers),
    }


def plot_diagnostics(result: dict[str, object], path: Path, correlation: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), gridspec_kw={"width_ratios": [1.6, 1]})
    diagnostics.plot_probes(
        result["probes"],  # type: ignore[arg-type]
        chance=0.1,
        ax=axes[0],
        title="linear probe per layer (validation, random colours)",
    )
    # probes are not methods: kept out of the methods' colours (what is probed: slate for the colour, sand for the
    # digit; the colour network's bars hatched)
    for container, name in zip(axes[0].containers, result["probes"], strict=True):  # type: ignore[call-overload]
        for bar in container:
            bar.set_facecolor("#50616f" if name.endswith("colour") else "#e0c35a")
            bar.set_hatch("//" if name.startswith("colour network") else None)
            bar.set_edgecolor("white")
    axes[0].set_ylim(0.0, 1.3)
    axes[0].set_ylabel("held-out probe accuracy (0 to 1)")
    axes[0].legend(fontsize=7, ncol=3, loc="upper center")
    diagnostics.plot_similarity(
        result["cka"],  # type: ignore[arg-type]
        ax=axes[1],
        title="minibatch CKA between the two networks",
        labels=("plain student", "colour network"),
    )
    fig.suptitle(f"Biased digits at {correlation:.0%}: where the colour lives (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layers(rows: list[dict[str, float | int | str]], path: Path, correlation: float) -> None:
    """A pair of bars per layer, the paper's Gram / cos² and the CKA distance, in their site-wide looks
    (studies/plot_style.py), against plain training (grey, dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from plot_style import CHANCE, bar_style, style, tidy

    looks = {"gram_cos2": ("at_gram", "Gram / cos² (paper)"), "cka": ("at_cka", "CKA distance")}
    plain = next(r for r in rows if r["layer"] == "plain")
    layers = list(dict.fromkeys(str(r["layer"]) for r in rows if r["layer"] != "plain"))
    distances = list(dict.fromkeys(str(r["distance"]) for r in rows if r["layer"] != "plain"))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / len(distances)
    for i, distance in enumerate(distances):
        rs = [next(r for r in rows if r["layer"] == layer and r["distance"] == distance) for layer in layers]
        positions = [j + (i - (len(distances) - 1) / 2) * width for j in range(len(layers))]
        method, label = looks[distance]
        bars = ax.bar(
            positions,
            [float(r["accuracy_mean"]) for r in rs],
            width,
            yerr=[float(r["accuracy_std"]) for r in rs],
            capsize=3,
            **bar_style(method, label=f"{label} [weight chosen on validation]"),
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    line = style("plain", label=f"plain training ({float(plain['accuracy_mean']):.1f})")
    ax.axhline(float(plain["accuracy_mean"]), color=line["color"], linestyle=line["linestyle"], label=line["label"])
    ax.axhline(10, **CHANCE, label="chance (10 %)")
    ax.set_xticks(range(len(layers)), layers)
    ax.set_xlabel("the student's layer that anti-transfer compares with the colour network's")
    ax.set_ylabel("test accuracy, random colours (%; mean ± std)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Biased digits at {correlation:.0%}: anti-transfer on one layer at a time", fontsize=10)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    tidy(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(out: Path) -> None:
    """Both figures again from `out/anti_transfer_layers.json` alone (nothing trained)."""
    record = json.loads((out / "anti_transfer_layers.json").read_text())
    correlation = float(record["options"]["correlation"])
    found = record["diagnostics"]
    layers = list(found["layers"])
    cka = diagnostics.LayerSimilarity(torch.tensor(found["cka_student_by_colour_network"]), layers, layers)
    plot_layers(record["summary"], out / "anti_transfer_layers.png", correlation)
    plot_diagnostics({"probes": found["probes"], "cka": cka}, out / "anti_transfer_diagnostics.png", correlation)


def main(argv: list[str] | None = None) -> list[dict[str, float | int | str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--correlation", type=float, default=0.99)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--layers", nargs="+", default=LAYERS, choices=LAYERS)
    parser.add_argument("--distances", nargs="+", default=list(DISTANCES), choices=list(DISTANCES))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--replot", action="store_true", help="train nothing: redraw both PNGs from --out's JSON")
    args = parser.parse_args(argv)
    if args.replot:
        replot(args.out)
        return list(json.loads((args.out / "anti_transfer_layers.json").read_text())["summary"])
    torch.set_num_threads(1)
    grid = {d: GRID[d] for d in args.distances}
    records, nets = run(args.seeds, args.correlation, args.epochs, args.layers, grid)
    found = diagnose(nets, LAYERS)
    print("\nprobes (validation):", json.dumps(found["probes"], indent=1))
    print("CKA student × colour network (rows: student):", found["cka"].matrix.tolist())  # type: ignore[attr-defined]
    rows = summary(records)
    table = markdown(rows)
    title = f"Anti-transfer per layer, correlation {args.correlation}, {args.seeds} seeds, {args.epochs} epochs"
    diagnostics = {
        "probes": found["probes"],
        "cka_student_by_colour_network": found["cka"].matrix.tolist(),  # type: ignore[attr-defined]
        "layers": LAYERS,
    }
    result = study_record(
        "anti_transfer_layers.py", argv, args, grid=grid, summary=rows, diagnostics=diagnostics, runs=records
    )
    write_study(
        args.out, "anti_transfer_layers", title, table, result, lambda path: plot_layers(rows, path, args.correlation)
    )
    plot_diagnostics(found, args.out / "anti_transfer_diagnostics.png", args.correlation)
    return rows


if __name__ == "__main__":
    main()
