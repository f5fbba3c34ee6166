// Mamba1Config <-> config.json's ssm_cfg: mamba_ssm's keyword arguments of
// mamba_ssm.modules.mamba_simple.Mamba (with their defaults), plus mamba.cpp's "selective" switch.
#include <cmath>

#include "core/json_reader.h"
#include "mamba/error.h"
#include "mamba/nn/mamba1.h"
#include "nn/ssm_cfg_common.h"

namespace mamba {

using json_io::check_range;

Mamba1Config Mamba1Config::from_ssm_cfg(json_io::KeyReader& r, int64_t d_model) {
  Mamba1Config c;
  c.d_model = d_model;
  ssm_cfg::read_common(r, c);
  if (r.has("dt_rank") && r.raw("dt_rank").is_string()) {
    std::string v = r.string("dt_rank", "auto");
    MAMBA_CHECK(v == "auto", "'ssm_cfg.dt_rank' must be an integer or \"auto\", got \"", v, "\"");
  } else if (r.has("dt_rank")) {
    c.dt_rank = r.integer("dt_rank", 0);
    MAMBA_CHECK(c.dt_rank >= 1, "'ssm_cfg.dt_rank' = ", c.dt_rank, " must be >= 1 or \"auto\"");
  }
  r.ignore({"dt_rank"});
  c.dt_scale = r.number("dt_scale", c.dt_scale);
  c.dt_init = r.string("dt_init", c.dt_init);
  MAMBA_CHECK(c.dt_init == "random" || c.dt_init == "constant", "'ssm_cfg.dt_init' = \"", c.dt_init,
              "\" (expected \"random\" or \"constant\")");
  c.selective = r.boolean("selective", c.selective);
  r.boolean("use_fast_path", true);  // a CUDA kernel choice: same math
  return c;
}

const std::vector<std::string>& Mamba1Config::ssm_cfg_keys() {
  static const std::vector<std::string> keys = {
      "d_state",   "d_conv",  "expand",   "dt_min",  "dt_max",    "dt_init_floor", "bias",
      "conv_bias", "dt_rank", "dt_scale", "dt_init", "selective", "use_fast_path"};
  return keys;
}

void Mamba1Config::check_ssm_cfg() const {
  ssm_cfg::check_common(*this);
  if (dt_rank != -1) check_range(dt_rank, 1, 1 << 16, "ssm_cfg.dt_rank");
  check_range(rank(), 1, 1 << 16, "ssm_cfg.dt_rank");
}

std::string Mamba1Config::to_ssm_cfg() const {
  using json_io::number;
  auto s = ssm_cfg::write_head("Mamba1", *this);
  s["dt_rank"] = dt_rank == -1 ? json_io::ojson("auto") : json_io::ojson(dt_rank);
  s["dt_min"] = dt_min;
  s["dt_max"] = dt_max;
  s["dt_init"] = dt_init;
  s["dt_scale"] = dt_scale;
  s["dt_init_floor"] = dt_init_floor;
  if (!selective) s["selective"] = false;
  s["bias"] = bias;
  s["conv_bias"] = conv_bias;
  return json_io::dump_python_json(s, -1);
}

}  // namespace mamba
