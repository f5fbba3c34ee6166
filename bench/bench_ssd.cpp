// SSD (Mamba-2 scan) benchmark, JSON lines on stdout:
//   1. forward at the mamba2-130m layer shape (B=1, H=24, P=64, N=128, G=1, L=2048):
//      chunked vs the plain fp32 sequential kernel vs the double reference (with max |diff|);
//   2. backward: chunked vs the double reference backward;
//   3. the chunked cost at L = 512, 2048, 8192 (forward and backward), to show linear growth;
//   3b. a chunk-size sweep (32 .. 256) at L;
//   4. the Mamba-2 layer (d_model 768) forward, forward+backward and decode step.
#include <cmath>
#include <string>

#include "bench_util.h"
#include "mamba/nn/mamba2.h"
#include "mamba/ops/ssd.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"

using namespace mamba;

namespace {
const char* kUsage =
    "bench_ssd: SSD forward/backward, chunked vs sequential, and the Mamba-2 layer; JSON lines\n"
    "  --seqlen 2048 --heads 24 --headdim 64 --d_state 128 --ngroups 1 --batch 1\n"
    "  --chunk 256 --threads 0 (0 = all cores) --reps 3\n"
    "  --ref 1 (0 skips the double reference, which is slow)  --scaling 1  --sweep 1  --layer 1\n"
    "  --d_model 768 (layer)  --steps 128 (decode steps timed)\n";

ops::SsdArgs make_args(int64_t B, int64_t L, int64_t H, int64_t P, int64_t G, int64_t N,
                       int64_t chunk, Rng& rng) {
  ops::SsdArgs a;
  a.x = Tensor({B, L, H, P});
  rng.fill_normal(a.x);
  a.dt = Tensor({B, L, H});
  rng.fill_normal(a.dt, 0, 0.5);
  a.dt_bias = Tensor({H});
  rng.fill_uniform(a.dt_bias, -4.0, -2.0);  // softplus -> dt ~ 0.02 .. 0.13
  a.dt_softplus = true;
  a.A = Tensor({H});
  rng.fill_uniform(a.A, -16.0, -1.0);
  a.B = Tensor({B, L, G, N});
  rng.fill_normal(a.B, 0, 0.3);
  a.C = Tensor({B, L, G, N});
  rng.fill_normal(a.C, 0, 0.3);
  a.D = Tensor::full({H}, 1.f);
  a.chunk_size = chunk;
  return a;
}

double max_diff(const Tensor& a, const Tensor& b) {
  double m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) m = std::max(m, (double)std::fabs(a[i] - b[i]));
  return m;
}

std::string shape_json(int64_t B, int64_t L, int64_t H, int64_t P, int64_t G, int64_t N,
                       int64_t Q) {
  char s[200];
  std::snprintf(
      s, sizeof s,
      "{\"B\":%lld,\"L\":%lld,\"H\":%lld,\"P\":%lld,\"G\":%lld,\"N\":%lld,\"chunk\":%lld}",
      (long long)B, (long long)L, (long long)H, (long long)P, (long long)G, (long long)N,
      (long long)Q);
  return s;
}

void emit(const char* bench, const char* pass, const char* impl, const std::string& shape,
          int threads, double sec, double tokens, const std::string& extra = "") {
  std::printf(
      "{\"bench\":\"%s\",\"pass\":\"%s\",\"impl\":\"%s\",\"shape\":%s,\"threads\":%d,"
      "\"ms\":%.3f,\"tokens_per_s\":%.1f%s}\n",
      bench, pass, impl, shape.c_str(), threads, sec * 1e3, tokens / sec, extra.c_str());
  std::fflush(stdout);
}
}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv, kUsage);
  const int64_t L = args.get("seqlen", 2048), H = args.get("heads", 24),
                P = args.get("headdim", 64);
  const int64_t N = args.get("d_state", 128), G = args.get("ngroups", 1), B = args.get("batch", 1);
  const int64_t Q = args.get("chunk", 256);
  const int reps = static_cast<int>(args.get("reps", 3));
  set_num_threads(static_cast<int>(args.get("threads", 0)));
  const int threads = num_threads();
  Rng rng(1);

  // 1-2. the mamba2-130m shape
  {
    ops::SsdArgs a = make_args(B, L, H, P, G, N, Q, rng);
    const std::string sh = shape_json(B, L, H, P, G, N, Q);
    const double tokens = double(B * L);
    Tensor yc, ys, yr;
    double tc = bench::median_seconds(reps, [&] { yc = ops::ssd_chunked(a); });
    emit("ssd", "forward", "chunked", sh, threads, tc, tokens);
    double ts = bench::median_seconds(std::min(reps, 2), [&] { ys = ops::ssd_sequential_f32(a); });
    emit("ssd", "forward", "sequential_f32", sh, threads, ts, tokens,
         ",\"chunked_speedup\":" + std::to_string(ts / tc) +
             ",\"max_abs_diff_vs_chunked\":" + std::to_string(max_diff(ys, yc)));
    if (args.get("ref", 1)) {
      double tr = bench::median_seconds(1, [&] { yr = ops::ssd_ref(a); });
      char ex[160];
      std::snprintf(
          ex, sizeof ex,
          ",\"chunked_speedup\":%.1f,\"max_abs_diff_chunked_vs_ref\":%.3g,\"max_abs_y\":%.3g",
          tr / tc, max_diff(yc, yr), max_diff(yr, Tensor::zeros(yr.shape())));
      emit("ssd", "forward", "sequential_ref_f64", sh, threads, tr, tokens, ex);
    }
    Tensor dout(a.x.shape());
    rng.fill_normal(dout);
    ops::SsdGrads gc, gr;
    double tb = bench::median_seconds(reps, [&] { gc = ops::ssd_chunked_bwd(a, dout); });
    emit("ssd", "backward", "chunked", sh, threads, tb, tokens,
         ",\"includes_forward_recompute\":true");
    if (args.get("ref", 1)) {
      double tr = bench::median_seconds(1, [&] { gr = ops::ssd_bwd_ref(a, dout); });
      char ex[200];
      std::snprintf(ex, sizeof ex,
                    ",\"chunked_speedup\":%.1f,\"max_abs_diff_dx\":%.3g,\"max_abs_dx\":%.3g",
                    tr / tb, max_diff(gc.dx, gr.dx), max_diff(gr.dx, Tensor::zeros(gr.dx.shape())));
      emit("ssd", "backward", "sequential_ref_f64", sh, threads, tr, tokens, ex);
    }
  }

  // 3. linear growth in L
  if (args.get("scaling", 1)) {
    for (int64_t Ls : {512, 2048, 8192}) {
      ops::SsdArgs a = make_args(B, Ls, H, P, G, N, Q, rng);
      const std::string sh = shape_json(B, Ls, H, P, G, N, Q);
      double tc = bench::median_seconds(reps, [&] { ops::ssd_chunked(a); });
      emit("ssd_scaling", "forward", "chunked", sh, threads, tc, double(B * Ls),
           ",\"ns_per_token\":" + std::to_string(tc / double(B * Ls) * 1e9));
      Tensor dout(a.x.shape());
      rng.fill_normal(dout);
      double tb = bench::median_seconds(reps, [&] { ops::ssd_chunked_bwd(a, dout); });
      emit("ssd_scaling", "backward", "chunked", sh, threads, tb, double(B * Ls),
           ",\"ns_per_token\":" + std::to_string(tb / double(B * Ls) * 1e9));
      double ts = bench::median_seconds(1, [&] { ops::ssd_sequential_f32(a); });
      emit("ssd_scaling", "forward", "sequential_f32", sh, threads, ts, double(B * Ls),
           ",\"ns_per_token\":" + std::to_string(ts / double(B * Ls) * 1e9));
    }
  }

  // 3b. chunk size sweep at L (the result is the same up to rounding; the cost is not)
  if (args.get("sweep", 1)) {
    ops::SsdArgs a = make_args(B, L, H, P, G, N, Q, rng);
    Tensor dout(a.x.shape());
    rng.fill_normal(dout);
    for (int64_t q : {32, 64, 128, 256}) {
      a.chunk_size = q;
      const std::string sh = shape_json(B, L, H, P, G, N, q);
      double tc = bench::median_seconds(reps, [&] { ops::ssd_chunked(a); });
      emit("ssd_chunk_sweep", "forward", "chunked", sh, threads, tc, double(B * L));
      double tb = bench::median_seconds(reps, [&] { ops::ssd_chunked_bwd(a, dout); });
      emit("ssd_chunk_sweep", "backward", "chunked", sh, threads, tb, double(B * L));
    }
  }

  // 4. the layer (mamba2-130m: d_model 768, d_state 128, headdim 64 -> 24 heads)
  if (args.get("layer", 1)) {
    Mamba2Config cfg;
    cfg.d_model = args.get("d_model", 768);
    cfg.d_state = N, cfg.headdim = P, cfg.ngroups = G, cfg.chunk_size = Q;
    Mamba2 layer(cfg, 0);
    Tensor x({B, L, cfg.d_model});
    rng.fill_normal(x);
    char sh[200];
    std::snprintf(sh, sizeof sh,
                  "{\"d_model\":%lld,\"H\":%lld,\"P\":%lld,\"N\":%lld,\"B\":%lld,\"L\":%lld}",
                  (long long)cfg.d_model, (long long)cfg.nheads(), (long long)P, (long long)N,
                  (long long)B, (long long)L);
    double tf = bench::median_seconds(reps, [&] { layer.forward(x); });
    emit("mamba2_layer", "forward", "fast", sh, threads, tf, double(B * L));
    Tensor dy(x.shape());
    rng.fill_normal(dy);
    double tfb = bench::median_seconds(reps, [&] {
      Mamba2Saved sv;
      layer.forward(x, &sv);
      layer.backward(sv, dy);
    });
    emit("mamba2_layer", "forward+backward", "fast", sh, threads, tfb, double(B * L));
    const int steps = static_cast<int>(args.get("steps", 128));
    Mamba2State st = layer.new_state(B);
    Tensor xt({B, cfg.d_model});
    rng.fill_normal(xt);
    double tst = bench::median_seconds(reps, [&] {
      for (int i = 0; i < steps; ++i) layer.step(xt, st);
    });
    emit("mamba2_layer", "step", "fast", sh, threads, tst / steps, double(B),
         ",\"us_per_token\":" + std::to_string(tst / steps * 1e6));
  }
  return 0;
}
