"""The growth loop: a short run, optimiser state across insertions, schedules, freezing, stop rules, resume."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import topoderiv
from topoderiv.growth import GrowthHistory, Grower, InsertionStrategy, Proposal, TopologicalStrategy, grow
from topoderiv.models import ResidualBlock, ResidualMLP
from topoderiv.growth.training import evaluate, fit


def _data(seed=0, n=256, batch=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:]) + 0.5 * x[:, :1] ** 2
    n_tr = n * 3 // 4
    train = [(x[i : i + batch], y[i : i + batch]) for i in range(0, n_tr, batch)]
    val = [(x[n_tr:], y[n_tr:])]
    return train, val


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


class FixedStrategy(InsertionStrategy):
    """Inserts a given direction at a given point (deterministic, for bookkeeping tests)."""

    name = "fixed"

    def __init__(self, point=0, scale=0.1, block=None):
        super().__init__()
        self.point, self.scale, self.block = point, scale, block

    def propose(self, grower):
        if self.block is not None:
            return Proposal(self.point, block=self.block)
        w = torch.zeros(grower.model.width, grower.model.width)
        w[0, 0] = 1.0
        return Proposal(self.point, weight=w, bias=torch.ones(grower.model.width), eps=self.scale,
                        info={"mu": {0: 1.5}})


def test_short_growth_run_grows_and_writes_history(tmp_path):
    torch.manual_seed(0)
    train, val = _data()
    model = ResidualMLP(2, 8, 1, 1)
    hist = grow(model, _adam, train, val, F.mse_loss, epochs_per_round=15, max_rounds=2, patience=3,
                progress=False, seed=0, test_data=val, test_metric=F.l1_loss)
    assert len(hist.insertions) >= 1
    assert len(model.blocks) == 1 + len(hist.insertions)
    first = hist.rounds[0]
    assert first.point is None and first.depth == 1 and len(first.train_curve) == 15
    for rec in hist.insertions:
        assert rec.mu and max(rec.mu.values()) > 0
        tried = rec.info["tried"]  # points tried by the eps search, in decreasing mu
        assert rec.point == tried[-1] and rec.mu[tried[0]] == max(rec.mu.values())
        assert rec.eps is not None and rec.eps > 0
        assert rec.info["actual_change"] < 0
        assert rec.test_metric is not None and math.isfinite(rec.val_loss)
    assert [r.n_params for r in hist.rounds] == sorted(r.n_params for r in hist.rounds)
    assert hist.stop_reason
    path = hist.to_json(tmp_path / "h" / "history.json")
    raw = json.loads(path.read_text())
    assert raw["rounds"][1]["point"] == hist.rounds[1].point
    back = GrowthHistory.from_json(path)
    assert [r.val_loss for r in back.rounds] == [r.val_loss for r in hist.rounds]
    assert back.rounds[1].mu == hist.rounds[1].mu
    assert "round" in hist.table() and "stopped" in hist.table()
    # the recorded final val loss is the model's
    assert evaluate(model, val, F.mse_loss) == pytest.approx(hist.rounds[-1].val_loss, rel=1e-6)


def test_optimizer_state_survives_growth():
    torch.manual_seed(1)
    train, val = _data(1)
    model = ResidualMLP(2, 8, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = Grower(model, opt, train, val, F.mse_loss, strategy=FixedStrategy(1), progress=False)
    fit(model, opt, train, F.mse_loss, 2)  # 6 steps
    old = list(model.parameters())
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in old}
    objs = {id(p): opt.state[p]["exp_avg"] for p in old}
    g.apply(g.strategy.propose(g))
    new = list(model.blocks[1].parameters())
    assert all(id(p) in {id(q) for q in opt.param_groups[0]["params"]} for p in new)
    for p in old:  # untouched: same tensors, same values
        assert opt.state[p]["exp_avg"] is objs[id(p)]
        for k, v in before[id(p)].items():
            assert torch.equal(opt.state[p][k], v)
    fit(model, opt, train, F.mse_loss, 1)  # 3 more steps
    for p in old:
        assert float(opt.state[p]["step"]) == 9.0  # a reset would give 3
    for p in new:
        assert float(opt.state[p]["step"]) == 3.0
    # the moments continue: the first moment after 3 more steps is NOT what a fresh Adam gives
    p = old[0]
    fresh_m = opt.state[p]["exp_avg"]
    assert not torch.allclose(fresh_m, torch.zeros_like(fresh_m))


def test_scheduler_continues_and_new_params_get_the_scheduled_lr():
    torch.manual_seed(2)
    train, val = _data(2)
    model = ResidualMLP(2, 8, 1, 1)
    sched_factory = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    g = Grower(model, _adam, train, val, F.mse_loss, strategy=FixedStrategy(0), epochs_per_round=2,
               max_rounds=2, patience=10, progress=False, scheduler=sched_factory)
    hist = g.run()
    assert len(hist.insertions) == 2
    assert len(g.optimizer.param_groups) == 1
    assert g.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 6)
    assert [r.lr for r in hist.rounds] == pytest.approx([1e-2 * 0.5 ** 2, 1e-2 * 0.5 ** 4, 1e-2 * 0.5 ** 6])


def test_freeze_existing_trains_only_new_block_and_head():
    torch.manual_seed(3)
    train, val = _data(3)
    model = ResidualMLP(2, 8, 1, 1)
    g = Grower(model, _adam, train, val, F.mse_loss, strategy=FixedStrategy(1), freeze_existing=True,
               progress=False)
    fit(model, g.optimizer, train, F.mse_loss, 1)
    g.apply(g.strategy.propose(g))
    snap = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit(model, g.optimizer, train, F.mse_loss, 2)
    for n, p in model.named_parameters():
        trainable = n.startswith("blocks.1.") or n.startswith("head.")
        assert p.requires_grad == trainable, n
        assert torch.equal(p, snap[n]) != trainable, n


def test_stop_rules():
    train, val = _data(4)

    class Nothing(InsertionStrategy):
        def propose(self, grower):
            self.last_info = {"reason": "nothing to do", "mu": {0: -1.0}}
            return None

    model = ResidualMLP(2, 8, 1, 1)
    h = grow(model, _adam, train, val, F.mse_loss, strategy=Nothing(), epochs_per_round=1, progress=False)
    assert len(h.rounds) == 1 and "nothing to do" in h.stop_reason and len(model.blocks) == 1

    # an identity block changes nothing at lr = 0: no improvement -> stop after `patience` rounds
    model = ResidualMLP(2, 8, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    h = grow(model, opt, train, val, F.mse_loss, strategy=FixedStrategy(0, scale=0.0), epochs_per_round=1,
             max_rounds=10, patience=2, progress=False)
    assert len(h.insertions) == 2 and "did not improve for 2 rounds" in h.stop_reason

    model = ResidualMLP(2, 8, 1, 1)
    h = grow(model, _adam, train, val, F.mse_loss, strategy=FixedStrategy(0), epochs_per_round=1, max_rounds=10,
             max_depth=3, patience=10, progress=False)
    assert len(model.blocks) == 3 and "max_depth" in h.stop_reason


def test_custom_block_proposal_and_bad_proposal_is_atomic():
    train, val = _data(5)
    model = ResidualMLP(2, 8, 1, 1)
    blk = ResidualBlock(8, activation="tanh").to(torch.float64)
    g = Grower(model, _adam, train, val, F.mse_loss, strategy=FixedStrategy(0, block=blk), progress=False)
    g.apply(g.strategy.propose(g))
    assert model.blocks[0] is blk and blk.linear.weight.dtype == torch.float32
    assert any(p is blk.linear.weight for p in g.optimizer.param_groups[0]["params"])
    n_params = len(g.optimizer.param_groups[0]["params"])
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"proposal.weight must be a tensor \[n, d_in\] = \[8, 8\]"):
        g.apply(Proposal(0, weight=torch.zeros(8)))
    with pytest.raises(ValueError, match=r"proposal.weight must be a tensor \[n, d_in\] = \[8, 8\].*got \[8, 3\]"):
        g.apply(Proposal(0, weight=torch.zeros(8, 3)))
    with pytest.raises(ValueError, match=r"phi must have shape \[n, m\] = \[8, 9\]"):
        g.apply(Proposal(0, phi=torch.zeros(8, 3)))
    with pytest.raises(TypeError, match="must return a Proposal"):
        g.apply("block")
    assert len(model.blocks) == 2 and len(g.optimizer.param_groups[0]["params"]) == n_params
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_grower_argument_errors():
    train, val = _data(6)
    model = ResidualMLP(2, 8, 1, 1)
    with pytest.raises(TypeError, match="Sequential"):
        Grower(nn.Sequential(nn.Linear(2, 1)), _adam, train, val, F.mse_loss)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or a factory"):
        Grower(model, "adam", train, val, F.mse_loss)
    with pytest.raises(ValueError, match="patience must be an int >= 1"):
        Grower(model, _adam, train, val, F.mse_loss, patience=0)
    with pytest.raises(ValueError, match="strategy must be an InsertionStrategy or one of"):
        Grower(model, _adam, train, val, F.mse_loss, strategy="no-such-strategy")
    with pytest.raises(TypeError, match="re-iterable"):
        fit(model, torch.optim.SGD(model.parameters(), 0.1), iter(train), F.mse_loss, 1)
    xn = train[0][0].clone()
    xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fit(model, torch.optim.SGD(model.parameters(), 0.1), [(xn, train[0][1])], F.mse_loss, 1)


def test_resume_from_checkpoint_continues(tmp_path):
    torch.manual_seed(7)
    train, val = _data(7)
    model = ResidualMLP(2, 8, 1, 1)
    g = Grower(model, _adam, train, val, F.mse_loss, strategy=FixedStrategy(1), epochs_per_round=2, max_rounds=1,
               patience=10, progress=False, checkpoint_dir=tmp_path / "ck")
    h = g.run()
    assert len(h.rounds) == 2
    steps = {n: float(g.optimizer.state[p]["step"]) for n, p in model.named_parameters()}
    g2 = Grower.from_checkpoint(tmp_path / "ck", train, val, F.mse_loss, strategy=FixedStrategy(1), max_rounds=2)
    assert len(g2.model.blocks) == 2 and g2.epochs_per_round == 2 and g2.patience == 10
    steps2 = {n: float(g2.optimizer.state[p]["step"]) for n, p in g2.model.named_parameters()}
    assert steps2 == steps
    with torch.no_grad():
        x = val[0][0]
        assert torch.equal(g2.model(x), model(x))
    h2 = g2.run()
    assert [r.round for r in h2.rounds] == [0, 1, 2] and len(g2.model.blocks) == 3
    assert h2.rounds[:2][0].val_loss == h.rounds[0].val_loss
    assert topoderiv.load(tmp_path / "ck").config()["depth"] == 3


def test_resume_rebuilds_the_topological_strategy_and_keep_best(tmp_path):
    train, val = _data(8)
    model = ResidualMLP(2, 8, 1, 1)
    g = Grower(model, _adam, train, val, F.mse_loss, strategy=TopologicalStrategy(rule="multi", eps_grid=[0.05, 0.5]), epochs_per_round=1,
               max_rounds=0, progress=False, keep_best=True)
    g.run()
    assert g.best_model is not None and g.best_model is not model
    g.save(tmp_path / "ck")
    g2 = Grower.from_checkpoint(tmp_path / "ck", train, val, F.mse_loss)
    assert isinstance(g2.strategy, topoderiv.TopologicalStrategy)
    assert g2.strategy.config() == g.strategy.config() and g2.strategy.rule == "multi"
    assert g2.keep_best and g2.checkpoint_dir == tmp_path / "ck"


def test_rule_all_grows_a_wide_block_and_resumes_as_topological_all(tmp_path):
    from topoderiv.growth import TopologicalAllRows

    train, val = _data(8)
    torch.manual_seed(0)
    model = ResidualMLP(2, 8, 1, 1)
    g = Grower(model, _adam, train, val, F.mse_loss, strategy=TopologicalStrategy(rule="all"), epochs_per_round=1, max_rounds=1, patience=5,
               progress=False)
    h = g.run()
    assert g.strategy.rule == "all"
    assert len(h.insertions) == 1
    rec = h.insertions[0]  # every row with mu_r > 0 starts live (rule "top" would give exactly one)
    assert rec.info["live_rows"] > 1 and 0 < rec.info["quotient"] < rec.mu[rec.point]
    assert int((model.blocks[rec.point].linear.weight.abs().sum(1) > 0).sum()) == rec.info["live_rows"]
    g2 = Grower(ResidualMLP(2, 8, 1, 1), _adam, train, val, F.mse_loss, strategy=TopologicalAllRows(),
                epochs_per_round=1, max_rounds=0, progress=False)
    g2.run()
    g2.save(tmp_path / "ck")
    g3 = Grower.from_checkpoint(tmp_path / "ck", train, val, F.mse_loss)
    assert isinstance(g3.strategy, TopologicalAllRows) and g3.strategy.config() == g2.strategy.config()


def test_training_after_identity_insertion_matches_uninterrupted_adam():
    """An eps = 0 block leaves the function and the old parameters' gradients unchanged (sigma'(0) = 0),
    so with the optimiser state carried over, training continues EXACTLY as if nothing was inserted.
    Resetting the Adam moments (or the step count) would break this equality."""
    import copy

    torch.manual_seed(9)
    train, val = _data(9)
    model = ResidualMLP(2, 8, 1, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = Grower(model, opt, train, val, F.mse_loss, strategy=FixedStrategy(1, scale=0.0), progress=False)
    fit(model, opt, train, F.mse_loss, 2)
    oracle = copy.deepcopy(model)
    oracle_opt = torch.optim.Adam(oracle.parameters(), lr=1e-2)
    oracle_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # state_dict() shares storage
    g.apply(g.strategy.propose(g))
    fit(model, opt, train, F.mse_loss, 2)
    fit(oracle, oracle_opt, train, F.mse_loss, 2)
    grown = dict(model.named_parameters())
    for n, p in oracle.named_parameters():
        i = int(n.split(".")[1]) if n.startswith("blocks.") else None
        name = n if i is None or i < 1 else n.replace(f"blocks.{i}.", f"blocks.{i + 1}.", 1)
        torch.testing.assert_close(grown[name], p, rtol=1e-6, atol=1e-7, msg=name)
    # and a reset really would differ (the test can fail)
    fresh = copy.deepcopy(oracle)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    fit(fresh, fresh_opt, train, F.mse_loss, 1)
    fit(oracle, oracle_opt, train, F.mse_loss, 1)
    assert not torch.allclose(fresh.head.weight, oracle.head.weight, rtol=1e-6, atol=1e-7)
