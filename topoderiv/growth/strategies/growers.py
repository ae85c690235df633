"""The baselines of transformer growers: stacking (copy a neighbouring block) and a zero-initialised
standard block.

``stacking`` (:class:`StackingInsertion`)
    The new block is a copy of a block already in the network (its weights, its class, its
    activation): the block just before the chosen point, so that the copy runs right after its
    original (progressive / depth-wise stacking, Gong et al. 2019, Du et al. 2024, growing one
    block at a time). Any site kind: the copy is whatever block the container holds. The
    function changes at insertion (``B(B(x))`` instead of ``B(x)``).
``zero_block`` (:class:`ZeroBlockInsertion`)
    A standard block of the site's transformer kind (timm's ``Block``, or the MLP / attention
    sub-block) with timm's ViT initialisation (every ``nn.Linear`` weight ``N(0, 0.02^2)``, biases
    zero, LayerNorms at ``(1, 0)``) and its OUTPUT projections (``attn.proj``, ``mlp.fc2``)
    zero: the function is unchanged at insertion, and the block trains at first order (the
    gradient of an output projection is ``-sum p h^T``, non-zero since the hidden activations
    ``h`` are not). This is the zero-initialised block of staged transformer training
    (e.g. Shen et al. 2022). Only transformer kinds have output projections: for ``linear``,
    ``tokens`` and ``conv`` sites (one layer, ``x + sigma(W u)``) a zero block is the identity
    insertion (:class:`~topoderiv.growth.IdentityInsertion`), and the strategy raises an error
    naming the kind.

Both choose the point like :class:`~topoderiv.growth.RandomInsertion` by default (uniform over the
candidate points, from the grower's seeded generator), so that against ``random`` / ``identity``
only the initialisation differs; ``point="last"`` (on top of the stack, before the head: the top
block copied onto the top for stacking) and ``point="middle"`` (the middle site) are the other
choices of the literature.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ...sites import Site, sites
from .base import InsertionStrategy, Proposal

__all__ = ["StackingInsertion", "ZeroBlockInsertion", "POINTS", "TRANSFORMER_KINDS"]

#: how the growers' baselines choose the point
POINTS = ("random", "last", "middle")
#: site kinds whose blocks have output projections (a zero block exists)
TRANSFORMER_KINDS = ("transformer_block", "mlp_block", "attention_block")


def _check_point_rule(cls: str, point: object) -> str:
    if point not in POINTS:
        raise ValueError(f"{cls}: point must be one of {POINTS}, got {point!r}")
    return str(point)


def choose_site(grower: Any, candidates: List[Site], rule: str) -> Site:
    """The site of ``rule`` among ``candidates`` (in point order): uniform from the grower's generator
    (``"random"``), the last one (``"last"``) or the middle one (``"middle"``, the lower of two)."""
    if rule == "last":
        return candidates[-1]
    if rule == "middle":
        return candidates[(len(candidates) - 1) // 2]
    return candidates[int(torch.randint(len(candidates), (1,), generator=grower.generator))]


class StackingInsertion(InsertionStrategy):
    """Stacking: the new block is a copy of the block before the chosen point (see the module docstring).

    At site ``i`` of a container the copy is of ``container[i - 1]`` and goes to ``container[i]``,
    right after it; at site 0 it is a copy of ``container[0]``, put before it. Sites of an empty
    container have no neighbour and are not candidates; when no container holds a block the
    strategy proposes nothing (growth stops, ``last_info["reason"]`` says why).

    Args:
        point: ``"random"`` (default), ``"last"`` or ``"middle"``.
    """

    name = "stacking"

    def __init__(self, point: str = "random") -> None:
        super().__init__()
        self.point = _check_point_rule("StackingInsertion", point)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "point": self.point}

    def propose(self, grower: Any) -> Optional[Proposal]:
        candidates = [s for s in sites(grower.model) if len(s.container) > 0]
        if not candidates:
            self.last_info = {"reason": "no block to copy: every site container is empty"}
            return None
        site = choose_site(grower, candidates, self.point)
        src = max(site.index - 1, 0)
        block = copy.deepcopy(site.container[src])
        for p in block.parameters():
            p.requires_grad_(True)
            p.grad = None
        self.last_info = {"point_rule": self.point, "kind": site.kind, "site": site.name,
                          "copied": f"{site.spec.container}.{src}"}
        return Proposal(site.point, block=block, info=dict(self.last_info))


class ZeroBlockInsertion(InsertionStrategy):
    """A zero-initialised standard transformer block (see the module docstring).

    Args:
        init_std: standard deviation of the non-output ``nn.Linear`` weights (timm's ViT: 0.02),
            drawn from the grower's seeded generator.
        point: ``"random"`` (default), ``"last"`` or ``"middle"``.

    Raises (``propose``):
        ValueError: the chosen site is not of a transformer kind.
    """

    name = "zero_block"

    def __init__(self, init_std: float = 0.02, point: str = "random") -> None:
        super().__init__()
        if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0 \
                or init_std == float("inf"):
            raise ValueError(f"ZeroBlockInsertion: init_std must be a finite number > 0, got {init_std!r}")
        self.init_std = float(init_std)
        self.point = _check_point_rule("ZeroBlockInsertion", point)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "init_std": self.init_std, "point": self.point}

    def block_for(self, site: Site, generator: torch.Generator) -> nn.Module:
        """The zero-initialised standard block of ``site`` (on the CPU)."""
        if site.kind not in TRANSFORMER_KINDS:
            raise ValueError(f"ZeroBlockInsertion: the site must be of a transformer kind {TRANSFORMER_KINDS} (a "
                             f"standard block with output projections), got a {site.kind!r} site ({site.name!r}); "
                             "for linear, tokens and conv sites a zero block is the identity insertion "
                             "(strategy 'identity')")
        block = site.identity_block(generator)  # the kind's standard block, output projections zero
        outputs = {id(m) for m in site.output_layers(block)}
        with torch.no_grad():
            for mod in block.modules():
                if isinstance(mod, nn.Linear):
                    if id(mod) in outputs:
                        mod.weight.zero_()
                    else:
                        mod.weight.copy_(torch.randn(mod.weight.shape, generator=generator) * self.init_std)
                    if mod.bias is not None:
                        mod.bias.zero_()
                elif isinstance(mod, nn.LayerNorm):
                    mod.reset_parameters()
        return block

    def propose(self, grower: Any) -> Optional[Proposal]:
        site = choose_site(grower, sites(grower.model), self.point)
        block = self.block_for(site, grower.generator)
        self.last_info = {"point_rule": self.point, "kind": site.kind, "site": site.name, "init_std": self.init_std}
        return Proposal(site.point, block=block, info=dict(self.last_info))
