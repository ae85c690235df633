"""Growing timm models: :func:`from_timm` declares the sites of a timm model, :func:`timm_model`
creates one by name (never downloading anything: ``pretrained=False`` always).

Supported (timm is an optional dependency: ``pip install "topoderiv[timm]"``):

- ``timm.models.vision_transformer.VisionTransformer``: one site container, ``blocks`` (a site
  between every two blocks, before the first and after the last).
  ``insert="transformer_block"`` (default): the new blocks are timm's own
  ``timm.models.vision_transformer.Block`` built with the model's configuration (width, heads,
  mlp_ratio, qkv_bias, qk_norm, proj_bias, LayerScale init_values, activation, LayerNorm eps; read
  off the model's blocks and checked against them), so a grown ViT is still an ordinary timm ViT
  that ``timm.create_model(name, depth=<new depth>, ...)`` rebuilds and loads from our weights.
  The statistic is METHOD.md section 7's ``transformer_block`` (with LayerScale, the costate of a
  sub-block is read as ``gamma * p``). ``insert="tokens"``: the paper's block token-wise
  (:class:`~topoderiv.sites.linear.ResidualBlock` with a LayerNorm feature, width ``embed_dim``).
  Blocks must be plain ``Block`` s (no ``scale_attn_norm``/``scale_mlp_norm``, gated attention,
  or other block classes) for ``transformer_block``.
- ``timm.models.resnet.ResNet`` (``insert="conv"``): one site container per stage, ``layer1`` ..
  ``layer4``, with sites only between SAME-SHAPE blocks: a stage whose first block downsamples or
  changes the channels is declared with ``start = 1`` (no site in front of that block). The new
  block is our :class:`~topoderiv.sites.conv.ResidualConvBlock`: ``x + td(conv3x3(x) + b)``
  (``C -> C`` channels, stride 1, same padding, the admissible activation ``td``, no
  normalisation), zero at ``eps = 0``, on the stream between two blocks (after a block's final
  ReLU). It is ours, not a timm ``BasicBlock``: a BasicBlock with its BatchNorms is not the
  identity at zero weights.

Every model from :func:`from_timm` gets (as instance attributes; the model stays an instance of
its timm class): ``topoderiv_sites`` (the declaration), ``forward_from(point, h)`` (the eps search
then re-runs only the suffix), ``config()`` and ``topoderiv_builder = "timm"``, so that
:func:`topoderiv.save` / :func:`topoderiv.load` and the Grower's checkpoints and resume work:
a checkpoint stores ``{"class": "timm", "config": {"name": <timm model name>, "kwargs": {...}}}``
with the current depth (``depth`` of a ViT, ``layers`` of a ResNet) and the inserted blocks'
classes and configs, and loading calls ``timm.create_model(name, pretrained=False, **kwargs)``
after validating the name against ``timm.list_models()`` and every kwarg as a JSON scalar (or a
flat list of them) under a name that is not one of create_model's own loading options
(:data:`DENIED_KWARGS`). Nothing named by a file is imported.

A model passed to :func:`from_timm` without ``name``/``kwargs`` must come from
``timm.create_model`` (its ``pretrained_cfg`` names the architecture); its constructor arguments
are then inferred (size, channels, classes, width, depth, heads, ...) and CHECKED by rebuilding it
on the meta device: if the rebuild differs, growth still works and only saving raises, asking for
``from_timm(model, name=..., kwargs=...)`` (or use :func:`timm_model`, which records them).
"""
from __future__ import annotations

import keyword
import math
import numbers
import types
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..registry import register
from ..sites import SiteSpec, declare, site_at, sites
from ..sites.transformer import TORCH_ACTS

__all__ = ["from_timm", "timm_model", "TimmModel", "INSERTS", "DENIED_KWARGS", "check_timm_name",
           "check_timm_kwargs"]

#: insert kinds per supported timm family
INSERTS: Dict[str, Tuple[str, ...]] = {"vit": ("transformer_block", "tokens"), "resnet": ("conv",)}

#: create_model arguments that load or reshape things and are never taken from a config
DENIED_KWARGS = frozenset({"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                           "features_only", "feature_cls", "feature_cfg", "out_indices", "device", "dtype",
                           "scriptable", "exportable", "no_jit", "model_name", "kwargs"})

#: most items of a list-valued kwarg (e.g. ``layers``, ``img_size``)
MAX_LIST = 64

_STAGES = ("layer1", "layer2", "layer3", "layer4")

#: timm activation names tried (as ``"timm:<name>"``) to rebuild a ViT block's activation
TIMM_ACT_NAMES = ("gelu", "gelu_tanh", "quick_gelu", "silu", "swish", "mish", "tanh", "hard_swish", "elu", "selu",
                  "celu", "relu", "relu6", "leaky_relu", "sigmoid")


def _timm(fn: str) -> Any:
    try:
        import timm
    except ImportError as err:
        raise ImportError(f"{fn}: needs timm, an optional dependency: pip install 'topoderiv[timm]' ({err})") from err
    return timm


def check_timm_name(fn: str, name: object) -> str:
    """``name`` if it is a model name of ``timm.list_models()`` (ValueError otherwise)."""
    timm = _timm(fn)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{fn}: name must be a timm model name (a str of timm.list_models()), got {name!r}")
    if name not in set(timm.list_models()):
        stem = name.split("_")[0]
        close = (timm.list_models(f"*{stem}*")[:5] if stem else []) or ["vit_small_patch16_224", "resnet18"]
        raise ValueError(f"{fn}: name must be a timm model name (one of timm.list_models(), e.g. {close}), got "
                         f"{name!r}")
    return name


def _scalar(v: object) -> bool:
    if v is None or isinstance(v, (bool, str)):
        return True
    if isinstance(v, numbers.Integral):
        return True
    return isinstance(v, numbers.Real) and math.isfinite(float(v))


def check_timm_kwargs(fn: str, kwargs: object) -> Dict[str, Any]:
    """The kwargs as a JSON-able dict: str identifier keys (not in :data:`DENIED_KWARGS`), values JSON
    scalars (None, bool, int, finite float, str) or flat lists of them (tuples become lists)."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"{fn}: kwargs must be a dict of timm model arguments, got {type(kwargs).__name__}")
    out: Dict[str, Any] = {}
    for k, v in kwargs.items():
        if not isinstance(k, str) or not k.isidentifier() or keyword.iskeyword(k):
            raise ValueError(f"{fn}: kwargs keys must be argument names, got {k!r}")
        if k in DENIED_KWARGS:
            raise ValueError(f"{fn}: kwargs[{k!r}] is not allowed: models are built with pretrained=False and "
                             f"nothing is loaded from a file or URL (denied: {sorted(DENIED_KWARGS)})")
        if isinstance(v, (list, tuple)):
            if len(v) > MAX_LIST or not all(_scalar(x) and not isinstance(x, (list, tuple)) for x in v):
                raise ValueError(f"{fn}: kwargs[{k!r}] must be a JSON scalar or a flat list of at most {MAX_LIST} "
                                 f"of them, got {v!r}")
            out[k] = [x if isinstance(x, (bool, str)) or x is None else (int(x) if isinstance(x, numbers.Integral)
                                                                        else float(x)) for x in v]
        elif _scalar(v):
            out[k] = v if isinstance(v, (bool, str)) or v is None else (
                int(v) if isinstance(v, numbers.Integral) else float(v))
        else:
            raise ValueError(f"{fn}: kwargs[{k!r}] must be a JSON scalar (None, bool, int, float, str) or a flat "
                             f"list of them, got {type(v).__name__} {v!r}")
    return out


def _create(fn: str, name: str, kwargs: Dict[str, Any]) -> nn.Module:
    timm = _timm(fn)
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as err:
        raise ValueError(f"{fn}: timm.create_model({name!r}, pretrained=False, **{kwargs}) failed: "
                         f"{type(err).__name__}: {err}") from err


def _family(model: nn.Module) -> Optional[str]:
    try:
        from timm.models.resnet import ResNet
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:
        return None
    if isinstance(model, VisionTransformer):
        return "vit"
    if isinstance(model, ResNet):
        return "resnet"
    return None


# ------------------------------------------------------------------------------------------------
# what a model gets (bound as instance attributes; deepcopy rebinds them to the copy)


def _config(self: nn.Module) -> Dict[str, Any]:
    """``{"name": timm model name, "kwargs": {...}}`` with the current depth (what ``TimmModel`` rebuilds)."""
    spec = self.topoderiv_timm
    if spec.get("error"):
        raise ValueError(f"config: this {type(self).__name__} cannot be described for timm.create_model: "
                         f"{spec['error']}; pass from_timm(model, name=..., kwargs=...) with the arguments it was "
                         f"created with (or create it with topoderiv.models.timm_model)")
    kwargs = dict(spec["kwargs"])
    if spec["family"] == "vit":
        kwargs["depth"] = len(self.blocks)
    else:
        kwargs["layers"] = [len(getattr(self, s)) for s in _STAGES]
    return {"name": spec["name"], "kwargs": kwargs}


def _vit_forward_from(self: nn.Module, point: Any, h: Tensor) -> Tensor:
    """Runs the blocks after site ``point``, the final norm and the head on the stream ``h [B, T, D]``."""
    site = site_at(self, point)
    for blk in site.container[site.index:]:
        h = blk(h)
    return self.forward_head(self.norm(h))


def _resnet_forward_from(self: nn.Module, point: Any, h: Tensor) -> Tensor:
    """Runs the blocks after site ``point``, the later stages and the head on ``h [B, C, H, W]``."""
    site = site_at(self, point)
    stages = [getattr(self, s) for s in _STAGES]
    i = next(j for j, st in enumerate(stages) if st is site.container)
    for blk in site.container[site.index:]:
        h = blk(h)
    for st in stages[i + 1:]:
        h = st(h)
    return self.forward_head(h)


def _attach(model: nn.Module, family: str, name: Optional[str], kwargs: Optional[Dict[str, Any]],
            error: Optional[str]) -> nn.Module:
    model.topoderiv_timm = {"family": family, "name": name, "kwargs": kwargs, "error": error}
    model.topoderiv_builder = "timm"
    model.config = types.MethodType(_config, model)
    model.forward_from = types.MethodType(_vit_forward_from if family == "vit" else _resnet_forward_from, model)
    return model


# ------------------------------------------------------------------------------------------------
# the ViT


def _structure(module: nn.Module, dropout: bool = False) -> List[Tuple[str, str, str]]:
    """(name, class, extra_repr) of every submodule, plus parameter shapes; without ``dropout``,
    dropouts, drop-paths and identities (no parameters, no-ops in eval) are left out."""
    from timm.layers import DropPath
    skip = () if dropout else (nn.Dropout, nn.Identity, DropPath)
    out = [(n, f"{type(m).__module__}.{type(m).__qualname__}", m.extra_repr())
           for n, m in module.named_modules() if not isinstance(m, skip)]
    out += [(n, "param", str(tuple(p.shape))) for n, p in module.named_parameters()]
    return out


def _act_name(act: nn.Module) -> Optional[str]:
    """The site option ``act`` that rebuilds ``act`` exactly (class and repr), or None."""
    from timm.layers import get_act_layer
    candidates: List[Tuple[str, Any]] = list(TORCH_ACTS.items())
    for n in TIMM_ACT_NAMES:
        try:
            candidates.append((f"timm:{n}", get_act_layer(n)))
        except Exception:
            continue
    for n, ctor in candidates:
        try:
            m = ctor()
        except Exception:
            continue
        if type(m) is type(act) and repr(m) == repr(act):
            return n
    return None


def _vit_block_options(fn: str, model: nn.Module, seed: int) -> Dict[str, Any]:
    """The transformer_block (impl timm) options reproducing the model's blocks."""
    from timm.layers import LayerScale, Mlp
    from timm.layers.attention import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock
    blocks = model.blocks
    if len(blocks) == 0:
        raise ValueError(f"{fn}: insert='transformer_block' reads the block configuration off the model's blocks, "
                         f"got a VisionTransformer with depth 0 (use insert='tokens', or a depth >= 1)")
    b = blocks[0]
    where = f"{fn}: insert='transformer_block' needs plain timm Blocks (timm.models.vision_transformer.Block " \
            f"with timm's Attention and Mlp)"
    if type(b) is not TimmBlock or type(b.attn) is not TimmAttention or type(b.mlp) is not Mlp:
        raise TypeError(f"{where}, got blocks.0 = {type(b).__name__} (attn {type(getattr(b, 'attn', None)).__name__}, "
                        f"mlp {type(getattr(b, 'mlp', None)).__name__})")
    attn, mlp = b.attn, b.mlp
    if not isinstance(attn.norm, nn.Identity) or attn.gate is not None or not isinstance(mlp.norm, nn.Identity):
        raise TypeError(f"{where} without scale_attn_norm, scale_mlp_norm or gated attention (their output is not "
                        f"linear in the new block's V/out weights), got blocks.0 = {b}")
    D = attn.qkv.in_features
    if attn.num_heads * attn.head_dim != D or attn.proj.out_features != D or not isinstance(mlp.fc1, nn.Linear):
        raise TypeError(f"{where} with head_dim * num_heads = dim and linear MLP layers, got blocks.0 = {b}")
    hidden = mlp.fc1.out_features
    ratio = hidden / D
    if int(D * ratio) != hidden:
        raise ValueError(f"{fn}: the MLP width {hidden} of blocks.0 is not int(dim * mlp_ratio) for any ratio "
                         f"(dim {D})")
    act = _act_name(mlp.act)
    if act is None:
        raise TypeError(f"{fn}: the MLP activation {mlp.act!r} of the model's blocks has no name a transformer_block "
                        f"site can rebuild (one of {sorted(TORCH_ACTS)} or 'timm:<name>')")
    ls = b.ls1
    init = float(ls.init_values) if isinstance(ls, LayerScale) else None
    return {"impl": "timm", "dim": D, "num_heads": attn.num_heads, "mlp_ratio": ratio,
            "qkv_bias": attn.qkv.bias is not None, "qk_norm": not isinstance(attn.q_norm, nn.Identity),
            "proj_bias": attn.proj.bias is not None, "init_values": init, "act": act,
            "norm_eps": float(b.norm1.eps), "seed": seed}


def _vit_kwargs(model: nn.Module) -> Dict[str, Any]:
    """Constructor arguments of a timm ViT inferred from its modules (checked by :func:`_verify`)."""
    pe = model.patch_embed
    img = [int(v) for v in pe.img_size]
    patch = [int(v) for v in pe.patch_size]
    kw: Dict[str, Any] = {"img_size": img[0] if img[0] == img[1] else img,
                          "patch_size": patch[0] if patch[0] == patch[1] else patch,
                          "in_chans": int(pe.proj.in_channels), "num_classes": int(model.num_classes),
                          "global_pool": model.global_pool, "embed_dim": int(model.embed_dim),
                          "depth": len(model.blocks), "class_token": model.cls_token is not None,
                          "reg_tokens": int(getattr(model, "num_reg_tokens", 0))}
    if len(model.blocks):
        b = model.blocks[0]
        D = int(model.embed_dim)
        kw.update(num_heads=int(b.attn.num_heads), mlp_ratio=b.mlp.fc1.out_features / D,
                  qkv_bias=b.attn.qkv.bias is not None)
        if not isinstance(b.attn.q_norm, nn.Identity):
            kw["qk_norm"] = True
        ls = getattr(b, "ls1", None)
        if hasattr(ls, "init_values"):
            kw["init_values"] = float(ls.init_values)
    return kw


def _resnet_kwargs(model: nn.Module) -> Dict[str, Any]:
    c1 = model.conv1
    first = c1[0] if isinstance(c1, nn.Sequential) else c1
    return {"in_chans": int(first.in_channels), "num_classes": int(model.num_classes),
            "layers": [len(getattr(model, s)) for s in _STAGES]}


def _verify(fn: str, model: nn.Module, name: str, kwargs: Dict[str, Any]) -> Optional[str]:
    """None when ``timm.create_model(name, pretrained=False, **kwargs)`` builds the model's structure
    (built on the meta device: no memory), else why not."""
    try:
        with torch.device("meta"):
            ref = _create(fn, name, kwargs)
    except ValueError as err:
        return str(err)
    a, b = _structure(ref, True), _structure(model, True)
    if a != b:
        diff = next(((x, y) for x, y in zip(a, b) if x != y), (a[len(b):len(b) + 1], b[len(a):len(a) + 1]))
        return (f"timm.create_model({name!r}, pretrained=False, **{kwargs}) builds a different model (first "
                f"difference: {diff[0]} vs the model's {diff[1]})")
    return None


# ------------------------------------------------------------------------------------------------
# public API


def from_timm(model: nn.Module, insert: Optional[str] = None, *, name: Optional[str] = None,
              kwargs: Optional[Dict[str, Any]] = None, seed: int = 0) -> nn.Module:
    """Declares the sites of a timm model (see the module docstring); returns the same model.

    Args:
        model: a timm ``VisionTransformer`` or ``ResNet`` (e.g. from ``timm.create_model(name,
            pretrained=False, ...)``).
        insert: the kind of the new blocks: ``"transformer_block"`` (ViT default) or ``"tokens"``
            for a ViT; ``"conv"`` (default) for a ResNet.
        name, kwargs: the timm model name and the ``create_model`` arguments the model was made
            with (needed only to save it; default: ``model.pretrained_cfg["architecture"]`` and
            arguments inferred from the model, checked by a rebuild on the meta device).
        seed: seed of the fixed W_Q, W_K of new transformer blocks.

    Raises:
        ImportError: timm is not installed. TypeError: not a supported timm model, or blocks a
            kind cannot reproduce. ValueError: an insert kind the family does not support, bad
            name/kwargs.
    """
    fn = "from_timm"
    _timm(fn)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a timm nn.Module, got {type(model).__name__}")
    family = _family(model)
    if family is None:
        raise TypeError(f"{fn}: model must be a timm VisionTransformer or ResNet (timm.models.vision_transformer."
                        f"VisionTransformer, timm.models.resnet.ResNet), got {type(model).__module__}."
                        f"{type(model).__qualname__}")
    kinds = INSERTS[family]
    insert = kinds[0] if insert is None else insert
    if insert not in kinds:
        raise ValueError(f"{fn}: insert for a timm {'ViT' if family == 'vit' else 'ResNet'} must be one of {kinds}, "
                         f"got {insert!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{fn}: seed must be an int >= 0, got {seed!r}")
    specs: List[SiteSpec] = []
    if family == "vit":
        if not isinstance(model.blocks, nn.Sequential):
            raise TypeError(f"{fn}: model.blocks must be an nn.Sequential, got {type(model.blocks).__name__}")
        if insert == "tokens":
            specs.append(SiteSpec("blocks", "tokens", {"width": int(model.embed_dim)}))
        else:
            specs.append(SiteSpec("blocks", "transformer_block", _vit_block_options(fn, model, seed)))
    else:
        for s in _STAGES:
            stage = getattr(model, s)
            if not isinstance(stage, nn.Sequential):
                raise TypeError(f"{fn}: model.{s} must be an nn.Sequential, got {type(stage).__name__}")
            if len(stage) == 0:
                continue
            last = stage[-1]
            out = getattr(last, "conv3", None) or getattr(last, "conv2", None)
            if not isinstance(out, nn.Conv2d):
                raise TypeError(f"{fn}: the blocks of model.{s} must be timm BasicBlock/Bottleneck, got "
                                f"{type(last).__name__}")
            start = 0 if getattr(stage[0], "downsample", None) is None else 1
            specs.append(SiteSpec(s, "conv", {"channels": int(out.out_channels), "kernel_size": 3, "activation": "td",
                                              "bias": True, "feature": "identity", "start": start}))
    # the name and arguments that rebuild the model (for config(): saving)
    error = None
    if name is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        name = cfg.get("architecture") if isinstance(cfg, dict) else None
    if name is None:
        error = "its timm model name is unknown (no pretrained_cfg['architecture'], and no name= was given)"
        kw = None
    else:
        name = check_timm_name(fn, name)
        if kwargs is None:
            kw = _vit_kwargs(model) if family == "vit" else _resnet_kwargs(model)
            error = _verify(fn, model, name, kw)
        else:
            kw = check_timm_kwargs(fn, kwargs)
    old = getattr(model, "topoderiv_sites", None)
    model.topoderiv_sites = []
    try:
        for spec in specs:
            declare(model, spec.container, spec.kind, **spec.options)
        if family == "vit" and insert == "transformer_block":
            _check_blocks(fn, model)
    except Exception:
        model.topoderiv_sites = old
        raise
    return _attach(model, family, name, kw, error)


def _check_blocks(fn: str, model: nn.Module) -> None:
    """The block a transformer_block site builds has the structure of every block of the model."""
    new = sites(model)[0].build_block()
    want = _structure(new)
    for i, b in enumerate(model.blocks):
        got = _structure(b)
        if got != want and not getattr(b, "topoderiv_inserted", False):
            diff = next(((x, y) for x, y in zip(want, got) if x != y), (want[len(got):], got[len(want):]))
            raise TypeError(f"{fn}: blocks.{i} of the model differs from the timm Block a transformer_block site "
                            f"would insert (first difference: new {diff[0]} vs blocks.{i} {diff[1]}): growing "
                            f"needs blocks of one configuration")


def timm_model(name: str, *, insert: Optional[str] = None, seed: int = 0, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with its sites declared (:func:`from_timm`).

    Nothing is downloaded. ``kwargs`` are JSON scalars (or flat lists of them) recorded for
    checkpoints, e.g. ``timm_model("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1,
    num_classes=10, embed_dim=32, depth=2, num_heads=2)`` or ``timm_model("resnet10t",
    in_chans=1, num_classes=10)``. ``img_size`` is dropped for models that do not take it (ResNets
    take any size), so one call fits a task's images for either family.

    Raises:
        ImportError: no timm. ValueError: an unknown name, a kwarg that is not a JSON scalar or
            that create_model rejects, an insert kind the family does not support.
    """
    fn = "timm_model"
    name = check_timm_name(fn, name)
    kw = check_timm_kwargs(fn, kwargs)
    try:
        model = _create(fn, name, kw)
    except ValueError as err:
        if "img_size" not in kw or "img_size" not in str(err):
            raise
        kw.pop("img_size")
        model = _create(fn, name, kw)
    if _family(model) is None:
        raise ValueError(f"{fn}: {name!r} builds a {type(model).__name__}; supported are timm VisionTransformer and "
                         f"ResNet models (e.g. 'vit_small_patch16_224', 'resnet18')")
    return from_timm(model, insert, name=name, kwargs=kw, seed=seed)


@register(name="timm")
class TimmModel(nn.Module):
    """The checkpoint builder of timm models: ``TimmModel(name, kwargs)`` RETURNS
    ``timm.create_model(name, pretrained=False, **kwargs)`` (an instance of timm's class, with
    ``config()`` and ``forward_from`` attached; the checkpoint then declares its saved sites), after
    validating ``name`` against ``timm.list_models()`` and ``kwargs`` (:func:`check_timm_kwargs`).
    """

    def __new__(cls, name: str, kwargs: Dict[str, Any]) -> nn.Module:  # type: ignore[misc]
        fn = "TimmModel"
        name = check_timm_name(fn, name)
        kw = check_timm_kwargs(fn, kwargs)
        model = _create(fn, name, kw)
        family = _family(model)
        if family is None:
            raise ValueError(f"{fn}: {name!r} builds a {type(model).__name__}, not a timm VisionTransformer or ResNet")
        return _attach(model, family, name, kw, None)
