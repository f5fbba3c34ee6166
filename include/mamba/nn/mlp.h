// mamba_ssm's GatedMLP (mamba_ssm.modules.mlp.GatedMLP): the MLP that hybrid LMs put after each
// mixer when d_intermediate > 0.
//   fc1: (2H, in) [+ bias (2H)] -> value = first H outputs, gate = last H outputs
//   y = fc2(value * silu(gate)),  fc2: (out, H) [+ bias (out)]
// H = hidden(): hidden_features (default int(8 * in / 3)) rounded up to a multiple of multiple_of.
// x is (..., in) with any leading shape, so the decode step is the same call on (B, in): the layer
// has no state.
#pragma once
#include <cstdint>

#include "mamba/nn/param.h"
#include "mamba/tensor.h"

namespace mamba {

struct GatedMLPConfig {
  int64_t in_features = 0;
  int64_t hidden_features = 0;  // 0 = default, int(8 * in_features / 3)
  int64_t out_features = 0;     // 0 = in_features
  bool bias = false;
  int64_t multiple_of = 128;

  void validate() const;  // throws mamba::Error naming the field
  // H: hidden_features (or its default) rounded up to a multiple of multiple_of.
  int64_t hidden() const;
  int64_t out() const { return out_features == 0 ? in_features : out_features; }
  bool operator==(const GatedMLPConfig&) const = default;
};

// Activations forward keeps for backward.
struct GatedMLPSaved {
  Tensor x;      // (..., in) the layer input
  Tensor value;  // (..., H) the first half of fc1's output
  Tensor gate;   // (..., H) the second half of fc1's output (before SiLU)
  Tensor act;    // (..., H) silu(gate)
  Tensor h;      // (..., H) value * silu(gate): the fc2 input
};

// The layers' contract (see mamba1.h) without State: params(), const forward, backward
// accumulating parameter gradients, movable not copyable (it holds Param* into its own ParamList).
class GatedMLP {
 public:
  using Config = GatedMLPConfig;
  using Saved = GatedMLPSaved;
  static constexpr const char* kName = "GatedMLP";

  // nn.Linear's init for fc1 and fc2: weight and bias uniform(+-1/sqrt(fan_in)).
  explicit GatedMLP(const Config& cfg, uint64_t seed = 0);
  GatedMLP(const GatedMLP&) = delete;
  GatedMLP& operator=(const GatedMLP&) = delete;
  GatedMLP(GatedMLP&&) noexcept = default;
  GatedMLP& operator=(GatedMLP&&) noexcept = default;

  const Config& config() const { return cfg_; }
  int64_t hidden() const { return hidden_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }

  // x: (..., in) -> (..., out). saved != nullptr keeps what backward needs (fp32 weights only).
  Tensor forward(const Tensor& x, Saved* saved = nullptr) const;
  // dy: (..., out) -> dx (..., in); parameter gradients accumulate (+=) into params().
  // Throws "… inference only; load in f32 to train" when the weights are not fp32.
  Tensor backward(const Saved& saved, const Tensor& dy);

 private:
  Config cfg_;
  int64_t hidden_;  // H
  ParamList params_;
  Param *fc1_w_ = nullptr, *fc1_b_ = nullptr, *fc2_w_ = nullptr, *fc2_b_ = nullptr;
};

}  // namespace mamba
