"""The ``linear`` and ``tokens`` sites: the paper's block ``x + sigma(W u(x) + b)`` (METHOD.md 3, 7).

``linear``: on a stream ``[B, ..., width]`` (every leading dim counts as a sample; ``[B, width]``
for an MLP). ``tokens``: the same block token-wise on ``[B, T, width]`` (rows = samples x tokens;
``u`` = LayerNorm by default, the paper-style layer for a ViT). One sensitivity block per output
unit ``r`` of size ``m = dim(u) + 1``: ``B_r = sum_rows p_r xt xt^T``; ``phi`` is ``[n, m]`` =
``[W | b]``.

Options: ``width`` (stream width), ``activation`` (default ``"td"``; must be admissible),
``bias`` (default True), ``feature`` (``"identity"`` for linear, ``"layernorm"`` for tokens).
The legacy protocol (``{"new_block": True}``) builds blocks with ``model.new_block(index)``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..method.activations import activation_spec, check_admissible, get_activation
from ..method.statistic import EigenStatistic
from ..registry import lookup, name_of, register
from .base import Site, register_kind

__all__ = ["ResidualLayerBlock", "ResidualBlock", "LinearSite", "TokenSite", "block_parts", "feature_spec",
           "build_feature", "check_matrix_phi", "site_curvature"]

ActSpec = Union[str, nn.Module, None]


register(nn.LayerNorm, name="layernorm")  # feature maps: nn.Identity is "identity" (activations)

_LAYERNORM_OPTIONS = {"eps": (int, float), "elementwise_affine": bool, "bias": bool}


def feature_spec(feature: nn.Module) -> Union[str, Dict[str, Any]]:
    """The JSON-able spec of a block's feature map (inverse of :func:`build_feature`).

    ``"identity"``, ``{"layernorm": {eps, elementwise_affine, bias}}``, the registered name of
    another class (built without arguments), or ``"module:QualName"`` for an unregistered class
    (which rebuilds only once registered: :func:`topoderiv.registry.register`).
    """
    if isinstance(feature, nn.Identity):
        return "identity"
    if isinstance(feature, nn.LayerNorm):
        return {"layernorm": {"eps": feature.eps, "elementwise_affine": feature.elementwise_affine,
                              "bias": feature.bias is not None}}
    name = name_of(feature)
    if name is not None:
        return name
    cls = type(feature)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_feature(spec: Union[str, Dict[str, Any], nn.Module, None], width: int) -> nn.Module:
    """The feature map of a spec: None/"identity", "layernorm", ``{"layernorm": {...}}``, a registered
    class name (never imported), or an nn.Module (used as is)."""
    fn = "ResidualBlock"
    if spec is None or spec == "identity":
        return nn.Identity()
    if isinstance(spec, nn.Module):
        return spec
    if spec == "layernorm":
        return nn.LayerNorm(width)
    if isinstance(spec, dict) and list(spec) == ["layernorm"]:
        opts = spec["layernorm"]
        if not isinstance(opts, dict):
            raise ValueError(f"{fn}: feature {{'layernorm': options}} needs a dict of options, got {opts!r}")
        for key, val in opts.items():
            want = _LAYERNORM_OPTIONS.get(key)
            if want is None:
                raise ValueError(f"{fn}: feature layernorm option must be one of {sorted(_LAYERNORM_OPTIONS)}, got "
                                 f"{key!r}")
            if isinstance(val, bool) != (want is bool) or not isinstance(val, want):
                raise ValueError(f"{fn}: feature layernorm option {key} must be a "
                                 f"{'bool' if want is bool else 'number'}, got {val!r}")
        return nn.LayerNorm(width, **opts)
    if isinstance(spec, str):
        try:
            cls = lookup(spec, "feature map", fn, base=nn.Module)
        except ValueError as err:
            if ":" in spec:
                raise
            raise ValueError(f"{fn}: feature must be None, 'identity', 'layernorm', {{'layernorm': {{options}}}}, a "
                             f"registered nn.Module class or an nn.Module, got {spec!r} ({err})") from None
        try:
            return cls()
        except Exception as err:
            raise ValueError(f"{fn}: feature map {spec!r} ({cls.__qualname__}) must be constructible without "
                             f"arguments, got {type(err).__name__}: {err}") from err
    raise ValueError(
        f"{fn}: feature must be None, 'identity', 'layernorm', {{'layernorm': {{options}}}}, a registered class "
        f"name or an nn.Module, got {spec!r}"
    )


class ResidualLayerBlock(nn.Module):
    """Base of the one-layer residual blocks ``x -> x + activation(layer(feature(x)))``: the layer is
    the submodule named by the class attribute ``LAYER`` (``linear`` of :class:`ResidualBlock`,
    ``conv`` of :class:`~topoderiv.sites.conv.ResidualConvBlock`); subclasses set ``activation``
    and ``feature`` too."""

    LAYER = "linear"

    def forward(self, x: Tensor) -> Tensor:
        return x + self.activation(getattr(self, self.LAYER)(self.feature(x)))

    def zero_(self) -> "ResidualLayerBlock":
        """Sets the layer's weight and bias to 0 (the block is then the identity for an admissible
        activation)."""
        for p in getattr(self, self.LAYER).parameters():
            nn.init.zeros_(p)
        return self


@register
class ResidualBlock(ResidualLayerBlock):
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
        self.feature = build_feature(feature, width)

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments."""
        return {"width": self.width, "activation": activation_spec(self.activation),
                "bias": self.linear.bias is not None, "feature": feature_spec(self.feature)}


def site_curvature(site: Site, act: nn.Module, fn: str) -> float:
    """``check_admissible(act)`` for the block ``site`` would insert: its curvature factor, or a
    ValueError naming the site."""
    try:
        return check_admissible(act)
    except ValueError as err:
        raise ValueError(f"{fn}: the block a {site.kind} site ({site.name!r}) of {type(site.model).__name__} "
                         f"would insert is not function preserving at second order: {err}") from None


def block_parts(block: nn.Module, fn: str) -> Tuple[nn.Linear, nn.Module, nn.Module]:
    """``(linear, activation, feature)`` of a ResidualBlock-compatible block, or TypeError."""
    linear = getattr(block, "linear", None)
    act = getattr(block, "activation", None)
    feature = getattr(block, "feature", None) or nn.Identity()
    if not isinstance(linear, nn.Linear) or act is None:
        raise TypeError(
            f"{fn}: the new block must be ResidualBlock-compatible (x + activation(linear(feature(x))) with .linear "
            f"an nn.Linear and .activation), got {type(block).__name__}"
        )
    return linear, act, feature


def check_matrix_phi(fn: str, phi: object, n: int, m: int) -> Tensor:
    """Validates ``phi`` as a finite floating ``[n, m]`` tensor; returns it detached."""
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


@register_kind("linear")
class LinearSite(Site):
    """The paper's block on ``[B, ..., width]`` (see the module docstring)."""

    default_feature = "identity"

    def build_block(self) -> nn.Module:
        if self.options.get("new_block"):
            return self.model.new_block(self.index)
        width = self.options.get("width")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"{self.kind} site {self.name!r}: option width must be an int >= 1, got {width!r}")
        block = ResidualBlock(width, activation=self.options.get("activation"), bias=self.options.get("bias", True),
                              feature=self.options.get("feature", self.default_feature))
        return block.zero_()

    def check_block(self, block: nn.Module, fn: str) -> float:
        _, act, _ = block_parts(block, fn)
        return site_curvature(self, act, fn)

    def check_state(self, x: Tensor, fn: str) -> None:
        if x.dim() < 2:
            raise ValueError(f"{fn}: a {self.kind} site ({self.name!r}) needs a stream [B, ..., width], got shape "
                             f"{list(x.shape)}")

    def statistic(self, block: nn.Module, curvature: float, *, backend: str, route: str, k: int,
                  tol: Optional[float]) -> EigenStatistic:
        linear, _, feature = block_parts(block, "score")
        d, name, kind = linear.in_features, self.name, self.kind

        def rows(x: Tensor, p: Tensor) -> Iterable[Tuple[Tensor, Tensor]]:
            with torch.no_grad():
                u = feature(x)
            if u.shape[-1] != d:
                raise ValueError(f"score: the feature map of the new block at {kind} site {name!r} gives "
                                 f"{u.shape[-1]} features but its linear layer expects {d}")
            yield u.reshape(-1, d), p.reshape(-1, p.shape[-1])

        return EigenStatistic(rows, linear.out_features, d, linear.bias is not None, curvature, backend=backend,
                              route=route, collect=True, k=k, tol=tol)

    def check_phi(self, block: nn.Module, phi: Any, fn: str) -> Tensor:
        linear, _, _ = block_parts(block, fn)
        return check_matrix_phi(fn, phi, linear.out_features, linear.in_features + int(linear.bias is not None))

    def random_phi(self, block: nn.Module, generator: torch.Generator, scale: float) -> Tensor:
        linear, _, _ = block_parts(block, "random_phi")
        n, d = linear.out_features, linear.in_features
        return torch.randn(n, d + int(linear.bias is not None), generator=generator) * (scale / math.sqrt(d))

    def identity_block(self, generator: torch.Generator) -> nn.Module:
        """The new block with tanh (``tanh(0) = 0``, ``tanh'(0) = 1``) and zero weights."""
        proto = self.build_block()
        if not isinstance(proto, ResidualBlock):
            raise TypeError(f"identity_block: needs the site's new block to be a ResidualBlock to swap its activation, "
                            f"got {type(proto).__name__}")
        return ResidualBlock(proto.width, activation="tanh", bias=proto.linear.bias is not None,
                             feature=proto.feature).zero_()

    def block_params(self, block: nn.Module, phi: Any, eps: float) -> Dict[str, Tensor]:
        linear, _, _ = block_parts(block, "insert")
        prefix = _prefix(block, linear)
        d = linear.in_features
        w = linear.weight
        out = {f"{prefix}weight": phi[:, :d].to(device=w.device, dtype=w.dtype) * eps}
        if linear.bias is not None:
            out[f"{prefix}bias"] = phi[:, d].to(device=w.device, dtype=w.dtype) * eps
        return out


def _prefix(block: nn.Module, linear: nn.Module) -> str:
    for name, mod in block.named_modules():
        if mod is linear:
            return f"{name}." if name else ""
    raise TypeError("insert: the block's linear layer is not one of its submodules")


@register_kind("tokens")
class TokenSite(LinearSite):
    """The paper's block token-wise on ``[B, T, width]``; ``u`` = LayerNorm by default."""

    default_feature = "layernorm"

    def check_state(self, x: Tensor, fn: str) -> None:
        if x.dim() != 3:
            raise ValueError(f"{fn}: a tokens site ({self.name!r}) needs a stream [B, T, width], got shape "
                             f"{list(x.shape)}")
