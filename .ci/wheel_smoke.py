"""Smoke test of an installed curvopt wheel, run from outside the source tree by `make wheel-check`.

Usage: ``python wheel_smoke.py plain`` (the wheel alone: torch, numpy, scipy) or
``python wheel_smoke.py extras`` (the wheel with ``[bench,gpu]``). Exits 1 with the reason on the
first failed check.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def check(ok, what):
    if not ok:
        sys.exit(f"wheel smoke: FAILED: {what}")
    print(f"wheel smoke: ok: {what}")


def run(*argv, env=None):
    curvopt = Path(sys.executable).parent / "curvopt"
    return subprocess.run([str(curvopt), *argv], capture_output=True, text=True, env=env)


def main(mode):
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    os.environ["TRITON_INTERPRET"] = "1" if mode == "extras" else "0"
    import torch

    import curvopt
    from curvopt import kernels

    for module in (curvopt, kernels):
        check(site in Path(module.__file__).resolve().parents, f"{module.__name__} from the wheel")
    G, V = torch.randn(7, 300), torch.randn(3, 300)
    expected = kernels.multi_dot_reference(G, V)
    check(torch.allclose(kernels.multi_dot(G, V), expected, atol=1e-4), "one kernel call")
    help_ = run("--help")
    check(help_.returncode == 0 and "bench" in help_.stdout, "curvopt --help")
    if mode == "plain":
        check(not kernels.use_triton(G), "no triton in a plain install: the reference runs")
        demo = run("demo")
        lines = demo.stderr.strip().splitlines()
        check(demo.returncode == 2 and len(lines) == 1, f"curvopt demo refused in 1 line: {lines}")
        check('pip install "curvopt[bench]"' in lines[0], "the refusal names the extra")
    else:
        check(kernels.use_triton(G), "Triton's interpreter runs the kernel")
        demo = run("demo", "--k", "2", env=dict(os.environ, OMP_NUM_THREADS="1"))
        check(demo.returncode == 0 and "dense eigvalsh" in demo.stdout, "curvopt demo --k 2")


if __name__ == "__main__":
    if sys.argv[1:] not in (["plain"], ["extras"]):
        sys.exit("usage: wheel_smoke.py plain|extras")
    main(sys.argv[1])
