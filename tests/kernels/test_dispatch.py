"""Dispatch rules: which implementation runs for which tensor and environment."""

import pytest
import torch

from curvopt import kernels
from curvopt.kernels import dispatch

needs_triton = pytest.mark.skipif(not dispatch.triton_available(), reason="triton not installed")

CALLS = {
    "multi_dot": lambda: kernels.multi_dot(torch.ones(2, 3), torch.ones(1, 3)),
    "combine": lambda: kernels.combine(1.0, torch.ones(3), torch.ones(2, 3), torch.ones(2)),
    "gram_diag": lambda: kernels.gram_diag(torch.ones(2, 3), torch.ones(1, 2, 2)),
    "softmax_curvature": lambda: kernels.softmax_curvature(torch.zeros(2, 3), torch.ones(2, 3)),
}
EXPECTED = {
    "multi_dot": torch.full((2, 1), 3.0),
    "combine": torch.full((3,), 3.0),
    "gram_diag": torch.full((3,), 8.0),
    "softmax_curvature": torch.zeros(2, 3),
}


@pytest.fixture
def spy(monkeypatch):
    """Replace the Triton launchers by recorders; return the list of names called."""
    from curvopt.kernels import triton_impl

    called = []
    for name in CALLS:
        real = getattr(triton_impl, name)

        def record(*args, _name=name, _real=real):
            called.append(_name)
            return _real(*args) if triton_impl.INTERPRETED else None

        monkeypatch.setattr(triton_impl, name, record)
    return called


@needs_triton
@pytest.mark.parametrize("name", list(CALLS))
def test_env_var_forces_reference(monkeypatch, spy, name):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.testing.assert_close(CALLS[name](), EXPECTED[name])
    assert spy == []


@needs_triton
@pytest.mark.parametrize("name", list(CALLS))
def test_cpu_without_interpreter_uses_reference(monkeypatch, spy, name):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.use_triton(torch.ones(1))
    torch.testing.assert_close(CALLS[name](), EXPECTED[name])
    assert spy == []


@needs_triton
@pytest.mark.skipif(not dispatch.kernels_interpreted(), reason="kernels not built interpreted")
@pytest.mark.parametrize("name", list(CALLS))
def test_interpreter_runs_triton_on_cpu(monkeypatch, spy, name):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for mode in ("auto", "triton", "", "TRITON"):
        monkeypatch.setenv(dispatch.ENV_VAR, mode)
        spy.clear()
        torch.testing.assert_close(CALLS[name](), EXPECTED[name])
        assert spy == [name]


@needs_triton
def test_interpreter_set_after_import_uses_reference(monkeypatch):
    from curvopt.kernels import triton_impl

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_impl, "INTERPRETED", False)
    assert not dispatch.use_triton(torch.ones(1))
    assert "before the first import" in dispatch.triton_unavailable_reason(torch.ones(1))


def test_forced_triton_raises_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CURVOPT_KERNELS=triton"):
        CALLS["multi_dot"]()


def test_without_triton_everything_uses_reference(monkeypatch):
    monkeypatch.setattr(dispatch, "triton", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not dispatch.use_triton(torch.ones(1))
    assert "not installed" in dispatch.triton_unavailable_reason(torch.ones(1))
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="not installed"):
        dispatch.use_triton(torch.ones(1))


def test_unknown_mode_is_rejected(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="auto, reference, triton"):
        CALLS["combine"]()


def test_non_tensor_input_gets_a_clear_error():
    with pytest.raises(TypeError, match="G must be a torch.Tensor"):
        kernels.multi_dot([[1.0]], torch.ones(1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_use_triton(monkeypatch):
    if dispatch.triton_available():
        assert dispatch.use_triton(torch.ones(1, device="cuda"))
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert not dispatch.use_triton(torch.ones(1, device="cuda"))
