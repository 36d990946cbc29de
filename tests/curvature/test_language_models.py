"""A tiny GPT-2 (random init, eager attention) on padded dict batches against dense fp64 truth."""

import pytest
import torch
from dense_truth import ce_fisher_truth, ef_truth, flat_view, ggn_truth, hessian_truth
from torch import nn
from torch.func import functional_call

from curvopt.curvature import (
    EmpiricalFisherOperator,
    FisherOperator,
    GGNOperator,
    HessianOperator,
)

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 11, 6
TOL = dict(rtol=1e-9, atol=1e-11)


def tiny_gpt2(attn_implementation: str = "eager", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=4, n_layer=1, n_head=2,
        bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()


def padded_batch(lengths: list[int], gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """Right-padded token batch; labels are the next tokens, -100 past each sequence's end."""
    n = len(lengths)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
    mask = (torch.arange(SEQ) < torch.tensor(lengths)[:, None]).long()
    ids = ids * mask
    labels = torch.full((n, SEQ), -100)
    labels[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], -100)
    return {"input_ids": ids, "attention_mask": mask}, labels


def lm_data():
    gen = torch.Generator().manual_seed(1)
    # two batches with different numbers of valid targets: 4 + 1 = 5 and 5 + 5 + 2 = 12
    return [padded_batch([5, 2], gen), padded_batch([6, 6, 3], gen)]


def whole_batch(model, data):
    """``theta -> logits (N, V, S)`` on all batches concatenated, and the concatenated labels."""
    X = {k: torch.cat([b[0][k] for b in data]) for k in data[0][0]}
    y = torch.cat([b[1] for b in data])
    theta, unflatten = flat_view(model)

    def forward(t):
        return functional_call(model, unflatten(t), (), X).logits.movedim(-1, 1)

    return forward, y, theta


@pytest.fixture(scope="module")
def setup():
    model = tiny_gpt2()
    data = lm_data()
    forward, y, theta = whole_batch(model, data)
    return model, data, forward, y, theta


@pytest.fixture(scope="module")
def summed_hessian(setup):
    """The 'sum' Hessian truth (row-by-row autograd is slow: computed once)."""
    _, _, forward, y, theta = setup
    return hessian_truth(forward, nn.CrossEntropyLoss(reduction="sum"), y, theta)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher", "ef"])
def test_gpt2_operators_match_dense_truth(kind, reduction, setup, summed_hessian):
    model, data, forward, y, theta = setup
    loss = nn.CrossEntropyLoss(reduction=reduction)
    cls, truth = {
        "hessian": (HessianOperator, lambda *args: _scaled(summed_hessian, *args)),
        "ggn": (GGNOperator, ggn_truth),
        "fisher": (FisherOperator, ce_fisher_truth),
        "ef": (EmpiricalFisherOperator, ef_truth),
    }[kind]
    op = cls(model, loss, list(model.parameters()), data)
    expected = truth(forward, loss, y, theta)
    assert op.shape == expected.shape and op.num_data == 5
    V = torch.randn(op.shape[1], 3, dtype=torch.float64)
    torch.testing.assert_close(op @ V, expected @ V, **TOL)  # several columns
    torch.testing.assert_close(op @ V[:, 0], expected @ V[:, 0], **TOL)  # one column


def _scaled(summed, forward, loss, y, theta):
    """The truth for ``loss`` from the 'sum' one, scaled by torch's own ``mean / sum``."""
    if loss.reduction == "sum":
        return summed
    with torch.no_grad():
        out = forward(theta)
        return summed * float(loss(out, y) / nn.CrossEntropyLoss(reduction="sum")(out, y))


def test_dict_batches_are_weighted_by_valid_tokens(setup):
    # the same operator on each batch alone, combined by valid-token counts (5 and 12)
    model, data, *_ = setup
    loss, params = nn.CrossEntropyLoss(), list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    whole = GGNOperator(model, loss, params, data) @ v
    parts = [GGNOperator(model, loss, params, [b]) @ v for b in data]
    torch.testing.assert_close(whole, (5 * parts[0] + 12 * parts[1]) / 17, **TOL)


def test_train_mode_gpt2_is_refused_with_the_fix():
    model = tiny_gpt2().train()
    with pytest.raises(ValueError, match=r"transformer\.drop \(Dropout.*model_func\.eval\(\)"):
        GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), lm_data())


def test_sdpa_attention_gives_one_clear_error():
    model = tiny_gpt2("sdpa")
    data = lm_data()
    for cls in (HessianOperator, GGNOperator):
        op = cls(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
        v = torch.randn(op.shape[1], dtype=torch.float64)
        try:
            result = op @ v
        except RuntimeError as err:
            assert 'attn_implementation="eager"' in str(err) and "transformer.h.0.attn" in str(err)
        else:  # this torch has the derivatives: then the fallback must be exact
            eager = cls(tiny_gpt2(), nn.CrossEntropyLoss(), list(model.parameters()), data)
            torch.testing.assert_close(result, eager @ v, **TOL)


class LogitsFirst(nn.Module):
    """Takes the tokenizer's dict as one argument (curvlinops' convention), returns (N, V, S)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, batch):
        return self.lm(**batch).logits.movedim(-1, 1)


# Not the Hessian: curvlinops' HVP (jvp of grad) goes through PyTorch 2.13's wrong forward-mode
# derivative of LayerNorm's backward and differs from the finite-difference-checked truth in the
# 12 rows of the LayerNorm weights (ours matches it, test_gpt2_operators_match_dense_truth).
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_matches_curvlinops_on_one_concatenated_batch(kind, setup):
    curvlinops = pytest.importorskip("curvlinops")
    model, data, *_ = setup
    wrapped = LogitsFirst(model)
    X = {k: torch.cat([b[0][k] for b in data]) for k in data[0][0]}
    y = torch.cat([b[1] for b in data])
    if kind == "ef":  # curvlinops divides by all positions, ignored ones included: no padding
        y = torch.where(y == -100, 0, y)
    ours_cls, theirs = {
        "ggn": (GGNOperator, curvlinops.GGNLinearOperator),
        "ef": (EmpiricalFisherOperator, curvlinops.EFLinearOperator),
    }[kind]
    args = (wrapped, nn.CrossEntropyLoss(), list(wrapped.parameters()), [(X, y)])
    ours = ours_cls(*args)
    other = theirs(*args, batch_size_fn=lambda X: X["input_ids"].shape[0])
    V = torch.randn(ours.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(ours @ V, other @ V, **TOL)


def test_a_tuple_input_for_gpt2_is_refused_with_the_fix():
    """``model(*(ids, mask))`` would pass the mask as GPT-2's second parameter (the cache)."""
    model = tiny_gpt2()
    tuples = [((X["input_ids"], X["attention_mask"]), y) for X, y in lm_data()]
    for cls in (GGNOperator, EmpiricalFisherOperator, HessianOperator):
        op = cls(model, nn.CrossEntropyLoss(), list(model.parameters()), tuples)
        with pytest.raises(
            ValueError, match=r"batch 0: .*binds .* to input_ids, \w+ of GPT2LMHeadModel.*as a dict"
        ):
            op @ torch.randn(op.shape[1], dtype=torch.float64)
    ids_only = [((X["input_ids"],), y) for X, y in lm_data()]  # one tensor binds to input_ids
    op = GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), ids_only)
    assert torch.isfinite(op @ torch.randn(op.shape[1], dtype=torch.float64)).all()


def _hf_batches(data):
    """transformers' convention: labels = input_ids (-100 at padding), shifted by the model."""
    out = []
    for X, _ in data:
        labels = X["input_ids"].masked_fill(X["attention_mask"] == 0, -100)
        out.append({**X, "labels": labels})
    return out


@pytest.mark.parametrize("cls", [GGNOperator, EmpiricalFisherOperator])
def test_hugging_face_labels_dicts_are_shifted_like_the_model_does(cls, setup):
    """A dict with 'labels' gives the operator of the (X, next-token y) pairs, which the dense
    truth checks; and transformers' own loss of those labels equals torch's CE on them."""
    model, data, forward, y, theta = setup
    loss, params = nn.CrossEntropyLoss(), list(model.parameters())
    hf = _hf_batches(data)
    V = torch.randn(theta.numel(), 2, dtype=torch.float64)
    op = cls(model, loss, params, hf)
    truth = {GGNOperator: ggn_truth, EmpiricalFisherOperator: ef_truth}[cls](
        forward, loss, y, theta
    )
    torch.testing.assert_close(op @ V, truth @ V, **TOL)
    with torch.no_grad():  # the shift is transformers' own: same loss value per batch
        for batch, (X, yb) in zip(hf, data):
            hf_loss = model(**batch).loss
            ours = loss(model(**X).logits.movedim(-1, 1), yb)
            torch.testing.assert_close(hf_loss.double(), ours, rtol=1e-6, atol=0)  # fp32 loss


def test_labels_dict_with_another_loss_or_a_plain_dict_says_what_to_pass(setup):
    model, data, *_ = setup
    params = list(model.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    with pytest.raises(ValueError, match="needs nn.CrossEntropyLoss"):
        GGNOperator(model, nn.MSELoss(), params, _hf_batches(data)) @ v
    plain = [X for X, _ in data]  # no labels at all
    with pytest.raises(ValueError, match=r"batch 0 .*'labels'.*pair \(inputs_dict"):
        GGNOperator(model, nn.CrossEntropyLoss(), params, plain)


def test_unshifted_labels_warn(setup):
    model, data, *_ = setup
    unshifted = [(X, X["input_ids"].masked_fill(X["attention_mask"] == 0, -100)) for X, _ in data]
    with pytest.warns(UserWarning, match="y equals input_ids at every valid position"):
        op = GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), unshifted)
        op @ torch.randn(op.shape[1], dtype=torch.float64)
    import warnings

    with warnings.catch_warnings():  # the shifted labels of the other tests: no warning
        warnings.simplefilter("error", UserWarning)
        op = GGNOperator(model, nn.CrossEntropyLoss(), list(model.parameters()), data)
        op @ torch.randn(op.shape[1], dtype=torch.float64)


def test_labels_dict_maps_transformers_ignored_label_to_the_losss_ignore_index():
    """-100 is transformers' "ignored" label; a loss with another ignore_index must see its own."""
    from curvopt.curvature.batches import split_batch

    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 3, 4]])
    labels = torch.tensor([[5, 6, -100, 8], [1, -100, 3, -100]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    X, y = split_batch(batch, 0, nn.CrossEntropyLoss(ignore_index=-1))
    assert "labels" not in X and torch.equal(X["input_ids"], ids)
    assert y.tolist() == [[6, -1, 8, -1], [-1, 3, -1, -1]]  # next token; the last position ignored
