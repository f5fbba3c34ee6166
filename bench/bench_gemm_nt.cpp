// The projections' prefill GEMM y = x W^T (ops/gemm_nt.h): our packed kernel against mamba::gemm
// (the BLAS) in the same run, at the mamba-130m / mamba2-130m projection shapes, for fp32 and
// bf16 weights (the BLAS path converts bf16 rows to fp32 first, as before the packed kernel).
// JSON lines on stdout: shape, ms and GFLOP/s of each, the ratio and max |diff|.
#include <algorithm>
#include <cmath>
#include <string>
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
    "  --rows 512 (M: prompt tokens)  --threads 0 (0 = all cores)  --reps 7\n"
    "  --copies 1 (weight copies the calls rotate through: 24 reads each W from memory, as a\n"
    "              24-layer model does, instead of from the cache)\n"
    "  --blas 1 (0: the packed kernel only)  --dtypes f32,bf16\n";

struct Shape3 {
  const char* name;
  int64_t N, K;
};
}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv, kUsage);
  const int64_t M = args.get("rows", 512);
  const int reps = static_cast<int>(args.get("reps", 7));
  const int64_t copies = std::max<long>(1, args.get("copies", 1));
  const bool blas = args.get("blas", 1) != 0;
  const std::string dtypes = "," + args.get_str("dtypes", "f32,bf16") + ",";
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
    for (WeightDType t : {WeightDType::f32, WeightDType::bf16, WeightDType::f16}) {
      if (dtypes.find("," + std::string(weight_dtype_name(t)) + ",") == std::string::npos) continue;
      Tensor x({M, s.K}), W({s.N, s.K});
      rng.fill_normal(x);
      rng.fill_normal(W, 0, 0.05);
      // `copies` copies of the weights (equal values), stored at t; call i reads copy i % copies.
      const int64_t NK = s.N * s.K;
      std::vector<float> wf32;
      std::vector<uint16_t> wh;
      std::vector<ops::WeightRows> rows;
      if (t == WeightDType::f32) {
        wf32.resize(static_cast<size_t>(copies * NK));
        for (int64_t c = 0; c < copies; ++c) std::copy_n(W.data(), NK, wf32.data() + c * NK);
        for (int64_t c = 0; c < copies; ++c)
          rows.push_back(ops::WeightRows{wf32.data() + c * NK, t, s.K});
      } else {
        wh.resize(static_cast<size_t>(copies * NK));
        to_half(W.data(), wh.data(), NK, t);
        for (int64_t c = 1; c < copies; ++c) std::copy_n(wh.data(), NK, wh.data() + c * NK);
        for (int64_t c = 0; c < copies; ++c)
          rows.push_back(ops::WeightRows{wh.data() + c * NK, t, s.K});
      }
      std::vector<float> y1(static_cast<size_t>(M * s.N)), y2(y1.size());
      int64_t call = 0;
      const double tp =
          bench::median_seconds(reps,
                                [&] {
                                  for (int64_t c = 0; c < copies; ++c, ++call)
                                    ops::gemm_nt_packed(x.data(), M, s.K, rows[call % copies], s.N,
                                                        s.K, y1.data(), s.N, false);
                                }) /
          static_cast<double>(copies);
      // The BLAS: fp32 weights directly; 16-bit ones converted to fp32 scratch first (what the
      // 16-bit prefill did before the packed kernel).
      Tensor wf({s.N, s.K});
      double tb = 0, md = 0;
      if (blas) {
        call = 0;
        tb =
            bench::median_seconds(
                reps,
                [&] {
                  for (int64_t c = 0; c < copies; ++c, ++call) {
                    const float* w = static_cast<const float*>(rows[call % copies].data);
                    if (t != WeightDType::f32) {
                      from_half(static_cast<const uint16_t*>(rows[call % copies].data), wf.data(),
                                NK, t);
                      w = wf.data();
                    }
                    gemm(false, true, M, s.N, s.K, 1.f, x.data(), s.K, w, s.K, 0.f, y2.data(), s.N);
                  }
                }) /
            static_cast<double>(copies);
        for (size_t i = 0; i < y1.size(); ++i) md = std::max(md, (double)std::fabs(y1[i] - y2[i]));
      }
      const double gf = 2.0 * M * s.N * s.K * 1e-9;
      std::printf(
          "{\"bench\":\"gemm_nt\",\"shape\":\"%s\",\"M\":%lld,\"N\":%lld,\"K\":%lld,\"weights\":\"%"
          "s\",\"copies\":%lld,"
          "\"threads\":%d,\"packed_ms\":%.3f,\"packed_gflops\":%.1f,\"blas_ms\":%.3f,"
          "\"blas_gflops\":%.1f,\"packed_speedup\":%.2f,\"max_abs_diff\":%.2e,\"packed_active\":%s}"
          "\n",
          s.name, (long long)M, (long long)s.N, (long long)s.K, weight_dtype_name(t),
          (long long)copies, num_threads(), tp * 1e3, gf / tp, tb * 1e3, blas ? gf / tb : 0.0,
          blas ? tb / tp : 0.0, md, ops::gemm_nt_packed_active() ? "true" : "false");
      std::fflush(stdout);
    }
  return 0;
}
