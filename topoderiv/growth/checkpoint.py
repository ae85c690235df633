"""Checkpoints of (grown) models: safetensors weights + a JSON architecture, rebuilt in one call.

A checkpoint is a folder:

    model.json            {"class": "module:QualName", "config": model.config(),
                           "blocks": [per-block {"class", "config"} or null, ...],
                           "inserted": [indices of blocks added by insertion], "frozen": [...],
                           "optimizer": {...} | null, "scheduler": {...} | null, "extra": {...}}
    model.safetensors     the state dict (tensors keep their dtype)
    optimizer.safetensors optimiser state tensors, keyed "<parameter name>::<state key>" (optional)
    history.json          the growth history (optional)

:func:`load` imports the model class, builds ``cls(**config)`` (config holds the current depth),
rebuilds every block from its spec (so blocks that differ from the model's defaults, e.g. inserted
by a baseline with its own block type, come back as they were), loads the weights with their
dtypes and marks inserted blocks. The optimiser state is stored by parameter NAME, so it maps onto
the rebuilt model however the parameter groups were extended during growth.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..sites import check_growable
from .history import GrowthHistory, jsonable

__all__ = ["save", "load", "load_checkpoint", "Checkpoint", "optimizer_state", "restore_optimizer"]

_FORMAT = "topoderiv-checkpoint"


def _class_path(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _import(path: str) -> Any:
    mod_name, _, qual = path.partition(":")
    obj: Any = importlib.import_module(mod_name)
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def block_spec(block: nn.Module) -> Optional[Dict[str, Any]]:
    """``{"class": "module:QualName", "config": {...}}`` for a block with ``config()``, else None."""
    if not hasattr(block, "config") or not callable(block.config):
        return None
    return {"class": _class_path(block), "config": block.config()}


def build_block(spec: Dict[str, Any]) -> nn.Module:
    """Inverse of :func:`block_spec`."""
    return _import(spec["class"])(**spec["config"])


def _tensors_for_file(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # own contiguous CPU copies: safetensors refuses shared or non-contiguous storage
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
    """``(meta, tensors)``: the optimiser's groups and state keyed by parameter name.

    Parameters the model does not own are skipped.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in optimizer.param_groups:
        hyper = {k: jsonable(v) for k, v in g.items() if k != "params"}
        hyper["params"] = [names[id(p)] for p in g["params"] if id(p) in names]
        groups.append(hyper)
    tensors: Dict[str, torch.Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for p, st in optimizer.state.items():
        name = names.get(id(p))
        if name is None:
            continue
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"{name}::{key}"] = val
            else:
                scalars.setdefault(name, {})[key] = jsonable(val)
    meta = {"class": _class_path(optimizer), "defaults": jsonable(optimizer.defaults), "param_groups": groups,
            "scalars": scalars}
    return meta, tensors


def restore_optimizer(model: nn.Module, saved: Optional[Dict[str, Any]],
                      optimizer: Union[torch.optim.Optimizer, Callable[..., torch.optim.Optimizer], None] = None
                      ) -> torch.optim.Optimizer:
    """Rebuilds an optimiser over ``model`` with the saved groups and state.

    Args:
        saved: ``{"meta": ..., "tensors": ...}`` from :func:`load_checkpoint` (None: fresh optimiser).
        optimizer: None (the saved class with the saved defaults), a factory ``f(params)``, or an
            optimiser; its groups are replaced by the saved groups (by parameter name).
    """
    fn = "restore_optimizer"
    if isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(model.parameters())
    elif saved is not None:
        cls = _import(saved["meta"]["class"])
        defaults = dict(saved["meta"]["defaults"])
        if isinstance(defaults.get("betas"), list):
            defaults["betas"] = tuple(defaults["betas"])
        opt = cls(model.parameters(), **defaults)
    else:
        raise ValueError(f"{fn}: give an optimizer (or factory) when the checkpoint holds no optimizer state")
    if saved is None:
        return opt
    meta, tensors = saved["meta"], saved["tensors"]
    by_name = dict(model.named_parameters())
    missing = [n for g in meta["param_groups"] for n in g["params"] if n not in by_name]
    if missing:
        raise ValueError(f"{fn}: the checkpoint's optimizer names parameters the model lacks: {missing[:5]}")
    # rebuild the groups by name, then load a torch-format state dict (torch casts device/dtype)
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


def save(model: nn.Module, path: Union[str, Path], *, history: Optional[GrowthHistory] = None,
         optimizer: Optional[torch.optim.Optimizer] = None, scheduler: Any = None,
         extra: Optional[Dict[str, Any]] = None) -> Path:
    """Writes a checkpoint folder (see the module docstring); returns its path.

    Args:
        model: a model with ``config()`` (the growth protocol).
        path: folder (created; files in it are overwritten).
        history: growth history to store alongside. optimizer / scheduler: their state, to resume.
        extra: any JSON-able metadata.

    Raises:
        TypeError: the model has no ``config()`` method.
    """
    fn = "save"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if not callable(getattr(model, "config", None)):
        raise TypeError(f"{fn}: model must have a config() method returning its constructor arguments (growth "
                        f"protocol, see topoderiv.models), got {type(model).__name__} without one")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    blocks = getattr(model, "blocks", None)
    arch: Dict[str, Any] = {
        "format": _FORMAT, "version": 1, "class": _class_path(model), "config": jsonable(model.config()),
        "blocks": [block_spec(b) for b in blocks] if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else None,
        "inserted": [i for i, b in enumerate(blocks) if getattr(b, "topoderiv_inserted", False)]
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) else [],
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "optimizer": None, "scheduler": None, "extra": jsonable(extra or {}),
        "torch": torch.__version__,
    }
    save_file(_tensors_for_file(model.state_dict()), str(path / "model.safetensors"))
    if optimizer is not None:
        meta, tensors = optimizer_state(model, optimizer)
        arch["optimizer"] = meta
        save_file(_tensors_for_file(tensors), str(path / "optimizer.safetensors"))
    elif (path / "optimizer.safetensors").exists():
        (path / "optimizer.safetensors").unlink()
    if scheduler is not None and hasattr(scheduler, "state_dict"):
        arch["scheduler"] = jsonable(scheduler.state_dict())
    if history is not None:
        history.to_json(path / "history.json")
    elif (path / "history.json").exists():
        (path / "history.json").unlink()
    (path / "model.json").write_text(json.dumps(arch, indent=1))
    return path


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    model: nn.Module
    history: Optional[GrowthHistory]
    optimizer_state: Optional[Dict[str, Any]]
    scheduler_state: Optional[Dict[str, Any]]
    meta: Dict[str, Any]


def _read_arch(path: Path, fn: str) -> Dict[str, Any]:
    f = path / "model.json"
    if not f.is_file():
        raise FileNotFoundError(f"{fn}: path must be a checkpoint folder written by topoderiv.save, got {str(path)!r} "
                                "without model.json")
    arch = json.loads(f.read_text())
    if arch.get("format") != _FORMAT:
        raise ValueError(f"{fn}: {f} is not a topoderiv checkpoint (format {arch.get('format')!r})")
    return arch


def load_checkpoint(path: Union[str, Path], *, device: Union[str, torch.device, None] = None) -> Checkpoint:
    """Loads model, history and optimiser/scheduler state from a checkpoint folder."""
    fn = "load_checkpoint"
    path = Path(path)
    arch = _read_arch(path, fn)
    cls = _import(arch["class"])
    model = cls(**arch["config"])
    specs = arch.get("blocks")
    if specs is not None:
        check_growable(model, fn)
        if len(model.blocks) != len(specs):
            raise ValueError(f"{fn}: {arch['class']}(**config) built {len(model.blocks)} blocks, the checkpoint has "
                             f"{len(specs)}: its config() must include the current depth")
        for i, spec in enumerate(specs):
            if spec is not None:
                model.blocks[i] = build_block(spec)
        for i in arch.get("inserted", []):
            model.blocks[i].topoderiv_inserted = True
    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict(state, strict=True, assign=True)
    frozen = set(arch.get("frozen", []))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    if device is not None:
        model.to(device)
    opt_state = None
    if arch.get("optimizer") is not None:
        opt_state = {"meta": arch["optimizer"], "tensors": load_file(str(path / "optimizer.safetensors"))}
    history = GrowthHistory.from_json(path / "history.json") if (path / "history.json").is_file() else None
    return Checkpoint(model, history, opt_state, arch.get("scheduler"), arch)


def load(path: Union[str, Path], *, device: Union[str, torch.device, None] = None) -> nn.Module:
    """Rebuilds the saved model (architecture + weights, same outputs) from a checkpoint folder."""
    return load_checkpoint(path, device=device).model
