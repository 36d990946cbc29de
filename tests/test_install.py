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
