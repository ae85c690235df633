"""Mixed precision: bfloat16 models, float16 rows and torch.autocast are scored and grown.

- mu of a bfloat16 copy of a model (every site kind: linear, conv, tokens, transformer block; both
  backends, both routes) is within bfloat16 tolerance (2 eps_bf16, relative) of the float32 model's,
  which is itself within 1e-5 of a float64 reference; the same under ``torch.autocast``;
- the statistics accumulate in float32 whatever the model: the blocks of bfloat16 rows equal a
  float64 sum of the same rows to float32 round-off (a bfloat16 accumulator would be ~1e-2 off);
- the inserted block takes the model's dtype (bfloat16 model: bfloat16 block; autocast over a
  float32 model: float32 block), and growth runs end to end in both.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import topoderiv as td
from topoderiv.method.statistic import EigenStatistic, kernels_available
from topoderiv.models import ResidualCNN, ResidualMLP, ViT

pytestmark = [pytest.mark.skipif(not kernels_available(), reason="no _C"),
              pytest.mark.usefixtures("one_thread")]  # conftest.py

BF16_TOL = 2 * torch.finfo(torch.bfloat16).eps  # 1.6 %: two units of bfloat16 rounding, relative


def _mlp_problem():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ResidualMLP(8, 64, 4, 3)
    x = torch.randn(512, 8, generator=g)
    y = torch.tanh(x[:, :4] * 2)
    return model, x, y


def _images(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def _models():
    torch.manual_seed(1)
    cnn = ResidualCNN(3, 4, (8,), (2,))
    torch.manual_seed(2)
    block = ViT(8, 4, 3, 4, 32, 2, 2, insert="transformer_block")
    torch.manual_seed(2)
    tokens = ViT(8, 4, 3, 4, 32, 2, 2, insert="tokens")
    return {"cnn": cnn, "vit_block": block, "vit_tokens": tokens}


def _rel(a, b):
    return max(abs(p.mu - q.mu) / abs(q.mu) for p, q in zip(a.points, b.points))


@pytest.mark.parametrize("backend", ["kernels", "torch"])
@pytest.mark.parametrize("route", ["dense", "matfree"])
def test_bf16_mlp_mu_within_bf16_tolerance_of_fp32(backend, route):
    model, x, y = _mlp_problem()
    ref = td.score(copy.deepcopy(model).double(), (x.double(), y.double()), F.mse_loss, backend="torch")
    r32 = td.score(model, (x, y), F.mse_loss)
    assert _rel(r32, ref) < 1e-5
    bf = copy.deepcopy(model).bfloat16()
    rb = td.score(bf, (x.bfloat16(), y.bfloat16()), F.mse_loss, backend=backend, route=route)
    assert _rel(rb, r32) < BF16_TOL
    for p, q in zip(rb.points, r32.points):
        assert p.values.dtype == torch.float32 and p.phi.dtype == torch.float32  # fp32 statistics
        assert p.mu > 0 and p.converged
        # the direction too: the top block's eigenvector within bfloat16 accuracy
        if p.block == q.block:
            assert float(torch.dot(p.phi[p.block], q.phi[q.block]).abs()) > 1 - 10 * BF16_TOL


@pytest.mark.parametrize("kind", ["cnn", "vit_block", "vit_tokens"])
def test_bf16_conv_and_transformer_sites_within_bf16_tolerance(kind):
    x, y = _images()
    model = _models()[kind]
    r32 = td.score(model, (x, y), F.cross_entropy, rule="all")
    rb = td.score(copy.deepcopy(model).bfloat16(), (x.bfloat16(), y), F.cross_entropy, rule="all")
    assert _rel(rb, r32) < BF16_TOL
    for p in rb.points:
        assert p.values.dtype == torch.float32


def test_autocast_scoring_within_bf16_tolerance():
    model, x, y = _mlp_problem()
    r32 = td.score(model, (x, y), F.mse_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ra = td.score(model, (x, y), F.mse_loss)
    assert _rel(ra, r32) < BF16_TOL
    assert 0 < _rel(ra, r32)  # really computed in bfloat16
    assert all(p.values.dtype == torch.float32 for p in ra.points)


def test_float16_rows_are_widened_to_float32():
    """The kernels take float32/float64/bfloat16: float16 rows (CUDA autocast's dtype) are widened."""
    model, x, y = _mlp_problem()
    r32 = td.score(model, (x, y), F.mse_loss)
    rh = td.score(copy.deepcopy(model).half(), (x.half(), y.half()), F.mse_loss)
    assert _rel(rh, r32) < 2 * torch.finfo(torch.float16).eps * 10


@pytest.mark.parametrize("backend", ["kernels", "torch"])
def test_statistics_accumulate_in_float32(backend):
    """bf16 rows: every product p x x of bf16 numbers is exact in float32, so float32 accumulation
    matches a float64 sum to ~1e-6; a bfloat16 accumulator would be off by ~1e-2."""
    g = torch.Generator().manual_seed(3)
    u = torch.randn(4000, 12, generator=g).bfloat16()
    q = torch.randn(4000, 5, generator=g).bfloat16()

    def rows(x, p):
        yield x, p

    st = EigenStatistic(rows, 5, 12, True, 1.0, backend=backend, route="dense", collect=False, k=1, tol=None)
    for i in range(0, 4000, 1000):  # streamed over 4 batches
        st.add(u[i:i + 1000], q[i:i + 1000])
    assert st.blocks.dtype == torch.float32
    xt = torch.cat([u.double(), torch.ones(4000, 1, dtype=torch.float64)], dim=1)
    ref = torch.einsum("sr,si,sj->rij", q.double(), xt, xt)
    err = float((st.blocks.double() - ref).abs().max() / ref.abs().max())
    assert err < 1e-5


def test_bf16_model_grows_with_bf16_blocks():
    model, x, y = _mlp_problem()
    bf = copy.deepcopy(model).bfloat16()
    train = [(x[i:i + 128].bfloat16(), y[i:i + 128].bfloat16()) for i in range(0, 384, 128)]
    val = [(x[384:].bfloat16(), y[384:].bfloat16())]
    best = td.score(bf, train, F.mse_loss, rule="all").best
    eps, losses = td.search_eps(bf, best.point, best.phi, train, F.mse_loss)
    assert eps is not None and losses[eps] < losses[0.0]
    hist = td.grow(bf, torch.optim.Adam(bf.parameters(), 1e-3), train, val, F.mse_loss,
                   strategy=td.TopologicalStrategy(rule="all"), epochs_per_round=1, max_rounds=1, patience=5,
                   progress=False)
    assert len(hist.insertions) == 1
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())  # the new block too
    assert len(bf.blocks) == 4
    new = bf.blocks[hist.insertions[0].point]
    assert any(float(p.detach().abs().sum()) > 0 for p in new.parameters())


def test_growth_under_autocast_inserts_float32_blocks():
    model, x, y = _mlp_problem()
    train = [(x[i:i + 128], y[i:i + 128]) for i in range(0, 384, 128)]
    val = [(x[384:], y[384:])]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hist = td.grow(model, torch.optim.Adam(model.parameters(), 1e-3), train, val, F.mse_loss,
                       strategy=td.TopologicalStrategy(rule="all"), epochs_per_round=1, max_rounds=1, patience=5,
                       progress=False)
    assert len(hist.insertions) == 1 and len(model.blocks) == 4
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
