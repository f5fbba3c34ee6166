// mambacpp.Mamba3: the Mamba-3 mixer (mamba_ssm.modules.mamba3.Mamba3, SISO and MIMO) for Python.
#include "layer.h"
#include "mamba/nn/mamba3.h"

namespace mambapy {

template <>
struct LayerTraits<mamba::Mamba3> {
  static std::vector<std::string> positional() { return {"d_model"}; }
  static mamba::Mamba3Config config(const nlohmann::json& kw) {
    return mixer_config<mamba::Mamba3>(kw);
  }
  // Mamba3.step's state arguments, in its order.
  static std::vector<std::pair<const char*, mamba::Tensor*>> tensors(mamba::Mamba3State& s) {
    return {{"angle_state", &s.angle}, {"ssm_state", &s.ssm}, {"k_state", &s.k}, {"v_state", &s.v}};
  }
};

void bind_mamba3(py::module_& m) {
  bind_layer<mamba::Mamba3>(
      m, "Mamba3",
      "Mamba3(d_model, *, seed=0, **kwargs): the Mamba-3 mixer, "
      "mamba_ssm.modules.mamba3.Mamba3 (SISO and MIMO).\n"
      "kwargs: d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5, dt_min=0.001,\n"
      "dt_max=0.1, dt_init_floor=1e-4, A_floor=1e-4, is_outproj_norm=False, is_mimo=False,\n"
      "mimo_rank=4, chunk_size=64. x (B, L, d_model). State: angle_state (B, H, S), ssm_state\n"
      "(B, H, headdim, d_state), k_state (B, R, H, d_state), v_state (B, H, headdim).");
}

}  // namespace mambapy
