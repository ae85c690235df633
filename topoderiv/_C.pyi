"""Type stub of the compiled core (csrc/bindings.cpp). Pointers are ints (tensor.data_ptr())."""
from typing import Any, Dict

def build_info() -> Dict[str, Any]: ...
def sensitivity_blocks(
    device: str, x: int, x_rstride: int, p: int, p_rstride: int, out: int, batch: int, N: int, d: int, n: int,
    x_bstride: int, p_bstride: int, bias: bool, in_dtype: int, acc_dtype: int, threads: int, stream: int,
) -> None: ...
def sensitivity_matvec(
    device: str, x: int, x_rstride: int, p: int, p_rstride: int, v: int, out: int, workspace: int, batch: int,
    N: int, d: int, n: int, x_bstride: int, p_bstride: int, bias: bool, in_dtype: int, acc_dtype: int,
    threads: int, stream: int,
) -> None: ...
def lanczos_workspace_elems(
    B: int, m: int, k: int, steps: int, matfree: bool, cuda: bool, N: int, n: int, batch: int
) -> int: ...
def lanczos_topk(
    device: str, a: int, x: int, x_rstride: int, p: int, p_rstride: int, op_batch: int, N: int, d: int, n: int,
    bias: bool, in_dtype: int, B: int, m: int, k: int, steps: int, tol: float, seed: int, norm_group: int, v0: int, dtype: int,
    values: int, vectors: int, ritz: int, steps_out: int, anorm: int, true_residuals: int, workspace: int, threads: int, stream: int,
) -> None: ...
