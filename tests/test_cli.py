"""CLI smoke tests: `grow` and `compare` on a tiny budget, in-process, into tmp_path."""
from __future__ import annotations

import json

import pytest
import torch

from topoderiv.cli import build_parser, main

TINY = ["--task", "regression", "--n-train", "64", "--rounds", "1", "--epochs", "1", "--width", "8",
        "--no-progress", "--threads", "1"]


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
    (["grow", "--lr", "-1"], "expected a number > 0"),
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
    assert args.seeds == [0, 1, 2] and "topological" in args.methods
