"""Convolution ops (conv_sensitivity_blocks / _matvec / _topk and the raw torch.ops) against float64
references built here with torch.nn.functional.unfold (never with the ops themselves).

Exact small-integer inputs are compared bit for bit; random inputs with the flash-attention rule
(at most 2x the error of PyTorch's own float32 computation of the same quantity, plus 4 eps);
kernel sizes 1, 3, 5, odd H and W, C = 1, n != C, non-contiguous and channels-last inputs,
streaming into out=, dense and matrix-free routes, poisoned outputs, every error message.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from topoderiv import ops
from topoderiv import reference as ref
from topoderiv._lib import lib

from _helpers import assert_rejected

T = torch.ops.topoderiv
F64 = torch.float64


def unfold_blocks(x: torch.Tensor, p: torch.Tensor, k: int, bias: bool = True) -> torch.Tensor:
    """B_r = sum_s sum_pixels p[s, r, pixel] pt pt^T by F.unfold + einsum, in x's dtype."""
    N, n = x.shape[0], p.shape[1]
    cols = F.unfold(x, k, padding=k // 2)  # [N, C k k, H W]
    if bias:
        cols = torch.cat([cols, torch.ones(N, 1, cols.shape[2], dtype=cols.dtype)], dim=1)
    return torch.einsum("srl,sil,sjl->rij", p.reshape(N, n, -1).to(x.dtype), cols, cols)


def unfold_matvec(x: torch.Tensor, p: torch.Tensor, v: torch.Tensor, k: int, bias: bool = True) -> torch.Tensor:
    """sum_s p[s, r] (pt_s . v_r) pt_s by F.unfold, in v's dtype (the two passes of the op)."""
    N, n = x.shape[0], p.shape[1]
    cols = F.unfold(x.to(v.dtype), k, padding=k // 2)
    if bias:
        cols = torch.cat([cols, torch.ones(N, 1, cols.shape[2], dtype=cols.dtype)], dim=1)
    y = torch.einsum("sil,ri->srl", cols, v)
    return torch.einsum("srl,sil->ri", p.reshape(N, n, -1).to(v.dtype) * y, cols)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


def ints(shape, gen, dtype=torch.float32, lo=-3, hi=3):
    return torch.randint(lo, hi + 1, shape, generator=gen).to(dtype)


SHAPES = [  # N, C, H, W, n, k
    (1, 1, 1, 1, 1, 1),
    (2, 1, 5, 7, 3, 3),   # C = 1, odd H, W, n != C
    (3, 4, 7, 5, 2, 3),
    (2, 3, 6, 9, 5, 5),   # k = 5
    (1, 2, 3, 3, 4, 5),   # k larger than... the image: most of every patch is padding
    (4, 5, 4, 4, 7, 1),   # k = 1
    (2, 8, 9, 11, 8, 3),  # m = 73: several triangle tiles, rows > one 256-row chunk (198)
]


# ------------------------------------------------------------------------------------------------
# blocks


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_blocks_exact_small_integers(shape, dtype, bias, gen):
    N, C, H, W, n, k = shape
    x, p = ints((N, C, H, W), gen, dtype), ints((N, n, H, W), gen, dtype)
    exact = unfold_blocks(x.double(), p.double(), k, bias)
    got = ops.conv_sensitivity_blocks(x, p, k, bias=bias)
    assert got.dtype == (F64 if dtype == F64 else torch.float32)
    assert got.shape == (n, C * k * k + bias, C * k * k + bias)
    assert torch.equal(got.double(), exact), shape
    raw = T.conv_sensitivity_blocks(x, p, k, bias)  # the raw op: same answer
    assert torch.equal(raw, got)


def test_blocks_exact_every_triangle_tiling(gen):
    # k = 1: m = C + bias for every C up to 3 NR + 2 (fp32 NR = 32, fp64 16): the tiles of NR
    # consecutive pairs span row ends at every offset; k = 3 and 5 over a few channel counts
    for dtype in (torch.float32, torch.float64):
        for k, channels in ((1, range(1, 99)), (3, (1, 2, 3, 7, 11)), (5, (1, 2, 4))):
            for C in channels:
                bias = C % 2 == 0
                x, p = ints((2, C, 3, 5), gen, dtype), ints((2, 3, 3, 5), gen, dtype)
                got = ops.conv_sensitivity_blocks(x, p, k, bias=bias)
                assert torch.equal(got.double(), unfold_blocks(x.double(), p.double(), k, bias)), (dtype, k, C)


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("bias", [True, False])
def test_blocks_random_fp32_within_twice_torch_error(shape, bias, gen):
    N, C, H, W, n, k = shape
    x = torch.randn(N, C, H, W, generator=gen, dtype=F64)
    p = torch.randn(N, n, H, W, generator=gen, dtype=F64)
    exact = unfold_blocks(x, p, k, bias)
    torch_err = rel_err(unfold_blocks(x.float(), p.float(), k, bias), exact)
    got = ops.conv_sensitivity_blocks(x.float(), p.float(), k, bias=bias)
    assert rel_err(got, exact) <= 2 * torch_err + 4 * torch.finfo(torch.float32).eps
    assert torch.equal(got, got.mT), "blocks must be exactly symmetric"


def test_blocks_fp64_and_bf16(gen):
    x = torch.randn(3, 6, 8, 7, generator=gen, dtype=F64)
    p = torch.randn(3, 5, 8, 7, generator=gen, dtype=F64)
    assert rel_err(ops.conv_sensitivity_blocks(x, p, 3), unfold_blocks(x, p, 3)) < 1e-13
    xb, pb = x.bfloat16(), p.bfloat16()
    got = ops.conv_sensitivity_blocks(xb, pb, 3)
    assert got.dtype == torch.float32
    assert rel_err(got, unfold_blocks(xb.double(), pb.double(), 3)) < 1e-5  # fp32 accumulation of bf16 values


def test_blocks_channels_last_and_non_contiguous_inputs_read_in_place(gen):
    N, C, H, W, n, k = 3, 5, 7, 9, 4, 3
    x = torch.randn(N, C, H, W, generator=gen, dtype=F64)
    p = torch.randn(N, n, H, W, generator=gen, dtype=F64)
    exact = unfold_blocks(x, p, k)
    views = {
        "channels_last": (x.to(memory_format=torch.channels_last), p.to(memory_format=torch.channels_last)),
        "nhwc permuted": (x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2), p),
        "transposed hw": (x.transpose(2, 3).contiguous().transpose(2, 3), p.transpose(2, 3).contiguous().transpose(2, 3)),
    }
    big = torch.zeros(2 * N, C + 3, H + 2, 2 * W, dtype=F64)
    big[::2, 1:C + 1, 1:H + 1, ::2] = x
    pbig = torch.zeros(N, n + 2, H, W + 1, dtype=F64)
    pbig[:, 1:n + 1, :, :W] = p
    views["strided slices"] = (big[::2, 1:C + 1, 1:H + 1, ::2], pbig[:, 1:n + 1, :, :W])
    for name, (xv, pv) in views.items():
        assert torch.equal(xv, x) and torch.equal(pv, p)
        assert not (xv.is_contiguous() and pv.is_contiguous()), name
        assert rel_err(ops.conv_sensitivity_blocks(xv, pv, k), exact) < 1e-13, name
        v = torch.randn(n, C * k * k + 1, generator=gen, dtype=F64)
        assert rel_err(ops.conv_sensitivity_matvec(xv, pv, v, k), torch.einsum("rij,rj->ri", exact, v)) < 1e-12, name
    # zero strides (an expanded image: the same sample N times) are read in place too
    xe = x[:1].expand(N, C, H, W)
    assert rel_err(ops.conv_sensitivity_blocks(xe, p, k), unfold_blocks(xe.contiguous(), p, k)) < 1e-13


def test_blocks_stream_into_out(gen):
    x = ints((7, 3, 5, 5), gen)
    p = ints((7, 4, 5, 5), gen)
    exact = unfold_blocks(x.double(), p.double(), 3)
    acc = torch.zeros(4, 28, 28)
    for s0 in range(0, 7, 3):
        res = ops.conv_sensitivity_blocks(x[s0:s0 + 3], p[s0:s0 + 3], 3, out=acc)
        assert res is acc
    assert torch.equal(acc.double(), exact)
    # float32 inputs into a float64 accumulator (CPU), and the raw accumulating op
    x = torch.randn(6, 3, 5, 5, generator=gen)
    p = torch.randn(6, 4, 5, 5, generator=gen)
    acc64 = torch.zeros(4, 28, 28, dtype=F64)
    for s0 in range(0, 6, 2):
        T.conv_sensitivity_blocks_accumulate_(x[s0:s0 + 2], p[s0:s0 + 2], 3, True, acc64)
    assert rel_err(acc64, unfold_blocks(x.double(), p.double(), 3)) < 1e-13


def test_blocks_lower_triangle_is_mirrored_and_upper_accumulated(gen):
    x = torch.randn(2, 2, 4, 5, generator=gen, dtype=F64)
    p = torch.randn(2, 3, 4, 5, generator=gen, dtype=F64)
    start = torch.randn(3, 19, 19, generator=gen, dtype=F64)
    start = start + start.mT
    out = start.clone()
    il = torch.tril_indices(19, 19, -1)
    out[:, il[0], il[1]] = float("nan")  # poisoned: the kernel must not read it
    ops.conv_sensitivity_blocks(x, p, 3, out=out)
    assert rel_err(out, start + unfold_blocks(x, p, 3)) < 1e-13


def test_blocks_empty_and_degenerate():
    z = ops.conv_sensitivity_blocks(torch.zeros(0, 3, 4, 4), torch.zeros(0, 2, 4, 4), 3)
    assert torch.equal(z, torch.zeros(2, 28, 28))
    assert ops.conv_sensitivity_blocks(torch.zeros(2, 3, 4, 4), torch.zeros(2, 0, 4, 4), 3).shape == (0, 28, 28)
    assert torch.equal(ops.conv_sensitivity_blocks(torch.zeros(2, 3, 0, 4), torch.zeros(2, 2, 0, 4), 3),
                       torch.zeros(2, 28, 28))
    # C = 0 with the bias: every block is the number of pixels times the summed costate
    p = torch.ones(2, 2, 3, 4)
    assert torch.equal(ops.conv_sensitivity_blocks(torch.zeros(2, 0, 3, 4), p, 3), torch.full((2, 1, 1), 24.0))
    # no rows: zero operators, both routes converge at once to zero
    for route in ("dense", "matfree"):
        res = ops.conv_sensitivity_topk(torch.zeros(0, 3, 4, 4), torch.zeros(0, 2, 4, 4), 3, route=route)
        assert torch.equal(res.values, torch.zeros(2, 1)) and res.converged.all()
    res = ops.conv_sensitivity_topk(torch.zeros(2, 3, 4, 4), torch.zeros(2, 0, 4, 4), 3, route="matfree")
    assert res.values.shape == (0, 1) and res.vectors.shape == (0, 28, 1)
    # the reference's chunks with no costate channels (the warm start's Gram matrix uses them)
    chunks = list(ref.conv_rows(torch.ones(3, 2, 4, 5), torch.zeros(3, 0, 4, 5), 3, 7))
    assert sum(u.shape[0] for u, _ in chunks) == 60 and all(q.shape == (u.shape[0], 0) for u, q in chunks)
    whole = list(ref.conv_rows(torch.ones(3, 2, 4, 5), torch.zeros(3, 0, 4, 5), 3, 1000))
    assert len(whole) == 1 and whole[0][0].shape == (60, 18) and whole[0][1].shape == (60, 0)


def test_blocks_memory_has_no_im2col_intermediate(gen):
    # the im2col rows of this input are 64 x 256 x 577 floats = 38 MB; the blocks 64 x 577^2 x 4 = 85 MB;
    # the op's allocations stay at the output plus fixed per-thread chunks (~1 MB each)
    x = torch.randn(64, 64, 16, 16, generator=gen)
    p = torch.randn(64, 64, 16, 16, generator=gen)
    x, p = x[:16], p[:16]  # 16 samples: 9.5 MB of rows, 85 MB of blocks
    out = torch.zeros(64, 577, 577)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        ops.conv_sensitivity_blocks(x, p, 3, out=out)
    peak = max((e.cpu_memory_usage for e in prof.key_averages()), default=0)
    assert peak <= 4 * 2**20, peak


# ------------------------------------------------------------------------------------------------
# matvec


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matvec_against_unfold(shape, dtype, gen):
    N, C, H, W, n, k = shape
    x = torch.randn(N, C, H, W, generator=gen, dtype=F64).to(dtype)
    p = torch.randn(N, n, H, W, generator=gen, dtype=F64).to(dtype)
    acc = F64 if dtype == F64 else torch.float32
    for bias in (True, False):
        v = torch.randn(n, C * k * k + bias, generator=gen, dtype=F64)
        exact = unfold_matvec(x.double(), p.double(), v, k, bias)
        got = ops.conv_sensitivity_matvec(x, p, v.to(acc), k, bias=bias)
        assert got.dtype == acc
        if dtype == F64:
            assert rel_err(got, exact) < 1e-12
        else:
            torch_err = rel_err(unfold_matvec(x.float(), p.float(), v.float(), k, bias), exact)
            assert rel_err(got, exact) <= 2 * torch_err + 4 * torch.finfo(torch.float32).eps, (shape, bias)
        # the plain-PyTorch twin (convolutions) agrees with the unfold reference
        assert rel_err(ref.conv_sensitivity_matvec(x.double(), p.double(), v, k, bias=bias), exact) < 1e-12


@pytest.mark.parametrize("n", [1, 8, 9, 20])  # the CPU kernel: direct convolution for n <= 8, GEMMs above
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matvec_both_cpu_paths_against_unfold(n, layout, dtype, gen):
    for N, C, H, W, k in ((2, 3, 5, 7, 3), (3, 2, 1, 6, 5), (1, 4, 9, 4, 1), (2, 5, 16, 19, 3)):
        x = torch.randn(N, C, H, 2 * W, generator=gen, dtype=F64).to(dtype)
        p = torch.randn(N, n, H, 2 * W, generator=gen, dtype=F64).to(dtype)
        if layout == "strided":  # every other column: a non-unit W stride
            x, p = x[..., ::2], p[..., ::2]
        else:
            x, p = x[..., :W].contiguous(), p[..., :W].contiguous()
            if layout == "channels_last":
                x, p = x.contiguous(memory_format=torch.channels_last), p.contiguous(memory_format=torch.channels_last)
        acc = F64 if dtype == F64 else torch.float32
        for bias in (True, False):
            v = torch.randn(n, C * k * k + bias, generator=gen, dtype=F64)
            exact = unfold_matvec(x.double(), p.double(), v, k, bias)
            got = ops.conv_sensitivity_matvec(x, p, v.to(acc), k, bias=bias)
            if dtype == F64:
                assert rel_err(got, exact) < 1e-12, (N, C, H, W, k, bias)
            else:
                torch_err = rel_err(unfold_matvec(x.float(), p.float(), v.float(), k, bias), exact)
                assert rel_err(got, exact) <= 2 * torch_err + 4 * torch.finfo(torch.float32).eps, (N, C, H, W, k, bias)


def test_matvec_exact_small_integers_and_poisoned_output(gen):
    x, p = ints((3, 2, 5, 7), gen), ints((3, 4, 5, 7), gen)
    v = ints((4, 19), gen)
    exact = unfold_matvec(x.double(), p.double(), v.double(), 3)
    assert torch.equal(ops.conv_sensitivity_matvec(x, p, v, 3).double(), exact)
    out = torch.full((4, 19), float("nan"))
    lib().conv_sensitivity_matvec("cpu", ops._buf(x), x.stride(), ops._buf(p), p.stride(), ops._buf(v), ops._buf(out),
                                  (0, 0), tuple(x.shape), 4, 3, 1, True, 0, 0, 1, 0)
    assert torch.equal(out.double(), exact)
    # no rows: the output is still written (zeros)
    out = torch.full((4, 19), float("nan"))
    lib().conv_sensitivity_matvec("cpu", (0, 0), x.stride(), (0, 0), p.stride(), ops._buf(v), ops._buf(out), (0, 0),
                                  (0, 2, 5, 7), 4, 3, 1, True, 0, 0, 1, 0)
    assert torch.equal(out, torch.zeros(4, 19))


def test_many_chunks_and_threads(gen, monkeypatch):
    # rows = 5 x 13 x 11 = 715: three 256-row chunks split over the threads (reduced in order for the
    # matvec), the triangle tiles split over them for the blocks; small calls take fewer threads
    # (_CONV_WORK_PER_THREAD): here every requested thread is used
    monkeypatch.setattr(ops, "_CONV_WORK_PER_THREAD", 1)
    x = torch.randn(5, 6, 13, 11, generator=gen, dtype=F64)
    p = torch.randn(5, 9, 13, 11, generator=gen, dtype=F64)
    v = torch.randn(9, 55, generator=gen, dtype=F64)
    exact, blocks = unfold_matvec(x, p, v, 3), unfold_blocks(x, p, 3)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            assert ops._conv_threads(10) == t
            assert rel_err(ops.conv_sensitivity_matvec(x, p, v, 3), exact) < 1e-13, t
            assert rel_err(ops.conv_sensitivity_blocks(x, p, 3), blocks) < 1e-13, t
            res = ops.conv_sensitivity_topk(x, p, 3, route="matfree", tol=1e-10)
            assert rel_err(res.values[:, 0], torch.linalg.eigvalsh(blocks)[:, -1]) < 1e-9, t
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(ops, "_CONV_WORK_PER_THREAD", 2**24)
    assert ops._conv_threads(10) == 1 and ops._conv_threads(1e12) == torch.get_num_threads()


# ------------------------------------------------------------------------------------------------
# top-k: dense and matrix-free routes


def conv_real_like(N, C, H, W, n, gen, dtype=F64):
    """Images whose channels have decaying scales and costates quadratic in a convolution of them:
    the large spectral gaps of real sensitivity blocks."""
    x = torch.randn(N, C, H, W, generator=gen, dtype=F64) / torch.arange(1, C + 1, dtype=F64).sqrt()[:, None, None]
    q = F.conv2d(x, torch.randn(n, C, 3, 3, generator=gen, dtype=F64) / 3, padding=1) ** 2
    p = (q - q.mean(0)) / N + 0.01 * torch.randn(N, n, H, W, generator=gen, dtype=F64) / N
    return x.to(dtype), p.to(dtype)


@pytest.mark.parametrize("route", ["dense", "matfree", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 3])
def test_topk_routes_against_unfold_eigh(route, dtype, k, gen):
    x, p = conv_real_like(6, 4, 7, 9, 5, gen, dtype)
    blocks = unfold_blocks(x.double(), p.double(), 3)
    w, v = ref.eigh_topk(blocks, 2)
    res = ops.conv_sensitivity_topk(x, p, 3, k=2, route=route)
    assert res.route in ("dense", "matfree") and (route == "auto" or res.route == route)
    tol = 1e-10 if dtype == F64 else 2e-5
    assert res.converged.all()
    assert rel_err(res.values, w) < tol
    assert res.best_block == int(w[:, 0].argmax())
    assert float((res.best_vector.double() @ v[res.best_block, :, 0]).abs()) > 1 - 1e-4
    assert res.values.dtype == (F64 if dtype == F64 else torch.float32)


def test_topk_dense_and_matfree_agree_kernels_1_3_5(gen):
    for k, (N, C, H, W, n) in ((1, (4, 9, 5, 5, 6)), (3, (3, 3, 7, 5, 4)), (5, (2, 2, 9, 7, 3))):
        x, p = conv_real_like(N, C, H, W, n, gen)
        a = ops.conv_sensitivity_topk(x, p, k, route="dense", tol=1e-11)
        b = ops.conv_sensitivity_topk(x, p, k, route="matfree", tol=1e-11)
        assert a.converged.all() and b.converged.all()
        assert rel_err(b.values, a.values) < 1e-9, k
        overlap = (a.vectors[:, :, 0] * b.vectors[:, :, 0]).sum(1).abs()
        assert (overlap > 1 - 1e-8).all(), k


def test_matfree_applies_only_the_unconverged_blocks(gen, monkeypatch):
    # most blocks are tiny against ||Q|| (shared norm): they stop at once, the operator then
    # gathers the costate channels of the few others; the answer must not change
    x, p = conv_real_like(4, 3, 6, 6, 10, gen)
    big = torch.tensor([3, 7])  # not the first channels: the gathered channels must map back
    small = torch.tensor([c for c in range(10) if c not in (3, 7)])
    p = p.clone()
    p[:, small] *= 1e-15
    blocks = unfold_blocks(x, p, 3)
    res = ops.conv_sensitivity_topk(x, p, 3, route="matfree", tol=1e-12)
    w = torch.linalg.eigvalsh(blocks)[:, -1]
    assert res.converged.all()
    assert float((res.values[:, 0] - w).abs().max()) <= 1e-10 * float(w.abs().max())
    # the raw op's explicit residuals: from the stored A v_t, or (over the memory budget) k passes
    for budget in (ops._MF_RESIDUAL_BYTES, 0):
        monkeypatch.setattr(ops, "_MF_RESIDUAL_BYTES", budget)
        vals, vecs, _, steps, norm, resid, _ = T.conv_sensitivity_lanczos(x, p, 3, True, 1, 6, 1e-12, 0)
        y = vecs[:, :, 0]
        direct = (torch.einsum("rij,rj->ri", blocks, y) - vals * y).norm(dim=1)
        assert float((resid[:, 0] - direct).abs().max()) <= 1e-12 * float(norm.max()), budget
        assert (steps[small] <= 2).all() and (steps[big] == 6).all()


def test_topk_start_vectors_and_seeds(gen):
    x, p = conv_real_like(4, 3, 6, 6, 4, gen)
    w, v = ref.eigh_topk(unfold_blocks(x, p, 3), 1)
    cold = ops.conv_sensitivity_topk(x, p, 3, route="matfree", tol=1e-10)
    warm = ops.conv_sensitivity_topk(x, p, 3, route="matfree", tol=1e-10, v0=v[:, :, 0] * 5.0)
    assert warm.converged.all() and rel_err(warm.values, w) < 1e-12
    assert cold.converged.all() and rel_err(cold.values, w) < 1e-9
    raw_cold = T.conv_sensitivity_lanczos(x, p, 3, True, 1, 28, 1e-10, 0)
    # a start next to the eigenvector saves steps; the exact eigenvector closes its Krylov space at
    # once, and the op then checks the rest of the space from a random vector (it cannot know the
    # closed space holds the top eigenvalue), so it is right but not faster
    near = v[:, :, 0] + 1e-8 * torch.randn(v.shape[0], v.shape[1], generator=gen, dtype=v.dtype)
    raw_warm = T.conv_sensitivity_lanczos(x, p, 3, True, 1, 28, 1e-10, 0, near)
    assert (raw_warm[3] < raw_cold[3]).all() and rel_err(raw_warm[0], w) < 1e-12
    raw_exact = T.conv_sensitivity_lanczos(x, p, 3, True, 1, 28, 1e-10, 0, v[:, :, 0])
    assert (raw_exact[3] > 2).all() and rel_err(raw_exact[0], w) < 1e-12
    again = T.conv_sensitivity_lanczos(x, p, 3, True, 1, 28, 1e-10, 0)
    assert all(torch.equal(a, b) for a, b in zip(raw_cold, again))  # deterministic
    other = T.conv_sensitivity_lanczos(x, p, 3, True, 1, 28, 1e-10, 5)
    assert rel_err(other[0], raw_cold[0]) < 1e-9


# ------------------------------------------------------------------------------------------------
# many points in one call: the batch of problems the params structs carry


def test_batched_raw_ops_equal_the_points_one_by_one(gen):
    # 5-D x [L, N, C, H, W], p [L, N, n, H, W]: one kernel call; exact on small integers, channels-last
    # points and a non-contiguous batch stride (every other point of a larger stack)
    L, N, C, H, W, n, k = 3, 2, 3, 5, 7, 4, 3
    xs = ints((2 * L, N, C, H, W), gen)[::2]
    ps = ints((2 * L, N, n, H, W), gen)[::2]
    got = T.conv_sensitivity_blocks(xs, ps, k, True)
    assert got.shape == (L, n, C * k * k + 1, C * k * k + 1)
    for i in range(L):
        assert torch.equal(got[i].double(), unfold_blocks(xs[i].double(), ps[i].double(), k)), i
    xl = torch.stack([t.contiguous(memory_format=torch.channels_last) for t in xs])
    assert torch.equal(T.conv_sensitivity_blocks(xl, ps, k, True), got)
    m = C * k * k + 1
    v = torch.randn(L * n, m, generator=gen)
    mv = ops._conv_matvec_impl(xs, ps, v, k, True)
    for i in range(L):
        exact = unfold_matvec(xs[i].double(), ps[i].double(), v[i * n:(i + 1) * n].double(), k)
        assert rel_err(mv[i * n:(i + 1) * n], exact) < 1e-5, i
    # the matrix-free Lanczos over the L n blocks, norms per point (norm_group = n)
    vals, vecs, _, steps, norm, resid, early = T.conv_sensitivity_lanczos(xs.double(), ps.double(), k, True, 1, m,
                                                                          1e-12, 0)
    assert early.dtype == torch.bool and not early.any()
    assert vals.shape == (L * n, 1) and vecs.shape == (L * n, m, 1)
    for i in range(L):
        w = torch.linalg.eigvalsh(unfold_blocks(xs[i].double(), ps[i].double(), k))
        sl = slice(i * n, (i + 1) * n)
        assert float((vals[sl, 0] - w[:, -1]).abs().max()) <= 1e-10 * float(w.abs().max()), i
        assert torch.allclose(norm[sl], norm[sl][:1].expand(n)), "one norm per point"
    opcheck(torch.ops.topoderiv.conv_sensitivity_blocks.default, (xs, ps, k, True))
    opcheck(torch.ops.topoderiv.conv_sensitivity_lanczos.default, (xs, ps, k, True, 1, 6, 1e-6, 0))


@pytest.mark.parametrize("route", ["dense", "matfree", "auto"])
def test_topk_many_points_in_one_call(route, gen, monkeypatch):
    # points of two shapes (one of them three times, one channels-last), results in input order
    # equal to the single-point calls within the Lanczos tolerance, and one solve per shape group
    shapes = [(5, 3, 6, 7, 4), (4, 2, 5, 5, 6), (5, 3, 6, 7, 4), (5, 3, 6, 7, 4)]
    pts = [conv_real_like(*sh, gen) for sh in shapes]
    pts[2] = (pts[2][0].contiguous(memory_format=torch.channels_last), pts[2][1])
    calls = []
    for name in ("_lanczos_op", "_lanczos_batched_op", "_conv_lanczos_op"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    res = ops.conv_sensitivity_topk([x for x, _ in pts], [p for _, p in pts], 3, k=2, route=route, tol=1e-9)
    assert isinstance(res, list) and len(res) == len(pts)
    assert len(calls) == 2, calls  # one batched solve for the three equal shapes, one for the other
    monkeypatch.undo()
    for (x, p), r in zip(pts, res):
        single = ops.conv_sensitivity_topk(x, p, 3, k=2, route=route, tol=1e-9)
        assert r.route == single.route and (route == "auto" or r.route == route)
        w, v = ref.eigh_topk(unfold_blocks(x.double(), p.double(), 3), 2)
        assert r.converged.all()
        assert r.values.shape == single.values.shape == (p.shape[1], 2)
        assert rel_err(r.values, w) < 2e-5 and rel_err(r.values, single.values) < 2e-5
        assert r.best_block == single.best_block
        assert float((r.best_vector.double() @ v[r.best_block, :, 0]).abs()) > 1 - 1e-4
    # every point of a batch starts as its single-point call (seed_period = n): the same Krylov
    # spaces, so with a capped step count the Ritz values agree to rounding (not just to tolerance)
    capped = ops.conv_sensitivity_topk([x for x, _ in pts], [p for _, p in pts], 3, k=2, route=route, steps=4)
    for (x, p), r in zip(pts, capped):
        single = ops.conv_sensitivity_topk(x, p, 3, k=2, route=route, steps=4)
        assert rel_err(r.values, single.values) < 1e-5


def test_topk_many_points_start_vectors_and_edge_cases(gen):
    pts = [conv_real_like(4, 3, 6, 6, 4, gen) for _ in range(3)]
    xs, ps = [x for x, _ in pts], [p for _, p in pts]
    tops = [ref.eigh_topk(unfold_blocks(x, p, 3), 1) for x, p in pts]
    # warm starts for some points only (None: the seeded start), any scale
    v0 = [tops[0][1][:, :, 0] * 7.0, None, tops[2][1][:, :, 0]]
    for route in ("dense", "matfree"):
        res = ops.conv_sensitivity_topk(xs, ps, 3, route=route, tol=1e-10, v0=v0)
        for r, (w, _) in zip(res, tops):
            assert r.converged.all() and rel_err(r.values, w) < 1e-9, route
    # one point, a tuple, float64 and an empty-channel point
    one = ops.conv_sensitivity_topk((xs[0].double(),), (ps[0].double(),), 3, route="matfree", tol=1e-12)
    assert len(one) == 1 and rel_err(one[0].values, tops[0][0]) < 1e-10
    empty = ops.conv_sensitivity_topk([xs[0], xs[1]], [ps[0][:, :0], ps[1][:, :0]], 3)
    assert [r.values.shape for r in empty] == [(0, 1), (0, 1)]
    assert ops.conv_sensitivity_topk([], [], 3) == []


# ------------------------------------------------------------------------------------------------
# need="top" (the rule "top"): only the block holding a point's largest eigenvalue to tolerance
#
# The shared driver's early stop compares theta_1 + |beta_j| (an estimate, not a bound, of a
# block's lambda_max) with the best Ritz value, once the block's theta_1 has settled: without that
# wait a block whose start is poor in its top eigenvector stopped below the winner it should have
# been (1 input in 6 of these); test_need_top_winner_on_many_random_inputs checks 40 of them.


@pytest.mark.parametrize("route", ["dense", "matfree"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2])
def test_topk_need_top_against_unfold_eigvalsh(route, dtype, k):
    x, p = conv_real_like(6, 4, 7, 9, 8, torch.Generator().manual_seed(0), dtype)
    w = torch.linalg.eigvalsh(unfold_blocks(x.double(), p.double(), 3)).flip(-1)[:, :k]  # float64 reference
    tol = 1e-10 if dtype == F64 else 2e-5
    top = ops.conv_sensitivity_topk(x, p, 3, k=k, route=route, need="top", tol=1e-9 if dtype == F64 else 1e-6)
    r = int(w[:, 0].argmax())
    # the winner: solved to tolerance, its value the max over the blocks of the reference
    assert top.best_block == r and top.converged[r] and not top.early[r]
    assert abs(top.best_value - float(w[:, 0].max())) <= tol * float(w.abs().max())
    assert rel_err(top.values[r], w[r]) < tol
    # real-like spectra: most blocks cannot win and stop early, with lower bounds (Ritz values)
    early = top.early
    assert early.sum() >= 4, early
    assert not top.converged[early].any()
    slack = 4 * torch.finfo(top.values.dtype).eps * float(w.abs().max())
    assert (top.values[early, 0].double() <= w[early, 0] + slack).all()
    assert (top.values[early, 0].double() < float(w[:, 0].max())).all()
    # the blocks that did not stop early are converged eigenvalues
    assert top.converged[~early].all() and rel_err(top.values[~early], w[~early]) < tol
    assert top.steps is not None and (top.steps[early] < top.steps[r]).all()
    # need="all": unchanged (every block converged, none early)
    full = ops.conv_sensitivity_topk(x, p, 3, k=k, route=route, need="all")
    default = ops.conv_sensitivity_topk(x, p, 3, k=k, route=route)
    assert full.converged.all() and not full.early.any() and rel_err(full.values, w) < tol
    assert torch.equal(full.values, default.values) and torch.equal(full.early, default.early)


@pytest.mark.parametrize("route", ["dense", "matfree"])
def test_topk_need_top_many_points_equal_single_calls(route):
    gen = torch.Generator().manual_seed(1)
    # three points of one shape (one batched solve, one norm group per point) and one of another;
    # warm starts for some points; the early flags and values are those of the single-point calls
    shapes = [(5, 3, 6, 7, 6), (4, 2, 5, 5, 5), (5, 3, 6, 7, 6), (5, 3, 6, 7, 6)]
    pts = [conv_real_like(*sh, gen) for sh in shapes]
    xs, ps = [x for x, _ in pts], [p for _, p in pts]
    v0 = [None, None, torch.randn(6, 28, generator=gen, dtype=F64), None]
    multi = ops.conv_sensitivity_topk(xs, ps, 3, route=route, tol=1e-9, need="top", v0=v0)
    assert sum(int(r.early.sum()) for r in multi) >= 8
    for (x, p), v, r in zip(pts, v0, multi):
        single = ops.conv_sensitivity_topk(x, p, 3, route=route, tol=1e-9, need="top", v0=v)
        assert torch.equal(r.early, single.early) and torch.equal(r.converged, single.converged)
        assert torch.equal(r.steps, single.steps)
        assert rel_err(r.values, single.values) < 1e-12
        w = torch.linalg.eigvalsh(unfold_blocks(x, p, 3))[:, -1]
        assert r.best_block == int(w.argmax()) and abs(r.best_value - float(w.max())) <= 1e-9 * float(w.abs().max())
    # the raw op on a 5-D batch: need=1 per point (each point's blocks are one norm group)
    xb, pb = torch.stack([xs[0], xs[2], xs[3]]), torch.stack([ps[0], ps[2], ps[3]])
    out = T.conv_sensitivity_lanczos(xb, pb, 3, True, 1, 28, 1e-9, 0, None, 1)
    early = out[6].reshape(3, 6)
    for j, i in enumerate((0, 2, 3)):
        w = torch.linalg.eigvalsh(unfold_blocks(xs[i], ps[i], 3))[:, -1]
        assert not early[j, int(w.argmax())] and early[j].any(), j
        assert abs(float(out[0].reshape(3, 6)[j].max()) - float(w.max())) <= 1e-9 * float(w.abs().max())


def test_need_top_winner_on_many_random_inputs():
    # the rule "top" needs the winner (the argmax of the blocks' lambda_max) exactly: on 40 random
    # real-like inputs the dense route must find it every time (the rows path shares the driver)
    wrong = []
    for seed in range(40):
        x, p = conv_real_like(6, 4, 7, 9, 8, torch.Generator().manual_seed(seed))
        w = torch.linalg.eigvalsh(unfold_blocks(x, p, 3))[:, -1]
        top = ops.conv_sensitivity_topk(x, p, 3, route="dense", need="top", tol=1e-9)
        if abs(top.best_value - float(w.max())) > 1e-9 * float(w.abs().max()):
            wrong.append(seed)
    assert not wrong, f"need='top' missed the winning block for seeds {wrong}"


def test_need_errors_and_opcheck(gen):
    for bad in ("best", None, 1):
        with pytest.raises(ValueError, match=r"conv_sensitivity_topk: need must be one of \('all', 'top'\), got"):
            ops.conv_sensitivity_topk(x0, p0, 3, need=bad)
        with pytest.raises(ValueError, match=r"conv_sensitivity_topk: need must be one of \('all', 'top'\), got"):
            ops.conv_sensitivity_topk([x0, x0], [p0, p0], 3, need=bad)
    with pytest.raises(ValueError, match=r"conv_sensitivity_lanczos: need must be in \[0, 1\], got 2"):
        T.conv_sensitivity_lanczos(x0, p0, 3, True, 1, 5, 1e-6, 0, None, 2)
    with pytest.raises(ValueError, match=r"conv_sensitivity_lanczos: need must be in \[0, 1\], got -1"):
        T.conv_sensitivity_lanczos(x0.to("meta"), p0.to("meta"), 3, True, 1, 5, 1e-6, 0, None, -1)  # the fake kernel
    with pytest.raises(RuntimeError, match=r"Expected a value of type 'int' for argument 'need'"):
        T.conv_sensitivity_lanczos(x0, p0, 3, True, 1, 5, 1e-6, 0, None, "top")
    x = torch.randn(2, 3, 5, 4, generator=gen)
    p = torch.randn(2, 2, 5, 4, generator=gen)
    opcheck(T.conv_sensitivity_lanczos.default, (x, p, 3, True, 1, 28, 1e-6, 0, None, 1))
    opcheck(T.conv_sensitivity_lanczos.default, (x[None].expand(2, -1, -1, -1, -1).contiguous(),
                                                 p[None].expand(2, -1, -1, -1, -1).contiguous(), 3, True, 2, 28, 1e-6,
                                                 0, None, 1))
    # the binding: need and the early output's span
    B, m, k, steps = 2, 28, 1, 28
    outs = [torch.zeros(B, k), torch.zeros(B, m, k), torch.zeros(B, k), torch.zeros(B, dtype=torch.int32),
            torch.zeros(B, dtype=F64), torch.zeros(B, k)]
    ws = torch.zeros(lib().lanczos_workspace_elems(B, m, k, steps, True, False, 40, B, 1))
    b = ops._buf
    early = torch.zeros(B, dtype=torch.uint8)

    def lz(need, early_buf):
        lib().conv_lanczos_topk("cpu", b(x), x.stride(), b(p), p.stride(), tuple(x.shape), B, 3, 1, True, 0, m, k,
                                steps, 1e-6, 0, B, (0, 0), 0, *(b(t) for t in outs), b(ws), 1, 0, need=need,
                                early=early_buf)

    with pytest.raises(ValueError, match=r"conv_sensitivity_lanczos: need must be 0 \(all\) or 1 \(top\), got 2"):
        lz(2, b(early))
    with pytest.raises(ValueError, match="conv_sensitivity_lanczos: early must span at least num_problems = 2 bytes, got 1"):
        lz(1, (b(early)[0], 1))
    lz(1, b(early))
    w = torch.linalg.eigvalsh(unfold_blocks(x.double(), p.double(), 3))[:, -1]
    assert early[int(w.argmax())] == 0


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.conv_sensitivity_topk([x0], p0, 3), TypeError,
         "conv_sensitivity_topk: x and p must both be tensors or both sequences of tensors .*got list and Tensor"),
        (lambda: ops.conv_sensitivity_topk([x0, x0], [p0], 3), ValueError,
         "conv_sensitivity_topk: x and p must hold one tensor per point each, got 2 and 1"),
        (lambda: ops.conv_sensitivity_topk([x0, x0], [p0, p0], 3, v0=torch.zeros(2, 28)), ValueError,
         r"conv_sensitivity_topk: v0 must be None or a sequence of 2 start vectors \(None or \[n, m\]\) for 2 "
         r"points, got Tensor"),
        (lambda: ops.conv_sensitivity_topk([x0, x0], [p0, p0], 3, v0=[None]), ValueError,
         "conv_sensitivity_topk: v0 must be None or a sequence of 2 start vectors .* got a sequence of 1"),
        (lambda: ops.conv_sensitivity_topk([x0, x0], [p0, p0[:, :, :3]], 3), ValueError,
         r"conv_sensitivity_topk: p must have x's samples, height and width .* \(point 1 of 2\)"),
        (lambda: ops.conv_sensitivity_topk([x0, x0], [p0, p0], 3, v0=[None, torch.zeros(2, 5)]), ValueError,
         r"conv_sensitivity_topk: v0 must have shape \[2, 28\], got \[2, 5\] \(point 1 of 2\)"),
        (lambda: ops.conv_sensitivity_topk([x0, torch.full_like(x0, float("nan"))], [p0, p0], 3), ValueError,
         r"conv_sensitivity_topk: x must contain only finite values.*\(point 1 of 2\)"),
        (lambda: ops.conv_sensitivity_topk([x0, x0], [p0, p0.double()], 3), TypeError,
         r"conv_sensitivity_topk: p must have the same dtype as x .* \(point 1 of 2\)"),
        (lambda: ops.conv_sensitivity_topk([x0], [p0], 3, route="fast"), ValueError,
         "conv_sensitivity_topk: route must be one of"),
        (lambda: ops.conv_sensitivity_topk([x0, x0], [p0, p0], 3, k=29), ValueError,
         r"conv_sensitivity_topk: k must be <= m = 28, got k = 29 \(point 0 of 2\)"),
        # the raw ops' batched (5-D) form
        (lambda: T.conv_sensitivity_blocks(x0[None], p0, 3, True), ValueError,
         r"conv_sensitivity_blocks: p must be 5-D \[L, N, n, H, W\], got shape \[2, 2, 4, 5\]"),
        (lambda: T.conv_sensitivity_blocks(x0.expand(2, -1, -1, -1, -1), p0.expand(3, -1, -1, -1, -1), 3, True),
         ValueError, "conv_sensitivity_blocks: p must have x's number of points L = 2, got 3"),
        (lambda: T.conv_sensitivity_blocks(x0[None, None], p0[None, None], 3, True), ValueError,
         r"conv_sensitivity_blocks: x must be 4-D \[N, C, H, W\] or 5-D \[L, N, C, H, W\] \(L points of one shape\)"),
        (lambda: T.conv_sensitivity_lanczos(x0[None], p0[None], 3, True, 1, 5, 1e-6, 0, torch.zeros(1, 28)), ValueError,
         r"conv_sensitivity_lanczos: v0 must have shape \[2, 28\], got \[1, 28\]"),
        (lambda: ops.conv_sensitivity_blocks(x0[None], p0[None], 3), ValueError,
         r"conv_sensitivity_blocks: x must be 4-D \[N, C, H, W\], got shape \[1, 2, 3, 4, 5\]"),
    ],
)
def test_many_points_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_core_checks_the_batch_of_problems(gen):
    # the bindings take 5 sizes / strides (the batch first); the span checks cover the whole batch
    x = torch.randn(3, 2, 3, 4, 5, generator=gen)
    p = torch.randn(3, 2, 2, 4, 5, generator=gen)
    out = torch.zeros(3, 2, 28, 28)
    args = dict(device="cpu", x=ops._buf(x), xs=tuple(x.stride()), p=ops._buf(p), ps=tuple(p.stride()),
                out=ops._buf(out), shape=tuple(x.shape), n=2, k=3, pad=1, bias=True, in_dt=0, acc_dt=0, threads=1,
                stream=0)

    def call(**kw):
        a = dict(args)
        a.update(kw)
        lib().conv_sensitivity_blocks(*a.values())

    call()
    for i in range(3):
        assert rel_err(out[i], unfold_blocks(x[i].double(), p[i].double(), 3)) < 1e-6
    assert_rejected(call, [
        (dict(shape=(4, 2, 3, 4, 5)), "conv_sensitivity_blocks: x must span at least 1920 bytes"),
        (dict(xs=(130, 60, 20, 5, 1)), "conv_sensitivity_blocks: x must span at least 1520 bytes"),
        (dict(out=(ops._buf(out)[0], 2 * 28 * 28 * 4 * 3 - 4)), "conv_sensitivity_blocks: out must span at least 18816"),
        (dict(shape=(-1, 2, 3, 4, 5)), "conv_sensitivity_blocks: batch must be >= 0, got -1"),
        (dict(xs=(-1, 60, 20, 5, 1)), "conv_sensitivity_blocks: x batch stride must be >= 0, got -1"),
        (dict(shape=(3, 4, 5)), r"conv_sensitivity_blocks: shape must have 4 entries \[N, C, H, W\] or 5 "
                                r"\[batch, N, C, H, W\], got 3"),
        (dict(ps=(1, 2, 3)), "conv_sensitivity_blocks: p strides must have 4 entries .* got 3"),
        (dict(shape=(2**40, 2**20, 3, 4, 5)), "conv_sensitivity_blocks: sizes must fit in int64"),
    ], out)
    call(shape=(0, 2, 3, 4, 5), x=(0, 0), p=(0, 0), out=(0, 0))  # an empty batch touches nothing


def test_lanczos_outputs_poisoned_before_the_kernel_are_written(gen):
    x = torch.randn(3, 2, 5, 5, generator=gen)
    p = torch.randn(3, 4, 5, 5, generator=gen)
    B, m, k, steps = 4, 19, 2, 19
    outs = dict(values=torch.full((B, k), float("nan")), vectors=torch.full((B, m, k), float("nan")),
                ritz=torch.full((B, k), float("nan")), nsteps=torch.full((B,), -1, dtype=torch.int32),
                anorm=torch.full((B,), float("nan"), dtype=F64), tres=torch.full((B, k), float("nan")))
    ws = torch.full((lib().lanczos_workspace_elems(B, m, k, steps, True, False, 75, B, 1),), float("nan"))
    b = ops._buf
    lib().conv_lanczos_topk("cpu", b(x), x.stride(), b(p), p.stride(), tuple(x.shape), B, 3, 1, True, 0, m, k, steps,
                            1e-6, 0, B, (0, 0), 0, *(b(t) for t in outs.values()), b(ws), 1, 0)
    for name, t in outs.items():
        assert torch.isfinite(t.double()).all(), name
    assert (outs["nsteps"] >= k).all()
    w = torch.linalg.eigvalsh(unfold_blocks(x.double(), p.double(), 3))[:, -2:].flip(-1)
    assert rel_err(outs["values"], w) < 1e-4


def test_choose_conv_route_cost_model():
    # 64 channels at 16 x 16, k = 3 (m = 577): matrix-free (m >> 2 steps); a 1x1 conv with 16
    # channels (m = 17): dense; blocks past the memory budget: never dense
    assert ops.choose_conv_route(256, 64, 16, 16, 64, 3) == "matfree"
    assert ops.choose_conv_route(256, 16, 8, 8, 16, 1) == "dense"
    assert ops.choose_conv_route(4, 2, 8, 8, 2, 1) == "dense"
    assert ops.choose_conv_route(2, 512, 4, 4, 512, 3, memory_budget=2**30) == "matfree"
    assert ops.choose_conv_route(256, 64, 16, 16, 64, 3) == ops.choose_route(256 * 256, 576, 64)


def test_topk_auto_takes_the_cost_model_route(gen):
    x, p = conv_real_like(2, 8, 6, 6, 3, gen, torch.float32)  # m = 73 > 2 x 12 steps: matfree
    assert ops.conv_sensitivity_topk(x, p, 3).route == "matfree"
    x1, p1 = conv_real_like(8, 4, 6, 6, 3, gen, torch.float32)  # k = 1, m = 5: dense
    assert ops.conv_sensitivity_topk(x1, p1, 1).route == "dense"


# ------------------------------------------------------------------------------------------------
# custom-op machinery


def test_opcheck_every_conv_op(gen):
    x = torch.randn(2, 3, 5, 4, generator=gen)
    p = torch.randn(2, 2, 5, 4, generator=gen)
    v = torch.randn(2, 28, generator=gen)
    opcheck(T.conv_sensitivity_blocks.default, (x, p, 3, True))
    opcheck(T.conv_sensitivity_blocks_accumulate_.default, (x, p, 3, True, torch.zeros(2, 28, 28)))
    opcheck(T.conv_sensitivity_matvec.default, (x, p, v, 3, True))
    opcheck(T.conv_sensitivity_lanczos.default, (x, p, 3, True, 1, 28, 1e-6, 0))
    opcheck(T.conv_sensitivity_lanczos.default, (x, p, 3, True, 1, 28, 1e-6, 0, v))
    xc = x.to(memory_format=torch.channels_last)
    opcheck(T.conv_sensitivity_blocks.default, (xc, p, 1, False))
    opcheck(T.conv_sensitivity_matvec.default, (xc, p, v[:, :3].contiguous(), 1, False))
    opcheck(T.conv_sensitivity_blocks.default, (torch.zeros(0, 3, 5, 4), torch.zeros(0, 2, 5, 4), 3, True))


def test_conv_ops_under_torch_compile(gen):
    x = torch.randn(2, 3, 5, 4, generator=gen, dtype=F64)
    p = torch.randn(2, 2, 5, 4, generator=gen, dtype=F64)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(x, p):
        return T.conv_sensitivity_blocks(x, p, 3, True).sum(0)

    assert rel_err(f(x, p), unfold_blocks(x, p, 3).sum(0)) < 1e-13

    @torch.compile(backend="aot_eager")
    def g(x, p):
        return ops.conv_sensitivity_blocks(x * 2, p, 3)

    assert rel_err(g(x, p), unfold_blocks(2 * x, p, 3)) < 1e-13


def test_inputs_are_detached(gen):
    x = torch.randn(2, 3, 4, 4, generator=gen, requires_grad=True)
    p = torch.randn(2, 2, 4, 4, generator=gen)
    assert not ops.conv_sensitivity_blocks(x, p, 3).requires_grad
    v = torch.randn(2, 28, generator=gen, requires_grad=True)
    assert not ops.conv_sensitivity_matvec(x, p, v, 3).requires_grad


def test_reference_twins_agree_with_unfold(gen):
    x = torch.randn(3, 2, 5, 6, generator=gen, dtype=F64)
    p = torch.randn(3, 4, 5, 6, generator=gen, dtype=F64)
    exact = unfold_blocks(x, p, 3)
    for max_rows in (2**16, 40, 7, 1):  # whole batch, several images, pixel tiles, single pixels
        assert rel_err(ref.conv_sensitivity_blocks(x, p, 3, max_rows=max_rows), exact) < 1e-13, max_rows
    w, v = ref.conv_sensitivity_topk(x, p, 3, k=2)
    assert rel_err(w, torch.linalg.eigvalsh(exact).flip(-1)[:, :2]) < 1e-12


# ------------------------------------------------------------------------------------------------
# errors: the public functions, the raw ops, the fake kernels, the C++ span checks

x0, p0 = torch.zeros(2, 3, 4, 5), torch.zeros(2, 2, 4, 5)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: ops.conv_sensitivity_blocks([1.0], p0, 3), TypeError, "conv_sensitivity_blocks: x must be a torch.Tensor, got list"),
        (lambda: ops.conv_sensitivity_blocks(x0, "p", 3), TypeError, "conv_sensitivity_blocks: p must be a torch.Tensor, got str"),
        (lambda: ops.conv_sensitivity_blocks(x0.long(), p0.long(), 3), TypeError,
         r"conv_sensitivity_blocks: x must have dtype in \(float32, float64, bfloat16\), got int64"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0.double(), 3), TypeError,
         r"conv_sensitivity_blocks: p must have the same dtype as x \(torch.float32\), got torch.float64"),
        (lambda: ops.conv_sensitivity_blocks(x0[0], p0, 3), ValueError,
         r"conv_sensitivity_blocks: x must be 4-D \[N, C, H, W\], got shape \[3, 4, 5\]"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0[0], 3), ValueError,
         r"conv_sensitivity_blocks: p must be 4-D \[N, n, H, W\], got shape \[2, 4, 5\]"),
        (lambda: ops.conv_sensitivity_blocks(x0, torch.zeros(2, 2, 4, 4), 3), ValueError,
         r"conv_sensitivity_blocks: p must have x's samples, height and width \[N, n, H, W\] = \[2, n, 4, 5\] "
         r"\(same padding\), got \[2, 2, 4, 4\]"),
        (lambda: ops.conv_sensitivity_blocks(x0, torch.zeros(3, 2, 4, 5), 3), ValueError,
         r"p must have x's samples, height and width .* got \[3, 2, 4, 5\]"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 2), ValueError,
         r"conv_sensitivity_blocks: kernel_size must be an odd int >= 1 \(same padding kernel_size // 2, stride 1\), "
         r"got 2"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 0), ValueError, "kernel_size must be an odd int >= 1.*got 0"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3.0), TypeError, "conv_sensitivity_blocks: kernel_size must be an int, got float"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, True), TypeError, "kernel_size must be an int, got bool"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3, padding="valid"), ValueError,
         r"conv_sensitivity_blocks: padding must be 'same' \(zero padding kernel_size // 2, stride 1: p has x's "
         r"height and width\), got 'valid'"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3, padding=1), ValueError, "padding must be 'same'.*got 1"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3, bias=1), TypeError, "conv_sensitivity_blocks: bias must be a bool, got int"),
        (lambda: ops.conv_sensitivity_blocks(torch.zeros(2, 0, 4, 5), p0, 3, bias=False), ValueError,
         "conv_sensitivity_blocks: x must have C >= 1 channels when bias=False, got C = 0"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0.to("meta"), 3), ValueError,
         r"conv_sensitivity_blocks: p must be on the same device as x \(cpu\), got meta"),
        (lambda: ops.conv_sensitivity_blocks(x0.to("meta"), p0.to("meta"), 3), ValueError,
         "conv_sensitivity_blocks: x must be a CPU or CUDA tensor, got device meta"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3, out=torch.zeros(2, 27, 27)), ValueError,
         r"conv_sensitivity_blocks: out must have shape \[n, m, m\] = \[2, 28, 28\] \(m = C k k \+ bias\), got "
         r"\[2, 27, 27\]"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3, out=torch.zeros(2, 28, 28, dtype=torch.int32)), TypeError,
         r"conv_sensitivity_blocks: out must have dtype in \(float32, float64\), got int32"),
        (lambda: ops.conv_sensitivity_blocks(x0.double(), p0.double(), 3, out=torch.zeros(2, 28, 28)), TypeError,
         "conv_sensitivity_blocks: out must be float64 for float64 inputs, got torch.float32"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3, out=torch.zeros(2, 28, 28).mT), ValueError,
         r"conv_sensitivity_blocks: out must be contiguous, got strides \(784, 1, 28\)"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3, out=torch.zeros(2, 28, 28, device="meta")), ValueError,
         r"conv_sensitivity_blocks: out must be on the same device as x \(cpu\), got meta"),
        (lambda: ops.conv_sensitivity_blocks(x0, p0, 3, out="out"), TypeError,
         "conv_sensitivity_blocks: out must be a torch.Tensor, got str"),
        (lambda: ops.conv_sensitivity_blocks(torch.full((2, 3, 4, 5), float("nan")), p0, 3), ValueError,
         "conv_sensitivity_blocks: x must contain only finite values, got NaN or Inf"),
        (lambda: ops.conv_sensitivity_blocks(x0, torch.full((2, 2, 4, 5), float("inf")), 3), ValueError,
         "conv_sensitivity_blocks: p must contain only finite values, got NaN or Inf"),
        (lambda: ops.conv_sensitivity_blocks(x0, torch.full((2, 2, 4, 5), float("inf")), 3, out=torch.zeros(2, 28, 28)),
         ValueError, "conv_sensitivity_blocks_accumulate_: p must contain only finite values"),
        (lambda: ops.conv_sensitivity_matvec(x0, p0, torch.zeros(2, 27), 3), ValueError,
         r"conv_sensitivity_matvec: v must have shape \[n, m\] = \[2, 28\] \(m = C k k \+ bias\), got \[2, 27\]"),
        (lambda: ops.conv_sensitivity_matvec(x0, p0, torch.zeros(2, 28, dtype=F64), 3), TypeError,
         "conv_sensitivity_matvec: v must have dtype torch.float32 for torch.float32 inputs, got torch.float64"),
        (lambda: ops.conv_sensitivity_matvec(x0, p0, torch.zeros(2, 28, device="meta"), 3), ValueError,
         r"conv_sensitivity_matvec: v must be on the same device as x \(cpu\), got meta"),
        (lambda: ops.conv_sensitivity_matvec(x0, p0, [0.0], 3), TypeError, "conv_sensitivity_matvec: v must be a torch.Tensor, got list"),
        (lambda: ops.conv_sensitivity_matvec(x0, p0, torch.zeros(2, 28), 3, padding="full"), ValueError,
         "conv_sensitivity_matvec: padding must be 'same'"),
        (lambda: ops.conv_sensitivity_matvec(x0, p0, torch.full((2, 28), float("nan")), 3), ValueError,
         "conv_sensitivity_matvec: v must contain only finite values, got NaN or Inf"),
        (lambda: ops.conv_sensitivity_matvec(torch.full((2, 3, 4, 5), float("inf")), p0, torch.ones(2, 28), 3),
         ValueError, "conv_sensitivity_matvec: x must contain only finite values, got NaN or Inf"),
        (lambda: ops.conv_sensitivity_matvec(torch.ones(2, 3, 4, 5), torch.full((2, 2, 4, 5), float("nan")),
                                             torch.ones(2, 28), 3), ValueError,
         "conv_sensitivity_matvec: p must contain only finite values, got NaN or Inf"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 3, route="fast"), ValueError,
         r"conv_sensitivity_topk: route must be one of \('auto', 'dense', 'matfree'\), got 'fast'"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 1, k=5), ValueError, "conv_sensitivity_topk: k must be <= m = 4, got k = 5"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 3, k=0), ValueError, "conv_sensitivity_topk: k must be >= 1, got 0"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 3, steps=0), ValueError, "conv_sensitivity_topk: steps must be >= 1, got 0"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 3, tol=0.0), ValueError,
         "conv_sensitivity_topk: tol must be a finite number > 0, got 0.0"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 3, seed=-1), ValueError,
         r"conv_sensitivity_topk: seed must be in \[0, 9223372036854775807\], got -1"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 3, v0=torch.zeros(2, 27)), ValueError,
         r"conv_sensitivity_topk: v0 must have shape \[2, 28\], got \[2, 27\]"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 3, padding="valid"), ValueError, "conv_sensitivity_topk: padding must be 'same'"),
        (lambda: ops.conv_sensitivity_topk(torch.full((2, 3, 4, 5), float("nan")), p0, 3), ValueError,
         "conv_sensitivity_topk: x must contain only finite values"),
        (lambda: ops.conv_sensitivity_topk(x0, torch.full((2, 2, 4, 5), float("nan")), 3, route="dense"), ValueError,
         "conv_sensitivity_topk: p must contain only finite values"),
        (lambda: ops.conv_sensitivity_topk(x0, p0, 4), ValueError, "conv_sensitivity_topk: kernel_size must be an odd int"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: T.conv_sensitivity_blocks(x0, p0, 2, True), ValueError, "conv_sensitivity_blocks: kernel_size must be an odd int"),
        (lambda: T.conv_sensitivity_blocks(x0, torch.zeros(2, 2, 5, 4), 3, True), ValueError,
         "conv_sensitivity_blocks: p must have x's samples, height and width"),
        (lambda: T.conv_sensitivity_blocks(x0.reshape(2, 3, 20), p0, 3, True), ValueError,
         r"conv_sensitivity_blocks: x must be 4-D \[N, C, H, W\]"),
        (lambda: T.conv_sensitivity_blocks(torch.full((2, 3, 4, 5), float("nan")), p0, 3, True), ValueError,
         "conv_sensitivity_blocks: x must contain only finite values"),
        (lambda: T.conv_sensitivity_blocks(x0.bfloat16(), p0, 3, True), TypeError,
         r"conv_sensitivity_blocks: p must have the same dtype as x \(torch.bfloat16\), got torch.float32"),
        (lambda: T.conv_sensitivity_blocks_accumulate_(x0, p0, 3, True, torch.zeros(2, 4, 4)), ValueError,
         r"conv_sensitivity_blocks_accumulate_: out must have shape \[n, m, m\] = \[2, 28, 28\]"),
        (lambda: T.conv_sensitivity_blocks_accumulate_(x0, p0, 3, True, torch.zeros(2, 28, 28, dtype=torch.bfloat16)),
         TypeError, r"conv_sensitivity_blocks_accumulate_: out must have dtype in \(float32, float64\), got bfloat16"),
        (lambda: T.conv_sensitivity_blocks_accumulate_(x0.double(), p0.double(), 3, True, torch.zeros(2, 28, 28)),
         TypeError, "conv_sensitivity_blocks_accumulate_: out must be float64 for float64 inputs"),
        (lambda: T.conv_sensitivity_blocks_accumulate_(x0, p0, 3, True, torch.zeros(28, 28, 2).permute(2, 0, 1)),
         ValueError, "conv_sensitivity_blocks_accumulate_: out must be contiguous"),
        (lambda: T.conv_sensitivity_blocks_accumulate_(x0, torch.full((2, 2, 4, 5), float("nan")), 3, True,
                                                       torch.zeros(2, 28, 28)), ValueError,
         "conv_sensitivity_blocks_accumulate_: p must contain only finite values"),
        (lambda: T.conv_sensitivity_matvec(x0, p0, torch.zeros(3, 28), 3, True), ValueError,
         r"conv_sensitivity_matvec: v must have shape \[n, m\] = \[2, 28\]"),
        (lambda: T.conv_sensitivity_matvec(x0.bfloat16(), p0.bfloat16(), torch.zeros(2, 28).bfloat16(), 3, True),
         TypeError, "conv_sensitivity_matvec: v must have dtype torch.float32 for torch.bfloat16 inputs, got torch.bfloat16"),
        (lambda: T.conv_sensitivity_matvec(x0, p0, torch.full((2, 28), float("inf")), 3, True), ValueError,
         "conv_sensitivity_matvec: v must contain only finite values"),
        (lambda: T.conv_sensitivity_lanczos(x0, p0, 3, True, 29, 29, 1e-6, 0), ValueError,
         "conv_sensitivity_lanczos: k must be <= m = 28, got k = 29"),
        (lambda: T.conv_sensitivity_lanczos(x0, p0, 3, True, 2, 1, 1e-6, 0), ValueError,
         r"conv_sensitivity_lanczos: steps must be in \[2, 28\], got 1"),
        (lambda: T.conv_sensitivity_lanczos(x0, p0, 3, True, 1, 29, 1e-6, 0), ValueError,
         r"conv_sensitivity_lanczos: steps must be in \[1, 28\], got 29"),
        (lambda: T.conv_sensitivity_lanczos(x0, p0, 3, True, 1, 5, float("nan"), 0), ValueError,
         "conv_sensitivity_lanczos: tol must be a finite number > 0"),
        (lambda: T.conv_sensitivity_lanczos(x0, p0, 3, True, 1, 5, 1e-6, -3), ValueError,
         r"conv_sensitivity_lanczos: seed must be in \[0, 9223372036854775807\], got -3"),
        (lambda: T.conv_sensitivity_lanczos(x0, p0, 3, True, 1, 5, 1e-6, 0, torch.zeros(2, 5)), ValueError,
         r"conv_sensitivity_lanczos: v0 must have shape \[2, 28\], got \[2, 5\]"),
        (lambda: T.conv_sensitivity_lanczos(x0, p0, 3, True, 1, 5, 1e-6, 0, torch.zeros(2, 28, dtype=torch.int64)),
         TypeError, "conv_sensitivity_lanczos: v0 must be a floating-point tensor"),
        (lambda: T.conv_sensitivity_lanczos(x0, p0, 3, True, 1, 5, 1e-6, 0, torch.full((2, 28), float("nan"))),
         ValueError, "conv_sensitivity_lanczos: v0 must contain only finite values"),
        (lambda: T.conv_sensitivity_lanczos(torch.full((2, 3, 4, 5), float("inf")), p0, 3, True, 1, 5, 1e-6, 0),
         ValueError, "conv_sensitivity_lanczos: x must contain only finite values"),
        # the dispatcher's own argument parsing (before the op body): a RuntimeError naming op and argument
        (lambda: T.conv_sensitivity_blocks([1.0], p0, 3, True), RuntimeError,
         r"topoderiv::conv_sensitivity_blocks\(\) Expected a value of type 'Tensor' for argument 'x'"),
        (lambda: T.conv_sensitivity_matvec(x0, p0, torch.zeros(2, 28), 3.0, True), RuntimeError,
         r"topoderiv::conv_sensitivity_matvec\(\) Expected a value of type 'int' for argument 'kernel_size'"),
    ],
)
def test_raw_op_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_fake_kernels_raise_the_same_errors_and_give_the_shapes():
    meta = dict(device="meta")
    with pytest.raises(ValueError, match=r"conv_sensitivity_blocks: p must have x's samples, height and width"):
        T.conv_sensitivity_blocks(torch.zeros(2, 3, 4, 5, **meta), torch.zeros(2, 2, 4, 4, **meta), 3, True)
    with pytest.raises(ValueError, match=r"conv_sensitivity_matvec: v must have shape \[n, m\] = \[2, 28\]"):
        T.conv_sensitivity_matvec(torch.zeros(2, 3, 4, 5, **meta), torch.zeros(2, 2, 4, 5, **meta),
                                  torch.zeros(2, 3, **meta), 3, True)
    with pytest.raises(ValueError, match=r"conv_sensitivity_blocks_accumulate_: out must have shape"):
        T.conv_sensitivity_blocks_accumulate_(torch.zeros(2, 3, 4, 5, **meta), torch.zeros(2, 2, 4, 5, **meta), 3, True,
                                              torch.zeros(2, 3, 3, **meta))
    with pytest.raises(ValueError, match=r"conv_sensitivity_lanczos: steps must be in \[1, 28\], got 30"):
        T.conv_sensitivity_lanczos(torch.zeros(2, 3, 4, 5, **meta), torch.zeros(2, 2, 4, 5, **meta), 3, True, 1, 30,
                                   1e-6, 0)
    got = T.conv_sensitivity_lanczos(torch.zeros(2, 3, 4, 5, dtype=torch.bfloat16, **meta),
                                     torch.zeros(2, 2, 4, 5, dtype=torch.bfloat16, **meta), 3, True, 2, 5, 1e-6, 0)
    assert [tuple(t.shape) for t in got] == [(2, 2), (2, 28, 2), (2, 2), (2,), (2,), (2, 2), (2,)]
    assert got[0].dtype == torch.float32 and got[3].dtype == torch.int32 and got[6].dtype == torch.bool
    assert T.conv_sensitivity_blocks(torch.zeros(2, 3, 4, 5, dtype=F64, **meta), torch.zeros(2, 2, 4, 5, dtype=F64, **meta),
                                     5, False).shape == (2, 75, 75)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        with pytest.raises(ValueError, match="conv_sensitivity_blocks: kernel_size must be an odd int"):
            T.conv_sensitivity_blocks(torch.zeros(2, 3, 4, 5), torch.zeros(2, 2, 4, 5), 4, True)


def test_out_sharing_memory_with_an_input_raises(gen):
    store = torch.zeros(2 * 28 * 28 + 200)
    x = store[:120].view(2, 3, 4, 5)
    p = torch.randn(2, 2, 4, 5, generator=gen)
    out = store[100:100 + 2 * 28 * 28].view(2, 28, 28)
    with pytest.raises(ValueError, match="conv_sensitivity_blocks: out must not share memory with x "
                                         r"\(out is accumulated into while x is read\), got overlapping memory"):
        ops.conv_sensitivity_blocks(x, p, 3, out=out)
    with pytest.raises(ValueError, match="conv_sensitivity_blocks_accumulate_: out must not share memory with x"):
        T.conv_sensitivity_blocks_accumulate_(x, p, 3, True, out)
    pstore = torch.zeros(2 * 28 * 28 + 40)
    with pytest.raises(ValueError, match="out must not share memory with p"):
        ops.conv_sensitivity_blocks(torch.randn(2, 3, 4, 5, generator=gen), pstore[:80].view(2, 2, 4, 5), 3,
                                    out=pstore[40:40 + 2 * 28 * 28].view(2, 28, 28))
    out = store[120:120 + 2 * 28 * 28].view(2, 28, 28)  # the same storage, no overlap: fine and right
    x.copy_(torch.randn(2, 3, 4, 5, generator=gen))
    ops.conv_sensitivity_blocks(x, p, 3, out=out)
    assert rel_err(out, unfold_blocks(x.double(), p.double(), 3)) < 1e-6


def test_device_error_without_cuda_kernels(monkeypatch):
    from types import SimpleNamespace
    monkeypatch.setattr(ops, "has_cuda_kernels", lambda: False)
    fake = SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(RuntimeError, match="conv_sensitivity_blocks: x is a CUDA tensor but this topoderiv build has "
                                           "no CUDA kernels; rebuild"):
        ops._check_device("conv_sensitivity_blocks", "x", fake, torch.device("cuda"))


def _blocks_call(xt, pt, ot, **kw):
    args = dict(device="cpu", x=ops._buf(xt), xs=tuple(xt.stride()), p=ops._buf(pt), ps=tuple(pt.stride()),
                out=ops._buf(ot), shape=tuple(xt.shape), n=pt.shape[1], k=3, pad=1, bias=True, in_dt=0, acc_dt=0,
                threads=1, stream=0)
    args.update(kw)
    lib().conv_sensitivity_blocks(*args.values())


def test_core_checks_every_span_of_conv_blocks(gen):
    x = torch.randn(2, 3, 4, 5, generator=gen)
    p = torch.randn(2, 2, 4, 5, generator=gen)
    out = torch.zeros(2, 28, 28)
    _blocks_call(x, p, out)
    assert rel_err(out, unfold_blocks(x.double(), p.double(), 3)) < 1e-6
    xb, pb, ob = ops._buf(x), ops._buf(p), ops._buf(out)
    cases = [
        (dict(x=(xb[0], xb[1] - 1)), r"conv_sensitivity_blocks: x must span at least 480 bytes \(what the kernels "
                                     r"access given its sizes, strides and dtype\), got 479"),
        (dict(p=(pb[0], 8)), r"conv_sensitivity_blocks: p must span at least 320 bytes \(.*\), got 8"),
        (dict(out=(ob[0], ob[1] - 4)), "conv_sensitivity_blocks: out must span at least 6272 bytes"),
        (dict(shape=(3, 3, 4, 5)), "x must span at least 720 bytes"),
        (dict(xs=(60, 20, 5, 2)), "x must span at least 496 bytes"),   # a larger column stride
        (dict(n=3), "p must span at least 400 bytes"),
        (dict(k=5, pad=2), "out must span at least 46208 bytes"),
        (dict(x=(0, 0)), r"conv_sensitivity_blocks: x must be a non-null pointer \(480 bytes are accessed\), got null"),
        (dict(x=(xb[0] + 2, xb[1] - 2)), r"conv_sensitivity_blocks: x must be aligned to its element size \(4 bytes\)"),
        (dict(out=(xb[0], 10**6)), r"conv_sensitivity_blocks: out must not overlap x \(out is written while the "
                                   r"kernels use x\), got overlapping memory"),
        (dict(shape=(-1, 3, 4, 5)), "conv_sensitivity_blocks: N must be >= 0, got -1"),
        (dict(shape=(2, -3, 4, 5)), "conv_sensitivity_blocks: C must be >= 0, got -3"),
        (dict(shape=(2, 3, -4, 5)), "conv_sensitivity_blocks: H must be >= 0, got -4"),
        (dict(shape=(2, 3, 4, -5)), "conv_sensitivity_blocks: W must be >= 0, got -5"),
        (dict(n=-1), "conv_sensitivity_blocks: n must be >= 0, got -1"),
        (dict(k=0), "conv_sensitivity_blocks: kernel_size must be >= 1, got 0"),
        (dict(pad=-1), "conv_sensitivity_blocks: padding must be >= 0, got -1"),
        (dict(shape=(2, 0, 4, 5), bias=False), r"conv_sensitivity_blocks: m = C k k \+ bias must be >= 1, got C = 0 "
                                               r"without bias"),
        (dict(xs=(60, -20, 5, 1)), "conv_sensitivity_blocks: x stride 1 must be >= 0, got -20"),
        (dict(ps=(40, 20, 5, -1)), "conv_sensitivity_blocks: p stride 3 must be >= 0, got -1"),
        (dict(in_dt=9), r"conv_sensitivity_blocks: in_dtype must be a dtype code 0 \(float32\), 1 \(float64\) or 2 "
                        r"\(bfloat16\), got 9"),
        (dict(in_dt=1, acc_dt=0), "conv_sensitivity_blocks: acc_dtype must be float64 for float64 inputs, got float32"),
        (dict(acc_dt=2), "conv_sensitivity_blocks: acc_dtype must be float32 or float64, got bfloat16"),
        (dict(shape=(2**62, 3, 4, 5)), "conv_sensitivity_blocks: sizes must fit in int64"),
        (dict(k=2**32, pad=2**31), "conv_sensitivity_blocks: sizes must fit in int64"),
        (dict(threads=0), "conv_sensitivity_blocks: threads must be >= 1, got 0"),
        (dict(device="mps"), "conv_sensitivity_blocks: device must be 'cpu' or 'cuda', got 'mps'"),
    ]
    assert_rejected(lambda **kw: _blocks_call(x, p, out, **kw), cases, out, cuda=True)
    # nothing touched, nothing checked: empty problems pass with null pointers
    _blocks_call(x, p, out, shape=(0, 3, 4, 5), x=(0, 0), p=(0, 0), out=(0, 0))
    _blocks_call(x, p, out, n=0, x=(0, 0), p=(0, 0), out=(0, 0))
    _blocks_call(x, p, out, k=7, pad=0, x=(0, 0), p=(0, 0), out=(0, 0))  # the kernel is larger than the image
    # the core takes any padding (p [N, n, H + 2 pad - k + 1, ...]); the ops use pad = k // 2 only
    valid = torch.zeros(2, 28, 28)
    _blocks_call(x, p, valid, pad=0)  # p's strides, p[:, :, :2, :3] read
    cols = F.unfold(x.double(), 3)  # no padding
    cols = torch.cat([cols, torch.ones(2, 1, cols.shape[2], dtype=F64)], dim=1)
    q = p[:, :, :2, :3].double().reshape(2, 2, -1)
    assert rel_err(valid, torch.einsum("srl,sil,sjl->rij", q, cols, cols)) < 1e-6


def test_core_checks_every_span_of_conv_matvec_and_lanczos(gen):
    x = torch.randn(2, 3, 4, 5, generator=gen)
    p = torch.randn(2, 2, 4, 5, generator=gen)
    v = torch.randn(2, 28, generator=gen)
    out = torch.zeros(2, 28)
    b = ops._buf

    def mv(**kw):
        args = dict(device="cpu", x=b(x), xs=x.stride(), p=b(p), ps=p.stride(), v=b(v), out=b(out), ws=(0, 0),
                    shape=tuple(x.shape), n=2, k=3, pad=1, bias=True, in_dt=0, acc_dt=0, threads=1, stream=0)
        args.update(kw)
        lib().conv_sensitivity_matvec(*args.values())

    mv()
    assert rel_err(out, unfold_matvec(x.double(), p.double(), v.double(), 3)) < 1e-6
    for kw, match in [
        (dict(v=(b(v)[0], 223)), "conv_sensitivity_matvec: v must span at least 224 bytes"),
        (dict(out=b(v)), "conv_sensitivity_matvec: out must not overlap v"),
        (dict(out=(b(x)[0] + 8, 224)), "conv_sensitivity_matvec: out must not overlap x"),
        (dict(out=(0, 0)), "conv_sensitivity_matvec: out must be a non-null pointer"),
        (dict(n=3), "conv_sensitivity_matvec: out must span at least 336 bytes"),
        (dict(shape=(3, 3, 4, 5)), "conv_sensitivity_matvec: x must span at least 720 bytes"),
        (dict(ps=(40, 20, 6, 1)), "conv_sensitivity_matvec: p must span at least 332 bytes"),
        (dict(acc_dt=1), "conv_sensitivity_matvec: out must span at least 448 bytes"),
    ]:
        with pytest.raises(ValueError, match=match):
            mv(**kw)

    B, m, k, steps = 2, 28, 1, 28
    outs = dict(values=torch.zeros(B, k), vectors=torch.zeros(B, m, k), ritz=torch.zeros(B, k),
                nsteps=torch.zeros(B, dtype=torch.int32), anorm=torch.zeros(B, dtype=F64), tres=torch.zeros(B, k))
    ws = torch.zeros(lib().lanczos_workspace_elems(B, m, k, steps, True, False, 40, B, 1))

    def lz(**kw):
        args = dict(device="cpu", x=b(x), xs=x.stride(), p=b(p), ps=p.stride(), shape=tuple(x.shape), n=B, kernel=3,
                    pad=1, bias=True, in_dt=0, m=m, k=k, steps=steps, tol=1e-6, seed=0, norm_group=B, v0=(0, 0), dt=0,
                    **{name: b(t) for name, t in outs.items()}, ws=b(ws), threads=1, stream=0)
        args.update(kw)
        lib().conv_lanczos_topk(*args.values())

    lz()
    w = torch.linalg.eigvalsh(unfold_blocks(x.double(), p.double(), 3))[:, -1]
    assert rel_err(outs["values"][:, 0], w) < 1e-5
    for kw, match in [
        (dict(x=(b(x)[0], 100)), "conv_sensitivity_lanczos: x must span at least 480 bytes"),
        (dict(p=(b(p)[0], 100)), "conv_sensitivity_lanczos: p must span at least 320 bytes"),
        (dict(ws=(b(ws)[0], b(ws)[1] - 4)), "conv_sensitivity_lanczos: workspace must span at least"),
        (dict(values=b(x)), "conv_sensitivity_lanczos: values must not overlap x"),
        (dict(vectors=b(outs["values"])), "conv_sensitivity_lanczos: vectors must span at least 224 bytes"),
        (dict(v0=(b(v)[0], 220)), "conv_sensitivity_lanczos: v0 must span at least 224 bytes"),
        (dict(m=27), r"conv_sensitivity_lanczos: the matrix-free operator must have batch n = num_problems = 2 and "
                     r"m = 27, got batch n = 1 \* 2 and m = 28"),
        (dict(n=3), "conv_sensitivity_lanczos: values must span at least 12 bytes"),  # n = num_problems
        (dict(k=0), r"conv_sensitivity_lanczos: k must be in \[1, m = 28\], got 0"),
        (dict(steps=29), r"conv_sensitivity_lanczos: max_steps must be in \[k = 1, m = 28\], got 29"),
        (dict(tol=-1.0), "conv_sensitivity_lanczos: tol must be a finite number > 0"),
        (dict(norm_group=0), "conv_sensitivity_lanczos: norm_group must be >= 1, got 0"),
        (dict(dt=1), "conv_sensitivity_lanczos: values must span at least 16 bytes"),  # float64 outputs expected
        (dict(in_dt=1), "conv_sensitivity_lanczos: acc_dtype must be float64 for float64 inputs, got float32"),
        (dict(dt=2), "conv_sensitivity_lanczos: acc_dtype must be float32 or float64, got bfloat16"),
        (dict(kernel=4, pad=1), r"conv_sensitivity_lanczos: the matrix-free operator must have .* m = 49"),
        (dict(threads=0), "conv_sensitivity_lanczos: threads must be >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            lz(**kw)


# ------------------------------------------------------------------------------------------------
# the benchmark script runs (smoke sizes) and prints its tables


@pytest.mark.slow
def test_bench_conv_runs():
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    out = subprocess.run([sys.executable, str(bench / "bench_conv.py"), "--quick", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600, cwd=bench)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("|")]
    assert len(lines) >= 20, out.stdout[-3000:]  # five tables: header, separator, rows
    assert sum("one 4-point call" in ln for ln in lines) == 2, out.stdout[-3000:]  # need all / top
