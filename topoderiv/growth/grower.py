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
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..data import take_batches
from ..sites import check_growable, check_point, depth
from ..sites.linear import check_matrix_phi
from .checkpoint import load_checkpoint, restore_optimizer, save
from .history import GrowthHistory, RoundRecord, count_parameters, jsonable
from .insertion import insert, insert_block
from .strategies import InsertionStrategy, Proposal, make_strategy, strategy_from_config
from .training import evaluate, fit

__all__ = ["Grower", "grow", "adopt_parameters"]


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
# the loop


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
        seed: ``torch.manual_seed(seed + rounds_done)`` at :meth:`run` and a seeded
            ``self.generator`` for strategies (None: leave the RNG alone).
        progress: tqdm bars (rounds, and epochs within a round).
        scheduler: an LR scheduler on ``optimizer`` or a factory ``f(optimizer)``; steps per epoch.
        test_data, test_metric: optional held-out data and batch-mean metric recorded per round.
        freeze_existing: after an insertion, train only the new block and the head (``head_attr``)
            (Forward Thinking); earlier parameters get ``requires_grad = False``.
        callbacks: ``f(grower, record)`` called after every round.
        checkpoint_dir: save model + history + optimizer there after every round (resume with
            :meth:`from_checkpoint`).
        keep_best: keep a deep copy of the model with the best validation loss in ``best_model``.
        history: a history to continue (resume).
        grad_clip: gradient-norm clip for training.
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
                 history: Optional[GrowthHistory] = None, grad_clip: Optional[float] = None) -> None:
        fn = "Grower"
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
        self.generator = torch.Generator().manual_seed(0 if seed is None else seed)
        self.history = history if history is not None else GrowthHistory()
        self.history.meta.setdefault("model_class", type(model).__name__)
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
                "keep_best": self.keep_best, "grad_clip": self.grad_clip, "progress": self.progress}

    def score_data(self) -> List[Any]:
        """The training batches used for scoring and the eps search (first ``score_batches``)."""
        return list(take_batches(self.train_data, self.score_batches))

    @property
    def depth(self) -> int:
        """Blocks in the model's site containers."""
        return depth(self.model)

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

    def _evaluate(self) -> tuple:
        val = evaluate(self.model, self.val_data, self.loss_fn)
        test = None
        if self.test_data is not None:
            test = evaluate(self.model, self.test_data, self.test_metric or self.loss_fn)
        return val, test

    def _train_round(self, epochs: int, r: int) -> List[float]:
        return fit(self.model, self.optimizer, self.train_data, self.loss_fn, epochs, scheduler=self.scheduler,
                   progress=self.progress, grad_clip=self.grad_clip, desc=f"round {r}")

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
        for cb in self.callbacks:
            cb(self, rec)
        if self.checkpoint_dir is not None:
            self.save(self.checkpoint_dir)

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

    def run(self) -> GrowthHistory:
        """Runs (or continues) the growth; returns the history (``model`` is grown in place)."""
        if self.seed is not None:
            torch.manual_seed(self.seed + len(self.history.rounds))
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_rounds + 1, initial=len(self.history.rounds), desc="grow", unit="round")
        self.history.meta.pop("stop_reason", None)
        try:
            if not self.history.rounds:
                t0 = time.perf_counter()
                curve = self._train_round(self.initial_epochs, 0)
                val, test = self._evaluate()
                rec = RoundRecord(0, self.initial_epochs, curve[-1] if curve else evaluate(self.model, self.train_data, self.loss_fn),
                                  val, count_parameters(self.model), self.depth, time.perf_counter() - t0, curve, test,
                                  lr=_current_lr(self.optimizer))
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
                    curve = self._train_round(self.epochs_per_round, r)
                    val, test = self._evaluate()
                    rec = RoundRecord(r, self.epochs_per_round, curve[-1] if curve else math.nan, val,
                                      count_parameters(self.model), self.depth, time.perf_counter() - t0, curve, test,
                                      lr=_current_lr(self.optimizer), info={"phase": "train"})
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
                    break
                self.apply(proposal)
                t_insert = time.perf_counter() - t0
                curve = self._train_round(self.epochs_per_round, r)
                val, test = self._evaluate()
                train_loss = curve[-1] if curve else evaluate(self.model, self.train_data, self.loss_fn)
                mu = {int(k): float(v) for k, v in proposal.info.get("mu", {}).items()}
                info = {k: v for k, v in proposal.info.items() if k != "mu"}
                rec = RoundRecord(r, self.epochs_per_round, train_loss, val, count_parameters(self.model), self.depth,
                                  time.perf_counter() - t0, curve, test, proposal.point,
                                  None if proposal.block is not None else float(proposal.eps), mu,
                                  _current_lr(self.optimizer), t_insert, jsonable(info))
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

    # -- checkpoints -------------------------------------------------------------------------------

    def save(self, path: Union[str, Path]) -> Path:
        """Saves model, history, optimiser and scheduler state to the folder ``path``."""
        return save(self.model, path, history=self.history, optimizer=self.optimizer, scheduler=self.scheduler)

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], train_data: Any, val_data: Any,
                        loss_fn: Callable[[Tensor, Any], Tensor], *, optimizer: Any = None, scheduler: Any = None,
                        device: Union[str, torch.device, None] = None, **kwargs: Any) -> "Grower":
        """Resumes a growth run from a folder written by :meth:`save` (or ``checkpoint_dir``).

        Args:
            optimizer: None (rebuild the saved optimiser class) or a factory ``f(params)``; the
                saved state (e.g. Adam moments) is loaded into it either way.
            scheduler: None or a factory ``f(optimizer)``; its saved state is loaded.
            kwargs: Grower settings; the saved ones are the defaults, and ``checkpoint_dir``
                defaults to ``path`` (the resumed run keeps saving there).
        """
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
        return cls(ck.model, opt, train_data, val_data, loss_fn, scheduler=sched, history=history, **settings)


def grow(model: nn.Module, optimizer: Any, train_data: Any, val_data: Any, loss_fn: Callable[[Tensor, Any], Tensor],
         **kwargs: Any) -> GrowthHistory:
    """``Grower(model, optimizer, train_data, val_data, loss_fn, **kwargs).run()``; ``model`` grows in place."""
    return Grower(model, optimizer, train_data, val_data, loss_fn, **kwargs).run()
