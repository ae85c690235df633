"""Multi-point sensitivity_topk (several insertion points in one launch) and need="top".

References are float64 blocks + eigvalsh (topoderiv.reference), and the single-point calls, whose
own correctness tests/test_ops.py checks against the same references.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from topoderiv import ops, reference
from topoderiv.growth.scoring import score
from topoderiv.method.statistic import kernels_available
from topoderiv.models import ResidualMLP

pytestmark = pytest.mark.skipif(not kernels_available(), reason="no _C")


def _points(shapes, seed=0, dtype=torch.float32):
    """Pairs (x [..., d], p [..., n]) with costates correlated with the features (real-like spectra)."""
    g = torch.Generator().manual_seed(seed)
    xs, ps = [], []
    for lead, d, n in shapes:
        x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
        mix = torch.randn(d, n, generator=g, dtype=torch.float64) / d ** 0.5
        p = 0.3 * torch.randn(*lead, n, generator=g, dtype=torch.float64) + (x @ mix) ** 2 - 0.5
        xs.append(x.to(dtype))
        ps.append(p.to(dtype))
    return xs, ps


def _ref_eigs(x, p, bias=True):
    b = reference.sensitivity_blocks(x.double().reshape(-1, x.shape[-1]), p.double().reshape(-1, p.shape[-1]),
                                     bias=bias)
    w, v = torch.linalg.eigh(b)
    return w.flip(-1), v.flip(-1)


def _same_up_to_sign(a, b, atol):
    # a, b [n, m, k] unit columns: |<a, b>| = 1
    dots = (a.double() * b.double()).sum(dim=1).abs()
    assert float((dots - 1).abs().max()) <= atol


SHAPES = [((4, 30), 9, 7), ((4, 30), 9, 7), ((120,), 5, 4), ((4, 30), 9, 7), ((120,), 5, 4)]


@pytest.mark.parametrize("route", ["dense", "matfree"])
@pytest.mark.parametrize("k", [1, 2])
def test_multipoint_equals_single_point_calls_and_float64_reference(route, k):
    xs, ps = _points(SHAPES)
    multi = ops.sensitivity_topk(xs, ps, k=k, route=route, tol=1e-6)
    assert isinstance(multi, list) and len(multi) == len(xs)
    for x, p, r in zip(xs, ps, multi):
        single = ops.sensitivity_topk(x, p, k=k, route=route, tol=1e-6)
        assert r.route == single.route == route
        assert r.values.shape == single.values.shape and r.vectors.shape == single.vectors.shape
        torch.testing.assert_close(r.values, single.values, rtol=1e-5, atol=1e-5)
        _same_up_to_sign(r.vectors, single.vectors, 1e-3)
        assert bool(r.converged.all()) and not bool(r.early.any())
        w, _ = _ref_eigs(x, p)
        scale = float(w.abs().max())
        assert float((r.values.double() - w[:, :k]).abs().max()) <= 1e-4 * scale


def test_multipoint_float64_vectors_match_reference():
    xs, ps = _points(SHAPES[:3], seed=1, dtype=torch.float64)
    for r, x, p in zip(ops.sensitivity_topk(xs, ps, route="matfree", tol=1e-12), xs, ps):
        w, v = _ref_eigs(x, p)
        torch.testing.assert_close(r.values[:, 0], w[:, 0], rtol=1e-9, atol=1e-9)
        _same_up_to_sign(r.vectors, v[:, :, :1], 1e-8)


def test_multipoint_start_vectors_per_point():
    xs, ps = _points(SHAPES[:3], seed=2)
    w1, v1 = _ref_eigs(xs[1], ps[1])
    v0 = [None, v1[:, :, 0] + 0.01, None]  # a near-exact start for point 1 only
    multi = ops.sensitivity_topk(xs, ps, route="matfree", v0=v0, tol=1e-6)
    for i, (x, p) in enumerate(zip(xs, ps)):
        single = ops.sensitivity_topk(x, p, route="matfree", v0=v0[i], tol=1e-6)
        torch.testing.assert_close(multi[i].values, single.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(multi[i].steps, single.steps)
    cold = ops.sensitivity_topk(xs[1], ps[1], route="matfree", tol=1e-6)
    assert int(multi[1].steps.sum()) < int(cold.steps.sum())  # the warm start cut the steps


@pytest.mark.parametrize("route", ["dense", "matfree"])
def test_need_top_solves_the_winning_block_and_flags_bounds(route):
    xs, ps = _points([((6, 40), 12, 16)] * 3, seed=3)
    top = ops.sensitivity_topk(xs, ps, route=route, need="top", tol=1e-6)
    full = ops.sensitivity_topk(xs, ps, route=route, tol=1e-6)
    for x, p, t, f in zip(xs, ps, top, full):
        w, _ = _ref_eigs(x, p)
        lam = w[:, 0]
        r_star = int(lam.argmax())
        assert t.best_block == r_star == f.best_block
        assert abs(t.best_value - float(lam[r_star])) <= 1e-5 * float(lam.abs().max())
        assert bool(t.converged[r_star]) and not bool(t.early[r_star])
        # stopped blocks: lower bounds of their own top eigenvalue, below the winner's
        assert bool(t.early.any()), "no block stopped early: the test does not exercise need='top'"
        e = t.early
        assert bool((t.values[e, 0].double() <= lam[e] + 1e-5 * float(lam.abs().max())).all())
        assert bool((lam[e] < lam[r_star]).all())
        assert not bool(t.converged[e].any())
        assert int(t.steps.sum()) < int(f.steps.sum())


def test_lanczos_topk_norm_group_equals_separate_calls():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(3, 5, 20, 20, generator=g, dtype=torch.float64)
    a = a + a.mT
    res = ops.lanczos_topk(a.reshape(15, 20, 20), 2, tol=1e-10, norm_group=5)
    for i in range(3):
        one = ops.lanczos_topk(a[i], 2, tol=1e-10, shared_norm=True)
        torch.testing.assert_close(res.values[5 * i:5 * i + 5], one.values, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(res.steps[5 * i:5 * i + 5], one.steps)
    w = torch.linalg.eigvalsh(a.reshape(15, 20, 20)).flip(-1)[:, :2]
    torch.testing.assert_close(res.values, w, rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="norm_group must divide the batch size B = 15, got 4"):
        ops.lanczos_topk(a.reshape(15, 20, 20), norm_group=4)
    with pytest.raises(ValueError, match="need must be one of"):
        ops.lanczos_topk(a[0], need="some")


def test_multipoint_errors_name_the_argument_and_point():
    xs, ps = _points(SHAPES[:3])
    with pytest.raises(ValueError, match="x and p must hold the same number of points, got 3 and 2"):
        ops.sensitivity_topk(xs, ps[:2])
    with pytest.raises(TypeError, match="x and p must both be sequences"):
        ops.sensitivity_topk(xs, ps[0])
    with pytest.raises(TypeError, match="every point must have the dtype of point 0 .*float64 at point 2"):
        ops.sensitivity_topk(xs[:2] + [xs[2].double()], ps[:2] + [ps[2].double()])
    with pytest.raises(ValueError, match=r"device.*\(point 1 of 3\)"):
        ops.sensitivity_topk([xs[0], xs[1].to("meta"), xs[2]], [ps[0], ps[1].to("meta"), ps[2]])
    with pytest.raises(ValueError, match=r"leading dims.*\(point 1 of 3\)"):
        ops.sensitivity_topk(xs, [ps[0], ps[1][:2], ps[2]])
    bad = xs[2].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x must contain only finite values.*\(point 2 of 3\)"):
        ops.sensitivity_topk(xs[:2] + [bad], ps)
    with pytest.raises(ValueError, match="v0 must be None or a sequence of 3 start vectors"):
        ops.sensitivity_topk(xs, ps, v0=[None])
    with pytest.raises(ValueError, match=r"v0 must have shape \[4, 6\].*\(point 2 of 3\)"):
        ops.sensitivity_topk(xs, ps, v0=[None, None, torch.zeros(4, 7)])
    with pytest.raises(ValueError, match="need must be one of"):
        ops.sensitivity_topk(xs, ps, need="best")
    with pytest.raises(ValueError, match="route must be one of"):
        ops.sensitivity_topk(xs, ps, route="fast")
    with pytest.raises(ValueError, match=r"k must be <= m = 6.*\(point 2 of 3\)"):
        ops.sensitivity_topk(xs, ps, k=7)
    assert ops.sensitivity_topk([], []) == []


def test_batched_raw_ops_validate_and_pass_opcheck():
    xs, ps = _points([((50,), 6, 5)] * 3, seed=5)
    X, P = torch.stack(xs), torch.stack(ps)
    opcheck(torch.ops.topoderiv.sensitivity_lanczos_batched.default, (X, P, True, 1, 7, 1e-6, 0, None, 1))
    opcheck(torch.ops.topoderiv.sensitivity_blocks_batched.default, (X, P, True))
    blocks = torch.ops.topoderiv.sensitivity_blocks_batched(X, P, True)
    for i in range(3):
        torch.testing.assert_close(blocks[i].double(), reference.sensitivity_blocks(xs[i].double(), ps[i].double()),
                                   rtol=1e-4, atol=1e-4)
    opcheck(torch.ops.topoderiv.lanczos_topk_batched.default, (blocks, 1, 7, 1e-6, 0, None, 0))
    with pytest.raises(ValueError, match=r"x must be 3-D \[L, N, d\]"):
        torch.ops.topoderiv.sensitivity_lanczos_batched(X[0], P[0], True, 1, 7, 1e-6, 0, None, 0)
    with pytest.raises(ValueError, match=r"p \[L, N, n\] must have x's L and N"):
        torch.ops.topoderiv.sensitivity_lanczos_batched(X, P[:2], True, 1, 7, 1e-6, 0, None, 0)
    with pytest.raises(ValueError, match=r"need must be in \[0, 1\], got 2"):
        torch.ops.topoderiv.sensitivity_lanczos_batched(X, P, True, 1, 7, 1e-6, 0, None, 2)
    with pytest.raises(ValueError, match=r"a must have shape \[L, n, m, m\]"):
        torch.ops.topoderiv.lanczos_topk_batched(blocks[0], 1, 7, 1e-6, 0, None, 0)
    asym = blocks.clone()
    asym[1, 2, 0, 1] += 1.0
    with pytest.raises(ValueError, match="a must be symmetric"):
        torch.ops.topoderiv.lanczos_topk_batched(asym, 1, 7, 1e-6, 0, None, 0)
    # strided (non-contiguous) batches are read correctly
    Xs = torch.stack(xs, dim=1).transpose(0, 1)  # [3, 50, 6] with batch stride 6
    out = torch.ops.topoderiv.sensitivity_lanczos_batched(Xs, P, True, 1, 7, 1e-6, 0, None, 0)
    ref = torch.ops.topoderiv.sensitivity_lanczos_batched(X, P, True, 1, 7, 1e-6, 0, None, 0)
    torch.testing.assert_close(out[0], ref[0])


def test_scorer_solves_all_points_in_one_multipoint_call(monkeypatch):
    import topoderiv.method.statistic as st

    torch.manual_seed(0)
    model = ResidualMLP(3, 70, 2, 4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 2, generator=g)
    calls = []
    real = st.ops.sensitivity_topk

    def counting(xx, pp, **kw):
        calls.append(len(xx) if isinstance(xx, list) else 1)
        return real(xx, pp, **kw)

    monkeypatch.setattr(st.ops, "sensitivity_topk", counting)
    rep = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree")
    assert calls == [5]
    monkeypatch.setattr(st.ops, "sensitivity_topk", real)
    ref = score(model, (x, y), F.mse_loss, backend="torch")
    for a, b in zip(ref.points, rep.points):
        assert b.block == a.block and b.converged
        assert b.mu == pytest.approx(a.mu, rel=2e-3)
        torch.testing.assert_close(b.block_mu, a.block_mu, rtol=5e-3, atol=5e-3 * a.mu)
    # need="top": the same mu, block and phi; the non-winning blocks may be lower bounds
    top = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree", need="top")
    for a, b in zip(ref.points, top.points):
        assert b.block == a.block and b.mu == pytest.approx(a.mu, rel=2e-3)
        if b.bounds is not None:
            assert not bool(b.bounds[b.block])
            assert bool((b.block_mu[b.bounds] <= a.block_mu[b.bounds] + 1e-3 * a.mu).all())


def test_matrix_free_compaction_in_row_chunks_is_exact():
    """Once a fifth of a point's blocks are done, the CPU backend applies the operator of the
    active blocks only, gathering their costate columns in bounded chunks of rows (memory flat in N):
    here half the blocks have rank-2 operators (done after 2-3 steps) and N spans 3 chunks."""
    g = torch.Generator().manual_seed(6)
    N, d, n = 40000, 6, 64
    xs, ps = [], []
    for _ in range(2):
        x = torch.randn(N, d, generator=g, dtype=torch.float64)
        p = torch.randn(N, n, generator=g, dtype=torch.float64) * x[:, :1] ** 2
        p[2:, ::2] = 0.0  # even blocks: two rows only, rank <= 2
        xs.append(x)
        ps.append(p)
    res = ops.sensitivity_topk(xs, ps, route="matfree", tol=1e-12)
    for x, p, r in zip(xs, ps, res):
        w, v = _ref_eigs(x, p)
        assert int(r.steps[::2].max()) <= 3 < int(r.steps[1::2].min())  # the compacted steps ran
        torch.testing.assert_close(r.values[:, 0], w[:, 0], rtol=1e-9, atol=1e-9 * float(w.abs().max()))
        odd = slice(1, None, 2)
        _same_up_to_sign(r.vectors[odd], v[odd, :, :1], 1e-8)
        assert bool(r.converged.all())


def test_scorer_batches_within_the_copy_budget(monkeypatch):
    """solve_points splits the batched launches so that the copy it makes stays within its byte
    caps (here: one point per launch), with the same results."""
    import topoderiv.method.statistic as st

    torch.manual_seed(0)
    model = ResidualMLP(3, 70, 2, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 3, generator=g), torch.randn(64, 2, generator=g)
    ref = score(model, (x, y), F.mse_loss, backend="kernels", route="dense")
    calls = []
    real = st.ops.lanczos_topk

    def counting(a, *args, **kw):
        calls.append(a.shape[0])
        return real(a, *args, **kw)

    monkeypatch.setattr(st.ops, "lanczos_topk", counting)
    monkeypatch.setattr(st, "DENSE_BATCH_BYTES", 1)
    rep = score(model, (x, y), F.mse_loss, backend="kernels", route="dense")
    assert calls == [70, 70, 70]
    for a, b in zip(ref.points, rep.points):
        assert a.mu == b.mu and a.block == b.block
    calls.clear()
    monkeypatch.setattr(st, "DENSE_BATCH_BYTES", 2**30)
    score(model, (x, y), F.mse_loss, backend="kernels", route="dense")
    assert calls == [210]
