"""Built-in small models and sklearn datasets for ``curvopt prune`` and the benchmark.

Everything is local (sklearn's bundled datasets), small and trained in seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

DATASETS = ("digits", "breast_cancer", "wine", "iris")
MODELS = ("mlp", "cnn")


@dataclass
class Split:
    """A train/calibration/test split as float32 feature tensors and class labels."""

    X_train: Tensor
    y_train: Tensor
    X_calib: Tensor
    y_calib: Tensor
    X_test: Tensor
    y_test: Tensor
    num_classes: int
    image_side: int | None = None


def load_dataset(name: str, seed: int = 0, calib_fraction: float = 0.15) -> Split:
    """Load a bundled sklearn dataset, standardize it and split it 60/15/25 (train/calib/test).

    The calibration split is held out from training: gradients there have a loss that is not
    ~0, which is what the empirical Fisher needs (on the training set of a fitted model most
    per-sample gradients vanish).

    Args:
        name: One of :data:`DATASETS`.
        seed: Seed of the split.
        calib_fraction: Fraction held out for calibration.
    """
    from sklearn import datasets

    loaders = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }
    if name not in loaders:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    X, y = loaders[name](return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=gen)
    n_test = int(0.25 * len(y))
    n_cal = int(calib_fraction * len(y))
    test, cal, train = perm[:n_test], perm[n_test : n_test + n_cal], perm[n_test + n_cal :]
    mean, std = X[train].mean(0), X[train].std(0).clamp_min(1e-6)
    X = (X - mean) / std
    side = 8 if name == "digits" else None
    return Split(
        X[train], y[train], X[cal], y[cal], X[test], y[test], int(y.max()) + 1, image_side=side
    )


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a linear head for ``side x side`` single-channel images."""

    def __init__(self, side: int, num_classes: int, channels: int = 16) -> None:
        super().__init__()
        self.side = side
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(channels * (side // 2) ** 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits for flat inputs ``(n, side*side)``."""
        z = self.features(x.reshape(-1, 1, self.side, self.side))
        return self.head(z.flatten(1))


def build_model(name: str, split: Split, hidden: int = 64, seed: int = 0) -> nn.Module:
    """An untrained built-in model for ``split`` (``"mlp"``: two hidden ReLU layers)."""
    torch.manual_seed(seed)
    d_in = split.X_train.shape[1]
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(d_in, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, split.num_classes),
        )
    if name == "cnn":
        if split.image_side is None:
            raise ValueError("the cnn model needs an image dataset (digits)")
        return SmallCNN(split.image_side, split.num_classes)
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def train(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    epochs: int = 60,
    lr: float = 3e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> nn.Module:
    """Train with Adam on cross-entropy (a few seconds for the built-in sets)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for s in range(0, len(y), batch_size):
            b = perm[s : s + batch_size]
            opt.zero_grad()
            loss_fn(model(X[b]), y[b]).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Fraction of correct argmax predictions."""
    return float((model(X).argmax(1) == y).float().mean())


def batches(X: Tensor, y: Tensor, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """Split ``(X, y)`` into a list of consecutive batches (a re-iterable data loader)."""
    return [(X[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(y), batch_size)]
