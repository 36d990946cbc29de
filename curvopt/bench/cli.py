"""``curvopt bench``: compare curvature approximations on a built-in problem.

Example:
    curvopt bench --problem mlp --json out.json --plot out.png
    curvopt bench --problem softmax --estimators --budgets 4,8,16,32 --plot est.png

Prints a rich table, and optionally writes the JSON document (:mod:`curvopt.bench.schema`) and a PNG
with the error-vs-m and error-vs-time plots. With ``--estimators`` it instead measures the trace
and diagonal estimators (`curvopt.bench.estimators`) on the exact ``--reference`` operator: a
table of relative RMS error per estimator and budget of matrix-vector products, and with
``--plot`` the log-log picture of error against matvecs. Invalid options exit with status 2 and a
message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..cli_types import check_output_file, nonnegative_int, positive_float, positive_int, seed
from .approximations import METHOD_NAMES, make_approximation
from .problems import BUILTIN_PROBLEMS

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _int_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return [positive_int(p) for p in parts]


def _method_list(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list of method names")
    for name in names:
        try:
            make_approximation(name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``curvopt bench``."""
    parser.add_argument(
        "--problem", required=True, choices=sorted(BUILTIN_PROBLEMS), help="built-in problem to run"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--plot", type=Path, metavar="PATH", help="write the PNG plots here")
    parser.add_argument(
        "--methods",
        type=_method_list,
        metavar="LIST",
        help=f"comma-separated methods (default: all of {', '.join(METHOD_NAMES)} and M-FAC)",
    )
    parser.add_argument(
        "--mfac-m",
        type=_int_list,
        default=None,
        metavar="LIST",
        help="M-FAC gradient counts for the default method list (default 8,32,128,512)",
    )
    parser.add_argument(
        "--reference",
        default="hessian",
        choices=("hessian", "ggn", "fisher", "empirical_fisher"),
        help="exact curvature the methods are compared against (default hessian)",
    )
    parser.add_argument(
        "--damping", type=positive_float, help="damping λ for all methods (default: relative)"
    )
    parser.add_argument(
        "--relative-damping",
        type=positive_float,
        default=1e-2,
        help="λ = this × largest reference eigenvalue when --damping is not given (default 1e-2)",
    )
    parser.add_argument("--probes", type=positive_int, default=8, help="probe vectors (default 8)")
    parser.add_argument(
        "--top-k", type=positive_int, default=5, help="top eigenvalues, <= d (default 5)"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=5, help="timing repeats (default 5)"
    )
    parser.add_argument(
        "--train-steps",
        type=nonnegative_int,
        default=100,
        help="Adam steps before measuring (default 100)",
    )
    parser.add_argument(
        "--max-dense-dim",
        type=positive_int,
        default=20_000,
        help="largest d with a dense reference (default 20000)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--dtype", choices=sorted(_DTYPES), default="float64", help="default float64"
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (default: torch's choice); 1 gives steadier timings of small "
        "products on a busy machine",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument(
        "--estimators",
        action="store_true",
        help="measure the trace/diagonal estimators on the --reference operator instead: error "
        "against the budget of matrix-vector products (table; --plot writes the log-log plot)",
    )
    parser.add_argument(
        "--budgets",
        type=_int_list,
        metavar="LIST",
        help="with --estimators: comma-separated matvec budgets, each <= d "
        "(default 4,8,16,32,64, or up to d)",
    )
    parser.add_argument(
        "--estimator-seeds",
        type=positive_int,
        default=10,
        help="with --estimators: seeds per budget for the RMS error (default 10)",
    )
    parser.set_defaults(_parser=parser)


def _check_paths(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    check_output_file(parser, "--json", args.json)
    check_output_file(parser, "--plot", args.plot, suffix=".png")


def _check_device(text: str, parser: argparse.ArgumentParser) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device {text!r} is not a torch device (try cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {text!r}: only cpu and cuda are supported")
    return device


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, and write the JSON and plot files if asked."""
    from .problems import make_problem
    from .report import print_table, save_plots
    from .runner import run_benchmark

    parser: argparse.ArgumentParser = args._parser
    _check_paths(args, parser)
    device = _check_device(args.device, parser)
    if args.methods is not None and args.mfac_m is not None:
        parser.error("--mfac-m only shapes the default method list; with --methods name mfac_m<m>")

    if not args.estimators and args.budgets is not None:
        parser.error("--budgets needs --estimators")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    problem = make_problem(
        args.problem,
        seed=args.seed,
        train_steps=args.train_steps,
        dtype=_DTYPES[args.dtype],
        device=device,
    )
    if args.estimators:
        return _run_estimators(args, parser, problem)
    if args.top_k > problem.num_params:
        parser.error(f"--top-k {args.top_k} exceeds the problem's d = {problem.num_params}")
    result = run_benchmark(
        problem,
        args.methods,
        reference=args.reference,
        damping=args.damping,
        relative_damping=args.relative_damping,
        max_dense_dim=args.max_dense_dim,
        num_probes=args.probes,
        top_k=args.top_k,
        repeats=args.repeats,
        seed=args.seed,
        progress=not args.no_progress,
        mfac_m=args.mfac_m,
    )
    document = result.to_dict()
    print_table(document)
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        save_plots(document, args.plot)
        print(f"wrote {args.plot}")
    failed = [r for r in document["results"] if r["error"]]
    for r in failed:
        print(f"error: {r['method']} failed: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def _default_budgets(d: int) -> list[int]:
    """4, 8, 16, 32, 64 (those ``<= d``), and ``d`` itself when it is smaller than 64."""
    budgets = [m for m in (4, 8, 16, 32, 64) if m <= d]
    if d < 64 and d not in budgets:
        budgets.append(d)
    return budgets


def _run_estimators(
    args: argparse.Namespace, parser: argparse.ArgumentParser, problem: object
) -> int:
    """``--estimators``: error of every trace and diagonal estimator against its budget."""
    from .approximations import _curvature_factory
    from .estimators import estimator_errors, format_table, save_plot

    d = problem.num_params
    budgets = args.budgets if args.budgets is not None else _default_budgets(d)
    too_big = [m for m in budgets if m > d]
    if too_big:
        parser.error(
            f"--budgets {','.join(map(str, too_big))} exceed the problem's d = {d} "
            "(a budget of d products already gives the exact trace and diagonal)"
        )
    if d > args.max_dense_dim:
        parser.error(
            f"--estimators needs the exact diagonal (d = {d} products); d exceeds "
            f"--max-dense-dim {args.max_dense_dim}"
        )
    op = _curvature_factory(args.reference)(problem)
    records = estimator_errors(op, budgets, num_seeds=args.estimator_seeds)
    title = (
        f"{problem.name} (d = {d}), {args.reference}: relative RMS error over "
        f"{args.estimator_seeds} seeds"
    )
    print(title)
    for quantity in ("trace", "diagonal"):
        rows = [r for r in records if r["quantity"] == quantity]
        if rows:
            print(f"\n{quantity}:\n{format_table(rows)}")
    if args.json is not None:
        document = {"problem": problem.name, "num_params": d, "reference": args.reference}
        document["records"] = records
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        save_plot(records, args.plot, title)
        print(f"wrote {args.plot}")
    return 0
