"""Compute accounting (topoderiv.growth.compute): FLOP counts against analytic counts and the ops' cost
model, counting that changes nothing, compute to a target read off synthetic histories with known
crossings, the comparison's compute table, and `topoderiv compare --target`."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topoderiv.ops as ops
from topoderiv.cli import main
from topoderiv.experiments.compare import Comparison, RunResult
from topoderiv.growth import GrowthHistory, Grower, InsertionStrategy, RoundRecord, TopologicalStrategy, score
from topoderiv.growth.checkpoint import load_checkpoint, save
from topoderiv.growth.compute import (
    ComputeCurve,
    FlopCounter,
    compute_curve,
    compute_to_target,
    count_call,
    optimizer_flops_per_element,
    training_step_flops,
)
from topoderiv.models import ResidualMLP


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _linear_shapes(model: ResidualMLP):
    """(in, out) of every nn.Linear of a ResidualMLP, stem first, head last."""
    return [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]


def _train_step_analytic(model: ResidualMLP, batch: int) -> int:
    """Matrix-product FLOPs of forward + backward: forward 2 B in out per layer; backward 2 B in out
    for the weight gradient of every layer and 2 B in out for the input gradient of every layer but
    the stem (its input, the data, needs none)."""
    shapes = _linear_shapes(model)
    total = sum(6 * batch * i * o for i, o in shapes)
    return total - 2 * batch * shapes[0][0] * shapes[0][1]


# --- training FLOPs -----------------------------------------------------------------------------


def test_training_step_of_a_residual_mlp_is_the_analytic_count():
    torch.manual_seed(0)
    model = ResidualMLP(5, 16, 3, 3)
    B = 32
    x, y = torch.randn(B, 5), torch.randn(B, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    P = sum(p.numel() for p in model.parameters())
    fb, opt_flops, elements = training_step_flops(model, (x,), {}, opt)
    assert fb == _train_step_analytic(model, B)
    assert (opt_flops, elements) == (13 * P, P)
    # "6 x parameters x samples" overcounts by exactly what torch's formulas leave out or the data
    # needs not: the bias parameters (6 B each) and the stem's input gradient (2 B d_in width)
    biases = sum(o for _, o in _linear_shapes(model))
    assert 6 * P * B - fb == 6 * B * biases + 2 * B * 5 * 16
    # a real training step under the counter: the same forward + backward, and the optimiser's
    # update counted at its step (13 FLOPs per element for Adam)
    with FlopCounter(opt) as c:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    assert (c.torch_flops, c.optimizer_flops, c.ops_flops, c.optimizer_steps) == (fb, 13 * P, 0, 1)
    assert c.total == fb + 13 * P


def test_frozen_parameters_cost_no_weight_gradient_and_no_update():
    torch.manual_seed(0)
    model = ResidualMLP(5, 16, 3, 2)
    for p in list(model.stem.parameters()) + list(model.blocks.parameters()):
        p.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    B = 8
    fb, opt_flops, elements = training_step_flops(model, (torch.randn(B, 5),), {}, opt)
    forward = sum(2 * B * i * o for i, o in _linear_shapes(model))
    assert fb == forward + 2 * B * 16 * 3  # the head's weight gradient only
    assert (opt_flops, elements) == (5 * (16 * 3 + 3), 16 * 3 + 3)


@pytest.mark.parametrize("make, per", [
    (lambda p: torch.optim.Adam(p), 13), (lambda p: torch.optim.Adam(p, amsgrad=True), 14),
    (lambda p: torch.optim.Adam(p, weight_decay=0.1), 15), (lambda p: torch.optim.AdamW(p), 14),
    (lambda p: torch.optim.AdamW(p, weight_decay=0.0), 13), (lambda p: torch.optim.SGD(p, lr=0.1), 2),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 5),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 7),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-4), 7),
    (lambda p: torch.optim.RMSprop(p), 9), (lambda p: torch.optim.Adagrad(p), 8)])
def test_optimizer_flops_per_element(make, per):
    opt = make([nn.Parameter(torch.zeros(3))])
    assert optimizer_flops_per_element(opt, opt.param_groups[0]) == per


def test_unknown_optimizer_is_named():
    opt = torch.optim.Adamax([nn.Parameter(torch.zeros(3))])
    with pytest.raises(TypeError, match="optimizer must be an Adam, AdamW, SGD, RMSprop or Adagrad .* got Adamax"):
        optimizer_flops_per_element(opt, opt.param_groups[0])
    with pytest.warns(UserWarning, match="update FLOPs of Adamax are not counted"):
        g = Grower(ResidualMLP(2, 4, 1, 1), lambda p: torch.optim.Adamax(p), [(torch.randn(8, 2), torch.randn(8, 1))],
                   [(torch.randn(8, 2), torch.randn(8, 1))], F.mse_loss, strategy="random", epochs_per_round=1,
                   max_rounds=0, progress=False)
    g.run()
    rec = g.history.rounds[0]
    assert rec.optimizer_flops is None and rec.train_flops == _train_step_analytic(g.model, 8)
    with pytest.raises(TypeError, match="FlopCounter: optimizer must be a torch.optim.Optimizer or None, got int"):
        FlopCounter(3)
    with pytest.raises(ValueError, match="extra_per_element must be an int >= 0, got -1"):
        FlopCounter(extra_per_element=-1)


def test_our_counter_agrees_with_torchs_flop_counter_mode():
    """On a network without silu (whose decomposition FlopCounterMode would run), the two count alike."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(7, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 2))
    x = torch.randn(19, 7)
    with FlopCounterMode(display=False) as theirs:
        net(x).square().mean().backward()
    with FlopCounter() as ours:
        net(x).square().mean().backward()
    assert ours.total == theirs.get_total_flops() > 0


def _data(n=100, batch=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:])
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)], [(x[:40], y[:40])]


def test_a_rounds_training_flops_scale_one_step_to_the_epochs_samples_and_steps():
    """100 samples in batches of 32, 32, 32, 4: per epoch 100 samples' forward + backward and 4 Adam steps."""
    train, val = _data()
    torch.manual_seed(0)
    model = ResidualMLP(2, 8, 1, 1)
    g = Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), train, val, F.mse_loss, strategy="random",
               epochs_per_round=3, max_rounds=1, patience=9, progress=False, seed=0, val_every_epoch=True)
    g.run()
    r0, r1 = g.history.rounds
    for rec, depth in ((r0, 1), (r1, 2)):
        torch.manual_seed(0)
        P = sum(p.numel() for p in ResidualMLP(2, 8, 1, depth).parameters())
        per_epoch = _train_step_analytic(ResidualMLP(2, 8, 1, depth), 100) + 13 * P * 4
        assert rec.train_flops == 3 * per_epoch and rec.optimizer_flops == 3 * 13 * P * 4
        assert rec.score_flops == 0 and rec.search_flops == 0  # random insertion scores nothing
        assert len(rec.val_curve) == 3 and rec.val_curve[-1] == rec.val_loss
        assert len(rec.epoch_times) == 3 and rec.train_time == pytest.approx(sum(rec.epoch_times))
        assert rec.flops == rec.train_flops
    assert "cum GF" in g.history.table()


def test_counting_changes_nothing_and_is_deterministic():
    """Counted and uncounted runs train bit-identical networks (the counter never runs a timed step)."""
    def run(count, val_every_epoch):
        train, val = _data(n=128)
        torch.manual_seed(0)
        model = ResidualMLP(2, 8, 1, 1)
        g = Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), train, val, F.mse_loss,
                   strategy=TopologicalStrategy(eps_grid=[0.05, 0.2]), epochs_per_round=2, max_rounds=2, patience=9,
                   progress=False, seed=0, count_flops=count, val_every_epoch=val_every_epoch)
        g.run()
        return g, torch.get_rng_state()

    (a, rng_a), (b, rng_b), (c, _) = run(False, False), run(True, True), run(True, True)
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(x, y)
    assert torch.equal(rng_a, rng_b)
    assert [r.val_loss for r in a.history.rounds] == [r.val_loss for r in b.history.rounds]
    assert [r.train_curve for r in a.history.rounds] == [r.train_curve for r in b.history.rounds]
    assert all(r.train_flops is None and r.score_flops is None for r in a.history.rounds)
    assert [r.flops for r in b.history.rounds] == [r.flops for r in c.history.rounds]
    assert all(r.score_flops > 0 and r.search_flops > 0 for r in b.history.insertions)
    assert all(r.info["compute"]["counting_time"] >= 0 for r in b.history.insertions)


# --- scoring FLOPs: the ops' cost model ---------------------------------------------------------


def test_the_ops_are_counted_by_their_cost_model_with_the_reported_steps():
    torch.manual_seed(0)
    N, d, n = 300, 12, 5
    m = d + 1
    x, p = torch.randn(N, d), torch.randn(N, n) / N
    with FlopCounter() as c:
        blocks = ops.sensitivity_blocks(x, p)
    assert c.ops_flops == 2 * N * n * m * (m + 1) // 2 and c.torch_flops == 0
    with FlopCounter() as c:
        ops.sensitivity_blocks(x, p, out=blocks)
    assert c.ops_flops == N * n * m * (m + 1)
    with FlopCounter() as c:
        res = ops.lanczos_topk(blocks, 1)
    assert c.ops_flops == 2 * m * m * int(res.steps.sum()) and c.lanczos_steps == int(res.steps.sum()) > 0
    assert c.solves == {"dense": 1, "matfree": 0}
    with FlopCounter() as c:
        out = torch.ops.topoderiv.sensitivity_lanczos(x, p, True, 1, m, 1e-6, 0, None)
    steps = out[3].to(torch.int64)
    assert c.ops_flops == 2 * 2 * N * m * int(steps.sum()) and c.solves == {"dense": 0, "matfree": 1}
    with FlopCounter() as c:
        ops.sensitivity_matvec(x, p, torch.randn(n, m))
    assert c.ops_flops == 2 * 2 * N * n * m
    # nothing counted outside the block, and a disabled counter counts nothing
    with FlopCounter(enabled=False) as c:
        ops.sensitivity_blocks(x, p)
    assert c.total is None and c.ops_flops is None


def _capture_analytic(model: ResidualMLP, N: int) -> int:
    """Forward 2 N in out per layer; backward to the states only (no weight gradients): the input
    gradient of every block and of the head."""
    shapes = _linear_shapes(model)
    return sum(2 * N * i * o for i, o in shapes) + sum(2 * N * i * o for i, o in shapes[1:])


@pytest.mark.parametrize("route", ["dense", "auto"])
def test_scoring_flops_match_the_ops_cost_model(route):
    """score(): capture pass by torch's formulas + solve by the cost model of topoderiv.ops.choose_route
    (dense: N n m(m+1)/2 + steps n m^2 multiply-adds per point, steps = the model's 12), within 10%."""
    torch.manual_seed(0)
    N, width, depth = 1024, 32, 3
    model = ResidualMLP(4, width, 2, depth)
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(N, 4, generator=g)
    data = [(xs[i:i + 256], torch.randn(256, 2, generator=g)) for i in range(0, N, 256)]
    _, c = count_call(lambda: score(model, data, F.mse_loss, route=route, backend="kernels"))
    m, n, points = width + 1, width, depth + 1
    assert ops.choose_route(N, width, n) == "dense"
    model_madds = points * (N * n * m * (m + 1) / 2 + 12 * n * m * m)
    expected = _capture_analytic(model, N) + 2 * model_madds
    assert c.torch_flops == _capture_analytic(model, N)  # exactly the capture pass
    assert abs(c.total - expected) <= 0.10 * expected, (c.total, expected)
    # and exactly the model with the steps the solves reported
    assert c.ops_flops == points * N * n * m * (m + 1) + 2 * m * m * c.lanczos_steps


def test_scoring_matrix_free_counts_the_reported_steps():
    torch.manual_seed(0)
    model = ResidualMLP(4, 16, 2, 2)
    data = [(torch.randn(128, 4), torch.randn(128, 2))]
    _, c = count_call(lambda: score(model, data, F.mse_loss, route="matfree", backend="kernels"))
    m = 17
    assert c.solves["matfree"] == 3 and c.solves["dense"] == 0
    assert c.ops_flops == 2 * 2 * 128 * m * c.lanczos_steps


def test_topological_strategy_records_scoring_and_search_flops():
    train, val = _data(n=128)
    torch.manual_seed(0)
    model = ResidualMLP(2, 8, 1, 1)
    g = Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), train, val, F.mse_loss,
               strategy=TopologicalStrategy(eps_grid=[0.05, 0.2], backend="kernels", route="dense"),
               epochs_per_round=1, max_rounds=1, patience=9, progress=False, seed=0)
    g.run()
    rec = g.history.rounds[1]
    comp = rec.info["compute"]
    m = 9  # scored before the insertion: depth 1, two points, 128 samples
    assert comp["score_capture_flops"] == _capture_analytic(ResidualMLP(2, 8, 1, 1), 128)
    assert comp["score_solve_flops"] == 2 * 128 * 8 * m * (m + 1) + 2 * m * m * comp["lanczos_steps"]
    assert rec.score_flops == comp["score_flops"] == comp["score_capture_flops"] + comp["score_solve_flops"]
    assert comp["solves"] == {"dense": 2, "matfree": 0} and comp["samples"] == 128
    # the eps search: forward passes, at most one per grid value and batch, plus the baseline
    assert 0 < rec.search_flops
    assert rec.flops == rec.train_flops + rec.score_flops + rec.search_flops


# --- compute to a target ------------------------------------------------------------------------


def _hist(val_curves=True) -> GrowthHistory:
    """Round 0: 2 epochs of 100 FLOPs / 1 s, val 1.0, 0.8. Round 1: inserts (scoring 30 + search 20
    FLOPs, 0.5 s), 2 epochs of 120 FLOPs / 2 s, val 0.7, 0.4."""
    r0 = RoundRecord(0, 2, 0.9, 0.8, 10, 1, 2.1, [1.0, 0.9], val_curve=[1.0, 0.8] if val_curves else [],
                     train_flops=200, optimizer_flops=20, score_flops=0, search_flops=0, train_time=2.0,
                     epoch_times=[1.0, 1.0])
    r1 = RoundRecord(1, 2, 0.5, 0.4, 12, 2, 4.6, [0.6, 0.5], point=0, eps=0.1, insert_time=0.5,
                     val_curve=[0.7, 0.4] if val_curves else [], train_flops=240, optimizer_flops=24, score_flops=30,
                     search_flops=20, train_time=4.0, epoch_times=[2.0, 2.0])
    return GrowthHistory([r0, r1], {"stop_reason": "max_rounds (1) reached"})


@pytest.mark.parametrize("target, flops, secs, epoch", [
    (0.5, 490 - 120 / 3, 6.5 - 2 / 3, 4),  # inside round 1's last epoch: f = (0.7 - 0.5) / (0.7 - 0.4)
    (0.9, 150, 1.5, 2),                    # halfway through epoch 2
    (0.8, 200, 2.0, 2),                    # exactly at an evaluation
    (0.75, 310, 3.5, 3),                   # after the insertion: scoring and search (0.5 s) counted whole
    (1.2, 100, 1.0, 1),                    # the first evaluation: no earlier one, its own compute
])
def test_compute_to_target_interpolates_within_the_crossing_epoch(target, flops, secs, epoch):
    reach = compute_to_target(_hist(), target)
    assert reach.reached and reach.epoch == epoch
    assert reach.flops == pytest.approx(flops) and reach.time == pytest.approx(secs)
    # the same from the JSON history (round trip) and from its dict
    back = GrowthHistory.from_dict(json.loads(json.dumps(_hist().to_dict())))
    assert compute_to_target(back, target) == reach == compute_to_target(_hist().to_dict(), target)


def test_compute_to_target_not_reached_and_per_round_evaluations():
    assert not compute_to_target(_hist(), 0.3).reached
    assert math.isnan(compute_to_target(_hist(), 0.3).flops)
    # without per-epoch validation: one evaluation per round, interpolated over the round's training
    reach = compute_to_target(_hist(val_curves=False), 0.6)
    f = (0.8 - 0.6) / (0.8 - 0.4)
    assert reach.flops == pytest.approx(490 - (1 - f) * 240) and reach.time == pytest.approx(6.5 - (1 - f) * 4.0)
    curve = compute_curve(_hist())
    assert curve.epoch == [1, 2, 3, 4] and curve.flops == [100, 200, 370, 490]
    assert curve.insertions == [(250.0, 2.5, 2, 0)] and curve.total_flops == 490 and curve.total_time == 6.5
    h = _hist()
    h.meta["stop_compute"] = {"score_flops": 7, "search_flops": 3, "time": 0.25}  # a last failed proposal
    assert compute_curve(h).total_flops == 500 and compute_curve(h).total_time == 6.75
    for bad in (math.nan, math.inf, "0.5", None, True):
        with pytest.raises(ValueError, match="target must be a finite number"):
            compute_to_target(_hist(), bad)
    with pytest.raises(TypeError, match="history must be a GrowthHistory or its to_dict"):
        compute_to_target(42, 0.5)


def test_histories_without_flops_give_nan_compute():
    h = _hist()
    for r in h.rounds:
        r.train_flops = None
    reach = compute_to_target(h, 0.5)
    assert reach.reached and math.isnan(reach.flops) and reach.time == pytest.approx(6.5 - 2 / 3)


def test_compute_fields_round_trip_through_a_checkpoint(tmp_path):
    h = _hist()
    h.rounds[1].val_curve = [0.7, math.nan]
    save(ResidualMLP(2, 4, 1, 2), tmp_path / "ck", history=h)
    back = load_checkpoint(tmp_path / "ck").history
    for a, b in zip(h.rounds, back.rounds):
        for k in ("train_flops", "optimizer_flops", "score_flops", "search_flops", "train_time", "epoch_times"):
            assert getattr(a, k) == getattr(b, k), k
    assert back.rounds[0].val_curve == [1.0, 0.8] and back.rounds[1].val_curve[0] == 0.7
    assert math.isnan(back.rounds[1].val_curve[1])


class _GiveUp(InsertionStrategy):
    """Proposes nothing, after 'scoring' that cost 123 + 7 FLOPs."""

    name = "give_up"

    def propose(self, grower):
        self.last_info = {"reason": "nothing", "compute": {"score_flops": 123, "search_flops": 7}}
        return None


def test_a_last_failed_proposal_is_carried_by_the_finish_round():
    train, val = _data()
    torch.manual_seed(0)
    g = Grower(ResidualMLP(2, 8, 1, 1), lambda p: torch.optim.Adam(p, lr=1e-2), train, val, F.mse_loss,
               strategy=_GiveUp(), epochs_per_round=1, max_rounds=2, patience=9, progress=False, seed=0)
    g.run()
    assert g.history.meta["stop_compute"]["score_flops"] == 123
    assert compute_curve(g.history).total_flops == g.history.rounds[0].flops + 130
    rec = g.finish(2)
    assert rec.info["phase"] == "finish" and (rec.score_flops, rec.search_flops) == (123, 7)
    assert "stop_compute" not in g.history.meta and rec.epochs == 2 and len(g.history.rounds) == 2
    assert compute_curve(g.history).total_flops == sum(r.flops for r in g.history.rounds)
    with pytest.raises(ValueError, match="Grower.finish: epochs must be an int >= 0, got -1"):
        g.finish(-1)


# --- the comparison's compute table -------------------------------------------------------------


def _run(method, seed, vals, flops_per_epoch, secs_per_epoch=1.0, pre=0):
    rec = RoundRecord(0, len(vals), 0.1, vals[-1], 10, 2, 1.0, list(vals), val_curve=list(vals),
                      train_flops=flops_per_epoch * len(vals), score_flops=pre, search_flops=0,
                      epoch_times=[secs_per_epoch] * len(vals), train_time=secs_per_epoch * len(vals))
    return RunResult(method, seed, 0.5, "mse", 0.1, vals[-1], 0.1, 2, 10, len(vals), 1.0,
                     GrowthHistory([rec], {"method": method, "seed": seed}))


def _comparison(target=None):
    runs = [
        # fixed_final: best 0.40 (seed 0) and 0.50 (seed 1), reached at the end of epoch 4 / epoch 3
        _run("fixed_final", 0, [1.0, 0.8, 0.6, 0.4], 100), _run("fixed_final", 1, [1.0, 0.7, 0.5, 0.55], 100),
        # cheap: reaches 0.40 at the end of epoch 2 (60 FLOPs per epoch), 0.50 at the end of epoch 1
        _run("cheap", 0, [0.6, 0.4, 0.3, 0.3], 60), _run("cheap", 1, [0.5, 0.45, 0.4, 0.4], 60),
        # never: never below 0.9
        _run("never", 0, [1.0, 0.95, 0.92, 0.91], 10), _run("never", 1, [1.0, 0.95, 0.92, 0.91], 10),
    ]
    return Comparison("synthetic", "mse", False, ["cheap", "never", "fixed_final"], [0, 1], {}, runs,
                      {"target": target})


def test_comparison_compute_summary_and_table():
    comp = _comparison()
    assert comp.targets() == {0: 0.4, 1: 0.5}
    s = comp.compute_summary()
    assert s["fixed_final"]["reached"] == 2 and s["fixed_final"]["flops"] == pytest.approx((400 + 300) / 2)
    assert s["cheap"]["reached"] == 2 and s["cheap"]["flops"] == pytest.approx((120 + 60) / 2)
    # saving per seed: 1 - 120/400 = 0.7 and 1 - 60/300 = 0.8
    assert s["cheap"]["flops_saving"] == pytest.approx(0.75) and s["cheap"]["paired"] == 2
    assert s["cheap"]["time_saving"] == pytest.approx(1 - (2 / 4 + 1 / 3) / 2)
    assert s["never"]["reached"] == 0 and math.isnan(s["never"]["flops"]) and math.isnan(s["never"]["flops_saving"])
    assert s["never"]["total_flops"] == 40
    table = comp.compute_table()
    assert "| never | 0/2 | not reached | — |" in table and "| cheap | 2/2 |" in table and "+75%" in table
    assert "best validation loss of fixed_final on that seed" in table
    # a given target for every seed: fixed_final reaches 0.6 in seed 0 (epoch 3), seed 1 interpolated
    s = comp.compute_summary(0.6)
    assert comp.targets(0.6) == {0: 0.6, 1: 0.6}
    assert s["fixed_final"]["flops"] == pytest.approx((300 + (200 + (0.7 - 0.6) / (0.7 - 0.5) * 100)) / 2)
    assert "validation loss 0.6 (given)" in comp.compute_table(0.6)
    d = json.loads(json.dumps(comp.to_dict(), default=str))
    assert d["compute"]["targets"] == {"0": 0.4, "1": 0.5} and d["compute"]["summary"]["cheap"]["reached"] == 2
    assert {(r["method"], r["seed"], r["reached"]) for r in d["compute"]["runs"]} >= {("never", 0, False)}


def test_comparison_of_runs_without_flops_says_not_counted():
    comp = _comparison()
    for r in comp.runs:
        r.history.rounds[0].train_flops = None
    table = comp.compute_table()
    assert "| cheap | 2/2 | not counted |" in table and "| never | 0/2 | not reached |" in table


def test_comparison_target_errors():
    comp = _comparison()
    comp.methods = ["cheap", "never"]
    with pytest.raises(ValueError, match="target must be given when 'fixed_final' is not among the methods"):
        comp.compute_summary()
    assert comp.to_dict()["compute"] is None
    assert comp.compute_summary(0.5)["cheap"]["reached"] == 2
    with pytest.raises(ValueError, match="target must be None or a finite number .* got nan"):
        _comparison().targets(math.nan)


# --- CLI ----------------------------------------------------------------------------------------

TINY = ["--task", "regression", "--n-train", "64", "--rounds", "1", "--epochs", "2", "--width", "8",
        "--no-progress", "--threads", "1", "--seeds", "0"]


@pytest.mark.parametrize("bad", ["-1", "0", "nan", "inf", "abc"])
def test_compare_target_is_validated(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--target", bad])
    assert exc.value.code == 2
    assert f"argument --target: expected a finite number > 0, got '{bad}'" in capsys.readouterr().err


def test_compare_target_writes_the_compute_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--methods", "random", "fixed_final", "--target", "0.45", "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    assert "## Compute to reach the target validation loss" in md and "Target: validation loss 0.45 (given)." in md
    assert "| random |" in md.split("## Compute")[1] and "| fixed_final |" in md.split("## Compute")[1]
    res = json.loads((out / "results.json").read_text())
    assert res["compute"]["target"] == 0.45 and set(res["compute"]["summary"]) == {"random", "fixed_final"}
    assert res["meta"]["target"] == 0.45
    hist = res["runs"][0]["history"]["rounds"]
    assert all(len(r["val_curve"]) == r["epochs"] and r["train_flops"] > 0 for r in hist)
    assert (out / "compute.png").stat().st_size > 1000
    # the default target (fixed_final's best) and per-round validation only
    out2 = tmp_path / "cmp2"
    assert main(["compare", *TINY, "--methods", "random", "fixed_final", "--no-epoch-val", "--out", str(out2)]) == 0
    res = json.loads((out2 / "results.json").read_text())
    assert res["compute"]["target"] is None and res["compute"]["summary"]["fixed_final"]["reached"] == 1
    assert all(r["val_curve"] == [] for run in res["runs"] for r in run["history"]["rounds"])
    # no fixed_final and no --target: a note instead of the table
    out3 = tmp_path / "cmp3"
    assert main(["compare", *TINY, "--methods", "random", "--out", str(out3)]) == 0
    assert "No table: " in (out3 / "results.md").read_text() and "(give --target)" in (out3 / "results.md").read_text()
