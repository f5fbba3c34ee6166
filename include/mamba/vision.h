// The image-classification example (mambacpp example vision): generated images of oriented bars
// in noise, classified by a small VSSBlock backbone (VMamba's 2-D scan) and, in the same run on
// the same batches, by a Mamba-1 stack over the row-major flattened image (the 1-D baseline).
//   image (B, S, S, 1) -> stem: per-pixel linear 1 -> C -> [VSSBlock x depth | pre-norm residual
//   Mamba-1 x depth over L = S*S] -> LayerNorm -> mean over pixels -> linear C -> classes.
// Classes: 0 horizontal, 1 vertical, 2 diagonal (\), 3 anti-diagonal (/) bars of `bar_len`
// pixels at a random place, plus Gaussian noise of std `noise` on every pixel.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "mamba/rng.h"
#include "mamba/tensor.h"

namespace mamba::vision {

constexpr int64_t kClasses = 4;

struct ImageBatch {
  Tensor images;                // (B, S, S, 1)
  std::vector<int32_t> labels;  // B labels in [0, 4)
};
// Draws B images of side S (S >= bar_len >= 2).
ImageBatch bars_batch(int64_t B, int64_t S, int64_t bar_len, double noise, Rng& rng);

struct ExampleConfig {
  int64_t image = 12, bar_len = 5;
  double noise = 0.3;
  int64_t dim = 16;         // C
  int64_t vss_depth = 2;    // VSSBlocks (v05: d_state 4, ssm_ratio 2, mlp_ratio 2)
  int64_t mamba_depth = 3;  // Mamba-1 layers (d_state 16, expand 2): about as many parameters
  int64_t steps = 300, batch = 32, eval_images = 1024;
  double lr = 1e-2;
  uint64_t seed = 0;
};

struct ModelResult {
  std::string name;
  int64_t params = 0;
  double final_train_loss = 0;  // mean over the last 20 steps
  double accuracy = 0;          // on eval_images fresh images
  double train_seconds = 0;
};

// Trains both models on the same batches and evaluates them on the same held-out images.
// log(line) receives the shape summary (once) and progress lines.
std::vector<ModelResult> run_example(const ExampleConfig& cfg,
                                     const std::function<void(const std::string&)>& log);

}  // namespace mamba::vision
