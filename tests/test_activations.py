"""TDActivation and the admissibility test (METHOD.md section 2), against float64 finite differences."""
import math

import pytest
import torch
from torch import nn

from topoderiv.method.activations import TDActivation, activation_spec, check_admissible, get_activation


def _fd_derivatives(f, h=1e-3):
    """sigma(0), sigma'(0), sigma''(0) by central differences in float64 (independent of autograd)."""
    z = torch.tensor([-2 * h, -h, 0.0, h, 2 * h], dtype=torch.float64)
    s = f(z)
    d1 = float((s[3] - s[1]) / (2 * h))
    d2 = float((s[3] - 2 * s[2] + s[1]) / h**2)
    return float(s[2]), d1, d2


def test_td_activation_formula_and_taylor():
    act = TDActivation()
    z = torch.linspace(-4, 4, 101, dtype=torch.float64)
    expected = 2 * z / (1 + torch.exp(-z)) - torch.tanh(z)
    torch.testing.assert_close(act(z), expected, rtol=0, atol=1e-15)
    # Taylor: z^2/2 + z^3/3 near 0
    small = torch.tensor([1e-3, -1e-3, 2e-3], dtype=torch.float64)
    torch.testing.assert_close(act(small), small**2 / 2 + small**3 / 3, rtol=1e-3, atol=0)
    s0, s1, s2 = _fd_derivatives(act)
    assert s0 == 0.0 and abs(s1) < 1e-6 and abs(s2 - 1.0) < 1e-5
    assert TDActivation.second_derivative_at_zero == 1.0


def test_check_admissible_matches_finite_differences():
    assert check_admissible(TDActivation()) == pytest.approx(1.0, abs=1e-12)
    neg = lambda z: -3.0 * z**2 + z**3  # noqa: E731
    _, _, fd2 = _fd_derivatives(neg)
    assert check_admissible(neg) == pytest.approx(fd2, rel=1e-6)
    assert check_admissible(neg) == pytest.approx(-6.0, abs=1e-12)


@pytest.mark.parametrize(
    "act, name, what",
    [(nn.Tanh(), "Tanh", "sigma'(0)"), (nn.ReLU(), "ReLU", "sigma''(0)"), (nn.GELU(), "GELU", "sigma'(0)"),
     (nn.SiLU(), "SiLU", "sigma'(0)"), (nn.Sigmoid(), "Sigmoid", "sigma(0)"), (nn.Identity(), "Identity", "sigma'(0)")],
)
def test_inadmissible_activations_rejected(act, name, what):
    with pytest.raises(ValueError) as err:
        check_admissible(act)
    msg = str(err.value)
    assert name in msg and what in msg and "admissible" in msg


def test_check_admissible_bad_argument():
    with pytest.raises(TypeError, match="act must be"):
        check_admissible(3.0)


def test_activation_with_parameters_is_checked_in_float64():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.25))

        def forward(self, z):
            return self.a * z**2

    act = Scaled()
    assert check_admissible(act) == pytest.approx(0.5, abs=1e-12)
    assert act.a.dtype == torch.float32  # the original is untouched


def test_activation_specs_roundtrip():
    for name in ("td", "tanh", "relu", "gelu", "silu", "identity"):
        act = get_activation(name)
        assert activation_spec(act) == name
        assert type(get_activation(activation_spec(act))) is type(act)
    assert isinstance(get_activation(None), TDActivation)
    # "module:QualName" only as the old spelling of a REGISTERED class: never imported
    assert isinstance(get_activation("torch.nn:Tanh"), nn.Tanh)
    assert activation_spec(nn.Softsign()) == "torch.nn.modules.activation:Softsign"  # unregistered: described only
    with pytest.raises(ValueError, match="'torch.nn:Softsign' is not a registered class.*register"):
        get_activation("torch.nn:Softsign")
    a = nn.Tanh()
    assert get_activation(a) is not a
    with pytest.raises(ValueError, match="spec must be one of"):
        get_activation("nope")
    with pytest.raises(TypeError, match="spec must be"):
        get_activation(3)
    with pytest.raises(ValueError, match="not a registered class"):
        get_activation("no_such_module_xyz:Foo")
    assert math.isfinite(float(TDActivation()(torch.tensor(50.0))))
