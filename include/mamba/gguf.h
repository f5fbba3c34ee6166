// GGUF (ggml's single-file model format, as llama.cpp writes it): read and write.
//
// Reading treats every byte as hostile: every count, length, dimension and offset is checked
// against the bytes that are actually there (and against overflow) before anything is
// allocated; arrays of arrays, duplicate keys or tensor names, misaligned or overlapping tensor
// data and unknown value types are a mamba::Error naming the offending key or tensor.
// Versions 2 and 3 (64-bit counts) are read; version 3 is written.
//
// Tensor shapes: GGUF lists a tensor's dimensions fastest first (ggml's ne[0] is the row
// length); GGUFTensorInfo::shape is the PyTorch order (the reverse), so a (out, in) matrix has
// shape {out, in} here and ne {in, out} in the file.
//
// Element types read: F32, F16, BF16, Q8_0, Q4_0, and (dequantised only) Q5_0, Q4_K, Q6_K, the
// types llama-quantize puts into its Q4_0 / Q4_K_M files beside the main type (tensor()
// dequantises to fp32; raw() gives the bytes as stored, which MambaLM::load_gguf copies as they
// are into a weight of the same type). Other ggml types (Q4_1, Q5_1, Q2_K, Q3_K, Q5_K, IQ*, ...)
// are listed by name but tensor() refuses them with an error naming the type.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "mamba/tensor.h"

namespace mamba {

// ggml's tensor element types (the numbers are the file's).
// Q5_0 / Q4_K / Q6_K are read only (dequantised); the writer stores F32, F16, BF16, Q8_0, Q4_0.
enum class GGMLType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q5_0 = 6,
  Q8_0 = 8,
  Q4_K = 12,
  Q6_K = 14,
  BF16 = 30
};
// The name of any ggml type number ("Q4_K", "IQ2_XS", ...; "type 99" for an unknown one).
std::string ggml_type_name(uint32_t type);
// Parses "f32" | "f16" | "bf16" | "q8_0" | "q4_0" (case-insensitive); throws otherwise.
GGMLType parse_ggml_type(const std::string& s);

// GGUF metadata value types (the numbers are the file's).
enum class GGUFType : uint32_t {
  U8 = 0,
  I8 = 1,
  U16 = 2,
  I16 = 3,
  U32 = 4,
  I32 = 5,
  F32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  U64 = 10,
  I64 = 11,
  F64 = 12,
};

// One metadata value. Scalars: integer types in i (u for U64 values above INT64_MAX), floats in
// f, bools in i (0/1), strings in s. Arrays: elem is the element type and strs / ints / floats
// hold the elements (one of them, by elem; BOOL elements in ints).
struct GGUFValue {
  GGUFType type = GGUFType::U8;
  GGUFType elem = GGUFType::U8;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string s;
  std::vector<std::string> strs;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  uint64_t array_size() const;
};

struct GGUFTensorInfo {
  uint32_t type = 0;        // ggml type number
  std::vector<int64_t> ne;  // the file's dimensions, fastest first
  Shape shape;              // the PyTorch order (ne reversed)
  uint64_t offset = 0;      // into the data section
  uint64_t nbytes = 0;      // bytes of its data
};

class GGUFFile {
 public:
  // Memory-maps the file; tensors are converted from the map on demand.
  static GGUFFile open(const std::string& path);
  static GGUFFile parse(std::vector<uint8_t> bytes, const std::string& origin);

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::string& origin() const { return origin_; }

  bool has_key(const std::string& key) const { return kv_.count(key) != 0; }
  const GGUFValue& value(const std::string& key) const;  // throws if missing
  std::vector<std::string> keys() const;                 // in file order
  // Typed getters; each throws naming the key when it is missing or of another kind.
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;   // any integer type (and BOOL)
  double get_float(const std::string& key) const;  // F32 / F64 (and integers)
  bool get_bool(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t dflt) const {
    return has_key(key) ? get_int(key) : dflt;
  }
  const std::vector<std::string>& get_strings(const std::string& key) const;
  const std::vector<int64_t>& get_ints(const std::string& key) const;

  bool has(const std::string& name) const { return info_.count(name) != 0; }
  std::vector<std::string> names() const { return order_; }  // in file order
  const GGUFTensorInfo& info(const std::string& name) const;
  // fp32 copy of a tensor in the PyTorch order (dequantised for Q8_0 / Q4_0); throws for a
  // missing name or an unsupported type (naming it).
  Tensor tensor(const std::string& name) const;
  // The tensor's bytes as stored (info(name).nbytes of them, in its ggml type's layout).
  const uint8_t* raw(const std::string& name) const;

 private:
  static GGUFFile parse_view(std::shared_ptr<const void> keep, const uint8_t* data, uint64_t size,
                             const std::string& origin);
  std::shared_ptr<const void> keep_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0, data_start_ = 0, alignment_ = 32;
  uint32_t version_ = 0;
  std::string origin_;
  std::map<std::string, GGUFValue> kv_;
  std::vector<std::string> kv_order_;
  std::map<std::string, GGUFTensorInfo> info_;
  std::vector<std::string> order_;
};

// Bytes of n elements of a type (n a multiple of its block size: 32 for Q8_0 / Q4_0 / Q5_0, 256
// for Q4_K / Q6_K).
uint64_t ggml_nbytes(GGMLType t, int64_t n);
int64_t ggml_block_size(GGMLType t);  // 1, 32 (Q8_0 / Q4_0 / Q5_0) or 256 (Q4_K / Q6_K)
// Element conversion (ggml's reference rounding for Q8_0 / Q4_0: per block of 32, d = amax/127
// (Q8_0) or d = max/-8 with max the signed value of largest magnitude (Q4_0), stored as f16).
// ggml_quantize writes F32 / F16 / BF16 / Q8_0 / Q4_0 and refuses the read-only types.
std::vector<uint8_t> ggml_quantize(GGMLType t, const float* x, int64_t n);
// Any type of GGMLType; n a whole number of blocks.
void ggml_dequantize(GGMLType t, const uint8_t* src, int64_t n, float* out);

// Writes a GGUF v3 file (atomically): metadata in the order added, then the tensors.
class GGUFWriter {
 public:
  void add_string(const std::string& key, const std::string& v);
  void add_u32(const std::string& key, uint32_t v);
  void add_i32(const std::string& key, int32_t v);
  void add_f32(const std::string& key, float v);
  void add_bool(const std::string& key, bool v);
  void add_strings(const std::string& key, const std::vector<std::string>& v);
  void add_i32s(const std::string& key, const std::vector<int32_t>& v);
  // t in the PyTorch order (stored with its dimensions reversed), converted to `type`.
  void add_tensor(const std::string& name, const Tensor& t, GGMLType type);
  void write(const std::string& path) const;

 private:
  void key(const std::string& k, GGUFType type);
  std::vector<uint8_t> meta_;
  uint64_t n_kv_ = 0;
  struct T {
    std::string name;
    std::vector<int64_t> ne;
    GGMLType type;
    std::vector<uint8_t> data;
  };
  std::vector<T> tensors_;
  std::vector<std::string> keys_;
};

}  // namespace mamba
