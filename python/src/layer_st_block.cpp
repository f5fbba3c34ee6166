// mambacpp.STBlock: the spatio-temporal block (include/mamba/nn/st_block.h) for Python.
#include "layer.h"
#include "mamba/nn/mixers.h"
#include "mamba/nn/st_block.h"

namespace mambapy {

template <>
struct LayerTraits<mamba::STBlock> {
  static std::vector<std::string> positional() { return {"num_nodes", "d_model"}; }
  // num_nodes, d_model, num_heads=1, temporal={"layer": "Mamba1", <that mixer's ssm_cfg keys>}
  // ("Mamba1", "Mamba2", "Mamba3", or "MHA" with causal true: the temporal-attention baseline).
  static mamba::STBlockConfig config(const nlohmann::json& kw) {
    mamba::json_io::KeyReader r(kw, "");
    mamba::STBlockConfig c;
    MAMBA_CHECK(r.has("num_nodes") && r.has("d_model"),
                "STBlock: 'num_nodes' and 'd_model' are required");
    c.num_nodes = r.integer("num_nodes", 0);
    c.d_model = r.integer("d_model", 0);
    c.num_heads = r.integer("num_heads", c.num_heads);
    mamba::json_io::check_range(c.num_nodes, 1, 1 << 20, "num_nodes");
    mamba::json_io::check_range(c.d_model, 1, 1 << 20, "d_model");
    mamba::json_io::check_range(c.num_heads, 1, 1 << 16, "num_heads");
    nlohmann::json t = r.has("temporal") ? r.raw("temporal") : nlohmann::json::object();
    r.ignore({"temporal"});
    r.finish("STBlock");
    MAMBA_CHECK(t.is_object(),
                "STBlock: 'temporal' must be a dict (the temporal mixer's "
                "arguments, with \"layer\")");
    std::string layer = "Mamba1";
    if (t.contains("layer")) {
      MAMBA_CHECK(t["layer"].is_string(), "STBlock: 'temporal.layer' must be a string");
      layer = t["layer"].get<std::string>();
      t.erase("layer");
    }
    mamba::json_io::KeyReader tr(t, "temporal.");
    bool found = false;
    mamba::Mixers::for_each([&](auto tag) {
      using M = typename decltype(tag)::type;
      if (layer == M::kName) {
        auto mc = M::Config::from_ssm_cfg(tr, c.d_model);
        tr.finish("STBlock's temporal mixer");
        mc.check_ssm_cfg();
        mc.validate();
        c.temporal = mc;
        found = true;
      }
    });
    MAMBA_CHECK(found, "STBlock: 'temporal.layer' = \"", layer, "\" is not one of ",
                mamba::Mixers::names());
    c.validate();
    return c;
  }
  static std::vector<std::pair<std::string, mamba::Param*>> params(mamba::STBlock& b) {
    return b.named_parameters();
  }
  static std::vector<std::pair<const char*, mamba::Tensor*>> tensors(mamba::STBlockState&) {
    return {};  // the temporal mixer's state for B*N rows: opaque
  }
  static constexpr bool kStateArrays = false;
};

void bind_st_block(py::module_& m) {
  bind_layer<mamba::STBlock>(
      m, "STBlock",
      "STBlock(num_nodes, d_model, *, seed=0, num_heads=1, temporal={'layer': 'Mamba1', ...}):\n"
      "the spatio-temporal block (GMAN's gated fusion with a Mamba temporal branch; "
      "include/mamba/nn/st_block.h). x (B, T, N, C) -> (B, T, N, C); step: x_t (B, N, C) one "
      "time step of every node, with an opaque State (new_state(B) or "
      "forward(return_state=True)).");
}

}  // namespace mambapy
