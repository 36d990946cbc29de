"""One-shot pruning: :func:`prune` with M-FAC OBS, layer-wise OBS, exact dense OBS or magnitude."""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from curvopt.mfac._validation import check_damp, check_positive_int, check_storage_dtype

from .layerwise import check_layerwise_targets
from .masks import PrunableWeight, WeightMask, prunable_weights
from .obs import obs_scores, obs_update_diagonal
from .patterns import nm_select, parse_pattern
from .report import PruneReport
from .schedule import _check_sparsity, one_shot_step
from .weights_view import WeightsView, weights_view

METHODS = ("mfac", "layerwise", "obs", "magnitude")
SCOPES = ("global", "layer")
UPDATES = ("auto", "multi", "diagonal", "none")
DAMP_MODES = ("relative", "absolute")


def prune(
    model: nn.Module,
    loss_func: Callable[[Tensor, Tensor], Tensor] | None,
    data: Iterable | None,
    sparsity: float | Mapping[str, float],
    method: str = "mfac",
    scope: str = "global",
    num_grads: int = 64,
    block_size: int | None = 128,
    damp: float | None = None,
    steps: int = 16,
    *,
    pattern: str | None = None,
    grad_dtype: torch.dtype | None = None,
    damp_mode: str = "relative",
    update: str = "auto",
    grad_batch_size: int | None = None,
    normalize: bool = False,
    layer_types: Iterable[type[nn.Module]] | None = None,
    names: Iterable[str] | None = None,
    max_multi: int = 4096,
    multi_budget: int = 2**28,
    callback: Callable[[int, int, float], None] | None = None,
) -> PruneReport:
    """Prune ``model`` in place to ``sparsity`` and return a per-layer report.

    Each of the ``steps`` recomputation steps (schedule :func:`one_shot_schedule`):

    1. collect ``m = num_grads`` gradients of ``loss_func`` on ``data`` over the remaining
       prunable weights (``G``, ``m x d``; pruned entries get zero gradient);
    2. build ``F = lambda I + G^T G / m``: block-wise M-FAC (``method="mfac"``, blocks of
       ``block_size``), or the dense exact inverse of the full matrix (``method="obs"``,
       ``d x d``, small models only);
    3. score every weight by ``rho_q = w_q^2 / (2 [F^{-1}]_qq)`` (``|w_q|`` for magnitude) and
       remove the lowest-scoring ones (global threshold, or per layer);
    4. move the remaining weights by the OBS update (see :mod:`curvopt.prune.obs`).

    Layer-wise OBS (``method="layerwise"``) replaces steps 1-2 by the Hessian of each layer's
    reconstruction error, ``H_l = 2 X_l X_l^T / N`` from the layer's inputs on ``data`` (the
    objective SparseGPT solves), damped by ``damp * mean(diag H_l)``, and step 4 by the exact
    per-row multi-weight update (:mod:`curvopt.prune.layerwise`). Its scores are comparable only
    within a layer, so it needs ``scope="layer"`` (or a ``pattern``); 2-D weights only (Linear,
    transformers' ``Conv1D``); FSDP2-sharded weights too (each rank's rows, with ``H_l``
    all-reduced over the ranks' data).

    N:M patterns (``pattern="2:4"``): in every group of ``m`` consecutive weights along a row's
    input dimension (dimension 1 of Linear/Conv weights, dimension 0 of transformers'
    ``Conv1D``; :mod:`curvopt.prune.patterns`) the ``m - n`` lowest scores are removed (``|w|``
    for magnitude: the ``n`` largest stay), spread over the steps (``round((m - n) j / k)`` per
    group after step ``j``), and the removed weights get the multi-weight OBS update as above.
    ``sparsity`` must be ``1 - n/m``; ``scope`` and ``normalize`` play no part.

    Which update (``update="auto"``): the exact multi-weight update per block when every block
    loses at most ``max_multi`` weights in this step and fetching the rows of ``F^{-1}`` is
    affordable (``removed * d <= multi_budget``, about 2.7e8: small and medium models, e.g. all of
    the benchmark); otherwise the diagonal approximation (one IHVP), which is what scales to large
    models. ``"multi"`` / ``"diagonal"`` force one; ``"none"`` only masks. The choice per step is
    recorded in ``report.update``.

    Damping: with ``damp_mode="relative"`` (default) the damping is
    ``lambda = damp * mean(diag(G^T G / m))``, i.e. relative to the gradients' scale, which is
    what keeps the estimator from collapsing into magnitude pruning when gradients are small;
    ``"absolute"`` uses ``lambda = damp``.

    Defaults ``damp=1`` (relative: ``lambda`` equals the mean curvature) and ``steps=16`` come
    from the benchmark: with one step M-FAC is no better than magnitude pruning at 90-95 %
    sparsity, with 16 it is about twice as accurate (see the pruning guide).

    Masks are attached with :func:`curvopt.prune.set_mask` (``torch.nn.utils.parametrize``), so
    the pruned weights stay zero during later training; :func:`curvopt.prune.pruned_state_dict`
    exports a plain ``state_dict``. Among weights with equal scores the one earlier in the flat
    order (module order, then row-major) goes first.

    FSDP2 (``fully_shard``): when the prunable weights are DTensors, every rank calls ``prune``
    together with its own data and prunes its local shards (:mod:`curvopt.prune.sharded`): the
    same masks as the single-process run on the same gradients, without gathering weights or
    scores. Attach the masks before sharding (:func:`curvopt.prune.attach_masks`), and use
    ``block_size=None`` with ``method="mfac"`` (``"obs"`` is single-process only;
    ``"layerwise"`` all-reduces each layer's ``X X^T``).

    All or nothing: every argument is checked before the model is touched, and if anything
    fails later (the data, the loss, the callback, an interrupt) the model is restored exactly -
    values, masks, parametrizations, buffers, ``requires_grad`` - before the error propagates
    (:class:`curvopt.prune.snapshot.ModelSnapshot`; costs one copy of the prunable weights).
    An FSDP2 model is restored the same way on every rank that sees the error (its local
    shards, the masks and the buffers).

    One loop serves both cases: it runs on a :class:`~curvopt.prune.weights_view.WeightsView`
    of the prunable weights, local or sharded, which is the only place where they differ.

    Args:
        model: The network, changed in place (put it in eval mode for BatchNorm/Dropout).
        loss_func: ``loss_func(model(X), y) -> scalar``; unused for magnitude; for layerwise
            optional, only checked to be finite on every batch.
        data: Iterable of ``(X, y)`` batches (calibration data; unused for magnitude). Read
            from the start at every step, so it must be re-iterable (list, DataLoader) when
            ``steps > 1``.
        sparsity: Target fraction of zeros in ``[0, 1)``; with ``scope="layer"`` either one value
            for every layer or a dict ``{layer name: sparsity}``.
        method: ``"mfac"``, ``"layerwise"`` (layer-input Hessians), ``"obs"`` (exact dense
            empirical Fisher) or ``"magnitude"``.
        scope: ``"global"`` (one threshold over all prunable weights) or ``"layer"``.
        num_grads: ``m``, gradients per step.
        block_size: M-FAC block size (``None``: one block over all prunable weights).
        damp: Damping (relative or absolute, see above), ``> 0``; ``None``: 1 (0.01 for
            ``"layerwise"``: ``0.01 * mean(diag H_l)``, SparseGPT's default).
        steps: Recomputation steps ``k >= 1``.
        damp_mode: ``"relative"`` or ``"absolute"``.
        update: ``"auto"``, ``"multi"``, ``"diagonal"`` or ``"none"``.
        grad_batch_size: Samples per gradient (``1``: per-sample gradients; ``None``: one
            gradient per batch of ``data``).
        normalize: Under global scope, divide each layer's scores by their mean over the layer's
            remaining weights before the global threshold.
        layer_types: Prunable module types (default Linear and Conv).
        names: Prune only these modules (see :func:`curvopt.prune.prunable_weights`).
        max_multi: Largest per-block removal handled by the exact multi-weight update in auto.
        multi_budget: Largest ``removed * d`` for which auto uses the multi-weight update.
        callback: Called as ``callback(step, steps, sparsity)`` after each step.
        pattern: ``"n:m"`` for N:M sparsity (e.g. ``"2:4"``), or ``None`` (unstructured).
        grad_dtype: Storage dtype of the gradients ``G`` for M-FAC (``torch.bfloat16`` halves
            the ``m x d`` buffer of a large model; products accumulate in float32), or ``None``
            (the weights' dtype).

    Returns:
        A :class:`PruneReport` (``.sparsity`` overall, ``.layers`` per layer).

    Raises:
        ValueError: Bad sparsity, method, scope, damping or counts, a pattern that does not
            parse, has ``n >= m``, disagrees with ``sparsity`` or cannot tile a layer (a row
            length that ``m`` does not divide), no prunable layers, a
            prunable weight with ``requires_grad=False``, empty data or an empty batch, a batch
            the model or loss cannot take, non-finite gradients or loss (e.g. calibration data
            with no valid tokens).
        TypeError: Arguments of the wrong type (e.g. ``block_size=1.5``).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [(torch.randn(16, 4), torch.randint(0, 2, (16,)))]
        >>> report = prune(model, nn.CrossEntropyLoss(), data, 0.5, num_grads=16,
        ...                grad_batch_size=1)
        >>> round(report.sparsity, 2)
        0.5
    """
    t0 = time.perf_counter()
    if damp is None:
        damp = 0.01 if method == "layerwise" else 1.0
    nm = parse_pattern(pattern, sparsity) if pattern is not None else None
    if grad_dtype is not None:
        check_storage_dtype(grad_dtype, "grad_dtype")
    _check_arguments(
        model, loss_func, data, method, scope, num_grads, block_size, damp, steps, damp_mode,
        update, grad_batch_size, normalize, max_multi, multi_budget, callback,
    )  # fmt: skip
    targets = prunable_weights(model, layer_types, names)
    layer_targets = _layer_targets(sparsity, scope, targets)
    _check_targets(targets, method)
    if method == "layerwise":
        check_layerwise_targets(targets)
        if scope == "global" and nm is None:
            raise ValueError(
                "method='layerwise' scores each weight by its own layer's reconstruction error, "
                "which is not comparable across layers: pass scope='layer' (the same sparsity in "
                "every layer, as SparseGPT) or a pattern"
            )
    view = weights_view(model, targets, method, block_size)
    groups = view.groups(*nm) if nm is not None else None  # checks that the pattern tiles
    report = PruneReport(
        method=method, scope=scope, target=_plain(sparsity), layers=[], pattern=pattern
    )
    snapshot = view.snapshot()
    try:
        _prune_steps(
            view, report, model, loss_func, data, layer_targets, method, scope, num_grads,
            block_size, damp, steps, damp_mode, update, grad_batch_size, normalize, max_multi,
            multi_budget, callback, nm, groups, grad_dtype,
        )  # fmt: skip
    except BaseException:
        snapshot.restore()  # all or nothing: a failed prune leaves the model as it was
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _prune_steps(
    view: WeightsView, report: PruneReport, model, loss_func, data, layer_targets, method, scope,
    num_grads, block_size, damp, steps, damp_mode, update, grad_batch_size, normalize, max_multi,
    multi_budget, callback, nm=None, groups=None, grad_dtype=None,
) -> None:  # fmt: skip
    """The one pruning loop of :func:`prune`, after its checks, on either view of the weights.

    Fills ``report``; may leave the model half-pruned on error (:func:`prune` restores it).
    """
    d = view.dim
    start = view.current_sparsity()
    view.prepare()
    bsize = block_size if method == "mfac" else None  # dense OBS and sharded M-FAC: one block
    for j in range(steps):
        frac = (j + 1) / steps
        w, alive = view.weights(), view.alive()
        inverse = None
        if method == "magnitude":
            scores = w.abs()
        elif method == "layerwise":
            inverse = view.layer_inverse(model, loss_func, data, damp, damp_mode == "relative")
            report.damp.append(sum(inverse.damps) / len(inverse.damps))
            inv_diag = inverse.inverse_diagonal().to(w.dtype)
            scores = obs_scores(w, inv_diag)
        else:
            G = view.gradients(model, loss_func, data, num_grads, grad_batch_size, grad_dtype)
            lam = float(damp)
            if damp_mode == "relative":
                scale = view.relative_damping(G)
                lam = damp * scale if scale > 0 else float(damp)
            report.damp.append(lam)
            inverse = view.inverse(G, lam, method, block_size)
            inv_diag = inverse.inverse_diagonal().to(w.dtype)
            scores = obs_scores(w, inv_diag)
        if nm is not None:  # k lowest of every group of m; already pruned entries count first
            prune_now = nm_select(scores, alive, groups, int(round((nm[1] - nm[0]) * frac)))
        else:
            prune_now = view.select(scores, alive, layer_targets, scope, normalize, frac, start)
        idx = (prune_now & alive).nonzero().squeeze(1)
        removed = view.count(prune_now & alive)
        kind = "none"
        if method == "layerwise" and update != "none" and removed > 0:
            # exact per row; the earlier removals are constraints too (they must stay zero)
            kind = "multi"
            w = w + inverse.update_multi(w, (prune_now | ~alive).nonzero().squeeze(1))
        elif inverse is not None and update != "none" and removed > 0:
            kind = update
            if update == "auto":
                most = view.most_per_block(idx, bsize, removed)
                small = most <= max_multi and removed * d <= multi_budget
                kind = "multi" if small else "diagonal"
            if kind == "multi":
                delta = view.update_multi(inverse, w, idx, bsize)
            else:
                delta = obs_update_diagonal(inverse, w, idx, inv_diag)
            w = w + delta
        report.update.append(kind)
        new_alive = alive & ~prune_now
        view.write(w, new_alive)
        reached = 1 - view.count(new_alive) / d
        report.steps.append(reached)
        if callback is not None:
            callback(j + 1, steps, reached)
    report.layers = view.layer_reports()


def _check_arguments(
    model, loss_func, data, method, scope, num_grads, block_size, damp, steps, damp_mode,
    update, grad_batch_size, normalize, max_multi, multi_budget, callback,
) -> None:  # fmt: skip
    """Every check of :func:`prune` that needs no data, done before the model is touched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value, choices in (
        ("method", method, METHODS),
        ("scope", scope, SCOPES),
        ("update", update, UPDATES),
        ("damp_mode", damp_mode, DAMP_MODES),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    check_damp(damp)
    check_positive_int(steps, "steps")
    check_positive_int(num_grads, "num_grads")
    if block_size is not None:
        check_positive_int(block_size, "block_size (or None for one block)")
    if grad_batch_size is not None:
        check_positive_int(grad_batch_size, "grad_batch_size (or None for one per batch)")
    for name, value in (("max_multi", max_multi), ("multi_budget", multi_budget)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be True or False, got {normalize!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if method == "magnitude":
        return
    if method == "layerwise":
        if data is None:
            raise ValueError("method 'layerwise' needs data (the layers' calibration inputs)")
    elif loss_func is None or data is None:
        raise ValueError(f"method {method!r} needs loss_func and data for the gradients")
    if loss_func is not None and not callable(loss_func):
        raise TypeError(f"loss_func must be callable, got {type(loss_func).__name__}")
    try:
        once = iter(data) is data
    except TypeError:
        raise TypeError(
            f"data must be an iterable of (X, y) batches, got {type(data).__name__}"
        ) from None
    if steps > 1 and once:
        raise ValueError(
            "data is an iterator that can be read only once, but steps > 1 reads it once per "
            "step: pass a list of batches or a DataLoader"
        )


def _check_targets(targets: list[PrunableWeight], method: str) -> None:
    """Checks of the prunable weights themselves, before the model is touched."""
    for t in targets:
        kinds = []
        if parametrize.is_parametrized(t.module, t.attr):
            kinds = [type(p).__name__ for p in t.module.parametrizations[t.attr]]
        if kinds not in ([], [WeightMask.__name__]):
            raise ValueError(
                f"{t.qualified_name} carries parametrizations {kinds} that prune cannot see "
                "through; bake them in (torch.nn.utils.parametrize.remove_parametrizations(..., "
                "leave_parametrized=True)) or leave the layer out with names="
            )
        p = t.param
        if not p.is_floating_point():
            raise TypeError(f"{t.qualified_name} has dtype {p.dtype}; prune needs float weights")
        if method != "magnitude" and not p.requires_grad:
            raise ValueError(
                f"{t.qualified_name} has requires_grad=False, so its gradients (which {method!r} "
                "needs) cannot be computed: call requires_grad_(True) on it for pruning, or leave "
                "it out with names= / method='magnitude'"
            )


def _plain(sparsity):
    return dict(sparsity) if isinstance(sparsity, Mapping) else float(sparsity)


def _layer_targets(sparsity, scope: str, targets: list[PrunableWeight]) -> list[float]:
    """Per-layer target sparsities (for global scope: the same value, used as the total)."""
    if isinstance(sparsity, Mapping):
        if scope != "layer":
            raise ValueError("a dict of sparsities needs scope='layer'")
        known = {t.qualified_name: t for t in targets} | {t.name: t for t in targets}
        unknown = [k for k in sparsity if k not in known]
        if unknown:
            raise ValueError(f"unknown layers in sparsity: {unknown}; prunable: {list(known)}")
        out = []
        for t in targets:
            s = sparsity.get(t.qualified_name, sparsity.get(t.name, 0.0))
            _check_sparsity(s, f"sparsity[{t.qualified_name!r}]")
            out.append(float(s))
        return out
    _check_sparsity(sparsity, "sparsity")
    return [float(sparsity)] * len(targets)


__all__ = ["DAMP_MODES", "METHODS", "SCOPES", "UPDATES", "one_shot_step", "prune"]
