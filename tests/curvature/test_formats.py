"""Input formats, exports (to_scipy with eigsh/cg) and the functional hvp."""

import copy

import numpy as np
import pytest
import torch
from problems import cached_problem, cached_reference
from scipy.sparse.linalg import cg, eigsh

from curvopt.curvature import GGNOperator, HessianOperator, hvp
from curvopt.utils.params import flatten, unflatten


@pytest.fixture(scope="module")
def ggn():
    problem = cached_problem("mlp-ce", "mean")
    op = GGNOperator(problem.model, problem.loss, problem.params, problem.data)
    return op, cached_reference("ggn", "mlp-ce", "mean")


def test_flat_matrix_and_list_formats_agree(ggn):
    op, G = ggn
    torch.manual_seed(1)
    V = torch.randn(op.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, G @ V, rtol=1e-10, atol=1e-12)
    # list of parameter-shaped vectors
    v_list = unflatten(V[:, 0], op.params)
    out = op @ v_list
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in op.params]
    torch.testing.assert_close(flatten(out), G @ V[:, 0], rtol=1e-10, atol=1e-12)
    # list of parameter-shaped matrices with a trailing column axis
    M_list = unflatten(V, op.params)
    out = op @ M_list
    assert [o.shape for o in out] == [(*p.shape, 3) for p in op.params]
    flat = torch.cat([o.reshape(-1, 3) for o in out])
    torch.testing.assert_close(flat, G @ V, rtol=1e-10, atol=1e-12)
    # a tuple works like a list; a single column matrix keeps its column axis
    assert (op @ V[:, :1]).shape == (op.shape[0], 1)
    torch.testing.assert_close(flatten(op @ tuple(v_list)), G @ V[:, 0], rtol=1e-10, atol=1e-12)


def test_zero_columns(ggn):
    op, _ = ggn
    assert (op @ torch.zeros(op.shape[1], 0, dtype=torch.float64)).shape == (op.shape[0], 0)
    empty = op @ [torch.zeros(*p.shape, 0, dtype=torch.float64) for p in op.params]
    assert [t.shape for t in empty] == [(*p.shape, 0) for p in op.params]


def test_hessian_with_another_loss_module():
    problem = cached_problem("mlp-mse", "mean")
    loss = torch.nn.BCEWithLogitsLoss()
    data = [(X, torch.rand_like(y)) for X, y in problem.data]
    op = HessianOperator(problem.model, loss, problem.params, data)
    X = torch.cat([X for X, _ in data])
    Y = torch.cat([y for _, y in data])

    def risk(theta):
        return loss(torch.func.functional_call(problem.model, problem.unflatten(theta), (X,)), Y)

    expected = torch.func.hessian(risk)(problem.theta())
    torch.testing.assert_close(op.to_dense(), expected, rtol=1e-10, atol=1e-12)
    v = torch.randn(op.shape[1], dtype=torch.float64)
    torch.testing.assert_close(op @ v, expected @ v, rtol=1e-10, atol=1e-12)


def test_to_scipy_eigsh_and_cg(ggn):
    op, G = ggn
    A = op.to_scipy()
    assert A.shape == op.shape and A.dtype == np.float64
    top = np.sort(eigsh(A, k=3, which="LA", return_eigenvectors=False))
    expected = torch.linalg.eigvalsh(G)[-3:].numpy()
    np.testing.assert_allclose(top, expected, rtol=1e-8, atol=1e-10)
    # damped system (G + I) x = b solved by conjugate gradients
    b = np.random.default_rng(0).standard_normal(op.shape[0])
    from scipy.sparse.linalg import LinearOperator

    damped = LinearOperator(op.shape, matvec=lambda x: A @ x + x, dtype=np.float64)
    x, info = cg(damped, b, rtol=1e-12, maxiter=500)
    assert info == 0
    x_ref = torch.linalg.solve(G + torch.eye(G.shape[0], dtype=G.dtype), torch.from_numpy(b))
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-7, atol=1e-9)


def test_hessian_eigsh_matches_eigvalsh():
    problem = cached_problem("mlp-mse", "sum")
    H = cached_reference("hessian", "mlp-mse", "sum")
    op = HessianOperator(problem.model, problem.loss, problem.params, problem.data)
    top = np.sort(eigsh(op.to_scipy(), k=2, which="LM", return_eigenvectors=False))
    evals = torch.linalg.eigvalsh(H)
    expected = np.sort(evals[evals.abs().argsort()[-2:]].numpy())
    np.testing.assert_allclose(top, expected, rtol=1e-8, atol=1e-10)


def test_float32_operator_runs_in_float32():
    problem = cached_problem("mlp-mse", "mean")
    model = copy.deepcopy(problem.model).float()
    data = [(X.float(), y.float()) for X, y in problem.data]
    op = GGNOperator(model, problem.loss, list(model.parameters()), data)
    assert op.dtype == torch.float32
    v = torch.randn(op.shape[1])
    out = op @ v
    assert out.dtype == torch.float32
    G = cached_reference("ggn", "mlp-mse", "mean")
    torch.testing.assert_close(out.double(), G @ v.double(), rtol=1e-4, atol=1e-5)
    assert op.to_scipy().dtype == np.float32


def test_functional_hvp_matches_torch_hessian():
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)

    def loss(W, c):
        return torch.sin(W @ A).pow(2).sum() + (c * b).exp().sum() + (W.sum() * c).prod()

    W, c = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    vW, vc = torch.randn_like(W), torch.randn_like(c)
    theta = torch.cat([W.reshape(-1), c])
    H = torch.func.hessian(lambda t: loss(t[:8].reshape(2, 4), t[8:]))(theta)
    expected = H @ torch.cat([vW.reshape(-1), vc])
    out = hvp(loss, [W, c], [vW, vc])
    assert out[0].shape == W.shape and out[1].shape == c.shape
    torch.testing.assert_close(flatten(out), expected, rtol=1e-10, atol=1e-12)
    flat = hvp(loss, [W, c], torch.cat([vW.reshape(-1), vc]))
    torch.testing.assert_close(flat, expected, rtol=1e-10, atol=1e-12)
    single = hvp(lambda x: (x**3).sum(), c, vc)
    torch.testing.assert_close(single, 6 * c * vc)


def test_functional_hvp_bad_input():
    c = torch.randn(3)
    with pytest.raises(ValueError, match="shaped like params"):
        hvp(lambda x: x.sum(), [c], [torch.randn(4)])
    with pytest.raises(ValueError, match="shape"):
        hvp(lambda x: x.sum(), [c, c], torch.randn(5))
    with pytest.raises(ValueError, match="scalar"):
        hvp(lambda x: x * 2, c, torch.randn(3))
    with pytest.raises(TypeError, match="dtype"):
        hvp(lambda x: x.sum(), [c], [torch.randn(3, dtype=torch.float64)])
