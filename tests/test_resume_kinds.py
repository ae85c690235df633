"""Exact resume for every model kind: ResidualCNN (conv sites in two stages) and ViT (token and
transformer-block sites). A run is interrupted after round 1 (its checkpoint copied by a callback,
the checkpoint being written before callbacks), resumed in a fresh Grower with every RNG disturbed,
and must end bit-identical to the uninterrupted run: parameters, optimiser state, history.
"""
from __future__ import annotations

import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from topoderiv.experiments.tasks import Batches
from topoderiv.growth import Grower, IdentityInsertion, RandomInsertion, TopologicalStrategy
from topoderiv.models import ResidualCNN, ViT

from _helpers import assert_same_run


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _images(seed=0, n=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > x[:, 0, 4:].mean((1, 2))).long()  # a label that needs spatial comparison
    return (x[:32], y[:32]), (x[32:], y[32:])


def _model(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        return ResidualCNN(1, 2, channels=(3, 4), depths=(1, 1))
    return ViT(img_size=8, patch_size=4, in_chans=1, num_classes=2, embed_dim=8, depth=1, num_heads=2,
               insert=kind)


def _strategy(name):
    if name == "topological":
        return TopologicalStrategy(rule="all", eps_grid=[0.05, 0.5])
    return RandomInsertion() if name == "random" else IdentityInsertion()


def _grower(kind, strategy, ck, callbacks=()):
    train, val = _images()
    return Grower(_model(kind), lambda p: torch.optim.Adam(p, lr=1e-2), Batches(*train, 16, shuffle=True, seed=3),
                  [val], F.cross_entropy, strategy=_strategy(strategy), epochs_per_round=1, max_rounds=2,
                  patience=10, progress=False, seed=0, checkpoint_dir=ck, callbacks=callbacks)


@pytest.mark.parametrize("kind, strategy", [("cnn", "topological"), ("cnn", "identity"), ("tokens", "topological"),
                                            ("transformer_block", "random")])
def test_resume_after_round_one_is_bit_identical(tmp_path, kind, strategy):
    def snap(grower, rec):
        if rec.round == 1:
            shutil.copytree(grower.checkpoint_dir, tmp_path / "round1")

    g = _grower(kind, strategy, tmp_path / "ck", callbacks=[snap])
    hist = g.run()
    assert len(hist.insertions) == 2, hist.stop_reason
    train, val = _images()
    torch.manual_seed(12345)  # disturb every RNG the run uses: the checkpoint must restore them
    random.seed(12345)
    g2 = Grower.from_checkpoint(tmp_path / "round1", Batches(*train, 16, shuffle=True, seed=3), [val], F.cross_entropy,
                                optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), checkpoint_dir=tmp_path / "resumed")
    assert type(g2.model) is type(g.model) and len(g2.history.rounds) == 2
    g2.run()
    assert_same_run(g, g2)
