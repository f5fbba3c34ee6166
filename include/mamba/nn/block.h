// One layer of the language model: mamba_ssm's Block (add-then-norm, fused_add_norm order)
// around a mixer from the closed set in nn/mixers.h.
//   residual = hidden + residual      (the residual stream, fp32; residual = hidden for block 0)
//   hidden   = mixer(rms_norm(residual) * norm.weight)
// An MLP sub-block (norm2 -> GatedMLP -> residual, mamba_ssm's d_intermediate > 0) belongs here,
// after the mixer; it is not built yet (the model config rejects d_intermediate > 0).
// forward (sequence), backward and step (one token) share one add -> norm -> mixer path.
// Parameters: "norm.weight" and the mixer's as "mixer.<name>" (mamba_ssm's state_dict keys).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "mamba/nn/mixers.h"
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
};

class Block {
 public:
  // mixer: the mixer's config (its d_model must equal d_model); seed: the mixer's initialisation.
  Block(const MixerConfig& mixer, int64_t d_model, double norm_eps, uint64_t seed);

  // hidden: the previous block's output (the embedding for block 0), (B, L, d_model) or (B,
  // d_model); residual: the stream of the same shape, undefined before block 0, updated in place
  // (residual += hidden). Returns this block's output. saved / state (optional) receive the
  // activations for backward / the decode state after the last token (prefill).
  Tensor forward(const Tensor& hidden, Tensor& residual, BlockSaved* saved = nullptr,
                 BlockState* state = nullptr) const;
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

 private:
  // residual += hidden (or = hidden); returns rms_norm(residual) * norm.weight.
  Tensor add_norm(const Tensor& hidden, Tensor& residual) const;

  Mixer mixer_;
  ParamList norm_;
  float eps_;
};

}  // namespace mamba
