"""Fuzz of the raw custom ops ``torch.ops.topoderiv.*``, called directly.

Random shapes (0 and 1 included), strides (transposed, sliced, row-strided, broadcast rows,
storage offsets), dtypes (int, bool, float16, bfloat16, float32, float64, complex), devices,
wrong ranks, mismatched rows, wrong v / out / v0, out aliasing x or p, NaN and Inf, and the
Lanczos arguments around their limits. Every call must either return the right answer (checked
against topoderiv.reference in float64) or raise TypeError / ValueError / RuntimeError; a crash
fails the run. Seeded from the clock (the seed is printed; the case index and its description
are in the failure message): rerun with ``TOPODERIV_FUZZ_SEED=<seed>``; run longer with
``TOPODERIV_FUZZ_SECONDS``.

csrc/cuda/emulator/fuzz_validate.cpp fuzzes the C++ span checks under AddressSanitizer.
"""
from __future__ import annotations

import math
import os
import random
import time
from typing import Callable, List, Optional, Tuple

import torch

from topoderiv import ops
from topoderiv import reference as ref

T = torch.ops.topoderiv
F64 = torch.float64
ERRORS = (TypeError, ValueError, RuntimeError)
# the loop runs MAX_CASES cases, or fewer once BUDGET_S seconds have passed (at least MIN_CASES
# unless HARD_S is reached first: a loaded machine)
# (TOPODERIV_FUZZ_SECONDS=600 for a long run, e.g. under an AddressSanitizer build of the extension)
BUDGET_S = float(os.environ.get("TOPODERIV_FUZZ_SECONDS", 8.0))
HARD_S = max(15.0, 2 * BUDGET_S)
MIN_CASES, MAX_CASES = 150, max(2000, int(250 * BUDGET_S))

VALID_IN = (torch.float32, torch.float64, torch.bfloat16)
OTHER = (torch.float16, torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8)


def devices() -> List[str]:
    dev = ["cpu"] * 8 + ["meta"]
    if torch.cuda.is_available() and ops.has_cuda_kernels():
        dev += ["cuda"] * 4
    return dev


class Case:
    """One random call; ``desc`` says what was built (for the failure message)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.desc: List[str] = []

    def note(self, s: str) -> None:
        self.desc.append(s)

    # ---- tensors ----------------------------------------------------------------------

    def values(self, shape: Tuple[int, ...], dtype: torch.dtype, device: str, integer: bool = False) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.rng.getrandbits(31))
        if integer:
            t = torch.randint(-3, 4, shape, generator=g).double()
        else:
            t = torch.randn(shape, generator=g, dtype=F64)
        if dtype == torch.bool:
            t = t > 0
        elif dtype.is_complex:
            t = t.to(dtype)
        else:
            t = t.to(dtype)
        return t.to(device)

    def layout(self, t: torch.Tensor, name: str, allow_broadcast: bool = True) -> torch.Tensor:
        """The same values in a random memory layout."""
        if t.dim() != 2 or t.device.type == "meta":
            return t
        kind = self.rng.choice(["contiguous"] * 4 + ["transposed", "col_slice", "row_stride", "offset", "broadcast",
                                                     "col_broadcast"])
        if kind == "broadcast" and not allow_broadcast:
            kind = "contiguous"
        self.note(f"{name}:{kind}")
        r, c = t.shape
        if kind == "transposed":
            return t.T.contiguous().T
        if kind == "col_slice":
            big = torch.zeros(r, c + 3, dtype=t.dtype, device=t.device)
            big[:, 1:1 + c] = t
            return big[:, 1:1 + c]
        if kind == "row_stride":
            big = torch.zeros(2 * r, c, dtype=t.dtype, device=t.device)
            big[::2] = t
            return big[::2]
        if kind == "offset":
            big = torch.zeros(r * c + 5, dtype=t.dtype, device=t.device)
            big[5:] = t.reshape(-1)
            return big[5:].view(r, c)
        if kind == "broadcast" and r > 0:  # every row the same (row stride 0)
            return t[:1].expand(r, c)
        if kind == "col_broadcast" and c > 0:  # every column the same (column stride 0)
            return t[:, :1].expand(r, c)
        return t

    def maybe_poison(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if t.numel() == 0 or not t.is_floating_point() or t.device.type == "meta" or self.rng.random() > 0.07:
            return t
        t = t.clone()  # keeps the layout (a broadcast input becomes dense)
        bad = self.rng.choice([float("nan"), float("inf"), float("-inf")])
        t[tuple(self.rng.randrange(s) for s in t.shape)] = bad
        self.note(f"{name}:poisoned {bad}")
        return t

    def wrong_rank(self, t: torch.Tensor, name: str) -> torch.Tensor:
        if self.rng.random() > 0.04:
            return t
        self.note(f"{name}:wrong rank")
        return t[None] if self.rng.random() < 0.5 or t.dim() == 0 else t.reshape(-1)

    # ---- draws -------------------------------------------------------------------------

    def dtype(self) -> torch.dtype:
        return self.rng.choice(VALID_IN) if self.rng.random() < 0.9 else self.rng.choice(OTHER)

    def size(self, choices=(0, 1, 1, 2, 3, 5, 7, 17, 33)) -> int:
        return self.rng.choice(choices)


# ------------------------------------------------------------------------------ oracles


def finite(*ts: Optional[torch.Tensor]) -> bool:
    return all(t is None or t.device.type == "meta" or not t.is_floating_point() or bool(torch.isfinite(t).all())
               for t in ts)


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def blocks_ref(x: torch.Tensor, p: torch.Tensor, bias: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 blocks and the blocks of |x|, |p| (the scale every rounding error is bounded by)."""
    xd, pd = x.detach().cpu().double(), p.detach().cpu().double()
    return ref.sensitivity_blocks(xd, pd, bias=bias), ref.sensitivity_blocks(xd.abs(), pd.abs(), bias=bias)


def close(got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, eps: float, terms: int) -> bool:
    err = (got.detach().cpu().double() - exact).abs()
    return bool((err <= 8 * eps * max(terms, 1) * scale + 1e-300).all())


def check_lanczos(got, A: torch.Tensor, k: int, steps: int, tol_arg: float, dtype: torch.dtype,
                  group: int, A_abs: Optional[torch.Tensor] = None) -> Optional[str]:
    """Outputs of a Lanczos op against the float64 matrices A [B, m, m]: shapes, unit vectors, values
    that are the vectors' Rayleigh quotients, each within its residual of an eigenvalue (true for any
    unit vector), reported residuals that are the explicit ones, and after a full Krylov space the
    top-k eigenvalues (where they are distinct: an exactly repeated one is reported once). Accuracy
    is relative to the norm of the matrix's group (``group`` consecutive matrices share one), and
    rounding is bounded by the norm of ``A_abs`` (the matrices built from |inputs|: a block whose
    terms cancel has rounding errors of the size of its terms, not of its value)."""
    values, vectors, ritz, nsteps, anorm, resid = got
    B, m = A.shape[0], A.shape[-1]
    shapes = [tuple(t.shape) for t in got]
    if shapes != [(B, k), (B, m, k), (B, k), (B,), (B,), (B, k)]:
        return f"shapes {shapes}"
    if B == 0:
        return None
    if m == 0:
        return "returned for m = 0"
    y = vectors.detach().cpu().double()
    th = values.detach().cpu().double()
    w_all = torch.linalg.eigvalsh(A).flip(-1)  # [B, m] descending
    w_abs = w_all if A_abs is None else torch.linalg.eigvalsh(A_abs).flip(-1)
    norm = torch.maximum(w_all.abs().amax(dim=1), w_abs.abs().amax(dim=1))  # the max over each norm group below
    groups = -(-B // group)
    norm = torch.cat([norm, norm.new_zeros(groups * group - B)]).view(groups, group).amax(1)
    norm = norm.repeat_interleave(group)[:B].clamp_min(1e-300)
    tol = 200 * math.sqrt(m) * eps_of(dtype)
    if not bool(torch.isfinite(y).all() and torch.isfinite(th).all()):
        return "non-finite output"
    nonzero = w_all.abs().amax(dim=1) > 0
    if bool(((y.norm(dim=1) - 1).abs() > tol)[nonzero].any()):
        return f"vectors not unit: {(y.norm(dim=1) - 1).abs().max()}"
    ay = A @ y
    if bool((((y * ay).sum(1) - th).abs() > tol * norm[:, None]).any()):
        return "values are not the Rayleigh quotients of the vectors"
    true_res = (ay - y * th[:, None, :]).norm(dim=1)  # [B, k]
    if bool(((true_res - resid.detach().cpu().double()).abs() > tol * norm[:, None]).any()):
        return "explicit residuals differ from the recomputed ones"
    dist = (th[:, :, None] - w_all[:, None, :]).abs().amin(dim=2)  # to the nearest eigenvalue
    if bool((dist > true_res + tol * norm[:, None]).any()):
        return "a value farther from every eigenvalue than its residual"
    if steps == m:
        # a Krylov space allowed to grow to the whole space gives the top-k eigenvalues, for every
        # solve the op reports converged (explicit residual within its tolerance), where it used
        # the whole space or stopped at a tight tolerance. At a loose one (1e-3) a random start
        # with a small component along the top eigenvector can stop at a lower Ritz value whose
        # residual is already small: every Krylov solver does (the residual bounds the distance
        # to SOME eigenvalue, checked above). A start vector whose Krylov space closes early can
        # spend steps on restarts and end unconverged: then its residual says so.
        w = w_all[:, :k]
        distinct = (w[:, :-1] - w[:, 1:] > 1e-6 * norm[:, None]).all(dim=1) if k > 1 else torch.ones(B, dtype=torch.bool)
        err = ((th - w).abs() / norm[:, None]).amax(dim=1)
        conv = (true_res <= (max(tol_arg, tol) + tol) * norm[:, None]).all(dim=1)
        settled = (nsteps.detach().cpu() == m) | (tol_arg <= 1e-6)
        if bool((distinct & conv & settled & (err > 1e3 * tol + 10 * tol_arg)).any()):
            return f"full Krylov space: values {th.tolist()} vs eigenvalues {w.tolist()}"
    return None


# ------------------------------------------------------------------------------ cases


def pair(c: Case, device: str):
    N, d, n = c.size(), c.size((0, 1, 2, 3, 5, 9, 17)), c.size((0, 1, 2, 3, 5))
    dt = c.dtype()
    dt_p = dt if c.rng.random() < 0.95 else c.dtype()
    dev_p = device if c.rng.random() < 0.95 else c.rng.choice(devices())
    Np = N if c.rng.random() < 0.93 else max(0, N + c.rng.choice([-1, 1, 2]))
    bias = c.rng.choice([True, True, False]) if c.rng.random() < 0.95 else c.rng.choice([None, 0, 1, 2])
    c.note(f"N={N} d={d} n={n} Np={Np} dtype={dt}/{dt_p} device={device}/{dev_p} bias={bias!r}")
    integer = c.rng.random() < 0.2
    x = c.layout(c.values((N, d), dt, device, integer), "x")
    p = c.layout(c.values((Np, n), dt_p, dev_p, integer), "p")
    x, p = c.maybe_poison(x, "x"), c.maybe_poison(p, "p")
    x, p = c.wrong_rank(x, "x"), c.wrong_rank(p, "p")
    return x, p, bias


def effective_bias(bias) -> bool:
    return bool(bias)  # the dispatcher turns None / ints into the schema's bool


def pair_sizes(c: Case):
    """A fuzzed pair on a random device with its sizes: ``(device, x, p, bias, effective bias, n, m)``
    (``n``, ``m`` read from whatever shapes the pair got, 0 for a 0-dim tensor)."""
    device = c.rng.choice(devices())
    x, p, bias = pair(c, device)
    b = effective_bias(bias)
    n = p.shape[-1] if p.dim() else 0
    m = (x.shape[-1] if x.dim() else 0) + int(b)
    return device, x, p, bias, b, n, m


def case_blocks(c: Case) -> Tuple[Callable, Callable]:
    x, p, bias = pair(c, c.rng.choice(devices()))

    def call():
        return T.sensitivity_blocks(x, p, bias)

    def check(out) -> Optional[str]:
        if not finite(x, p):
            return "returned for non-finite inputs"
        b = effective_bias(bias)
        m = x.shape[1] + int(b)
        if tuple(out.shape) != (p.shape[1], m, m) or out.dtype != ops._acc_dtype(x.dtype):
            return f"shape/dtype {tuple(out.shape)} {out.dtype}"
        if out.device.type == "meta":
            return None
        exact, scale = blocks_ref(x, p, b)
        return None if close(out, exact, scale, eps_of(out.dtype), x.shape[0] + m) else "wrong blocks"

    return call, check


def case_accumulate(c: Case) -> Tuple[Callable, Callable]:
    device, x, p, bias, b, n, m = pair_sizes(c)
    shape = [n, m, m]
    kind = c.rng.choice(["ok"] * 6 + ["shape", "dtype", "noncontig", "alias_x", "alias_p", "device", "float64"])
    c.note(f"out:{kind}")
    odt = ops._acc_dtype(x.dtype) if x.dtype in VALID_IN else torch.float32
    if kind == "float64":
        odt = F64
    if kind == "dtype":
        odt = c.rng.choice([torch.bfloat16, torch.int64, torch.float16])
    if kind == "shape":
        shape[c.rng.randrange(3)] += c.rng.choice([-1, 1])
        shape = [max(s, 0) for s in shape]
    odev = c.rng.choice(devices()) if kind == "device" else device
    out = c.values(tuple(shape), odt, odev, integer=True) if odt.is_floating_point else torch.zeros(shape, dtype=odt)
    if out.dim() == 3 and out.shape[1] == out.shape[2] and out.is_floating_point():
        out = (out + out.mT) / 2  # holds symmetric blocks (its lower triangle is overwritten by the upper)
    if kind == "noncontig" and out.dim() == 3:
        out = out.mT.contiguous().mT
    aliased = False
    if kind in ("alias_x", "alias_p") and out.dtype.is_floating_point and out.device.type != "meta":
        # x (or p) and out in one byte store, out starting at a random 8-byte offset inside x (or p)
        src = x if kind == "alias_x" else p
        if src.dim() == 2 and src.numel() and out.numel() and src.device == out.device:
            sb, ob = src.numel() * src.element_size(), out.numel() * out.element_size()
            store = torch.zeros(sb + ob + 8, dtype=torch.uint8, device=src.device)
            view = store[:sb].view(src.dtype).view(src.shape)
            view.copy_(src)
            off = c.rng.randrange(0, sb, 8) if sb > 8 else 0
            new_out = store[off:off + ob].view(out.dtype).view(out.shape)
            new_out.copy_(out)
            out, aliased = new_out, True
            if kind == "alias_x":
                x = view
            else:
                p = view
    out_before = out.clone() if out.device.type != "meta" else out

    def call():
        T.sensitivity_blocks_accumulate_(x, p, bias, out)
        return out

    def check(res) -> Optional[str]:
        if not finite(x, p):
            return "returned for non-finite inputs"
        if aliased:
            return "returned although out shares memory with an input"
        if out.device.type == "meta":
            return None
        exact, scale = blocks_ref(x, p, b)
        upper = out_before.double().cpu().triu()  # documented: out's upper triangle is accumulated and mirrored
        before = upper + upper.triu(1).mT
        exact, scale = exact + before, scale + before.abs()
        return None if close(out, exact, scale, eps_of(out.dtype), x.shape[0] + m + 1) else "wrong accumulation"

    return call, check


def case_matvec(c: Case) -> Tuple[Callable, Callable]:
    device, x, p, bias, b, n, m = pair_sizes(c)
    shape = [n, m]
    kind = c.rng.choice(["ok"] * 6 + ["shape", "dtype", "device"])
    c.note(f"v:{kind}")
    vdt = ops._acc_dtype(x.dtype) if x.dtype in VALID_IN else torch.float32
    if kind == "dtype":
        vdt = c.rng.choice([torch.float32, F64, torch.bfloat16, torch.int64])
    if kind == "shape":
        shape = c.rng.choice([[n, m + 1], [n + 1, m], [m, n], [n * m], [1, n, m]])
    vdev = c.rng.choice(devices()) if kind == "device" else device
    v = c.layout(c.values(tuple(shape), vdt, vdev), "v", allow_broadcast=False)
    v = c.maybe_poison(v, "v")

    def call():
        return T.sensitivity_matvec(x, p, v, bias)

    def check(out) -> Optional[str]:
        if not finite(x, p, v):
            return "returned for non-finite inputs"
        if tuple(out.shape) != (n, m) or out.dtype != v.dtype:
            return f"shape/dtype {tuple(out.shape)} {out.dtype}"
        if out.device.type == "meta":
            return None
        exact, scale = blocks_ref(x, p, b)
        vd = v.detach().cpu().double()
        e, s = torch.einsum("rij,rj->ri", exact, vd), torch.einsum("rij,rj->ri", scale, vd.abs())
        return None if close(out, e, s, eps_of(out.dtype), 2 * (x.shape[0] + m)) else "wrong matvec"

    return call, check


def lanczos_args(c: Case, m: int):
    k = c.rng.choice([1, 1, 1, 2, m]) if c.rng.random() < 0.9 else c.rng.choice([0, -1, m + 1])
    steps = c.rng.choice([max(k, 1), m, m, min(m, k + 3)]) if c.rng.random() < 0.9 else c.rng.choice([k - 1, m + 1, 0])
    tol = c.rng.choice([1e-6, 1e-10, 1e-3]) if c.rng.random() < 0.9 else c.rng.choice([0.0, -1.0, float("nan"), float("inf")])
    seed = c.rng.choice([0, 7, 2**63 - 1]) if c.rng.random() < 0.93 else c.rng.choice([-1, 2**63])
    c.note(f"k={k} steps={steps} tol={tol} seed={seed}")
    return k, steps, tol, seed


def v0_arg(c: Case, B: int, m: int, device: str) -> Optional[torch.Tensor]:
    kind = c.rng.choice(["none"] * 4 + ["ok", "ok", "zero", "f32", "shape", "int", "device"])
    c.note(f"v0:{kind}")
    if kind == "none":
        return None
    shape = (B, m + 1) if kind == "shape" else (B, m)
    dt = {"int": torch.int64, "f32": torch.float32}.get(kind, F64)
    v0 = c.values(shape, dt, c.rng.choice(devices()) if kind == "device" else device)
    if kind == "zero":
        v0 = torch.zeros_like(v0)
    return c.maybe_poison(c.layout(v0, "v0", allow_broadcast=False), "v0")


def case_lanczos(c: Case) -> Tuple[Callable, Callable]:
    device = c.rng.choice(devices())
    B, m = c.size((0, 1, 2, 3)), c.size((0, 1, 2, 3, 5, 8, 13))
    dt = c.rng.choice([torch.float32, F64, F64]) if c.rng.random() < 0.9 else c.rng.choice(OTHER + (torch.bfloat16,))
    g = c.values((B, m, m), F64, "cpu", integer=c.rng.random() < 0.2)
    a = (g + g.mT) / 2
    kind = c.rng.choice(["sym"] * 6 + ["asym", "rank", "zero"])
    if kind == "asym" and m > 1:
        a = a + 1e-3 * torch.triu(torch.ones(m, m, dtype=F64), 1)
    if kind == "zero":
        a = torch.zeros_like(a)
    if kind == "rank" and m > 0:
        u = c.values((B, m, 1), F64, "cpu")
        a = u @ u.mT
    c.note(f"B={B} m={m} dtype={dt} a:{kind} device={device}")
    a = a.to(dt).to(device)
    if a.dim() == 3 and c.rng.random() < 0.2 and a.device.type != "meta":
        a = a.mT.contiguous().mT if c.rng.random() < 0.5 else torch.cat([a, a])[::2]
        c.note("a:strided")
    a = c.maybe_poison(a, "a")
    if c.rng.random() < 0.04:
        a = a[0] if a.dim() == 3 and a.shape[0] else a[None]
        c.note("a:wrong rank")
    k, steps, tol, seed = lanczos_args(c, m)
    norm_group = c.rng.choice([1, 1, 2, max(B, 1)]) if c.rng.random() < 0.95 else c.rng.choice([0, -3])
    v0 = v0_arg(c, B, m, device)

    def call():
        return T.lanczos_topk(a, k, steps, tol, seed, norm_group, v0)

    def check(res) -> Optional[str]:
        if not finite(a, v0):
            return "returned for non-finite inputs"
        if res[0].device.type == "meta":
            return None
        A = a.detach().cpu().double()
        if kind == "asym" and m > 1 and B > 0:
            return "returned for a non-symmetric matrix"
        return check_lanczos(res, A, k, steps, tol, a.dtype, norm_group, A.abs())

    return call, check


def case_sens_lanczos(c: Case) -> Tuple[Callable, Callable]:
    device, x, p, bias, b, n, m = pair_sizes(c)
    k, steps, tol, seed = lanczos_args(c, max(m, 1))
    v0 = v0_arg(c, n, m, device)

    def call():
        return T.sensitivity_lanczos(x, p, bias, k, steps, tol, seed, v0)

    def check(res) -> Optional[str]:
        if not finite(x, p, v0):
            return "returned for non-finite inputs"
        if res[0].device.type == "meta":
            return None
        A, A_abs = blocks_ref(x, p, b)
        return check_lanczos(res, A, k, steps, tol, ops._acc_dtype(x.dtype), max(n, 1), A_abs)

    return call, check


CASES = [case_blocks, case_accumulate, case_matvec, case_lanczos, case_sens_lanczos]


def test_fuzz_raw_ops(gen):
    seed = int(os.environ.get("TOPODERIV_FUZZ_SEED", int(torch.randint(0, 2**31, (1,), generator=gen))))
    print(f"fuzz seed {seed} (rerun: TOPODERIV_FUZZ_SEED={seed})")
    start = time.perf_counter()
    counts = {f.__name__: [0, 0] for f in CASES}  # returned, raised
    i = 0
    while i < MAX_CASES:
        elapsed = time.perf_counter() - start
        if elapsed > HARD_S or (elapsed > BUDGET_S and i >= MIN_CASES):
            break
        rng = random.Random(seed * 1_000_003 + i)
        c = Case(rng)
        make = rng.choice(CASES)
        call, check = make(c)
        where = f"case {i} ({make.__name__}: {', '.join(c.desc)}), seed {seed}"
        try:
            res = call()
        except ERRORS as err:
            counts[make.__name__][1] += 1
            msg = str(err)
            assert msg.strip(), f"{where}: empty error message"
        else:
            counts[make.__name__][0] += 1
            problem = check(res)
            assert problem is None, f"{where}: {problem}"
        i += 1
    print(f"{i} cases in {time.perf_counter() - start:.1f} s; returned/raised: {counts}")
    assert i >= 20
    if i >= MIN_CASES:
        for name, (ok, bad) in counts.items():  # both outcomes are exercised for every op
            assert ok > 0 and bad > 0, (name, ok, bad)
