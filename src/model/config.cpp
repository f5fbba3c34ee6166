// config.json parsing for mamba_ssm's MambaConfig and transformers' MambaConfig /
// Mamba2Config. Each JSON object is read through a json_io::KeyReader that records which keys
// were consumed, so any key left over is reported by name as unknown. ssm_cfg is read by the
// config struct of the mixer its "layer" names (nn/mixers.h), never by string compares here.
#include "mamba/config.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <optional>
#include <set>
#include <tuple>

#include "core/json_reader.h"
#include "core/os.h"
#include "mamba/error.h"

namespace mamba {

namespace {

using json_io::check_range;
using json_io::json;
using json_io::KeyReader;
using json_io::ojson;

// transformers bookkeeping keys that do not change the model's math.
const std::initializer_list<const char*> kBenignHfKeys = {"architectures",
                                                          "torch_dtype",
                                                          "dtype",
                                                          "transformers_version",
                                                          "_name_or_path",
                                                          "use_cache",
                                                          "initializer_range",
                                                          "rescale_prenorm_residual",
                                                          "use_mambapy",
                                                          "output_hidden_states",
                                                          "output_attentions",
                                                          "return_dict",
                                                          "auto_map",
                                                          "model_type",
                                                          "sep_token_id",
                                                          "unk_token_id",
                                                          "_commit_hash",
                                                          "_attn_implementation_autoset",
                                                          "is_encoder_decoder",
                                                          "use_return_dict",
                                                          "time_step_rank_auto"};

int64_t token_id(KeyReader& r, const std::string& k) {
  if (!r.has(k)) {
    r.ignore({});
    r.integer(k, -1);  // marks it used (it is null or absent)
    return -1;
  }
  const json& v = r.raw(k);
  if (v.is_array()) {  // eos_token_id may be a list; the first one is the main one
    MAMBA_CHECK(!v.empty() && v[0].is_number_integer(), "'", r.name(k),
                "' must be an integer or a list of them");
    return v[0].get<int64_t>();
  }
  return r.integer(k, -1);
}

MixerConfig parse_ssm_cfg(const json& j, int64_t d_model) {
  KeyReader r(j, "ssm_cfg.");
  const std::string layer = r.string("layer", Mixers::default_name());
  std::optional<MixerConfig> out;
  Mixers::for_each([&](auto t) {
    using M = typename decltype(t)::type;
    if constexpr (!is_attention_mixer<M>)
      if (layer == M::kName) out = M::Config::from_ssm_cfg(r, d_model);
  });
  MAMBA_CHECK(layer != MHA::kName, "'ssm_cfg.layer' = '", layer,
              "' is not an SSM layer: attention layers are chosen by attn_layer_idx and configured "
              "by attn_cfg");
  MAMBA_CHECK(out.has_value(), "'ssm_cfg.layer' = '", layer, "' is not supported (expected one of ",
              Mixers::names(), ")");
  // A key left over: name the mixer it belongs to when it is another one's.
  for (const std::string& k : r.unused()) {
    Mixers::for_each([&](auto t) {
      using M = typename decltype(t)::type;
      if (layer == M::kName) return;
      const auto& keys = M::Config::ssm_cfg_keys();
      MAMBA_CHECK(std::find(keys.begin(), keys.end(), k) == keys.end(), "'ssm_cfg.", k,
                  "' is a parameter of ", M::kName, ", not of ", layer);
    });
  }
  r.finish(str("a ", layer, " ssm_cfg"));
  return *out;
}

AttnConfig parse_attn_cfg(const json& j, int64_t d_model) {
  MAMBA_CHECK(j.is_object(), "'attn_cfg' must be an object, got ", j.dump());
  KeyReader r(j, "attn_cfg.");
  AttnConfig a = MHAConfig::from_ssm_cfg(r, d_model);
  r.finish("attn_cfg (mamba_ssm's MHA has no such argument)");
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
  if (r.has("attn_cfg")) c.attn_cfg = parse_attn_cfg(r.raw("attn_cfg"), c.d_model);
  c.rms_norm = r.boolean("rms_norm", true);
  c.residual_in_fp32 = r.boolean("residual_in_fp32", true);
  c.fused_add_norm = r.boolean("fused_add_norm", true);
  c.pad_vocab_size_multiple = r.integer("pad_vocab_size_multiple", 8);
  c.tie_embeddings = r.boolean("tie_embeddings", true);
  r.finish("a mamba_ssm config (MambaConfig has no such field)");
  return c;
}

// transformers MambaConfig (model_type "mamba") / Mamba2Config ("mamba2"): a format of its own,
// mapped onto the two mixers' config structs.
ModelConfig parse_hf(const json& j) {
  KeyReader r(j, "");
  MAMBA_CHECK(r.has("model_type"),
              "'model_type' is missing (a transformers config needs \"mamba\" or \"mamba2\")");
  const std::string mt = r.string("model_type", "");
  MAMBA_CHECK(mt == "mamba" || mt == "mamba2", "'model_type' = \"", mt,
              "\" is not supported (expected \"mamba\" or \"mamba2\")");
  const bool m2 = mt == "mamba2";
  ModelConfig c;
  c.source_format = "hf";
  // Mamba2Config / MambaConfig defaults
  c.vocab_size = r.integer("vocab_size", m2 ? 32768 : 50280);
  c.d_model = r.integer("hidden_size", m2 ? 4096 : 768);
  check_range(c.d_model, 1, 1 << 16, "hidden_size");  // before anything is computed from it
  c.n_layer = r.integer("num_hidden_layers", m2 ? 64 : 32);
  c.norm_epsilon = r.number("layer_norm_epsilon", 1e-5);
  // The keys both mixers share.
  auto common = [&](auto& s) {
    s.d_model = c.d_model;
    s.d_state = r.integer("state_size", m2 ? 128 : 16);
    s.expand = r.number("expand", 2);
    s.d_conv = r.integer("conv_kernel", 4);
    s.bias = r.boolean("use_bias", false);
    s.conv_bias = r.boolean("use_conv_bias", true);
    s.dt_min = r.number("time_step_min", s.dt_min);
    s.dt_max = r.number("time_step_max", s.dt_max);
    s.dt_init_floor = r.number("time_step_floor", s.dt_init_floor);
  };
  c.residual_in_fp32 = r.boolean("residual_in_fp32", true);
  c.tie_embeddings = r.boolean("tie_word_embeddings", !m2);
  c.bos_token_id = token_id(r, "bos_token_id");
  c.eos_token_id = token_id(r, "eos_token_id");
  c.pad_token_id = token_id(r, "pad_token_id");
  const std::string act = r.string("hidden_act", "silu");
  MAMBA_CHECK(act == "silu", "'hidden_act' = \"", act, "\" is not supported (Mamba uses \"silu\")");
  c.fused_add_norm = r.boolean("fused_add_norm", true);  // kept by the mamba_ssm converter
  c.pad_vocab_size_multiple = r.integer("pad_vocab_size_multiple", 1);
  // The HF model's embedding has exactly vocab_size rows.
  MAMBA_CHECK(c.pad_vocab_size_multiple >= 1 && c.vocab_size % c.pad_vocab_size_multiple == 0,
              "'pad_vocab_size_multiple' = ", c.pad_vocab_size_multiple,
              " contradicts 'vocab_size' = ", c.vocab_size,
              ": a transformers checkpoint has exactly vocab_size embedding rows");
  if (r.has("n_layer"))
    MAMBA_CHECK(r.integer("n_layer", 0) == c.n_layer, "'n_layer' = ", r.integer("n_layer", 0),
                " contradicts 'num_hidden_layers' = ", c.n_layer);
  if (r.has("d_model"))
    MAMBA_CHECK(r.integer("d_model", 0) == c.d_model, "'d_model' = ", r.integer("d_model", 0),
                " contradicts 'hidden_size' = ", c.d_model);
  // time_step_rank: "auto" or an int; Mamba2 has no dt_proj and ignores it.
  int64_t rank = -1;
  if (r.has("time_step_rank")) {
    const json& v = r.raw("time_step_rank");
    if (v.is_string()) {
      MAMBA_CHECK(v.get<std::string>() == "auto",
                  "'time_step_rank' must be an integer or \"auto\", got ", v.dump());
    } else {
      rank = r.integer("time_step_rank", rank);
    }
  }
  int64_t d_inner = 0;
  if (!m2) {
    Mamba1Config s;
    common(s);
    c.rms_norm = r.boolean("rms_norm", true);
    MAMBA_CHECK(c.rms_norm,
                "'rms_norm' = false contradicts model_type \"mamba\" (transformers' Mamba "
                "always uses RMSNorm)");
    // transformers resolves "auto" to ceil(hidden_size / 16) before saving; keep "auto" when equal.
    const int64_t auto_rank = c.d_model / 16 + (c.d_model % 16 != 0);
    s.dt_rank = rank == auto_rank ? -1 : rank;
    if (s.dt_rank != -1) check_range(s.dt_rank, 1, 1 << 16, "time_step_rank");
    s.dt_scale = r.number("time_step_scale", s.dt_scale);
    s.dt_init = r.string("time_step_init_scheme", s.dt_init);
    MAMBA_CHECK(s.dt_init == "random" || s.dt_init == "constant", "'time_step_init_scheme' = \"",
                s.dt_init, "\" (expected \"random\" or \"constant\")");
    MAMBA_CHECK(std::isfinite(s.expand) && s.expand > 0 && s.expand <= 64, "'expand' = ", s.expand,
                " is out of range (0, 64]");
    d_inner = s.d_inner();
    c.ssm_cfg = s;
  } else {
    Mamba2Config s;
    common(s);
    s.rmsnorm = r.boolean("rms_norm", true);  // Mamba2's gated norm before out_proj
    s.norm_before_gate = r.boolean("norm_before_gate", false);
    s.ngroups = r.integer("n_groups", 8);
    s.chunk_size = r.integer("chunk_size", 256);
    s.headdim = r.integer("head_dim", 64);
    s.dt_limit = r.pair("time_step_limit", s.dt_limit);
    MAMBA_CHECK(std::isfinite(s.expand) && s.expand > 0 && s.expand <= 64, "'expand' = ", s.expand,
                " is out of range (0, 64]");
    d_inner = s.d_inner();
    const int64_t nh = r.integer("num_heads", 128);
    check_range(nh, 1, 1 << 20, "num_heads");
    check_range(s.headdim, 1, 1 << 12, "head_dim");
    MAMBA_CHECK(nh * s.headdim == d_inner, "'num_heads' = ", nh, " times 'head_dim' = ", s.headdim,
                " contradicts expand * hidden_size = ", d_inner);
    c.ssm_cfg = s;
  }
  if (r.has("intermediate_size"))
    MAMBA_CHECK(r.integer("intermediate_size", 0) == d_inner,
                "'intermediate_size' = ", r.integer("intermediate_size", 0),
                " contradicts expand * hidden_size = ", d_inner);
  r.ignore(kBenignHfKeys);
  r.finish(str("a transformers ", m2 ? "Mamba2Config" : "MambaConfig"));
  return c;
}

}  // namespace

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
  MAMBA_CHECK(norm_epsilon > 0 && norm_epsilon < 1, "'norm_epsilon' = ", norm_epsilon,
              " is out of range (0, 1)");
  std::visit([](const auto& m) { m.check_ssm_cfg(); }, mixer());
  std::set<int64_t> seen;
  for (int64_t i : attn_layer_idx) {
    MAMBA_CHECK(i >= 0 && i < n_layer, "'attn_layer_idx' holds ", i,
                ", outside [0, n_layer = ", n_layer, ")");
    MAMBA_CHECK(seen.insert(i).second, "'attn_layer_idx' holds ", i, " twice");
  }
  if (!attn_layer_idx.empty()) {
    MAMBA_CHECK(attn_cfg.d_model == d_model, "'attn_cfg': embed_dim ", attn_cfg.d_model,
                " differs from d_model = ", d_model);
    attn_cfg.check_ssm_cfg();
  }
}

ModelConfig ModelConfig::parse(const std::string& text, const std::string& origin) {
  json j = json_io::parse_python_json(text, origin);
  try {
    MAMBA_CHECK(j.is_object(), "the top level must be a JSON object, got ", j.type_name());
    const bool hf =
        j.contains("model_type") || j.contains("hidden_size") || j.contains("num_hidden_layers");
    ModelConfig c = hf ? parse_hf(j) : parse_mamba_ssm(j);
    c.attn_cfg.d_model = c.d_model;
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
  using json_io::number;
  const ojson ssm = json_io::parse_python_ojson(
      std::visit([](const auto& m) { return m.to_ssm_cfg(); }, mixer()), "ssm_cfg");
  ojson attn = ojson::object();
  AttnConfig unset;
  unset.d_model = d_model;
  if (!attn_layer_idx.empty() || !(attn_cfg == unset))
    attn = json_io::parse_python_ojson(attn_cfg.to_ssm_cfg(), "attn_cfg");
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
  return json_io::dump_python_json(j, 4);  // Python's json reads Infinity
}

std::string ModelConfig::to_hf_json() const {
  validate();
  using json_io::number;
  const MixerConfig mc = mixer();
  const Mamba1Config* m1 = std::get_if<Mamba1Config>(&mc);
  const Mamba2Config* m2 = std::get_if<Mamba2Config>(&mc);
  MAMBA_CHECK(m1 || m2, "to_hf_json: transformers has no config class for the ",
              mixer_name(ssm_cfg), " mixer");
  MAMBA_CHECK(attn_layer_idx.empty() && d_intermediate == 0,
              "to_hf_json: attention layers and MLPs have no transformers MambaConfig keys");
  MAMBA_CHECK(
      !m1 || m1->selective,
      "to_hf_json: the non-selective ablation is a mamba.cpp extension transformers cannot load");
  MAMBA_CHECK(!m2 || (m2->ssm_dim() == m2->d_inner() && !m2->D_has_hdim),
              "to_hf_json: d_ssm < d_inner or D_has_hdim have no transformers Mamba2Config keys");
  ojson j;
  j["architectures"] = {m2 ? "Mamba2ForCausalLM" : "MambaForCausalLM"};
  j["model_type"] = m2 ? "mamba2" : "mamba";
  j["hidden_size"] = d_model;
  j["num_hidden_layers"] = n_layer;
  j["vocab_size"] = padded_vocab();  // a transformers embedding has exactly vocab_size rows
  j["pad_vocab_size_multiple"] = pad_vocab_size_multiple;
  auto common = [&](const auto& s) {
    j["state_size"] = s.d_state;
    j["conv_kernel"] = s.d_conv;
    j["expand"] = number(s.expand);
    j["use_bias"] = s.bias;
    j["use_conv_bias"] = s.conv_bias;
    j["residual_in_fp32"] = residual_in_fp32;
    j["tie_word_embeddings"] = tie_embeddings;
    j["layer_norm_epsilon"] = norm_epsilon;
    j["hidden_act"] = "silu";
    j["time_step_min"] = s.dt_min;
    j["time_step_max"] = s.dt_max;
    j["time_step_floor"] = s.dt_init_floor;
  };
  if (m1) {
    common(*m1);
    j["time_step_rank"] = m1->rank();
    j["time_step_scale"] = m1->dt_scale;
    j["time_step_init_scheme"] = m1->dt_init;
  } else {
    common(*m2);
    j["num_heads"] = m2->nheads();
    j["head_dim"] = m2->headdim;
    j["n_groups"] = m2->ngroups;
    j["chunk_size"] = m2->chunk_size;
    j["rms_norm"] = m2->rmsnorm;
    j["norm_before_gate"] = m2->norm_before_gate;
    j["time_step_limit"] = {number(m2->dt_limit.first), number(m2->dt_limit.second)};
  }
  if (bos_token_id >= 0) j["bos_token_id"] = bos_token_id;
  if (eos_token_id >= 0) j["eos_token_id"] = eos_token_id;
  if (pad_token_id >= 0) j["pad_token_id"] = pad_token_id;
  return json_io::dump_python_json(j, 2);
}

int64_t ModelConfig::d_inner() const {
  return std::visit([](const auto& m) { return m.d_inner(); }, mixer());
}

MixerConfig ModelConfig::layer_mixer(int64_t i) const {
  if (!is_attn_layer(i)) return mixer();
  AttnConfig a = attn_cfg;
  a.d_model = d_model;
  return a;
}

MixerConfig ModelConfig::mixer() const {
  MixerConfig m = ssm_cfg;
  std::visit([&](auto& c) { c.d_model = d_model; }, m);
  return m;
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
  return rest == "norm.weight" || rest == "norm.bias" ||
         (rest.rfind("mixer.", 0) == 0 && rest.size() > 6) ||
         (rest.rfind("mlp.", 0) == 0 && rest.size() > 4) || rest == "norm2.weight" ||
         rest == "norm2.bias";
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
  MAMBA_CHECK(shared_name(n), "tensor '", n,
              "' is not a mamba_ssm MambaLMHeadModel parameter name");
  return n;
}

}  // namespace mamba
