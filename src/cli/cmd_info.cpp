// mambacpp info: what this build uses (BLAS, threads, SIMD target).
#include <cstdio>

#include "cli/commands.h"
#include "core/gemm.h"
#include "mamba/parallel.h"
#include "ops/gemm_nt.h"
#include "ops/simd.h"

namespace mamba::cli {

Command add_info(CLI::App& app) {
  auto* sub = app.add_subcommand("info", "Print the build's GEMM, SIMD target and thread count");
  return {sub, [] {
            std::printf("mamba.cpp 0.1.0\nGEMM: %s\nprefill x W^T: %s\nSIMD: %s\nthreads: %d\n",
                        blas_name(),
                        ops::gemm_nt_packed_active()
                            ? "packed AVX-512 kernel (MAMBA_GEMM=blas to use the GEMM)"
                            : "the GEMM",
                        simd_target_name(), num_threads());
            return 0;
          }};
}

}  // namespace mamba::cli
