// Sensitivity blocks of the paper's convolution block (METHOD.md section 7), without im2col.
//
//   B[r] = sum_{s, oh, ow} p[s, r, oh, ow] * pt pt^T ,   pt = [patch(s, oh, ow) ; 1] (bias) ,   m = C k k (+ 1)
//   patch(s, oh, ow)[(c, ky, kx)] = x[s, c, oh + ky - pad, ow + kx - pad]   (0 outside the image: zero padding)
//
// Stride 1, dilation 1, a square k x k kernel, padding `pad` on every side: p has the output's
// spatial size Ho = H + 2 pad - k + 1 (pad = k / 2 with an odd k: "same", Ho = H). The feature order
// (c, ky, kx) is Conv2d.weight.reshape(n, -1)'s (= torch.nn.functional.unfold's). The rows summed
// over are the output pixels (s, oh, ow) in row-major order: this is sensitivity.h's statistic with
// "rows = samples x pixels, features = patches", and B[r] is the Hessian block of output channel r.
//
// The im2col matrix is never stored. Every kernel reads the patches through PatchAddress, the one
// feature-addressing scheme of the CPU and CUDA twins (the CPU gathers a fixed chunk of rows into a
// per-thread buffer; the CUDA kernels stage tiles in shared memory through it): rows, tokens and
// patches differ only in how (row, feature) maps to an element of x. x and p may have any
// non-negative element strides (NCHW, channels-last, views): no layout copy is needed.
//
// A call carries a batch of `batch` independent problems of one geometry (several insertion points
// solved together): problem b reads x + b * xs.b and p + b * ps.b and owns out's [b] slice; the
// Lanczos problems are the blocks of all of them, index b * n + r.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "topoderiv/common.h"
#include "topoderiv/lanczos.h"
#include "topoderiv/validate.h"

namespace topoderiv {

// Shapes of one problem: x [N, C, H, W], p [N, n, Ho, Wo].
struct ConvGeometry {
  int64_t batch = 1;                   // independent problems of this geometry
  int64_t N = 0, C = 0, H = 0, W = 0;  // input
  int64_t n = 0;                       // output channels = blocks
  int64_t k = 1;                       // kernel size (square)
  int64_t pad = 0;                     // zero padding on every side
  bool bias = true;                    // append the constant feature 1
  TD_HOST_DEVICE int64_t Ho() const { return H + 2 * pad - k + 1; }
  TD_HOST_DEVICE int64_t Wo() const { return W + 2 * pad - k + 1; }
  TD_HOST_DEVICE int64_t d() const { return C * k * k; }
  TD_HOST_DEVICE int64_t m() const { return d() + (bias ? 1 : 0); }
  // output pixels of all samples (0 when the kernel does not fit the padded image)
  TD_HOST_DEVICE int64_t rows() const { return (Ho() > 0 && Wo() > 0) ? N * Ho() * Wo() : 0; }
  // blocks of all problems (the Lanczos problems)
  TD_HOST_DEVICE int64_t problems() const { return batch * n; }
};

// Element strides of a 4-D tensor [N, C, H, W] (any non-negative values), and b: the stride between
// the problems of a batch (unused when batch == 1).
struct Strides4 {
  int64_t n = 0, c = 0, h = 0, w = 0;
  int64_t b = 0;
};

// Row s = (img, oh, ow): the element offset of x[img, 0, oh - pad, ow - pad] (may be "negative":
// only combined with a feature inside the image) and the top-left input pixel (ih, iw).
struct PatchRow {
  int64_t base = 0, ih = 0, iw = 0;
};
// Feature i = (c, ky, kx): its offset from a row's base, and (ky, kx). kind 0: an x element, 1: the
// bias feature (value 1), 2: past m (value 0; tile padding).
struct PatchFeature {
  int64_t off = 0, ky = 0, kx = 0;
  int kind = 2;
};

// The feature-addressing scheme of the conv kernels: element (row s, feature i) of the patch matrix.
struct PatchAddress {
  int64_t C = 0, H = 0, W = 0, k = 1, pad = 0, Ho = 0, Wo = 0, d = 0;
  bool bias = true;
  Strides4 xs, ps;  // strides of x [N, C, H, W] and p [N, n, Ho, Wo]

  PatchAddress() = default;
  TD_HOST_DEVICE PatchAddress(const ConvGeometry& g, const Strides4& x_strides, const Strides4& p_strides)
      : C(g.C), H(g.H), W(g.W), k(g.k), pad(g.pad), Ho(g.Ho()), Wo(g.Wo()), d(g.d()), bias(g.bias),
        xs(x_strides), ps(p_strides) {}

  TD_HOST_DEVICE PatchRow row(int64_t s) const {
    const int64_t hw = Ho * Wo;
    const int64_t img = s / hw, rem = s - img * hw, oh = rem / Wo, ow = rem - oh * Wo;
    PatchRow r;
    r.ih = oh - pad;
    r.iw = ow - pad;
    r.base = img * xs.n + r.ih * xs.h + r.iw * xs.w;
    return r;
  }
  // Offset of p[img, 0, oh, ow] for row s (channel r at + r * ps.c).
  TD_HOST_DEVICE int64_t p_row(int64_t s) const {
    const int64_t hw = Ho * Wo;
    const int64_t img = s / hw, rem = s - img * hw, oh = rem / Wo, ow = rem - oh * Wo;
    return img * ps.n + oh * ps.h + ow * ps.w;
  }
  TD_HOST_DEVICE PatchFeature feature(int64_t i) const {
    PatchFeature f;
    if (i >= d) {
      f.kind = (i == d && bias) ? 1 : 2;
      return f;
    }
    const int64_t kk = k * k, c = i / kk, r = i - c * kk, ky = r / k, kx = r - ky * k;
    f.off = c * xs.c + ky * xs.h + kx * xs.w;
    f.ky = ky;
    f.kx = kx;
    f.kind = 0;
    return f;
  }
  // Whether (row, feature) reads an element of x (then at offset r.base + f.off); otherwise the
  // value is 1 for the bias feature and 0 for padding.
  TD_HOST_DEVICE bool inside(const PatchRow& r, const PatchFeature& f) const {
    return f.kind == 0 && static_cast<uint64_t>(r.ih + f.ky) < static_cast<uint64_t>(H) &&
           static_cast<uint64_t>(r.iw + f.kx) < static_cast<uint64_t>(W);
  }
};

// What the conv ops read, and how they run: the geometry, x and p with their strides, the dtypes.
struct ConvSensitivityInputs {
  ConvGeometry g;
  const void* x = nullptr;  // [N, C, H, W] in_dtype, strides xs
  Strides4 xs;
  const void* p = nullptr;  // [N, n, Ho, Wo] in_dtype, strides ps
  Strides4 ps;
  DType in_dtype = DType::kFloat32;
  DType acc_dtype = DType::kFloat32;
  int num_threads = 1;      // CPU worker threads
  void* stream = nullptr;   // CUDA: cudaStream_t
};

// out[r] += B[r] for r < n: upper triangle accumulated, lower triangle mirrored (exactly symmetric).
struct ConvSensitivityBlocksParams : ConvSensitivityInputs {
  void* out = nullptr;      // [batch, n, m, m] acc_dtype, contiguous; ACCUMULATED into
};

// out[r] = B[r] @ v[r] without forming B:  y[s, r] = pt_s . v_r ,  out[r] = sum_s p[s, r] y[s, r] pt_s.
struct ConvSensitivityMatvecParams : ConvSensitivityInputs {
  const void* v = nullptr;  // [batch, n, m] acc_dtype, contiguous
  void* out = nullptr;      // [batch, n, m] acc_dtype, contiguous; OVERWRITTEN
  void* workspace = nullptr;  // CUDA only: conv_matvec_workspace_elems(g) elements of acc_dtype
};

// Elements of acc_dtype the CUDA matvec needs as workspace: y [batch, rows, n] (the CPU path needs none).
inline int64_t conv_matvec_workspace_elems(const ConvGeometry& g) { return g.batch * g.rows() * g.n; }

void conv_sensitivity_blocks_cpu(const ConvSensitivityBlocksParams& params);
void conv_sensitivity_matvec_cpu(const ConvSensitivityMatvecParams& params);
// Matrix-free Lanczos (lanczos.h) on the blocks of `op` (num_problems = op.g.problems(), m = op.g.m()):
// params.external is set here; op.v / op.out / op.workspace are the backend's.
void conv_lanczos_topk_cpu(LanczosParams params, const ConvSensitivityMatvecParams& op);
#ifdef TOPODERIV_WITH_CUDA
void conv_sensitivity_blocks_cuda(const ConvSensitivityBlocksParams& params);
void conv_sensitivity_matvec_cuda(const ConvSensitivityMatvecParams& params);
void conv_lanczos_topk_cuda(LanczosParams params, const ConvSensitivityMatvecParams& op);
#endif

// ---------------------------------------------------------------------------------------------
// Span checks (the conv twin of validate.h; csrc/bindings.cpp runs them before any kernel).

namespace conv_validate_detail {
using namespace validate_detail;

// Elements spanned by a batch of 4-D views (0 when empty).
inline int64_t span4(const char* fn, int64_t batch, int64_t a, int64_t b, int64_t c, int64_t d, const Strides4& s) {
  if (batch == 0 || a == 0 || b == 0 || c == 0 || d == 0) return 0;
  int64_t e = 1;
  e = add(fn, e, mul(fn, batch - 1, s.b));
  e = add(fn, e, mul(fn, a - 1, s.n));
  e = add(fn, e, mul(fn, b - 1, s.c));
  e = add(fn, e, mul(fn, c - 1, s.h));
  e = add(fn, e, mul(fn, d - 1, s.w));
  return e;
}

inline void check_strides(const char* fn, const char* name, const Strides4& s) {
  const std::string nm(name);
  non_negative(fn, (nm + " stride 0").c_str(), s.n);
  non_negative(fn, (nm + " stride 1").c_str(), s.c);
  non_negative(fn, (nm + " stride 2").c_str(), s.h);
  non_negative(fn, (nm + " stride 3").c_str(), s.w);
  non_negative(fn, (nm + " batch stride").c_str(), s.b);
}

// Sizes, strides and dtypes shared by the conv params; the products the kernels form fit in int64.
template <class Params>
void check_conv_data(const char* fn, const Params& P, bool cuda) {
  const ConvGeometry& g = P.g;
  non_negative(fn, "batch", g.batch);
  non_negative(fn, "N", g.N);
  non_negative(fn, "C", g.C);
  non_negative(fn, "H", g.H);
  non_negative(fn, "W", g.W);
  non_negative(fn, "n", g.n);
  if (g.k < 1) fail(fn, "kernel_size must be >= 1, got " + str(g.k));
  non_negative(fn, "padding", g.pad);
  // every size the kernels derive (m, rows, the output) must fit in int64
  const int64_t hp = add(fn, g.H, mul(fn, 2, g.pad)), wp = add(fn, g.W, mul(fn, 2, g.pad));
  const int64_t d = mul(fn, g.C, mul(fn, g.k, g.k));
  if (add(fn, d, g.bias ? 1 : 0) < 1) fail(fn, "m = C k k + bias must be >= 1, got C = 0 without bias");
  if (hp >= g.k && wp >= g.k) mul(fn, g.batch, mul(fn, g.n + 1, mul(fn, mul(fn, g.N, hp - g.k + 1), wp - g.k + 1)));
  mul(fn, g.batch, mul(fn, g.n, mul(fn, d + 1, d + 1)));
  check_strides(fn, "x", P.xs);
  check_strides(fn, "p", P.ps);
  check_dtypes(fn, P.in_dtype, P.acc_dtype, cuda);
}

// x and p as the kernels read them (only when there are rows and blocks).
template <class Params>
void add_conv_data(Regions& R, const char* fn, const Params& P, int64_t x_bytes, int64_t p_bytes) {
  const ConvGeometry& g = P.g;
  const int64_t es = dtype_size(P.in_dtype);
  R.add("x", P.x, x_bytes, span4(fn, g.batch, g.N, g.C, g.H, g.W, P.xs), es, false);
  R.add("p", P.p, p_bytes, span4(fn, g.batch, g.N, g.n, g.Ho(), g.Wo(), P.ps), es, false);
}

}  // namespace conv_validate_detail

// out[b, r] += blocks: reads x, p; writes out [batch, n, m, m] when batch, rows, n > 0.
inline std::vector<Region> check_conv_blocks_params(const char* fn, const ConvSensitivityBlocksParams& P, bool cuda,
                                                    int64_t x_bytes, int64_t p_bytes, int64_t out_bytes) {
  using namespace conv_validate_detail;
  check_conv_data(fn, P, cuda);
  return blocks_regions(fn, P, P.g.rows() > 0 ? P.g.problems() : 0, P.g.m(), out_bytes,
                        [&](Regions& R) { add_conv_data(R, fn, P, x_bytes, p_bytes); });
}

// out[b, r] = B[b, r] v[b, r]: writes out [batch, n, m] when batch n > 0; reads x, p, v and (CUDA)
// writes the workspace [batch, rows, n] when there are rows too.
inline std::vector<Region> check_conv_matvec_params(const char* fn, const ConvSensitivityMatvecParams& P, bool cuda,
                                                    int64_t x_bytes, int64_t p_bytes, int64_t v_bytes,
                                                    int64_t out_bytes, int64_t ws_bytes) {
  using namespace conv_validate_detail;
  check_conv_data(fn, P, cuda);
  return matvec_regions(
      fn, P, cuda, P.g.problems(), P.g.m(), P.g.rows() > 0, v_bytes, out_bytes, ws_bytes,
      [&](Regions& R) { add_conv_data(R, fn, P, x_bytes, p_bytes); },
      [&] { return mul(fn, P.g.batch, mul(fn, P.g.rows(), P.g.n)); });
}

// Matrix-free Lanczos on the conv operator `op`: LanczosParams' own checks (check_lanczos_params,
// with the operator's CUDA workspace in the workspace size) plus the spans of x and p.
inline std::vector<Region> check_conv_lanczos_params(const char* fn, const LanczosParams& P,
                                                     const ConvSensitivityMatvecParams& op, bool cuda,
                                                     const LanczosSpans& s) {
  using namespace conv_validate_detail;
  check_conv_data(fn, op, cuda);
  if (op.acc_dtype != P.dtype)
    fail(fn, std::string("op.acc_dtype must equal the Lanczos dtype ") + dtype_str(P.dtype) + ", got " +
                 dtype_str(op.acc_dtype));
  if (op.g.problems() != P.num_problems || op.g.m() != P.m)
    fail(fn, "the matrix-free operator must have batch n = num_problems = " + str(P.num_problems) + " and m = " +
                 str(P.m) + ", got batch n = " + str(op.g.batch) + " * " + str(op.g.n) + " and m = " + str(op.g.m()));
  // check_lanczos_params covers k, steps, tol, norm group, dtype, every output and the workspace,
  // whose size includes the operator's CUDA workspace (y [rows, n]): told by a stand-in operator
  struct WorkspaceOf final : LanczosOperator {
    int64_t elems;
    explicit WorkspaceOf(int64_t e) : elems(e) {}
    void apply(const void*, void*, const uint8_t*, void*) const override {}
    int64_t workspace_elems(bool on_cuda) const override { return on_cuda ? elems : 0; }
  } sizes(mul(fn, op.g.batch, mul(fn, op.g.rows(), op.g.n)));  // = conv_matvec_workspace_elems(op.g), checked
  LanczosParams Q = P;
  Q.a = nullptr;
  Q.external = &sizes;
  std::vector<Region> base = check_lanczos_params(fn, Q, cuda, s);
  Regions R(fn);
  for (const Region& r : base) R.add(r.name, reinterpret_cast<const void*>(r.ptr), r.have, r.need / r.align,
                                     r.align, r.written, r.host);
  if (P.num_problems > 0 && op.g.rows() > 0) add_conv_data(R, fn, op, s.x, s.p);
  return R.finish();
}

}  // namespace topoderiv
