"""GPU targets of issue 9: the bf16 dense blocks on tensor cores, and lanczos_topk against eigh.

    python benchmarks/bench_gpu.py [--device cuda] [--quick] [--repeats R] [--only blocks,lanczos]

Needs a CUDA GPU and a topoderiv build with CUDA kernels; without them it prints why and exits 2.

1. ``sensitivity_blocks`` on bfloat16 inputs at N=65536, d=n=512 (m = 513) with each kernel forced
   (TOPODERIV_DENSE_KERNEL = simt, mma, pairs; see topoderiv.ops.dense_kernel) and the one the
   dispatch rule picks. Flops counted: the upper triangle with diagonal, 2 N n m (m + 1) / 2 (what a
   kernel must do). Rate against the same machine's torch bf16 matmul measured on a square matmul of
   about the same flops (16384^3). Target: the best kernel >= 50% of that rate. Each kernel's result
   on 4 blocks is checked against a float64 reference computed on the GPU (max error relative to the
   largest reference entry; bf16 tensor-core kernels: ~2^-9 expected).
2. ``lanczos_topk`` (k = 1, float32) against ``torch.linalg.eigh`` (float32) on 512 matrices of
   257 x 257 (random symmetric with a planted top eigenvalue). Target: >= 50x. The top eigenvalues are
   compared against eigh's.

Timings: CUDA events around each call after a warm-up, median of ``--repeats``, candidates
interleaved. ``--quick`` shrinks the sizes (a smoke run, no target).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import machine, table  # noqa: E402


def fail(msg: str) -> None:
    print(f"bench_gpu.py: {msg}", file=sys.stderr)
    sys.exit(2)


def cuda_ready() -> None:
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU (torch.cuda.is_available() is False; torch "
             f"{torch.__version__}, built with CUDA {torch.version.cuda}); nothing was measured")
    from topoderiv import ops
    if not ops.has_cuda_kernels():
        fail("this topoderiv build has no CUDA kernels; rebuild with nvcc on PATH: "
             "TOPODERIV_CUDA=ON pip install --no-build-isolation --no-deps .")


def timed(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median seconds per callable, CUDA events, round-robin after one warm-up round."""
    for f in fns.values():
        f()
    torch.cuda.synchronize()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


class forced_kernel:
    """TOPODERIV_DENSE_KERNEL=<kernel> for the duration (None: the dispatch rule)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __enter__(self):
        self.old = os.environ.get("TOPODERIV_DENSE_KERNEL")
        if self.kernel is None:
            os.environ.pop("TOPODERIV_DENSE_KERNEL", None)
        else:
            os.environ["TOPODERIV_DENSE_KERNEL"] = self.kernel

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("TOPODERIV_DENSE_KERNEL", None)
        else:
            os.environ["TOPODERIV_DENSE_KERNEL"] = self.old


def bench_blocks(quick: bool, repeats: int) -> List[str]:
    import topoderiv as td
    from topoderiv import ops
    N, d, n = (8192, 256, 256) if quick else (65536, 512, 512)
    m = d + 1
    flops = N * n * m * (m + 1)  # 2 flops per multiply-add, upper triangle with diagonal
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, d, device="cuda", generator=g).to(torch.bfloat16)
    p = (torch.randn(N, n, device="cuda", generator=g) / N ** 0.5).to(torch.bfloat16)

    side = 4096 if quick else 16384
    a = torch.randn(side, side, device="cuda", generator=g).to(torch.bfloat16)
    b = torch.randn(side, side, device="cuda", generator=g).to(torch.bfloat16)
    t_mm = timed({"mm": lambda: a @ b}, repeats)["mm"]
    mm_rate = 2 * side ** 3 / t_mm
    del a, b

    # float64 reference of 4 blocks on the GPU
    R = 4
    xt = torch.cat([x.double(), torch.ones(N, 1, device="cuda", dtype=torch.float64)], 1)
    exact = torch.einsum("sr,si,sj->rij", p[:, :R].double(), xt, xt)
    del xt

    auto = ops.dense_kernel(torch.bfloat16, "cuda", N, d, n)
    kernels = ["simt", "mma", "pairs"]
    fns = {}
    for k in kernels:
        def run(k=k):
            with forced_kernel(k):
                return td.sensitivity_blocks(x, p)
        fns[k] = run
    errors = {}
    for k, f in fns.items():
        out = f()
        errors[k] = float((out[:R].double() - exact).abs().max() / exact.abs().max())
        del out
    torch.cuda.empty_cache()
    t = timed(fns, repeats)
    rows = []
    for k in kernels:
        rate = flops / t[k]
        rows.append({"kernel": k + (" (auto)" if k == auto else ""), "time ms": t[k] * 1e3,
                     "TFLOP/s": rate / 1e12, "fraction of bf16 matmul": rate / mm_rate,
                     "max rel err (4 blocks)": errors[k]})
    best = max(kernels, key=lambda k: flops / t[k])
    gemm = ("torch.mm(bf16, bf16, out_dtype=float32)" if ops._MM_OUT_DTYPE[0]
            else "float32 torch.mm fallback (this torch has no mm(out_dtype=...))")
    lines = [
        f"### bf16 sensitivity_blocks, N={N}, d=n={d} (m={m}): {flops / 1e12:.2f} TFLOP (upper triangle)",
        "",
        f"torch bf16 matmul {side}^3: {t_mm * 1e3:.2f} ms = {mm_rate / 1e12:.1f} TFLOP/s",
        "",
        table(rows, ["kernel", "time ms", "TFLOP/s", "fraction of bf16 matmul", "max rel err (4 blocks)"]),
        "",
        f"best: {best} at {flops / t[best] / mm_rate:.1%} of the matmul rate (target >= 50%: "
        f"{'MET' if flops / t[best] >= 0.5 * mm_rate else 'NOT met'}); the dispatch rule picks {auto} "
        f"({flops / t[auto] / mm_rate:.1%}). The pairs kernel's GEMM ran as {gemm}.",
    ]
    return lines


def bench_lanczos(quick: bool, repeats: int) -> List[str]:
    import topoderiv as td
    B, m = (64, 257) if quick else (512, 257)
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(B, m, m, device="cuda", generator=g) / m ** 0.5
    a = (a + a.mT) / 2
    v = torch.randn(B, m, 1, device="cuda", generator=g)
    v = v / v.norm(dim=1, keepdim=True)
    a = a + 4.0 * v @ v.mT  # a planted top eigenvalue (gap like real sensitivity blocks)
    t = timed({"lanczos_topk": lambda: td.lanczos_topk(a, 1), "eigh": lambda: torch.linalg.eigh(a)}, repeats)
    res = td.lanczos_topk(a, 1)
    w = torch.linalg.eigvalsh(a.double())[:, -1]
    err = float(((res.values[:, 0].double() - w).abs() / w.abs()).max())
    speedup = t["eigh"] / t["lanczos_topk"]
    rows = [{"op": "lanczos_topk k=1", "time ms": t["lanczos_topk"] * 1e3},
            {"op": "torch.linalg.eigh", "time ms": t["eigh"] * 1e3}]
    return [
        f"### lanczos_topk vs torch.linalg.eigh, {B} x {m}x{m} float32",
        "",
        table(rows, ["op", "time ms"]),
        "",
        f"speed-up {speedup:.1f}x (target >= 50x: {'MET' if speedup >= 50 else 'NOT met'}); converged "
        f"{int(res.converged.sum())}/{B}; max rel error of the top eigenvalue vs float64 eigh {err:.2e}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda"], help="the device (CUDA only)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run, no target)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", default="blocks,lanczos", help="comma list of: blocks, lanczos")
    args = ap.parse_args()
    cuda_ready()
    print(f"machine: {machine('cuda')}, capability {torch.cuda.get_device_capability()}")
    print(f"command: python benchmarks/bench_gpu.py {' '.join(sys.argv[1:])}".rstrip())
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    for part in parts:
        if part not in ("blocks", "lanczos"):
            fail(f"--only must list blocks and/or lanczos, got {part!r}")
    if "blocks" in parts:
        print("\n".join(bench_blocks(args.quick, args.repeats)), flush=True)
        print()
    if "lanczos" in parts:
        print("\n".join(bench_lanczos(args.quick, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
