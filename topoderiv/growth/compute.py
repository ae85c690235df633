"""Compute accounting: the FLOPs and wall time a growth run or a baseline spends.

What is counted, and how (the numbers land in :class:`topoderiv.growth.RoundRecord`):

- **Training** (``train_flops``): forward + backward of one representative step per round (every
  round starts after an architecture change or continues an unchanged one): the round's first
  training batch, re-run on a copy of the model under :class:`FlopCounter`
  (:func:`training_step_flops`), scaled to the samples of an epoch (matrix-product FLOPs are
  linear in the batch) and multiplied by the round's epochs; plus the optimiser. Torch's FLOP
  formulas (the table behind ``torch.utils.flop_counter.FlopCounterMode``) count the matrix
  products (``mm``, ``addmm``, ``bmm``, convolutions, attention) at 2 FLOPs per multiply-add, and
  nothing else: activations, residual additions, bias gradients and the loss are not counted (for
  a ResidualMLP of width ``w`` they are about ``1/w`` of the total).
- **The optimiser** (``optimizer_flops``, part of ``train_flops``): torch's counter sees no
  elementwise op, so the update is counted analytically per parameter element per step
  (:func:`optimizer_flops_per_element`, the arithmetic of torch's own Adam/AdamW/SGD/RMSprop/
  Adagrad code, e.g. 13 for Adam, 5 for SGD with momentum), for the parameters that had a
  gradient at that step (frozen ones are not updated).
- **Scoring** (``score_flops``): the capture pass (one forward + backward per scoring batch,
  counted by torch's formulas like training) plus the solve of the sensitivity statistics, which
  runs in the package's own C++/CUDA ops, invisible to torch's counter. Their FLOPs come from the
  ops' cost model (:func:`topoderiv.ops.choose_route`; 2 FLOPs per multiply-add) with the actual
  route and the actual Lanczos steps each op call reports: ``sensitivity_blocks``
  ``N n m(m+1)/2`` multiply-adds (upper triangle), ``lanczos_topk`` ``m^2`` per step per block,
  matrix-free ``sensitivity_lanczos`` ``2 N m`` per step per block (CPU: the operator is applied
  to the unconverged blocks only; CUDA: to every block, the most steps of any), and
  ``sensitivity_matvec`` ``2 N n m``. Like the cost model, Lanczos re-orthogonalisation and the
  tridiagonal solves are left out. ``eigh``/``svd`` (the torch backend, fall-backs) get Golub and
  Van Loan's operation counts.
- **The eps search** (``search_flops``): its forward passes, by torch's formulas.
- **Wall time**: per epoch of training (``epoch_times``), and the time of proposing and inserting
  (``insert_time``: scoring and the eps search included); evaluation time (``eval_time``) is
  recorded apart and counted in no method's compute, since every method evaluates alike. No
  timed code runs under the counter (it slows what it counts about threefold): the counted step
  is a re-run outside the timed epoch, and scoring and the eps search are re-run under the
  counter after their timed run (:func:`count_call`; they are deterministic and draw from no RNG,
  and the RNG states are restored anyway).

Why not ``FlopCounterMode`` itself: it decomposes the ops it has no formula for, and a decomposed
``silu_backward`` rounds differently, so a counted epoch would not be the epoch an uncounted run
trains; and its module tracker installs global hooks that ``torch.autograd.grad`` (the scorer's
capture) refuses. :class:`FlopCounter` runs every op as is and uses the same formulas.

:func:`compute_curve` turns a history into the validation loss against cumulative compute, and
:func:`compute_to_target` reads off the compute at which a run FIRST reaches a target validation
loss (the interpolation rule is in its docstring).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .. import ops  # noqa: F401  (registers torch.ops.topoderiv.*)
from .history import GrowthHistory, RoundRecord

__all__ = [
    "FlopCounter",
    "optimizer_flops_per_element",
    "optimizer_supported",
    "ComputeCurve",
    "Reach",
    "compute_curve",
    "compute_to_target",
    "best_val",
    "count_call",
    "training_step_flops",
    "BatchProbe",
    "warn_unsupported_optimizer",
    "STRATEGY_COMPUTE_KEY",
]

#: key of ``Proposal.info`` / ``strategy.last_info`` under which a strategy reports what proposing
#: cost: ``{"score_flops": int, "search_flops": int, ...}`` (the grower records it in the round)
STRATEGY_COMPUTE_KEY = "compute"


# ------------------------------------------------------------------------------------------------
# the package's own ops: FLOPs from their cost model, with the steps each call reports


def _shape2(t: Tensor) -> Tuple[int, int]:
    return (int(t.reshape(-1, t.shape[-1]).shape[0]), int(t.shape[-1])) if t.dim() else (1, 1)


def _blocks_flops(x: Tensor, p: Tensor, bias: bool, *rest: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``sensitivity_blocks(x [N, d], p [N, n])``: ``N n m(m+1)/2`` multiply-adds (the upper triangle)."""
    N, d = _shape2(x)
    n = int(p.shape[-1])
    m = d + int(bool(bias))
    return N * n * m * (m + 1)


def _lanczos_flops(a: Tensor, *rest: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Dense ``lanczos_topk(a [B, m, m])``: one ``m x m`` matvec (``m^2`` multiply-adds) per step per matrix."""
    m = int(a.shape[-1])
    steps = int(out_val[3].to(torch.int64).sum()) if out_val is not None else 0
    return 2 * m * m * steps


def _sens_lanczos_flops(x: Tensor, p: Tensor, bias: bool, *rest: Any, out_val: Any = None, **kwargs: Any) -> int:
    """Matrix-free Lanczos: ``2 N m`` multiply-adds per step per block (every block, as many steps as
    the slowest, on CUDA)."""
    N, d = _shape2(x)
    n = int(p.shape[-1])
    m = d + int(bool(bias))
    if out_val is None:
        return 0
    steps = out_val[3].to(torch.int64)
    total = int(steps.max()) * n if (x.device.type == "cuda" and steps.numel()) else int(steps.sum())
    return 4 * N * m * total


def _blocks_batched_flops(x: Tensor, p: Tensor, bias: bool, *rest: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``sensitivity_blocks_batched(x [L, N, d], p [L, N, n])``: L times :func:`_blocks_flops`."""
    return int(x.shape[0]) * _blocks_flops(x[0], p[0], bias) if x.shape[0] else 0


def _sens_lanczos_batched_flops(x: Tensor, p: Tensor, bias: bool, *rest: Any, out_val: Any = None,
                                **kwargs: Any) -> int:
    """Batched matrix-free Lanczos (``x [L, N, d]``, steps ``[L, n]``): :func:`_sens_lanczos_flops` per point."""
    if out_val is None or not x.shape[0]:
        return 0
    N, m, n = int(x.shape[1]), int(x.shape[2]) + int(bool(bias)), int(p.shape[2])
    steps = out_val[3].to(torch.int64)
    total = int(steps.amax(dim=1).sum()) * n if x.device.type == "cuda" else int(steps.sum())
    return 4 * N * m * total


def _matvec_flops(x: Tensor, p: Tensor, v: Tensor, bias: bool, *rest: Any, out_val: Any = None, **kwargs: Any) -> int:
    """``sensitivity_matvec``: ``2 N n m`` multiply-adds."""
    N, d = _shape2(x)
    n = int(p.shape[-1])
    return 4 * N * n * (d + int(bool(bias)))


def _raw(f: Callable[..., int]) -> Callable[..., int]:
    f._get_raw = True  # type: ignore[attr-defined]  # torch.utils.flop_counter: pass tensors, not shapes
    return f


def _eigh_flops(a_shape: Any, *rest: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """Symmetric eigen-decomposition of ``[.., m, m]``: ``9 m^3`` with vectors, ``4 m^3 / 3`` without
    (Golub & Van Loan)."""
    m = int(a_shape[-1])
    batch = math.prod(int(s) for s in a_shape[:-2])
    compute_v = bool(rest[1]) if len(rest) > 1 else bool(kwargs.get("compute_v", True))
    return batch * (9 * m ** 3 if compute_v else (4 * m ** 3) // 3)


def _svd_flops(a_shape: Any, *rest: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """SVD of ``[.., r, c]``: R-SVD, ``6 R C^2 + 20 C^3`` with vectors, ``4 R C^2 - 4 C^3/3`` without
    (Golub & Van Loan; ``R >= C``)."""
    r, c = int(a_shape[-2]), int(a_shape[-1])
    big, small = max(r, c), min(r, c)
    batch = math.prod(int(s) for s in a_shape[:-2])
    compute_uv = bool(rest[1]) if len(rest) > 1 else bool(kwargs.get("compute_uv", True))
    per = 6 * big * small ** 2 + 20 * small ** 3 if compute_uv else 4 * big * small ** 2 - (4 * small ** 3) // 3
    return batch * per


_FORMULAS: Optional[Dict[Any, Callable[..., int]]] = None


def _formulas() -> Dict[Any, Callable[..., int]]:
    """Torch's FLOP formulas (as FlopCounterMode holds them) plus the package's ops and eigh/svd."""
    global _FORMULAS
    if _FORMULAS is None:
        t = torch.ops.topoderiv
        custom = {
            t.sensitivity_blocks: _raw(_blocks_flops),
            t.sensitivity_blocks_accumulate_: _raw(_blocks_flops),
            t.lanczos_topk: _raw(_lanczos_flops),
            t.sensitivity_lanczos: _raw(_sens_lanczos_flops),
            t.sensitivity_matvec: _raw(_matvec_flops),
            t.sensitivity_blocks_batched: _raw(_blocks_batched_flops),
            t.lanczos_topk_batched: _raw(_lanczos_flops),
            t.sensitivity_lanczos_batched: _raw(_sens_lanczos_batched_flops),
            torch.ops.aten._linalg_eigh: _eigh_flops,
            torch.ops.aten._linalg_svd: _svd_flops,
        }
        _FORMULAS = dict(FlopCounterMode(display=False, custom_mapping=custom).flop_registry)
    return _FORMULAS


# the package's ops, by what their FLOPs are reported as
_OPS_GROUPS = {"sensitivity_blocks": "blocks", "sensitivity_blocks_accumulate_": "blocks",
               "lanczos_topk": "dense_lanczos", "sensitivity_lanczos": "matfree_lanczos",
               "sensitivity_matvec": "matvec", "sensitivity_blocks_batched": "blocks",
               "lanczos_topk_batched": "dense_lanczos", "sensitivity_lanczos_batched": "matfree_lanczos"}


class _CountingMode(TorchDispatchMode):
    """Runs every op unchanged and adds its FLOPs by formula (no decomposition, no module hooks)."""

    def __init__(self, counter: "FlopCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", None)
        formula = self.counter.formulas.get(packet) if packet is not None else None
        if formula is not None:
            self.counter.add(packet, int(formula(*args, **kwargs, out_val=out)), out)
        return out


class FlopCounter:
    """Counts the FLOPs of what runs inside ``with FlopCounter() as c:`` (see the module docstring).

    Attributes (after the block):
        torch_flops: matrix products etc. by torch's formulas (training and capture passes).
        ops_flops: the package's sensitivity ops by their cost model, with the reported steps.
        optimizer_flops: ``optimizer.step()`` calls of ``optimizer`` (when given), analytically.
        total: the sum. by_op: FLOPs per op name. lanczos_steps: the Lanczos steps summed over
        the blocks of every solve. solves: ``{"dense": calls, "matfree": calls}``.
        optimizer_steps: optimiser steps seen.

    Args:
        optimizer: an optimiser whose steps to count (:func:`optimizer_flops_per_element`).
        enabled: False: a no-op context whose counts stay None (counting switched off).
        extra_per_element: FLOPs per updated element per step added to ``optimizer_flops`` (the
            grower's gradient clipping: 3, the norm's square + add and the scaling).

    Raises:
        TypeError: ``optimizer`` is not a ``torch.optim.Optimizer`` or one with no known count.
    """

    def __init__(self, optimizer: Optional[torch.optim.Optimizer] = None, *, enabled: bool = True,
                 extra_per_element: int = 0) -> None:
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"FlopCounter: optimizer must be a torch.optim.Optimizer or None, got "
                                f"{type(optimizer).__name__}")
            optimizer_flops_per_element(optimizer, optimizer.param_groups[0] if optimizer.param_groups else {})
        if isinstance(extra_per_element, bool) or not isinstance(extra_per_element, int) or extra_per_element < 0:
            raise ValueError(f"FlopCounter: extra_per_element must be an int >= 0, got {extra_per_element!r}")
        self.optimizer, self.enabled, self.extra_per_element = optimizer, bool(enabled), extra_per_element
        self.formulas = _formulas() if self.enabled else {}
        self.torch_flops: Optional[int] = 0 if self.enabled else None
        self.ops_flops: Optional[int] = 0 if self.enabled else None
        self.optimizer_flops: Optional[int] = 0 if self.enabled else None
        self.optimizer_steps = 0
        self.by_op: Dict[str, int] = {}
        self.lanczos_steps = 0
        self.solves: Dict[str, int] = {"dense": 0, "matfree": 0}
        self._mode: Optional[_CountingMode] = None
        self._hook: Any = None

    @property
    def total(self) -> Optional[int]:
        if not self.enabled:
            return None
        return int(self.torch_flops) + int(self.ops_flops) + int(self.optimizer_flops)

    def add(self, packet: Any, flops: int, out: Any = None) -> None:
        """Adds ``flops`` of one call of the op ``packet`` (called by the counting mode)."""
        ns = getattr(packet, "_qualified_op_name", str(packet))
        name = ns.split("::")[-1]
        key = f"topoderiv.{name}" if ns.startswith("topoderiv::") else name
        self.by_op[key] = self.by_op.get(key, 0) + flops
        if ns.startswith("topoderiv::"):
            self.ops_flops += flops
            group = _OPS_GROUPS.get(name)
            if group in ("dense_lanczos", "matfree_lanczos"):
                # a batched call ([L, n] steps) solves L points
                self.solves["dense" if group == "dense_lanczos" else "matfree"] += \
                    int(out[3].shape[0]) if out[3].dim() == 2 else 1
                self.lanczos_steps += int(out[3].to(torch.int64).sum())
        else:
            self.torch_flops += flops

    def _step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.optimizer_steps += 1
        for group in optimizer.param_groups:
            per = optimizer_flops_per_element(optimizer, group) + self.extra_per_element
            self.optimizer_flops += per * sum(p.numel() for p in group["params"] if p.grad is not None)

    def __enter__(self) -> "FlopCounter":
        if self.enabled:
            if self.optimizer is not None:
                self._hook = self.optimizer.register_step_post_hook(self._step_hook)
            self._mode = _CountingMode(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def summary(self) -> Dict[str, Any]:
        """JSON-able: totals, the package ops' share, Lanczos steps and solves per route."""
        return {"torch_flops": self.torch_flops, "ops_flops": self.ops_flops, "optimizer_flops": self.optimizer_flops,
                "lanczos_steps": self.lanczos_steps, "solves": dict(self.solves),
                "ops": {k: v for k, v in sorted(self.by_op.items()) if k.startswith("topoderiv.")}}


# ------------------------------------------------------------------------------------------------
# optimisers


def _group_value(group: Dict[str, Any], key: str, default: Any) -> Any:
    v = group.get(key, default)
    return v.item() if isinstance(v, Tensor) else v


def optimizer_flops_per_element(optimizer: torch.optim.Optimizer, group: Dict[str, Any]) -> int:
    """FLOPs one ``step()`` spends per parameter element of ``group``, counted from torch's own update
    code (single-tensor path; the foreach and fused paths do the same arithmetic). An op counts 1
    per element (``sqrt``, ``maximum`` included), ``add(x, alpha=a)`` 2, ``lerp``/``addcmul``/
    ``addcdiv`` 3:

    - Adam: ``lerp`` m, ``mul + addcmul`` v, ``sqrt / + eps`` denominator, ``addcdiv`` update: 13;
      amsgrad +1, L2 weight decay +2, decoupled (AdamW) weight decay +1, maximize +1.
    - SGD: update 2; momentum +3 (``mul + add``); nesterov +2; weight decay +2; maximize +1. The
      first step's momentum buffer is a copy (counted like every later step).
    - RMSprop: 9; centered +6; momentum +3; weight decay +2. Adagrad: 8; weight decay +2.

    Raises:
        TypeError: an optimiser class with no known count (the message names the known ones).
    """
    maximize = 1 if _group_value(group, "maximize", False) else 0
    wd = 2 if _group_value(group, "weight_decay", 0) else 0
    if isinstance(optimizer, torch.optim.Adam):  # AdamW is an Adam with decoupled weight decay
        decoupled = _group_value(group, "decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
        if isinstance(optimizer, torch.optim.AdamW):
            decoupled = True
        wd = (1 if decoupled else 2) if _group_value(group, "weight_decay", 0) else 0
        return 13 + (1 if _group_value(group, "amsgrad", False) else 0) + wd + maximize
    if isinstance(optimizer, torch.optim.AdamW):  # an AdamW that is no Adam (older torch)
        return 13 + (1 if _group_value(group, "amsgrad", False) else 0) + \
            (1 if _group_value(group, "weight_decay", 0) else 0) + maximize
    if isinstance(optimizer, torch.optim.SGD):
        mom = _group_value(group, "momentum", 0)
        return 2 + (3 if mom else 0) + (2 if mom and _group_value(group, "nesterov", False) else 0) + wd + maximize
    if isinstance(optimizer, torch.optim.RMSprop):
        return 9 + (6 if _group_value(group, "centered", False) else 0) + \
            (3 if _group_value(group, "momentum", 0) else 0) + wd + maximize
    if isinstance(optimizer, torch.optim.Adagrad):
        return 8 + wd + maximize
    raise TypeError(f"optimizer_flops_per_element: optimizer must be an Adam, AdamW, SGD, RMSprop or Adagrad "
                    f"(the optimisers whose update is counted), got {type(optimizer).__name__}")


def optimizer_supported(optimizer: Any) -> bool:
    """Whether :func:`optimizer_flops_per_element` counts ``optimizer``."""
    try:
        optimizer_flops_per_element(optimizer, {})
    except TypeError:
        return False
    return True


def _rng_devices() -> List[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []


def count_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Tuple[Any, FlopCounter]:
    """``fn(*args, **kwargs)`` under a fresh :class:`FlopCounter` with the torch RNG states forked
    (restored afterwards, so counting never changes what a run draws): ``(result, counter)``."""
    with torch.random.fork_rng(devices=_rng_devices()):
        with FlopCounter() as counter:
            out = fn(*args, **kwargs)
    return out, counter


def _tensors(obj: Any) -> List[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def training_step_flops(model: torch.nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None,
                        optimizer: Optional[torch.optim.Optimizer] = None, *,
                        extra_per_element: int = 0) -> Tuple[int, int, int]:
    """FLOPs of one training step of ``model`` on the batch ``model(*args, **kwargs)``.

    Forward + backward run on a deep copy of ``model`` (the model, its gradients and the RNG states
    are untouched) under a :class:`FlopCounter`; the backward is that of ``sum(outputs)`` with
    respect to the parameters that require grad, which runs the same matrix products as the
    backward of any loss (the loss itself is no matrix product, so torch's formulas count none of
    it). The optimiser's update is :func:`optimizer_flops_per_element` (+ ``extra_per_element``)
    times the elements of the parameters of ``optimizer`` that got a gradient.

    Returns:
        ``(forward_backward_flops, optimizer_flops, updated_elements)``; ``optimizer_flops`` is 0
        without ``optimizer``.

    Raises:
        TypeError: ``optimizer`` of a class with no known count; ``model`` returns no tensor.
    """
    fn = "training_step_flops"
    kwargs = dict(kwargs or {})
    shadow = copy.deepcopy(model)
    pairs = [(p, q) for p, q in zip(model.parameters(), shadow.parameters())]
    train = [q for _, q in pairs if q.requires_grad]

    def step() -> List[Optional[Tensor]]:
        with torch.enable_grad():
            outs = [t for t in _tensors(shadow(*args, **kwargs)) if t.requires_grad]
            if not outs:
                raise TypeError(f"{fn}: the model must return a tensor that requires grad, got none")
            loss = sum(t.float().sum() for t in outs)
            return list(torch.autograd.grad(loss, train, allow_unused=True)) if train else []

    grads, counter = count_call(step)
    got = {id(q) for q, g in zip(train, grads) if g is not None}
    opt_flops = 0
    elements = 0
    if optimizer is not None:
        held = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
        for p, q in pairs:
            if id(q) in got and id(p) in held:
                group = optimizer.param_groups[held[id(p)]]
                elements += p.numel()
                opt_flops += (optimizer_flops_per_element(optimizer, group) + extra_per_element) * p.numel()
    return int(counter.total), int(opt_flops), int(elements)


class BatchProbe:
    """A forward pre-hook on a model that keeps the first call's inputs and counts the calls and the
    samples (``args[0].shape[0]``) while it is attached: what one epoch of training fed the model.
    Detach with :meth:`remove`."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.args: Optional[tuple] = None
        self.kwargs: Dict[str, Any] = {}
        self.calls = 0
        self.samples = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        if self.args is None:
            self.args, self.kwargs = args, dict(kwargs)
        self.calls += 1
        if args and isinstance(args[0], Tensor) and args[0].dim():
            self.samples += int(args[0].shape[0])

    @property
    def first_batch(self) -> int:
        """Samples of the first call's batch (0 before any call)."""
        a = self.args[0] if self.args else None
        return int(a.shape[0]) if isinstance(a, Tensor) and a.dim() else 0

    def remove(self) -> None:
        self.handle.remove()


# ------------------------------------------------------------------------------------------------
# validation loss against cumulative compute


@dataclass
class ComputeCurve:
    """The validation loss at every evaluation of a run, against the compute spent before it.

    Lists have one entry per evaluation: after every epoch when the run recorded a per-epoch
    validation curve (``RoundRecord.val_curve``), else at the end of every round.

    Attributes:
        epoch: epochs trained in total at the evaluation. val: validation loss.
        flops: cumulative FLOPs (training, scoring and eps search) at the evaluation; NaN when the
            run did not count FLOPs. time: cumulative wall time in seconds (training, proposing and
            inserting; evaluation excluded).
        step_flops, step_time: the TRAINING compute between the previous evaluation and this one
            (the interval in which the loss changed; scoring and the eps search come before it).
        round: the round of the evaluation. insertions: ``(flops, time, epoch, point)`` where
            each insertion happened (after its scoring and eps search).
        total_flops, total_time: the whole run (a last failed proposal included).
    """

    epoch: List[int] = field(default_factory=list)
    val: List[float] = field(default_factory=list)
    flops: List[float] = field(default_factory=list)
    time: List[float] = field(default_factory=list)
    step_flops: List[float] = field(default_factory=list)
    step_time: List[float] = field(default_factory=list)
    round: List[int] = field(default_factory=list)
    insertions: List[Tuple[float, float, int, Any]] = field(default_factory=list)
    total_flops: float = 0.0
    total_time: float = 0.0


def _num(v: Any) -> float:
    return math.nan if v is None else float(v)


def _as_history(history: Any, fn: str) -> GrowthHistory:
    if isinstance(history, GrowthHistory):
        return history
    if isinstance(history, dict):
        return GrowthHistory.from_dict(history)
    raise TypeError(f"{fn}: history must be a GrowthHistory or its to_dict(), got {type(history).__name__}")


def _pre_flops(rec: RoundRecord) -> float:
    if rec.train_flops is None:
        return math.nan
    return float(rec.score_flops or 0) + float(rec.search_flops or 0)


def compute_curve(history: Any) -> ComputeCurve:
    """The :class:`ComputeCurve` of a history (a :class:`GrowthHistory` or its dict).

    A round's compute is, in order: proposing and inserting (``score_flops + search_flops``,
    ``insert_time``), then its epochs (``train_flops / epochs`` and ``epoch_times`` each, or the
    round's ``train_time`` spread evenly when the epoch times were not recorded).
    """
    fn = "compute_curve"
    hist = _as_history(history, fn)
    c = ComputeCurve()
    flops = 0.0
    secs = 0.0
    epoch = 0
    for rec in hist.rounds:
        flops += _pre_flops(rec)
        secs += float(rec.insert_time or 0.0)
        if rec.point is not None:
            c.insertions.append((flops, secs, epoch, rec.point))
        n = int(rec.epochs)
        per_flops = _num(rec.train_flops) / n if n else 0.0
        times = list(rec.epoch_times or [])
        if len(times) != n:
            total = float(rec.train_time) if rec.train_time else float(rec.wall_time) - float(rec.insert_time or 0.0)
            times = [total / n] * n if n else []
        vals = list(rec.val_curve or [])
        if n and len(vals) == n:  # one evaluation per epoch
            for i in range(n):
                flops += per_flops
                secs += times[i]
                epoch += 1
                c.epoch.append(epoch)
                c.val.append(float(vals[i]))
                c.flops.append(flops)
                c.time.append(secs)
                c.step_flops.append(per_flops)
                c.step_time.append(times[i])
                c.round.append(rec.round)
        else:  # one evaluation at the end of the round
            flops += per_flops * n
            secs += sum(times)
            epoch += n
            c.epoch.append(epoch)
            c.val.append(float(rec.val_loss))
            c.flops.append(flops)
            c.time.append(secs)
            c.step_flops.append(per_flops * n)
            c.step_time.append(sum(times))
            c.round.append(rec.round)
    stop = hist.meta.get("stop_compute") or {}  # a last proposal that inserted nothing, not yet in a round
    c.total_flops = flops + float(stop.get("score_flops") or 0) + float(stop.get("search_flops") or 0)
    c.total_time = secs + float(stop.get("time") or 0.0)
    return c


@dataclass(frozen=True)
class Reach:
    """When a run first reached a target validation loss.

    Attributes:
        reached: whether it did. flops, time: the compute at the crossing (NaN when not reached).
        epoch: the epoch of the first evaluation at or below the target (None when not reached).
        val: that evaluation's validation loss.
    """

    reached: bool
    flops: float = math.nan
    time: float = math.nan
    epoch: Optional[int] = None
    val: float = math.nan

    def to_dict(self) -> Dict[str, Any]:
        return {"reached": self.reached, "flops": None if math.isnan(self.flops) else self.flops,
                "time": None if math.isnan(self.time) else self.time, "epoch": self.epoch,
                "val": None if math.isnan(self.val) else self.val}


def compute_to_target(history: Any, target: float) -> Reach:
    """The compute at which a run FIRST reaches validation loss ``<= target``.

    The rule: find the first evaluation ``i`` with ``val[i] <= target``. Between the previous
    evaluation (``val[i-1] > target``) and this one the run trained for ``step_flops[i]`` FLOPs
    (``step_time[i]`` seconds), after any scoring and eps search, which are counted whole. The
    crossing is placed by linear interpolation of the validation loss over that training:
    ``flops[i] - (1 - f) step_flops[i]`` with ``f = (val[i-1] - target) / (val[i-1] - val[i])``,
    and the same for the wall time. The first evaluation of a run has no earlier one: its own
    compute is used (an upper bound). Not reached: ``Reach(False)`` (NaN compute).

    Args:
        history: a :class:`GrowthHistory`, its dict, or a :class:`ComputeCurve`.
        target: the validation loss to reach (a finite number).

    Raises:
        TypeError, ValueError: a history of another type; a target that is not a finite number.
    """
    fn = "compute_to_target"
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(float(target)):
        raise ValueError(f"{fn}: target must be a finite number (a validation loss), got {target!r}")
    curve = history if isinstance(history, ComputeCurve) else compute_curve(_as_history(history, fn))
    target = float(target)
    for i, v in enumerate(curve.val):
        if not (math.isfinite(v) and v <= target):
            continue
        flops, secs = curve.flops[i], curve.time[i]
        prev = curve.val[i - 1] if i > 0 else math.nan
        if i > 0 and math.isfinite(prev) and prev > v:
            f = (prev - target) / (prev - v)
            flops -= (1.0 - f) * curve.step_flops[i]
            secs -= (1.0 - f) * curve.step_time[i]
        return Reach(True, flops, secs, curve.epoch[i], v)
    return Reach(False)


def best_val(history: Any) -> float:
    """The lowest validation loss of a run over every evaluation (per-epoch when recorded)."""
    vals = [v for v in compute_curve(_as_history(history, "best_val")).val if math.isfinite(v)]
    return min(vals) if vals else math.nan



def warn_unsupported_optimizer(optimizer: Any, where: str) -> None:
    """Warns that ``optimizer``'s update FLOPs are not counted (train_flops then counts forward+backward)."""
    warnings.warn(f"{where}: the update FLOPs of {type(optimizer).__name__} are not counted (known: Adam, AdamW, "
                  "SGD, RMSprop, Adagrad): train_flops counts forward + backward only and optimizer_flops is None",
                  stacklevel=3)

