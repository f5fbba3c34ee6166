// libFuzzer target: config.json text (either key set) -> a validated ModelConfig; an accepted
// config is written back (both key sets) and must parse again to the same JSON.
#include <cstdlib>
#include <string>

#include "fuzz_util.h"
#include "mamba/config.h"

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto cfg = mamba::ModelConfig::parse(text, "fuzz");
  const std::string out = cfg.to_json();
  const auto again = mamba::ModelConfig::parse(out, "fuzz (written back)");
  if (again.to_json() != out) std::abort();  // to_json -> parse -> to_json must be stable
  try {
    (void)cfg.to_hf_json();
  } catch (const mamba::Error&) {
    // configs transformers cannot express are refused by name
  }
}
