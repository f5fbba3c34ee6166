// mambacpp.Mamba1: the Mamba-1 mixer (mamba_ssm.modules.mamba_simple.Mamba) for Python.
// Binding another layer is a file like this one: its constructor's positional arguments, its
// Config from the keyword arguments, its decode-state tensors, and bind_layer.
#include "layer.h"
#include "mamba/nn/mamba1.h"

namespace mambapy {

template <>
struct LayerTraits<mamba::Mamba1> {
  static std::vector<std::string> positional() { return {"d_model"}; }
  static mamba::Mamba1Config config(const nlohmann::json& kw) {
    return mixer_config<mamba::Mamba1>(kw);
  }
  static std::vector<std::pair<const char*, mamba::Tensor*>> tensors(mamba::Mamba1State& s) {
    return {{"conv_state", &s.conv_state}, {"ssm_state", &s.ssm_state}};
  }
};

void bind_mamba1(py::module_& m) {
  bind_layer<mamba::Mamba1>(
      m, "Mamba1",
      "Mamba1(d_model, *, seed=0, **kwargs): the Mamba-1 mixer, "
      "mamba_ssm.modules.mamba_simple.Mamba.\n"
      "kwargs: d_state=16, d_conv=4, expand=2, dt_rank='auto', dt_min=0.001, dt_max=0.1,\n"
      "dt_init='random', dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False\n"
      "(use_fast_path is accepted: it only picks a CUDA kernel). Arrays are float32 numpy.\n"
      "x (B, L, d_model). State: conv_state (B, D, d_conv), ssm_state (B, D, d_state).");
}

}  // namespace mambapy
