"""Function-preserving insertion of a residual block at a site, and the eps search.

:func:`insert` builds the site's new block (:meth:`topoderiv.sites.Site.new_block`), sets its
eps-scaled parameters to ``eps * phi`` and puts it at ``container[index]``: at ``eps = 0`` the
block is the identity and the model's outputs are unchanged bit for bit. Every argument is
validated and the block fully built BEFORE the model is touched, and the only mutation is one
container ``insert``: an error leaves the model as it was.

:func:`search_eps` picks eps on the training loss (METHOD.md section 3): where the model offers
``forward_from(point, h)``, the stream at the point is computed once per batch (prefix only), then
every eps of the grid goes through the new block and the model's suffix as ONE batched pass
(chunked to bound memory); otherwise the block is inserted temporarily and the whole model runs
per eps. It keeps the best eps rather than stopping at the first increase, and never modifies the
model. Under a process group each rank evaluates its own shard and the losses are all-reduced, so
every rank picks the same eps (the eps of one process on the union of the shards).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data import batch_size, check_loss, device_of, iter_batches, train_mode
from ..method.distributed import communicator
from ..sites import Site, check_growable, check_point
from ..sites.capture import probed, state_at
from .scoring import PointScore

__all__ = ["insert", "insert_block", "remove_block", "search_eps", "prepare_block", "DEFAULT_EPS_GRID"]

#: Default eps grid: the reference code's 0.1, 0.2, ..., 1.0 plus smaller steps for sharp losses.
DEFAULT_EPS_GRID: Tuple[float, ...] = (0.01, 0.02, 0.05) + tuple(round(0.1 * i, 1) for i in range(1, 11))

# stream elements (all eps of a chunk together) per batched suffix pass
_CHUNK_ELEMS = 2 ** 24


def _check_eps(fn: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(float(eps)):
        raise ValueError(f"{fn}: eps must be a finite real number, got {eps!r}")
    return float(eps)


def prepare_block(model: nn.Module, point: Any, phi: Any, eps: float, fn: str = "insert"
                  ) -> Tuple[nn.Module, Any, Site]:
    """Validates everything and returns ``(block with theta_e = eps * phi, phi, site)`` without
    touching the model.

    Raises:
        TypeError: model without sites, a block of the wrong type, phi not a tensor / dict.
        ValueError: bad point, phi shape/values, eps, or an inadmissible new block.
    """
    check_growable(model, fn)
    site = check_point(fn, model, point)
    eps = _check_eps(fn, eps)
    block = site.new_block()
    site.check_block(block, fn)
    if isinstance(phi, PointScore):
        phi = phi.phi
    phi_t = site.check_phi(block, phi, fn)
    site.set_params(block, phi_t, eps)
    for name, t in block.named_parameters():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{fn}: eps * phi overflows the {t.dtype} parameter {name!r} of the new block "
                             f"(eps = {eps!r})")
    block.topoderiv_inserted = True  # recorded by checkpoints
    return block, phi_t, site


def insert_block(model: nn.Module, point: Any, block: nn.Module) -> nn.Module:
    """Inserts an arbitrary ``block`` at candidate ``point`` (the site's ``container.insert``); returns ``model``.

    The lower-level primitive used by strategies that bring their own block (no admissibility or
    function-preservation check here: that is the caller's business).
    """
    fn = "insert_block"
    check_growable(model, fn)
    site = check_point(fn, model, point)
    if not isinstance(block, nn.Module):
        raise TypeError(f"{fn}: block must be an nn.Module, got {type(block).__name__}")
    block.topoderiv_inserted = True  # recorded by checkpoints
    site.container.insert(site.index, block)
    return model


def remove_block(model: nn.Module, index: Any) -> nn.Module:
    """Removes and returns the block right after site ``index`` (undo of an insertion there).

    For a model with one site container (``blocks``) this is ``model.blocks[index]``.
    """
    fn = "remove_block"
    check_growable(model, fn)
    site = check_point(fn, model, index)
    n = len(site.container)
    if site.index >= n:
        raise ValueError(f"{fn}: index must name a site followed by a block (not the end of {site.spec.container!r}, "
                         f"which has {n} blocks), got {index!r}")
    block = site.container[site.index]
    del site.container[site.index]
    return block


def insert(model: nn.Module, point: Any, phi: Any, eps: float) -> nn.Module:
    """Inserts the site's new block with its eps-scaled parameters set to ``eps * phi``.

    For the paper's blocks the new block computes ``x + sigma(eps * (W(phi) u(x) + b(phi)))``; at
    ``eps = 0`` the model's outputs are unchanged bit for bit. The model is modified in place and
    returned; the new block is ``container[index]`` of the site.

    Args:
        model: a model with sites. point: candidate point (int or site name).
        phi: the direction: ``[n, m]`` for the paper's blocks (``m = in_features + 1`` with bias),
            a dict for sub-blocks, or a :class:`PointScore` (e.g. ``score(...).best``).
        eps: step (finite real; 0 gives the identity block).

    Raises:
        TypeError / ValueError: see :func:`prepare_block`. The model is untouched on any error.
    """
    block, _, site = prepare_block(model, point, phi, eps, "insert")
    site.container.insert(site.index, block)
    return model


def _suffix_losses(model: nn.Module, site: Site, h: Tensor, y: Any, block: nn.Module, phi: Any,
                   eps_list: Sequence[float], loss_fn: Callable[[Tensor, Any], Tensor], fn: str) -> List[float]:
    """Batch losses for every eps, evaluating only the new block and the model's suffix."""
    B = h.shape[0]
    per = max(1, _CHUNK_ELEMS // max(1, h.numel()))
    out: List[float] = []
    for c0 in range(0, len(eps_list), per):
        chunk = eps_list[c0 : c0 + per]
        hs = []
        for e in chunk:
            if e == 0.0:
                hs.append(h)
                continue
            hs.append(functional_call(block, site.block_params(block, phi, e), (h,), strict=False))
        res = model.forward_from(site.point, torch.cat(hs, dim=0) if len(hs) > 1 else hs[0])
        for g in range(len(chunk)):
            loss = check_loss(fn, loss_fn(res[g * B : (g + 1) * B], y))
            out.append(float(loss))
    return out


def _full_losses(model: nn.Module, site: Site, x: Tensor, y: Any, block: nn.Module, phi: Any,
                 eps_list: Sequence[float], loss_fn: Callable[[Tensor, Any], Tensor], fn: str) -> List[float]:
    """Without ``forward_from``: temporarily inserts the block and runs the whole model per eps."""
    out: List[float] = []
    site.container.insert(site.index, block)
    try:
        for e in eps_list:
            site.set_params(block, phi, e)
            out.append(float(check_loss(fn, loss_fn(model(x), y))))
    finally:
        del site.container[site.index]
    return out


@torch.no_grad()
def search_eps(model: nn.Module, point: Any, phi: Any, data: Any,
               loss_fn: Callable[[Tensor, Any], Tensor], grid: Optional[Sequence[float]] = None, *,
               training: Optional[bool] = False, max_batches: Optional[int] = None, group: Any = None
               ) -> Tuple[Optional[float], Dict[float, float]]:
    """The eps of ``grid`` that minimises the training loss after inserting ``eps * phi`` at ``point``.

    Args:
        model, point, phi: as in :func:`insert`.
        data: one ``(x, y)`` batch or an iterable of batches; loss = mean over all samples.
        loss_fn: batch-mean loss.
        grid: eps values to try (default :data:`DEFAULT_EPS_GRID`: 0.01, 0.02, 0.05, 0.1, ..., 1.0).
            Negative values try ``-phi``. 0 is always evaluated as the baseline.
        training: mode of the evaluation (``False`` = eval, default; restored afterwards).
        max_batches: use at most this many batches.
        group: process group (as :func:`topoderiv.score`: ``None`` the current one, ``False``
            this process only). Under a group of several ranks every rank must call with the same
            point, phi and grid and its own shard of the data (possibly empty): the per-eps loss
            sums and the sample count are all-reduced (one collective), so every rank returns the
            same ``(best_eps, losses)``.

    Returns:
        ``(best_eps, losses)``: ``losses`` maps every eps (0.0 included) to the mean loss;
        ``best_eps`` is the grid value with the lowest loss, or None when none is below the loss at
        eps = 0. Non-finite losses count as +inf. The model is never modified.
    """
    fn = "search_eps"
    block, phi_t, site = prepare_block(model, point, phi, 0.0, fn)
    if grid is None:
        grid = DEFAULT_EPS_GRID
    if isinstance(grid, (str, bytes)) or not hasattr(grid, "__iter__"):
        raise TypeError(f"{fn}: grid must be a sequence of floats, got {type(grid).__name__}")
    eps_vals: List[float] = []
    for e in grid:
        e = _check_eps(fn, e)
        if e != 0.0 and e not in eps_vals:
            eps_vals.append(e)
    if not eps_vals:
        raise ValueError(f"{fn}: grid must hold at least one non-zero eps, got {list(grid)!r}")
    eps_list = [0.0] + eps_vals
    device = device_of(model)
    has_suffix = callable(getattr(model, "forward_from", None))
    comm = communicator(group, fn)
    totals = [0.0] * len(eps_list)
    S = 0
    checked = False
    failed: Optional[Exception] = None
    try:
        with train_mode(model, training):
            block.train(model.training)
            for x, y in iter_batches(data, fn, device=device, check_finite=True, limit=max_batches):
                B = batch_size(x)
                if B == 0:
                    continue
                if not checked:  # one forward with every site hooked: the container holds one stream shape
                    with probed(model, [site.point], need_grad=False, fn=fn) as probes:
                        model(x)
                    probes.check(fn, [site.point])
                    site.check_state(probes.store[site.point], fn)
                    checked = True
                if has_suffix:
                    h = state_at(model, x, site.point)
                    losses = _suffix_losses(model, site, h, y, block, phi_t, eps_list, loss_fn, fn)
                else:
                    losses = _full_losses(model, site, x, y, block, phi_t, eps_list, loss_fn, fn)
                for i, v in enumerate(losses):
                    totals[i] += (v if math.isfinite(v) else math.inf) * B
                S += B
    except Exception as err:  # under a group every rank must learn of it
        if comm is None:
            raise
        failed = err
    if comm is not None:
        comm.agree({"point": site.point, "eps": eps_list}, failed)
        summed = comm.sum_floats([float(S)] + totals, "eps")
        S, totals = int(summed[0]), summed[1:]
    if S == 0:
        raise ValueError(f"{fn}: data must hold at least one non-empty (x, y) batch, got none")
    mean = {e: t / S for e, t in zip(eps_list, totals)}
    if not math.isfinite(mean[0.0]):
        raise ValueError(f"{fn}: the loss of the model itself (eps = 0) is not finite ({mean[0.0]})")
    best = min(eps_vals, key=lambda e: (mean[e], abs(e)))
    return (best if mean[best] < mean[0.0] else None), mean
