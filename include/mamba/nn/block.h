// One layer of the language model: mamba_ssm's Block (add-then-norm, fused_add_norm order)
// around a mixer from the closed set in nn/mixers.h, with an optional GatedMLP after it:
//   residual = hidden + residual      (the residual stream, fp32; residual = hidden for block 0)
//   hidden   = mixer(rms_norm(residual) * norm.weight)
//   with an MLP (mamba_ssm's d_intermediate > 0):
//   residual = hidden + residual;  hidden = mlp(rms_norm(residual) * norm2.weight)
// forward (sequence), backward and step (one token) share one add -> norm -> sub-layer path.
// Parameters: "norm.weight", "norm2.weight", the mixer's as "mixer.<name>" and the MLP's as
// "mlp.<name>" (mamba_ssm's state_dict keys).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "mamba/nn/mixers.h"
#include "mamba/nn/mlp.h"
#include "mamba/nn/param.h"
#include "mamba/tensor.h"

namespace mamba {

// The decode state of one layer: its mixer's state (a fixed-size recurrent state for the SSM
// mixers; an attention mixer's KV cache will be another alternative, see docs/ARCHITECTURE.md).
using BlockState = MixerState;

// What forward keeps for backward.
struct BlockSaved {
  Tensor residual;   // (B, L, d_model) the residual stream after this block's add (the norm input)
  MixerSaved mixer;  // the mixer's own saved activations
  Tensor residual2;  // with an MLP: the stream after the second add (norm2's input)
  GatedMLPSaved mlp;
};

class Block {
 public:
  // mixer: the mixer's config (its d_model must equal d_model); seed: the initialisation.
  // d_intermediate > 0 adds norm2 and a GatedMLP(d_model, hidden_features = d_intermediate,
  // out_features = d_model, bias = false, multiple_of = 128), as mamba_ssm's create_block does.
  Block(const MixerConfig& mixer, int64_t d_model, double norm_eps, uint64_t seed,
        int64_t d_intermediate = 0);

  // hidden: the previous block's output (the embedding for block 0), (B, L, d_model) or (B,
  // d_model); residual: the stream of the same shape, undefined before block 0, updated in place
  // (residual += hidden). Returns this block's output. saved / state (optional) receive the
  // activations for backward / the decode state after the last token (prefill).
  Tensor forward(const Tensor& hidden, Tensor& residual, BlockSaved* saved = nullptr,
                 BlockState* state = nullptr) const;
  // The forward continued from a decode state (chunked prefill): hidden, residual (B, L, d_model)
  // of the L tokens after those `state` has seen; state advanced by them. Inference only.
  Tensor prefill(const Tensor& hidden, Tensor& residual, BlockState& state) const;
  // One token: hidden, residual (B, d_model), state advanced.
  Tensor step(const Tensor& hidden, Tensor& residual, BlockState& state) const;
  // dres (B, L, d_model): on entry the gradient of this block's output and of the residual stream
  // after its add (the same tensor: the next block adds them); on return the gradient of its inputs
  // hidden and residual (also the same). Accumulates the parameter gradients (+=).
  void backward(const BlockSaved& saved, Tensor& dres);
  BlockState new_state(int64_t batch) const;  // zeros

  const Mixer& mixer() const { return mixer_; }
  Mixer& mixer() { return mixer_; }
  const char* mixer_name() const;
  ParamList& norm_params() { return norm_; }
  const ParamList& norm_params() const { return norm_; }
  // The mixer's parameters (names without the "mixer." prefix).
  ParamList& mixer_params();
  const ParamList& mixer_params() const;
  // The MLP (nullptr without one) and its parameters (names without the "mlp." prefix).
  const GatedMLP* mlp() const { return mlp_ ? &*mlp_ : nullptr; }
  GatedMLP* mlp() { return mlp_ ? &*mlp_ : nullptr; }

 private:
  // residual += hidden (or = hidden); returns rms_norm(residual) * norm.value (trace label `what`).
  Tensor add_norm(const Tensor& hidden, Tensor& residual, const Param& norm,
                  const char* what) const;
  // The mixer's output through the MLP sub-block, when there is one.
  Tensor mlp_part(const Tensor& mixed, Tensor& residual, BlockSaved* saved) const;
  template <class Call>  // prefill / step: the shared add+norm, state check and MLP (block.cpp)
  Tensor with_state(const Tensor& hidden, Tensor& residual, BlockState& state, const char* what,
                    Call&& call) const;

  Mixer mixer_;
  std::optional<GatedMLP> mlp_;
  ParamList norm_;
  Param* norm_w_ = nullptr;   // "norm.weight" in norm_ (stable address)
  Param* norm2_w_ = nullptr;  // "norm2.weight", with an MLP
  float eps_;
};

}  // namespace mamba
