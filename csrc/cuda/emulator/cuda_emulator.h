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
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

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
      tidx.x = static_cast<unsigned>(t) % block.x;
      tidx.y = (static_cast<unsigned>(t) / block.x) % block.y;
      tidx.z = static_cast<unsigned>(t) / (block.x * block.y);
      swapcontext(&sched_ctx, &f.ctx);
    }
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
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
namespace emu { inline int num_sms = 8; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) { *v = emu::num_sms; return cudaSuccess; }
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
