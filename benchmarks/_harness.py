"""Benchmark harness: interleaved runs in one process, medians, ratios, machine ceiling.

This CPU's speed swings 3-5x between runs, so every comparison is a ratio of candidates timed
round-robin in the same process (A, B, A, B, ...), and absolute times are only context.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: Dict[str, Callable[[], object]], *, repeats: int = 5, warmup: int = 1,
                device: str = "cpu", budget_s: Optional[float] = None) -> Dict[str, float]:
    """Median seconds of each callable, run round-robin ``repeats`` times after ``warmup`` rounds."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(warmup):
        for f in fns.values():
            f()
        sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for name, f in fns.items():
            sync(device)
            t = time.perf_counter()
            f()
            sync(device)
            times[name].append(time.perf_counter() - t)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def matmul_rate(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of torch's square matmul on this machine (the ceiling we compare against)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = interleaved({"mm": lambda: a @ b}, repeats=repeats, device=device)["mm"]
    return 2 * n**3 / t / 1e9


def machine(device: str = "cpu") -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    """A markdown table."""
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    return "\n".join(out)
