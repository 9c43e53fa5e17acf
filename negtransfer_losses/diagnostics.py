"""Where negative transfer lives: linear probes per layer, and layer-similarity maps between two networks.

```python
import negtransfer_losses.diagnostics as ntd

accuracy = ntd.probe_layers(model, ["conv1", "conv2", "fc"], images, colours)   # {"conv1": 0.97, ...}
similarity = ntd.layer_similarity(student, colour_net, images, layers_a=["conv1", "fc"], layers_b=["conv1", "fc"])
similarity.matrix          # (2, 2) linear CKA of every (student layer, colour-network layer) pair
ntd.plot_probes(accuracy); ntd.plot_similarity(similarity)    # matplotlib (the `plots` extra)
```

- `probe_layers`: per tapped layer, the held-out accuracy of a multinomial logistic-regression probe on the
  layer's flattened, standardized features (fitted in torch with L-BFGS; a deterministic split).
- `layer_similarity`: the linear CKA of every layer pair over a data set, computed in mini-batches by
  accumulating unbiased HSIC estimates ("minibatch CKA", Nguyen, Raghu & Kornblith, ICLR 2021), so its
  memory does not grow with the data set:
  `CKA = Σ_b HSIC_1(K_b, L_b) / sqrt(Σ_b HSIC_1(K_b, K_b) · Σ_b HSIC_1(L_b, L_b))`, `K_b`, `L_b` the
  linear Gram matrices of batch `b`'s features at the two layers (each batch counted once; the authors' code
  weights a batch of `n` by `n(n−3)`, the same for batches of one size: see `layer_similarity`).

Both run the models in eval mode under `torch.no_grad()` (their training mode is restored afterwards) and
capture features with `FeatureTap`. `inputs` is a tensor (split into batches of `batch_size`) or an
iterable of batches; a batch that is a tuple or list (a `DataLoader` of `(x, y)`) gives its first element
to the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import hsic_from_kernels
from .functional._core import feature_space_cheaper, linear_hsic, safe_ratio
from .taps import FeatureTap, LayerSpec

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = ["LayerSimilarity", "layer_similarity", "plot_probes", "plot_similarity", "probe_layers"]

Inputs = Tensor | Iterable[Any]


class LayerSimilarity(NamedTuple):
    """`matrix[i, j]`: the minibatch linear CKA of `layers_a[i]` (model A) and `layers_b[j]` (model B).

    Attributes:
        matrix: `(len(layers_a), len(layers_b))` CKA values in [0, 1], on the CPU.
        layers_a: model A's layer names, in row order.
        layers_b: model B's layer names, in column order.
    """

    matrix: Tensor
    layers_a: list[str]
    layers_b: list[str]


def _batches(inputs: Inputs, batch_size: int) -> Iterator[Any]:
    if isinstance(inputs, Tensor):
        if inputs.dim() < 1 or inputs.shape[0] == 0:
            raise ValueError(f"'inputs' must hold at least one sample, got shape {tuple(inputs.shape)}")
        yield from torch.split(inputs, batch_size)
        return
    if not isinstance(inputs, Iterable):
        raise TypeError(f"'inputs' must be a tensor or an iterable of batches, got {type(inputs).__name__}")
    yield from inputs


def _model_input(batch: Any) -> Any:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _device(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return None


def _to(x: Any, device: torch.device | None) -> Any:
    return x.to(device) if isinstance(x, Tensor) and device is not None else x


@contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _flat(x: Any, layer: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(
            f"layer '{layer}' gave {got}, not a floating-point tensor: tap a layer that returns one "
            f"(or the module inside it that does)"
        )
    return x.detach().reshape(x.shape[0], -1).to(torch.float64)


def probe_layers(
    model: nn.Module,
    layers: LayerSpec | Iterable[LayerSpec],
    inputs: Inputs,
    labels: Tensor | None = None,
    *,
    num_classes: int | None = None,
    train_fraction: float = 0.5,
    seed: int = 0,
    l2: float = 1e-3,
    max_iter: int = 200,
    batch_size: int = 256,
    ignore_index: int = -100,
) -> dict[str, float]:
    """Per tapped layer, the held-out accuracy of a linear probe for `labels` (any labels: the task, a factor).

    The features of every sample are captured (`FeatureTap`), flattened and standardized with the training
    part's mean and standard deviation (constant features become 0). A multinomial logistic regression
    `softmax(W h + b)` is fitted on the training part by L-BFGS on `CE + l2 · ‖W‖²` from zero weights
    (deterministic), and scored on the rest. The split is a random permutation from
    `torch.Generator().manual_seed(seed)`: the first `train_fraction` of it trains, the rest scores.
    Samples labelled `ignore_index` are left out. The features are held in memory (float64, on the CPU).

    Args:
        model: the network to probe.
        layers: dotted names, glob patterns or modules, as in `FeatureTap`.
        inputs: a tensor `(N, ...)` or an iterable of batches.
        labels: `(N,)` class indices in input order; None when the batches are `(x, labels)` pairs.
        num_classes: the number of classes (default: largest label + 1).
        train_fraction: the part of the samples the probe is fitted on.
        seed: the seed of the split.
        l2: the weight of the probe's L2 penalty.
        max_iter: L-BFGS iterations.
        batch_size: the batch size when `inputs` is a tensor.

    Returns:
        `{layer: held-out accuracy}` in the tap's layer order.

    Raises:
        ValueError: for a `train_fraction` outside (0, 1), batches without labels when `labels` is None, labels
            that do not match the samples, too few labelled samples on either side of the split, or an
            unknown layer.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"'train_fraction' must be in (0, 1), got {train_fraction}")
    features: dict[str, list[Tensor]] = {}
    collected: list[Tensor] = []
    device = _device(model)
    tap = FeatureTap(model, layers, detach=True)
    try:
        with _evaluating(model), torch.no_grad():
            for batch in _batches(inputs, batch_size):
                if labels is None:
                    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                        raise ValueError(
                            "'labels' is None, so every batch must be an (inputs, labels) pair; pass 'labels'"
                        )
                    collected.append(torch.as_tensor(batch[1]).reshape(-1).cpu())
                model(_to(_model_input(batch), device))
                for name, value in tap.pop().items():
                    features.setdefault(name, []).append(_flat(value, name).cpu())
    finally:
        tap.remove()
    targets = torch.cat(collected) if labels is None else labels.reshape(-1).cpu()
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"'labels' must hold integer class indices, got dtype {targets.dtype}")
    n = next(iter(features.values()), [torch.zeros(0, 1)])
    total = sum(part.shape[0] for part in n)
    if targets.shape[0] != total:
        raise ValueError(f"'labels' has {targets.shape[0]} entries but the inputs hold {total} samples")
    known = targets != ignore_index
    if int((targets[known] < 0).sum()):
        raise ValueError(f"'labels' must be class indices ≥ 0 or ignore_index={ignore_index}")
    classes = num_classes if num_classes is not None else int(targets[known].max()) + 1 if bool(known.any()) else 1
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    order = order[known[order]]
    cut = round(train_fraction * order.numel())
    if cut < 1 or cut >= order.numel():
        raise ValueError(f"{order.numel()} labelled samples are too few to split with train_fraction={train_fraction}")
    train, test = order[:cut], order[cut:]
    return {
        name: _fit_probe(torch.cat(parts), targets, train, test, classes, l2, max_iter)
        for name, parts in features.items()
    }


def _fit_probe(x: Tensor, y: Tensor, train: Tensor, test: Tensor, num_classes: int, l2: float, max_iter: int) -> float:
    mean = x[train].mean(dim=0)
    std = x[train].std(dim=0, unbiased=False)
    scale = torch.where(std > 1e-12 * (1.0 + mean.abs()), std, torch.full_like(std, float("inf")))
    a, b = (x[train] - mean) / scale, (x[test] - mean) / scale
    weight = torch.zeros(a.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(a @ weight + bias, y[train]) + l2 * weight.square().sum()
            loss.backward()  # type: ignore[no-untyped-call]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return float(((b @ weight + bias).argmax(dim=1) == y[test]).double().mean())


def layer_similarity(
    model_a: nn.Module,
    model_b: nn.Module,
    inputs: Inputs,
    *,
    layers_a: LayerSpec | Iterable[LayerSpec],
    layers_b: LayerSpec | Iterable[LayerSpec],
    batch_size: int = 256,
) -> LayerSimilarity:
    """Minibatch linear CKA of every (layer of A, layer of B) pair over a data set.

    For each batch `b` (at least 4 samples; smaller batches, e.g. a last partial one, are skipped) and each
    pair of layers, the unbiased HSIC (Song et al. 2012) of the two linear Gram matrices is accumulated;
    `CKA_ij = Σ_b HSIC_1(K_b^i, L_b^j) / sqrt(Σ_b HSIC_1(K_b^i, K_b^i) · Σ_b HSIC_1(L_b^j, L_b^j))`
    (Nguyen, Raghu & Kornblith 2021). Memory is that of one batch. With a single batch it equals the
    unbiased linear CKA of that batch; a pair with a non-positive denominator (a constant layer) gives 0.
    Each batch's `HSIC_1` counts once: Nguyen et al.'s released code (`efficient_CKA.py`) sums the
    unnormalized statistic `n(n−3) · HSIC_1`, which weights a batch of `n` by `n(n−3)`. The two agree when every
    batch has the same size (the factor cancels in the ratio) and differ slightly when one differs, e.g. a last
    partial batch of at least 4 samples.
    Computed in float64. Both models see the same batches (they may be one model). Each HSIC is computed from
    the batch's centred features (`XᵀY`, `O(n·p·q)`, no `n × n` matrix) unless the two layers are so much
    wider than the batch that their `n × n` Gram matrices are cheaper (`functional.similarity.
    feature_space_cheaper`; a layer's Gram matrix is then formed once per batch).

    Args:
        model_a: the first network (its layers are the rows).
        model_b: the second network (the columns); may be `model_a`.
        inputs: a tensor `(N, ...)` or an iterable of batches (tensors, or `(x, ...)` tuples).
        layers_a: dotted names, glob patterns or modules of `model_a`, as in `FeatureTap`.
        layers_b: likewise for `model_b`.
        batch_size: the batch size when `inputs` is a tensor.

    Returns:
        a `LayerSimilarity(matrix, layers_a, layers_b)`, `matrix` of shape `(len(layers_a), len(layers_b))`.

    Raises:
        ValueError: when no batch holds 4 or more samples, or for an unknown layer.
    """
    tap_a = FeatureTap(model_a, layers_a, detach=True)
    tap_b = FeatureTap(model_b, layers_b, detach=True)
    cross: Tensor | None = None
    self_a: Tensor | None = None
    self_b: Tensor | None = None
    names_a: list[str] = []
    names_b: list[str] = []
    device_a, device_b = _device(model_a), _device(model_b)
    try:
        with _evaluating(model_a, model_b), torch.no_grad():
            for batch in _batches(inputs, batch_size):
                x = _model_input(batch)
                model_a(_to(x, device_a))
                feats_a = {k: _flat(v, k) for k, v in tap_a.pop().items()}
                if model_b is model_a:
                    feats_b = {k: _flat(v, k) for k, v in tap_b.pop().items()}
                else:
                    model_b(_to(x, device_b))
                    feats_b = {k: _flat(v, k) for k, v in tap_b.pop().items()}
                n = next(iter(feats_a.values())).shape[0]
                if n < 4:
                    continue
                names_a, names_b = list(feats_a), list(feats_b)
                device = next(iter(feats_a.values())).device
                sides_a = [_Centred(f) for f in feats_a.values()]
                sides_b = [_Centred(_to(f, device)) for f in feats_b.values()]
                batch_cross = torch.stack([torch.stack([_minibatch_hsic(a, b) for b in sides_b]) for a in sides_a])
                batch_a = torch.stack([_minibatch_hsic(a, a) for a in sides_a])
                batch_b = torch.stack([_minibatch_hsic(b, b) for b in sides_b])
                cross = batch_cross if cross is None else cross + batch_cross
                self_a = batch_a if self_a is None else self_a + batch_a
                self_b = batch_b if self_b is None else self_b + batch_b
    finally:
        tap_a.remove()
        tap_b.remove()
    if cross is None or self_a is None or self_b is None:
        raise ValueError("layer_similarity needs at least one batch of 4 or more samples in 'inputs'")
    matrix = safe_ratio(cross, self_a[:, None], self_b[None, :])
    return LayerSimilarity(matrix.cpu(), names_a, names_b)


class _Centred:
    """One layer's features of one batch, centred (the unbiased HSIC of linear kernels is invariant to it), and
    their linear kernel, formed only when a pair needs the pairwise form."""

    def __init__(self, features: Tensor) -> None:
        self.rows = features - features.mean(dim=0)
        self.count = torch.tensor(float(features.shape[0]), dtype=features.dtype, device=features.device)
        self._kernel: Tensor | None = None

    @property
    def kernel(self) -> Tensor:
        if self._kernel is None:
            self._kernel = self.rows @ self.rows.T
        return self._kernel


def _minibatch_hsic(a: _Centred, b: _Centred) -> Tensor:
    """The unbiased HSIC of two layers' linear kernels on one batch: in feature space (no `n × n` matrix) unless
    the layers are so much wider than the batch that the kernel matrices are cheaper (`feature_space_cheaper`)."""
    n, p, q = a.rows.shape[0], a.rows.shape[1], b.rows.shape[1]
    if feature_space_cheaper(n, p, q):
        return linear_hsic(a.rows, b.rows, a.count, unbiased=True)
    return hsic_from_kernels(a.kernel, b.kernel, unbiased=True)


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the plot helpers need matplotlib: pip install 'negtransfer-losses[plots]'") from error
    return plt


def plot_probes(
    accuracy: dict[str, float] | dict[str, dict[str, float]],
    *,
    chance: float | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Bars of `probe_layers`' accuracies per layer (several probes: `{probe name: result}`, grouped).

    Args:
        accuracy: `probe_layers`' result `{layer: accuracy}`, or several `{probe name: {layer: accuracy}}`.
        chance: draws a dashed line at chance accuracy.
        ax: the matplotlib `Axes` to draw on (a new figure when None).
        title: the plot's title.

    Returns:
        the matplotlib `Axes`.

    Raises:
        ImportError: when matplotlib is not installed (`pip install 'negtransfer-losses[plots]'`).
    """
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    assert ax is not None
    series: dict[str, dict[str, float]] = (
        {"": accuracy}  # type: ignore[dict-item]
        if all(isinstance(v, float | int) for v in accuracy.values())
        else accuracy  # type: ignore[assignment]
    )
    layers = list(dict.fromkeys(layer for result in series.values() for layer in result))
    width = 0.8 / max(len(series), 1)
    for i, (name, result) in enumerate(series.items()):
        positions = [j + (i - (len(series) - 1) / 2) * width for j in range(len(layers))]
        ax.bar(positions, [result.get(layer, float("nan")) for layer in layers], width, label=name or None)
    if chance is not None:
        ax.axhline(chance, linestyle="--", color="gray", label="chance")
    ax.set_xticks(range(len(layers)), layers, rotation=30, ha="right")
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("held-out probe accuracy")
    if title:
        ax.set_title(title)
    if len(series) > 1 or chance is not None:
        ax.legend(fontsize="small")
    return ax


def plot_similarity(
    similarity: LayerSimilarity,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    labels: Sequence[str] = ("model A", "model B"),
    annotate: bool = True,
) -> Axes:
    """Heat map of a `LayerSimilarity` (rows: model A's layers, columns: model B's), values in [0, 1].

    Args:
        similarity: `layer_similarity`'s result.
        ax: the matplotlib `Axes` to draw on (a new figure when None).
        title: the plot's title.
        labels: the two models' names, for the axes.
        annotate: write each value in its cell.

    Returns:
        the matplotlib `Axes`.

    Raises:
        ImportError: when matplotlib is not installed (`pip install 'negtransfer-losses[plots]'`).
    """
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(1.2 + 0.9 * len(similarity.layers_b), 1.0 + 0.7 * len(similarity.layers_a)))
    assert ax is not None
    values = similarity.matrix.numpy()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(similarity.layers_b)), similarity.layers_b, rotation=30, ha="right")
    ax.set_yticks(range(len(similarity.layers_a)), similarity.layers_a)
    ax.set_xlabel(labels[1])
    ax.set_ylabel(labels[0])
    if annotate:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", color="w" if values[i, j] < 0.6 else "k")
    ax.figure.colorbar(image, ax=ax, label="linear CKA (minibatch)")
    if title:
        ax.set_title(title)
    return ax
