// CPU backend of the batched Lanczos driver: problems are independent, so each primitive runs
// in parallel over problems; the hot loops (symmetric matvec, Gram-Schmidt) are SIMD.
#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/kernel_common.h"
#include "cpu/microkernel.h"
#include "topoderiv/lanczos.h"

namespace topoderiv {
namespace cpu {
namespace {

template <typename T>
TD_TARGET_CLONES void symv(const T* a, const T* v, T* w, int64_t m) {
  for (int64_t i = 0; i < m; ++i) w[i] = static_cast<T>(dot<T>(a + i * m, v, m));
}

// alpha = <v_j, w>; w -= V (V^T w) twice over V_0..V_j (stride ldv between basis vectors);
// beta = ||w||; v_{j+1} = w / beta.
template <typename T>
TD_TARGET_CLONES void cgs2(const T* V, int64_t ldv, int64_t j, T* w, int64_t m, double* coef, double* alpha,
                           double* beta, T* vnext, bool with_alpha) {
  if (with_alpha) *alpha = dot<T>(V + j * ldv, w, m);
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t t = 0; t <= j; ++t) coef[t] = dot<T>(V + t * ldv, w, m);
    for (int64_t t = 0; t <= j; ++t) axpy_neg<T>(w, V + t * ldv, static_cast<T>(coef[t]), m);
  }
  const double nrm = std::sqrt(dot<T>(w, w, m));
  *beta = nrm;
  if (vnext != nullptr && nrm > 0.0) {
    const T inv = static_cast<T>(1.0 / nrm);
    for (int64_t i = 0; i < m; ++i) vnext[i] = w[i] * inv;
  }
}

template <typename T>
class CpuBackend final : public LanczosBackend {
 public:
  // offset: global index of this backend's first problem (it seeds the start vectors).
  CpuBackend(const LanczosParams& P, int64_t offset, int nthreads)
      : P_(P), B_(P.num_problems), m_(P.m), nt_(std::max(1, nthreads)), off_(offset),
        layout_(lanczos_workspace_layout(P, false)), active_(P.num_problems, 1) {
    T* ws = static_cast<T*>(P.workspace);
    basis_ = ws + layout_.basis;
    w_ = ws + layout_.w;
    coef_.assign(static_cast<size_t>(nt_ * (P.max_steps + 1)), 0.0);
    // matrix-free: keep every A v_t, so that finish() gets A y = sum_t s_t A v_t for the explicit
    // residual without applying the operator again. Left uninitialised: row (t, b) is written at
    // every step t at which problem b is active, and finish() reads only those rows.
    if (P.matrix_free() && P.true_residuals != nullptr)
      av_.reset(new T[static_cast<size_t>(P.max_steps * B_ * m_)]);
  }
  T* V(int64_t j, int64_t b) const { return basis_ + (j * B_ + b) * m_; }
  T* AV(int64_t j, int64_t b) const { return av_.get() + (j * B_ + b) * m_; }

  int64_t seed_index(int64_t b) const { return P_.seed_period > 0 ? b % P_.seed_period : b; }

  void set_active(const uint8_t* active) override { std::copy(active, active + B_, active_.begin()); }

  void apply(int64_t j) override {
    if (P_.external != nullptr) {
      // another op's operator (e.g. the convolution blocks): it may skip inactive problems, whose
      // basis slots were never written (the workspace is not initialised): zero them first
      for (int64_t b = 0; b < B_; ++b)
        if (!active_[b]) std::fill(V(j, b), V(j, b) + m_, T(0));
      P_.external->apply(V(j, 0), w_, active_.data(), nullptr);
      if (av_) std::copy(w_, w_ + B_ * m_, AV(j, 0));
      return;
    }
    if (P_.matrix_free()) {
      // One operator (insertion point) after another: op.batch points of op.n blocks each,
      // problem b = point * n + block. A point with no active block is skipped; one with most
      // blocks active is applied whole (the slots of its finished blocks were never written: the
      // workspace is not initialised, so they are zeroed and their products discarded); one with
      // fewer active blocks gets the operator of its active blocks only (their costate columns
      // gathered, chunk of rows by chunk of rows: the copy stays bounded whatever N is).
      const int64_t n = P_.op.n, N = P_.op.N;
      const size_t es = P_.op.in_dtype == DType::kFloat64 ? 8 : P_.op.in_dtype == DType::kFloat32 ? 4 : 2;
      for (int64_t pt = 0; pt < P_.op.batch; ++pt) {
        SensitivityMatvecParams op = P_.op;
        op.num_threads = nt_;
        op.batch = 1;
        op.x = static_cast<const unsigned char*>(P_.op.x) + static_cast<size_t>(pt * P_.op.x_bstride) * es;
        op.p = static_cast<const unsigned char*>(P_.op.p) + static_cast<size_t>(pt * P_.op.p_bstride) * es;
        const int64_t b0 = pt * n;
        act_.clear();
        for (int64_t r = 0; r < n; ++r)
          if (active_[b0 + r]) act_.push_back(r);
        const int64_t na = static_cast<int64_t>(act_.size());
        if (na == 0) continue;
        if (na * 5 >= n * 4) {
          if (na < n)
            for (int64_t r = 0; r < n; ++r)
              if (!active_[b0 + r]) std::fill(V(j, b0 + r), V(j, b0 + r) + m_, T(0));
          op.v = V(j, b0);
          op.out = w_ + b0 * m_;
          sensitivity_matvec_cpu(op);
          if (av_) std::copy(w_ + b0 * m_, w_ + (b0 + n) * m_, AV(j, b0));
          continue;
        }
        // rows per chunk: the gathered columns stay within kGatherBytes (at least 256 rows)
        const int64_t rows = std::max<int64_t>(256, static_cast<int64_t>(kGatherBytes / (static_cast<size_t>(na) * es)));
        const int64_t R = std::min(N, rows);
        pbuf_.resize(static_cast<size_t>(R * na) * es);
        vbuf_.resize(static_cast<size_t>(na * m_));
        wbuf_.resize(static_cast<size_t>(na * m_));
        wsum_.assign(static_cast<size_t>(na * m_), T(0));
        for (int64_t c = 0; c < na; ++c) std::copy(V(j, b0 + act_[c]), V(j, b0 + act_[c]) + m_, vbuf_.data() + c * m_);
        const unsigned char* psrc = static_cast<const unsigned char*>(op.p);
        const unsigned char* xsrc = static_cast<const unsigned char*>(op.x);
        const int64_t* act = act_.data();
        for (int64_t s0 = 0; s0 < N; s0 += R) {
          const int64_t rc = std::min(R, N - s0);
#pragma omp parallel for num_threads(nt_) schedule(static)
          for (int64_t s = 0; s < rc; ++s)
            gather_active(psrc + static_cast<size_t>((s0 + s) * P_.op.p_rstride) * es, es, 1, act, na,
                          pbuf_.data() + static_cast<size_t>(s * na) * es);
          SensitivityMatvecParams sub = op;
          sub.N = rc;
          sub.x = xsrc + static_cast<size_t>(s0 * P_.op.x_rstride) * es;
          sub.p = pbuf_.data();
          sub.p_rstride = na;
          sub.p_bstride = rc * na;
          sub.x_bstride = rc * P_.op.x_rstride;
          sub.n = na;
          sub.v = vbuf_.data();
          sub.out = wbuf_.data();
          sensitivity_matvec_cpu(sub);
          if (s0 == 0 && rc == N) {
            wsum_.swap(wbuf_);
          } else {
            for (int64_t i = 0; i < na * m_; ++i) wsum_[i] += wbuf_[i];
          }
        }
        for (int64_t c = 0; c < na; ++c) {
          const int64_t b = b0 + act_[c];
          std::copy(wsum_.data() + c * m_, wsum_.data() + (c + 1) * m_, w_ + b * m_);
          if (av_) std::copy(wsum_.data() + c * m_, wsum_.data() + (c + 1) * m_, AV(j, b));
        }
      }
      return;
    }
    const T* a = static_cast<const T*>(P_.a);
#pragma omp parallel for num_threads(nt_) schedule(dynamic, 1)
    for (int64_t b = 0; b < B_; ++b)
      if (active_[b]) symv<T>(a + b * m_ * m_, V(j, b), w_ + b * m_, m_);
  }

  void orthonormalize(int64_t j, double* alpha, double* beta) override {
    const bool last = j + 1 > P_.max_steps;
#pragma omp parallel for num_threads(nt_) schedule(dynamic, 1)
    for (int64_t b = 0; b < B_; ++b) {
      if (!active_[b]) continue;
      double* coef = coef_.data() + thread_id() * (P_.max_steps + 1);
      cgs2<T>(V(0, b), B_ * m_, j, w_ + b * m_, m_, coef, &alpha[b], &beta[b], last ? nullptr : V(j + 1, b), true);
    }
  }

  void restart(int64_t j, const uint8_t* mask, const int32_t* tag, double* norms, uint8_t* from_v0) override {
#pragma omp parallel for num_threads(nt_) schedule(dynamic, 1)
    for (int64_t b = 0; b < B_; ++b) {
      if (!mask[b]) continue;
      T* w = w_ + b * m_;
      bool seeded = false;
      if (j < 0 && P_.v0 != nullptr) {
        const T* v0 = static_cast<const T*>(P_.v0) + b * m_;
        std::copy(v0, v0 + m_, w);
        seeded = dot<T>(w, w, m_) > 0.0;
      }
      if (j < 0) from_v0[b] = seeded ? 1 : 0;
      if (!seeded)
        for (int64_t i = 0; i < m_; ++i) w[i] = static_cast<T>(start_value(P_.seed, seed_index(off_ + b), tag[b], i));
      double* coef = coef_.data() + thread_id() * (P_.max_steps + 1);
      double dummy = 0.0;
      if (j >= 0) {
        cgs2<T>(V(0, b), B_ * m_, j, w, m_, coef, &dummy, &norms[b], V(j + 1, b), false);
      } else {
        norms[b] = std::sqrt(dot<T>(w, w, m_));
        const T inv = static_cast<T>(1.0 / norms[b]);
        for (int64_t i = 0; i < m_; ++i) V(0, b)[i] = w[i] * inv;
      }
    }
  }

  void finish(const int32_t* steps, const double* S, const double* values, const double* residuals) override {
    const int64_t k = P_.k, Smax = P_.max_steps;
    T* vec = static_cast<T*>(P_.vectors);
    T* val = static_cast<T*>(P_.values);
    T* res = static_cast<T*>(P_.ritz_residuals);
#pragma omp parallel for num_threads(nt_) schedule(dynamic, 1)
    for (int64_t b = 0; b < B_; ++b) {
      const bool mf_resid = av_ != nullptr;
      std::vector<double> y(static_cast<size_t>(m_)), ay(mf_resid ? static_cast<size_t>(m_) : 0);
      for (int64_t c = 0; c < k; ++c) {
        std::fill(y.begin(), y.end(), 0.0);
        std::fill(ay.begin(), ay.end(), 0.0);
        for (int64_t t = 0; t < steps[b]; ++t) {
          const double s = S[(b * Smax + t) * k + c];
          const T* v = V(t, b);
          for (int64_t i = 0; i < m_; ++i) y[i] += s * static_cast<double>(v[i]);
          if (mf_resid) {
            const T* av = AV(t, b);
            for (int64_t i = 0; i < m_; ++i) ay[i] += s * static_cast<double>(av[i]);
          }
        }
        double nrm = 0.0;
        for (double e : y) nrm += e * e;
        nrm = nrm > 0.0 ? 1.0 / std::sqrt(nrm) : 0.0;
        for (int64_t i = 0; i < m_; ++i) vec[(b * m_ + i) * k + c] = static_cast<T>(y[i] * nrm);
        val[b * k + c] = static_cast<T>(values[b * k + c]);
        res[b * k + c] = static_cast<T>(residuals[b * k + c]);
        if (mf_resid) {
          // explicit residual ||A y - theta y|| from the stored A v_t (not from the recurrence,
          // so a loss of orthogonality shows), without another pass over the data
          double r2 = 0.0;
          const double th = values[b * k + c];
          for (int64_t i = 0; i < m_; ++i) {
            const double e = (ay[i] - th * y[i]) * nrm;
            r2 += e * e;
          }
          static_cast<T*>(P_.true_residuals)[b * k + c] = static_cast<T>(std::sqrt(r2));
        } else if (P_.true_residuals != nullptr) {
          // explicit residual while A[b] is still in this core's cache
          std::vector<T> yt(static_cast<size_t>(m_)), ay(static_cast<size_t>(m_));
          for (int64_t i = 0; i < m_; ++i) yt[i] = vec[(b * m_ + i) * k + c];
          symv<T>(static_cast<const T*>(P_.a) + b * m_ * m_, yt.data(), ay.data(), m_);
          double r2 = 0.0;
          const double th = static_cast<double>(val[b * k + c]);
          for (int64_t i = 0; i < m_; ++i) {
            const double e = static_cast<double>(ay[i]) - th * static_cast<double>(yt[i]);
            r2 += e * e;
          }
          static_cast<T*>(P_.true_residuals)[b * k + c] = static_cast<T>(std::sqrt(r2));
        }
      }
      P_.steps[b] = steps[b];
    }
  }

 private:
  const LanczosParams& P_;
  int64_t B_, m_;
  int nt_;
  int64_t off_;
  LanczosWorkspaceLayout layout_;
  std::vector<uint8_t> active_;
  std::vector<double> coef_;
  std::vector<unsigned char> pbuf_;  // gathered costate columns of the active blocks (one chunk of rows)
  std::vector<T> vbuf_, wbuf_, wsum_;
  std::vector<int64_t> act_;  // active blocks of the point being applied
  static constexpr size_t kGatherBytes = size_t(4) << 20;
  std::unique_ptr<T[]> av_;  // [max_steps, B, m] A v_t (matrix-free with true_residuals only)
  T* basis_ = nullptr;
  T* w_ = nullptr;
};

// Dense operators: groups of problems small enough to stay in one core's L2 cache run the whole
// Lanczos iteration one group per thread, so each matrix is read from memory once instead of once
// per step. Matrix-free operators run in lock step (one GEMM pair serves all blocks per step).
template <typename T>
void run(const LanczosParams& P) {
  const int nt = std::max(1, P.num_threads);
  if (P.matrix_free() || P.num_problems <= 1 || P.norm_group > 1) {
    CpuBackend<T> be(P, 0, nt);
    lanczos_run(P, be);
    return;
  }
  const int64_t B = P.num_problems, m = P.m, k = P.k;
  const int64_t bytes = m * m * static_cast<int64_t>(sizeof(T));
  const int64_t group = std::max<int64_t>(1, std::min<int64_t>((512 << 10) / std::max<int64_t>(bytes, 1),
                                                               (B + nt - 1) / nt));
  const int64_t ngroups = (B + group - 1) / group;
  std::vector<std::string> errors(static_cast<size_t>(ngroups));
  std::vector<uint8_t> invalid(static_cast<size_t>(ngroups), 0);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t g = 0; g < ngroups; ++g) {
    const int64_t b0 = g * group, bg = std::min(group, B - b0);
    LanczosParams sub = P;
    sub.num_problems = bg;
    sub.a = static_cast<const T*>(P.a) + b0 * m * m;
    sub.values = static_cast<T*>(P.values) + b0 * k;
    sub.vectors = static_cast<T*>(P.vectors) + b0 * m * k;
    sub.ritz_residuals = static_cast<T*>(P.ritz_residuals) + b0 * k;
    sub.steps = P.steps + b0;
    sub.v0 = P.v0 != nullptr ? static_cast<const T*>(P.v0) + b0 * m : nullptr;
    sub.anorm_host = P.anorm_host != nullptr ? P.anorm_host + b0 : nullptr;
    sub.true_residuals = P.true_residuals != nullptr ? static_cast<T*>(P.true_residuals) + b0 * k : nullptr;
    // the workspace size is linear in the number of problems: slice it proportionally
    sub.workspace = static_cast<T*>(P.workspace) + b0 * (lanczos_workspace_layout(P, false).total / B);
    try {
      CpuBackend<T> be(sub, b0, 1);
      lanczos_run(sub, be);
    } catch (const std::invalid_argument& e) {
      errors[g] = e.what();
      invalid[g] = 1;
    } catch (const std::exception& e) {
      errors[g] = e.what();
    }
  }
  for (int64_t g = 0; g < ngroups; ++g) {
    if (errors[g].empty()) continue;
    if (invalid[g]) throw std::invalid_argument(errors[g]);
    throw std::runtime_error(errors[g]);
  }
}

}  // namespace
}  // namespace cpu

void lanczos_topk_cpu(const LanczosParams& P) {
  if (P.num_problems > 0 && (P.workspace == nullptr || P.values == nullptr || P.vectors == nullptr ||
                             P.ritz_residuals == nullptr || P.steps == nullptr))
    fail("lanczos_topk", "workspace and output pointers must not be null");
  if (!P.matrix_free() || P.external != nullptr) {
    // dense operator, or another op's operator (checked by its caller)
  } else if (P.op.batch * P.op.n != P.num_problems || P.op.m() != P.m) {
    fail("lanczos_topk", "matrix-free operator shape does not match num_problems / m");
  }
  if (P.dtype == DType::kFloat32) {
    cpu::run<float>(P);
  } else if (P.dtype == DType::kFloat64) {
    cpu::run<double>(P);
  } else {
    fail("lanczos_topk", std::string("dtype must be float32 or float64, got ") + dtype_name(P.dtype));
  }
}

}  // namespace topoderiv
