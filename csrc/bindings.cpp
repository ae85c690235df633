// The one file that includes pybind11: turns Python ints (pointers, sizes, strides, dtype codes)
// into the core's params structs, releases the GIL and dispatches to the CPU or CUDA kernels.
#include <pybind11/pybind11.h>

#include <string>

#include "topoderiv/lanczos.h"
#include "topoderiv/sensitivity.h"

#ifdef TOPODERIV_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace topoderiv;

namespace {

DType to_dtype(const char* fn, int code) {
  if (code < 0 || code > 2) fail(fn, "unknown dtype code " + std::to_string(code));
  return static_cast<DType>(code);
}

bool is_cuda(const char* fn, const std::string& device) {
  if (device == "cpu") return false;
  if (device == "cuda") {
#ifdef TOPODERIV_WITH_CUDA
    return true;
#else
    throw std::runtime_error(std::string(fn) +
                             ": got CUDA tensors but topoderiv was built without CUDA kernels; rebuild with "
                             "nvcc on PATH: TOPODERIV_CUDA=ON pip install --no-build-isolation --no-deps .");
#endif
  }
  fail(fn, "device must be 'cpu' or 'cuda', got '" + device + "'");
}

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

py::dict build_info() {
  py::dict d;
  d["version"] = TOPODERIV_VERSION_INFO;
#ifdef TOPODERIV_WITH_CUDA
  d["cuda"] = true;
  d["cuda_architectures"] = TOPODERIV_CUDA_ARCHS;
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  d["cuda_runtime"] = std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    d["gpus"] = py::list();
    d["gpu_error"] = std::string(cudaGetErrorString(err));
    cudaGetLastError();
  } else {
    py::list gpus;
    for (int i = 0; i < count; ++i) {
      cudaDeviceProp prop;
      if (cudaGetDeviceProperties(&prop, i) == cudaSuccess)
        gpus.append(std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")");
    }
    d["gpus"] = gpus;
  }
#else
  d["cuda"] = false;
  d["cuda_architectures"] = "";
  d["cuda_runtime"] = "";
  d["gpus"] = py::list();
#endif
#ifdef _OPENMP
  d["openmp"] = true;
#else
  d["openmp"] = false;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "topoderiv core kernels (torch-free C++/CUDA). Use topoderiv.ops, not this module.";
  m.def("build_info", &build_info, "What was built: CUDA kernels, architectures, runtime, visible GPUs.");

  m.def(
      "sensitivity_blocks",
      [](const std::string& device, uintptr_t x, int64_t x_rs, uintptr_t p, int64_t p_rs, uintptr_t out,
         int64_t batch, int64_t N, int64_t d, int64_t n, int64_t x_bs, int64_t p_bs, bool bias, int in_dt,
         int acc_dt, int threads, uintptr_t stream) {
        const char* fn = "sensitivity_blocks";
        SensitivityBlocksParams P;
        P.batch = batch; P.N = N; P.d = d; P.n = n; P.bias = bias;
        P.x = ptr<const void>(x); P.x_rstride = x_rs; P.x_bstride = x_bs;
        P.p = ptr<const void>(p); P.p_rstride = p_rs; P.p_bstride = p_bs;
        P.out = ptr<void>(out);
        P.in_dtype = to_dtype(fn, in_dt); P.acc_dtype = to_dtype(fn, acc_dt);
        P.num_threads = threads; P.stream = ptr<void>(stream);
        const bool cuda = is_cuda(fn, device);
        py::gil_scoped_release nogil;
#ifdef TOPODERIV_WITH_CUDA
        if (cuda) return sensitivity_blocks_cuda(P);
#endif
        (void)cuda;
        sensitivity_blocks_cpu(P);
      },
      "out[b, r] += sum_s p[b, s, r] xt[b, s] xt[b, s]^T (raw pointers; see sensitivity.h)");

  m.def(
      "sensitivity_matvec",
      [](const std::string& device, uintptr_t x, int64_t x_rs, uintptr_t p, int64_t p_rs, uintptr_t v,
         uintptr_t out, uintptr_t ws, int64_t batch, int64_t N, int64_t d, int64_t n, int64_t x_bs,
         int64_t p_bs, bool bias, int in_dt, int acc_dt, int threads, uintptr_t stream) {
        const char* fn = "sensitivity_matvec";
        SensitivityMatvecParams P;
        P.batch = batch; P.N = N; P.d = d; P.n = n; P.bias = bias;
        P.x = ptr<const void>(x); P.x_rstride = x_rs; P.x_bstride = x_bs;
        P.p = ptr<const void>(p); P.p_rstride = p_rs; P.p_bstride = p_bs;
        P.v = ptr<const void>(v); P.out = ptr<void>(out); P.workspace = ptr<void>(ws);
        P.in_dtype = to_dtype(fn, in_dt); P.acc_dtype = to_dtype(fn, acc_dt);
        P.num_threads = threads; P.stream = ptr<void>(stream);
        const bool cuda = is_cuda(fn, device);
        py::gil_scoped_release nogil;
#ifdef TOPODERIV_WITH_CUDA
        if (cuda) return sensitivity_matvec_cuda(P);
#endif
        (void)cuda;
        sensitivity_matvec_cpu(P);
      },
      "out[b, r] = B[b, r] @ v[b, r] without forming B (raw pointers; see sensitivity.h)");

  m.def(
      "lanczos_workspace_elems",
      [](int64_t B, int64_t mdim, int64_t k, int64_t steps, bool matfree, bool cuda, int64_t N, int64_t n,
         int64_t batch) {
        LanczosParams P;
        P.num_problems = B; P.m = mdim; P.k = k; P.max_steps = steps;
        static const int dummy = 0;
        P.a = matfree ? nullptr : &dummy;
        P.op.batch = batch; P.op.N = N; P.op.n = n;
        return lanczos_workspace_layout(P, cuda).total;
      },
      "Elements of the Lanczos workspace (in the Lanczos dtype).");

  m.def(
      "lanczos_topk",
      [](const std::string& device, uintptr_t a, uintptr_t x, int64_t x_rs, uintptr_t p, int64_t p_rs,
         int64_t op_batch, int64_t N, int64_t d, int64_t n, bool bias, int in_dt, int64_t B, int64_t mdim,
         int64_t k, int64_t steps, double tol, uint64_t seed, int64_t norm_group, uintptr_t v0, int dt, uintptr_t values, uintptr_t vectors,
         uintptr_t ritz, uintptr_t nsteps, uintptr_t anorm, uintptr_t true_res, uintptr_t ws, int threads,
         uintptr_t stream) {
        const char* fn = "lanczos_topk";
        LanczosParams P;
        P.num_problems = B; P.m = mdim; P.k = k; P.max_steps = steps; P.tol = tol; P.seed = seed; P.norm_group = norm_group;
        P.v0 = ptr<const void>(v0);
        P.dtype = to_dtype(fn, dt);
        P.a = ptr<const void>(a);
        if (a == 0) {
          SensitivityMatvecParams& op = P.op;
          op.batch = op_batch; op.N = N; op.d = d; op.n = n; op.bias = bias;
          op.x = ptr<const void>(x); op.x_rstride = x_rs; op.x_bstride = N * x_rs;
          op.p = ptr<const void>(p); op.p_rstride = p_rs; op.p_bstride = N * p_rs;
          op.in_dtype = to_dtype(fn, in_dt); op.acc_dtype = P.dtype;
          op.num_threads = threads; op.stream = ptr<void>(stream);
        }
        P.values = ptr<void>(values); P.vectors = ptr<void>(vectors); P.ritz_residuals = ptr<void>(ritz);
        P.steps = ptr<int32_t>(nsteps); P.anorm_host = ptr<double>(anorm);
        P.true_residuals = ptr<void>(true_res); P.workspace = ptr<void>(ws);
        P.num_threads = threads; P.stream = ptr<void>(stream);
        const bool cuda = is_cuda(fn, device);
        py::gil_scoped_release nogil;
#ifdef TOPODERIV_WITH_CUDA
        if (cuda) return lanczos_topk_cuda(P);
#endif
        (void)cuda;
        lanczos_topk_cpu(P);
      },
      "Batched Lanczos top-k eigenpairs of dense [B, m, m] (a != 0) or matrix-free sensitivity operators.");
}
