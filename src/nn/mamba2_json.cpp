// Mamba2Config <-> config.json's ssm_cfg: mamba_ssm's keyword arguments of
// mamba_ssm.modules.mamba2.Mamba2 (with their defaults).
#include <cmath>
#include <tuple>

#include "core/json_reader.h"
#include "mamba/error.h"
#include "mamba/nn/mamba2.h"
#include "nn/ssm_cfg_common.h"

namespace mamba {

using json_io::check_range;

Mamba2Config Mamba2Config::from_ssm_cfg(json_io::KeyReader& r, int64_t d_model) {
  Mamba2Config c;
  c.d_model = d_model;
  ssm_cfg::read_common(r, c);
  c.headdim = r.integer("headdim", c.headdim);
  c.ngroups = r.integer("ngroups", c.ngroups);
  c.chunk_size = r.integer("chunk_size", c.chunk_size);
  if (r.has("d_ssm")) {
    c.d_ssm = r.integer("d_ssm", 0);
    MAMBA_CHECK(c.d_ssm >= 1, "'ssm_cfg.d_ssm' = ", c.d_ssm,
                " must be >= 1 or null (all of d_inner)");
  }
  r.ignore({"d_ssm"});
  c.rmsnorm = r.boolean("rmsnorm", c.rmsnorm);
  c.norm_before_gate = r.boolean("norm_before_gate", c.norm_before_gate);
  c.D_has_hdim = r.boolean("D_has_hdim", c.D_has_hdim);
  c.A_init_range = r.pair("A_init_range", c.A_init_range);
  c.dt_limit = r.pair("dt_limit", c.dt_limit);
  r.boolean("use_mem_eff_path", true);   // a CUDA kernel choice: same math
  r.boolean("sequence_parallel", true);  // multi-GPU only
  r.number("conv_init", 0);              // initialisation only
  return c;
}

const std::vector<std::string>& Mamba2Config::ssm_cfg_keys() {
  static const std::vector<std::string> keys = {"d_state",
                                                "d_conv",
                                                "expand",
                                                "dt_min",
                                                "dt_max",
                                                "dt_init_floor",
                                                "bias",
                                                "conv_bias",
                                                "headdim",
                                                "ngroups",
                                                "chunk_size",
                                                "d_ssm",
                                                "rmsnorm",
                                                "norm_before_gate",
                                                "D_has_hdim",
                                                "A_init_range",
                                                "dt_limit",
                                                "use_mem_eff_path",
                                                "sequence_parallel",
                                                "conv_init"};
  return keys;
}

void Mamba2Config::check_ssm_cfg() const {
  ssm_cfg::check_common(*this);
  check_range(headdim, 1, 1 << 12, "ssm_cfg.headdim");
  check_range(ngroups, 1, 1 << 12, "ssm_cfg.ngroups");
  check_range(chunk_size, 1, 1 << 16, "ssm_cfg.chunk_size");
  if (d_ssm > 0) check_range(d_ssm, 1, d_inner(), "ssm_cfg.d_ssm");
  const int64_t dssm = ssm_dim();
  MAMBA_CHECK(dssm % headdim == 0, "'ssm_cfg.headdim' = ", headdim,
              " does not divide the SSM width ", dssm, " (expand * d_model",
              d_ssm > 0 ? " or d_ssm" : "", ")");
  MAMBA_CHECK(nheads() % ngroups == 0, "'ssm_cfg.ngroups' = ", ngroups,
              " does not divide the number of heads ", nheads());
  MAMBA_CHECK(!(dt_limit.first < 0) && dt_limit.second > dt_limit.first, "'ssm_cfg.dt_limit' = [",
              dt_limit.first, ", ", dt_limit.second, "] is not a range 0 <= lo < hi");
}

std::string Mamba2Config::to_ssm_cfg() const {
  using json_io::number;
  using json_io::ojson;
  auto s = ssm_cfg::write_head("Mamba2", *this);
  s["headdim"] = headdim;
  s["d_ssm"] = d_ssm > 0 ? ojson(d_ssm) : ojson(nullptr);
  s["ngroups"] = ngroups;
  s["A_init_range"] = {number(A_init_range.first), number(A_init_range.second)};
  s["D_has_hdim"] = D_has_hdim;
  s["rmsnorm"] = rmsnorm;
  s["norm_before_gate"] = norm_before_gate;
  s["dt_min"] = dt_min;
  s["dt_max"] = dt_max;
  s["dt_init_floor"] = dt_init_floor;
  if (!(dt_limit.first == 0 && std::isinf(dt_limit.second)))
    s["dt_limit"] = {number(dt_limit.first), number(dt_limit.second)};
  s["chunk_size"] = chunk_size;
  s["bias"] = bias;
  s["conv_bias"] = conv_bias;
  return json_io::dump_python_json(s, -1);
}

}  // namespace mamba
