"""Fused activations and mode-free layers in the dual forward pass: the values never change.

Truth: the transformers modules themselves (bitwise primal), their autograd slopes, and
``torch.func.jvp`` / ``vjp`` of the unchanged model in float64.
"""

import pytest
import torch
from dense_truth import flat_view, ggn_truth
from torch import nn
from torch.func import functional_call, jvp, vjp

from curvopt.curvature import GGNOperator, HessianOperator
from curvopt.curvature import activation_rules as ar
from curvopt.curvature._functional import dual_forward
from curvopt.curvature.dual_modules import fast_modules

activations = pytest.importorskip("transformers.activations")

ACTS = ["NewGELUActivation", "FastGELUActivation", "QuickGELUActivation"]


def wide_input(dtype, n=1000, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    return torch.cat([x, torch.tensor([0.0, -0.0, 1e-8, 30.0, -30.0])]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ACTS)
def test_rule_primal_is_the_module_output_bitwise(name, dtype):
    module = getattr(activations, name)()
    rule = ar.rule_for(type(module))
    assert rule is not None
    x = wide_input(dtype)
    assert torch.equal(rule(x)[0], module(x))


@pytest.mark.parametrize("name", ACTS)
def test_rule_slope_is_the_derivative_of_the_module(name):
    module = getattr(activations, name)()
    x = wide_input(torch.float64).requires_grad_()
    (truth,) = torch.autograd.grad(module(x).sum(), x)  # elementwise: the diagonal Jacobian
    slope = ar.rule_for(type(module))(x.detach())[1]
    torch.testing.assert_close(slope, truth, rtol=1e-12, atol=1e-14)


def mlp(act_names, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7)]
    for name in act_names:
        layers += [getattr(activations, name)(), nn.LayerNorm(7), nn.Linear(7, 7)]
    return nn.Sequential(*layers, nn.Linear(7, 3)).double()


def test_first_order_pass_gives_the_jvp_and_vjp_of_the_unchanged_model():
    model = mlp(ACTS)
    X = torch.randn(11, 5, dtype=torch.float64)
    named = dict(model.named_parameters())
    tangents = [torch.randn_like(p) for p in named.values()]

    def f(*ps):
        return functional_call(model, dict(zip(named, ps)), (X,))

    primals = tuple(p.detach() for p in named.values())
    out_truth, Jv_truth = jvp(f, primals, tuple(tangents))
    u = torch.randn_like(out_truth)
    JTu_truth = vjp(f, *primals)[1](u)

    with torch.enable_grad():
        out, Jv = dual_forward(model, X, nn.MSELoss(), named, tangents, first_order=True)
        JTu = torch.autograd.grad(out, list(named.values()), u)
    torch.testing.assert_close(out, out_truth, rtol=0, atol=0)
    torch.testing.assert_close(Jv, Jv_truth, rtol=1e-12, atol=1e-13)
    for g, t in zip(JTu, JTu_truth):
        torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-13)
    # the modules are restored
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("act", ["gelu_new", "gelu_fast", "quick_gelu"])
def test_ggn_of_a_gpt2_with_each_fused_activation_matches_dense_truth(act):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.GPT2Config(
        vocab_size=9, n_positions=5, n_embd=4, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager", activation_function=act,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).double().eval()
    ids = torch.randint(0, 9, (3, 5))
    labels = torch.randint(0, 9, (3, 5))
    X = {"input_ids": ids}
    theta, unflatten = flat_view(model)

    def forward(t):
        return functional_call(model, unflatten(t), (), X).logits.movedim(-1, 1)

    loss = nn.CrossEntropyLoss()
    truth = ggn_truth(forward, loss, labels, theta)
    G = GGNOperator(model, loss, list(model.parameters()), [(X, labels)])
    v = torch.randn(theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(G @ v, truth @ v, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ACTS)
def test_a_double_backward_through_a_fused_activation_is_exact(name):
    module = getattr(activations, name)()
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(ar.fused_forward(module)(x), x, w, create_graph=True)
    (g_truth,) = torch.autograd.grad(module(x), x, w, create_graph=True)
    c = torch.randn(6, dtype=torch.float64)
    got = torch.autograd.grad((g * c).sum(), (x, w))
    truth = torch.autograd.grad((g_truth * c).sum(), (x, w))
    for a, b in zip(got, truth):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_a_changed_activation_formula_is_not_fused(monkeypatch):
    """Another formula (a new transformers version, a hub kernel) keeps torch's own rules."""

    def exact_gelu(self, x):
        return nn.functional.gelu(x)

    monkeypatch.setattr(activations.NewGELUActivation, "forward", exact_gelu)
    model = nn.Sequential(nn.Linear(4, 4), activations.NewGELUActivation(), nn.Linear(4, 2))
    model = model.double()
    X = torch.randn(7, 4, dtype=torch.float64)
    named = dict(model.named_parameters())
    tangents = [torch.randn_like(p) for p in named.values()]
    calls = []
    monkeypatch.setattr(ar._FusedElementwise, "apply", lambda *a: calls.append(a))
    _, Jv = dual_forward(model, X, nn.MSELoss(), named, tangents, first_order=True)
    assert calls == []  # the probe showed another function: the rule was not used

    def f(*ps):
        return functional_call(model, dict(zip(named, ps)), (X,))

    _, truth = jvp(f, tuple(p.detach() for p in named.values()), tuple(tangents))
    torch.testing.assert_close(Jv, truth, rtol=1e-12, atol=1e-13)


def test_hessian_products_never_use_the_fused_rules(monkeypatch):
    calls = []
    real = ar._FusedElementwise.apply
    monkeypatch.setattr(ar._FusedElementwise, "apply", lambda *a: calls.append(1) or real(*a))
    model = mlp(["NewGELUActivation"])
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    params = list(model.parameters())
    H = HessianOperator(model, nn.MSELoss(), params, [(X, y)])
    v = torch.randn(H.shape[0], dtype=torch.float64)
    Hv = H @ v
    assert calls == []
    loss = nn.MSELoss()(model(X), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    truth = torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat @ v, params)])
    torch.testing.assert_close(Hv, truth, rtol=1e-10, atol=1e-12)
    G = GGNOperator(model, nn.MSELoss(), params, [(X, y)])
    G @ v
    assert calls  # the GGN does use them


def test_modules_are_restored_after_an_error_and_own_forwards_are_left_alone():
    model = nn.Sequential(nn.Linear(3, 3), activations.NewGELUActivation(), nn.Linear(3, 1))

    def own(x):
        return x

    model[2].forward = own
    with pytest.raises(ZeroDivisionError):
        with fast_modules(model, first_order=True):
            assert "forward" in model[0].__dict__ and "forward" in model[1].__dict__
            assert model[2].__dict__["forward"] is own
            raise ZeroDivisionError
    assert "forward" not in model[0].__dict__ and "forward" not in model[1].__dict__
    assert model[2].__dict__["forward"] is own


def test_layers_with_tensor_subclass_parameters_keep_their_forward():
    class Tagged(torch.Tensor):
        pass

    lin = nn.Linear(2, 2)
    lin.weight = nn.Parameter(torch.randn(2, 2).as_subclass(Tagged))
    model = nn.Sequential(lin, nn.Linear(2, 2))
    with fast_modules(model, first_order=False):
        assert "forward" not in lin.__dict__ and "forward" in model[1].__dict__


def test_dual_forward_without_first_order_keeps_activations_differentiable():
    """The Hessian path backpropagates through J v: the activation must stay torch's own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), activations.NewGELUActivation(), nn.Linear(6, 2))
    model = model.double()
    X = torch.randn(4, 5, dtype=torch.float64)
    params = list(model.parameters())
    named = dict(model.named_parameters())
    v = [torch.randn_like(p) for p in params]
    w = torch.randn(4, 2, dtype=torch.float64)
    with torch.enable_grad():
        _, Jv = dual_forward(model, X, nn.MSELoss(), named, v)
        got = torch.autograd.grad((Jv * w).sum(), params, allow_unused=True)
    # truth: d/dtheta <w, J v> = d/dtheta (v . grad_theta <w, f>), by double backward
    grads = torch.autograd.grad((model(X) * w).sum(), params, create_graph=True)
    truth = torch.autograd.grad(sum((g * t).sum() for g, t in zip(grads, v)), params,
                                allow_unused=True)  # fmt: skip
    for a, b, p in zip(got, truth, params):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
@pytest.mark.parametrize("shape", ["bare", "nested"])
def test_a_model_is_freed_after_its_products(kind, shape):
    """The per-model caches (parameter places, module sites) hold the model weakly."""
    import gc
    import weakref

    def run():
        if shape == "bare":
            model = nn.Linear(3, 2).double()
        else:
            model = nn.Sequential(nn.Linear(3, 4), activations.NewGELUActivation(),
                                  nn.Linear(4, 2)).double()  # fmt: skip
        cls = GGNOperator if kind == "ggn" else HessianOperator
        data = [(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))]
        op = cls(model, nn.MSELoss(), list(model.parameters()), data)
        op @ torch.randn(op.shape[0], dtype=torch.float64)
        return weakref.ref(model)

    ref = run()
    gc.collect()
    assert ref() is None


def test_a_tensor_subclass_input_keeps_its_torch_function():
    seen = []

    class Logged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs or {})

    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    x = torch.randn(2, 3).as_subclass(Logged)
    with fast_modules(model, first_order=True):
        out = model(x)
    assert seen and type(out) is Logged
    seen.clear()
    with fast_modules(model, first_order=True):
        model(torch.randn(2, 3))  # a plain input runs the layers without torch-function calls
    assert seen == []


def test_a_product_without_transformers_models_does_not_import_transformers():
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from torch import nn\n"
        "from curvopt.curvature import GGNOperator\n"
        "m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1))\n"
        "G = GGNOperator(m, nn.MSELoss(), list(m.parameters()),\n"
        "                [(torch.randn(4, 3), torch.randn(4, 1))])\n"
        "G @ torch.randn(G.shape[0])\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_module_registered_twice_is_changed_and_restored_once():
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, activations.NewGELUActivation(), lin, nn.Linear(3, 2)).double()
    X, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    theta, unflatten = flat_view(model)
    act = activations.NewGELUActivation()

    def forward(t):  # written out: functional_call does not restore a module registered twice
        p = unflatten(t)
        h = act(nn.functional.linear(X, p["0.weight"], p["0.bias"]))
        h = nn.functional.linear(h, p["0.weight"], p["0.bias"])
        return nn.functional.linear(h, p["3.weight"], p["3.bias"])

    truth = ggn_truth(forward, nn.MSELoss(), y, theta)
    G = GGNOperator(model, nn.MSELoss(), list(model.parameters()), [(X, y)])
    v = torch.randn(theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(G @ v, truth @ v, rtol=1e-10, atol=1e-12)
    assert all("forward" not in m.__dict__ for m in model.modules())
