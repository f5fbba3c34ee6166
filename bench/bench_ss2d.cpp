// VMamba SS2D benchmark: the layer's forward and backward, and the 2-D cross scan alone, at
// VMamba-T's stage shapes (56x56x96, 28x28x192: vmamba_tiny_s1l8, forward_type v05_noz,
// channel-first, d_state 1, ssm_ratio 1, conv 3 without bias), in pixels/s, JSON lines.
// Baseline in the same run: VMamba's own cross-scan strategy (the four pixel orders
// materialised as copies, one 1-D selective scan over K*D channels, then the merge:
// ops::CrossScanImpl::Copy) against the strided kernel that reads the orders in place; both
// outputs are compared.
#include <cmath>

#include "bench_util.h"
#include "mamba/nn/ss2d.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "ops/cross_scan.h"

using namespace mamba;

namespace {
const char* kUsage =
    "bench_ss2d: VMamba SS2D forward/backward and the cross scan, strided vs copy, JSON lines\n"
    "  --batch 1 --threads 0 (0 = all cores) --reps 5 --d_state 1 --ssm_ratio_x10 10\n"
    "  --height 0 --width 0 --d_model 0 (0: both VMamba-T stage shapes 56x56x96, 28x28x192)\n";

double max_abs_diff(const Tensor& a, const Tensor& b) {
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, (double)std::fabs(a[i] - b[i]));
  return m;
}

void run_shape(int64_t B, int64_t H, int64_t W, int64_t C, int64_t N, double ratio, int reps) {
  SS2DConfig c;
  c.d_model = C;
  c.d_state = N;
  c.ssm_ratio = ratio;
  c.d_conv = 3;
  c.conv_bias = false;
  c.forward_type = "v05_noz";
  c.channel_first = true;
  SS2D layer(c, 1);
  Rng rng(2);
  Tensor x({B, C, H, W});
  rng.fill_normal(x);
  Tensor dy({B, C, H, W});
  rng.fill_normal(dy);
  const double pixels = static_cast<double>(B * H * W);
  char shape[128];
  std::snprintf(
      shape, sizeof shape,
      "\"B\":%lld,\"H\":%lld,\"W\":%lld,\"d_model\":%lld,\"d_inner\":%lld,\"d_state\":%lld,"
      "\"threads\":%d",
      (long long)B, (long long)H, (long long)W, (long long)C, (long long)c.d_inner(), (long long)N,
      num_threads());

  // ---- the layer, forward and forward + backward
  Tensor y[2], dx[2];
  double tf[2], tb[2];
  for (int i = 0; i < 2; ++i) {
    layer.set_scan_impl(i == 0 ? SS2DScan::copy : SS2DScan::strided);
    tf[i] = bench::median_seconds(reps, [&] { y[i] = layer.forward(x); });
    SS2DSaved saved;
    layer.forward(x, &saved);
    tb[i] = bench::median_seconds(reps, [&] {
      layer.params().zero_grad();
      dx[i] = layer.backward(saved, dy);
    });
  }
  for (int i = 0; i < 2; ++i)
    std::printf(
        "{\"bench\":\"ss2d_layer\",%s,\"scan\":\"%s\",\"fwd_ms\":%.3f,\"bwd_ms\":%.3f,"
        "\"fwd_pixels_per_s\":%.0f,\"fwd_bwd_pixels_per_s\":%.0f,\"fwd_speedup_vs_copy\":%.3f,"
        "\"bwd_speedup_vs_copy\":%.3f,\"max_abs_diff_y_vs_copy\":%.3g,"
        "\"max_abs_diff_dx_vs_copy\":%.3g}\n",
        shape, i == 0 ? "copy" : "strided", tf[i] * 1e3, tb[i] * 1e3, pixels / tf[i],
        pixels / (tf[i] + tb[i]), tf[0] / tf[i], tb[0] / tb[i], max_abs_diff(y[i], y[0]),
        max_abs_diff(dx[i], dx[0]));

  // ---- the cross scan alone (the layer's scan inputs)
  SS2DSaved s;
  layer.forward(x, &s);
  ops::CrossScanArgs a;
  a.u = s.u;
  a.delta = s.delta;
  a.x_dbl = s.x_dbl;
  Tensor A({4 * c.d_inner(), N});
  rng.fill_uniform(A, -1.5, -0.2);
  a.A = A;
  a.Ds = layer.params().get("Ds").value.f32();
  a.delta_bias = layer.params().get("dt_projs_bias").value.f32().reshape({4 * c.d_inner()});
  a.dt_rank = c.rank();
  Tensor dys({B, H, W, c.d_inner()});
  rng.fill_normal(dys);
  Tensor ys[2];
  ops::CrossScanGrads gs[2];
  double sf[2], sb[2];
  for (int i = 0; i < 2; ++i) {
    const auto impl = i == 0 ? ops::CrossScanImpl::Copy : ops::CrossScanImpl::Strided;
    sf[i] = bench::median_seconds(reps, [&] { ys[i] = ops::cross_scan_fwd(a, impl); });
    sb[i] = bench::median_seconds(reps, [&] { gs[i] = ops::cross_scan_bwd(a, dys, impl); });
  }
  // the copy path's extra buffers: xs, delta (B, L, K D) and B, C (B, L, K, N), fp32
  const double copy_bytes = 4.0 * static_cast<double>(B * H * W) * 4 * (2 * c.d_inner() + 2 * N);
  for (int i = 0; i < 2; ++i)
    std::printf(
        "{\"bench\":\"cross_scan\",%s,\"scan\":\"%s\",\"fwd_ms\":%.3f,\"bwd_ms\":%.3f,"
        "\"fwd_pixels_per_s\":%.0f,\"bwd_pixels_per_s\":%.0f,\"fwd_speedup_vs_copy\":%.3f,"
        "\"bwd_speedup_vs_copy\":%.3f,\"copy_extra_MiB\":%.1f,\"max_abs_diff_y_vs_copy\":%.3g,"
        "\"max_abs_diff_du_vs_copy\":%.3g}\n",
        shape, i == 0 ? "copy" : "strided", sf[i] * 1e3, sb[i] * 1e3, pixels / sf[i],
        pixels / sb[i], sf[0] / sf[i], sb[0] / sb[i], i == 0 ? copy_bytes / (1 << 20) : 0.0,
        max_abs_diff(ys[i], ys[0]), max_abs_diff(gs[i].du, gs[0].du));
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv, kUsage);
  const int threads = static_cast<int>(args.get("threads", 0));
  if (threads > 0) set_num_threads(threads);
  const int reps = static_cast<int>(args.get("reps", 5));
  const int64_t B = args.get("batch", 1), N = args.get("d_state", 1);
  const double ratio = static_cast<double>(args.get("ssm_ratio_x10", 10)) / 10.0;
  const int64_t H = args.get("height", 0), W = args.get("width", 0), C = args.get("d_model", 0);
  if (H > 0 && W > 0 && C > 0) {
    run_shape(B, H, W, C, N, ratio, reps);
  } else {
    run_shape(B, 56, 56, 96, N, ratio, reps);
    run_shape(B, 28, 28, 192, N, ratio, reps);
  }
  return 0;
}
