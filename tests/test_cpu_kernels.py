"""CPU kernel paths by shape: the matvec's V^T tile widths (32/16/8 columns by the number of
blocks n), its feature tail (d % 32 features copied, the rest read from x's rows), chunk and
row-block tails (N not a multiple of 256 or 8), row strides, and every input dtype; the blocks'
output prefetch across row blocks. All against float64 references."""
import math

import pytest
import torch

import topoderiv as td
from topoderiv import reference as ref
from topoderiv._lib import lib


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 16, 17, 24, 33, 40, 71])
@pytest.mark.parametrize("d,bias", [(0, True), (5, False), (32, True), (47, True), (64, False), (81, True)])
def test_matvec_tile_widths_and_tails(n, d, bias):
    g = torch.Generator().manual_seed(1000 * n + d)
    N = 523  # two full chunks of 256 and a tail of 11 (not a multiple of 8)
    xb = torch.randn(N, d + 3, generator=g, dtype=torch.float64)
    x = xb[:, :d]  # row stride d + 3
    p = torch.randn(N, n, generator=g, dtype=torch.float64)
    v = torch.randn(n, d + bias, generator=g, dtype=torch.float64)
    exact = ref.sensitivity_matvec(x.contiguous(), p, v, bias=bias)
    assert rel_err(td.sensitivity_matvec(x, p, v, bias=bias), exact) < 1e-12
    got32 = td.sensitivity_matvec(x.float(), p.float(), v.float(), bias=bias)
    assert got32.dtype == torch.float32
    assert rel_err(got32, exact) < 2e-5 * math.sqrt(N)


@pytest.mark.parametrize("n", [3, 8, 20])
def test_matvec_converted_inputs(n):
    g = torch.Generator().manual_seed(n)
    N, d = 300, 37
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    p = torch.randn(N, n, generator=g, dtype=torch.float64)
    v = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    xb, pb = x.bfloat16(), p.bfloat16()
    exact = ref.sensitivity_matvec(xb.double(), pb.double(), v)
    assert rel_err(td.sensitivity_matvec(xb, pb, v.float()), exact) < 2e-5 * math.sqrt(N)
    # float32 inputs accumulated in float64 (the core supports it; the public op does not expose it)
    x32, p32 = x.float(), p.float()
    exact = ref.sensitivity_matvec(x32.double(), p32.double(), v)
    out = torch.full((n, d + 1), float("nan"), dtype=torch.float64)

    def buf(t):
        return (t.data_ptr(), t.numel() * t.element_size())
    lib().sensitivity_matvec("cpu", buf(x32), d, buf(p32), n, buf(v), buf(out), (0, 0), 1, N, d, n, 0, 0, True,
                             0, 1, 2, 0)
    assert rel_err(out, exact) < 1e-12


def test_matvec_exact_on_small_integers():
    # products and sums of small integers are exact in fp32: any lost or doubled term shows
    g = torch.Generator().manual_seed(7)
    for N, d, n in [(300, 40, 9), (17, 64, 33), (520, 3, 1)]:
        x = torch.randint(-3, 4, (N, d), generator=g).float()
        p = torch.randint(-3, 4, (N, n), generator=g).float()
        v = torch.randint(-3, 4, (n, d + 1), generator=g).float()
        exact = ref.sensitivity_matvec(x.double(), p.double(), v.double())
        assert torch.equal(td.sensitivity_matvec(x, p, v).double(), exact)


@pytest.mark.parametrize("n", [9, 17, 30])
def test_blocks_row_blocks_with_prefetch(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randint(-3, 4, (270, 33), generator=g).float()
    p = torch.randint(-3, 4, (270, n), generator=g).float()
    assert torch.equal(td.sensitivity_blocks(x, p).double(), ref.sensitivity_blocks(x.double(), p.double()))
