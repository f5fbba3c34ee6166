// parallel_for over the machine's cores. OpenMP is an implementation detail of the library
// (src/core/parallel.cpp): this header needs no OpenMP flags, so code that includes it (a
// consumer of the installed library, a Python module) compiles without -fopenmp. The BLAS
// shares the same pool: with the OpenMP flavour of OpenBLAS a GEMM called inside a parallel
// region runs single-threaded, and one called outside uses the same threads, so the two never
// oversubscribe.
#pragma once
#include <algorithm>  // kept: code that includes this header has relied on it
#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>

namespace mamba {

int num_threads();            // threads parallel_for uses
void set_num_threads(int n);  // also sets the BLAS threads; n <= 0 means all cores
bool in_parallel();

namespace detail {

// A non-owning reference to a callable fn(begin, end): one pointer to the callable and one to
// a function that calls it. Valid only while the callable lives (parallel_for's duration).
class RangeFnRef {
 public:
  template <class F>
  explicit RangeFnRef(F& fn) noexcept
      : obj_(const_cast<void*>(static_cast<const void*>(std::addressof(fn)))),
        call_([](void* obj, int64_t b, int64_t e) { (*static_cast<F*>(obj))(b, e); }) {}
  void operator()(int64_t b, int64_t e) const { call_(obj_, b, e); }

 private:
  void* obj_;
  void (*call_)(void*, int64_t, int64_t);
};

// The same for a callable fn() (with_team's body).
class VoidFnRef {
 public:
  template <class F>
  explicit VoidFnRef(F& fn) noexcept
      : obj_(const_cast<void*>(static_cast<const void*>(std::addressof(fn)))),
        call_([](void* obj) { (*static_cast<F*>(obj))(); }) {}
  void operator()() const { call_(obj_); }

 private:
  void* obj_;
  void (*call_)(void*);
};

// How many ranges parallel_for cuts [0, n > 0) into: min(ceil(n / grain), threads), and 1 when
// called inside a parallel region (nested calls run inline) other than as a team's master.
int64_t parallel_chunks(int64_t n, int64_t grain);
// Calls fn on `chunks` ranges [n*c/chunks, n*(c+1)/chunks), one per thread (static schedule):
// range c on thread c of the team when the caller is with_team's master, else of a new OpenMP
// parallel region.
void parallel_run(int64_t n, int64_t chunks, RangeFnRef fn);
void with_team_run(VoidFnRef body);

}  // namespace detail

// Runs body() on this thread as the master of a team of num_threads() threads that stay ready
// (spinning) for the whole call: every parallel_for that body() makes on this thread hands its
// ranges to the team (two cache-line hand-offs, ~0.3-0.5 us here) instead of opening an OpenMP
// parallel region (~4 us on this machine's 2 vCPUs). The ranges and the thread each runs on are
// the same as without the team, so results are identical. Meant for a short run of many small
// parallel_for calls: a decode step (MambaLM::step opens one per token). Runs body() directly
// when nested in a parallel region or with one thread. An exception from body() is rethrown
// after the team has stopped; one thrown inside a parallel_for range terminates, as in an OpenMP
// region.
template <class F>
void with_team(F&& body) {
  detail::with_team_run(detail::VoidFnRef(body));
}

namespace detail {}  // namespace detail

// fn(begin, end) is called on disjoint ranges covering [0, n); each range has at least
// `grain` items (except the last). Runs inline when n <= grain or with one thread. The split
// depends only on n, grain and the thread count (deterministic). Cost over a plain call: two
// out-of-line calls, plus one indirect call per range when it runs in parallel.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  const int64_t chunks = detail::parallel_chunks(n, grain);
  if (chunks <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  detail::parallel_run(n, chunks, detail::RangeFnRef(fn));
}

// Dynamic schedule: fn(begin, end) on runs of `run` items of [0, n) (the last may be shorter),
// taken in order from a shared counter by min(ceil(n / grain), threads) threads (inline when
// that is 1), so a thread descheduled by another process does not hold the others up at the
// region's end. Which thread runs a range depends on timing: use it only where each range's
// result does not depend on the thread that computes it (no per-thread partial sums), so the
// values stay deterministic.
template <class F>
void parallel_for_dynamic(int64_t n, int64_t run, int64_t grain, F&& fn) {
  if (n <= 0) return;
  run = run < 1 ? 1 : run;
  const int64_t teams = detail::parallel_chunks(n, grain);
  std::atomic<int64_t> next{0};
  auto claim = [&](int64_t, int64_t) {
    for (int64_t b; (b = next.fetch_add(run, std::memory_order_relaxed)) < n;)
      fn(b, b + run < n ? b + run : n);
  };
  if (teams <= 1) {
    claim(0, 0);
    return;
  }
  detail::parallel_run(teams, teams, detail::RangeFnRef(claim));
}

}  // namespace mamba
