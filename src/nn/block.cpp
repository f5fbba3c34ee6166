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

Block::Block(const MixerConfig& mixer, int64_t d_model, double norm_eps, uint64_t seed)
    : mixer_(make_mixer(mixer, seed)), eps_(static_cast<float>(norm_eps)) {
  std::visit(
      [&](const auto& m) {
        MAMBA_CHECK(m.config().d_model == d_model, "Block: the mixer's d_model (",
                    m.config().d_model, ") differs from the block's (", d_model, ")");
      },
      mixer_);
  norm_.add("norm.weight", {d_model}, true).value.f32().fill(1.f);
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

Tensor Block::add_norm(const Tensor& hidden, Tensor& residual) const {
  Tensor normed =
      ops::add_rms_norm_fwd(hidden, residual, norm_.get("norm.weight").value.f32(), eps_);
  trace::op("add+norm", {hidden.shape()}, {normed.shape()});
  return normed;
}

Tensor Block::forward(const Tensor& hidden, Tensor& residual, BlockSaved* saved,
                      BlockState* state) const {
  Tensor normed = add_norm(hidden, residual);
  if (saved)
    saved->residual = residual.clone();  // the stream is updated in place by the next block
  trace::Scope scope("mixer.");
  return std::visit(
      [&](auto& m) {
        using M = std::decay_t<decltype(m)>;
        typename M::Saved* ms =
            saved ? &saved->mixer.template emplace<typename M::Saved>() : nullptr;
        typename M::State* st = state ? &state->template emplace<typename M::State>() : nullptr;
        return m.forward(normed, ms, st);
      },
      mixer_);
}

Tensor Block::step(const Tensor& hidden, Tensor& residual, BlockState& state) const {
  Tensor normed = add_norm(hidden, residual);
  trace::Scope scope("mixer.");
  return std::visit(
      [&](auto& m) {
        using S = typename std::decay_t<decltype(m)>::State;
        S* st = std::get_if<S>(&state);
        MAMBA_CHECK(st != nullptr, "Block::step: the state is not a ",
                    std::decay_t<decltype(m)>::kName, " state");
        return m.step(normed, *st);
      },
      mixer_);
}

void Block::backward(const BlockSaved& s, Tensor& dres) {
  Tensor dnormed = std::visit(
      [&](auto& m) {
        using Sv = typename std::decay_t<decltype(m)>::Saved;
        const Sv* ms = std::get_if<Sv>(&s.mixer);
        MAMBA_CHECK(ms != nullptr, "Block::backward: the saved activations are not a ",
                    std::decay_t<decltype(m)>::kName, " mixer's");
        return m.backward(*ms, dres);
      },
      mixer_);
  Param& norm = norm_.get("norm.weight");
  auto gn = ops::rms_norm_bwd(s.residual, norm.value.f32(), eps_, dnormed);
  ops::add_into(norm.grad, gn.dweight);
  ops::add_into(dres, gn.dx);
}

BlockState Block::new_state(int64_t batch) const {
  return std::visit([&](const auto& m) -> BlockState { return m.new_state(batch); }, mixer_);
}

}  // namespace mamba
