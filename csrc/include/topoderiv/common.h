// topoderiv core: shared types. Torch-free: kernels see raw typed pointers, sizes, strides, a stream.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#if defined(__CUDACC__)
#define TD_HOST_DEVICE __host__ __device__
#else
#define TD_HOST_DEVICE
#endif

namespace topoderiv {

// Element types the kernels accept. Inputs may be any of the three; accumulation is kFloat32 for
// kFloat32/kBFloat16 inputs and kFloat64 for kFloat64 inputs (or kFloat64 on the CPU when asked).
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kFloat64: return "float64";
    case DType::kBFloat16: return "bfloat16";
  }
  return "unknown";
}

// Deterministic, device-independent pseudo-random numbers (splitmix64). The Lanczos start vectors
// are built from this on the host and on the device, so CPU and CUDA runs start identically.
TD_HOST_DEVICE inline uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [-1, 1) for (seed, problem, restart, index).
TD_HOST_DEVICE inline double start_value(uint64_t seed, int64_t problem, int64_t restart, int64_t i) {
  uint64_t h = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(problem) * 0x100000001B3ull +
                                            static_cast<uint64_t>(restart) * 0x9E3779B1ull) ^
                          splitmix64(static_cast<uint64_t>(i)));
  return static_cast<double>(h >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

[[noreturn]] inline void fail(const std::string& where, const std::string& what) {
  throw std::invalid_argument(where + ": " + what);
}

}  // namespace topoderiv
