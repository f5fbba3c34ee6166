// libFuzzer target: a GGUF file (header, metadata, tensor infos, data), then every metadata value
// read through the typed getters and every tensor dequantised as the loader would.
#include <vector>

#include "fuzz_util.h"
#include "mamba/gguf.h"

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  auto f = mamba::GGUFFile::parse(std::vector<uint8_t>(data, data + size), "fuzz");
  for (const auto& key : f.keys()) {
    try {
      const auto& v = f.value(key);
      if (v.type == mamba::GGUFType::STRING)
        (void)f.get_string(key);
      else if (v.type == mamba::GGUFType::ARRAY)
        (void)v.array_size();
      else
        (void)f.get_float(key);
    } catch (const mamba::Error&) {
    }
  }
  for (const auto& name : f.names()) {
    try {
      (void)f.tensor(name);
    } catch (const mamba::Error&) {
      // an unsupported type is refused; the others are still read
    }
  }
}
