// Sampling: each filter keeps exactly the tokens it should, the seed makes runs repeatable,
// and empirical frequencies follow the softmax; bad options give clear errors.
#include <cmath>
#include <map>
#include <set>

#include "mamba/generate.h"
#include "test_util.h"

using namespace mamba;

namespace {
// Draws n tokens and returns how often each id came out.
std::map<int32_t, int> draw(const std::vector<float>& logits, const SamplingParams& p, int n,
                            const std::vector<int32_t>& history = {}, uint64_t seed = 1) {
  Rng rng(seed);
  std::map<int32_t, int> c;
  for (int i = 0; i < n; ++i)
    c[sample_token(logits.data(), (int64_t)logits.size(), p, rng, history)]++;
  return c;
}
std::set<int32_t> keys(const std::map<int32_t, int>& m) {
  std::set<int32_t> s;
  for (auto& [k, v] : m) s.insert(k);
  return s;
}
}  // namespace

TEST(Sampling, GreedyIsArgmax) {
  SamplingParams p;
  p.greedy = true;
  EXPECT_EQ(keys(draw({0.1f, 3.f, -1.f, 2.9f}, p, 20)), (std::set<int32_t>{1}));
}

TEST(Sampling, TopKTopPMinPKeepTheRightSets) {
  // probabilities at temperature 1: softmax of log([0.5, 0.3, 0.15, 0.05])
  std::vector<float> l = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  SamplingParams p;
  p.top_k = 2;
  EXPECT_EQ(keys(draw(l, p, 2000)), (std::set<int32_t>{0, 1}));
  p = {};
  p.top_p = 0.75f;  // 0.5 + 0.3 passes 0.75
  EXPECT_EQ(keys(draw(l, p, 2000)), (std::set<int32_t>{0, 1}));
  p.top_p = 0.85f;
  EXPECT_EQ(keys(draw(l, p, 2000)), (std::set<int32_t>{0, 1, 2}));
  p = {};
  p.min_p = 0.25f;  // keeps p >= 0.125: ids 0, 1, 2
  EXPECT_EQ(keys(draw(l, p, 2000)), (std::set<int32_t>{0, 1, 2}));
  p = {};
  EXPECT_EQ(keys(draw(l, p, 4000)), (std::set<int32_t>{0, 1, 2, 3}));
}

TEST(Sampling, FrequenciesFollowSoftmaxAndTemperature) {
  std::vector<float> l = {0.f, 1.f, 2.f};
  for (float T : {1.0f, 0.5f}) {
    SamplingParams p;
    p.temperature = T;
    const int n = 40000;
    auto c = draw(l, p, n);
    double z = 0;
    for (float v : l) z += std::exp(v / T);
    for (int i = 0; i < 3; ++i) {
      double expect = std::exp(l[i] / T) / z;
      // 5 standard deviations of a binomial proportion
      EXPECT_NEAR(c[i] / (double)n, expect, 5 * std::sqrt(expect * (1 - expect) / n))
          << "T=" << T << " id " << i;
    }
  }
}

TEST(Sampling, RepetitionPenaltyAndSeed) {
  SamplingParams p;
  p.greedy = true;
  p.repetition_penalty = 2.f;
  // id 0 has the top logit but was seen: 3/2 = 1.5 < 2
  EXPECT_EQ(keys(draw({3.f, 2.f, 1.f}, p, 5, {0})), (std::set<int32_t>{1}));
  // negative logits are multiplied: -1*2 = -2 < -1.5
  EXPECT_EQ(keys(draw({-1.f, -1.5f}, p, 5, {0})), (std::set<int32_t>{1}));
  SamplingParams s;
  std::vector<float> l(50, 0.f);
  EXPECT_EQ(draw(l, s, 100, {}, 7), draw(l, s, 100, {}, 7));
  EXPECT_NE(draw(l, s, 100, {}, 7), draw(l, s, 100, {}, 8));
}

TEST(Sampling, BadOptionsAreRejected) {
  SamplingParams p;
  p.temperature = 0;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.top_p = 1.5f;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  p.top_k = -1;
  EXPECT_THROW(p.validate(), Error);
  p = {};
  Rng rng(0);
  std::vector<float> nan = {0.f, NAN};
  EXPECT_THROW(sample_token(nan.data(), 2, p, rng, {}), Error);
}

TEST(Generate, StopsAtEosAndBatchesPromptsOfDifferentLengths) {
  MambaLM lm = MambaLM::load(test::golden_path("lm_mamba1_ckpt"));
  GenerateOptions opt;
  opt.sampling.greedy = true;
  opt.vocab_limit = 101;
  opt.max_new_tokens = 6;
  std::vector<std::vector<int32_t>> prompts = {{5, 17, 33}, {9, 2, 44, 61, 70, 3}};
  GenerateResult batch = generate(lm, prompts, opt);
  for (size_t b = 0; b < prompts.size(); ++b) {  // each alone gives the same tokens
    GenerateResult one = generate(lm, {prompts[b]}, opt);
    EXPECT_EQ(one.tokens[0], batch.tokens[b]) << "prompt " << b;
  }
  opt.eos_id = batch.tokens[0][2];  // pretend the third token is EOS
  size_t first = 0;
  while (batch.tokens[0][first] != opt.eos_id) ++first;
  GenerateResult stopped = generate(lm, {prompts[0]}, opt);
  EXPECT_EQ(stopped.tokens[0].size(), first + 1);  // ends with the EOS, nothing after it
  EXPECT_EQ(stopped.tokens[0].back(), opt.eos_id);
  std::vector<int64_t> streamed;
  opt.eos_id = -1;
  opt.on_token = [&](int64_t, int32_t t) { streamed.push_back(t); };
  GenerateResult s = generate(lm, {prompts[1]}, opt);
  EXPECT_EQ(std::vector<int64_t>(s.tokens[0].begin(), s.tokens[0].end()), streamed);
}
