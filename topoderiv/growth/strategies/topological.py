"""The topological-derivative strategy: insert where mu is largest, phi from its eigenvectors."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence

from torch import Tensor

from ..compute import STRATEGY_COMPUTE_KEY, count_call
from ..insertion import DEFAULT_EPS_GRID, search_eps
from ..scoring import score
from .base import InsertionStrategy, Proposal

__all__ = ["TopologicalStrategy"]


class TopologicalStrategy(InsertionStrategy):
    """Insert where the topological derivative is largest, with phi = its eigenvector.

    ``propose``: :func:`topoderiv.score` on ``grower.score_data()``, then for the points with
    ``mu > 0`` in decreasing order (at most ``max_tries``) :func:`topoderiv.search_eps` on the
    same data; the first point with an eps that lowers the loss is proposed. None if no point has
    ``mu > 0`` or no eps helps.

    Args:
        rule, k, route, backend: passed to :func:`topoderiv.score`. ``rule="top"`` starts one row
            of the new block non-zero (the others are dead: ``sigma'(0) = 0`` gives them zero
            gradient); ``rule="all"`` starts every row with ``mu_r > 0`` on its own eigenvector.
        eps_grid: passed to :func:`topoderiv.search_eps` (default its grid).
        max_tries: points tried by the eps search.

    Works for every site kind (the proposal carries ``phi`` as scored: ``[n, m]`` or a dict).
    The proposal's ``info`` records ``block`` (``r*``), ``live_rows`` (non-zero rows of phi, or
    the units a sub-block phi starts), the site's ``kind`` and name,
    ``quotient`` (``phi^T Q phi``), predicted and actual loss change at the chosen eps, and under
    ``"compute"`` the FLOPs of scoring (capture pass + solve) and of the eps search (every point
    tried), unless ``grower.count_flops`` is False: both are re-run under the counter after their
    timed run (:func:`topoderiv.growth.compute.count_call`), so ``score_time``/``search_time`` are
    uncounted times.
    """

    name = "topological"

    def __init__(self, *, rule: str = "top", k: int = 1, route: str = "auto", backend: str = "auto",
                 eps_grid: Optional[Sequence[float]] = None, max_tries: int = 3) -> None:
        super().__init__()
        self.rule, self.k, self.route, self.backend = rule, k, route, backend
        self.eps_grid = None if eps_grid is None else tuple(float(e) for e in eps_grid)
        self.max_tries = max_tries

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "rule": self.rule, "k": self.k, "route": self.route, "backend": self.backend,
                "eps_grid": list(self.eps_grid or DEFAULT_EPS_GRID), "max_tries": self.max_tries}

    def propose(self, grower: "Grower") -> Optional[Proposal]:
        data = grower.score_data()
        counting = bool(getattr(grower, "count_flops", True))

        def scoring() -> Any:
            return score(grower.model, data, grower.loss_fn, k=self.k, rule=self.rule, route=self.route,
                         backend=self.backend)

        t0 = time.perf_counter()
        rep = scoring()
        t_score = time.perf_counter() - t0
        info: Dict[str, Any] = {"mu": rep.mu, "score_loss": rep.loss, "score_time": t_score,
                                "backend": rep.backend}
        self.last_info = info
        tried = []
        found = None
        for ps in rep.ranked()[: self.max_tries]:
            eps, losses = search_eps(grower.model, ps.point, ps.phi, data, grower.loss_fn, self.eps_grid)
            tried.append(ps)
            if eps is not None:
                found = ps, eps, losses
                break
        info["search_time"] = time.perf_counter() - t0 - t_score
        if counting:  # the same calls again under the counter, outside the timed ones
            t1 = time.perf_counter()
            _, scored = count_call(scoring)
            _, searched = count_call(lambda: [search_eps(grower.model, ps.point, ps.phi, data, grower.loss_fn,
                                                         self.eps_grid) for ps in tried])
            info[STRATEGY_COMPUTE_KEY] = {"score_flops": scored.total, "search_flops": searched.total,
                                          "score_capture_flops": scored.torch_flops,
                                          "score_solve_flops": scored.ops_flops, "lanczos_steps": scored.lanczos_steps,
                                          "solves": dict(scored.solves), "samples": rep.n_samples,
                                          "counting_time": time.perf_counter() - t1}
        info["tried"] = [ps.point for ps in tried]
        if found is None:
            info["reason"] = "no point with mu > 0" if not tried else "no eps of the grid lowers the loss"
            return None
        ps, eps, losses = found
        # live rows of a matrix phi; for sub-block kinds (a dict phi) the units it starts non-zero
        live = int((ps.phi.abs().sum(1) > 0).sum()) if isinstance(ps.phi, Tensor) else ps.n_pairs
        info.update({"block": ps.block, "live_rows": live, "kind": ps.kind, "site": ps.name,
                     "quotient": ps.quotient, "predicted_change": ps.predicted_change(eps),
                     "actual_change": losses[eps] - losses[0.0], "eps_losses": {str(e): v for e, v in losses.items()}})
        return Proposal(ps.point, phi=ps.phi, eps=eps, info=info)
