"""``curvopt demo``: a short, real computation on built-in data (sklearn digits, no download).

Trains softmax regression on the digits set for a few steps and reports the top eigenvalues of the
loss Hessian, computed matrix-free with :class:`~curvopt.curvature.HessianOperator` and
``scipy.sparse.linalg.eigsh``, next to an independent dense reference (``torch.func.hessian``).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch.func import functional_call, grad

from curvopt.cli_types import positive_int, seed
from curvopt.curvature import HessianOperator
from curvopt.utils import unflatten

#: Parameters of the demo's model: softmax regression from 64 pixels to 10 classes.
NUM_PARAMS = 64 * 10 + 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the demo's options."""
    parser.add_argument("--seed", type=seed, default=0, help="random seed")
    parser.add_argument(
        "--k", type=positive_int, default=5, help=f"number of top eigenvalues, < d = {NUM_PARAMS}"
    )
    parser.set_defaults(_parser=parser)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print a short table."""
    from sklearn.datasets import load_digits

    if args.k >= NUM_PARAMS:  # eigsh (ARPACK) finds at most d - 1 eigenvalues
        args._parser.error(f"--k {args.k}: at most {NUM_PARAMS - 1} eigenvalues (d = {NUM_PARAMS})")
    torch.manual_seed(args.seed)
    _progress("1/3", "softmax regression on sklearn's digits: 50 gradient steps")
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float64)
    y = torch.tensor(y)
    model = torch.nn.Linear(64, 10).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    sizes = [params[k].numel() for k in names]

    def loss_of(flat):
        chunks = torch.split(flat, sizes)
        p = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return torch.nn.functional.cross_entropy(functional_call(model, p, (X,)), y)

    w = torch.cat([params[k].reshape(-1) for k in names])
    for _ in range(50):  # a few gradient steps so the Hessian is not the one at init
        w = w - 1.0 * grad(loss_of)(w)

    with torch.no_grad():
        for p, value in zip(model.parameters(), unflatten(w, list(model.parameters()))):
            p.copy_(value)
    H = HessianOperator(model, torch.nn.CrossEntropyLoss(), list(model.parameters()), [(X, y)])
    d = H.shape[0]
    op = H.to_scipy()
    _progress("2/3", f"top {args.k} eigenvalues, matrix-free (Hessian-vector products + eigsh)")
    t0 = time.perf_counter()
    top = np.sort(eigsh(op, k=args.k, which="LA", return_eigenvectors=False))[::-1]
    t_free = time.perf_counter() - t0
    _progress("3/3", f"the dense reference: the {d} x {d} Hessian and its eigenvalues")
    t0 = time.perf_counter()
    dense = torch.linalg.eigvalsh(torch.func.hessian(loss_of)(w)).flip(0)[: args.k].numpy()
    t_dense = time.perf_counter() - t0
    print(f"softmax regression on sklearn digits: {X.shape[0]} samples, d = {d} parameters")
    print(f"loss after 50 gradient steps: {loss_of(w).item():.4f}")
    print(f"{'k':>3} {'matrix-free (HVP+eigsh)':>26} {'dense eigvalsh':>16}")
    for i, (a, b) in enumerate(zip(top, dense)):
        print(f"{i + 1:>3} {a:>26.8f} {b:>16.8f}")
    print(f"time: matrix-free {t_free:.2f} s, dense {t_dense:.2f} s")
    return 0


def _progress(step: str, what: str) -> None:
    """One progress line on standard error (the results go to standard output)."""
    print(f"[{step}] {what} ...", file=sys.stderr, flush=True)
