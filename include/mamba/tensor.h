// Tensor: a row-major fp32 array with a shape, shared storage and checked views.
// Copies are shallow (they share storage); clone() copies the data.
//
// Views: reshape / select / narrow (dim 0) stay contiguous. cols(c0, n) narrows the last
// dimension: the result is a strided 2-D view, gemma.cpp-style: all leading dimensions flattened
// to rows of row_len() contiguous values, rows row_stride() elements apart. data() and
// operator[] on a non-contiguous view throw mamba::Error (an op that has not been taught strides
// can never read the wrong memory); ops that handle strides use view_data() + row_stride(), the
// others take contiguous() (a copy) explicitly.
#pragma once
#include <cstdint>
#include <functional>
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
  Tensor() = default;            // undefined (an absent optional input)
  explicit Tensor(Shape shape);  // zero-initialised
  static Tensor zeros(Shape shape) { return Tensor(std::move(shape)); }
  static Tensor empty(Shape shape);  // uninitialised (fast)
  static Tensor full(Shape shape, float value);
  static Tensor from(Shape shape, const std::vector<float>& values);
  // External memory (a numpy array, a server buffer, a mapped file): no copy. `deleter` runs once
  // when the last tensor sharing it goes away (an empty deleter: the caller keeps ownership and
  // must keep ptr alive as long as any view of it).
  static Tensor wrap(float* ptr, Shape shape, std::function<void(float*)> deleter = {});

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;  // negative i counts from the end
  int64_t numel() const { return numel_; }
  std::string shape_str() const { return mamba::shape_str(shape_); }

  // Contiguous tensors only (throws for an undefined tensor or a strided view).
  float* data() { return ptr(); }
  const float* data() const { return ptr(); }
  float& operator[](int64_t i) { return ptr()[i]; }
  float operator[](int64_t i) const { return ptr()[i]; }

  // Strided 2-D access for ops that handle strides: element (r, c) of the (rows(), row_len())
  // matrix is view_data()[r * row_stride() + c]. For a contiguous tensor row_len() is the last
  // dimension (1 for a 0-d tensor) and row_stride() == row_len().
  bool is_contiguous() const { return row_stride_ == 0; }
  float* view_data() const;
  int64_t row_len() const;
  int64_t rows() const {
    const int64_t n = row_len();
    return n ? numel_ / n : 0;
  }
  int64_t row_stride() const { return row_stride_ ? row_stride_ : row_len(); }

  Tensor reshape(Shape shape) const;  // same storage; numel must match (-1 allowed once);
                                      // a strided view keeps its rows (row_len() must be
                                      // the product of trailing dimensions of shape)
  Tensor select(int64_t i) const;     // view of index i along dim 0: (d0, ...) -> (...)
  Tensor narrow(int64_t start, int64_t len) const;  // view of rows [start, start+len) of dim 0
  // View of the last dimension's [c0, c0 + n): (..., W) -> (..., n), rows W apart (contiguous
  // when n == W). The last dimension must be row_len() (not split by a reshape).
  Tensor cols(int64_t c0, int64_t n) const;
  Tensor contiguous() const;  // *this when contiguous, else a packed copy
  Tensor clone() const;       // a packed copy
  void zero();                // these three handle strided views
  void fill(float v);
  void copy_from(const Tensor& other);  // shapes must be equal; either may be strided

 private:
  // inline: element access sits in per-element loops (it was 2-4% of a training step out of line);
  // one combined branch for "undefined" and "strided view".
  float* ptr() const {
    if (!storage_ || row_stride_) [[unlikely]]
      throw_not_contiguous();
    return storage_.get() + offset_;
  }
  [[noreturn]] void throw_not_contiguous() const;
  std::shared_ptr<float> storage_;  // 64-byte aligned allocation (or wrapped memory)
  int64_t offset_ = 0;
  int64_t numel_ = 0;
  int64_t row_len_ = 0;     // strided views: contiguous values per row
  int64_t row_stride_ = 0;  // 0: contiguous; else elements between rows
  Shape shape_;
};

// Throws mamba::Error unless t has exactly `expected` (entries of -1 match any size).
// `what` names the tensor in the message, e.g. "selective_scan: delta".
void check_shape(const Tensor& t, const char* what, const Shape& expected);
void check_defined(const Tensor& t, const char* what);
// Throws if any element is NaN or infinite; names the tensor and the first bad index.
void check_finite(const Tensor& t, const char* what);

}  // namespace mamba
