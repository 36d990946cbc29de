"""N:M sparsity patterns (``"2:4"``: the pattern sparse tensor cores run fast).

In every group of ``m`` consecutive weights along a row's input dimension at most ``n`` stay
non-zero.

A *row* is one output unit's weights; its *input dimension* depends on the layer type:

* ``nn.Linear`` (weight ``(out, in)``) and any other 2-D weight: dimension 1;
* ``nn.ConvNd`` (weight ``(out, in/groups, *kernel)``): dimension 1, i.e. groups of ``m``
  consecutive input channels at a fixed output channel and kernel position (as NVIDIA's ASP does);
* transformers' ``Conv1D`` (GPT-2; weight ``(in, out)``, recognised by its class name ``Conv1D``
  without importing transformers): dimension 0.

:func:`group_index` returns, for one weight, the row-major flat indices of each group, shape
``(numel / m, m)``; :func:`nm_select` picks, per group, the ``k`` lowest scores to prune. The
OBS update that follows is the ordinary multi-weight one (:func:`curvopt.prune.obs_update_multi`)
over all removed weights, which for a set ``Q`` is
``delta w = -F^{-1}[:, Q] (F^{-1}[Q, Q])^{-1} w_Q``.

Example:
    >>> parse_pattern("2:4", 0.5)
    (2, 4)
    >>> group_index((2, 4), 1, 4).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
    >>> group_index((4, 2), 0, 4).tolist()  # a Conv1D weight (in=4, out=2)
    [[0, 2, 4, 6], [1, 3, 5, 7]]
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor, nn

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str) -> tuple[int, int]:
    """Parse ``"n:m"`` into ``(n, m)`` with ``1 <= n < m``.

    Raises:
        TypeError: ``pattern`` is not a string.
        ValueError: The string does not parse, or ``n < 1`` or ``n >= m``.

    Example:
        >>> parse_nm(" 2 : 4 ")
        (2, 4)
    """
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string 'n:m' (e.g. '2:4') or None, got {pattern!r}")
    match = _PATTERN.match(pattern)
    if match is None:
        raise ValueError(
            f"pattern must look like 'n:m' with integers (e.g. '2:4'), got {pattern!r}"
        )
    n, m = int(match.group(1)), int(match.group(2))
    if n < 1 or n >= m:
        raise ValueError(
            f"pattern {pattern!r}: n:m needs 1 <= n < m (n weights kept of every m), got n={n}, "
            f"m={m}"
        )
    return n, m


def parse_pattern(pattern: str, sparsity: object) -> tuple[int, int]:
    """Parse ``"n:m"`` (:func:`parse_nm`) and check that ``sparsity`` equals ``1 - n/m``.

    Args:
        pattern: ``"n:m"`` with integers ``1 <= n < m``.
        sparsity: The requested sparsity (a number; a per-layer dict is refused).

    Returns:
        ``(n, m)``.

    Raises:
        TypeError: ``pattern`` is not a string.
        ValueError: The string does not parse, ``n < 1`` or ``n >= m``, or ``sparsity`` is not
            ``1 - n/m``.

    Example:
        >>> parse_pattern("1:4", 0.75)
        (1, 4)
    """
    n, m = parse_nm(pattern)
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(
            f"pattern {pattern!r} fixes the sparsity of every layer to 1 - n/m = {1 - n / m:g}; "
            f"pass sparsity={1 - n / m:g}, not {sparsity!r}"
        )
    if not math.isclose(float(sparsity), 1 - n / m, rel_tol=0, abs_tol=1e-9):
        raise ValueError(
            f"sparsity {sparsity!r} disagrees with pattern {pattern!r}: an n:m pattern has "
            f"sparsity 1 - n/m = {1 - n / m:g}"
        )
    return n, m


def input_dim(module: nn.Module) -> int:
    """The dimension of ``module.weight`` that runs along a row's inputs (module docs)."""
    # by class name (through the MRO: a parametrized module's class derives from the original)
    return 0 if any(c.__name__ == "Conv1D" for c in type(module).__mro__) else 1


def group_index(shape: tuple[int, ...], dim: int, m: int, name: str = "weight") -> Tensor:
    """Row-major flat indices of the N:M groups of a weight of ``shape``, ``(numel / m, m)``.

    Each row of the result holds ``m`` entries that are consecutive along dimension ``dim``
    (all other coordinates fixed).

    Args:
        shape: The weight's shape (at least 2-D).
        dim: The input dimension (:func:`input_dim`).
        m: Group size.
        name: The weight's name, for the error message.

    Raises:
        ValueError: The weight has fewer than 2 dimensions or ``m`` does not divide
            ``shape[dim]``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"{name} has shape {shape}; an n:m pattern needs a weight with rows")
    if shape[dim] % m:
        raise ValueError(
            f"{name} has shape {shape}: its row length {shape[dim]} (dimension {dim}) is not a "
            f"multiple of m={m}, so the n:m pattern cannot tile it; leave the layer out with "
            "names=, or use an unstructured sparsity"
        )
    flat = torch.arange(math.prod(shape)).reshape(shape)
    return flat.movedim(dim, -1).reshape(-1, m)


def flat_groups(
    layers: list[tuple[nn.Module, str, tuple[int, ...]]], m: int, device=None
) -> Tensor:
    """N:M groups over the concatenation of several flattened weights, ``(G, m)``.

    Args:
        layers: ``(module, name, shape)`` per weight, in flat order (``shape`` may be a
            shard's).
        m: Group size.
        device: Device of the result.

    Raises:
        ValueError: A weight whose row length ``m`` does not divide (names it).

    Example:
        >>> flat_groups([(nn.Linear(4, 1), "a", (1, 4)), (nn.Linear(4, 1), "b", (1, 4))], 2)
        tensor([[0, 1],
                [2, 3],
                [4, 5],
                [6, 7]])
    """
    parts, offset = [], 0
    for module, name, shape in layers:
        parts.append(offset + group_index(shape, input_dim(module), m, name))
        offset += math.prod(shape)
    return torch.cat(parts).to(device)


def nm_select(scores: Tensor, alive: Tensor, groups: Tensor, k: int) -> Tensor:
    """Flat mask of the entries pruned after this step: the ``k`` lowest scores of each group.

    Entries already pruned (``alive`` False) count first (their score is ``-inf``) and stay
    pruned. Ties go to the earlier entry of the group.

    Args:
        scores: Flat scores ``(d,)``.
        alive: Flat boolean ``(d,)``.
        groups: Flat indices of the groups ``(G, m)`` (every entry in exactly one group).
        k: Entries pruned per group, ``0 <= k <= m``.

    Example:
        >>> nm_select(torch.tensor([3.0, 1.0, 2.0, 4.0]), torch.ones(4, dtype=torch.bool),
        ...           torch.arange(4).reshape(1, 4), 2).tolist()
        [False, True, True, False]
    """
    s = scores.to(torch.float64).masked_fill(~alive, -float("inf"))[groups]
    order = torch.argsort(s, dim=1, stable=True)[:, :k]
    out = torch.zeros_like(alive)
    out[groups.gather(1, order).reshape(-1)] = True
    return out | ~alive


__all__ = ["flat_groups", "group_index", "input_dim", "nm_select", "parse_nm", "parse_pattern"]
