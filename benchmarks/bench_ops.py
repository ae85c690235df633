"""Core-op benchmarks: topoderiv kernels against the best plain-PyTorch way to do the same thing.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick] [--only blocks,rate,...]
                                   [--baseline-so OLD/_C.cpython-*.so]

Prints one markdown table per op: median time, GFLOP/s, fraction of this machine's measured
matmul rate, and the speed-up over the PyTorch baseline, all measured interleaved in one process.
The "rate" tables put the kernels' own flop rate next to the fp32 matmul rate measured
interleaved with them; --baseline-so adds an older build of the extension (a copy of its .so,
loaded as a second module) to those tables, timed in the same rounds (old/new ratios).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from types import ModuleType
from typing import Callable, Dict, List, Optional

import torch

import topoderiv as td
from topoderiv import reference as ref
from topoderiv._lib import lib as extension

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import interleaved, machine, matmul_rate, table  # noqa: E402


def real_like(N: int, d: int, n: int, device: str, dtype=torch.float32, seed: int = 0):
    """States with a decaying spectrum and costates that are quadratic in them plus noise.

    E[p_r x x^T] is then dominated by a rank-one term per block, giving the large spectral gaps
    of real sensitivity matrices (random p gives gapless spectra instead).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    scale = 1.0 / torch.arange(1, d + 1, dtype=torch.float64).sqrt()
    x = torch.randn(N, d, generator=g, dtype=torch.float64) * scale
    G = torch.randn(d, n, generator=g, dtype=torch.float64) / d**0.5
    q = (x @ G) ** 2
    p = (q - q.mean(0)) + 0.1 * torch.randn(N, n, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), (p / N).to(device=device, dtype=dtype)


def torch_blocks_bmm(x: torch.Tensor, p: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Best plain-PyTorch blocks: chunks of units, (p_r * Xt)^T Xt as one bmm per chunk."""
    xt = ref.augment(x, True)
    n, m = p.shape[1], xt.shape[1]
    out = torch.empty(n, m, m, dtype=xt.dtype, device=xt.device)
    for r0 in range(0, n, chunk):
        pr = p[:, r0:r0 + chunk].T  # [c, N]
        out[r0:r0 + chunk] = torch.bmm((pr[:, :, None] * xt).transpose(1, 2), xt.expand(pr.shape[0], -1, -1))
    return out


def torch_blocks_kron(x: torch.Tensor, p: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Plain-PyTorch blocks as one GEMM per sample chunk: P^T (xt (x) xt)."""
    xt = ref.augment(x, True)
    n, m = p.shape[1], xt.shape[1]
    out = torch.zeros(n, m * m, dtype=xt.dtype, device=xt.device)
    for s0 in range(0, xt.shape[0], chunk):
        xc = xt[s0:s0 + chunk]
        out.addmm_(p[s0:s0 + chunk].T, (xc[:, :, None] * xc[:, None, :]).reshape(xc.shape[0], -1))
    return out.view(n, m, m)


def bench_blocks(device: str, quick: bool, rate: float, dtype=torch.float32):
    rows = []
    sizes = [(2048, 128, 128)] if quick else [(8192, 256, 256), (4096, 128, 128), (8192, 64, 256)]
    for N, d, n in sizes:
        x, p = real_like(N, d, n, device, dtype)
        m = d + 1
        flops_full = 2.0 * N * n * m * m
        exact = ref.sensitivity_blocks(x.double(), p.double())
        got = td.sensitivity_blocks(x, p)
        err = float((got.double() - exact).abs().max() / exact.abs().max())
        fns = {
            "topoderiv": lambda: td.sensitivity_blocks(x, p),
            "torch bmm (16 units/chunk)": lambda: torch_blocks_bmm(x, p),
            "torch kron GEMM (512 rows/chunk)": lambda: torch_blocks_kron(x, p),
        }
        t = interleaved(fns, repeats=3 if quick else 5, device=device)
        best_torch = min(v for k, v in t.items() if k != "topoderiv")
        for k, v in t.items():
            rows.append({"N": N, "d": d, "n": n, "impl": k, "ms": v * 1e3,
                         "GFLOP/s (full-matrix flops)": flops_full / v / 1e9,
                         "fraction of matmul": flops_full / v / 1e9 / rate,
                         "speed-up vs best torch": best_torch / v,
                         "max rel err vs fp64": err if k == "topoderiv" else ""})
    return rows


def gapped_matrices(B: int, m: int, device: str, dtype=torch.float32, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(B, m, m, generator=g, dtype=torch.float64))
    ev = torch.randn(B, m, generator=g, dtype=torch.float64)
    ev[:, 0] = 6.0 + torch.rand(B, generator=g, dtype=torch.float64)
    a = (Q * ev[:, None, :]) @ Q.mT
    a = (a + a.mT) / 2
    return a.to(device=device, dtype=dtype), ev.max(dim=1).values


def bench_lanczos(device: str, quick: bool):
    rows = []
    sizes = [(64, 257)] if quick else [(256, 257), (512, 257), (64, 1025)]
    for B, m in sizes:
        a, top = gapped_matrices(B, m, device)
        res = td.lanczos_topk(a, 1)
        rel = float(((res.values[:, 0].double().cpu() - top) / top).abs().max())
        fns = {"topoderiv lanczos_topk": lambda: td.lanczos_topk(a, 1),
               "torch.linalg.eigh": lambda: torch.linalg.eigh(a)}
        t = interleaved(fns, repeats=3, device=device)
        for k, v in t.items():
            rows.append({"B": B, "m": m, "impl": k, "ms": v * 1e3,
                         "speed-up vs eigh": t["torch.linalg.eigh"] / v,
                         "max rel eigenvalue err vs fp64": rel if k.startswith("topo") else "",
                         "all converged": bool(res.converged.all()) if k.startswith("topo") else "",
                         "mean steps": float(res.steps.float().mean()) if k.startswith("topo") else ""})
    return rows


def bench_topk(device: str, quick: bool):
    rows = []
    sizes = [(2048, 128, 128)] if quick else [(8192, 256, 256)]
    for N, d, n in sizes:
        x, p = real_like(N, d, n, device)
        exact = torch.linalg.eigvalsh(ref.sensitivity_blocks(x.double(), p.double()))[:, -1]
        fns = {
            "topoderiv auto": lambda: td.sensitivity_topk(x, p, route="auto"),
            "topoderiv dense": lambda: td.sensitivity_topk(x, p, route="dense"),
            "topoderiv matfree": lambda: td.sensitivity_topk(x, p, route="matfree"),
            "torch einsum + eigh": lambda: ref.eigh_topk(torch_blocks_bmm(x, p), 1),
        }
        t = interleaved(fns, repeats=3, device=device)
        for k, v in t.items():
            err = ""
            if k.startswith("topoderiv"):
                r = fns[k]()
                err = float(((r.values[:, 0].double().cpu() - exact.cpu()).abs() / exact.abs().max().cpu()).max())
            rows.append({"N": N, "d": d, "n": n, "impl": k, "ms": v * 1e3,
                         "speed-up vs einsum+eigh": t["torch einsum + eigh"] / v, "max rel err (top eig)": err,
                         "route": fns[k]().route if k.startswith("topoderiv") else ""})
    return rows


def bench_auto_large(device: str, quick: bool):
    """N=4096, d=n=1024: auto (matrix-free) must not form 4 GB of blocks."""
    N, d, n = (1024, 256, 256) if quick else (4096, 1024, 1024)
    x, p = real_like(N, d, n, device)
    fns = {"topoderiv auto": lambda: td.sensitivity_topk(x, p, route="auto"),
           "topoderiv dense": lambda: td.sensitivity_topk(x, p, route="dense")}
    t = interleaved(fns, repeats=1, warmup=0, device=device)
    ra, rd = fns["topoderiv auto"](), fns["topoderiv dense"]()
    rel = float((ra.best_value - rd.best_value) / abs(rd.best_value))
    return [{"N": N, "d": d, "n": n, "impl": k, "ms": v * 1e3, "speed-up vs dense": t["topoderiv dense"] / v,
             "route": ra.route if "auto" in k else "dense",
             "top eigenvalue rel diff auto vs dense": rel if "auto" in k else ""} for k, v in t.items()]


# ------------------------------------------------------------------------------------------------
# Kernel rate vs the machine's matmul rate (CPU and CUDA), optionally against an older build.


def load_build(path: str) -> ModuleType:
    """An extension .so (e.g. a copy of an older build) as a separate module, called directly."""
    spec = importlib.util.spec_from_file_location("topoderiv_baseline._C", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--baseline-so: cannot load {path!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _buf(t: torch.Tensor):
    """(pointer, span in bytes) of a contiguous tensor, as the bindings take it."""
    assert t.is_contiguous()
    return (t.data_ptr(), t.numel() * t.element_size())


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _raw_blocks(mod: ModuleType, x: torch.Tensor, p: torch.Tensor, out: torch.Tensor) -> None:
    out.zero_()
    mod.sensitivity_blocks(x.device.type, _buf(x), x.stride(0), _buf(p), p.stride(0), _buf(out),
                           1, x.shape[0], x.shape[1], p.shape[1], 0, 0, True, 0, 0, torch.get_num_threads(),
                           _stream(x))


def _raw_matvec(mod: ModuleType, x: torch.Tensor, p: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
    ws = torch.empty(x.shape[0] * p.shape[1] if x.device.type == "cuda" else 0, device=x.device)
    mod.sensitivity_matvec(x.device.type, _buf(x), x.stride(0), _buf(p), p.stride(0), _buf(v),
                           _buf(out), _buf(ws) if ws.numel() else (0, 0), 1, x.shape[0], x.shape[1],
                           p.shape[1], 0, 0, True, 0, 0, torch.get_num_threads(), _stream(x))


def _rounds(fns: Dict[str, Callable[[], object]], repeats: int, device: str) -> Dict[str, List[float]]:
    """Seconds of each callable per round (round-robin, order rotated each round, after one warm-up round)."""
    from _harness import sync
    for f in fns.values():
        f()
    sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeats):
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:  # rotated: no place in the round is favoured
            f = fns[k]
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def _paired(times: Dict[str, List[float]], num: str, den: str) -> float:
    """Median over rounds of times[num] / times[den] (robust to load that drifts between rounds)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _matmul_fns(device: str, size: int = 2048):
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    fns = {"torch.matmul": lambda: a @ b}
    if device == "cpu":
        an, bn = a.numpy(), b.numpy()
        fns["numpy.matmul"] = lambda: an @ bn
    return fns, 2.0 * size**3


def bench_blocks_rate(device: str, quick: bool, baseline: Optional[ModuleType], repeats: int = 5):
    """sensitivity_blocks: the flops it does per second over the machine's fp32 matmul rate."""
    rows = []
    sizes = [(1024, 128, 128)] if quick else [(8192, 128, 128), (8192, 256, 256), (4096, 512, 512)]
    mm_fns, mm_flops = _matmul_fns(device)
    for N, d, n in sizes:
        x, p = real_like(N, d, n, device)
        m = d + 1
        flops = float(N) * n * m * (m + 1)
        outs = {"new": torch.zeros(n, m, m, device=device)}
        fns: Dict[str, Callable[[], object]] = {"topoderiv": lambda: _raw_blocks(extension(), x, p, outs["new"])}
        if baseline is not None:
            outs["old"] = torch.zeros(n, m, m, device=device)
            fns["baseline build"] = lambda: _raw_blocks(baseline, x, p, outs["old"])
        fns.update(mm_fns)
        t = _rounds(fns, 2 if quick else repeats, device)
        med = {k: statistics.median(v) for k, v in t.items()}
        mm_rate = max(mm_flops / med[k] for k in mm_fns)
        row = {"N": N, "d": d, "n": n, "ms": med["topoderiv"] * 1e3,
               "kernel GFLOP/s": flops / med["topoderiv"] / 1e9,
               "torch.matmul GFLOP/s": mm_flops / med["torch.matmul"] / 1e9,
               "numpy.matmul GFLOP/s": mm_flops / med["numpy.matmul"] / 1e9 if "numpy.matmul" in med else "",
               "fraction of matmul rate": flops / med["topoderiv"] / mm_rate}
        if baseline is not None:
            row["baseline fraction"] = flops / med["baseline build"] / mm_rate
            row["new vs baseline (paired)"] = _paired(t, "baseline build", "topoderiv")
            row["same result"] = bool(torch.equal(outs["new"], outs["old"]))
        rows.append(row)
    return rows


def torch_matvec_2gemm(xt: torch.Tensor, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The plain-torch matrix-free operator: Y = Xt V^T, then (P .* Y)^T Xt (two GEMMs)."""
    return (p * (xt @ v.T)).T @ xt


def bench_matvec_rate(device: str, quick: bool, baseline: Optional[ModuleType], repeats: int = 7):
    """sensitivity_matvec against two torch GEMMs, at the shapes the Lanczos applies it to."""
    rows = []
    sizes = ([(1024, 64, 64), (1024, 64, 8)] if quick else
             [(4096, 256, 256), (12608, 256, 256), (4096, 384, 384), (12608, 384, 384),
              (4096, 256, 8), (12608, 256, 8), (4096, 384, 8), (12608, 384, 8)])
    mm_fns, mm_flops = _matmul_fns(device)
    for N, d, n in sizes:
        x, p = real_like(N, d, n, device)
        m = d + 1
        g = torch.Generator(device="cpu").manual_seed(1)
        v = torch.randn(n, m, generator=g).to(device)
        xt = ref.augment(x, True)  # formed once, outside the timing (a Lanczos would reuse it)
        flops = 4.0 * N * n * m
        outs = {"new": torch.zeros(n, m, device=device)}
        fns: Dict[str, Callable[[], object]] = {
            "topoderiv": lambda: _raw_matvec(extension(), x, p, v, outs["new"]),
            "torch 2 GEMMs": lambda: torch_matvec_2gemm(xt, p, v)}
        if baseline is not None:
            outs["old"] = torch.zeros(n, m, device=device)
            fns["baseline build"] = lambda: _raw_matvec(baseline, x, p, v, outs["old"])
        fns.update(mm_fns)
        t = _rounds(fns, 2 if quick else repeats, device)
        med = {k: statistics.median(v) for k, v in t.items()}
        mm_rate = max(mm_flops / med[k] for k in mm_fns)
        exact = ref.sensitivity_matvec(x.double(), p.double(), v.double())
        err = float((outs["new"].double() - exact).abs().max() / exact.abs().max())
        row = {"N": N, "d": d, "n": n, "ms": med["topoderiv"] * 1e3, "torch 2 GEMMs ms": med["torch 2 GEMMs"] * 1e3,
               "kernel GFLOP/s": flops / med["topoderiv"] / 1e9,
               "kernel / torch 2 GEMMs (paired)": _paired(t, "torch 2 GEMMs", "topoderiv"),
               "fraction of matmul rate": flops / med["topoderiv"] / mm_rate,
               "max rel err vs fp64": err}
        if baseline is not None:
            row["new vs baseline (paired)"] = _paired(t, "baseline build", "topoderiv")
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--only", default="", help="comma list of: blocks,rate,lanczos,topk,large")
    ap.add_argument("--baseline-so", default="", help="an older build's _C .so to time against (rate tables)")
    ap.add_argument("--repeats", type=int, default=0, help="rounds for the rate tables (default 5 / 7)")
    args = ap.parse_args(argv)
    baseline = load_build(args.baseline_so) if args.baseline_so else None
    only = set(filter(None, args.only.split(",")))
    rate = matmul_rate(args.device)
    print(f"# topoderiv op benchmarks on {machine(args.device)}; torch fp32 matmul {rate:.0f} GFLOP/s\n")
    if not only or "blocks" in only:
        print("## sensitivity_blocks (fp32)\n")
        print(table(bench_blocks(args.device, args.quick, rate), ["N", "d", "n", "impl", "ms", "GFLOP/s (full-matrix flops)",
                                                              "fraction of matmul", "speed-up vs best torch", "max rel err vs fp64"]))
        print()
    if not only or "rate" in only:
        extra = ["baseline fraction", "new vs baseline (paired)", "same result"] if baseline is not None else []
        print("## sensitivity_blocks (fp32): fraction of the machine's matmul rate\n")
        print("Kernel flops = N n m (m + 1): one multiply-add (2 flops) per sample, block and upper-triangle "
              "entry (i <= j), m = d + 1; the pair products xt_i xt_j (shared by all blocks) and the mirroring "
              "of the lower triangle are not counted. The matmul rate is the best of torch.matmul and "
              "numpy.matmul (2048 x 2048, fp32) timed in the same rounds; ms and rates are medians.\n")
        kw = {"repeats": args.repeats} if args.repeats else {}
        print(table(bench_blocks_rate(args.device, args.quick, baseline, **kw),
                    ["N", "d", "n", "ms", "kernel GFLOP/s", "torch.matmul GFLOP/s", "numpy.matmul GFLOP/s",
                     "fraction of matmul rate", *extra]))
        print()
        print("## sensitivity_matvec (fp32) against two torch GEMMs\n")
        print("Flops = 4 N n m for both (Y = Xt V^T, then (P .* Y)^T Xt; Xt formed once outside the timing). "
              "kernel / torch = median over rounds of t_torch / t_kernel.\n")
        extra = ["new vs baseline (paired)"] if baseline is not None else []
        print(table(bench_matvec_rate(args.device, args.quick, baseline, **kw),
                    ["N", "d", "n", "ms", "torch 2 GEMMs ms", "kernel GFLOP/s", "kernel / torch 2 GEMMs (paired)",
                     "fraction of matmul rate", "max rel err vs fp64", *extra]))
        print()
    if not only or "lanczos" in only:
        print("## lanczos_topk top-1, gapped spectra (fp32)\n")
        print(table(bench_lanczos(args.device, args.quick), ["B", "m", "impl", "ms", "speed-up vs eigh",
                                                         "max rel eigenvalue err vs fp64", "all converged", "mean steps"]))
        print()
    if not only or "topk" in only:
        print("## sensitivity_topk end to end, real-like data (fp32)\n")
        print(table(bench_topk(args.device, args.quick), ["N", "d", "n", "impl", "route", "ms", "speed-up vs einsum+eigh",
                                                      "max rel err (top eig)"]))
        print()
    if not only or "large" in only:
        print("## auto route at a size where the blocks do not fit (fp32)\n")
        print(table(bench_auto_large(args.device, args.quick), ["N", "d", "n", "impl", "route", "ms", "speed-up vs dense",
                                                            "top eigenvalue rel diff auto vs dense"]))


if __name__ == "__main__":
    main()
