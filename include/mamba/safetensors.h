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
  // Converts a float tensor straight into `dst` (its shape must be the tensor's): an fp32
  // destination is written once from the file's bytes, with no intermediate tensor; a 16-bit one
  // is rounded from one fp32 copy of this tensor. Loading a model copies each tensor once.
  void read_into(const std::string& name, Weight& dst) const;
  // For a memory-mapped file: drops the whole pages inside the tensor's bytes from this
  // process's resident memory (the kernel's page cache keeps them; reading maps them again).
  // After read_into, so that loading holds the model and at most one tensor of the file, not
  // the model and the whole file. No-op for a file read into memory.
  void release_pages(const std::string& name) const;
  std::vector<int64_t> tensor_i64(const std::string& name, Shape* shape = nullptr) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  std::string meta(const std::string& key) const;  // throws if missing
  const std::string& origin() const { return origin_; }

 private:
  // The float tensor `name` (n elements, as its info says) converted to fp32 into out.
  void convert(const std::string& name, float* out, int64_t n) const;
  static SafetensorsFile parse_view(std::shared_ptr<const void> keep, const uint8_t* data,
                                    uint64_t size, const std::string& origin);
  std::shared_ptr<const void> keep_;  // owns the bytes: a memory map or a vector
  const void* map_ = nullptr;         // the os::MappedFile when keep_ is one
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
