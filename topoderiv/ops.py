"""Drop-in ops for the topological derivative, as ``torch.library`` custom ops.

Public functions (documented) wrap the custom ops ``topoderiv::*``. The ops take 2-D inputs
(``x [N, d]``, ``p [N, n]``; the public functions flatten ``[..., d]``), validate everything they
are given with the same checks as the public functions (so ``torch.ops.topoderiv.*`` called
directly raises TypeError / ValueError / RuntimeError on bad input, never reads or writes out of
bounds), copy an input only when its columns are not unit-stride, allocate their outputs here in
Python (the C++ core never allocates) and pass the current CUDA stream to the kernels. The
bindings check every pointer against the span of its tensor once more
(csrc/include/topoderiv/validate.h).

The raw ops: ``sensitivity_blocks(x, p, bias)``, ``sensitivity_blocks_accumulate_(x, p, bias,
out)`` (``out [n, m, m]`` float32/float64, contiguous, sharing no memory with x or p; its upper
triangle is accumulated into and mirrored), ``sensitivity_matvec(x, p, v, bias)``,
``lanczos_topk(a [B, m, m], k, steps, tol, seed, norm_group=1, v0=None)`` (``steps`` in
``[k, m]``, ``seed`` in ``[0, 2^63 - 1]``, ``a`` finite and symmetric) and
``sensitivity_lanczos(x, p, bias, k, steps, tol, seed, v0=None)``; the Lanczos ops return
``(values, vectors, ritz estimates, steps, norms, explicit residuals)``.

The batched (multi-point) ops take L points of one shape in one launch:
``sensitivity_blocks_batched(x [L, N, d], p [L, N, n], bias)`` -> ``[L, n, m, m]``,
``sensitivity_lanczos_batched(x, p, bias, k, steps, tol, seed, v0=None [L, n, m], need=0)`` and
``lanczos_topk_batched(a [L, n, m, m], k, steps, tol, seed, v0=None, need=0)``; they return the
six Lanczos outputs as ``[L, n, ...]`` plus ``early [L, n]`` (bool: stopped by ``need=1``, the
rule "top"); each point's blocks share its norm and draw the start vectors of a single-point call.

The convolution ops (the paper's conv block, METHOD.md section 7) take ``x [N, C, H, W]``,
``p [N, n, H, W]`` with any strides (NCHW, channels-last, views: read in place, never copied), an odd
``kernel_size`` and same zero padding: ``conv_sensitivity_blocks(x, p, kernel_size, bias)``,
``conv_sensitivity_blocks_accumulate_(x, p, kernel_size, bias, out)``,
``conv_sensitivity_matvec(x, p, v, kernel_size, bias)`` and
``conv_sensitivity_lanczos(x, p, kernel_size, bias, k, steps, tol, seed, v0=None, need=0)`` (the six
Lanczos outputs plus ``early`` (bool: stopped by ``need=1``), flat over the blocks; a 5-D x/p holds L
points of one shape, each point's blocks a norm group); the patches are addressed inside the kernels
(csrc/include/topoderiv/conv_sensitivity.h).

All ops compute statistics, not differentiable functions: inputs are detached and the ops have no
autograd formula.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

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
    "dense_kernel",
    "has_cuda_kernels",
    "conv_sensitivity_blocks",
    "conv_sensitivity_matvec",
    "conv_sensitivity_topk",
    "choose_conv_route",
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
# validation, shared by the public functions and the custom ops (each message: function, argument,
# expectation, what was received). The custom ops validate everything they are given, so that
# ``torch.ops.topoderiv.*`` called directly raises instead of reading or writing out of bounds;
# the public functions call the same checks first (under their own name, data passes left to the
# ops) for their n-D arguments. ``real=False``: the fake (meta) kernels, shapes/dtypes/devices only.
# Behind this, csrc/bindings.cpp checks every pointer against the span of its tensor
# (csrc/include/topoderiv/validate.h).


def _check_tensor(fn: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dtype(fn: str, name: str, t: Tensor, allowed: Tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(_dtype_str(a) for a in allowed)
        raise TypeError(f"{fn}: {name} must have dtype in ({names}), got {_dtype_str(t.dtype)}")


def _check_device(fn: str, name: str, t: Tensor, device: torch.device, real: bool = True) -> None:
    if t.device != device:
        raise ValueError(f"{fn}: {name} must be on the same device as x ({device}), got {t.device}")
    if not real and device.type == "meta":
        return  # the fake kernels also serve as meta kernels (shape inference)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: {name} must be a CPU or CUDA tensor, got device {device}")
    if device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            f"{fn}: {name} is a CUDA tensor but this topoderiv build has no CUDA kernels; rebuild with "
            "nvcc on PATH: TOPODERIV_CUDA=ON pip install --no-build-isolation --no-deps ."
        )


def _check_finite(fn: str, name: str, t: Tensor) -> None:
    """One reduction over ``t`` (no bool temporary of its size)."""
    if t.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(t)  # NaN propagates, +-Inf shows at an end
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError(f"{fn}: {name} must contain only finite values, got NaN or Inf")


def _check_int(fn: str, name: str, v: object, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(v, torch.SymInt):  # traced with a symbolic value: checked when it runs
        return v  # type: ignore[return-value]
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{fn}: {name} must be {rng}, got {v}")
    return v


def _check_bias(fn: str, bias: object) -> bool:
    if not isinstance(bias, bool):
        raise TypeError(f"{fn}: bias must be a bool, got {type(bias).__name__}")
    return bias


def _unit_columns(t: Tensor) -> Tensor:
    """``t`` [rows, cols] as the kernels read it: unit column stride (a copy only when it has none)."""
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _span_bytes(t: Tensor) -> int:
    """Bytes from ``t.data_ptr()`` to one past its last element (0 when empty)."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))) * t.element_size()


def _buf(t: Optional[Tensor]) -> Tuple[int, int]:
    """``(pointer, span in bytes)``, what the bindings check every kernel access against."""
    return (0, 0) if t is None else (t.data_ptr(), _span_bytes(t))


def _overlaps(a: Tensor, b: Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    pa, pb = a.data_ptr(), b.data_ptr()
    return pa < pb + _span_bytes(b) and pb < pa + _span_bytes(a)


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
    return _unit_columns(x2), _unit_columns(p2)


def _check_pair(fn: str, x: object, p: object, bias: object, real: bool = True,
                data: bool = True) -> Tuple[Tensor, Tensor]:
    """The ops' (x [N, d], p [N, n]) and bias; returns x, p with unit column stride.

    ``data``: also one finite-value reduction per input.
    """
    x = _check_tensor(fn, "x", x)
    p = _check_tensor(fn, "p", p)
    _check_dtype(fn, "x", x, _INPUT_DTYPES)
    if p.dtype != x.dtype:
        raise TypeError(f"{fn}: p must have the same dtype as x ({x.dtype}), got {p.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be 2-D [N, d] (the public functions flatten [..., d]), got shape "
                         f"{list(x.shape)}")
    if p.dim() != 2:
        raise ValueError(f"{fn}: p must be 2-D [N, n], got shape {list(p.shape)}")
    if p.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: p must have as many rows as x (N = {x.shape[0]}), got {p.shape[0]}")
    _check_bias(fn, bias)
    if x.shape[1] + int(bias) == 0:
        raise ValueError(f"{fn}: x must have d >= 1 features when bias=False, got d = 0")
    _check_device(fn, "x", x, x.device, real)
    _check_device(fn, "p", p, x.device, real)
    if not real:
        return x, p
    if data:
        _check_finite(fn, "x", x)
        _check_finite(fn, "p", p)
    return _unit_columns(x), _unit_columns(p)


def _check_out(fn: str, out: object, x: Tensor, p: Tensor, bias: bool, real: bool = True, *,
               m: Optional[int] = None, m_is: str = "") -> Tensor:
    """``out`` [n, m, m] of the accumulating form: float32/float64, contiguous, sharing no memory with x, p.
    ``m`` defaults to ``d + bias`` (rows of features); ``m_is`` describes another one in the error."""
    out = _check_tensor(fn, "out", out)
    _check_dtype(fn, "out", out, _ACC_DTYPES)
    if x.dtype == torch.float64 and out.dtype != torch.float64:
        raise TypeError(f"{fn}: out must be float64 for float64 inputs, got {out.dtype}")
    n, m = p.shape[1], (x.shape[1] + int(bias) if m is None else m)
    if tuple(out.shape) != (n, m, m):
        raise ValueError(f"{fn}: out must have shape [n, m, m] = {[n, m, m]}{m_is}, got {list(out.shape)}")
    if out.device != x.device:
        raise ValueError(f"{fn}: out must be on the same device as x ({x.device}), got {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{fn}: out must be contiguous, got strides {out.stride()}")
    if real:
        for name, t in (("x", x), ("p", p)):
            if _overlaps(out, t):
                raise ValueError(f"{fn}: out must not share memory with {name} (out is accumulated into while "
                                 f"{name} is read), got overlapping memory")
    return out


def _check_v(fn: str, v: object, x: Tensor, p: Tensor, bias: bool, real: bool = True, data: bool = True) -> Tensor:
    """The matvec's ``v`` [n, m] in the accumulation dtype; returned contiguous."""
    v = _check_tensor(fn, "v", v)
    acc = _acc_dtype(x.dtype)
    if v.dtype != acc:
        raise TypeError(f"{fn}: v must have dtype {acc} for {x.dtype} inputs, got {v.dtype}")
    n, m = p.shape[1], x.shape[1] + int(bias)
    if tuple(v.shape) != (n, m):
        raise ValueError(f"{fn}: v must have shape [n, m] = {[n, m]}, got {list(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{fn}: v must be on the same device as x ({x.device}), got {v.device}")
    if not real:
        return v
    if data:
        _check_finite(fn, "v", v)
    return v.contiguous()


def _default_steps(m: int, k: int) -> int:
    return min(m, max(64, 4 * k + 16))


_SEED_MAX = 2**63 - 1


def _check_lanczos_args(fn: str, m: int, k: object, steps: object, tol: object, seed: object,
                        clamp: bool = True) -> Tuple[int, int, float, int]:
    """k in [1, m]; steps >= k (None: the default; ``clamp``: cut to m, else it must be <= m);
    tol finite > 0; seed in [0, 2^63 - 1]."""
    k = _check_int(fn, "k", k, 1)
    if k > m:
        raise ValueError(f"{fn}: k must be <= m = {m}, got k = {k}")
    if steps is None:
        steps = _default_steps(m, k)
    if clamp:
        steps = min(_check_int(fn, "steps", steps, k), m)
    else:
        steps = _check_int(fn, "steps", steps, k, m)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"{fn}: tol must be a number, got {type(tol).__name__}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"{fn}: tol must be a finite number > 0, got {tol!r}")
    seed = _check_int(fn, "seed", seed, 0, _SEED_MAX)
    return k, steps, float(tol), seed


def _check_v0(fn: str, v0: Optional[Tensor], shape: Tuple[int, ...], device: torch.device,
              real: bool = True, data: bool = True) -> Optional[Tensor]:
    """Validates start vectors ``v0`` of ``shape`` (any float dtype, finite); not normalised here."""
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
    if real and data:
        _check_finite(fn, "v0", v0)
    return v0


def _normalise_v0(v0: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """Each row normalised in float64 (scaled by its max first): any magnitude, no overflow or
    underflow in the kernels' working dtype; all-zero rows stay zero (random start). Contiguous."""
    if v0 is None:
        return None
    v = v0.to(torch.float64)
    v = v / v.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return v.to(dtype).contiguous()


def _check_matrices(fn: str, a: object, real: bool = True) -> Tensor:
    """The Lanczos op's ``a`` [B, m, m], float32/float64, m >= 1; returned contiguous."""
    a = _check_tensor(fn, "a", a)
    _check_dtype(fn, "a", a, _ACC_DTYPES)
    if a.dim() != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{fn}: a must have shape [B, m, m], got {list(a.shape)}")
    if a.shape[-1] == 0:
        raise ValueError(f"{fn}: a must have m >= 1, got m = 0")
    _check_device(fn, "a", a, a.device, real)
    return a.contiguous() if real else a


# elements of a^T - a formed at a time by the symmetry check (4 MB in float32)
_SYM_CHUNK = 2**20


def _check_symmetric(fn: str, a: Tensor, norm_group: int) -> None:
    """``a`` [B, m, m] contiguous: finite, and ``max |a - a^T| <= 1e3 eps max |a|`` over every entry,
    ``max |a|`` over the matrix's norm group (the norm its results are measured against).

    Cost: one transposed copy and two reductions over ``a`` (the differences are formed in a
    buffer of ``_SYM_CHUNK`` elements), about a third of one Lanczos step's symv.
    """
    B, m = a.shape[0], a.shape[-1]
    if a.numel() == 0 or torch.compiler.is_compiling():
        return
    flat = a.reshape(B, m * m)
    big = torch.maximum(flat.amax(dim=1), -flat.amin(dim=1))  # [B] max |a|; NaN propagates, +-Inf shows
    if not bool(torch.isfinite(big).all()):
        raise ValueError(f"{fn}: a must contain only finite values, got NaN or Inf")
    asym = torch.empty_like(big)  # a^T - a is antisymmetric: its max is its max |.|
    if m * m <= _SYM_CHUNK:
        per = max(1, _SYM_CHUNK // (m * m))
        buf = a.new_empty(min(per, B), m, m)
        for b0 in range(0, B, per):
            c = a[b0:b0 + per]
            t = buf[:c.shape[0]]
            t.copy_(c.mT)
            asym[b0:b0 + per] = t.sub_(c).amax(dim=(1, 2))
    else:
        rows = max(1, _SYM_CHUNK // m)
        buf = a.new_empty(m, rows)
        for b in range(B):
            worst = a.new_zeros(())
            for r0 in range(0, m, rows):
                cols = a[b, :, r0:r0 + rows]  # compared with rows r0.. of a[b]
                t = buf[:, :cols.shape[1]]
                t.copy_(a[b, r0:r0 + rows].mT)
                worst = torch.maximum(worst, t.sub_(cols).abs_().amax())
            asym[b] = worst
    if norm_group > 1:
        groups = -(-B // norm_group)
        padded = big.new_zeros(groups * norm_group)
        padded[:B] = big
        big = padded.view(groups, norm_group).amax(dim=1).repeat_interleave(norm_group)[:B]
    limit = 1e3 * torch.finfo(a.dtype).eps * big
    bad = asym > limit
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: a must be symmetric, got max |a - a^T| = {float(asym[b]):.3g} > "
                         f"{float(limit[b]):.3g} (1e3 eps x max |a|) in matrix {b}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stream(t: Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream if t.device.type == "cuda" else 0


def _rstride(t: Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


# --------------------------------------------------------------------------------------------
# custom ops: 2-D inputs (x [N, d], p [N, n]); each validates its arguments (above) and copies an
# input only when its columns are not unit-stride. The _impl functions run validated arguments.


# bfloat16 dense blocks on CUDA (issue 9): besides the SIMT kernel (float32 FMAs, exact products),
# two tensor-core routes, both with one extra bf16 rounding per term (|error| <= 2^-8 sum_s |p x_i x_j|
# + float32 sums; csrc/include/topoderiv/sensitivity_tc.h):
#   "mma":   the fused kernel with bf16 WMMA (mma.sync) tiles (design 1, sensitivity_tc_cuda.cu);
#   "pairs": z[s, (i, j)] = xt_i xt_j for the upper-triangle pairs (a CUDA kernel), then
#            C[r, (i, j)] = P^T z as a torch matmul (cuBLAS), chunked, unpacked and mirrored (design 2).
# Until a GPU has measured them (benchmarks/bench_gpu.py), dense_kernel picks "pairs" when n is large
# enough for the z traffic (2 bytes per n multiply-adds) to stay below the GEMM's time, "mma" for
# smaller n, and "simt" when m < 64 (the 64-wide tensor-core tiles would be mostly padding).
# Override: TOPODERIV_DENSE_KERNEL=simt|mma|pairs (bf16 CUDA inputs only; "auto" = the rule).
_DENSE_KERNELS = ("auto", "simt", "mma", "pairs")
_DENSE_KERNEL_ENV = "TOPODERIV_DENSE_KERNEL"
_PAIRS_MIN_N = 256           # "pairs" from this many blocks on (the GEMM's M dimension)
_TC_MIN_M = 64               # tensor-core routes from this block size on
_PAIR_BUDGET_BYTES = 512 * 2**20  # largest z chunk of the "pairs" route ([rows, pairs] bf16)
_PAIR_MAX_ROWS = 65536       # rows per z chunk (the GEMM's reduction length)
_MM_OUT_DTYPE = [True]       # torch.mm(..., out_dtype=float32) works here (cleared on first failure)


def dense_kernel(dtype: torch.dtype, device: object, N: int, d: int, n: int, *, bias: bool = True) -> str:
    """The kernel :func:`sensitivity_blocks` runs for these inputs.

    ``"cpu"`` on the CPU; on CUDA ``"simt"`` for float32/float64 and, for bfloat16, the dispatch rule
    (``"simt"``, ``"mma"`` or ``"pairs"``, see the comment above) unless the environment variable
    ``TOPODERIV_DENSE_KERNEL`` forces one (``auto``, ``simt``, ``mma``, ``pairs``).
    """
    fn = "dense_kernel"
    force = os.environ.get(_DENSE_KERNEL_ENV, "auto").strip().lower() or "auto"
    if force not in _DENSE_KERNELS:
        raise ValueError(f"{fn}: environment variable {_DENSE_KERNEL_ENV} must be one of {_DENSE_KERNELS}, "
                         f"got {force!r}")
    if torch.device(device).type != "cuda":
        return "cpu"
    if dtype != torch.bfloat16:
        return "simt"
    if force != "auto":
        return force
    m = d + int(bias)
    if m < _TC_MIN_M or N == 0:
        return "simt"
    return "pairs" if n >= _PAIRS_MIN_N else "mma"


def _tri_offset(m: int, i: int) -> int:
    """Index of pair (i, i) in the row-major upper triangle (with diagonal) of an m x m matrix."""
    return i * m - i * (i - 1) // 2


def _cuda_pair_products(x: Tensor, bias: bool, i0: int, i1: int) -> Tensor:
    """z [N, pairs of triangle rows i0..i1-1] bf16 = xt_i xt_j rounded once (the CUDA kernel)."""
    N, d = x.shape
    m = d + int(bias)
    z = torch.empty(N, _tri_offset(m, i1) - _tri_offset(m, i0), dtype=torch.bfloat16, device=x.device)
    _lib().sensitivity_pair_products("cuda", _buf(x), _rstride(x), _buf(z), N, d, bool(bias), i0, i1,
                                     _DTYPE_CODE[x.dtype], _stream(x))
    return z


def _gemm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a [n, K] @ b [K, W] of bf16 operands with float32 products, sums and result."""
    if a.device.type != "cuda":
        return torch.mm(a.float(), b.float())  # the CPU stand-in: products of bf16 values are exact in float32
    if _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)  # cuBLAS, float32 accumulation and output
        except torch.OutOfMemoryError:
            raise
        except (TypeError, NotImplementedError, RuntimeError):  # this torch has no mm(out_dtype=...)
            _MM_OUT_DTYPE[0] = False
    # older torch: a float32 GEMM of the bf16 values (exact products, float32 sums; TF32 tensor cores
    # when torch allows them: bf16 values are exact in TF32), never a bf16 result
    return torch.mm(a.float(), b.float())


def _pair_blocks(x: Tensor, p: Tensor, bias: bool, out: Tensor, pair_products=_cuda_pair_products,
                 budget_bytes: int = _PAIR_BUDGET_BYTES, max_rows: int = _PAIR_MAX_ROWS) -> None:
    """out [n, m, m] float32 += blocks by the "pairs" route (design 2).

    The triangle rows are taken in groups whose pairs fit ``budget_bytes`` of z for ``max_rows`` rows
    (at least one triangle row per group); per group, z chunks of at most ``max_rows`` rows give
    C [n, pairs] = sum over chunks of P_chunk^T z_chunk, added into out's upper triangle and mirrored
    into its lower one. ``pair_products(x_rows, bias, i0, i1)`` makes z (tests pass a CPU stand-in).
    """
    S, d = x.shape
    n = p.shape[1]
    m = d + int(bias)
    rows = max(1, min(S, max_rows))
    width = max(budget_bytes // (2 * rows), m)
    iu = torch.triu_indices(m, m, device=out.device)  # row-major over the triangle, as _tri_offset
    up, lo = iu[0] * m + iu[1], iu[1] * m + iu[0]
    offdiag = iu[0] != iu[1]
    flat = out.view(n, m * m)
    i0 = 0
    while i0 < m:
        i1 = i0 + 1
        while i1 < m and _tri_offset(m, i1 + 1) - _tri_offset(m, i0) <= width:
            i1 += 1
        q0, q1 = _tri_offset(m, i0), _tri_offset(m, i1)
        c: Optional[Tensor] = None
        for s0 in range(0, S, rows):
            z = pair_products(x[s0:s0 + rows], bias, i0, i1)
            part = _gemm_f32(p[s0:s0 + rows].mT, z)
            c = part if c is None else c.add_(part)
        assert c is not None
        od = offdiag[q0:q1]
        flat.index_add_(1, up[q0:q1], c)
        flat.index_add_(1, lo[q0:q1][od], c[:, od])
        i0 = i1


def _blocks_impl(x: Tensor, p: Tensor, bias: bool, out: Tensor) -> None:
    S, d = x.shape
    n = p.shape[1]
    if S == 0 or n == 0 or out.numel() == 0:
        return
    if x.device.type == "cuda" and x.dtype == torch.bfloat16 and out.dtype == torch.float32:
        kernel = dense_kernel(x.dtype, x.device, S, d, n, bias=bias)
        if kernel == "pairs":
            _pair_blocks(x, p, bias, out)
            return
        if kernel == "mma":
            _lib().sensitivity_blocks_mma(
                "cuda", _buf(x), _rstride(x), _buf(p), _rstride(p), _buf(out), 1, S, d, n, 0, 0, bool(bias),
                _DTYPE_CODE[x.dtype], _DTYPE_CODE[out.dtype], _stream(x),
            )
            return
    _lib().sensitivity_blocks(
        x.device.type, _buf(x), _rstride(x), _buf(p), _rstride(p), _buf(out),
        1, S, d, n, 0, 0, bool(bias), _DTYPE_CODE[x.dtype], _DTYPE_CODE[out.dtype],
        torch.get_num_threads(), _stream(x),
    )


def _new_blocks(x: Tensor, p: Tensor, bias: bool) -> Tensor:
    m = x.shape[1] + int(bias)
    return torch.zeros(p.shape[1], m, m, dtype=_acc_dtype(x.dtype), device=x.device)


@torch.library.custom_op("topoderiv::sensitivity_blocks", mutates_args=(), device_types=("cpu", "cuda"))
def _blocks_op(x: Tensor, p: Tensor, bias: bool) -> Tensor:
    x, p = _check_pair("sensitivity_blocks", x, p, bias)
    out = _new_blocks(x, p, bias)
    _blocks_impl(x, p, bias, out)
    return out


@_blocks_op.register_fake
def _(x: Tensor, p: Tensor, bias: bool) -> Tensor:
    x, p = _check_pair("sensitivity_blocks", x, p, bias, real=False)
    m = x.shape[1] + int(bias)
    return x.new_empty(p.shape[1], m, m, dtype=_acc_dtype(x.dtype))


@torch.library.custom_op(
    "topoderiv::sensitivity_blocks_accumulate_", mutates_args=("out",), device_types=("cpu", "cuda")
)
def _blocks_acc_op(x: Tensor, p: Tensor, bias: bool, out: Tensor) -> None:
    fn = "sensitivity_blocks_accumulate_"
    x, p = _check_pair(fn, x, p, bias)
    _check_out(fn, out, x, p, bias)
    if x.device.type == "cuda" and out.dtype != _acc_dtype(x.dtype):
        # the CUDA kernels accumulate float32/bfloat16 inputs in float32 only
        tmp = _new_blocks(x, p, bias)
        _blocks_impl(x, p, bias, tmp)
        out.add_(tmp)
        return
    _blocks_impl(x, p, bias, out)


@_blocks_acc_op.register_fake
def _(x: Tensor, p: Tensor, bias: bool, out: Tensor) -> None:
    fn = "sensitivity_blocks_accumulate_"
    x, p = _check_pair(fn, x, p, bias, real=False)
    _check_out(fn, out, x, p, bias, real=False)
    return None


def _matvec_impl(x: Tensor, p: Tensor, v: Tensor, bias: bool) -> Tensor:
    S, d = x.shape
    n = p.shape[1]
    out = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    if S == 0 or n == 0 or v.shape[1] == 0:
        return out
    ws = torch.empty(S * n if x.device.type == "cuda" else 0, dtype=v.dtype, device=x.device)
    _lib().sensitivity_matvec(
        x.device.type, _buf(x), _rstride(x), _buf(p), _rstride(p), _buf(v), _buf(out),
        _buf(ws) if ws.numel() else (0, 0),
        1, S, d, n, 0, 0, bool(bias), _DTYPE_CODE[x.dtype], _DTYPE_CODE[v.dtype],
        torch.get_num_threads(), _stream(x),
    )
    return out


@torch.library.custom_op("topoderiv::sensitivity_matvec", mutates_args=(), device_types=("cpu", "cuda"))
def _matvec_op(x: Tensor, p: Tensor, v: Tensor, bias: bool) -> Tensor:
    fn = "sensitivity_matvec"
    x, p = _check_pair(fn, x, p, bias, data=False)
    v = _check_v(fn, v, x, p, bias, data=False)
    out = _matvec_impl(x, p, v, bias)
    # Finite values, checked on the small output instead of the inputs: a NaN or Inf anywhere in
    # x, p or v reaches the output (IEEE: Inf * 0 = NaN, Inf + finite = Inf), so finite outputs
    # from non-empty data prove finite inputs (screened by the sum: a finite sum means finite
    # entries). A non-finite output names the input; if every input is finite the output (or
    # only its sum) overflowed and is returned as computed.
    if out.numel() == 0 or x.shape[0] == 0 or not math.isfinite(float(out.sum(dtype=torch.float64))):
        for name, t in (("x", x), ("p", p), ("v", v)):
            _check_finite(fn, name, t)
    return out


@_matvec_op.register_fake
def _(x: Tensor, p: Tensor, v: Tensor, bias: bool) -> Tensor:
    fn = "sensitivity_matvec"
    x, p = _check_pair(fn, x, p, bias, real=False)
    v = _check_v(fn, v, x, p, bias, real=False)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _lanczos_outputs(B: int, m: int, k: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, ...]:
    """The Lanczos kernels' output buffers, zeroed: values [B, k], vectors [B, m, k], ritz estimates
    [B, k], steps [B] int32, ||A|| estimates [B] (float64, on the CPU), explicit residuals [B, k],
    stopped early [B] (uint8, on the CPU)."""
    return (torch.zeros(B, k, dtype=dtype, device=device), torch.zeros(B, m, k, dtype=dtype, device=device),
            torch.zeros(B, k, dtype=dtype, device=device), torch.zeros(B, dtype=torch.int32, device=device),
            torch.zeros(B, dtype=torch.float64), torch.zeros(B, k, dtype=dtype, device=device),
            torch.zeros(B, dtype=torch.uint8))


def _lanczos_result(values: Tensor, vectors: Tensor, ritz: Tensor, nsteps: Tensor, anorm: Tensor, resid: Tensor,
                    early: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ops' 7-tuple from :func:`_lanczos_outputs`' buffers: ||A|| in the values' dtype and device,
    stopped early as bool on that device."""
    return (values, vectors, ritz, nsteps, anorm.to(dtype=values.dtype, device=values.device), resid,
            early.to(device=values.device, dtype=torch.bool))


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
    seed_period: int = 0,
    need: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Runs the kernel on validated arguments (v0 normalised, contiguous, in ``dtype``); returns
    (values, vectors, ritz estimates, steps, ||A|| estimate, explicit residuals, stopped early).

    ``mf``: ``(x [L, N, d], p [L, N, n], bias)`` for L operators of n blocks (``B = L n``), each
    ``x[l]`` / ``p[l]`` with unit column stride and batch stride ``N`` times its row stride.
    ``need``: 0 every problem to tolerance, 1 only the top problem of each norm group (lanczos.h).
    """
    values, vectors, ritz, nsteps, anorm, resid, early = _lanczos_outputs(B, m, k, dtype, device)
    if B == 0:
        return _lanczos_result(values, vectors, ritz, nsteps, anorm, resid, early)
    cuda = device.type == "cuda"
    # the CPU backend computes the explicit residuals itself: dense in cache, matrix-free from the
    # A v_t it applied (no extra pass over the data, but as much memory again as the Krylov basis:
    # above _MF_RESIDUAL_BYTES the residuals take k extra operator applications instead)
    in_kernel_residual = not cuda and (mf is None or steps * B * m * dtype.itemsize <= _MF_RESIDUAL_BYTES)
    if mf is None:
        assert a is not None
        op = ((0, 0), 0, (0, 0), 0, 0, 0, 0, 0, True, 0)
        buf_a = _buf(a)
    else:
        x, p, bias = mf
        op = (_buf(x), _rstride(x[0]), _buf(p), _rstride(p[0]), x.shape[0], x.shape[1], x.shape[2],
              p.shape[2], bool(bias), _DTYPE_CODE[x.dtype])
        buf_a = (0, 0)
    n_ws = _lib().lanczos_workspace_elems(B, m, k, steps, mf is not None, cuda, op[5], op[7], op[4])
    # CUDA matrix-free steps apply the operator to every block, converged ones included, whose
    # later basis slots are never written: zero them so no uninitialised memory is read (the CPU
    # backend zeroes those slots itself, one step at a time)
    ws = (torch.zeros if mf is not None and cuda else torch.empty)(n_ws, dtype=dtype, device=device)
    _lib().lanczos_topk(
        device.type, buf_a, *op, B, m, k, steps, float(tol), int(seed), max(1, int(norm_group)),
        _buf(v0), _DTYPE_CODE[dtype],
        _buf(values), _buf(vectors), _buf(ritz), _buf(nsteps), _buf(anorm),
        _buf(resid) if in_kernel_residual else (0, 0), _buf(ws), torch.get_num_threads(), _stream(ws),
        int(seed_period), int(need), _buf(early),
    )
    if not in_kernel_residual:
        if mf is None:
            av = a @ vectors
        else:
            x, p, bias = mf
            n = p.shape[2]
            av = torch.cat([
                torch.stack([_matvec_impl(x[l], p[l], vectors[l * n:(l + 1) * n, :, c].contiguous(), bias)
                             for c in range(k)], dim=2)
                for l in range(x.shape[0])])
        resid = (av - vectors * values[:, None, :]).norm(dim=1)
    return _lanczos_result(values, vectors, ritz, nsteps, anorm, resid, early)


def _check_lanczos_op(fn: str, a: Tensor, k: int, steps: int, tol: float, seed: int, norm_group: int,
                      v0: Optional[Tensor], real: bool) -> Tuple[Tensor, Optional[Tensor]]:
    a = _check_matrices(fn, a, real)
    B, m = a.shape[0], a.shape[-1]
    _check_lanczos_args(fn, m, k, steps, tol, seed, clamp=False)
    _check_int(fn, "norm_group", norm_group, 1)
    v0 = _check_v0(fn, v0, (B, m), a.device, real)
    if real:
        _check_symmetric(fn, a, norm_group)
    return a, v0


@torch.library.custom_op("topoderiv::lanczos_topk", mutates_args=(), device_types=("cpu", "cuda"))
def _lanczos_op(a: Tensor, k: int, steps: int, tol: float, seed: int, norm_group: int = 1,
                v0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    a, v0 = _check_lanczos_op("lanczos_topk", a, k, steps, tol, seed, norm_group, v0, True)
    B, m, _ = a.shape
    return _run_lanczos(a, None, B, m, k, steps, tol, seed, a.dtype, a.device, norm_group,
                        _normalise_v0(v0, a.dtype))[:6]


@_lanczos_op.register_fake
def _(a: Tensor, k: int, steps: int, tol: float, seed: int, norm_group: int = 1, v0: Optional[Tensor] = None):
    a, v0 = _check_lanczos_op("lanczos_topk", a, k, steps, tol, seed, norm_group, v0, False)
    B, m, _ = a.shape
    return (a.new_empty(B, k), a.new_empty(B, m, k), a.new_empty(B, k),
            a.new_empty(B, dtype=torch.int32), a.new_empty(B), a.new_empty(B, k))


def _check_sens_lanczos_op(fn: str, x: Tensor, p: Tensor, bias: bool, k: int, steps: int, tol: float, seed: int,
                           v0: Optional[Tensor], real: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    x, p = _check_pair(fn, x, p, bias, real)
    m = x.shape[1] + int(bias)
    _check_lanczos_args(fn, m, k, steps, tol, seed, clamp=False)
    v0 = _check_v0(fn, v0, (p.shape[1], m), x.device, real)
    return x, p, v0


@torch.library.custom_op("topoderiv::sensitivity_lanczos", mutates_args=(), device_types=("cpu", "cuda"))
def _sens_lanczos_op(
    x: Tensor, p: Tensor, bias: bool, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, p, v0 = _check_sens_lanczos_op("sensitivity_lanczos", x, p, bias, k, steps, tol, seed, v0, True)
    m = x.shape[1] + int(bias)
    acc = _acc_dtype(x.dtype)
    # the blocks of one point share ||Q|| = max_r ||B_r|| in the stop test
    return _run_lanczos(None, (x[None], p[None], bias), p.shape[1], m, k, steps, tol, seed, acc, x.device,
                        max(1, p.shape[1]), _normalise_v0(v0, acc))[:6]


@_sens_lanczos_op.register_fake
def _(x: Tensor, p: Tensor, bias: bool, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor] = None):
    x, p, v0 = _check_sens_lanczos_op("sensitivity_lanczos", x, p, bias, k, steps, tol, seed, v0, False)
    m = x.shape[1] + int(bias)
    n = p.shape[1]
    dt = _acc_dtype(x.dtype)
    return (x.new_empty(n, k, dtype=dt), x.new_empty(n, m, k, dtype=dt), x.new_empty(n, k, dtype=dt),
            x.new_empty(n, dtype=torch.int32), x.new_empty(n, dtype=dt), x.new_empty(n, k, dtype=dt))


# batched forms: L insertion points of identical shape in one launch (the multi-point
# sensitivity_topk). Problem l * n + r is block r of point l; the points' blocks share their point's
# norm (norm_group = n) and draw the start vectors of a single-point call (seed_period = n).

_NEEDS = {"all": 0, "top": 1}


def _batched_layout(t: Tensor) -> Tensor:
    """``t [L, N, c]`` as the batched kernels read it: unit column stride, batch stride ``N`` times
    the row stride (a copy only when it is not)."""
    L, N, c = t.shape
    if c > 1 and t.stride(2) != 1:
        t = t.contiguous()
    rs = t.stride(1) if N > 1 else c
    if L > 1 and N > 0 and c > 0 and t.stride(0) != N * rs:
        t = t.contiguous()
    return t


def _check_batched_pair(fn: str, x: object, p: object, bias: object, real: bool = True) -> Tuple[Tensor, Tensor]:
    """The batched ops' ``x [L, N, d]``, ``p [L, N, n]`` (same L, N, dtype, device), bias; finite."""
    x = _check_tensor(fn, "x", x)
    p = _check_tensor(fn, "p", p)
    _check_dtype(fn, "x", x, _INPUT_DTYPES)
    if p.dtype != x.dtype:
        raise TypeError(f"{fn}: p must have the same dtype as x ({x.dtype}), got {p.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be 3-D [L, N, d] (L points), got shape {list(x.shape)}")
    if p.dim() != 3:
        raise ValueError(f"{fn}: p must be 3-D [L, N, n], got shape {list(p.shape)}")
    if p.shape[:2] != x.shape[:2]:
        raise ValueError(f"{fn}: p [L, N, n] must have x's L and N ({list(x.shape[:2])}), got {list(p.shape[:2])}")
    _check_bias(fn, bias)
    if x.shape[2] + int(bias) == 0:
        raise ValueError(f"{fn}: x must have d >= 1 features when bias=False, got d = 0")
    _check_device(fn, "x", x, x.device, real)
    _check_device(fn, "p", p, x.device, real)
    if not real:
        return x, p
    _check_finite(fn, "x", x)
    _check_finite(fn, "p", p)
    return _batched_layout(x.detach()), _batched_layout(p.detach())


def _batched_outputs(t: Tuple[Tensor, ...], L: int, n: int) -> Tuple[Tensor, ...]:
    """The flat [L n, ...] outputs of _run_lanczos as [L, n, ...]."""
    return tuple(o.reshape((L, n) + tuple(o.shape[1:])) for o in t)


def _check_need(fn: str, need: object) -> int:
    return _check_int(fn, "need", need, 0, 1)


@torch.library.custom_op("topoderiv::sensitivity_blocks_batched", mutates_args=(), device_types=("cpu", "cuda"))
def _blocks_batched_op(x: Tensor, p: Tensor, bias: bool) -> Tensor:
    fn = "sensitivity_blocks_batched"
    x, p = _check_batched_pair(fn, x, p, bias)
    L, N, d = x.shape
    n, m = p.shape[2], d + int(bias)
    out = torch.zeros(L, n, m, m, dtype=_acc_dtype(x.dtype), device=x.device)
    if L == 0 or N == 0 or n == 0:
        return out
    xrs, prs = _rstride(x[0]), _rstride(p[0])
    _lib().sensitivity_blocks(
        x.device.type, _buf(x), xrs, _buf(p), prs, _buf(out),
        L, N, d, n, N * xrs, N * prs, bool(bias), _DTYPE_CODE[x.dtype], _DTYPE_CODE[out.dtype],
        torch.get_num_threads(), _stream(x),
    )
    return out


@_blocks_batched_op.register_fake
def _(x: Tensor, p: Tensor, bias: bool) -> Tensor:
    x, p = _check_batched_pair("sensitivity_blocks_batched", x, p, bias, real=False)
    m = x.shape[2] + int(bias)
    return x.new_empty(x.shape[0], p.shape[2], m, m, dtype=_acc_dtype(x.dtype))


def _check_sens_lanczos_batched(fn: str, x: Tensor, p: Tensor, bias: bool, k: int, steps: int, tol: float,
                                seed: int, v0: Optional[Tensor], need: int,
                                real: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    x, p = _check_batched_pair(fn, x, p, bias, real)
    m = x.shape[2] + int(bias)
    _check_lanczos_args(fn, m, k, steps, tol, seed, clamp=False)
    _check_need(fn, need)
    v0 = _check_v0(fn, v0, (x.shape[0], p.shape[2], m), x.device, real)
    return x, p, v0


@torch.library.custom_op("topoderiv::sensitivity_lanczos_batched", mutates_args=(), device_types=("cpu", "cuda"))
def _sens_lanczos_batched_op(
    x: Tensor, p: Tensor, bias: bool, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor] = None,
    need: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Matrix-free Lanczos on the blocks of L points ``x [L, N, d]``, ``p [L, N, n]`` in one launch;
    returns ``[L, n, ...]`` outputs plus ``early [L, n]`` (see _run_lanczos)."""
    fn = "sensitivity_lanczos_batched"
    x, p, v0 = _check_sens_lanczos_batched(fn, x, p, bias, k, steps, tol, seed, v0, need, True)
    L, n, m = x.shape[0], p.shape[2], x.shape[2] + int(bias)
    acc = _acc_dtype(x.dtype)
    v0n = None if v0 is None else _normalise_v0(v0.reshape(L * n, m), acc)
    out = _run_lanczos(None, (x, p, bias), L * n, m, k, steps, tol, seed, acc, x.device, max(1, n), v0n,
                       seed_period=n, need=need)
    return _batched_outputs(out, L, n)  # type: ignore[return-value]


def _fake_batched(t: Tensor, L: int, n: int, m: int, k: int, dt: torch.dtype):
    return (t.new_empty(L, n, k, dtype=dt), t.new_empty(L, n, m, k, dtype=dt), t.new_empty(L, n, k, dtype=dt),
            t.new_empty(L, n, dtype=torch.int32), t.new_empty(L, n, dtype=dt), t.new_empty(L, n, k, dtype=dt),
            t.new_empty(L, n, dtype=torch.bool))


@_sens_lanczos_batched_op.register_fake
def _(x: Tensor, p: Tensor, bias: bool, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor] = None,
      need: int = 0):
    x, p, v0 = _check_sens_lanczos_batched("sensitivity_lanczos_batched", x, p, bias, k, steps, tol, seed, v0, need,
                                           False)
    return _fake_batched(x, x.shape[0], p.shape[2], x.shape[2] + int(bias), k, _acc_dtype(x.dtype))


def _check_lanczos_batched(fn: str, a: Tensor, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor],
                           need: int, real: bool) -> Tuple[Tensor, Optional[Tensor]]:
    a = _check_tensor(fn, "a", a)
    _check_dtype(fn, "a", a, _ACC_DTYPES)
    if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{fn}: a must have shape [L, n, m, m], got {list(a.shape)}")
    _check_device(fn, "a", a, a.device, real)
    L, n, m = a.shape[0], a.shape[1], a.shape[-1]
    if m == 0:
        raise ValueError(f"{fn}: a must have m >= 1, got m = 0")
    _check_lanczos_args(fn, m, k, steps, tol, seed, clamp=False)
    _check_need(fn, need)
    v0 = _check_v0(fn, v0, (L, n, m), a.device, real)
    a3 = a.detach().reshape(L * n, m, m)
    if real:
        a3 = a3.contiguous()
        _check_symmetric(fn, a3, max(1, n))
    return a3, v0


@torch.library.custom_op("topoderiv::lanczos_topk_batched", mutates_args=(), device_types=("cpu", "cuda"))
def _lanczos_batched_op(
    a: Tensor, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor] = None, need: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Dense Lanczos on ``a [L, n, m, m]`` (L points of n blocks) in one launch; ``[L, n, ...]`` outputs."""
    fn = "lanczos_topk_batched"
    a3, v0 = _check_lanczos_batched(fn, a, k, steps, tol, seed, v0, need, True)
    L, n, m = a.shape[0], a.shape[1], a.shape[-1]
    v0n = None if v0 is None else _normalise_v0(v0.reshape(L * n, m), a.dtype)
    out = _run_lanczos(a3, None, L * n, m, k, steps, tol, seed, a.dtype, a.device, max(1, n), v0n,
                       seed_period=n, need=need)
    return _batched_outputs(out, L, n)  # type: ignore[return-value]


@_lanczos_batched_op.register_fake
def _(a: Tensor, k: int, steps: int, tol: float, seed: int, v0: Optional[Tensor] = None, need: int = 0):
    _check_lanczos_batched("lanczos_topk_batched", a, k, steps, tol, seed, v0, need, False)
    return _fake_batched(a, a.shape[0], a.shape[1], a.shape[-1], k, a.dtype)


# --------------------------------------------------------------------------------------------
# public API


def sensitivity_blocks(x: Tensor, p: Tensor, *, bias: bool = True, out: Optional[Tensor] = None) -> Tensor:
    """Sensitivity blocks ``B[r] = sum_s p[s, r] * xt[s] xt[s]^T``.

    Args:
        x: activations ``[..., d]`` (float32, float64 or bfloat16; CPU or CUDA), finite.
        p: costates ``[..., n]`` with the same leading dims (samples, or samples x tokens) and dtype,
            finite (NaN / Inf in x or p raise ValueError: one reduction per input).
        bias: append a feature of ones to ``x`` (``m = d + 1``), else ``m = d``.
        out: optional float32/float64 ``[n, m, m]`` contiguous tensor on the same device, sharing no
            memory with x or p; the result is ACCUMULATED into it (stream a data loader batch by
            batch) and ``out`` is returned.

    Returns:
        ``[n, m, m]``, symmetric, float32 for float32/bfloat16 inputs and float64 for float64 inputs
        (or ``out``'s dtype). Empty inputs give zeros. Extra memory is O(output + a fixed chunk).

    bfloat16 on CUDA may run on tensor cores (:func:`dense_kernel` says which kernel): then each term
    ``p x_i x_j`` is rounded once to bfloat16 (error <= 2^-8 of the sum of the terms' magnitudes, on top
    of float32 sums); float32/float64 inputs, the CPU and small blocks keep exact products.
    """
    fn = "sensitivity_blocks"
    x2, p2 = _flatten_pair(fn, x, p)
    x2, p2 = _check_pair(fn, x2, p2, bias, data=False)  # finite values: checked by the op
    if out is None:
        return _blocks_op(x2, p2, bias)
    _check_out(fn, out, x2, p2, bias)
    _blocks_acc_op(x2, p2, bias, out)
    return out


def sensitivity_matvec(x: Tensor, p: Tensor, v: Tensor, *, bias: bool = True) -> Tensor:
    """Applies every block to its own vector without forming the blocks: row ``r`` is ``B[r] @ v[r]``.

    Computed as ``(P * (Xt V^T))^T Xt``: two GEMM-shaped passes over the data, O(N n) extra memory
    on CUDA and O(chunk) on the CPU.

    Args:
        x: activations ``[..., d]``; p: costates ``[..., n]`` (same leading dims and dtype).
        v: ``[n, m]`` in the accumulation dtype (float32 for float32/bfloat16 inputs, float64 for
            float64 inputs), same device. NaN / Inf in x, p or v raise ValueError (detected on the
            output, then the inputs are searched: no extra pass over the data for finite inputs).
        bias: as in :func:`sensitivity_blocks`.

    Returns:
        ``[n, m]`` in ``v``'s dtype.
    """
    fn = "sensitivity_matvec"
    x2, p2 = _flatten_pair(fn, x, p)
    x2, p2 = _check_pair(fn, x2, p2, bias, data=False)  # finite values: checked by the op
    v = _check_v(fn, v, x2, p2, bias, data=False)
    return _matvec_op(x2, p2, v.detach(), bias)


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
        early: ``[B]`` bool: stopped early by ``need="top"`` (the problem cannot hold its group's
            largest eigenvalue): its values are lower bounds (Ritz values), not converged
            eigenvalues, and ``converged`` is False. All False with ``need="all"``.
    """

    values: Tensor
    vectors: Tensor
    converged: Tensor
    residuals: Tensor
    steps: Tensor
    norm: Tensor
    early: Tensor

    def __new__(cls, values: Tensor, vectors: Tensor, converged: Tensor, residuals: Tensor,
                steps: Tensor, norm: Tensor, early: Optional[Tensor] = None) -> "LanczosResult":
        self = super().__new__(cls, (values, vectors))
        self.values, self.vectors = values, vectors
        self.converged, self.residuals, self.steps, self.norm = converged, residuals, steps, norm
        self.early = torch.zeros_like(converged) if early is None else early
        return self

    def __repr__(self) -> str:
        return (f"LanczosResult(values={self.values!r}, converged={self.converged!r}, "
                f"residuals={self.residuals!r}, steps={self.steps!r})")


def _residual_floor(m: int, dtype: torch.dtype) -> float:
    """Round-off floor of a relative residual computed in ``dtype``: 4 sqrt(m) eps."""
    return 4.0 * math.sqrt(max(m, 1)) * torch.finfo(dtype).eps


def _finish(values: Tensor, vectors: Tensor, ritz: Tensor, nsteps: Tensor, anorm: Tensor,
            resid: Tensor, tol: float, early: Optional[Tensor] = None) -> LanczosResult:
    """Relative explicit residuals ``||A y - theta y|| / ||A||`` (``resid`` absolute) and the flags
    (a problem stopped early counts as converged only if it met the tolerance anyway)."""
    m = vectors.shape[1]
    scale = anorm.clamp_min(torch.finfo(anorm.dtype).tiny)
    true_res = resid / scale[:, None]  # [B, k]
    est = ritz / scale[:, None]
    limit = max(tol, _residual_floor(m, vectors.dtype))
    zero = anorm == 0
    converged = ((est <= tol) & (true_res <= limit)).all(dim=1) | zero
    residuals = torch.where(zero, torch.zeros_like(anorm), true_res.amax(dim=1) if true_res.numel() else anorm)
    if early is not None:
        early = early & ~converged
    return LanczosResult(values, vectors, converged, residuals, nsteps, anorm, early)


def _finish_batched(out: Tuple[Tensor, ...], tol: float) -> LanczosResult:
    """_finish on the ``[L, n, ...]`` outputs of a batched op (flat ``[L n, ...]`` result)."""
    values, vectors, ritz, nsteps, anorm, resid, early = (t.reshape((-1,) + tuple(t.shape[2:])) for t in out)
    return _finish(values, vectors, ritz, nsteps, anorm, resid, tol, early)


def lanczos_topk(
    a: Tensor, k: int = 1, *, steps: Optional[int] = None, tol: float = 1e-6, seed: int = 0,
    shared_norm: bool = False, v0: Optional[Tensor] = None, norm_group: Optional[int] = None,
    need: str = "all",
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
        a: ``[B, m, m]`` or ``[m, m]`` symmetric, float32 or float64, CPU or CUDA, finite. Every entry
            is checked: ``max |a - a^T| <= 1e3 eps max |a|`` (``max |a|`` over the batch with
            ``shared_norm``), about a third of one Lanczos step.
        k: eigenpairs per matrix, ``1 <= k <= m``.
        steps: Krylov dimension cap (default ``min(m, max(64, 4k + 16))``; clamped to ``m``).
        tol: relative residual tolerance (> 0).
        seed: start-vector seed in ``[0, 2^63 - 1]`` (the same seed gives the same result on CPU and
            CUDA up to rounding).
        shared_norm: measure every residual against the largest norm in the batch instead of each
            matrix's own (the batch is the blocks of ONE block-diagonal operator Q, whose norm is
            that max): blocks with small norms then stop sooner. ``norm`` reports the shared norm.
        v0: optional start vectors ``[B, m]`` (``[m]`` for a 2-D ``a``), any float dtype, finite,
            on ``a``'s device, any scale (rows are normalised). A good guess of the top
            eigenvector (a warm start) cuts the steps; an all-zero row starts from the seeded
            random vector. A start that spans an invariant subspace (an exact eigenvector, or
            orthogonal to everything else the operator reaches) is not trusted: the solve
            restarts from a random vector orthogonal to it and stops only when that part has
            converged too, so an exact eigenvector of a lower eigenvalue still gives the top pairs
            (as ARPACK does; it then costs about a cold start). A start that is merely close
            to another eigenvector (within tol, not exactly) can still stop there, as in every
            Krylov method: mix in a little of a random vector when unsure
            (:func:`topoderiv.scoring.subspace_start` mixes in 1%).
        norm_group: ``g`` dividing ``B``: the batch is ``B / g`` block-diagonal operators of ``g``
            blocks each (several insertion points' blocks in one launch): matrices
            ``[i g, (i + 1) g)`` share their largest norm (``shared_norm`` within each group) and
            each group draws the start vectors of a call with that group alone. Overrides
            ``shared_norm`` (``shared_norm=True`` is ``norm_group=B``).
        need: ``"all"`` (default): every matrix to tolerance. ``"top"``: only the matrix holding
            the largest eigenvalue of each norm group (the rule ``"top"``); a matrix whose
            largest Ritz value ``theta_1`` has settled (residual within ``min(sqrt(tol), 1e-2)``
            of the norm) and whose upper estimate ``theta_1 + |beta_j|`` falls below another's
            Ritz value stops early, its values then lower bounds: ``result.early`` marks them
            (``converged`` False). An estimate, not a bound: a start nearly orthogonal to a
            matrix's top eigenvector can hide it, as in any Krylov solve at a tolerance.

    Returns:
        :class:`LanczosResult`, which unpacks as ``values [B, k], vectors [B, m, k]`` (no batch dim
        for a 2-D input) and carries ``converged [B]``, ``residuals [B]``, ``steps [B]``, ``early [B]``.
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
    if not isinstance(shared_norm, bool):
        raise TypeError(f"{fn}: shared_norm must be a bool, got {type(shared_norm).__name__}")
    v0 = _check_v0(fn, v0, (m,) if squeeze else (B, m), a3.device, data=False)
    if v0 is not None:
        v0 = v0.reshape(B, m)
    need_code = _need_code(fn, need)
    if norm_group is not None:
        g = _check_int(fn, "norm_group", norm_group, 1)
        if B % g:
            raise ValueError(f"{fn}: norm_group must divide the batch size B = {B}, got {g}")
    else:
        g = None
    # the ops check that a is finite and symmetric, and v0 finite (then normalise it)
    if g is None and need_code == 0:
        res = _finish(*_lanczos_op(a3, k, steps, tol, seed, max(1, B) if shared_norm else 1, v0), tol)
    else:
        g = g if g is not None else (max(1, B) if shared_norm else 1)
        L = B // g if B else 0
        a4 = a3.reshape(L, g, m, m)
        res = _finish_batched(_lanczos_batched_op(a4, k, steps, tol, seed, None if v0 is None else v0.reshape(L, g, m),
                                                  need_code), tol)
    if squeeze:
        return LanczosResult(*(t[0] for t in (res.values, res.vectors, res.converged, res.residuals, res.steps, res.norm,
                                              res.early)))
    return res


def _need_code(fn: str, need: object) -> int:
    if not isinstance(need, str) or need not in _NEEDS:
        raise ValueError(f"{fn}: need must be one of {tuple(_NEEDS)}, got {need!r}")
    return _NEEDS[need]


@dataclass
class SensitivityTopK:
    """Top-k eigenpairs of every sensitivity block of one insertion point.

    Attributes:
        values: ``[n, k]`` eigenvalues of ``B[r]`` (NOT multiplied by sigma''(0)), descending.
        vectors: ``[n, m, k]`` unit eigenvectors.
        converged: ``[n]`` bool; residuals: ``[n]`` relative residuals (see :func:`lanczos_topk`).
        route: ``"dense"`` or ``"matfree"``, the route that ran.
        early: ``[n]`` bool: blocks stopped early by ``need="top"`` because they cannot hold the
            largest eigenvalue: their ``values`` are lower bounds (Ritz values), their vectors
            unconverged (``converged`` False). All False with ``need="all"`` (the default).
        steps: ``[n]`` int32 Lanczos steps per block.
    """

    values: Tensor
    vectors: Tensor
    converged: Tensor
    residuals: Tensor
    route: str
    early: Optional[Tensor] = None
    steps: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.early is None:
            self.early = torch.zeros(self.values.shape[0], dtype=torch.bool, device=self.values.device)

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
    x: Union[Tensor, Sequence[Tensor]], p: Union[Tensor, Sequence[Tensor]], *, k: int = 1, bias: bool = True,
    route: str = "auto", steps: Optional[int] = None, tol: float = 1e-6, seed: int = 0,
    v0: Union[None, Tensor, Sequence[Optional[Tensor]]] = None, need: str = "all",
) -> Union[SensitivityTopK, List[SensitivityTopK]]:
    """Top-``k`` eigenpairs of every sensitivity block ``B[r]`` of ``(x, p)``.

    ``route="dense"`` forms the blocks (:func:`sensitivity_blocks`) and runs batched Lanczos on them;
    ``"matfree"`` drives Lanczos with :func:`sensitivity_matvec` and never forms a block;
    ``"auto"`` picks by :func:`choose_route`. The topological derivative of the insertion point is
    ``sigma''(0) * result.best_value`` (for sigma''(0) > 0), its block ``result.best_block`` and its
    initialisation ``result.best_vector``.

    Several insertion points: pass sequences ``x = [x_1, ..., x_L]``, ``p = [p_1, ..., p_L]`` (and
    optionally ``v0 = [v0_1 or None, ...]``) and get a list of L results, each what the
    single-point call on ``(x_l, p_l)`` returns (the same start vectors and stop tests: values
    equal to rounding, vectors up to sign). Points of identical shape ``(rows, d, n)`` are solved in
    ONE batched launch per route (one Lanczos over all (point, block) problems: a 12-block ViT is
    one pass of kernel launches, not twelve; such points are stacked into one copy); points of
    other shapes form their own groups. Every point must share x's dtype and device; ``bias``,
    ``k``, ``route``, ``steps``, ``tol``, ``seed`` and ``need`` apply to all of them (``"auto"``
    picks per shape).

    Args:
        x: activations ``[..., d]``; p: costates ``[..., n]`` (same leading dims, dtype, device);
            or sequences of them (one pair per point).
        k: eigenpairs per block. bias: as in :func:`sensitivity_blocks`.
        route: ``"auto"``, ``"dense"`` or ``"matfree"``.
        steps, tol, seed: as in :func:`lanczos_topk`; residuals are measured against
            ``||Q|| = max_r ||B_r||`` (the operator of the insertion point), so blocks far below
            the top one stop sooner.
        v0: optional start vectors ``[n, m]``, one per block (see :func:`lanczos_topk`); the
            scorer passes a warm start from a low-dimensional subspace of the activations.
        need: ``"all"`` (default): every block to tolerance (the rules ``"all"``, ``"reference"``,
            ``"multi"``). ``"top"``: only the block holding the point's largest eigenvalue (the
            rule ``"top"``); a block whose upper estimate falls below another block's Ritz value
            stops early and ``result.early`` marks it (its values are lower bounds).
    """
    fn = "sensitivity_topk"
    if isinstance(x, (list, tuple)) or isinstance(p, (list, tuple)):
        return _sensitivity_topk_multi(fn, x, p, k, bias, route, steps, tol, seed, v0, need)
    x2, p2 = _flatten_pair(fn, x, p)
    x2, p2 = _check_pair(fn, x2, p2, bias)  # finite values too: the errors name this function
    if route not in _ROUTES:
        raise ValueError(f"{fn}: route must be one of {_ROUTES}, got {route!r}")
    need_code = _need_code(fn, need)
    S, d = x2.shape
    n, m = p2.shape[1], d + int(bias)
    k, steps, tol, seed = _check_lanczos_args(fn, m, k, steps, tol, seed)
    v0 = _check_v0(fn, v0, (n, m), x2.device)
    return _solve_group([x2], [p2], [v0], k, bias, route, steps, tol, seed, need_code)[0]


def _solve_group(xs: List[Tensor], ps: List[Tensor], v0s: List[Optional[Tensor]], k: int, bias: bool, route: str,
                 steps: int, tol: float, seed: int, need: int) -> List[SensitivityTopK]:
    """Validated points of ONE shape (``x [S, d]``, ``p [S, n]``, unit column stride): one launch."""
    L = len(xs)
    S, d = xs[0].shape
    n, m = ps[0].shape[1], d + int(bias)
    acc = _acc_dtype(xs[0].dtype)
    if route == "auto":
        route = choose_route(S, d, n, bias=bias, k=k, itemsize=torch.finfo(acc).bits // 8)
    X = xs[0][None] if L == 1 else torch.stack(xs)
    P = ps[0][None] if L == 1 else torch.stack(ps)
    if all(v is None for v in v0s):
        V0 = None
    else:
        # any scale: normalised by the op in float64, so keep a float64 start float64
        vdt = torch.float64 if any(v is not None and v.dtype == torch.float64 for v in v0s) else acc
        V0 = torch.stack([torch.zeros(n, m, dtype=vdt, device=X.device) if v is None else v.to(vdt) for v in v0s])
    if route == "dense":
        out = _lanczos_batched_op(_blocks_batched_op(X, P, bias), k, steps, tol, seed, V0, need)
    else:
        out = _sens_lanczos_batched_op(X, P, bias, k, steps, tol, seed, V0, need)
    res = _finish_batched(out, tol)
    parts = [t.reshape((L, n) + tuple(t.shape[1:])) for t in
             (res.values, res.vectors, res.converged, res.residuals, res.early, res.steps)]
    return [SensitivityTopK(parts[0][l], parts[1][l], parts[2][l], parts[3][l], route, parts[4][l], parts[5][l])
            for l in range(L)]


def _sensitivity_topk_multi(fn: str, xs: object, ps: object, k: object, bias: object, route: object,
                            steps: object, tol: object, seed: object, v0s: object,
                            need: object) -> List[SensitivityTopK]:
    """The multi-point form of :func:`sensitivity_topk`: validation, grouping by shape, one launch per group."""
    for name, seq in (("x", xs), ("p", ps)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{fn}: with several points x and p must both be sequences (lists or tuples) of "
                            f"tensors, got {name} of type {type(seq).__name__}")
    assert isinstance(xs, (list, tuple)) and isinstance(ps, (list, tuple))
    if len(xs) != len(ps):
        raise ValueError(f"{fn}: x and p must hold the same number of points, got {len(xs)} and {len(ps)}")
    L = len(xs)
    if v0s is not None and (not isinstance(v0s, (list, tuple)) or len(v0s) != L):
        got = f"a sequence of {len(v0s)}" if isinstance(v0s, (list, tuple)) else type(v0s).__name__
        raise ValueError(f"{fn}: v0 must be None or a sequence of {L} start vectors (None or [n, m]) for {L} "
                         f"points, got {got}")
    if route not in _ROUTES:
        raise ValueError(f"{fn}: route must be one of {_ROUTES}, got {route!r}")
    need_code = _need_code(fn, need)
    _check_bias(fn, bias)
    if L == 0:
        return []
    pairs: List[Tuple[Tensor, Tensor]] = []
    for i, (x, p) in enumerate(zip(xs, ps)):
        try:
            x2, p2 = _flatten_pair(fn, x, p)
            x2, p2 = _check_pair(fn, x2, p2, bias)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (point {i} of {L})") from None
        if i and x2.dtype != pairs[0][0].dtype:
            raise TypeError(f"{fn}: every point must have the dtype of point 0 ({pairs[0][0].dtype}), got "
                            f"{x2.dtype} at point {i}")
        if i and x2.device != pairs[0][0].device:
            raise ValueError(f"{fn}: every point must be on the device of point 0 ({pairs[0][0].device}), got "
                             f"{x2.device} at point {i}")
        pairs.append((x2, p2))
    checked = []
    for i, (x2, p2) in enumerate(pairs):
        m = x2.shape[1] + int(bias)
        try:
            kk, st, tl, sd = _check_lanczos_args(fn, m, k, steps, tol, seed)
            v = None if v0s is None else _check_v0(fn, v0s[i], (p2.shape[1], m), x2.device)  # type: ignore[index]
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (point {i} of {L})") from None
        checked.append((kk, st, tl, sd, v))
    groups: Dict[Tuple[int, int, int], List[int]] = {}
    for i, (x2, p2) in enumerate(pairs):
        groups.setdefault((x2.shape[0], x2.shape[1], p2.shape[1]), []).append(i)
    results: List[Optional[SensitivityTopK]] = [None] * L
    for idx in groups.values():
        kk, st, tl, sd, _ = checked[idx[0]]
        x0, p0 = pairs[idx[0]]
        size = _points_per_call(x0.device, (x0.numel() + p0.numel()) * _acc_dtype(x0.dtype).itemsize)
        for c0 in range(0, len(idx), size):
            chunk = idx[c0:c0 + size]
            out = _solve_group([pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk],
                               [checked[i][4] for i in chunk], kk, bool(bias), str(route), st, tl, sd, need_code)
            for i, r in zip(chunk, out):
                results[i] = r
    return results  # type: ignore[return-value]


#: CPU: points whose inputs exceed this many bytes are solved one per call even in a multi-point
#: call (the results are the same). A point's rows stay in cache across its Lanczos steps when
#: solved alone; stacked with others, every step streams all of them from memory: on the Zen 5
#: of benchmarks/RESULTS.md, 12 points batched ran 1.06-1.13x the single calls at 0.1-1 MB per
#: point and 0.86-0.90x at 1.5-4 MB. On CUDA batching saves launches: always batched.
CPU_BATCH_POINT_BYTES = 1 << 20


def _points_per_call(device: torch.device, point_bytes: int) -> int:
    """How many same-shape points one batched solve takes (before any byte cap)."""
    return 1 if device.type == "cpu" and point_bytes > CPU_BATCH_POINT_BYTES else 1 << 62


# --------------------------------------------------------------------------------------------
# convolutions: the blocks of the paper's conv block x + sigma(K (*) u(x) + b) (METHOD.md 7)
#
# x [N, C, H, W], p [N, n, H, W] (same padding, stride 1, an odd square kernel), m = C k k (+1).
# The raw ops take the kernel size and bias; any strides (NCHW, channels-last, views) go to the
# kernels as they are: no input is copied. The patches are addressed inside the kernels, never
# materialised (csrc/include/topoderiv/conv_sensitivity.h).

_CONV_PADDINGS = ("same",)
# multiply-adds below which one more CPU thread does not pay for the conv kernels: each parallel
# region ends in a barrier, and a barrier costs a scheduler time slice when other processes share
# the cores (measured on a loaded 2-core machine: a 10 MFLOP conv matvec takes 0.3 ms on one thread
# and 12-24 ms on two)
_CONV_WORK_PER_THREAD = 2**24


def _conv_threads(work: float) -> int:
    """CPU threads for a conv kernel call of ``work`` multiply-adds (at least one)."""
    return max(1, min(torch.get_num_threads(), int(work // max(1, _CONV_WORK_PER_THREAD))))


def _check_kernel_size(fn: str, kernel_size: object) -> int:
    if isinstance(kernel_size, torch.SymInt):
        return kernel_size  # type: ignore[return-value]
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"{fn}: kernel_size must be an int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{fn}: kernel_size must be an odd int >= 1 (same padding kernel_size // 2, stride 1), "
                         f"got {kernel_size}")
    return kernel_size


def _check_padding(fn: str, padding: object) -> None:
    if not isinstance(padding, str) or padding not in _CONV_PADDINGS:
        raise ValueError(f"{fn}: padding must be 'same' (zero padding kernel_size // 2, stride 1: p has x's height "
                         f"and width), got {padding!r}")


def _check_conv_pair(fn: str, x: object, p: object, kernel_size: object, bias: object, real: bool = True,
                     data: bool = True, batched: bool = False) -> Tuple[Tensor, Tensor, int]:
    """The conv ops' ``(x [N, C, H, W], p [N, n, H, W])``, kernel size and bias; returns ``(x, p, k)``
    detached, strides as given. ``data``: also one finite-value reduction per input. ``batched``:
    also ``x [L, N, C, H, W], p [L, N, n, H, W]``, L points of one shape (the multi-point form)."""
    x = _check_tensor(fn, "x", x)
    p = _check_tensor(fn, "p", p)
    _check_dtype(fn, "x", x, _INPUT_DTYPES)
    if p.dtype != x.dtype:
        raise TypeError(f"{fn}: p must have the same dtype as x ({x.dtype}), got {p.dtype}")
    five = " or 5-D [L, N, C, H, W] (L points of one shape)" if batched else ""
    if x.dim() != 4 and not (batched and x.dim() == 5):
        raise ValueError(f"{fn}: x must be 4-D [N, C, H, W]{five}, got shape {list(x.shape)}")
    if p.dim() != x.dim():
        lead = "L, " if x.dim() == 5 else ""
        raise ValueError(f"{fn}: p must be {x.dim()}-D [{lead}N, n, H, W], got shape {list(p.shape)}")
    if x.dim() == 5 and p.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: p must have x's number of points L = {x.shape[0]}, got {p.shape[0]}")
    if p.shape[-4] != x.shape[-4] or p.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"{fn}: p must have x's samples, height and width [N, n, H, W] = "
                         f"[{x.shape[-4]}, n, {x.shape[-2]}, {x.shape[-1]}] (same padding), got {list(p.shape)}")
    k = _check_kernel_size(fn, kernel_size)
    _check_bias(fn, bias)
    if x.shape[-3] == 0 and not bias:
        raise ValueError(f"{fn}: x must have C >= 1 channels when bias=False, got C = 0")
    _check_device(fn, "x", x, x.device, real)
    _check_device(fn, "p", p, x.device, real)
    if real and data:
        _check_finite(fn, "x", x)
        _check_finite(fn, "p", p)
    return x.detach(), p.detach(), k


def _conv_m(x: Tensor, k: int, bias: bool) -> int:
    return x.shape[-3] * k * k + int(bias)


def _conv_points(x: Tensor) -> int:
    """L: the points of a batched (5-D) x, 1 for a 4-D one."""
    return x.shape[0] if x.dim() == 5 else 1


def _conv_rows(x: Tensor) -> int:
    """Output pixels of one point: N H W."""
    return x.shape[-4] * x.shape[-2] * x.shape[-1]


def _check_conv_out(fn: str, out: object, x: Tensor, p: Tensor, k: int, bias: bool, real: bool = True) -> Tensor:
    """``out [n, m, m]`` of the accumulating form, m = C k k + bias (see :func:`_check_out`)."""
    return _check_out(fn, out, x, p, bias, real, m=_conv_m(x, k, bias), m_is=" (m = C k k + bias)")


def _check_conv_v(fn: str, v: object, x: Tensor, p: Tensor, k: int, bias: bool, real: bool = True) -> Tensor:
    """The conv matvec's ``v [n, m]`` in the accumulation dtype; returned contiguous (detached)."""
    v = _check_tensor(fn, "v", v)
    acc = _acc_dtype(x.dtype)
    if v.dtype != acc:
        raise TypeError(f"{fn}: v must have dtype {acc} for {x.dtype} inputs, got {v.dtype}")
    n, m = p.shape[1], _conv_m(x, k, bias)
    if tuple(v.shape) != (n, m):
        raise ValueError(f"{fn}: v must have shape [n, m] = {[n, m]} (m = C k k + bias), got {list(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{fn}: v must be on the same device as x ({x.device}), got {v.device}")
    return v.detach().contiguous() if real else v


def _conv_blocks_impl(x: Tensor, p: Tensor, k: int, bias: bool, out: Tensor) -> None:
    """out += the blocks of x [N, C, H, W] ([n, m, m]) or of L points x [L, N, C, H, W] ([L, n, m, m]):
    one kernel call for all points."""
    if _conv_points(x) * _conv_rows(x) == 0 or p.shape[-3] == 0:
        return
    m = _conv_m(x, k, bias)
    work = _conv_points(x) * _conv_rows(x) * p.shape[-3] * m * (m + 1) / 2
    _lib().conv_sensitivity_blocks(
        x.device.type, _buf(x), tuple(x.stride()), _buf(p), tuple(p.stride()), _buf(out), tuple(x.shape),
        p.shape[-3], k, k // 2, bool(bias), _DTYPE_CODE[x.dtype], _DTYPE_CODE[out.dtype], _conv_threads(work),
        _stream(x),
    )


def _new_conv_blocks(x: Tensor, p: Tensor, k: int, bias: bool) -> Tensor:
    m = _conv_m(x, k, bias)
    return torch.zeros(*p.shape[:-4], p.shape[-3], m, m, dtype=_acc_dtype(x.dtype), device=x.device)


@torch.library.custom_op("topoderiv::conv_sensitivity_blocks", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_blocks_op(x: Tensor, p: Tensor, kernel_size: int, bias: bool) -> Tensor:
    x, p, k = _check_conv_pair("conv_sensitivity_blocks", x, p, kernel_size, bias, batched=True)
    out = _new_conv_blocks(x, p, k, bias)
    _conv_blocks_impl(x, p, k, bias, out)
    return out


@_conv_blocks_op.register_fake
def _(x: Tensor, p: Tensor, kernel_size: int, bias: bool) -> Tensor:
    x, p, k = _check_conv_pair("conv_sensitivity_blocks", x, p, kernel_size, bias, real=False, batched=True)
    m = x.shape[-3] * k * k + int(bias)
    return x.new_empty(*p.shape[:-4], p.shape[-3], m, m, dtype=_acc_dtype(x.dtype))


@torch.library.custom_op(
    "topoderiv::conv_sensitivity_blocks_accumulate_", mutates_args=("out",), device_types=("cpu", "cuda")
)
def _conv_blocks_acc_op(x: Tensor, p: Tensor, kernel_size: int, bias: bool, out: Tensor) -> None:
    fn = "conv_sensitivity_blocks_accumulate_"
    x, p, k = _check_conv_pair(fn, x, p, kernel_size, bias)
    _check_conv_out(fn, out, x, p, k, bias)
    if x.device.type == "cuda" and out.dtype != _acc_dtype(x.dtype):
        # the CUDA kernels accumulate float32/bfloat16 inputs in float32 only
        tmp = _new_conv_blocks(x, p, k, bias)
        _conv_blocks_impl(x, p, k, bias, tmp)
        out.add_(tmp)
        return
    _conv_blocks_impl(x, p, k, bias, out)


@_conv_blocks_acc_op.register_fake
def _(x: Tensor, p: Tensor, kernel_size: int, bias: bool, out: Tensor) -> None:
    fn = "conv_sensitivity_blocks_accumulate_"
    x, p, k = _check_conv_pair(fn, x, p, kernel_size, bias, real=False)
    _check_conv_out(fn, out, x, p, k, bias, real=False)
    return None


def _conv_matvec_impl(x: Tensor, p: Tensor, v: Tensor, k: int, bias: bool) -> Tensor:
    """B v for x [N, C, H, W] (v [n, m]) or L points x [L, N, C, H, W] (v [L n, m] or [L, n, m])."""
    out = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    rows = _conv_rows(x)
    n = p.shape[-3]
    if rows == 0 or n == 0 or _conv_points(x) == 0:
        return out
    ws = torch.empty(_conv_points(x) * rows * n if x.device.type == "cuda" else 0, dtype=v.dtype, device=x.device)
    _lib().conv_sensitivity_matvec(
        x.device.type, _buf(x), tuple(x.stride()), _buf(p), tuple(p.stride()), _buf(v), _buf(out),
        _buf(ws) if ws.numel() else (0, 0), tuple(x.shape), n, k, k // 2, bool(bias), _DTYPE_CODE[x.dtype],
        _DTYPE_CODE[v.dtype], _conv_threads(2.0 * rows * n * v.shape[-1]), _stream(x),
    )
    return out


@torch.library.custom_op("topoderiv::conv_sensitivity_matvec", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_matvec_op(x: Tensor, p: Tensor, v: Tensor, kernel_size: int, bias: bool) -> Tensor:
    fn = "conv_sensitivity_matvec"
    x, p, k = _check_conv_pair(fn, x, p, kernel_size, bias, data=False)
    v = _check_conv_v(fn, v, x, p, k, bias)
    out = _conv_matvec_impl(x, p, v, k, bias)
    # finite values checked on the small output, as sensitivity_matvec does (a NaN / Inf anywhere in
    # x, p or v that the operator reads reaches it); then the inputs are searched to name one
    if out.numel() == 0 or x.numel() == 0 or not math.isfinite(float(out.sum(dtype=torch.float64))):
        for name, t in (("x", x), ("p", p), ("v", v)):
            _check_finite(fn, name, t)
    return out


@_conv_matvec_op.register_fake
def _(x: Tensor, p: Tensor, v: Tensor, kernel_size: int, bias: bool) -> Tensor:
    fn = "conv_sensitivity_matvec"
    x, p, k = _check_conv_pair(fn, x, p, kernel_size, bias, real=False)
    v = _check_conv_v(fn, v, x, p, k, bias, real=False)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _run_conv_lanczos(x: Tensor, p: Tensor, kernel: int, bias: bool, k: int, steps: int, tol: float, seed: int,
                      v0: Optional[Tensor],
                      need: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Matrix-free Lanczos on the conv operator (validated arguments, v0 normalised); returns
    (values, vectors, ritz estimates, steps, ||Q|| estimate, explicit residuals, stopped early). For L
    points (5-D x, p) the problems are the L n blocks (point-major, one solve; norms per point).
    ``need``: 0 every block to tolerance, 1 only the top block of each point (see _run_lanczos)."""
    n, m = p.shape[-3], _conv_m(x, kernel, bias)
    B = _conv_points(x) * n
    dtype, device = _acc_dtype(x.dtype), x.device
    values, vectors, ritz, nsteps, anorm, resid, early = _lanczos_outputs(B, m, k, dtype, device)
    if B == 0:
        return _lanczos_result(values, vectors, ritz, nsteps, anorm, resid, early)
    cuda = device.type == "cuda"
    rows = _conv_points(x) * _conv_rows(x)
    # as _run_lanczos: the CPU backend forms the explicit residuals from the stored A v_t within
    # _MF_RESIDUAL_BYTES, else they take k more operator applications here
    in_kernel_residual = not cuda and steps * B * m * dtype.itemsize <= _MF_RESIDUAL_BYTES
    n_ws = _lib().lanczos_workspace_elems(B, m, k, steps, True, cuda, _conv_rows(x), n, _conv_points(x))
    # CUDA applies the operator to every block, converged ones included: zero the basis so that
    # their never-written slots read zeros
    ws = (torch.zeros if cuda else torch.empty)(n_ws, dtype=dtype, device=device)
    _lib().conv_lanczos_topk(
        device.type, _buf(x), tuple(x.stride()), _buf(p), tuple(p.stride()), tuple(x.shape), n, kernel, kernel // 2,
        bool(bias), _DTYPE_CODE[x.dtype], m, k, steps, float(tol), int(seed), max(1, n), _buf(v0), _DTYPE_CODE[dtype],
        _buf(values), _buf(vectors), _buf(ritz), _buf(nsteps), _buf(anorm),
        _buf(resid) if in_kernel_residual else (0, 0), _buf(ws), _conv_threads(2.0 * rows * n * m), _stream(ws),
        int(need), _buf(early),
    )
    if not in_kernel_residual:
        av = torch.stack([_conv_matvec_impl(x, p, vectors[:, :, c].contiguous(), kernel, bias) for c in range(k)],
                         dim=2)
        resid = (av - vectors * values[:, None, :]).norm(dim=1)
    return _lanczos_result(values, vectors, ritz, nsteps, anorm, resid, early)


def _check_conv_lanczos_op(fn: str, x: Tensor, p: Tensor, kernel_size: int, bias: bool, k: int, steps: int,
                           tol: float, seed: int, v0: Optional[Tensor], need: int,
                           real: bool) -> Tuple[Tensor, Tensor, int, Optional[Tensor]]:
    x, p, kk = _check_conv_pair(fn, x, p, kernel_size, bias, real, batched=True)
    m = _conv_m(x, kk, bias)
    _check_lanczos_args(fn, m, k, steps, tol, seed, clamp=False)
    _check_need(fn, need)
    v0 = _check_v0(fn, v0, (_conv_points(x) * p.shape[-3], m), x.device, real)
    return x, p, kk, v0


@torch.library.custom_op("topoderiv::conv_sensitivity_lanczos", mutates_args=(), device_types=("cpu", "cuda"))
def _conv_lanczos_op(
    x: Tensor, p: Tensor, kernel_size: int, bias: bool, k: int, steps: int, tol: float, seed: int,
    v0: Optional[Tensor] = None, need: int = 0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, p, kk, v0 = _check_conv_lanczos_op("conv_sensitivity_lanczos", x, p, kernel_size, bias, k, steps, tol, seed,
                                          v0, need, True)
    return _run_conv_lanczos(x, p, kk, bias, k, steps, tol, seed, _normalise_v0(v0, _acc_dtype(x.dtype)), need)


@_conv_lanczos_op.register_fake
def _(x: Tensor, p: Tensor, kernel_size: int, bias: bool, k: int, steps: int, tol: float, seed: int,
      v0: Optional[Tensor] = None, need: int = 0):
    x, p, kk, v0 = _check_conv_lanczos_op("conv_sensitivity_lanczos", x, p, kernel_size, bias, k, steps, tol, seed,
                                          v0, need, False)
    m = _conv_m(x, kk, bias)
    n = _conv_points(x) * p.shape[-3]
    dt = _acc_dtype(x.dtype)
    return (x.new_empty(n, k, dtype=dt), x.new_empty(n, m, k, dtype=dt), x.new_empty(n, k, dtype=dt),
            x.new_empty(n, dtype=torch.int32), x.new_empty(n, dtype=dt), x.new_empty(n, k, dtype=dt),
            x.new_empty(n, dtype=torch.bool))


def conv_sensitivity_blocks(x: Tensor, p: Tensor, kernel_size: int, *, padding: str = "same", bias: bool = True,
                            out: Optional[Tensor] = None) -> Tensor:
    """Sensitivity blocks of a ``k x k`` convolution: ``B[r] = sum_{s, pixels} p[s, r, pixel] * pt pt^T``.

    ``pt = [patch; 1]`` is the zero-padded ``k x k`` patch of ``x`` around the pixel (``m = C k k + 1``
    with bias), its features in the order of ``Conv2d.weight.reshape(n, -1)`` (channel, kernel row,
    kernel column: :func:`torch.nn.functional.unfold`'s). ``B[r]`` is the Hessian block of output
    channel ``r`` of the paper's conv block ``x + sigma(K (*) x + b)`` (METHOD.md section 7). The
    patches are addressed inside the kernel: the im2col matrix (``N H W x m``) is never formed.

    Args:
        x: features ``[N, C, H, W]`` (float32, float64 or bfloat16; CPU or CUDA; any strides, e.g.
            channels-last, read in place), finite.
        p: costates ``[N, n, H, W]`` (same samples, height, width, dtype, device), finite.
        kernel_size: odd ``k >= 1`` (1, 3, 5, ...).
        padding: ``"same"`` (zero padding ``k // 2``, stride 1), the only one supported.
        bias: append the feature 1 (``m = C k k + 1``), else ``m = C k k``.
        out: optional float32/float64 ``[n, m, m]`` contiguous tensor on the same device, sharing no
            memory with x or p: the result is ACCUMULATED into it (stream batches) and returned.

    Returns:
        ``[n, m, m]``, exactly symmetric; float32 for float32/bfloat16 inputs, float64 for float64
        inputs (or ``out``'s dtype). Extra memory is O(output + a fixed chunk of rows per thread).
    """
    fn = "conv_sensitivity_blocks"
    _check_padding(fn, padding)
    x, p, k = _check_conv_pair(fn, x, p, kernel_size, bias, data=False)  # finite values: checked by the op
    if out is None:
        return _conv_blocks_op(x, p, k, bias)
    _check_conv_out(fn, out, x, p, k, bias)
    _conv_blocks_acc_op(x, p, k, bias, out)
    return out


def conv_sensitivity_matvec(x: Tensor, p: Tensor, v: Tensor, kernel_size: int, *, padding: str = "same",
                            bias: bool = True) -> Tensor:
    """Applies every conv block to its own vector without forming the blocks: row ``r`` is ``B[r] @ v[r]``.

    Two passes over the data, the patches addressed inside the kernels: ``y[s, r, pixel] = pt . v_r``
    (a convolution of ``x`` with ``v`` as weights), then ``out[r] = sum_{s, pixels} p y pt`` (its
    weight gradient against ``p * y``). Extra memory O(chunk) on the CPU and O(N n H W) on CUDA.

    Args:
        x, p, kernel_size, padding, bias: as in :func:`conv_sensitivity_blocks`.
        v: ``[n, m]`` in the accumulation dtype (float32 for float32/bfloat16 inputs, float64 for
            float64 inputs), same device. NaN / Inf in x, p or v raise ValueError.

    Returns:
        ``[n, m]`` in ``v``'s dtype.
    """
    fn = "conv_sensitivity_matvec"
    _check_padding(fn, padding)
    x, p, k = _check_conv_pair(fn, x, p, kernel_size, bias, data=False)
    v = _check_conv_v(fn, v, x, p, k, bias, real=False)
    return _conv_matvec_op(x, p, v.detach(), k, bias)


def choose_conv_route(N: int, C: int, H: int, W: int, n: int, kernel_size: int, *, bias: bool = True, k: int = 1,
                      memory_budget: float = 2 * 2**30, itemsize: int = 4) -> str:
    """:func:`choose_route` for a conv point: rows = ``N H W`` output pixels, ``d = C k^2`` features.

    The dense route forms ``n m^2`` blocks at ``N H W n m (m + 1) / 2`` multiply-adds; the
    matrix-free route costs ``2 steps N H W n m`` per solve and keeps nothing beyond ``x`` and ``p``
    (the images, ``k^2`` times less than their patches). Both read the patches in place.
    """
    return choose_route(N * H * W, C * kernel_size * kernel_size, n, bias=bias, k=k, memory_budget=memory_budget,
                        itemsize=itemsize)


# bytes of stacked inputs (and of dense blocks) above which the points of one multi-point call are
# solved in several batched calls instead of one
_CONV_POINTS_BYTES = 2 * 2**30


def conv_sensitivity_topk(
    x: Union[Tensor, Sequence[Tensor]], p: Union[Tensor, Sequence[Tensor]], kernel_size: int, *, k: int = 1,
    padding: str = "same", bias: bool = True, route: str = "auto", steps: Optional[int] = None, tol: float = 1e-6,
    seed: int = 0, v0: Union[None, Tensor, Sequence[Optional[Tensor]]] = None, need: str = "all",
) -> Union[SensitivityTopK, List[SensitivityTopK]]:
    """Top-``k`` eigenpairs of every conv sensitivity block ``B[r]`` of ``(x, p)``.

    ``route="dense"`` forms the blocks (:func:`conv_sensitivity_blocks`) and runs batched Lanczos on
    them; ``"matfree"`` drives the same Lanczos (the shared driver) with
    :func:`conv_sensitivity_matvec` and never forms a block; ``"auto"`` picks by
    :func:`choose_conv_route`. As in :func:`sensitivity_topk`, residuals are measured against
    ``||Q|| = max_r ||B_r||`` and ``sigma''(0) * result.best_value`` is the topological derivative.

    Many points in one call: ``x = [x_1, ..., x_L]``, ``p = [p_1, ..., p_L]`` (sequences; each pair
    as above, shapes may differ between points) returns a list of L results, result ``i`` what
    ``conv_sensitivity_topk(x_i, p_i, ...)`` returns (the same start vectors and stop tests: values
    equal to rounding, vectors up to sign), as :func:`sensitivity_topk` does. Points with the same
    shapes, dtype, device and route are solved together: their inputs are stacked (one copy) and
    ONE blocks call plus ONE batched Lanczos run (or ONE matrix-free Lanczos run, whose every step
    applies all their operators in one kernel call) serve all of them, norms per point; groups
    above 2 GiB of inputs (or of dense blocks) are split. ``k``, ``route``, ``steps``, ``tol``,
    ``seed`` and ``need`` apply to all of them (``"auto"`` picks per point).

    Args:
        x, p, kernel_size, padding, bias: as in :func:`conv_sensitivity_blocks`; or sequences of
            ``x_i``, ``p_i`` (same length, one pair per point).
        k: eigenpairs per block. route: ``"auto"`` (chosen per point), ``"dense"`` or ``"matfree"``.
        steps, tol, seed: as in :func:`lanczos_topk`.
        v0: optional start vectors ``[n, m]``, one per block (any scale; see :func:`lanczos_topk`); in
            the multi-point form a sequence of one ``[n_i, m_i]`` tensor or ``None`` per point.
        need: ``"all"`` (default): every block to tolerance (the rules ``"all"``, ``"reference"``,
            ``"multi"``). ``"top"``: only the block holding the point's largest eigenvalue (the
            rule ``"top"``); a block whose upper estimate falls below another block's Ritz value
            stops early and ``result.early`` marks it (its values are lower bounds).

    Returns:
        :class:`SensitivityTopK`, or a list of them (one per point, in order) for sequences.
    """
    fn = "conv_sensitivity_topk"
    _check_padding(fn, padding)
    if route not in _ROUTES:
        raise ValueError(f"{fn}: route must be one of {_ROUTES}, got {route!r}")
    need_code = _need_code(fn, need)
    if isinstance(x, (list, tuple)) or isinstance(p, (list, tuple)):
        return _conv_topk_points(fn, x, p, kernel_size, k, bias, route, steps, tol, seed, v0, need_code)
    x, p, kk, n, m, k, steps, tol, seed, v0, route = _conv_topk_args(fn, x, p, kernel_size, k, bias, route, steps, tol,
                                                                      seed, v0)
    return _conv_topk_solve(x, p, kk, bias, n, k, steps, tol, seed, v0, route, need_code)


def _conv_topk_args(fn: str, x: object, p: object, kernel_size: object, k: object, bias: object, route: str,
                    steps: object, tol: object, seed: object, v0: object):
    """One point's validated arguments and route: (x, p, kernel, n, m, k, steps, tol, seed, v0, route)."""
    x, p, kk = _check_conv_pair(fn, x, p, kernel_size, bias)  # finite values too: the errors name this function
    n, m = p.shape[1], _conv_m(x, kk, bias)
    k, steps, tol, seed = _check_lanczos_args(fn, m, k, steps, tol, seed)
    acc = _acc_dtype(x.dtype)
    v0 = _check_v0(fn, v0, (n, m), x.device)
    if route == "auto":
        N, C, H, W = x.shape
        route = choose_conv_route(N, C, H, W, n, kk, bias=bias, k=k, itemsize=torch.finfo(acc).bits // 8)
    return x, p, kk, n, m, k, steps, tol, seed, v0, route


def _conv_topk_points(fn: str, xs: object, ps: object, kernel_size: object, k: object, bias: object, route: str,
                      steps: object, tol: object, seed: object, v0s: object, need: int) -> List[SensitivityTopK]:
    """The multi-point form of :func:`conv_sensitivity_topk`: one batched solve per group of points
    of one shape, dtype, device and route."""
    if not isinstance(xs, (list, tuple)) or not isinstance(ps, (list, tuple)):
        raise TypeError(f"{fn}: x and p must both be tensors or both sequences of tensors (one pair per point), got "
                        f"{type(xs).__name__} and {type(ps).__name__}")
    if len(xs) != len(ps):
        raise ValueError(f"{fn}: x and p must hold one tensor per point each, got {len(xs)} and {len(ps)}")
    if v0s is not None and (not isinstance(v0s, (list, tuple)) or len(v0s) != len(xs)):
        got = f"a sequence of {len(v0s)}" if isinstance(v0s, (list, tuple)) else type(v0s).__name__
        raise ValueError(f"{fn}: v0 must be None or a sequence of {len(xs)} start vectors (None or [n, m]) for "
                         f"{len(xs)} points, got {got}")
    points = []
    for i in range(len(xs)):
        try:
            points.append(_conv_topk_args(fn, xs[i], ps[i], kernel_size, k, bias, route, steps, tol, seed,
                                          None if v0s is None else v0s[i]))
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (point {i} of {len(xs)})") from None
    groups: dict = {}
    for i, (x, p, kk, n, m, kq, sq, tq, seq, _, r) in enumerate(points):
        key = (tuple(x.shape), tuple(p.shape), x.dtype, x.device, r, kk, kq, sq)
        groups.setdefault(key, []).append(i)
    results: List[Optional[SensitivityTopK]] = [None] * len(points)
    for key, idx in groups.items():
        x0, p0, kk, n, m, kq, sq, tq, seq, _, r = points[idx[0]]
        acc = _acc_dtype(x0.dtype)
        per_point = (x0.numel() + p0.numel()) * x0.element_size()
        if r == "dense":
            per_point += n * m * m * acc.itemsize
        size = max(1, min(int(_CONV_POINTS_BYTES // max(1, per_point)),
                          _points_per_call(x0.device, (x0.numel() + p0.numel()) * acc.itemsize)))
        for c0 in range(0, len(idx), size):
            chunk = idx[c0:c0 + size]
            if len(chunk) == 1 or n == 0:
                for i in chunk:
                    x, p, _, _, _, _, _, _, _, v0, _ = points[i]
                    results[i] = _conv_topk_solve(x, p, kk, bias, n, kq, sq, tq, seq, v0, r, need)
                continue
            xb = torch.stack([points[i][0] for i in chunk])  # [L, N, C, H, W]: one copy of the inputs
            pb = torch.stack([points[i][1] for i in chunk])
            v0b = None
            if any(points[i][9] is not None for i in chunk):  # an all-zero row starts from the seeded vector
                v0b = torch.cat([_normalise_v0(points[i][9], torch.float64) if points[i][9] is not None else
                                 torch.zeros(n, m, dtype=torch.float64, device=x0.device) for i in chunk])
            # problem j n + r starts as block r of point j alone (seed_period = n): results equal to rounding
            res = _conv_topk_solve(xb, pb, kk, bias, n, kq, sq, tq, seq, v0b, r, need)
            for j, i in enumerate(chunk):
                sl = slice(j * n, (j + 1) * n)
                results[i] = SensitivityTopK(res.values[sl], res.vectors[sl], res.converged[sl], res.residuals[sl], r,
                                             res.early[sl], None if res.steps is None else res.steps[sl])
    return results  # type: ignore[return-value]


def _conv_topk_solve(x: Tensor, p: Tensor, kk: int, bias: bool, n: int, k: int, steps: int, tol: float, seed: int,
                     v0: Optional[Tensor], route: str, need: int) -> SensitivityTopK:
    """One solve of the blocks of x [N, C, H, W] or of L points x [L, N, C, H, W] (problems point-major,
    norms per point, each point's start vectors those of a call with it alone)."""
    if route == "dense":
        blocks = _conv_blocks_op(x, p, kk, bias)  # [n, m, m] or [L, n, m, m]
        blocks = blocks.reshape((_conv_points(x), n) + tuple(blocks.shape[-2:]))  # [L, n, m, m] (L = 1: one point)
        v0 = None if v0 is None else v0.reshape(blocks.shape[:3])
        res = _finish_batched(_lanczos_batched_op(blocks, k, steps, tol, seed, v0, need), tol)
    else:
        out = _conv_lanczos_op(x, p, kk, bias, k, steps, tol, seed, v0, need)
        res = _finish(*out[:6], tol, out[6])
    return SensitivityTopK(res.values, res.vectors, res.converged, res.residuals, route, res.early, res.steps)
