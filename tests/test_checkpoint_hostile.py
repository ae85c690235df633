"""Hostile checkpoints: loading never imports or calls what a file names, and every corrupt input
raises a ValueError that names the file and the field (never a raw KeyError/IndexError/...)."""
import json
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from topoderiv.growth import GrowthHistory, RoundRecord
from topoderiv.growth.checkpoint import load, load_checkpoint, save
from topoderiv.growth.insertion import insert
from topoderiv.models import ResidualBlock, ResidualMLP
from topoderiv.registry import register

EVIL_NAMES = ["subprocess:run", "subprocess:Popen", "os:system", "builtins:eval", "builtins:exec",
              "topoderiv.growth.checkpoint:save", "topoderiv.registry:register", "shutil:rmtree"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A grown ResidualMLP with Adam state, a history and extra tensors, saved once."""
    torch.manual_seed(0)
    model = ResidualMLP(3, 6, 2, 2, feature="layernorm")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    for _ in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    insert(model, 1, torch.full((6, 7), 0.1), 0.3)
    hist = GrowthHistory([RoundRecord(0, 2, 1.0, 1.5, 100, 2, 0.1, [1.2, 1.0], mu={0: 0.5, 1: -0.25})], {"a": 1})
    path = save(model, tmp_path_factory.mktemp("good") / "ck", optimizer=opt, history=hist,
                tensors={"rng": torch.get_rng_state(), "order": torch.arange(5)})
    return path


def _copy(good, tmp_path, name="bad"):
    dst = tmp_path / name
    shutil.copytree(good, dst)
    return dst


def _edit_json(folder, mutate, file="model.json"):
    d = json.loads((folder / file).read_text())
    mutate(d)
    (folder / file).write_text(json.dumps(d))
    return folder


def _bad(good, tmp_path, mutate, file="model.json"):
    return _edit_json(_copy(good, tmp_path), mutate, file)


def _raises(folder, *patterns):
    """load_checkpoint raises a ValueError whose message matches every pattern; returns the message."""
    with pytest.raises(ValueError) as err:
        load_checkpoint(folder)
    msg = str(err.value)
    for p in patterns:
        assert p in msg, (p, msg)
    return msg


# -- code execution through every class name in the format -------------------------------------------


def _slot_setters():
    """Every place of the format that names a class (or an activation / feature spec)."""

    def model_class(d, name):
        d["class"], d["config"] = name, {"args": ["touch", "x"]}

    def block_class(d, name):
        d["blocks"]["blocks"][1]["class"] = name

    def block_activation(d, name):
        d["blocks"]["blocks"][1]["config"]["activation"] = name

    def block_feature(d, name):
        d["blocks"]["blocks"][1]["config"]["feature"] = name

    def model_activation(d, name):
        d["config"]["activation"] = name

    def model_block_activation(d, name):
        d["config"]["block_activation"] = name

    def optimizer_class(d, name):
        d["optimizer"]["class"] = name

    return {f.__name__: f for f in (model_class, block_class, block_activation, block_feature, model_activation,
                                    model_block_activation, optimizer_class)}


SLOTS = _slot_setters()


@pytest.mark.parametrize("slot", sorted(SLOTS))
@pytest.mark.parametrize("name", EVIL_NAMES)
def test_class_names_never_resolve_to_code(good, tmp_path, slot, name):
    folder = _bad(good, tmp_path, lambda d: SLOTS[slot](d, name))
    msg = _raises(folder, "model.json", repr(name), "not a registered class", "register")
    assert str(folder) in msg


@pytest.fixture
def evil_module(tmp_path, monkeypatch):
    """A module whose import, and whose class's call, would each create a marker file."""
    marker = tmp_path / "PWNED"
    src = tmp_path / "evilpkg_td_ck"
    src.mkdir()
    (src / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "import torch\n"
        "class Evil(torch.nn.Module):\n"
        f"    def __init__(self, *a, **k):\n        open({str(marker)!r}, 'w').write('called')\n"
        "        super().__init__()\n"
        "class EvilOpt(torch.optim.SGD):\n"
        f"    def __init__(self, *a, **k):\n        open({str(marker)!r}, 'w').write('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("evilpkg_td_ck", None)


@pytest.mark.parametrize("slot", sorted(SLOTS))
def test_marker_file_never_created(good, tmp_path, slot, evil_module):
    name = "evilpkg_td_ck:EvilOpt" if slot == "optimizer_class" else "evilpkg_td_ck:Evil"
    folder = _bad(good, tmp_path, lambda d: SLOTS[slot](d, name))
    _raises(folder, "not a registered class")
    assert not evil_module.exists()
    assert "evilpkg_td_ck" not in sys.modules
    # the marker mechanism works: importing and calling would have created it
    import evilpkg_td_ck  # noqa: F401
    assert evil_module.read_text() == "imported"


def test_subprocess_run_class_runs_nothing(good, tmp_path):
    marker = tmp_path / "ran"
    folder = _bad(good, tmp_path, lambda d: d.update({"class": "subprocess:run",
                                                      "config": {"args": ["touch", str(marker)]}}))
    _raises(folder, "model.json: class: model class 'subprocess:run' is not a registered class")
    assert not marker.exists()


def test_registered_class_of_the_wrong_kind(good, tmp_path):
    _raises(_bad(good, tmp_path, lambda d: d["optimizer"].update({"class": "ResidualMLP"})),
            "optimizer.class", "not a torch.optim.optimizer.Optimizer subclass")
    _raises(_bad(good, tmp_path / "b", lambda d: d.update({"class": "Adam"})),
            "model.json: class", "not a torch.nn.modules.module.Module subclass")


# -- truncated and corrupt files ----------------------------------------------------------------------


@pytest.mark.parametrize("file", ["model.json", "model.safetensors", "optimizer.safetensors",
                                  "tensors.safetensors", "history.json"])
@pytest.mark.parametrize("frac", [0.0, 0.01, 0.5, 0.999])
def test_truncated_files(good, tmp_path, file, frac):
    folder = _copy(good, tmp_path)
    data = (folder / file).read_bytes()
    n = int(len(data) * frac)
    n = min(n, len(data) - 1)
    (folder / file).write_bytes(data[:n])
    msg = _raises(folder, file)
    assert "truncated or corrupt" in msg or "expected" in msg


@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors", "tensors.safetensors",
                                  "history.json"])
def test_missing_files(good, tmp_path, file):
    folder = _copy(good, tmp_path)
    (folder / file).unlink()
    _raises(folder, file, "missing")


@pytest.mark.parametrize("text,expect", [
    (b"\xff\xfe garbage", "not a valid JSON file"),
    (b"[]", "expected an object, got a list"),
    (b"null", "expected an object, got null"),
    (b'{"format": "topoderiv-checkpoint", "version": 2, "version": 2}', "duplicate key 'version'"),
    (b"[" * 100000, "not a valid JSON file"),
])
def test_corrupt_model_json(good, tmp_path, text, expect):
    folder = _copy(good, tmp_path)
    (folder / "model.json").write_bytes(text)
    _raises(folder, "model.json", expect)


def test_non_finite_json_constants_rejected(good, tmp_path):
    folder = _copy(good, tmp_path)
    text = (folder / "model.json").read_text().replace('"lr": 0.01', '"lr": Infinity', 1)
    assert "Infinity" in text
    (folder / "model.json").write_text(text)
    _raises(folder, "model.json", "not a valid JSON file", "Infinity")


# -- type and shape confusions in model.json --------------------------------------------------------


CONFUSIONS = {
    "version": (lambda d: d.update({"version": "2"}), "model.json: version: expected 1 or 2"),
    "future_version": (lambda d: d.update({"version": 3}), "model.json: version: expected 1 or 2"),
    "format": (lambda d: d.update({"format": "pickle"}), "is not a topoderiv checkpoint"),
    "class_not_str": (lambda d: d.update({"class": ["ResidualMLP"]}), "model.json: class: expected a non-empty str"),
    "config_not_dict": (lambda d: d.update({"config": [3, 6]}), "model.json: config: expected an object, got a list"),
    "config_unknown_key": (lambda d: d["config"].update({"evil": 1}),
                           "model.json: config.evil: unexpected argument of ResidualMLP"),
    "config_missing_key": (lambda d: d["config"].pop("width"), "missing required argument 'width' of ResidualMLP"),
    "config_wrong_type": (lambda d: d["config"].update({"depth": "3"}),
                          "model.json: config.depth: expected int, got '3'"),
    "config_bool_for_int": (lambda d: d["config"].update({"width": True}), "config.width: expected int, got true"),
    "config_rejected_by_constructor": (lambda d: d["config"].update({"width": 0}),
                                       "model.json: config: ResidualMLP(**config) failed: ValueError"),
    "depth_mismatch": (lambda d: d["config"].update({"depth": 2}), "blocks['blocks']: expected 2 blocks"),
    "blocks_not_dict": (lambda d: d.update({"blocks": [None, None, None]}), "model.json: blocks: expected an object"),
    "blocks_too_long": (lambda d: d["blocks"]["blocks"].append(None), "blocks['blocks']: expected 3 blocks"),
    "blocks_too_short": (lambda d: d["blocks"]["blocks"].pop(), "blocks['blocks']: expected 3 blocks"),
    "blocks_unknown_container": (lambda d: d.update({"blocks": {"stages.1": d["blocks"]["blocks"]},
                                                     "inserted": {"stages.1": []}}),
                                 "model.json: blocks: expected one list of blocks per site container"),
    "block_not_dict": (lambda d: d["blocks"]["blocks"].__setitem__(0, "ResidualBlock"),
                       "blocks['blocks'][0]: expected an object"),
    "block_missing_class": (lambda d: d["blocks"]["blocks"][0].pop("class"), "blocks['blocks'][0].class: missing"),
    "block_config_not_dict": (lambda d: d["blocks"]["blocks"][2].update({"config": "width=6"}),
                              "blocks['blocks'][2].config: expected an object, got 'width=6'"),
    "block_config_width": (lambda d: d["blocks"]["blocks"][2]["config"].update({"width": "x"}),
                           "model.json: blocks['blocks'][2].config.width: expected int, got 'x'"),
    "block_config_unknown_key": (lambda d: d["blocks"]["blocks"][2]["config"].update({"depth": 1}),
                                 "blocks['blocks'][2].config.depth: unexpected argument of ResidualBlock"),
    "block_config_wrong_width": (lambda d: d["blocks"]["blocks"][2]["config"].update({"width": 5}),
                                 "model.json: weights['blocks.2.linear.weight'].shape: expected [5, 5]"),
    "block_feature_options": (lambda d: d["blocks"]["blocks"][2]["config"].update({"feature": {"layernorm": 3}}),
                              "blocks['blocks'][2].config: ResidualBlock(**config) failed"),
    "inserted_negative": (lambda d: d["inserted"].update({"blocks": [-1]}),
                          "model.json: inserted['blocks'][0]: expected a block index, an int in [0, 2], got -1"),
    "inserted_too_large": (lambda d: d["inserted"].update({"blocks": [99]}),
                           "inserted['blocks'][0]: expected a block index, an int in [0, 2], got 99"),
    "inserted_str": (lambda d: d["inserted"].update({"blocks": ["1"]}),
                     "inserted['blocks'][0]: expected a block index"),
    "inserted_twice": (lambda d: d["inserted"].update({"blocks": [1, 1]}), "inserted['blocks'][1]: block 1 is listed"),
    "inserted_not_list": (lambda d: d["inserted"].update({"blocks": 1}), "inserted['blocks']: expected a list"),
    "inserted_unknown_container": (lambda d: d["inserted"].update({"stages.0": [0]}),
                                   "inserted['stages.0']: names a container"),
    "frozen_unknown": (lambda d: d.update({"frozen": ["head.weight", "no.such"]}),
                       "model.json: frozen[1]: names no parameter of the model ('no.such')"),
    "frozen_not_list": (lambda d: d.update({"frozen": "head.weight"}), "model.json: frozen: expected a list"),
    "weights_not_dict": (lambda d: d.update({"weights": None}), "model.json: weights: expected an object"),
    "weights_bad_dtype": (lambda d: d["weights"]["head.weight"].update({"dtype": "object"}),
                          "weights['head.weight'].dtype: expected one of"),
    "weights_bad_shape": (lambda d: d["weights"]["head.weight"].update({"shape": [2, -6]}),
                          "weights['head.weight'].shape[1]: expected an int >= 0, got -6"),
    "weights_shape_vs_model": (lambda d: d["weights"]["head.weight"].update({"shape": [6, 2]}),
                               "weights['head.weight'].shape: expected [2, 6]"),
    "weights_missing_key": (lambda d: d["weights"].pop("head.bias"), "model.json: weights: expected the state-dict "
                                                                     "keys"),
    "weights_int_for_float": (lambda d: d["weights"]["head.weight"].update({"dtype": "int64"}),
                              "weights['head.weight'].dtype: expected a floating dtype like float32, got 'int64'"),
    "weights_float64_json": (lambda d: d["weights"]["head.weight"].update({"dtype": "float64"}),
                             "model.safetensors: ['head.weight']: expected float64 [2, 6]"),
    "lr_str": (lambda d: d["optimizer"]["param_groups"][0].update({"lr": "abc"}),
               "model.json: optimizer.param_groups[0].lr: expected a finite number >= 0, got 'abc'"),
    "lr_negative": (lambda d: d["optimizer"]["param_groups"][0].update({"lr": -1.0}),
                    "param_groups[0].lr: expected a finite number >= 0, got -1.0"),
    "lr_nan_string": (lambda d: d["optimizer"]["defaults"].update({"lr": "nan"}),
                      "optimizer.defaults.lr: expected a finite number >= 0"),
    "betas_one": (lambda d: d["optimizer"]["param_groups"][0].update({"betas": [0.9]}),
                  "param_groups[0].betas: expected two numbers in [0, 1)"),
    "betas_str": (lambda d: d["optimizer"]["param_groups"][0].update({"betas": ["0.9", 0.99]}),
                  "param_groups[0].betas: expected two numbers in [0, 1)"),
    "amsgrad_str": (lambda d: d["optimizer"]["param_groups"][0].update({"amsgrad": "yes"}),
                    "param_groups[0].amsgrad: expected true or false"),
    "groups_not_list": (lambda d: d["optimizer"].update({"param_groups": {"params": []}}),
                        "model.json: optimizer.param_groups: expected a list"),
    "group_no_params": (lambda d: d["optimizer"]["param_groups"][0].pop("params"),
                        "optimizer.param_groups[0].params: missing"),
    "group_unknown_param": (lambda d: d["optimizer"]["param_groups"][0]["params"].append("no.such"),
                            "names no parameter of the model ('no.such'"),
    "group_duplicate_param": (lambda d: d["optimizer"]["param_groups"].append(
        {**d["optimizer"]["param_groups"][0], "params": ["head.bias"]}),
        "optimizer.param_groups[1].params[0]: parameter 'head.bias' is already in param_groups[0]"),
    "scalars_unknown_param": (lambda d: d["optimizer"].update({"scalars": {"no.such": {}}}),
                              "optimizer.scalars['no.such']: names a parameter that is in no param group"),
    "scalars_bad_value": (lambda d: d["optimizer"].update({"scalars": {"head.bias": {"step": "x"}}}),
                          "optimizer.scalars['head.bias'].step: expected a finite number, true, false or null"),
    "scheduler_not_dict": (lambda d: d.update({"scheduler": [1]}), "model.json: scheduler: expected an object"),
    "extra_not_dict": (lambda d: d.update({"extra": "x"}), "model.json: extra: expected an object"),
    "tensors_manifest": (lambda d: d["tensors"]["rng"].update({"dtype": "int64"}),
                         "tensors.safetensors: ['rng']: expected int64"),
    "tensors_manifest_keys": (lambda d: d["tensors"].pop("order"), "tensors.safetensors: expected the tensors listed"),
    "history_flag": (lambda d: d.update({"history": "yes"}), "model.json: history: expected true or false"),
    "id_missing": (lambda d: d.pop("id"), "model.json: id: missing"),
    "optimizer_missing": (lambda d: d.pop("optimizer"), "model.json: optimizer: missing"),
    "tensors_missing": (lambda d: d.pop("tensors"), "model.json: tensors: missing"),
    "optimizer_class_missing": (lambda d: d["optimizer"].pop("class"), "model.json: optimizer.class: missing"),
    "inserted_container_missing": (lambda d: d["inserted"].pop("blocks"),
                                   "model.json: inserted: expected an entry per container of blocks"),
    "torch_not_str": (lambda d: d.update({"torch": [2]}), "model.json: torch: expected a version str"),
}


@pytest.mark.parametrize("case", sorted(CONFUSIONS))
def test_type_and_shape_confusions(good, tmp_path, case):
    mutate, expect = CONFUSIONS[case]
    msg = _raises(_bad(good, tmp_path, mutate), expect)
    assert str(tmp_path / "bad") in msg  # names the file by its path


HISTORY_CONFUSIONS = {
    "rounds_not_list": (lambda d: d.update({"rounds": 3}), "history.json: rounds: expected a list"),
    "round_not_dict": (lambda d: d["rounds"].append(3), "history.json: rounds[1]: expected an object"),
    "round_missing": (lambda d: d["rounds"][0].pop("epochs"), "history.json: rounds[0].epochs: missing"),
    "epochs_str": (lambda d: d["rounds"][0].update({"epochs": "x"}), "history.json: rounds[0].epochs: expected int"),
    "loss_list": (lambda d: d["rounds"][0].update({"val_loss": [1]}), "rounds[0].val_loss: expected float"),
    "mu_key": (lambda d: d["rounds"][0].update({"mu": {"x": 1.0}}), "rounds[0].mu['x']: expected a point"),
    "meta": (lambda d: d.update({"meta": []}), "history.json: meta: expected an object"),
    "format": (lambda d: d.update({"format": "x"}), "history.json: format: expected 'topoderiv-growth-history'"),
}


@pytest.mark.parametrize("case", sorted(HISTORY_CONFUSIONS))
def test_history_confusions(good, tmp_path, case):
    mutate, expect = HISTORY_CONFUSIONS[case]
    _raises(_bad(good, tmp_path, mutate, file="history.json"), expect)


def test_history_nonfinite_losses_round_trip(tmp_path):
    h = GrowthHistory([RoundRecord(0, 1, float("nan"), float("inf"), 3, 1, 0.0)])
    ck = load_checkpoint(save(ResidualMLP(2, 3, 1, 1), tmp_path / "ck", history=h))
    assert ck.history.rounds[0].train_loss == "nan"  # as GrowthHistory.from_dict gives it today


# -- weights and optimiser tensors -------------------------------------------------------------------


def _rewrite_tensors(folder, file, change):
    from safetensors import safe_open
    with safe_open(str(folder / file), framework="pt") as fh:
        meta = fh.metadata()
    tensors = load_file(str(folder / file))
    change(tensors)
    save_file(tensors, str(folder / file), metadata=meta)


def test_float64_weights_for_float32_model(good, tmp_path):
    folder = _copy(good, tmp_path)
    _rewrite_tensors(folder, "model.safetensors", lambda t: t.update({k: v.double() for k, v in t.items()}))
    _raises(folder, "model.safetensors: ['blocks.0.feature.bias']: expected float32 [6]", "got float64 [6]")


def test_weights_wrong_shape_missing_and_extra(good, tmp_path):
    folder = _copy(good, tmp_path)
    _rewrite_tensors(folder, "model.safetensors", lambda t: t.update({"head.weight": torch.zeros(6, 2)}))
    _raises(folder, "model.safetensors: ['head.weight']: expected float32 [2, 6]", "got float32 [6, 2]")
    folder = _copy(good, tmp_path, "b")
    _rewrite_tensors(folder, "model.safetensors", lambda t: t.pop("head.bias"))
    _raises(folder, "model.safetensors: expected the tensors", "missing ['head.bias']")
    folder = _copy(good, tmp_path, "c")
    _rewrite_tensors(folder, "model.safetensors", lambda t: t.update({"evil": torch.zeros(1)}))
    _raises(folder, "model.safetensors: expected the tensors", "unexpected ['evil']")


@pytest.mark.parametrize("key,value,expect", [
    ("blocks.0.linear.weight::exp_avg", torch.zeros(3), "expected a tensor shaped like its parameter: float32 [6, 6]"),
    ("blocks.0.linear.weight::exp_avg_sq", torch.zeros(6, 6, dtype=torch.float64), "got float64 [6, 6]"),
    ("head.bias::step", torch.zeros(2), "expected a scalar number tensor"),
    ("no.such::exp_avg", torch.zeros(2), "names a parameter that is in none of"),
    ("head.bias", torch.zeros(2), "expected a key '<parameter name>::<state key>'"),
])
def test_optimizer_state_confusions(good, tmp_path, key, value, expect):
    folder = _copy(good, tmp_path)
    _rewrite_tensors(folder, "optimizer.safetensors", lambda t: t.update({key: value}))
    _raises(folder, "optimizer.safetensors", expect)


def test_files_of_another_checkpoint_are_not_mixed(good, tmp_path):
    other = save(ResidualMLP(3, 6, 2, 3, feature="layernorm"), tmp_path / "other")
    folder = _copy(good, tmp_path)
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    _raises(folder, "model.safetensors: belongs to another checkpoint")


# -- constructor errors of registered classes ---------------------------------------------------------


@register(name="test_checkpoint_hostile.KwargsBlock")
class KwargsBlock(ResidualBlock):
    """A registered block whose constructor takes **kwargs and raises TypeError on unknown ones."""

    def __init__(self, width, **kwargs):
        unknown = set(kwargs) - {"activation", "bias", "feature"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}")
        super().__init__(width, **kwargs)


def test_constructor_type_error_becomes_value_error_naming_the_file(tmp_path):
    model = ResidualMLP(3, 6, 2, 2)
    model.blocks[1] = KwargsBlock(6, activation="td")
    path = save(model, tmp_path / "ck")
    assert load(path).blocks[1].__class__ is KwargsBlock
    _edit_json(path, lambda d: d["blocks"]["blocks"][1]["config"].update({"evil": 1}))
    msg = _raises(path, "model.json: blocks['blocks'][1].config: test_checkpoint_hostile.KwargsBlock(**config) "
                        "failed: TypeError: unexpected keyword arguments ['evil']")
    assert str(path) in msg


# -- a config that would allocate far more than the weights file holds --------------------------------

BUILT_ON = []


@register(name="test_checkpoint_hostile.Bomb")
class Bomb(nn.Module):
    """Records the device each construction allocates on."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.w = nn.Parameter(torch.empty(size))
        BUILT_ON.append(self.w.device.type)

    def config(self):
        return {"size": self.size}


def test_config_allocation_bomb_is_caught_on_the_meta_device(tmp_path):
    path = save(Bomb(3), tmp_path / "ck")
    _edit_json(path, lambda d: d["config"].update({"size": 10**12}))  # 4 TB if it were built
    BUILT_ON.clear()
    _raises(path, "model.json: config.size: expected an integer of at most 65536")  # before any build
    assert BUILT_ON == []
    _edit_json(path, lambda d: d["config"].update({"size": 50000}))
    BUILT_ON.clear()
    _raises(path, "model.json: weights['w'].shape: expected [50000]")
    assert BUILT_ON == ["meta"]
    _edit_json(path, lambda d: (d["config"].update({"size": 60000}), d["weights"]["w"].update({"shape": [60000]})))
    BUILT_ON.clear()
    _raises(path, "bytes cannot hold the 240000 bytes of weights model.json lists")
    assert BUILT_ON == ["meta"]


def test_config_depth_bomb_is_refused_before_any_build(good, tmp_path):
    # found by the fuzz (seed 55): a depth of 10**30 made the meta-device build loop forever
    path = _copy(good, tmp_path)
    _edit_json(path, lambda d: d["config"].update({"depth": 10**30}))
    _raises(path, "model.json: config.depth: expected an integer of at most")
    path = _copy(good, tmp_path, "bad2")
    _edit_json(path, lambda d: d["blocks"]["blocks"][0]["config"].update({"width": -10**30}))
    _raises(path, "model.json: blocks['blocks'][0].config.width: expected an integer of at most")


# -- fuzz: random edits of every file raise ValueError (or load), never a raw KeyError/IndexError/... ----

FUZZ_VALUES = ["x", "", -1, 0, 1.5, -2.5, 10**30, None, True, False, [], {}, [1, 2], [[]], {"a": 1}, {"class": "os:system"},
               "subprocess:run", "float64", ["blocks.0.linear.weight"], {"dtype": "float32", "shape": [1]}]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(obj, path, rng):
    value = json.loads(json.dumps(FUZZ_VALUES[int(rng.integers(len(FUZZ_VALUES)))]))  # a fresh copy
    if not path:
        return value
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if isinstance(parent, dict) and rng.random() < 0.25:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


def test_fuzzed_checkpoints_raise_only_value_errors(good, tmp_path):
    import time

    import numpy as np

    seed = time.time_ns() % 2**31
    print(f"fuzz seed {seed}")
    rng = np.random.default_rng(seed)
    base = {f: json.loads((good / f).read_text()) for f in ("model.json", "history.json")}
    outcomes = {"loaded": 0, "ValueError": 0}
    for it in range(150):
        folder = tmp_path / f"f{it}"
        shutil.copytree(good, folder)
        if rng.random() < 0.8:
            f = "model.json" if rng.random() < 0.85 else "history.json"
            d = json.loads(json.dumps(base[f]))
            paths = list(_paths(d))
            for _ in range(int(rng.integers(1, 3))):
                paths = list(_paths(d)) if isinstance(d, (dict, list)) else [()]
                d = _mutate(d, paths[int(rng.integers(len(paths)))], rng)
            (folder / f).write_text(json.dumps(d))
        else:  # flip bytes of a safetensors file
            f = ["model.safetensors", "optimizer.safetensors", "tensors.safetensors"][int(rng.integers(3))]
            data = bytearray((folder / f).read_bytes())
            for _ in range(int(rng.integers(1, 4))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            (folder / f).write_bytes(bytes(data))
        try:
            load_checkpoint(folder)
            outcomes["loaded"] += 1
        except ValueError as err:
            assert str(folder) in str(err), err  # names the file
            outcomes["ValueError"] += 1
    assert outcomes["ValueError"] > 50, outcomes
