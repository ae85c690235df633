#!/usr/bin/env bash
# One-shot check on a GPU machine without internet access, sized for a 10-minute session. Run from
# the repository root:
#
#     bash scripts/gpu_check.sh            # logs under runs/gpu_check/ (or under $OUT if set)
#
# Steps, in priority order (each later step only starts while the time budget lasts, see BUDGET_S):
# 1. machine (nvidia-smi), nvcc, versions of torch / scikit-build-core / pybind11 / cmake / ninja;
# 2. build + install with the CUDA kernels for THIS GPU's architecture only (offline:
#    --no-build-isolation --no-deps; parallel build). A failing build stops the script;
# 3. python -m topoderiv (build info: must list the GPU);
# 4. pytest -m cuda with TOPODERIV_REQUIRE_CUDA=1: the CUDA tests must run (a build without CUDA
#    kernels or an invisible GPU is an error, never a run of skipped tests), and at least one must pass;
# 5. benchmarks/bench_gpu.py: the issue-9 GPU targets (bf16 dense blocks per kernel vs the bf16
#    matmul rate at N=65536, d=n=512; lanczos_topk vs torch.linalg.eigh on 512 x 257x257);
# 6. compute-sanitizer (memcheck, then racecheck + synccheck for the shared-memory kernels) on a
#    small run of every CUDA op, each tensor-core route forced once;
# 7. the other benchmarks that accept --device cuda and --quick, quick, while time is left.
# Failing tests, sanitizer errors or benchmarks are recorded and the remaining steps still run; the
# exit status is non-zero if anything failed (steps skipped for time are listed, not failures).
#
# Environment: PYTHON (default: python3, or python), OUT (log folder), TOPODERIV_CUDA_ARCHITECTURES
# (default: the visible GPU's, e.g. 90), PYTEST_ARGS (extra pytest arguments), BENCH_ARGS (extra
# arguments of bench_gpu.py), BUDGET_S (seconds for the whole script, default 570).
set -euo pipefail

ROOT="$(pwd)"
if [[ ! -f "$ROOT/pyproject.toml" || ! -d "$ROOT/topoderiv" ]]; then
  echo "gpu_check.sh: run me from the repository root (no pyproject.toml / topoderiv/ in $ROOT)" >&2
  exit 2
fi

PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [[ -z "$PYTHON" ]]; then
  echo "gpu_check.sh: no python3/python on PATH (set PYTHON)" >&2
  exit 2
fi
LOG_DIR="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$LOG_DIR"
export PYTHONSAFEPATH=1  # never import the uncompiled source tree instead of the installed package
export PYTHONUNBUFFERED=1
START=$(date +%s)
BUDGET_S="${BUDGET_S:-570}"
FAILED=()
SKIPPED=()

section() { printf '\n==== %s (t=%ss) ====\n' "$*" "$(( $(date +%s) - START ))"; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run_step NAME LOGFILE LIMIT_S CMD...: runs CMD under `timeout LIMIT_S` (capped by the time left),
# tees its output to LOGFILE, records a failure; skipped when less than 20 s are left.
run_step() {
  local name="$1" log="$2" limit="$3"
  shift 3
  local rem
  rem=$(left)
  if (( rem < 20 )); then
    echo "---- skipped for time: $name"
    SKIPPED+=("$name")
    return 0
  fi
  (( limit > rem )) && limit=$rem
  section "$name (limit ${limit}s)"
  local rc=0
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$LOG_DIR/$log" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "!!!! $name failed (exit $rc$([[ $rc -eq 124 ]] && echo ', timed out')), log: $LOG_DIR/$log"
    FAILED+=("$name (exit $rc)")
  fi
  return 0
}

# ---- 1. environment -------------------------------------------------------------------------------
{
  section "machine"
  date -u
  uname -a
  (nvidia-smi || echo "nvidia-smi not available")
  section "nvcc"
  (nvcc --version || echo "nvcc not on PATH")
  section "python packages"
  echo "python: $PYTHON"
  "$PYTHON" - <<'EOF' || echo "(version report failed)"
import sys
from importlib import metadata
print("python", sys.version.replace("\n", " "))
for dist in ("torch", "scikit-build-core", "pybind11", "cmake", "ninja", "numpy", "pytest", "pip"):
    try:
        print(f"{dist:18s} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        print(f"{dist:18s} (not installed)")
try:
    import torch
    print("torch.version.cuda", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
except Exception as exc:  # report, do not stop
    print("torch import failed:", exc)
EOF
  section "cmake / ninja binaries"
  (cmake --version | head -n 1 || echo "cmake binary not on PATH")
  (ninja --version || echo "ninja binary not on PATH")
} 2>&1 | tee "$LOG_DIR/env.log"

# ---- 2. build + install (fatal on failure) --------------------------------------------------------
if [[ -z "${TOPODERIV_CUDA_ARCHITECTURES:-}" ]]; then
  TOPODERIV_CUDA_ARCHITECTURES="$("$PYTHON" -c 'import torch; M, m = torch.cuda.get_device_capability(0); print(f"{M}{m}")' 2>/dev/null || echo 90)"
fi
export TOPODERIV_CUDA=ON TOPODERIV_CUDA_ARCHITECTURES
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 8)}"
section "pip install (TOPODERIV_CUDA=ON, architectures $TOPODERIV_CUDA_ARCHITECTURES)"
start=$(date +%s)
if ! "$PYTHON" -m pip install --no-build-isolation --no-deps -v . 2>&1 | tee "$LOG_DIR/install.log"; then
  echo "!!!! build/install failed, log: $LOG_DIR/install.log" | tee "$LOG_DIR/summary.txt"
  exit 1
fi
echo "build + install took $(( $(date +%s) - start )) s"

# ---- 3. build info (run outside the source tree so the installed package is imported) ------------
run_step "python -m topoderiv" build_info.log 60 "$PYTHON" -m topoderiv

# ---- 4. CUDA tests: must run, not skip -------------------------------------------------------------
if command -v pytest >/dev/null 2>&1; then
  PYTEST=(pytest)
else
  PYTEST=("$PYTHON" -m pytest)  # PYTHONSAFEPATH=1 keeps the source tree off sys.path
fi
export TOPODERIV_REQUIRE_CUDA=1
# shellcheck disable=SC2086
run_step "pytest -m cuda" pytest_cuda.log 240 "${PYTEST[@]}" -m cuda -q -rs -p no:cacheprovider ${PYTEST_ARGS:-}
if [[ -f "$LOG_DIR/pytest_cuda.log" ]] && ! grep -Eq '[0-9]+ passed' "$LOG_DIR/pytest_cuda.log"; then
  echo "!!!! pytest -m cuda: no test passed"
  FAILED+=("pytest -m cuda: no test passed")
fi

# ---- 5. the issue-9 GPU benchmarks -----------------------------------------------------------------
# shellcheck disable=SC2086
run_step "bench_gpu.py" bench_gpu.log 150 "$PYTHON" benchmarks/bench_gpu.py --repeats 3 ${BENCH_ARGS:-}
run_step "bench_vit.py --device cuda" bench_vit.log 150 "$PYTHON" benchmarks/bench_vit.py --device cuda  # issue-10 ViT-S/B targets

# ---- 6. compute-sanitizer on a small run of every CUDA op --------------------------------------------
SANITIZER="$(command -v compute-sanitizer || true)"
for cand in "${CUDA_HOME:-}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
  [[ -z "$SANITIZER" && -x "$cand" ]] && SANITIZER="$cand"
done
cat > "$LOG_DIR/sanitize_smoke.py" <<'EOF'
# Every CUDA op once on small odd sizes, each bf16 dense kernel forced once (compute-sanitizer target).
import os
import torch
import topoderiv as td
from topoderiv import ops

g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.float64, torch.bfloat16):
    x = torch.randn(67, 70, generator=g).to(dtype).cuda()
    p = torch.randn(67, 5, generator=g).to(dtype).cuda()
    kernels = ("simt", "mma", "pairs") if dtype == torch.bfloat16 else ("auto",)
    for k in kernels:
        os.environ["TOPODERIV_DENSE_KERNEL"] = k
        td.sensitivity_blocks(x, p)
    os.environ.pop("TOPODERIV_DENSE_KERNEL")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    td.sensitivity_matvec(x, p, torch.randn(5, 71, generator=g).to(acc).cuda())
    td.sensitivity_topk(x, p, route="dense")
    td.sensitivity_topk(x, p, route="matfree")
    xc = torch.randn(2, 3, 5, 6, generator=g).to(dtype).cuda()
    pc = torch.randn(2, 4, 5, 6, generator=g).to(dtype).cuda()
    ops.conv_sensitivity_blocks(xc, pc, 3)
    ops.conv_sensitivity_matvec(xc, pc, torch.randn(4, 28, generator=g).to(acc).cuda(), 3)
    ops.conv_sensitivity_topk(xc, pc, 3, route="matfree")
a = torch.randn(3, 40, 40, generator=g)
td.lanczos_topk(((a + a.mT) / 2).cuda(), 2)
torch.cuda.synchronize()
print("sanitize smoke: all ops ran")
EOF
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # for the sanitizer: one cudaMalloc per tensor, so OOB shows
if [[ -z "$SANITIZER" ]]; then
  echo "!!!! compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
  FAILED+=("compute-sanitizer not found")
else
  run_step "compute-sanitizer memcheck" sanitizer_memcheck.log 120 \
    "$SANITIZER" --tool memcheck --error-exitcode 3 --target-processes all "$PYTHON" "$LOG_DIR/sanitize_smoke.py"
  for tool in racecheck synccheck; do
    run_step "compute-sanitizer $tool" "sanitizer_$tool.log" 90 \
      "$SANITIZER" --tool "$tool" --error-exitcode 3 "$PYTHON" "$LOG_DIR/sanitize_smoke.py"
  done
fi
unset PYTORCH_NO_CUDA_MEMORY_CACHING

# ---- 7. the other benchmarks, quick, while time is left ------------------------------------------------
for bench in benchmarks/bench_*.py; do
  name="$(basename "$bench" .py)"
  [[ "$name" == bench_gpu ]] && continue
  help="$("$PYTHON" "$bench" --help 2>/dev/null || true)"
  # GPU-capable benchmarks with a smoke size only (the full sizes do not fit the 10 minutes)
  grep -q -- "--device" <<<"$help" && grep -q -- "--quick" <<<"$help" || continue
  args=(--device cuda --quick)
  run_step "$name ${args[*]}" "$name.log" 120 "$PYTHON" "$bench" "${args[@]}"
done

# ---- summary -------------------------------------------------------------------------------------------
section "summary"
echo "logs: $LOG_DIR; total $(( $(date +%s) - START )) s"
if [[ ${#SKIPPED[@]} -gt 0 ]]; then
  printf 'skipped for time: %s\n' "${SKIPPED[@]}" | tee "$LOG_DIR/skipped.txt"
fi
if [[ ${#FAILED[@]} -gt 0 ]]; then
  printf 'FAILED: %s\n' "${FAILED[@]}" | tee "$LOG_DIR/summary.txt"
  exit 1
fi
echo "all steps passed" | tee "$LOG_DIR/summary.txt"
