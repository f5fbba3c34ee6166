#include "serve/engine.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "core/os.h"
#include "mamba/error.h"
#include "mamba/parallel.h"

namespace mamba::serve {

const char* finish_name(Finish f) {
  switch (f) {
    case Finish::running:
      return "running";
    case Finish::length:
      return "length";
    case Finish::eos:
      return "stop";
    case Finish::cancelled:
      return "cancelled";
    case Finish::shutdown:
      return "abort";
    case Finish::error:
      return "error";
  }
  return "error";
}

// ---- Sequence ----------------------------------------------------------------------------

Finish Sequence::wait(std::vector<TokenEvent>& out, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait_for(lk, timeout, [&] { return !events_.empty() || finish_ != Finish::running; });
  for (auto& e : events_) out.push_back(std::move(e));
  events_.clear();
  return finish_;
}

Finish Sequence::state() {
  std::lock_guard<std::mutex> lk(mu_);
  return finish_;
}

void Sequence::push(TokenEvent e) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

void Sequence::finish(Finish f, std::string err) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (finish_ != Finish::running) return;
    finish_ = f;
    error_ = std::move(err);
  }
  cv_.notify_all();
}

// ---- PrefixCache ---------------------------------------------------------------------------

PrefixCache::Hit PrefixCache::lookup(const MambaLM& lm, const std::vector<int32_t>& prompt) {
  std::lock_guard<std::mutex> lk(mu_);
  auto best = lru_.end();
  for (auto it = lru_.begin(); it != lru_.end(); ++it) {
    const auto& t = it->tokens;
    if (t.size() > prompt.size() || (best != lru_.end() && t.size() <= best->tokens.size()))
      continue;
    // A block-boundary entry has no logits: usable only with at least one token left to prefill.
    if (it->logits.empty() && t.size() == prompt.size()) continue;
    if (std::equal(t.begin(), t.end(), prompt.begin())) best = it;
  }
  Hit h;
  if (best == lru_.end()) return h;
  lru_.splice(lru_.begin(), lru_, best);  // most recently used
  h.len = static_cast<int64_t>(best->tokens.size());
  h.state = lm.new_state(1);
  h.state.copy_row(0, best->state, 0);
  h.logits = best->logits;
  return h;
}

void PrefixCache::insert(const MambaLM& lm, std::span<const int32_t> tokens, const LMState& state,
                         int64_t row, std::span<const float> logits) {
  const int64_t b =
      4 * (state.floats() / state.batch + static_cast<int64_t>(logits.size() + tokens.size())) +
      256;  // + the entry's own bookkeeping
  if (b > max_bytes_ || tokens.empty()) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto it = lru_.begin(); it != lru_.end(); ++it)
      if (std::ranges::equal(it->tokens, tokens)) {
        lru_.splice(lru_.begin(), lru_, it);
        if (it->logits.empty() && !logits.empty()) {  // a boundary that is now a prompt end too
          bytes_ += b - it->bytes;
          it->bytes = b;
          it->logits.assign(logits.begin(), logits.end());
          while (bytes_ > max_bytes_ && lru_.size() > 1) {
            bytes_ -= lru_.back().bytes;
            lru_.pop_back();
          }
        }
        return;
      }
  }
  Entry e;  // the copy is made outside the lock
  e.tokens.assign(tokens.begin(), tokens.end());
  e.state = lm.new_state(1);
  e.state.copy_row(0, state, row);
  e.logits.assign(logits.begin(), logits.end());
  e.bytes = b;
  std::lock_guard<std::mutex> lk(mu_);
  while (!lru_.empty() && bytes_ + b > max_bytes_) {
    bytes_ -= lru_.back().bytes;
    lru_.pop_back();
  }
  bytes_ += b;
  lru_.push_front(std::move(e));
}

int64_t PrefixCache::bytes() const {
  std::lock_guard<std::mutex> lk(mu_);
  return bytes_;
}

int64_t PrefixCache::entries() const {
  std::lock_guard<std::mutex> lk(mu_);
  return static_cast<int64_t>(lru_.size());
}

// ---- Engine --------------------------------------------------------------------------------

namespace {
double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
void add_to(std::atomic<double>& a, double v) {
  double cur = a.load();
  while (!a.compare_exchange_weak(cur, cur + v)) {
  }
}
}  // namespace

void Engine::Turn::acquire() {
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_lock<std::mutex> lk(e_.turn_mu_);
  const uint64_t ticket = e_.turn_next_++;
  e_.turn_cv_.wait(lk, [&] { return e_.turn_serving_ == ticket; });
  held_ = true;
  waited_ += since(t0);
}

void Engine::Turn::release() {
  {
    std::lock_guard<std::mutex> lk(e_.turn_mu_);
    ++e_.turn_serving_;
    held_ = false;
  }
  e_.turn_cv_.notify_all();
}

Engine::Engine(const MambaLM& lm, EngineOptions opt)
    : lm_(lm), opt_(opt), cache_(opt.prefix_cache_bytes) {
  MAMBA_CHECK(opt_.max_batch >= 1, "serve: --max-batch must be >= 1, got ", opt_.max_batch);
  MAMBA_CHECK(opt_.max_queue >= 0, "serve: --max-queue must be >= 0, got ", opt_.max_queue);
  MAMBA_CHECK(opt_.prefix_cache_bytes >= 0, "serve: the prefix cache size must be >= 0");
  MAMBA_CHECK(opt_.cache_block >= 1, "serve: --prefix-cache-block must be >= 1, got ",
              opt_.cache_block);
  MAMBA_CHECK(opt_.prefill_chunk >= 1, "serve: --prefill-chunk must be >= 1, got ",
              opt_.prefill_chunk);
  MAMBA_CHECK(opt_.prefill_batch_tokens >= 1, "serve: --prefill-batch-tokens must be >= 1, got ",
              opt_.prefill_batch_tokens);
  // OpenMP's thread count is per thread: a new thread would start with all cores, not with what
  // the caller set (`serve --threads N`), so each engine thread takes the caller's.
  const int threads = num_threads();
  prefill_thread_ = std::thread([this, threads] {
    set_num_threads(threads);
    prefill_loop();
  });
  decode_thread_ = std::thread([this, threads] {
    set_num_threads(threads);
    decode_loop();
  });
}

Engine::~Engine() { shutdown(); }

std::vector<std::shared_ptr<Sequence>> Engine::submit(const std::vector<SeqRequest>& reqs) {
  const int64_t V = lm_.vocab();
  std::vector<std::unique_ptr<Job>> jobs;
  std::vector<std::shared_ptr<Sequence>> out;
  for (const auto& r : reqs) {
    r.sampling.validate();
    MAMBA_CHECK(!r.prompt.empty(), "prompt: empty prompt");
    MAMBA_CHECK(r.max_tokens >= 1, "max_tokens: must be >= 1 here");
    const int64_t lim = r.vocab_limit > 0 ? std::min(r.vocab_limit, V) : V;
    for (int32_t t : r.prompt)
      MAMBA_CHECK(t >= 0 && t < lim, "prompt: token id ", t, " is outside the vocabulary [0, ", lim,
                  ")");
    auto j = std::make_unique<Job>();
    j->req = r;
    j->seq = std::make_shared<Sequence>();
    j->seq->prompt_len_ = static_cast<int64_t>(r.prompt.size());
    j->rng = Rng(r.seed);
    j->history = r.prompt;
    if (r.frequency_penalty != 0 || r.presence_penalty != 0) j->counts.assign(lim, 0);
    out.push_back(j->seq);
    jobs.push_back(std::move(j));
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) throw QueueFull("the server is shutting down");
    const int64_t free_slots = opt_.max_batch - in_flight_;
    const int64_t waiting = static_cast<int64_t>(pending_.size());
    if (waiting + static_cast<int64_t>(jobs.size()) >
        opt_.max_queue + std::max<int64_t>(free_slots, 0))
      throw QueueFull("the queue is full (" + std::to_string(waiting) + " sequences waiting, " +
                      "--max-queue " + std::to_string(opt_.max_queue) + ")");
    for (auto& j : jobs) pending_.push_back(std::move(j));
  }
  cv_prefill_.notify_one();
  return out;
}

void Engine::shutdown() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_ && !prefill_thread_.joinable() && !decode_thread_.joinable()) return;
    stop_ = true;
  }
  cv_prefill_.notify_all();
  cv_decode_.notify_all();
  if (prefill_thread_.joinable()) prefill_thread_.join();
  if (decode_thread_.joinable()) decode_thread_.join();
  std::lock_guard<std::mutex> lk(mu_);
  for (auto& j : pending_) j->seq->finish(Finish::shutdown);
  for (auto& j : ready_) j->seq->finish(Finish::shutdown);
  pending_.clear();
  ready_.clear();
}

EngineMetrics Engine::metrics() const {
  EngineMetrics m;
  {
    std::lock_guard<std::mutex> lk(mu_);
    m.queue_depth = static_cast<int64_t>(pending_.size());
  }
  m.batch_size = batch_size_.load();
  m.steps = steps_.load();
  m.prefill_calls = prefill_calls_.load();
  m.prompt_tokens = prompt_tokens_.load();
  m.prefill_tokens = prefill_tokens_.load();
  m.generated_tokens = generated_tokens_.load();
  m.prefill_seconds = prefill_s_.load();
  m.decode_seconds = decode_s_.load();
  m.cache_hits = cache_hits_.load();
  m.cache_misses = cache_misses_.load();
  m.cache_hit_tokens = cache_hit_tokens_.load();
  m.cache_bytes = cache_.bytes();
  m.cache_entries = cache_.entries();
  m.sequences_finished = finished_.load();
  m.sequences_cancelled = cancelled_.load();
  return m;
}

bool Engine::choose(Job& j, const float* logits) {
  const int64_t V = j.req.vocab_limit > 0 ? std::min(j.req.vocab_limit, lm_.vocab()) : lm_.vocab();
  const float* src = logits;
  std::vector<float> pen;
  if (!j.counts.empty()) {
    pen.assign(logits, logits + V);
    for (int64_t i = 0; i < V; ++i)
      if (j.counts[i] > 0)
        pen[i] -=
            static_cast<float>(j.counts[i]) * j.req.frequency_penalty + j.req.presence_penalty;
    src = pen.data();
  }
  const int32_t id = sample_token(src, V, j.req.sampling, j.rng, j.history);
  TokenEvent e;
  e.id = id;
  if (j.req.top_logprobs >= 0) {
    // log softmax of the model's own distribution (the raw logits), fp64 sum in index order
    float mx = logits[0];
    for (int64_t i = 1; i < V; ++i) mx = std::max(mx, logits[i]);
    double s = 0;
    for (int64_t i = 0; i < V; ++i) s += std::exp(static_cast<double>(logits[i]) - mx);
    const double lse = mx + std::log(s);
    e.logprob = static_cast<float>(logits[id] - lse);
    if (j.req.top_logprobs > 0) {
      std::vector<int32_t> idx(static_cast<size_t>(V));
      for (int64_t i = 0; i < V; ++i) idx[i] = static_cast<int32_t>(i);
      const int64_t k = std::min<int64_t>(j.req.top_logprobs, V);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
        return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
      });
      for (int64_t i = 0; i < k; ++i)
        e.top.emplace_back(idx[i], static_cast<float>(logits[idx[i]] - lse));
    }
  }
  j.history.push_back(id);
  if (!j.counts.empty()) ++j.counts[id];
  j.next = id;
  ++j.generated;
  if (id == j.req.eos_id) {
    j.seq->finish(Finish::eos);
    return false;
  }
  ++generated_tokens_;
  j.seq->push(std::move(e));
  if (j.generated >= j.req.max_tokens) {
    j.seq->finish(Finish::length);
    return false;
  }
  return true;
}

bool Engine::start_prefill(Job& j) {
  const auto& p = j.req.prompt;
  const int64_t L = static_cast<int64_t>(p.size());
  prompt_tokens_ += L;
  if (opt_.prefix_cache_bytes <= 0) return true;
  auto t0 = std::chrono::steady_clock::now();
  PrefixCache::Hit hit = cache_.lookup(lm_, p);
  if (hit.len == 0) {
    ++cache_misses_;
    return true;
  }
  ++cache_hits_;
  cache_hit_tokens_ += hit.len;
  j.seq->cached_len_ = hit.len;
  j.pos = hit.len;
  j.state1 = std::move(hit.state);
  add_to(prefill_s_, since(t0));
  if (hit.len < L) return true;  // the rest is prefilled from the cached state
  choose(j, hit.logits.data());  // an exact hit: the prompt's own state and logits
  return false;
}

void Engine::prefilled(JobPtr j) {
  const Finish f = j->seq->state();
  const bool joins = f == Finish::running;
  if (f == Finish::length || f == Finish::eos) ++finished_;
  std::lock_guard<std::mutex> lk(mu_);
  if (joins) {
    ready_.push_back(std::move(j));
    cv_decode_.notify_one();
  } else {
    --in_flight_;
  }
}

void Engine::prefill_group(std::vector<JobPtr> rows) {
  const bool cache = opt_.prefix_cache_bytes > 0;
  const int64_t blk = opt_.cache_block, Vp = lm_.vocab();
  int64_t pos = rows[0]->pos;
  auto len = [](const JobPtr& j) { return static_cast<int64_t>(j->req.prompt.size()); };
  std::stable_sort(rows.begin(), rows.end(),
                   [&](const JobPtr& a, const JobPtr& b) { return len(a) < len(b); });
  LMState st = lm_.new_state(static_cast<int64_t>(rows.size()));
  for (size_t r = 0; r < rows.size(); ++r)
    if (rows[r]->state1.batch > 0) st.copy_row(static_cast<int64_t>(r), rows[r]->state1, 0);
  std::vector<int32_t> ids;
  try {
    while (!rows.empty()) {
      // Rows that left (cancelled, or the server stopping) free their slot at once.
      bool stopping;
      {
        std::lock_guard<std::mutex> lk(mu_);
        stopping = stop_;
      }
      std::vector<int64_t> keep;
      for (size_t r = 0; r < rows.size(); ++r) {
        if (stopping) {
          rows[r]->seq->finish(Finish::shutdown);
        } else if (rows[r]->seq->cancelled()) {
          rows[r]->seq->finish(Finish::cancelled);
          ++cancelled_;
        } else {
          keep.push_back(static_cast<int64_t>(r));
          continue;
        }
        prefilled(std::move(rows[r]));
      }
      if (keep.size() < rows.size()) {
        std::vector<JobPtr> kept;
        LMState ks;
        if (!keep.empty()) ks = lm_.new_state(static_cast<int64_t>(keep.size()));
        for (size_t k = 0; k < keep.size(); ++k) {
          ks.copy_row(static_cast<int64_t>(k), st, keep[k]);
          kept.push_back(std::move(rows[keep[k]]));
        }
        rows = std::move(kept);
        st = std::move(ks);
        if (rows.empty()) return;
      }
      // The segment: up to the next block boundary (when caching) or the shortest prompt's end.
      const int64_t B = static_cast<int64_t>(rows.size());
      int64_t end = len(rows[0]);
      if (cache) end = std::min(end, (pos / blk + 1) * blk);
      const int64_t n = end - pos;
      ids.resize(static_cast<size_t>(B * n));
      for (int64_t r = 0; r < B; ++r)
        std::copy_n(rows[r]->req.prompt.begin() + pos, n, ids.begin() + r * n);
      auto t0 = std::chrono::steady_clock::now();
      // At most prefill_batch_tokens per chunk over the B rows (one token per row at least).
      const int64_t chunk =
          std::min({opt_.prefill_chunk, n, std::max<int64_t>(1, opt_.prefill_batch_tokens / B)});
      double waited = 0;
      Tensor lg;
      {
        // One chunk per turn: a decode step waiting for the cores goes between two chunks.
        Turn turn(*this);
        lg = lm_.prefill(ids, B, n, st, chunk, [&] {
          turn.release();
          turn.acquire();
        });  // (B, V_pad)
        waited = turn.waited();
      }
      pos = end;
      ++prefill_calls_;
      prefill_tokens_ += B * n;
      // Cache every row at a block boundary (no logits) or at its prompt's end (with them).
      int64_t done = 0;  // rows whose prompt ends here (the first ones: sorted by length)
      while (done < B && len(rows[done]) == pos) ++done;
      if (cache)
        for (int64_t r = 0; r < B; ++r)
          if (r < done || pos % blk == 0)
            cache_.insert(lm_, std::span<const int32_t>(rows[r]->req.prompt).first(pos), st, r,
                          r < done ? std::span<const float>(lg.data() + r * Vp, lm_.vocab())
                                   : std::span<const float>());
      add_to(prefill_s_, since(t0) - waited);
      if (done == 0) continue;
      // Rows whose prompt ended: sample the first token, hand the state to the scheduler.
      for (int64_t r = 0; r < done; ++r) {
        rows[r]->state1 = lm_.new_state(1);
        rows[r]->state1.copy_row(0, st, r);
        choose(*rows[r], lg.data() + r * Vp);
        prefilled(std::move(rows[r]));
      }
      rows.erase(rows.begin(), rows.begin() + done);
      if (rows.empty()) return;
      LMState rest = lm_.new_state(B - done);
      for (int64_t r = done; r < B; ++r) rest.copy_row(r - done, st, r);
      st = std::move(rest);
    }
  } catch (const std::exception& e) {  // not expected (the activations do not fit, ...)
    for (auto& j : rows)
      if (j) j->seq->finish(Finish::error, e.what()), prefilled(std::move(j));
  }
}

void Engine::prefill_loop() {
  for (;;) {
    std::vector<JobPtr> taken;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_prefill_.wait(lk,
                       [&] { return stop_ || (!pending_.empty() && in_flight_ < opt_.max_batch); });
      if (stop_) return;
      while (!pending_.empty() && in_flight_ < opt_.max_batch) {
        taken.push_back(std::move(pending_.front()));
        pending_.pop_front();
        ++in_flight_;
      }
    }
    // Cache lookups (an exact hit is done at once), then groups of jobs that start at the same
    // position, in the order of their first job, at most prefill_batch_tokens per chunk.
    std::vector<std::vector<JobPtr>> groups;
    std::vector<int64_t> group_pos;
    for (auto& j : taken) {
      if (j->seq->cancelled()) {
        j->seq->finish(Finish::cancelled);
        ++cancelled_;
        prefilled(std::move(j));
        continue;
      }
      bool more = false;
      try {
        more = start_prefill(*j);
      } catch (const std::exception& e) {
        j->seq->finish(Finish::error, e.what());
      }
      if (!more) {
        prefilled(std::move(j));
        continue;
      }
      const int64_t per_row =
          std::min(opt_.prefill_chunk, static_cast<int64_t>(j->req.prompt.size()) - j->pos);
      const int64_t max_rows = std::max<int64_t>(1, opt_.prefill_batch_tokens / per_row);
      size_t g = 0;
      while (g < groups.size() &&
             (group_pos[g] != j->pos || static_cast<int64_t>(groups[g].size()) >= max_rows))
        ++g;
      if (g == groups.size()) groups.emplace_back(), group_pos.push_back(j->pos);
      groups[g].push_back(std::move(j));
    }
    for (auto& g : groups) prefill_group(std::move(g));
  }
}

void Engine::decode_loop() {
  std::vector<std::unique_ptr<Job>> running;
  std::vector<char> done;  // per row: finished at the last step
  LMState batch;
  int64_t peak_batch = 0;  // the largest batch since the memory was last trimmed
  const int64_t Vp = lm_.vocab();
  for (;;) {
    std::vector<std::unique_ptr<Job>> joining;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_decode_.wait(lk, [&] { return stop_ || !ready_.empty() || !running.empty(); });
      if (stop_) break;
      joining.swap(ready_);
    }
    std::vector<std::unique_ptr<Job>> keep;
    try {
      // Leave: finished at the last step, or cancelled (a stop string, a disconnect).
      std::vector<int64_t> old_row;
      int64_t left = 0;
      for (size_t b = 0; b < running.size(); ++b) {
        if (done[b]) {
          ++left;
          ++finished_;
        } else if (running[b]->seq->cancelled()) {
          running[b]->seq->finish(Finish::cancelled);
          ++left;
          ++cancelled_;
        } else {
          keep.push_back(std::move(running[b]));
          old_row.push_back(static_cast<int64_t>(b));
        }
      }
      if (left > 0 || !joining.empty()) {
        // Join: a new batch state; kept rows copied from the old one, new rows from their prefill.
        const int64_t B = static_cast<int64_t>(keep.size() + joining.size());
        LMState nb;
        if (B > 0) nb = lm_.new_state(B);
        for (size_t r = 0; r < keep.size(); ++r)
          nb.copy_row(static_cast<int64_t>(r), batch, old_row[r]);
        const size_t kept = keep.size();
        for (size_t r = 0; r < joining.size(); ++r) {
          nb.copy_row(static_cast<int64_t>(kept + r), joining[r]->state1, 0);
          joining[r]->state1 = LMState{};
          keep.push_back(std::move(joining[r]));
        }
        batch = std::move(nb);
        done.assign(keep.size(), 0);
        // The process keeps freed memory (os::keep_freed_memory, set for every command): after a
        // peak (the batch down to half its largest size since the last trim, or empty) the
        // allocator's free memory goes back, so the resident memory follows the load instead of
        // its high-water mark (docs/SERVING.md).
        if (left > 0 && B <= peak_batch / 2) {
          os::trim_freed_memory();
          peak_batch = B;
        }
        peak_batch = std::max(peak_batch, B);
        if (left > 0) {
          std::lock_guard<std::mutex> lk(mu_);
          in_flight_ -= left;
        }
        cv_prefill_.notify_one();
      }
      running = std::move(keep);  // the same rows in the same order when nothing changed
      batch_size_.store(static_cast<int64_t>(running.size()));
      if (running.empty()) continue;
      std::vector<int32_t> ids(running.size());
      for (size_t b = 0; b < running.size(); ++b) ids[b] = running[b]->next;
      Tensor logits;
      std::chrono::steady_clock::time_point t0;
      try {
        Turn turn(*this);  // waits for at most one prefill chunk
        t0 = std::chrono::steady_clock::now();
        logits = lm_.step(ids, batch);     // (B, V_pad)
      } catch (const std::exception& e) {  // not expected: every row leaves with the error
        for (size_t b = 0; b < running.size(); ++b)
          running[b]->seq->finish(Finish::error, e.what());
        done.assign(running.size(), 1);
        continue;
      }
      add_to(decode_s_, since(t0));
      ++steps_;
      for (size_t b = 0; b < running.size(); ++b)
        if (!choose(*running[b], logits.data() + static_cast<int64_t>(b) * Vp)) done[b] = 1;
    } catch (const std::exception& e) {
      // Not expected (a NaN in the logits, a state that does not fit): every sequence of the
      // batch ends with the error instead of the process.
      int64_t n = 0;
      for (auto* v : {&running, &keep, &joining})
        for (auto& j : *v)
          if (j) j->seq->finish(Finish::error, e.what()), ++n;
      running.clear();
      done.clear();
      batch = LMState{};
      batch_size_.store(0);
      {
        std::lock_guard<std::mutex> lk(mu_);
        in_flight_ -= n;
      }
      cv_prefill_.notify_one();
    }
  }
  for (auto& j : running) j->seq->finish(Finish::shutdown);
  batch_size_.store(0);
}

}  // namespace mamba::serve
