"""The ``topoderiv`` command line.

    topoderiv grow     [--task heat] [--model mlp|cnn|vit|timm:NAME] [--insert KIND] [--seed 0] [--rounds R]
                       [--epochs E] [--out DIR] [--device cpu] ...
    topoderiv compare  [--task heat] [--seeds 0 1 2] [--methods ...] [--out DIR] ...
    topoderiv transfer [--target split] [--seeds 0 1 2 3 4] [--methods ...] [--out DIR] ...
    topoderiv info

``grow`` runs topological-derivative growth on a built-in task, prints the growth table round by
round and the final metrics, and writes to ``--out``: ``history.json``, ``growth.png`` (loss curve
with insertions), ``mu.png`` (topological derivative per point per round), ``metrics.json`` and the
grown model (``model/``, load it with ``topoderiv.load(DIR/"model")``). While it runs, ``--out``
holds ``run.json`` (the settings), ``checkpoint/`` (the last completed round, written before
anything else of that round) and ``history.json`` (the rounds so far). Ctrl-C writes ``model/``
and ``history.json`` of the last completed round, prints the command that resumes, and exits
with 130; ``topoderiv grow --resume DIR`` continues the run exactly as if it had not stopped.

Data parallel: ``torchrun --nproc-per-node N -m topoderiv.cli grow ...`` (or ``topoderiv grow
--distributed N``, which starts torchrun itself) runs the growth in N processes (gloo on the CPU,
NCCL with ``--device cuda``: rank r on ``cuda:LOCAL_RANK``): every global batch of ``--batch-size``
rows is cut into N slices, one per rank (the same run as one process, up to rounding); rank 0
prints and writes every file.

``--model`` picks the network family (mlp: ResidualMLP, the default; cnn: ResidualCNN and vit: ViT on
an image task such as digits-images; ``timm:NAME``: a timm model created with pretrained=False and
sized to the task, ``--timm-kwargs`` for further arguments) and ``--insert`` the site kind of the
inserted blocks (default: the family's).

``compare`` runs every method of :mod:`topoderiv.baselines` on every seed with the same budget
and writes ``results.md`` (markdown tables: the test metric, mean +- std over seeds, and the
compute to first reach a target validation loss, ``--target`` or by default the best of the
final-size network trained from scratch; and the command), ``results.json``, ``comparison.png``,
``curves.png``, ``compute.png`` (validation loss against cumulative FLOPs and wall time) and the
growth plots of the first seed's topological run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .experiments.argtypes import int_at_least, positive_float

__all__ = ["main", "build_parser", "EXIT_INTERRUPTED"]

#: exit status after Ctrl-C (128 + SIGINT, as a shell reports it)
EXIT_INTERRUPTED = 130
RUN_FILE = "run.json"
CHECKPOINT = "checkpoint"


class UsageError(Exception):
    """A command line that parses but cannot run (reported as a usage error, exit status 2)."""


_positive_int = int_at_least(1)
_nonneg_int = int_at_least(0)


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


def _model_family(text: str) -> str:
    """argparse type of --model: mlp, cnn, vit or timm:<name>."""
    from .experiments.compare import parse_model

    try:
        return parse_model(text, "--model")
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).replace("--model: model must be", "expected")) from None


def _timm_kwargs(text: str) -> Dict[str, Any]:
    """argparse type of --timm-kwargs: ``key=value,key=value`` (values as Python literals: 64, 0.5,
    True, (8, 8); anything else is a string)."""
    import ast

    out: Dict[str, Any] = {}
    for item in filter(None, (t.strip() for t in _split_top(text))):
        key, sep, val = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas (e.g. "
                                             f"embed_dim=64,num_heads=2,patch_size=2), got {item!r} in {text!r}")
        try:
            out[key] = ast.literal_eval(val.strip())
        except (ValueError, SyntaxError):
            out[key] = val.strip()
    return out


def _split_top(text: str) -> List[str]:
    """Splits at commas outside brackets (``img_size=(8, 8),depth=2`` is two items)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _add_common(p: argparse.ArgumentParser) -> None:
    from .experiments.tasks import OPTIMIZERS, available_tasks
    from .sites import KINDS

    p.add_argument("--task", default="heat", choices=available_tasks(), help="built-in task (default: heat)")
    p.add_argument("--model", type=_model_family, default=None, metavar="{mlp,cnn,vit,timm:NAME}",
                   help="network family (default: the task's, mlp for heat/digits/regression, cnn for digits-images; "
                        "mlp: ResidualMLP; cnn: ResidualCNN and vit: ViT need an image task; timm:NAME: "
                        "timm.create_model(NAME, pretrained=False) sized to the task, made growable by "
                        "topoderiv.models.timm_model; needs timm and a model taking depth=, e.g. "
                        "timm:vit_tiny_patch16_224)")
    p.add_argument("--insert", choices=sorted(KINDS), default=None,
                   help="site kind of the inserted blocks (default: the family's: linear for mlp, conv for cnn, "
                        "transformer_block for vit and timm)")
    p.add_argument("--timm-kwargs", type=_timm_kwargs, default=None, metavar="K=V,...",
                   help="further timm.create_model arguments for --model timm:NAME, e.g. "
                        "embed_dim=64,num_heads=2,patch_size=2 (img_size, in_chans, num_classes come from the task, "
                        "depth from --depth)")
    p.add_argument("--data-seed", type=_nonneg_int, default=0, help="seed of the task's data (default 0)")
    p.add_argument("--rounds", type=_nonneg_int, default=None, help="max insertions (default: the task's)")
    p.add_argument("--epochs", type=_positive_int, default=None,
                   help="epochs per round; total budget = epochs * (rounds + 1) (default: the task's)")
    p.add_argument("--width", type=_positive_int, default=None, help="MLP width (default: the task's)")
    p.add_argument("--channels", type=_positive_int, nargs="+", default=None, metavar="C",
                   help="CNN channels per stage (default: the task's)")
    p.add_argument("--embed-dim", type=_positive_int, default=None, help="ViT token width (default: the task's)")
    p.add_argument("--patch-size", type=_positive_int, default=None, help="ViT patch size (default: the task's)")
    p.add_argument("--num-heads", type=_positive_int, default=None, help="ViT attention heads (default: the task's)")
    p.add_argument("--depth", type=_nonneg_int, default=None,
                   help="initial depth (blocks; a CNN spreads them over its stages) (default: the task's, 2)")
    p.add_argument("--max-depth", type=_positive_int, default=None, help="depth cap (default: the task's)")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the task's)")
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
    sub = parser.add_subparsers(dest="command", metavar="{grow,compare,transfer,info}")
    sub.required = True
    parser.commands = {}  # sub-command parsers, for usage errors found after parsing

    g = sub.add_parser("grow", help="grow a network on a built-in task by the topological derivative",
                       description="Topological-derivative growth on a built-in task: growth table, final "
                                   "metrics, history JSON, plots and the grown model in --out.")
    _add_common(g)
    g.add_argument("--seed", type=_nonneg_int, default=0, help="training seed (default 0)")
    g.add_argument("--rule", choices=("top", "multi", "all"), default="top",
                   help="phi: top eigenvector (default; one live row), the reference code's multi-eigenvector "
                        "rule, or 'all' (every row on its own block's top eigenvector, no dead rows)")
    g.add_argument("--out", type=Path, default=None, help="output folder (default runs/grow-<task>-s<seed>)")
    g.add_argument("--resume", type=Path, default=None, metavar="DIR",
                   help="continue the run in the output folder DIR (after Ctrl-C or a crash) with its recorded "
                        "settings; flags given again must agree with them (--device, --threads, --no-progress "
                        "may change)")
    g.add_argument("--distributed", type=_positive_int, nargs="?", const=0, default=None, metavar="N",
                   help="run data-parallel in N processes on this machine (torch.distributed.run with gloo on the "
                        "CPU, NCCL with --device cuda; N omitted: one per CPU core or GPU); each rank takes its slice "
                        "of every training batch. Under torchrun this is implied (and N is ignored)")
    parser.commands["grow"] = g

    c = sub.add_parser("compare", help="compare growth with the baselines over seeds",
                       description="Runs every method with the same budget and seeds; writes results.md, "
                                   "results.json and plots to --out.")
    _add_common(c)
    from .experiments.compare import DEFAULT_METHODS, METHODS

    c.add_argument("--seeds", type=_nonneg_int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    c.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, metavar="METHOD",
                   help=f"methods (default for the mlp: {' '.join(DEFAULT_METHODS)}; for cnn, vit and timm models "
                        f"also topological_multi and stacking, and zero_block with transformer sites; all: "
                        f"{' '.join(METHODS)})")
    c.add_argument("--out", type=Path, default=None, help="output folder (default runs/compare-<task>)")
    c.add_argument("--target", type=positive_float, default=None, metavar="LOSS",
                   help="validation loss of the compute-to-target table (default: on each seed, the best validation "
                        "loss of fixed_final, the final-size network trained from scratch)")
    c.add_argument("--no-epoch-val", action="store_true",
                   help="evaluate the validation loss at the end of every round only, not after every epoch (faster; "
                        "the compute to the target is then read per round)")
    parser.commands["compare"] = c

    from .experiments.transfer import add_transfer_parser

    parser.commands["transfer"] = add_transfer_parser(sub)
    sub.add_parser("info", help="print what was built (C++/CUDA kernels, torch)")
    return parser


def _budget(args: argparse.Namespace) -> Dict[str, Any]:
    chans = getattr(args, "channels", None)
    return {"epochs_per_round": args.epochs, "rounds": args.rounds, "width": args.width, "depth": args.depth,
            "max_depth": args.max_depth, "lr": args.lr, "batch_size": args.batch_size, "optimizer": args.optimizer,
            "channels": None if chans is None else tuple(chans), "embed_dim": getattr(args, "embed_dim", None),
            "patch_size": getattr(args, "patch_size", None), "num_heads": getattr(args, "num_heads", None)}


def _task(args: argparse.Namespace):
    from .experiments.tasks import get_task

    kwargs = {}
    if args.n_train is not None:
        kwargs["n_train"] = args.n_train
    return get_task(args.task, seed=args.data_seed, **kwargs)


def _network(args: argparse.Namespace) -> Any:
    """The :class:`~topoderiv.experiments.compare.Network` of --model / --insert / --timm-kwargs."""
    from .experiments.compare import Network

    try:
        return Network(getattr(args, "model", None), getattr(args, "insert", None),
                       dict(getattr(args, "timm_kwargs", None) or {}))
    except ValueError as err:
        msg = str(err).replace("Network: timm_kwargs", "--timm-kwargs").replace("Network: ", "")
        raise UsageError(msg) from None


def _probe_network(network: Any, task: Any, cfg: Any) -> Tuple[str, List[str]]:
    """Builds the initial network once (a usage error when the family, the insert kind or the timm
    options do not fit the task); returns its description and its site kinds."""
    from .experiments.compare import site_kinds

    flags = f"--model {network.family(task)}" + (f" --insert {network.insert}" if network.insert else "")
    try:
        net = network.build(task, cfg.depth, config=cfg, seed=0)
        kinds = site_kinds(net)
    except (ValueError, TypeError) as err:
        raise UsageError(f"{flags} does not fit --task {task.name}: {err}") from None
    return network.describe(net), kinds


def _check_budget(cfg: Any) -> None:
    if cfg.depth > cfg.max_depth:
        raise UsageError(f"--depth must not exceed --max-depth (the depth cap of the growth), got initial depth "
                         f"{cfg.depth} and max depth {cfg.max_depth}")


def _make_out(out: Path) -> None:
    """Creates the output folder; a usage error when a part of the path is an existing file."""
    p = out
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    if os.path.lexists(p) and not p.is_dir():
        if p == out:
            raise UsageError(f"--out must be a folder, got {str(out)!r}, an existing file")
        raise UsageError(f"--out must be a folder path, got {str(out)!r}: {str(p)!r} in it is an existing file")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out: cannot create the folder {str(out)!r}: {err.strerror or err}") from None


def _write_atomic(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file: the file is never seen half-written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)


def _command_line(argv: Sequence[str]) -> str:
    return "topoderiv " + " ".join(shlex.quote(a) for a in argv)


class RoundPrinter:
    """Prints one growth-table row per finished round (through tqdm when bars are shown)."""

    def __init__(self, metric_name: str, progress: bool) -> None:
        self.metric_name, self.progress = metric_name, progress
        self.started = False
        self.cum_flops = 0
        self.header = (f"{'round':>5} {'depth':>5} {'params':>7} {'point':>5} {'eps':>5} {'mu*':>9} "
                       f"{'train':>9} {'val':>9} {'test ' + metric_name:>12} {'cum GFLOP':>10} {'time':>7}")

    def write(self, line: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(line)
        else:
            print(line, flush=True)

    def __call__(self, grower: Any, rec: Any) -> None:
        if not self.started:
            self.started = True
            self.write(self.header)
        mu = rec.mu.get(rec.point) if rec.point is not None else None
        point = "-" if rec.point is None else str(rec.point)
        if rec.info.get("phase") == "finish":
            point = "fin"
        eps = "-" if rec.eps is None else f"{rec.eps:.2g}"
        mus = "-" if mu is None else f"{mu:.3g}"
        test = "-" if rec.test_metric is None else f"{rec.test_metric:.4g}"
        flops = "-"
        if rec.flops is not None:
            self.cum_flops += rec.flops
            flops = f"{self.cum_flops / 1e9:.4g}"
        self.write(f"{rec.round:>5} {rec.depth:>5} {rec.n_params:>7} {point:>5} {eps:>5} {mus:>9} "
                   f"{rec.train_loss:>9.3e} {rec.val_loss:>9.3e} {test:>12} {flops:>10} {rec.wall_time:>6.1f}s")


#: grow settings recorded in run.json; a resumed run uses them (flags given again must agree)
_GROW_SETTINGS = ("task", "data_seed", "n_train", "rounds", "epochs", "width", "depth", "max_depth", "lr", "optimizer",
                  "batch_size", "patience", "score_batches", "seed", "rule", "model", "insert", "timm_kwargs",
                  "channels", "embed_dim", "patch_size", "num_heads")
#: settings a resumed run may change (they do not change what is computed, except in the last bits
#: when the device or the thread count differs)
_FREE_SETTINGS = ("device", "threads", "no_progress", "distributed")
#: flag -> the resolved budget field it sets
_BUDGET_FIELDS = {"epochs": "epochs_per_round", "rounds": "rounds", "width": "width", "depth": "depth",
                  "max_depth": "max_depth", "lr": "lr", "optimizer": "optimizer", "batch_size": "batch_size",
                  "channels": "channels", "embed_dim": "embed_dim", "patch_size": "patch_size",
                  "num_heads": "num_heads"}
_UNSET = object()


def _given_flags(argv: Sequence[str]) -> Dict[str, Any]:
    """The grow options present on the command line (not their defaults), by dest."""
    parser = build_parser()
    dests = vars(parser.parse_args(argv))
    parser.commands["grow"].set_defaults(**{k: _UNSET for k in dests if k != "command"})
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not _UNSET and k != "command"}


def _resume_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> argparse.Namespace:
    """The namespace of ``grow --resume DIR``: DIR's recorded settings, checked against the flags given."""
    g = parser.commands["grow"]
    folder: Path = args.resume
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        why = "no such folder" if not folder.exists() else f"it holds no {RUN_FILE}"
        g.error(f"--resume must name an output folder of `topoderiv grow`, got {str(folder)!r} ({why})")
    try:
        run = json.loads(run_file.read_text())
        recorded, resolved = dict(run["args"]), dict(run["resolved"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        g.error(f"--resume: {run_file} is not a readable run record ({err})")
    given = _given_flags(argv)
    given.pop("resume", None)
    for dest, val in given.items():
        flag = "--" + dest.replace("_", "-")
        if dest in _FREE_SETTINGS:
            continue
        if dest == "out":
            if Path(val).resolve() != folder.resolve():
                g.error(f"--out must be left out or be the --resume folder, got --out {val} and --resume {folder}")
            continue
        want = (resolved.get(_BUDGET_FIELDS[dest]) if dest in _BUDGET_FIELDS else
                resolved["n_train"] if dest == "n_train" else recorded.get(dest))
        if dest == "channels" and want is not None:
            want = list(want)
        if val != want:
            g.error(f"{flag} {val} disagrees with the run in {folder} (recorded: {want}); leave {flag} out to resume "
                    f"that run, or start a new run with another --out")
    ns = argparse.Namespace(**{k: recorded.get(k) for k in _GROW_SETTINGS + _FREE_SETTINGS})
    for k in _FREE_SETTINGS:
        if k in given:
            setattr(ns, k, given[k])
    if "device" not in given:
        try:
            ns.device = _device(ns.device)
        except argparse.ArgumentTypeError as err:
            g.error(f"the run in {folder} ran on {ns.device!r}: {err}; give --device cpu to resume it on the CPU")
    ns.command, ns.out, ns.resume = "grow", folder, folder
    return ns


def _start_fresh(out: Path) -> None:
    """Clears the outputs of an earlier, finished run in ``out``; refuses an unfinished one (it can be resumed)."""
    import shutil

    ck = out / CHECKPOINT / "model.json"
    if ck.is_file() and not (out / "metrics.json").is_file():
        raise UsageError(f"--out {out} holds an unfinished run (its checkpoint is in {out / CHECKPOINT}): continue it "
                         f"with `topoderiv grow --resume {shlex.quote(str(out))}`, or remove the folder or choose "
                         "another --out to start a new run")
    for name in ("metrics.json", "history.json", "growth.png", "mu.png", RUN_FILE):
        if (out / name).is_file():
            (out / name).unlink()
    ours = {"model.json", "model.safetensors", "optimizer.safetensors", "tensors.safetensors", "history.json"}
    for name in (CHECKPOINT, "model"):  # checkpoint folders holding nothing else
        folder = out / name
        if (folder / "model.json").is_file() and {p.name for p in folder.iterdir()} <= ours:
            shutil.rmtree(folder)


def _interrupted(out: Path, ck_dir: Path, extra: Dict[str, Any]) -> int:
    """After Ctrl-C: model/ and history.json of the last completed round, and how to resume."""
    from .growth import load_checkpoint, save

    try:  # a second Ctrl-C must not cut these writes short
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: no signal handling there
        old = None
    try:
        resume = f"topoderiv grow --resume {shlex.quote(str(out))}"
        if not (ck_dir / "model.json").is_file():
            print(f"\ninterrupted before the first round was complete: nothing to keep. Start again with: {resume}",
                  file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        ck = load_checkpoint(ck_dir)
        hist = ck.history
        hist.meta["command"] = extra["command"]
        _write_atomic(out / "history.json", json.dumps(hist.to_dict(), indent=1))
        save(ck.model, out / "model", history=hist, extra=extra)
        last = hist.rounds[-1]
        print(f"\ninterrupted: round {last.round} (depth {last.depth}) is complete and saved in {ck_dir}; wrote "
              f"{out}/history.json and {out}/model/ of that round.\nResume with: {resume}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _launched() -> bool:
    """True in a process started by torchrun (torch.distributed.run)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``topoderiv grow --distributed N``: this command again, in N processes under torch.distributed.run
    (the children see torchrun's environment and ignore --distributed); returns their exit status."""
    import torch

    n = args.distributed or (torch.cuda.device_count() if str(args.device).startswith("cuda") else os.cpu_count()) or 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "topoderiv.cli", *argv]
    proc = subprocess.Popen(cmd)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the children got the same Ctrl-C: wait for them to save and exit
            continue


def _start_distributed(args: argparse.Namespace) -> Optional[Dict[str, int]]:
    """Under torchrun: the process group (gloo, or NCCL for --device cuda on cuda:LOCAL_RANK), and
    ``{"rank", "world"}``; None for one process."""
    if not _launched():
        return None
    import torch
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    cuda = str(args.device).startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return {"rank": dist.get_rank(), "world": world}


def _shard_task(task: Any, rank: int, world: int) -> Any:
    """``task`` whose training loader gives rank ``rank`` its slice of every batch
    (:func:`topoderiv.data.shard`); validation and test stay whole."""
    from dataclasses import dataclass, fields

    from .data import shard

    @dataclass
    class ShardedTask(type(task)):  # type: ignore[misc, valid-type]
        rank: int = 0
        world: int = 1

        def loader(self, split: str = "train", batch_size: Optional[int] = None, *, shuffle: Optional[bool] = None,
                   seed: int = 0) -> Any:
            base = super().loader(split, batch_size, shuffle=shuffle, seed=seed)
            return shard(base, self.rank, self.world) if split == "train" else base

    return ShardedTask(**{f.name: getattr(task, f.name) for f in fields(task)}, rank=rank, world=world)


def cmd_grow(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.distributed not in (None, 1) and not _launched():
        return _launch(args, argv)
    ranks = _start_distributed(args)
    if ranks is None:
        return _grow(args, argv, None)
    import torch.distributed as dist

    ok = False
    try:
        status = _grow(args, argv, ranks)
        ok = True
        return status
    finally:
        if dist.is_initialized():
            if ok:  # every rank leaves together (a rank tearing gloo down while a peer is still
                dist.barrier()  # sending can abort in gloo's threads); not after an error: it could hang
            dist.destroy_process_group()


def _grow(args: argparse.Namespace, argv: Sequence[str], ranks: Optional[Dict[str, int]]) -> int:
    """``topoderiv grow`` in this process (one rank of several when ``ranks`` is given: rank 0 prints
    and writes every file, the others train, score and wait)."""
    from dataclasses import asdict

    from .experiments.compare import make_budget, run_method
    from .experiments.plots import plot_growth, plot_mu
    from .growth import GrowthHistory, TopologicalStrategy, save

    _setup(args)
    writer = ranks is None or ranks["rank"] == 0
    print = builtin_print if writer else _quiet  # noqa: A001  (rank 0 speaks for all)
    task = _task(args)
    cfg = make_budget(task, _budget(args))
    _check_budget(cfg)
    network = _network(args)
    described, _ = _probe_network(network, task, cfg)
    out = args.out or Path("runs") / f"grow-{args.task}-s{args.seed}"
    ck_dir = out / CHECKPOINT
    resuming = args.resume is not None
    failed: Optional[Exception] = None
    try:
        if writer:
            _make_out(out)
            if not resuming:
                _start_fresh(out)
                run = {"format": "topoderiv-grow-run", "version": 1, "command": _command_line(argv),
                       "args": {k: getattr(args, k) for k in _GROW_SETTINGS + _FREE_SETTINGS},
                       "resolved": {**asdict(cfg), "n_train": int(task.train[0].shape[0])}}
                _write_atomic(out / RUN_FILE, json.dumps(run, indent=1))
    except Exception as err:
        if ranks is None:
            raise
        failed = err
    if ranks is not None:  # every rank learns whether rank 0's setup failed; then the shards
        from .method.distributed import communicator

        communicator(None, "topoderiv grow").agree({"out": str(out)}, failed)
        task = _shard_task(task, ranks["rank"], ranks["world"])
    command = json.loads((out / RUN_FILE).read_text())["command"] if resuming else _command_line(argv)
    progress = not args.no_progress and writer
    print(f"task {task.name}: d_in {task.d_in} -> d_out {task.d_out}, train/val/test "
          f"{task.train[0].shape[0]}/{task.val[0].shape[0]}/{task.test[0].shape[0]}, metric {task.metric.name}")
    width = sizes_text(network.family(task), asdict(cfg))
    print(f"network: {described}; {width}initial depth {cfg.depth}; budget {cfg.total_epochs} epochs = "
          f"{cfg.epochs_per_round} x ({cfg.rounds} rounds + 1), {cfg.describe_optimizer()}, batch {cfg.batch_size}, "
          f"patience {args.patience}, device {args.device}"
          + (f"; data parallel: {ranks['world']} processes" if ranks is not None else ""))
    printer = RoundPrinter(task.metric.name, progress)
    if resuming and writer:
        if (ck_dir / "history.json").is_file():
            done = GrowthHistory.from_json(ck_dir / "history.json")
            print(f"resuming {out}: {len(done.rounds)} rounds done (checkpoint {ck_dir})")
            for rec in done.rounds:
                printer(None, rec)
        else:
            print(f"resuming {out}: no round was complete, starting from round 0")

    def write_history(grower: Any, rec: Any) -> None:  # after the round's checkpoint
        grower.history.meta["command"] = command
        _write_atomic(out / "history.json", json.dumps(grower.history.to_dict(), indent=1))

    extra = {"task": task.name, "seed": args.seed, "data_seed": args.data_seed, "command": command}
    t0 = time.perf_counter()
    try:
        res = run_method(task, "topological", args.seed, budget=cfg, patience=args.patience,
                         strategy=TopologicalStrategy(rule=args.rule, k=4 if args.rule == "multi" else 1),
                         score_batches=args.score_batches, device=args.device, progress=progress, keep_model=True,
                         checkpoint_dir=ck_dir, resume=resuming, network=network,
                         callbacks=[printer, write_history] if writer else [])
        wall = time.perf_counter() - t0
        if not writer:
            return 0
        hist = res.history
        hist.meta["command"] = command
        _write_atomic(out / "history.json", json.dumps(hist.to_dict(), indent=1))
        save(res.model, out / "model", history=hist, optimizer=res.optimizer, extra=extra)
        plot_growth(hist, out / "growth.png", metric_name=f"test {task.metric.name}")
        plot_mu(hist, out / "mu.png")
        metrics = {"task": task.name, "seed": args.seed, "data_seed": args.data_seed, **network.to_dict(),
                   "network": described, task.metric.name: res.metric,
                   "test_loss": res.test_loss, "val_loss": res.val_loss, "train_loss": res.train_loss,
                   "initial_" + task.metric.name: hist.rounds[0].test_metric, "depth": res.depth,
                   "n_params": res.n_params, "epochs": res.epochs, "insertions": len(hist.insertions),
                   "stop_reason": hist.stop_reason, "wall_time": wall, "command": command}
        _write_atomic(out / "metrics.json", json.dumps(metrics, indent=1, default=str))
    except KeyboardInterrupt:
        return _interrupted(out, ck_dir, extra) if writer else EXIT_INTERRUPTED
    print(f"stopped growing: {hist.stop_reason}")
    print(f"final: test {task.metric.name} {res.metric:.4g} (initial network after round 0: "
          f"{hist.rounds[0].test_metric:.4g}), test loss {res.test_loss:.4g}, depth {res.depth}, "
          f"{res.n_params} parameters, {res.epochs} epochs, {wall:.1f} s")
    print(f"wrote {out}/: history.json, metrics.json, growth.png, mu.png, model/ (topoderiv.load('{out / 'model'}')), "
          f"{CHECKPOINT}/")
    return 0


builtin_print = print


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` on the ranks other than 0."""


def sizes_text(family: str, b: Dict[str, Any]) -> str:
    """The budget's sizes of a network family, e.g. ``"channels [16, 32], "`` (nothing for timm: its
    sizes are its own, from --timm-kwargs)."""
    if family == "cnn":
        return f"channels {list(b.get('channels') or [])}, "
    if family == "vit":
        return f"embed_dim {b.get('embed_dim')}, patch {b.get('patch_size')}, heads {b.get('num_heads')}, "
    return f"width {b['width']}, " if family == "mlp" else ""


def results_markdown(comp: Any, command: str) -> str:
    """``results.md``: the table, the budget and the command."""
    b = comp.budget
    fam = (comp.meta.get("network") or {}).get("family") or "mlp"
    width = sizes_text(fam, b)
    lines = [
        f"# {comp.task}: topological-derivative growth vs baselines",
        "",
        comp.table(),
        "",
        f"Seeds {comp.seeds}; every method: {comp.meta.get('network_description', 'ResidualMLP')}, {width}"
        f"initial depth {b['depth']}, "
        f"{b['total_epochs']} epochs in total ({b['epochs_per_round']} per round, up to {b['rounds']} insertions, "
        f"patience {b['patience']}), {'SGD (momentum 0.9)' if b.get('optimizer') == 'sgd' else 'Adam'} lr {b['lr']}, "
        f"batch {b['batch_size']}. Test metric of the final network. "
        f"Wall time {comp.meta.get('wall_time', 0):.0f} s on {comp.meta.get('device', 'cpu')} "
        f"({comp.meta.get('torch_threads')} threads).",
        "",
    ]
    lines += compute_markdown(comp)
    lines += [f"Command: `{command}`", ""]
    return "\n".join(lines)


def compute_markdown(comp: Any) -> List[str]:
    """The compute-to-target section of ``results.md`` (a note when no target can be set)."""
    lines = ["## Compute to reach the target validation loss", ""]
    try:
        table = comp.compute_table()
    except ValueError as err:
        return lines + [f"No table: {err} (give --target).", ""]
    lines += [table, "",
              "Compute counted up to the FIRST evaluation (after every epoch when recorded) at or below the target, "
              "interpolated linearly in the loss over that epoch's training (topoderiv.growth.compute."
              "compute_to_target); mean ± std over the seeds that reached it. FLOPs: forward + backward by torch's "
              "FLOP formulas (matrix products; activations and other elementwise ops not counted), the optimiser "
              "analytically per parameter element, scoring's solve by the kernels' cost model with the actual "
              "Lanczos steps, and the eps search. Wall time: training, scoring and the eps search, evaluation "
              "excluded. Saving: 1 - compute / compute of fixed_final on the same seed (both reached). GFLOP whole "
              "run: all the compute of the run's budget.", ""]
    return lines


def cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .experiments.compare import compare
    from .experiments.plots import plot_comparison, plot_compute, plot_curves, plot_growth, plot_mu

    _setup(args)
    task = _task(args)
    from .experiments.compare import check_methods, default_methods, make_budget

    cfg = make_budget(task, _budget(args))
    _check_budget(cfg)
    network = _network(args)
    described, kinds = _probe_network(network, task, cfg)
    methods = list(dict.fromkeys(args.methods if args.methods else default_methods(network.family(task), kinds)))
    try:
        check_methods(methods, kinds, "--methods")
    except ValueError as err:
        raise UsageError(str(err)) from None
    family = "" if network.model is None else "-" + network.model.replace(":", "-")
    out = args.out or Path("runs") / f"compare-{args.task}{family}"
    _make_out(out)
    seeds = list(dict.fromkeys(args.seeds))
    command = _command_line(argv)
    print(f"task {task.name}: network {described}; methods {' '.join(methods)}; seeds {seeds}")

    def save_partial(comp: Any, run: Any) -> None:  # a long comparison keeps what it has done
        comp.meta["command"] = command
        comp.meta["partial"] = True
        _write_atomic(out / "results.json", json.dumps(comp.to_dict(), indent=1, default=str))

    comp = compare(task, methods, seeds, _budget(args), patience=args.patience, score_batches=args.score_batches,
                   device=args.device, progress=not args.no_progress, log=print, target=args.target,
                   val_every_epoch=not args.no_epoch_val, network=network, on_run=save_partial)
    comp.meta.pop("partial", None)
    comp.meta["command"] = command
    comp.to_json(out / "results.json")
    md = results_markdown(comp, command)
    (out / "results.md").write_text(md)
    plot_comparison(comp, out / "comparison.png")
    plot_curves(comp, out / "curves.png")
    plot_compute(comp, out / "compute.png")
    for m in ("topological", "topological_multi"):
        runs = comp.by_method(m)
        if runs:
            first = min(runs, key=lambda r: r.seed)
            plot_growth(first.history, out / f"growth_{m}_s{first.seed}.png", metric_name=f"test {task.metric.name}")
            plot_mu(first.history, out / f"mu_{m}_s{first.seed}.png")
    print()
    print(md)
    print(f"wrote {out}/: results.md, results.json, comparison.png, curves.png, compute.png")
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
    if args.command == "grow" and args.resume is not None:
        args = _resume_args(parser, args, argv)
    from .experiments.transfer import cmd_transfer

    handler = {"grow": cmd_grow, "compare": cmd_compare, "transfer": cmd_transfer, "info": cmd_info}[args.command]
    try:
        return handler(args, argv)
    except UsageError as err:
        parser.commands.get(args.command, parser).error(str(err))
        raise  # pragma: no cover - error() exits
    except KeyboardInterrupt:  # grow handles its own (it saves the last round); here nothing was kept
        print("\ninterrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
