// CUDA twins of csrc/cpu/conv_sensitivity_cpu.cpp (contract: include/topoderiv/conv_sensitivity.h).
//
// The kernels are those of sensitivity_cuda.cu with one change: every tile of the patch matrix is
// staged into shared memory through PatchAddress (the addressing scheme the CPU gather uses), so
// the im2col matrix never exists. Per tile, the addresses are split into a row part (sample,
// output pixel: x's offset of the window's top-left corner, the pixel (ih, iw), p's offset) and a
// feature part ((c, ky, kx): offset from the corner; or the bias feature, or padding past m).
// Both parts are decoded once per tile or chunk into small shared arrays; a staged element is then
// one bounds test (zero padding) and one load x[row.base + feature.off].
//
// A batch of problems (ConvGeometry::batch) is one launch of each kernel: the problem index is one
// more factor of the blocks kernel's work items and of the matvec kernels' z dimension; problem b
// reads x + b xs.b, p + b ps.b and owns the [b] slices of out, v and the workspace.
//
// conv_sensitivity_blocks_cuda: out[r] += B[r]. Grid: (upper-triangle tile pair (ti <= tj) of the
//   m x m block) x (group of R output channels) x (problem). 256 threads (16 x 16) keep a TM x TM tile of
//   accumulators for each of their R channels in registers and loop over the rows (output pixels)
//   in chunks of KS = 16, staging pt[s, i-tile], pt[s, j-tile] and p[s, r-group]. Only tiles with
//   tj >= ti are computed; each value is added to (i, j) and (j, i): one writer per element, no
//   atomics, deterministic, out stays exactly symmetric. TM = 16 (R = 16) for m <= 16, TM = 32
//   (R = 8) for m <= 32, TM = 64 (R = 4) otherwise.
// conv_sensitivity_matvec_cuda: out[r] = B[r] v[r] without forming B:
//   kernel 1: Y = Pt V^T ([rows, n], into params.workspace), 64 x 64 tiles;
//   kernel 2: out = (P .* Y)^T Pt ([n, m]), the product with P fused into the staging; the rows are
//   split into ranges added atomically (out zeroed first; not bitwise reproducible) only when the
//   output tiles cannot fill the GPU, as in sensitivity_cuda.cu.
// conv_lanczos_topk_cuda: the CUDA Lanczos backend (lanczos_cuda.cu) with this matvec as its external
//   operator (applied to every block; its workspace is the tail of the Lanczos workspace).
//
// Input dtypes: float32, float64, bfloat16 (raw 16-bit patterns, converted exactly to float32).
// Accumulation: float32 for float32/bfloat16 inputs, float64 for float64 inputs.
#include <cstdint>
#include <string>

#include "cuda_utils.cuh"  // first: defines TOPODERIV_WITH_CUDA for topoderiv/conv_sensitivity.h
#include "sensitivity_tiles.cuh"
#include "topoderiv/conv_sensitivity.h"

namespace topoderiv {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;  // 16 x 16, 1-D block; tx = tid % 16, ty = tid / 16

// Shared-memory decodings of PatchAddress (plain arrays: __shared__ variables take no constructors).
// Row q of a tile: x offset of the window corner, its pixel (ih, iw), p's offset, valid (< rows).
template <int NROWS>
struct RowsS {
  int64_t base[NROWS], ih[NROWS], iw[NROWS], prow[NROWS];
  int valid[NROWS];
};
// Feature c of a tile: offset from the corner, (ky, kx), kind (0 x, 1 bias, 2 zero).
template <int NF>
struct FeatsS {
  int64_t off[NF], ky[NF], kx[NF];
  int kind[NF];
};

template <int NROWS>
__device__ __forceinline__ void decode_row(RowsS<NROWS>& R, int q, const PatchAddress& A, int64_t s, int64_t rows) {
  const bool valid = s < rows;
  R.valid[q] = valid ? 1 : 0;
  if (valid) {
    const PatchRow r = A.row(s);
    R.base[q] = r.base;
    R.ih[q] = r.ih;
    R.iw[q] = r.iw;
    R.prow[q] = A.p_row(s);
  } else {
    R.base[q] = R.ih[q] = R.iw[q] = R.prow[q] = 0;
  }
}

template <int NF>
__device__ __forceinline__ void decode_feature(FeatsS<NF>& F, int c, const PatchAddress& A, int64_t i) {
  const PatchFeature f = A.feature(i);
  F.off[c] = f.off;
  F.ky[c] = f.ky;
  F.kx[c] = f.kx;
  F.kind[c] = f.kind;
}

// pt[row q, feature c]: x through the decoded address, 0 outside the image / past m / past rows.
template <typename Acc, typename Tin, int NROWS, int NF>
__device__ __forceinline__ Acc patch_value(const Tin* __restrict__ x, const PatchAddress& A, const RowsS<NROWS>& R,
                                           int q, const FeatsS<NF>& F, int c) {
  if (!R.valid[q]) return Acc(0);
  const int kind = F.kind[c];
  if (kind == 1) return Acc(1);
  if (kind != 0) return Acc(0);
  const int64_t h = R.ih[q] + F.ky[c], w = R.iw[q] + F.kx[c];
  if (static_cast<uint64_t>(h) >= static_cast<uint64_t>(A.H) || static_cast<uint64_t>(w) >= static_cast<uint64_t>(A.W))
    return Acc(0);
  return static_cast<Acc>(to_acc_f(x[R.base[q] + F.off[c]]));
}

// ------------------------------------------------------------------------------------------------
// Dense blocks.
// ------------------------------------------------------------------------------------------------
template <typename Tin, typename Acc, int TM, int R>
__global__ void __launch_bounds__(kThreads, sizeof(Acc) == 4 ? 2 : 1)
conv_blocks_kernel(const Tin* __restrict__ x0, const Tin* __restrict__ p0, PatchAddress A,
                   Acc* __restrict__ out0,  // [batch, n, m, m]
                   int64_t batch, int64_t rows, int64_t n, int64_t m,
                   int64_t num_tiles,    // ceil(m / TM)
                   int64_t num_pairs,    // num_tiles * (num_tiles + 1) / 2
                   int64_t num_rgroups)  // ceil(n / R)
{
  constexpr int KS = 16;       // rows per shared-memory chunk
  constexpr int MT = TM / 16;  // micro tile per thread
  static_assert(TM % 16 == 0, "TM must be a multiple of 16");
  __shared__ Acc xi_s[KS][TM];  // pt[s0 + kk, i0 + c]
  __shared__ Acc xj_s[KS][TM];  // pt[s0 + kk, j0 + c]
  __shared__ Acc p_s[KS][R];    // p[s0 + kk, r0 + c]
  __shared__ FeatsS<TM> fi, fj;
  __shared__ RowsS<KS> rs;

  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16;
  const int ty = tid / 16;
  const int64_t per_problem = num_pairs * num_rgroups;
  const int64_t work = batch * per_problem;

  for (int64_t item = blockIdx.x; item < work; item += gridDim.x) {
    const int64_t prob = item / per_problem;
    const int64_t pair = (item % per_problem) % num_pairs;
    const int64_t rg = (item % per_problem) / num_pairs;
    const Tin* __restrict__ x = x0 != nullptr ? x0 + prob * A.xs.b : x0;
    const Tin* __restrict__ p = p0 + prob * A.ps.b;
    int64_t ti, tj;
    tile_pair(pair, num_tiles, ti, tj);
    const int64_t i0 = ti * TM, j0 = tj * TM, r0 = rg * R;

    __syncthreads();  // the previous item no longer reads the feature decodings
    for (int c = tid; c < TM; c += kThreads) {
      decode_feature(fi, c, A, i0 + c);
      decode_feature(fj, c, A, j0 + c);
    }

    Acc acc[R][MT][MT];
    blocks_zero(acc);

    for (int64_t s0 = 0; s0 < rows; s0 += KS) {
      __syncthreads();  // the previous chunk is no longer being read
      if (tid < KS) decode_row(rs, tid, A, s0 + tid, rows);
      __syncthreads();
      for (int e = tid; e < KS * TM; e += kThreads) {
        const int kk = e / TM, c = e % TM;
        xi_s[kk][c] = patch_value<Acc>(x, A, rs, kk, fi, c);
        xj_s[kk][c] = patch_value<Acc>(x, A, rs, kk, fj, c);
      }
      for (int e = tid; e < KS * R; e += kThreads) {
        const int kk = e / R, c = e % R;
        const int64_t r = r0 + c;
        p_s[kk][c] = (rs.valid[kk] && r < n) ? static_cast<Acc>(to_acc_f(p[rs.prow[kk] + r * A.ps.c])) : Acc(0);
      }
      __syncthreads();
      blocks_fma(xi_s, xj_s, p_s, ty, tx, acc);
    }
    blocks_epilogue<Acc, TM, R>(acc, out0, prob * n, r0, n, m, i0, j0, ty, tx);
  }
}

template <typename Tin, typename Acc, int TM, int R>
void launch_blocks(const ConvSensitivityBlocksParams& P) {
  const ConvGeometry& g = P.g;
  const int64_t m = g.m();
  const int64_t num_tiles = ceil_div(m, TM);
  const int64_t num_pairs = num_tiles * (num_tiles + 1) / 2;
  const int64_t num_rgroups = ceil_div(g.n, R);
  const dim3 grid(grid_dim(g.batch * num_pairs * num_rgroups, kMaxGridX), 1, 1);
  launch("conv_sensitivity_blocks_cuda", conv_blocks_kernel<Tin, Acc, TM, R>, grid, dim3(kThreads),
         as_stream(P.stream), static_cast<const Tin*>(P.x), static_cast<const Tin*>(P.p),
         PatchAddress(g, P.xs, P.ps), static_cast<Acc*>(P.out), g.batch, g.rows(), g.n, m, num_tiles, num_pairs,
         num_rgroups);
}

template <typename Tin, typename Acc>
void dispatch_blocks(const ConvSensitivityBlocksParams& P) {
  with_blocks_config(P.g.m(), [&](auto tm, auto r) { launch_blocks<Tin, Acc, decltype(tm)::value, decltype(r)::value>(P); });
}

// ------------------------------------------------------------------------------------------------
// Matrix-free application.
// ------------------------------------------------------------------------------------------------
// Y[b, s, r] = sum_i pt[b, s, i] * v[b, r, i].  Grid: x = row tiles, y = r tiles, z = problems.
template <typename Tin, typename Acc>
__global__ void __launch_bounds__(kThreads)
conv_matvec_y_kernel(const Tin* __restrict__ x0, PatchAddress A,
                     const Acc* __restrict__ v0,  // [batch, n, m]
                     Acc* __restrict__ y0,        // [batch, rows, n]
                     int64_t batch, int64_t rows, int64_t n, int64_t m) {
  __shared__ Acc xs[kGK][kGT + 1];  // xs[k][sl] = pt[s0 + sl, k0 + k]
  __shared__ Acc vs[kGK][kGT + 1];  // vs[k][rl] = v[r0 + rl, k0 + k]
  __shared__ RowsS<kGT> rs;
  __shared__ FeatsS<kGK> fs;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  const int64_t s_tiles = ceil_div(rows, kGT), r_tiles = ceil_div(n, kGT);

  for (int64_t prob = blockIdx.z; prob < batch; prob += gridDim.z) {
  const Tin* __restrict__ x = x0 != nullptr ? x0 + prob * A.xs.b : x0;
  const Acc* __restrict__ v = v0 + prob * n * m;
  Acc* __restrict__ y = y0 + prob * rows * n;
  for (int64_t st = blockIdx.x; st < s_tiles; st += gridDim.x) {
    for (int64_t rt = blockIdx.y; rt < r_tiles; rt += gridDim.y) {
      const int64_t s0 = st * kGT, r0 = rt * kGT;
      __syncthreads();  // the previous tile no longer reads the row decodings
      if (tid < kGT) decode_row(rs, tid, A, s0 + tid, rows);
      Acc acc[4][4];
      tile_zero(acc);
      for (int64_t k0 = 0; k0 < m; k0 += kGK) {
        __syncthreads();  // the previous chunk is no longer being read
        if (tid < kGK) decode_feature(fs, tid, A, k0 + tid);
        __syncthreads();
        for (int e = tid; e < kGT * kGK; e += kThreads) {
          const int rowl = e / kGK, k = e % kGK;
          xs[k][rowl] = patch_value<Acc>(x, A, rs, rowl, fs, k);
          const int64_t r = r0 + rowl, i = k0 + k;
          vs[k][rowl] = (r < n && i < m) ? v[r * m + i] : Acc(0);
        }
        __syncthreads();
        tile_fma(xs, vs, ty, tx, acc);
      }
      store_y_tile(acc, y, s0, r0, rows, n, ty, tx);
    }
  }
  }
}

// out[b, r, i] = sum_s p[b, s, r] * Y[b, s, r] * pt[b, s, i].  Grid: x = i tiles, y = r tiles,
// z = (problem, row split) pairs.
// splits == 1: each block owns its output tile and overwrites it (deterministic); splits > 1: split
// q sums rows [q * split_rows, (q + 1) * split_rows) and adds atomically into out (zeroed first).
template <typename Tin, typename Acc>
__global__ void __launch_bounds__(kThreads)
conv_matvec_out_kernel(const Tin* __restrict__ x0, const Tin* __restrict__ p0, PatchAddress A,
                       const Acc* __restrict__ y0,  // [batch, rows, n]
                       Acc* __restrict__ out0,      // [batch, n, m]
                       int64_t batch, int64_t rows, int64_t n, int64_t m, int64_t splits, int64_t split_rows) {
  __shared__ Acc zs[kGK][kGT];  // zs[k][rl] = p[s0 + k, r0 + rl] * Y[s0 + k, r0 + rl]
  __shared__ Acc xs[kGK][kGT];  // xs[k][il] = pt[s0 + k, i0 + il]
  __shared__ RowsS<kGK> rs;
  __shared__ FeatsS<kGT> fs;
  const int tid = static_cast<int>(threadIdx.x);
  const int tx = tid % 16, ty = tid / 16;
  const int64_t i_tiles = ceil_div(m, kGT), r_tiles = ceil_div(n, kGT);

  for (int64_t qz = blockIdx.z; qz < batch * splits; qz += gridDim.z) {
    const int64_t prob = qz / splits, q = qz % splits;
    const Tin* __restrict__ x = x0 != nullptr ? x0 + prob * A.xs.b : x0;
    const Tin* __restrict__ p = p0 + prob * A.ps.b;
    const Acc* __restrict__ y = y0 + prob * rows * n;
    Acc* __restrict__ out = out0 + prob * n * m;
    const int64_t s_begin = q * split_rows;
    const int64_t s_end = s_begin + split_rows < rows ? s_begin + split_rows : rows;
    for (int64_t it = blockIdx.x; it < i_tiles; it += gridDim.x) {
      for (int64_t rt = blockIdx.y; rt < r_tiles; rt += gridDim.y) {
        const int64_t i0 = it * kGT, r0 = rt * kGT;
        __syncthreads();  // the previous tile no longer reads the feature decodings
        if (tid < kGT) decode_feature(fs, tid, A, i0 + tid);
        Acc acc[4][4];
        tile_zero(acc);
        for (int64_t s0 = s_begin; s0 < s_end; s0 += kGK) {
          __syncthreads();  // the previous chunk is no longer being read
          if (tid < kGK) decode_row(rs, tid, A, s0 + tid, s_end);
          __syncthreads();
          for (int e = tid; e < kGK * kGT; e += kThreads) {
            const int k = e / kGT, col = e % kGT;
            const int64_t s = s0 + k, r = r0 + col;
            zs[k][col] = (rs.valid[k] && r < n)
                             ? static_cast<Acc>(to_acc_f(p[rs.prow[k] + r * A.ps.c])) * y[s * n + r]
                             : Acc(0);
            xs[k][col] = patch_value<Acc>(x, A, rs, k, fs, col);
          }
          __syncthreads();
          tile_fma(zs, xs, ty, tx, acc);
        }
        store_out_tile(acc, out, r0, i0, n, m, splits, ty, tx);
      }
    }
  }
}

template <typename Tin, typename Acc>
void run_matvec(const ConvSensitivityMatvecParams& P) {
  const ConvGeometry& g = P.g;
  const int64_t m = g.m(), rows = g.rows(), n = g.n;
  const cudaStream_t stream = as_stream(P.stream);
  const PatchAddress A(g, P.xs, P.ps);
  Acc* y = static_cast<Acc*>(P.workspace);
  const int64_t batch = g.batch;
  const dim3 grid1(grid_dim(ceil_div(rows, kGT), kMaxGridX), grid_dim(ceil_div(n, kGT), kMaxGridYZ),
                   grid_dim(batch, kMaxGridYZ));
  launch("conv_sensitivity_matvec_cuda", conv_matvec_y_kernel<Tin, Acc>, grid1, dim3(kThreads), stream,
         static_cast<const Tin*>(P.x), A, static_cast<const Acc*>(P.v), y, batch, rows, n, m);
  // The second GEMM's output [n, m] can be far too small to fill the GPU while the sum runs over
  // all rows: then the rows are split into ranges added atomically (row_split).
  const RowSplit split = row_split(rows, ceil_div(m, kGT) * ceil_div(n, kGT) * batch);
  const int64_t splits = split.splits, split_rows = split.split_rows;
  if (splits > 1) {
    check_cuda(cudaMemsetAsync(P.out, 0, static_cast<size_t>(batch * n * m) * sizeof(Acc), stream),
               "conv_sensitivity_matvec_cuda");
  }
  const dim3 grid2(grid_dim(ceil_div(m, kGT), kMaxGridX), grid_dim(ceil_div(n, kGT), kMaxGridYZ),
                   grid_dim(batch * splits, kMaxGridYZ));
  launch("conv_sensitivity_matvec_cuda", conv_matvec_out_kernel<Tin, Acc>, grid2, dim3(kThreads), stream,
         static_cast<const Tin*>(P.x), static_cast<const Tin*>(P.p), A, static_cast<const Acc*>(y),
         static_cast<Acc*>(P.out), batch, rows, n, m, splits, split_rows);
}

void check_geometry(const char* op, const ConvGeometry& g) {
  if (g.batch < 0) fail(op, "batch must be >= 0, got " + std::to_string(g.batch));
  if (g.N < 0 || g.C < 0 || g.H < 0 || g.W < 0 || g.n < 0 || g.k < 1 || g.pad < 0) {
    fail(op, "sizes must be non-negative and kernel_size >= 1, got N=" + std::to_string(g.N) + " C=" +
                 std::to_string(g.C) + " H=" + std::to_string(g.H) + " W=" + std::to_string(g.W) + " n=" +
                 std::to_string(g.n) + " k=" + std::to_string(g.k) + " pad=" + std::to_string(g.pad));
  }
  if (g.m() < 1) fail(op, "m = C k k + bias must be >= 1");
}

// A v for the CUDA Lanczos backend: every block, the workspace y [rows, n] from the Lanczos one.
class ConvCudaOperator final : public LanczosOperator {
 public:
  explicit ConvCudaOperator(const ConvSensitivityMatvecParams& op) : op_(op) {}
  int64_t workspace_elems(bool cuda) const override { return cuda ? conv_matvec_workspace_elems(op_.g) : 0; }
  void apply(const void* v, void* out, const uint8_t* /*active*/, void* workspace) const override {
    ConvSensitivityMatvecParams P = op_;
    P.v = v;
    P.out = out;
    P.workspace = workspace;
    conv_sensitivity_matvec_cuda(P);
  }

 private:
  ConvSensitivityMatvecParams op_;
};

}  // namespace

void conv_sensitivity_blocks_cuda(const ConvSensitivityBlocksParams& params) {
  const char* op = "conv_sensitivity_blocks_cuda";
  check_geometry(op, params.g);
  check_cuda_dtypes(op, params.in_dtype, params.acc_dtype);
  if (params.g.rows() == 0 || params.g.problems() == 0) return;  // nothing to add
  if ((params.g.d() > 0 && params.x == nullptr) || params.p == nullptr || params.out == nullptr) {
    fail(op, "x, p and out must be non-null");
  }
  const DeviceGuard guard(params.out, op);
  with_cuda_dtypes(params.in_dtype, [&](auto tin, auto acc) { dispatch_blocks<decltype(tin), decltype(acc)>(params); });
}

void conv_sensitivity_matvec_cuda(const ConvSensitivityMatvecParams& params) {
  const char* op = "conv_sensitivity_matvec_cuda";
  check_geometry(op, params.g);
  check_cuda_dtypes(op, params.in_dtype, params.acc_dtype);
  const int64_t m = params.g.m();
  if (params.g.problems() == 0) return;  // out is empty
  if (params.out == nullptr) fail(op, "out must be non-null");
  const DeviceGuard guard(params.out, op);
  if (params.g.rows() == 0) {  // B == 0, so out = 0
    const size_t bytes = static_cast<size_t>(params.g.problems() * m) *
                         (params.acc_dtype == DType::kFloat64 ? sizeof(double) : sizeof(float));
    check_cuda(cudaMemsetAsync(params.out, 0, bytes, as_stream(params.stream)), op);
    return;
  }
  if ((params.g.d() > 0 && params.x == nullptr) || params.p == nullptr || params.v == nullptr) {
    fail(op, "x, p and v must be non-null");
  }
  if (params.workspace == nullptr) {
    fail(op, "workspace must be non-null (conv_matvec_workspace_elems(params.g) elements of acc_dtype)");
  }
  with_cuda_dtypes(params.in_dtype, [&](auto tin, auto acc) { run_matvec<decltype(tin), decltype(acc)>(params); });
}

void conv_lanczos_topk_cuda(LanczosParams params, const ConvSensitivityMatvecParams& op) {
  const char* name = "conv_sensitivity_lanczos_cuda";
  check_geometry(name, op.g);
  check_cuda_dtypes(name, op.in_dtype, op.acc_dtype);
  if (op.g.problems() != params.num_problems || op.g.m() != params.m) {
    fail(name, "the operator must have batch n = num_problems and m = the Lanczos m, got batch n = " +
                   std::to_string(op.g.problems()) +
                   " vs " + std::to_string(params.num_problems) + " and m = " + std::to_string(op.g.m()) + " vs " +
                   std::to_string(params.m));
  }
  if (op.acc_dtype != params.dtype) fail(name, "op.acc_dtype must equal the Lanczos dtype");
  const ConvCudaOperator A(op);
  params.a = nullptr;
  params.external = &A;
  lanczos_topk_cuda(params);
}

}  // namespace topoderiv
