// Tensor: a contiguous, row-major fp32 array with a shape, shared storage and checked views.
// Copies are shallow (they share storage); clone() copies the data.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "mamba/error.h"

namespace mamba {

using Shape = std::vector<int64_t>;

std::string shape_str(const Shape& s);  // "(2,32,16)"
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;                       // undefined (an absent optional input)
  explicit Tensor(Shape shape);             // zero-initialised
  static Tensor zeros(Shape shape) { return Tensor(std::move(shape)); }
  static Tensor empty(Shape shape);         // uninitialised (fast)
  static Tensor full(Shape shape, float value);
  static Tensor from(Shape shape, const std::vector<float>& values);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;                 // negative i counts from the end
  int64_t numel() const { return numel_; }
  std::string shape_str() const { return mamba::shape_str(shape_); }

  float* data() { return ptr(); }
  const float* data() const { return ptr(); }
  float& operator[](int64_t i) { return ptr()[i]; }
  float operator[](int64_t i) const { return ptr()[i]; }

  Tensor reshape(Shape shape) const;        // same storage; numel must match (-1 allowed once)
  Tensor select(int64_t i) const;           // view of index i along dim 0: (d0, ...) -> (...)
  Tensor narrow(int64_t start, int64_t len) const;  // view of rows [start, start+len) of dim 0
  Tensor clone() const;
  void zero();
  void fill(float v);
  void copy_from(const Tensor& other);      // shapes must be equal

 private:
  // inline: element access sits in per-element loops (it was 2-4% of a training step out of line)
  float* ptr() const {
    if (!storage_) [[unlikely]]
      throw_undefined();
    return storage_.get() + offset_;
  }
  [[noreturn]] static void throw_undefined();
  std::shared_ptr<float> storage_;          // 64-byte aligned allocation
  int64_t offset_ = 0;
  int64_t numel_ = 0;
  Shape shape_;
};

// Throws mamba::Error unless t has exactly `expected` (entries of -1 match any size).
// `what` names the tensor in the message, e.g. "selective_scan: delta".
void check_shape(const Tensor& t, const char* what, const Shape& expected);
void check_defined(const Tensor& t, const char* what);
// Throws if any element is NaN or infinite; names the tensor and the first bad index.
void check_finite(const Tensor& t, const char* what);

}  // namespace mamba
