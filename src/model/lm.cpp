#include "mamba/lm.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <optional>
#include <variant>

#include "core/os.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/safetensors.h"
#include "mamba/trace.h"
#include "model/torch_bin.h"
#include "ops/elementwise.h"
#include "ops/linear.h"
#include "ops/norm.h"

namespace mamba {

namespace {

// The mixer config of layer i: ssm_cfg with the model's d_model (attn_cfg for an attention layer),
// and an SSM layer's own initial delta range when dt_init gives one.
MixerConfig layer_mixer_config(const ModelConfig& cfg,
                               const std::vector<std::pair<double, double>>& dt_init, int64_t i) {
  MixerConfig m = cfg.layer_mixer(i);
  std::visit(
      [&](auto& c) {
        if constexpr (requires { c.dt_min; })
          if (!dt_init.empty()) c.dt_min = dt_init[i].first, c.dt_max = dt_init[i].second;
      },
      m);
  return m;
}

// Parameters of a Mamba-1 / Mamba-2 mixer, as its constructor declares them (in double: a hostile
// config cannot overflow it).
template <class C>
double ssm_mixer_parameters(const C& c) {
  const double dm = static_cast<double>(c.d_model), N = static_cast<double>(c.d_state),
               K = static_cast<double>(c.d_conv);
  if constexpr (std::is_same_v<C, Mamba1Config>) {
    const double D = static_cast<double>(c.d_inner()), R = static_cast<double>(c.rank());
    double n = D * N + D + 2 * D * dm + D * K + D + dm * D;  // A_log D in conv dt_b out
    n += c.selective ? (R + 2 * N) * D + D * R : 2 * D * N;  // x_proj dt_proj | B_ssm C_ssm
    if (c.bias) n += 2 * D + dm;
    if (c.conv_bias) n += D;
    return n;
  } else {
    const double H = static_cast<double>(c.nheads()), dssm = static_cast<double>(c.ssm_dim());
    const double din = static_cast<double>(c.d_inner()), cd = static_cast<double>(c.conv_dim());
    const double dip = static_cast<double>(c.d_in_proj());
    double n = 2 * H + (c.D_has_hdim ? dssm : H) + dip * dm + cd * K + dm * din;
    if (c.bias) n += dip + dm;
    if (c.conv_bias) n += cd;
    if (c.rmsnorm) n += dssm;
    return n;
  }
}

// Parameters of one mixer, from its config alone (in doubles: the config is validated, but the
// products may still be far beyond any memory). Every registered mixer must have a branch: the
// static_assert stops a new one from silently counting 0.
double mixer_parameters(const MixerConfig& m) {
  return std::visit(
      [](const auto& c) -> double {
        using C = std::decay_t<decltype(c)>;
        if constexpr (std::is_same_v<C, Mamba1Config> || std::is_same_v<C, Mamba2Config>) {
          return ssm_mixer_parameters(c);
        } else if constexpr (std::is_same_v<C, Mamba3Config>) {
          const double dm = static_cast<double>(c.d_model), D = static_cast<double>(c.d_inner());
          const double H = static_cast<double>(c.nheads()), R = static_cast<double>(c.rank());
          const double N = static_cast<double>(c.d_state), P = static_cast<double>(c.headdim);
          // dt_bias, B_bias, C_bias, [mimo_x, mimo_z, mimo_o], D, in_proj, B_norm, C_norm,
          // [norm], out_proj
          double n =
              H + 2 * H * R * N + H + static_cast<double>(c.d_in_proj()) * dm + 2 * N + dm * D;
          if (c.is_mimo) n += 3 * H * R * P;
          if (c.is_outproj_norm) n += D;
          return n;
        } else if constexpr (std::is_same_v<C, MHAConfig>) {
          const double dm = static_cast<double>(c.d_model), qkv = static_cast<double>(c.qkv_dim());
          const double mlp = static_cast<double>(c.mlp());
          double n = (qkv + mlp) * dm + dm * (static_cast<double>(c.d_inner()) + mlp / 2);
          if (c.qkv_proj_bias) n += qkv + mlp;
          if (c.d_conv > 0) n += qkv * static_cast<double>(c.d_conv) + qkv;
          if (c.out_proj_bias) n += dm;
          return n;
        } else {
          static_assert(sizeof(C) == 0, "count_parameters: add the new mixer's parameter count");
          return 0.0;
        }
      },
      m);
}

}  // namespace

int64_t MambaLM::count_parameters(const ModelConfig& cfg) {
  const double d = static_cast<double>(cfg.d_model), V = static_cast<double>(cfg.padded_vocab());
  double n = V * d + d + (cfg.tie_embeddings ? 0.0 : V * d);  // embedding, norm_f, head
  for (int64_t i = 0; i < cfg.n_layer; ++i) {
    n += d + mixer_parameters(layer_mixer_config(cfg, {}, i));  // norm, mixer
    if (cfg.d_intermediate > 0) {
      GatedMLPConfig mc;
      mc.in_features = cfg.d_model, mc.hidden_features = cfg.d_intermediate;
      const double H = static_cast<double>(mc.hidden());
      n += d + 2 * H * d + d * H;  // norm2, fc1, fc2
      if (mc.bias) n += 2 * H + d;
    }
  }
  return n >= 9.2e18 ? INT64_MAX : static_cast<int64_t>(n);
}

MambaLM::MambaLM(const ModelConfig& cfg, uint64_t seed, WeightDType dtype,
                 const std::vector<std::pair<double, double>>& dt_init)
    : cfg_(cfg) {
  cfg_.validate();
  MAMBA_CHECK(dt_init.empty() || static_cast<int64_t>(dt_init.size()) == cfg_.n_layer,
              "MambaLM: dt_init needs one {dt_min, dt_max} per layer (n_layer = ", cfg_.n_layer,
              "), got ", dt_init.size());
  MAMBA_CHECK(cfg_.rms_norm, "config: rms_norm=false (LayerNorm blocks) is not supported yet");
  const int64_t V = cfg_.padded_vocab(), d = cfg_.d_model;
  {
    // fp32: the value of each parameter (gradients come only when training: the optimiser
    // checks and allocates them); 16-bit: at least the 2-byte value of each (the matrices' fp32
    // copies are released layer by layer as they are converted).
    const double n = static_cast<double>(count_parameters(cfg_));
    const double bytes = n * (dtype == WeightDType::f32    ? 4.0
                              : dtype == WeightDType::q8_0 ? 34.0 / 32
                              : dtype == WeightDType::q4_0 ? 18.0 / 32
                                                           : 2.0);
    os::check_memory(bytes >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(bytes),
                     str("a model of d_model ", d, ", n_layer ", cfg_.n_layer, ", vocab ", V, " (",
                         static_cast<int64_t>(n), " parameters",
                         dtype == WeightDType::f32 ? ", fp32 values)" : ")"));
  }
  emb_ = &own_.add_matrix("backbone.embedding.weight", {V, d});
  Rng rng(seed);
  rng.fill_normal(emb_->value.f32(), 0, 0.02);  // mamba_ssm's _init_weights: normal(std=0.02)
  // A 16-bit model converts each weight as soon as it is initialised, so the fp32 copies (and
  // their gradients) of the whole model never exist at once.
  own_.set_weight_dtype(dtype);
  blocks_.reserve(static_cast<size_t>(cfg_.n_layer));
  for (int64_t i = 0; i < cfg_.n_layer; ++i) {
    const uint64_t layer_seed = seed * 1000003ull + 17 * static_cast<uint64_t>(i) + 1;
    blocks_.emplace_back(layer_mixer_config(cfg_, dt_init, i), d, cfg_.norm_epsilon, layer_seed,
                         cfg_.d_intermediate);
    blocks_.back().mixer_params().set_weight_dtype(dtype);
    if (GatedMLP* mlp = blocks_.back().mlp()) mlp->params().set_weight_dtype(dtype);
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

// The order of named_parameters (the optimiser's and the checkpoints'): the embedding, every
// layer's norm (and norm2), norm_f, the untied head, then every layer's mixer (and MLP) parameters.
template <class Fn>
void MambaLM::for_each_param(Fn&& fn) const {
  auto& self = const_cast<MambaLM&>(*this);
  auto& own = self.own_.all();
  fn(own.front().name, own.front(), static_cast<Block*>(nullptr));
  for (size_t i = 0; i < blocks_.size(); ++i)
    for (auto& p : self.blocks_[i].norm_params().all())
      fn(str("backbone.layers.", i, ".", p.name), p, &self.blocks_[i]);
  for (size_t k = 1; k < own.size(); ++k) fn(own[k].name, own[k], static_cast<Block*>(nullptr));
  for (size_t i = 0; i < blocks_.size(); ++i) {
    for (auto& p : self.blocks_[i].mixer_params().all())
      fn(str("backbone.layers.", i, ".mixer.", p.name), p, &self.blocks_[i]);
    if (GatedMLP* mlp = self.blocks_[i].mlp())
      for (auto& p : mlp->params().all())
        fn(str("backbone.layers.", i, ".mlp.", p.name), p, &self.blocks_[i]);
  }
}

std::vector<std::pair<std::string, Param*>> MambaLM::named_parameters() {
  std::vector<std::pair<std::string, Param*>> out;
  for_each_param([&](const std::string& name, Param& p, Block*) { out.emplace_back(name, &p); });
  return out;
}

int64_t MambaLM::num_parameters() const {
  int64_t n = own_.count();  // a tied head is the embedding: counted once
  for (const Block& b : blocks_)
    n += b.norm_params().count() + b.mixer_params().count() +
         (b.mlp() ? b.mlp()->params().count() : 0);
  return n;
}

TokenCost MambaLM::token_cost() const {
  TokenCost c;
  for_each_param([&](const std::string& name, Param& p, Block*) {
    const bool emb = name == "backbone.embedding.weight", head = name == "lm_head.weight";
    if (!emb || cfg_.tie_embeddings) c.decode_weight_bytes += p.value.bytes();
    if (p.matrix && !emb && !head) c.prefill_flops += 2 * p.value.numel();
  });
  c.state_bytes = 4 * new_state(1).floats();
  c.decode_flops = c.prefill_flops + 2 * vocab() * cfg_.d_model;
  return c;
}

void MambaLM::set_weight_dtype(WeightDType t) {
  for (Block& b : blocks_) {  // layer by layer: each releases its fp32 copies
    b.mixer_params().set_weight_dtype(t);
    if (GatedMLP* mlp = b.mlp()) mlp->params().set_weight_dtype(t);
  }
  own_.set_weight_dtype(t);
}

std::vector<std::pair<std::string, Tensor>> MambaLM::state_f32() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for_each_param(
      [&](const std::string& name, Param& p, Block*) { out.emplace_back(name, p.value.to_f32()); });
  return out;
}

void LMState::copy_row(int64_t dst_b, const LMState& src, int64_t src_b) {
  MAMBA_CHECK(src.layers.size() == layers.size(), "LMState::copy_row: states of different models (",
              src.layers.size(), " vs ", layers.size(), " layers)");
  for (size_t i = 0; i < layers.size(); ++i)
    std::visit(
        [&](auto& d) {
          using S = std::decay_t<decltype(d)>;
          MAMBA_CHECK(std::holds_alternative<S>(src.layers[i]), "LMState::copy_row: layer ", i,
                      " holds another mixer's state");
          d.copy_row(dst_b, std::get<S>(src.layers[i]), src_b);
        },
        layers[i]);
}

int64_t LMState::floats() const {
  int64_t n = 0;
  auto add = [&](const Tensor& t) {
    if (t.defined()) n += t.numel();
  };
  for (const auto& l : layers)
    std::visit(
        [&](const auto& s) {
          if constexpr (requires { s.conv_state; }) add(s.conv_state);
          if constexpr (requires { s.ssm_state; }) add(s.ssm_state);
          if constexpr (requires { s.k_cache; }) add(s.k_cache), add(s.v_cache);
          if constexpr (requires { s.ssm; }) add(s.ssm);
          if constexpr (requires { s.angle; }) add(s.angle);
          if constexpr (requires { s.k; }) add(s.k);
          if constexpr (requires { s.v; }) add(s.v);
        },
        l);
  return n;
}

void MambaLM::zero_grad() {
  for (auto& [name, p] : named_parameters())
    if (p->has_grad()) p->grad().zero();
}

void MambaLM::load_state_dict(const std::map<std::string, Tensor>& sd, const std::string& origin) {
  std::vector<std::string> names;
  for (const auto& kv : sd) names.push_back(kv.first);
  load_tensors(
      names, [&](const std::string& k) { return sd.at(k).shape(); },
      [&](const std::string& k, Weight& w) { w.assign(sd.at(k)); }, origin);
}

void MambaLM::load_tensors(const std::vector<std::string>& names,
                           const std::function<Shape(const std::string&)>& shape_of,
                           const std::function<void(const std::string&, Weight&)>& read,
                           const std::string& origin) {
  std::map<std::string, std::string> key;  // mamba_ssm name -> name in the source
  for (const auto& k : names) key[cfg_.source_format == "hf" ? hf_to_mamba_ssm_name(k) : k] = k;
  std::map<std::string, bool> used;
  for (auto& [name, p] : named_parameters()) {
    auto it = key.find(name);
    MAMBA_CHECK(it != key.end(), origin, ": missing tensor '", name, "'");
    const Shape expected = p->value.shape();
    const Shape got = shape_of(it->second);
    MAMBA_CHECK(got == expected, origin, ": tensor '", name, "' has shape ", shape_str(got),
                ", expected ", shape_str(expected));
    // One tensor at a time: a 16-bit model never holds the whole fp32 state dict.
    read(it->second, p->value);
    used[name] = true;
  }
  const Shape emb_shape{cfg_.padded_vocab(), cfg_.d_model};
  for (const auto& [k, src] : key) {
    if (used.count(k)) continue;
    if (k == "lm_head.weight" && cfg_.tie_embeddings) {
      // Stored twice by save_pretrained; must equal the embedding it is tied to.
      const Shape got = shape_of(src);
      MAMBA_CHECK(got == emb_shape, origin, ": lm_head.weight has shape ", shape_str(got),
                  ", expected ", shape_str(emb_shape), " (tied to the embedding)");
      continue;
    }
    throw Error(str(origin, ": unexpected tensor '", k, "' (not a parameter of this config)"));
  }
}

MambaLM MambaLM::load(const std::string& dir) { return load(dir, WeightDType::f32); }

MambaLM MambaLM::load(const std::string& dir, WeightDType dtype) {
  namespace fs = std::filesystem;
  if (fs::is_regular_file(dir)) return load_gguf(dir, dtype);
  MAMBA_CHECK(fs::is_directory(dir), "model folder '", dir, "' does not exist");
  ModelConfig cfg = ModelConfig::load((fs::path(dir) / "config.json").string());
  MambaLM lm(cfg, 0, dtype);
  std::string st = (fs::path(dir) / "model.safetensors").string();
  std::string bin = (fs::path(dir) / "pytorch_model.bin").string();
  if (os::exists(st)) {
    // Memory-mapped: each tensor is converted straight into its parameter (one copy), then its
    // pages of the file are dropped, so loading holds the model and at most one tensor of the
    // file (docs/RELIABILITY.md, "Inference without gradient buffers").
    auto f = SafetensorsFile::open(st);
    lm.load_tensors(
        f.names(), [&](const std::string& n) { return f.info(n).shape; },
        [&](const std::string& n, Weight& w) {
          f.read_into(n, w);
          f.release_pages(n);
        },
        st);
  } else if (os::exists(bin)) {
    lm.load_state_dict(load_torch_state_dict(bin), bin);
  } else {
    throw Error(
        str("model folder '", dir, "' has neither model.safetensors nor pytorch_model.bin"));
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
  if (cfg_.tie_embeddings && !hf)
    tensors.emplace_back("lm_head.weight", emb);              // as save_pretrained
  std::string cfg = hf ? cfg_.to_hf_json() : cfg_.to_json();  // validate before writing anything
  save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  os::write_file_atomic((fs::path(dir) / "config.json").string(), cfg.data(), cfg.size());
}

Tensor MambaLM::embed(std::span<const int32_t> ids, int64_t B, int64_t L) const {
  MAMBA_CHECK(B >= 1 && L >= 1 && static_cast<int64_t>(ids.size()) == B * L, "input ids: expected ",
              B, "x", L, " = ", B * L, " ids, got ", ids.size());
  const int64_t d = cfg_.d_model;
  Tensor h = ops::embedding_fwd(emb_->value, ids).reshape({B, L, d});
  trace::op("embedding", {{B, L}}, {{B, L, d}});
  return h;
}

Tensor MambaLM::head(const Tensor& hidden) const {
  const int64_t d = cfg_.d_model;
  return ops::linear(hidden.reshape({-1, d}), lm_head_->value);  // (M, V_pad)
}

Tensor MambaLM::backbone(std::span<const int32_t> ids, int64_t B, int64_t L, LMSaved* sv,
                         LMState* state) const {
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
    hidden = blocks_[i].forward(hidden, residual, sv ? &sv->blocks[i] : nullptr,
                                state ? &state->layers[i] : nullptr);
  }
  Tensor out = final_norm(hidden, residual);
  if (sv) sv->residual_final = residual, sv->hidden_final = out;
  return out;  // (B, L, d_model)
}

Tensor MambaLM::final_norm(const Tensor& hidden, Tensor& residual) const {
  Tensor out = ops::add_rms_norm_fwd(hidden, residual, norm_f_->value.f32(),
                                     static_cast<float>(cfg_.norm_epsilon));
  trace::op("add+norm_f", {hidden.shape()}, {out.shape()});
  return out;
}

Tensor MambaLM::last_logits(const Tensor& out, int64_t B, int64_t L) const {
  const int64_t d = cfg_.d_model;
  const Tensor last = out.reshape({B, L * d}).cols((L - 1) * d, d);  // (B, d): a strided view
  Tensor logits = head(last);
  trace::op("lm_head", {last.shape()}, {logits.shape()});
  return logits;  // (B, V_pad)
}

double MambaLM::activation_bytes(int64_t B, int64_t L, bool all_logits, bool saved) const {
  const double BL = static_cast<double>(B) * static_cast<double>(L);
  const double d = static_cast<double>(cfg_.d_model), V = static_cast<double>(cfg_.padded_vocab());
  double widest = 0, all_layers = 0;
  for (int64_t i = 0; i < cfg_.n_layer; ++i) {
    const double w = std::visit(
        [](const auto& c) -> double {  // rows of the layer's input projection
          using C = std::decay_t<decltype(c)>;
          if constexpr (std::is_same_v<C, Mamba1Config>) {
            return 2.0 * static_cast<double>(c.d_inner());
          } else if constexpr (std::is_same_v<C, MHAConfig>) {
            return static_cast<double>(c.qkv_dim()) + static_cast<double>(c.mlp());
          } else {
            return static_cast<double>(c.d_in_proj());  // Mamba-2, Mamba-3
          }
        },
        cfg_.layer_mixer(i));
    widest = std::max(widest, w);
    all_layers += w;
  }
  const double floats = BL * (3 * d + widest) + (all_logits ? BL : static_cast<double>(B)) * V +
                        (saved ? BL * all_layers : 0.0);
  return floats * 4.0;
}

namespace {
// Refuses a batch whose activations cannot fit (small ones are not checked: reading the
// available memory costs a system call or two).
void check_activation_memory(double bytes, int64_t B, int64_t L) {
  if (bytes < 64.0 * 1048576.0) return;
  os::check_memory(bytes >= 1.8e19 ? UINT64_MAX : static_cast<uint64_t>(bytes),
                   str("a batch of ", B, " x ", L, " tokens (activations, at least)"));
}
}  // namespace

Tensor MambaLM::forward(std::span<const int32_t> ids, int64_t B, int64_t L, LMSaved* saved,
                        LMState* state) const {
  MAMBA_CHECK(!saved || weight_dtype() == WeightDType::f32, "MambaLM::forward: weights are ",
              weight_dtype_name(weight_dtype()), ": inference only; load in f32 to train");
  check_activation_memory(activation_bytes(B, L, true, saved != nullptr), B, L);
  Tensor out = backbone(ids, B, L, saved, state);
  Tensor logits = head(out).reshape({B, L, vocab()});
  trace::op("lm_head", {out.shape()}, {logits.shape()});
  return logits;
}

Tensor MambaLM::forward_last(std::span<const int32_t> ids, int64_t B, int64_t L,
                             LMState* state) const {
  check_activation_memory(activation_bytes(B, L, false, false), B, L);
  return last_logits(backbone(ids, B, L, nullptr, state), B, L);
}

Tensor MambaLM::prefill(std::span<const int32_t> ids, int64_t B, int64_t L, LMState& state,
                        int64_t chunk, const std::function<void()>& between_chunks) const {
  MAMBA_CHECK(B >= 1 && L >= 1 && static_cast<int64_t>(ids.size()) == B * L,
              "MambaLM::prefill: expected ", B, "x", L, " = ", B * L, " ids, got ", ids.size());
  MAMBA_CHECK(chunk >= 0, "MambaLM::prefill: chunk must be >= 0 (0 = one piece), got ", chunk);
  MAMBA_CHECK(state.batch == B, "MambaLM::prefill: state is for batch ", state.batch,
              ", got B = ", B);
  MAMBA_CHECK(state.layers.size() == blocks_.size(), "MambaLM::prefill: state has ",
              state.layers.size(), " layers, the model ", blocks_.size());
  for (size_t i = 0; i < blocks_.size(); ++i)  // every kind before anything is advanced
    MAMBA_CHECK(state.layers[i].index() == blocks_[i].mixer().index(), "MambaLM::prefill: layer ",
                i, " is a ", blocks_[i].mixer_name(), " layer but its state is another mixer's");
  const int64_t Q = chunk > 0 ? std::min(chunk, L) : L;
  check_activation_memory(activation_bytes(B, Q, false, false), B, Q);
  std::vector<int32_t> part;  // the chunk's ids (B, n) when B > 1
  Tensor logits;
  for (int64_t c0 = 0; c0 < L; c0 += Q) {
    const int64_t n = std::min(Q, L - c0);
    std::span<const int32_t> cids = ids.subspan(static_cast<size_t>(c0), static_cast<size_t>(n));
    if (B > 1) {
      part.resize(static_cast<size_t>(B * n));
      for (int64_t b = 0; b < B; ++b)
        std::copy_n(ids.begin() + b * L + c0, n, part.begin() + b * n);
      cids = part;
    }
    Tensor hidden = embed(cids, B, n);
    Tensor residual;
    for (size_t i = 0; i < blocks_.size(); ++i) {
      trace::Scope scope(str("layers.", i, "."));
      hidden = blocks_[i].prefill(hidden, residual, state.layers[i]);
    }
    if (c0 + n < L) {  // the head only for the last position of the last chunk
      if (between_chunks) between_chunks();
      continue;
    }
    logits = last_logits(final_norm(hidden, residual), B, n);
  }
  return logits;  // (B, V_pad)
}

void MambaLM::backward(const LMSaved& sv, const Tensor& dlogits,
                       const std::function<void(int64_t)>& layer_done) {
  MAMBA_CHECK(!sv.empty(), "MambaLM::backward: no saved activations (call forward with saved)");
  MAMBA_CHECK(sv.blocks.size() == blocks_.size(),
              "MambaLM::backward: the saved activations are for ", sv.blocks.size(),
              " layers, the model has ", blocks_.size());
  MAMBA_CHECK(weight_dtype() == WeightDType::f32, "MambaLM::backward: weights are ",
              weight_dtype_name(weight_dtype()), ": inference only; load in f32 to train");
  const int64_t B = sv.B, L = sv.L, d = cfg_.d_model, V = vocab(), M = B * L;
  check_shape(dlogits, "MambaLM::backward: dlogits", {B, L, V});
  const float eps = static_cast<float>(cfg_.norm_epsilon);
  // Head: logits = hidden_final @ W^T (W the embedding when tied: its gradient gets both parts).
  Tensor dhid =
      ops::linear_bwd(sv.hidden_final, lm_head_->value, dlogits, &lm_head_->grad(), nullptr);
  // norm_f.
  auto gf = ops::rms_norm_bwd(sv.residual_final, norm_f_->value.f32(), eps, dhid);
  ops::add_into(norm_f_->grad(), gf.dweight);
  Tensor dres = gf.dx;  // gradient w.r.t. the residual stream; also w.r.t. the last block's output
  for (int64_t i = cfg_.n_layer - 1; i >= 0; --i) {
    blocks_[i].backward(sv.blocks[i], dres);
    if (layer_done) layer_done(i);
  }
  // Embedding: scatter-add the residual gradient into the rows of the ids.
  ops::embedding_bwd(emb_->grad(), sv.ids, dres.reshape({M, d}));
}

LMState MambaLM::new_state(int64_t batch) const {
  LMState s;
  s.batch = batch;
  for (const Block& b : blocks_) s.layers.push_back(b.new_state(batch));
  return s;
}

Tensor MambaLM::step(std::span<const int32_t> ids, LMState& state) const {
  const int64_t B = static_cast<int64_t>(ids.size());
  MAMBA_CHECK(state.batch == B, "MambaLM::step: state is for batch ", state.batch, ", got ", B,
              " ids");
  MAMBA_CHECK(state.layers.size() == blocks_.size(), "MambaLM::step: state has ",
              state.layers.size(), " layers, the model ", blocks_.size());
  // One team of threads for the whole token: its ~10 parallel_for calls per layer then cost a
  // hand-off each instead of an OpenMP parallel region each (mamba/parallel.h, with_team).
  Tensor logits;
  with_team([&] {
    Tensor hidden = embed(ids, B, 1).reshape({B, cfg_.d_model});
    Tensor residual;
    const bool tr = trace::enabled();
    for (size_t i = 0; i < blocks_.size(); ++i) {
      std::optional<trace::Scope> scope;
      if (tr) scope.emplace(str("layers.", i, "."));
      hidden = blocks_[i].step(hidden, residual, state.layers[i]);
    }
    Tensor out = ops::add_rms_norm_fwd(hidden, residual, norm_f_->value.f32(),
                                       static_cast<float>(cfg_.norm_epsilon));
    if (tr) trace::op("add+norm_f", {hidden.shape()}, {out.shape()});
    logits = head(out);
    if (tr) trace::op("lm_head", {out.shape()}, {logits.shape()});
  });
  return logits;
}

}  // namespace mamba
