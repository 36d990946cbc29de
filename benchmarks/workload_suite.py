"""Workloads and optimizers for the optimizer study (issue #23): one harness, offline, CPU.

Workloads (all data ship with Python or scikit-learn; splits are fixed):

* ``char_lm``: a byte-level GPT-2 (transformers config, eager attention, about 1.0M parameters)
  on a fixed list of standard-library source files; the last 10 % of the concatenated text is
  the validation split. Validation loss in bits per byte (= per character, but for 136
  non-ASCII bytes in 332 kB).
* ``digits_ae``: a deep autoencoder 64-256-128-32-128-256-64 on sklearn's digits (MSE).
* ``digits_cnn``: a small CNN on sklearn's 8x8 digits (cross-entropy).

Optimizers: curvopt's MFAC at its defaults, MFAC with the authors' step (``graft=None``), torch
AdamW, SGD with momentum, heavyball's SOAP, MuonAdamW (Muon for matrices, AdamW for the rest)
and PSGD-Kron, and ista-daslab-optimizers' M-FAC when it imports. Each has an lr grid
(:data:`GRIDS`). A missing optional dependency, an unknown name or a diverging run is reported
as such (:class:`Outcome`), never raised.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

# ----------------------------------------------------------------------------- workloads

#: Standard-library files of the LM corpus (fixed; all ASCII in CPython 3.11).
CORPUS_FILES = (
    "textwrap.py", "difflib.py", "argparse.py", "heapq.py", "fractions.py", "shlex.py",
    "string.py", "bisect.py", "calendar.py", "pprint.py",
)  # fmt: skip


@dataclass
class Workload:
    """A model builder, a batch sampler and a validation loss, for one seed.

    Attributes:
        name: Workload name.
        steps: Training steps of a run.
        eval_every: Steps between validation evaluations.
        build: ``seed -> (model, batch(step) -> loss, val() -> float)``.
        unit: What the validation number is.
    """

    name: str
    steps: int
    eval_every: int
    build: Callable[[int], tuple[nn.Module, Callable[[int], torch.Tensor], Callable[[], float]]]
    unit: str


def _corpus() -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    return b"".join((root / f).read_bytes() for f in CORPUS_FILES)


def _char_lm(seed: int, n_embd: int = 128, n_layer: int = 5, seq: int = 64, batch: int = 8):
    import transformers

    data = torch.frombuffer(bytearray(_corpus()), dtype=torch.uint8).long()
    cut = int(0.9 * len(data))
    train, val = data[:cut], data[cut:]
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=seq, n_embd=n_embd, n_layer=n_layer, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(seed)
    # validation: 32 fixed windows spread over the held-out text
    starts = torch.linspace(0, len(val) - seq - 1, 32).long()
    vx = torch.stack([val[s : s + seq] for s in starts])

    def step_loss(step):
        idx = torch.randint(0, len(train) - seq - 1, (batch,), generator=gen)
        x = torch.stack([train[i : i + seq] for i in idx])
        return model(input_ids=x, labels=x).loss

    @torch.no_grad()
    def validate():
        return float(model(input_ids=vx, labels=vx).loss) / math.log(2)

    return model, step_loss, validate


def _digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1400], perm[1400:]
    return X[tr], y[tr], X[va], y[va]


def _digits_ae(seed: int, batch: int = 64):
    Xtr, _, Xva, _ = _digits()
    torch.manual_seed(seed)
    sizes = [64, 256, 128, 32, 128, 256, 64]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    gen = torch.Generator().manual_seed(seed)

    def step_loss(step):
        idx = torch.randint(0, len(Xtr), (batch,), generator=gen)
        return nn.functional.mse_loss(model(Xtr[idx]), Xtr[idx])

    @torch.no_grad()
    def validate():
        return float(nn.functional.mse_loss(model(Xva), Xva))

    return model, step_loss, validate


def _digits_cnn(seed: int, batch: int = 64):
    Xtr, ytr, Xva, yva = _digits()
    Xtr, Xva = Xtr.view(-1, 1, 8, 8), Xva.view(-1, 1, 8, 8)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(seed)

    def step_loss(step):
        idx = torch.randint(0, len(Xtr), (batch,), generator=gen)
        return nn.functional.cross_entropy(model(Xtr[idx]), ytr[idx])

    @torch.no_grad()
    def validate():
        return float(nn.functional.cross_entropy(model(Xva), yva))

    return model, step_loss, validate


WORKLOADS = {
    "char_lm": Workload("char_lm", 100, 10, _char_lm, "bits/byte"),
    "digits_ae": Workload("digits_ae", 400, 20, _digits_ae, "MSE"),
    "digits_cnn": Workload("digits_cnn", 200, 10, _digits_cnn, "cross-entropy"),
}

# ----------------------------------------------------------------------------- optimizers


def _mfac(params, lr):
    from curvopt.optim import MFAC

    return MFAC(params, lr=lr)


def _mfac_authors(params, lr):
    from curvopt.optim import MFAC

    # the authors' step and damping (graft=None, damp=1e-5) at the default window m = 32
    return MFAC(params, lr=lr, m=32, damp=1e-5, momentum=0.9, graft=None)


def _mfac_damp(damp, graft="adam"):
    def make(params, lr):
        from curvopt.optim import MFAC

        return MFAC(params, lr=lr, damp=damp, graft=graft)

    return make


def _heavyball(name):
    def make(params, lr):
        import heavyball

        heavyball.utils.compile_mode = None  # eager: no compile time inside the budget
        return getattr(heavyball, name)(params, lr=lr)

    return make


#: Modules that ``ista_daslab_optimizers`` (1.1.15) imports at package level but that a CPU
#: machine lacks: its CUDA extensions (built by the ``ista-daslab-optimizers-cuda`` sdist, which
#: needs ``CUDA_HOME``), a GPU monitor and a logger.
_ISTA_CPU_STUBS = (
    "ista_daslab_cuda_tools",
    "ista_daslab_cuda_micro_adam",
    "ista_daslab_cuda_sparse_mfac",
    "ista_daslab_cuda_dense_mfac",
    "gpustat",
    "wandb",
)


def _ista_dense_mfac_cls():
    """ista's ``DenseMFAC``; on a CPU its own PyTorch fallback, reached through stub modules.

    The package imports its CUDA extensions at package level (``tools.py``), although its dense
    M-FAC core has a PyTorch path for a missing ``ista_daslab_cuda_dense_mfac``. Where an
    extension is missing, empty stand-ins let the package import, ``wandb.log`` is a no-op, and
    ``dense_core_mfac.USE_CUDA = False`` selects that PyTorch path (the extensions are never
    called). Raises ImportError where the package itself is absent.
    """
    import importlib.util
    import types

    if importlib.util.find_spec("ista_daslab_optimizers") is None:
        raise ImportError("No module named 'ista_daslab_optimizers'")
    stubbed = [n for n in _ISTA_CPU_STUBS if importlib.util.find_spec(n) is None]
    for name in stubbed:
        mod = types.ModuleType(name)
        mod.log = lambda *a, **k: None  # wandb.log
        sys.modules[name] = mod
    from ista_daslab_optimizers.dense_mfac import dense_core_mfac
    from ista_daslab_optimizers.dense_mfac.dense_mfac import DenseMFAC

    if "ista_daslab_cuda_dense_mfac" in stubbed:
        dense_core_mfac.USE_CUDA = False
    return DenseMFAC


def _ista_mfac(params, lr):
    # the authors' implementation with the authors' step at MFAC-authors' window and damping
    return _ista_dense_mfac_cls()(params, lr=lr, weight_decay=0.0, ngrads=32, damp=1e-5)


#: Six points a factor ~3 apart for every optimizer, centred where its library's docs put lr.
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)

#: name -> (constructor(params, lr), lr grid). The grid is searched on the tuning seed 0; every
#: optimizer gets the same number of points (6).
GRIDS: dict[str, tuple[Callable, tuple[float, ...]]] = {
    "AdamW": (lambda ps, lr: torch.optim.AdamW(ps, lr=lr), ADAM_GRID),
    "MFAC": (_mfac, ADAM_GRID),
    "MFAC-authors": (_mfac_authors, (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)),
    "SGD-momentum": (
        lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
        (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
    ),
    "SOAP": (_heavyball("SOAP"), ADAM_GRID),
    "Muon+AdamW": (_heavyball("MuonAdamW"), (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "PSGD-Kron": (_heavyball("PSGDKron"), ADAM_GRID),
    "ista-MFAC": (_ista_mfac, (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)),
}

#: Ablations of MFAC's defaults (not in the default study; name them with --optimizers).
ABLATIONS: dict[str, tuple[Callable, tuple[float, ...]]] = {
    "MFAC-damp0.1": (_mfac_damp(0.1), ADAM_GRID),
    "MFAC-grad": (_mfac_damp(1.0, "adam-grad"), ADAM_GRID),
}


def lookup(name: str) -> tuple[Callable, tuple[float, ...]] | None:
    """The (constructor, lr grid) of an optimizer of :data:`GRIDS` or :data:`ABLATIONS`."""
    return GRIDS.get(name) or ABLATIONS.get(name)


# ----------------------------------------------------------------------------- runs


@dataclass
class Outcome:
    """One run: the validation curve, or why there is none.

    Attributes:
        status: ``"ok"``, ``"diverged"``, ``"missing dependency"``, ``"unknown workload"``,
            ``"unknown optimizer"`` or ``"error"``.
        detail: A short explanation for a status other than ``"ok"``.
        steps, cpu, val: The validation curve: step, CPU seconds of training so far
            (``time.process_time``, evaluation excluded), validation loss.
    """

    workload: str
    optimizer: str
    lr: float
    seed: int
    status: str = "ok"
    detail: str = ""
    steps: list[int] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    val: list[float] = field(default_factory=list)

    @property
    def final(self) -> float:
        """Last validation loss (NaN unless the run finished)."""
        return self.val[-1] if self.status == "ok" and self.val else float("nan")


#: optimizer name -> Python interpreter (another virtual environment) that runs it, for
#: optimizers whose package cannot join the main environment (``--python NAME=PATH``).
EXTERNAL_PYTHON: dict[str, str] = {}


def _external(python: str, args: list, out: Outcome) -> dict | None:
    """Run ``python workload_suite.py --one|--iter ARGS`` and return its JSON (or fill ``out``)."""
    cmd = [python, str(Path(__file__).resolve()), *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    except OSError as err:
        out.status, out.detail = "missing dependency", f"cannot run {python}: {err}"[:160]
        return None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        out.status, out.detail = "error", f"{python} exited {proc.returncode}: {why}"[:200]
        return None
    return json.loads(lines[-1])


def run(workload: str, optimizer: str, lr: float, seed: int, steps: int | None = None) -> Outcome:
    """Train one run; every failure becomes an :class:`Outcome` status, never an exception.

    An optimizer named in :data:`EXTERNAL_PYTHON` runs in that interpreter (a subprocess).
    """
    out = Outcome(workload, optimizer, lr, seed)
    if optimizer in EXTERNAL_PYTHON:
        got = _external(
            EXTERNAL_PYTHON[optimizer], ["--one", workload, optimizer, lr, seed, steps], out
        )
        return out if got is None else Outcome(**got)
    if workload not in WORKLOADS:
        out.status, out.detail = "unknown workload", f"{workload!r} not in {sorted(WORKLOADS)}"
        return out
    if lookup(optimizer) is None:
        known = sorted({**GRIDS, **ABLATIONS})
        out.status, out.detail = "unknown optimizer", f"{optimizer!r} not in {known}"
        return out
    wl = WORKLOADS[workload]
    try:
        model, batch_loss, validate = wl.build(seed)
        opt = lookup(optimizer)[0](model.parameters(), lr)
    except ImportError as err:
        out.status, out.detail = "missing dependency", str(err).splitlines()[0][:120]
        return out
    except Exception as err:  # e.g. an optimizer that needs a GPU: a row, not a crash
        out.status, out.detail = "error", f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        return out
    n = wl.steps if steps is None else steps
    cpu = 0.0
    out.steps.append(0), out.cpu.append(0.0), out.val.append(validate())
    try:
        for step in range(1, n + 1):
            t0 = time.process_time()
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(step)
            loss.backward()
            opt.step()
            cpu += time.process_time() - t0
            if step % wl.eval_every == 0 or step == n:
                v = validate()
                out.steps.append(step), out.cpu.append(cpu), out.val.append(v)
                if not math.isfinite(v) or not math.isfinite(float(loss.detach())):
                    out.status, out.detail = "diverged", f"non-finite loss at step {step}"
                    return out
    except Exception as err:  # a NaN gradient raising inside an optimizer counts as divergence
        nonfinite = "NaN" in str(err) or "Inf" in str(err) or "nan" in str(err)
        out.status = "diverged" if nonfinite else "error"
        out.detail = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return out


def iteration_times(
    workload: str, choices: dict[str, float], warmup: int = 5, rounds: int = 15
) -> dict[str, float]:
    """Median seconds of one training iteration (forward, backward, step) per optimizer.

    All optimizers train their own copy of the model; after ``warmup`` iterations each, the
    ``rounds`` are interleaved (one iteration of each optimizer per round), so load changes on
    the machine hit all of them alike. Optimizers that fail to build are left out. An optimizer
    of :data:`EXTERNAL_PYTHON` is timed in its interpreter, interleaved with AdamW (lr 1e-3)
    there, and reported as that ratio times this process's AdamW time.
    """
    wl = WORKLOADS[workload]
    runners, external = {}, {}
    for name, lr in choices.items():
        if name in EXTERNAL_PYTHON:
            got = _external(
                EXTERNAL_PYTHON[name],
                ["--iter", workload, name, lr, warmup, rounds],
                Outcome(workload, name, lr, 0),
            )
            if got and got.get("AdamW") and got.get(name):
                external[name] = got[name] / got["AdamW"]
            continue
        try:
            model, batch_loss, _ = wl.build(0)
            opt = lookup(name)[0](model.parameters(), lr)
        except Exception:
            continue

        def it(opt=opt, batch_loss=batch_loss):
            opt.zero_grad(set_to_none=True)
            batch_loss(0).backward()
            opt.step()

        runners[name] = it
    for it in runners.values():
        for _ in range(warmup):
            it()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for name, it in runners.items():
            t0 = time.perf_counter()
            it()
            times[name].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    if "AdamW" in med:
        med |= {k: r * med["AdamW"] for k, r in external.items()}
    return med


def _worker(argv: list[str]) -> None:
    """``--one WORKLOAD OPTIMIZER LR SEED STEPS`` or ``--iter WORKLOAD OPTIMIZER LR WARMUP
    ROUNDS``: one run or one timing in this interpreter, printed as one JSON line."""
    torch.set_num_threads(1)
    mode, workload, name, lr = argv[0], argv[1], argv[2], float(argv[3])
    if mode == "--one":
        steps = None if argv[5] == "None" else int(argv[5])
        print(json.dumps(asdict(run(workload, name, lr, int(argv[4]), steps))))
    else:
        print(
            json.dumps(
                iteration_times(workload, {"AdamW": 1e-3, name: lr}, int(argv[4]), int(argv[5]))
            )
        )


if __name__ == "__main__":
    _worker(sys.argv[1:])
