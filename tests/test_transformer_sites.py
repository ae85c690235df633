"""Transformer sub-block sites and the ViT: the finite-difference arbiter (METHOD.md section 6),
mu against an autograd Hessian, function preservation, costates, streaming, determinism, errors,
growth end to end.

Every check compares against float64 finite differences or a float64 Hessian of the loss built
here with torch.autograd (the eps-scaled parameters laid out by hand), never the code with itself.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import topoderiv
from topoderiv.growth import (Grower, IdentityInsertion, RandomInsertion,
                              TopologicalStrategy, insert, score, search_eps)
from topoderiv.method.statistic import kernels_available
from topoderiv.models import ResidualBlock, ResidualMLP, ViT
from topoderiv.sites import SiteSpec, declare, site_at
from topoderiv.sites.capture import capture_all
from topoderiv.sites.transformer import Attention, AttentionBlock, Block, Mlp, MlpBlock

from _helpers import costate_fd

BACKENDS = ["torch"] + (["kernels"] if kernels_available() else [])
KINDS = ["tokens", "mlp_block", "attention_block", "transformer_block"]
SUB_KINDS = ["mlp_block", "attention_block", "transformer_block"]
BLOCK_OF = {"tokens": ResidualBlock, "mlp_block": MlpBlock, "attention_block": AttentionBlock,
            "transformer_block": Block}


def _problem(seed, kind="transformer_block", *, n=6, depth=2, mlp_ratio=2.0, qkv_bias=True, global_pool="token"):
    """A tiny float64 ViT (8x8 images, patch 4: 4 patches + cls, embed_dim 8, 2 heads) and data."""
    torch.manual_seed(seed)
    model = ViT(8, 4, 2, 3, 8, depth, 2, mlp_ratio, insert=kind, qkv_bias=qkv_bias, global_pool=global_pool).double()
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, x, y


def _J(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def _phi_norm(phi):
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in phi.values())) if isinstance(phi, dict) \
        else float(phi.norm())


def _stream(model, x, point):
    """The stream entering blocks[point], computed by hand (patches, cls, pos_embed, blocks)."""
    with torch.no_grad():
        h = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), h], dim=1) + model.pos_embed
        for blk in model.blocks[:point]:
            h = blk(h)
    return h


# ------------------------------------------------------------------------------------------------
# the arbiter


@pytest.mark.parametrize("rule", ["top", "all", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_finite_difference_arbiter(kind, rule):
    """(J(eps) - J(0)) / (-(eps^2/2) phi^T Q phi) within 1% of 1 at eps = 1e-3 at every point, the
    error shrinking from eps = 1e-2; phi^T Q phi = mu for "top", < mu for the mixtures."""
    model, x, y = _problem(1, kind)
    rep = score(model, (x, y), F.cross_entropy, rule=rule)
    assert [p.point for p in rep.points] == [0, 1, 2] and rep.rule == rule
    j0 = _J(model, x, y)
    for ps in rep.points:
        assert ps.kind == kind and ps.mu > 1e-3, f"mu too small to test at point {ps.point}: {ps.mu}"
        assert _phi_norm(ps.phi) == pytest.approx(1.0, abs=1e-12)
        if rule == "top":
            assert ps.quotient == pytest.approx(ps.mu, rel=1e-12) and ps.n_pairs == 1
        else:
            assert 0 < ps.quotient < ps.mu and ps.n_pairs >= 2
        if kind != "tokens":
            assert ps.route == ("lanczos" if rule == "top" and kernels_available() else "svd") and ps.converged and float(ps.block_mu.max()) == pytest.approx(ps.mu, rel=1e-12)
        errs = []
        for eps in (1e-2, 1e-3):
            m2 = copy.deepcopy(model)
            insert(m2, ps.point, ps.phi, eps)
            ratio = (_J(m2, x, y) - j0) / ps.predicted_change(eps)
            errs.append(abs(ratio - 1))
        assert errs[1] < 0.01, f"point {ps.point}: ratio off by {errs[1]}"
        assert errs[1] < errs[0] / 3, f"point {ps.point}: the error does not shrink with eps: {errs}"


@pytest.mark.parametrize("kind", ["attention_block", "transformer_block", "mlp_block"])
def test_arbiter_avg_pool_no_qkv_bias_and_sigma_negative(kind):
    """Variants: average pooling (fc_norm), attention without qkv bias, and for the MLP a hidden
    activation with act'(0) = -1/2 (phi's out-map flips sign)."""
    model, x, y = _problem(2, kind, qkv_bias=False, global_pool="avg")
    if kind == "mlp_block":
        model.topoderiv_sites = [SiteSpec("blocks", "mlp_block", {"dim": 8, "mlp_ratio": 2.0,
                                                                 "act": NegGELU()})]
    rep = score(model, (x, y), F.cross_entropy)
    j0 = _J(model, x, y)
    for ps in rep.points:
        if kind == "mlp_block":
            assert ps.sigma2 == pytest.approx(-0.5, rel=1e-12)
        else:
            assert "attn.v.bias" not in ps.phi
        m2 = copy.deepcopy(model)
        insert(m2, ps.point, ps.phi, 1e-3)
        assert (_J(m2, x, y) - j0) / ps.predicted_change(1e-3) == pytest.approx(1.0, abs=0.01)


class NegGELU(nn.Module):
    """-GELU: act(0) = 0, act'(0) = -1/2."""

    def forward(self, z):
        return -F.gelu(z)


# ------------------------------------------------------------------------------------------------
# mu and the singular values against an autograd Hessian of the loss


def _theta_layout(block, kind):
    """(block parameter, rows/None, shape, phi key) of theta_e, written down by hand."""
    out = []
    if kind in ("attention_block", "transformer_block"):
        D = block.attn.dim
        out.append(("attn.qkv.weight", (2 * D, 3 * D), (D, D), "attn.v.weight"))
        if block.attn.qkv.bias is not None:
            out.append(("attn.qkv.bias", (2 * D, 3 * D), (D,), "attn.v.bias"))
        out.append(("attn.proj.weight", None, (D, D), "attn.proj.weight"))
    if kind in ("mlp_block", "transformer_block"):
        h, D = block.mlp.fc1.weight.shape
        out += [("mlp.fc1.weight", None, (h, D), "mlp.fc1.weight"), ("mlp.fc1.bias", None, (h,), "mlp.fc1.bias"),
                ("mlp.fc2.weight", None, (D, h), "mlp.fc2.weight")]
    return out


def _hessian_q(model, x, y, point, kind):
    """Q = -Hessian of J w.r.t. theta_e at 0 (float64), the block inserted by functional_call."""
    site = site_at(model, point)
    block = site.new_block()
    model = copy.deepcopy(model)
    for attn in [m for m in model.modules() if isinstance(m, Attention)] + [getattr(block, "attn", None)]:
        if attn is not None:
            attn.fused_attn = False  # the fused CPU kernels have no double backward
    layout = _theta_layout(block, kind)
    sizes = [math.prod(shape) for _, _, shape, _ in layout]
    base = dict(block.named_parameters())
    h = _stream(model, x, point)

    def J(theta):
        params, off = {}, 0
        for (name, rows, shape, _), size in zip(layout, sizes):
            t = theta[off : off + size].reshape(shape)
            off += size
            if rows is not None:  # the V rows of qkv: W_Q, W_K kept as built
                t = torch.cat([base[name][: rows[0]].detach(), t], dim=0)
            params[name] = t
        out = functional_call(block, params, (h,), strict=False)
        return F.cross_entropy(model.forward_from(point, out), y)

    n = sum(sizes)
    H = torch.autograd.functional.hessian(J, torch.zeros(n, dtype=torch.float64), vectorize=True)
    return -H, layout


def _flat(phi, layout):
    return torch.cat([phi[key].double().reshape(-1) for *_, key in layout])


@pytest.mark.parametrize("kind, qkv_bias", [("mlp_block", True), ("attention_block", True),
                                            ("attention_block", False), ("transformer_block", True)])
def test_mu_and_singular_values_against_autograd_hessian(kind, qkv_bias):
    """lambda_max(Q) = mu; the whole spectrum of Q is +-values (each singular value once per unit of
    its group) and zeros; phi^T Q phi = quotient for every rule."""
    model, x, y = _problem(3, kind, qkv_bias=qkv_bias, mlp_ratio=1.0)
    reps = {rule: score(model, (x, y), F.cross_entropy, rule=rule, k=8, points=[1])
            for rule in ("top", "all", "multi", "reference")}
    # k = 1: the top pair by Lanczos on the Gram matrices (kernels) or by a full SVD (torch)
    reps.update({f"top-{be}": score(model, (x, y), F.cross_entropy, k=1, points=[1], backend=be)
                 for be in BACKENDS})
    assert reps["top"].points[0].route == "svd" and all(reps[f"top-{be}"].points[0].route == route
                                                        for be, route in zip(BACKENDS, ("svd", "lanczos")))
    for point in (1,):
        Q, layout = _hessian_q(model, x, y, point, kind)
        torch.testing.assert_close(Q, Q.T, rtol=0, atol=1e-12)
        lam = torch.linalg.eigvalsh(Q)
        ps = reps["top"].points[0]
        assert ps.mu == pytest.approx(float(lam.max()), rel=1e-9)
        # expected spectrum: every group's values, times its units, with both signs; zeros for the rest
        D = 8
        caps = ([D // 2] * 2 if kind != "mlp_block" else []) + ([D] if kind != "attention_block" else [])
        assert ps.values.shape == (len(caps), 8)
        vals = torch.cat([ps.values[g].double().repeat(c) for g, c in enumerate(caps)])
        want = torch.cat([vals, -vals, torch.zeros(Q.shape[0] - 2 * vals.numel(), dtype=torch.float64)]).sort().values
        torch.testing.assert_close(lam, want, rtol=0, atol=1e-10 * ps.mu)
        for rule, rep in reps.items():
            p = rep.points[0]
            v = _flat(p.phi, layout)
            assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
            assert float(v @ Q @ v) == pytest.approx(p.quotient, rel=1e-9), rule
            if rule.startswith("top"):
                assert p.mu == pytest.approx(float(lam.max()), rel=1e-9) and p.n_pairs == 1
            if rule == "reference":
                assert p.score == pytest.approx(p.quotient * p.n_pairs, rel=1e-12) and p.score > p.mu
            else:
                assert p.score == pytest.approx(p.mu, rel=1e-12)


def test_all_rule_weights_and_reference_selection():
    """Rule "all": pair i of each group in unit i, weight sqrt(lambda_i): the quotient is
    sum lambda^2 / sum lambda over every group's values (up to capacity). "reference": the values
    from the top while >= 50% of the largest plus the first below, over all groups."""
    model, x, y = _problem(4, "transformer_block")
    rep = score(model, (x, y), F.cross_entropy, rule="all", k=8)
    ref = score(model, (x, y), F.cross_entropy, rule="reference", k=8)
    for ps, pr in zip(rep.points, ref.points):
        lam = torch.cat([ps.values[0, :4], ps.values[1, :4], ps.values[2, :8]]).double()  # head_dim 4, MLP 8
        lam = lam[lam > 0]
        assert ps.n_pairs == lam.numel()
        assert ps.quotient == pytest.approx(float((lam ** 2).sum() / lam.sum()), rel=1e-10)
        # unit i of head h holds the i-th pair with weight sqrt(lambda): row norms of V
        vw = torch.cat([ps.phi["attn.v.weight"], ps.phi["attn.v.bias"][:, None]], 1)
        unit_norm2 = vw.pow(2).sum(1) + ps.phi["attn.proj.weight"].pow(2).sum(0)
        torch.testing.assert_close(unit_norm2, torch.cat([ps.values[0, :4], ps.values[1, :4]]) / lam.sum(),
                                   rtol=1e-8, atol=1e-14)
        srt = lam.sort(descending=True).values.tolist()
        count = next((i + 1 for i, v in enumerate(srt) if v < 0.5 * srt[0]), len(srt))
        assert pr.n_pairs == count and pr.score == pytest.approx(sum(srt[:count]), rel=1e-10)


# ------------------------------------------------------------------------------------------------
# function preservation, types, timm names


TIMM_BLOCK_KEYS = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                   "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                   "mlp.fc2.bias"]


def _timm_keys(depth):
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in TIMM_BLOCK_KEYS]
    return keys + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_function_preserved_at_eps_zero_and_block_types(kind, dtype):
    model, x, y = _problem(5, kind)
    model, x = model.to(dtype), x.to(dtype)
    rep = score(model, (x, y), F.cross_entropy)
    with torch.no_grad():
        before = model(x)
    for ps in rep.points:
        m2 = copy.deepcopy(model)
        insert(m2, ps.point, ps.phi, 0.0)
        assert len(m2.blocks) == 3 and isinstance(m2.blocks[ps.point], BLOCK_OF[kind])
        with torch.no_grad():
            assert torch.equal(m2(x), before)
        assert m2.config()["depth"] == 3
        if kind == "transformer_block":  # an ordinary ViT: a Sequential of Blocks, timm's names
            assert isinstance(m2.blocks, nn.Sequential) and all(type(b) is Block for b in m2.blocks)
            assert list(m2.state_dict()) == _timm_keys(3)
            m3 = ViT(**m2.config()).to(dtype)
            m3.load_state_dict(m2.state_dict())
            with torch.no_grad():
                assert torch.equal(m3(x), before)


def test_blocks_follow_timm_layout():
    """Attention: rows [0:D] = Q, [D:2D] = K, [2D:3D] = V, heads contiguous: checked against an
    explicit per-head computation; Block = pre-norm attention then MLP; timm's key names."""
    torch.manual_seed(0)
    attn = Attention(8, 2).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    W, b = attn.qkv.weight, attn.qkv.bias
    heads = []
    for h in range(2):
        sl = slice(4 * h, 4 * h + 4)
        q = x @ W[0:8][sl].T + b[0:8][sl]
        k = x @ W[8:16][sl].T + b[8:16][sl]
        v = x @ W[16:24][sl].T + b[16:24][sl]
        heads.append(torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v)
    want = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), want, rtol=1e-12, atol=1e-12)
    blk = Block(8, 2, 2.0).double()
    y = x + blk.attn(blk.norm1(x))
    torch.testing.assert_close(blk(x), y + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(y)))), rtol=1e-12, atol=1e-12)
    assert list(blk.state_dict()) == TIMM_BLOCK_KEYS and blk.norm1.eps == 1e-6
    for cls, kw in ((Block, {"dim": 8, "num_heads": 2, "mlp_ratio": 2.0}), (MlpBlock, {"dim": 8}),
                    (AttentionBlock, {"dim": 8, "num_heads": 4, "qkv_bias": False}), (Mlp, {"in_features": 8})):
        m = cls(**kw)
        assert type(cls(**m.config())) is cls and cls(**m.config()).config() == m.config()
    model, _, _ = _problem(0, depth=2)
    assert list(model.state_dict()) == _timm_keys(2)
    avg = ViT(8, 4, 2, 3, 8, 1, 2, global_pool="avg")
    assert "fc_norm.weight" in avg.state_dict() and "norm.weight" not in avg.state_dict()


# ------------------------------------------------------------------------------------------------
# costates, streaming, determinism


def test_costates_of_token_states_equal_minus_dJdx_by_finite_differences():
    model, x, y = _problem(6, n=5)
    cap = capture_all(model, [(x[:2], y[:2]), (x[2:], y[2:])], F.cross_entropy)
    assert cap.loss == pytest.approx(_J(model, x, y), rel=1e-13)
    g = torch.Generator().manual_seed(0)
    for point in (0, 1, 2):
        p = cap.costates[point]
        assert p.shape == (5, 5, 8)
        torch.testing.assert_close(cap.states[point], _stream(model, x, point), rtol=1e-12, atol=1e-13)
        dirs = [torch.randn(5, 5, 8, generator=g, dtype=torch.float64) for _ in range(4)]
        dirs = [d / d.norm() for d in dirs]
        e = torch.zeros(5, 5, 8, dtype=torch.float64)
        e[3, 0, 2] = 1.0  # one coordinate: the class token of sample 3
        for d in dirs + [e]:
            fd = costate_fd(model, point, d, lambda m2: _J(m2, x, y))
            assert float((p * d).sum()) == pytest.approx(fd, rel=1e-6, abs=1e-10)
        assert float(p.abs().max()) > 1e-4


@pytest.mark.parametrize("rule", ["top", "all"])
@pytest.mark.parametrize("kind", SUB_KINDS)
def test_streamed_equals_concatenated(kind, rule):
    model, x, y = _problem(7, kind, n=11)
    full = score(model, (x, y), F.cross_entropy, rule=rule, k=3)
    parts = [(x[:2], y[:2]), (x[2:7], y[2:7]), (x[7:], y[7:])]
    streamed = score(model, parts, F.cross_entropy, rule=rule, k=3, memory_budget=1)
    assert streamed.n_batches == 3 and streamed.n_samples == 11
    assert streamed.loss == pytest.approx(full.loss, rel=1e-13)
    for a, b in zip(full.points, streamed.points):
        assert a.block == b.block and b.mu == pytest.approx(a.mu, rel=1e-10)
        torch.testing.assert_close(b.values, a.values, rtol=1e-10, atol=1e-14)
        assert sorted(a.phi) == sorted(b.phi)
        for key in a.phi:
            torch.testing.assert_close(b.phi[key], a.phi[key], rtol=1e-8, atol=1e-10)


def test_float32_scores_close_to_float64():
    model, x, y = _problem(8)
    ref = score(model, (x, y), F.cross_entropy)
    rep = score(copy.deepcopy(model).float(), (x.float(), y), F.cross_entropy)
    for a, b in zip(ref.points, rep.points):
        assert all(t.dtype == torch.float32 for t in b.phi.values())
        assert b.mu == pytest.approx(a.mu, rel=1e-4)


@pytest.mark.parametrize("kind", ["attention_block", "transformer_block"])
def test_new_block_is_deterministic_and_insert_uses_the_scored_wq_wk(kind):
    model, x, y = _problem(9, kind)
    site = site_at(model, 1)
    state = torch.get_rng_state()
    a, b = site.new_block(), site.new_block()
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)
    D = 8
    wqk = a.attn.qkv.weight[: 2 * D].detach()
    assert float(wqk.abs().min()) > 0 and float(wqk.abs().max()) <= 1 / math.sqrt(D)
    assert float(a.attn.qkv.weight[2 * D :].detach().abs().max()) == 0
    assert float(a.attn.proj.weight.detach().abs().max()) == 0
    ps = score(model, (x, y), F.cross_entropy, points=[1]).points[0]
    m2 = copy.deepcopy(model)
    insert(m2, 1, ps.phi, 0.5)
    assert torch.equal(m2.blocks[1].attn.qkv.weight[: 2 * D], wqk)
    assert torch.equal(m2.blocks[1].attn.qkv.weight[2 * D :], ps.phi["attn.v.weight"] * 0.5)
    # another seed: other W_Q, W_K, another mu (the statistic reads the block's own attention)
    other = copy.deepcopy(model)
    other.topoderiv_sites = [SiteSpec("blocks", kind, dict(site.options, seed=1))]
    assert not torch.equal(site_at(other, 1).new_block().attn.qkv.weight[: 2 * D], wqk)
    ps1 = score(other, (x, y), F.cross_entropy, points=[1]).points[0]
    assert abs(ps1.mu - ps.mu) > 1e-6 * ps.mu


# ------------------------------------------------------------------------------------------------
# errors


def _unchanged(model, before):
    after = model.state_dict()
    return list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("kind", SUB_KINDS)
def test_bad_phi_leaves_the_model_untouched(kind):
    model, x, y = _problem(10, kind)
    ps = score(model, (x, y), F.cross_entropy, points=[0]).points[0]
    before = copy.deepcopy(model.state_dict())
    key = next(iter(ps.phi))
    missing = {k: v for k, v in ps.phi.items() if k != key}
    wrong = dict(ps.phi, **{key: ps.phi[key][..., :-1]})
    nan = {k: v.clone() for k, v in ps.phi.items()}
    nan[key].view(-1)[0] = float("nan")
    extra = dict(ps.phi, **{"norm.weight": torch.ones(8, dtype=torch.float64)})
    cases = [(missing, ValueError, rf"insert: phi for a {kind} site must have exactly the keys .*missing \['{key}'\]"),
             (wrong, ValueError, rf"insert: phi\['{key}'\] must have shape"),
             (nan, ValueError, rf"insert: phi\['{key}'\] must contain only finite values"),
             (extra, ValueError, r"unexpected \['norm.weight'\]"),
             (torch.zeros(8, 9), TypeError, rf"insert: phi for a {kind} site must be a dict"),
             (dict(ps.phi, **{key: ps.phi[key].long()}), TypeError, rf"phi\['{key}'\] must be a floating-point")]
    for phi, err, match in cases:
        with pytest.raises(err, match=match):
            insert(model, 0, phi, 0.1)
        assert len(model.blocks) == 2 and _unchanged(model, before)


def test_stream_and_option_errors():
    # a stream that is not [B, T, D]: an mlp_block site declared on an MLP
    mlp = ResidualMLP(3, 8, 2, 1).double()
    declare(mlp, "blocks", "mlp_block", dim=8)
    xm, ym = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"score: a mlp_block site \('blocks.0'\) needs a token stream \[B, T, dim\] "
                                         r"with dim = 8, got shape \[4, 8\]"):
        score(mlp, (xm, ym), F.mse_loss)
    model, x, y = _problem(11, depth=1)
    for kind in SUB_KINDS:  # dim mismatch
        bad = copy.deepcopy(model)
        bad.topoderiv_sites = [SiteSpec("blocks", kind, {"dim": 16, "num_heads": 2})]
        with pytest.raises(ValueError, match=rf"a {kind} site .* dim = 16, got shape \[6, 5, 8\]"):
            score(bad, (x, y), F.cross_entropy)
    bad.topoderiv_sites = [SiteSpec("blocks", "attention_block", {"dim": 8, "num_heads": 3})]
    with pytest.raises(ValueError, match="option: num_heads must divide dim = 8, got num_heads = 3"):
        score(bad, (x, y), F.cross_entropy)
    bad.topoderiv_sites = [SiteSpec("blocks", "mlp_block", {"dim": 8, "mlp_ratio": "big"})]
    with pytest.raises(ValueError, match="option: mlp_ratio must be a finite number"):
        score(bad, (x, y), F.cross_entropy)
    with pytest.raises(ValueError, match="ViT: insert must be one of"):
        ViT(8, 4, 2, 3, 8, 1, 2, insert="conv")
    with pytest.raises(ValueError, match="ViT: patch_size must divide img_size"):
        ViT(8, 3, 2, 3, 8, 1, 2)
    with pytest.raises(ValueError, match="ViT: num_heads must divide embed_dim = 8, got num_heads = 3"):
        ViT(8, 4, 2, 3, 8, 1, 3)
    with pytest.raises(ValueError, match=r"ViT.forward_from: point must be an int in \[0, 1\], got 2"):
        model.forward_from(2, torch.zeros(1, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"ViT.forward: x must have shape \[B, 2, 8, 8\], got \[6, 1, 8, 8\]"):
        model(x[:, :1])


@pytest.mark.parametrize("act, match", [("sigmoid", r"act\(0\) = 0 \(e.g. GELU\), got Sigmoid with act\(0\) = 0.5"),
                                        ("td", r"act'\(0\) != 0 \(GELU: 1/2\), got TDActivation with act'\(0\) = 0")])
@pytest.mark.parametrize("kind", ["mlp_block", "transformer_block"])
def test_inadmissible_hidden_activation(kind, act, match):
    model, x, y = _problem(12, depth=1)
    good = score(model, (x, y), F.cross_entropy, points=[0]).points[0]
    model.topoderiv_sites = [SiteSpec("blocks", kind, {"dim": 8, "num_heads": 2, "mlp_ratio": 2.0, "act": act})]
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="score: the block a .* would insert .*" + match):
        score(model, (x, y), F.cross_entropy)
    phi = {k: v for k, v in good.phi.items() if kind == "transformer_block" or k.startswith("mlp.")}
    with pytest.raises(ValueError, match="insert: the block a .*" + match):
        insert(model, 0, phi, 0.1)
    assert len(model.blocks) == 1 and _unchanged(model, before)


# ------------------------------------------------------------------------------------------------
# growth end to end


def _image_task(seed=0, n=48):
    """Tiny synthetic images: the class is the quadrant holding a bright 2x2 blob, plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, 2, 8, 8, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    for i in range(n):
        r, c = [(0, 0), (0, 4), (4, 0)][int(y[i])]
        x[i, :, r + 1 : r + 3, c + 1 : c + 3] += 2.0
    return x, y


GRID = (0.05, 0.2, 0.5, 1.0)


@pytest.mark.parametrize("kind", ["transformer_block", "tokens"])
def test_growth_end_to_end(kind):
    x, y = _image_task()
    train = [(x[:16], y[:16]), (x[16:32], y[16:32])]
    val = (x[32:], y[32:])
    def topo(rule):
        return TopologicalStrategy(rule=rule, eps_grid=GRID)

    for strategy, rounds in ((topo("top"), 1), (topo("all"), 2), (RandomInsertion(), 1), (IdentityInsertion(), 1)):
        torch.manual_seed(0)
        model = ViT(8, 4, 2, 3, 8, 1, 2, 2.0, insert=kind)
        grower = Grower(model, lambda p: torch.optim.AdamW(p, lr=3e-3), train, val, F.cross_entropy,
                        strategy=strategy, epochs_per_round=1, max_rounds=rounds, patience=5, progress=False, seed=0)
        hist = grower.run()
        n_ins = len(hist.insertions)
        if isinstance(strategy, TopologicalStrategy):
            assert all(r.info["kind"] == kind and r.info["live_rows"] >= 1 for r in hist.insertions)
        assert n_ins >= 1, (type(strategy).__name__, hist.meta.get("stop_reason"))
        assert len(model.blocks) == 1 + n_ins and model.config()["depth"] == 1 + n_ins
        assert all(math.isfinite(r.val_loss) for r in hist.rounds)
        if kind == "transformer_block":
            assert all(type(b) is Block for b in model.blocks)
        else:
            assert sum(isinstance(b, ResidualBlock) for b in model.blocks) == n_ins
        # every inserted parameter is in the optimiser
        opt_ids = {id(p) for g in grower.optimizer.param_groups for p in g["params"]}
        assert all(id(p) in opt_ids for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_suffix_eps_search_agrees_with_full_model_fallback(kind):
    model, x, y = _problem(13, kind, n=9)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    for rule in ("all",):  # several units / sub-blocks non-zero
        for ps in score(model, batches, F.cross_entropy, rule=rule).points:
            eps_s, suffix = search_eps(model, ps.point, ps.phi, batches, F.cross_entropy, grid=[0.05, 0.3, 1.0, -0.3])
            full_model = copy.deepcopy(model)
            full_model.forward_from = None  # hides the method: search_eps runs the whole model per eps
            eps_f, full = search_eps(full_model, ps.point, ps.phi, batches, F.cross_entropy, grid=[0.05, 0.3, 1.0, -0.3])
            assert eps_s == eps_f and list(suffix) == list(full)
            for e in suffix:
                assert suffix[e] == pytest.approx(full[e], rel=1e-12, abs=1e-15)
            assert len(model.blocks) == 2
            # and the losses really are those of the grown model
            m2 = copy.deepcopy(model)
            insert(m2, ps.point, ps.phi, 0.3)
            assert suffix[0.3] == pytest.approx(_J(m2, x, y), rel=1e-12)
