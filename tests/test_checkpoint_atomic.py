"""Atomic saves: a checkpoint folder is replaced, never modified in place; an interrupted save leaves
the previous checkpoint loadable and unchanged; load works at every instant of a save."""
import os
import threading

import pytest
import torch

from topoderiv.growth import GrowthHistory, RoundRecord
from topoderiv.growth.checkpoint import load, load_checkpoint, save
from topoderiv.models import ResidualMLP


def _model(value: float) -> ResidualMLP:
    m = ResidualMLP(2, 3, 1, 1)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def _save_full(model, path, value):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    hist = GrowthHistory([RoundRecord(0, 1, value, value, 1, 1, 0.0)])
    return save(model, path, optimizer=opt, history=hist, tensors={"value": torch.tensor(value)})


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def _value(path):
    ck = load_checkpoint(path)
    v = float(ck.tensors["value"])
    assert all(bool((p == p.flatten()[0]).all()) for p in ck.model.parameters())
    return v, ck


@pytest.mark.parametrize("fail_at", range(1, 7))  # the 5 files, then the temporary folder
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, fail_at):
    path = _save_full(_model(1.0), tmp_path / "ck", 1.0)
    before = _snapshot(path)
    calls = {"n": 0}
    real_fsync = os.fsync

    def failing_fsync(fd):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(28, "No space left on device (simulated)")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        _save_full(_model(2.0), path, 2.0)
    monkeypatch.undo()
    assert calls["n"] == fail_at
    assert _snapshot(path) == before
    assert _siblings(path) == []  # the temporary folder is gone
    assert _value(path)[0] == 1.0
    assert _value(_save_full(_model(3.0), path, 3.0))[0] == 3.0  # and the next save works


@pytest.mark.parametrize("fail_call", [1, 2])  # target -> .old, then tmp -> target
def test_failed_rename_rolls_back(tmp_path, monkeypatch, fail_call):
    path = _save_full(_model(1.0), tmp_path / "ck", 1.0)
    before = _snapshot(path)
    calls = {"n": 0}
    real_rename = os.rename

    def failing_rename(a, b):
        calls["n"] += 1
        if calls["n"] == fail_call:
            raise OSError(5, "I/O error (simulated)")
        return real_rename(a, b)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        _save_full(_model(2.0), path, 2.0)
    monkeypatch.undo()
    assert _snapshot(path) == before and _siblings(path) == []
    assert _value(path)[0] == 1.0


def test_writer_raising_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import topoderiv.growth.checkpoint as ck_mod

    path = _save_full(_model(1.0), tmp_path / "ck", 1.0)
    before = _snapshot(path)
    real = ck_mod.serialize_tensors
    calls = {"n": 0}

    def failing(tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the optimizer file, after the weights were serialised
            raise RuntimeError("writer crashed (simulated)")
        return real(tensors, metadata=metadata)

    monkeypatch.setattr(ck_mod, "serialize_tensors", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        _save_full(_model(2.0), path, 2.0)
    assert _snapshot(path) == before and _siblings(path) == []


def test_hard_crash_between_renames_loads_previous(tmp_path):
    """A crash after 'ck -> .ck.old' but before '.ck.tmp-* -> ck' leaves no 'ck': load uses the old one."""
    path = _save_full(_model(1.0), tmp_path / "ck", 1.0)
    new = _save_full(_model(2.0), tmp_path / "staging", 2.0)
    os.rename(path, tmp_path / ".ck.old")
    os.rename(new, tmp_path / ".ck.tmp-deadbeef0000")  # a complete but never renamed temporary folder
    (tmp_path / ".ck.tmp-0123456789ab").mkdir()  # and a half-written one
    assert not path.exists()
    assert _value(path)[0] == 1.0
    assert load(path) is not None
    _save_full(_model(3.0), path, 3.0)  # the next save completes and cleans up
    assert _value(path)[0] == 3.0 and _siblings(path) == []


def test_hard_crash_after_swap_loads_new_and_cleans_up(tmp_path):
    path = _save_full(_model(1.0), tmp_path / "ck", 1.0)
    old = _save_full(_model(0.5), tmp_path / "staging", 0.5)
    os.rename(old, tmp_path / ".ck.old")  # the previous checkpoint, not yet removed
    assert _value(path)[0] == 1.0
    _save_full(_model(2.0), path, 2.0)
    assert _value(path)[0] == 2.0 and _siblings(path) == []


def test_checkpoint_folder_never_overwritten_in_place(tmp_path):
    path = _save_full(_model(1.0), tmp_path / "ck", 1.0)
    keep = tmp_path / "keep"
    keep.mkdir()
    for f in path.iterdir():  # hard links see any in-place write
        os.link(f, keep / f.name)
    before = _snapshot(keep)
    _save_full(_model(2.0), path, 2.0)
    assert _snapshot(keep) == before
    assert _value(path)[0] == 2.0


def test_save_refuses_to_replace_other_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"save: path must be a checkpoint folder.*holds other files: \['notes.txt'\]"):
        save(_model(1.0), run)
    assert (run / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="got the file"):
        save(_model(1.0), tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load(save(_model(1.0), empty)) is not None


def test_load_works_while_saves_replace_the_folder(tmp_path):
    path = _save_full(_model(0.0), tmp_path / "ck", 0.0)
    done = threading.Event()
    errors = []

    def writer():
        try:
            for i in range(1, 31):
                _save_full(_model(float(i)), path, float(i))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
        finally:
            done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen = []
    while not done.is_set():
        v, ck = _value(path)  # every load is one consistent checkpoint
        assert ck.history.rounds[0].train_loss == v
        seen.append(v)
    t.join()
    assert not errors, errors
    assert _value(path)[0] == 30.0 and _siblings(path) == []
    assert seen == sorted(seen)
