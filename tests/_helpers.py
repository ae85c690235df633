"""Helpers shared by several test files (fixtures live in conftest.py)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Iterable, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from topoderiv import ops
from topoderiv import reference as ref
from topoderiv.growth import Grower, insert_block
from topoderiv.growth.checkpoint import optimizer_state


# ------------------------------------------------------------------------------------------------
# raw core entry points


def assert_rejected(call: Callable[..., Any], cases: Iterable[Tuple[Dict[str, Any], str]], out: Tensor, *,
                    cuda: bool = False) -> None:
    """Every ``call(**kw)`` raises ValueError matching its pattern and leaves ``out`` untouched; with
    ``cuda``, on a build without CUDA kernels ``call(device="cuda")`` raises the RuntimeError that
    says so."""
    before = out.clone()
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    assert torch.equal(out, before), "a rejected call must not touch out"
    if cuda and not ops.has_cuda_kernels():
        with pytest.raises(RuntimeError, match="got CUDA tensors but topoderiv was built without CUDA kernels"):
            call(device="cuda")


def matvec_problem(shape: Tuple[int, int, int], dtype: torch.dtype,
                   gen: torch.Generator) -> Tuple[Tensor, Tensor, Tensor, torch.dtype, Tensor]:
    """``(x [N, d], p [N, n], v [n, d + 1] float64, acc dtype, exact Q v in float64)`` for the
    matrix-free product of the blocks with bias, the exact product from the float64 reference."""
    N, d, n = shape
    x = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype)
    p = torch.randn(N, n, generator=gen, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    v = torch.randn(n, d + 1, generator=gen, dtype=torch.float64)
    exact = torch.einsum("rij,rj->ri", ref.sensitivity_blocks(x.double(), p.double()), v)
    return x, p, v, acc, exact


# ------------------------------------------------------------------------------------------------
# a failed call leaves the model as it was


def snapshot(model: nn.Module) -> Tuple[list, Dict[str, Tensor]]:
    """The module tree (its qualified names: blocks, stages) and a copy of the state dict."""
    return [n for n, _ in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, snap: Tuple[list, Dict[str, Tensor]]) -> None:
    """``model`` has the module tree and the state (keys and values, bit for bit) of ``snap``."""
    names, sd = snap
    assert [n for n, _ in model.named_modules()] == names
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)


# ------------------------------------------------------------------------------------------------
# costates by finite differences


class Shift(nn.Module):
    """``h -> h + delta``: a block that perturbs the stream at an insertion point (``delta`` is a
    plain attribute: change it in place to move the perturbation)."""

    def __init__(self, delta: Tensor):
        super().__init__()
        self.delta = delta

    def forward(self, h: Tensor) -> Tensor:
        return h + self.delta


def costate_fd(model: nn.Module, point: int, direction: Tensor, J: Callable[[nn.Module], float],
               step: float = 1e-6) -> float:
    """``-dJ/dx . direction`` at ``point`` by central differences: ``J`` of copies of ``model`` with
    ``Shift(+-step * direction)`` inserted at ``point``."""
    vals = []
    for sign in (1, -1):
        m2 = copy.deepcopy(model)
        insert_block(m2, point, Shift(sign * step * direction))
        vals.append(J(m2))
    return -(vals[0] - vals[1]) / (2 * step)


# ------------------------------------------------------------------------------------------------
# optimizer state


def mse_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int = 1) -> None:
    """``steps`` optimizer steps on the MSE of ``model(x)`` against ``y``."""
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def assert_optimizer_restored(model: nn.Module, opt: torch.optim.Optimizer, model2: nn.Module,
                              opt2: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """``opt2`` on ``model2`` holds ``opt``'s state on ``model`` parameter by parameter (matched by
    name, e.g. Adam's moments), and one more MSE step on both gives identical parameters."""
    names2 = dict(model2.named_parameters())
    for n, p in model.named_parameters():
        for k, v in opt.state[p].items():
            assert torch.equal(opt2.state[names2[n]][k], v), (n, k)
    mse_step(model, opt, x, y)
    mse_step(model2, opt2, x, y)
    for n, p in model.named_parameters():
        assert torch.equal(names2[n], p), n


# ------------------------------------------------------------------------------------------------
# resumed growth


def assert_same_run(a: Grower, b: Grower) -> None:
    """Bit-identical parameters, optimiser state and history (everything but wall times)."""
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    (ma, ta), (mb, tb) = optimizer_state(a.model, a.optimizer), optimizer_state(b.model, b.optimizer)
    assert ma == mb
    assert sorted(ta) == sorted(tb) and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    ra, rb = a.history.rounds, b.history.rounds
    assert [r.round for r in ra] == [r.round for r in rb]
    for x, y in zip(ra, rb):
        assert (x.val_loss, x.train_loss, x.train_curve, x.test_metric) == (y.val_loss, y.train_loss, y.train_curve,
                                                                           y.test_metric), x.round
        assert (x.point, x.eps, x.mu, x.depth, x.n_params, x.lr) == (y.point, y.eps, y.mu, y.depth, y.n_params, y.lr)
        # compute: FLOP counts and the per-epoch validation curve too (wall times differ)
        assert (x.train_flops, x.optimizer_flops, x.score_flops, x.search_flops, x.val_curve) == \
            (y.train_flops, y.optimizer_flops, y.score_flops, y.search_flops, y.val_curve), x.round
    assert a.history.stop_reason == b.history.stop_reason
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
