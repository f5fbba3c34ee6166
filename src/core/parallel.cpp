// parallel_for's OpenMP side: the only place in the library with an OpenMP pragma, so
// include/mamba/parallel.h stays free of OpenMP (OpenMP is linked PRIVATE).
#include "mamba/parallel.h"

#include <omp.h>

#include <algorithm>

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

int64_t parallel_chunks(int64_t n, int64_t grain) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, num_threads());
  if (chunks <= 1 || in_parallel()) return 1;
  return chunks;
}

void parallel_run(int64_t n, int64_t chunks, RangeFnRef fn) {
  const int threads = static_cast<int>(chunks);  // chunks <= num_threads()
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = n * c / chunks, e = n * (c + 1) / chunks;
    if (b < e) fn(b, e);
  }
}

}  // namespace detail
}  // namespace mamba
