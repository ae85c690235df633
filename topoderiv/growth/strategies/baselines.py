"""Baseline insertion strategies (METHOD.md section 8) on the same :class:`~topoderiv.growth.Grower`.

``random`` (random point, small random initialisation of the same admissible block), ``identity``
(Net2DeeperNet-style function-preserving block trainable at first order), ``forward_thinking``
(layer-wise: a fresh block on top, earlier layers frozen) and ``topological_all`` (the
topological strategy with rule ``"all"``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence

import torch

from ...sites import Site, sites
from .base import InsertionStrategy, Proposal
from .topological import TopologicalStrategy

__all__ = ["TopologicalAllRows", "RandomInsertion", "IdentityInsertion", "ForwardThinking"]


def _random_site(grower: Any) -> Site:
    all_sites = sites(grower.model)
    return all_sites[int(torch.randint(len(all_sites), (1,), generator=grower.generator))]


def _last_site(grower: Any) -> Site:
    """The site at the end of the last container (on top of the stack, before the head)."""
    return sites(grower.model)[-1]


class TopologicalAllRows(TopologicalStrategy):
    """:class:`topoderiv.growth.TopologicalStrategy` with ``rule="all"`` (our variant, not the
    paper's rule), under the method name ``"topological_all"``.

    Why: ``Q_l`` is block diagonal, one block ``B_r`` per output unit ``r`` of the new layer. The
    "top" rule puts all of ``phi`` in the single best row ``r*``; with an admissible activation
    (``sigma'(0) = 0``) a row that starts at exactly zero gets exactly zero gradient forever, so
    the inserted block is in effect ONE neuron wide, whatever the width (the reference code's
    "multi" rule mitigates this with a few rows). Rule ``"all"`` of :func:`topoderiv.score` sets
    ``phi = sum_r c_r v_r e_r^T`` with ``v_r`` the top eigenvector of ``B_r`` and
    ``c_r ~ sqrt(max(mu_r, 0))`` (``||phi|| = 1``): every row with ``mu_r > 0`` starts non-zero and
    trains, and ``phi`` is still a second-order descent direction with gain
    ``phi^T Q phi = sum_r mu_r^2 / sum_r mu_r`` (at most ``mu``, at least the mean of the positive
    ``mu_r``). Rows with ``mu_r <= 0`` stay zero (and dead). It is also where training takes a
    small random block: near ``W = 0`` gradient descent is ``w_r <- (I + lr Q_r) w_r``, power
    iteration on each row's own block (tests/test_scoring.py checks this), so the rule "all"
    starts where :class:`RandomInsertion` would arrive after its alignment phase.

    The point is chosen as in :class:`TopologicalStrategy` (largest ``mu``, then the next ones if
    the eps search finds no decrease), and eps by :func:`topoderiv.search_eps`.

    Args:
        k, route, backend, eps_grid, max_tries: as :class:`TopologicalStrategy`.
        rule: must be ``"all"`` (accepted so that a saved :meth:`config` rebuilds the strategy).
    """

    name = "topological_all"

    def __init__(self, *, rule: str = "all", k: int = 1, route: str = "auto", backend: str = "auto",
                 eps_grid: Optional[Sequence[float]] = None, max_tries: int = 3) -> None:
        if rule != "all":
            raise ValueError(f"TopologicalAllRows: rule must be 'all', got {rule!r}; use TopologicalStrategy")
        super().__init__(rule="all", k=k, route=route, backend=backend, eps_grid=eps_grid, max_tries=max_tries)


class RandomInsertion(InsertionStrategy):
    """Random point, small random initialisation (the paper's "random layer insertion").

    The block is the site's new block (the same admissible block the topological method
    inserts), with ``W ~ N(0, (scale / sqrt(d_in))^2)`` and ``b ~ N(0, (scale / sqrt(d_in))^2)``
    drawn from the grower's seeded generator. With ``scale = 0.1`` the block starts close to the
    identity (``sigma(z) ~ z^2 / 2``): the insertion barely changes the function, and training
    takes it from there. The point is uniform over the candidate points.

    Args:
        scale: initialisation scale relative to ``1 / sqrt(d_in)`` (1.0 is PyTorch-like size).
    """

    name = "random"

    def __init__(self, scale: float = 0.1) -> None:
        super().__init__()
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"RandomInsertion: scale must be a finite number >= 0, got {scale!r}")
        self.scale = float(scale)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "scale": self.scale}

    def propose(self, grower: Any) -> Optional[Proposal]:
        site = _random_site(grower)
        phi = site.random_phi(site.build_block(), grower.generator, self.scale)
        self.last_info = {"scale": self.scale}
        return Proposal(site.point, phi=phi, eps=1.0, info=dict(self.last_info))


class IdentityInsertion(InsertionStrategy):
    """Net2DeeperNet-style identity insertion, made trainable for residual blocks.

    Net2DeeperNet inserts a layer that computes the identity, so the function is preserved, and
    lets gradient descent move it. In a residual network the identity block is ``x + g(x)`` with
    ``g = 0``. With the admissible activation (``sigma'(0) = 0``) the zero block
    ``x + sigma(0 * x + 0)`` is the identity but receives EXACTLY zero gradient (``dJ/dW =
    sigma'(0) (...) = 0``): it would stay zero forever and the "insertion" would be a no-op. A
    fair identity insertion must preserve the function and be trainable at first order, so the
    inserted block here is ``x + tanh(W u(x) + b)`` with ``W = 0, b = 0``: the model's outputs are
    unchanged bit for bit at insertion (``tanh(0) = 0``), and ``tanh'(0) = 1`` gives the new block
    the ordinary first-order gradient ``-sum_s p_s xt_s^T``. Nothing else about the block differs
    from the topological method's (same width, input feature, bias). The point is uniform over the
    candidate points, like :class:`RandomInsertion`, so "identity" and "random" differ only in
    the initialisation.

    Every site kind supplies such a block (:meth:`topoderiv.sites.Site.identity_block`): the
    tanh block above for ``linear``/``tokens``/``conv`` sites; for the transformer sub-blocks a
    standard block whose output projections are zero (the zero-initialised block transformer
    growers insert).

    Args:
        activation: ``"tanh"`` (default): the kind's first-order-trainable identity block.
            ``None`` inserts the site's own zero block, which with an admissible sigma is the
            degenerate, never-training block (for the record only).
        point: ``"random"`` (default) or ``"last"`` (on top of the stack, before the head).
    """

    name = "identity"

    def __init__(self, activation: Optional[str] = "tanh", point: str = "random") -> None:
        super().__init__()
        if activation not in ("tanh", None):
            raise ValueError(f"IdentityInsertion: activation must be 'tanh' or None, got {activation!r}")
        if point not in ("random", "last"):
            raise ValueError(f"IdentityInsertion: point must be 'random' or 'last', got {point!r}")
        self.activation, self.point = activation, point

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "activation": self.activation, "point": self.point}

    def propose(self, grower: Any) -> Optional[Proposal]:
        site = _random_site(grower) if self.point == "random" else _last_site(grower)
        block = site.new_block() if self.activation is None else site.identity_block(grower.generator)
        self.last_info = {"activation": self.activation or "model default", "kind": site.kind}
        return Proposal(site.point, block=block, info=dict(self.last_info))


class ForwardThinking(InsertionStrategy):
    """Forward Thinking (Hettinger et al., 2017): layer-wise training, earlier layers frozen.

    Each round puts a new block on top of the stack (the last site, just before the head),
    initialised at the scale of a fresh PyTorch layer (normal, with the standard deviation of
    ``nn.Linear``'s default uniform init, so the block is far from the identity and trainable
    with the admissible activation), and the grower must run
    with ``freeze_existing=True``: only the new block and the head train afterwards (the head is
    kept and re-trained rather than re-created, so the function stays continuous). The stem and
    every older block keep the values they had when they were frozen.

    Args:
        scale: multiplies PyTorch's default initialisation of the new block (1.0 = default).
    """

    name = "forward_thinking"

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = float(scale)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "scale": self.scale}

    def propose(self, grower: Any) -> Optional[Proposal]:
        if not grower.freeze_existing:
            raise ValueError("ForwardThinking: the grower must run with freeze_existing=True (layer-wise training)")
        site = _last_site(grower)
        # PyTorch's default layer init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) has std 1/sqrt(3 fan_in)
        phi = site.random_phi(site.build_block(), grower.generator, self.scale / math.sqrt(3.0))
        self.last_info = {"scale": self.scale}
        return Proposal(site.point, phi=phi, eps=1.0, info=dict(self.last_info))
