"""Logging every module's `last_terms`: one flat `{name: float}` dict for any logger.

Every loss module of the package keeps, after each call, `last_terms`: a flat `dict[str, Tensor]` of
detached scalars that always holds `"loss"` (the module's weighted output) beside its own terms; terms of
one layer are named `"{layer}/{term}"` and those of a submodule `"{submodule}/{term}"`. Only `"loss"` keys
are weighted (the module's total, a layer's or a submodule's contribution); every other term is the raw,
unweighted value its module documents (`"value"`, `"similarity"`, `"a_to_b"`, ...).
`collect_terms` turns them into Python floats under one prefix per module, ready for
`SummaryWriter.add_scalars`, `wandb.log`, Lightning's `self.log_dict` or Trainer's `self.log`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def collect_terms(modules: nn.Module | Mapping[str, nn.Module], prefix: str = "") -> dict[str, float]:
    """`{"{prefix}{name}/{term}": value}` for every module with non-empty `last_terms`.

    Args:
        modules: a mapping `{name: module}` (each module's terms under its name), or one module: then
            every module inside it (itself included) that has `last_terms` contributes, under its qualified
            name (`""` for the module itself), skipping submodules whose terms their parent already reports.
        prefix: put before every key (e.g. `"train/"`).

    Returns:
        floats; one device synchronization for all of them.
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
