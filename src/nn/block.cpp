// Block: add -> norm -> mixer, one path for forward, step and backward (see nn/block.h).
#include "mamba/nn/block.h"

#include "mamba/trace.h"
#include "ops/elementwise.h"
#include "ops/norm.h"

namespace mamba {

namespace {

// The mixer whose config is c (the alternatives of MixerConfig and Mixer have the same index).
template <size_t I = 0>
Mixer make_mixer(const MixerConfig& c, uint64_t seed) {
  if constexpr (I + 1 < Mixers::size) {
    if (c.index() != I) return make_mixer<I + 1>(c, seed);
  }
  return Mixer(std::in_place_index<I>, std::get<I>(c), seed);
}

}  // namespace

Block::Block(const MixerConfig& mixer, int64_t d_model, double norm_eps, uint64_t seed,
             int64_t d_intermediate)
    : mixer_(make_mixer(mixer, seed)), eps_(static_cast<float>(norm_eps)) {
  std::visit(
      [&](const auto& m) {
        MAMBA_CHECK(m.config().d_model == d_model, "Block: the mixer's d_model (",
                    m.config().d_model, ") differs from the block's (", d_model, ")");
      },
      mixer_);
  norm_w_ = &norm_.add("norm.weight", {d_model}, true);
  norm_w_->value.f32().fill(1.f);
  if (d_intermediate > 0) {
    norm2_w_ = &norm_.add("norm2.weight", {d_model}, true);
    norm2_w_->value.f32().fill(1.f);
    GatedMLPConfig mc;
    mc.in_features = d_model, mc.hidden_features = d_intermediate, mc.out_features = d_model;
    mlp_.emplace(mc, seed ^ 0x9E3779B97F4A7C15ull);  // its own stream, the mixer's is unchanged
  }
}

const char* Block::mixer_name() const {
  return std::visit([](const auto& m) { return std::decay_t<decltype(m)>::kName; }, mixer_);
}

ParamList& Block::mixer_params() {
  return std::visit([](auto& m) -> ParamList& { return m.params(); }, mixer_);
}
const ParamList& Block::mixer_params() const {
  return std::visit([](const auto& m) -> const ParamList& { return m.params(); }, mixer_);
}

Tensor Block::add_norm(const Tensor& hidden, Tensor& residual, const Param& norm,
                       const char* what) const {
  Tensor normed = ops::add_rms_norm_fwd(hidden, residual, norm.value.f32(), eps_);
  trace::op(what, {hidden.shape()}, {normed.shape()});
  return normed;
}

Tensor Block::mlp_part(const Tensor& mixed, Tensor& residual, BlockSaved* saved) const {
  if (!mlp_) return mixed;
  Tensor normed = add_norm(mixed, residual, *norm2_w_, "add+norm2");
  if (saved) saved->residual2 = residual.clone();
  trace::Scope scope("mlp.");
  Tensor out = mlp_->forward(normed, saved ? &saved->mlp : nullptr);
  trace::op("gated_mlp", {normed.shape()}, {out.shape()});
  return out;
}

Tensor Block::forward(const Tensor& hidden, Tensor& residual, BlockSaved* saved,
                      BlockState* state) const {
  Tensor normed = add_norm(hidden, residual, *norm_w_, "add+norm");
  if (saved) saved->residual = residual.clone();  // the stream is updated in place by the next add
  Tensor mixed;
  {
    trace::Scope scope("mixer.");
    mixed = std::visit(
        [&](auto& m) {
          using M = std::decay_t<decltype(m)>;
          typename M::Saved* ms =
              saved ? &saved->mixer.template emplace<typename M::Saved>() : nullptr;
          typename M::State* st = state ? &state->template emplace<typename M::State>() : nullptr;
          return m.forward(normed, ms, st);
        },
        mixer_);
  }
  return mlp_part(mixed, residual, saved);
}

// prefill and step: add + norm, then `call(mixer, its state)` on the mixer's own state kind
// (a state of another kind is refused, naming `what`), then the MLP part.
template <class Call>
Tensor Block::with_state(const Tensor& hidden, Tensor& residual, BlockState& state,
                         const char* what, Call&& call) const {
  Tensor normed = add_norm(hidden, residual, *norm_w_, "add+norm");
  Tensor mixed;
  {
    trace::Scope scope("mixer.");
    mixed = std::visit(
        [&](auto& m) {
          using S = typename std::decay_t<decltype(m)>::State;
          S* st = std::get_if<S>(&state);
          MAMBA_CHECK(st != nullptr, what, ": the state is not a ",
                      std::decay_t<decltype(m)>::kName, " state");
          return call(m, normed, *st);
        },
        mixer_);
  }
  return mlp_part(mixed, residual, nullptr);
}

Tensor Block::prefill(const Tensor& hidden, Tensor& residual, BlockState& state) const {
  return with_state(hidden, residual, state, "Block::prefill",
                    [](auto& m, const Tensor& x, auto& st) { return m.prefill(x, st); });
}

Tensor Block::step(const Tensor& hidden, Tensor& residual, BlockState& state) const {
  return with_state(hidden, residual, state, "Block::step",
                    [](auto& m, const Tensor& x, auto& st) { return m.step(x, st); });
}

void Block::backward(const BlockSaved& s, Tensor& dres) {
  if (mlp_) {  // out = mlp(norm2(r2)), r2 = r1 + mixed: dres is d(out) and d(r2) on entry
    Param& norm2 = *norm2_w_;
    auto gn2 = ops::rms_norm_bwd(s.residual2, norm2.value.f32(), eps_, mlp_->backward(s.mlp, dres));
    ops::add_into(norm2.grad(), gn2.dweight);
    ops::add_into(dres, gn2.dx);  // now d(r2) in full: the gradient of mixed and of r1
  }
  Tensor dnormed = std::visit(
      [&](auto& m) {
        using Sv = typename std::decay_t<decltype(m)>::Saved;
        const Sv* ms = std::get_if<Sv>(&s.mixer);
        MAMBA_CHECK(ms != nullptr, "Block::backward: the saved activations are not a ",
                    std::decay_t<decltype(m)>::kName, " mixer's");
        return m.backward(*ms, dres);
      },
      mixer_);
  Param& norm = *norm_w_;
  auto gn = ops::rms_norm_bwd(s.residual, norm.value.f32(), eps_, dnormed);
  ops::add_into(norm.grad(), gn.dweight);
  ops::add_into(dres, gn.dx);
}

BlockState Block::new_state(int64_t batch) const {
  return std::visit([&](const auto& m) -> BlockState { return m.new_state(batch); }, mixer_);
}

}  // namespace mamba
