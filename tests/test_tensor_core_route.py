"""The bf16 tensor-core routes of the dense blocks (issue 9), the parts that run without a GPU.

Design 2 ("pairs": pair products z, then P^T z as a matmul, chunked, unpacked, mirrored) is run here
with the CUDA pair-product kernel replaced by a CPU stand-in (the same rounding: the product of two
bf16 values is exact in float32, rounded once to bf16), so the chunking / unpacking / mirroring /
accumulation code of ops.py is tested on CI. The kernels themselves are tested by the emulator
(csrc/cuda/emulator/test_emulated.cpp) and on a GPU by tests/test_cuda.py.

Tolerance rule of the tensor-core routes (per element): |B_tc - B| <= (2^-8 + (N + 32) 2^-24) *
sum_s |p[s, r] xt[s, i] xt[s, j]| : one bf16 rounding per term (unit roundoff 2^-8), then float32 sums.
"""
from __future__ import annotations

import pytest
import torch

from topoderiv import ops
from topoderiv import reference as ref

U_BF16 = 2.0 ** -8


def tc_bound(x: torch.Tensor, p: torch.Tensor, bias: bool) -> torch.Tensor:
    absb = ref.sensitivity_blocks(x.double().abs(), p.double().abs(), bias=bias)
    return (U_BF16 + (x.shape[0] + 32) * 2.0 ** -24) * absb + 1e-300


def ref_pair_products(x: torch.Tensor, bias: bool, i0: int, i1: int) -> torch.Tensor:
    """CPU stand-in of the CUDA pair-product kernel: z[s, q] = bf16(xt_i xt_j), pairs of rows [i0, i1)."""
    N, d = x.shape
    m = d + int(bias)
    xt = torch.cat([x.float(), torch.ones(N, 1)], 1) if bias else x.float()
    iu = torch.triu_indices(m, m)[:, ops._tri_offset(m, i0):ops._tri_offset(m, i1)]
    return (xt[:, iu[0]] * xt[:, iu[1]]).to(torch.bfloat16)


class Recorder:
    """Counts the z chunks and triangle-row groups the route asks for (the chunking must happen)."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, x: torch.Tensor, bias: bool, i0: int, i1: int) -> torch.Tensor:
        z = ref_pair_products(x, bias, i0, i1)
        self.calls.append((x.shape[0], i0, i1, z.numel() * 2))
        return z


def sym_start(n: int, m: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randint(-5, 6, (n, m, m), generator=g).float()
    return a + a.mT


def test_stand_in_matches_float64_products():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g).to(torch.bfloat16)
    z = ref_pair_products(x, True, 2, 5)
    xt = torch.cat([x.double(), torch.ones(9, 1, dtype=torch.float64)], 1)
    want = torch.stack([xt[:, i] * xt[:, j] for i in range(2, 5) for j in range(i, 7)], 1)
    assert z.shape == want.shape
    assert ((z.double() - want).abs() <= U_BF16 * want.abs()).all()
    assert not torch.equal(z.double(), want)  # the rounding is real (random data)


# (N, d, n, bias, budget bytes, max rows): budgets from "one triangle row per group" to "everything at once"
CASES = [
    (1, 0, 1, True, 1, 1),
    (37, 5, 3, True, 64, 8),
    (37, 5, 3, False, 10**9, 10**9),
    (200, 30, 7, True, 4000, 64),
    (200, 30, 7, False, 1, 1000),
    (513, 70, 9, True, 20000, 100),
    (130, 64, 5, False, 10**9, 7),
]


@pytest.mark.parametrize("N, d, n, bias, budget, max_rows", CASES)
@pytest.mark.parametrize("integer", [False, True])
def test_pair_route_chunking_against_float64(N, d, n, bias, budget, max_rows, integer):
    g = torch.Generator().manual_seed(N * 131 + d * 7 + n + int(bias))
    if integer:  # products and sums exact everywhere: the route must reproduce the reference exactly
        x = torch.randint(-3, 4, (N, d), generator=g).to(torch.bfloat16)
        p = torch.randint(-3, 4, (N, n), generator=g).to(torch.bfloat16)
    else:
        x = torch.randn(N, d, generator=g).to(torch.bfloat16)
        p = torch.randn(N, n, generator=g).to(torch.bfloat16)
    m = d + int(bias)
    out0 = sym_start(n, m, g)
    out = out0.clone()
    rec = Recorder()
    ops._pair_blocks(x, p, bias, out, pair_products=rec, budget_bytes=budget, max_rows=max_rows)
    exact = ref.sensitivity_blocks(x.double(), p.double(), bias=bias) + out0.double()
    assert torch.equal(out, out.mT)  # mirrored exactly
    if integer:
        assert torch.equal(out.double(), exact)
    else:
        err = (out.double() - exact).abs()
        assert (err <= tc_bound(x, p, bias) + 2.0 ** -24 * out0.abs().double()).all(), float(err.max())
    # the chunking really happened as asked: every triangle row once per row chunk, chunks within budget
    rows = max(1, min(N, max_rows))
    chunks = -(-N // rows)
    groups = sorted({(i0, i1) for _, i0, i1, _ in rec.calls})
    assert len(rec.calls) == chunks * len(groups)
    assert groups[0][0] == 0 and groups[-1][1] == m and all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    width = max(budget // (2 * rows), m)
    assert all(nbytes <= 2 * rows * width for _, _, _, nbytes in rec.calls)
    assert sorted({r for r, _, _, _ in rec.calls}, reverse=True)[0] == rows


def test_pair_route_bound_is_tight_enough_to_fail():
    # the tolerance rule must reject a wrong answer of the size a bug makes (one sample dropped) while
    # accepting the route's rounding, which is really there (not bit-equal to the float64 result)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 70, generator=g).to(torch.bfloat16)
    p = torch.randn(300, 6, generator=g).to(torch.bfloat16)
    out = torch.zeros(6, 71, 71)
    ops._pair_blocks(x, p, True, out, pair_products=ref_pair_products, budget_bytes=5000, max_rows=64)
    exact = ref.sensitivity_blocks(x.double(), p.double())
    bound = tc_bound(x, p, True)
    assert ((out.double() - exact).abs() <= bound).all()
    assert not torch.equal(out.double(), exact)
    dropped = ref.sensitivity_blocks(x[1:].double(), p[1:].double())
    assert ((dropped - exact).abs() > bound).any()


def test_dense_kernel_rule_and_override(monkeypatch):
    monkeypatch.delenv("TOPODERIV_DENSE_KERNEL", raising=False)
    bf = torch.bfloat16
    assert ops.dense_kernel(bf, "cpu", 65536, 512, 512) == "cpu"
    assert ops.dense_kernel(torch.float32, "cuda", 65536, 512, 512) == "simt"
    assert ops.dense_kernel(bf, "cuda", 65536, 512, 512) == "pairs"
    assert ops.dense_kernel(bf, "cuda", 65536, 512, 64) == "mma"
    assert ops.dense_kernel(bf, "cuda", 65536, 62, 512) == "simt"  # m = 63 < 64
    assert ops.dense_kernel(bf, "cuda", 65536, 63, 512) == "pairs"  # m = 64
    assert ops.dense_kernel(bf, "cuda", 65536, 63, 512, bias=False) == "simt"
    for k in ("simt", "mma", "pairs"):
        monkeypatch.setenv("TOPODERIV_DENSE_KERNEL", k)
        assert ops.dense_kernel(bf, "cuda:0", 10, 3, 2) == k
        assert ops.dense_kernel(torch.float64, "cuda", 10, 3, 2) == "simt"  # tensor cores: bf16 only
        assert ops.dense_kernel(bf, "cpu", 10, 3, 2) == "cpu"
    monkeypatch.setenv("TOPODERIV_DENSE_KERNEL", "wmma")
    with pytest.raises(ValueError, match=r"dense_kernel: environment variable TOPODERIV_DENSE_KERNEL must be one "
                                         r"of \('auto', 'simt', 'mma', 'pairs'\), got 'wmma'"):
        ops.dense_kernel(bf, "cuda", 10, 3, 2)


def test_raw_tensor_core_entry_points_refuse_cpu():
    from topoderiv._lib import lib
    b = ops._buf
    x = torch.randn(6, 3).to(torch.bfloat16)
    p = torch.randn(6, 2).to(torch.bfloat16)
    out = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="sensitivity_blocks_mma: device must be 'cuda'"):
        lib().sensitivity_blocks_mma("cpu", b(x), 3, b(p), 2, b(out), 1, 6, 3, 2, 0, 0, True, 2, 0, 0)
    z = torch.empty(6, 10, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sensitivity_pair_products: device must be 'cuda'"):
        lib().sensitivity_pair_products("cpu", b(x), 3, b(z), 6, 3, True, 0, 4, 2, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_bench_gpu_fails_cleanly_without_gpu():
    import subprocess
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    out = subprocess.run([sys.executable, str(bench / "bench_gpu.py")], capture_output=True, text=True, timeout=300,
                         cwd=bench)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "bench_gpu.py: needs a CUDA GPU" in out.stderr and "nothing was measured" in out.stderr
