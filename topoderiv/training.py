"""Training and evaluation helpers shared by the growth loop and the baselines.

Every method (growth, fixed network, random / identity insertion, Forward Thinking) trains with
:func:`fit` and measures with :func:`evaluate`, so budgets are counted the same way: one epoch =
one pass over ``data``, one optimiser step per batch, one scheduler step per epoch.

Data: one ``(x, y)`` batch (a tuple or list whose first element is a tensor) or a re-iterable of
batches (a ``DataLoader``, a list of ``(x, y)``). ``x`` is a tensor whose dim 0 counts samples;
``loss_fn(model(x), y)`` must return a scalar, the MEAN over the batch.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["fit", "evaluate", "iter_batches", "is_batch", "batch_size", "train_mode"]

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


def _device_of(model: nn.Module) -> Optional[torch.device]:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, data: Any, loss_fn: LossFn, epochs: int, *,
        scheduler: Any = None, progress: bool = False, device: Optional[torch.device] = None,
        grad_clip: Optional[float] = None, desc: str = "train") -> List[float]:
    """Trains ``model`` for ``epochs`` passes over ``data``.

    One optimiser step per batch; ``scheduler.step()`` once per epoch (``ReduceLROnPlateau`` gets
    the epoch's training loss). The model is left in train mode.

    Args:
        model: the network. optimizer: its optimiser. data: a batch or a re-iterable of batches.
        loss_fn: ``loss_fn(model(x), y) -> scalar mean``. epochs: number of passes (>= 0).
        scheduler: optional LR scheduler. progress: tqdm bar over epochs. device: where batches go
            (default: the model's device). grad_clip: max gradient norm, or None.

    Returns:
        Mean training loss per epoch (batch losses weighted by batch size).

    Raises:
        ValueError: the loss became NaN/Inf (message names the epoch), or bad arguments.
    """
    fn = "fit"
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{fn}: epochs must be an int >= 0, got {epochs!r}")
    if not is_batch(data) and iter(data) is data:
        raise TypeError(f"{fn}: data must be re-iterable (a DataLoader or a list of batches) to train "
                        f"several epochs, got a one-shot iterator {type(data).__name__}")
    device = device if device is not None else _device_of(model)
    losses: List[float] = []
    model.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs, desc=desc, leave=False)
    try:
        for epoch in range(epochs):
            total: Optional[Tensor] = None
            count = 0
            for x, y in iter_batches(data, fn, device=device):
                optimizer.zero_grad(set_to_none=True)
                loss = check_loss(fn, loss_fn(model(x), y))
                loss.backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                b = batch_size(x)
                val = loss.detach() * b
                total = val if total is None else total + val
                count += b
            if count == 0:
                raise ValueError(f"{fn}: data must hold at least one non-empty batch, got none")
            mean = float(total) / count
            if not math.isfinite(mean):
                raise ValueError(
                    f"{fn}: the training loss became non-finite (NaN/Inf) in epoch {epoch}: check the data "
                    "for NaN/Inf and lower the learning rate"
                )
            losses.append(mean)
            if scheduler is not None:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(mean)
                else:
                    scheduler.step()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{mean:.4g}")
    finally:
        if bar is not None:
            bar.close()
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, loss_fn: LossFn, *, device: Optional[torch.device] = None,
             check_finite: bool = False) -> float:
    """Mean of ``loss_fn(model(x), y)`` over ``data`` (weighted by batch size), in eval mode.

    Works for any batch-mean metric (accuracy, relative error). The model's train/eval flags are
    restored afterwards; no gradients are computed.
    """
    fn = "evaluate"
    device = device if device is not None else _device_of(model)
    total = 0.0
    count = 0
    with train_mode(model, False):
        for x, y in iter_batches(data, fn, device=device, check_finite=check_finite):
            loss = check_loss(fn, loss_fn(model(x), y))
            b = batch_size(x)
            total += float(loss) * b
            count += b
    if count == 0:
        raise ValueError(f"{fn}: data must hold at least one non-empty batch, got none")
    return total / count


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
