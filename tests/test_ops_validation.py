"""The raw custom ops (torch.ops.topoderiv.*) validate what they are given, and so does the C++ layer.

Every message the validation added is matched here, against the op called directly, the fake
(meta) kernel, the public wrapper, or the compiled core (csrc/include/topoderiv/validate.h) called
with (pointer, span) pairs. Answers are compared with topoderiv.reference in float64.
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import topoderiv as td
from topoderiv import ops
from topoderiv import reference as ref
from topoderiv._lib import lib

from _helpers import assert_rejected

T = torch.ops.topoderiv
F64 = torch.float64


def sym(B: int, m: int, gen: torch.Generator, dtype=F64) -> torch.Tensor:
    g = torch.randn(B, m, m, generator=gen, dtype=F64)
    return ((g + g.mT) / 2).to(dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------ the tester's reports


def test_wrong_shaped_v_raises_instead_of_corrupting_the_heap(gen):
    x = torch.randn(50, 6, generator=gen)
    p = torch.randn(50, 3, generator=gen)
    for v in (torch.randn(2, 3), torch.randn(3, 6), torch.randn(3, 8), torch.randn(21), torch.randn(1, 3, 7)):
        with pytest.raises(ValueError, match=r"sensitivity_matvec: v must have shape \[n, m\] = \[3, 7\], got"):
            T.sensitivity_matvec(x, p, v, True)


@pytest.mark.parametrize("op", ["blocks", "accumulate", "matvec", "lanczos"])
def test_p_with_fewer_rows_than_x_raises(op, gen):
    x = torch.randn(50, 6, generator=gen)
    p = torch.randn(10, 3, generator=gen)
    name = {"blocks": "sensitivity_blocks", "accumulate": "sensitivity_blocks_accumulate_",
            "matvec": "sensitivity_matvec", "lanczos": "sensitivity_lanczos"}[op]
    with pytest.raises(ValueError, match=name + r": p must have as many rows as x \(N = 50\), got 10"):
        if op == "blocks":
            T.sensitivity_blocks(x, p, True)
        elif op == "accumulate":
            T.sensitivity_blocks_accumulate_(x, p, True, torch.zeros(3, 7, 7))
        elif op == "matvec":
            T.sensitivity_matvec(x, p, torch.zeros(3, 7), True)
        else:
            T.sensitivity_lanczos(x, p, True, 1, 7, 1e-6, 0)


def test_non_contiguous_inputs_give_the_right_answer(gen):
    # transposed, column-sliced and row-strided views of every tensor input of every raw op
    xt = torch.randn(6, 40, generator=gen, dtype=F64).T            # [40, 6], column stride 40
    pt = torch.randn(3, 40, generator=gen, dtype=F64).T            # [40, 3]
    wide = torch.randn(80, 20, generator=gen, dtype=F64)
    xs, ps = wide[::2, 1:13:2], wide[1::2, 14:17]                  # column stride 2, row stride 40
    for x, p in ((xt, pt), (xs[:, :6], ps), (xt, ps), (xs[:, :6], pt)):
        assert not (x.is_contiguous() and p.is_contiguous())
        exact = ref.sensitivity_blocks(x, p)
        assert rel_err(T.sensitivity_blocks(x, p, True), exact) < 1e-13
        out = exact.clone()
        T.sensitivity_blocks_accumulate_(x, p, True, out)
        assert rel_err(out, 2 * exact) < 1e-13
        vt = torch.randn(7, 3, generator=gen, dtype=F64).T          # [3, 7] transposed
        assert rel_err(T.sensitivity_matvec(x, p, vt, True), torch.einsum("rij,rj->ri", exact, vt)) < 1e-13
        w = torch.linalg.eigvalsh(exact)[:, -1]
        vals = T.sensitivity_lanczos(x, p, True, 1, 7, 1e-12, 0)[0]
        assert rel_err(vals[:, 0], w) < 1e-10
    a = sym(4, 9, gen)
    big = torch.zeros(4, 18, 18, dtype=F64)
    big[:, ::2, ::2] = a
    for view in (big[:, ::2, ::2], a.transpose(0, 1).transpose(0, 1)[::1], a.mT, torch.cat([a, a])[::2]):
        vals, vecs = T.lanczos_topk(view, 2, 9, 1e-12, 0)[:2]
        assert rel_err(vals, ref.eigh_topk(view.contiguous(), 2)[0]) < 1e-10
    v0 = torch.randn(9, 4, generator=gen, dtype=F64).T               # non-contiguous start vectors
    vals = T.lanczos_topk(a, 1, 9, 1e-12, 0, 1, v0)[0]
    assert rel_err(vals[:, 0], torch.linalg.eigvalsh(a)[:, -1]) < 1e-10


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.float16, torch.complex64, torch.uint8])
def test_other_dtypes_raise_type_errors(dtype):
    x, p = torch.zeros(5, 3).to(dtype), torch.zeros(5, 2).to(dtype)
    msg = r"x must have dtype in \(float32, float64, bfloat16\), got " + str(dtype).replace("torch.", "")
    with pytest.raises(TypeError, match="sensitivity_blocks: " + msg):
        T.sensitivity_blocks(x, p, True)
    with pytest.raises(TypeError, match="sensitivity_blocks_accumulate_: " + msg):
        T.sensitivity_blocks_accumulate_(x, p, True, torch.zeros(2, 4, 4))
    with pytest.raises(TypeError, match="sensitivity_matvec: " + msg):
        T.sensitivity_matvec(x, p, torch.zeros(2, 4), True)
    with pytest.raises(TypeError, match="sensitivity_lanczos: " + msg):
        T.sensitivity_lanczos(x, p, True, 1, 4, 1e-6, 0)
    with pytest.raises(TypeError, match=r"lanczos_topk: a must have dtype in \(float32, float64\)"):
        T.lanczos_topk(torch.zeros(1, 3, 3).to(dtype), 1, 3, 1e-6, 0)
    with pytest.raises(TypeError, match=r"sensitivity_blocks: x must have dtype in"):
        td.sensitivity_blocks(x, p)


# ------------------------------------------------------------------ every message of the raw ops

x0, p0 = torch.zeros(5, 3), torch.zeros(5, 2)
a0 = torch.eye(4).expand(2, 4, 4).contiguous()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: T.sensitivity_blocks(x0, p0.double(), True), TypeError,
         r"sensitivity_blocks: p must have the same dtype as x \(torch.float32\), got torch.float64"),
        (lambda: T.sensitivity_blocks(x0[None], p0[None], True), ValueError,
         r"sensitivity_blocks: x must be 2-D \[N, d\] \(the public functions flatten \[..., d\]\), got shape \[1, 5, 3\]"),
        (lambda: T.sensitivity_blocks(x0[0], p0, True), ValueError, r"x must be 2-D \[N, d\].*got shape \[3\]"),
        (lambda: T.sensitivity_blocks(x0, p0[0], True), ValueError,
         r"sensitivity_blocks: p must be 2-D \[N, n\], got shape \[2\]"),
        (lambda: T.sensitivity_blocks(torch.zeros(5, 0), p0, False), ValueError,
         "sensitivity_blocks: x must have d >= 1 features when bias=False, got d = 0"),
        (lambda: T.sensitivity_blocks(x0, p0.to("meta"), True), ValueError,
         r"sensitivity_blocks: p must be on the same device as x \(cpu\), got meta"),
        (lambda: T.sensitivity_blocks(torch.tensor([[1.0, float("inf")]]), torch.ones(1, 1), True), ValueError,
         "sensitivity_blocks: x must contain only finite values, got NaN or Inf"),
        (lambda: T.sensitivity_blocks(torch.ones(1, 2), torch.tensor([[float("nan")]]), True), ValueError,
         "sensitivity_blocks: p must contain only finite values, got NaN or Inf"),
        (lambda: T.sensitivity_blocks_accumulate_(x0, p0, True, torch.zeros(2, 3, 3)), ValueError,
         r"sensitivity_blocks_accumulate_: out must have shape \[n, m, m\] = \[2, 4, 4\], got \[2, 3, 3\]"),
        (lambda: T.sensitivity_blocks_accumulate_(x0, p0, True, torch.zeros(2, 4, 4, dtype=torch.bfloat16)), TypeError,
         r"sensitivity_blocks_accumulate_: out must have dtype in \(float32, float64\), got bfloat16"),
        (lambda: T.sensitivity_blocks_accumulate_(x0.double(), p0.double(), True, torch.zeros(2, 4, 4)), TypeError,
         "sensitivity_blocks_accumulate_: out must be float64 for float64 inputs, got torch.float32"),
        (lambda: T.sensitivity_blocks_accumulate_(x0, p0, True, torch.zeros(4, 4, 2).permute(2, 0, 1)), ValueError,
         r"sensitivity_blocks_accumulate_: out must be contiguous, got strides \(1, 8, 2\)"),
        (lambda: T.sensitivity_blocks_accumulate_(x0, p0, True, torch.zeros(2, 4, 4, device="meta")), ValueError,
         r"sensitivity_blocks_accumulate_: out must be on the same device as x \(cpu\), got meta"),
        (lambda: T.sensitivity_blocks_accumulate_(torch.tensor([[float("nan"), 0, 0]] * 5), p0, True,
                                                  torch.zeros(2, 4, 4)), ValueError,
         "sensitivity_blocks_accumulate_: x must contain only finite values"),
        (lambda: T.sensitivity_matvec(x0, p0, torch.zeros(2, 4, dtype=F64), True), TypeError,
         "sensitivity_matvec: v must have dtype torch.float32 for torch.float32 inputs, got torch.float64"),
        (lambda: T.sensitivity_matvec(x0.bfloat16(), p0.bfloat16(), torch.zeros(2, 4).bfloat16(), True), TypeError,
         "sensitivity_matvec: v must have dtype torch.float32 for torch.bfloat16 inputs, got torch.bfloat16"),
        (lambda: T.sensitivity_matvec(x0, p0, torch.zeros(2, 4, device="meta"), True), ValueError,
         r"sensitivity_matvec: v must be on the same device as x \(cpu\), got meta"),
        (lambda: T.sensitivity_matvec(x0, p0, torch.full((2, 4), float("inf")), True), ValueError,
         "sensitivity_matvec: v must contain only finite values, got NaN or Inf"),
        (lambda: T.sensitivity_matvec(torch.ones(5, 3), torch.full((5, 2), float("nan")), torch.ones(2, 4), True),
         ValueError, "sensitivity_matvec: p must contain only finite values, got NaN or Inf"),
        (lambda: T.lanczos_topk(a0[0], 1, 4, 1e-6, 0), ValueError,
         r"lanczos_topk: a must have shape \[B, m, m\], got \[4, 4\]"),
        (lambda: T.lanczos_topk(torch.zeros(2, 4, 3), 1, 3, 1e-6, 0), ValueError,
         r"lanczos_topk: a must have shape \[B, m, m\], got \[2, 4, 3\]"),
        (lambda: T.lanczos_topk(torch.zeros(2, 0, 0), 1, 1, 1e-6, 0), ValueError, "lanczos_topk: a must have m >= 1, got m = 0"),
        (lambda: T.lanczos_topk(a0, 0, 4, 1e-6, 0), ValueError, "lanczos_topk: k must be >= 1, got 0"),
        (lambda: T.lanczos_topk(a0, 5, 5, 1e-6, 0), ValueError, "lanczos_topk: k must be <= m = 4, got k = 5"),
        (lambda: T.lanczos_topk(a0, 2, 1, 1e-6, 0), ValueError, r"lanczos_topk: steps must be in \[2, 4\], got 1"),
        (lambda: T.lanczos_topk(a0, 1, 5, 1e-6, 0), ValueError, r"lanczos_topk: steps must be in \[1, 4\], got 5"),
        (lambda: T.lanczos_topk(a0, 1, 4, 0.0, 0), ValueError, "lanczos_topk: tol must be a finite number > 0, got 0.0"),
        (lambda: T.lanczos_topk(a0, 1, 4, float("inf"), 0), ValueError, "lanczos_topk: tol must be a finite number > 0"),
        (lambda: T.lanczos_topk(a0, 1, 4, 1e-6, -1), ValueError,
         r"lanczos_topk: seed must be in \[0, 9223372036854775807\], got -1"),
        (lambda: T.lanczos_topk(a0, 1, 4, 1e-6, 0, 0), ValueError, "lanczos_topk: norm_group must be >= 1, got 0"),
        (lambda: T.lanczos_topk(a0, 1, 4, 1e-6, 0, 1, torch.zeros(2, 3)), ValueError,
         r"lanczos_topk: v0 must have shape \[2, 4\], got \[2, 3\]"),
        (lambda: T.lanczos_topk(a0, 1, 4, 1e-6, 0, 1, torch.zeros(2, 4, dtype=torch.int32)), TypeError,
         "lanczos_topk: v0 must be a floating-point tensor, got torch.int32"),
        (lambda: T.lanczos_topk(a0, 1, 4, 1e-6, 0, 1, torch.zeros(2, 4, device="meta")), ValueError,
         r"lanczos_topk: v0 must be on the same device as the operator \(cpu\), got meta"),
        (lambda: T.lanczos_topk(a0, 1, 4, 1e-6, 0, 1, torch.full((2, 4), float("nan"))), ValueError,
         "lanczos_topk: v0 must contain only finite values, got NaN or Inf"),
        (lambda: T.lanczos_topk(a0 * float("inf"), 1, 4, 1e-6, 0), ValueError,
         "lanczos_topk: a must contain only finite values, got NaN or Inf"),
        (lambda: T.sensitivity_lanczos(x0, p0, True, 5, 5, 1e-6, 0), ValueError,
         "sensitivity_lanczos: k must be <= m = 4, got k = 5"),
        (lambda: T.sensitivity_lanczos(x0, p0, True, 1, 5, 1e-6, 0), ValueError,
         r"sensitivity_lanczos: steps must be in \[1, 4\], got 5"),
        (lambda: T.sensitivity_lanczos(x0, p0, True, 1, 4, -1.0, 0), ValueError,
         "sensitivity_lanczos: tol must be a finite number > 0, got -1.0"),
        (lambda: T.sensitivity_lanczos(x0, p0, True, 1, 4, 1e-6, 0, torch.zeros(2, 3)), ValueError,
         r"sensitivity_lanczos: v0 must have shape \[2, 4\], got \[2, 3\]"),
        (lambda: T.sensitivity_lanczos(torch.full((5, 3), float("inf")), p0, True, 1, 4, 1e-6, 0), ValueError,
         "sensitivity_lanczos: x must contain only finite values, got NaN or Inf"),
        (lambda: T.sensitivity_lanczos(x0.bfloat16(), p0, True, 1, 4, 1e-6, 0), TypeError,
         r"sensitivity_lanczos: p must have the same dtype as x \(torch.bfloat16\), got torch.float32"),
        (lambda: ops._check_device("sensitivity_lanczos", "x", x0.to("meta"), torch.device("meta")), ValueError,
         "sensitivity_lanczos: x must be a CPU or CUDA tensor, got device meta"),
        # the dispatcher's own argument parsing (before the op body): a RuntimeError naming op and argument
        (lambda: T.lanczos_topk(a0, 1, 4, 1e-6, 2**63), RuntimeError,
         r"topoderiv::lanczos_topk\(\) Expected a value of type 'int' for argument 'seed'"),
        (lambda: T.sensitivity_blocks([1.0], p0, True), RuntimeError,
         r"topoderiv::sensitivity_blocks\(\) Expected a value of type 'Tensor' for argument 'x'"),
        # public wrappers: the same checks under their own names
        (lambda: td.sensitivity_matvec(x0, p0, torch.full((2, 4), float("nan"))), ValueError,
         "sensitivity_matvec: v must contain only finite values"),
        (lambda: td.sensitivity_matvec(torch.full((5, 3), float("nan")), p0, torch.ones(2, 4)), ValueError,
         "sensitivity_matvec: x must contain only finite values"),
        (lambda: td.sensitivity_blocks(x0, torch.full((5, 2), float("-inf"))), ValueError,
         "sensitivity_blocks: p must contain only finite values"),
        (lambda: td.sensitivity_blocks(x0, torch.full((5, 2), float("-inf")), out=torch.zeros(2, 4, 4)), ValueError,
         "sensitivity_blocks_accumulate_: p must contain only finite values"),
        (lambda: td.lanczos_topk(a0, 1, v0=torch.zeros(2, 4, dtype=F64) * float("nan")), ValueError,
         "lanczos_topk: v0 must contain only finite values"),
    ],
)
def test_raw_op_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_fake_kernels_raise_the_same_shape_errors():
    # meta tensors run the fake kernels (shape inference): same messages as the real ops
    m = dict(device="meta")
    with pytest.raises(ValueError, match=r"sensitivity_blocks: p must have as many rows as x \(N = 5\), got 4"):
        T.sensitivity_blocks(torch.zeros(5, 3, **m), torch.zeros(4, 2, **m), True)
    with pytest.raises(ValueError, match=r"sensitivity_matvec: v must have shape \[n, m\] = \[2, 4\], got \[2, 3\]"):
        T.sensitivity_matvec(torch.zeros(5, 3, **m), torch.zeros(5, 2, **m), torch.zeros(2, 3, **m), True)
    with pytest.raises(ValueError, match=r"sensitivity_blocks_accumulate_: out must have shape \[n, m, m\]"):
        T.sensitivity_blocks_accumulate_(torch.zeros(5, 3, **m), torch.zeros(5, 2, **m), True, torch.zeros(2, 3, 3, **m))
    with pytest.raises(ValueError, match=r"lanczos_topk: steps must be in \[1, 4\], got 9"):
        T.lanczos_topk(torch.zeros(2, 4, 4, **m), 1, 9, 1e-6, 0)
    with pytest.raises(TypeError, match=r"sensitivity_lanczos: x must have dtype in"):
        T.sensitivity_lanczos(torch.zeros(5, 3, dtype=torch.int64, **m), torch.zeros(5, 2, dtype=torch.int64, **m),
                              True, 1, 4, 1e-6, 0)
    # valid shapes: the fake kernels give the real ops' shapes and dtypes
    got = T.sensitivity_lanczos(torch.zeros(5, 3, dtype=torch.bfloat16, **m), torch.zeros(5, 2, dtype=torch.bfloat16, **m),
                                True, 2, 4, 1e-6, 0)
    assert [tuple(t.shape) for t in got] == [(2, 2), (2, 4, 2), (2, 2), (2,), (2,), (2, 2)]
    assert got[0].dtype == torch.float32 and got[3].dtype == torch.int32
    # under FakeTensorMode (what torch.compile traces with) too
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        with pytest.raises(ValueError, match=r"sensitivity_blocks: p must have as many rows as x"):
            T.sensitivity_blocks(torch.zeros(5, 3), torch.zeros(4, 2), True)
        with pytest.raises(ValueError, match=r"lanczos_topk: k must be <= m = 4, got k = 5"):
            T.lanczos_topk(torch.zeros(2, 4, 4), 5, 5, 1e-6, 0)


def test_compiled_call_with_wrong_shapes_raises_at_trace_time():
    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, p):
        return T.sensitivity_blocks(x, p, True)

    with pytest.raises(Exception, match=r"sensitivity_blocks: p must have as many rows as x") as info:
        f(torch.zeros(5, 3), torch.zeros(4, 2))
    assert isinstance(info.value, (TypeError, ValueError, RuntimeError))


# ------------------------------------------------------------------ finite values


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["x", "p", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matvec_rejects_any_non_finite_input(bad, where, dtype, gen):
    # the matvec checks its small output, then names the input: every position must be caught
    N, d, n = 37, 5, 4
    for trial in range(4):
        x = torch.randn(N, d, generator=gen).to(dtype)
        p = torch.randn(N, n, generator=gen).to(dtype)
        v = torch.randn(n, d + 1, generator=gen).to(ops._acc_dtype(dtype))
        if trial == 1:  # zeros around the bad entry: Inf * 0 must still surface
            x.zero_(); p.zero_(); v.zero_()
        t = {"x": x, "p": p, "v": v}[where]
        idx = tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in t.shape)
        t[idx] = bad
        for bias in (True, False):
            vb = v if bias else v[:, :d].contiguous()
            if where == "v" and bool(torch.isfinite(vb).all()):
                continue  # the bad entry was in the bias column
            with pytest.raises(ValueError, match=f"sensitivity_matvec: {where} must contain only finite values"):
                T.sensitivity_matvec(x, p, vb, bias)


def test_matvec_overflow_of_finite_inputs_is_returned_not_rejected():
    x = torch.full((4, 2), 1e30)
    p = torch.ones(4, 1)
    v = torch.ones(1, 3)
    out = T.sensitivity_matvec(x, p, v, True)  # 1e30 * 1e30 overflows float32: inputs are finite
    assert torch.isinf(out).any()
    exact = ref.sensitivity_matvec(x.double(), p.double(), v.double())
    assert torch.isfinite(exact).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_blocks_reject_non_finite_inputs(bad, gen):
    x = torch.randn(30, 4, generator=gen)
    p = torch.randn(30, 2, generator=gen)
    for where in ("x", "p"):
        xx, pp = x.clone(), p.clone()
        (xx if where == "x" else pp)[7, 1] = bad
        with pytest.raises(ValueError, match=f"sensitivity_blocks: {where} must contain only finite values"):
            td.sensitivity_blocks(xx, pp)
        with pytest.raises(ValueError, match=f"sensitivity_blocks: {where} must contain only finite values"):
            T.sensitivity_blocks(xx, pp, True)


# ------------------------------------------------------------------ symmetry of the whole matrix


@pytest.mark.parametrize("chunk", [None, 5, 40])
def test_symmetry_is_checked_on_every_entry(chunk, gen, monkeypatch):
    # the old check sampled 8 rows: a perturbation in any other row went through
    if chunk is not None:  # small chunks: the batch-chunked and the row-slab paths
        monkeypatch.setattr(ops, "_SYM_CHUNK", chunk)
    B, m = 3, 30
    a = sym(B, m, gen)
    for b, i, j in ((0, 1, 2), (1, 13, 27), (2, 29, 0), (2, 5, 6)):
        bad = a.clone()
        bad[b, i, j] += 1e-9 * float(a[b].abs().max())  # far above 1e3 eps, far below any sampling
        with pytest.raises(ValueError, match=rf"lanczos_topk: a must be symmetric, got max \|a - a\^T\| = .* in matrix {b}"):
            td.lanczos_topk(bad, 1)
        with pytest.raises(ValueError, match=rf"a must be symmetric.* in matrix {b}"):
            T.lanczos_topk(bad, 1, m, 1e-6, 0)
    # rounding-level asymmetry (a matrix product) is accepted, and the answer is right
    q, _ = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=F64))
    prod = (q * torch.linspace(-1, 3, m, dtype=F64)) @ q.T
    assert not torch.equal(prod, prod.T)
    res = td.lanczos_topk(prod, 1, tol=1e-10)
    assert abs(float(res.values[0]) - 3.0) < 1e-9


def test_symmetry_tolerance_is_relative_to_the_norm_group(gen):
    a = sym(2, 12, gen)
    a[0] *= 1e6  # one dominant block, as in the blocks of one point
    a[1, 2, 3] += 1e-7  # asymmetric relative to its own norm (limit ~1e-12), not to the group's (~1e-7)
    with pytest.raises(ValueError, match=r"a must be symmetric.* in matrix 1"):
        td.lanczos_topk(a, 1)
    res = td.lanczos_topk(a, 1, shared_norm=True, tol=1e-8)  # measured against max |a| of the group
    assert res.converged.all()


# ------------------------------------------------------------------ out= aliasing


def test_out_sharing_memory_with_an_input_raises(gen):
    n, d = 2, 3
    m = d + 1
    store = torch.zeros(200)
    x = store[:40].view(10, 4)[:, :d]                 # rows of x live in store[0:40]
    p = torch.randn(10, n, generator=gen)
    for start in (0, 20, 39 - n * m * m + 1 + 5):     # overlapping the start, the middle and the end of x
        out = store[start:start + n * m * m].view(n, m, m)
        with pytest.raises(ValueError, match="sensitivity_blocks_accumulate_: out must not share memory with x "
                                             r"\(out is accumulated into while x is read\), got overlapping memory"):
            T.sensitivity_blocks_accumulate_(x, p, True, out)
        with pytest.raises(ValueError, match="sensitivity_blocks: out must not share memory with x"):
            td.sensitivity_blocks(x, p, out=out)
    pstore = torch.zeros(100)
    p2 = pstore[:20].view(10, 2)
    with pytest.raises(ValueError, match="out must not share memory with p"):
        T.sensitivity_blocks_accumulate_(torch.randn(10, d, generator=gen), p2, True, pstore[10:42].view(n, m, m))
    # the same storage without overlap is fine, and right
    x.copy_(torch.randn(10, d, generator=gen))
    out = store[40:40 + n * m * m].view(n, m, m)
    td.sensitivity_blocks(x, p, out=out)
    assert rel_err(out, ref.sensitivity_blocks(x.double(), p.double())) < 1e-6


# ------------------------------------------------------------------ the C++ layer (validate.h)


def _blocks_call(xt, pt, ot, **kw):
    args = dict(device="cpu", x=ops._buf(xt), x_rs=ops._rstride(xt), p=ops._buf(pt), p_rs=ops._rstride(pt),
                out=ops._buf(ot), batch=1, N=xt.shape[0], d=xt.shape[1], n=pt.shape[1], x_bs=0, p_bs=0, bias=True,
                in_dt=0, acc_dt=0, threads=1, stream=0)
    args.update(kw)
    lib().sensitivity_blocks(*args.values())


def test_core_checks_every_span_of_blocks(gen):
    x = torch.randn(6, 3, generator=gen)
    p = torch.randn(6, 2, generator=gen)
    out = torch.zeros(2, 4, 4)
    _blocks_call(x, p, out)
    assert rel_err(out, ref.sensitivity_blocks(x.double(), p.double())) < 1e-6
    xb, pb, ob = ops._buf(x), ops._buf(p), ops._buf(out)
    cases = [
        (dict(x=(xb[0], xb[1] - 1)), r"sensitivity_blocks: x must span at least 72 bytes \(what the kernels access "
                                     r"given its sizes, strides and dtype\), got 71"),
        (dict(p=(pb[0], 0)), "sensitivity_blocks: p must span at least 48 bytes"),
        (dict(out=(ob[0], ob[1] - 4)), "sensitivity_blocks: out must span at least 128 bytes"),
        (dict(N=7), "x must span at least 84 bytes"),
        (dict(x_rs=4), "x must span at least 92 bytes"),
        (dict(x=(0, 0)), r"sensitivity_blocks: x must be a non-null pointer \(72 bytes are accessed\), got null"),
        (dict(x=(xb[0] + 2, xb[1] - 2)), r"sensitivity_blocks: x must be aligned to its element size \(4 bytes\)"),
        (dict(out=(xb[0], 10**6)), r"sensitivity_blocks: out must not overlap x \(out is written while the kernels "
                                   r"use x\), got overlapping memory"),
        (dict(N=-1), "sensitivity_blocks: N must be >= 0, got -1"),
        (dict(batch=-2), "sensitivity_blocks: batch must be >= 0, got -2"),
        (dict(d=0, bias=False), "sensitivity_blocks: m = d \\+ bias must be >= 1, got d = 0 without bias"),
        (dict(x_rs=-3), "sensitivity_blocks: x_rstride must be >= 0, got -3"),
        (dict(p_bs=-1), "sensitivity_blocks: p_bstride must be >= 0, got -1"),
        (dict(in_dt=7), r"sensitivity_blocks: in_dtype must be a dtype code 0 \(float32\), 1 \(float64\) or 2 "
                        r"\(bfloat16\), got 7"),
        (dict(in_dt=1, acc_dt=0), "sensitivity_blocks: acc_dtype must be float64 for float64 inputs, got float32"),
        (dict(acc_dt=2), "sensitivity_blocks: acc_dtype must be float32 or float64, got bfloat16"),
        (dict(in_dt=1, acc_dt=1), "x must span at least 144 bytes"),  # the same tensors read as float64
        (dict(batch=2**62, x_bs=2**62), "sensitivity_blocks: sizes must fit in int64, got a product"),
        (dict(threads=0), "sensitivity_blocks: threads must be >= 1, got 0"),
        (dict(device="xpu"), "sensitivity_blocks: device must be 'cpu' or 'cuda', got 'xpu'"),
    ]
    assert_rejected(lambda **kw: _blocks_call(x, p, out, **kw), cases, out, cuda=True)
    # nothing is touched, so nothing is checked: empty problems pass with null pointers
    _blocks_call(x, p, out, N=0, x=(0, 0), p=(0, 0), out=(0, 0))
    _blocks_call(x, p, out, n=0, x=(0, 0), p=(0, 0), out=(0, 0))


def test_core_checks_every_span_of_matvec_and_lanczos(gen):
    x = torch.randn(6, 3, generator=gen)
    p = torch.randn(6, 2, generator=gen)
    v = torch.randn(2, 4, generator=gen)
    out = torch.zeros(2, 4)
    b = ops._buf

    def mv(**kw):
        args = dict(device="cpu", x=b(x), x_rs=3, p=b(p), p_rs=2, v=b(v), out=b(out), ws=(0, 0), batch=1, N=6, d=3, n=2,
                    x_bs=0, p_bs=0, bias=True, in_dt=0, acc_dt=0, threads=1, stream=0)
        args.update(kw)
        lib().sensitivity_matvec(*args.values())

    mv()
    assert rel_err(out, ref.sensitivity_matvec(x.double(), p.double(), v.double())) < 1e-6
    for kw, match in [
        (dict(v=(b(v)[0], 31)), "sensitivity_matvec: v must span at least 32 bytes"),
        (dict(out=b(v)), r"sensitivity_matvec: out must not overlap v"),
        (dict(out=(b(x)[0] + 8, 32)), r"sensitivity_matvec: out must not overlap x"),
        (dict(out=(0, 0)), "sensitivity_matvec: out must be a non-null pointer"),
        (dict(n=3), "sensitivity_matvec: out must span at least 48 bytes"),
        (dict(N=7), "sensitivity_matvec: x must span at least 84 bytes"),
        (dict(p_rs=3), "sensitivity_matvec: p must span at least 68 bytes"),
    ]:
        with pytest.raises(ValueError, match=match):
            mv(**kw)

    B, m, k, steps = 2, 5, 1, 5
    a = sym(B, m, gen, torch.float32)
    outs = dict(values=torch.zeros(B, k), vectors=torch.zeros(B, m, k), ritz=torch.zeros(B, k),
                nsteps=torch.zeros(B, dtype=torch.int32), anorm=torch.zeros(B, dtype=F64), tres=torch.zeros(B, k))
    ws = torch.zeros(lib().lanczos_workspace_elems(B, m, k, steps, False, False, 0, 0, 1))

    def lz(**kw):
        args = dict(device="cpu", a=b(a), x=(0, 0), x_rs=0, p=(0, 0), p_rs=0, op_batch=0, N=0, d=0, n=0, bias=True,
                    in_dt=0, B=B, m=m, k=k, steps=steps, tol=1e-6, seed=0, norm_group=1, v0=(0, 0), dt=0,
                    **{name: b(t) for name, t in outs.items()}, ws=b(ws), threads=1, stream=0)
        args.update(kw)
        lib().lanczos_topk(*args.values())

    lz()
    assert rel_err(outs["values"][:, 0], torch.linalg.eigvalsh(a.double())[:, -1]) < 1e-5
    for kw, match in [
        (dict(a=(b(a)[0], b(a)[1] - 4)), "lanczos_topk: a must span at least 200 bytes"),
        (dict(ws=(b(ws)[0], b(ws)[1] - 4)), "lanczos_topk: workspace must span at least"),
        (dict(vectors=b(outs["ritz"])), "lanczos_topk: vectors must span at least 40 bytes"),
        (dict(values=b(a)), "lanczos_topk: values must not overlap a"),
        (dict(ritz=b(outs["values"])), "lanczos_topk: values must not overlap ritz_residuals|ritz_residuals must not overlap values"),
        (dict(v0=(b(a)[0], 39)), "lanczos_topk: v0 must span at least 40 bytes"),
        (dict(nsteps=(0, 0)), "lanczos_topk: steps must be a non-null pointer"),
        (dict(anorm=(b(outs["anorm"])[0], 8)), "lanczos_topk: anorm must span at least 16 bytes"),
        (dict(k=0), r"lanczos_topk: k must be in \[1, m = 5\], got 0"),
        (dict(steps=6), r"lanczos_topk: max_steps must be in \[k = 1, m = 5\], got 6"),
        (dict(m=0), "lanczos_topk: m must be >= 1, got 0"),
        (dict(B=-1), "lanczos_topk: num_problems must be >= 0, got -1"),
        (dict(tol=float("nan")), "lanczos_topk: tol must be a finite number > 0"),
        (dict(norm_group=0), "lanczos_topk: norm_group must be >= 1, got 0"),
        (dict(dt=2), "lanczos_topk: dtype must be float32 or float64, got bfloat16"),
        (dict(a=(0, 0), op_batch=1, N=6, d=3, n=3, x=b(x), x_rs=3, p=b(p), p_rs=2, m=4, steps=4), r"the matrix-free "
         r"operator must have op.batch \* op.n = num_problems = 2 and op.m = m = 4, got 1 \* 3 and 4"),
        (dict(a=(0, 0), op_batch=1, N=7, d=3, n=2, x=b(x), x_rs=3, p=b(p), p_rs=2, m=4, steps=4),
         "lanczos_topk: x must span at least 84 bytes"),
    ]:
        with pytest.raises(ValueError, match=match):
            lz(**kw)
    with pytest.raises(ValueError, match="lanczos_workspace_elems: num_problems must be >= 0, got -1"):
        lib().lanczos_workspace_elems(-1, 5, 1, 5, False, False, 0, 0, 1)
    with pytest.raises(ValueError, match="lanczos_workspace_elems: sizes must fit in int64"):
        lib().lanczos_workspace_elems(2**40, 2**30, 1, 5, False, False, 0, 0, 1)


# ------------------------------------------------------------------ opcheck on awkward inputs


def test_opcheck_non_contiguous_and_empty_inputs(gen):
    xt = torch.randn(6, 20, generator=gen).T
    pt = torch.randn(3, 20, generator=gen).T
    vt = torch.randn(7, 3, generator=gen).T
    opcheck(T.sensitivity_blocks.default, (xt, pt, True))
    opcheck(T.sensitivity_blocks_accumulate_.default, (xt, pt, True, torch.zeros(3, 7, 7)))
    opcheck(T.sensitivity_matvec.default, (xt, pt, vt, True))
    opcheck(T.sensitivity_lanczos.default, (xt, pt, True, 1, 7, 1e-6, 0))
    opcheck(T.lanczos_topk.default, (sym(2, 7, gen, torch.float32).mT, 1, 7, 1e-6, 0, 2))
    opcheck(T.sensitivity_blocks.default, (torch.zeros(0, 4), torch.zeros(0, 2), False))
    opcheck(T.sensitivity_matvec.default, (torch.zeros(5, 4), torch.zeros(5, 0), torch.zeros(0, 5), True))
    opcheck(T.lanczos_topk.default, (torch.zeros(0, 3, 3), 1, 3, 1e-6, 0))
