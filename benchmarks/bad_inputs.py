"""Bad-input sweep: call every public entry point with user mistakes and classify what happens.

Each case is one wrong call (a bad argument, bad data, a foreign state dict, an overflow-prone
damping, a bad command-line value). The outcome is one of

* ``clear``: a ValueError/TypeError raised by curvopt's own code (or, for the CLI, exit status 2
  with a usage message; or, where a result is still computed, a warning that names the problem);
* ``raw``: any other exception, or one raised inside torch/scipy/Python rather than by curvopt;
* ``silent``: no error, although the input was wrong or the result is wrong;
* ``state``: an error was raised but the object (model, optimizer, window) changed anyway.

Goal (issue #18): 0 raw, 0 silent, 0 state. Prints a table per entry point, the totals, and every
case that is not ``clear``. Takes under a minute on one CPU core.

    python benchmarks/bad_inputs.py            # tables
    python benchmarks/bad_inputs.py --verbose  # also one line per case
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import pathlib
import sys
import traceback
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness import print_table  # noqa: E402

import curvopt  # noqa: E402

OURS = (str(pathlib.Path(curvopt.__file__).parent), str(ROOT / "kernels"))


@dataclass
class Case:
    entry: str
    name: str
    call: Callable[[], object]
    state: Callable[[], object] | None = None  # fingerprint that must not change on error
    check: Callable[[object], bool] | None = None  # a result is fine if check(result) holds
    user_error: type[BaseException] | None = None  # the user's own exception, passed through


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def raised_by_us(err: BaseException) -> bool:
    """Raised by curvopt's checks, torch.optim's parameter checks, or Python's call binding."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    where = frames[-1].filename
    if where.startswith(OURS) or where.endswith("torch/optim/optimizer.py"):
        return True
    return isinstance(err, TypeError) and "required positional argument" in str(err)


def classify(case: Case) -> tuple[str, str]:
    before = copy.deepcopy(case.state()) if case.state else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with (
                contextlib.redirect_stdout(io.StringIO()),
                contextlib.redirect_stderr(io.StringIO()) as err_out,
            ):
                result = case.call()
        except SystemExit as exit_:
            usage = "usage:" in err_out.getvalue()
            ok = exit_.code == 2 and usage
            return ("clear" if ok else "raw"), f"exit {exit_.code}" + (
                "" if usage else ", no usage"
            )
        except Exception as err:  # noqa: BLE001 - classifying is the point
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:90] if str(err) else ''}"
            if case.state and not same(before, case.state()):
                return "state", msg
            if case.user_error is not None and type(err) is case.user_error:
                return "clear", f"the user's {msg} passed through, nothing changed"
            ours = isinstance(err, (ValueError, TypeError)) and raised_by_us(err)
            return ("clear" if ours else "raw"), msg
    if case.check is not None and case.check(result):
        return "clear", "correct result"
    # a curvopt warning with a stacklevel that names the caller points at this file (the cases
    # call curvopt's entry points, not torch's, so torch's own warnings point inside either)
    ours = [w for w in caught if str(w.filename).startswith(OURS) or w.filename == __file__]
    if ours:
        return "clear", f"warning: {str(ours[0].message)[:90]}"
    return "silent", "no error"


# ---------------------------------------------------------------------------------------------
# cases


def mfac_cases() -> list[Case]:
    from curvopt.mfac import SlidingWindowMFAC, StaticMFAC

    G = torch.randn(4, 10, dtype=torch.float64)
    out = []
    for name, kwargs in [
        ("damp=0", {"damp": 0.0}),
        ("damp=-1", {"damp": -1.0}),
        ("damp=nan", {"damp": math.nan}),
        ("damp=inf", {"damp": math.inf}),
        ("damp='1'", {"damp": "1"}),
        ("block_size=0", {"damp": 1.0, "block_size": 0}),
        ("block_size=1.5", {"damp": 1.0, "block_size": 1.5}),
        ("accumulate_dtype=int", {"damp": 1.0, "accumulate_dtype": torch.int32}),
    ]:
        out.append(Case("StaticMFAC()", name, lambda k=kwargs: StaticMFAC(G, **k)))
    for name, grads in [
        ("1-D grads", torch.randn(10)),
        ("int grads", torch.ones(4, 10, dtype=torch.int64)),
        ("NaN grads", torch.full((4, 10), math.nan)),
        ("0 grads", torch.zeros(0, 10)),
        ("list grads", [[1.0, 2.0]]),
    ]:
        out.append(Case("StaticMFAC()", name, lambda g=grads: StaticMFAC(g, 1.0)))
    static = StaticMFAC(G, 1.0)
    for name, v in [
        ("ihvp wrong length", torch.randn(9, dtype=torch.float64)),
        ("ihvp int", torch.ones(10, dtype=torch.int64)),
        ("ihvp list", [1.0] * 10),
    ]:
        out.append(Case("StaticMFAC.ihvp", name, lambda v=v: static.ihvp(v)))
    for name, idx in [
        ("index out of range", torch.tensor([10])),
        ("negative index", torch.tensor([-11])),
        ("float index", torch.tensor([1.5])),
    ]:
        out.append(
            Case("StaticMFAC.inverse_entries", name, lambda i=idx: static.inverse_entries(i))
        )
        out.append(Case("StaticMFAC.inverse_rows", name, lambda i=idx: static.inverse_rows(i)))
    # a plain list of indices is fine if the answer is right (dense float64 inverse)
    dense_inv = torch.linalg.inv(torch.eye(10, dtype=torch.float64) + G.T @ G / 4)
    out.append(
        Case(
            "StaticMFAC.inverse_entries",
            "list index",
            lambda: static.inverse_entries([1, 2]),
            check=lambda r: torch.allclose(r, dense_inv.diagonal()[[1, 2]]),
        )
    )
    out.append(
        Case(
            "StaticMFAC.inverse_rows",
            "list index",
            lambda: static.inverse_rows([1, 2]),
            check=lambda r: torch.allclose(r, dense_inv[[1, 2]]),
        )
    )
    # overflow-prone damping: a result is fine only if it is accurate (closed form)
    Gc = torch.full((2, 1), 1e4, dtype=torch.float64)
    Gc[0] *= -1.5
    c = (2.25e8 + 1e8) / 2
    for damp in (1e-9, 1e-160, 1e-200):
        want = 1.0 / (damp + c)
        out.append(
            Case(
                "StaticMFAC.ihvp",
                f"overflow damp={damp:g}",
                lambda d=damp: StaticMFAC(Gc, d).ihvp(torch.ones(1, dtype=torch.float64)),
                check=lambda r, w=want: (
                    bool(torch.isfinite(r).all()) and abs(float(r) - w) < 1e-3 * w
                ),
            )
        )
    # entries ~1e4, d = 1, m = 2 (the issue's case): F^{-1} x = x / (damp + |G|^2 / 2)
    Gr = torch.tensor([[1.3e4], [-0.7e4]], dtype=torch.float64)
    for damp in (1e-9, 1e-12):
        want = 1.0 / (damp + float(Gr.pow(2).sum()) / 2)
        out.append(
            Case(
                "StaticMFAC.ihvp",
                f"entries 1e4, d=1, m=2, damp={damp:g}",
                lambda d=damp: StaticMFAC(Gr, d).ihvp(torch.ones(1, dtype=torch.float64)),
                check=lambda r, w=want: (
                    bool(torch.isfinite(r).all()) and abs(float(r) - w) < 1e-3 * w
                ),
            )
        )

    # nearly dependent window gradients (d < m): the explicit m x m inverse used to fail silently
    def window_vs_dense(m, d, damp, grads, x):
        w = SlidingWindowMFAC(d, m, damp, dtype=torch.float64)
        for g in grads:
            w.add(g)
        kept = grads[-m:]
        F = damp * torch.eye(d, dtype=torch.float64) + kept.T @ kept / m
        R = float(torch.linalg.eigvalsh(F)[-1]) / damp
        want = torch.linalg.solve(F, x)
        err = float((w.ihvp(x) - want).norm() / want.norm())
        return err <= 1e3 * torch.finfo(torch.float64).eps * R  # the documented bound

    gen = torch.Generator().manual_seed(0)
    g_rep = torch.randn(3, 1, generator=gen, dtype=torch.float64) * 100
    x_rep = torch.randn(1, generator=gen, dtype=torch.float64)
    g_dep = 1e2 * (1 + torch.rand(11, 4, generator=gen, dtype=torch.float64))
    x_dep = torch.randn(4, generator=gen, dtype=torch.float64)
    for name, args in [
        ("m=2, d=1, damp=1e-4, one past m", (2, 1, 1e-4, g_rep, x_rep)),
        ("m=8, d=4, entries 1e2, damp=1e-7", (8, 4, 1e-7, g_dep, x_dep)),
    ]:
        out.append(
            Case(
                "SlidingWindowMFAC.ihvp",
                f"dependent gradients: {name}",
                lambda a=args: window_vs_dense(*a),
                check=bool,
            )
        )
    # blocks no wider than m: the Woodbury form of inverse entries/rows cancelled
    Gs = torch.randn(64, 96, generator=gen, dtype=torch.float64)
    small = StaticMFAC(Gs, 1e-8, block_size=32)
    Fs = torch.block_diag(
        *[Gs[:, i : i + 32].T @ Gs[:, i : i + 32] / 64 for i in range(0, 96, 32)]
    ) + 1e-8 * torch.eye(96, dtype=torch.float64)
    inv_s = torch.linalg.inv(Fs)
    idx_s = [0, 40, 95]
    out.append(
        Case(
            "StaticMFAC.inverse_entries",
            "blocks B=32 <= m=64, damp=1e-8",
            lambda: small.inverse_entries(idx_s),
            check=lambda r: bool(
                ((r - inv_s.diagonal()[idx_s]).abs() / inv_s.diagonal()[idx_s]).max() < 1e-10
            ),
        )
    )
    out.append(
        Case(
            "StaticMFAC.inverse_rows",
            "blocks B=32 <= m=64, damp=1e-8",
            lambda: small.inverse_rows(idx_s),
            check=lambda r: bool(
                ((r - inv_s[idx_s]).norm(dim=1) / inv_s[idx_s].norm(dim=1)).max() < 1e-10
            ),
        )
    )
    for name, kwargs in [
        ("dim=0", {"dim": 0, "m": 4, "damp": 1.0}),
        ("m=0", {"dim": 5, "m": 0, "damp": 1.0}),
        ("damp=0", {"dim": 5, "m": 4, "damp": 0.0}),
        ("dtype=int", {"dim": 5, "m": 4, "damp": 1.0, "dtype": torch.int32}),
        ("refresh_every=0", {"dim": 5, "m": 4, "damp": 1.0, "refresh_every": 0}),
    ]:
        out.append(Case("SlidingWindowMFAC()", name, lambda k=kwargs: SlidingWindowMFAC(**k)))
    window = SlidingWindowMFAC(5, 3, 1e-2, dtype=torch.float64)
    for _ in range(2):
        window.add(torch.randn(5, dtype=torch.float64))
    for name, call in [
        ("add wrong length", lambda: window.add(torch.randn(6, dtype=torch.float64))),
        ("add NaN", lambda: window.add(torch.full((5,), math.nan, dtype=torch.float64))),
        ("add on_nonfinite='x'", lambda: window.add(torch.randn(5), on_nonfinite="x")),
        ("ihvp 2-D wrong", lambda: window.ihvp(torch.randn(3, 4, dtype=torch.float64))),
        ("ihvp damp=-1", lambda: window.ihvp(torch.randn(5, dtype=torch.float64), damp=-1.0)),
        ("damp setter nan", lambda: setattr(window, "damp", math.nan)),
    ]:
        out.append(Case("SlidingWindowMFAC", name, call, state=window.state_dict))
    other = SlidingWindowMFAC(6, 3, 1e-2, dtype=torch.float64)
    other.add(torch.randn(6, dtype=torch.float64))
    other_m = SlidingWindowMFAC(5, 4, 1e-2, dtype=torch.float64)
    for name, st in [
        ("load state of another d", other.state_dict()),
        ("load state of another m", other_m.state_dict()),
        ("load empty dict", {}),
        ("load garbage", {"G": 3}),
    ]:
        out.append(
            Case(
                "SlidingWindowMFAC.load_state_dict",
                name,
                lambda s=st: window.load_state_dict(s),
                state=window.state_dict,
            )
        )
    return out


def _nan_grad(opt):
    def closure():
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.full_like(p, math.nan)
        return torch.tensor(0.0)

    return closure


def quadratic_closure(w, A):
    def closure():
        if w.grad is not None:
            w.grad = None
        loss = 0.5 * w @ A @ w - w.sum()
        loss.backward()
        return loss

    return closure


def optimizer_cases() -> list[Case]:
    from curvopt.optim import HARPG, MFAC, NHARPG, NPG, NPGIGT, GNSNewton

    out = []
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    ctor_bad = {
        "MFAC": (MFAC, [("lr=-1", {"lr": -1.0}), ("m=0", {"m": 0}), ("damp=0", {"damp": 0.0}),
                        ("momentum=1.5", {"momentum": 1.5}), ("damp=nan", {"damp": math.nan}),
                        ("weight_decay=-1", {"weight_decay": -1.0}), ("m=2.5", {"m": 2.5})]),
        "GNSNewton": (GNSNewton, [("gamma0=0", {"gamma0": 0.0, "curvature": torch.eye(3)}),
                                  ("curvature='x'", {"curvature": "x"}),
                                  ("hessian w/o model", {"curvature": "hessian"})]),
        "NPG": (NPG, [("delta=0", {"delta": 0.0}), ("solver='x'", {"solver": "x"}),
                      ("cg_iters=0", {"cg_iters": 0}),
                      ("backtrack_ratio=1", {"backtrack_ratio": 1.0}),
                      ("delta=inf", {"delta": math.inf}), ("damping=nan", {"damping": math.nan}),
                      ("cg_tol=nan", {"cg_tol": math.nan}),
                      ("kl_tolerance=inf", {"kl_tolerance": math.inf}),
                      ("max_backtracks=True", {"max_backtracks": True})]),
        "NHARPG": (NHARPG, [("lr=0", {"lr": 0.0}), ("lr=nan", {"lr": math.nan}),
                            ("lr_power=inf", {"lr_power": math.inf}),
                            ("momentum=nan", {"momentum": math.nan}),
                            ("momentum_power=-1", {"momentum_power": -1.0}),
                            ("normalize='yes'", {"normalize": "yes"})]),
        "NPGIGT": (NPGIGT, [("lr=-1", {"lr": -1.0}), ("momentum=2", {"momentum": 2.0}),
                            ("lr='0.1'", {"lr": "0.1"})]),
        "HARPG": (HARPG, [("lr=inf", {"lr": math.inf}), ("momentum_power=inf",
                                                          {"momentum_power": math.inf})]),
    }  # fmt: skip
    for cls_name, (cls, bads) in ctor_bad.items():
        for name, kwargs in bads:
            out.append(Case(f"{cls_name}()", name, lambda c=cls, k=kwargs: c([w], **k)))
    out.append(Case("MFAC()", "no params", lambda: MFAC([], lr=0.1)))
    out.append(Case("MFAC()", "complex params", lambda: MFAC([torch.zeros(2, dtype=torch.cfloat,
                                                               requires_grad=True)])))  # fmt: skip

    def trained_mfac(d, lr, m=4):
        p = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        opt = MFAC([p], lr=lr, m=m, damp=1e-2)
        closure = quadratic_closure(p, torch.eye(d, dtype=torch.float64))
        for _ in range(2):
            opt.step(closure)
        return opt, closure

    opt, closure = trained_mfac(3, 0.01)
    foreign = {
        "state of another d": trained_mfac(4, 0.5)[0].state_dict(),
        "state of another m": trained_mfac(3, 0.5, m=8)[0].state_dict(),
        "empty dict": {},
        "param_groups missing": {"state": {}},
    }
    for name, st in foreign.items():
        out.append(Case("MFAC.load_state_dict", name, lambda s=st: opt.load_state_dict(s),
                        state=lambda: (opt.state_dict(), opt.param_groups[0]["lr"])))  # fmt: skip
    out.append(Case("MFAC.step", "NaN gradient", lambda: opt.step(_nan_grad(opt))))

    def gns(d, gamma0):
        p = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        o = GNSNewton([p], curvature=torch.eye(d, dtype=torch.float64) * 2, gamma0=gamma0)
        o.step(quadratic_closure(p, torch.eye(d, dtype=torch.float64) * 2))
        return o, p

    g_opt, g_p = gns(3, 2.0)
    bad_size = g_opt.state_dict()
    bad_size["state"] = {**bad_size["state"], "param_group_numel": [3.5]}  # a corrupted record
    g_states = {
        "state of another d": gns(5, 14.0)[0].state_dict(),
        "empty": {},
        "recorded d corrupted": bad_size,
    }
    for name, st in g_states.items():
        out.append(Case("GNSNewton.load_state_dict", name, lambda s=st: g_opt.load_state_dict(s),
                        state=lambda: (g_opt.state_dict(), g_p.detach().clone())))  # fmt: skip
    out.append(Case("GNSNewton.step", "no closure", lambda: g_opt.step()))

    def nan_closure():
        g_opt.zero_grad()
        loss = (g_p**2).sum() * math.nan
        loss.backward()
        return loss

    out.append(Case("GNSNewton.step", "NaN loss", lambda: g_opt.step(nan_closure)))

    def no_reuse_nan_step():  # the closure is evaluated at x too
        g_opt.param_groups[0]["reuse_evaluation"] = False
        try:
            return g_opt.step(nan_closure)
        finally:
            g_opt.param_groups[0]["reuse_evaluation"] = True

    out.append(Case("GNSNewton.step", "NaN loss, reuse_evaluation=False", no_reuse_nan_step))
    return out


def curvature_cases() -> list[Case]:
    from curvopt.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator

    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    params = list(model.parameters())
    X, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    data = [(X, y)]
    loss = nn.CrossEntropyLoss()
    out = []
    for cls in (HessianOperator, GGNOperator, EmpiricalFisherOperator):
        n = cls.__name__
        out += [
            Case(f"{n}()", "model not a module", lambda c=cls: c(lambda x: x, loss, params, data)),
            Case(
                f"{n}()", "loss not a module", lambda c=cls: c(model, lambda a, b: a, params, data)
            ),
            Case(f"{n}()", "empty data", lambda c=cls: c(model, loss, params, [])),
            Case(f"{n}()", "no params", lambda c=cls: c(model, loss, [], data)),
            Case(f"{n}()", "batch not a pair", lambda c=cls: c(model, loss, params, [X])),
        ]
        op = cls(model, loss, params, data)
        out += [
            Case(f"{n} @", "wrong length", lambda o=op: o @ torch.randn(7, dtype=torch.float64)),
            Case(f"{n} @", "int vector", lambda o=op: o @ torch.ones(15, dtype=torch.int64)),
            Case(
                f"{n} @", "list of wrong shapes", lambda o=op: o @ [torch.randn(2), torch.randn(3)]
            ),
        ]
    bad_X = [(torch.randn(6, 5, dtype=torch.float64), y)]
    out.append(
        Case(
            "HessianOperator @",
            "X with wrong feature count",
            lambda: HessianOperator(model, loss, params, bad_X) @ torch.randn(15).double(),
        )
    )
    bad_y = [(X, torch.tensor([0, 1, 2, 7, 0, 1]))]
    out.append(Case("EmpiricalFisherOperator @", "label 7 of 3 classes",
                    lambda: EmpiricalFisherOperator(model, loss, params, bad_y)
                    @ torch.randn(15).double()))  # fmt: skip
    return out


def prune_cases() -> list[Case]:
    from curvopt.prune import CubicSchedule, one_shot_schedule, prunable_weights, prune

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    g = torch.Generator().manual_seed(1)
    X = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    data = [(X[s : s + 4], y[s : s + 4]) for s in range(0, 24, 4)]
    nan_data = list(data)
    nan_data[2] = (torch.full((4, 5), math.nan, dtype=torch.float64), data[2][1])
    shape_data = list(data)
    shape_data[1] = (torch.randn(4, 7, dtype=torch.float64), data[1][1])
    empty_data = [data[0], (X[:0], y[:0])] + data[1:]
    label_data = list(data)
    label_data[3] = (data[3][0], torch.tensor([0, 1, 9, 0]))
    loss = nn.CrossEntropyLoss()

    def stop(j, k, s):
        if j == 2:
            raise RuntimeError("callback")

    bads = [
        ("sparsity=1.0", {"sparsity": 1.0}),
        ("sparsity=-0.1", {"sparsity": -0.1}),
        ("sparsity=nan", {"sparsity": math.nan}),
        ("sparsity dict with global scope", {"sparsity": {"0": 0.5}}),
        ("unknown layer in dict", {"sparsity": {"x": 0.5}, "scope": "layer"}),
        ("method='random'", {"method": "random"}),
        ("scope='row'", {"scope": "row"}),
        ("update='x'", {"update": "x"}),
        ("damp_mode='x'", {"damp_mode": "x"}),
        ("damp=0", {"damp": 0.0}),
        ("damp=inf", {"damp": math.inf}),
        ("damp=nan", {"damp": math.nan}),
        ("num_grads=0", {"num_grads": 0}),
        ("grad_batch_size=0", {"grad_batch_size": 0}),
        ("block_size=0", {"block_size": 0}),
        ("block_size=1.5", {"block_size": 1.5}),
        ("steps=0", {"steps": 0}),
        ("steps=2.5", {"steps": 2.5}),
        ("max_multi=-1", {"max_multi": -1}),
        ("normalize='yes'", {"normalize": "yes"}),
        ("callback=3", {"callback": 3}),
        ("loss_func=None", {"loss_func": None}),
        ("loss_func=3", {"loss_func": 3}),
        ("data=None", {"data": None}),
        ("data=3", {"data": 3}),
        ("empty data", {"data": []}),
        ("iterator with steps>1", {"data": iter(data), "steps": 2}),
        ("NaN calibration X", {"data": nan_data}),
        ("X with wrong feature count", {"data": shape_data}),
        ("0-sample batch, grad_batch_size=None", {"data": empty_data, "grad_batch_size": None}),
        ("label 9 of 3 classes", {"data": label_data}),
        ("callback raises at step 2", {"callback": stop}),
        ("names=['nope']", {"names": ["nope"]}),
        ("layer_types=[nn.ReLU]", {"layer_types": [nn.ReLU]}),
    ]
    out = []
    for name, kwargs in bads:
        m = model()
        args = {"loss_func": loss, "data": data, "sparsity": 0.5, "num_grads": 4, "steps": 3}
        args.update(kwargs)
        own = RuntimeError if kwargs.get("callback") is stop else None
        out.append(Case("prune", name, lambda m=m, a=args: prune(m, **a),
                        state=lambda m=m: list(m.state_dict().items())
                        + [type(x) for x in m.modules()], user_error=own))  # fmt: skip
    frozen = model()
    frozen[2].weight.requires_grad_(False)
    out.append(Case("prune", "frozen weight (requires_grad=False)",
                    lambda: prune(frozen, loss, data, 0.5, num_grads=4),
                    state=lambda: list(frozen.state_dict().items())))  # fmt: skip
    out.append(Case("prune", "model not a module", lambda: prune("model", loss, data, 0.5)))
    out += [
        Case("one_shot_schedule", "steps=0", lambda: one_shot_schedule(0.5, 0)),
        Case("one_shot_schedule", "start > target", lambda: one_shot_schedule(0.5, 2, start=0.7)),
        Case("CubicSchedule", "end <= start", lambda: CubicSchedule(0.9, 10, 5, 1)),
        Case("CubicSchedule", "frequency=0", lambda: CubicSchedule(0.9, 0, 5, 0)),
        Case("prunable_weights", "no prunable layers", lambda: prunable_weights(nn.ReLU())),
    ]
    return out


def cli_cases() -> list[Case]:
    from curvopt.cli import main

    argvs = [
        ["prune", "--sparsity", "1.0"],
        ["prune", "--sparsity", "abc"],
        ["prune", "--model", "cnn", "--dataset", "iris"],
        ["prune", "--num-grads", "0"],
        ["prune", "--damp", "nan"],
        ["prune", "--seed", str(2**70)],
        ["prune", "--out", "README.md"],
        ["prune", "--method", "random"],
        ["demo", "--k", "0"],
        ["demo", "--k", "650"],
        ["demo", "--seed", "-1"],
        ["bench"],
        ["bench", "--problem", "resnet"],
        ["bench", "--problem", "mlp", "--seed", str(2**70)],
        ["bench", "--problem", "mlp", "--damping", "0"],
        ["bench", "--problem", "mlp", "--methods", "newton"],
        ["bench", "--problem", "mlp", "--plot", "out.pdf"],
        ["bench", "--problem", "mlp", "--json", "no/such/dir/x.json"],
        ["bench", "--problem", "mlp", "--device", "tpu"],
        ["bench", "--problem", "logistic", "--top-k", "1000", "--train-steps", "0"],
        ["nosuchcommand"],
    ]
    return [Case(f"curvopt {a[0]}", " ".join(a[1:]) or "(nothing)", lambda a=a: main(a))
            for a in argvs]  # fmt: skip


def bench_api_cases() -> list[Case]:
    from curvopt.bench import make_problem, run_benchmark

    problem = make_problem("logistic", train_steps=0)
    return [
        Case("make_problem", "unknown name", lambda: make_problem("resnet")),
        Case("make_problem", "train_steps=-1", lambda: make_problem("logistic", train_steps=-1)),
        Case("run_benchmark", "top_k > d", lambda: run_benchmark(problem, ["ggn"], top_k=100)),
        Case("run_benchmark", "unknown method", lambda: run_benchmark(problem, ["newton"])),
        Case("run_benchmark", "damping=-1", lambda: run_benchmark(problem, ["ggn"], damping=-1)),
        Case("run_benchmark", "methods=[]", lambda: run_benchmark(problem, [])),
    ]


def round3_cases() -> list[Case]:
    """Issue #27's cases: non-bool flags, complex matrices, a parameter twice, corrupted states,
    wrong-typed BCE targets, an optimizer without momentum for CAPO, a device this machine lacks."""
    from curvopt.capo.direction import direction_for
    from curvopt.capo.masker import CAPOMasker
    from curvopt.curvature import GGNOperator
    from curvopt.mfac import SlidingWindowMFAC, StaticMFAC
    from curvopt.optim import MFAC, NHARPG, NPG, GNSNewton
    from curvopt.rl.lqr import LinearQuadraticRegulator

    out = [
        Case("CAPOMasker()", "symmetric='False'", lambda: CAPOMasker(1.0, 1.0, symmetric="False")),
    ]
    eye = torch.eye(2, dtype=torch.float64)
    out.append(
        Case(
            "LinearQuadraticRegulator()",
            "complex A",
            lambda: LinearQuadraticRegulator(eye * (1 + 1j), eye, eye, eye, eye, discount=0.9),
        )
    )
    p = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    out.append(Case("MFAC()", "the same parameter twice", lambda: MFAC([p, p], lr=0.1, m=4)))
    head = nn.Linear(3, 2)
    sgd = torch.optim.SGD(head.parameters(), lr=0.1)
    out.append(Case("direction_for", "lr instead of a parameter", lambda: direction_for(sgd, 1.0)))
    if not torch.cuda.is_available():
        out.append(
            Case("SlidingWindowMFAC()", "device='cuda' without CUDA",
                 lambda: SlidingWindowMFAC(4, 2, 0.1, device="cuda"))
        )  # fmt: skip

    def warnings_of(fn):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
        return [str(w.message) for w in caught]

    out.append(
        Case("StaticMFAC()", "transposed (d, m) grads",
             lambda: warnings_of(lambda: StaticMFAC(torch.randn(64, 2), 0.1)),
             check=lambda msgs: any("grads.T" in m for m in msgs))
    )  # fmt: skip

    def trained(opt_cls, **kw):
        w = nn.Linear(3, 2).double()
        opt = opt_cls(w.parameters(), **kw)
        return w, opt

    def corrupt(entry, opt, edit):
        def call():
            bad = copy.deepcopy(opt.state_dict())
            edit(bad)
            opt.load_state_dict(bad)

        out.append(Case(entry, call.__qualname__, call, state=lambda: opt.state_dict()))

    _, npg = trained(NPG, delta=0.01)
    for name, edit in [
        ("delta -1", lambda s: s["param_groups"][0].update(delta=-1.0)),
        ("delta NaN", lambda s: s["param_groups"][0].update(delta=math.nan)),
        ("solver 'lbfgs'", lambda s: s["param_groups"][0].update(solver="lbfgs")),
        ("group without delta", lambda s: s["param_groups"][0].pop("delta")),
    ]:
        corrupt("NPG.load_state_dict", npg, edit)
        out[-1].name = name
    _, nh = trained(NHARPG, lr=0.1)
    for name, edit in [
        ("momentum 2", lambda s: s["param_groups"][0].update(momentum=2.0)),
        ("group without lr", lambda s: s["param_groups"][0].pop("lr")),
    ]:
        corrupt("NHARPG.load_state_dict", nh, edit)
        out[-1].name = name
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    gns = GNSNewton([w], curvature=torch.eye(3, dtype=torch.float64))
    corrupt("GNSNewton.load_state_dict", gns,
            lambda s: s["param_groups"][0].update(max_trials=0))  # fmt: skip
    out[-1].name = "max_trials 0"
    lin, mf = trained(MFAC, lr=0.1, m=2)
    lin(torch.randn(4, 3, dtype=torch.float64)).sum().backward()
    mf.step()

    def nan_momentum(s):
        buf = next(v for v in s["state"].values() if "momentum_buffer" in v)["momentum_buffer"]
        buf.view(-1)[0] = math.nan

    corrupt("MFAC.load_state_dict", mf, nan_momentum)
    out[-1].name = "NaN momentum buffer"
    win = SlidingWindowMFAC(4, 3, 0.1, dtype=torch.float64)
    win.add(torch.randn(4, dtype=torch.float64))
    out.append(
        Case("SlidingWindowMFAC.load_state_dict", "count 10**6",
             lambda: win.load_state_dict(dict(copy.deepcopy(win.state_dict()), count=10**6)),
             state=win.state_dict)
    )  # fmt: skip
    model = nn.Linear(3, 1).double()
    X = torch.randn(5, 3, dtype=torch.float64)
    for dtype in (torch.int64, torch.bool):
        y = torch.ones(5, 1, dtype=dtype)
        out.append(
            Case("GGNOperator()", f"BCE with {dtype} targets",
                 lambda y=y: GGNOperator(model, nn.BCEWithLogitsLoss(), list(model.parameters()),
                                         [(X, y)]) @ torch.ones(4, dtype=torch.float64))
        )  # fmt: skip
    return out


def main() -> int:
    torch.set_num_threads(1)
    cases = (
        mfac_cases()
        + optimizer_cases()
        + curvature_cases()
        + prune_cases()
        + cli_cases()
        + bench_api_cases()
        + round3_cases()
    )
    per_entry: dict[str, Counter] = defaultdict(Counter)
    problems = []
    verbose = "--verbose" in sys.argv
    for case in cases:
        kind, detail = classify(case)
        if verbose:
            print(f"{kind:6s} {case.entry} / {case.name}: {detail}")
        per_entry[case.entry][kind] += 1
        if kind != "clear":
            problems.append((kind, case.entry, case.name, detail))
    kinds = ("clear", "raw", "silent", "state")
    total = Counter()
    rows = []
    for entry, counts in per_entry.items():
        total.update(counts)
        rows.append([f"`{entry}`", sum(counts.values()), *(counts[k] for k in kinds)])
    rows.append(["**total**", sum(total.values()), *(total[k] for k in kinds)])
    print_table(["entry point", "cases", *kinds], rows, align="lr" + "r" * len(kinds), spaced=True)
    if problems:
        print()
        print_table(
            ["outcome", "entry point", "case", "what happened"],
            [
                [kind, f"`{entry}`", name, detail.replace("|", "/")]
                for kind, entry, name, detail in sorted(problems)
            ],
            spaced=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
