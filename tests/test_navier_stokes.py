"""The pseudo-spectral Navier-Stokes solver against exact solutions (float64): spectral accuracy in
space, second order in time, enstrophy decay without forcing, conservation in the inviscid limit,
the random field's variance, determinism and errors."""
from __future__ import annotations

import math

import pytest
import torch

from topoderiv.experiments.navier_stokes import (dealias_mask, energy, enstrophy, li_forcing, ns_solve,
                                                 sample_vorticity, velocity, wavenumbers)

F64 = torch.float64


def _grid(n):
    x = torch.arange(n, dtype=F64) / n
    return x[:, None].expand(n, n), x[None, :].expand(n, n)


def _band_limited(w: torch.Tensor) -> torch.Tensor:
    """``w`` projected on the 2/3-rule modes (then the truncated system is an exact Galerkin one)."""
    n = w.shape[-1]
    return torch.fft.irfft2(torch.fft.rfft2(w) * dealias_mask(n), s=(n, n))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_velocity_of_a_shear_and_divergence_free():
    x, y = _grid(16)
    w = 3.0 * torch.sin(2 * math.pi * x)  # psi = 3 sin(2 pi x) / (4 pi^2): u = psi_y = 0, v = -psi_x
    u, v = velocity(w)
    assert float(u.abs().max()) < 1e-14
    assert torch.allclose(v, -3.0 * torch.cos(2 * math.pi * x) / (2 * math.pi), atol=1e-14)
    w = sample_vorticity(3, 16, generator=torch.Generator().manual_seed(0))
    u, v = velocity(w)
    kx, ky = wavenumbers(16)
    div = torch.fft.rfft2(u) * kx + torch.fft.rfft2(v) * ky
    assert float(div.abs().max()) < 1e-12 * float(torch.fft.rfft2(u).abs().max())
    # curl of the velocity is the vorticity (mean-free, band below Nyquist)
    wb = _band_limited(w)
    u, v = velocity(wb)
    curl = torch.fft.irfft2(2j * math.pi * (kx * torch.fft.rfft2(v) - ky * torch.fft.rfft2(u)), s=(16, 16))
    assert torch.allclose(curl, wb, atol=1e-12)


def test_taylor_green_exact_to_machine_precision_and_second_order_in_time():
    """w = A cos(2 pi m x) cos(2 pi m y) decays as exp(-2 nu (2 pi m)^2 t) (u . grad w = 0 exactly).

    Space is exact for one mode: the solver must equal the Crank-Nicolson amplification of that mode
    to round-off, and the error against exp(...) is the scheme's O(dt^2)."""
    n, m, amp, nu, t = 16, 2, 1.7, 3e-3, 1.0  # lam t ~ 1
    x, y = _grid(n)
    w0 = amp * torch.cos(2 * math.pi * m * x) * torch.cos(2 * math.pi * m * y)
    lam = nu * 2 * (2 * math.pi * m) ** 2
    errs = []
    for steps in (10, 20, 40, 80):
        dt = t / steps
        w = ns_solve(w0, t_final=t, steps=steps, nu=nu, forcing=None)[-1]
        r = (1 - 0.5 * dt * lam) / (1 + 0.5 * dt * lam)
        assert float((w - r**steps * w0).abs().max()) < 1e-13
        errs.append(float((w - math.exp(-lam * t) * w0).abs().max()))
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert all(abs(o - 2) < 0.05 for o in orders), (errs, orders)


def test_forced_shear_exact_solution_second_order():
    """With the benchmark's forcing, w = w_s + (w0 - w_s) exp(-8 pi^2 nu t) for w0 in the forcing's mode,
    w_s = f / (8 pi^2 nu) (a function of x + y: u . grad w = 0)."""
    n, nu, t = 16, 1e-2, 2.0
    x, y = _grid(n)
    f = li_forcing(n)
    assert torch.allclose(f, 0.1 * (torch.sin(2 * math.pi * (x + y)) + torch.cos(2 * math.pi * (x + y))), atol=1e-15)
    lam = 8 * math.pi**2 * nu
    ws = f / lam
    w0 = 0.3 * torch.sin(2 * math.pi * (x + y))
    exact = ws + (w0 - ws) * math.exp(-lam * t)
    errs = [float((ns_solve(w0, t_final=t, steps=s, nu=nu)[-1] - exact).abs().max()) for s in (8, 16, 32, 64)]
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(3)]
    assert all(abs(o - 2) < 0.05 for o in orders), (errs, orders)
    assert errs[-1] < 1e-4


def test_spectral_convergence_in_space():
    """A smooth (analytic) nonlinear flow: at a fixed dt the grid error falls geometrically with n
    (far faster than any fixed order: from 8 to 16 to 32 points by factors > 100), down to round-off."""
    nu, t, steps = 1e-2, 0.5, 50

    def w0(n):
        x, y = _grid(n)
        return (torch.exp(torch.sin(2 * math.pi * x)) * torch.cos(2 * math.pi * y)
                + 0.5 * torch.sin(2 * math.pi * (x + 2 * y)) * torch.cos(4 * math.pi * x)) * 2.0

    ref_n = 96
    ref = ns_solve(w0(ref_n), t_final=t, steps=steps, nu=nu)[-1]
    errs = {}
    for n in (12, 24, 48):
        sub = ref[:: ref_n // n, :: ref_n // n]  # the coarse grid's points are points of the fine one
        errs[n] = float((ns_solve(w0(n), t_final=t, steps=steps, nu=nu)[-1] - sub).abs().max())
    assert errs[12] / errs[24] > 100 and errs[24] / errs[48] > 100, errs
    assert errs[48] < 1e-9, errs
    # the flow is genuinely nonlinear: without viscosity and forcing it still moves (u . grad w != 0)
    moved = ns_solve(w0(ref_n), t_final=t, steps=steps, nu=0.0, forcing=None)[-1]
    assert _rel(moved, w0(ref_n)) > 1e-2


def test_second_order_in_time_nonlinear():
    """A benchmark-like flow five times stronger (max |u| ~ 0.27; it changes by ~50% in t = 1)."""
    n, nu, t = 32, 1e-3, 1.0
    w0 = _band_limited(sample_vorticity(2, n, generator=torch.Generator().manual_seed(1)) * 5)
    ref = ns_solve(w0, t_final=t, steps=640, nu=nu)[:, -1]
    assert _rel(ref, w0) > 0.3
    errs = [_rel(ns_solve(w0, t_final=t, steps=s, nu=nu)[:, -1], ref) for s in (20, 40, 80)]
    orders = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(1.9 < o < 2.2 for o in orders), (errs, orders)
    assert errs[0] < 5e-3


def test_enstrophy_decays_without_forcing():
    """nu > 0, f = 0: enstrophy Z = <w^2>/2 is non-increasing, at the rate dZ/dt = -nu <|grad w|^2>."""
    n, nu = 32, 1e-3
    steps, t = 200, 4.0
    grf = sample_vorticity(3, n, generator=torch.Generator().manual_seed(2)) * 5  # a stronger flow
    # band-limited (the Galerkin truncation, where decay is a theorem) and the raw random field
    for w0 in (_band_limited(grf), grf):
        ws = ns_solve(w0, t_final=t, steps=steps, nu=nu, forcing=None, save_steps=list(range(steps + 1)))
        z = torch.stack([enstrophy(ws[:, i]) for i in range(steps + 1)], dim=1)  # [B, steps + 1]
        assert bool((z[:, 1:] <= z[:, :-1]).all())
        assert bool((z[:, -1] < z[:, 0] * 0.9).all())
    # the rate: for a band-limited field the nonlinear term conserves Z exactly, so
    # Z(t + dt) - Z(t - dt) = -2 dt nu <|grad w|^2> + O(dt^3)
    wb = _band_limited(grf)
    ws = ns_solve(wb, t_final=0.02, steps=2, nu=nu, forcing=None, save_steps=[0, 1, 2])
    kx, ky = wavenumbers(n)
    w1 = torch.fft.rfft2(ws[:, 1])
    gx = torch.fft.irfft2(2j * math.pi * kx * w1, s=(n, n))
    gy = torch.fft.irfft2(2j * math.pi * ky * w1, s=(n, n))
    rate = -nu * (gx**2 + gy**2).mean(dim=(-2, -1))
    measured = (enstrophy(ws[:, 2]) - enstrophy(ws[:, 0])) / 0.02
    assert torch.allclose(measured, rate, rtol=1e-3), (measured, rate)


def test_inviscid_conservation():
    """nu = 0, f = 0, a band-limited field: the mean vorticity is conserved to round-off, energy and
    enstrophy to the time-stepping error (O(dt^2) relative over a fixed time)."""
    n = 32
    w0 = _band_limited(sample_vorticity(3, n, generator=torch.Generator().manual_seed(3)) * 5)
    w0 = w0 + 0.25  # a non-zero mean
    steps = 100
    ws = ns_solve(w0, t_final=1.0, steps=steps, nu=0.0, forcing=None, save_steps=[0, steps // 2, steps])
    mean = ws.mean(dim=(-2, -1))
    assert float((mean - 0.25).abs().max()) < 1e-13
    drift = []
    for s in (steps, 2 * steps):
        w = ns_solve(w0, t_final=1.0, steps=s, nu=0.0, forcing=None)[:, -1]
        dz = float(((enstrophy(w) - enstrophy(w0)) / enstrophy(w0)).abs().max())
        de = float(((energy(w) - energy(w0)) / energy(w0)).abs().max())
        assert dz < 1e-5 and de < 1e-5, (dz, de)
        drift.append(max(dz, de))
    # the flow did change (not a trivial conservation)
    assert _rel(ws[:, -1], w0) > 0.3
    # the drift is the time-stepping error (Heun's O(dt^3) per unit time on oscillatory modes)
    assert drift[1] < drift[0] / 4, drift
    # the mean is also conserved with forcing and viscosity (the forcing has zero mean)
    w = ns_solve(w0, t_final=1.0, steps=20, nu=1e-3)[:, -1]
    assert float((w.mean(dim=(-2, -1)) - 0.25).abs().max()) < 1e-13


def test_random_field_statistics():
    n = 16
    w = sample_vorticity(4000, n, generator=torch.Generator().manual_seed(4))
    assert w.shape == (4000, n, n) and w.dtype == F64
    assert float(w.mean(dim=(-2, -1)).abs().max()) < 1e-12  # zero mean per field
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=F64)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    lam = (7.0 ** 1.5) ** 2 * (4 * math.pi**2 * k2 + 49.0) ** (-2.5)
    lam[0, 0] = 0
    assert abs(float(w.var(0).mean()) / float(lam.sum()) - 1) < 0.03  # pointwise variance = sum of eigenvalues
    a = sample_vorticity(3, n, generator=torch.Generator().manual_seed(5))
    b = sample_vorticity(3, n, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_batch_float32_and_determinism():
    w0 = sample_vorticity(3, 16, generator=torch.Generator().manual_seed(6)) * 10
    full = ns_solve(w0, t_final=1.0, steps=10, save_steps=[0, 5, 10])
    assert full.shape == (3, 3, 16, 16) and full.dtype == F64
    assert torch.equal(full[:, 0], w0)
    one = ns_solve(w0[1], t_final=1.0, steps=10)
    assert one.shape == (1, 16, 16) and torch.allclose(one[0], full[1, -1], atol=1e-14, rtol=0)
    assert torch.equal(ns_solve(w0, t_final=1.0, steps=10)[:, -1], full[:, -1])
    f32 = ns_solve(w0.float(), t_final=1.0, steps=10)[:, -1]
    assert f32.dtype == torch.float32 and _rel(f32.double(), full[:, -1]) < 1e-5


def test_errors():
    w = torch.zeros(2, 8, 8, dtype=F64)
    with pytest.raises(TypeError, match="ns_solve: w must be a torch.Tensor"):
        ns_solve([[0.0]], t_final=1.0, steps=1)
    with pytest.raises(ValueError, match=r"w must have shape \[B, n, n\] or \[n, n\] with n >= 4, got \[2, 8, 6\]"):
        ns_solve(torch.zeros(2, 8, 6), t_final=1.0, steps=1)
    with pytest.raises(ValueError, match="float32 or float64"):
        ns_solve(torch.zeros(8, 8, dtype=torch.int64), t_final=1.0, steps=1)
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        ns_solve(w, t_final=1.0, steps=0)
    with pytest.raises(ValueError, match="t_final must be a number > 0"):
        ns_solve(w, t_final=-1.0, steps=2)
    with pytest.raises(ValueError, match="nu must be a number >= 0"):
        ns_solve(w, t_final=1.0, steps=2, nu=-1e-3)
    with pytest.raises(ValueError, match=r"save_steps must be a non-empty list of steps in 0..2"):
        ns_solve(w, t_final=1.0, steps=2, save_steps=[3])
    with pytest.raises(ValueError, match=r"forcing must have shape \[8, 8\] or \[2, 8, 8\]"):
        ns_solve(w, t_final=1.0, steps=2, forcing=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="forcing must be 'li', None or a tensor, got 'kolmogorov'"):
        ns_solve(w, t_final=1.0, steps=2, forcing="kolmogorov")
    with pytest.raises(ValueError, match="w0 must be finite"):
        ns_solve(torch.full((8, 8), float("nan"), dtype=F64), t_final=1.0, steps=1)
    with pytest.raises(ValueError, match="count must be an int >= 0"):
        sample_vorticity(-1, 8)
