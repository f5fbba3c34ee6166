// mambacpp.Mamba2: the Mamba-2 mixer (mamba_ssm.modules.mamba2.Mamba2) for Python.
#include "layer.h"
#include "mamba/nn/mamba2.h"

namespace mambapy {

template <>
struct LayerTraits<mamba::Mamba2> {
  static std::vector<std::string> positional() { return {"d_model"}; }
  static mamba::Mamba2Config config(const nlohmann::json& kw) {
    return mixer_config<mamba::Mamba2>(kw);
  }
  static std::vector<std::pair<const char*, mamba::Tensor*>> tensors(mamba::Mamba2State& s) {
    return {{"conv_state", &s.conv_state}, {"ssm_state", &s.ssm_state}};
  }
};

void bind_mamba2(py::module_& m) {
  bind_layer<mamba::Mamba2>(
      m, "Mamba2",
      "Mamba2(d_model, *, seed=0, **kwargs): the Mamba-2 mixer, "
      "mamba_ssm.modules.mamba2.Mamba2.\n"
      "kwargs: d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1,\n"
      "A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False,\n"
      "dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0, inf), bias=False,\n"
      "conv_bias=True, chunk_size=256 (use_mem_eff_path, sequence_parallel: CUDA choices, "
      "accepted). x (B, L, d_model). State: conv_state (B, d_ssm + 2*ngroups*d_state, d_conv), "
      "ssm_state (B, H, headdim, d_state).");
}

}  // namespace mambapy
