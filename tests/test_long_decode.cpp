// Long runs (issue 18, item 6): one sequence decoded token by token in step mode for N tokens
// (N = 10^3, 10^4, 10^5 here; MAMBA_LONG_DECODE_N=1000000 extends it, see scripts/long-decode.sh):
// every logit finite, the decode state after N steps equal to the state the chunked full forward
// leaves after the same N ids (within the step-vs-full tolerance), and resident memory flat after
// warm-up. Small models (Mamba-1 and Mamba-2 mixers) so that 10^5 steps take seconds.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <variant>

#include "mamba/lm.h"
#include "mamba/rng.h"
#include "test_util.h"

// MAMBA_TEST_ASAN: built with AddressSanitizer (gcc defines __SANITIZE_ADDRESS__; clang 14 only
// answers __has_feature(address_sanitizer)).
#if defined(__SANITIZE_ADDRESS__)
#define MAMBA_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MAMBA_TEST_ASAN 1
#endif
#endif

using namespace mamba;

namespace {

int64_t max_tokens() {
  const char* e = std::getenv("MAMBA_LONG_DECODE_N");
  return e ? std::max<int64_t>(1000, std::atoll(e)) : 100000;
}

// Every layer's conv and SSM state of a against b.
::testing::AssertionResult same_state(const LMState& a, const LMState& b, const std::string& what) {
  if (a.layers.size() != b.layers.size())
    return ::testing::AssertionFailure() << what << ": layers";
  for (size_t i = 0; i < a.layers.size(); ++i) {
    auto r = std::visit(
        [&](const auto& sa) -> ::testing::AssertionResult {
          using S = std::decay_t<decltype(sa)>;
          const S* sb = std::get_if<S>(&b.layers[i]);
          if (!sb) return ::testing::AssertionFailure() << what << ": state types differ";
          if constexpr (requires {
                          sa.ssm_state;
                          sa.conv_state;
                        }) {
            const std::string w = what + " layer " + std::to_string(i);
            auto c =
                test::close_report(sa.conv_state, sb->conv_state, tol::kStepVsFull, w + " conv");
            if (!c) return c;
            return test::close_report(sa.ssm_state, sb->ssm_state, tol::kStepVsFull, w + " ssm");
          } else {
            return ::testing::AssertionSuccess();
          }
        },
        a.layers[i]);
    if (!r) return r;
  }
  return ::testing::AssertionSuccess();
}

void run_long_decode(const std::string& ssm_cfg) {
  ModelConfig cfg = ModelConfig::parse(
      R"({"d_model":16,"n_layer":2,"vocab_size":11,"pad_vocab_size_multiple":4,"ssm_cfg":{)" +
      ssm_cfg + "}}");
  MambaLM lm(cfg, 3);
  const int64_t n_max = max_tokens();
  std::vector<int32_t> ids(static_cast<size_t>(n_max));
  Rng rng(11);
  for (auto& v : ids) v = static_cast<int32_t>(rng.below(11));
  LMState st = lm.new_state(1);
  const int64_t V = lm.vocab();
  // RSS is read after each checkpoint's full forward and again just before the next one: the
  // stretch between is pure decode, whose memory must not grow (the forwards themselves allocate
  // n x d_inner activations, which the allocator may keep).
  uint64_t rss_mark = 0;
  int64_t mark_n = 0;
  double max_growth = 0;  // bytes over one decode-only stretch
  auto is_checkpoint = [](int64_t n) {
    return n == 1000 || n == 10000 || n == 100000 || n == 1000000;
  };
  for (int64_t n = 1; n <= n_max; ++n) {
    Tensor logits = lm.step({ids[static_cast<size_t>(n - 1)]}, st);
    for (int64_t v = 0; v < V; ++v)
      ASSERT_TRUE(std::isfinite(logits.data()[v])) << "token " << n << ", logit " << v;
    if ((is_checkpoint(n + 1) || (n == n_max && !is_checkpoint(n))) && rss_mark > 0) {
      const double g = static_cast<double>(os::current_rss_bytes()) - static_cast<double>(rss_mark);
      max_growth = std::max(max_growth, g);
      std::printf("%s: RSS grew %.1f KiB over tokens %lld..%lld (decode only)\n", ssm_cfg.c_str(),
                  g / 1024.0, static_cast<long long>(mark_n), static_cast<long long>(n));
    }
    if (is_checkpoint(n)) {
      LMState full;
      lm.forward_last(std::span<const int32_t>(ids.data(), static_cast<size_t>(n)), 1, n, &full);
      ASSERT_TRUE(same_state(st, full, ssm_cfg + ", N = " + std::to_string(n)));
      rss_mark = os::current_rss_bytes(), mark_n = n;
    }
  }
#if !defined(MAMBA_TEST_ASAN)
  // (ASan's quarantine holds freed blocks, so RSS only means something in a normal build.)
  if (os::current_rss_bytes() > 0) {
    EXPECT_LT(max_growth, 512 * 1024.0) << "decode memory grows with the number of tokens";
  }
#endif
}

}  // namespace

TEST(LongDecode, Mamba1StepStateEqualsForwardStateOverALongDecode) {
  run_long_decode(R"("layer":"Mamba1","d_state":8,"d_conv":4,"expand":2)");
}

TEST(LongDecode, Mamba2StepStateEqualsForwardStateOverALongDecode) {
  run_long_decode(
      R"("layer":"Mamba2","d_state":8,"d_conv":4,"expand":2,"headdim":8,"chunk_size":64)");
}
