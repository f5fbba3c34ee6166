// config.json parsing for mamba_ssm's MambaConfig and transformers' MambaConfig /
// Mamba2Config. Each JSON object is read through a KeyReader that records which keys were
// consumed, so any key left over is reported by name as unknown.
#include "mamba/config.h"

#include <cctype>
#include <cmath>
#include <nlohmann/json.hpp>
#include <set>
#include <tuple>

#include "mamba/error.h"
#include "mamba/os.h"

namespace mamba {

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

const char* const kInf = "__mamba_json_Infinity__";
const char* const kNegInf = "__mamba_json_-Infinity__";
const char* const kNaN = "__mamba_json_NaN__";

// Python's json module writes Infinity / -Infinity / NaN (HF Mamba2Config's time_step_limit is
// (0.0, inf)); standard JSON has no such tokens. Outside strings, they become sentinel strings.
std::string replace_python_constants(const std::string& t) {
  std::string out;
  out.reserve(t.size());
  bool in_str = false;
  for (size_t i = 0; i < t.size(); ++i) {
    char c = t[i];
    if (in_str) {
      out += c;
      if (c == '\\' && i + 1 < t.size()) out += t[++i];
      else if (c == '"') in_str = false;
      continue;
    }
    if (c == '"') {
      in_str = true;
      out += c;
    } else if (t.compare(i, 8, "Infinity") == 0) {
      out += str('"', kInf, '"'), i += 7;
    } else if (t.compare(i, 9, "-Infinity") == 0) {
      out += str('"', kNegInf, '"'), i += 8;
    } else if (t.compare(i, 3, "NaN") == 0) {
      out += str('"', kNaN, '"'), i += 2;
    } else {
      out += c;
    }
  }
  return out;
}

class KeyReader {
 public:
  KeyReader(const json& j, std::string prefix) : j_(j), prefix_(std::move(prefix)) {
    MAMBA_CHECK(j_.is_object(), "'", prefix_.empty() ? "config" : prefix_.substr(0, prefix_.size() - 1),
                "' must be a JSON object, got ", j_.type_name());
  }
  // Present and not null.
  bool has(const std::string& k) const { return j_.contains(k) && !j_.at(k).is_null(); }
  const json& raw(const std::string& k) {
    used_.insert(k);
    return j_.at(k);
  }
  std::string name(const std::string& k) const { return prefix_ + k; }

  int64_t integer(const std::string& k, int64_t def) {
    used_.insert(k);
    if (!has(k)) return def;
    const json& v = j_.at(k);
    if (v.is_number_float()) {
      double d = v.get<double>();
      MAMBA_CHECK(std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15, "'", name(k),
                  "' must be an integer, got ", v.dump());
      return static_cast<int64_t>(d);
    }
    MAMBA_CHECK(v.is_number_integer(), "'", name(k), "' must be an integer, got ", v.dump());
    MAMBA_CHECK(v.is_number_unsigned() || v.get<int64_t>() > INT64_MIN, "'", name(k), "' is out of range");
    MAMBA_CHECK(!v.is_number_unsigned() || v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX), "'", name(k),
                "' is out of range");
    return v.get<int64_t>();
  }
  double number(const std::string& k, double def) {
    used_.insert(k);
    if (!has(k)) return def;
    return to_number(j_.at(k), name(k));
  }
  static double to_number(const json& v, const std::string& what) {
    if (v.is_string() && v.get<std::string>() == kInf) return INFINITY;
    if (v.is_string() && v.get<std::string>() == kNegInf) return -INFINITY;
    MAMBA_CHECK(v.is_number(), "'", what, "' must be a number, got ", v.dump());
    return v.get<double>();
  }
  bool boolean(const std::string& k, bool def) {
    used_.insert(k);
    if (!has(k)) return def;
    const json& v = j_.at(k);
    MAMBA_CHECK(v.is_boolean(), "'", name(k), "' must be true or false, got ", v.dump());
    return v.get<bool>();
  }
  std::string string(const std::string& k, const std::string& def) {
    used_.insert(k);
    if (!has(k)) return def;
    const json& v = j_.at(k);
    MAMBA_CHECK(v.is_string(), "'", name(k), "' must be a string, got ", v.dump());
    return v.get<std::string>();
  }
  // Two numbers [lo, hi].
  std::pair<double, double> pair(const std::string& k, std::pair<double, double> def) {
    used_.insert(k);
    if (!has(k)) return def;
    const json& v = j_.at(k);
    MAMBA_CHECK(v.is_array() && v.size() == 2, "'", name(k), "' must be a list of two numbers, got ", v.dump());
    return {to_number(v[0], name(k)), to_number(v[1], name(k))};
  }
  void ignore(std::initializer_list<const char*> keys) {
    for (const char* k : keys) used_.insert(k);
  }
  // Throws for the first key nobody consumed.
  void finish(const std::string& context) const {
    for (auto it = j_.begin(); it != j_.end(); ++it)
      MAMBA_CHECK(used_.count(it.key()), "unknown key '", name(it.key()), "' in ", context);
  }

 private:
  const json& j_;
  std::string prefix_;
  std::set<std::string> used_;
};

// transformers bookkeeping keys that do not change the model's math.
const std::initializer_list<const char*> kBenignHfKeys = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "use_cache",
    "initializer_range", "rescale_prenorm_residual", "use_mambapy", "output_hidden_states",
    "output_attentions", "return_dict", "auto_map", "model_type", "sep_token_id", "unk_token_id",
    "_commit_hash", "_attn_implementation_autoset", "is_encoder_decoder", "use_return_dict",
    "time_step_rank_auto"};

int64_t token_id(KeyReader& r, const std::string& k) {
  if (!r.has(k)) {
    r.ignore({});
    r.integer(k, -1);  // marks it used (it is null or absent)
    return -1;
  }
  const json& v = r.raw(k);
  if (v.is_array()) {  // eos_token_id may be a list; the first one is the main one
    MAMBA_CHECK(!v.empty() && v[0].is_number_integer(), "'", r.name(k), "' must be an integer or a list of them");
    return v[0].get<int64_t>();
  }
  return r.integer(k, -1);
}

void check_range(int64_t v, int64_t lo, int64_t hi, const std::string& key) {
  MAMBA_CHECK(v >= lo && v <= hi, "'", key, "' = ", v, " is out of range [", lo, ", ", hi, "]");
}

SsmConfig parse_ssm_cfg(const json& j, int64_t d_model) {
  KeyReader r(j, "ssm_cfg.");
  std::string layer = r.string("layer", "Mamba1");
  MAMBA_CHECK(layer == "Mamba1" || layer == "Mamba2", "'ssm_cfg.layer' = '", layer,
              "' is not supported (expected \"Mamba1\" or \"Mamba2\")");
  SsmConfig s = SsmConfig::defaults(layer);
  s.d_state = r.integer("d_state", s.d_state);
  s.d_conv = r.integer("d_conv", s.d_conv);
  s.expand = r.number("expand", s.expand);
  s.dt_min = r.number("dt_min", s.dt_min);
  s.dt_max = r.number("dt_max", s.dt_max);
  s.dt_init_floor = r.number("dt_init_floor", s.dt_init_floor);
  s.bias = r.boolean("bias", s.bias);
  s.conv_bias = r.boolean("conv_bias", s.conv_bias);
  if (layer == "Mamba1") {
    if (r.has("dt_rank") && r.raw("dt_rank").is_string()) {
      std::string v = r.string("dt_rank", "auto");
      MAMBA_CHECK(v == "auto", "'ssm_cfg.dt_rank' must be an integer or \"auto\", got \"", v, "\"");
    } else if (r.has("dt_rank")) {
      s.dt_rank = r.integer("dt_rank", 0), s.dt_rank_auto = false;
    }
    s.dt_scale = r.number("dt_scale", s.dt_scale);
    s.dt_init = r.string("dt_init", s.dt_init);
    s.selective = r.boolean("selective", s.selective);
    MAMBA_CHECK(s.dt_init == "random" || s.dt_init == "constant", "'ssm_cfg.dt_init' = \"", s.dt_init,
                "\" (expected \"random\" or \"constant\")");
    r.ignore({"use_fast_path"});
    r.boolean("use_fast_path", true);
  } else {
    s.headdim = r.integer("headdim", s.headdim);
    s.ngroups = r.integer("ngroups", s.ngroups);
    s.chunk_size = r.integer("chunk_size", s.chunk_size);
    s.d_ssm = r.integer("d_ssm", 0);
    s.rmsnorm = r.boolean("rmsnorm", s.rmsnorm);
    s.norm_before_gate = r.boolean("norm_before_gate", s.norm_before_gate);
    s.D_has_hdim = r.boolean("D_has_hdim", s.D_has_hdim);
    std::tie(s.A_init_lo, s.A_init_hi) = r.pair("A_init_range", {s.A_init_lo, s.A_init_hi});
    std::tie(s.dt_limit_lo, s.dt_limit_hi) = r.pair("dt_limit", {s.dt_limit_lo, s.dt_limit_hi});
    r.boolean("use_mem_eff_path", true);
    r.boolean("sequence_parallel", true);
    r.number("conv_init", 0);  // initialisation only
  }
  if (s.dt_rank_auto) s.dt_rank = (d_model + 15) / 16;
  try {
    r.finish(str("a ", layer, " ssm_cfg"));
  } catch (const Error& e) {
    // Name the other layer when the key belongs to it.
    static const std::set<std::string> m1 = {"dt_rank", "dt_scale", "dt_init", "use_fast_path", "selective"};
    static const std::set<std::string> m2 = {"headdim", "ngroups", "chunk_size", "d_ssm", "rmsnorm",
                                             "norm_before_gate", "D_has_hdim", "A_init_range", "dt_limit",
                                             "use_mem_eff_path", "sequence_parallel", "conv_init"};
    for (auto it = j.begin(); it != j.end(); ++it) {
      const auto& other = layer == "Mamba1" ? m2 : m1;
      MAMBA_CHECK(!other.count(it.key()), "'ssm_cfg.", it.key(), "' is a parameter of ",
                  layer == "Mamba1" ? "Mamba2" : "Mamba1", ", not of ", layer);
    }
    throw;
  }
  return s;
}

AttnConfig parse_attn_cfg(const json& j) {
  KeyReader r(j, "attn_cfg.");
  AttnConfig a;
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
  r.finish("attn_cfg");
  return a;
}

ModelConfig parse_mamba_ssm(const json& j) {
  KeyReader r(j, "");
  ModelConfig c;
  c.source_format = "mamba_ssm";
  c.d_model = r.integer("d_model", 2560);  // MambaConfig defaults
  c.d_intermediate = r.integer("d_intermediate", 0);
  c.n_layer = r.integer("n_layer", 64);
  c.vocab_size = r.integer("vocab_size", 50277);
  c.ssm_cfg = parse_ssm_cfg(r.has("ssm_cfg") ? r.raw("ssm_cfg") : json::object(), c.d_model);
  r.ignore({"ssm_cfg"});
  if (r.has("attn_layer_idx")) {
    const json& v = r.raw("attn_layer_idx");
    MAMBA_CHECK(v.is_array(), "'attn_layer_idx' must be a list of layer indices, got ", v.dump());
    for (const auto& x : v) {
      MAMBA_CHECK(x.is_number_integer(), "'attn_layer_idx' must hold integers, got ", x.dump());
      c.attn_layer_idx.push_back(x.get<int64_t>());
    }
  }
  r.ignore({"attn_layer_idx", "attn_cfg"});
  if (r.has("attn_cfg")) c.attn_cfg = parse_attn_cfg(r.raw("attn_cfg"));
  c.rms_norm = r.boolean("rms_norm", true);
  c.residual_in_fp32 = r.boolean("residual_in_fp32", true);
  c.fused_add_norm = r.boolean("fused_add_norm", true);
  c.pad_vocab_size_multiple = r.integer("pad_vocab_size_multiple", 8);
  c.tie_embeddings = r.boolean("tie_embeddings", true);
  r.finish("a mamba_ssm config (MambaConfig has no such field)");
  return c;
}

// transformers MambaConfig (model_type "mamba") / Mamba2Config ("mamba2").
ModelConfig parse_hf(const json& j) {
  KeyReader r(j, "");
  MAMBA_CHECK(r.has("model_type"), "'model_type' is missing (a transformers config needs \"mamba\" or \"mamba2\")");
  const std::string mt = r.string("model_type", "");
  MAMBA_CHECK(mt == "mamba" || mt == "mamba2", "'model_type' = \"", mt,
              "\" is not supported (expected \"mamba\" or \"mamba2\")");
  const bool m2 = mt == "mamba2";
  ModelConfig c;
  c.source_format = "hf";
  c.ssm_cfg = SsmConfig::defaults(m2 ? "Mamba2" : "Mamba1");
  SsmConfig& s = c.ssm_cfg;
  // Mamba2Config / MambaConfig defaults
  c.vocab_size = r.integer("vocab_size", m2 ? 32768 : 50280);
  c.d_model = r.integer("hidden_size", m2 ? 4096 : 768);
  s.d_state = r.integer("state_size", m2 ? 128 : 16);
  c.n_layer = r.integer("num_hidden_layers", m2 ? 64 : 32);
  c.norm_epsilon = r.number("layer_norm_epsilon", 1e-5);
  s.expand = r.number("expand", 2);
  s.d_conv = r.integer("conv_kernel", 4);
  s.bias = r.boolean("use_bias", false);
  s.conv_bias = r.boolean("use_conv_bias", true);
  c.residual_in_fp32 = r.boolean("residual_in_fp32", true);
  c.tie_embeddings = r.boolean("tie_word_embeddings", !m2);
  c.bos_token_id = token_id(r, "bos_token_id");
  c.eos_token_id = token_id(r, "eos_token_id");
  c.pad_token_id = token_id(r, "pad_token_id");
  const std::string act = r.string("hidden_act", "silu");
  MAMBA_CHECK(act == "silu", "'hidden_act' = \"", act, "\" is not supported (Mamba uses \"silu\")");
  s.dt_min = r.number("time_step_min", s.dt_min);
  s.dt_max = r.number("time_step_max", s.dt_max);
  s.dt_init_floor = r.number("time_step_floor", s.dt_init_floor);
  c.fused_add_norm = r.boolean("fused_add_norm", true);  // kept by the mamba_ssm converter
  c.pad_vocab_size_multiple = r.integer("pad_vocab_size_multiple", 1);
  // The HF model's embedding has exactly vocab_size rows.
  MAMBA_CHECK(c.pad_vocab_size_multiple >= 1 && c.vocab_size % c.pad_vocab_size_multiple == 0,
              "'pad_vocab_size_multiple' = ", c.pad_vocab_size_multiple, " contradicts 'vocab_size' = ",
              c.vocab_size, ": a transformers checkpoint has exactly vocab_size embedding rows");
  if (r.has("n_layer"))
    MAMBA_CHECK(r.integer("n_layer", 0) == c.n_layer, "'n_layer' = ", r.integer("n_layer", 0),
                " contradicts 'num_hidden_layers' = ", c.n_layer);
  if (r.has("d_model"))
    MAMBA_CHECK(r.integer("d_model", 0) == c.d_model, "'d_model' = ", r.integer("d_model", 0),
                " contradicts 'hidden_size' = ", c.d_model);
  if (r.has("intermediate_size"))
    MAMBA_CHECK(r.integer("intermediate_size", 0) == s.d_inner(c.d_model), "'intermediate_size' = ",
                r.integer("intermediate_size", 0), " contradicts expand * hidden_size = ", s.d_inner(c.d_model));
  // time_step_rank: "auto" or an int; Mamba2 has no dt_proj and ignores it.
  int64_t rank = (c.d_model + 15) / 16;
  bool rank_auto = true;
  if (r.has("time_step_rank")) {
    const json& v = r.raw("time_step_rank");
    if (v.is_string()) {
      MAMBA_CHECK(v.get<std::string>() == "auto", "'time_step_rank' must be an integer or \"auto\", got ",
                  v.dump());
    } else {
      rank = r.integer("time_step_rank", rank), rank_auto = false;
    }
  }
  if (!m2) {
    c.rms_norm = r.boolean("rms_norm", true);
    MAMBA_CHECK(c.rms_norm, "'rms_norm' = false contradicts model_type \"mamba\" (transformers' Mamba "
                            "always uses RMSNorm)");
    s.dt_rank = rank;
    // transformers resolves "auto" to ceil(hidden_size / 16) before saving; keep "auto" when equal.
    s.dt_rank_auto = rank_auto || rank == (c.d_model + 15) / 16;
    s.dt_scale = r.number("time_step_scale", s.dt_scale);
    s.dt_init = r.string("time_step_init_scheme", s.dt_init);
    MAMBA_CHECK(s.dt_init == "random" || s.dt_init == "constant", "'time_step_init_scheme' = \"", s.dt_init,
                "\" (expected \"random\" or \"constant\")");
  } else {
    s.dt_rank = (c.d_model + 15) / 16;
    s.rmsnorm = r.boolean("rms_norm", true);  // Mamba2's gated norm before out_proj
    s.norm_before_gate = r.boolean("norm_before_gate", false);
    s.ngroups = r.integer("n_groups", m2 ? 8 : 1);
    s.chunk_size = r.integer("chunk_size", 256);
    s.headdim = r.integer("head_dim", 64);
    std::tie(s.dt_limit_lo, s.dt_limit_hi) = r.pair("time_step_limit", {s.dt_limit_lo, s.dt_limit_hi});
    const int64_t nh = r.integer("num_heads", 128);
    MAMBA_CHECK(s.headdim > 0 && nh * s.headdim == s.d_inner(c.d_model), "'num_heads' = ", nh,
                " times 'head_dim' = ", s.headdim, " contradicts expand * hidden_size = ", s.d_inner(c.d_model));
  }
  r.ignore(kBenignHfKeys);
  r.finish(str("a transformers ", m2 ? "Mamba2Config" : "MambaConfig"));
  return c;
}

}  // namespace

SsmConfig SsmConfig::defaults(const std::string& layer) {
  MAMBA_CHECK(layer == "Mamba1" || layer == "Mamba2", "unknown SSM layer '", layer,
              "' (expected \"Mamba1\" or \"Mamba2\")");
  SsmConfig s;
  s.layer = layer;
  if (layer == "Mamba2") s.d_state = 128;
  return s;
}

int64_t ModelConfig::padded_vocab() const {
  const int64_t m = pad_vocab_size_multiple;
  return vocab_size % m == 0 ? vocab_size : vocab_size + (m - vocab_size % m);
}

bool ModelConfig::is_attn_layer(int64_t i) const {
  for (int64_t a : attn_layer_idx)
    if (a == i) return true;
  return false;
}

void ModelConfig::validate() const {
  check_range(d_model, 1, 1 << 16, "d_model");
  check_range(n_layer, 1, 1 << 12, "n_layer");
  check_range(vocab_size, 1, 1 << 24, "vocab_size");
  check_range(pad_vocab_size_multiple, 1, 1 << 16, "pad_vocab_size_multiple");
  check_range(d_intermediate, 0, 1 << 20, "d_intermediate");
  MAMBA_CHECK(norm_epsilon > 0 && norm_epsilon < 1, "'norm_epsilon' = ", norm_epsilon, " is out of range (0, 1)");
  const SsmConfig& s = ssm_cfg;
  MAMBA_CHECK(s.layer == "Mamba1" || s.layer == "Mamba2", "'ssm_cfg.layer' = '", s.layer, "' is not supported");
  check_range(s.d_state, 1, 1 << 12, "ssm_cfg.d_state");
  check_range(s.d_conv, 1, 64, "ssm_cfg.d_conv");
  MAMBA_CHECK(std::isfinite(s.expand) && s.expand > 0 && s.expand <= 64, "'ssm_cfg.expand' = ", s.expand,
              " is out of range (0, 64]");
  check_range(s.d_inner(d_model), 1, 1 << 20, "ssm_cfg.expand * d_model (d_inner)");
  MAMBA_CHECK(s.dt_min > 0 && s.dt_max >= s.dt_min, "'ssm_cfg.dt_min' = ", s.dt_min, " and 'ssm_cfg.dt_max' = ",
              s.dt_max, " contradict (need 0 < dt_min <= dt_max)");
  if (s.layer == "Mamba1") {
    check_range(s.dt_rank, 1, 1 << 16, "ssm_cfg.dt_rank");
  } else {
    check_range(s.headdim, 1, 1 << 12, "ssm_cfg.headdim");
    check_range(s.ngroups, 1, 1 << 12, "ssm_cfg.ngroups");
    check_range(s.chunk_size, 1, 1 << 16, "ssm_cfg.chunk_size");
    check_range(s.d_ssm, 0, s.d_inner(d_model), "ssm_cfg.d_ssm");
    const int64_t dssm = s.ssm_dim(d_model);
    MAMBA_CHECK(dssm % s.headdim == 0, "'ssm_cfg.headdim' = ", s.headdim, " does not divide the SSM width ", dssm,
                " (expand * d_model", s.d_ssm ? " or d_ssm" : "", ")");
    MAMBA_CHECK(s.nheads(d_model) % s.ngroups == 0, "'ssm_cfg.ngroups' = ", s.ngroups,
                " does not divide the number of heads ", s.nheads(d_model));
    MAMBA_CHECK(!(s.dt_limit_lo < 0) && s.dt_limit_hi > s.dt_limit_lo, "'ssm_cfg.dt_limit' = [", s.dt_limit_lo,
                ", ", s.dt_limit_hi, "] is not a range 0 <= lo < hi");
  }
  std::set<int64_t> seen;
  for (int64_t i : attn_layer_idx) {
    MAMBA_CHECK(i >= 0 && i < n_layer, "'attn_layer_idx' holds ", i, ", outside [0, n_layer = ", n_layer, ")");
    MAMBA_CHECK(seen.insert(i).second, "'attn_layer_idx' holds ", i, " twice");
  }
  if (!attn_layer_idx.empty()) {
    const AttnConfig& a = attn_cfg;
    check_range(a.num_heads, 1, 1 << 12, "attn_cfg.num_heads");
    check_range(a.num_heads_kv, 0, a.num_heads, "attn_cfg.num_heads_kv");
    MAMBA_CHECK(a.num_heads_kv == 0 || a.num_heads % a.num_heads_kv == 0, "'attn_cfg.num_heads_kv' = ",
                a.num_heads_kv, " does not divide 'attn_cfg.num_heads' = ", a.num_heads);
    MAMBA_CHECK(a.head_dim > 0 || d_model % a.num_heads == 0, "'attn_cfg.num_heads' = ", a.num_heads,
                " does not divide d_model = ", d_model, " (and attn_cfg.head_dim is not given)");
    check_range(a.head_dim, 0, 1 << 12, "attn_cfg.head_dim");
    check_range(a.mlp_dim, 0, 1 << 20, "attn_cfg.mlp_dim");
    check_range(a.d_conv, 0, 64, "attn_cfg.d_conv");
    const int64_t hd = a.head_dim ? a.head_dim : d_model / a.num_heads;
    check_range(a.rotary_emb_dim, 0, hd, "attn_cfg.rotary_emb_dim");
  }
}

ModelConfig ModelConfig::parse(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(replace_python_constants(text));
  } catch (const json::exception& e) {
    throw Error(str(origin, ": not valid JSON: ", e.what()));
  }
  try {
    MAMBA_CHECK(j.is_object(), "the top level must be a JSON object, got ", j.type_name());
    const bool hf = j.contains("model_type") || j.contains("hidden_size") || j.contains("num_hidden_layers");
    ModelConfig c = hf ? parse_hf(j) : parse_mamba_ssm(j);
    c.validate();
    return c;
  } catch (const Error& e) {
    throw Error(str(origin, ": ", e.what()));
  } catch (const json::exception& e) {
    throw Error(str(origin, ": ", e.what()));
  }
}

ModelConfig ModelConfig::load(const std::string& path) {
  std::vector<uint8_t> b = os::read_file(path, 16ull << 20);
  return parse(std::string(b.begin(), b.end()), path);
}

std::string ModelConfig::to_json() const {
  validate();
  MAMBA_CHECK(norm_epsilon == 1e-5, "to_json: norm_epsilon = ", norm_epsilon,
              " cannot be written in mamba_ssm's config.json (MambaLMHeadModel fixes it at 1e-5)");
  auto num = [](double v) -> ojson {
    if (std::isinf(v)) return v > 0 ? kInf : kNegInf;
    if (v == std::floor(v) && std::fabs(v) < 9e15) return static_cast<int64_t>(v);
    return v;
  };
  const SsmConfig& s = ssm_cfg;
  ojson ssm;
  ssm["layer"] = s.layer;
  ssm["d_state"] = s.d_state;
  ssm["d_conv"] = s.d_conv;
  ssm["expand"] = num(s.expand);
  if (s.layer == "Mamba1") {
    ssm["dt_rank"] = s.dt_rank_auto ? ojson("auto") : ojson(s.dt_rank);
    ssm["dt_min"] = s.dt_min;
    ssm["dt_max"] = s.dt_max;
    ssm["dt_init"] = s.dt_init;
    ssm["dt_scale"] = s.dt_scale;
    ssm["dt_init_floor"] = s.dt_init_floor;
    if (!s.selective) ssm["selective"] = false;
  } else {
    ssm["headdim"] = s.headdim;
    ssm["d_ssm"] = s.d_ssm ? ojson(s.d_ssm) : ojson(nullptr);
    ssm["ngroups"] = s.ngroups;
    ssm["A_init_range"] = {num(s.A_init_lo), num(s.A_init_hi)};
    ssm["D_has_hdim"] = s.D_has_hdim;
    ssm["rmsnorm"] = s.rmsnorm;
    ssm["norm_before_gate"] = s.norm_before_gate;
    ssm["dt_min"] = s.dt_min;
    ssm["dt_max"] = s.dt_max;
    ssm["dt_init_floor"] = s.dt_init_floor;
    if (!(s.dt_limit_lo == 0 && std::isinf(s.dt_limit_hi))) ssm["dt_limit"] = {num(s.dt_limit_lo), num(s.dt_limit_hi)};
    ssm["chunk_size"] = s.chunk_size;
  }
  ssm["bias"] = s.bias;
  ssm["conv_bias"] = s.conv_bias;
  ojson attn = ojson::object();
  if (!(attn_cfg == AttnConfig{})) {
    const AttnConfig& a = attn_cfg;
    auto opt = [](int64_t v) { return v ? ojson(v) : ojson(nullptr); };
    attn["num_heads"] = a.num_heads;
    attn["num_heads_kv"] = opt(a.num_heads_kv);
    attn["head_dim"] = opt(a.head_dim);
    attn["mlp_dim"] = a.mlp_dim;
    attn["qkv_proj_bias"] = a.qkv_proj_bias;
    attn["out_proj_bias"] = a.out_proj_bias;
    attn["softmax_scale"] = a.softmax_scale ? ojson(a.softmax_scale) : ojson(nullptr);
    attn["causal"] = a.causal;
    attn["rotary_emb_dim"] = a.rotary_emb_dim;
    attn["rotary_emb_base"] = a.rotary_emb_base;
    attn["rotary_emb_interleaved"] = a.rotary_emb_interleaved;
    attn["d_conv"] = a.d_conv;
  }
  ojson j;
  j["d_model"] = d_model;
  j["d_intermediate"] = d_intermediate;
  j["n_layer"] = n_layer;
  j["vocab_size"] = vocab_size;
  j["ssm_cfg"] = ssm;
  j["attn_layer_idx"] = attn_layer_idx;
  j["attn_cfg"] = attn;
  j["rms_norm"] = rms_norm;
  j["residual_in_fp32"] = residual_in_fp32;
  j["fused_add_norm"] = fused_add_norm;
  j["pad_vocab_size_multiple"] = pad_vocab_size_multiple;
  j["tie_embeddings"] = tie_embeddings;
  std::string out = j.dump(4);
  // Python's json reads Infinity; standard JSON has no token for it.
  for (auto [from, to] : {std::pair<std::string, std::string>{str('"', kInf, '"'), "Infinity"},
                          {str('"', kNegInf, '"'), "-Infinity"}})
    for (size_t p; (p = out.find(from)) != std::string::npos;) out.replace(p, from.size(), to);
  return out;
}

std::string ModelConfig::to_hf_json() const {
  validate();
  const SsmConfig& s = ssm_cfg;
  const bool m2 = s.is_mamba2();
  MAMBA_CHECK(attn_layer_idx.empty() && d_intermediate == 0,
              "to_hf_json: attention layers and MLPs have no transformers MambaConfig keys");
  MAMBA_CHECK(s.selective, "to_hf_json: the non-selective ablation is a mamba.cpp extension transformers cannot load");
  MAMBA_CHECK(!m2 || (s.ssm_dim(d_model) == s.d_inner(d_model) && !s.D_has_hdim),
              "to_hf_json: d_ssm < d_inner or D_has_hdim have no transformers Mamba2Config keys");
  auto num = [](double v) -> ojson {
    if (std::isinf(v)) return v > 0 ? kInf : kNegInf;
    if (v == std::floor(v) && std::fabs(v) < 9e15) return static_cast<int64_t>(v);
    return v;
  };
  ojson j;
  j["architectures"] = {m2 ? "Mamba2ForCausalLM" : "MambaForCausalLM"};
  j["model_type"] = m2 ? "mamba2" : "mamba";
  j["hidden_size"] = d_model;
  j["num_hidden_layers"] = n_layer;
  j["vocab_size"] = padded_vocab();  // a transformers embedding has exactly vocab_size rows
  j["pad_vocab_size_multiple"] = pad_vocab_size_multiple;
  j["state_size"] = s.d_state;
  j["conv_kernel"] = s.d_conv;
  j["expand"] = num(s.expand);
  j["use_bias"] = s.bias;
  j["use_conv_bias"] = s.conv_bias;
  j["residual_in_fp32"] = residual_in_fp32;
  j["tie_word_embeddings"] = tie_embeddings;
  j["layer_norm_epsilon"] = norm_epsilon;
  j["hidden_act"] = "silu";
  j["time_step_min"] = s.dt_min;
  j["time_step_max"] = s.dt_max;
  j["time_step_floor"] = s.dt_init_floor;
  if (!m2) {
    j["time_step_rank"] = s.dt_rank;
    j["time_step_scale"] = s.dt_scale;
    j["time_step_init_scheme"] = s.dt_init;
  } else {
    j["num_heads"] = s.nheads(d_model);
    j["head_dim"] = s.headdim;
    j["n_groups"] = s.ngroups;
    j["chunk_size"] = s.chunk_size;
    j["rms_norm"] = s.rmsnorm;
    j["norm_before_gate"] = s.norm_before_gate;
    j["time_step_limit"] = {num(s.dt_limit_lo), num(s.dt_limit_hi)};
  }
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_id >= 0) j["eos_token_id"] = eos_token_id;
  if (pad_token_id >= 0) j["pad_token_id"] = pad_token_id;
  std::string out = j.dump(2);
  for (auto [from, to] : {std::pair<std::string, std::string>{str('"', kInf, '"'), "Infinity"},
                          {str('"', kNegInf, '"'), "-Infinity"}})
    for (size_t p; (p = out.find(from)) != std::string::npos;) out.replace(p, from.size(), to);
  return out;
}

void ModelConfig::save(const std::string& path) const {
  std::string s = to_json();
  os::write_file_atomic(path, s.data(), s.size());
}

namespace {
// "backbone.layers.<digits>." prefix length, or 0.
size_t layer_prefix(const std::string& n) {
  const std::string pre = "backbone.layers.";
  if (n.compare(0, pre.size(), pre) != 0) return 0;
  size_t i = pre.size(), start = i;
  while (i < n.size() && std::isdigit(static_cast<unsigned char>(n[i]))) ++i;
  if (i == start || i - start > 6 || i >= n.size() || n[i] != '.') return 0;
  return i + 1;
}
bool shared_name(const std::string& n) {
  if (n == "backbone.norm_f.weight" || n == "lm_head.weight") return true;
  size_t p = layer_prefix(n);
  if (!p) return false;
  std::string rest = n.substr(p);
  return rest == "norm.weight" || rest == "norm.bias" || (rest.rfind("mixer.", 0) == 0 && rest.size() > 6) ||
         (rest.rfind("mlp.", 0) == 0 && rest.size() > 4) || rest == "norm2.weight" || rest == "norm2.bias";
}
}  // namespace

std::string hf_to_mamba_ssm_name(const std::string& n) {
  if (n == "backbone.embeddings.weight") return "backbone.embedding.weight";
  if (n == "backbone.norm_f.bias") return n;
  MAMBA_CHECK(shared_name(n), "tensor '", n, "' is not a transformers Mamba/Mamba2 parameter name");
  return n;
}

std::string mamba_ssm_to_hf_name(const std::string& n) {
  if (n == "backbone.embedding.weight") return "backbone.embeddings.weight";
  if (n == "backbone.norm_f.bias") return n;
  MAMBA_CHECK(shared_name(n), "tensor '", n, "' is not a mamba_ssm MambaLMHeadModel parameter name");
  return n;
}

}  // namespace mamba
