#!/usr/bin/env bash
# Builds the CUDA kernels (csrc/cuda/*.cu) with the host compiler against cuda_emulator.h and runs
# test_emulated.cpp: a way to exercise the kernels' indexing, bounds and barriers on a machine
# without a GPU. It is NOT a substitute for running them on a GPU (no warp-level behaviour, no
# memory-model effects, no performance). Needs g++ >= 10 (C++20) and OpenMP; not part of the build.
#
# Then fuzz_validate.cpp fuzzes the span checks of csrc/include/topoderiv/validate.h (what the
# Python bindings run before any kernel) against the CPU and emulated CUDA kernels, always under
# AddressSanitizer + UBSan: every accepted call must stay inside buffers of exactly the claimed size.
#
#   bash csrc/cuda/emulator/run_emulated_tests.sh            # fiber order: forward, reverse, shuffled
#   SANITIZE=1 bash csrc/cuda/emulator/run_emulated_tests.sh # + AddressSanitizer / UBSan for all
#   FUZZ_ITERS=20000 FUZZ_SEED=7 bash csrc/cuda/emulator/run_emulated_tests.sh   # a longer fuzz
#   BUILD=/tmp/emu bash ...; /tmp/emu/test_emulated 2 tc   # then: only the tensor-core route tests, order 2
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
BUILD="${BUILD:-$(mktemp -d)}"
EMU="$ROOT/csrc/cuda/emulator"
FL=(-std=c++20 -O1 -g -fopenmp -Wall -Wextra -Wno-unknown-pragmas -Wno-unused-parameter -Wno-psabi
    -I "$ROOT/csrc/include" -I "$ROOT/csrc" -DTOPODERIV_WITH_CUDA=1
    "-DTOPODERIV_CUDA_EMULATE=\"$EMU/cuda_emulator.h\"")
SAN=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
if [[ "${SANITIZE:-0}" == 1 ]]; then FL+=("${SAN[@]}"); fi
# the kernels (CUDA through the emulator), the CPU twins and the shared host driver (the Lanczos
# tests compare against the CPU backend); again with the sanitizers for the fuzz unless they are on
KERNELS=(cuda/sensitivity_cuda.cu cuda/sensitivity_tc_cuda.cu cuda/lanczos_cuda.cu cuda/conv_sensitivity_cuda.cu common/lanczos_driver.cpp
         common/tridiag.cpp cpu/lanczos_cpu.cpp cpu/sensitivity_cpu.cpp cpu/conv_sensitivity_cpu.cpp)
mkdir -p "$BUILD/main" "$BUILD/asan"
build() {  # build DIR FLAGS...: the kernels' objects
  local dir="$1"; shift
  for src in "${KERNELS[@]}"; do
    g++ "$@" -x c++ -c "$ROOT/csrc/$src" -o "$dir/$(basename "${src%.*}").o" &
  done
}
build "$BUILD/main" "${FL[@]}"
g++ "${FL[@]}" -c "$EMU/test_emulated.cpp" -o "$BUILD/main/test_emulated.o" &
if [[ "${SANITIZE:-0}" != 1 ]]; then build "$BUILD/asan" "${FL[@]}" "${SAN[@]}"; fi
wait
g++ "${FL[@]}" "$BUILD"/main/*.o -o "$BUILD/test_emulated"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_stack_use_after_return=0}"
for order in 0 1 2; do
  "$BUILD/test_emulated" "$order" | tail -n 1
done
FUZZ_OBJ="$BUILD/asan"
if [[ "${SANITIZE:-0}" == 1 ]]; then FUZZ_OBJ="$BUILD/main"; fi
g++ "${FL[@]}" "${SAN[@]}" "$EMU/fuzz_validate.cpp" $(ls "$FUZZ_OBJ"/*.o | grep -v test_emulated.o) -o "$BUILD/fuzz_validate"
"$BUILD/fuzz_validate" "${FUZZ_ITERS:-3000}" "${FUZZ_SEED:-20240531}" 2>&1 | grep -v "ASan doesn't fully support makecontext" | tail -n 60
