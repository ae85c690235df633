"""Scoring: the finite-difference arbiter (METHOD.md section 6), costates, streaming, errors.

Every check compares against float64 finite differences or a brute-force dense Q built here with
einsum + eigvalsh, never the code with itself.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topoderiv
from topoderiv.sites.capture import capture_all
from topoderiv.growth.insertion import insert
from topoderiv.models import ResidualMLP
from topoderiv.registry import register
from topoderiv.growth.scoring import score
from topoderiv.method.statistic import kernels_available

from _helpers import costate_fd

BACKENDS = ["torch", pytest.param("kernels", marks=pytest.mark.skipif(not kernels_available(), reason="no _C"))]


def _problem(seed, *, width=8, depth=4, n=48, d_in=3, d_out=2, tokens=None, **kw):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResidualMLP(d_in, width, d_out, depth, **kw).double()
    shape = (n, d_in) if tokens is None else (n, tokens, d_in)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    y = torch.randn(*shape[:-1], d_out, generator=g, dtype=torch.float64)
    return model, x, y


def _J(model, x, y, loss_fn=F.mse_loss):
    with torch.no_grad():
        return float(loss_fn(model(x), y))


def _arbiter_ratios(model, x, y, rep, eps=1e-3):
    j0 = _J(model, x, y)
    ratios = {}
    for ps in rep.points:
        m2 = copy.deepcopy(model)
        insert(m2, ps.point, ps.phi, eps)
        ratios[ps.point] = (_J(m2, x, y) - j0) / ps.predicted_change(eps)
    return ratios


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_difference_arbiter_every_point(backend):
    """(J(eps) - J(0)) / (-(eps^2/2) mu) within 1% of 1 at eps = 1e-3, every candidate point."""
    model, x, y = _problem(1)
    rep = score(model, (x, y), F.mse_loss, backend=backend)
    assert [p.point for p in rep.points] == [0, 1, 2, 3, 4]
    for ps in rep.points:
        assert ps.mu > 1e-3, f"mu too small to test at point {ps.point}: {ps.mu}"
        assert ps.quotient == pytest.approx(ps.mu, rel=1e-12)
        assert float(ps.phi.norm()) == pytest.approx(1.0, abs=1e-12)
        assert int((ps.phi.abs().sum(1) > 0).sum()) == 1 and float(ps.phi[ps.block].norm()) == pytest.approx(1.0)
    ratios = _arbiter_ratios(model, x, y, rep)
    for p, r in ratios.items():
        assert 0.99 < r < 1.01, f"point {p}: ratio {r}"


@register(name="test_scoring.NegTD")  # ResidualMLP names activations by registered name
class NegTD(nn.Module):
    """sigma(z) = -(z^2/2 + z^3/3)-like: sigma''(0) = -2 (admissible, negative curvature)."""

    def forward(self, z):
        return -2.0 * (2.0 * F.silu(z) - torch.tanh(z))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem", [
    dict(seed=1),
    dict(seed=3, width=6, depth=2, insert_activation=NegTD()),  # sigma''(0) = -2
    dict(seed=2, width=6, depth=2, n=10, tokens=5, feature="layernorm", bias=False),
], ids=["plain", "negative-sigma2", "layernorm-tokens-nobias"])
def test_finite_difference_arbiter_rule_all(backend, problem):
    """Rule "all": eps * phi inserted at every point, (J(eps) - J(0)) / predicted_change within 1% of 1."""
    problem = dict(problem)
    model, x, y = _problem(problem.pop("seed"), **problem)
    rep = score(model, (x, y), F.mse_loss, backend=backend, rule="all")
    assert rep.rule == "all"
    for ps in rep.points:
        assert ps.mu > 1e-4, f"mu too small to test at point {ps.point}: {ps.mu}"
        assert float(ps.phi.norm()) == pytest.approx(1.0, abs=1e-12)
        # the quotient computed by hand from block_mu: sum_r mu_r^2 / sum_r mu_r over mu_r > 0
        pos = ps.block_mu.clamp_min(0)
        assert ps.quotient == pytest.approx(float((pos * ps.block_mu).sum() / pos.sum()), rel=1e-8)
        assert 0 < ps.quotient <= ps.mu * (1 + 1e-12)
        if int((ps.block_mu > 0).sum()) > 1:
            assert ps.quotient < ps.mu  # really a mixture, not the "top" phi
    assert any(int((ps.phi.abs().sum(1) > 0).sum()) > 1 for ps in rep.points)
    for p, r in _arbiter_ratios(model, x, y, rep).items():
        assert 0.99 < r < 1.01, f"point {p}: ratio {r}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_rule_all_gives_every_positive_row_a_live_row(backend):
    """Rows with block eigenvalue mu_r > 0 are non-zero (weight sqrt(mu_r), on B_r's top
    eigenvector); rows with mu_r <= 0 are exactly zero. Checked against a brute-force eigh of B_r."""
    model, x, y = _problem(5, width=8, depth=3)
    rep = score(model, (x, y), F.mse_loss, backend=backend, rule="all")
    top = score(model, (x, y), F.mse_loss, backend=backend, rule="top")
    cap = capture_all(model, (x, y), F.mse_loss)
    n_pos = 0
    for ps, pt in zip(rep.points, top.points):
        assert ps.block == pt.block and ps.mu == pytest.approx(pt.mu, rel=1e-10)
        torch.testing.assert_close(ps.block_mu, pt.block_mu, rtol=1e-10, atol=1e-14)
        xt = torch.cat([cap.states[ps.point], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        B = torch.einsum("sr,si,sj->rij", cap.costates[ps.point], xt, xt)  # sigma''(0) = 1
        lam, vec = torch.linalg.eigh(B)
        torch.testing.assert_close(ps.block_mu, lam[:, -1], rtol=1e-8, atol=1e-12)
        pos = ps.block_mu > 0
        n_pos += int(pos.sum())
        norms = ps.phi.norm(dim=1)
        assert torch.equal(norms > 0, pos)
        assert float(norms[~pos].abs().sum()) == 0.0
        # row norms proportional to sqrt(mu_r), rows parallel to B_r's top eigenvector
        w = ps.block_mu.clamp_min(0).sqrt()
        torch.testing.assert_close(norms, w / w.norm(), rtol=1e-8, atol=1e-12)
        for r in pos.nonzero().flatten().tolist():
            cos = float(ps.phi[r] @ vec[r, :, -1]) / float(norms[r])
            assert abs(cos) == pytest.approx(1.0, abs=1e-8)
        # "top" has a single live row
        assert int((pt.phi.abs().sum(1) > 0).sum()) == 1
    assert n_pos > len(rep.points), "test problem should have several positive blocks per point"


@pytest.mark.parametrize("backend", BACKENDS)
def test_arbiter_layernorm_feature_no_bias_tokens(backend):
    """Tokens [B, T, d], u(x) = LayerNorm(x), no bias column: same arbiter."""
    model, x, y = _problem(2, width=6, depth=2, n=10, tokens=5, feature="layernorm", bias=False)
    rep = score(model, (x, y), F.mse_loss, backend=backend)
    for ps in rep.points:
        assert ps.phi.shape == (6, 6) and not ps.bias
        assert ps.mu > 1e-4
    for p, r in _arbiter_ratios(model, x, y, rep).items():
        assert 0.99 < r < 1.01, f"point {p}: ratio {r}"


def test_negative_second_derivative_uses_min_eigenvalue():
    model, x, y = _problem(3, width=6, depth=2, insert_activation=NegTD())
    rep = score(model, (x, y), F.mse_loss, backend="torch")
    # brute force: mu = sigma''(0) * min_r lambda_min(B_r)
    cap = capture_all(model, (x, y), F.mse_loss)
    for ps in rep.points:
        assert ps.sigma2 == pytest.approx(-2.0)
        xt = torch.cat([cap.states[ps.point], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
        B = torch.einsum("sr,si,sj->rij", cap.costates[ps.point], xt, xt)
        assert ps.mu == pytest.approx(-2.0 * float(torch.linalg.eigvalsh(B).min()), rel=1e-10)
    for p, r in _arbiter_ratios(model, x, y, rep).items():
        assert 0.99 < r < 1.01, f"point {p}: ratio {r}"


def test_costates_equal_minus_dJdx_by_finite_differences():
    """Scorer costates (two uneven batches, global 1/S scaling) against central differences of J."""
    model, x, y = _problem(4, width=5, depth=2, n=7)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    cap = capture_all(model, batches, F.mse_loss)
    assert cap.loss == pytest.approx(_J(model, x, y), rel=1e-14)

    for point in topoderiv.candidate_points(model):
        fd = torch.zeros(7, 5, dtype=torch.float64)
        for s in range(7):
            for j in range(5):
                e = torch.zeros(7, 5, dtype=torch.float64)
                e[s, j] = 1.0
                fd[s, j] = costate_fd(model, point, e, lambda m2: _J(m2, x, y))
        torch.testing.assert_close(cap.costates[point], fd, rtol=1e-6, atol=1e-10)
        assert float(fd.abs().max()) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule, route, budget", [("top", "auto", 2**30), ("multi", "auto", 2**30),
                                                 ("all", "auto", 2**30), ("top", "dense", 2**30),
                                                 ("top", "auto", 1)])
def test_streamed_equals_concatenated(backend, rule, route, budget):
    """k uneven batches = one batch: collected (auto), streamed dense blocks, and auto switching to
    streaming after the first batch (budget of 1 byte)."""
    model, x, y = _problem(5, n=40)
    full = score(model, (x, y), F.mse_loss, backend=backend, rule=rule)
    parts = [(x[:7], y[:7]), (x[7:25], y[7:25]), (x[25:], y[25:])]
    streamed = score(model, parts, F.mse_loss, backend=backend, rule=rule, route=route, memory_budget=budget)
    if backend == "kernels" and (route == "dense" or budget == 1):
        assert all(p.route == "dense" for p in streamed.points)
    assert streamed.n_batches == 3 and streamed.n_samples == 40
    assert streamed.loss == pytest.approx(full.loss, rel=1e-13)
    for a, b in zip(full.points, streamed.points):
        assert a.block == b.block
        assert b.mu == pytest.approx(a.mu, rel=1e-9)
        torch.testing.assert_close(b.block_mu, a.block_mu, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.phi, a.phi, rtol=1e-6, atol=1e-8)


def test_matches_bruteforce_dense_q_and_multi_rule():
    """mu = lambda_max of the full (n m x n m) Q; the multi rule's phi^T Q phi matches its quotient."""
    model, x, y = _problem(6, width=4, depth=1)
    cap = capture_all(model, (x, y), F.mse_loss)
    for rule in ("top", "multi", "all"):
        rep = score(model, (x, y), F.mse_loss, rule=rule, backend="auto", k=2)
        for ps in rep.points:
            xt = torch.cat([cap.states[ps.point], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
            B = torch.einsum("sr,si,sj->rij", cap.costates[ps.point], xt, xt)  # [n, m, m]
            Q = torch.block_diag(*B)  # sigma''(0) = 1
            assert ps.mu == pytest.approx(float(torch.linalg.eigvalsh(Q).max()), rel=1e-8)
            v = ps.phi.reshape(-1)
            assert float(v @ Q @ v) == pytest.approx(ps.quotient, rel=1e-8)
            if rule == "multi":
                assert int((ps.phi.abs().sum(1) > 0).sum()) >= 1
                assert ps.quotient <= ps.mu + 1e-12


@pytest.mark.skipif(not kernels_available(), reason="no _C")
def test_matfree_route_agrees_with_dense():
    model, x, y = _problem(7, width=8)
    dense = score(model, (x, y), F.mse_loss, backend="kernels", route="dense")
    mf = score(model, (x, y), F.mse_loss, backend="kernels", route="matfree")
    parts = [(x[:20], y[:20]), (x[20:], y[20:])]
    mf_stream = score(model, parts, F.mse_loss, backend="kernels", route="matfree")
    for a, b, c in zip(dense.points, mf.points, mf_stream.points):
        assert b.route == "matfree" and c.route == "matfree"
        assert b.mu == pytest.approx(a.mu, rel=1e-8) and c.mu == pytest.approx(a.mu, rel=1e-8)
        torch.testing.assert_close(b.phi, a.phi, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not kernels_available(), reason="no _C")
def test_warm_started_matfree_scoring_is_accurate_and_starts_close(monkeypatch):
    from topoderiv import reference
    from topoderiv.method import statistic
    from topoderiv.method.statistic import subspace_start

    warm_start = subspace_start

    # wide enough (m = 161 >= 64) for the matrix-free solves to start from subspace_start
    g = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    model = ResidualMLP(6, 160, 2, 2)
    x = torch.randn(700, 6, generator=g)
    y = torch.sin(x[:, :2] * 2)
    ref = score(model.double(), (x.double(), y.double()), F.mse_loss, backend="torch")  # float64 eigh
    rep = score(model.float(), (x, y), F.mse_loss, route="matfree")
    for a, b in zip(ref.points, rep.points):
        assert b.route == "matfree" and b.converged
        assert b.mu == pytest.approx(a.mu, rel=2e-4)
        # every block's top eigenvalue, relative to ||Q||
        assert float((b.block_mu.double() - a.block_mu).abs().max()) < 2e-4 * a.mu
    # the start itself: Rayleigh-Ritz in 32 leading activation directions of a float64 capture
    cap = capture_all(model.double(), (x.double(), y.double()), F.mse_loss)
    u, p = cap.states[1], cap.costates[1]
    blocks = reference.sensitivity_blocks(u, p)
    w, v = reference.eigh_topk(blocks, 1)
    v0 = subspace_start(u, p, True)
    cos = (v0 * v[:, :, 0]).sum(1).abs() / v0.norm(dim=1)
    assert float(cos.median()) > 0.99  # a random start: ~0.06
    # tokens [B, T, d], LayerNorm feature, no bias column (m = 80): warm-started too
    tmodel, tx, ty = _problem(4, width=80, depth=1, n=40, tokens=6, feature="layernorm", bias=False)
    tref = score(tmodel, (tx, ty), F.mse_loss, backend="torch")
    starts = []
    monkeypatch.setattr(statistic, "subspace_start", lambda *a: starts.append(a[0].shape) or warm_start(*a))
    trep = score(copy.deepcopy(tmodel).float(), (tx.float(), ty.float()), F.mse_loss)
    assert starts == [(40 * 6, 80)] * len(trep.points)  # rows = samples x tokens  # auto chose matrix-free and warm-started it
    for a, b in zip(tref.points, trep.points):
        assert b.route == "matfree" and b.converged and b.phi.shape == (80, 80)
        assert b.mu == pytest.approx(a.mu, rel=2e-4)
    # low-rank activations (rank 20 < 32): the subspace holds every top eigenvector (up to the 1% mix)
    u = torch.randn(500, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 150, generator=g, dtype=torch.float64)
    p = torch.randn(500, 7, generator=g, dtype=torch.float64)
    w, v = reference.eigh_topk(reference.sensitivity_blocks(u, p), 1)
    v0 = subspace_start(u, p, True)
    cos = (v0 * v[:, :, 0]).sum(1).abs() / v0.norm(dim=1)
    assert float(cos.min()) > 0.999
    # the same with a token dimension ([B, T, d]: samples x tokens are the rows)
    v0t = subspace_start(u.reshape(50, 10, 150), p.reshape(50, 10, 7), True)
    cos = (v0t * v[:, :, 0]).sum(1).abs() / v0t.norm(dim=1)
    assert v0t.shape == (7, 151) and float(cos.min()) > 0.999


def test_float32_model_scores_close_to_float64():
    model, x, y = _problem(8)
    ref = score(model, (x, y), F.mse_loss, backend="torch")
    m32 = copy.deepcopy(model).float()
    rep = score(m32, (x.float(), y.float()), F.mse_loss)
    for a, b in zip(ref.points, rep.points):
        assert b.phi.dtype == torch.float32
        assert b.mu == pytest.approx(a.mu, rel=1e-4)


def test_no_grad_pollution_and_mode_restored():
    model, x, y = _problem(9)
    model.train()
    score(model, (x, y), F.mse_loss)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    # existing grads are left as they were; eval mode stays eval
    F.mse_loss(model(x), y).backward()
    before = [p.grad.clone() for p in model.parameters()]
    model.eval()
    score(model, [(x[:10], y[:10]), (x[10:], y[10:])], F.mse_loss, training=True)
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before))
    assert not any(m.training for m in model.modules())
    assert len(model.blocks) == 4 and all(isinstance(b, topoderiv.ResidualBlock) for b in model.blocks)


def test_frozen_model_still_scores():
    model, x, y = _problem(10, depth=2)
    for p in model.parameters():
        p.requires_grad_(False)
    ref_model = copy.deepcopy(model)
    for p in ref_model.parameters():
        p.requires_grad_(True)
    a = score(model, (x, y), F.mse_loss)
    b = score(ref_model, (x, y), F.mse_loss)
    assert [p.mu for p in a.points] == pytest.approx([p.mu for p in b.points], rel=1e-12)


def test_best_is_none_when_costates_vanish_and_table():
    model, x, _ = _problem(11, depth=1)
    with torch.no_grad():
        y = model(x)  # zero loss: zero costates, mu = 0 everywhere
    rep = score(model, (x, y), F.mse_loss)
    assert rep.best is None and all(p.mu == 0 for p in rep.points)
    assert "no point has mu > 0" in rep.table()
    model, x, y = _problem(12, depth=1)
    rep = score(model, (x, y), F.mse_loss, points=[1])
    assert [p.point for p in rep.points] == [1] and rep.best.point == 1
    assert "<- best" in rep.table()


def test_scoring_errors():
    model, x, y = _problem(13, depth=1)
    with pytest.raises(TypeError, match="Sequential"):
        score(nn.Sequential(nn.Linear(3, 2)), (x, y), F.mse_loss)
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar.*got a tensor of shape \[48\]"):
        score(model, (x, y), lambda out, t: ((out - t) ** 2).mean(1))
    xn = x.clone()
    xn[3, 1] = float("nan")
    with pytest.raises(ValueError, match="data batch 0: x must contain only finite values"):
        score(model, (xn, y), F.mse_loss)
    with pytest.raises(ValueError, match="data batch 1: y must contain only finite values"):
        score(model, [(x, y), (x, torch.full_like(y, float("inf")))], F.mse_loss)
    bad = ResidualMLP(3, 8, 2, 1, insert_activation="tanh").double()
    with pytest.raises(ValueError, match="Tanh.*not admissible"):
        score(bad, (x, y), F.mse_loss)
    with pytest.raises(ValueError, match="rule must be one of"):
        score(model, (x, y), F.mse_loss, rule="best")
    with pytest.raises(ValueError, match="backend must be one of"):
        score(model, (x, y), F.mse_loss, backend="cuda")
    with pytest.raises(ValueError, match="point must be an int candidate point"):
        score(model, (x, y), F.mse_loss, points=[5])
    with pytest.raises(ValueError, match="at least one non-empty"):
        score(model, [], F.mse_loss)
    with pytest.raises(TypeError, match=r"data batch 0 must be an \(x, y\) pair"):
        score(model, [x], F.mse_loss)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        score(model, (x, y), F.mse_loss, k=0)


@pytest.mark.skipif(not kernels_available(), reason="no _C")
@pytest.mark.parametrize("batches", [1, 2])
def test_unconverged_lanczos_blocks_are_redone_with_eigh(monkeypatch, batches):
    """Blocks the kernels flag as unconverged (simulated: garbage values) are recomputed exactly."""
    import topoderiv.method.statistic as sc

    model, x, y = _problem(14, depth=1)
    data = (x, y) if batches == 1 else [(x[:20], y[:20]), (x[20:], y[20:])]
    ref = score(model, data, F.mse_loss, backend="torch")

    def spoil(res):
        conv = res.converged.clone()
        conv[::2] = False
        vals = res.values.clone()
        vals[::2] = -123.0
        return vals, res.vectors * 0, conv

    real_topk, real_lanczos = sc.ops.sensitivity_topk, sc.ops.lanczos_topk

    def fake_topk(*a, **kw):
        res = real_topk(*a, **kw)
        for r in (res if isinstance(res, list) else [res]):  # the scorer solves all points in one call
            r.values, r.vectors, r.converged = spoil(r)
        return res

    def fake_lanczos(*a, **kw):
        res = real_lanczos(*a, **kw)
        vals, vecs, conv = spoil(res)
        return sc.ops.LanczosResult(vals, vecs, conv, res.residuals, res.steps, res.norm)

    monkeypatch.setattr(sc.ops, "sensitivity_topk", fake_topk)
    monkeypatch.setattr(sc.ops, "lanczos_topk", fake_lanczos)
    rep = score(model, data, F.mse_loss, backend="kernels")
    for a, b in zip(ref.points, rep.points):
        assert b.converged
        torch.testing.assert_close(b.block_mu, a.block_mu, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b.phi, a.phi, rtol=1e-6, atol=1e-8)
    monkeypatch.setattr(sc, "EIGH_FALLBACK_FLOPS", 0.0)
    rep = score(model, data, F.mse_loss, backend="kernels")
    assert not any(p.converged for p in rep.points)


def test_gradient_descent_on_a_small_random_block_is_power_iteration_on_its_blocks():
    # Near W = 0, J = J0 - 1/2 sum_r w_r^T Q_r w_r, so plain gradient descent on a new block is
    # w_r <- (I + lr Q_r) w_r: each row turns towards the top eigenvector of its own block B_r
    # (the rule "all" direction) and grows like (1 + lr mu_r)^t. The README's growth analysis
    # rests on this; here it is checked on the real training dynamics (autograd, SGD).
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    model = ResidualMLP(3, 8, 2, 3).double()
    x = torch.randn(64, 3, generator=g, dtype=torch.float64)
    y = torch.randn(64, 2, generator=g, dtype=torch.float64)
    ps = score(model, (x, y), F.mse_loss, backend="torch", rule="all").best
    w_start = torch.randn(ps.phi.shape, generator=g, dtype=torch.float64)
    grown = insert(copy.deepcopy(model), ps.point, w_start, 1e-10)
    grown.requires_grad_(False)
    lin = grown.blocks[ps.point].linear
    lin.requires_grad_(True)
    mu = ps.block_mu
    lr, steps = 0.2 / float(mu.max()), 70
    opt = torch.optim.SGD(lin.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(grown(x), y).backward()
        opt.step()
    w = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    assert float(w.abs().max()) < 1e-3  # still in the second-order regime
    v = ps.phi / ps.phi.norm(dim=1, keepdim=True)
    cos0 = (w_start * v).sum(1).abs() / w_start.norm(dim=1)
    cos = (w * v).sum(1).abs() / w.norm(dim=1)
    strong = mu >= mu.max() / 2
    assert strong.sum() >= 2 and float(cos0[strong].max()) < 0.9
    assert float(cos[strong].min()) > 0.999
    rate = (w.norm(dim=1) / (1e-10 * w_start.norm(dim=1))).log() / steps
    top = int(mu.argmax())
    assert float(rate[top]) == pytest.approx(float(torch.log1p(lr * mu[top])), rel=0.1)


def test_leading_basis_falls_back_to_float64_when_float32_eigh_fails(monkeypatch):
    # float32 LAPACK eigh on Grams with many exact zeros may raise or return NaN vectors (seen with
    # torch 2.14 on a timm ResNet's 1x1 stage): the warm starts then redo it in float64
    from topoderiv.method import statistic
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    x[:, 7:] = 0  # exact zeros, as padding gives
    gram = (x.mT @ x).float()
    exact = torch.linalg.eigh(gram.double())[1][:, -4:]
    real = torch.linalg.eigh

    for failure in ("nan", "raise"):
        def eigh(a, *args, **kw):
            if a.dtype == torch.float32:
                if failure == "raise":
                    raise torch.linalg.LinAlgError("failed to converge")
                return real(a)[0], torch.full_like(a, float("nan"))
            return real(a, *args, **kw)

        monkeypatch.setattr(torch.linalg, "eigh", eigh)
        got = statistic.leading_basis(gram, 4)
        assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
        # the same leading subspace as float64 (columns up to sign)
        assert float((got.double().abs() - exact.abs()).abs().max()) < 1e-6, failure
    monkeypatch.setattr(torch.linalg, "eigh", real)
    fine = statistic.leading_basis(gram, 4)  # float32 eigh that works is used as it is
    assert float((fine.double().abs() - exact.abs()).abs().max()) < 1e-4


@pytest.mark.parametrize("support,rank", [(7, 4), (7, 7), (3, 5), (0, 2), (12, 4)])
def test_leading_basis_solves_on_the_support_of_the_gram(monkeypatch, support, rank):
    # MKL syevd fails in float32 AND float64 on some Grams made mostly of zero rows (torch 2.14,
    # a timm ResNet's 1x1 stage): eigh must only ever see the nonzero support, and the basis must
    # still be the leading eigenvectors of the whole Gram (float64 reference), orthonormal
    from topoderiv.method import statistic
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 12, generator=g, dtype=torch.float64)
    cols = torch.randperm(12, generator=g)
    x[:, cols[support:]] = 0  # exact zeros, scattered as padding taps are
    gram = (x.mT @ x).float()
    real = torch.linalg.eigh

    def eigh(a, *args, **kw):
        if bool((a.abs().sum(dim=1) == 0).any()):
            raise torch.linalg.LinAlgError("failed to converge (zero rows)")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    got = statistic.leading_basis(gram, rank).double()
    monkeypatch.setattr(torch.linalg, "eigh", real)
    assert got.shape == (12, rank)
    assert float((got.mT @ got - torch.eye(rank, dtype=torch.float64)).abs().max()) < 1e-5
    values = torch.linalg.eigvalsh(gram.double())  # ascending, the reference spectrum
    rayleigh = (got * (gram.double() @ got)).sum(dim=0)
    assert torch.allclose(rayleigh, values[-rank:], rtol=1e-4, atol=1e-3 * float(values[-1].clamp(min=1)))


def test_leading_basis_randomized_path_spans_the_leading_eigenvectors():
    # m well above 2 (rank + oversampling): the seeded randomized subspace iteration; on a Gram
    # whose spectrum decays (activations) its basis must hold the leading eigenvectors of the
    # float64 reference, be orthonormal, and give the same basis twice (deterministic)
    from topoderiv.method import statistic
    g = torch.Generator().manual_seed(3)
    m, rank = 257, 32
    x = torch.randn(1024, m, generator=g, dtype=torch.float64) * torch.logspace(0, -3, m, dtype=torch.float64)
    x[:, 100] = 0  # a dead unit: solved on the support
    gram = (x.mT @ x).float()
    assert m - 1 > statistic.RANDOMIZED_MIN_FACTOR * (rank + statistic.BASIS_OVERSAMPLE)
    got = statistic.leading_basis(gram, rank).double()
    assert got.shape == (m, rank) and torch.equal(got, statistic.leading_basis(gram, rank).double())
    assert float((got.mT @ got - torch.eye(rank, dtype=torch.float64)).abs().max()) < 1e-5
    assert float(got[100].abs().max()) == 0.0
    values, vectors = torch.linalg.eigh(gram.double())
    lead = vectors[:, -rank // 2:]  # the leading half must lie in the basis (captured norm ~ 1)
    captured = (got.mT @ lead).norm(dim=0)
    assert float(captured.min()) > 0.99, captured  # a random 32-dim subspace: ~0.35
    rayleigh = (got * (gram.double() @ got)).sum(dim=0)  # ascending Ritz values
    assert torch.allclose(rayleigh[-rank // 2:], values[-rank // 2:], rtol=5e-3)
