"""The ``conv`` site: the paper's convolution block ``x + sigma(K (*) u(x) + b)`` (METHOD.md 7).

On an NCHW stream ``[B, C, H, W]``: ``K`` is a ``C -> C`` convolution with an odd ``k x k``
kernel, stride 1 and same (zero) padding ``k // 2``, ``sigma`` an admissible activation and
``u`` the block's input feature (identity by default). The block is the identity while
``K = 0, b = 0``. One sensitivity block per output channel ``r``, of size ``m = C k k (+1)``:

    B_r = sum_s sum_pixels p_{s,r,pixel} * patch patch^T      (patch = im2col patch of u(x), [patch; 1])

i.e. the MLP statistic with "rows = samples x pixels, features = patches". The feature order of a
patch is that of ``Conv2d.weight.reshape(C, -1)`` (channel, kernel row, kernel column: the order
of :func:`torch.nn.functional.unfold`), so ``phi [n, C k k + bias]`` maps onto the block as
``weight = phi[:, :Ckk].reshape(n, C, k, k)``, ``bias = phi[:, Ckk]``.

Route: until fused convolution kernels exist (a later issue), the statistic is built here in
Python by im2col: :func:`im2col_rows` unfolds the patches in BOUNDED chunks (at most
:data:`ROW_CHUNK_ELEMENTS` elements ``rows x m`` per chunk: several whole images, or tiles of
output pixels of one image when an image alone is larger) and each chunk is accumulated into the
dense blocks by :func:`topoderiv.ops.sensitivity_blocks` (``out=``). The rows are never kept, so
conv sites always take the dense route (``collect=False``): the memory of scoring a conv site is
its ``n m^2`` blocks plus one chunk, whatever the data size.

Options: ``channels`` (stream channels ``C``), ``kernel_size`` (odd, default 3), ``activation``
(default ``"td"``; must be admissible), ``bias`` (default True), ``feature`` (``"identity"`` or an
``nn.Module`` mapping ``[B, C, H, W]`` to the same shape).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method.activations import activation_spec, check_admissible, get_activation
from ..method.statistic import EigenStatistic
from ..registry import register
from .base import Site, register_kind
from .linear import build_feature, check_matrix_phi, feature_spec

__all__ = ["ResidualConvBlock", "ConvSite", "conv_parts", "im2col_rows", "ROW_CHUNK_ELEMENTS"]

ActSpec = Union[str, nn.Module, None]

#: Elements (``rows x m``, m = C k k + bias) of one chunk of im2col rows: 2**22 = 16 MB in float32
#: (the unfold makes one more copy of the same size). A chunk holds at least one row.
ROW_CHUNK_ELEMENTS = 2 ** 22


def _check_int(fn: str, name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {value!r}")
    return value


def _check_kernel(fn: str, kernel_size: object) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{fn}: kernel_size must be an odd int >= 1 (same padding kernel_size // 2, stride 1), "
                         f"got {kernel_size!r}")
    return kernel_size


def _conv_feature(fn: str, feature: Union[str, Dict[str, Any], nn.Module, None], channels: int) -> nn.Module:
    """The feature map u of a conv block: identity, an nn.Module, or ``"module:ClassName"``."""
    if isinstance(feature, nn.LayerNorm) or feature == "layernorm" or (isinstance(feature, dict) and "layernorm" in feature):
        raise ValueError(f"{fn}: feature must be None, 'identity', 'module:ClassName' or an nn.Module mapping "
                         f"[B, C, H, W] to [B, C, H, W]; a LayerNorm normalises the LAST dim (the image width) of an "
                         f"NCHW stream, not its channels, got {feature!r}")
    if isinstance(feature, str) and feature != "identity" and ":" not in feature:
        raise ValueError(f"{fn}: feature must be None, 'identity', 'module:ClassName' or an nn.Module, got {feature!r}")
    if feature is not None and not isinstance(feature, (str, nn.Module)):
        raise TypeError(f"{fn}: feature must be None, a str or an nn.Module, got {type(feature).__name__}")
    return build_feature(feature, channels)


@register
class ResidualConvBlock(nn.Module):
    """``x -> x + activation(conv(feature(x)))`` on an NCHW stream ``[B, channels, H, W]``.

    ``conv`` is ``nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=bias)``
    (stride 1, same padding: the output has the input's shape).

    Args:
        channels: stream channels (input and output).
        kernel_size: odd kernel size ``k`` (default 3).
        activation: activation spec (module, registered name, ``None`` = :class:`TDActivation`).
        bias: whether ``conv`` has a bias.
        feature: input feature map u: ``None``/``"identity"`` (u(x) = x), ``"module:ClassName"``
            (a class built without arguments) or an ``nn.Module`` mapping ``[B, C, H, W]`` to the
            same shape. A config rebuilds a module feature only from its class name (its
            parameters travel in the state dict).

    Raises:
        ValueError: channels < 1, an even or non-positive kernel size, a LayerNorm feature.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, activation: ActSpec = None, bias: bool = True,
                 feature: Union[str, nn.Module, None] = None) -> None:
        super().__init__()
        fn = "ResidualConvBlock"
        self.channels = _check_int(fn, "channels", channels, 1)
        self.kernel_size = _check_kernel(fn, kernel_size)
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=bool(bias))
        self.activation = get_activation(activation)
        self.feature = _conv_feature(fn, feature, channels)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W] -> [B, C, H, W]``."""
        return x + self.activation(self.conv(self.feature(x)))

    def zero_(self) -> "ResidualConvBlock":
        """Sets ``K = 0, b = 0`` (the block is then the identity for an admissible activation)."""
        with torch.no_grad():
            self.conv.weight.zero_()
            if self.conv.bias is not None:
                self.conv.bias.zero_()
        return self

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments."""
        return {"channels": self.channels, "kernel_size": self.kernel_size,
                "activation": activation_spec(self.activation), "bias": self.conv.bias is not None,
                "feature": feature_spec(self.feature)}


def conv_parts(block: nn.Module, fn: str) -> Tuple[nn.Conv2d, nn.Module, nn.Module]:
    """``(conv, activation, feature)`` of a ResidualConvBlock-compatible block.

    Raises:
        TypeError: no ``.conv`` ``nn.Conv2d`` or no ``.activation``.
        ValueError: a conv that is not shape preserving (channels in != out, stride, dilation,
            groups, padding other than ``k // 2`` zeros, an even or non-square kernel).
    """
    conv = getattr(block, "conv", None)
    act = getattr(block, "activation", None)
    feature = getattr(block, "feature", None) or nn.Identity()
    if not isinstance(conv, nn.Conv2d) or act is None:
        raise TypeError(f"{fn}: the new block must be ResidualConvBlock-compatible (x + activation(conv(feature(x))) "
                        f"with .conv an nn.Conv2d and .activation), got {type(block).__name__}")
    k = conv.kernel_size[0]
    if (conv.in_channels != conv.out_channels or conv.kernel_size != (k, k) or k % 2 == 0
            or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1
            or conv.padding != (k // 2, k // 2) or conv.padding_mode != "zeros"):
        raise ValueError(f"{fn}: the new block's conv must map C -> C channels with an odd square kernel, stride 1, "
                         f"dilation 1, groups 1 and zero padding kernel_size // 2 (shape preserving), got {conv}")
    return conv, act, feature


def im2col_rows(u: Tensor, q: Tensor, kernel_size: int, max_rows: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """The im2col rows of ``(u, q)`` in chunks of at most ``max(max_rows, 1)`` rows.

    Args:
        u: features ``[B, C, H, W]`` (the block's input, zero padded by ``kernel_size // 2``).
        q: costates ``[B, n, H, W]`` of the block's output.
        kernel_size: odd ``k``.
        max_rows: rows per chunk (one row per output pixel).

    Yields:
        ``(patches [r, C k k], q [r, n])``, the rows of output pixels (sample, row, column); the
        feature order is ``Conv2d.weight.reshape(n, -1)``'s. Whole images when ``B H W`` rows fit,
        else tiles of pixels of one image (the padded input is sliced, no patch is duplicated).
    """
    B, C, H, W = u.shape
    n = q.shape[1]
    k, pad = kernel_size, kernel_size // 2
    ckk = C * k * k
    max_rows = max(1, int(max_rows))
    if B * H * W <= max_rows:
        cols = F.unfold(u, k, padding=pad)  # [B, Ckk, HW]
        yield cols.transpose(1, 2).reshape(-1, ckk), q.permute(0, 2, 3, 1).reshape(-1, n)
        return
    tw = min(W, max_rows)
    th = max(1, min(H, max_rows // tw))
    up = F.pad(u, (pad, pad, pad, pad))
    for s in range(B):
        for r0 in range(0, H, th):
            r1 = min(H, r0 + th)
            for c0 in range(0, W, tw):
                c1 = min(W, c0 + tw)
                cols = F.unfold(up[s : s + 1, :, r0 : r1 + k - 1, c0 : c1 + k - 1], k)  # [1, Ckk, rows]
                yield cols[0].t().contiguous(), q[s, :, r0:r1, c0:c1].reshape(n, -1).t().contiguous()


@register_kind("conv")
class ConvSite(Site):
    """The paper's convolution block on ``[B, C, H, W]`` (see the module docstring)."""

    def _options(self) -> Tuple[int, int]:
        where = f"{self.kind} site {self.name!r} of {type(self.model).__name__}"
        channels = self.options.get("channels")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{where}: option channels must be an int >= 1, got {channels!r}")
        k = self.options.get("kernel_size", 3)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"{where}: option kernel_size must be an odd int >= 1 (same padding, stride 1), got {k!r}")
        return channels, k

    def build_block(self) -> nn.Module:
        channels, k = self._options()
        block = ResidualConvBlock(channels, k, activation=self.options.get("activation"),
                                  bias=self.options.get("bias", True), feature=self.options.get("feature"))
        return block.zero_()

    def check_block(self, block: nn.Module, fn: str) -> float:
        _, act, _ = conv_parts(block, fn)
        try:
            return check_admissible(act)
        except ValueError as err:
            raise ValueError(f"{fn}: the block a {self.kind} site ({self.name!r}) of {type(self.model).__name__} "
                             f"would insert is not function preserving at second order: {err}") from None

    def check_state(self, x: Tensor, fn: str) -> None:
        channels, _ = self._options()
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{fn}: a {self.kind} site ({self.name!r}) of {type(self.model).__name__} needs a stream "
                             f"[B, C, H, W] with C = {channels} channels, got shape {list(x.shape)}")

    def statistic(self, block: nn.Module, curvature: float, *, backend: str, route: str, k: int,
                  tol: Optional[float]) -> EigenStatistic:
        """An :class:`EigenStatistic` with ``n = C``, ``d = C k k``, streaming dense blocks.

        Its ``rows(x, p)`` applies the feature map to chunks of samples and unfolds them with
        :func:`im2col_rows`, at most :data:`ROW_CHUNK_ELEMENTS` // m rows per chunk (read at
        call time).
        """
        conv, _, feature = conv_parts(block, "score")
        n, ks = conv.out_channels, conv.kernel_size[0]
        d = conv.in_channels * ks * ks
        m = d + int(conv.bias is not None)
        name, kind = self.name, self.kind

        def rows(x: Tensor, p: Tensor) -> Iterable[Tuple[Tensor, Tensor]]:
            B, _, H, W = x.shape
            max_rows = max(1, ROW_CHUNK_ELEMENTS // m)
            per = max(1, max_rows // max(1, H * W))
            for s0 in range(0, B, per):
                with torch.no_grad():
                    u = feature(x[s0 : s0 + per])
                if u.shape != x[s0 : s0 + per].shape:
                    raise ValueError(f"score: the feature map of the new block at {kind} site {name!r} must keep the "
                                     f"stream's shape [B, C, H, W] = {list(x[s0 : s0 + per].shape)}, got "
                                     f"{list(u.shape)}")
                yield from im2col_rows(u, p[s0 : s0 + per], ks, max_rows)

        return EigenStatistic(rows, n, d, conv.bias is not None, curvature, backend=backend, route=route,
                              collect=False, k=k, tol=tol)

    def check_phi(self, block: nn.Module, phi: Any, fn: str) -> Tensor:
        conv, _, _ = conv_parts(block, fn)
        ks = conv.kernel_size[0]
        return check_matrix_phi(fn, phi, conv.out_channels,
                                conv.in_channels * ks * ks + int(conv.bias is not None))

    def random_phi(self, block: nn.Module, generator: torch.Generator, scale: float) -> Tensor:
        """``[n, C k k + bias]`` drawn ``N(0, (scale / sqrt(C k k))^2)`` (fan-in ``C k k``), on the CPU."""
        conv, _, _ = conv_parts(block, "random_phi")
        ks = conv.kernel_size[0]
        d = conv.in_channels * ks * ks
        return torch.randn(conv.out_channels, d + int(conv.bias is not None), generator=generator) * (scale / math.sqrt(d))

    def identity_block(self, generator: torch.Generator) -> nn.Module:
        """The new block with tanh (``tanh(0) = 0``, ``tanh'(0) = 1``) and zero weights, on the CPU."""
        proto = self.build_block()
        return ResidualConvBlock(proto.channels, proto.kernel_size, activation="tanh",
                                 bias=proto.conv.bias is not None, feature=proto.feature).zero_()

    def block_params(self, block: nn.Module, phi: Any, eps: float) -> Dict[str, Tensor]:
        """``{"<prefix>conv.weight": eps phi[:, :Ckk].reshape(n, C, k, k), "<prefix>conv.bias": eps phi[:, Ckk]}``."""
        conv, _, _ = conv_parts(block, "insert")
        prefix = ""
        for mod_name, mod in block.named_modules():
            if mod is conv:
                prefix = f"{mod_name}." if mod_name else ""
                break
        w = conv.weight
        ckk = w[0].numel()
        out = {f"{prefix}weight": phi[:, :ckk].to(device=w.device, dtype=w.dtype).reshape(w.shape) * eps}
        if conv.bias is not None:
            out[f"{prefix}bias"] = phi[:, ckk].to(device=w.device, dtype=w.dtype) * eps
        return out
