"""A Vision Transformer with timm's conventions and parameter names, growable in depth.

The state dict has timm's ``VisionTransformer`` keys (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.<i>.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``, ``head``;
``fc_norm`` instead of ``norm`` for average pooling), so a ViT grown with ``"transformer_block"``
insertions (an ordinary ``nn.Sequential`` of :class:`~topoderiv.sites.transformer.Block`) loads
into timm later.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..registry import register
from ..sites import SiteSpec
from ..sites.transformer import Block

__all__ = ["ViT", "PatchEmbed", "INSERT_KINDS", "OUTPUTS"]

#: site kinds a ViT can insert
INSERT_KINDS = ("tokens", "mlp_block", "attention_block", "transformer_block")
POOLS = ("token", "avg")
#: outputs of a ViT: one vector per image, or a field (per-patch linear head, unpatchified)
OUTPUTS = ("pooled", "field")


def _pair(fn: str, name: str, value: object) -> Tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in value)):
        raise ValueError(f"{fn}: {name} must be an int >= 1 or a pair of them, got {value!r}")
    return int(value[0]), int(value[1])


class PatchEmbed(nn.Module):
    """timm's patchifier: ``proj`` = ``Conv2d(in_chans, embed_dim, patch, stride=patch)``.

    Shapes: ``[B, in_chans, H, W] -> [B, (H / p) * (W / p), embed_dim]``.
    """

    def __init__(self, img_size: Tuple[int, int], patch_size: Tuple[int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.proj.in_channels,) + self.img_size:
            raise ValueError(f"ViT.forward: x must have shape [B, {self.proj.in_channels}, {self.img_size[0]}, "
                             f"{self.img_size[1]}], got {list(x.shape)}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


@register
class ViT(nn.Module):
    """Vision Transformer (timm's ``VisionTransformer`` layout), growable at ``blocks``.

    ``x [B, C, H, W] -> patch_embed -> [cls; patches] + pos_embed -> blocks -> norm -> pool ->
    head -> [B, num_classes]``.

    Args:
        img_size: image size (int or (H, W)); patch_size divides it.
        patch_size: patch size (int or pair).
        in_chans: input channels.
        num_classes: output width of ``head`` (timm's name): classes, or ``d_out`` of a regression.
        embed_dim: token width D. depth: number of blocks (0 allowed).
        num_heads: attention heads (divides D). mlp_ratio: MLP hidden width / D.
        insert: the site kind of the insertions: ``"transformer_block"`` (default; timm's Block,
            so the grown model is an ordinary ViT), ``"mlp_block"``, ``"attention_block"`` or
            ``"tokens"`` (the paper's block token-wise, LayerNorm feature, width D).
        global_pool: ``"token"`` (the class token; ``norm`` before pooling) or ``"avg"`` (mean of
            the patch tokens; ``fc_norm`` after pooling, timm's choice).
        qkv_bias: bias of every ``attn.qkv``.
        output: ``"pooled"`` (default: ``[B, num_classes]`` from the pooled token) or ``"field"``
            (dense prediction: ``head = Linear(D, num_classes * p_h * p_w)`` on every patch token
            after ``norm``/``fc_norm``, unpatchified to ``[B, num_classes, H, W]`` and flattened
            channel-major to ``[B, num_classes * H * W]``; the class token is not read).

    Init: PyTorch's default for the layers, ``pos_embed ~ N(0, 0.02^2)`` and
    ``cls_token ~ N(0, 1e-6^2)`` (timm's).
    """

    def __init__(self, img_size: Union[int, Sequence[int]], patch_size: Union[int, Sequence[int]], in_chans: int,
                 num_classes: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, *,
                 insert: str = "transformer_block", global_pool: str = "token", qkv_bias: bool = True,
                 output: str = "pooled") -> None:
        super().__init__()
        fn = "ViT"
        img = _pair(fn, "img_size", img_size)
        patch = _pair(fn, "patch_size", patch_size)
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"{fn}: patch_size must divide img_size, got img_size {img_size!r} and patch_size "
                             f"{patch_size!r}")
        for name, val, lo in (("in_chans", in_chans, 1), ("num_classes", num_classes, 1),
                              ("embed_dim", embed_dim, 1), ("depth", depth, 0), ("num_heads", num_heads, 1)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < lo:
                raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(f"{fn}: num_heads must divide embed_dim = {embed_dim}, got num_heads = {num_heads}")
        if insert not in INSERT_KINDS:
            raise ValueError(f"{fn}: insert must be one of {INSERT_KINDS}, got {insert!r}")
        if global_pool not in POOLS:
            raise ValueError(f"{fn}: global_pool must be one of {POOLS}, got {global_pool!r}")
        if output not in OUTPUTS:
            raise ValueError(f"{fn}: output must be one of {OUTPUTS}, got {output!r}")
        if not isinstance(qkv_bias, bool):
            raise ValueError(f"{fn}: qkv_bias must be a bool, got {qkv_bias!r}")
        self.img_size, self.patch_size = img_size, patch_size
        self.in_chans, self.num_classes = int(in_chans), int(num_classes)
        self.embed_dim, self.num_heads, self.mlp_ratio = int(embed_dim), int(num_heads), float(mlp_ratio)
        self.insert, self.global_pool, self.qkv_bias, self.output = insert, global_pool, qkv_bias, output
        self.num_prefix_tokens = 1
        self.patch_embed = PatchEmbed(img, patch, self.in_chans, self.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, self.embed_dim))
        with torch.no_grad():
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
        self.pos_drop = nn.Identity()
        self.norm_pre = nn.Identity()
        self.blocks = nn.Sequential(*(Block(self.embed_dim, self.num_heads, self.mlp_ratio, qkv_bias=qkv_bias)
                                      for _ in range(int(depth))))
        avg = global_pool == "avg"
        self.norm = nn.Identity() if avg else nn.LayerNorm(self.embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6) if avg else nn.Identity()
        self.head_drop = nn.Identity()
        self.head = nn.Linear(self.embed_dim, self.num_classes * (patch[0] * patch[1] if output == "field" else 1))

    @property
    def num_tokens(self) -> int:
        """Tokens of the stream: patches + the class token."""
        return self.patch_embed.num_patches + self.num_prefix_tokens

    def forward_features(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, T, D]``: patches, class token, position embedding, blocks, norm."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm_pre(self.pos_drop(x))
        return self.norm(self.blocks(x))

    def forward_head(self, x: Tensor) -> Tensor:
        """``[B, T, D] -> [B, num_classes]``: pool, fc_norm, head (``output="field"``: fc_norm and head
        per patch token, unpatchified to ``[B, num_classes * H * W]``)."""
        if self.output == "field":
            (gh, gw), (ph, pw) = self.patch_embed.grid_size, self.patch_embed.patch_size
            y = self.head(self.head_drop(self.fc_norm(x[:, self.num_prefix_tokens :])))  # [B, gh*gw, C*ph*pw]
            y = y.reshape(x.shape[0], gh, gw, self.num_classes, ph, pw).permute(0, 3, 1, 4, 2, 5)
            return y.reshape(x.shape[0], -1)
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        return self.head(self.head_drop(self.fc_norm(x)))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_from(self, point: int, h: Tensor) -> Tensor:
        """Runs ``blocks[point:]``, ``norm`` and the head on the stream ``h [B, T, D]`` (any B, e.g.
        several batches concatenated along dim 0)."""
        n = len(self.blocks)
        if isinstance(point, bool) or not isinstance(point, numbers.Integral) or not 0 <= point <= n:
            raise ValueError(f"ViT.forward_from: point must be an int in [0, {n}], got {point!r}")
        for blk in self.blocks[int(point):]:
            h = blk(h)
        return self.forward_head(self.norm(h))

    def site_specs(self) -> List[SiteSpec]:
        """One site container, ``blocks``, of kind ``insert``."""
        if self.insert == "tokens":
            return [SiteSpec("blocks", "tokens", {"width": self.embed_dim})]
        opts: Dict[str, Any] = {"dim": self.embed_dim, "seed": 0}
        if self.insert != "mlp_block":
            opts.update(num_heads=self.num_heads, qkv_bias=self.qkv_bias)
        if self.insert != "attention_block":
            opts.update(mlp_ratio=self.mlp_ratio, act="gelu")
        return [SiteSpec("blocks", self.insert, opts)]

    def config(self) -> Dict[str, Any]:
        """JSON-able constructor arguments of the current architecture (current depth)."""
        cfg = {"img_size": self.img_size, "patch_size": self.patch_size, "in_chans": self.in_chans,
               "num_classes": self.num_classes, "embed_dim": self.embed_dim, "depth": len(self.blocks),
               "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio, "insert": self.insert,
               "global_pool": self.global_pool, "qkv_bias": self.qkv_bias}
        if self.output != "pooled":  # only when set: configs of pooled models are unchanged
            cfg["output"] = self.output
        return cfg
