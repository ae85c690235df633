// Tensor-core routes of the dense sensitivity blocks for bfloat16 inputs on CUDA (issue 9).
//
// Both compute the same blocks as sensitivity_blocks_cuda (sensitivity.h), with one extra rounding
// per term: a product of two bfloat16 values (exact in float32) is rounded once to bfloat16
// (round-to-nearest-even, relative error <= 2^-8) before it enters a float32-accumulated tensor-core
// product. Bound per element: |B_tc - B| <= 2^-8 sum_s |p[s, r] xt[s, i] xt[s, j]| + float32
// accumulation error (see tests/test_tensor_core_route.py for the rule the tests use).
//
// Design 1, sensitivity_blocks_mma_cuda: the fused kernel with bf16 WMMA (mma.sync m16n16k16,
//   sm_80+): per block r and upper-triangle tile (i-block, j-block), a GEMM with
//   A = round(p[:, r] .* Xt[:, i-block])^T and B = Xt[:, j-block]; out accumulated and mirrored.
// Design 2, sensitivity_pair_products_cuda: writes z[s, q] = round(xt[s, i] xt[s, j]) for the
//   upper-triangle pairs (i <= j) of the triangle rows i in [i0, i1) (row-major over the triangle),
//   so that C[r, q] = sum_s p[s, r] z[s, q] is one plain GEMM (torch.matmul / cuBLAS, in
//   topoderiv/ops.py), unpacked and mirrored there.
#pragma once
#include <string>
#include <vector>

#include "topoderiv/common.h"
#include "topoderiv/sensitivity.h"
#include "topoderiv/validate.h"

namespace topoderiv {

// Offset of triangle row i in the row-major upper triangle (with diagonal) of an m x m matrix:
// pair (i, j), i <= j, has index tri_offset(m, i) + (j - i); tri_offset(m, m) = m (m + 1) / 2.
inline int64_t tri_offset(int64_t m, int64_t i) { return i * m - i * (i - 1) / 2; }

struct PairProductsParams {
  int64_t N = 0;            // rows
  int64_t d = 0;            // features of x
  bool bias = true;         // xt = [x ; 1]: m = d + 1
  const void* x = nullptr;  // [N, d] bfloat16, element (s, i) at s * x_rstride + i
  int64_t x_rstride = 0;
  int64_t i0 = 0, i1 = 0;   // triangle rows [i0, i1), 0 <= i0 <= i1 <= m
  void* z = nullptr;        // [N, width()] bfloat16, contiguous; OVERWRITTEN
  DType in_dtype = DType::kBFloat16;
  void* stream = nullptr;
  int64_t m() const { return d + (bias ? 1 : 0); }
  int64_t width() const { return tri_offset(m(), i1) - tri_offset(m(), i0); }
};

#ifdef TOPODERIV_WITH_CUDA
// out [batch, n, m, m] float32 += blocks; in_dtype must be bfloat16, acc_dtype float32; needs a
// device of compute capability >= 8.0 (throws std::runtime_error otherwise).
void sensitivity_blocks_mma_cuda(const SensitivityBlocksParams& params);
void sensitivity_pair_products_cuda(const PairProductsParams& params);
#endif

// The tensor-core blocks: check_blocks_params plus bfloat16 in / float32 acc.
inline std::vector<Region> check_blocks_mma_params(const char* fn, const SensitivityBlocksParams& P,
                                                   int64_t x_bytes, int64_t p_bytes, int64_t out_bytes) {
  if (P.in_dtype != DType::kBFloat16 || P.acc_dtype != DType::kFloat32)
    fail(fn, std::string("in_dtype must be bfloat16 and acc_dtype float32 (tensor-core route), got ") +
                 validate_detail::dtype_str(P.in_dtype) + " and " + validate_detail::dtype_str(P.acc_dtype));
  return check_blocks_params(fn, P, true, x_bytes, p_bytes, out_bytes);
}

// Reads x [N, d] (bfloat16), writes z [N, width] (bfloat16).
inline std::vector<Region> check_pair_products_params(const char* fn, const PairProductsParams& P,
                                                      int64_t x_bytes, int64_t z_bytes) {
  using namespace validate_detail;
  non_negative(fn, "N", P.N);
  non_negative(fn, "d", P.d);
  non_negative(fn, "x_rstride", P.x_rstride);
  if (P.in_dtype != DType::kBFloat16) fail(fn, "in_dtype must be bfloat16, got " + dtype_str(P.in_dtype));
  const int64_t m = P.m();
  if (m < 1) fail(fn, "m = d + bias must be >= 1, got d = " + str(P.d) + " without bias");
  if (P.i0 < 0 || P.i0 > P.i1 || P.i1 > m)
    fail(fn, "triangle rows must satisfy 0 <= i0 <= i1 <= m = " + str(m) + ", got i0 = " + str(P.i0) +
                 ", i1 = " + str(P.i1));
  Regions R(fn);
  if (P.N > 0 && P.i1 > P.i0) {
    R.add("x", P.x, x_bytes, span_elems(fn, 1, P.N, P.d, P.x_rstride, 0), 2, false);
    R.add("z", P.z, z_bytes, mul(fn, P.N, P.width()), 2, true);
  }
  return R.finish();
}

}  // namespace topoderiv
