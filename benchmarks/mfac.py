"""M-FAC: curvopt vs the published algorithm (a BASELINE in benchmarks/baselines/) and vs the
memory-bandwidth floor, side by side in one run.

Tables (markdown):
1. Sliding window, time per optimizer step (``add_and_ihvp``) against the floor of two plain
   passes over G (``G @ v`` and ``G.T @ c``) and the published algorithm (O(m^3) setup per step).
2. The m x m algebra of one window step alone: rank-2 update vs a fresh Cholesky vs the
   published sequential setup.
3. Static: setup, IHVP, inverse diagonal; ours vs the published sequential loop, and our setup
   vs one plain GEMM ``G @ G.T`` (GEMM-bound means a ratio near 1).
4. Step time against m at fixed d (should grow like m, not m^3); the factored mode (a Cholesky
   factor per step, for windows of nearly dependent gradients) against the normal updates.
5. Cancellation: relative error of the IHVP of a vector in the span of G at damp 1e-4 with G in
   float32 (float32 products, float64 products, published algorithm) against float64.

6. ``--window``: only the window step against the floor, for the ``d`` and ``m`` given (default
   d in {1e5, 1e6}, m in {16, 32, 64, 128, 256, 1024}), with the m x m path each step took.

Usage: ``python benchmarks/mfac.py [--quick] [--threads N] [--big] [--window]``.
"""
# ruff: noqa: B023  (the closures below are timed right where they are defined)

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from baselines.mfac_published import (  # noqa: E402
    PublishedStaticMFAC,
    PublishedWindowMFAC,
    sequential_coefficients,
)
from harness import Stopwatch, fmt_ms, interleaved, print_table, timed  # noqa: E402

from curvopt.mfac import SlidingWindowMFAC, StaticMFAC  # noqa: E402
from curvopt.mfac._linalg import cholesky, replace_row_inverse  # noqa: E402

DAMP = 1e-4


def mem_available_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 8.0


def random_rows(m, d, gen=None, *, device="cpu", dtype=torch.float32):
    """(m, d) N(0, 1/d) rows (unit-scale gradients) in ``dtype``, filled in row chunks.

    ``gen`` is a generator on ``device`` (None: the default one); chunks of at most 64 rows and
    2^28 entries keep the float32 temporaries small.
    """
    G = torch.empty(m, d, device=device, dtype=dtype)
    step = max(1, min(64, (1 << 28) // d))
    for s in range(0, m, step):
        rows = torch.randn(min(step, m - s), d, generator=gen, device=device)
        G[s : s + step] = rows.div_(d**0.5)
    return G


def gram_float64(G, chunk_elements=1 << 28):
    """``G G^T`` in float64, summed over column chunks of float32 products (no float32 copy of
    a half-precision ``G``): the Gram of a window too large for a static M-FAC."""
    m, d = G.shape
    K = torch.zeros(m, m, dtype=torch.float64, device=G.device)
    step = max(1, chunk_elements // m)
    for s in range(0, d, step):
        block = G[:, s : s + step].float()
        K += (block @ block.T).double()
    return K


def window_state(G, K, damp):
    """A full window over the buffer ``G`` (shared, not copied; its dtype and device) with Gram
    ``K`` (float64 ``m x m``)."""
    m, d = G.shape
    w = SlidingWindowMFAC(d, m, damp, device=G.device, dtype=G.dtype)
    w.G = G
    w.K.copy_(K)
    w.count = m
    w.refresh()
    return w


def two_pass_floor(G, v, c):
    """The memory-bandwidth floor of a window step: two plain passes over ``G``.

    ``G @ v`` and ``G.T @ c`` (cuBLAS on a GPU), with ``v`` and ``c`` already in ``G``'s dtype.
    """
    G @ v  # one plain pass
    return G.T @ c  # and another


def bench_window(G, K, repeats, gen, rows, scale_rows):
    m, d = G.shape
    ours = window_state(G, K, DAMP)
    base = PublishedWindowMFAC(d, m, DAMP, G=G)
    base.K.copy_(K)
    base.B, base.q = sequential_coefficients(base.K, m, DAMP)
    g = torch.randn(d, generator=gen) / d**0.5
    x = torch.randn(d, generator=gen)
    v, c = torch.randn(d, generator=gen), torch.randn(m, generator=gen)

    def floor():
        return two_pass_floor(G, v, c)

    # Agreement on the first step (both write slot 0). Afterwards both objects keep writing into
    # the shared buffer at their own ring positions: fine for timing, not for comparing results.
    y_ours, y_base = ours.add_and_ihvp(g), base.add_and_ihvp(g)
    agree = ((y_ours - y_base).norm() / y_base.norm()).item()
    (t_floor, t_ours, t_ours_x, t_base), _ = interleaved(
        [
            floor,
            lambda: ours.add_and_ihvp(g),
            lambda: ours.add_and_ihvp(g, x),
            lambda: base.add_and_ihvp(g),
        ],
        repeats,
    )
    rows.append(
        [
            f"{d:.0e}",
            m,
            fmt_ms(t_floor),
            fmt_ms(t_ours),
            fmt_ms(t_ours_x),
            fmt_ms(t_base),
            f"{t_ours / t_floor:.2f}",
            f"{t_ours_x / t_floor:.2f}",
            f"{t_base / t_floor:.2f}",
            f"{t_base / t_ours:.1f}",
            f"{agree:.0e}",
        ]
    )
    scale_rows.setdefault(d, []).append((m, t_ours, t_floor, t_base))


def cpu_interleaved(fns, repeats):
    """Median thread CPU seconds of each function, called in turn ``repeats`` times.

    CPU time of this thread (one torch thread) rather than wall time: on a loaded machine the
    time slices that other jobs take would otherwise land on whichever call they interrupt.
    """
    times = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            with Stopwatch() as watch:
                fn()
            times[k].append(watch.cpu_seconds)
    return [sorted(t)[len(t) // 2] for t in times]


def window_sizes(ds, ms, gen, copies):
    """Yield ``(d, m, G)`` for every size whose ``m x d`` float32 rows (times ``copies`` for the
    work arrays beside them) fit 60 % of the free memory; one draw of rows per ``d``, sliced."""
    for d in ds:
        m_ok = [m for m in ms if m * d * 4 * copies / 2**30 < mem_available_gb() * 0.6]
        if not m_ok:
            print(f"(d={d:.0e} skipped: not enough free memory)")
            continue
        G_all = random_rows(max(m_ok), d, gen)
        for m in m_ok:
            print(f"(running d={d:.0e}, m={m})", file=sys.stderr, flush=True)
            yield d, m, G_all[:m]
        del G_all
        gc.collect()


def window_ratios(ds, ms, repeats):
    """Table 6: one window step (``add_and_ihvp``, x = g and x != g) against the two-pass floor,
    interleaved call by call (thread CPU time, :func:`cpu_interleaved`), for a full window over
    random unit-scale float32 rows. "In place" is the call :class:`~curvopt.optim.MFAC` makes:
    the row already written into ``next_row()`` and checked by its caller, so the step neither
    copies nor checks ``g`` (both O(d) passes that the floor leaves out).

    The window's Gram comes from a column subsample (at most ``2^24 / m`` columns, rescaled):
    the step's cost does not depend on the values.
    """
    import curvopt.mfac.window as window_module

    gen = torch.Generator().manual_seed(0)
    rows = []
    for d, m, G in window_sizes(ds, ms, gen, copies=1.5):
        s = min(d, max(m, 2**24 // m))  # at most 2^24 entries in float64
        K = (G[:, :s].double() @ G[:, :s].double().T) * (d / s)
        ours = window_state(G, K, DAMP)
        g = torch.randn(d, generator=gen) / d**0.5
        x = torch.randn(d, generator=gen)
        v, c = torch.randn(d, generator=gen), torch.randn(m, generator=gen)
        ours.add_and_ihvp(g)  # warm-up
        # small cells take many rounds: their medians must see past the time slices that
        # other jobs take on a loaded machine
        reps = max(repeats, min(201, int(4e8 / (m * d))))
        (t_floor, t_ours, t_ours_x, t_in_place) = cpu_interleaved(
            [
                lambda: two_pass_floor(G, v, c),
                lambda: ours.add_and_ihvp(g),
                lambda: ours.add_and_ihvp(g, x),
                # MFAC.step's call: the row was written into next_row() (by the division that
                # makes it) and checked for NaN/Inf before; its content does not change the time
                lambda: ours.add_and_ihvp(ours.next_row(), on_nonfinite="ignore"),
            ],
            reps,
        )
        fresh_max = getattr(window_module, "FRESH_FACTOR_MAX", 0)
        path = "fresh Cholesky" if m <= fresh_max else "rank-2 update"
        rows.append(
            [
                f"{d:.0e}",
                m,
                fmt_ms(t_floor),
                fmt_ms(t_ours),
                fmt_ms(t_ours_x),
                fmt_ms(t_in_place),
                f"{t_ours / t_floor:.2f}",
                f"{t_ours_x / t_floor:.2f}",
                f"{t_in_place / t_floor:.2f}",
                path,
            ]
        )
    print_table(
        [
            "d",
            "m",
            "floor: G@v + G.T@c",
            "curvopt (x = g)",
            "curvopt (x != g)",
            "curvopt in place (MFAC.step)",
            "curvopt / floor",
            "curvopt (x != g) / floor",
            "in place / floor",
            "m x m step",
        ],
        rows,
        title="Sliding window: time per step (ms) of add_and_ihvp against the two-pass floor, "
        "G float32",
    )


def bench_small_algebra(ms, repeats):
    rows = []
    gen = torch.Generator().manual_seed(1)
    for m in ms:
        G = torch.randn(m, 4 * m, generator=gen, dtype=torch.float64)
        K = G @ G.T
        lam = 1e-3
        Ainv = torch.cholesky_inverse(cholesky(K, m, lam))
        rhs = torch.randn(m, 1, generator=gen, dtype=torch.float64)
        k_new = K[m // 2] * 1.01

        def update():
            return replace_row_inverse(Ainv, m // 2, k_new / lam, m + k_new[m // 2] / lam, rhs)

        def update_refined():
            c = update()
            Ac = torch.addmm(c, K, c, beta=float(m), alpha=1.0 / lam)
            return c.add_(Ainv @ (rhs - Ac))

        def fresh():
            return torch.cholesky_solve(rhs, cholesky(K, m, lam, check=False))

        (t_up, t_ref, t_fresh), _ = interleaved([update, update_refined, fresh], max(repeats, 7))
        t_seq, _ = timed(lambda: sequential_coefficients(K, m, lam), 1 if m > 256 else 3)
        rows.append(
            [
                m,
                f"{1e3 * t_up:.3f}",
                f"{1e3 * t_ref:.3f}",
                f"{1e3 * t_fresh:.3f}",
                f"{1e3 * t_seq:.1f}",
                f"{t_fresh / t_up:.1f}",
                f"{t_fresh / t_ref:.1f}",
                f"{t_seq / t_up:.0f}",
            ]
        )
    print_table(
        [
            "m",
            "rank-2 update",
            "+ refinement",
            "fresh Cholesky + solve",
            "published O(m^3) setup",
            "fresh / update",
            "fresh / refined",
            "published / update",
        ],
        rows,
        title="m x m algebra of one window step (ms, float64)",
    )


def bench_factored_step(ms, d, repeats):
    """Time per step in factored mode (a fresh m x m Cholesky factor per insertion, taken when
    the window's gradients are nearly dependent) against the normal O(m^2) updates."""
    rows = []
    gen = torch.Generator().manual_seed(3)
    for m in ms:
        G = random_rows(m, d, gen)
        g = torch.randn(d, generator=gen) / d**0.5
        normal = window_state(G.clone(), (G.double() @ G.double().T), DAMP)
        factored = window_state(G.clone(), (G.double() @ G.double().T), DAMP)
        factored._set_factored(True)  # as check_conditioning() does for a dependent window
        (t_n, t_f), _ = interleaved(
            [
                lambda: normal.add_and_ihvp(g, on_nonfinite="ignore"),
                lambda: factored.add_and_ihvp(g, on_nonfinite="ignore"),
            ],
            repeats,
        )
        rows.append([f"{d:.0e}", m, fmt_ms(t_n), fmt_ms(t_f), f"{t_f / t_n:.2f}"])
    print_table(
        ["d", "m", "O(m^2) updates", "factored (Cholesky per step)", "factored / updates"],
        rows,
        title="Sliding window: step time (ms) in factored mode (dependent gradients) "
        "vs the O(m^2) path",
    )


def bench_static(G, repeats, rows, baseline_budget_s):
    m, d = G.shape
    x = torch.randn(d)
    t_gemm, _ = timed(lambda: G @ G.T, 1 if m * m * d > 1e11 else repeats)
    t_setup, op = timed(lambda: StaticMFAC(G, DAMP), 1 if m * m * d > 1e11 else repeats)
    t_ihvp, _ = timed(lambda: op.ihvp(x), repeats)

    def diag():
        op._diag = None  # time the computation, not the cache
        return op.inverse_diagonal()

    t_diag, _ = timed(diag, 1 if m * m * d > 1e11 else repeats)
    # The published loop reads V[:i] twice per step i: about m^2 d * 4 bytes in all.
    est = m * m * d * 4 / 3e9
    if est <= baseline_budget_s:
        t_bsetup, base = timed(lambda: PublishedStaticMFAC(G, DAMP), 1)
        t_bihvp, _ = timed(lambda: base.ihvp(x), repeats)
        t_bdiag, _ = timed(base.inverse_diagonal, repeats)
        del base
        gc.collect()
        b = [fmt_ms(t_bsetup), fmt_ms(t_bihvp), fmt_ms(t_bdiag)]
        r = [f"{t_bsetup / t_setup:.0f}", f"{t_bihvp / t_ihvp:.1f}", f"{t_bdiag / t_diag:.1f}"]
    else:
        # Step i of the loop costs a + b*i whatever m is: time the first k1 and k2 steps
        # (a baseline on G[:k]) and extrapolate the quadratic cost model to m steps.
        k1, k2 = max(2, m // 16), max(4, m // 8)
        t1, _ = timed(lambda: PublishedStaticMFAC(G[:k1], DAMP), 1)
        t2, _ = timed(lambda: PublishedStaticMFAC(G[:k2], DAMP), 1)
        bq = 2 * (t2 / k2 - t1 / k1) / (k2 - k1)
        aq = t1 / k1 - bq * k1 / 2
        t_bsetup = aq * m + bq * m * m / 2
        b = [fmt_ms(t_bsetup) + f" (extrap. from {k1},{k2} steps)", "-", "-"]
        r = [f"{t_bsetup / t_setup:.0f}", "-", "-"]
    rows.append(
        [
            f"{d:.0e}",
            m,
            fmt_ms(t_gemm),
            fmt_ms(t_setup),
            f"{t_setup / t_gemm:.2f}",
            fmt_ms(t_ihvp),
            fmt_ms(t_diag),
            *b,
            *r,
        ]
    )
    return op.K[0]


def bench_cancellation():
    from numpy import format_float_scientific as sci

    gen = torch.Generator().manual_seed(5)
    rows = []
    for m, d in [(32, 4000), (128, 4000)]:
        G = random_rows(m, d, gen)
        x = G.T @ torch.randn(m, generator=gen)  # inside the span of G
        G64, x64 = G.double(), x.double()
        F = DAMP * torch.eye(d, dtype=torch.float64) + G64.T @ G64 / m
        ref = torch.linalg.solve(F, x64)

        def err(y):
            return sci((y.double() - ref).norm().item() / ref.norm().item(), precision=1)

        e32 = err(StaticMFAC(G, DAMP).ihvp(x))
        e64 = err(StaticMFAC(G, DAMP, accumulate_dtype=torch.float64).ihvp(x64))
        e64_32 = err(StaticMFAC(G, DAMP, accumulate_dtype=torch.float64).ihvp(x))
        w32 = SlidingWindowMFAC(d, m, DAMP)
        w64 = SlidingWindowMFAC(d, m, DAMP, accumulate_dtype=torch.float64)
        for g in G:
            w32.add(g)
            w64.add(g)
        ew32, ew64 = err(w32.ihvp(x)), err(w64.ihvp(x64))
        eb = err(PublishedStaticMFAC(G, DAMP).ihvp(x))
        lam_max = DAMP + torch.linalg.eigvalsh(G64 @ G64.T)[-1].item() / m
        rows.append([m, d, f"{lam_max / DAMP:.0e}", e32, e64_32, e64, ew32, ew64, eb])
    print_table(
        [
            "m",
            "d",
            "R = lambda_max(F)/damp",
            "static, f32 products",
            "static, f64 products, f32 out",
            "static, f64 products, f64 x",
            "window, f32",
            "window, f64",
            "published (f32)",
        ],
        rows,
        title="Cancellation: IHVP of x in span(G), damp 1e-4, G in float32 "
        "(relative error vs float64)",
    )


def bench_small_block_diagonal():
    """Inverse diagonal with blocks no wider than m, G float64: max relative error per entry."""
    rows = []
    m, d, B = 64, 96, 32
    for damp in (1e-5, 1e-6, 1e-8):
        errs = {"curvopt": [], "woodbury": [], "published": [], "rows": [], "rows_wb": []}
        for seed in range(3):
            G = torch.randn(
                m, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
            )
            blocks = [G[:, s : s + B].contiguous() for s in range(0, d, B)]
            eye = torch.eye(B, dtype=torch.float64)
            ref = torch.cat([torch.linalg.inv(damp * eye + b.T @ b / m).diagonal() for b in blocks])
            op = StaticMFAC(G, damp, block_size=B)
            T = op._inverse_factor()  # the Woodbury form the small-block path replaced
            s2 = torch.cat([(T[i] @ b).square().sum(0) for i, b in enumerate(blocks)])
            found = {
                "curvopt": op.inverse_diagonal(),
                "woodbury": 1.0 / damp - s2 / damp**2,
                "published": torch.cat(
                    [PublishedStaticMFAC(b, damp).inverse_diagonal() for b in blocks]
                ),
            }
            for k, v in found.items():
                errs[k].append(((v - ref).abs() / ref).max().item())
            # rows F^{-1} e_i: the B x B factor (now) vs e_i/lam - G_b^T A_b^{-1} G_b e_i/lam^2
            inv = torch.block_diag(*[torch.linalg.inv(damp * eye + b.T @ b / m) for b in blocks])
            idx = torch.arange(d)
            rows_wb = torch.zeros(d, d, dtype=torch.float64)
            for i, b in enumerate(blocks):
                C = torch.cholesky_solve(b, op._L[i])  # A_b^{-1} G_b, (m, B)
                rows_wb[i * B : (i + 1) * B, i * B : (i + 1) * B] = eye / damp - (b.T @ C) / damp**2

            def row_err(R, inv=inv):
                return ((R - inv).norm(dim=1) / inv.norm(dim=1)).max().item()

            errs["rows"].append(row_err(op.inverse_rows(idx)))
            errs["rows_wb"].append(row_err(rows_wb))
        rows.append([f"{damp:g}"] + [f"{max(errs[k]):.1e}" for k in errs])
    print_table(
        [
            "damp",
            "diagonal: curvopt (B x B Cholesky)",
            "diagonal: Woodbury form (before)",
            "diagonal: published",
            "rows: curvopt (B x B Cholesky)",
            "rows: Woodbury form (before)",
        ],
        rows,
        title=f"Inverse diagonal and rows, blocks B={B} <= m={m}, d={d}, G float64: "
        "max relative error vs torch.linalg.inv per block (worst of 3 seeds)",
    )


def bench_damping_limit():
    """Relative IHVP error (vs a dense float64 solve) as damp shrinks, and whether M-FAC warns."""
    import warnings

    def warned(fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = fn()
        return out, "yes" if any(w.category is RuntimeWarning for w in caught) else "no"

    rows = []
    for m, d in [(8, 50), (8, 4)]:
        for damp in (1e-1, 1e-5, 1e-7, 1e-9, 1e-11):
            G = 1e2 * (1 + torch.rand(m, d, generator=torch.Generator().manual_seed(0)))
            G = G.double()
            x = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            want = torch.linalg.solve(damp * torch.eye(d, dtype=torch.float64) + G.T @ G / m, x)

            modes = []

            def window_ihvp(G=G, x=x, damp=damp, m=m, d=d, modes=modes):
                window = SlidingWindowMFAC(d, m, damp, dtype=torch.float64)
                for g in G[:-1]:
                    window.add(g)
                y = window.add_and_ihvp(G[-1], x)
                modes.append("factored" if window.factored else "updates")
                return y

            static, ws = warned(lambda G=G, x=x, damp=damp: StaticMFAC(G, damp).ihvp(x))
            win, ww = warned(window_ihvp)
            R = 1 + torch.linalg.eigvalsh(G @ G.T)[-1].item() / (m * damp)

            def err(y, want=want):
                return f"{((y - want).norm() / want.norm()).item():.1e}"

            row = [m, d, f"{damp:g}", f"{R:.1e}", err(static), ws, err(win), ww, modes[0]]
            rows.append(row)
    print_table(
        [
            "m",
            "d",
            "damp",
            "R = lambda_max(F)/damp",
            "static",
            "static warned",
            "window",
            "window warned",
            "window solve",
        ],
        rows,
        title="Damping limit: IHVP relative error vs dense float64 (G float64, entries 1e2..2e2)",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid (about a minute)")
    parser.add_argument("--big", action="store_true", help="add d=1e7 if memory allows")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ds", type=str, default=None, help="comma-separated d values")
    parser.add_argument("--ms", type=str, default=None, help="comma-separated m values")
    parser.add_argument("--accuracy", action="store_true", help="only the accuracy tables (s)")
    parser.add_argument("--window", action="store_true", help="only the window step vs the floor")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.window:
        ds = [int(float(v)) for v in (args.ds or "1e5,1e6").split(",")]
        ms = [int(v) for v in (args.ms or "16,32,64,128,256,1024").split(",")]
        print(
            f"# M-FAC window step: torch {torch.__version__}, {torch.get_num_threads()} "
            f"thread(s), G float32, damp {DAMP:g}; thread CPU time, medians of at least "
            f"{args.repeats} interleaved rounds (more for small m d)"
        )
        window_ratios(ds, ms, args.repeats)
        return
    if args.accuracy:
        bench_cancellation()
        bench_small_block_diagonal()
        bench_damping_limit()
        return
    if args.quick:
        ds, ms, budget = [10**4, 10**5], [32, 128], 5.0
    else:
        ds, ms, budget = [10**5, 10**6], [32, 128, 512, 1024], 60.0
        if args.big:
            ds.append(10**7)
    if args.ds:
        ds = [int(float(v)) for v in args.ds.split(",")]
    if args.ms:
        ms = [int(v) for v in args.ms.split(",")]
    print(
        f"# M-FAC benchmark: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPU(s), G float32, damp {DAMP:g}; times are medians of "
        f"{args.repeats}; GPU figures unmeasured"
    )
    gen = torch.Generator().manual_seed(0)
    win_rows, scale_rows, static_rows = [], {}, []
    for d, m, G in window_sizes(ds, ms, gen, copies=2.5):
        if m * m * d <= 6e11:
            K = bench_static(G, args.repeats, static_rows, budget)
        else:  # the full GEMM would take minutes here: Gram of a column subsample, rescaled
            s = d // 16
            K = (G[:, :s] @ G[:, :s].T).double() * (d / s)
            print(f"(d={d:.0e}, m={m}: static skipped; window state from a subsampled Gram)")
        Gw = G.clone() if m * d < 2e8 else G
        bench_window(Gw, K, args.repeats, gen, win_rows, scale_rows)
    print_table(
        [
            "d",
            "m",
            "floor: G@v + G.T@c",
            "curvopt (x = g)",
            "curvopt (x != g)",
            "published (baseline)",
            "curvopt / floor",
            "curvopt (x != g) / floor",
            "published / floor",
            "published / curvopt",
            "rel. diff (step 1)",
        ],
        win_rows,
        title="Sliding window: time per step (ms) of add_and_ihvp, G float32",
    )
    bench_small_algebra(ms, args.repeats)
    bench_factored_step(ms, ds[0], max(args.repeats, 5))
    print_table(
        [
            "d",
            "m",
            "GEMM G G^T",
            "setup",
            "setup / GEMM",
            "IHVP",
            "inverse diag",
            "published setup",
            "published IHVP",
            "published diag",
            "setup speed-up",
            "IHVP speed-up",
            "diag speed-up",
        ],
        static_rows,
        title="Static M-FAC (ms): curvopt vs the published sequential loop (baseline)",
    )
    for d, entries in scale_rows.items():
        m0, t0, f0, b0 = entries[0]
        print_table(
            ["m", "m / m0", "curvopt", "floor", "published"],
            [
                [m, f"{m / m0:.0f}", f"{t / t0:.1f}", f"{f / f0:.1f}", f"{b / b0:.1f}"]
                for m, t, f, b in entries
            ],
            title=f"Window step time against m at d={d:.0e} (relative to m={m0})",
        )
    bench_cancellation()
    bench_small_block_diagonal()
    bench_damping_limit()


if __name__ == "__main__":
    main()
