// The language-model configuration: mamba_ssm's config.json (MambaConfig dataclass, with
// ssm_cfg / attn_cfg holding the mixer's keyword arguments) and the transformers
// MambaConfig / Mamba2Config keys of the *-hf folders, parsed into one validated struct.
// ssm_cfg is parsed once into the config struct of its mixer (a MixerConfig variant: Mamba1Config
// or Mamba2Config, chosen by ssm_cfg "layer", see nn/mixers.h); each mixer reads its own keys.
// Unknown keys, contradictory keys, wrong types and out-of-range values throw mamba::Error
// naming the key. to_json() writes mamba_ssm's format back (what MambaLMHeadModel reads).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "mamba/nn/mixers.h"

namespace mamba {

// mamba_ssm MHA keyword arguments (attn_cfg), used for the layers in attn_layer_idx: the MHA
// mixer's config struct (nn/mha.h).
using AttnConfig = MHAConfig;

struct ModelConfig {
  int64_t d_model = 0;
  int64_t d_intermediate = 0;  // GatedMLP hidden size after each mixer; 0 = no MLP
  int64_t n_layer = 0;
  int64_t vocab_size = 0;  // as given; the embedding has padded_vocab() rows
  // The mixer of every layer not in attn_layer_idx: its config struct, holding exactly the keys of
  // that mixer (their defaults are the mamba_ssm module's). ModelConfig::d_model is the model's
  // width: mixer() returns ssm_cfg with it applied (the copy parse() stores is already in sync).
  MixerConfig ssm_cfg;
  std::vector<int64_t> attn_layer_idx;  // layers that are MHA instead of the SSM mixer
  AttnConfig attn_cfg;                  // their config; attn_cfg.d_model is kept = d_model
  bool rms_norm = true;  // RMSNorm (true) or LayerNorm (false) for block norms and norm_f
  bool residual_in_fp32 = true;
  bool fused_add_norm = true;  // a kernel choice in mamba_ssm; same math either way
  int64_t pad_vocab_size_multiple = 8;
  bool tie_embeddings = true;
  double norm_epsilon = 1e-5;  // mamba_ssm's fixed default; HF layer_norm_epsilon
  // Token ids from an HF config (-1 when absent; mamba_ssm configs carry none).
  int64_t bos_token_id = -1, eos_token_id = -1, pad_token_id = -1;
  // "mamba_ssm" or "hf": which key set the file used (decides the tensor names).
  std::string source_format = "mamba_ssm";

  int64_t padded_vocab() const;  // vocab_size rounded up to pad_vocab_size_multiple
  int64_t d_inner() const;
  MixerConfig mixer() const;  // ssm_cfg with d_model = this d_model
  // The ssm_cfg of a given mixer, or nullptr when the model uses another one.
  template <class Cfg>
  const Cfg* mixer_if() const {
    return std::get_if<Cfg>(&ssm_cfg);
  }
  template <class Cfg>
  Cfg* mixer_if() {
    return std::get_if<Cfg>(&ssm_cfg);
  }
  bool is_attn_layer(int64_t i) const;
  // The mixer config of layer i: attn_cfg (an MHAConfig) for the layers in attn_layer_idx,
  // mixer() for the others.
  MixerConfig layer_mixer(int64_t i) const;

  // Parses config.json text (either key set; detected from the keys). `origin` names the
  // file in error messages.
  static ModelConfig parse(const std::string& json_text, const std::string& origin = "config.json");
  static ModelConfig load(const std::string& path);  // reads and parses a file
  // Checks ranges and consistency; parse() calls it. Throws mamba::Error naming the key.
  void validate() const;
  // mamba_ssm's config.json (MambaLMHeadModel / MambaConfig(**json) reads it back).
  std::string to_json() const;
  // transformers' MambaConfig / Mamba2Config keys (a *-hf folder). Throws for what those
  // classes cannot express (attention layers, MLPs, d_ssm < d_inner, the ablation).
  std::string to_hf_json() const;
  void save(const std::string& path) const;  // to_json(), written atomically
  bool operator==(const ModelConfig&) const = default;
};

// transformers tensor names (MambaForCausalLM / Mamba2ForCausalLM) -> mamba_ssm names:
// backbone.embeddings.weight -> backbone.embedding.weight; backbone.layers.N.{norm,mixer}.*,
// backbone.norm_f.weight and lm_head.weight are the same in both. Throws mamba::Error for a
// name that belongs to neither layout.
std::string hf_to_mamba_ssm_name(const std::string& hf_name);
// The reverse, for writing a folder transformers can read.
std::string mamba_ssm_to_hf_name(const std::string& name);

}  // namespace mamba
