// CPU convolution sensitivity kernels (contract: include/topoderiv/conv_sensitivity.h): the
// readable spec of the CUDA twins, and fast.
//
// Both kernels walk the rows (output pixels, row-major over [N, Ho, Wo]) in chunks of KC = 256. Each
// thread gathers the patches of its current chunk through PatchAddress (rows decoded once per chunk)
// into private buffers (590 KB at m = 577 in float32; they stay in L2), so the im2col matrix never
// exists: the extra memory is the output plus fixed per-thread buffers. The blocks gather a
// row-major [KC, m] buffer; the matvec gathers feature-major panels [m, NR] directly (a panel's rows
// are runs of consecutive output pixels, so each feature is a strided copy of consecutive input
// pixels: no per-element addressing) and transposes them into the second GEMM's panels. From the
// buffers on, the kernels are the ones of sensitivity_cpu.cpp:
//
// Blocks. One GEMM  C[r, (i,j)] = P^T Z  over the chunk, Z[s, (i,j)] = pt[s, i] pt[s, j] generated
// in the packing of its panels (never stored); only the upper triangle's m(m+1)/2 pairs, cut into
// tiles of NR consecutive pairs (no padding at row ends). Each thread owns a fixed, equal share of
// the tiles for the whole call (no barrier: a barrier per chunk costs a time slice whenever another
// process shares the cores) and gathers every chunk itself (m values per row, against its tiles'
// n m^2 / (2 threads) multiply-adds per row). The lower triangle is mirrored at the end.
//
// Matvec, n <= 8 (the Lanczos steps where most blocks have converged): direct convolution on a
// zero-padded copy of each image, no patch buffers (matvec_direct below). Larger n:
// split-K over chunks: each thread gathers its own chunks, then Y^T = V Pt^T ([n, KC]; the
// channels along the micro-kernel's short side, so few channels waste little) and
// acc += (P .* Y)^T Pt (the product with P fused into the second GEMM's A panels) into a private
// [n, m] accumulator; the accumulators are summed in thread order at the end (deterministic for a
// given thread count).
//
// The matrix-free Lanczos runs the shared driver (csrc/common/lanczos_driver.cpp) through the CPU
// backend with this matvec as its external operator; once a fifth of the blocks have converged the
// operator gathers the costate channels of the others and applies only those.
#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/kernel_common.h"
#include "cpu/microkernel.h"
#include "topoderiv/conv_sensitivity.h"

namespace topoderiv {
namespace cpu {
namespace {

// PatchAddress::feature for every feature i < d, computed once per call (no divisions per element).
struct FeatureTable {
  std::vector<int64_t> off;
  std::vector<int64_t> ky, kx;
  explicit FeatureTable(const PatchAddress& A) {
    off.resize(static_cast<size_t>(A.d));
    ky.resize(static_cast<size_t>(A.d));
    kx.resize(static_cast<size_t>(A.d));
    for (int64_t i = 0; i < A.d; ++i) {
      const PatchFeature f = A.feature(i);
      off[i] = f.off;
      ky[i] = f.ky;
      kx[i] = f.kx;
    }
  }
};

// PatchAddress::row (and p's row offset) for the rows of one chunk, decoded once per chunk.
struct ChunkRows {
  int64_t* base;  // [KC] x offset of the window corner
  int64_t* ih;    // [KC]
  int64_t* iw;    // [KC]
  int64_t* prow;  // [KC] p offset
  void decode(const PatchAddress& A, int64_t s0, int64_t rows) {
    for (int64_t q = 0; q < rows; ++q) {
      const PatchRow r = A.row(s0 + q);
      base[q] = r.base;
      ih[q] = r.ih;
      iw[q] = r.iw;
      prow[q] = A.p_row(s0 + q);
    }
  }
};

// buf[q, i] = patch feature i of the chunk's row q (q < rows, i < m, row stride ld): x elements
// through A, zeros outside the image, the bias feature 1. Rows whose whole window is inside the
// image take no bounds test.
template <typename Tin, typename Tacc>
TD_TARGET_CLONES void gather_rows(const Tin* x, const PatchAddress& A, const FeatureTable& F, const ChunkRows& Rw,
                                  int64_t rows, Tacc* buf, int64_t ld) {
  const int64_t d = A.d, k = A.k;
  const int64_t* off = F.off.data();
  const int64_t* ky = F.ky.data();
  const int64_t* kx = F.kx.data();
  for (int64_t q = 0; q < rows; ++q) {
    Tacc* dst = buf + q * ld;
    if (A.bias) dst[d] = Tacc(1);
    if (d == 0) continue;
    const int64_t base = Rw.base[q], ih = Rw.ih[q], iw = Rw.iw[q];
    if (ih >= 0 && ih + k <= A.H && iw >= 0 && iw + k <= A.W) {
      const Tin* xb = x + base;  // x[img, 0, ih, iw], inside x
      for (int64_t i = 0; i < d; ++i) dst[i] = convert<Tacc>(xb[off[i]]);
    } else {
      for (int64_t i = 0; i < d; ++i) {
        const bool in = static_cast<uint64_t>(ih + ky[i]) < static_cast<uint64_t>(A.H) &&
                        static_cast<uint64_t>(iw + kx[i]) < static_cast<uint64_t>(A.W);
        dst[i] = in ? convert<Tacc>(x[base + off[i]]) : Tacc(0);
      }
    }
  }
}

// A panel of P^T for the chunk: Ap[q, ii] = p[row s0 + q, channel r0 + ii] (zero past n).
template <typename Tin, typename Tacc>
TD_TARGET_CLONES void pack_p_panel(const Tin* p, const int64_t* prow, int64_t pc, int64_t n, int64_t r0,
                                   int64_t kc, Tacc* Ap) {
  pack_p_panel_at<Tin, Tacc>([=](int64_t q) { return p + prow[q]; }, pc, n, r0, kc, Ap);
}

// ---------------------------------------------------------------------------------------------
// blocks

// One tile of every block for a chunk of kc gathered rows (xc [kc, ldx]): the panel
// Bp[q, c] = pt_i * pt_j of the tile's pairs, times every P^T panel, added to the outputs.
template <typename T>
TD_TARGET_CLONES void blocks_tile(const T* xc, int64_t ldx, int64_t m, int64_t kc, const Run* runs, int nruns,
                                  const T* Apack, int64_t n, T* out, T* Bp) {
  constexpr int nr = NR<T>;
  const int used = runs[nruns - 1].c1;
  for (int64_t q = 0; q < kc; ++q) {
    const T* row = xc + q * ldx;
    T* dst = Bp + q * nr;
    for (int u = 0; u < nruns; ++u) {
      const Run& ru = runs[u];
      const T xi = row[ru.i];
      const int64_t shift = ru.j0 - ru.c0;  // feature of tile column c: c + shift
      for (int c = ru.c0; c < ru.c1; ++c) dst[c] = xi * row[c + shift];
    }
    for (int c = used; c < nr; ++c) dst[c] = T(0);
  }
  add_tile_products<T, /*kPrefetch=*/false>(kc, Apack, Bp, runs, nruns, n, m, out);
}

template <typename Tin, typename Tacc>
void blocks_impl(const ConvSensitivityBlocksParams& P) {
  constexpr int nr = NR<Tacc>;
  const ConvGeometry& g = P.g;
  const PatchAddress A(g, P.xs, P.ps);
  const FeatureTable F(A);
  const int64_t m = g.m(), n = g.n, R = g.rows();
  const TriangleTiles tiles = triangle_tiles(m, nr);
  const int64_t ntiles = tiles.size(), nrb = (n + MR - 1) / MR;
  const int nthreads = std::max(1, P.num_threads);
  const int nt = static_cast<int>(std::min<int64_t>(nthreads, ntiles));
  const int64_t per_thread = KC * m + nrb * KC * MR + KC * nr;
  AlignedBuffer<Tacc> work(static_cast<int64_t>(nt) * per_thread);
  std::vector<int64_t> rowtab(static_cast<size_t>(nt * 4 * KC));
  const Tin* x = static_cast<const Tin*>(P.x);
  const Tin* p = static_cast<const Tin*>(P.p);
  Tacc* out = static_cast<Tacc*>(P.out);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id(), T = team_size();
    const int64_t t0 = ntiles * tid / T, t1 = ntiles * (tid + 1) / T;
    Tacc* Xc = work.get() + static_cast<int64_t>(tid) * per_thread;
    Tacc* Ap = Xc + KC * m;
    Tacc* Bp = Ap + nrb * KC * MR;
    int64_t* rt = rowtab.data() + static_cast<int64_t>(tid) * 4 * KC;
    ChunkRows Rw{rt, rt + KC, rt + 2 * KC, rt + 3 * KC};
    for (int64_t s0 = 0; s0 < R && t0 < t1; s0 += KC) {
      const int64_t kc = std::min(KC, R - s0);
      Rw.decode(A, s0, kc);
      gather_rows<Tin, Tacc>(x, A, F, Rw, kc, Xc, m);
      for (int64_t rb = 0; rb < nrb; ++rb) pack_p_panel<Tin, Tacc>(p, Rw.prow, P.ps.c, n, rb * MR, kc, Ap + rb * KC * MR);
      for (int64_t t = t0; t < t1; ++t)
        blocks_tile<Tacc>(Xc, m, m, kc, tiles.runs.data() + tiles.first[t],
                          static_cast<int>(tiles.first[t + 1] - tiles.first[t]), Ap, n, out, Bp);
    }
  }
  mirror_lower(out, n, m, nthreads);
}

// ---------------------------------------------------------------------------------------------
// matvec

// GEMM-1 is computed transposed, Y^T = V Pt^T ([n, KC]): the output channels run along the
// micro-kernel's MR = 8 rows and the patch rows along its NR columns, so few channels (the Lanczos
// steps where most blocks have converged) waste at most MR - 1 rows of work instead of NR - 1.

// GEMM-1 A panel: Vp[i, ii] = v[r0 + ii, i] (K = m features, MR channels; zero past n).
template <typename T>
TD_TARGET_CLONES void pack_v_rows(const T* v, int64_t n, int64_t m, int64_t r0, T* Vp) {
  const int mr = static_cast<int>(std::min<int64_t>(MR, n - r0));
  for (int64_t i = 0; i < m; ++i) {
    for (int ii = 0; ii < mr; ++ii) Vp[i * MR + ii] = v[(r0 + ii) * m + i];
    for (int ii = mr; ii < MR; ++ii) Vp[i * MR + ii] = T(0);
  }
}

// GEMM-1 B panel, gathered feature-major: Pb[i, c] = pt[q0 + c, i] for the panel's NR rows (zero past
// `rows`). The rows of a panel are runs of consecutive output pixels of one image row; for each
// feature and run the window reads consecutive input pixels x[img, c, ih + ky, iw0 + kx + j]: a
// strided copy (contiguous for NCHW), zero where it leaves the image. No per-element addressing.
template <typename Tin, typename Tacc>
TD_TARGET_CLONES void gather_panel_t(const Tin* x, const PatchAddress& A, const FeatureTable& F, const ChunkRows& Rw,
                                     int64_t q0, int64_t rows, int64_t m, Tacc* Pb) {
  constexpr int nr = NR<Tacc>;
  const int hi = static_cast<int>(std::min<int64_t>(nr, rows));
  const int64_t d = A.d, sw = A.xs.w;
  for (int c0 = 0; c0 < hi;) {
    // a run: rows c0..c1 - 1 of one image row (consecutive ow, so consecutive iw)
    int c1 = c0 + 1;
    while (c1 < hi && Rw.ih[q0 + c1] == Rw.ih[q0 + c0] && Rw.iw[q0 + c1] == Rw.iw[q0 + c1 - 1] + 1 &&
           Rw.base[q0 + c1] == Rw.base[q0 + c1 - 1] + sw)
      ++c1;
    const int64_t ih = Rw.ih[q0 + c0], iw0 = Rw.iw[q0 + c0], base = Rw.base[q0 + c0];
    const int len = c1 - c0;
    for (int64_t i = 0; i < d; ++i) {
      Tacc* dst = Pb + i * nr + c0;
      const int64_t h = ih + F.ky[i];
      if (static_cast<uint64_t>(h) >= static_cast<uint64_t>(A.H)) {
        for (int j = 0; j < len; ++j) dst[j] = Tacc(0);
        continue;
      }
      // j valid when 0 <= iw0 + kx + j < W
      const int64_t w0 = iw0 + F.kx[i];
      const int jlo = static_cast<int>(std::min<int64_t>(len, std::max<int64_t>(0, -w0)));
      const int jhi = static_cast<int>(std::max<int64_t>(jlo, std::min<int64_t>(len, A.W - w0)));
      for (int j = 0; j < jlo; ++j) dst[j] = Tacc(0);
      const Tin* src = x + (base + F.off[i] + jlo * sw);  // inside x for jlo <= j < jhi
      if (sw == 1) {
        for (int j = jlo; j < jhi; ++j) dst[j] = convert<Tacc>(src[j - jlo]);
      } else {
        for (int j = jlo; j < jhi; ++j) dst[j] = convert<Tacc>(src[(j - jlo) * sw]);
      }
      for (int j = jhi; j < len; ++j) dst[j] = Tacc(0);
    }
    if (A.bias)
      for (int j = 0; j < len; ++j) Pb[d * nr + c0 + j] = Tacc(1);
    c0 = c1;
  }
  if (hi < nr)
    for (int64_t i = 0; i < m; ++i)
      for (int c = hi; c < nr; ++c) Pb[i * nr + c] = Tacc(0);
}

// GEMM-2 B panels from the GEMM-1 ones: XB[t][q, c] = pt[q, t NR + c] = Pb[q / NR][t NR + c, q % NR]
// (rows < kc; the columns past m stay zero), transposed in 8 x 8 blocks.
template <typename T>
TD_TARGET_CLONES void panels_to_tiles(const T* Pb, int64_t kc, int64_t m, T* XB) {
  constexpr int nr = NR<T>;
  constexpr int TB = 8;
  for (int64_t q0 = 0; q0 < kc; q0 += TB) {
    const int qb = static_cast<int>(std::min<int64_t>(TB, kc - q0));
    const T* panel = Pb + (q0 / nr) * m * nr + (q0 % nr);
    for (int64_t i0 = 0; i0 < m; i0 += TB) {
      const int ib = static_cast<int>(std::min<int64_t>(TB, m - i0));
      T* tile = XB + (i0 / nr) * KC * nr + (i0 % nr);
      for (int qq = 0; qq < qb; ++qq) {
        T* dst = tile + (q0 + qq) * nr;
        for (int ii = 0; ii < ib; ++ii) dst[ii] = panel[(i0 + ii) * nr + qq];
      }
    }
  }
}

template <typename T>
TD_TARGET_CLONES void gemm1_task(int64_t m, const T* Vp, const T* Pb, T* YT, int64_t ldy, int mr, int hi) {
  microkernel<T>(m, Vp, Pb, YT, ldy, mr, 0, hi);
}

// GEMM-2 for one row block of out: A2[q, ii] = p[row q, r0 + ii] * Y^T[r0 + ii, q]; acc += A2^T XB.
template <typename Tin, typename Tacc>
TD_TARGET_CLONES void gemm2_task(const Tin* p, const int64_t* prow, int64_t pc, const Tacc* YT, int64_t ldy,
                                 int64_t n, int64_t m, int64_t kc, int64_t r0, const Tacc* XB, Tacc* A2, Tacc* acc) {
  constexpr int nr = NR<Tacc>;
  const int mr = static_cast<int>(std::min<int64_t>(MR, n - r0));
  for (int64_t q = 0; q < kc; ++q) {
    const Tin* row = p + prow[q] + r0 * pc;
    for (int ii = 0; ii < mr; ++ii) A2[q * MR + ii] = convert<Tacc>(row[ii * pc]) * YT[(r0 + ii) * ldy + q];
    for (int ii = mr; ii < MR; ++ii) A2[q * MR + ii] = Tacc(0);
  }
  for (int64_t j0 = 0; j0 < m; j0 += nr) {
    const int hi = static_cast<int>(std::min<int64_t>(nr, m - j0));
    microkernel<Tacc>(kc, A2, XB + (j0 / nr) * KC * nr, acc + r0 * m + j0, m, mr, 0, hi);
  }
}

template <typename Tin, typename Tacc>
void matvec_impl(const ConvSensitivityMatvecParams& P) {
  constexpr int nr = NR<Tacc>;
  const ConvGeometry& g = P.g;
  const PatchAddress A(g, P.xs, P.ps);
  const FeatureTable F(A);
  const int64_t m = g.m(), n = g.n, R = g.rows();
  const int64_t nchunks = (R + KC - 1) / KC;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(1, P.num_threads), nchunks)));
  const int64_t nrb = (n + MR - 1) / MR;   // channel blocks (GEMM-1 rows, GEMM-2 rows)
  const int64_t npb = (KC + nr - 1) / nr;  // patch-row panels per chunk (GEMM-1 columns)
  const int64_t nxt = (m + nr - 1) / nr;   // feature tiles (GEMM-2 columns)
  const int64_t per_thread = npb * m * nr + nxt * KC * nr + n * KC + KC * MR + n * m;
  AlignedBuffer<Tacc> Vp(nrb * m * MR), work(static_cast<int64_t>(nt) * per_thread);
  std::vector<int64_t> rowtab(static_cast<size_t>(nt * 4 * KC));
  const Tin* x = static_cast<const Tin*>(P.x);
  const Tin* p = static_cast<const Tin*>(P.p);
  const Tacc* v = static_cast<const Tacc*>(P.v);
  Tacc* out = static_cast<Tacc*>(P.out);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id(), T = team_size();
    Tacc* Pb = work.get() + static_cast<int64_t>(tid) * per_thread;
    Tacc* XB = Pb + npb * m * nr;   // [nxt][KC, NR]: the chunk's patches as GEMM-2's B panels
    Tacc* YT = XB + nxt * KC * nr;  // [n, KC]
    Tacc* A2 = YT + n * KC;
    Tacc* acc = A2 + KC * MR;
    int64_t* rt = rowtab.data() + static_cast<int64_t>(tid) * 4 * KC;
    ChunkRows Rw{rt, rt + KC, rt + 2 * KC, rt + 3 * KC};
    std::fill(acc, acc + n * m, Tacc(0));
    std::fill(XB, XB + nxt * KC * nr, Tacc(0));  // the last tile's columns past m stay zero
#pragma omp for schedule(static)
    for (int64_t rb = 0; rb < nrb; ++rb) pack_v_rows<Tacc>(v, n, m, rb * MR, Vp.get() + rb * m * MR);
    for (int64_t c = nchunks * tid / T; c < nchunks * (tid + 1) / T; ++c) {
      const int64_t s0 = c * KC, kc = std::min(KC, R - s0);
      const int64_t pbs = (kc + nr - 1) / nr;
      Rw.decode(A, s0, kc);
      for (int64_t pb = 0; pb < pbs; ++pb)
        gather_panel_t<Tin, Tacc>(x, A, F, Rw, pb * nr, kc - pb * nr, m, Pb + pb * m * nr);
      panels_to_tiles<Tacc>(Pb, kc, m, XB);
      for (int64_t r = 0; r < n; ++r) std::fill(YT + r * KC, YT + r * KC + kc, Tacc(0));
      for (int64_t rb = 0; rb < nrb; ++rb)
        for (int64_t pb = 0; pb < pbs; ++pb)
          gemm1_task<Tacc>(m, Vp.get() + rb * m * MR, Pb + pb * m * nr, YT + rb * MR * KC + pb * nr, KC,
                           static_cast<int>(std::min<int64_t>(MR, n - rb * MR)),
                           static_cast<int>(std::min<int64_t>(nr, kc - pb * nr)));
      for (int64_t rb = 0; rb < nrb; ++rb)
        gemm2_task<Tin, Tacc>(p, Rw.prow, P.ps.c, YT, KC, n, m, kc, rb * MR, XB, A2, acc);
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) sum_accumulators(out, r, m, work.get() + (per_thread - n * m), per_thread, T);
  }
}

// ---------------------------------------------------------------------------------------------
// matvec for few channels: direct convolution, no patch buffers

// With few output channels (the Lanczos steps where most blocks have converged) the GEMM path
// above is bound by gathering and transposing m patch values per output pixel, whatever n is.
// This path reads each image once into a zero-padded copy xs [C][Hp * Wp + k] (Hp = H + 2 pad,
// Wp = W + 2 pad; the k trailing zeros keep the last window in bounds) and indexes output pixels
// on the padded grid, j = oh * Wp + ow for j < L = Ho * Wp (columns ow >= Wo are scratch, masked
// out below). Feature f = (c, ky, kx) of output j is then xs[c][j + ky Wp + kx] (its offset from
// PatchAddress on the padded copy): one contiguous run per feature, so both GEMMs are unit-stride
// loops over j:
//   Y[r, j] = v[r, d] + sum_f v[r, f] xs_f[j]                       (GEMM-1, axpys)
//   A[r, j] = p[img, r, oh, ow] Y[r, j]  (0 on scratch columns)
//   acc[r, f] += sum_j A[r, j] xs_f[j],  acc[r, d] += sum_j A[r, j]   (GEMM-2, dots)
// Images are split statically over the threads; each thread sums into its own [n, m] accumulator
// and the accumulators are added in thread order (deterministic for a given thread count).
constexpr int64_t kDirectMaxN = 8;  // channels up to which the direct path is used (measured)
constexpr int64_t kDirectJB = 32;   // output positions per register block of GEMM-1

template <typename Tin, typename Tacc>
TD_TARGET_CLONES void direct_image(const Tin* x, const Strides4& xs, const Tin* p, const Strides4& ps,
                                   const ConvGeometry& g, const Tacc* v, const int64_t* foff, Tacc* xbuf,
                                   Tacc* ybuf, Tacc* acc) {
  const int64_t C = g.C, H = g.H, W = g.W, k = g.k, pad = g.pad, n = g.n, m = g.m(), d = g.d();
  const int64_t Ho = g.Ho(), Wo = g.Wo(), Hp = H + 2 * pad, Wp = W + 2 * pad;
  const int64_t cs = Hp * Wp + k, L = Ho * Wp;
  // the padded image (zeros are written once per call by the caller; only the interior changes)
  for (int64_t c = 0; c < C; ++c)
    for (int64_t ih = 0; ih < H; ++ih) {
      Tacc* dst = xbuf + c * cs + (ih + pad) * Wp + pad;
      const Tin* src = x + c * xs.c + ih * xs.h;
      for (int64_t iw = 0; iw < W; ++iw) dst[iw] = convert<Tacc>(src[iw * xs.w]);
    }
  // GEMM-1 in register blocks of kDirectJB positions x n channels
  for (int64_t j0 = 0; j0 < L; j0 += kDirectJB) {
    const int64_t jb = std::min(kDirectJB, L - j0);
    Tacc y[kDirectMaxN][kDirectJB];
    for (int64_t r = 0; r < n; ++r)
      for (int64_t jj = 0; jj < kDirectJB; ++jj) y[r][jj] = g.bias ? v[r * m + d] : Tacc(0);
    for (int64_t f = 0; f < d; ++f) {
      const Tacc* xr = xbuf + foff[f] + j0;
      for (int64_t r = 0; r < n; ++r) {
        const Tacc w = v[r * m + f];
        for (int64_t jj = 0; jj < kDirectJB; ++jj) y[r][jj] += w * xr[jj];
      }
    }
    for (int64_t r = 0; r < n; ++r)
      for (int64_t jj = 0; jj < jb; ++jj) ybuf[r * L + j0 + jj] = y[r][jj];
  }
  // A = p .* Y on the output pixels, 0 on the scratch columns
  for (int64_t r = 0; r < n; ++r)
    for (int64_t oh = 0; oh < Ho; ++oh) {
      Tacc* a = ybuf + r * L + oh * Wp;
      const Tin* pr = p + r * ps.c + oh * ps.h;
      for (int64_t ow = 0; ow < Wo; ++ow) a[ow] *= convert<Tacc>(pr[ow * ps.w]);
      for (int64_t ow = Wo; ow < Wp; ++ow) a[ow] = Tacc(0);
    }
  // GEMM-2: one dot per (channel, feature) over the L positions
  for (int64_t r = 0; r < n; ++r) {
    const Tacc* a = ybuf + r * L;
    Tacc* o = acc + r * m;
    for (int64_t f = 0; f < d; ++f) o[f] += static_cast<Tacc>(dot<Tacc>(a, xbuf + foff[f], L));
    if (g.bias) {
      Tacc sum = 0;
      for (int64_t j = 0; j < L; ++j) sum += a[j];
      o[d] += sum;
    }
  }
}

template <typename Tin, typename Tacc>
void matvec_direct(const ConvSensitivityMatvecParams& P) {
  const ConvGeometry& g = P.g;
  const int64_t C = g.C, k = g.k, n = g.n, m = g.m();
  const int64_t Hp = g.H + 2 * g.pad, Wp = g.W + 2 * g.pad, cs = Hp * Wp + k, L = g.Ho() * Wp;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::max(1, P.num_threads), g.N)));
  // the features' offsets by the kernels' one addressing scheme (PatchAddress), applied to the
  // padded copy: an unpadded geometry of Hp x Wp images with strides (C cs, cs, Wp, 1)
  ConvGeometry gp = g;
  gp.H = Hp;
  gp.W = Wp;
  gp.pad = 0;
  const FeatureTable F(PatchAddress(gp, Strides4{C * cs, cs, Wp, 1, 0}, P.ps));
  const int64_t* foff = F.off.data();
  // per thread: the padded image (C cs, plus kDirectJB zeros: GEMM-1's last register block reads
  // up to kDirectJB - 3 elements past the last channel), Y/A (n L, rounded up to whole register
  // blocks) and the accumulator (n m)
  const int64_t xlen = C * cs + kDirectJB;
  const int64_t ylen = n * ((L + kDirectJB - 1) / kDirectJB) * kDirectJB;
  const int64_t per_thread = xlen + ylen + n * m;
  AlignedBuffer<Tacc> work(static_cast<int64_t>(nt) * per_thread);
  const Tin* x = static_cast<const Tin*>(P.x);
  const Tin* p = static_cast<const Tin*>(P.p);
  const Tacc* v = static_cast<const Tacc*>(P.v);
  Tacc* out = static_cast<Tacc*>(P.out);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_id(), T = team_size();
    Tacc* xbuf = work.get() + static_cast<int64_t>(tid) * per_thread;
    Tacc* ybuf = xbuf + xlen;
    Tacc* acc = ybuf + ylen;
    std::fill(xbuf, xbuf + xlen, Tacc(0));
    std::fill(acc, acc + n * m, Tacc(0));
    for (int64_t img = g.N * tid / T; img < g.N * (tid + 1) / T; ++img)
      direct_image<Tin, Tacc>(x == nullptr ? x : x + img * P.xs.n, P.xs, p + img * P.ps.n, P.ps, g, v, foff, xbuf,
                              ybuf, acc);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t r = 0; r < n; ++r) sum_accumulators(out, r, m, work.get() + (per_thread - n * m), per_thread, T);
  }
}

// ---------------------------------------------------------------------------------------------
// matrix-free Lanczos operator

// A v for the Lanczos CPU backend (T = the Lanczos dtype = the matvec's acc dtype), problem by
// problem of the batch. Once a fifth of a problem's blocks have converged, the costate channels of
// the active ones are gathered (channels last, [N, Ho, Wo, na]) and only those blocks are applied:
// the GEMMs shrink with them; a problem with no active block is skipped.
template <typename T>
class ConvOperator final : public LanczosOperator {
 public:
  explicit ConvOperator(const ConvSensitivityMatvecParams& op) : op_(op) {}

  int64_t workspace_elems(bool) const override { return 0; }

  void apply(const void* v, void* out, const uint8_t* active, void* /*workspace*/) const override {
    const int64_t n = op_.g.n, m = op_.g.m();
    for (int64_t b = 0; b < op_.g.batch; ++b) {
      ConvSensitivityMatvecParams P = op_;
      P.g.batch = 1;
      const size_t es = static_cast<size_t>(dtype_size(op_.in_dtype));
      if (op_.x != nullptr) P.x = static_cast<const char*>(op_.x) + static_cast<size_t>(b * op_.xs.b) * es;
      if (op_.p != nullptr) P.p = static_cast<const char*>(op_.p) + static_cast<size_t>(b * op_.ps.b) * es;
      apply_one(P, static_cast<const T*>(v) + b * n * m, static_cast<T*>(out) + b * n * m,
                active == nullptr ? nullptr : active + b * n);
    }
  }

 private:
  // One problem of the batch (P.g.batch == 1): v, out [n, m]; active [n] or nullptr.
  void apply_one(ConvSensitivityMatvecParams P, const T* v, T* out, const uint8_t* active) const {
    const int64_t n = P.g.n, m = P.g.m();
    act_.clear();
    for (int64_t b = 0; b < n; ++b)
      if (active == nullptr || active[b]) act_.push_back(b);
    const int64_t na = static_cast<int64_t>(act_.size());
    if (na == 0) return;
    if (na * 5 >= n * 4) {
      P.v = v;
      P.out = out;
      conv_sensitivity_matvec_cpu(P);
      return;
    }
    const ConvGeometry& g = P.g;
    const int64_t Ho = g.Ho(), Wo = g.Wo(), hw = Ho * Wo;
    const size_t es = static_cast<size_t>(dtype_size(P.in_dtype));
    pbuf_.resize(static_cast<size_t>(g.N * hw * na) * es);
    const unsigned char* src = static_cast<const unsigned char*>(P.p);
    unsigned char* dstb = pbuf_.data();
    const Strides4 ps = P.ps;
    const std::vector<int64_t>& act = act_;
#pragma omp parallel for num_threads(std::max(1, P.num_threads)) schedule(static)
    for (int64_t pix = 0; pix < g.N * hw; ++pix) {
      const int64_t img = pix / hw, rem = pix - img * hw, oh = rem / Wo, ow = rem - oh * Wo;
      const unsigned char* row = src + static_cast<size_t>(img * ps.n + oh * ps.h + ow * ps.w) * es;
      unsigned char* dst = dstb + static_cast<size_t>(pix * na) * es;
      gather_active(row, es, ps.c, act.data(), na, dst);
    }
    vbuf_.resize(static_cast<size_t>(na * m));
    wbuf_.resize(static_cast<size_t>(na * m));
    for (int64_t c = 0; c < na; ++c) std::copy(v + act[c] * m, v + (act[c] + 1) * m, vbuf_.data() + c * m);
    P.g.n = na;
    P.p = pbuf_.data();
    P.ps = Strides4{hw * na, 1, Wo * na, na};
    P.v = vbuf_.data();
    P.out = wbuf_.data();
    conv_sensitivity_matvec_cpu(P);
    for (int64_t c = 0; c < na; ++c) std::copy(wbuf_.data() + c * m, wbuf_.data() + (c + 1) * m, out + act[c] * m);
  }

  ConvSensitivityMatvecParams op_;
  mutable std::vector<int64_t> act_;
  mutable std::vector<unsigned char> pbuf_;  // costate channels of the active blocks
  mutable std::vector<T> vbuf_, wbuf_;
};

}  // namespace
}  // namespace cpu

namespace {
// What the kernels need beyond validate's span checks (they also run without the bindings).
template <class Params>
void check_geometry(const char* fn, const Params& P) {
  const ConvGeometry& g = P.g;
  if (g.N < 0 || g.C < 0 || g.H < 0 || g.W < 0 || g.n < 0 || g.k < 1 || g.pad < 0)
    fail(fn, "sizes must be >= 0 (kernel_size >= 1)");
  if (g.batch < 0) fail(fn, "batch must be >= 0");
  if (g.m() < 1) fail(fn, "m = C k k + bias must be >= 1");
  if (g.rows() > 0 && g.problems() > 0 && ((g.d() > 0 && P.x == nullptr) || P.p == nullptr))
    fail(fn, "x and p must not be null");
}

// Problem b of a batch as a batch of one: x, p advanced by their batch strides, out by out_elems.
template <class Params>
Params batch_item(const Params& P, int64_t b, int64_t out_elems) {
  Params Q = P;
  Q.g.batch = 1;
  const size_t es = static_cast<size_t>(dtype_size(P.in_dtype));
  if (P.x != nullptr) Q.x = static_cast<const char*>(P.x) + static_cast<size_t>(b * P.xs.b) * es;
  if (P.p != nullptr) Q.p = static_cast<const char*>(P.p) + static_cast<size_t>(b * P.ps.b) * es;
  Q.out = static_cast<char*>(P.out) + static_cast<size_t>(out_elems) * dtype_size(P.acc_dtype);
  return Q;
}
}  // namespace

void conv_sensitivity_blocks_cpu(const ConvSensitivityBlocksParams& params) {
  const char* fn = "conv_sensitivity_blocks";
  check_geometry(fn, params);
  if (params.g.rows() == 0 || params.g.problems() == 0) return;
  if (params.out == nullptr) fail(fn, "out must not be null");
  const int64_t m = params.g.m();
  for (int64_t b = 0; b < params.g.batch; ++b) {  // the problems of a batch one after the other
    const ConvSensitivityBlocksParams P = batch_item(params, b, b * params.g.n * m * m);
    cpu::dispatch_dtypes(fn, P.in_dtype, P.acc_dtype, [&](auto tin, auto tacc) {
      cpu::blocks_impl<decltype(tin), decltype(tacc)>(P);
    });
  }
}

void conv_sensitivity_matvec_cpu(const ConvSensitivityMatvecParams& params) {
  const char* fn = "conv_sensitivity_matvec";
  check_geometry(fn, params);
  if (params.g.problems() == 0) return;
  if (params.out == nullptr || params.v == nullptr) fail(fn, "v and out must not be null");
  cpu::zero_acc(params.out, params.acc_dtype, params.g.problems() * params.g.m());
  if (params.g.rows() == 0) return;
  const int64_t nm = params.g.n * params.g.m();
  for (int64_t b = 0; b < params.g.batch; ++b) {  // the problems of a batch one after the other
    ConvSensitivityMatvecParams P = batch_item(params, b, b * nm);
    P.v = static_cast<const char*>(params.v) + static_cast<size_t>(b * nm) * dtype_size(params.acc_dtype);
    cpu::dispatch_dtypes(fn, P.in_dtype, P.acc_dtype, [&](auto tin, auto tacc) {
      if (P.g.n <= cpu::kDirectMaxN)
        cpu::matvec_direct<decltype(tin), decltype(tacc)>(P);
      else
        cpu::matvec_impl<decltype(tin), decltype(tacc)>(P);
    });
  }
}

void conv_lanczos_topk_cpu(LanczosParams P, const ConvSensitivityMatvecParams& op) {
  const char* fn = "conv_sensitivity_lanczos";
  check_geometry(fn, op);
  if (op.g.problems() != P.num_problems || op.g.m() != P.m)
    fail(fn, "the operator must have batch n = num_problems and m = the Lanczos m");
  if (op.acc_dtype != P.dtype) fail(fn, "op.acc_dtype must equal the Lanczos dtype");
  P.a = nullptr;
  if (P.dtype == DType::kFloat32) {
    const cpu::ConvOperator<float> A(op);
    P.external = &A;
    lanczos_topk_cpu(P);
  } else if (P.dtype == DType::kFloat64) {
    const cpu::ConvOperator<double> A(op);
    P.external = &A;
    lanczos_topk_cpu(P);
  } else {
    fail(fn, std::string("dtype must be float32 or float64, got ") + dtype_name(P.dtype));
  }
}

}  // namespace topoderiv
