// Mamba-3 benchmark, JSON lines: one Mamba-3 layer (SISO or MIMO) next to a Mamba-2 layer of the
// same d_model, d_state and headdim, measured in the same run: forward, forward+backward, decode
// step; and the scan alone, the chunked fp32 kernel against the sequential double reference (the
// baseline), with their max difference; the scan's fp32 backward against the double reference;
// the decode-step kernel against the chunked forward over one token.
#include <cmath>

#include "bench_util.h"
#include "mamba/nn/mamba2.h"
#include "mamba/nn/mamba3.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "ops/mamba3_scan.h"

using namespace mamba;

namespace {
const char* kUsage =
    "bench_mamba3: Mamba-3 vs Mamba-2 layer (forward, forward+backward, step) and the Mamba-3\n"
    "scan (chunked vs sequential reference), JSON lines on stdout\n"
    "  --d_model 256 --d_state 64 --headdim 64 --mimo 0 --rank 4 --chunk 64 --batch 1\n"
    "  --seqlen 512 --threads 0 (0 = all cores) --reps 3 --steps 64 --backward 1\n";

template <class Layer>
void bench_layer(const char* name, Layer& layer, const Tensor& x, const char* shape, int reps,
                 int steps, bool backward) {
  const int64_t B = x.dim(0), L = x.dim(1), dm = x.dim(2);
  const double tokens = static_cast<double>(B * L);
  const int threads = num_threads();
  const double t_fwd = bench::median_seconds(reps, [&] { layer.forward(x); });
  std::printf(
      "{\"bench\":\"mamba3\",\"layer\":\"%s\",\"pass\":\"forward\",\"shape\":%s,\"threads\":%d,"
      "\"ms\":%.3f,\"tokens_per_s\":%.1f}\n",
      name, shape, threads, t_fwd * 1e3, tokens / t_fwd);
  std::fflush(stdout);
  if (backward) {
    Tensor dy(x.shape());
    Rng rng(2);
    rng.fill_normal(dy);
    const double t_fb = bench::median_seconds(reps, [&] {
      typename Layer::Saved saved;
      layer.forward(x, &saved);
      layer.backward(saved, dy);
    });
    std::printf(
        "{\"bench\":\"mamba3\",\"layer\":\"%s\",\"pass\":\"forward+backward\",\"shape\":%s,"
        "\"threads\":%d,\"ms\":%.3f,\"tokens_per_s\":%.1f}\n",
        name, shape, threads, t_fb * 1e3, tokens / t_fb);
    std::fflush(stdout);
  }
  auto st = layer.new_state(B);
  Tensor xt({B, dm});
  Rng rng(3);
  rng.fill_normal(xt);
  const double t_step = bench::median_seconds(reps, [&] {
    for (int i = 0; i < steps; ++i) layer.step(xt, st);
  });
  std::printf(
      "{\"bench\":\"mamba3\",\"layer\":\"%s\",\"pass\":\"step\",\"shape\":%s,\"threads\":%d,"
      "\"us_per_token\":%.2f,\"tokens_per_s\":%.1f}\n",
      name, shape, threads, t_step / steps * 1e6, B * steps / t_step);
  std::fflush(stdout);
}
}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv, kUsage);
  const int64_t dm = args.get("d_model", 256), N = args.get("d_state", 64),
                P = args.get("headdim", 64), B = args.get("batch", 1), L = args.get("seqlen", 512);
  const bool mimo = args.get("mimo", 0) != 0;
  const int reps = static_cast<int>(args.get("reps", 3));
  const int steps = static_cast<int>(args.get("steps", 64));
  const bool backward = args.get("backward", 1) != 0;
  set_num_threads(static_cast<int>(args.get("threads", 0)));

  Mamba3Config c3;
  c3.d_model = dm, c3.d_state = N, c3.headdim = P, c3.is_mimo = mimo;
  c3.mimo_rank = args.get("rank", 4), c3.chunk_size = args.get("chunk", 64);
  Mamba2Config c2;
  c2.d_model = dm, c2.d_state = N, c2.headdim = P;
  Mamba3 m3(c3, 0);
  Mamba2 m2(c2, 0);
  Tensor x({B, L, dm});
  Rng rng(1);
  rng.fill_normal(x);
  char shape[200];
  std::snprintf(shape, sizeof shape,
                "{\"d_model\":%lld,\"N\":%lld,\"P\":%lld,\"H\":%lld,\"mimo_rank\":%lld,"
                "\"chunk\":%lld,\"B\":%lld,\"L\":%lld}",
                (long long)dm, (long long)N, (long long)P, (long long)c3.nheads(),
                (long long)c3.rank(), (long long)c3.chunk_size, (long long)B, (long long)L);
  bench_layer("Mamba2", m2, x, shape, reps, steps, backward);
  bench_layer(mimo ? "Mamba3-MIMO" : "Mamba3", m3, x, shape, reps, steps, backward);

  // The scan alone: chunked fp32 vs the sequential double reference (the baseline).
  const int64_t H = c3.nheads(), R = c3.rank(), S = c3.num_rope_angles();
  ops::Mamba3ScanArgs a;
  a.Q = Tensor({B, L, R, 1, N}), a.K = Tensor({B, L, R, 1, N}), a.V = Tensor({B, L, H, P});
  for (Tensor* t : {&a.Q, &a.K, &a.V}) rng.fill_normal(*t);
  a.DT = Tensor({B, L, H}), a.ADT = Tensor({B, L, H}), a.Trap = Tensor({B, L, H});
  rng.fill_uniform(a.DT, 0.01, 0.2);
  rng.fill_uniform(a.ADT, -0.3, -0.001);
  rng.fill_normal(a.Trap);
  a.Q_bias = Tensor::zeros({H, R, N}), a.K_bias = Tensor::zeros({H, R, N});
  a.Angles = Tensor({B, L, S});
  rng.fill_normal(a.Angles);
  a.D = Tensor::zeros({H});
  a.Z = Tensor({B, L, H, P});
  rng.fill_normal(a.Z);
  if (mimo) {
    a.mimo_x = Tensor({H, R, P}), a.mimo_z = Tensor({H, R, P}), a.mimo_o = Tensor({H, R, P});
    for (Tensor* t : {&a.mimo_x, &a.mimo_z, &a.mimo_o}) rng.fill_uniform(*t, 0.1, 0.5);
  }
  a.rotate_pairwise = !mimo;
  Tensor yf, yr;
  const double t_f =
      bench::median_seconds(reps, [&] { yf = ops::mamba3_scan_fwd(a, c3.chunk_size); });
  const double t_r = bench::median_seconds(1, [&] { yr = ops::mamba3_scan_ref(a); });
  double md = 0;
  for (int64_t i = 0; i < yf.numel(); ++i) md = std::max(md, (double)std::fabs(yf[i] - yr[i]));
  std::printf(
      "{\"bench\":\"mamba3_scan\",\"shape\":%s,\"threads\":%d,\"chunked_ms\":%.3f,"
      "\"reference_ms\":%.3f,\"chunked_speedup\":%.1f,\"max_abs_diff\":%.3g}\n",
      shape, num_threads(), t_f * 1e3, t_r * 1e3, t_r / t_f, md);
  std::fflush(stdout);

  // The scan's backward: the chunked fp32 backward (the layer's) and the token-by-token fp32
  // recurrence (mamba3_scan_bwd_seq, the path before it) vs the double reference.
  if (backward) {
    Tensor g({B, L, H, P});
    rng.fill_normal(g);
    ops::Mamba3ScanGrads gf, gs, gr;
    const double t_bf =
        bench::median_seconds(reps, [&] { gf = ops::mamba3_scan_bwd(a, g, c3.chunk_size); });
    const double t_bs = bench::median_seconds(reps, [&] { gs = ops::mamba3_scan_bwd_seq(a, g); });
    const double t_br = bench::median_seconds(1, [&] { gr = ops::mamba3_scan_bwd_ref(a, g); });
    double mg = 0, mref = 0;
    for (int64_t i = 0; i < gf.dV.numel(); ++i) {
      mg = std::max(mg, (double)std::fabs(gf.dV[i] - gr.dV[i]));
      mref = std::max(mref, (double)std::fabs(gr.dV[i]));
    }
    std::printf(
        "{\"bench\":\"mamba3_scan_bwd\",\"shape\":%s,\"threads\":%d,\"chunked_ms\":%.3f,"
        "\"recurrence_ms\":%.3f,\"reference_ms\":%.3f,\"speedup_vs_recurrence\":%.2f,"
        "\"max_abs_diff_dV\":%.3g,\"max_abs_dV\":%.3g}\n",
        shape, num_threads(), t_bf * 1e3, t_bs * 1e3, t_br * 1e3, t_bs / t_bf, mg, mref);
    std::fflush(stdout);
  }

  // The decode step: the dedicated kernel vs the chunked forward over one token (the path the
  // layer's step took before), same states.
  {
    auto token0 = [&](const Tensor& x) {
      Shape s = x.shape();
      const int64_t inner = x.numel() / (s[0] * s[1]);
      s[1] = 1;
      Tensor o = Tensor::empty(s);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t i = 0; i < inner; ++i) o[b * inner + i] = x[b * L * inner + i];
      return o;
    };
    ops::Mamba3ScanArgs one = a;
    for (Tensor* t : {&one.Q, &one.K, &one.V, &one.ADT, &one.DT, &one.Trap, &one.Angles, &one.Z})
      *t = token0(*t);
    one.initial.angle = Tensor::zeros({B, H, S}), one.initial.ssm = Tensor({B, H, P, N});
    rng.fill_normal(one.initial.ssm);
    one.initial.k = Tensor({B, R, H, N}), one.initial.v = Tensor({B, H, P});
    rng.fill_normal(one.initial.k);
    rng.fill_normal(one.initial.v);
    ops::Mamba3States s1, s2;
    Tensor y1, y2;
    const int n = 200;
    const double t_k = bench::median_seconds(reps, [&] {
      for (int i = 0; i < n; ++i) y1 = ops::mamba3_scan_step(one, s1);
    });
    const double t_c = bench::median_seconds(reps, [&] {
      for (int i = 0; i < n; ++i) y2 = ops::mamba3_scan_fwd(one, c3.chunk_size, &s2);
    });
    double ms = 0;
    for (int64_t i = 0; i < y1.numel(); ++i) ms = std::max(ms, (double)std::fabs(y1[i] - y2[i]));
    std::printf(
        "{\"bench\":\"mamba3_scan_step\",\"shape\":%s,\"threads\":%d,\"step_us\":%.2f,"
        "\"chunked_one_token_us\":%.2f,\"speedup\":%.1f,\"max_abs_diff\":%.3g}\n",
        shape, num_threads(), t_k / n * 1e6, t_c / n * 1e6, t_c / t_k, ms);
  }
  return 0;
}
