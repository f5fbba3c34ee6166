// Weight: the storage of one parameter tensor. fp32 (a Tensor: trainable), or bf16 / f16
// (16-bit values, rounded to nearest even: inference only). The layers never see the format:
// they call ops::linear / ops::embedding_fwd on a Weight and the op picks the kernel.
//
// Where quantised block formats go (q8_0, q4_0, as GGUF stores them): add the enum value below,
// its name in weight_dtype_name / parse_weight_dtype, a block-size rule in Weight::bytes(), the
// conversions in set_dtype / to_f32 / row_to_f32 (src/core/weight.cpp), and the kernels in
// ops::linear (src/ops/linear.cpp). The storage stays one aligned byte buffer with a row pitch
// (row_bytes()), so rows(r0, n) views work for them too (a block never spans two rows).
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "mamba/tensor.h"

namespace mamba {

// Storage type of a weight. Only the large matrices (projections, embedding, lm_head) are ever
// stored below fp32; norms, conv, A_log, D and biases stay fp32.
enum class WeightDType {
  f32,
  bf16,
  f16,
  // q8_0, q4_0: quantised blocks (next; see the top of this file)
};
const char* weight_dtype_name(WeightDType t);  // "f32", "bf16", "f16"
// Parses "f32" | "bf16" | "f16" (also "fp32", "float32", "bfloat16", "fp16", "float16");
// throws mamba::Error naming the value otherwise.
WeightDType parse_weight_dtype(const std::string& s);
// Bytes per element of an element-wise format (4 for f32, 2 for bf16 / f16).
int64_t weight_dtype_size(WeightDType t);

// Scalar conversions, round to nearest even (bf16 keeps NaN as a quiet NaN; f16 overflows to
// +-inf). Every 16-bit value is exactly representable in fp32.
float bf16_to_f32(uint16_t v);
float f16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float f);
uint16_t f32_to_f16(float f);
// The same for kind = bf16 or f16 (throws for another kind).
uint16_t f32_to_half(float v, WeightDType kind);
float half_to_f32(uint16_t h, WeightDType kind);
// Array conversions dst[i] = convert(src[i]), i < n: to_half threaded, from_half vectorised (it
// runs on every 16-bit prefill).
void to_half(const float* src, uint16_t* dst, int64_t n, WeightDType kind);
void from_half(const uint16_t* src, float* dst, int64_t n, WeightDType kind);

class Weight {
 public:
  Weight() = default;              // undefined
  explicit Weight(Tensor values);  // fp32, sharing the tensor's storage (contiguous)
  Weight(const Tensor& values, WeightDType dtype);  // converted copy (fp32: shared)
  static Weight zeros(Shape shape) { return Weight(Tensor::zeros(std::move(shape))); }

  bool defined() const { return f32_.defined() || half_ != nullptr; }
  WeightDType dtype() const { return dtype_; }
  bool is_f32() const { return dtype_ == WeightDType::f32; }
  const Shape& shape() const { return shape_; }
  int64_t numel() const { return numel_; }
  // As a matrix: rows = shape[0], cols = the product of the other dimensions.
  int64_t rows() const { return shape_.empty() ? 1 : shape_[0]; }
  int64_t cols() const { return rows() ? numel_ / rows() : 0; }
  int64_t bytes() const { return numel_ * weight_dtype_size(dtype_); }  // of this view's values
  std::string shape_str() const { return mamba::shape_str(shape_); }

  // The fp32 values (trainable). Throws "…: weights are bf16: inference only; load in f32 to
  // train" when the storage is not fp32. `what` names the caller in the message.
  const Tensor& f32(const char* what = "weight") const;
  Tensor& f32(const char* what = "weight");
  // The values as fp32: the tensor itself when fp32 (shared), an exact converted copy otherwise.
  Tensor to_f32() const;
  // Row r (cols() values) as fp32 into dst.
  void row_to_f32(int64_t r, float* dst) const;
  // Copies values in (shape must equal shape()), rounding into 16-bit storage.
  void assign(const Tensor& values);
  // Converts in place, releasing the old storage (views made by rows() keep theirs alive).
  // bf16 / f16 round to nearest even; f32 converts back exactly.
  void set_dtype(WeightDType t);
  // View of rows [r0, r0 + n) sharing storage: shape (n, ...).
  Weight rows(int64_t r0, int64_t n) const;

  // For kernels: row r's first element (float* for f32, uint16_t* for bf16 / f16); rows are
  // row_pitch() elements apart (= cols(): a Weight is contiguous).
  const void* row_ptr(int64_t r) const;
  int64_t row_pitch() const { return cols(); }

 private:
  WeightDType dtype_ = WeightDType::f32;
  Shape shape_;
  int64_t numel_ = 0;
  Tensor f32_;                      // dtype f32
  std::shared_ptr<uint16_t> half_;  // dtype bf16 / f16 (64-byte aligned), + offset_ elements
  int64_t offset_ = 0;
};

}  // namespace mamba
