"""Sensitivity eigenpairs on real transformer states: transformer shapes and multi-point tables.

    python benchmarks/bench_transformer.py [--tables shapes multipoint] [--repeats 3] [--small]

States and costates come from an actual pre-norm transformer (topoderiv.models.ViT, timm's Block)
forward + backward (cross-entropy) on synthetic images (smooth random fields with a class
pattern), never Gaussian noise: x = the token stream entering a block ``[samples, tokens, D]``,
p = ``-B dJ/dx`` there (the statistic of a ``tokens`` site).

Table "shapes": the top eigenpair of EVERY block of ``B_r = sum p_r xt xt^T`` (``n = D`` blocks of
``m = D + 1``) at ``[64, 197, 384]`` (ViT-S/16 on 224 px, one block) and ``[32, 197, 768]``
(ViT-B/16), timed interleaved:

- plain torch: matrix-free Lanczos, two torch GEMMs per step (``Xt V^T``, ``(P * Y)^T Xt``),
  full re-orthogonalisation (CGS2), 24 steps, ``eigh`` of T (the issue's baseline),
- topoderiv: ``ops.sensitivity_topk`` (auto route, matrix-free), cold start at tol 1e-4 and warm
  started (``statistic.subspace_start``) at tol 1e-3 as the scorer does,
- topoderiv need="top": only the block holding the largest eigenvalue to tolerance (others stop
  early; rule "top" of the scorer); its error is the winner's only (the others are bounds).

Error: worst block ``|lambda - lambda_ref| / max_r |lambda_ref|`` against float64 blocks
(topoderiv.reference, computed in chunks) + ``torch.linalg.eigvalsh``.

Table "multipoint": 12 points of ``[64 x 64 tokens, 192]`` (a 12-block ViT-Ti-like model on
32 px images, patch 4): twelve single-point ``sensitivity_topk`` calls vs one multi-point call.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from topoderiv import ops, reference
from topoderiv.method import statistic
from topoderiv.models import ViT

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import interleaved, machine, matmul_rate, table  # noqa: E402


def images(n: int, size: int, classes: int, seed: int = 0):
    """Smooth synthetic images: low-frequency random fields plus a class-dependent stripe pattern."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, max(2, size // 16), max(2, size // 16), generator=g)
    img = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.randint(0, classes, (n,), generator=g)
    grid = torch.linspace(0, 1, size)
    stripes = torch.sin(2 * math.pi * (y[:, None].float() + 1) * grid[None, :])  # [n, size]
    img = img + 0.5 * stripes[:, None, None, :]
    return img, y


def transformer_states(samples: int, img: int, patch: int, dim: int, depth: int, heads: int, seed: int = 0):
    """Block inputs and their costates ``-B dJ/dx`` of every block of a ViT (one forward + backward)."""
    torch.manual_seed(seed)
    model = ViT(img, patch, 3, 10, dim, depth, heads)
    x, y = images(samples, img, 10, seed)
    keep = []

    def pre(mod, args):
        t = args[0]
        t.retain_grad()
        keep.append(t)

    hooks = [blk.register_forward_pre_hook(pre) for blk in model.blocks]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for h in hooks:
        h.remove()
    return [(t.detach(), (-samples * t.grad).detach()) for t in keep]


def torch_lanczos(x: torch.Tensor, p: torch.Tensor, steps: int = 24):
    """The baseline: plain-torch matrix-free Lanczos on every block, full re-orthogonalisation."""
    X = torch.cat([x, x.new_ones(x.shape[0], 1)], 1)  # [N, m]
    n, m = p.shape[1], X.shape[1]
    V = torch.zeros(steps + 1, n, m)
    v = torch.randn(n, m, generator=torch.Generator().manual_seed(0))
    V[0] = v / v.norm(dim=1, keepdim=True)
    alpha = torch.zeros(n, steps)
    beta = torch.zeros(n, steps)
    for j in range(steps):
        Y = X @ V[j].T  # [N, n]
        W = (p * Y).T @ X  # [n, m]: row r = B_r v_r
        alpha[:, j] = (W * V[j]).sum(1)
        for _ in range(2):
            c = torch.einsum("jnm,nm->nj", V[:j + 1], W)
            W = W - torch.einsum("nj,jnm->nm", c, V[:j + 1])
        beta[:, j] = W.norm(dim=1)
        V[j + 1] = W / beta[:, j:j + 1].clamp_min(1e-30)
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
    w, s = torch.linalg.eigh(T)
    vec = torch.einsum("jnm,nj->nm", V[:steps], s[:, :, -1])
    return w[:, -1], vec


def reference_top(x: torch.Tensor, p: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """lambda_max of every block in float64: reference blocks in chunks + eigvalsh."""
    xd = x.double()
    out = []
    for r0 in range(0, p.shape[1], chunk):
        b = reference.sensitivity_blocks(xd, p[:, r0:r0 + chunk].double())
        out.append(torch.linalg.eigvalsh(b)[:, -1])
    return torch.cat(out)


def shapes_table(repeats: int, small: bool, widths=(384, 768)):
    # (samples, image px, patch, D, heads); D = 192 is a smaller stand-in (ViT-Ti on 64 px, patch 8)
    cases = [c for c in [(64, 64, 8, 192, 3), (64, 224, 16, 384, 6), (32, 224, 16, 768, 12)] if c[3] in widths]
    if small:
        cases = [(8, 32, 8, 32, 2)]
    rows = []
    for samples, img, patch, dim, heads in cases:
        t0 = time.perf_counter()
        (x, p), = transformer_states(samples, img, patch, dim, 1, heads)
        T = x.shape[1]
        x2, p2 = x.reshape(-1, dim).contiguous(), p.reshape(-1, dim).contiguous()
        ref = reference_top(x2, p2)
        scale = float(ref.abs().max())
        print(f"[{samples}, {T}, {dim}]: states + float64 reference in {time.perf_counter() - t0:.0f} s", flush=True)
        v0 = statistic.subspace_start(x2, p2, True)
        out = {}
        fns = {
            "plain torch (24 steps)": lambda: out.__setitem__("plain torch (24 steps)", torch_lanczos(x2, p2)[0]),
            "topoderiv cold, tol 1e-4": lambda: out.__setitem__(
                "topoderiv cold, tol 1e-4", ops.sensitivity_topk(x2, p2, tol=1e-4)),
            "topoderiv cold, tol 1e-5": lambda: out.__setitem__(
                "topoderiv cold, tol 1e-5", ops.sensitivity_topk(x2, p2, tol=1e-5)),
            "topoderiv warm, tol 1e-3": lambda: out.__setitem__(
                "topoderiv warm, tol 1e-3",
                ops.sensitivity_topk(x2, p2, tol=1e-3, v0=statistic.subspace_start(x2, p2, True))),
            "topoderiv need=top, warm": lambda: out.__setitem__(
                "topoderiv need=top, warm",
                ops.sensitivity_topk(x2, p2, tol=1e-3, v0=statistic.subspace_start(x2, p2, True), need="top")),
        }
        del v0
        times = interleaved(fns, repeats=repeats, warmup=1)
        base = times["plain torch (24 steps)"]
        r_star = int(ref.argmax())
        for name, t in times.items():
            res = out[name]
            vals = res if isinstance(res, torch.Tensor) else res.values[:, 0]
            err = (vals.double() - ref).abs() / scale
            early = 0 if isinstance(res, torch.Tensor) else int(res.early.sum())
            steps = "24" if isinstance(res, torch.Tensor) else f"{float(res.steps.float().mean()):.1f}/{int(res.steps.max())}"
            worst = float(err[r_star]) if name.endswith("need=top, warm") else float(err.max())
            rows.append({"shape": f"[{samples},{T},{dim}]", "solver": name, "seconds": t, "speed-up": base / t,
                         "worst-block rel. error": worst,
                         "steps mean/max": steps, "blocks stopped early": early})
        print(table(rows[-len(times):], list(rows[-1].keys())), flush=True)
    return rows


def multipoint_table(repeats: int, small: bool):
    samples, img, patch, dim, depth, heads = (64, 32, 4, 192, 12, 3) if not small else (8, 16, 4, 32, 4, 2)
    states = transformer_states(samples, img, patch, dim, depth, heads)
    xs = [x for x, _ in states]
    ps = [p for _, p in states]
    many = f"{len(xs)} single-point calls"
    fns = {
        many: lambda: [ops.sensitivity_topk(x, p, tol=1e-4) for x, p in zip(xs, ps)],
        "one multi-point call": lambda: ops.sensitivity_topk(xs, ps, tol=1e-4),
    }
    times = interleaved(fns, repeats=repeats, warmup=1)
    single = [ops.sensitivity_topk(x, p, tol=1e-4) for x, p in zip(xs, ps)]
    multi = ops.sensitivity_topk(xs, ps, tol=1e-4)
    diff = max(float((a.values - b.values).abs().max() / b.values.abs().max()) for a, b in zip(multi, single))
    base = times[many]
    rows = [{"points": f"{len(xs)} x [{samples}x{xs[0].shape[1]} tokens, {dim}]", "solver": k, "seconds": t,
             "speed-up": base / t, "max rel. value diff": diff, "route": multi[0].route} for k, t in times.items()]
    print(table(rows, list(rows[0].keys())), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tables", nargs="+", default=["multipoint", "shapes"], choices=["shapes", "multipoint"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a smoke run)")
    ap.add_argument("--widths", type=int, nargs="+", default=[384, 768],
                    help="shapes table: D of the cases run (384: [64,197,384], 768: [32,197,768], 192: [64,65,192])")
    args = ap.parse_args()
    print(f"machine: {machine()}; torch matmul {matmul_rate():.0f} GFLOP/s")
    if "multipoint" in args.tables:
        multipoint_table(args.repeats, args.small)
    if "shapes" in args.tables:
        shapes_table(args.repeats, args.small, tuple(args.widths))


if __name__ == "__main__":
    main()
