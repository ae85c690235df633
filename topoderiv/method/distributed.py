"""Data parallelism: which process group a call reduces over, the collectives it makes, DDP wrappers.

Every function of topoderiv that reduces over data (:func:`topoderiv.score`,
:func:`topoderiv.search_eps`, :func:`topoderiv.evaluate`) takes ``group``:

- ``None`` (default): the *current* group: the one set by :func:`process_group` around the call,
  else torch.distributed's default group when it is initialised, else none (one process).
- ``False``: this process only, no collective (the opt-out, e.g. rank-0-only code).
- a ``torch.distributed.ProcessGroup``: that group.

Under a group of more than one process, each rank streams ITS OWN shard of the data and every rank
gets the same result as one process on the union of the shards: sample counts and losses are
all-reduced, accumulated statistics are all-reduced once per point, and matrix-free Lanczos
all-reduces each operator application (:mod:`topoderiv.method.lanczos`). Every branch is decided
from all-reduced quantities, so all ranks take the same path; a rank with an empty shard still
takes part. Rank 0 is not special except for writing files (:func:`is_writer`).

:class:`Comm` is a thin layer over ``torch.distributed`` (no communication of its own): it
flattens the tensors of one quantity into ONE ``all_reduce``, moves them to the device the
backend wants (CUDA for NCCL, CPU for gloo), counts calls and payload bytes per tag
(:func:`comm_counters`) and checks agreement between ranks (:meth:`Comm.agree`: one ``MAX``
all-reduce of a fingerprint; ranks that disagree, or a rank that failed, make EVERY rank raise
instead of leaving the others waiting in a collective).
"""
from __future__ import annotations

import contextlib
import contextvars
import inspect
import zlib
from collections import defaultdict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Comm",
    "communicator",
    "current_group",
    "process_group",
    "rank_and_world",
    "is_writer",
    "comm_counters",
    "reset_comm_counters",
    "is_ddp",
    "ddp_settings",
    "wrap_ddp",
    "unwrap",
]

# the group set by process_group(); a one-element tuple so that "not set" (None) differs from
# "set to None/False"
_CURRENT: contextvars.ContextVar[Optional[Tuple[Any]]] = contextvars.ContextVar("topoderiv_group", default=None)

# tag -> [collectives, payload bytes], over the whole process (the benchmark and tests read them)
_COUNTERS: Dict[str, List[int]] = defaultdict(lambda: [0, 0])


def comm_counters() -> Dict[str, Tuple[int, int]]:
    """``{tag: (collectives, payload bytes)}`` made by this process since :func:`reset_comm_counters`.

    Tags: ``"agree"`` (agreement checks), ``"meta"`` (sample counts, losses, route inputs),
    ``"blocks"`` (dense sensitivity blocks, one per point), ``"singular"`` (the ``M_g`` of a
    sub-block site, one per point), ``"matvec"`` (one per matrix-free Lanczos step),
    ``"warm"`` (the warm start of a matrix-free solve), ``"fallback"`` (dense blocks of
    unconverged or rule-requested blocks), ``"eps"`` (the eps search), ``"eval"``, ``"train"``
    (per training step: the global batch size), ``"result"`` (a report broadcast from rank 0 when
    ranks computed different bits). Payload = the tensor's bytes (a ring all-reduce moves about
    ``2 (P - 1) / P`` times that per rank).
    """
    return {tag: (c[0], c[1]) for tag, c in _COUNTERS.items()}


def reset_comm_counters() -> None:
    """Sets every counter of :func:`comm_counters` to zero."""
    _COUNTERS.clear()


def _check_group(fn: str, group: Any) -> None:
    if group is None or group is False:
        return
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{fn}: group must be None (the current group), False (this process only) or a "
                        f"torch.distributed.ProcessGroup, got {type(group).__name__}")


@contextlib.contextmanager
def process_group(group: Any) -> Iterator[None]:
    """Makes ``group`` the current group of topoderiv's collectives inside the block.

    ``process_group(False)`` turns them off (every call works on this process's data only) even
    when torch.distributed is initialised; ``process_group(pg)`` makes calls with ``group=None``
    reduce over ``pg`` instead of the default group. The Grower runs its rounds under its group.
    """
    _check_group("process_group", group)
    token = _CURRENT.set((group,))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_group(group: Any = None, fn: str = "current_group") -> Any:
    """The group ``group`` stands for: a ProcessGroup, or None for this process alone.

    ``None`` -> the group of :func:`process_group`, else the default group when torch.distributed is
    initialised, else None. ``False`` -> None.
    """
    _check_group(fn, group)
    if group is None:
        set_ = _CURRENT.get()
        if set_ is not None:
            group = set_[0]
        elif dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
    if group is None or group is False:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}: a process group was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return group


def rank_and_world(group: Any = None) -> Tuple[int, int]:
    """``(rank, world size)`` in the current group (``(0, 1)`` without one)."""
    g = current_group(group, "rank_and_world")
    if g is None:
        return 0, 1
    return dist.get_rank(g), dist.get_world_size(g)


def is_writer(group: Any = None) -> bool:
    """True on the rank that writes files: rank 0 of the current group (always True without one)."""
    return rank_and_world(group)[0] == 0


def communicator(group: Any = None, fn: str = "communicator") -> Optional["Comm"]:
    """A :class:`Comm` over the group ``group`` stands for, or None for one process (no group, or a
    group of one: nothing to reduce)."""
    g = current_group(group, fn)
    if g is None:
        return None
    if dist.get_rank(g) < 0:
        raise RuntimeError(f"{fn}: this process is not a member of the process group it was given")
    if dist.get_world_size(g) <= 1:
        return None
    return Comm(g, fn)


def _fingerprint(obj: Any) -> int:
    """A 31-bit hash of ``obj``'s repr (tensors by their bytes)."""
    h = 0

    def walk(o: Any) -> None:
        nonlocal h
        if isinstance(o, Tensor):
            t = o.detach().to("cpu").contiguous()
            h = zlib.crc32(repr((t.dtype, tuple(t.shape))).encode(), h)
            if t.numel():
                h = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes(), h)
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h = zlib.crc32(repr(k).encode(), h)
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h = zlib.crc32(b"[", h)
            for v in o:
                walk(v)
            h = zlib.crc32(b"]", h)
        else:
            h = zlib.crc32(repr(o).encode(), h)

    walk(obj)
    return h & 0x7FFFFFFF


class Comm:
    """The collectives of one call under a process group of more than one rank.

    Attributes:
        group: the ProcessGroup. rank, world: this process's rank and the group's size.
        backend: the group's backend (``"gloo"``, ``"nccl"``, ...). fn: the calling function (errors).
    """

    def __init__(self, group: Any, fn: str) -> None:
        self.group, self.fn = group, fn
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world={self.world}, backend={self.backend!r}, fn={self.fn!r})"

    def device(self, like: Optional[Tensor] = None) -> torch.device:
        """Where a collective's tensor must live: the current CUDA device for NCCL, else the CPU
        (gloo reduces CPU tensors)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _count(self, tag: str, t: Tensor) -> None:
        c = _COUNTERS[tag]
        c[0] += 1
        c[1] += t.numel() * t.element_size()

    def all_reduce_(self, t: Tensor, tag: str, op: Any = None) -> Tensor:
        """Sums ``t`` over the ranks in place (one collective) and returns it."""
        op = dist.ReduceOp.SUM if op is None else op
        dev = self.device(t)
        if t.device == dev and t.is_contiguous():
            buf = t
        else:
            buf = t.detach().to(dev).contiguous()
        self._count(tag, buf)
        dist.all_reduce(buf, op=op, group=self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_reduce(self, tensors: Sequence[Tensor], tag: str) -> List[Tensor]:
        """The sums over the ranks of ``tensors`` (one dtype), in ONE collective: flattened into one
        buffer, reduced, split back into new tensors of the same shapes and devices."""
        tensors = list(tensors)
        if not tensors:
            return []
        dtype = tensors[0].dtype
        if any(t.dtype != dtype for t in tensors):
            raise TypeError(f"{self.fn}: tensors reduced together must share one dtype, got "
                            f"{sorted({str(t.dtype) for t in tensors})}")
        dev = self.device(tensors[0])
        if len(tensors) == 1:
            buf = tensors[0].detach().to(dev, copy=True).contiguous().reshape(-1)
        else:
            buf = torch.cat([t.detach().reshape(-1).to(dev) for t in tensors])
        self.all_reduce_(buf, tag)
        out, o = [], 0
        for t in tensors:
            out.append(buf[o:o + t.numel()].reshape(t.shape).to(t.device))
            o += t.numel()
        return out

    def sum_floats(self, values: Sequence[float], tag: str) -> List[float]:
        """Sums of a few Python numbers over the ranks (float64, one collective)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return [float(v) for v in self.all_reduce([t], tag)[0].tolist()]

    def _max(self, vec: Tensor, tag: str) -> Tensor:
        buf = vec.to(self.device())
        self._count(tag, buf)
        dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=self.group)
        return buf.cpu()

    def same(self, obj: Any, tag: str = "agree") -> bool:
        """Whether every rank passes an equal ``obj`` (one collective; tensors compared bit for bit)."""
        h = _fingerprint(obj)
        got = self._max(torch.tensor([h, -h], dtype=torch.int64), tag)
        return int(got[0]) == -int(got[1])

    def agree(self, what: Dict[str, Any], failed: Optional[BaseException] = None) -> None:
        """One collective: every rank passes ``what`` (must be equal on all ranks) and whether it
        failed. A rank that failed re-raises its own error after the collective; the others raise a
        RuntimeError naming the failed ranks; when every rank is fine but ``what`` differs, every rank
        raises a RuntimeError naming the keys of ``what`` and its own values. So a failure or a
        disagreement on one rank stops all of them instead of leaving them waiting in a collective.
        """
        h = _fingerprint(what)
        vec = torch.zeros(self.world + 2, dtype=torch.int64)
        if failed is not None:
            vec[self.rank] = 1
        vec[self.world], vec[self.world + 1] = h, -h
        got = self._max(vec, "agree")
        bad = [r for r in range(self.world) if int(got[r])]
        if failed is not None:
            raise failed
        if bad:
            raise RuntimeError(f"{self.fn}: rank(s) {bad} of {self.world} failed (the error is raised there); rank "
                               f"{self.rank} stops with them")
        if int(got[self.world]) != -int(got[self.world + 1]):
            mine = ", ".join(f"{k}={v!r}" for k, v in what.items())
            raise RuntimeError(f"{self.fn}: the ranks of the process group must agree on {sorted(what)}, but they "
                               f"differ (rank {self.rank} has {mine}): every rank must make the same call "
                               f"(same points, rule, route, backend, model) and take the same path")

    def broadcast_object(self, obj: Any, tag: str = "result") -> Any:
        """``obj`` of the group's rank 0, on every rank (pickled; for rare, small payloads)."""
        box = [obj]
        src = dist.get_global_rank(self.group, 0) if self.group is not dist.group.WORLD else 0
        _COUNTERS[tag][0] += 1
        dev = self.device() if self.backend == "nccl" else None
        dist.broadcast_object_list(box, src=src, group=self.group, device=dev)
        return box[0]


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel


def is_ddp(model: Any) -> bool:
    """True for a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``model`` itself otherwise)."""
    return model.module if is_ddp(model) else model


def ddp_settings(ddp: nn.parallel.DistributedDataParallel) -> Dict[str, Any]:
    """The constructor arguments of an existing DDP wrapper that :func:`wrap_ddp` re-applies (DDP does
    not see parameters added after it was built: a grown model is wrapped again, like this)."""
    if not is_ddp(ddp):
        raise TypeError(f"ddp_settings: ddp must be a DistributedDataParallel, got {type(ddp).__name__}")
    out: Dict[str, Any] = {"device_ids": getattr(ddp, "device_ids", None),
                           "output_device": getattr(ddp, "output_device", None),
                           "dim": getattr(ddp, "dim", 0),
                           "process_group": getattr(ddp, "process_group", None),
                           "find_unused_parameters": bool(getattr(ddp, "find_unused_parameters", False)),
                           "gradient_as_bucket_view": bool(getattr(ddp, "gradient_as_bucket_view", False)),
                           "static_graph": bool(getattr(ddp, "static_graph", False))}
    cap = getattr(ddp, "bucket_bytes_cap", None)
    if isinstance(cap, int) and cap > 0:
        out["bucket_cap_mb"] = cap / 2**20
    if "forward_sync_buffers" in _ddp_parameters() and hasattr(ddp, "forward_sync_buffers"):
        out["forward_sync_buffers"] = bool(ddp.forward_sync_buffers)
    elif hasattr(ddp, "broadcast_buffers"):
        out["broadcast_buffers"] = bool(ddp.broadcast_buffers)
    if not out["device_ids"]:
        out.pop("device_ids")
        out.pop("output_device")
    return out


def _ddp_parameters() -> Sequence[str]:
    return tuple(inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters)


def wrap_ddp(module: nn.Module, settings: Optional[Dict[str, Any]] = None,
             group: Any = None) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(module, **settings)``; without settings: over ``group`` (the current
    one), with ``device_ids=[device]`` for a CUDA module. Building it is a collective: every rank of
    the group must call it, and DDP broadcasts rank 0's parameters and buffers, so every rank starts
    from the same values (and DDP checks that the ranks' parameter shapes agree)."""
    if settings is None:
        g = current_group(group, "wrap_ddp")
        if g is None:
            raise RuntimeError("wrap_ddp: needs an initialised process group")
        settings = {"process_group": g}
        ref = next(module.parameters(), None)
        if ref is not None and ref.device.type == "cuda":
            settings["device_ids"] = [ref.device.index if ref.device.index is not None else torch.cuda.current_device()]
    return nn.parallel.DistributedDataParallel(module, **settings)
