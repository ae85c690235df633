// Fuzz of the span checks of topoderiv/validate.h and topoderiv/conv_sensitivity.h (what
// csrc/bindings.cpp runs before any kernel), built with AddressSanitizer + UBSan by
// run_emulated_tests.sh.
//
// Random params of the blocks, matvec and (dense and matrix-free) Lanczos kernels, and of the
// convolution blocks, matvec and matrix-free Lanczos (random geometry and strides), each buffer its
// own heap allocation of exactly the bytes claimed for it, then one mutation or none: a span short
// by a few bytes, a misaligned or null pointer, a negative size or stride, an unknown dtype code,
// sizes that overflow int64, an output overlapping an input, Lanczos arguments out of range, a
// size that grew after the buffers were allocated, or random strides. Properties:
//   - every call the checks accept runs the kernel (CPU, or CUDA through the emulator) without a
//     single out-of-bounds access: ASan aborts the run otherwise;
//   - every mutation that must be rejected is (std::invalid_argument), and valid params are not.
// Usage: fuzz_validate [iterations] [seed] [share of CUDA calls]   (exit status 1 on a failed property)
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "topoderiv/conv_sensitivity.h"
#include "topoderiv/lanczos.h"
#include "topoderiv/sensitivity.h"
#include "topoderiv/validate.h"

#include "test_check.h"

using namespace topoderiv;

namespace {

long accepted = 0, rejected = 0, ran = 0;

std::mt19937_64 rng;
int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
bool coin(double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; }

// One buffer: its own malloc of exactly `bytes` (+ the misalignment), so ASan's red zone starts at
// the first byte past what was claimed.
struct Buffer {
  std::unique_ptr<unsigned char, void (*)(void*)> mem{nullptr, std::free};
  unsigned char* ptr = nullptr;
  int64_t bytes = 0;
};

// Small integers in dtype t (valid floats of every dtype).
void fill(unsigned char* p, int64_t bytes, DType t) {
  const int64_t es = dtype_size(t);
  for (int64_t e = 0; e + es <= bytes; e += es) {
    const float v = static_cast<float>(rnd(-3, 3));
    if (t == DType::kFloat64) {
      const double dv = v;
      std::memcpy(p + e, &dv, 8);
    } else if (t == DType::kFloat32) {
      std::memcpy(p + e, &v, 4);
    } else {
      uint32_t u;
      std::memcpy(&u, &v, 4);
      const uint16_t b = static_cast<uint16_t>(u >> 16);  // exact for small integers
      std::memcpy(p + e, &b, 2);
    }
  }
}

Buffer make(int64_t bytes, DType t, int64_t misalign = 0) {
  Buffer b;
  b.bytes = bytes;
  b.mem.reset(static_cast<unsigned char*>(std::malloc(static_cast<size_t>(std::max<int64_t>(bytes + misalign, 1)))));
  if (!b.mem) throw std::bad_alloc();
  b.ptr = b.mem.get() + misalign;
  fill(b.ptr, bytes, t);
  return b;
}

DType in_dtype() { return static_cast<DType>(rnd(0, 2)); }
DType acc_for(DType in, bool cuda) {
  if (in == DType::kFloat64) return DType::kFloat64;
  return (!cuda && coin(0.3)) ? DType::kFloat64 : DType::kFloat32;
}

// Elements of a [batch, rows, cols] view (the same formula as validate.h, written again).
int64_t span(int64_t batch, int64_t rows, int64_t cols, int64_t rs, int64_t bs) {
  if (batch == 0 || rows == 0 || cols == 0) return 0;
  return (batch - 1) * bs + (rows - 1) * rs + cols;
}

// The mutations. kReject*: must be rejected whenever the mutated buffer is used at all.
enum Mut {
  kNone, kShort, kMisalign, kNull, kNegative, kDtype, kOverflow, kOverlap, kGrow, kStrides, kLanczosArg, kNumMut
};
const char* mut_name(int m) {
  static const char* names[] = {"none", "short", "misalign", "null", "negative", "dtype", "overflow",
                                "overlap", "grow", "strides", "lanczos-arg"};
  return names[m];
}

// A dtype mutation: an unknown input dtype code, or an accumulation dtype that is not float32 / float64.
void mutate_dtype(DType& in, DType& acc) {
  if (coin(0.5)) in = static_cast<DType>(coin(0.5) ? 3 : -1);
  else acc = coin(0.5) ? DType::kBFloat16 : static_cast<DType>(7);
}

// A span mutation (kShort, kMisalign or kNull) of buffer `target` (bytes[i] bytes of tes[i]-byte
// elements; 0: not accessed): its span 1 to 2 elements short, its pointer misaligned by 1 to
// tes - 1 bytes, or null. Returns whether one was applied (then the checks must reject the call);
// none is for another mutation, a target that is not accessed, or 1-byte elements to misalign.
bool mutate_span(int mut, int target, int64_t* bytes, const int64_t* tes, int64_t* misalign, bool* null) {
  if ((mut != kShort && mut != kMisalign && mut != kNull) || bytes[target] == 0) return false;
  if (mut == kShort) {
    bytes[target] -= rnd(1, std::min<int64_t>(bytes[target], 2 * tes[target]));
  } else if (mut == kMisalign) {
    if (tes[target] <= 1) return false;
    misalign[target] = rnd(1, tes[target] - 1);
  } else {
    null[target] = true;
  }
  return true;
}

// Runs check(), then (when accepted) the kernel. `must_reject` / `must_accept`: the expectation.
template <class Check, class Run>
void trial(const char* what, int mut, bool must_reject, bool must_accept, Check check, Run run) {
  bool ok = true;
  std::string msg;
  try {
    check();
  } catch (const std::invalid_argument& e) {
    ok = false;
    msg = e.what();
  }
  if (ok) {
    ++accepted;
    CHECK(!must_reject, "%s: mutation %s was accepted", what, mut_name(mut));
    if (must_reject) return;  // would be out of bounds: ASan would stop here
    try {
      run();
      ++ran;
    } catch (const std::exception& e) {  // the kernels' own checks (e.g. non-finite Lanczos input)
      (void)e;
    }
  } else {
    ++rejected;
    CHECK(!must_accept, "%s: valid params rejected: %s", what, msg.c_str());
    CHECK(msg.rfind("sensitivity_", 0) == 0 || msg.rfind("lanczos_", 0) == 0 || msg.rfind("conv_sensitivity_", 0) == 0,
           "%s: message does not name the op: %s", what, msg.c_str());
  }
}

// ------------------------------------------------------------------------------- blocks / matvec

template <class Params>
void random_data(Params& P, bool cuda) {
  P.batch = rnd(0, 2) == 0 ? rnd(0, 1) : rnd(1, 2);
  P.N = rnd(0, 3) == 0 ? rnd(0, 1) : rnd(1, 40);
  P.d = rnd(0, 9);
  P.n = rnd(0, 5);
  P.bias = coin(0.7) || P.d == 0;
  P.in_dtype = in_dtype();
  P.acc_dtype = acc_for(P.in_dtype, cuda);
  auto rstride = [](int64_t w) {
    const int64_t k = rnd(0, 5);
    return k == 0 ? 0 : k == 1 ? rnd(0, w) : w + rnd(0, 2);  // broadcast, overlapping rows, padded rows
  };
  P.x_rstride = rstride(P.d);
  P.p_rstride = rstride(P.n);
  P.x_bstride = coin(0.2) ? 0 : P.N * std::max<int64_t>(P.x_rstride, P.d) + rnd(0, 3);
  P.p_bstride = coin(0.2) ? 0 : P.N * std::max<int64_t>(P.p_rstride, P.n) + rnd(0, 3);
  P.num_threads = static_cast<int>(rnd(1, 3));
}

void fuzz_blocks_or_matvec(bool matvec, bool cuda, int64_t it) {
  SensitivityMatvecParams P;  // the blocks params are the same fields minus v / workspace
  random_data(P, cuda);
  int mut = coin(0.4) ? kNone : static_cast<int>(rnd(1, kLanczosArg - 1));
  const int64_t ies = dtype_size(P.in_dtype), aes = dtype_size(P.acc_dtype), m = P.m();
  const bool active = P.batch > 0 && P.n > 0 && (matvec || P.N > 0);
  const bool reads = active && P.N > 0;
  // the buffers' bytes: 0 x, 1 p, 2 out, 3 v, 4 workspace
  int64_t sizes[5] = {(reads && P.d > 0) ? span(P.batch, P.N, P.d, P.x_rstride, P.x_bstride) * ies : 0,
                      reads ? span(P.batch, P.N, P.n, P.p_rstride, P.p_bstride) * ies : 0,
                      active ? P.batch * P.n * m * (matvec ? 1 : m) * aes : 0,
                      (matvec && reads) ? P.batch * P.n * m * aes : 0,
                      (matvec && reads && cuda) ? P.batch * P.N * P.n * aes : 0};
  int64_t &xb = sizes[0], &pb = sizes[1], &ob = sizes[2], &vb = sizes[3], &wb = sizes[4];
  // which buffer a span mutation hits
  const int target = static_cast<int>(rnd(0, matvec ? (cuda ? 4 : 3) : 2));
  int64_t* bytes[5] = {&sizes[0], &sizes[1], &sizes[2], &sizes[3], &sizes[4]};
  const int64_t tes[5] = {ies, ies, aes, aes, aes};
  int64_t misalign[5] = {0, 0, 0, 0, 0};
  bool null[5] = {false, false, false, false, false};
  bool must_reject = mutate_span(mut, target, sizes, tes, misalign, null);
  DType t_of[5] = {P.in_dtype, P.in_dtype, P.acc_dtype, P.acc_dtype, P.acc_dtype};
  Buffer buf[5];
  for (int i = 0; i < 5; ++i) buf[i] = make(*bytes[i], t_of[i], misalign[i]);
  for (int i = 0; i < 5; ++i)
    if (null[i] || (*bytes[i] == 0 && coin(0.5))) buf[i].ptr = nullptr;  // unused buffers may be null
  // overlap: out inside x or p (or v), allocated large enough for both
  Buffer shared;
  if (mut == kOverlap && ob > 0 && (xb > 0 || pb > 0 || vb > 0)) {
    const int src = xb > 0 ? 0 : pb > 0 ? 1 : 3;
    const int64_t start = rnd(0, (*bytes[src] - 1) / 8) * 8;  // 8-aligned offset inside the input
    shared = make(start + std::max(*bytes[src] - start, ob) + 8, DType::kFloat64);
    buf[src].ptr = shared.ptr;
    buf[2].ptr = shared.ptr + start;
    must_reject = true;
  }
  P.x = buf[0].ptr;
  P.p = buf[1].ptr;
  P.out = buf[2].ptr;
  P.v = buf[3].ptr;
  P.workspace = buf[4].ptr;
  int64_t have[5];
  for (int i = 0; i < 5; ++i) have[i] = *bytes[i];
  if (mut == kOverlap && shared.ptr) {
    for (int i : {0, 1, 3})
      if (buf[i].ptr == shared.ptr) have[i] = shared.bytes;
    have[2] = shared.bytes - (buf[2].ptr - shared.ptr);
  }
  switch (mut) {
    case kNegative: {
      int64_t* f[] = {&P.batch, &P.N, &P.d, &P.n, &P.x_rstride, &P.x_bstride, &P.p_rstride, &P.p_bstride};
      *f[rnd(0, 7)] = -rnd(1, 3);
      must_reject = true;
      break;
    }
    case kDtype:
      mutate_dtype(P.in_dtype, P.acc_dtype);
      must_reject = true;
      break;
    case kOverflow:
      P.N = int64_t(1) << 62;
      P.x_rstride = P.p_rstride = int64_t(1) << 40;
      P.batch = std::max<int64_t>(P.batch, 1);
      P.n = std::max<int64_t>(P.n, 1);
      must_reject = true;
      break;
    case kGrow: {  // a size grew after the buffers were allocated: the spans no longer cover it
      if (reads && P.d > 0 && coin(0.5)) {
        P.d += 1;
        must_reject = span(P.batch, P.N, P.d, P.x_rstride, P.x_bstride) * ies > xb ||
                      P.batch * P.n * (P.m()) * (matvec ? 1 : P.m()) * aes > ob;
      } else if (active) {
        P.N += rnd(1, 3);
        must_reject = span(P.batch, P.N, P.n, P.p_rstride, P.p_bstride) * ies > pb ||
                      (P.d > 0 && span(P.batch, P.N, P.d, P.x_rstride, P.x_bstride) * ies > xb) ||
                      (matvec && cuda && P.batch * P.N * P.n * aes > wb);
      }
      break;
    }
    case kStrides:  // anything goes: the checks decide, ASan verifies
      P.x_rstride = rnd(0, 12);
      P.p_rstride = rnd(0, 12);
      P.x_bstride = rnd(0, 300);
      P.p_bstride = rnd(0, 300);
      break;
    default:
      break;
  }
  if (!cuda && P.in_dtype == DType::kFloat64 && P.acc_dtype == DType::kFloat32) must_reject = true;
  const bool must_accept = mut == kNone;
  char what[160];
  std::snprintf(what, sizeof what, "%s %s it=%ld batch=%ld N=%ld d=%ld n=%ld rs=%ld,%ld", matvec ? "matvec" : "blocks",
                cuda ? "cuda" : "cpu", (long)it, (long)P.batch, (long)P.N, (long)P.d, (long)P.n, (long)P.x_rstride,
                (long)P.p_rstride);
  if (matvec) {
    trial(what, mut, must_reject, must_accept,
          [&] { check_matvec_params("sensitivity_matvec", P, cuda, have[0], have[1], have[3], have[2], have[4]); },
          [&] {
            if (cuda) sensitivity_matvec_cuda(P);
            else sensitivity_matvec_cpu(P);
          });
  } else {
    SensitivityBlocksParams B;
    B.batch = P.batch; B.N = P.N; B.d = P.d; B.n = P.n; B.bias = P.bias;
    B.x = P.x; B.x_rstride = P.x_rstride; B.x_bstride = P.x_bstride;
    B.p = P.p; B.p_rstride = P.p_rstride; B.p_bstride = P.p_bstride;
    B.out = P.out; B.in_dtype = P.in_dtype; B.acc_dtype = P.acc_dtype; B.num_threads = P.num_threads;
    trial(what, mut, must_reject, must_accept,
          [&] { check_blocks_params("sensitivity_blocks", B, cuda, have[0], have[1], have[2]); },
          [&] {
            if (cuda) sensitivity_blocks_cuda(B);
            else sensitivity_blocks_cpu(B);
          });
  }
}

// ------------------------------------------------------------------------------- Lanczos

void fuzz_lanczos(bool cuda, int64_t it) {
  LanczosParams P;
  const bool mf = coin(0.4);
  P.dtype = coin(0.5) ? DType::kFloat64 : DType::kFloat32;
  const int64_t es = dtype_size(P.dtype);
  P.tol = coin(0.5) ? 1e-6 : 1e-3;
  P.seed = static_cast<uint64_t>(rnd(0, 1000));
  P.num_threads = static_cast<int>(rnd(1, 3));
  int64_t xb = 0, pb = 0, ab = 0;
  if (mf) {
    SensitivityMatvecParams& o = P.op;
    random_data(o, cuda);
    o.batch = rnd(1, 2);
    o.N = rnd(1, 30);
    o.acc_dtype = P.dtype;
    if (o.in_dtype == DType::kFloat64) o.in_dtype = P.dtype == DType::kFloat64 ? o.in_dtype : DType::kFloat32;
    if (cuda) o.in_dtype = P.dtype == DType::kFloat64 ? DType::kFloat64 : (coin(0.5) ? DType::kFloat32 : DType::kBFloat16);
    o.x_bstride = o.N * std::max<int64_t>(o.x_rstride, o.d) + rnd(0, 2);
    o.p_bstride = o.N * std::max<int64_t>(o.p_rstride, o.n) + rnd(0, 2);
    P.num_problems = o.batch * o.n;
    P.m = o.m();
    xb = o.d > 0 ? span(o.batch, o.N, o.d, o.x_rstride, o.x_bstride) * dtype_size(o.in_dtype) : 0;
    pb = span(o.batch, o.N, o.n, o.p_rstride, o.p_bstride) * dtype_size(o.in_dtype);
  } else {
    P.num_problems = rnd(0, 3);
    P.m = rnd(1, 8);
  }
  const int64_t B = P.num_problems, m = P.m;
  P.k = rnd(1, m);
  P.max_steps = rnd(P.k, m);
  P.norm_group = rnd(1, std::max<int64_t>(B, 1));
  const bool with_v0 = coin(0.3), with_true = !cuda && coin(0.7), with_anorm = coin(0.8);
  ab = mf ? 0 : B * m * m * es;
  // 0 a, 1 x, 2 p, 3 v0, 4 values, 5 vectors, 6 ritz, 7 steps, 8 anorm, 9 true_res, 10 workspace
  int64_t bytes[11] = {ab, xb, pb, with_v0 ? B * m * es : 0, B * P.k * es, B * m * P.k * es, B * P.k * es, B * 4,
                       with_anorm ? B * 8 : 0, with_true ? B * P.k * es : 0, 0};
  static const double placeholder = 0;
  P.a = mf ? nullptr : &placeholder;  // dense or matrix-free layout; the real pointer is set below
  bytes[10] = B > 0 ? lanczos_workspace_layout(P, cuda).total * es : 0;
  const int64_t tes[11] = {es, dtype_size(P.op.in_dtype), dtype_size(P.op.in_dtype), es, es, es, es, 4, 8, es, es};
  int mut = coin(0.4) ? kNone : static_cast<int>(rnd(1, kNumMut - 1));
  if (mut == kDtype || mut == kOverflow || mut == kGrow || mut == kStrides) mut = kLanczosArg;
  bool must_reject = false;
  int target = static_cast<int>(rnd(0, 10));
  int64_t misalign[11] = {};
  bool null[11] = {};
  if (mut == kShort || mut == kMisalign || mut == kNull) {
    must_reject = mutate_span(mut, target, bytes, tes, misalign, null);
    if (!must_reject) {
      mut = kNone;
    } else if (mut == kNull) {
      // a null v0 / anorm / true_residuals is "none", not an error
      must_reject = !(target == 3 || target == 8 || target == 9 || (target == 0 && mf));
      if (target == 0 && !mf) must_reject = true;  // a null a means matrix-free: op sizes mismatch
    }
  }
  const DType t_of[11] = {P.dtype, P.op.in_dtype, P.op.in_dtype, P.dtype, P.dtype, P.dtype,
                          P.dtype, DType::kFloat32, DType::kFloat64, P.dtype, P.dtype};
  Buffer buf[11];
  for (int i = 0; i < 11; ++i) buf[i] = make(bytes[i], t_of[i], misalign[i]);
  if (!mf && B > 0 && bytes[0] == B * m * m * es) {  // a symmetric (when a was not cut short)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < i; ++j) {
          unsigned char* base = buf[0].ptr + b * m * m * es;
          std::memcpy(base + (i * m + j) * es, base + (j * m + i) * es, static_cast<size_t>(es));
        }
  }
  for (int i = 0; i < 11; ++i)
    if (null[i] || bytes[i] == 0) buf[i].ptr = nullptr;
  Buffer shared;
  int64_t have[11];
  for (int i = 0; i < 11; ++i) have[i] = bytes[i];
  if (mut == kOverlap) {  // an output inside another buffer
    const int out_i = static_cast<int>(rnd(4, 10));
    int other = static_cast<int>(rnd(0, 10));
    if (other == out_i || bytes[other] == 0 || bytes[out_i] == 0) {
      mut = kNone;
    } else {
      const int64_t start = rnd(0, (bytes[other] - 1) / 8) * 8;
      shared = make(start + std::max(bytes[other] - start, bytes[out_i]) + 8, DType::kFloat64);
      std::memcpy(shared.ptr, buf[other].ptr, static_cast<size_t>(bytes[other]));
      buf[other].ptr = shared.ptr;
      buf[out_i].ptr = shared.ptr + start;
      have[other] = shared.bytes;
      have[out_i] = shared.bytes - start;
      must_reject = true;
    }
  }
  // a null a means matrix-free: a dense problem keeps a pointer even when B = 0 (unless mutated)
  P.a = mf ? nullptr : (buf[0].ptr != nullptr || null[0]) ? buf[0].ptr : static_cast<const void*>(&placeholder);
  P.op.x = buf[1].ptr;
  P.op.p = buf[2].ptr;
  P.v0 = buf[3].ptr;
  P.values = buf[4].ptr;
  P.vectors = buf[5].ptr;
  P.ritz_residuals = buf[6].ptr;
  P.steps = reinterpret_cast<int32_t*>(buf[7].ptr);
  P.anorm_host = reinterpret_cast<double*>(buf[8].ptr);
  P.true_residuals = buf[9].ptr;
  P.workspace = buf[10].ptr;
  if (B == 0) must_reject = must_reject && (mut == kLanczosArg);
  if (mut == kLanczosArg) {
    switch (rnd(0, 6)) {
      case 0: P.k = coin(0.5) ? 0 : m + 1; break;
      case 1: P.max_steps = coin(0.5) ? P.k - 1 : m + 1; break;
      case 2: P.tol = coin(0.5) ? 0.0 : (coin(0.5) ? NAN : INFINITY); break;
      case 3: P.norm_group = -rnd(0, 2); break;
      case 4: P.dtype = coin(0.5) ? DType::kBFloat16 : static_cast<DType>(5); break;
      case 5: P.num_problems = -1; break;
      default: P.m = 0; break;
    }
    must_reject = true;
  }
  LanczosSpans s;
  s.a = have[0]; s.x = have[1]; s.p = have[2]; s.v0 = have[3]; s.values = have[4]; s.vectors = have[5];
  s.ritz = have[6]; s.steps = have[7]; s.anorm = have[8]; s.true_residuals = have[9]; s.workspace = have[10];
  char what[160];
  std::snprintf(what, sizeof what, "lanczos %s %s it=%ld B=%ld m=%ld k=%ld steps=%ld target=%d", mf ? "mf" : "dense",
                cuda ? "cuda" : "cpu", (long)it, (long)B, (long)m, (long)P.k, (long)P.max_steps, target);
  trial(what, mut, must_reject, mut == kNone, [&] { check_lanczos_params("lanczos_topk", P, cuda, s); },
        [&] {
          if (cuda) lanczos_topk_cuda(P);
          else lanczos_topk_cpu(P);
        });
}

// ------------------------------------------------------------------------------- convolutions

// Elements of a batch of 4-D views (the same formula as conv_sensitivity.h, written again).
int64_t span4(int64_t batch, int64_t a, int64_t b, int64_t c, int64_t d, const Strides4& st) {
  if (batch == 0 || a == 0 || b == 0 || c == 0 || d == 0) return 0;
  return 1 + (batch - 1) * st.b + (a - 1) * st.n + (b - 1) * st.c + (c - 1) * st.h + (d - 1) * st.w;
}

// NCHW or channels-last with padding, arbitrary small strides (overlapping elements: x and p are
// only read), or broadcast (zero) strides.
Strides4 random_strides(int64_t a, int64_t b, int64_t c, int64_t d) {
  Strides4 st;
  switch (rnd(0, 3)) {
    case 0:
      st.w = 1; st.h = d + rnd(0, 2); st.c = c * st.h + rnd(0, 2); st.n = b * st.c + rnd(0, 3);
      break;
    case 1:
      st.c = 1; st.w = b + rnd(0, 2); st.h = d * st.w + rnd(0, 2); st.n = c * st.h + rnd(0, 3);
      break;
    case 2:
      st.n = rnd(0, 40); st.c = rnd(0, 20); st.h = rnd(0, 10); st.w = rnd(0, 4);
      break;
    default:
      st.w = coin(0.5) ? 0 : 1; st.h = coin(0.5) ? 0 : d; st.c = c * d; st.n = coin(0.5) ? 0 : b * c * d;
      break;
  }
  // the problems of a batch: a packed stack, a padded one, or any stride (0: one problem repeated)
  st.b = coin(0.5) ? a * st.n + rnd(0, 3) : rnd(0, 80);
  return st;
}

ConvGeometry random_geometry() {
  ConvGeometry g;
  g.batch = coin(0.6) ? 1 : rnd(0, 3);
  g.N = rnd(0, 4) == 0 ? rnd(0, 1) : rnd(1, 3);
  g.C = rnd(0, 4);
  g.H = rnd(0, 6) == 0 ? rnd(0, 1) : rnd(1, 7);
  g.W = rnd(0, 6) == 0 ? rnd(0, 1) : rnd(1, 7);
  g.n = rnd(0, 5);
  g.k = 2 * rnd(0, 2) + (coin(0.8) ? 1 : 2);  // mostly odd: 1, 3, 5; sometimes 2, 4, 6
  g.pad = coin(0.7) ? g.k / 2 : rnd(0, g.k);
  g.bias = coin(0.7) || g.C == 0;
  return g;
}

// 0 blocks, 1 matvec, 2 matrix-free Lanczos on the conv operator.
void fuzz_conv(int kind, bool cuda, int64_t it) {
  ConvSensitivityMatvecParams P;
  ConvGeometry& g = P.g;
  g = random_geometry();
  P.in_dtype = in_dtype();
  P.acc_dtype = acc_for(P.in_dtype, cuda);
  P.num_threads = static_cast<int>(rnd(1, 3));
  const int64_t Ho = std::max<int64_t>(g.Ho(), 0), Wo = std::max<int64_t>(g.Wo(), 0);
  P.xs = random_strides(g.N, g.C, g.H, g.W);
  P.ps = random_strides(g.N, g.n, Ho, Wo);
  const int64_t ies = dtype_size(P.in_dtype), aes = dtype_size(P.acc_dtype), m = g.m(), rows = g.rows();
  const bool lanczos = kind == 2;
  const int64_t nb = g.problems();  // blocks of all problems
  const bool active = nb > 0 && (kind == 1 || lanczos || rows > 0);
  const bool reads = active && rows > 0;
  // 0 x, 1 p, 2 out (values for the Lanczos), 3 v, 4 workspace, 5 vectors, 6 ritz, 7 steps
  int64_t bytes[8] = {};
  bytes[0] = (reads && g.d() > 0) ? span4(g.batch, g.N, g.C, g.H, g.W, P.xs) * ies : 0;
  bytes[1] = reads ? span4(g.batch, g.N, g.n, Ho, Wo, P.ps) * ies : 0;
  LanczosParams L;
  int64_t kk = 1;
  if (lanczos) {
    L.num_problems = nb;
    L.m = m;
    kk = rnd(1, m);
    L.k = kk;
    L.max_steps = rnd(kk, m);
    L.norm_group = coin(0.5) ? std::max<int64_t>(g.n, 1) : rnd(1, std::max<int64_t>(nb, 1));
    L.dtype = P.acc_dtype;
    L.tol = 1e-6;
    L.num_threads = P.num_threads;
    // cuda: the operator's y [batch, rows, n] after the driver's own layout
    const int64_t ws = nb > 0 ? lanczos_workspace_layout(L, false).total + (cuda ? g.batch * rows * g.n : 0) : 0;
    bytes[2] = nb * kk * aes;
    bytes[4] = ws * aes;
    bytes[5] = nb * m * kk * aes;
    bytes[6] = nb * kk * aes;
    bytes[7] = nb * 4;
  } else {
    bytes[2] = active ? nb * m * (kind == 1 ? 1 : m) * aes : 0;
    bytes[3] = (kind == 1 && reads) ? nb * m * aes : 0;
    bytes[4] = (kind == 1 && reads && cuda) ? g.batch * rows * g.n * aes : 0;
  }
  const int64_t tes[8] = {ies, ies, aes, aes, aes, aes, aes, 4};
  int mut = coin(0.4) ? kNone : static_cast<int>(rnd(1, kNumMut - 1));
  if (mut == kLanczosArg && !lanczos) mut = kNone;
  bool must_reject = false;
  const int target = static_cast<int>(rnd(0, 7));
  int64_t misalign[8] = {};
  bool null[8] = {};
  if (mut == kShort || mut == kMisalign || mut == kNull) {
    must_reject = mutate_span(mut, target, bytes, tes, misalign, null);
    if (!must_reject) mut = kNone;
  }
  const DType t_of[8] = {P.in_dtype, P.in_dtype, P.acc_dtype, P.acc_dtype, P.acc_dtype, P.acc_dtype, P.acc_dtype,
                         DType::kFloat32};
  Buffer buf[8];
  for (int i = 0; i < 8; ++i) buf[i] = make(bytes[i], t_of[i], misalign[i]);
  for (int i = 0; i < 8; ++i)
    if (null[i] || (bytes[i] == 0 && coin(0.5))) buf[i].ptr = nullptr;
  int64_t have[8];
  for (int i = 0; i < 8; ++i) have[i] = bytes[i];
  Buffer shared;
  if (mut == kOverlap && bytes[2] > 0 && (bytes[0] > 0 || bytes[1] > 0)) {  // out inside x or p
    const int src = bytes[0] > 0 ? 0 : 1;
    const int64_t start = rnd(0, (bytes[src] - 1) / 8) * 8;
    shared = make(start + std::max(bytes[src] - start, bytes[2]) + 8, DType::kFloat64);
    buf[src].ptr = shared.ptr;
    buf[2].ptr = shared.ptr + start;
    have[src] = shared.bytes;
    have[2] = shared.bytes - start;
    must_reject = true;
  }
  switch (mut) {
    case kNegative: {
      int64_t* f[] = {&g.N, &g.C, &g.H, &g.W, &g.n, &g.pad, &P.xs.n, &P.xs.c, &P.xs.h, &P.xs.w, &P.ps.n, &P.ps.w,
                      &g.batch, &P.xs.b, &P.ps.b};
      *f[rnd(0, 14)] = -rnd(1, 3);
      must_reject = true;
      break;
    }
    case kDtype:
      mutate_dtype(P.in_dtype, P.acc_dtype);
      must_reject = true;
      break;
    case kOverflow:
      if (coin(0.5)) {
        g.N = int64_t(1) << 62;
        g.H = g.W = std::max<int64_t>(g.H, 4) + g.k;
      } else {
        g.k = (int64_t(1) << 32) + 1;
        g.pad = int64_t(1) << 31;
      }
      g.n = std::max<int64_t>(g.n, 1);
      must_reject = true;
      break;
    case kGrow:  // a size grew after the buffers were allocated: the checks decide, ASan verifies
      switch (rnd(0, 2)) {
        case 0: g.C += 1; break;
        case 1: g.N += 1; break;
        default: g.batch += 1; break;
      }
      break;
    case kStrides:  // anything goes: the checks decide, ASan verifies
      P.xs = Strides4{rnd(0, 60), rnd(0, 30), rnd(0, 12), rnd(0, 4), rnd(0, 90)};
      P.ps = Strides4{rnd(0, 60), rnd(0, 30), rnd(0, 12), rnd(0, 4), rnd(0, 90)};
      break;
    case kLanczosArg:
      switch (rnd(0, 4)) {
        case 0: L.k = coin(0.5) ? 0 : m + 1; break;
        case 1: L.max_steps = coin(0.5) ? L.k - 1 : m + 1; break;
        case 2: L.tol = coin(0.5) ? 0.0 : NAN; break;
        case 3: L.norm_group = -rnd(0, 2); break;
        default: L.m = m + 1; break;
      }
      must_reject = true;
      break;
    default:
      break;
  }
  if (!cuda && P.in_dtype == DType::kFloat64 && P.acc_dtype == DType::kFloat32) must_reject = true;
  const bool must_accept = mut == kNone;
  P.x = buf[0].ptr;
  P.p = buf[1].ptr;
  char what[200];
  std::snprintf(what, sizeof what, "conv %s %s it=%ld batch=%ld N=%ld C=%ld H=%ld W=%ld n=%ld k=%ld pad=%ld",
                kind == 0 ? "blocks" : kind == 1 ? "matvec" : "lanczos", cuda ? "cuda" : "cpu", (long)it, (long)g.batch,
                (long)g.N,
                (long)g.C, (long)g.H, (long)g.W, (long)g.n, (long)g.k, (long)g.pad);
  if (kind == 0) {
    ConvSensitivityBlocksParams B;
    B.g = g; B.x = P.x; B.xs = P.xs; B.p = P.p; B.ps = P.ps; B.out = buf[2].ptr;
    B.in_dtype = P.in_dtype; B.acc_dtype = P.acc_dtype; B.num_threads = P.num_threads;
    trial(what, mut, must_reject, must_accept,
          [&] { check_conv_blocks_params("conv_sensitivity_blocks", B, cuda, have[0], have[1], have[2]); },
          [&] {
            if (cuda) conv_sensitivity_blocks_cuda(B);
            else conv_sensitivity_blocks_cpu(B);
          });
  } else if (kind == 1) {
    P.out = buf[2].ptr;
    P.v = buf[3].ptr;
    P.workspace = buf[4].ptr;
    trial(what, mut, must_reject, must_accept,
          [&] {
            check_conv_matvec_params("conv_sensitivity_matvec", P, cuda, have[0], have[1], have[3], have[2], have[4]);
          },
          [&] {
            if (cuda) conv_sensitivity_matvec_cuda(P);
            else conv_sensitivity_matvec_cpu(P);
          });
  } else {
    P.acc_dtype = mut == kDtype ? P.acc_dtype : L.dtype;
    L.dtype = P.acc_dtype == DType::kFloat64 || P.acc_dtype == DType::kFloat32 ? P.acc_dtype : L.dtype;
    L.values = buf[2].ptr;
    L.workspace = buf[4].ptr;
    L.vectors = buf[5].ptr;
    L.ritz_residuals = buf[6].ptr;
    L.steps = reinterpret_cast<int32_t*>(buf[7].ptr);
    LanczosSpans sp;
    sp.x = have[0]; sp.p = have[1]; sp.values = have[2]; sp.workspace = have[4]; sp.vectors = have[5];
    sp.ritz = have[6]; sp.steps = have[7];
    trial(what, mut, must_reject, must_accept,
          [&] { check_conv_lanczos_params("conv_sensitivity_lanczos", L, P, cuda, sp); },
          [&] {
            if (cuda) conv_lanczos_topk_cuda(L, P);
            else conv_lanczos_topk_cpu(L, P);
          });
  }
}

// The messages the Python bindings cannot reach (they always pass consistent dtypes and real
// pointers): each check named, with its expectation and what it got.
template <class F>
void expect_message(const char* what, const std::string& want, F f) {
  std::string got = "(nothing thrown)";
  try {
    f();
  } catch (const std::invalid_argument& e) {
    got = e.what();
  }
  CHECK(got.find(want) != std::string::npos, "%s: expected a message containing '%s', got '%s'", what, want.c_str(),
         got.c_str());
}

void messages() {
  float x[8] = {}, p[8] = {}, out[32] = {};
  SensitivityBlocksParams B;
  B.N = 2; B.d = 3; B.n = 1; B.x = x; B.x_rstride = 3; B.p = p; B.p_rstride = 1; B.out = out;
  B.in_dtype = DType::kBFloat16;
  B.acc_dtype = DType::kFloat64;
  expect_message("cuda acc", "sensitivity_blocks: acc_dtype must be float32 for bfloat16 inputs on CUDA, got float64",
                 [&] { check_blocks_params("sensitivity_blocks", B, true, 32, 32, 128); });
  B.in_dtype = static_cast<DType>(9);
  expect_message("unknown dtype", "sensitivity_blocks: in_dtype must be float32, float64 or bfloat16, got dtype code 9",
                 [&] { check_blocks_params("sensitivity_blocks", B, false, 32, 32, 128); });
  B.in_dtype = DType::kFloat32;
  B.acc_dtype = DType::kFloat32;
  B.x = reinterpret_cast<const void*>(~uintptr_t(0) & ~uintptr_t(63));  // 64 bytes below the top
  B.N = 100;                                                                // 1200 bytes of x
  expect_message("wrap", "sensitivity_blocks: x must not wrap the address space",
                 [&] { check_blocks_params("sensitivity_blocks", B, false, INT64_MAX, 32, 128); });
  B.x = x;
  B.N = INT64_MAX / 4;
  B.x_rstride = 3;
  B.d = 4;
  B.batch = 2;
  B.x_bstride = INT64_MAX - 8;
  expect_message("sum overflow", "sensitivity_blocks: sizes must fit in int64, got a sum",
                 [&] { check_blocks_params("sensitivity_blocks", B, false, 32, 32, 128); });
  LanczosParams L;
  L.num_problems = 2; L.m = 3; L.k = 1; L.max_steps = 3; L.dtype = DType::kFloat64;
  L.op.batch = 1; L.op.n = 2; L.op.d = 2; L.op.N = 4; L.op.acc_dtype = DType::kFloat32;
  expect_message("mf acc", "lanczos_topk: op.acc_dtype must equal the Lanczos dtype float64, got float32",
                 [&] { check_lanczos_params("lanczos_topk", L, false, LanczosSpans()); });
  L.dtype = DType::kFloat32;
  L.op.in_dtype = DType::kFloat64;
  expect_message("mf in f64", "lanczos_topk: acc_dtype must be float64 for float64 inputs, got float32",
                 [&] { check_lanczos_params("lanczos_topk", L, false, LanczosSpans()); });
  ConvSensitivityMatvecParams C;
  C.g.N = 1; C.g.C = 2; C.g.H = 3; C.g.W = 3; C.g.n = 2; C.g.k = 3; C.g.pad = 1;
  C.in_dtype = DType::kFloat32;
  C.acc_dtype = DType::kFloat32;
  LanczosParams CL;
  CL.num_problems = 2; CL.m = 19; CL.k = 1; CL.max_steps = 3; CL.dtype = DType::kFloat64;
  expect_message("conv mf acc", "conv_sensitivity_lanczos: op.acc_dtype must equal the Lanczos dtype float64, got "
                 "float32", [&] { check_conv_lanczos_params("conv_sensitivity_lanczos", CL, C, false, LanczosSpans()); });
  CL.dtype = DType::kFloat32;
  CL.num_problems = 3;
  expect_message("conv mf n", "conv_sensitivity_lanczos: the matrix-free operator must have batch n = num_problems = 3 "
                 "and m = 19, got batch n = 1 * 2 and m = 19",
                 [&] { check_conv_lanczos_params("conv_sensitivity_lanczos", CL, C, false, LanczosSpans()); });
  ConvSensitivityBlocksParams CB;
  CB.g = C.g;
  CB.in_dtype = DType::kFloat32;
  CB.acc_dtype = DType::kFloat64;
  expect_message("conv cuda acc", "conv_sensitivity_blocks: acc_dtype must be float32 for float32 inputs on CUDA, got "
                 "float64", [&] { check_conv_blocks_params("conv_sensitivity_blocks", CB, true, 0, 0, 0); });
  CB.in_dtype = static_cast<DType>(5);
  expect_message("conv dtype", "conv_sensitivity_blocks: in_dtype must be float32, float64 or bfloat16, got dtype code 5",
                 [&] { check_conv_blocks_params("conv_sensitivity_blocks", CB, false, 0, 0, 0); });
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t iters = argc > 1 ? std::atol(argv[1]) : 4000;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 20240531;
  const double cuda_share = argc > 3 ? std::atof(argv[3]) : 0.25;  // the emulated CUDA kernels are slower
  rng.seed(seed);
  messages();
  for (int64_t it = 0; it < iters; ++it) {
    const bool cuda = coin(cuda_share);
    switch (rnd(0, 5)) {
      case 0: fuzz_blocks_or_matvec(false, cuda, it); break;
      case 1: fuzz_blocks_or_matvec(true, cuda, it); break;
      case 2: fuzz_lanczos(cuda, it); break;
      default: fuzz_conv(static_cast<int>(rnd(0, 2)), cuda, it); break;
    }
  }
  std::printf("%s: validate.h fuzz, seed %llu, %ld calls: %ld accepted (%ld ran), %ld rejected, %d failures\n",
              failures ? "FAILED" : "OK", static_cast<unsigned long long>(seed), static_cast<long>(iters), accepted, ran,
              rejected, failures);
  return failures ? 1 : 0;
}
