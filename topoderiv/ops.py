"""Drop-in ops for the topological derivative, as ``torch.library`` custom ops.

Public functions (validated, documented) wrap the custom ops ``topoderiv::*``. The ops themselves
see 2-D inputs with unit column stride, allocate their outputs here in Python (the C++ core never
allocates) and pass the current CUDA stream to the kernels.

All ops compute statistics, not differentiable functions: inputs are detached and the ops have no
autograd formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from ._lib import lib as _lib

__all__ = [
    "sensitivity_blocks",
    "sensitivity_matvec",
    "lanczos_topk",
    "sensitivity_topk",
    "LanczosResult",
    "SensitivityTopK",
    "choose_route",
    "has_cuda_kernels",
]

_INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_ACC_DTYPES = (torch.float32, torch.float64)
_DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}
_ROUTES = ("auto", "dense", "matfree")
# Lanczos steps per block the cost model assumes: real sensitivity spectra converge in about 10
# and the CPU matrix-free route applies the operator to the unconverged blocks only (measured mean
# 9-10 steps at width 256 in benchmarks/RESULTS.md; the CUDA route applies it to every block, so
# this is optimistic there).
_EXPECTED_STEPS = 12
# largest store of A v_t (steps x n x m) the CPU matrix-free Lanczos keeps for explicit residuals
_MF_RESIDUAL_BYTES = 512 * 2**20


def has_cuda_kernels() -> bool:
    """True when the extension was built with CUDA kernels."""
    return bool(_lib().build_info()["cuda"])


# --------------------------------------------------------------------------------------------
# validation helpers (each message: function, argument, expectation, what was received)


def _check_tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_dtype(fn: str, name: str, t: Tensor, allowed: Tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(a).replace("torch.", "") for a in allowed)
        raise TypeError(f"{fn}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def _check_device(fn: str, name: str, t: Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{fn}: {name} must be on the same device as x ({device}), got {t.device}")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: {name} must be a CPU or CUDA tensor, got device {device}")
    if device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            f"{fn}: {name} is a CUDA tensor but this topoderiv build has no CUDA kernels; rebuild with "
            "nvcc on PATH: TOPODERIV_CUDA=ON pip install --no-build-isolation --no-deps ."
        )


def _check_finite(fn: str, name: str, t: Tensor) -> None:
    if t.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(t)  # NaN propagates, +-Inf shows at an end: no [N, d] bool temporary
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{fn}: {name} must contain only finite values, got NaN or Inf")


def _check_int(fn: str, name: str, v: object, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{fn}: {name} must be {rng}, got {v}")
    return v


def _flatten_pair(fn: str, x: object, p: object) -> Tuple[Tensor, Tensor]:
    """Validates (x [..., d], p [..., n]) and returns 2-D views [S, d], [S, n] with unit column stride."""
    x = _check_tensor(fn, "x", x)
    p = _check_tensor(fn, "p", p)
    _check_dtype(fn, "x", x, _INPUT_DTYPES)
    if p.dtype != x.dtype:
        raise TypeError(f"{fn}: p must have the same dtype as x ({x.dtype}), got {p.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have shape [..., d] (at least 1 dim), got a 0-dim tensor")
    if p.dim() < 1:
        raise ValueError(f"{fn}: p must have shape [..., n] (at least 1 dim), got a 0-dim tensor")
    if x.shape[:-1] != p.shape[:-1]:
        raise ValueError(
            f"{fn}: x [..., d] and p [..., n] must have the same leading dims, got x {tuple(x.shape)} "
            f"and p {tuple(p.shape)}"
        )
    _check_device(fn, "x", x, x.device)
    _check_device(fn, "p", p, x.device)
    rows = math.prod(x.shape[:-1])
    x2 = x.detach().reshape(rows, x.shape[-1])
    p2 = p.detach().reshape(rows, p.shape[-1])
    if x2.shape[1] > 1 and x2.stride(1) != 1:
        x2 = x2.contiguous()
    if p2.shape[1] > 1 and p2.stride(1) != 1:
        p2 = p2.contiguous()
    return x2, p2


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _rstride(t: Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


# --------------------------------------------------------------------------------------------
# custom ops (2-D inputs with unit column stride; validated by the public wrappers)


def _launch_blocks(x: Tensor, p: Tensor, bias: bool, out: Tensor) -> None:
    S, d = x.shape
    n = p.shape[1]
    if S == 0 or n == 0 or out.numel() == 0:
        return
    _lib().sensitivity_blocks(
        x.device.type, x.data_ptr(), _rstride(x), p.data_ptr(), _rstride(p), out.data_ptr(),
        1, S, d, n, 0, 0, bool(bias), _DTYPE_CODE[x.dtype], _DTYPE_CODE[out.dtype],
        torch.get_num_threads(), _stream(x),
    )


@torch.library.custom_op("topoderiv::sensitivity_blocks", mutates_args=(), device_types=("cpu", "cuda"))
def _blocks_op(x: Tensor, p: Tensor, bias: bool) -> Tensor:
    m = x.shape[1] + int(bias)
    out = torch.zeros(p.shape[1], m, m, dtype=_acc_dtype(x.dtype), device=x.device)
    _launch_blocks(x, p, bias, out)
    return out


@_blocks_op.register_fake
def _(x: Tensor, p: Tensor, bias: bool) -> Tensor:
    m = x.shape[1] + int(bias)
    return x.new_empty(p.shape[1], m, m, dtype=_acc_dtype(x.dtype))


@torch.library.custom_op(
    "topoderiv::sensitivity_blocks_accumulate_", mutates_args=("out",), device_types=("cpu", "cuda")
)
def _blocks_acc_op(x: Tensor, p: Tensor, bias: bool, out: Tensor) -> None:
    if x.device.type == "cuda" and out.dtype != _acc_dtype(x.dtype):
        # the CUDA kernels accumulate float32/bfloat16 inputs in float32 only
        out.add_(_blocks_op(x, p, bias))
        return
    _launch_blocks(x, p, bias, out)


@_blocks_acc_op.register_fake
def _(x: Tensor, p: Tensor, bias: bool, out: Tensor) -> None:
    return None


@torch.library.custom_op("topoderiv::sensitivity_matvec", mutates_args=(), device_types=("cpu", "cuda"))
def _matvec_op(x: Tensor, p: Tensor, v: Tensor, bias: bool) -> Tensor:
    S, d = x.shape
    n = p.shape[1]
    out = torch.zeros_like(v)
    if S == 0 or n == 0 or v.shape[1] == 0:
        return out
    ws = torch.empty(S * n if x.device.type == "cuda" else 0, dtype=v.dtype, device=x.device)
    _lib().sensitivity_matvec(
        x.device.type, x.data_ptr(), _rstride(x), p.data_ptr(), _rstride(p), v.data_ptr(),
        out.data_ptr(), ws.data_ptr() if ws.numel() else 0,
        1, S, d, n, 0, 0, bool(bias), _DTYPE_CODE[x.dtype], _DTYPE_CODE[v.dtype],
        torch.get_num_threads(), _stream(x),
    )
    return out


@_matvec_op.register_fake
def _(x: Tensor, p: Tensor, v: Tensor, bias: bool) -> Tensor:
    return torch.empty_like(v)


def _run_lanczos(
    a: Optional[Tensor],
    mf: Optional[Tuple[Tensor, Tensor, bool]],
    B: int,
    m: int,
    k: int,
    steps: int,
    tol: float,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    norm_group: int = 1,
    v0: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Runs the kernel; returns (values, vectors, ritz estimates, steps, ||A|| estimate, explicit residuals)."""
    values = torch.zeros(B, k, dtype=dtype, device=device)
    vectors = torch.zeros(B, m, k, dtype=dtype, device=device)
    ritz = torch.zeros(B, k, dtype=dtype, device=device)
    nsteps = torch.zeros(B, dtype=torch.int32, device=device)
    anorm = torch.zeros(B, dtype=torch.float64)
    resid = torch.zeros(B, k, dtype=dtype, device=device)
    if B == 0:
        return values, vectors, ritz, nsteps, anorm.to(dtype=dtype, device=device), resid
    cuda = device.type == "cuda"
    # the CPU backend computes the explicit residuals itself: dense in cache, matrix-free from the
    # A v_t it applied (no extra pass over the data, but as much memory again as the Krylov basis:
    # above _MF_RESIDUAL_BYTES the residuals take k extra operator applications instead)
    in_kernel_residual = not cuda and (mf is None or steps * B * m * dtype.itemsize <= _MF_RESIDUAL_BYTES)
    if mf is None:
        assert a is not None
        op = (0, 0, 0, 0, 0, 0, 0, 0, True, 0)
        ptr_a = a.data_ptr()
    else:
        x, p, bias = mf
        op = (x.data_ptr(), _rstride(x), p.data_ptr(), _rstride(p), 1, x.shape[0], x.shape[1],
              p.shape[1], bool(bias), _DTYPE_CODE[x.dtype])
        ptr_a = 0
    n_ws = _lib().lanczos_workspace_elems(B, m, k, steps, ptr_a == 0, cuda, op[5], op[7], op[4])
    # CUDA matrix-free steps apply the operator to every block, converged ones included, whose
    # later basis slots are never written: zero them so no uninitialised memory is read (the CPU
    # backend zeroes those slots itself, one step at a time)
    ws = (torch.zeros if mf is not None and cuda else torch.empty)(n_ws, dtype=dtype, device=device)
    _lib().lanczos_topk(
        device.type, ptr_a, *op, B, m, k, steps, float(tol), int(seed), max(1, int(norm_group)),
        v0.data_ptr() if v0 is not None else 0, _DTYPE_CODE[dtype],
        values.data_ptr(), vectors.data_ptr(), ritz.data_ptr(), nsteps.data_ptr(), anorm.data_ptr(),
        resid.data_ptr() if in_kernel_residual else 0, ws.data_ptr(), torch.get_num_threads(), _stream(ws),
    )
    if not in_kernel_residual:
        if mf is None:
            av = a @ vectors
        else:
            x, p, bias = mf
            av = torch.stack([_matvec_op(x, p, vectors[:, :, c].contiguous(), bias) for c in range(k)], dim=2)
        resid = (av - vectors * values[:, None, :]).norm(dim=1)
    return values, vectors, ritz, nsteps, anorm.to(dtype=dtype, device=device), resid


@torch.library.custom_op("topoderiv::lanczos_topk", mutates_args=(), device_types=("cpu", "cuda"))
def _lanczos_op(a: Tensor, k: int, steps: int, tol: float, seed: int, norm_group: int = 1,
                v0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, m, _ = a.shape
    return _run_lanczos(a, None, B, m, k, steps, tol, seed, a.dtype, a.device, norm_group, v0)


@_lanczos_op.register_fake
def _(a: Tensor, k: int, steps: int, tol: float, seed: int, norm_group: int = 1, v0: Optional[Tensor] = None):
    B, m, _ = a.shape
    return (a.new_empty(B, k), a.new_empty(B, m, k), a.new_empty(B, k),
            a.new_empty(B, dtype=torch.int32), a.new_empty(B), a.new_empty(B, k))


@torch.library.custom_op("topoderiv::sensitivity_lanczos", mutates_args=(), device_types=("cpu", "cuda"))
def _sens_lanczos_op(
    x: Tensor, p: Tensor, bias: bool, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    m = x.shape[1] + int(bias)
    # the blocks of one point share ||Q|| = max_r ||B_r|| in the stop test
    return _run_lanczos(None, (x, p, bias), p.shape[1], m, k, steps, tol, seed, _acc_dtype(x.dtype), x.device,
                        p.shape[1], v0)


@_sens_lanczos_op.register_fake
def _(x: Tensor, p: Tensor, bias: bool, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor] = None):
    m = x.shape[1] + int(bias)
    n = p.shape[1]
    dt = _acc_dtype(x.dtype)
    return (x.new_empty(n, k, dtype=dt), x.new_empty(n, m, k, dtype=dt), x.new_empty(n, k, dtype=dt),
            x.new_empty(n, dtype=torch.int32), x.new_empty(n, dtype=dt), x.new_empty(n, k, dtype=dt))


# --------------------------------------------------------------------------------------------
# public API


def sensitivity_blocks(x: Tensor, p: Tensor, *, bias: bool = True, out: Optional[Tensor] = None) -> Tensor:
    """Sensitivity blocks ``B[r] = sum_s p[s, r] * xt[s] xt[s]^T``.

    Args:
        x: activations ``[..., d]`` (float32, float64 or bfloat16; CPU or CUDA).
        p: costates ``[..., n]`` with the same leading dims (samples, or samples x tokens) and dtype.
        bias: append a feature of ones to ``x`` (``m = d + 1``), else ``m = d``.
        out: optional float32/float64 ``[n, m, m]`` contiguous tensor on the same device; the result
            is ACCUMULATED into it (stream a data loader batch by batch) and ``out`` is returned.

    Returns:
        ``[n, m, m]``, symmetric, float32 for float32/bfloat16 inputs and float64 for float64 inputs
        (or ``out``'s dtype). Empty inputs give zeros. Extra memory is O(output + a fixed chunk).
    """
    fn = "sensitivity_blocks"
    x2, p2 = _flatten_pair(fn, x, p)
    if not isinstance(bias, bool):
        raise TypeError(f"{fn}: bias must be a bool, got {type(bias).__name__}")
    n, m = p2.shape[1], x2.shape[1] + int(bias)
    if m == 0:
        raise ValueError(f"{fn}: x must have d >= 1 features when bias=False, got d = 0")
    if out is None:
        return _blocks_op(x2, p2, bias)
    _check_tensor(fn, "out", out)
    _check_dtype(fn, "out", out, _ACC_DTYPES)
    if x.dtype == torch.float64 and out.dtype != torch.float64:
        raise TypeError(f"{fn}: out must be float64 for float64 inputs, got {out.dtype}")
    if tuple(out.shape) != (n, m, m):
        raise ValueError(f"{fn}: out must have shape [n, m, m] = {[n, m, m]}, got {list(out.shape)}")
    if out.device != x2.device:
        raise ValueError(f"{fn}: out must be on the same device as x ({x2.device}), got {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{fn}: out must be contiguous, got strides {out.stride()}")
    _blocks_acc_op(x2, p2, bias, out)
    return out


def sensitivity_matvec(x: Tensor, p: Tensor, v: Tensor, *, bias: bool = True) -> Tensor:
    """Applies every block to its own vector without forming the blocks: row ``r`` is ``B[r] @ v[r]``.

    Computed as ``(P * (Xt V^T))^T Xt``: two GEMM-shaped passes over the data, O(N n) extra memory
    on CUDA and O(chunk) on the CPU.

    Args:
        x: activations ``[..., d]``; p: costates ``[..., n]`` (same leading dims and dtype).
        v: ``[n, m]`` in the accumulation dtype (float32 for float32/bfloat16 inputs, float64 for
            float64 inputs), same device.
        bias: as in :func:`sensitivity_blocks`.

    Returns:
        ``[n, m]`` in ``v``'s dtype.
    """
    fn = "sensitivity_matvec"
    x2, p2 = _flatten_pair(fn, x, p)
    if not isinstance(bias, bool):
        raise TypeError(f"{fn}: bias must be a bool, got {type(bias).__name__}")
    v = _check_tensor(fn, "v", v)
    n, m = p2.shape[1], x2.shape[1] + int(bias)
    if m == 0:
        raise ValueError(f"{fn}: x must have d >= 1 features when bias=False, got d = 0")
    acc = _acc_dtype(x2.dtype)
    if v.dtype != acc:
        raise TypeError(f"{fn}: v must have dtype {acc} for {x2.dtype} inputs, got {v.dtype}")
    if tuple(v.shape) != (n, m):
        raise ValueError(f"{fn}: v must have shape [n, m] = {[n, m]}, got {list(v.shape)}")
    if v.device != x2.device:
        raise ValueError(f"{fn}: v must be on the same device as x ({x2.device}), got {v.device}")
    return _matvec_op(x2, p2, v.detach().contiguous(), bias)


class LanczosResult(tuple):
    """``(values, vectors)`` with extra attributes.

    Attributes:
        values: ``[B, k]`` algebraically largest eigenvalues, descending.
        vectors: ``[B, m, k]`` unit eigenvectors (columns).
        converged: ``[B]`` bool: every one of the k pairs met the tolerance (see lanczos_topk).
        residuals: ``[B]`` max over the k pairs of ``||A y - theta y|| / ||A||`` (recomputed
            explicitly, not the Lanczos estimate).
        steps: ``[B]`` int32 Krylov dimension used.
        norm: ``[B]`` the ``||A||_2`` estimate the residuals are relative to.
    """

    values: Tensor
    vectors: Tensor
    converged: Tensor
    residuals: Tensor
    steps: Tensor
    norm: Tensor

    def __new__(cls, values: Tensor, vectors: Tensor, converged: Tensor, residuals: Tensor,
                steps: Tensor, norm: Tensor) -> "LanczosResult":
        self = super().__new__(cls, (values, vectors))
        self.values, self.vectors = values, vectors
        self.converged, self.residuals, self.steps, self.norm = converged, residuals, steps, norm
        return self

    def __repr__(self) -> str:
        return (f"LanczosResult(values={self.values!r}, converged={self.converged!r}, "
                f"residuals={self.residuals!r}, steps={self.steps!r})")


def _default_steps(m: int, k: int) -> int:
    return min(m, max(64, 4 * k + 16))


def _check_lanczos_args(fn: str, m: int, k: object, steps: object, tol: object, seed: object) -> Tuple[int, int, float, int]:
    k = _check_int(fn, "k", k, 1)
    if k > m:
        raise ValueError(f"{fn}: k must be <= m = {m}, got k = {k}")
    if steps is None:
        steps = _default_steps(m, k)
    steps = _check_int(fn, "steps", steps, k)
    steps = min(steps, m)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"{fn}: tol must be a number, got {type(tol).__name__}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"{fn}: tol must be a finite number > 0, got {tol!r}")
    seed = _check_int(fn, "seed", seed, 0)
    return k, steps, float(tol), seed


def _check_v0(fn: str, v0: Optional[Tensor], shape: Tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> Optional[Tensor]:
    """Validates start vectors ``v0`` of ``shape``; returns them contiguous in the Lanczos dtype."""
    if v0 is None:
        return None
    v0 = _check_tensor(fn, "v0", v0)
    if not v0.is_floating_point():
        raise TypeError(f"{fn}: v0 must be a floating-point tensor, got {v0.dtype}")
    if tuple(v0.shape) != tuple(shape):
        raise ValueError(f"{fn}: v0 must have shape {list(shape)}, got {list(v0.shape)}")
    if v0.device != device:
        raise ValueError(f"{fn}: v0 must be on the same device as the operator ({device}), got {v0.device}")
    v0 = v0.detach()
    _check_finite(fn, "v0", v0)
    # normalise each row in float64 (scaled by its max first): any magnitude, no overflow or
    # underflow in the kernels' working dtype; all-zero rows stay zero (random start)
    v = v0.to(torch.float64)
    v = v / v.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return v.to(dtype).contiguous()


def _residual_floor(m: int, dtype: torch.dtype) -> float:
    """Round-off floor of a relative residual computed in ``dtype``: 4 sqrt(m) eps."""
    return 4.0 * math.sqrt(max(m, 1)) * torch.finfo(dtype).eps


def _finish(values: Tensor, vectors: Tensor, ritz: Tensor, nsteps: Tensor, anorm: Tensor,
            resid: Tensor, tol: float) -> LanczosResult:
    """Relative explicit residuals ``||A y - theta y|| / ||A||`` (``resid`` absolute) and the flags."""
    m = vectors.shape[1]
    scale = anorm.clamp_min(torch.finfo(anorm.dtype).tiny)
    true_res = resid / scale[:, None]  # [B, k]
    est = ritz / scale[:, None]
    limit = max(tol, _residual_floor(m, vectors.dtype))
    zero = anorm == 0
    converged = ((est <= tol) & (true_res <= limit)).all(dim=1) | zero
    residuals = torch.where(zero, torch.zeros_like(anorm), true_res.amax(dim=1) if true_res.numel() else anorm)
    return LanczosResult(values, vectors, converged, residuals, nsteps, anorm)


def lanczos_topk(
    a: Tensor, k: int = 1, *, steps: Optional[int] = None, tol: float = 1e-6, seed: int = 0,
    shared_norm: bool = False, v0: Optional[Tensor] = None,
) -> LanczosResult:
    """The ``k`` algebraically largest eigenpairs of each symmetric matrix of a batch.

    Batched Lanczos: seeded deterministic start vector, full re-orthogonalisation, and a stop when
    every wanted Ritz pair has ``|beta_j s_j| <= tol * ||A||``. ``converged`` is then re-checked
    with an explicit residual ``||A y - theta y|| <= max(tol, 4 sqrt(m) eps) * ||A||`` (the second
    term is the round-off floor of the dtype). Gapless spectra may need more than ``steps``: the
    flag then says False.

    Single-vector Lanczos sees one direction per distinct eigenvalue: with ``k >= 2`` an EXACTLY
    repeated eigenvalue is reported once (as in ARPACK's ``eigsh``); ``k = 1`` is unaffected.
    An invariant Krylov subspace found before convergence restarts from a fresh random vector.

    Args:
        a: ``[B, m, m]`` or ``[m, m]`` symmetric, float32 or float64, CPU or CUDA, finite.
        k: eigenpairs per matrix, ``1 <= k <= m``.
        steps: Krylov dimension cap (default ``min(m, max(64, 4k + 16))``; clamped to ``m``).
        tol: relative residual tolerance (> 0).
        seed: start-vector seed (the same seed gives the same result on CPU and CUDA up to rounding).
        shared_norm: measure every residual against the largest norm in the batch instead of each
            matrix's own (the batch is the blocks of ONE block-diagonal operator Q, whose norm is
            that max): blocks with small norms then stop sooner. ``norm`` reports the shared norm.
        v0: optional start vectors ``[B, m]`` (``[m]`` for a 2-D ``a``), any float dtype, finite,
            on ``a``'s device, any scale (rows are normalised). A good guess of the top
            eigenvector (a warm start) cuts the steps; an all-zero row starts from the seeded
            random vector. A start must have a non-negligible component along the wanted
            eigenvectors: one that is (within tol) another eigenvector stops there, reported as
            converged, as in every Krylov method. Mix in a little of a random vector when unsure
            (:func:`topoderiv.scoring.subspace_start` mixes in 1%).

    Returns:
        :class:`LanczosResult`, which unpacks as ``values [B, k], vectors [B, m, k]`` (no batch dim
        for a 2-D input) and carries ``converged [B]``, ``residuals [B]``, ``steps [B]``.
    """
    fn = "lanczos_topk"
    a = _check_tensor(fn, "a", a)
    _check_dtype(fn, "a", a, _ACC_DTYPES)
    squeeze = a.dim() == 2
    if a.dim() not in (2, 3) or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{fn}: a must have shape [B, m, m] or [m, m], got {list(a.shape)}")
    _check_device(fn, "a", a, a.device)
    a3 = a.detach().unsqueeze(0) if squeeze else a.detach()
    B, m = a3.shape[0], a3.shape[-1]
    if m == 0:
        raise ValueError(f"{fn}: a must have m >= 1, got m = 0")
    k, steps, tol, seed = _check_lanczos_args(fn, m, k, steps, tol, seed)
    a3 = a3.contiguous()
    if not torch.compiler.is_compiling() and a3.numel():
        # finiteness is checked by the kernel: any NaN/Inf reaches alpha/beta at the first step
        # symmetry spot check on a few rows/columns: O(B m), catches any generic non-symmetric input
        idx = torch.linspace(0, m - 1, min(m, 8), device=a3.device).round().long()
        rows, cols = a3[:, idx, :], a3[:, :, idx].mT
        asym = (rows - cols).abs().amax()
        if bool(asym > 1e3 * torch.finfo(a3.dtype).eps * rows.abs().amax().clamp_min(torch.finfo(a3.dtype).tiny)):
            raise ValueError(f"{fn}: a must be symmetric, got max |a - a^T| = {float(asym):.3g} on sampled rows")
    if not isinstance(shared_norm, bool):
        raise TypeError(f"{fn}: shared_norm must be a bool, got {type(shared_norm).__name__}")
    if v0 is not None:
        v0 = _check_v0(fn, v0, (m,) if squeeze else (B, m), a3.dtype, a3.device)
        v0 = v0.reshape(B, m)
    res = _finish(*_lanczos_op(a3, k, steps, tol, seed, B if shared_norm else 1, v0), tol)
    if squeeze:
        return LanczosResult(*(t[0] for t in (res.values, res.vectors, res.converged, res.residuals, res.steps, res.norm)))
    return res


@dataclass
class SensitivityTopK:
    """Top-k eigenpairs of every sensitivity block of one insertion point.

    Attributes:
        values: ``[n, k]`` eigenvalues of ``B[r]`` (NOT multiplied by sigma''(0)), descending.
        vectors: ``[n, m, k]`` unit eigenvectors.
        converged: ``[n]`` bool; residuals: ``[n]`` relative residuals (see :func:`lanczos_topk`).
        route: ``"dense"`` or ``"matfree"``, the route that ran.
    """

    values: Tensor
    vectors: Tensor
    converged: Tensor
    residuals: Tensor
    route: str

    @property
    def best_block(self) -> int:
        """``r*``: the block holding the largest eigenvalue (-1 when there are no blocks)."""
        return int(self.values[:, 0].argmax()) if self.values.numel() else -1

    @property
    def best_value(self) -> float:
        """``max_r lambda_max(B[r])`` (-inf when there are no blocks)."""
        return float(self.values[:, 0].max()) if self.values.numel() else float("-inf")

    @property
    def best_vector(self) -> Tensor:
        """Top eigenvector ``[m]`` of block ``r*``."""
        return self.vectors[self.best_block, :, 0]


def choose_route(N: int, d: int, n: int, *, bias: bool = True, k: int = 1,
                 memory_budget: float = 2 * 2**30, itemsize: int = 4) -> str:
    """Cost model of METHOD.md section 5: ``"dense"`` or ``"matfree"``.

    Dense: ``N n m(m+1)/2`` multiply-adds for the symmetric blocks, ``n m^2`` memory, then Lanczos
    on the blocks (``steps n m^2``). Matrix-free: ``2 steps N n m`` per solve; memory: the data
    plus the Krylov basis (``steps n m``; twice that on the CPU, which keeps every ``A v`` for
    the explicit residuals up to 512 MB). The dense route is refused when its blocks would exceed
    ``memory_budget`` bytes.
    """
    m = d + int(bias)
    steps = max(_EXPECTED_STEPS, 2 * k + 8)
    dense = N * n * m * (m + 1) / 2 + steps * n * m * m
    matfree = 2.0 * steps * N * n * m
    if n * m * m * itemsize > memory_budget:
        return "matfree"
    return "dense" if dense <= matfree else "matfree"


def sensitivity_topk(
    x: Tensor, p: Tensor, *, k: int = 1, bias: bool = True, route: str = "auto",
    steps: Optional[int] = None, tol: float = 1e-6, seed: int = 0, v0: Optional[Tensor] = None,
) -> SensitivityTopK:
    """Top-``k`` eigenpairs of every sensitivity block ``B[r]`` of ``(x, p)``.

    ``route="dense"`` forms the blocks (:func:`sensitivity_blocks`) and runs batched Lanczos on them;
    ``"matfree"`` drives Lanczos with :func:`sensitivity_matvec` and never forms a block;
    ``"auto"`` picks by :func:`choose_route`. The topological derivative of the insertion point is
    ``sigma''(0) * result.best_value`` (for sigma''(0) > 0), its block ``result.best_block`` and its
    initialisation ``result.best_vector``.

    Args:
        x: activations ``[..., d]``; p: costates ``[..., n]`` (same leading dims, dtype, device).
        k: eigenpairs per block. bias: as in :func:`sensitivity_blocks`.
        route: ``"auto"``, ``"dense"`` or ``"matfree"``.
        steps, tol, seed: as in :func:`lanczos_topk`; residuals are measured against
            ``||Q|| = max_r ||B_r||`` (the operator of the insertion point), so blocks far below
            the top one stop sooner.
        v0: optional start vectors ``[n, m]``, one per block (see :func:`lanczos_topk`); the
            scorer passes a warm start from a low-dimensional subspace of the activations.
    """
    fn = "sensitivity_topk"
    x2, p2 = _flatten_pair(fn, x, p)
    if not isinstance(bias, bool):
        raise TypeError(f"{fn}: bias must be a bool, got {type(bias).__name__}")
    if route not in _ROUTES:
        raise ValueError(f"{fn}: route must be one of {_ROUTES}, got {route!r}")
    S, d = x2.shape
    n, m = p2.shape[1], d + int(bias)
    if m == 0:
        raise ValueError(f"{fn}: x must have d >= 1 features when bias=False, got d = 0")
    k, steps, tol, seed = _check_lanczos_args(fn, m, k, steps, tol, seed)
    _check_finite(fn, "x", x2)
    _check_finite(fn, "p", p2)
    acc = _acc_dtype(x2.dtype)
    v0 = _check_v0(fn, v0, (n, m), acc, x2.device)
    if route == "auto":
        route = choose_route(S, d, n, bias=bias, k=k, itemsize=torch.finfo(acc).bits // 8)
    if route == "dense":
        res = _finish(*_lanczos_op(_blocks_op(x2, p2, bias), k, steps, tol, seed, n, v0), tol)
    else:
        res = _finish(*_sens_lanczos_op(x2, p2, bias, k, steps, tol, seed, v0), tol)
    return SensitivityTopK(res.values, res.vectors, res.converged, res.residuals, route)
