"""Inputs are checked once, at the public door: one `_validation.check_tensor` per input tensor per public call,
on every branch (inner cores take checked inputs)."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses import _validation, ops
from negtransfer_losses.functional.anti_transfer import ANTI_TRANSFER_AGGREGATIONS, DISTANCES, AntiTransferOptions

CASES = []
for _aggregation in ANTI_TRANSFER_AGGREGATIONS:
    for _distance in DISTANCES:
        try:
            AntiTransferOptions.resolve(_aggregation, _distance)
        except ValueError:
            continue
        CASES.append((_aggregation, _distance))


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Counts `check_tensor` calls by the name they check, wherever the package bound the function."""
    original = _validation.check_tensor
    counts: Counter[str] = Counter()

    def counting(x: object, name: str, **kwargs: Any) -> Any:
        counts[name] += 1
        return original(x, name, **kwargs)

    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("negtransfer_losses") and getattr(module, "check_tensor", None) is original:
            monkeypatch.setattr(module, "check_tensor", counting)
    yield counts


def maps(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 5, 5, generator=g), torch.rand(4, 3, 5, 5, generator=g)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(("aggregation", "distance"), CASES)
def test_anti_transfer_checks_each_input_once_on_every_branch(
    checks: Counter[str], aggregation: str, distance: str, backend: str
) -> None:
    s, r = maps()
    s.requires_grad_(True)
    ops.anti_transfer(s, r, aggregation=aggregation, distance=distance, backend=backend).backward()  # type: ignore[arg-type]
    assert checks == {"student": 1, "reference": 1}
    checks.clear()
    ntf.anti_transfer(s, r, aggregation=aggregation, distance=distance)  # type: ignore[arg-type]
    assert checks == {"student": 1, "reference": 1}


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
def test_similarity_functions_check_each_input_once(checks: Counter[str], call: Any, expected: dict[str, int]) -> None:
    g = torch.Generator().manual_seed(1)
    call(torch.randn(8, 3, generator=g), torch.randn(8, 3, generator=g))
    assert checks == expected
