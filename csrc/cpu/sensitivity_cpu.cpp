// CPU sensitivity kernels: the readable spec of the CUDA twins, and fast.
//
// Blocks. B[r, i, j] = sum_s p[s, r] xt[s, i] xt[s, j] is one GEMM  C[r, (i,j)] = P^T Z  with
// K = samples and Z[s, (i,j)] = xt[s, i] xt[s, j]. Z is never stored: its packed panels are
// generated while packing (one multiply per element, amortised over all n rows of P^T), and only
// the upper triangle is computed (half the flops): its m(m+1)/2 pairs, in row-major order, are cut
// into tiles of NR consecutive pairs (no padding at the diagonal or at the end of a row, which
// matters most for small m and for m = 2^k + 1 with the bias). The lower triangle is mirrored at
// the end of the call.
//
// Matvec. out[r] = B[r] v[r] = ((P .* (Xt V^T))^T Xt)[r]: per chunk of KC samples one GEMM into a
// [KC, n] buffer, then a second GEMM whose A panels fuse the product with P.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/kernel_common.h"
#include "cpu/microkernel.h"
#include "topoderiv/sensitivity.h"

namespace topoderiv {
namespace cpu {
namespace {

// Feature i of the augmented row xt (x followed by the bias 1).
template <typename Tacc, typename Tin>
TD_INLINE Tacc feat(const Tin* xrow, int64_t i, int64_t d) {
  return i < d ? convert<Tacc>(xrow[i]) : Tacc(1);
}

// A panel of P^T: Ap[k, ii] = p[k, r0 + ii] (zero past n).
template <typename Tin, typename Tacc>
TD_TARGET_CLONES void pack_p_panel(const Tin* p, int64_t ldp, int64_t n, int64_t r0, int64_t kc, Tacc* Ap) {
  pack_p_panel_at<Tin, Tacc>([=](int64_t k) { return p + k * ldp; }, 1, n, r0, kc, Ap);
}

// One tile of every block, for a chunk of kc rows: generate the panel Bp[k, c] = xt_i * xt_j
// of the tile's pairs, multiply by every P^T panel into a register tile, add it to the outputs.
template <typename Tin, typename Tacc>
TD_TARGET_CLONES void blocks_tile(const Tin* x, int64_t ldx, int64_t d, int64_t m, int64_t kc, const Run* runs,
                                  int nruns, const Tacc* Apack, int64_t n, Tacc* out, Tacc* Bp) {
  constexpr int nr = NR<Tacc>;
  const int used = runs[nruns - 1].c1;
  for (int64_t k = 0; k < kc; ++k) {
    const Tin* row = x + k * ldx;
    Tacc* dst = Bp + k * nr;
    for (int q = 0; q < nruns; ++q) {
      const Run& ru = runs[q];
      const Tacc xi = feat<Tacc>(row, ru.i, d);
      const int64_t shift = ru.j0 - ru.c0;  // feature of tile column c: c + shift
      if (shift + ru.c1 <= d) {            // features only: a contiguous, vectorisable product
        const Tin* src = row + shift;
        for (int c = ru.c0; c < ru.c1; ++c) dst[c] = xi * convert<Tacc>(src[c]);
      } else {
        for (int c = ru.c0; c < ru.c1; ++c) dst[c] = xi * feat<Tacc>(row, c + shift, d);
      }
    }
    for (int c = used; c < nr; ++c) dst[c] = Tacc(0);
  }
  add_tile_products<Tacc, /*kPrefetch=*/true>(kc, Apack, Bp, runs, nruns, n, m, out);
}

// One parallel region per call and no barrier inside it: each thread owns a fixed, equal share of
// the tiles (all tiles cost the same) and packs its own copy of the P^T panel per chunk (n x KC
// copies, negligible next to its tiles). Barriers per chunk cost a scheduler time slice each when
// another process shares the cores.
template <typename Tin, typename Tacc>
void blocks_impl(const SensitivityBlocksParams& P) {
  constexpr int nr = NR<Tacc>;
  const int64_t m = P.m(), n = P.n, d = P.d, N = P.N;
  const int nthreads = std::max(1, P.num_threads);
  const TriangleTiles tiles = triangle_tiles(m, nr);
  const int64_t nrb = (n + MR - 1) / MR;
  const int64_t ntiles = static_cast<int64_t>(tiles.size());
  const int nt = static_cast<int>(std::min<int64_t>(nthreads, ntiles));
  AlignedBuffer<Tacc> Apack(static_cast<int64_t>(nt) * nrb * KC * MR);
  AlignedBuffer<Tacc> Bbuf(static_cast<int64_t>(nt) * KC * nr);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id(), T = team_size();
    const int64_t t0 = ntiles * tid / T, t1 = ntiles * (tid + 1) / T;
    Tacc* Ap = Apack.get() + static_cast<int64_t>(tid) * nrb * KC * MR;
    Tacc* Bp = Bbuf.get() + static_cast<int64_t>(tid) * KC * nr;
    for (int64_t b = 0; b < P.batch; ++b) {
      const Tin* x = static_cast<const Tin*>(P.x) + b * P.x_bstride;
      const Tin* p = static_cast<const Tin*>(P.p) + b * P.p_bstride;
      Tacc* out = static_cast<Tacc*>(P.out) + b * n * m * m;
      for (int64_t s0 = 0; s0 < N && t0 < t1; s0 += KC) {
        const int64_t kc = std::min(KC, N - s0);
        const Tin* xs = x + s0 * P.x_rstride;
        const Tin* ps = p + s0 * P.p_rstride;
        for (int64_t rb = 0; rb < nrb; ++rb) pack_p_panel<Tin, Tacc>(ps, P.p_rstride, n, rb * MR, kc, Ap + rb * KC * MR);
        for (int64_t t = t0; t < t1; ++t)
          blocks_tile<Tin, Tacc>(xs, P.x_rstride, d, m, kc, tiles.runs.data() + tiles.first[t],
                                 static_cast<int>(tiles.first[t + 1] - tiles.first[t]), Ap, n, out, Bp);
      }
    }
  }
  for (int64_t b = 0; b < P.batch; ++b) mirror_lower(static_cast<Tacc*>(P.out) + b * n * m * m, n, m, nthreads);
}

// ---------------------------------------------------------------------------------------------
// matvec
//
// Per chunk of KC samples, with Xt the chunk's augmented rows:
//   GEMM-1  Y = Xt V^T  [kc, n]: A is read straight from the rows of x (MR row pointers, one
//           broadcast per row and feature: no transposed copy), B = V^T in panels packed once per
//           call, whose width follows n (32, 16 or 8 columns: few active blocks waste no lanes);
//           the bias feature initialises the accumulators with V^T's last row.
//   GEMM-2  out += (P .* Y)^T Xt: A panels A2[k, ii] = p[k, r0+ii] Y[k, r0+ii] (MR blocks), B read
//           straight from x's rows in tiles of 32 features (the last d % 32 features from a small
//           zero-padded copy); the bias column of out is the column sum of A2, summed while packing.
// Inputs of another type than the accumulation (bf16, or fp32 accumulated in fp64) are converted
// chunk by chunk into a row-major buffer first.

template <typename T> struct HalfVecOf;
template <> struct HalfVecOf<float> { typedef float type __attribute__((vector_size(32))); };
template <> struct HalfVecOf<double> { typedef double type __attribute__((vector_size(32))); };

template <typename V, typename T> TD_INLINE V vld(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T> TD_INLINE void vst(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// C[i, c] (+)= init[c] + sum_k a_i[k * sa] * B[k * ldb + c] for i < mr, c < hi (NV vectors V wide).
// a_i = A + i * ra; rows i >= mr are never read (their pointer is row 0's).
template <typename T, typename V, int NV, bool kAdd>
TD_INLINE void mk_strided(int64_t K, const T* A, int64_t sa, int64_t ra, const T* __restrict B, int64_t ldb,
                          const T* __restrict init, T* __restrict C, int64_t ldc, int mr, int hi) {
  constexpr int W = sizeof(V) / sizeof(T);
  const T* a[MR];
  for (int i = 0; i < MR; ++i) a[i] = A + (i < mr ? i : 0) * ra;
  V acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    const V z = init ? vld<V>(init + v * W) : V{};
    for (int i = 0; i < MR; ++i) acc[i][v] = z;
  }
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = vld<V>(B + k * ldb + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const T ai = a[i][k * sa];
      for (int v = 0; v < NV; ++v) acc[i][v] += b[v] * ai;
    }
  }
  if (mr == MR && hi == NV * W) {
    for (int i = 0; i < MR; ++i)
      for (int v = 0; v < NV; ++v) {
        T* c = C + i * ldc + v * W;
        vst<V>(c, kAdd ? vld<V>(c) + acc[i][v] : acc[i][v]);
      }
  } else {
    alignas(64) T tmp[NV * W];
    for (int i = 0; i < mr; ++i) {
      for (int v = 0; v < NV; ++v) vst<V>(tmp + v * W, acc[i][v]);
      T* c = C + i * ldc;
      for (int j = 0; j < hi; ++j) c[j] = kAdd ? c[j] + tmp[j] : tmp[j];
    }
  }
}

// Column tiles of V^T (GEMM-1's B): width 32 while more than 16 columns remain, then 16 or 8.
struct VTile { int64_t c0; int w; int64_t off; };
template <typename T>
inline std::vector<VTile> v_tiles(int64_t n, int64_t m) {
  constexpr int L = kLanes<T>;
  std::vector<VTile> t;
  int64_t off = 0;
  for (int64_t c0 = 0; c0 < n;) {
    const int64_t rem = n - c0;
    const int w = rem > L ? 2 * L : (rem > L / 2 ? L : L / 2);
    t.push_back(VTile{c0, w, off});
    off += m * w;
    c0 += std::min<int64_t>(w, rem);
  }
  return t;
}

template <typename T>
TD_TARGET_CLONES void pack_v_tile(const T* v, int64_t n, int64_t m, VTile t, T* Vp) {
  const int hi = static_cast<int>(std::min<int64_t>(t.w, n - t.c0));
  for (int64_t i = 0; i < m; ++i) {
    T* dst = Vp + t.off + i * t.w;
    for (int c = 0; c < hi; ++c) dst[c] = v[(t.c0 + c) * m + i];
    for (int c = hi; c < t.w; ++c) dst[c] = T(0);
  }
}

// GEMM-1 for one tile of V^T over the chunk's samples: Y[s, c0 + c] for s < kc.
template <typename T>
TD_TARGET_CLONES void gemm1_tile(const T* x, int64_t ldx, int64_t d, bool bias, int64_t kc, const T* Vp, VTile t,
                                 int64_t n, T* Y) {
  using V = typename VecOf<T>::type;
  using H = typename HalfVecOf<T>::type;
  const int hi = static_cast<int>(std::min<int64_t>(t.w, n - t.c0));
  const T* B = Vp + t.off;
  const T* init = bias ? B + d * t.w : nullptr;
  for (int64_t s0 = 0; s0 < kc; s0 += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, kc - s0));
    const T* A = d > 0 ? x + s0 * ldx : B;  // never read when d == 0
    T* C = Y + s0 * n + t.c0;
    if (t.w == 2 * kLanes<T>) mk_strided<T, V, 2, false>(d, A, 1, ldx, B, t.w, init, C, n, mr, hi);
    else if (t.w == kLanes<T>) mk_strided<T, V, 1, false>(d, A, 1, ldx, B, t.w, init, C, n, mr, hi);
    else mk_strided<T, H, 1, false>(d, A, 1, ldx, B, t.w, init, C, n, mr, hi);
  }
}

// GEMM-2 for one row block r0 of out over the chunk (see above). XT: the tail features
// [d - d % NR, d) as a zero-padded [kc, NR] copy (unused when d % NR == 0).
template <typename T, typename Tp>
TD_TARGET_CLONES void gemm2_block(const Tp* p, int64_t ldp, const T* Y, const T* x, int64_t ldx, int64_t d, bool bias,
                                  int64_t n, int64_t m, int64_t kc, int64_t r0, const T* XT, T* A2, T* out) {
  using V = typename VecOf<T>::type;
  constexpr int nr = NR<T>;
  const int mr = static_cast<int>(std::min<int64_t>(MR, n - r0));
  T colsum[MR] = {};
  for (int64_t k = 0; k < kc; ++k) {
    const Tp* prow = p + k * ldp + r0;
    const T* yrow = Y + k * n + r0;
    T* a = A2 + k * MR;
    if (mr == MR) {
#pragma GCC unroll 8
      for (int ii = 0; ii < MR; ++ii) a[ii] = convert<T>(prow[ii]) * yrow[ii];
    } else {
      for (int ii = 0; ii < mr; ++ii) a[ii] = convert<T>(prow[ii]) * yrow[ii];
      for (int ii = mr; ii < MR; ++ii) a[ii] = T(0);
    }
#pragma GCC unroll 8
    for (int ii = 0; ii < MR; ++ii) colsum[ii] += a[ii];
  }
  T* o = out + r0 * m;
  const int64_t dfull = d / nr * nr;
  for (int64_t j0 = 0; j0 < dfull; j0 += nr) mk_strided<T, V, 2, true>(kc, A2, MR, 1, x + j0, ldx, nullptr, o + j0, m, mr, nr);
  const int rem = static_cast<int>(d - dfull);
  if (rem > kLanes<T>) mk_strided<T, V, 2, true>(kc, A2, MR, 1, XT, nr, nullptr, o + dfull, m, mr, rem);
  else if (rem > 0) mk_strided<T, V, 1, true>(kc, A2, MR, 1, XT, nr, nullptr, o + dfull, m, mr, rem);
  if (bias)
    for (int ii = 0; ii < mr; ++ii) o[ii * m + d] += colsum[ii];
}

// The chunk's rows as Tacc, row-major [kc, ldc] (only when Tin != Tacc).
template <typename Tin, typename Tacc>
TD_TARGET_CLONES void convert_rows(const Tin* x, int64_t ldx, int64_t d, int64_t kc, Tacc* dst, int64_t ldc) {
  for (int64_t k = 0; k < kc; ++k)
    for (int64_t i = 0; i < d; ++i) dst[k * ldc + i] = convert<Tacc>(x[k * ldx + i]);
}

// The tail features [dfull, d) of the chunk, zero-padded to NR columns.
template <typename T>
TD_TARGET_CLONES void pack_tail(const T* x, int64_t ldx, int64_t dfull, int64_t d, int64_t kc, T* XT) {
  constexpr int nr = NR<T>;
  const int rem = static_cast<int>(d - dfull);
  for (int64_t k = 0; k < kc; ++k) {
    T* dst = XT + k * nr;
    std::memcpy(dst, x + k * ldx + dfull, sizeof(T) * rem);
    for (int c = rem; c < nr; ++c) dst[c] = T(0);
  }
}

// Split-K over samples: each thread packs its own copy of V^T's panels, runs both GEMMs on its own
// chunks of samples into a private [n, m] accumulator, and the last thread to finish sums the
// accumulators in thread order (deterministic for a given thread count). No barrier inside the
// parallel region (only its end): with other processes on the cores, every barrier can cost a
// scheduler time slice, which is more than the whole call when few blocks are active.
template <typename Tin, typename Tacc>
void matvec_impl(const SensitivityMatvecParams& P) {
  constexpr int nr = NR<Tacc>;
  constexpr bool kDirect = std::is_same<Tin, Tacc>::value;
  const int64_t m = P.m(), n = P.n, d = P.d, N = P.N;
  const bool bias = P.bias;
  const int64_t nchunks = (N + KC - 1) / KC;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(1, P.num_threads), nchunks)));
  const std::vector<VTile> vt = v_tiles<Tacc>(n, m);
  const int64_t vp_size = (vt.back().off + m * vt.back().w + 15) / 16 * 16;
  const int64_t nrb = (n + MR - 1) / MR;      // row blocks of out
  const int64_t ldc = (d + 15) / 16 * 16;     // converted rows (Tin != Tacc)
  const int64_t conv_size = kDirect ? 0 : KC * ldc;
  const int64_t acc_size = (n * m + 15) / 16 * 16;
  const int64_t per_thread = vp_size + conv_size + KC * nr + KC * n + KC * MR + acc_size;
  AlignedBuffer<Tacc> work(static_cast<int64_t>(nt) * per_thread);
  for (int64_t b = 0; b < P.batch; ++b) {
    const Tin* x = static_cast<const Tin*>(P.x) + b * P.x_bstride;
    const Tin* p = static_cast<const Tin*>(P.p) + b * P.p_bstride;
    const Tacc* v = static_cast<const Tacc*>(P.v) + b * n * m;
    Tacc* out = static_cast<Tacc*>(P.out) + b * n * m;
    std::atomic<int> finished{0};
#pragma omp parallel num_threads(nt)
    {
      const int tid = thread_id(), T = team_size();
      Tacc* Vp = work.get() + static_cast<int64_t>(tid) * per_thread;
      Tacc* Xc = Vp + vp_size;
      Tacc* XT = Xc + conv_size;
      Tacc* Y = XT + KC * nr;
      Tacc* A2 = Y + KC * n;
      Tacc* acc = A2 + KC * MR;
      std::fill(acc, acc + n * m, Tacc(0));
      for (const VTile& t : vt) pack_v_tile<Tacc>(v, n, m, t, Vp);
      const int64_t dfull = d / nr * nr;
      for (int64_t c = nchunks * tid / T; c < nchunks * (tid + 1) / T; ++c) {
        const int64_t s0 = c * KC, kc = std::min(KC, N - s0);
        const Tin* ps = p + s0 * P.p_rstride;
        const Tacc* xs;
        int64_t ldx;
        if constexpr (kDirect) {
          xs = d > 0 ? x + s0 * P.x_rstride : nullptr;
          ldx = P.x_rstride;
        } else {
          if (d > 0) convert_rows<Tin, Tacc>(x + s0 * P.x_rstride, P.x_rstride, d, kc, Xc, ldc);
          xs = Xc;
          ldx = ldc;
        }
        if (d > dfull) pack_tail<Tacc>(xs, ldx, dfull, d, kc, XT);
        for (const VTile& t : vt) gemm1_tile<Tacc>(xs, ldx, d, bias, kc, Vp, t, n, Y);
        for (int64_t rb = 0; rb < nrb; ++rb)
          gemm2_block<Tacc, Tin>(ps, P.p_rstride, Y, xs, ldx, d, bias, n, m, kc, rb * MR, XT, A2, acc);
      }
      if (finished.fetch_add(1, std::memory_order_acq_rel) == T - 1) {
        for (int64_t r = 0; r < n; ++r)
          sum_accumulators(out, r, m, work.get() + (per_thread - acc_size), per_thread, T);
      }
    }
  }
}

}  // namespace
}  // namespace cpu

namespace {
template <class Params>
void check_common(const char* fn, const Params& P) {
  if (P.batch < 0 || P.N < 0 || P.d < 0 || P.n < 0) fail(fn, "sizes must be >= 0");
  if (P.m() < 1) fail(fn, "m = d + bias must be >= 1");
  if (P.N > 0 && P.n > 0 && ((P.d > 0 && P.x == nullptr) || P.p == nullptr)) fail(fn, "x and p must not be null");
}
}  // namespace

void sensitivity_blocks_cpu(const SensitivityBlocksParams& P) {
  const char* fn = "sensitivity_blocks";
  check_common(fn, P);
  if (P.batch == 0 || P.n == 0 || P.N == 0) return;
  if (P.out == nullptr) fail(fn, "out must not be null");
  cpu::dispatch_dtypes(fn, P.in_dtype, P.acc_dtype, [&](auto tin, auto tacc) {
    cpu::blocks_impl<decltype(tin), decltype(tacc)>(P);
  });
}

void sensitivity_matvec_cpu(const SensitivityMatvecParams& P) {
  const char* fn = "sensitivity_matvec";
  check_common(fn, P);
  if (P.batch == 0 || P.n == 0) return;
  if (P.out == nullptr || P.v == nullptr) fail(fn, "v and out must not be null");
  cpu::zero_acc(P.out, P.acc_dtype, P.batch * P.n * P.m());
  if (P.N == 0) return;
  cpu::dispatch_dtypes(fn, P.in_dtype, P.acc_dtype, [&](auto tin, auto tacc) {
    cpu::matvec_impl<decltype(tin), decltype(tacc)>(P);
  });
}

}  // namespace topoderiv
