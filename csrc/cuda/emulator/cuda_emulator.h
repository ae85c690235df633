// Minimal host emulator for the subset of CUDA the topoderiv kernels use (test tool only, not part
// of the build; see run_emulated_tests.sh). Memory is host memory; streams are synchronous;
// atomicAdd is a plain add (blocks run one at a time).
// Every CUDA thread is a ucontext fiber; the threads of one block run on one OS thread, round by
// round: each round runs every live fiber until it reaches __syncthreads() or returns. The order
// of fibers within a round is configurable (forward, reverse, seeded shuffle) so that results that
// depend on scheduling (missing barriers, races) show up as differences between runs.
// Blocks run one after another, so `static` stands in for `__shared__`.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <stdexcept>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  dim3(unsigned int a = 1, unsigned int b = 1, unsigned int c = 1) : x(a), y(b), z(c) {}
};

namespace emu {
inline uint3 tidx, bidx;
inline dim3 bdim, gdim;
inline int order_mode = 0;  // 0 forward, 1 reverse, 2 shuffle
inline uint64_t order_seed = 1;
inline int64_t barrier_rounds = 0;
inline int64_t blocks_run = 0;

enum class FState { kReady, kBarrier, kDone };
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  FState state = FState::kReady;
};
inline ucontext_t sched_ctx;
inline Fiber* current = nullptr;
inline std::function<void()>* body = nullptr;

// WMMA calls made by each thread of the running block (the shim below): warp-collective operations
// must be called by all 32 threads of a warp, so the counts must agree within a warp at every barrier.
inline std::vector<int64_t> wmma_calls;
inline int cur_thread = 0;
inline void note_wmma() { ++wmma_calls[cur_thread]; }
inline void check_warps_converged(int nt) {
  for (int w = 0; w * 32 < nt; ++w)
    for (int t = w * 32 + 1; t < std::min(nt, w * 32 + 32); ++t)
      if (wmma_calls[t] != wmma_calls[w * 32]) {
        std::fprintf(stderr, "EMU: divergent wmma calls in warp %d (thread %d: %ld, thread %d: %ld)\n", w, w * 32,
                     (long)wmma_calls[w * 32], t, (long)wmma_calls[t]);
        std::abort();
      }
}

inline void trampoline() {
  (*body)();
  current->state = FState::kDone;
  // returning resumes uc_link (the scheduler)
}

inline void syncthreads() {
  current->state = FState::kBarrier;
  swapcontext(&current->ctx, &sched_ctx);
}

inline void run_block(std::function<void()> fn, dim3 block) {
  const int nt = static_cast<int>(block.x * block.y * block.z);
  std::vector<Fiber> fibers(nt);
  body = &fn;
  for (int t = 0; t < nt; ++t) {
    Fiber& f = fibers[t];
    constexpr size_t kStack = 128 * 1024;
    f.stack.reset(new char[kStack]);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &sched_ctx;
    makecontext(&f.ctx, trampoline, 0);
  }
  wmma_calls.assign(nt, 0);
  std::vector<int> order(nt);
  std::mt19937_64 rng(order_seed + static_cast<uint64_t>(blocks_run) * 7919u);
  while (true) {
    for (int t = 0; t < nt; ++t) order[t] = t;
    if (order_mode == 1) std::reverse(order.begin(), order.end());
    if (order_mode == 2) std::shuffle(order.begin(), order.end(), rng);
    for (int t : order) {
      Fiber& f = fibers[t];
      if (f.state == FState::kDone) continue;
      f.state = FState::kReady;
      current = &f;
      cur_thread = t;
      tidx.x = static_cast<unsigned>(t) % block.x;
      tidx.y = (static_cast<unsigned>(t) / block.x) % block.y;
      tidx.z = static_cast<unsigned>(t) / (block.x * block.y);
      swapcontext(&sched_ctx, &f.ctx);
    }
    check_warps_converged(nt);
    int done = 0, waiting = 0;
    for (auto& f : fibers) (f.state == FState::kDone ? done : waiting)++;
    if (waiting == 0) break;
    if (done != 0) {
      std::fprintf(stderr, "EMU: divergent __syncthreads (%d threads done, %d waiting)\n", done,
                   waiting);
      std::abort();
    }
    ++barrier_rounds;
  }
  ++blocks_run;
}
}  // namespace emu

#define threadIdx emu::tidx
#define blockIdx emu::bidx
#define blockDim emu::bdim
#define gridDim emu::gdim
inline void __syncthreads() { emu::syncthreads(); }
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

[[noreturn]] inline void __trap() {
  std::fprintf(stderr, "EMU: __trap()\n");
  std::abort();
}

// ---- bfloat16 + WMMA (nvcuda::wmma) shim -----------------------------------------------------------
// __nv_bfloat16 as its raw bits; __float2bfloat16_rn rounds to nearest even (finite inputs; NaN stays
// a quiet NaN) like the device intrinsic.
struct __nv_bfloat16 {
  uint16_t bits;
};
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0) return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// WMMA is warp-collective on a GPU, each thread holding a slice of a fragment. Here every thread (fiber)
// holds the WHOLE tile and performs the whole operation: for code that calls load/mma/store/fill with
// warp-uniform arguments (and never indexes fragment elements, whose per-thread layout is unspecified)
// the results are identical; each of the 32 threads of a warp stores the same values. The shim checks
// the documented preconditions: the pointer 256-bit aligned, ldm a multiple of 16 bytes, and that all
// 32 threads of a warp make as many calls between barriers (emu::check_warps_converged).
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static constexpr int rows = std::is_same<Use, matrix_b>::value ? K : M;
  static constexpr int cols = std::is_same<Use, matrix_a>::value ? K : N;
  static constexpr int num_elements = rows * cols;
  float v[rows * cols];  // the whole tile, row-major (exact for bf16 and float elements)
};

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
inline void check_ptr(const T* p, unsigned ldm) {
  emu::note_wmma();
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * sizeof(T)) % 16 != 0) {
    std::fprintf(stderr, "EMU: wmma: pointer %p must be 256-bit aligned and ldm (%u) a multiple of 16 bytes\n",
                 static_cast<const void*>(p), ldm);
    std::abort();
  }
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  emu::note_wmma();
  for (float& e : f.v) e = v;
}
template <class Use, int M, int N, int K, class T, class L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout");
  detail::check_ptr(p, ldm);
  using F = fragment<Use, M, N, K, T, L>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c)
      f.v[r * F::cols + c] = detail::to_f(std::is_same<L, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
}
template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* p, unsigned ldm, layout_t l) {
  detail::check_ptr(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) f.v[r * N + c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
template <int M, int N, int K>
inline void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t l) {
  detail::check_ptr(p, ldm);
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r * N + c];
}
// d = a b + c, float accumulation over k in order (d may be c).
template <int M, int N, int K, class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
                     const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  emu::note_wmma();
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float s = c.v[i * N + j];
      for (int k = 0; k < K; ++k) s += a.v[i * K + k] * b.v[k * N + j];
      out[i * N + j] = s;
    }
  std::memcpy(d.v, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda

// ---- runtime API subset --------------------------------------------------------------------------
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
struct emu_stream;
typedef emu_stream* cudaStream_t;
enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4
};
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t) {
  if (n) std::memcpy(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t) {
  if (n) std::memset(d, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 };
namespace emu { inline int num_sms = 8; inline int cc_major = 9; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrComputeCapabilityMajor ? emu::cc_major : emu::num_sms;
  return cudaSuccess;
}
inline float atomicAdd(float* a, float v) { float o = *a; *a = o + v; return o; }
inline double atomicAdd(double* a, double v) { double o = *a; *a = o + v; return o; }

namespace topoderiv {
namespace cuda_detail {
template <typename... KArgs, typename... Args>
inline void launch(const char* op, void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t,
                   Args... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x * block.y * block.z == 0 ||
      block.x * block.y * block.z > 1024 || grid.y > 65535 || grid.z > 65535 ||
      grid.x > 2147483647u) {
    std::fprintf(stderr, "EMU: %s: invalid launch configuration\n", op);
    std::abort();
  }
  std::tuple<KArgs...> targs(static_cast<KArgs>(args)...);
  emu::gdim = grid;
  emu::bdim = block;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emu::bidx = uint3{x, y, z};
        emu::run_block([&] { std::apply(kernel, targs); }, block);
      }
}
}  // namespace cuda_detail
}  // namespace topoderiv
