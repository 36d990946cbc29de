"""Compile every kernel for an H100 (sm_90) without a GPU: catches what the interpreter cannot.

Triton's interpreter runs the kernels' Python in numpy; it does not check that they lower to GPU
code. Here each kernel goes through Triton's real compiler and ``ptxas`` (shipped with Triton)
for the configurations the launchers pick on CUDA, and ``ptxas -v`` must report no register
spills. Slow (several seconds per kernel), so ``make test-all`` runs it. Triton's compiler does
not work in a process that imported Triton under ``TRITON_INTERPRET=1``, so there this file
re-runs itself in a fresh process without it.
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from curvopt.kernels import dispatch

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.slow
INTERPRETED = dispatch.kernels_interpreted()
compiler_process = pytest.mark.skipif(INTERPRETED, reason="runs in a fresh process instead")


@pytest.mark.skipif(not INTERPRETED, reason="this process compiles directly")
def test_compile_in_a_process_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "slow", "-p", "no:cacheprovider", __file__]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def _compile_sm90(kernel, signature, constexprs, num_warps):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    src = ASTSource(kernel, signature, constexprs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}
    )
    ptx = compiled.asm["ptx"]
    ptxas = triton.knobs.nvidia.ptxas_blackwell.path
    report = subprocess.run(
        [ptxas, "-v", "--gpu-name", "sm_90a", "-", "-o", "/dev/null"],
        input=ptx,
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills and max(spills) == 0, report


def _ints(*names):
    return {name: "i32" for name in names}


@compiler_process
@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_multi_dot_compiles(acc, k):
    from curvopt.kernels.multi_dot import _multi_dot_config, _multi_dot_kernel

    block_m, block_d, warps = _multi_dot_config(torch.device("cuda"), 1024, k, acc)
    acc_t = "fp32" if acc == torch.float32 else "fp64"
    sig = {"G": "*bf16", "V": "*fp32", "P": f"*{acc_t}"}
    sig |= _ints("m", "d", "cols_per_split", "stride_gm", "stride_gd", "stride_vk", "stride_vd")
    consts = {"K": k, "K_PAD": k, "BLOCK_M": block_m, "BLOCK_D": block_d}
    _compile_sm90(_multi_dot_kernel, sig, consts, warps)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("k,k_pad", [(1, 1), (3, 4)])
@compiler_process
def test_combine_compiles(acc, k, k_pad):
    from curvopt.kernels.combine import _combine_config, _combine_kernel

    block_m, block_d, warps = _combine_config(torch.device("cuda"), 1024, k_pad, acc)
    acc_t = "fp32" if acc == torch.float32 else "fp64"
    sig = {"X": "*fp32", "G": "*bf16", "C": f"*{acc_t}", "Y": "*fp32", "a": f"*{acc_t}"}
    sig |= _ints("m", "d", "stride_xd", "stride_xk", "stride_gm", "stride_gd")
    sig |= _ints("stride_cm", "stride_ck")
    consts = {"K": k, "K_PAD": k_pad, "BLOCK_M": block_m, "BLOCK_D": block_d}
    _compile_sm90(_combine_kernel, sig, consts, warps)


@pytest.mark.parametrize("acc", [torch.float32, torch.float64])
@pytest.mark.parametrize("use_dot", [True, False])
@compiler_process
def test_gram_diag_compiles(acc, use_dot):
    from curvopt.kernels.gram_diag import (
        _gram_diag_config,
        _gram_diag_kernel,
        _gram_diag_use_dot,
    )

    cuda = torch.device("cuda")
    if use_dot and not _gram_diag_use_dot(cuda, acc):
        pytest.skip(f"this Triton ({triton.__version__}) cannot lower a {acc} tl.dot: not used")
    block_i, block_l, block_d, warps = _gram_diag_config(cuda, 1024, 10**6, acc, use_dot)
    acc_t = "fp32" if acc == torch.float32 else "fp64"
    sig = {"G": "*bf16", "T": f"*{acc_t}", "S": f"*{acc_t}"}
    sig |= _ints("m", "d", "block_size", "tiles_per_block", "stride_gm", "stride_gd")
    sig |= _ints("stride_tb", "stride_ti", "stride_tl")
    consts = {"BLOCK_I": block_i, "BLOCK_L": block_l, "BLOCK_D": block_d, "USE_DOT": use_dot}
    _compile_sm90(_gram_diag_kernel, sig, consts, warps)


@pytest.mark.parametrize("C", [1000, 4096, 256000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@compiler_process
def test_softmax_curvature_compiles(C, dtype):
    from curvopt.kernels.softmax_curvature import (
        _softmax_curvature_config,
        _softmax_curvature_kernel,
    )

    float64 = dtype == torch.float64
    block_r, block_c, warps = _softmax_curvature_config(torch.device("cuda"), 4096, C, float64)
    t = "fp64" if float64 else "bf16"
    sig = {"Z": f"*{t}", "U": f"*{t}", "Out": f"*{t}"}
    sig |= _ints("n_rows", "C", "stride_zr", "stride_zc", "stride_ur", "stride_uc")
    consts = {"FLOAT64": float64, "ONE_TILE": C <= block_c, "BLOCK_R": block_r, "BLOCK_C": block_c}
    _compile_sm90(_softmax_curvature_kernel, sig, consts, warps)
