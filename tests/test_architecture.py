"""The architecture, checked: import-linter's contracts (``[tool.importlinter]`` in pyproject.toml)
hold, no module of stdeploy imports an underscore name of another module, and no import cycle
exists anywhere in the package (every import counts, function-local ones included).

Each checker is also run on a small package made here with the fault in it, so a checker that
could not fail would fail these tests."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "stdeploy"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


# --------------------------------------------------------------------------------------------
# A module graph from the source (ast): module name -> modules it imports, at any depth of code


def _modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``package_dir`` (a package)."""
    base = package_dir.parent
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name an ImportFrom names (relative imports resolved from ``module``)."""
    if not node.level:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, ast.AST, str | None]]:
    """``(imported module, node, imported name)`` for every import of a module of ``known``; the
    name is the one taken from that module (None for ``import x`` and for submodules)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node, None) for a in node.names if a.name in known]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, path, node)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in known:
                    out.append((sub, node, None))
                elif source in known:
                    out.append((source, node, alias.name))
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(package_dir: Path) -> list[str]:
    """Every place a module takes an underscore name from another module of the package: ``from
    X import _name``, an underscore submodule, or ``X._name`` where ``X`` is a module it imported."""
    known = _modules(package_dir)
    problems = []
    for module, path in known.items():
        bound: set[str] = set()   # local names bound to modules of the package
        for target, node, name in _imports(module, path, known):
            where = f"{path.relative_to(package_dir.parent)}:{node.lineno}"
            if target != module and name is not None and _is_private(name):
                problems.append(f"{where}: from {target} import {name}")
            if name is None and any(_is_private(p) for p in target.split(".")) and not module.startswith(target):
                problems.append(f"{where}: imports the private module {target}")
            if name is None:
                for alias in node.names:
                    if isinstance(node, ast.ImportFrom):
                        bound.add(alias.asname or alias.name)
                    elif alias.asname:
                        bound.add(alias.asname)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _is_private(node.attr)):
                problems.append(f"{path.relative_to(package_dir.parent)}:{node.lineno}: {node.value.id}.{node.attr}")
    return problems


def import_cycles(package_dir: Path) -> list[list[str]]:
    """The strongly connected components (more than one module) of the package's import graph."""
    known = _modules(package_dir)
    edges = {m: sorted({t for t, _, _ in _imports(m, p, known) if t != m}) for m, p in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:   # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for module in known:
        if module not in index:
            visit(module)
    return cycles


def imports_reaching(package_dir: Path, roots: list[str], external: str) -> list[list[str]]:
    """Import chains from the modules ``roots`` (and their submodules) through the package to the
    external package ``external`` (e.g. ``torch``); every import counts, function-local ones too."""
    known = _modules(package_dir)
    start = [m for m in known if any(m == r or m.startswith(r + ".") for r in roots)]
    chains, seen = [], set()
    todo = [[m] for m in start]
    while todo:
        chain = todo.pop()
        module = chain[-1]
        if module in seen:
            continue
        seen.add(module)
        tree = ast.parse(known[module].read_text(), str(known[module]))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [_resolve(module, known[module], node)] if isinstance(node, ast.ImportFrom) else [])
            if any(n == external or n.startswith(external + ".") for n in names):
                chains.append(chain + [external])
        todo += [chain + [t] for t, _, _ in _imports(module, known[module], known) if t not in seen]
    return chains


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.is_file():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the dev extra (pip install -e '.[dev]'; `make test` does)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pythonpath), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A package ``pkgx`` under ``tmp_path`` with the given module texts."""
    pkg = tmp_path / "pkgx"
    for name, text in {"__init__.py": "", **files}.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    return pkg


# --------------------------------------------------------------------------------------------
# stdeploy


def test_import_linter_contracts_hold():
    res = _lint_imports(ROOT, ROOT)
    assert res.returncode == 0 and " 0 broken" in res.stdout, res.stdout[-4000:] + res.stderr[-2000:]
    assert "KEPT" in res.stdout


def test_no_module_takes_an_underscore_name_from_another():
    assert private_imports(PACKAGE) == []


def test_no_import_cycle_in_stdeploy():
    assert import_cycles(PACKAGE) == []


def test_file_helpers_and_the_runtime_never_import_torch():
    # import-linter's forbidden contract cannot name stdeploy.runtime before it exists (and
    # "stdeploy.runtime.**" skips the package's own __init__): checked here as well
    assert imports_reaching(PACKAGE, ["stdeploy.files", "stdeploy.runtime"], "torch") == []


def heavy_sdk_imports(package_dir: Path, sdks: tuple[str, ...], homes: tuple[str, ...]) -> list[str]:
    """Imports of the packages ``sdks`` (at any depth of code) by modules outside ``homes``."""
    problems = []
    for module, path in _modules(package_dir).items():
        if any(module == h or module.startswith(h + ".") for h in homes):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            problems += [f"{module}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in sdks]
    return problems


def test_heavy_sdks_are_imported_only_inside_their_target():
    # stdeploy.runtime is the on-device runner: numpy plus one runtime (onnxruntime or TVM's runtime)
    assert heavy_sdk_imports(PACKAGE, ("tvm", "tvm_ffi", "lava"),
                             ("stdeploy.targets.tvm", "stdeploy.targets.lava", "stdeploy.runtime")) == []


def test_target_registry_finds_every_target_module():
    from stdeploy.targets.base import REGISTRY, get_target

    for name, spec in REGISTRY.items():
        module, _, cls = spec.partition(":")
        assert (PACKAGE.parent / (module.replace(".", "/") + ".py")).is_file(), spec
        assert type(get_target(name)).__name__ == cls


# --------------------------------------------------------------------------------------------
# the checkers fail where they should


def test_checkers_find_a_private_import_and_a_cycle(tmp_path):
    pkg = _package(tmp_path, {
        "a.py": "from .b import _hidden\n",
        "b.py": "_hidden = 1\n\ndef late():\n    from . import c  # a function-local import counts\n",
        "c.py": "from . import a\nVALUE = a._hidden\n",
        "own.py": "_mine = 1\nfrom .own import _mine as again\n",
    })
    problems = private_imports(pkg)
    assert any("from pkgx.b import _hidden" in p for p in problems)
    assert any("a._hidden" in p for p in problems)
    assert not any("own" in p for p in problems), problems   # a module's own names are its business
    assert import_cycles(pkg) == [["pkgx.a", "pkgx.b", "pkgx.c"]]


def test_checker_finds_an_sdk_imported_outside_its_home(tmp_path):
    pkg = _package(tmp_path, {"home/__init__.py": "import tvm\n", "other.py": "def f():\n    from tvm import relax\n"})
    assert heavy_sdk_imports(pkg, ("tvm",), ("pkgx.home",)) == ["pkgx.other:2 imports tvm"]


def test_checker_finds_torch_reached_through_the_package(tmp_path):
    pkg = _package(tmp_path, {"files.py": "def f():\n    from .heavy import g\n",
                              "heavy.py": "import torch.nn\n", "runtime/__init__.py": "from ..files import f\n"})
    assert imports_reaching(pkg, ["pkgx.runtime"], "torch") == [["pkgx.runtime", "pkgx.files", "pkgx.heavy", "torch"]]
    assert imports_reaching(pkg, ["pkgx.absent"], "torch") == []


def test_lint_imports_fails_on_a_broken_layer(tmp_path):
    _package(tmp_path, {"high.py": "", "low.py": "from . import high\n"})
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.importlinter]
        root_package = "pkgx"

        [[tool.importlinter.contracts]]
        name = "high over low"
        type = "layers"
        layers = ["pkgx.high", "pkgx.low"]
    """))
    res = _lint_imports(tmp_path, tmp_path)
    assert res.returncode != 0 and "BROKEN" in res.stdout, res.stdout[-2000:]


# --------------------------------------------------------------------------------------------
# the wheel: every package listed, the data folders mapped


def _setuptools_config() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_is_listed_for_the_wheel():
    listed = set(_setuptools_config()["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk - listed == set(), "packages missing from [tool.setuptools] packages (the wheel would lack them)"
    assert {p for p in listed if p not in on_disk} == set(_setuptools_config()["package-dir"])


def test_shipped_data_found_in_the_checkout():
    from stdeploy.shipped import KINDS, shipped_dir

    mapping = _setuptools_config()["package-dir"]
    for kind in KINDS:
        folder = shipped_dir(kind)
        assert folder == ROOT / mapping[f"stdeploy.shipped.{kind}"] and list(folder.glob("*.toml")), kind
    with pytest.raises(ValueError, match="one of"):
        shipped_dir("weights")
