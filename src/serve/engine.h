// The serving engine behind `mambacpp serve`: continuous batching of recurrent states and a
// prefix-state cache, independent of HTTP (src/serve/server.cpp speaks HTTP; tests drive both).
//
// Threads (a const MambaLM is shared by all of them, each with its own LMState; each computes with
// the thread count of the thread that constructed the Engine, mamba::num_threads()):
//   prefill thread   takes the submitted sequences in FIFO order, as many as there are free slots
//                    (fewer than max_batch in flight); takes each prompt's longest cached prefix
//                    from the prefix cache; prefills the prompts that start at the same position
//                    together, as the rows of one batch (MambaLM::prefill continuing their states,
//                    at most prefill_batch_tokens per call), segment by segment: a segment ends at
//                    the next cache block boundary or at the end of the shortest prompt still in
//                    the batch, whose row then leaves with its first token sampled and its batch-1
//                    state handed to the scheduler.
//   scheduler thread steps every running sequence together (one MambaLM::step over a batch
//                    state of B rows), samples each row with that sequence's own sampler and
//                    RNG, and delivers the tokens. Between steps, prefilled sequences join
//                    (their row copied in, State::copy_row) and finished or cancelled ones leave.
// The compute turn: the two threads never compute at once (each would run its thread team on the
// same cores, both at half speed, spinning against each other). A prefill chunk (at most
// prefill_chunk tokens per row and prefill_batch_tokens in all) and a decode step each take the
// turn, first come first served: while both have work they alternate, so a running stream waits
// at most one chunk per token while a long prompt is prefilled, and a prompt waits at most one
// step per chunk (docs/PERFORMANCE.md, "Serving", stop 26).
// A sequence's tokens depend on its prompt, its parameters and its seed only: the same prompt
// gives the same greedy ids alone or in any batch (decode or prefill), with or without the prefix
// cache, up to the float differences of batched vs single-row GEMMs and of where the prefill is cut
// into chunks (argmax is what the tests compare).
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <span>
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
  Finish state();
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

// LRU of model states at the end of prompts (with the logits of the prompt's last position) and
// at block boundaries inside them (without logits), bounded in bytes. A lookup finds the longest
// cached token sequence that is a prefix of the new prompt; an entry without logits only when it
// is shorter than the prompt (the rest is prefilled from its state).
class PrefixCache {
 public:
  explicit PrefixCache(int64_t max_bytes) : max_bytes_(max_bytes) {}
  struct Hit {
    int64_t len = 0;            // tokens covered (0: miss)
    LMState state;              // a deep copy (batch 1) of the state after those tokens
    std::vector<float> logits;  // the logits after the last of them (prompt ends only)
  };
  // lm: to allocate the copy of the state.
  Hit lookup(const MambaLM& lm, const std::vector<int32_t>& prompt);
  // Stores a deep copy of row `row` of `state` after `tokens` (logits empty for a block
  // boundary); evicts least recently used entries beyond the bound; an entry larger than the
  // bound is not stored. An entry for the same tokens is refreshed (and gains the logits if it had
  // none).
  void insert(const MambaLM& lm, std::span<const int32_t> tokens, const LMState& state, int64_t row,
              std::span<const float> logits);
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

struct EngineOptions {
  int64_t max_batch = 16;          // sequences decoded together
  int64_t max_queue = 64;          // sequences waiting for a slot; beyond: QueueFull
  int64_t prefix_cache_bytes = 0;  // 0 = no prefix cache
  // The prefix cache also keeps the state every cache_block prompt tokens (>= 1), so a prompt
  // sharing only the start of a cached one continues from the longest shared block boundary.
  int64_t cache_block = 384;
  // Tokens per row per MambaLM::prefill chunk (>= 1; bounds the prefill's activations).
  int64_t prefill_chunk = MambaLM::kDefaultPrefillChunk;
  // Prompts prefilled together: at most this many tokens per chunk over all rows (>= 1; a prompt
  // longer than it is prefilled alone, prefill_chunk at a time).
  int64_t prefill_batch_tokens = 512;
};

struct EngineMetrics {
  int64_t queue_depth = 0, batch_size = 0, steps = 0;
  int64_t prefill_calls = 0;  // MambaLM::prefill calls (each may carry several prompts)
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
    LMState state1;                // batch-1 state after prefill (or a cache hit), until it joins
    int64_t pos = 0;               // prompt tokens already in state1 (a cache hit's length)
    int32_t next = 0;              // the last sampled token (the next step's input)
    int64_t generated = 0;
  };
  using JobPtr = std::unique_ptr<Job>;
  void prefill_loop();
  void decode_loop();
  // Looks up the prefix cache; an exact hit samples the first token. Returns true when the
  // prompt still has tokens to prefill.
  bool start_prefill(Job& j);
  // Prefills jobs that start at the same position together (rows of one batch), handing each to
  // the scheduler as its prompt ends.
  void prefill_group(std::vector<JobPtr> rows);
  // A job whose prefill is over (first token sampled, or failed): joins the batch or leaves.
  void prefilled(JobPtr j);
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
  // The compute turn: prefill chunks and decode steps take turns on the cores, first come first
  // served (a ticket lock), so the two threads never compute at once (two thread teams on the
  // same cores would each run at half speed and spin against each other).
  class Turn {
   public:
    explicit Turn(Engine& e) : e_(e) { acquire(); }
    ~Turn() {
      if (held_) release();
    }
    Turn(const Turn&) = delete;
    Turn& operator=(const Turn&) = delete;
    void acquire();
    void release();
    double waited() const { return waited_; }  // seconds spent waiting for the turn

   private:
    Engine& e_;
    bool held_ = false;
    double waited_ = 0;
  };
  std::mutex turn_mu_;
  std::condition_variable turn_cv_;
  uint64_t turn_next_ = 0, turn_serving_ = 0;  // tickets: the next to give, the one computing
  // metrics
  std::atomic<int64_t> batch_size_{0}, steps_{0}, prefill_calls_{0}, prompt_tokens_{0},
      prefill_tokens_{0}, generated_tokens_{0}, cache_hits_{0}, cache_misses_{0},
      cache_hit_tokens_{0}, finished_{0}, cancelled_{0};
  std::atomic<double> prefill_s_{0}, decode_s_{0};
};

}  // namespace mamba::serve
