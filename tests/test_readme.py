"""The README's Python examples run as written, and their results are right.

Each block runs from a fixed seed; its results are then checked against independent dense
float64 computations (explicit matrices, torch.func derivatives), not against the package.
"""

import math
import pathlib
import re

import pytest
import torch
from torch.func import functional_call, hessian, jacrev

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
EPS32 = torch.finfo(torch.float32).eps


def run_block(index, seed=0):
    torch.manual_seed(seed)
    ns = {}
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), ns)
    return ns


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    run_block(index)


def _block(snippet):
    found = [i for i, b in enumerate(BLOCKS) if snippet in b]
    assert found, f"no README block contains {snippet!r}"
    return found[0]


def test_readme_curvature_results():
    ns = run_block(_block("HessianOperator"))
    model, data, v = ns["model"], ns["data"], ns["v"].double()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    model64 = model.double()

    def unflat(w):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            out[n] = w[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def loss(w):  # equal batch sizes: the mean of the batch means
        return sum(
            torch.nn.functional.cross_entropy(functional_call(model64, unflat(w), (X.double(),)), y)
            for X, y in data
        ) / len(data)

    H = hessian(loss)(w0)
    ggn = torch.zeros_like(H)
    for X, _ in data:
        J = jacrev(lambda w, X=X: functional_call(model64, unflat(w), (X.double(),)))(w0)
        p = torch.softmax(functional_call(model64, unflat(w0), (X.double(),)), -1)
        out_hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # CE Hessian in the logits
        ggn += torch.einsum("nai,nab,nbj->ij", J, out_hess, J) / (len(X) * len(data))
    torch.testing.assert_close(ns["Hv"].double(), H @ v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ns["Gv"].double(), ggn @ v, rtol=1e-4, atol=1e-6)
    top = torch.as_tensor(sorted(ns["top"]), dtype=torch.float64)
    torch.testing.assert_close(top, torch.linalg.eigvalsh(ggn)[-3:], rtol=1e-4, atol=1e-6)


def test_readme_mfac_results():
    ns = run_block(_block("StaticMFAC(grads"))
    grads, damp, m = ns["grads"], 1e-3, 64
    torch.manual_seed(0)  # replay the block's draws: the gradients, then the right-hand side
    assert torch.equal(torch.randn(64, 10_000), grads)
    rhs = torch.randn(10_000).double()
    G, x = grads.double(), ns["x"].double()
    blocks = range(0, 10_000, 1_000)
    Fx = (
        damp * x
        + torch.cat([G[:, s : s + 1000].T @ (G[:, s : s + 1000] @ x[s : s + 1000]) for s in blocks])
        / m
    )
    R = max(
        torch.linalg.eigvalsh(G[:, s : s + 1000] @ G[:, s : s + 1000].T)[-1].item() for s in blocks
    ) / (m * damp)
    # float32 products: the residual of F^-1 x is about eps32 * lambda_max(F)/damp
    assert float((Fx - rhs).norm() / rhs.norm()) < 10 * EPS32 * R
    F0 = damp * torch.eye(1000, dtype=torch.float64) + G[:, :1000].T @ G[:, :1000] / m
    want = torch.linalg.inv(F0).diagonal()
    assert float(((ns["diag"][:1000].double() - want).abs() / want).max()) < 1e-6
    window = ns["window"]
    assert window.count == 5
    Gw, step = window.G.double(), ns["step"].double()
    g = Gw[4]  # the last gradient added (the buffer still fills: rows 0..4)
    Rw = 1 + torch.linalg.eigvalsh(Gw @ Gw.T)[-1].item() / (32 * damp)
    resid = damp * step + Gw.T @ (Gw @ step) / 32 - g
    assert float(resid.norm() / g.norm()) < 10 * EPS32 * Rw


def test_readme_optimizer_reduces_the_loss():
    ns = run_block(_block("from curvopt.optim import MFAC"))
    model, X, y = ns["model"], ns["X"], ns["y"]
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(model(X), y))
    assert ns["opt"].window.count == 20
    assert loss < 0.95 * math.log(10)  # from about log(10) = 2.30 at initialization


def test_readme_pruning_reaches_the_sparsity():
    ns = run_block(_block("from curvopt.prune import prune"))
    weights = [m.weight for m in ns["model"] if isinstance(m, torch.nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert ns["report"].sparsity == pytest.approx(0.8, abs=1e-2)
    assert zeros / total == pytest.approx(0.8, abs=2e-2)
