// Mamba-1 layer benchmark: forward, backward and decode step of one layer, as JSON lines.
// Baseline in the same run: the same forward composed from the naive reference ops
// (linear_ref, causal_conv1d_ref, selective_scan_ref), whose output is also compared.
#include <cmath>

#include "bench_util.h"
#include "mamba/nn/mamba1.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "ops/conv1d.h"
#include "ops/linear.h"
#include "ops/selective_scan.h"

using namespace mamba;

namespace {
const char* kUsage =
    "bench_mamba1_layer: one Mamba-1 layer, forward/backward/step, JSON lines on stdout\n"
    "  --d_model 768 --d_state 16 --batch 1 --seqlen 2048 --threads 0 (0 = all cores)\n"
    "  --reps 5 --ref 1 (0 skips the naive reference baseline) --steps 256\n";

// The layer forward written with the naive reference ops only (the readable spec).
Tensor reference_forward(Mamba1& m, const Tensor& hidden) {
  const auto& c = m.config();
  const int64_t B = hidden.dim(0), L = hidden.dim(1), D = c.d_inner(), N = c.d_state, R = c.rank();
  auto& p = m.params();
  Tensor xz =
      ops::linear_ref(hidden, p.get("in_proj.weight").value.to_f32(),
                      p.has("in_proj.bias") ? p.get("in_proj.bias").value.to_f32() : Tensor());
  Tensor x({B, L, D}), z({B, L, D});
  for (int64_t r = 0; r < B * L; ++r)
    for (int64_t d = 0; d < D; ++d)
      x[r * D + d] = xz[r * 2 * D + d], z[r * D + d] = xz[r * 2 * D + D + d];
  Tensor xc = ops::causal_conv1d_ref(
      x, p.get("conv1d.weight").value.f32().reshape({D, c.d_conv}),
      p.has("conv1d.bias") ? p.get("conv1d.bias").value.f32() : Tensor(), true);
  Tensor dbl =
      ops::linear_ref(xc, p.get("x_proj.weight").value.to_f32(), Tensor());  // (B, L, R+2N)
  Tensor dtr({B, L, R}), Bm({B, L, N}), Cm({B, L, N});
  for (int64_t r = 0; r < B * L; ++r) {
    for (int64_t i = 0; i < R; ++i) dtr[r * R + i] = dbl[r * (R + 2 * N) + i];
    for (int64_t n = 0; n < N; ++n) {
      Bm[r * N + n] = dbl[r * (R + 2 * N) + R + n];
      Cm[r * N + n] = dbl[r * (R + 2 * N) + R + N + n];
    }
  }
  Tensor dt = ops::linear_ref(dtr, p.get("dt_proj.weight").value.to_f32(), Tensor());
  Tensor A = p.get("A_log").value.to_f32().clone();
  for (int64_t i = 0; i < A.numel(); ++i) A[i] = -std::exp(A[i]);
  ops::ScanArgs s;
  s.u = xc, s.delta = dt, s.A = A, s.B = Bm, s.C = Cm, s.D = p.get("D").value.to_f32(), s.z = z;
  s.delta_bias = p.get("dt_proj.bias").value.to_f32(), s.delta_softplus = true;
  Tensor y = ops::selective_scan_ref(s);
  return ops::linear_ref(y, p.get("out_proj.weight").value.to_f32(),
                         p.has("out_proj.bias") ? p.get("out_proj.bias").value.to_f32() : Tensor());
}
}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv, kUsage);
  Mamba1Config cfg;
  cfg.d_model = args.get("d_model", 768);
  cfg.d_state = args.get("d_state", 16);
  const int64_t B = args.get("batch", 1), L = args.get("seqlen", 2048);
  const int reps = static_cast<int>(args.get("reps", 5));
  const int steps = static_cast<int>(args.get("steps", 256));
  set_num_threads(static_cast<int>(args.get("threads", 0)));
  const int threads = num_threads();

  Mamba1 layer(cfg, 0);
  Rng rng(1);
  Tensor x({B, L, cfg.d_model});
  rng.fill_normal(x);
  const double tokens = static_cast<double>(B * L);
  char shape[160];
  std::snprintf(shape, sizeof shape,
                "{\"d_model\":%lld,\"D\":%lld,\"N\":%lld,\"B\":%lld,\"L\":%lld}",
                (long long)cfg.d_model, (long long)cfg.d_inner(), (long long)cfg.d_state,
                (long long)B, (long long)L);

  Tensor y;
  double t_fwd = bench::median_seconds(reps, [&] { y = layer.forward(x); });
  std::printf(
      "{\"bench\":\"mamba1_layer\",\"pass\":\"forward\",\"impl\":\"fast\",\"shape\":%s,"
      "\"threads\":%d,\"ms\":%.3f,\"tokens_per_s\":%.1f}\n",
      shape, threads, t_fwd * 1e3, tokens / t_fwd);
  std::fflush(stdout);
  if (args.get("ref", 1)) {
    Tensor yr;
    double t_ref = bench::median_seconds(1, [&] { yr = reference_forward(layer, x); });
    double maxdiff = 0;
    for (int64_t i = 0; i < y.numel(); ++i)
      maxdiff = std::max(maxdiff, (double)std::fabs(y[i] - yr[i]));
    std::printf(
        "{\"bench\":\"mamba1_layer\",\"pass\":\"forward\",\"impl\":\"naive_ref\",\"shape\":%s,"
        "\"threads\":%d,\"ms\":%.3f,\"tokens_per_s\":%.1f,\"fast_speedup\":%.1f,"
        "\"max_abs_diff_vs_fast\":%.3g}\n",
        shape, threads, t_ref * 1e3, tokens / t_ref, t_ref / t_fwd, maxdiff);
    std::fflush(stdout);
  }
  Tensor dy({B, L, cfg.d_model});
  rng.fill_normal(dy);
  double t_fb = bench::median_seconds(reps, [&] {
    Mamba1Saved saved;
    layer.forward(x, &saved);
    layer.backward(saved, dy);
  });
  std::printf(
      "{\"bench\":\"mamba1_layer\",\"pass\":\"forward+backward\",\"impl\":\"fast\",\"shape\":%s,"
      "\"threads\":%d,\"ms\":%.3f,\"tokens_per_s\":%.1f}\n",
      shape, threads, t_fb * 1e3, tokens / t_fb);
  std::fflush(stdout);
  Mamba1State st = layer.new_state(B);
  Tensor xt({B, cfg.d_model});
  rng.fill_normal(xt);
  double t_step = bench::median_seconds(reps, [&] {
    for (int i = 0; i < steps; ++i) layer.step(xt, st);
  });
  std::printf(
      "{\"bench\":\"mamba1_layer\",\"pass\":\"step\",\"impl\":\"fast\",\"shape\":%s,"
      "\"threads\":%d,\"us_per_token\":%.2f,\"tokens_per_s\":%.1f}\n",
      shape, threads, t_step / steps * 1e6, B * steps / t_step);
  return 0;
}
