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

// The layer contract (Mamba1, Mamba2 and every later mixer): nested Config / State / Saved types,
// kName (the ssm_cfg "layer" string), movable but not copyable (it holds Param* into its own
// ParamList), forward / step const and free of mutable members (a const layer may be shared by
// threads, each with its own State), backward accumulating parameter gradients. The storage of
// the weights is the ParamList's business (params().set_weight_dtype): no layer knows it.
class Mamba1 {
 public:
  using Config = Mamba1Config;
  using State = Mamba1State;
  using Saved = Mamba1Saved;
  static constexpr const char* kName = "Mamba1";

  explicit Mamba1(const Config& cfg, uint64_t seed = 0);
  Mamba1(const Mamba1&) = delete;
  Mamba1& operator=(const Mamba1&) = delete;
  Mamba1(Mamba1&&) noexcept = default;
  Mamba1& operator=(Mamba1&&) noexcept = default;

  const Config& config() const { return cfg_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }

  // hidden: (B, L, d_model) -> (B, L, d_model). saved != nullptr keeps what backward needs (fp32
  // weights only); state != nullptr receives the conv/ssm states after the last token (prefill).
  Tensor forward(const Tensor& hidden, Saved* saved = nullptr, State* state = nullptr) const;
  // The forward continued from a decode state (chunked prefill): hidden (B, L, d_model) are the
  // L tokens after those `state` has seen (new_state(B) for none); returns (B, L, d_model), equal
  // to the forward of the whole sequence at those positions (and to L steps), and advances state
  // by the L tokens. Inference only (nothing saved for backward).
  Tensor prefill(const Tensor& hidden, State& state) const;
  // dy: (B, L, d_model) -> dx (B, L, d_model); parameter gradients accumulate (+=) into params().
  // Throws "… inference only; load in f32 to train" when the weights are not fp32.
  Tensor backward(const Saved& saved, const Tensor& dy);
  State new_state(int64_t batch) const;  // zeros
  // x: (B, d_model) -> (B, d_model); advances state by one token.
  Tensor step(const Tensor& x, State& state) const;

 private:
  Tensor step_one(const Tensor& x, State& state) const;  // step at B = 1 (same bits, fewer passes)
  Tensor A() const;                                      // (D, N) = -exp(A_log)
  void check_state(const State& s, int64_t batch) const;
  void check_input(const Tensor& hidden, const char* what) const;  // (B >= 1, L >= 1, d_model)
  // The shared sequence path: init (optional) the state the sequence continues from, state
  // (optional, may be init) receives the state after the last token.
  Tensor run(const Tensor& hidden, Saved* saved, const State* init, State* state) const;
  const Tensor& f32(const Param* p) const { return p->value.f32(p->name.c_str()); }

  Config cfg_;
  int64_t d_inner_, d_state_, d_conv_, dt_rank_;  // D, N, K, R
  ParamList params_;
  // The parameters (nullptr when absent: biases by config; x_proj, dt_proj.weight when not
  // selective; B_ssm, C_ssm when selective).
  Param *in_w_ = nullptr, *in_b_ = nullptr, *conv_w_ = nullptr, *conv_b_ = nullptr;
  Param *xproj_w_ = nullptr, *dt_w_ = nullptr, *dt_b_ = nullptr, *A_log_ = nullptr, *Dp_ = nullptr;
  Param *out_w_ = nullptr, *out_b_ = nullptr, *B_ssm_ = nullptr, *C_ssm_ = nullptr;
};

}  // namespace mamba
