// PyTorch checkpoint reader: the zip + pickle format torch.save writes since torch 1.6
// (pytorch_model.bin), for state dicts of tensors only. Every byte is treated as hostile:
// zip offsets and sizes are bounds-checked (zip64 included), compressed or encrypted
// entries are refused, and the pickle runs in a small VM that knows only the opcodes
// torch.save emits for a state dict and only these globals:
//   collections.OrderedDict, torch._utils._rebuild_tensor_v2, torch._utils._rebuild_parameter,
//   torch.{Float,Half,BFloat16,Double,Long,Int,Short,Char,Byte,Bool}Storage.
// Any other global (os.system, builtins.eval, ...) is refused with an error naming it;
// nothing in the file is ever executed.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "mamba/tensor.h"

namespace mamba {

struct TorchStateDict {
  // Float tensors (float32/float16/bfloat16/float64 storages), converted to fp32.
  std::map<std::string, Tensor> tensors;
  // Integer and bool tensors (int64/int32/int16/int8/uint8/bool storages), as int64.
  struct IntTensor {
    Shape shape;
    std::vector<int64_t> values;
  };
  std::map<std::string, IntTensor> int_tensors;
  // Every entry's storage dtype as torch names it: "float32", "float16", "bfloat16", "int64", ...
  std::map<std::string, std::string> dtypes;
  std::vector<std::string> order;  // keys in the order the pickle stored them
};

// Reads a torch.save'd state dict (the file, or its bytes; `origin` names it in errors).
TorchStateDict read_torch_state_dict(const std::string& path);
TorchStateDict parse_torch_state_dict(const std::vector<uint8_t>& bytes, const std::string& origin);
TorchStateDict parse_torch_state_dict(const uint8_t* bytes, size_t size, const std::string& origin);
// Only the float tensors, as fp32 (integer tensors are left out).
std::map<std::string, Tensor> load_torch_state_dict(const std::string& path);

}  // namespace mamba
