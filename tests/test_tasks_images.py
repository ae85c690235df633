"""Image tasks (digits-images, shapes, navier-stokes): determinism per seed, shapes and dtypes, the
default models of every kind (forward, backward, loss/metric shapes), errors, and growth of a CNN
and a ViT on digits-images through the Grower."""
from __future__ import annotations

import json

import pytest
import torch

import topoderiv
from topoderiv.experiments.tasks import INSERT_KINDS, MODEL_KINDS, ModelConfig, available_tasks, get_task
from topoderiv.growth import Grower, load, save
from topoderiv.models import ResidualCNN, ResidualMLP, ViT

SMALL = {
    "digits-images": dict(n_train=120, n_val=40),
    "navier-stokes": dict(n_train=12, n_val=4, n_test=4, size=16, t_final=1.0, dt=0.1),
    "textures": dict(n_train=64, n_val=16, n_test=16),
}


def _small(name: str, seed: int = 0):
    return get_task(name, seed=seed, **SMALL[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_determinism_shapes_dtypes(name):
    a, b, c = _small(name, 3), _small(name, 3), _small(name, 4)
    assert a.in_shape is not None and len(a.in_shape) == 3
    for split in ("train", "val", "test"):
        (xa, ya), (xb, yb) = a.split(split), b.split(split)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.float32 and xa.dim() == 4 and tuple(xa.shape[1:]) == a.in_shape
        assert xa.shape[0] == ya.shape[0] > 0 and torch.isfinite(xa).all()
        assert a.d_in == xa[0].numel()
        if a.out_shape is None:
            assert ya.dtype == torch.long and ya.dim() == 1 and int(ya.max()) < a.d_out
        else:
            assert ya.dtype == torch.float32 and ya.shape[1] == a.d_out == torch.Size(a.out_shape).numel()
    assert not torch.equal(a.train[0], c.train[0])
    json.dumps(a.info)  # JSON-serialisable


def test_digits_images_matches_digits():
    """Same permutation and split as the flat digits task; one scalar standardisation (image kept)."""
    img, flat = get_task("digits-images", seed=2), get_task("digits", seed=2)
    assert img.config.model == "cnn" and flat.config.model == "mlp"
    for split in ("train", "val", "test"):
        assert torch.equal(img.split(split)[1], flat.split(split)[1])
    from sklearn.datasets import load_digits

    raw = torch.as_tensor(load_digits().images, dtype=torch.float64)
    perm = torch.randperm(raw.shape[0], generator=torch.Generator().manual_seed(2))
    tr = raw[perm][:1000]
    expect = (raw[perm][1300:] - tr.mean()) / tr.std()
    assert torch.allclose(img.test[0][:, 0].double(), expect, atol=1e-5)
    assert abs(float(img.train[0].mean())) < 1e-4 and abs(float(img.train[0].std()) - 1) < 1e-3
    assert "digits-images" in available_tasks()


@pytest.mark.parametrize("kind", MODEL_KINDS)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_models_forward_backward(name, kind):
    t = _small(name)
    m = t.build_model(seed=0, model=kind)
    assert isinstance(m, {"mlp": ResidualMLP, "cnn": ResidualCNN, "vit": ViT}[kind])
    x, y = t.train[0][:10], t.train[1][:10]
    out = m(x)
    assert out.shape == (10, t.d_out) and out.dtype == torch.float32
    loss = t.loss_fn(out, y)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
    assert isinstance(t.metric(out, y), float)
    # same seed, same weights; the model rebuilds from its config
    m2 = t.build_model(seed=0, model=kind)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
    rebuilt = type(m)(**json.loads(json.dumps(m.config())))
    rebuilt.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), m(x))


def test_build_model_options():
    t = _small("digits-images")
    cnn = t.build_model(3, seed=0)
    assert [len(s) for s in cnn.stages] == [2, 1] and cnn.channels == [16, 32]
    assert t.build_model(1, width=8, model="cnn").channels == [8, 16]
    vit = t.build_model(4, model="vit", insert="tokens", width=16)
    assert len(vit.blocks) == 4 and vit.embed_dim == 16 and vit.insert == "tokens"
    assert vit.patch_embed.patch_size == (2, 2) and vit.patch_embed.num_patches == 16
    mlp = t.build_model(model="mlp", width=24)
    assert mlp.d_in == 64 and mlp.width == 24 and mlp.config()["flatten"] is True
    cfg = ModelConfig(width=8, model="vit", embed_dim=12, num_heads=3, patch_size=4, channels=[4])
    assert cfg.channels == (4,)
    v = t.build_model(config=cfg)
    assert isinstance(v, ViT) and v.embed_dim == 12 and v.num_heads == 3 and v.patch_embed.num_patches == 4
    assert t.build_model(1, model="cnn", config=cfg).channels == [4]
    assert INSERT_KINDS["vit"][0] == "transformer_block" and INSERT_KINDS["cnn"] == ("conv",)


def test_build_model_errors():
    t = _small("digits-images")
    with pytest.raises(ValueError, match=r"model must be one of \('mlp', 'cnn', 'vit'\), got 'resnet'"):
        t.build_model(model="resnet")
    with pytest.raises(ValueError, match="insert must be one of .* for model 'cnn', got 'tokens'"):
        t.build_model(model="cnn", insert="tokens")
    with pytest.raises(ValueError, match="depth must be an int >= 0, got -1"):
        t.build_model(-1)
    with pytest.raises(ValueError, match="width must be None or an int >= 1"):
        t.build_model(width=0)
    heat = get_task("heat", seed=0, n_train=8, n_val=4, n_test=4)
    with pytest.raises(ValueError, match="model 'vit' needs an image task .* task 'heat' has x \\[N, 32\\]"):
        heat.build_model(model="vit")
    with pytest.raises(ValueError, match="model must be one of"):
        ModelConfig(width=4, model="rnn")
    with pytest.raises(ValueError, match="channels must be a non-empty tuple of ints"):
        ModelConfig(width=4, channels=())
    with pytest.raises(ValueError, match="num_heads must divide embed_dim"):
        ModelConfig(width=4, embed_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="ViT: num_heads must divide embed_dim"):
        t.build_model(model="vit", width=9)


@pytest.mark.parametrize("task,kind,insert", [("digits-images", "cnn", "conv"),
                                              ("digits-images", "vit", "transformer_block"),
                                              ("digits-images", "vit", "tokens"), ("textures", "cnn", "conv")])
def test_growth_smoke(task, kind, insert, tmp_path):
    """One topological insertion through the Grower on a tiny config; the grown model saves and loads."""
    t = get_task(task, seed=0, n_train=96, n_val=32, **({"n_test": 16} if task == "textures" else {}))
    cfg = ModelConfig(width=8, depth=1, lr=3e-3, batch_size=32, model=kind, channels=(4, 8), embed_dim=8,
                      num_heads=2, patch_size=4, mlp_ratio=2.0, block_activation=t.config.block_activation)
    model = t.build_model(config=cfg, insert=insert, seed=0)
    n_sites = len(topoderiv.candidate_points(model))
    g = Grower(model, cfg.make_optimizer, t.loader("train", seed=0), t.loader("val"), t.loss_fn,
               epochs_per_round=1, initial_epochs=2, max_rounds=1, patience=5, progress=False, seed=0)
    hist = g.run()
    assert len(hist.insertions) == 1, hist.meta.get("stop_reason")
    assert len(topoderiv.candidate_points(model)) == n_sites + 1
    out = model(t.test[0][:5])
    assert out.shape == (5, t.d_out) and torch.isfinite(out).all()
    save(model, tmp_path / "ck")
    loaded = load(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(t.test[0][:5]), model(t.test[0][:5]))


def test_navier_stokes_task_content():
    """The data is the solver's: x is w(T) (noise, mean field and scale undone), y is w0 (scale undone)."""
    from topoderiv.experiments.navier_stokes import ns_solve, sample_vorticity

    kw = dict(n_train=12, n_val=4, n_test=4, size=16, t_final=1.0, dt=0.1)
    t = get_task("navier-stokes", seed=5, noise=0.0, **kw)
    assert t.in_shape == (1, 16, 16) and t.out_shape == (1, 16, 16) and t.d_in == t.d_out == 256
    assert t.config.model == "vit" and t.info["steps"] == 10 and t.info["nu"] == 1e-3
    w0 = sample_vorticity(20, 16, generator=torch.Generator().manual_seed(5))
    wt = ns_solve(w0, t_final=1.0, steps=10)[:, -1]
    x = torch.cat([t.train[0], t.val[0], t.test[0]])[:, 0].double()
    y = torch.cat([t.train[1], t.val[1], t.test[1]]).double()
    assert torch.allclose(y * t.info["y_scale"], w0.reshape(20, -1), atol=1e-6)
    recon = x * t.info["x_scale"] + wt[:12].mean(0)
    assert torch.allclose(recon, wt, atol=1e-5)  # the task's float32 solve agrees with float64
    # metric: relative L2, 0 for the truth, 1 for zero
    assert t.metric(t.test[1], t.test[1]) == 0.0 and abs(t.metric(torch.zeros_like(t.test[1]), t.test[1]) - 1) < 1e-6
    noisy = get_task("navier-stokes", seed=5, noise=0.05, **kw)
    assert torch.equal(noisy.train[1], t.train[1]) and not torch.equal(noisy.train[0], t.train[0])
    with pytest.raises(ValueError, match="t_final / dt must be a positive integer"):
        get_task("navier-stokes", t_final=1.0, dt=0.3, n_train=2, n_val=1, n_test=1, size=8)
    with pytest.raises(ValueError, match="a field output needs a CNN with one stage"):
        t.build_model(model="cnn", config=ModelConfig(width=4, channels=(4, 8)))


def test_field_models_unpatchify_like_the_target():
    """The ViT's field head and the CNN's pixel head put output ``[c, i, j]`` at flat index
    ``c*H*W + i*W + j``, the layout of ``y``: a model fitted to reproduce its input must map pixel
    to pixel. Checked exactly: with the blocks removed and the head set to copy a patch's pixel."""
    t = get_task("navier-stokes", seed=0, **SMALL["navier-stokes"])
    vit = t.build_model(0, model="vit")
    p = vit.patch_embed.patch_size[0]
    with torch.no_grad():
        # patch embedding: channel q = pixel q of the patch (row-major); norm off; head copies back
        vit.patch_embed.proj.weight.zero_()
        vit.patch_embed.proj.bias.zero_()
        for q in range(p * p):
            vit.patch_embed.proj.weight[q, 0, q // p, q % p] = 1.0
        vit.pos_embed.zero_()
        vit.norm = torch.nn.Identity()
        vit.head.weight.zero_()
        vit.head.bias.zero_()
        for q in range(p * p):
            vit.head.weight[q, q] = 1.0
    x = t.test[0][:3]
    assert torch.allclose(vit(x), x.reshape(3, -1), atol=1e-6)
    cnn = t.build_model(0, model="cnn")
    with torch.no_grad():
        cnn.stem[0].weight.zero_()
        cnn.stem[0].bias.zero_()
        cnn.stem[0].weight[0, 0, 1, 1] = 1.0  # centre tap: channel 0 = the pixel
        cnn.stem[1] = torch.nn.Identity()
        cnn.head.weight.zero_()
        cnn.head.bias.zero_()
        cnn.head.weight[0, 0] = 1.0
    assert torch.allclose(cnn(x), x.reshape(3, -1), atol=1e-6)


def test_textures_task_content():
    """Without noise the bands are exact stripes of the drawn orientation; the label is 'same orientation'."""
    t = get_task("textures", seed=1, n_train=200, n_val=20, n_test=20, noise=0.0)
    assert t.config.model == "cnn" and t.config.channels == (16,) and t.config.block_activation == "relu"
    x = torch.cat([t.train[0], t.val[0], t.test[0]])[:, 0].double()
    y = torch.cat([t.train[1], t.val[1], t.test[1]])
    band, size = t.info["band_columns"], t.info["size"]
    assert band == 5 and size == 16 and t.info["gap"] == 6
    orient = []
    for cols in (slice(0, band), slice(size - band, size)):
        b = x[:, :, cols]
        along_rows = (b[:, 1:, :] - b[:, :-1, :]).abs().mean(dim=(1, 2))  # large for horizontal stripes
        along_cols = (b[:, :, 1:] - b[:, :, :-1]).abs().mean(dim=(1, 2))
        assert bool(((along_rows < 1e-6) ^ (along_cols < 1e-6)).all())  # exactly one direction is constant
        orient.append(along_cols < 1e-6)  # horizontal stripes: constant along each row
    assert torch.equal(y, (orient[0] == orient[1]).long())
    gap = x[:, :, band : size - band]
    assert float((gap - gap[0, 0, 0]).abs().max()) < 1e-6  # background only (standardised zero)
    assert 0.4 < float(y.float().mean()) < 0.6
    m = t.build_model(seed=0)
    assert [type(b.activation).__name__ for b in m.stages[0]] == ["ReLU", "ReLU"]
    assert type(m.new_block(0).activation).__name__ == "TDActivation"
    with pytest.raises(ValueError, match=r"gap must be an int in \[0, size - 4\]"):
        get_task("textures", gap=14)
    with pytest.raises(ValueError, match="block_activation must be None or one of"):
        ModelConfig(width=4, block_activation="swish2")


def test_textures_shallow_cnn_cannot_see_both_bands():
    """The initial CNN's receptive field (3 + 2 * 2 = 7 pixels) never covers both bands: the output's
    gradient at any one pre-pooling position reaches one band at most. Checked by autograd on the
    stream before pooling."""
    t = get_task("textures", seed=0, **SMALL["textures"])
    m = t.build_model(seed=0)
    x = t.test[0][:1].clone().requires_grad_(True)
    h = m.stages[0](m.stem(x))  # [1, C, 16, 16]
    band, size = t.info["band_columns"], t.info["size"]
    for j in range(size):
        (g,) = torch.autograd.grad(h[0, :, 8, j].sum(), x, retain_graph=True)
        cols = g[0, 0].abs().sum(0) > 0
        assert not (cols[:band].any() and cols[size - band :].any()), j
    deep = t.build_model(3, seed=0)
    h = deep.stages[0](deep.stem(x))
    (g,) = torch.autograd.grad(h[0, :, 8, 7].sum(), x)
    cols = g[0, 0].abs().sum(0) > 0
    assert cols[:band].any() and cols[size - band :].any()  # depth 3: receptive field 9 spans the gap
