"""Topological derivative of every candidate point (METHOD.md section 3).

For candidate point l, with the new block's input feature ``u = feature(x)`` and costates ``p``:

    B_{l,r} = sum_s p_{s,r} xt_s xt_s^T,   xt = [u; 1],   Q_l = sigma''(0) blockdiag_r B_{l,r}
    mu_l = lambda_max(Q_l)    (algebraic; = sigma''(0) min_r lambda_min(B_{l,r}) if sigma''(0) < 0)
    J(eps) - J(0) = -(eps^2 / 2) phi^T Q_l phi + O(eps^3)

:func:`score` streams the data: one forward + backward per batch (:func:`topoderiv.capture.capture`),
the blocks accumulated with :func:`topoderiv.ops.sensitivity_blocks` (``out=`` accumulation, memory
``n m^2`` per point whatever the number of batches), then batched Lanczos. A single batch goes
through :func:`topoderiv.ops.sensitivity_topk`, which may take the matrix-free route.

Costate scaling over batches: batch b's costates are captured as ``-B_b dJ_b/dx`` and the
accumulated blocks are divided by the total sample count ``S`` at the end, which is exactly
``p = -dJ/dx`` of the mean loss over all samples (blocks are linear in ``p``) without knowing ``S``
in advance.

Rules for ``phi`` (:data:`RULES`): ``"top"`` (the top eigenvector of ``Q_l``: one non-zero row
``r*``), ``"multi"`` (the reference code: the eigenpairs within 50% of the top one, at least two)
and ``"all"`` (every row ``r`` on its own block's top eigenvector, weight ``sqrt(max(mu_r, 0))``).
Dead rows: the admissible activations have ``sigma'(0) = 0``, so a row of ``[W | b]`` that starts
at exactly zero gets exactly zero gradient, forever; with ``"top"`` the inserted block is in
effect ONE neuron wide whatever its width. ``"all"`` starts every row with ``mu_r > 0`` non-zero.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from . import ops, reference
from .activations import check_admissible
from .capture import _check_points, capture
from .models import check_growable
from .training import _device_of, batch_size, is_batch, iter_batches, train_mode

__all__ = ["PointScore", "ScoreReport", "score", "resolve_backend", "block_parts", "subspace_start", "RULES"]

RULES = ("top", "multi", "all")
_ROUTES = ("auto", "dense", "matfree")
_BACKENDS = ("auto", "kernels", "torch")
# default bytes of features + costates (all points) that route "auto" may keep resident
_COLLECT_BUDGET = 2**30


def kernels_available() -> bool:
    """True when the compiled extension ``topoderiv._C`` imports."""
    try:
        from ._lib import lib

        lib()
        return True
    except ImportError:
        return False


def resolve_backend(backend: str, device: Optional[torch.device], fn: str = "score") -> str:
    """``"kernels"`` or ``"torch"``: ``"auto"`` takes the kernels when built for ``device``."""
    if backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if not kernels_available():
        return "torch"
    if device is not None and device.type == "cuda" and not ops.has_cuda_kernels():
        return "torch"
    if device is not None and device.type not in ("cpu", "cuda"):
        return "torch"
    return "kernels"


def block_parts(block: nn.Module, fn: str) -> Tuple[nn.Linear, nn.Module, nn.Module]:
    """``(linear, activation, feature)`` of a ResidualBlock-compatible block, or TypeError."""
    linear = getattr(block, "linear", None)
    act = getattr(block, "activation", None)
    feature = getattr(block, "feature", None) or nn.Identity()
    if not isinstance(linear, nn.Linear) or act is None:
        raise TypeError(
            f"{fn}: new_block(point) must return a ResidualBlock-compatible block (x + activation(linear("
            f"feature(x))) with .linear an nn.Linear and .activation), got {type(block).__name__}"
        )
    return linear, act, feature


@dataclass
class PointScore:
    """The topological derivative of one candidate point.

    Attributes:
        point: candidate point index.
        mu: topological derivative ``lambda_max(Q_l)`` in loss units (``sigma''(0)`` included).
        block: ``r*``, the output unit (row of ``[W | b]``) holding the top eigenvector.
        phi: ``[n, m]`` initialisation direction, unit Frobenius norm (``m = in_features + bias``);
            rule ``"top"``: row ``r*`` is the top eigenvector, other rows zero; rule ``"all"``:
            row ``r`` is ``B_r``'s top eigenvector times ``sqrt(max(block_mu[r], 0))``, normalised.
        block_mu: ``[n]`` per block ``r``: ``sigma''(0) * lambda_max(B_r)`` (or the min when
            ``sigma''(0) < 0``), in loss units. ``mu = block_mu.max()``.
        values: ``[n, k]`` the top-k of each block in the same units.
        quotient: ``phi^T Q phi``: the second-order gain of ``phi`` (``= mu`` for rule ``"top"``;
            ``sum_r mu_r^2 / sum_r mu_r`` over the rows with ``mu_r > 0`` for rule ``"all"``).
        sigma2: ``sigma''(0)`` of the new block's activation.
        bias: whether ``phi`` has a bias column.
        converged: every block's eigen-solve met its tolerance (Lanczos blocks that did not are
            redone with a full eigh when affordable; False only when that was skipped).
        route: ``"dense"``, ``"matfree"`` or ``"eigh"`` (torch backend).
    """

    point: int
    mu: float
    block: int
    phi: Tensor
    block_mu: Tensor
    values: Tensor
    quotient: float
    sigma2: float
    bias: bool
    converged: bool = True
    route: str = "dense"

    @property
    def eigenvalues(self) -> Tensor:
        """Alias of :attr:`block_mu`."""
        return self.block_mu

    @property
    def weight(self) -> Tensor:
        """``W`` part of ``phi``: ``[n, in_features]``."""
        return self.phi[:, : self.phi.shape[1] - int(self.bias)]

    @property
    def bias_vector(self) -> Optional[Tensor]:
        """``b`` part of ``phi``: ``[n]`` (None without bias)."""
        return self.phi[:, -1] if self.bias else None

    def predicted_change(self, eps: float) -> float:
        """Second-order prediction of ``J(eps) - J(0)``: ``-(eps^2 / 2) * phi^T Q phi``."""
        return -(eps ** 2 / 2.0) * self.quotient


@dataclass
class ScoreReport:
    """Scores of the candidate points.

    Attributes:
        points: one :class:`PointScore` per scored point, in point order.
        loss: ``J`` at the current parameters (mean over all scored samples).
        n_samples: number of samples ``S``. n_batches: number of batches.
        rule, backend: as used. wall_time: seconds.
    """

    points: List[PointScore]
    loss: float
    n_samples: int
    n_batches: int
    rule: str = "top"
    backend: str = "torch"
    wall_time: float = 0.0

    @property
    def best(self) -> Optional[PointScore]:
        """The point with the largest ``mu``, or None when every ``mu <= 0``."""
        cands = [p for p in self.points if p.mu > 0 and math.isfinite(p.mu)]
        return max(cands, key=lambda p: p.mu) if cands else None

    @property
    def mu(self) -> Dict[int, float]:
        """``{point: mu}``."""
        return {p.point: p.mu for p in self.points}

    def ranked(self) -> List[PointScore]:
        """Points with ``mu > 0``, largest first."""
        return sorted((p for p in self.points if p.mu > 0), key=lambda p: -p.mu)

    def table(self) -> str:
        """A plain-text table: point, mu, r*, predicted change at eps = 1, convergence."""
        best = self.best
        lines = [f"J = {self.loss:.6g} over {self.n_samples} samples ({self.n_batches} batches), "
                 f"rule={self.rule}, backend={self.backend}",
                 f"{'point':>5}  {'mu':>12}  {'r*':>4}  {'dJ(eps=1)':>12}  {'conv':>4}"]
        for p in self.points:
            mark = "  <- best" if best is not None and p.point == best.point else ""
            lines.append(f"{p.point:>5}  {p.mu:>12.5g}  {p.block:>4}  {p.predicted_change(1.0):>12.4g}  "
                         f"{'yes' if p.converged else 'no':>4}{mark}")
        if best is None:
            lines.append("no point has mu > 0: no insertion lowers J at second order")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary (without phi)."""
        return {"loss": self.loss, "n_samples": self.n_samples, "n_batches": self.n_batches, "rule": self.rule,
                "backend": self.backend, "wall_time": self.wall_time,
                "mu": {str(p.point): p.mu for p in self.points},
                "block": {str(p.point): p.block for p in self.points}}


class _PointAcc:
    """Per-point accumulator: collected ``(u, q)`` batches and/or streamed dense blocks."""

    def __init__(self, feature: nn.Module, bias: bool, sign: float) -> None:
        self.feature, self.bias, self.sign = feature, bias, sign
        self.blocks: Optional[Tensor] = None
        self.us: List[Tensor] = []
        self.qs: List[Tensor] = []

    def flush(self, backend: str) -> None:
        """Moves the collected batches into the dense blocks."""
        for u, q in zip(self.us, self.qs):
            _accumulate(self, u, q, backend)
        self.us, self.qs = [], []


def _accumulate(acc: _PointAcc, u: Tensor, q: Tensor, backend: str) -> None:
    if backend == "kernels":
        if acc.blocks is None:
            acc.blocks = ops.sensitivity_blocks(u, q, bias=acc.bias)
        else:
            ops.sensitivity_blocks(u, q, bias=acc.bias, out=acc.blocks)
    else:
        b = reference.sensitivity_blocks(u, q, bias=acc.bias)
        acc.blocks = b if acc.blocks is None else acc.blocks.add_(b)


def _canonical_sign(vectors: Tensor) -> Tensor:
    """Flips each eigenvector ``[..., m, k]`` so its largest-magnitude entry is positive."""
    idx = vectors.abs().argmax(dim=-2, keepdim=True)
    s = torch.sign(torch.gather(vectors, -2, idx))
    s = torch.where(s == 0, torch.ones_like(s), s)
    return vectors * s


# flops budget (m^3 per block) for redoing unconverged Lanczos blocks with a full eigh
_EIGH_FALLBACK_FLOPS = 4e9


def _fallback(values: Tensor, vectors: Tensor, converged: Tensor, k: int,
              blocks_of: Callable[[Tensor], Tensor]) -> Tuple[Tensor, Tensor, bool]:
    """Redoes the blocks whose Lanczos solve did not converge with a full ``eigh`` (within a budget)."""
    bad = (~converged).nonzero().flatten()
    if bad.numel() == 0:
        return values, vectors, True
    m = vectors.shape[1]
    if bad.numel() * float(m) ** 3 > _EIGH_FALLBACK_FLOPS:
        return values, vectors, False
    vals, vecs = reference.eigh_topk(blocks_of(bad), k)
    values, vectors = values.clone(), vectors.clone()
    values[bad] = vals.to(values.dtype)
    vectors[bad] = vecs.to(vectors.dtype)
    return values, vectors, True


# rank of the shared activation subspace that warm-starts matrix-free solves, and the least m
# for which it pays (measured: at m = 65 warm-started scoring is 7-11% faster than cold)
_WARM_RANK = 32
_WARM_MIN_M = 2 * _WARM_RANK


def subspace_start(u: Tensor, q: Tensor, bias: bool, rank: int = _WARM_RANK) -> Tensor:
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


def _solve(acc: _PointAcc, S: int, k: int, route: str, backend: str, tol: Optional[float] = None
           ) -> Tuple[Tensor, Tensor, bool, str]:
    """Top-k eigenpairs of the blocks of ``sign * B / S``: ``(values [n, k], vectors [n, m, k], conv, route)``.

    Kernels: Lanczos (dense or matrix-free; matrix-free solves start from :func:`subspace_start`);
    blocks it did not converge on are redone with a full eigh when that is affordable. Torch
    backend: dense blocks + eigh.
    """
    ref_t = acc.blocks if acc.blocks is not None else acc.us[0]
    fp64 = ref_t.dtype == torch.float64
    if acc.blocks is None:  # everything collected: the kernels pick the route with the real S
        u = acc.us[0] if len(acc.us) == 1 else torch.cat(acc.us, dim=0)
        q = (acc.qs[0] if len(acc.qs) == 1 else torch.cat(acc.qs, dim=0)) / S
        if backend == "kernels":
            d = u.shape[-1]
            m = d + int(acc.bias)
            if route == "auto":  # rows = samples (x tokens)
                route = ops.choose_route(u.numel() // max(d, 1), d, q.shape[-1], bias=acc.bias, k=k,
                                         itemsize=8 if fp64 else 4)
            v0 = None
            if route == "matfree" and k == 1 and m >= _WARM_MIN_M:
                v0 = subspace_start(u, q, acc.bias)
            if tol is None:
                # warm-started fp32 solves stop at 1e-3 * ||Q||: their eigenvalues are then as
                # accurate as cold solves at 1e-4 (benchmarks/RESULTS.md)
                tol = 1e-10 if fp64 else (1e-3 if v0 is not None else 1e-4)
            res = ops.sensitivity_topk(u, q, k=k, bias=acc.bias, route=route, tol=tol, v0=v0)
            vals, vecs, conv = _fallback(res.values, res.vectors, res.converged, k,
                                         lambda idx: ops.sensitivity_blocks(u, q[..., idx], bias=acc.bias))
            return vals, vecs, conv, res.route
        vals, vecs = reference.eigh_topk(reference.sensitivity_blocks(u, q, bias=acc.bias), k)
        return vals, vecs, True, "eigh"
    if tol is None:
        tol = 1e-10 if fp64 else 1e-4
    blocks = acc.blocks / S
    if backend == "kernels":
        res = ops.lanczos_topk(blocks, k, tol=tol, shared_norm=True)
        vals, vecs, conv = _fallback(res.values, res.vectors, res.converged, k, lambda idx: blocks[idx])
        return vals, vecs, conv, "dense"
    vals, vecs = reference.eigh_topk(blocks, k)
    return vals, vecs, True, "eigh"


def _make_phi(values: Tensor, vectors: Tensor, rule: str) -> Tuple[Tensor, int, float]:
    """phi ``[n, m]`` (unit Frobenius norm), ``r*`` and the Rayleigh quotient / |sigma''| of phi.

    ``values [n, k]`` are eigenvalues of ``sign * B_r`` (descending), ``vectors [n, m, k]``.

    - ``"top"``: ``phi = v_{r*} e_{r*}^T``, the top eigenvector of ``Q``; quotient ``lambda_{r*}``.
      Only row ``r*`` is non-zero: since ``sigma'(0) = 0`` the other rows get zero gradient and
      stay zero in training ("dead rows"), so the new block is in effect one neuron wide.
    - ``"multi"``: the reference code (see below).
    - ``"all"``: ``phi = sum_r c_r v_r e_r^T / ||c||`` with ``v_r`` the top eigenvector of block
      ``r`` and ``c_r = sqrt(max(lambda_r, 0))``: every row with ``lambda_r > 0`` starts non-zero.
      The blocks are disjoint, so ``phi^T Q phi = sum_r ||phi_r||^2 lambda_r`` exactly
      (``= sum_r lambda_r^2 / sum_r lambda_r`` over ``lambda_r > 0``): positive, at most
      ``lambda_{r*}``, at least the mean of the positive ``lambda_r``. Rows with ``lambda_r <= 0``
      stay zero (adding them would lower the gain).

    When no block has ``lambda > 0`` every rule returns the ``"top"`` phi (``mu <= 0``: nothing
    is inserted anyway).
    """
    n, m, k = vectors.shape
    top = values[:, 0]
    r_star = int(top.argmax())
    phi = torch.zeros(n, m, dtype=vectors.dtype, device=vectors.device)
    if rule == "top" or float(top[r_star]) <= 0 or (rule == "multi" and n * k < 2):
        phi[r_star] = vectors[r_star, :, 0]
        return phi, r_star, float(top[r_star])
    if rule == "all":
        c = top.clamp_min(0).sqrt()
        phi = c[:, None].to(vectors.dtype) * vectors[:, :, 0]
        phi = phi / phi.norm()
        # rows are eigenvectors of disjoint blocks: phi^T Q phi = sum_r ||phi_r||^2 lambda_r / ||phi||^2
        w2 = phi.pow(2).sum(dim=1).to(top.dtype)
        return phi, r_star, float((w2 * top).sum() / w2.sum())
    # reference-code rule: every eigenpair within 50% of the top one, at least two, summed, normalised
    flat = values.reshape(-1)
    order = torch.argsort(flat, descending=True)
    lam_top = float(flat[order[0]])
    chosen = [int(i) for i in order if float(flat[i]) >= 0.5 * lam_top]
    if len(chosen) < 2:
        chosen = [int(order[0]), int(order[1])]
    for i in chosen:
        r, j = divmod(i, k)
        phi[r] += vectors[r, :, j]
    phi = phi / phi.norm()
    # eigenvectors of one block are orthonormal and blocks are disjoint: quotient = mean of values
    quotient = sum(float(flat[i]) for i in chosen) / len(chosen)
    return phi, r_star, quotient


def score(model: nn.Module, data: Any, loss_fn: Callable[[Tensor, Any], Tensor], *,
          points: Optional[Sequence[int]] = None, k: int = 1, rule: str = "top", route: str = "auto",
          backend: str = "auto", progress: bool = False, training: Optional[bool] = False,
          max_batches: Optional[int] = None, memory_budget: float = _COLLECT_BUDGET,
          tol: Optional[float] = None) -> ScoreReport:
    """Topological derivative ``mu`` and initialisation ``phi`` at every candidate point.

    Args:
        model: a growable model (see :mod:`topoderiv.models`).
        data: one ``(x, y)`` batch or an iterable of batches (one pass, streamed).
        loss_fn: ``loss_fn(model(x), y) -> scalar`` batch MEAN; ``J`` is the mean over all samples.
        points: candidate points to score (default all).
        k: eigenpairs per block (``k > 1`` only matters for rule ``"multi"``).
        rule: ``"top"`` (phi = top eigenvector, one non-zero row), ``"multi"`` (the reference
            code: all eigenpairs within 50% of the top one, at least two, summed and normalised)
            or ``"all"`` (every row on its own block's top eigenvector weighted by
            ``sqrt(max(mu_r, 0))``, normalised: no dead rows; see :func:`_make_phi`). With
            ``sigma'(0) = 0`` a row that starts at zero never trains, so ``"top"`` inserts a
            single live neuron; ``"all"`` keeps every row with ``mu_r > 0`` alive at the price of
            a smaller gain ``phi^T Q phi <= mu`` (reported as ``quotient``).
        route: ``"auto"``, ``"dense"`` or ``"matfree"`` (kernels backend). ``"dense"`` streams the
            blocks batch by batch (memory ``n m^2`` per point, whatever the data size).
            ``"matfree"`` keeps every batch's features and costates (memory grows with the data).
            ``"auto"`` keeps them while they fit in ``memory_budget``, then lets
            :func:`topoderiv.ops.choose_route` pick with the real sample count; past the budget it
            switches to streaming dense blocks.
        memory_budget: bytes of features + costates (all points) that ``"auto"`` may keep.
        backend: ``"kernels"`` (topoderiv.ops), ``"torch"`` (topoderiv.reference + eigh) or
            ``"auto"`` (kernels when the extension is built for the device).
        progress: tqdm bar over batches.
        training: mode during the pass (``False`` = eval, default; ``None`` keeps the current mode).
            The model's modes are restored afterwards.
        max_batches: use at most this many batches of ``data``.
        tol: relative residual tolerance of the eigen-solves (kernels backend); default 1e-4 for
            float32/bfloat16 models (1e-3 for the matrix-free solves that start from
            :func:`subspace_start`: ``k = 1`` and ``m >= 64``) and 1e-10 for float64 ones. A residual ``r`` gives eigenvalue
            errors ~ ``r^2 / gap`` and eigenvector angles ~ ``r / gap``: these are far below what
            the choice of point and the eps search can resolve.

    Returns:
        :class:`ScoreReport`; ``report.best`` is the point to insert at (None if every mu <= 0).

    Raises:
        TypeError: model without candidate points, bad data, new block not ResidualBlock-compatible.
        ValueError: inadmissible activation of the new block, non-scalar or non-finite loss, NaN/Inf
            data, bad rule/route/backend/k/points, empty data.
    """
    fn = "score"
    t0 = time.perf_counter()
    check_growable(model, fn)
    pts = _check_points(fn, model, points)
    if rule not in RULES:
        raise ValueError(f"{fn}: rule must be one of {RULES}, got {rule!r}")
    if route not in _ROUTES:
        raise ValueError(f"{fn}: route must be one of {_ROUTES}, got {route!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{fn}: k must be an int >= 1, got {k!r}")
    if not callable(loss_fn):
        raise TypeError(f"{fn}: loss_fn must be callable, got {type(loss_fn).__name__}")
    device = _device_of(model)
    be = resolve_backend(backend, device, fn)

    accs: Dict[int, _PointAcc] = {}
    sigma2: Dict[int, float] = {}
    dims: Dict[int, Tuple[int, int]] = {}
    for p in pts:
        nb = model.new_block(p)
        linear, act, feature = block_parts(nb, fn)
        try:
            s2 = check_admissible(act)
        except ValueError as err:
            raise ValueError(f"{fn}: the block new_block({p}) of {type(model).__name__} would insert: {err}") from None
        sigma2[p] = s2
        bias = linear.bias is not None
        dims[p] = (linear.out_features, linear.in_features + int(bias))
        accs[p] = _PointAcc(feature, bias, 1.0 if s2 > 0 else -1.0)
    for p in pts:
        if dims[p][0] == 0:
            raise ValueError(f"{fn}: new_block({p}) has no output units")
    # kernels: "dense" streams blocks from the first batch; the torch backend always streams blocks
    collecting = be == "kernels" and route != "dense"
    held = 0  # bytes of collected features + costates
    total_loss = 0.0
    S = 0
    n_batches = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="score", unit="batch", leave=False, total=None if not is_batch(data) else 1)
    try:
        with train_mode(model, training):
            for batch in iter_batches(data, fn, device=device, check_finite=True, limit=max_batches):
                B = batch_size(batch[0])
                if B == 0:
                    continue
                cap = capture(model, batch, loss_fn, points=pts, scale=float(B), fn=fn)
                total_loss += cap.loss * B
                S += B
                n_batches += 1
                for p in pts:
                    acc = accs[p]
                    with torch.no_grad():
                        u = acc.feature(cap.states[p])
                    linear_in = dims[p][1] - int(acc.bias)
                    if u.shape[-1] != linear_in:
                        raise ValueError(
                            f"{fn}: new_block({p}).feature gives {u.shape[-1]} features but its linear layer "
                            f"expects {linear_in}"
                        )
                    q = cap.costates[p] * acc.sign if acc.sign < 0 else cap.costates[p]
                    q = q.to(u.dtype)
                    if collecting:
                        acc.us.append(u)
                        acc.qs.append(q)
                        held += (u.numel() + q.numel()) * u.element_size()
                    else:
                        _accumulate(acc, u, q, be)
                if collecting and route == "auto" and held > memory_budget:
                    for acc in accs.values():  # too much data to keep: stream dense blocks from now on
                        acc.flush(be)
                    collecting, held = False, 0
                del cap
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if S == 0:
        raise ValueError(f"{fn}: data must hold at least one non-empty (x, y) batch, got none")

    results: List[PointScore] = []
    for p in pts:
        acc = accs[p]
        vals, vecs, conv, used = _solve(acc, S, k, route, be, tol)
        vecs = _canonical_sign(vecs)
        phi, r_star, quotient = _make_phi(vals, vecs, rule)
        scale = abs(sigma2[p])
        block_vals = vals * scale
        results.append(PointScore(
            point=p, mu=float(block_vals[r_star, 0]), block=r_star, phi=phi, block_mu=block_vals[:, 0].clone(),
            values=block_vals, quotient=quotient * scale, sigma2=sigma2[p], bias=acc.bias, converged=conv,
            route=used,
        ))
    return ScoreReport(results, total_loss / S, S, n_batches, rule, be, time.perf_counter() - t0)
