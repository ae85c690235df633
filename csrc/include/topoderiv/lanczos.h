// Batched Lanczos for the k algebraically largest eigenpairs of many symmetric m x m operators.
//
// One host-side driver (csrc/common/lanczos_driver.cpp) runs all problems in lock step: seeded
// deterministic start vectors, full re-orthogonalisation (classical Gram-Schmidt, twice), a
// tridiagonal QL solve per problem per step (eigenvalues and the last row of the eigenvectors only,
// O(j^2)), and a Ritz-estimate stop |beta_j * s_{j,i}| <= tol * ||T_j||. Invariant subspaces
// (beta ~ 0) restart with a fresh random vector orthogonal to the basis, so multiplicities and
// rank-deficient operators are handled. A Krylov space that closes while it holds the caller's
// start vector v0 is never a stop (v0 may span an invariant subspace without the top
// eigenvalues, e.g. an eigenvector of a lower one): the problem restarts, and the random segment
// after it must converge its own top-k Ritz pairs as well. The device work (operator application, orthogonalisation,
// Ritz vectors) is behind LanczosBackend: a CPU and a CUDA implementation.
#pragma once
#include <cstdint>

#include "topoderiv/common.h"
#include "topoderiv/sensitivity.h"

namespace topoderiv {

// A matrix-free operator supplied by another op's core (the convolution blocks of
// conv_sensitivity.h), used instead of `op` when LanczosParams::external is set (and a == nullptr).
class LanczosOperator {
 public:
  virtual ~LanczosOperator() = default;
  // out[b] = A_b v[b] for every problem b with active[b] != 0 (host array [num_problems]; the
  // operator may skip the others, whose rows of out are then unspecified). v, out: [num_problems, m]
  // in the Lanczos dtype, backend memory (device memory on CUDA); v's rows of inactive problems are
  // zero. workspace: workspace_elems(cuda) elements of the Lanczos dtype (nullptr when 0).
  virtual void apply(const void* v, void* out, const uint8_t* active, void* workspace) const = 0;
  virtual int64_t workspace_elems(bool cuda) const = 0;
};

struct LanczosParams {
  int64_t num_problems = 0;  // B
  int64_t m = 0;             // operator size
  int64_t k = 1;             // eigenpairs wanted per problem, 1 <= k <= m
  int64_t max_steps = 0;     // Krylov dimension cap, k <= max_steps <= m
  double tol = 1e-6;         // relative Ritz-estimate tolerance
  // Problems [g * norm_group, (g + 1) * norm_group) share one norm for the stop test: the largest
  // ||T_j|| among them (the blocks of one block-diagonal operator Q, whose norm is that max).
  // 1 = every problem relative to its own norm.
  int64_t norm_group = 1;
  uint64_t seed = 0;
  // Problem b draws its seeded start vectors as problem b % seed_period (0: as problem b): a batch
  // of several operators of n problems each (several insertion points, seed_period = n) then starts
  // every point exactly as a call with that point alone would.
  int64_t seed_period = 0;
  // What the caller needs. 0 (kNeedAll): every problem to tolerance. 1 (kNeedTop): per norm group,
  // only the problem holding the largest eigenvalue: a problem stops early as soon as its upper
  // estimate theta_1 + |beta_j| (largest Ritz value plus the residual norm of the Lanczos relation,
  // after >= 2 steps, outside an invariant subspace, and once theta_1's own residual is within
  // min(sqrt(tol), 1e-2) of the norm, at least tol) is below the best lower bound of its group
  // (the largest Ritz value of any of its problems); its values are then lower bounds (Ritz
  // values) and its vectors unconverged.
  // An estimate, not a bound (no cheap bound is tight enough: the trace of the positive part is
  // 6-8x lambda_max on transformer blocks): a start nearly orthogonal to a block's top eigenvector
  // can still hide the winner, as it can make any Krylov solve at tol misconverge. early_host[b] (HOST memory, optional) is set to 1 for those.
  int need = 0;
  uint8_t* early_host = nullptr;  // [B] host, written by the driver; may be nullptr
  // Optional start vectors [B, m] (dtype, contiguous): problem b starts from v0[b] (normalised
  // here in dtype: pass rows of order-1 scale; topoderiv/ops.py normalises them in double)
  // instead of its seeded random vector; an all-zero row falls back to the random one. Only the
  // first start uses v0: restarts after an invariant subspace draw seeded random vectors.
  const void* v0 = nullptr;
  DType dtype = DType::kFloat32;  // operator / basis / output dtype: kFloat32 or kFloat64
  // Dense operator when a != nullptr: [B, m, m] contiguous, dtype, symmetric (only the upper
  // triangle is trusted by nothing: the full matrix is read).
  const void* a = nullptr;
  // Matrix-free operator when a == nullptr: the sensitivity blocks of (x, p); B = op.batch * op.n,
  // problem index = b * n + r. op.v / op.out / op.workspace are set by the backend.
  SensitivityMatvecParams op;
  // Matrix-free operator of another kind when a == nullptr and external != nullptr (then `op` is
  // not used). Not owned.
  const LanczosOperator* external = nullptr;
  // Outputs.
  void* values = nullptr;          // [B, k] dtype, descending
  void* vectors = nullptr;         // [B, m, k] dtype, unit columns
  void* ritz_residuals = nullptr;  // [B, k] dtype, Lanczos estimate of ||A y - theta y||
  int32_t* steps = nullptr;        // [B] Krylov dimension used (host memory for CPU, device for CUDA)
  double* anorm_host = nullptr;    // [B] HOST memory, always: the norm the stop test used, max |Ritz
                                   // value| ~ ||A||_2 (over the norm group), written by the driver
                                   // (not the backend); may be nullptr
  void* true_residuals = nullptr;  // [B, k] dtype, optional (CPU backend only): the explicit
                                   // ||A y - theta y||, dense: computed while the matrix is in
                                   // cache; matrix-free: from the stored A v_t (no extra pass)
  void* workspace = nullptr;       // lanczos_workspace_elems(*this) elements of dtype
  int num_threads = 1;
  void* stream = nullptr;
  bool matrix_free() const { return a == nullptr; }
};

// Workspace layout, in elements of params.dtype.
struct LanczosWorkspaceLayout {
  int64_t basis = 0;   // [max_steps + 1, B, m]: basis vector j of all problems is contiguous [B, m]
  int64_t w = 0;       // [B, m]
  int64_t s = 0;       // [B, max_steps, k] Ritz coefficients (device copy)
  int64_t coef = 0;    // [B, max_steps + 1] Gram-Schmidt coefficients
  int64_t scalars = 0; // [B, 4] alpha, beta, active flag, scratch
  int64_t matvec = 0;  // [op.batch, op.N, op.n] matrix-free CUDA workspace, or the external
                       // operator's (0 elements otherwise)
  int64_t total = 0;
};

inline LanczosWorkspaceLayout lanczos_workspace_layout(const LanczosParams& p, bool cuda) {
  LanczosWorkspaceLayout l;
  const int64_t B = p.num_problems;
  l.basis = 0;
  l.w = l.basis + (p.max_steps + 1) * B * p.m;
  l.s = l.w + B * p.m;
  l.coef = l.s + B * p.max_steps * p.k;
  l.scalars = l.coef + B * (p.max_steps + 1);
  l.matvec = l.scalars + B * 4;
  const int64_t mv = p.external != nullptr ? p.external->workspace_elems(cuda) : matvec_workspace_elems(p.op);
  l.total = l.matvec + ((cuda && p.matrix_free()) ? mv : 0);
  return l;
}

// Device-side primitives the driver needs. j is the index of the current basis vector.
class LanczosBackend {
 public:
  virtual ~LanczosBackend() = default;
  // Problems with active[b] == 0 are frozen: the backend may skip them.
  virtual void set_active(const uint8_t* active) = 0;
  // W = A V_j for active problems.
  virtual void apply(int64_t j) = 0;
  // For active problems: alpha[b] = <V_j, W>; W -= V_{0..j} (V_{0..j}^T W), twice;
  // beta[b] = ||W||; V_{j+1} = W / beta[b] when beta[b] > 0. alpha, beta: host arrays [B].
  virtual void orthonormalize(int64_t j, double* alpha, double* beta) = 0;
  // For problems with mask[b] != 0: V_{j+1} = seeded random vector (restart count tag[b]),
  // orthogonalised against V_0..V_j (twice) and normalised. j = -1 makes the start vectors.
  // Returns nothing; norms[b] (host) receives the norm before normalisation. For j = -1,
  // from_v0[b] (host) is set to 1 where the start was the caller's v0 row, 0 where it was the
  // seeded vector (no v0, or an all-zero row); from_v0 is not touched for j >= 0.
  virtual void restart(int64_t j, const uint8_t* mask, const int32_t* tag, double* norms, uint8_t* from_v0) = 0;
  // vectors[b] = V_b[:, :steps[b]] @ S_b[:steps[b], :k], S host [B, max_steps, k]; also writes
  // values, ritz_residuals (host [B, k]) and steps (host [B]) to the outputs.
  virtual void finish(const int32_t* steps, const double* S, const double* values,
                      const double* residuals) = 0;
};

// Runs the driver on a backend. Throws std::invalid_argument on bad parameters.
void lanczos_run(const LanczosParams& params, LanczosBackend& backend);

void lanczos_topk_cpu(const LanczosParams& params);
#ifdef TOPODERIV_WITH_CUDA
void lanczos_topk_cuda(const LanczosParams& params);
#endif

constexpr int kNeedAll = 0;
constexpr int kNeedTop = 1;

// Symmetric tridiagonal eigensolver (implicit QL, Wilkinson shifts), in double.
// d[0..n) diagonal (overwritten by eigenvalues, unsorted), e[0..n-1) off-diagonal (destroyed).
// If z != nullptr it is an n x n row-major matrix that is multiplied by the rotations (pass the
// identity to get eigenvectors as columns). If zrow != nullptr it is one row vector of length n
// updated the same way (pass e_{n-1} to get the last components of all eigenvectors in O(n^2)).
// Returns false if it did not converge in 60 sweeps per eigenvalue.
bool tridiag_ql(int64_t n, double* d, double* e, double* z, double* zrow);

}  // namespace topoderiv
