// The ssm_cfg keys the SSM mixers share (mamba_ssm's Mamba and Mamba2 both take them), read,
// range-checked and written once for every config struct that has these fields.
#pragma once
#include <cmath>

#include "core/json_reader.h"
#include "mamba/error.h"

namespace mamba::ssm_cfg {

// d_state, d_conv, expand, dt_min, dt_max, dt_init_floor, bias, conv_bias.
template <class Cfg>
void read_common(json_io::KeyReader& r, Cfg& c) {
  c.d_state = r.integer("d_state", c.d_state);
  c.d_conv = r.integer("d_conv", c.d_conv);
  c.expand = r.number("expand", c.expand);
  c.dt_min = r.number("dt_min", c.dt_min);
  c.dt_max = r.number("dt_max", c.dt_max);
  c.dt_init_floor = r.number("dt_init_floor", c.dt_init_floor);
  c.bias = r.boolean("bias", c.bias);
  c.conv_bias = r.boolean("conv_bias", c.conv_bias);
}

// Ranges for a model file (hostile input); d_inner() only once expand is known to be sane.
template <class Cfg>
void check_common(const Cfg& c) {
  json_io::check_range(c.d_state, 1, 1 << 12, "ssm_cfg.d_state");
  json_io::check_range(c.d_conv, 1, 64, "ssm_cfg.d_conv");
  MAMBA_CHECK(std::isfinite(c.expand) && c.expand > 0 && c.expand <= 64,
              "'ssm_cfg.expand' = ", c.expand, " is out of range (0, 64]");
  json_io::check_range(c.d_inner(), 1, 1 << 20, "ssm_cfg.expand * d_model (d_inner)");
  MAMBA_CHECK(c.dt_min > 0 && c.dt_max >= c.dt_min, "'ssm_cfg.dt_min' = ", c.dt_min,
              " and 'ssm_cfg.dt_max' = ", c.dt_max, " contradict (need 0 < dt_min <= dt_max)");
}

// "layer", d_state, d_conv, expand: the first keys of both mixers' ssm_cfg in mamba_ssm's order.
template <class Cfg>
json_io::ojson write_head(const char* layer, const Cfg& c) {
  json_io::ojson s;
  s["layer"] = layer;
  s["d_state"] = c.d_state;
  s["d_conv"] = c.d_conv;
  s["expand"] = json_io::number(c.expand);
  return s;
}

}  // namespace mamba::ssm_cfg
