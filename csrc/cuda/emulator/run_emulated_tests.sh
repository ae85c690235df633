#!/usr/bin/env bash
# Builds the CUDA kernels (csrc/cuda/*.cu) with the host compiler against cuda_emulator.h and runs
# test_emulated.cpp: a way to exercise the kernels' indexing, bounds and barriers on a machine
# without a GPU. It is NOT a substitute for running them on a GPU (no warp-level behaviour, no
# memory-model effects, no performance). Needs g++ >= 10 (C++20) and OpenMP; not part of the build.
#
#   bash csrc/cuda/emulator/run_emulated_tests.sh            # fiber order: forward, reverse, shuffled
#   SANITIZE=1 bash csrc/cuda/emulator/run_emulated_tests.sh # + AddressSanitizer / UBSan
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../../.." && pwd)"
BUILD="${BUILD:-$(mktemp -d)}"
EMU="$ROOT/csrc/cuda/emulator"
FL=(-std=c++20 -O1 -g -fopenmp -Wall -Wextra -Wno-unknown-pragmas -Wno-unused-parameter -Wno-psabi
    -I "$ROOT/csrc/include" -I "$ROOT/csrc" -DTOPODERIV_WITH_CUDA=1
    "-DTOPODERIV_CUDA_EMULATE=\"$EMU/cuda_emulator.h\"")
if [[ "${SANITIZE:-0}" == 1 ]]; then FL+=(-fsanitize=address,undefined -fno-omit-frame-pointer); fi
g++ "${FL[@]}" -x c++ -c "$ROOT/csrc/cuda/sensitivity_cuda.cu" -o "$BUILD/sensitivity_cuda.o" &
g++ "${FL[@]}" -x c++ -c "$ROOT/csrc/cuda/lanczos_cuda.cu" -o "$BUILD/lanczos_cuda.o" &
g++ "${FL[@]}" -c "$EMU/test_emulated.cpp" -o "$BUILD/test_emulated.o" &
wait
# the CPU twins and the shared host driver (the Lanczos tests compare against the CPU backend)
for src in common/lanczos_driver.cpp common/tridiag.cpp cpu/lanczos_cpu.cpp cpu/sensitivity_cpu.cpp; do
  g++ "${FL[@]}" -c "$ROOT/csrc/$src" -o "$BUILD/$(basename "$src" .cpp).o" &
done
wait
g++ "${FL[@]}" "$BUILD"/*.o -o "$BUILD/test_emulated"
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_stack_use_after_return=0}"
for order in 0 1 2; do
  "$BUILD/test_emulated" "$order" | tail -n 1
done
