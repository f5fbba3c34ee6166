// MHAConfig <-> config.json's attn_cfg: mamba_ssm MHA's keyword arguments, with the class defaults
// (causal false, no rotary, no conv, both biases on). embed_dim comes from the model's d_model.
#include <cmath>

#include "core/json_reader.h"
#include "mamba/error.h"
#include "mamba/nn/mha.h"

namespace mamba {

using json_io::check_range;

MHAConfig MHAConfig::from_ssm_cfg(json_io::KeyReader& r, int64_t d_model) {
  MHAConfig a;
  a.d_model = d_model;
  a.num_heads = r.integer("num_heads", a.num_heads);
  a.num_heads_kv = r.integer("num_heads_kv", a.num_heads_kv);
  a.head_dim = r.integer("head_dim", a.head_dim);
  a.mlp_dim = r.integer("mlp_dim", a.mlp_dim);
  a.qkv_proj_bias = r.boolean("qkv_proj_bias", a.qkv_proj_bias);
  a.out_proj_bias = r.boolean("out_proj_bias", a.out_proj_bias);
  a.softmax_scale = r.number("softmax_scale", a.softmax_scale);
  a.causal = r.boolean("causal", a.causal);
  a.rotary_emb_dim = r.integer("rotary_emb_dim", a.rotary_emb_dim);
  a.rotary_emb_base = r.number("rotary_emb_base", a.rotary_emb_base);
  a.rotary_emb_interleaved = r.boolean("rotary_emb_interleaved", a.rotary_emb_interleaved);
  a.d_conv = r.integer("d_conv", a.d_conv);
  return a;
}

const std::vector<std::string>& MHAConfig::ssm_cfg_keys() {
  static const std::vector<std::string> keys = {"num_heads",
                                                "num_heads_kv",
                                                "head_dim",
                                                "mlp_dim",
                                                "qkv_proj_bias",
                                                "out_proj_bias",
                                                "softmax_scale",
                                                "causal",
                                                "rotary_emb_dim",
                                                "rotary_emb_base",
                                                "rotary_emb_interleaved",
                                                "d_conv"};
  return keys;
}

void MHAConfig::check_ssm_cfg() const {
  check_range(num_heads, 1, 1 << 12, "attn_cfg.num_heads");
  check_range(num_heads_kv, 0, num_heads, "attn_cfg.num_heads_kv");
  MAMBA_CHECK(num_heads % heads_kv() == 0, "'attn_cfg.num_heads_kv' = ", heads_kv(),
              " does not divide 'attn_cfg.num_heads' = ", num_heads);
  check_range(head_dim, 0, 1 << 12, "attn_cfg.head_dim");
  MAMBA_CHECK(head_dim > 0 || d_model % num_heads == 0, "'attn_cfg.num_heads' = ", num_heads,
              " does not divide d_model = ", d_model, " (and attn_cfg.head_dim is not given)");
  check_range(mlp_dim, 0, 1 << 20, "attn_cfg.mlp_dim");
  check_range(d_conv, 0, 64, "attn_cfg.d_conv");
  check_range(rotary_emb_dim, 0, head(), "attn_cfg.rotary_emb_dim");
  MAMBA_CHECK(rotary_emb_dim % 2 == 0, "'attn_cfg.rotary_emb_dim' = ", rotary_emb_dim,
              " must be even");
  MAMBA_CHECK(std::isfinite(rotary_emb_base) && rotary_emb_base > 0,
              "'attn_cfg.rotary_emb_base' = ", rotary_emb_base, " must be > 0");
  MAMBA_CHECK(std::isfinite(softmax_scale) && softmax_scale >= 0,
              "'attn_cfg.softmax_scale' = ", softmax_scale, " must be > 0 (or null)");
  check_range(qkv_dim(), 1, 1 << 20, "attn_cfg: head_dim * (num_heads + 2 num_heads_kv)");
}

std::string MHAConfig::to_ssm_cfg() const {
  using json_io::ojson;
  auto opt = [](int64_t v) { return v ? ojson(v) : ojson(nullptr); };
  ojson a;
  a["num_heads"] = num_heads;
  a["num_heads_kv"] = opt(num_heads_kv);
  a["head_dim"] = opt(head_dim);
  a["mlp_dim"] = mlp_dim;
  a["qkv_proj_bias"] = qkv_proj_bias;
  a["out_proj_bias"] = out_proj_bias;
  a["softmax_scale"] = softmax_scale ? ojson(softmax_scale) : ojson(nullptr);
  a["causal"] = causal;
  a["rotary_emb_dim"] = rotary_emb_dim;
  a["rotary_emb_base"] = json_io::number(rotary_emb_base);
  a["rotary_emb_interleaved"] = rotary_emb_interleaved;
  a["d_conv"] = d_conv;
  return json_io::dump_python_json(a, -1);
}

}  // namespace mamba
