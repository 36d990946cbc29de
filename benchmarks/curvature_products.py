"""Cost of one curvature-vector product relative to one gradient, ours vs curvlinops.

For an MLP 64-256-256-10 and a small CNN on sklearn's digits (float32), times one product over
the data set (Hessian-vector and GGN-vector) and divides it by the time of one gradient over the
same data, side by side in one run:

* curvopt's ``HessianOperator`` (both modes) and ``GGNOperator``,
* curvlinops' ``HessianLinearOperator`` and ``GGNLinearOperator`` (determinism check off),
* ``torch.compile`` of the torch.func mini-batch products (jvp of grad; jvp + vjp) where it
  works; each model gets a fresh compile (``torch._dynamo.reset()``), and a failure is reported
  in the table instead of stopping the run.

Timing: one thread (``torch.set_num_threads(1)``), rounds interleaved over all methods, median
over the rounds of the *thread CPU time* (``time.thread_time``), so other processes on a shared
machine do not distort the ratios; wall-clock medians are printed beside them.

``--model tinylm`` (part of ``all`` when transformers is installed): a tiny GPT-2 (2 layers,
width 32, vocabulary 64, eager attention) on padded dict batches (``input_ids``,
``attention_mask``, labels -100 at padding), cross-entropy averaged over the valid tokens; ours
takes the transformers model and the dict batches as they are, curvlinops a wrapper returning
``(N, V, S)`` logits with ``batch_size_fn`` (it weights batches by sequences, not tokens, so its
numbers differ; only the time is compared here). Rows: gradient, HVP, GGN-vp and EF-vp, and
two plain implementations of the GGN-vp without the operators' checks (for reference, not
floors: the operator can be faster): torch.func's ``jvp`` + ``vjp`` (eager), and one dual
forward pass + one backward pass written out in this script.

K-FAC rows (every model): the setup of a fresh `KFACOperator` / `EKFACOperator` (factors; EK-FAC
with its eigenvalue correction) against curvlinops' ``KFACLinearOperator`` /
``EKFACLinearOperator`` (MLP and CNN; curvlinops refuses GPT-2's ``Conv1D``, so tinylm is ours
only, the embeddings, layer norms and tied head left out with ``allow_unsupported=True``), with
``fisher_type="mc"`` (both libraries' default) and, for MLP and CNN, ``"type-2"``; then one
product and one exact damped inverse product (δ = 1e-3; curvlinops'
``KFACInverseLinearOperator(use_exact_damping=True)``) on the computed factors.

Usage: ``python benchmarks/curvature_products.py [--quick] [--no-compile] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from collections.abc import Callable

import torch
from harness import Stopwatch, median, print_table
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from curvopt.curvature import EmpiricalFisherOperator, GGNOperator, HessianOperator
from curvopt.curvature.losses import loss_hessian_product

try:
    import curvlinops
except ImportError:  # pragma: no cover - optional baseline
    curvlinops = None


def digits_data(num: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """The first ``num`` of sklearn's 8 x 8 digits (scaled to [0, 1]) in batches."""
    from sklearn.datasets import load_digits  # imported here: optional on a GPU machine

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:num] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[:num])
    return list(zip(X.split(batch_size), y.split(batch_size)))


def make_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def gradient_fn(model, loss_func, params, data) -> Callable[[], list[Tensor]]:
    """One gradient of the mean loss over the data (batch-size weighted, like the operators)."""
    n = sum(X.shape[0] for X, _ in data)

    def run():
        total = [torch.zeros_like(p) for p in params]
        for X, y in data:
            loss = loss_func(model(X), y) * (X.shape[0] / n)
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t.add_(g)
        return total

    return run


def compiled_products(model, loss_func, params, data):
    """torch.compile'd mini-batch HVP (jvp of grad) and GGN-vp (jvp + vjp) over the data."""
    names = [n for n, _ in model.named_parameters()]
    primals = tuple(p.detach() for p in params)
    n = sum(X.shape[0] for X, _ in data)

    def hvp_batch(v, X, y):
        def loss(ps):
            return loss_func(functional_call(model, dict(zip(names, ps)), (X,)), y)

        return jvp(grad(loss), (primals,), (v,))[1]

    def ggn_batch(v, X, y):
        def f(*ps):
            return functional_call(model, dict(zip(names, ps)), (X,))

        out, Jv = jvp(f, primals, v)
        _, vjp_fn = vjp(f, *primals)
        return vjp_fn(loss_hessian_product(loss_func, out, y, Jv))

    def over_data(batch_fn):
        def run(v):
            total = [torch.zeros_like(p) for p in params]
            for X, y in data:
                for t, h in zip(total, batch_fn(v, X, y)):
                    t.add_(h, alpha=X.shape[0] / n)
            return total

        return run

    # dynamo notes that kernels/dispatch.py caches triton_available(); harmless here
    warnings.filterwarnings("ignore", message=".*lru_cache.*", category=UserWarning)
    torch._dynamo.reset()  # a fresh compile per model (reuse across models fails, see docs)
    return over_data(torch.compile(hvp_batch)), over_data(torch.compile(ggn_batch))


def build_methods(model, data, compile_: bool) -> dict[str, tuple[str, Callable[[], object]]]:
    """name -> (kind, zero-argument callable doing one product / gradient)."""
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    d = sum(p.numel() for p in params)
    v = torch.randn(d, device=params[0].device)
    v_list = tuple(t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in params]), params))
    args = (model, loss_func, params, data)
    methods = {"gradient (eager)": ("grad", gradient_fn(*args))}
    H = HessianOperator(*args)  # mode="auto": reverse-over-forward for one vector
    H_rr = HessianOperator(*args, mode="reverse-over-reverse")
    H_fr = HessianOperator(*args, mode="forward-over-reverse")
    G = GGNOperator(*args)
    methods["HVP curvopt (default: reverse-over-forward)"] = ("hvp", lambda: H @ v)
    methods["HVP curvopt (reverse-over-reverse)"] = ("hvp", lambda: H_rr @ v)
    methods["HVP curvopt (forward-over-reverse)"] = ("hvp", lambda: H_fr @ v)
    methods["GGN-vp curvopt"] = ("ggn", lambda: G @ v)
    if curvlinops is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cH = curvlinops.HessianLinearOperator(*args, check_deterministic=False)
            cG = curvlinops.GGNLinearOperator(*args, check_deterministic=False)
        methods["HVP curvlinops"] = ("hvp", lambda: cH @ v)
        methods["GGN-vp curvlinops"] = ("ggn", lambda: cG @ v)
    methods.update(
        build_kfac_methods(
            *args, num_data=sum(X.shape[0] for X, _ in data), curvlinops_too=True, type2=True
        )
    )
    if compile_:
        try:
            hvp_c, ggn_c = compiled_products(*args)
            with Stopwatch() as watch:
                hvp_c(v_list)
                ggn_c(v_list)
            print(f"  torch.compile warm-up took {watch.seconds:.1f} s", flush=True)
            methods["HVP torch.compile(jvp(grad))"] = ("hvp", lambda: hvp_c(v_list))
            methods["GGN-vp torch.compile(jvp+vjp)"] = ("ggn", lambda: ggn_c(v_list))
        except Exception as err:  # report, do not stop the benchmark
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
            methods["torch.compile"] = ("failed", msg)
    return methods


def tinylm_setup(quick: bool):
    """The tiny GPT-2, padded dict batches, and the wrapper curvlinops takes."""
    from curvopt.bench.problems import tiny_gpt2

    vocab, seq = 64, 32
    model = tiny_gpt2(vocab_size=vocab, seq_len=seq, n_embd=32, n_layer=2, n_head=4)
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(1 if quick else 2):
        n = 8
        lengths = torch.randint(seq // 2, seq + 1, (n,), generator=gen)
        mask = (torch.arange(seq) < lengths[:, None]).long()
        ids = torch.randint(1, vocab, (n, seq), generator=gen) * mask
        labels = torch.full((n, seq), -100)
        labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
        data.append(({"input_ids": ids, "attention_mask": mask}, labels))

    class LogitsFirst(nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, batch):
            return self.lm(**batch).logits.movedim(-1, 1)

    return model, LogitsFirst(model), data


def _lm_pieces(model, params, v):
    names = [n for n, _ in model.named_parameters()]
    v_list = tuple(t.reshape(p.shape) for t, p in zip(v.split([p.numel() for p in params]), params))
    return names, v_list


def func_ggn(model, loss_func, params, data, v) -> Callable[[], list[Tensor]]:
    """The GGN-vp from torch's own ``jvp`` and ``vjp`` (two forward passes), batch by batch.

    A floor for the structure "forward-mode pass + reverse pass" without curvopt's checks,
    weighting by valid tokens like the operators (no ``.logits`` handling beyond the model's).
    """
    names, v_list = _lm_pieces(model, params, v)
    primals = tuple(p.detach() for p in params)
    terms = sum(int((y != -100).sum()) for _, y in data)

    def run():
        total = [torch.zeros_like(p) for p in params]
        for X, y in data:

            def f(*ps, X=X):
                return functional_call(model, dict(zip(names, ps)), (), X).logits.movedim(-1, 1)

            out, Jv = jvp(f, primals, v_list)
            _, vjp_fn = vjp(f, *primals)
            u = loss_hessian_product(loss_func, out, y, Jv.unsqueeze(0))[0]
            for t, g in zip(total, vjp_fn(u)):
                t.add_(g, alpha=int((y != -100).sum()) / terms)
        return total

    return run


def dual_ggn(model, loss_func, params, data, v) -> Callable[[], list[Tensor]]:
    """One forward pass with dual tensors (``forward_ad``, as the operators run it: with
    `DualArithmeticMode`, mode-free plain layers and fused activations), the output-space
    product and one backward pass, without the operators' batch checks."""
    from curvopt.curvature._functional import dual_forward

    names, v_list = _lm_pieces(model, params, v)
    named = dict(zip(names, params))
    terms = sum(int((y != -100).sum()) for _, y in data)

    def run():
        total = [torch.zeros_like(p) for p in params]
        for X, y in data:
            with torch.enable_grad():
                out, Jv = dual_forward(model, X, loss_func, named, v_list, first_order=True)
                with torch.no_grad():
                    u = loss_hessian_product(loss_func, out.detach(), y, Jv.unsqueeze(0))[0]
                grads = torch.autograd.grad(out, params, u)
            for t, g in zip(total, grads):
                t.add_(g, alpha=int((y != -100).sum()) / terms)
        return total

    return run


def build_lm_methods(quick: bool) -> dict[str, tuple[str, Callable[[], object]]]:
    model, wrapped, data = tinylm_setup(quick)
    loss_func = nn.CrossEntropyLoss()
    params = list(model.parameters())
    terms = sum(int((y != -100).sum()) for _, y in data)

    def gradient():
        total = [torch.zeros_like(p) for p in params]
        for X, y in data:
            loss = loss_func(model(**X).logits.movedim(-1, 1), y) * (int((y != -100).sum()) / terms)
            for t, g in zip(total, torch.autograd.grad(loss, params)):
                t.add_(g)
        return total

    v = torch.randn(sum(p.numel() for p in params))
    args = (model, loss_func, params, data)
    H, G, E = HessianOperator(*args), GGNOperator(*args), EmpiricalFisherOperator(*args)
    methods = {
        "gradient (eager)": ("grad", gradient),
        "HVP curvopt (auto: reverse-over-reverse, LayerNorm)": ("hvp", lambda: H @ v),
        "GGN-vp curvopt": ("ggn", lambda: G @ v),
        "EF-vp curvopt": ("ef", lambda: E @ v),
        "GGN-vp plain: torch.func jvp + vjp (eager, no checks)": ("ggn", func_ggn(*args, v)),
        "GGN-vp plain: one dual forward + one backward (no checks)": (
            "ggn",
            dual_ggn(*args, v),
        ),
    }
    if curvlinops is not None:
        cargs = (wrapped, loss_func, params, data)
        kw = dict(check_deterministic=False, batch_size_fn=lambda X: X["input_ids"].shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cH = curvlinops.HessianLinearOperator(*cargs, **kw)
            cG = curvlinops.GGNLinearOperator(*cargs, **kw)
            cE = curvlinops.EFLinearOperator(*cargs, **kw)
        methods["HVP curvlinops"] = ("hvp", lambda: cH @ v)
        methods["GGN-vp curvlinops"] = ("ggn", lambda: cG @ v)
        methods["EF-vp curvlinops"] = ("ef", lambda: cE @ v)
    # curvlinops' K-FAC refuses transformers' Conv1D: ours only
    methods.update(
        build_kfac_methods(
            *args,
            num_data=sum(X["input_ids"].shape[0] for X, _ in data),
            curvlinops_too=False,
            type2=False,
        )
    )
    return methods


def build_kfac_methods(
    model, loss_func, params, data, *, num_data: int, curvlinops_too: bool, type2: bool
) -> dict[str, tuple[str, Callable[[], object]]]:
    """K-FAC / EK-FAC: setup (a fresh operator and its factors), product, exact inverse product.

    Ours (`KFACOperator`, `EKFACOperator`; ``allow_unsupported=True`` leaves out the layers
    K-FAC does not cover) against curvlinops' ``KFACLinearOperator``/``EKFACLinearOperator``
    and ``KFACInverseLinearOperator(use_exact_damping=True)`` with the same options; both
    get ``num_data`` (no counting pass). ``type2`` adds rows with ``fisher_type="type-2"``
    (one backward pass per class).
    """
    from curvopt.curvature import EKFACOperator, KFACOperator

    damping = 1e-3
    fisher_types = ("mc", "type-2") if type2 else ("mc",)
    methods: dict[str, tuple[str, Callable[[], object]]] = {}

    def ours(cls, fisher_type):
        def make():
            op = cls(
                model, loss_func, params, data, fisher_type=fisher_type,
                allow_unsupported=True, num_data=num_data,
            )  # fmt: skip
            op.compute_kronecker_factors()
            return op

        return make

    def theirs(cls, fisher_type):
        def make():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                op = cls(
                    model, loss_func, params, data, fisher_type=fisher_type,
                    check_deterministic=False, num_data=num_data,
                )  # fmt: skip
                op.compute_kronecker_factors()
                if isinstance(op, curvlinops.EKFACLinearOperator):
                    op.compute_eigenvalue_correction()
            return op

        return make

    libraries = [("curvopt", ours, KFACOperator, EKFACOperator)]
    if curvlinops_too and curvlinops is not None:
        libraries.append(
            ("curvlinops", theirs, curvlinops.KFACLinearOperator, curvlinops.EKFACLinearOperator)
        )
    for fisher_type in fisher_types:
        for name, factory, kfac_cls, ekfac_cls in libraries:
            for label, cls in (("K-FAC", kfac_cls), ("EK-FAC", ekfac_cls)):
                make = factory(cls, fisher_type)
                methods[f"{label} setup {name} ({fisher_type})"] = ("kfac", make)
                if fisher_type != "mc":
                    continue
                op = make()
                if name == "curvopt":
                    inv = op.inverse(damping=damping)
                else:
                    inv = curvlinops.KFACInverseLinearOperator(
                        op, damping=damping, use_exact_damping=True
                    )
                v = torch.randn(op.shape[0])  # without the parameters K-FAC leaves out
                methods[f"{label} product {name}"] = ("kfac", lambda op=op, v=v: op @ v)
                methods[f"{label} inverse product {name} (exact damping)"] = (
                    "kfac",
                    lambda inv=inv, v=v: inv @ v,
                )
    return methods


def measure(
    methods, rounds: int, sync: Callable[[], None] = lambda: None
) -> dict[str, tuple[float, float]]:
    """Median (CPU seconds, wall seconds) per method, rounds interleaved.

    ``sync`` waits for queued device work (``torch.cuda.synchronize`` on a GPU, where only the
    wall times mean anything); it runs before each call starts and before its clocks stop.
    """
    runnable = {k: f for k, (kind, f) in methods.items() if kind != "failed"}
    for f in runnable.values():  # warm-up
        f()
    cpu = {k: [] for k in runnable}
    wall = {k: [] for k in runnable}
    for _ in range(rounds):
        for k, f in runnable.items():
            sync()
            with Stopwatch() as watch:
                f()
                sync()
            cpu[k].append(watch.cpu_seconds)
            wall[k].append(watch.seconds)
    return {k: (median(cpu[k]), median(wall[k])) for k in runnable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few rounds, no compile")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile rows even with --quick"
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--model",
        choices=["all", "mlp", "cnn", "tinylm"],
        default="all",
        help="'all' measures each model in a fresh process (one model's allocations and "
        "compiled code do not disturb the next)",
    )
    args, _ = parser.parse_known_args()
    if args.model == "all":
        try:
            import transformers  # noqa: F401

            lm = ("tinylm",)
        except ImportError:
            lm = ()
        for model in ("mlp", "cnn", *lm):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--model", model]
            if subprocess.run(cmd).returncode != 0:
                sys.exit(f"benchmark for {model} failed")
        return
    torch.set_num_threads(1)
    torch.manual_seed(0)
    num, batch = (256, 256) if args.quick else (1024, 512)
    rounds = args.rounds or (5 if args.quick else 21)
    compile_ = args.compile or not (args.quick or args.no_compile)
    data = digits_data(num, batch)
    print(
        f"digits, N={num} in batches of {batch}, float32, 1 thread, median of {rounds} rounds "
        "(ratio = CPU time / CPU time of one eager gradient)"
    )
    rows = []
    models = {
        "mlp": ("MLP 64-256-256-10", make_mlp),
        "cnn": ("CNN", make_cnn),
        "tinylm": ("tiny GPT-2", None),
    }
    for name, make in [models[args.model]]:
        if make is None:
            methods = build_lm_methods(args.quick)
            print(f"{name}: padded dict batches of 8 sequences x 32 tokens", flush=True)
        else:
            model = make()
            d = sum(p.numel() for p in model.parameters())
            print(f"{name}: d={d}", flush=True)
            methods = build_methods(model, data, compile_)
        times = measure(methods, rounds)
        base_cpu, base_wall = times["gradient (eager)"]
        for method, (kind, f) in methods.items():
            if kind == "failed":
                rows.append((name, method, f"failed ({f})", "", "", ""))
                continue
            c, w = times[method]
            rows.append(
                (
                    name,
                    method,
                    f"{c * 1e3:.2f}",
                    f"{c / base_cpu:.2f}",
                    f"{w * 1e3:.2f}",
                    f"{w / base_wall:.2f}",
                )
            )
    header = ("model", "product", "CPU ms", "x gradient", "wall ms", "x gradient (wall)")
    print_table(header, rows, padded=True)


if __name__ == "__main__":
    main()
