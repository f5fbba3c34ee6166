// mambacpp.SS2D, mambacpp.VSSBlock (VMamba's 2-D selective scan layer and block) and
// mambacpp.BiMamba (Vim's bidirectional Mamba, bimamba v2) for Python. None has a decode state.
#include "layer.h"
#include "mamba/nn/bimamba.h"
#include "mamba/nn/ss2d.h"
#include "mamba/nn/vssblock.h"

namespace mambapy {

template <>
struct LayerTraits<mamba::SS2D> {
  static std::vector<std::string> positional() { return {"d_model"}; }
  static mamba::SS2DConfig config(const nlohmann::json& kw) {
    return mamba::SS2DConfig::from_json(kw.dump());
  }
};

template <>
struct LayerTraits<mamba::VSSBlock> {
  static std::vector<std::string> positional() { return {"hidden_dim"}; }
  static mamba::VSSBlockConfig config(const nlohmann::json& kw) {
    return mamba::VSSBlockConfig::from_json(kw.dump());
  }
  static std::vector<std::pair<std::string, mamba::Param*>> params(mamba::VSSBlock& b) {
    return b.named_params();
  }
};

template <>
struct LayerTraits<mamba::BiMamba> {
  static std::vector<std::string> positional() { return {"d_model"}; }
  // Vim's Mamba(bimamba_type="v2") keyword arguments (if_divide_out, or Vim's spelling
  // if_devide_out).
  static mamba::BiMambaConfig config(const nlohmann::json& kw) {
    mamba::json_io::KeyReader r(kw, "");
    mamba::BiMambaConfig c;
    MAMBA_CHECK(r.has("d_model"), "BiMamba: 'd_model' is required");
    c.d_model = r.integer("d_model", 0);
    c.d_state = r.integer("d_state", c.d_state);
    c.d_conv = r.integer("d_conv", c.d_conv);
    c.expand = r.number("expand", c.expand);
    if (r.has("dt_rank") && !r.raw("dt_rank").is_string()) {
      c.dt_rank = r.integer("dt_rank", -1);
      MAMBA_CHECK(c.dt_rank >= 1, "'dt_rank' = ", c.dt_rank, " must be >= 1 or \"auto\"");
    } else {
      const std::string v = r.string("dt_rank", "auto");
      MAMBA_CHECK(v == "auto", "'dt_rank' must be an integer or \"auto\", got \"", v, "\"");
    }
    c.dt_min = r.number("dt_min", c.dt_min);
    c.dt_max = r.number("dt_max", c.dt_max);
    c.dt_init = r.string("dt_init", c.dt_init);
    c.dt_scale = r.number("dt_scale", c.dt_scale);
    c.dt_init_floor = r.number("dt_init_floor", c.dt_init_floor);
    c.conv_bias = r.boolean("conv_bias", c.conv_bias);
    c.bias = r.boolean("bias", c.bias);
    c.bimamba_type = r.string("bimamba_type", c.bimamba_type);
    MAMBA_CHECK(!(r.has("if_divide_out") && r.has("if_devide_out")),
                "BiMamba: give 'if_divide_out' or Vim's spelling 'if_devide_out', not both");
    c.if_divide_out = r.boolean("if_divide_out", r.boolean("if_devide_out", c.if_divide_out));
    if (r.has("init_layer_scale")) c.init_layer_scale = r.number("init_layer_scale", 0.0);
    r.ignore({"init_layer_scale"});
    r.finish("BiMamba");
    mamba::json_io::check_range(c.d_model, 1, 1 << 20, "d_model");
    mamba::json_io::check_range(c.d_state, 1, 1 << 16, "d_state");
    mamba::json_io::check_range(c.d_conv, 1, 1 << 10, "d_conv");
    if (c.dt_rank != -1) mamba::json_io::check_range(c.dt_rank, 1, 1 << 20, "dt_rank");
    c.validate();
    return c;
  }
};

void bind_vision(py::module_& m) {
  bind_layer<mamba::SS2D>(
      m, "SS2D",
      "SS2D(d_model=96, *, seed=0, **kwargs): VMamba's 2-D selective scan layer (vmamba.py "
      "SS2D).\nkwargs: d_state=16, ssm_ratio=2.0, dt_rank='auto', act_layer='silu', d_conv=3,\n"
      "conv_bias=True, dropout=0.0, bias=False, dt_min=0.001, dt_max=0.1, dt_init='random',\n"
      "dt_scale=1.0, dt_init_floor=1e-4, initialize='v0', forward_type='v2',\n"
      "channel_first=False. x: (B, H, W, d_model), or (B, d_model, H, W) when channel_first; y "
      "has x's layout. No state.");
  bind_layer<mamba::VSSBlock>(
      m, "VSSBlock",
      "VSSBlock(hidden_dim, *, seed=0, **kwargs): VMamba's block (vmamba.py VSSBlock).\n"
      "kwargs: drop_path=0, channel_first=False, ssm_d_state=16, ssm_ratio=2.0,\n"
      "ssm_dt_rank='auto', ssm_act_layer='silu', ssm_conv=3, ssm_conv_bias=True,\n"
      "ssm_drop_rate=0, ssm_init='v0', forward_type='v2', mlp_ratio=4.0, mlp_act_layer='gelu',\n"
      "mlp_drop_rate=0, gmlp=False, use_checkpoint=False, post_norm=False. x: (B, H, W, C), or "
      "(B, C, H, W) when channel_first. No state.");
  bind_layer<mamba::BiMamba>(
      m, "BiMamba",
      "BiMamba(d_model, *, seed=0, **kwargs): Vim's bidirectional Mamba "
      "(mamba_simple.Mamba with bimamba_type='v2').\n"
      "kwargs: d_state=16, d_conv=4, expand=2, dt_rank='auto', dt_min=0.001, dt_max=0.1,\n"
      "dt_init='random', dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,\n"
      "bimamba_type='v2', if_divide_out=False (Vim: if_devide_out), init_layer_scale=None.\n"
      "x (B, L, d_model). Not causal: no state.");
}

}  // namespace mambapy
