// The parameter list of a layer, declared once: it drives loading, saving, counting,
// zeroing gradients and the optimiser. Names are mamba_ssm's state_dict keys.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "mamba/tensor.h"

namespace mamba {

class SafetensorsFile;

struct Param {
  std::string name;     // e.g. "in_proj.weight"
  Tensor value;         // shares storage with the layer's member
  Tensor grad;          // same shape; parameter gradients accumulate (+=)
  bool no_weight_decay = false;  // A_log, D, dt biases, norms, biases (as the reference marks them)
};

class ParamList {
 public:
  // Allocates a zeroed parameter and its gradient; returns the value (shared storage).
  Tensor add(const std::string& name, Shape shape, bool no_weight_decay = false);
  Param& get(const std::string& name);
  const Param& get(const std::string& name) const;
  bool has(const std::string& name) const;
  std::vector<Param>& all() { return params_; }
  const std::vector<Param>& all() const { return params_; }
  int64_t count() const;  // number of scalars
  void zero_grad();
  // Copies every parameter from tensors named prefix + name; throws naming a missing tensor
  // or a shape mismatch. Extra tensors in the file are ignored here (the model checks them).
  void load(const SafetensorsFile& f, const std::string& prefix = "");
  void load(const std::map<std::string, Tensor>& tensors, const std::string& prefix = "");
  std::vector<std::pair<std::string, Tensor>> named(const std::string& prefix = "") const;
  std::vector<std::pair<std::string, Tensor>> named_grads(const std::string& prefix = "") const;

 private:
  std::vector<Param> params_;
};

}  // namespace mamba
