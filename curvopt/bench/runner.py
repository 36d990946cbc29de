"""Run every approximation on one problem and measure it against the reference.

The flow of :func:`run_benchmark`:

1. the reference ``A`` (exact Hessian by default) is set up: materialized and eigendecomposed when
   ``d <= max_dense_dim``, otherwise used matrix-free (MINRES solves, Lanczos eigenvalues);
2. the damping ``lam`` is fixed: the given ``damping``, or ``relative_damping`` times the largest
   reference eigenvalue; every method uses the same ``lam``;
3. the reference answers ``(A + lam I)^{-1} V`` for ``num_probes`` Gaussian probes and for the
   gradient ``g`` (the exact damped Newton direction);
4. each approximation is set up (timed, memory measured), answers the same products, its top
   eigenvalues are computed, and one record is stored (see :mod:`curvopt.bench.schema`).

A method that raises (for example K-FAC on an unsupported layer, or M-FAC with ``m > N``) gets a
record with ``error`` set and ``null`` metrics; the run goes on.
"""

from __future__ import annotations

import gc
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor

from curvopt import __version__

from . import metrics
from .approximations import Approximation, OperatorApproximation, make_approximation
from .memory import PeakMemory, current_rss_bytes
from .problems import Problem
from .schema import RECORD_FIELDS, SCHEMA_NAME, SCHEMA_VERSION

CPU_MEMORY_MEASURE = "rss-sampled-1ms" if current_rss_bytes() is not None else "unavailable"


@dataclass
class BenchmarkResult:
    """Everything one run measured; :meth:`to_dict` gives the JSON document.

    Attributes:
        problem: Problem metadata (``PROBLEM_FIELDS``).
        config: The run's settings (``CONFIG_FIELDS``), ``damping`` resolved to the value used.
        reference: Reference metadata (``REFERENCE_FIELDS``).
        records: One dict per method with the keys of ``RECORD_FIELDS``.
    """

    problem: dict[str, Any]
    config: dict[str, Any]
    reference: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema :data:`~curvopt.bench.schema.SCHEMA_VERSION`)."""
        return {
            "schema": SCHEMA_NAME,
            "schema_version": SCHEMA_VERSION,
            "curvopt_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "problem": dict(self.problem),
            "config": dict(self.config),
            "reference": dict(self.reference),
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "platform": platform.platform(),
                "num_threads": torch.get_num_threads(),
                "cpu_memory_measure": CPU_MEMORY_MEASURE,
            },
            "results": [dict(r) for r in self.records],
        }

    def record(self, method: str) -> dict[str, Any]:
        """The record of one method by name.

        Raises:
            KeyError: If no record has that name.
        """
        for r in self.records:
            if r["method"] == method:
                return r
        raise KeyError(f"no result for method {method!r}")


def _median_time(
    fn: Callable[[], Any], repeats: int, device: torch.device, min_sample_s: float = 2e-3
) -> float:
    """Median seconds per call over ``repeats`` samples, as ``timeit`` does.

    Each sample runs ``fn`` ``n`` times, with ``n`` doubled (up to 1024) until one sample takes
    at least ``min_sample_s``, so that sub-millisecond products are not dominated by timer
    resolution and scheduler noise.
    """

    def sample(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    n = 1
    while n < 1024 and sample(n) < min_sample_s:
        n *= 2
    return statistics.median(sample(n) / n for _ in range(repeats))


def _empty_record(approx: Approximation) -> dict[str, Any]:
    record: dict[str, Any] = dict.fromkeys(RECORD_FIELDS)
    record.update(
        method=approx.name, family=approx.family, m=approx.m, solver=approx.solver or None
    )
    return record


def _floats(t: Tensor) -> list[float]:
    return [float(x) for x in t.double().cpu()]


@dataclass
class _Targets:
    probes: Tensor
    gradient: Tensor
    exact_probes: Tensor
    exact_newton: Tensor
    top_eigenvalues: Tensor


def measure(
    approx: Approximation,
    problem: Problem,
    damping: float,
    targets: _Targets,
    *,
    top_k: int,
    repeats: int,
) -> dict[str, Any]:
    """Set up one approximation and measure it against precomputed reference answers."""
    record = _empty_record(approx)
    try:
        with PeakMemory(problem.device) as mem:
            t0 = time.perf_counter()
            approx.setup(problem, damping)
            if problem.device.type == "cuda":
                torch.cuda.synchronize(problem.device)
            record["setup_time_s"] = time.perf_counter() - t0
            record["solver"] = approx.solver or None
            solutions = approx.ihvp(targets.probes)
            newton = approx.ihvp(targets.gradient)
            top = approx.top_eigenvalues(top_k)
        record["peak_memory_bytes"] = mem.cpu_bytes
        # Timed outside PeakMemory so that its sampling thread does not share the CPU with the
        # timed products.
        g = targets.gradient
        record["time_s"] = _median_time(lambda: approx.ihvp(g), repeats, problem.device)
        record["matvec_time_s"] = _median_time(lambda: approx.matvec(g), repeats, problem.device)
        record["peak_cuda_memory_bytes"] = mem.cuda_bytes
        record["state_bytes"] = int(approx.state_bytes())
        record["ihvp_rel_error"] = metrics.ihvp_relative_error(solutions, targets.exact_probes)
        record["newton_rel_error"] = metrics.ihvp_relative_error(newton, targets.exact_newton)
        record["newton_cosine"] = metrics.cosine(newton, targets.exact_newton)
        record["top_eigenvalues"] = _floats(top)
        ref_top = targets.top_eigenvalues[: len(top)]
        record["top_eig_rel_error"] = metrics.top_eigenvalue_error(top, ref_top)
    except Exception as err:  # noqa: BLE001 - one failing method must not stop the benchmark
        record["error"] = f"{type(err).__name__}: {err}"
    finally:
        approx.release()
        gc.collect()
    return record


def _reference_approximation(
    reference: str | Approximation, max_dense_dim: int
) -> tuple[Approximation, str]:
    if isinstance(reference, Approximation):
        return reference, reference.name
    if reference not in ("hessian", "ggn", "fisher", "empirical_fisher"):
        raise ValueError(
            f"reference must be 'hessian', 'ggn', 'fisher', 'empirical_fisher' or an "
            "Approximation, "
            f"got {reference!r}"
        )
    return make_approximation(reference, max_dense_dim=max_dense_dim), reference


def _check_positive_int(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def run_benchmark(
    problem: Problem,
    methods: Sequence[str | Approximation] | None = None,
    *,
    reference: str | Approximation = "hessian",
    damping: float | None = None,
    relative_damping: float = 1e-2,
    max_dense_dim: int = 20_000,
    num_probes: int = 8,
    top_k: int = 5,
    repeats: int = 5,
    seed: int = 0,
    progress: bool = False,
    mfac_m: Sequence[int] | None = None,
) -> BenchmarkResult:
    """Compare curvature approximations on one problem against an exact reference.

    Args:
        problem: The model, loss and data (a built-in from :func:`~curvopt.bench.make_problem` or
            your own :class:`~curvopt.bench.Problem`).
        methods: Method names (see :func:`~curvopt.bench.approximations.make_approximation`) or
            :class:`~curvopt.bench.approximations.Approximation` objects; default: every family and
            M-FAC for each ``m`` in ``mfac_m``.
        reference: The exact curvature ``A`` (``hessian``, ``ggn``, ``fisher``,
            ``empirical_fisher``) or an approximation object to compare against (for instance a
            :class:`~curvopt.bench.approximations.DenseApproximation` of a matrix); with the
            default relative damping it must accept ``set_damping`` after setup.
        damping: ``lam > 0`` used by every method and the reference; default
            ``relative_damping * lambda_max(A)``.
        relative_damping: See ``damping``.
        max_dense_dim: Largest ``d`` for which exact operators are materialized; beyond it the
            reference and the exact operators run matrix-free.
        num_probes: Number of Gaussian probe vectors for the IHVP error.
        top_k: Number of top eigenvalues compared.
        repeats: Repetitions of each timed product (the median is reported).
        seed: Seed of the probes and of the methods' randomness.
        progress: Show a rich progress bar.
        mfac_m: M-FAC sizes of the default method list (default ``DEFAULT_MFAC_M``, clipped
            to ``N``).

    Returns:
        The :class:`BenchmarkResult`.

    Raises:
        ValueError: For invalid settings (non-positive counts or damping, unknown method names).

    Example:
        >>> from curvopt.bench import make_problem, run_benchmark
        >>> problem = make_problem("logistic", train_steps=20)
        >>> result = run_benchmark(problem, ["ggn", "sqgrad_diag", "mfac_m16"])  # doctest: +SKIP
        >>> result.record("ggn")["ihvp_rel_error"] < 1e-8  # doctest: +SKIP
        True
    """
    for value, name in ((num_probes, "num_probes"), (top_k, "top_k"), (repeats, "repeats")):
        _check_positive_int(value, name)
    _check_positive_int(max_dense_dim, "max_dense_dim")
    if top_k > problem.num_params:
        raise ValueError(f"top_k = {top_k} exceeds the parameter count d = {problem.num_params}")
    if damping is not None and not (damping > 0 and damping < float("inf")):
        raise ValueError(f"damping must be positive and finite, got {damping}")
    if not relative_damping > 0:
        raise ValueError(f"relative_damping must be positive, got {relative_damping}")

    from .approximations import DEFAULT_MFAC_M, default_method_names

    if methods is None:
        sizes = DEFAULT_MFAC_M if mfac_m is None else tuple(mfac_m)
        methods = default_method_names([m for m in sizes if m <= problem.num_samples])
    approximations = [
        m
        if isinstance(m, Approximation)
        else make_approximation(m, max_dense_dim=max_dense_dim, seed=seed)
        for m in methods
    ]
    if not approximations:
        raise ValueError("methods is empty: give at least one method")

    ref, ref_name = _reference_approximation(reference, max_dense_dim)
    t0 = time.perf_counter()
    ref.setup(problem, 1.0 if damping is None else damping)
    ref_setup = time.perf_counter() - t0
    ref_top = ref.top_eigenvalues(top_k)
    if damping is None:  # the reference was set up with a placeholder; its solves read it later
        damping = relative_damping * float(ref_top.abs().max())
        if not damping > 0:
            raise ValueError("the reference's top eigenvalue is zero; pass an explicit damping")
        ref.set_damping(damping)

    d = problem.num_params
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probes = torch.randn(d, num_probes, generator=gen, dtype=torch.float64)
    probes = probes.to(problem.device, problem.dtype)
    gradient = problem.gradient()
    targets = _Targets(probes, gradient, ref.ihvp(probes), ref.ihvp(gradient), ref_top)
    min_eig = ref.smallest_eigenvalue() if isinstance(ref, OperatorApproximation) else None
    if isinstance(ref, OperatorApproximation):
        kind = "dense" if ref.dense else "matrix-free"
    else:
        kind = "dense" if ref.solver == "dense-eigh" else "matrix-free"
    ref.release()

    result = BenchmarkResult(
        problem={
            "name": problem.name,
            "description": problem.description,
            "num_params": d,
            "num_samples": problem.num_samples,
            "loss": type(problem.loss_func).__name__,
            "dtype": str(problem.dtype).replace("torch.", ""),
            "device": str(problem.device),
            "loss_value": problem.loss(),
        },
        config={
            "methods": [a.name for a in approximations],
            "damping": damping,
            "relative_damping": relative_damping,
            "reference": ref_name,
            "max_dense_dim": max_dense_dim,
            "num_probes": num_probes,
            "top_k": top_k,
            "repeats": repeats,
            "seed": seed,
        },
        reference={
            "curvature": ref_name,
            "kind": kind,
            "top_eigenvalues": _floats(ref_top),
            "min_eigenvalue": min_eig,
            "setup_time_s": ref_setup,
        },
    )

    bar = _progress(progress, len(approximations))
    with bar as (advance, describe):
        for approx in approximations:
            describe(approx.name)
            result.records.append(
                measure(approx, problem, damping, targets, top_k=top_k, repeats=repeats)
            )
            advance()
    return result


class _NoProgress:
    def __enter__(self) -> tuple[Callable[[], None], Callable[[str], None]]:
        return (lambda: None), (lambda _name: None)

    def __exit__(self, *exc: object) -> None:
        return None


class _RichProgress:
    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]bench[/] {task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self.total = total

    def __enter__(self) -> tuple[Callable[[], None], Callable[[str], None]]:
        self.progress.__enter__()
        task = self.progress.add_task("", total=self.total)
        return (
            lambda: self.progress.advance(task),
            lambda name: self.progress.update(task, description=name),
        )

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)


def _progress(enabled: bool, total: int) -> _NoProgress | _RichProgress:
    if not enabled:
        return _NoProgress()
    try:
        return _RichProgress(total)
    except ImportError:
        return _NoProgress()
