"""Capture of states x_{s,l} and costates p_{s,l} = -dJ/dx_{s,l} at the candidate points.

Mechanism: for the duration of one forward pass, ``model.blocks`` is replaced by a ModuleList that
interleaves identity *probes* with the same block objects, so probe ``i`` sees exactly the tensor
that a block inserted at point ``i`` would see (the growth protocol, :mod:`topoderiv.models`). The
original ModuleList object is never mutated and is put back in a ``finally``. Costates come from
``torch.autograd.grad(loss, states)``: parameter ``.grad`` fields are never touched.

Scaling: ``J`` is the MEAN loss over all ``S`` samples of all batches. With batch losses ``J_b``
(means over ``B_b`` samples), ``J = sum_b (B_b / S) J_b``, so the costate of a sample in batch b is
``p = -(B_b / S) dJ_b/dx``. :func:`capture` takes that factor as ``scale``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .models import candidate_points, check_growable
from .training import batch_size, check_loss, iter_batches, train_mode, _device_of

__all__ = ["Capture", "capture", "capture_all", "state_at", "probed"]


class _Stop(Exception):
    """Raised by a probe to cut a forward pass short (prefix evaluation)."""


class _Probe(nn.Module):
    def __init__(self, point: int, store: Dict[int, Tensor], need_grad: bool, stop: bool) -> None:
        super().__init__()
        self.point, self.store, self.need_grad, self.stop = point, store, need_grad, stop

    def forward(self, x: Tensor) -> Tensor:
        if self.need_grad and torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_(True)  # frozen prefix: make the state a leaf of the graph
        self.store[self.point] = x
        if self.stop:
            raise _Stop()
        return x


@contextmanager
def probed(model: nn.Module, points: Sequence[int], *, need_grad: bool = True,
           stop_at: Optional[int] = None) -> Iterator[Dict[int, Tensor]]:
    """Temporarily interleaves probes into ``model.blocks``; yields ``{point: tensor}`` filled by forward.

    ``stop_at``: the probe at that point raises an internal exception after recording (use
    :func:`state_at` for that). The model's own ``blocks`` ModuleList is restored afterwards.
    """
    original = model.blocks
    store: Dict[int, Tensor] = {}
    wanted = set(points)
    if stop_at is not None:
        wanted.add(stop_at)
    probed_list = nn.ModuleList()
    n = len(original)
    for i in range(n + 1):
        if i in wanted:
            probed_list.append(_Probe(i, store, need_grad, i == stop_at))
        if i < n:
            probed_list.append(original[i])
    model.blocks = probed_list
    try:
        yield store
    finally:
        model.blocks = original


def _missing_point_error(fn: str, model: nn.Module, point: int) -> TypeError:
    return TypeError(
        f"{fn}: candidate point {point} of {type(model).__name__} was never reached: model.forward must "
        "apply model.blocks in order on one residual stream (growth protocol, see topoderiv.models)"
    )


@dataclass
class Capture:
    """States and costates at candidate points.

    Attributes:
        loss: the loss ``J`` (mean over the samples captured).
        n_samples: number of samples (dim 0 of ``x``).
        states: ``{point: x [B, ..., width]}`` (detached).
        costates: ``{point: p [B, ..., width]}`` with ``p = -scale * dJ_b/dx`` (detached).
    """

    loss: float
    n_samples: int
    states: Dict[int, Tensor] = field(default_factory=dict)
    costates: Dict[int, Tensor] = field(default_factory=dict)


def _check_points(fn: str, model: nn.Module, points: Optional[Sequence[int]]) -> List[int]:
    allp = candidate_points(model)
    if points is None:
        return allp
    if isinstance(points, int) and not isinstance(points, bool):
        points = [points]
    out: List[int] = []
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int) or p not in allp:
            raise ValueError(f"{fn}: points must be candidate points in [0, {allp[-1]}], got {p!r}")
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError(f"{fn}: points must name at least one candidate point, got an empty list")
    return sorted(out)


def capture(model: nn.Module, batch: Any, loss_fn: Callable[[Tensor, Any], Tensor], *,
            points: Optional[Sequence[int]] = None, scale: float = 1.0, fn: str = "capture") -> Capture:
    """One forward + backward on one ``(x, y)`` batch: states and costates at ``points``.

    Costates are ``p = -scale * dJ_b/dx`` where ``J_b = loss_fn(model(x), y)`` (a batch mean).
    Use ``scale = B_b / S`` for the costates of the mean loss over ``S`` samples. Runs in the
    model's current train/eval mode; parameter gradients are not touched.

    Raises:
        TypeError: model without candidate points or whose forward skips ``blocks``.
        ValueError: non-scalar or non-finite loss.
    """
    check_growable(model, fn)
    pts = _check_points(fn, model, points)
    x, y = batch
    with torch.enable_grad(), probed(model, pts) as store:
        out = model(x)
        loss = check_loss(fn, loss_fn(out, y))
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"{fn}: loss_fn returned a non-finite loss ({float(loss)}): check the data and model")
    for p in pts:
        if p not in store:
            raise _missing_point_error(fn, model, p)
    states = [store[p] for p in pts]
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, states, allow_unused=True)
    else:
        grads = tuple(None for _ in states)
    cap = Capture(float(loss.detach()), batch_size(x))
    for p, s, g in zip(pts, states, grads):
        cap.states[p] = s.detach()
        cap.costates[p] = torch.zeros_like(s).detach() if g is None else (-scale) * g.detach()
    return cap


def capture_all(model: nn.Module, data: Any, loss_fn: Callable[[Tensor, Any], Tensor], *,
                points: Optional[Sequence[int]] = None, training: Optional[bool] = False) -> Capture:
    """States and costates of the mean loss over ALL samples of ``data``, concatenated along dim 0.

    Each batch's costates are rescaled by ``B_b / S`` (see the module docstring), so the result
    equals capturing the concatenated batch. Memory grows with the data: for scoring use
    :func:`topoderiv.score`, which streams.

    Args:
        training: mode to run in (``False`` = eval, the default; ``None`` = keep).
    """
    fn = "capture_all"
    check_growable(model, fn)
    device = _device_of(model)
    caps: List[Capture] = []
    with train_mode(model, training):
        for batch in iter_batches(data, fn, device=device, check_finite=True):
            caps.append(capture(model, batch, loss_fn, points=points, scale=float(batch_size(batch[0])), fn=fn))
    if not caps:
        raise ValueError(f"{fn}: data must hold at least one batch, got none")
    S = sum(c.n_samples for c in caps)
    out = Capture(sum(c.loss * c.n_samples for c in caps) / S, S)
    for p in caps[0].states:
        out.states[p] = torch.cat([c.states[p] for c in caps], dim=0)
        out.costates[p] = torch.cat([c.costates[p] for c in caps], dim=0) / S
    return out


@torch.no_grad()
def state_at(model: nn.Module, x: Tensor, point: int) -> Tensor:
    """The residual-stream tensor at candidate ``point`` for input ``x`` (runs only the prefix)."""
    fn = "state_at"
    check_growable(model, fn)
    _check_points(fn, model, [point])
    with probed(model, [], need_grad=False, stop_at=point) as store:
        try:
            model(x)
        except _Stop:
            pass
    if point not in store:
        raise _missing_point_error(fn, model, point)
    return store[point]


def finite_or_raise(fn: str, name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return value
