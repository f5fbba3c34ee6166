// Sampling and generation: prefill with the full-sequence path (chunked, MambaLM::prefill, which
// leaves the decode state), then one step per token with that constant-size state.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "mamba/lm.h"
#include "mamba/rng.h"

namespace mamba {

struct SamplingParams {
  bool greedy = false;              // argmax (ignores the rest)
  float temperature = 1.0f;         // > 0
  int64_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // nucleus, 1 = off
  float min_p = 0.0f;               // keep tokens with p >= min_p * p_max, 0 = off
  float repetition_penalty = 1.0f;  // CTRL-style: logit/penalty if > 0 else logit*penalty, 1 = off
  void validate() const;            // throws mamba::Error naming the option
};

// Picks the next token from logits[0, vocab). `history` (prompt + generated) drives the
// repetition penalty. Deterministic for a given rng state.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, Rng& rng,
                     const std::vector<int32_t>& history);

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingParams sampling;
  uint64_t seed = 0;
  int32_t eos_id = -1;       // stop a sequence when it produces this id (-1 = never)
  int64_t vocab_limit = -1;  // sample only ids < vocab_limit (the real vocabulary; -1 = all)
  bool keep_scores = false;  // keep the logits that chose each token
  // Prompts are prefilled this many tokens at a time (MambaLM::prefill; 0 = in one piece): the
  // activations held are bounded by the chunk, not by the prompt length.
  int64_t prefill_chunk = MambaLM::kDefaultPrefillChunk;
  // Called as each token is produced: (sequence index, token id).
  std::function<void(int64_t, int32_t)> on_token;
};

struct GenerateResult {
  std::vector<std::vector<int32_t>> tokens;             // generated ids per sequence
  std::vector<std::vector<std::vector<float>>> scores;  // [seq][step][vocab_limit] if kept
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0;
};

// Several prompts (any lengths) as one batch: each prompt is prefilled, the states are
// stacked, and all sequences are stepped together until max_new_tokens or EOS.
// The batching contract, for every kind of layer state: a prompt is prefilled alone (batch 1,
// its own length), then its state is copied into its row of the batch state (State::copy_row);
// the batch then advances one token per row per step. A fixed-size recurrent state copies its
// tensors' row; a KV cache (attention) will copy the row's keys/values up to its own length into a
// batch cache allocated for the longest prompt + max_new_tokens, with a per-row length.
// lm is only read: several threads may generate with one model at once.
GenerateResult generate(const MambaLM& lm, const std::vector<std::vector<int32_t>>& prompts,
                        const GenerateOptions& opt);

}  // namespace mamba
