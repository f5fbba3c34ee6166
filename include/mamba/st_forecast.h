// The spatio-temporal forecasting example (issue 14, item 5): generated traffic-like series on a
// small graph, a forecaster built on nn::STBlock, trained with AdamW, evaluated by the MAE of the
// next-step forecast against persistence (tomorrow = today) and against the same block with a
// causal attention temporal mixer, all in one run (mambacpp st-forecast).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "mamba/nn/st_block.h"

namespace mamba::train {

// Traffic-like series: N nodes on a ring with chords; each node a daily profile (period 48 steps:
// two rush hours of node-specific size and phase), incidents that drop the value at one node and
// spread along the graph's edges one step later, attenuated, plus noise.
struct TrafficSeries {
  int64_t N = 0, S = 0, period = 48;
  std::vector<float> v;  // (S, N) values
  std::vector<std::pair<int64_t, int64_t>> edges;
};
TrafficSeries make_traffic_series(int64_t N, int64_t S, uint64_t seed);

struct STForecastConfig {
  int64_t nodes = 8, d_model = 16, heads = 2, seqlen = 24, batch = 16, steps = 300;
  int64_t series_len = 2400;  // the first 80% train windows, the last 20% test windows
  double lr = 3e-3;
  uint64_t seed = 0;
  std::string temporal = "mamba1";  // "mamba1" | "mamba2" | "attention" (causal MHA)
};

struct STForecastResult {
  double mae_model = 0, mae_persistence = 0;  // next-step MAE on the test windows (data units)
  double final_loss = 0;                      // the last training step's MSE (normalised units)
  double seconds = 0;
  int64_t params = 0;
  std::vector<std::pair<std::string, Shape>> shapes;  // the model's tensors, once
};

// Trains a forecaster [features (value, sin, cos of the time of day) -> Linear -> STBlock ->
// Linear -> next value] on windows of the series and evaluates it. on_log(step, loss) every 50
// steps. Deterministic for a given seed and thread count.
STForecastResult run_st_forecast(const STForecastConfig& cfg,
                                 const std::function<void(int64_t, double)>& on_log = {});

}  // namespace mamba::train
