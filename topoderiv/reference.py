"""Plain-PyTorch twins of every topoderiv op.

These are the tests' oracle (run them in float64) and the ``backend="torch"`` implementation.
They are written for clarity, not speed, but they never materialise an ``N x n x m``
intermediate larger than a fixed chunk, so they also run on real sizes.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "augment",
    "sensitivity_blocks",
    "sensitivity_matvec",
    "lanczos_topk",
    "eigh_topk",
    "sensitivity_topk",
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
