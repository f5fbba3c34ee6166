// The projections' prefill GEMM y = x W^T (ops/gemm_nt.h): our packed kernel against mamba::gemm
// (the BLAS) in the same run, at the mamba-130m / mamba2-130m projection shapes, for fp32 and
// bf16 weights (the BLAS path converts bf16 rows to fp32 first, as before the packed kernel).
// JSON lines on stdout: shape, ms and GFLOP/s of each, the ratio and max |diff|.
#include <cmath>
#include <vector>

#include "bench_util.h"
#include "core/gemm.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/tensor.h"
#include "ops/gemm_nt.h"

using namespace mamba;

namespace {
const char* kUsage =
    "bench_gemm_nt: y = x W^T, packed kernel vs the BLAS, at the 130m projection shapes; JSON "
    "lines\n"
    "  --rows 512 (M: prompt tokens)  --threads 0 (0 = all cores)  --reps 7\n";

struct Shape3 {
  const char* name;
  int64_t N, K;
};
}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv, kUsage);
  const int64_t M = args.get("rows", 512);
  const int reps = static_cast<int>(args.get("reps", 7));
  set_num_threads(static_cast<int>(args.get("threads", 0)));
  const Shape3 shapes[] = {{"mamba1.in_proj", 3072, 768},
                           {"mamba2.in_proj", 3352, 768},
                           {"out_proj", 768, 1536},
                           {"mamba1.x_proj", 80, 1536},
                           {"mamba1.dt_proj", 1536, 48}};
  Rng rng(1);
  {  // untimed warm-up of both paths (first-touch of the kernels' buffers, clock ramp-up): the
     // first measured line was otherwise slow for whichever kernel ran first
    Tensor x({M, 768}), W({3072, 768});
    std::vector<float> y(static_cast<size_t>(M * 3072));
    for (int i = 0; i < 3; ++i) {
      ops::gemm_nt_packed(x.data(), M, 768, ops::WeightRows{W.data(), WeightDType::f32, 768}, 3072,
                          768, y.data(), 3072, false);
      gemm(false, true, M, 3072, 768, 1.f, x.data(), 768, W.data(), 768, 0.f, y.data(), 3072);
    }
  }
  for (const Shape3& s : shapes)
    for (WeightDType t : {WeightDType::f32, WeightDType::bf16}) {
      Tensor x({M, s.K}), W({s.N, s.K});
      rng.fill_normal(x);
      rng.fill_normal(W, 0, 0.05);
      std::vector<uint16_t> wh;
      ops::WeightRows rows{W.data(), WeightDType::f32, s.K};
      if (t != WeightDType::f32) {
        wh.resize(static_cast<size_t>(s.N * s.K));
        to_half(W.data(), wh.data(), s.N * s.K, t);
        rows = ops::WeightRows{wh.data(), t, s.K};
      }
      std::vector<float> y1(static_cast<size_t>(M * s.N)), y2(y1.size());
      const double tp = bench::median_seconds(reps, [&] {
        ops::gemm_nt_packed(x.data(), M, s.K, rows, s.N, s.K, y1.data(), s.N, false);
      });
      // The BLAS: fp32 weights directly; 16-bit ones converted to fp32 scratch first (what the
      // 16-bit prefill did before the packed kernel).
      Tensor wf({s.N, s.K});
      const double tb = bench::median_seconds(reps, [&] {
        const float* w = W.data();
        if (t != WeightDType::f32) {
          from_half(wh.data(), wf.data(), s.N * s.K, t);
          w = wf.data();
        }
        gemm(false, true, M, s.N, s.K, 1.f, x.data(), s.K, w, s.K, 0.f, y2.data(), s.N);
      });
      double md = 0;
      for (size_t i = 0; i < y1.size(); ++i) md = std::max(md, (double)std::fabs(y1[i] - y2[i]));
      const double gf = 2.0 * M * s.N * s.K * 1e-9;
      std::printf(
          "{\"bench\":\"gemm_nt\",\"shape\":\"%s\",\"M\":%lld,\"N\":%lld,\"K\":%lld,\"weights\":\"%"
          "s\","
          "\"threads\":%d,\"packed_ms\":%.3f,\"packed_gflops\":%.1f,\"blas_ms\":%.3f,"
          "\"blas_gflops\":%.1f,\"packed_speedup\":%.2f,\"max_abs_diff\":%.2e,\"packed_active\":%s}"
          "\n",
          s.name, (long long)M, (long long)s.N, (long long)s.K, weight_dtype_name(t), num_threads(),
          tp * 1e3, gf / tp, tb * 1e3, gf / tb, tb / tp, md,
          ops::gemm_nt_packed_active() ? "true" : "false");
      std::fflush(stdout);
    }
  return 0;
}
