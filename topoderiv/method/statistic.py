"""The sensitivity statistics a site accumulates over batches, and their solution (METHOD.md 3, 5, 7).

Two families, one interface (``add(x, p)`` per batch, ``held_bytes``/``flush()`` for the memory
budget, ``solve(S, rule)`` -> :class:`Solution`):

- :class:`EigenStatistic`: the paper's blocks (``linear``, ``tokens``, ``conv`` sites),
  ``B_r = sum_rows q_r xt xt^T`` with ``xt = [u(x); 1]``, one block per output unit ``r``;
  ``mu = sigma''(0) lambda_max``. Rows are produced by the site (``rows(x, p)``: samples,
  samples x tokens, or samples x pixels of im2col patches, in bounded chunks). Either the blocks
  are accumulated batch by batch (dense route, memory ``n m^2``) or the rows are kept and solved
  matrix-free (:func:`topoderiv.ops.sensitivity_topk`), as the route and the budget decide.
- :class:`SingularStatistic`: the standard transformer sub-blocks (``mlp_block``,
  ``attention_block``; see :mod:`topoderiv.sites.transformer`): ``M = sum_rows p z^T`` per
  group (head), ``mu = c * s_max(M)``.

Costate scaling: batch b's costates arrive as ``-B_b dJ_b/dx`` and the statistic is divided by
the total sample count ``S`` at the end, which is exactly ``p = -dJ/dx`` of the mean loss (the
statistics are linear in ``p``) without knowing ``S`` in advance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops, reference
from .rules import eigen_rule

__all__ = [
    "Solution",
    "EigenStatistic",
    "kernels_available",
    "resolve_backend",
    "subspace_start",
    "canonical_sign",
    "ROUTES",
    "BACKENDS",
]

ROUTES = ("auto", "dense", "matfree")
BACKENDS = ("auto", "kernels", "torch")


def kernels_available() -> bool:
    """True when the compiled extension ``topoderiv._C`` imports."""
    try:
        from .._lib import lib

        lib()
        return True
    except ImportError:
        return False


def resolve_backend(backend: str, device: Optional[torch.device], fn: str = "score") -> str:
    """``"kernels"`` or ``"torch"``: ``"auto"`` takes the kernels when built for ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not kernels_available():
        return "torch"
    if device is not None and device.type == "cuda" and not ops.has_cuda_kernels():
        return "torch"
    if device is not None and device.type not in ("cpu", "cuda"):
        return "torch"
    return "kernels"


@dataclass
class Solution:
    """What a statistic's ``solve`` returns (in loss units: the curvature factor included).

    Attributes:
        mu: the topological derivative ``lambda_max(Q)``.
        block: the block (output unit, or unit/head) holding the top eigenvector.
        phi: the initialisation direction (unit norm): a ``[n, m]`` tensor for the paper's blocks,
            a dict for sub-blocks (see the site kind).
        block_mu: ``[n_blocks]`` top value of each block. values: ``[n_blocks, k]``.
        quotient: ``phi^T Q phi``, the second-order gain of ``phi``.
        score: what the rule ranks points by (``mu``; the summed eigenvalues for ``"reference"``).
        n_pairs: eigenpairs (or singular pairs) combined into ``phi``.
        converged: every eigen-solve met its tolerance. route: how it was solved.
    """

    mu: float
    block: int
    phi: Any
    block_mu: Tensor
    values: Tensor
    quotient: float
    score: float
    n_pairs: int
    converged: bool
    route: str


def canonical_sign(vectors: Tensor) -> Tensor:
    """Flips each eigenvector ``[..., m, k]`` so its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=-2, keepdim=True)
    s = torch.sign(torch.gather(vectors, -2, idx))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return vectors * s


# flops budget (m^3 per block) for redoing unconverged Lanczos blocks with a full eigh
EIGH_FALLBACK_FLOPS = 4e9


def _fallback(values: Tensor, vectors: Tensor, converged: Tensor, k: int,
              blocks_of: Callable[[Tensor], Tensor]) -> Tuple[Tensor, Tensor, bool]:
    """Redoes the blocks whose Lanczos solve did not converge with a full ``eigh`` (within a budget)."""
    bad = (~converged).nonzero().flatten()
    if bad.numel() == 0:
        return values, vectors, True
    m = vectors.shape[1]
    if bad.numel() * float(m) ** 3 > EIGH_FALLBACK_FLOPS:
        return values, vectors, False
    vals, vecs = reference.eigh_topk(blocks_of(bad), k)
    values, vectors = values.clone(), vectors.clone()
    values[bad] = vals.to(values.dtype)
    vectors[bad] = vecs.to(vectors.dtype)
    return values, vectors, True


# rank of the shared activation subspace that warm-starts matrix-free solves, and the least m
# for which it pays (measured: at m = 65 warm-started scoring is 7-11% faster than cold)
WARM_RANK = 32
WARM_MIN_M = 2 * WARM_RANK


def subspace_start(u: Tensor, q: Tensor, bias: bool, rank: int = WARM_RANK) -> Tensor:
    """Warm-start vectors ``[n, m]`` for the top eigenvectors of the blocks of ``(u [..., d], q [..., n])``.

    Rayleigh-Ritz in one subspace shared by all blocks: ``V`` = the ``rank`` leading right singular
    vectors of ``Xt = [u, 1]`` (``[N, m]``, N = samples x tokens); each block is projected,
    ``C_r = V^T B_r V = sum_s q_{s,r} z_s z_s^T`` with ``z = Xt V`` (one small
    :func:`topoderiv.ops.sensitivity_blocks` call, ``N n rank^2`` flops), and its top eigenvector
    ``y_r`` (Lanczos to 1%) gives ``V y_r``. Every ``B_r`` reads the same activations, so their top
    eigenvectors lie mostly in the activations' leading directions: on trained ResidualMLPs the
    start residual is a few per cent of ``||Q||``, the matrix-free Lanczos needs about half the
    steps, and fewer blocks misconverge. 1% of a seeded random direction is mixed in, so a top
    eigenvector outside the subspace is still reached.
    """
    u = u.reshape(-1, u.shape[-1]).to(torch.float64 if u.dtype == torch.float64 else torch.float32)
    q = q.reshape(-1, q.shape[-1])  # samples (x tokens) as rows
    xt = torch.cat([u, u.new_ones(u.shape[0], 1)], dim=1) if bias else u
    m = xt.shape[1]
    r = min(int(rank), m)
    _, basis = torch.linalg.eigh(xt.mT @ xt)
    basis = basis[:, -r:]  # [m, r] leading right singular vectors
    z = xt @ basis
    # a start vector needs no more than 1% accuracy in the subspace: Lanczos, not a full eigh
    c = ops.sensitivity_blocks(z, q.to(z.dtype), bias=False)  # [n, r, r]
    v0 = ops.lanczos_topk(c, 1, tol=1e-2).vectors[:, :, 0] @ basis.mT
    # plus 1% of a seeded random direction: a start with no component along the top eigenvector
    # (one outside the subspace) would never find it
    g = torch.randn(v0.shape, generator=torch.Generator().manual_seed(0), dtype=v0.dtype).to(v0.device)
    return v0 + 0.01 * g / g.norm(dim=1, keepdim=True)


RowsFn = Callable[[Tensor, Tensor], Iterable[Tuple[Tensor, Tensor]]]


class EigenStatistic:
    """Blocks ``B_r = sum_rows q_r xt xt^T`` of one site, accumulated over batches, then solved.

    Args:
        rows: ``rows(x, p) -> iterable of (u [N, d], q [N, n])``: the site's features and
            costates as rows (chunked by the site when they would be large).
        n, d: output units and input features. bias: ``xt = [u; 1]``.
        curvature: ``sigma''(0)`` of the new block's activation (its sign flips ``q``; its
            magnitude scales the values into loss units).
        backend: ``"kernels"`` or ``"torch"``. route: ``"auto"``, ``"dense"`` or ``"matfree"``.
        collect: whether rows may be kept for a matrix-free solve (False: always stream blocks).
        k: eigenpairs per block. tol: relative residual tolerance (None: the defaults of
            :func:`topoderiv.score`).
    """

    def __init__(self, rows: RowsFn, n: int, d: int, bias: bool, curvature: float, *, backend: str,
                 route: str, collect: bool, k: int, tol: Optional[float]) -> None:
        self.rows, self.n, self.d, self.bias = rows, n, d, bias
        self.curvature = float(curvature)
        self.sign = 1.0 if curvature > 0 else -1.0
        self.backend, self.route, self.k, self.tol = backend, route, k, tol
        self.collecting = collect and backend == "kernels" and route != "dense"
        self.blocks: Optional[Tensor] = None
        self.us: List[Tensor] = []
        self.qs: List[Tensor] = []
        self.held_bytes = 0

    @property
    def m(self) -> int:
        return self.d + int(self.bias)

    def add(self, x: Tensor, p: Tensor) -> None:
        """Adds one batch: stream states ``x`` and costates ``p`` (carrying ``B_b``) at the site."""
        for u, q in self.rows(x, p):
            if self.sign < 0:
                q = -q
            q = q.to(u.dtype)
            if self.collecting:
                self.us.append(u)
                self.qs.append(q)
                self.held_bytes += (u.numel() + q.numel()) * u.element_size()
            else:
                self._accumulate(u, q)

    def _accumulate(self, u: Tensor, q: Tensor) -> None:
        if self.backend == "kernels":
            if self.blocks is None:
                self.blocks = ops.sensitivity_blocks(u, q, bias=self.bias)
            else:
                ops.sensitivity_blocks(u, q, bias=self.bias, out=self.blocks)
        else:
            b = reference.sensitivity_blocks(u, q, bias=self.bias)
            self.blocks = b if self.blocks is None else self.blocks.add_(b)

    def flush(self) -> None:
        """Moves the kept rows into dense blocks and streams from now on."""
        for u, q in zip(self.us, self.qs):
            self._accumulate(u, q)
        self.us, self.qs, self.held_bytes, self.collecting = [], [], 0, False

    def eigenpairs(self, S: int, k: int) -> Tuple[Tensor, Tensor, bool, str, Callable[[Tensor], Tensor]]:
        """Top-``k`` eigenpairs of the blocks of ``sign * B / S``: ``(values [n, k], vectors [n, m, k],
        converged, route, blocks_of)``; ``blocks_of(idx)`` gives dense blocks ``[len(idx), m, m]``.

        Kernels: Lanczos (dense or matrix-free; matrix-free solves start from :func:`subspace_start`);
        blocks it did not converge on are redone with a full eigh when that is affordable. Torch
        backend: dense blocks + eigh.
        """
        tol = self.tol
        if self.blocks is None and self.us:  # everything kept: the kernels pick the route with the real S
            u = self.us[0] if len(self.us) == 1 else torch.cat(self.us, dim=0)
            self.us = []
            q = (self.qs[0] if len(self.qs) == 1 else torch.cat(self.qs, dim=0)) / S
            self.qs = []
            fp64 = u.dtype == torch.float64
            route = self.route
            if route == "auto":
                route = ops.choose_route(u.shape[0], self.d, self.n, bias=self.bias, k=k, itemsize=8 if fp64 else 4)

            def blocks_of(idx: Tensor) -> Tensor:
                return ops.sensitivity_blocks(u, q[..., idx], bias=self.bias)

            v0 = None
            if route == "matfree" and k == 1 and self.m >= WARM_MIN_M:
                v0 = subspace_start(u, q, self.bias)
            if tol is None:
                # warm-started fp32 solves stop at 1e-3 * ||Q||: their eigenvalues are then as
                # accurate as cold solves at 1e-4 (benchmarks/RESULTS.md)
                tol = 1e-10 if fp64 else (1e-3 if v0 is not None else 1e-4)
            res = ops.sensitivity_topk(u, q, k=k, bias=self.bias, route=route, tol=tol, v0=v0)
            vals, vecs, conv = _fallback(res.values, res.vectors, res.converged, k, blocks_of)
            return vals, vecs, conv, res.route, blocks_of
        if self.blocks is None:
            raise ValueError("EigenStatistic: no rows were added")
        blocks = self.blocks / S
        fp64 = blocks.dtype == torch.float64

        def dense_of(idx: Tensor) -> Tensor:
            return blocks[idx]

        if self.backend == "kernels":
            res = ops.lanczos_topk(blocks, k, tol=(1e-10 if fp64 else 1e-4) if tol is None else tol, shared_norm=True)
            vals, vecs, conv = _fallback(res.values, res.vectors, res.converged, k, dense_of)
            return vals, vecs, conv, "dense", dense_of
        vals, vecs = reference.eigh_topk(blocks, k)
        return vals, vecs, True, "eigh", dense_of

    def solve(self, S: int, rule: str) -> Solution:
        """Eigenpairs, then ``phi`` by ``rule`` (:func:`topoderiv.method.rules.eigen_rule`)."""
        k = max(self.k, 4) if rule in ("multi", "reference") else self.k
        k = min(k, self.m)
        vals, vecs, conv, route, blocks_of = self.eigenpairs(S, k)
        vecs = canonical_sign(vecs)
        scale = abs(self.curvature)
        sel = eigen_rule(vals, vecs, rule, blocks_of=lambda idx: blocks_of(idx))
        block_vals = vals * scale
        return Solution(mu=float(block_vals[sel.block, 0]), block=sel.block, phi=sel.phi,
                        block_mu=block_vals[:, 0].clone(), values=block_vals, quotient=sel.quotient * scale,
                        score=sel.score * scale, n_pairs=sel.n_pairs, converged=conv, route=route)
