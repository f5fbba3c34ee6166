// The language model, mamba_ssm's MambaLMHeadModel:
//   ids (B, L) -> backbone.embedding (V_pad, d_model) -> n_layer x Block -> norm_f -> lm_head
//   Block i (nn/block.h, mamba_ssm's add-then-norm order):
//     residual = hidden + residual  (residual = hidden for i = 0), kept in fp32
//     hidden   = mixer(rms_norm(residual) * layers.i.norm.weight)
//   final: hidden = rms_norm(hidden + residual) * norm_f.weight; logits = hidden @ lm_head^T
//
// Threads: forward, forward_last, step and new_state are const and change nothing in the model:
// share one const MambaLM between threads, each with its own LMState / LMSaved (tested in
// tests/test_block.cpp). backward, zero_grad, set_weight_dtype and load_state_dict change the
// model: not concurrently with anything else on it. lm_head.weight is the embedding when
// tie_embeddings. Parameter names are mamba_ssm's state_dict keys, so checkpoints map 1:1.
#pragma once
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "mamba/config.h"
#include "mamba/nn/block.h"
#include "mamba/nn/param.h"
#include "mamba/tensor.h"
#include "mamba/weight.h"

namespace mamba {

enum class GGMLType : uint32_t;  // mamba/gguf.h

// Decode state of the whole model: one state per layer (BlockState: its mixer's state). For the
// Mamba layers its size does not depend on how many tokens were seen (constant memory per token);
// an attention layer (attn_layer_idx) keeps a KV cache that grows with the tokens (MHAState).
struct LMState {
  std::vector<BlockState> layers;
  int64_t batch = 0;
  // Row dst_b of every layer's state = row src_b of src's (a state of the same model): how a
  // sequence's state joins a batch (generate, serve) or is kept (the prefix cache).
  void copy_row(int64_t dst_b, const LMState& src, int64_t src_b);
  // Floats held by every layer's state tensors, all rows (an attention layer's KV cache at its
  // allocated capacity).
  int64_t floats() const;
};

// What one token costs the model, for the bounds in docs/PERFORMANCE.md (bench --json prints it).
struct TokenCost {
  // Stored bytes of every parameter a decode step reads: all of them at their storage type,
  // except an untied embedding (a step reads one row of it).
  int64_t decode_weight_bytes = 0;
  int64_t state_bytes = 0;    // one sequence's decode state (read and written every step)
  int64_t prefill_flops = 0;  // 2 x the projections' weights (multiply-adds per token; the head
                              // excluded: prefill needs the last position's logits only)
  int64_t decode_flops = 0;   // prefill_flops + the head's 2 x V_pad x d_model
  // Not counted: the scan / SSD, conv, norms and attention scores (a few % of the FLOPs at the
  // released shapes for Mamba-1, more for Mamba-2's SSD), so FLOP bounds are upper bounds.
};

// Activations MambaLM::forward keeps for backward. A plain value: it owns what it holds and frees
// it when it goes out of scope (or when moved into backward).
struct LMSaved {
  std::vector<int32_t> ids;
  int64_t B = 0, L = 0;
  std::vector<BlockSaved> blocks;  // per layer
  Tensor residual_final;           // (B, L, d_model) entering norm_f
  Tensor hidden_final;             // (B, L, d_model) norm_f output (input of the head)
  bool empty() const { return blocks.empty(); }
};

class MambaLM {
 public:
  // dtype != f32: the large weights are converted as they are initialised (see set_weight_dtype).
  // dt_init: empty, or one initial delta range {dt_min, dt_max} per layer that replaces
  // ssm_cfg.dt_min / dt_max for that layer's dt_proj.bias (a training choice; every other draw of
  // the layer is unchanged, so a layer given ssm_cfg's range is initialised bit for bit the same).
  explicit MambaLM(const ModelConfig& cfg, uint64_t seed = 0, WeightDType dtype = WeightDType::f32,
                   const std::vector<std::pair<double, double>>& dt_init = {});
  ~MambaLM();
  MambaLM(MambaLM&&) noexcept;
  MambaLM& operator=(MambaLM&&) noexcept;

  // Loads a model folder: config.json plus model.safetensors or pytorch_model.bin (mamba_ssm
  // or transformers names). Throws mamba::Error naming a missing, extra or mis-shaped tensor.
  static MambaLM load(const std::string& dir);
  // The same with the large weights stored as `dtype` (set_weight_dtype), converted tensor by
  // tensor as they are read, so the fp32 copy of the whole model never exists. Checkpoints stored
  // as BF16 / F16 load exactly (fp32 holds their values), so loading one as its own dtype keeps
  // it bit for bit.
  static MambaLM load(const std::string& dir, WeightDType dtype);
  // `dir` may also be a .gguf file (load_gguf).
  // A llama.cpp GGUF file of architecture "mamba" or "mamba2" (docs/GGUF.md: the hyper-parameter
  // keys and tensor names, mapped to mamba_ssm's; F32 / F16 / BF16 / Q8_0 / Q4_0 tensors
  // dequantised at load, one tensor at a time, then stored as `dtype`).
  static MambaLM load_gguf(const std::string& path, WeightDType dtype = WeightDType::f32);
  // Writes the model as a GGUF file in llama.cpp's layout (atomically): 2-D ".weight" matrices
  // as `type` (Q8_0 / Q4_0 rows not a multiple of 32 fall back to F16, as llama.cpp's converter
  // does), norms, conv, A, D and biases as F32. tokenizer_json: a tokenizer.json embedded as
  // llama.cpp's "gpt2" vocabulary; empty writes tokenizer.ggml.model = "none". Throws for a
  // model llama.cpp cannot represent (attention layers, MLPs, biases, Mamba-3, ...).
  void save_gguf(const std::string& path, GGMLType type,
                 const std::string& tokenizer_json = "") const;
  // Loads weights from a state dict (mamba_ssm or transformers names) into this model (16-bit
  // weights are rounded into their storage).
  void load_state_dict(const std::map<std::string, Tensor>& sd, const std::string& origin);
  // Writes config.json + model.safetensors (mamba_ssm names, tied head stored twice as
  // save_pretrained does), each file atomically.
  // With hf = true: transformers' layout instead (config keys of MambaConfig / Mamba2Config,
  // backbone.embeddings.weight; the tied head stored once, as save_pretrained does).
  // A 16-bit model is saved as F32 tensors holding its rounded values exactly.
  void save(const std::string& dir, bool hf = false) const;

  // Storage of the large weights for inference: every mixer's projections (in_proj, x_proj,
  // dt_proj, out_proj) and the embedding / lm_head. bf16 / f16 convert them (round to nearest
  // even), RELEASE the fp32 copies and gradients (those Params' value and grad become undefined
  // tensors) and compute with fp32 accumulation; forward with saved and backward then throw
  // ("inference only; load in f32 to train"). Norms, conv, A_log, D and biases stay fp32.
  // f32 converts back exactly (the values stay the rounded ones).
  void set_weight_dtype(WeightDType t);  // every ParamList's set_weight_dtype
  WeightDType weight_dtype() const { return own_.weight_dtype(); }

  const ModelConfig& config() const { return cfg_; }
  int64_t vocab() const { return cfg_.padded_vocab(); }  // logits' last dimension
  // Every parameter with its full name (tied lm_head counted once, as the embedding).
  // With 16-bit weights the converted ones have undefined value and grad (see set_weight_dtype).
  std::vector<std::pair<std::string, Param*>> named_parameters();
  int64_t num_parameters() const;
  // Bytes and FLOPs of one token of this model as it is stored now (see TokenCost).
  TokenCost token_cost() const;
  // The number of parameters a model of `cfg` has, from the config alone (nothing allocated):
  // exact for Mamba-1 / Mamba-2 mixers, MLPs, norms, embedding and head; a mixer it does not know
  // counts 0 (a lower bound). The constructor checks the memory this needs before allocating.
  static int64_t count_parameters(const ModelConfig& cfg);
  // A lower estimate of the activation bytes forward(B, L) holds at once (issue 18 item 3): the
  // embedding output, residual and block output (3 B L d_model), the widest layer's input
  // projection (B L in_proj rows), the logits (B L V_pad, or B V_pad for forward_last) and, when
  // `saved`, every layer's input projection. forward / forward_last check it (from 64 MiB on)
  // before computing anything, so a batch that cannot fit fails at once with the bytes needed
  // and available instead of running out of memory layers later. In doubles: any B, L.
  double activation_bytes(int64_t B, int64_t L, bool all_logits, bool saved) const;
  void zero_grad();

  // ids: (B, L) token ids in [0, vocab), row-major. Returns logits (B, L, V_pad).
  // saved != nullptr receives what backward needs (replacing what it held); state != nullptr
  // receives the decode state after the last token (prefill).
  Tensor forward(std::span<const int32_t> ids, int64_t B, int64_t L, LMSaved* saved = nullptr,
                 LMState* state = nullptr) const;
  // The same, but the head only for the last position: logits (B, V_pad). For prefill,
  // where the other positions' logits are not needed (saves a (L-1) x V x d_model GEMM).
  Tensor forward_last(std::span<const int32_t> ids, int64_t B, int64_t L,
                      LMState* state = nullptr) const;
  // Prefill that CONTINUES from a decode state: ids (B, L) are the tokens after those `state` has
  // seen (new_state(B) for a fresh prompt; or a prefix's state, e.g. from a cache); returns the
  // logits of the last position (B, V_pad) and leaves `state` after the last token. Equal to
  // forward_last of the whole sequence and to L steps (within fp32 rounding, tests/test_prefill).
  // chunk > 0 runs the tokens through the model `chunk` at a time (the last chunk may be shorter),
  // so the activations held are those of B x chunk tokens, not B x L; 0 = one piece. A state of
  // another batch size, model or layer kind is refused before anything is computed. Inference
  // only (nothing is saved for backward). between_chunks, if set, is called after every chunk but
  // the last (the serving engine hands the cores to a decode step there); it must not touch
  // `state`.
  Tensor prefill(std::span<const int32_t> ids, int64_t B, int64_t L, LMState& state,
                 int64_t chunk = 0, const std::function<void()>& between_chunks = {}) const;
  // The chunk generate, bench and serve use by default (the measurements behind the choice:
  // docs/PERFORMANCE.md, "Chunked prefill").
  static constexpr int64_t kDefaultPrefillChunk = 192;
  // dlogits: (B, L, V_pad). Accumulates every parameter gradient (+=). Throws for weights that are
  // not fp32 and for an empty `saved` (forward was called without it). layer_done, if set, is
  // called with i right after block i's backward (from the last block down to 0): from then on
  // the gradients of backbone.layers.i.* are final for this call (data-parallel training starts
  // their reduction there, while the blocks below still run).
  void backward(const LMSaved& saved, const Tensor& dlogits,
                const std::function<void(int64_t)>& layer_done = {});

  LMState new_state(int64_t batch) const;  // zeros
  // One token per sequence: ids (B) -> logits (B, V_pad), advancing state.
  Tensor step(std::span<const int32_t> ids, LMState& state) const;
  Tensor step(std::initializer_list<int32_t> ids, LMState& state) const {
    return step(std::span<const int32_t>(ids.begin(), ids.size()), state);
  }

  const std::vector<Block>& blocks() const { return blocks_; }

 private:
  Tensor embed(std::span<const int32_t> ids, int64_t B, int64_t L) const;  // (B, L, d_model)
  Tensor head(const Tensor& hidden) const;                                 // (M, V_pad)
  Tensor final_norm(const Tensor& hidden, Tensor& residual) const;    // residual += hidden; norm_f
  Tensor last_logits(const Tensor& out, int64_t B, int64_t L) const;  // head of position L - 1
  // Embedding, blocks and norm_f: the normed hidden state (B, L, d_model).
  Tensor backbone(std::span<const int32_t> ids, int64_t B, int64_t L, LMSaved* sv,
                  LMState* state) const;
  // Every parameter with its full name (both const and mutable access).
  template <class Fn>
  void for_each_param(Fn&& fn) const;

  ModelConfig cfg_;
  ParamList own_;  // embedding, norm_f, (untied) lm_head
  std::vector<Block> blocks_;
  // Into own_ (stable addresses): the embedding, the head (the embedding when tied), norm_f.
  Param *emb_ = nullptr, *lm_head_ = nullptr, *norm_f_ = nullptr;
  // Every parameter as fp32 (16-bit ones converted back exactly), in named_parameters() order.
  std::vector<std::pair<std::string, Tensor>> state_f32() const;
  // load_state_dict over any source: names, their shapes, and `read` that writes one tensor
  // (by its name in the source) into a parameter's value, one tensor at a time.
  void load_tensors(const std::vector<std::string>& names,
                    const std::function<Shape(const std::string&)>& shape_of,
                    const std::function<void(const std::string&, Weight&)>& read,
                    const std::string& origin);
};

}  // namespace mamba
