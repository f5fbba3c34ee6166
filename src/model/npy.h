// NumPy .npy files (format versions 1.0, 2.0 and 3.0), little-endian float32 / int64 / int32
// in C order: how token ids come in and logits go out (`mambacpp score`). Every header byte
// is treated as hostile; anything else (big-endian, Fortran order, object arrays, other
// dtypes) is refused with an error naming the file and the field.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "mamba/tensor.h"

namespace mamba {

struct NpyArray {
  std::string dtype;          // "<f4", "<i8" or "<i4"
  Shape shape;                // () for a scalar
  std::vector<uint8_t> data;  // numel * itemsize bytes, little-endian, C order
  int64_t numel() const { return shape_numel(shape); }
};

NpyArray read_npy(const std::string& path);
NpyArray parse_npy(const std::vector<uint8_t>& bytes, const std::string& origin);
// Serialises (version 1.0, header padded to 64 bytes as numpy does); dtype one of the three.
std::vector<uint8_t> encode_npy(const NpyArray& a);

// Writes atomically (mamba::os::write_file_atomic).
void write_npy(const std::string& path, const Tensor& t);  // '<f4', shape of t
void write_npy_i64(const std::string& path, const Shape& shape, const std::vector<int64_t>& values);

// Contents: float32 arrays as a Tensor (other dtypes throw); integer arrays ('<i8' or '<i4')
// as int64 (float arrays throw).
Tensor npy_to_tensor(const NpyArray& a, const std::string& what = "npy");
std::vector<int64_t> npy_to_i64(const NpyArray& a, const std::string& what = "npy");

}  // namespace mamba
