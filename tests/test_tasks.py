"""Built-in tasks: determinism per seed, shapes, and the heat solver against exact solutions."""
from __future__ import annotations

import math

import pytest
import torch

from topoderiv.experiments.tasks import Batches, ModelConfig, available_tasks, get_task, heat_solve, sample_log_kappa

SMALL = {
    "heat": dict(n_train=64, n_val=16, n_test=32),
    "digits": dict(n_train=200, n_val=50),
    "regression": dict(n_train=64, n_val=16, n_test=32),
}


def _mms_error(cells: int, steps: int, t_final: float = 0.5) -> float:
    """Max nodal error for the manufactured solution u = exp(-t) sin(pi x), kappa = 1 + x/2."""
    h = 1.0 / cells
    mid = (torch.arange(cells, dtype=torch.float64) + 0.5) * h
    kappa = 1 + 0.5 * mid

    def source(x, t):
        u = math.exp(-t) * torch.sin(math.pi * x)
        ux = math.exp(-t) * math.pi * torch.cos(math.pi * x)
        return -u - (0.5 * ux - (1 + 0.5 * x) * math.pi**2 * u)  # u_t - (kappa u_x)_x

    u = heat_solve(kappa, t_final=t_final, steps=steps, u0=lambda x: torch.sin(math.pi * x), source=source,
                   save_steps=[steps])
    x = torch.arange(1, cells, dtype=torch.float64) * h
    return float((u[-1] - math.exp(-t_final) * torch.sin(math.pi * x)).abs().max())


def test_heat_solver_second_order_in_space():
    errs = [_mms_error(n, n * n) for n in (8, 16, 32)]  # dt = h^2: both errors O(h^2)
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(o - 2) < 0.15 for o in orders), (errs, orders)
    assert errs[-1] < 1e-3


def test_heat_solver_first_order_in_time():
    errs = [_mms_error(200, s) for s in (10, 20, 40)]  # fine grid: the implicit-Euler error dominates
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(o - 1) < 0.1 for o in orders), (errs, orders)


def test_heat_solver_constant_kappa_eigenmode_and_batch():
    # u = exp(-kappa pi^2 t) sin(pi x) (no source), two conductivities in one batch
    cells, steps, t = 32, 400, 0.05
    kappa = torch.tensor([[1.0] * cells, [0.5] * cells], dtype=torch.float64)
    u = heat_solve(kappa, t_final=t, steps=steps, u0=lambda x: torch.sin(math.pi * x))
    assert u.shape == (2, steps + 1, cells - 1)
    x = torch.arange(1, cells, dtype=torch.float64) / cells
    for b, k in enumerate((1.0, 0.5)):
        exact = math.exp(-k * math.pi**2 * t) * torch.sin(math.pi * x)
        assert float((u[b, -1] - exact).abs().max()) < 2e-3
    # batch entries equal the single solves
    single = heat_solve(kappa[1], t_final=t, steps=steps, u0=lambda x: torch.sin(math.pi * x), save_steps=[steps])
    assert torch.equal(single[0], u[1, -1])


def test_heat_solver_errors():
    with pytest.raises(ValueError, match="positive"):
        heat_solve(torch.tensor([1.0, -1.0, 1.0]), t_final=1.0, steps=2)
    with pytest.raises(ValueError, match="steps"):
        heat_solve(torch.ones(4), t_final=1.0, steps=0)
    with pytest.raises(ValueError, match="u0 must have shape"):
        heat_solve(torch.ones(4), t_final=1.0, steps=2, u0=torch.zeros(5))
    with pytest.raises(TypeError, match="kappa must be a torch.Tensor"):
        heat_solve([1.0, 1.0], t_final=1.0, steps=2)


def test_random_field_variance():
    pts = torch.linspace(0, 1, 101, dtype=torch.float64)
    m, xi = sample_log_kappa(4000, pts, modes=8, sigma=0.5, generator=torch.Generator().manual_seed(0))
    assert m.shape == (4000, 101) and xi.shape == (4000, 8)
    assert abs(float(m.var(0).mean()) - 0.25) < 0.02
    assert abs(float(m.mean())) < 0.02


@pytest.mark.parametrize("name", ["heat", "digits", "regression"])
def test_task_shapes_and_determinism(name):
    a = get_task(name, seed=3, **SMALL[name])
    b = get_task(name, seed=3, **SMALL[name])
    c = get_task(name, seed=4, **SMALL[name])
    for split in ("train", "val", "test"):
        (xa, ya), (xb, yb) = a.split(split), b.split(split)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape[1] == a.d_in and xa.dtype == torch.float32
        assert xa.shape[0] == ya.shape[0] > 0
        assert torch.isfinite(xa).all()
    assert not torch.equal(a.train[0], c.train[0])
    n = SMALL[name]
    assert a.train[0].shape[0] == n["n_train"] and a.val[0].shape[0] == n["n_val"]
    if name == "digits":
        assert a.train[1].dtype == torch.long and a.d_out == 10
        assert a.test[0].shape[0] == 1797 - 250
    else:
        assert a.train[1].shape == (n["n_train"], a.d_out)
    assert isinstance(a.config, ModelConfig) and a.config.depth == 2
    assert a.config.total_epochs == a.config.epochs_per_round * (a.config.rounds + 1)


def test_heat_task_content():
    t = get_task("heat", seed=0, n_train=32, n_val=8, n_test=8, cells=16, sensors=5, times=(0.05, 0.1))
    assert t.d_in == 10 and t.d_out == 16
    assert len(t.info["sensor_x"]) == 5 and t.info["times"] == [0.05, 0.1]
    # inputs standardised with training statistics
    assert torch.allclose(t.train[0].mean(0), torch.zeros(10), atol=1e-4)
    # metric: 0 for a perfect prediction, 1 for predicting zero
    y = t.test[1]
    assert t.metric(y, y) == 0.0
    assert abs(t.metric(torch.zeros_like(y), y) - 1.0) < 1e-6
    assert not t.metric.higher_is_better


def test_unknown_task_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown task 'nope'; available: digits, digits-images, heat"):
        get_task("nope")
    with pytest.raises(ValueError, match="sensors"):
        get_task("heat", sensors=0, n_train=8, n_val=2, n_test=2)
    # both digits tasks share one check (an empty split would give NaN statistics)
    for name, fn in (("digits", "digits_task"), ("digits-images", "digits_images_task")):
        with pytest.raises(ValueError, match=f"{fn}: n_train, n_val must be >= 1 with n_train \\+ n_val < 1797, got 100 and 0"):
            get_task(name, n_train=100, n_val=0)
        with pytest.raises(ValueError, match=f"{fn}: .* got 1700 and 97"):
            get_task(name, n_train=1700, n_val=97)
    assert {"digits", "heat", "regression", "digits-images"} <= set(available_tasks())


def test_batches_reiterable_and_deterministic():
    x = torch.arange(10.0)[:, None]
    y = torch.arange(10)
    b1 = Batches(x, y, 4, shuffle=True, seed=1)
    b2 = Batches(x, y, 4, shuffle=True, seed=1)
    assert len(b1) == 3
    e1, e2 = list(b1), list(b1)
    assert [len(bx) for bx, _ in e1] == [4, 4, 2]
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(e1, e2))  # reshuffled per pass
    assert all(torch.equal(p[0], q[0]) for p, q in zip(e1, list(b2)))  # same seed, same order
    assert sorted(torch.cat([bx for bx, _ in e1]).flatten().tolist()) == list(range(10))
    assert all(torch.equal(bx[:, 0].long(), by) for bx, by in e1)


def test_task_evaluate_and_loader():
    t = get_task("regression", seed=0, **SMALL["regression"])
    model = t.build_model(seed=0)
    assert len(model.blocks) == 2
    res = t.evaluate(model, "val")
    assert set(res) == {"loss", "mse"} and res["loss"] == pytest.approx(res["mse"], rel=1e-5)
    assert len(t.loader("train")) == math.ceil(64 / t.config.batch_size)
    assert len(t.loader("val")) == 1
