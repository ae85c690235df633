// The one assertion of the emulator test programs (test_emulated.cpp, fuzz_validate.cpp): CHECK(cond,
// printf-style message) counts a failure and prints where and why when cond is false.
#pragma once
#include <cstdio>

inline int failures = 0;

#define CHECK(cond, ...)                               \
  do {                                                 \
    if (!(cond)) {                                     \
      ++failures;                                      \
      std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)
