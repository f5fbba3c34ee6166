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
  Weight value;      // fp32, or bf16 / f16 / q8_0 / q4_0 for a matrix after set_weight_dtype
  bool no_weight_decay = false;  // A_log, D, dt biases, norms, biases (as the reference marks them)
  bool matrix = false;  // a large matrix whose storage set_weight_dtype changes (projections,
                        // embedding, lm_head); norms, conv, A_log, D and biases stay fp32

  // The gradient: same shape as the value, fp32; parameter gradients accumulate (+=). Allocated
  // (zeroed) on first use, so a model that only runs inference never holds one (issue 18 item
  // 4): only backward passes, optimisers and tests that read gradients call this. Throws
  // "<name>: weights are bf16: inference only; ..." when the value is not fp32.
  Tensor& grad();
  bool has_grad() const { return grad_.defined(); }
  // The gradient if allocated, else an undefined tensor (never allocates).
  const Tensor& grad_if_allocated() const { return grad_; }
  void release_grad() { grad_ = Tensor(); }
  // Replaces the gradient storage (an undefined tensor releases it; else the value's shape).
  void set_grad(Tensor g);
  // Bytes of gradient storage held now (0 before the first grad()).
  int64_t grad_bytes() const { return grad_.defined() ? grad_.numel() * 4 : 0; }

 private:
  Tensor grad_;
};

// An optional parameter (a bias that may be absent, held as a Param* that may be null): its fp32
// value, or an undefined tensor when absent; its gradient, or nullptr.
const Tensor& optional_f32(const Param* p);
inline Tensor* optional_grad(Param* p) { return p ? &p->grad() : nullptr; }

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

  // Allocates a zeroed fp32 parameter (its gradient comes on first use: Param::grad()).
  Param& add(const std::string& name, Shape shape, bool no_weight_decay = false);
  // The same for a large matrix (Param::matrix: set_weight_dtype converts it).
  Param& add_matrix(const std::string& name, Shape shape);
  Param& get(const std::string& name);
  const Param& get(const std::string& name) const;
  bool has(const std::string& name) const;
  std::deque<Param>& all() { return params_; }
  const std::deque<Param>& all() const { return params_; }
  int64_t count() const;  // number of scalars, whatever their storage
  void zero_grad();       // skips gradients not allocated yet (they start at zero)
  // Allocates every fp32 parameter's gradient now (training: a trainer calls it first, after
  // checking the memory, so that a model too large to train fails before the first step).
  void allocate_grads();
  int64_t grad_bytes() const;  // gradient storage held now, over all parameters

  // Storage of the matrices (Param::matrix). bf16 / f16: converted (round to nearest even), their
  // fp32 values and gradients released (inference only: Weight::f32() and layers' backward throw).
  // f32: converted back exactly (gradients come on first use, zeroed). q8_0 / q4_0: the matrices
  // whose rows are whole blocks of 32 values are quantised (ggml's rounding, mamba/weight.h); a
  // matrix with another row length (Mamba-1's dt_proj, whose rows are dt_rank = 48 values at
  // 130m) stays fp32, as llama.cpp's quantiser also leaves such small matrices unquantised.
  void set_weight_dtype(WeightDType t);
  // The matrices' storage: the first one not in fp32 (f32 when there is none).
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
  // (prefix + name, gradient); a gradient not allocated yet is returned as zeros.
  std::vector<std::pair<std::string, Tensor>> named_grads(const std::string& prefix = "") const;

 private:
  std::deque<Param> params_;
};

}  // namespace mamba
