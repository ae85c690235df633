"""Checkpoints: save + load rebuilds identical models (grown, custom blocks, dtypes) and optimiser state."""
import copy
import json

import pytest
import torch
from torch import nn

import topoderiv
from topoderiv.growth.checkpoint import load, load_checkpoint, restore_optimizer, save
from topoderiv.growth import GrowthHistory, RoundRecord
from topoderiv.growth.insertion import insert, insert_block
from topoderiv.models import ResidualBlock, ResidualMLP

from _helpers import assert_optimizer_restored, mse_step


def _grown(dtype, seed=0):
    torch.manual_seed(seed)
    model = ResidualMLP(3, 6, 2, 2, feature="layernorm").to(dtype)
    g = torch.Generator().manual_seed(seed)
    for point, eps in ((1, 0.3), (0, 0.7), (3, 0.2)):
        phi = torch.randn(6, 7, generator=g, dtype=torch.float64)
        insert(model, point, phi / phi.norm(), eps)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_insert_save_load_roundtrip_identical_outputs(tmp_path, dtype):
    model = _grown(dtype)
    x = torch.randn(9, 3, dtype=dtype)
    path = save(model, tmp_path / "ck")
    assert (path / "model.safetensors").is_file() and (path / "model.json").is_file()
    arch = json.loads((path / "model.json").read_text())
    assert arch["class"] == "ResidualMLP" and arch["config"]["depth"] == 5 and arch["version"] == 2
    assert arch["inserted"] == {"blocks": [0, 2, 3]}  # [n2, o0, n1, n3, o1] after inserting at 1, 0, 3
    assert [b["class"] for b in arch["blocks"]["blocks"]] == ["ResidualBlock"] * 5
    assert {w["dtype"] for w in arch["weights"].values()} == {str(dtype)[6:]}
    loaded = load(path)
    assert type(loaded) is ResidualMLP and len(loaded.blocks) == 5
    assert all(p.dtype == dtype for p in loaded.parameters())
    assert [getattr(b, "topoderiv_inserted", False) for b in loaded.blocks] == [True, False, True, True, False]
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_custom_blocks_and_frozen_flags_survive(tmp_path):
    torch.manual_seed(1)
    model = ResidualMLP(3, 6, 2, 1)
    odd = ResidualBlock(6, activation="tanh", bias=False)
    insert_block(model, 1, odd)
    model.blocks[0].linear.weight.requires_grad_(False)
    loaded = load(save(model, tmp_path / "ck"))
    assert isinstance(loaded.blocks[1].activation, nn.Tanh) and loaded.blocks[1].linear.bias is None
    assert not loaded.blocks[0].linear.weight.requires_grad and loaded.blocks[0].linear.bias.requires_grad
    x = torch.randn(4, 3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_optimizer_state_roundtrip_by_name(tmp_path):
    torch.manual_seed(2)
    model = ResidualMLP(3, 6, 2, 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.8, 0.95))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    mse_step(model, opt, x, y, 3)
    insert(model, 0, torch.full((6, 7), 0.1), 0.5)  # the new block goes to the END of group 0
    opt.param_groups[0]["params"].extend(model.blocks[0].parameters())
    mse_step(model, opt, x, y)
    hist = GrowthHistory([RoundRecord(0, 3, 1.0, 1.0, 10, 1, 0.1)], {"note": "x"})
    save(model, tmp_path / "ck", optimizer=opt, history=hist)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.history.rounds[0].val_loss == 1.0 and ck.history.meta["note"] == "x"
    opt2 = restore_optimizer(ck.model, ck.optimizer_state)  # rebuilt from the saved class + defaults
    assert type(opt2) is torch.optim.Adam and tuple(opt2.param_groups[0]["betas"]) == (0.8, 0.95)
    # the state by parameter name, and one more identical step on both gives identical parameters
    assert_optimizer_restored(model, opt, ck.model, opt2, x, y)
    # a factory works as well
    opt3 = restore_optimizer(ck.model, ck.optimizer_state, lambda ps: torch.optim.Adam(ps, lr=1.0))
    assert opt3.param_groups[0]["lr"] == 3e-3


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="without model.json"):
        load(tmp_path)
    with pytest.raises(TypeError, match="config\\(\\) method.*Sequential"):
        save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "x")
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "model.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a topoderiv checkpoint"):
        load(tmp_path / "y")
    with pytest.raises(ValueError, match="no optimizer state"):
        restore_optimizer(ResidualMLP(2, 3, 1, 1), None)


def test_top_level_api_roundtrip(tmp_path):
    model = _grown(torch.float64, seed=3)
    topoderiv.save(model, tmp_path / "m")
    again = topoderiv.load(tmp_path / "m")
    x = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    # the loaded model keeps growing like the original
    a, b = copy.deepcopy(model), again
    phi = torch.zeros(6, 7, dtype=torch.float64)
    phi[2, 1] = 1.0
    insert(a, 5, phi, 0.4)
    insert(b, 5, phi, 0.4)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
