// The one file that includes pybind11: turns Python ints (pointers with the bytes behind them, sizes,
// strides, dtype codes) into the core's params structs, checks them against those spans
// (topoderiv/validate.h: the second line behind topoderiv/ops.py's validation), releases the GIL
// and dispatches to the CPU or CUDA kernels.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "topoderiv/conv_sensitivity.h"
#include "topoderiv/lanczos.h"
#include "topoderiv/sensitivity.h"
#include "topoderiv/sensitivity_tc.h"
#include "topoderiv/validate.h"

#ifdef TOPODERIV_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace py = pybind11;
using namespace topoderiv;

namespace {

// A pointer (tensor.data_ptr()) and the bytes its caller vouches for from it (the tensor's span);
// (0, 0) for none. validate.h checks every access of the kernels against these spans.
using Buf = std::pair<uintptr_t, int64_t>;

DType to_dtype(const char* fn, const char* name, int code) {
  if (code < 0 || code > 2)
    fail(fn, std::string(name) + " must be a dtype code 0 (float32), 1 (float64) or 2 (bfloat16), got " +
                 std::to_string(code));
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

int check_threads(const char* fn, int threads) {
  if (threads < 1) fail(fn, "threads must be >= 1, got " + std::to_string(threads));
  return threads;
}

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// 4-D sizes / element strides as Python tuples.
// The conv ops' shapes and strides: 4 ints ([N, C, H, W]) or 5 (a batch of problems: [batch, N, C, H, W],
// the batch stride first).
using Quad = py::tuple;

std::vector<int64_t> four_or_five(const char* fn, const char* name, const Quad& t) {
  if (t.size() != 4 && t.size() != 5)
    throw std::invalid_argument(std::string(fn) + ": " + name + " must have 4 entries [N, C, H, W] or 5 [batch, N, C, "
                                "H, W], got " + std::to_string(t.size()));
  std::vector<int64_t> v;
  for (const auto& e : t) v.push_back(e.cast<int64_t>());
  if (v.size() == 4) v.insert(v.begin(), 0);  // no batch entry: one problem (its batch stride unused)
  return v;
}

Strides4 strides4(const char* fn, const char* name, const Quad& q) {
  const std::vector<int64_t> v = four_or_five(fn, name, q);
  return Strides4{v[1], v[2], v[3], v[4], v[0]};
}

// x [N, C, H, W] or [batch, N, C, H, W] (shape), n output channels, kernel size, padding, bias.
ConvGeometry geometry(const char* fn, const Quad& shape, int64_t n, int64_t k, int64_t pad, bool bias) {
  const std::vector<int64_t> v = four_or_five(fn, "shape", shape);
  ConvGeometry g;
  g.batch = shape.size() == 4 ? 1 : v[0];
  g.N = v[1]; g.C = v[2]; g.H = v[3]; g.W = v[4];
  g.n = n; g.k = k; g.pad = pad; g.bias = bias;
  return g;
}

// The sizes, x and p (with their row and batch strides) of the dense params (blocks, matvec).
template <class Params>
void set_dense_data(Params& P, int64_t batch, int64_t N, int64_t d, int64_t n, bool bias, Buf x, int64_t x_rs,
                    int64_t x_bs, Buf p, int64_t p_rs, int64_t p_bs) {
  P.batch = batch; P.N = N; P.d = d; P.n = n; P.bias = bias;
  P.x = ptr<const void>(x.first); P.x_rstride = x_rs; P.x_bstride = x_bs;
  P.p = ptr<const void>(p.first); P.p_rstride = p_rs; P.p_bstride = p_bs;
}

// The geometry, x and p (with their strides) of the conv params (blocks, matvec, the Lanczos operator).
template <class Params>
void set_conv_data(Params& P, const char* fn, const Quad& shape, int64_t n, int64_t k, int64_t pad, bool bias, Buf x,
                   const Quad& xs, Buf p, const Quad& ps) {
  P.g = geometry(fn, shape, n, k, pad, bias);
  P.x = ptr<const void>(x.first); P.xs = strides4(fn, "x strides", xs);
  P.p = ptr<const void>(p.first); P.ps = strides4(fn, "p strides", ps);
}

// The dtypes, CPU threads and stream of the data params (dense or conv blocks / matvec).
template <class Params>
void set_run(Params& P, const char* fn, int in_dt, int acc_dt, int threads, uintptr_t stream) {
  P.in_dtype = to_dtype(fn, "in_dtype", in_dt); P.acc_dtype = to_dtype(fn, "acc_dtype", acc_dt);
  P.num_threads = check_threads(fn, threads); P.stream = ptr<void>(stream);
}

// CUDA calls: every buffer a kernel touches must be device (or managed) memory of one device,
// except the host ones (the Lanczos norms), which must not be device memory. CPU calls are not
// checked here: asking the CUDA runtime would create a CUDA context on machines that never use one.
void check_memory(const char* fn, const std::vector<Region>& regions, bool cuda) {
#ifdef TOPODERIV_WITH_CUDA
  if (!cuda) return;
  int device = -1;
  const char* first = nullptr;
  for (const Region& r : regions) {
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(r.ptr)) != cudaSuccess) {
      cudaGetLastError();
      continue;
    }
    const bool on_device = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
    if (r.host) {
      if (attr.type == cudaMemoryTypeDevice)
        fail(fn, std::string(r.name) + " must be host memory, got CUDA device memory");
      continue;
    }
    if (!on_device) fail(fn, std::string(r.name) + " must be CUDA device memory, got host memory");
    if (attr.type == cudaMemoryTypeDevice) {
      if (device >= 0 && attr.device != device)
        fail(fn, std::string(r.name) + " must be on the same CUDA device as " + first + " (cuda:" +
                     std::to_string(device) + "), got cuda:" + std::to_string(attr.device));
      device = attr.device;
      first = r.name;
    }
  }
#else
  (void)fn;
  (void)regions;
  (void)cuda;
#endif
}

// A CUDA kernel entry point in CUDA builds, nullptr (never called: is_cuda refuses) otherwise.
#ifdef TOPODERIV_WITH_CUDA
#define TD_CUDA_KERNEL(f) f
#else
#define TD_CUDA_KERNEL(f) nullptr
#endif
template <class T>
using NoDeduce = typename std::enable_if<true, T>::type;

// Checks the memory of the regions (check_memory), then runs the CUDA (cuda) or CPU kernel on args
// without the GIL.
template <class... Args, class... Ps>
void run(const char* fn, bool cuda, const std::vector<Region>& regions, void (*cpu)(Args...),
         NoDeduce<void (*)(Args...)> gpu, const Ps&... args) {
  check_memory(fn, regions, cuda);
  py::gil_scoped_release nogil;
  if (cuda) return gpu(args...);
  cpu(args...);
}

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
      [](const std::string& device, Buf x, int64_t x_rs, Buf p, int64_t p_rs, Buf out, int64_t batch, int64_t N,
         int64_t d, int64_t n, int64_t x_bs, int64_t p_bs, bool bias, int in_dt, int acc_dt, int threads,
         uintptr_t stream) {
        const char* fn = "sensitivity_blocks";
        SensitivityBlocksParams P;
        set_dense_data(P, batch, N, d, n, bias, x, x_rs, x_bs, p, p_rs, p_bs);
        P.out = ptr<void>(out.first);
        set_run(P, fn, in_dt, acc_dt, threads, stream);
        const bool cuda = is_cuda(fn, device);
        run(fn, cuda, check_blocks_params(fn, P, cuda, x.second, p.second, out.second), sensitivity_blocks_cpu,
            TD_CUDA_KERNEL(sensitivity_blocks_cuda), P);
      },
      "out[b, r] += sum_s p[b, s, r] xt[b, s] xt[b, s]^T (pointers with spans (ptr, bytes); see sensitivity.h)");

  // Tensor-core routes of the bfloat16 dense blocks (sensitivity_tc.h); CUDA only, chosen by ops.py.
  m.def(
      "sensitivity_blocks_mma",
      [](const std::string& device, Buf x, int64_t x_rs, Buf p, int64_t p_rs, Buf out, int64_t batch, int64_t N,
         int64_t d, int64_t n, int64_t x_bs, int64_t p_bs, bool bias, int in_dt, int acc_dt, uintptr_t stream) {
        const char* fn = "sensitivity_blocks_mma";
        if (!is_cuda(fn, device)) fail(fn, "device must be 'cuda' (a tensor-core route), got 'cpu'");
        SensitivityBlocksParams P;
        set_dense_data(P, batch, N, d, n, bias, x, x_rs, x_bs, p, p_rs, p_bs);
        P.out = ptr<void>(out.first);
        P.in_dtype = to_dtype(fn, "in_dtype", in_dt); P.acc_dtype = to_dtype(fn, "acc_dtype", acc_dt);
        P.stream = ptr<void>(stream);
        check_memory(fn, check_blocks_mma_params(fn, P, x.second, p.second, out.second), true);
#ifdef TOPODERIV_WITH_CUDA
        py::gil_scoped_release nogil;
        sensitivity_blocks_mma_cuda(P);
#endif
      },
      "bfloat16 out[b, r] += blocks with the fused WMMA kernel (design 1; CUDA sm_80+; see sensitivity_tc.h)");

  m.def(
      "sensitivity_pair_products",
      [](const std::string& device, Buf x, int64_t x_rs, Buf z, int64_t N, int64_t d, bool bias, int64_t i0, int64_t i1,
         int in_dt, uintptr_t stream) {
        const char* fn = "sensitivity_pair_products";
        if (!is_cuda(fn, device)) fail(fn, "device must be 'cuda', got 'cpu'");
        PairProductsParams P;
        P.N = N; P.d = d; P.bias = bias; P.x = ptr<const void>(x.first); P.x_rstride = x_rs;
        P.i0 = i0; P.i1 = i1; P.z = ptr<void>(z.first);
        P.in_dtype = to_dtype(fn, "in_dtype", in_dt); P.stream = ptr<void>(stream);
        check_memory(fn, check_pair_products_params(fn, P, x.second, z.second), true);
#ifdef TOPODERIV_WITH_CUDA
        py::gil_scoped_release nogil;
        sensitivity_pair_products_cuda(P);
#endif
      },
      "z[s, q] = bf16(xt[s, i] xt[s, j]) for the pairs of triangle rows [i0, i1) (design 2; CUDA; see "
      "sensitivity_tc.h)");

  m.def(
      "sensitivity_matvec",
      [](const std::string& device, Buf x, int64_t x_rs, Buf p, int64_t p_rs, Buf v, Buf out, Buf ws, int64_t batch,
         int64_t N, int64_t d, int64_t n, int64_t x_bs, int64_t p_bs, bool bias, int in_dt, int acc_dt, int threads,
         uintptr_t stream) {
        const char* fn = "sensitivity_matvec";
        SensitivityMatvecParams P;
        set_dense_data(P, batch, N, d, n, bias, x, x_rs, x_bs, p, p_rs, p_bs);
        P.v = ptr<const void>(v.first); P.out = ptr<void>(out.first); P.workspace = ptr<void>(ws.first);
        set_run(P, fn, in_dt, acc_dt, threads, stream);
        const bool cuda = is_cuda(fn, device);
        run(fn, cuda, check_matvec_params(fn, P, cuda, x.second, p.second, v.second, out.second, ws.second),
            sensitivity_matvec_cpu, TD_CUDA_KERNEL(sensitivity_matvec_cuda), P);
      },
      "out[b, r] = B[b, r] @ v[b, r] without forming B (pointers with spans (ptr, bytes); see sensitivity.h)");

  m.def(
      "conv_sensitivity_blocks",
      [](const std::string& device, Buf x, const Quad& xs, Buf p, const Quad& ps, Buf out, const Quad& shape, int64_t n,
         int64_t k, int64_t pad, bool bias, int in_dt, int acc_dt, int threads, uintptr_t stream) {
        const char* fn = "conv_sensitivity_blocks";
        ConvSensitivityBlocksParams P;
        set_conv_data(P, fn, shape, n, k, pad, bias, x, xs, p, ps);
        P.out = ptr<void>(out.first);
        set_run(P, fn, in_dt, acc_dt, threads, stream);
        const bool cuda = is_cuda(fn, device);
        run(fn, cuda, check_conv_blocks_params(fn, P, cuda, x.second, p.second, out.second),
            conv_sensitivity_blocks_cpu, TD_CUDA_KERNEL(conv_sensitivity_blocks_cuda), P);
      },
      "out[r] += sum_{s, pixels} p[s, r, pixel] patch patch^T (pointers with spans; see conv_sensitivity.h)");

  m.def(
      "conv_sensitivity_matvec",
      [](const std::string& device, Buf x, const Quad& xs, Buf p, const Quad& ps, Buf v, Buf out, Buf ws,
         const Quad& shape, int64_t n, int64_t k, int64_t pad, bool bias, int in_dt, int acc_dt, int threads,
         uintptr_t stream) {
        const char* fn = "conv_sensitivity_matvec";
        ConvSensitivityMatvecParams P;
        set_conv_data(P, fn, shape, n, k, pad, bias, x, xs, p, ps);
        P.v = ptr<const void>(v.first); P.out = ptr<void>(out.first); P.workspace = ptr<void>(ws.first);
        set_run(P, fn, in_dt, acc_dt, threads, stream);
        const bool cuda = is_cuda(fn, device);
        run(fn, cuda, check_conv_matvec_params(fn, P, cuda, x.second, p.second, v.second, out.second, ws.second),
            conv_sensitivity_matvec_cpu, TD_CUDA_KERNEL(conv_sensitivity_matvec_cuda), P);
      },
      "out[r] = B[r] @ v[r] of the conv blocks without forming them (pointers with spans; see conv_sensitivity.h)");

  m.def(
      "conv_lanczos_topk",
      [](const std::string& device, Buf x, const Quad& xs, Buf p, const Quad& ps, const Quad& shape, int64_t n,
         int64_t kernel, int64_t pad, bool bias, int in_dt, int64_t mdim, int64_t k, int64_t steps, double tol,
         uint64_t seed, int64_t norm_group, Buf v0, int dt, Buf values, Buf vectors, Buf ritz, Buf nsteps, Buf anorm,
         Buf true_res, Buf ws, int threads, uintptr_t stream, int need, Buf early) {
        const char* fn = "conv_sensitivity_lanczos";
        ConvSensitivityMatvecParams op;
        set_conv_data(op, fn, shape, n, kernel, pad, bias, x, xs, p, ps);
        op.in_dtype = to_dtype(fn, "in_dtype", in_dt);
        LanczosParams P;
        // the blocks of every problem of the batch (problem b * n + r); each problem draws the start
        // vectors of a call with it alone (seed_period = n)
        P.num_problems = (op.g.batch >= 0 && n >= 0) ? validate_detail::mul(fn, op.g.batch, n) : n;
        P.seed_period = n > 0 ? n : 0;
        P.m = mdim; P.k = k; P.max_steps = steps; P.tol = tol; P.seed = seed;
        P.norm_group = norm_group;
        if (need != kNeedAll && need != kNeedTop) fail(fn, "need must be 0 (all) or 1 (top), got " + std::to_string(need));
        P.need = need;
        P.early_host = ptr<uint8_t>(early.first);
        P.v0 = ptr<const void>(v0.first);
        P.dtype = to_dtype(fn, "dtype", dt);
        op.acc_dtype = P.dtype;
        P.num_threads = op.num_threads = check_threads(fn, threads);
        P.stream = op.stream = ptr<void>(stream);
        P.values = ptr<void>(values.first); P.vectors = ptr<void>(vectors.first); P.ritz_residuals = ptr<void>(ritz.first);
        P.steps = ptr<int32_t>(nsteps.first); P.anorm_host = ptr<double>(anorm.first);
        P.true_residuals = ptr<void>(true_res.first); P.workspace = ptr<void>(ws.first);
        const bool cuda = is_cuda(fn, device);
        LanczosSpans spans;
        spans.x = x.second; spans.p = p.second; spans.v0 = v0.second;
        spans.values = values.second; spans.vectors = vectors.second; spans.ritz = ritz.second;
        spans.steps = nsteps.second; spans.anorm = anorm.second; spans.true_residuals = true_res.second;
        spans.workspace = ws.second;
        std::vector<Region> regions = check_conv_lanczos_params(fn, P, op, cuda, spans);
        if (P.num_problems > 0 && early.first != 0 && early.second < P.num_problems)
          fail(fn, "early must span at least num_problems = " + std::to_string(P.num_problems) + " bytes, got " +
                       std::to_string(early.second));
        if (P.num_problems > 0 && early.first != 0) {  // a host [num_problems] uint8 output
          Region r;
          r.name = "early"; r.ptr = early.first; r.have = early.second; r.need = P.num_problems; r.written = true;
          r.host = true;
          regions.push_back(r);
        }
        run(fn, cuda, regions, conv_lanczos_topk_cpu, TD_CUDA_KERNEL(conv_lanczos_topk_cuda), P, op);
      },
      "Matrix-free batched Lanczos top-k eigenpairs of the conv sensitivity blocks (pointers with spans; see "
      "conv_sensitivity.h and lanczos.h). need and early (a host [num_problems] uint8 output, (0, 0) for none) as "
      "LanczosParams.",
      py::arg("device"), py::arg("x"), py::arg("x_strides"), py::arg("p"), py::arg("p_strides"), py::arg("shape"),
      py::arg("n"), py::arg("kernel_size"), py::arg("padding"), py::arg("bias"), py::arg("in_dtype"), py::arg("m"), py::arg("k"),
      py::arg("steps"), py::arg("tol"), py::arg("seed"), py::arg("norm_group"), py::arg("v0"), py::arg("dtype"),
      py::arg("values"), py::arg("vectors"), py::arg("ritz"), py::arg("steps_out"), py::arg("anorm"),
      py::arg("true_residuals"), py::arg("workspace"), py::arg("threads"), py::arg("stream"), py::arg("need") = 0,
      py::arg("early") = Buf(0, 0));

  m.def(
      "lanczos_workspace_elems",
      [](int64_t B, int64_t mdim, int64_t k, int64_t steps, bool matfree, bool cuda, int64_t N, int64_t n,
         int64_t batch) {
        LanczosParams P;
        P.num_problems = B; P.m = mdim; P.k = k; P.max_steps = steps;
        static const int dummy = 0;
        P.a = matfree ? nullptr : &dummy;
        P.op.batch = batch; P.op.N = N; P.op.n = n;
        return lanczos_workspace_elems_checked("lanczos_workspace_elems", P, cuda);
      },
      "Elements of the Lanczos workspace (in the Lanczos dtype).");

  m.def(
      "lanczos_topk",
      [](const std::string& device, Buf a, Buf x, int64_t x_rs, Buf p, int64_t p_rs, int64_t op_batch, int64_t N,
         int64_t d, int64_t n, bool bias, int in_dt, int64_t B, int64_t mdim, int64_t k, int64_t steps, double tol,
         uint64_t seed, int64_t norm_group, Buf v0, int dt, Buf values, Buf vectors, Buf ritz, Buf nsteps, Buf anorm,
         Buf true_res, Buf ws, int threads, uintptr_t stream, int64_t seed_period, int need, Buf early) {
        const char* fn = "lanczos_topk";
        LanczosParams P;
        P.num_problems = B; P.m = mdim; P.k = k; P.max_steps = steps; P.tol = tol; P.seed = seed; P.norm_group = norm_group;
        if (seed_period < 0) fail(fn, "seed_period must be >= 0, got " + std::to_string(seed_period));
        if (need != kNeedAll && need != kNeedTop) fail(fn, "need must be 0 (all) or 1 (top), got " + std::to_string(need));
        P.seed_period = seed_period; P.need = need;
        P.early_host = ptr<uint8_t>(early.first);
        if (B > 0 && early.first != 0 && early.second < B)
          fail(fn, "early must span at least num_problems = " + std::to_string(B) + " bytes, got " +
                       std::to_string(early.second));
        P.v0 = ptr<const void>(v0.first);
        P.dtype = to_dtype(fn, "dtype", dt);
        P.a = ptr<const void>(a.first);
        P.num_threads = check_threads(fn, threads); P.stream = ptr<void>(stream);
        if (a.first == 0) {
          SensitivityMatvecParams& op = P.op;
          // one problem after another, each [N, d] / [N, n] with the row strides given
          const int64_t x_bs = validate_detail::mul(fn, N, x_rs);
          const int64_t p_bs = validate_detail::mul(fn, N, p_rs);
          set_dense_data(op, op_batch, N, d, n, bias, x, x_rs, x_bs, p, p_rs, p_bs);
          op.in_dtype = to_dtype(fn, "in_dtype", in_dt); op.acc_dtype = P.dtype;
          op.num_threads = P.num_threads; op.stream = P.stream;
        }
        P.values = ptr<void>(values.first); P.vectors = ptr<void>(vectors.first); P.ritz_residuals = ptr<void>(ritz.first);
        P.steps = ptr<int32_t>(nsteps.first); P.anorm_host = ptr<double>(anorm.first);
        P.true_residuals = ptr<void>(true_res.first); P.workspace = ptr<void>(ws.first);
        const bool cuda = is_cuda(fn, device);
        LanczosSpans spans;
        spans.a = a.second; spans.x = x.second; spans.p = p.second; spans.v0 = v0.second;
        spans.values = values.second; spans.vectors = vectors.second; spans.ritz = ritz.second;
        spans.steps = nsteps.second; spans.anorm = anorm.second; spans.true_residuals = true_res.second;
        spans.workspace = ws.second;
        std::vector<Region> regions = check_lanczos_params(fn, P, cuda, spans);
        if (B > 0 && early.first != 0) {
          Region r;
          r.name = "early"; r.ptr = early.first; r.have = early.second; r.need = B; r.written = true; r.host = true;
          regions.push_back(r);
        }
        run(fn, cuda, regions, lanczos_topk_cpu, TD_CUDA_KERNEL(lanczos_topk_cuda), P);
      },
      "Batched Lanczos top-k eigenpairs of dense [B, m, m] (a != 0) or matrix-free sensitivity operators "
      "(op_batch operators of n problems each; pointers with spans (ptr, bytes); see lanczos.h). seed_period, need "
      "and early (a host [B] uint8 output, (0, 0) for none) as LanczosParams.",
      py::arg("device"), py::arg("a"), py::arg("x"), py::arg("x_rstride"), py::arg("p"), py::arg("p_rstride"),
      py::arg("op_batch"), py::arg("N"), py::arg("d"), py::arg("n"), py::arg("bias"), py::arg("in_dtype"), py::arg("B"),
      py::arg("m"), py::arg("k"), py::arg("steps"), py::arg("tol"), py::arg("seed"), py::arg("norm_group"), py::arg("v0"),
      py::arg("dtype"), py::arg("values"), py::arg("vectors"), py::arg("ritz"), py::arg("steps_out"), py::arg("anorm"),
      py::arg("true_residuals"), py::arg("workspace"), py::arg("threads"), py::arg("stream"),
      py::arg("seed_period") = 0, py::arg("need") = 0, py::arg("early") = Buf(0, 0));
}
