"""conv sites and ResidualCNN: the finite-difference arbiter (METHOD.md 6, 7), costates, the blocks
against an independent float64 unfold reference, bounded im2col chunks, errors, growth end to end.

Every check compares against float64 finite differences, a float64 reference built here with
torch.nn.functional.unfold + einsum, or the model's own full forward (for forward_from), never the
conv site with itself.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topoderiv
from topoderiv import ops
from topoderiv.growth import Grower, IdentityInsertion, RandomInsertion, TopologicalStrategy
from topoderiv.growth.insertion import insert, insert_block, search_eps
from topoderiv.growth.scoring import score
from topoderiv.method.activations import TDActivation
from topoderiv.method.statistic import kernels_available
from topoderiv.models import ResidualCNN
from topoderiv.sites import conv as conv_mod
from topoderiv.sites import declare, site_at, sites
from topoderiv.sites.capture import capture_all, state_at
from topoderiv.sites.conv import ConvSite, ResidualConvBlock

from _helpers import Shift, assert_untouched, snapshot

BACKENDS = ["torch", pytest.param("kernels", marks=pytest.mark.skipif(not kernels_available(), reason="no _C"))]


def _ce(out, y):
    return F.cross_entropy(out, y)


def _problem(seed, *, in_channels=2, d_out=3, channels=(3, 4), depths=(1, 1), n=6, H=5, W=7, classify=False, **kw):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResidualCNN(in_channels, d_out, channels, depths, **kw).double()
    x = torch.randn(n, in_channels, H, W, generator=g, dtype=torch.float64)
    if classify:
        y = torch.randint(d_out, (n,), generator=g)
    else:
        y = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return model, x, y


def _J(model, x, y, loss_fn=F.mse_loss):
    with torch.no_grad():
        return float(loss_fn(model(x), y))


def _ref_blocks(x, p, k, bias):
    """B_r = sum_s sum_pixels p_{s,r,pixel} patch patch^T, float64, from F.unfold (built independently)."""
    S, n = p.shape[:2]
    cols = F.unfold(x, k, padding=k // 2)  # [S, C k k, L]
    if bias:
        cols = torch.cat([cols, torch.ones(S, 1, cols.shape[2], dtype=cols.dtype)], dim=1)
    return torch.einsum("srl,sil,sjl->rij", p.reshape(S, n, -1), cols, cols)


def _stage_depths(model):
    return [len(s) for s in model.stages]


# ------------------------------------------------------------------------------------------------
# the arbiter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["top", "all"])
@pytest.mark.parametrize("case", [
    dict(seed=1),
    dict(seed=2, kernel_size=1, bias=False, classify=True),
    dict(seed=3, kernel_size=5, H=6, W=6, n=4, depths=(0, 2)),
], ids=["k3-mse", "k1-nobias-ce", "k5-empty-stage"])
def test_finite_difference_arbiter_every_point(backend, rule, case):
    """(J(eps) - J(0)) / (-(eps^2/2) phi^T Q phi) within 1% of 1 at eps = 1e-3 at every point, and
    the error shrinks with eps (it is the O(eps) third-order term)."""
    case = dict(case)
    classify = case.get("classify", False)
    model, x, y = _problem(case.pop("seed"), **case)
    loss_fn = _ce if classify else F.mse_loss
    k = model.kernel_size
    rep = score(model, (x, y), loss_fn, backend=backend, rule=rule)
    n_points = sum(d + 1 for d in _stage_depths(model))
    assert [p.point for p in rep.points] == list(range(n_points))
    assert [p.kind for p in rep.points] == ["conv"] * n_points
    j0 = _J(model, x, y, loss_fn)
    for ps in rep.points:
        c = site_at(model, ps.point).options["channels"]
        assert ps.phi.shape == (c, c * k * k + int(model.bias)) and ps.bias == model.bias
        assert ps.mu > 1e-4, f"mu too small to test at point {ps.point}: {ps.mu}"
        assert float(ps.phi.norm()) == pytest.approx(1.0, abs=1e-12)
        if rule == "top":
            assert ps.quotient == pytest.approx(ps.mu, rel=1e-12)
            assert int((ps.phi.abs().sum(1) > 0).sum()) == 1
        else:
            pos = ps.block_mu.clamp_min(0)
            assert ps.quotient == pytest.approx(float((pos * ps.block_mu).sum() / pos.sum()), rel=1e-8)
        errs = []
        for eps in (1e-2, 1e-3):
            m2 = copy.deepcopy(model)
            insert(m2, ps.point, ps.phi, eps)
            ratio = (_J(m2, x, y, loss_fn) - j0) / (-(eps ** 2 / 2) * ps.quotient)
            errs.append(abs(ratio - 1))
        assert errs[1] < 0.01, f"point {ps.point} ({ps.name}): ratio off by {errs[1]}"
        assert errs[1] < 0.3 * errs[0] + 1e-6, f"point {ps.point}: error does not shrink with eps: {errs}"
    if rule == "all":
        assert any(int((ps.phi.abs().sum(1) > 0).sum()) > 1 for ps in rep.points)


def test_eps_zero_insertion_is_bit_identical_at_every_point():
    model, x, _ = _problem(4, depths=(2, 0))
    with torch.no_grad():
        ref = model(x)
    g = torch.Generator().manual_seed(1)
    names = [s.name for s in sites(model)]
    assert names == ["stages.0.0", "stages.0.1", "stages.0.2", "stages.1.0"]
    for s in sites(model):
        m2 = copy.deepcopy(model)
        c = s.options["channels"]
        phi = torch.randn(c, c * 9 + 1, generator=g, dtype=torch.float64)
        insert(m2, s.point, phi / phi.norm(), 0.0)
        stage = int(s.spec.container.split(".")[1])
        depths = _stage_depths(model)
        depths[stage] += 1
        assert _stage_depths(m2) == depths
        blk = m2.stages[stage][s.index]
        assert isinstance(blk, ResidualConvBlock) and blk.topoderiv_inserted and blk.channels == c
        assert isinstance(blk.activation, TDActivation)
        with torch.no_grad():
            assert torch.equal(m2(x), ref), f"point {s.point}"
    # the parameters of an insertion are eps * phi, reshaped as Conv2d.weight
    m2 = copy.deepcopy(model)
    phi = torch.randn(4, 37, generator=g, dtype=torch.float64)
    insert(m2, "stages.1.0", phi, 0.5)
    blk = m2.stages[1][0]
    assert torch.equal(blk.conv.weight, 0.5 * phi[:, :36].reshape(4, 4, 3, 3))
    assert torch.equal(blk.conv.bias, 0.5 * phi[:, 36])
    h = torch.randn(2, 4, 3, 4, generator=g, dtype=torch.float64)
    direct = F.conv2d(h, 0.5 * phi[:, :36].reshape(4, 4, 3, 3), 0.5 * phi[:, 36], padding=1)
    with torch.no_grad():
        torch.testing.assert_close(blk(h), h + TDActivation()(direct), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# costates and the sensitivity blocks


def test_costates_equal_minus_dJdx_by_finite_differences():
    """Costates at conv sites (two uneven batches, global 1/S) against central differences of J."""
    model, x, y = _problem(5, in_channels=1, channels=(2, 3), depths=(1, 1), n=3, H=5, W=5)
    batches = [(x[:1], y[:1]), (x[1:], y[1:])]
    cap = capture_all(model, batches, F.mse_loss)
    assert cap.loss == pytest.approx(_J(model, x, y), rel=1e-14)

    h = 1e-6
    for point in topoderiv.candidate_points(model):
        st = cap.states[point]
        assert st.dim() == 4
        m2 = copy.deepcopy(model)
        shift = Shift(torch.zeros(st.shape, dtype=torch.float64))
        insert_block(m2, point, shift)
        fd = torch.zeros_like(st)
        flat = shift.delta.view(-1)
        for i in range(flat.numel()):
            vals = []
            for sign in (1, -1):
                flat.zero_()
                flat[i] = sign * h
                vals.append(_J(m2, x, y))
            fd.view(-1)[i] = -(vals[0] - vals[1]) / (2 * h)
        torch.testing.assert_close(cap.costates[point], fd, rtol=1e-6, atol=1e-10)
        assert float(fd.abs().max()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_sensitivity_blocks_match_unfold_reference(backend, k, bias):
    model, x, y = _problem(6, kernel_size=k, bias=bias, n=5, H=5, W=7)
    cap = capture_all(model, (x, y), F.mse_loss)
    rep = score(model, (x, y), F.mse_loss, backend=backend)
    for s, ps in zip(sites(model), rep.points):
        ref = _ref_blocks(cap.states[s.point], cap.costates[s.point], k, bias)
        c = s.options["channels"]
        assert ref.shape == (c, c * k * k + int(bias), c * k * k + int(bias))
        # the statistic's accumulated blocks (route dense: streamed), fed the (already 1/S-scaled) capture
        block = s.new_block()
        st = s.statistic(block, s.check_block(block, "test"), backend=backend, route="dense", k=1, tol=None)
        st.add(cap.states[s.point], cap.costates[s.point])
        assert not st.us and st.held_bytes == 0
        torch.testing.assert_close(st.blocks, ref, rtol=1e-10, atol=1e-13)
        # route auto with the kernels: the images are kept (not their patches), then moved into blocks
        st = s.statistic(block, s.check_block(block, "test"), backend=backend, route="auto", k=1, tol=None)
        st.add(cap.states[s.point], cap.costates[s.point])
        if backend == "kernels":
            assert st.blocks is None and len(st.us) == 1 and st.us[0].shape == cap.states[s.point].shape
            assert st.held_bytes == 2 * cap.states[s.point].numel() * 8  # features + costates (n = C), float64
            st.flush()
            assert not st.us and st.held_bytes == 0
        torch.testing.assert_close(st.blocks, ref, rtol=1e-10, atol=1e-13)
        # score: the top eigenvalue of every block and phi = the top eigenvector of block r*. (With
        # k = 5 the late stage has 5 x 12 rows < m = 101: rank-deficient blocks, a zero cluster.)
        w, v = torch.linalg.eigh(ref)
        torch.testing.assert_close(ps.block_mu, w[:, -1], rtol=1e-8, atol=1e-12)
        assert ps.mu == pytest.approx(float(w[:, -1].max()), rel=1e-10)
        assert ps.block == int(w[:, -1].argmax())
        assert ps.route == ("eigh" if backend == "torch" else ops.choose_conv_route(
            *cap.states[s.point].shape, c, k, bias=bias, itemsize=8))
        assert abs(float(ps.phi[ps.block] @ v[ps.block, :, -1])) == pytest.approx(1.0, abs=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["top", "all"])
def test_streamed_equals_concatenated(backend, rule):
    model, x, y = _problem(7, n=11)
    full = score(model, (x, y), F.mse_loss, backend=backend, rule=rule)
    parts = [(x[:2], y[:2]), (x[2:7], y[2:7]), (x[7:], y[7:])]
    streamed = score(model, parts, F.mse_loss, backend=backend, rule=rule)
    assert streamed.n_batches == 3 and streamed.n_samples == 11
    assert streamed.loss == pytest.approx(full.loss, rel=1e-13)
    for a, b in zip(full.points, streamed.points):
        assert a.block == b.block and b.mu == pytest.approx(a.mu, rel=1e-10)
        torch.testing.assert_close(b.block_mu, a.block_mu, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(b.phi, a.phi, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("k, bias", [(3, True), (5, False)])
def test_im2col_chunks_are_bounded_and_exact(monkeypatch, k, bias):
    """The torch backend's im2col: with the element budget monkeypatched small, every chunk of rows
    has rows * m <= budget (or a single row), the rows cover every pixel once, and blocks and
    scores are unchanged."""
    model, x, y = _problem(8, kernel_size=k, bias=bias, n=5, H=5, W=7)
    cap = capture_all(model, (x, y), F.mse_loss)
    ref_score = score(model, (x, y), F.mse_loss, backend="torch")
    s = sites(model)[1]  # stage 0, 3 channels at 5 x 7
    m = 3 * k * k + int(bias)
    xs, ps_ = cap.states[s.point], cap.costates[s.point]
    ref = _ref_blocks(xs, ps_, k, bias)
    chunks = []
    real = topoderiv.reference.conv_rows

    def recording(u, q, kernel_size, max_rows):
        for cu, cq in real(u, q, kernel_size, max_rows):
            chunks.append((cu.shape, cq.shape))
            yield cu, cq

    monkeypatch.setattr(topoderiv.reference, "conv_rows", recording)
    # budgets: everything at once, 2 whole images, 2 image rows, 3 pixels, under one row (m)
    for budget in (2**40, 2 * 35 * m, 14 * m, 3 * m, m - 1):
        monkeypatch.setattr(conv_mod, "ROW_CHUNK_ELEMENTS", budget)
        sizes = []
        for u, q in conv_mod.im2col_rows(xs, ps_, k, max(1, budget // m)):
            assert u.shape[1] == m - int(bias) and q.shape == (u.shape[0], 3)
            sizes.append(u.shape[0])
        assert sum(sizes) == 5 * 5 * 7
        assert all(r * m <= budget or r == 1 for r in sizes), (budget, sizes)
        if budget < 2**40:
            assert len(sizes) > 1
        # the torch backend's statistic accumulates exactly those chunks (the budget read at call time)
        chunks.clear()
        block = s.new_block()
        st = s.statistic(block, 1.0, backend="torch", route="dense", k=1, tol=None)
        st.add(xs, ps_)
        assert [c[0][0] for c in chunks] == sizes
        torch.testing.assert_close(st.blocks, ref, rtol=1e-10, atol=1e-13)
    monkeypatch.setattr(conv_mod, "ROW_CHUNK_ELEMENTS", 3 * m)
    small = score(model, (x, y), F.mse_loss, backend="torch")
    for a, b in zip(ref_score.points, small.points):
        torch.testing.assert_close(b.block_mu, a.block_mu, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(b.phi, a.phi, rtol=1e-8, atol=1e-10)


def test_default_chunk_budget_bounds_rows():
    """At the default budget a chunk holds several whole images but never all of a large batch."""
    m = 8 * 9 + 1
    x = torch.randn(200, 8, 32, 32, dtype=torch.float64)
    p = torch.randn(200, 8, 32, 32, dtype=torch.float64)
    sizes = [u.shape[0] for u, _ in conv_mod.im2col_rows(x, p, 3, conv_mod.ROW_CHUNK_ELEMENTS // m)]
    assert sum(sizes) == 200 * 32 * 32 and len(sizes) > 1
    assert max(sizes) * m <= conv_mod.ROW_CHUNK_ELEMENTS == 2**22


# ------------------------------------------------------------------------------------------------
# the kernels: fused convolution ops, kept images and the memory budget

KERNELS = pytest.mark.skipif(not kernels_available(), reason="no _C")


@KERNELS
def test_kernels_backend_never_forms_im2col_rows(monkeypatch):
    """With the kernels the statistic calls the convolution ops: the Python im2col is never used."""
    model, x, y = _problem(15, kernel_size=3, n=6)
    torch_rep = score(model, (x, y), F.mse_loss, backend="torch")

    def forbidden(*args, **kwargs):
        raise AssertionError("im2col rows formed in Python")

    monkeypatch.setattr(topoderiv.reference, "conv_rows", forbidden)
    calls = {"blocks": 0, "topk": 0}
    for name in calls:
        real = getattr(ops, f"conv_sensitivity_{name}")

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, f"conv_sensitivity_{name}", counting)
    for route in ("auto", "dense", "matfree"):
        rep = score(model, (x, y), F.mse_loss, backend="kernels", route=route)
        for a, b in zip(torch_rep.points, rep.points):
            assert b.mu == pytest.approx(a.mu, rel=1e-9)
            torch.testing.assert_close(b.block_mu, a.block_mu, rtol=1e-8, atol=1e-12)
            assert b.route == route if route != "auto" else b.route in ("dense", "matfree")
    assert calls["blocks"] > 0 and calls["topk"] > 0


@KERNELS
def test_images_are_kept_within_the_memory_budget_then_streamed():
    """Route auto keeps each batch's images while 2 x held <= memory_budget (the scorer's rule for
    rows), solves them with the conv cost model's route, else moves them into dense blocks; every
    way gives the torch backend's answer."""
    model, x, y = _problem(16, kernel_size=5, n=12, H=6, W=6, channels=(3, 3), depths=(1, 0))
    batches = [(x[i:i + 3], y[i:i + 3]) for i in range(0, 12, 3)]
    ref_rep = score(model, batches, F.mse_loss, backend="torch")
    per_batch = 2 * 3 * 3 * 6 * 6 * 8  # features + costates of one batch at one point, float64
    n_points = len(ref_rep.points)
    big = score(model, batches, F.mse_loss, backend="kernels", memory_budget=2**30)
    assert all(p.route == "matfree" for p in big.points)  # m = 76, 432 rows: matrix-free is cheaper
    # room for two batches of every point (2 x held <= budget): the third batch flushes
    small = score(model, batches, F.mse_loss, backend="kernels", memory_budget=2 * 2 * n_points * per_batch)
    assert all(p.route == "dense" for p in small.points)
    none = score(model, batches, F.mse_loss, backend="kernels", memory_budget=0)
    assert all(p.route == "dense" for p in none.points)
    for rep in (big, small, none):
        for a, b in zip(ref_rep.points, rep.points):
            assert b.block == a.block and b.mu == pytest.approx(a.mu, rel=1e-9)
            torch.testing.assert_close(b.block_mu, a.block_mu, rtol=1e-8, atol=1e-12)
            assert abs(float((b.phi * a.phi).sum())) == pytest.approx(1.0, abs=1e-8)


@KERNELS
def test_feature_map_chunks_and_float32_matfree(monkeypatch):
    """A non-identity feature map is applied in chunks of samples (the kept images are its outputs);
    a float32 model's matrix-free solve (warm-started, tol 1e-3) agrees with float64 eigh."""
    torch.manual_seed(0)

    class Scale(nn.Module):
        def forward(self, h):
            return 2 * torch.tanh(h)

    model = _Body([ResidualConvBlock(4), ResidualConvBlock(4)])
    declare(model, "body", "conv", channels=4, feature=Scale())
    x = torch.randn(10, 4, 6, 5)
    y = torch.randn(10, 4)
    monkeypatch.setattr(conv_mod, "ROW_CHUNK_ELEMENTS", 3 * 4 * 6 * 5)  # three samples per chunk
    cap = capture_all(model, (x, y), F.mse_loss)
    rep = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree")
    for s, ps in zip(sites(model), rep.points):
        u = 2 * torch.tanh(cap.states[s.point]).double()
        w = torch.linalg.eigvalsh(_ref_blocks(u, cap.costates[s.point].double(), 3, True))[:, -1]
        assert ps.route == "matfree" and ps.converged
        assert abs(ps.mu - float(w.max())) <= 2e-4 * float(w.abs().max())
        torch.testing.assert_close(ps.block_mu.double(), w, rtol=0, atol=2e-3 * float(w.abs().max()))


@KERNELS
@pytest.mark.parametrize("C, H, W", [(8, 6, 7), (16, 6, 7), (16, 1, 1)])
def test_conv_subspace_start_equals_the_rows_warm_start(monkeypatch, C, H, W):
    """conv_subspace_start (no patch-size tensor) is subspace_start on the explicit im2col rows; with
    the Gram matrix estimated from a subset of the samples it is still a good start. m = 73: the
    exact eigh of the patches' Gram; m = 145: the randomized subspace iteration, which applies the
    Gram by two convolutions on the conv side and as a matrix on the rows side (the same seeded
    iteration, so the same basis); 1x1 images: 8 of the 9 taps are zero in every patch, solved on
    the 17 features of the support."""
    from topoderiv.method import statistic
    from topoderiv.method.statistic import subspace_start
    m = C * 9 + 1
    assert (m > statistic.RANDOMIZED_MIN_FACTOR * (statistic.WARM_RANK + statistic.BASIS_OVERSAMPLE)) == (C == 16)
    N = 4 if H > 1 else 64  # 1x1 images: more samples than support features (no degenerate top pair)
    g = torch.Generator().manual_seed(3)
    u = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) / torch.arange(1, C + 1, dtype=torch.float64)[:, None, None]
    q = torch.randn(N, 5, H, W, generator=g, dtype=torch.float64)
    rows_u, rows_q = next(conv_mod.im2col_rows(u, q, 3, 10**9))
    a = conv_mod.conv_subspace_start(u, q, 3, True)
    b = subspace_start(rows_u, rows_q, True)
    noise = torch.randn(a.shape, generator=torch.Generator().manual_seed(0), dtype=a.dtype)
    noise = 0.01 * noise / noise.norm(dim=1, keepdim=True)
    a, b = a - noise, b - noise  # the projected top eigenvectors (unit norm), up to sign
    cos = (a * b).sum(1).abs() / (a.norm(dim=1) * b.norm(dim=1))
    assert (cos > 1 - 1e-6).all(), cos
    # and it is a good start: the matrix-free solve from it takes fewer steps than a cold one
    cold = torch.ops.topoderiv.conv_sensitivity_lanczos(u, q, 3, True, 1, m, 1e-8, 0)
    warm = torch.ops.topoderiv.conv_sensitivity_lanczos(u, q, 3, True, 1, m, 1e-8, 0, conv_mod.conv_subspace_start(u, q, 3, True))
    assert torch.allclose(warm[0], cold[0], rtol=1e-7)
    assert warm[3].double().mean() < cold[3].double().mean()
    monkeypatch.setattr(conv_mod, "GRAM_ROWS", 50)  # 168 rows: every 4th sample, one image (1x1: every 2nd)
    sub = conv_mod.conv_subspace_start(u, q, 3, True)
    assert not torch.allclose(sub, conv_mod.conv_subspace_start(u[:1], q[:1], 3, True))
    part = torch.ops.topoderiv.conv_sensitivity_lanczos(u, q, 3, True, 1, m, 1e-8, 0, sub)
    assert torch.allclose(part[0], cold[0], rtol=1e-7)
    assert part[3].double().mean() < cold[3].double().mean()


# ------------------------------------------------------------------------------------------------
# the model: forward_from, eps search, config


def test_forward_from_equals_the_full_forward_on_concatenated_batches():
    model, x, _ = _problem(9, depths=(2, 0))
    with torch.no_grad():
        ref = model(x)
        for s in sites(model):
            h = state_at(model, x, s.point)
            torch.testing.assert_close(model.forward_from(s.point, h), ref, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(model.forward_from(s.name, h), ref, rtol=1e-14, atol=1e-14)
            two = model.forward_from(s.point, torch.cat([h, 2 * h, h], dim=0))
            torch.testing.assert_close(two[: len(x)], ref, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(two[2 * len(x):], ref, rtol=1e-14, atol=1e-14)
            torch.testing.assert_close(two[len(x): 2 * len(x)], model.forward_from(s.point, 2 * h))


class _Wrapped(nn.Module):
    """The same network without forward_from: the eps search must take the full-model fallback."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)


def test_search_eps_suffix_matches_full_model_fallback():
    model, x, y = _problem(10, n=8)
    wrapped = _Wrapped(copy.deepcopy(model))
    for i, spec in enumerate(model.site_specs()):
        declare(wrapped, f"net.stages.{i}", "conv", **spec.options)
    assert not hasattr(wrapped, "forward_from")
    rep = score(model, (x, y), F.mse_loss, backend="torch")
    calls = []
    real = model.forward_from

    def counting(point, h):
        calls.append((point, h.shape[0]))
        return real(point, h)

    model.forward_from = counting
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    grid = (0.05, 0.2, 0.5, -0.5, 1.0)
    for ps in rep.points:
        calls.clear()
        eps_a, la = search_eps(model, ps.point, ps.phi, data, F.mse_loss, grid)
        eps_b, lb = search_eps(wrapped, ps.point, ps.phi, data, F.mse_loss, grid)
        assert calls and all(p == ps.point for p, _ in calls)
        assert sorted(b for _, b in calls) == [3 * 6, 5 * 6]  # one batched suffix pass per batch, 6 eps
        assert la.keys() == lb.keys() and eps_a == eps_b
        for e in la:
            assert la[e] == pytest.approx(lb[e], rel=1e-12, abs=1e-15)
        assert la[0.0] == pytest.approx(_J(model, x, y), rel=1e-13)
    del model.forward_from
    assert_untouched(model, snapshot(wrapped.net))


def test_config_rebuilds_the_grown_architecture():
    model, x, y = _problem(11, depths=(0, 1), kernel_size=3, bias=False, activation="relu",
                           insert_activation=TDActivation())
    rep = score(model, (x, y), F.mse_loss, backend="torch")
    insert(model, rep.points[0].point, rep.points[0].phi, 0.3)
    insert(model, "stages.1.1", rep.points[-1].phi, 0.2)
    cfg = model.config()
    assert cfg["depths"] == [1, 2] and cfg["channels"] == [3, 4] and cfg["activation"] == "relu"
    import json

    cfg = json.loads(json.dumps(cfg))
    rebuilt = ResidualCNN(**cfg).double()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    blk = model.stages[1][1]
    copy_blk = ResidualConvBlock(**json.loads(json.dumps(blk.config()))).double()
    copy_blk.load_state_dict(blk.state_dict())
    h = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(copy_blk(h), blk(h))
    assert topoderiv.registry.lookup("ResidualCNN") is ResidualCNN
    assert topoderiv.registry.lookup("ResidualConvBlock") is ResidualConvBlock
    nb = model.new_block(2)
    assert isinstance(nb, ResidualConvBlock) and nb.channels == 4 and nb.conv.weight.dtype == torch.float64
    assert float(nb.conv.weight.detach().abs().sum()) == 0


def test_random_phi_and_identity_block():
    model, x, y = _problem(12)
    s = site_at(model, "stages.1.0")
    g = torch.Generator().manual_seed(0)
    phi = s.random_phi(s.build_block(), g, 0.5)
    assert phi.shape == (4, 37) and phi.dtype == torch.float32
    assert float(phi.std()) == pytest.approx(0.5 / math.sqrt(36), rel=0.25)
    blk = s.identity_block(g)
    assert isinstance(blk, ResidualConvBlock) and isinstance(blk.activation, nn.Tanh)
    m2 = copy.deepcopy(model)
    insert_block(m2, s.point, blk.double())
    with torch.no_grad():
        assert torch.equal(m2(x), model(x))
    F.mse_loss(m2(x), y).backward()
    assert float(blk.conv.weight.grad.abs().max()) > 0  # trainable at first order


# ------------------------------------------------------------------------------------------------
# errors


class _Body(nn.Module):
    def __init__(self, mods):
        super().__init__()
        self.body = nn.Sequential(*mods)

    def forward(self, x):
        return self.body(x).mean(dim=(-2, -1))


def test_container_with_a_downsampling_block_is_rejected_untouched():
    torch.manual_seed(0)
    for down in (nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Conv2d(3, 4, 3, padding=1)):
        model = _Body([ResidualConvBlock(3), down, ResidualConvBlock(down.out_channels)]).double()
        declare(model, "body", "conv", channels=3)
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        y = torch.randn(4, down.out_channels, dtype=torch.float64)
        snap = ([len(model.body)], {k: v.clone() for k, v in model.state_dict().items()})
        with pytest.raises(ValueError, match=r"site container 'body' of _Body must hold residual blocks of one "
                                             r"stream shape.*downsampling"):
            score(model, (x, y), F.mse_loss)
        assert len(model.body) == snap[0][0]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in snap[1].items())


def test_stream_layout_errors():
    torch.manual_seed(0)
    # a 2-D stream (a linear stack declared as conv)
    flat = _Body([])
    flat.forward = lambda x: flat.body(x)
    declare(flat, "body", "conv", channels=3)
    with pytest.raises(ValueError, match=r"score: a conv site \('body.0'\) of _Body needs a stream \[B, C, H, W\] "
                                         r"with C = 3 channels, got shape \[5, 3\]"):
        score(flat, (torch.randn(5, 3), torch.randn(5, 3)), F.mse_loss)
    # channels mismatch
    model = _Body([ResidualConvBlock(3)])
    declare(model, "body", "conv", channels=5)
    with pytest.raises(ValueError, match=r"needs a stream \[B, C, H, W\] with C = 5 channels, got shape \[2, 3, 4, 4\]"):
        score(model, (torch.randn(2, 3, 4, 4), torch.randn(2, 3)), F.mse_loss)
    # an even kernel size declared on a site, and bad options
    model = _Body([ResidualConvBlock(3)])
    declare(model, "body", "conv", channels=3, kernel_size=4)
    with pytest.raises(ValueError, match=r"conv site 'body.0' of _Body: option kernel_size must be an odd int"):
        score(model, (torch.randn(2, 3, 4, 4), torch.randn(2, 3)), F.mse_loss)
    model = _Body([ResidualConvBlock(3)])
    declare(model, "body", "conv", channels="3")
    with pytest.raises(ValueError, match=r"option channels must be an int >= 1, got '3'"):
        insert(model, 0, torch.zeros(3, 28), 0.1)
    # a feature map that changes the shape
    model = _Body([ResidualConvBlock(3)])
    declare(model, "body", "conv", channels=3, feature=nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match=r"feature map of the new block at conv site 'body.0' must keep the stream's "
                                         r"shape"):
        score(model, (torch.randn(2, 3, 5, 5), torch.randn(2, 3)), F.mse_loss)


def test_constructor_errors():
    for bad in (2, 0, -1, 3.0, True):
        with pytest.raises(ValueError, match=r"ResidualConvBlock: kernel_size must be an odd int >= 1"):
            ResidualConvBlock(3, bad)
    with pytest.raises(ValueError, match=r"ResidualConvBlock: channels must be an int >= 1, got 0"):
        ResidualConvBlock(0)
    with pytest.raises(ValueError, match=r"ResidualConvBlock: feature must be .*LayerNorm normalises the LAST dim"):
        ResidualConvBlock(3, feature="layernorm")
    with pytest.raises(ValueError, match=r"ResidualCNN: kernel_size must be an odd int >= 1 \(same padding\), got 4"):
        ResidualCNN(1, 2, kernel_size=4)
    with pytest.raises(ValueError, match=r"ResidualCNN: channels and depths must have one entry per stage, got 2 "
                                         r"channels \[3, 4\] and 1 depths \[1\]"):
        ResidualCNN(1, 2, (3, 4), (1,))
    with pytest.raises(ValueError, match=r"ResidualCNN: depths must be a non-empty list/tuple of ints >= 0"):
        ResidualCNN(1, 2, (3,), (-1,))
    with pytest.raises(ValueError, match=r"ResidualCNN: in_channels must be an int >= 1, got 0"):
        ResidualCNN(0, 2)
    model = ResidualCNN(1, 2, (3,), (1,))
    with pytest.raises(ValueError, match=r"ResidualCNN.new_block: point must be an int in \[0, 1\] or a site name, "
                                         r"got 2"):
        model.new_block(2)


def test_inadmissible_activation_and_failed_inserts_leave_the_model_untouched():
    model, x, y = _problem(13, insert_activation="tanh")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"score: the block a conv site \('stages.0.0'\) of ResidualCNN would "
                                         r"insert is not function preserving.*Tanh is not admissible"):
        score(model, (x, y), F.mse_loss)
    with pytest.raises(ValueError, match="Tanh is not admissible"):
        insert(model, 1, torch.zeros(3, 28, dtype=torch.float64), 0.1)
    assert_untouched(model, snap)

    model, x, y = _problem(14)
    snap = snapshot(model)
    good = torch.randn(3, 28, dtype=torch.float64)
    nan = good.clone()
    nan[1, 2] = float("nan")
    cases = [
        (0, torch.randn(3, 27, dtype=torch.float64), 0.1, ValueError, r"phi must have shape \[n, m\] = \[3, 28\]"),
        (2, good, 0.1, ValueError, r"phi must have shape \[n, m\] = \[4, 37\]"),
        (0, nan, 0.1, ValueError, "phi must contain only finite values"),
        (0, good.numpy(), 0.1, TypeError, "phi must be a torch.Tensor"),
        (0, good.long(), 0.1, TypeError, "phi must be a floating-point tensor"),
        (0, good, float("inf"), ValueError, "eps must be a finite real number"),
        (0, good * 1e300, 1e300, ValueError, "overflows"),
        (7, good, 0.1, ValueError, r"point must be an int candidate point in \[0, 3\]"),
        ("stages.2.0", good, 0.1, ValueError, "point must be a site name"),
    ]
    for point, phi, eps, err, msg in cases:
        with pytest.raises(err, match=msg):
            insert(model, point, phi, eps)
        assert_untouched(model, snap)


# ------------------------------------------------------------------------------------------------
# growth end to end


def _image_task(seed, n):
    """Two classes of 1 x 6 x 6 images: a blob in the left or the right half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, 6, 6, generator=g)
    cols = torch.arange(6)
    left = (cols < 3).float()
    mask = torch.where(y[:, None] == 0, left, 1 - left)  # [n, 6]
    x = x + mask[:, None, None, :] * torch.linspace(0.5, 1.5, 6)[None, None, :, None]
    return x, y


@pytest.mark.parametrize("strategy", [
    TopologicalStrategy(rule="top"), TopologicalStrategy(rule="all"), RandomInsertion(), IdentityInsertion(),
], ids=["topological-top", "topological-all", "random", "identity"])
def test_growth_end_to_end(strategy):
    x, y = _image_task(0, 96)
    xv, yv = _image_task(1, 32)
    train = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    torch.manual_seed(0)
    model = ResidualCNN(1, 2, (3, 4), (1, 1))
    events = []

    def before_apply(grower, proposal, _apply=Grower.apply):
        s = site_at(grower.model, proposal.point)
        events.append((int(s.spec.container.split(".")[1]), s.index, _stage_depths(grower.model)))
        return _apply(grower, proposal)

    g = Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), train, (xv, yv), _ce, strategy=strategy,
               epochs_per_round=1, initial_epochs=3, max_rounds=2, patience=10, progress=False, seed=0)
    g.apply = lambda proposal: before_apply(g, proposal)
    hist = g.run()
    assert len(hist.insertions) == 2 and len(events) == 2, hist.meta.get("stop_reason")
    assert sum(_stage_depths(model)) == 4
    for (stage, index, depths), rec in zip(events, hist.insertions):
        assert rec.depth == sum(depths) + 1
    # every inserted block is a ResidualConvBlock of its stage's width, at the proposed place
    inserted = [(i, j, b) for i, st in enumerate(model.stages) for j, b in enumerate(st)
                if getattr(b, "topoderiv_inserted", False)]
    assert len(inserted) == 2
    expected = {(st, ix) for st, ix, _ in events}
    # the second insertion can shift the first one's index within the same stage
    if events[0][0] == events[1][0] and events[1][1] <= events[0][1]:
        expected = {(events[0][0], events[0][1] + 1), events[1][:2]}
    assert {(i, j) for i, j, _ in inserted} == expected
    for i, _, b in inserted:
        assert isinstance(b, ResidualConvBlock) and b.channels == model.channels[i]
        assert isinstance(b.activation, nn.Tanh if isinstance(strategy, IdentityInsertion) else TDActivation)
    if isinstance(strategy, TopologicalStrategy):
        live = [rec.info["live_rows"] for rec in hist.insertions]
        assert all(v == 1 for v in live) if strategy.rule == "top" else any(v > 1 for v in live)
        for rec in hist.insertions:
            assert rec.eps is not None and rec.info["actual_change"] < 0
    with torch.no_grad():
        assert torch.isfinite(model(xv)).all()
    assert model.config()["depths"] == _stage_depths(model)
