"""Insertion: exact function preservation, atomicity on errors, and the eps search."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from topoderiv.growth.insertion import DEFAULT_EPS_GRID, insert, insert_block, remove_block, search_eps
from topoderiv.models import ResidualBlock, ResidualMLP, candidate_points
from topoderiv.growth.scoring import score

from _helpers import assert_untouched, snapshot


def _problem(seed, *, width=8, depth=3, n=40, dtype=torch.float64, **kw):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResidualMLP(3, width, 2, depth, **kw).to(dtype)
    x = torch.randn(n, 3, generator=g, dtype=dtype)
    y = torch.randn(n, 2, generator=g, dtype=dtype)
    return model, x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("feature", [None, "layernorm"])
def test_eps_zero_is_bit_exact_at_every_point(dtype, feature):
    model, x, _ = _problem(0, dtype=dtype, feature=feature)
    with torch.no_grad():
        ref = model(x)
    g = torch.Generator().manual_seed(1)
    for point in candidate_points(model):
        m2 = copy.deepcopy(model)
        phi = torch.randn(8, 9, generator=g, dtype=torch.float64)
        out = insert(m2, point, phi / phi.norm(), 0.0)
        assert out is m2 and len(m2.blocks) == 4 and m2.blocks[point].topoderiv_inserted
        with torch.no_grad():
            assert torch.equal(m2(x), ref), f"point {point}"


def test_inserted_parameters_are_eps_phi_at_the_point():
    model, x, y = _problem(2)
    phi = torch.arange(72, dtype=torch.float64).reshape(8, 9) / 100
    old = list(model.blocks)
    insert(model, 1, phi, 0.5)
    assert model.blocks[0] is old[0] and model.blocks[2] is old[1] and model.blocks[3] is old[2]
    blk = model.blocks[1]
    assert isinstance(blk, ResidualBlock)
    assert torch.equal(blk.linear.weight, 0.5 * phi[:, :8]) and torch.equal(blk.linear.bias, 0.5 * phi[:, 8])
    # the network is the old one with x + sigma(W x + b) between blocks 0 and 1
    with torch.no_grad():
        h = old[0](model.stem(x))
        z = h @ (0.5 * phi[:, :8]).T + 0.5 * phi[:, 8]
        h = h + 2 * z * torch.sigmoid(z) - torch.tanh(z)
        for b in old[1:]:
            h = b(h)
        torch.testing.assert_close(model(x), model.head(h), rtol=1e-14, atol=1e-14)


def test_failed_insertion_leaves_model_untouched():
    model, _, _ = _problem(3)
    snap = snapshot(model)
    good = torch.zeros(8, 9, dtype=torch.float64)
    nan = good.clone()
    nan[0, 0] = float("nan")
    cases = [
        (dict(point=4, phi=good, eps=0.1), ValueError, r"point must be an int candidate point in \[0, 3\] or a site name, got 4"),
        (dict(point=1.0, phi=good, eps=0.1), ValueError, "point must be an int"),
        (dict(point=1, phi=good[:, :8], eps=0.1), ValueError, r"phi must have shape \[n, m\] = \[8, 9\].*got \[8, 8\]"),
        (dict(point=1, phi=nan, eps=0.1), ValueError, "phi must contain only finite values"),
        (dict(point=1, phi=good.long(), eps=0.1), TypeError, "phi must be a floating-point tensor"),
        (dict(point=1, phi=[[0.0]], eps=0.1), TypeError, "phi must be a torch.Tensor"),
        (dict(point=1, phi=good, eps=float("inf")), ValueError, "eps must be a finite real number"),
        (dict(point=1, phi=good, eps="0.1"), ValueError, "eps must be a finite real number"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            insert(model, **kwargs)
        assert_untouched(model, snap)
    bad = ResidualMLP(3, 8, 2, 2, insert_activation="gelu").double()
    snap_bad = snapshot(bad)
    with pytest.raises(ValueError, match="GELU is not admissible"):
        insert(bad, 0, good, 0.1)
    assert_untouched(bad, snap_bad)
    with pytest.raises(TypeError, match="Sequential"):
        insert(nn.Sequential(nn.Linear(2, 2)), 0, good, 0.1)


def test_insert_block_and_remove_block():
    model, x, _ = _problem(4)
    with torch.no_grad():
        ref = model(x)
    insert_block(model, 3, nn.Identity())
    assert len(model.blocks) == 4 and isinstance(model.blocks[3], nn.Identity)
    removed = remove_block(model, 3)
    assert isinstance(removed, nn.Identity) and len(model.blocks) == 3
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    with pytest.raises(TypeError, match="block must be an nn.Module"):
        insert_block(model, 0, "block")
    with pytest.raises(ValueError, match=r"index must name a site followed by a block"):
        remove_block(model, 3)


def _full_loss(model, point, phi, eps, x, y):
    m2 = copy.deepcopy(model)
    insert(m2, point, phi, eps)
    with torch.no_grad():
        return float(F.mse_loss(m2(x), y))


def test_search_eps_matches_full_reevaluation():
    model, x, y = _problem(5)
    rep = score(model, (x, y), F.mse_loss)
    best = rep.best
    snap = snapshot(model)
    eps, losses = search_eps(model, best.point, best.phi, (x, y), F.mse_loss)
    assert_untouched(model, snap)
    assert set(losses) == {0.0, *DEFAULT_EPS_GRID}
    for e, v in losses.items():
        assert v == pytest.approx(_full_loss(model, best.point, best.phi, e, x, y), rel=1e-12, abs=1e-15)
    assert eps == min(DEFAULT_EPS_GRID, key=lambda e: losses[e])
    assert losses[eps] < losses[0.0]
    # streamed over uneven batches = one batch
    eps2, losses2 = search_eps(model, best.point, best, [(x[:13], y[:13]), (x[13:], y[13:])], F.mse_loss)
    assert eps2 == eps
    for e in losses:
        assert losses2[e] == pytest.approx(losses[e], rel=1e-12)


def test_search_eps_keeps_the_best_not_the_first_increase():
    """A wiggly loss whose eps curve rises before its minimum: the best eps is past the bump."""
    model, x, y = _problem(6)

    def wiggly(out, t):
        return F.mse_loss(out, t) + 0.2 * torch.sin(60 * out).mean()

    best = score(model, (x, y), wiggly).best
    grid = [round(0.05 * i, 2) for i in range(1, 41)]
    oracle = []
    for e in grid:  # independent: insert for real and run the whole model
        m2 = copy.deepcopy(model)
        insert(m2, best.point, best.phi, e)
        with torch.no_grad():
            oracle.append(float(wiggly(m2(x), y)))
    first_up = next(i for i in range(len(grid) - 1) if oracle[i + 1] > oracle[i])
    i_best = min(range(len(grid)), key=lambda i: oracle[i])
    assert i_best > first_up, "precondition: the curve must rise before its minimum"
    eps, losses = search_eps(model, best.point, best.phi, (x, y), wiggly, grid)
    assert eps == grid[i_best]
    assert [losses[e] for e in grid] == pytest.approx(oracle, rel=1e-12)


def test_search_eps_none_when_nothing_helps():
    model, x, y = _problem(7)
    rep = score(model, (x, y), F.mse_loss)
    ps = rep.points[0]
    # the eigenvector of the most negative block eigenvalue: the loss goes up at small eps
    xt_phi = torch.zeros_like(ps.phi)
    from topoderiv.sites.capture import capture_all

    cap = capture_all(model, (x, y), F.mse_loss, points=[ps.point])
    xt = torch.cat([cap.states[ps.point], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    B = torch.einsum("sr,si,sj->rij", cap.costates[ps.point], xt, xt)
    w, v = torch.linalg.eigh(B)
    r = int(w[:, 0].argmin())
    xt_phi[r] = v[r, :, 0]
    eps, losses = search_eps(model, ps.point, xt_phi, (x, y), F.mse_loss, [1e-3, 2e-3, 5e-3])
    assert eps is None
    assert all(losses[e] > losses[0.0] for e in (1e-3, 2e-3, 5e-3))


class NoSuffix(nn.Module):
    """A growable model without forward_from (search_eps falls back to full passes)."""

    def __init__(self, inner):
        super().__init__()
        self.stem, self.blocks, self.head = inner.stem, inner.blocks, inner.head
        self._inner = [inner]

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)

    def new_block(self, point):
        return self._inner[0].new_block(point)


def test_search_eps_without_forward_from_and_atomic_on_error():
    model, x, y = _problem(8)
    best = score(model, (x, y), F.mse_loss).best
    ref_eps, ref_losses = search_eps(model, best.point, best.phi, (x, y), F.mse_loss)
    wrapped = NoSuffix(model)
    eps, losses = search_eps(wrapped, best.point, best.phi, (x, y), F.mse_loss)
    assert eps == ref_eps
    for e in losses:
        assert losses[e] == pytest.approx(ref_losses[e], rel=1e-12)

    calls = {"n": 0}

    def flaky(out, t):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return F.mse_loss(out, t)

    for m in (model, wrapped):
        snap = snapshot(m)
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="boom"):
            search_eps(m, best.point, best.phi, (x, y), flaky)
        assert_untouched(m, snap)


def test_search_eps_errors():
    model, x, y = _problem(9)
    phi = torch.zeros(8, 9, dtype=torch.float64)
    phi[0, 0] = 1
    with pytest.raises(ValueError, match="grid must hold at least one non-zero eps"):
        search_eps(model, 0, phi, (x, y), F.mse_loss, [0.0])
    with pytest.raises(ValueError, match="eps must be a finite real number"):
        search_eps(model, 0, phi, (x, y), F.mse_loss, [float("nan")])
    with pytest.raises(ValueError, match=r"loss_fn must return a scalar"):
        search_eps(model, 0, phi, (x, y), lambda o, t: (o - t) ** 2)
    xn = x.clone()
    xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="x must contain only finite values"):
        search_eps(model, 0, phi, (xn, y), F.mse_loss)
