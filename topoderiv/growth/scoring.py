"""Topological derivative of every candidate point (METHOD.md sections 3 and 7).

For each site the new block's eps-scaled parameters ``theta_e`` give
``J(eps) - J(0) = -(eps^2 / 2) phi^T Q phi + O(eps^3)``; ``mu = lambda_max(Q)``. For the paper's
blocks (``linear``, ``tokens``, ``conv`` sites), with ``u = feature(x)`` and costates ``p``:

    B_{l,r} = sum_rows p_r xt xt^T,   xt = [u; 1],   Q_l = sigma''(0) blockdiag_r B_{l,r}

and for the transformer sub-blocks ``mu = |sigma'(0)| s_max(sum p u^T)`` (METHOD.md section 7).

:func:`score` streams the data: one forward + backward per batch (states and costates at every
site, :func:`topoderiv.sites.capture.capture`), each site's statistic accumulated
(:mod:`topoderiv.method.statistic`: dense blocks with ``out=`` accumulation, or rows kept for a
matrix-free solve within ``memory_budget``), then solved; ``phi`` by the rule
(:mod:`topoderiv.method.rules`).

Data parallel: under a process group (torch.distributed initialised, or ``group=``) every rank
streams its own shard and every rank gets the report of one process scoring the union of the
shards (:mod:`topoderiv.method.distributed`).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..data import batch_size, device_of, is_batch, iter_batches, train_mode
from ..method.distributed import communicator
from ..method.rules import RULES
from ..method.statistic import ROUTES, resolve_backend, solve_points
from ..sites import check_growable, check_points
from ..sites.capture import capture

__all__ = ["PointScore", "ScoreReport", "score", "RULES", "DEFAULT_MEMORY_BUDGET"]

#: default bytes of rows (features + costates, all points) that route "auto" may keep for
#: matrix-free solves, counting the one concatenated copy made to solve them
DEFAULT_MEMORY_BUDGET = 2**30


@dataclass
class PointScore:
    """The topological derivative of one candidate point.

    Attributes:
        point: candidate point index (global site number). name: the site's name
            (``"<container>.<index>"``). kind: the site kind.
        mu: topological derivative ``lambda_max(Q_l)`` in loss units (``sigma''(0)`` included).
        block: ``r*``, the output unit (row of ``[W | b]``) holding the top eigenvector.
        phi: initialisation direction, unit norm. For the paper's blocks ``[n, m]``
            (``m = in_features + bias``): rule ``"top"``: row ``r*`` is the top eigenvector,
            other rows zero; rule ``"all"``: row ``r`` is ``B_r``'s top eigenvector times
            ``sqrt(max(block_mu[r], 0))``, normalised. For sub-blocks: a dict, see the kind.
        block_mu: ``[n]`` per block ``r``: ``sigma''(0) * lambda_max(B_r)`` (or the min when
            ``sigma''(0) < 0``), in loss units. ``mu = block_mu.max()``.
        values: ``[n, k]`` the top-k of each block in the same units.
        quotient: ``phi^T Q phi``: the second-order gain of ``phi`` (``= mu`` for rule ``"top"``;
            ``sum_r mu_r^2 / sum_r mu_r`` over the rows with ``mu_r > 0`` for rule ``"all"``).
        sigma2: the curvature factor: ``sigma''(0)`` of the new block's activation for the
            paper's blocks (``sigma'(0)`` of the hidden activation for sub-blocks).
        score: what the rule ranks points by (``mu``, or the summed eigenvalues for rule
            ``"reference"``). n_pairs: eigenpairs combined into ``phi``.
        bias: whether ``phi`` has a bias column.
        converged: every block's eigen-solve met its tolerance (Lanczos blocks that did not are
            redone with a full eigh when affordable; False only when that was skipped).
        route: ``"dense"``, ``"matfree"`` or ``"eigh"`` (torch backend).
        bounds: ``[n]`` bool or None: with ``score(..., need="top")`` the blocks whose solve stopped
            early because they cannot hold ``mu``: their ``block_mu`` / ``values`` are lower bounds,
            not eigenvalues (None: every value is a converged eigenvalue).
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
    name: str = ""
    kind: str = "linear"
    score: float = math.nan
    n_pairs: int = 1
    bounds: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if math.isnan(self.score):
            self.score = self.mu

    @property
    def eigenvalues(self) -> Tensor:
        """Alias of :attr:`block_mu`."""
        return self.block_mu

    @property
    def weight(self) -> Tensor:
        """``W`` part of a matrix ``phi``: ``[n, in_features]``."""
        if not isinstance(self.phi, Tensor):
            raise TypeError(f"PointScore.weight: phi of a {self.kind} site is a dict of parameters, not [W | b]")
        return self.phi[:, : self.phi.shape[1] - int(self.bias)]

    @property
    def bias_vector(self) -> Optional[Tensor]:
        """``b`` part of a matrix ``phi``: ``[n]`` (None without bias)."""
        if not isinstance(self.phi, Tensor):
            raise TypeError(f"PointScore.bias_vector: phi of a {self.kind} site is a dict of parameters, not [W | b]")
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
        """The point with the largest ``score`` (= ``mu`` except for rule ``"reference"``), or None
        when every ``mu <= 0``."""
        cands = self.ranked()
        return cands[0] if cands else None

    @property
    def mu(self) -> Dict[int, float]:
        """``{point: mu}``."""
        return {p.point: p.mu for p in self.points}

    def ranked(self) -> List[PointScore]:
        """Points with ``mu > 0``, largest ``score`` first."""
        return sorted((p for p in self.points if p.mu > 0 and math.isfinite(p.mu)), key=lambda p: -p.score)

    def table(self) -> str:
        """A plain-text table: point, mu, r*, predicted change at eps = 1, convergence."""
        best = self.best
        lines = [f"J = {self.loss:.6g} over {self.n_samples} samples ({self.n_batches} batches), "
                 f"rule={self.rule}, backend={self.backend}",
                 f"{'point':>5}  {'site':>14}  {'mu':>12}  {'r*':>4}  {'dJ(eps=1)':>12}  {'conv':>4}"]
        for p in self.points:
            mark = "  <- best" if best is not None and p.point == best.point else ""
            lines.append(f"{p.point:>5}  {p.name:>14}  {p.mu:>12.5g}  {p.block:>4}  {p.predicted_change(1.0):>12.4g}  "
                         f"{'yes' if p.converged else 'no':>4}{mark}")
        if best is None:
            lines.append("no point has mu > 0: no insertion lowers J at second order")
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able summary (without phi)."""
        return {"loss": self.loss, "n_samples": self.n_samples, "n_batches": self.n_batches, "rule": self.rule,
                "backend": self.backend, "wall_time": self.wall_time,
                "mu": {str(p.point): p.mu for p in self.points},
                "names": {str(p.point): p.name for p in self.points},
                "block": {str(p.point): p.block for p in self.points}}


def score(model: nn.Module, data: Any, loss_fn: Callable[[Tensor, Any], Tensor], *,
          points: Optional[Sequence[Any]] = None, k: int = 1, rule: str = "top", route: str = "auto",
          backend: str = "auto", progress: bool = False, training: Optional[bool] = False,
          max_batches: Optional[int] = None, memory_budget: float = DEFAULT_MEMORY_BUDGET,
          tol: Optional[float] = None, group: Any = None, need: str = "all") -> ScoreReport:
    """Topological derivative ``mu`` and initialisation ``phi`` at every candidate point.

    Args:
        model: a model with sites (:mod:`topoderiv.sites`; e.g. :class:`topoderiv.models.ResidualMLP`).
        data: one ``(x, y)`` batch or an iterable of batches (one pass, streamed).
        loss_fn: ``loss_fn(model(x), y) -> scalar`` batch MEAN; ``J`` is the mean over all samples.
        points: candidate points to score, as ints or site names (default all).
        k: eigenpairs per block.
        rule: ``"top"`` (the paper: phi = top eigenvector, one non-zero row), ``"all"`` (every
            row on its own block's top eigenvector weighted by ``sqrt(max(mu_r, 0))``: no dead
            rows), ``"reference"`` (the reference code: the eigenpairs of the whole spectrum
            within 50% of the top one plus the first below, summed; points ranked by the summed
            eigenvalues) or ``"multi"`` (the reference ``phi``, points ranked by ``mu``). See
            :mod:`topoderiv.method.rules`. With ``sigma'(0) = 0`` a row that starts at zero never
            trains, so ``"top"`` inserts a single live neuron.
        route: ``"auto"``, ``"dense"`` or ``"matfree"`` (kernels backend; sites that must stream,
            e.g. convolutions, always take ``"dense"``). ``"dense"`` streams the blocks batch by
            batch (memory ``n m^2`` per point, whatever the data size). ``"matfree"`` keeps every
            batch's rows (memory grows with the data). ``"auto"`` keeps rows while they fit in
            ``memory_budget``, then lets :func:`topoderiv.ops.choose_route` pick with the real
            sample count; past the budget it switches to streaming dense blocks.
        memory_budget: bytes that route ``"auto"`` may spend on kept rows (features + costates of
            all points, counting the one concatenated copy made to solve them): the memory of
            scoring is this budget plus the dense blocks (``n m^2`` per point) plus one batch,
            whatever the number of batches.
        backend: ``"kernels"`` (topoderiv.ops), ``"torch"`` (topoderiv.reference + eigh) or
            ``"auto"`` (kernels when the extension is built for the device).
        progress: tqdm bar over batches.
        training: mode during the pass (``False`` = eval, default; ``None`` keeps the current mode).
            The model's modes are restored afterwards.
        max_batches: use at most this many batches of ``data``.
        tol: relative residual tolerance of the eigen-solves (kernels backend); default 1e-4 for
            float32/bfloat16 models (1e-3 for the matrix-free solves that start from
            :func:`topoderiv.method.statistic.subspace_start`: ``k = 1`` and ``m >= 64``) and 1e-10
            for float64 ones. A residual ``r`` gives eigenvalue errors ~ ``r^2 / gap`` and
            eigenvector angles ~ ``r / gap``: far below what the choice of point and the eps
            search can resolve.
        group: the process group to score over: ``None`` (default) the current one
            (:func:`topoderiv.method.distributed.process_group`, else torch.distributed's default
            group when it is initialised), ``False`` this process only (the opt-out), or a
            ``ProcessGroup``. Under a group of several ranks EVERY rank must call ``score`` with
            the same arguments and its OWN shard of the data (a shard may be empty); every rank
            gets the report of one process scoring the union of the shards: ``S``, the loss and
            the batch count are all-reduced; dense blocks and the sub-blocks' ``M_g`` are
            all-reduced once per point after the stream (not per batch); matrix-free solves run
            the step-wise Lanczos of :mod:`topoderiv.method.lanczos`, one all-reduce of the
            ``[n, m]`` product per step. The route is chosen from the rows of all ranks, and
            when the rows kept on ANY rank exceed ``memory_budget`` (a per-rank budget) every
            rank streams dense blocks, so all ranks take one path. A rank that fails (bad data)
            makes every rank raise. The solves run on every rank on identical data; if ranks end
            with different bits (e.g. different thread counts) rank 0's report is broadcast,
            with a warning.
        need: ``"all"`` (default): every block's values are converged eigenvalues. ``"top"``
            (rule ``"top"`` only; ignored by the other rules, which need every block): only what the
            rule needs is solved to tolerance: blocks that cannot hold a point's ``mu`` stop early
            (kernels backend, one process), faster; ``PointScore.bounds`` marks them (their
            ``block_mu`` are lower bounds). ``mu``, ``block`` and ``phi`` are those of ``"all"``
            whenever no block's start hides its top eigenvector (the early stop is an estimate,
            see :func:`topoderiv.ops.lanczos_topk`; it kept the winner on every model we tried).

    The eigen-solves of all points are batched: every point of the paper's blocks whose rows were
    kept goes through one multi-point :func:`topoderiv.ops.sensitivity_topk` (points of one shape
    in one launch), every conv point whose images were kept through one multi-point
    :func:`topoderiv.ops.conv_sensitivity_topk`, dense blocks through one grouped
    :func:`topoderiv.ops.lanczos_topk` (:func:`topoderiv.method.statistic.solve_points`).

    Returns:
        :class:`ScoreReport`; ``report.best`` is the point to insert at (None if every mu <= 0).

    Raises:
        TypeError: model without sites, bad data, a new block of the wrong type, a bad group.
        ValueError: inadmissible new block, non-scalar or non-finite loss, NaN/Inf data, bad
            rule/route/backend/k/points, empty data, a site container whose blocks change shape.
        RuntimeError: under a process group, another rank failed or the ranks' calls differ.
    """
    fn = "score"
    t0 = time.perf_counter()
    check_growable(model, fn)
    chosen = check_points(fn, model, points)
    if rule not in RULES:
        raise ValueError(f"{fn}: rule must be one of {RULES}, got {rule!r}")
    if route not in ROUTES:
        raise ValueError(f"{fn}: route must be one of {ROUTES}, got {route!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{fn}: k must be an int >= 1, got {k!r}")
    if need not in ("all", "top"):
        raise ValueError(f"{fn}: need must be 'all' or 'top', got {need!r}")
    if not callable(loss_fn):
        raise TypeError(f"{fn}: loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not memory_budget >= 0:
        raise ValueError(f"{fn}: memory_budget must be a number of bytes >= 0, got {memory_budget!r}")
    device = device_of(model)
    be = resolve_backend(backend, device, fn)
    comm = communicator(group, fn)

    stats: Dict[int, Any] = {}
    curvature: Dict[int, float] = {}
    for s in chosen:
        block = s.new_block()
        curvature[s.point] = s.check_block(block, fn)
        stats[s.point] = s.statistic(block, curvature[s.point], backend=be, route=route, k=k, tol=tol)
    pts = [s.point for s in chosen]
    total_loss = 0.0
    S = 0
    n_batches = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="score", unit="batch", leave=False, total=None if not is_batch(data) else 1)
    failed: Optional[Exception] = None
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
                for s in chosen:
                    s.check_state(cap.states[s.point], fn)
                    stats[s.point].add(cap.states[s.point], cap.costates[s.point])
                del cap
                held = sum(getattr(st, "held_bytes", 0) for st in stats.values())
                if route == "auto" and 2 * held > memory_budget:
                    for st in stats.values():  # too much data to keep: stream dense blocks from now on
                        if getattr(st, "held_bytes", 0):
                            st.flush()
                if bar is not None:
                    bar.update(1)
    except Exception as err:  # under a group: every rank must learn of it (no rank left in a collective)
        if comm is None:
            raise
        failed = err
    finally:
        if bar is not None:
            bar.close()
    if comm is not None:
        S, total_loss, n_batches = _synchronise(comm, chosen, stats, rule, route, k, be, tol, S, total_loss,
                                                n_batches, device, failed)
    if S == 0:
        raise ValueError(f"{fn}: data must hold at least one non-empty (x, y) batch, got none")

    results: List[PointScore] = []
    ordered = [stats.pop(s.point) for s in chosen]
    sols = solve_points(ordered, S, rule, need)
    for s, st, sol in zip(chosen, ordered, sols):
        results.append(PointScore(
            point=s.point, mu=sol.mu, block=sol.block, phi=sol.phi, block_mu=sol.block_mu, values=sol.values,
            quotient=sol.quotient, sigma2=curvature[s.point], bias=bool(getattr(st, "bias", True)),
            converged=sol.converged, route=sol.route, name=s.name, kind=s.kind, score=sol.score, n_pairs=sol.n_pairs,
            bounds=getattr(sol, "bounds", None),
        ))
    del ordered
    if comm is not None and not comm.same([(p.mu, p.block, p.phi, p.values, p.quotient) for p in results]):
        warnings.warn(f"{fn}: the ranks solved the same statistics to different bits (different thread counts or "
                      "hardware?): every rank takes rank 0's report", stacklevel=2)
        results = comm.broadcast_object(results)
    return ScoreReport(results, total_loss / S, S, n_batches, rule, be, time.perf_counter() - t0)


def _synchronise(comm: Any, chosen: Sequence[Any], stats: Dict[int, Any], rule: str, route: str, k: int,
                 backend: str, tol: Optional[float], S: int, total_loss: float, n_batches: int,
                 device: Any, failed: Optional[Exception]) -> Tuple[int, float, int]:
    """After every rank streamed its shard: agree on the call (or fail together), all-reduce the
    counts, the loss and what each statistic needs to choose its path, then let each statistic
    reduce itself (:meth:`EigenStatistic.synchronise`); the routes are checked to agree."""
    fn = "score"
    what = {"points": [s.point for s in chosen], "kinds": [s.kind for s in chosen], "rule": rule, "route": route,
            "k": k, "backend": backend, "tol": tol,
            "statistics": [(type(stats[s.point]).__name__, getattr(stats[s.point], "n", None),
                            getattr(stats[s.point], "d", None)) for s in chosen]}
    comm.agree(what, failed)
    local = [float(S), float(total_loss), float(n_batches)]
    for s in chosen:
        local += stats[s.point].summary()
    total = comm.sum_floats(local, "meta")
    S, total_loss, n_batches = int(total[0]), total[1], int(total[2])
    if S == 0:
        return 0, 0.0, 0
    routes = []
    for i, s in enumerate(chosen):
        st = stats[s.point]
        part = total[3 + 5 * i: 8 + 5 * i]
        routes.append(st.synchronise(comm, part, st.solve_k(rule) if hasattr(st, "solve_k") else k, device))
    comm.agree({"routes": routes})  # every branch was decided from reduced values: a disagreement is a bug
    return S, total_loss, n_batches
