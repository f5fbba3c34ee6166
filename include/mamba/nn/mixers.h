// The closed set of sequence mixers a Block can hold, declared once.
//
// Each mixer is a class with the same shape (Mamba1 and Mamba2 are the examples):
//   using Config / State / Saved = its config, decode-state and saved-activation structs;
//   static constexpr const char* kName      its ssm_cfg "layer" name in config.json
//   Config::from_ssm_cfg / to_ssm_cfg / ssm_cfg_keys / check_ssm_cfg   its config.json keys
//   ParamList& params(); forward(hidden, Saved*, State*) const; backward(saved, dy);
//   new_state(batch) const; step(x, State&) const; prefill(hidden, State&) const (the forward
//   continued from a state and advancing it: chunked prefill, equal to L steps)
//   State::copy_row(dst_b, src, src_b): batch row copy (generate stacks prefilled states)
// MixerSet turns the list into the variants used by ModelConfig (MixerConfig), Block (Mixer) and
// the model's decode state / saved activations (MixerState / MixerSaved); the index of an
// alternative is the same in all four, so the kind is parsed once (from ssm_cfg "layer") and
// dispatch is std::visit, never a string compare. Adding a mixer = its own files + the one line
// `using Mixers = MixerSet<...>` below (docs/ARCHITECTURE.md, "How to add a mixer").
#pragma once
#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "mamba/nn/mamba1.h"
#include "mamba/nn/mamba2.h"
#include "mamba/nn/mamba3.h"
#include "mamba/nn/mha.h"

namespace mamba {

template <class... M>
struct MixerSet {
  using Layer = std::variant<M...>;
  using Config = std::variant<typename M::Config...>;
  using State = std::variant<typename M::State...>;
  using Saved = std::variant<typename M::Saved...>;
  static constexpr size_t size = sizeof...(M);
  // f(std::type_identity<M>{}) for every mixer, in order.
  template <class F>
  static void for_each(F&& f) {
    (f(std::type_identity<M>{}), ...);
  }
  // The first mixer's name: ssm_cfg's default "layer" (mamba_ssm's MambaConfig uses Mamba1).
  static const char* default_name() {
    const char* n = nullptr;
    for_each([&](auto t) {
      if (!n) n = decltype(t)::type::kName;
    });
    return n;
  }
  // The ssm_cfg "layer" names, comma-separated and quoted (for error messages).
  static std::string names() {
    std::string s;
    ((s += (s.empty() ? "\"" : ", \"") + std::string(M::kName) + "\""), ...);
    return s;
  }
};

// The registration line: every mixer, in ssm_cfg "layer" order (the first is the default). MHA is
// the attention mixer: it is chosen per layer by attn_layer_idx and configured by attn_cfg, never
// by ssm_cfg "layer" (as in mamba_ssm; see is_attention_mixer).
using Mixers = MixerSet<Mamba1, Mamba2, Mamba3, MHA>;

using Mixer = Mixers::Layer;
using MixerConfig = Mixers::Config;
using MixerState = Mixers::State;
using MixerSaved = Mixers::Saved;

// Attention mixers take their config from attn_cfg (attn_layer_idx), not from ssm_cfg.
template <class M>
inline constexpr bool is_attention_mixer = std::is_same_v<M, MHA>;

// The "layer" name of the mixer a config describes.
inline const char* mixer_name(const MixerConfig& c) {
  return std::visit(
      [](const auto& cfg) -> const char* {
        using Cfg = std::decay_t<decltype(cfg)>;
        const char* name = "";
        Mixers::for_each([&](auto t) {
          if constexpr (std::is_same_v<typename decltype(t)::type::Config, Cfg>)
            name = decltype(t)::type::kName;
        });
        return name;
      },
      c);
}

}  // namespace mamba
