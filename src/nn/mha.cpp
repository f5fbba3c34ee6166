// mamba_ssm's MHA: forward (with saved activations and the prefill KV cache), backward, step over
// the KV cache. See nn/mha.h; the kernels are ops/attention.h's.
#include "mamba/nn/mha.h"

#include <algorithm>
#include <cmath>

#include "mamba/rng.h"
#include "mamba/trace.h"
#include "ops/act.h"
#include "ops/attention.h"
#include "ops/conv1d.h"
#include "ops/elementwise.h"
#include "ops/linear.h"

namespace mamba {

// ---- config -------------------------------------------------------------------------------------

void MHAConfig::validate() const {
  MAMBA_CHECK(d_model >= 1, "MHAConfig: d_model (embed_dim) must be >= 1, got ", d_model);
  MAMBA_CHECK(num_heads >= 1, "MHAConfig: num_heads must be >= 1, got ", num_heads);
  MAMBA_CHECK(num_heads_kv >= 0 && num_heads_kv <= num_heads,
              "MHAConfig: num_heads_kv must be in [0 (= num_heads), num_heads = ", num_heads,
              "], got ", num_heads_kv);
  MAMBA_CHECK(num_heads % heads_kv() == 0, "MHAConfig: num_heads_kv = ", heads_kv(),
              " does not divide num_heads = ", num_heads);
  MAMBA_CHECK(head_dim >= 0, "MHAConfig: head_dim must be >= 1 or 0 (None), got ", head_dim);
  MAMBA_CHECK(head_dim > 0 || d_model % num_heads == 0, "MHAConfig: num_heads = ", num_heads,
              " does not divide d_model = ", d_model, " (and head_dim is not given)");
  MAMBA_CHECK(mlp_dim >= 0, "MHAConfig: mlp_dim must be >= 0, got ", mlp_dim);
  MAMBA_CHECK(d_conv >= 0, "MHAConfig: d_conv must be >= 0, got ", d_conv);
  MAMBA_CHECK(rotary_emb_dim >= 0 && rotary_emb_dim % 2 == 0 && rotary_emb_dim <= head(),
              "MHAConfig: rotary_emb_dim must be even and in [0, head_dim = ", head(), "], got ",
              rotary_emb_dim);
  MAMBA_CHECK(std::isfinite(rotary_emb_base) && rotary_emb_base > 0,
              "MHAConfig: rotary_emb_base must be > 0, got ", rotary_emb_base);
  MAMBA_CHECK(std::isfinite(softmax_scale) && softmax_scale >= 0,
              "MHAConfig: softmax_scale must be > 0 or 0 (None), got ", softmax_scale);
}

// ---- construction -------------------------------------------------------------------------------

MHA::MHA(const Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  H_ = cfg_.num_heads, KV_ = cfg_.heads_kv(), P_ = cfg_.head(), qkv_ = cfg_.qkv_dim(),
  mlp_ = cfg_.mlp();
  const int64_t dm = cfg_.d_model, K = cfg_.d_conv;
  // mamba_ssm's state_dict order.
  in_w_ = &params_.add_matrix("in_proj.weight", {qkv_ + mlp_, dm});
  if (cfg_.qkv_proj_bias) in_b_ = &params_.add("in_proj.bias", {qkv_ + mlp_}, true);
  if (K > 0) {
    conv_w_ = &params_.add("conv1d.weight", {qkv_, 1, K});
    conv_b_ = &params_.add("conv1d.bias", {qkv_}, true);
  }
  out_w_ = &params_.add_matrix("out_proj.weight", {dm, H_ * P_ + mlp_ / 2});
  if (cfg_.out_proj_bias) out_b_ = &params_.add("out_proj.bias", {dm}, true);
  Rng rng(seed);
  auto uni = [&](Param* p, int64_t fan_in) {
    const double b = 1.0 / std::sqrt(static_cast<double>(fan_in));
    rng.fill_uniform(p->value.f32(), -b, b);
  };
  uni(in_w_, dm);
  if (in_b_) uni(in_b_, dm);
  if (conv_w_) uni(conv_w_, K), uni(conv_b_, K);
  uni(out_w_, H_ * P_ + mlp_ / 2);
  if (out_b_) uni(out_b_, H_ * P_ + mlp_ / 2);
}

namespace {
ops::RotaryOpts rotary_opts(const MHAConfig& c) {
  return {c.rotary_emb_dim, c.rotary_emb_base, c.rotary_emb_interleaved};
}
ops::AttnOpts attn_opts(const MHAConfig& c) {
  return {c.causal, static_cast<float>(c.softmax_scale)};
}
}  // namespace

// ---- state --------------------------------------------------------------------------------------

void MHAState::reserve(int64_t need) {
  const int64_t cap = capacity(), B = static_cast<int64_t>(len.size());
  if (need <= cap) return;
  const int64_t ncap = std::max({need, 2 * cap, int64_t{16}});
  Tensor k = Tensor::zeros({B, ncap, kv_heads, head_dim}), v = Tensor::zeros(k.shape());
  for (int64_t b = 0; b < B && cap > 0; ++b) {
    k.select(b).narrow(0, cap).copy_from(k_cache.select(b));
    v.select(b).narrow(0, cap).copy_from(v_cache.select(b));
  }
  k_cache = k, v_cache = v;
}

void MHAState::copy_row(int64_t dst_b, const MHAState& src, int64_t src_b) {
  MAMBA_CHECK(dst_b >= 0 && dst_b < static_cast<int64_t>(len.size()) && src_b >= 0 &&
                  src_b < static_cast<int64_t>(src.len.size()),
              "MHAState::copy_row: row out of range");
  MAMBA_CHECK(src.kv_heads == kv_heads && src.head_dim == head_dim,
              "MHAState::copy_row: states of different layers");
  const int64_t n = src.len[src_b];
  reserve(n);
  if (n > 0) {
    k_cache.select(dst_b).narrow(0, n).copy_from(src.k_cache.select(src_b).narrow(0, n));
    v_cache.select(dst_b).narrow(0, n).copy_from(src.v_cache.select(src_b).narrow(0, n));
  }
  len[dst_b] = n;
  if (conv_state.defined()) conv_state.select(dst_b).copy_from(src.conv_state.select(src_b));
}

MHAState MHA::new_state(int64_t batch) const {
  MAMBA_CHECK(batch >= 1, "MHA::new_state: batch must be >= 1, got ", batch);
  MHAState s;
  s.len.assign(static_cast<size_t>(batch), 0);
  s.kv_heads = KV_, s.head_dim = P_;
  if (cfg_.d_conv > 0) s.conv_state = Tensor::zeros({batch, qkv_, cfg_.d_conv});
  return s;
}

void MHA::check_state(const State& s, int64_t batch) const {
  MAMBA_CHECK(static_cast<int64_t>(s.len.size()) == batch && s.kv_heads == KV_ && s.head_dim == P_,
              "MHA state: expected batch ", batch, " with ", KV_, " kv heads of dim ", P_, ", got ",
              s.len.size(), " rows, ", s.kv_heads, " x ", s.head_dim);
  if (cfg_.d_conv > 0)
    check_shape(s.conv_state, "MHA state: conv_state", {batch, qkv_, cfg_.d_conv});
}

// ---- forward ------------------------------------------------------------------------------------

void MHA::check_input(const Tensor& hidden, const char* what) const {
  const int64_t dm = cfg_.d_model;
  check_defined(hidden, str(what, ": hidden").c_str());
  MAMBA_CHECK(hidden.ndim() == 3, what, ": hidden must be (B, L, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, str(what, ": hidden").c_str(), {-1, -1, dm});
  MAMBA_CHECK(hidden.dim(0) >= 1 && hidden.dim(1) >= 1, what,
              ": hidden needs B >= 1 and L >= 1, got ", hidden.shape_str());
}

Tensor MHA::forward(const Tensor& hidden, Saved* saved, State* state) const {
  check_input(hidden, "MHA::forward");
  if (saved) params_.check_f32("MHA::forward");
  return run(hidden, saved, nullptr, state);
}

Tensor MHA::prefill(const Tensor& hidden, State& state) const {
  check_input(hidden, "MHA::prefill");
  check_state(state, hidden.dim(0));
  const bool empty =
      std::all_of(state.len.begin(), state.len.end(), [](int64_t n) { return n == 0; });
  MAMBA_CHECK(cfg_.causal || empty,
              "MHA::prefill: a non-causal attention layer cannot continue from a cached state (its "
              "forward lets every token see the later ones); prefill it in one piece");
  return run(hidden, nullptr, &state, nullptr);
}

Tensor MHA::run(const Tensor& hidden, Saved* saved, State* cont, State* state) const {
  const int64_t H = H_, KV = KV_, P = P_, HP = H * P, KVP = KV * P;
  const int64_t B = hidden.dim(0), L = hidden.dim(1);
  const bool tr = trace::enabled();
  const Tensor& in_b = optional_f32(in_b_);
  auto bias = [&](int64_t r0, int64_t n) { return in_b.defined() ? in_b.narrow(r0, n) : Tensor(); };

  Tensor qkv = Tensor::empty({B, L, qkv_});  // (B, L, qkv_dim)
  ops::linear_into(hidden, in_w_->value.rows(0, qkv_), bias(0, qkv_), qkv);
  Tensor up, gate;  // (B, L, mlp/2)
  if (mlp_ > 0) {
    up = Tensor::empty({B, L, mlp_ / 2}), gate = Tensor::empty({B, L, mlp_ / 2});
    ops::linear_into(hidden, in_w_->value.rows(qkv_, mlp_ / 2), bias(qkv_, mlp_ / 2), up);
    ops::linear_into(hidden, in_w_->value.rows(qkv_ + mlp_ / 2, mlp_ / 2),
                     bias(qkv_ + mlp_ / 2, mlp_ / 2), gate);
  }
  if (tr) trace::op("in_proj", {hidden.shape()}, {{B, L, qkv_ + mlp_}});
  Tensor qkvc = qkv;
  if (cfg_.d_conv > 0) {
    qkvc = ops::causal_conv1d_fwd(qkv, f32(conv_w_).reshape({qkv_, cfg_.d_conv}), f32(conv_b_),
                                  false, false, cont ? cont->conv_state : Tensor());
    if (tr) trace::op("conv1d", {qkv.shape()}, {qkvc.shape()});
    if (cont) ops::causal_conv1d_advance_state(cont->conv_state, qkv);
  }
  Tensor q = qkvc.cols(0, HP).contiguous().reshape({B, L, H, P});
  Tensor k = qkvc.cols(HP, KVP).contiguous().reshape({B, L, KV, P});
  Tensor v = qkvc.cols(HP + KVP, KVP).contiguous().reshape({B, L, KV, P});
  const int64_t zero = 0;
  // Positions: row b's tokens follow the len[b] it has cached (0 for a fresh forward).
  const std::span<const int64_t> pos0 =
      cont ? std::span<const int64_t>(cont->len) : std::span<const int64_t>(&zero, 1);
  if (cfg_.rotary_emb_dim > 0) {
    ops::rotary_inplace(q, pos0, rotary_opts(cfg_));
    ops::rotary_inplace(k, pos0, rotary_opts(cfg_));
    if (tr) trace::op("rotary", {q.shape(), k.shape()}, {q.shape(), k.shape()});
  }
  Tensor lse, ctx;
  if (!cont) {
    ctx = ops::attention_fwd(q, k, v, attn_opts(cfg_), saved ? &lse : nullptr);
    if (tr) trace::op("attention", {q.shape(), k.shape(), v.shape()}, {ctx.shape()});
  } else {
    // Append the chunk's keys / values to each row's cache, then attend each row's queries over
    // its len[b] + L keys (the causal mask aligned to the bottom-right: query t sees the cached
    // keys and the chunk's keys up to t). Rows may hold different lengths: one call per row.
    cont->reserve(*std::max_element(cont->len.begin(), cont->len.end()) + L);
    ctx = Tensor::empty({B, L, H, P});
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n0 = cont->len[b], n = n0 + L;
      ops::copy_into(cont->k_cache.select(b).narrow(n0, L), k.select(b));
      ops::copy_into(cont->v_cache.select(b).narrow(n0, L), v.select(b));
      Tensor kb = cont->k_cache.select(b).narrow(0, n).reshape({1, n, KV, P});
      Tensor vb = cont->v_cache.select(b).narrow(0, n).reshape({1, n, KV, P});
      ops::copy_into(ctx.select(b),
                     ops::attention_fwd(q.select(b).reshape({1, L, H, P}), kb, vb, attn_opts(cfg_))
                         .reshape({L, H, P}));
      cont->len[b] = n;
    }
    if (tr)
      trace::op("attention (over the cache)", {q.shape(), cont->k_cache.shape()}, {ctx.shape()});
  }

  Tensor cat = ctx.reshape({B, L, HP});  // (B, L, H*P [+ mlp/2])
  if (mlp_ > 0) {
    cat = Tensor::empty({B, L, HP + mlp_ / 2});
    ops::copy_into(cat.cols(0, HP), ctx.reshape({B, L, HP}));
    ops::copy_into(cat.cols(HP, mlp_ / 2), ops::mul(up, ops::silu(gate)));
    if (tr) trace::op("mlp_gate", {up.shape(), gate.shape()}, {up.shape()});
  }
  Tensor out = ops::linear(cat, out_w_->value, optional_f32(out_b_));  // (B, L, d_model)
  if (tr) trace::op("out_proj", {cat.shape()}, {out.shape()});

  if (state) {
    *state = new_state(B);
    state->k_cache = k, state->v_cache = v;
    state->len.assign(static_cast<size_t>(B), L);
    if (cfg_.d_conv > 0) ops::causal_conv1d_final_state(qkv, state->conv_state);
  }
  if (saved) {
    saved->hidden = hidden;
    saved->qkv_pre = cfg_.d_conv > 0 ? qkv : Tensor();
    saved->q = q, saved->k = k, saved->v = v, saved->ctx = ctx, saved->lse = lse;
    saved->up = up, saved->gate = gate, saved->cat = cat;
  }
  return out;
}

// ---- backward -----------------------------------------------------------------------------------

Tensor MHA::backward(const Saved& s, const Tensor& dy) {
  const int64_t dm = cfg_.d_model, H = H_, KV = KV_, P = P_, HP = H * P, KVP = KV * P;
  params_.check_f32("MHA::backward");
  check_defined(s.hidden, "MHA::backward: saved.hidden (forward called without saved?)");
  const int64_t B = s.hidden.dim(0), L = s.hidden.dim(1);
  check_shape(dy, "MHA::backward: dy", {B, L, dm});
  check_shape(s.q, "MHA::backward: saved.q", {B, L, H, P});

  Tensor dcat = ops::linear_bwd(s.cat, out_w_->value, dy, &out_w_->grad(), optional_grad(out_b_));
  Tensor dctx = dcat.cols(0, HP).contiguous().reshape({B, L, H, P});
  ops::AttnGrads ag = ops::attention_bwd(s.q, s.k, s.v, s.ctx, s.lse, dctx, attn_opts(cfg_));
  const int64_t zero = 0;
  if (cfg_.rotary_emb_dim > 0) {  // the rotation's transpose is its inverse
    ops::rotary_inplace(ag.dq, {&zero, 1}, rotary_opts(cfg_), true);
    ops::rotary_inplace(ag.dk, {&zero, 1}, rotary_opts(cfg_), true);
  }
  Tensor dqkv = Tensor::empty({B, L, qkv_});
  ops::copy_into(dqkv.cols(0, HP), ag.dq.reshape({B, L, HP}));
  ops::copy_into(dqkv.cols(HP, KVP), ag.dk.reshape({B, L, KVP}));
  ops::copy_into(dqkv.cols(HP + KVP, KVP), ag.dv.reshape({B, L, KVP}));
  if (cfg_.d_conv > 0) {
    ops::Conv1dGrads cg = ops::causal_conv1d_bwd(
        s.qkv_pre, f32(conv_w_).reshape({qkv_, cfg_.d_conv}), f32(conv_b_), false, dqkv);
    ops::add_into(conv_w_->grad(), cg.dweight.reshape(conv_w_->grad().shape()));
    ops::add_into(conv_b_->grad(), cg.dbias);
    dqkv = cg.dx;
  }
  Tensor dhidden = Tensor::empty({B, L, dm});
  auto rows = [&](int64_t r0, int64_t n, const Tensor& d, bool acc) {
    Tensor gW = in_w_->grad().narrow(r0, n);
    Tensor gb = in_b_ ? in_b_->grad().narrow(r0, n) : Tensor();
    ops::linear_bwd_into(s.hidden, in_w_->value.rows(r0, n), d, dhidden, acc, &gW,
                         in_b_ ? &gb : nullptr);
  };
  rows(0, qkv_, dqkv, false);
  if (mlp_ > 0) {
    const int64_t M2 = mlp_ / 2;
    Tensor dm2 = dcat.cols(HP, M2).contiguous();  // d(up * silu(gate))
    rows(qkv_, M2, ops::mul(dm2, ops::silu(s.gate)), true);
    rows(qkv_ + M2, M2, ops::silu_bwd(s.gate, ops::mul(dm2, s.up)), true);
  }
  return dhidden;
}

// ---- step ---------------------------------------------------------------------------------------

Tensor MHA::step(const Tensor& hidden, State& state) const {
  const int64_t dm = cfg_.d_model, H = H_, KV = KV_, P = P_, HP = H * P, KVP = KV * P;
  check_defined(hidden, "MHA::step: x");
  MAMBA_CHECK(hidden.ndim() == 2, "MHA::step: x must be (B, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, "MHA::step: x", {-1, dm});
  const int64_t B = hidden.dim(0);
  check_state(state, B);
  const bool tr = trace::enabled();
  const Tensor& in_b = optional_f32(in_b_);
  auto bias = [&](int64_t r0, int64_t n) { return in_b.defined() ? in_b.narrow(r0, n) : Tensor(); };

  Tensor qkv = Tensor::empty({B, qkv_});
  ops::linear_into(hidden, in_w_->value.rows(0, qkv_), bias(0, qkv_), qkv);
  Tensor up, gate;
  if (mlp_ > 0) {
    up = Tensor::empty({B, mlp_ / 2}), gate = Tensor::empty({B, mlp_ / 2});
    ops::linear_into(hidden, in_w_->value.rows(qkv_, mlp_ / 2), bias(qkv_, mlp_ / 2), up);
    ops::linear_into(hidden, in_w_->value.rows(qkv_ + mlp_ / 2, mlp_ / 2),
                     bias(qkv_ + mlp_ / 2, mlp_ / 2), gate);
  }
  if (tr) trace::op("in_proj", {hidden.shape()}, {{B, qkv_ + mlp_}});
  Tensor qkvc = qkv;
  if (cfg_.d_conv > 0) {
    qkvc = ops::causal_conv1d_update(
        state.conv_state, qkv, f32(conv_w_).reshape({qkv_, cfg_.d_conv}), f32(conv_b_), false);
    if (tr) trace::op("conv1d_update", {qkv.shape(), state.conv_state.shape()}, {qkvc.shape()});
  }
  Tensor q = qkvc.cols(0, HP).contiguous().reshape({B, 1, H, P});
  Tensor k = qkvc.cols(HP, KVP).contiguous().reshape({B, 1, KV, P});
  Tensor v = qkvc.cols(HP + KVP, KVP).contiguous().reshape({B, 1, KV, P});
  if (cfg_.rotary_emb_dim > 0) {
    ops::rotary_inplace(q, state.len, rotary_opts(cfg_));
    ops::rotary_inplace(k, state.len, rotary_opts(cfg_));
  }
  state.reserve(*std::max_element(state.len.begin(), state.len.end()) + 1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t t = state.len[b]++;
    ops::copy_into(state.k_cache.select(b).select(t), k.select(b).select(0));
    ops::copy_into(state.v_cache.select(b).select(t), v.select(b).select(0));
  }
  Tensor ctx = ops::attention_decode(q.reshape({B, H, P}), state.k_cache, state.v_cache, state.len,
                                     attn_opts(cfg_));
  if (tr) trace::op("attention_decode", {q.shape(), state.k_cache.shape()}, {ctx.shape()});
  Tensor cat = ctx.reshape({B, HP});
  if (mlp_ > 0) {
    cat = Tensor::empty({B, HP + mlp_ / 2});
    ops::copy_into(cat.cols(0, HP), ctx.reshape({B, HP}));
    ops::copy_into(cat.cols(HP, mlp_ / 2), ops::mul(up, ops::silu(gate)));
  }
  Tensor out = ops::linear(cat, out_w_->value, optional_f32(out_b_));  // (B, d_model)
  if (tr) trace::op("out_proj", {cat.shape()}, {out.shape()});
  return out;
}

}  // namespace mamba
