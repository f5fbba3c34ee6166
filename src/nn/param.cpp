#include "mamba/nn/param.h"

#include "mamba/safetensors.h"

namespace mamba {

const Tensor& optional_f32(const Param* p) {
  static const Tensor none;
  return p ? p->value.f32(p->name.c_str()) : none;
}

Tensor& Param::grad() {
  if (!grad_.defined()) {
    MAMBA_CHECK(value.is_f32(), name, ": weights are ", weight_dtype_name(value.dtype()),
                ": inference only, no gradient; load in f32 to train");
    grad_ = Tensor(value.shape());
  }
  return grad_;
}

void Param::set_grad(Tensor g) {
  MAMBA_CHECK(!g.defined() || g.shape() == value.shape(), name, ": gradient of shape ",
              g.shape_str(), " for a value of shape ", value.shape_str());
  grad_ = std::move(g);
}

Param& ParamList::add(const std::string& name, Shape shape, bool no_weight_decay) {
  MAMBA_CHECK(!has(name), "parameter '", name, "' declared twice");
  Param& p = params_.emplace_back();
  p.name = name;
  p.value = Weight(Tensor(std::move(shape)));
  p.no_weight_decay = no_weight_decay;
  return p;
}

Param& ParamList::add_matrix(const std::string& name, Shape shape) {
  Param& p = add(name, std::move(shape), false);
  p.matrix = true;
  return p;
}

bool ParamList::has(const std::string& name) const {
  for (const auto& p : params_)
    if (p.name == name) return true;
  return false;
}

Param& ParamList::get(const std::string& name) {
  for (auto& p : params_)
    if (p.name == name) return p;
  throw Error(str("no parameter named '", name, "'"));
}

const Param& ParamList::get(const std::string& name) const {
  return const_cast<ParamList*>(this)->get(name);
}

int64_t ParamList::count() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.value.numel();
  return n;
}

void ParamList::zero_grad() {
  for (auto& p : params_)
    if (p.has_grad()) p.grad().zero();
}

void ParamList::allocate_grads() {
  for (auto& p : params_) p.grad();
}

int64_t ParamList::grad_bytes() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.grad_bytes();
  return n;
}

void ParamList::set_weight_dtype(WeightDType t) {
  for (auto& p : params_) {
    if (!p.matrix) continue;
    // A block format needs rows of whole blocks; other matrices (Mamba-1's dt_proj, rank 48)
    // stay fp32 (param.h).
    const WeightDType tp = p.value.cols() % weight_block_size(t) == 0 ? t : WeightDType::f32;
    if (p.value.dtype() == tp) continue;
    p.value.set_dtype(tp, p.name);  // one at a time: only one matrix is held in two formats
    p.release_grad();
  }
}

WeightDType ParamList::weight_dtype() const {
  for (const auto& p : params_)
    if (p.matrix && !p.value.is_f32()) return p.value.dtype();
  return WeightDType::f32;
}

void ParamList::check_f32(const char* what) const {
  for (const auto& p : params_)
    MAMBA_CHECK(p.value.is_f32(), what, ": weights are ", weight_dtype_name(p.value.dtype()),
                ": inference only; load in f32 to train (", p.name, ")");
}

void ParamList::load(const SafetensorsFile& f, const std::string& prefix) {
  for (auto& p : params_) f.read_into(prefix + p.name, p.value);  // checks the shape
}

void ParamList::load(const std::map<std::string, Tensor>& tensors, const std::string& prefix) {
  for (auto& p : params_) {
    auto it = tensors.find(prefix + p.name);
    MAMBA_CHECK(it != tensors.end(), "missing tensor '", prefix + p.name, "'");
    MAMBA_CHECK(it->second.shape() == p.value.shape(), "tensor '", prefix + p.name, "' has shape ",
                it->second.shape_str(), ", expected ", p.value.shape_str());
    p.value.assign(it->second);
  }
}

std::vector<std::pair<std::string, Tensor>> ParamList::named(const std::string& prefix) const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& p : params_) out.emplace_back(prefix + p.name, p.value.to_f32());
  return out;
}

std::vector<std::pair<std::string, Tensor>> ParamList::named_grads(
    const std::string& prefix) const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (const auto& p : params_)
    out.emplace_back(prefix + p.name,
                     p.has_grad() ? p.grad_if_allocated() : Tensor(p.value.shape()));
  return out;
}

}  // namespace mamba
