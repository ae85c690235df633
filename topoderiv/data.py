"""Batches of data: ``(x, y)`` pairs, one batch or an iterable of them, and model-mode helpers.

Data: one ``(x, y)`` batch (a tuple or list whose first element is a tensor) or a re-iterable of
batches (a ``DataLoader``, a list of ``(x, y)``). ``x`` is a tensor whose dim 0 counts samples;
``loss_fn(model(x), y)`` must return a scalar, the MEAN over the batch.

Data parallel: :func:`shard` gives each rank of a process group its slice of every batch, so the
ranks together see exactly the batches of one process (the global batches).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["iter_batches", "is_batch", "batch_size", "check_loss", "train_mode", "device_of", "take_batches", "shard",
           "Shard"]

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


def _slice(obj: Any, lo: int, hi: int) -> Any:
    """Rows ``lo:hi`` of a batch element (tensors along dim 0; tuples/lists element-wise; others as is)."""
    if isinstance(obj, Tensor) and obj.dim() > 0:
        return obj[lo:hi]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(o, lo, hi) for o in obj)
    return obj


class Shard:
    """Rank ``rank``'s slice of every batch of ``data`` (see :func:`shard`).

    Re-iterable when ``data`` is; ``len()`` and the data-order state (``state_dict`` /
    ``load_state_dict``, e.g. of :class:`topoderiv.experiments.tasks.Batches`) are the wrapped
    loader's, so a resumed run sees the same global batches. ``data``: the wrapped loader.
    """

    def __init__(self, data: Any, rank: int, world: int) -> None:
        fn = "shard"
        for name, v, lo in (("world", world, 1), ("rank", rank, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")
        if rank >= world:
            raise ValueError(f"{fn}: rank must be < world = {world}, got {rank}")
        if isinstance(data, Tensor) or not (is_batch(data) or hasattr(data, "__iter__")):
            raise TypeError(f"{fn}: data must be an (x, y) batch or an iterable of (x, y) batches, got "
                            f"{type(data).__name__}")
        self.data, self.rank, self.world = data, rank, world

    def bounds(self, n: int) -> Tuple[int, int]:
        """Rows ``[lo, hi)`` of a batch of ``n`` rows that this rank takes (sizes differ by at most 1)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def __iter__(self) -> Iterator[Batch]:
        # iter() of the wrapped loader now, not at the first batch: a loader that draws its order
        # in iter() (Batches, DataLoader) then advances exactly as it would unwrapped
        return self._slices(iter([self.data] if is_batch(self.data) else self.data))

    def _slices(self, source: Iterator[Any]) -> Iterator[Batch]:
        for i, batch in enumerate(source):
            if not is_batch(batch):
                raise TypeError(f"shard: data batch {i} must be an (x, y) pair with a tensor x, got "
                                f"{type(batch).__name__}")
            x, y = batch
            lo, hi = self.bounds(batch_size(x))
            yield _slice(x, lo, hi), _slice(y, lo, hi)

    def __len__(self) -> int:
        return 1 if is_batch(self.data) else len(self.data)

    def __getattr__(self, name: str) -> Any:
        # the wrapped loader's data-order state: state_dict / load_state_dict (e.g. Batches) or the
        # generator / sampler attributes of a DataLoader, when it has them
        inner = self.__dict__.get("data")
        if inner is not None and name in ("state_dict", "load_state_dict", "generator", "sampler", "batch_sampler"):
            return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        return f"Shard(rank={self.rank}, world={self.world}, data={self.data!r})"


def shard(data: Any, rank: Optional[int] = None, world: Optional[int] = None) -> Shard:
    """Every batch of ``data`` cut into ``world`` contiguous slices; rank ``rank`` takes slice ``rank``.

    The ranks of a data-parallel run then see exactly the global batches of one process (slices of
    ``B`` rows differ in size by at most one; a slice may be empty when ``B < world``), which is
    what makes a data-parallel growth run match a single-process one (:func:`topoderiv.fit`
    weights each rank's loss by its share). ``rank`` / ``world`` default to the process's rank and
    the size of torch.distributed's default group (0 and 1 when it is not initialised).
    """
    if rank is None or world is None:
        import torch.distributed as dist

        on = dist.is_available() and dist.is_initialized()
        rank = (dist.get_rank() if on else 0) if rank is None else rank
        world = (dist.get_world_size() if on else 1) if world is None else world
    return Shard(data, rank, world)
