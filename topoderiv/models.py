"""Residual models that can grow in depth, and the growth protocol.

The growth protocol
-------------------
A model is *growable* when it has

- ``blocks``: an ``nn.ModuleList`` of residual blocks that ``forward`` applies in order to one
  residual stream (``for blk in self.blocks: h = blk(h)``), with nothing else between them;
- ``new_block(point) -> nn.Module``: a zero-initialised block for candidate point ``point``. It is
  *ResidualBlock-compatible*: it computes ``x + activation(linear(feature(x)))`` and exposes
  ``.linear`` (``nn.Linear``, ``in_features`` = dim of ``feature(x)``, ``out_features`` = stream
  width), ``.activation`` and ``.feature`` (the input feature map u, e.g. ``nn.Identity`` or
  ``nn.LayerNorm``);
- ``config() -> dict``: JSON-able constructor arguments reproducing the current architecture
  (with the current depth), so that ``type(model)(**model.config())`` has the same parameter
  shapes.

Optional: ``forward_from(point, h) -> output`` runs ``blocks[point:]`` and everything after them
on a stream tensor ``h``; the eps search then re-evaluates only that suffix (without it, the whole
network is re-run for every eps).

Candidate point ``i`` (``0 <= i <= len(blocks)``) is the residual-stream tensor entering
``blocks[i]``; point ``len(blocks)`` is the stream leaving the last block. Inserting at point ``i``
puts the new block at ``blocks[i]``. Stream tensors have shape ``[..., width]`` (``[B, width]`` for
an MLP, ``[B, T, width]`` for tokens): every leading dim counts as a sample.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from .activations import activation_spec, get_activation

__all__ = [
    "ResidualBlock",
    "ResidualMLP",
    "candidate_points",
    "check_growable",
    "block_spec",
    "build_block",
]

ActSpec = Union[str, nn.Module, None]


def _feature_spec(feature: nn.Module) -> Union[str, Dict[str, Any]]:
    if isinstance(feature, nn.Identity):
        return "identity"
    if isinstance(feature, nn.LayerNorm):
        return {"layernorm": {"eps": feature.eps, "elementwise_affine": feature.elementwise_affine,
                              "bias": feature.bias is not None}}
    cls = type(feature)
    return f"{cls.__module__}:{cls.__qualname__}"


def _build_feature(spec: Union[str, Dict[str, Any], nn.Module, None], width: int) -> nn.Module:
    if spec is None or spec == "identity":
        return nn.Identity()
    if isinstance(spec, nn.Module):
        return spec
    if spec == "layernorm":
        return nn.LayerNorm(width)
    if isinstance(spec, dict) and "layernorm" in spec:
        return nn.LayerNorm(width, **spec["layernorm"])
    if isinstance(spec, str) and ":" in spec:
        mod = get_activation(spec)  # same import rules: a class built without arguments
        return mod
    raise ValueError(
        f"ResidualBlock: feature must be None, 'identity', 'layernorm', 'module:ClassName' or an "
        f"nn.Module, got {spec!r}"
    )


class ResidualBlock(nn.Module):
    """``x -> x + activation(linear(feature(x)))`` on a residual stream ``[..., width]``.

    Args:
        width: stream width (input and output).
        activation: activation spec (module, registered name, ``None`` = :class:`TDActivation`).
        bias: whether ``linear`` has a bias.
        feature: input feature map u: ``None``/``"identity"`` (u(x) = x), ``"layernorm"`` or an
            ``nn.Module`` mapping ``[..., width] -> [..., width]``.
    """

    def __init__(self, width: int, *, activation: ActSpec = None, bias: bool = True,
                 feature: Union[str, nn.Module, None] = None) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"ResidualBlock: width must be an int >= 1, got {width!r}")
        self.width = width
        self.linear = nn.Linear(width, width, bias=bias)
        self.activation = get_activation(activation)
        self.feature = _build_feature(feature, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.activation(self.linear(self.feature(x)))

    def zero_(self) -> "ResidualBlock":
        """Sets ``W = 0, b = 0`` (the block is then the identity for an admissible activation)."""
        with torch.no_grad():
            self.linear.weight.zero_()
            if self.linear.bias is not None:
                self.linear.bias.zero_()
        return self

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments."""
        return {"width": self.width, "activation": activation_spec(self.activation),
                "bias": self.linear.bias is not None, "feature": _feature_spec(self.feature)}


def block_spec(block: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"class": "module:QualName", "config": {...}}`` for a block with ``config()``, else None."""
    if not hasattr(block, "config") or not callable(block.config):
        return None
    cls = type(block)
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "config": block.config()}


def build_block(spec: Dict[str, Any]) -> nn.Module:
    """Inverse of :func:`block_spec`."""
    import importlib

    mod_name, _, qual = spec["class"].partition(":")
    obj: Any = importlib.import_module(mod_name)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj(**spec["config"])


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
    """

    def __init__(self, d_in: int, width: int, d_out: int, depth: int, *, activation: ActSpec = None,
                 block_activation: ActSpec = None, bias: bool = True,
                 insert_activation: ActSpec = None, feature: Optional[str] = None) -> None:
        super().__init__()
        for name, val, lo in (("d_in", d_in, 1), ("width", width, 1), ("d_out", d_out, 1), ("depth", depth, 0)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"ResidualMLP: {name} must be an int >= {lo}, got {val!r}")
        self.d_in, self.width, self.d_out, self.bias = d_in, width, d_out, bool(bias)
        stem_act = get_activation(activation, default="tanh")
        self._act = activation_spec(stem_act)
        blk_act = get_activation(block_activation)
        self._block_act = activation_spec(blk_act)
        self._insert_act = self._block_act if insert_activation is None else activation_spec(get_activation(insert_activation))
        self._feature = feature if feature is not None else "identity"
        self.stem = nn.Sequential(nn.Linear(d_in, width), stem_act)
        self.blocks = nn.ModuleList(
            ResidualBlock(width, activation=self._block_act, bias=self.bias, feature=self._feature)
            for _ in range(depth)
        )
        self.head = nn.Linear(width, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from(0, self.stem(x))

    def forward_from(self, point: int, h: Tensor) -> Tensor:
        """Runs ``blocks[point:]`` and the head on the stream tensor ``h [..., width]``."""
        for blk in self.blocks[point:]:
            h = blk(h)
        return self.head(h)

    def new_block(self, point: int) -> ResidualBlock:
        """A zero-initialised block for candidate point ``point``, on this model's device and dtype."""
        n = len(self.blocks)
        if isinstance(point, bool) or not isinstance(point, int) or not 0 <= point <= n:
            raise ValueError(f"ResidualMLP.new_block: point must be an int in [0, {n}], got {point!r}")
        ref = self.head.weight
        blk = ResidualBlock(self.width, activation=self._insert_act, bias=self.bias, feature=self._feature)
        return blk.zero_().to(device=ref.device, dtype=ref.dtype)

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments of the current architecture (current depth)."""
        return {"d_in": self.d_in, "width": self.width, "d_out": self.d_out, "depth": len(self.blocks),
                "activation": self._act, "block_activation": self._block_act, "bias": self.bias,
                "insert_activation": self._insert_act, "feature": self._feature}


def check_growable(model: object, fn: str = "candidate_points") -> nn.Module:
    """Raises TypeError (naming the model class) unless ``model`` follows the growth protocol."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module following the growth protocol, got {type(model).__name__}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(
            f"{fn}: model must have candidate points (a `blocks` nn.ModuleList of residual blocks and a "
            f"`new_block(point)` method, see topoderiv.models), got {type(model).__name__} without "
            f"`blocks` ({type(blocks).__name__})"
        )
    if not callable(getattr(model, "new_block", None)):
        raise TypeError(
            f"{fn}: model must have a `new_block(point)` method returning a zero-initialised block (see "
            f"topoderiv.models), got {type(model).__name__} without one"
        )
    return model


def candidate_points(model: nn.Module) -> List[int]:
    """Candidate insertion points ``[0, 1, ..., len(model.blocks)]`` of a growable model.

    Raises:
        TypeError: ``model`` does not follow the growth protocol (the message names its class).
    """
    check_growable(model, "candidate_points")
    return list(range(len(model.blocks) + 1))
