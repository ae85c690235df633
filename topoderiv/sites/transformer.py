"""Standard transformer sub-blocks as site kinds (METHOD.md section 7), with timm's names.

Blocks (timm's conventions and parameter names, so that a grown ViT's state dict loads into
timm's ``VisionTransformer``): :class:`Attention` (``qkv``: rows ``[0:D]`` = Q, ``[D:2D]`` = K,
``[2D:3D]`` = V, heads contiguous inside each; ``proj``), :class:`Mlp` (``fc1``, ``act``,
``fc2``), :class:`Block` (pre-norm ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, with
parameter-free ``ls1/ls2/drop_path1/drop_path2`` as ``nn.Identity``), and the sub-blocks alone,
:class:`MlpBlock` (``x + mlp(norm(x))``) and :class:`AttentionBlock` (``x + attn(norm(x))``).
LayerNorms use ``eps = 1e-6`` (timm's ViT).

Site kinds, on token streams ``[B, T, D]`` (rows = samples x tokens):

- ``"mlp_block"``: :class:`MlpBlock`. Eps-scaled parameters ``theta_e = (fc1.weight, fc1.bias,
  fc2.weight)``; ``fc2.bias = 0``. With ``ut = [LN(x); 1]`` and ``c = act'(0)`` (GELU: 1/2),
  ``g = eps^2 c W2 [W1 | b1] ut + O(eps^3)``, so with ``M = sum_rows p ut^T`` (``D x (D + 1)``)
  ``phi^T Q phi = 2 c sum_k w2_k^T M w1t_k``: ``Q`` is block diagonal over the hidden units,
  each block ``c [[0, M^T], [M, 0]]``, and ``mu = |c| s_max(M)``. One group of ``hidden`` units.
- ``"attention_block"``: :class:`AttentionBlock`. ``theta_e`` = the V rows of ``qkv.weight`` /
  ``qkv.bias`` and ``proj.weight``; ``proj.bias = 0``; ``W_Q, W_K`` are KEPT at fixed random
  values (``U(-1/sqrt(D), 1/sqrt(D))`` drawn from a generator seeded with the ``seed`` option, so
  :meth:`Site.new_block` is deterministic and scoring and insertion use the same ones; zero Q and
  K would be a saddle of ``q^T k`` that never trains). The attention weights ``a^h`` of the new
  block do not depend on ``theta_e``, so ``g_t = eps^2 sum_h W_O^h [W_V^h | b_V^h] z^h_t``
  EXACTLY, ``z^h_t = sum_t' a^h_{tt'} ut_{t'}``; per head ``M_h = sum_rows p z^h^T`` and
  ``mu = max_h s_max(M_h)``. One group per head, ``head_dim`` units each (rows of W_V^h, columns
  of W_O^h). ``M_h`` is computed as ``sum_rows (a^h^T p) ut^T``: the costates pulled back
  through the attention weights, one GEMM for all heads.
- ``"transformer_block"``: :class:`Block` (timm's), both of the above. At second order the
  sub-blocks decouple (the stream entering ``norm2`` moves by ``O(eps^2)``, and the MLP sees
  ``LN2(x)`` with the same costate), so ``Q`` is block diagonal over them: the groups are the
  heads (``0 .. H-1``) and then the MLP (group ``H``); ``mu`` = the larger of the two.

Every new block is exactly the identity at ``eps = 0`` (its output projections are zero).
``phi`` is a dict of parameter DIRECTIONS (unit total Frobenius norm for scored ones):
``{"mlp.fc1.weight": [h, D], "mlp.fc1.bias": [h], "mlp.fc2.weight": [D, h]}`` and/or
``{"attn.v.weight": [D, D], "attn.v.bias": [D] (with qkv_bias), "attn.proj.weight": [D, D]}``;
:meth:`TransformerSite.block_params` maps it into the block's full parameter tensors (the V rows
written into a copy of ``qkv.weight``).

Rules (:func:`topoderiv.method.rules.singular_rule`; loss-unit values ``lambda = |c| s``):

- ``"top"``: one unit on the top singular pair, ``(v, sign(c) u) / sqrt(2)``: one hidden unit of
  the MLP (unit 0), or unit 0 of the winning head; for a whole block, in the winning sub-block.
- ``"all"``: in every group its top singular pairs, pair ``i`` in unit ``i`` (up to the group's
  capacity: ``hidden`` units for the MLP, ``head_dim`` per head), weights ``sqrt(lambda_i)``
  normalised: ``phi^T Q phi = sum lambda_i^2 / sum lambda_i``. For a whole block both
  sub-blocks start non-zero.
- ``"reference"`` / ``"multi"``: the distinct singular pairs of all groups (each once) from the
  top while ``>= 50%`` of the largest, the first below included, summed with equal weights
  (``phi^T Q phi`` = their mean); the score is their sum (``"reference"``) or ``mu``
  (``"multi"``).

``block`` of a score is the group of the top value (the head for attention, 0 for an MLP block,
``H`` when the MLP of a whole block wins); ``block_mu`` holds each group's top value.

Options (:class:`topoderiv.sites.SiteSpec`): ``dim`` (stream width D), ``num_heads`` (attention
kinds), ``mlp_ratio`` (default 4.0; ``hidden = int(dim * mlp_ratio)``), ``qkv_bias`` (default
True), ``act`` (hidden activation, default ``"gelu"``; needs ``act(0) = 0``, ``act'(0) != 0``),
``seed`` (default 0), ``norm_eps`` (default 1e-6).

timm's own blocks (``transformer_block`` with the option ``impl = "timm"``, what
:func:`topoderiv.models.from_timm` declares on a timm ``VisionTransformer``): the new block is
``timm.models.vision_transformer.Block`` built from the options ``dim``, ``num_heads``,
``mlp_ratio``, ``qkv_bias``, ``qk_norm`` (default False), ``proj_bias`` (default True),
``init_values`` (LayerScale, default None), ``act`` (``"gelu"`` = ``nn.GELU``, timm's ViT default,
``"gelu_tanh"``, or ``"timm:<name>"`` = timm's ``get_act_layer(name)``) and ``norm_eps`` (timm's
``LayerNorm``). The statistic is the one above with the attention weights
taken after ``q_norm``/``k_norm``, and with a LayerScale ``ls = diag(gamma)`` after a sub-block
its output is ``gamma * g``, so its costate is read as ``gamma * p`` (``phi^T Q phi`` is linear in
``p``). The block's output biases (``proj_bias``) are kept at zero.
"""
from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..method.activations import activation_spec, derivatives_at_zero, get_activation
from ..method.statistic import SINGULAR_CHUNK_ELEMS, SingularPart, SingularStatistic
from ..registry import register
from .base import Site, register_kind

__all__ = ["Attention", "Mlp", "Block", "MlpBlock", "AttentionBlock", "TransformerSite", "MlpBlockSite",
           "AttentionBlockSite", "TransformerBlockSite", "build_activation", "attention_weights", "timm_block_class",
           "IMPLS"]

#: implementations of the transformer_block kind's new block: ours (:class:`Block`) or timm's
IMPLS = ("topoderiv", "timm")

#: activation names of timm blocks (impl "timm") that are torch modules, as timm's ViT builds them
#: (its default is ``nn.GELU``); ``"timm:<name>"`` is timm's ``get_act_layer(name)``
TORCH_ACTS: Dict[str, Any] = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh")}

ActSpec = Union[str, nn.Module, Type[nn.Module], None]

# |act(0)| above this is "not zero"; |act'(0)| at or below it is "zero"
ZERO_TOL = 1e-10


def build_activation(spec: ActSpec) -> nn.Module:
    """An activation module from a spec: a registered name (default ``"gelu"``), a module, a class."""
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return spec()
    return get_activation(spec, default="gelu")


def check_int(fn: str, name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {value!r}")
    return int(value)


def check_heads(fn: str, dim: int, num_heads: object) -> int:
    heads = check_int(fn, "num_heads", num_heads, 1)
    if dim % heads:
        raise ValueError(f"{fn}: num_heads must divide dim = {dim}, got num_heads = {heads}")
    return heads


def hidden_size(fn: str, dim: int, mlp_ratio: object) -> int:
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or not math.isfinite(float(mlp_ratio)) \
            or int(dim * float(mlp_ratio)) < 1:
        raise ValueError(f"{fn}: mlp_ratio must be a finite number with int(dim * mlp_ratio) >= 1 (dim = {dim}), got "
                         f"{mlp_ratio!r}")
    return int(dim * float(mlp_ratio))


def attention_weights(attn: nn.Module, x: Tensor) -> Tensor:
    """``softmax(q k^T * scale)`` of an attention module with timm's layout (our
    :class:`Attention` or timm's): ``x [B, T, D] -> [B, H, T, T]`` (rows: queries)."""
    B, T, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    A = H * hd
    w, b = attn.qkv.weight[: 2 * A], None if attn.qkv.bias is None else attn.qkv.bias[: 2 * A]
    qk = F.linear(x, w, b).reshape(B, T, 2, H, hd).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qk[0]), attn.k_norm(qk[1])
    return torch.softmax((q * attn.scale) @ k.transpose(-1, -2), dim=-1)


def timm_block_class() -> Type[nn.Module]:
    """``timm.models.vision_transformer.Block`` (ImportError naming the extra when timm is missing)."""
    try:
        from timm.models.vision_transformer import Block as TimmBlock
    except ImportError as err:
        raise ImportError(f"a transformer_block site with impl 'timm' builds timm's Block and needs timm: "
                          f"pip install 'topoderiv[timm]' ({err})") from err
    return TimmBlock


def _layer_scale(block: nn.Module, name: str) -> Optional[Tensor]:
    """The LayerScale vector ``gamma`` of ``block.<name>`` (timm's ``ls1``/``ls2``), or None."""
    gamma = getattr(getattr(block, name, None), "gamma", None)
    return gamma.detach() if isinstance(gamma, Tensor) else None


@register
class Attention(nn.Module):
    """timm's multi-head self-attention: ``proj(softmax(q k^T / sqrt(head_dim)) v)``.

    Args:
        dim: token width D. num_heads: H (divides D; ``head_dim = D / H``).
        qkv_bias: whether ``qkv`` has a bias.

    Shapes: ``x [B, T, D] -> [B, T, D]``. ``qkv.weight [3D, D]``: rows ``[0:D]`` = Q,
    ``[D:2D]`` = K, ``[2D:3D]`` = V, head ``h`` at rows ``h*head_dim : (h+1)*head_dim`` of each.
    ``proj.weight [D, D]``: head ``h`` reads columns ``h*head_dim : (h+1)*head_dim``.

    Attributes:
        fused_attn: ``True`` (default, as timm): :func:`torch.nn.functional.scaled_dot_product_attention`;
            ``False``: the explicit softmax, which (unlike the fused CPU kernels) supports
            higher-order autograd (Hessians, double backward).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        fn = "Attention"
        dim = check_int(fn, "dim", dim, 1)
        self.num_heads = check_heads(fn, dim, num_heads)
        self.dim = dim
        self.head_dim = dim // self.num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=bool(qkv_bias))
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Identity()
        self.fused_attn = True

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, T, hd] each
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.softmax((q * self.scale) @ k.transpose(-1, -2), dim=-1) @ v
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))

    def attention_weights(self, x: Tensor) -> Tensor:
        """``softmax(q k^T * scale)``: ``x [B, T, D] -> [B, H, T, T]`` (rows: queries; they sum to 1)."""
        return attention_weights(self, x)

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments."""
        return {"dim": self.dim, "num_heads": self.num_heads, "qkv_bias": self.qkv.bias is not None}


@register
class Mlp(nn.Module):
    """timm's MLP: ``fc2(act(fc1(x)))``, ``[..., in_features] -> [..., out_features]``.

    Args:
        in_features: input width. hidden_features: hidden width (default ``in_features``).
        out_features: output width (default ``in_features``).
        act_layer: activation: a registered name (default ``"gelu"``), a module or a module class.
        bias: whether ``fc1`` / ``fc2`` have biases.
    """

    def __init__(self, in_features: int, hidden_features: Optional[int] = None, out_features: Optional[int] = None,
                 act_layer: ActSpec = "gelu", bias: bool = True) -> None:
        super().__init__()
        fn = "Mlp"
        in_features = check_int(fn, "in_features", in_features, 1)
        hidden = check_int(fn, "hidden_features", in_features if hidden_features is None else hidden_features, 1)
        out = check_int(fn, "out_features", in_features if out_features is None else out_features, 1)
        self.fc1 = nn.Linear(in_features, hidden, bias=bool(bias))
        self.act = build_activation(act_layer)
        self.drop1 = nn.Identity()
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden, out, bias=bool(bias))
        self.drop2 = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments."""
        return {"in_features": self.fc1.in_features, "hidden_features": self.fc1.out_features,
                "out_features": self.fc2.out_features, "act_layer": activation_spec(self.act),
                "bias": self.fc1.bias is not None}


@register
class Block(nn.Module):
    """timm's pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: token width D. num_heads: attention heads. mlp_ratio: ``hidden = int(D * mlp_ratio)``.
        qkv_bias: bias of ``attn.qkv``. act_layer: the MLP's activation (default GELU).
        norm_eps: LayerNorm eps (timm's ViT: 1e-6).

    Shapes: ``[B, T, D] -> [B, T, D]``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 act_layer: ActSpec = "gelu", norm_eps: float = 1e-6) -> None:
        super().__init__()
        fn = "Block"
        dim = check_int(fn, "dim", dim, 1)
        self.mlp_ratio = float(mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = nn.Identity()
        self.drop_path1 = nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_size(fn, dim, mlp_ratio), act_layer=act_layer)
        self.ls2 = nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments."""
        return {"dim": self.attn.dim, "num_heads": self.attn.num_heads, "mlp_ratio": self.mlp_ratio,
                "qkv_bias": self.attn.qkv.bias is not None, "act_layer": activation_spec(self.mlp.act),
                "norm_eps": self.norm1.eps}


@register
class MlpBlock(nn.Module):
    """The MLP sub-block alone: ``x + mlp(norm(x))`` on ``[B, T, D]`` (``[..., D]`` works too).

    Args:
        dim: D. mlp_ratio: ``hidden = int(D * mlp_ratio)``. act_layer: activation (default GELU).
        norm_eps: LayerNorm eps.
    """

    def __init__(self, dim: int, mlp_ratio: float = 4.0, act_layer: ActSpec = "gelu", norm_eps: float = 1e-6) -> None:
        super().__init__()
        fn = "MlpBlock"
        dim = check_int(fn, "dim", dim, 1)
        self.mlp_ratio = float(mlp_ratio)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, hidden_size(fn, dim, mlp_ratio), act_layer=act_layer)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments."""
        return {"dim": self.norm.normalized_shape[0], "mlp_ratio": self.mlp_ratio,
                "act_layer": activation_spec(self.mlp.act), "norm_eps": self.norm.eps}


@register
class AttentionBlock(nn.Module):
    """The attention sub-block alone: ``x + attn(norm(x))`` on ``[B, T, D]``.

    Args:
        dim: D. num_heads: heads. qkv_bias: bias of ``attn.qkv``. norm_eps: LayerNorm eps.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, norm_eps: float = 1e-6) -> None:
        super().__init__()
        dim = check_int("AttentionBlock", "dim", dim, 1)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.norm(x))

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments."""
        return {"dim": self.attn.dim, "num_heads": self.attn.num_heads, "qkv_bias": self.attn.qkv.bias is not None,
                "norm_eps": self.norm.eps}


# ------------------------------------------------------------------------------------------------
# site kinds

# phi keys of the two sub-blocks
MLP_KEYS = ("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight")
ATTN_KEYS = ("attn.v.weight", "attn.v.bias", "attn.proj.weight")


class TransformerSite(Site):
    """Shared code of the three transformer kinds (see the module docstring)."""

    block_cls: Type[nn.Module] = nn.Module
    has_attn = False
    has_mlp = False

    # -- options and blocks ---------------------------------------------------------------------

    def opts(self) -> Dict[str, Any]:
        """The validated options: dim, num_heads, mlp_ratio, qkv_bias, act, seed, norm_eps."""
        fn = f"{self.kind} site {self.name!r}"
        o = self.options
        dim = check_int(f"{fn}: option", "dim", o.get("dim"), 1)
        out: Dict[str, Any] = {"dim": dim}
        if self.has_attn:
            out["num_heads"] = check_heads(f"{fn}: option", dim, o.get("num_heads"))
            qkv_bias = o.get("qkv_bias", True)
            if not isinstance(qkv_bias, bool):
                raise ValueError(f"{fn}: option qkv_bias must be a bool, got {qkv_bias!r}")
            out["qkv_bias"] = qkv_bias
        if self.has_mlp:
            ratio = o.get("mlp_ratio", 4.0)
            hidden_size(f"{fn}: option", dim, ratio)
            out["mlp_ratio"] = float(ratio)
            out["act"] = o.get("act", "gelu")
        out["seed"] = check_int(f"{fn}: option", "seed", o.get("seed", 0), 0)
        eps = o.get("norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not float(eps) > 0:
            raise ValueError(f"{fn}: option norm_eps must be a number > 0, got {eps!r}")
        out["norm_eps"] = float(eps)
        impl = o.get("impl", "topoderiv")
        if impl not in IMPLS or (impl == "timm" and self.block_cls is not Block):
            raise ValueError(f"{fn}: option impl must be one of {IMPLS} ('timm' only for transformer_block), got "
                             f"{impl!r}")
        out["impl"] = impl
        if impl == "timm":
            for key in ("qk_norm", "proj_bias"):
                val = o.get(key, key == "proj_bias")
                if not isinstance(val, bool):
                    raise ValueError(f"{fn}: option {key} must be a bool, got {val!r}")
                out[key] = val
            init = o.get("init_values")
            if init is not None and (isinstance(init, bool) or not isinstance(init, numbers.Real)
                                     or not math.isfinite(float(init)) or not float(init) > 0):
                raise ValueError(f"{fn}: option init_values (LayerScale) must be None or a finite number > 0, got "
                                 f"{init!r}")
            out["init_values"] = None if init is None else float(init)
            if not isinstance(out["act"], str):
                raise ValueError(f"{fn}: option act must be a timm activation name (str) with impl 'timm', got "
                                 f"{out['act']!r}")
        return out

    def block_type(self) -> Type[nn.Module]:
        """The class of this site's new block (timm's Block with the option ``impl = "timm"``)."""
        return timm_block_class() if self.options.get("impl") == "timm" else self.block_cls

    def construct(self, o: Dict[str, Any]) -> nn.Module:
        """A block of this kind with PyTorch's default initialisation (global RNG left untouched)."""
        with torch.random.fork_rng(devices=[]):
            if o["impl"] == "timm":
                return self.construct_timm(o)
            if self.block_cls is Block:
                return Block(o["dim"], o["num_heads"], o["mlp_ratio"], o["qkv_bias"], o["act"], o["norm_eps"])
            if self.block_cls is MlpBlock:
                return MlpBlock(o["dim"], o["mlp_ratio"], o["act"], o["norm_eps"])
            return AttentionBlock(o["dim"], o["num_heads"], o["qkv_bias"], o["norm_eps"])

    def construct_timm(self, o: Dict[str, Any]) -> nn.Module:
        """timm's Block from the options (timm's LayerNorm with ``norm_eps``, timm's activation ``act``)."""
        TimmBlock = timm_block_class()
        from timm.layers import LayerNorm as TimmLayerNorm, get_act_layer
        name = o["act"]
        act: Any = TORCH_ACTS.get(name)
        if act is None and name.startswith("timm:"):
            try:
                act = get_act_layer(name[len("timm:"):])
            except Exception:
                act = None
        if act is None:
            raise ValueError(f"{self.kind} site {self.name!r}: option act must be one of {sorted(TORCH_ACTS)} or "
                             f"'timm:<timm activation name>' with impl 'timm', got {name!r}")
        return TimmBlock(dim=o["dim"], num_heads=o["num_heads"], mlp_ratio=o["mlp_ratio"], qkv_bias=o["qkv_bias"],
                         qk_norm=o["qk_norm"], proj_bias=o["proj_bias"], init_values=o["init_values"],
                         act_layer=act, norm_layer=partial(TimmLayerNorm, eps=o["norm_eps"]))

    def build_block(self) -> nn.Module:
        """The new block: zero at ``eps = 0``; W_Q, W_K fixed random from the ``seed`` option."""
        o = self.opts()
        block = self.construct(o)
        with torch.no_grad():
            for mod in block.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.zero_()
                    if mod.bias is not None:
                        mod.bias.zero_()
                elif isinstance(mod, nn.LayerNorm):
                    mod.reset_parameters()
            if self.has_attn:
                D = o["dim"]
                g = torch.Generator().manual_seed(o["seed"])
                wqk = (torch.rand(2 * D, D, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(D)
                block.attn.qkv.weight[: 2 * D] = wqk.to(block.attn.qkv.weight.dtype)
        return block

    def identity_block(self, generator: torch.Generator) -> nn.Module:
        """A standard block of this kind with random weights (every ``nn.Linear`` drawn
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` from ``generator``, LayerNorms at their default)
        except the output projections ``attn.proj`` / ``mlp.fc2`` zero: the identity on the stream
        and trainable at first order (the gradient of ``proj`` / ``fc2`` is ``-sum p h^T != 0``)."""
        block = self.construct(self.opts())
        with torch.no_grad():
            for mod in block.modules():
                if isinstance(mod, nn.Linear):
                    bound = 1.0 / math.sqrt(mod.in_features)
                    mod.weight.copy_((torch.rand(mod.weight.shape, generator=generator) * 2 - 1) * bound)
                    if mod.bias is not None:
                        mod.bias.copy_((torch.rand(mod.bias.shape, generator=generator) * 2 - 1) * bound)
                elif isinstance(mod, nn.LayerNorm):
                    mod.reset_parameters()
            for out in self.output_layers(block):
                out.weight.zero_()
                if out.bias is not None:
                    out.bias.zero_()
        return block

    def output_layers(self, block: nn.Module) -> List[nn.Linear]:
        layers = []
        if self.has_attn:
            layers.append(block.attn.proj)
        if self.has_mlp:
            layers.append(block.mlp.fc2)
        return layers

    # -- checks ---------------------------------------------------------------------------------

    def check_type(self, block: nn.Module, fn: str) -> None:
        cls = self.block_type()
        if not isinstance(block, cls):
            raise TypeError(f"{fn}: the new block of a {self.kind} site ({self.name!r}) must be a "
                            f"{cls.__module__}.{cls.__name__}, got {type(block).__name__}")
        attn = getattr(block, "attn", None) if self.has_attn else None
        if attn is not None and (not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
                                 or getattr(attn, "gate", None) is not None
                                 or attn.num_heads * attn.head_dim != attn.qkv.in_features):
            raise TypeError(f"{fn}: the attention of the new block of a {self.kind} site ({self.name!r}) must be "
                            f"plain multi-head attention (no scale_norm, no gate, head_dim * num_heads = dim)")
        if self.has_mlp and not isinstance(getattr(block.mlp, "norm", nn.Identity()), nn.Identity):
            raise TypeError(f"{fn}: the MLP of the new block of a {self.kind} site ({self.name!r}) must not have a "
                            f"hidden norm (scale_mlp_norm)")

    def check_block(self, block: nn.Module, fn: str) -> float:
        """Function preservation and a second-order first effect; returns ``act'(0)`` (MLP kinds)
        or 1.0 (attention).

        Raises:
            TypeError: a block of the wrong class.
            ValueError: a hidden activation with ``act(0) != 0`` (not the identity at eps = 0) or
                ``act'(0) = 0`` (no second-order effect), or non-zero output biases.
        """
        self.check_type(block, fn)
        where = f"{fn}: the block a {self.kind} site ({self.name!r}) of {type(self.model).__name__} would insert"
        for out in self.output_layers(block):
            if out.bias is not None and bool((out.bias != 0).any()):
                raise ValueError(f"{where} is not function preserving: its output bias must be zero")
        if not self.has_mlp:
            return 1.0
        act = block.mlp.act
        s0, s1, _ = derivatives_at_zero(act)
        name = type(act).__name__
        if not math.isfinite(s0) or abs(s0) > ZERO_TOL:
            raise ValueError(f"{where} is not function preserving: its hidden activation must have act(0) = 0 (e.g. "
                             f"GELU), got {name} with act(0) = {s0:.6g}")
        if not math.isfinite(s1) or abs(s1) <= ZERO_TOL:
            raise ValueError(f"{where} has no second-order effect: its hidden activation must have act'(0) != 0 (GELU: "
                             f"1/2), got {name} with act'(0) = {s1:.6g}")
        return s1

    def check_state(self, x: Tensor, fn: str) -> None:
        dim = self.opts()["dim"]
        if x.dim() != 3 or x.shape[-1] != dim:
            raise ValueError(f"{fn}: a {self.kind} site ({self.name!r}) needs a token stream [B, T, dim] with dim = "
                             f"{dim}, got shape {list(x.shape)}")

    # -- phi ------------------------------------------------------------------------------------

    def phi_layout(self, block: nn.Module) -> List[Tuple[str, Tuple[int, ...], int]]:
        """``(key, shape, fan_in)`` of every phi entry of ``block``."""
        out: List[Tuple[str, Tuple[int, ...], int]] = []
        if self.has_attn:
            attn = block.attn
            D = attn.qkv.in_features
            out.append(("attn.v.weight", (D, D), D))
            if attn.qkv.bias is not None:
                out.append(("attn.v.bias", (D,), D))
            out.append(("attn.proj.weight", (D, D), D))
        if self.has_mlp:
            fc1 = block.mlp.fc1
            h, D = fc1.out_features, fc1.in_features
            out.append(("mlp.fc1.weight", (h, D), D))
            if fc1.bias is not None:
                out.append(("mlp.fc1.bias", (h,), D))
            out.append(("mlp.fc2.weight", (block.mlp.fc2.out_features, h), h))
        return out

    def check_phi(self, block: nn.Module, phi: Any, fn: str) -> Dict[str, Tensor]:
        """Validates ``phi``: a dict with exactly the keys of :meth:`phi_layout`, finite floating
        tensors of those shapes; returns it detached."""
        self.check_type(block, fn)
        layout = self.phi_layout(block)
        keys = [k for k, _, _ in layout]
        if not isinstance(phi, dict):
            raise TypeError(f"{fn}: phi for a {self.kind} site must be a dict {{name: tensor}} with keys {keys} (or a "
                            f"PointScore), got {type(phi).__name__}")
        missing = [k for k in keys if k not in phi]
        extra = [k for k in phi if k not in keys]
        if missing or extra:
            raise ValueError(f"{fn}: phi for a {self.kind} site must have exactly the keys {keys}, got "
                             f"missing {missing} and unexpected {extra}")
        out: Dict[str, Tensor] = {}
        for key, shape, _ in layout:
            t = phi[key]
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"{fn}: phi[{key!r}] must be a floating-point torch.Tensor, got "
                                f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
            if tuple(t.shape) != shape:
                raise ValueError(f"{fn}: phi[{key!r}] must have shape {list(shape)}, got {list(t.shape)}")
            if t.numel() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{fn}: phi[{key!r}] must contain only finite values, got NaN or Inf")
            out[key] = t.detach()
        return out

    def random_phi(self, block: nn.Module, generator: torch.Generator, scale: float) -> Dict[str, Tensor]:
        """Every eps-scaled parameter drawn ``N(0, (scale / sqrt(fan_in))^2)`` (CPU, float32)."""
        return {key: torch.randn(shape, generator=generator) * (scale / math.sqrt(fan_in))
                for key, shape, fan_in in self.phi_layout(block)}

    def block_params(self, block: nn.Module, phi: Any, eps: float) -> Dict[str, Tensor]:
        """Full parameter tensors of ``block`` with ``theta_e = eps * phi``: ``attn.qkv.weight``
        (and ``.bias``) with the V rows ``[2D:3D]`` replaced, ``attn.proj.weight``,
        ``mlp.fc1.weight``, ``mlp.fc1.bias``, ``mlp.fc2.weight``."""
        out: Dict[str, Tensor] = {}
        if self.has_attn:
            qkv = block.attn.qkv
            D = qkv.in_features
            w = qkv.weight
            out["attn.qkv.weight"] = torch.cat([w[: 2 * D].detach(), phi["attn.v.weight"].to(w) * eps], dim=0)
            if qkv.bias is not None:
                out["attn.qkv.bias"] = torch.cat([qkv.bias[: 2 * D].detach(), phi["attn.v.bias"].to(w) * eps])
            out["attn.proj.weight"] = phi["attn.proj.weight"].to(w) * eps
        if self.has_mlp:
            w = block.mlp.fc1.weight
            out["mlp.fc1.weight"] = phi["mlp.fc1.weight"].to(w) * eps
            if block.mlp.fc1.bias is not None:
                out["mlp.fc1.bias"] = phi["mlp.fc1.bias"].to(w) * eps
            out["mlp.fc2.weight"] = phi["mlp.fc2.weight"].to(w) * eps
        return out

    # -- the statistic --------------------------------------------------------------------------

    def norms(self, block: nn.Module) -> Tuple[Optional[nn.Module], Optional[nn.Module]]:
        """The LayerNorms in front of the attention and of the MLP."""
        if hasattr(block, "norm1"):  # our Block or timm's
            return block.norm1, block.norm2
        return (block.norm, None) if self.has_attn else (None, block.norm)

    def statistic(self, block: nn.Module, curvature: float, *, backend: str, route: str, k: int,
                  tol: Optional[float]) -> SingularStatistic:
        """The :class:`~topoderiv.method.statistic.SingularStatistic` of this site: attention part
        (groups = heads) first, then the MLP part (one group)."""
        self.check_type(block, "score")
        parts: List[SingularPart] = []
        norm_a, norm_m = self.norms(block)
        attn = block.attn if self.has_attn else None
        gamma_a, gamma_m = _layer_scale(block, "ls1"), _layer_scale(block, "ls2")
        if attn is not None:
            D, H, hd = attn.qkv.in_features, attn.num_heads, attn.head_dim
            bias = attn.qkv.bias is not None
            parts.append(SingularPart("attn", H, hd, D, D, bias, 1.0, "attn.v.weight", "attn.v.bias" if bias else None,
                                      "attn.proj.weight"))
        if self.has_mlp:
            fc1 = block.mlp.fc1
            parts.append(SingularPart("mlp", 1, fc1.out_features, block.mlp.fc2.out_features, fc1.in_features,
                                      fc1.bias is not None, float(curvature), "mlp.fc1.weight",
                                      "mlp.fc1.bias" if fc1.bias is not None else None, "mlp.fc2.weight"))
        i_mlp = len(parts) - 1

        def features(x: Tensor, p: Tensor) -> Iterable[Tuple[int, Tensor, Tensor]]:
            B, T, D = x.shape
            per_sample = T * D * 3 + (attn.num_heads * T * (T + D) if attn is not None else 0)
            chunk = max(1, SINGULAR_CHUNK_ELEMS // per_sample)
            with torch.no_grad():
                for c0 in range(0, B, chunk):
                    xc, pc = x[c0 : c0 + chunk], p[c0 : c0 + chunk]
                    if attn is not None:
                        u = norm_a(xc)
                        a = attention_weights(attn, u)  # [b, H, T(query), T(key)]
                        pa = pc if gamma_a is None else pc * gamma_a.to(pc)  # LayerScale: g -> gamma * g
                        # costates pulled back through the attention weights: r^h_s = sum_t a^h_ts p_t
                        r = a.transpose(-1, -2) @ pa[:, None]  # [b, H, T, D]
                        yield 0, r.permute(0, 2, 1, 3).reshape(-1, attn.num_heads, D), u.reshape(-1, D)
                    if self.has_mlp:
                        u2 = norm_m(xc)
                        pm = pc if gamma_m is None else pc * gamma_m.to(pc)
                        yield i_mlp, pm.reshape(-1, D), u2.reshape(-1, D)

        return SingularStatistic(parts, features, k=k, backend=backend)


@register_kind("mlp_block")
class MlpBlockSite(TransformerSite):
    """Inserts :class:`MlpBlock` ``x + mlp(norm(x))`` (see the module docstring)."""

    block_cls = MlpBlock
    has_mlp = True


@register_kind("attention_block")
class AttentionBlockSite(TransformerSite):
    """Inserts :class:`AttentionBlock` ``x + attn(norm(x))`` (see the module docstring)."""

    block_cls = AttentionBlock
    has_attn = True


@register_kind("transformer_block")
class TransformerBlockSite(TransformerSite):
    """Inserts timm's :class:`Block` (see the module docstring)."""

    block_cls = Block
    has_attn = True
    has_mlp = True
