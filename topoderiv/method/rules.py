"""Rules that turn eigenpairs of ``Q = blockdiag_r B_r`` into ``phi`` and a ranking score.

- ``"top"`` (the paper): ``phi = v_{r*} e_{r*}^T``, the top eigenvector of ``Q``; only row ``r*``
  is non-zero. With an admissible activation (``sigma'(0) = 0``) a row that starts at exactly
  zero gets exactly zero gradient, forever: the new block is in effect ONE neuron wide.
- ``"all"`` (ours): every row ``r`` on its own block's top eigenvector, weight
  ``sqrt(max(lambda_r, 0))``, normalised: ``phi^T Q phi = sum_r lambda_r^2 / sum_r lambda_r``
  over ``lambda_r > 0`` (at most ``mu``, at least the mean of the positive ``lambda_r``).
- ``"reference"`` (the first author's reference code, exactly): the eigenpairs of the WHOLE
  block-diagonal spectrum are taken from the top while within 50% of the largest, INCLUDING the
  first one that falls below (so at least two); their eigenvectors are summed; the point's
  score is the SUM of their eigenvalues (un-normalised), and points are ranked by it. ``phi``
  is that sum at unit norm; its gain ``phi^T Q phi`` is the mean of the chosen eigenvalues.
- ``"multi"``: the same ``phi`` as ``"reference"``, but points are ranked by ``mu`` (the
  topological derivative) rather than by the summed score. (Until version 0.1 "multi" stopped
  one pair earlier and only looked at each block's top-k: it is now the reference selection.)

When no eigenvalue is positive every rule returns the ``"top"`` phi (``mu <= 0``: nothing is
inserted anyway).

The standard transformer sub-blocks (``mlp_block``, ``attention_block``, ``transformer_block``
sites) have singular values instead: :func:`singular_rule`. There ``Q`` is block diagonal over
the units of each group (the MLP's hidden units form one group; each attention head's
``head_dim`` units form one), every unit of a group sharing the block
``c [[0, M^T], [M, 0]]``; the same four rule names apply with "one unit per singular pair" in
place of "one row per block" (see :func:`singular_rule`). A whole block's groups are its heads
and its MLP together, so ``"top"`` picks the winning sub-block and ``"all"``/``"reference"``
may start both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["RULES", "Selection", "eigen_rule", "reference_count", "SingularSelection", "singular_rule"]

RULES = ("top", "all", "multi", "reference")


@dataclass
class Selection:
    """``phi`` (unit norm), the top block ``r*``, ``phi^T Q phi``, the ranking score, pairs used."""

    phi: Tensor
    block: int
    quotient: float
    score: float
    n_pairs: int


def reference_count(sorted_values: List[float]) -> int:
    """How many of the (descending) eigenvalues the reference code sums: while ``>= 0.5 * top``,
    plus the first one below (all of them when none falls below)."""
    if not sorted_values:
        return 0
    top = sorted_values[0]
    for i, v in enumerate(sorted_values):
        if v < 0.5 * top:
            return i + 1
    return len(sorted_values)


def _full_spectrum(values: Tensor, vectors: Tensor, threshold: float,
                   blocks_of: Optional[Callable[[Tensor], Tensor]]) -> List[Tuple[Tensor, Tensor]]:
    """Per block, enough of its spectrum (descending) to contain every eigenvalue ``>= threshold``
    and the first one below: blocks whose computed top-k does not reach below are redone in full."""
    n, m, k = vectors.shape
    per: List[Tuple[Tensor, Tensor]] = [(values[r], vectors[r]) for r in range(n)]
    if k >= m:
        return per
    incomplete = (values[:, k - 1] >= threshold).nonzero().flatten()
    if incomplete.numel() == 0:
        return per
    if blocks_of is None:
        raise ValueError("eigen_rule: the reference rule needs the blocks of every block whose top-k stays above "
                         "half the top eigenvalue")
    blocks = blocks_of(incomplete)
    w, v = torch.linalg.eigh(blocks.to(torch.float64))
    w, v = w.flip(-1).to(values.dtype), v.flip(-1).to(vectors.dtype)
    idx = v.abs().argmax(dim=-2, keepdim=True)  # canonical sign, as for the Lanczos vectors
    s = torch.sign(torch.gather(v, -2, idx))
    v = v * torch.where(s == 0, torch.ones_like(s), s)
    for j, r in enumerate(incomplete.tolist()):
        per[r] = (w[j], v[j])
    return per


def eigen_rule(values: Tensor, vectors: Tensor, rule: str,
               blocks_of: Optional[Callable[[Tensor], Tensor]] = None) -> Selection:
    """``phi [n, m]`` by ``rule`` from ``values [n, k]`` (descending per block) and ``vectors [n, m, k]``.

    Values are eigenvalues of ``sign * B_r`` (loss units up to ``|sigma''(0)|``). ``blocks_of(idx)``
    returns dense blocks; the ``"reference"``/``"multi"`` rules use it for blocks whose top-k
    does not reach below half the top eigenvalue.
    """
    if rule not in RULES:
        raise ValueError(f"eigen_rule: rule must be one of {RULES}, got {rule!r}")
    n, m, k = vectors.shape
    top = values[:, 0]
    r_star = int(top.argmax())
    lam_top = float(top[r_star])
    phi = torch.zeros(n, m, dtype=vectors.dtype, device=vectors.device)
    if rule == "top" or lam_top <= 0:
        phi[r_star] = vectors[r_star, :, 0]
        return Selection(phi, r_star, lam_top, lam_top, 1)
    if rule == "all":
        c = top.clamp_min(0).sqrt()
        phi = c[:, None].to(vectors.dtype) * vectors[:, :, 0]
        phi = phi / phi.norm()
        # rows are eigenvectors of disjoint blocks: phi^T Q phi = sum_r ||phi_r||^2 lambda_r / ||phi||^2
        w2 = phi.pow(2).sum(dim=1).to(top.dtype)
        quotient = float((w2 * top).sum() / w2.sum())
        return Selection(phi, r_star, quotient, lam_top, int((top > 0).sum()))
    # the reference code's selection over the whole block-diagonal spectrum
    per = _full_spectrum(values, vectors, 0.5 * lam_top, blocks_of)
    flat_vals = torch.cat([w for w, _ in per])
    owner = torch.cat([torch.full((w.numel(),), r, dtype=torch.long) for r, (w, _) in enumerate(per)])
    col = torch.cat([torch.arange(w.numel()) for w, _ in per])
    order = torch.argsort(flat_vals.cpu(), descending=True, stable=True)
    sorted_vals = flat_vals.cpu()[order].tolist()
    count = max(reference_count(sorted_vals), min(2, len(sorted_vals)))
    chosen = order[:count].tolist()
    for i in chosen:
        r, j = int(owner[i]), int(col[i])
        phi[r] += per[r][1][:, j]
    phi = phi / phi.norm()
    total = float(sum(sorted_vals[:count]))
    # eigenvectors of one block are orthonormal and blocks are disjoint: gain = mean of the values
    return Selection(phi, r_star, total / count, total if rule == "reference" else lam_top, count)


# ------------------------------------------------------------------------------------------------
# rules for the singular-value kinds (standard transformer sub-blocks, METHOD.md section 7)


@dataclass
class SingularSelection:
    """Which singular pairs make ``phi``, with their weights.

    Attributes:
        pairs: ``(group, j, weight)``: the ``j``-th singular pair of group ``group`` goes into unit
            ``j`` of that group with ``weight``; ``sum weight^2 = 1``.
        block: the group holding the top singular value.
        quotient: ``phi^T Q phi``. score: what points are ranked by. n_pairs: ``len(pairs)``.
    """

    pairs: List[Tuple[int, int, float]]
    block: int
    quotient: float
    score: float
    n_pairs: int


def singular_rule(values: Sequence[Tensor], capacity: Sequence[int], rule: str) -> SingularSelection:
    """Selects singular pairs for ``phi`` by ``rule`` (the singular-value analogue of :func:`eigen_rule`).

    For a sub-block whose eps-scaled parameters are an in-map (rows = units) and an out-map
    (columns = units), ``Q`` is block diagonal over units, and every unit of group ``g`` (the MLP's
    hidden units; one attention head's ``head_dim`` units) has the same block
    ``c_g [[0, M_g^T], [M_g, 0]]`` with eigenvalues ``+-|c_g| s_{g,i}`` (singular values of ``M_g``)
    and eigenvectors ``(v_i, +-u_i) / sqrt(2)``. Unit ``j`` of a group holds at most one pair, so a
    group takes at most ``capacity[g]`` pairs; pair ``j`` goes into unit ``j``.

    - ``"top"``: the top pair of the group with the largest value (``phi^T Q phi = mu``).
    - ``"all"``: in every group its top ``capacity[g]`` pairs with a positive value, weight
      ``sqrt(lambda_i)`` normalised: ``phi^T Q phi = sum lambda_i^2 / sum lambda_i``.
    - ``"reference"`` / ``"multi"``: the DISTINCT singular pairs of all groups (each pair once, not
      once per unit) from the top while ``>= 50%`` of the largest, the first below included
      (:func:`reference_count`; at least two), summed with equal weights: ``phi^T Q phi`` = their
      mean; score = their sum (``"reference"``) or ``mu`` (``"multi"``).

    When no value is positive every rule returns the ``"top"`` selection.

    Args:
        values: per group, its singular values in loss units (``|c_g| s_{g,i}``), descending ``[r_g]``.
        capacity: per group, the number of units (pairs it can hold).
        rule: one of :data:`RULES`.

    Returns:
        :class:`SingularSelection`.

    Raises:
        ValueError: unknown rule, no groups, ``values`` and ``capacity`` of different lengths, a
            capacity < 1 or a group without values.
    """
    fn = "singular_rule"
    if rule not in RULES:
        raise ValueError(f"{fn}: rule must be one of {RULES}, got {rule!r}")
    if len(values) == 0 or len(values) != len(capacity):
        raise ValueError(f"{fn}: values and capacity must give the same number (>= 1) of groups, got "
                         f"{len(values)} and {len(capacity)}")
    vals: List[List[float]] = []
    for g, (v, c) in enumerate(zip(values, capacity)):
        if int(c) < 1 or v.numel() < 1:
            raise ValueError(f"{fn}: group {g} must have a capacity >= 1 and at least one value, got capacity {c} and "
                             f"{v.numel()} values")
        vals.append([float(t) for t in v.reshape(-1)[: int(c)].tolist()])
    tops = [v[0] for v in vals]
    g_star = max(range(len(tops)), key=lambda g: (tops[g], -g))
    mu = tops[g_star]
    if rule == "top" or mu <= 0:
        return SingularSelection([(g_star, 0, 1.0)], g_star, mu, mu, 1)
    if rule == "all":
        chosen = [(g, j, lam) for g, v in enumerate(vals) for j, lam in enumerate(v) if lam > 0]
        total = sum(lam for _, _, lam in chosen)
        pairs = [(g, j, math.sqrt(lam / total)) for g, j, lam in chosen]
        quotient = sum(lam * lam for _, _, lam in chosen) / total
        return SingularSelection(pairs, g_star, quotient, mu, len(pairs))
    flat = [(lam, g, j) for g, v in enumerate(vals) for j, lam in enumerate(v)]
    flat.sort(key=lambda t: (-t[0], t[1], t[2]))  # stable: by value, then group, then pair
    count = max(reference_count([t[0] for t in flat]), min(2, len(flat)))
    chosen_ref = flat[:count]
    w = 1.0 / math.sqrt(count)
    total = sum(t[0] for t in chosen_ref)
    pairs = [(g, j, w) for _, g, j in chosen_ref]
    return SingularSelection(pairs, g_star, total / count, total if rule == "reference" else mu, count)
