// parallel_for's OpenMP side: the only place in the library with an OpenMP pragma, so
// include/mamba/parallel.h stays free of OpenMP (OpenMP is linked PRIVATE).
#include "mamba/parallel.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <exception>

#include "core/gemm.h"

namespace mamba {

int num_threads() { return omp_get_max_threads(); }
bool in_parallel() { return omp_in_parallel() != 0; }

void set_num_threads(int n) {
  if (n <= 0) n = omp_get_num_procs();
  omp_set_num_threads(n);
  detail::set_blas_threads(n);
}

namespace detail {

namespace {

// Pauses before a waiting thread sleeps: at most ~5 ms, as libgomp spins; ~20 us when the team
// has more threads than the machine has cores (libgomp throttles its spinning there too), where a
// spinning thread would hold the core the thread it waits for needs. Between the two, each thread
// adapts its own budget (kept across teams, so across decode tokens): a wait that had to sleep
// halves it, a wait that ended while spinning doubles it. On an idle machine hand-offs come within
// microseconds and the budget stays at the top; on a machine loaded by other processes the thread
// waited for is often not running, spinning for it only holds the core it needs, and the budget
// falls to the bottom. Only timing depends on it, never a result.
constexpr int kSpinRounds = 1 << 18, kSpinRoundsOversubscribed = 1 << 10;

// with_team's state, on its master's stack. The master publishes a task (fn, n, chunks) and bumps
// `seq`; every worker runs its range (thread c: range c, if c < chunks) and counts itself in
// `done`; the master runs range 0, then waits until all size - 1 workers are done, so no worker
// can still be reading a task when the next one is written. A waiting thread spins for a while
// (the next hand-off is usually microseconds away), then sleeps on the atomic (a futex), so on a
// loaded machine it gives its core to the thread it waits for; notify is a system call only when
// someone sleeps.
struct Team {
  alignas(64) std::atomic<uint32_t> seq{0};
  alignas(64) std::atomic<int> done{0};
  std::atomic<bool> stop{false};
  int size = 1;
  int spin = kSpinRounds;
  int64_t n = 0, chunks = 0;
  RangeFnRef fn;
  explicit Team(RangeFnRef f) : fn(f) {}
};

thread_local Team* tl_team = nullptr;  // set on a team's master while its body runs

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

thread_local int tl_spin_budget = kSpinRounds;

// Spins (cpu_relax) while pending() and the budget lasts, then sleeps with sleep() until
// pending() is false; adapts this thread's budget, capped at `top`.
template <class Pending, class Sleep>
void spin_then_sleep(int top, Pending pending, Sleep sleep) {
  const int budget = std::min(tl_spin_budget, top);
  int rounds = 0;
  bool slept = false;
  while (pending()) {
    if (++rounds < budget) {
      cpu_relax();
    } else {
      slept = true;
      sleep();
    }
  }
  tl_spin_budget = slept ? std::max(kSpinRoundsOversubscribed, budget / 2)
                         : std::min(kSpinRounds, std::max(budget, kSpinRoundsOversubscribed) * 2);
}

void run_range(int64_t n, int64_t chunks, int64_t c, const RangeFnRef& fn) {
  const int64_t b = n * c / chunks, e = n * (c + 1) / chunks;
  if (b < e) fn(b, e);
}

void team_worker(Team& t, int tid) {
  uint32_t seen = 0;
  for (;;) {
    spin_then_sleep(
        t.spin,
        [&] {
          return t.seq.load(std::memory_order_acquire) == seen &&
                 !t.stop.load(std::memory_order_acquire);
        },
        // woken by a new task or by stop (team_stop bumps seq)
        [&] { t.seq.wait(seen, std::memory_order_acquire); });
    if (t.stop.load(std::memory_order_acquire)) return;
    seen = t.seq.load(std::memory_order_acquire);
    if (tid < t.chunks) run_range(t.n, t.chunks, tid, t.fn);
    t.done.fetch_add(1, std::memory_order_acq_rel);
    t.done.notify_one();
  }
}

void team_run(Team& t, int64_t n, int64_t chunks, RangeFnRef fn) {
  t.fn = fn, t.n = n, t.chunks = chunks;
  t.done.store(0, std::memory_order_relaxed);
  t.seq.fetch_add(1, std::memory_order_release);
  t.seq.notify_all();
  tl_team = nullptr;  // a parallel_for inside the range runs inline, as on the other threads
  run_range(n, chunks, 0, fn);
  tl_team = &t;
  int d = 0;
  spin_then_sleep(
      t.spin, [&] { return (d = t.done.load(std::memory_order_acquire)) < t.size - 1; },
      [&] { t.done.wait(d, std::memory_order_acquire); });
}

void team_stop(Team& t) {
  t.stop.store(true, std::memory_order_release);
  t.seq.fetch_add(1, std::memory_order_release);  // wakes sleeping workers, which then see stop
  t.seq.notify_all();
}

}  // namespace

int64_t parallel_chunks(int64_t n, int64_t grain) {
  grain = std::max<int64_t>(grain, 1);
  if (tl_team) return std::clamp<int64_t>((n + grain - 1) / grain, 1, tl_team->size);
  const int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, num_threads());
  if (chunks <= 1 || in_parallel()) return 1;
  return chunks;
}

void parallel_run(int64_t n, int64_t chunks, RangeFnRef fn) {
  if (tl_team) {
    team_run(*tl_team, n, chunks, fn);
    return;
  }
  const int threads = static_cast<int>(chunks);  // chunks <= num_threads()
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) run_range(n, chunks, c, fn);
}

void with_team_run(VoidFnRef body) {
  const int threads = num_threads();
  if (threads <= 1 || tl_team || in_parallel()) {
    body();
    return;
  }
  auto none = [](int64_t, int64_t) {};
  Team team{RangeFnRef(none)};
  if (threads > omp_get_num_procs()) team.spin = kSpinRoundsOversubscribed;
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    if (tid == 0) {
      team.size = omp_get_num_threads();
      tl_team = &team;
      try {
        body();
      } catch (...) {
        error = std::current_exception();
      }
      tl_team = nullptr;
      team_stop(team);
    } else {
      team_worker(team, tid);
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace detail
}  // namespace mamba
