#include "mamba/parallel.h"

#include <omp.h>

#include "mamba/gemm.h"

namespace mamba {

int num_threads() { return omp_get_max_threads(); }
bool in_parallel() { return omp_in_parallel() != 0; }

void set_num_threads(int n) {
  if (n <= 0) n = omp_get_num_procs();
  omp_set_num_threads(n);
  detail::set_blas_threads(n);
}

}  // namespace mamba
