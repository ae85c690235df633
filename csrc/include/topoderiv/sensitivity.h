// Sensitivity blocks of the topological derivative (METHOD.md section 3 and 5).
//
//   B[b, r] = sum_s p[b, s, r] * xt[b, s] xt[b, s]^T ,   xt = [x ; 1] (bias) or x,   m = d + bias
//
// `b` runs over a batch of independent problems of identical shape (several candidate insertion
// points in one launch); `s` runs over the rows that are summed: samples, samples x tokens, or
// samples x pixels of im2col patches (a convolution is this op on a strided patch view).
#pragma once
#include "topoderiv/common.h"

namespace topoderiv {

struct SensitivityBlocksParams {
  int64_t batch = 1;  // independent problems
  int64_t N = 0;      // rows summed over
  int64_t d = 0;      // features of x
  int64_t n = 0;      // costate units = number of blocks
  bool bias = true;   // append a constant 1 feature: m = d + 1
  const void* x = nullptr;  // [batch, N, d] in_dtype; element (b,s,i) at b*x_bstride + s*x_rstride + i
  int64_t x_rstride = 0, x_bstride = 0;
  const void* p = nullptr;  // [batch, N, n] in_dtype; element (b,s,r) at b*p_bstride + s*p_rstride + r
  int64_t p_rstride = 0, p_bstride = 0;
  void* out = nullptr;      // [batch, n, m, m] acc_dtype, contiguous; ACCUMULATED into (out += B)
  DType in_dtype = DType::kFloat32;
  DType acc_dtype = DType::kFloat32;
  int num_threads = 1;      // CPU worker threads
  void* stream = nullptr;   // CUDA: cudaStream_t
  int64_t m() const { return d + (bias ? 1 : 0); }
};

// Matrix-free application of the blocks: out[b, r, :] = B[b, r] @ v[b, r, :], without forming B:
//   Y = Xt V^T  ([N, n]),   Z = P (.) Y,   out = Z^T Xt.
struct SensitivityMatvecParams {
  int64_t batch = 1, N = 0, d = 0, n = 0;
  bool bias = true;
  const void* x = nullptr;  // [batch, N, d] in_dtype, strides as above
  int64_t x_rstride = 0, x_bstride = 0;
  const void* p = nullptr;  // [batch, N, n] in_dtype
  int64_t p_rstride = 0, p_bstride = 0;
  const void* v = nullptr;  // [batch, n, m] acc_dtype, contiguous
  void* out = nullptr;      // [batch, n, m] acc_dtype, contiguous; OVERWRITTEN
  void* workspace = nullptr;  // CUDA only: [batch, N, n] acc_dtype (see matvec_workspace_elems)
  DType in_dtype = DType::kFloat32;
  DType acc_dtype = DType::kFloat32;
  int num_threads = 1;
  void* stream = nullptr;
  int64_t m() const { return d + (bias ? 1 : 0); }
};

// Elements of acc_dtype the CUDA matvec needs as workspace (the CPU path needs none).
inline int64_t matvec_workspace_elems(const SensitivityMatvecParams& p) { return p.batch * p.N * p.n; }

void sensitivity_blocks_cpu(const SensitivityBlocksParams& params);
void sensitivity_matvec_cpu(const SensitivityMatvecParams& params);
#ifdef TOPODERIV_WITH_CUDA
void sensitivity_blocks_cuda(const SensitivityBlocksParams& params);
void sensitivity_matvec_cuda(const SensitivityMatvecParams& params);
#endif

}  // namespace topoderiv
