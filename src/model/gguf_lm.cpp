// MambaLM <-> llama.cpp's GGUF layout for Mamba-1 ("mamba") and Mamba-2 ("mamba2"), and the
// GGUF-embedded GPT-2-style vocabulary <-> Tokenizer. The mapping (docs/GGUF.md):
//   backbone.embedding.weight        token_embd.weight
//   backbone.norm_f.weight           output_norm.weight
//   lm_head.weight (untied only)     output.weight
//   backbone.layers.i.norm.weight    blk.i.attn_norm.weight
//   mixer.in_proj / x_proj / dt_proj.weight / out_proj   blk.i.ssm_in / ssm_x / ssm_dt / ssm_out
//   mixer.dt_proj.bias (Mamba-1), mixer.dt_bias (Mamba-2) blk.i.ssm_dt.bias
//   mixer.conv1d.weight (C, 1, K)    blk.i.ssm_conv1d.weight (C, K); conv1d.bias ssm_conv1d.bias
//   mixer.A_log                      blk.i.ssm_a = -exp(A_log)   (Mamba-2: shape (H, 1))
//   mixer.D                          blk.i.ssm_d                 (Mamba-2: shape (H, 1))
//   mixer.norm.weight (Mamba-2)      blk.i.ssm_norm.weight (G, d_inner / G)
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "core/json_reader.h"
#include "core/os.h"
#include "mamba/gguf.h"
#include "mamba/lm.h"
#include "mamba/tokenizer.h"
#include "ops/elementwise.h"

namespace mamba {

namespace {

// llama.cpp's token types (tokenizer.ggml.token_type).
enum TokenType : int {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

// Our name of a GGUF tensor name ("" when it is not one of the Mamba names).
std::string ours_of(const std::string& g, bool mamba2) {
  if (g == "token_embd.weight") return "backbone.embedding.weight";
  if (g == "output_norm.weight") return "backbone.norm_f.weight";
  if (g == "output.weight") return "lm_head.weight";
  if (g.rfind("blk.", 0) != 0) return "";
  const size_t dot = g.find('.', 4);
  if (dot == std::string::npos || dot == 4 || dot - 4 > 9) return "";
  const std::string idx = g.substr(4, dot - 4);
  for (char c : idx)
    if (c < '0' || c > '9') return "";
  if (idx.size() > 1 && idx[0] == '0') return "";
  const std::string rest = g.substr(dot + 1), pre = "backbone.layers." + idx + ".";
  static const std::pair<const char*, const char*> common[] = {
      {"attn_norm.weight", "norm.weight"},
      {"ssm_in.weight", "mixer.in_proj.weight"},
      {"ssm_conv1d.weight", "mixer.conv1d.weight"},
      {"ssm_conv1d.bias", "mixer.conv1d.bias"},
      {"ssm_a", "mixer.A_log"},
      {"ssm_d", "mixer.D"},
      {"ssm_out.weight", "mixer.out_proj.weight"}};
  for (auto [a, b] : common)
    if (rest == a) return pre + b;
  if (!mamba2) {
    if (rest == "ssm_x.weight") return pre + "mixer.x_proj.weight";
    if (rest == "ssm_dt.weight") return pre + "mixer.dt_proj.weight";
    if (rest == "ssm_dt.bias") return pre + "mixer.dt_proj.bias";
  } else {
    if (rest == "ssm_dt.bias") return pre + "mixer.dt_bias";
    if (rest == "ssm_norm.weight") return pre + "mixer.norm.weight";
  }
  return "";
}

bool ends_with(const std::string& s, const std::string& suf) {
  return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

int64_t positive(const GGUFFile& f, const std::string& key) {
  const int64_t v = f.get_int(key);
  MAMBA_CHECK(v >= 1 && v <= (int64_t{1} << 31), f.origin(), ": metadata '", key, "' = ", v,
              " is out of range");
  return v;
}

}  // namespace

MambaLM MambaLM::load_gguf(const std::string& path, WeightDType dtype) {
  GGUFFile f = GGUFFile::open(path);
  const std::string& o = f.origin();
  const std::string arch = f.get_string("general.architecture");
  MAMBA_CHECK(arch == "mamba" || arch == "mamba2", o, ": general.architecture is '", arch,
              "'; only llama.cpp's \"mamba\" (Mamba-1) and \"mamba2\" (Mamba-2) load here");
  const bool m2 = arch == "mamba2";
  const std::string k = arch + ".";
  ModelConfig cfg;
  cfg.d_model = positive(f, k + "embedding_length");
  cfg.n_layer = positive(f, k + "block_count");
  if (f.has_key(k + "feed_forward_length"))
    MAMBA_CHECK(f.get_int(k + "feed_forward_length") == 0, o, ": ", k,
                "feed_forward_length is not 0 (MLP layers are not part of llama.cpp's Mamba)");
  if (f.has_key(k + "ssm.dt_b_c_rms"))
    MAMBA_CHECK(!f.get_bool(k + "ssm.dt_b_c_rms"), o,
                ": ssm.dt_b_c_rms is true (Falcon-Mamba's RMS norms on dt / B / C are not "
                "supported)");
  cfg.norm_epsilon = f.has_key(k + "attention.layer_norm_rms_epsilon")
                         ? f.get_float(k + "attention.layer_norm_rms_epsilon")
                         : 1e-5;
  MAMBA_CHECK(cfg.norm_epsilon > 0 && cfg.norm_epsilon < 1, o, ": rms epsilon ", cfg.norm_epsilon,
              " is out of range");
  const int64_t d_inner = positive(f, k + "ssm.inner_size");
  const int64_t d_state = positive(f, k + "ssm.state_size");
  const int64_t d_conv = positive(f, k + "ssm.conv_kernel");
  const int64_t rank = positive(f, k + "ssm.time_step_rank");
  const double expand = static_cast<double>(d_inner) / static_cast<double>(cfg.d_model);
  MAMBA_CHECK(static_cast<int64_t>(expand * static_cast<double>(cfg.d_model)) == d_inner, o,
              ": ssm.inner_size ", d_inner, " is not representable as expand * d_model");
  if (!m2) {
    Mamba1Config c;
    c.d_model = cfg.d_model, c.d_state = d_state, c.d_conv = d_conv, c.expand = expand;
    c.dt_rank = rank;
    cfg.ssm_cfg = c;
  } else {
    Mamba2Config c;
    c.d_model = cfg.d_model, c.d_state = d_state, c.d_conv = d_conv, c.expand = expand;
    MAMBA_CHECK(d_inner % rank == 0, o, ": ssm.inner_size ", d_inner,
                " is not a multiple of the head count (ssm.time_step_rank) ", rank);
    c.headdim = d_inner / rank;
    c.ngroups = positive(f, k + "ssm.group_count");
    cfg.ssm_cfg = c;
  }
  const GGUFTensorInfo& emb = f.info("token_embd.weight");
  MAMBA_CHECK(emb.shape.size() == 2 && emb.shape[1] == cfg.d_model, o,
              ": token_embd.weight has shape ", shape_str(emb.shape), ", expected (vocab, ",
              cfg.d_model, ")");
  cfg.vocab_size = emb.shape[0];  // already padded by the converter
  cfg.pad_vocab_size_multiple = 1;
  cfg.tie_embeddings = !f.has("output.weight");
  for (auto [key, dst] : {std::pair{"tokenizer.ggml.bos_token_id", &cfg.bos_token_id},
                          std::pair{"tokenizer.ggml.eos_token_id", &cfg.eos_token_id},
                          std::pair{"tokenizer.ggml.padding_token_id", &cfg.pad_token_id}})
    if (f.has_key(key)) {
      const int64_t id = f.get_int(key);
      if (id >= 0 && id < cfg.vocab_size) *dst = id;
    }
  cfg.validate();

  // Our name -> the GGUF tensor it comes from.
  std::map<std::string, std::string> src;
  std::vector<std::string> names;
  for (const std::string& g : f.names()) {
    const std::string ours = ours_of(g, m2);
    MAMBA_CHECK(!ours.empty(), o, ": unexpected tensor '", g, "' (not part of a ", arch,
                " model as llama.cpp writes it)");
    src[ours] = g;
    names.push_back(ours);
  }
  const int64_t groups = m2 ? std::get<Mamba2Config>(cfg.ssm_cfg).ngroups : 1;
  auto shape_of = [&](const std::string& ours) -> Shape {
    const Shape s = f.info(src.at(ours)).shape;
    if (ends_with(ours, "mixer.conv1d.weight") && s.size() == 2) return {s[0], 1, s[1]};
    if (m2 && (ends_with(ours, "mixer.A_log") || ends_with(ours, "mixer.D")) && s.size() == 2 &&
        s[1] == 1)
      return {s[0]};
    if (m2 && ends_with(ours, "mixer.norm.weight") && s.size() == 2) {
      MAMBA_CHECK(s[0] == groups, o, ": ", src.at(ours), " has ", s[0],
                  " groups, ssm.group_count says ", groups);
      return {s[0] * s[1]};
    }
    return s;
  };
  auto get = [&](const std::string& ours) -> Tensor {
    const std::string& g = src.at(ours);
    Tensor t = f.tensor(g).reshape(shape_of(ours));
    if (ends_with(ours, "mixer.A_log")) return ops::log_neg(t, str(o, ": ", g));  // file: A
    return t;
  };
  MambaLM lm(cfg, 0, dtype);
  // A tensor stored in the weight's own format is copied byte for byte (a Q8_0 / Q4_0 file read
  // with --dtype q8_0 / q4_0 keeps its blocks: no requantisation); others are converted.
  auto same_format = [](uint32_t gt, WeightDType wt) {
    switch (wt) {
      case WeightDType::f32:
        return gt == static_cast<uint32_t>(GGMLType::F32);
      case WeightDType::f16:
        return gt == static_cast<uint32_t>(GGMLType::F16);
      case WeightDType::bf16:
        return gt == static_cast<uint32_t>(GGMLType::BF16);
      case WeightDType::q8_0:
        return gt == static_cast<uint32_t>(GGMLType::Q8_0);
      case WeightDType::q4_0:
        return gt == static_cast<uint32_t>(GGMLType::Q4_0);
    }
    return false;
  };
  // With a 16-bit or quantised --dtype, a tensor the file holds in another of our weight formats
  // keeps that format too, as llama.cpp computes with it (llama-quantize's Q4_0 files hold a Q8_0
  // or Q6_K embedding / head and F16 dt_proj: requantising those to q4_0 would lose precision
  // llama.cpp keeps); Q5_0 / Q4_K / Q6_K, which we only dequantise, become q8_0 under a quantised
  // --dtype (within their own rounding, where q4_0 would add a coarser one).
  auto own_format = [](uint32_t gt, WeightDType& wt) {
    switch (static_cast<GGMLType>(gt)) {
      case GGMLType::F16:
        return wt = WeightDType::f16, true;
      case GGMLType::BF16:
        return wt = WeightDType::bf16, true;
      case GGMLType::Q8_0:
        return wt = WeightDType::q8_0, true;
      case GGMLType::Q4_0:
        return wt = WeightDType::q4_0, true;
      default:
        return false;
    }
  };
  const bool quantised = dtype == WeightDType::q8_0 || dtype == WeightDType::q4_0;
  lm.load_tensors(
      names, shape_of,
      [&](const std::string& ours, Weight& w) {
        const GGUFTensorInfo& in = f.info(src.at(ours));
        const GGMLType gt = static_cast<GGMLType>(in.type);
        const bool matrix = w.shape().size() == 2 && !ends_with(ours, "mixer.A_log") &&
                            !ends_with(ours, "mixer.conv1d.weight");
        WeightDType keep = w.dtype();
        if (dtype != WeightDType::f32 && matrix && own_format(in.type, keep) && keep != w.dtype())
          w.set_dtype(keep, ours);
        else if (quantised && matrix && w.dtype() == dtype &&
                 (gt == GGMLType::Q5_0 || gt == GGMLType::Q4_K || gt == GGMLType::Q6_K))
          w.set_dtype(WeightDType::q8_0, ours);
        if (!w.is_f32() && same_format(in.type, w.dtype()) && !ends_with(ours, "mixer.A_log"))
          w.assign_raw(f.raw(src.at(ours)), static_cast<int64_t>(in.nbytes));
        else
          w.assign(get(ours));
      },
      path);
  return lm;
}

void MambaLM::save_gguf(const std::string& path, GGMLType type,
                        const std::string& tokenizer_json) const {
  const ModelConfig& c = cfg_;
  MAMBA_CHECK(c.attn_layer_idx.empty(),
              "save_gguf: attention layers are not part of llama.cpp's "
              "Mamba architectures");
  MAMBA_CHECK(c.d_intermediate == 0, "save_gguf: MLP layers (d_intermediate = ", c.d_intermediate,
              ") are not part of llama.cpp's Mamba architectures");
  const MixerConfig mc = c.mixer();  // ssm_cfg with the model's d_model
  const Mamba1Config* m1 = std::get_if<Mamba1Config>(&mc);
  const Mamba2Config* m2 = std::get_if<Mamba2Config>(&mc);
  MAMBA_CHECK(m1 || m2, "save_gguf: only Mamba-1 and Mamba-2 models can be written as GGUF");
  if (m1)
    MAMBA_CHECK(m1->selective && !m1->bias && m1->conv_bias && m1->d_inner() == 2 * c.d_model,
                "save_gguf: llama.cpp's Mamba-1 "
                "needs selective=true, bias=false, conv_bias=true and expand=2 (it refuses "
                "another d_inner)");
  if (m2)
    MAMBA_CHECK(!m2->bias && m2->conv_bias && m2->rmsnorm && !m2->norm_before_gate &&
                    !m2->D_has_hdim && m2->ssm_dim() == m2->d_inner() &&
                    m2->dt_limit.first == 0.0 && std::isinf(m2->dt_limit.second),
                "save_gguf: llama.cpp's Mamba-2 needs bias=false, conv_bias=true, rmsnorm=true, "
                "norm_before_gate=false, D_has_hdim=false, d_ssm=None and no dt_limit");
  const std::string arch = m1 ? "mamba" : "mamba2", k = arch + ".";
  GGUFWriter w;
  w.add_string("general.architecture", arch);
  w.add_string("general.name", "mamba.cpp export");
  const uint32_t ftype = type == GGMLType::F32    ? 0
                         : type == GGMLType::F16  ? 1
                         : type == GGMLType::Q4_0 ? 2
                         : type == GGMLType::Q8_0 ? 7
                                                  : 32;  // BF16
  w.add_u32("general.file_type", ftype);
  w.add_u32(k + "context_length", 1u << 20);
  w.add_u32(k + "embedding_length", static_cast<uint32_t>(c.d_model));
  w.add_u32(k + "feed_forward_length", 0);
  w.add_u32(k + "attention.head_count", 0);
  w.add_u32(k + "block_count", static_cast<uint32_t>(c.n_layer));
  // llama.cpp sizes the vocabulary from tokenizer.ggml.tokens, or, for tokenizer.ggml.model
  // "none", from this key (without it a file with no tokenizer fails to load there).
  w.add_u32(k + "vocab_size", static_cast<uint32_t>(c.padded_vocab()));
  const int64_t d_inner = m1 ? m1->d_inner() : m2->d_inner();
  w.add_u32(k + "ssm.conv_kernel", static_cast<uint32_t>(m1 ? m1->d_conv : m2->d_conv));
  w.add_u32(k + "ssm.inner_size", static_cast<uint32_t>(d_inner));
  w.add_u32(k + "ssm.state_size", static_cast<uint32_t>(m1 ? m1->d_state : m2->d_state));
  w.add_u32(k + "ssm.time_step_rank", static_cast<uint32_t>(m1 ? m1->rank() : m2->nheads()));
  if (m2) w.add_u32(k + "ssm.group_count", static_cast<uint32_t>(m2->ngroups));
  w.add_f32(k + "attention.layer_norm_rms_epsilon", static_cast<float>(c.norm_epsilon));
  if (m1) w.add_bool(k + "ssm.dt_b_c_rms", false);

  // -- vocabulary
  const int64_t V = c.padded_vocab();
  if (tokenizer_json.empty()) {
    w.add_string("tokenizer.ggml.model", "none");
  } else {
    const std::vector<uint8_t> bytes = os::read_file(tokenizer_json, 256ull << 20);
    Tokenizer::from_json_string(
        std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()),
        tokenizer_json);  // validates everything read below
    const nlohmann::json j =
        json_io::parse_depth_limited(reinterpret_cast<const char*>(bytes.data()),
                                     reinterpret_cast<const char*>(bytes.data()) + bytes.size());
    std::vector<std::string> tokens(static_cast<size_t>(V));
    std::vector<int32_t> types(static_cast<size_t>(V), kUnused);
    std::vector<char> set(static_cast<size_t>(V), 0);
    auto put = [&](int64_t id, const std::string& t, int type) {
      MAMBA_CHECK(id >= 0 && id < V, "save_gguf: ", tokenizer_json, ": token id ", id,
                  " is outside the model's vocabulary of ", V);
      tokens[id] = t, types[id] = type, set[id] = 1;
    };
    for (auto it = j["model"]["vocab"].begin(); it != j["model"]["vocab"].end(); ++it)
      put(it.value().get<int64_t>(), it.key(), kNormal);
    int64_t eos = -1;
    if (j.contains("added_tokens") && j["added_tokens"].is_array())
      for (const auto& a : j["added_tokens"]) {
        const bool special = a.value("special", false);
        put(a["id"].get<int64_t>(), a["content"].get<std::string>(),
            special ? kControl : kUserDefined);
        if (special && eos < 0 && a["content"] == "<|endoftext|>") eos = a["id"].get<int64_t>();
      }
    for (int64_t i = 0; i < V; ++i)
      if (!set[i]) tokens[i] = "[PAD" + std::to_string(i) + "]";
    std::vector<std::string> merges;
    for (const auto& m : j["model"]["merges"])
      merges.push_back(m.is_string() ? m.get<std::string>()
                                     : m[0].get<std::string>() + " " + m[1].get<std::string>());
    w.add_string("tokenizer.ggml.model", "gpt2");
    w.add_string("tokenizer.ggml.pre", "gpt-2");
    w.add_strings("tokenizer.ggml.tokens", tokens);
    w.add_i32s("tokenizer.ggml.token_type", types);
    w.add_strings("tokenizer.ggml.merges", merges);
    const int64_t bos = c.bos_token_id >= 0 ? c.bos_token_id : eos;
    if (c.eos_token_id >= 0) eos = c.eos_token_id;
    if (bos >= 0) w.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(bos));
    if (eos >= 0) w.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(eos));
    if (c.pad_token_id >= 0)
      w.add_u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(c.pad_token_id));
  }

  // -- tensors
  auto add = [&](const std::string& g, const Tensor& t) {
    const bool keep_f32 = t.ndim() <= 1 || ends_with(g, "_norm.weight") ||
                          g.find("ssm_conv1d") != std::string::npos || !ends_with(g, ".weight");
    GGMLType tt = keep_f32 ? GGMLType::F32 : type;
    if ((tt == GGMLType::Q8_0 || tt == GGMLType::Q4_0) && t.shape().back() % 32 != 0)
      tt = GGMLType::F16;
    w.add_tensor(g, t, tt);
  };
  for (auto& [name, v] : state_f32()) {
    if (name == "backbone.embedding.weight") {
      add("token_embd.weight", v);
      continue;
    }
    if (name == "backbone.norm_f.weight") {
      add("output_norm.weight", v);
      continue;
    }
    if (name == "lm_head.weight") {
      add("output.weight", v);
      continue;
    }
    // backbone.layers.<i>.<rest>
    const size_t a = std::string("backbone.layers.").size(), dot = name.find('.', a);
    const std::string i = name.substr(a, dot - a), rest = name.substr(dot + 1);
    const std::string b = "blk." + i + ".";
    if (rest == "norm.weight") {
      add(b + "attn_norm.weight", v);
    } else if (rest == "mixer.in_proj.weight") {
      add(b + "ssm_in.weight", v);
    } else if (rest == "mixer.conv1d.weight") {
      add(b + "ssm_conv1d.weight", v.reshape({v.dim(0), v.dim(2)}));
    } else if (rest == "mixer.conv1d.bias") {
      add(b + "ssm_conv1d.bias", v);
    } else if (rest == "mixer.x_proj.weight") {
      add(b + "ssm_x.weight", v);
    } else if (rest == "mixer.dt_proj.weight") {
      add(b + "ssm_dt.weight", v);
    } else if (rest == "mixer.dt_proj.bias" || rest == "mixer.dt_bias") {
      add(b + "ssm_dt.bias", v);
    } else if (rest == "mixer.A_log") {
      Tensor A = ops::neg_exp(v);  // llama.cpp stores A = -exp(A_log)
      add(b + "ssm_a", m2 ? A.reshape({A.numel(), 1}) : A);
    } else if (rest == "mixer.D") {
      add(b + "ssm_d", m2 ? v.reshape({v.numel(), 1}) : v);
    } else if (rest == "mixer.norm.weight") {
      add(b + "ssm_norm.weight", v.reshape({m2->ngroups, v.numel() / m2->ngroups}));
    } else if (rest == "mixer.out_proj.weight") {
      add(b + "ssm_out.weight", v);
    } else {
      throw Error(str("save_gguf: parameter '", name, "' has no llama.cpp tensor name"));
    }
  }
  std::filesystem::path p(path);
  if (p.has_parent_path()) std::filesystem::create_directories(p.parent_path());
  w.write(path);
}

Tokenizer Tokenizer::from_gguf(const std::string& path) {
  GGUFFile f = GGUFFile::open(path);
  const std::string o = f.origin();
  MAMBA_CHECK(f.has_key("tokenizer.ggml.model"), o,
              ": no tokenizer in this GGUF file (tokenizer.ggml.model is absent); pass a "
              "tokenizer.json with --tokenizer");
  const std::string model = f.get_string("tokenizer.ggml.model");
  MAMBA_CHECK(model == "gpt2", o, ": tokenizer.ggml.model is '", model,
              "'; only \"gpt2\" (byte-level BPE, GPT-NeoX's kind) is supported; pass a "
              "tokenizer.json with --tokenizer");
  // The pre-tokenizer: ours is GPT-2's / GPT-NeoX's ByteLevel split, which llama.cpp applies for
  // these names (its converter writes "gpt-2", or "mpt" for Mamba's built-in GPT-NeoX vocabulary).
  // Another split (llama-bpe, qwen2, ...) would give other ids: refused. Absent: taken as
  // GPT-NeoX's (llama.cpp then falls back to its "default" split, which differs; docs/GGUF.md).
  if (f.has_key("tokenizer.ggml.pre")) {
    const std::string pre = f.get_string("tokenizer.ggml.pre");
    static const std::set<std::string> gpt2_split = {"gpt-2",   "mpt",     "olmo",    "phi-2",
                                                     "jina-es", "jina-de", "gigachat"};
    MAMBA_CHECK(gpt2_split.count(pre) != 0, o, ": tokenizer.ggml.pre is '", pre,
                "'; only GPT-2's byte-level split (\"gpt-2\", \"mpt\", ...) is supported; pass "
                "a tokenizer.json with --tokenizer");
  }
  const auto& tokens = f.get_strings("tokenizer.ggml.tokens");
  const auto& merges = f.get_strings("tokenizer.ggml.merges");
  std::vector<int64_t> types(tokens.size(), kNormal);
  if (f.has_key("tokenizer.ggml.token_type")) {
    types = f.get_ints("tokenizer.ggml.token_type");
    MAMBA_CHECK(types.size() == tokens.size(), o, ": tokenizer.ggml.token_type has ", types.size(),
                " entries, tokenizer.ggml.tokens ", tokens.size());
  }
  MAMBA_CHECK(tokens.size() <= static_cast<size_t>(INT32_MAX), o, ": too many tokens");
  nlohmann::json vocab = nlohmann::json::object(), added = nlohmann::json::array();
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int64_t t = types[i];
    MAMBA_CHECK(t >= kNormal && t <= kByte, o, ": token ", i, " has unknown token type ", t);
    if (t == kUnused) continue;
    if (t == kControl || t == kUserDefined)
      added.push_back({{"id", i},
                       {"content", tokens[i]},
                       {"special", t == kControl},
                       {"normalized", t == kUserDefined},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"single_word", false}});
    if (t == kUserDefined) continue;  // raw text, not a byte-level vocabulary entry
    MAMBA_CHECK(!vocab.contains(tokens[i]), o, ": token '", tokens[i].substr(0, 40),
                "' appears twice in tokenizer.ggml.tokens");
    vocab[tokens[i]] = i;
  }
  const nlohmann::json bl = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}};
  nlohmann::json j = {{"version", "1.0"},
                      {"added_tokens", added},
                      {"normalizer", {{"type", "NFC"}}},
                      {"pre_tokenizer", bl},
                      {"post_processor", bl},
                      {"decoder", bl},
                      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
  std::string text;
  try {
    text = j.dump();
  } catch (const nlohmann::json::exception& e) {  // a token that is not valid UTF-8
    throw Error(str(o, ": the embedded vocabulary is not valid UTF-8 (", e.what(), ")"));
  }
  return from_json_string(text, o + " (tokenizer.ggml.*)");
}

}  // namespace mamba
