// Private helpers shared by the CUDA kernels of topoderiv (not part of the public core headers).
//
// The kernels deliberately use only: blockIdx/threadIdx/blockDim/gridDim, statically sized
// __shared__ arrays, __syncthreads(), plain global loads/stores and atomicAdd (no warp shuffles, no
// cub, no dynamic shared memory). Besides keeping them simple, this lets a host-side
// fiber-per-CUDA-thread emulator run them on machines without a GPU: defining
// TOPODERIV_CUDA_EMULATE="path/to/emulator.h" replaces this header's CUDA part with that file
// (see csrc/cuda/emulator/run_emulated_tests.sh). The normal build never defines it.
#pragma once
// The .cu files are only compiled into CUDA builds (CMake defines TOPODERIV_WITH_CUDA for them);
// defined here too (every .cu includes this header first) so that a standalone nvcc compile sees
// the CUDA declarations of the core headers.
#ifndef TOPODERIV_WITH_CUDA
#define TOPODERIV_WITH_CUDA 1
#endif
#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef TOPODERIV_CUDA_EMULATE
#include TOPODERIV_CUDA_EMULATE
#else
#include <cuda_runtime.h>
#endif

namespace topoderiv {
namespace cuda_detail {

inline void check_cuda(cudaError_t err, const char* op) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
  }
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Makes the device that owns `ptr` current for the scope and restores the previous device after.
// The ops are called from Python custom ops, which get no automatic CUDA device guard: without
// this, tensors on cuda:1 while cuda:0 is current would be launched on device 0 with device 1's
// stream and pointers. Host or null pointers leave the current device alone.
class DeviceGuard {
 public:
  DeviceGuard(const void* ptr, const char* op) {
#ifndef TOPODERIV_CUDA_EMULATE
    if (ptr == nullptr) return;
    cudaPointerAttributes attr{};
    check_cuda(cudaPointerGetAttributes(&attr, ptr), op);
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) return;
    check_cuda(cudaGetDevice(&prev_), op);
    if (attr.device != prev_) {
      check_cuda(cudaSetDevice(attr.device), op);
      restore_ = true;
    }
#else
    (void)ptr;
    (void)op;
#endif
  }
  ~DeviceGuard() {
#ifndef TOPODERIV_CUDA_EMULATE
    if (restore_) (void)cudaSetDevice(prev_);
#endif
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
  bool restore_ = false;
};

#ifndef TOPODERIV_CUDA_EMULATE
// Launches kernel<<<grid, block, 0, stream>>>(args...) and checks the launch.
template <typename... KArgs, typename... Args>
inline void launch(const char* op, void (*kernel)(KArgs...), dim3 grid, dim3 block,
                   cudaStream_t stream, Args... args) {
  kernel<<<grid, block, 0, stream>>>(static_cast<KArgs>(args)...);
  check_cuda(cudaGetLastError(), op);
}
#endif

// Raw bfloat16 (the upper 16 bits of an IEEE float32): conversion to float is exact.
struct bf16_raw {
  uint16_t bits;
};

__device__ __forceinline__ float to_acc_f(float v) { return v; }
__device__ __forceinline__ double to_acc_f(double v) { return v; }
__device__ __forceinline__ float to_acc_f(bf16_raw v) {
  return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

__device__ __forceinline__ float td_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double td_sqrt(double v) { return sqrt(v); }

// Sum of v over the block (blockDim.x == THREADS, 1-D block). red: __shared__ [THREADS].
// Every thread of the block must call it; every thread receives the sum. Deterministic.
template <int THREADS, typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  const int tid = static_cast<int>(threadIdx.x);
  red[tid] = v;
  __syncthreads();
#pragma unroll
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (tid < s) red[tid] += red[tid + s];
    __syncthreads();
  }
  const T r = red[0];
  __syncthreads();  // red may be reused right after
  return r;
}

// Grid sizes: at most this many blocks in a grid-stride dimension.
constexpr int64_t kMaxGridX = 1 << 20;
constexpr int64_t kMaxGridYZ = 65535;

inline unsigned int grid_dim(int64_t want, int64_t cap) {
  if (want < 1) want = 1;
  return static_cast<unsigned int>(want < cap ? want : cap);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda_detail
}  // namespace topoderiv
