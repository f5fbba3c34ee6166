// Multi-head attention, mamba_ssm's MHA (mamba_ssm.modules.mha.MHA): the attention mixer of the
// hybrid LMs (attn_layer_idx / attn_cfg, e.g. mamba2attn-2.7b).
//   in_proj (qkv_dim + mlp_dim, d_model) [+ bias]: rows [q (H*P) | k (KV*P) | v (KV*P) | mlp up
//     (mlp_dim/2) | mlp gate (mlp_dim/2)], qkv_dim = P * (H + 2 KV)
//   d_conv > 0: a causal depthwise conv1d (with bias, no activation) over the qkv columns
//   rotary (rotary_emb_dim R <= P) on the first R dims of every q and k head, position = token
//   index context = softmax(scale q k^T [+ causal mask]) v, query head h reading kv head h / (H /
//   KV) out_proj (d_model, H*P + mlp_dim/2) [+ bias] over [context | up * silu(gate)]
// mlp_dim rounds up to a multiple of 256; head_dim defaults to d_model / num_heads.
// Decode keeps a KV cache (keys after rotary) and, with d_conv, the last d_conv PRE-conv qkv
// columns: so the step path equals the full forward. (The shipped mamba_ssm stores the post-conv
// qkv there, state-spaces/mamba PR #1027, and its decode drifts; see docs/ARCHITECTURE.md.)
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

// mamba_ssm MHA's keyword arguments (config.json's attn_cfg), with the class defaults.
struct MHAConfig {
  int64_t d_model = 0;       // embed_dim (the model's d_model)
  int64_t num_heads = 0;     // H (required)
  int64_t num_heads_kv = 0;  // KV; 0 = None = num_heads
  int64_t head_dim = 0;      // P; 0 = None = d_model / num_heads
  int64_t mlp_dim = 0;       // rounded up to a multiple of 256
  bool qkv_proj_bias = true;
  bool out_proj_bias = true;
  double softmax_scale = 0;  // 0 = None = 1 / sqrt(head_dim)
  bool causal = false;
  int64_t rotary_emb_dim = 0;
  double rotary_emb_base = 10000.0;
  bool rotary_emb_interleaved = false;
  int64_t d_conv = 0;

  void validate() const;  // throws mamba::Error naming the field
  int64_t heads_kv() const { return num_heads_kv ? num_heads_kv : num_heads; }
  int64_t head() const { return head_dim ? head_dim : (num_heads ? d_model / num_heads : 0); }
  int64_t qkv_dim() const { return head() * (num_heads + 2 * heads_kv()); }
  int64_t mlp() const { return (mlp_dim + 255) / 256 * 256; }  // the rounded mlp_dim
  int64_t d_inner() const { return head() * num_heads; }       // the attention output width
  bool operator==(const MHAConfig&) const = default;

  // config.json's attn_cfg (src/nn/mha_json.cpp). The mixer contract names them ssm_cfg: the
  // registry (nn/mixers.h) reads every mixer's keys through the same functions; for MHA the
  // object is attn_cfg and the messages say so.
  static MHAConfig from_ssm_cfg(json_io::KeyReader& r, int64_t d_model);
  std::string to_ssm_cfg() const;  // the attn_cfg object as JSON text
  static const std::vector<std::string>& ssm_cfg_keys();
  void check_ssm_cfg() const;  // ranges for a model file: throws naming 'attn_cfg.<key>'
};

// Decode state: the KV cache and the conv window. Rows may hold different lengths (generate
// prefills each prompt alone and copies it into its row). The cache grows as tokens arrive
// (capacity doubles), so new_state needs no maximum length.
struct MHAState {
  Tensor k_cache, v_cache;   // (B, cap, KV, P): keys after rotary, values; undefined while cap = 0
  std::vector<int64_t> len;  // (B) tokens cached per row
  Tensor conv_state;  // (B, qkv_dim, d_conv) the last d_conv pre-conv qkv columns (d_conv > 0)
  int64_t kv_heads = 0, head_dim = 0;
  int64_t capacity() const { return k_cache.defined() ? k_cache.dim(1) : 0; }
  // Makes room for `need` positions per row, keeping what is cached.
  void reserve(int64_t need);
  // Row dst_b = row src_b of src: its len[src_b] keys / values (the cache grows to fit), its conv
  // window.
  void copy_row(int64_t dst_b, const MHAState& src, int64_t src_b);
};

struct MHASaved {
  Tensor hidden;    // (B, L, d_model) the layer input
  Tensor qkv_pre;   // (B, L, qkv_dim) in_proj's qkv columns (the conv input; with d_conv only)
  Tensor q, k, v;   // (B, L, H, P), (B, L, KV, P) x2: attention inputs (after conv, rotary)
  Tensor ctx;       // (B, L, H, P) attention output
  Tensor lse;       // (B, H, L)
  Tensor up, gate;  // (B, L, mlp/2) the MLP halves (mlp_dim > 0)
  Tensor cat;       // (B, L, H*P + mlp/2) the out_proj input
};

class MHA {
 public:
  using Config = MHAConfig;
  using State = MHAState;
  using Saved = MHASaved;
  static constexpr const char* kName = "MHA";

  // nn.Linear / nn.Conv1d's init: uniform(+-1/sqrt(fan_in)) for weights and biases.
  explicit MHA(const Config& cfg, uint64_t seed = 0);
  MHA(const MHA&) = delete;
  MHA& operator=(const MHA&) = delete;
  MHA(MHA&&) noexcept = default;
  MHA& operator=(MHA&&) noexcept = default;

  const Config& config() const { return cfg_; }
  ParamList& params() { return params_; }
  const ParamList& params() const { return params_; }

  // hidden: (B, L, d_model) -> (B, L, d_model). state != nullptr receives the KV cache and conv
  // window after the last token (prefill: positions 0..L-1).
  Tensor forward(const Tensor& hidden, Saved* saved = nullptr, State* state = nullptr) const;
  // The forward continued from a decode state (chunked prefill): hidden (B, L, d_model) are the
  // tokens after row b's len[b] cached ones; their keys / values are appended to the cache
  // (rotary positions and the causal mask offset by len[b]), the conv window advances, len[b] +=
  // L. Equals the forward of the whole sequence at those positions (and L steps). A non-causal
  // layer can only prefill from an empty cache (throws otherwise). Inference only.
  Tensor prefill(const Tensor& hidden, State& state) const;
  Tensor backward(const Saved& saved, const Tensor& dy);
  State new_state(int64_t batch) const;  // empty cache, zero conv window
  // x: (B, d_model) -> (B, d_model); row b is at position state.len[b] (then len[b] += 1).
  Tensor step(const Tensor& x, State& state) const;

 private:
  const Tensor& f32(const Param* p) const { return p->value.f32(p->name.c_str()); }
  void check_state(const State& s, int64_t batch) const;
  void check_input(const Tensor& hidden, const char* what) const;
  // The shared sequence path: cont (optional) the state the sequence continues from, advanced in
  // place; state (optional, only without cont) receives a fresh prefill's state.
  Tensor run(const Tensor& hidden, Saved* saved, State* cont, State* state) const;
  // [context (B*, H*P) | up * silu(gate)] through out_proj: the tail shared by forward and step.
  Config cfg_;
  int64_t H_, KV_, P_, qkv_, mlp_;  // heads, kv heads, head dim, qkv_dim, rounded mlp_dim
  ParamList params_;
  Param *in_w_ = nullptr, *in_b_ = nullptr, *conv_w_ = nullptr, *conv_b_ = nullptr;
  Param *out_w_ = nullptr, *out_b_ = nullptr;
};

}  // namespace mamba
