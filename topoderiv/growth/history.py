"""The record of a growth run: one :class:`RoundRecord` per round, in a :class:`GrowthHistory`."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import Tensor, nn

__all__ = ["RoundRecord", "GrowthHistory", "jsonable", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements."""
    return sum(p.numel() for p in model.parameters())


def jsonable(obj: Any) -> Any:
    """A JSON-serialisable copy of ``obj`` (tensors -> numbers/lists, unknown objects -> str)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if isinstance(obj, Tensor):
        return jsonable(obj.item() if obj.numel() == 1 else obj.detach().cpu().tolist())
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    return str(obj)


@dataclass
class RoundRecord:
    """One round: round 0 trains the initial network; round r >= 1 inserts then trains.

    Compute (:mod:`topoderiv.growth.compute` says how each is counted; None: not counted):

    - ``train_flops``: training FLOPs of the round's epochs (forward + backward + optimiser);
      ``optimizer_flops`` the optimiser's share of it.
    - ``score_flops``, ``search_flops``: FLOPs of proposing the insertion (scoring: capture pass +
      solve; the eps search), spent before the round's training (0 for strategies that do not
      score; a finish round carries a last proposal that inserted nothing).
    - ``train_time``: seconds of training (``epoch_times``: per epoch); ``insert_time``: seconds of
      proposing and inserting; ``eval_time``: seconds of evaluation (validation per epoch, test),
      counted in no compute budget.
    - ``val_curve``: validation loss after every epoch (empty when not recorded per epoch).

    Cumulative totals: sums over the rounds (:func:`topoderiv.growth.compute.compute_curve`).
    """

    round: int
    epochs: int
    train_loss: float
    val_loss: float
    n_params: int
    depth: int
    wall_time: float
    train_curve: List[float] = field(default_factory=list)
    test_metric: Optional[float] = None
    point: Optional[int] = None
    eps: Optional[float] = None
    mu: Dict[int, float] = field(default_factory=dict)
    lr: Optional[float] = None
    insert_time: float = 0.0
    info: Dict[str, Any] = field(default_factory=dict)
    val_curve: List[float] = field(default_factory=list)
    train_flops: Optional[int] = None
    optimizer_flops: Optional[int] = None
    score_flops: Optional[int] = None
    search_flops: Optional[int] = None
    train_time: float = 0.0
    eval_time: float = 0.0
    epoch_times: List[float] = field(default_factory=list)

    @property
    def flops(self) -> Optional[int]:
        """All FLOPs of the round (training, scoring, eps search); None when not counted."""
        if self.train_flops is None:
            return None
        return int(self.train_flops) + int(self.score_flops or 0) + int(self.search_flops or 0)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["mu"] = {str(k): v for k, v in self.mu.items()}
        return jsonable(d)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RoundRecord":
        d = dict(d)
        d["mu"] = {int(k): float(v) for k, v in d.get("mu", {}).items()}
        # jsonable() writes non-finite floats as strings ("nan", "inf"): read them back as floats
        for key in ("val_curve", "train_curve", "epoch_times"):
            if key in d and isinstance(d[key], list):
                d[key] = [float(v) if isinstance(v, str) else v for v in d[key]]
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class GrowthHistory:
    """Rounds of a growth run, plus metadata (strategy, settings, stop reason)."""

    rounds: List[RoundRecord] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def stop_reason(self) -> Optional[str]:
        return self.meta.get("stop_reason")

    @property
    def insertions(self) -> List[RoundRecord]:
        """Rounds that inserted a block."""
        return [r for r in self.rounds if r.point is not None]

    @property
    def best_round(self) -> Optional[RoundRecord]:
        """The round with the lowest validation loss."""
        return min(self.rounds, key=lambda r: r.val_loss) if self.rounds else None

    def to_dict(self) -> Dict[str, Any]:
        return {"format": "topoderiv-growth-history", "version": 1, "meta": jsonable(self.meta),
                "rounds": [r.to_dict() for r in self.rounds]}

    def to_json(self, path: Union[str, Path]) -> Path:
        """Writes the history as JSON (parent folders created) and returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "GrowthHistory":
        return cls([RoundRecord.from_dict(r) for r in d.get("rounds", [])], dict(d.get("meta", {})))

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "GrowthHistory":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def table(self) -> str:
        """A plain-text growth table; with compute counted, the round's training GFLOP, its scoring +
        eps-search GFLOP and the cumulative GFLOP of the run so far."""
        has_test = any(r.test_metric is not None for r in self.rounds)
        has_flops = any(r.train_flops is not None for r in self.rounds)
        head = f"{'round':>5} {'depth':>5} {'params':>8} {'point':>5} {'eps':>6} {'mu*':>10} {'train':>10} {'val':>10}"
        head += f" {'test':>10}" if has_test else ""
        head += f" {'train GF':>9} {'score GF':>9} {'cum GF':>9}" if has_flops else ""
        head += f" {'time':>7}"
        lines = [head]
        cum = 0.0
        for r in self.rounds:
            mu = r.mu.get(r.point) if r.point is not None else None
            line = (f"{r.round:>5} {r.depth:>5} {r.n_params:>8} {'-' if r.point is None else r.point:>5} "
                    f"{'-' if r.eps is None else f'{r.eps:.3g}':>6} {'-' if mu is None else f'{mu:.3g}':>10} "
                    f"{r.train_loss:>10.4g} {r.val_loss:>10.4g}")
            if has_test:
                line += f" {'-' if r.test_metric is None else f'{r.test_metric:.4g}':>10}"
            if has_flops:
                if r.flops is None:
                    line += f" {'-':>9} {'-':>9} {'-':>9}"
                else:
                    cum += r.flops
                    pre = int(r.score_flops or 0) + int(r.search_flops or 0)
                    line += f" {r.train_flops / 1e9:>9.4g} {pre / 1e9:>9.4g} {cum / 1e9:>9.4g}"
            line += f" {r.wall_time:>6.1f}s"
            lines.append(line)
        if self.stop_reason:
            lines.append(f"stopped: {self.stop_reason}")
        return "\n".join(lines)
