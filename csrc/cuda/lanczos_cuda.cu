// CUDA backend of the batched Lanczos driver (contract: include/topoderiv/lanczos.h; the host driver
// lanczos_run and tridiag_ql live in csrc/common/).
//
// Device memory: only params.workspace (layout: lanczos_workspace_layout(params, true)) and the
// output pointers. Within that layout this backend uses the scalars region [4 * B] as four arrays
// of B values: alpha, beta, active flag, scratch (restart tag + 1, 0 = not restarted); the restart
// norms are returned through the alpha array (its values have been read by then).
//
// Kernels (dtype T = float or double; reductions in T, deterministic shared-memory trees):
//   dense_apply_kernel   W[b] = A[b] V_j[b]: a block of 8 rows x 32 lanes per row chunk, grid over
//                        (row chunks, problems); inactive problems skipped.
//   orthonormalize_kernel one block per problem: alpha = <V_j, W>; classical Gram-Schmidt twice
//                        against V_0..V_j (coefficients in the coef region); beta = ||W||;
//                        V_{j+1} = W / beta when beta > 0.
//   restart_kernel       one block per masked problem: seeded start vector (start_value, shared
//                        with the CPU backend), Gram-Schmidt twice against V_0..V_j, normalised.
//   finish_kernel        one block per (problem, wanted pair): y = V S[:, c], normalised column.
// Matrix-free operator: sensitivity_matvec_cuda on basis vector j ([op.batch, op.n, m]), or the
// external operator of another op (params.external, e.g. the convolution blocks).
// Host <-> device: small cudaMemcpyAsync on params.stream followed by cudaStreamSynchronize.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cuda_utils.cuh"  // first: defines TOPODERIV_WITH_CUDA for topoderiv/lanczos.h
#include "topoderiv/lanczos.h"

namespace topoderiv {
namespace {

using namespace cuda_detail;

constexpr int kThreads = 256;    // 1-D blocks of the per-problem kernels
constexpr int kRows = 8;         // dense_apply: rows per block (threadIdx.y)
constexpr int kLanes = 32;       // dense_apply: lanes per row (threadIdx.x)
constexpr int64_t kMaxTag = 1 << 24;  // restart tags travel as T: exact below 2^24 in float

// W[b] = A[b] @ V[b] for active problems. a: [B, m, m], v: [B, m] (basis vector j), w: [B, m].
template <typename T>
__global__ void __launch_bounds__(kRows * kLanes)
dense_apply_kernel(const T* __restrict__ a, const T* __restrict__ v, T* __restrict__ w,
                   const T* __restrict__ active, int64_t B, int64_t m) {
  __shared__ T red[kRows][kLanes + 1];
  const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
  const int64_t chunks = ceil_div(m, kRows);
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    if (active[b] == T(0)) continue;  // uniform over the block
    const T* vb = v + b * m;
    for (int64_t ch = blockIdx.x; ch < chunks; ch += gridDim.x) {
      const int64_t i = ch * kRows + ty;
      T part = T(0);
      if (i < m) {
        const T* row = a + (b * m + i) * m;
        for (int64_t c = tx; c < m; c += kLanes) part += row[c] * vb[c];
      }
      red[ty][tx] = part;
      __syncthreads();
#pragma unroll
      for (int s = kLanes / 2; s > 0; s >>= 1) {
        if (tx < s) red[ty][tx] += red[ty][tx + s];
        __syncthreads();
      }
      if (tx == 0 && i < m) w[b * m + i] = red[ty][0];
      __syncthreads();  // red is rewritten by the next chunk
    }
  }
}

// x -= V_{0..j} (V_{0..j}^T x), twice (classical Gram-Schmidt with one re-orthogonalisation).
// x: this problem's vector [m] (element i is only touched by thread i % kThreads); basis: [*, B, m];
// h: this problem's coefficient scratch [j + 1] (global); red: __shared__ [kThreads].
template <typename T>
__device__ void cgs2(T* x, const T* __restrict__ basis, T* h, T* red, int64_t j, int64_t b,
                     int64_t B, int64_t m) {
  const int tid = static_cast<int>(threadIdx.x);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t t = 0; t <= j; ++t) {
      const T* vt = basis + (t * B + b) * m;
      T part = T(0);
      for (int64_t i = tid; i < m; i += kThreads) part += vt[i] * x[i];
      const T ht = block_sum<kThreads>(part, red);
      if (tid == 0) h[t] = ht;
    }
    __syncthreads();  // h complete and visible
    for (int64_t i = tid; i < m; i += kThreads) {
      T xi = x[i];
      for (int64_t t = 0; t <= j; ++t) xi -= h[t] * basis[(t * B + b) * m + i];
      x[i] = xi;
    }
    __syncthreads();  // h is rewritten by the next pass
  }
}

// For active problems: alpha = <V_j, W>; W -= V_{0..j} V_{0..j}^T W (twice); beta = ||W||;
// V_{j+1} = W / beta when beta > 0 (and j + 1 <= max_steps).
template <typename T>
__global__ void __launch_bounds__(kThreads)
orthonormalize_kernel(T* __restrict__ basis, T* __restrict__ w, T* __restrict__ coef,
                      T* __restrict__ alpha_out, T* __restrict__ beta_out,
                      const T* __restrict__ active, int64_t B, int64_t m, int64_t j,
                      int64_t max_steps) {
  __shared__ T red[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    if (active[b] == T(0)) continue;  // uniform over the block
    T* wb = w + b * m;
    const T* vj = basis + (j * B + b) * m;
    T part = T(0);
    for (int64_t i = tid; i < m; i += kThreads) part += vj[i] * wb[i];
    const T alpha = block_sum<kThreads>(part, red);
    cgs2(wb, basis, coef + b * (max_steps + 1), red, j, b, B, m);
    part = T(0);
    for (int64_t i = tid; i < m; i += kThreads) part += wb[i] * wb[i];
    const T beta = td_sqrt(block_sum<kThreads>(part, red));
    if (tid == 0) {
      alpha_out[b] = alpha;
      beta_out[b] = beta;
    }
    if (beta > T(0) && j + 1 <= max_steps) {
      T* vn = basis + ((j + 1) * B + b) * m;
      for (int64_t i = tid; i < m; i += kThreads) vn[i] = wb[i] / beta;
    }
    __syncthreads();  // before red / coef are reused for the next problem of this block
  }
}

// For problems with tagp1[b] != 0: V_{j+1}[b] = start vector (restart tag tagp1[b] - 1),
// orthogonalised twice against V_0..V_j (j >= 0), normalised; norms[b] = norm before normalising,
// negated when the start was v0[b]. The first start (j = -1) takes v0[b] when v0 != nullptr and
// that row is not all zero. Problem b
// draws the start of problem b % seed_period (seed_period > 0), as the CPU backend.
template <typename T>
__global__ void __launch_bounds__(kThreads)
restart_kernel(T* __restrict__ basis, T* __restrict__ coef, const T* __restrict__ tagp1,
               T* __restrict__ norms, const T* __restrict__ v0, int64_t B, int64_t m, int64_t j,
               int64_t max_steps, uint64_t seed, int64_t seed_period) {
  __shared__ T red[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t b = blockIdx.x; b < B; b += gridDim.x) {
    const T tg = tagp1[b];
    if (tg == T(0)) continue;  // uniform over the block
    const int64_t tag = static_cast<int64_t>(tg) - 1;
    T* x = basis + ((j + 1) * B + b) * m;
    bool seeded = false;
    if (j < 0 && v0 != nullptr) {
      T part = T(0);
      for (int64_t i = tid; i < m; i += kThreads) {
        x[i] = v0[b * m + i];
        part += x[i] * x[i];
      }
      seeded = block_sum<kThreads>(part, red) > T(0);  // uniform over the block
    }
    if (!seeded)
      for (int64_t i = tid; i < m; i += kThreads) x[i] = static_cast<T>(start_value(seed, seed_period > 0 ? b % seed_period : b, tag, i));
    if (j >= 0) cgs2(x, basis, coef + b * (max_steps + 1), red, j, b, B, m);
    T part = T(0);
    for (int64_t i = tid; i < m; i += kThreads) part += x[i] * x[i];
    const T nrm = td_sqrt(block_sum<kThreads>(part, red));
    if (tid == 0) norms[b] = seeded ? -nrm : nrm;  // the first start tells the host it took v0 by the sign
    if (nrm > T(0)) {
      for (int64_t i = tid; i < m; i += kThreads) x[i] = x[i] / nrm;
    }
    __syncthreads();
  }
}

// vectors[b, :, c] = normalise(sum_{t < steps[b]} V_t[b, :] * S[b, t, c]).
// basis [*, B, m]; s [B, max_steps, k]; steps [B] (device); vectors [B, m, k].
template <typename T>
__global__ void __launch_bounds__(kThreads)
finish_kernel(const T* __restrict__ basis, const T* __restrict__ s,
              const int32_t* __restrict__ steps, T* __restrict__ vectors, int64_t B, int64_t m,
              int64_t k, int64_t max_steps) {
  __shared__ T red[kThreads];
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t total = B * k;
  for (int64_t id = blockIdx.x; id < total; id += gridDim.x) {
    const int64_t b = id / k, c = id % k;
    int64_t st = steps[b];
    st = st < 0 ? 0 : (st > max_steps ? max_steps : st);
    const T* sb = s + b * max_steps * k;
    T* vb = vectors + b * m * k;
    T part = T(0);
    for (int64_t i = tid; i < m; i += kThreads) {
      T y = T(0);
      for (int64_t t = 0; t < st; ++t) y += basis[(t * B + b) * m + i] * sb[t * k + c];
      vb[i * k + c] = y;
      part += y * y;
    }
    const T nrm = td_sqrt(block_sum<kThreads>(part, red));
    if (nrm > T(0)) {
      for (int64_t i = tid; i < m; i += kThreads) vb[i * k + c] = vb[i * k + c] / nrm;
    }
  }
}

template <typename T>
class CudaLanczosBackend final : public LanczosBackend {
 public:
  explicit CudaLanczosBackend(const LanczosParams& p)
      : p_(p),
        layout_(lanczos_workspace_layout(p, /*cuda=*/true)),
        B_(p.num_problems),
        m_(p.m),
        stream_(as_stream(p.stream)),
        ws_(static_cast<T*>(p.workspace)),
        active_host_(static_cast<size_t>(p.num_problems > 0 ? p.num_problems : 0), 1) {
    basis_ = ws_ + layout_.basis;
    w_ = ws_ + layout_.w;
    s_ = ws_ + layout_.s;
    coef_ = ws_ + layout_.coef;
    alpha_ = ws_ + layout_.scalars;
    beta_ = alpha_ + B_;
    active_ = alpha_ + 2 * B_;
    scratch_ = alpha_ + 3 * B_;
    // No device work here: lanczos_run validates the parameters first. All problems count as
    // active until set_active says otherwise (uploaded on first use, see ensure_active).
  }

  void set_active(const uint8_t* active) override {
    for (int64_t b = 0; b < B_; ++b) active_host_[b] = active[b] != 0 ? 1 : 0;
    upload_active();
  }

  void apply(int64_t j) override {
    check_j(j, 0, p_.max_steps, "apply");
    ensure_active();
    const T* vj = basis_ + j * B_ * m_;
    if (!p_.matrix_free()) {
      const dim3 grid(grid_dim(ceil_div(m_, kRows), kMaxGridX), grid_dim(B_, kMaxGridYZ), 1);
      launch(kOp, dense_apply_kernel<T>, grid, dim3(kLanes, kRows, 1), stream_,
             static_cast<const T*>(p_.a), vj, w_, static_cast<const T*>(active_), B_, m_);
    } else if (p_.external != nullptr) {
      // another op's operator (conv_sensitivity.h): applied to every problem (the basis slots of
      // inactive ones hold zeros or their last vector: the workspace is zeroed by the caller)
      p_.external->apply(vj, w_, nullptr, layout_.total > layout_.matvec ? ws_ + layout_.matvec : nullptr);
    } else {
      SensitivityMatvecParams op = p_.op;
      op.v = vj;
      op.out = w_;
      op.workspace = ws_ + layout_.matvec;
      op.stream = p_.stream;
      sensitivity_matvec_cuda(op);
    }
  }

  void orthonormalize(int64_t j, double* alpha, double* beta) override {
    check_j(j, 0, p_.max_steps - 1, "orthonormalize");
    ensure_active();
    launch(kOp, orthonormalize_kernel<T>, dim3(grid_dim(B_, kMaxGridX)), dim3(kThreads), stream_,
           basis_, w_, coef_, alpha_, beta_, static_cast<const T*>(active_), B_, m_, j,
           p_.max_steps);
    stage_.resize(static_cast<size_t>(2 * B_));
    download(stage_.data(), alpha_, 2 * B_);  // alpha then beta: adjacent arrays
    sync();
    for (int64_t b = 0; b < B_; ++b) {
      if (!active_host_[b]) continue;
      alpha[b] = static_cast<double>(stage_[b]);
      beta[b] = static_cast<double>(stage_[B_ + b]);
    }
  }

  void restart(int64_t j, const uint8_t* mask, const int32_t* tag, double* norms, uint8_t* from_v0) override {
    check_j(j, -1, p_.max_steps - 1, "restart");
    stage_.resize(static_cast<size_t>(B_));
    bool any = false;
    for (int64_t b = 0; b < B_; ++b) {
      if (mask[b] != 0) {
        if (tag[b] < 0 || tag[b] >= kMaxTag - 1) {
          fail(kOp, "restart tag out of range [0, 2^24 - 1): " + std::to_string(tag[b]));
        }
        stage_[b] = static_cast<T>(tag[b] + 1);
        any = true;
      } else {
        stage_[b] = T(0);
      }
    }
    if (!any) return;
    upload(scratch_, stage_.data(), B_);
    launch(kOp, restart_kernel<T>, dim3(grid_dim(B_, kMaxGridX)), dim3(kThreads), stream_, basis_,
           coef_, static_cast<const T*>(scratch_), alpha_, static_cast<const T*>(p_.v0), B_, m_, j,
           p_.max_steps, p_.seed, p_.seed_period);
    // Download into a different buffer than the one the tag upload reads from: the upload may
    // still be pending when this copy is issued (pinned or HMM-accessible host memory).
    stage2_.resize(static_cast<size_t>(B_));
    download(stage2_.data(), alpha_, B_);
    sync();
    for (int64_t b = 0; b < B_; ++b) {
      if (mask[b] == 0) continue;
      const double nb = static_cast<double>(stage2_[b]);
      norms[b] = std::fabs(nb);
      if (j < 0) from_v0[b] = nb < 0.0 ? 1 : 0;
    }
  }

  void finish(const int32_t* steps, const double* S, const double* values,
              const double* residuals) override {
    const int64_t k = p_.k, ms = p_.max_steps;
    // S -> device (dtype T), then the Ritz vectors.
    stage_.resize(static_cast<size_t>(B_ * ms * k));
    for (int64_t e = 0; e < B_ * ms * k; ++e) stage_[e] = static_cast<T>(S[e]);
    upload(s_, stage_.data(), B_ * ms * k);
    check_cuda(cudaMemcpyAsync(p_.steps, steps, static_cast<size_t>(B_) * sizeof(int32_t),
                               cudaMemcpyHostToDevice, stream_),
               kOp);
    launch(kOp, finish_kernel<T>, dim3(grid_dim(B_ * k, kMaxGridX)), dim3(kThreads), stream_,
           static_cast<const T*>(basis_), static_cast<const T*>(s_),
           static_cast<const int32_t*>(p_.steps), static_cast<T*>(p_.vectors), B_, m_, k, ms);
    // values and residuals [B, k].
    stage2_.resize(static_cast<size_t>(2 * B_ * k));
    for (int64_t e = 0; e < B_ * k; ++e) {
      stage2_[e] = static_cast<T>(values[e]);
      stage2_[B_ * k + e] = static_cast<T>(residuals[e]);
    }
    upload(static_cast<T*>(p_.values), stage2_.data(), B_ * k);
    upload(static_cast<T*>(p_.ritz_residuals), stage2_.data() + B_ * k, B_ * k);
    sync();
  }

 private:
  static constexpr const char* kOp = "lanczos_topk_cuda";

  void check_j(int64_t j, int64_t lo, int64_t hi, const char* what) const {
    if (j < lo || j > hi) {
      fail(kOp, std::string(what) + ": step " + std::to_string(j) + " outside [" +
                    std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
  }
  void upload(T* dst, const T* src, int64_t count) {
    if (count <= 0) return;
    check_cuda(cudaMemcpyAsync(dst, src, static_cast<size_t>(count) * sizeof(T),
                               cudaMemcpyHostToDevice, stream_),
               kOp);
  }
  void download(T* dst, const T* src, int64_t count) {
    if (count <= 0) return;
    check_cuda(cudaMemcpyAsync(dst, src, static_cast<size_t>(count) * sizeof(T),
                               cudaMemcpyDeviceToHost, stream_),
               kOp);
  }
  void sync() { check_cuda(cudaStreamSynchronize(stream_), kOp); }
  void upload_active() {
    stage_.resize(static_cast<size_t>(B_));
    for (int64_t b = 0; b < B_; ++b) stage_[b] = active_host_[b] ? T(1) : T(0);
    upload(active_, stage_.data(), B_);
    sync();
    active_uploaded_ = true;
  }
  void ensure_active() {
    if (!active_uploaded_) upload_active();
  }

  LanczosParams p_;
  LanczosWorkspaceLayout layout_;
  int64_t B_, m_;
  cudaStream_t stream_;
  T* ws_;
  T* basis_ = nullptr;
  T* w_ = nullptr;
  T* s_ = nullptr;
  T* coef_ = nullptr;
  T* alpha_ = nullptr;
  T* beta_ = nullptr;
  T* active_ = nullptr;
  T* scratch_ = nullptr;
  std::vector<uint8_t> active_host_;
  bool active_uploaded_ = false;
  std::vector<T> stage_, stage2_;  // host staging; a buffer is never rewritten before a sync
};

template <typename T>
void run_lanczos(const LanczosParams& params) {
  CudaLanczosBackend<T> backend(params);
  lanczos_run(params, backend);
}

}  // namespace

void lanczos_topk_cuda(const LanczosParams& params) {
  const char* op = "lanczos_topk_cuda";
  if (params.dtype != DType::kFloat32 && params.dtype != DType::kFloat64) {
    fail(op, std::string("dtype must be float32 or float64, got ") + dtype_name(params.dtype));
  }
  // Sizes, k, max_steps and tol are validated by lanczos_run (same messages as the CPU path), which
  // also returns at once when num_problems == 0.
  if (params.num_problems > 0) {
    if (params.workspace == nullptr || params.values == nullptr || params.vectors == nullptr ||
        params.ritz_residuals == nullptr || params.steps == nullptr) {
      fail(op, "workspace, values, vectors, ritz_residuals and steps must be non-null");
    }
    if (params.matrix_free() && params.external == nullptr) {
      const SensitivityMatvecParams& o = params.op;
      if (o.batch * o.n != params.num_problems || o.m() != params.m) {
        fail(op, "matrix-free operator: expected op.batch * op.n == num_problems and op.m() == m, got " +
                     std::to_string(o.batch) + " * " + std::to_string(o.n) + " vs " +
                     std::to_string(params.num_problems) + " and " + std::to_string(o.m()) + " vs " +
                     std::to_string(params.m));
      }
      if (o.acc_dtype != params.dtype) {
        fail(op, std::string("matrix-free operator: op.acc_dtype must equal dtype ") +
                     dtype_name(params.dtype) + ", got " + dtype_name(o.acc_dtype));
      }
    }
  }
  const DeviceGuard guard(params.num_problems > 0 ? params.workspace : nullptr, op);
  if (params.dtype == DType::kFloat32) {
    run_lanczos<float>(params);
  } else {
    run_lanczos<double>(params);
  }
}

}  // namespace topoderiv
