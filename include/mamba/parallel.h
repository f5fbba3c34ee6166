// parallel_for over the machine's cores (OpenMP). The BLAS shares the same pool: with the
// OpenMP flavour of OpenBLAS a GEMM called inside a parallel region runs single-threaded,
// and one called outside uses the same threads, so the two never oversubscribe.
#pragma once
#include <algorithm>
#include <cstdint>

namespace mamba {

int num_threads();            // threads parallel_for uses
void set_num_threads(int n);  // also sets the BLAS threads; n <= 0 means all cores
bool in_parallel();

// fn(begin, end) is called on disjoint ranges covering [0, n); each range has at least
// `grain` items (except the last). Runs inline when n <= grain or with one thread.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, num_threads());
  if (chunks <= 1 || in_parallel()) {
    fn(int64_t{0}, n);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(chunks))
  for (int64_t c = 0; c < chunks; ++c) {
    int64_t b = n * c / chunks, e = n * (c + 1) / chunks;
    if (b < e) fn(b, e);
  }
}

}  // namespace mamba
