// Mamba3Config <-> config.json's ssm_cfg: mamba_ssm's keyword arguments of
// mamba_ssm.modules.mamba3.Mamba3 (with their defaults).
#include <cmath>

#include "core/json_reader.h"
#include "mamba/error.h"
#include "mamba/nn/mamba3.h"

namespace mamba {

using json_io::check_range;

Mamba3Config Mamba3Config::from_ssm_cfg(json_io::KeyReader& r, int64_t d_model) {
  Mamba3Config c;
  c.d_model = d_model;
  c.d_state = r.integer("d_state", c.d_state);
  c.expand = r.number("expand", c.expand);
  c.headdim = r.integer("headdim", c.headdim);
  c.ngroups = r.integer("ngroups", c.ngroups);
  c.rope_fraction = r.number("rope_fraction", c.rope_fraction);
  c.dt_min = r.number("dt_min", c.dt_min);
  c.dt_max = r.number("dt_max", c.dt_max);
  c.dt_init_floor = r.number("dt_init_floor", c.dt_init_floor);
  c.A_floor = r.number("A_floor", c.A_floor);
  c.is_outproj_norm = r.boolean("is_outproj_norm", c.is_outproj_norm);
  c.is_mimo = r.boolean("is_mimo", c.is_mimo);
  c.mimo_rank = r.integer("mimo_rank", c.mimo_rank);
  c.chunk_size = r.integer("chunk_size", c.chunk_size);
  r.number("dropout", 0);  // absorbed by mamba_ssm's Mamba3 ("just to absorb the kwarg")
  return c;
}

const std::vector<std::string>& Mamba3Config::ssm_cfg_keys() {
  static const std::vector<std::string> keys = {
      "d_state", "expand",    "headdim",       "ngroups", "rope_fraction",
      "dt_min",  "dt_max",    "dt_init_floor", "A_floor", "is_outproj_norm",
      "is_mimo", "mimo_rank", "chunk_size",    "dropout"};
  return keys;
}

void Mamba3Config::check_ssm_cfg() const {
  check_range(d_state, 2, 1 << 12, "ssm_cfg.d_state");
  MAMBA_CHECK(std::isfinite(expand) && expand > 0 && expand <= 64, "'ssm_cfg.expand' = ", expand,
              " is out of range (0, 64]");
  check_range(d_inner(), 1, 1 << 20, "ssm_cfg.expand * d_model (d_inner)");
  check_range(headdim, 1, 1 << 12, "ssm_cfg.headdim");
  MAMBA_CHECK(d_inner() % headdim == 0, "'ssm_cfg.headdim' = ", headdim,
              " does not divide d_inner ", d_inner());
  check_range(ngroups, 1, 1 << 12, "ssm_cfg.ngroups");
  MAMBA_CHECK(nheads() % ngroups == 0, "'ssm_cfg.ngroups' = ", ngroups,
              " does not divide the number of heads ", nheads());
  MAMBA_CHECK(rope_fraction == 0.5 || rope_fraction == 1.0,
              "'ssm_cfg.rope_fraction' = ", rope_fraction, " (expected 0.5 or 1.0)");
  MAMBA_CHECK(dt_min > 0 && dt_max >= dt_min, "'ssm_cfg.dt_min' = ", dt_min,
              " and 'ssm_cfg.dt_max' = ", dt_max, " contradict (need 0 < dt_min <= dt_max)");
  MAMBA_CHECK(std::isfinite(A_floor) && A_floor >= 0, "'ssm_cfg.A_floor' = ", A_floor,
              " must be >= 0");
  if (is_mimo) check_range(mimo_rank, 1, 64, "ssm_cfg.mimo_rank");
  check_range(chunk_size, 1, 1 << 16, "ssm_cfg.chunk_size");
}

std::string Mamba3Config::to_ssm_cfg() const {
  json_io::ojson s;
  s["layer"] = "Mamba3";
  s["d_state"] = d_state;
  s["expand"] = json_io::number(expand);
  s["headdim"] = headdim;
  s["ngroups"] = ngroups;
  s["rope_fraction"] = rope_fraction;
  s["dt_min"] = dt_min;
  s["dt_max"] = dt_max;
  s["dt_init_floor"] = dt_init_floor;
  s["A_floor"] = A_floor;
  s["is_outproj_norm"] = is_outproj_norm;
  s["is_mimo"] = is_mimo;
  s["mimo_rank"] = mimo_rank;
  s["chunk_size"] = chunk_size;
  return json_io::dump_python_json(s, -1);
}

}  // namespace mamba
