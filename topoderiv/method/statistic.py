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
  ``attention_block``, ``transformer_block``; see :mod:`topoderiv.sites.transformer`):
  ``M_g = sum_rows q_g zt^T`` per group (the MLP; each attention head), ``mu = max_g |c_g|
  s_max(M_g)``, solved by an SVD (rule ``"top"``: Lanczos on the Gram matrices).

Costate scaling: batch b's costates arrive as ``-B_b dJ_b/dx`` and the statistic is divided by
the total sample count ``S`` at the end, which is exactly ``p = -dJ/dx`` of the mean loss (the
statistics are linear in ``p``) without knowing ``S`` in advance.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import ops, reference
from .distributed import Comm
from .lanczos import sensitivity_lanczos
from .rules import eigen_rule, singular_rule

__all__ = [
    "Solution",
    "EigenStatistic",
    "SingularPart",
    "SingularStatistic",
    "singular_pairs",
    "kernels_available",
    "resolve_backend",
    "subspace_start",
    "leading_basis",
    "support_basis",
    "embed_basis",
    "solve_points",
    "EigenPlan",
    "canonical_sign",
    "accumulation_dtype",
    "dtype_code",
    "ROUTES",
    "BACKENDS",
]

ROUTES = ("auto", "dense", "matfree")
BACKENDS = ("auto", "kernels", "torch")

# the input dtypes rows are kept in (the kernels' inputs); any other floating dtype (float16 from
# CUDA autocast) is widened to float32 when added
_ROW_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# a dtype as a small code for the collectives that agree on it (0: no data on this rank)
_DTYPE_CODES = {torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_CODE_DTYPES = {c: d for d, c in _DTYPE_CODES.items()}


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What statistics of inputs of ``dtype`` accumulate in: float64 for float64, else float32
    (bfloat16 / float16 models, autocast: the statistics are float32 whatever the model)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dtype_code(dtype: Optional[torch.dtype]) -> int:
    """``dtype`` as the code the ranks agree on (0 for None: no data)."""
    return 0 if dtype is None else _DTYPE_CODES[dtype]


def _agreed_dtype(counts: Sequence[float], what: str) -> torch.dtype:
    """The one dtype whose code the ranks hold (``counts[c - 1]`` ranks hold code ``c``)."""
    held = [c + 1 for c, v in enumerate(counts) if v > 0]
    if len(held) != 1:
        names = [str(_CODE_DTYPES[c]) for c in held]
        raise ValueError(f"score: the ranks must hold {what} of one dtype, got {names or 'none'}")
    return _CODE_DTYPES[held[0]]


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
        bounds: ``[n_blocks]`` bool or None: blocks stopped early by ``need="top"`` (they cannot
            hold ``mu``), whose ``block_mu`` / ``values`` are lower bounds, not eigenvalues.
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
    bounds: Optional[Tensor] = None


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
# the warm start's Gram matrix is formed from at most max(WARM_GRAM_ROWS, 4 m) evenly spaced rows
# (a subspace for a start needs no more; the whole Gram cost half an operator application)
WARM_GRAM_ROWS = 1024
# leading_basis: extra columns and power iterations of the randomized subspace iteration, used
# when the support is larger than RANDOMIZED_MIN_FACTOR x (rank + oversampling)
BASIS_OVERSAMPLE = 8
BASIS_POWER_ITERS = 2
RANDOMIZED_MIN_FACTOR = 2


def _eigh_vectors(a: Tensor) -> Tensor:
    """Eigenvectors of symmetric ``a`` (ascending), ``torch.linalg.eigh`` in ``a``'s dtype, redone in
    float64 when that raises or returns non-finite vectors."""
    try:
        vecs = torch.linalg.eigh(a)[1]
        if bool(torch.isfinite(vecs).all()):
            return vecs
    except torch.linalg.LinAlgError:
        pass
    return torch.linalg.eigh(a.double())[1].to(a.dtype)


def support_basis(s: int, rank: int, apply: Callable[[Tensor], Tensor], ritz: Callable[[Tensor], Tensor],
                  gram_of: Callable[[], Tensor], like: Tensor) -> Tensor:
    """The ``min(rank, s)`` leading eigenvectors ``[s, min(rank, s)]`` of a PSD operator ``G`` on ``s``
    coordinates, columns in ascending order of their (Ritz) values.

    Small ``s`` (at most ``RANDOMIZED_MIN_FACTOR * (rank + BASIS_OVERSAMPLE)``): exact, ``eigh`` of
    ``gram_of()`` (``G`` as a matrix; float64 when the Gram's dtype fails). Larger ``s``: a seeded
    randomized subspace iteration (Halko, Martinsson, Tropp 2011: ``rank + BASIS_OVERSAMPLE``
    columns, ``BASIS_POWER_ITERS`` power iterations, then Rayleigh-Ritz) that only needs
    ``apply(W) = G W`` and ``ritz(Q) = Q^T G Q``: ``O(s^2 rank)`` with ``G`` formed, less when it is
    not (:func:`topoderiv.sites.conv.conv_subspace_start` applies the patches' Gram by two
    convolutions), deterministic, and accurate where the spectrum decays, which is all a warm start
    needs. ``like``: the dtype and device of the random matrix.
    """
    take = min(int(rank), s)
    width = take + BASIS_OVERSAMPLE
    if take and s > RANDOMIZED_MIN_FACTOR * width:
        omega = torch.randn(s, width, generator=torch.Generator().manual_seed(0), dtype=like.dtype).to(like.device)
        y = apply(omega)
        for _ in range(BASIS_POWER_ITERS):
            y = apply(torch.linalg.qr(y)[0])
        qb = torch.linalg.qr(y)[0]  # [s, width] orthonormal
        small = ritz(qb)
        return qb @ _eigh_vectors((small + small.mT) / 2)[:, width - take:]
    return _eigh_vectors(gram_of())[:, s - take:]


def embed_basis(vecs: Tensor, support: Tensor, m: int, rank: int) -> Tensor:
    """``[m, rank]``: the columns ``vecs [s, take]`` (coordinates ``support``) placed last, preceded by
    ``rank - take`` unit vectors of coordinates outside the support (eigenvalue 0 of a PSD matrix
    whose rows and columns outside ``support`` are zero)."""
    take = vecs.shape[1]
    if support.numel() == m and take == rank:
        return vecs
    basis = vecs.new_zeros(m, rank)
    basis[support, rank - take:] = vecs
    if take < rank:
        outside = torch.ones(m, dtype=torch.bool, device=vecs.device)
        outside[support] = False
        zeros = outside.nonzero().squeeze(1)[:rank - take]
        basis[zeros, torch.arange(zeros.numel(), device=vecs.device)] = 1
    return basis


def leading_basis(gram: Tensor, rank: int) -> Tensor:
    """An orthonormal basis ``[m, rank]`` of the leading eigenvectors of a symmetric PSD Gram ``[m, m]``.

    Rows and columns with a zero diagonal are zero in a PSD matrix (padding taps, 1x1 images,
    dead units): the eigenproblem is solved on the support only (:func:`support_basis`: exact for
    small supports, randomized subspace iteration for larger ones) and those coordinates get
    eigenvalue-0 unit vectors when ``rank`` exceeds the support (:func:`embed_basis`). (MKL's
    ``syevd`` fails to converge, in float32 and float64 alike, on some Grams made mostly of such
    zeros: a timm ResNet's 1x1 stage under torch 2.14; on the support it does not.) Columns in
    ascending order of their Ritz values.
    """
    m, rank = gram.shape[0], int(rank)
    support = (gram.diagonal() != 0).nonzero().squeeze(1)
    sub = gram if support.numel() == m else gram.index_select(0, support).index_select(1, support)
    vecs = support_basis(support.numel(), rank, lambda w: sub @ w, lambda qb: qb.mT @ sub @ qb, lambda: sub, sub)
    return embed_basis(vecs, support, m, rank)


def subspace_start(u: Tensor, q: Tensor, bias: bool, rank: int = WARM_RANK,
                   reduce: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """Warm-start vectors ``[n, m]`` for the top eigenvectors of the blocks of ``(u [..., d], q [..., n])``.

    Rayleigh-Ritz in one subspace shared by all blocks: ``V`` = the ``rank`` leading right singular
    vectors of ``Xt = [u, 1]`` (``[N, m]``, N = samples x tokens; from the Gram of at most
    ``max(WARM_GRAM_ROWS, 4 m)`` evenly spaced rows, by :func:`leading_basis`); each block is projected,
    ``C_r = V^T B_r V = sum_s q_{s,r} z_s z_s^T`` with ``z = Xt V`` (one small
    :func:`topoderiv.ops.sensitivity_blocks` call, ``N n rank^2`` flops), and its top eigenvector
    ``y_r`` (Lanczos to 1%) gives ``V y_r``. Every ``B_r`` reads the same activations, so their top
    eigenvectors lie mostly in the activations' leading directions: on trained ResidualMLPs the
    start residual is a few per cent of ``||Q||``, the matrix-free Lanczos needs about half the
    steps, and fewer blocks misconverge. 1% of a seeded random direction is mixed in, so a top
    eigenvector outside the subspace is still reached.

    ``reduce``: under a process group every rank passes its own rows and ``reduce`` sums a tensor
    over the ranks (in place): the Gram matrix ``Xt^T Xt`` and the projected blocks are reduced,
    so every rank gets the start of the union of the rows (two collectives, ``m^2`` and
    ``n rank^2`` elements).
    """
    u = u.reshape(-1, u.shape[-1]).to(torch.float64 if u.dtype == torch.float64 else torch.float32)
    q = q.reshape(-1, q.shape[-1])  # samples (x tokens) as rows
    xt = torch.cat([u, u.new_ones(u.shape[0], 1)], dim=1) if bias else u
    m = xt.shape[1]
    r = min(int(rank), m)
    xs = xt[::max(1, xt.shape[0] // max(WARM_GRAM_ROWS, 4 * m))]  # evenly spaced rows
    gram = xs.mT @ xs
    if reduce is not None:
        gram = reduce(gram)
    basis = leading_basis(gram, r)  # [m, r] leading right singular vectors
    z = xt @ basis
    # a start vector needs no more than 1% accuracy in the subspace: Lanczos, not a full eigh
    c = ops.sensitivity_blocks(z, q.to(z.dtype), bias=False)  # [n, r, r]
    if reduce is not None:
        c = reduce(c)
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

    Precision: rows are kept in their dtype (bfloat16 stays bfloat16; float16 is widened to
    float32, the kernels' input), the blocks and every product accumulate in float32 (float64
    for float64 inputs), whatever the model's dtype.

    Under a process group (:meth:`synchronise`, called by :func:`topoderiv.score` on every rank
    after the stream) the blocks are all-reduced once, or the kept rows stay on their ranks and
    every operator application of the matrix-free solve is all-reduced.
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
        self.in_dtype: Optional[torch.dtype] = None  # dtype of the rows added
        # set by synchronise (a process group): the communicator, the rows kept on all ranks, the
        # route every rank takes, and where empty rows go
        self.comm: Optional[Comm] = None
        self.global_rows: Optional[int] = None
        self.planned: Optional[str] = None
        self.device: Optional[torch.device] = None
        # blocks the last solve stopped early (need="top"): their values are lower bounds
        self.early: Optional[Tensor] = None

    @property
    def m(self) -> int:
        return self.d + int(self.bias)

    def add(self, x: Tensor, p: Tensor) -> None:
        """Adds one batch: stream states ``x`` and costates ``p`` (carrying ``B_b``) at the site."""
        for u, q in self.rows(x, p):
            if u.dtype not in _ROW_DTYPES:
                u = u.float()
            if self.sign < 0:
                q = -q
            q = q.to(u.dtype)
            if self.in_dtype is None:
                self.in_dtype = u.dtype
            elif u.dtype != self.in_dtype:
                raise ValueError(f"score: the rows of one site must keep one dtype over the batches, got "
                                 f"{self.in_dtype} then {u.dtype}")
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
            acc = accumulation_dtype(u.dtype)
            b = reference.sensitivity_blocks(u.to(acc), q.to(acc), bias=self.bias)
            self.blocks = b if self.blocks is None else self.blocks.add_(b)

    def flush(self) -> None:
        """Moves the kept rows into dense blocks and streams from now on."""
        for u, q in zip(self.us, self.qs):
            self._accumulate(u, q)
        self.us, self.qs, self.held_bytes, self.collecting = [], [], 0, False

    # -- data parallel --------------------------------------------------------------------------

    def summary(self) -> List[float]:
        """What :meth:`synchronise` needs from every rank: ``[rows kept, 1 if streaming blocks,
        one-hot of the rows' dtype (bfloat16, float32, float64)]`` (summed over the ranks)."""
        code = dtype_code(self.in_dtype)
        return [float(sum(u.shape[0] for u in self.us)), float(self.blocks is not None)] + \
            [float(code == c) for c in (1, 2, 3)]

    def synchronise(self, comm: Comm, total: Sequence[float], k: int, device: Optional[torch.device]) -> str:
        """Makes every rank's statistic the statistic of the union of the ranks' rows.

        ``total``: the sum over the ranks of :meth:`summary`. When any rank streams dense blocks
        (the route, a conv site, or a rank whose kept rows exceeded the memory budget) every rank
        moves its rows into blocks and the blocks are all-reduced (ONE collective, ``n m^2``
        elements); otherwise the rows stay where they are, and the route is the one
        :func:`topoderiv.ops.choose_route` picks for the rows of ALL ranks. Returns the route
        every rank will take (``"dense"`` or ``"matfree"``), identical on every rank.
        """
        rows, streaming = int(total[0]), total[1] > 0
        self.in_dtype = _agreed_dtype(total[2:5], "the rows of a site")
        self.device = device
        if streaming or not self.collecting:
            self.flush()
            if self.blocks is None:
                self.blocks = torch.zeros(self.n, self.m, self.m, dtype=accumulation_dtype(self.in_dtype),
                                          device=device)
            comm.all_reduce_(self.blocks, "blocks")
            self.planned = "dense"
            return self.planned
        self.comm, self.global_rows = comm, rows
        self.planned = self._route(rows, k)
        return self.planned

    def _route(self, N: int, k: int) -> str:
        if self.route != "auto":
            return self.route
        return ops.choose_route(N, self.d, self.n, bias=self.bias, k=k,
                                itemsize=8 if self.in_dtype == torch.float64 else 4)

    def _kept_rows(self) -> Tuple[Tensor, Tensor]:
        """The kept rows concatenated (empty ``[0, d]``, ``[0, n]`` on a rank without rows)."""
        if self.us:
            u = self.us[0] if len(self.us) == 1 else torch.cat(self.us, dim=0)
            q = self.qs[0] if len(self.qs) == 1 else torch.cat(self.qs, dim=0)
        else:
            dt = self.in_dtype or torch.float32
            u = torch.zeros(0, self.d, dtype=dt, device=self.device)
            q = torch.zeros(0, self.n, dtype=dt, device=self.device)
        self.us, self.qs = [], []
        return u, q

    def eigenpairs(self, S: int, k: int, need: str = "all") -> Tuple[Tensor, Tensor, bool, str, Callable[[Tensor], Tensor]]:
        """Top-``k`` eigenpairs of the blocks of ``sign * B / S``: ``(values [n, k], vectors [n, m, k],
        converged, route, blocks_of)``; ``blocks_of(idx)`` gives dense blocks ``[len(idx), m, m]``.

        Kernels: Lanczos (dense or matrix-free; matrix-free solves start from :func:`subspace_start`;
        a conv site's kept images: :func:`topoderiv.ops.conv_sensitivity_topk`, the plan of
        :meth:`topoderiv.sites.conv.ConvStatistic.plan`), the same call :func:`solve_points` makes
        for a group of points; blocks it did not converge on (and that did not stop early) are
        redone with a full eigh when that is affordable (:meth:`finish`). Torch
        backend: dense blocks + eigh. Under a process group the matrix-free Lanczos is the
        step-wise one of :mod:`topoderiv.method.lanczos`, each step's product all-reduced.
        ``need="top"``: only the block holding the largest eigenvalue is solved to tolerance (the
        others may stop early: see :attr:`early`, set here).
        """
        plan = self.plan(S, k, need)
        if plan.kind in _KEPT:
            res = _solve_kept([plan], k, self.bias, need)[0]  # what solve_points does for a group of points
            return self.finish(plan, res.values, res.vectors, res.converged, res.early, k)
        if plan.kind == "blocks":
            res = ops.lanczos_topk(plan.blocks, k, tol=plan.tol, shared_norm=True, need=need)
            return self.finish(plan, res.values, res.vectors, res.converged, res.early, k)
        return self.finish_other(plan, k, need)

    def plan(self, S: int, k: int, need: str = "all") -> "EigenPlan":
        """What the solve of this statistic needs (rows to solve, dense blocks, or another path)."""
        tol = self.tol
        comm = self.comm
        if self.blocks is None and (self.us or comm is not None):
            # everything kept: the route is picked with the real S (of every rank)
            u, q = self._kept_rows()
            fp64 = u.dtype == torch.float64
            N = self.global_rows if comm is not None else u.shape[0]
            route = self.planned if self.planned is not None else self._route(int(N), k)

            def reduced(t: Tensor, tag: str) -> Tensor:
                return t if comm is None else comm.all_reduce_(t, tag)

            def blocks_of(idx: Tensor) -> Tensor:
                return reduced(ops.sensitivity_blocks(u, q[..., idx], bias=self.bias), "fallback") / S

            v0 = None
            if route == "matfree" and k == 1 and self.m >= WARM_MIN_M:
                if comm is None:
                    v0 = subspace_start(u, q, self.bias)
                else:
                    v0 = subspace_start(u, q, self.bias, reduce=lambda t: comm.all_reduce_(t, "warm"))
            if tol is None:
                # warm-started fp32 solves stop at 1e-3 * ||Q||: their eigenvalues are then as
                # accurate as cold solves at 1e-4 (benchmarks/RESULTS.md)
                tol = 1e-10 if fp64 else (1e-3 if v0 is not None else 1e-4)
            # the rows carry B_b, not B_b / S: the values are divided by S afterwards (a solve is
            # scale-invariant, and bfloat16 costates are not rounded once more)
            return EigenPlan("rows" if comm is None else "distributed", S, route, tol, blocks_of, u=u, q=q, v0=v0)
        if self.blocks is None:
            raise ValueError("EigenStatistic: no rows were added")
        blocks = self.blocks / S
        fp64 = blocks.dtype == torch.float64

        def dense_of(idx: Tensor) -> Tensor:
            return blocks[idx]

        if self.backend == "kernels":
            return EigenPlan("blocks", 1, "dense", (1e-10 if fp64 else 1e-4) if tol is None else tol, dense_of,
                             blocks=blocks)
        return EigenPlan("eigh", 1, "eigh", 0.0, dense_of, blocks=blocks)

    def finish_other(self, plan: "EigenPlan", k: int, need: str) -> Tuple[Tensor, Tensor, bool, str, Callable[[Tensor], Tensor]]:
        """The plans :func:`solve_points` does not batch: torch eigh, or a process group's solve."""
        if plan.kind == "eigh":
            vals, vecs = reference.eigh_topk(plan.blocks, k)
            self.early = None
            return vals, vecs, True, "eigh", plan.blocks_of
        comm = self.comm
        assert comm is not None and plan.u is not None and plan.q is not None
        u, q, S = plan.u, plan.q, plan.scale
        if plan.route == "dense":
            blocks = comm.all_reduce_(ops.sensitivity_blocks(u, q, bias=self.bias), "blocks")
            res = ops.lanczos_topk(blocks, k, tol=plan.tol, shared_norm=True)
            plan.blocks_of = lambda idx: blocks[idx] / S
        else:
            res = sensitivity_lanczos(u, q, comm, k=k, bias=self.bias, tol=plan.tol, v0=plan.v0)
        return self.finish(plan, res.values, res.vectors, res.converged, None, k)

    def finish(self, plan: "EigenPlan", values: Tensor, vectors: Tensor, converged: Tensor, early: Optional[Tensor],
               k: int) -> Tuple[Tensor, Tensor, bool, str, Callable[[Tensor], Tensor]]:
        """Values divided by the plan's scale; blocks not converged (and not stopped early by
        ``need="top"``) redone by eigh within budget."""
        ok = converged if early is None else converged | early
        vals, vecs, conv = _fallback(values / plan.scale, vectors, ok, k, plan.blocks_of)
        self.early = None if early is None or not bool(early.any()) else early.clone()
        return vals, vecs, conv, plan.route, plan.blocks_of

    def solve_k(self, rule: str) -> int:
        """Eigenpairs per block the rule needs."""
        k = max(self.k, 4) if rule in ("multi", "reference") else self.k
        return min(k, self.m)

    def solve(self, S: int, rule: str, need: str = "all") -> Solution:
        """Eigenpairs, then ``phi`` by ``rule`` (:func:`topoderiv.method.rules.eigen_rule`).

        ``need="top"`` (rule ``"top"`` only): blocks that cannot win may stop early; their
        ``block_mu`` are then lower bounds, marked in ``Solution.bounds``.
        """
        k = self.solve_k(rule)
        need = need if rule == "top" else "all"
        if need == "all" or type(self).eigenpairs is not EigenStatistic.eigenpairs:
            return self.solution(rule, k, *self.eigenpairs(S, k))  # a subclass's eigenpairs(S, k)
        return self.solution(rule, k, *self.eigenpairs(S, k, need))

    def solution(self, rule: str, k: int, vals: Tensor, vecs: Tensor, conv: bool, route: str,
                 blocks_of: Callable[[Tensor], Tensor]) -> Solution:
        """``phi`` by ``rule`` from solved eigenpairs (values of ``sign * B / S``)."""
        vecs = canonical_sign(vecs)
        scale = abs(self.curvature)
        sel = eigen_rule(vals, vecs, rule, blocks_of=lambda idx: blocks_of(idx))
        block_vals = vals * scale
        return Solution(mu=float(block_vals[sel.block, 0]), block=sel.block, phi=sel.phi,
                        block_mu=block_vals[:, 0].clone(), values=block_vals, quotient=sel.quotient * scale,
                        score=sel.score * scale, n_pairs=sel.n_pairs, converged=conv, route=route,
                        bounds=self.early)


@dataclass
class EigenPlan:
    """How one :class:`EigenStatistic` is solved (:meth:`EigenStatistic.plan`).

    kind: ``"rows"`` (kept rows, one process: :func:`topoderiv.ops.sensitivity_topk`), ``"conv"``
    (kept images of a conv site, one process: :func:`topoderiv.ops.conv_sensitivity_topk` with
    ``kernel``), ``"blocks"`` (dense blocks, kernels: :func:`topoderiv.ops.lanczos_topk`),
    ``"eigh"`` (torch backend) or ``"distributed"`` (kept rows under a process group). scale: what
    the values are divided by.
    """

    kind: str
    scale: float
    route: str
    tol: float
    blocks_of: Callable[[Tensor], Tensor]
    u: Optional[Tensor] = None
    q: Optional[Tensor] = None
    v0: Optional[Tensor] = None
    blocks: Optional[Tensor] = None
    kernel: int = 0


# the plans whose kept rows / images solve_points batches into multi-point op calls
_KEPT = ("rows", "conv")


def _kept_key(plan: EigenPlan, k: int, bias: bool, need: str) -> Tuple[Any, ...]:
    """The points whose plans share this key are solved by ONE multi-point call (:func:`_solve_kept`)."""
    assert plan.u is not None
    return (plan.kind, plan.route, k, plan.tol, plan.v0 is None, bias, plan.kernel, plan.u.dtype, plan.u.device, need)


def _kept_bytes(plan: EigenPlan, bias: bool) -> int:
    """What batching one kept plan holds at once: its inputs (stacked into one copy), plus a conv
    point's dense blocks on the dense route (formed for all points of the call together)."""
    assert plan.u is not None and plan.q is not None
    size = plan.u.numel() * plan.u.element_size() + plan.q.numel() * plan.q.element_size()
    if plan.kind == "conv" and plan.route == "dense":
        n, m = plan.q.shape[1], plan.u.shape[1] * plan.kernel ** 2 + int(bias)
        size += n * m * m * accumulation_dtype(plan.u.dtype).itemsize
    return size


def _solve_kept(plans: Sequence[EigenPlan], k: int, bias: bool, need: str) -> List[Any]:
    """ONE multi-point op call for kept plans of one :func:`_kept_key` (one plan: the single-point solve)."""
    p0 = plans[0]
    us, qs, v0s = [pl.u for pl in plans], [pl.q for pl in plans], [pl.v0 for pl in plans]
    if p0.kind == "conv":
        return ops.conv_sensitivity_topk(us, qs, p0.kernel, k=k, bias=bias, route=p0.route, tol=p0.tol,  # type: ignore[arg-type]
                                         v0=v0s, need=need)
    return ops.sensitivity_topk(us, qs, k=k, bias=bias, route=p0.route, tol=p0.tol, v0=v0s,  # type: ignore[arg-type]
                                need=need)


# bytes of dense blocks / of kept rows that solve_points concatenates into one batched launch at
# most (the copy the batching makes; larger points are solved in smaller launches)
DENSE_BATCH_BYTES = 256 * 2**20
ROWS_BATCH_BYTES = 512 * 2**20


def _batchable(st: Any) -> bool:
    """An :class:`EigenStatistic` that solves through ``plan`` / ``finish`` (no ``eigenpairs`` or
    ``solve`` of its own), kernels backend, one process: :func:`solve_points` batches it."""
    return (isinstance(st, EigenStatistic) and type(st).eigenpairs is EigenStatistic.eigenpairs
            and type(st).solve is EigenStatistic.solve and st.backend == "kernels" and st.comm is None)


def solve_points(stats: Sequence[Any], S: int, rule: str, need: str = "all") -> List[Solution]:
    """Solves the statistics of several points at once: one :class:`Solution` per statistic, in order.

    :class:`EigenStatistic` points (that class or a subclass that solves through its ``plan`` /
    ``finish``, such as :class:`topoderiv.sites.conv.ConvStatistic`; kernels backend, one process)
    are batched: those that kept their rows go through ONE multi-point
    :func:`topoderiv.ops.sensitivity_topk` call per (route, k, tolerance, warm start or not, bias,
    dtype) (points of one shape in one launch), conv points that kept their images through ONE
    multi-point :func:`topoderiv.ops.conv_sensitivity_topk` call per (route, k, tolerance, warm
    start or not, bias, kernel size, dtype) (at most :data:`ROWS_BATCH_BYTES` of stacked inputs, and
    of dense blocks, per call), those with dense blocks through one grouped
    :func:`topoderiv.ops.lanczos_topk` per (shape, dtype, k, tolerance); the same start vectors,
    tolerances, eigh fallback and results as solving them one by one. Every other statistic is
    solved by its own ``solve``. ``need="top"``: as :meth:`EigenStatistic.solve` (passed to every
    batched call for the rule ``"top"``).
    """
    out: List[Optional[Solution]] = [None] * len(stats)
    rows: Dict[Tuple[Any, ...], List[Tuple[int, EigenPlan, int]]] = {}
    dense: Dict[Tuple[Any, ...], List[Tuple[int, EigenPlan, int]]] = {}
    for i, st in enumerate(stats):
        if not _batchable(st):
            out[i] = st.solve(S, rule, need) if isinstance(st, EigenStatistic) else st.solve(S, rule)
            continue
        k = st.solve_k(rule)
        nd = need if rule == "top" else "all"
        plan = st.plan(S, k, nd)
        if plan.kind in _KEPT:
            rows.setdefault(_kept_key(plan, k, st.bias, nd), []).append((i, plan, k))
        elif plan.kind == "blocks":
            assert plan.blocks is not None
            dense.setdefault((tuple(plan.blocks.shape), plan.blocks.dtype, plan.blocks.device, k, plan.tol, nd),
                             []).append((i, plan, k))
        else:
            out[i] = st.solution(rule, k, *st.finish_other(plan, k, nd))
    for key, all_items in rows.items():
        k, bias, nd = key[2], key[5], key[-1]
        # points of one shape are stacked into one copy by the multi-point call: at most
        # ROWS_BATCH_BYTES of rows (images, and dense conv blocks) per call
        calls: List[List[Tuple[int, EigenPlan, int]]] = [[]]
        held = 0
        for item in all_items:
            size = _kept_bytes(item[1], bias)
            if calls[-1] and held + size > ROWS_BATCH_BYTES:
                calls.append([])
                held = 0
            calls[-1].append(item)
            held += size
        for items in calls:
            res = _solve_kept([pl for _, pl, _ in items], k, bias, nd)
            for (i, pl, kk), r in zip(items, res):
                st = stats[i]
                out[i] = st.solution(rule, kk, *st.finish(pl, r.values, r.vectors, r.converged, r.early, kk))
    for key, all_items in dense.items():
        k, tol, nd = key[3], key[4], key[5]
        first = all_items[0][1].blocks
        assert first is not None
        n = first.shape[0]
        # batching dense points concatenates their blocks (a copy): only up to DENSE_BATCH_BYTES at a
        # time, so that large blocks (n m^2 per point) are solved in place, one point per launch
        per = max(1, int(DENSE_BATCH_BYTES // max(1, first.numel() * first.element_size())))
        for c0 in range(0, len(all_items), per):
            items = all_items[c0:c0 + per]
            a = torch.cat([pl.blocks for _, pl, _ in items]) if len(items) > 1 else items[0][1].blocks
            res = ops.lanczos_topk(a, k, tol=tol, norm_group=max(1, n), need=nd)
            del a
            for j, (i, pl, kk) in enumerate(items):
                st = stats[i]
                sl = slice(j * n, (j + 1) * n)
                out[i] = st.solution(rule, kk, *st.finish(pl, res.values[sl], res.vectors[sl], res.converged[sl],
                                                           res.early[sl], kk))
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# singular-value statistic (standard transformer sub-blocks, METHOD.md section 7)

# elements of the inputs of one accumulation GEMM the features of a site should stay within
SINGULAR_CHUNK_ELEMS = 2 ** 22


@dataclass(frozen=True)
class SingularPart:
    """One sub-block whose eps-scaled parameters are an in-map and an out-map around its units.

    The sub-block's output is, to second order, ``eps^2 c sum_units w_out,k (w_in,k^T zt)`` with
    ``w_in,k`` row ``k`` of ``[W_in | b_in]`` (``m = d + bias``), ``w_out,k`` column ``k`` of
    ``W_out`` (``n`` rows), ``zt = [z; 1]`` the unit's input feature and ``c`` a curvature factor
    (``act'(0)`` of an MLP's hidden activation, 1 for attention). Units come in ``groups`` of
    ``capacity``: unit ``j`` of group ``g`` is row / column ``g * capacity + j``; all units of a
    group see the same ``z`` (the MLP: one group of ``hidden`` units; attention: one group per
    head, ``head_dim`` units each, ``z`` = the head's attention-weighted features).

    Attributes:
        name: label (e.g. ``"mlp"``, ``"attn"``).
        groups: number of groups G. capacity: units per group.
        n: output dim (rows of ``M_g``). d: input features (without the bias column).
        bias: whether ``zt`` has the column of ones (``w_in`` a bias).
        curvature: ``c``.
        in_weight: phi key of ``W_in`` ``[G * capacity, d]``. in_bias: phi key of ``b_in``
            ``[G * capacity]`` (None without bias). out_weight: phi key of ``W_out``
            ``[n, G * capacity]``.
    """

    name: str
    groups: int
    capacity: int
    n: int
    d: int
    bias: bool
    curvature: float
    in_weight: str
    in_bias: Optional[str]
    out_weight: str

    @property
    def m(self) -> int:
        return self.d + int(self.bias)

    @property
    def units(self) -> int:
        return self.groups * self.capacity


# features(x, p) -> iterable of (part index, q, z): q [N, n] or [N, G, n], z [N, d] or [N, G, d]
FeaturesFn = Callable[[Tensor, Tensor], Iterable[Tuple[int, Tensor, Tensor]]]

# Lanczos on the Gram matrices only for this many pairs per group at most (and at most a quarter
# of min(n, m)); otherwise a full SVD
LANCZOS_MAX_PAIRS = 16
# relative residual of those Lanczos solves (float64 Gram matrices)
GRAM_TOL = 1e-12


def singular_pairs(M: Tensor, k: int, lanczos: bool) -> Tuple[Tensor, Tensor, Tensor, str, float]:
    """The top ``k`` singular triplets of every ``M [G, n, m]`` (float64): ``(U [G, n, k], s [G, k],
    Vh [G, k, m], route, rel_floor)``, ``s`` descending (``k`` clipped to ``min(n, m)``).

    ``lanczos`` and few pairs (``k <= LANCZOS_MAX_PAIRS`` and ``k <= min(n, m) / 4``): batched
    Lanczos (:func:`topoderiv.ops.lanczos_topk`, residual ``GRAM_TOL``) on the smaller Gram matrix
    (``M M^T`` or ``M^T M``), groups it does not converge on redone by ``eigh``; the other side's
    vectors and ``s`` then come from one product with ``M`` (``s = ||M^T u||``, not
    ``sqrt(lambda)``, so small values are not squared into noise): route ``"lanczos"``. About 20x
    cheaper than a full SVD at ``384 x 385`` with ``k = 1``. Otherwise :func:`torch.linalg.svd`:
    route ``"svd"``. ``rel_floor`` is the relative accuracy of ``s`` (values below
    ``rel_floor * s_max`` are noise).
    """
    G, n, m = M.shape
    r = min(n, m)
    k = max(1, min(int(k), r))
    if lanczos and k <= LANCZOS_MAX_PAIRS and 4 * k <= r:
        left = n <= m
        gram = M @ M.mT if left else M.mT @ M  # [G, r, r]
        gram = (gram + gram.mT) / 2
        res = ops.lanczos_topk(gram, k, tol=GRAM_TOL, shared_norm=True)
        vecs = res.vectors
        bad = (~res.converged).nonzero().flatten()
        if bad.numel():
            _, v = torch.linalg.eigh(gram[bad])
            vecs = vecs.clone()
            vecs[bad] = v.flip(-1)[..., :k]
        if left:
            W = M.mT @ vecs  # [G, m, k]: M^T u = s v
            s = W.norm(dim=-2)
            U, V = vecs, W / torch.where(s > 0, s, torch.ones_like(s))[:, None, :]
        else:
            W = M @ vecs  # [G, n, k]: M v = s u
            s = W.norm(dim=-2)
            V, U = vecs, W / torch.where(s > 0, s, torch.ones_like(s))[:, None, :]
        s, order = s.sort(dim=-1, descending=True)
        U = torch.gather(U, -1, order[:, None, :].expand_as(U))
        V = torch.gather(V, -1, order[:, None, :].expand_as(V))
        return U, s, V.mT, "lanczos", max(GRAM_TOL, max(n, m) * torch.finfo(torch.float64).eps) * 10
    U, s, Vh = torch.linalg.svd(M, full_matrices=False)  # [G, n, r], [G, r], [G, r, m]
    return U[..., :k], s[:, :k], Vh[:, :k], "svd", max(n, m) * torch.finfo(torch.float64).eps


class SingularStatistic:
    """``M_g = sum_rows q_g zt_g^T`` (``zt = [z; 1]``) per group of every part, accumulated, then an SVD.

    For a part with curvature ``c`` every unit of group ``g`` has the ``Q`` block
    ``c [[0, M_g^T], [M_g, 0]]`` (in ``(w_in, w_out)`` coordinates): eigenvalues ``+-|c| s_{g,i}``,
    eigenvectors ``(v_i, sign(c) u_i) / sqrt(2)`` for ``M_g v_i = s_i u_i``. So
    ``mu = max_g |c_g| s_max(M_g)`` and ``phi`` places singular pairs in units
    (:func:`topoderiv.method.rules.singular_rule`).

    Args:
        parts: the sub-blocks (:class:`SingularPart`); groups are numbered across parts in order
            (part 0's groups first).
        features: ``features(x, p)`` yields ``(part index, q, z)`` in chunks: ``q [N, n]`` with
            ``z [N, G, d]`` (every group its own features, one costate) or ``q [N, G, n]`` with
            ``z [N, d]`` (one feature, costates per group), or both 2-D when ``G = 1``. Rows are
            samples x tokens. The bias column is appended here.
        k: singular values reported per group (``values``).
        backend: ``"kernels"``: rule ``"top"`` with few values takes the top pairs by Lanczos
            (:func:`singular_pairs`); ``"torch"``: always a full SVD.

    The ``M_g`` are accumulated in float32 (float64 for float64 inputs) and solved in float64
    (:func:`singular_pairs`: :func:`torch.linalg.svd`, or Lanczos on the Gram matrices for the
    rule ``"top"``). Memory: ``sum_parts G n m`` whatever the data; nothing is kept, so
    ``held_bytes`` is 0 and :meth:`flush` does nothing. Under a process group the ``M_g`` of every
    part are all-reduced together, once (:meth:`synchronise`).
    """

    def __init__(self, parts: Sequence[SingularPart], features: FeaturesFn, *, k: int = 1,
                 backend: str = "torch") -> None:
        if not parts:
            raise ValueError("SingularStatistic: parts must hold at least one SingularPart, got none")
        self.parts = list(parts)
        self.features = features
        self.k = int(k)
        self.backend = backend
        self.bias = any(pt.bias for pt in self.parts)
        self.M: List[Optional[Tensor]] = [None] * len(self.parts)
        self.held_bytes = 0
        self.dtype: Optional[torch.dtype] = None  # what M accumulates in

    def summary(self) -> List[float]:
        """``[0, 1 if any M, one-hot of M's dtype (bfloat16, float32, float64)]`` (see
        :meth:`EigenStatistic.summary`)."""
        code = dtype_code(self.dtype)
        return [0.0, float(self.dtype is not None)] + [float(code == c) for c in (1, 2, 3)]

    def synchronise(self, comm: Comm, total: Sequence[float], k: int, device: Optional[torch.device]) -> str:
        """All-reduces every part's ``M_g`` in ONE collective (zeros on a rank without rows); returns
        ``"svd"``-or-Lanczos' common label ``"reduced"``."""
        dt = _agreed_dtype(total[2:5], "the sub-block statistics")
        for i, part in enumerate(self.parts):
            if self.M[i] is None:
                self.M[i] = torch.zeros(part.groups, part.n, part.m, dtype=dt, device=device)
        for i, t in enumerate(comm.all_reduce(self.M, "singular")):  # type: ignore[arg-type]
            self.M[i] = t
        self.dtype = dt
        return "reduced"

    def flush(self) -> None:
        """Nothing to do: the statistic is always accumulated."""

    def add(self, x: Tensor, p: Tensor) -> None:
        """Adds one batch: stream states ``x`` and costates ``p`` (carrying ``B_b``) at the site."""
        for i, q, z in self.features(x, p):
            part = self.parts[i]
            dt = torch.float64 if z.dtype == torch.float64 else torch.float32
            q, z = q.to(dt), z.to(dt)
            N, G, n, d = z.shape[0], part.groups, part.n, part.d
            if part.bias:
                z = torch.cat([z, z.new_ones(z.shape[:-1] + (1,))], dim=-1)
            m = part.m
            if q.dim() == 3 and z.dim() == 2:  # per-group costates, one feature: one GEMM [G n, N] x [N, m]
                contrib = (q.reshape(N, G * n).mT @ z).reshape(G, n, m)
            elif q.dim() == 2 and z.dim() == 3:  # one costate, per-group features: [n, N] x [N, G m]
                contrib = (q.mT @ z.reshape(N, G * m)).reshape(n, G, m).transpose(0, 1)
            elif q.dim() == 2 and z.dim() == 2 and G == 1:
                contrib = (q.mT @ z)[None]
            else:
                raise ValueError(f"SingularStatistic.add: part {part.name!r} got q {list(q.shape)} and z "
                                 f"{list(z.shape)}; expected [N, n] with [N, G, d], [N, G, n] with [N, d], or both 2-D "
                                 f"for G = 1 (G = {G}, n = {n}, d = {d})")
            if tuple(contrib.shape) != (G, n, m):
                raise ValueError(f"SingularStatistic.add: part {part.name!r} expects M of shape {[G, n, m]}, the "
                                 f"features give {list(contrib.shape)}")
            if self.M[i] is None:
                self.M[i] = contrib.clone() if contrib.dtype == dt else contrib.to(dt)
            else:
                self.M[i].add_(contrib)
            self.dtype = dt

    def matrices(self, S: int) -> List[Tensor]:
        """``M_g / S`` of every part, float64: ``[G, n, m]`` each (zeros where no row was added)."""
        out = []
        for part, M in zip(self.parts, self.M):
            if M is None:
                raise ValueError(f"SingularStatistic: no rows were added to part {part.name!r}")
            out.append(M.to(torch.float64) / S)
        return out

    def solve(self, S: int, rule: str) -> Solution:
        """SVD of every ``M_g / S``, then ``phi`` by ``rule`` (:func:`topoderiv.method.rules.singular_rule`).

        ``phi`` is a dict ``{key: tensor}`` over every part's three keys (unit total Frobenius
        norm); ``block`` is the global group index of the top value; ``block_mu [G_total]`` and
        ``values [G_total, k]`` are ``|c_g| s_{g,i}`` (loss units).
        """
        mats = self.matrices(S)
        dev = mats[0].device
        dtype = self.M[0].dtype  # type: ignore[union-attr]
        vecs: List[Tuple[Tensor, Tensor]] = []
        values: List[Tensor] = []
        capacity: List[int] = []
        owner: List[Tuple[int, int]] = []
        routes = set()
        for i, (part, M) in enumerate(zip(self.parts, mats)):
            # "top" needs the top pair of each group (and k values); the other rules up to capacity
            need = max(self.k, 1) if rule == "top" else min(part.m, part.n)
            U, sv, Vh, route, floor = singular_pairs(M, need, self.backend == "kernels" and rule == "top")
            routes.add(route)
            # numerical rank (as torch.linalg.matrix_rank, at the accumulation precision): the
            # rest is rounding noise (e.g. the costates of a stream read only through LayerNorms
            # are orthogonal to the ones vector, so M has rank <= n - 1), with arbitrary vectors
            tol = sv[:, :1] * max(floor, max(part.n, part.m) * torch.finfo(dtype).eps)
            sv = torch.where(sv > tol, sv, torch.zeros_like(sv))
            # canonical sign of each pair: the largest-magnitude entry of v positive
            idx = Vh.abs().argmax(dim=-1, keepdim=True)
            sgn = torch.sign(torch.gather(Vh, -1, idx))
            sgn = torch.where(sgn == 0, torch.ones_like(sgn), sgn)
            Vh = Vh * sgn
            U = U * sgn.transpose(-1, -2)
            for g in range(part.groups):
                vecs.append((U[g], Vh[g]))
                values.append(abs(part.curvature) * sv[g])
                capacity.append(part.capacity)
                owner.append((i, g))
        sel = singular_rule(values, capacity, rule)
        phi: Dict[str, Tensor] = {}
        for part in self.parts:
            phi[part.in_weight] = torch.zeros(part.units, part.d, dtype=torch.float64, device=dev)
            if part.in_bias is not None:
                phi[part.in_bias] = torch.zeros(part.units, dtype=torch.float64, device=dev)
            phi[part.out_weight] = torch.zeros(part.n, part.units, dtype=torch.float64, device=dev)
        r2 = 1.0 / math.sqrt(2.0)
        for gg, j, w in sel.pairs:
            i, g = owner[gg]
            part = self.parts[i]
            U, Vh = vecs[gg]
            unit = g * part.capacity + j
            sign = 1.0 if part.curvature >= 0 else -1.0
            a, b = Vh[j] * (w * r2), U[:, j] * (w * r2 * sign)
            phi[part.in_weight][unit] += a[: part.d]
            if part.in_bias is not None:
                phi[part.in_bias][unit] += a[part.d]
            phi[part.out_weight][:, unit] += b
        phi = {key: t.to(dtype) for key, t in phi.items()}
        kk = max(1, min([self.k] + [v.numel() for v in values]))
        vals = torch.stack([v[:kk] for v in values]).to(dtype)
        return Solution(mu=float(values[sel.block][0]), block=sel.block, phi=phi, block_mu=vals[:, 0].clone(),
                        values=vals, quotient=sel.quotient, score=sel.score, n_pairs=sel.n_pairs, converged=True,
                        route="svd" if "svd" in routes else "lanczos")
