// The spatio-temporal block (nn/st_block.h): spatial attention over nodes, a temporal mixer per
// node, gated fusion, output projection and residual; forward, backward, streaming step.
#include "mamba/nn/st_block.h"

#include <cmath>

#include "mamba/rng.h"
#include "ops/attention.h"
#include "ops/elementwise.h"
#include "ops/gated_fusion.h"
#include "ops/linear.h"

namespace mamba {

namespace {

template <size_t I = 0>
Mixer make_temporal(const MixerConfig& c, uint64_t seed) {
  if constexpr (I + 1 < Mixers::size) {
    if (c.index() != I) return make_temporal<I + 1>(c, seed);
  }
  return Mixer(std::in_place_index<I>, std::get<I>(c), seed);
}

MixerConfig with_d_model(MixerConfig c, int64_t d) {
  std::visit([&](auto& m) { m.d_model = d; }, c);
  return c;
}

}  // namespace

void STBlockConfig::validate() const {
  MAMBA_CHECK(num_nodes >= 1, "STBlockConfig: num_nodes must be >= 1, got ", num_nodes);
  MAMBA_CHECK(d_model >= 1, "STBlockConfig: d_model must be >= 1, got ", d_model);
  MAMBA_CHECK(num_heads >= 1 && d_model % num_heads == 0, "STBlockConfig: num_heads = ", num_heads,
              " must be >= 1 and divide d_model = ", d_model);
  if (const MHAConfig* a = std::get_if<MHAConfig>(&temporal))
    MAMBA_CHECK(a->causal, "STBlockConfig: a temporal MHA must be causal (temporal.causal)");
}

STBlock::STBlock(const Config& cfg, uint64_t seed)
    : cfg_(cfg), temporal_(make_temporal(with_d_model(cfg.temporal, cfg.d_model), seed ^ 0x5151)) {
  cfg_.validate();
  cfg_.temporal = with_d_model(cfg_.temporal, cfg_.d_model);
  const int64_t C = cfg_.d_model, N = cfg_.num_nodes;
  emb_ = &params_.add("node_emb", {N, C}, true);
  wq_ = &params_.add_matrix("spatial.q_proj.weight", {C, C});
  wk_ = &params_.add_matrix("spatial.k_proj.weight", {C, C});
  wv_ = &params_.add_matrix("spatial.v_proj.weight", {C, C});
  wo_ = &params_.add_matrix("spatial.out_proj.weight", {C, C});
  ws_ = &params_.add_matrix("fusion.w_s.weight", {C, C});
  wt_ = &params_.add_matrix("fusion.w_t.weight", {C, C});
  bz_ = &params_.add("fusion.w_t.bias", {C}, true);
  wh_ = &params_.add_matrix("out_proj.weight", {C, C});
  bh_ = &params_.add("out_proj.bias", {C}, true);
  Rng rng(seed);
  rng.fill_normal(emb_->value.f32(), 0, 0.1);
  const double b = 1.0 / std::sqrt(static_cast<double>(C));
  for (Param* p : {wq_, wk_, wv_, wo_, ws_, wt_, bz_, wh_, bh_})
    rng.fill_uniform(p->value.f32(), -b, b);
}

ParamList& STBlock::temporal_params() {
  return std::visit([](auto& m) -> ParamList& { return m.params(); }, temporal_);
}
const ParamList& STBlock::temporal_params() const {
  return std::visit([](const auto& m) -> const ParamList& { return m.params(); }, temporal_);
}

std::vector<std::pair<std::string, Param*>> STBlock::named_parameters() {
  std::vector<std::pair<std::string, Param*>> out;
  for (auto& p : params_.all()) out.emplace_back(p.name, &p);
  for (auto& p : temporal_params().all()) out.emplace_back("temporal." + p.name, &p);
  return out;
}

// x: (M, N, C) -> (M, N, C)
Tensor STBlock::spatial(const Tensor& x, Saved* s) const {
  const int64_t M = x.dim(0), N = x.dim(1), C = x.dim(2), H = cfg_.num_heads, P = C / H;
  Tensor xe = ops::add_broadcast(x, emb_->value.f32());
  Tensor q = ops::linear(xe, wq_->value).reshape({M, N, H, P});
  Tensor k = ops::linear(xe, wk_->value).reshape({M, N, H, P});
  Tensor v = ops::linear(x, wv_->value).reshape({M, N, H, P});
  Tensor lse;
  Tensor ctx = ops::attention_fwd(q, k, v, {false, 0}, s ? &lse : nullptr);
  Tensor hs = ops::linear(ctx.reshape({M, N, C}), wo_->value);
  if (s) s->xe = xe, s->q = q, s->k = k, s->v = v, s->ctx = ctx, s->lse = lse;
  return hs;
}

// Fusion, output projection and residual on any leading shape (..., C).
Tensor STBlock::fuse_out(const Tensor& x, const Tensor& hs, const Tensor& ht, Saved* s) const {
  Tensor pre = ops::linear(hs, ws_->value);
  ops::linear_into(ht, wt_->value, bz_->value.f32(), pre, true);
  ops::FusionOut fo = ops::gated_fusion_fwd(pre, hs, ht);
  Tensor y = ops::linear(fo.h, wh_->value, bh_->value.f32());
  ops::add_into(y, x);
  if (s) s->hs = hs, s->ht = ht, s->z = fo.z, s->h = fo.h;
  return y;
}

Tensor STBlock::forward(const Tensor& x, Saved* saved, State* state) const {
  const int64_t N = cfg_.num_nodes, C = cfg_.d_model;
  check_defined(x, "STBlock::forward: x");
  MAMBA_CHECK(x.ndim() == 4, "STBlock::forward: x must be (B, T, N=", N, ", C=", C, "), got ",
              x.shape_str());
  check_shape(x, "STBlock::forward: x", {-1, -1, N, C});
  const int64_t B = x.dim(0), T = x.dim(1);
  MAMBA_CHECK(B >= 1 && T >= 1, "STBlock::forward: x needs B >= 1 and T >= 1, got ", x.shape_str());
  if (saved) saved->x = x;
  Tensor hs = spatial(x.reshape({B * T, N, C}), saved).reshape({B, T, N, C});
  Tensor xt = ops::swap_dims12(x).reshape({B * N, T, C});  // node-major: (B*N, T, C)
  Tensor ht_t = std::visit(
      [&](const auto& m) {
        using M = std::decay_t<decltype(m)>;
        typename M::Saved* ms =
            saved ? &saved->temporal.template emplace<typename M::Saved>() : nullptr;
        typename M::State* st =
            state ? &state->temporal.template emplace<typename M::State>() : nullptr;
        return m.forward(xt, ms, st);
      },
      temporal_);
  if (state) state->batch = B;
  Tensor ht = ops::swap_dims12(ht_t.reshape({B, N, T, C}));  // (B, T, N, C)
  return fuse_out(x, hs, ht, saved);
}

Tensor STBlock::backward(const Saved& s, const Tensor& dy) {
  params_.check_f32("STBlock::backward");
  check_defined(s.x, "STBlock::backward: saved.x (forward called without saved?)");
  const int64_t B = s.x.dim(0), T = s.x.dim(1), N = cfg_.num_nodes, C = cfg_.d_model,
                H = cfg_.num_heads, M = B * T;
  check_shape(dy, "STBlock::backward: dy", s.x.shape());
  Tensor dx = dy.clone();  // the residual
  Tensor dh = ops::linear_bwd(s.h, wh_->value, dy, &wh_->grad(), &bh_->grad());
  ops::FusionGrads fg = ops::gated_fusion_bwd(s.z, s.hs, s.ht, dh);
  ops::linear_bwd_into(s.hs, ws_->value, fg.dpre, fg.dhs, true, &ws_->grad(), nullptr);
  ops::linear_bwd_into(s.ht, wt_->value, fg.dpre, fg.dht, true, &wt_->grad(), &bz_->grad());
  // temporal branch
  Tensor dht_t = ops::swap_dims12(fg.dht).reshape({B * N, T, C});
  Tensor dxt = std::visit(
      [&](auto& m) {
        using Sv = typename std::decay_t<decltype(m)>::Saved;
        const Sv* ms = std::get_if<Sv>(&s.temporal);
        MAMBA_CHECK(ms != nullptr, "STBlock::backward: saved activations of another mixer");
        return m.backward(*ms, dht_t);
      },
      temporal_);
  ops::add_into(dx, ops::swap_dims12(dxt.reshape({B, N, T, C})));
  // spatial branch
  Tensor dctx = ops::linear_bwd(s.ctx.reshape({M, N, C}), wo_->value, fg.dhs.reshape({M, N, C}),
                                &wo_->grad(), nullptr);
  ops::AttnGrads ag =
      ops::attention_bwd(s.q, s.k, s.v, s.ctx, s.lse, dctx.reshape({M, N, H, C / H}), {false, 0});
  Tensor dxe = ops::linear_bwd(s.xe, wq_->value, ag.dq.reshape({M, N, C}), &wq_->grad(), nullptr);
  ops::linear_bwd_into(s.xe, wk_->value, ag.dk.reshape({M, N, C}), dxe, true, &wk_->grad(),
                       nullptr);
  ops::broadcast_grad(emb_->grad(), dxe);
  Tensor dx3 = dx.reshape({M, N, C});
  ops::add_into(dx3, dxe);
  ops::linear_bwd_into(s.x.reshape({M, N, C}), wv_->value, ag.dv.reshape({M, N, C}), dx3, true,
                       &wv_->grad(), nullptr);
  return dx;
}

STBlockState STBlock::new_state(int64_t batch) const {
  MAMBA_CHECK(batch >= 1, "STBlock::new_state: batch must be >= 1, got ", batch);
  STBlockState s;
  s.batch = batch;
  s.temporal = std::visit(
      [&](const auto& m) -> MixerState { return m.new_state(batch * cfg_.num_nodes); }, temporal_);
  return s;
}

Tensor STBlock::step(const Tensor& x, State& state) const {
  const int64_t N = cfg_.num_nodes, C = cfg_.d_model;
  check_defined(x, "STBlock::step: x");
  MAMBA_CHECK(x.ndim() == 3, "STBlock::step: x must be (B, N=", N, ", C=", C, "), got ",
              x.shape_str());
  check_shape(x, "STBlock::step: x", {state.batch, N, C});
  const int64_t B = x.dim(0);
  Tensor hs = spatial(x, nullptr);
  Tensor ht = std::visit(
                  [&](const auto& m) {
                    using S = typename std::decay_t<decltype(m)>::State;
                    S* st = std::get_if<S>(&state.temporal);
                    MAMBA_CHECK(st != nullptr, "STBlock::step: the state is another mixer's");
                    return m.step(x.reshape({B * N, C}), *st);
                  },
                  temporal_)
                  .reshape({B, N, C});
  return fuse_out(x, hs, ht, nullptr);
}

}  // namespace mamba
