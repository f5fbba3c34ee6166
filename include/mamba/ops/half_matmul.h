// 16-bit weight storage (bf16 or f16) for inference, with fp32 accumulation.
//   HalfWeight W (rows, cols): a row-major matrix of 16-bit values, converted from fp32 with round
//   to nearest even (bf16 keeps NaN as a quiet NaN; f16 overflows to +-inf).
//   half_matmul: y (M, n) = x (M, cols) W[r0 : r0 + n, :]^T, every product and sum in fp32.
// Small M (decode, batched decode): one pass over the weight rows, each row converted in registers
// and multiplied with all M inputs (the weights are read once: decode is bound by their bytes).
// Large M (prefill): ops::xwt (the packed kernel converts rows as it packs them; compute bound).
// Inference only: there is no backward; layers holding 16-bit weights refuse to train.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "mamba/tensor.h"

namespace mamba {

// Storage type of the large weight matrices (projections, embedding / lm_head).
enum class WeightDType { f32, bf16, f16 };
const char* weight_dtype_name(WeightDType t);  // "f32", "bf16", "f16"
// Parses "f32" | "bf16" | "f16" (also "fp32", "float32", "bfloat16", "fp16", "float16");
// throws mamba::Error naming the value otherwise.
WeightDType parse_weight_dtype(const std::string& s);

namespace ops {

// Scalar conversions (round to nearest even). kind must be bf16 or f16.
uint16_t f32_to_half(float v, WeightDType kind);
float half_to_f32(uint16_t h, WeightDType kind);
// Array conversions: dst[i] = convert(src[i]), i < n (from_half vectorised: it runs on every
// prefill; to_half once per weight, threaded).
void to_half(const float* src, uint16_t* dst, int64_t n, WeightDType kind);
void from_half(const uint16_t* src, float* dst, int64_t n, WeightDType kind);

// A (rows, cols) row-major matrix of 16-bit values (64-byte aligned). Copies share storage.
class HalfWeight {
 public:
  HalfWeight() = default;  // undefined (the layer's weights are fp32)
  // W: (rows, cols) fp32 -> rounded to `kind` (bf16 or f16).
  HalfWeight(const Tensor& W, WeightDType kind);

  bool defined() const { return storage_ != nullptr; }
  WeightDType kind() const { return kind_; }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }
  int64_t bytes() const { return rows_ * cols_ * 2; }
  const uint16_t* data() const { return storage_.get(); }
  const uint16_t* row(int64_t r) const { return storage_.get() + r * cols_; }
  // The values as fp32 (exact: every 16-bit value is representable): (rows, cols).
  Tensor to_f32() const;
  // Row r as fp32 into dst (cols).
  void row_to_f32(int64_t r, float* dst) const;

 private:
  std::shared_ptr<uint16_t> storage_;
  WeightDType kind_ = WeightDType::f32;
  int64_t rows_ = 0, cols_ = 0;
};

// y (M, n), leading dimension ldy >= n, = x (M, cols), leading dimension ldx >= cols, times
// W[r0 : r0 + n, :]^T. fp32 accumulation. Throws on a bad row range or leading dimension.
void half_matmul(const float* x, int64_t M, int64_t ldx, const HalfWeight& W, int64_t r0, int64_t n,
                 float* y, int64_t ldy);
// The reference: plain loops, double accumulation, same arguments.
void half_matmul_ref(const float* x, int64_t M, int64_t ldx, const HalfWeight& W, int64_t r0,
                     int64_t n, float* y, int64_t ldy);
// Largest M that takes the streaming (GEMV-like) kernel; larger M goes to ops::xwt.
constexpr int64_t kHalfGemvMaxM = 16;

// Moves one weight matrix between its fp32 storage (the parameter's value, its gradient and the
// layer's view of it, sharing storage) and the 16-bit h. t = bf16 / f16: h = rounded values and
// value, grad, view become undefined (their memory is released). t = f32: the exact fp32 values
// of h (or the current fp32 value) in value and view, a zero grad, h undefined.
void move_weight_storage(Tensor& value, Tensor& grad, Tensor& view, HalfWeight& h, WeightDType t);

// Linear layer on 16-bit weights: x (..., cols) -> (..., rows) = x W^T + b (b (rows) optional).
Tensor half_linear(const Tensor& x, const HalfWeight& W, const Tensor& b);

// The layers' projections, whichever storage is active: the 16-bit kernel when Wh is defined,
// otherwise mamba::gemm on the fp32 Wf (rows, cols).
//   y (M, n) [ldy] = x (M, cols) [ldx] W[r0 : r0 + n]^T
void matmul_wt(const float* x, int64_t M, int64_t ldx, const Tensor& Wf, const HalfWeight& Wh,
               int64_t r0, int64_t n, float* y, int64_t ldy);
// x (..., cols) -> (..., rows) = x W^T + b with W = Wh if defined, else Wf (ops::linear_fwd).
Tensor linear_any(const Tensor& x, const Tensor& Wf, const HalfWeight& Wh, const Tensor& b);

}  // namespace ops
}  // namespace mamba
