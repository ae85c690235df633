"""Plain-PyTorch twins of every topoderiv op.

These are the tests' oracle (run them in float64) and the ``backend="torch"`` implementation.
They are written for clarity, not speed, but they never materialise an ``N x n x m``
intermediate larger than a fixed chunk, so they also run on real sizes.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "augment",
    "sensitivity_blocks",
    "sensitivity_matvec",
    "lanczos_topk",
    "eigh_topk",
    "sensitivity_topk",
    "conv_rows",
    "conv_sensitivity_blocks",
    "conv_sensitivity_matvec",
    "conv_sensitivity_topk",
]


def augment(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """Flattens leading dims and appends the bias feature: ``[..., d] -> [S, m]``."""
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    if bias:
        x2 = torch.cat([x2, torch.ones(x2.shape[0], 1, dtype=x2.dtype, device=x2.device)], dim=1)
    return x2


def sensitivity_blocks(
    x: torch.Tensor, p: torch.Tensor, *, bias: bool = True, chunk: int = 8
) -> torch.Tensor:
    """``B[r] = sum_s p[s, r] * xt[s] xt[s]^T`` as ``[n, m, m]``, computed in ``x``'s dtype.

    Args:
        x: activations ``[..., d]``.
        p: costates ``[..., n]``, same leading dims as ``x``.
        bias: append a feature of ones (``m = d + 1``).
        chunk: number of units ``r`` per einsum (bounds the intermediate to ``chunk x S x m``).
    """
    xt = augment(x, bias)
    p2 = p.reshape(xt.shape[0], p.shape[-1]).to(xt.dtype)
    n, m = p2.shape[1], xt.shape[1]
    out = torch.zeros(n, m, m, dtype=xt.dtype, device=xt.device)
    for r0 in range(0, n, chunk):
        pr = p2[:, r0 : r0 + chunk]
        out[r0 : r0 + chunk] = torch.einsum("sr,si,sj->rij", pr, xt, xt)
    return out


def sensitivity_matvec(
    x: torch.Tensor, p: torch.Tensor, v: torch.Tensor, *, bias: bool = True
) -> torch.Tensor:
    """Row ``r`` of the result is ``B[r] @ v[r]``, computed as ``((P * (Xt V^T))^T Xt``."""
    xt = augment(x, bias).to(v.dtype)
    p2 = p.reshape(xt.shape[0], p.shape[-1]).to(v.dtype)
    return (p2 * (xt @ v.T)).T @ xt


def eigh_topk(a: torch.Tensor, k: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs (algebraically largest, descending) of ``a [B, m, m]`` by full eigh."""
    w, v = torch.linalg.eigh(a)
    return w.flip(-1)[..., :k], v.flip(-1)[..., :k]


def lanczos_topk(
    a: torch.Tensor, k: int = 1, *, steps: Optional[int] = None, seed: int = 0
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched Lanczos with full re-orthogonalisation, in plain PyTorch (no early stop).

    Runs ``steps`` (default ``min(m, 64)``) steps for every matrix and returns the top-``k``
    Ritz pairs ``(values [B, k], vectors [B, m, k])``. Used as an independent check of the
    kernels' algorithm, not as a fast path.
    """
    B, m, _ = a.shape
    steps = min(m, 64) if steps is None else steps
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.rand(B, m, generator=gen, dtype=torch.float64).to(a) * 2 - 1
    v = v / v.norm(dim=1, keepdim=True)
    basis = [v]
    alphas, betas = [], []
    for j in range(steps):
        w = torch.einsum("bij,bj->bi", a, basis[-1])
        alphas.append((w * basis[-1]).sum(1))
        V = torch.stack(basis, dim=2)  # [B, m, j+1]
        for _ in range(2):
            w = w - torch.einsum("bmj,bj->bm", V, torch.einsum("bmj,bm->bj", V, w))
        beta = w.norm(dim=1)
        if j == steps - 1:
            break
        betas.append(beta)
        basis.append(w / beta.clamp_min(torch.finfo(a.dtype).tiny)[:, None])
    T = torch.diag_embed(torch.stack(alphas, 1))
    if betas:
        off = torch.stack(betas, 1)
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    theta, s = torch.linalg.eigh(T)
    theta, s = theta.flip(-1)[:, :k], s.flip(-1)[..., :k]
    V = torch.stack(basis, dim=2)
    vec = V @ s
    return theta, vec / vec.norm(dim=1, keepdim=True)


def sensitivity_topk(
    x: torch.Tensor, p: torch.Tensor, *, k: int = 1, bias: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of every block ``B[r]``: ``(values [n, k], vectors [n, m, k])``.

    Dense einsum blocks followed by ``torch.linalg.eigh`` (the plain-PyTorch baseline).
    """
    return eigh_topk(sensitivity_blocks(x, p, bias=bias), k)


# ------------------------------------------------------------------------------------------------
# convolutions: x [N, C, H, W], p [N, n, H, W], odd k, same zero padding k // 2, stride 1


def conv_rows(x: torch.Tensor, p: torch.Tensor, kernel_size: int,
              max_rows: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The im2col rows of ``(x, p)`` in chunks of at most ``max(max_rows, 1)`` rows.

    Yields ``(patches [r, C k k], p [r, n])``: the rows of output pixels (sample, row, column),
    features in ``Conv2d.weight.reshape(n, -1)``'s order (:func:`torch.nn.functional.unfold`'s).
    Whole images when ``N H W`` rows fit, else tiles of pixels of one image (the padded input is
    sliced, no patch is duplicated).
    """
    N, C, H, W = x.shape
    n = p.shape[1]
    k, pad = kernel_size, kernel_size // 2
    ckk = C * k * k
    max_rows = max(1, int(max_rows))
    if N * H * W <= max_rows:
        cols = F.unfold(x, k, padding=pad)  # [N, Ckk, HW]
        yield cols.transpose(1, 2).reshape(N * H * W, ckk), p.permute(0, 2, 3, 1).reshape(N * H * W, n)
        return
    tw = min(W, max_rows)
    th = max(1, min(H, max_rows // tw))
    xp = F.pad(x, (pad, pad, pad, pad))
    for s in range(N):
        for r0 in range(0, H, th):
            r1 = min(H, r0 + th)
            for c0 in range(0, W, tw):
                c1 = min(W, c0 + tw)
                cols = F.unfold(xp[s : s + 1, :, r0 : r1 + k - 1, c0 : c1 + k - 1], k)  # [1, Ckk, rows]
                pc = p[s, :, r0:r1, c0:c1].reshape(n, (r1 - r0) * (c1 - c0))
                yield cols[0].t().contiguous(), pc.t().contiguous()


def conv_sensitivity_blocks(
    x: torch.Tensor, p: torch.Tensor, kernel_size: int, *, bias: bool = True, max_rows: int = 2**16
) -> torch.Tensor:
    """``B[r] = sum_{s, pixels} p[s, r, pixel] * pt pt^T`` (``pt = [patch; 1]``) as ``[n, m, m]``.

    im2col by :func:`torch.nn.functional.unfold` in chunks of at most ``max_rows`` rows
    (:func:`conv_rows`), each accumulated by :func:`sensitivity_blocks`; computed in ``x``'s dtype.
    """
    m = x.shape[1] * kernel_size * kernel_size + int(bias)
    out = torch.zeros(p.shape[1], m, m, dtype=x.dtype, device=x.device)
    for u, q in conv_rows(x, p.to(x.dtype), kernel_size, max_rows):
        out += sensitivity_blocks(u, q, bias=bias)
    return out


def conv_sensitivity_matvec(
    x: torch.Tensor, p: torch.Tensor, v: torch.Tensor, kernel_size: int, *, bias: bool = True
) -> torch.Tensor:
    """Row ``r`` is ``B[r] @ v[r]``, by convolutions: ``y = conv2d(x, v as weights)``, then the weight
    gradient of ``p * y`` (:func:`torch.nn.grad.conv2d_weight`); in ``v``'s dtype."""
    n, C, k = p.shape[1], x.shape[1], kernel_size
    d = C * k * k
    xv, pv = x.to(v.dtype), p.to(v.dtype)
    y = F.conv2d(xv, v[:, :d].reshape(n, C, k, k), v[:, d] if bias else None, padding=k // 2)
    z = pv * y
    out = torch.nn.grad.conv2d_weight(xv, (n, C, k, k), z, padding=k // 2).reshape(n, d)
    if bias:
        out = torch.cat([out, z.sum(dim=(0, 2, 3))[:, None]], dim=1)
    return out


def conv_sensitivity_topk(
    x: torch.Tensor, p: torch.Tensor, kernel_size: int, *, k: int = 1, bias: bool = True
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` eigenpairs of every conv block: :func:`conv_sensitivity_blocks` then ``eigh``."""
    return eigh_topk(conv_sensitivity_blocks(x, p, kernel_size, bias=bias), k)
