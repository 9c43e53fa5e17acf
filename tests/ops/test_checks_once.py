"""Inputs are checked once and autocast switched off once, at the public door: one `_validation.check_tensor` per
input tensor per public call, on every branch (inner cores take checked inputs), `full_precision` entered at most
once per public call, and at most two calls into `_validation`'s checks per tensor.

How it is measured (`entries`): every `_validation.full_precision` and `_validation.check_*` function is replaced,
wherever a module of the package bound it, by a counting wrapper for the duration of a test; a call from another
module into one of them counts as an entry (calls among `_validation`'s own functions do not, except for
`check_tensor`'s count by name, which includes them as it always has). Run `python -m pytest
tests/ops/test_checks_once.py` to see the counts hold.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from module_cases import CASES as MODULE_CASES
from torch import Tensor

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses import _validation, ops
from negtransfer_losses.functional._core import AntiTransferOptions
from negtransfer_losses.functional.anti_transfer import ANTI_TRANSFER_AGGREGATIONS, DISTANCES
from negtransfer_losses.ops._core import anti_transfer_terms_for

CASES = []
for _aggregation in ANTI_TRANSFER_AGGREGATIONS:
    for _distance in DISTANCES:
        try:
            AntiTransferOptions.resolve(_aggregation, _distance)
        except ValueError:
            continue
        CASES.append((_aggregation, _distance))

COUNTED = ("full_precision", *(name for name in vars(_validation) if name.startswith("check_")))


class Entries:
    """What one call enters of `_validation`'s door functions (see the module's docstring)."""

    def __init__(self) -> None:
        self.check_tensor_names: Counter[str] = Counter()  # `check_tensor` calls by the name they check
        self.precision = 0  # `full_precision` entries
        self.per_tensor: Counter[int] = Counter()  # calls into `check_*` from outside `_validation`, per tensor
        self.calls: list[tuple[str, tuple[str, ...]]] = []  # (function, shapes of its tensors), for messages
        self._seen: list[Tensor] = []  # keeps the counted tensors alive, so that no id is reused

    def clear(self) -> None:
        """Forget what was counted so far (the `checks` fixture's counter included)."""
        self.check_tensor_names.clear()
        self.precision = 0
        self.per_tensor.clear()
        self.calls.clear()
        self._seen.clear()

    def most_per_tensor(self) -> int:
        """The most calls into `_validation`'s checks that one tensor met."""
        return max(self.per_tensor.values(), default=0)

    def wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def counting(*args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_globals.get("__name__")
            if name == "check_tensor":
                self.check_tensor_names[args[1] if len(args) > 1 else kwargs["name"]] += 1
            if name == "full_precision":
                self.precision += 1
            elif caller != _validation.__name__:
                tensors = [
                    t
                    for a in (*args, *kwargs.values())
                    for t in (a.values() if isinstance(a, dict) else [a])
                    if isinstance(t, torch.Tensor)
                ]
                self._seen += tensors
                self.per_tensor.update(id(t) for t in tensors)
                self.calls.append((name, tuple(str(tuple(t.shape)) for t in tensors)))
            return original(*args, **kwargs)

        return counting


@pytest.fixture
def entries(monkeypatch: pytest.MonkeyPatch) -> Iterator[Entries]:
    """Counts `full_precision` and the `check_*` functions of `_validation`, wherever the package bound them."""
    counted = Entries()
    originals = {name: getattr(_validation, name) for name in COUNTED}
    wrappers = {name: counted.wrap(name, original) for name, original in originals.items()}
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("negtransfer_losses"):
            continue
        for attribute, value in list(vars(module).items()):
            for name, original in originals.items():
                if value is original:
                    monkeypatch.setattr(module, attribute, wrappers[name])
    yield counted


@pytest.fixture
def checks(entries: Entries) -> Counter[str]:
    """Counts `check_tensor` calls by the name they check, wherever the package bound the function."""
    return entries.check_tensor_names


def maps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 5, 5, generator=g), torch.rand(4, 3, 5, 5, generator=g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("aggregation", "distance"), CASES)
def test_anti_transfer_checks_each_input_once_on_every_branch(
    checks: Counter[str], entries: Entries, aggregation: str, distance: str, backend: str
) -> None:
    s, r = maps()
    s.requires_grad_(True)
    ops.anti_transfer(s, r, aggregation=aggregation, distance=distance, backend=backend).backward()  # type: ignore[arg-type]
    assert checks == {"student": 1, "reference": 1}
    assert entries.precision == 1 and entries.most_per_tensor() <= 2, entries.calls
    checks.clear()
    entries.clear()
    ntf.anti_transfer(s, r, aggregation=aggregation, distance=distance)  # type: ignore[arg-type]
    assert checks == {"student": 1, "reference": 1}
    assert entries.precision == 1, entries.calls


@pytest.mark.parametrize(("aggregation", "distance"), CASES)
def test_the_modules_door_to_anti_transfer_switches_precision_once(
    entries: Entries, aggregation: str, distance: str
) -> None:
    """`ops._core.anti_transfer_terms_for`, what `AntiTransferLoss` calls per layer: autocast switched off once
    (was 2 to 6 times), each input checked at most twice (type, then device with the other)."""
    s, r = maps()
    options = AntiTransferOptions.resolve(aggregation, distance)  # type: ignore[arg-type]
    anti_transfer_terms_for(s.requires_grad_(True), r, options, backend="torch").loss.backward()
    assert entries.precision == 1, entries.calls
    assert entries.most_per_tensor() <= 2, entries.calls


def test_the_module_checks_each_layer_once(checks: Counter[str]) -> None:
    s, r = maps()
    loss = ntl.AntiTransferLoss()
    loss({"a": s, "b": s[:, :2]}, {"a": r, "b": r[:, :2]})
    assert checks == {"student": 2, "reference": 2}


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda x, y: ntf.hsic(x, y), {"x": 1, "y": 1}),
        (lambda x, y: ntf.hsic(x, y, kernel="rbf", unbiased=False, kernel_y="linear"), {"x": 1, "y": 1}),
        (lambda x, y: ntf.cka(x, y), {"x": 1, "y": 1}),
        (lambda x, y: ntf.cka(x, y, kernel="rbf", unbiased=True), {"x": 1, "y": 1}),
        (lambda x, y: ntf.linear_cka(x, y), {"x": 1, "y": 1}),
        (lambda x, y: ntf.linear_cka(x, y, unbiased=True), {"x": 1, "y": 1}),
        (lambda x, y: ntf.kernel_matrix(x, kernel="rbf"), {"x": 1}),
        (lambda x, y: ntf.hsic_from_kernels(x @ x.T, y @ y.T), {"k": 1, "l": 1}),
        (lambda x, y: ntf.kernel_alignment(x @ x.T, y @ y.T, unbiased=False), {"k": 1, "l": 1}),
        (lambda x, y: ntf.cosine_rows(x, y), {"a": 1, "b": 1}),
        (lambda x, y: ntf.gram(x[:, :, None], gram_scope="batch"), {"x": 1}),
        (lambda x, y: ntf.gram_row_cosines(x[:, :, None], y[:, :, None]), {"student": 1, "reference": 1}),
        (lambda x, y: ntf.aggregated_row_cosines(x[:, :, None], y[:, :, None]), {"student": 1, "reference": 1}),
        (lambda x, y: ntf.pairwise_row_cosines(x[:, :, None], y[:, :, None]), {"student": 1, "reference": 1}),
        (lambda x, y: ntf.aggregate_channels(x[:, :, None], aggregation="max"), {"x": 1}),
        (lambda x, y: ops.gram_row_cosines(x[:, :, None], y[:, :, None]), {"student": 1, "reference": 1}),
        (lambda x, y: ops.aggregated_row_cosines(x[:, :, None], y[:, :, None]), {"student": 1, "reference": 1}),
    ],
)
def test_similarity_functions_check_each_input_once(
    checks: Counter[str], entries: Entries, call: Any, expected: dict[str, int]
) -> None:
    g = torch.Generator().manual_seed(1)
    call(torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g))
    assert checks == expected
    assert entries.precision == 1, entries.calls
    assert entries.most_per_tensor() <= 2, entries.calls


SUPPRESSION = [
    *(
        (f"HSIC {kernel}, normalized={normalized}, conditional={conditional}", "hsic", kernel, normalized, conditional)
        for kernel in ("linear", "rbf")
        for normalized in (False, True)
        for conditional in (False, True)
    ),
    *(
        (f"CKA {kernel}, unbiased={unbiased}, conditional={conditional}", "cka", kernel, unbiased, conditional)
        for kernel in ("linear", "rbf")
        for unbiased in (False, True)
        for conditional in (False, True)
    ),
]


@pytest.mark.parametrize(
    ("method", "kernel", "option", "conditional"), [c[1:] for c in SUPPRESSION], ids=[c[0] for c in SUPPRESSION]
)
def test_suppression_forwards_switch_precision_once_and_check_each_tensor_at_most_twice(
    entries: Entries, method: str, kernel: str, option: bool, conditional: bool
) -> None:
    """`HSICSuppression.forward` and `CKASuppression.forward` on every form: autocast off once (CKA with an RBF
    kernel entered it 6 times), each tensor into `_validation`'s checks at most twice (CKA's were 3 to 4)."""
    g = torch.Generator().manual_seed(2)
    z = torch.randn(16, 6, generator=g, requires_grad=True)
    y = (torch.arange(16) // 2) % 2
    if method == "hsic":
        hsic = ntl.HSICSuppression(3, kernel=kernel, normalized=option, conditional=conditional)  # type: ignore[arg-type]
        hsic(z, torch.arange(16) % 3, task_labels=y).backward()
    else:
        cka = ntl.CKASuppression(kernel=kernel, unbiased=option, conditional=conditional)  # type: ignore[arg-type]
        cka(z, torch.randn(16, 4, generator=g), task_labels=y).backward()
    assert entries.precision == 1, entries.calls
    assert entries.most_per_tensor() <= 2, entries.calls


LAYERS = {"AntiTransferLoss": 2, "AntiTransferLoss, mean": 2}  # one door (and one switch) per layer


@pytest.mark.parametrize("name", list(MODULE_CASES))
def test_every_module_switches_precision_at_most_once_per_layer(entries: Entries, name: str) -> None:
    case = MODULE_CASES[name]()
    case.step()  # a first step (Purify then holds statistics)
    entries.clear()
    case.step().backward()
    assert entries.precision <= LAYERS.get(name, 1), entries.calls
    assert entries.most_per_tensor() <= 2, entries.calls
