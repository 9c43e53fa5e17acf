"""One look per method across every plot of the site: its colour, marker, line style and bar hatch.

Every study draws a method with `style(name)` (lines, markers) or `bar_style(name)` (bars), so a method keeps its
colour from plot to plot and no two methods share one. The library's methods are in colour: a hue per family
(CKA green, adversary orange, adversary with a warm-up red, HSIC blue, Purify purple, anti-transfer with the Gram /
cos² brown and with the CKA distance pink, the multi-task couplings cyan / olive / indigo / plum), the conditional form
or the first layer dark and its sibling light, a marker per family. Baselines (plain training, reweighting
the loss, the published peers EnD and UPGrad, the single- and plain multi-task models) are grey, dashed and hatched, so
they stand apart from what the library adds.

The studies name some methods differently; `ALIASES` maps each study's name to one key here (biased digits'
"plain" is Biased MNIST's "vanilla"; its "anti_transfer", the paper's Gram / cos², is Biased MNIST's "at_gram").
"""

from __future__ import annotations

from typing import Any, NamedTuple


class Look(NamedTuple):
    colour: str
    marker: str
    linestyle: str
    hatch: str
    baseline: bool


def _method(colour: str, marker: str) -> Look:
    return Look(colour, marker, "-", "", False)


def _baseline(colour: str, marker: str, linestyle: str, hatch: str) -> Look:
    return Look(colour, marker, linestyle, hatch, True)


LOOKS: dict[str, Look] = {
    # baselines: grey, dashed, hatched
    "vanilla": _baseline("#1a1a1a", "s", "--", "//"),
    "reweight": _baseline("#6e6e6e", "D", "-.", ".."),
    "end": _baseline("#a6a6a6", "X", ":", "xx"),
    "single A": _baseline("#404040", "<", "--", "\\\\"),
    "single B": _baseline("#8c8c8c", ">", "-.", "--"),
    "multi-task": _baseline("#595959", "h", ":", "++"),
    "UPGrad [A, B]": _baseline("#c2c2c2", "8", "--", "oo"),  # TorchJD's aggregator of the task losses: a peer
    # the library's suppression methods: conditional dark, unconditional light
    "cka_conditional": _method("#2ca02c", "o"),
    "cka": _method("#98df8a", "o"),
    "adversarial_conditional": _method("#ff7f0e", "^"),
    "adversarial": _method("#ffbb78", "^"),
    "adversarial_warmup": _method("#d62728", "*"),
    "adversarial_conditional_warmup": _method("#ff9896", "P"),
    "hsic_conditional": _method("#1f77b4", "v"),
    "hsic": _method("#aec7e8", "v"),
    "purify_conditional": _method("#9467bd", "d"),
    "purify": _method("#c5b0d5", "d"),
    # anti-transfer: the paper's Gram / cos² and the CKA distance; first conv dark, second conv light
    "at_gram": _method("#8c564b", "p"),
    "at_gram_conv2": _method("#c49c94", "p"),
    "at_cka": _method("#e377c2", "H"),
    "at_cka_conv2": _method("#f7b6d2", "H"),
    # the multi-task couplings (MultiTaskLoss)
    "+ matching": _method("#17becf", "o"),
    "+ matching A→B": _method("#9edae5", "o"),
    "+ matching, B→A gated": _method("#006d77", "*"),
    "UPGrad [A, B, matching gated]": _method("#7b4173", "8"),
    "+ co-annotation": _method("#bcbd22", "s"),
    "+ both": _method("#393b79", "D"),
    "+ both (estimated R)": _method("#6b6ecf", "D"),
    # no bias labels (no_bias_labels.py): LfF and JTT are published peers (baselines); the library's BiasTwin in
    # earthy and blue tones, one per use of the twin
    "lff": _baseline("#2e2e2e", "o", ":", "||"),
    "jtt": _baseline("#7f7f7f", "^", "--", "oo"),
    "twin_lff": _method("#843c39", "o"),
    "twin_at": _method("#8c6d31", "p"),
    "twin_cka": _method("#637939", "H"),
    "twin_hsic": _method("#3182bd", "v"),
    "twin_adv": _method("#e6550d", "^"),
    "twin_balanced": _method("#ce6dbd", "s"),
    "twin_lff_at": _method("#bd9e39", "p"),
    "twin_lff_hsic": _method("#6baed6", "v"),
    "twin_balanced_hsic": _method("#a55194", "v"),
    "twin_balanced_hsic0": _method("#dd3497", "D"),
    "twin_balanced_unfrozen": _method("#de9ed6", "s"),
    # the same library pieces given the colour labels: the reference the twin's pseudo-labels stand in for
    "colour_balanced": _method("#49006a", "s"),
    "colour_hsic": _method("#08306b", "v"),
}

ALIASES = {
    "plain": "vanilla",  # biased_digits, anti_transfer_layers
    "anti_transfer": "at_gram",  # biased_digits: Gram / cos² on conv1 + conv2
    "gram_cos2": "at_gram",  # anti_transfer_layers' distance (its "cka" distance is "at_cka", not CKASuppression)
}


def look(method: str) -> Look:
    """The look of `method` (a key of `LOOKS` or of `ALIASES`); an unknown name raises, so no plot draws a
    method in a colour another one already has."""
    key = ALIASES.get(method, method)
    if key not in LOOKS:
        raise KeyError(f"no plot style for method {method!r}: add it to studies/plot_style.py's LOOKS")
    return LOOKS[key]


def style(method: str, *, label: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `plot` / `errorbar`: colour, marker, line style and width, and the label (the
    method's name as the study's tables print it, unless `label` is given)."""
    found = look(method)
    return {
        "color": found.colour,
        "marker": found.marker,
        "markersize": 8 if found.marker in "*P" else 5.5,
        "markeredgecolor": "#333333" if found.baseline else found.colour,
        "linestyle": found.linestyle,
        "linewidth": 1.4 if found.baseline else 1.8,
        "label": method if label is None else label,
    }


def bar_style(method: str, *, label: str | None = None) -> dict[str, Any]:
    """Keyword arguments for `bar` / `barh`: face colour, hatch (baselines only), edge, and the label."""
    found = look(method)
    return {
        "color": found.colour,
        "hatch": found.hatch or None,
        "edgecolor": "white" if found.baseline else found.colour,
        "linewidth": 0.5,
        "label": method if label is None else label,
    }


CHANCE = {"color": "#bbbbbb", "linestyle": ":", "linewidth": 1}  # a chance level drawn across a panel


def tidy(ax: Any) -> None:
    """The site's axes: no top and right frame, a light horizontal grid behind the data."""
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#eeeeee", linewidth=0.8)
    ax.set_axisbelow(True)
