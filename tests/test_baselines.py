"""Baseline strategies do what they claim; compare() runs every method with the same budget."""
from __future__ import annotations

import math

import pytest
import torch

from topoderiv.experiments.compare import DEFAULT_METHODS, METHODS, Comparison, compare, make_budget, run_method
from topoderiv.growth import ForwardThinking, IdentityInsertion, RandomInsertion
from topoderiv.growth import Grower, InsertionStrategy
from topoderiv.models import ResidualMLP
from topoderiv.experiments.tasks import get_task

TINY = {"width": 8, "epochs_per_round": 1, "rounds": 2, "batch_size": 32}


@pytest.fixture(scope="module")
def task():
    return get_task("regression", seed=0, n_train=64, n_val=16, n_test=32)


def _grower(task, model, strategy, **kw):
    return Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), task.loader("train", 32), task.val, task.loss_fn,
                  strategy=strategy, epochs_per_round=1, max_rounds=1, patience=5, progress=False, seed=0, **kw)


def _model(task, depth=2):
    torch.manual_seed(0)
    return ResidualMLP(task.d_in, 8, task.d_out, depth)


def test_random_insertion_valid_point_small_init(task):
    model = _model(task)
    g = _grower(task, model, RandomInsertion(scale=0.1))
    points = set()
    for _ in range(20):
        prop = g.strategy.propose(g)
        assert 0 <= prop.point <= len(model.blocks)
        points.add(prop.point)
        assert prop.phi.shape == (8, 9)  # [W | b]
        std = float(prop.phi.std())
        assert 0.1 / math.sqrt(8) / 2 < std < 0.1 / math.sqrt(8) * 2
    assert points == {0, 1, 2}  # uniform over every candidate point
    x = task.val[0]
    before = model(x).detach()
    prop = g.strategy.propose(g)
    g.apply(prop)
    assert len(model.blocks) == 3
    blk = model.blocks[prop.point]
    assert torch.equal(blk.linear.weight.detach(), prop.phi[:, :8]) and torch.equal(blk.linear.bias.detach(), prop.phi[:, 8])
    after = model(x).detach()
    assert torch.isfinite(after).all()
    assert (after - before).abs().max() < 0.05  # small init: close to (not exactly) the old function


def test_identity_insertion_preserves_function_and_trains(task):
    model = _model(task)
    g = _grower(task, model, IdentityInsertion())
    x, y = task.val
    before = model(x).detach().clone()
    prop = g.strategy.propose(g)
    assert 0 <= prop.point <= 2 and prop.block is not None
    g.apply(prop)
    assert len(model.blocks) == 3
    assert torch.equal(model(x).detach(), before)  # exact function preservation
    blk = model.blocks[prop.point]
    assert isinstance(blk.activation, torch.nn.Tanh)
    assert blk.linear.weight.abs().max() == 0
    task.loss_fn(model(x), y).backward()
    assert blk.linear.weight.grad.abs().max() > 0  # trainable at first order (tanh'(0) = 1)


def test_identity_with_admissible_activation_is_a_dead_block(task):
    """Why the default is tanh: with sigma'(0) = 0 the zero block gets exactly zero gradient."""
    model = _model(task)
    g = _grower(task, model, IdentityInsertion(activation=None, point="last"))
    prop = g.strategy.propose(g)
    assert prop.point == 2
    g.apply(prop)
    x, y = task.val
    task.loss_fn(model(x), y).backward()
    assert model.blocks[2].linear.weight.grad.abs().max() == 0


def test_forward_thinking_freezes_earlier_layers(task):
    model = _model(task)
    snaps = {}

    def snap(grower, rec):
        snaps[rec.round] = {k: v.detach().clone() for k, v in grower.model.state_dict().items()}

    g = Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), task.loader("train", 32), task.val, task.loss_fn,
               strategy=ForwardThinking(), epochs_per_round=2, max_rounds=2, patience=5, progress=False, seed=0,
               freeze_existing=True, callbacks=[snap])
    g.run()
    assert len(model.blocks) == 4 and [r.point for r in g.history.rounds] == [None, 2, 3]
    final = model.state_dict()
    # stem and the initial blocks never change after round 0
    for k, v in snaps[0].items():
        if not k.startswith("head."):
            assert torch.equal(final[k], v), k
    # block 2 (added in round 1) trains in round 1, then is frozen in round 2
    for k in ("blocks.2.linear.weight", "blocks.2.linear.bias"):
        assert torch.equal(final[k], snaps[1][k])
    # the newest block and the head train
    assert not torch.equal(final["head.weight"], snaps[1]["head.weight"])
    assert final["blocks.3.linear.weight"].abs().max() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "blocks.3.linear.weight", "blocks.3.linear.bias", "head.weight", "head.bias"]


def test_forward_thinking_needs_freeze(task):
    g = _grower(task, _model(task), ForwardThinking())
    with pytest.raises(ValueError, match="freeze_existing=True"):
        g.strategy.propose(g)


def test_strategy_argument_errors():
    with pytest.raises(ValueError, match="scale"):
        RandomInsertion(scale=-1.0)
    with pytest.raises(ValueError, match="point must be 'random' or 'last'"):
        IdentityInsertion(point="middle")


class _Never(InsertionStrategy):
    name = "never"

    def propose(self, grower):
        self.last_info = {"reason": "test"}
        return None


def test_run_method_spends_the_whole_budget(task):
    budget = dict(TINY, rounds=3)
    r = run_method(task, "random", 0, budget=budget, strategy=_Never())
    assert r.epochs == 4 and r.depth == 2
    assert r.history.rounds[-1].info["phase"] == "finish"
    r2 = run_method(task, "initial", 0, budget=budget)
    assert r2.epochs == 4 and len(r2.history.rounds) == 1
    r3 = run_method(task, "fixed_final", 0, budget=budget, final_depth=5)
    assert r3.depth == 5 and r3.epochs == 4
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run_method(task, "nope")


def test_run_method_honours_the_budget(task):
    r = run_method(task, "initial", 0, budget={"width": 6, "depth": 3, "epochs_per_round": 1, "rounds": 1,
                                               "batch_size": 16}, keep_model=True)
    assert r.model.width == 6 and len(r.model.blocks) == 3 and r.epochs == 2
    assert r.optimizer.param_groups[0]["lr"] == task.config.lr
    # 64 samples in batches of 16: 4 Adam steps per epoch
    assert all(s["step"] == 8 for s in r.optimizer.state.values())


def test_run_method_sgd_budget(task):
    from topoderiv.experiments.tasks import ModelConfig

    r = run_method(task, "random", 0, budget={"epochs_per_round": 1, "rounds": 1, "optimizer": "sgd", "lr": 0.02},
                   keep_model=True)
    assert isinstance(r.optimizer, torch.optim.SGD) and r.optimizer.param_groups[0]["momentum"] == 0.9
    # the inserted block's parameters joined the optimiser and have momentum buffers
    assert len(r.model.blocks) == task.config.depth + 1
    assert {id(p) for p in r.model.parameters()} == {id(p) for g in r.optimizer.param_groups for p in g["params"]}
    assert all("momentum_buffer" in r.optimizer.state[p] for p in r.model.parameters())
    with pytest.raises(ValueError, match="optimizer must be one of \\('adam', 'sgd'\\), got 'rmsprop'"):
        ModelConfig(width=4, optimizer="rmsprop")


def test_run_method_deterministic(task):
    a = run_method(task, "random", 3, budget=TINY)
    b = run_method(task, "random", 3, budget=TINY)
    assert a.metric == b.metric and [r.point for r in a.history.rounds] == [r.point for r in b.history.rounds]


def test_compare_tiny_budget_every_method(task, tmp_path):
    comp = compare(task, seeds=[0, 1], budget=TINY, progress=False)
    assert comp.methods == list(DEFAULT_METHODS)
    assert len(comp.runs) == len(DEFAULT_METHODS) * 2
    s = comp.summary()
    for m in DEFAULT_METHODS:
        assert s[m]["n"] == 2 and math.isfinite(s[m]["mean"]) and s[m]["epochs"] == 3
    for seed in (0, 1):
        td = [r for r in comp.runs if r.method == "topological" and r.seed == seed][0]
        ff = [r for r in comp.runs if r.method == "fixed_final" and r.seed == seed][0]
        assert ff.depth == td.depth
    init = comp.by_method("initial")
    assert all(r.depth == 2 for r in init)
    table = comp.table()
    assert table.count("\n") == len(DEFAULT_METHODS) + 1
    for m in DEFAULT_METHODS:
        assert f"| {m} |" in table
    assert "mse (mean ± std, lower is better)" in table
    back = Comparison.from_json(comp.to_json(tmp_path / "c.json"))
    assert back.table() == table


def test_compare_errors(task):
    with pytest.raises(ValueError, match="unknown method 'bogus'"):
        compare(task, ["bogus"], progress=False)
    with pytest.raises(ValueError, match="distinct"):
        compare(task, ["initial", "initial"], progress=False)
    with pytest.raises(ValueError, match="unknown budget fields"):
        make_budget(task, {"epochs": 3})


def test_methods_registry():
    assert set(DEFAULT_METHODS) <= set(METHODS)
    assert METHODS["forward_thinking"].freeze_existing
    assert not METHODS["initial"].grows and not METHODS["fixed_final"].grows


def test_topological_all_rows_is_the_scorer_rule_all():
    """TopologicalAllRows is TopologicalStrategy(rule="all") under its own method name; its config
    rebuilds it (checkpoint resume)."""
    from topoderiv.growth import TopologicalAllRows
    from topoderiv.growth import TopologicalStrategy

    strat = TopologicalAllRows(backend="torch", max_tries=2)
    assert isinstance(strat, TopologicalStrategy) and strat.rule == "all" and strat.name == "topological_all"
    cfg = strat.config()
    assert cfg["name"] == "topological_all" and cfg["rule"] == "all"
    assert TopologicalAllRows(**{k: v for k, v in cfg.items() if k != "name"}).config() == cfg
    assert isinstance(METHODS["topological_all"].strategy(), TopologicalAllRows)
    with pytest.raises(ValueError, match="rule must be 'all'"):
        TopologicalAllRows(rule="top")


def test_topological_all_rows_inserts_a_wide_block(task):
    from topoderiv.growth import TopologicalAllRows

    model = _model(task)
    g = _grower(task, model, TopologicalAllRows(backend="torch"))
    g.run()
    assert len(model.blocks) == 3
    rec = g.history.rounds[1]
    assert rec.info["live_rows"] > 1 and rec.eps is not None
    new = model.blocks[rec.point].linear.weight
    assert int((new.abs().sum(1) > 0).sum()) == rec.info["live_rows"]
