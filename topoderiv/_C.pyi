"""Type stub of the compiled core (csrc/bindings.cpp).

Every pointer travels as ``(tensor.data_ptr(), span in bytes)`` (``(0, 0)`` for none): the bindings
check each kernel access against that span (csrc/include/topoderiv/validate.h) before any kernel
runs and raise ValueError otherwise.
"""
from typing import Any, Dict, Tuple, Union

Buf = Tuple[int, int]

def build_info() -> Dict[str, Any]: ...
def sensitivity_blocks(
    device: str, x: Buf, x_rstride: int, p: Buf, p_rstride: int, out: Buf, batch: int, N: int, d: int, n: int,
    x_bstride: int, p_bstride: int, bias: bool, in_dtype: int, acc_dtype: int, threads: int, stream: int,
) -> None: ...
def sensitivity_matvec(
    device: str, x: Buf, x_rstride: int, p: Buf, p_rstride: int, v: Buf, out: Buf, workspace: Buf, batch: int,
    N: int, d: int, n: int, x_bstride: int, p_bstride: int, bias: bool, in_dtype: int, acc_dtype: int,
    threads: int, stream: int,
) -> None: ...
def sensitivity_blocks_mma(
    device: str, x: Buf, x_rstride: int, p: Buf, p_rstride: int, out: Buf, batch: int, N: int, d: int, n: int,
    x_bstride: int, p_bstride: int, bias: bool, in_dtype: int, acc_dtype: int, stream: int,
) -> None: ...
def sensitivity_pair_products(
    device: str, x: Buf, x_rstride: int, z: Buf, N: int, d: int, bias: bool, i0: int, i1: int, in_dtype: int,
    stream: int,
) -> None: ...
def lanczos_workspace_elems(
    B: int, m: int, k: int, steps: int, matfree: bool, cuda: bool, N: int, n: int, batch: int
) -> int: ...
def lanczos_topk(
    device: str, a: Buf, x: Buf, x_rstride: int, p: Buf, p_rstride: int, op_batch: int, N: int, d: int, n: int,
    bias: bool, in_dtype: int, B: int, m: int, k: int, steps: int, tol: float, seed: int, norm_group: int, v0: Buf,
    dtype: int, values: Buf, vectors: Buf, ritz: Buf, steps_out: Buf, anorm: Buf, true_residuals: Buf, workspace: Buf,
    threads: int, stream: int, seed_period: int = 0, need: int = 0, early: Buf = (0, 0),
) -> None: ...

# x's shape [N, C, H, W] or the element strides of a 4-D tensor; or 5 entries: a batch of problems
# [batch, N, C, H, W] (the batch stride first)
Quad = Union[Tuple[int, int, int, int], Tuple[int, int, int, int, int]]

def conv_sensitivity_blocks(
    device: str, x: Buf, x_strides: Quad, p: Buf, p_strides: Quad, out: Buf, shape: Quad, n: int, kernel_size: int,
    padding: int, bias: bool, in_dtype: int, acc_dtype: int, threads: int, stream: int,
) -> None: ...
def conv_sensitivity_matvec(
    device: str, x: Buf, x_strides: Quad, p: Buf, p_strides: Quad, v: Buf, out: Buf, workspace: Buf, shape: Quad,
    n: int, kernel_size: int, padding: int, bias: bool, in_dtype: int, acc_dtype: int, threads: int, stream: int,
) -> None: ...
def conv_lanczos_topk(
    device: str, x: Buf, x_strides: Quad, p: Buf, p_strides: Quad, shape: Quad, n: int, kernel_size: int,
    padding: int, bias: bool, in_dtype: int, m: int, k: int, steps: int, tol: float, seed: int, norm_group: int,
    v0: Buf, dtype: int, values: Buf, vectors: Buf, ritz: Buf, steps_out: Buf, anorm: Buf, true_residuals: Buf,
    workspace: Buf, threads: int, stream: int, need: int = 0, early: Buf = (0, 0),
) -> None: ...
