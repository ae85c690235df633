"""Plots produce non-empty PNG files from histories and comparisons."""
from __future__ import annotations

import pytest

from topoderiv.experiments.compare import compare
from topoderiv.growth import GrowthHistory, RoundRecord
from topoderiv.experiments.plots import as_history, plot_comparison, plot_compute, plot_curves, plot_growth, plot_mu
from topoderiv.experiments.tasks import get_task

PNG = b"\x89PNG\r\n\x1a\n"


def _history() -> GrowthHistory:
    rounds = [RoundRecord(0, 3, 0.5, 0.6, 100, 2, 0.1, [0.9, 0.7, 0.5], 0.4)]
    for r in range(1, 4):
        mu = {p: 0.01 * (p + 1) * r - (0.005 if p == 0 else 0.0) for p in range(r + 2)}
        rounds.append(RoundRecord(r, 3, 0.5 / (r + 1), 0.6 / (r + 1), 100 + 10 * r, 2 + r, 0.1,
                                  [0.5 / r, 0.45 / r, 0.5 / (r + 1)], 0.4 - 0.05 * r, point=r, eps=0.1 * r, mu=mu))
    rounds.append(RoundRecord(4, 2, 0.1, 0.12, 130, 5, 0.1, [0.11, 0.1], 0.2, info={"phase": "finish"}))
    return GrowthHistory(rounds, {"strategy": {"name": "topological"}, "stop_reason": "max_rounds (3) reached",
                                  "last_scores": {"mu": {"0": -0.01, "1": 0.02}}})


def _is_png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def test_growth_and_mu_plots(tmp_path):
    h = _history()
    assert _is_png(plot_growth(h, tmp_path / "a" / "growth.png", metric_name="test rel_l2"))
    assert _is_png(plot_mu(h, tmp_path / "mu.png"))
    # from a dict and from a JSON path too
    assert _is_png(plot_growth(h.to_dict(), tmp_path / "g2.png"))
    p = h.to_json(tmp_path / "h.json")
    assert as_history(p).rounds[2].mu == h.rounds[2].mu
    assert _is_png(plot_mu(str(p), tmp_path / "mu2.png"))


def test_growth_plot_with_per_epoch_validation(tmp_path):
    h = _history()
    for r in h.rounds:
        r.val_curve = [r.val_loss * (1.0 + 0.1 * (r.epochs - 1 - i)) for i in range(r.epochs)]
    assert _is_png(plot_growth(h, tmp_path / "g.png"))


def test_mu_plot_without_scores_and_growth_without_test(tmp_path):
    h = GrowthHistory([RoundRecord(0, 2, 0.5, 0.6, 100, 2, 0.1, [0.9, 0.5])], {})
    assert _is_png(plot_mu(h, tmp_path / "mu.png"))
    assert _is_png(plot_growth(h, tmp_path / "g.png"))


def test_plot_errors(tmp_path):
    with pytest.raises(ValueError, match="no rounds"):
        plot_growth(GrowthHistory(), tmp_path / "x.png")
    with pytest.raises(TypeError, match="expected a GrowthHistory"):
        plot_growth(42, tmp_path / "x.png")


def test_comparison_plots(tmp_path):
    task = get_task("regression", seed=0, n_train=64, n_val=16, n_test=32)
    comp = compare(task, ["topological", "random", "initial"], seeds=[0, 1],
                   budget={"width": 8, "epochs_per_round": 1, "rounds": 1}, progress=False)
    assert _is_png(plot_comparison(comp, tmp_path / "cmp.png"))
    assert _is_png(plot_curves(comp, tmp_path / "curves.png"))
    # no fixed_final: no default target line, a given one is drawn
    assert _is_png(plot_compute(comp, tmp_path / "compute.png"))
    assert _is_png(plot_compute(comp, tmp_path / "compute2.png", target=0.5))
    with pytest.raises(ValueError, match="plot_compute: the comparison has no methods"):
        comp.methods = []
        plot_compute(comp, tmp_path / "x.png")
