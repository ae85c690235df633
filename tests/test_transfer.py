"""Transfer learning by insertion (topoderiv.experiments.transfer): data, freezing, function
preservation, TD scoring through a frozen network (against finite differences), the result table
and the ``topoderiv transfer`` command, on a tiny configuration."""
from __future__ import annotations

import copy
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from topoderiv import cli
from topoderiv.experiments import transfer as tr
from topoderiv.growth import insert, score, search_eps
from topoderiv.sites.transformer import Block

TINY = dict(n_target_train=40, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0, patch_size=4, source_epochs=2,
            warmup_epochs=2, epochs=2, blocks=2, batch_size=16)


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    cfg = tr.TransferConfig(**TINY)
    data = tr.transfer_data("split", seed=3, n_target_train=cfg.n_target_train)
    source = tr.train_source(cfg, data, 3)
    probe = tr.linear_probe(source, cfg, data, 3)
    return cfg, data, source, probe


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _block_numel(cfg):
    return sum(p.numel() for p in Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio).parameters())


def _head_numel(cfg):
    return cfg.embed_dim * 5 + 5


# --------------------------------------------------------------------------------------------- data


def test_data_source_is_digits_0_to_4_and_target_5_to_9_relabelled():
    from sklearn.datasets import load_digits

    d = load_digits()
    data = tr.transfer_data("split", seed=1, n_target_train=50)
    assert data["target_train"][0].shape == (50, 1, 8, 8) and data["source_train"][0].shape[1:] == (1, 8, 8)
    assert data["source_train"][0].shape[0] + data["source_test"][0].shape[0] == int((d.target < 5).sum())
    assert data["target_train"][0].shape[0] + data["target_test"][0].shape[0] == int((d.target >= 5).sum())
    # undo the (one scalar) affine scaling: raw pixels are the integers 0..16, both ends occur
    allx = torch.cat([data[k][0].double().flatten() for k in data])
    lo, hi = float(allx.min()), float(allx.max())
    label_of = {}
    for img, t in zip(d.images, d.target):
        label_of.setdefault(tuple(int(v) for v in img.flatten()), set()).add(int(t))
    for key, shift in (("source_train", 0), ("source_test", 0), ("target_train", 5), ("target_test", 5)):
        x, y = data[key]
        raw = (x.double().flatten(1) - lo) / (hi - lo) * 16
        assert torch.allclose(raw, raw.round(), atol=1e-4), key
        for r, lab in zip(raw.round().long().tolist(), y.tolist()):
            assert lab + shift in label_of[tuple(r)], key  # an sklearn image of that digit
    # the source is scaled to mean 0, std 1 on its training images
    xs = data["source_train"][0].double()
    assert float(xs.mean()) == pytest.approx(0.0, abs=1e-5) and float(xs.std()) == pytest.approx(1.0, abs=1e-5)


def test_data_targets_rotated_and_inverted_are_transforms_of_split():
    a = tr.transfer_data("split", seed=2, n_target_train=30)
    r = tr.transfer_data("rotated", seed=2, n_target_train=30)
    v = tr.transfer_data("inverted", seed=2, n_target_train=30)
    assert torch.equal(r["target_train"][1], a["target_train"][1])
    assert torch.equal(r["target_train"][0], torch.rot90(a["target_train"][0], 1, dims=(2, 3)))
    assert torch.equal(r["source_train"][0], a["source_train"][0])
    # inversion: raw' = 16 - raw, so scaled' = (16 - 2m)/s - scaled: the sum is one constant
    total = v["target_train"][0].double() + a["target_train"][0].double()
    assert torch.allclose(total, total.flatten()[0].expand_as(total), atol=1e-5)
    with pytest.raises(ValueError, match="target"):
        tr.transfer_data("flipped")
    with pytest.raises(ValueError, match="n_target_train"):
        tr.transfer_data("split", n_target_train=896)


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="target"):
        tr.TransferConfig(target="other")
    with pytest.raises(ValueError, match="num_heads"):
        tr.TransferConfig(embed_dim=10, num_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        tr.TransferConfig(patch_size=3)
    with pytest.raises(ValueError, match="blocks"):
        tr.TransferConfig(blocks=0)
    with pytest.raises(ValueError, match="lr"):
        tr.TransferConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="methods"):
        tr.run_transfer(tr.TransferConfig(**TINY), [0], ["nope"])
    with pytest.raises(ValueError, match="td_points"):
        tr.insert_blocks(copy.deepcopy(tr.ViT(8, 4, 1, 5, 8, 1, 2)), "random_blocks", tr.TransferConfig(**TINY),
                         tr.transfer_data("split", n_target_train=40), 0)


# ----------------------------------------------------------------------------------------- freezing


def test_probe_trains_only_a_new_head(setup):
    cfg, data, source, probe = setup
    assert probe.head.out_features == 5 and source.head.out_features == 5
    sp, pp = _params(source), _params(probe)
    for n in sp:
        if n.startswith("head."):
            assert not torch.equal(sp[n], pp[n])
        else:
            assert torch.equal(sp[n], pp[n]), n


@pytest.mark.parametrize("method", ["td", "td_live", "random_phi", "random_blocks", "zero_blocks"])
def test_inserting_methods_train_only_the_new_blocks_and_the_head(setup, method):
    cfg, data, source, probe = setup
    td_points = None if method in ("td", "td_live", "zero_blocks") else [0, 1]
    before = _params(probe)
    model, rec = tr.adapt(probe, method, cfg, data, 3, td_points=td_points)
    assert _params(probe).keys() == before.keys() and all(torch.equal(before[n], p) for n, p in _params(probe).items())
    assert len(model.blocks) == cfg.depth + cfg.blocks == rec["depth"]
    new = [b for b in model.blocks if getattr(b, "topoderiv_inserted", False)]
    assert len(new) == cfg.blocks
    old = [b for b in model.blocks if not getattr(b, "topoderiv_inserted", False)]
    # the trainable parameters are exactly the new blocks' and the head's
    want = {id(p) for b in new for p in b.parameters()} | {id(p) for p in model.head.parameters()}
    assert {id(p) for p in model.parameters() if p.requires_grad} == want
    assert rec["trainable"] == cfg.blocks * _block_numel(cfg) + _head_numel(cfg)
    assert rec["params"] == sum(p.numel() for p in probe.parameters()) + cfg.blocks * _block_numel(cfg)
    # frozen parameters are bit for bit the probe's after fine-tuning
    for b_old, b_probe in zip(old, probe.blocks):
        for (n, p), (_, q) in zip(b_old.named_parameters(), b_probe.named_parameters()):
            assert torch.equal(p, q), n
    for name in ("patch_embed", "norm"):
        for p, q in zip(getattr(model, name).parameters(), getattr(probe, name).parameters()):
            assert torch.equal(p, q)
    assert torch.equal(model.cls_token, probe.cls_token) and torch.equal(model.pos_embed, probe.pos_embed)
    # the head and every new block did train (from the blocks as inserted: the insertion is deterministic)
    assert not torch.equal(model.head.weight, probe.head.weight)
    inserted = copy.deepcopy(probe)
    tr.freeze_all_but(inserted, [])
    new0, _ = tr.insert_blocks(inserted, method, cfg, data, 3, td_points)
    for b0, b1 in zip(new0, new):  # weights, not only biases: a block inserted at eps = 0 trains its biases only
        for name in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
            assert not torch.equal(b0.get_parameter(name), b1.get_parameter(name)), name
    assert 0.0 <= rec["accuracy"] <= 1.0 and math.isfinite(rec["test_loss"])
    assert len(rec["points"]) == cfg.blocks


@pytest.mark.parametrize("kind", ["mlp_block", "attention_block"])
def test_sub_block_insertion_counts_and_freezing(kind):
    from topoderiv.sites.transformer import AttentionBlock, MlpBlock

    cfg = tr.TransferConfig(**dict(TINY, insert=kind, blocks=1))
    data = tr.transfer_data("split", seed=4, n_target_train=cfg.n_target_train)
    probe = tr.linear_probe(tr.train_source(cfg, data, 4), cfg, data, 4)
    ref = MlpBlock(cfg.embed_dim, cfg.mlp_ratio) if kind == "mlp_block" else AttentionBlock(cfg.embed_dim, cfg.num_heads)
    for method in ("td", "zero_blocks"):
        model, rec = tr.adapt(probe, method, cfg, data, 4)
        new = [b for b in model.blocks if getattr(b, "topoderiv_inserted", False)]
        assert len(new) == 1 and type(new[0]) is type(ref)
        assert rec["trainable"] == sum(p.numel() for p in ref.parameters()) + _head_numel(cfg)
        for b_old, b_probe in zip([b for b in model.blocks if b is not new[0]], probe.blocks):
            assert all(torch.equal(p, q) for p, q in zip(b_old.parameters(), b_probe.parameters()))
    with pytest.raises(ValueError, match="insert"):
        tr.TransferConfig(insert="tokens")


def test_head_and_full_trainable_sets(setup):
    cfg, data, source, probe = setup
    m_head, r_head = tr.adapt(probe, "head", cfg, data, 3)
    assert r_head["trainable"] == _head_numel(cfg)
    for (n, p), (_, q) in zip(m_head.named_parameters(), probe.named_parameters()):
        assert torch.equal(p, q) != n.startswith("head."), n
    m_full, r_full = tr.adapt(probe, "full", cfg, data, 3)
    n_all = sum(p.numel() for p in probe.parameters())
    assert r_full["trainable"] == n_all == r_full["params"]
    changed = [n for (n, p), (_, q) in zip(m_full.named_parameters(), probe.named_parameters()) if not torch.equal(p, q)]
    assert "blocks.0.mlp.fc1.weight" in changed and "patch_embed.proj.weight" in changed


def test_random_methods_use_the_given_points(setup):
    cfg, data, source, probe = setup
    for method in ("random_phi", "random_blocks"):
        _, rec = tr.adapt(probe, method, cfg, data, 3, td_points=[1, 0])
        assert rec["points"] == [1, 0]


# ------------------------------------------------------------------------- function preservation


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_td_insertion_keeps_the_function_at_eps_0_and_lowers_the_loss_at_the_searched_eps(setup):
    cfg, data, source, probe = setup
    x, y = data["target_train"]
    model = copy.deepcopy(probe)
    tr.freeze_all_but(model, [])
    rep = score(model, [(x, y)], F.cross_entropy, rule="all")
    best = rep.best
    assert best is not None and best.mu > 0
    at0 = insert(copy.deepcopy(model), best.point, best.phi, 0.0)
    assert torch.equal(_logits(at0, x), _logits(probe, x))
    # the searched eps: the inserted model's training loss, computed here by a plain forward, is below the probe's
    eps, losses = search_eps(model, best.point, best.phi, [(x, y)], F.cross_entropy)
    assert eps is not None
    grown = insert(copy.deepcopy(model), best.point, best.phi, eps)
    j0 = float(F.cross_entropy(_logits(probe, x), y))
    j1 = float(F.cross_entropy(_logits(grown, x), y))
    assert j1 < j0
    assert j0 == pytest.approx(losses[0.0], rel=1e-5) and j1 == pytest.approx(losses[eps], rel=1e-5)


def test_zero_blocks_keep_the_function_and_random_blocks_do_not(setup):
    cfg, data, source, probe = setup
    x = data["target_test"][0][:64]
    m = copy.deepcopy(probe)
    tr.insert_blocks(m, "zero_blocks", cfg, data, 3)
    assert torch.equal(_logits(m, x), _logits(probe, x))
    m = copy.deepcopy(probe)
    tr.insert_blocks(m, "random_blocks", cfg, data, 3, td_points=[0, 0])
    assert not torch.allclose(_logits(m, x), _logits(probe, x))


def test_td_leaves_dead_units_that_never_train_and_td_live_revives_them_keeping_the_function(setup):
    cfg, data, source, probe = setup
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    x = data["target_test"][0][:64]
    # td with rule "all": at most D live MLP units (the rank of M, D x (D + 1)); the rest stay at zero
    model, rec = tr.adapt(probe, "td", cfg, data, 3)
    new = [b for b in model.blocks if getattr(b, "topoderiv_inserted", False)]
    for b in new:
        dead = tr.dead_units(b)["mlp"]
        assert len(dead) >= hidden - cfg.embed_dim
        assert (b.mlp.fc1.weight[dead] == 0).all() and (b.mlp.fc2.weight[:, dead] == 0).all()  # after fine-tuning
    # td_live: td's blocks (same points and eps), the dead units revived; the function is unchanged
    m_td, m_live = copy.deepcopy(probe), copy.deepcopy(probe)
    for m in (m_td, m_live):
        tr.freeze_all_but(m, [])
    new_td, info_td = tr.insert_blocks(m_td, "td", cfg, data, 3)
    new_live, info_live = tr.insert_blocks(m_live, "td_live", cfg, data, 3)
    assert info_live["points"] == info_td["points"] and info_live["eps"] == info_td["eps"]
    assert [r["mlp"] for r in info_live["revived"]] == [len(tr.dead_units(b)["mlp"]) for b in new_td]
    assert all(tr.dead_units(b) == {"mlp": [], "attn": []} for b in new_live)
    assert torch.allclose(_logits(m_live, x), _logits(m_td, x), rtol=0, atol=1e-6)
    _, rec_live = tr.adapt(probe, "td_live", cfg, data, 3)
    assert rec_live["trainable"] == rec["trainable"]


def test_td_records_lower_loss_per_insertion(setup):
    cfg, data, source, probe = setup
    m = copy.deepcopy(probe)
    tr.freeze_all_but(m, [])
    x, y = data["target_train"]
    j_start = float(F.cross_entropy(_logits(m, x), y))
    new, info = tr.insert_blocks(m, "td", cfg, data, 3)
    assert len(new) == cfg.blocks and len(info["mu"]) == cfg.blocks and all(mu > 0 for mu in info["mu"])
    assert info["loss_before"][0] == pytest.approx(j_start, rel=1e-5)
    for searched, before, after in zip(info["eps_searched"], info["loss_before"], info["loss_after"]):
        if searched:
            assert after < before
    assert float(F.cross_entropy(_logits(m, x), y)) == pytest.approx(info["loss_after"][-1], rel=1e-5)


# ----------------------------------------------- TD scoring through a frozen network: costates


def test_scoring_a_frozen_network_matches_the_unfrozen_one_and_finite_differences(setup):
    cfg, data, source, probe = setup
    x, y = data["target_train"]
    frozen = copy.deepcopy(probe).double()
    tr.freeze_all_but(frozen, [])
    assert not any(p.requires_grad for p in frozen.parameters())
    live = copy.deepcopy(probe).double()
    tr.freeze_all_but(live, [live])
    batch = [(x.double(), y)]
    r_f = score(frozen, batch, F.cross_entropy, rule="top", backend="torch")
    r_l = score(live, batch, F.cross_entropy, rule="top", backend="torch")
    for a, b in zip(r_f.points, r_l.points):
        assert a.mu == pytest.approx(b.mu, rel=1e-10, abs=1e-14)
    best = r_f.best
    assert best is not None and best.mu > 1e-6
    assert all(p.grad is None for p in frozen.parameters())
    # the arbiter (METHOD.md section 6): J(eps) - J(0) = -(eps^2 / 2) phi^T Q phi + O(eps^3)
    j0 = float(F.cross_entropy(_logits(frozen, x.double()), y))
    ratios = []
    for eps in (1e-2, 5e-3):
        m = insert(copy.deepcopy(frozen), best.point, best.phi, eps)
        dj = float(F.cross_entropy(_logits(m, x.double()), y)) - j0
        ratios.append(dj / best.predicted_change(eps))
    assert ratios[1] == pytest.approx(1.0, abs=0.01)
    assert abs(ratios[1] - 1.0) <= abs(ratios[0] - 1.0) + 1e-3


# ------------------------------------------------------------------------------- result table / CLI


def test_result_table_mean_std_and_json_round_trip(tmp_path):
    runs = [{"method": m, "seed": s, "trainable": t, "params": 100, "accuracy": a, "wall_time": 1.0}
            for m, t, accs in (("head", 10, [0.5, 0.7, 0.6]), ("td", 50, [0.8, 0.9, 0.7]))
            for s, a in zip((0, 1, 2), accs)]
    res = tr.TransferResult(config=tr.asdict(tr.TransferConfig()), methods=["head", "td"], seeds=[0, 1, 2], runs=runs,
                            sources=[{"seed": s, "source_accuracy": 0.9, "probe_accuracy": 0.4} for s in range(3)])
    s = res.summary()
    assert s["td"]["mean"] == pytest.approx(0.8) and s["td"]["std"] == pytest.approx(statistics.stdev([0.8, 0.9, 0.7]))
    table = res.table()
    assert "| td | 50 | 100 | **0.8000 ± 0.1000** |" in table and "| head | 10 | 100 | 0.6000 ± 0.1000 |" in table
    res.to_json(tmp_path / "r.json")
    back = tr.TransferResult.from_dict(json.loads((tmp_path / "r.json").read_text()))
    assert back.table() == table and back.summary() == s


def test_cli_transfer_end_to_end(tmp_path, capsys):
    out = tmp_path / "t"
    argv = ["transfer", "--seeds", "0", "1", "--n-target-train", "30", "--embed-dim", "8", "--heads", "2",
            "--depth", "1", "--patch", "4", "--source-epochs", "1", "--warmup-epochs", "1", "--epochs", "1",
            "--blocks", "1", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["methods"] == list(tr.METHODS) and res["seeds"] == [0, 1]
    assert len(res["runs"]) == 2 * len(tr.METHODS)
    md = (out / "results.md").read_text()
    assert "| td |" in md and "| full |" in md and "Command: `topoderiv transfer --seeds 0 1" in md
    by = {(r["method"], r["seed"]): r for r in res["runs"]}
    for s in (0, 1):  # the random baselines reuse TD's points on the same seed
        assert by[("random_blocks", s)]["points"] == by[("td", s)]["points"] == by[("random_phi", s)]["points"]
    assert "| td |" in capsys.readouterr().out


def test_cli_transfer_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["transfer", "--embed-dim", "10", "--heads", "4", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--heads must divide --embed-dim" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["transfer", "--methods", "bogus"])
    assert e.value.code == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["transfer", "--out", str(tmp_path / "file" / "sub")])
    assert e.value.code == 2 and "--out must be a folder" in capsys.readouterr().err


def test_mean_std_skips_missing_values():
    """The summary statistic of compare and transfer tables against numpy (sample std, ddof=1)."""
    import numpy as np

    from topoderiv.experiments.compare import mean_std

    vals = [0.25, None, 1.5, float("nan"), 4.0, float("inf"), 2]
    ok = np.array([0.25, 1.5, 4.0, 2.0])
    mean, std = mean_std(vals)
    assert mean == pytest.approx(ok.mean(), rel=1e-15) and std == pytest.approx(ok.std(ddof=1), rel=1e-14)
    assert mean_std([3.0]) == (3.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([None, float("nan")])) and all(math.isnan(v) for v in mean_std([]))
