"""Every op on CUDA against the CPU implementation and the float64 reference (GPU machines only).

Sizes are small and odd so compute-sanitizer runs stay quick:
    compute-sanitizer --tool memcheck pytest -m cuda -x
"""
from __future__ import annotations

import pytest
import torch

import topoderiv as td
from topoderiv import ops
from topoderiv import reference as ref

from _helpers import matvec_problem

pytestmark = pytest.mark.cuda


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max().cpu().clamp_min(1e-300))


def within_tc_bound(got: torch.Tensor, exact: torch.Tensor, x: torch.Tensor, p: torch.Tensor, bias: bool,
                    start: torch.Tensor | None = None) -> bool:
    """The bf16 tensor-core routes' rule, per element: |got - exact| <= (2^-8 + (N + 32) 2^-24) *
    sum_s |p x_i x_j| (+ 2^-24 |start| when accumulated into a start value): one bf16 rounding per term
    (tests/test_tensor_core_route.py)."""
    absb = ref.sensitivity_blocks(x.double().cpu().abs(), p.double().cpu().abs(), bias=bias)
    bound = (2.0 ** -8 + (x.shape[0] + 32) * 2.0 ** -24) * absb + 1e-300
    if start is not None:
        bound = bound + 2.0 ** -24 * start.double().cpu().abs()
    return bool(((got.double().cpu() - exact.double().cpu()).abs() <= bound).all())


SHAPES = [(1, 1, 1), (7, 3, 2), (129, 65, 17), (1000, 257, 33), (300, 64, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_blocks_cuda(shape, dtype, bias):
    g = torch.Generator().manual_seed(sum(shape))
    N, d, n = shape
    x = torch.randn(N, d, generator=g, dtype=torch.float64).to(dtype)
    p = torch.randn(N, n, generator=g, dtype=torch.float64).to(dtype)
    exact = ref.sensitivity_blocks(x.double(), p.double(), bias=bias)
    got = td.sensitivity_blocks(x.cuda(), p.cuda(), bias=bias)
    cpu = td.sensitivity_blocks(x, p, bias=bias)
    assert got.is_cuda and got.dtype == cpu.dtype
    assert torch.equal(got, got.mT)
    if ops.dense_kernel(dtype, "cuda", N, d, n, bias=bias) in ("mma", "pairs"):  # bf16 tensor cores
        assert within_tc_bound(got, exact, x, p, bias)
        return
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel(got, exact) < tol and rel(got, cpu) < tol


# ------------------------------------------------------------------------------------------------
# bf16 tensor-core routes (issue 9): every kernel forced through TOPODERIV_DENSE_KERNEL, against the
# float64 reference (tensor-core rule), the CPU kernel, and integers (exact for every kernel)

TC_SHAPES = [(1, 1, 1), (33, 63, 5), (200, 64, 7), (129, 100, 3), (300, 130, 40), (70, 200, 9)]


@pytest.mark.parametrize("kernel", ["simt", "mma", "pairs"])
@pytest.mark.parametrize("shape", TC_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_blocks_cuda_bf16_kernels(monkeypatch, kernel, shape, bias):
    monkeypatch.setenv("TOPODERIV_DENSE_KERNEL", kernel)
    N, d, n = shape
    g = torch.Generator().manual_seed(N + 3 * d + 7 * n)
    x = torch.randn(N, d, generator=g).to(torch.bfloat16)
    p = torch.randn(N, n, generator=g).to(torch.bfloat16)
    m = d + int(bias)
    assert ops.dense_kernel(torch.bfloat16, "cuda", N, d, n, bias=bias) == kernel
    exact = ref.sensitivity_blocks(x.double(), p.double(), bias=bias)
    got = td.sensitivity_blocks(x.cuda(), p.cuda(), bias=bias)
    cpu = td.sensitivity_blocks(x, p, bias=bias)
    assert got.is_cuda and got.dtype == torch.float32 and torch.equal(got, got.mT)
    assert within_tc_bound(got, exact, x, p, bias) and within_tc_bound(cpu, exact, x, p, bias)
    assert within_tc_bound(got, cpu, x, p, bias)  # against the CPU kernel, same rule
    if kernel != "simt" and m >= 32 and N > 1:  # the forced route ran: its rounding shows, unlike simt's
        assert not torch.equal(got.cpu(), cpu)
    if kernel == "simt":
        assert rel(got, exact) < 1e-5
    # accumulation into a start value, float32 and float64 outs
    start = torch.randint(-4, 5, (n, m, m), generator=g).float()
    start = start + start.mT
    acc = start.cuda()
    td.sensitivity_blocks(x.cuda(), p.cuda(), bias=bias, out=acc)
    assert torch.equal(acc, acc.mT) and within_tc_bound(acc, exact + start.double(), x, p, bias, start)
    acc64 = start.double().cuda()
    td.sensitivity_blocks(x.cuda(), p.cuda(), bias=bias, out=acc64)
    assert within_tc_bound(acc64, exact + start.double(), x, p, bias, start)
    # integers: products exact in bf16, sums exact in float32 -> every kernel exact
    xi = torch.randint(-3, 4, (N, d), generator=g).to(torch.bfloat16)
    pi = torch.randint(-3, 4, (N, n), generator=g).to(torch.bfloat16)
    assert torch.equal(td.sensitivity_blocks(xi.cuda(), pi.cuda(), bias=bias).double().cpu(),
                       ref.sensitivity_blocks(xi.double(), pi.double(), bias=bias))


def test_blocks_cuda_bf16_auto_rule_tokens_strides(monkeypatch):
    monkeypatch.delenv("TOPODERIV_DENSE_KERNEL", raising=False)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 50, 96, generator=g).to(torch.bfloat16)
    p = torch.randn(3, 50, 300, generator=g).to(torch.bfloat16)
    assert ops.dense_kernel(torch.bfloat16, "cuda", 150, 96, 300) == "pairs"
    exact = ref.sensitivity_blocks(x.double(), p.double())
    for xv, pv in ((x.cuda(), p.cuda()), (x.cuda().transpose(0, 1), p.cuda().transpose(0, 1)),
                   (x.cuda()[:, :, :], p.cuda().transpose(1, 2).contiguous().transpose(1, 2))):
        ex = ref.sensitivity_blocks(xv.double().cpu(), pv.double().cpu())
        got = td.sensitivity_blocks(xv, pv)
        assert torch.equal(got, got.mT) and within_tc_bound(got, ex, xv.reshape(-1, 96), pv.reshape(-1, 300), True)
    assert rel(td.sensitivity_blocks(x.cuda(), p.cuda()), exact) < 1e-2
    assert ops.dense_kernel(torch.bfloat16, "cuda", 150, 96, 20) == "mma"
    got = td.sensitivity_blocks(x.cuda(), p[..., :20].cuda())
    assert within_tc_bound(got, ref.sensitivity_blocks(x.double(), p[..., :20].double()), x.reshape(-1, 96),
                           p[..., :20].reshape(-1, 20), True)


def test_pair_route_cuda_chunking_and_kernel_bits():
    # the CUDA pair-product kernel bit for bit against the rounding of the exact float32 products, and
    # the route with tiny budgets (many triangle-row groups and row chunks) against the reference
    g = torch.Generator().manual_seed(4)
    N, d, n = 301, 77, 40
    x = torch.randn(N, d, generator=g).to(torch.bfloat16)
    p = torch.randn(N, n, generator=g).to(torch.bfloat16)
    m = d + 1
    xt = torch.cat([x.float(), torch.ones(N, 1)], 1)
    for i0, i1 in ((0, m), (5, 9), (m - 1, m), (3, 3)):
        q0, q1 = ops._tri_offset(m, i0), ops._tri_offset(m, i1)
        iu = torch.triu_indices(m, m)[:, q0:q1]
        want = (xt[:, iu[0]] * xt[:, iu[1]]).to(torch.bfloat16)
        z = ops._cuda_pair_products(x.cuda()[1:], True, i0, i1)
        assert z.shape == (N - 1, q1 - q0) and torch.equal(z.cpu().view(torch.int16), want[1:].view(torch.int16))
    out = torch.zeros(n, m, m, device="cuda")
    ops._pair_blocks(x.cuda(), p.cuda(), True, out, budget_bytes=3000, max_rows=64)
    assert torch.equal(out, out.mT)
    assert within_tc_bound(out, ref.sensitivity_blocks(x.double(), p.double()), x, p, True)


def test_tensor_core_raw_entry_points_validate():
    from topoderiv._lib import lib
    b = ops._buf
    x = torch.randn(6, 3, device="cuda").to(torch.bfloat16)
    p = torch.randn(6, 2, device="cuda").to(torch.bfloat16)
    out = torch.zeros(2, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="sensitivity_blocks_mma: in_dtype must be bfloat16 and acc_dtype float32"):
        lib().sensitivity_blocks_mma("cuda", b(x.float()), 3, b(p.float()), 2, b(out), 1, 6, 3, 2, 0, 0, True, 0, 0, 0)
    with pytest.raises(ValueError, match="sensitivity_blocks_mma: out must span at least 128 bytes"):
        lib().sensitivity_blocks_mma("cuda", b(x), 3, b(p), 2, b(out[:1]), 1, 6, 3, 2, 0, 0, True, 2, 0, 0)
    with pytest.raises(ValueError, match="sensitivity_blocks_mma: x must be CUDA device memory, got host memory"):
        lib().sensitivity_blocks_mma("cuda", b(x.cpu()), 3, b(p), 2, b(out), 1, 6, 3, 2, 0, 0, True, 2, 0, 0)
    z = torch.empty(6, 9, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=r"sensitivity_pair_products: triangle rows must satisfy 0 <= i0 <= i1 <= "
                                         r"m = 4, got i0 = 0, i1 = 5"):
        lib().sensitivity_pair_products("cuda", b(x), 3, b(z), 6, 3, True, 0, 5, 2, 0)
    with pytest.raises(ValueError, match="sensitivity_pair_products: z must span at least 120 bytes"):
        lib().sensitivity_pair_products("cuda", b(x), 3, b(z), 6, 3, True, 0, 4, 2, 0)


def test_tensor_core_routes_opcheck(monkeypatch):
    from torch.library import opcheck
    x = torch.randn(40, 70, device="cuda").to(torch.bfloat16)
    p = torch.randn(40, 5, device="cuda").to(torch.bfloat16)
    for kernel in ("mma", "pairs"):
        monkeypatch.setenv("TOPODERIV_DENSE_KERNEL", kernel)
        opcheck(torch.ops.topoderiv.sensitivity_blocks.default, (x, p, True))
        opcheck(torch.ops.topoderiv.sensitivity_blocks_accumulate_.default,
                (x, p, True, torch.zeros(5, 71, 71, device="cuda")))


def test_blocks_cuda_exact_integers_tokens_noncontiguous_streaming():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 4, (4, 33, 40), generator=g).float().cuda()
    p = torch.randint(-3, 4, (4, 33, 9), generator=g).float().cuda()
    exact = ref.sensitivity_blocks(x.double().cpu(), p.double().cpu())
    assert torch.equal(td.sensitivity_blocks(x, p).double().cpu(), exact)
    xt, pt = x.transpose(0, 1), p.transpose(0, 1)
    assert rel(td.sensitivity_blocks(xt, pt), ref.sensitivity_blocks(xt.double().cpu(), pt.double().cpu())) < 1e-6
    acc = torch.zeros(9, 41, 41, device="cuda")
    for i in range(4):
        td.sensitivity_blocks(x[i], p[i], out=acc)
    assert rel(acc, exact) < 1e-6
    acc64 = torch.zeros(9, 41, 41, device="cuda", dtype=torch.float64)
    for i in range(4):
        td.sensitivity_blocks(x[i], p[i], out=acc64)
    assert torch.equal(acc64.cpu(), exact)


def test_blocks_cuda_empty():
    assert torch.equal(td.sensitivity_blocks(torch.zeros(0, 5, device="cuda"), torch.zeros(0, 3, device="cuda")).cpu(),
                       torch.zeros(3, 6, 6))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matvec_cuda(shape, dtype):
    x, p, v, acc, exact = matvec_problem(shape, dtype, torch.Generator().manual_seed(sum(shape) + 1))
    got = td.sensitivity_matvec(x.cuda(), p.cuda(), v.to(acc).cuda())
    assert rel(got, exact) < (1e-11 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B, m, k", [(1, 1, 1), (5, 2, 2), (33, 97, 2), (8, 257, 1)])
def test_lanczos_cuda(dtype, B, m, k):
    g = torch.Generator().manual_seed(B * m)
    Q, _ = torch.linalg.qr(torch.randn(B, m, m, generator=g, dtype=torch.float64))
    ev = torch.rand(B, m, generator=g, dtype=torch.float64) * 2 - 1
    ev[:, 0] = 5.0
    if m > 1:
        ev[:, 1] = 3.0
    a = (Q * ev[:, None, :]) @ Q.mT
    a = (a + a.mT) / 2
    res = td.lanczos_topk(a.to(dtype).cuda(), k)
    cpu = td.lanczos_topk(a.to(dtype), k)
    w, _ = ref.eigh_topk(a, k)
    assert res.values.is_cuda and res.converged.all()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert rel(res.values, w) < tol and rel(res.values, cpu.values) < tol
    overlap = (res.vectors.double().cpu() * cpu.vectors.double()).sum(1).abs()
    assert (overlap > 1 - 1e-3).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lanczos_cuda_start_vectors(dtype):
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(6, 80, 80, generator=g, dtype=torch.float64))
    ev = torch.linspace(-1, 1, 80, dtype=torch.float64).repeat(6, 1)
    ev[:, 0] = 4.0
    a = (Q * ev[:, None, :]) @ Q.mT
    a = ((a + a.mT) / 2).to(dtype)
    v0 = Q[:, :, 0] + 0.05 * torch.randn(6, 80, generator=g, dtype=torch.float64)
    v0[0] = 0.0  # falls back to the seeded random start
    res = td.lanczos_topk(a.cuda(), 1, v0=v0.cuda())
    cpu = td.lanczos_topk(a, 1, v0=v0)
    assert res.converged.all()
    assert ((res.steps.cpu() - cpu.steps).abs() <= 1).all()  # reduction order may move a stop by one
    assert (res.steps[1:].cpu() < res.steps[0].cpu()).all()
    assert rel(res.values, torch.full((6, 1), 4.0, dtype=torch.float64)) < (1e-5 if dtype == torch.float32 else 1e-10)


def test_lanczos_cuda_gapless_flag():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(8, 200, 200, generator=g, dtype=torch.float64)
    a = (a + a.mT) / 2
    few = td.lanczos_topk(a.cuda(), 1, steps=10)
    assert not few.converged.any()
    full = td.lanczos_topk(a.cuda(), 1, steps=200, tol=1e-8)
    assert full.converged.all()
    assert rel(full.values[:, 0], torch.linalg.eigvalsh(a)[:, -1]) < 1e-10


@pytest.mark.parametrize("route", ["dense", "matfree"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_cuda(route, dtype):
    g = torch.Generator().manual_seed(11)
    N, d, n = 800, 48, 9
    x = torch.randn(N, d, generator=g, dtype=torch.float64) / torch.arange(1, d + 1).sqrt()
    q = (x @ torch.randn(d, n, generator=g, dtype=torch.float64)) ** 2
    p = (q - q.mean(0)) / N
    x, p = x.to(dtype), p.to(dtype)
    w, _ = ref.sensitivity_topk(x.double(), p.double(), k=1)
    res = td.sensitivity_topk(x.cuda(), p.cuda(), route=route)
    assert res.route == route and res.converged.all()
    assert rel(res.values, w) < (1e-10 if dtype == torch.float64 else 1e-4)


def test_cuda_ops_opcheck():
    from torch.library import opcheck
    x = torch.randn(20, 6, device="cuda")
    p = torch.randn(20, 3, device="cuda")
    v = torch.randn(3, 7, device="cuda")
    a = torch.eye(7, device="cuda").expand(2, 7, 7).contiguous() + 0.1
    opcheck(torch.ops.topoderiv.sensitivity_blocks.default, (x, p, True))
    opcheck(torch.ops.topoderiv.sensitivity_matvec.default, (x, p, v, True))
    opcheck(torch.ops.topoderiv.lanczos_topk.default, (a, 1, 7, 1e-6, 0))
    opcheck(torch.ops.topoderiv.sensitivity_lanczos.default, (x, p, True, 1, 7, 1e-6, 0))


def test_cuda_uses_current_stream():
    x = torch.randn(500, 64, device="cuda")
    p = torch.randn(500, 16, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = td.sensitivity_blocks(x, p)
    s.synchronize()
    assert rel(out, ref.sensitivity_blocks(x.double().cpu(), p.double().cpu())) < 1e-5


def test_cuda_raw_ops_validate_devices_and_layouts():
    T = torch.ops.topoderiv
    x = torch.randn(40, 6, device="cuda", dtype=torch.float64)
    p = torch.randn(40, 3, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match=r"sensitivity_blocks: p must be on the same device as x \(cuda:0\), got cpu"):
        T.sensitivity_blocks(x, p.cpu(), True)
    with pytest.raises(ValueError, match=r"sensitivity_matvec: v must be on the same device as x \(cuda:0\), got cpu"):
        T.sensitivity_matvec(x, p, torch.zeros(3, 7, dtype=torch.float64), True)
    with pytest.raises(ValueError, match=r"sensitivity_blocks_accumulate_: out must be on the same device as x"):
        T.sensitivity_blocks_accumulate_(x, p, True, torch.zeros(3, 7, 7, dtype=torch.float64))
    with pytest.raises(ValueError, match="sensitivity_matvec: x must contain only finite values"):
        T.sensitivity_matvec(x * float("nan"), p, torch.ones(3, 7, device="cuda", dtype=torch.float64), True)
    # transposed / strided inputs: the right answer (copied to unit column stride)
    xt = x.cpu().T.contiguous().T.cuda()
    assert not xt.is_contiguous()
    exact = ref.sensitivity_blocks(x.cpu(), p.cpu())
    assert rel(T.sensitivity_blocks(xt, p.T.contiguous().T, True), exact) < 1e-12
    v = torch.randn(7, 3, device="cuda", dtype=torch.float64).T
    assert rel(T.sensitivity_matvec(xt, p, v, True), torch.einsum("rij,rj->ri", exact, v.cpu())) < 1e-12
    # out= over x's memory, on the GPU too
    store = torch.zeros(400, device="cuda", dtype=torch.float64)
    xs = store[:240].view(40, 6)
    xs.copy_(x)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        T.sensitivity_blocks_accumulate_(xs, p, True, store[200:347].view(3, 7, 7))


def test_cuda_core_checks_memory_kinds():
    # the bindings ask the CUDA runtime where every pointer lives before a CUDA launch
    from topoderiv import ops
    from topoderiv._lib import lib
    b = ops._buf
    x = torch.randn(6, 3)
    p = torch.randn(6, 2)
    out = torch.zeros(2, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="sensitivity_blocks: x must be CUDA device memory, got host memory"):
        lib().sensitivity_blocks("cuda", b(x), 3, b(p.cuda()), 2, b(out), 1, 6, 3, 2, 0, 0, True, 0, 0, 1, 0)
    B, m, k, steps = 2, 5, 1, 5
    a = torch.eye(m, device="cuda").expand(B, m, m).contiguous()
    outs = [torch.zeros(B, k, device="cuda"), torch.zeros(B, m, k, device="cuda"), torch.zeros(B, k, device="cuda"),
            torch.zeros(B, dtype=torch.int32, device="cuda"), torch.zeros(B, dtype=torch.float64, device="cuda"),
            torch.zeros(B, k, device="cuda")]
    ws = torch.zeros(lib().lanczos_workspace_elems(B, m, k, steps, False, True, 0, 0, 1), device="cuda")
    with pytest.raises(ValueError, match="lanczos_topk: anorm must be host memory, got CUDA device memory"):
        lib().lanczos_topk("cuda", b(a), (0, 0), 0, (0, 0), 0, 0, 0, 0, 0, True, 0, B, m, k, steps, 1e-6, 0, 1,
                           (0, 0), 0, *[b(t) for t in outs[:5]], (0, 0), b(ws), 1, 0)


# ------------------------------------------------------------------------------------------------
# convolutions (conv_sensitivity_*): CUDA against the CPU twin and a float64 unfold reference


def _unfold_blocks(x: torch.Tensor, p: torch.Tensor, k: int, bias: bool = True) -> torch.Tensor:
    import torch.nn.functional as F
    N, n = x.shape[0], p.shape[1]
    cols = F.unfold(x, k, padding=k // 2)
    if bias:
        cols = torch.cat([cols, torch.ones(N, 1, cols.shape[2], dtype=cols.dtype)], dim=1)
    return torch.einsum("srl,sil,sjl->rij", p.reshape(N, n, -1).to(x.dtype), cols, cols)


CONV_SHAPES = [(1, 1, 1, 1, 1, 1), (2, 1, 5, 7, 3, 3), (3, 4, 7, 5, 2, 3), (2, 3, 6, 9, 5, 5), (4, 5, 4, 4, 7, 1),
               (2, 8, 9, 11, 8, 3), (16, 64, 8, 8, 64, 3)]


@pytest.mark.parametrize("shape", CONV_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_blocks_cuda(shape, dtype, bias):
    from topoderiv import ops
    N, C, H, W, n, k = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    p = torch.randn(N, n, H, W, generator=g, dtype=torch.float64).to(dtype)
    exact = _unfold_blocks(x.double(), p.double(), k, bias)
    got = ops.conv_sensitivity_blocks(x.cuda(), p.cuda(), k, bias=bias)
    cpu = ops.conv_sensitivity_blocks(x, p, k, bias=bias)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.is_cuda and got.dtype == cpu.dtype
    assert rel(got, exact) < tol and rel(got, cpu) < tol
    assert torch.equal(got, got.mT)
    xi = torch.randint(-3, 4, (N, C, H, W), generator=g).to(dtype)
    pi = torch.randint(-3, 4, (N, n, H, W), generator=g).to(dtype)
    exact_i = _unfold_blocks(xi.double(), pi.double(), k, bias)
    assert torch.equal(ops.conv_sensitivity_blocks(xi.cuda(), pi.cuda(), k, bias=bias).double().cpu(), exact_i)


def test_conv_blocks_cuda_layouts_streaming_and_empty():
    from topoderiv import ops
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 7, 9, generator=g, dtype=torch.float64)
    p = torch.randn(6, 4, 7, 9, generator=g, dtype=torch.float64)
    exact = _unfold_blocks(x, p, 3)
    xc, pc = x.cuda(), p.cuda()
    for xv, pv in ((xc.to(memory_format=torch.channels_last), pc.to(memory_format=torch.channels_last)),
                   (xc.transpose(2, 3).contiguous().transpose(2, 3), pc), (xc[:, :, :, :].expand(6, 5, 7, 9), pc)):
        assert rel(ops.conv_sensitivity_blocks(xv, pv, 3), exact) < 1e-12
    acc = torch.zeros(4, 46, 46, device="cuda", dtype=torch.float64)
    for s0 in range(0, 6, 4):
        ops.conv_sensitivity_blocks(xc[s0:s0 + 4], pc[s0:s0 + 4], 3, out=acc)
    assert rel(acc, exact) < 1e-12
    acc64 = torch.zeros(4, 46, 46, device="cuda", dtype=torch.float64)
    ops.conv_sensitivity_blocks(xc.float(), pc.float(), 3, out=acc64)  # float32 on CUDA into a float64 out
    assert rel(acc64, _unfold_blocks(x.float().double(), p.float().double(), 3)) < 1e-6
    z = ops.conv_sensitivity_blocks(torch.zeros(0, 3, 4, 4, device="cuda"), torch.zeros(0, 2, 4, 4, device="cuda"), 3)
    assert torch.equal(z.cpu(), torch.zeros(2, 28, 28))


@pytest.mark.parametrize("shape", CONV_SHAPES + [(4, 1, 40, 40, 2, 1)])  # the last: the second GEMM splits its rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_conv_matvec_cuda(shape, dtype):
    from topoderiv import ops
    N, C, H, W, n, k = shape
    g = torch.Generator().manual_seed(sum(shape) + 1)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    p = torch.randn(N, n, H, W, generator=g, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    v = torch.randn(n, C * k * k + 1, generator=g, dtype=torch.float64)
    exact = torch.einsum("rij,rj->ri", _unfold_blocks(x.double(), p.double(), k), v)
    got = ops.conv_sensitivity_matvec(x.cuda(), p.cuda(), v.to(acc).cuda(), k)
    assert got.is_cuda and rel(got, exact) < (1e-11 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("route", ["dense", "matfree"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_conv_topk_cuda(route, dtype):
    import torch.nn.functional as F
    from topoderiv import ops
    g = torch.Generator().manual_seed(12)
    N, C, H, W, n = 6, 4, 7, 9, 5
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) / torch.arange(1, C + 1).sqrt()[:, None, None]
    q = F.conv2d(x, torch.randn(n, C, 3, 3, generator=g, dtype=torch.float64) / 3, padding=1) ** 2
    p = (q - q.mean(0)) / N
    x, p = x.to(dtype), p.to(dtype)
    w = torch.linalg.eigvalsh(_unfold_blocks(x.double(), p.double(), 3))[:, -1]
    res = ops.conv_sensitivity_topk(x.cuda(), p.cuda(), 3, route=route)
    cpu = ops.conv_sensitivity_topk(x, p, 3, route=route)
    assert res.route == route and res.converged.all() and res.values.is_cuda
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel(res.values[:, 0], w) < tol and rel(res.values, cpu.values) < tol


@pytest.mark.parametrize("route", ["dense", "matfree"])
def test_conv_many_points_cuda(route):
    # the multi-point form on CUDA: one batched launch per shape group (5-D raw ops), every point
    # equal to the CPU kernels and to its float64 unfold blocks
    from topoderiv import ops
    T = torch.ops.topoderiv
    g = torch.Generator().manual_seed(13)
    xs = [torch.randn(4, 3, 6, 7, generator=g) for _ in range(3)] + [torch.randn(3, 2, 5, 5, generator=g)]
    ps = [torch.randn(4, 5, 6, 7, generator=g) / 4 for _ in range(3)] + [torch.randn(3, 4, 5, 5, generator=g) / 3]
    xb, pb = torch.stack(xs[:3]).cuda(), torch.stack(ps[:3]).cuda()
    blocks = T.conv_sensitivity_blocks(xb, pb, 3, True)
    assert blocks.shape == (3, 5, 28, 28)
    for i in range(3):
        assert rel(blocks[i], _unfold_blocks(xs[i].double(), ps[i].double(), 3)) < 1e-5
        assert torch.equal(blocks[i], ops.conv_sensitivity_blocks(xs[i].cuda(), ps[i].cuda(), 3))
    v = torch.randn(15, 28, generator=g)
    mv = ops._conv_matvec_impl(xb, pb, v.cuda(), 3, True)
    for i in range(3):
        assert rel(mv[5 * i:5 * i + 5], ops.conv_sensitivity_matvec(xs[i], ps[i], v[5 * i:5 * i + 5], 3)) < 1e-5
    res = ops.conv_sensitivity_topk([x.cuda() for x in xs], [p.cuda() for p in ps], 3, route=route, tol=1e-7)
    cpu = ops.conv_sensitivity_topk(xs, ps, 3, route=route, tol=1e-7)
    for x, p, r, c in zip(xs, ps, res, cpu):
        w = torch.linalg.eigvalsh(_unfold_blocks(x.double(), p.double(), 3))[:, -1]
        assert r.route == route and r.converged.all() and r.values.is_cuda
        assert rel(r.values[:, 0], w) < 1e-4 and rel(r.values, c.values) < 1e-4
    from torch.library import opcheck
    opcheck(T.conv_sensitivity_blocks.default, (xb, pb, 3, True))
    opcheck(T.conv_sensitivity_lanczos.default, (xb, pb, 3, True, 1, 28, 1e-6, 0))


def test_conv_cuda_opcheck_stream_and_validation():
    from torch.library import opcheck
    from topoderiv import ops
    T = torch.ops.topoderiv
    x = torch.randn(2, 3, 5, 4, device="cuda")
    p = torch.randn(2, 2, 5, 4, device="cuda")
    v = torch.randn(2, 28, device="cuda")
    opcheck(T.conv_sensitivity_blocks.default, (x, p, 3, True))
    opcheck(T.conv_sensitivity_blocks_accumulate_.default, (x, p, 3, True, torch.zeros(2, 28, 28, device="cuda")))
    opcheck(T.conv_sensitivity_matvec.default, (x, p, v, 3, True))
    opcheck(T.conv_sensitivity_lanczos.default, (x, p, 3, True, 1, 28, 1e-6, 0))
    s = torch.cuda.Stream()
    big_x, big_p = torch.randn(8, 16, 12, 12, device="cuda"), torch.randn(8, 16, 12, 12, device="cuda")
    with torch.cuda.stream(s):
        out = ops.conv_sensitivity_blocks(big_x, big_p, 3)
    s.synchronize()
    assert rel(out, _unfold_blocks(big_x.double().cpu(), big_p.double().cpu(), 3)) < 1e-5
    with pytest.raises(ValueError, match=r"conv_sensitivity_blocks: p must be on the same device as x \(cuda:0\), "
                                         r"got cpu"):
        T.conv_sensitivity_blocks(x, p.cpu(), 3, True)
    with pytest.raises(ValueError, match=r"conv_sensitivity_matvec: v must be on the same device as x \(cuda:0\)"):
        T.conv_sensitivity_matvec(x, p, v.cpu(), 3, True)
    with pytest.raises(ValueError, match="conv_sensitivity_blocks_accumulate_: out must be on the same device as x"):
        T.conv_sensitivity_blocks_accumulate_(x, p, 3, True, torch.zeros(2, 28, 28))
    from topoderiv._lib import lib
    b = ops._buf
    with pytest.raises(ValueError, match="conv_sensitivity_blocks: x must be CUDA device memory, got host memory"):
        xh = x.cpu()
        lib().conv_sensitivity_blocks("cuda", b(xh), xh.stride(), b(p), p.stride(), b(torch.zeros(2, 28, 28, device="cuda")),
                                      tuple(x.shape), 2, 3, 1, True, 0, 0, 1, 0)
