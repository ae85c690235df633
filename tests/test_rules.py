"""The rules that turn eigenpairs into phi: the reference code's rule exactly, "multi", and the
reference code's when-to-grow rule in the Grower.

The reference rule is checked against an independent float64 re-implementation of the reference
code's loop over the WHOLE block-diagonal spectrum of Q (built here with einsum + eigh), never
against the code itself.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from topoderiv.growth import Grower, InsertionStrategy, Proposal, TopologicalStrategy, insert, score
from topoderiv.method.rules import eigen_rule, reference_count
from topoderiv.method.statistic import canonical_sign, kernels_available
from topoderiv.models import ResidualMLP
from topoderiv.sites.capture import capture_all

BACKENDS = ["torch", pytest.param("kernels", marks=pytest.mark.skipif(not kernels_available(), reason="no _C"))]


def _problem(seed, width=6, depth=3, n=40):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResidualMLP(3, width, 2, depth).double()
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return model, x, y


def _reference_loop(model, x, y):
    """The reference code, re-implemented: per point, the whole spectrum of Q (float64, dense),
    summed from the top while within 50% of the largest, the first one below included."""
    cap = capture_all(model.double(), (x, y), F.mse_loss)
    out = {}
    for pt, xs in cap.states.items():
        p = cap.costates[pt]
        xt = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=xs.dtype)], dim=1)
        blocks = torch.einsum("sr,si,sj->rij", p, xt, xt)  # sigma''(0) = 1 for the TD activation
        q = torch.block_diag(*blocks)
        lam = torch.linalg.eigvalsh(q).flip(0).tolist()
        total, count = 0.0, 0
        for v in lam:
            total += v
            count += 1
            if v < 0.5 * lam[0]:
                break
        above = sum(1 for v in lam if v >= 0.5 * lam[0])
        out[pt] = (total, count, above, lam[0])
    return out


def test_reference_count_unit():
    assert reference_count([4.0, 3.0, 1.0, 0.5]) == 3  # 4, 3 (>= 2), then 1 < 2 is included and stops
    assert reference_count([4.0, 1.0]) == 2
    assert reference_count([4.0, 2.0, 2.0]) == 3  # none falls below: all of them
    assert reference_count([]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_rule_matches_the_reference_loop(backend):
    found_wider = False
    for seed in range(6):
        model, x, y = _problem(seed)
        ref = _reference_loop(model, x, y)
        rep = score(model, (x, y), F.mse_loss, rule="reference", backend=backend)
        for ps in rep.points:
            total, count, above, top = ref[ps.point]
            assert ps.n_pairs == count, (seed, ps.point)
            assert ps.score == pytest.approx(total, rel=1e-8, abs=1e-14)
            assert ps.mu == pytest.approx(top, rel=1e-8)
            # phi: the chosen eigenvectors summed, unit norm, gain = their mean eigenvalue
            assert float(ps.phi.norm()) == pytest.approx(1.0, abs=1e-12)
            assert ps.quotient == pytest.approx(total / count, rel=1e-8)
            found_wider |= count > 2 and above == count - 1  # the old "multi" stopped at `above`
        best_ref = max(ref, key=lambda pt: ref[pt][0])
        if rep.best is not None:
            assert rep.best.point == best_ref  # ranked by the summed score
    assert found_wider, "no network where the reference count exceeds two: the test would not see the difference"


def test_reference_phi_quotient_against_dense_q():
    """phi^T Q phi of the reference phi, with Q built densely here, equals the reported gain."""
    model, x, y = _problem(3)
    rep = score(model, (x, y), F.mse_loss, rule="reference", backend="torch")
    cap = capture_all(model, (x, y), F.mse_loss)
    for ps in rep.points:
        xs, p = cap.states[ps.point], cap.costates[ps.point]
        xt = torch.cat([xs, torch.ones(xs.shape[0], 1, dtype=xs.dtype)], dim=1)
        blocks = torch.einsum("sr,si,sj->rij", p, xt, xt)
        quad = float(torch.einsum("ri,rij,rj->", ps.phi, blocks, ps.phi))
        assert quad == pytest.approx(ps.quotient, rel=1e-9)


def test_multi_is_the_reference_phi_ranked_by_mu():
    model, x, y = _problem(4)
    ref = score(model, (x, y), F.mse_loss, rule="reference", backend="torch")
    mul = score(model, (x, y), F.mse_loss, rule="multi", backend="torch")
    for a, b in zip(ref.points, mul.points):
        torch.testing.assert_close(a.phi, b.phi, rtol=0, atol=1e-12)
        assert b.score == b.mu and a.n_pairs == b.n_pairs
    assert mul.best.point == max(mul.points, key=lambda p: p.mu).point


def test_reference_rule_with_few_lanczos_pairs_completes_blocks():
    """eigen_rule asks for the full spectrum of blocks whose top-k stays above the threshold."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, 5, generator=g, dtype=torch.float64)
    blocks = a + a.mT
    w, v = torch.linalg.eigh(blocks)
    w, v = w.flip(-1), canonical_sign(v.flip(-1))  # the statistic hands canonical signs to the rules
    full = eigen_rule(w, v, "reference")
    calls = []

    def blocks_of(idx):
        calls.append(idx.tolist())
        return blocks[idx]

    part = eigen_rule(w[:, :1], v[:, :, :1], "reference", blocks_of=blocks_of)
    assert calls, "blocks_of was never asked for the full spectrum"
    assert part.n_pairs == full.n_pairs and part.score == pytest.approx(full.score, rel=1e-12)
    assert abs(float((part.phi * full.phi).sum())) == pytest.approx(1.0, abs=1e-9)


def test_reference_arbiter():
    """The reference phi is a second-order descent direction with gain ``quotient`` (FD)."""
    model, x, y = _problem(5)
    rep = score(model, (x, y), F.mse_loss, rule="reference", backend="torch")
    with torch.no_grad():
        j0 = float(F.mse_loss(model(x), y))
    for ps in rep.points:
        m2 = copy.deepcopy(model)
        insert(m2, ps.point, ps.phi, 1e-3)
        with torch.no_grad():
            dj = float(F.mse_loss(m2(x), y)) - j0
        assert dj / ps.predicted_change(1e-3) == pytest.approx(1.0, abs=0.01)


# ---- when to grow ------------------------------------------------------------------------------


class _Counting(InsertionStrategy):
    name = "counting"

    def propose(self, grower):
        return Proposal(len(grower.model.blocks), eps=1.0)  # a zero block at the top


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 2, generator=g)
    y = torch.sin(3 * x[:, :1]) * x[:, 1:]
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)], (x[:32], y[:32])


def _since_best(vals, min_delta=0.0):
    best, since = math.inf, 0
    for v in vals:
        if v < best - min_delta:
            best, since = v, 0
        else:
            since += 1
    return since


@pytest.mark.parametrize("grow_patience", [1, 2])
def test_grow_patience_inserts_only_after_stalls(grow_patience):
    torch.manual_seed(0)
    train, val = _data(0)
    model = ResidualMLP(2, 6, 1, 1)
    g = Grower(model, lambda p: torch.optim.SGD(p, lr=0.5), train, val, F.mse_loss, strategy=_Counting(),
               epochs_per_round=1, max_rounds=3, patience=grow_patience + 2, grow_patience=grow_patience,
               max_total_rounds=12, progress=False, seed=0)
    hist = g.run()
    rounds = hist.rounds
    inserted = [r.round for r in rounds if r.point is not None]
    trained = [r.round for r in rounds[1:] if r.point is None]
    assert trained, "no training-only round: the rule was not exercised"
    for r in rounds[1:]:
        since = _since_best([q.val_loss for q in rounds[: r.round]])
        if r.point is not None:
            assert since >= grow_patience, (r.round, since)
        else:
            assert since < grow_patience and r.info.get("phase") == "train", (r.round, since)
    assert len(model.blocks) == 1 + len(inserted)


def test_grow_patience_errors():
    train, val = _data(1)
    model = ResidualMLP(2, 4, 1, 1)
    with pytest.raises(ValueError, match="grow_patience must be None or an int >= 1"):
        Grower(model, lambda p: torch.optim.SGD(p, lr=0.1), train, val, F.mse_loss, grow_patience=0)
    with pytest.raises(ValueError, match="patience must exceed grow_patience"):
        Grower(model, lambda p: torch.optim.SGD(p, lr=0.1), train, val, F.mse_loss, grow_patience=2, patience=2)


def test_topological_strategy_with_reference_rule_grows():
    train, val = _data(2)
    model = ResidualMLP(2, 6, 1, 1)
    g = Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), train, val, F.mse_loss,
               strategy=TopologicalStrategy(rule="reference"), epochs_per_round=2, max_rounds=1, patience=3,
               progress=False, seed=0)
    hist = g.run()
    assert len(hist.insertions) == 1 and hist.insertions[0].info["live_rows"] >= 1
    assert hist.meta["strategy"]["rule"] == "reference"
