"""Cost of one scoring step for each site kind, in training epochs over the same samples.

    python benchmarks/bench_sites.py [--kinds linear tokens conv mlp_block attention_block transformer_block]
                                     [--quick] [--device cpu|cuda]

Realistic sizes (the sites issue): ``linear``: ResidualMLP width 256, 4096 samples, 3 points;
``tokens`` and the transformer sub-block kinds: a ViT with width 384, 6 heads, 64 patch tokens
(+ cls), 4 blocks (5 points), 256 samples; ``conv``: ResidualCNN with 64 channels at 16x16, one
stage of 2 blocks (3 points), 256 samples. One epoch = one pass of Adam (AdamW for the ViT) over
the same samples in batches of 64; the scoring step and the epoch are timed interleaved in one
process, and the ratio is what is reported (this CPU's speed swings, the ratio does not).
``--quick`` shrinks every size (a smoke run).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

import topoderiv as td
from topoderiv.growth.training import fit
from topoderiv.models import ResidualCNN, ResidualMLP, ViT

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _harness import interleaved, machine, table  # noqa: E402

KINDS = ("linear", "tokens", "conv", "mlp_block", "attention_block", "transformer_block")


def _batches(x, y, bs):
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, x.shape[0], bs)]


def problem(kind: str, quick: bool, device: str):
    """``(model, batches, loss_fn, optimizer factory, description)`` for one kind."""
    g = torch.Generator().manual_seed(0)
    if kind == "linear":
        width, n = (32, 512) if quick else (256, 4096)
        model = ResidualMLP(16, width, 1, 2)
        x = torch.rand(n, 16, generator=g) * 2 - 1
        y = (torch.sin(3 * x[:, :4]).sum(1) * torch.cos(2 * x[:, 4:8]).sum(1))[:, None] / 4
        desc = f"MLP width {width}, {n} samples"
        opt = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731
        loss = F.mse_loss
    elif kind == "conv":
        ch, hw, n = (8, 8, 64) if quick else (64, 16, 256)
        model = ResidualCNN(3, 10, channels=(ch,), depths=(2,))
        x = torch.randn(n, 3, hw, hw, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        desc = f"CNN {ch} channels at {hw}x{hw}, {n} samples"
        opt = lambda p: torch.optim.Adam(p, lr=1e-3)  # noqa: E731
        loss = F.cross_entropy
    else:
        dim, heads, img, n = (32, 2, 16, 32) if quick else (384, 6, 32, 256)
        model = ViT(img_size=img, patch_size=4, in_chans=3, num_classes=10, embed_dim=dim, depth=4, num_heads=heads,
                    insert=kind)
        x = torch.randn(n, 3, img, img, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        desc = f"ViT width {dim}, {heads} heads, {(img // 4) ** 2} tokens + cls, {n} samples"
        opt = lambda p: torch.optim.AdamW(p, lr=1e-3)  # noqa: E731
        loss = F.cross_entropy
    model = model.to(device)
    data = _batches(x.to(device), y.to(device), 64)
    return model, data, loss, opt, desc


def run(kind: str, quick: bool, device: str, repeats: int):
    torch.manual_seed(0)
    model, data, loss, make_opt, desc = problem(kind, quick, device)
    opt = make_opt(model.parameters())
    fit(model, opt, data, loss, 1)  # realistic costates: a trained-for-a-bit model
    rep = td.score(model, data, loss)
    times = interleaved({
        "score": lambda: td.score(model, data, loss),
        "epoch": lambda: fit(model, opt, data, loss, 1),
    }, repeats=repeats, device=device)
    return {"kind": kind, "setting": desc, "points": len(rep.points), "route": rep.points[0].route,
            "score s": times["score"], "epoch s": times["epoch"], "epochs": times["score"] / times["epoch"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available")
    rows = [run(k, args.quick, args.device, args.repeats) for k in args.kinds]
    print(f"# scoring cost per site kind on {machine(args.device)}\n")
    print(table(rows, ["kind", "setting", "points", "route", "score s", "epoch s", "epochs"]))


if __name__ == "__main__":
    main()
