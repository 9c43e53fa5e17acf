"""The package's shape: imports run one way, one vocabulary across the public modules, defaults that never
conflict with an allowed option."""

from __future__ import annotations

import ast
import collections
import functools
import importlib
import importlib.util
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import oracles
import pytest
import torch

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses import ops

PACKAGE = Path(ntl.__file__).parent
MODULES = [
    ntl.AntiTransferLoss,
    ntl.AdversarialSuppression,
    ntl.HSICSuppression,
    ntl.CKASuppression,
    ntl.Purify,
    ntl.DistributionMatchingLoss,
    ntl.SoftCoAnnotationLoss,
    ntl.MultiTaskLoss,
]
PENALTIES = [m for m in MODULES if m is not ntl.Purify]  # Purify is a transform: it has no weight


@pytest.mark.parametrize("subpackage", ["ops", "functional", "losses", "taps", "relatedness", "terms", "diagnostics"])
def test_any_subpackage_can_be_imported_first(subpackage: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", f"import negtransfer_losses.{subpackage}"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def _imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.append("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def test_functional_imports_nothing_above_it() -> None:
    for path in (PACKAGE / "functional").glob("*.py"):
        for name in _imports_of(path):
            assert not name.startswith(("..ops", "..losses", "..taps", "negtransfer_losses.ops")), (
                f"{path.name}: {name}"
            )
            if name.startswith("..") and not name.startswith("..."):
                assert name.split(".")[2] in ("_validation", "_labels", "distributed"), f"{path.name} imports {name}"


def _resolved_imports(path: Path) -> list[str]:
    """The absolute module of every `from X import ...` of a package module (relative ones resolved)."""
    parts = ["negtransfer_losses", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts[:-1]  # a module's package, or an __init__'s own
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append(node.module or "")
            else:
                base = package[: len(package) - node.level + 1]
                found.append(".".join([*base, *([node.module] if node.module else [])]))
    return found


def test_no_module_imports_the_package_root() -> None:
    # the root's __init__ imports every layer: a module below that imports it runs back up (e.g. for a version)
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "__init__.py":
            continue
        for name in _resolved_imports(path):
            assert name != "negtransfer_losses", f"{path.relative_to(PACKAGE)} imports the package root"


# the bottom helpers every layer shares by design (DESIGN.md): private modules, importable from anywhere
SHARED_HELPERS = ("_validation", "_labels", "_version")
# the layers with an internal door: another layer imports from them only their public names or `<layer>._core`
DOORS = ("functional", "ops")


def _imported_names(path: Path) -> list[tuple[int, str, list[str]]]:
    """`(line, absolute module, names)` of every import of a package module from the package (relative imports
    resolved; `import a.b` as the module `a.b` with no names)."""
    parts = ["negtransfer_losses", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = parts[:-1]  # a module's package, or an __init__'s own
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
            else:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
    return [(line, module, names) for line, module, names in found if module.split(".")[0] == "negtransfer_losses"]


def _imports_across_layers(path: Path) -> list[tuple[str, str, list[str]]]:
    """`(where, module, names)` of the imports by a package module from another top-level part of the package
    (`functional`, `ops`, `losses`, `taps`, ...) than its own, the shared bottom helpers left out."""
    own = path.relative_to(PACKAGE).with_suffix("").parts[0]
    found = []
    for line, module, names in _imported_names(path):
        target = module.split(".")[1:]
        if target and target[0] != own and target[0] not in SHARED_HELPERS:
            found.append((f"{path.relative_to(PACKAGE)}:{line}", module, names))
    return found


def test_no_module_reaches_into_another_layers_private_names() -> None:
    """DESIGN.md: layers talk through public names or one internal module per layer (`_core`)."""
    back_doors = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for where, module, names in _imports_across_layers(path):
            private = [p for p in module.split(".")[1:] if p.startswith("_") and p != "_core"]
            private += [name for name in names if name.startswith("_")]
            if private:
                back_doors.append(f"{where} imports {private} from {module}")
    assert not back_doors, "\n".join(back_doors)


def test_other_layers_use_functional_and_ops_through_their_public_names_or_their_core() -> None:
    back_doors = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for where, module, names in _imports_across_layers(path):
            layer = module.split(".")[1]
            if layer not in DOORS or module == f"negtransfer_losses.{layer}._core":
                continue
            public = set(importlib.import_module(f"negtransfer_losses.{layer}").__all__)
            outside = [name for name in names if name not in public] or ([] if names else [module])
            if outside:
                back_doors.append(f"{where} imports {outside} from {module}: use {layer}'s public names or _core")
    assert not back_doors, "\n".join(back_doors)


@pytest.mark.parametrize("layer", DOORS)
def test_every_name_of_a_core_is_used_by_another_layer(layer: str) -> None:
    """A `_core` lists what other layers need and nothing more: each of its names is imported by one of them."""
    core = importlib.import_module(f"negtransfer_losses.{layer}._core")
    used = {
        name
        for path in PACKAGE.rglob("*.py")
        for _, module, names in _imports_across_layers(path)
        if module == core.__name__
        for name in names
    }
    assert set(core.__all__) - used == set(), f"{layer}._core exports names no other layer imports"


def test_only_ops_chooses_a_backend() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "ops":
            continue
        assert "resolve_backend(" not in path.read_text(), f"{path} chooses a backend outside ops"


# The only module-level objects that keep state across calls, each the documented owner of that state (DESIGN.md:
# caches and queues are objects with an owner and an explicit flush).
STATE_OWNERS = {
    ("_validation", "pending_checks"): "the deferred value checks; raise_pending_errors() flushes them",
    ("ops.dispatch", "default_dispatcher"): "the backend decisions; ops.forget_decisions() drops them",
    ("ops.dispatch", "_find_triton"): "whether Triton is installed, looked up once per process",
}


def test_no_mutable_module_state_but_its_named_owners() -> None:
    owners = {id(getattr(importlib.import_module(f"negtransfer_losses.{m}"), name)) for m, name in STATE_OWNERS}
    for info in pkgutil.walk_packages(ntl.__path__, "negtransfer_losses."):
        if info.name.rsplit(".", 1)[-1].startswith("_kernel") and importlib.util.find_spec("triton") is None:
            continue  # the kernels import Triton
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if name.startswith("__") or id(value) in owners or isinstance(value, type) or inspect.ismodule(value):
                continue
            where = f"{info.name}.{name}"
            if isinstance(value, (dict, list, set, collections.deque, bytearray)):
                assert name.lstrip("_").isupper(), f"{where}: a mutable container at module level (not a constant)"
            assert not isinstance(value, functools._lru_cache_wrapper), f"{where}: a module-level cache"
            assert not type(value).__module__.startswith("negtransfer_losses"), f"{where}: state at module level"


def test_every_penalty_takes_weight_as_a_keyword_only_argument() -> None:
    for module in PENALTIES:
        parameter = inspect.signature(module).parameters.get("weight")
        assert parameter is not None, f"{module.__name__} has no weight"
        assert parameter.kind is inspect.Parameter.KEYWORD_ONLY, f"{module.__name__}: weight is not keyword-only"
        assert parameter.default == 1.0


# names that once meant the same as one of the package's words
RETIRED_NAMES = {
    "feature_dim": "dim",
    "num_classes": "num_irrelevant",
    "method": "aggregation (in anti-transfer)",
    "scope": "gram_scope",
    "x": "student",
    "y": "reference",
    "distribution_matching": "matching_weight",
    "co_annotation": "co_annotation_weight",
}
ALLOWED: dict[type, set[str]] = {}


def test_one_vocabulary_across_the_public_modules() -> None:
    for module in MODULES:
        names = set(inspect.signature(module).parameters)
        retired = {n: RETIRED_NAMES[n] for n in names & set(RETIRED_NAMES) - ALLOWED.get(module, set())}
        assert not retired, f"{module.__name__} uses {retired}"
    for function in (ntf.anti_transfer, ntf.gram_row_cosines, ntf.aggregated_row_cosines, ops.anti_transfer):
        names = set(inspect.signature(function).parameters)
        assert {"student", "reference"} <= names and not names & {"x", "y", "scope", "method"}, function
    assert "aggregation" in inspect.signature(ntf.aggregate_channels).parameters
    assert "gram_scope" in inspect.signature(ntf.gram).parameters


def _public_callables() -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    for prefix, namespace in (("ntl", ntl), ("ntf", ntf), ("ops", ops)):
        for name in namespace.__all__:
            obj = getattr(namespace, name)
            if inspect.isfunction(obj) or (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)):
                found.append((f"{prefix}.{name}", obj))
    for name, method in inspect.getmembers(ntl.TaskRelatedness):
        if not name.startswith("_") and callable(method):
            found.append((f"TaskRelatedness.{name}", method))
    return found


def test_tensors_positional_every_option_keyword_only() -> None:
    """An argument with a default is keyword-only unless it is a tensor (an optional input such as labels);
    required sizes of modules stay positional, like `nn.Linear` (`HSICSuppression(num_irrelevant)`)."""
    for qualname, obj in _public_callables():
        try:
            parameters = inspect.signature(obj).parameters.values()  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        for p in parameters:
            if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is not p.empty:
                assert "Tensor" in str(p.annotation), f"{qualname}: option {p.name!r} is not keyword-only"
    for module in (ntl.AntiTransferLoss,):
        kinds = {n: p.kind for n, p in inspect.signature(module).parameters.items()}
        assert kinds["aggregation"] is kinds["distance"] is inspect.Parameter.KEYWORD_ONLY
    # functions take only tensors positionally: a size is an option there, as in adversarial_suppression
    for function in (ntf.irrelevant_hsic, ntf.adversarial_suppression):
        assert inspect.signature(function).parameters["num_irrelevant"].kind is inspect.Parameter.KEYWORD_ONLY


def test_ops_functions_have_their_functional_twins_signatures_plus_backend() -> None:
    for name in ("anti_transfer", "gram_row_cosines", "aggregated_row_cosines", "distribution_matching"):
        fused = dict(inspect.signature(getattr(ops, name)).parameters)
        assert fused.pop("backend").default == "auto"
        assert list(fused) == list(inspect.signature(getattr(ntf, name)).parameters), name


def test_last_terms_have_one_layout() -> None:
    relatedness = ntl.TaskRelatedness([[0.9, 0.1], [0.2, 0.7], [0.5, 0.5]])
    za, zb = torch.randn(6, 3), torch.randn(6, 2)
    la, lb = torch.tensor([0, 1, 2, -100, 0, 1]), torch.tensor([[1, 0], [-1, 1], [0, 0], [1, 1], [-1, -1], [0, 1]])
    calls = [
        (ntl.AntiTransferLoss(weight=2.0), (torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2))),
        (ntl.HSICSuppression(3, weight=2.0), (torch.randn(8, 5), torch.arange(8) % 3)),
        (ntl.CKASuppression(weight=2.0), (torch.randn(8, 5), torch.randn(8, 3))),
        (ntl.DistributionMatchingLoss(relatedness, weight=2.0), (za, zb)),
        (ntl.SoftCoAnnotationLoss(relatedness, weight=2.0), (za, zb, la, lb)),
        (ntl.MultiTaskLoss(relatedness, weight=2.0), (za, zb, la, lb)),
    ]
    for module, args in calls:
        out = module(*args)
        terms = module.last_terms
        assert isinstance(terms, dict) and all(isinstance(k, str) for k in terms), type(module).__name__
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in terms.values())
        torch.testing.assert_close(terms["loss"], out.detach(), msg=type(module).__name__)
    logged = ntl.collect_terms({"mt": calls[-1][0], "at": calls[0][0]}, prefix="train/")
    assert {
        "train/mt/loss",
        "train/mt/matching/a_to_b/loss",
        "train/mt/co_annotation/a/value",
        "train/at/features/similarity",
    } <= set(logged)
    assert all(isinstance(v, float) for v in logged.values())


def test_collect_terms_walks_a_model_and_skips_what_a_parent_reports() -> None:
    relatedness = ntl.TaskRelatedness([[0.9, 0.1], [0.2, 0.7]])
    container = torch.nn.Module()
    container.coupling = ntl.MultiTaskLoss(relatedness)
    container.anti = ntl.AntiTransferLoss(aggregation="none", distance="cos")
    container.coupling(torch.randn(4, 2), torch.randn(4, 2), torch.tensor([0, 1, -100, 0]), torch.ones(4, 2))
    container.anti(torch.randn(3, 4), torch.randn(3, 4))
    logged = ntl.collect_terms(container)
    assert "coupling/matching/a_to_b/loss" in logged and "anti/features/loss" in logged
    assert not any(key.startswith("coupling.matching") for key in logged)  # reported once, by its parent
    with pytest.raises(TypeError, match=r"has no 'last_terms'"):
        ntl.collect_terms({"lin": torch.nn.Linear(2, 2)})


# --- defaults resolved per choice; options that do not apply raise --------------------------------------


def test_cka_distance_works_as_written() -> None:
    s, r = torch.randn(5, 3, 4, 4), torch.randn(5, 6, 4, 4)
    expected = oracles.anti_transfer(s, r, "gram", "cka", "sample")  # the per-sample Gram matrices, 3×3 and 6×6
    torch.testing.assert_close(ntl.AntiTransferLoss(distance="cka")(s, r).double(), expected, rtol=1e-5, atol=1e-6)
    assert ntl.AntiTransferLoss(distance="cka").gram_scope == "sample"
    assert ntl.AntiTransferLoss().gram_scope == "batch"


def test_anti_transfer_options_that_do_not_apply_raise() -> None:
    with pytest.raises(ValueError, match=r"'gram_scope' applies to aggregation='gram' only"):
        ntl.AntiTransferLoss(aggregation="mean", distance="cos", gram_scope="sample")
    with pytest.raises(ValueError, match=r"'mul_exponent' applies to aggregation='mul' only"):
        ntl.AntiTransferLoss(aggregation="gram", mul_exponent=0.01)
    with pytest.raises(ValueError, match=r"distance='cka' compares per-sample representations"):
        ntl.AntiTransferLoss(aggregation="gram", distance="cka", gram_scope="batch")
    with pytest.raises(ValueError, match=r"'mul_exponent' must be > 0"):
        ntl.AntiTransferLoss(aggregation="mul", distance="cos", mul_exponent=0.0)
    assert ntl.AntiTransferLoss(aggregation="mul", distance="cos", mul_exponent=0.01).options.mul_exponent == 0.01


def test_multilabel_targets_accept_integers_with_minus_one_and_booleans() -> None:
    logits = torch.randn(4, 3)
    floats = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0], [float("nan")] * 3, [1.0, 1.0, 0.0]])
    integers = torch.tensor([[1, 0, -1], [0, 1, 1], [-1, -1, -1], [1, 1, 0]])
    expected = ntf.masked_binary_cross_entropy(logits, floats)
    torch.testing.assert_close(ntf.masked_binary_cross_entropy(logits, integers), expected)
    booleans = torch.tensor([[True, False, True]] * 4)
    torch.testing.assert_close(
        ntf.masked_binary_cross_entropy(logits, booleans), ntf.masked_binary_cross_entropy(logits, booleans.float())
    )
    relatedness = ntl.TaskRelatedness.estimate(torch.tensor([0, 1, 0, 1]), integers, num_a=2, num_b=3)
    same = ntl.TaskRelatedness.estimate(torch.tensor([0, 1, 0, 1]), floats, num_a=2, num_b=3)
    torch.testing.assert_close(relatedness.matrix, same.matrix)
    with pytest.raises(ValueError, match=r"annotated entries of 'targets' must lie in \[0, 1\]"):
        ntf.masked_binary_cross_entropy(logits, integers * 2)


def test_label_errors_name_what_the_classes_are() -> None:
    with pytest.raises(ValueError, match=r"'labels_a' holds 5, outside \[0, 3\) for 3 classes of task A"):
        ntf.soft_co_annotation(
            torch.randn(2, 3), torch.randn(2, 2), torch.tensor([5, 0]), torch.ones(2, 2), torch.rand(3, 2)
        )


def test_float64_never_reaches_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    assert ops.resolve_backend("auto", "gram_row_cosines/batch", x, x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=r"backend='triton' runs float16, bfloat16 and float32 only"):
        ops.gram_row_cosines(x, x, backend="triton")


@pytest.mark.parametrize("aggregation", ["none", "gram", "mean", "sum", "max", "pairwise"])
def test_cosines_of_float32_features_of_magnitude_1e30_are_finite(aggregation: str) -> None:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(3, 4, 5, 2, generator=g) * 1e30).requires_grad_(True)
    r = torch.randn(3, 4, 5, 2, generator=g) * 1e30
    loss = ntf.anti_transfer(s, r, aggregation=aggregation, distance="cos_squared")  # type: ignore[arg-type]
    loss.backward()
    expected = ntf.anti_transfer(
        s.detach().double() / 1e30, r.double() / 1e30, aggregation=aggregation, distance="cos_squared"
    )  # type: ignore[arg-type]
    assert s.grad is not None and torch.isfinite(s.grad).all()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-6)
