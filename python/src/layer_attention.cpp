// mambacpp.MHA and mambacpp.GatedMLP: mamba_ssm's attention mixer (modules/mha.py) and MLP
// (modules/mlp.py) for Python.
#include "layer.h"
#include "mamba/nn/mha.h"
#include "mamba/nn/mlp.h"

namespace mambapy {

template <>
struct LayerTraits<mamba::MHA> {
  static std::vector<std::string> positional() { return {"embed_dim", "num_heads"}; }
  static mamba::MHAConfig config(const nlohmann::json& kw) {
    return mixer_config<mamba::MHA>(kw, "embed_dim");
  }
  static std::vector<std::pair<const char*, mamba::Tensor*>> tensors(mamba::MHAState& s) {
    return {{"k_cache", &s.k_cache}, {"v_cache", &s.v_cache}, {"conv_state", &s.conv_state}};
  }
  static constexpr bool kStateArrays = false;  // the KV cache grows: a State object only
  static void bind_state_extras(py::class_<PyState<mamba::MHA>>& st) {
    st.def_property_readonly(
        "lengths", [](PyState<mamba::MHA>& s) { return s.state.len; },
        "Tokens cached per batch row (k_cache / v_cache hold them in their first rows).");
  }
};

template <>
struct LayerTraits<mamba::GatedMLP> {
  static std::vector<std::string> positional() { return {"in_features"}; }
  static mamba::GatedMLPConfig config(const nlohmann::json& kw) {
    mamba::json_io::KeyReader r(kw, "");
    mamba::GatedMLPConfig c;
    MAMBA_CHECK(r.has("in_features"), "GatedMLP: 'in_features' is required");
    c.in_features = r.integer("in_features", 0);
    c.hidden_features = r.integer("hidden_features", 0);  // None: int(8 * in_features / 3)
    c.out_features = r.integer("out_features", 0);        // None: in_features
    c.bias = r.boolean("bias", c.bias);
    c.multiple_of = r.integer("multiple_of", c.multiple_of);
    r.finish("GatedMLP");
    mamba::json_io::check_range(c.in_features, 1, 1 << 20, "in_features");
    mamba::json_io::check_range(c.hidden_features, 0, 1 << 22, "hidden_features");
    mamba::json_io::check_range(c.out_features, 0, 1 << 20, "out_features");
    mamba::json_io::check_range(c.multiple_of, 1, 1 << 20, "multiple_of");
    c.validate();
    return c;
  }
};

void bind_attention(py::module_& m) {
  bind_layer<mamba::MHA>(
      m, "MHA",
      "MHA(embed_dim, num_heads, *, seed=0, **kwargs): multi-head attention, "
      "mamba_ssm.modules.mha.MHA.\n"
      "kwargs: num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True,\n"
      "out_proj_bias=True, softmax_scale=None, causal=False, d_conv=0, rotary_emb_dim=0,\n"
      "rotary_emb_base=10000.0, rotary_emb_interleaved=False. x (B, L, embed_dim).\n"
      "State (causal decode): the KV cache (k_cache, v_cache: (B, capacity, KV, head_dim), "
      "rows [0, lengths[b]) filled; it grows as tokens arrive) and conv_state (B, qkv_dim, "
      "d_conv): the last d_conv PRE-conv qkv columns, so decode equals the forward (mamba_ssm "
      "stores the post-conv ones, PR #1027).");
  bind_layer<mamba::GatedMLP>(
      m, "GatedMLP",
      "GatedMLP(in_features, *, seed=0, **kwargs): mamba_ssm.modules.mlp.GatedMLP (SiLU gate).\n"
      "kwargs: hidden_features=None (int(8*in/3)), out_features=None (in), bias=False,\n"
      "multiple_of=128. x (..., in_features) -> (..., out_features). No state.");
}

}  // namespace mambapy
