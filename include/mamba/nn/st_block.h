// Spatio-temporal block (issue 14, item 4; no official code exists, the spec is this):
// GMAN's block with a Mamba layer in place of the temporal attention.
//   X: (B, T, N, C) — T time steps of N nodes with C channels
//   spatial  H_S = MHA over the N nodes of each time step (non-causal, H heads of C / H):
//                  q = (X + E) Wq, k = (X + E) Wk, v = X Wv, H_S = attn(q, k, v) Wo
//                  E: (N, C) the learned node embedding, added to the queries' and keys' input
//   temporal H_T = a sequence mixer over the T steps of each node, X reordered to (B*N, T, C):
//                  Mamba1 or Mamba2 (any registered mixer; a causal MHA gives the "same block
//                  with temporal attention" baseline)
//   fusion   z = sigmoid(H_S Ws + H_T Wt + b),  H = z * H_S + (1 - z) * H_T
//   output   Y = X + H Wh + bh
// Streaming step: x_t (B, N, C) -> y_t (B, N, C): the spatial branch needs only the current step;
// the temporal mixer steps B*N rows of its O(1) state (a KV cache for the attention baseline).
// Parameter names: "node_emb", "spatial.{q,k,v,out}_proj.weight", "fusion.w_s.weight",
// "fusion.w_t.weight", "fusion.w_t.bias", "out_proj.weight", "out_proj.bias" (params()), and the
// temporal mixer's own (temporal_params(), prefix "temporal.").
#pragma once
#include <cstdint>

#include "mamba/nn/mixers.h"
#include "mamba/nn/param.h"
#include "mamba/tensor.h"

namespace mamba {

struct STBlockConfig {
  int64_t num_nodes = 0;  // N
  int64_t d_model = 0;    // C
  int64_t num_heads = 1;  // spatial heads (C % num_heads == 0)
  // The temporal mixer's config (its d_model is set to d_model): Mamba1Config, Mamba2Config, or
  // an MHAConfig with causal = true (the temporal-attention baseline).
  MixerConfig temporal = Mamba1Config{};
  void validate() const;  // throws mamba::Error naming the field
};

struct STBlockState {
  MixerState temporal;  // batch B*N (row b*N + n)
  int64_t batch = 0;
};

struct STBlockSaved {
  Tensor x;         // (B, T, N, C)
  Tensor xe;        // (B*T, N, C) x + node_emb
  Tensor q, k, v;   // (B*T, N, H, P)
  Tensor ctx, lse;  // (B*T, N, H, P), (B*T, H, N)
  Tensor hs, ht;    // (B, T, N, C) the two branches
  Tensor z;         // (B, T, N, C) the gate
  Tensor h;         // (B, T, N, C) the fused features
  MixerSaved temporal;
};

class STBlock {
 public:
  using Config = STBlockConfig;
  using State = STBlockState;
  using Saved = STBlockSaved;

  // nn.Linear-style init (uniform +-1/sqrt(fan_in)); node_emb ~ N(0, 0.1^2).
  explicit STBlock(const Config& cfg, uint64_t seed = 0);
  STBlock(const STBlock&) = delete;
  STBlock& operator=(const STBlock&) = delete;
  STBlock(STBlock&&) noexcept = default;
  STBlock& operator=(STBlock&&) noexcept = default;

  const Config& config() const { return cfg_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }
  ParamList& temporal_params();
  const ParamList& temporal_params() const;
  // Every parameter with its name (temporal ones prefixed "temporal."), for an optimiser.
  std::vector<std::pair<std::string, Param*>> named_parameters();

  // x: (B, T, N, C) -> (B, T, N, C). state != nullptr receives the temporal state after step T-1.
  Tensor forward(const Tensor& x, Saved* saved = nullptr, State* state = nullptr) const;
  // dy: (B, T, N, C) -> dx; parameter gradients accumulate (+=).
  Tensor backward(const Saved& saved, const Tensor& dy);
  State new_state(int64_t batch) const;
  // x: (B, N, C) one time step of every node -> (B, N, C); advances the temporal state.
  Tensor step(const Tensor& x, State& state) const;

 private:
  // The spatial branch on (M, N, C) slices (M = B*T for forward, B for step).
  Tensor spatial(const Tensor& x, Saved* saved) const;
  Tensor fuse_out(const Tensor& x, const Tensor& hs, const Tensor& ht, Saved* saved) const;

  Config cfg_;
  ParamList params_;
  Mixer temporal_;
  Param *emb_ = nullptr, *wq_ = nullptr, *wk_ = nullptr, *wv_ = nullptr, *wo_ = nullptr;
  Param *ws_ = nullptr, *wt_ = nullptr, *bz_ = nullptr, *wh_ = nullptr, *bh_ = nullptr;
};

}  // namespace mamba
