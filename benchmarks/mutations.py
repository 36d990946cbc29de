"""Mutation score: apply realistic single mutations one at a time, run the tests that cover them.

Each entry of :data:`MUTATIONS` names a source file, one exact snippet in it (it must occur
exactly once), its mutated replacement and the test files (or ``file::test`` ids, or ``-k``
expressions after ``-k``) that should catch it. For each mutation the script writes the mutated
file, runs ``pytest -x`` on those tests in a fresh process, restores the file (always, also on
Ctrl-C) and records whether a test failed ("caught", with the first failing test) or all passed
("SURVIVED"). A run past ``--timeout`` seconds counts as caught by a hang (a distributed test's
deadline) and is marked so.

The mutations are of the code changed in the reliability wave (``git diff 6d0b6e3 -- curvopt
kernels``): off-by-one bounds, a wrong reduction or normalization, dropped arguments and
conditions, swapped operands, wrong dtypes. Run from the repository root::

    PYTHONPATH=. python benchmarks/mutations.py            # all, a markdown table at the end
    PYTHONPATH=. python benchmarks/mutations.py --check    # only check that every snippet exists
    PYTHONPATH=. python benchmarks/mutations.py --only 3 7 # some of them (1-based)

Never run it in a checkout with uncommitted edits of the mutated files: it restores the files
from their content read at the start of each mutation, not from git.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    path: str
    what: str
    old: str
    new: str
    tests: tuple[str, ...]


def M(path: str, what: str, old: str, new: str, *tests: str) -> Mutation:  # noqa: N802
    return Mutation(path, what, old, new, tests)


DIST_MISUSE = "tests/distributed/test_dist_misuse.py"
MUTATIONS = [
    # ---------------------------------------------------------------- mfac/window.py
    M(
        "curvopt/mfac/window.py",
        "since_refresh == refresh_every accepted (off by one)",
        "if since > count or since >= refresh_every:",
        "if since > count or since > refresh_every:",
        "tests/mfac/test_mfac_window.py",
        "tests/optim/test_corrupted_loads.py",
    ),
    M(
        "curvopt/mfac/window.py",
        "recorded fill level compared with min(count, m - 1)",
        '("filled", min(count, self.m))',
        '("filled", min(count, self.m - 1))',
        "tests/mfac/test_mfac_window.py",
        "tests/optim/test_corrupted_loads.py",
    ),
    M(
        "curvopt/mfac/window.py",
        "rows of K past count not checked (only G)",
        "if count < self.m and (bool(G[count:].any()) or bool(K[count:].any())):",
        "if count < self.m and bool(G[count:].any()):",
        "tests/mfac/test_mfac_window.py",
        "tests/optim/test_corrupted_loads.py",
    ),
    M(
        "curvopt/mfac/window.py",
        "K symmetry checked with allclose instead of exactly",
        "if not torch.equal(K, K.T):",
        "if not torch.allclose(K, K.T):",
        "tests/mfac/test_mfac_window.py",
        "tests/optim/test_corrupted_loads.py",
    ),
    M(
        "curvopt/mfac/window.py",
        "ranks' refine flag left out of the agreement all-reduce",
        '"refine": int(self.refine),\n',
        "",
        DIST_MISUSE,
    ),
    # ---------------------------------------------------------------- optim/_state_checks.py
    M(
        "curvopt/optim/_state_checks.py",
        "a group without lr not reported missing",
        "missing = set(optimizer.defaults) - set(saved) - TORCH_MANAGED_DEFAULTS",
        'missing = set(optimizer.defaults) - set(saved) - TORCH_MANAGED_DEFAULTS - {"lr"}',
        "tests/optim/test_corrupted_loads.py",
        "tests/optim/test_failed_loads.py",
    ),
    M(
        "curvopt/optim/_state_checks.py",
        "finiteness: any() instead of all()",
        "not bool(torch.isfinite(t).all()):",
        "not bool(torch.isfinite(t).any()):",
        "tests/optim/test_corrupted_loads.py",
        "tests/optim/test_failed_loads.py",
    ),
    M(
        "curvopt/optim/_state_checks.py",
        "non-tensor buffer not refused (dropped isinstance)",
        "if not isinstance(t, Tensor) or tuple(t.shape) != tuple(shape):",
        "if tuple(t.shape) != tuple(shape):",
        "tests/optim/test_corrupted_loads.py",
        "tests/optim/test_failed_loads.py",
    ),
    # ---------------------------------------------------------------- optim/mfac.py
    M(
        "curvopt/optim/mfac.py",
        "every step counted as skipped",
        "self._skipped.add_(bad.to(self._skipped.dtype))",
        "self._skipped.add_(1)",
        "tests/optim/test_mfac_optimizer.py",
        "tests/optim/test_mfac_defaults.py",
    ),
    M(
        "curvopt/optim/mfac.py",
        "grafted rows divided by the squared norm (no sqrt)",
        "row = row / norm2.sqrt().clamp_min(torch.finfo(g.dtype).tiny)",
        "row = row / norm2.clamp_min(torch.finfo(g.dtype).tiny)",
        "tests/optim/test_mfac_optimizer.py",
        "tests/optim/test_mfac_defaults.py",
    ),
    M(
        "curvopt/optim/mfac.py",
        "sharded load: every graft step count from parameter 0",
        'self.state[p]["step"] = steps[i].to(torch.float64).clone()',
        'self.state[p]["step"] = steps[0].to(torch.float64).clone()',
        "tests/distributed/test_dist_mfac_checkpoint.py",
    ),
    # ---------------------------------------------------------------- optim/npg.py
    M(
        "curvopt/optim/npg.py",
        "step length sqrt(delta / xFx) (factor 2 dropped)",
        'beta = torch.sqrt(2 * group["delta"] / xfx)',
        'beta = torch.sqrt(group["delta"] / xfx)',
        "tests/rl/test_npg.py",
    ),
    M(
        "curvopt/optim/npg.py",
        "score scaling 1/L instead of 1/sqrt(L)",
        "scale = batch.lengths().mean().clamp_min(1.0).rsqrt()",
        "scale = batch.lengths().mean().clamp_min(1.0).reciprocal()",
        "tests/rl/test_npg.py",
    ),
    M(
        "curvopt/optim/npg.py",
        "KL check against kl_tolerance alone (delta dropped)",
        'ok = bool(kl <= group["kl_tolerance"] * group["delta"])',
        'ok = bool(kl <= group["kl_tolerance"])',
        "tests/rl/test_npg.py",
    ),
    # ---------------------------------------------------------------- optim/pg_common.py
    M(
        "curvopt/optim/pg_common.py",
        "momentum weight 0 accepted",
        "if not 0.0 < eta <= 1.0:",
        "if not 0.0 <= eta <= 1.0:",
        "tests/rl/test_pg_optimizers.py",
        "tests/optim/test_pg_hyperparameters.py",
    ),
    M(
        "curvopt/optim/pg_common.py",
        "loaded momentum not bounded by 1",
        'momentum=check_number("momentum (η₀)", group["momentum"], high=1.0, high_open=False),',
        'momentum=check_number("momentum (η₀)", group["momentum"]),',
        "tests/optim/test_corrupted_loads.py",
        "tests/optim/test_pg_hyperparameters.py",
    ),
    M(
        "curvopt/optim/pg_common.py",
        "incomplete state accepted at step 1 (off by one)",
        'if step > 0 and not {"prev", "momentum"} <= set(entry):',
        'if step > 1 and not {"prev", "momentum"} <= set(entry):',
        "tests/optim/test_corrupted_loads.py",
        "tests/optim/test_pg_hyperparameters.py",
    ),
    # ---------------------------------------------------------------- mfac/static.py
    M(
        "curvopt/mfac/static.py",
        "transposed-grads test with m and d swapped",
        "if group is None and m >= _TRANSPOSED_RATIO * max(d, 1):",
        "if group is None and d >= _TRANSPOSED_RATIO * max(m, 1):",
        "tests/mfac/test_mfac_static.py",
        "tests/mfac/test_mfac_inputs.py",
    ),
    # ---------------------------------------------------------------- distributed.py
    M(
        "curvopt/distributed.py",
        "agreement check only flags hi < lo (never)",
        "if hi[i] != lo[i]",
        "if hi[i] < lo[i]",
        DIST_MISUSE,
    ),
    # ---------------------------------------------------------------- prune/patterns.py
    M(
        "curvopt/prune/patterns.py",
        "n == m accepted by parse_nm",
        "if n < 1 or n >= m:",
        "if n < 1 or n > m:",
        "tests/prune/test_nm_layerwise.py",
    ),
    M(
        "curvopt/prune/patterns.py",
        "already-pruned entries not kept pruned",
        "return out | ~alive",
        "return out",
        "tests/prune/test_nm_layerwise.py",
    ),
    M(
        "curvopt/prune/patterns.py",
        "ties go to the later entry (descending sort, last k)",
        "order = torch.argsort(s, dim=1, stable=True)[:, :k]",
        "order = torch.argsort(s, dim=1, descending=True, stable=True)[:, s.shape[1] - k :]",
        "tests/prune/test_nm_layerwise.py",
    ),
    # ---------------------------------------------------------------- prune/layerwise.py
    M(
        "curvopt/prune/layerwise.py",
        "validity of padded indices with <= (one filler too many)",
        "valid = torch.arange(k, device=W.device)[None, :] < counts[rows, None]",
        "valid = torch.arange(k, device=W.device)[None, :] <= counts[rows, None]",
        "tests/prune/test_nm_layerwise.py",
    ),
    M(
        "curvopt/prune/layerwise.py",
        "relative damping used when mean(diag H) is zero",
        "lam = damp * mean if relative and mean > 0 else float(damp)",
        "lam = damp * mean if relative else float(damp)",
        "tests/prune/test_nm_layerwise.py",
        "tests/prune/test_lm_baselines.py",
    ),
    M(
        "curvopt/prune/layerwise.py",
        "Hessian 2 X X^T / n without the factor 2",
        "H = 2 * h / c",
        "H = h / c",
        "tests/prune/test_nm_layerwise.py",
        "tests/prune/test_lm_baselines.py",
    ),
    # ---------------------------------------------------------------- prune/sharded.py
    M(
        "curvopt/prune/sharded.py",
        "relative damping not divided by the number of gradients",
        "return float(sq) / (self.dim * G.shape[0])",
        "return float(sq) / self.dim",
        "tests/distributed/test_dist_prune.py",
    ),
    # ---------------------------------------------------------------- curvature/batches.py
    M(
        "curvopt/curvature/batches.py",
        "labels shifted the wrong way",
        "nxt = labels[:, 1:]",
        "nxt = labels[:, :-1]",
        "tests/curvature/test_language_models.py",
    ),
    M(
        "curvopt/curvature/batches.py",
        "-100 labels not mapped to the loss's ignore_index",
        "y[:, :-1] = nxt.masked_fill(nxt == -100, ignore)",
        "y[:, :-1] = nxt",
        "tests/curvature/test_language_models.py",
    ),
    M(
        "curvopt/curvature/batches.py",
        "unshifted-label warning counts ignored positions",
        "    valid = y != ignore_index\n",
        "    valid = torch.ones_like(y, dtype=torch.bool)\n",
        "tests/curvature/test_language_models.py",
    ),
    # ---------------------------------------------------------------- curvature/losses.py
    M(
        "curvopt/curvature/losses.py",
        "BCE accepts int64 targets (only bool refused)",
        "if isinstance(loss_func, nn.BCEWithLogitsLoss) and not y.is_floating_point():",
        "if isinstance(loss_func, nn.BCEWithLogitsLoss) and y.dtype == torch.bool:",
        "tests/curvature/test_errors.py",
        "tests/curvature/test_loss_layouts.py",
    ),
    M(
        "curvopt/curvature/losses.py",
        "ignore_index dropped from the valid-term weights",
        "return (y != loss_func.ignore_index).unsqueeze(1).to(output.dtype)",
        "return torch.ones_like(y).unsqueeze(1).to(output.dtype)",
        "tests/curvature/test_loss_layouts.py",
        "tests/curvature/test_language_models.py",
    ),
    # ---------------------------------------------------------------- curvature/estimators
    M(
        "curvopt/curvature/estimators/hutchinson.py",
        "diagonal estimate divided by N - 1",
        "total += (V * AV).sum(1)\n    return total / num_matvecs",
        "total += (V * AV).sum(1)\n    return total / max(num_matvecs - 1, 1)",
        "tests/curvature/test_estimators.py",
    ),
    M(
        "curvopt/curvature/estimators/hutchinson.py",
        "squared Frobenius: square of the sum",
        "total = total + (AV * AV).sum()",
        "total = total + AV.sum().square()",
        "tests/curvature/test_estimators.py",
    ),
    # ------------------------------------- capo/masker.py (moved to token_mask.py and loss.py)
    M(
        "curvopt/capo/token_mask.py",
        "token Delta KL without the 1/2",
        "return dj, 0.5 * lr**2 * su.square()",
        "return dj, lr**2 * su.square()",
        "tests/capo/test_capo_predictions.py",
        "tests/capo/test_capo_mask.py",
    ),
    M(
        "curvopt/capo/token_mask.py",
        "sequence-level Delta KL summed, not averaged",
        "dkl[gi] = 0.5 * lr**2 * (w[idx][sel] * su.square()).sum() / w[idx][sel].sum()",
        "dkl[gi] = 0.5 * lr**2 * (w[idx][sel] * su.square()).sum()",
        "tests/capo/test_capo_mask.py",
        "tests/capo/test_capo_predictions.py",
    ),
    M(
        "curvopt/capo/loss.py",
        "penalty weights not multiplied by the kept mask",
        "                weights * m.keep,\n",
        "                weights,\n",
        "tests/capo/test_capo_penalty.py",
    ),
    # ---------------------------------------------------------------- capo/direction.py
    M(
        "curvopt/capo/direction.py",
        "Adam bias correction 2 without the sqrt",
        "denom = v_new.sqrt() / math.sqrt(bias_correction2) + eps",
        "denom = v_new.sqrt() / bias_correction2 + eps",
        "tests/capo/test_capo_optimizer_models.py",
    ),
    M(
        "curvopt/capo/direction.py",
        "the bias column takes the weight's hyperparameter",
        "out[-1] = float(values[1])",
        "out[-1] = float(values[0])",
        "tests/capo/test_capo_optimizer_models.py",
    ),
    M(
        "curvopt/capo/direction.py",
        "own Adam's second moment mixed with 1 - beta1",
        "self.exp_avg_sq = v * beta2 + grad.square() * (1 - beta2)",
        "self.exp_avg_sq = v * beta2 + grad.square() * (1 - beta1)",
        "tests/capo/test_capo_optimizer_models.py",
        "tests/capo/test_capo_penalty.py",
    ),
    # ---------------------------------------------------------------- integrations/trl.py
    M(
        "curvopt/integrations/trl.py",
        "scope 'all': weights normalized over TRL's mask",
        'n = k if self.capo_mask_scope == "all" else inputs["completion_mask"].float()',
        'n = inputs["completion_mask"].float()',
        "tests/integrations/test_capo_trl_penalty.py",
    ),
    M(
        "curvopt/integrations/trl.py",
        "rejected fraction counts the kept tokens",
        'counts = torch.stack([stats["num_valid"] - stats["num_kept"], stats["num_valid"]])',
        'counts = torch.stack([stats["num_kept"], stats["num_valid"]])',
        "tests/integrations/test_capo_trl_scope.py",
        "tests/integrations/test_capo_trl.py",
    ),
    M(
        "curvopt/integrations/trl.py",
        "predicted step KL averaged over micro-batches, not tokens",
        "kl = kl_sum / n_sum.clamp(min=1)",
        "kl = kl_sum / (n_sum.clamp(min=1) * len(window))",
        "tests/integrations/test_capo_trl.py",
    ),
    # ---------------------------------------------------------------- rl/lqr.py, rl/policies.py
    M(
        "curvopt/rl/lqr.py",
        "LQR matrices converted to float32",
        "return arr.astype(np.float64)",
        "return arr.astype(np.float32)",
        "tests/rl/test_lqr.py",
    ),
    M(
        "curvopt/rl/policies.py",
        "log sigma computed in the default dtype",
        "std = torch.as_tensor(action_std, dtype=torch.float64)",
        "std = torch.as_tensor(action_std, dtype=torch.get_default_dtype())",
        "tests/rl/test_pg_estimators.py",
        "tests/rl/test_lqr.py",
    ),
    # ---------------------------------------------------------------- kernels/gram_diag.py
    M(
        "kernels/gram_diag.py",
        "reference: last column of each block dropped",
        "block_end = min((b + 1) * B, d)",
        "block_end = min((b + 1) * B, d) - 1",
        "tests/kernels/test_gram_diag.py",
    ),
]


def check(mutations: list[Mutation]) -> None:
    for i, mut in enumerate(mutations, 1):
        n = (ROOT / mut.path).read_text().count(mut.old)
        if n != 1:
            raise SystemExit(f"mutation {i} ({mut.path}: {mut.what}): snippet found {n} times")


def run_one(mut: Mutation, timeout: float) -> tuple[str, str, float]:
    """``(verdict, first failing test or '', seconds)``; the file is restored afterwards."""
    path = ROOT / mut.path
    original = path.read_text()
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mut.tests]
    start = time.perf_counter()
    proc = None
    try:
        path.write_text(original.replace(mut.old, mut.new))
        # its own session: a timeout or an interrupt ends pytest and the ranks it spawned
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught (timeout)", "", time.perf_counter() - start
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        path.write_text(original)
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return "SURVIVED", "", seconds
    found = re.search(r"^(FAILED|ERROR) (\S+)", stdout, re.M)
    if proc.returncode not in (1, 2) or found is None:
        return f"caught (pytest exit {proc.returncode})", "", seconds
    return "caught", found.group(2), seconds


def _interrupt(signum, frame):  # SIGTERM restores the file too (through run_one's finally)
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the snippets")
    parser.add_argument("--only", type=int, nargs="*", help="1-based indices to run")
    parser.add_argument("--timeout", type=float, default=400.0, help="seconds per mutation")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    check(MUTATIONS)
    if args.check:
        print(f"{len(MUTATIONS)} mutations, every snippet found once")
        return
    chosen = args.only or range(1, len(MUTATIONS) + 1)
    rows = []
    for i in chosen:
        mut = MUTATIONS[i - 1]
        verdict, test, seconds = run_one(mut, args.timeout)
        rows.append((i, mut, verdict, test))
        print(f"[{i}] {verdict:<18} {seconds:6.1f} s  {mut.path}: {mut.what}  {test}", flush=True)
    caught = sum(v.startswith("caught") for _, _, v, _ in rows)
    print(f"\n{caught} of {len(rows)} caught ({100 * caught / max(len(rows), 1):.0f} %)\n")
    print("| # | module | mutation | result | first failing test |")
    print("|---|---|---|---|---|")
    for i, mut, verdict, test in rows:
        module = mut.path.removeprefix("curvopt/")
        print(f"| {i} | `{module}` | {mut.what} | {verdict} | `{test}` |")


if __name__ == "__main__":
    main()
