"""Convolution ops against the best plain-PyTorch composition, and the conv site's scoring cost.

    python benchmarks/bench_conv.py [--device cpu|cuda] [--quick] [--repeats R] [--only blocks,topk,matvec,cnn,points]

Five tables, every row of a table measured interleaved in one process (this CPU's speed swings
3-5x between runs; the ratios do not):

1. ``conv_sensitivity_blocks`` (float32), N=256, C=n=64, 16x16, k=3 (m = 577, 65536 rows), against
   the best PyTorch composition with the same memory budget: im2col by ``F.unfold`` in chunks of at
   most 2**22 elements (the conv site's ``ROW_CHUNK_ELEMENTS``), each chunk reduced by matmuls.
   GFLOP/s count the full-matrix flops ``2 rows n m^2`` (the kernel computes the upper triangle,
   half of them), so a fraction of the matmul rate above 1 comes from the symmetry. Targets:
   >= 1.5x on the CPU, >= 3x on a GPU.
2. ``conv_sensitivity_topk`` route ``"auto"`` (matrix-free here) against route ``"dense"`` at
   N=256, C=n=128, 8x8, k=3 (m = 1153: 680 MB of blocks), on real-like data (decaying channel
   scales, costates quadratic in a convolution of the input: the spectral gaps of real sensitivity
   blocks). Target: >= 5x.
3. ``conv_sensitivity_matvec`` (one Lanczos step of the matrix-free route) against its plain-PyTorch
   twin, ``conv2d`` then ``conv2d_weight`` (oneDNN / cuDNN convolutions), at N=256, C=64, 16x16, k=3
   with all n=64 blocks and with 4 (the steps where most blocks have converged). No target: context
   for the matrix-free route's cost.
4. Scoring a ResidualCNN with 64 channels at 16x16 (one stage of 2 blocks: 3 points, 256 samples,
   trained one epoch), in training epochs (Adam, batches of 64), before (Python im2col chunks
   accumulated by ``sensitivity_blocks``, always dense: the site as it was) and after (the
   convolution ops; images kept for a matrix-free solve within ``score``'s memory budget).
5. Several conv points at once: 4 points of one shape (N=64, C=n=32, 16x16, k=3, m = 289, real-like
   data, route ``"auto"``: matrix-free) solved by ONE multi-point ``conv_sensitivity_topk`` call
   (the scorer's ``solve_points``) against 4 single-point calls, with ``need="all"`` and
   ``need="top"``. No target: the ratio is what one batched launch saves per point.

``--quick`` shrinks every size (a smoke run).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Iterable, Tuple

import torch
import torch.nn.functional as F

import topoderiv as td
from topoderiv import ops
from topoderiv import reference as topoderiv_reference
from topoderiv.growth.training import fit
from topoderiv.method.statistic import EigenStatistic
from topoderiv.models import ResidualCNN
from topoderiv.sites import conv as conv_site

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import interleaved, machine, matmul_rate, table  # noqa: E402

CHUNK_ELEMENTS = 2**22  # the memory budget of the PyTorch compositions (elements of a temporary)


def unfold_rows(x: torch.Tensor, p: torch.Tensor, k: int, max_rows: int) -> Iterable[Tuple[torch.Tensor, torch.Tensor]]:
    """``(pt [rows, m] with the bias column, p [rows, n])`` in chunks of whole samples (>= 1)."""
    N, C, H, W = x.shape
    per = max(1, max_rows // (H * W))
    for s0 in range(0, N, per):
        cols = F.unfold(x[s0:s0 + per], k, padding=k // 2)  # [b, C k k, H W]
        cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], dim=1)
        yield cols.transpose(1, 2).reshape(-1, cols.shape[1]), p[s0:s0 + per].permute(0, 2, 3, 1).reshape(-1, p.shape[1])


def torch_blocks_per_channel(x: torch.Tensor, p: torch.Tensor, k: int) -> torch.Tensor:
    """Chunked unfold, then one GEMM per output channel: (p_r * Pt)^T Pt."""
    n, m = p.shape[1], x.shape[1] * k * k + 1
    out = torch.zeros(n, m, m, dtype=x.dtype, device=x.device)
    for u, q in unfold_rows(x, p, k, CHUNK_ELEMENTS // m):
        for r in range(n):
            out[r].addmm_((u * q[:, r:r + 1]).T, u)
    return out


def torch_blocks_bmm(x: torch.Tensor, p: torch.Tensor, k: int, group: int = 16) -> torch.Tensor:
    """Chunked unfold, then one bmm per group of 16 channels (the chunk shrinks 16x to keep the budget)."""
    n, m = p.shape[1], x.shape[1] * k * k + 1
    out = torch.zeros(n, m, m, dtype=x.dtype, device=x.device)
    for u, q in unfold_rows(x, p, k, CHUNK_ELEMENTS // (group * m)):
        for r0 in range(0, n, group):
            qr = q[:, r0:r0 + group].T  # [g, rows]
            out[r0:r0 + group] += torch.bmm((qr[:, :, None] * u).transpose(1, 2), u.expand(qr.shape[0], -1, -1))
    return out


def conv_real_like(N, C, H, W, n, device, dtype=torch.float32, seed=0):
    """Images with decaying channel scales and costates quadratic in a convolution of them plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) / torch.arange(1, C + 1, dtype=torch.float64).sqrt()[:, None, None]
    q = F.conv2d(x, torch.randn(n, C, 3, 3, generator=g, dtype=torch.float64) / (3 * C**0.5), padding=1) ** 2
    p = (q - q.mean(0)) + 0.1 * torch.randn(N, n, H, W, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), (p / N).to(device=device, dtype=dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max().cpu())


def bench_blocks(device: str, quick: bool, rate: float, repeats: int):
    N, C, H, W, n, k = (8, 16, 8, 8, 16, 3) if quick else (256, 64, 16, 16, 64, 3)
    x, p = conv_real_like(N, C, H, W, n, device)
    m = C * k * k + 1
    flops = 2.0 * N * H * W * n * m * m
    fns = {
        "topoderiv conv_sensitivity_blocks": lambda: ops.conv_sensitivity_blocks(x, p, k),
        "torch unfold + GEMM per channel": lambda: torch_blocks_per_channel(x, p, k),
        "torch unfold + bmm (16 channels)": lambda: torch_blocks_bmm(x, p, k),
    }
    # correctness first, on the first samples, against float64
    xs, ps = x[:4], p[:4]
    exact = torch_blocks_per_channel(xs.double(), ps.double(), k)
    errs = {"topoderiv conv_sensitivity_blocks": rel_err(ops.conv_sensitivity_blocks(xs, ps, k), exact),
            "torch unfold + GEMM per channel": rel_err(torch_blocks_per_channel(xs, ps, k), exact),
            "torch unfold + bmm (16 channels)": rel_err(torch_blocks_bmm(xs, ps, k), exact)}
    t = interleaved(fns, repeats=repeats, warmup=1 if quick else 0, device=device)
    best = min(v for name, v in t.items() if name.startswith("torch"))
    rows = []
    for name, v in t.items():
        rows.append({"impl": name, "s": v, "GFLOP/s (full-matrix flops)": flops / v / 1e9,
                     "fraction of matmul": flops / v / 1e9 / rate, "speed-up vs best torch": best / v,
                     "max rel err vs fp64": errs[name]})
    title = (f"conv_sensitivity_blocks, float32, N={N}, C=n={C}, {H}x{W}, k={k} (m={m}, {N * H * W} rows) - target: "
             f">= {'3' if device == 'cuda' else '1.5'}x the best torch composition")
    return title, rows, ["impl", "s", "GFLOP/s (full-matrix flops)", "fraction of matmul", "speed-up vs best torch",
                         "max rel err vs fp64"]


def bench_topk(device: str, quick: bool, repeats: int):
    N, C, H, W, n, k = (16, 16, 8, 8, 16, 3) if quick else (256, 128, 8, 8, 128, 3)
    x, p = conv_real_like(N, C, H, W, n, device)
    m = C * k * k + 1
    auto = ops.conv_sensitivity_topk(x, p, k)
    dense = ops.conv_sensitivity_topk(x, p, k, route="dense")
    diff = float((auto.values[:, 0].double() - dense.values[:, 0].double()).abs().max() /
                 dense.values[:, 0].double().abs().max())
    fns = {"topoderiv auto": lambda: ops.conv_sensitivity_topk(x, p, k),
           "topoderiv dense": lambda: ops.conv_sensitivity_topk(x, p, k, route="dense")}
    t = interleaved(fns, repeats=repeats, warmup=1 if quick else 0, device=device)
    rows = []
    for name, v in t.items():
        res = auto if name.endswith("auto") else dense
        rows.append({"impl": name, "route": res.route, "s": v, "speed-up vs dense": t["topoderiv dense"] / v,
                     "top eigenvalue rel diff vs dense": diff if res is auto else "",
                     "all converged": bool(res.converged.all())})
    title = (f"conv_sensitivity_topk, float32, N={N}, C=n={C}, {H}x{W}, k={k} (m={m}, blocks "
             f"{n * m * m * 4 / 2**20:.0f} MB) - target: auto >= 5x dense")
    return title, rows, ["impl", "route", "s", "speed-up vs dense", "top eigenvalue rel diff vs dense", "all converged"]


def bench_matvec(device: str, quick: bool, rate: float, repeats: int):
    N, C, H, W, k = (8, 16, 8, 8, 3) if quick else (256, 64, 16, 16, 3)
    m = C * k * k + 1
    rows = []
    for n in ((16, 4) if quick else (64, 4)):
        x, p = conv_real_like(N, C, H, W, n, device)
        v = torch.randn(n, m, generator=torch.Generator().manual_seed(1)).to(device)
        err = rel_err(ops.conv_sensitivity_matvec(x, p, v, k),
                      topoderiv_reference.conv_sensitivity_matvec(x.double(), p.double(), v.double(), k))
        t = interleaved({"topoderiv conv_sensitivity_matvec": lambda: ops.conv_sensitivity_matvec(x, p, v, k),
                         "torch conv2d + conv2d_weight": lambda: topoderiv_reference.conv_sensitivity_matvec(x, p, v, k)},
                        repeats=max(repeats, 5), device=device)
        flops = 4.0 * N * H * W * n * m
        for name, sec in t.items():
            rows.append({"n": n, "impl": name, "ms": sec * 1e3, "GFLOP/s": flops / sec / 1e9,
                         "fraction of matmul": flops / sec / 1e9 / rate,
                         "speed-up vs torch": t["torch conv2d + conv2d_weight"] / sec,
                         "max rel err vs fp64": err if name.startswith("topo") else ""})
    title = f"conv_sensitivity_matvec, float32, N={N}, C={C}, {H}x{W}, k={k} (m={m}) - no target (context)"
    return title, rows, ["n", "impl", "ms", "GFLOP/s", "fraction of matmul", "speed-up vs torch", "max rel err vs fp64"]


def before_statistic(self, block, curvature, *, backend, route, k, tol):
    """The conv site's statistic before the convolution ops: im2col rows in Python chunks, always
    accumulated into dense blocks by sensitivity_blocks (collect=False)."""
    conv, _, feature = conv_site.conv_parts(block, "score")
    n, ks = conv.out_channels, conv.kernel_size[0]
    d = conv.in_channels * ks * ks
    m = d + int(conv.bias is not None)

    def rows(x, p):
        B, _, H, W = x.shape
        max_rows = max(1, conv_site.ROW_CHUNK_ELEMENTS // m)
        per = max(1, max_rows // max(1, H * W))
        for s0 in range(0, B, per):
            with torch.no_grad():
                u = feature(x[s0:s0 + per])
            yield from conv_site.im2col_rows(u, p[s0:s0 + per], ks, max_rows)

    return EigenStatistic(rows, n, d, conv.bias is not None, curvature, backend=backend, route=route, collect=False,
                          k=k, tol=tol)


@contextlib.contextmanager
def site_before():
    real = conv_site.ConvSite.statistic
    conv_site.ConvSite.statistic = before_statistic
    try:
        yield
    finally:
        conv_site.ConvSite.statistic = real


def score_before(model, data, loss):
    with site_before():
        return td.score(model, data, loss)


def bench_cnn(device: str, quick: bool, repeats: int):
    ch, hw, N = (8, 8, 64) if quick else (64, 16, 256)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResidualCNN(3, 10, channels=(ch,), depths=(2,)).to(device)
    x = torch.randn(N, 3, hw, hw, generator=g).to(device)
    y = torch.randint(0, 10, (N,), generator=g).to(device)
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, N, 64)]
    loss = F.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fit(model, opt, data, loss, 1)  # realistic costates: a model trained for a bit
    before, after = score_before(model, data, loss), td.score(model, data, loss)
    mu_diff = max(abs(a.mu - b.mu) / max(abs(b.mu), 1e-30) for a, b in zip(after.points, before.points))
    t = interleaved({"score before": lambda: score_before(model, data, loss),
                     "score after": lambda: td.score(model, data, loss),
                     "epoch": lambda: fit(model, opt, data, loss, 1)},
                    repeats=repeats, warmup=1 if quick else 0, device=device)
    rows = []
    for name, rep in (("score before (Python im2col + sensitivity_blocks, dense)", before),
                      ("score after (conv ops, auto route)", after)):
        key = "score before" if "before" in name else "score after"
        rows.append({"impl": name, "route": rep.points[0].route, "s": t[key], "epochs": t[key] / t["epoch"],
                     "max rel diff of mu vs before": mu_diff if "after" in name else ""})
    rows.append({"impl": "one training epoch", "route": "", "s": t["epoch"], "epochs": 1.0,
                 "max rel diff of mu vs before": ""})
    rows.append({"impl": "speed-up after vs before", "route": "", "s": "", "epochs": t["score before"] / t["score after"],
                 "max rel diff of mu vs before": ""})
    title = (f"scoring a ResidualCNN, {ch} channels at {hw}x{hw}, {N} samples, {len(after.points)} points, in training "
             f"epochs")
    return title, rows, ["impl", "route", "s", "epochs", "max rel diff of mu vs before"]


def bench_points(device: str, quick: bool, repeats: int):
    L, (N, C, H, W, n, k) = 4, ((8, 8, 8, 8, 8, 3) if quick else (64, 32, 16, 16, 32, 3))
    pts = [conv_real_like(N, C, H, W, n, device, seed=s) for s in range(L)]
    xs, ps = [x for x, _ in pts], [p for _, p in pts]
    m = C * k * k + 1
    rows = []
    for need in ("all", "top"):
        multi = ops.conv_sensitivity_topk(xs, ps, k, need=need)
        single = [ops.conv_sensitivity_topk(x, p, k, need=need) for x, p in pts]
        diff = max(float((a.values.double() - b.values.double()).abs().max() / b.values.double().abs().max())
                   for a, b in zip(multi, single))
        t = interleaved({"multi": lambda: ops.conv_sensitivity_topk(xs, ps, k, need=need),
                         "single": lambda: [ops.conv_sensitivity_topk(x, p, k, need=need) for x, p in pts]},
                        repeats=repeats, warmup=1 if quick else 0, device=device)
        early = sum(int(r.early.sum()) for r in multi)
        rows.append({"need": need, "impl": f"{L} single-point calls", "route": single[0].route, "s": t["single"],
                     "speed-up vs single calls": 1.0, "early blocks": early, "max rel diff of values": ""})
        rows.append({"need": need, "impl": f"one {L}-point call", "route": multi[0].route, "s": t["multi"],
                     "speed-up vs single calls": t["single"] / t["multi"], "early blocks": early,
                     "max rel diff of values": diff})
    title = (f"conv_sensitivity_topk on {L} points of one shape, float32, N={N}, C=n={C}, {H}x{W}, k={k} (m={m}), "
             f"route auto: one multi-point call vs {L} single calls - no target (context)")
    return title, rows, ["need", "impl", "route", "s", "speed-up vs single calls", "early blocks",
                         "max rel diff of values"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds per table (default 3, quick 1)")
    ap.add_argument("--only", default="blocks,topk,matvec,cnn,points",
                    help="comma-separated tables: blocks, topk, matvec, cnn, points")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available")
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    bad = only - {"blocks", "topk", "matvec", "cnn", "points"}
    if bad:
        ap.error(f"--only: unknown tables {sorted(bad)} (choose from blocks, topk, matvec, cnn, points)")
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    rate = matmul_rate(args.device)
    print(f"# convolution ops on {machine(args.device)}; torch fp32 matmul {rate:.0f} GFLOP/s in this process\n")
    for name, run in (("blocks", lambda: bench_blocks(args.device, args.quick, rate, repeats)),
                      ("topk", lambda: bench_topk(args.device, args.quick, repeats)),
                      ("matvec", lambda: bench_matvec(args.device, args.quick, rate, repeats)),
                      ("cnn", lambda: bench_cnn(args.device, args.quick, repeats)),
                      ("points", lambda: bench_points(args.device, args.quick, repeats))):
        if name not in only:
            continue
        title, rows, cols = run()
        print(f"## {title}\n")
        print(table(rows, cols))
        print(flush=True)


if __name__ == "__main__":
    main()
