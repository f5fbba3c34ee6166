// SS2DConfig / VSSBlockConfig from VMamba's keyword arguments as JSON (the golden files' "config"
// metadata, a user's model description): every key type- and range-checked by name, unknown keys
// refused. Activation layers are named by string ("silu", "gelu", or torch's class names).
#include <algorithm>
#include <cctype>

#include "core/json_reader.h"
#include "mamba/error.h"
#include "mamba/nn/ss2d.h"
#include "mamba/nn/vssblock.h"

namespace mamba {

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// "auto" or an integer >= 1 (-1 internally for "auto")
int64_t read_rank(json_io::KeyReader& r, const std::string& key) {
  if (!r.has(key)) {
    r.ignore({key.c_str()});
    return -1;
  }
  if (r.raw(key).is_string()) {
    const std::string v = r.string(key, "auto");
    MAMBA_CHECK(v == "auto", "'", r.name(key), "' must be an integer or \"auto\", got \"", v, "\"");
    return -1;
  }
  const int64_t v = r.integer(key, 0);
  MAMBA_CHECK(v >= 1, "'", r.name(key), "' = ", v, " must be >= 1 or \"auto\"");
  return v;
}

std::string read_act(json_io::KeyReader& r, const std::string& key, const std::string& def) {
  return lower(r.string(key, def));
}

json_io::json parse(const std::string& text, const char* what) {
  json_io::json j = json_io::parse_python_json(text, what);
  MAMBA_CHECK(j.is_object(), what, ": expected a JSON object of keyword arguments");
  return j;
}

}  // namespace

SS2DConfig SS2DConfig::from_json(const std::string& text) {
  const json_io::json j = parse(text, "SS2D config");
  json_io::KeyReader r(j, "");
  SS2DConfig c;
  c.d_model = r.integer("d_model", c.d_model);
  c.d_state = r.integer("d_state", c.d_state);
  c.ssm_ratio = r.number("ssm_ratio", c.ssm_ratio);
  c.dt_rank = read_rank(r, "dt_rank");
  c.act_layer = read_act(r, "act_layer", c.act_layer);
  c.d_conv = r.integer("d_conv", c.d_conv);
  c.conv_bias = r.boolean("conv_bias", c.conv_bias);
  c.dropout = r.number("dropout", c.dropout);
  c.bias = r.boolean("bias", c.bias);
  c.dt_min = r.number("dt_min", c.dt_min);
  c.dt_max = r.number("dt_max", c.dt_max);
  c.dt_init = r.string("dt_init", c.dt_init);
  c.dt_scale = r.number("dt_scale", c.dt_scale);
  c.dt_init_floor = r.number("dt_init_floor", c.dt_init_floor);
  c.initialize = r.string("initialize", c.initialize);
  c.forward_type = r.string("forward_type", c.forward_type);
  c.channel_first = r.boolean("channel_first", c.channel_first);
  r.finish("the SS2D config");
  c.validate();
  return c;
}

VSSBlockConfig VSSBlockConfig::from_json(const std::string& text) {
  const json_io::json j = parse(text, "VSSBlock config");
  json_io::KeyReader r(j, "");
  VSSBlockConfig c;
  c.hidden_dim = r.integer("hidden_dim", c.hidden_dim);
  c.drop_path = r.number("drop_path", c.drop_path);
  c.channel_first = r.boolean("channel_first", c.channel_first);
  c.ssm_d_state = r.integer("ssm_d_state", c.ssm_d_state);
  c.ssm_ratio = r.number("ssm_ratio", c.ssm_ratio);
  c.ssm_dt_rank = read_rank(r, "ssm_dt_rank");
  c.ssm_act_layer = read_act(r, "ssm_act_layer", c.ssm_act_layer);
  c.ssm_conv = r.integer("ssm_conv", c.ssm_conv);
  c.ssm_conv_bias = r.boolean("ssm_conv_bias", c.ssm_conv_bias);
  c.ssm_drop_rate = r.number("ssm_drop_rate", c.ssm_drop_rate);
  c.ssm_init = r.string("ssm_init", c.ssm_init);
  c.forward_type = r.string("forward_type", c.forward_type);
  c.mlp_ratio = r.number("mlp_ratio", c.mlp_ratio);
  c.mlp_act_layer = read_act(r, "mlp_act_layer", c.mlp_act_layer);
  c.mlp_drop_rate = r.number("mlp_drop_rate", c.mlp_drop_rate);
  c.gmlp = r.boolean("gmlp", c.gmlp);
  c.use_checkpoint = r.boolean("use_checkpoint", c.use_checkpoint);
  c.post_norm = r.boolean("post_norm", c.post_norm);
  r.finish("the VSSBlock config");
  c.validate();
  return c;
}

}  // namespace mamba
