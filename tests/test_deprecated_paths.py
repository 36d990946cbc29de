"""The old import paths of moved modules work for one release, each with a DeprecationWarning.

The old paths are imported in a fresh interpreter (the warning is emitted once, at first import, so
an in-process check would depend on test order): it must warn exactly once, name the new path, and
be the new module itself, so every object it exports is identical to the new one.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MOVED = {
    "curvopt.rl.capo": "curvopt.capo.masker",
    "curvopt.rl.capo_direction": "curvopt.capo.direction",
    "curvopt.rl.capo_penalty": "curvopt.capo.penalty",
    "curvopt.rl.capo_whole_model": "curvopt.capo.whole_model",
    "curvopt.rl.token_losses": "curvopt.capo.token_losses",
    "curvopt.rl.grpo": "curvopt.capo.grpo",
    "curvopt.rl.sequence_policy": "curvopt.capo.sequence_policy",
    "curvopt.rl.addition_task": "curvopt.bench.tasks.addition",
    "curvopt.rl.recall_task": "curvopt.bench.tasks.recall",
    "curvopt.integrations.trl_addition": "curvopt.bench.tasks.trl_addition",
}

MOVED_NAMES = [
    "CAPOLoss",
    "CAPOMask",
    "CAPOMasker",
    "CAPOPenalty",
    "GRPOTrainer",
    "calibrate_thresholds",
    "group_advantages",
]

# Runs in the child: import each old path (or read each moved name) under a recording filter and
# report, per old path, its DeprecationWarnings and whether the old objects are the new ones.
_CHILD = r"""
import importlib, json, sys, warnings
modules, names = json.loads(sys.argv[1])
report = {}
for old, new in modules.items():
    try:
        importlib.import_module(new)
    except ImportError:  # an optional extra that is not installed
        continue
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(f"import {old}")  # a plain import statement, as user code writes it
        obj = sys.modules[old]
        ref = importlib.import_module(new)
        same = obj is ref and all(
            getattr(obj, n) is getattr(ref, n) for n in getattr(ref, "__all__", [])
        )
        exec(f"import {old}")  # a second import must not warn again
    report[old] = (same, caught)
pkg = importlib.import_module("curvopt.rl")
for name in names:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = getattr(pkg, name) is getattr(importlib.import_module("curvopt.capo"), name)
    report[name] = (same, caught)
print(json.dumps({
    key: {
        "same": same,
        "messages": [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)],
        "files": [w.filename for w in caught if issubclass(w.category, DeprecationWarning)],
    }
    for key, (same, caught) in report.items()
}))
"""


@pytest.fixture(scope="module")
def report():
    """One fresh interpreter imports every old path once (torch is imported once, not 17 times)."""
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([MOVED, MOVED_NAMES])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_path_is_the_new_module_and_warns_once(old, report):
    new = MOVED[old]
    if new.endswith("trl_addition"):
        pytest.importorskip("trl")
    got = report[old]
    assert got["same"], f"{old} is not the module {new}"
    assert len(got["messages"]) == 1, got["messages"]
    assert old in got["messages"][0]
    assert new in got["messages"][0] and "deprecated" in got["messages"][0]
    # the warning points at the importing code, not at curvopt's shim machinery
    assert got["files"] == ["<string>"], got["files"]


@pytest.mark.parametrize("name", MOVED_NAMES)
def test_moved_names_of_curvopt_rl_warn_and_are_the_capo_objects(name, report):
    got = report[name]
    assert got["same"]
    assert len(got["messages"]) == 1, got["messages"]
    assert f"curvopt.rl.{name}" in got["messages"][0]
    assert f"curvopt.capo.{name}" in got["messages"][0]


def test_unknown_rl_attribute_still_raises():
    import curvopt.rl

    with pytest.raises(AttributeError, match="no_such_name"):
        curvopt.rl.no_such_name  # noqa: B018


def test_alias_module_rejects_non_strings():
    from curvopt._deprecation import alias_module

    with pytest.raises(TypeError, match="strings"):
        alias_module("curvopt.rl.capo", None)


def _old_path_uses(path: Path) -> list[str]:
    """Old module paths named in a file, and old curvopt.rl names imported by Python code."""
    text = path.read_text()
    old = "|".join(re.escape(m) for m in MOVED)
    found = [m.group(0) for m in re.finditer(rf"\b(?:{old})\b", text)]
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module == "curvopt.rl":
                found += [f"curvopt.rl.{a.name}" for a in node.names if a.name in MOVED_NAMES]
            if isinstance(node, ast.ImportFrom) and node.module in ("curvopt", "curvopt.rl"):
                prefix = node.module + "."
                found += [prefix + a.name for a in node.names if prefix + a.name in MOVED]
    return found


def test_nothing_in_the_repository_uses_the_old_paths():
    """Code, tests, benchmarks, examples and docs import the new paths (the shims are for users)."""
    allowed = {  # the places that name the old paths on purpose
        ROOT / "tests" / "test_deprecated_paths.py",
        ROOT / "curvopt" / "rl" / "__init__.py",
        ROOT / "docs" / "api" / "capo.md",
    }
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]
    for folder in ("curvopt", "kernels", "tests", "benchmarks", "examples"):
        files += (ROOT / folder).rglob("*.py")
    uses = {
        str(f.relative_to(ROOT)): found
        for f in sorted(set(files) - allowed)
        if (found := _old_path_uses(f))
    }
    assert uses == {}
