// Emulated tests of the CUDA kernels against naive host references and the CPU twins.
// Run with csrc/cuda/emulator/run_emulated_tests.sh (argument: fiber order 0 forward, 1 reverse, 2 shuffled).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "topoderiv/conv_sensitivity.h"
#include "topoderiv/lanczos.h"
#include "topoderiv/sensitivity.h"
#include "topoderiv/sensitivity_tc.h"

#include "cuda_emulator.h"
#include "test_check.h"

using namespace topoderiv;


static std::mt19937_64 rng(12345);

static uint16_t f2bf(float f) {  // round-to-nearest-even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
static float bf2f(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct Data {
  // stored as raw bytes of in dtype, with arbitrary strides
  std::vector<unsigned char> x, p;
  std::vector<double> xv, pv;  // the values as doubles (after rounding to in dtype), dense [batch,N,d]
  int64_t x_rstride, x_bstride, p_rstride, p_bstride;
};

// The data fields shared by SensitivityBlocksParams and SensitivityMatvecParams.
template <typename Params>
static void set_data(Params& P, const Data& D, DType tin, DType tacc, int64_t batch, int64_t N, int64_t d,
                     int64_t n, bool bias) {
  P.batch = batch;
  P.N = N;
  P.d = d;
  P.n = n;
  P.bias = bias;
  P.x = D.x.data();
  P.x_rstride = D.x_rstride;
  P.x_bstride = D.x_bstride;
  P.p = D.p.data();
  P.p_rstride = D.p_rstride;
  P.p_bstride = D.p_bstride;
  P.in_dtype = tin;
  P.acc_dtype = tacc;
}

static size_t esize(DType t) { return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2); }

static double store(unsigned char* base, DType t, int64_t idx, double v) {
  if (t == DType::kFloat64) {
    std::memcpy(base + idx * 8, &v, 8);
    return v;
  } else if (t == DType::kFloat32) {
    float f = static_cast<float>(v);
    std::memcpy(base + idx * 4, &f, 4);
    return f;
  } else {
    uint16_t b = f2bf(static_cast<float>(v));
    std::memcpy(base + idx * 2, &b, 2);
    return bf2f(b);
  }
}

static Data make_data(DType t, int64_t batch, int64_t N, int64_t d, int64_t n, bool integer) {
  Data D;
  std::uniform_real_distribution<double> U(-1, 1);
  std::uniform_int_distribution<int> I(-3, 3);
  D.x_rstride = d + (rng() % 3);  // padding between rows
  D.x_bstride = N * D.x_rstride + (rng() % 5);
  D.p_rstride = n + (rng() % 3);
  D.p_bstride = N * D.p_rstride + (rng() % 5);
  const int64_t xe = std::max<int64_t>(1, batch * D.x_bstride), pe = std::max<int64_t>(1, batch * D.p_bstride);
  D.x.assign(xe * esize(t), 0);
  D.p.assign(pe * esize(t), 0);
  // poison everything first (NaN) so padding reads would show
  for (int64_t e = 0; e < xe; ++e) store(D.x.data(), t, e, NAN);
  for (int64_t e = 0; e < pe; ++e) store(D.p.data(), t, e, NAN);
  D.xv.assign(batch * N * d, 0);
  D.pv.assign(batch * N * n, 0);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t s = 0; s < N; ++s) {
      for (int64_t i = 0; i < d; ++i)
        D.xv[(b * N + s) * d + i] =
            store(D.x.data(), t, b * D.x_bstride + s * D.x_rstride + i, integer ? I(rng) : U(rng));
      for (int64_t r = 0; r < n; ++r)
        D.pv[(b * N + s) * n + r] =
            store(D.p.data(), t, b * D.p_bstride + s * D.p_rstride + r, integer ? I(rng) : U(rng));
    }
  return D;
}

static void test_blocks(DType t, int64_t batch, int64_t N, int64_t d, int64_t n, bool bias, bool integer) {
  const int64_t m = d + (bias ? 1 : 0);
  Data D = make_data(t, batch, N, d, n, integer);
  const bool f64 = t == DType::kFloat64;
  const int64_t oe = batch * n * m * m;
  // initial out: symmetric random (integer if integer)
  std::vector<double> out0(oe);
  std::uniform_int_distribution<int> I(-5, 5);
  for (int64_t br = 0; br < batch * n; ++br)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = i; j < m; ++j) {
        double v = I(rng);
        out0[br * m * m + i * m + j] = v;
        out0[br * m * m + j * m + i] = v;
      }
  std::vector<float> of(oe);
  std::vector<double> od(oe);
  for (int64_t e = 0; e < oe; ++e) {
    of[e] = static_cast<float>(out0[e]);
    od[e] = out0[e];
  }
  SensitivityBlocksParams P;
  set_data(P, D, t, f64 ? DType::kFloat64 : DType::kFloat32, batch, N, d, n, bias);
  P.out = f64 ? static_cast<void*>(od.data()) : static_cast<void*>(of.data());
  sensitivity_blocks_cuda(P);
  double maxerr = 0, maxref = 0;
  bool sym = true;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < m; ++j) {
          double ref = 0;
          for (int64_t s = 0; s < N; ++s) {
            const double xi = i < d ? D.xv[(b * N + s) * d + i] : 1.0;
            const double xj = j < d ? D.xv[(b * N + s) * d + j] : 1.0;
            ref += D.pv[(b * N + s) * n + r] * xi * xj;
          }
          const int64_t e = ((b * n + r) * m + i) * m + j, et = ((b * n + r) * m + j) * m + i;
          ref += out0[e];
          const double got = f64 ? od[e] : of[e];
          const double gott = f64 ? od[et] : of[et];
          if (got != gott) sym = false;
          maxerr = std::max(maxerr, std::fabs(got - ref));
          maxref = std::max(maxref, std::fabs(ref));
          if (std::isnan(got)) maxerr = INFINITY;
        }
  const double tol = integer ? 0.0 : (f64 ? 1e-12 : 1e-5) * std::max(1.0, (double)N) * std::max(1.0, maxref);
  CHECK(maxerr <= tol, "blocks %s batch=%ld N=%ld d=%ld n=%ld bias=%d int=%d: maxerr %g (tol %g)",
        dtype_name(t), batch, N, d, n, bias, integer, maxerr, tol);
  CHECK(sym, "blocks %s batch=%ld N=%ld d=%ld n=%ld bias=%d: not exactly symmetric", dtype_name(t), batch,
        N, d, n, bias);
}

static void test_matvec(DType t, int64_t batch, int64_t N, int64_t d, int64_t n, bool bias, bool integer) {
  const int64_t m = d + (bias ? 1 : 0);
  Data D = make_data(t, batch, N, d, n, integer);
  const bool f64 = t == DType::kFloat64;
  std::uniform_real_distribution<double> U(-1, 1);
  std::uniform_int_distribution<int> I(-3, 3);
  std::vector<double> v(batch * n * m);
  for (auto& e : v) e = integer ? I(rng) : U(rng);
  if (!f64) for (auto& e : v) e = static_cast<float>(e);
  std::vector<float> vf(v.begin(), v.end()), of(batch * n * m, NAN), wf(batch * N * n + 1, NAN);
  std::vector<double> od(batch * n * m, NAN), wd(batch * N * n + 1, NAN);
  SensitivityMatvecParams P;
  set_data(P, D, t, f64 ? DType::kFloat64 : DType::kFloat32, batch, N, d, n, bias);
  P.v = f64 ? static_cast<const void*>(v.data()) : static_cast<const void*>(vf.data());
  P.out = f64 ? static_cast<void*>(od.data()) : static_cast<void*>(of.data());
  P.workspace = f64 ? static_cast<void*>(wd.data()) : static_cast<void*>(wf.data());
  sensitivity_matvec_cuda(P);
  double maxerr = 0, maxref = 0;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < m; ++i) {
        double ref = 0;
        for (int64_t s = 0; s < N; ++s) {
          double y = 0;
          for (int64_t j = 0; j < m; ++j) y += (j < d ? D.xv[(b * N + s) * d + j] : 1.0) * v[(b * n + r) * m + j];
          ref += D.pv[(b * N + s) * n + r] * y * (i < d ? D.xv[(b * N + s) * d + i] : 1.0);
        }
        const double got = f64 ? od[(b * n + r) * m + i] : of[(b * n + r) * m + i];
        maxerr = std::max(maxerr, std::isnan(got) ? INFINITY : std::fabs(got - ref));
        maxref = std::max(maxref, std::fabs(ref));
      }
  const double tol = integer ? 0.0 : (f64 ? 1e-12 : 1e-5) * std::max(1.0, (double)N * m) * std::max(1.0, maxref);
  CHECK(maxerr <= tol, "matvec %s batch=%ld N=%ld d=%ld n=%ld bias=%d int=%d: maxerr %g (tol %g)",
        dtype_name(t), batch, N, d, n, bias, integer, maxerr, tol);
  // workspace sentinel untouched
  CHECK(f64 ? std::isnan(wd[batch * N * n]) : std::isnan(wf[batch * N * n]), "matvec workspace overrun");
}

// Symmetric dense problems; compare CUDA-emulated Lanczos with the CPU backend. with_v0: start
// vectors given (row 0 all zero: it must fall back to the seeded random start).
// Lanczos params of B problems of size m, top k, at most max_steps steps, with the tolerance of
// T's precision (1e-10 for double, 1e-5 for float).
template <typename T>
static LanczosParams lanczos_params(int64_t B, int64_t m, int64_t k, int64_t max_steps, uint64_t seed) {
  LanczosParams P;
  P.num_problems = B;
  P.m = m;
  P.k = k;
  P.max_steps = max_steps;
  P.tol = sizeof(T) == 8 ? 1e-10 : 1e-5;
  P.seed = seed;
  P.dtype = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
  return P;
}

// The outputs of one Lanczos call, NaN-filled (entries left unwritten show), and its workspace of
// ws_elems elements of ws_fill followed by a NaN guard (an overrun shows).
template <typename T>
struct LanczosRun {
  std::vector<T> vals, vecs, res, ws;
  std::vector<int32_t> steps;
  // P with these outputs attached.
  LanczosParams attach(const LanczosParams& P, int64_t ws_elems, T ws_fill) {
    const int64_t B = P.num_problems, m = P.m, k = P.k;
    vals.assign(B * k, NAN);
    vecs.assign(B * m * k, NAN);
    res.assign(B * k, NAN);
    steps.assign(B, -1);
    ws.assign(ws_elems + 1, ws_fill);
    ws.back() = T(NAN);
    LanczosParams Q = P;
    Q.values = vals.data();
    Q.vectors = vecs.data();
    Q.ritz_residuals = res.data();
    Q.steps = steps.data();
    Q.workspace = ws.data();
    return Q;
  }
  bool guard_intact() const { return std::isnan(static_cast<double>(ws.back())); }
};

template <typename T>
static void test_lanczos_dense(int64_t B, int64_t m, int64_t k, int64_t max_steps, int kind, bool with_v0 = false) {
  std::vector<T> a(B * m * m);
  std::normal_distribution<double> G(0, 1);
  for (int64_t b = 0; b < B; ++b) {
    T* A = a.data() + b * m * m;
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = i; j < m; ++j) {
        double v = G(rng);
        if (kind == 1) v = (i == j) ? (i < 3 ? 10.0 * (3 - i) : 0.01 * G(rng)) : 0.0;  // big gaps, rank-deficient
        if (kind == 2) v = (i == j && i % 2 == 0) ? 1.0 : 0.0;                       // multiplicities + zero block
        A[i * m + j] = A[j * m + i] = static_cast<T>(v);
      }
  }
  LanczosParams P = lanczos_params<T>(B, m, k, max_steps, 7);
  P.a = a.data();
  std::vector<T> v0(B * m);
  for (int64_t i = 0; i < B * m; ++i) v0[i] = i < m ? T(0) : static_cast<T>(G(rng));
  if (with_v0) P.v0 = v0.data();
  LanczosRun<T> run[2];  // CUDA, CPU
  for (int w = 0; w < 2; ++w) {
    const LanczosParams Q = run[w].attach(P, lanczos_workspace_layout(P, w == 0).total, T(NAN));
    if (w == 0) lanczos_topk_cuda(Q); else lanczos_topk_cpu(Q);
    CHECK(run[w].guard_intact(), "lanczos workspace overrun");
  }
  for (int64_t b = 0; b < B; ++b) {
    CHECK(run[0].steps[b] == run[1].steps[b], "lanczos B=%ld m=%ld kind=%d b=%ld steps cuda %d cpu %d", B, m, kind, b,
          run[0].steps[b], run[1].steps[b]);
    const T* A = a.data() + b * m * m;
    double anorm = 0;
    for (int64_t i = 0; i < m * m; ++i) anorm = std::max(anorm, std::fabs((double)A[i]));
    anorm *= m;
    for (int64_t c = 0; c < k; ++c) {
      const double lam = run[0].vals[b * k + c];
      CHECK(std::fabs(lam - run[1].vals[b * k + c]) <= (sizeof(T) == 8 ? 1e-9 : 1e-3) * std::max(1.0, anorm / m),
            "lanczos kind=%d b=%ld c=%ld value cuda %.10g cpu %.10g", kind, b, c, lam, (double)run[1].vals[b * k + c]);
      // residual of the returned vector, and unit norm
      double r2 = 0, n2 = 0;
      for (int64_t i = 0; i < m; ++i) {
        double av = 0;
        for (int64_t j = 0; j < m; ++j) av += (double)A[i * m + j] * run[0].vecs[(b * m + j) * k + c];
        const double yi = run[0].vecs[(b * m + i) * k + c];
        r2 += (av - lam * yi) * (av - lam * yi);
        n2 += yi * yi;
      }
      CHECK(std::fabs(std::sqrt(n2) - 1) < (sizeof(T) == 8 ? 1e-12 : 1e-5), "lanczos vector norm %g", std::sqrt(n2));
      const bool converged = run[0].steps[b] < max_steps || run[0].steps[b] == m;
      CHECK(std::fabs(std::sqrt(r2) - (double)run[0].res[b * k + c]) <= (sizeof(T) == 8 ? 1e-6 : 1e-2) * std::max(1.0, anorm / m),
            "lanczos residual %g vs estimate %g", std::sqrt(r2), (double)run[0].res[b * k + c]);
      CHECK(!converged || std::sqrt(r2) <= (sizeof(T) == 8 ? 1e-6 : 1e-2) * std::max(1.0, anorm / m),
            "lanczos kind=%d b=%ld c=%ld residual %g (est %g)", kind, b, c, std::sqrt(r2),
            (double)run[0].res[b * k + c]);
      CHECK(std::fabs((double)run[0].res[b * k + c] - (double)run[1].res[b * k + c]) <= 1e-3 * std::max(1.0, anorm / m),
            "lanczos residual estimate cuda %g cpu %g", (double)run[0].res[b * k + c], (double)run[1].res[b * k + c]);
    }
  }
}

// Matrix-free Lanczos vs dense Lanczos on the blocks formed explicitly.
template <typename T>
static void test_lanczos_mf(DType tin, int64_t batch, int64_t N, int64_t d, int64_t n, int64_t k) {
  const int64_t m = d + 1, B = batch * n;
  Data D = make_data(tin, batch, N, d, n, false);
  const DType dt = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
  LanczosParams P = lanczos_params<T>(B, m, k, m, 3);
  set_data(P.op, D, tin, dt, batch, N, d, n, true);
  std::vector<T> vals(B * k), vecs(B * m * k), res(B * k), ws(lanczos_workspace_layout(P, true).total);
  std::vector<int32_t> steps(B);
  P.values = vals.data();
  P.vectors = vecs.data();
  P.ritz_residuals = res.data();
  P.steps = steps.data();
  P.workspace = ws.data();
  lanczos_topk_cuda(P);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < n; ++r) {
      // dense block
      std::vector<double> A(m * m, 0);
      for (int64_t s = 0; s < N; ++s)
        for (int64_t i = 0; i < m; ++i)
          for (int64_t j = 0; j < m; ++j)
            A[i * m + j] += D.pv[(b * N + s) * n + r] * (i < d ? D.xv[(b * N + s) * d + i] : 1.0) *
                            (j < d ? D.xv[(b * N + s) * d + j] : 1.0);
      const int64_t pb = b * n + r;
      double anorm = 0;
      for (double e : A) anorm = std::max(anorm, std::fabs(e));
      anorm *= m;
      for (int64_t c = 0; c < k; ++c) {
        const double lam = vals[pb * k + c];
        double r2 = 0;
        for (int64_t i = 0; i < m; ++i) {
          double av = 0;
          for (int64_t j = 0; j < m; ++j) av += A[i * m + j] * vecs[(pb * m + j) * k + c];
          r2 += std::pow(av - lam * vecs[(pb * m + i) * k + c], 2);
        }
        CHECK(std::sqrt(r2) <= (sizeof(T) == 8 ? 1e-6 : 1e-3) * std::max(1e-3, anorm),
              "mf lanczos pb=%ld c=%ld residual %g anorm %g", pb, c, std::sqrt(r2), anorm);
      }
      // largest algebraic: check lam0 >= Rayleigh quotient of random vectors and of unit vectors
      for (int64_t i = 0; i < m; ++i)
        CHECK(vals[pb * k] >= A[i * m + i] - 1e-4 * std::max(1.0, anorm), "mf lanczos not top: %g < A_ii %g",
              (double)vals[pb * k], A[i * m + i]);
    }
}

// ------------------------------------------------------------------------------------ convolutions

// A 4-D tensor [a, b, c, d] stored with padded strides: layout 0 = NCHW-like (d fastest), 1 =
// channels-last-like (b fastest). Values (rounded to the dtype) kept densely as doubles.
struct Tensor4 {
  std::vector<unsigned char> raw;
  std::vector<double> val;
  Strides4 st;
  int64_t a = 0, b = 0, c = 0, d = 0;
  double at(int64_t i, int64_t j, int64_t h, int64_t w) const { return val[((i * b + j) * c + h) * d + w]; }
};

static Tensor4 make_tensor4(DType t, int64_t a, int64_t b, int64_t c, int64_t d, int layout, bool integer) {
  Tensor4 T;
  T.a = a; T.b = b; T.c = c; T.d = d;
  auto pad = [] { return static_cast<int64_t>(rng() % 3); };
  if (layout == 0) {
    T.st.w = 1;
    T.st.h = d + pad();
    T.st.c = c * T.st.h + pad();
    T.st.n = b * T.st.c + pad();
  } else {
    T.st.c = 1;
    T.st.w = b + pad();
    T.st.h = d * T.st.w + pad();
    T.st.n = c * T.st.h + pad();
  }
  int64_t elems = 1;
  if (a > 0 && b > 0 && c > 0 && d > 0) elems += (a - 1) * T.st.n + (b - 1) * T.st.c + (c - 1) * T.st.h + (d - 1) * T.st.w;
  T.raw.assign(static_cast<size_t>(elems) * esize(t), 0);
  for (int64_t e = 0; e < elems; ++e) store(T.raw.data(), t, e, NAN);  // poison: padding reads show
  T.val.assign(static_cast<size_t>(a * b * c * d), 0);
  std::uniform_real_distribution<double> U(-1, 1);
  std::uniform_int_distribution<int> I(-3, 3);
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j)
      for (int64_t h = 0; h < c; ++h)
        for (int64_t w = 0; w < d; ++w)
          T.val[((i * b + j) * c + h) * d + w] =
              store(T.raw.data(), t, i * T.st.n + j * T.st.c + h * T.st.h + w * T.st.w, integer ? I(rng) : U(rng));
  return T;
}

// pt[row s, feature i] of the naive im2col.
static double patch_ref(const Tensor4& X, const ConvGeometry& g, int64_t s, int64_t i) {
  const int64_t d = g.d();
  if (i == d) return 1.0;
  const int64_t Ho = g.Ho(), Wo = g.Wo();
  const int64_t img = s / (Ho * Wo), oh = (s / Wo) % Ho, ow = s % Wo;
  const int64_t c = i / (g.k * g.k), ky = (i / g.k) % g.k, kx = i % g.k;
  const int64_t h = oh + ky - g.pad, w = ow + kx - g.pad;
  if (h < 0 || h >= g.H || w < 0 || w >= g.W) return 0.0;
  return X.at(img, c, h, w);
}
static double pcost_ref(const Tensor4& P, const ConvGeometry& g, int64_t s, int64_t r) {
  const int64_t Ho = g.Ho(), Wo = g.Wo();
  return P.at(s / (Ho * Wo), r, (s / Wo) % Ho, s % Wo);
}

struct ConvShape {
  int64_t N, C, H, W, n, k, pad;
  bool bias;
};

static void test_conv_blocks(DType t, const ConvShape& c, bool integer, int layout) {
  ConvGeometry g;
  g.N = c.N; g.C = c.C; g.H = c.H; g.W = c.W; g.n = c.n; g.k = c.k; g.pad = c.pad; g.bias = c.bias;
  const int64_t m = g.m(), rows = g.rows();
  Tensor4 X = make_tensor4(t, g.N, g.C, g.H, g.W, layout, integer);
  Tensor4 Pt = make_tensor4(t, g.N, g.n, std::max<int64_t>(g.Ho(), 0), std::max<int64_t>(g.Wo(), 0), 1 - layout, integer);
  const bool f64 = t == DType::kFloat64;
  const int64_t oe = g.n * m * m;
  std::vector<double> out0(oe), ref(oe);
  std::uniform_int_distribution<int> I(-5, 5);
  for (int64_t r = 0; r < g.n; ++r)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = i; j < m; ++j) out0[(r * m + i) * m + j] = out0[(r * m + j) * m + i] = I(rng);
  std::vector<double> pt(static_cast<size_t>(rows * m));
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t i = 0; i < m; ++i) pt[s * m + i] = patch_ref(X, g, s, i);
  for (int64_t r = 0; r < g.n; ++r)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < m; ++j) {
        double acc = out0[(r * m + i) * m + j];
        for (int64_t s = 0; s < rows; ++s) acc += pcost_ref(Pt, g, s, r) * pt[s * m + i] * pt[s * m + j];
        ref[(r * m + i) * m + j] = acc;
      }
  double maxref = 0;
  for (double e : ref) maxref = std::max(maxref, std::fabs(e));
  for (int cuda = 0; cuda < 2; ++cuda) {
    std::vector<float> of(out0.begin(), out0.end());
    std::vector<double> od(out0);
    ConvSensitivityBlocksParams P;
    P.g = g;
    P.x = X.raw.data(); P.xs = X.st;
    P.p = Pt.raw.data(); P.ps = Pt.st;
    P.out = f64 ? static_cast<void*>(od.data()) : static_cast<void*>(of.data());
    P.in_dtype = t;
    P.acc_dtype = f64 ? DType::kFloat64 : DType::kFloat32;
    P.num_threads = 2;
    if (cuda) conv_sensitivity_blocks_cuda(P); else conv_sensitivity_blocks_cpu(P);
    double maxerr = 0;
    bool sym = true;
    for (int64_t r = 0; r < g.n; ++r)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < m; ++j) {
          const int64_t e = (r * m + i) * m + j, et = (r * m + j) * m + i;
          const double got = f64 ? od[e] : of[e], gott = f64 ? od[et] : of[et];
          if (got != gott) sym = false;
          maxerr = std::max(maxerr, std::isnan(got) ? INFINITY : std::fabs(got - ref[e]));
        }
    const double tol = integer ? 0.0 : (f64 ? 1e-12 : 1e-5) * std::max(1.0, (double)rows) * std::max(1.0, maxref);
    CHECK(maxerr <= tol, "conv blocks %s %s N=%ld C=%ld H=%ld W=%ld n=%ld k=%ld pad=%ld bias=%d layout=%d int=%d: "
          "maxerr %g (tol %g)", cuda ? "cuda" : "cpu", dtype_name(t), c.N, c.C, c.H, c.W, c.n, c.k, c.pad, c.bias,
          layout, integer, maxerr, tol);
    CHECK(sym, "conv blocks %s: not exactly symmetric", cuda ? "cuda" : "cpu");
  }
}

static void test_conv_matvec(DType t, const ConvShape& c, bool integer, int layout) {
  ConvGeometry g;
  g.N = c.N; g.C = c.C; g.H = c.H; g.W = c.W; g.n = c.n; g.k = c.k; g.pad = c.pad; g.bias = c.bias;
  const int64_t m = g.m(), rows = g.rows();
  Tensor4 X = make_tensor4(t, g.N, g.C, g.H, g.W, layout, integer);
  Tensor4 Pt = make_tensor4(t, g.N, g.n, std::max<int64_t>(g.Ho(), 0), std::max<int64_t>(g.Wo(), 0), layout, integer);
  const bool f64 = t == DType::kFloat64;
  std::uniform_real_distribution<double> U(-1, 1);
  std::uniform_int_distribution<int> I(-3, 3);
  std::vector<double> v(static_cast<size_t>(g.n * m));
  for (auto& e : v) e = integer ? I(rng) : U(rng);
  if (!f64) for (auto& e : v) e = static_cast<float>(e);
  std::vector<double> ref(static_cast<size_t>(g.n * m), 0.0), pt(static_cast<size_t>(m));
  for (int64_t s = 0; s < rows; ++s) {
    for (int64_t i = 0; i < m; ++i) pt[i] = patch_ref(X, g, s, i);
    for (int64_t r = 0; r < g.n; ++r) {
      double y = 0;
      for (int64_t i = 0; i < m; ++i) y += pt[i] * v[r * m + i];
      const double z = pcost_ref(Pt, g, s, r) * y;
      for (int64_t i = 0; i < m; ++i) ref[r * m + i] += z * pt[i];
    }
  }
  double maxref = 0;
  for (double e : ref) maxref = std::max(maxref, std::fabs(e));
  for (int cuda = 0; cuda < 2; ++cuda) {
    std::vector<float> vf(v.begin(), v.end()), of(g.n * m, NAN), wf(rows * g.n + 1, NAN);
    std::vector<double> od(g.n * m, NAN), wd(rows * g.n + 1, NAN);
    ConvSensitivityMatvecParams P;
    P.g = g;
    P.x = X.raw.data(); P.xs = X.st;
    P.p = Pt.raw.data(); P.ps = Pt.st;
    P.v = f64 ? static_cast<const void*>(v.data()) : static_cast<const void*>(vf.data());
    P.out = f64 ? static_cast<void*>(od.data()) : static_cast<void*>(of.data());
    P.workspace = f64 ? static_cast<void*>(wd.data()) : static_cast<void*>(wf.data());
    P.in_dtype = t;
    P.acc_dtype = f64 ? DType::kFloat64 : DType::kFloat32;
    P.num_threads = 3;
    if (cuda) conv_sensitivity_matvec_cuda(P); else conv_sensitivity_matvec_cpu(P);
    double maxerr = 0;
    for (int64_t e = 0; e < g.n * m; ++e) {
      const double got = f64 ? od[e] : of[e];
      maxerr = std::max(maxerr, std::isnan(got) ? INFINITY : std::fabs(got - ref[e]));
    }
    const double tol = integer ? 0.0 : (f64 ? 1e-12 : 1e-5) * std::max(1.0, (double)rows * m) * std::max(1.0, maxref);
    CHECK(maxerr <= tol, "conv matvec %s %s N=%ld C=%ld H=%ld W=%ld n=%ld k=%ld pad=%ld bias=%d layout=%d int=%d: "
          "maxerr %g (tol %g)", cuda ? "cuda" : "cpu", dtype_name(t), c.N, c.C, c.H, c.W, c.n, c.k, c.pad, c.bias,
          layout, integer, maxerr, tol);
    if (cuda) CHECK(f64 ? std::isnan(wd[rows * g.n]) : std::isnan(wf[rows * g.n]), "conv matvec workspace overrun");
  }
}

// Matrix-free Lanczos on the conv operator: emulated CUDA and CPU agree, and the CUDA vectors are
// eigenvectors of the naive dense blocks.
template <typename T>
static void test_conv_lanczos(DType tin, const ConvShape& c, int64_t k) {
  ConvGeometry g;
  g.N = c.N; g.C = c.C; g.H = c.H; g.W = c.W; g.n = c.n; g.k = c.k; g.pad = c.pad; g.bias = c.bias;
  const int64_t m = g.m(), B = g.n, rows = g.rows();
  Tensor4 X = make_tensor4(tin, g.N, g.C, g.H, g.W, 1, false);
  Tensor4 Pt = make_tensor4(tin, g.N, g.n, g.Ho(), g.Wo(), 0, false);
  const DType dt = sizeof(T) == 8 ? DType::kFloat64 : DType::kFloat32;
  ConvSensitivityMatvecParams op;
  op.g = g;
  op.x = X.raw.data(); op.xs = X.st;
  op.p = Pt.raw.data(); op.ps = Pt.st;
  op.in_dtype = tin;
  op.acc_dtype = dt;
  op.num_threads = 2;
  LanczosParams P = lanczos_params<T>(B, m, k, m, 11);
  P.norm_group = B; P.num_threads = 2;
  LanczosRun<T> run[2];  // CUDA, CPU
  for (int w = 0; w < 2; ++w) {
    // the CUDA workspace holds the operator's y [rows, n] at its end; zeroed as ops.py does
    const int64_t total = lanczos_workspace_layout(P, false).total + (w == 0 ? rows * B : 0);
    const LanczosParams Q = run[w].attach(P, total, w == 0 ? T(0) : T(NAN));
    if (w == 0) conv_lanczos_topk_cuda(Q, op); else conv_lanczos_topk_cpu(Q, op);
    CHECK(run[w].guard_intact(), "conv lanczos workspace overrun");
  }
  std::vector<double> pt(static_cast<size_t>(rows * m));
  for (int64_t s = 0; s < rows; ++s)
    for (int64_t i = 0; i < m; ++i) pt[s * m + i] = patch_ref(X, g, s, i);
  for (int64_t r = 0; r < B; ++r) {
    std::vector<double> A(static_cast<size_t>(m * m), 0.0);
    for (int64_t s = 0; s < rows; ++s) {
      const double pr = pcost_ref(Pt, g, s, r);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < m; ++j) A[i * m + j] += pr * pt[s * m + i] * pt[s * m + j];
    }
    double anorm = 0;
    for (double e : A) anorm = std::max(anorm, std::fabs(e));
    anorm *= m;
    for (int64_t cc = 0; cc < k; ++cc) {
      const double lam = run[0].vals[r * k + cc];
      CHECK(std::fabs(lam - run[1].vals[r * k + cc]) <= (sizeof(T) == 8 ? 1e-8 : 1e-3) * std::max(1.0, anorm),
            "conv lanczos r=%ld c=%ld value cuda %.10g cpu %.10g", r, cc, lam, (double)run[1].vals[r * k + cc]);
      double r2 = 0;
      for (int64_t i = 0; i < m; ++i) {
        double av = 0;
        for (int64_t j = 0; j < m; ++j) av += A[i * m + j] * run[0].vecs[(r * m + j) * k + cc];
        r2 += std::pow(av - lam * run[0].vecs[(r * m + i) * k + cc], 2);
      }
      CHECK(std::sqrt(r2) <= (sizeof(T) == 8 ? 1e-6 : 1e-3) * std::max(1e-3, anorm), "conv lanczos r=%ld residual %g",
            r, std::sqrt(r2));
    }
    for (int64_t i = 0; i < m; ++i)
      CHECK(run[0].vals[r * k] >= A[i * m + i] - 1e-4 * std::max(1.0, anorm), "conv lanczos not top: %g < A_ii %g",
            (double)run[0].vals[r * k], A[i * m + i]);
  }
}

// A batch of L problems of one geometry in one call (x, p advanced by batch strides that are not
// those of a packed stack): every problem equals the call on it alone, for the CPU and the emulated
// CUDA kernels: blocks, matvec (workspace [L, rows, n] not overrun) and the matrix-free Lanczos
// (problems b * n + r, norms per problem).
static void test_conv_batch(DType t, const ConvShape& c, int64_t L, bool integer, int layout) {
  ConvGeometry g;
  g.N = c.N; g.C = c.C; g.H = c.H; g.W = c.W; g.n = c.n; g.k = c.k; g.pad = c.pad; g.bias = c.bias;
  const int64_t m = g.m(), rows = g.rows(), n = g.n;
  // L N images: problem b holds images [b N, (b + 1) N); strides padded by make_tensor4
  Tensor4 X = make_tensor4(t, L * g.N, g.C, g.H, g.W, layout, integer);
  Tensor4 Pt = make_tensor4(t, L * g.N, g.n, g.Ho(), g.Wo(), 1 - layout, integer);
  const size_t es = esize(t);
  const bool f64 = t == DType::kFloat64;
  const DType acc = f64 ? DType::kFloat64 : DType::kFloat32;
  const size_t as = f64 ? 8 : 4;
  Strides4 xs = X.st, ps = Pt.st;
  xs.b = g.N * X.st.n;
  ps.b = g.N * Pt.st.n;
  auto get = [&](const std::vector<unsigned char>& b, int64_t e) {
    if (f64) { double v; std::memcpy(&v, b.data() + e * 8, 8); return v; }
    float v; std::memcpy(&v, b.data() + e * 4, 4); return static_cast<double>(v);
  };
  auto close = [&](double a, double b, double scale) {
    return integer ? a == b : std::fabs(a - b) <= (f64 ? 1e-12 : 1e-5) * std::max(1.0, scale);
  };
  std::uniform_int_distribution<int> I(-3, 3);
  for (int cuda = 0; cuda < 2; ++cuda) {
    // blocks
    ConvSensitivityBlocksParams P;
    P.g = g; P.g.batch = L;
    P.x = X.raw.data(); P.xs = xs; P.p = Pt.raw.data(); P.ps = ps;
    P.in_dtype = t; P.acc_dtype = acc; P.num_threads = 2;
    std::vector<unsigned char> out(static_cast<size_t>(L * n * m * m + 1) * as, 0);
    store(out.data(), acc, L * n * m * m, NAN);  // guard
    P.out = out.data();
    if (cuda) conv_sensitivity_blocks_cuda(P); else conv_sensitivity_blocks_cpu(P);
    CHECK(std::isnan(get(out, L * n * m * m)), "conv batch blocks %s: out overrun", cuda ? "cuda" : "cpu");
    for (int64_t b = 0; b < L; ++b) {
      ConvSensitivityBlocksParams Q = P;
      Q.g.batch = 1;
      Q.x = X.raw.data() + static_cast<size_t>(b * xs.b) * es;
      Q.p = Pt.raw.data() + static_cast<size_t>(b * ps.b) * es;
      std::vector<unsigned char> one(static_cast<size_t>(n * m * m) * as, 0);
      Q.out = one.data();
      if (cuda) conv_sensitivity_blocks_cuda(Q); else conv_sensitivity_blocks_cpu(Q);
      double worst = 0, scale = 0;
      for (int64_t e = 0; e < n * m * m; ++e) {
        scale = std::max(scale, std::fabs(get(one, e)));
        if (!(get(out, b * n * m * m + e) == get(one, e))) worst = std::max(worst, std::fabs(get(out, b * n * m * m + e) - get(one, e)) + (std::isnan(get(out, b * n * m * m + e)) ? INFINITY : 0.0));
      }
      CHECK(close(worst, 0.0, scale * rows), "conv batch blocks %s %s b=%ld: differs from the problem alone by %g",
            cuda ? "cuda" : "cpu", dtype_name(t), b, worst);
    }
    // matvec
    ConvSensitivityMatvecParams M;
    M.g = g; M.g.batch = L;
    M.x = X.raw.data(); M.xs = xs; M.p = Pt.raw.data(); M.ps = ps;
    M.in_dtype = t; M.acc_dtype = acc; M.num_threads = 3;
    std::vector<unsigned char> v(static_cast<size_t>(L * n * m) * as), mo(static_cast<size_t>(L * n * m) * as),
        ws(static_cast<size_t>(L * rows * n + 1) * as);
    for (int64_t e = 0; e < L * n * m; ++e) store(v.data(), acc, e, I(rng));
    for (int64_t e = 0; e < L * n * m; ++e) store(mo.data(), acc, e, NAN);
    for (int64_t e = 0; e <= L * rows * n; ++e) store(ws.data(), acc, e, NAN);
    M.v = v.data(); M.out = mo.data(); M.workspace = ws.data();
    if (cuda) conv_sensitivity_matvec_cuda(M); else conv_sensitivity_matvec_cpu(M);
    CHECK(std::isnan(get(ws, L * rows * n)), "conv batch matvec workspace overrun");
    for (int64_t b = 0; b < L; ++b) {
      ConvSensitivityMatvecParams Q = M;
      Q.g.batch = 1;
      Q.x = X.raw.data() + static_cast<size_t>(b * xs.b) * es;
      Q.p = Pt.raw.data() + static_cast<size_t>(b * ps.b) * es;
      Q.v = v.data() + static_cast<size_t>(b * n * m) * as;
      std::vector<unsigned char> one(static_cast<size_t>(n * m) * as), w1(static_cast<size_t>(rows * n + 1) * as);
      Q.out = one.data(); Q.workspace = w1.data();
      if (cuda) conv_sensitivity_matvec_cuda(Q); else conv_sensitivity_matvec_cpu(Q);
      double worst = 0, scale = 0;
      for (int64_t e = 0; e < n * m; ++e) {
        const double a = get(mo, b * n * m + e), o = get(one, e);
        scale = std::max(scale, std::fabs(o));
        worst = std::max(worst, std::isnan(a) ? INFINITY : std::fabs(a - o));
      }
      CHECK(close(worst, 0.0, scale * rows * m), "conv batch matvec %s %s b=%ld: differs from the problem alone by %g",
            cuda ? "cuda" : "cpu", dtype_name(t), b, worst);
    }
  }
  if (!f64 || rows == 0 || n == 0) return;
  // matrix-free Lanczos over the L n blocks: each block's top eigenvalue equals the problem alone's
  ConvSensitivityMatvecParams op;
  op.g = g; op.g.batch = L;
  op.x = X.raw.data(); op.xs = xs; op.p = Pt.raw.data(); op.ps = ps;
  op.in_dtype = t; op.acc_dtype = DType::kFloat64; op.num_threads = 2;
  auto solve = [&](const ConvSensitivityMatvecParams& o, int cuda, std::vector<double>& vals) {
    LanczosParams Q;
    Q.num_problems = o.g.problems(); Q.m = m; Q.k = 1; Q.max_steps = m; Q.tol = 1e-11; Q.seed = 3;
    Q.norm_group = n; Q.dtype = DType::kFloat64; Q.num_threads = 2;
    const int64_t B = Q.num_problems;
    vals.assign(B, NAN);
    std::vector<double> vecs(B * m), res(B);
    std::vector<int32_t> st(B);
    const int64_t total = lanczos_workspace_layout(Q, false).total + (cuda ? o.g.batch * rows * n : 0);
    std::vector<double> w(total + 1, 0.0);
    w.back() = NAN;
    Q.values = vals.data(); Q.vectors = vecs.data(); Q.ritz_residuals = res.data(); Q.steps = st.data();
    Q.workspace = w.data();
    if (cuda) conv_lanczos_topk_cuda(Q, o); else conv_lanczos_topk_cpu(Q, o);
    CHECK(std::isnan(w.back()), "conv batch lanczos workspace overrun");
  };
  for (int cuda = 0; cuda < 2; ++cuda) {
    std::vector<double> all;
    solve(op, cuda, all);
    for (int64_t b = 0; b < L; ++b) {
      ConvSensitivityMatvecParams o = op;
      o.g.batch = 1;
      o.x = X.raw.data() + static_cast<size_t>(b * xs.b) * es;
      o.p = Pt.raw.data() + static_cast<size_t>(b * ps.b) * es;
      std::vector<double> one;
      solve(o, cuda, one);
      double scale = 0;
      for (double e : one) scale = std::max(scale, std::fabs(e));
      for (int64_t r = 0; r < n; ++r)
        CHECK(std::fabs(all[b * n + r] - one[r]) <= 1e-8 * std::max(1.0, scale),
              "conv batch lanczos %s b=%ld r=%ld: %.12g alone %.12g", cuda ? "cuda" : "cpu", b, r, all[b * n + r], one[r]);
    }
  }
}

static void test_conv() {
  const DType dts[3] = {DType::kFloat32, DType::kFloat64, DType::kBFloat16};
  const ConvShape shapes[] = {
      {1, 1, 1, 1, 1, 1, 0, true},  {2, 1, 5, 7, 3, 3, 1, true},  {1, 3, 4, 5, 2, 3, 1, false},
      {2, 2, 6, 5, 4, 5, 2, true},  {1, 2, 3, 3, 3, 5, 2, true},  {1, 4, 5, 6, 5, 3, 0, true},   // valid padding
      {1, 0, 4, 4, 2, 3, 1, true},  {2, 3, 7, 6, 17, 1, 0, true}, {1, 8, 5, 5, 3, 3, 1, true},   // m = 73
      {0, 2, 4, 4, 2, 3, 1, true},  {1, 2, 4, 4, 0, 3, 1, true},  {1, 2, 2, 2, 2, 5, 0, true},   // no rows
  };
  for (const ConvShape& c : shapes)
    for (DType t : dts)
      for (int integer = 0; integer < 2; ++integer) test_conv_blocks(t, c, integer, static_cast<int>(rng() % 2));
  std::printf("conv blocks done (%d failures)\n", failures);
  const ConvShape mshapes[] = {
      {1, 1, 1, 1, 1, 1, 0, true}, {2, 1, 5, 7, 3, 3, 1, true}, {1, 3, 4, 5, 2, 3, 1, false},
      {1, 2, 6, 5, 70, 3, 1, true}, {1, 8, 5, 5, 3, 3, 1, true}, {1, 0, 4, 4, 2, 3, 1, true},
      {3, 1, 30, 30, 2, 1, 0, true},  // 2700 rows, m = 2: the second GEMM splits its rows
      {0, 2, 4, 4, 2, 3, 1, true},
  };
  for (const ConvShape& c : mshapes)
    for (DType t : dts)
      for (int integer = 0; integer < 2; ++integer) test_conv_matvec(t, c, integer, static_cast<int>(rng() % 2));
  std::printf("conv matvec done (%d failures)\n", failures);
  test_conv_lanczos<double>(DType::kFloat64, {2, 2, 4, 5, 3, 3, 1, true}, 2);
  test_conv_lanczos<float>(DType::kFloat32, {1, 1, 5, 5, 4, 3, 1, false}, 1);
  test_conv_lanczos<float>(DType::kBFloat16, {1, 2, 3, 4, 2, 1, 0, true}, 1);
  std::printf("conv lanczos done (%d failures)\n", failures);
  const ConvShape bshapes[] = {
      {2, 3, 5, 7, 4, 3, 1, true}, {1, 2, 4, 4, 70, 1, 0, false}, {2, 8, 5, 5, 3, 3, 1, true},  // m = 73
      {3, 1, 30, 30, 2, 1, 0, true},  // 2700 rows: the second GEMM splits its rows (batch x splits in z)
      {0, 2, 4, 4, 2, 3, 1, true}, {1, 2, 4, 4, 0, 3, 1, true},
  };
  for (const ConvShape& c : bshapes)
    for (DType t : dts)
      for (int integer = 0; integer < 2; ++integer)
        for (int64_t L : {int64_t(1), int64_t(3)}) test_conv_batch(t, c, L, integer, static_cast<int>(rng() % 2));
  std::printf("conv batch done (%d failures)\n", failures);
  // the kernels' own entry checks (behind the span checks of conv_sensitivity.h), by their text
  auto expect = [](const char* want, auto f) {
    std::string got = "(nothing thrown)";
    try {
      f();
    } catch (const std::invalid_argument& e) {
      got = e.what();
    }
    CHECK(got.find(want) != std::string::npos, "expected '%s', got '%s'", want, got.c_str());
  };
  float buf[64] = {};
  ConvSensitivityBlocksParams B;
  B.g.N = 1; B.g.C = 1; B.g.H = 2; B.g.W = 2; B.g.n = 1; B.g.k = 1;
  B.x = buf; B.xs = {4, 4, 2, 1}; B.p = buf; B.ps = {4, 4, 2, 1}; B.out = buf + 32;
  B.acc_dtype = DType::kFloat64;
  expect("conv_sensitivity_blocks_cuda: on CUDA, in_dtype float32 needs acc_dtype float32, got float64",
         [&] { conv_sensitivity_blocks_cuda(B); });
  B.acc_dtype = DType::kFloat32;
  B.g.k = 0;
  expect("conv_sensitivity_blocks_cuda: sizes must be non-negative and kernel_size >= 1", [&] { conv_sensitivity_blocks_cuda(B); });
  expect("conv_sensitivity_blocks: sizes must be >= 0 (kernel_size >= 1)", [&] { conv_sensitivity_blocks_cpu(B); });
  B.g.k = 1;
  B.out = nullptr;
  expect("conv_sensitivity_blocks: out must not be null", [&] { conv_sensitivity_blocks_cpu(B); });
  expect("conv_sensitivity_blocks_cuda: x, p and out must be non-null", [&] { conv_sensitivity_blocks_cuda(B); });
  B.p = nullptr;
  expect("conv_sensitivity_blocks: x and p must not be null", [&] { conv_sensitivity_blocks_cpu(B); });
  B.g.C = 0;
  B.g.bias = false;
  expect("conv_sensitivity_blocks: m = C k k + bias must be >= 1", [&] { conv_sensitivity_blocks_cpu(B); });
  expect("conv_sensitivity_blocks_cuda: m = C k k + bias must be >= 1", [&] { conv_sensitivity_blocks_cuda(B); });
  ConvSensitivityMatvecParams M;
  M.g = B.g;
  M.g.C = 1; M.g.bias = true;
  M.x = buf; M.xs = {4, 4, 2, 1}; M.p = buf; M.ps = {4, 4, 2, 1}; M.out = buf + 32;
  expect("conv_sensitivity_matvec: v and out must not be null", [&] { conv_sensitivity_matvec_cpu(M); });
  expect("conv_sensitivity_matvec_cuda: x, p and v must be non-null", [&] { conv_sensitivity_matvec_cuda(M); });
  M.v = buf + 16;
  expect("conv_sensitivity_matvec_cuda: workspace must be non-null", [&] { conv_sensitivity_matvec_cuda(M); });
  M.out = nullptr;
  expect("conv_sensitivity_matvec_cuda: out must be non-null", [&] { conv_sensitivity_matvec_cuda(M); });
  M.out = buf + 32;
  LanczosParams L;
  L.num_problems = 2; L.m = 2; L.k = 1; L.max_steps = 2; L.dtype = DType::kFloat32;
  expect("conv_sensitivity_lanczos: the operator must have batch n = num_problems and m = the Lanczos m",
         [&] { conv_lanczos_topk_cpu(L, M); });
  expect("conv_sensitivity_lanczos_cuda: the operator must have batch n = num_problems and m = the Lanczos m, got "
         "batch n = 1 vs 2", [&] { conv_lanczos_topk_cuda(L, M); });
  M.g.batch = -1;
  expect("conv_sensitivity_matvec_cuda: batch must be >= 0, got -1", [&] { conv_sensitivity_matvec_cuda(M); });
  expect("conv_sensitivity_matvec: batch must be >= 0", [&] { conv_sensitivity_matvec_cpu(M); });
  M.g.batch = 1;
  L.num_problems = 1;
  L.dtype = DType::kFloat64;
  expect("conv_sensitivity_lanczos: op.acc_dtype must equal the Lanczos dtype", [&] { conv_lanczos_topk_cpu(L, M); });
  expect("conv_sensitivity_lanczos_cuda: op.acc_dtype must equal the Lanczos dtype", [&] { conv_lanczos_topk_cuda(L, M); });
  L.dtype = DType::kBFloat16;
  M.acc_dtype = DType::kBFloat16;
  expect("conv_sensitivity_lanczos: dtype must be float32 or float64, got bfloat16", [&] { conv_lanczos_topk_cpu(L, M); });
  M.acc_dtype = DType::kFloat32;
  M.in_dtype = DType::kFloat64;
  L.dtype = DType::kFloat32;
  expect("conv_sensitivity_lanczos_cuda: on CUDA, in_dtype float64 needs acc_dtype float64", [&] { conv_lanczos_topk_cuda(L, M); });
  std::printf("conv checks done (%d failures)\n", failures);
}

// ---- tensor-core routes (sensitivity_tc_cuda.cu) ---------------------------------------------------
// Design 1 (fused WMMA kernel): bfloat16 in, float32 out accumulated into. Integer data: every
// product p x x is a small integer (exact in bf16) and every sum exact in float32, so the result must
// equal the reference exactly. Random data: per element |got - ref| <= (2^-8 + (N + 32) 2^-24) *
// sum_s |p x_i x_j| + 2^-24 |out0| (one bf16 rounding of p x_i per term, then float32 sums).
static void test_blocks_mma(int64_t batch, int64_t N, int64_t d, int64_t n, bool bias, bool integer) {
  const int64_t m = d + (bias ? 1 : 0);
  Data D = make_data(DType::kBFloat16, batch, N, d, n, integer);
  const int64_t oe = batch * n * m * m;
  std::vector<double> out0(oe);
  std::uniform_int_distribution<int> I(-5, 5);
  for (int64_t br = 0; br < batch * n; ++br)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = i; j < m; ++j) out0[br * m * m + i * m + j] = out0[br * m * m + j * m + i] = I(rng);
  std::vector<float> of(oe + 64, NAN);  // + a poisoned tail: no write past the end
  for (int64_t e = 0; e < oe; ++e) of[e] = static_cast<float>(out0[e]);
  SensitivityBlocksParams P;
  set_data(P, D, DType::kBFloat16, DType::kFloat32, batch, N, d, n, bias);
  P.out = of.data();
  sensitivity_blocks_mma_cuda(P);
  double worst = 0;  // max of err / bound
  bool sym = true, exact = true;
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < m; ++j) {
          double ref = 0, absref = 0;
          for (int64_t s = 0; s < N; ++s) {
            const double xi = i < d ? D.xv[(b * N + s) * d + i] : 1.0;
            const double xj = j < d ? D.xv[(b * N + s) * d + j] : 1.0;
            const double t = D.pv[(b * N + s) * n + r] * xi * xj;
            ref += t;
            absref += std::fabs(t);
          }
          const int64_t e = ((b * n + r) * m + i) * m + j, et = ((b * n + r) * m + j) * m + i;
          ref += out0[e];
          const double got = of[e];
          if (of[e] != of[et]) sym = false;
          if (got != ref) exact = false;
          const double bound = (std::ldexp(1.0, -8) + (N + 32) * std::ldexp(1.0, -24)) * absref +
                               std::ldexp(1.0, -24) * std::fabs(out0[e]) + 1e-30;
          const double err = std::isnan(got) ? INFINITY : std::fabs(got - ref);
          worst = std::max(worst, err / bound);
        }
  bool tail = true;
  for (int64_t e = oe; e < oe + 64; ++e) tail = tail && std::isnan(of[e]);
  if (integer) {
    CHECK(exact, "blocks_mma batch=%ld N=%ld d=%ld n=%ld bias=%d int: not exact", batch, N, d, n, bias);
  } else {
    CHECK(worst <= 1.0, "blocks_mma batch=%ld N=%ld d=%ld n=%ld bias=%d: err/bound %g", batch, N, d, n, bias, worst);
  }
  CHECK(sym, "blocks_mma batch=%ld N=%ld d=%ld n=%ld bias=%d: not exactly symmetric", batch, N, d, n, bias);
  CHECK(tail, "blocks_mma batch=%ld N=%ld d=%ld n=%ld: wrote past out", batch, N, d, n);
}

// Design 2 (pair products): z[s, q] = bf16(xt_i xt_j) bit for bit (the product of two bf16 values is
// exact in float32; f2bf above rounds it independently of the kernel's rounding), nothing else written.
static void test_pair_products(int64_t N, int64_t d, bool bias, int64_t i0, int64_t i1) {
  const int64_t m = d + (bias ? 1 : 0);
  Data D = make_data(DType::kBFloat16, 1, N, d, 1, false);
  PairProductsParams P;
  P.N = N; P.d = d; P.bias = bias; P.x = D.x.data(); P.x_rstride = D.x_rstride; P.i0 = i0; P.i1 = i1;
  const int64_t W = P.width();
  std::vector<uint16_t> z(N * W + 64, 0xFFFF);  // NaN pattern, + a guard tail
  P.z = z.data();
  sensitivity_pair_products_cuda(P);
  int64_t bad = 0;
  for (int64_t s = 0; s < N; ++s)
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = i; j < m; ++j) {
        const double xi = i < d ? D.xv[s * d + i] : 1.0, xj = j < d ? D.xv[s * d + j] : 1.0;
        const uint16_t want = f2bf(static_cast<float>(xi * xj));
        const int64_t q = tri_offset(m, i) - tri_offset(m, i0) + (j - i);
        if (z[s * W + q] != want) ++bad;
      }
  for (int64_t e = N * W; e < N * W + 64; ++e) bad += z[e] != 0xFFFF;
  CHECK(bad == 0, "pair_products N=%ld d=%ld bias=%d rows [%ld, %ld): %ld wrong elements", N, d, bias, i0, i1, bad);
}

static void test_tensor_core_routes() {
  struct Shape { int64_t batch, N, d, n; bool bias; };
  const Shape shapes[] = {
      {1, 1, 0, 1, true},   {2, 37, 4, 3, true},   {1, 33, 20, 9, false}, {1, 70, 63, 5, true},
      {2, 45, 70, 6, false}, {1, 20, 130, 2, true}, {1, 0, 10, 3, true},   {1, 4, 5, 0, true},
  };
  for (const Shape& s : shapes)
    for (int integer = 0; integer < 2; ++integer) test_blocks_mma(s.batch, s.N, s.d, s.n, s.bias, integer);
  std::printf("blocks mma done (%d failures)\n", failures);
  test_pair_products(1, 0, true, 0, 1);
  test_pair_products(37, 5, true, 0, 6);
  test_pair_products(70, 9, false, 2, 7);
  test_pair_products(33, 40, true, 40, 41);  // the bias row alone
  test_pair_products(65, 70, true, 0, 71);
  test_pair_products(5, 4, true, 3, 3);      // no rows: nothing written
  std::printf("pair products done (%d failures)\n", failures);
  auto expect = [&](const char* what, auto&& fn) {
    std::string msg;
    try { fn(); } catch (const std::exception& e) { msg = e.what(); }
    CHECK(msg.find(what) != std::string::npos, "expected an error containing '%s', got '%s'", what, msg.c_str());
  };
  std::vector<float> buf(4096);
  SensitivityBlocksParams B;
  B.N = 3; B.d = 2; B.n = 2; B.x = buf.data(); B.p = buf.data(); B.out = buf.data() + 1024;
  B.in_dtype = DType::kFloat32; B.acc_dtype = DType::kFloat32;
  expect("sensitivity_blocks_mma_cuda: in_dtype must be bfloat16 and acc_dtype float32, got float32 and float32",
         [&] { sensitivity_blocks_mma_cuda(B); });
  B.in_dtype = DType::kBFloat16;
  emu::cc_major = 7;
  expect("needs a GPU of compute capability >= 8.0 (sm_80+), got sm_7x", [&] { sensitivity_blocks_mma_cuda(B); });
  emu::cc_major = 9;
  B.out = nullptr;
  expect("sensitivity_blocks_mma_cuda: x, p and out must be non-null", [&] { sensitivity_blocks_mma_cuda(B); });
  PairProductsParams Z;
  Z.N = 3; Z.d = 2; Z.x = buf.data(); Z.z = buf.data() + 1024; Z.i0 = 1; Z.i1 = 4;
  expect("sensitivity_pair_products_cuda: triangle rows must satisfy 0 <= i0 <= i1 <= m = 3, got i0 = 1, i1 = 4",
         [&] { sensitivity_pair_products_cuda(Z); });
  Z.i1 = 2; Z.in_dtype = DType::kFloat32;
  expect("sensitivity_pair_products_cuda: in_dtype must be bfloat16, got float32", [&] { sensitivity_pair_products_cuda(Z); });
  Z.in_dtype = DType::kBFloat16;
  expect("pairs: z must span at least 12 bytes", [&] { check_pair_products_params("pairs", Z, 1 << 20, 10); });
  expect("pairs: in_dtype must be bfloat16 and acc_dtype float32 (tensor-core route), got float32 and float32",
         [&] { SensitivityBlocksParams Q; Q.N = 1; check_blocks_mma_params("pairs", Q, 0, 0, 0); });
}

int main(int argc, char** argv) {
  emu::order_mode = argc > 1 ? std::atoi(argv[1]) : 0;
  if (argc > 2 && std::string(argv[2]) == "tc") {  // only the tensor-core routes (quick iteration)
    test_tensor_core_routes();
    std::printf("%s: %d failures\n", failures ? "FAILED" : "OK", failures);
    return failures ? 1 : 0;
  }
  const DType dts[3] = {DType::kFloat32, DType::kFloat64, DType::kBFloat16};
  struct Shape { int64_t batch, N, d, n; bool bias; };
  const Shape shapes[] = {
      {1, 1, 0, 1, true},   {1, 5, 1, 1, false}, {2, 37, 4, 3, true},  {1, 20, 15, 17, true},
      {3, 17, 16, 5, true}, {1, 33, 20, 9, false}, {2, 19, 32, 4, true}, {1, 40, 64, 5, true},
      {1, 16, 63, 2, true}, {1, 23, 70, 6, false}, {2, 9, 130, 5, true}, {1, 0, 10, 3, true},
      {1, 4, 5, 0, true},
  };
  for (const Shape& s : shapes)
    for (DType t : dts)
      for (int integer = 0; integer < 2; ++integer) {
        test_blocks(t, s.batch, s.N, s.d, s.n, s.bias, integer);
      }
  std::printf("blocks done (%d failures)\n", failures);
  const Shape mshapes[] = {
      {1, 1, 0, 1, true}, {1, 5, 1, 1, false}, {2, 37, 4, 3, true}, {1, 70, 15, 67, true},
      {2, 130, 70, 5, true}, {1, 20, 63, 65, false}, {1, 0, 5, 3, true}, {1, 4, 5, 0, true},
      {1, 2049, 3, 2, true}, {2, 5000, 7, 3, false}, {1, 3100, 65, 1, true},  // split second GEMM
  };
  for (const Shape& s : mshapes)
    for (DType t : dts)
      for (int integer = 0; integer < 2; ++integer) test_matvec(t, s.batch, s.N, s.d, s.n, s.bias, integer);
  std::printf("matvec done (%d failures)\n", failures);
  test_tensor_core_routes();
  test_lanczos_dense<double>(3, 12, 3, 12, 0);
  test_lanczos_dense<float>(2, 12, 2, 12, 0);
  test_lanczos_dense<double>(2, 20, 3, 20, 1);
  test_lanczos_dense<double>(2, 9, 4, 9, 2);
  test_lanczos_dense<float>(1, 9, 4, 9, 2);
  test_lanczos_dense<double>(1, 1, 1, 1, 0);
  test_lanczos_dense<double>(2, 30, 2, 10, 0);  // capped steps
  test_lanczos_dense<double>(3, 16, 2, 16, 0, true);  // start vectors
  test_lanczos_dense<float>(3, 16, 1, 16, 1, true);
  std::printf("lanczos dense done (%d failures)\n", failures);
  test_lanczos_mf<double>(DType::kFloat64, 2, 40, 6, 3, 2);
  test_lanczos_mf<float>(DType::kFloat32, 1, 30, 5, 2, 1);
  test_lanczos_mf<float>(DType::kBFloat16, 1, 30, 5, 2, 1);
  test_lanczos_mf<double>(DType::kFloat64, 1, 2100, 4, 2, 2);  // split second GEMM
  std::printf("lanczos mf done (%d failures)\n", failures);
  test_conv();
  {  // validation
    LanczosParams P;
    P.num_problems = 0;
    P.m = 5; P.k = 1; P.max_steps = 3;
    bool threw = false;
    try { lanczos_topk_cuda(P); } catch (const std::exception& e) { threw = true; std::printf("B=0: %s\n", e.what()); }
    CHECK(!threw, "B=0 should be a no-op");
    std::vector<double> buf(1000);
    int32_t st[4];
    P.num_problems = 2; P.m = 0; P.k = 1; P.max_steps = 1; P.dtype = DType::kFloat64;
    std::vector<double> a(100);
    P.a = a.data(); P.workspace = buf.data(); P.values = buf.data(); P.vectors = buf.data(); P.ritz_residuals = buf.data(); P.steps = st;
    threw = false;
    try { lanczos_topk_cuda(P); } catch (const std::invalid_argument& e) { threw = true; std::printf("m=0: %s\n", e.what()); }
    CHECK(threw, "m=0 should throw invalid_argument");
    P.m = 3; P.dtype = DType::kBFloat16; threw = false;
    try { lanczos_topk_cuda(P); } catch (const std::invalid_argument& e) { threw = true; std::printf("bf16: %s\n", e.what()); }
    CHECK(threw, "bf16 lanczos should throw");
    SensitivityBlocksParams S; S.N = 3; S.d = 2; S.n = 2; S.in_dtype = DType::kFloat32; S.acc_dtype = DType::kFloat64;
    threw = false;
    try { sensitivity_blocks_cuda(S); } catch (const std::invalid_argument& e) { threw = true; std::printf("acc: %s\n", e.what()); }
    CHECK(threw, "f32->f64 acc should throw");
  }
  std::printf("%s: %d failures, %ld blocks, %ld barrier rounds\n", failures ? "FAILED" : "OK", failures,
              (long)emu::blocks_run, (long)emu::barrier_rounds);
  return failures ? 1 : 0;
}
