"""Core ops against float64 references: blocks, matvec, Lanczos, top-k, custom-op machinery."""
from __future__ import annotations

import math

import pytest
import torch

import topoderiv as td
from topoderiv import ops
from topoderiv import reference as ref
from topoderiv._lib import lib

from _helpers import matvec_problem


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-300)
    return float((a.double() - b.double()).abs().max() / scale)


def torch_fp32_err(x: torch.Tensor, p: torch.Tensor, bias: bool, exact: torch.Tensor) -> float:
    """Error of PyTorch's own float32 computation of the same quantity (the tolerance yardstick)."""
    return rel_err(ref.sensitivity_blocks(x.float(), p.float(), bias=bias), exact)


# ------------------------------------------------------------------------------------ blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocks_exact_every_triangle_tiling(dtype, gen):
    # the upper triangle is cut into tiles of NR (32 fp32 / 16 fp64) consecutive pairs that span
    # row ends: every m up to 3 NR + 2, with and without the bias column, bit-exact
    for m in range(1, 99):
        for bias in (True, False):
            d = m - int(bias)
            if d == 0:
                continue
            x = torch.randint(-3, 4, (41, d), generator=gen).to(dtype)
            p = torch.randint(-3, 4, (41, 9), generator=gen).to(dtype)
            got = td.sensitivity_blocks(x, p, bias=bias)
            assert torch.equal(got.double(), ref.sensitivity_blocks(x.double(), p.double(), bias=bias)), (m, bias)
    # more than one 256-sample chunk, accumulated into an existing out
    for m in (17, 33, 65, 70):
        x = torch.randint(-3, 4, (300, m - 1), generator=gen).to(dtype)
        p = torch.randint(-3, 4, (300, 11), generator=gen).to(dtype)
        out = ref.sensitivity_blocks(x[:7].double(), p[:7].double()).to(dtype)
        td.sensitivity_blocks(x, p, out=out)
        exact = ref.sensitivity_blocks(x[:7].double(), p[:7].double()) + ref.sensitivity_blocks(x.double(), p.double())
        assert torch.equal(out.double(), exact), m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_blocks_exact_small_integers(dtype, bias, gen):
    # small integers: every product and partial sum is exactly representable -> bit-exact
    N, d, n = 37, 19, 11
    x = torch.randint(-3, 4, (N, d), generator=gen).to(dtype)
    p = torch.randint(-3, 4, (N, n), generator=gen).to(dtype)
    got = td.sensitivity_blocks(x, p, bias=bias)
    exact = ref.sensitivity_blocks(x.double(), p.double(), bias=bias)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(got.double(), exact)


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 5, 3), (7, 1, 2), (33, 31, 9), (300, 70, 17), (513, 40, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_blocks_random_fp32(shape, bias, gen):
    N, d, n = shape
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    p = torch.randn(N, n, generator=gen, dtype=torch.float64)
    exact = ref.sensitivity_blocks(x, p, bias=bias)
    got = td.sensitivity_blocks(x.float(), p.float(), bias=bias)
    tol = 2 * torch_fp32_err(x, p, bias, exact) + 4 * torch.finfo(torch.float32).eps
    assert rel_err(got, exact) <= tol
    assert torch.equal(got, got.mT), "blocks must be exactly symmetric"


def test_blocks_fp64_matches_reference(gen):
    x = torch.randn(129, 45, generator=gen, dtype=torch.float64)
    p = torch.randn(129, 7, generator=gen, dtype=torch.float64)
    assert rel_err(td.sensitivity_blocks(x, p), ref.sensitivity_blocks(x, p)) < 1e-13


def test_blocks_bf16_accumulates_in_fp32(gen):
    x = torch.randn(400, 33, generator=gen).bfloat16()
    p = torch.randn(400, 5, generator=gen).bfloat16()
    exact = ref.sensitivity_blocks(x.double(), p.double())  # of the bf16-rounded inputs
    got = td.sensitivity_blocks(x, p)
    assert got.dtype == torch.float32
    assert rel_err(got, exact) < 1e-5  # fp32 accumulation, not bf16


def test_blocks_tokens_layout_and_noncontiguous(gen):
    x = torch.randn(6, 10, 24, generator=gen, dtype=torch.float64)   # [batch, tokens, d]
    p = torch.randn(6, 10, 5, generator=gen, dtype=torch.float64)
    exact = ref.sensitivity_blocks(x.reshape(-1, 24), p.reshape(-1, 5))
    assert rel_err(td.sensitivity_blocks(x, p), exact) < 1e-13
    # non-contiguous: transposed leading dims, column slices, row strides
    xt = x.transpose(0, 1)
    pt = p.transpose(0, 1)
    assert rel_err(td.sensitivity_blocks(xt, pt), ref.sensitivity_blocks(xt.reshape(-1, 24), pt.reshape(-1, 5))) < 1e-13
    big = torch.randn(60, 50, generator=gen, dtype=torch.float64)
    xs, ps = big[::2, 3:27], big[1::2, 30:35]
    assert not xs.is_contiguous()
    assert rel_err(td.sensitivity_blocks(xs, ps), ref.sensitivity_blocks(xs.contiguous(), ps.contiguous())) < 1e-13


def test_blocks_streaming_equals_one_call(gen):
    x = torch.randn(1000, 40, generator=gen, dtype=torch.float64)
    p = torch.randn(1000, 6, generator=gen, dtype=torch.float64)
    whole = td.sensitivity_blocks(x, p)
    acc = torch.zeros(6, 41, 41, dtype=torch.float64)
    for s in range(0, 1000, 137):
        out = td.sensitivity_blocks(x[s:s + 137], p[s:s + 137], out=acc)
        assert out is acc
    assert rel_err(acc, whole) < 1e-13
    # float32 inputs into a float64 accumulator (CPU)
    acc64 = torch.zeros(6, 41, 41, dtype=torch.float64)
    for s in range(0, 1000, 250):
        td.sensitivity_blocks(x[s:s + 250].float(), p[s:s + 250].float(), out=acc64)
    assert rel_err(acc64, ref.sensitivity_blocks(x.float().double(), p.float().double())) < 1e-12


def test_blocks_lower_triangle_is_mirrored_not_read(gen):
    # out's upper triangle is accumulated into and mirrored: poisoned lower entries must vanish
    x = torch.randn(50, 20, generator=gen, dtype=torch.float64)
    p = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    out = torch.zeros(3, 21, 21, dtype=torch.float64)
    il = torch.tril_indices(21, 21, -1)
    out[:, il[0], il[1]] = float("nan")
    td.sensitivity_blocks(x, p, out=out)
    assert rel_err(out, ref.sensitivity_blocks(x, p)) < 1e-13


def test_blocks_empty():
    x = torch.zeros(0, 5)
    p = torch.zeros(0, 3)
    assert torch.equal(td.sensitivity_blocks(x, p), torch.zeros(3, 6, 6))
    assert td.sensitivity_blocks(torch.zeros(4, 5), torch.zeros(4, 0)).shape == (0, 6, 6)
    assert torch.equal(td.sensitivity_blocks(torch.zeros(4, 0), torch.ones(4, 2)), torch.full((2, 1, 1), 4.0))


def test_blocks_memory_has_no_n_by_N_by_m_intermediate(gen):
    # 2000 x 64 x 65 fp32 would be 33 MB; the op's allocations stay near the 1 MB output
    import tracemalloc  # noqa: F401  (torch CPU allocations are not traced; use the profiler)
    x = torch.randn(2000, 64, generator=gen)
    p = torch.randn(2000, 64, generator=gen)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        td.sensitivity_blocks(x, p)
    peak = max((e.cpu_memory_usage for e in prof.key_averages()), default=0)
    assert peak <= 2 * 64 * 65 * 65 * 4


# ------------------------------------------------------------------------------------ matvec


@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 2), (300, 70, 17), (700, 33, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matvec_against_blocks(shape, dtype, gen):
    x, p, v, acc, exact = matvec_problem(shape, dtype, gen)
    got = td.sensitivity_matvec(x, p, v.to(acc))
    tol = 1e-12 if dtype == torch.float64 else 2e-5 * math.sqrt(shape[0])
    assert got.dtype == acc
    assert rel_err(got, exact) < tol


def test_matvec_poisoned_output_is_overwritten(gen):
    x = torch.randn(40, 9, generator=gen)
    p = torch.randn(40, 4, generator=gen)
    v = torch.randn(4, 10, generator=gen)
    out = torch.full((4, 10), float("nan"))
    lib().sensitivity_matvec("cpu", ops._buf(x), x.stride(0), ops._buf(p), p.stride(0), ops._buf(v),
                             ops._buf(out), (0, 0), 1, 40, 9, 4, 0, 0, True, 0, 0, 1, 0)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref.sensitivity_matvec(x.double(), p.double(), v.double())) < 1e-5


# ------------------------------------------------------------------------------------ Lanczos


def gapped(B: int, m: int, gen: torch.Generator, top: float = 5.0, second: float = 3.0) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(B, m, m, generator=gen, dtype=torch.float64))
    ev = torch.rand(B, m, generator=gen, dtype=torch.float64) * 4 - 2  # in [-2, 2)
    ev[:, 0], ev[:, 1] = top, second
    a = (Q * ev[:, None, :]) @ Q.mT
    return (a + a.mT) / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanczos_gapped_matches_eigh(dtype, gen):
    a = gapped(12, 97, gen)
    res = td.lanczos_topk(a.to(dtype), 2)
    w, v = ref.eigh_topk(a, 2)
    assert res.converged.all()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert rel_err(res.values, w) < tol
    # eigenvectors up to sign
    overlap = (res.vectors.double() * v).sum(1).abs()
    assert (overlap > 1 - 10 * tol).all()
    assert (res.steps < 97).all(), "gapped spectra must stop early"
    assert (res.residuals <= max(1e-6, ops._residual_floor(97, dtype))).all()


def test_lanczos_gapless_flag_tells_the_truth(gen):
    g = torch.randn(16, 300, 300, generator=gen, dtype=torch.float64)
    a = (g + g.mT) / 2  # Wigner: no gap at the top edge
    w = torch.linalg.eigvalsh(a)[:, -1]
    few = td.lanczos_topk(a, 1, steps=12)
    err = (few.values[:, 0] - w).abs() / w.abs()
    assert not few.converged.any(), "12 steps cannot resolve a gapless spectrum to 1e-6"
    assert (err > 1e-6).all()
    full = td.lanczos_topk(a, 1, steps=300, tol=1e-8)
    assert full.converged.all()
    assert ((full.values[:, 0] - w).abs() / w.abs()).max() < 1e-10
    # whenever the flag says converged, the answer is right
    mid = td.lanczos_topk(a, 1, steps=60)
    ok = mid.converged
    assert (((mid.values[:, 0] - w).abs() / w.abs())[ok] < 1e-6).all()


def test_lanczos_indefinite_takes_algebraic_max(gen):
    a = gapped(4, 50, gen, top=1.0, second=0.5)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=gen, dtype=torch.float64))
    neg = Q @ torch.diag(torch.linspace(-10, 1.0, 50, dtype=torch.float64)) @ Q.T
    a = torch.cat([a, ((neg + neg.T) / 2)[None]])
    res = td.lanczos_topk(a, 1)
    assert res.converged.all()
    assert rel_err(res.values[:, 0], torch.linalg.eigvalsh(a)[:, -1]) < 1e-10
    assert abs(float(res.values[-1, 0]) - 1.0) < 1e-10  # not -10, the largest magnitude


def test_lanczos_multiplicity_rank_deficient_zero_and_tiny(gen):
    # repeated top eigenvalue (k=1 is exact), near-degenerate pair (k=2 resolves it), rank-1
    # (invariant subspace after 2 steps), zero matrix, m = 1, m = 2
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    rep = Q @ torch.diag(torch.tensor([4.0, 4.0] + [0.5] * 28, dtype=torch.float64)) @ Q.T
    close = Q @ torch.diag(torch.linspace(-1, 1, 30, dtype=torch.float64).flip(0) + torch.tensor([3.0, 2.999] + [0.0] * 28, dtype=torch.float64)) @ Q.T
    u = torch.randn(30, generator=gen, dtype=torch.float64)
    a = torch.stack([(rep + rep.T) / 2, (close + close.T) / 2, torch.outer(u, u), torch.zeros(30, 30, dtype=torch.float64)])
    top1 = td.lanczos_topk(a, 1)
    assert top1.converged.all()
    assert abs(float(top1.values[0, 0]) - 4.0) < 1e-10
    res = td.lanczos_topk(a[1:], 2, tol=1e-10)
    assert res.converged.all()
    assert rel_err(res.values, ref.eigh_topk(a[1:], 2)[0]) < 1e-9
    assert torch.equal(res.values[2], torch.zeros(2, dtype=torch.float64))
    one = td.lanczos_topk(torch.tensor([[[-3.0]]]), 1)
    assert one.values.item() == -3.0 and one.converged.item()
    two = td.lanczos_topk(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64), 2)  # 2-D input
    assert torch.allclose(two.values, torch.tensor([3.0, 1.0], dtype=torch.float64))


def test_lanczos_deterministic_and_seeded(gen):
    a = gapped(3, 40, gen)
    r1, r2 = td.lanczos_topk(a, 1, seed=7), td.lanczos_topk(a, 1, seed=7)
    assert torch.equal(r1.vectors, r2.vectors) and torch.equal(r1.values, r2.values)
    r3 = td.lanczos_topk(a, 1, seed=8)
    assert torch.allclose(r3.values, r1.values, atol=1e-10)


def test_lanczos_poisoned_outputs_are_written(gen):
    a = gapped(5, 20, gen).float()
    B, m, k, steps = 5, 20, 2, 20
    vals = torch.full((B, k), float("nan"))
    vecs = torch.full((B, m, k), float("nan"))
    ritz = torch.full((B, k), float("nan"))
    nsteps = torch.full((B,), -1, dtype=torch.int32)
    anorm = torch.full((B,), float("nan"), dtype=torch.float64)
    tres = torch.full((B, k), float("nan"))
    ws = torch.full((lib().lanczos_workspace_elems(B, m, k, steps, False, False, 0, 0, 1),), float("nan"))
    b = ops._buf
    lib().lanczos_topk("cpu", b(a), (0, 0), 0, (0, 0), 0, 0, 0, 0, 0, True, 0, B, m, k, steps, 1e-6, 0, 1, (0, 0), 0,
                       b(vals), b(vecs), b(ritz), b(nsteps), b(anorm), b(tres), b(ws), 1, 0)
    for t in (vals, vecs, ritz, anorm, tres):
        assert torch.isfinite(t).all()
    assert (nsteps >= k).all()


# ------------------------------------------------------------------------------------ top-k


def real_like(N, d, n, gen, dtype=torch.float64):
    x = torch.randn(N, d, generator=gen, dtype=torch.float64) / torch.arange(1, d + 1, dtype=torch.float64).sqrt()
    q = (x @ torch.randn(d, n, generator=gen, dtype=torch.float64)) ** 2
    p = (q - q.mean(0)) / N + 0.01 * torch.randn(N, n, generator=gen, dtype=torch.float64) / N
    return x.to(dtype), p.to(dtype)


@pytest.mark.parametrize("route", ["dense", "matfree", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_routes_agree_with_reference(route, dtype, gen):
    x, p = real_like(600, 30, 7, gen, dtype)
    w, v = ref.sensitivity_topk(x.double(), p.double(), k=2)
    res = td.sensitivity_topk(x, p, k=2, route=route)
    assert res.route in ("dense", "matfree")
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert res.converged.all()
    assert rel_err(res.values, w) < tol
    assert res.best_block == int(w[:, 0].argmax())
    assert abs(res.best_value - float(w[:, 0].max())) <= tol * float(w.abs().max())
    assert float((res.best_vector.double() @ v[res.best_block, :, 0]).abs()) > 1 - 1e-4


def test_topk_dense_and_matfree_agree(gen):
    x, p = real_like(300, 50, 5, gen)
    a = td.sensitivity_topk(x, p, route="dense", tol=1e-10)
    b = td.sensitivity_topk(x, p, route="matfree", tol=1e-10)
    assert rel_err(a.values, b.values) < 1e-9


def test_choose_route_cost_model():
    assert ops.choose_route(8192, 32, 64) == "dense"  # m = 33 < 4 x 12 steps
    assert ops.choose_route(8192, 64, 64) == "matfree"
    assert ops.choose_route(8192, 256, 256) == "matfree"
    assert ops.choose_route(4096, 1024, 1024) == "matfree"  # 4 GB of blocks: never dense
    assert ops.choose_route(100, 2000, 300) == "matfree"


# ------------------------------------------------------------------------------------ arbiter


def test_finite_difference_arbiter_through_ops():
    """METHOD.md section 6: J(eps) - J(0) = -(eps^2/2) mu + O(eps^3) at every insertion point."""
    torch.manual_seed(3)
    S, width, L = 64, 8, 4
    dt = torch.float64
    X = torch.randn(S, 3, dtype=dt)
    Y = torch.randn(S, 2, dtype=dt)
    W_in = torch.randn(3, width, dtype=dt, requires_grad=True)
    blocks = [(0.5 * torch.randn(width, width, dtype=dt), 0.3 * torch.randn(width, dtype=dt)) for _ in range(L)]
    W_out = torch.randn(width, 2, dtype=dt)
    sigma = lambda z: 2 * torch.nn.functional.silu(z) - torch.tanh(z)  # noqa: E731  sigma''(0) = 1

    def loss(insert_at=None, W=None, b=None):
        h = torch.tanh(X @ W_in)
        states = []
        for l in range(L + 1):
            if insert_at == l:
                h = h + sigma(h @ W.T + b)
            states.append(h)
            if l < L:
                Wl, bl = blocks[l]
                h = h + torch.tanh(h @ Wl.T + bl)
        return ((h @ W_out - Y) ** 2).sum(1).mean(), states

    J0, states = loss()
    for s in states:
        s.retain_grad()
    J0.backward()
    eps = 1e-3
    for l in range(L + 1):
        x = states[l].detach()
        p = -states[l].grad
        res = td.sensitivity_topk(x, p, k=1, tol=1e-12)
        mu = 1.0 * res.best_value  # sigma''(0) = 1
        assert mu > 0
        phi = torch.zeros(width, width + 1, dtype=dt)
        phi[res.best_block] = res.best_vector
        with torch.no_grad():
            Je, _ = loss(l, eps * phi[:, :width], eps * phi[:, width])
        ratio = float(J0.detach() - Je) / (eps**2 / 2 * mu)
        assert 0.99 < ratio < 1.01, (l, ratio)


# ------------------------------------------------------------------------------------ custom ops


def test_opcheck_every_op(gen):
    from torch.library import opcheck
    x = torch.randn(20, 6, generator=gen)
    p = torch.randn(20, 3, generator=gen)
    v = torch.randn(3, 7, generator=gen)
    a = gapped(2, 7, gen).float()
    opcheck(torch.ops.topoderiv.sensitivity_blocks.default, (x, p, True))
    opcheck(torch.ops.topoderiv.sensitivity_blocks_accumulate_.default, (x, p, True, torch.zeros(3, 7, 7)))
    opcheck(torch.ops.topoderiv.sensitivity_matvec.default, (x, p, v, True))
    opcheck(torch.ops.topoderiv.lanczos_topk.default, (a, 1, 7, 1e-6, 0))
    opcheck(torch.ops.topoderiv.sensitivity_lanczos.default, (x, p, True, 1, 7, 1e-6, 0))
    v0 = torch.randn(2, 7, generator=gen)
    opcheck(torch.ops.topoderiv.lanczos_topk.default, (a, 1, 7, 1e-6, 0, 1, v0))
    opcheck(torch.ops.topoderiv.sensitivity_lanczos.default, (x, p, True, 1, 7, 1e-6, 0, v))


def test_ops_under_torch_compile(gen):
    x = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    p = torch.randn(50, 3, generator=gen, dtype=torch.float64)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, p):
        return torch.ops.topoderiv.sensitivity_blocks(x, p, True).sum(0)

    assert rel_err(f(x, p), ref.sensitivity_blocks(x, p).sum(0)) < 1e-12

    @torch.compile(backend="aot_eager")
    def g(x, p):
        return td.sensitivity_blocks(x * 2, p)

    assert rel_err(g(x, p), ref.sensitivity_blocks(2 * x, p)) < 1e-12


def test_inputs_are_detached(gen):
    x = torch.randn(10, 4, generator=gen, requires_grad=True)
    p = torch.randn(10, 2, generator=gen)
    out = td.sensitivity_blocks(x, p)
    assert not out.requires_grad


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: td.sensitivity_blocks([1.0], torch.zeros(1, 1)), TypeError, "x must be a torch.Tensor, got list"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 2, dtype=torch.int64), torch.zeros(3, 1, dtype=torch.int64)),
         TypeError, r"x must have dtype in \(float32, float64, bfloat16\), got int64"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 2), torch.zeros(3, 1, dtype=torch.float64)), TypeError,
         "p must have the same dtype as x"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 2), torch.zeros(4, 1)), ValueError,
         r"same leading dims, got x \(3, 2\) and p \(4, 1\)"),
        (lambda: td.sensitivity_blocks(torch.zeros(()), torch.zeros(1)), ValueError, "x must have shape"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 0), torch.zeros(3, 1), bias=False), ValueError, "d >= 1"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 2), torch.zeros(3, 1), out=torch.zeros(1, 2, 2)), ValueError,
         r"out must have shape \[n, m, m\] = \[1, 3, 3\], got \[1, 2, 2\]"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 2), torch.zeros(3, 1), out=torch.zeros(1, 3, 3, dtype=torch.int32)),
         TypeError, "out must have dtype"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64),
                                       out=torch.zeros(1, 3, 3)), TypeError, "out must be float64"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 2), torch.zeros(3, 1), out=torch.zeros(1, 3, 3).mT), ValueError,
         "out must be contiguous"),
        (lambda: td.sensitivity_blocks(torch.zeros(3, 2), torch.zeros(3, 1), bias=1), TypeError, "bias must be a bool"),
        (lambda: td.sensitivity_matvec(torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(1, 2)), ValueError,
         r"v must have shape \[n, m\] = \[1, 3\], got \[1, 2\]"),
        (lambda: td.sensitivity_matvec(torch.zeros(3, 2), torch.zeros(3, 1), torch.zeros(1, 3, dtype=torch.float64)),
         TypeError, "v must have dtype torch.float32"),
        (lambda: td.lanczos_topk(torch.zeros(2, 3, 4)), ValueError, r"a must have shape \[B, m, m\] or \[m, m\], got \[2, 3, 4\]"),
        (lambda: td.lanczos_topk(torch.zeros(2, 3, 3, dtype=torch.bfloat16)), TypeError, "a must have dtype in"),
        (lambda: td.lanczos_topk(torch.eye(3), k=4), ValueError, "k must be <= m = 3, got k = 4"),
        (lambda: td.lanczos_topk(torch.eye(3), k=0), ValueError, r"k must be >= 1, got 0"),
        (lambda: td.lanczos_topk(torch.eye(3), k=1.5), TypeError, "k must be an int, got float"),
        (lambda: td.lanczos_topk(torch.eye(3), k=2, steps=1), ValueError, r"steps must be >= 2, got 1"),
        (lambda: td.lanczos_topk(torch.eye(3), tol=-1.0), ValueError, "tol must be a finite number > 0"),
        (lambda: td.lanczos_topk(torch.eye(3), tol="1e-6"), TypeError, "tol must be a number, got str"),
        (lambda: td.lanczos_topk(torch.eye(3), tol=float("nan")), ValueError, "tol must be a finite number > 0"),
        (lambda: td.lanczos_topk(torch.eye(3), seed=-1), ValueError, r"seed must be in \[0, 9223372036854775807\], got -1"),
        (lambda: td.lanczos_topk(torch.eye(3), seed=2**63), ValueError,
         r"seed must be in \[0, 9223372036854775807\], got 9223372036854775808"),
        (lambda: td.sensitivity_topk(torch.zeros(3, 2), torch.zeros(3, 1), seed=2**64), ValueError,
         r"sensitivity_topk: seed must be in \[0, 9223372036854775807\]"),
        (lambda: td.lanczos_topk(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])), ValueError,
         "a must contain only finite values, got NaN or Inf"),
        (lambda: td.lanczos_topk(torch.tensor([[1.0, 2.0], [0.0, 1.0]])), ValueError, "a must be symmetric"),
        (lambda: td.sensitivity_topk(torch.zeros(3, 2), torch.zeros(3, 1), route="fast"), ValueError,
         "route must be one of"),
        (lambda: td.sensitivity_topk(torch.zeros(3, 2), torch.zeros(3, 1), k=4), ValueError, "k must be <= m = 3"),
        (lambda: td.sensitivity_topk(torch.tensor([[float("inf"), 0.0]]), torch.zeros(1, 1)), ValueError,
         "x must contain only finite values"),
        (lambda: td.sensitivity_topk(torch.zeros(1, 2), torch.tensor([[float("nan")]])), ValueError,
         "p must contain only finite values"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_device_errors(monkeypatch):
    x = torch.zeros(3, 2, device="meta")
    with pytest.raises(ValueError, match="x must be a CPU or CUDA tensor, got device meta"):
        td.sensitivity_blocks(x, torch.zeros(3, 1, device="meta"))
    with pytest.raises(ValueError, match="p must be on the same device as x"):
        td.sensitivity_blocks(torch.zeros(3, 2), torch.zeros(3, 1, device="meta"))
    # a CUDA tensor given to a build without CUDA kernels says how to rebuild (simulated: no GPU here)
    from types import SimpleNamespace
    monkeypatch.setattr(ops, "has_cuda_kernels", lambda: False)
    fake = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(RuntimeError, match="no CUDA kernels; rebuild with nvcc on PATH: TOPODERIV_CUDA=ON pip install"):
        ops._check_device("sensitivity_blocks", "x", fake, torch.device("cuda"))


def test_build_info_reports_build():
    info = td.build_info()
    for key in ("cuda", "cuda_architectures", "gpus", "torch", "version"):
        assert key in info
    assert info["torch"] == torch.__version__


# ------------------------------------------------------------------------------------ property


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(N=st.integers(0, 70), d=st.integers(0, 40), n=st.integers(0, 20), bias=st.booleans(),
       row_pad=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_blocks_and_matvec_any_shape_and_row_stride(N, d, n, bias, row_pad, seed):
    if d + bias == 0:
        return
    g = torch.Generator().manual_seed(seed)
    # rows padded: x and p are column slices of wider buffers (row stride > width)
    xb = torch.randn(N, d + row_pad, generator=g, dtype=torch.float64)
    pb = torch.randn(N, n + row_pad, generator=g, dtype=torch.float64)
    x, p = xb[:, :d], pb[:, :n]
    exact = ref.sensitivity_blocks(x.contiguous(), p.contiguous(), bias=bias)
    got = td.sensitivity_blocks(x, p, bias=bias)
    assert got.shape == exact.shape
    assert torch.allclose(got, exact, rtol=1e-12, atol=1e-12)
    v = torch.randn(n, d + bias, generator=g, dtype=torch.float64)
    assert torch.allclose(td.sensitivity_matvec(x, p, v, bias=bias), torch.einsum("rij,rj->ri", exact, v),
                          rtol=1e-11, atol=1e-11)


def test_lanczos_shared_norm_measures_against_the_largest_block(gen):
    a = gapped(4, 80, gen)
    a = torch.cat([a[:1] * 1e3, a[1:]])  # one dominant block, as in a block-diagonal Q
    own = td.lanczos_topk(a, 1, tol=1e-8)
    shared = td.lanczos_topk(a, 1, tol=1e-8, shared_norm=True)
    w = torch.linalg.eigvalsh(a)[:, -1]
    assert shared.converged.all() and own.converged.all()
    assert torch.allclose(shared.norm, shared.norm[:1].expand(4))  # one norm for all: the largest
    assert (shared.steps[1:] <= own.steps[1:]).all() and (shared.steps[1:] < own.steps[1:]).any()
    # accuracy relative to ||Q||, not to each block
    assert float(((shared.values[:, 0] - w).abs() / w.abs().max()).max()) < 1e-12
    with pytest.raises(TypeError, match="shared_norm must be a bool"):
        td.lanczos_topk(a, 1, shared_norm=1)


def test_lanczos_start_vectors(gen):
    a = gapped(6, 90, gen)
    w, v = ref.eigh_topk(a, 1)
    cold = td.lanczos_topk(a, 1, tol=1e-10)
    # a start at the answer (slightly perturbed) converges in a few steps to the same answer
    near = v[:, :, 0] + 1e-12 * torch.randn(6, 90, generator=gen, dtype=torch.float64)
    warm = td.lanczos_topk(a, 1, tol=1e-10, v0=near * 3.0)  # need not be normalised
    assert warm.converged.all()
    assert rel_err(warm.values, w) < 1e-12
    assert ((warm.vectors[:, :, 0] * v[:, :, 0]).sum(1).abs() > 1 - 1e-12).all()
    assert (warm.steps <= 3).all() and (warm.steps < cold.steps).all()
    # a rough start (40% off) still reaches the top pair; float32 v0 is cast
    rough = td.lanczos_topk(a, 1, tol=1e-10, v0=(v[:, :, 0] + 0.4 * torch.randn(6, 90, generator=gen,
                                                                               dtype=torch.float64) / 9).float())
    assert rough.converged.all() and rel_err(rough.values, w) < 1e-12
    # any scale: rows are normalised in float64 before the float32 kernels see them
    a32 = a.float()
    for scale in (1e20, 1e-24):
        big = td.lanczos_topk(a32, 1, tol=1e-5, v0=(v[:, :, 0] * scale).float())
        assert big.converged.all() and rel_err(big.values, w) < 1e-5, scale
    # all-zero rows start from the seeded random vector: bit-identical to no v0
    zero = td.lanczos_topk(a, 1, tol=1e-10, v0=torch.zeros(6, 90, dtype=torch.float64))
    assert torch.equal(zero.values, cold.values) and torch.equal(zero.vectors, cold.vectors)
    # 2-D matrix: 1-D start vector
    one = td.lanczos_topk(a[0], 1, tol=1e-10, v0=near[0])
    assert one.steps <= 3 and abs(float(one.values[0] - w[0, 0])) < 1e-10 * float(w[0, 0].abs())
    # an exact eigenvector closes its Krylov space at once: that is not trusted (it could be a lower
    # eigenvalue's), the solve goes on from a random vector orthogonal to it, right either way
    wl, vl = torch.linalg.eigh(a)  # ascending: vl[..., 0] belongs to the smallest eigenvalue
    for start in (vl[:, :, -1], vl[:, :, 0]):
        ex = td.lanczos_topk(a, 1, tol=1e-10, v0=start)
        assert ex.converged.all() and rel_err(ex.values, w) < 1e-12 and (ex.steps > 2).all()
    # matrix-free and dense routes of sensitivity_topk take start vectors too
    x = torch.randn(300, 40, generator=gen, dtype=torch.float64)
    p = torch.randn(300, 5, generator=gen, dtype=torch.float64)
    wb, vb = ref.eigh_topk(ref.sensitivity_blocks(x, p), 1)
    for route in ("dense", "matfree"):
        res = td.sensitivity_topk(x, p, route=route, tol=1e-10, v0=vb[:, :, 0])
        assert res.converged.all() and rel_err(res.values, wb) < 1e-12
    huge = td.sensitivity_topk(x.float(), p.float(), route="matfree", v0=vb[:, :, 0].float() * 1e20)
    assert huge.converged.all() and rel_err(huge.values, wb) < 1e-5
    # errors name the argument
    with pytest.raises(ValueError, match=r"v0 must have shape \[6, 90\]"):
        td.lanczos_topk(a, 1, v0=torch.zeros(6, 89))
    with pytest.raises(ValueError, match="v0 must contain only finite values"):
        td.lanczos_topk(a, 1, v0=torch.full((6, 90), float("nan")))
    with pytest.raises(TypeError, match="v0 must be a floating-point tensor"):
        td.lanczos_topk(a, 1, v0=torch.zeros(6, 90, dtype=torch.int64))
    with pytest.raises(TypeError, match="v0 must be a torch.Tensor"):
        td.lanczos_topk(a, 1, v0=[0.0] * 90)
    with pytest.raises(ValueError, match=r"v0 must have shape \[5, 41\]"):
        td.sensitivity_topk(x, p, v0=torch.zeros(5, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="v0 must be on the same device"):
        td.sensitivity_topk(x, p, v0=torch.zeros(5, 41, dtype=torch.float64, device="meta"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matfree_residuals_are_explicit(dtype, gen, monkeypatch):
    # the matrix-free CPU backend forms A y from the A v_t it applied; compare with B y recomputed
    # from float64 blocks, for converged solves and for solves cut short (large residuals)
    x = torch.randn(500, 60, generator=gen, dtype=torch.float64)
    p = torch.randn(500, 7, generator=gen, dtype=torch.float64)
    blocks = ref.sensitivity_blocks(x, p)
    norm = float(torch.linalg.eigvalsh(blocks).abs().amax())
    for steps, tol in ((61, 1e-6 if dtype == torch.float32 else 1e-10), (4, 1e-10)):
        # the raw op returns the absolute explicit residuals as its last output
        vals, vecs, _, _, _, resid = torch.ops.topoderiv.sensitivity_lanczos(
            x.to(dtype), p.to(dtype), True, 1, steps, tol, 0)
        y = vecs[:, :, 0].double()
        direct = ((blocks @ y[:, :, None])[:, :, 0] - vals.double() * y).norm(dim=1)
        err = float((resid[:, 0].double() - direct).abs().max())
        assert err <= (1e-5 if dtype == torch.float32 else 1e-12) * norm, (steps, err)
        if steps == 4:
            assert float(direct.min()) > 1e-3 * norm  # cut short: large residuals, reported as such
            res = td.sensitivity_topk(x.to(dtype), p.to(dtype), route="matfree", steps=steps, tol=tol)
            assert not res.converged.any()
    # above the memory budget for the stored A v_t, the residuals come from extra operator passes
    monkeypatch.setattr(ops, "_MF_RESIDUAL_BYTES", 0)
    vals, vecs, _, _, _, resid = torch.ops.topoderiv.sensitivity_lanczos(x.to(dtype), p.to(dtype), True, 1, 4, 1e-10, 0)
    y = vecs[:, :, 0].double()
    direct = ((blocks @ y[:, :, None])[:, :, 0] - vals.double() * y).norm(dim=1)
    assert float((resid[:, 0].double() - direct).abs().max()) <= (1e-5 if dtype == torch.float32 else 1e-12) * norm


def test_reference_lanczos_twin_agrees_with_kernel_and_eigh(gen):
    a = gapped(6, 40, gen)
    w = torch.linalg.eigvalsh(a).flip(-1)[:, :2]
    rv, rvec = ref.lanczos_topk(a, 2, steps=40)  # full Krylov space: exact
    assert rel_err(rv, w) < 1e-10
    kv = td.lanczos_topk(a, 2, steps=40, tol=1e-12)
    assert rel_err(kv.values, rv) < 1e-10
    assert ((kv.vectors * rvec).sum(1).abs() > 1 - 1e-8).all()
