// The serving engine behind `mambacpp serve`: continuous batching of recurrent states and a
// prefix-state cache, independent of HTTP (src/serve/server.cpp speaks HTTP; tests drive both).
//
// Threads (a const MambaLM is shared by all of them, each with its own LMState):
//   prefill thread   takes submitted sequences in FIFO order, while fewer than max_batch are in
//                    flight; prefills each prompt alone (batch 1, MambaLM::forward_last) or takes
//                    its state from the prefix cache; samples the first token; hands the
//                    batch-1 state to the scheduler. It runs beside the decode steps, so a long
//                    prompt delays only its own first token, never the running streams.
//   scheduler thread steps every running sequence together (one MambaLM::step over a batch
//                    state of B rows), samples each row with that sequence's own sampler and
//                    RNG, and delivers the tokens. Between steps, prefilled sequences join
//                    (their row copied in, State::copy_row) and finished or cancelled ones leave.
// A sequence's tokens depend on its prompt, its parameters and its seed only: the same prompt
// gives the same greedy ids alone or in any batch, up to the float differences of batched vs
// single-row GEMMs (argmax is what the tests compare).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mamba/generate.h"
#include "mamba/lm.h"
#include "mamba/rng.h"

namespace mamba::serve {

// One sequence to generate.
struct SeqRequest {
  std::vector<int32_t> prompt;  // non-empty
  int64_t max_tokens = 16;      // >= 1 (the server answers 0 without the engine)
  SamplingParams sampling;
  float frequency_penalty = 0, presence_penalty = 0;  // OpenAI's additive penalties, 0 = off
  uint64_t seed = 0;
  int32_t eos_id = -1;       // stop at this id (-1 = never)
  int64_t vocab_limit = -1;  // sample ids < vocab_limit only (the real vocabulary)
  int top_logprobs = -1;     // -1: no logprobs; 0: the chosen token's; k > 0: also the k best
};

struct TokenEvent {
  int32_t id = 0;
  float logprob = 0;                           // log softmax of the raw logits (if asked)
  std::vector<std::pair<int32_t, float>> top;  // the top_logprobs best (id, logprob)
};

enum class Finish { running, length, eos, cancelled, shutdown, error };
const char* finish_name(Finish f);  // "length", "stop", "cancelled", "abort", "error"

// A sequence in flight: the engine produces events, the HTTP handler consumes them.
class Sequence {
 public:
  // Waits up to `timeout` for events; moves them into `out`. Returns the finish state (running
  // while more may come).
  Finish wait(std::vector<TokenEvent>& out, std::chrono::milliseconds timeout);
  // Asks the engine to drop the sequence at its next step (a stop string, a disconnect).
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }
  const std::string& error() const { return error_; }  // when Finish::error
  int64_t prompt_tokens() const { return prompt_len_; }
  bool cache_hit() const { return cached_len_ > 0; }
  int64_t cached_tokens() const { return cached_len_; }

 private:
  friend class Engine;
  void push(TokenEvent e);
  void finish(Finish f, std::string err = {});

  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<TokenEvent> events_;
  Finish finish_ = Finish::running;
  std::string error_;
  std::atomic<bool> cancelled_{false};
  int64_t prompt_len_ = 0, cached_len_ = 0;
};

// LRU of model states at the end of prompts (and the logits of the prompt's last position),
// bounded in bytes. A lookup finds the longest cached prompt that is a prefix of the new one.
class PrefixCache {
 public:
  explicit PrefixCache(int64_t max_bytes) : max_bytes_(max_bytes) {}
  struct Hit {
    int64_t len = 0;            // tokens covered (0: miss)
    LMState state;              // a deep copy (batch 1) of the state after those tokens
    std::vector<float> logits;  // the logits after the last of them (for an exact hit)
  };
  // lm: to allocate the copy of the state.
  Hit lookup(const MambaLM& lm, const std::vector<int32_t>& prompt);
  // Stores a deep copy of `state` (batch 1) after `tokens`; evicts least recently used entries
  // beyond the bound; an entry larger than the bound is not stored.
  void insert(const MambaLM& lm, const std::vector<int32_t>& tokens, const LMState& state,
              const std::vector<float>& logits);
  int64_t bytes() const;
  int64_t entries() const;

 private:
  struct Entry {
    std::vector<int32_t> tokens;
    LMState state;
    std::vector<float> logits;
    int64_t bytes = 0;
  };
  mutable std::mutex mu_;
  std::list<Entry> lru_;  // most recent first
  int64_t max_bytes_ = 0, bytes_ = 0;
};

// Floats held by a state (every layer's tensors).
int64_t state_floats(const LMState& s);
// dst row dst_b = src row src_b, for every layer (each state kind copies its own row).
void copy_state_row(const LMState& src, int64_t src_b, LMState& dst, int64_t dst_b);

struct EngineOptions {
  int64_t max_batch = 16;          // sequences decoded together
  int64_t max_queue = 64;          // sequences waiting for a slot; beyond: QueueFull
  int64_t prefix_cache_bytes = 0;  // 0 = no prefix cache
};

struct EngineMetrics {
  int64_t queue_depth = 0, batch_size = 0, steps = 0;
  int64_t prompt_tokens = 0, prefill_tokens = 0, generated_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t cache_hits = 0, cache_misses = 0, cache_hit_tokens = 0, cache_bytes = 0,
          cache_entries = 0;
  int64_t sequences_finished = 0, sequences_cancelled = 0;
};

struct QueueFull : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class Engine {
 public:
  Engine(const MambaLM& lm, EngineOptions opt);
  ~Engine();  // shutdown()
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Queues the sequences (all or none; throws QueueFull when they do not fit, mamba::Error for a
  // request that can never run, e.g. an empty prompt or an id outside the vocabulary).
  std::vector<std::shared_ptr<Sequence>> submit(const std::vector<SeqRequest>& reqs);
  // Ends every sequence (Finish::shutdown) and joins the threads. Idempotent.
  void shutdown();
  EngineMetrics metrics() const;

 private:
  struct Job {
    SeqRequest req;
    std::shared_ptr<Sequence> seq;
    Rng rng;
    std::vector<int32_t> history;  // prompt + generated (repetition penalty)
    std::vector<int32_t> counts;   // generated count per id (frequency / presence penalty)
    LMState state1;                // batch-1 state after prefill, until it joins the batch
    int32_t next = 0;              // the last sampled token (the next step's input)
    int64_t generated = 0;
  };
  void prefill_loop();
  void decode_loop();
  void prefill(Job& j);
  // Samples from logits (V_pad), delivers the token; returns false when the job is finished.
  bool choose(Job& j, const float* logits);

  const MambaLM& lm_;
  EngineOptions opt_;
  PrefixCache cache_;
  mutable std::mutex mu_;
  std::condition_variable cv_prefill_, cv_decode_;
  std::deque<std::unique_ptr<Job>> pending_;  // submitted, not prefilled
  std::vector<std::unique_ptr<Job>> ready_;   // prefilled, joining at the next step
  int64_t in_flight_ = 0;                     // prefilling + ready + running
  bool stop_ = false;
  std::thread prefill_thread_, decode_thread_;
  // metrics
  std::atomic<int64_t> batch_size_{0}, steps_{0}, prompt_tokens_{0}, prefill_tokens_{0},
      generated_tokens_{0}, cache_hits_{0}, cache_misses_{0}, cache_hit_tokens_{0}, finished_{0},
      cancelled_{0};
  std::atomic<double> prefill_s_{0}, decode_s_{0};
};

}  // namespace mamba::serve
