"""Bad input raises a TypeError/ValueError; a rejected gradient leaves the window as it was."""

import math

import pytest
import torch

from curvopt.mfac import SlidingWindowMFAC, StaticMFAC


@pytest.mark.parametrize(
    "grads,err,match",
    [
        (torch.zeros(0, 5), ValueError, "empty"),
        (torch.zeros(3, 0), ValueError, "empty"),
        (torch.zeros(5), ValueError, "2-D"),
        (torch.zeros(2, 3, 4), ValueError, "2-D"),
        (torch.zeros(2, 3, dtype=torch.int64), TypeError, "float"),
        ([[1.0, 2.0]], TypeError, "torch.Tensor"),
        (torch.tensor([[1.0, math.nan]]), ValueError, "NaN"),
        (torch.tensor([[1.0, math.inf]]), ValueError, "NaN or Inf"),
    ],
)
def test_static_bad_grads(grads, err, match):
    with pytest.raises(err, match=match):
        StaticMFAC(grads, 1e-3)


@pytest.mark.parametrize(
    "damp,err",
    [
        (0.0, ValueError),
        (-1e-3, ValueError),
        (math.nan, ValueError),
        (math.inf, ValueError),
        ("1e-3", TypeError),
        (True, TypeError),
        (None, TypeError),
    ],
)
def test_bad_damp(damp, err):
    with pytest.raises(err, match="damp"):
        StaticMFAC(torch.randn(2, 3), damp)
    with pytest.raises(err, match="damp"):
        SlidingWindowMFAC(3, 2, damp)
    w = SlidingWindowMFAC(3, 2, 1.0)
    with pytest.raises(err, match="damp"):
        w.damp = damp
    if damp is not None:  # None in ihvp means "the operator's own damping"
        with pytest.raises(err, match="damp"):
            StaticMFAC(torch.randn(2, 3), 1.0).ihvp(torch.randn(3), damp=damp)
        with pytest.raises(err, match="damp"):
            w.ihvp(torch.randn(3), damp=damp)


@pytest.mark.parametrize("block_size,err", [(0, ValueError), (-4, ValueError), (2.5, TypeError)])
def test_static_bad_block_size(block_size, err):
    with pytest.raises(err, match="block_size"):
        StaticMFAC(torch.randn(2, 8), 1.0, block_size)


def test_static_bad_operands_and_indices():
    op = StaticMFAC(torch.randn(3, 10), 1e-2, block_size=4)
    with pytest.raises(ValueError, match=r"\(10,\)"):
        op.ihvp(torch.randn(9))
    with pytest.raises(ValueError, match="shape"):
        op.ihvp(torch.randn(10, 2, 2))
    with pytest.raises(TypeError, match="floating"):
        op.mul(torch.ones(10, dtype=torch.int32))
    with pytest.raises(ValueError, match="meta"):
        op.ihvp(torch.randn(10, device="meta"))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        op.inverse_entries(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        op.inverse_rows([-1])
    with pytest.raises(TypeError, match="integers"):
        op.inverse_rows(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="empty"):
        op.inverse_entries(torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="accumulate_dtype"):
        StaticMFAC(torch.randn(3, 10), 1e-2, accumulate_dtype=torch.float16)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(dim=0, m=2), ValueError, "dim"),
        (dict(dim=4, m=0), ValueError, "m must be"),
        (dict(dim=4, m=1.5), TypeError, "m must be"),
        (dict(dim=4, m=2, dtype=torch.int32), TypeError, "dtype"),
        (dict(dim=4, m=2, refresh_every=0), ValueError, "refresh_every"),
    ],
)
def test_window_bad_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        SlidingWindowMFAC(damp=1e-3, **kwargs)


def _snapshot(w):
    return (w.G.clone(), w.K.clone(), w.Ainv.clone(), w.count)


def _unchanged(w, snap):
    G, K, Ainv, count = snap
    return (
        torch.equal(w.G, G)
        and torch.equal(w.K, K)
        and torch.equal(w.Ainv, Ainv)
        and w.count == count
    )


@pytest.mark.parametrize(
    "g,err,match",
    [
        (torch.randn(7), ValueError, r"\(6,\)"),
        (torch.randn(6, 1), ValueError, r"\(6,\)"),
        (torch.ones(6, dtype=torch.int64), TypeError, "floating"),
        (torch.randn(6, device="meta"), ValueError, "meta"),
        (torch.tensor([1.0, 2, math.nan, 0, 0, 0]), ValueError, "NaN"),
        (torch.tensor([1.0, 2, 0, -math.inf, 0, 0]), ValueError, "NaN or Inf"),
        ("g", TypeError, "torch.Tensor"),
    ],
)
def test_window_bad_gradient_leaves_window_unchanged(g, err, match):
    w = SlidingWindowMFAC(6, 3, 1e-2)
    for _ in range(4):
        w.add(torch.randn(6))
    snap = _snapshot(w)
    with pytest.raises(err, match=match):
        w.add(g)
    assert _unchanged(w, snap)
    with pytest.raises(err, match=match):
        w.add_and_ihvp(g, torch.randn(6))
    assert _unchanged(w, snap)


def test_window_half_overflow_is_rejected():
    """1e6 is finite in float32 but overflows float16 storage: rejected, window unchanged."""
    w = SlidingWindowMFAC(4, 2, 1e-2, dtype=torch.float16)
    w.add(torch.ones(4))
    snap = _snapshot(w)
    with pytest.raises(ValueError, match="float16"):
        w.add(torch.tensor([1e6, 0.0, 0.0, 0.0]))
    assert _unchanged(w, snap)


def test_window_bad_operand_and_state():
    w = SlidingWindowMFAC(6, 3, 1e-2)
    w.add(torch.randn(6))
    snap = _snapshot(w)
    with pytest.raises(ValueError, match="shape"):
        w.add_and_ihvp(torch.randn(6), torch.randn(5))
    assert _unchanged(w, snap)  # the operand is checked before the gradient is added
    with pytest.raises(ValueError, match="dim=6, m=3"):
        SlidingWindowMFAC(6, 4, 1e-2).load_state_dict(w.state_dict())
    with pytest.raises(TypeError, match="bfloat16"):
        SlidingWindowMFAC(6, 3, 1e-2, dtype=torch.bfloat16).load_state_dict(w.state_dict())
    with pytest.raises(ValueError, match="missing"):
        w.load_state_dict({"dim": 6})


def test_window_skip_mode_masks_nonfinite_without_raising():
    d, m = 8, 3
    gen = torch.Generator().manual_seed(2)
    skip = SlidingWindowMFAC(d, m, 1e-2, dtype=torch.float64)
    ref = SlidingWindowMFAC(d, m, 1e-2, dtype=torch.float64)
    for _ in range(4):
        g = torch.randn(d, generator=gen, dtype=torch.float64)
        skip.add(g, on_nonfinite="skip")
        ref.add(g)
    assert bool(skip.last_finite) and int(skip.nonfinite_count) == 0
    bad = torch.randn(d, generator=gen, dtype=torch.float64)
    bad[3] = math.nan
    G_before = skip.G.clone()
    y = skip.add_and_ihvp(bad, on_nonfinite="skip")
    assert torch.isnan(y).any()  # NaN in, NaN out
    assert not bool(skip.last_finite) and int(skip.nonfinite_count) == 1
    assert torch.equal(skip.G, G_before) and skip.count == 5  # slot kept its old gradient
    x = torch.randn(d, generator=gen, dtype=torch.float64)
    assert torch.allclose(skip.ihvp(x), ref.ihvp(x), rtol=1e-10, atol=1e-12)
    skip.add(torch.ones(d, dtype=torch.float64), on_nonfinite="skip")
    assert bool(skip.last_finite) and int(skip.nonfinite_count) == 1
    ignore = SlidingWindowMFAC(d, m, 1e-2)
    ignore.add(torch.full((d,), math.inf), on_nonfinite="ignore")  # no check at all
    assert not torch.isfinite(ignore.G).all()
    with pytest.raises(ValueError, match="on_nonfinite"):
        ignore.add(torch.ones(d), on_nonfinite="warn")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_window_on_a_missing_device_is_a_value_error():
    with pytest.raises(ValueError, match="cannot allocate its buffer on device 'cuda'"):
        SlidingWindowMFAC(4, 2, 1e-2, device="cuda")


def test_transposed_gradients_warn_at_construction():
    """(d, m) = (10, 400) given for (m, d): a warning now, not a shape error at the first ihvp."""
    G = torch.randn(10, 400, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"\(m, d\) = \(400, 10\).*pass grads\.T"):
        StaticMFAC(G.T, 1e-2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        StaticMFAC(G, 1e-2)  # m < d: no warning
        StaticMFAC(torch.randn(32, 4, dtype=torch.float64), 1e-2)  # 8 d rows: still quiet
