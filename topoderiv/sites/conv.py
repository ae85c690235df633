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

Statistic (:class:`ConvStatistic`): with the kernels backend the blocks come from the fused
convolution ops, which address the patches inside the kernels (the im2col matrix is never formed):
each batch's features ``u(x)`` and costates are either accumulated into dense blocks by
:func:`topoderiv.ops.conv_sensitivity_blocks` (``out=``; memory ``n m^2``) or KEPT as images
(``k^2`` times smaller than their patches) for a matrix-free solve by
:func:`topoderiv.ops.conv_sensitivity_topk`, under the memory budget of :func:`topoderiv.score`:
images are kept while they fit in ``memory_budget``, then moved into dense blocks and streamed from
there on (route ``"auto"``); with every batch kept the route is picked by
:func:`topoderiv.ops.choose_conv_route` with the real sample count. Matrix-free solves start from
:func:`conv_subspace_start`. The torch backend builds the blocks with the plain-PyTorch twin
(:func:`topoderiv.reference.conv_sensitivity_blocks`): im2col by unfold in BOUNDED chunks of at
most :data:`ROW_CHUNK_ELEMENTS` elements ``rows x m`` (:func:`im2col_rows`: several whole images, or
tiles of output pixels of one image when an image alone is larger).

Options: ``channels`` (stream channels ``C``), ``kernel_size`` (odd, default 3), ``activation``
(default ``"td"``; must be admissible), ``bias`` (default True), ``feature`` (``"identity"`` or an
``nn.Module`` mapping ``[B, C, H, W]`` to the same shape).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, reference
from ..method.activations import activation_spec, get_activation
from ..method.statistic import WARM_MIN_M, WARM_RANK, EigenPlan, EigenStatistic, embed_basis, support_basis
from ..registry import register
from .base import Site, register_kind
from .linear import ResidualLayerBlock, build_feature, check_matrix_phi, feature_spec, site_curvature

__all__ = ["ResidualConvBlock", "ConvSite", "ConvStatistic", "conv_parts", "conv_subspace_start", "im2col_rows",
           "ROW_CHUNK_ELEMENTS"]

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
class ResidualConvBlock(ResidualLayerBlock):
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

    LAYER = "conv"

    def __init__(self, channels: int, kernel_size: int = 3, *, activation: ActSpec = None, bias: bool = True,
                 feature: Union[str, nn.Module, None] = None) -> None:
        super().__init__()
        fn = "ResidualConvBlock"
        self.channels = _check_int(fn, "channels", channels, 1)
        self.kernel_size = _check_kernel(fn, kernel_size)
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, bias=bool(bias))
        self.activation = get_activation(activation)
        self.feature = _conv_feature(fn, feature, channels)

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
    """The im2col rows of ``(u, q)`` in chunks of at most ``max(max_rows, 1)`` rows
    (:func:`topoderiv.reference.conv_rows`; the torch backend's statistic).

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
    return reference.conv_rows(u, q, kernel_size, max_rows)


#: rows (output pixels) the warm start's Gram matrix is estimated from: an evenly spaced subset of the
#: samples beyond this (the start needs the leading directions of the patches to about 1%)
GRAM_ROWS = 2**14


def conv_subspace_start(u: Tensor, q: Tensor, kernel_size: int, bias: bool, rank: int = WARM_RANK) -> Tensor:
    """Warm-start vectors ``[n, m]`` for the top eigenvectors of the conv blocks of ``(u, q)``.

    :func:`topoderiv.method.statistic.subspace_start` for patches: ``V`` = the ``rank`` leading
    eigenvectors of the patches' Gram matrix ``G = Pt^T Pt`` (from at most :data:`GRAM_ROWS` rows
    of evenly spaced samples), by :func:`topoderiv.method.statistic.support_basis` on the features
    whose patches are not all zero: a randomized subspace iteration that applies ``G`` by two
    convolutions (``Pt W`` = ``conv2d``, ``Pt^T Z`` = its weight gradient; ``G`` is never formed,
    ``O(rows m rank)``), or, for small supports, an exact ``eigh`` of ``G`` accumulated from unfolded
    chunks of :data:`ROW_CHUNK_ELEMENTS`. Every patch is projected by one convolution
    (``z = conv2d(u, V)``, ``[N, rank, H, W]``); the projected blocks ``V^T B_r V`` are the ``1 x 1``
    conv blocks of ``(z, q)`` (:func:`topoderiv.ops.conv_sensitivity_blocks`), and the top
    eigenvector ``y_r`` of each (Lanczos to 1%) gives ``V y_r``, plus 1% of a seeded random
    direction (so a top eigenvector outside the subspace is still reached).

    Args:
        u: features ``[N, C, H, W]``; q: costates ``[N, n, H, W]`` (same dtype).
        kernel_size: odd ``k``; bias: whether ``m = C k k + 1``; rank: subspace dimension.
    """
    N, C, H, W = u.shape
    k, pad = kernel_size, kernel_size // 2
    d = C * k * k
    m = d + int(bias)
    acc = torch.float64 if u.dtype == torch.float64 else torch.float32
    step = max(1, -(-N * H * W // GRAM_ROWS))
    us = u[::step].to(acc)
    # diag(G): the sum of squares of each patch feature (a box sum of the squared input), the row
    # count for the bias feature; features with a zero diagonal are zero in every patch
    sq = us.square().sum(dim=0, keepdim=True)  # [1, C, H, W]
    diag = F.unfold(sq, k, padding=pad).sum(dim=-1)[0]  # [C k k]
    if bias:
        diag = torch.cat([diag, diag.new_full((1,), float(us.shape[0] * H * W))])
    support = (diag != 0).nonzero().squeeze(1)
    r = min(int(rank), m)

    def embedded(w: Tensor) -> Tensor:  # [s, c] on the support -> [m, c]
        if support.numel() == m:
            return w
        full = w.new_zeros(m, w.shape[1])
        full[support] = w
        return full

    def project(w: Tensor) -> Tensor:  # Pt W: [N', c, H, W]
        c = w.shape[1]
        return F.conv2d(us, w[:d].mT.reshape(c, C, k, k), w[d] if bias else None, padding=pad)

    def apply(w: Tensor) -> Tensor:  # G W on the support
        full = embedded(w)
        z = project(full)
        gw = torch.nn.grad.conv2d_weight(us, (full.shape[1], C, k, k), z, padding=pad).reshape(-1, d).mT
        out = torch.cat([gw, z.sum(dim=(0, 2, 3))[None]], dim=0) if bias else gw
        return out[support]

    def ritz(qb: Tensor) -> Tensor:  # qb^T G qb = (Pt qb)^T (Pt qb)
        z = project(embedded(qb))
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return zf.mT @ zf

    def gram_of() -> Tensor:  # G on the support, accumulated from unfolded chunks
        gram = torch.zeros(support.numel(), support.numel(), dtype=acc, device=u.device)
        max_rows = max(1, ROW_CHUNK_ELEMENTS // m)
        per = max(1, max_rows // max(1, H * W))  # whole samples per chunk (pixel tiles of one when it is larger)
        for s0 in range(0, us.shape[0], per):
            chunk = us[s0:s0 + per]
            for pt, _ in reference.conv_rows(chunk, chunk.new_zeros(chunk.shape[0], 0, H, W), k, max_rows):
                if bias:
                    pt = torch.cat([pt, pt.new_ones(pt.shape[0], 1)], dim=1)
                pt = pt if support.numel() == m else pt[:, support]
                gram.addmm_(pt.mT, pt)
        return gram

    basis = embed_basis(support_basis(support.numel(), r, apply, ritz, gram_of, us), support, m, r)  # [m, r]
    weight = basis[:d].mT.reshape(r, C, k, k)
    z = F.conv2d(u.to(acc), weight, basis[d] if bias else None, padding=pad)  # [N, r, H, W]
    c = ops.conv_sensitivity_blocks(z, q.to(acc), 1, bias=False)  # [n, r, r]
    v0 = ops.lanczos_topk(c, 1, tol=1e-2).vectors[:, :, 0] @ basis.mT
    g = torch.randn(v0.shape, generator=torch.Generator().manual_seed(0), dtype=v0.dtype).to(v0.device)
    return v0 + 0.01 * g / g.norm(dim=1, keepdim=True)


class ConvStatistic(EigenStatistic):
    """The statistic of a conv site: :class:`topoderiv.method.statistic.EigenStatistic` on images.

    ``rows(x, p)`` yields ``(u [b, C, H, W], q [b, n, H, W])`` (the feature map applied in chunks of
    samples), kept as images or accumulated into dense blocks by the convolution ops (the torch
    backend: the unfold twin, in chunks of :data:`ROW_CHUNK_ELEMENTS`); the kept images are solved
    matrix-free or dense as :func:`topoderiv.ops.choose_conv_route` picks (see the module docstring).
    ``held_bytes`` / ``flush()`` give :func:`topoderiv.score` its memory budget, as for rows. The
    scorer solves the kept images of all conv points of one (route, k, tolerance, warm start,
    kernel size, dtype) in one multi-point call (:func:`topoderiv.method.statistic.solve_points`).
    Under a process group the statistic streams dense blocks (all-reduced once per point): the
    matrix-free conv solve has no distributed form yet.
    """

    def __init__(self, rows: Any, n: int, channels: int, kernel_size: int, bias: bool, curvature: float, *,
                 backend: str, route: str, k: int, tol: Optional[float]) -> None:
        super().__init__(rows, n, channels * kernel_size * kernel_size, bias, curvature, backend=backend, route=route,
                         collect=True, k=k, tol=tol)
        self.kernel_size = kernel_size

    def _accumulate(self, u: Tensor, q: Tensor) -> None:
        ks = self.kernel_size
        if self.backend == "kernels":
            if self.blocks is None:
                self.blocks = ops.conv_sensitivity_blocks(u, q, ks, bias=self.bias)
            else:
                ops.conv_sensitivity_blocks(u, q, ks, bias=self.bias, out=self.blocks)
            return
        acc = torch.float64 if u.dtype == torch.float64 else torch.float32
        max_rows = max(1, ROW_CHUNK_ELEMENTS // self.m)  # read at call time
        b = reference.conv_sensitivity_blocks(u.to(acc), q.to(acc), ks, bias=self.bias, max_rows=max_rows)
        self.blocks = b if self.blocks is None else self.blocks.add_(b)

    def summary(self) -> List[float]:
        """For a process group: as the base class, but always "streaming dense blocks"."""
        out = list(super().summary())  # type: ignore[misc]
        out[1] = 1.0
        return out

    def plan(self, S: int, k: int, need: str = "all") -> EigenPlan:
        """Kept images: a ``"conv"`` plan, solved by :func:`topoderiv.ops.conv_sensitivity_topk` on all
        of them (by :meth:`eigenpairs`, or with other points in one multi-point call by
        :func:`topoderiv.method.statistic.solve_points`): the route by
        :func:`topoderiv.ops.choose_conv_route`, matrix-free solves warm-started by
        :func:`conv_subspace_start`, blocks it did not converge on redone by ``eigh`` within the
        base class's budget (:meth:`finish`). Dense blocks: the base class."""
        if self.blocks is not None or not self.us:
            return super().plan(S, k, need)
        u = self.us[0] if len(self.us) == 1 else torch.cat(self.us, dim=0)
        q = self.qs[0] if len(self.qs) == 1 else torch.cat(self.qs, dim=0)
        self.us, self.qs = [], []
        ks, fp64 = self.kernel_size, u.dtype == torch.float64
        route = self.route
        if route == "auto":
            N, C, H, W = u.shape
            route = ops.choose_conv_route(N, C, H, W, self.n, ks, bias=self.bias, k=k, itemsize=8 if fp64 else 4)

        # q carries B_b, not B_b / S: the values are divided by S afterwards (a solve is scale-invariant)
        def blocks_of(idx: Tensor) -> Tensor:
            return ops.conv_sensitivity_blocks(u, q[:, idx], ks, bias=self.bias) / S

        v0 = None
        if route == "matfree" and k == 1 and self.m >= WARM_MIN_M:
            v0 = conv_subspace_start(u, q, ks, self.bias)
        tol = self.tol
        if tol is None:  # the defaults of topoderiv.score (EigenStatistic)
            tol = 1e-10 if fp64 else (1e-3 if v0 is not None else 1e-4)
        return EigenPlan("conv", S, route, tol, blocks_of, u=u, q=q, v0=v0, kernel=ks)


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
        return site_curvature(self, act, fn)

    def check_state(self, x: Tensor, fn: str) -> None:
        channels, _ = self._options()
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{fn}: a {self.kind} site ({self.name!r}) of {type(self.model).__name__} needs a stream "
                             f"[B, C, H, W] with C = {channels} channels, got shape {list(x.shape)}")

    def statistic(self, block: nn.Module, curvature: float, *, backend: str, route: str, k: int,
                  tol: Optional[float]) -> ConvStatistic:
        """A :class:`ConvStatistic` with ``n = C``, ``d = C k k``.

        Its ``rows(x, p)`` yields ``(feature(x), p)`` as images, the feature map applied to chunks
        of at most :data:`ROW_CHUNK_ELEMENTS` elements of the stream (whole for the identity).
        """
        conv, _, feature = conv_parts(block, "score")
        n, ks = conv.out_channels, conv.kernel_size[0]
        name, kind = self.name, self.kind
        identity = isinstance(feature, nn.Identity)

        def rows(x: Tensor, p: Tensor) -> Iterable[Tuple[Tensor, Tensor]]:
            if identity:
                yield x.detach(), p.detach()
                return
            B = x.shape[0]
            per = max(1, ROW_CHUNK_ELEMENTS // max(1, x[:1].numel()))
            for s0 in range(0, B, per):
                with torch.no_grad():
                    u = feature(x[s0 : s0 + per])
                if u.shape != x[s0 : s0 + per].shape:
                    raise ValueError(f"score: the feature map of the new block at {kind} site {name!r} must keep the "
                                     f"stream's shape [B, C, H, W] = {list(x[s0 : s0 + per].shape)}, got "
                                     f"{list(u.shape)}")
                yield u.detach(), p[s0 : s0 + per].detach()

        return ConvStatistic(rows, n, conv.in_channels, ks, conv.bias is not None, curvature, backend=backend,
                             route=route, k=k, tol=tol)

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
