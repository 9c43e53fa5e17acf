"""The home page's headline: what to add, and how much it helped, read from the committed study results.

    python studies/headline.py          # writes docs/img/headline.png and prints the numbers

Every number here comes from a committed JSON of docs/img/ (written by the case studies' commands,
docs/case-studies.md); `tests/test_headline.py` checks that README.md and docs/index.md quote exactly these.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"

# Each method in its look of every plot of the site (studies/plot_style.py): baselines grey and hatched, the
# library's recipe in colour.
HEADLINE_METHODS = {
    # label: (JSON sampler, method, setting)
    "plain training": ("shuffle", "vanilla", "default"),
    "loss reweighting (bias labels)": ("shuffle", "reweight", "default"),
    "EnD (published; tuned on validation)": ("shuffle", "end", "tuned"),
    "library: balanced batches + adversary with warm-up": ("balanced", "adversarial_warmup", "default"),
}
RHOS = (0.98, 0.99)


def _load(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((IMG / name).read_text())
    return loaded


def _row(rows: list[dict[str, Any]], **match: object) -> dict[str, Any]:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"expected one row for {match}, found {len(found)}")
    return found[0]


def headline() -> dict[str, dict[float, float]]:
    """Test accuracy % (mean of 3 seeds) on Biased MNIST, 14×14 background colour, per method and ρ."""
    rows = _load("biased_mnist.json")["summary"]
    return {
        label: {
            rho: round(
                _row(rows, factor="background", sampler=sampler, rho=rho, method=method, setting=setting)[
                    "accuracy_mean"
                ],
                1,
            )
            for rho in RHOS
        }
        for label, (sampler, method, setting) in HEADLINE_METHODS.items()
    }


def guide() -> dict[str, str]:
    """The measured gain behind each row of the decision guide, as the pages print it."""
    mnist = _load("biased_mnist.json")["summary"]
    heldout = _load("biased_mnist_heldout.json")["summary"]
    sweep = _load("multitask_sweep.json")["summary"]

    def accuracy(rows: list[dict[str, Any]], **match: object) -> float:
        return round(float(_row(rows, **match)["accuracy_mean"]), 1)

    plain = accuracy(mnist, factor="background", sampler="shuffle", rho=0.99, method="vanilla", setting="default")
    recipe = accuracy(
        mnist, factor="background", sampler="balanced", rho=0.99, method="adversarial_warmup", setting="default"
    )
    reweight = accuracy(mnist, factor="background", sampler="shuffle", rho=0.99, method="reweight", setting="default")
    cka = _row(heldout, rho=0.99, method="at_cka", setting="default")
    cka_reweight = _row(heldout, rho=0.99, method="reweight", setting="default")
    gated = "+ matching, B→A gated"
    matching = _row(sweep, setting="default", num_a=30, num_b=1000, config=gated)
    scarce = _row(sweep, setting="default", num_a=100, num_b=100, config=gated)
    papers = _row(sweep, setting="default", num_a=100, num_b=100, config="+ matching")
    return {
        "labels": f"{plain} % → {recipe} % (reweighting: {reweight} %)",
        "network": f"+{cka['gain_mean']:.1f} points (reweighting with labels: +{cka_reweight['gain_mean']:.1f})",
        "two_tasks": (
            f"digits +{matching['digit_gain_mean']:.1f}, attributes +{matching['attributes_gain_mean']:.1f} points; "
            f"with 100 / 100 labels +{scarce['digit_gain_mean']:.1f} / +{scarce['attributes_gain_mean']:.1f} "
            f"(the papers' default: digits {papers['digit_gain_mean']:.1f}, negative transfer)"
        ),
    }


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).parent))
    from plot_style import bar_style

    numbers = headline()
    figure, axis = plt.subplots(figsize=(7.5, 4.4))
    width = 0.8 / len(HEADLINE_METHODS)
    for i, (label, (_, method, _)) in enumerate(HEADLINE_METHODS.items()):
        xs = [j + (i - (len(HEADLINE_METHODS) - 1) / 2) * width for j in range(len(RHOS))]
        values = [numbers[label][rho] for rho in RHOS]
        bars = axis.bar(xs, values, width, **bar_style(method, label=label))
        axis.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    axis.set_xticks(range(len(RHOS)), [f"ρ = {rho}" for rho in RHOS])
    axis.set_ylabel("test accuracy on unbiased colours (%)")
    axis.set_ylim(0, 100)
    axis.set_title(
        "Biased MNIST (5,000 real digits; ρ: colour–digit correlation in training), mean of 3 seeds", fontsize=9
    )
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    axis.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(IMG / "headline.png", dpi=130)
    print(
        json.dumps(
            {"headline": {k: {str(r): v for r, v in d.items()} for k, d in numbers.items()}, **guide()}, indent=1
        )
    )


if __name__ == "__main__":
    main()
