// Weight: the storage of one parameter tensor. fp32 (a Tensor: trainable), bf16 / f16 (16-bit
// values, rounded to nearest even: inference only), or q8_0 / q4_0 (ggml's block-quantised
// formats, byte for byte as GGUF stores them: inference only). The layers never see the format:
// they call ops::linear / ops::embedding_fwd on a Weight and the op picks the kernel.
//
// Quantised formats: each row is cut into blocks of 32 values (a row length that is not a
// multiple of 32 cannot be stored: an error naming the tensor). A block is an f16 scale d (2
// bytes, little-endian) followed by
//   q8_0: 32 int8 q, value = d * q                                       (34 bytes per block)
//   q4_0: 16 bytes; byte j holds element j in its low nibble and element j + 16 in its high
//         nibble, value = d * (nibble - 8)                               (18 bytes per block)
// Quantisation is ggml's reference one (round to nearest): q8_0 d = amax / 127, q = round(x / d)
// (halves away from zero); q4_0 d = max / -8 with max the value of largest magnitude (its sign
// kept), nibble = min(15, trunc(x / d + 8.5)); 1/d is taken from the fp32 d before d is rounded
// to f16. Every dequantised value d * q is exact in fp32.
// The storage is one aligned byte buffer; rows are row_bytes() apart, so rows(r0, n) views work
// for every format (a block never spans two rows).
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
  q8_0,  // blocks of 32: f16 scale + 32 int8 (8.5 bits per value)
  q4_0,  // blocks of 32: f16 scale + 16 bytes of nibbles (4.5 bits per value)
};
const char* weight_dtype_name(WeightDType t);  // "f32", "bf16", "f16", "q8_0", "q4_0"
// Parses "f32" | "bf16" | "f16" | "q8_0" | "q4_0" (also "fp32", "float32", "bfloat16", "fp16",
// "float16", "q8", "q4"); throws mamba::Error naming the value otherwise.
WeightDType parse_weight_dtype(const std::string& s);
// Bytes per element of an element-wise format (4 for f32, 2 for bf16 / f16); throws for a
// quantised one (use weight_row_bytes).
int64_t weight_dtype_size(WeightDType t);
inline bool is_quantised(WeightDType t) { return t == WeightDType::q8_0 || t == WeightDType::q4_0; }
// Values per block: 32 for q8_0 / q4_0, 1 for the element-wise formats.
inline int64_t weight_block_size(WeightDType t) { return is_quantised(t) ? 32 : 1; }
// Bytes of a row of n values (n a multiple of weight_block_size(t)).
int64_t weight_row_bytes(WeightDType t, int64_t n);

// Block quantisation (q8_0 / q4_0 only; n a multiple of 32; throws otherwise, or for a value
// that is not finite). quantise_blocks: ggml's reference rounding (top of this file).
// dequantise_blocks: vectorised, exact. The _ref versions are plain scalar loops (tests).
void quantise_blocks(const float* src, void* dst, int64_t n, WeightDType t);
void dequantise_blocks(const void* src, float* dst, int64_t n, WeightDType t);
void quantise_blocks_ref(const float* src, void* dst, int64_t n, WeightDType t);
void dequantise_blocks_ref(const void* src, float* dst, int64_t n, WeightDType t);
// n values of one row in any format, starting at `row`, as fp32 (exact).
void weight_row_to_f32(const void* row, WeightDType t, int64_t n, float* dst);

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

// The activations of the products with q8_0 / q4_0 weights, process-wide (like set_num_threads;
// set it before running models, not while they run). f32 (the default): x stays fp32 and the
// weights are dequantised, every product in fp32. q8 (opt-in, llama.cpp's numerics): in every
// ops::linear with q8_0 / q4_0 weights (prefill and decode) x is quantised per block of 32 values
// along K to q8_0 (d = max|x| / 127 as f16, q = round(x / d)) and each block's dot product with
// the weight block is an exact integer (AVX-512 VNNI where the CPU has it), scaled by d_w * d_x
// and summed in fp32 (src/ops/gemm_q8.h); a row of x gives the same bits in a decode step as in a
// prefill. It changes nothing for f32 / bf16 / f16 weights.
// bf16 (opt-in, bf16 weights only): in the prefill products (ops::linear with M > 16 rows) x is
// rounded to bf16 (nearest even) and multiplied with the bf16 weight rows by AVX-512 BF16's
// vdpbf16ps, pairs of k at a time, in fp32 (a portable kernel with the same bits elsewhere;
// src/ops/gemm_bf16.h). Decode (M <= 16) keeps fp32 activations. It changes nothing for other
// weight types.
enum class ActivationType { f32, q8, bf16 };
void set_activation_type(ActivationType t);
ActivationType activation_type();
const char* activation_type_name(ActivationType t);  // "f32", "q8", "bf16"
// Parses "f32" | "q8" | "bf16" (also "fp32", "q8_0"); throws mamba::Error naming the value
// otherwise.
ActivationType parse_activation_type(const std::string& s);

class Weight {
 public:
  Weight() = default;              // undefined
  explicit Weight(Tensor values);  // fp32, sharing the tensor's storage (contiguous)
  Weight(const Tensor& values, WeightDType dtype);  // converted copy (fp32: shared)
  static Weight zeros(Shape shape) { return Weight(Tensor::zeros(std::move(shape))); }

  bool defined() const { return f32_.defined() || buf_ != nullptr; }
  WeightDType dtype() const { return dtype_; }
  bool is_f32() const { return dtype_ == WeightDType::f32; }
  const Shape& shape() const { return shape_; }
  int64_t numel() const { return numel_; }
  // As a matrix: rows = shape[0], cols = the product of the other dimensions.
  int64_t rows() const { return shape_.empty() ? 1 : shape_[0]; }
  int64_t cols() const { return rows() ? numel_ / rows() : 0; }
  int64_t row_bytes() const { return weight_row_bytes(dtype_, cols()); }
  int64_t bytes() const { return rows() * row_bytes(); }  // of this view's values
  std::string shape_str() const { return mamba::shape_str(shape_); }

  // The fp32 values (trainable). Throws "…: weights are bf16: inference only; load in f32 to
  // train" when the storage is not fp32 (the same for q8_0 / q4_0). `what` names the caller.
  const Tensor& f32(const char* what = "weight") const;
  Tensor& f32(const char* what = "weight");
  // The values as fp32: the tensor itself when fp32 (shared), an exact converted copy otherwise.
  Tensor to_f32() const;
  // Row r (cols() values) as fp32 into dst.
  void row_to_f32(int64_t r, float* dst) const;
  // Copies values in (shape must equal shape()), rounding into 16-bit storage or quantising.
  void assign(const Tensor& values);
  // Copies this weight's storage bytes in as they are (bytes() of them, in this dtype's layout:
  // e.g. a GGUF tensor of the same type), no conversion.
  void assign_raw(const void* data, int64_t nbytes);
  // Converts in place, releasing the old storage (views made by rows() keep theirs alive).
  // bf16 / f16 round to nearest even; q8_0 / q4_0 quantise (from the exact fp32 values of the
  // current storage); f32 converts back exactly. A quantised dtype needs cols() % 32 == 0:
  // otherwise throws "<what>: q8_0 stores rows of whole blocks of 32 values; shape ... has rows
  // of N values".
  void set_dtype(WeightDType t, const std::string& what = "weight");
  // View of rows [r0, r0 + n) sharing storage: shape (n, ...).
  Weight rows(int64_t r0, int64_t n) const;

  // For kernels: row r's first element (float* for f32, uint16_t* for bf16 / f16, the first
  // block's bytes for q8_0 / q4_0); rows are row_pitch() values (row_bytes() bytes) apart
  // (= cols(): a Weight is contiguous).
  const void* row_ptr(int64_t r) const;
  int64_t row_pitch() const { return cols(); }

 private:
  WeightDType dtype_ = WeightDType::f32;
  Shape shape_;
  int64_t numel_ = 0;
  Tensor f32_;                    // dtype f32
  std::shared_ptr<uint8_t> buf_;  // other dtypes (64-byte aligned), from offset_ bytes on
  int64_t offset_ = 0;
};

}  // namespace mamba
