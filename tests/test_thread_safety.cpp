// Thread-safety (issue 18, item 7; the server relies on it): two different models, and one model
// shared read-only by several threads, generating concurrently in one process give the same ids
// (greedy and sampled) as the same calls made one after the other. (tests/test_block.cpp checks
// the logits and states of a shared model bit for bit.)
#include <thread>

#include "mamba/generate.h"
#include "mamba/lm.h"
#include "mamba/rng.h"
#include "test_util.h"

using namespace mamba;

namespace {
std::vector<std::vector<int32_t>> prompts(uint64_t seed, int64_t vocab) {
  Rng rng(seed);
  std::vector<std::vector<int32_t>> p(3);
  for (size_t k = 0; k < p.size(); ++k) {
    p[k].resize(3 + 4 * k);
    for (auto& v : p[k]) v = static_cast<int32_t>(rng.below(static_cast<uint64_t>(vocab)));
  }
  return p;
}

GenerateOptions options(bool greedy, uint64_t seed) {
  GenerateOptions o;
  o.max_new_tokens = 12;
  o.sampling.greedy = greedy;
  o.seed = seed;
  return o;
}
}  // namespace

TEST(ThreadSafety, TwoModelsAndASharedModelGenerateConcurrentlyAsSequentially) {
  const MambaLM m1 = MambaLM::load(test::golden_path("lm_mamba1_ckpt"));
  const MambaLM m2 = MambaLM::load(test::golden_path("lm_mamba2_ckpt"));
  struct Job {
    const MambaLM* lm;
    std::vector<std::vector<int32_t>> prompts;
    GenerateOptions opt;
  };
  // Each model: a greedy and a sampled job, twice (so two threads share each model at once).
  std::vector<Job> jobs;
  for (const MambaLM* lm : {&m1, &m2})
    for (int rep = 0; rep < 2; ++rep)
      for (bool greedy : {true, false})
        jobs.push_back({lm, prompts(7 + rep, lm->config().vocab_size), options(greedy, 100 + rep)});
  std::vector<GenerateResult> seq(jobs.size()), par(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j)
    seq[j] = generate(*jobs[j].lm, jobs[j].prompts, jobs[j].opt);
  std::vector<std::thread> th;
  for (size_t j = 0; j < jobs.size(); ++j)
    th.emplace_back([&, j] { par[j] = generate(*jobs[j].lm, jobs[j].prompts, jobs[j].opt); });
  for (auto& t : th) t.join();
  for (size_t j = 0; j < jobs.size(); ++j) {
    ASSERT_EQ(seq[j].tokens.size(), 3u);
    EXPECT_EQ(par[j].tokens, seq[j].tokens) << "job " << j;
  }
  // The jobs are not trivially equal: the two models and the two samplings differ.
  EXPECT_NE(seq[0].tokens, seq[4].tokens);
  EXPECT_NE(seq[0].tokens, seq[1].tokens);
}
