"""Logging every module's `last_terms`: one flat `{name: float}` dict for any logger.

Every loss module of the package keeps, after each call, `last_terms`: a flat `dict[str, Tensor]` of
detached scalars, laid out as a tree whose levels are separated by `/`:

- `"loss"`: what the module returned (its weighted total);
- `"{part}/loss"`: that part's *weighted* contribution (a layer of `AntiTransferLoss`, a direction of
  `DistributionMatchingLoss`, a term or submodule of `MultiTaskLoss`), so the parts add up to `"loss"`;
- a part may have parts of its own, `"{part}/{sub}/loss"`, which add up to `"{part}/loss"`: at every level
  the `loss` entries directly below a `loss` entry add up to it (`loss_parts` lists them);
- every other key is a raw, unweighted value that its module documents: `"{part}/value"` (the part's
  value before weighting), `"{layer}/similarity"`, `"{layer}/student_norm"`, ...

For example `MultiTaskLoss` with `matching_weight=0.5` logs `"matching/loss"` = 0.5 · the matching
module's output and `"matching/a_to_b/loss"` + `"matching/b_to_a/loss"` = `"matching/loss"`.
`collect_terms` turns them into Python floats under one prefix per module, ready for
`SummaryWriter.add_scalars`, `wandb.log`, Lightning's `self.log_dict` or Trainer's `self.log`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def collect_terms(modules: nn.Module | Mapping[str, nn.Module], *, prefix: str = "") -> dict[str, float]:
    """`{"{prefix}{name}/{term}": value}` for every module with non-empty `last_terms`.

    Args:
        modules: a mapping `{name: module}` (each module's terms under its name), or one module: then
            every module inside it (itself included) that has `last_terms` contributes, under its qualified
            name (`""` for the module itself), skipping submodules whose terms their parent already reports.
        prefix: put before every key (e.g. `"train/"`).

    Returns:
        floats; one device synchronization for all of them.

    Raises:
        TypeError: for a module in the mapping that has no `last_terms`.
    """
    named = modules.items() if isinstance(modules, Mapping) else _modules_with_terms(modules)
    keys: list[str] = []
    values: list[Tensor] = []
    for name, module in named:
        terms = getattr(module, "last_terms", None)
        if not isinstance(terms, Mapping):
            raise TypeError(f"module {name!r} ({type(module).__name__}) has no 'last_terms' to log")
        for term, value in terms.items():
            keys.append(f"{prefix}{name}/{term}" if name else f"{prefix}{term}")
            values.append(value.detach().float().reshape(()))
    if not values:
        return {}
    host = [v.cpu() for v in values] if len({v.device for v in values}) > 1 else _stack_to_host(values)
    return {key: float(value) for key, value in zip(keys, host, strict=True)}


def _stack_to_host(values: list[Tensor]) -> list[Tensor]:
    return list(torch.stack(values).cpu().unbind())


def _modules_with_terms(root: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for name, module in root.named_modules():
        if not isinstance(getattr(module, "last_terms", None), Mapping):
            continue
        if any(name.startswith(f"{parent}.") or parent == "" for parent, _ in found):
            continue  # a parent's last_terms already holds its submodules' terms
        found.append((name, module))
    return [(name, module) for name, module in found if module.last_terms]


def loss_parts(terms: Mapping[str, object]) -> dict[str, list[str]]:
    """The tree of weighted contributions in a `last_terms` layout: each `loss` key and the keys of its parts.

    A key `"{path}/loss"` is a part of the nearest enclosing `loss` key: `"a/b/loss"` belongs to `"a/loss"`
    when that key exists, else to `"loss"`. Keys that do not end in `loss` (raw values) are not parts.

    Args:
        terms: a module's `last_terms` (or any mapping with those keys).

    Returns:
        `{whole: [parts]}` for every `loss` key that has parts, in the order of `terms`; the values of the
        parts add up to the value of the whole.
    """
    prefixes = [key[: -len("loss")].rstrip("/") for key in terms if key == "loss" or key.endswith("/loss")]
    parts: dict[str, list[str]] = {}
    for prefix in prefixes:
        if not prefix:
            continue
        enclosing = [p for p in prefixes if p != prefix and (not p or prefix.startswith(f"{p}/"))]
        parent = max(enclosing, key=len, default=None)
        if parent is not None:
            parts.setdefault(f"{parent}/loss" if parent else "loss", []).append(f"{prefix}/loss")
    return parts
