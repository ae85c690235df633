"""Exact resume: a run resumed from any round's checkpoint ends bit-identical to the uninterrupted run.

The uninterrupted run copies its checkpoint folder in a callback after every round (the checkpoint is
written BEFORE the callbacks, so the copy holds that round): each copy is what an interruption right
after that round leaves behind. The copies are resumed in a fresh :class:`Grower` (from_checkpoint,
a fresh loader, the global RNGs disturbed first) and must end with the same parameters, optimiser
state and history (losses, curves, insertion points, eps, mu) as the uninterrupted run: every
round's copy with the task loader (Batches), round 1's with torch DataLoaders (shuffled by their
own ``generator=`` or by the global RNG).
"""
from __future__ import annotations

import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from topoderiv.experiments.tasks import Batches
from topoderiv.growth import Grower, InsertionStrategy, Proposal, RandomInsertion, TopologicalStrategy
from topoderiv.growth.checkpoint import load_checkpoint
from topoderiv.models import ResidualMLP

from _helpers import assert_same_run


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _split(seed=0, n=192):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * torch.cos(2 * x[:, 1:]) + 0.5 * x[:, :1] ** 2
    return (x[:128], y[:128]), (x[128:], y[128:])


def _loader(kind, train):
    """A fresh training loader of the given kind (its data order starts from its seed)."""
    if kind == "batches":
        return Batches(*train, 32, shuffle=True, seed=3)
    ds = torch.utils.data.TensorDataset(*train)
    if kind == "dataloader_generator":
        return torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert kind == "dataloader_global"  # the sampler draws its seed from the global torch RNG
    return torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)


def _adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def _strategy(name):
    return TopologicalStrategy(eps_grid=[0.05, 0.2, 0.5]) if name == "topological" else RandomInsertion()


def _grower(kind, strategy, ck, callbacks=(), max_rounds=3):
    train, val = _split()
    torch.manual_seed(0)
    model = ResidualMLP(2, 8, 1, 1)
    return Grower(model, _adam, _loader(kind, train), [val], F.mse_loss, strategy=_strategy(strategy),
                  epochs_per_round=2, max_rounds=max_rounds, patience=10, progress=False, seed=0, checkpoint_dir=ck,
                  callbacks=callbacks, test_data=[val], test_metric=F.l1_loss, val_every_epoch=True)


def _resume(kind, path, ck, **kwargs):
    train, val = _split()
    torch.manual_seed(12345)  # disturb every RNG the run uses: the checkpoint must restore them
    random.seed(12345)
    return Grower.from_checkpoint(path, _loader(kind, train), [val], F.mse_loss, optimizer=_adam, checkpoint_dir=ck,
                                  test_data=[val], test_metric=F.l1_loss, **kwargs)


def _snapshots(tmp_path):
    """A callback copying the checkpoint folder after every round (what an interruption leaves)."""
    def snap(grower, rec):
        shutil.copytree(grower.checkpoint_dir, tmp_path / f"round{rec.round}")
    return snap


@pytest.mark.parametrize("kind, strategy, rounds", [
    ("batches", "topological", "all"), ("batches", "random", "all"),
    ("dataloader_generator", "random", [1]), ("dataloader_global", "random", [1])])
def test_resume_from_any_round_is_bit_identical(tmp_path, kind, strategy, rounds):
    g = _grower(kind, strategy, tmp_path / "ck", callbacks=[_snapshots(tmp_path)])
    hist = g.run()
    assert len(hist.insertions) == 3 and len(hist.rounds) == 4
    for k in range(len(hist.rounds)) if rounds == "all" else rounds:
        ck = load_checkpoint(tmp_path / f"round{k}")
        assert len(ck.history.rounds) == k + 1  # written before the callbacks: round k is in it
        g2 = _resume(kind, tmp_path / f"round{k}", tmp_path / f"resumed{k}")
        assert len(g2.model.blocks) == 1 + k
        g2.run()
        assert_same_run(g, g2)


class GlobalRNGStrategy(InsertionStrategy):
    """Draws the point from Python's ``random``, the scale from numpy's global RNG and the direction
    from torch's global RNG: a resume must restore all three."""

    name = "global_rng_test"

    def propose(self, grower):
        import numpy as np

        point = random.randrange(grower.depth + 1)
        w = torch.randn(grower.model.width, grower.model.width)
        return Proposal(point, weight=w, eps=0.05 + 0.1 * float(np.random.rand()) + 0.01 * random.random())


def test_python_random_numpy_and_torch_global_states_are_restored(tmp_path):
    import numpy as np

    np.random.seed(0)
    random.seed(0)
    g = _grower("batches", "random", tmp_path / "ck", callbacks=[_snapshots(tmp_path)])
    g.strategy = GlobalRNGStrategy()
    g.run()
    np.random.seed(1)  # disturbed (torch and random are disturbed by _resume)
    g2 = _resume("batches", tmp_path / "round1", tmp_path / "resumed", strategy=GlobalRNGStrategy())
    g2.run()
    assert_same_run(g, g2)


def test_the_comparison_can_fail_without_the_restored_data_order(tmp_path):
    """The same resume with the loader's saved order thrown away differs: the bit-for-bit
    comparison above is sensitive to what the checkpoint restores."""
    g = _grower("batches", "random", tmp_path / "ck", callbacks=[_snapshots(tmp_path)])
    g.run()
    g2 = _resume("batches", tmp_path / "round1", tmp_path / "resumed")
    g2.train_data.load_state_dict(Batches(*_split()[0], 32, shuffle=True, seed=3).state_dict())  # back to pass 0
    g2.run()
    with pytest.raises(AssertionError):
        assert_same_run(g, g2)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_raising_callback_does_not_lose_the_round(tmp_path, error):
    ref = _grower("batches", "topological", tmp_path / "ref")
    ref.run()

    def boom(grower, rec):
        if rec.round == 2:
            raise error("callback failed")

    g = _grower("batches", "topological", tmp_path / "ck", callbacks=[boom])
    with pytest.raises(error, match="callback failed"):
        g.run()
    ck = load_checkpoint(tmp_path / "ck")
    assert len(ck.history.rounds) == 3 and len(ck.model.blocks) == 3  # round 2 (its insertion) is saved
    g2 = _resume("batches", tmp_path / "ck", tmp_path / "ck")
    g2.run()
    assert_same_run(ref, g2)


def test_resume_state_is_checked_against_the_history(tmp_path):
    g = _grower("batches", "random", tmp_path / "ck", max_rounds=1)
    g.run()
    state = g.resume_state()
    assert state["rounds_done"] == 2 and state["epochs_done"] == 4
    g2 = _resume("batches", tmp_path / "ck", tmp_path / "ck2")
    state["rounds_done"] = 1
    with pytest.raises(ValueError, match=r"rounds_done.*1.*history has 2 rounds"):
        g2.load_resume_state(state)
    with pytest.raises(TypeError, match="state must be a dict"):
        g2.load_resume_state([1, 2])


def test_batches_state_dict_round_trip_and_errors():
    train, _ = _split()
    a = Batches(*train, 32, shuffle=True, seed=1)
    list(a)
    st = a.state_dict()
    assert st["epoch"] == 1
    b = Batches(*train, 32, shuffle=True, seed=99)
    b.load_state_dict(st)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.state_dict()["epoch"] == 2
    c = Batches(*train, 16, shuffle=True)
    with pytest.raises(ValueError, match=r"Batches.load_state_dict: .*batch_size 32.*this loader's 16"):
        c.load_state_dict(st)
    with pytest.raises(TypeError, match="Batches.load_state_dict: state must be a dict"):
        c.load_state_dict("nope")


def test_a_checkpoint_without_resume_state_resumes_reseeded_with_a_warning(tmp_path):
    from topoderiv.growth import save

    g = _grower("batches", "random", None, max_rounds=0)
    g.run()
    save(g.model, tmp_path / "old", history=g.history, optimizer=g.optimizer)  # no resume state (older writers)
    with pytest.warns(UserWarning, match="holds no RNG / data-order state"):
        g2 = _resume("batches", tmp_path / "old", tmp_path / "ck")
    torch.manual_seed(5)
    g2.run()  # nothing left to do (max_rounds 0), but run() reseeds with seed + rounds done = 0 + 1
    assert len(g2.history.rounds) == 1
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(1).get_state())
