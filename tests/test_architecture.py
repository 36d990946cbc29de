"""Package structure: no import cycle in curvopt/ or kernels/; the core pulls in no optional extra.

**What counts as an import (the cycle check).** Every ``import`` / ``from ... import`` statement
anywhere in a module: at module level, inside functions and under ``if TYPE_CHECKING:``. A deferred
import only postpones a cycle (both modules still need each other, and the order of first use
decides whether it breaks), so it counts. Also counted: string literals naming a module of the
package passed to ``importlib.import_module`` or to the deprecation shims' ``alias_module`` /
``moved_name``. Not seen: names built at run time (``curvopt.__getattr__``'s lazy subpackages).

**Edges.** ``import a.b.c`` from module ``m`` is an edge to ``a.b.c`` and to the packages it passes
through (``a``, ``a.b``: importing a submodule runs their ``__init__``), except ``m``'s own parent
packages, which are already being imported when ``m`` runs (the usual ``__init__`` that imports
its submodules). ``from a.b import x`` goes to ``a.b.x`` if that is a module, else to ``a.b``.
Relative imports are resolved against the module's package. ``kernels/`` is ``curvopt.kernels``.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"curvopt": ROOT / "curvopt", "curvopt.kernels": ROOT / "kernels"}
DYNAMIC_IMPORTERS = {"import_module", "alias_module", "moved_name"}

CORE = ["curvopt", "curvopt.curvature", "curvopt.mfac", "curvopt.optim", "curvopt.prune"]
# The extras of pyproject.toml (rl, bench, lm, trl) and what they bring. Triton (the gpu extra)
# is not here: the one kernel dispatch point imports it when it is installed, by design.
OPTIONAL = [
    "transformers",
    "trl",
    "sklearn",
    "matplotlib",
    "rich",
    "gymnasium",
    "datasets",
    "tokenizers",
    "accelerate",
]


def module_files(sources: dict[str, Path]) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is_package)}`` for every ``.py`` file under the source folders."""
    out = {}
    for prefix, folder in sources.items():
        for f in sorted(folder.rglob("*.py")):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = (f, is_pkg)
    return out


def _targets(node: ast.AST, module: str, is_pkg: bool, known: dict) -> list[str]:
    """Dotted names that one import statement (or dynamic import call) of ``module`` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            package = (module if is_pkg else module.rpartition(".")[0]).split(".")
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([node.module] if node.module else []))
        else:
            base = node.module
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in DYNAMIC_IMPORTERS:
            return [
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value in known
            ]
    return []


def import_graph(sources: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package's own modules (rules: module docs)."""
    known = module_files(sources)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, (path, is_pkg) in known.items():
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in _targets(node, module, is_pkg, known):
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in known and name not in own:
                        graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_in_curvopt_or_kernels():
    graph = import_graph(SOURCES)
    assert "curvopt.prune.pruner" in graph and "curvopt.kernels" in graph  # both trees parsed
    assert cycles(graph) == []


def test_cycle_finder_sees_deferred_relative_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .a import f\n")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n    return b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
    )
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('pkg.d')\n")
    (pkg / "d.py").write_text("from pkg.c import *\n")
    (pkg / "e.py").write_text("import pkg.sub.b\n")  # edges to pkg.sub and pkg.sub.b, not pkg
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.e"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg"] == {"pkg.a"}  # a package importing its own submodule
    assert sorted(cycles(graph)) == [["pkg.a", "pkg.sub.b"], ["pkg.c", "pkg.d"]]


def test_importing_the_core_pulls_in_no_optional_dependency():
    code = (
        "import importlib, json, sys\n"
        f"for name in {CORE!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {OPTIONAL!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


@pytest.mark.parametrize("name", ["curvopt.capo", "curvopt.rl"])
def test_capo_and_rl_pull_in_no_optional_dependency(name):
    """CAPO and the policy-gradient estimators need torch only (gymnasium when a rollout runs)."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({name!r})\n"
        f"print(json.dumps(sorted(m for m in {OPTIONAL!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
