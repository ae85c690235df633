"""The growth loop (METHOD.md section 4): train, score, insert, retrain.

Round 0 trains the initial network. Each later round asks the :class:`InsertionStrategy` for a
:class:`Proposal`, inserts it, and trains ``epochs_per_round`` epochs of every parameter (or only
the new block + head with ``freeze_existing=True``, Forward Thinking). The loop stops when

- the validation loss has not improved (by more than ``min_delta``) for ``patience`` rounds,
- ``max_rounds`` insertions were made, or ``max_depth`` blocks / ``max_params`` parameters reached,
- or the strategy proposes nothing (topological: no point with mu > 0, or no eps lowers the loss).

The optimiser is kept across rounds: the new block's parameters are appended to an existing
parameter group (group 0 by default), so Adam moments of existing parameters and the number of
param groups (hence any LR scheduler) are untouched. The scheduler steps once per epoch.

Strategy interface (for the baselines):

    class MyStrategy(InsertionStrategy):
        name = "mine"
        def propose(self, grower) -> Optional[Proposal]:
            model = grower.model           # also: grower.train_data, grower.loss_fn,
            ...                            # grower.score_data(), grower.generator (seeded)
            return Proposal(point, weight=W, bias=b, eps=1.0)   # inserts eps * [W | b]

A proposal either gives ``weight [n, d_in]`` / ``bias [n]`` for ``model.new_block(point)`` (the
inserted parameters are ``eps * weight`` and ``eps * bias``; ``None`` means zeros), or a ready
``block`` module that is inserted as is. ``strategy.last_info`` (a dict) may carry what the
strategy measured (e.g. ``{"mu": {point: mu}}``) when it proposes nothing.

Compute: every round records its FLOPs and wall times (:mod:`topoderiv.growth.compute`). A
strategy reports what proposing cost in ``info["compute"]`` (``Proposal.info``, or
``last_info`` when it proposes nothing): ``{"score_flops": int, "search_flops": int,
"counting_time": seconds spent only on counting, left out of the round's insert_time}``; a
strategy that reports nothing spent 0 FLOPs. A last proposal that inserted nothing is carried
by the next round recorded (``history.meta["stop_compute"]`` until then).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..data import is_batch, take_batches
from ..method.distributed import communicator, current_group, ddp_settings, is_ddp, process_group, wrap_ddp
from ..sites import check_growable, check_point, depth
from ..sites.linear import check_matrix_phi
from .checkpoint import load_checkpoint, restore_optimizer, save
from .compute import (
    STRATEGY_COMPUTE_KEY,
    BatchProbe,
    optimizer_supported,
    training_step_flops,
    warn_unsupported_optimizer,
)
from .history import GrowthHistory, RoundRecord, count_parameters, jsonable
from .insertion import insert, insert_block
from .strategies import InsertionStrategy, Proposal, make_strategy, strategy_from_config
from .training import evaluate, fit

__all__ = ["Grower", "grow", "adopt_parameters", "deferred_interrupt", "RESUME_KEY"]

#: key of the resume state in a checkpoint's ``extra`` metadata (its tensors, e.g. the RNG states as
#: uint8 tensors, are the checkpoint's ``tensors``, keyed ``"resume.<path>"``)
RESUME_KEY = "resume"


# ------------------------------------------------------------------------------------------------
# optimiser bookkeeping


def adopt_parameters(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], group: int = 0) -> None:
    """Appends ``params`` to ``optimizer.param_groups[group]`` (existing state untouched).

    New parameters get fresh state on their first step (Adam's lazy init); the number of groups
    does not change, so LR schedulers keep working.
    """
    params = [p for p in params]
    present = {id(p) for g in optimizer.param_groups for p in g["params"]}
    new = [p for p in params if id(p) not in present]
    if not 0 <= group < len(optimizer.param_groups):
        raise ValueError(f"adopt_parameters: group must be in [0, {len(optimizer.param_groups) - 1}], got {group}")
    optimizer.param_groups[group]["params"].extend(new)


def _current_lr(optimizer: torch.optim.Optimizer) -> Optional[float]:
    try:
        return float(optimizer.param_groups[0]["lr"])
    except (KeyError, IndexError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------
# what an exact resume needs besides model, optimiser, scheduler and history


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Holds back SIGINT (Ctrl-C) while the block runs, then delivers it once the block is done.

    Used around checkpoint writes, so an interrupt never leaves a half-written checkpoint. Outside
    the main thread (where Python cannot install signal handlers) the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: List[Tuple[int, Any]] = []
    try:
        old = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    except (ValueError, OSError):  # pragma: no cover - e.g. a sub-interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old if old is not None else signal.default_int_handler)
        if received:
            if callable(old) and old is not signal.default_int_handler:
                old(*received[0])
            elif old is not signal.SIG_IGN:
                raise KeyboardInterrupt


def _rng_state(generator: torch.Generator) -> Dict[str, Any]:
    """torch CPU (+ every visible CUDA device), the grower's generator, Python ``random``, numpy."""
    version, internal, gauss = random.getstate()
    state: Dict[str, Any] = {"torch": torch.get_rng_state(), "generator": generator.get_state(),
                             "python": [version, torch.tensor(internal, dtype=torch.int64), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    np = sys.modules.get("numpy")  # only when something imported numpy: else nothing can have used it
    if np is not None:
        st = np.random.get_state(legacy=False)
        state["numpy"] = {"bit_generator": st["bit_generator"],
                          "key": torch.from_numpy(st["state"]["key"].astype(np.int64)),
                          "pos": int(st["state"]["pos"]), "has_gauss": int(st["has_gauss"]),
                          "gauss": float(st["gauss"])}
    return state


def _set_rng_state(state: Dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), gauss))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        if n < len(cuda):
            warnings.warn(f"Grower: the checkpoint holds the RNG states of {len(cuda)} CUDA devices, {n} are visible: "
                          f"the states of devices {n}..{len(cuda) - 1} are not restored", stacklevel=3)
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], i)
    np_state = state.get("numpy")
    np = sys.modules.get("numpy")
    if np_state is not None:
        if np is None:
            import numpy as np  # the run used numpy
        np.random.set_state({"bit_generator": np_state["bit_generator"],
                             "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                             "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})


def _generator_paths(data: Any) -> List[Tuple[str, torch.Generator]]:
    """The ``torch.Generator`` objects that order a DataLoader-like object's batches, by attribute path."""
    found: List[Tuple[str, torch.Generator]] = []
    seen = set()
    for path in ("generator", "sampler.generator", "batch_sampler.sampler.generator"):
        obj = data
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.Generator) and id(obj) not in seen:
            seen.add(id(obj))
            found.append((path, obj))
    return found


def _data_order_state(data: Any) -> Optional[Dict[str, Any]]:
    """The data-order state of a loader: its ``state_dict()`` (e.g.
    :class:`topoderiv.experiments.tasks.Batches`) or the states of its ``torch.Generator`` objects (a
    DataLoader's ``generator=``); None when it has none (a list of batches, or a DataLoader shuffled
    by the global RNG, which is saved anyway)."""
    if data is None or is_batch(data) or isinstance(data, (list, tuple)):
        return None
    if callable(getattr(data, "state_dict", None)) and callable(getattr(data, "load_state_dict", None)):
        return {"kind": "state_dict", "state": data.state_dict()}
    gens = _generator_paths(data)
    if gens:
        return {"kind": "generators", "paths": [p for p, _ in gens], "states": [g.get_state() for _, g in gens]}
    return None


def _restore_data_order(name: str, data: Any, saved: Optional[Dict[str, Any]]) -> None:
    if saved is None:
        return
    if saved["kind"] == "state_dict":
        if not callable(getattr(data, "load_state_dict", None)):
            warnings.warn(f"Grower: the checkpoint holds the data order of {name}_data (a loader's state_dict), but "
                          f"the {name}_data given ({type(data).__name__}) has no load_state_dict: its batches start "
                          "in a fresh order and the resumed run will not repeat the interrupted one exactly",
                          stacklevel=3)
            return
        data.load_state_dict(saved["state"])
        return
    gens = dict(_generator_paths(data))
    missing = [p for p in saved["paths"] if p not in gens]
    if missing:
        warnings.warn(f"Grower: the checkpoint holds the data-order generator {name}_data.{missing[0]}, but the "
                      f"{name}_data given ({type(data).__name__}) has none: its batches start in a fresh order and "
                      "the resumed run will not repeat the interrupted one exactly", stacklevel=3)
    for path, st in zip(saved["paths"], saved["states"]):
        if path in gens:
            gens[path].set_state(st)


def _pack(obj: Any, tensors: Dict[str, Tensor], prefix: str) -> Any:
    """JSON-able copy of ``obj`` with every tensor moved to ``tensors`` (replaced by ``{"__tensor__": key}``)."""
    if isinstance(obj, Tensor):
        tensors[prefix] = obj.detach().to("cpu").clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _pack(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"Grower.save: the resume state must hold tensors, dicts, lists and numbers, got "
                    f"{type(obj).__name__} at {prefix!r}")


def _unpack(obj: Any, tensors: Dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            if obj["__tensor__"] not in tensors:
                raise ValueError(f"Grower.from_checkpoint: the checkpoint's tensors must hold the resume state's "
                                 f"{obj['__tensor__']!r}, got only {sorted(tensors)[:5]}")
            return tensors[obj["__tensor__"]]
        return {k: _unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------
# the loop


def _under_group(method: Callable[..., Any]) -> Callable[..., Any]:
    """Runs a Grower method with the grower's group as the current process group, so that scoring,
    the eps search and evaluation (``group=None``) reduce over it, and over nothing when the grower
    runs on one process."""

    @functools.wraps(method)
    def wrapper(self: "Grower", *args: Any, **kwargs: Any) -> Any:
        with process_group(False if self.group is None else self.group):
            return method(self, *args, **kwargs)

    return wrapper


class Grower:
    """Grows a model in depth by repeated train / propose / insert rounds.

    Args:
        model: a growable model (:mod:`topoderiv.models`), modified in place.
        optimizer: a ``torch.optim.Optimizer`` over ``model``'s parameters, or a factory
            ``f(params) -> Optimizer`` (called once on ``model.parameters()``).
        train_data, val_data: one ``(x, y)`` batch or re-iterable batches (DataLoader, list).
        loss_fn: batch-mean loss ``loss_fn(output, y) -> scalar``.
        strategy: an :class:`InsertionStrategy` (e.g. ``TopologicalStrategy(rule="all")``, with its
            own settings: rule, route, eps grid, ...) or a registered strategy name
            (:data:`topoderiv.growth.strategies.STRATEGIES`, default ``"topological"``).
        epochs_per_round: training epochs after each insertion. initial_epochs: epochs of round 0
            (default ``epochs_per_round``).
        max_rounds: maximum number of insertions. max_depth: cap on the number of blocks in the
            site containers.
        max_params: cap on the parameter count (no insertion once reached).
        patience: stop after this many rounds without a validation improvement > ``min_delta``.
        grow_patience: the reference code's when-to-grow rule: None (default) inserts every round;
            an int ``g`` inserts only after ``g`` rounds without validation improvement (rounds in
            between only train), up to ``max_depth``; ``patience`` must then exceed ``g``.
        max_total_rounds: cap on the rounds after round 0, training-only rounds included.
        score_batches: number of training batches the strategy scores (default all).
        device: moves the model there (data batches follow the model's device).
        seed: ``torch.manual_seed(seed)`` when :meth:`run` starts a fresh run, and a seeded
            ``self.generator`` for strategies (None: leave the global RNG alone). A run resumed by
            :meth:`from_checkpoint` is not reseeded: the saved RNG states are restored instead.
        progress: tqdm bars (rounds, and epochs within a round).
        scheduler: an LR scheduler on ``optimizer`` or a factory ``f(optimizer)``; steps per epoch.
        test_data, test_metric: optional held-out data and batch-mean metric recorded per round.
        freeze_existing: after an insertion, train only the new block and the head (``head_attr``)
            (Forward Thinking); earlier parameters get ``requires_grad = False``.
        callbacks: ``f(grower, record)`` called after every round, after the round's checkpoint is
            written (a callback that raises does not lose the round).
        checkpoint_dir: save the checkpoint there after every round (:meth:`save`: model, history,
            optimiser, scheduler and the resume state; resume with :meth:`from_checkpoint`).
        keep_best: keep a deep copy of the model with the best validation loss in ``best_model``
            (not in checkpoints: after a resume it is the model when the last round is the best,
            else None until a later round improves on the best).
        history: a history to continue (resume).
        grad_clip: gradient-norm clip for training.
        val_every_epoch: evaluate the validation loss after every epoch (``RoundRecord.val_curve``;
            what :func:`topoderiv.growth.compute.compute_to_target` reads), not only at the end of
            every round. Costs one validation pass per epoch (recorded in ``eval_time``).
        group: data parallelism (:mod:`topoderiv.method.distributed`): ``None`` (default) the
            current process group (torch.distributed's default group when initialised), ``False``
            this process only, or a ProcessGroup. ``model`` may also be a
            ``DistributedDataParallel`` wrapper (its group is used). Under a group of several
            ranks, construct and run the Grower on EVERY rank with the same settings and each
            rank's own shard of the training data (:func:`topoderiv.data.shard`): training is
            DDP (the grower wraps a plain model itself, and wraps the grown model again after
            every insertion, since DDP does not see parameters added after it was built; the
            optimiser adopts the new parameters on every rank); scoring and the eps search
            all-reduce, so every rank inserts the same block at the same point with the same eps;
            losses are over all ranks; checkpoints are written by rank 0 only (every rank waits
            for the write), resume by calling :meth:`from_checkpoint` on every rank. Callbacks run
            on every rank (test ``grower.is_writer`` to write files once). ``self.model`` is the
            plain model; ``self.train_model`` the DDP wrapper that trains it.
        count_flops: record the compute of every round (``train_flops``, ``optimizer_flops``,
            ``score_flops``, ``search_flops``; :mod:`topoderiv.growth.compute`). The first epoch of
            each round runs under a FLOP counter (same results, a little slower); False records
            None. Wall times are recorded either way.
    """

    def __init__(self, model: nn.Module, optimizer: Union[torch.optim.Optimizer, Callable[..., torch.optim.Optimizer]],
                 train_data: Any, val_data: Any, loss_fn: Callable[[Tensor, Any], Tensor], *,
                 strategy: Union[str, InsertionStrategy] = "topological", epochs_per_round: int = 10,
                 initial_epochs: Optional[int] = None, max_rounds: int = 10, max_depth: Optional[int] = None,
                 max_params: Optional[int] = None, patience: int = 2, min_delta: float = 0.0,
                 grow_patience: Optional[int] = None, max_total_rounds: Optional[int] = None, score_batches: Optional[int] = None,
                 device: Union[str, torch.device, None] = None, seed: Optional[int] = 0, progress: bool = True,
                 scheduler: Any = None, test_data: Any = None,
                 test_metric: Optional[Callable[[Tensor, Any], Tensor]] = None, freeze_existing: bool = False,
                 head_attr: str = "head", callbacks: Sequence[Callable[["Grower", RoundRecord], None]] = (),
                 checkpoint_dir: Union[str, Path, None] = None, keep_best: bool = False,
                 history: Optional[GrowthHistory] = None, grad_clip: Optional[float] = None,
                 val_every_epoch: bool = False, count_flops: bool = True, group: Any = None) -> None:
        fn = "Grower"
        for name, val in (("val_every_epoch", val_every_epoch), ("count_flops", count_flops)):
            if not isinstance(val, bool):
                raise TypeError(f"{fn}: {name} must be a bool, got {type(val).__name__} {val!r}")
        ddp = None
        if is_ddp(model):  # train the wrapper, grow the module inside it
            ddp, model = model, model.module
            group = ddp.process_group
        check_growable(model, fn)
        if not callable(loss_fn):
            raise TypeError(f"{fn}: loss_fn must be callable, got {type(loss_fn).__name__}")
        for name, val, lo in (("epochs_per_round", epochs_per_round, 0), ("max_rounds", max_rounds, 0),
                              ("patience", patience, 1)):
            if isinstance(val, bool) or not isinstance(val, int) or val < lo:
                raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {val!r}")
        for name, val in (("initial_epochs", initial_epochs), ("max_depth", max_depth), ("max_params", max_params),
                          ("score_batches", score_batches), ("max_total_rounds", max_total_rounds)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
                raise ValueError(f"{fn}: {name} must be None or an int >= 0, got {val!r}")
        if grow_patience is not None:
            if isinstance(grow_patience, bool) or not isinstance(grow_patience, int) or grow_patience < 1:
                raise ValueError(f"{fn}: grow_patience must be None or an int >= 1, got {grow_patience!r}")
            if patience <= grow_patience:
                raise ValueError(f"{fn}: patience must exceed grow_patience (growth waits grow_patience rounds without "
                                 f"improvement), got patience={patience}, grow_patience={grow_patience}")
        if device is not None:
            model.to(device)
        self.model = model
        # data parallel: the group (None: one process), how to wrap the model, the wrapper
        self.group = None if communicator(group, fn) is None else current_group(group, fn)
        self._ddp_settings = ddp_settings(ddp) if ddp is not None else None
        self.train_model: nn.Module = model
        if self.group is not None:
            self.train_model = ddp if ddp is not None else wrap_ddp(model, group=self.group)
        if isinstance(optimizer, torch.optim.Optimizer):
            self.optimizer = optimizer
        elif callable(optimizer):
            self.optimizer = optimizer(model.parameters())
            if not isinstance(self.optimizer, torch.optim.Optimizer):
                raise TypeError(f"{fn}: optimizer factory must return a torch.optim.Optimizer, got "
                                f"{type(self.optimizer).__name__}")
        else:
            raise TypeError(f"{fn}: optimizer must be a torch.optim.Optimizer or a factory f(params), got "
                            f"{type(optimizer).__name__}")
        if scheduler is not None and not hasattr(scheduler, "step") and callable(scheduler):
            scheduler = scheduler(self.optimizer)
        self.scheduler = scheduler
        self.train_data, self.val_data, self.loss_fn = train_data, val_data, loss_fn
        self.test_data, self.test_metric = test_data, test_metric
        self.strategy = make_strategy(strategy, fn)
        self.epochs_per_round = epochs_per_round
        self.initial_epochs = epochs_per_round if initial_epochs is None else initial_epochs
        self.max_rounds, self.max_depth, self.max_params = max_rounds, max_depth, max_params
        self.patience, self.min_delta, self.grow_patience = patience, float(min_delta), grow_patience
        self.max_total_rounds = max_total_rounds
        self.score_batches, self.seed, self.progress = score_batches, seed, progress
        self.freeze_existing, self.head_attr = freeze_existing, head_attr
        self.callbacks = list(callbacks)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.keep_best, self.best_model = keep_best, None
        self.grad_clip = grad_clip
        self.val_every_epoch, self.count_flops = val_every_epoch, count_flops
        self._optimizer_counted = optimizer_supported(self.optimizer)
        if count_flops and not self._optimizer_counted:
            warn_unsupported_optimizer(self.optimizer, fn)
        self.generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self.history = history if history is not None else GrowthHistory()
        # the global seed the first run() sets; None after a resume (the saved states are restored).
        # A history given without a resume state (an old checkpoint) reseeds as before: seed + rounds.
        self._pending_seed = None if seed is None else seed + len(self.history.rounds)
        self.history.meta.setdefault("model_class", type(model).__name__)
        if self.group is not None:
            self.history.meta["processes"] = self.world_size
        self.history.meta["strategy"] = self.strategy.config()
        self.history.meta["settings"] = self.settings()

    # -- helpers for strategies ----------------------------------------------------------------

    def settings(self) -> Dict[str, Any]:
        """JSON-able loop settings (saved in the history; defaults on resume)."""
        return {"epochs_per_round": self.epochs_per_round, "initial_epochs": self.initial_epochs,
                "max_rounds": self.max_rounds, "max_depth": self.max_depth, "max_params": self.max_params,
                "patience": self.patience, "min_delta": self.min_delta, "grow_patience": self.grow_patience,
                "max_total_rounds": self.max_total_rounds,
                "score_batches": self.score_batches,
                "seed": self.seed, "freeze_existing": self.freeze_existing, "head_attr": self.head_attr,
                "keep_best": self.keep_best, "grad_clip": self.grad_clip, "progress": self.progress,
                "val_every_epoch": self.val_every_epoch, "count_flops": self.count_flops}

    def score_data(self) -> List[Any]:
        """The training batches used for scoring and the eps search (first ``score_batches``)."""
        return list(take_batches(self.train_data, self.score_batches))

    @property
    def depth(self) -> int:
        """Blocks in the model's site containers."""
        return depth(self.model)

    @property
    def world_size(self) -> int:
        """Processes that run this growth together (1 without a process group)."""
        return 1 if self.group is None else torch.distributed.get_world_size(self.group)

    @property
    def is_writer(self) -> bool:
        """True on the process that writes files: rank 0 of the group (always True without one)."""
        return self.group is None or torch.distributed.get_rank(self.group) == 0

    def _rewrap(self) -> None:
        """A new DDP wrapper after the model grew (DDP does not see parameters added after it was
        built); building it broadcasts rank 0's parameters and checks the ranks' shapes agree."""
        if self.group is not None:
            self.train_model = wrap_ddp(self.model, self._ddp_settings, group=self.group)

    # -- one insertion ---------------------------------------------------------------------------

    def apply(self, proposal: Proposal) -> nn.Module:
        """Inserts ``proposal`` into the model and the optimiser; returns the new block.

        The model is untouched when the proposal is invalid (errors come from :func:`insert`).
        """
        fn = "Grower.apply"
        if not isinstance(proposal, Proposal):
            raise TypeError(f"{fn}: strategy.propose must return a Proposal or None, got {type(proposal).__name__}")
        site = check_point(fn, self.model, proposal.point)
        if proposal.block is not None:
            if not isinstance(proposal.block, nn.Module):
                raise TypeError(f"{fn}: proposal.block must be an nn.Module or None, got {type(proposal.block).__name__}")
            ref = next(self.model.parameters())
            insert_block(self.model, site.point, proposal.block.to(device=ref.device, dtype=ref.dtype))
        else:
            phi = proposal.phi
            if phi is None:
                phi = self._matrix_phi(site, proposal, fn)
            insert(self.model, site.point, phi, proposal.eps)
        block = site.container[site.index]
        if self.freeze_existing:
            keep = {id(p) for p in block.parameters()}
            head = getattr(self.model, self.head_attr, None)
            if isinstance(head, nn.Module):
                keep |= {id(p) for p in head.parameters()}
            for p in self.model.parameters():
                p.requires_grad_(id(p) in keep)
        adopt_parameters(self.optimizer, block.parameters())
        self._rewrap()
        return block

    @staticmethod
    def _matrix_phi(site: Any, proposal: Proposal, fn: str) -> Tensor:
        """``[W | b]`` from ``proposal.weight`` / ``proposal.bias`` (None = zeros) for the paper's blocks."""
        proto = site.new_block()
        lin = getattr(proto, "linear", None) or getattr(proto, "conv", None)
        if lin is None:
            raise TypeError(f"{fn}: a proposal for a {site.kind} site must give phi (a dict of parameters) or a block")
        n = lin.weight.shape[0]
        d = lin.weight[0].numel()
        w = proposal.weight if proposal.weight is not None else torch.zeros(n, d)
        if not isinstance(w, Tensor) or w.dim() != 2 or tuple(w.shape) != (n, d):
            raise ValueError(f"{fn}: proposal.weight must be a tensor [n, d_in] = [{n}, {d}] or None, got "
                             f"{list(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        w = w.detach()
        if lin.bias is None:
            return w
        b = proposal.bias if proposal.bias is not None else torch.zeros(n, dtype=w.dtype, device=w.device)
        if not isinstance(b, Tensor) or b.dim() != 1 or b.shape[0] != n:
            raise ValueError(f"{fn}: proposal.bias must be a tensor [n] = [{n}] or None, got "
                             f"{list(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
        return check_matrix_phi(fn, torch.cat([w, b.detach().to(w)[:, None]], dim=1), n, d + 1)

    # -- the loop --------------------------------------------------------------------------------

    def _evaluate(self, trained: Optional["_Trained"] = None) -> tuple:
        """Validation loss (the last per-epoch value when recorded: the same model) and test metric."""
        t0 = time.perf_counter()
        if trained is not None and trained.val_curve:
            val = trained.val_curve[-1]
        else:
            val = evaluate(self.model, self.val_data, self.loss_fn)
        test = None
        if self.test_data is not None:
            test = evaluate(self.model, self.test_data, self.test_metric or self.loss_fn)
        if trained is not None:
            trained.eval_time += time.perf_counter() - t0
        return val, test

    def _train_round(self, epochs: int, r: int, desc: Optional[str] = None) -> "_Trained":
        """``epochs`` epochs of :func:`fit`, one call per epoch (the same steps as one call for all),
        the wall time of each, the validation loss after each one when ``val_every_epoch``, and the
        round's FLOPs: the first batch of the first epoch (kept by a :class:`BatchProbe`) re-run on a
        copy of the model under the counter (:func:`training_step_flops`, outside the timed epoch),
        scaled to the epoch's samples and steps, times ``epochs``."""
        out = _Trained()
        bar = None
        if self.progress and epochs:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs, desc=desc or f"round {r}", leave=False)
        probe = BatchProbe(self.model) if self.count_flops and epochs else None
        try:
            for e in range(epochs):
                t0 = time.perf_counter()
                losses = fit(self.train_model, self.optimizer, self.train_data, self.loss_fn, 1,
                             scheduler=self.scheduler, grad_clip=self.grad_clip)
                out.epoch_times.append(time.perf_counter() - t0)
                out.curve.extend(losses)
                if probe is not None:
                    probe.remove()
                    self._count_epoch(probe, epochs, out)
                    probe = None
                if self.val_every_epoch:
                    t0 = time.perf_counter()
                    out.val_curve.append(evaluate(self.model, self.val_data, self.loss_fn))
                    out.eval_time += time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4g}")
        finally:
            if probe is not None:
                probe.remove()
            if bar is not None:
                bar.close()
        if self.count_flops and epochs == 0:
            out.train_flops = 0
            out.optimizer_flops = 0 if self._optimizer_counted else None
        return out

    def _count_epoch(self, probe: BatchProbe, epochs: int, out: "_Trained") -> None:
        """The round's training FLOPs from one epoch's probe (see :meth:`_train_round`)."""
        if probe.args is None or probe.first_batch == 0:
            out.train_flops, out.optimizer_flops = 0, (0 if self._optimizer_counted else None)
            return
        clip = 3 if self.grad_clip is not None else 0  # clip_grad_norm_: square + add (the norm), scale
        fb, opt, _ = training_step_flops(self.model, probe.args, probe.kwargs,
                                         self.optimizer if self._optimizer_counted else None, extra_per_element=clip)
        per_epoch_fb = fb * probe.samples // probe.first_batch  # matrix products: linear in the batch
        per_epoch_opt = opt * probe.calls  # one optimiser step per batch
        out.train_flops = (per_epoch_fb + per_epoch_opt) * epochs
        out.optimizer_flops = per_epoch_opt * epochs if self._optimizer_counted else None

    def _strategy_compute(self, info: Dict[str, Any]) -> Dict[str, Optional[int]]:
        """The FLOPs a strategy reports for proposing (``info["compute"]``); 0 when it reports none."""
        if not self.count_flops:
            return {"score_flops": None, "search_flops": None}
        comp = info.get(STRATEGY_COMPUTE_KEY) or {}
        return {k: int(comp.get(k) or 0) for k in ("score_flops", "search_flops")}

    def _take_pending(self) -> Dict[str, Any]:
        """The compute of a last proposal that inserted nothing (spent before the next round's training)."""
        return self.history.meta.pop("stop_compute", None) or {}

    def _compute_fields(self, trained: "_Trained", proposed: Dict[str, Optional[int]],
                        pending: Dict[str, Any]) -> Dict[str, Any]:
        fields = {"val_curve": trained.val_curve, "train_flops": trained.train_flops,
                  "optimizer_flops": trained.optimizer_flops, "train_time": sum(trained.epoch_times),
                  "eval_time": trained.eval_time, "epoch_times": trained.epoch_times}
        for key in ("score_flops", "search_flops"):
            v = proposed.get(key)
            if self.count_flops:
                v = int(v or 0) + int(pending.get(key) or 0)
            fields[key] = v
        return fields

    def _rounds_since_best(self) -> int:
        best = math.inf
        since = 0
        for rec in self.history.rounds:
            if rec.val_loss < best - self.min_delta:
                best, since = rec.val_loss, 0
            else:
                since += 1
        return since

    def _finish_round(self, rec: RoundRecord) -> None:
        self.history.rounds.append(rec)
        if self.keep_best and self.history.best_round is rec:
            self.best_model = copy.deepcopy(self.model)
        if self.checkpoint_dir is not None:  # before the callbacks: one that raises does not lose the round
            self.save(self.checkpoint_dir)
        for cb in self.callbacks:
            cb(self, rec)

    def _stop_reason(self) -> Optional[str]:
        done = len(self.history.insertions)
        if self.max_total_rounds is not None and len(self.history.rounds) > self.max_total_rounds:
            return f"max_total_rounds ({self.max_total_rounds}) reached"
        if done >= self.max_rounds:
            return f"max_rounds ({self.max_rounds}) reached"
        if self.max_depth is not None and self.depth >= self.max_depth:
            return f"max_depth ({self.max_depth}) reached"
        if self.max_params is not None and count_parameters(self.model) >= self.max_params:
            return f"max_params ({self.max_params}) reached"
        if self._rounds_since_best() >= self.patience:
            return f"validation loss did not improve for {self.patience} rounds"
        return None

    @_under_group
    def run(self) -> GrowthHistory:
        """Runs (or continues) the growth; returns the history (``model`` is grown in place).

        A fresh run starts with ``torch.manual_seed(seed)``. A run resumed by :meth:`from_checkpoint`
        starts from the restored RNG and data-order states, and calling ``run()`` again (e.g. after
        raising ``max_rounds``) continues from the current ones, so both repeat what one
        uninterrupted run would have done.
        """
        if self._pending_seed is not None:
            torch.manual_seed(self._pending_seed)
            self._pending_seed = None
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_rounds + 1, initial=len(self.history.rounds), desc="grow", unit="round")
        self.history.meta.pop("stop_reason", None)
        try:
            if not self.history.rounds:
                t0 = time.perf_counter()
                tr = self._train_round(self.initial_epochs, 0)
                val, test = self._evaluate(tr)
                curve = tr.curve
                rec = RoundRecord(0, self.initial_epochs, curve[-1] if curve else evaluate(self.model, self.train_data, self.loss_fn),
                                  val, count_parameters(self.model), self.depth, time.perf_counter() - t0, curve, test,
                                  lr=_current_lr(self.optimizer),
                                  **self._compute_fields(tr, self._strategy_compute({}), self._take_pending()))
                self._finish_round(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(val=f"{val:.4g}", depth=self.depth)
            while True:
                reason = self._stop_reason()
                if reason is not None:
                    break
                r = len(self.history.rounds)
                t0 = time.perf_counter()
                if self.grow_patience is not None and self._rounds_since_best() < self.grow_patience:
                    # the reference code's rule: only train until the validation loss stalls
                    pending = self._take_pending()
                    tr = self._train_round(self.epochs_per_round, r)
                    val, test = self._evaluate(tr)
                    curve = tr.curve
                    rec = RoundRecord(r, self.epochs_per_round, curve[-1] if curve else math.nan, val,
                                      count_parameters(self.model), self.depth, time.perf_counter() - t0, curve, test,
                                      lr=_current_lr(self.optimizer), insert_time=float(pending.get("time", 0.0)),
                                      info={"phase": "train"},
                                      **self._compute_fields(tr, self._strategy_compute({}), pending))
                    self._finish_round(rec)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(val=f"{val:.4g}", depth=self.depth)
                    continue
                proposal = self.strategy.propose(self)
                if proposal is None:
                    info = getattr(self.strategy, "last_info", {}) or {}
                    reason = "strategy proposed no insertion" + (f" ({info['reason']})" if "reason" in info else "")
                    self.history.meta["last_scores"] = jsonable(info)
                    # what the failed proposal cost: carried by the next round (compare's finish)
                    spent = self._strategy_compute(info)
                    prev = self.history.meta.get("stop_compute") or {}
                    self.history.meta["stop_compute"] = {
                        **{k: (None if v is None else v + int(prev.get(k) or 0)) for k, v in spent.items()},
                        "time": float(prev.get("time", 0.0)) + time.perf_counter() - t0 - _counting_time(info)}
                    break
                self.apply(proposal)
                pending = self._take_pending()
                t_insert = time.perf_counter() - t0 - _counting_time(proposal.info) + float(pending.get("time", 0.0))
                tr = self._train_round(self.epochs_per_round, r)
                val, test = self._evaluate(tr)
                curve = tr.curve
                train_loss = curve[-1] if curve else evaluate(self.model, self.train_data, self.loss_fn)
                mu = {int(k): float(v) for k, v in proposal.info.get("mu", {}).items()}
                info = {k: v for k, v in proposal.info.items() if k != "mu"}
                rec = RoundRecord(r, self.epochs_per_round, train_loss, val, count_parameters(self.model), self.depth,
                                  time.perf_counter() - t0, curve, test, proposal.point,
                                  None if proposal.block is not None else float(proposal.eps), mu,
                                  _current_lr(self.optimizer), t_insert, jsonable(info),
                                  **self._compute_fields(tr, self._strategy_compute(proposal.info), pending))
                self._finish_round(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(val=f"{val:.4g}", depth=self.depth)
        finally:
            if bar is not None:
                bar.close()
        self.history.meta["stop_reason"] = reason
        if self.checkpoint_dir is not None:
            self.save(self.checkpoint_dir)
        return self.history

    @_under_group
    def finish(self, epochs: int) -> RoundRecord:
        """Trains the current network ``epochs`` more epochs, recorded as a last round with
        ``info["phase"] == "finish"`` (how :func:`topoderiv.experiments.compare.run_method` spends
        the rest of a budget once growth stopped); checkpoint and callbacks as after any round.

        The round carries the compute of a last proposal that inserted nothing (scoring that found
        no point, in ``score_flops``/``search_flops`` and ``insert_time``).

        Raises:
            ValueError: ``epochs`` is not an int >= 0.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise ValueError(f"Grower.finish: epochs must be an int >= 0, got {epochs!r}")
        r = len(self.history.rounds)
        t0 = time.perf_counter()
        tr = self._train_round(epochs, r, desc="finish")
        val, test = self._evaluate(tr)
        pending = self._take_pending()
        curve = tr.curve
        rec = RoundRecord(r, epochs, curve[-1] if curve else evaluate(self.model, self.train_data, self.loss_fn), val,
                          count_parameters(self.model), self.depth, time.perf_counter() - t0, curve, test,
                          lr=_current_lr(self.optimizer), insert_time=float(pending.get("time", 0.0)),
                          info={"phase": "finish", "reason": self.history.stop_reason},
                          **self._compute_fields(tr, self._strategy_compute({}), pending))
        self._finish_round(rec)
        return rec

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> Path:
        """Saves a checkpoint of the run to the folder ``path`` (resume with :meth:`from_checkpoint`).

        It holds the model, the history, the optimiser and scheduler state and :meth:`resume_state`
        (RNG states, data order, counters). ``best_model`` (``keep_best``) is not saved. A Ctrl-C
        during the write is delivered once the write is complete.
        """
        tensors: Dict[str, Tensor] = {}
        state = _pack(self.resume_state(), tensors, RESUME_KEY)
        comm = None if self.group is None else communicator(self.group, "Grower.save")
        failed: Optional[Exception] = None
        out = Path(path)
        if self.is_writer:  # rank 0 writes; the others wait for it (and learn if it failed)
            try:
                with deferred_interrupt():
                    out = save(self.model, path, history=self.history, optimizer=self.optimizer,
                               scheduler=self.scheduler, extra={RESUME_KEY: state}, tensors=tensors)
            except Exception as err:
                if comm is None:
                    raise
                failed = err
        if comm is not None:
            comm.agree({"save": True}, failed)  # the path may differ: only rank 0 writes
        return out

    def resume_state(self) -> Dict[str, Any]:
        """What an exact resume needs besides model, optimiser, scheduler and history.

        ``{"version", "rounds_done", "epochs_done", "rng", "data"}``: the counters (rounds and
        epochs trained; checkpoints fall between rounds, so no pass is in progress), the RNG states
        (torch CPU, every visible CUDA device, ``self.generator``, Python ``random``, numpy's global
        RNG when numpy is imported) and the data order of ``train_data``, ``val_data`` and
        ``test_data``: a loader's ``state_dict()`` when it has ``state_dict``/``load_state_dict``
        (:class:`topoderiv.experiments.tasks.Batches`, torchdata's StatefulDataLoader), else the states of the
        ``torch.Generator`` objects at ``loader.generator``, ``loader.sampler.generator`` and
        ``loader.batch_sampler.sampler.generator`` (a DataLoader with ``generator=``). A DataLoader
        without a generator shuffles from the global torch RNG, which is restored anyway.

        Not captured: RNG states inside DataLoader worker processes (``persistent_workers=True``;
        without persistent workers they are reseeded from the loader's generator every epoch),
        other generators of the user's own (a dataset's private ``torch.Generator``, a strategy's
        state), and a loader interrupted in the middle of a pass (checkpoints fall between rounds).
        """
        return {"version": 1, "rounds_done": len(self.history.rounds),
                "epochs_done": sum(r.epochs for r in self.history.rounds),
                "rng": _rng_state(self.generator),
                "data": {name: _data_order_state(d) for name, d in
                         (("train", self.train_data), ("val", self.val_data), ("test", self.test_data))}}

    def load_resume_state(self, state: Dict[str, Any]) -> None:
        """Restores what :meth:`resume_state` captured (the next :meth:`run` is then not reseeded).

        Raises:
            TypeError: ``state`` is not a dict. ValueError: its round count differs from the history's
                (the history and the state come from different saves).
        """
        fn = "Grower.load_resume_state"
        if not isinstance(state, dict):
            raise TypeError(f"{fn}: state must be a dict from Grower.resume_state(), got {type(state).__name__}")
        if state.get("version") != 1:
            raise ValueError(f"{fn}: state must be a version-1 resume state, got version {state.get('version')!r}")
        if state["rounds_done"] != len(self.history.rounds):
            raise ValueError(f"{fn}: the state's rounds_done must equal the history's round count (both from one "
                             f"save), got rounds_done={state['rounds_done']} but the history has "
                             f"{len(self.history.rounds)} rounds")
        _set_rng_state(state["rng"], self.generator)
        data = state.get("data") or {}
        for name, d in (("train", self.train_data), ("val", self.val_data), ("test", self.test_data)):
            _restore_data_order(name, d, data.get(name))
        self._pending_seed = None

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], train_data: Any, val_data: Any,
                        loss_fn: Callable[[Tensor, Any], Tensor], *, optimizer: Any = None, scheduler: Any = None,
                        device: Union[str, torch.device, None] = None, **kwargs: Any) -> "Grower":
        """Resumes a growth run from a folder written by :meth:`save` (or ``checkpoint_dir``).

        The resume is exact: model, optimiser, scheduler, history and the RNG / data-order states
        of :meth:`resume_state` are restored (into ``train_data`` etc., which should be loaders
        built like the original ones), so :meth:`run` continues exactly as the interrupted run
        would have (same device, same settings; callbacks must not draw from the RNGs).
        Checkpoints written without a resume state (older versions) resume with
        ``torch.manual_seed(seed + rounds done)``, with a warning.

        Args:
            optimizer: None (rebuild the saved optimiser class) or a factory ``f(params)``; the
                saved state (e.g. Adam moments) is loaded into it either way.
            scheduler: None or a factory ``f(optimizer)``; its saved state is loaded.
            kwargs: Grower settings; the saved ones are the defaults, and ``checkpoint_dir``
                defaults to ``path`` (the resumed run keeps saving there).
        """
        fn = "Grower.from_checkpoint"
        ck = load_checkpoint(path, device=device)
        opt = restore_optimizer(ck.model, ck.optimizer_state, optimizer)
        sched = None
        if scheduler is not None:
            sched = scheduler(opt) if not hasattr(scheduler, "step") else scheduler
            if ck.scheduler_state is not None:
                sched.load_state_dict(ck.scheduler_state)
        history = ck.history if ck.history is not None else GrowthHistory()
        settings = dict(history.meta.get("settings", {}))
        settings["checkpoint_dir"] = path
        saved = history.meta.get("strategy", {})
        if "strategy" not in kwargs:
            settings["strategy"] = strategy_from_config(saved, "Grower.from_checkpoint")
        settings.update(kwargs)
        grower = cls(ck.model, opt, train_data, val_data, loss_fn, scheduler=sched, history=history, **settings)
        extra = ck.meta.get("extra") or {}
        state = extra.get(RESUME_KEY)
        if state is None:
            warnings.warn(f"{fn}: the checkpoint in {str(path)!r} holds no RNG / data-order state (written by an "
                          "older version): the resumed run reseeds with seed + rounds done and does not repeat the "
                          "interrupted run exactly", stacklevel=2)
            return grower
        grower.load_resume_state(_unpack(state, ck.tensors))
        if grower.keep_best and history.best_round is not None:
            if history.best_round is history.rounds[-1]:
                grower.best_model = copy.deepcopy(grower.model)
            else:
                warnings.warn(f"{fn}: keep_best: the best model (round {history.best_round.round}) is not part of a "
                              "checkpoint; best_model stays None until a later round improves on it", stacklevel=2)
        return grower


def _counting_time(info: Dict[str, Any]) -> float:
    """Seconds a strategy spent counting FLOPs (re-runs under the counter): not part of its wall time."""
    comp = info.get(STRATEGY_COMPUTE_KEY) or {}
    return float(comp.get("counting_time") or 0.0)


@dataclass
class _Trained:
    """What :meth:`Grower._train_round` measured."""

    curve: List[float] = field(default_factory=list)
    val_curve: List[float] = field(default_factory=list)
    epoch_times: List[float] = field(default_factory=list)
    train_flops: Optional[int] = None
    optimizer_flops: Optional[int] = None
    eval_time: float = 0.0


def grow(model: nn.Module, optimizer: Any, train_data: Any, val_data: Any, loss_fn: Callable[[Tensor, Any], Tensor],
         **kwargs: Any) -> GrowthHistory:
    """``Grower(model, optimizer, train_data, val_data, loss_fn, **kwargs).run()``; ``model`` grows in place."""
    return Grower(model, optimizer, train_data, val_data, loss_fn, **kwargs).run()
