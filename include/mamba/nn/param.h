// The parameter list of a layer, declared once: it drives loading, saving, counting, zeroing
// gradients, the storage format of the large matrices and the optimiser. Names are mamba_ssm's
// state_dict keys.
#pragma once
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "mamba/tensor.h"
#include "mamba/weight.h"

namespace mamba {

class SafetensorsFile;

struct Param {
  std::string name;  // e.g. "in_proj.weight"
  Weight value;      // fp32, or bf16 / f16 for a matrix after set_weight_dtype
  Tensor grad;       // same shape, fp32; parameter gradients accumulate (+=). Undefined while
                     // the value is not fp32 (inference only).
  bool no_weight_decay = false;  // A_log, D, dt biases, norms, biases (as the reference marks them)
  bool matrix = false;  // a large matrix whose storage set_weight_dtype changes (projections,
                        // embedding, lm_head); norms, conv, A_log, D and biases stay fp32
};

// An optional parameter (a bias that may be absent, held as a Param* that may be null): its fp32
// value, or an undefined tensor when absent; its gradient, or nullptr.
const Tensor& optional_f32(const Param* p);
inline Tensor* optional_grad(Param* p) { return p ? &p->grad : nullptr; }

// Parameters keep their addresses for the life of the list (add never moves an element, and
// moving the list moves its elements' storage with it), so layers hold Param* to their own.
// Not copyable: a copy would leave those pointers on the original.
class ParamList {
 public:
  ParamList() = default;
  ParamList(const ParamList&) = delete;
  ParamList& operator=(const ParamList&) = delete;
  ParamList(ParamList&&) noexcept = default;
  ParamList& operator=(ParamList&&) noexcept = default;

  // Allocates a zeroed fp32 parameter and its zeroed gradient.
  Param& add(const std::string& name, Shape shape, bool no_weight_decay = false);
  // The same for a large matrix (Param::matrix: set_weight_dtype converts it).
  Param& add_matrix(const std::string& name, Shape shape);
  Param& get(const std::string& name);
  const Param& get(const std::string& name) const;
  bool has(const std::string& name) const;
  std::deque<Param>& all() { return params_; }
  const std::deque<Param>& all() const { return params_; }
  int64_t count() const;  // number of scalars, whatever their storage
  void zero_grad();       // skips undefined gradients

  // Storage of the matrices (Param::matrix). bf16 / f16: converted (round to nearest even), their
  // fp32 values and gradients released (inference only: Weight::f32() and layers' backward throw).
  // f32: converted back exactly, with zeroed gradients.
  void set_weight_dtype(WeightDType t);
  // The matrices' storage (f32 when the list has none).
  WeightDType weight_dtype() const;
  // Throws "<what>: weights are bf16: inference only; load in f32 to train (<name>)" unless every
  // parameter is fp32 (training needs fp32 values and gradients).
  void check_f32(const char* what) const;

  // Copies every parameter from tensors named prefix + name (rounding into 16-bit storage);
  // throws naming a missing tensor or a shape mismatch. Extra tensors in the file are ignored here
  // (the model checks them).
  void load(const SafetensorsFile& f, const std::string& prefix = "");
  void load(const std::map<std::string, Tensor>& tensors, const std::string& prefix = "");
  // (prefix + name, fp32 value): 16-bit values converted exactly (Weight::to_f32).
  std::vector<std::pair<std::string, Tensor>> named(const std::string& prefix = "") const;
  std::vector<std::pair<std::string, Tensor>> named_grads(const std::string& prefix = "") const;

 private:
  std::deque<Param> params_;
};

}  // namespace mamba
