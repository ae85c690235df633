"""Baselines of METHOD.md section 8 in the growth API, and :func:`compare`.

Every method trains the same network family (:class:`Network`: the task's
:class:`topoderiv.models.ResidualMLP` by default, or ``ResidualCNN`` / ``ViT`` / a timm model on an
image task, with the insert kind of its sites) with the same optimiser (the budget's: Adam by
default, or SGD with momentum) and learning rate, the same mini-batches (a loader seeded with the
run's seed) and the same TOTAL number of epochs, ``budget.epochs_per_round * (budget.rounds + 1)``:

``topological``
    Topological-derivative growth (:class:`topoderiv.growth.TopologicalStrategy`): insert where
    ``mu`` is largest, ``phi`` = its top eigenvector, eps searched on the training loss.
``topological_all``
    :class:`TopologicalAllRows` (``TopologicalStrategy(rule="all")``): the same point choice, but
    every unit of the new block starts on its own top eigenvector (with the "top" rule only one
    unit of the new block is ever alive, see the class docstring). ``topological_multi``: the reference code's multi-eigenvector rule.
``random``
    :class:`RandomInsertion`: a uniformly random candidate point and a small random
    initialisation (``W, b ~ N(0, (scale / sqrt(fan_in))^2)``, ``scale = 0.1``) of the same
    admissible block, then all parameters keep training.
``identity``
    :class:`IdentityInsertion`: Net2DeeperNet-style function-preserving insertion (see its
    docstring for why the block uses tanh).
``forward_thinking``
    :class:`ForwardThinking`: layer-wise training (Hettinger et al., 2017): a new, randomly
    initialised block on top of the stack (before the head), then only that block and the head
    train; everything below is frozen.
``stacking``
    :class:`StackingInsertion`: the new block is a copy of the block before a random point
    (transformer growers' stacking, one block at a time). Any block type.
``zero_block``
    :class:`ZeroBlockInsertion`: a standard transformer block (timm's init, ``N(0, 0.02^2)``)
    with its output projections zero, at a random point (transformer site kinds only).
``initial``
    The initial network (``budget.depth`` blocks), no growth, trained for the whole budget.
``fixed_final``
    A fixed network with the final depth of the topological run of the same seed (its blocks per
    site container, e.g. per CNN stage; or ``depth + rounds`` when that run is not part of the
    comparison), trained from scratch for the whole budget.

Growing methods stop inserting when the validation loss has not improved for ``patience`` rounds,
when ``rounds`` insertions were made or when the strategy proposes nothing; the epochs left of the
budget are then spent training the final network (recorded as a last round without insertion,
``info["phase"] == "finish"``), so every method trains exactly the same number of epochs.
Reported: the test metric of the FINAL network (no checkpoint selection).

Compute: every run records its FLOPs (training, scoring, eps search) and wall time per round and
its validation loss after every epoch (:mod:`topoderiv.growth.compute`).
:meth:`Comparison.compute_summary` / :meth:`Comparison.compute_table` give, per method, the compute
needed to FIRST reach a target validation loss (by default, on each seed, the best validation loss
of ``fixed_final``, the final-size network trained from scratch, on that seed), over the seeds that
reached it, and the saving relative to ``fixed_final`` on the same seed.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..growth import (
    ForwardThinking,
    GrowthHistory,
    InsertionStrategy,
    Grower,
    IdentityInsertion,
    RandomInsertion,
    RoundRecord,
    StackingInsertion,
    TopologicalAllRows,
    TopologicalStrategy,
    ZeroBlockInsertion,
    count_parameters,
)
from ..growth.compute import Reach, best_val, compute_curve, compute_to_target
from ..sites import depth as network_depth
from ..sites import site_specs
from .tasks import ModelConfig, Task

__all__ = [
    "METHODS",
    "DEFAULT_METHODS",
    "Network",
    "default_methods",
    "parse_model",
    "RunResult",
    "Comparison",
    "run_method",
    "compare",
    "make_budget",
]


# --------------------------------------------------------------------------------------------
# strategies



# --------------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class MethodSpec:
    """How one method of a comparison runs: a strategy factory (None = no growth) and options."""

    name: str
    description: str
    strategy: Optional[Callable[[], InsertionStrategy]] = None
    freeze_existing: bool = False
    grows: bool = True


METHODS: Dict[str, MethodSpec] = {
    "topological": MethodSpec("topological", "topological-derivative growth (this package)",
                              lambda: TopologicalStrategy()),
    "topological_multi": MethodSpec("topological_multi", "topological growth, multi-eigenvector rule",
                                    lambda: TopologicalStrategy(rule="multi", k=4)),
    "topological_all": MethodSpec("topological_all", "topological point, every row on its own eigenvector",
                                  lambda: TopologicalAllRows()),
    "random": MethodSpec("random", "random point, small random init", lambda: RandomInsertion()),
    "identity": MethodSpec("identity", "Net2DeeperNet-style identity insertion (tanh block)",
                           lambda: IdentityInsertion()),
    "forward_thinking": MethodSpec("forward_thinking", "layer-wise training, earlier layers frozen",
                                   lambda: ForwardThinking(), freeze_existing=True),
    "stacking": MethodSpec("stacking", "copy of the neighbouring block at a random point",
                           lambda: StackingInsertion()),
    "zero_block": MethodSpec("zero_block", "standard transformer block, output projections zero, random point",
                             lambda: ZeroBlockInsertion()),
    "initial": MethodSpec("initial", "initial network, no growth", grows=False),
    "fixed_final": MethodSpec("fixed_final", "fixed network of the final size, from scratch", grows=False),
}
#: the default methods of the ResidualMLP (``topoderiv compare`` without ``--model``)
DEFAULT_METHODS = ("topological", "topological_all", "random", "identity", "forward_thinking", "initial",
                   "fixed_final")
#: every rule of the topological derivative and every baseline that applies to any block
_IMAGE_METHODS = ("topological", "topological_all", "topological_multi", "random", "identity", "forward_thinking",
                  "stacking", "initial", "fixed_final")
#: site kinds with a zero-initialised standard block (the ``zero_block`` method)
TRANSFORMER_KINDS = ("transformer_block", "mlp_block", "attention_block")
#: network families of :class:`Network` (and ``timm:<name>``)
MODELS = ("mlp", "cnn", "vit")


def parse_model(model: object, fn: str = "Network") -> str:
    """Checks a network family: ``"mlp"``, ``"cnn"``, ``"vit"`` or ``"timm:<name>"``."""
    if isinstance(model, str) and (model in MODELS or (model.startswith("timm:") and len(model) > 5)):
        return model
    raise ValueError(f"{fn}: model must be one of {MODELS} or 'timm:<model name>' (e.g. timm:vit_tiny_patch16_224), "
                     f"got {model!r}")


@dataclass(frozen=True)
class Network:
    """The network family every method of a comparison trains.

    Attributes:
        model: None (the task's own kind, ``task.config.model``), ``"mlp"``
            (:class:`topoderiv.models.ResidualMLP`), ``"cnn"`` (:class:`topoderiv.models.ResidualCNN`)
            or ``"vit"`` (:class:`topoderiv.models.ViT`), built by :meth:`Task.build_model` with the
            budget's sizes (``width`` of the MLP; ``channels`` of the CNN; ``embed_dim``,
            ``patch_size``, ``num_heads``, ``mlp_ratio`` of the ViT); or ``"timm:<name>"``:
            :func:`topoderiv.models.timm_model` (``timm.create_model(name, pretrained=False,
            num_classes=task.d_out, in_chans=C, img_size=H, depth=<depth>, **timm_kwargs)`` with
            its sites declared; needs timm, and a model that takes ``depth=``: the ViT family).
        insert: the site kind of the insertions (None: the family's default: linear, conv,
            transformer_block).
        timm_kwargs: further ``timm.create_model`` arguments (``timm:`` models only), e.g.
            ``{"embed_dim": 64, "num_heads": 2, "patch_size": 2}``.
    """

    model: Optional[str] = None
    insert: Optional[str] = None
    timm_kwargs: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model is not None:
            parse_model(self.model)
        if self.insert is not None and not isinstance(self.insert, str):
            raise ValueError(f"Network: insert must be a site kind name or None, got {self.insert!r}")
        if not isinstance(self.timm_kwargs, dict):
            raise ValueError(f"Network: timm_kwargs must be a dict, got {type(self.timm_kwargs).__name__}")
        if self.timm_kwargs and not self.is_timm:
            raise ValueError(f"Network: timm_kwargs are for timm:<name> models only, got model {self.model!r} with "
                             f"timm_kwargs {self.timm_kwargs}")
        for key in ("pretrained", "depth"):
            if key in self.timm_kwargs:
                raise ValueError(f"Network: timm_kwargs must not set {key!r} (" + (
                    "the model is always created with pretrained=False: no download" if key == "pretrained" else
                    "the depth is the budget's (--depth), and fixed_final's the final depth") + ")")

    @property
    def is_timm(self) -> bool:
        return self.model is not None and self.model.startswith("timm:")

    def family(self, task: Task) -> str:
        """The model kind this network builds on ``task`` (``model``, or the task's default)."""
        return self.model if self.model is not None else task.config.model

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "insert": self.insert, "timm_kwargs": dict(self.timm_kwargs)}

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "Network":
        d = d or {}
        return cls(d.get("model"), d.get("insert"), dict(d.get("timm_kwargs") or {}))

    def build(self, task: Task, depth: int, *, config: Optional[ModelConfig] = None,
              seed: Optional[int] = None) -> nn.Module:
        """The network with ``depth`` blocks (a CNN spreads them over its stages), sized by ``config``
        (a budget, default ``task.config``), initialised from ``torch.manual_seed(seed)`` when a seed
        is given."""
        cfg = task.config if config is None else config
        if self.is_timm:
            return self._build_timm(task, depth, seed)
        return task.build_model(depth, seed=seed, model=self.model, insert=self.insert, config=cfg)

    def _build_timm(self, task: Task, depth: int, seed: Optional[int]) -> nn.Module:
        name = self.model[len("timm:"):]
        x = task.train[0]
        if x.dim() != 4:
            raise ValueError(f"Network: a timm model needs an image task (inputs [N, C, H, W]), got task {task.name!r} "
                             f"with inputs of shape {list(x.shape)}")
        try:
            import timm  # noqa: F401
        except ImportError:
            raise ValueError(f"Network: model {self.model!r} needs timm, which is not installed (pip install timm); "
                             "the built-in families mlp, cnn and vit do not") from None
        from ..models import timm_model

        h, w = (int(v) for v in x.shape[2:])
        kwargs = {"num_classes": task.d_out, "in_chans": int(x.shape[1]), "img_size": h if h == w else [h, w],
                  "depth": int(depth), **self.timm_kwargs}
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return timm_model(name, insert=self.insert, **kwargs)
        except (TypeError, ValueError) as err:
            hint = (" (the depth of a timm model is set by --depth: only timm models whose constructor takes depth=, "
                    "the ViT family, can be grown and compared from the command line)" if "depth" in str(err) else "")
            raise ValueError(f"Network: timm model {name!r} with {kwargs}: {err}{hint}") from None

    def describe(self, net: nn.Module) -> str:
        """E.g. ``"ResidualCNN (conv sites: stages.0, stages.1), 5210 parameters"``."""
        specs = site_specs(net, "Network.describe")
        kinds = "/".join(dict.fromkeys(s.kind for s in specs))
        return (f"{type(net).__name__}{' (' + str(self.model) + ')' if self.is_timm else ''} "
                f"({kinds} sites: {', '.join(s.container for s in specs)}), {count_parameters(net)} parameters")


def site_kinds(net: nn.Module) -> List[str]:
    """The site kinds a network declares (in declaration order, without repeats)."""
    return list(dict.fromkeys(s.kind for s in site_specs(net, "site_kinds")))


def default_methods(family: str = "mlp", kinds: Optional[Sequence[str]] = None) -> List[str]:
    """The methods a comparison runs by default: :data:`DEFAULT_METHODS` for the MLP; for the other
    families (cnn, vit, timm) every rule of the topological derivative (top, all, multi) and every
    baseline that applies (random, identity, Forward Thinking, stacking; ``zero_block`` when the
    sites ``kinds`` are all of a transformer kind), initial and fixed_final."""
    if family == "mlp":
        return list(DEFAULT_METHODS)
    out = list(_IMAGE_METHODS)
    if kinds and all(k in TRANSFORMER_KINDS for k in kinds):
        out.insert(out.index("stacking") + 1, "zero_block")
    return out


def check_methods(methods: Sequence[str], kinds: Sequence[str], fn: str = "compare") -> None:
    """Raises ValueError when a method does not apply to a network with site kinds ``kinds``."""
    if "zero_block" in methods and not all(k in TRANSFORMER_KINDS for k in kinds):
        raise ValueError(f"{fn}: method 'zero_block' needs transformer sites {TRANSFORMER_KINDS} (a standard block "
                         f"with output projections), got a network with {list(kinds)} sites; for those the zero block "
                         f"is the identity insertion (method 'identity')")


def make_budget(task: Task, budget: Union[None, ModelConfig, Dict[str, Any]] = None) -> ModelConfig:
    """The task's :class:`ModelConfig`, overridden by ``budget`` (a config or a dict of fields)."""
    if budget is None:
        return task.config
    if isinstance(budget, ModelConfig):
        return budget
    if isinstance(budget, dict):
        unknown = set(budget) - set(ModelConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"make_budget: unknown budget fields {sorted(unknown)}; known: "
                             f"{sorted(ModelConfig.__dataclass_fields__)}")
        return replace(task.config, **{k: v for k, v in budget.items() if v is not None})
    raise TypeError(f"make_budget: budget must be None, a ModelConfig or a dict, got {type(budget).__name__}")


@dataclass
class RunResult:
    """One method on one seed.

    Attributes:
        method, seed: what ran.
        metric: the task's test metric of the final network. metric_name: its name.
        test_loss, val_loss, train_loss: losses of the final network (train = last epoch mean).
        depth, n_params: final architecture (depth: blocks in all site containers). epochs: epochs
            trained in total. wall_time: seconds. depths: blocks per site container (for several
            containers, e.g. the stages of a CNN; fixed_final copies the topological run's).
        history: the growth history (one round for the non-growing methods).
        model, optimizer: the trained model and its optimiser (``keep_model=True`` only).
    """

    method: str
    seed: int
    metric: float
    metric_name: str
    test_loss: float
    val_loss: float
    train_loss: float
    depth: int
    n_params: int
    epochs: int
    wall_time: float
    history: GrowthHistory = field(default_factory=GrowthHistory)
    depths: List[int] = field(default_factory=list)
    model: Optional[nn.Module] = field(default=None, repr=False, compare=False)
    optimizer: Optional[torch.optim.Optimizer] = field(default=None, repr=False, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        d = {k: getattr(self, k) for k in ("method", "seed", "metric", "metric_name", "test_loss", "val_loss",
                                           "train_loss", "depth", "n_params", "epochs", "wall_time", "depths")}
        d["history"] = self.history.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunResult":
        d = dict(d)
        hist = GrowthHistory.from_dict(d.pop("history", {}))
        return cls(history=hist, **d)


def _metric_fn(task: Task) -> Callable:
    return task.metric.fn


def run_method(
    task: Task,
    method: str,
    seed: int = 0,
    *,
    budget: Union[None, ModelConfig, Dict[str, Any]] = None,
    patience: int = 2,
    final_depth: Union[None, int, Sequence[int]] = None,
    strategy: Optional[InsertionStrategy] = None,
    score_batches: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = False,
    keep_model: bool = False,
    checkpoint_dir: Union[str, Path, None] = None,
    callbacks: Sequence[Callable[[Grower, RoundRecord], None]] = (),
    resume: bool = False,
    val_every_epoch: bool = True,
    network: Optional[Network] = None,
) -> RunResult:
    """Runs one method of :data:`METHODS` on ``task`` with seed ``seed``.

    Args:
        task: a :class:`topoderiv.tasks.Task`.
        method: a key of :data:`METHODS`.
        seed: seeds the initialisation (``torch.manual_seed``), the loader's shuffling and the
            grower's generator (random points / inits).
        budget: the network and budget (default ``task.config``; a dict overrides fields).
        patience: growth stops after this many rounds without validation improvement.
        final_depth: depth of ``"fixed_final"`` (default ``budget.depth + budget.rounds``), or its
            blocks per site container (a list, e.g. a topological run's ``depths``).
        strategy: replaces the method's strategy (growing methods only).
        score_batches: training batches used by the topological scorer / eps search (default all).
        device: where to train.
        progress: tqdm bars.
        keep_model: keep the trained model and its optimiser in the result.
        checkpoint_dir: the grower saves its checkpoint there after every round (and after the
            final "finish" round), before the callbacks run.
        callbacks: ``f(grower, record)`` after every round (the final "finish" round included).
        resume: continue the run whose checkpoint is in ``checkpoint_dir`` (exactly: the result
            is bit-identical to the uninterrupted run's with the same arguments); a fresh run when
            the folder holds no checkpoint yet.
        val_every_epoch: record the validation loss after every epoch (the compute-to-target of
            :meth:`Comparison.compute_summary` reads it); False: at the end of every round only.
        network: the network family (:class:`Network`; default the task's ResidualMLP).

    Every round records its compute (FLOPs of training, scoring and the eps search; wall time):
    :mod:`topoderiv.growth.compute`.

    Returns:
        :class:`RunResult`.

    Raises:
        ValueError: an unknown method; ``resume`` without ``checkpoint_dir``; a checkpoint of
            another method, task or seed.
    """
    fn = "run_method"
    if method not in METHODS:
        raise ValueError(f"{fn}: unknown method {method!r}; available: {', '.join(METHODS)}")
    if resume and checkpoint_dir is None:
        raise ValueError(f"{fn}: resume=True needs checkpoint_dir (the folder of the run to continue), got None")
    spec = METHODS[method]
    network = Network() if network is None else network
    cfg = make_budget(task, budget)
    task = task.to(device)
    t0 = time.perf_counter()
    train = task.loader("train", cfg.batch_size, seed=seed)
    total = cfg.total_epochs
    grows = spec.grows and cfg.rounds > 0
    strat = strategy if strategy is not None else (spec.strategy() if spec.strategy is not None else TopologicalStrategy())
    settings = dict(
        strategy=strat,
        epochs_per_round=cfg.epochs_per_round,
        initial_epochs=cfg.epochs_per_round if grows else total,
        max_rounds=cfg.rounds if grows else 0,
        max_depth=cfg.max_depth,
        patience=patience,
        score_batches=score_batches,
        seed=seed,
        progress=progress,
        test_data=task.test,
        test_metric=_metric_fn(task),
        freeze_existing=spec.freeze_existing,
        checkpoint_dir=checkpoint_dir,
        callbacks=callbacks,
        val_every_epoch=val_every_epoch,
    )
    run_meta = {"method": method, "task": task.name, "seed": seed, "budget_epochs": total}
    if resume and (Path(checkpoint_dir) / "model.json").is_file():
        grower = Grower.from_checkpoint(checkpoint_dir, train, task.val, task.loss_fn, optimizer=cfg.make_optimizer,
                                        device=device, **settings)
        saved = {k: grower.history.meta.get(k) for k in run_meta}
        if saved != run_meta:
            raise ValueError(f"{fn}: the checkpoint in {str(checkpoint_dir)!r} must be of the run asked for, got "
                             f"{saved} in the checkpoint, {run_meta} asked for")
        model = grower.model
    else:
        if method == "fixed_final":
            final = cfg.depth + cfg.rounds if final_depth is None else final_depth
            model = build_final(network, task, final, config=cfg, seed=seed).to(device)
        else:
            model = network.build(task, cfg.depth, config=cfg, seed=seed).to(device)
        if method == "zero_block":
            check_methods([method], site_kinds(model), fn)
        grower = Grower(model, cfg.make_optimizer, train, task.val, task.loss_fn, **settings)
    hist = grower.history
    hist.meta.update(run_meta)  # in every checkpoint: a resume checks it
    if hist.stop_reason is None:  # else a resumed run whose growth had stopped: on to the finish phase
        hist = grower.run()
    used = sum(r.epochs for r in hist.rounds)
    if used < total:  # growth stopped early: spend the rest of the budget on the final network
        grower.finish(total - used)  # recorded as a last round; checkpoint and callbacks as after any
    res = task.evaluate(model, "test")
    last = hist.rounds[-1]
    return RunResult(
        method=method,
        seed=seed,
        metric=res[task.metric.name],
        metric_name=task.metric.name,
        test_loss=res["loss"],
        val_loss=last.val_loss,
        train_loss=last.train_loss,
        depth=network_depth(model),
        n_params=count_parameters(model),
        epochs=sum(r.epochs for r in hist.rounds),
        wall_time=time.perf_counter() - t0,
        history=hist,
        depths=container_depths(model),
        model=model if keep_model else None,
        optimizer=grower.optimizer if keep_model else None,
    )


def container_depths(net: nn.Module) -> List[int]:
    """Blocks in each site container of ``net``, in declaration order."""
    return [len(net.get_submodule(s.container)) for s in site_specs(net, "container_depths")]


def build_final(network: Network, task: Task, final: Union[int, Sequence[int]], *,
                config: Optional[ModelConfig] = None, seed: Optional[int] = None) -> nn.Module:
    """The fixed network of the final size, from scratch: ``network.build(task, final)`` for an int, or
    a network with ``final[i]`` blocks in site container ``i``. With one container that is
    ``network.build(task, final[0])``; with several (a CNN's stages) the network is built with
    ``sum(final)`` blocks (spread over the stages by the task), then every container grows to its
    count with FRESH blocks (a copy of one of its blocks with every submodule's
    ``reset_parameters()``: PyTorch's default initialisation, as in a from-scratch build of our
    models) or loses its last blocks.

    Raises:
        ValueError: ``final`` is not an int >= 0 or a list with one int >= 0 per container, or a
            container that must grow is empty.
    """
    fn = "build_final"
    if isinstance(final, int) and not isinstance(final, bool):
        if final < 0:
            raise ValueError(f"{fn}: final depth must be >= 0, got {final}")
        return network.build(task, int(final), config=config, seed=seed)
    final = list(final)
    if not final or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in final):
        raise ValueError(f"{fn}: final must be an int >= 0 or a non-empty list of ints >= 0 (blocks per site "
                         f"container), got {final!r}")
    if len(final) == 1:
        return network.build(task, final[0], config=config, seed=seed)
    net = network.build(task, sum(final), config=config, seed=seed)
    specs = site_specs(net, fn)
    if len(specs) != len(final):
        raise ValueError(f"{fn}: final must have one depth per site container of {type(net).__name__} "
                         f"({[s.container for s in specs]}), got {final}")
    for spec, want in zip(specs, final):
        cont = net.get_submodule(spec.container)
        while len(cont) > want:
            del cont[len(cont) - 1]
        while len(cont) < want:
            if len(cont) == 0:
                raise ValueError(f"{fn}: container {spec.container!r} of {type(net).__name__} is empty; cannot build "
                                 f"fresh blocks for it")
            blk = copy.deepcopy(cont[0])
            for mod in blk.modules():
                if callable(getattr(mod, "reset_parameters", None)):
                    mod.reset_parameters()
            cont.append(blk)
    return net


# --------------------------------------------------------------------------------------------
# comparison


def mean_std(vals: Sequence[Optional[float]]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value) of the finite values of ``vals`` (None,
    inf and nan skipped); ``(nan, nan)`` when none is left."""
    vals = [float(v) for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


@dataclass
class Comparison:
    """Results of :func:`compare`: every run, and mean +- std per method.

    Attributes:
        task: task name. metric_name, higher_is_better: the test metric.
        methods, seeds: what ran. budget: the :class:`ModelConfig` fields used.
        runs: every :class:`RunResult`. meta: anything else (command line, wall time).
    """

    task: str
    metric_name: str
    higher_is_better: bool
    methods: List[str]
    seeds: List[int]
    budget: Dict[str, Any]
    runs: List[RunResult] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    def by_method(self, method: str) -> List[RunResult]:
        return [r for r in self.runs if r.method == method]

    def summary(self) -> Dict[str, Dict[str, float]]:
        """``{method: {"mean", "std", "n", "depth", "params", "time"}}`` over seeds."""
        out: Dict[str, Dict[str, float]] = {}
        for m in self.methods:
            rs = self.by_method(m)
            mean, std = mean_std([r.metric for r in rs])
            out[m] = {
                "mean": mean,
                "std": std,
                "n": len(rs),
                "depth": statistics.fmean([r.depth for r in rs]) if rs else math.nan,
                "params": statistics.fmean([r.n_params for r in rs]) if rs else math.nan,
                "time": statistics.fmean([r.wall_time for r in rs]) if rs else math.nan,
                "epochs": statistics.fmean([r.epochs for r in rs]) if rs else math.nan,
            }
        return out

    def ranking(self) -> List[str]:
        """Methods from best to worst mean metric."""
        s = self.summary()
        sign = -1.0 if self.higher_is_better else 1.0
        return sorted(self.methods, key=lambda m: (math.isnan(s[m]["mean"]), sign * s[m]["mean"]))

    def table(self, per_seed: bool = True) -> str:
        """A markdown table: mean +- std of the test metric, final depth, parameters, epochs, time."""
        s = self.summary()
        best = self.ranking()[0] if self.methods else None
        arrow = "higher is better" if self.higher_is_better else "lower is better"
        head = f"| method | test {self.metric_name} (mean ± std, {arrow}) | depth | params | epochs | time/run |"
        sep = "|---|---|---|---|---|---|"
        if per_seed:
            head += " per seed |"
            sep += "---|"
        lines = [head, sep]
        for m in self.methods:
            d = s[m]
            val = f"{d['mean']:.4f} ± {d['std']:.4f}"
            if m == best:
                val = f"**{val}**"
            line = (f"| {m} | {val} | {d['depth']:.1f} | {d['params']:.0f} | {d['epochs']:.0f} | "
                    f"{d['time']:.1f} s |")
            if per_seed:
                line += " " + ", ".join(f"{r.metric:.4f}" for r in sorted(self.by_method(m), key=lambda r: r.seed)) + " |"
            lines.append(line)
        return "\n".join(lines)

    # -- compute to a target validation loss -------------------------------------------------------

    def _target_arg(self, target: Optional[float], fn: str) -> Optional[float]:
        if target is None:
            target = self.meta.get("target")
        if target is None:
            return None
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(float(target)):
            raise ValueError(f"{fn}: target must be None or a finite number (a validation loss), got {target!r}")
        return float(target)

    def targets(self, target: Optional[float] = None) -> Dict[int, float]:
        """The target validation loss of every seed: ``target`` (default ``meta["target"]``) for all, or
        when None, the best validation loss of ``fixed_final`` on that seed (over every evaluation:
        every epoch when recorded).

        Raises:
            ValueError: no target given and ``fixed_final`` is not among the methods (or lacks a seed).
        """
        fn = "Comparison.targets"
        t = self._target_arg(target, fn)
        if t is not None:
            return {s: t for s in self.seeds}
        if "fixed_final" not in self.methods:
            raise ValueError(f"{fn}: target must be given when 'fixed_final' is not among the methods (the default "
                             f"target is its best validation loss), got methods {self.methods}")
        fixed = {r.seed: r for r in self.by_method("fixed_final")}
        missing = [s for s in self.seeds if s not in fixed]
        if missing:
            raise ValueError(f"{fn}: the default target needs a fixed_final run for every seed, got none for seeds "
                             f"{missing}")
        return {s: best_val(fixed[s].history) for s in self.seeds}

    def reach(self, target: Optional[float] = None) -> Dict[str, Dict[int, Reach]]:
        """``{method: {seed: Reach}}``: when each run first reached its seed's target
        (:func:`topoderiv.growth.compute.compute_to_target`, which documents the interpolation)."""
        targets = self.targets(target)
        return {m: {r.seed: compute_to_target(r.history, targets[r.seed]) for r in self.by_method(m)}
                for m in self.methods}

    def compute_summary(self, target: Optional[float] = None) -> Dict[str, Dict[str, Any]]:
        """Per method: the compute to the target over the seeds that reached it, and the saving.

        ``{"seeds", "reached", "flops", "flops_std", "time", "time_std", "flops_saving",
        "flops_saving_std", "time_saving", "time_saving_std", "paired", "total_flops",
        "total_time"}``: ``flops``/``time`` mean and std over the seeds that reached the target;
        ``*_saving`` = ``1 - C_method / C_fixed_final`` per seed (same seed, both reached;
        ``paired`` such seeds), mean and std; ``total_*`` the whole run's compute (mean over seeds).
        NaN where nothing is defined.
        """
        reach = self.reach(target)
        fixed = reach.get("fixed_final", {})
        out: Dict[str, Dict[str, Any]] = {}
        for m in self.methods:
            rs = reach[m]
            ok = {s: r for s, r in rs.items() if r.reached}
            fl, fl_sd = mean_std([r.flops for r in ok.values()])
            tm, tm_sd = mean_std([r.time for r in ok.values()])
            pairs = [s for s in ok if s in fixed and fixed[s].reached]
            sv_f, sv_f_sd = mean_std([1.0 - ok[s].flops / fixed[s].flops for s in pairs
                                       if fixed[s].flops > 0 and math.isfinite(ok[s].flops)])
            sv_t, sv_t_sd = mean_std([1.0 - ok[s].time / fixed[s].time for s in pairs if fixed[s].time > 0])
            curves = [compute_curve(r.history) for r in self.by_method(m)]
            tot_f, _ = mean_std([c.total_flops for c in curves])
            tot_t, _ = mean_std([c.total_time for c in curves])
            out[m] = {"seeds": len(rs), "reached": len(ok), "flops": fl, "flops_std": fl_sd, "time": tm,
                      "time_std": tm_sd, "flops_saving": sv_f, "flops_saving_std": sv_f_sd, "time_saving": sv_t,
                      "time_saving_std": sv_t_sd, "paired": len(pairs), "total_flops": tot_f, "total_time": tot_t}
        return out

    def compute_table(self, target: Optional[float] = None) -> str:
        """A markdown table of :meth:`compute_summary`, with a line saying what the target is."""
        targets = self.targets(target)
        s = self.compute_summary(target)
        t = self._target_arg(target, "Comparison.compute_table")
        if t is not None:
            what = f"validation loss {t:.4g} (given)"
        else:
            vals = list(targets.values())
            mean, std = mean_std(vals)
            what = (f"on each seed, the best validation loss of fixed_final on that seed (mean {mean:.4g} ± "
                    f"{std:.2g} over seeds)")
        n = len(self.seeds)

        def pm(mean: float, std: float, reached: int, scale: float = 1.0, fmt: str = ".3g") -> str:
            if not math.isfinite(mean):
                return "not counted" if reached else "not reached"  # runs recorded before FLOPs were counted
            return f"{mean / scale:{fmt}} ± {std / scale:{fmt}}"

        def saving(mean: float, std: float, paired: int) -> str:
            if not math.isfinite(mean):
                return "—"
            return f"{100 * mean:+.0f}% ± {100 * std:.0f}%" + (f" ({paired} seeds)" if paired != n else "")

        lines = [f"Target: {what}.", "",
                 "| method | reached | GFLOP to target | saving (FLOPs) | seconds to target | saving (time) | "
                 "GFLOP whole run |",
                 "|---|---|---|---|---|---|---|"]
        for m in self.methods:
            d = s[m]
            lines.append(f"| {m} | {d['reached']}/{d['seeds']} | {pm(d['flops'], d['flops_std'], d['reached'], 1e9)} | "
                         f"{saving(d['flops_saving'], d['flops_saving_std'], d['paired'])} | "
                         f"{pm(d['time'], d['time_std'], d['reached'], 1.0, '.3g')} | "
                         f"{saving(d['time_saving'], d['time_saving_std'], d['paired'])} | "
                         f"{d['total_flops'] / 1e9:.3g} |")
        return "\n".join(lines)

    def compute_dict(self, target: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """JSON-able compute-to-target results (targets, summary, every run's crossing), or None when
        no target can be set (no ``target`` and no ``fixed_final``)."""
        try:
            targets = self.targets(target)
        except ValueError:
            return None
        reach = self.reach(target)
        return {"target": self._target_arg(target, "Comparison.compute_dict"),
                "targets": {str(k): v for k, v in targets.items()},
                "summary": self.compute_summary(target),
                "runs": [{"method": m, "seed": sd, **r.to_dict()} for m in self.methods for sd, r in
                         sorted(reach[m].items())]}

    def to_dict(self) -> Dict[str, Any]:
        return {"format": "topoderiv-comparison", "version": 1, "task": self.task, "metric_name": self.metric_name,
                "higher_is_better": self.higher_is_better, "methods": self.methods, "seeds": self.seeds,
                "budget": self.budget, "summary": self.summary(), "compute": self.compute_dict(), "meta": self.meta,
                "runs": [r.to_dict() for r in self.runs]}

    def to_json(self, path: Union[str, Path]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str))
        return path

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Comparison":
        return cls(d["task"], d["metric_name"], d["higher_is_better"], list(d["methods"]), list(d["seeds"]),
                   dict(d["budget"]), [RunResult.from_dict(r) for r in d.get("runs", [])], dict(d.get("meta", {})))

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "Comparison":
        return cls.from_dict(json.loads(Path(path).read_text()))


def compare(
    task: Task,
    methods: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = (0, 1, 2),
    budget: Union[None, ModelConfig, Dict[str, Any]] = None,
    *,
    patience: int = 2,
    score_batches: Optional[int] = None,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
    target: Optional[float] = None,
    val_every_epoch: bool = True,
    network: Optional[Network] = None,
    on_run: Optional[Callable[["Comparison", RunResult], None]] = None,
) -> Comparison:
    """Runs every method on every seed with the same budget; mean +- std of the test metric.

    Args:
        task: the task (its data are fixed; seeds vary initialisation, batch order and the
            baselines' random choices).
        methods: keys of :data:`METHODS` (default :func:`default_methods` of the network:
            :data:`DEFAULT_METHODS` for the MLP).
        seeds: training seeds.
        budget: network and training budget (default ``task.config``; dict overrides fields).
        patience, score_batches, device: see :func:`run_method`.
        progress: a tqdm bar over the runs.
        log: called with one line per finished run (e.g. ``print``).
        target: the validation loss of the compute-to-target table (``meta["target"]``; None:
            on each seed, the best validation loss of ``fixed_final``).
        val_every_epoch: record the validation loss after every epoch (default; the compute to
            the target is then read per epoch, not per round).
        network: the network family every method trains (:class:`Network`; default the task's
            ResidualMLP). ``fixed_final`` copies the topological run's blocks per site container.
        on_run: called as ``on_run(comparison, run)`` after every run (e.g. to save partial results).

    Returns:
        :class:`Comparison`; ``.table()`` is the markdown table.

    Raises:
        ValueError: unknown or repeated methods, no seeds, a bad target, a method that does not
            apply to the network (``zero_block`` without transformer sites).
    """
    network = Network() if network is None else network
    cfg = make_budget(task, budget)
    probe = network.build(task, cfg.depth, config=cfg, seed=0)
    kinds = site_kinds(probe)
    methods = list(default_methods(network.family(task), kinds) if methods is None else methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"compare: unknown method {m!r}; available: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"compare: methods must be distinct, got {methods}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("compare: seeds must hold at least one seed")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                               or not math.isfinite(float(target))):
        raise ValueError(f"compare: target must be None or a finite number (a validation loss), got {target!r}")
    check_methods(methods, kinds)
    # the topological run of a seed fixes the depth of "fixed_final" for that seed
    order = sorted(methods, key=lambda m: (m != "topological", methods.index(m)))
    comp = Comparison(task.name, task.metric.name, task.metric.higher_is_better, methods, seeds,
                      {k: getattr(cfg, k) for k in ModelConfig.__dataclass_fields__} | {"total_epochs": cfg.total_epochs,
                                                                                          "patience": patience})
    comp.meta["network"] = {**network.to_dict(), "family": network.family(task)}
    comp.meta["network_description"] = network.describe(probe)
    comp.meta["site_kinds"] = kinds
    del probe
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(methods) * len(seeds), desc=f"compare {task.name}", unit="run")
    t0 = time.perf_counter()
    try:
        for seed in seeds:
            td_depths: Optional[List[int]] = None
            for m in order:
                final_depth = td_depths if m == "fixed_final" else None
                r = run_method(task, m, seed, budget=cfg, patience=patience, final_depth=final_depth,
                               score_batches=score_batches, device=device, val_every_epoch=val_every_epoch,
                               network=network)
                if m == "topological":
                    td_depths = r.depths
                comp.runs.append(r)
                if on_run is not None:
                    on_run(comp, r)
                if log is not None:
                    flops = compute_curve(r.history).total_flops
                    log(f"seed {seed} {m:<17} {task.metric.name} = {r.metric:.4f}  depth {r.depth}  "
                        f"params {r.n_params}  {flops / 1e9:.3g} GFLOP  {r.wall_time:.1f} s")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(method=m, seed=seed)
    finally:
        if bar is not None:
            bar.close()
    comp.meta["wall_time"] = time.perf_counter() - t0
    comp.meta["target"] = None if target is None else float(target)
    comp.meta["device"] = str(device)
    comp.meta["torch_threads"] = torch.get_num_threads()
    return comp
