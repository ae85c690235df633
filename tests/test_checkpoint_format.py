"""The checkpoint format: every site container, registered names only, old (version 1) checkpoints,
extra tensors, optimiser state round trips, and what save refuses."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from topoderiv.growth.checkpoint import block_spec, build_block, load, load_checkpoint, restore_optimizer, save
from topoderiv.growth.insertion import insert, insert_block
from topoderiv.method.activations import TDActivation, get_activation
from topoderiv.models import ResidualBlock, ResidualMLP
from topoderiv.registry import lookup, name_of, register
from topoderiv.sites import SiteSpec, declare, site_at, site_specs

from _helpers import assert_optimizer_restored, mse_step


def _same_outputs(a: nn.Module, b: nn.Module, x: Tensor) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    assert a.state_dict().keys() == b.state_dict().keys()
    for k, v in a.state_dict().items():
        assert v.dtype == b.state_dict()[k].dtype and torch.equal(v, b.state_dict()[k]), k


# -- several site containers -------------------------------------------------------------------------


@register(name="test_checkpoint_format.TwoStage")
class TwoStage(nn.Module):
    """Two linear site containers of different widths, an nn.ModuleList and an nn.Sequential."""

    def __init__(self, depths=(1, 2), widths=(4, 6)):
        super().__init__()
        self.depths, self.widths = list(depths), list(widths)
        self.stages = nn.ModuleList([
            nn.ModuleList(ResidualBlock(widths[0]) for _ in range(depths[0])),
            nn.Sequential(*(ResidualBlock(widths[1], activation="tanh") for _ in range(depths[1]))),
        ])
        self.mid = nn.Linear(widths[0], widths[1])

    def forward(self, x):
        for b in self.stages[0]:
            x = b(x)
        return self.stages[1](self.mid(x))

    def site_specs(self):
        return [SiteSpec("stages.0", "linear", {"width": self.widths[0]}),
                SiteSpec("stages.1", "linear", {"width": self.widths[1], "feature": "layernorm"})]

    def config(self):
        return {"depths": [len(s) for s in self.stages], "widths": self.widths}


def test_every_site_container_round_trips(tmp_path):
    torch.manual_seed(0)
    model = TwoStage()
    g = torch.Generator().manual_seed(1)
    for point in ("stages.1.1", "stages.1.0", "stages.0.1"):
        s = site_at(model, point)
        insert(model, point, s.random_phi(s.new_block(), g, 0.5), 0.3)
    insert_block(model, "stages.1.4", ResidualBlock(6, activation="tanh", bias=False))  # a different block type
    arch = json.loads((save(model, tmp_path / "ck") / "model.json").read_text())
    assert list(arch["blocks"]) == ["stages.0", "stages.1"]
    assert [len(arch["blocks"][k]) for k in arch["blocks"]] == [2, 5]
    assert arch["inserted"] == {"stages.0": [1], "stages.1": [0, 2, 4]}
    loaded = load(tmp_path / "ck")
    assert [len(s) for s in loaded.stages] == [2, 5]
    assert isinstance(loaded.stages[1][2].feature, nn.LayerNorm) and loaded.stages[1][4].linear.bias is None
    assert [getattr(b, "topoderiv_inserted", False) for b in loaded.stages[1]] == [True, False, True, False, True]
    _same_outputs(model, loaded, torch.randn(5, 4))


@register(name="test_checkpoint_format.Plain")
class Plain(nn.Module):
    """A registered model without site_specs: its sites are declared on the instance."""

    def __init__(self, width=5, depth=1):
        super().__init__()
        self.width = width
        self.layers = nn.Sequential(*(ResidualBlock(width) for _ in range(depth)))

    def forward(self, x):
        return self.layers(x)

    def config(self):
        return {"width": self.width, "depth": len(self.layers)}


def test_sites_declared_on_the_instance_are_saved(tmp_path):
    model = declare(Plain(), "layers", "linear", width=5)
    insert(model, 1, torch.full((5, 6), 0.2), 0.5)
    loaded = load(save(model, tmp_path / "ck"))
    assert site_specs(loaded) == site_specs(model)
    assert loaded.layers[1].topoderiv_inserted
    _same_outputs(model, loaded, torch.randn(3, 5))


def test_model_without_sites_saves_weights_only(tmp_path):
    model = Plain(4, 2)
    arch = json.loads((save(model, tmp_path / "ck") / "model.json").read_text())
    assert arch["blocks"] == {} and arch["inserted"] == {}
    _same_outputs(model, load(tmp_path / "ck"), torch.randn(3, 4))


def test_residual_cnn_round_trip_after_inserting_in_the_second_stage(tmp_path):
    from topoderiv.models.cnn import ResidualCNN

    torch.manual_seed(0)
    model = ResidualCNN(2, 3, channels=(4, 6), depths=(1, 2))
    g = torch.Generator().manual_seed(0)
    s = site_at(model, "stages.1.1")
    insert(model, "stages.1.1", s.random_phi(s.new_block(), g, 0.5), 0.4)
    s0 = site_at(model, "stages.0.0")
    insert_block(model, "stages.0.0", s0.identity_block(g))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    arch = json.loads((save(model, tmp_path / "ck") / "model.json").read_text())
    assert arch["inserted"] == {"stages.0": [0], "stages.1": [1]} and arch["config"]["depths"] == [2, 3]
    loaded = load(tmp_path / "ck")
    assert type(loaded) is ResidualCNN and [len(s) for s in loaded.stages] == [2, 3]
    _same_outputs(model, loaded, torch.randn(2, 2, 5, 5))


@pytest.mark.parametrize("kind", ["transformer_block", "mlp_block", "attention_block", "tokens"])
def test_vit_round_trip_for_each_insert_kind(tmp_path, kind):
    ViT = pytest.importorskip("topoderiv.models.vit").ViT

    torch.manual_seed(0)
    model = ViT((4, 6), 2, 3, 2, embed_dim=8, depth=1, num_heads=2, insert=kind, global_pool="avg")
    g = torch.Generator().manual_seed(0)
    for point in (1, 0):
        s = site_at(model, point)
        insert(model, point, s.random_phi(s.new_block(), g, 0.5), 0.3)
    ck = load_checkpoint(save(model, tmp_path / "ck"))
    assert ck.meta["inserted"] == {"blocks": [0, 2]} and ck.meta["config"]["insert"] == kind
    assert [type(b) for b in ck.model.blocks] == [type(b) for b in model.blocks]
    _same_outputs(model, ck.model, torch.randn(2, 3, 4, 6))


# -- old checkpoints ----------------------------------------------------------------------------------


def _write_v1(folder, model, blocks, *, opt_class=None, dtype=None):
    folder.mkdir()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"))
    arch = {"format": "topoderiv-checkpoint", "version": 1, "class": "topoderiv.models:ResidualMLP",
            "config": model.config(), "blocks": blocks, "inserted": [0], "frozen": [], "optimizer": None,
            "scheduler": None, "extra": {}}
    if opt_class is not None:
        arch["optimizer"] = {"class": opt_class, "defaults": {"lr": 0.5}, "param_groups": [
            {"lr": 0.5, "params": [n for n, _ in model.named_parameters()]}], "scalars": {}}
        save_file({}, str(folder / "optimizer.safetensors"))
    (folder / "model.json").write_text(json.dumps(arch))


def test_version_1_checkpoint_with_module_spellings_loads(tmp_path):
    torch.manual_seed(0)
    model = ResidualMLP(3, 4, 2, 2)
    blocks = [{"class": "topoderiv.models:ResidualBlock", "config": b.config()} for b in model.blocks]
    blocks[1] = {"class": "topoderiv.sites.linear:ResidualBlock",
                 "config": {**model.blocks[1].config(), "activation": "torch.nn.modules.activation:Tanh"}}
    model.blocks[1].activation = nn.Tanh()
    _write_v1(tmp_path / "v1", model, blocks, opt_class="torch.optim.sgd:SGD", dtype=torch.float64)
    ck = load_checkpoint(tmp_path / "v1")
    assert isinstance(ck.model.blocks[1].activation, nn.Tanh) and ck.model.blocks[0].topoderiv_inserted
    assert ck.model.head.weight.dtype == torch.float64  # version 1: the file's dtypes
    _same_outputs(model.double(), ck.model, torch.randn(4, 3, dtype=torch.float64))
    opt = restore_optimizer(ck.model, ck.optimizer_state)
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.5


def test_version_1_never_imports_unregistered_spellings(tmp_path):
    model = ResidualMLP(3, 4, 2, 1)
    _write_v1(tmp_path / "v1", model, [{"class": "torch.nn:Bilinear", "config": {}}])
    with pytest.raises(ValueError, match=r"blocks\['blocks'\]\[0\].class: block class 'torch.nn:Bilinear' is not a "
                                         "registered class"):
        load(tmp_path / "v1")


# -- extra tensors ------------------------------------------------------------------------------------


def test_extra_tensors_round_trip_exactly(tmp_path):
    g = torch.Generator().manual_seed(5)
    g.manual_seed(7)
    torch.randn(3, generator=g)
    tensors = {"torch_rng": torch.get_rng_state(), "data_order": g.get_state(),
               "weights64": torch.randn(2, 3, dtype=torch.float64), "flag": torch.tensor([True, False]),
               "scalar": torch.tensor(3, dtype=torch.int64)}
    ck = load_checkpoint(save(ResidualMLP(2, 3, 1, 1), tmp_path / "ck", tensors=tensors, extra={"epoch": 4}))
    assert ck.tensors.keys() == tensors.keys() and ck.meta["extra"] == {"epoch": 4}
    for k, v in tensors.items():
        assert ck.tensors[k].dtype == v.dtype and torch.equal(ck.tensors[k], v), k
    g2 = torch.Generator()
    g2.set_state(ck.tensors["data_order"])
    assert torch.equal(torch.randn(4, generator=g2), torch.randn(4, generator=g))
    assert load_checkpoint(save(ResidualMLP(2, 3, 1, 1), tmp_path / "none")).tensors == {}


def test_extra_tensors_must_be_tensors(tmp_path):
    with pytest.raises(TypeError, match=r"save: tensors must be a dict of non-empty str -> torch.Tensor, got 'a': int"):
        save(ResidualMLP(2, 3, 1, 1), tmp_path / "ck", tensors={"a": 1})
    with pytest.raises(TypeError, match="got list"):
        save(ResidualMLP(2, 3, 1, 1), tmp_path / "ck", tensors=[torch.zeros(1)])
    assert not (tmp_path / "ck").exists()


# -- optimiser state ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.9), amsgrad=True),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-2, lr_decay=0.01),
], ids=["Adam", "AdamW", "SGD", "RMSprop", "Adagrad"])
def test_optimizer_state_round_trip(tmp_path, make):
    torch.manual_seed(3)
    model = ResidualMLP(3, 5, 2, 2)
    model.blocks[0].linear.weight.requires_grad_(False)
    opt = make([p for p in model.parameters() if p.requires_grad])
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    mse_step(model, opt, x, y, 3)
    ck = load_checkpoint(save(model, tmp_path / "ck", optimizer=opt))
    assert ck.optimizer_state["meta"]["class"] == type(opt).__name__
    opt2 = restore_optimizer(ck.model, ck.optimizer_state)
    assert type(opt2) is type(opt)
    names2 = dict(ck.model.named_parameters())
    for n, p in model.named_parameters():
        assert names2[n].requires_grad == p.requires_grad
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):
        assert {k: v for k, v in g1.items() if k != "params"} == {k: v for k, v in g2.items() if k != "params"}
    assert_optimizer_restored(model, opt, ck.model, opt2, x, y)  # e.g. Adam's moments, then one step


class UnregisteredAdam(torch.optim.Adam):
    pass


def test_unregistered_optimizer_needs_a_factory(tmp_path):
    model = ResidualMLP(2, 3, 1, 1)
    opt = UnregisteredAdam(model.parameters(), lr=0.1)
    model(torch.ones(2, 2)).sum().backward()
    opt.step()
    with pytest.warns(UserWarning, match="optimizer class UnregisteredAdam is not registered"):
        save(model, tmp_path / "ck", optimizer=opt)
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.optimizer_state["meta"]["class"] is None
    with pytest.raises(ValueError, match="restore_optimizer: the checkpoint's optimizer class was not registered"):
        restore_optimizer(ck.model, ck.optimizer_state)
    opt2 = restore_optimizer(ck.model, ck.optimizer_state, lambda ps: UnregisteredAdam(ps))
    assert opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state[ck.model.head.weight]["exp_avg"], opt.state[model.head.weight]["exp_avg"])


# -- what save refuses --------------------------------------------------------------------------------


class UnregisteredModel(ResidualMLP):
    pass


class UnregisteredAct(nn.Module):
    def forward(self, z):
        return TDActivation()(z)


class UnregisteredBlock(ResidualBlock):
    pass


def test_save_refuses_unregistered_classes(tmp_path):
    with pytest.raises(ValueError, match="save: model class .*UnregisteredModel is not registered.*register"):
        save(UnregisteredModel(2, 3, 1, 1), tmp_path / "a")
    model = ResidualMLP(2, 3, 1, 2)
    model.blocks[1] = UnregisteredBlock(3)
    with pytest.raises(ValueError, match=r"save: block blocks\[1\]: block_spec: block class .*UnregisteredBlock is not "
                                         "registered"):
        save(model, tmp_path / "b")
    model.blocks[1] = ResidualBlock(3, activation=UnregisteredAct())
    with pytest.raises(ValueError, match=r"model.json: blocks\['blocks'\]\[1\].config.activation: "
                                         r"'test_checkpoint_format:UnregisteredAct' describes a class that is not "
                                         "registered"):
        save(model, tmp_path / "c")
    assert not any(tmp_path.iterdir())  # nothing written
    register(UnregisteredAct, name="test_checkpoint_format.UnregisteredAct")  # once registered, it saves
    loaded = load(save(model, tmp_path / "c"))
    assert isinstance(loaded.blocks[1].activation, UnregisteredAct)


def test_save_refuses_non_models(tmp_path):
    with pytest.raises(TypeError, match="save: model must be an nn.Module, got str"):
        save("model", tmp_path / "x")


# -- the registry -------------------------------------------------------------------------------------


def test_registry_names_and_old_spellings():
    assert lookup("ResidualMLP") is ResidualMLP and name_of(ResidualMLP(2, 3, 1, 1)) == "ResidualMLP"
    assert lookup("td") is TDActivation and name_of(nn.Tanh) == "tanh" and name_of(nn.LayerNorm) == "layernorm"
    assert lookup("Adam") is torch.optim.Adam and lookup("AdamW") is torch.optim.AdamW
    # old "module:QualName" spellings map to registered classes only
    assert lookup("topoderiv.models:ResidualMLP") is ResidualMLP
    assert lookup("topoderiv.models.mlp:ResidualMLP") is ResidualMLP
    assert lookup("topoderiv.models:ResidualBlock") is ResidualBlock
    assert lookup("torch.optim.adam:Adam") is torch.optim.Adam and lookup("torch.nn:Tanh") is nn.Tanh
    assert get_activation("topoderiv.method.activations:TDActivation").__class__ is TDActivation
    for bad in ("torch.nn:Softsign", "os:system", "topoderiv.models:ResidualMLPX", ":ResidualMLP", "topoderiv:"):
        with pytest.raises(ValueError, match="is not a registered class"):
            lookup(bad, "class", "here")
    with pytest.raises(ValueError, match="here: model 'Adam' is registered for torch.optim.adam.Adam, which is not a "
                                         "torch.nn.modules.module.Module subclass"):
        lookup("Adam", "model", "here", base=nn.Module)


def test_registry_ambiguous_old_spelling():
    @register(name="test_checkpoint_format.a.Twin")
    class Twin(nn.Module):
        pass

    Twin.__module__ = "tdckfmt.a"

    @register(name="test_checkpoint_format.b.Twin")
    class Twin(nn.Module):  # noqa: F811
        pass

    Twin.__module__ = "tdckfmt.b"
    qual = Twin.__qualname__
    with pytest.raises(ValueError, match="is ambiguous"):
        lookup(f"tdckfmt:{qual}", "class", "here")
    assert lookup(f"tdckfmt.b:{qual}") is Twin


def test_block_spec_and_build_block():
    b = ResidualBlock(4, activation="tanh", feature="layernorm")
    spec = block_spec(b)
    assert spec["class"] == "ResidualBlock" and spec["config"]["activation"] == "tanh"
    b2 = build_block(spec)
    assert type(b2) is ResidualBlock and block_spec(b2) == spec
    assert block_spec(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="block spec: class: block class 'os:system' is not a registered class"):
        build_block({"class": "os:system", "config": {}})
    with pytest.raises(ValueError, match="block spec: config.width: expected int, got 'x'"):
        build_block({"class": "ResidualBlock", "config": {"width": "x"}})
