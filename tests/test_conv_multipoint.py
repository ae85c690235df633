"""The scorer batches conv points: solve_points sends the kept images of every conv site of one
(route, k, tolerance, warm start, kernel, dtype) through ONE multi-point conv_sensitivity_topk call,
with the single-point solve's warm start, tolerances, eigh fallback and need handling.

References: the same statistics solved one point at a time (each ConvStatistic's own solve, the
path whose correctness tests/test_conv_site.py checks against finite differences and float64
unfold blocks), and float64 eigvalsh of unfold blocks built here.
"""
import pytest
import torch
import torch.nn.functional as F

from topoderiv import ops
from topoderiv.growth import scoring
from topoderiv.growth.scoring import score
from topoderiv.method import statistic
from topoderiv.method.statistic import kernels_available
from topoderiv.models import ResidualCNN
from topoderiv.sites import conv as conv_mod
from topoderiv.sites import sites
from topoderiv.sites.capture import capture_all

pytestmark = pytest.mark.skipif(not kernels_available(), reason="no _C")


def _model(seed, dtype=torch.float64, channels=(4, 4), depths=(2, 1), kernel_size=3, n=6, H=6, W=7):
    """A ResidualCNN with sum(depths) + len(depths) conv points (stage 0's of one shape)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResidualCNN(2, 3, channels, depths, kernel_size=kernel_size).to(dtype)
    # non-zero blocks, so that the points' statistics differ
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=dtype))
    x = torch.randn(n, 2, H, W, generator=g, dtype=dtype)
    y = torch.randn(n, 3, generator=g, dtype=dtype)
    return model, x, y


def _one_by_one(stats, S, rule, need="all"):
    """What solve_points must equal: every statistic solved by itself."""
    return [st.solve(S, rule, need) for st in stats]


def _count_conv_calls(monkeypatch):
    calls = []
    real = ops.conv_sensitivity_topk

    def counting(x, p, *args, **kw):
        calls.append((len(x) if isinstance(x, (list, tuple)) else 1, kw.get("need", "all"), kw.get("route")))
        return real(x, p, *args, **kw)

    monkeypatch.setattr(ops, "conv_sensitivity_topk", counting)
    return calls


def _same(a, b, rtol):
    assert [p.point for p in a.points] == [p.point for p in b.points]
    for pa, pb in zip(a.points, b.points):
        assert pa.block == pb.block and pa.route == pb.route and pa.converged == pb.converged
        assert pa.mu == pytest.approx(pb.mu, rel=rtol)
        torch.testing.assert_close(pa.block_mu, pb.block_mu, rtol=rtol, atol=rtol * abs(pb.mu))
        torch.testing.assert_close(pa.values, pb.values, rtol=rtol, atol=rtol * abs(pb.mu))
        assert abs(float((pa.phi.double() * pb.phi.double()).sum())) == pytest.approx(1.0, abs=100 * rtol)
        assert pa.quotient == pytest.approx(pb.quotient, rel=rtol)
        assert (pa.bounds is None) == (pb.bounds is None)
        if pa.bounds is not None:
            assert torch.equal(pa.bounds, pb.bounds)


def _reference_mu(model, x, y):
    """float64 eigvalsh of every point's unfold blocks (costates carry the mean loss): lambda_max per block."""
    cap = capture_all(model, (x, y), F.mse_loss)
    out = []
    for s in sites(model):
        u, q = cap.states[s.point].double(), cap.costates[s.point].double()
        N, n = q.shape[:2]
        cols = F.unfold(u, 3, padding=1)
        cols = torch.cat([cols, torch.ones(N, 1, cols.shape[2], dtype=cols.dtype)], dim=1)
        blocks = torch.einsum("srl,sil,sjl->rij", q.reshape(N, n, -1), cols, cols)
        out.append(torch.linalg.eigvalsh(blocks)[:, -1])
    return out


@pytest.mark.parametrize("route", ["matfree", "dense", "auto"])
@pytest.mark.parametrize("rule", ["top", "all"])
def test_score_batches_conv_points_and_equals_one_by_one(route, rule, monkeypatch):
    model, x, y = _model(0)
    assert len(sites(model)) == 5  # stage 0: three points of one shape; stage 1: two of another
    calls = _count_conv_calls(monkeypatch)
    batched = score(model, (x, y), F.mse_loss, backend="kernels", route=route, rule=rule)
    # kept images: ONE multi-point call per route (the op groups the shapes inside it): "matfree"
    # keeps all five points' images; "auto" keeps them and picks dense for stage 0 (6 x 7 pixels)
    # and matrix-free for stage 1 (3 x 4); "dense" never keeps images (streamed dense blocks, one
    # grouped lanczos_topk per shape)
    routes = [p.route for p in batched.points]
    if route == "auto":
        assert routes == ["dense"] * 3 + ["matfree"] * 2
    assert all(r == route for r in routes) or route == "auto"
    expected = [] if route == "dense" else sorted((routes.count(r), r) for r in set(routes))
    assert sorted((c[0], c[2]) for c in calls) == expected, calls
    calls.clear()
    monkeypatch.setattr(scoring, "solve_points", _one_by_one)
    single = score(model, (x, y), F.mse_loss, backend="kernels", route=route, rule=rule)
    assert len(calls) == (0 if route == "dense" else 5) and all(c[0] == 1 for c in calls), calls
    _same(batched, single, 1e-9)
    for ps, w in zip(batched.points, _reference_mu(model, x, y)):
        assert ps.converged and ps.mu == pytest.approx(float(w.max()) * ps.sigma2, rel=1e-8)
        assert ps.block == int(w.argmax())


def test_need_top_reaches_conv_points_batched_and_one_by_one(monkeypatch):
    # wider channels: more blocks per point, most of which stop early under need="top". A fixed
    # seed whose points the shared driver's need=top gets right: on about 1 point in 20 of these
    # models it stops the winning block early (test_need_top_misses_winners_known_driver_bug)
    model, x, y = _model(2, channels=(6, 6), depths=(2, 1))
    calls = _count_conv_calls(monkeypatch)
    full = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree", rule="top")
    top = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree", rule="top", need="top")
    assert [c[1] for c in calls] == ["all", "top"] and all(c[0] == 5 for c in calls), calls
    assert any(p.bounds is not None and bool(p.bounds.any()) for p in top.points), "need='top' stopped nothing"
    for pf, pt in zip(full.points, top.points):
        assert pt.block == pf.block and pt.mu == pytest.approx(pf.mu, rel=1e-9)
        assert abs(float((pt.phi * pf.phi).sum())) == pytest.approx(1.0, abs=1e-8)
        if pt.bounds is not None:  # early blocks: lower bounds of their values
            assert (pt.block_mu[pt.bounds] <= pf.block_mu[pt.bounds] * (1 + 1e-9) + 1e-12).all()
            assert not bool(pt.bounds[pt.block])
    # the rules that need every block ignore need="top"
    calls.clear()
    score(model, (x, y), F.mse_loss, backend="kernels", route="matfree", rule="all", need="top")
    assert [c[1] for c in calls] == ["all"]
    # and one point at a time: the same answer, need="top" passed to each single-point call
    calls.clear()
    monkeypatch.setattr(scoring, "solve_points", _one_by_one)
    single = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree", rule="top", need="top")
    assert [c[1] for c in calls] == ["top"] * 5
    _same(top, single, 1e-9)


def test_float32_warm_start_and_eigh_fallback_equal_one_by_one(monkeypatch):
    # m = 8 * 9 + 1 = 73 >= WARM_MIN_M: matrix-free solves start from conv_subspace_start (tol 1e-3)
    model, x, y = _model(2, dtype=torch.float32, channels=(8, 8), depths=(2, 0), H=5, W=5)
    starts = []
    real = conv_mod.conv_subspace_start
    monkeypatch.setattr(conv_mod, "conv_subspace_start", lambda *a, **kw: starts.append(1) or real(*a, **kw))
    batched = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree")
    assert len(starts) == 4
    monkeypatch.setattr(scoring, "solve_points", _one_by_one)
    single = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree")
    _same(batched, single, 1e-5)
    # Lanczos capped at 3 steps: no block converges, and eigh redoes them all (float64 blocks of the
    # same images, within the flops budget); batched and one by one agree, and with the reference
    monkeypatch.undo()
    monkeypatch.setattr(ops, "_default_steps", lambda m, k: max(k, 3))
    fallbacks = []
    real_eigh = statistic.reference.eigh_topk
    monkeypatch.setattr(statistic.reference, "eigh_topk", lambda b, k: fallbacks.append(b.shape[0]) or real_eigh(b, k))
    capped = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree")
    assert sum(fallbacks) == 4 * 8, fallbacks  # every block of every point
    monkeypatch.setattr(scoring, "solve_points", _one_by_one)
    capped_single = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree")
    _same(capped, capped_single, 1e-6)
    for ps, w in zip(capped.points, _reference_mu(model.double(), x.double(), y.double())):
        assert ps.converged and ps.block == int(w.argmax())
        assert ps.mu == pytest.approx(float(w.max()) * ps.sigma2, rel=1e-4)


def test_byte_cap_splits_the_batched_calls(monkeypatch):
    model, x, y = _model(3)
    ref = score(model, (x, y), F.mse_loss, backend="kernels", route="auto")
    calls = _count_conv_calls(monkeypatch)
    # a stage-0 point (route dense) holds its images and costates (float64) plus its dense blocks:
    # three of them exceed the cap, two do not; stage 1's two matrix-free points are far smaller
    N, C, H, W = 6, 4, 6, 7
    m = C * 9 + 1
    one = 2 * N * C * H * W * 8 + C * m * m * 8
    monkeypatch.setattr(statistic, "ROWS_BATCH_BYTES", int(2.5 * one))
    capped = score(model, (x, y), F.mse_loss, backend="kernels", route="auto")
    assert sorted((c[0], c[2]) for c in calls) == [(1, "dense"), (2, "dense"), (2, "matfree")], calls
    _same(capped, ref, 1e-9)
    # a cap below one point: one point per call, the same answer
    calls.clear()
    monkeypatch.setattr(statistic, "ROWS_BATCH_BYTES", 1)
    _same(score(model, (x, y), F.mse_loss, backend="kernels", route="auto"), ref, 1e-9)
    assert [c[0] for c in calls] == [1] * 5, calls


def test_need_top_keeps_the_winner_on_many_models():
    # what a user of score(need="top") sees: every point's mu and block as with need="all" (before
    # the driver waited for a block's theta_1 to settle, 5 points in 100 of these models differed)
    wrong = []
    for seed in range(20):
        model, x, y = _model(seed, channels=(6, 6), depths=(2, 1))
        full = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree", rule="top")
        top = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree", rule="top", need="top")
        wrong += [(seed, a.point) for a, b in zip(full.points, top.points) if a.block != b.block]
    assert not wrong, f"need='top' changed the winning block at (seed, point) {wrong}"
