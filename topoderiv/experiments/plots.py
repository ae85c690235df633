"""Plots of growth runs and comparisons (matplotlib, no pyplot state: safe in scripts and tests).

- :func:`plot_growth`: training loss per epoch (log scale) with the validation loss at the end of
  every round (and after every epoch when recorded) and a marker at every insertion (labelled
  with the point), plus the test metric per round when recorded.
- :func:`plot_mu`: the topological derivative ``mu`` of every candidate point at every insertion
  round (heatmap; the chosen point is outlined). Points are renumbered after every insertion, so
  a column is "the point index at that round", not a fixed place in the network.
- :func:`plot_comparison`: test metric per method over seeds (box + individual seeds + mean).
- :func:`plot_curves`: mean training-loss curve per method over seeds, insertions marked.
- :func:`plot_compute`: validation loss against cumulative FLOPs and against wall time for every
  method (each seed thin, the mean over seeds bold), insertions marked, the target drawn.

Every function takes a :class:`topoderiv.growth.GrowthHistory` (or its ``to_dict()`` / a JSON
path) or a :class:`topoderiv.baselines.Comparison`, writes a PNG and returns its path. Figures
are built with ``matplotlib.figure.Figure`` (Agg canvas) so no GUI backend is ever touched.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from matplotlib.figure import Figure

from ..growth.compute import compute_curve
from ..growth.history import GrowthHistory

__all__ = ["plot_growth", "plot_mu", "plot_comparison", "plot_curves", "plot_compute", "as_history"]

PathLike = Union[str, Path]
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf",
           "#bcbd22", "#000000"]


def as_history(h: Union[GrowthHistory, Dict[str, Any], PathLike]) -> GrowthHistory:
    """A :class:`GrowthHistory` from a history, its dict, or a JSON file."""
    if isinstance(h, GrowthHistory):
        return h
    if isinstance(h, dict):
        return GrowthHistory.from_dict(h)
    if isinstance(h, (str, Path)):
        return GrowthHistory.from_json(h)
    raise TypeError(f"as_history: expected a GrowthHistory, a dict or a JSON path, got {type(h).__name__}")


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _epoch_axis(hist: GrowthHistory):
    """Per round: (start epoch, end epoch, curve epochs, curve)."""
    out = []
    start = 0
    for r in hist.rounds:
        curve = list(r.train_curve or [])
        n = r.epochs if r.epochs else len(curve)
        xs = np.arange(start + 1, start + len(curve) + 1)
        out.append((start, start + n, xs, np.asarray(curve, dtype=float)))
        start += n
    return out


def plot_growth(
    history: Union[GrowthHistory, Dict[str, Any], PathLike],
    path: PathLike,
    *,
    title: Optional[str] = None,
    metric_name: Optional[str] = None,
) -> Path:
    """Loss curve with insertion markers (and the test metric per round when recorded).

    Args:
        history: the growth history.
        path: output PNG.
        title: figure title (default: strategy name and stop reason).
        metric_name: label of ``RoundRecord.test_metric`` (default ``"test metric"``).
    """
    hist = as_history(history)
    if not hist.rounds:
        raise ValueError("plot_growth: history has no rounds")
    has_test = any(r.test_metric is not None for r in hist.rounds)
    fig = Figure(figsize=(8.5, 6.2 if has_test else 4.2))
    if has_test:
        ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1]})
    else:
        ax, ax2 = fig.subplots(1, 1), None
    spans = _epoch_axis(hist)
    for i, (r, (s, e, xs, curve)) in enumerate(zip(hist.rounds, spans)):
        if len(curve):
            ax.plot(xs, curve, color=_COLORS[0], lw=1.3, label="train loss (epoch mean)" if i == 0 else None)
        if r.val_curve:
            vx = np.arange(s + 1, s + len(r.val_curve) + 1)
            ax.plot(vx, np.asarray(r.val_curve, dtype=float), color=_COLORS[1], lw=0.9, alpha=0.7,
                    label="validation loss (every epoch)" if i == 0 else None)
        ax.plot([e], [r.val_loss], "o", color=_COLORS[1], ms=5, label="validation loss (end of round)" if i == 0 else None)
    ends = [e for (_, e, _, _) in spans]
    ax.plot(ends, [r.val_loss for r in hist.rounds], "-", color=_COLORS[1], lw=0.8, alpha=0.6)
    ins = [(r, s) for r, (s, _, _, _) in zip(hist.rounds, spans) if r.point is not None]
    for j, (r, s) in enumerate(ins):
        for a in (ax, ax2) if ax2 is not None else (ax,):
            a.axvline(s, color="0.35", ls="--", lw=0.9, label="insertion" if (j == 0 and a is ax) else None)
        eps = "" if r.eps is None else f"\neps {r.eps:.2g}"
        ax.annotate(f"+@{r.point}{eps}", xy=(s, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -3 - 20 * (j % 2)), textcoords="offset points", va="top", ha="left", fontsize=7,
                    color="0.25")
    finish = [s for r, (s, _, _, _) in zip(hist.rounds, spans) if r.info.get("phase") == "finish"]
    for s in finish:
        ax.axvline(s, color="0.6", ls=":", lw=0.9, label="growth stopped, budget finished")
    ax.set_yscale("log")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="lower left", fontsize=8, framealpha=0.85)
    strat = hist.meta.get("method") or (hist.meta.get("strategy") or {}).get("name", "growth")
    ttl = title or (f"{strat}: {len(hist.insertions)} insertions (+@i: new block at point i), "
                    f"final depth {hist.rounds[-1].depth}")
    ax.set_title(ttl, fontsize=10)
    if ax2 is not None:
        pts = [(e, r.test_metric) for r, (_, e, _, _) in zip(hist.rounds, spans) if r.test_metric is not None]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "s-", color=_COLORS[2], ms=4)
        for x, y in pts:
            ax2.annotate(f"{y:.4g}", (x, y), xytext=(0, 5), textcoords="offset points", ha="center", fontsize=7)
        ax2.set_ylabel(metric_name or "test metric")
        ax2.grid(True, alpha=0.25)
        ax2.set_xlabel("epoch")
        lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
        pad = 0.15 * (hi - lo) if hi > lo else 0.05 * abs(hi) + 1e-12
        ax2.set_ylim(lo - pad, hi + 2 * pad)
    else:
        ax.set_xlabel("epoch")
    return _save(fig, path)


def plot_mu(history: Union[GrowthHistory, Dict[str, Any], PathLike], path: PathLike, *,
            title: Optional[str] = None) -> Path:
    """Heatmap of ``mu`` per candidate point (columns) per insertion round (rows).

    Cells hold the value; the chosen point of the round is outlined. Empty cells: the point did
    not exist yet. When a strategy records no ``mu`` (the baselines), the figure says so.
    """
    hist = as_history(history)
    rows = [r for r in hist.rounds if r.mu]
    last = hist.meta.get("last_scores") or {}
    last_mu = {int(k): float(v) for k, v in (last.get("mu") or {}).items()}
    labels = [f"round {r.round}" for r in rows]
    mus = [r.mu for r in rows]
    chosen = [r.point for r in rows]
    if last_mu:
        labels.append("final (no insertion)")
        mus.append(last_mu)
        chosen.append(None)
    fig = Figure(figsize=(8.0, 1.2 + 0.45 * max(1, len(mus))))
    ax = fig.subplots(1, 1)
    if not mus:
        ax.text(0.5, 0.5, "no topological derivatives recorded\n(the strategy does not score points)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    n_pts = max(max(m) for m in mus) + 1
    grid = np.full((len(mus), n_pts), np.nan)
    for i, m in enumerate(mus):
        for p, v in m.items():
            grid[i, p] = v
    finite = grid[np.isfinite(grid)]
    vmax = float(np.abs(finite).max()) if finite.size else 1.0
    if finite.size and finite.min() < 0:
        from matplotlib.colors import TwoSlopeNorm

        norm, cmap = TwoSlopeNorm(vmin=-vmax, vcenter=0.0, vmax=vmax), "RdBu_r"
    else:
        from matplotlib.colors import Normalize

        norm, cmap = Normalize(vmin=0.0, vmax=vmax), "viridis"
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    fig.colorbar(im, ax=ax, label="mu (loss units)", fraction=0.04, pad=0.02)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            if np.isfinite(v):
                rgb = im.cmap(im.norm(v))[:3]
                dark = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 0.5
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
        if chosen[i] is not None:
            ax.add_patch(_rect(chosen[i], i, ax))
    ax.set_xticks(range(n_pts))
    ax.set_xlabel("candidate point (stream entering block i; last = before the head)")
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_title(title or "topological derivative mu per point (outlined: chosen)", fontsize=10)
    return _save(fig, path)


def _rect(x: int, y: int, ax):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.0)


def _comparison_parts(comparison: Any):
    methods = list(comparison.methods)
    vals = [[r.metric for r in sorted(comparison.by_method(m), key=lambda r: r.seed)] for m in methods]
    return methods, vals


def plot_comparison(comparison: Any, path: PathLike, *, title: Optional[str] = None) -> Path:
    """Test metric per method over seeds: a box per method, every seed as a dot, the mean as a bar.

    Args:
        comparison: a :class:`topoderiv.baselines.Comparison`.
        path: output PNG.
    """
    methods, vals = _comparison_parts(comparison)
    if not methods:
        raise ValueError("plot_comparison: the comparison has no methods")
    fig = Figure(figsize=(1.3 * len(methods) + 2.5, 4.3))
    ax = fig.subplots(1, 1)
    pos = np.arange(len(methods))
    ok = [v for v in vals if v]
    if ok:
        ax.boxplot([v if v else [np.nan] for v in vals], positions=pos, widths=0.5, showfliers=False,
                   medianprops={"color": "0.3"}, boxprops={"color": "0.5"}, whiskerprops={"color": "0.5"},
                   capprops={"color": "0.5"})
    rng = np.random.default_rng(0)
    for i, v in enumerate(vals):
        c = _COLORS[i % len(_COLORS)]
        if v:
            ax.scatter(i + rng.uniform(-0.12, 0.12, len(v)), v, color=c, s=22, zorder=3, alpha=0.85)
            mean = float(np.mean(v))
            ax.hlines(mean, i - 0.3, i + 0.3, color=c, lw=2.2, zorder=4)
            ax.annotate(f"{mean:.4f}", (i, mean), xytext=(0, 6), textcoords="offset points", ha="center",
                        fontsize=8, color=c, fontweight="bold")
    ax.set_xticks(pos)
    ax.set_xticklabels(methods, rotation=20, ha="right")
    arrow = "higher is better" if comparison.higher_is_better else "lower is better"
    ax.set_ylabel(f"test {comparison.metric_name} ({arrow})")
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_title(title or f"{comparison.task}: test {comparison.metric_name} over seeds {list(comparison.seeds)} "
                 f"(bar: mean)", fontsize=10)
    return _save(fig, path)


def plot_curves(comparison: Any, path: PathLike, *, title: Optional[str] = None) -> Path:
    """Mean training loss per epoch for every method (over seeds), log scale; insertions of seed
    ``seeds[0]`` marked on each growing method's curve."""
    fig = Figure(figsize=(8.5, 4.6))
    ax = fig.subplots(1, 1)
    for i, m in enumerate(comparison.methods):
        runs = comparison.by_method(m)
        curves = []
        for r in runs:
            c: List[float] = []
            for rec in r.history.rounds:
                c.extend(rec.train_curve or [])
            if c:
                curves.append(np.asarray(c, dtype=float))
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        col = _COLORS[i % len(_COLORS)]
        xs = np.arange(1, n + 1)
        ax.plot(xs, mean, color=col, lw=1.3, label=m)
        first = sorted(runs, key=lambda r: r.seed)[0]
        start = 0
        for rec in first.history.rounds:
            if rec.point is not None and 0 < start <= n:
                ax.plot([start], [mean[start - 1]], marker="v", color=col, ms=6, mec="black", mew=0.5)
            start += rec.epochs
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(title or f"{comparison.task}: training curves (triangles: insertions, seed {min(comparison.seeds)})",
                 fontsize=10)
    return _save(fig, path)


def _mean_curve(xs: List[np.ndarray], ys: List[np.ndarray]) -> tuple:
    """Mean of several curves y(x) on a common grid over the x range all of them cover (log-linear
    interpolation of the loss between evaluations)."""
    lo = max(float(x[0]) for x in xs)
    hi = min(float(x[-1]) for x in xs)
    if not hi > lo:
        return np.array([]), np.array([])
    grid = np.linspace(lo, hi, 200)
    logs = [np.interp(grid, x, np.log(np.maximum(y, 1e-300))) for x, y in zip(xs, ys)]
    return grid, np.exp(np.mean(logs, axis=0))


def plot_compute(comparison: Any, path: PathLike, *, target: Optional[float] = None,
                 title: Optional[str] = None) -> Path:
    """Validation loss against cumulative FLOPs (left) and wall time (right) for every method.

    Each seed's run is a thin line (one point per evaluation: every epoch when recorded), the mean
    over seeds (of the log loss, on the compute range every seed covers) a bold one; triangles mark
    the insertions of every seed. The target of :meth:`Comparison.targets` is a dashed line (the
    mean over seeds when it differs by seed). The loss axis shows the range from the lowest loss to
    8x the target (or the lowest loss): the approach to the target. Runs that counted no FLOPs are
    left out of the left panel.

    Args:
        comparison: a :class:`topoderiv.experiments.compare.Comparison`.
        path: output PNG.
        target: the target validation loss (default: the comparison's, see ``Comparison.targets``).
    """
    methods = list(comparison.methods)
    if not methods:
        raise ValueError("plot_compute: the comparison has no methods")
    fig = Figure(figsize=(13.0, 4.8))
    axes = fig.subplots(1, 2, sharey=True)
    for i, m in enumerate(methods):
        col = _COLORS[i % len(_COLORS)]
        curves = [compute_curve(r.history) for r in sorted(comparison.by_method(m), key=lambda r: r.seed)]
        for ax, key, scale in ((axes[0], "flops", 1e9), (axes[1], "time", 1.0)):
            xs, ys = [], []
            for j, c in enumerate(curves):
                x = np.asarray(getattr(c, key), dtype=float) / scale
                y = np.asarray(c.val, dtype=float)
                ok = np.isfinite(x) & np.isfinite(y) & (y > 0)
                if not ok.any():
                    continue
                ax.plot(x[ok], y[ok], color=col, lw=0.6, alpha=0.35)
                xs.append(x[ok])
                ys.append(y[ok])
                for ins in c.insertions:  # at the loss of the last evaluation before it (what was inserted into)
                    at = ins[0 if key == "flops" else 1] / scale
                    k = int(np.searchsorted(x[ok], at, side="right")) - 1
                    if math.isfinite(at) and k >= 0:
                        ax.plot([at], [y[ok][k]], marker="v", color=col, ms=4, mec="black", mew=0.3, alpha=0.8)
            if xs:
                gx, gy = _mean_curve(xs, ys)
                if len(gx):
                    ax.plot(gx, gy, color=col, lw=1.8, label=m)
                else:
                    ax.plot([], [], color=col, lw=1.8, label=m)
    try:
        targets = comparison.targets(target)
    except ValueError:
        targets = {}
    lows = [float(np.min(line.get_ydata())) for ax in axes for line in ax.get_lines() if len(line.get_ydata())]
    highs = [float(np.max(line.get_ydata())) for ax in axes for line in ax.get_lines() if len(line.get_ydata())]
    if lows:  # zoom on the end of training, where the curves approach the target (early losses are far above)
        level = max([min(lows)] + [float(np.mean(list(targets.values())))] if targets else [min(lows)])
        axes[0].set_ylim(0.85 * min(lows), min(max(highs), 8.0 * level) * 1.05)
    if targets:
        vals = list(targets.values())
        t = float(np.mean(vals))
        same = max(vals) - min(vals) <= 1e-12 * max(abs(t), 1.0)
        for ax in axes:
            ax.axhline(t, color="0.2", ls="--", lw=1.0,
                       label="target" if same else "target (mean of the seeds' targets)")
    for ax, label in ((axes[0], "cumulative GFLOP (training + scoring + eps search)"),
                      (axes[1], "cumulative wall time [s] (evaluation excluded)")):
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("validation loss")
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(title or f"{comparison.task}: validation loss against compute (thin: seeds {list(comparison.seeds)}, "
                 "bold: mean; triangles: insertions)", fontsize=10)
    return _save(fig, path)
