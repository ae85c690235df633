"""Batches of data: ``(x, y)`` pairs, one batch or an iterable of them, and model-mode helpers.

Data: one ``(x, y)`` batch (a tuple or list whose first element is a tensor) or a re-iterable of
batches (a ``DataLoader``, a list of ``(x, y)``). ``x`` is a tensor whose dim 0 counts samples;
``loss_fn(model(x), y)`` must return a scalar, the MEAN over the batch.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["iter_batches", "is_batch", "batch_size", "check_loss", "train_mode", "device_of", "take_batches"]

Batch = Tuple[Any, Any]
LossFn = Callable[[Tensor, Any], Tensor]


def is_batch(data: object) -> bool:
    """True for one ``(x, y)`` batch: a 2-tuple/list whose first element is a tensor."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _to(obj: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return obj
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def iter_batches(data: Any, fn: str = "data", *, device: Optional[torch.device] = None,
                 check_finite: bool = False, limit: Optional[int] = None) -> Iterator[Batch]:
    """Yields ``(x, y)`` batches of ``data`` (one batch or an iterable of batches), moved to ``device``.

    Raises:
        TypeError: a batch is not an ``(x, y)`` pair with a tensor ``x``.
        ValueError: ``check_finite`` and a floating ``x`` or ``y`` holds NaN/Inf.
    """
    source: Iterable[Any] = [data] if is_batch(data) else data
    if isinstance(data, Tensor) or not hasattr(source, "__iter__"):
        raise TypeError(f"{fn}: data must be an (x, y) batch or an iterable of (x, y) batches, got {type(data).__name__}")
    for i, batch in enumerate(source):
        if limit is not None and i >= limit:
            return
        if not is_batch(batch):
            raise TypeError(
                f"{fn}: data batch {i} must be an (x, y) pair with a tensor x, got {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        x, y = batch
        if x.dim() == 0:
            raise ValueError(f"{fn}: data batch {i}: x must have a batch dim (shape [B, ...]), got a 0-dim tensor")
        if check_finite:
            for name, t in (("x", x), ("y", y)):
                if isinstance(t, Tensor) and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{fn}: data batch {i}: {name} must contain only finite values, got NaN or Inf")
        yield _to(x, device), _to(y, device)


def batch_size(x: Tensor) -> int:
    """Number of samples of a batch: ``x.shape[0]``."""
    return int(x.shape[0])


def check_loss(fn: str, loss: object) -> Tensor:
    """Raises unless ``loss`` is a scalar tensor (0-dim or one element)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"{fn}: loss_fn must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(
            f"{fn}: loss_fn must return a scalar (the mean over the batch), got a tensor of shape {list(loss.shape)}"
        )
    return loss.reshape(())


@contextmanager
def train_mode(model: nn.Module, training: Optional[bool]) -> Iterator[nn.Module]:
    """Sets ``model.train(training)`` (``None``: leave as is) and restores every submodule's flag."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield model
    finally:
        for m, f in flags:
            m.training = f


def device_of(model: nn.Module) -> Optional[torch.device]:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def take_batches(data: Any, limit: Optional[int]) -> Sequence[Batch]:
    """The first ``limit`` batches of ``data`` as a list (all of them for ``None``)."""
    if is_batch(data):
        return [data]
    out = []
    for i, b in enumerate(data):
        if limit is not None and i >= limit:
            break
        out.append(b)
    return out
