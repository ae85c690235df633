"""Core-op benchmarks: topoderiv kernels against the best plain-PyTorch way to do the same thing.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--quick]

Prints one markdown table per op: median time, GFLOP/s, fraction of this machine's measured
matmul rate, and the speed-up over the PyTorch baseline, all measured interleaved in one process.
"""
from __future__ import annotations

import argparse
import sys

import torch

import topoderiv as td
from topoderiv import reference as ref

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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--only", default="", help="comma list of: blocks,lanczos,topk,large")
    args = ap.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    rate = matmul_rate(args.device)
    print(f"# topoderiv op benchmarks on {machine(args.device)}; torch fp32 matmul {rate:.0f} GFLOP/s\n")
    if not only or "blocks" in only:
        print("## sensitivity_blocks (fp32)\n")
        print(table(bench_blocks(args.device, args.quick, rate), ["N", "d", "n", "impl", "ms", "GFLOP/s (full-matrix flops)",
                                                              "fraction of matmul", "speed-up vs best torch", "max rel err vs fp64"]))
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
