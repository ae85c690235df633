"""The paper's fully connected residual network, growable in depth (``linear`` sites)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

from torch import Tensor, nn

from ..method.activations import activation_spec, get_activation
from ..registry import register
from ..sites import SiteSpec, site_at
from ..sites.linear import ResidualBlock

__all__ = ["ResidualMLP"]

ActSpec = Union[str, nn.Module, None]


@register
class ResidualMLP(nn.Module):
    """The paper's fully connected residual network, growable in depth.

    ``x [..., d_in] -> stem: activation(Linear(d_in, width)) -> depth x ResidualBlock -> head:
    Linear(width, d_out)``.

    The stem activation defaults to tanh: the stem is never an inserted block, so it need not be
    admissible, and a bounded stem keeps the residual stream (and hence the sensitivity blocks
    ``sum_s p x x^T``) of order one whatever the input scale. Blocks default to
    :class:`TDActivation`, which new blocks must use (or another admissible activation).

    Args:
        d_in, width, d_out: input, stream and output sizes.
        depth: number of residual blocks (0 allowed: candidate point 0 is then the stem output).
        activation: stem activation spec (default ``"tanh"``).
        block_activation: activation of the blocks (default ``"td"``).
        bias: blocks' linear layers have a bias.
        insert_activation: activation of blocks created by :meth:`new_block` (default: the same
            as ``block_activation``); it must be admissible (checked at insertion).
        feature: input feature map of blocks (``None``/``"identity"`` or ``"layernorm"``).
        flatten: flatten the input from dim 1 before the stem (``x [B, *shape]`` with
            ``prod(shape) = d_in``, e.g. images ``[B, C, H, W]``); default False (``x [..., d_in]``).
    """

    def __init__(self, d_in: int, width: int, d_out: int, depth: int, *, activation: ActSpec = None,
                 block_activation: ActSpec = None, bias: bool = True,
                 insert_activation: ActSpec = None, feature: Optional[str] = None,
                 flatten: bool = False) -> None:
        super().__init__()
        for name, val, lo in (("d_in", d_in, 1), ("width", width, 1), ("d_out", d_out, 1), ("depth", depth, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"ResidualMLP: {name} must be an int >= {lo}, got {val!r}")
        if not isinstance(flatten, bool):
            raise ValueError(f"ResidualMLP: flatten must be a bool, got {flatten!r}")
        self.d_in, self.width, self.d_out, self.bias = d_in, width, d_out, bool(bias)
        self.flatten = flatten
        # the modules build the network (an unregistered activation instance works); their names
        # (activation_spec) go into config() and are only needed to save and rebuild
        stem_act = get_activation(activation, default="tanh")
        blk_act = get_activation(block_activation)
        self._insert_module = blk_act if insert_activation is None else get_activation(insert_activation)
        self._act, self._block_act = activation_spec(stem_act), activation_spec(blk_act)
        self._insert_act = activation_spec(self._insert_module)
        self._feature = feature if feature is not None else "identity"
        self.stem = nn.Sequential(nn.Linear(d_in, width), stem_act)
        self.blocks = nn.Sequential(*(
            ResidualBlock(width, activation=blk_act, bias=self.bias, feature=self._feature)
            for _ in range(depth)
        ))
        self.head = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x.flatten(1) if self.flatten else x)))

    def forward_from(self, point: int, h: Tensor) -> Tensor:
        """Runs ``blocks[point:]`` and the head on the stream tensor ``h [..., width]``."""
        for blk in self.blocks[point:]:
            h = blk(h)
        return self.head(h)

    def site_specs(self) -> List[SiteSpec]:
        """One ``linear`` site container: ``blocks`` (point ``i`` = the stream entering ``blocks[i]``)."""
        return [SiteSpec("blocks", "linear", {"width": self.width, "activation": self._insert_module, "bias": self.bias,
                                              "feature": self._feature})]

    def new_block(self, point: int) -> ResidualBlock:
        """A zero-initialised block for candidate point ``point``, on this model's device and dtype."""
        n = len(self.blocks)
        if isinstance(point, bool) or not isinstance(point, int) or not 0 <= point <= n:
            raise ValueError(f"ResidualMLP.new_block: point must be an int in [0, {n}], got {point!r}")
        return site_at(self, point).new_block()

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments of the current architecture (current depth)."""
        cfg = {"d_in": self.d_in, "width": self.width, "d_out": self.d_out, "depth": len(self.blocks),
               "activation": self._act, "block_activation": self._block_act, "bias": self.bias,
               "insert_activation": self._insert_act, "feature": self._feature}
        if self.flatten:  # only when set: configs of unflattened models are unchanged
            cfg["flatten"] = True
        return cfg
