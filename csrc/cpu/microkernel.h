// CPU building blocks: portable SIMD (GCC vector extensions), a register-blocked GEMM micro-kernel
// and input conversion. The vector width is fixed at 64 bytes; the compiler lowers it to one
// AVX-512 register, two AVX2 registers or four SSE registers depending on the target the calling
// function is cloned for (TD_TARGET_CLONES), so one source serves every x86-64 CPU.
#pragma once
#include <cstdint>
#include <cstring>

#include "topoderiv/common.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(TOPODERIV_NO_TARGET_CLONES)
#define TD_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TD_TARGET_CLONES
#endif
#define TD_INLINE inline __attribute__((always_inline))

namespace topoderiv {
namespace cpu {

typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));

template <typename T> struct VecOf;
template <> struct VecOf<float> { using type = f32x16; };
template <> struct VecOf<double> { using type = f64x8; };

// Micro-kernel shape: MR rows of C by NR = 2 vectors of columns.
constexpr int MR = 8;
template <typename T> constexpr int kLanes = 64 / sizeof(T);
template <typename T> constexpr int NR = 2 * kLanes<T>;

// bfloat16 is passed around as its raw 16 bits.
struct bf16 { uint16_t bits; };

TD_INLINE float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <typename Tacc, typename Tin> TD_INLINE Tacc convert(Tin v) { return static_cast<Tacc>(v); }
template <> TD_INLINE float convert<float, bf16>(bf16 v) { return to_float(v); }
template <> TD_INLINE double convert<double, bf16>(bf16 v) { return static_cast<double>(to_float(v)); }

template <typename T> TD_INLINE typename VecOf<T>::type vload(const T* p) {
  typename VecOf<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> TD_INLINE void vstore(T* p, typename VecOf<T>::type v) { std::memcpy(p, &v, sizeof(v)); }

// C[i, c] += sum_k A[k, i] * Bp[k, c] for i < mr, lo <= c < hi.
//   A:  packed [K, MR] (rows beyond mr are zero),  Bp: packed [K, NR] (columns beyond hi are zero)
//   C:  row i at C + i * ldc, columns contiguous.
template <typename T>
TD_INLINE void microkernel(int64_t K, const T* __restrict A, const T* __restrict Bp, T* __restrict C,
                           int64_t ldc, int mr, int lo, int hi) {
  using V = typename VecOf<T>::type;
  constexpr int L = kLanes<T>;
  V acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = V{};
  for (int64_t k = 0; k < K; ++k) {
    const V b0 = vload(Bp + k * NR<T>);
    const V b1 = vload(Bp + k * NR<T> + L);
    const T* a = A + k * MR;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      acc[i][0] += b0 * a[i];
      acc[i][1] += b1 * a[i];
    }
  }
  if (mr == MR && lo == 0 && hi == NR<T>) {
    for (int i = 0; i < MR; ++i) {
      T* c = C + i * ldc;
      vstore(c, vload(c) + acc[i][0]);
      vstore(c + L, vload(c + L) + acc[i][1]);
    }
  } else {
    alignas(64) T tmp[NR<T>];
    for (int i = 0; i < mr; ++i) {
      vstore(tmp, acc[i][0]);
      vstore(tmp + L, acc[i][1]);
      T* c = C + i * ldc;
      for (int j = lo; j < hi; ++j) c[j] += tmp[j];
    }
  }
}

// Dot product with vector partial sums (deterministic order), finished in double.
template <typename T>
TD_INLINE double dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  using V = typename VecOf<T>::type;
  constexpr int L = kLanes<T>;
  V s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    s0 += vload(a + i) * vload(b + i);
    s1 += vload(a + i + L) * vload(b + i + L);
  }
  s0 += s1;
  double r = 0.0;
  for (int l = 0; l < L; ++l) r += static_cast<double>(s0[l]);
  for (; i < n; ++i) r += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  return r;
}

// y -= alpha * x
template <typename T>
TD_INLINE void axpy_neg(T* __restrict y, const T* __restrict x, T alpha, int64_t n) {
  constexpr int L = kLanes<T>;
  int64_t i = 0;
  for (; i + L <= n; i += L) vstore(y + i, vload(y + i) - vload(x + i) * alpha);
  for (; i < n; ++i) y[i] -= alpha * x[i];
}

}  // namespace cpu
}  // namespace topoderiv
