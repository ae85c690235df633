// Pieces shared by the CPU sensitivity kernels of rows (sensitivity_cpu.cpp) and of convolution
// patches (conv_sensitivity_cpu.cpp): aligned buffers, the OpenMP thread helpers, the chunk size,
// the upper-triangle tiling of the blocks, the P^T panel packing and the register-tile epilogue of
// the blocks GEMM, the mirror of the lower triangle, the per-thread accumulator sum of the matvecs,
// and the (input, accumulation) dtype dispatch. The two kernels differ only in how they address
// (row, feature) and p's rows; the hot pieces here are TD_INLINE and take that addressing as
// arguments, so each kernel inlines them into its own target clones (TD_TARGET_CLONES) and the
// generated code is that of the copies they replace.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu/microkernel.h"
#include "topoderiv/common.h"

namespace topoderiv {
namespace cpu {

constexpr int64_t KC = 256;  // rows (samples, tokens or output pixels) per chunk

// n elements of T, 64-byte aligned (at least one element), freed on destruction.
template <typename T>
struct AlignedBuffer {
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> ptr;
  explicit AlignedBuffer(int64_t n) {
    size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T);
    bytes = (bytes + 63) / 64 * 64;
    ptr.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (!ptr) throw std::bad_alloc();
  }
  T* get() const { return ptr.get(); }
};

template <typename E>
inline void gather_active_typed(const unsigned char* row, int64_t cstride, const int64_t* act, int64_t na,
                                unsigned char* dst) {
  const E* in = reinterpret_cast<const E*>(row);
  E* out = reinterpret_cast<E*>(dst);
  for (int64_t c = 0; c < na; ++c) out[c] = in[act[c] * cstride];
}

// dst[c] = row[act[c] * cstride] for c < na, elements of es bytes (2, 4 or 8): one row's costate
// channels of the active blocks, for the matrix-free Lanczos operators (a typed loop, not one
// memcpy call per element)
inline void gather_active(const unsigned char* row, size_t es, int64_t cstride, const int64_t* act, int64_t na,
                          unsigned char* dst) {
  if (es == 8)
    gather_active_typed<uint64_t>(row, cstride, act, na, dst);
  else if (es == 4)
    gather_active_typed<uint32_t>(row, cstride, act, na, dst);
  else
    gather_active_typed<uint16_t>(row, cstride, act, na, dst);
}

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Upper-triangle tiles: the pairs (i, j), j >= i, in row-major order, cut into tiles of NR
// consecutive pairs. A tile is a few runs of consecutive columns of one row each (one run when
// the row is long, several near the end of the triangle), so no column slot is wasted whatever m.
struct Run {
  int c0, c1;     // tile columns [c0, c1)
  int64_t i, j0;  // row i, first column j0 (column j0 + c - c0 for tile column c)
};
struct TriangleTiles {
  std::vector<Run> runs;       // the runs of all tiles, tile by tile
  std::vector<int64_t> first;  // tile t: runs[first[t], first[t + 1])
  int64_t size() const { return static_cast<int64_t>(first.size()) - 1; }
};

inline TriangleTiles triangle_tiles(int64_t m, int nr) {
  TriangleTiles t;
  t.first.push_back(0);
  int used = 0;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = i; j < m;) {
      const int take = static_cast<int>(std::min<int64_t>(nr - used, m - j));
      t.runs.push_back(Run{used, used + take, i, j});
      used += take;
      j += take;
      if (used == nr) {
        t.first.push_back(static_cast<int64_t>(t.runs.size()));
        used = 0;
      }
    }
  }
  if (used > 0) t.first.push_back(static_cast<int64_t>(t.runs.size()));
  return t;
}

// A panel of P^T for a chunk of kc rows: Ap[k, ii] = p_row(k)[(r0 + ii) * pc] (zero past n), where
// p_row(k) points at channel 0 of row k and pc is the channel stride.
template <typename Tin, typename Tacc, class PRow>
TD_INLINE void pack_p_panel_at(PRow p_row, int64_t pc, int64_t n, int64_t r0, int64_t kc, Tacc* Ap) {
  const int mr = static_cast<int>(std::min<int64_t>(MR, n - r0));
  for (int64_t k = 0; k < kc; ++k) {
    const Tin* row = p_row(k) + r0 * pc;
    Tacc* dst = Ap + k * MR;
    for (int ii = 0; ii < mr; ++ii) dst[ii] = convert<Tacc>(row[ii * pc]);
    for (int ii = mr; ii < MR; ++ii) dst[ii] = Tacc(0);
  }
}

// The blocks GEMM's epilogue for one tile (runs[0, nruns)) over a chunk of kc rows: every P^T panel
// (Apack: [KC, MR] each) times the tile's panel Bp [kc, NR], added to out [n, m, m] at the tile's
// pairs (i, j). kPrefetch: before each row block, request the next one's outputs (MR rows m^2
// elements apart, which the hardware prefetcher does not see coming; they arrive during the K loop).
template <typename T, bool kPrefetch>
TD_INLINE void add_tile_products(int64_t kc, const T* Apack, const T* Bp, const Run* runs, int nruns, int64_t n,
                                 int64_t m, T* out) {
  constexpr int nr = NR<T>;
  const int used = runs[nruns - 1].c1;
  const int64_t mm = m * m;
  alignas(64) T acc[MR * nr];
  for (int64_t r0 = 0; r0 < n; r0 += MR) {
    const int mr = static_cast<int>(std::min<int64_t>(MR, n - r0));
    if (kPrefetch && r0 + MR < n) {
      const int64_t rp = r0 + MR;
      const int mp = static_cast<int>(std::min<int64_t>(MR, n - rp));
      for (int ii = 0; ii < mp; ++ii) {
        const T* o = out + (rp + ii) * mm;
        for (int q = 0; q < nruns; ++q) {
          const Run& ru = runs[q];
          const T* a = o + ru.i * m + ru.j0;
          for (int c = 0; c < ru.c1 - ru.c0; c += kLanes<T>) __builtin_prefetch(a + c, 1, 3);
          __builtin_prefetch(a + (ru.c1 - ru.c0) - 1, 1, 3);
        }
      }
    }
    if (nruns == 1) {  // one run: the outputs are contiguous, add in place
      const Run& ru = runs[0];
      microkernel<T>(kc, Apack + (r0 / MR) * KC * MR, Bp, out + r0 * mm + ru.i * m + ru.j0, mm, mr, 0, used);
      continue;
    }
    std::memset(acc, 0, sizeof(acc));
    microkernel<T>(kc, Apack + (r0 / MR) * KC * MR, Bp, acc, nr, MR, 0, nr);
    for (int ii = 0; ii < mr; ++ii) {
      T* o = out + (r0 + ii) * mm;
      const T* a = acc + ii * nr;
      for (int q = 0; q < nruns; ++q) {
        const Run& ru = runs[q];
        T* dst = o + ru.i * m + ru.j0 - ru.c0;
        for (int c = ru.c0; c < ru.c1; ++c) dst[c] += a[c];
      }
    }
  }
}

// out[r, i, j] = out[r, j, i] for j < i (the lower triangles from the upper ones), n blocks m x m.
template <typename T>
void mirror_lower(T* out, int64_t n, int64_t m, int nthreads) {
  constexpr int64_t TB = 32;
#pragma omp parallel for num_threads(nthreads) schedule(static) collapse(2)
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t ib = 0; ib < m; ib += TB) {
      T* a = out + r * m * m;
      for (int64_t jb = 0; jb <= ib; jb += TB) {
        for (int64_t i = ib; i < std::min(ib + TB, m); ++i)
          for (int64_t j = jb; j < std::min({jb + TB, m, i}); ++j) a[i * m + j] = a[j * m + i];
      }
    }
  }
}

// Row r of the matvec output: o[j] = sum over threads t < T (in thread order: deterministic for a
// given thread count) of acc_t[r, j], thread t's [n, m] accumulator at acc0 + t * stride.
template <typename T>
TD_INLINE void sum_accumulators(T* out, int64_t r, int64_t m, const T* acc0, int64_t stride, int nthreads) {
  T* o = out + r * m;
  std::fill(o, o + m, T(0));
  for (int t = 0; t < nthreads; ++t) {
    const T* a = acc0 + static_cast<int64_t>(t) * stride + r * m;
    for (int64_t j = 0; j < m; ++j) o[j] += a[j];
  }
}

// Sets count elements of the accumulation dtype at out to zero.
inline void zero_acc(void* out, DType acc, int64_t count) {
  if (acc == DType::kFloat32) {
    std::fill(static_cast<float*>(out), static_cast<float*>(out) + count, 0.0f);
  } else {
    std::fill(static_cast<double*>(out), static_cast<double*>(out) + count, 0.0);
  }
}

// Calls f(Tin{}, Tacc{}) for the supported (input, accumulation) dtype pairs: (float32, float32),
// (bfloat16, float32), (float64, float64), (float32, float64), (bfloat16, float64).
template <class F>
void dispatch_dtypes(const char* fn, DType in, DType acc, F f) {
  if (in == DType::kFloat32 && acc == DType::kFloat32) return f(float{}, float{});
  if (in == DType::kBFloat16 && acc == DType::kFloat32) return f(bf16{}, float{});
  if (in == DType::kFloat64 && acc == DType::kFloat64) return f(double{}, double{});
  if (in == DType::kFloat32 && acc == DType::kFloat64) return f(float{}, double{});
  if (in == DType::kBFloat16 && acc == DType::kFloat64) return f(bf16{}, double{});
  fail(fn, std::string("unsupported (input, accumulation) dtypes (") + dtype_name(in) + ", " + dtype_name(acc) + ")");
}

}  // namespace cpu
}  // namespace topoderiv
