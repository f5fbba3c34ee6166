// libFuzzer target: a safetensors file (8-byte header length, JSON header, data), then every
// tensor converted as a loader would (float dtypes to fp32, integer ones to int64).
#include <vector>

#include "fuzz_util.h"
#include "mamba/safetensors.h"

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  auto f = mamba::SafetensorsFile::parse(std::vector<uint8_t>(data, data + size), "fuzz");
  for (const auto& name : f.names()) {
    const auto& info = f.info(name);
    try {
      if (info.dtype == "F32" || info.dtype == "F16" || info.dtype == "BF16") {
        (void)f.tensor(name, info.shape);
      } else {
        (void)f.tensor_i64(name);
      }
    } catch (const mamba::Error&) {
      // one tensor refused (e.g. an unsupported dtype); the others are still read
    }
  }
  for (const auto& kv : f.metadata()) (void)f.meta(kv.first);
}
