"""Every GPU figure of curvopt in one command that fits a short device lease (``make gpu-check``).

Five parts run in order, each in a process of its own (forked from a server that imported torch
once) with its own time budget (seconds, sized for an NVIDIA H200; 440 s in all, under 8 minutes
with process starts):

1. ``correctness`` (150 s): the kernel tests natively through pytest (``-m "not slow"
   tests/kernels``), the GPU-only cases of ``tests/kernels/test_gpu_only.py`` first (dispatch
   picks Triton on CUDA tensors, all storage dtypes, more than 2^31 elements, strided inputs).
2. ``kernels`` (90 s): GB/s of ``multi_dot``, ``combine`` and ``softmax_curvature`` and TFLOP/s
   of ``gram_diag`` next to a measured device-to-device copy, cuBLAS and the PyTorch reference
   (the timing and tables of ``benchmarks/kernel_bandwidth.py``), each Triton result checked
   against the reference's.
3. ``mfac_window`` (80 s): the sliding-window M-FAC step against the two-pass floor
   (``benchmarks/mfac.py``) for d in {1e7, 1e8}, m in {32, 256, 1024}, fp32 and bf16 windows,
   and the static setup against its GEMM ``G G^T``; at d = 1e7 one window step is checked
   against a static M-FAC set up afresh on the same buffer.
4. ``curvature_products`` (70 s): HVP and GGN-vector products against one gradient
   (``benchmarks/curvature_products.py``) for its MLP and CNN and a GPT-2-sized model (GPT-2
   small, 124M parameters, random init, eager attention), ours vs curvlinops where installed.
5. ``optimizer_step`` (50 s): ``MFAC.step()`` (m = 32, bf16 window) against
   ``torch.optim.Adam(fused=True).step()`` on that model, and one whole training iteration of each.

A part checks its clock between cases (part 1: between tests): past its budget it stops, says so
in the report, and the next part starts (a case that hangs is killed 15 s after the budget).
The report goes to ``--out`` (default ``results/gpu/``): ``gpu_report.md`` and
``gpu_report.json`` (parts, rows, notes, the goals of the issue with their verdicts), and the
summary is printed.

Exit status, after the report is written: 0; 1 on any correctness failure (a failed kernel test, a
Triton result off the reference, a window off the static M-FAC); 2 when a part crashed.

Without CUDA, or with ``--dry-run``, the same parts run as a *dry run*: tiny sizes on the CPU,
the kernels in Triton's interpreter, the GPU-only tests rehearsed at small sizes. It costs about
30 s of CPU time and checks that the command still works; its numbers measure nothing and every
goal stays unmeasured. On the GPU machine (no venv, no registry access), from the source tree:

    CURVOPT_NO_VENV=1 make gpu-check        # = PYTHONPATH=. python3 benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # loaded from elsewhere (the tests): the sibling scripts' folder
    sys.path.insert(0, str(HERE))
import harness  # noqa: E402

SCHEMA = "curvopt.gpu_check/1"
GRACE_S = 15.0
PARTS = {
    1: ("correctness", "Kernel tests on the device", 150.0),
    2: ("kernels", "Kernels vs the bandwidth limit, cuBLAS and the reference", 90.0),
    3: ("mfac_window", "M-FAC window step vs the two-pass floor; static setup vs GEMM", 80.0),
    4: ("curvature_products", "Curvature products vs one gradient", 70.0),
    5: ("optimizer_step", "MFAC.step() vs Adam(fused=True).step()", 50.0),
}
DAMP = 1e-4
# Tolerance on the norm-wise difference of two results that read the same stored data and
# accumulate in float32 or wider (half-precision outputs add their own rounding).
TOL, TOL_HALF_OUT = 1e-3, 2e-2


# ------------------------------------------------------------------------------------------------
# Problem sizes: the GPU programme and its dry-run miniature
# ------------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """Problem sizes of one mode; ``dtype`` names are resolved in the part processes."""

    rounds: int
    copy_elements: int
    multi_dot: list  # (m, d, dtype) cases, each also run for combine
    gram_diag: list  # (m, d, block size or None, T dtype)
    softmax: list  # (rows, classes, dtype)
    window: list  # (d, dtype, m), in this order
    static_max_d: float  # static setup timed up to this d (its GEMMs cost m^2 d)
    digits: tuple  # (samples, batch) for the MLP and CNN
    gpt2: dict  # GPT2Config keywords
    tokens: tuple  # (batch, sequence length)
    window_m: int = 32
    rounds_products: int = 5
    notes: list = field(default_factory=list)


GPU_SIZES = Sizes(
    rounds=5,
    copy_elements=1 << 28,
    multi_dot=[(8, 10**8, "fp32"), (8, 10**8, "bf16"), (1024, 10**7, "bf16")],
    gram_diag=[(1024, 10**6, None, "fp32"), (256, 10**7, None, "fp32"), (64, 10**7, 128, "fp64")],
    softmax=[(4096, 32000, "bf16"), (512, 256000, "bf16"), (65536, 1000, "fp32")],
    window=[
        (d, dtype, m) for d in (10**7, 10**8) for dtype in ("fp32", "bf16") for m in (32, 256, 1024)
    ],
    static_max_d=1e7,
    digits=(1024, 512),
    gpt2={},  # GPT-2 small: 12 layers, width 768, 12 heads, vocabulary 50257 (124M parameters)
    tokens=(8, 256),
)

DRY_SIZES = Sizes(
    rounds=1,
    copy_elements=1 << 16,
    multi_dot=[(4, 3000, "fp32"), (5, 2000, "bf16")],
    gram_diag=[(8, 1000, None, "fp32"), (8, 1000, 128, "fp64")],
    softmax=[(4, 3000, "bf16")],
    window=[(d, dtype, m) for d in (2000, 3000) for dtype in ("fp32", "bf16") for m in (4,)],
    static_max_d=2500,  # so that d = 3000 takes the chunked-Gram path of d = 1e8
    digits=(64, 32),
    gpt2=dict(n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64),
    tokens=(2, 16),
    window_m=4,
    rounds_products=1,
)


def torch_dtype(name: str):
    import torch

    return {
        "fp32": torch.float32,
        "bf16": torch.bfloat16,
        "fp16": torch.float16,
        "fp64": torch.float64,
    }[name]


# ------------------------------------------------------------------------------------------------
# One part, in its own process
# ------------------------------------------------------------------------------------------------


class Part:
    """The record of one part: rows, notes, correctness failures; saved after every change."""

    def __init__(self, number: int, path: Path, deadline: float, dry_run: bool):
        name, title, budget = PARTS[number]
        self.path, self.deadline, self.dry_run = path, deadline, dry_run
        self.data = {
            "number": number,
            "name": name,
            "title": title,
            "status": "running",
            "rows": [],
            "notes": [],
            "correctness_failures": [],
            "info": {},
            "over_budget": False,
        }
        self.save()

    def save(self) -> None:
        harness.write_json(self.path, self.data)  # atomic: a killed part leaves its last record

    def row(self, **fields) -> None:
        self.data["rows"].append(fields)
        self.save()

    def note(self, text: str) -> None:
        print(f"note: {text}", flush=True)
        self.data["notes"].append(text)
        self.save()

    def fail(self, text: str) -> None:
        print(f"CORRECTNESS FAILURE: {text}", flush=True)
        self.data["correctness_failures"].append(text)
        self.save()

    def info(self, **fields) -> None:
        self.data["info"].update(fields)
        self.save()

    def time_left(self) -> float:
        return self.deadline - time.time()

    def over(self, next_case: str) -> bool:
        """Whether the budget is spent; if so, note which case would have run next."""
        if self.time_left() > 0:
            return False
        self.data["over_budget"] = True
        self.note(f"over budget: stopped before {next_case}")
        return True

    def check_close(self, what: str, diff: float, tol: float) -> None:
        if not diff <= tol:  # also catches NaN
            self.fail(f"{what}: relative difference {diff:.2e} > {tol:.0e}")


def load_benchmark(name: str):
    """Import ``benchmarks/<name>.py`` as a module (its helpers are shared, not copied)."""
    spec = importlib.util.spec_from_file_location(f"curvopt_benchmark_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize_junit(path: Path) -> tuple[dict, list, float]:
    """Per test module ``[passed, failed, skipped]``, the failed tests' names, and the seconds
    from a pytest ``--junitxml`` report (errors count as failures)."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts, failed, seconds = {}, [], 0.0
    for suite in suites:
        seconds += float(suite.get("time", "0"))
        for case in suite.iter("testcase"):
            module = case.get("classname", "?").split(".")[-1]
            tally = counts.setdefault(module, [0, 0, 0])
            if case.find("failure") is not None or case.find("error") is not None:
                tally[1] += 1
                failed.append(f"{module}::{case.get('name')}")
            elif case.find("skipped") is not None:
                tally[2] += 1
            else:
                tally[0] += 1
    return counts, failed, seconds


class PytestBudget:
    """pytest plugin: the GPU-only tests first; past the deadline, stop after the current test.

    pytest then ends normally and its junit report holds every test that ran.
    """

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.stopped_after = None
        self.ran = 0

    def pytest_collection_modifyitems(self, items):
        items.sort(key=lambda item: "test_gpu_only" not in item.nodeid)  # stable

    def pytest_runtest_teardown(self, item):
        self.ran += 1
        if time.time() > self.deadline and self.stopped_after is None:
            self.stopped_after = self.ran
            item.session.shouldstop = "gpu_check: part 1 is over its time budget"


def part_correctness(part: Part, sizes: Sizes, out: Path) -> None:
    """Part 1: pytest over the kernel tests, natively on CUDA (rehearsal in a dry run)."""
    junit = out / "logs" / "part1_junit.xml"
    junit.unlink(missing_ok=True)
    if part.dry_run:
        os.environ["CURVOPT_GPU_REHEARSAL"] = "1"  # TRITON_INTERPRET=1 is set already
        targets = ["tests/kernels/test_gpu_only.py"]
        part.note("dry run: only the GPU-only tests, rehearsed at small sizes in the interpreter")
    else:
        targets = ["tests/kernels"]
    args = ["-q", "-m", "not slow", "-p", "no:cacheprovider", f"--junitxml={junit}", *targets]
    part.info(command="pytest " + " ".join(args))
    import pytest  # in this process: torch is imported already; the output goes to the log

    os.chdir(ROOT)
    budget = PytestBudget(part.deadline)
    status = int(pytest.main(args, plugins=[budget]))
    if budget.stopped_after is not None:
        part.data["over_budget"] = True
        part.note(f"over budget: pytest stopped after {budget.stopped_after} tests")
    if not junit.exists():
        part.fail(f"pytest exited {status} without a report (see the part's log)")
        return
    counts, failed, seconds = summarize_junit(junit)
    for name in failed:
        part.fail(name)
    for module, (passed, n_failed, skipped) in sorted(counts.items()):
        part.row(module=module, passed=passed, failed=n_failed, skipped=skipped)
    gpu_only = counts.get("test_gpu_only", [0, 0, 0])
    if gpu_only[0] == 0 or gpu_only[2] > 0:  # they run first, even when over budget
        part.fail(f"the GPU-only tests did not all run (passed, failed, skipped = {gpu_only})")
    if status != 0 and budget.stopped_after is None and not part.data["correctness_failures"]:
        part.fail(f"pytest exited {status} (see the part's log)")
    part.info(seconds_in_pytest=seconds)


def part_kernels(part: Part, sizes: Sizes, out: Path) -> None:
    """Part 2: each kernel next to a device copy, cuBLAS and the reference."""
    import torch

    bench = load_benchmark("kernel_bandwidth")
    from curvopt.kernels import dispatch

    device = _device()
    if not dispatch.triton_available():
        part.fail("triton is not installed: the kernels cannot run")
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run)"
    gbs, tf32, tf64 = bench.nominal_peaks(name)
    copy_gbs = bench.copy_bandwidth(device, n=sizes.copy_elements)
    part.info(device=name, nominal_gbs=gbs, nominal_fp32_tflops=tf32, nominal_fp64_tflops=tf64)
    part.info(copy_gbs=copy_gbs)
    copy_ms = 2 * sizes.copy_elements * 4 / copy_gbs / 1e6
    problem = f"{sizes.copy_elements} fp32"
    part.row(kernel="device copy", problem=problem, impl="copy_", ms=copy_ms, rate=copy_gbs)
    table = bench.Table(gbs or copy_gbs, tf32, tf64)
    cases = [("multi_dot", (m, d, dt)) for m, d, dt in sizes.multi_dot]
    cases += [("combine", (m, d, dt)) for m, d, dt in sizes.multi_dot]
    cases += [("gram_diag", case) for case in sizes.gram_diag]
    cases += [("softmax_curvature", case) for case in sizes.softmax]
    for kernel, case in cases:
        if part.over(f"{kernel} {case}"):
            break
        before = len(table.records)
        try:
            _kernel_case(bench, table, sizes.rounds, kernel, case, device)
        except torch.cuda.OutOfMemoryError as err:
            part.note(f"{kernel} {case}: out of memory ({str(err).splitlines()[0][:160]})")
            del table.records[before:], table.rows[before:]
            _free_memory()
            continue
        new = table.records[before:]
        if not new:
            part.note(f"{kernel} {case}: skipped, does not fit in 40 % of free memory")
        for record in new:
            if record["unit"] == "GB/s":
                record["pct_of_copy"] = 100 * record["rate"] / copy_gbs
            if record["impl"] == "triton":
                half_out = kernel == "softmax_curvature" and case[-1] in ("bf16", "fp16")
                tol = TOL_HALF_OUT if half_out else TOL
                part.check_close(
                    f"{kernel} {record['problem']}", record["rel_diff_vs_reference"], tol
                )
            part.row(**record)
        _free_memory()
    table.print()


def _kernel_case(bench, table, rounds: int, kernel: str, case: tuple, device) -> None:
    """One problem of one kernel through the matching ``bench_*`` of kernel_bandwidth.py."""
    if kernel in ("multi_dot", "combine"):
        m, d, dt = case
        fn = getattr(bench, f"bench_{kernel}")
        fn(table, rounds, [m], [d], [torch_dtype(dt)], device=device)
    elif kernel == "gram_diag":
        m, d, B, dt = case
        bench.bench_gram_diag(table, rounds, [(m, d, B, torch_dtype(dt))], device=device)
    else:
        rows, C, dt = case
        bench.bench_softmax_curvature(table, rounds, [(rows, C, torch_dtype(dt))], device=device)


def part_mfac_window(part: Part, sizes: Sizes, out: Path) -> None:
    """Part 3: window step vs the two-pass floor; static setup vs its GEMM."""
    import torch

    kbench, mbench = load_benchmark("kernel_bandwidth"), load_benchmark("mfac")
    device = _device()
    gen = torch.Generator(device=device).manual_seed(0)
    for d, dt, m in sizes.window:
        case = f"d={d:.0e} m={m} {dt}"
        if part.over(case):
            break
        dtype = torch_dtype(dt)
        size = torch.tensor([], dtype=dtype).element_size()
        if not kbench.fits(m * d * size, device):
            part.note(f"{case}: skipped, the window does not fit in 40 % of free memory")
            continue
        try:
            row = _window_case(kbench, mbench, sizes, gen, device, d, dt, m)
        except torch.cuda.OutOfMemoryError as err:
            part.note(f"{case}: out of memory ({str(err).splitlines()[0][:160]})")
        else:
            if "rel_diff_vs_static" in row:
                diff, tol = row["rel_diff_vs_static"], row["tol_vs_static"]
                part.check_close(f"window IHVP vs static M-FAC, {case}", diff, tol)
            part.row(**row)
        _free_memory()
    if any(d > sizes.static_max_d for d, _, _ in sizes.window):
        part.note(
            f"static setup timed and the window checked against a static M-FAC for d <= "
            f"{sizes.static_max_d:g}; beyond, the window's Gram is summed over column chunks"
        )


def _window_case(kbench, mbench, sizes: Sizes, gen, device, d: int, dt: str, m: int) -> dict:
    """One row of part 3: static setup vs GEMM (up to ``static_max_d``), window vs floor."""
    import torch

    from curvopt.mfac import StaticMFAC

    dtype = torch_dtype(dt)
    G = mbench.random_rows(m, d, gen, device=device, dtype=dtype)
    row = dict(d=d, m=m, window_dtype=dt)
    if d <= sizes.static_max_d:
        fns = {"gemm": lambda: G @ G.T, "setup": lambda: StaticMFAC(G, DAMP)}
        t = harness.side_by_side(fns, rounds=3, inner=1, device=device)
        row.update(gemm_ms=t["gemm"], static_setup_ms=t["setup"])
        row.update(setup_over_gemm=t["setup"] / t["gemm"])
        K = StaticMFAC(G, DAMP).K[0]
    else:  # the static setup's products would convert all of a half-precision G at once
        K = mbench.gram_float64(G)
    window = mbench.window_state(G, K, DAMP)
    del K
    if d <= sizes.static_max_d:
        # One window step (a row replaced, A^{-1} updated by Woodbury's identity) against a
        # static M-FAC set up afresh on the updated buffer (a Cholesky solve). g0 lies in the
        # span of the buffer, where float32 cancellation is about eps32 * R, with
        # R = lambda_max(F) / damp = 1 + 1 / (m damp) for unit-norm rows.
        g0 = torch.randn(d, generator=gen, device=device) / d**0.5
        diff = kbench.rel_diff(window.add_and_ihvp(g0), StaticMFAC(G, DAMP).ihvp(g0))
        row.update(rel_diff_vs_static=diff)
        row.update(tol_vs_static=max(TOL, 50 * 2.0**-24 * (1 + 1 / (m * DAMP))))
        del g0
    g = torch.randn(d, generator=gen, device=device) / d**0.5
    v = torch.randn(d, generator=gen, device=device).to(dtype)
    c = torch.randn(m, generator=gen, device=device).to(dtype)
    fns = {
        "floor": lambda: mbench.two_pass_floor(G, v, c),
        "step": lambda: window.add_and_ihvp(g),
        # MFAC.step's call: the row written into next_row() and checked by the optimizer, so
        # no copy of g and no finiteness check (whose host synchronization "raise" costs)
        "in_place": lambda: window.add_and_ihvp(window.next_row(), on_nonfinite="ignore"),
    }
    t = harness.side_by_side(fns, rounds=sizes.rounds, device=device)
    row.update(floor_ms=t["floor"], step_ms=t["step"], step_over_floor=t["step"] / t["floor"])
    row.update(in_place_ms=t["in_place"], in_place_over_floor=t["in_place"] / t["floor"])
    return row


def _digits(sizes: Sizes, part: Part, bench):
    import torch

    num, batch = sizes.digits
    try:
        return bench.digits_data(num, batch)
    except ImportError:
        part.note("scikit-learn missing: random inputs of the digits' shape (64 features)")
        gen = torch.Generator().manual_seed(0)
        X, y = torch.rand(num, 64, generator=gen), torch.randint(0, 10, (num,), generator=gen)
        return list(zip(X.split(batch), y.split(batch)))


def gpt2_problem(sizes: Sizes, device):
    """(model returning flat logits, [(tokens, next tokens)]) or None without transformers."""
    import torch
    from torch import nn

    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None

    config = GPT2Config(
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        attn_implementation="eager",
        **sizes.gpt2,
    )
    if config.vocab_size <= config.bos_token_id:  # tiny dry-run vocabulary
        config.bos_token_id = config.eos_token_id = 0
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(config)

    class FlatLogits(nn.Module):
        """GPT-2 as ``tokens -> (batch * length, vocabulary)`` logits (eval: no dropout)."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, ids):
            logits = self.lm(input_ids=ids, use_cache=False).logits
            return logits.reshape(-1, logits.shape[-1])

    model = FlatLogits(lm).to(device).eval()
    batch, length = sizes.tokens
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (batch, length + 1), generator=gen).to(device)
    data = [(tokens[:, :-1].contiguous(), tokens[:, 1:].reshape(-1))]
    attention = getattr(lm.config, "_attn_implementation", "?")
    name = f"GPT-2 {config.n_layer}x{config.n_embd} ({attention}), tokens {batch}x{length}"
    return name, model, data


def part_curvature_products(part: Part, sizes: Sizes, out: Path) -> None:
    """Part 4: HVP and GGN-vp vs one gradient for the MLP, the CNN and GPT-2."""
    bench = load_benchmark("curvature_products")
    device = _device()
    part.info(curvlinops=bench.curvlinops is not None)
    if bench.curvlinops is None:
        part.note("curvlinops is not installed: its rows are skipped")
    digits = [(X.to(device), y.to(device)) for X, y in _digits(sizes, part, bench)]
    problems = [("MLP 64-256-256-10", bench.make_mlp, digits), ("CNN", bench.make_cnn, digits)]
    problems.append(("GPT-2", None, None))
    for name, make, data in problems:
        if part.over(name):
            break
        if make is None:
            built = gpt2_problem(sizes, device)
            if built is None:
                part.note("transformers is not installed: the GPT-2 rows are skipped")
                continue
            name, model, data = built
        else:
            model = make().to(device)
        try:
            _products_of_model(part, bench, sizes, name, model, data)
        except Exception as err:  # e.g. out of memory: the other models still run
            part.note(f"{name}: failed ({type(err).__name__}: {str(err).splitlines()[0][:160]})")
        del model, data
        _free_memory()


def _products_of_model(part: Part, bench, sizes: Sizes, name: str, model, data) -> None:
    """Rows of part 4 for one model: each product's wall time and its ratio to one gradient."""
    d = sum(p.numel() for p in model.parameters())
    methods = bench.build_methods(model, data, compile_=False)
    for key, (kind, fn) in list(methods.items()):
        if kind == "failed":
            continue
        try:
            fn()
        except Exception as err:  # one failing product must not hide the others
            methods[key] = ("failed", f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
    times = bench.measure(methods, sizes.rounds_products, sync=_sync)
    base = times["gradient (eager)"][1]
    for method, (kind, fn) in methods.items():
        if kind == "failed":
            part.note(f"{name}: {method} failed ({fn})")
            continue
        wall = times[method][1]
        part.row(model=name, d=d, method=method, kind=kind, ms=1e3 * wall, x_gradient=wall / base)


def part_optimizer_step(part: Part, sizes: Sizes, out: Path) -> None:
    """Part 5: MFAC.step() vs Adam(fused=True).step() on GPT-2; whole iterations."""
    import torch
    from torch import nn

    from curvopt.optim import MFAC

    load_benchmark("kernel_bandwidth")  # without CUDA its import selects the Triton interpreter
    device = _device()
    built = gpt2_problem(sizes, device)
    if built is None:
        if not part.dry_run:
            part.note("transformers is not installed: part 5 skipped")
            part.data["status"] = "skipped"
            return
        part.note("dry run without transformers: a small MLP stands in for GPT-2")
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
        data = [(torch.randn(16, 32, device=device), torch.randint(0, 10, (16,), device=device))]
        name = "MLP stand-in"
    else:
        name, model, data = built
    X, y = data[0]
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    loss_fn = nn.CrossEntropyLoss()
    # Tiny steps keep the repeated updates finite; 'skip' is the path without host syncs.
    mfac = MFAC(
        params, lr=1e-7, m=sizes.window_m, damp=1e-2, window_dtype=torch.bfloat16, nonfinite="skip"
    )
    try:
        adam = torch.optim.Adam(params, lr=1e-7, fused=True)
        adam_name = "Adam(fused=True)"
    except (RuntimeError, ValueError) as err:
        part.note(f"fused Adam unavailable here ({err}); plain Adam instead")
        adam = torch.optim.Adam(params, lr=1e-7)
        adam_name = "Adam"

    def loss():
        return loss_fn(model(X), y)

    for p in params:
        p.grad = None
    loss().backward()
    steps = harness.side_by_side(
        {"mfac": mfac.step, "adam": adam.step}, rounds=sizes.rounds, device=device
    )

    def iteration(opt):
        def run():
            opt.zero_grad()
            loss().backward()
            opt.step()

        return run

    def forward_backward():
        model.zero_grad()
        loss().backward()

    iters = harness.side_by_side(
        {"mfac": iteration(mfac), "adam": iteration(adam), "fb": forward_backward},
        rounds=sizes.rounds,
        inner=1,
        device=device,
    )
    adam_state = sum(
        t.numel() * t.element_size()
        for state in adam.state.values()
        for t in state.values()
        if torch.is_tensor(t)
    )
    part.row(
        model=name,
        d=d,
        window=f"m={sizes.window_m} bf16, nonfinite=skip",
        mfac_step_ms=steps["mfac"],
        adam_step_ms=steps["adam"],
        step_ratio=steps["mfac"] / steps["adam"],
        mfac_iteration_ms=iters["mfac"],
        adam_iteration_ms=iters["adam"],
        forward_backward_ms=iters["fb"],
        iteration_ratio=iters["mfac"] / iters["adam"],
        mfac_state_mb=mfac.memory_bytes() / 2**20,
        adam_state_mb=adam_state / 2**20,
    )
    part.info(adam=adam_name)
    if not all(torch.isfinite(p).all() for p in params):
        part.note("parameters became non-finite during the timing (timings still valid)")


PART_FUNCTIONS = {
    1: part_correctness,
    2: part_kernels,
    3: part_mfac_window,
    4: part_curvature_products,
    5: part_optimizer_step,
}


def run_part(number: int, out: Path, deadline: float, dry_run: bool) -> int:
    """Body of a part process: run the part and leave its record in ``out/parts``."""
    import torch

    if dry_run:
        torch.set_num_threads(1)
    torch.manual_seed(number)  # reproducible inputs where a benchmark draws from the global RNG
    part = Part(number, out / "parts" / f"part{number}.json", deadline, dry_run)
    sizes = DRY_SIZES if dry_run else GPU_SIZES
    try:
        PART_FUNCTIONS[number](part, sizes, out)
    except Exception:
        part.data["status"] = "error"
        part.data["notes"].append("crashed: " + traceback.format_exc(limit=6)[-1500:])
        part.save()
        traceback.print_exc()
        return 0
    part.data["cpu_s"] = time.process_time()  # of this process (forked: counted from zero)
    if part.data["status"] == "running":
        if part.data["correctness_failures"]:
            part.data["status"] = "failed"
        elif part.data["over_budget"]:
            part.data["status"] = "over budget"
        else:
            part.data["status"] = "ok"
    part.save()
    return 0


# ------------------------------------------------------------------------------------------------
# The whole programme: parts in order, goals, report
# ------------------------------------------------------------------------------------------------


def _versions() -> dict:
    """Python, torch and the optional packages' versions (read from metadata, not imported)."""
    from importlib import metadata

    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for module, dist in (
        ("triton", "triton"),
        ("transformers", "transformers"),
        ("curvlinops", "curvlinops-for-pytorch"),
        ("sklearn", "scikit-learn"),
    ):
        try:
            found[module] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[module] = None
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return found


def part_process(number: int, out: str, deadline: float, dry_run: bool, log: str) -> None:
    """Entry point of a part's process: output to its log, record to ``out/parts``."""
    with open(log, "w") as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            run_part(number, Path(out), deadline, dry_run)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def part_launcher(dry_run: bool):
    """A multiprocessing context whose processes start from a fresh server that imported torch.

    The fork server never touches CUDA (each part initializes it in its own process) and saves
    every part the import of torch. ``TRITON_INTERPRET`` and ``PYTHONPATH`` are set before the
    server starts, as the dry run (interpreted kernels) or the GPU run (compiled ones) needs.
    """
    import multiprocessing

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "curvopt.kernels"] if dry_run else ["torch"])
    return context


def launch_part(
    number: int, out: Path, budget: float, dry_run: bool, launcher, grace: float = GRACE_S
) -> dict:
    """Run one part in a process of its own; return its record (status, rows, notes, seconds).

    The part stops itself between cases once past its budget; a case still running
    ``grace`` seconds after the budget is killed with its process.
    """
    name = PARTS[number][0]
    record_path = out / "parts" / f"part{number}.json"
    record_path.unlink(missing_ok=True)
    log = out / "logs" / f"part{number}_{name}.log"
    start = time.time()
    process = launcher.Process(
        target=part_process,
        args=(number, str(out), start + budget, dry_run, str(log)),
        name=f"gpu_check part {number}",
    )
    process.start()
    process.join(budget + grace)
    killed = process.is_alive()
    if killed:
        process.kill()
        process.join()
    rc = process.exitcode
    seconds = time.time() - start
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        record = {
            "number": number,
            "name": name,
            "title": PARTS[number][1],
            "rows": [],
            "notes": [],
            "correctness_failures": [],
            "info": {},
            "status": "running",
        }
    if killed:
        record["status"] = "over budget"
        record["notes"].append(f"killed {grace:.0f} s after its budget while a case was running")
    elif record["status"] == "running":  # the process died before it finished its record
        record["status"] = "error"
        tail = log.read_text()[-1500:] if log.exists() else ""
        record["notes"].append(f"the part process exited with status {rc}: {tail}")
    record.update(seconds=seconds, budget_s=budget, log=str(log.relative_to(out)))
    return record


@dataclass
class Goal:
    key: str
    goal: str
    target: str
    measured: str = "unmeasured"
    met: bool | None = None


def _rows(parts: dict, number: int) -> list:
    part = parts.get(number)
    return part["rows"] if part else []


def evaluate_goals(parts: dict, dry_run: bool) -> list[Goal]:
    """The goals of the issue, each with what the parts measured and a verdict.

    ``parts`` maps part number -> record. In a dry run nothing is a measurement: every goal
    stays unmeasured.
    """
    goals = [
        Goal(
            "streaming_bandwidth",
            "multi_dot, combine, softmax_curvature: GB/s vs a device copy",
            ">= 80 % of the measured copy bandwidth",
        ),
        Goal(
            "vs_cublas",
            "multi_dot, combine vs cuBLAS (G @ V.T, torch.addmv)",
            "at least cuBLAS speed (cuBLAS time / ours >= 1)",
        ),
        Goal("gram_diag", "gram_diag vs materializing T G (cuBLAS GEMM)", "faster (ratio > 1)"),
        Goal(
            "window_step", "M-FAC window step vs two passes over G, d >= 1e7", "<= 1.1x the floor"
        ),
        Goal("hvp", "Hessian-vector product vs one gradient", "<= 2.5x"),
        Goal("ggn", "GGN-vector product vs one gradient", "<= 1.8x"),
        Goal(
            "mfac_vs_adam",
            "MFAC.step() (m=32, bf16) vs Adam(fused=True).step()",
            "no target: reported",
        ),
    ]
    if dry_run:
        for goal in goals:
            goal.measured = "unmeasured (dry run: tiny sizes on the CPU)"
        return goals
    by_key = {g.key: g for g in goals}
    kernel_rows = _rows(parts, 2)

    def worst(rows, value, label, lowest=True):
        picked = (min if lowest else max)(rows, key=value)
        return value(picked), label(picked)

    streaming = [r for r in kernel_rows if r.get("impl") == "triton" and r.get("unit") == "GB/s"]
    if streaming:
        v, where = worst(
            streaming, lambda r: r["pct_of_copy"], lambda r: f"{r['kernel']} {r['problem']}"
        )
        per_kernel = {}
        for r in streaming:
            per_kernel[r["kernel"]] = min(per_kernel.get(r["kernel"], math.inf), r["pct_of_copy"])
        by_key["streaming_bandwidth"].measured = (
            "; ".join(f"{k}: min {p:.0f} %" for k, p in per_kernel.items()) + f" (worst: {where})"
        )
        by_key["streaming_bandwidth"].met = v >= 80.0
    cublas = [r for r in kernel_rows if r.get("impl") == "cuBLAS" and r["kernel"] != "gram_diag"]
    if cublas:
        v, where = worst(
            cublas, lambda r: r["ours_faster_by"], lambda r: f"{r['kernel']} {r['problem']}"
        )
        by_key["vs_cublas"].measured = f"min {v:.2f}x ({where})"
        by_key["vs_cublas"].met = v >= 1.0
    gram = [r for r in kernel_rows if r.get("impl") == "cuBLAS" and r["kernel"] == "gram_diag"]
    if gram:
        v, where = worst(gram, lambda r: r["ours_faster_by"], lambda r: r["problem"])
        by_key["gram_diag"].measured = f"min {v:.2f}x ({where})"
        by_key["gram_diag"].met = v > 1.0
    window = [r for r in _rows(parts, 3) if r["d"] >= 10**7]
    if window:
        v, where = worst(
            window,
            lambda r: r["step_over_floor"],
            lambda r: f"d={r['d']:.0e} m={r['m']} {r['window_dtype']}",
            lowest=False,
        )
        in_place = max(r["in_place_over_floor"] for r in window)
        by_key["window_step"].measured = (
            f"max {v:.2f}x ({where}; {len(window)} cases); MFAC.step's in-place call: max "
            f"{in_place:.2f}x"
        )
        by_key["window_step"].met = v <= 1.1
    products = _rows(parts, 4)
    for key, prefix, limit in (("hvp", "HVP curvopt", 2.5), ("ggn", "GGN-vp curvopt", 1.8)):
        measured, ratios = [], []
        for model in dict.fromkeys(r["model"] for r in products):
            rows = [r for r in products if r["model"] == model and r["method"].startswith(prefix)]
            default = [r for r in rows if key == "ggn" or "default" in r["method"]]
            if default:
                ratios.append(default[0]["x_gradient"])
                measured.append(f"{model}: {ratios[-1]:.2f}x")
            elif rows:  # the default mode failed (see the part's notes): the best other mode
                best = min(rows, key=lambda r: r["x_gradient"])
                ratios.append(best["x_gradient"])
                measured.append(f"{model}: default failed, {best['method']} {ratios[-1]:.2f}x")
        if measured:
            by_key[key].measured = "; ".join(measured)
            by_key[key].met = max(ratios) <= limit
    steps = _rows(parts, 5)
    if steps:
        r = steps[0]
        by_key["mfac_vs_adam"].measured = (
            f"step {r['step_ratio']:.2f}x, iteration {r['iteration_ratio']:.2f}x "
            f"Adam's ({r['model']})"
        )
    for goal in goals:
        if goal.met is None and goal.key != "mfac_vs_adam" and goal.measured == "unmeasured":
            goal.measured = "unmeasured (its part did not produce the rows)"
    return goals


def _fmt(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return harness.table_lines(columns, [[_fmt(row.get(c)) for c in columns] for row in rows])


def summary_tables(report: dict) -> list[str]:
    parts = [
        [
            f"{p['number']} {p['name']}",
            p["status"],
            f"{p.get('seconds', 0):.1f}",
            f"{p.get('budget_s', 0):.0f}",
            len(p["correctness_failures"]),
            len(p["notes"]),
        ]
        for p in report["parts"]
    ]
    verdicts = {True: "met", False: "MISSED", None: "-"}
    goals = [[g["goal"], g["target"], g["measured"], verdicts[g["met"]]] for g in report["goals"]]
    return (
        harness.table_lines(
            ["part", "status", "seconds", "budget s", "correctness failures", "notes"], parts
        )
        + [""]
        + harness.table_lines(["goal", "target", "measured", "verdict"], goals)
    )


def write_report(report: dict, out: Path) -> None:
    harness.write_json(out / "gpu_report.json", report)
    env = report["environment"]
    mode = (
        "dry run (no CUDA or --dry-run: tiny sizes, CPU, Triton interpreter; the numbers "
        "measure nothing)"
        if report["dry_run"]
        else f"GPU: {env['device']}"
    )
    lines = [
        "# curvopt GPU check",
        "",
        f"- mode: {mode}",
        f"- started: {report['started_utc']}",
        f"- total: {report['seconds']:.1f} s",
        f"- command: `{report['command']}`",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if k != "device"),
        f"- exit status: {report['exit_status']}",
        "",
        "## Summary",
        "",
        *summary_tables(report),
    ]
    for p in report["parts"]:
        lines += [
            "",
            f"## Part {p['number']}: {p['title']}",
            "",
            f"Status: **{p['status']}** "
            f"({p.get('seconds', 0):.1f} s of {p.get('budget_s', 0):.0f} s; log "
            f"`{p.get('log', '')}`).",
        ]
        if p["info"]:
            lines += ["", "Info: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in p["info"].items())]
        for text in p["correctness_failures"]:
            lines.append(f"- CORRECTNESS FAILURE: {text}")
        for text in p["notes"]:
            lines.append(f"- {text}")
        if p["rows"]:
            lines += ["", *markdown_table(p["rows"])]
    (out / "gpu_report.md").write_text("\n".join(lines) + "\n")


def exit_status(parts: list[dict]) -> int:
    """1 on any correctness failure, else 2 when a part crashed, else 0."""
    if any(p["correctness_failures"] or p["status"] == "failed" for p in parts):
        return 1
    return 2 if any(p["status"] == "error" for p in parts) else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "results" / "gpu",
        help="folder for gpu_report.md/.json, logs and part records",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny sizes on the CPU (the default without CUDA)"
    )
    parser.add_argument("--parts", default="1,2,3,4,5", help="comma-separated part numbers")
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every part's time budget"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=GRACE_S,
        help="seconds after its budget at which a part still running a case is killed",
    )
    args = parser.parse_args(argv)
    out = args.out.resolve()
    try:
        numbers = [int(n) for n in args.parts.split(",")]
    except ValueError:
        parser.error(f"--parts must be comma-separated numbers from 1 to 5, got {args.parts!r}")
    if any(n not in PARTS for n in numbers):
        parser.error(f"--parts must be numbers from 1 to 5, got {args.parts!r}")
    if not args.budget_scale > 0:
        parser.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    if not args.grace >= 0:
        parser.error(f"--grace must be >= 0, got {args.grace}")
    import torch

    dry_run = args.dry_run or not torch.cuda.is_available()
    for sub in ("parts", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"curvopt GPU check ({'dry run' if dry_run else 'GPU'}), report in {out}", flush=True)
    launcher = part_launcher(dry_run)
    records = []
    for number in sorted(set(numbers)):
        budget = PARTS[number][2] * args.budget_scale
        print(f"part {number} ({PARTS[number][0]}, budget {budget:.0f} s) ...", end=" ", flush=True)
        record = launch_part(number, out, budget, dry_run, launcher, args.grace)
        print(f"{record['status']} in {record['seconds']:.1f} s", flush=True)
        records.append(record)
    report = {
        "schema": SCHEMA,
        "dry_run": dry_run,
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "environment": _versions(),
        "parts": records,
        "goals": [vars(g) for g in evaluate_goals({r["number"]: r for r in records}, dry_run)],
        "correctness_ok": not any(r["correctness_failures"] for r in records),
    }
    report["exit_status"] = exit_status(records)
    write_report(report, out)
    print("\n".join(["", *summary_tables(report), ""]))
    print(
        f"report: {out / 'gpu_report.md'} and gpu_report.json; exit status {report['exit_status']}"
    )
    return report["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
