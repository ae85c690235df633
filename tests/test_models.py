"""ResidualMLP, ResidualBlock and the growth protocol."""
import pytest
import torch
from torch import nn

from topoderiv.method.activations import TDActivation
from topoderiv.growth.checkpoint import block_spec, build_block
from topoderiv.models import ResidualBlock, ResidualMLP, candidate_points


def test_residual_block_computes_its_formula():
    torch.manual_seed(0)
    blk = ResidualBlock(5).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    z = x @ blk.linear.weight.T + blk.linear.bias
    expected = x + 2 * z * torch.sigmoid(z) - torch.tanh(z)
    torch.testing.assert_close(blk(x), expected, rtol=1e-14, atol=1e-14)
    ln = ResidualBlock(5, feature="layernorm", bias=False).double()
    u = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    z = u @ ln.linear.weight.T
    torch.testing.assert_close(ln(x), x + 2 * z * torch.sigmoid(z) - torch.tanh(z), rtol=1e-12, atol=1e-12)
    assert isinstance(ln.feature, nn.LayerNorm) and ln.linear.bias is None


def test_residual_mlp_structure_and_forward():
    torch.manual_seed(0)
    m = ResidualMLP(3, 8, 2, 4)
    assert isinstance(m.blocks, nn.Sequential) and len(m.blocks) == 4
    assert isinstance(m.head, nn.Linear) and m.head.in_features == 8 and m.head.out_features == 2
    assert all(isinstance(b.activation, TDActivation) for b in m.blocks)
    x = torch.randn(6, 3)
    h = torch.tanh(m.stem[0](x))
    for b in m.blocks:
        h = b(h)
    torch.testing.assert_close(m(x), m.head(h), rtol=0, atol=0)
    torch.testing.assert_close(m.forward_from(2, _state(m, x, 2)), m(x), rtol=0, atol=0)
    # token-shaped input [B, T, d]
    assert m(torch.randn(4, 5, 3)).shape == (4, 5, 2)
    assert candidate_points(m) == [0, 1, 2, 3, 4]


def _state(m, x, point):
    h = m.stem(x)
    for b in m.blocks[:point]:
        h = b(h)
    return h


def test_depth_zero_has_one_candidate_point():
    m = ResidualMLP(2, 4, 1, 0)
    assert candidate_points(m) == [0]
    assert m(torch.randn(3, 2)).shape == (3, 1)


def test_new_block_is_zero_and_identity():
    m = ResidualMLP(3, 8, 2, 2).double()
    for point in candidate_points(m):
        blk = m.new_block(point)
        assert isinstance(blk, ResidualBlock)
        assert blk.linear.weight.dtype == torch.float64
        assert torch.count_nonzero(blk.linear.weight) == 0 and torch.count_nonzero(blk.linear.bias) == 0
        x = torch.randn(5, 8, dtype=torch.float64)
        assert torch.equal(blk(x), x)
    with pytest.raises(ValueError, match=r"point must be an int in \[0, 2\], got 3"):
        m.new_block(3)


def test_config_rebuilds_same_shapes_and_specs():
    m = ResidualMLP(3, 8, 2, 3, activation="relu", block_activation="td", bias=False, feature="layernorm")
    cfg = m.config()
    assert cfg["depth"] == 3 and cfg["activation"] == "relu" and cfg["bias"] is False
    m2 = ResidualMLP(**cfg)
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in m2.state_dict().items()}
    spec = block_spec(m.blocks[0])
    b = build_block(spec)
    assert isinstance(b, ResidualBlock) and isinstance(b.feature, nn.LayerNorm) and b.linear.bias is None
    import json
    json.dumps(cfg)
    json.dumps(spec)


def test_model_without_candidate_points_errors():
    with pytest.raises(TypeError, match="Sequential"):
        candidate_points(nn.Sequential(nn.Linear(2, 2)))

    class NoNewBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList()

    with pytest.raises(TypeError, match="new_block.*got NoNewBlock"):
        candidate_points(NoNewBlock())
    with pytest.raises(TypeError, match="nn.Module"):
        candidate_points("model")


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="width must be an int >= 1, got 0"):
        ResidualMLP(2, 0, 1, 1)
    with pytest.raises(ValueError, match="depth must be an int >= 0"):
        ResidualMLP(2, 3, 1, -1)
    with pytest.raises(ValueError, match="feature must be"):
        ResidualBlock(3, feature="batchnorm")
