"""The SparseGPT and Wanda baselines of the LM study against slow dense versions of the papers."""

import pathlib
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
from baselines.sparsegpt_wanda import sparsegpt_prune, wanda_prune  # noqa: E402


def problem(out=5, cols=16, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix
    W = torch.randn(out, cols, generator=g, dtype=torch.float64)
    return W, X


def slow_sparsegpt(W, X, pruned_of, nm=None, percdamp=0.01):
    """Column by column, row by row: OBS on the not yet processed columns with inv(H[j:, j:])."""
    H = 2 * X.T @ X / X.shape[0]
    H = H + percdamp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    W = W.clone()
    cols = W.shape[1]
    inv0 = [torch.linalg.inv(H[j:, j:])[0] for j in range(cols)]  # first row of each inverse
    pruned = pruned_of(W, torch.stack([r[0] for r in inv0])) if nm is None else None
    if nm is not None:
        pruned = torch.zeros_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        w = W[r]
        for j in range(cols):
            if nm is not None and j % nm[1] == 0:
                diag = torch.stack([inv0[i][0] for i in range(j, j + nm[1])])
                low = torch.argsort(w[j : j + nm[1]] ** 2 / diag, stable=True)[: nm[1] - nm[0]]
                pruned[r, j + low] = True
            if pruned[r, j]:
                w[j:] -= w[j] / inv0[j][0] * inv0[j]
                w[j] = 0
    return W


@pytest.mark.parametrize("blocksize", [16, 8, 4])
def test_sparsegpt_nm_is_column_wise_obs_on_the_remaining_columns(blocksize):
    W, X = problem()
    got = sparsegpt_prune(W, X, 0.5, nm=(2, 4), blocksize=blocksize)
    ref = slow_sparsegpt(W, X, None, nm=(2, 4))
    assert int((got.reshape(5, -1, 4) != 0).sum(2).max()) == 2
    assert torch.equal(got == 0, ref == 0)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-11)


def test_sparsegpt_nm_blocks_must_hold_whole_groups():
    W, X = problem()
    with pytest.raises(ValueError, match="multiple of m=4"):
        sparsegpt_prune(W, X, 0.5, nm=(2, 4), blocksize=6)


def test_sparsegpt_unstructured_one_block_selects_by_w2_over_the_trailing_inverse():
    W, X = problem()

    def pruned_of(W0, diag):  # lowest w^2 / [inv(H[j:, j:])]_00 over the whole layer
        score = W0**2 / diag[None, :]
        out = torch.zeros(W0.numel(), dtype=torch.bool)
        out[torch.argsort(score.reshape(-1), stable=True)[: W0.numel() // 2]] = True
        return out.reshape(W0.shape)

    got = sparsegpt_prune(W, X, 0.5, blocksize=16)
    ref = slow_sparsegpt(W, X, pruned_of)
    assert torch.equal(got == 0, ref == 0) and int((got == 0).sum()) == 40
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-11)


def test_sparsegpt_blocks_give_the_same_update_for_the_same_mask():
    W, X = problem(seed=3)
    got = sparsegpt_prune(W, X, 0.5, blocksize=4)  # masks chosen per block of 4
    ref = slow_sparsegpt(W, X, lambda W0, diag: got == 0)
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_wanda_keeps_the_largest_weight_times_input_norm(nm):
    W, X = problem()
    got = wanda_prune(W, X, 0.5, nm)
    norms = [float(X[:, j].pow(2).sum().sqrt()) for j in range(16)]
    for r in range(5):
        groups = [range(16)] if nm is None else [range(g, g + 4) for g in range(0, 16, 4)]
        for grp in groups:
            grp = list(grp)
            scores = sorted(grp, key=lambda j: (abs(float(W[r, j])) * norms[j], -j))
            drop = set(scores[: len(grp) // 2])
            for j in grp:
                assert float(got[r, j]) == (0.0 if j in drop else float(W[r, j]))


def test_llmcompressor_runner_turns_conv1d_into_the_same_linear_and_back():
    """llmcompressor skips transformers' Conv1D, so its runner swaps in nn.Linear: same function."""
    transformers = pytest.importorskip("transformers")
    from baselines.llmcompressor_run import conv1d_to_linear, linear_to_conv1d

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=32, n_positions=8, n_embd=16, n_layer=2, n_head=2, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 32, (3, 8))
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = conv1d_to_linear(model)
    assert len(names) == 8 and all(isinstance(model.get_submodule(n), nn.Linear) for n in names)
    assert torch.allclose(model(ids).logits, before, rtol=1e-12, atol=1e-12)
    linear_to_conv1d(model, names)
    assert all(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names)
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in state.items())
