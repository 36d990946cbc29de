"""The result of a pruning run: overall sparsity and a per-layer table."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from .masks import PrunableWeight


@dataclass
class LayerReport:
    """Sparsity of one prunable weight."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        """Fraction of zeros."""
        return self.zeros / max(self.numel, 1)


@dataclass
class PruneReport:
    """What :func:`curvopt.prune.prune` did.

    Attributes:
        method: ``"mfac"``, ``"obs"`` or ``"magnitude"``.
        scope: ``"global"`` or ``"layer"``.
        target: The requested sparsity (a float, or a dict per layer).
        steps: Sparsities reached after each recomputation step.
        update: The weight update used (``"multi"``, ``"diagonal"`` or ``"none"``) per step.
        damp: The absolute damping used per step (empty for magnitude).
        layers: One :class:`LayerReport` per prunable weight.
        seconds: Wall time of the whole run.
        pattern: The N:M pattern (``"2:4"``) or ``None`` for unstructured sparsity.
    """

    method: str
    scope: str
    target: float | dict
    layers: list[LayerReport]
    steps: list[float] = field(default_factory=list)
    update: list[str] = field(default_factory=list)
    damp: list[float] = field(default_factory=list)
    seconds: float = 0.0
    pattern: str | None = None

    @property
    def sparsity(self) -> float:
        """Overall fraction of zeros over all prunable weights."""
        total = sum(layer.numel for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / max(total, 1)

    def to_dict(self) -> dict:
        """JSON-ready dictionary (includes per-layer sparsities)."""
        out = asdict(self)
        out["sparsity"] = self.sparsity
        for row, layer in zip(out["layers"], self.layers):
            row["sparsity"] = layer.sparsity
            row["shape"] = list(layer.shape)
        return out

    def __str__(self) -> str:
        """A plain-text table."""
        width = max([len(layer.name) for layer in self.layers] + [5])
        lines = [f"{'layer':<{width}} {'shape':>16} {'params':>9} {'sparsity':>9}"]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<{width}} {str(tuple(layer.shape)):>16} {layer.numel:>9} "
                f"{layer.sparsity:>9.4f}"
            )
        total = sum(layer.numel for layer in self.layers)
        lines.append(f"{'total':<{width}} {'':>16} {total:>9} {self.sparsity:>9.4f}")
        return "\n".join(lines)


def layer_reports(targets: list[PrunableWeight]) -> list[LayerReport]:
    """Measure the sparsity of each prunable weight (effective values, masks applied)."""
    out = []
    for t in targets:
        w = getattr(t.module, t.attr).detach()
        out.append(LayerReport(t.qualified_name, tuple(w.shape), w.numel(), int((w == 0).sum())))
    return out


def sparsity_report(
    model: nn.Module, layer_types=None, names=None, method: str = "", scope: str = ""
) -> PruneReport:
    """Per-layer sparsity of ``model``'s prunable weights (see :func:`prunable_weights`)."""
    from .masks import prunable_weights

    targets = prunable_weights(model, layer_types, names)
    return PruneReport(method=method, scope=scope, target=0.0, layers=layer_reports(targets))
