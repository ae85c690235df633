// Tensor-core routes of the dense sensitivity blocks for bfloat16 inputs (contract:
// include/topoderiv/sensitivity_tc.h). Issue 9: "the dense route in bf16 reaches tensor-core speed";
// two designs, chosen by topoderiv/ops.py (dispatch rule + override), to be measured on a GPU.
//
// Design 1, blocks_mma_kernel (fused, WMMA bf16 m16n16k16 -> mma.sync, sm_80+):
//   Grid: (upper-triangle tile pair (ti <= tj) of the m x m block, group of R = 4 units r) x problem.
//   A block of 128 threads (4 warps, 2 x 2) owns a 64 x 64 output tile for each of its R units; each
//   warp a 32 x 32 sub-tile = 2 x 2 accumulator fragments per unit (float32). The rows s are walked
//   in chunks of 32: B_s[k][j] = xt[s0 + k, j0 + j] (exact in bf16) and, per unit,
//   A_s[rr][i][k] = bf16(p[s0 + k, r0 + rr] * xt[s0 + k, i0 + i]) (the one extra rounding) are staged
//   in shared memory, then every warp runs 2 (k-steps) x R x 2 x 2 mma_sync. Epilogue: per unit the
//   fragments go through shared memory and out[r, i, j] += v, out[r, j, i] += v for j >= i (in the
//   diagonal tiles j >= i only): one writer per element, no atomics, exactly symmetric, deterministic.
//   The fragments are only touched through load/mma/store/fill (never element-wise), so the host
//   emulator's WMMA shim (csrc/cuda/emulator/cuda_emulator.h) runs it unchanged.
//
// Design 2, pair_products_kernel: z[s, q] = bf16(xt[s, i] xt[s, j]) for the pairs q of the triangle
//   rows [i0, i1); grid: (32-row chunks of s) x (triangle rows i), each block writes its 32 x (m - i)
//   patch as coalesced runs. Memory bound; the GEMM that consumes z runs in cuBLAS (ops.py).
#include <cstdint>
#include <string>

#include "cuda_utils.cuh"  // first: defines TOPODERIV_WITH_CUDA for topoderiv/sensitivity_tc.h
#include "topoderiv/sensitivity_tc.h"

#ifndef TOPODERIV_CUDA_EMULATE
#include <cuda_bf16.h>
#include <mma.h>
#endif

namespace topoderiv {
namespace {

using namespace cuda_detail;
namespace wmma = nvcuda::wmma;

// bf16 tensor-core MMA needs sm_80+; older device passes compile the kernels to a trap (the host
// refuses to launch them there, see require_sm80).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define TD_TC_UNSUPPORTED_ARCH 1
#endif

// xt[s, i] as float: x[s, i] for i < d, 1 for the bias column i == d (< m), 0 outside [0, N) x [0, m).
__device__ __forceinline__ float xt_at(const bf16_raw* __restrict__ xb, int64_t rstride, int64_t s, int64_t i,
                                       int64_t N, int64_t d, int64_t m) {
  if (s >= N || i >= m) return 0.0f;
  if (i < d) return to_acc_f(xb[s * rstride + i]);
  return 1.0f;
}

// ------------------------------------------------------------------------------------------------
// Design 1: fused WMMA kernel.
// ------------------------------------------------------------------------------------------------
constexpr int kTcThreads = 128;         // 4 warps, 2 x 2 over the output tile
constexpr int kTcTile = 64;             // output tile (both dimensions)
constexpr int kTcK = 32;                // rows s per shared-memory chunk (2 MMA k-steps)
constexpr int kLdA = kTcK + 8;          // A_s[i][k] row pitch (bf16; multiple of 8, skews banks)
constexpr int kLdB = kTcTile + 8;       // B_s[k][j] row pitch (bf16)
constexpr int kLdC = kTcTile + 4;       // C_s[i][j] row pitch (float; multiple of 4)
constexpr int kTcR = 4;                 // units r per block

template <int R>
__global__ void __launch_bounds__(kTcThreads)
blocks_mma_kernel(const bf16_raw* __restrict__ x, int64_t x_rstride, int64_t x_bstride,
                  const bf16_raw* __restrict__ p, int64_t p_rstride, int64_t p_bstride,
                  float* __restrict__ out,  // [batch, n, m, m]
                  int64_t batch, int64_t N, int64_t d, int64_t n, int64_t m,
                  int64_t num_tiles, int64_t num_pairs, int64_t num_rgroups) {
#ifdef TD_TC_UNSUPPORTED_ARCH
  __trap();
#else
  // WMMA pointers must be 256-bit aligned: every fragment offset below is a multiple of 32 bytes.
  __shared__ __align__(32) __nv_bfloat16 a_s[R][kTcTile * kLdA];
  __shared__ __align__(32) __nv_bfloat16 b_s[kTcK * kLdB];
  __shared__ __align__(32) float c_s[kTcTile * kLdC];
  __shared__ float p_s[kTcK][R];

  const int tid = static_cast<int>(threadIdx.x);
  const int warp = tid / 32;
  const int wi = warp / 2, wj = warp % 2;  // the warp's 32 x 32 sub-tile
  const int64_t work = num_pairs * num_rgroups;

  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    const bf16_raw* xb = x + b * x_bstride;
    const bf16_raw* pb = p + b * p_bstride;
    for (int64_t item = blockIdx.x; item < work; item += gridDim.x) {
      const int64_t pair = item % num_pairs;
      const int64_t rg = item / num_pairs;
      int64_t ti = 0, rem = pair;  // pair -> (ti, tj), ti <= tj, row-major over the tile triangle
      while (rem >= num_tiles - ti) {
        rem -= num_tiles - ti;
        ++ti;
      }
      const int64_t tj = ti + rem;
      const int64_t i0 = ti * kTcTile, j0 = tj * kTcTile, r0 = rg * R;

      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[R][2][2];
#pragma unroll
      for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int w = 0; w < 2; ++w) wmma::fill_fragment(acc[rr][u][w], 0.0f);

      for (int64_t s0 = 0; s0 < N; s0 += kTcK) {
        __syncthreads();  // the previous chunk's fragments are loaded (and the previous epilogue done)
        for (int e = tid; e < kTcK * R; e += kTcThreads) {
          const int k = e / R, c = e % R;
          const int64_t s = s0 + k, r = r0 + c;
          p_s[k][c] = (s < N && r < n) ? to_acc_f(pb[s * p_rstride + r]) : 0.0f;
        }
        for (int e = tid; e < kTcK * kTcTile; e += kTcThreads) {
          const int k = e / kTcTile, j = e % kTcTile;  // consecutive threads: consecutive columns
          b_s[k * kLdB + j] = __float2bfloat16_rn(xt_at(xb, x_rstride, s0 + k, j0 + j, N, d, m));  // exact
        }
        __syncthreads();  // p_s ready
        for (int e = tid; e < kTcK * kTcTile; e += kTcThreads) {
          const int k = e / kTcTile, i = e % kTcTile;
          const float xv = xt_at(xb, x_rstride, s0 + k, i0 + i, N, d, m);
#pragma unroll
          for (int rr = 0; rr < R; ++rr) a_s[rr][i * kLdA + k] = __float2bfloat16_rn(p_s[k][rr] * xv);
        }
        __syncthreads();  // a_s, b_s ready
#pragma unroll 1  // keeps the fragments of one k-step live at a time (registers: accumulators first)
        for (int kk = 0; kk < kTcK; kk += 16) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> bf[2];
#pragma unroll
          for (int w = 0; w < 2; ++w) wmma::load_matrix_sync(bf[w], b_s + kk * kLdB + wj * 32 + 16 * w, kLdB);
#pragma unroll
          for (int rr = 0; rr < R; ++rr) {
#pragma unroll
            for (int u = 0; u < 2; ++u) {
              wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af;
              wmma::load_matrix_sync(af, a_s[rr] + (wi * 32 + 16 * u) * kLdA + kk, kLdA);
#pragma unroll
              for (int w = 0; w < 2; ++w) wmma::mma_sync(acc[rr][u][w], af, bf[w], acc[rr][u][w]);
            }
          }
        }
      }

      // Epilogue, one unit at a time through c_s: out[r, i, j] += v and out[r, j, i] += v.
      for (int rr = 0; rr < R; ++rr) {
        const int64_t r = r0 + rr;
        if (r >= n) break;  // uniform over the block
        __syncthreads();    // c_s is free (previous unit written out)
#pragma unroll
        for (int u = 0; u < 2; ++u)
#pragma unroll
          for (int w = 0; w < 2; ++w)
            wmma::store_matrix_sync(c_s + (wi * 32 + 16 * u) * kLdC + wj * 32 + 16 * w, acc[rr][u][w], kLdC,
                                    wmma::mem_row_major);
        __syncthreads();
        float* ob = out + (b * n + r) * m * m;
        for (int e = tid; e < kTcTile * kTcTile; e += kTcThreads) {
          const int il = e / kTcTile, jl = e % kTcTile;
          const int64_t i = i0 + il, j = j0 + jl;
          if (i >= m || j >= m || j < i) continue;  // j < i only in diagonal tiles
          const float v = c_s[il * kLdC + jl];
          ob[i * m + j] += v;
          if (j != i) ob[j * m + i] += v;
        }
      }
    }
  }
#endif
}

// Compute capability >= 8.0 of the current device (bf16 tensor cores), else a clear error.
void require_sm80(const char* op) {
  int dev = 0, major = 0;
  check_cuda(cudaGetDevice(&dev), op);
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), op);
  if (major < 8) {
    throw std::runtime_error(std::string(op) + ": the bfloat16 tensor-core route needs a GPU of compute "
                             "capability >= 8.0 (sm_80+), got sm_" + std::to_string(major) + "x");
  }
}

// ------------------------------------------------------------------------------------------------
// Design 2: pair products.
// ------------------------------------------------------------------------------------------------
constexpr int kPairThreads = 256;
constexpr int kPairRows = 32;  // rows s per block

__global__ void __launch_bounds__(kPairThreads)
pair_products_kernel(const bf16_raw* __restrict__ x, int64_t x_rstride, __nv_bfloat16* __restrict__ z,
                     int64_t N, int64_t d, int64_t m, int64_t i0, int64_t i1, int64_t width) {
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t base0 = i0 * m - i0 * (i0 - 1) / 2;
  for (int64_t i = i0 + blockIdx.y; i < i1; i += gridDim.y) {
    const int64_t len = m - i;                              // pairs (i, j), j in [i, m)
    const int64_t col0 = i * m - i * (i - 1) / 2 - base0;  // first column of row i in z
    for (int64_t s0 = static_cast<int64_t>(blockIdx.x) * kPairRows; s0 < N;
         s0 += static_cast<int64_t>(gridDim.x) * kPairRows) {
      const int rows = static_cast<int>(N - s0 < kPairRows ? N - s0 : kPairRows);
      const int L = static_cast<int>(len);  // m < 2^24 (host check): rows * L fits in int
      for (int e = tid; e < rows * L; e += kPairThreads) {
        const int64_t s = s0 + e / L, j = i + e % L;
        const float v = xt_at(x, x_rstride, s, i, N, d, m) * xt_at(x, x_rstride, s, j, N, d, m);  // exact
        z[s * width + col0 + (j - i)] = __float2bfloat16_rn(v);
      }
    }
  }
}

}  // namespace

void sensitivity_blocks_mma_cuda(const SensitivityBlocksParams& P) {
  const char* op = "sensitivity_blocks_mma_cuda";
  if (P.batch < 0 || P.N < 0 || P.d < 0 || P.n < 0) {
    fail(op, "sizes must be non-negative, got batch=" + std::to_string(P.batch) + " N=" + std::to_string(P.N) +
                 " d=" + std::to_string(P.d) + " n=" + std::to_string(P.n));
  }
  if (P.in_dtype != DType::kBFloat16 || P.acc_dtype != DType::kFloat32) {
    fail(op, std::string("in_dtype must be bfloat16 and acc_dtype float32, got ") + dtype_name(P.in_dtype) +
                 " and " + dtype_name(P.acc_dtype));
  }
  const int64_t m = P.m();
  if (P.batch == 0 || P.N == 0 || P.n == 0 || m == 0) return;
  if ((P.d > 0 && P.x == nullptr) || P.p == nullptr || P.out == nullptr) fail(op, "x, p and out must be non-null");
  const DeviceGuard guard(P.out, op);
  require_sm80(op);
  const int64_t num_tiles = ceil_div(m, kTcTile);
  const int64_t num_pairs = num_tiles * (num_tiles + 1) / 2;
  const int64_t num_rgroups = ceil_div(P.n, kTcR);
  const dim3 grid(grid_dim(num_pairs * num_rgroups, kMaxGridX), 1, grid_dim(P.batch, kMaxGridYZ));
  launch(op, blocks_mma_kernel<kTcR>, grid, dim3(kTcThreads), as_stream(P.stream),
         static_cast<const bf16_raw*>(P.x), P.x_rstride, P.x_bstride, static_cast<const bf16_raw*>(P.p),
         P.p_rstride, P.p_bstride, static_cast<float*>(P.out), P.batch, P.N, P.d, P.n, m, num_tiles, num_pairs,
         num_rgroups);
}

void sensitivity_pair_products_cuda(const PairProductsParams& P) {
  const char* op = "sensitivity_pair_products_cuda";
  if (P.N < 0 || P.d < 0) {
    fail(op, "sizes must be non-negative, got N=" + std::to_string(P.N) + " d=" + std::to_string(P.d));
  }
  if (P.in_dtype != DType::kBFloat16) fail(op, std::string("in_dtype must be bfloat16, got ") + dtype_name(P.in_dtype));
  const int64_t m = P.m();
  if (P.i0 < 0 || P.i0 > P.i1 || P.i1 > m) {
    fail(op, "triangle rows must satisfy 0 <= i0 <= i1 <= m = " + std::to_string(m) + ", got i0 = " +
                 std::to_string(P.i0) + ", i1 = " + std::to_string(P.i1));
  }
  if (m >= (int64_t{1} << 24)) fail(op, "m = d + bias must be < 2^24, got " + std::to_string(m));
  if (P.N == 0 || P.i1 == P.i0) return;
  if ((P.d > 0 && P.x == nullptr) || P.z == nullptr) fail(op, "x and z must be non-null");
  const DeviceGuard guard(P.z, op);
  const dim3 grid(grid_dim(ceil_div(P.N, kPairRows), kMaxGridX), grid_dim(P.i1 - P.i0, kMaxGridYZ), 1);
  launch(op, pair_products_kernel, grid, dim3(kPairThreads), as_stream(P.stream),
         static_cast<const bf16_raw*>(P.x), P.x_rstride, static_cast<__nv_bfloat16*>(P.z), P.N, P.d, m, P.i0,
         P.i1, P.width());
}

}  // namespace topoderiv
