// safetensors: read (every byte treated as hostile: bounds-checked, size-limited) and write
// (atomically). Float tensors (F32/F16/BF16) load as fp32; integer tensors as int64.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "mamba/tensor.h"
#include "mamba/weight.h"

namespace mamba {

struct SafetensorInfo {
  std::string dtype;  // "F32", "F16", "BF16", "I64", "I32", ...
  Shape shape;
  uint64_t begin = 0, end = 0;  // byte offsets into the data section
};

class SafetensorsFile {
 public:
  // Memory-maps the file (os::MappedFile): tensors are converted from the map on demand.
  static SafetensorsFile open(const std::string& path);
  static SafetensorsFile parse(std::vector<uint8_t> bytes, const std::string& origin);

  bool has(const std::string& name) const { return info_.count(name) != 0; }
  std::vector<std::string> names() const;  // in file order
  const SafetensorInfo& info(const std::string& name) const;
  // fp32 copy of a float tensor; throws for a missing name or a non-float dtype.
  Tensor tensor(const std::string& name) const;
  // The same, and checks the shape (the message names the tensor, expected and actual).
  Tensor tensor(const std::string& name, const Shape& expected) const;
  std::vector<int64_t> tensor_i64(const std::string& name, Shape* shape = nullptr) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::string meta(const std::string& key) const;  // throws if missing
  const std::string& origin() const { return origin_; }

 private:
  static SafetensorsFile parse_view(std::shared_ptr<const void> keep, const uint8_t* data,
                                    uint64_t size, const std::string& origin);
  std::shared_ptr<const void> keep_;  // owns the bytes: a memory map or a vector
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  uint64_t data_start_ = 0;
  std::string origin_;
  std::map<std::string, SafetensorInfo> info_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

// Writes F32 tensors in the given order, with string metadata, atomically.
void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// bf16_to_f32, f16_to_f32, f32_to_bf16, f32_to_f16: in mamba/weight.h (core).

}  // namespace mamba
