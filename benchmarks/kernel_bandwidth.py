"""Triton kernels vs the PyTorch/cuBLAS reference, side by side in one run.

For each kernel and problem size the script times our Triton launcher, the PyTorch reference that
the dispatcher falls back to, and (where it differs) the plain cuBLAS call, interleaved round by
round, and prints the medians with the achieved bandwidth (GB/s, bytes that must move at least
once) or throughput (TFLOP/s for gram_diag) against the device's peak.

    python benchmarks/kernel_bandwidth.py            # d up to 1e8, m up to 1024 (within GPU memory)
    python benchmarks/kernel_bandwidth.py --quick    # d up to 1e7, m up to 64

Without CUDA there is nothing to measure: the script says so and runs a small correctness check of
the kernels in Triton's CPU interpreter against float64 (no timings), then exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must be set before curvopt.kernels (and with it the kernels) is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import side_by_side  # noqa: E402

from curvopt import kernels  # noqa: E402
from curvopt.kernels import dispatch  # noqa: E402

# Nominal peaks from the vendors' data sheets: (HBM GB/s, FP32 TFLOP/s, FP64 tensor TFLOP/s).
NOMINAL_PEAKS = {
    "H200": (4800.0, 67.0, 67.0),
    "H100 SXM": (3350.0, 67.0, 67.0),
    "H100 PCIe": (2000.0, 51.0, 51.0),
    "H100": (3350.0, 67.0, 67.0),
    "A100-SXM4-80GB": (2039.0, 19.5, 19.5),
    "A100": (1555.0, 19.5, 19.5),
    "L40S": (864.0, 91.6, 1.4),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="d up to 1e7, m up to 64")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    args, _ = parser.parse_known_args(argv)  # run_all.py passes its own flags through
    return args


# --------------------------------------------------------------------------------------------
# GPU timing
# --------------------------------------------------------------------------------------------


def copy_bandwidth(device="cuda", n: int = 1 << 28, rounds: int = 5) -> float:
    """GB/s of a device-to-device copy of ``n`` float32 (read + write): the achievable bandwidth."""
    src = torch.empty(n, device=device)
    dst = torch.empty_like(src)
    fns = {"copy": lambda s=src, t=dst: t.copy_(s)}
    ms = side_by_side(fns, rounds=rounds, device=device)["copy"]
    del src, dst, fns
    return 2 * n * 4 / ms / 1e6


def nominal_peaks(name: str):
    """(HBM GB/s, FP32 TFLOP/s, FP64 TFLOP/s) of a device name from NOMINAL_PEAKS, or Nones."""
    return next((v for k, v in NOMINAL_PEAKS.items() if k in name), (None, None, None))


def device_peaks():
    """(name, nominal GB/s or None, FP32 TFLOP/s or None, FP64 TFLOP/s or None, copy GB/s)."""
    name = torch.cuda.get_device_name()
    return name, *nominal_peaks(name), copy_bandwidth()


CPU_MEMORY_BUDGET = 1 << 30
"""Bytes a problem may take on the CPU (dry runs use tiny problems only)."""


def fits(nbytes: int, device="cuda") -> bool:
    """Whether a problem of ``nbytes`` fits: 40 % of free GPU memory, or CPU_MEMORY_BUDGET."""
    if torch.device(device).type != "cuda":
        return nbytes < CPU_MEMORY_BUDGET
    free, _ = torch.cuda.mem_get_info()
    return nbytes < 0.4 * free


def rel_diff(a, b) -> float:
    """Norm-wise relative difference of two results (float64), 0 when both are zero."""
    a, b = a.double(), b.double()
    scale = b.norm().item()
    return (a - b).norm().item() / scale if scale > 0 else (a - b).norm().item()


class Table:
    """Rows of (kernel, problem, implementation, ms, rate, % of peak, ours-vs-this speedup).

    Each row is also kept as a dict in :attr:`records` (``benchmarks/gpu_check.py`` reports them
    as JSON); ``rel_diff`` is the norm-wise relative difference of the Triton result from the
    reference result on the same input.
    """

    def __init__(self, peak_gbs, peak_tflops32, peak_tflops64):
        self.peak = {"GB/s": peak_gbs, "FP32": peak_tflops32, "FP64": peak_tflops64}
        self.rows = []
        self.records = []

    def add(self, kernel, problem, results: dict, amount: float, unit: str, rel_diff=None, **meta):
        """``results`` maps implementation -> ms; ``amount`` is bytes (GB/s) or flops."""
        ours = results["triton"]
        for impl, ms in results.items():
            if unit == "GB/s":
                rate, peak = amount / ms / 1e6, self.peak["GB/s"]
            else:
                rate, peak = amount / ms / 1e9, self.peak[unit]
            pct = f"{100 * rate / peak:5.1f}%" if peak else "   n/a"
            label = "TFLOP/s" if unit != "GB/s" else "GB/s"
            speed = f"{ms / ours:6.2f}x" if impl != "triton" else "      "
            diff = f"{rel_diff:8.1e}" if impl == "triton" and rel_diff is not None else " " * 8
            self.rows.append(
                f"{kernel:18s} {problem:34s} {impl:10s} {ms:9.3f} {rate:9.1f} {label:7s} "
                f"{pct} {speed} {diff}"
            )
            self.records.append(
                {
                    "kernel": kernel,
                    "problem": problem,
                    "impl": impl,
                    "ms": ms,
                    "rate": rate,
                    "unit": label,
                    "pct_peak": 100 * rate / peak if peak else None,
                    "ours_faster_by": ms / ours,
                    "rel_diff_vs_reference": rel_diff if impl == "triton" else None,
                    **meta,
                }
            )

    def print(self):
        print(
            f"{'kernel':18s} {'problem':34s} {'impl':10s} {'ms':>9s} {'rate':>9s} {'unit':7s} "
            f"{'%peak':>6s} {'ours faster by':>14s} {'rel.diff':>8s}"
        )
        for row in self.rows:
            print(row)


def bench_multi_dot(table, rounds, ms_grid, ds, dtypes, device="cuda"):
    from curvopt.kernels.multi_dot import multi_dot_reference, multi_dot_triton

    for dtype in dtypes:
        for m in ms_grid:
            for d in ds:
                k = 2
                size = torch.tensor([], dtype=dtype).element_size()
                if not fits(m * d * size + 4 * k * d * 4, device):
                    continue
                G = torch.randn(m, d, device=device).to(dtype)
                V = torch.randn(k, d, device=device)
                Vc = V.to(dtype)
                fns = {
                    "triton": lambda G=G, V=V: multi_dot_triton(G, V),
                    "reference": lambda G=G, V=V: multi_dot_reference(G, V),
                    "cuBLAS": lambda G=G, Vc=Vc: G @ Vc.T,  # V rounded to G's dtype
                }
                diff = rel_diff(fns["triton"](), fns["reference"]())
                res = side_by_side(fns, rounds, device=device)
                nbytes = m * d * size + k * d * 4
                problem = f"m={m} d={d:.0e} {_short(dtype)}"
                meta = dict(m=m, d=d, dtype=_short(dtype))
                table.add("multi_dot k=2", problem, res, nbytes, "GB/s", diff, **meta)
                del G, V, Vc


def bench_combine(table, rounds, ms_grid, ds, dtypes, device="cuda"):
    from curvopt.kernels.combine import combine_reference, combine_triton

    for dtype in dtypes:
        for m in ms_grid:
            for d in ds:
                size = torch.tensor([], dtype=dtype).element_size()
                if not fits(m * d * size + 3 * d * 4, device):
                    continue
                G = torch.randn(m, d, device=device).to(dtype)
                x = torch.randn(d, device=device)
                c = torch.randn(m, device=device)
                cc, xc = c.to(dtype), x.to(dtype)
                fns = {
                    "triton": lambda G=G, x=x, c=c: combine_triton(0.5, x, G, c),
                    "reference": lambda G=G, x=x, c=c: combine_reference(0.5, x, G, c),
                    "cuBLAS": lambda G=G, xc=xc, cc=cc: torch.addmv(xc, G.T, cc, beta=0.5),
                }
                diff = rel_diff(fns["triton"](), fns["reference"]())
                res = side_by_side(fns, rounds, device=device)
                nbytes = m * d * size + 2 * d * 4
                problem = f"m={m} d={d:.0e} {_short(dtype)}"
                meta = dict(m=m, d=d, dtype=_short(dtype))
                table.add("combine", problem, res, nbytes, "GB/s", diff, **meta)
                del G, x, c, cc, xc


def bench_gram_diag(table, rounds, cases, device="cuda"):
    from curvopt.kernels.gram_diag import gram_diag_reference, gram_diag_triton

    for m, d, B, t_dtype in cases:
        nb = 1 if B is None else -(-d // B)
        t_size = torch.tensor([], dtype=t_dtype).element_size()
        if not fits(m * d * 4 + 2 * m * d * t_size + nb * m * m * t_size, device):  # G, T G
            continue
        G = torch.randn(m, d, device=device)
        T = torch.randn(nb, m, m, device=device, dtype=t_dtype) / m**0.5
        fns = {
            "triton": lambda G=G, T=T, B=B: gram_diag_triton(G, T, B),
            "reference": lambda G=G, T=T, B=B: gram_diag_reference(G, T, B),
        }
        if B is None:  # materialize V = T G in one cuBLAS GEMM, then square and sum
            fns["cuBLAS"] = lambda G=G, T=T: (T[0] @ G.to(T.dtype)).square().sum(0)
        diff = rel_diff(fns["triton"](), fns["reference"]())
        res = side_by_side(fns, rounds, device=device)
        unit = "FP64" if t_dtype == torch.float64 else "FP32"
        blocks = "one block" if B is None else f"B={B}"
        problem = f"m={m} d={d:.0e} {blocks} T {_short(t_dtype)}"
        meta = dict(m=m, d=d, block_size=B, dtype=_short(t_dtype))
        table.add("gram_diag", problem, res, 2.0 * m * m * d, unit, diff, **meta)
        del G, T


def bench_softmax_curvature(table, rounds, cases, device="cuda"):
    from curvopt.kernels.softmax_curvature import (
        softmax_curvature_reference,
        softmax_curvature_triton,
    )

    for rows, C, dtype in cases:
        size = torch.tensor([], dtype=dtype).element_size()
        if not fits(8 * rows * C * size, device):
            continue
        z = torch.randn(rows, C, device=device).to(dtype)
        u = torch.randn(rows, C, device=device).to(dtype)
        fns = {
            "triton": lambda z=z, u=u: softmax_curvature_triton(z, u),
            "reference": lambda z=z, u=u: softmax_curvature_reference(z, u),
        }
        diff = rel_diff(fns["triton"](), fns["reference"]())
        res = side_by_side(fns, rounds, device=device)
        problem = f"rows={rows} C={C} {_short(dtype)}"
        meta = dict(rows=rows, classes=C, dtype=_short(dtype))
        table.add("softmax_curv", problem, res, 3 * rows * C * size, "GB/s", diff, **meta)
        del z, u


def _short(dtype):
    return {
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float64: "fp64",
    }[dtype]


def run_gpu(args):
    if not dispatch.triton_available():
        print("CUDA is available but triton is not installed: nothing to compare.")
        return 0
    name, gbs, tf32, tf64, copy_gbs = device_peaks()
    print(f"device: {name}")
    print(f"nominal HBM peak: {gbs or 'unknown'} GB/s; measured device copy: {copy_gbs:.0f} GB/s")
    print(f"nominal FP32 peak: {tf32 or 'unknown'} TFLOP/s; FP64 peak: {tf64 or 'unknown'} TFLOP/s")
    table = Table(gbs or copy_gbs, tf32, tf64)
    if args.quick:
        ms_grid, ds, big_m = [8, 64], [10**6, 10**7], [64]
    else:
        ms_grid, ds, big_m = [8, 64, 1024], [10**6, 10**7, 10**8], [64, 256, 1024]
    dtypes = [torch.float32, torch.bfloat16]
    bench_multi_dot(table, args.rounds, ms_grid, ds, dtypes)
    bench_combine(table, args.rounds, ms_grid, ds, dtypes)
    gram_cases = [(m, 10**6, None, torch.float32) for m in big_m]
    gram_cases += [(64, 10**7, 128, torch.float32), (64, 10**7, 128, torch.float64)]
    if not args.quick:
        gram_cases += [(1024, 10**7, None, torch.float32), (1024, 10**6, None, torch.float64)]
    bench_gram_diag(table, args.rounds, gram_cases)
    sm_cases = [(4096, 32000, torch.bfloat16), (65536, 1000, torch.float32)]
    if not args.quick:
        sm_cases += [(512, 256000, torch.bfloat16), (4096, 32000, torch.float32)]
    bench_softmax_curvature(table, args.rounds, sm_cases)
    table.print()
    print("GB/s counts the bytes that must move once (G, vectors, output); 'ours faster by' is")
    print("that implementation's time divided by the Triton kernel's time (>1: Triton is faster);")
    print("'rel.diff' is the norm-wise difference of the Triton result from the reference's.")
    return 0


def run_cpu_sanity():
    """Correctness of each kernel in Triton's interpreter vs float64 (no timings on a CPU)."""
    print("No CUDA device: GPU figures unmeasured (Triton kernels need an NVIDIA GPU).")
    if not dispatch.triton_available():
        print("triton is not installed either: nothing to check. Exiting.")
        return 0
    if not dispatch.kernels_interpreted():
        print("TRITON_INTERPRET was set to something else than 1: skipping the CPU check.")
        return 0
    from curvopt.kernels import triton_impl

    print("CPU sanity check in Triton's interpreter (max relative error vs float64):")
    gen = torch.Generator().manual_seed(0)
    m, d = 33, 1000
    G = torch.randn(m, d, generator=gen).to(torch.bfloat16)
    V = torch.randn(2, d, generator=gen)
    x, c = torch.randn(d, generator=gen), torch.randn(m, generator=gen, dtype=torch.float64)
    T = torch.randn(8, m, m, generator=gen) / m**0.5
    z, u = 3 * torch.randn(16, 3000, generator=gen), torch.randn(16, 3000, generator=gen)
    G64, T64 = G.double(), T.double()
    Gb = torch.nn.functional.pad(G64, (0, 8 * 128 - d)).reshape(m, 8, 128).permute(1, 0, 2)
    p = torch.softmax(z.double(), -1)
    checks = [
        (
            "multi_dot",
            triton_impl.multi_dot,
            kernels.multi_dot_reference,
            (G, V),
            G64 @ V.T.double(),
        ),
        (
            "combine",
            triton_impl.combine,
            kernels.combine_reference,
            (0.5, x, G, c),
            0.5 * x.double() + G64.T @ c,
        ),
        (
            "gram_diag B=128",
            triton_impl.gram_diag,
            kernels.gram_diag_reference,
            (G, T, 128),
            (T64 @ Gb).square().sum(1).reshape(-1)[:d],
        ),
        (
            "softmax_curvature",
            triton_impl.softmax_curvature,
            kernels.softmax_curvature_reference,
            (z, u),
            p * u.double() - p * (p * u.double()).sum(-1, keepdim=True),
        ),
    ]
    print(f"{'kernel':18s} {'triton':>10s} {'reference':>10s}")
    worst = 0.0
    for name, ours, ref, args, exact in checks:
        errs = []
        for fn in (ours, ref):
            out = fn(*args).double()
            errs.append(((out - exact).abs().max() / exact.abs().max()).item())
        worst = max(worst, *errs)
        print(f"{name:18s} {errs[0]:10.2e} {errs[1]:10.2e}")
    if worst > 1e-4:
        print(f"error {worst:.2e} is larger than float32 rounding: something is wrong")
        return 1
    return 0


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_gpu(args) if HAS_CUDA else run_cpu_sanity()


if __name__ == "__main__":
    sys.exit(main())
