// A consumer of the installed mamba.cpp: builds a tiny model through the public API, runs one
// forward pass and checks the result. Exits non-zero on any failure.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "mamba/config.h"
#include "mamba/error.h"
#include "mamba/lm.h"
#include "mamba/parallel.h"
#include "mamba/tensor.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

// The model API in one place (lm.h is the part most likely to change): a 2-layer Mamba-1 LM
// with vocabulary 11 (padded to 12), one forward pass over ids (1, L). Returns logits (1, L, 12).
mamba::Tensor tiny_model_logits(const std::vector<int32_t>& ids) {
  const mamba::ModelConfig cfg = mamba::ModelConfig::parse(
      R"({"d_model": 16, "n_layer": 2, "vocab_size": 11, "pad_vocab_size_multiple": 4,
          "ssm_cfg": {"layer": "Mamba1", "d_state": 4, "d_conv": 3, "expand": 2}})",
      "consumer config");
  mamba::MambaLM lm(cfg, /*seed=*/1);
  return lm.forward(ids, /*B=*/1, static_cast<int64_t>(ids.size()));
}

}  // namespace

int main() {
  try {
    const std::vector<int32_t> ids = {1, 5, 2, 9, 0, 10, 3};
    const mamba::Tensor logits = tiny_model_logits(ids);
    check(logits.shape() == mamba::Shape{1, 7, 12},
          "logits shape " + logits.shape_str() + " == (1,7,12)");
    bool finite = true, varies = false;
    for (int64_t i = 0; i < logits.numel(); ++i) {
      finite = finite && std::isfinite(logits[i]);
      varies = varies || logits[i] != logits[0];
    }
    check(finite, "logits finite");
    check(varies, "logits not constant");
    const mamba::Tensor again = tiny_model_logits(ids);
    bool same = again.numel() == logits.numel();
    for (int64_t i = 0; same && i < logits.numel(); ++i) same = again[i] == logits[i];
    check(same, "same seed, same logits (bitwise)");

    // The library's exception type crosses the library boundary and is caught here.
    bool threw = false;
    try {
      mamba::ModelConfig::parse(
          R"({"d_model": 16, "n_layer": 2, "vocab_size": 11, "no_such_key": 1})");
    } catch (const mamba::Error& e) {
      threw = std::string(e.what()).find("no_such_key") != std::string::npos;
    }
    check(threw, "unknown config key throws mamba::Error naming it");

    // parallel_for from a program compiled without OpenMP: every index visited exactly once.
    mamba::set_num_threads(2);
    std::vector<std::atomic<int>> seen(1000);
    mamba::parallel_for(1000, 7, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) seen[static_cast<size_t>(i)].fetch_add(1);
    });
    bool once = true;
    for (const auto& s : seen) once = once && s.load() == 1;
    check(once, "parallel_for covers [0, 1000) once with " + std::to_string(mamba::num_threads()) +
                    " threads");
  } catch (const std::exception& e) {
    std::printf("FAIL exception: %s\n", e.what());
    return 1;
  }
  std::printf("%s\n", failures == 0 ? "consumer: all checks passed" : "consumer: FAILED");
  return failures == 0 ? 0 : 1;
}
