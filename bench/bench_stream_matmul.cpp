// The decode matmuls of one LM step through ops::stream_matmul (ops/half_matmul.h), at the
// mamba-130m shapes: for every layer in_proj (3072 x 768), x_proj (80 x 1536), dt_proj
// (1536 x 48), out_proj (768 x 1536), each its own weight (so every step streams all of them from
// memory, as decode does), then the LM head (50280 x 768). One step = all of them for M input
// rows. JSON lines on stdout: M, weights, ms per step, GFLOP/s, weight GB/s.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "bench_util.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/tensor.h"
#include "mamba/weight.h"
#include "ops/half_matmul.h"

using namespace mamba;

namespace {
const char* kUsage =
    "bench_stream_matmul: the decode matmuls of one mamba-130m step (24 layers + LM head) through\n"
    "ops::stream_matmul for M = 1..16 input rows; JSON lines\n"
    "  --layers 24  --vocab 50280  --threads 0 (0 = all cores)  --reps 7\n"
    "  --dtype all|f32|bf16|f16|q8_0|q4_0  --m 0 (0 = 1, 2, 4, 8, 12, 16; else that M only)\n"
    "  --rows 0 --cols 0: instead of the model, --copies weights of rows x cols each\n"
    "  ms_per_step is the median of --reps steps, min_ms the fastest\n"
    "  --copies 64\n";

struct Shape2 {
  int64_t N, K;
};
}  // namespace

int main(int argc, char** argv) {
  bench::Args args(argc, argv, kUsage);
  const int64_t layers = args.get("layers", 24), vocab = args.get("vocab", 50280);
  const int reps = static_cast<int>(args.get("reps", 7));
  const std::string dt = args.get_str("dtype", "all");
  const int64_t only_m = args.get("m", 0);
  set_num_threads(static_cast<int>(args.get("threads", 0)));
  std::vector<Shape2> layer_shapes = {{3072, 768}, {80, 1536}, {1536, 48}, {768, 1536}};
  int64_t vocab_rows = vocab, n_layers = layers;
  if (args.get("rows", 0) > 0) {
    layer_shapes = {{args.get("rows", 0), args.get("cols", 768)}};
    n_layers = args.get("copies", 64);
    vocab_rows = 0;
  }
  std::vector<WeightDType> types;
  for (WeightDType t : {WeightDType::f32, WeightDType::bf16, WeightDType::f16, WeightDType::q8_0,
                        WeightDType::q4_0})
    if (dt == "all" || dt == weight_dtype_name(t)) types.push_back(t);
  std::vector<int64_t> ms = {1, 2, 4, 8, 12, 16};
  if (only_m > 0) ms = {only_m};
  Rng rng(1);
  constexpr int64_t kMaxM = 16, kMaxN = 50280;
  const int64_t kMaxCols = std::max<int64_t>(1536, args.get("cols", 0));
  Tensor x({kMaxM, kMaxCols});
  rng.fill_normal(x);
  std::vector<float> y(static_cast<size_t>(kMaxM * std::max({kMaxN, vocab, args.get("rows", 0)})));
  for (WeightDType t_ : types) {
    std::vector<Weight> ws;
    double flop_per_row = 0, bytes = 0;
    for (int64_t l = 0; l < n_layers; ++l)
      for (const Shape2& s : layer_shapes) {
        Tensor w({s.N, s.K});
        rng.fill_normal(w, 0, 0.05);
        ws.emplace_back(w, t_);
      }
    if (vocab_rows > 0) {
      Tensor w({vocab_rows, 768});
      rng.fill_normal(w, 0, 0.05);
      ws.emplace_back(w, t_);
    }
    for (const Weight& w : ws) {
      flop_per_row += 2.0 * static_cast<double>(w.rows()) * static_cast<double>(w.cols());
      bytes += static_cast<double>(w.bytes());
    }
    for (int64_t M : ms) {
      std::vector<double> t;
      for (int i = 0; i <= reps; ++i) {  // the first is a warm-up
        const double t0 = bench::now_s();
        for (const Weight& w : ws) ops::stream_matmul(x.data(), M, w.cols(), w, y.data(), w.rows());
        if (i > 0) t.push_back(bench::now_s() - t0);
      }
      std::sort(t.begin(), t.end());
      const double s = t[t.size() / 2], best = t[0];
      std::printf(
          "{\"bench\":\"stream_matmul\",\"weights\":\"%s\",\"M\":%lld,\"threads\":%d,"
          "\"ms_per_step\":%.2f,\"min_ms\":%.2f,\"gflops\":%.1f,\"weight_gbps\":%.1f}\n",
          weight_dtype_name(t_), static_cast<long long>(M), num_threads(), s * 1e3, best * 1e3,
          flop_per_row * static_cast<double>(M) / s * 1e-9, bytes / s * 1e-9);
      std::fflush(stdout);
    }
  }
  return 0;
}
