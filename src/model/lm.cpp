#include "mamba/lm.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "mamba/gemm.h"
#include "mamba/ops/norm.h"
#include "mamba/os.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/safetensors.h"
#include "mamba/torch_bin.h"
#include "mamba/trace.h"

namespace mamba {

namespace {

// The mixer config of layer i: ssm_cfg with the model's d_model, and the layer's own initial delta
// range when dt_init gives one. Clamps Mamba-2's chunk_size to the CPU tile (see Mamba2Config).
MixerConfig layer_mixer_config(const ModelConfig& cfg, const std::vector<std::pair<double, double>>& dt_init,
                               int64_t i) {
  MixerConfig m = cfg.mixer();
  std::visit(
      [&](auto& c) {
        if (!dt_init.empty()) c.dt_min = dt_init[i].first, c.dt_max = dt_init[i].second;
      },
      m);
  // The SSD gives the same result for any chunk size up to rounding; ssm_cfg.chunk_size (256 in
  // mamba_ssm's configs) is the GPU kernel's tile. On the CPU 64 is 1.6x faster at L = 512
  // (bench_ssd --sweep, docs/PERFORMANCE.md), so the layer uses min(chunk_size, 64).
  if (auto* c2 = std::get_if<Mamba2Config>(&m)) c2->chunk_size = std::min<int64_t>(c2->chunk_size, 64);
  return m;
}

}  // namespace

MambaLM::MambaLM(const ModelConfig& cfg, uint64_t seed, WeightDType dtype,
                 const std::vector<std::pair<double, double>>& dt_init)
    : cfg_(cfg) {
  cfg_.validate();
  MAMBA_CHECK(dt_init.empty() || static_cast<int64_t>(dt_init.size()) == cfg_.n_layer,
              "MambaLM: dt_init needs one {dt_min, dt_max} per layer (n_layer = ", cfg_.n_layer, "), got ",
              dt_init.size());
  MAMBA_CHECK(cfg_.attn_layer_idx.empty(), "config: attn_layer_idx (hybrid attention layers) is not supported yet");
  MAMBA_CHECK(cfg_.d_intermediate == 0, "config: d_intermediate > 0 (MLP after each mixer) is not supported yet");
  MAMBA_CHECK(cfg_.rms_norm, "config: rms_norm=false (LayerNorm blocks) is not supported yet");
  const int64_t V = cfg_.padded_vocab(), d = cfg_.d_model;
  emb_ = own_.add("backbone.embedding.weight", {V, d});
  Rng rng(seed);
  rng.fill_normal(emb_, 0, 0.02);  // mamba_ssm's _init_weights: normal(std=0.02)
  // A 16-bit model converts each weight as soon as it is initialised, so the fp32 copies (and
  // their gradients) of the whole model never exist at once.
  auto to_dtype = [&](const char* name, Tensor& f, ops::HalfWeight& h) {
    if (dtype == WeightDType::f32) return;
    Param& p = own_.get(name);
    ops::move_weight_storage(p.value, p.grad, f, h, dtype);
  };
  to_dtype("backbone.embedding.weight", emb_, emb_h_);
  blocks_.reserve(static_cast<size_t>(cfg_.n_layer));
  for (int64_t i = 0; i < cfg_.n_layer; ++i) {
    const uint64_t layer_seed = seed * 1000003ull + 17 * static_cast<uint64_t>(i) + 1;
    blocks_.emplace_back(layer_mixer_config(cfg_, dt_init, i), d, cfg_.norm_epsilon, layer_seed);
    std::visit([&](auto& m) { m.set_weight_dtype(dtype); }, blocks_.back().mixer());
  }
  norm_f_ = own_.add("backbone.norm_f.weight", {d}, true);
  norm_f_.fill(1.f);
  if (cfg_.tie_embeddings) {
    lm_head_ = emb_, head_h_ = emb_h_;
  } else {
    lm_head_ = own_.add("lm_head.weight", {V, d});
    rng.fill_normal(lm_head_, 0, 0.02);
    to_dtype("lm_head.weight", lm_head_, head_h_);
  }
  wdtype_ = dtype;
}

MambaLM::~MambaLM() = default;
MambaLM::MambaLM(MambaLM&&) noexcept = default;
MambaLM& MambaLM::operator=(MambaLM&&) noexcept = default;

// The order of named_parameters (the optimiser's and the checkpoints'): the embedding, every
// layer's norm, norm_f, the untied head, then every layer's mixer parameters.
template <class Fn>
void MambaLM::for_each_param(Fn&& fn) const {
  auto& self = const_cast<MambaLM&>(*this);
  auto& own = self.own_.all();
  fn(own.front().name, own.front(), static_cast<Block*>(nullptr));
  for (size_t i = 0; i < blocks_.size(); ++i)
    for (auto& p : self.blocks_[i].norm_params().all()) fn(str("backbone.layers.", i, ".", p.name), p, &self.blocks_[i]);
  for (size_t k = 1; k < own.size(); ++k) fn(own[k].name, own[k], static_cast<Block*>(nullptr));
  for (size_t i = 0; i < blocks_.size(); ++i)
    for (auto& p : self.blocks_[i].mixer_params().all())
      fn(str("backbone.layers.", i, ".mixer.", p.name), p, &self.blocks_[i]);
}

std::vector<std::pair<std::string, Param*>> MambaLM::named_parameters() {
  std::vector<std::pair<std::string, Param*>> out;
  for_each_param([&](const std::string& name, Param& p, Block*) { out.emplace_back(name, &p); });
  return out;
}

int64_t MambaLM::num_parameters() const {
  int64_t n = own_.count() + emb_h_.rows() * emb_h_.cols();
  if (!cfg_.tie_embeddings) n += head_h_.rows() * head_h_.cols();
  for (const Block& b : blocks_)
    n += b.norm_params().count() + std::visit([](const auto& m) { return m.num_parameters(); }, b.mixer());
  return n;
}

void MambaLM::set_weight_dtype(WeightDType t) {
  if (t == wdtype_) return;
  for (Block& b : blocks_)  // layer by layer: each releases its fp32 copies
    std::visit([&](auto& m) { m.set_weight_dtype(t); }, b.mixer());
  Param& ep = own_.get("backbone.embedding.weight");
  ops::move_weight_storage(ep.value, ep.grad, emb_, emb_h_, t);
  if (!cfg_.tie_embeddings) {
    Param& hp = own_.get("lm_head.weight");
    ops::move_weight_storage(hp.value, hp.grad, lm_head_, head_h_, t);
  }
  if (cfg_.tie_embeddings) lm_head_ = emb_, head_h_ = emb_h_;
  wdtype_ = t;
}

std::vector<std::pair<std::string, Tensor>> MambaLM::state_f32() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for_each_param([&](const std::string& name, Param& p, Block* b) {
    Tensor v = p.value;
    if (!b && p.name == "backbone.embedding.weight" && emb_h_.defined()) v = emb_h_.to_f32();
    if (!b && p.name == "lm_head.weight" && head_h_.defined()) v = head_h_.to_f32();
    if (b && name.find(".mixer.") != std::string::npos)
      v = std::visit([&](const auto& m) { return m.param_f32(p.name); }, b->mixer());
    out.emplace_back(name, v);
  });
  return out;
}

void MambaLM::zero_grad() {
  for (auto& [name, p] : named_parameters()) p->grad.zero();
}

void MambaLM::load_state_dict(const std::map<std::string, Tensor>& sd, const std::string& origin) {
  std::vector<std::string> names;
  for (const auto& kv : sd) names.push_back(kv.first);
  load_tensors(
      names, [&](const std::string& k) { return sd.at(k).shape(); },
      [&](const std::string& k) { return sd.at(k); }, origin);
}

void MambaLM::load_tensors(const std::vector<std::string>& names,
                           const std::function<Shape(const std::string&)>& shape_of,
                           const std::function<Tensor(const std::string&)>& get, const std::string& origin) {
  std::map<std::string, std::string> key;  // mamba_ssm name -> name in the source
  for (const auto& k : names) key[cfg_.source_format == "hf" ? hf_to_mamba_ssm_name(k) : k] = k;
  // Every parameter with its 16-bit storage when it has one (then its fp32 value is undefined).
  struct Entry {
    std::string name;
    Param* p;
    ops::HalfWeight* h;
  };
  std::vector<Entry> entries;
  for_each_param([&](const std::string& name, Param& p, Block* b) {
    ops::HalfWeight* h = nullptr;
    if (!b) h = p.name == "backbone.embedding.weight" ? &emb_h_ : p.name == "lm_head.weight" ? &head_h_ : nullptr;
    if (h && !h->defined()) h = nullptr;
    if (b && name.find(".mixer.") != std::string::npos)
      h = std::visit([&](auto& m) { return m.half_weight(p.name); }, b->mixer());
    entries.push_back({name, &p, h});
  });
  std::map<std::string, bool> used;
  for (const Entry& e : entries) {
    auto it = key.find(e.name);
    MAMBA_CHECK(it != key.end(), origin, ": missing tensor '", e.name, "'");
    const Shape expected = e.h ? Shape{e.h->rows(), e.h->cols()} : e.p->value.shape();
    const Shape got = shape_of(it->second);
    MAMBA_CHECK(got == expected, origin, ": tensor '", e.name, "' has shape ", shape_str(got), ", expected ",
                shape_str(expected));
    // One tensor at a time: a 16-bit model never holds the whole fp32 state dict.
    if (e.h)
      *e.h = ops::HalfWeight(get(it->second), wdtype_);
    else
      e.p->value.copy_from(get(it->second));
    used[e.name] = true;
  }
  if (cfg_.tie_embeddings) head_h_ = emb_h_;
  const Shape emb_shape{cfg_.padded_vocab(), cfg_.d_model};
  for (const auto& [k, src] : key) {
    if (used.count(k)) continue;
    if (k == "lm_head.weight" && cfg_.tie_embeddings) {
      // Stored twice by save_pretrained; must equal the embedding it is tied to.
      const Shape got = shape_of(src);
      MAMBA_CHECK(got == emb_shape, origin, ": lm_head.weight has shape ", shape_str(got), ", expected ",
                  shape_str(emb_shape), " (tied to the embedding)");
      continue;
    }
    throw Error(str(origin, ": unexpected tensor '", k, "' (not a parameter of this config)"));
  }
}

MambaLM MambaLM::load(const std::string& dir) { return load(dir, WeightDType::f32); }

MambaLM MambaLM::load(const std::string& dir, WeightDType dtype) {
  namespace fs = std::filesystem;
  MAMBA_CHECK(fs::is_directory(dir), "model folder '", dir, "' does not exist");
  ModelConfig cfg = ModelConfig::load((fs::path(dir) / "config.json").string());
  MambaLM lm(cfg, 0, dtype);
  std::string st = (fs::path(dir) / "model.safetensors").string();
  std::string bin = (fs::path(dir) / "pytorch_model.bin").string();
  if (os::exists(st)) {
    auto f = SafetensorsFile::open(st);  // memory-mapped: tensors are converted one at a time
    lm.load_tensors(
        f.names(), [&](const std::string& n) { return f.info(n).shape; },
        [&](const std::string& n) { return f.tensor(n); }, st);
  } else if (os::exists(bin)) {
    lm.load_state_dict(load_torch_state_dict(bin), bin);
  } else {
    throw Error(str("model folder '", dir, "' has neither model.safetensors nor pytorch_model.bin"));
  }
  return lm;
}

void MambaLM::save(const std::string& dir, bool hf) const {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  std::vector<std::pair<std::string, Tensor>> tensors;
  Tensor emb;
  for (auto& [name, v] : state_f32()) {  // 16-bit weights as their exact fp32 values
    if (name == "backbone.embedding.weight") emb = v;
    tensors.emplace_back(hf ? mamba_ssm_to_hf_name(name) : name, v);
  }
  if (cfg_.tie_embeddings && !hf) tensors.emplace_back("lm_head.weight", emb);  // as save_pretrained
  std::string cfg = hf ? cfg_.to_hf_json() : cfg_.to_json();  // validate before writing anything
  save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  os::write_file_atomic((fs::path(dir) / "config.json").string(), cfg.data(), cfg.size());
}

Tensor MambaLM::embed(std::span<const int32_t> ids, int64_t B, int64_t L) const {
  MAMBA_CHECK(B >= 1 && L >= 1 && static_cast<int64_t>(ids.size()) == B * L, "input ids: expected ", B, "x", L,
              " = ", B * L, " ids, got ", ids.size());
  const int64_t d = cfg_.d_model, V = vocab();
  Tensor h = Tensor::empty({B, L, d});
  for (int64_t i = 0; i < B * L; ++i) {
    MAMBA_CHECK(ids[i] >= 0 && ids[i] < V, "input ids: id ", ids[i], " at position ", i,
                " is outside the vocabulary [0, ", V, ")");
    if (emb_h_.defined())
      emb_h_.row_to_f32(ids[i], h.data() + i * d);
    else
      std::copy(emb_.data() + ids[i] * d, emb_.data() + (ids[i] + 1) * d, h.data() + i * d);
  }
  trace::op("embedding", {{B, L}}, {{B, L, d}});
  return h;
}

Tensor MambaLM::head(const Tensor& hidden) const {
  const int64_t d = cfg_.d_model, V = vocab(), M = hidden.numel() / d;
  Tensor logits = Tensor::empty({M, V});
  ops::matmul_wt(hidden.data(), M, d, lm_head_, head_h_, 0, V, logits.data(), V);
  return logits;
}

Tensor MambaLM::backbone(std::span<const int32_t> ids, int64_t B, int64_t L, LMSaved* sv, LMState* state) const {
  Tensor hidden = embed(ids, B, L);
  Tensor residual;
  if (sv) {
    *sv = LMSaved{};
    sv->ids.assign(ids.begin(), ids.end()), sv->B = B, sv->L = L;
    sv->blocks.resize(blocks_.size());
  }
  if (state) state->layers.assign(blocks_.size(), BlockState{}), state->batch = B;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    trace::Scope scope(str("layers.", i, "."));
    hidden = blocks_[i].forward(hidden, residual, sv ? &sv->blocks[i] : nullptr, state ? &state->layers[i] : nullptr);
  }
  Tensor out = ops::add_rms_norm_fwd(hidden, residual, norm_f_, static_cast<float>(cfg_.norm_epsilon));
  trace::op("add+norm_f", {hidden.shape()}, {out.shape()});
  if (sv) sv->residual_final = residual, sv->hidden_final = out;
  return out;  // (B, L, d_model)
}

Tensor MambaLM::forward(std::span<const int32_t> ids, int64_t B, int64_t L, LMSaved* saved, LMState* state) const {
  MAMBA_CHECK(!saved || wdtype_ == WeightDType::f32, "MambaLM::forward: weights are ",
              weight_dtype_name(wdtype_), ": inference only; load in f32 to train");
  Tensor out = backbone(ids, B, L, saved, state);
  Tensor logits = head(out).reshape({B, L, vocab()});
  trace::op("lm_head", {out.shape()}, {logits.shape()});
  return logits;
}

Tensor MambaLM::forward_last(std::span<const int32_t> ids, int64_t B, int64_t L, LMState* state) const {
  Tensor out = backbone(ids, B, L, nullptr, state);
  const int64_t d = cfg_.d_model;
  Tensor last = Tensor::empty({B, d});
  for (int64_t b = 0; b < B; ++b)
    std::copy(out.data() + ((b + 1) * L - 1) * d, out.data() + (b + 1) * L * d, last.data() + b * d);
  Tensor logits = head(last);
  trace::op("lm_head", {last.shape()}, {logits.shape()});
  return logits;
}

void MambaLM::backward(const LMSaved& sv, const Tensor& dlogits) {
  MAMBA_CHECK(!sv.empty(), "MambaLM::backward: no saved activations (call forward with saved)");
  MAMBA_CHECK(sv.blocks.size() == blocks_.size(), "MambaLM::backward: the saved activations are for ",
              sv.blocks.size(), " layers, the model has ", blocks_.size());
  MAMBA_CHECK(wdtype_ == WeightDType::f32, "MambaLM::backward: weights are ", weight_dtype_name(wdtype_),
              ": inference only; load in f32 to train");
  const int64_t B = sv.B, L = sv.L, d = cfg_.d_model, V = vocab(), M = B * L;
  check_shape(dlogits, "MambaLM::backward: dlogits", {B, L, V});
  const float eps = static_cast<float>(cfg_.norm_epsilon);
  // Head: logits = hidden_final @ W^T.
  Tensor dhid = Tensor::empty({B, L, d});
  gemm(false, false, M, d, V, 1.f, dlogits.data(), V, lm_head_.data(), d, 0.f, dhid.data(), d);
  Param& head_p = cfg_.tie_embeddings ? own_.get("backbone.embedding.weight") : own_.get("lm_head.weight");
  gemm(true, false, V, d, M, 1.f, dlogits.data(), V, sv.hidden_final.data(), d, 1.f, head_p.grad.data(), d);
  // norm_f.
  auto gf = ops::rms_norm_bwd(sv.residual_final, norm_f_, eps, dhid);
  Param& nf = own_.get("backbone.norm_f.weight");
  for (int64_t j = 0; j < d; ++j) nf.grad[j] += gf.dweight[j];
  Tensor dres = gf.dx;  // gradient w.r.t. the residual stream; also w.r.t. the last mixer output
  for (int64_t i = cfg_.n_layer - 1; i >= 0; --i) blocks_[i].backward(sv.blocks[i], dres);
  // Embedding: scatter-add the residual gradient into the rows of the ids.
  Param& ep = own_.get("backbone.embedding.weight");
  for (int64_t t = 0; t < M; ++t) {
    float* row = ep.grad.data() + static_cast<int64_t>(sv.ids[t]) * d;
    const float* g = dres.data() + t * d;
    for (int64_t j = 0; j < d; ++j) row[j] += g[j];
  }
}

LMState MambaLM::new_state(int64_t batch) const {
  LMState s;
  s.batch = batch;
  for (const Block& b : blocks_) s.layers.push_back(b.new_state(batch));
  return s;
}

Tensor MambaLM::step(std::span<const int32_t> ids, LMState& state) const {
  const int64_t B = static_cast<int64_t>(ids.size());
  MAMBA_CHECK(state.batch == B, "MambaLM::step: state is for batch ", state.batch, ", got ", B, " ids");
  MAMBA_CHECK(state.layers.size() == blocks_.size(), "MambaLM::step: state has ", state.layers.size(),
              " layers, the model ", blocks_.size());
  Tensor hidden = embed(ids, B, 1).reshape({B, cfg_.d_model});
  Tensor residual;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    trace::Scope scope(str("layers.", i, "."));
    hidden = blocks_[i].step(hidden, residual, state.layers[i]);
  }
  Tensor out = ops::add_rms_norm_fwd(hidden, residual, norm_f_, static_cast<float>(cfg_.norm_epsilon));
  return head(out);
}

}  // namespace mamba
