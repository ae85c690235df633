"""The ``topoderiv`` command line.

    topoderiv grow     [--task heat] [--seed 0] [--rounds R] [--epochs E] [--out DIR] [--device cpu] ...
    topoderiv compare  [--task heat] [--seeds 0 1 2] [--methods ...] [--out DIR] ...
    topoderiv info

``grow`` runs topological-derivative growth on a built-in task, prints the growth table round by
round and the final metrics, and writes to ``--out``: ``history.json``, ``growth.png`` (loss curve
with insertions), ``mu.png`` (topological derivative per point per round), ``metrics.json`` and the
grown model (``model/``, load it with ``topoderiv.load(DIR/"model")``).

``compare`` runs every method of :mod:`topoderiv.baselines` on every seed with the same budget
and writes ``results.md`` (markdown table, mean +- std over seeds, and the command),
``results.json``, ``comparison.png``, ``curves.png`` and the growth plots of the first seed's
topological run.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser"]


def _int_at_least(lo: int):
    """argparse type: an integer >= ``lo``."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {v}")
        return v

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def _device(text: str) -> str:
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (try cpu or cuda)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r} asked for but CUDA is not available in this torch")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda[:i], got {text!r}")
    return str(dev)


def _add_common(p: argparse.ArgumentParser) -> None:
    from .experiments.tasks import OPTIMIZERS, available_tasks

    p.add_argument("--task", default="heat", choices=available_tasks(), help="built-in task (default: heat)")
    p.add_argument("--data-seed", type=_nonneg_int, default=0, help="seed of the task's data (default 0)")
    p.add_argument("--rounds", type=_nonneg_int, default=None, help="max insertions (default: the task's)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs per round; total budget = epochs * (rounds + 1) (default: the task's)")
    p.add_argument("--width", type=_positive_int, default=None, help="network width (default: the task's)")
    p.add_argument("--depth", type=_nonneg_int, default=None, help="initial depth (default: the task's, 2)")
    p.add_argument("--max-depth", type=_positive_int, default=None, help="depth cap (default: the task's)")
    p.add_argument("--lr", type=_positive_float, default=None, help="learning rate (default: the task's)")
    p.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=None,
                   help="adam, or sgd (momentum 0.9) (default: the task's, adam)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="mini-batch size (default: the task's)")
    p.add_argument("--patience", type=_positive_int, default=2,
                   help="stop growing after this many rounds without validation improvement (default 2)")
    p.add_argument("--score-batches", type=_positive_int, default=None,
                   help="training batches used for scoring and the eps search (default: all)")
    p.add_argument("--n-train", type=_positive_int, default=None, help="training samples (default: the task's)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the built-in tasks' small matrices run fastest on one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (sub-commands ``grow``, ``compare``, ``info``)."""
    parser = argparse.ArgumentParser(
        prog="topoderiv",
        description="Topological-derivative depth growth for neural networks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  topoderiv grow --task heat --seed 0 --out runs/heat-s0\n"
               "  topoderiv compare --task heat --seeds 0 1 2 --out runs/compare-heat\n  topoderiv info",
    )
    sub = parser.add_subparsers(dest="command", metavar="{grow,compare,info}")
    sub.required = True

    g = sub.add_parser("grow", help="grow a network on a built-in task by the topological derivative",
                       description="Topological-derivative growth on a built-in task: growth table, final "
                                   "metrics, history JSON, plots and the grown model in --out.")
    _add_common(g)
    g.add_argument("--seed", type=_nonneg_int, default=0, help="training seed (default 0)")
    g.add_argument("--rule", choices=("top", "multi", "all"), default="top",
                   help="phi: top eigenvector (default; one live row), the reference code's multi-eigenvector "
                        "rule, or 'all' (every row on its own block's top eigenvector, no dead rows)")
    g.add_argument("--out", type=Path, default=None, help="output folder (default runs/grow-<task>-s<seed>)")

    c = sub.add_parser("compare", help="compare growth with the baselines over seeds",
                       description="Runs every method with the same budget and seeds; writes results.md, "
                                   "results.json and plots to --out.")
    _add_common(c)
    from .experiments.compare import DEFAULT_METHODS, METHODS

    c.add_argument("--seeds", type=_nonneg_int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    c.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(DEFAULT_METHODS), metavar="METHOD",
                   help=f"methods (default: {' '.join(DEFAULT_METHODS)}; also: "
                        f"{' '.join(m for m in METHODS if m not in DEFAULT_METHODS)})")
    c.add_argument("--out", type=Path, default=None, help="output folder (default runs/compare-<task>)")

    sub.add_parser("info", help="print what was built (C++/CUDA kernels, torch)")
    return parser


def _budget(args: argparse.Namespace) -> Dict[str, Any]:
    return {"epochs_per_round": args.epochs, "rounds": args.rounds, "width": args.width, "depth": args.depth,
            "max_depth": args.max_depth, "lr": args.lr, "batch_size": args.batch_size, "optimizer": args.optimizer}


def _task(args: argparse.Namespace):
    from .experiments.tasks import get_task

    kwargs = {}
    if args.n_train is not None:
        kwargs["n_train"] = args.n_train
    return get_task(args.task, seed=args.data_seed, **kwargs)


def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)


def _command_line(argv: Sequence[str]) -> str:
    return "topoderiv " + " ".join(shlex.quote(a) for a in argv)


class _RoundPrinter:
    """Prints one growth-table row per finished round (through tqdm when bars are shown)."""

    def __init__(self, metric_name: str, progress: bool) -> None:
        self.metric_name, self.progress = metric_name, progress
        self.header = (f"{'round':>5} {'depth':>5} {'params':>7} {'point':>5} {'eps':>5} {'mu*':>9} "
                       f"{'train':>9} {'val':>9} {'test ' + metric_name:>12} {'time':>7}")

    def write(self, line: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)

    def __call__(self, grower: Any, rec: Any) -> None:
        if rec.round == 0:
            self.write(self.header)
        mu = rec.mu.get(rec.point) if rec.point is not None else None
        point = "-" if rec.point is None else str(rec.point)
        if rec.info.get("phase") == "finish":
            point = "fin"
        eps = "-" if rec.eps is None else f"{rec.eps:.2g}"
        mus = "-" if mu is None else f"{mu:.3g}"
        test = "-" if rec.test_metric is None else f"{rec.test_metric:.4g}"
        self.write(f"{rec.round:>5} {rec.depth:>5} {rec.n_params:>7} {point:>5} {eps:>5} {mus:>9} "
                   f"{rec.train_loss:>9.3e} {rec.val_loss:>9.3e} {test:>12} {rec.wall_time:>6.1f}s")


def cmd_grow(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .experiments.compare import make_budget, run_method
    from .growth import TopologicalStrategy
    from .experiments.plots import plot_growth, plot_mu

    _setup(args)
    task = _task(args)
    cfg = make_budget(task, _budget(args))
    out = args.out or Path("runs") / f"grow-{args.task}-s{args.seed}"
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    print(f"task {task.name}: d_in {task.d_in} -> d_out {task.d_out}, train/val/test "
          f"{task.train[0].shape[0]}/{task.val[0].shape[0]}/{task.test[0].shape[0]}, metric {task.metric.name}")
    print(f"network: ResidualMLP width {cfg.width}, initial depth {cfg.depth}; budget {cfg.total_epochs} epochs = "
          f"{cfg.epochs_per_round} x ({cfg.rounds} rounds + 1), {cfg.describe_optimizer()}, batch {cfg.batch_size}, "
          f"patience {args.patience}, device {args.device}")
    printer = _RoundPrinter(task.metric.name, progress)
    t0 = time.perf_counter()
    res = run_method(task, "topological", args.seed, budget=cfg, patience=args.patience,
                     strategy=TopologicalStrategy(rule=args.rule, k=4 if args.rule == "multi" else 1),
                     score_batches=args.score_batches, device=args.device, progress=progress, keep_model=True,
                     callbacks=[printer])
    wall = time.perf_counter() - t0
    hist = res.history
    hist.meta["command"] = _command_line(argv)
    hist.to_json(out / "history.json")
    from .growth import save

    save(res.model, out / "model", history=hist, optimizer=res.optimizer,
         extra={"task": task.name, "seed": args.seed, "data_seed": args.data_seed, "command": _command_line(argv)})
    plot_growth(hist, out / "growth.png", metric_name=f"test {task.metric.name}")
    plot_mu(hist, out / "mu.png")
    metrics = {"task": task.name, "seed": args.seed, "data_seed": args.data_seed, task.metric.name: res.metric,
               "test_loss": res.test_loss, "val_loss": res.val_loss, "train_loss": res.train_loss,
               "initial_" + task.metric.name: hist.rounds[0].test_metric, "depth": res.depth,
               "n_params": res.n_params, "epochs": res.epochs, "insertions": len(hist.insertions),
               "stop_reason": hist.stop_reason, "wall_time": wall, "command": _command_line(argv)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    print(f"stopped growing: {hist.stop_reason}")
    print(f"final: test {task.metric.name} {res.metric:.4g} (initial network after round 0: "
          f"{hist.rounds[0].test_metric:.4g}), test loss {res.test_loss:.4g}, depth {res.depth}, "
          f"{res.n_params} parameters, {res.epochs} epochs, {wall:.1f} s")
    print(f"wrote {out}/: history.json, metrics.json, growth.png, mu.png, model/ (topoderiv.load('{out / 'model'}'))")
    return 0


def results_markdown(comp: Any, command: str) -> str:
    """``results.md``: the table, the budget and the command."""
    b = comp.budget
    lines = [
        f"# {comp.task}: topological-derivative growth vs baselines",
        "",
        comp.table(),
        "",
        f"Seeds {comp.seeds}; every method: ResidualMLP width {b['width']}, initial depth {b['depth']}, "
        f"{b['total_epochs']} epochs in total ({b['epochs_per_round']} per round, up to {b['rounds']} insertions, "
        f"patience {b['patience']}), {'SGD (momentum 0.9)' if b.get('optimizer') == 'sgd' else 'Adam'} lr {b['lr']}, "
        f"batch {b['batch_size']}. Test metric of the final network. "
        f"Wall time {comp.meta.get('wall_time', 0):.0f} s on {comp.meta.get('device', 'cpu')} "
        f"({comp.meta.get('torch_threads')} threads).",
        "",
        f"Command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .experiments.compare import compare
    from .experiments.plots import plot_comparison, plot_curves, plot_growth, plot_mu

    _setup(args)
    task = _task(args)
    out = args.out or Path("runs") / f"compare-{args.task}"
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(dict.fromkeys(args.seeds))
    methods = list(dict.fromkeys(args.methods))
    command = _command_line(argv)
    print(f"task {task.name}: methods {' '.join(methods)}; seeds {seeds}")
    comp = compare(task, methods, seeds, _budget(args), patience=args.patience, score_batches=args.score_batches,
                   device=args.device, progress=not args.no_progress, log=print)
    comp.meta["command"] = command
    comp.to_json(out / "results.json")
    md = results_markdown(comp, command)
    (out / "results.md").write_text(md)
    plot_comparison(comp, out / "comparison.png")
    plot_curves(comp, out / "curves.png")
    for m in ("topological", "topological_multi"):
        runs = comp.by_method(m)
        if runs:
            first = min(runs, key=lambda r: r.seed)
            plot_growth(first.history, out / f"growth_{m}_s{first.seed}.png", metric_name=f"test {task.metric.name}")
            plot_mu(first.history, out / f"mu_{m}_s{first.seed}.png")
    print()
    print(md)
    print(f"wrote {out}/: results.md, results.json, comparison.png, curves.png")
    return 0


def cmd_info(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .__main__ import main as info_main

    info_main()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``topoderiv`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = {"grow": cmd_grow, "compare": cmd_compare, "info": cmd_info}[args.command]
    return handler(args, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
