// mambacpp info: what this build uses (BLAS, threads, SIMD target); with --measure, the
// machine's fp32 FMA peak and memory read bandwidth (the bounds of docs/PERFORMANCE.md).
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "core/gemm.h"
#include "core/roofline.h"
#include "mamba/parallel.h"
#include "ops/gemm_nt.h"
#include "ops/simd.h"

namespace mamba::cli {

Command add_info(CLI::App& app) {
  struct Opts {
    bool measure = false, json = false;
    int threads = 0;
    int64_t mib = 512;
  };
  auto o = std::make_shared<Opts>();
  auto* sub = app.add_subcommand(
      "info",
      "Print the build's GEMM, SIMD target and thread count (--measure: the machine's "
      "fp32 FMA peak and memory read bandwidth)");
  sub->add_flag("--measure", o->measure,
                "also measure the fp32 FMA peak (GFLOP/s, register-only FMA chains on every "
                "thread) and the read bandwidth (GB/s, summing a --mib buffer); ~2 s");
  sub->add_option("--threads", o->threads, "threads (0 = all cores)")->capture_default_str();
  sub->add_option("--mib", o->mib, "--measure: size of the buffer read (MiB; far above the caches)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{16}, int64_t{1} << 16));
  sub->add_flag("--json", o->json, "one JSON object instead of text");
  return {sub, [o] {
            set_num_threads(o->threads);
            const char* gemm_nt = ops::gemm_nt_packed_active()
                                      ? "packed AVX-512 kernel (MAMBA_GEMM=blas to use the GEMM)"
                                      : "the GEMM";
            double gflops = 0, gbs = 0;
            if (o->measure) {
              gflops = measure_fma_gflops();
              gbs = measure_read_gbs(o->mib);
            }
            if (o->json) {
              std::printf(
                  "{\"version\":\"0.1.0\",\"blas\":\"%s\",\"prefill_gemm\":\"%s\",\"simd\":\"%s\","
                  "\"threads\":%d",
                  blas_name(), ops::gemm_nt_packed_active() ? "packed" : "blas", simd_target_name(),
                  num_threads());
              if (o->measure)
                std::printf(",\"fma_gflops\":%.1f,\"read_gbs\":%.2f,\"read_mib\":%lld", gflops, gbs,
                            (long long)o->mib);
              std::printf("}\n");
              return 0;
            }
            std::printf("mamba.cpp 0.1.0\nGEMM: %s\nprefill x W^T: %s\nSIMD: %s\nthreads: %d\n",
                        blas_name(), gemm_nt, simd_target_name(), num_threads());
            if (o->measure)
              std::printf("fp32 FMA peak: %.1f GFLOP/s\nread bandwidth: %.2f GB/s (%lld MiB)\n",
                          gflops, gbs, (long long)o->mib);
            return 0;
          }};
}

}  // namespace mamba::cli
