"""The install surface: the source folder kernels/ never shadows the PyPI distribution ``kernels``.

transformers imports Hugging Face's ``kernels``. Whenever the repository root is on ``sys.path``
(``python -m pytest``, ``python -c`` there, ``PYTHONPATH=.`` on the GPU machine), the folder
``kernels/`` must not answer that import; it is importable only as ``curvopt.kernels``.
"""

import os
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code, *, cwd=ROOT, env=None, isolated=False):
    cmd = [sys.executable, *(["-I"] if isolated else []), "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _with_root_on_path():
    return dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )


def test_hugging_face_kernels_is_installed_here():
    # the tests below are only meaningful beside the real distribution (transformers needs it)
    assert metadata.version("kernels")


def test_transformers_imports_from_the_repository_root():
    proc = _python("import transformers; from transformers import GPT2LMHeadModel; print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_top_level_kernels_is_the_distribution_from_the_repository_root():
    code = "import kernels, sys; print(kernels.__file__); print(sorted(sys.modules))"
    for env in (None, _with_root_on_path()):
        proc = _python(code, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        file, modules = proc.stdout.splitlines()
        assert Path(file).resolve().parent != ROOT / "kernels"
        assert "kernels._name_guard" not in modules  # the guard leaves nothing behind


def test_without_the_distribution_top_level_kernels_is_refused():
    # only the repository root and the standard library on sys.path: no other `kernels` exists
    paths = [str(ROOT), sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]]
    code = f"import sys; sys.path[:] = {paths!r}; import kernels"
    proc = _python(code, isolated=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("ImportError: the folder ")
    assert "import it as 'curvopt.kernels'" in proc.stderr


@pytest.mark.parametrize("env", [None, "root"])
def test_curvopt_kernels_is_an_attribute_of_curvopt(tmp_path, env):
    code = (
        "import curvopt, torch; from pathlib import Path; "
        "k = curvopt.kernels; print(Path(k.__file__).parent); "
        "print(k.multi_dot(torch.ones(3, 5), torch.ones(2, 5)).sum().item())"
    )
    proc = _python(code, cwd=tmp_path, env=_with_root_on_path() if env else None)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder, total = proc.stdout.splitlines()
    assert Path(folder).name == "kernels" and float(total) == 30.0


def test_gpu_check_imports_from_the_source_tree():
    # the GPU machine has no install: PYTHONPATH=. python benchmarks/gpu_check.py
    env = dict(_with_root_on_path(), PYTHONPATH=".")
    code = (
        "import runpy, sys; sys.argv = ['gpu_check.py', '--help']; "
        "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')"
    )
    proc = _python(code, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage" in proc.stdout
    proc = _python(
        "import transformers, curvopt.kernels, kernels; print(kernels.__name__)", env=env
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "kernels", proc.stderr[-2000:]


# --- the locked environment ----------------------------------------------------------------------

LOCK = ROOT / "requirements.lock"
LOCK_TOOL = ROOT / "tools" / "lock.py"


def _check_lock(path):
    cmd = [sys.executable, str(LOCK_TOOL), "check", str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_the_lock_is_well_formed_and_pins_torch():
    proc = _check_lock(LOCK)
    assert proc.returncode == 0, proc.stderr
    assert "torch==2.13.0" in LOCK.read_text().splitlines()


@pytest.mark.skipif(
    os.environ.get("CURVOPT_UNLOCKED") == "1", reason="make test-latest: not the locked environment"
)
def test_every_installed_distribution_is_pinned_at_its_version():
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    unpinned, different = [], []
    for dist in metadata.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-").replace(".", "-")
        if name == "curvopt":
            continue
        if name not in pins:
            unpinned.append(name)
        elif pins[name] != dist.version.split("+")[0]:
            different.append(f"{name} {dist.version} (lock: {pins[name]})")
    assert not unpinned, f"installed but not in the lock: {unpinned}"
    assert not different, f"installed at other versions than the lock's: {different}"


@pytest.mark.parametrize(
    "text, message",
    [
        ("torch==2.13.0\nnumpy>=2\n", ":2: expected `name==version`, got 'numpy>=2'"),
        ("torch==2.13.0\ntorch==2.13.0\n", ":2: torch is pinned twice"),
        ("# nothing\n", "the lock file pins nothing"),
        ("torch == 2.13.0 ; extra\n", ":1: expected `name==version`"),
        (None, "cannot read the lock file"),
    ],
)
def test_a_broken_lock_is_one_line_and_exit_1(tmp_path, text, message):
    path = tmp_path / "requirements.lock"
    if text is not None:
        path.write_text(text)
    proc = _check_lock(path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_pyproject_ships_every_subpackage():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "curvopt").rglob("__init__.py")
    } | {"curvopt.kernels"}
    assert listed == found
    assert config["package-dir"]["curvopt.kernels"] == "kernels"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"gpu", "rl", "bench", "lm", "trl", "all"} <= set(extras)
    install_doc = (ROOT / "docs" / "installation.md").read_text()
    for extra in ("gpu", "rl", "bench", "lm", "trl", "all"):
        assert f"| `{extra}` |" in install_doc
