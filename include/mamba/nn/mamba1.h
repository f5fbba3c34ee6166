// The Mamba-1 mixer layer (mamba_ssm.modules.mamba_simple.Mamba, slow-path semantics):
//   in_proj -> split x | z -> causal conv1d + SiLU -> x_proj -> split dt | B | C
//   -> dt_proj.weight (bias applied inside the scan as delta_bias, with softplus)
//   -> selective_scan(x, dt, A = -exp(A_log), B, C, D, z) -> out_proj
// Three paths over the same parameters: forward (whole sequence, optionally saving what
// backward needs and/or returning the decode state), backward, and step (one token).
// Everything is channel-last: activations are (B, L, ·).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "mamba/nn/param.h"
#include "mamba/ops/half_matmul.h"
#include "mamba/tensor.h"

namespace mamba {

namespace json_io {
class KeyReader;
}

struct Mamba1Config {
  int64_t d_model = 0;
  int64_t d_state = 16;
  int64_t d_conv = 4;
  double expand = 2;
  int64_t dt_rank = -1;  // -1 = "auto" = ceil(d_model / 16)
  double dt_min = 0.001, dt_max = 0.1;
  std::string dt_init = "random";  // "random" | "constant"
  double dt_scale = 1.0, dt_init_floor = 1e-4;
  bool conv_bias = true, bias = false;
  // false: the non-selective ablation of the Mamba paper (the LTI, S4-like case): delta, B and C
  // do not depend on the input. x_proj and dt_proj.weight are dropped; B and C are learned (D, N)
  // parameters "B_ssm" and "C_ssm", and delta = softplus(dt_proj.bias) per channel.
  bool selective = true;

  void validate() const;    // throws mamba::Error naming the field
  int64_t d_inner() const;  // D = int(expand * d_model)
  int64_t rank() const;     // R = dt_rank, resolved when "auto"
  bool operator==(const Mamba1Config&) const = default;

  // config.json's ssm_cfg (mamba_ssm's keyword arguments of Mamba), in src/nn/mamba1_json.cpp.
  // Reads every key it knows from r (d_model comes from the model config); unknown keys are left
  // for the caller to report.
  static Mamba1Config from_ssm_cfg(json_io::KeyReader& r, int64_t d_model);
  // The ssm_cfg object as JSON text, in mamba_ssm's key order ("layer" first).
  std::string to_ssm_cfg() const;
  // Every ssm_cfg key from_ssm_cfg reads (to name the mixer a misplaced key belongs to).
  static const std::vector<std::string>& ssm_cfg_keys();
  // Range checks for a model file (hostile input): throws naming 'ssm_cfg.<key>'.
  void check_ssm_cfg() const;
};

// Decode state: conv_state (B, D, K) (the last K conv inputs, oldest first), ssm_state (B, D, N).
struct Mamba1State {
  Tensor conv_state;  // (B, D, K)
  Tensor ssm_state;   // (B, D, N)
  // Row dst_b of this state = row src_b of src (generate stacks prefilled states into a batch).
  void copy_row(int64_t dst_b, const Mamba1State& src, int64_t src_b) {
    conv_state.select(dst_b).copy_from(src.conv_state.select(src_b));
    ssm_state.select(dst_b).copy_from(src.ssm_state.select(src_b));
  }
};

// Activations forward keeps for backward.
struct Mamba1Saved {
  Tensor hidden;  // (B, L, d_model) the layer input
  Tensor x;       // (B, L, D) conv input (the x half of in_proj's output)
  Tensor z;       // (B, L, D) gate (the z half of in_proj's output)
  Tensor xc;      // (B, L, D) silu(conv1d(x)): the scan input u
  Tensor x_dbl;   // (B, L, R + 2N) x_proj output [dt_low | B | C]
  Tensor delta;   // (B, L, D) dt_proj.weight applied to dt_low (bias not yet added)
  Tensor Bm, Cm;  // (B, L, N) input-dependent B and C of the scan (undefined when not selective)
  Tensor y;       // (B, L, D) scan output (gated), the out_proj input
};

class Mamba1 {
 public:
  using Config = Mamba1Config;
  using State = Mamba1State;
  using Saved = Mamba1Saved;
  static constexpr const char* kName = "Mamba1";  // ssm_cfg's "layer"

  explicit Mamba1(const Mamba1Config& cfg, uint64_t seed = 0);

  const Mamba1Config& config() const { return cfg_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }

  // hidden: (B, L, d_model) -> (B, L, d_model). saved != nullptr keeps what backward needs;
  // state != nullptr receives the conv/ssm states after the last token (prefill).
  Tensor forward(const Tensor& hidden, Mamba1Saved* saved = nullptr, Mamba1State* state = nullptr);
  // dy: (B, L, d_model) -> dx (B, L, d_model); parameter gradients accumulate (+=) into params().
  Tensor backward(const Mamba1Saved& saved, const Tensor& dy);
  Mamba1State new_state(int64_t batch) const;  // zeros
  // x: (B, d_model) -> (B, d_model); advances state by one token.
  Tensor step(const Tensor& x, Mamba1State& state);

  // Storage of in_proj, x_proj, dt_proj and out_proj weights. bf16 / f16: converted (round to
  // nearest even) and the fp32 values and gradients RELEASED (their Params' tensors become
  // undefined): inference only, forward with saved and backward throw. f32 converts back exactly.
  void set_weight_dtype(WeightDType t);
  WeightDType weight_dtype() const { return wdtype_; }
  // Every parameter scalar, 16-bit ones included (params().count() skips released tensors).
  int64_t num_parameters() const;
  // The fp32 value of a parameter whichever the storage (a converted copy for 16-bit weights).
  Tensor param_f32(const std::string& name) const;
  // The 16-bit storage of a parameter when it has one (weight_dtype() != f32), else nullptr.
  ops::HalfWeight* half_weight(const std::string& name);

 private:
  Tensor A() const;  // (D, N) = -exp(A_log)
  void check_state(const Mamba1State& s, int64_t batch) const;

  Mamba1Config cfg_;
  int64_t D_, N_, K_, R_;
  ParamList params_;
  // Views sharing storage with params_ (bias tensors undefined when absent).
  Tensor in_w_, in_b_, conv_w_, conv_b_, xproj_w_, dt_w_, dt_b_, A_log_, Dp_, out_w_, out_b_;
  Tensor B_ssm_, C_ssm_;  // (D, N), only when !cfg_.selective (x_proj_w_, dt_w_ undefined then)
  // 16-bit copies when weight_dtype() != f32 (then in_w_, xproj_w_, dt_w_, out_w_ are undefined).
  WeightDType wdtype_ = WeightDType::f32;
  ops::HalfWeight in_h_, xproj_h_, dt_h_, out_h_;
};

}  // namespace mamba
