"""CLI tests: `grow` and `compare` on a tiny budget (in-process, into tmp_path), usage errors,
Ctrl-C during `grow` (a real SIGINT to a subprocess) and `grow --resume`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import topoderiv.cli as cli
from topoderiv.cli import EXIT_INTERRUPTED, build_parser, main

TINY = ["--task", "regression", "--n-train", "64", "--rounds", "1", "--epochs", "1", "--width", "8",
        "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def keep_threads():
    """`grow --threads 1` sets torch's thread count of this process: put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_grow_writes_history_plots_and_model(tmp_path, capsys):
    out = tmp_path / "grow"
    assert main(["grow", *TINY, "--seed", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "round depth" in text and "final: test mse" in text
    for name in ("history.json", "metrics.json", "growth.png", "mu.png", "model/model.json",
                 "model/model.safetensors"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    hist = json.loads((out / "history.json").read_text())
    assert hist["format"] == "topoderiv-growth-history" and hist["rounds"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["task"] == "regression"
    from topoderiv.growth.checkpoint import load
    from topoderiv.experiments.tasks import get_task

    model = load(out / "model")
    assert len(model.blocks) == metrics["depth"]
    task = get_task("regression", seed=0, n_train=64)
    assert task.evaluate(model)["mse"] == pytest.approx(metrics["mse"], rel=1e-5)


def test_compare_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--seeds", "0", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    md = (out / "results.md").read_text()
    for m in ("topological", "random", "identity", "forward_thinking", "initial", "fixed_final"):
        assert f"| {m} |" in md and m in text
    assert "Command: `topoderiv compare" in md
    for name in ("results.json", "comparison.png", "curves.png", "growth_topological_s0.png",
                 "mu_topological_s0.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name


def test_compare_method_subset(tmp_path):
    out = tmp_path / "cmp2"
    assert main(["compare", *TINY, "--seeds", "0", "--methods", "initial", "random", "--optimizer", "sgd",
                 "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["methods"] == ["initial", "random"] and len(res["runs"]) == 2
    assert res["budget"]["optimizer"] == "sgd" and "SGD (momentum 0.9)" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, msg", [
    (["grow", "--task", "nope"], "invalid choice: 'nope'"),
    (["grow", "--epochs", "0"], "expected an integer >= 1, got 0"),
    (["grow", "--epochs", "abc"], "expected an integer >= 1, got 'abc'"),
    (["grow", "--lr", "-1"], "expected a finite number > 0, got '-1'"),
    (["grow", "--lr", "0"], "expected a finite number > 0, got '0'"),
    (["grow", "--lr", "inf"], "expected a finite number > 0, got 'inf'"),
    (["grow", "--lr", "nan"], "expected a finite number > 0, got 'nan'"),
    (["compare", "--lr=-inf"], "expected a finite number > 0, got '-inf'"),
    (["compare", "--methods", "magic"], "invalid choice: 'magic'"),
    (["compare", "--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    (["grow", "--device", "tpu9"], "device"),
    (["frobnicate"], "invalid choice"),
    ([], "the following arguments are required"),
])
def test_bad_flags_exit_with_usage_error(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err


def test_cuda_flag_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit):
        main(["grow", "--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_info_prints_build(capsys):
    assert main(["info"]) == 0
    assert "topoderiv build" in capsys.readouterr().out


def test_parser_defaults():
    args = build_parser().parse_args(["grow"])
    assert args.task == "heat" and args.seed == 0 and args.device == "cpu" and args.patience == 2
    args = build_parser().parse_args(["compare"])
    # methods: resolved per network family (DEFAULT_METHODS for the mlp)
    assert args.seeds == [0, 1, 2] and args.methods is None
    assert args.model is None and args.insert is None and args.timm_kwargs is None  # None: the task's family


def test_depth_above_max_depth_is_refused(capsys, tmp_path):
    for cmd in ("grow", "compare"):
        with pytest.raises(SystemExit) as exc:
            main([cmd, *TINY, "--depth", "5", "--max-depth", "2", "--out", str(tmp_path / cmd)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--depth must not exceed --max-depth" in err and "initial depth 5 and max depth 2" in err, err
        assert not (tmp_path / cmd).exists()  # refused before anything is written


def test_out_under_an_existing_file_is_a_usage_error(capsys, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out, msg in ((f / "run", f"'{f}' in it is an existing file"), (f, "an existing file")):
        with pytest.raises(SystemExit) as exc:
            main(["grow", *TINY, "--out", str(out)])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--out must be a folder" in err and msg in err and "Traceback" not in err, err


def test_python_m_topoderiv_without_gpu_says_so(monkeypatch, capsys):
    import topoderiv.__main__ as entry

    cuda_build = {"version": "0.1.0", "cuda": True, "cuda_architectures": "80;90", "cuda_runtime": "12.6",
                  "gpus": [], "gpu_error": "CUDA driver version is insufficient for CUDA runtime version"}
    monkeypatch.setattr(entry, "build_info", lambda: dict(cuda_build))
    monkeypatch.setattr(entry, "nvidia_driver_loaded", lambda: False)
    entry.main()
    out = capsys.readouterr().out
    assert "insufficient" not in out and "none visible (no NVIDIA GPU or driver on this machine)" in out
    monkeypatch.setattr(entry, "nvidia_driver_loaded", lambda: True)  # a driver: then the error is real
    entry.main()
    assert "none usable: CUDA driver version is insufficient" in capsys.readouterr().out
    monkeypatch.setattr(entry, "build_info", lambda: {**cuda_build, "gpus": ["NVIDIA H200 (sm_90)"],
                                                      "gpu_error": None})
    entry.main()
    assert "NVIDIA H200 (sm_90)" in capsys.readouterr().out


# --- Ctrl-C and --resume ---------------------------------------------------------------------

#: about 0.3 s per round on one core: a SIGINT after round 0 lands in a later round
GROW = ["grow", "--task", "regression", "--n-train", "256", "--rounds", "2", "--epochs", "100", "--width", "8",
        "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of GROW (its output folder)."""
    n = torch.get_num_threads()
    ref = tmp_path_factory.mktemp("reference") / "out"
    assert main([*GROW, "--out", str(ref)]) == 0
    torch.set_num_threads(n)
    return ref


def _timeless(hist):
    """The rounds of a history.json without wall times (everything else, FLOP counts and per-epoch
    validation losses included, must be bit-identical)."""
    def drop(d):
        if isinstance(d, dict):
            return {k: drop(v) for k, v in d.items() if not k.endswith(("_time", "_times"))}
        return d

    return [drop(r) for r in hist["rounds"]]


def assert_same_outputs(a, b):
    """Two `grow` output folders hold the same run: history, metrics, model and optimiser, bit for bit."""
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (a, b))
    assert _timeless(ha) == _timeless(hb) and ha["meta"]["stop_reason"] == hb["meta"]["stop_reason"]
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    ma.pop("wall_time"), mb.pop("wall_time")
    assert ma.pop("command").replace(str(a), "OUT") == mb.pop("command").replace(str(b), "OUT")
    assert ma == mb
    for f in ("model/model.safetensors", "model/optimizer.safetensors", "checkpoint/optimizer.safetensors"):
        ta, tb = load_file(str(a / f)), load_file(str(b / f))
        assert sorted(ta) == sorted(tb) and ta, f
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (f, k)


def test_interrupt_in_process_then_resume_matches_the_uninterrupted_run(tmp_path, monkeypatch, capsys, reference):
    """KeyboardInterrupt right after round 1 (raised by the round printer, i.e. after the checkpoint)."""
    out = tmp_path / "out"
    printer = cli.RoundPrinter.__call__

    def interrupt_after_round_1(self, grower, rec):
        printer(self, grower, rec)
        if rec.round == 1:
            raise KeyboardInterrupt
    monkeypatch.setattr(cli.RoundPrinter, "__call__", interrupt_after_round_1)
    capsys.readouterr()
    assert main([*GROW, "--out", str(out)]) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "round 1 (depth 3) is complete" in err and f"Resume with: topoderiv grow --resume {out}" in err
    assert len(json.loads((out / "history.json").read_text())["rounds"]) == 2
    assert len(json.loads((out / "model" / "history.json").read_text())["rounds"]) == 2
    assert not (out / "metrics.json").exists()
    monkeypatch.setattr(cli.RoundPrinter, "__call__", printer)
    with pytest.raises(SystemExit) as exc:  # a fresh run would throw the saved rounds away: refused
        main([*GROW, "--out", str(out)])
    assert exc.value.code == 2
    assert "holds an unfinished run" in capsys.readouterr().err and (out / "checkpoint" / "model.json").is_file()
    assert main(["grow", "--resume", str(out), "--epochs", "100", "--no-progress"]) == 0  # agreeing flags are fine
    text = capsys.readouterr().out
    assert f"resuming {out}: 2 rounds done" in text and "stopped growing: max_rounds (2) reached" in text
    assert_same_outputs(reference, out)


def test_resume_refuses_disagreeing_flags_and_foreign_folders(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["grow", *TINY, "--out", str(out)]) == 0
    capsys.readouterr()
    for extra, msg in ((["--epochs", "2"], "--epochs 2 disagrees with the run in"),
                       (["--seed", "3"], "--seed 3 disagrees with the run in"),
                       (["--lr", "0.5"], "--lr 0.5 disagrees with the run in"),
                       (["--out", str(tmp_path / "elsewhere")], "--out must be left out or be the --resume folder")):
        with pytest.raises(SystemExit) as exc:
            main(["grow", "--resume", str(out), *extra])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert msg in err, err
    with pytest.raises(SystemExit) as exc:
        main(["grow", "--resume", str(tmp_path)])
    assert exc.value.code == 2 and "--resume must name an output folder of `topoderiv grow`" in capsys.readouterr().err
    # a finished run resumes to the same outputs (nothing left to train)
    before = json.loads((out / "metrics.json").read_text())
    assert main(["grow", "--resume", str(out), "--epochs", "1", "--threads", "1"]) == 0
    after = json.loads((out / "metrics.json").read_text())
    assert before["mse"] == after["mse"] and before["command"] == after["command"]
    # a finished run's folder: a new run replaces it
    assert main(["grow", *TINY, "--seed", "1", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["seed"] == 1
    assert json.loads((out / "run.json").read_text())["args"]["seed"] == 1


def test_sigint_during_grow_saves_the_round_and_resume_completes_it(tmp_path, reference):
    """A real Ctrl-C: SIGINT to a `topoderiv grow` subprocess once round 0 is in the folder."""
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the child gets the default SIGINT disposition whatever this process inherited (a test run
    # started in the background of a non-interactive shell ignores SIGINT, and children inherit that)
    proc = subprocess.Popen([sys.executable, "-m", "topoderiv.cli", *GROW, "--out", str(out)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not (out / "history.json").exists():  # written after round 0's checkpoint
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "round 0 did not complete"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, (stdout, stderr)
    assert f"Resume with: topoderiv grow --resume {out}" in stderr and "Traceback" not in stderr, stderr
    done = json.loads((out / "checkpoint" / "history.json").read_text())["rounds"]
    assert 1 <= len(done) <= 4  # round 0 at least; the run was stopped before it wrote metrics.json
    assert not (out / "metrics.json").exists()
    assert len(json.loads((out / "history.json").read_text())["rounds"]) == len(done)
    assert (out / "model" / "model.safetensors").is_file()
    assert main(["grow", "--resume", str(out)]) == 0
    assert_same_outputs(reference, out)


# --- --model / --insert on an image task (CNN, ViT, timm) ----------------------------------------

#: digits-images on a tiny budget: 64 training images, one insertion, one epoch per round
IMG = ["--task", "digits-images", "--n-train", "64", "--rounds", "1", "--epochs", "1", "--depth", "2",
       "--no-progress", "--threads", "1"]
VIT_TINY = ["--embed-dim", "8", "--num-heads", "2", "--patch-size", "4"]


@pytest.mark.parametrize("model, insert, extra, cls, kind", [
    ("cnn", None, ["--channels", "4", "6"], "ResidualCNN", "conv"),
    ("vit", "mlp_block", VIT_TINY, "ViT", "mlp_block"),
    ("vit", "transformer_block", VIT_TINY, "ViT", "transformer_block"),
])
def test_grow_model_and_insert_write_every_output(tmp_path, capsys, model, insert, extra, cls, kind):
    out = tmp_path / "g"
    argv = ["grow", *IMG, "--model", model, *extra, "--out", str(out)] + (["--insert", insert] if insert else [])
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"network: {cls} ({kind} sites" in text and "final: test accuracy" in text
    for name in ("history.json", "metrics.json", "growth.png", "mu.png", "model/model.json", "run.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == model and metrics["insert"] == insert and metrics["epochs"] == 2
    hist = json.loads((out / "history.json").read_text())
    assert [r["point"] for r in hist["rounds"]][0] is None and len(hist["rounds"]) >= 2
    from topoderiv.experiments.tasks import get_task
    from topoderiv.growth.checkpoint import load
    from topoderiv.sites import depth, site_specs

    grown = load(out / "model")
    assert type(grown).__name__ == cls and depth(grown) == metrics["depth"]
    assert {s.kind for s in site_specs(grown)} == {kind}
    task = get_task("digits-images", seed=0, n_train=64)
    assert task.evaluate(grown)["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    # the recorded model and insert kind are part of the run: resume refuses others
    with pytest.raises(SystemExit) as exc:
        main(["grow", "--resume", str(out), "--model", "mlp"])
    assert exc.value.code == 2 and "--model mlp disagrees with the run in" in capsys.readouterr().err


def test_compare_vit_with_the_transformer_growers_baselines(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["compare", *IMG, "--model", "vit", *VIT_TINY, "--seeds", "0", "1", "--methods", "topological",
                 "stacking", "zero_block", "identity", "fixed_final", "--out", str(out)]) == 0
    md = (out / "results.md").read_text()
    for m in ("topological", "stacking", "zero_block", "identity", "fixed_final"):
        assert f"| {m} |" in md
    assert "every method: ViT (transformer_block sites: blocks)" in md and "embed_dim 8, patch 4, heads 2" in md
    assert "Command: `topoderiv compare --task digits-images" in md and "--model vit" in md
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["network"] == {"model": "vit", "insert": None, "timm_kwargs": {}, "family": "vit"}
    assert "partial" not in res["meta"] and len(res["runs"]) == 10
    runs = {(r["method"], r["seed"]): r for r in res["runs"]}
    for seed in (0, 1):  # the fixed network has the topological run's final depth
        assert runs["fixed_final", seed]["depths"] == runs["topological", seed]["depths"]
        stack = runs["stacking", seed]["history"]["rounds"]
        assert stack[1]["info"]["copied"].startswith("blocks.")
    for name in ("comparison.png", "curves.png", "compute.png", "growth_topological_s0.png"):
        assert (out / name).is_file(), name


def test_compare_cnn_fixed_final_has_the_topological_stages(tmp_path):
    out = tmp_path / "c"
    assert main(["compare", *IMG, "--model", "cnn", "--channels", "3", "4", "--rounds", "2", "--seeds", "0",
                 "--methods", "topological", "stacking", "fixed_final", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    runs = {r["method"]: r for r in res["runs"]}
    assert len(runs["topological"]["depths"]) == 2 and sum(runs["topological"]["depths"]) == runs["topological"]["depth"]
    assert runs["fixed_final"]["depths"] == runs["topological"]["depths"]


def test_default_methods_per_family():
    from topoderiv.experiments.compare import DEFAULT_METHODS, default_methods

    assert default_methods("mlp") == list(DEFAULT_METHODS)
    cnn = default_methods("cnn", ["conv"])
    assert {"topological", "topological_all", "topological_multi", "random", "identity", "forward_thinking",
            "stacking", "initial", "fixed_final"} == set(cnn)
    assert set(default_methods("vit", ["transformer_block"])) == set(cnn) | {"zero_block"}
    assert "zero_block" not in default_methods("vit", ["tokens"])


@pytest.mark.parametrize("argv, msg", [
    (["compare", "--model", "resnet"], "expected one of ('mlp', 'cnn', 'vit') or 'timm:<model name>'"),
    (["compare", "--model", "timm:"], "got 'timm:'"),
    (["grow", "--insert", "dense"], "invalid choice: 'dense'"),
    (["grow", "--timm-kwargs", "embed_dim"], "expected key=value pairs separated by commas"),
    (["compare", *IMG, "--model", "cnn", "--methods", "zero_block"], "method 'zero_block' needs transformer sites"),
    (["grow", *IMG, "--model", "cnn", "--insert", "mlp_block"], "insert must be one of ('conv',) for model 'cnn'"),
    (["grow", "--task", "heat", "--model", "vit"], "--model vit does not fit --task heat"),
    (["grow", *IMG, "--model", "vit", "--timm-kwargs", "embed_dim=8"], "--timm-kwargs are for timm:<name> models only"),
    (["grow", *IMG, "--model", "timm:vit_tiny_patch16_224", "--timm-kwargs", "depth=3"],
     "must not set 'depth' (the depth is the budget's (--depth)"),
])
def test_model_flag_usage_errors(capsys, tmp_path, argv, msg):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()


def test_timm_model_without_timm_is_a_clear_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(SystemExit) as exc:
        main(["grow", *IMG, "--model", "timm:vit_tiny_patch16_224", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    assert "needs timm, which is not installed (pip install timm)" in capsys.readouterr().err


def test_timm_kwargs_parsing():
    assert cli._timm_kwargs("embed_dim=16,num_heads=2,img_size=(8, 8),act=gelu,qkv_bias=False") == {
        "embed_dim": 16, "num_heads": 2, "img_size": (8, 8), "act": "gelu", "qkv_bias": False}


def test_grow_and_compare_a_timm_vit(tmp_path, capsys):
    """--model timm:NAME: created with pretrained=False, sized to the task, grown, saved and reloaded."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    out = tmp_path / "t"
    tk = ["--model", "timm:vit_tiny_patch16_224", "--timm-kwargs", "embed_dim=8,num_heads=2,patch_size=4"]
    assert main(["grow", *IMG, *tk, "--out", str(out)]) == 0
    assert "network: VisionTransformer (timm:vit_tiny_patch16_224) (transformer_block sites" in capsys.readouterr().out
    from topoderiv.experiments.tasks import get_task
    from topoderiv.growth.checkpoint import load

    metrics = json.loads((out / "metrics.json").read_text())
    grown = load(out / "model")
    assert isinstance(grown, VisionTransformer) and len(grown.blocks) == metrics["depth"] == 3
    assert grown.patch_embed.proj.in_channels == 1 and grown.head.out_features == 10 and grown.embed_dim == 8
    task = get_task("digits-images", seed=0, n_train=64)
    assert task.evaluate(grown)["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-9)
    cmp = tmp_path / "c"
    assert main(["compare", *IMG, *tk, "--seeds", "0", "--methods", "topological", "zero_block", "stacking",
                 "fixed_final", "--out", str(cmp)]) == 0
    md = (cmp / "results.md").read_text()
    assert "VisionTransformer (timm:vit_tiny_patch16_224)" in md and "| zero_block |" in md


def test_readme_grow_and_compare_commands_parse():
    """Every `topoderiv grow` / `topoderiv compare` command the README shows (code blocks and inline
    code, continuation lines joined) parses with the current flags."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    found = []
    for m in re.finditer(r"(?:^|`)\s*(topoderiv (?:grow|compare)\b[^`\n#]*)", text, flags=re.M):
        found.append(m.group(1).strip())
    assert len(found) >= 6, found
    parser = build_parser()
    for cmd in found:
        argv = shlex.split(cmd)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:  # pragma: no cover - the message names the command
            pytest.fail(f"README command does not parse: {cmd}")
