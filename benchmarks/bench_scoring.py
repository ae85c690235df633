"""Cost of one scoring step (topological derivative at every candidate point) in training epochs.

    python benchmarks/bench_scoring.py [--widths 64 256 1024] [--samples 4096] [--device cpu|cuda]

ResidualMLP(d_in=16, width, d_out=1, depth=2) (3 candidate points) on a smooth regression task,
briefly trained first so costates are realistic. One epoch = one pass of Adam over the same
samples in batches of 64. Scoring implementations, timed interleaved in one process:

- capture only: the forward + backward pass that gives states and costates (a floor for scoring),
- topoderiv: ``topoderiv.score`` (kernels; auto route; matrix-free solves warm-started; all
  points' solves batched in one multi-point call),
- topoderiv, need=top: the same, only the block holding each point's mu solved to tolerance (the
  others stop as soon as they cannot win; mu, block and phi unchanged),
- topoderiv, cold start: the same without the subspace warm start (random starts, tol 1e-4),
- torch einsum + eigh: ``topoderiv.score(backend="torch")`` (plain-PyTorch blocks, batched eigh),
- reference code: one dense eigh of the whole (n m) x (n m) matrix Q per point (where it fits).
"""
from __future__ import annotations

import argparse
import sys

import torch

import topoderiv as td
from topoderiv.method import statistic
from topoderiv.sites.capture import capture_all
from topoderiv.models import ResidualMLP
from topoderiv.growth.training import fit

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import interleaved, machine, table  # noqa: E402


def data(N: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N, 16, generator=g) * 2 - 1
    y = (torch.sin(3 * x[:, :4]).sum(1) * torch.cos(2 * x[:, 4:8]).sum(1))[:, None] / 4
    return x, y


def batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]


def reference_code_score(model, train, loss_fn, mem_limit=8 * 2**30):
    """The reference code's approach: capture, then one dense eigh of the full Q per point."""
    cap = capture_all(model, train, loss_fn)
    out = {}
    for pt, x in cap.states.items():
        p = cap.costates[pt]
        xt = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)
        n, m = p.shape[1], xt.shape[1]
        if (n * m) ** 2 * 4 > mem_limit:
            return None
        blocks = td.reference.sensitivity_blocks(xt[:, :-1], p)
        Q = torch.block_diag(*blocks)
        out[pt] = float(torch.linalg.eigvalsh(Q)[-1])
    return out


def cold_score(model, data, loss_fn):
    """The scorer without the subspace warm start (random Lanczos starts, tol 1e-4 as before)."""
    saved = statistic.WARM_MIN_M
    statistic.WARM_MIN_M = 1 << 62
    try:
        return td.score(model, data, loss_fn)
    finally:
        statistic.WARM_MIN_M = saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (model, data and scoring on it)")
    args = ap.parse_args(argv)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {dev}: CUDA is not available")
    torch.manual_seed(0)
    x, y = (t.to(dev) for t in data(args.samples))
    train = batches(x, y, args.batch)
    score_data = batches(x, y, 1024)
    loss_fn = torch.nn.functional.mse_loss
    rows = []
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    print(f"# scoring cost on {machine(kind)}, {args.samples} samples\n")
    for w in args.widths:
        model = ResidualMLP(16, w, 1, 2).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        fit(model, opt, train, loss_fn, 2)
        fns = {
            "one training epoch": lambda: fit(model, opt, train, loss_fn, 1),
            "capture only (forward + backward)": lambda: capture_all(model, score_data, loss_fn),
            "topoderiv.score": lambda: td.score(model, score_data, loss_fn),
            "topoderiv.score, need=top": lambda: td.score(model, score_data, loss_fn, need="top"),
            "topoderiv.score, cold start (tol 1e-4)": lambda: cold_score(model, score_data, loss_fn),
            "torch einsum + eigh": lambda: td.score(model, score_data, loss_fn, backend="torch"),
        }
        if (w * (w + 1)) ** 2 * 4 <= 2 * 2**30:
            fns["reference code (dense (nm)^2 eigh)"] = lambda: reference_code_score(model, score_data, loss_fn)
        if w >= 1024:
            fns.pop("torch einsum + eigh")  # 4 GB of blocks per point and 1024 eighs of 1025^2: minutes
        t = interleaved(fns, repeats=args.repeats if w < 1024 else 1, warmup=1 if w < 1024 else 0, device=kind)
        reps = {"topoderiv.score": td.score(model, score_data, loss_fn),
                "topoderiv.score, need=top": td.score(model, score_data, loss_fn, need="top"),
                "topoderiv.score, cold start (tol 1e-4)": cold_score(model, score_data, loss_fn)}
        ref = td.score(model, score_data, loss_fn, backend="torch") if w < 1024 else None
        for k, v in t.items():
            rep = reps.get(k)
            agree = "" if ref is None or rep is None else \
                max(abs(a.mu - b.mu) / max(abs(b.mu), 1e-30) for a, b in zip(rep.points, ref.points))
            rows.append({"width": w, "impl": k, "s": v, "epochs": v / t["one training epoch"],
                         "route": rep.points[0].route if rep is not None else "",
                         "max rel diff of mu vs torch": agree})
    print(table(rows, ["width", "impl", "s", "epochs", "route", "max rel diff of mu vs torch"]))


if __name__ == "__main__":
    main()
