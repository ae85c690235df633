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


# --------------------------------------------------------------------------------------------
# CNN and ViT: every baseline on conv and transformer sites; the transformer growers' baselines


def _images(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    return (x[:32], y[:32]), (x[32:], y[32:])


def _net(kind, depth=1):
    from topoderiv.models import ResidualCNN, ViT

    torch.manual_seed(0)
    if kind == "cnn":
        return ResidualCNN(1, 2, channels=(3, 4), depths=(depth, depth))
    return ViT(img_size=8, patch_size=4, in_chans=1, num_classes=2, embed_dim=8, depth=depth, num_heads=2,
               insert=kind)


def _image_grower(kind, strategy, depth=1, **kw):
    from topoderiv.experiments.tasks import Batches

    train, val = _images()
    kw = {"epochs_per_round": 1, "max_rounds": 2, "patience": 10, "progress": False, "seed": 0, **kw}
    return Grower(_net(kind, depth), lambda p: torch.optim.Adam(p, lr=1e-2), Batches(*train, 16, shuffle=True, seed=3),
                  [val], torch.nn.functional.cross_entropy, strategy=strategy, **kw)


def _container_of(model, site_name):
    return model.get_submodule(site_name.rsplit(".", 1)[0])


@pytest.mark.parametrize("kind", ["cnn", "transformer_block", "tokens"])
@pytest.mark.parametrize("rule", ["random", "last", "middle"])
def test_stacking_copies_the_neighbouring_block(kind, rule):
    from topoderiv.growth import StackingInsertion
    from topoderiv.sites import sites

    g = _image_grower(kind, StackingInsertion(point=rule), depth=2)
    model = g.model
    with torch.no_grad():  # make every block different, so "equals its neighbour" is not trivially true
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape))
    seen = set()
    for _ in range(12 if rule == "random" else 1):
        prop = g.strategy.propose(g)
        seen.add(prop.point)
        site = sites(model)[prop.point]
        src = max(site.index - 1, 0)
        assert prop.info["copied"] == f"{site.spec.container}.{src}"
        want = site.container[src].state_dict()
        got = prop.block.state_dict()
        assert list(got) == list(want)
        for k in want:  # the same weights, in new tensors
            assert torch.equal(got[k], want[k]) and got[k].data_ptr() != want[k].data_ptr(), k
    all_sites = sites(model)
    if rule == "random":
        assert len(seen) > 1
    elif rule == "last":
        assert seen == {all_sites[-1].point}
    else:
        assert seen == {all_sites[(len(all_sites) - 1) // 2].point}
    # inserted: the new block sits right after its original, equal to it, and trains
    prop = g.strategy.propose(g)
    site = sites(model)[prop.point]
    src_state = {k: v.clone() for k, v in site.container[max(site.index - 1, 0)].state_dict().items()}
    block = g.apply(prop)
    cont = site.container
    new_index = site.index
    assert cont[new_index] is block
    neighbour = cont[new_index - 1] if new_index > 0 else cont[1]
    for k, v in neighbour.state_dict().items():
        assert torch.equal(v, src_state[k]) and torch.equal(block.state_dict()[k], v), k
    assert all(p.requires_grad for p in block.parameters())
    assert {id(p) for p in block.parameters()} <= {id(p) for grp in g.optimizer.param_groups for p in grp["params"]}


def test_stacking_changes_the_function_and_needs_a_block():
    """A copy is not function preserving (B(B(x)) != B(x)); empty containers have nothing to copy."""
    from topoderiv.growth import StackingInsertion

    g = _image_grower("transformer_block", StackingInsertion(point="last"), depth=1)
    x = _images()[1][0]
    before = g.model(x).detach()
    g.apply(g.strategy.propose(g))
    assert not torch.allclose(g.model(x), before)
    empty = _image_grower("transformer_block", StackingInsertion(), depth=0)
    assert empty.strategy.propose(empty) is None and "empty" in empty.strategy.last_info["reason"]
    with pytest.raises(ValueError, match="point must be one of \\('random', 'last', 'middle'\\), got 'top'"):
        StackingInsertion(point="top")


@pytest.mark.parametrize("kind", ["transformer_block", "mlp_block", "attention_block"])
def test_zero_block_leaves_the_function_unchanged_and_trains(kind):
    from topoderiv.growth import ZeroBlockInsertion
    from topoderiv.sites.transformer import AttentionBlock, Block, MlpBlock

    g = _image_grower(kind, ZeroBlockInsertion(), depth=2)
    x, y = _images()[1]
    before = g.model(x).detach().clone()
    points = set()
    for _ in range(12):
        points.add(g.strategy.propose(g).point)
    assert points == {0, 1, 2}  # uniform over the candidate points
    prop = g.strategy.propose(g)
    block = g.apply(prop)
    assert isinstance(block, {"transformer_block": Block, "mlp_block": MlpBlock, "attention_block": AttentionBlock}[kind])
    assert torch.equal(g.model(x).detach(), before)  # exactly the old function
    outs = [m for m in (getattr(block, "attn", None), getattr(block, "mlp", None)) if m is not None]
    out_layers = [m.proj if hasattr(m, "proj") else m.fc2 for m in outs]
    inner = [m.qkv if hasattr(m, "qkv") else m.fc1 for m in outs]
    for lin in out_layers:
        assert lin.weight.abs().max() == 0 and lin.bias.abs().max() == 0
    for lin in inner:  # timm's init: N(0, 0.02^2) weights, zero biases
        assert 0.01 < float(lin.weight.detach().std()) < 0.03 and lin.bias.abs().max() == 0
    torch.nn.functional.cross_entropy(g.model(x), y).backward()
    for lin in out_layers:  # trainable at first order
        assert lin.weight.grad.abs().max() > 0


def test_zero_block_needs_transformer_sites():
    from topoderiv.growth import ZeroBlockInsertion

    for kind in ("cnn", "tokens"):
        g = _image_grower(kind, ZeroBlockInsertion())
        with pytest.raises(ValueError, match="must be of a transformer kind .* got a '(conv|tokens)' site"):
            g.strategy.propose(g)
    with pytest.raises(ValueError, match="init_std must be a finite number > 0, got 0"):
        ZeroBlockInsertion(init_std=0)
    with pytest.raises(ValueError, match="point must be one of"):
        ZeroBlockInsertion(point="first")


@pytest.mark.parametrize("kind", ["cnn", "transformer_block"])
def test_random_identity_forward_thinking_on_conv_and_transformer_sites(kind):
    x, y = _images()[1]
    # identity: function preserved exactly, first-order trainable
    g = _image_grower(kind, IdentityInsertion())
    before = g.model(x).detach().clone()
    block = g.apply(g.strategy.propose(g))
    assert torch.equal(g.model(x).detach(), before)
    torch.nn.functional.cross_entropy(g.model(x), y).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in block.parameters())
    # random: the same block type with a small random init (close to, not exactly, the old function)
    g = _image_grower(kind, RandomInsertion(scale=0.1))
    before = g.model(x).detach().clone()
    prop = g.strategy.propose(g)
    block = g.apply(prop)
    assert type(block) is type(g.model.get_submodule(_first_container(g.model))[-1])  # the same block type
    after = g.model(x).detach()
    assert not torch.equal(after, before) and (after - before).abs().max() < 0.5 * before.abs().max()
    # forward thinking: a block on top, everything else but it and the head frozen
    g = _image_grower(kind, ForwardThinking(), freeze_existing=True, max_rounds=1)
    g.run()
    trainable = [n for n, p in g.model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("head.", "stages.1.1.", "blocks.1.")) for n in trainable), trainable


def _first_container(model):
    from topoderiv.sites import site_specs

    return site_specs(model)[0].container


@pytest.mark.parametrize("kind, name", [("cnn", "stacking"), ("transformer_block", "stacking"),
                                        ("transformer_block", "zero_block"), ("mlp_block", "zero_block")])
def test_stacking_and_zero_block_resume_bit_identically(tmp_path, kind, name):
    """Interrupted after round 1 and resumed from the checkpoint (the strategy rebuilt from the
    registry by its name and config), every RNG disturbed: the same run as without interruption."""
    import random
    import shutil

    from topoderiv.experiments.tasks import Batches
    from topoderiv.growth import STRATEGIES
    from topoderiv.growth.checkpoint import optimizer_state

    def snap(grower, rec):
        if rec.round == 1:
            shutil.copytree(grower.checkpoint_dir, tmp_path / "round1")

    strat = STRATEGIES[name](point="random")
    g = _image_grower(kind, strat, depth=2, checkpoint_dir=tmp_path / "ck", callbacks=[snap])
    hist = g.run()
    assert len(hist.insertions) == 2, hist.stop_reason
    train, val = _images()
    torch.manual_seed(999)
    random.seed(999)
    g2 = Grower.from_checkpoint(tmp_path / "round1", Batches(*train, 16, shuffle=True, seed=3), [val],
                                torch.nn.functional.cross_entropy, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2),
                                checkpoint_dir=tmp_path / "resumed")
    assert g2.strategy.name == name and g2.strategy.config() == strat.config()
    g2.run()
    sa, sb = g.model.state_dict(), g2.model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    (ma, ta), (mb, tb) = optimizer_state(g.model, g.optimizer), optimizer_state(g2.model, g2.optimizer)
    assert ma == mb and sorted(ta) == sorted(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [(r.point, r.val_loss, r.info.get("copied")) for r in g.history.rounds] == \
        [(r.point, r.val_loss, r.info.get("copied")) for r in g2.history.rounds]
