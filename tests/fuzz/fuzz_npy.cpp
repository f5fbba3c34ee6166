// libFuzzer target: a .npy file (magic, version, header dict, data) and its contents as a
// float tensor or int64 values; an accepted array re-encodes and parses back to itself.
#include <cstdlib>
#include <vector>

#include "fuzz_util.h"
#include "model/npy.h"

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  const auto a = mamba::parse_npy(std::vector<uint8_t>(data, data + size), "fuzz");
  if (a.dtype == "<f4") {
    (void)mamba::npy_to_tensor(a);
  } else {
    (void)mamba::npy_to_i64(a);
  }
  const auto b = mamba::parse_npy(mamba::encode_npy(a), "fuzz (re-encoded)");
  if (b.dtype != a.dtype || b.shape != a.shape || b.data != a.data) std::abort();
}
