"""Training and evaluation shared by the growth loop and the baselines.

Every method (growth, fixed network, random / identity insertion, Forward Thinking) trains with
:func:`fit` and measures with :func:`evaluate`, so budgets are counted the same way: one epoch =
one pass over ``data``, one optimiser step per batch, one scheduler step per epoch.

Data parallel: :func:`fit` of a ``DistributedDataParallel`` model trains on every rank's own
shard with the gradient of the GLOBAL batch mean (each rank's loss is weighted by its share of
the global batch, so unequal shards average exactly), and reports the loss over all ranks;
:func:`evaluate` all-reduces its sums under a process group.
"""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from ..data import batch_size, check_loss, device_of, is_batch, iter_batches, train_mode
from ..method.distributed import communicator, is_ddp

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

    Data parallel: with a ``DistributedDataParallel`` model every rank passes its own shard of
    each global batch (:func:`topoderiv.data.shard`; a slice may be empty). Before each step the
    ranks all-reduce their batch sizes (one tiny collective) and each rank's loss is weighted by
    ``world * B_rank / B_global``: DDP's average of the gradients is then exactly the gradient of
    the global batch mean, so the run matches one process on the global batches up to rounding.
    The returned losses are over all ranks. Every rank must have the same number of batches per
    epoch: otherwise every rank raises (no rank is left waiting).

    Raises:
        ValueError: the loss became NaN/Inf (message names the epoch), or bad arguments; the ranks
            have different numbers of batches.
    """
    fn = "fit"
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"{fn}: epochs must be an int >= 0, got {epochs!r}")
    if not is_batch(data) and iter(data) is data:
        raise TypeError(f"{fn}: data must be re-iterable (a DataLoader or a list of batches) to train "
                        f"several epochs, got a one-shot iterator {type(data).__name__}")
    device = device if device is not None else device_of(model)
    comm = communicator(model.process_group, fn) if is_ddp(model) else None
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
                b = batch_size(x)
                weight = 1.0
                if comm is not None:  # the global batch: weight this rank's loss by its share
                    b_all, ranks, _, _ = comm.sum_floats([b, 1, 0, 0], "train")
                    if ranks != comm.world:
                        raise ValueError(f"{fn}: every rank must have the same number of batches per epoch, but "
                                         f"{comm.world - int(ranks)} of {comm.world} ranks ran out of batches first "
                                         "(shard every global batch with topoderiv.data.shard)")
                    weight = comm.world * b / b_all if b_all > 0 else 0.0
                optimizer.zero_grad(set_to_none=True)
                out = model(x)
                if b == 0:  # an empty slice: zero gradients, but this rank still joins DDP's all-reduce
                    loss = out.sum() * 0.0
                else:
                    loss = check_loss(fn, loss_fn(out, y))
                (loss * weight if weight != 1.0 else loss).backward()
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                val = loss.detach() * b
                total = val if total is None else total + val
                count += b
            if comm is not None:  # end of the epoch: no batch left here; the loss over all ranks
                _, more, t_all, c_all = comm.sum_floats([0, 0, float(total) if total is not None else 0.0, count],
                                                        "train")
                if more:
                    raise ValueError(f"{fn}: every rank must have the same number of batches per epoch, but "
                                     f"{int(more)} of {comm.world} ranks have more batches than rank {comm.rank} "
                                     "(shard every global batch with topoderiv.data.shard)")
                total, count = torch.tensor(t_all), int(c_all)
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
             check_finite: bool = False, group: Any = None) -> float:
    """Mean of ``loss_fn(model(x), y)`` over ``data`` (weighted by batch size), in eval mode.

    Works for any batch-mean metric (accuracy, relative error). The model's train/eval flags are
    restored afterwards; no gradients are computed.

    ``group``: as :func:`topoderiv.score` (``None``: the current process group, ``False``: this
    process only). Under a group of several ranks every rank must call it (with its own shard, or
    the same data: the mean is the same) and gets the mean over all ranks' samples.
    """
    fn = "evaluate"
    device = device if device is not None else device_of(model)
    comm = communicator(group, fn)
    total = 0.0
    count = 0
    failed: Optional[Exception] = None
    try:
        with train_mode(model, False):
            for x, y in iter_batches(data, fn, device=device, check_finite=check_finite):
                b = batch_size(x)
                if b == 0:
                    continue
                loss = check_loss(fn, loss_fn(model(x), y))
                total += float(loss) * b
                count += b
    except Exception as err:
        if comm is None:
            raise
        failed = err
    if comm is not None:
        comm.agree({"evaluate": True}, failed)
        total, c = comm.sum_floats([total, count], "eval")
        count = int(c)
    if count == 0:
        raise ValueError(f"{fn}: data must hold at least one non-empty batch, got none")
    return total / count
