"""A pseudo-spectral solver for 2-D incompressible Navier-Stokes in vorticity form (periodic box).

The equation of the usual benchmark (Li et al., Fourier Neural Operator, 2-D Navier-Stokes):

    w_t + u . grad w = nu lap w + f        on [0, 1]^2, periodic,
    u = (psi_y, -psi_x),  -lap psi = w      (stream function psi, divergence-free velocity u),

with the benchmark's forcing ``f(x, y) = 0.1 (sin(2 pi (x + y)) + cos(2 pi (x + y)))``
(:func:`li_forcing`) and initial vorticity drawn from the Gaussian random field
``N(0, 7^{3/2} (-lap + 49 I)^{-2.5})`` with zero mean (:func:`sample_vorticity`).

Discretisation (:func:`ns_solve`): Fourier pseudo-spectral on an ``n x n`` grid ``x_j = j / n``
(``torch.fft.rfft2``, batched over fields). Derivatives are exact on the grid's modes (the Nyquist
mode's derivative is set to zero); the product ``u . grad w`` is formed in physical space and its
spectrum truncated by the 2/3 rule (modes with ``|k_x|, |k_y| <= (n - 1) // 3`` are kept, so no
aliased product mode lands among the kept ones: a band-limited field evolves exactly as the
Galerkin truncation, which conserves energy and enstrophy when ``nu = 0, f = 0``). Time: Crank-
Nicolson for the viscous term and Heun's method (explicit trapezoid, RK2) for advection and
forcing, second order in ``dt``:

    w* = [(1 - dt nu |k|^2 / 2) w^n + dt G(w^n)] / (1 + dt nu |k|^2 / 2),
    w^{n+1} = [(1 - dt nu |k|^2 / 2) w^n + dt (G(w^n) + G(w*)) / 2] / (1 + dt nu |k|^2 / 2),

with ``G(w) = f - P_{2/3}(u . grad w)``. The solve runs in the dtype of the initial field (float32
or float64; the tests use float64).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["ns_solve", "li_forcing", "sample_vorticity", "velocity", "enstrophy", "energy", "wavenumbers",
           "dealias_mask"]


def _check_size(fn: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 4:
        raise ValueError(f"{fn}: grid size must be an int >= 4, got {n!r}")
    return n


def wavenumbers(n: int, *, dtype: torch.dtype = torch.float64, device: Union[str, torch.device, None] = None
                ) -> Tuple[Tensor, Tensor]:
    """Integer wavenumbers of ``rfft2`` on an ``n x n`` grid: ``(kx [n, n//2+1], ky [n, n//2+1])``,
    ``kx`` along dim 0 (``fftfreq``), ``ky`` along the last dim (``rfftfreq``)."""
    n = _check_size("wavenumbers", n)
    kx = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype, device=device)
    ky = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype, device=device)
    return kx[:, None].expand(n, ky.numel()), ky[None, :].expand(n, ky.numel())


def dealias_mask(n: int, *, device: Union[str, torch.device, None] = None) -> Tensor:
    """The 2/3-rule mask ``[n, n//2+1]`` (bool): ``|k_x|, |k_y| <= (n - 1) // 3``."""
    kx, ky = wavenumbers(n, device=device)
    cut = (n - 1) // 3
    return (kx.abs() <= cut) & (ky.abs() <= cut)


class _Spectral:
    """Wavenumber arrays of one grid, dtype and device."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        kx, ky = wavenumbers(n, dtype=dtype, device=device)
        nyq = (kx.abs() == n / 2) | (ky.abs() == n / 2)
        two_pi = 2 * math.pi
        # derivative symbols i 2 pi k, zero on the Nyquist modes (their derivative is not real)
        self.dx = torch.where(nyq, 0.0, two_pi * kx) * 1j
        self.dy = torch.where(nyq, 0.0, two_pi * ky) * 1j
        self.k2 = (two_pi**2) * (kx**2 + ky**2)  # -lap symbol
        inv = torch.where(self.k2 > 0, 1.0 / torch.where(self.k2 > 0, self.k2, 1.0), 0.0)
        self.inv_k2 = inv  # inverse of -lap on mean-zero fields
        self.mask = dealias_mask(n, device=device)
        self.n = n

    def velocity_hat(self, w_hat: Tensor) -> Tuple[Tensor, Tensor]:
        psi_hat = w_hat * self.inv_k2
        return self.dy * psi_hat, -self.dx * psi_hat

    def advection_hat(self, w_hat: Tensor) -> Tensor:
        """``P_{2/3} F(u . grad w)``."""
        n = self.n
        u_hat, v_hat = self.velocity_hat(w_hat)
        u = torch.fft.irfft2(u_hat, s=(n, n))
        v = torch.fft.irfft2(v_hat, s=(n, n))
        wx = torch.fft.irfft2(self.dx * w_hat, s=(n, n))
        wy = torch.fft.irfft2(self.dy * w_hat, s=(n, n))
        return torch.fft.rfft2(u * wx + v * wy) * self.mask


def li_forcing(n: int, *, dtype: torch.dtype = torch.float64, device: Union[str, torch.device, None] = None) -> Tensor:
    """The benchmark's forcing ``0.1 (sin(2 pi (x + y)) + cos(2 pi (x + y)))`` on the grid ``x_j = j / n``
    (``[n, n]``, ``x`` along dim 0)."""
    n = _check_size("li_forcing", n)
    x = torch.arange(n, dtype=dtype, device=device) / n
    s = x[:, None] + x[None, :]
    return 0.1 * (torch.sin(2 * math.pi * s) + torch.cos(2 * math.pi * s))


def sample_vorticity(
    count: int,
    n: int,
    *,
    alpha: float = 2.5,
    tau: float = 7.0,
    sigma: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Draws ``count`` initial vorticities from the benchmark's Gaussian random field
    ``N(0, sigma^2 (-lap + tau^2 I)^{-alpha})`` (default ``sigma = tau^{alpha - 1}``, i.e. the
    benchmark's ``7^{3/2} (-lap + 49 I)^{-2.5}`` in covariance-square-root form), zero mean.

    As in the benchmark's generator: ``w = Re(ifft2(n^2 sqrt_eig (xi_1 + i xi_2)))`` with i.i.d.
    standard normal ``xi`` per grid mode and ``sqrt_eig(k) = sigma (4 pi^2 |k|^2 + tau^2)^{-alpha/2}``
    (``sqrt_eig(0) = 0``). Returns ``[count, n, n]`` in ``dtype`` (drawn in float64).
    """
    fn = "sample_vorticity"
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{fn}: count must be an int >= 0, got {count!r}")
    n = _check_size(fn, n)
    if not (alpha > 0 and tau > 0):
        raise ValueError(f"{fn}: alpha and tau must be > 0, got alpha={alpha}, tau={tau}")
    sigma = tau ** (alpha - 1.0) if sigma is None else float(sigma)
    k = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    sqrt_eig = sigma * (4 * math.pi**2 * k2 + tau**2) ** (-alpha / 2)
    sqrt_eig[0, 0] = 0.0
    xi = torch.randn(count, n, n, 2, generator=generator, dtype=torch.float64)
    coef = torch.complex(xi[..., 0], xi[..., 1]) * (n * n * sqrt_eig)
    return torch.fft.ifft2(coef).real.to(dtype)


def _as_fields(fn: str, w: Tensor) -> Tuple[Tensor, bool]:
    if not isinstance(w, Tensor):
        raise TypeError(f"{fn}: w must be a torch.Tensor, got {type(w).__name__}")
    squeeze = w.dim() == 2
    if squeeze:
        w = w[None]
    if w.dim() != 3 or w.shape[-1] != w.shape[-2] or w.shape[-1] < 4:
        raise ValueError(f"{fn}: w must have shape [B, n, n] or [n, n] with n >= 4, got {list(w.shape)}")
    if w.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{fn}: w must be float32 or float64, got {w.dtype}")
    return w, squeeze


def velocity(w: Tensor) -> Tuple[Tensor, Tensor]:
    """The velocity ``(u, v) = (psi_y, -psi_x)`` of vorticity ``w [B, n, n]`` (or ``[n, n]``)."""
    w, squeeze = _as_fields("velocity", w)
    n = w.shape[-1]
    sp = _Spectral(n, w.dtype, w.device)
    u_hat, v_hat = sp.velocity_hat(torch.fft.rfft2(w))
    u, v = torch.fft.irfft2(u_hat, s=(n, n)), torch.fft.irfft2(v_hat, s=(n, n))
    return (u[0], v[0]) if squeeze else (u, v)


def enstrophy(w: Tensor) -> Tensor:
    """``Z = mean(w^2) / 2`` per field (``[B]``, or 0-dim for ``[n, n]``)."""
    w, squeeze = _as_fields("enstrophy", w)
    z = 0.5 * w.pow(2).mean(dim=(-2, -1))
    return z[0] if squeeze else z


def energy(w: Tensor) -> Tensor:
    """Kinetic energy ``E = mean(u^2 + v^2) / 2`` per field (``[B]``, or 0-dim for ``[n, n]``)."""
    u, v = velocity(w)
    return 0.5 * (u.pow(2) + v.pow(2)).mean(dim=(-2, -1))


def ns_solve(
    w0: Tensor,
    *,
    t_final: float,
    steps: int,
    nu: float = 1e-3,
    forcing: Union[None, str, Tensor] = "li",
    save_steps: Optional[Sequence[int]] = None,
) -> Tensor:
    """Integrates the vorticity equation (see the module docstring) from ``w0``, batched over fields.

    Args:
        w0: initial vorticity ``[B, n, n]`` (or ``[n, n]``), float32 or float64, ``x`` along dim -2
            and ``y`` along dim -1 at ``(i / n, j / n)``; the solve runs in its dtype.
        t_final: final time (> 0). steps: time steps (int >= 1), ``dt = t_final / steps``.
        nu: viscosity (>= 0).
        forcing: ``"li"`` (default: :func:`li_forcing`), ``None`` (unforced) or a time-independent
            field ``[n, n]`` / ``[B, n, n]``.
        save_steps: step indices to return (0 = ``w0``); default ``[steps]`` (the final state).

    Returns:
        ``w [B, len(save_steps), n, n]`` (``[len(save_steps), n, n]`` for a 2-D ``w0``).
    """
    fn = "ns_solve"
    w, squeeze = _as_fields(fn, w0)
    w = w.detach()
    if not torch.isfinite(w).all():
        raise ValueError(f"{fn}: w0 must be finite")
    if not (isinstance(t_final, (int, float)) and not isinstance(t_final, bool) and t_final > 0):
        raise ValueError(f"{fn}: t_final must be a number > 0, got {t_final!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{fn}: steps must be an int >= 1, got {steps!r}")
    if not (isinstance(nu, (int, float)) and not isinstance(nu, bool) and nu >= 0):
        raise ValueError(f"{fn}: nu must be a number >= 0, got {nu!r}")
    save = [steps] if save_steps is None else [int(s) for s in save_steps]
    if not save or any(s < 0 or s > steps for s in save):
        raise ValueError(f"{fn}: save_steps must be a non-empty list of steps in 0..{steps}, got {save}")
    B, n = w.shape[0], w.shape[-1]
    sp = _Spectral(n, w.dtype, w.device)
    if isinstance(forcing, str):
        if forcing != "li":
            raise ValueError(f"{fn}: forcing must be 'li', None or a tensor, got {forcing!r}")
        f_hat = torch.fft.rfft2(li_forcing(n, dtype=w.dtype, device=w.device))
    elif forcing is None:
        f_hat = None
    elif isinstance(forcing, Tensor):
        if tuple(forcing.shape) not in ((n, n), (B, n, n)):
            raise ValueError(f"{fn}: forcing must have shape [{n}, {n}] or [{B}, {n}, {n}], got {list(forcing.shape)}")
        f_hat = torch.fft.rfft2(forcing.detach().to(w.device, w.dtype))
    else:
        raise TypeError(f"{fn}: forcing must be 'li', None or a tensor, got {type(forcing).__name__}")
    dt = float(t_final) / steps
    half = 0.5 * dt * nu * sp.k2
    lhs = 1.0 / (1.0 + half)  # Crank-Nicolson
    rhs = 1.0 - half

    def g(w_hat: Tensor) -> Tensor:
        out = -sp.advection_hat(w_hat)
        return out if f_hat is None else out + f_hat

    w_hat = torch.fft.rfft2(w)
    frames: Dict[int, Tensor] = {0: w.clone()} if 0 in save else {}
    for step in range(1, max(save) + 1):
        g0 = g(w_hat)
        base = rhs * w_hat
        w_star = (base + dt * g0) * lhs
        w_hat = (base + 0.5 * dt * (g0 + g(w_star))) * lhs
        if step in save:
            frames[step] = torch.fft.irfft2(w_hat, s=(n, n))
    out = torch.stack([frames[s] for s in save], dim=1)
    return out[0] if squeeze else out
