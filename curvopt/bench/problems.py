"""Benchmark problems: a model, a loss and data, with the flat-parameter views the harness needs.

A :class:`Problem` bundles what the curvature operators take (``model_func, loss_func, params,
data``, curvlinops' convention) with three derived quantities the harness uses directly:

- the full-data loss ``L(w) = sum_b (N_b / N) loss_func(model(X_b; w), y_b)`` as a function of
  the flat parameter vector ``w`` (shape ``(d,)``), so ``torch.func.hessian`` can check the
  reference;
- the full-data gradient ``g = grad L(w)`` (the vector that gets preconditioned);
- per-sample gradients ``grad l_n(w)`` (rows of an ``(m, d)`` matrix), which feed the
  squared-gradient diagonal and M-FAC.

The built-in problems (:data:`BUILTIN_PROBLEMS`) use only scikit-learn's bundled data sets (and,
for ``tinylm``, a tiny randomly initialized GPT-2 on synthetic sequences), so nothing is
downloaded, and train the model briefly first so the curvature is measured away from the
initialization.

Example:
    >>> problem = make_problem("softmax", train_steps=10)
    >>> problem.num_params, problem.num_samples
    (650, 1797)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from curvopt.utils.params import flatten, num_elements, trainable

#: The CNN uses the first digits only: float64 convolutions are slow on the CPU.
CNN_SAMPLES = 600

SUPPORTED_LOSSES = (nn.CrossEntropyLoss, nn.MSELoss)


@dataclass
class Problem:
    """A model, a loss and data, as used by the curvature operators.

    Args:
        name: Short name shown in tables and stored in the JSON output.
        model: The network ``f(x; w)``; its trainable parameters define ``w``.
        loss_func: ``CrossEntropyLoss`` or ``MSELoss`` with ``reduction="mean"`` (the losses the
            curvature operators support).
        data: Batches ``(X_b, y_b)``; the loss is the batch-size-weighted average over them.
        description: One line about the data and model, for reports.

    Raises:
        TypeError: If the loss is not one of the supported classes or ``data`` holds non-tensors.
        ValueError: If the loss does not use mean reduction, the data is empty, or the model has no
            trainable parameters.
    """

    name: str
    model: nn.Module
    loss_func: nn.Module
    data: list[tuple[Tensor, Tensor]]
    description: str = ""
    _names: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.loss_func, SUPPORTED_LOSSES):
            allowed = ", ".join(c.__name__ for c in SUPPORTED_LOSSES)
            raise TypeError(
                f"loss_func must be one of {allowed}; got {type(self.loss_func).__name__}"
            )
        if getattr(self.loss_func, "reduction", "mean") != "mean":
            raise ValueError(
                f"loss_func must use reduction='mean' (got {self.loss_func.reduction!r}); the "
                "harness follows curvlinops' convention of averaging over the data"
            )
        self.data = list(self.data)
        if not self.data:
            raise ValueError("data is empty: pass at least one batch (X, y)")
        for i, batch in enumerate(self.data):
            if len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch):
                raise TypeError(f"data[{i}] must be a pair of tensors (X, y)")
            if batch[0].shape[0] != batch[1].shape[0] or batch[0].shape[0] == 0:
                raise ValueError(
                    f"data[{i}] has {batch[0].shape[0]} inputs and {batch[1].shape[0]} targets; "
                    "each batch needs the same, non-zero number of both"
                )
        self._names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError("the model has no trainable parameters")

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters, in ``model.named_parameters()`` order."""
        return trainable(self.model.parameters())

    @property
    def num_params(self) -> int:
        """The number ``d`` of trainable parameters."""
        return num_elements(self.params)

    @property
    def num_samples(self) -> int:
        """The number ``N`` of data points over all batches."""
        return sum(int(X.shape[0]) for X, _ in self.data)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.params[0].dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.params[0].device

    def flat_params(self) -> Tensor:
        """The current parameters as one detached vector of shape ``(d,)``."""
        return flatten([p.detach() for p in self.params])

    def _as_dict(self, flat: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        for name, p in zip(self._names, self.params):
            out[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return out

    def loss_function(self) -> Callable[[Tensor], Tensor]:
        """Return ``w -> L(w)``, the full-data loss as a function of a flat ``(d,)`` vector.

        ``L(w) = sum_b (N_b / N) loss_func(model(X_b; w), y_b)``; differentiable with
        ``torch.func``.
        """
        total = self.num_samples

        def loss(flat: Tensor) -> Tensor:
            params = self._as_dict(flat)
            value = 0.0
            for X, y in self.data:
                out = functional_call(self.model, params, (X,))
                value = value + self.loss_func(out, y) * (X.shape[0] / total)
            return value

        return loss

    def loss(self) -> float:
        """The full-data loss at the current parameters."""
        with torch.no_grad():
            return float(self.loss_function()(self.flat_params()))

    def gradient(self) -> Tensor:
        """The full-data gradient ``grad L(w)``, shape ``(d,)``."""
        return grad(self.loss_function())(self.flat_params()).detach()

    def sample(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and targets of the data points with the given global indices."""
        X = torch.cat([b[0] for b in self.data])
        y = torch.cat([b[1] for b in self.data])
        idx = torch.as_tensor(indices, dtype=torch.long, device=X.device)
        return X[idx], y[idx]

    def per_sample_gradients(self, indices: Sequence[int] | Tensor, chunk: int = 256) -> Tensor:
        """Gradients of the per-sample losses ``l_n(w) = loss_func(f(x_n; w), y_n)``.

        With mean reduction, ``L = (1/N) sum_n l_n``, so ``(1/N) sum_n grad l_n grad l_n^T`` is the
        empirical Fisher in curvlinops' convention.

        Args:
            indices: Global indices of the data points (over the concatenated batches).
            chunk: How many samples to differentiate at once (bounds memory).

        Returns:
            Tensor of shape ``(len(indices), d)``.
        """
        X, y = self.sample(indices)
        flat = self.flat_params()

        def single(w: Tensor, x: Tensor, t: Tensor) -> Tensor:
            out = functional_call(self.model, self._as_dict(w), (x.unsqueeze(0),))
            return self.loss_func(out, t.unsqueeze(0))

        per_sample = vmap(grad(single), in_dims=(None, 0, 0))
        rows = [
            per_sample(flat, X[i : i + chunk], y[i : i + chunk]) for i in range(0, len(X), chunk)
        ]
        return torch.cat(rows).detach()


def _batches(X: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(X), batch_size)]


def _train(problem: Problem, steps: int, lr: float) -> None:
    """Full-batch Adam on the problem's loss: moves the parameters away from the initialization."""
    if steps <= 0:
        return
    opt = torch.optim.Adam(problem.params, lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(
            problem.loss_func(problem.model(X), y) * (X.shape[0] / problem.num_samples)
            for X, y in problem.data
        )
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def _standardize(X: Tensor) -> Tensor:
    return (X - X.mean(0)) / X.std(0).clamp_min(1e-8)


def _load(loader: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    import sklearn.datasets

    X, y = getattr(sklearn.datasets, loader)(return_X_y=True)
    return torch.tensor(X, dtype=dtype), torch.tensor(y)


class BinaryLogits(nn.Module):
    """Map a score ``z`` of shape ``(N, 1)`` to the two logits ``[0, z]`` of shape ``(N, 2)``.

    Cross-entropy on ``[0, z]`` equals the logistic loss ``BCEWithLogits(z)``, so logistic
    regression runs through the cross-entropy curvature formulas (which every operator supports).
    """

    def forward(self, z: Tensor) -> Tensor:  # noqa: D102
        return torch.cat([torch.zeros_like(z), z], dim=1)


def _logistic(dtype: torch.dtype) -> Problem:
    X, y = _load("load_breast_cancer", dtype)
    model = nn.Sequential(nn.Linear(X.shape[1], 1), BinaryLogits())
    desc = "logistic regression on breast_cancer: 569 samples x 30 features, 2 classes"
    data = _batches(_standardize(X), y, 256)
    return Problem("logistic", model.to(dtype), nn.CrossEntropyLoss(), data, desc)


def _softmax(dtype: torch.dtype) -> Problem:
    X, y = _load("load_digits", dtype)
    model = nn.Linear(64, 10)
    desc = "softmax regression (cross-entropy) on digits: 1797 x 64 pixels, 10 classes"
    return Problem(
        "softmax", model.to(dtype), nn.CrossEntropyLoss(), _batches(X / 16, y, 512), desc
    )


def _mlp(dtype: torch.dtype) -> Problem:
    X, y = _load("load_digits", dtype)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    desc = "MLP 64-32-10 (tanh, cross-entropy) on digits: 1797 samples"
    return Problem("mlp", model.to(dtype), nn.CrossEntropyLoss(), _batches(X / 16, y, 512), desc)


def _cnn(dtype: torch.dtype) -> Problem:
    X, y = _load("load_digits", dtype)
    X, y = X[:CNN_SAMPLES], y[:CNN_SAMPLES]
    model = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=3),  # 8x8 -> 6x6
        nn.ReLU(),
        nn.Conv2d(6, 6, kernel_size=3, stride=2),  # 6x6 -> 2x2
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(24, 10),
    )
    images = (X / 16).reshape(-1, 1, 8, 8)
    desc = (
        f"CNN conv3x3(6)-conv3x3/2(6)-linear (ReLU, cross-entropy) on 8x8 digits: first "
        f"{CNN_SAMPLES} samples"
    )
    return Problem("cnn", model.to(dtype), nn.CrossEntropyLoss(), _batches(images, y, 300), desc)


class CausalLM(nn.Module):
    """A transformers causal language model as a tensor-to-tensor module.

    ``forward(input_ids)`` returns the logits in torch's cross-entropy layout ``(N, V, S)``, so
    the harness's per-sample code (one ``input_ids`` row at a time) applies unchanged.
    """

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: Tensor) -> Tensor:  # noqa: D102
        return self.lm(input_ids=input_ids, use_cache=False).logits.movedim(-1, 1)


def tiny_gpt2(
    vocab_size: int = 16,
    seq_len: int = 8,
    n_embd: int = 8,
    n_layer: int = 1,
    n_head: int = 2,
) -> nn.Module:
    """A randomly initialized GPT-2 (transformers, no download) with eager attention, in eval mode.

    Eager attention: the default SDPA kernel on the CPU has neither forward-mode AD nor a double
    backward, so no curvature product can go through it. Dropout is off (eval mode).

    Raises:
        ImportError: If transformers is not installed (``pip install curvopt[lm]``).
    """
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:  # pragma: no cover - optional dependency
        raise ImportError(
            "the tiny GPT-2 needs transformers: pip install 'curvopt[lm]'", name="transformers"
        ) from err
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=seq_len,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(config).eval()


def copy_task(num: int, seq_len: int, vocab_size: int, generator: torch.Generator):
    """Synthetic sequences: a random first half, then the same tokens again (copy task).

    Returns ``(input_ids, labels)`` of shape ``(num, seq_len)``; the labels are the next tokens,
    ``-100`` at the last position (nothing to predict).
    """
    half = (seq_len + 1) // 2
    first = torch.randint(1, vocab_size, (num, half), generator=generator)
    ids = torch.cat([first, first], dim=1)[:, :seq_len]
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    return ids, labels


def _tinylm(dtype: torch.dtype) -> Problem:
    vocab, seq = 10, 6
    ids, labels = copy_task(64, seq, vocab, torch.Generator().manual_seed(0))
    # no padding and one -100 per sequence: the token mean equals the harness's sample weighting
    model = CausalLM(tiny_gpt2(vocab_size=vocab, seq_len=seq, n_embd=4, n_layer=1, n_head=2))
    desc = (
        f"tiny GPT-2 (1 layer, width 4, 2 heads, eager attention) on a copy task: 64 sequences "
        f"of {seq} tokens, vocabulary {vocab}"
    )
    return Problem(
        "tinylm", model.to(dtype), nn.CrossEntropyLoss(), _batches(ids, labels, 32), desc
    )


#: name -> (builder, Adam learning rate of the warm-up training)
BUILTIN_PROBLEMS: dict[str, tuple[Callable[[torch.dtype], Problem], float]] = {
    "logistic": (_logistic, 0.05),
    "softmax": (_softmax, 0.05),
    "mlp": (_mlp, 0.01),
    "cnn": (_cnn, 0.01),
    "tinylm": (_tinylm, 0.01),
}


def make_problem(
    name: str,
    *,
    seed: int = 0,
    train_steps: int = 100,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Problem:
    """Build a built-in problem on scikit-learn data and train it briefly.

    Args:
        name: One of ``logistic``, ``softmax``, ``mlp``, ``cnn``, ``tinylm`` (see
            :data:`BUILTIN_PROBLEMS`; ``tinylm`` needs transformers).
        seed: Seed of the model's initialization.
        train_steps: Full-batch Adam steps before the curvature is measured (0: measure at init).
        dtype: Floating dtype of model and data (float64 keeps the reference accurate).
        device: Where model and data live.

    Returns:
        The trained problem.

    Raises:
        ValueError: For an unknown name or a negative ``train_steps``.
    """
    if name not in BUILTIN_PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose one of {', '.join(BUILTIN_PROBLEMS)}")
    if train_steps < 0:
        raise ValueError(f"train_steps must be >= 0, got {train_steps}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    builder, lr = BUILTIN_PROBLEMS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        problem = builder(torch.float32)
    # Train in float32 (float64 convolutions have no fast CPU path), then measure in `dtype`.
    problem.model.to(device)
    problem.data = [(X.to(device), y.to(device)) for X, y in problem.data]
    _train(problem, train_steps, lr)
    problem.model.to(dtype)
    problem.data = [
        (X.to(dtype) if X.is_floating_point() else X, y.to(dtype) if y.is_floating_point() else y)
        for X, y in problem.data
    ]
    return problem
