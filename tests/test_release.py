"""What a user installs: the wheel and sdist that `python -m build` makes, and the run-time dependencies.

The slow tests build both archives once (`python -m build --no-isolation`: the sdist first, then the wheel
*from the unpacked sdist*, so a file missing from the sdist breaks the wheel too; `--no-isolation` uses the
setuptools of this environment, so the build needs no package index), then check their contents and install
the wheel into a clean virtual environment.

Why the clean environment is honest and still fast: it is a new `venv` created `--without-pip` (not
`--system-site-packages`), so it sees neither the repository, nor this environment's site-packages, nor
the editable install. Reinstalling torch into it would cost minutes and a download, so torch arrives the way
a user's pip would leave it, already installed: one `.pth` line adds a folder that holds symlinks to exactly
the distributions of torch's own requirement closure (torch, its dist-info and what it requires, recursively,
read from the installed metadata) and to nothing else. The wheel is installed into that environment by pip
(`--no-deps --no-index`), `pip check` there confirms that the wheel's declared requirements and torch's are
met by what the environment holds, and the import runs with `python -I` from a temporary folder (no
PYTHONPATH, no user site, no current directory) with `triton` and `einops` blocked in `sys.modules`, so
the package must import and compute without them even where torch's closure brings Triton (CUDA builds).
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "negtransfer_losses"
RUNTIME_REQUIREMENTS = {"torch>=2.2", "typing-extensions"}
# extras, each imported only where it is used, and lazily (the clean-environment test imports every
# subpackage without them)
OPTIONAL_IMPORTS = {"triton": {"ops"}, "matplotlib": {"diagnostics.py", "relatedness"}}


def _package_files() -> set[str]:
    """Every file the wheel must ship: the package's Python sources and the `py.typed` marker."""
    files = {p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts} | {PACKAGE / "py.typed"}
    return {p.relative_to(ROOT).as_posix() for p in files}


def _third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports of one source file, other than the standard library and the package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "negtransfer_losses"}


def test_the_package_imports_only_its_declared_dependencies() -> None:
    """No module imports a distribution that `pip install negtransfer-losses` would not bring (einops, numpy...)."""
    allowed = {"torch", "typing_extensions"}
    for path in PACKAGE.rglob("*.py"):
        subpackage = path.relative_to(PACKAGE).parts[0]
        for name in _third_party_imports(path):
            assert name in allowed or subpackage in OPTIONAL_IMPORTS.get(name, ()), (
                f"{path.relative_to(ROOT)} imports {name!r}, which is not a run-time dependency "
                f"(declared: {sorted(RUNTIME_REQUIREMENTS)}; optional: {OPTIONAL_IMPORTS})"
            )


def test_the_declared_dependencies_are_torch_and_typing_extensions() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["dependencies"]) == RUNTIME_REQUIREMENTS
    assert project["optional-dependencies"]["triton"] == ["triton"]
    assert project["version"] == ntl.__version__


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel built from it, in a temporary folder."""
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.mark.slow
def test_the_wheel_ships_the_package_its_types_and_its_metadata(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        (metadata_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(wheel.read(metadata_name).decode())
    shipped = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert shipped == _package_files()  # every module and py.typed; no tests, examples or benchmarks
    assert metadata["Name"] == "negtransfer-losses"
    assert metadata["Version"] == ntl.__version__
    assert metadata["Requires-Python"] == ">=3.10"
    requires = metadata.get_all("Requires-Dist") or []
    assert {r for r in requires if "extra ==" not in r} == RUNTIME_REQUIREMENTS
    assert 'triton; extra == "triton"' in requires
    assert "Typing :: Typed" in (metadata.get_all("Classifier") or [])


@pytest.mark.slow
def test_the_sdist_holds_the_sources_the_readme_and_the_changelog(dist: dict[str, Path]) -> None:
    with tarfile.open(dist["sdist"]) as sdist:
        names = {m.name.split("/", 1)[1] for m in sdist.getmembers() if m.isfile()}
    assert _package_files() <= names
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "PKG-INFO"} <= names
    assert not any(n.startswith("tests/") for n in names)  # the test suite needs the repository


def _requirement_closure(name: str) -> list[importlib.metadata.Distribution]:
    """The installed distributions of `name` and, recursively, of its unconditional requirements."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = [name]
    while todo:
        key = canonicalize_name(todo.pop())
        if key in seen:
            continue
        seen[key] = importlib.metadata.distribution(key)
        for line in seen[key].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(seen.values())


def _link_closure(name: str, into: Path) -> list[str]:
    """Symlinks in `into` to every top-level file or folder of the closure of `name`; returns the distributions."""
    into.mkdir()
    closure = _requirement_closure(name)
    for distribution in closure:
        files = distribution.files
        assert files is not None, f"{distribution.metadata['Name']} lists no files (RECORD)"
        site = Path(str(distribution.locate_file("")))
        for top in {f.parts[0] for f in files} - {"..", "__pycache__"}:
            if not (into / top).exists():
                (into / top).symlink_to(site / top)
    return sorted(d.metadata["Name"] for d in closure)


IMPORT_CHECK = """
import json, sys
sys.modules["triton"] = None  # `import triton` now raises ImportError
sys.modules["einops"] = None
import importlib.metadata, pathlib
import torch
import negtransfer_losses as ntl
import negtransfer_losses.functional as ntf
from negtransfer_losses import diagnostics, ops, relatedness, taps, terms
home = pathlib.Path(ntl.__file__).parent
g = torch.Generator().manual_seed(0)
x, y = torch.randn(12, 5, generator=g), torch.randn(12, 7, generator=g)
s, r = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
at = ntl.AntiTransferLoss(aggregation="gram", distance="cos_squared", weight=1.0)
print(json.dumps({
    "file": str(home), "typed": (home / "py.typed").is_file(),
    "version": importlib.metadata.version("negtransfer-losses"),
    "requires": importlib.metadata.requires("negtransfer-losses"),
    "cka": ntf.linear_cka(x, y).item(), "cka_affine": ntf.linear_cka(x, 3 * x + 1).item(),
    "anti_transfer": at(s, r).item(),
}))
"""


@pytest.mark.slow
def test_the_wheel_installs_and_runs_in_a_clean_environment_without_triton(
    dist: dict[str, Path], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    (site,) = venv.glob("lib/python*/site-packages")
    linked = _link_closure("torch", tmp_path / "torch-closure")
    assert "einops" not in linked and "negtransfer-losses" not in linked
    (site / "torch_closure.pth").write_text(f"{tmp_path / 'torch-closure'}\n")

    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # pip must see the venv alone
    install = [*pip, "install", "--no-deps", "--no-index", str(dist["wheel"])]
    installed = subprocess.run(install, capture_output=True, text=True, timeout=300, env=env)
    assert installed.returncode == 0 and "Successfully installed" in installed.stdout, installed.stdout
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=120, env=env)
    assert check.returncode == 0, check.stdout + check.stderr

    run = subprocess.run(
        [str(python), "-I", "-c", IMPORT_CHECK], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout.splitlines()[-1])
    assert Path(found["file"]).parent == site  # the installed copy, not the repository
    assert found["typed"] is True
    assert found["version"] == ntl.__version__
    assert {r for r in found["requires"] if "extra ==" not in r} == RUNTIME_REQUIREMENTS
    # the installed copy computes what the source does, on the same tensors
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g), torch.randn(12, 7, generator=g)
    s, r = torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g)
    assert found["cka"] == pytest.approx(ntf.linear_cka(x, y).item(), rel=1e-6)
    assert found["cka_affine"] == pytest.approx(1.0, abs=1e-5)  # CKA is invariant to scale and shift
    expected = ntf.anti_transfer(s, r, aggregation="gram", distance="cos_squared", gram_scope="batch")
    assert found["anti_transfer"] == pytest.approx(expected.item(), rel=1e-6)
