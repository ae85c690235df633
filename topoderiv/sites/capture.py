"""Capture of states x_{s,l} and costates p_{s,l} = -dJ/dx_{s,l} at sites, by hooks.

For one forward pass, every site's container gets hooks (``torch.nn.Module`` forward hooks; the
containers and their blocks are never replaced or mutated): site ``i`` of a container of ``n``
blocks is read by a forward PRE-hook of ``container[i]`` (``i < n``), a forward hook of
``container[n - 1]`` (``i = n``), or a pre-hook of the container itself when it is an empty
``nn.Sequential``. The hook passes on an alias of the tensor (``x.view_as(x)``, or a fresh leaf
``x.detach().requires_grad_()`` when nothing before it requires grad), so the costate is the
derivative through the path a block inserted there would feed, exactly. Costates come from
``torch.autograd.grad(loss, states)``: parameter ``.grad`` fields are never touched. Works for
``nn.Sequential`` and ``nn.ModuleList`` containers and nested stages alike.

Every position of a container is recorded (shapes only where not asked for), so a container
whose blocks change the stream's shape (a downsampling inside a stage) is reported.

Scaling: ``J`` is the MEAN loss over all ``S`` samples of all batches. With batch losses ``J_b``
(means over ``B_b`` samples), ``J = sum_b (B_b / S) J_b``, so the costate of a sample in batch b is
``p = -(B_b / S) dJ_b/dx``. :func:`capture` takes that factor as ``scale``.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data import batch_size, check_loss, device_of, iter_batches, train_mode
from .base import Site, check_growable, check_points

__all__ = ["Capture", "Probes", "capture", "capture_all", "state_at", "probed"]


class _Stop(Exception):
    """Raised by a hook to cut a forward pass short (prefix evaluation)."""


class _Recorder:
    """Records the stream tensor at one site."""

    def __init__(self, site: Site, store: Dict[int, Tensor], shapes: Dict[int, tuple], want: bool,
                 need_grad: bool, stop: bool) -> None:
        self.site, self.store, self.shapes = site, store, shapes
        self.want, self.need_grad, self.stop = want, need_grad, stop

    def record(self, x: Any) -> Any:
        if not isinstance(x, Tensor):
            raise TypeError(f"capture: the stream at site {self.site.name!r} must be a tensor, got {type(x).__name__}")
        self.shapes[self.site.point] = tuple(x.shape[1:])
        if not self.want:
            return x
        if self.need_grad and torch.is_grad_enabled():
            x = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
        self.store[self.site.point] = x
        if self.stop:
            raise _Stop()
        return x

    def pre_hook(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if not args:
            raise TypeError(f"capture: the block after site {self.site.name!r} must take the stream as its first "
                            "positional argument")
        x = self.record(args[0])
        return (x,) + tuple(args[1:])

    def post_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.record(output)


class Probes:
    """What :func:`probed` yields: ``store`` (``{point: tensor}``) and the shapes seen at every site."""

    def __init__(self, model: nn.Module, all_sites: List[Site]) -> None:
        self.model, self.all_sites = model, all_sites
        self.store: Dict[int, Tensor] = {}
        self.shapes: Dict[int, tuple] = {}

    def check(self, fn: str, wanted: Sequence[int]) -> None:
        """Raises TypeError when a wanted site was never reached, ValueError when a container's
        blocks change the stream's shape."""
        name = type(self.model).__name__
        for pt in wanted:
            if pt not in self.shapes:
                s = self.all_sites[pt]
                raise TypeError(f"{fn}: site {s.name!r} of {name} was never reached: model.forward must call the "
                                f"blocks of {s.spec.container!r} in order on one residual stream")
        by_container: Dict[str, List[Site]] = {}
        for s in self.all_sites:
            by_container.setdefault(s.spec.container, []).append(s)
        for cont, ss in by_container.items():
            seen = [(s, self.shapes[s.point]) for s in ss if s.point in self.shapes]
            for (a, sa), (b, sb) in zip(seen, seen[1:]):
                if sa != sb:
                    raise ValueError(
                        f"{fn}: site container {cont!r} of {name} must hold residual blocks of one stream shape, got "
                        f"a stream of shape {list(sa)} at site {a.name!r} and {list(sb)} at site {b.name!r} (a block "
                        f"between them changes the shape, e.g. a downsampling: declare each same-shape stage as its "
                        f"own container)"
                    )


@contextmanager
def probed(model: nn.Module, points: Optional[Sequence[object]] = None, *, need_grad: bool = True,
           stop_at: Optional[object] = None, fn: str = "capture") -> Iterator[Probes]:
    """Hooks every site of ``model`` for the forwards run inside; yields a :class:`Probes`.

    ``points`` (None: all) are recorded in ``probes.store``; every site's shape is recorded.
    ``stop_at``: the forward is cut short (an internal exception, caught by :func:`state_at`)
    right after that site is recorded. The hooks are removed on exit.
    """
    all_sites = check_points(fn, model, None)
    wanted = {s.point for s in (all_sites if points is None else check_points(fn, model, points))}
    stop_pt = None
    if stop_at is not None:
        stop_pt = check_points(fn, model, [stop_at])[0].point
        wanted.add(stop_pt)
    probes = Probes(model, all_sites)
    with ExitStack() as stack:
        for s in all_sites:
            rec = _Recorder(s, probes.store, probes.shapes, s.point in wanted, need_grad, s.point == stop_pt)
            n = len(s.container)
            if s.index < n:
                h = s.container[s.index].register_forward_pre_hook(rec.pre_hook)
            elif n > 0:
                h = s.container[n - 1].register_forward_hook(rec.post_hook)
            elif isinstance(s.container, nn.Sequential):
                h = s.container.register_forward_pre_hook(rec.pre_hook)
            else:
                raise TypeError(f"{fn}: site {s.name!r} of {type(model).__name__} sits in an EMPTY nn.ModuleList, "
                                "which has no forward to hook: make the container an nn.Sequential")
            stack.callback(h.remove)
        yield probes


@dataclass
class Capture:
    """States and costates at sites.

    Attributes:
        loss: the loss ``J`` (mean over the samples captured).
        n_samples: number of samples (dim 0 of ``x``).
        states: ``{point: x [B, ...]}`` (detached).
        costates: ``{point: p [B, ...]}`` with ``p = -scale * dJ_b/dx`` (detached).
    """

    loss: float
    n_samples: int
    states: Dict[int, Tensor] = field(default_factory=dict)
    costates: Dict[int, Tensor] = field(default_factory=dict)


def capture(model: nn.Module, batch: Any, loss_fn: Callable[[Tensor, Any], Tensor], *,
            points: Optional[Sequence[object]] = None, scale: float = 1.0, fn: str = "capture") -> Capture:
    """One forward + backward on one ``(x, y)`` batch: states and costates at ``points`` (None: all).

    Costates are ``p = -scale * dJ_b/dx`` where ``J_b = loss_fn(model(x), y)`` (a batch mean).
    Use ``scale = B_b / S`` for the costates of the mean loss over ``S`` samples. Runs in the
    model's current train/eval mode; parameter gradients are not touched.

    Raises:
        TypeError: model without sites, or whose forward skips a site.
        ValueError: non-scalar or non-finite loss; a container whose blocks change the stream shape.
    """
    check_growable(model, fn)
    pts = [s.point for s in check_points(fn, model, points)]
    x, y = batch
    with torch.enable_grad(), probed(model, pts, fn=fn) as probes:
        out = model(x)
        loss = check_loss(fn, loss_fn(out, y))
        probes.check(fn, pts)
    store = probes.store
    if not bool(torch.isfinite(loss)):
        raise ValueError(f"{fn}: loss_fn returned a non-finite loss ({float(loss)}): check the data and model")
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
                points: Optional[Sequence[object]] = None, training: Optional[bool] = False) -> Capture:
    """States and costates of the mean loss over ALL samples of ``data``, concatenated along dim 0.

    Each batch's costates are rescaled by ``B_b / S`` (see the module docstring), so the result
    equals capturing the concatenated batch. Memory grows with the data: for scoring use
    :func:`topoderiv.score`, which streams.

    Args:
        training: mode to run in (``False`` = eval, the default; ``None`` = keep).
    """
    fn = "capture_all"
    check_growable(model, fn)
    device = device_of(model)
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
def state_at(model: nn.Module, x: Tensor, point: object) -> Tensor:
    """The stream tensor at site ``point`` (int or name) for input ``x`` (runs only the prefix)."""
    fn = "state_at"
    check_growable(model, fn)
    site = check_points(fn, model, [point])[0]
    with probed(model, [site.point], need_grad=False, stop_at=site.point, fn=fn) as probes:
        try:
            model(x)
        except _Stop:
            pass
    probes.check(fn, [site.point])
    return probes.store[site.point]
