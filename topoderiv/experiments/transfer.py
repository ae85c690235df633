"""Transfer learning by insertion (the paper's second application), on a small ViT.

A :class:`topoderiv.models.ViT` is trained on a SOURCE task, then adapted to a related TARGET task
with a new head. Every method starts from the same linear probe (the source network frozen, a new
head trained ``warmup_epochs`` on the target), then trains its own parameter set for ``epochs``
more epochs with the same optimiser (Adam, the same learning rate) and the same mini-batches:

``head``
    the head only (a linear probe trained ``warmup_epochs + epochs`` epochs).
``full``
    every parameter (the linear probe, then full fine-tuning: "LP-FT").
``td``
    the topological derivative: :func:`topoderiv.score` on the TARGET training data (costates
    through the frozen network: scoring differentiates the loss w.r.t. the activations, never
    the parameters), insert a TD-initialised ``transformer_block`` at the best point with eps from
    :func:`topoderiv.search_eps`, rescore, ... ``blocks`` times; then only the new blocks and the
    head train.
``td_live``
    ``td``'s blocks (same points, phi and eps), then every hidden unit that TD leaves at zero on
    both sides (an ``mlp.fc1`` row with a zero ``mlp.fc2`` column, a V row of ``attn.qkv`` with a
    zero ``attn.proj`` column) gets random input weights (PyTorch's default bound): the function
    is unchanged (its output column is still zero), but the unit now trains. With the ``"all"``
    rule an MLP of hidden width ``h > D + 1`` keeps at most ``D + 1`` live units (the rank of
    ``M``); the others get no gradient ever (both their input row and output column are zero).
``random_phi``
    the same points as ``td`` (one after the other, as ``td`` chose them), the same block family
    (W_Q, W_K fixed random, eps-scaled V / proj / MLP) but a random direction ``phi`` (unit
    norm, as TD's) with eps searched the same way: isolates TD's direction.
``random_blocks``
    standard timm blocks with PyTorch's default (random) initialisation at the same points as
    ``td``: new blocks + head train.
``zero_blocks``
    standard blocks with random weights and zero output projections (the identity at insertion,
    :meth:`topoderiv.sites.Site.identity_block`) at uniformly random points: new blocks + head
    train.

Data (no download): scikit-learn's 8x8 digits as ``[N, 1, 8, 8]`` images scaled by the source
training pixels' mean and std. Source: digits 0-4 (80% train, 20% test). Target (``target=``):
``"split"``: digits 5-9 relabelled 0-4; ``"rotated"``: the same, rotated by 90 degrees;
``"inverted"``: the same, with inverted intensities. ``n_target_train`` target images (drawn by
the seed) train, the other target images test. Metric: target test accuracy.

:func:`run_transfer` returns a :class:`TransferResult` (JSON-serialisable: :meth:`~TransferResult.to_dict`,
:meth:`~TransferResult.to_json`, :meth:`~TransferResult.from_dict`) whose :meth:`~TransferResult.table`
is a markdown table with the trainable parameters and the target accuracy (mean +- std over
seeds). The ``topoderiv transfer`` sub-command (:func:`add_transfer_parser`, :func:`cmd_transfer`)
runs it and writes ``results.md`` / ``results.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..growth import count_parameters, evaluate, fit, insert, insert_block, score, search_eps
from ..models import ViT
from ..sites import sites
from .argtypes import int_at_least, positive_float
from .compare import mean_std
from .tasks import Batches

__all__ = ["TransferConfig", "TransferResult", "METHODS", "TARGETS", "INSERT_KINDS", "transfer_data", "accuracy",
           "train_source", "new_head", "linear_probe", "freeze_all_but", "trainable", "count_trainable",
           "insert_blocks", "dead_units", "revive", "adapt", "run_transfer", "add_transfer_parser", "cmd_transfer"]

#: the methods, in table order
METHODS = ("head", "full", "td", "td_live", "random_phi", "random_blocks", "zero_blocks")
#: target tasks derived from the source (digits 0-4)
TARGETS = ("split", "rotated", "inverted")
#: methods that insert blocks
INSERTING = ("td", "td_live", "random_phi", "random_blocks", "zero_blocks")
#: kinds of inserted blocks
INSERT_KINDS = ("transformer_block", "mlp_block", "attention_block")


@dataclass
class TransferConfig:
    """Network, budget and data of a transfer experiment.

    Attributes:
        target: ``"split"`` / ``"rotated"`` / ``"inverted"`` (see the module docstring).
        n_target_train: target training images (the rest of the target images test).
        embed_dim, depth, num_heads, mlp_ratio, patch_size: the source ViT.
        source_epochs: source training epochs (all parameters).
        warmup_epochs: head-only epochs on the target before every method (the linear probe).
        epochs: epochs of each method after the probe.
        blocks: blocks inserted by the inserting methods.
        lr: Adam learning rate (source, probe and every method). batch_size: mini-batch size.
        rule: TD rule (``"all"``: every unit of a sub-block starts on a singular pair; with
            ``"top"`` one unit of the new block is alive).
        insert: the kind of the inserted blocks (the ViT's ``insert``): ``"transformer_block"``
            (timm's Block), ``"mlp_block"`` or ``"attention_block"``.
    """

    target: str = "split"
    n_target_train: int = 250
    embed_dim: int = 32
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    patch_size: int = 2
    source_epochs: int = 50
    warmup_epochs: int = 20
    epochs: int = 60
    blocks: int = 2
    lr: float = 1e-3
    batch_size: int = 64
    rule: str = "all"
    insert: str = "transformer_block"

    def __post_init__(self) -> None:
        fn = "TransferConfig"
        if self.target not in TARGETS:
            raise ValueError(f"{fn}: target must be one of {TARGETS}, got {self.target!r}")
        for name, lo in (("n_target_train", 5), ("embed_dim", 1), ("depth", 0), ("num_heads", 1), ("patch_size", 1),
                         ("source_epochs", 0), ("warmup_epochs", 0), ("epochs", 0), ("blocks", 1),
                         ("batch_size", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")
        if 8 % self.patch_size:
            raise ValueError(f"{fn}: patch_size must divide the 8x8 images (1, 2, 4 or 8), got {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{fn}: num_heads must divide embed_dim = {self.embed_dim}, got {self.num_heads}")
        for name in ("lr", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"{fn}: {name} must be a finite number > 0, got {v!r}")
        if self.insert not in INSERT_KINDS:
            raise ValueError(f"{fn}: insert must be one of {INSERT_KINDS}, got {self.insert!r}")
        if self.rule not in ("top", "all", "multi", "reference"):
            raise ValueError(f"{fn}: rule must be one of ('top', 'all', 'multi', 'reference'), got {self.rule!r}")


# --------------------------------------------------------------------------------------------
# data


Split = Tuple[Tensor, Tensor]


def transfer_data(target: str = "split", *, seed: int = 0, n_target_train: int = 250) -> Dict[str, Split]:
    """Source and target splits from scikit-learn's bundled digits (no download).

    Returns ``{"source_train", "source_test", "target_train", "target_test"}``, each
    ``(x [N, 1, 8, 8] float32, y [N] int64)``. Source: digits 0-4, permuted by ``seed``, 80% train.
    Target: digits 5-9 relabelled 0-4 (``"rotated"``: rotated by 90 degrees; ``"inverted"``:
    ``16 - pixel``), permuted by ``seed``, the first ``n_target_train`` train. Pixels are scaled by
    the source training pixels' mean and std (one scalar each).
    """
    fn = "transfer_data"
    if target not in TARGETS:
        raise ValueError(f"{fn}: target must be one of {TARGETS}, got {target!r}")
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float64)[:, None]  # [N, 1, 8, 8], values 0..16
    y = torch.as_tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    src, tgt = (y < 5).nonzero().flatten(), (y >= 5).nonzero().flatten()
    if not 5 <= n_target_train < tgt.numel():
        raise ValueError(f"{fn}: n_target_train must be in [5, {tgt.numel() - 1}], got {n_target_train!r}")
    src = src[torch.randperm(src.numel(), generator=g)]
    tgt = tgt[torch.randperm(tgt.numel(), generator=g)]
    xs, ys = x[src], y[src]
    xt, yt = x[tgt], y[tgt] - 5
    if target == "rotated":
        xt = torch.rot90(xt, 1, dims=(2, 3))
    elif target == "inverted":
        xt = 16.0 - xt
    n_src = int(0.8 * xs.shape[0])
    mean, std = xs[:n_src].mean(), xs[:n_src].std()
    norm = lambda t: ((t - mean) / std).float().contiguous()  # noqa: E731
    n = int(n_target_train)
    return {"source_train": (norm(xs[:n_src]), ys[:n_src].contiguous()),
            "source_test": (norm(xs[n_src:]), ys[n_src:].contiguous()),
            "target_train": (norm(xt[:n]), yt[:n].contiguous()),
            "target_test": (norm(xt[n:]), yt[n:].contiguous())}


def accuracy(pred: Tensor, y: Tensor) -> Tensor:
    """Batch-mean accuracy (0-dim float64 tensor)."""
    return (pred.detach().argmax(dim=1) == y).double().mean()


# --------------------------------------------------------------------------------------------
# training phases


def _adam(params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(list(params), lr=lr)


def trainable(model: nn.Module) -> List[nn.Parameter]:
    """The parameters with ``requires_grad``."""
    return [p for p in model.parameters() if p.requires_grad]


def count_trainable(model: nn.Module) -> int:
    """Elements of the trainable parameters."""
    return sum(p.numel() for p in trainable(model))


def freeze_all_but(model: nn.Module, keep: Sequence[nn.Module]) -> None:
    """``requires_grad = False`` on every parameter of ``model`` except those of ``keep``."""
    ids = {id(p) for m in keep for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def train_source(cfg: TransferConfig, data: Dict[str, Split], seed: int, *, progress: bool = False) -> ViT:
    """The source ViT (``torch.manual_seed(seed)`` init), every parameter trained ``source_epochs``."""
    torch.manual_seed(seed)
    model = ViT(8, cfg.patch_size, 1, 5, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, insert=cfg.insert)
    x, y = data["source_train"]
    fit(model, _adam(model.parameters(), cfg.lr), Batches(x, y, cfg.batch_size, shuffle=True, seed=seed),
        F.cross_entropy, cfg.source_epochs, progress=progress, desc="source")
    return model


def new_head(model: ViT, num_classes: int, seed: int) -> ViT:
    """A copy of ``model`` with a fresh ``head`` (PyTorch's default init from ``seed``) of ``num_classes``."""
    out = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out.head = nn.Linear(model.embed_dim, num_classes)
    out.num_classes = num_classes
    return out


def _target_loader(cfg: TransferConfig, data: Dict[str, Split], seed: int, phase: int) -> Batches:
    x, y = data["target_train"]
    return Batches(x, y, cfg.batch_size, shuffle=True, seed=1000 * seed + phase)


def linear_probe(source: ViT, cfg: TransferConfig, data: Dict[str, Split], seed: int) -> ViT:
    """The shared start of every method: a new 5-class head trained ``warmup_epochs`` on the
    target, everything else frozen (``requires_grad = False`` on every other parameter)."""
    model = new_head(source, 5, seed)
    freeze_all_but(model, [model.head])
    fit(model, _adam(trainable(model), cfg.lr), _target_loader(cfg, data, seed, 0), F.cross_entropy,
        cfg.warmup_epochs)
    return model


def _unit_random_phi(site: Any, block: nn.Module, gen: torch.Generator) -> Dict[str, Tensor]:
    phi = site.random_phi(block, gen, 1.0)
    norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in phi.values()))
    return {k: t / norm for k, t in phi.items()}


def _insert_searched(model: ViT, point: int, phi: Any, scoring: Sequence[Tensor], info: Dict[str, Any]) -> None:
    """``insert`` with eps from :func:`search_eps` on the target training data; when no eps of the
    grid lowers the loss, the smallest grid eps (eps = 0 would leave a dead block: both its output
    projections and their inputs zero, so no gradient reaches it)."""
    best, losses = search_eps(model, point, phi, scoring, F.cross_entropy)
    eps = best if best is not None else min(e for e in losses if e > 0)
    insert(model, point, phi, eps)
    info["eps"].append(eps)
    info["eps_searched"].append(best is not None)
    info["loss_before"].append(losses[0.0])
    info["loss_after"].append(losses[eps])


def dead_units(block: nn.Module) -> Dict[str, List[int]]:
    """Hidden units of a transformer block with a zero input row AND a zero output column (they
    never get a gradient): ``{"mlp": [...], "attn": [...]}`` (attention: V rows of ``attn.qkv``)."""
    out: Dict[str, List[int]] = {"mlp": [], "attn": []}
    with torch.no_grad():
        mlp = getattr(block, "mlp", None)
        if mlp is not None:
            w_in = mlp.fc1.weight if mlp.fc1.bias is None else torch.cat([mlp.fc1.weight, mlp.fc1.bias[:, None]], 1)
            zero = (w_in == 0).all(1) & (mlp.fc2.weight == 0).all(0)
            out["mlp"] = zero.nonzero().flatten().tolist()
        attn = getattr(block, "attn", None)
        if attn is not None:
            D = attn.dim
            v = attn.qkv.weight[2 * D :]
            if attn.qkv.bias is not None:
                v = torch.cat([v, attn.qkv.bias[2 * D :, None]], 1)
            zero = (v == 0).all(1) & (attn.proj.weight == 0).all(0)
            out["attn"] = zero.nonzero().flatten().tolist()
    return out


def revive(block: nn.Module, gen: torch.Generator) -> Dict[str, int]:
    """Gives every dead unit of :func:`dead_units` random input weights ``U(-1/sqrt(D), 1/sqrt(D))``
    (output columns stay zero: the block's function is unchanged); returns the counts revived."""
    dead = dead_units(block)
    with torch.no_grad():
        for key, lin, off in (("mlp", getattr(getattr(block, "mlp", None), "fc1", None), 0),
                              ("attn", getattr(getattr(block, "attn", None), "qkv", None), None)):
            if lin is None or not dead[key]:
                continue
            if off is None:
                off = 2 * block.attn.dim
            bound = 1.0 / math.sqrt(lin.in_features)
            for u in dead[key]:
                lin.weight[off + u] = ((torch.rand(lin.in_features, generator=gen) * 2 - 1) * bound).to(lin.weight)
                if lin.bias is not None:
                    lin.bias[off + u] = float((torch.rand(1, generator=gen) * 2 - 1) * bound)
    return {k: len(v) for k, v in dead.items()}


def insert_blocks(model: ViT, method: str, cfg: TransferConfig, data: Dict[str, Split], seed: int,
                  td_points: Optional[Sequence[int]] = None) -> Tuple[List[nn.Module], Dict[str, Any]]:
    """Inserts ``cfg.blocks`` blocks into ``model`` (in place) the way ``method`` does; returns the
    new blocks and a record (points, eps, mu, ...).

    ``td_points``: the points ``td`` chose on this seed (one after the other), required by
    ``random_phi`` and ``random_blocks``.
    """
    fn = "insert_blocks"
    if method not in INSERTING:
        raise ValueError(f"{fn}: method must be one of {INSERTING}, got {method!r}")
    if method in ("random_phi", "random_blocks") and (td_points is None or len(td_points) != cfg.blocks):
        raise ValueError(f"{fn}: method {method!r} needs td_points, the {cfg.blocks} points td chose, got {td_points!r}")
    gen = torch.Generator().manual_seed(7919 * seed + INSERTING.index(method))
    x, y = data["target_train"]
    scoring = [(x[i : i + 256], y[i : i + 256]) for i in range(0, x.shape[0], 256)]
    info: Dict[str, Any] = {"points": [], "eps": [], "eps_searched": [], "loss_before": [], "loss_after": [],
                            "mu": []}
    before = set(map(id, model.blocks))
    for i in range(cfg.blocks):
        if method in ("td", "td_live"):
            rep = score(model, scoring, F.cross_entropy, rule=cfg.rule)
            best = rep.best
            if best is None:  # every mu <= 0: nothing lowers J at second order; take the largest mu
                best = max(rep.points, key=lambda p: p.mu)
            info["points"].append(best.point)
            info["mu"].append(best.mu)
            _insert_searched(model, best.point, best.phi, scoring, info)
        elif method == "random_phi":
            point = int(td_points[i])
            site = sites(model)[point]
            phi = _unit_random_phi(site, site.new_block(), gen)
            info["points"].append(point)
            _insert_searched(model, point, phi, scoring, info)
        elif method == "random_blocks":
            point = int(td_points[i])
            site = sites(model)[point]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                block = site.construct(site.opts())  # PyTorch's default init
            info["points"].append(point)
            insert_block(model, point, block)
        else:  # zero_blocks
            all_sites = sites(model)
            point = int(torch.randint(0, len(all_sites), (1,), generator=gen))
            info["points"].append(point)
            insert_block(model, point, all_sites[point].identity_block(gen))
    new = [b for b in model.blocks if id(b) not in before]
    if method == "td_live":  # after all insertions: the scoring and eps search are td's exactly
        info["revived"] = [revive(b, gen) for b in new]
    return new, info


def adapt(probe: ViT, method: str, cfg: TransferConfig, data: Dict[str, Split], seed: int, *,
          td_points: Optional[Sequence[int]] = None) -> Tuple[ViT, Dict[str, Any]]:
    """One method on one seed from the linear probe ``probe`` (not modified): the adapted model
    (only the method's parameters have ``requires_grad``) and its record (trainable parameters,
    target test accuracy and loss, inserted points, eps, wall time)."""
    fn = "adapt"
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
    t0 = time.perf_counter()
    model = copy.deepcopy(probe)
    info: Dict[str, Any] = {}
    if method == "head":
        freeze_all_but(model, [model.head])
    elif method == "full":
        freeze_all_but(model, [model])
    else:
        freeze_all_but(model, [])
        new, info = insert_blocks(model, method, cfg, data, seed, td_points)
        freeze_all_but(model, list(new) + [model.head])
    n_train = count_trainable(model)
    losses = fit(model, _adam(trainable(model), cfg.lr), _target_loader(cfg, data, seed, 1), F.cross_entropy,
                 cfg.epochs)
    test = data["target_test"]
    rec = {"method": method, "seed": seed, "trainable": n_train, "params": count_parameters(model),
           "depth": len(model.blocks), "accuracy": evaluate(model, [test], accuracy),
           "test_loss": evaluate(model, [test], F.cross_entropy), "train_loss": losses[-1] if losses else math.nan,
           "wall_time": time.perf_counter() - t0}
    rec.update(info)
    return model, rec


# --------------------------------------------------------------------------------------------
# the experiment


@dataclass
class TransferResult:
    """Every run of :func:`run_transfer` (``runs``: one dict per method and seed, see :func:`adapt`;
    ``sources``: per seed the source and probe test accuracies), the config and ``meta``."""

    config: Dict[str, Any]
    methods: List[str]
    seeds: List[int]
    runs: List[Dict[str, Any]] = field(default_factory=list)
    sources: List[Dict[str, Any]] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    def by_method(self, method: str) -> List[Dict[str, Any]]:
        return sorted((r for r in self.runs if r["method"] == method), key=lambda r: r["seed"])

    def summary(self) -> Dict[str, Dict[str, float]]:
        """``{method: {"mean", "std", "n", "trainable", "params", "time"}}`` (accuracy over seeds)."""
        out = {}
        for m in self.methods:
            rs = self.by_method(m)
            mean, std = mean_std([r["accuracy"] for r in rs])
            out[m] = {"mean": mean, "std": std, "n": len(rs),
                      "trainable": statistics.fmean([r["trainable"] for r in rs]) if rs else math.nan,
                      "params": statistics.fmean([r["params"] for r in rs]) if rs else math.nan,
                      "time": statistics.fmean([r["wall_time"] for r in rs]) if rs else math.nan}
        return out

    def table(self) -> str:
        """Markdown: method, trainable parameters, total parameters, target test accuracy (mean ± std
        over seeds; the best in bold), per seed, time per run."""
        s = self.summary()
        ok = [m for m in self.methods if not math.isnan(s[m]["mean"])]
        best = max(ok, key=lambda m: s[m]["mean"]) if ok else None
        lines = ["| method | trainable params | total params | target test accuracy (mean ± std) | per seed | time/run |",
                 "|---|---|---|---|---|---|"]
        for m in self.methods:
            d = s[m]
            val = f"{d['mean']:.4f} ± {d['std']:.4f}"
            if m == best:
                val = f"**{val}**"
            per = ", ".join(f"{r['accuracy']:.4f}" for r in self.by_method(m))
            lines.append(f"| {m} | {d['trainable']:.0f} | {d['params']:.0f} | {val} | {per} | {d['time']:.1f} s |")
        return "\n".join(lines)

    def source_line(self) -> str:
        """One line: the source test accuracy and the linear probe's target accuracy, mean ± std."""
        a, sa = mean_std([r["source_accuracy"] for r in self.sources])
        b, sb = mean_std([r["probe_accuracy"] for r in self.sources])
        return (f"Source test accuracy (digits 0-4) {a:.4f} ± {sa:.4f}; the linear probe every method starts from: "
                f"target test accuracy {b:.4f} ± {sb:.4f}.")

    def markdown(self, command: Optional[str] = None) -> str:
        """``results.md``: the table, the setting, the source line and the command."""
        c = self.config
        lines = [f"# Transfer learning by insertion: digits 0-4 -> digits 5-9 ({c['target']})", "", self.table(), "",
                 f"Seeds {self.seeds}. Source ViT: embed_dim {c['embed_dim']}, depth {c['depth']}, {c['num_heads']} "
                 f"heads, mlp_ratio {c['mlp_ratio']}, patch {c['patch_size']}, {c['source_epochs']} epochs on digits "
                 f"0-4. Target: {c['n_target_train']} training images; every method starts from the same linear "
                 f"probe ({c['warmup_epochs']} head-only epochs), then trains its parameters {c['epochs']} epochs "
                 f"(Adam lr {c['lr']}, batch {c['batch_size']}); inserting methods add {c['blocks']} "
                 f"{c.get('insert', 'transformer_block')} blocks (TD rule {c['rule']!r}).", "", self.source_line(), ""]
        if self.meta.get("wall_time") is not None:
            lines += [f"Wall time {self.meta['wall_time']:.0f} s ({self.meta.get('torch_threads')} torch threads).", ""]
        if command:
            lines += [f"Command: `{command}`", ""]
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return {"config": self.config, "methods": self.methods, "seeds": self.seeds, "runs": self.runs,
                "sources": self.sources, "meta": self.meta, "summary": self.summary()}

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TransferResult":
        return cls(config=d["config"], methods=list(d["methods"]), seeds=list(d["seeds"]), runs=list(d["runs"]),
                   sources=list(d.get("sources", [])), meta=dict(d.get("meta", {})))

    def to_json(self, path: Any) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True))


def run_transfer(config: Optional[TransferConfig] = None, seeds: Sequence[int] = (0, 1, 2, 3, 4),
                 methods: Sequence[str] = METHODS, *, log: Optional[Callable[[str], None]] = None,
                 progress: bool = False) -> TransferResult:
    """Runs every method on every seed (see the module docstring) and returns the result table.

    Per seed: data permuted by the seed, the source ViT initialised and trained from it, the linear
    probe, then each method from the probe. ``random_phi`` and ``random_blocks`` use the points
    ``td`` chose on the same seed (``td`` runs first when any of them is asked for).
    """
    fn = "run_transfer"
    cfg = config if config is not None else TransferConfig()
    if not isinstance(cfg, TransferConfig):
        raise TypeError(f"{fn}: config must be a TransferConfig, got {type(cfg).__name__}")
    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"{fn}: methods must be a non-empty list of {METHODS}, got {list(methods)!r}")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds or any(s < 0 for s in seeds):
        raise ValueError(f"{fn}: seeds must be a non-empty list of ints >= 0, got {seeds!r}")
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    result = TransferResult(config=asdict(cfg), methods=methods, seeds=seeds,
                            meta={"torch_threads": torch.get_num_threads(), "torch": torch.__version__})
    order = sorted(methods, key=lambda m: (m != "td", METHODS.index(m)))
    for seed in seeds:
        data = transfer_data(cfg.target, seed=seed, n_target_train=cfg.n_target_train)
        ts = time.perf_counter()
        source = train_source(cfg, data, seed, progress=progress)
        src_acc = evaluate(source, [data["source_test"]], accuracy)
        probe = linear_probe(source, cfg, data, seed)
        probe_acc = evaluate(probe, [data["target_test"]], accuracy)
        result.sources.append({"seed": seed, "source_accuracy": src_acc, "probe_accuracy": probe_acc,
                               "wall_time": time.perf_counter() - ts})
        log(f"seed {seed}: source accuracy {src_acc:.4f}, probe target accuracy {probe_acc:.4f} "
            f"({time.perf_counter() - ts:.1f} s)")
        td_points = None
        needs_td = [m for m in methods if m in ("random_phi", "random_blocks")]
        if needs_td and "td" not in methods:
            _, rec = adapt(probe, "td", cfg, data, seed)  # only for its points
            td_points = rec["points"]
        for m in order:
            _, rec = adapt(probe, m, cfg, data, seed, td_points=td_points)
            if m == "td":
                td_points = rec["points"]
            result.runs.append(rec)
            extra = f", points {rec['points']}, eps {rec['eps']}" if rec.get("points") and rec.get("eps") else (
                f", points {rec['points']}" if rec.get("points") else "")
            log(f"  {m:>13}: accuracy {rec['accuracy']:.4f}, trainable {rec['trainable']}{extra} "
                f"({rec['wall_time']:.1f} s)")
    result.runs.sort(key=lambda r: (methods.index(r["method"]), r["seed"]))
    result.meta["wall_time"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------------------------
# command line (wired into topoderiv.cli)


def add_transfer_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds the ``transfer`` sub-command to an ``add_subparsers()`` object; returns its parser."""
    d = TransferConfig()
    p = sub.add_parser("transfer", help="transfer learning by insertion on a small ViT (digits 0-4 -> 5-9)",
                       description="Trains a ViT on digits 0-4, then adapts it to digits 5-9 by each method (head only, "
                                   "everything, TD-inserted blocks, random-direction blocks at TD's points, random "
                                   "blocks at TD's points, zero-output blocks at random points); writes results.md "
                                   "and results.json to --out.")
    nn0, pos = int_at_least(0), int_at_least(1)
    p.add_argument("--target", choices=TARGETS, default=d.target, help=f"target task (default {d.target})")
    p.add_argument("--seeds", type=nn0, nargs="+", default=[0, 1, 2, 3, 4], help="seeds (default 0 1 2 3 4)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                   help=f"methods (default: {' '.join(METHODS)})")
    p.add_argument("--n-target-train", type=int_at_least(5), default=d.n_target_train,
                   help=f"target training images (default {d.n_target_train})")
    p.add_argument("--embed-dim", type=pos, default=d.embed_dim, help=f"ViT width (default {d.embed_dim})")
    p.add_argument("--depth", type=nn0, default=d.depth, help=f"source ViT depth (default {d.depth})")
    p.add_argument("--heads", type=pos, default=d.num_heads, help=f"attention heads (default {d.num_heads})")
    p.add_argument("--mlp-ratio", type=positive_float, default=d.mlp_ratio, help=f"default {d.mlp_ratio}")
    p.add_argument("--patch", type=pos, choices=(1, 2, 4, 8), default=d.patch_size,
                   help=f"patch size (default {d.patch_size})")
    p.add_argument("--source-epochs", type=nn0, default=d.source_epochs, help=f"default {d.source_epochs}")
    p.add_argument("--warmup-epochs", type=nn0, default=d.warmup_epochs,
                   help=f"head-only epochs every method starts from (default {d.warmup_epochs})")
    p.add_argument("--epochs", type=nn0, default=d.epochs, help=f"epochs of each method (default {d.epochs})")
    p.add_argument("--blocks", type=pos, default=d.blocks, help=f"blocks inserted (default {d.blocks})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--batch-size", type=pos, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--rule", choices=("top", "all", "multi", "reference"), default=d.rule,
                   help=f"TD rule (default {d.rule})")
    p.add_argument("--insert", choices=INSERT_KINDS, default=d.insert,
                   help=f"kind of the inserted blocks (default {d.insert}; the source ViT keeps timm blocks)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/transfer-<target>)")
    p.add_argument("--threads", type=pos, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(transfer_parser=p)
    return p


def cmd_transfer(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Runs :func:`run_transfer` from parsed arguments; prints and writes ``results.md`` / ``results.json``."""
    torch.set_num_threads(args.threads)
    if args.embed_dim % args.heads:  # a usage error (exit status 2)
        args.transfer_parser.error(f"--heads must divide --embed-dim = {args.embed_dim}, got {args.heads}")
    if args.n_target_train >= 896:
        args.transfer_parser.error(f"--n-target-train must be < 896 (the target has 896 images), got "
                                   f"{args.n_target_train}")
    cfg = TransferConfig(target=args.target, n_target_train=args.n_target_train, embed_dim=args.embed_dim,
                         depth=args.depth, num_heads=args.heads, mlp_ratio=args.mlp_ratio, patch_size=args.patch,
                         source_epochs=args.source_epochs, warmup_epochs=args.warmup_epochs, epochs=args.epochs,
                         blocks=args.blocks, lr=args.lr, batch_size=args.batch_size, rule=args.rule,
                         insert=args.insert)
    out = args.out or Path("runs") / f"transfer-{args.target}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # an existing file on the path, no permission
        args.transfer_parser.error(f"--out must be a folder that can be created, got {str(out)!r}: "
                                   f"{err.strerror or err}")
    command = "topoderiv " + " ".join(shlex.quote(a) for a in argv)
    print(f"transfer ({cfg.target}): methods {' '.join(args.methods)}; seeds {args.seeds}")
    res = run_transfer(cfg, args.seeds, args.methods, log=print, progress=not args.no_progress)
    res.meta["command"] = command
    res.to_json(out / "results.json")
    md = res.markdown(command)
    (out / "results.md").write_text(md)
    print()
    print(md)
    print(f"wrote {out}/: results.md, results.json")
    return 0
