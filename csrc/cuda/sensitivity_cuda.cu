// CUDA twins of csrc/cpu/sensitivity_cpu.cpp (contract: include/topoderiv/sensitivity.h).
//
// sensitivity_blocks_cuda:  out[b, r] += sum_s p[b, s, r] * xt[b, s] xt[b, s]^T   (xt = [x ; 1])
//   One fused SIMT kernel; never materialises the [N, n, m] intermediate. Grid: (upper-triangle tile
//   pair (ti <= tj) of the m x m block) x (group of R units r) x (problem b). A block of 256 threads
//   (16 x 16) keeps a TM x TM tile of accumulators for each of its R units in registers (each thread
//   a (TM/16) x (TM/16) micro tile per unit, strided by 16 so shared-memory reads are conflict
//   free), and loops over s in chunks of KS rows, staging xt[s, i-tile], xt[s, j-tile] and
//   p[s, r-group] in shared memory. Symmetry: only tiles with tj >= ti are computed; every computed
//   value is added to both (i, j) and (j, i) (in diagonal tiles only j >= i is taken), so out stays
//   exactly symmetric if it was. Each output element has exactly one writer: no atomics, the result
//   is deterministic. Tile configurations: TM = 16 (R = 16) for m <= 16, TM = 32 (R = 8) for
//   m <= 32, TM = 64 (R = 4) otherwise.
//
// sensitivity_matvec_cuda:  out[b, r, :] = B[b, r] @ v[b, r, :] without forming B:
//   kernel 1: Y[b] = Xt[b] V[b]^T   ([N, n], into params.workspace, acc dtype), 64 x 64 tiles;
//   kernel 2: out[b] = (P[b] .* Y[b])^T Xt[b]   ([n, m]), the product with P fused into the load.
//   Both: 256 threads, 64 x 64 output tile, 4 x 4 micro tile per thread, reduction chunks of 16.
//   Kernel 2 sums over all N rows into a small output; when its tiles cannot fill the GPU (fewer
//   than 2 per SM) the rows are split into ranges of >= 1024 whose partials are atomically added
//   (out zeroed first): fast, but then not bitwise reproducible run to run. Otherwise each output
//   element has one writer and the result is deterministic.
//
// Input dtypes: float32, float64, bfloat16 (read as raw 16-bit patterns, converted exactly to
// float32). Accumulation: float32 for float32/bfloat16 inputs, float64 for float64 inputs.
#include <cstdint>
#include <string>

#include "cuda_utils.cuh"  // first: defines TOPODERIV_WITH_CUDA for topoderiv/sensitivity.h
#include "sensitivity_tiles.cuh"
#include "topoderiv/sensitivity.h"

namespace topoderiv {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;  // 16 x 16, 1-D block; tx = tid % 16, ty = tid / 16

// xt[s, i] of one problem: x[s, i] for i < d, 1 for the bias column i == d (< m), 0 outside
// [0, N) x [0, m) (tile padding).
template <typename Acc, typename Tin>
__device__ __forceinline__ Acc load_xt(const Tin* __restrict__ xb, int64_t rstride, int64_t s,
                                       int64_t i, int64_t N, int64_t d, int64_t m) {
  if (s >= N || i >= m) return Acc(0);
  if (i < d) return static_cast<Acc>(to_acc_f(xb[s * rstride + i]));
  return Acc(1);
}

// ------------------------------------------------------------------------------------------------
// Dense blocks.
// ------------------------------------------------------------------------------------------------
// fp32: cap registers at 128 so that two blocks fit on an SM; fp64 needs 128 for the accumulators.
template <typename Tin, typename Acc, int TM, int R>
__global__ void __launch_bounds__(kThreads, sizeof(Acc) == 4 ? 2 : 1)
blocks_kernel(const Tin* __restrict__ x, int64_t x_rstride, int64_t x_bstride,
              const Tin* __restrict__ p, int64_t p_rstride, int64_t p_bstride,
              Acc* __restrict__ out,  // [batch, n, m, m]
              int64_t batch, int64_t N, int64_t d, int64_t n, int64_t m,
              int64_t num_tiles,    // ceil(m / TM)
              int64_t num_pairs,    // num_tiles * (num_tiles + 1) / 2
              int64_t num_rgroups)  // ceil(n / R)
{
  constexpr int KS = 16;       // rows s per shared-memory chunk
  constexpr int MT = TM / 16;  // micro tile per thread
  static_assert(TM % 16 == 0, "TM must be a multiple of 16");
  __shared__ Acc xi_s[KS][TM];  // xt[s0 + kk, i0 + c]
  __shared__ Acc xj_s[KS][TM];  // xt[s0 + kk, j0 + c]
  __shared__ Acc p_s[KS][R];    // p[s0 + kk, r0 + c]

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t work = num_pairs * num_rgroups;

  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    const Tin* xb = x + b * x_bstride;
    const Tin* pb = p + b * p_bstride;
    for (int64_t item = blockIdx.x; item < work; item += gridDim.x) {
      const int64_t pair = item % num_pairs;
      const int64_t rg = item / num_pairs;
      int64_t ti, tj;
      tile_pair(pair, num_tiles, ti, tj);
      const int64_t i0 = ti * TM, j0 = tj * TM, r0 = rg * R;

      Acc acc[R][MT][MT];
      blocks_zero(acc);

      for (int64_t s0 = 0; s0 < N; s0 += KS) {
        __syncthreads();  // the previous chunk (or item) is no longer being read
        for (int e = tid; e < KS * TM; e += kThreads) {
          const int kk = e / TM, c = e % TM;
          xi_s[kk][c] = load_xt<Acc>(xb, x_rstride, s0 + kk, i0 + c, N, d, m);
          xj_s[kk][c] = load_xt<Acc>(xb, x_rstride, s0 + kk, j0 + c, N, d, m);
        }
        for (int e = tid; e < KS * R; e += kThreads) {
          const int kk = e / R, c = e % R;
          const int64_t s = s0 + kk, r = r0 + c;
          p_s[kk][c] = (s < N && r < n) ? static_cast<Acc>(to_acc_f(pb[s * p_rstride + r])) : Acc(0);
        }
        __syncthreads();
        blocks_fma(xi_s, xj_s, p_s, ty, tx, acc);
      }
      blocks_epilogue<Acc, TM, R>(acc, out, b * n, r0, n, m, i0, j0, ty, tx);
    }
  }
}

template <typename Tin, typename Acc, int TM, int R>
void launch_blocks(const SensitivityBlocksParams& P) {
  const int64_t m = P.m();
  const int64_t num_tiles = ceil_div(m, TM);
  const int64_t num_pairs = num_tiles * (num_tiles + 1) / 2;
  const int64_t num_rgroups = ceil_div(P.n, R);
  const dim3 grid(grid_dim(num_pairs * num_rgroups, kMaxGridX), 1, grid_dim(P.batch, kMaxGridYZ));
  launch("sensitivity_blocks_cuda", blocks_kernel<Tin, Acc, TM, R>, grid, dim3(kThreads),
         as_stream(P.stream), static_cast<const Tin*>(P.x), P.x_rstride, P.x_bstride,
         static_cast<const Tin*>(P.p), P.p_rstride, P.p_bstride, static_cast<Acc*>(P.out), P.batch,
         P.N, P.d, P.n, m, num_tiles, num_pairs, num_rgroups);
}

template <typename Tin, typename Acc>
void dispatch_blocks(const SensitivityBlocksParams& P) {
  with_blocks_config(P.m(), [&](auto tm, auto r) { launch_blocks<Tin, Acc, decltype(tm)::value, decltype(r)::value>(P); });
}

// ------------------------------------------------------------------------------------------------
// Matrix-free application.
// ------------------------------------------------------------------------------------------------
// Y[b, s, r] = sum_i xt[b, s, i] * v[b, r, i].  Grid: x = s tiles, y = r tiles, z = problems.
template <typename Tin, typename Acc>
__global__ void __launch_bounds__(kThreads)
matvec_y_kernel(const Tin* __restrict__ x, int64_t x_rstride, int64_t x_bstride,
                const Acc* __restrict__ v,  // [batch, n, m]
                Acc* __restrict__ y,        // [batch, N, n]
                int64_t batch, int64_t N, int64_t d, int64_t n, int64_t m) {
  __shared__ Acc xs[kGK][kGT + 1];  // xs[k][sl] = xt[s0 + sl, k0 + k]
  __shared__ Acc vs[kGK][kGT + 1];  // vs[k][rl] = v[r0 + rl, k0 + k]
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  const int64_t s_tiles = ceil_div(N, kGT), r_tiles = ceil_div(n, kGT);

  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    const Tin* xb = x + b * x_bstride;
    const Acc* vb = v + b * n * m;
    Acc* yb = y + b * N * n;
    for (int64_t st = blockIdx.x; st < s_tiles; st += gridDim.x) {
      for (int64_t rt = blockIdx.y; rt < r_tiles; rt += gridDim.y) {
        const int64_t s0 = st * kGT, r0 = rt * kGT;
        Acc acc[4][4];
        tile_zero(acc);

        for (int64_t k0 = 0; k0 < m; k0 += kGK) {
          __syncthreads();
          for (int e = tid; e < kGT * kGK; e += kThreads) {
            const int rowl = e / kGK, k = e % kGK;
            xs[k][rowl] = load_xt<Acc>(xb, x_rstride, s0 + rowl, k0 + k, N, d, m);
            const int64_t r = r0 + rowl, i = k0 + k;
            vs[k][rowl] = (r < n && i < m) ? vb[r * m + i] : Acc(0);
          }
          __syncthreads();
          tile_fma(xs, vs, ty, tx, acc);
        }
        store_y_tile(acc, yb, s0, r0, N, n, ty, tx);
      }
    }
  }
}

// out[b, r, i] = sum_s p[b, s, r] * Y[b, s, r] * xt[b, s, i].  Grid: x = i tiles, y = r tiles,
// z = (problem, split) pairs. With splits == 1 each block owns its output tile and overwrites it
// (deterministic). With splits > 1 (only when the output is too small to fill the GPU) split q sums
// the rows [q * split_rows, (q + 1) * split_rows) and atomically adds into out, which the host
// zeroed first.
template <typename Tin, typename Acc>
__global__ void __launch_bounds__(kThreads)
matvec_out_kernel(const Tin* __restrict__ x, int64_t x_rstride, int64_t x_bstride,
                  const Tin* __restrict__ p, int64_t p_rstride, int64_t p_bstride,
                  const Acc* __restrict__ y,  // [batch, N, n]
                  Acc* __restrict__ out,      // [batch, n, m]
                  int64_t batch, int64_t N, int64_t d, int64_t n, int64_t m, int64_t splits,
                  int64_t split_rows) {
  __shared__ Acc zs[kGK][kGT];  // zs[k][rl] = p[s0 + k, r0 + rl] * Y[s0 + k, r0 + rl]
  __shared__ Acc xs[kGK][kGT];  // xs[k][il] = xt[s0 + k, i0 + il]
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  const int64_t i_tiles = ceil_div(m, kGT), r_tiles = ceil_div(n, kGT);

  for (int64_t bq = blockIdx.z; bq < batch * splits; bq += gridDim.z) {
    const int64_t b = bq / splits, q = bq % splits;
    const int64_t s_begin = q * split_rows;
    const int64_t s_end = s_begin + split_rows < N ? s_begin + split_rows : N;
    const Tin* xb = x + b * x_bstride;
    const Tin* pb = p + b * p_bstride;
    const Acc* yb = y + b * N * n;
    Acc* ob = out + b * n * m;
    for (int64_t it = blockIdx.x; it < i_tiles; it += gridDim.x) {
      for (int64_t rt = blockIdx.y; rt < r_tiles; rt += gridDim.y) {
        const int64_t i0 = it * kGT, r0 = rt * kGT;
        Acc acc[4][4];
        tile_zero(acc);

        for (int64_t s0 = s_begin; s0 < s_end; s0 += kGK) {
          __syncthreads();
          for (int e = tid; e < kGK * kGT; e += kThreads) {
            const int k = e / kGT, col = e % kGT;
            const int64_t s = s0 + k, r = r0 + col;
            zs[k][col] = (s < s_end && r < n)
                             ? static_cast<Acc>(to_acc_f(pb[s * p_rstride + r])) * yb[s * n + r]
                             : Acc(0);
            xs[k][col] = load_xt<Acc>(xb, x_rstride, s, i0 + col, s_end, d, m);
          }
          __syncthreads();
          tile_fma(zs, xs, ty, tx, acc);
        }
        store_out_tile(acc, ob, r0, i0, n, m, splits, ty, tx);
      }
    }
  }
}

template <typename Tin, typename Acc>
void run_matvec(const SensitivityMatvecParams& P) {
  const int64_t m = P.m();
  const cudaStream_t stream = as_stream(P.stream);
  Acc* y = static_cast<Acc*>(P.workspace);
  const dim3 grid1(grid_dim(ceil_div(P.N, kGT), kMaxGridX), grid_dim(ceil_div(P.n, kGT), kMaxGridYZ),
                   grid_dim(P.batch, kMaxGridYZ));
  launch("sensitivity_matvec_cuda", matvec_y_kernel<Tin, Acc>, grid1, dim3(kThreads), stream,
         static_cast<const Tin*>(P.x), P.x_rstride, P.x_bstride, static_cast<const Acc*>(P.v), y,
         P.batch, P.N, P.d, P.n, m);
  // Second GEMM: its output [batch, n, m] can be far too small to fill the GPU while the sum runs
  // over N rows; then the rows are split into ranges added atomically (row_split).
  const RowSplit split = row_split(P.N, ceil_div(m, kGT) * ceil_div(P.n, kGT) * P.batch);
  const int64_t splits = split.splits, split_rows = split.split_rows;
  if (splits > 1) {
    check_cuda(cudaMemsetAsync(P.out, 0, static_cast<size_t>(P.batch * P.n * m) * sizeof(Acc), stream),
               "sensitivity_matvec_cuda");
  }
  const dim3 grid2(grid_dim(ceil_div(m, kGT), kMaxGridX), grid_dim(ceil_div(P.n, kGT), kMaxGridYZ),
                   grid_dim(P.batch * splits, kMaxGridYZ));
  launch("sensitivity_matvec_cuda", matvec_out_kernel<Tin, Acc>, grid2, dim3(kThreads), stream,
         static_cast<const Tin*>(P.x), P.x_rstride, P.x_bstride, static_cast<const Tin*>(P.p),
         P.p_rstride, P.p_bstride, static_cast<const Acc*>(y), static_cast<Acc*>(P.out), P.batch,
         P.N, P.d, P.n, m, splits, split_rows);
}

void check_sizes(const char* op, int64_t batch, int64_t N, int64_t d, int64_t n) {
  if (batch < 0 || N < 0 || d < 0 || n < 0) {
    fail(op, "sizes must be non-negative, got batch=" + std::to_string(batch) + " N=" +
                 std::to_string(N) + " d=" + std::to_string(d) + " n=" + std::to_string(n));
  }
}

}  // namespace

void sensitivity_blocks_cuda(const SensitivityBlocksParams& params) {
  const char* op = "sensitivity_blocks_cuda";
  check_sizes(op, params.batch, params.N, params.d, params.n);
  check_cuda_dtypes(op, params.in_dtype, params.acc_dtype);
  const int64_t m = params.m();
  // Nothing to add (N == 0) or nothing to write.
  if (params.batch == 0 || params.N == 0 || params.n == 0 || m == 0) return;
  if ((params.d > 0 && params.x == nullptr) || params.p == nullptr || params.out == nullptr) {
    fail(op, "x, p and out must be non-null");
  }
  const DeviceGuard guard(params.out, op);
  with_cuda_dtypes(params.in_dtype, [&](auto tin, auto acc) { dispatch_blocks<decltype(tin), decltype(acc)>(params); });
}

void sensitivity_matvec_cuda(const SensitivityMatvecParams& params) {
  const char* op = "sensitivity_matvec_cuda";
  check_sizes(op, params.batch, params.N, params.d, params.n);
  check_cuda_dtypes(op, params.in_dtype, params.acc_dtype);
  const int64_t m = params.m();
  if (params.batch == 0 || params.n == 0 || m == 0) return;  // out is empty
  if (params.out == nullptr) fail(op, "out must be non-null");
  const DeviceGuard guard(params.out, op);
  if (params.N == 0) {  // B == 0, so out = 0
    const size_t bytes = static_cast<size_t>(params.batch * params.n * m) *
                         (params.acc_dtype == DType::kFloat64 ? sizeof(double) : sizeof(float));
    check_cuda(cudaMemsetAsync(params.out, 0, bytes, as_stream(params.stream)), op);
    return;
  }
  if ((params.d > 0 && params.x == nullptr) || params.p == nullptr || params.v == nullptr) {
    fail(op, "x, p and v must be non-null");
  }
  if (params.workspace == nullptr) {
    fail(op, "workspace must be non-null (matvec_workspace_elems(params) elements of acc_dtype)");
  }
  with_cuda_dtypes(params.in_dtype, [&](auto tin, auto acc) { run_matvec<decltype(tin), decltype(acc)>(params); });
}

}  // namespace topoderiv
