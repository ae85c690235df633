"""Growing timm models (topoderiv.models.from_timm / timm_model): the finite-difference arbiter
(METHOD.md section 6) through timm's own VisionTransformer (transformer_block, tokens) and ResNet
(conv), float64; grown ViTs stay timm ViTs that timm rebuilds at the new depth with identical
outputs; checkpoints, resume and the checkpoint builder's validation.

timm is optional: without it this module is skipped, except under TOPODERIV_REQUIRE_TIMM=1 (CI's
timm environment), where a missing timm is an error.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

if os.environ.get("TOPODERIV_REQUIRE_TIMM") == "1":
    import timm  # noqa: F401  (CI's timm environment: a missing timm fails here instead of skipping)
else:
    timm = pytest.importorskip("timm")

from safetensors.torch import load_file  # noqa: E402
from timm.models.resnet import ResNet  # noqa: E402
from timm.models.vision_transformer import Block as TimmBlock  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import topoderiv  # noqa: E402
from topoderiv.experiments.tasks import Batches  # noqa: E402
from topoderiv.growth import Grower, RandomInsertion, TopologicalStrategy, insert, score  # noqa: E402
from topoderiv.growth.checkpoint import optimizer_state  # noqa: E402
from topoderiv.models import ResidualBlock, from_timm, timm_model  # noqa: E402
from topoderiv.sites import site_at, sites  # noqa: E402
from topoderiv.sites.conv import ResidualConvBlock  # noqa: E402

VIT = "vit_tiny_patch16_224"
VIT_KW = dict(img_size=8, patch_size=4, in_chans=2, num_classes=3, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0)
RESNET = "resnet10t"
RESNET_KW = dict(layers=[2, 2, 1, 1], channels=[4, 6, 6, 8], stem_width=4, in_chans=2, num_classes=3,
                 zero_init_last=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _vit(insert="transformer_block", seed=0, **kw):
    torch.manual_seed(seed)
    return timm_model(VIT, insert=insert, **{**VIT_KW, **kw})


def _randomize_bn(model, seed):
    """Non-trivial BatchNorm statistics and affine parameters (eval mode uses them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def _data(seed, n=6, chans=2, size=8):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, chans, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def _J(model, x, y):
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _arbiter(model, x, y, rule="top", kind=None):
    """(J(eps) - J(0)) / (-(eps^2/2) phi^T Q phi) within 1% of 1 at eps = 1e-3 at every point, the
    error shrinking from eps = 1e-2 (the O(eps) third-order term)."""
    rep = score(model, (x, y), F.cross_entropy, rule=rule)
    assert [p.point for p in rep.points] == list(range(len(sites(model))))
    j0 = _J(model, x, y)
    for ps in rep.points:
        assert kind is None or ps.kind == kind
        assert ps.mu > 1e-4, f"mu too small to test at point {ps.point}: {ps.mu}"
        errs = []
        for eps in (1e-2, 1e-3):
            m2 = copy.deepcopy(model)
            insert(m2, ps.point, ps.phi, eps)
            errs.append(abs((_J(m2, x, y) - j0) / ps.predicted_change(eps) - 1))
        assert errs[1] < 0.01, f"point {ps.point} ({ps.name}): ratio off by {errs[1]}"
        assert errs[1] < errs[0] / 3, f"point {ps.point} ({ps.name}): the error does not shrink with eps: {errs}"
    return rep


# ------------------------------------------------------------------------------------------------
# the arbiter through from_timm


@pytest.mark.parametrize("rule", ["top", "all"])
@pytest.mark.parametrize("kind", ["transformer_block", "tokens"])
def test_arbiter_timm_vit(kind, rule):
    model = _vit(kind, seed=1).double()
    x, y = _data(1)
    rep = _arbiter(model, x, y, rule, kind)
    assert len(rep.points) == 3


def test_arbiter_timm_vit_layer_scale_qk_norm_avg_pool():
    """LayerScale (the new block's gamma = init_values scales its effect: costate gamma * p), q/k
    LayerNorms inside the attention weights, average pooling with fc_norm, no qkv bias."""
    model = _vit("transformer_block", seed=2, init_values=0.5, qk_norm=True, global_pool="avg", qkv_bias=False)
    model = model.double()
    opts = model.topoderiv_sites[0].options
    assert opts["init_values"] == 0.5 and opts["qk_norm"] and not opts["qkv_bias"]
    new = site_at(model, 0).new_block()
    assert torch.equal(new.ls1.gamma, torch.full((8,), 0.5, dtype=torch.float64))
    x, y = _data(2)
    _arbiter(model, x, y, "top", "transformer_block")


def test_arbiter_timm_resnet_conv():
    torch.manual_seed(3)
    model = _randomize_bn(timm_model(RESNET, **RESNET_KW), 3).double()
    assert isinstance(model, ResNet)
    names = [s.name for s in sites(model)]
    # layer1..layer4 all start with a block that changes the shape: sites only between same-shape blocks
    assert names == ["layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer4.1"]
    x, y = _data(3)
    rep = _arbiter(model, x, y, "top", "conv")
    m2 = copy.deepcopy(model)
    insert(m2, "layer2.1", rep.points[2].phi, 0.3)
    blk = m2.layer2[1]
    assert isinstance(blk, ResidualConvBlock) and blk.conv.in_channels == 6 and blk.conv.stride == (1, 1)
    assert blk.config()["activation"] == "td"


def test_resnet18_at_32px_scores_its_1x1_stage(monkeypatch):
    """resnet18 on 32 x 32 images: layer4 runs at 1 x 1, so 8 of the 9 taps of every patch are zero
    padding and the warm start's Gram (m = 4609) is zero outside 513 features. MKL's eigh failed to
    converge on such Grams, in float32 and float64 (torch 2.14): scoring raised. Every point must
    score and converge, and agree with cold random-start solves at a tighter tolerance (a path
    without the warm start)."""
    from topoderiv.method import statistic
    torch.manual_seed(0)
    model = from_timm(timm.create_model("resnet18", pretrained=False, num_classes=4)).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    warm = score(model, [(x, y)], F.cross_entropy)
    assert any(p.name.startswith("layer4.") for p in warm.points) and all(p.converged for p in warm.points)
    monkeypatch.setattr(statistic, "WARM_MIN_M", 1 << 62)
    cold = score(model, [(x, y)], F.cross_entropy, tol=1e-6)
    top = max(abs(p.mu) for p in cold.points)
    for a, b in zip(warm.points, cold.points):
        assert abs(a.mu - b.mu) <= 1e-3 * top, (a.name, a.mu, b.mu)


def test_function_preserved_and_grown_vit_is_a_timm_vit():
    model = _vit(seed=4)
    x = torch.randn(5, 2, 8, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
        for point in (2, 0):
            topoderiv.insert(model, point, {k: torch.zeros_like(v) for k, v in
                                            _phi_like(model, point).items()}, 0.0)
        assert torch.equal(model(x), before)
    assert isinstance(model, VisionTransformer) and len(model.blocks) == 4
    assert all(type(b) is TimmBlock for b in model.blocks)
    feats = model.forward_features(x)
    assert feats.shape == (5, 5, 8)
    assert torch.allclose(model.forward_head(feats), before, atol=1e-6)


def _phi_like(model, point):
    s = site_at(model, point)
    block = s.new_block()
    return {k: torch.zeros(shape) for k, shape, _ in s.phi_layout(block)}


# ------------------------------------------------------------------------------------------------
# timm rebuilds a grown ViT; checkpoints


def _grow(model, seed, n_insert=2):
    x, y = _data(seed)
    x = x.float()
    for _ in range(n_insert):
        rep = score(model, (x, y), F.cross_entropy)
        insert(model, rep.best.point, rep.best, 0.5)
    return x


def test_timm_rebuilds_grown_vit_from_saved_weights(tmp_path):
    model = _vit(seed=5)
    x = _grow(model, 5)
    assert len(model.blocks) == 4 and all(type(b) is TimmBlock for b in model.blocks)
    model.eval()
    with torch.no_grad():
        want = model(x)
    topoderiv.save(model, tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["class"] == "timm" and meta["config"] == {"name": VIT, "kwargs": {**VIT_KW, "depth": 4}}
    assert meta["blocks"]["blocks"] == [None] * 4 and len(meta["inserted"]["blocks"]) == 2
    # timm itself, at the new depth, from our weights file
    ref = timm.create_model(VIT, pretrained=False, **{**VIT_KW, "depth": 4}).eval()
    ref.load_state_dict(load_file(tmp_path / "ck" / "model.safetensors"), strict=True)
    with torch.no_grad():
        assert torch.equal(ref(x), want)
    # and topoderiv.load: a timm ViT with its sites, growable further
    back = topoderiv.load(tmp_path / "ck").eval()
    assert type(back) is VisionTransformer and [s.kind for s in sites(back)] == ["transformer_block"] * 5
    with torch.no_grad():
        assert torch.equal(back(x), want)
    _grow(back, 6, 1)
    assert len(back.blocks) == 5


@pytest.mark.parametrize("kind", ["tokens", "conv"])
def test_save_load_tokens_and_conv(tmp_path, kind):
    if kind == "tokens":
        model = _vit("tokens", seed=7)
    else:
        torch.manual_seed(7)
        model = _randomize_bn(timm_model(RESNET, **RESNET_KW), 7)
    x = _grow(model, 7)
    new_cls = ResidualBlock if kind == "tokens" else ResidualConvBlock
    assert sum(isinstance(m, new_cls) for m in model.modules()) == 2
    model.eval()
    with torch.no_grad():
        want = model(x)
    topoderiv.save(model, tmp_path / "ck")
    back = topoderiv.load(tmp_path / "ck").eval()
    assert type(back) is type(model) and sum(isinstance(m, new_cls) for m in back.modules()) == 2
    assert [s.name for s in sites(back)] == [s.name for s in sites(model)]
    with torch.no_grad():
        assert torch.equal(back(x), want)


def test_model_from_create_model_infers_its_arguments(tmp_path):
    torch.manual_seed(8)
    model = from_timm(timm.create_model(VIT, pretrained=False, **VIT_KW))
    assert model.config()["kwargs"]["depth"] == 2
    topoderiv.save(model, tmp_path / "a")
    assert type(topoderiv.load(tmp_path / "a")) is VisionTransformer
    # a model timm cannot rebuild from what we infer (drop_path_rate is not inferred): growth works,
    # saving says what to pass
    odd = from_timm(timm.create_model(VIT, pretrained=False, drop_path_rate=0.1, **VIT_KW))
    assert len(sites(odd)) == 3
    with pytest.raises(ValueError, match="name=.*kwargs="):
        topoderiv.save(odd, tmp_path / "b")
    ok = from_timm(timm.create_model(VIT, pretrained=False, drop_path_rate=0.1, **VIT_KW), name=VIT,
                   kwargs={**VIT_KW, "drop_path_rate": 0.1})
    topoderiv.save(ok, tmp_path / "b")
    # no name at all: a VisionTransformer built directly
    direct = from_timm(VisionTransformer(**VIT_KW))
    with pytest.raises(ValueError, match="name"):
        topoderiv.save(direct, tmp_path / "c")


def _images(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()
    return (x[:32], y[:32]), (x[32:], y[32:])


def _grower(family, ck, callbacks=()):
    train, val = _images()
    torch.manual_seed(0)
    if family == "vit":
        model = timm_model(VIT, **{**VIT_KW, "num_classes": 2, "depth": 1})
        strategy = TopologicalStrategy(rule="all", eps_grid=[0.05, 0.5])
    else:
        model = timm_model(RESNET, **{**RESNET_KW, "num_classes": 2, "layers": [1, 1, 1, 1]})
        strategy = RandomInsertion()
    return Grower(model, lambda p: torch.optim.Adam(p, lr=1e-2), Batches(*train, 16, shuffle=True, seed=3), [val],
                  F.cross_entropy, strategy=strategy, epochs_per_round=1, max_rounds=2, patience=10, progress=False,
                  seed=0, checkpoint_dir=ck, callbacks=callbacks)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_grower_checkpoint_and_bit_identical_resume(tmp_path, family):
    def snap(grower, rec):
        if rec.round == 1:
            shutil.copytree(grower.checkpoint_dir, tmp_path / "round1")

    g = _grower(family, tmp_path / "ck", callbacks=[snap])
    hist = g.run()
    assert len(hist.insertions) == 2, hist.stop_reason
    train, val = _images()
    torch.manual_seed(12345)
    random.seed(12345)
    g2 = Grower.from_checkpoint(tmp_path / "round1", Batches(*train, 16, shuffle=True, seed=3), [val], F.cross_entropy,
                                optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), checkpoint_dir=tmp_path / "resumed")
    assert type(g2.model) is type(g.model)
    g2.run()
    sa, sb = g.model.state_dict(), g2.model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    (ma, ta), (mb, tb) = optimizer_state(g.model, g.optimizer), optimizer_state(g2.model, g2.optimizer)
    assert ma == mb and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [(r.point, r.eps, r.val_loss) for r in g.history.rounds] == \
        [(r.point, r.eps, r.val_loss) for r in g2.history.rounds]


# ------------------------------------------------------------------------------------------------
# errors, and the checkpoint builder never builds what a file should not name


def test_errors():
    with pytest.raises(TypeError, match="timm VisionTransformer or ResNet"):
        from_timm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="insert for a timm ViT must be one of"):
        _vit("conv")
    with pytest.raises(ValueError, match="insert for a timm ResNet must be one of"):
        timm_model(RESNET, insert="tokens", **RESNET_KW)
    with pytest.raises(ValueError, match="name must be a timm model name"):
        timm_model("no_such_model_xyz")
    with pytest.raises(ValueError, match=r"kwargs\['pretrained'\] is not allowed"):
        timm_model(VIT, pretrained=True)
    with pytest.raises(ValueError, match=r"kwargs\['act_layer'\] must be a JSON scalar"):
        timm_model(VIT, act_layer=nn.GELU, **VIT_KW)
    with pytest.raises(TypeError, match="scale_attn_norm"):
        _vit(scale_attn_norm=True)
    # depth-0 ViT: the transformer_block kind has no block to copy its configuration from
    with pytest.raises(ValueError, match="depth 0"):
        _vit(depth=0)
    assert len(sites(_vit("tokens", depth=0))) == 1


@pytest.mark.parametrize("field, value, match", [
    ("name", "os.system", "name must be a timm model name"),
    ("kwargs", {"pretrained": True}, r"kwargs\['pretrained'\] is not allowed"),
    ("kwargs", {"checkpoint_path": "/etc/passwd"}, "is not allowed"),
    ("kwargs", {"embed_dim": {"x": 1}}, "must be a JSON scalar"),
])
def test_hostile_checkpoint_config(tmp_path, field, value, match):
    model = _vit(seed=9)
    topoderiv.save(model, tmp_path / "ck")
    f = tmp_path / "ck" / "model.json"
    meta = json.loads(f.read_text())
    meta["config"][field] = value
    f.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match):
        topoderiv.load(tmp_path / "ck")


def test_task_shaped_models():
    """What `topoderiv grow --model timm:<name>` builds for a task (digits: 8x8 images, 1 channel,
    10 classes): img_size goes to ViTs and is dropped for ResNets."""
    vit = timm_model(VIT, img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    res = timm_model("resnet18", img_size=8, in_chans=1, num_classes=10)
    x = torch.randn(2, 1, 8, 8)
    for m in (vit, res):
        assert m.eval()(x).shape == (2, 10)
    assert "img_size" not in res.config()["kwargs"] and res.config()["kwargs"]["layers"] == [2, 2, 2, 2]
    assert [s.name for s in sites(res)][:3] == ["layer1.0", "layer1.1", "layer1.2"]  # resnet18's layer1 keeps shape
