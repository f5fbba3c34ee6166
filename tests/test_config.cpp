// ModelConfig: the golden mamba_ssm configs parse; transformers-style configs of the same
// models parse to the same model; real state-spaces configs parse; unknown, contradictory,
// mistyped keys and malformed JSON give errors naming the key; to_json round-trips.
#include <filesystem>
#include <nlohmann/json.hpp>

#include "mamba/config.h"
#include "test_util.h"

using namespace mamba;

namespace {

using test::expect_error;

// The fields that decide the network and its tensors (not the file's bookkeeping).
void expect_same_model(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.d_model, b.d_model);
  EXPECT_EQ(a.d_intermediate, b.d_intermediate);
  EXPECT_EQ(a.n_layer, b.n_layer);
  EXPECT_EQ(a.padded_vocab(), b.padded_vocab());
  EXPECT_TRUE(a.ssm_cfg == b.ssm_cfg);
  EXPECT_EQ(a.attn_layer_idx, b.attn_layer_idx);
  EXPECT_TRUE(a.attn_cfg == b.attn_cfg);
  EXPECT_EQ(a.rms_norm, b.rms_norm);
  EXPECT_EQ(a.residual_in_fp32, b.residual_in_fp32);
  EXPECT_EQ(a.tie_embeddings, b.tie_embeddings);
  EXPECT_EQ(a.norm_epsilon, b.norm_epsilon);
}

// transformers MambaConfig.to_json_string() of the golden Mamba-1 model (vocab already padded).
const char* kHfMamba1 = R"({
  "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "eos_token_id": 0,
  "expand": 2, "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.1,
  "intermediate_size": 128, "layer_norm_epsilon": 1e-05, "model_type": "mamba",
  "num_hidden_layers": 3, "pad_token_id": 0, "rescale_prenorm_residual": false,
  "residual_in_fp32": true, "state_size": 16, "time_step_floor": 0.0001,
  "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001,
  "time_step_rank": 4, "time_step_scale": 1.0, "torch_dtype": "float32",
  "transformers_version": "4.46.0", "use_bias": false, "use_cache": true, "use_conv_bias": true,
  "use_mambapy": false, "vocab_size": 104})";

// transformers Mamba2Config of the golden Mamba-2 model; Python's json writes inf as Infinity.
const char* kHfMamba2 = R"({
  "architectures": ["Mamba2ForCausalLM"], "bos_token_id": 0, "chunk_size": 8, "conv_kernel": 4,
  "eos_token_id": 0, "expand": 2, "head_dim": 16, "hidden_act": "silu", "hidden_size": 64,
  "initializer_range": 0.1, "layer_norm_epsilon": 1e-05, "model_type": "mamba2", "n_groups": 1,
  "num_heads": 8, "num_hidden_layers": 3, "pad_token_id": 0, "rescale_prenorm_residual": false,
  "residual_in_fp32": true, "rms_norm": true, "state_size": 16, "tie_word_embeddings": true,
  "time_step_floor": 0.0001, "time_step_limit": [0.0, Infinity], "time_step_max": 0.1,
  "time_step_min": 0.001, "time_step_rank": 4, "torch_dtype": "float32",
  "transformers_version": "4.46.0", "use_bias": false, "use_cache": true, "use_conv_bias": true,
  "vocab_size": 104})";

// state-spaces/mamba-130m-hf/config.json (converted by transformers from mamba_ssm, which
// leaves n_layer, rms_norm, fused_add_norm and pad_vocab_size_multiple in).
const char* kMamba130mHf = R"({
  "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "eos_token_id": 0,
  "expand": 2, "fused_add_norm": true, "hidden_act": "silu", "hidden_size": 768,
  "initializer_range": 0.1, "intermediate_size": 1536, "layer_norm_epsilon": 1e-05,
  "model_type": "mamba", "n_layer": 24, "num_hidden_layers": 24, "pad_token_id": 0,
  "pad_vocab_size_multiple": 8, "rescale_prenorm_residual": false, "residual_in_fp32": true,
  "rms_norm": true, "state_size": 16, "time_step_floor": 0.0001, "time_step_init_scheme": "random",
  "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 48, "time_step_scale": 1.0,
  "torch_dtype": "float32", "transformers_version": "4.39.0.dev0", "use_bias": false,
  "use_cache": true, "use_conv_bias": true, "vocab_size": 50280})";

// state-spaces/mamba-130m and mamba2-130m config.json (mamba_ssm format).
const char* kMamba130m = R"({"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
  "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 8})";
const char* kMamba2_130m =
    R"({"d_model": 768, "d_intermediate": 0, "n_layer": 24, "vocab_size": 50277,
  "ssm_cfg": {"layer": "Mamba2"}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": true,
  "residual_in_fp32": true, "fused_add_norm": true, "pad_vocab_size_multiple": 16, "tie_embeddings": true})";

// Edits one key of a JSON text (null removes it) and re-serialises.
// (Python's Infinity, which nlohmann cannot read, is carried through as a placeholder.)
std::string with(std::string text, const std::string& key, const nlohmann::json& v) {
  auto swap = [](std::string t, const std::string& from, const std::string& to) {
    for (size_t p; (p = t.find(from)) != std::string::npos;) t.replace(p, from.size(), to);
    return t;
  };
  nlohmann::json j = nlohmann::json::parse(swap(text, "Infinity", "\"@INF@\""));
  if (v.is_null())
    j.erase(key);
  else
    j[key] = v;
  return swap(j.dump(), "\"@INF@\"", "Infinity");
}

}  // namespace

TEST(Config, GoldenConfigsParse) {
  ModelConfig m1 = ModelConfig::load(test::golden_path("lm_mamba1_ckpt/config.json"));
  EXPECT_EQ(m1.source_format, "mamba_ssm");
  EXPECT_EQ(m1.d_model, 64);
  EXPECT_EQ(m1.n_layer, 3);
  EXPECT_EQ(m1.vocab_size, 101);
  EXPECT_EQ(m1.padded_vocab(), 104);
  EXPECT_STREQ(mixer_name(m1.ssm_cfg), "Mamba1");
  const Mamba1Config& s1 = std::get<Mamba1Config>(m1.ssm_cfg);
  EXPECT_EQ(s1.d_state, 16);
  EXPECT_EQ(s1.d_conv, 4);
  EXPECT_EQ(m1.d_inner(), 128);
  EXPECT_EQ(s1.rank(), 4);  // "auto": ceil(64 / 16)
  EXPECT_EQ(s1.dt_rank, -1);
  EXPECT_TRUE(m1.rms_norm && m1.residual_in_fp32 && m1.tie_embeddings);
  EXPECT_FALSE(m1.fused_add_norm);
  EXPECT_TRUE(m1.attn_layer_idx.empty());

  ModelConfig m2 = ModelConfig::load(test::golden_path("lm_mamba2_ckpt/config.json"));
  EXPECT_STREQ(mixer_name(m2.ssm_cfg), "Mamba2");
  const Mamba2Config& s2 = std::get<Mamba2Config>(m2.ssm_cfg);
  EXPECT_EQ(m2.padded_vocab(), 104);
  EXPECT_EQ(s2.headdim, 16);
  EXPECT_EQ(s2.chunk_size, 8);
  EXPECT_EQ(s2.ngroups, 1);
  EXPECT_EQ(s2.nheads(), 8);
  EXPECT_TRUE(s2.rmsnorm);
  EXPECT_FALSE(s2.norm_before_gate);
  EXPECT_TRUE(std::isinf(s2.dt_limit.second));
}

TEST(Config, RealStateSpacesConfigsParse) {
  ModelConfig a = ModelConfig::parse(kMamba130m);
  EXPECT_STREQ(mixer_name(a.ssm_cfg), "Mamba1");  // ssm_cfg {} means Mamba1 with its defaults
  EXPECT_EQ(std::get<Mamba1Config>(a.ssm_cfg).d_state, 16);
  EXPECT_EQ(std::get<Mamba1Config>(a.ssm_cfg).rank(), 48);
  EXPECT_EQ(a.padded_vocab(), 50280);
  EXPECT_TRUE(a.tie_embeddings);
  ModelConfig b = ModelConfig::parse(kMamba2_130m);
  EXPECT_EQ(std::get<Mamba2Config>(b.ssm_cfg).d_state, 128);  // Mamba2's default
  EXPECT_EQ(std::get<Mamba2Config>(b.ssm_cfg).headdim, 64);
  EXPECT_EQ(std::get<Mamba2Config>(b.ssm_cfg).nheads(), 24);
  EXPECT_EQ(b.padded_vocab(), 50288);
  ModelConfig h = ModelConfig::parse(kMamba130mHf);
  EXPECT_EQ(h.source_format, "hf");
  EXPECT_EQ(h.padded_vocab(), 50280);
  expect_same_model(h, a);
  EXPECT_EQ(h.eos_token_id, 0);
}

TEST(Config, TransformersConfigsParseToTheSameModel) {
  ModelConfig g1 = ModelConfig::load(test::golden_path("lm_mamba1_ckpt/config.json"));
  ModelConfig h1 = ModelConfig::parse(kHfMamba1, "hf1");
  EXPECT_EQ(h1.source_format, "hf");
  EXPECT_EQ(h1.vocab_size, 104);
  expect_same_model(h1, g1);
  ModelConfig g2 = ModelConfig::load(test::golden_path("lm_mamba2_ckpt/config.json"));
  ModelConfig h2 = ModelConfig::parse(kHfMamba2, "hf2");
  expect_same_model(h2, g2);
  // Mamba2Config's default is untied embeddings; MambaConfig's is tied.
  EXPECT_FALSE(ModelConfig::parse(with(kHfMamba2, "tie_word_embeddings", nullptr)).tie_embeddings);
  EXPECT_TRUE(ModelConfig::parse(with(kHfMamba1, "tie_word_embeddings", nullptr)).tie_embeddings);
  // time_step_rank "auto" and the explicit value it resolves to are the same model.
  expect_same_model(ModelConfig::parse(with(kHfMamba1, "time_step_rank", "auto")), h1);
  ModelConfig r8 = ModelConfig::parse(with(kHfMamba1, "time_step_rank", 8));
  EXPECT_EQ(std::get<Mamba1Config>(r8.ssm_cfg).dt_rank, 8);
  EXPECT_EQ(std::get<Mamba1Config>(r8.ssm_cfg).rank(), 8);
}

TEST(Config, ToJsonRoundTripsInMambaSsmFormat) {
  for (const char* f : {"lm_mamba1_ckpt/config.json", "lm_mamba2_ckpt/config.json"}) {
    ModelConfig c = ModelConfig::load(test::golden_path(f));
    std::string text = c.to_json();
    EXPECT_TRUE(ModelConfig::parse(text) == c) << text;
    nlohmann::json j = nlohmann::json::parse(text);  // standard JSON (default dt_limit is omitted)
    for (const char* k : {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg",
                          "attn_layer_idx", "attn_cfg", "rms_norm", "residual_in_fp32",
                          "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"})
      EXPECT_TRUE(j.contains(k)) << k;
    EXPECT_EQ(j.size(), 12u);
    EXPECT_EQ(j["vocab_size"], 101);
  }
  // transformers -> mamba_ssm -> parse: the same model.
  ModelConfig h2 = ModelConfig::parse(kHfMamba2);
  expect_same_model(ModelConfig::parse(h2.to_json()), h2);
  // A non-default dt_limit with an infinite end is written as Python's Infinity and read back.
  ModelConfig c = ModelConfig::load(test::golden_path("lm_mamba2_ckpt/config.json"));
  std::get<Mamba2Config>(c.ssm_cfg).dt_limit.first = 0.001;
  std::string t = c.to_json();
  EXPECT_NE(t.find("Infinity"), std::string::npos);
  EXPECT_TRUE(ModelConfig::parse(t) == c);
  // Attention layers and their config survive too.
  ModelConfig m = ModelConfig::parse(
      R"({"d_model": 64, "n_layer": 4, "vocab_size": 101, "attn_layer_idx": [1, 3],
          "attn_cfg": {"num_heads": 4, "rotary_emb_dim": 8, "causal": true}, "d_intermediate": 96})");
  EXPECT_TRUE(m.is_attn_layer(3) && !m.is_attn_layer(2));
  EXPECT_TRUE(ModelConfig::parse(m.to_json()) == m);
  std::string p =
      (std::filesystem::temp_directory_path() / "mamba_test_config_roundtrip.json").string();
  m.save(p);
  EXPECT_TRUE(ModelConfig::load(p) == m);
  std::filesystem::remove(p);
}

TEST(Config, UnknownKeysAreNamed) {
  std::string g1 =
      R"({"d_model": 64, "n_layer": 3, "vocab_size": 101, "ssm_cfg": {"layer": "Mamba1"}})";
  expect_error([&] { ModelConfig::parse(with(g1, "d_modle", 64), "cfg.json"); },
               {"cfg.json", "'d_modle'"});
  expect_error([&] { ModelConfig::parse(R"({"d_model": 64, "ssm_cfg": {"d_stat": 16}})"); },
               {"'ssm_cfg.d_stat'"});
  expect_error([&] { ModelConfig::parse(R"({"d_model": 64, "ssm_cfg": {"headdim": 16}})"); },
               {"'ssm_cfg.headdim'", "Mamba2", "not of Mamba1"});
  expect_error(
      [&] {
        ModelConfig::parse(R"({"d_model": 64, "ssm_cfg": {"layer": "Mamba2", "dt_rank": 4}})");
      },
      {"'ssm_cfg.dt_rank'", "parameter of Mamba1"});
  // An unknown mixer names the registered ones (Mamba3 is one now).
  expect_error([&] { ModelConfig::parse(R"({"ssm_cfg": {"layer": "Mamba4"}})"); },
               {"'ssm_cfg.layer'", "Mamba4", "\"Mamba3\""});
  expect_error([&] { ModelConfig::parse(R"({"attn_cfg": {"num_head": 4}})"); },
               {"'attn_cfg.num_head'"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba1, "num_heads", 8)); },
               {"'num_heads'", "MambaConfig"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba2, "n_grups", 8)); },
               {"'n_grups'", "Mamba2Config"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba1, "model_type", "falcon_mamba")); },
               {"'model_type'", "falcon_mamba"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba1, "hidden_act", "gelu")); },
               {"'hidden_act'"});
}

TEST(Config, ContradictoryKeysAreNamed) {
  expect_error([&] { ModelConfig::parse(with(kMamba130mHf, "n_layer", 12)); },
               {"'n_layer'", "'num_hidden_layers'"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba1, "intermediate_size", 96)); },
               {"'intermediate_size'"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba1, "d_model", 32)); },
               {"'d_model'", "'hidden_size'"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba2, "num_heads", 4)); },
               {"'num_heads'", "'head_dim'"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba1, "pad_vocab_size_multiple", 16)); },
               {"'pad_vocab_size_multiple'", "'vocab_size'"});
  expect_error([&] { ModelConfig::parse(with(kHfMamba1, "rms_norm", false)); }, {"'rms_norm'"});
  expect_error(
      [&] {
        ModelConfig::parse(R"({"d_model": 64, "ssm_cfg": {"layer": "Mamba2", "headdim": 48}})");
      },
      {"'ssm_cfg.headdim'", "does not divide"});
  expect_error(
      [&] {
        ModelConfig::parse(
            R"({"d_model": 64, "ssm_cfg": {"layer": "Mamba2", "headdim": 16, "ngroups": 3}})");
      },
      {"'ssm_cfg.ngroups'"});
  expect_error(
      [&] {
        ModelConfig::parse(
            R"({"n_layer": 2, "attn_layer_idx": [2], "attn_cfg": {"num_heads": 4}})");
      },
      {"'attn_layer_idx'", "n_layer = 2"});
  expect_error([&] { ModelConfig::parse(R"({"n_layer": 2, "attn_layer_idx": [1]})"); },
               {"'attn_cfg.num_heads'"});
  expect_error([&] { ModelConfig::parse(R"({"d_model": 0})"); }, {"'d_model' = 0"});
  expect_error([&] { ModelConfig::parse(R"({"vocab_size": -5})"); }, {"'vocab_size' = -5"});
  expect_error([&] { ModelConfig::parse(R"({"ssm_cfg": {"dt_min": 0.5, "dt_max": 0.1}})"); },
               {"'ssm_cfg.dt_min'"});
}

TEST(Config, MalformedJsonAndWrongTypes) {
  expect_error([] { ModelConfig::parse("{\"d_model\": 64,", "bad.json"); },
               {"bad.json", "not valid JSON"});
  expect_error([] { ModelConfig::parse("[1, 2]"); }, {"JSON object"});
  expect_error([] { ModelConfig::parse(""); }, {"not valid JSON"});
  expect_error([] { ModelConfig::parse(R"({"d_model": "64"})"); }, {"'d_model'", "integer"});
  expect_error([] { ModelConfig::parse(R"({"d_model": 64.5})"); }, {"'d_model'", "integer"});
  expect_error([] { ModelConfig::parse(R"({"rms_norm": 1})"); }, {"'rms_norm'", "true or false"});
  expect_error([] { ModelConfig::parse(R"({"ssm_cfg": []})"); }, {"'ssm_cfg'", "object"});
  expect_error([] { ModelConfig::parse(R"({"ssm_cfg": {"expand": "two"}})"); },
               {"'ssm_cfg.expand'", "number"});
  expect_error([] { ModelConfig::parse(R"({"attn_layer_idx": 3})"); }, {"'attn_layer_idx'"});
  expect_error([] { ModelConfig::parse(R"({"d_model": 99999999999999999999})"); }, {"'d_model'"});
  expect_error(
      [] { ModelConfig::parse(with(kHfMamba2, "time_step_limit", nlohmann::json::array({0.0}))); },
      {"'time_step_limit'"});
  expect_error([] { ModelConfig::load("/nonexistent/config.json"); }, {"/nonexistent/config.json"});
  // Infinity inside a string is left alone.
  EXPECT_NO_THROW(ModelConfig::parse(with(kHfMamba1, "transformers_version", "Infinity NaN")));
}

TEST(Config, TensorNamesMapBetweenTransformersAndMambaSsm) {
  EXPECT_EQ(hf_to_mamba_ssm_name("backbone.embeddings.weight"), "backbone.embedding.weight");
  EXPECT_EQ(mamba_ssm_to_hf_name("backbone.embedding.weight"), "backbone.embeddings.weight");
  for (const char* n :
       {"backbone.layers.0.norm.weight", "backbone.layers.23.mixer.in_proj.weight",
        "backbone.layers.7.mixer.A_log", "backbone.layers.1.mixer.dt_bias",
        "backbone.layers.1.mixer.norm.weight", "backbone.norm_f.weight", "lm_head.weight"}) {
    EXPECT_EQ(hf_to_mamba_ssm_name(n), n);
    EXPECT_EQ(mamba_ssm_to_hf_name(n), n);
  }
  expect_error([] { hf_to_mamba_ssm_name("model.layers.0.self_attn.q_proj.weight"); },
               {"'model.layers.0"});
  expect_error([] { hf_to_mamba_ssm_name("backbone.layers.x.norm.weight"); },
               {"backbone.layers.x"});
  expect_error([] { mamba_ssm_to_hf_name("backbone.embeddings.weight"); },
               {"backbone.embeddings.weight"});
}

// Hostile sizes (issue "Reliability"): every one used to overflow (signed int64 or a double ->
// int64 conversion) before its range was checked; now each is refused naming the key, with no
// arithmetic done on it first (the UBSan build runs this test).
TEST(Config, HostileSizesAreRefusedBeforeAnyArithmetic) {
  expect_error([] { ModelConfig::parse(R"({"d_model": 9223372036854775807})"); },
               {"'d_model'", "out of range"});
  expect_error(
      [] { ModelConfig::parse(R"({"model_type": "mamba", "hidden_size": 9223372036854775807})"); },
      {"'hidden_size'", "out of range"});
  expect_error(
      [] {
        ModelConfig::parse(
            R"({"model_type": "mamba2", "hidden_size": 64, "expand": 2, "head_dim": 4611686018427387904, "num_heads": 4})");
      },
      {"'head_dim'", "out of range"});
  expect_error(
      [] {
        ModelConfig::parse(
            R"({"model_type": "mamba", "hidden_size": 64, "expand": 1e300, "intermediate_size": 5})");
      },
      {"'expand'", "out of range"});
  expect_error([] { ModelConfig::parse(R"({"d_model": 64, "ssm_cfg": {"expand": 1e300}})"); },
               {"'ssm_cfg.expand'", "out of range"});
  expect_error(
      [] {
        ModelConfig::parse(
            R"({"d_model": 64, "ssm_cfg": {"layer": "Mamba2", "headdim": 4611686018427387904}})");
      },
      {"'ssm_cfg.headdim'", "out of range"});
  expect_error(
      [] { ModelConfig::parse(R"({"d_model": 64, "ssm_cfg": {"dt_rank": 9223372036854775807}})"); },
      {"'ssm_cfg.dt_rank'", "out of range"});
}

// A config.json with ~16,000 '[' under ssm_cfg (and one with 300,000 levels) used to overflow the
// stack (the subtree was copied recursively); parsing now stops at 256 levels.
TEST(Config, DeepNestingIsRefusedWhileParsing) {
  for (size_t n : {16000u, 300000u})
    expect_error(
        [n] {
          ModelConfig::parse(R"({"ssm_cfg": )" + std::string(n, '[') + std::string(n, ']') + "}");
        },
        {"config.json", "nested deeper than 256"});
  // 200 levels are fine for the parser (then refused as a wrong type, naming the key).
  expect_error(
      [] {
        ModelConfig::parse(R"({"ssm_cfg": )" + std::string(200, '[') + std::string(200, ']') + "}");
      },
      {"'ssm_cfg'", "object"});
}
