"""Sites: where a new residual block can go, what it reads, and how phi becomes its parameters.

A model declares its candidate insertion points with :class:`SiteSpec` s: each names a
*container* (an ``nn.Sequential`` or ``nn.ModuleList`` of same-shape residual blocks, by its
dotted path, e.g. ``"blocks"`` or ``"stages.1"``), a *kind* (``"linear"``, ``"tokens"``,
``"conv"``, ``"mlp_block"``, ``"attention_block"``, ``"transformer_block"``; see
:data:`KINDS`) and the kind's options (width, activation, ...). Declaring:

- a method ``site_specs(self) -> list[SiteSpec]`` on the model class (our models), or
- :func:`declare` on an instance (models from other libraries; stored as the attribute
  ``topoderiv_sites``), or
- the legacy protocol: a ``blocks`` container plus ``new_block(point)`` returning a
  ResidualBlock-compatible block (``x + activation(linear(feature(x)))``).

A container of ``n`` blocks has ``n + 1`` sites: site ``i`` is the stream tensor entering
``container[i]`` (site ``n``: leaving the last block), and inserting there puts the new block at
``container[i]``; with the option ``start = s`` only sites ``s .. n`` exist (a stage whose first
block changes the shape declares ``start = 1``). Sites are numbered globally in declaration order (the ``point`` integers used
by :func:`topoderiv.score`, :func:`topoderiv.insert`, the history) and named
``"<container>.<i>"`` (e.g. ``"stages.1.3"``); both forms are accepted wherever a point is.

A :class:`Site` subclass (one module per kind under :mod:`topoderiv.sites`) implements
``build_block`` (the new block, the identity on the stream while its eps-scaled parameters are
zero), ``statistic`` (how states and costates become the sensitivity statistic, see
:mod:`topoderiv.method.statistic`) and ``block_params`` (the block's parameters with the
eps-scaled ones set to ``eps * phi``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

__all__ = [
    "SiteSpec",
    "Site",
    "KINDS",
    "register_kind",
    "declare",
    "site_specs",
    "sites",
    "site_at",
    "candidate_points",
    "depth",
    "check_growable",
    "check_point",
    "check_points",
    "reference_param",
]

#: kind name -> Site subclass (filled by the kind modules through :func:`register_kind`)
KINDS: Dict[str, Type["Site"]] = {}


def register_kind(name: str) -> Callable[[Type["Site"]], Type["Site"]]:
    """Class decorator registering a :class:`Site` subclass under ``name``."""

    def deco(cls: Type["Site"]) -> Type["Site"]:
        cls.kind = name
        KINDS[name] = cls
        return cls

    return deco


@dataclass(frozen=True)
class SiteSpec:
    """A declaration of the sites of one container.

    Attributes:
        container: dotted path of an ``nn.Sequential`` / ``nn.ModuleList`` of same-shape residual
            blocks inside the model (``""`` is not allowed).
        kind: a key of :data:`KINDS`.
        options: JSON-able options of the kind (e.g. ``{"width": 64, "activation": "td"}``).
    """

    container: str
    kind: str
    options: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"container": self.container, "kind": self.kind, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "SiteSpec":
        return cls(d["container"], d["kind"], dict(d.get("options", {})))


def declare(model: nn.Module, container: str, kind: str, **options: Any) -> nn.Module:
    """Declares the sites of ``model.<container>`` (appended to ``model.topoderiv_sites``); returns ``model``.

    Raises:
        TypeError: model is not an nn.Module or the container is not a Sequential/ModuleList.
        ValueError: unknown kind or container path.
    """
    fn = "declare"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    spec = SiteSpec(container, kind, dict(options))
    _container(model, spec, fn)
    _kind_cls(spec, fn)
    specs = list(getattr(model, "topoderiv_sites", []) or [])
    specs.append(spec)
    model.topoderiv_sites = specs
    return model


def _kind_cls(spec: SiteSpec, fn: str) -> Type["Site"]:
    cls = KINDS.get(spec.kind)
    if cls is None:
        raise ValueError(f"{fn}: site kind must be one of {sorted(KINDS)}, got {spec.kind!r}")
    return cls


def _container(model: nn.Module, spec: SiteSpec, fn: str) -> nn.Module:
    if not isinstance(spec.container, str) or not spec.container:
        raise ValueError(f"{fn}: a site container must be a non-empty dotted module path, got {spec.container!r}")
    try:
        cont = model.get_submodule(spec.container)
    except AttributeError:
        raise ValueError(f"{fn}: {type(model).__name__} has no submodule {spec.container!r} (site container)") from None
    if not isinstance(cont, (nn.Sequential, nn.ModuleList)):
        raise TypeError(f"{fn}: site container {spec.container!r} of {type(model).__name__} must be an nn.Sequential "
                        f"or nn.ModuleList of residual blocks, got {type(cont).__name__}")
    return cont


def site_specs(model: object, fn: str = "sites") -> List[SiteSpec]:
    """The site declarations of ``model`` (see the module docstring), or TypeError naming its class."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module with declared sites, got {type(model).__name__}")
    declared = getattr(model, "topoderiv_sites", None)
    if declared:
        return [s if isinstance(s, SiteSpec) else SiteSpec.from_dict(s) for s in declared]
    method = getattr(model, "site_specs", None)
    if callable(method):
        specs = list(method())
        if specs:
            return specs
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and callable(getattr(model, "new_block", None)):
        return [SiteSpec("blocks", "linear", {"new_block": True})]
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            f"{fn}: model must have candidate points (declared sites, see topoderiv.sites; or a `blocks` container "
            f"and a `new_block(point)` method), got {type(model).__name__} without a `new_block(point)` method"
        )
    raise TypeError(
        f"{fn}: model must have candidate points (declared sites, see topoderiv.sites: a site_specs() method, "
        f"topoderiv.sites.declare(model, ...), or a `blocks` container with `new_block(point)`), got "
        f"{type(model).__name__} without any"
    )


def check_growable(model: object, fn: str = "candidate_points") -> nn.Module:
    """Raises TypeError (naming the model class) unless ``model`` declares sites."""
    site_specs(model, fn)
    return model  # type: ignore[return-value]


def reference_param(model: nn.Module) -> Optional[Tensor]:
    """The first floating parameter (or buffer) of ``model``: its device and dtype are the model's."""
    for t in model.parameters():
        if t.is_floating_point():
            return t
    for t in model.buffers():
        if t.is_floating_point():
            return t
    return None


class Site:
    """One candidate insertion point. Subclasses implement a kind (see the module docstring).

    Attributes:
        model: the model. spec: its :class:`SiteSpec`. container: the container module.
        index: position in the container (the new block becomes ``container[index]``).
        point: global site number. name: ``"<container>.<index>"``.
    """

    kind: str = "site"

    def __init__(self, model: nn.Module, spec: SiteSpec, container: nn.Module, index: int, point: int) -> None:
        self.model, self.spec, self.container, self.index, self.point = model, spec, container, index, point
        self.options: Dict[str, Any] = dict(spec.options)

    @property
    def name(self) -> str:
        return f"{self.spec.container}.{self.index}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(point={self.point}, name={self.name!r})"

    # -- what kinds implement -------------------------------------------------------------------

    def build_block(self) -> nn.Module:  # pragma: no cover - interface
        """A new block for this site, the identity on the stream (its eps-scaled parameters zero)."""
        raise NotImplementedError

    def check_block(self, block: nn.Module, fn: str) -> float:  # pragma: no cover - interface
        """Checks that ``block`` is function preserving with a second-order first effect; returns
        its curvature factor (sigma''(0) for the paper's blocks). Raises ValueError otherwise."""
        raise NotImplementedError

    def statistic(self, block: nn.Module, curvature: float, *, backend: str, route: str, k: int,
                  tol: Optional[float]) -> Any:  # pragma: no cover - interface
        """A fresh statistic for this site (see :mod:`topoderiv.method.statistic`)."""
        raise NotImplementedError

    def block_params(self, block: nn.Module, phi: Any, eps: float) -> Dict[str, Tensor]:  # pragma: no cover
        """``{parameter name: tensor}`` of ``block`` with the eps-scaled parameters set to
        ``eps * phi`` (every other entry as in ``block``); used by ``functional_call``."""
        raise NotImplementedError

    def check_phi(self, block: nn.Module, phi: Any, fn: str) -> Any:  # pragma: no cover - interface
        """Validates a direction ``phi`` for this site's block (TypeError/ValueError); returns it detached."""
        raise NotImplementedError

    def check_state(self, x: Tensor, fn: str) -> None:
        """Raises ValueError when the stream tensor ``x`` at this site has the wrong layout for the kind."""

    def random_phi(self, block: nn.Module, generator: torch.Generator, scale: float) -> Any:  # pragma: no cover
        """A random direction for :meth:`block_params` at ``eps = 1``: the eps-scaled parameters
        drawn ``N(0, (scale / sqrt(fan_in))^2)`` (the random-insertion baseline), on the CPU."""
        raise NotImplementedError

    def identity_block(self, generator: torch.Generator) -> nn.Module:  # pragma: no cover - interface
        """The same block type, function preserving AND trainable at first order (the
        Net2DeeperNet-style identity-insertion baseline), e.g. a tanh activation with zero
        weights, or a standard block with its output projections zeroed. On the CPU."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------

    def new_block(self) -> nn.Module:
        """:meth:`build_block` on the model's device and dtype (deterministic: kinds seed their own RNG)."""
        block = self.build_block()
        ref = reference_param(self.model)
        if ref is not None:
            block = block.to(device=ref.device, dtype=ref.dtype)
        return block

    @torch.no_grad()
    def set_params(self, block: nn.Module, phi: Any, eps: float) -> nn.Module:
        """Writes :meth:`block_params` into ``block`` in place; returns it."""
        for name, value in self.block_params(block, phi, eps).items():
            block.get_parameter(name).copy_(value)
        return block


def _build_sites(model: nn.Module, fn: str) -> List[Site]:
    out: List[Site] = []
    for spec in site_specs(model, fn):
        cls = _kind_cls(spec, fn)
        cont = _container(model, spec, fn)
        for i in range(_start(spec, cont, fn), len(cont) + 1):
            out.append(cls(model, spec, cont, i, len(out)))
    return out


def _start(spec: SiteSpec, cont: nn.Module, fn: str) -> int:
    """The option ``start`` (default 0): the container's first ``start`` blocks have no site in
    front of them (e.g. a stage whose first block downsamples: its sites are then only those
    between same-shape blocks)."""
    start = spec.options.get("start", 0)
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or not 0 <= int(start) <= len(cont):
        raise ValueError(f"{fn}: option start of site container {spec.container!r} must be an int in "
                         f"[0, {len(cont)}] (its number of blocks), got {start!r}")
    return int(start)


def sites(model: nn.Module) -> List[Site]:
    """Every site of ``model``, in point order.

    Raises:
        TypeError: ``model`` declares no sites (the message names its class).
    """
    return _build_sites(model, "sites")


def depth(model: nn.Module) -> int:
    """Number of blocks in the model's site containers."""
    return sum(len(_container(model, spec, "depth")) for spec in site_specs(model, "depth"))


def candidate_points(model: nn.Module) -> List[int]:
    """The candidate insertion points ``[0, 1, ...]`` of ``model`` (one per site)."""
    return [s.point for s in _build_sites(model, "candidate_points")]


def check_point(fn: str, model: nn.Module, point: object, all_sites: Optional[List[Site]] = None) -> Site:
    """The site named by ``point`` (an int point or a ``"<container>.<i>"`` name), or ValueError."""
    all_sites = _build_sites(model, fn) if all_sites is None else all_sites
    if isinstance(point, str):
        for s in all_sites:
            if s.name == point:
                return s
        raise ValueError(f"{fn}: point must be a site name of {type(model).__name__} (one of "
                         f"{[s.name for s in all_sites][:8]}{' ...' if len(all_sites) > 8 else ''}), got {point!r}")
    if isinstance(point, bool) or not isinstance(point, numbers.Integral) or not 0 <= int(point) < len(all_sites):
        raise ValueError(f"{fn}: point must be an int candidate point in [0, {len(all_sites) - 1}] or a site name, "
                         f"got {point!r}")
    return all_sites[int(point)]


def site_at(model: nn.Module, point: object) -> Site:
    """The :class:`Site` of ``model`` at ``point`` (int or name)."""
    return check_point("site_at", model, point)


def check_points(fn: str, model: nn.Module, points: Optional[Sequence[object]]) -> List[Site]:
    """The sites named by ``points`` (None: all), deduplicated, in point order."""
    all_sites = _build_sites(model, fn)
    if points is None:
        return all_sites
    if isinstance(points, (int, str)) and not isinstance(points, bool):
        points = [points]
    chosen: Dict[int, Site] = {}
    for p in points:
        s = check_point(fn, model, p, all_sites)
        chosen[s.point] = s
    if not chosen:
        raise ValueError(f"{fn}: points must name at least one candidate point, got an empty list")
    return [chosen[k] for k in sorted(chosen)]
