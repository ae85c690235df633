// The register tiles of the sensitivity kernels, shared by the rows (sensitivity_cuda.cu) and the
// convolution patches (conv_sensitivity_cuda.cu). The two differ only in how they stage a tile of
// rows x features in shared memory (rows: strided loads of x; patches: through PatchAddress); what
// consumes the staged tiles is the same and lives here once: the blocks kernels' tile-pair walk,
// multiply-adds and symmetric epilogue, the matvec GEMMs' 4 x 4 micro tiles and stores, the row
// split of the second matvec GEMM, the tile configuration and dtype dispatch of the entry points.
// Device pieces are __forceinline__: each kernel compiles to what its own copy was.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda_utils.cuh"  // first: defines TOPODERIV_WITH_CUDA
#include "topoderiv/common.h"

namespace topoderiv {
namespace cuda_detail {

// ------------------------------------------------------------------------------------------------
// Blocks: TM x TM tiles of the m x m block for R units at a time, rows staged KS at a time, each of
// the 16 x 16 threads owning an MT x MT micro tile (MT = TM / 16) per unit, strided by 16.

// Tile configuration for m: f(TM, R) with TM = 16 (R = 16) for m <= 16, TM = 32 (R = 8) for
// m <= 32, TM = 64 (R = 4) otherwise (as std::integral_constant arguments).
template <class F>
void with_blocks_config(int64_t m, F f) {
  using std::integral_constant;
  if (m <= 16) {
    f(integral_constant<int, 16>{}, integral_constant<int, 16>{});
  } else if (m <= 32) {
    f(integral_constant<int, 32>{}, integral_constant<int, 8>{});
  } else {
    f(integral_constant<int, 64>{}, integral_constant<int, 4>{});
  }
}

// pair -> (ti, tj), ti <= tj: row-major over the upper triangle of the num_tiles x num_tiles grid.
__device__ __forceinline__ void tile_pair(int64_t pair, int64_t num_tiles, int64_t& ti, int64_t& tj) {
  int64_t t = 0, rem = pair;
  while (rem >= num_tiles - t) {
    rem -= num_tiles - t;
    ++t;
  }
  ti = t;
  tj = t + rem;
}

template <typename Acc, int R, int MT>
__device__ __forceinline__ void blocks_zero(Acc (&acc)[R][MT][MT]) {
#pragma unroll
  for (int rr = 0; rr < R; ++rr)
#pragma unroll
    for (int u = 0; u < MT; ++u)
#pragma unroll
      for (int w = 0; w < MT; ++w) acc[rr][u][w] = Acc(0);
}

// Over one staged chunk: acc[rr][u][w] += sum_kk xi[kk][ty + 16 u] * p[kk][rr] * xj[kk][tx + 16 w].
template <typename Acc, int KS, int TM, int R>
__device__ __forceinline__ void blocks_fma(const Acc (&xi_s)[KS][TM], const Acc (&xj_s)[KS][TM],
                                           const Acc (&p_s)[KS][R], int ty, int tx,
                                           Acc (&acc)[R][TM / 16][TM / 16]) {
  constexpr int MT = TM / 16;
#pragma unroll 2
  for (int kk = 0; kk < KS; ++kk) {
    Acc a[MT], bj[MT];
#pragma unroll
    for (int u = 0; u < MT; ++u) a[u] = xi_s[kk][ty + 16 * u];
#pragma unroll
    for (int w = 0; w < MT; ++w) bj[w] = xj_s[kk][tx + 16 * w];
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const Acc pr = p_s[kk][rr];
#pragma unroll
      for (int u = 0; u < MT; ++u) {
        const Acc t = a[u] * pr;
#pragma unroll
        for (int w = 0; w < MT; ++w) acc[rr][u][w] += t * bj[w];
      }
    }
  }
}

// Epilogue of tile (i0, j0) for units r0 + rr < n: out[rbase + r, i, j] += v and out[rbase + r, j, i]
// += v (same v) for j >= i (j < i only happens in diagonal tiles); one writer per element.
template <typename Acc, int TM, int R>
__device__ __forceinline__ void blocks_epilogue(const Acc (&acc)[R][TM / 16][TM / 16], Acc* __restrict__ out,
                                                int64_t rbase, int64_t r0, int64_t n, int64_t m, int64_t i0,
                                                int64_t j0, int ty, int tx) {
  constexpr int MT = TM / 16;
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int64_t r = r0 + rr;
    if (r >= n) continue;
    Acc* ob = out + (rbase + r) * m * m;
#pragma unroll
    for (int u = 0; u < MT; ++u) {
      const int64_t i = i0 + ty + 16 * u;
      if (i >= m) continue;
#pragma unroll
      for (int w = 0; w < MT; ++w) {
        const int64_t j = j0 + tx + 16 * w;
        if (j >= m || j < i) continue;
        const Acc v = acc[rr][u][w];
        ob[i * m + j] += v;
        if (j != i) ob[j * m + i] += v;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Matrix-free application: two GEMMs in 64 x 64 output tiles, 4 x 4 per thread, reduction chunks of 16.
constexpr int kGT = 64;  // GEMM output tile (both dimensions)
constexpr int kGK = 16;  // GEMM reduction chunk
constexpr int64_t kMinSplitRows = 1024;  // second GEMM: fewest rows per split of the sum over rows

// Over one staged chunk: acc[u][w] += sum_k a[k][ty + 16 u] * b[k][tx + 16 w].
template <typename Acc, int LD>
__device__ __forceinline__ void tile_fma(const Acc (&a)[kGK][LD], const Acc (&b)[kGK][LD], int ty, int tx,
                                         Acc (&acc)[4][4]) {
#pragma unroll
  for (int k = 0; k < kGK; ++k) {
    Acc av[4], bv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) av[u] = a[k][ty + 16 * u];
#pragma unroll
    for (int w = 0; w < 4; ++w) bv[w] = b[k][tx + 16 * w];
#pragma unroll
    for (int u = 0; u < 4; ++u)
#pragma unroll
      for (int w = 0; w < 4; ++w) acc[u][w] += av[u] * bv[w];
  }
}

template <typename Acc>
__device__ __forceinline__ void tile_zero(Acc (&acc)[4][4]) {
#pragma unroll
  for (int u = 0; u < 4; ++u)
#pragma unroll
    for (int w = 0; w < 4; ++w) acc[u][w] = Acc(0);
}

// First GEMM's store: y[s, r] = acc for the tile (s0, r0), s < rows, r < n (y row-major [rows, n]).
template <typename Acc>
__device__ __forceinline__ void store_y_tile(const Acc (&acc)[4][4], Acc* __restrict__ y, int64_t s0, int64_t r0,
                                             int64_t rows, int64_t n, int ty, int tx) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t s = s0 + ty + 16 * u;
    if (s >= rows) continue;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t r = r0 + tx + 16 * w;
      if (r < n) y[s * n + r] = acc[u][w];
    }
  }
}

// Second GEMM's store: out[r, i] = acc (splits == 1) or += acc atomically (splits > 1) for the tile
// (r0, i0), r < n, i < m (out row-major [n, m]).
template <typename Acc>
__device__ __forceinline__ void store_out_tile(const Acc (&acc)[4][4], Acc* __restrict__ out, int64_t r0,
                                               int64_t i0, int64_t n, int64_t m, int64_t splits, int ty, int tx) {
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    const int64_t r = r0 + ty + 16 * u;
    if (r >= n) continue;
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t i = i0 + tx + 16 * w;
      if (i >= m) continue;
      if (splits == 1) {
        out[r * m + i] = acc[u][w];
      } else {
        atomicAdd(out + r * m + i, acc[u][w]);
      }
    }
  }
}

// Streaming multiprocessors of the current device (for grid sizing only; 1 if unknown).
inline int64_t num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1) {
    (void)cudaGetLastError();  // clear, this is only a sizing hint
    return 1;
  }
  return sms;
}

// The second GEMM sums over all `rows` into `out_tiles` output tiles (all problems). When they cannot
// fill the GPU (fewer than 2 per SM) the rows are split into ranges of >= kMinSplitRows (multiples
// of kGK) whose partial sums are added atomically: splits > 1, out must be zeroed first, and the
// result is not bitwise reproducible. Otherwise splits = 1 and split_rows = rows.
struct RowSplit {
  int64_t splits = 1, split_rows = 0;
};
inline RowSplit row_split(int64_t rows, int64_t out_tiles) {
  const int64_t target = 2 * num_sms();
  int64_t splits = 1;
  if (out_tiles < target) {
    splits = ceil_div(target, out_tiles);
    const int64_t max_splits = rows / kMinSplitRows > 1 ? rows / kMinSplitRows : 1;
    splits = splits < max_splits ? splits : max_splits;
  }
  RowSplit s;
  s.split_rows = ceil_div(ceil_div(rows, splits), kGK) * kGK;
  s.splits = ceil_div(rows, s.split_rows);  // no empty split
  if (s.splits == 1) s.split_rows = rows;
  return s;
}

// ------------------------------------------------------------------------------------------------
// Entry points.

// Accumulation dtype the CUDA kernels use for an input dtype.
inline DType cuda_acc_for(DType in) { return in == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

inline void check_cuda_dtypes(const char* op, DType in, DType acc) {
  if (in != DType::kFloat32 && in != DType::kFloat64 && in != DType::kBFloat16) {
    fail(op, std::string("in_dtype must be float32, float64 or bfloat16, got ") + dtype_name(in));
  }
  if (acc != cuda_acc_for(in)) {
    fail(op, std::string("on CUDA, in_dtype ") + dtype_name(in) + " needs acc_dtype " +
                 dtype_name(cuda_acc_for(in)) + ", got " + dtype_name(acc));
  }
}

// f(Tin{}, Acc{}) for in (checked by check_cuda_dtypes): (float, float), (double, double) or
// (bf16_raw, float).
template <class F>
void with_cuda_dtypes(DType in, F f) {
  switch (in) {
    case DType::kFloat32: f(float{}, float{}); break;
    case DType::kFloat64: f(double{}, double{}); break;
    case DType::kBFloat16: f(bf16_raw{}, float{}); break;
  }
}

}  // namespace cuda_detail
}  // namespace topoderiv
