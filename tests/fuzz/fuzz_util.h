// Shared by the libFuzzer targets (tests/fuzz/fuzz_*.cpp, built with MAMBA_FUZZ=ON; each target
// defines fuzz_one and includes this header once). A parser may refuse any input, but only with a
// mamba::Error: every other exception (std::bad_alloc, std::length_error, nlohmann's) escapes and
// libFuzzer reports it as a crash, as it does ASan/UBSan findings, leaks, timeouts and
// allocations over -malloc_limit_mb.
#pragma once
#include <cstddef>
#include <cstdint>

#include "mamba/error.h"

namespace mamba_fuzz {
void fuzz_one(const uint8_t* data, size_t size);
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    mamba_fuzz::fuzz_one(data, size);
  } catch (const mamba::Error&) {
    // refused with the library's error: the expected outcome for a hostile file
  }
  return 0;
}
