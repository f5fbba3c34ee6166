// BiMamba (Vim's bidirectional Mamba) benchmark, JSON lines: the layer's forward and
// forward+backward, and its reversed direction (conv + scan) two ways in the same run: in place
// through the ops' reverse flag (what the layer does) and through flipped copies of x and z with
// the forward ops and a flip of the output back (what Vim's code does with xz.flip), with their
// max difference.
#include <cmath>

#include "bench_util.h"
#include "mamba/nn/bimamba.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "ops/conv1d.h"
#include "ops/selective_scan.h"

using namespace mamba;

namespace {
const char* kUsage =
    "bench_bimamba: Vim's bidirectional Mamba, JSON lines on stdout\n"
    "  --d_model 384 --d_state 16 --batch 1 --seqlen 197 --threads 0 (0 = all cores) --reps 5\n"
    "  (defaults: Vim-S width, 14x14 patches + class token)\n";

// (B, L, D) with time reversed (a copy).
Tensor flip_time(const Tensor& t) {
  const int64_t B = t.dim(0), L = t.dim(1), D = t.dim(2);
  Tensor o(t.shape());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < L; ++s)
      std::copy_n(t.data() + (b * L + L - 1 - s) * D, D, o.data() + (b * L + s) * D);
  return o;
}
}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv, kUsage);
  BiMambaConfig cfg;
  cfg.d_model = args.get("d_model", 384);
  cfg.d_state = args.get("d_state", 16);
  cfg.if_divide_out = true;
  const int64_t B = args.get("batch", 1), L = args.get("seqlen", 197);
  const int reps = static_cast<int>(args.get("reps", 5));
  set_num_threads(static_cast<int>(args.get("threads", 0)));
  const int threads = num_threads();
  BiMamba layer(cfg, 0);
  Rng rng(1);
  Tensor x({B, L, cfg.d_model}), dy({B, L, cfg.d_model});
  rng.fill_normal(x);
  rng.fill_normal(dy);
  const double tokens = static_cast<double>(B * L);
  char shape[160];
  std::snprintf(shape, sizeof shape,
                "{\"d_model\":%lld,\"D\":%lld,\"N\":%lld,\"B\":%lld,\"L\":%lld}",
                (long long)cfg.d_model, (long long)cfg.d_inner(), (long long)cfg.d_state,
                (long long)B, (long long)L);
  const double t_f = bench::median_seconds(reps, [&] { layer.forward(x); });
  const double t_fb = bench::median_seconds(reps, [&] {
    BiMambaSaved s;
    layer.forward(x, &s);
    layer.backward(s, dy);
  });
  std::printf(
      "{\"bench\":\"bimamba\",\"pass\":\"forward\",\"shape\":%s,\"threads\":%d,\"ms\":%.3f,"
      "\"tokens_per_s\":%.1f}\n{\"bench\":\"bimamba\",\"pass\":\"forward+backward\",\"shape\":%s,"
      "\"threads\":%d,\"ms\":%.3f,\"tokens_per_s\":%.1f}\n",
      shape, threads, t_f * 1e3, tokens / t_f, shape, threads, t_fb * 1e3, tokens / t_fb);
  std::fflush(stdout);

  // The reversed direction's conv + scan, in place vs through flipped copies.
  const int64_t D = cfg.d_inner(), N = cfg.d_state, K = cfg.d_conv;
  Tensor xi({B, L, D}), z({B, L, D}), delta({B, L, D}), Bm({B, L, N}), Cm({B, L, N});
  for (Tensor* t : {&xi, &z, &Bm, &Cm}) rng.fill_normal(*t);
  rng.fill_uniform(delta, -3.0, -1.0);
  Tensor w({D, K}), A({D, N}), Dv({D}), bias({D});
  rng.fill_normal(w, 0, 0.3);
  rng.fill_uniform(A, -4.0, -0.5);
  rng.fill_normal(Dv);
  rng.fill_normal(bias);
  auto run = [&](bool in_place) {
    ops::ScanArgs a;
    a.A = A, a.D = Dv, a.delta_bias = bias, a.delta_softplus = true;
    if (in_place) {
      a.u = ops::causal_conv1d_fwd(xi, w, Tensor(), true, true);
      a.delta = delta, a.B = Bm, a.C = Cm, a.z = z, a.reverse = true;
      return ops::selective_scan_fwd(a);
    }
    a.u = ops::causal_conv1d_fwd(flip_time(xi), w, Tensor(), true);
    a.delta = flip_time(delta), a.B = flip_time(Bm), a.C = flip_time(Cm), a.z = flip_time(z);
    return flip_time(ops::selective_scan_fwd(a));
  };
  Tensor y_in, y_cp;
  const double t_in = bench::median_seconds(reps, [&] { y_in = run(true); });
  const double t_cp = bench::median_seconds(reps, [&] { y_cp = run(false); });
  double md = 0;
  for (int64_t i = 0; i < y_in.numel(); ++i)
    md = std::max(md, (double)std::fabs(y_in[i] - y_cp[i]));
  std::printf(
      "{\"bench\":\"bimamba_reverse_direction\",\"shape\":%s,\"threads\":%d,\"in_place_ms\":%.3f,"
      "\"flipped_copies_ms\":%.3f,\"copies_over_in_place\":%.2f,\"max_abs_diff\":%.3g}\n",
      shape, threads, t_in * 1e3, t_cp * 1e3, t_cp / t_in, md);
  return 0;
}
