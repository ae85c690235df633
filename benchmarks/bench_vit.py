"""ViT-scale cost of scoring: every point of a ViT-S/16 and a ViT-B/16 (224 px, 197 tokens), in
training steps on the same batch and device.

    python benchmarks/bench_vit.py [--device cpu|cuda] [--batch 8] [--models S B]
                                   [--kinds transformer_block tokens] [--repeats 3] [--quick]

For each model x insert kind: one call of ``topoderiv.score`` on one batch, all points (a ViT of
12 blocks has 13 sites: before every block and after the last), rule ``"top"``, and one training
step (forward + backward + AdamW step) of the same model on the same batch, timed INTERLEAVED in
one process (this CPU's speed swings; the ratio does not). The model is timm's
``vit_small_patch16_224`` / ``vit_base_patch16_224`` through :func:`topoderiv.models.timm_model`
when timm is installed (``pretrained=False``), else :class:`topoderiv.models.ViT` with the same
shapes (dim 384 / 768, 6 / 12 heads, 12 blocks, patch 16, 224 px, 1000 classes).

Columns: ``score s``, ``step s`` (medians), ``ratio`` = score / step, peak memory of each above
what was allocated before the call (CPU: peak resident set size sampled every 2 ms by a thread,
after ``malloc_trim`` has handed freed heap back; cuda: ``torch.cuda.max_memory_allocated``), and where scoring time goes: ``capture`` (the forward
+ backward with the site hooks), ``accumulate`` (states and costates into the statistics) and
``solve`` (the eigen/singular solves of every point), measured in one extra instrumented call.

Targets (issue 10): ViT-S/16, ``transformer_block``: ratio <= 2 on the CPU, <= 1.5 on a GPU;
``tokens``: <= 4 on the CPU, <= 3 on a GPU. ``--quick``: a tiny ViT (smoke run).
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List

import torch
import torch.nn.functional as F

import topoderiv as td
import topoderiv.growth.scoring as scoring_mod
from topoderiv.method import statistic as statistic_mod
from topoderiv.models import ViT

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import interleaved, machine, table  # noqa: E402

try:
    import timm  # noqa: F401
    from topoderiv.models import timm_model
    HAVE_TIMM = True
except ImportError:
    HAVE_TIMM = False

try:
    _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _LIBC.malloc_trim  # noqa: B018  (glibc only)
except (OSError, AttributeError):
    _LIBC = None

SHAPES = {"S": dict(name="vit_small_patch16_224", embed_dim=384, num_heads=6),
          "B": dict(name="vit_base_patch16_224", embed_dim=768, num_heads=12)}
TARGETS = {("cpu", "transformer_block"): 2.0, ("cpu", "tokens"): 4.0,
           ("cuda", "transformer_block"): 1.5, ("cuda", "tokens"): 3.0}


def build(size: str, kind: str, quick: bool, device: str):
    shape = SHAPES[size]
    if quick:
        kw = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=4, num_heads=2)
    else:
        kw = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=shape["embed_dim"], depth=12,
                  num_heads=shape["num_heads"])
    torch.manual_seed(0)
    if HAVE_TIMM:
        model = timm_model(shape["name"], insert=kind, **kw)
        impl = "timm"
    else:
        model = ViT(kw["img_size"], kw["patch_size"], kw["in_chans"], kw["num_classes"], kw["embed_dim"], kw["depth"],
                    kw["num_heads"], insert=kind)
        impl = "topoderiv ViT"
    return model.to(device), kw, impl


class PeakRSS:
    """Peak resident set size (bytes) of this process while inside ``with``, sampled by a thread."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak, self.base = period, 0, 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.period)

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self.rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def peak_memory(fn, device: str) -> float:
    """MB allocated at the peak of ``fn()`` above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)  # hand freed heap back to the OS, so the peak is measured from what is live
    with PeakRSS() as p:
        fn()
    return p.delta / 2**20


@contextmanager
def phases(device: str) -> Iterator[Dict[str, float]]:
    """Seconds spent in capture (forward + backward with hooks), statistic accumulation and solves
    during the ``with`` (wraps the scorer's capture and solve_points, and every statistic class's add)."""
    out = {"capture": 0.0, "accumulate": 0.0, "solve": 0.0}
    saved = []

    def wrap(owner, attr, key):
        orig = getattr(owner, attr)

        def timed(*a, **k):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                if device == "cuda":
                    torch.cuda.synchronize()
                out[key] += time.perf_counter() - t
        saved.append((owner, attr, orig))
        setattr(owner, attr, timed)

    wrap(scoring_mod, "capture", "capture")
    if hasattr(scoring_mod, "solve_points"):  # the scorer solves every point in one call
        wrap(scoring_mod, "solve_points", "solve")
    for cls in {c for c in vars(statistic_mod).values() if isinstance(c, type) and hasattr(c, "add")
                and hasattr(c, "solve") and c.__module__ == statistic_mod.__name__}:
        if "add" in vars(cls):
            wrap(cls, "add", "accumulate")
        if "solve" in vars(cls) and not hasattr(scoring_mod, "solve_points"):
            wrap(cls, "solve", "solve")
    try:
        yield out
    finally:
        for owner, attr, orig in reversed(saved):
            setattr(owner, attr, orig)


def run(size: str, kind: str, args) -> Dict[str, Any]:
    device = args.device
    model, kw, impl = build(size, kind, args.quick, device)
    trainee = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(trainee.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, kw["img_size"], kw["img_size"], generator=g).to(device)
    y = torch.randint(0, kw["num_classes"], (args.batch,), generator=g).to(device)
    n_points = len(td.sites.sites(model))

    def score() -> None:
        td.score(model, (x, y), F.cross_entropy, rule="top")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(trainee(x), y).backward()
        opt.step()

    t = interleaved({"score": score, "step": step}, repeats=args.repeats, warmup=1, device=device)
    mem_score = peak_memory(score, device)
    mem_step = peak_memory(step, device)
    with phases(device) as ph:
        t0 = time.perf_counter()
        score()
        wall = time.perf_counter() - t0
    ratio = t["score"] / t["step"]
    target = TARGETS.get((device, kind)) if size == "S" and not args.quick else None
    return {"model": f"ViT-{size}/16" if not args.quick else f"tiny ({size})", "impl": impl, "kind": kind,
            "points": n_points, "batch": args.batch, "score s": t["score"], "step s": t["step"], "ratio": ratio,
            "target": "" if target is None else f"<= {target:g} ({'met' if ratio <= target else 'MISSED'})",
            "score MB": mem_score, "step MB": mem_step,
            "capture %": 100 * ph["capture"] / wall, "accumulate %": 100 * ph["accumulate"] / wall,
            "solve %": 100 * ph["solve"] / wall}


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 8 on cpu, 64 on cuda)")
    ap.add_argument("--models", nargs="+", default=["S", "B"], choices=sorted(SHAPES))
    ap.add_argument("--kinds", nargs="+", default=["transformer_block", "tokens"],
                    choices=["transformer_block", "tokens"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="a tiny ViT (smoke run)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_vit.py: --device cuda but torch.cuda.is_available() is False")
    if args.batch is None:
        args.batch = 64 if args.device == "cuda" else 8
    print(f"# bench_vit: {machine(args.device)}; {'timm' if HAVE_TIMM else 'no timm: topoderiv ViT'}; "
          f"batch {args.batch}; repeats {args.repeats}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    for size in args.models:
        for kind in args.kinds:
            rows.append(run(size, kind, args))
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print()
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
