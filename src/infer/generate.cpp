#include "mamba/generate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

namespace mamba {

void SamplingParams::validate() const {
  MAMBA_CHECK(temperature > 0 && std::isfinite(temperature), "temperature must be > 0, got ",
              temperature);
  MAMBA_CHECK(top_k >= 0, "top_k must be >= 0, got ", top_k);
  MAMBA_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
  MAMBA_CHECK(min_p >= 0 && min_p <= 1, "min_p must be in [0, 1], got ", min_p);
  MAMBA_CHECK(repetition_penalty > 0, "repetition_penalty must be > 0, got ", repetition_penalty);
}

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, Rng& rng,
                     const std::vector<int32_t>& history) {
  MAMBA_CHECK(vocab > 0, "sample_token: empty vocabulary");
  std::vector<float> l(logits, logits + vocab);
  if (p.repetition_penalty != 1.0f) {
    std::vector<char> seen(static_cast<size_t>(vocab), 0);
    for (int32_t t : history)
      if (t >= 0 && t < vocab && !seen[t]) {
        seen[t] = 1;
        l[t] = l[t] > 0 ? l[t] / p.repetition_penalty : l[t] * p.repetition_penalty;
      }
  }
  for (float v : l) MAMBA_CHECK(!std::isnan(v), "sample_token: NaN in logits");
  if (p.greedy) return static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
  // Candidates sorted by logit, descending (ties by id for determinism).
  std::vector<int32_t> idx(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(),
            [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
  if (p.top_k > 0 && p.top_k < vocab) idx.resize(static_cast<size_t>(p.top_k));
  std::vector<double> prob(idx.size());
  const double mx = l[idx[0]];
  double sum = 0;
  for (size_t i = 0; i < idx.size(); ++i)
    sum += prob[i] = std::exp((l[idx[i]] - mx) / p.temperature);
  for (double& v : prob) v /= sum;
  size_t keep = idx.size();
  if (p.min_p > 0) {
    size_t k = 0;
    while (k < keep && prob[k] >= p.min_p * prob[0]) ++k;
    keep = std::max<size_t>(k, 1);
  }
  if (p.top_p < 1) {
    double c = 0;
    size_t k = 0;
    while (k < keep) {
      c += prob[k++];
      if (c >= p.top_p) break;
    }
    keep = std::max<size_t>(k, 1);
  }
  double total = 0;
  for (size_t i = 0; i < keep; ++i) total += prob[i];
  double r = rng.uniform() * total;
  for (size_t i = 0; i < keep; ++i) {
    r -= prob[i];
    if (r < 0) return idx[i];
  }
  return idx[keep - 1];
}

namespace {
double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

GenerateResult generate(const MambaLM& lm, const std::vector<std::vector<int32_t>>& prompts,
                        const GenerateOptions& opt) {
  opt.sampling.validate();
  MAMBA_CHECK(!prompts.empty(), "generate: no prompts");
  MAMBA_CHECK(opt.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  const int64_t B = static_cast<int64_t>(prompts.size());
  const int64_t V = opt.vocab_limit > 0 ? std::min(opt.vocab_limit, lm.vocab()) : lm.vocab();
  GenerateResult res;
  res.tokens.resize(B);
  if (opt.keep_scores) res.scores.resize(B);
  Rng rng(opt.seed);
  LMState state = lm.new_state(B);
  std::vector<int32_t> next(B);
  std::vector<std::vector<int32_t>> history = prompts;
  std::vector<char> done(B, 0);
  auto choose = [&](int64_t b, const float* logits) {
    if (opt.keep_scores) res.scores[b].emplace_back(logits, logits + V);
    int32_t t = sample_token(logits, V, opt.sampling, rng, history[b]);
    next[b] = t;
    res.tokens[b].push_back(t);
    history[b].push_back(t);
    if (opt.on_token) opt.on_token(b, t);
    if (t == opt.eos_id) done[b] = 1;
  };
  if (opt.max_new_tokens == 0) return res;
  // Prefill: each prompt alone (lengths may differ), in chunks of opt.prefill_chunk tokens, then
  // stack the states.
  MAMBA_CHECK(opt.prefill_chunk >= 0, "generate: prefill_chunk must be >= 0, got ",
              opt.prefill_chunk);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t b = 0; b < B; ++b) {
    const auto& p = prompts[b];
    MAMBA_CHECK(!p.empty(), "generate: prompt ", b, " is empty");
    LMState s1 = lm.new_state(1);
    Tensor logits = lm.prefill(p, 1, static_cast<int64_t>(p.size()), s1,
                               opt.prefill_chunk);  // (1, V_pad)
    state.copy_row(b, s1, 0);
    choose(b, logits.data());
    res.prefill_tokens += static_cast<int64_t>(p.size());
  }
  res.prefill_seconds = since(t0);
  t0 = std::chrono::steady_clock::now();
  for (int64_t step = 1; step < opt.max_new_tokens; ++step) {
    if (std::all_of(done.begin(), done.end(), [](char c) { return c != 0; })) break;
    Tensor logits = lm.step(next, state);  // (B, V_pad); finished rows are stepped but ignored
    for (int64_t b = 0; b < B; ++b) {
      if (done[b]) continue;
      choose(b, logits.data() + b * lm.vocab());
      ++res.decode_tokens;
    }
  }
  res.decode_seconds = since(t0);
  return res;
}

}  // namespace mamba
