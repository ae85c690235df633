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
      // pair -> (ti, tj), ti <= tj, row-major over the upper triangle of the tile grid.
      int64_t ti = 0, rem = pair;
      while (rem >= num_tiles - ti) {
        rem -= num_tiles - ti;
        ++ti;
      }
      const int64_t tj = ti + rem;
      const int64_t i0 = ti * TM, j0 = tj * TM, r0 = rg * R;

      Acc acc[R][MT][MT];
#pragma unroll
      for (int rr = 0; rr < R; ++rr)
#pragma unroll
        for (int u = 0; u < MT; ++u)
#pragma unroll
          for (int w = 0; w < MT; ++w) acc[rr][u][w] = Acc(0);

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

      // Epilogue: out[b, r, i, j] += v and out[b, r, j, i] += v (same v), one writer per element.
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        const int64_t r = r0 + rr;
        if (r >= n) continue;
        Acc* ob = out + (b * n + r) * m * m;
#pragma unroll
        for (int u = 0; u < MT; ++u) {
          const int64_t i = i0 + ty + 16 * u;
          if (i >= m) continue;
#pragma unroll
          for (int w = 0; w < MT; ++w) {
            const int64_t j = j0 + tx + 16 * w;
            if (j >= m || j < i) continue;  // j < i only happens in diagonal tiles
            const Acc v = acc[rr][u][w];
            ob[i * m + j] += v;
            if (j != i) ob[j * m + i] += v;
          }
        }
      }
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
  const int64_t m = P.m();
  if (m <= 16) {
    launch_blocks<Tin, Acc, 16, 16>(P);
  } else if (m <= 32) {
    launch_blocks<Tin, Acc, 32, 8>(P);
  } else {
    launch_blocks<Tin, Acc, 64, 4>(P);
  }
}

// ------------------------------------------------------------------------------------------------
// Matrix-free application.
// ------------------------------------------------------------------------------------------------
constexpr int kGT = 64;  // GEMM output tile (both dimensions)
constexpr int kGK = 16;  // GEMM reduction chunk
constexpr int64_t kMinSplitRows = 1024;  // second GEMM: fewest rows per split of the sum over N

// The 4 x 4 register tile of the two matvec GEMMs (16 x 16 threads, a 64 x 64 output tile): over
// one staged chunk, acc[u][w] += sum_k a[k][ty + 16 u] * b[k][tx + 16 w].
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

// Streaming multiprocessors of the current device (for grid sizing only; 1 if unknown).
int64_t num_sms() {
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms < 1) {
    (void)cudaGetLastError();  // clear, this is only a sizing hint
    return 1;
  }
  return sms;
}

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
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t s = s0 + ty + 16 * u;
          if (s >= N) continue;
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const int64_t r = r0 + tx + 16 * w;
            if (r < n) yb[s * n + r] = acc[u][w];
          }
        }
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
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int64_t r = r0 + ty + 16 * u;
          if (r >= n) continue;
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const int64_t i = i0 + tx + 16 * w;
            if (i >= m) continue;
            if (splits == 1) {
              ob[r * m + i] = acc[u][w];
            } else {
              atomicAdd(ob + r * m + i, acc[u][w]);
            }
          }
        }
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
  // over N rows; then split the rows into a few ranges (at least kMinSplitRows each) whose partial
  // sums are added atomically (the result is then not bitwise reproducible run to run).
  const int64_t tiles2 = ceil_div(m, kGT) * ceil_div(P.n, kGT) * P.batch;
  const int64_t target = 2 * num_sms();
  int64_t splits = 1;
  if (tiles2 < target) {
    splits = ceil_div(target, tiles2);
    const int64_t max_splits = P.N / kMinSplitRows > 1 ? P.N / kMinSplitRows : 1;
    splits = splits < max_splits ? splits : max_splits;
  }
  int64_t split_rows = ceil_div(ceil_div(P.N, splits), kGK) * kGK;
  splits = ceil_div(P.N, split_rows);  // no empty split
  if (splits > 1) {
    check_cuda(cudaMemsetAsync(P.out, 0, static_cast<size_t>(P.batch * P.n * m) * sizeof(Acc), stream),
               "sensitivity_matvec_cuda");
  } else {
    split_rows = P.N;
  }
  const dim3 grid2(grid_dim(ceil_div(m, kGT), kMaxGridX), grid_dim(ceil_div(P.n, kGT), kMaxGridYZ),
                   grid_dim(P.batch * splits, kMaxGridYZ));
  launch("sensitivity_matvec_cuda", matvec_out_kernel<Tin, Acc>, grid2, dim3(kThreads), stream,
         static_cast<const Tin*>(P.x), P.x_rstride, P.x_bstride, static_cast<const Tin*>(P.p),
         P.p_rstride, P.p_bstride, static_cast<const Acc*>(y), static_cast<Acc*>(P.out), P.batch,
         P.N, P.d, P.n, m, splits, split_rows);
}

// Accumulation dtype the CUDA kernels use for an input dtype.
DType cuda_acc_for(DType in) { return in == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

void check_dtypes(const char* op, DType in, DType acc) {
  if (in != DType::kFloat32 && in != DType::kFloat64 && in != DType::kBFloat16) {
    fail(op, std::string("in_dtype must be float32, float64 or bfloat16, got ") + dtype_name(in));
  }
  if (acc != cuda_acc_for(in)) {
    fail(op, std::string("on CUDA, in_dtype ") + dtype_name(in) + " needs acc_dtype " +
                 dtype_name(cuda_acc_for(in)) + ", got " + dtype_name(acc));
  }
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
  check_dtypes(op, params.in_dtype, params.acc_dtype);
  const int64_t m = params.m();
  // Nothing to add (N == 0) or nothing to write.
  if (params.batch == 0 || params.N == 0 || params.n == 0 || m == 0) return;
  if ((params.d > 0 && params.x == nullptr) || params.p == nullptr || params.out == nullptr) {
    fail(op, "x, p and out must be non-null");
  }
  const DeviceGuard guard(params.out, op);
  switch (params.in_dtype) {
    case DType::kFloat32: dispatch_blocks<float, float>(params); break;
    case DType::kFloat64: dispatch_blocks<double, double>(params); break;
    case DType::kBFloat16: dispatch_blocks<bf16_raw, float>(params); break;
  }
}

void sensitivity_matvec_cuda(const SensitivityMatvecParams& params) {
  const char* op = "sensitivity_matvec_cuda";
  check_sizes(op, params.batch, params.N, params.d, params.n);
  check_dtypes(op, params.in_dtype, params.acc_dtype);
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
  switch (params.in_dtype) {
    case DType::kFloat32: run_matvec<float, float>(params); break;
    case DType::kFloat64: run_matvec<double, double>(params); break;
    case DType::kBFloat16: run_matvec<bf16_raw, float>(params); break;
  }
}

}  // namespace topoderiv
