"""Activations for residual blocks, and the admissibility test of METHOD.md section 2.

An inserted block ``x -> x + sigma(W u(x) + b)`` is function preserving at ``W = 0, b = 0`` and
has a purely second-order first effect only when ``sigma(0) = 0``, ``sigma'(0) = 0`` and
``sigma''(0) != 0``. :class:`TDActivation` is the default such activation;
:func:`check_admissible` measures the three numbers with float64 autograd and rejects the rest
(tanh, ReLU, GELU, SiLU, ...).

Activations are named in checkpoints by :func:`activation_spec` and rebuilt by
:func:`get_activation` from a name in the class registry (:mod:`topoderiv.registry`): the short
names of :data:`ACTIVATIONS` (registered here), or any nn.Module class the user registers (built
without constructor arguments). A spec string never imports code: ``"module:QualName"`` is
accepted only as the old spelling of a registered class.
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import lookup, name_of, register

__all__ = [
    "TDActivation",
    "check_admissible",
    "get_activation",
    "activation_spec",
    "ACTIVATIONS",
]

# |sigma(0)| and |sigma'(0)| above this are "not zero"; |sigma''(0)| at or below it is "zero".
_ZERO_TOL = 1e-10


class TDActivation(nn.Module):
    """``sigma(z) = 2 silu(z) - tanh(z)``: the default activation of inserted blocks.

    Taylor series at 0: ``z^2 / 2 + z^3 / 3 + O(z^4)``, so ``sigma(0) = sigma'(0) = 0``,
    ``sigma''(0) = 1`` and ``sigma'''(0) = 2``. Smooth, bounded below by about -0.6 and linear
    (slope 2) for large positive ``z``. Elementwise; any shape, any floating dtype.
    """

    second_derivative_at_zero: float = 1.0

    def forward(self, z: Tensor) -> Tensor:
        return 2.0 * F.silu(z) - torch.tanh(z)

    def extra_repr(self) -> str:
        return "2*silu(z) - tanh(z)"


ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "td": TDActivation,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "elu": nn.ELU,
    "identity": nn.Identity,
}
for _short, _cls in ACTIVATIONS.items():  # checkpoints name these classes by their short names
    register(_cls, name=_short)


def _describe(act: object) -> str:
    if isinstance(act, nn.Module):
        return type(act).__name__
    return getattr(act, "__name__", type(act).__name__)


def get_activation(spec: Union[str, nn.Module, None], default: str = "td") -> nn.Module:
    """Builds an activation module from a spec.

    Args:
        spec: ``None`` (use ``default``), a short name (``"td"``, ``"tanh"``, ``"relu"``,
            ``"gelu"``, ``"silu"``, ``"sigmoid"``, ``"softplus"``, ``"elu"``, ``"identity"``; any
            case), the registered name of an ``nn.Module`` class built without arguments (see
            :mod:`topoderiv.registry`; ``"module:QualName"`` is accepted as the old spelling of a
            registered class, never imported), or an ``nn.Module`` (returned as a deep copy, so
            blocks never share an instance).
        default: the name used for ``None``.

    Raises:
        ValueError: unknown or unregistered name, or a registered class that cannot be built
            without arguments. TypeError: anything else.
    """
    fn = "get_activation"
    if spec is None:
        spec = default
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)
    if not isinstance(spec, str):
        raise TypeError(f"{fn}: spec must be None, a str or an nn.Module, got {type(spec).__name__}")
    key = spec.lower()
    if key in ACTIVATIONS:
        return ACTIVATIONS[key]()
    if ":" not in spec:
        try:
            cls = lookup(spec, "activation", fn, base=nn.Module)
        except ValueError:
            raise ValueError(
                f"{fn}: spec must be one of {sorted(ACTIVATIONS)}, the registered name of an nn.Module class "
                f"(topoderiv.registry.register) or an nn.Module, got {spec!r}"
            ) from None
    else:
        cls = lookup(spec, "activation", fn, base=nn.Module)
    try:
        return cls()
    except Exception as err:
        raise ValueError(f"{fn}: activation {spec!r} ({cls.__module__}.{cls.__qualname__}) must be constructible "
                         f"without arguments, got {type(err).__name__}: {err}") from err


def activation_spec(act: nn.Module) -> str:
    """The JSON-able name of an activation module (inverse of :func:`get_activation`).

    The registered name of its class (the short names of :data:`ACTIVATIONS`, or the name a user
    registered). Any other class gets ``"module:QualName"``, which describes it but rebuilds only
    once the class is registered (:func:`topoderiv.registry.register`); its parameters, if any,
    travel in the state dict.
    """
    name = name_of(act)
    if name is not None:
        return name
    cls = type(act)
    return f"{cls.__module__}:{cls.__qualname__}"


def _as_float64(act: Union[nn.Module, Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    """A float64 version of ``act`` (a deep copy in float64 when it has floating parameters)."""
    if isinstance(act, nn.Module) and any(t.is_floating_point() for t in act.state_dict().values()):
        return copy.deepcopy(act).to(torch.float64)
    return act


def derivatives_at_zero(act: Union[nn.Module, Callable[[Tensor], Tensor]]) -> tuple:
    """``(sigma(0), sigma'(0), sigma''(0))`` by float64 autograd (elementwise activations)."""
    f = _as_float64(act)
    z = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = f(z)
        if not isinstance(y, Tensor) or y.shape != z.shape:
            raise ValueError(
                f"check_admissible: activation {_describe(act)} must map a [1] float64 tensor to a "
                f"[1] tensor (elementwise), got {type(y).__name__} {getattr(y, 'shape', '')}"
            )
        (d1,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        if d1.requires_grad:
            (d2,) = torch.autograd.grad(d1.sum(), z)
        else:  # piecewise-linear activations: the second derivative is zero
            d2 = torch.zeros_like(z)
    return float(y.detach()), float(d1.detach()), float(d2)


def check_admissible(act: Union[nn.Module, Callable[[Tensor], Tensor]]) -> float:
    """Checks ``sigma(0) = 0, sigma'(0) = 0, sigma''(0) != 0`` and returns ``sigma''(0)``.

    The three numbers are computed by float64 autograd at ``z = 0`` (an activation with floating
    parameters is evaluated on a float64 copy). Admissibility is what makes an inserted block the
    identity at ``eps = 0`` with a purely second-order first effect (METHOD.md section 2).

    Args:
        act: an elementwise activation (``nn.Module`` or callable on tensors).

    Returns:
        ``sigma''(0)`` as a float (``1.0`` for :class:`TDActivation`).

    Raises:
        ValueError: naming the activation and the failed condition (tanh, ReLU, GELU, SiLU, ...).
        TypeError: ``act`` is not callable.
    """
    if not callable(act):
        raise TypeError(f"check_admissible: act must be an activation module or callable, got {type(act).__name__}")
    name = _describe(act)
    s0, s1, s2 = derivatives_at_zero(act)
    need = "sigma(0) = 0, sigma'(0) = 0, sigma''(0) != 0"
    if not math.isfinite(s0) or abs(s0) > _ZERO_TOL:
        raise ValueError(
            f"check_admissible: activation {name} is not admissible for an inserted block: needs {need}, "
            f"got sigma(0) = {s0:.6g}"
        )
    if not math.isfinite(s1) or abs(s1) > _ZERO_TOL:
        raise ValueError(
            f"check_admissible: activation {name} is not admissible for an inserted block: needs {need}, "
            f"got sigma'(0) = {s1:.6g}"
        )
    if not math.isfinite(s2) or abs(s2) <= _ZERO_TOL:
        raise ValueError(
            f"check_admissible: activation {name} is not admissible for an inserted block: needs {need}, "
            f"got sigma''(0) = {s2:.6g}"
        )
    return s2


def second_derivative(act: nn.Module) -> Optional[float]:
    """``sigma''(0)`` if ``act`` is admissible, else ``None`` (no exception)."""
    try:
        return check_admissible(act)
    except ValueError:
        return None
