#!/usr/bin/env bash
# One-shot check on a GPU machine without internet access. Run from the repository root:
#
#     bash scripts/gpu_check.sh            # logs under runs/gpu_check/ (or under $OUT if set)
#
# 1. prints the machine (nvidia-smi), nvcc and the versions of torch, scikit-build-core, pybind11,
#    cmake and ninja (the build files' minimum versions must not exceed them);
# 2. builds and installs topoderiv with the CUDA kernels (offline: --no-build-isolation --no-deps);
# 3. python -m topoderiv (build info);
# 4. pytest -m cuda -v;
# 5. every benchmarks/bench_*.py, with --device cuda where the script accepts it (bench_conv.py:
#    conv_sensitivity_blocks against torch's chunked unfold + matmul, target >= 3x on the GPU; the
#    matrix-free conv top-k against the dense route; the CNN scoring cost in epochs).
# A failing build stops the script. Failing tests or benchmarks are recorded and the remaining
# steps still run; the exit status is non-zero if anything failed.
#
# Environment: PYTHON (default: python3, or python), OUT (log folder), TOPODERIV_CUDA_ARCHITECTURES
# (default 90), PYTEST_ARGS (extra pytest arguments), BENCH_ARGS (extra benchmark arguments).
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
FAILED=()

section() { printf '\n==== %s ====\n' "$*"; }

# run_step NAME LOGFILE CMD...: runs CMD, tees its output to LOGFILE, records a failure.
run_step() {
  local name="$1" log="$2"
  shift 2
  section "$name"
  local rc=0
  "$@" 2>&1 | tee "$LOG_DIR/$log" || rc=$?
  if [[ $rc -ne 0 ]]; then
    echo "!!!! $name failed (exit $rc), log: $LOG_DIR/$log"
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
section "pip install (TOPODERIV_CUDA=ON)"
export TOPODERIV_CUDA=ON
export TOPODERIV_CUDA_ARCHITECTURES="${TOPODERIV_CUDA_ARCHITECTURES:-90}"
start=$(date +%s)
if ! "$PYTHON" -m pip install --no-build-isolation --no-deps -v . 2>&1 | tee "$LOG_DIR/install.log"; then
  echo "!!!! build/install failed, log: $LOG_DIR/install.log" | tee "$LOG_DIR/summary.txt"
  exit 1
fi
echo "build + install took $(( $(date +%s) - start )) s"

# ---- 3. build info (run outside the source tree so the installed package is imported) ------------
run_step "python -m topoderiv" build_info.log "$PYTHON" -m topoderiv

# ---- 4. CUDA tests ---------------------------------------------------------------------------------
if command -v pytest >/dev/null 2>&1; then
  PYTEST=(pytest)
else
  PYTEST=("$PYTHON" -m pytest)  # PYTHONSAFEPATH=1 keeps the source tree off sys.path
fi
# shellcheck disable=SC2086
run_step "pytest -m cuda" pytest_cuda.log "${PYTEST[@]}" -m cuda -v ${PYTEST_ARGS:-}

# ---- 5. benchmarks -----------------------------------------------------------------------------------
shopt -s nullglob
for bench in benchmarks/bench_*.py; do
  name="$(basename "$bench" .py)"
  args=()
  if "$PYTHON" "$bench" --help 2>/dev/null | grep -q -- "--device"; then
    args=(--device cuda)
  fi
  # shellcheck disable=SC2086
  run_step "$name ${args[*]:-}" "$name.log" "$PYTHON" "$bench" ${args[@]+"${args[@]}"} ${BENCH_ARGS:-}
done
shopt -u nullglob

# ---- summary -------------------------------------------------------------------------------------------
section "summary"
echo "logs: $LOG_DIR"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  printf 'FAILED: %s\n' "${FAILED[@]}" | tee "$LOG_DIR/summary.txt"
  exit 1
fi
echo "all steps passed" | tee "$LOG_DIR/summary.txt"
