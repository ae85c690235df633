"""Training and evaluation shared by the growth loop and the baselines.

Every method (growth, fixed network, random / identity insertion, Forward Thinking) trains with
:func:`fit` and measures with :func:`evaluate`, so budgets are counted the same way: one epoch =
one pass over ``data``, one optimiser step per batch, one scheduler step per epoch.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from ..data import batch_size, check_loss, device_of, is_batch, iter_batches, train_mode

__all__ = ["fit", "evaluate"]

LossFn = Callable[[Tensor, Any], Tensor]


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
    device = device if device is not None else device_of(model)
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
    device = device if device is not None else device_of(model)
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
