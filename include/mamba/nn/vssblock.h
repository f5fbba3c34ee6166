// VMamba's VSSBlock (vmamba.py, class VSSBlock) with an SS2D mixer and VMamba's Mlp:
//   x = x + SS2D(norm(x));  x = x + fc2(GELU(fc1(norm2(x))))
// (post_norm: x = x + norm(SS2D(x)); x = x + norm2(mlp(x))). Norms are LayerNorm over the channels
// (VMamba's LayerNorm2d when channel_first, nn.LayerNorm otherwise: the same op on our channel-last
// images), eps 1e-5; fc1 (hidden, C) and fc2 (C, hidden) with biases (Linear2d when
// channel_first: the same weights), hidden = int(C * mlp_ratio), exact-erf GELU. ssm_ratio = 0
// drops the SS2D branch, mlp_ratio = 0 the MLP branch, as VMamba does. state_dict keys: norm.*,
// op.* (SS2D's), norm2.*, mlp.fc1.*, mlp.fc2.*. drop_path and the dropouts must be 0 (stochastic
// depth is not implemented); use_checkpoint is accepted (the same math).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "mamba/nn/param.h"
#include "mamba/nn/ss2d.h"
#include "mamba/tensor.h"

namespace mamba {

class SafetensorsFile;

struct VSSBlockConfig {
  int64_t hidden_dim = 0;
  double drop_path = 0.0;
  bool channel_first = false;
  int64_t ssm_d_state = 16;
  double ssm_ratio = 2.0;
  int64_t ssm_dt_rank = -1;  // "auto"
  std::string ssm_act_layer = "silu";
  int64_t ssm_conv = 3;
  bool ssm_conv_bias = true;
  double ssm_drop_rate = 0.0;
  std::string ssm_init = "v0";
  std::string forward_type = "v2";
  double mlp_ratio = 4.0;
  std::string mlp_act_layer = "gelu";
  double mlp_drop_rate = 0.0;
  bool gmlp = false;
  bool use_checkpoint = false;
  bool post_norm = false;

  void validate() const;  // throws mamba::Error naming the field
  bool ssm_branch() const { return ssm_ratio > 0; }
  bool mlp_branch() const { return mlp_ratio > 0; }
  int64_t mlp_hidden() const;  // int(hidden_dim * mlp_ratio)
  SS2DConfig ss2d() const;     // the config VSSBlock gives its SS2D
  bool operator==(const VSSBlockConfig&) const = default;
  // VMamba's keyword arguments as a JSON object; unknown keys are errors naming the key.
  static VSSBlockConfig from_json(const std::string& text);
};

struct VSSBlockSaved {
  Tensor x;   // (B, H, W, C) the block input (channel-last)
  Tensor n1;  // norm(x) (pre-norm) or SS2D's output (post_norm)
  SS2DSaved op;
  Tensor x1;  // (B, H, W, C) after the SS2D branch
  Tensor n2;  // norm2(x1) (pre-norm) or the MLP output (post_norm)
  Tensor h;   // (B, H, W, hidden) fc1 output
  Tensor a;   // GELU(h)
};

class VSSBlock {
 public:
  using Config = VSSBlockConfig;
  using Saved = VSSBlockSaved;

  explicit VSSBlock(const Config& cfg, uint64_t seed = 0);
  VSSBlock(const VSSBlock&) = delete;
  VSSBlock& operator=(const VSSBlock&) = delete;
  VSSBlock(VSSBlock&&) noexcept = default;
  VSSBlock& operator=(VSSBlock&&) noexcept = default;

  const Config& config() const { return cfg_; }
  // Every parameter with its VMamba state_dict key, in VMamba's order.
  std::vector<std::pair<std::string, Param*>> named_params();
  std::vector<std::pair<std::string, const Param*>> named_params() const;
  int64_t param_count() const;
  void zero_grad();
  // Copies every parameter from tensors named prefix + key; throws naming a missing one.
  void load(const SafetensorsFile& f, const std::string& prefix = "");
  SS2D* op() { return op_ ? &*op_ : nullptr; }

  // x: (B, H, W, C), or (B, C, H, W) when channel_first -> the same layout.
  Tensor forward(const Tensor& x, Saved* saved = nullptr) const;
  Tensor backward(const Saved& saved, const Tensor& dy);  // accumulates parameter gradients
  // Channel-last whatever channel_first says (a backbone keeps its images channel-last).
  Tensor forward_cl(const Tensor& x, Saved* saved = nullptr) const;
  Tensor backward_cl(const Saved& saved, const Tensor& dy);

 private:
  Config cfg_;
  std::optional<SS2D> op_;
  ParamList own_;  // norm.*, norm2.*, mlp.*
  Param *n1w_ = nullptr, *n1b_ = nullptr, *n2w_ = nullptr, *n2b_ = nullptr;
  Param *fc1w_ = nullptr, *fc1b_ = nullptr, *fc2w_ = nullptr, *fc2b_ = nullptr;
};

}  // namespace mamba
