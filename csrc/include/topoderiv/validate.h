// Defensive checks of the params structs against the memory behind each pointer: the second line
// behind topoderiv/ops.py's validation. csrc/bindings.cpp calls them before any kernel runs.
//
// Every pointer comes with the number of bytes its caller vouches for from it (a tensor's span:
// from data_ptr to one past its last element). From the sizes, strides and dtypes the checks
// compute the bytes the kernels will touch (int64 overflow-checked) and reject: negative sizes or
// strides, unknown or unsupported dtypes, Lanczos arguments out of range, null or misaligned
// pointers, spans shorter than what the kernels touch, and any written buffer that overlaps
// another buffer. Every failure throws std::invalid_argument (a ValueError in Python) whose message
// names the function, the argument, the expectation and what was received. Accepted params never
// make a kernel touch memory outside the vouched spans: csrc/cuda/emulator/fuzz_validate.cpp
// checks that under AddressSanitizer. Torch-free and header-only.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "topoderiv/common.h"
#include "topoderiv/lanczos.h"
#include "topoderiv/sensitivity.h"

namespace topoderiv {

// A buffer the kernels will touch: need bytes from ptr, of which the caller vouched for have.
struct Region {
  const char* name = "";
  uintptr_t ptr = 0;
  int64_t have = 0;
  int64_t need = 0;
  int64_t align = 1;
  bool written = false;
  bool host = false;  // host memory even on CUDA (the Lanczos norms)
};

inline int64_t dtype_size(DType t) {
  switch (t) {
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
    case DType::kBFloat16: return 2;
  }
  return 0;
}

namespace validate_detail {

inline std::string str(int64_t v) { return std::to_string(v); }

inline bool known_dtype(DType t) {
  return t == DType::kFloat32 || t == DType::kFloat64 || t == DType::kBFloat16;
}

inline std::string dtype_str(DType t) {
  return known_dtype(t) ? std::string(dtype_name(t)) : "dtype code " + str(static_cast<int64_t>(t));
}

inline int64_t mul(const char* fn, int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_mul_overflow(a, b, &r)) fail(fn, "sizes must fit in int64, got a product " + str(a) + " x " + str(b));
  return r;
}

inline int64_t add(const char* fn, int64_t a, int64_t b) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) fail(fn, "sizes must fit in int64, got a sum " + str(a) + " + " + str(b));
  return r;
}

// Elements spanned by a [batch, rows, cols] view with unit column stride (0 when empty).
inline int64_t span_elems(const char* fn, int64_t batch, int64_t rows, int64_t cols, int64_t rstride,
                          int64_t bstride) {
  if (batch == 0 || rows == 0 || cols == 0) return 0;
  return add(fn, add(fn, mul(fn, batch - 1, bstride), mul(fn, rows - 1, rstride)), cols);
}

inline void non_negative(const char* fn, const char* name, int64_t v) {
  if (v < 0) fail(fn, std::string(name) + " must be >= 0, got " + str(v));
}

class Regions {
 public:
  explicit Regions(const char* fn) : fn_(fn) {}

  // A buffer of `elems` elements of `esize` bytes; nothing is checked when elems == 0 (untouched).
  void add(const char* name, const void* ptr, int64_t have, int64_t elems, int64_t esize, bool written,
           bool host = false) {
    if (elems == 0) return;
    Region r;
    r.name = name;
    r.ptr = reinterpret_cast<uintptr_t>(ptr);
    r.have = have;
    r.need = mul(fn_, elems, esize);
    r.align = esize;
    r.written = written;
    r.host = host;
    if (r.ptr == 0) fail(fn_, std::string(name) + " must be a non-null pointer (" + str(r.need) + " bytes are accessed), got null");
    if (r.ptr % static_cast<uintptr_t>(esize) != 0)
      fail(fn_, std::string(name) + " must be aligned to its element size (" + str(esize) + " bytes), got address " +
                    str(static_cast<int64_t>(r.ptr)));
    if (have < r.need)
      fail(fn_, std::string(name) + " must span at least " + str(r.need) +
                    " bytes (what the kernels access given its sizes, strides and dtype), got " + str(have));
    if (r.ptr + static_cast<uintptr_t>(r.need) < r.ptr) fail(fn_, std::string(name) + " must not wrap the address space");
    regions_.push_back(r);
  }

  // Written buffers must not overlap any other buffer (read or written).
  std::vector<Region> finish() const {
    for (size_t i = 0; i < regions_.size(); ++i)
      for (size_t j = 0; j < regions_.size(); ++j) {
        if (i == j || !regions_[i].written || (regions_[j].written && j < i)) continue;
        const Region& a = regions_[i];
        const Region& b = regions_[j];
        if (a.ptr < b.ptr + static_cast<uintptr_t>(b.need) && b.ptr < a.ptr + static_cast<uintptr_t>(a.need))
          fail(fn_, std::string(a.name) + " must not overlap " + b.name + " (" + a.name +
                        " is written while the kernels use " + b.name + "), got overlapping memory");
      }
    return regions_;
  }

 private:
  const char* fn_;
  std::vector<Region> regions_;
};

// in_dtype and acc_dtype of the data params (dense or conv), and with cuda the CUDA accumulation
// (float64 for float64 inputs, float32 otherwise).
inline void check_dtypes(const char* fn, DType in, DType acc, bool cuda) {
  if (!known_dtype(in)) fail(fn, "in_dtype must be float32, float64 or bfloat16, got " + dtype_str(in));
  if (acc != DType::kFloat32 && acc != DType::kFloat64)
    fail(fn, "acc_dtype must be float32 or float64, got " + dtype_str(acc));
  if (in == DType::kFloat64 && acc != DType::kFloat64)
    fail(fn, "acc_dtype must be float64 for float64 inputs, got " + dtype_str(acc));
  const DType want = in == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
  if (cuda && acc != want)
    fail(fn, std::string("acc_dtype must be ") + dtype_name(want) + " for " + dtype_name(in) +
                 " inputs on CUDA, got " + dtype_str(acc));
}

// Sizes, strides and dtypes shared by the blocks and the matvec params.
template <class Params>
void check_data_params(const char* fn, const Params& P, bool cuda) {
  non_negative(fn, "batch", P.batch);
  non_negative(fn, "N", P.N);
  non_negative(fn, "d", P.d);
  non_negative(fn, "n", P.n);
  if (P.m() < 1) fail(fn, "m = d + bias must be >= 1, got d = " + str(P.d) + " without bias");
  non_negative(fn, "x_rstride", P.x_rstride);
  non_negative(fn, "x_bstride", P.x_bstride);
  non_negative(fn, "p_rstride", P.p_rstride);
  non_negative(fn, "p_bstride", P.p_bstride);
  check_dtypes(fn, P.in_dtype, P.acc_dtype, cuda);
}

// x and p of a [batch, N, d] / [batch, N, n] pair as read by the kernels.
template <class Params>
void add_data(Regions& R, const char* fn, const Params& P, int64_t x_bytes, int64_t p_bytes) {
  const int64_t es = dtype_size(P.in_dtype);
  R.add("x", P.x, x_bytes, span_elems(fn, P.batch, P.N, P.d, P.x_rstride, P.x_bstride), es, false);
  R.add("p", P.p, p_bytes, span_elems(fn, P.batch, P.N, P.n, P.p_rstride, P.p_bstride), es, false);
}

// The buffers of a blocks call (dense or conv params): when it sums anything (problems > 0, 0 when
// there are no rows), the inputs (add_inputs(R)) and out [problems, m, m] (accumulated into).
template <class Params, class AddInputs>
std::vector<Region> blocks_regions(const char* fn, const Params& P, int64_t problems, int64_t m, int64_t out_bytes,
                                   AddInputs add_inputs) {
  Regions R(fn);
  if (problems > 0) {
    add_inputs(R);
    R.add("out", P.out, out_bytes, mul(fn, problems, mul(fn, m, m)), dtype_size(P.acc_dtype), true);
  }
  return R.finish();
}

// The buffers of a matvec call (dense or conv params): out [problems, m] (overwritten) when
// problems > 0; with rows too the inputs (add_inputs(R)), v [problems, m] and, on CUDA, the
// workspace of ws_elems() elements (written).
template <class Params, class AddInputs, class WsElems>
std::vector<Region> matvec_regions(const char* fn, const Params& P, bool cuda, int64_t problems, int64_t m, bool rows,
                                   int64_t v_bytes, int64_t out_bytes, int64_t ws_bytes, AddInputs add_inputs,
                                   WsElems ws_elems) {
  Regions R(fn);
  if (problems > 0) {
    const int64_t es = dtype_size(P.acc_dtype), pm = mul(fn, problems, m);
    R.add("out", P.out, out_bytes, pm, es, true);
    if (rows) {
      add_inputs(R);
      R.add("v", P.v, v_bytes, pm, es, false);
      if (cuda) R.add("workspace", P.workspace, ws_bytes, ws_elems(), es, true);
    }
  }
  return R.finish();
}

}  // namespace validate_detail

// out[b, r] += blocks of (x, p): reads x, p; writes out [batch, n, m, m] when batch, N, n > 0.
inline std::vector<Region> check_blocks_params(const char* fn, const SensitivityBlocksParams& P, bool cuda,
                                               int64_t x_bytes, int64_t p_bytes, int64_t out_bytes) {
  using namespace validate_detail;
  check_data_params(fn, P, cuda);
  return blocks_regions(fn, P, P.N > 0 ? mul(fn, P.batch, P.n) : 0, P.m(), out_bytes,
                        [&](Regions& R) { add_data(R, fn, P, x_bytes, p_bytes); });
}

// out[b, r] = B[b, r] v[b, r]: writes out [batch, n, m] when batch, n > 0; reads x, p, v and (CUDA)
// writes the workspace [batch, N, n] when N > 0 too.
inline std::vector<Region> check_matvec_params(const char* fn, const SensitivityMatvecParams& P, bool cuda,
                                               int64_t x_bytes, int64_t p_bytes, int64_t v_bytes,
                                               int64_t out_bytes, int64_t ws_bytes) {
  using namespace validate_detail;
  check_data_params(fn, P, cuda);
  return matvec_regions(
      fn, P, cuda, mul(fn, P.batch, P.n), P.m(), P.N > 0, v_bytes, out_bytes, ws_bytes,
      [&](Regions& R) { add_data(R, fn, P, x_bytes, p_bytes); },
      [&] { return mul(fn, mul(fn, P.batch, P.N), P.n); });
}

// lanczos_workspace_layout(P, cuda).total with every size checked (>= 0, no int64 overflow).
inline int64_t lanczos_workspace_elems_checked(const char* fn, const LanczosParams& P, bool cuda) {
  using namespace validate_detail;
  const int64_t B = P.num_problems, m = P.m, k = P.k, S = P.max_steps;
  non_negative(fn, "num_problems", B);
  non_negative(fn, "m", m);
  non_negative(fn, "k", k);
  non_negative(fn, "max_steps", S);
  int64_t ws = mul(fn, mul(fn, add(fn, S, 1), B), m);
  ws = add(fn, ws, mul(fn, B, m));
  ws = add(fn, ws, mul(fn, mul(fn, B, S), k));
  ws = add(fn, ws, mul(fn, B, add(fn, S, 1)));
  ws = add(fn, ws, mul(fn, B, 4));
  if (cuda && P.matrix_free() && P.external != nullptr) {
    const int64_t ext = P.external->workspace_elems(true);
    non_negative(fn, "the external operator's workspace", ext);
    ws = add(fn, ws, ext);
  } else if (cuda && P.matrix_free()) {
    non_negative(fn, "op.batch", P.op.batch);
    non_negative(fn, "op.N", P.op.N);
    non_negative(fn, "op.n", P.op.n);
    ws = add(fn, ws, mul(fn, mul(fn, P.op.batch, P.op.N), P.op.n));
  }
  return ws;
}

// Bytes the caller vouches for behind each pointer of LanczosParams (op.x / op.p: matrix-free).
struct LanczosSpans {
  int64_t a = 0, x = 0, p = 0, v0 = 0, values = 0, vectors = 0, ritz = 0, steps = 0, anorm = 0,
          true_residuals = 0, workspace = 0;
};

// Dense ([B, m, m] a) or matrix-free (op) Lanczos: the arguments lanczos_run would reject, plus the
// spans of every input, output and the workspace (lanczos_workspace_layout) when B > 0. With an
// external operator (params.external) the caller checks the operator and adds the spans it reads
// (conv_sensitivity.h: check_conv_lanczos_params).
inline std::vector<Region> check_lanczos_params(const char* fn, const LanczosParams& P, bool cuda,
                                                const LanczosSpans& s) {
  using namespace validate_detail;
  const int64_t B = P.num_problems, m = P.m, k = P.k, S = P.max_steps;
  non_negative(fn, "num_problems", B);
  if (m < 1) fail(fn, "m must be >= 1, got " + str(m));
  if (k < 1 || k > m) fail(fn, "k must be in [1, m = " + str(m) + "], got " + str(k));
  if (S < k || S > m) fail(fn, "max_steps must be in [k = " + str(k) + ", m = " + str(m) + "], got " + str(S));
  if (!(P.tol > 0.0) || !(P.tol <= 1.7976931348623157e308)) fail(fn, "tol must be a finite number > 0, got " + std::to_string(P.tol));
  if (P.norm_group < 1) fail(fn, "norm_group must be >= 1, got " + str(P.norm_group));
  if (P.dtype != DType::kFloat32 && P.dtype != DType::kFloat64)
    fail(fn, "dtype must be float32 or float64, got " + dtype_str(P.dtype));
  if (P.matrix_free() && P.external == nullptr) {
    const SensitivityMatvecParams& o = P.op;
    check_data_params(fn, o, cuda);
    if (o.acc_dtype != P.dtype)
      fail(fn, std::string("op.acc_dtype must equal the Lanczos dtype ") + dtype_name(P.dtype) + ", got " +
                   dtype_str(o.acc_dtype));
    if (mul(fn, o.batch, o.n) != B || o.m() != m)
      fail(fn, "the matrix-free operator must have op.batch * op.n = num_problems = " + str(B) + " and op.m = m = " +
                   str(m) + ", got " + str(o.batch) + " * " + str(o.n) + " and " + str(o.m()));
  }
  Regions R(fn);
  if (B > 0) {
    const int64_t es = dtype_size(P.dtype);
    const int64_t ws = lanczos_workspace_elems_checked(fn, P, cuda);
    if (P.matrix_free() && P.external == nullptr) {
      if (P.op.N > 0) add_data(R, fn, P.op, s.x, s.p);
    } else if (!P.matrix_free()) {
      R.add("a", P.a, s.a, mul(fn, B, mul(fn, m, m)), es, false);
    }  // an external operator: its caller adds the spans it reads
    if (P.v0 != nullptr) R.add("v0", P.v0, s.v0, mul(fn, B, m), es, false);
    R.add("values", P.values, s.values, mul(fn, B, k), es, true);
    R.add("vectors", P.vectors, s.vectors, mul(fn, mul(fn, B, m), k), es, true);
    R.add("ritz_residuals", P.ritz_residuals, s.ritz, mul(fn, B, k), es, true);
    R.add("steps", P.steps, s.steps, B, 4, true);
    if (P.anorm_host != nullptr) R.add("anorm", P.anorm_host, s.anorm, B, 8, true, /*host=*/true);
    if (P.true_residuals != nullptr) R.add("true_residuals", P.true_residuals, s.true_residuals, mul(fn, B, k), es, true);
    R.add("workspace", P.workspace, s.workspace, ws, es, true);
  }
  return R.finish();
}

}  // namespace topoderiv
