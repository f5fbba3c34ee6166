#include "mamba/lm.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "mamba/ops/elementwise.h"
#include "mamba/ops/linear.h"
#include "mamba/ops/norm.h"
#include "mamba/os.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/safetensors.h"
#include "mamba/torch_bin.h"
#include "mamba/trace.h"

namespace mamba {

struct LMSaved {
  std::vector<int32_t> ids;
  int64_t B = 0, L = 0;
  std::vector<Tensor> residual;     // per layer: the residual stream entering its norm (B, L, d)
  std::vector<Mamba1Saved> m1;      // per layer
  std::vector<Mamba2Saved> m2;
  Tensor residual_final;            // (B, L, d) entering norm_f
  Tensor hidden_final;              // (B, L, d) norm_f output (input of the head)
};

Mamba1Config mamba1_config(const ModelConfig& cfg) {
  const SsmConfig& s = cfg.ssm_cfg;
  Mamba1Config c;
  c.d_model = cfg.d_model, c.d_state = s.d_state, c.d_conv = s.d_conv, c.expand = s.expand;
  c.dt_rank = s.dt_rank_auto ? -1 : s.dt_rank;
  c.dt_min = s.dt_min, c.dt_max = s.dt_max, c.dt_init = s.dt_init, c.dt_scale = s.dt_scale;
  c.dt_init_floor = s.dt_init_floor, c.conv_bias = s.conv_bias, c.bias = s.bias;
  c.selective = s.selective;
  return c;
}

Mamba2Config mamba2_config(const ModelConfig& cfg) {
  const SsmConfig& s = cfg.ssm_cfg;
  Mamba2Config c;
  c.d_model = cfg.d_model, c.d_state = s.d_state, c.d_conv = s.d_conv, c.expand = s.expand;
  c.headdim = s.headdim, c.ngroups = s.ngroups;
  c.chunk_size = s.chunk_size;  // the layer tiles the CPU SSD by min(chunk_size, 64)
  c.d_ssm = s.d_ssm;            // 0 = None in both
  c.rmsnorm = s.rmsnorm, c.norm_before_gate = s.norm_before_gate, c.D_has_hdim = s.D_has_hdim;
  c.A_init_range = {s.A_init_lo, s.A_init_hi};
  c.dt_limit = {s.dt_limit_lo, s.dt_limit_hi};
  c.dt_min = s.dt_min, c.dt_max = s.dt_max, c.dt_init_floor = s.dt_init_floor;
  c.bias = s.bias, c.conv_bias = s.conv_bias;
  return c;
}

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
  emb_ = &own_.add_matrix("backbone.embedding.weight", {V, d});
  Rng rng(seed);
  rng.fill_normal(emb_->value.f32(), 0, 0.02);  // mamba_ssm's _init_weights: normal(std=0.02)
  // A 16-bit model converts each weight as soon as it is initialised, so the fp32 copies (and
  // their gradients) of the whole model never exist at once.
  own_.set_weight_dtype(dtype);
  for (int64_t i = 0; i < cfg_.n_layer; ++i) {
    norms_.push_back(&own_.add(str("backbone.layers.", i, ".norm.weight"), {d}, true));
    norms_.back()->value.f32().fill(1.f);
    uint64_t layer_seed = seed * 1000003ull + 17 * static_cast<uint64_t>(i) + 1;
    auto layer_dt = [&](auto c) {  // this layer's initial delta range, when one is given
      if (!dt_init.empty()) c.dt_min = dt_init[i].first, c.dt_max = dt_init[i].second;
      return c;
    };
    if (cfg_.ssm_cfg.is_mamba2()) {
      m2_.push_back(std::make_unique<Mamba2>(layer_dt(mamba2_config(cfg_)), layer_seed));
      m2_.back()->params().set_weight_dtype(dtype);
    } else {
      m1_.push_back(std::make_unique<Mamba1>(layer_dt(mamba1_config(cfg_)), layer_seed));
      m1_.back()->params().set_weight_dtype(dtype);
    }
  }
  norm_f_ = &own_.add("backbone.norm_f.weight", {d}, true);
  norm_f_->value.f32().fill(1.f);
  if (cfg_.tie_embeddings) {
    lm_head_ = emb_;
  } else {
    lm_head_ = &own_.add_matrix("lm_head.weight", {V, d});
    rng.fill_normal(lm_head_->value.f32(), 0, 0.02);
    own_.set_weight_dtype(dtype);
  }
}

MambaLM::~MambaLM() = default;
MambaLM::MambaLM(MambaLM&&) noexcept = default;
MambaLM& MambaLM::operator=(MambaLM&&) noexcept = default;

std::vector<std::pair<std::string, Param*>> MambaLM::named_parameters() {
  std::vector<std::pair<std::string, Param*>> out;
  for (auto& p : own_.all()) out.emplace_back(p.name, &p);
  for (size_t i = 0; i < m1_.size(); ++i)
    for (auto& p : m1_[i]->params().all()) out.emplace_back(str("backbone.layers.", i, ".mixer.", p.name), &p);
  for (size_t i = 0; i < m2_.size(); ++i)
    for (auto& p : m2_[i]->params().all()) out.emplace_back(str("backbone.layers.", i, ".mixer.", p.name), &p);
  return out;
}

int64_t MambaLM::num_parameters() const {
  int64_t n = own_.count();  // a tied head is the embedding: counted once
  for (auto& m : m1_) n += m->params().count();
  for (auto& m : m2_) n += m->params().count();
  return n;
}

void MambaLM::set_weight_dtype(WeightDType t) {
  for (auto& m : m1_) m->params().set_weight_dtype(t);  // layer by layer: each releases its fp32 copies
  for (auto& m : m2_) m->params().set_weight_dtype(t);
  own_.set_weight_dtype(t);
}

std::vector<std::pair<std::string, Tensor>> MambaLM::state_f32() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (auto& [name, p] : const_cast<MambaLM*>(this)->named_parameters()) out.emplace_back(name, p->value.to_f32());
  return out;
}

void MambaLM::zero_grad() {
  for (auto& [name, p] : named_parameters())
    if (p->grad.defined()) p->grad.zero();
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
  std::map<std::string, bool> used;
  for (auto& [name, p] : named_parameters()) {
    auto it = key.find(name);
    MAMBA_CHECK(it != key.end(), origin, ": missing tensor '", name, "'");
    const Shape expected = p->value.shape();
    const Shape got = shape_of(it->second);
    MAMBA_CHECK(got == expected, origin, ": tensor '", name, "' has shape ", shape_str(got), ", expected ",
                shape_str(expected));
    // One tensor at a time: a 16-bit model never holds the whole fp32 state dict.
    p->value.assign(get(it->second));
    used[name] = true;
  }
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

Tensor MambaLM::embed(const std::vector<int32_t>& ids, int64_t B, int64_t L) const {
  MAMBA_CHECK(static_cast<int64_t>(ids.size()) == B * L, "input ids: expected ", B, "x", L, " = ",
              B * L, " ids, got ", ids.size());
  const int64_t d = cfg_.d_model;
  Tensor h = ops::embedding_fwd(emb_->value, ids).reshape({B, L, d});
  trace::op("embedding", {{B, L}}, {{B, L, d}});
  return h;
}

Tensor MambaLM::head(const Tensor& hidden) const {
  const int64_t d = cfg_.d_model;
  return ops::linear(hidden.reshape({-1, d}), lm_head_->value);  // (M, V_pad)
}

Tensor MambaLM::backbone(const std::vector<int32_t>& ids, int64_t B, int64_t L, LMSaved* sv,
                         LMState* state) {
  const float eps = static_cast<float>(cfg_.norm_epsilon);
  Tensor hidden = embed(ids, B, L);
  Tensor residual;
  if (sv) sv->ids = ids, sv->B = B, sv->L = L;
  if (state) *state = new_state(B);
  for (int64_t i = 0; i < cfg_.n_layer; ++i) {
    trace::Scope scope(str("layers.", i, "."));
    Tensor normed = ops::add_rms_norm_fwd(hidden, residual, norms_[i]->value.f32(), eps);  // residual += hidden
    trace::op("add+norm", {hidden.shape()}, {normed.shape()});
    if (sv) sv->residual.push_back(residual.clone());
    trace::Scope mixer("mixer.");
    if (!m1_.empty()) {
      Mamba1Saved* ms = nullptr;
      if (sv) sv->m1.emplace_back(), ms = &sv->m1.back();
      hidden = m1_[i]->forward(normed, ms, state ? &state->m1[i] : nullptr);
    } else {
      Mamba2Saved* ms = nullptr;
      if (sv) sv->m2.emplace_back(), ms = &sv->m2.back();
      hidden = m2_[i]->forward(normed, ms, state ? &state->m2[i] : nullptr);
    }
  }
  Tensor out = ops::add_rms_norm_fwd(hidden, residual, norm_f_->value.f32(), eps);
  trace::op("add+norm_f", {hidden.shape()}, {out.shape()});
  if (sv) sv->residual_final = residual, sv->hidden_final = out;
  return out;  // (B, L, d_model)
}

Tensor MambaLM::forward(const std::vector<int32_t>& ids, int64_t B, int64_t L, LMSaved** saved,
                        LMState* state) {
  MAMBA_CHECK(!saved || weight_dtype() == WeightDType::f32, "MambaLM::forward: weights are ",
              weight_dtype_name(weight_dtype()), ": inference only; load in f32 to train");
  LMSaved* sv = saved ? new LMSaved : nullptr;
  Tensor out;
  try {
    out = backbone(ids, B, L, sv, state);
  } catch (...) {
    delete sv;
    throw;
  }
  Tensor logits = head(out).reshape({B, L, vocab()});
  trace::op("lm_head", {out.shape()}, {logits.shape()});
  if (saved) *saved = sv;
  return logits;
}

Tensor MambaLM::forward_last(const std::vector<int32_t>& ids, int64_t B, int64_t L, LMState* state) {
  Tensor out = backbone(ids, B, L, nullptr, state);
  const int64_t d = cfg_.d_model;
  const Tensor last = out.reshape({B, L * d}).cols((L - 1) * d, d);  // (B, d): a strided view
  Tensor logits = head(last);
  trace::op("lm_head", {last.shape()}, {logits.shape()});
  return logits;
}

void MambaLM::free_saved(LMSaved* saved) { delete saved; }

void MambaLM::backward(LMSaved* sv, const Tensor& dlogits) {
  MAMBA_CHECK(sv != nullptr, "MambaLM::backward: no saved activations (call forward with saved)");
  std::unique_ptr<LMSaved> guard(sv);
  MAMBA_CHECK(weight_dtype() == WeightDType::f32, "MambaLM::backward: weights are ",
              weight_dtype_name(weight_dtype()), ": inference only; load in f32 to train");
  const int64_t B = sv->B, L = sv->L, d = cfg_.d_model, V = vocab(), M = B * L;
  check_shape(dlogits, "MambaLM::backward: dlogits", {B, L, V});
  const float eps = static_cast<float>(cfg_.norm_epsilon);
  // Head: logits = hidden_final @ W^T (W the embedding when tied: its gradient gets both parts).
  Tensor dhid = ops::linear_bwd(sv->hidden_final, lm_head_->value, dlogits, &lm_head_->grad, nullptr);
  // norm_f.
  auto gf = ops::rms_norm_bwd(sv->residual_final, norm_f_->value.f32(), eps, dhid);
  ops::add_into(norm_f_->grad, gf.dweight);
  Tensor dres = gf.dx;  // gradient w.r.t. the residual stream; also w.r.t. the last mixer output
  for (int64_t i = cfg_.n_layer - 1; i >= 0; --i) {
    // residual_i = hidden_{i-1} + residual_{i-1}; hidden_i = mixer(norm(residual_i)).
    Tensor dnormed = !m1_.empty() ? m1_[i]->backward(sv->m1[i], dres) : m2_[i]->backward(sv->m2[i], dres);
    auto gn = ops::rms_norm_bwd(sv->residual[i], norms_[i]->value.f32(), eps, dnormed);
    ops::add_into(norms_[i]->grad, gn.dweight);
    ops::add_into(dres, gn.dx);
  }
  // Embedding: scatter-add the residual gradient into the rows of the ids.
  ops::embedding_bwd(emb_->grad, sv->ids, dres.reshape({M, d}));
}

LMState MambaLM::new_state(int64_t batch) const {
  LMState s;
  s.batch = batch;
  for (auto& m : m1_) s.m1.push_back(m->new_state(batch));
  for (auto& m : m2_) s.m2.push_back(m->new_state(batch));
  return s;
}

Tensor MambaLM::step(const std::vector<int32_t>& ids, LMState& state) {
  const int64_t B = static_cast<int64_t>(ids.size());
  MAMBA_CHECK(state.batch == B, "MambaLM::step: state is for batch ", state.batch, ", got ", B, " ids");
  const float eps = static_cast<float>(cfg_.norm_epsilon);
  Tensor hidden = embed(ids, B, 1).reshape({B, cfg_.d_model});
  Tensor residual;
  for (int64_t i = 0; i < cfg_.n_layer; ++i) {
    trace::Scope scope(str("layers.", i, "."));
    Tensor normed = ops::add_rms_norm_fwd(hidden, residual, norms_[i]->value.f32(), eps);
    trace::Scope mixer("mixer.");
    hidden = !m1_.empty() ? m1_[i]->step(normed, state.m1[i]) : m2_[i]->step(normed, state.m2[i]);
  }
  Tensor out = ops::add_rms_norm_fwd(hidden, residual, norm_f_->value.f32(), eps);
  return head(out);
}

}  // namespace mamba
