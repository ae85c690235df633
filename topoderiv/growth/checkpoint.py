"""Checkpoints of (grown) models: safetensors tensors + a JSON architecture, rebuilt in one call.

Loading never imports or calls anything a file names. Every class a checkpoint names is a NAME
in the class registry (:mod:`topoderiv.registry`): topoderiv's own models, blocks, activations
and feature maps, the optimisers ``Adam``, ``AdamW``, ``SGD``, ``RMSprop`` and ``Adagrad``
(registered here), and whatever the user registers in code. **A user class (model, block,
activation, feature map, optimiser) must be registered to be saved and loaded**:

    from topoderiv.registry import register

    @register
    class MyBlock(nn.Module): ...

A checkpoint is a folder (format version 2):

    model.json            {"format": "topoderiv-checkpoint", "version": 2, "id": "<random hex>",
                           "class": "<registered model name>", "config": model.config(),
                           "blocks": {"<container>": [{"class": "<registered block name>",
                                                       "config": block.config()} or null, ...]},
                           "inserted": {"<container>": [indices of blocks added by insertion]},
                           "declared_sites": [SiteSpec dicts] (only sites declared on the instance),
                           "frozen": [names of parameters with requires_grad False],
                           "weights": {"<state-dict key>": {"dtype": "float32", "shape": [6, 6]}},
                           "optimizer": {"class": "<registered name>" | null, "defaults": {...},
                                         "param_groups": [{"lr": ..., "params": [parameter names]}],
                                         "scalars": {"<parameter>": {"<state key>": value}}} | null,
                           "scheduler": scheduler.state_dict() | null,
                           "tensors": {"<key>": {"dtype": ..., "shape": [...]}} | null,
                           "history": true | false, "extra": {...}, "torch": "<version>"}
    model.safetensors     the state dict (each tensor's dtype and shape as in "weights")
    optimizer.safetensors optimiser state tensors "<parameter name>::<state key>" (with "optimizer")
    tensors.safetensors   extra state tensors passed to ``save(tensors=...)`` (with "tensors")
    history.json          the growth history (with "history")

``"blocks"`` has one entry per site container of the model (:func:`topoderiv.sites.site_specs`:
``"blocks"`` for a ResidualMLP, e.g. ``"stages.0"``, ``"stages.1"`` for a CNN); a block without
``config()`` is stored as null and must be the model's default block. Every safetensors file and
history.json carry the checkpoint's ``id``, so files of different checkpoints are never mixed.

:func:`load` reads model.json, validates ALL of it against the schema (types, registered class
names, container paths, index ranges, parameter names, dtypes and shapes, optimiser
hyper-parameters) before anything is built, checks the config against the constructor's
signature and type hints, builds the model once on the meta device (no memory) to compare its
state dict with ``"weights"`` and the weights file's size (a hostile config cannot allocate more
than the file holds), then builds ``cls(**config)`` (the config holds the current depths),
replaces the blocks that differ from the defaults, loads the weights with
``strict=True`` after checking every tensor's dtype and shape (a float64 file for a float32
model is an error, never a silent cast), and marks inserted blocks. Every corrupt input raises a
ValueError naming the file and the field, e.g.
``load_checkpoint: runs/x/model.json: blocks['stages.1'][2].config.width: expected int, got 'x'``.
The optimiser state is stored by parameter NAME, so it maps onto the rebuilt model however the
parameter groups were extended during growth; schedulers are restored by the caller's factory
(:meth:`topoderiv.Grower.from_checkpoint`). Version 1 checkpoints (a ``"blocks"`` list,
``"module:QualName"`` class spellings) still load when they name registered classes.

Saves are atomic: the files are written and fsynced in a sibling temporary folder
``.<name>.tmp-<hex>``, then the previous checkpoint is renamed to ``.<name>.old``, the new folder
renamed to ``<name>`` and the old one removed. A checkpoint folder is never modified in place,
an interrupted save leaves the previous checkpoint as it was, and :func:`load` of ``<name>``
works at every instant (it falls back to ``.<name>.old`` while ``<name>`` is missing, and
retries when a concurrent save replaces the folder under it). Concurrent saves to one path are
not supported, and a save refuses a path that holds files other than a checkpoint's (it replaces
the whole folder).
"""
from __future__ import annotations

import collections.abc
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import types
import typing
import uuid
import warnings
from dataclasses import MISSING, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize_tensors
from torch import Tensor, nn

from ..registry import lookup, name_of, register
from ..sites import KINDS, declare, site_specs
from .history import GrowthHistory, RoundRecord, jsonable

__all__ = ["save", "load", "load_checkpoint", "Checkpoint", "optimizer_state", "restore_optimizer", "block_spec",
           "build_block"]

for _opt_cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop, torch.optim.Adagrad):
    register(_opt_cls)

_FORMAT = "topoderiv-checkpoint"
_VERSION = 2
_MODEL_JSON, _WEIGHTS, _OPTIMIZER, _TENSORS, _HISTORY = (
    "model.json", "model.safetensors", "optimizer.safetensors", "tensors.safetensors", "history.json")
_FILES = {_MODEL_JSON, _WEIGHTS, _OPTIMIZER, _TENSORS, _HISTORY}
_ID_KEY = "topoderiv_checkpoint"  # safetensors metadata / history.json key holding the checkpoint id

#: dtype names a checkpoint may record (a fixed table: nothing is resolved from a file)
_DTYPES: Dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int64", "int32",
                 "int16", "int8", "uint8", "uint16", "uint32", "uint64", "bool")
    if isinstance(getattr(torch, name, None), torch.dtype)
}

#: optimiser state entries shaped (and typed) like their parameter; "step" is a scalar
_LIKE_PARAM = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg", "grad_avg", "sum",
               "acc_delta", "exp_inf", "prev", "step_size", "ax"}
_SCALAR_STATE = {"step", "eta", "mu", "mu_product"}

#: optimiser hyper-parameters: finite numbers >= 0 / finite numbers / bools / bools or null
_HYPER_NONNEG = {"lr", "eps", "weight_decay", "momentum", "alpha", "lr_decay", "initial_accumulator_value",
                 "initial_lr", "max_lr", "min_lr"}
_HYPER_FINITE = {"dampening", "base_momentum", "max_momentum"}
_HYPER_BOOL = {"nesterov", "amsgrad", "maximize", "capturable", "differentiable", "centered",
               "decoupled_weight_decay"}
_HYPER_BOOL_OR_NULL = {"foreach", "fused"}

#: a "module:QualName" string (how unregistered classes are described in a config)
_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


# ---------------------------------------------------------------------------------------------
# validation helpers: a location in a file, readable error paths
# ---------------------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, (dict, list)):
        text = json.dumps(value)
        kind = "an object" if isinstance(value, dict) else "a list"
        return f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}"
    text = repr(value)
    return text[:80] + ("..." if len(text) > 80 else "")


class _Loc:
    """A field of a checkpoint file: ``"<fn>: <file>: <path>"`` in error messages."""

    def __init__(self, fn: str, file: Union[str, Path], path: str = "") -> None:
        self.fn, self.file, self.path = fn, str(file), path

    def key(self, k: str) -> "_Loc":
        part = (f".{k}" if self.path else k) if k.isidentifier() else f"[{k!r}]"
        return _Loc(self.fn, self.file, self.path + part)

    def item(self, i: Union[int, str]) -> "_Loc":
        return _Loc(self.fn, self.file, f"{self.path}[{i!r}]")

    def __str__(self) -> str:
        return f"{self.fn}: {self.file}: {self.path}" if self.path else f"{self.fn}: {self.file}"

    def error(self, expected: str, got: Any) -> ValueError:
        return ValueError(f"{self}: expected {expected}, got {_show(got)}")

    def mismatch(self, expected: str, got: str) -> ValueError:
        """Like :meth:`error` with ``got`` already described (not a JSON value)."""
        return ValueError(f"{self}: expected {expected}, got {got}")

    def fail(self, message: str) -> ValueError:
        return ValueError(f"{self}: {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _req(d: Dict[str, Any], k: str, loc: _Loc) -> Any:
    if k not in d:
        raise loc.key(k).fail("missing")
    return d[k]


def _dict(v: Any, loc: _Loc) -> Dict[str, Any]:
    if not isinstance(v, dict):
        raise loc.error("an object", v)
    return v


def _list(v: Any, loc: _Loc) -> List[Any]:
    if not isinstance(v, list):
        raise loc.error("a list", v)
    return v


def _str(v: Any, loc: _Loc) -> str:
    if not isinstance(v, str) or not v:
        raise loc.error("a non-empty str", v)
    return v


def _str_list(v: Any, loc: _Loc) -> List[str]:
    for i, s in enumerate(_list(v, loc)):
        _str(s, loc.item(i))
    return v


def _tensor_meta(v: Any, loc: _Loc) -> Tuple[torch.dtype, Tuple[int, ...]]:
    """``{"dtype": "float32", "shape": [..]}`` -> (dtype, shape)."""
    _dict(v, loc)
    dtype = _req(v, "dtype", loc)
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise loc.key("dtype").error(f"one of {sorted(_DTYPES)}", dtype)
    shape = _list(_req(v, "shape", loc), loc.key("shape"))
    for i, n in enumerate(shape):
        if not _is_int(n) or n < 0:
            raise loc.key("shape").item(i).error("an int >= 0", n)
    return _DTYPES[dtype], tuple(shape)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# -- configs against the constructor's signature and type hints ------------------------------------


def _hint_ok(v: Any, tp: Any, nonfinite_str: bool = False) -> bool:
    """Whether the JSON value ``v`` fits the type hint ``tp`` (unknown hints: yes)."""
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if tp is None or tp is type(None):
        return v is None
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return _is_int(v)
    if tp is float:
        return _is_number(v) or (nonfinite_str and v in ("nan", "inf", "-inf"))
    if tp is str:
        return isinstance(v, str)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return any(_hint_ok(v, a, nonfinite_str) for a in args)
    if origin is typing.Literal:
        return any(v == a and type(v) is type(a) for a in args)
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence):
        if not isinstance(v, list):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(v) == len(args) and all(_hint_ok(x, a, nonfinite_str) for x, a in zip(v, args))
        return all(_hint_ok(x, args[0], nonfinite_str) for x in v)
    if tp is dict or origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        if not isinstance(v, dict):
            return False
        return len(args) < 2 or all(_hint_ok(x, args[1], nonfinite_str) for x in v.values())
    return True  # classes and other hints a JSON value cannot be checked against: the constructor decides


def _hint_name(tp: Any) -> str:
    if tp is None or tp is type(None):
        return "null"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_hint_name(a) for a in args)
    if tp in (list, tuple) or origin in (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence):
        return f"a list of {_hint_name(args[0])}" if args else "a list"
    if tp is dict or origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return "an object"
    return getattr(tp, "__name__", str(tp))


def _type_hints(func: Any) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: the constructor checks its own arguments
        return {}


def _check_config(cls: type, name: str, config: Dict[str, Any], loc: _Loc) -> None:
    """Checks a config against ``cls``'s constructor: known keys, required keys, types."""
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    by_kw = {k: p for k, p in params.items()
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    for k in config:
        if k not in by_kw and not var_kw:
            raise loc.key(k).fail(f"unexpected argument of {name} (it takes {sorted(by_kw)})")
    for k, p in by_kw.items():
        if p.default is inspect.Parameter.empty and k not in config:
            raise loc.fail(f"missing required argument {k!r} of {name}")
    hints = _type_hints(cls.__init__)
    for k, v in config.items():
        if k in hints and not _hint_ok(v, hints[k]):
            raise loc.key(k).error(_hint_name(hints[k]), v)


def _construct(cls: type, name: str, config: Dict[str, Any], loc: _Loc) -> Any:
    """``cls(**config)`` after :func:`_check_config`; any error becomes a ValueError at ``loc``."""
    _check_config(cls, name, config, loc)
    try:
        return cls(**config)
    except Exception as err:
        raise loc.fail(f"{name}(**config) failed: {type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------------
# blocks, site containers
# ---------------------------------------------------------------------------------------------


def block_spec(block: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"class": registered name, "config": {...}}`` for a block with ``config()``, else None.

    Raises:
        ValueError: the block has ``config()`` but its class is not registered.
    """
    if not callable(getattr(block, "config", None)):
        return None
    return {"class": _registered_name(block, "block_spec", "block"), "config": jsonable(block.config())}


def _registered_name(obj: object, fn: str, what: str) -> str:
    """The registered name of ``obj``'s class, or a ValueError saying how to register it."""
    name = name_of(obj)
    if name is None:
        cls = type(obj)
        raise ValueError(f"{fn}: {what} class {cls.__module__}.{cls.__qualname__} is not registered: a checkpoint "
                         f"names classes by registered name; register it "
                         f"(`from topoderiv.registry import register; register({cls.__qualname__})`)")
    return name


def build_block(spec: Dict[str, Any], *, where: str = "build_block") -> nn.Module:
    """Inverse of :func:`block_spec`: the registered class built from the config (nothing imported).

    Raises:
        ValueError: malformed spec, unregistered class, or a config the class rejects.
    """
    loc = _Loc(where, "block spec")
    _dict(spec, loc)
    cls_name = _str(_req(spec, "class", loc), loc.key("class"))
    config = _dict(_req(spec, "config", loc), loc.key("config"))
    cls = lookup(cls_name, "block class", f"{loc.key('class')}", base=nn.Module)
    return _construct(cls, cls_name, config, loc.key("config"))


def _containers(model: nn.Module, fn: str) -> Dict[str, nn.Module]:
    """``{container path: container}`` of the model's site specs ({} for a model without sites)."""
    try:
        specs = site_specs(model, fn)
    except TypeError:
        return {}
    out: Dict[str, nn.Module] = {}
    for spec in specs:
        if spec.container in out:
            continue
        try:
            cont = model.get_submodule(spec.container)
        except AttributeError:
            raise ValueError(f"{fn}: {type(model).__name__} declares a site container {spec.container!r} it "
                             f"does not have") from None
        if not isinstance(cont, (nn.Sequential, nn.ModuleList)):
            raise TypeError(f"{fn}: site container {spec.container!r} of {type(model).__name__} must be an "
                            f"nn.Sequential or nn.ModuleList, got {type(cont).__name__}")
        out[spec.container] = cont
    return out


# ---------------------------------------------------------------------------------------------
# optimiser state
# ---------------------------------------------------------------------------------------------


def _tensors_for_file(tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    # own contiguous CPU copies: safetensors refuses shared or non-contiguous storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """``(meta, tensors)``: the optimiser's groups and state keyed by parameter name.

    Parameters the model does not own are skipped. ``meta["class"]`` is the optimiser's
    registered name, or None for an unregistered class (its state is still saved, and
    :func:`restore_optimizer` then needs a factory).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in optimizer.param_groups:
        hyper = {k: jsonable(v) for k, v in g.items() if k != "params"}
        hyper["params"] = [names[id(p)] for p in g["params"] if id(p) in names]
        groups.append(hyper)
    tensors: Dict[str, Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for p, st in optimizer.state.items():
        name = names.get(id(p))
        if name is None:
            continue
        for key, val in st.items():
            if isinstance(val, Tensor):
                tensors[f"{name}::{key}"] = val
            else:
                scalars.setdefault(name, {})[str(key)] = jsonable(val)
    meta = {"class": name_of(optimizer), "defaults": jsonable(optimizer.defaults), "param_groups": groups,
            "scalars": scalars}
    return meta, tensors


def _check_hyper(group: Dict[str, Any], loc: _Loc) -> None:
    for k, v in group.items():
        at = loc.key(k)
        if k in _HYPER_NONNEG and not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise at.error("a finite number >= 0", v)
        if k in _HYPER_FINITE and not (_is_number(v) and math.isfinite(v)):
            raise at.error("a finite number", v)
        if k in _HYPER_BOOL and not isinstance(v, bool):
            raise at.error("true or false", v)
        if k in _HYPER_BOOL_OR_NULL and not (v is None or isinstance(v, bool)):
            raise at.error("true, false or null", v)
        if k == "betas" and not (isinstance(v, list) and len(v) == 2
                                 and all(_is_number(b) and math.isfinite(b) and 0 <= b < 1 for b in v)):
            raise at.error("two numbers in [0, 1)", v)


def _check_optimizer_meta(opt: Dict[str, Any], loc: _Loc) -> None:
    """Structure of ``model.json: optimizer`` (no model needed)."""
    _dict(opt, loc)
    for k in ("class", "defaults", "param_groups", "scalars"):
        _req(opt, k, loc)
    cls_name = opt["class"]
    if cls_name is not None:
        _str(cls_name, loc.key("class"))
        lookup(cls_name, "optimizer class", str(loc.key("class")), base=torch.optim.Optimizer)
    _check_hyper(_dict(opt.get("defaults", {}), loc.key("defaults")), loc.key("defaults"))
    groups = _list(_req(opt, "param_groups", loc), loc.key("param_groups"))
    seen: Dict[str, int] = {}
    for i, g in enumerate(groups):
        gl = loc.key("param_groups").item(i)
        _dict(g, gl)
        for j, n in enumerate(_str_list(_req(g, "params", gl), gl.key("params"))):
            if n in seen:
                raise gl.key("params").item(j).fail(f"parameter {n!r} is already in param_groups[{seen[n]}]")
            seen[n] = i
        _check_hyper(g, gl)
    scalars = _dict(opt.get("scalars", {}), loc.key("scalars"))
    for n, st in scalars.items():
        sl = loc.key("scalars").item(n)
        if n not in seen:
            raise sl.fail("names a parameter that is in no param group")
        for k, v in _dict(st, sl).items():
            if k in _LIKE_PARAM and v is not None:  # a buffer not yet allocated; tensors live in the file
                raise sl.key(k).error("null (its tensor is stored in optimizer.safetensors)", v)
            if not (v is None or isinstance(v, bool) or (_is_number(v) and math.isfinite(v))):
                raise sl.key(k).error("a finite number, true, false or null", v)


def _check_optimizer(opt: Dict[str, Any], tensors: Dict[str, Tensor], model: nn.Module, loc: _Loc,
                     file: Path) -> None:
    """The optimiser meta and state tensors against the rebuilt model."""
    params = dict(model.named_parameters())
    in_groups = set()
    for i, g in enumerate(opt["param_groups"]):
        for j, n in enumerate(g["params"]):
            if n not in params:
                raise loc.key("param_groups").item(i).key("params").item(j).fail(
                    f"names no parameter of the model ({n!r}; it has {list(params)[:6]}{' ...' * (len(params) > 6)})")
            in_groups.add(n)
    floc = _Loc(loc.fn, file)
    for key, t in tensors.items():
        name, sep, state_key = key.partition("::")
        at = floc.item(key)
        if not sep or not state_key:
            raise at.fail("expected a key '<parameter name>::<state key>'")
        if name not in in_groups:
            raise at.fail(f"names a parameter that is in none of model.json's optimizer.param_groups ({name!r})")
        p = params[name]
        if state_key in _LIKE_PARAM:
            if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
                raise at.mismatch(f"a tensor shaped like its parameter: {_dtype_name(p.dtype)} {list(p.shape)}",
                                  f"{_dtype_name(t.dtype)} {list(t.shape)}")
        elif state_key in _SCALAR_STATE and (t.dim() != 0 or t.dtype == torch.bool or t.is_complex()):
            raise at.mismatch("a scalar number tensor (shape [])", f"{_dtype_name(t.dtype)} {list(t.shape)}")


def restore_optimizer(model: nn.Module, saved: Optional[Dict[str, Any]],
                      optimizer: Union[torch.optim.Optimizer, Callable[..., torch.optim.Optimizer], None] = None
                      ) -> torch.optim.Optimizer:
    """Rebuilds an optimiser over ``model`` with the saved groups and state.

    Args:
        saved: ``{"meta": ..., "tensors": ...}`` from :func:`load_checkpoint` (None: fresh optimiser).
        optimizer: None (the saved, registered class with the saved defaults), a factory
            ``f(params)``, or an optimiser; its groups are replaced by the saved groups (by
            parameter name).

    Raises:
        ValueError: no optimiser can be built (no state and no optimizer given, or the saved class
            is unregistered and no factory is given), or the saved state does not fit the model.
    """
    fn = "restore_optimizer"
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(model.parameters())
    elif saved is not None:
        meta = saved["meta"]
        if meta.get("class") is None:
            raise ValueError(f"{fn}: the checkpoint's optimizer class was not registered when it was saved: pass "
                             f"optimizer=a factory f(params) (its state is loaded into it)")
        cls = lookup(meta["class"], "optimizer class", f"{fn}: optimizer.class", base=torch.optim.Optimizer)
        defaults = dict(meta.get("defaults", {}))
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        try:  # keep what this torch's constructor takes (groups carry the saved hyper-parameters anyway)
            accepted = inspect.signature(cls).parameters
            defaults = {k: v for k, v in defaults.items() if k in accepted}
        except (TypeError, ValueError):
            pass
        try:
            opt = cls(model.parameters(), **defaults)
        except Exception as err:
            raise ValueError(f"{fn}: {meta['class']}(params, **defaults) failed: {type(err).__name__}: {err}") from err
    else:
        raise ValueError(f"{fn}: give an optimizer (or factory) when the checkpoint holds no optimizer state")
    if saved is None:
        return opt
    meta, tensors = saved["meta"], saved["tensors"]
    by_name = dict(model.named_parameters())
    missing = [n for g in meta["param_groups"] for n in g["params"] if n not in by_name]
    if missing:
        raise ValueError(f"{fn}: the checkpoint's optimizer names parameters the model lacks: {missing[:5]}")
    # rebuild the groups by name, then load a torch-format state dict
    opt.param_groups.clear()
    opt.state.clear()
    order: List[str] = []
    sd_groups = []
    for g in meta["param_groups"]:
        hyper = {k: (tuple(v) if k == "betas" and isinstance(v, list) else v) for k, v in g.items() if k != "params"}
        opt.add_param_group({**hyper, "params": [by_name[n] for n in g["params"]]})
        idx = list(range(len(order), len(order) + len(g["params"])))
        order.extend(g["params"])
        sd_groups.append({**hyper, "params": idx})
    state: Dict[int, Dict[str, Any]] = {}
    for i, name in enumerate(order):
        st: Dict[str, Any] = dict(meta.get("scalars", {}).get(name, {}))
        prefix = f"{name}::"
        for key, val in tensors.items():
            if key.startswith(prefix):
                st[key[len(prefix):]] = val
        if st:
            state[i] = st
    opt.load_state_dict({"state": state, "param_groups": sd_groups})
    return opt


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------


def _check_class_paths(value: Any, loc: _Loc) -> None:
    """Raises when a config describes an unregistered class (``"module:QualName"`` of a loaded module)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_class_paths(v, loc.key(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_class_paths(v, loc.item(i))
    elif isinstance(value, str) and _CLASS_PATH.match(value) and value.partition(":")[0] in sys.modules:
        try:
            lookup(value, "class", str(loc))
        except ValueError:
            raise loc.fail(f"{value!r} describes a class that is not registered, so the checkpoint could not be "
                           f"loaded: register the class (`from topoderiv.registry import register; register(cls)`) "
                           f"before saving") from None


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _old_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _replace_folder(target: Path, files: Dict[str, bytes]) -> None:
    """Writes ``files`` into a fresh sibling folder, then swaps it in for ``target`` (module docstring)."""
    target = Path(os.path.abspath(target))
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    old = _old_of(target)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        for name, data in files.items():
            _write_synced(tmp / name, data)
        _fsync_dir(tmp)
        if os.path.lexists(target):
            if os.path.lexists(old):  # left by a crash after target was complete: stale
                shutil.rmtree(old)
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            if os.path.lexists(old) and not os.path.lexists(target):
                os.rename(old, target)  # put the previous checkpoint back
            raise
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    for stale in parent.glob(f".{_glob_escape(target.name)}.tmp-*"):  # left by crashed saves
        shutil.rmtree(stale, ignore_errors=True)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _check_target(path: Path, fn: str) -> None:
    """A save replaces ``path``: it must be absent, an empty folder or a checkpoint folder."""
    if not os.path.lexists(path):
        return
    if not path.is_dir():
        raise ValueError(f"{fn}: path must be a checkpoint folder (new, empty or written by save), got the file "
                         f"{str(path)!r}")
    unknown = sorted(p.name for p in path.iterdir() if p.name not in _FILES)
    if unknown:
        raise ValueError(f"{fn}: path must be a checkpoint folder (new, empty or written by save): a save replaces "
                         f"the whole folder, and {str(path)!r} holds other files: {unknown[:5]}")


def save(model: nn.Module, path: Union[str, Path], *, history: Optional[GrowthHistory] = None,
         optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None,
         extra: Optional[Dict[str, Any]] = None, tensors: Optional[Dict[str, Tensor]] = None) -> Path:
    """Writes a checkpoint folder atomically (see the module docstring); returns its path.

    Args:
        model: a model with ``config()`` whose class is registered (:mod:`topoderiv.registry`).
        path: the folder; replaced as a whole if it exists (it must then be a checkpoint folder or
            empty). The previous checkpoint stays intact until the new one is complete.
        history: growth history to store alongside. optimizer / scheduler: their state, to resume
            (an unregistered optimiser class is saved without its class: restoring then needs a factory).
        extra: any JSON-able metadata.
        tensors: extra state tensors to store (e.g. RNG states as uint8 tensors for an exact
            resume); returned by :func:`load_checkpoint` as ``Checkpoint.tensors``.

    Raises:
        TypeError: the model is not an nn.Module or has no ``config()``; ``tensors`` is not a dict
            of tensors. ValueError: an unregistered class (model, block, or one named in a
            config), a folder that is not a checkpoint, or a checkpoint that would not load.
    """
    fn = "save"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if not callable(getattr(model, "config", None)):
        raise TypeError(f"{fn}: model must have a config() method returning its constructor arguments (growth "
                        f"protocol, see topoderiv.models), got {type(model).__name__} without one")
    cls_name = _registered_name(model, fn, "model")
    if tensors is not None:
        bad = ([f"{type(tensors).__name__}"] if not isinstance(tensors, dict) else
               [f"{k!r}: {type(v).__name__}" for k, v in tensors.items()
                if not (isinstance(k, str) and k and isinstance(v, Tensor))])
        if bad:
            raise TypeError(f"{fn}: tensors must be a dict of non-empty str -> torch.Tensor, got {', '.join(bad[:3])}")
    path = Path(path)
    _check_target(path, fn)
    ck_id = uuid.uuid4().hex
    meta_ids = {_ID_KEY: ck_id}
    conts = _containers(model, fn)
    state = _tensors_for_file(model.state_dict())
    arch: Dict[str, Any] = {
        "format": _FORMAT, "version": _VERSION, "id": ck_id, "class": cls_name, "config": jsonable(model.config()),
        "blocks": {}, "inserted": {},
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "weights": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in state.items()},
        "optimizer": None, "scheduler": None, "tensors": None, "history": history is not None,
        "extra": jsonable(extra or {}), "torch": torch.__version__,
    }
    for cpath, cont in conts.items():
        specs = []
        for i, b in enumerate(cont):
            try:
                specs.append(block_spec(b))
            except ValueError as err:
                raise ValueError(f"{fn}: block {cpath}[{i}]: {err}") from None
        arch["blocks"][cpath] = specs
        arch["inserted"][cpath] = [i for i, b in enumerate(cont) if getattr(b, "topoderiv_inserted", False)]
    declared = getattr(model, "topoderiv_sites", None)
    if declared:
        arch["declared_sites"] = [jsonable(s if isinstance(s, dict) else s.to_dict()) for s in declared]
    files: Dict[str, bytes] = {_WEIGHTS: serialize_tensors(state, metadata=meta_ids)}
    if optimizer is not None:
        opt_meta, opt_tensors = optimizer_state(model, optimizer)
        if opt_meta["class"] is None:
            warnings.warn(f"{fn}: optimizer class {type(optimizer).__qualname__} is not registered: its state is "
                          f"saved, and restoring it needs a factory (restore_optimizer(..., optimizer=f))",
                          stacklevel=2)
        arch["optimizer"] = opt_meta
        files[_OPTIMIZER] = serialize_tensors(_tensors_for_file(opt_tensors), metadata=meta_ids)
    if scheduler is not None and hasattr(scheduler, "state_dict"):
        arch["scheduler"] = jsonable(scheduler.state_dict())
    if tensors is not None:
        extra_tensors = _tensors_for_file(tensors)
        arch["tensors"] = {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in extra_tensors.items()}
        files[_TENSORS] = serialize_tensors(extra_tensors, metadata=meta_ids)
    if history is not None:
        files[_HISTORY] = json.dumps({**history.to_dict(), _ID_KEY: ck_id}, indent=1, allow_nan=False).encode()
    # what load would reject is refused here, before anything replaces the previous checkpoint
    loc = _Loc(fn, path / _MODEL_JSON)
    _check_class_paths(arch["config"], loc.key("config"))
    for cpath, specs in arch["blocks"].items():
        for i, spec in enumerate(specs):
            if spec is not None:
                _check_class_paths(spec["config"], loc.key("blocks").item(cpath).item(i).key("config"))
    _check_arch(arch, loc)
    try:
        text = json.dumps(arch, indent=1, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{fn}: the checkpoint's metadata is not JSON: {err}") from None
    files[_MODEL_JSON] = text.encode()
    _replace_folder(path, files)
    return path


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the rebuilt model (weights, frozen flags, inserted marks).
        history: the growth history, or None.
        optimizer_state: ``{"meta": ..., "tensors": ...}`` for :func:`restore_optimizer`, or None.
        scheduler_state: the scheduler's state dict, or None.
        meta: the validated model.json.
        tensors: the extra state tensors given to ``save(tensors=...)`` ({} if none).
    """

    model: nn.Module
    history: Optional[GrowthHistory]
    optimizer_state: Optional[Dict[str, Any]]
    scheduler_state: Optional[Dict[str, Any]]
    meta: Dict[str, Any]
    tensors: Dict[str, Tensor] = field(default_factory=dict)


class _Replaced(Exception):
    """The folder being read was replaced by a concurrent save: read again."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _read_json(file: Path, fn: str) -> Any:
    data = file.read_bytes()  # FileNotFoundError: handled by the caller
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{fn}: {file}: not a valid JSON file (truncated or corrupt?): {err}") from None


def _read_tensors(file: Path, fn: str) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; ValueError naming the file if unreadable."""
    if not file.is_file():
        raise FileNotFoundError(str(file))
    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            return {k: fh.get_tensor(k) for k in fh.keys()}, meta
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{fn}: {file}: not a readable safetensors file (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from None


def _resolve(path: Path, fn: str) -> Path:
    """The folder to read: ``path``, or ``.<name>.old`` while a save is swapping it (module docstring)."""
    if (path / _MODEL_JSON).is_file():
        return path
    old = _old_of(path)
    if (old / _MODEL_JSON).is_file():
        return old
    raise FileNotFoundError(f"{fn}: path must be a checkpoint folder written by topoderiv.save, got {str(path)!r} "
                            "without model.json")


def _check_arch(arch: Any, loc: _Loc) -> Dict[str, Any]:
    """Validates the structure of model.json (no model needed); returns it in version-2 form."""
    _dict(arch, loc)
    if arch.get("format") != _FORMAT:
        raise ValueError(f"{loc.fn}: {loc.file} is not a topoderiv checkpoint (format {arch.get('format')!r})")
    version = _req(arch, "version", loc)
    if version not in (1, _VERSION) or not _is_int(version):
        raise loc.key("version").error(f"1 or {_VERSION} (this topoderiv reads those)", version)
    out = dict(arch)
    _str(_req(arch, "class", loc), loc.key("class"))
    _dict(_req(arch, "config", loc), loc.key("config"))
    if version == 1:  # one "blocks" container, a list; inserted a list
        blocks = arch.get("blocks")
        out["blocks"] = {} if blocks is None else {"blocks": _list(blocks, loc.key("blocks"))}
        ins = _list(arch.get("inserted", []), loc.key("inserted"))
        out["inserted"] = {"blocks": ins} if blocks is not None else {}
        if blocks is None and ins:
            raise loc.key("inserted").fail("lists inserted blocks but the checkpoint has no blocks")
        out["weights"] = None
        out["tensors"] = None
        out["history"] = None  # read history.json if present
        out["id"] = None
    else:
        _str(_req(arch, "id", loc), loc.key("id"))
        _dict(_req(arch, "blocks", loc), loc.key("blocks"))
        _dict(_req(arch, "inserted", loc), loc.key("inserted"))
        weights = _dict(_req(arch, "weights", loc), loc.key("weights"))
        for k, v in weights.items():
            _tensor_meta(v, loc.key("weights").item(k))
        extra_t = _req(arch, "tensors", loc)
        if extra_t is not None:
            for k, v in _dict(extra_t, loc.key("tensors")).items():
                _tensor_meta(v, loc.key("tensors").item(k))
        if not isinstance(arch.get("history"), bool):
            raise loc.key("history").error("true or false", arch.get("history"))
        declared = arch.get("declared_sites")
        if declared is not None:
            for i, s in enumerate(_list(declared, loc.key("declared_sites"))):
                sl = loc.key("declared_sites").item(i)
                _dict(s, sl)
                _str(_req(s, "container", sl), sl.key("container"))
                kind = _str(_req(s, "kind", sl), sl.key("kind"))
                if kind not in KINDS:
                    raise sl.key("kind").error(f"a site kind, one of {sorted(KINDS)}", kind)
                _dict(s.get("options", {}), sl.key("options"))
    for cpath, specs in out["blocks"].items():
        cl = loc.key("blocks").item(cpath)
        for i, spec in enumerate(_list(specs, cl)):
            if spec is None:
                continue
            bl = cl.item(i)
            _dict(spec, bl)
            _str(_req(spec, "class", bl), bl.key("class"))
            _dict(_req(spec, "config", bl), bl.key("config"))
    for cpath, idx in out["inserted"].items():
        il = loc.key("inserted").item(cpath)
        if cpath not in out["blocks"]:
            raise il.fail(f"names a container the checkpoint has no blocks for (it has {list(out['blocks'])})")
        n = len(out["blocks"][cpath])
        seen = set()
        for j, i in enumerate(_list(idx, il)):
            if not _is_int(i) or not 0 <= i < n:
                raise il.item(j).error(f"a block index, an int in [0, {n - 1}]" if n else "no index (no blocks)", i)
            if i in seen:
                raise il.item(j).fail(f"block {i} is listed twice")
            seen.add(i)
    if version == _VERSION:  # what a version-2 save always writes (null where absent)
        for k in ("frozen", "optimizer", "scheduler", "extra"):
            _req(arch, k, loc)
        missing = [c for c in out["blocks"] if c not in out["inserted"]]
        if missing:
            raise loc.key("inserted").fail(f"expected an entry per container of blocks, missing {missing}")
    if "torch" in arch and not isinstance(arch["torch"], str):
        raise loc.key("torch").error("a version str", arch["torch"])
    _str_list(arch.get("frozen", []), loc.key("frozen"))
    if arch.get("optimizer") is not None:
        _check_optimizer_meta(arch["optimizer"], loc.key("optimizer"))
    if arch.get("scheduler") is not None:
        _dict(arch["scheduler"], loc.key("scheduler"))
    _dict(arch.get("extra", {}), loc.key("extra"))
    return out


def _build_model(arch: Dict[str, Any], loc: _Loc) -> nn.Module:
    """The model from its registered class + config, its blocks replaced where they differ from the defaults."""
    fn = loc.fn
    cls_name = arch["class"]
    cls = lookup(cls_name, "model class", str(loc.key("class")), base=nn.Module)
    model = _construct(cls, cls_name, arch["config"], loc.key("config"))
    if not getattr(model, "topoderiv_sites", None):  # sites declared on the saved instance, not by its class
        for i, s in enumerate(arch.get("declared_sites") or []):
            try:
                declare(model, s["container"], s["kind"], **s.get("options", {}))
            except (TypeError, ValueError) as err:
                raise loc.key("declared_sites").item(i).fail(str(err)) from None
    try:
        conts = _containers(model, fn)
    except (TypeError, ValueError) as err:
        raise loc.key("class").fail(f"{cls_name}(**config) has unusable site containers: {err}") from None
    if set(conts) != set(arch["blocks"]):
        raise loc.key("blocks").error(f"one list of blocks per site container of {cls_name}(**config): "
                                      f"{sorted(conts)}", sorted(arch["blocks"]))
    for cpath, specs in arch["blocks"].items():
        cont, cl = conts[cpath], loc.key("blocks").item(cpath)
        if len(cont) != len(specs):
            raise cl.fail(f"expected {len(cont)} blocks (what {cls_name}(**config) builds: its config() must "
                          f"include the current depth), got {len(specs)}")
        for i, spec in enumerate(specs):
            if spec is None:
                continue
            bl = cl.item(i)
            bcls = lookup(spec["class"], "block class", str(bl.key("class")), base=nn.Module)
            default = cont[i]
            if type(default) is bcls and callable(getattr(default, "config", None)) \
                    and jsonable(default.config()) == spec["config"]:
                continue
            cont[i] = _construct(bcls, spec["class"], spec["config"], bl.key("config"))
        for i in arch["inserted"].get(cpath, []):
            cont[i].topoderiv_inserted = True
    return model


def _check_manifest(expected: Dict[str, Tensor], manifest: Dict[str, Any], loc: _Loc, name: str
                    ) -> Dict[str, torch.dtype]:
    """model.json's ``weights`` against the rebuilt model's state dict; returns ``{key: dtype}``."""
    wl = loc.key("weights")
    missing = [k for k in expected if k not in manifest]
    unexpected = [k for k in manifest if k not in expected]
    if missing or unexpected:
        raise wl.fail(f"expected the state-dict keys of {name}(**config) with its blocks; missing {missing[:5]}, "
                      f"unexpected {unexpected[:5]}")
    dtypes = {}
    for k, t in expected.items():
        dtype, shape = _tensor_meta(manifest[k], wl.item(k))
        if shape != tuple(t.shape):
            raise wl.item(k).key("shape").error(f"{list(t.shape)} (the shape in {name}(**config))", list(shape))
        if dtype.is_floating_point != t.dtype.is_floating_point:
            raise wl.item(k).key("dtype").error(f"a {'floating' if t.dtype.is_floating_point else 'non-floating'} "
                                                f"dtype like {_dtype_name(t.dtype)}", _dtype_name(dtype))
        dtypes[k] = dtype
    return dtypes


def _check_config_ints(v: Any, loc: _Loc, bound: int) -> None:
    """Every integer in a (nested) config is at most ``bound`` in magnitude."""
    if isinstance(v, dict):
        for k, x in v.items():
            _check_config_ints(x, loc.key(k), bound)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_config_ints(x, loc.item(i), bound)
    elif _is_int(v) and abs(v) > bound:
        raise loc.error(f"an integer of at most {bound} in magnitude (the weights file's size in bytes: no "
                        f"size or depth of a saved model can exceed it)", v)


def _dry_run(arch: Dict[str, Any], loc: _Loc, file: Path) -> None:
    """Builds the model on the meta device (no memory) and checks its state dict against model.json's
    ``weights`` and the size of ``file``, so a hostile config cannot make the real build allocate more
    than the weights file holds. Skipped where a constructor cannot run on the meta device.

    Before that, no integer of a config may exceed the weights file's size in bytes (at least
    2**16): a constructor loops over its sizes and depths even on the meta device, so a depth of
    10**30 would never return."""
    try:
        bound = max(file.stat().st_size, 2**16)
    except FileNotFoundError:
        bound = 2**16
    _check_config_ints(arch["config"], loc.key("config"), bound)
    for cpath, specs in arch["blocks"].items():
        for i, spec in enumerate(specs):
            if spec is not None:
                _check_config_ints(spec["config"], loc.key("blocks").item(cpath).item(i).key("config"), bound)
    try:
        with torch.device("meta"):
            model = _build_model(arch, loc)
    except ValueError:
        return  # the real build reports the error (or builds what the meta device cannot)
    dtypes = _check_manifest(model.state_dict(), arch["weights"], loc, type(model).__name__)
    need = sum(math.prod(t.shape) * dtypes[k].itemsize for k, t in model.state_dict().items())
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        return  # reported when the weights are read
    if size < need:
        raise ValueError(f"{loc.fn}: {file}: {size} bytes cannot hold the {need} bytes of weights model.json lists "
                         f"(truncated or corrupt?)")


def _load_weights(model: nn.Module, tensors: Dict[str, Tensor], manifest: Optional[Dict[str, Any]], loc: _Loc,
                  file: Path) -> None:
    """Checks the weights against the manifest and the model (keys, shapes, dtypes), then loads them."""
    expected = model.state_dict()
    floc = _Loc(loc.fn, file)
    name = type(model).__name__
    if manifest is not None:
        dtypes = _check_manifest(expected, manifest, loc, name)
    else:  # version 1: the file's dtypes, floating where the model is floating
        dtypes = {k: tensors[k].dtype
                  if k in tensors and tensors[k].dtype.is_floating_point == t.dtype.is_floating_point else t.dtype
                  for k, t in expected.items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise floc.fail(f"expected the tensors of {name}'s state dict; missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    for k, t in tensors.items():
        want, shape = dtypes[k], tuple(expected[k].shape)
        if t.dtype != want or tuple(t.shape) != shape:
            raise floc.item(k).mismatch(f"{_dtype_name(want)} {list(shape)} (the model's"
                                        f"{', as in model.json: weights' if manifest is not None else ''})",
                                        f"{_dtype_name(t.dtype)} {list(t.shape)}")
    with torch.no_grad():
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if n in dtypes and t.dtype != dtypes[n]:
                t.data = t.data.to(dtypes[n])
    model.load_state_dict(tensors, strict=True)


def _check_history(d: Any, loc: _Loc) -> GrowthHistory:
    _dict(d, loc)
    if "format" in d and d["format"] != "topoderiv-growth-history":
        raise loc.key("format").error("'topoderiv-growth-history'", d["format"])
    if "version" in d and not _is_int(d["version"]):
        raise loc.key("version").error("an int", d["version"])
    _dict(d.get("meta", {}), loc.key("meta"))
    hints = typing.get_type_hints(RoundRecord)
    required = [f.name for f in dataclass_fields(RoundRecord) if f.default is MISSING and f.default_factory is MISSING]
    for i, r in enumerate(_list(d.get("rounds", []), loc.key("rounds"))):
        rl = loc.key("rounds").item(i)
        _dict(r, rl)
        for k in required:
            _req(r, k, rl)
        for k, v in r.items():
            if k == "mu":
                for mk, mv in _dict(v, rl.key("mu")).items():
                    if not re.fullmatch(r"-?\d+", mk) or not _hint_ok(mv, float, nonfinite_str=True):
                        raise rl.key("mu").item(mk).error("a point (int key) -> number", mv)
            elif k == "point":
                if not (v is None or _is_int(v) or isinstance(v, str)):
                    raise rl.key(k).error("an int, a site name or null", v)
            elif k in hints and not _hint_ok(v, hints[k], nonfinite_str=True):
                raise rl.key(k).error(_hint_name(hints[k]), v)
    try:
        return GrowthHistory.from_dict(d)
    except Exception as err:
        raise loc.fail(f"not a growth history: {type(err).__name__}: {err}") from None


def _load_folder(path: Path, folder: Path, fn: str, device: Union[str, torch.device, None]) -> Checkpoint:
    loc = _Loc(fn, folder / _MODEL_JSON)
    try:
        raw = _read_json(folder / _MODEL_JSON, fn)
    except FileNotFoundError:
        raise _Replaced() from None
    arch = _check_arch(raw, loc)
    ck_id = arch["id"]

    def replaced() -> bool:
        try:
            if _resolve(path, fn) != folder:
                return True
            now = json.loads((folder / _MODEL_JSON).read_text())
            return not isinstance(now, dict) or now.get("id") != ck_id
        except (OSError, ValueError):
            return True

    def read(name: str, what: str) -> Tuple[Any, Dict[str, str]]:
        file = folder / name
        try:
            if name.endswith(".json"):
                data = _read_json(file, fn)
                meta = {_ID_KEY: data.get(_ID_KEY)} if isinstance(data, dict) and _ID_KEY in data else {}
            else:
                data, meta = _read_tensors(file, fn)
        except FileNotFoundError:
            if replaced():
                raise _Replaced() from None
            raise ValueError(f"{fn}: {file}: missing ({what})") from None
        if ck_id is not None and meta.get(_ID_KEY) != ck_id:
            if replaced():
                raise _Replaced()
            raise ValueError(f"{fn}: {file}: belongs to another checkpoint (id {meta.get(_ID_KEY)!r}; model.json has "
                             f"{ck_id!r}): files of different checkpoints are mixed in this folder")
        return data, meta

    if arch["weights"] is not None:
        _dry_run(arch, loc, folder / _WEIGHTS)
    model = _build_model(arch, loc)
    weights, _ = read(_WEIGHTS, "the model weights")
    _load_weights(model, weights, arch["weights"], loc, folder / _WEIGHTS)
    params = dict(model.named_parameters())
    frozen = set(arch.get("frozen", []))
    for j, n in enumerate(arch.get("frozen", [])):
        if n not in params:
            raise loc.key("frozen").item(j).fail(f"names no parameter of the model ({n!r})")
    for n, p in params.items():
        p.requires_grad_(n not in frozen)
    opt_state = None
    if arch.get("optimizer") is not None:
        opt_tensors, _ = read(_OPTIMIZER, "model.json records an optimizer")
        _check_optimizer(arch["optimizer"], opt_tensors, model, loc.key("optimizer"), folder / _OPTIMIZER)
        opt_state = {"meta": arch["optimizer"], "tensors": opt_tensors}
    extra_tensors: Dict[str, Tensor] = {}
    if arch["tensors"] is not None:
        extra_tensors, _ = read(_TENSORS, "model.json records extra tensors")
        tl = _Loc(fn, folder / _TENSORS)
        if set(extra_tensors) != set(arch["tensors"]):
            raise tl.fail(f"expected the tensors listed in model.json ({sorted(arch['tensors'])[:5]}), got "
                          f"{sorted(extra_tensors)[:5]}")
        for k, t in extra_tensors.items():
            dtype, shape = _tensor_meta(arch["tensors"][k], loc.key("tensors").item(k))
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise tl.item(k).mismatch(f"{_dtype_name(dtype)} {list(shape)} (model.json: tensors)",
                                          f"{_dtype_name(t.dtype)} {list(t.shape)}")
    history = None
    if arch["history"] or (arch["history"] is None and (folder / _HISTORY).is_file()):
        hist_raw, _ = read(_HISTORY, "model.json records a history")
        history = _check_history(hist_raw, _Loc(fn, folder / _HISTORY))
    if device is not None:
        model.to(device)
    return Checkpoint(model, history, opt_state, arch.get("scheduler"), arch, extra_tensors)


def load_checkpoint(path: Union[str, Path], *, device: Union[str, torch.device, None] = None) -> Checkpoint:
    """Loads model, history, optimiser/scheduler state and extra tensors from a checkpoint folder.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint folder (no model.json).
        ValueError: a corrupt, inconsistent or hostile checkpoint (naming the file and the field),
            or a class name that is not registered (:mod:`topoderiv.registry`).
    """
    fn = "load_checkpoint"
    path = Path(path)
    for attempt in range(5):
        folder = _resolve(path, fn)
        try:
            return _load_folder(path, folder, fn, device)
        except _Replaced:
            time.sleep(0.02 * (attempt + 1))
    raise ValueError(f"{fn}: {str(path)!r} kept being replaced by concurrent saves while it was read")


def load(path: Union[str, Path], *, device: Union[str, torch.device, None] = None) -> nn.Module:
    """Rebuilds the saved model (architecture + weights, same outputs) from a checkpoint folder."""
    return load_checkpoint(path, device=device).model
