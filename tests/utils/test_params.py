import pytest
import torch

from curvopt.utils import check_vector, flat_grad, flatten, num_elements, trainable, unflatten


def test_flatten_unflatten_roundtrip():
    ts = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 1, 2)]
    v = flatten(ts)
    assert v.shape == (num_elements(ts),)
    for a, b in zip(unflatten(v, ts), ts):
        assert torch.equal(a, b)


def test_unflatten_matrix_keeps_trailing_dim():
    ts = [torch.randn(3, 4), torch.randn(5)]
    M = torch.randn(17, 2)
    parts = unflatten(M, ts)
    assert parts[0].shape == (3, 4, 2) and parts[1].shape == (5, 2)
    assert torch.equal(parts[0][..., 1].reshape(-1), M[:12, 1])


def test_trainable_excludes_frozen():
    a, b = torch.randn(2, requires_grad=True), torch.randn(3)
    assert trainable([a, b]) == [a]
    with pytest.raises(TypeError, match="tensors"):
        trainable([a, 3])


def test_flat_grad_none_handling():
    a, b = torch.randn(2, requires_grad=True), torch.randn(3, requires_grad=True)
    (a.sum() * 2).backward()
    g = flat_grad([a, b])
    assert torch.equal(g, torch.tensor([2.0, 2.0, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="no gradient"):
        flat_grad([a, b], none_as_zero=False)


def test_check_vector_errors():
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        check_vector(torch.zeros(3), 4)
    with pytest.raises(TypeError, match="dtype"):
        check_vector(torch.zeros(4), 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN"):
        check_vector(torch.tensor([0.0, float("nan")]), 2, finite=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_vector([1.0], 1)
    check_vector(torch.zeros(4, 2), 4, allow_matrix=True)
    with pytest.raises(ValueError, match="unflatten|length|parameters"):
        unflatten(torch.zeros(3), [torch.zeros(4)])
