// parallel_for over the machine's cores. OpenMP is an implementation detail of the library
// (src/core/parallel.cpp): this header needs no OpenMP flags, so code that includes it (a
// consumer of the installed library, a Python module) compiles without -fopenmp. The BLAS
// shares the same pool: with the OpenMP flavour of OpenBLAS a GEMM called inside a parallel
// region runs single-threaded, and one called outside uses the same threads, so the two never
// oversubscribe.
#pragma once
#include <algorithm>  // kept: code that includes this header has relied on it
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

// How many ranges parallel_for cuts [0, n > 0) into: min(ceil(n / grain), threads), and 1 when
// called inside a parallel region (nested calls run inline).
int64_t parallel_chunks(int64_t n, int64_t grain);
// Calls fn on `chunks` ranges [n*c/chunks, n*(c+1)/chunks), one per thread (static schedule).
void parallel_run(int64_t n, int64_t chunks, RangeFnRef fn);

}  // namespace detail

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

}  // namespace mamba
