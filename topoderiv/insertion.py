"""Function-preserving insertion of a residual block, and the eps search.

:func:`insert` adds ``x -> x + sigma(eps * (W(phi) u(x) + b(phi)))`` at a candidate point: with an
admissible sigma (sigma(0) = 0) the model's outputs at ``eps = 0`` are unchanged bit for bit
(``x + 0.0 == x``). Every argument is validated and the block fully built BEFORE the model is
touched, and the only mutation is one ``ModuleList.insert``: an error leaves the model as it was.

:func:`search_eps` picks eps on the training loss (METHOD.md section 3): the stream at the point
is computed once per batch (prefix only), then every eps of the grid goes through the new block
and the model's suffix (``model.forward_from``) as ONE batched pass (chunked to bound memory). It
keeps the best eps rather than stopping at the first increase, and never modifies the model.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .activations import check_admissible
from .capture import _check_points, state_at
from .models import check_growable
from .scoring import PointScore, block_parts
from .training import _device_of, batch_size, check_loss, iter_batches, train_mode

__all__ = ["insert", "insert_block", "remove_block", "search_eps", "prepare_block", "DEFAULT_EPS_GRID"]

#: Default eps grid: the reference code's 0.1, 0.2, ..., 1.0 plus smaller steps for sharp losses.
DEFAULT_EPS_GRID: Tuple[float, ...] = (0.01, 0.02, 0.05) + tuple(round(0.1 * i, 1) for i in range(1, 11))

# stream elements (all eps of a chunk together) per batched suffix pass
_CHUNK_ELEMS = 2 ** 24


def _check_eps(fn: str, eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(float(eps)):
        raise ValueError(f"{fn}: eps must be a finite real number, got {eps!r}")
    return float(eps)


def _check_phi(fn: str, phi: object, n: int, m: int) -> Tensor:
    if isinstance(phi, PointScore):
        phi = phi.phi
    if not isinstance(phi, Tensor):
        raise TypeError(f"{fn}: phi must be a torch.Tensor [n, m] (or a PointScore), got {type(phi).__name__}")
    if not phi.is_floating_point():
        raise TypeError(f"{fn}: phi must be a floating-point tensor, got dtype {phi.dtype}")
    if tuple(phi.shape) != (n, m):
        raise ValueError(f"{fn}: phi must have shape [n, m] = {[n, m]} for this point "
                         f"(m = in_features + bias), got {list(phi.shape)}")
    if phi.numel() and not bool(torch.isfinite(phi).all()):
        raise ValueError(f"{fn}: phi must contain only finite values, got NaN or Inf")
    return phi.detach()


def _scaled_params(linear: nn.Linear, phi: Tensor, eps: float) -> Dict[str, Tensor]:
    """``{"weight": eps * phi[:, :d], "bias": eps * phi[:, d]}`` (no bias entry for a layer without
    one) in the layer's dtype/device: the same arithmetic in insert and search_eps."""
    d = linear.in_features
    out = {"weight": phi[:, :d].to(device=linear.weight.device, dtype=linear.weight.dtype) * eps}
    if linear.bias is not None:
        out["bias"] = phi[:, d].to(device=linear.bias.device, dtype=linear.bias.dtype) * eps
    return out


@torch.no_grad()
def _assign(linear: nn.Linear, phi: Tensor, eps: float) -> None:
    """Sets ``[W | b] = eps * phi`` in place."""
    for name, value in _scaled_params(linear, phi, eps).items():
        getattr(linear, name).copy_(value)


def prepare_block(model: nn.Module, point: int, phi: Any, eps: float, fn: str = "insert"
                  ) -> Tuple[nn.Module, Tensor]:
    """Validates everything and returns ``(block with [W | b] = eps * phi, phi)`` without touching the model.

    Raises:
        TypeError: model not growable, block not ResidualBlock-compatible, phi not a tensor.
        ValueError: bad point, phi shape/values, eps, or an inadmissible activation.
    """
    check_growable(model, fn)
    if isinstance(point, bool) or not isinstance(point, int):
        raise ValueError(f"{fn}: point must be an int candidate point, got {point!r}")
    _check_points(fn, model, [point])
    eps = _check_eps(fn, eps)
    block = model.new_block(point)
    linear, act, _ = block_parts(block, fn)
    try:
        check_admissible(act)
    except ValueError as err:
        raise ValueError(f"{fn}: the block new_block({point}) of {type(model).__name__} is not function "
                         f"preserving: {err}") from None
    has_bias = linear.bias is not None
    n, d = linear.out_features, linear.in_features
    phi_t = _check_phi(fn, phi, n, d + int(has_bias))
    ref = _reference_param(model, linear.weight)
    block = block.to(device=ref.device, dtype=ref.dtype)
    _assign(block.linear, phi_t, eps)
    block.topoderiv_inserted = True  # recorded by checkpoints
    return block, phi_t


def _reference_param(model: nn.Module, default: Tensor) -> Tensor:
    for t in model.parameters():
        if t.is_floating_point():
            return t
    return default


def insert_block(model: nn.Module, point: int, block: nn.Module) -> nn.Module:
    """Inserts an arbitrary ``block`` at candidate ``point`` (``model.blocks.insert``); returns ``model``.

    The lower-level primitive used by strategies that bring their own block (no admissibility or
    function-preservation check here: that is the caller's business).
    """
    fn = "insert_block"
    check_growable(model, fn)
    if isinstance(point, bool) or not isinstance(point, int):
        raise ValueError(f"{fn}: point must be an int candidate point, got {point!r}")
    _check_points(fn, model, [point])
    if not isinstance(block, nn.Module):
        raise TypeError(f"{fn}: block must be an nn.Module, got {type(block).__name__}")
    block.topoderiv_inserted = True  # recorded by checkpoints
    model.blocks.insert(point, block)
    return model


def remove_block(model: nn.Module, index: int) -> nn.Module:
    """Removes and returns ``model.blocks[index]`` (undo of an insertion at that point)."""
    fn = "remove_block"
    check_growable(model, fn)
    n = len(model.blocks)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n:
        raise ValueError(f"{fn}: index must be an int in [0, {n - 1}], got {index!r}")
    block = model.blocks[index]
    del model.blocks[index]
    return block


def insert(model: nn.Module, point: int, phi: Union[Tensor, PointScore], eps: float) -> nn.Module:
    """Inserts ``model.new_block(point)`` with ``[W | b] = eps * phi`` at ``model.blocks[point]``.

    The new block computes ``x + sigma(eps * (W(phi) u(x) + b(phi)))``; at ``eps = 0`` the model's
    outputs are unchanged bit for bit. The model is modified in place and returned; the new block
    is ``model.blocks[point]``.

    Args:
        model: a growable model. point: candidate point in ``[0, len(model.blocks)]``.
        phi: ``[n, m]`` direction (``m = in_features + 1`` with bias), e.g. ``score(...).best.phi``,
            or a :class:`PointScore`.
        eps: step (finite real; 0 gives the identity block).

    Raises:
        TypeError / ValueError: see :func:`prepare_block`. The model is untouched on any error.
    """
    block, _ = prepare_block(model, point, phi, eps, "insert")
    model.blocks.insert(point, block)
    return model


def _suffix_losses(model: nn.Module, point: int, h: Tensor, y: Any, block: nn.Module, phi: Tensor,
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
            params = {f"linear.{k}": v for k, v in _scaled_params(block.linear, phi, e).items()}
            hs.append(functional_call(block, params, (h,)))
        res = model.forward_from(point, torch.cat(hs, dim=0) if len(hs) > 1 else hs[0])
        for g in range(len(chunk)):
            loss = check_loss(fn, loss_fn(res[g * B : (g + 1) * B], y))
            out.append(float(loss))
    return out


def _full_losses(model: nn.Module, point: int, x: Tensor, y: Any, block: nn.Module, phi: Tensor,
                 eps_list: Sequence[float], loss_fn: Callable[[Tensor, Any], Tensor], fn: str) -> List[float]:
    """Fallback without ``forward_from``: temporarily inserts the block and runs the whole model."""
    out: List[float] = []
    blocks = model.blocks
    blocks.insert(point, block)
    try:
        for e in eps_list:
            _assign(block.linear, phi, e)
            out.append(float(check_loss(fn, loss_fn(model(x), y))))
    finally:
        del blocks[point]
    return out


@torch.no_grad()
def search_eps(model: nn.Module, point: int, phi: Union[Tensor, PointScore], data: Any,
               loss_fn: Callable[[Tensor, Any], Tensor], grid: Optional[Sequence[float]] = None, *,
               training: Optional[bool] = False, max_batches: Optional[int] = None
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

    Returns:
        ``(best_eps, losses)``: ``losses`` maps every eps (0.0 included) to the mean loss;
        ``best_eps`` is the grid value with the lowest loss, or None when none is below the loss at
        eps = 0. Non-finite losses count as +inf. The model is never modified.
    """
    fn = "search_eps"
    block, phi_t = prepare_block(model, point, phi, 0.0, fn)
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
    device = _device_of(model)
    has_suffix = callable(getattr(model, "forward_from", None))
    totals = [0.0] * len(eps_list)
    S = 0
    with train_mode(model, training):
        block.train(model.training)
        for x, y in iter_batches(data, fn, device=device, check_finite=True, limit=max_batches):
            B = batch_size(x)
            if B == 0:
                continue
            if has_suffix:
                h = state_at(model, x, point)
                losses = _suffix_losses(model, point, h, y, block, phi_t, eps_list, loss_fn, fn)
            else:
                losses = _full_losses(model, point, x, y, block, phi_t, eps_list, loss_fn, fn)
            for i, v in enumerate(losses):
                totals[i] += (v if math.isfinite(v) else math.inf) * B
            S += B
    if S == 0:
        raise ValueError(f"{fn}: data must hold at least one non-empty (x, y) batch, got none")
    mean = {e: t / S for e, t in zip(eps_list, totals)}
    if not math.isfinite(mean[0.0]):
        raise ValueError(f"{fn}: the loss of the model itself (eps = 0) is not finite ({mean[0.0]})")
    best = min(eps_vals, key=lambda e: (mean[e], abs(e)))
    return (best if mean[best] < mean[0.0] else None), mean
