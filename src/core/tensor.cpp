#include "mamba/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

namespace mamba {

std::string shape_str(const Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ",";
    out += std::to_string(s[i]);
  }
  return out + ")";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    MAMBA_CHECK(d >= 0, "negative dimension in shape ", shape_str(s));
    MAMBA_CHECK(d == 0 || n <= INT64_MAX / d, "shape ", shape_str(s), " overflows");
    n *= d;
  }
  return n;
}

namespace {
constexpr size_t kAlign = 64;
std::shared_ptr<float> allocate(int64_t n) {
  size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float);
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = ::operator new(bytes, std::align_val_t(kAlign));
  return std::shared_ptr<float>(static_cast<float*>(p),
                                [](float* q) { ::operator delete(q, std::align_val_t(kAlign)); });
}
}  // namespace

Tensor Tensor::empty(Shape shape) {
  Tensor t;
  t.numel_ = shape_numel(shape);
  t.shape_ = std::move(shape);
  t.storage_ = allocate(t.numel_);
  return t;
}

Tensor::Tensor(Shape shape) : Tensor(empty(std::move(shape))) { zero(); }

Tensor Tensor::full(Shape shape, float value) {
  Tensor t = empty(std::move(shape));
  t.fill(value);
  return t;
}

Tensor Tensor::from(Shape shape, const std::vector<float>& values) {
  Tensor t = empty(std::move(shape));
  MAMBA_CHECK(static_cast<int64_t>(values.size()) == t.numel_, "Tensor::from: ", values.size(),
              " values for shape ", t.shape_str());
  std::copy(values.begin(), values.end(), t.data());
  return t;
}

void Tensor::throw_undefined() { throw Error("access to an undefined tensor"); }

int64_t Tensor::dim(int i) const {
  int n = ndim();
  int j = i < 0 ? i + n : i;
  MAMBA_CHECK(j >= 0 && j < n, "dim ", i, " out of range for shape ", shape_str());
  return shape_[j];
}

Tensor Tensor::reshape(Shape shape) const {
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MAMBA_CHECK(infer < 0, "reshape: more than one -1 in ", mamba::shape_str(shape));
      infer = static_cast<int>(i);
    } else {
      MAMBA_CHECK(shape[i] >= 0, "reshape: bad shape ", mamba::shape_str(shape));
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    MAMBA_CHECK(known > 0 && numel_ % known == 0, "reshape: cannot view ", shape_str(), " as ",
                mamba::shape_str(shape));
    shape[infer] = numel_ / known;
  }
  MAMBA_CHECK(shape_numel(shape) == numel_, "reshape: cannot view ", shape_str(), " as ",
              mamba::shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::narrow(int64_t start, int64_t len) const {
  MAMBA_CHECK(ndim() >= 1, "narrow on a 0-d tensor");
  MAMBA_CHECK(start >= 0 && len >= 0 && start + len <= shape_[0], "narrow [", start, ", ",
              start + len, ") out of range for shape ", shape_str());
  int64_t inner = shape_[0] ? numel_ / shape_[0] : 0;
  Tensor t = *this;
  t.shape_[0] = len;
  t.offset_ += start * inner;
  t.numel_ = len * inner;
  return t;
}

Tensor Tensor::select(int64_t i) const {
  Tensor t = narrow(i, 1);
  t.shape_.erase(t.shape_.begin());
  return t;
}

Tensor Tensor::clone() const {
  if (!defined()) return Tensor();
  Tensor t = empty(shape_);
  if (numel_) std::memcpy(t.data(), data(), numel_ * sizeof(float));
  return t;
}

void Tensor::zero() {
  if (numel_) std::memset(data(), 0, numel_ * sizeof(float));
}

void Tensor::fill(float v) { std::fill(data(), data() + numel_, v); }

void Tensor::copy_from(const Tensor& other) {
  MAMBA_CHECK(shape_ == other.shape_, "copy_from: shape ", other.shape_str(), " into ",
              shape_str());
  if (numel_) std::memmove(data(), other.data(), numel_ * sizeof(float));
}

void check_defined(const Tensor& t, const char* what) {
  MAMBA_CHECK(t.defined(), what, ": tensor is required but was not given");
}

void check_shape(const Tensor& t, const char* what, const Shape& expected) {
  check_defined(t, what);
  bool ok = t.ndim() == static_cast<int>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i)
    ok = expected[i] == -1 || expected[i] == t.shape()[i];
  if (!ok) {
    std::string e = "(";
    for (size_t i = 0; i < expected.size(); ++i) {
      if (i) e.push_back(',');
      e.append(expected[i] == -1 ? std::string("*") : std::to_string(expected[i]));
    }
    throw Error(str(what, ": expected shape ", e, ")", ", got ", t.shape_str()));
  }
}

void check_finite(const Tensor& t, const char* what) {
  check_defined(t, what);
  const float* p = t.data();
  for (int64_t i = 0; i < t.numel(); ++i)
    MAMBA_CHECK(std::isfinite(p[i]), what, ": non-finite value ", p[i], " at flat index ", i,
                " of shape ", t.shape_str());
}

}  // namespace mamba
