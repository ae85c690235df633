"""Step-wise batched Lanczos in Python around any operator: the C++ iteration, one step at a time.

:func:`topoderiv.ops.lanczos_topk` and the matrix-free :func:`topoderiv.ops.sensitivity_topk` run
their whole iteration inside the C++ core, where no collective can be called. Under a process
group the operator of a point is a SUM over ranks (every rank holds its own rows), so each
application must be all-reduced: :func:`lanczos_topk` here drives the same algorithm from Python
and calls ``apply(V, idx)`` once per step, which may communicate (:func:`sensitivity_lanczos`:
the local :func:`topoderiv.ops.sensitivity_matvec` plus one ``all_reduce``). The C++ core stays
torch-free.

It is the C++ driver (csrc/common/lanczos_driver.cpp, csrc/cpu/lanczos_cpu.cpp) step for step:

- the same start vectors: ``v0`` rows (normalised in float64), else the seeded
  ``start_value(seed, problem, restart, i)`` of csrc/include/topoderiv/common.h (splitmix64);
- full re-orthogonalisation: classical Gram-Schmidt twice against the whole basis;
- the same stop test: every wanted Ritz estimate ``|beta_j s_{j,c}| <= tol * ||T||``, with
  ``||T||`` = the largest ``|Ritz value|`` over the problem's norm group (the blocks of one point);
  a problem also stops when its Krylov space is the whole space or its operator is zero;
- an invariant subspace (``beta_j <= 64 eps ||T_j||``) restarts from a fresh seeded vector
  orthogonal to the basis; one reached from the caller's ``v0`` is never a stop (it may miss the
  top eigenvalues): the problem restarts, and then also needs the top Ritz pairs of the random
  segment after it converged;
- the explicit residual ``||A y - theta y||`` from the stored ``A v_t`` (no extra application),
  and ``converged`` as :func:`topoderiv.ops.lanczos_topk` reports it.

So with the same operator and start it takes the same steps and returns the same pairs up to
rounding (tests/test_distributed.py checks it against the C++ op). The tridiagonal problems are
solved by :func:`torch.linalg.eigh` in float64 (the C++ driver: implicit QL).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import ops
from .distributed import Comm

__all__ = ["lanczos_topk", "start_vectors", "default_steps", "sensitivity_lanczos", "RESIDUAL_BYTES"]

#: largest store of ``A v_t`` (steps x problems x m) kept for the explicit residuals, as the C++
#: CPU driver; above it the residuals take ``k`` more operator applications
RESIDUAL_BYTES = 512 * 2**20

_EPS = {torch.float32: 1.1920929e-07, torch.float64: 2.220446049250313e-16}
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def default_steps(m: int, k: int) -> int:
    """The Krylov dimension cap of :func:`topoderiv.ops.lanczos_topk`: ``min(m, max(64, 4k + 16))``."""
    return min(m, max(64, 4 * k + 16))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def start_vectors(seed: int, problems: Tensor, restarts: Tensor, m: int) -> Tensor:
    """The C++ core's seeded start vectors, float64 ``[len(problems), m]``: entry ``i`` of problem
    ``b`` after ``restarts[b]`` restarts is ``start_value(seed, b, restart, i)``, uniform in [-1, 1)."""
    b = problems.detach().cpu().numpy().astype(np.uint64)[:, None]
    r = restarts.detach().cpu().numpy().astype(np.uint64)[:, None]
    i = np.arange(m, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        inner = _splitmix64(b * np.uint64(0x100000001B3) + r * np.uint64(0x9E3779B1))
        h = _splitmix64(np.uint64(seed) ^ inner ^ _splitmix64(i))
    vals = (h >> np.uint64(11)).astype(np.float64) * (2.0 / 9007199254740992.0) - 1.0
    return torch.from_numpy(np.ascontiguousarray(vals))


def _cgs2(V: Tensor, w: Tensor) -> Tensor:
    """``w`` minus its projection on the basis ``V [t, b, m]``, twice (classical Gram-Schmidt)."""
    for _ in range(2):
        coef = torch.einsum("tbm,bm->bt", V, w)
        w = w - torch.einsum("tbm,bt->bm", V, coef)
    return w


def _normalise_rows(v: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows scaled by their max then normalised, in float64 (as ops.lanczos_topk treats ``v0``)."""
    v = v.to(torch.float64)
    tiny = torch.finfo(torch.float64).tiny
    v = v / v.abs().amax(dim=-1, keepdim=True).clamp_min(tiny)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(tiny)
    return v.to(dtype)


def _tridiag_eigh(alpha: Tensor, off: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigenpairs of the symmetric tridiagonal matrices with diagonals ``alpha [..., d]`` and
    off-diagonals ``off [..., d - 1]``, in descending order (the driver's), float64."""
    T = torch.diag_embed(alpha)
    if alpha.shape[-1] > 1:
        T = T + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    theta, Z = torch.linalg.eigh(T)  # ascending
    return theta.flip(-1), Z.flip(-1)


def lanczos_topk(apply: Callable[[Tensor, Tensor], Tensor], B: int, m: int, k: int = 1, *,
                 dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
                 steps: Optional[int] = None, tol: float = 1e-6, seed: int = 0, norm_group: Optional[int] = None,
                 v0: Optional[Tensor] = None) -> ops.LanczosResult:
    """The ``k`` algebraically largest eigenpairs of ``B`` symmetric ``m x m`` operators given by ``apply``.

    Args:
        apply: ``apply(V [na, m], idx [na]) -> [na, m]``: operator ``idx[i]`` applied to row ``i``
            (``idx``: the problems still iterating, increasing). Called once per step; it may run
            collectives (every rank calls it with the same ``idx``).
        B, m, k: problems, their size, pairs wanted (``1 <= k <= m``).
        dtype: float32 or float64: the basis and the results. device: where the basis lives.
        steps: Krylov dimension cap (default :func:`default_steps`, clamped to ``m``).
        tol: relative residual tolerance. seed: start-vector seed, as the C++ op.
        norm_group: problems ``[g * G, (g + 1) * G)`` share one norm in the stop test (default
            ``B``: the blocks of one point, as ``shared_norm=True``).
        v0: optional start vectors ``[B, m]`` (all-zero rows: the seeded vector).

    Returns:
        :class:`topoderiv.ops.LanczosResult` with the semantics of :func:`topoderiv.ops.lanczos_topk`.

    Raises:
        ValueError: bad sizes, ``tol`` or ``dtype``; NaN/Inf from the operator.
    """
    fn = "lanczos_topk (step-wise)"
    if dtype not in _EPS:
        raise ValueError(f"{fn}: dtype must be float32 or float64, got {dtype}")
    if m < 1 or B < 0 or not 1 <= k <= m:
        raise ValueError(f"{fn}: need B >= 0, m >= 1 and 1 <= k <= m, got B={B}, m={m}, k={k}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"{fn}: tol must be a finite number > 0, got {tol!r}")
    S = default_steps(m, k) if steps is None else min(int(steps), m)
    if S < k:
        raise ValueError(f"{fn}: steps must be >= k = {k}, got {steps}")
    G = B if norm_group is None else max(1, int(norm_group))
    device = torch.device("cpu") if device is None else device
    eps = _EPS[dtype]
    breakdown = 64.0 * eps
    values = torch.zeros(B, k, dtype=torch.float64)
    resid = torch.zeros(B, k, dtype=torch.float64)
    nsteps = torch.zeros(B, dtype=torch.int32)
    final_scale = torch.zeros(B, dtype=torch.float64)
    if B == 0:
        z = torch.zeros(0, k, dtype=dtype, device=device)
        return ops.LanczosResult(z, torch.zeros(0, m, k, dtype=dtype, device=device), torch.zeros(0, dtype=torch.bool),
                                 z[:, 0], nsteps, z[:, 0])
    keep_av = S * B * m * torch.finfo(dtype).bits // 8 <= RESIDUAL_BYTES
    V = torch.zeros(S + 1, B, m, dtype=dtype, device=device)
    AV = torch.zeros(S, B, m, dtype=dtype, device=device) if keep_av else None
    alpha = torch.zeros(B, S, dtype=torch.float64)
    beta = torch.zeros(B, S, dtype=torch.float64)
    anorm = torch.zeros(B, dtype=torch.float64)
    tag = torch.zeros(B, dtype=torch.int64)
    active = torch.ones(B, dtype=torch.bool)
    Sfin = torch.zeros(B, S, k, dtype=torch.float64)
    all_idx = torch.arange(B)

    # start vectors (the driver's restart(-1)): v0 rows where non-zero, else seeded
    w = start_vectors(seed, all_idx, tag, m)
    given = torch.zeros(B, dtype=torch.bool)  # started from the caller's v0 row
    seg = torch.zeros(B, dtype=torch.int64)  # where the current Krylov segment starts
    if v0 is not None:
        v = _normalise_rows(v0.detach().reshape(B, m).cpu(), dtype).to(torch.float64)
        given = (v * v).sum(dim=1) > 0
        w = torch.where(given[:, None], v, w)
    w = w.to(dtype).to(torch.float64)
    norms = w.norm(dim=1)
    V[0] = (w.to(dtype) * (1.0 / norms).to(dtype)[:, None]).to(device)

    for j in range(S):
        idx = active.nonzero().flatten()
        idx_dev = idx.to(device)
        every = idx.numel() == B
        Vj = V[j] if every else V[j].index_select(0, idx_dev)
        W = apply(Vj, idx)
        if tuple(W.shape) != (idx.numel(), m):
            raise ValueError(f"{fn}: apply must return [{idx.numel()}, {m}], got {list(W.shape)}")
        W = W.to(device=device, dtype=dtype)
        if AV is not None:
            AV[j].index_copy_(0, idx_dev, W)
        a_step = (Vj * W).sum(dim=1, dtype=torch.float64)
        W = _cgs2(V[: j + 1] if every else V[: j + 1].index_select(1, idx_dev), W)
        b_step = W.to(torch.float64).norm(dim=1)
        safe = torch.where(b_step > 0, b_step, torch.ones_like(b_step))
        V[j + 1].index_copy_(0, idx_dev, W * (1.0 / safe).to(dtype)[:, None])
        a_cpu, b_cpu = a_step.cpu(), b_step.cpu()
        if not bool(torch.isfinite(a_cpu).all() & torch.isfinite(b_cpu).all()):
            raise ValueError(f"{fn}: the operator must give finite values, got NaN or Inf")
        alpha[idx, j], beta[idx, j] = a_cpu, b_cpu
        dim = j + 1
        theta, Z = _tridiag_eigh(alpha[idx, :dim], beta[idx, : dim - 1])
        anorm[idx] = theta.abs().amax(dim=1)
        kk = min(k, dim)
        lastrow = (b_cpu[:, None] * Z[:, dim - 1, :kk]).abs()
        # the norm each stop test is relative to: the max over the problem's group
        groups = -(-B // G)
        padded = anorm.new_zeros(groups * G)
        padded[:B] = anorm
        scale = padded.view(groups, G).amax(dim=1).repeat_interleave(G)[:B]
        sc = scale[idx]
        # the driver's stop rule: a Krylov space that closes (invariant subspace) while it still
        # holds the caller's v0 is never final (it may miss the top eigenvalues): it restarts, and
        # the random segment after it must converge its own top pairs too
        zero = anorm[idx] == 0
        closed = (b_cpu <= breakdown * anorm[idx]) | zero
        v0_seg = given[idx] & (seg[idx] == 0)
        conv = torch.zeros(idx.numel(), dtype=torch.bool)
        if dim >= k:
            conv = (lastrow <= tol * sc[:, None]).all(dim=1)
            for i in (conv & given[idx] & (seg[idx] > 0)).nonzero().flatten().tolist():
                s0 = int(seg[idx[i]])
                ds = dim - s0
                _, zs = _tridiag_eigh(alpha[idx[i], s0:dim], beta[idx[i], s0:dim - 1])
                last = (b_cpu[i] * zs[ds - 1, :min(k, ds)]).abs()
                conv[i] = bool((last <= tol * sc[i]).all())
        conv = (conv & ~(v0_seg & closed)) | (zero & ~v0_seg) | (dim == m)
        done = conv | (j == S - 1)
        if bool(done.any()):
            for c in range(k):
                if c < dim:
                    values[idx[done], c] = theta[done, c]
                    resid[idx[done], c] = (b_cpu[done] * Z[done, dim - 1, c]).abs()
                    Sfin[idx[done], :dim, c] = Z[done, :, c]
            if dim == m:
                resid[idx[done]] = 0.0
            nsteps[idx[done]] = dim
            final_scale[idx[done]] = sc[done]
            active[idx[done]] = False
        restart = ~done & closed
        if bool(restart.any()):
            r_idx = idx[restart]
            beta[r_idx, j] = 0.0
            seg[r_idx] = j + 1
            tag[r_idx] += 1
            wr = start_vectors(seed, r_idx, tag[r_idx], m).to(device=device, dtype=dtype)
            r_dev = r_idx.to(device)
            wr = _cgs2(V[: j + 1].index_select(1, r_dev), wr)
            nr = wr.to(torch.float64).norm(dim=1)
            nr = torch.where(nr > 0, nr, torch.ones_like(nr))
            V[j + 1].index_copy_(0, r_dev, wr * (1.0 / nr).to(dtype)[:, None])
        if not bool(active.any()):
            break

    # Ritz vectors y = V S (float64 sums), and A y from the stored A v_t
    Smax = int(nsteps.max())
    coef = Sfin[:, :Smax].to(device)  # [B, t, k]
    Vt = V[:Smax].to(torch.float64)  # [t, B, m]
    y = torch.einsum("tbm,btk->bmk", Vt, coef)
    nrm = y.norm(dim=1, keepdim=True)
    y = y / torch.where(nrm > 0, nrm, torch.ones_like(nrm))
    vectors = y.to(dtype)
    if AV is not None:
        ay = torch.einsum("tbm,btk->bmk", AV[:Smax].to(torch.float64), coef)
        ay = ay / torch.where(nrm > 0, nrm, torch.ones_like(nrm))
        true = (ay - y * values.to(device)[:, None, :]).norm(dim=1).cpu()
    else:
        true = torch.zeros(B, k, dtype=torch.float64)
        for c in range(k):
            ay = apply(vectors[:, :, c].contiguous(), all_idx).to(torch.float64)
            true[:, c] = (ay - vectors[:, :, c].to(torch.float64) * values[:, c].to(device)[:, None]).norm(dim=1).cpu()
    # converged and residuals as ops.lanczos_topk reports them
    sc = final_scale.clamp_min(torch.finfo(torch.float64).tiny)
    true_rel = true / sc[:, None]
    est = resid / sc[:, None]
    limit = max(tol, 4.0 * math.sqrt(m) * eps)
    zero = final_scale == 0
    converged = ((est <= tol) & (true_rel <= limit)).all(dim=1) | zero
    residuals = torch.where(zero, torch.zeros_like(final_scale), true_rel.amax(dim=1))
    return ops.LanczosResult(values.to(device=device, dtype=dtype), vectors, converged.to(device),
                             residuals.to(device=device, dtype=dtype), nsteps.to(device),
                             final_scale.to(device=device, dtype=dtype))


def sensitivity_lanczos(u: Tensor, q: Tensor, comm: Optional[Comm], *, k: int = 1, bias: bool = True,
                        tol: float = 1e-6, steps: Optional[int] = None, seed: int = 0,
                        v0: Optional[Tensor] = None) -> ops.LanczosResult:
    """Matrix-free top-``k`` eigenpairs of the blocks ``B_r = sum_rows q_r xt xt^T`` summed over ranks.

    Each rank passes ITS rows ``u [N_rank, d]``, ``q [N_rank, n]`` (``N_rank`` may be 0); every
    step applies :func:`topoderiv.ops.sensitivity_matvec` to the local rows and all-reduces the
    ``[n_active, m]`` result (one collective per step, tag ``"matvec"``), so every rank iterates on
    the same operator and ends with the same pairs. As the C++ CPU route, once a fifth of the
    blocks have converged only the active blocks are applied (their costate columns gathered once
    per change of the active set). ``comm=None``: this process's rows only (the same iteration as
    :func:`topoderiv.ops.sensitivity_topk` with ``route="matfree"``).
    """
    n, d = q.shape[-1], u.shape[-1]
    m = d + int(bias)
    u2 = u.reshape(-1, d)
    q2 = q.reshape(-1, n)
    acc = torch.float64 if u2.dtype == torch.float64 else torch.float32
    cache: dict = {}

    def apply(V: Tensor, idx: Tensor) -> Tensor:
        na = idx.numel()
        if na * 5 >= n * 4:
            if na == n:
                out = ops.sensitivity_matvec(u2, q2, V, bias=bias)
            else:
                full = V.new_zeros(n, m)
                full[idx.to(V.device)] = V
                out = ops.sensitivity_matvec(u2, q2, full, bias=bias)[idx.to(V.device)]
        else:
            key = tuple(idx.tolist())
            if cache.get("key") != key:
                cache["key"], cache["q"] = key, q2[:, idx.to(q2.device)].contiguous()
            out = ops.sensitivity_matvec(u2, cache["q"], V, bias=bias)
        if comm is not None:
            comm.all_reduce_(out, "matvec")
        return out

    return lanczos_topk(apply, n, m, k, dtype=acc, device=u2.device, steps=steps, tol=tol, seed=seed, norm_group=n,
                        v0=v0)
