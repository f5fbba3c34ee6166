// Linear layer: y = x W^T + b through the BLAS.
//   x: (..., in); W: (out, in) (PyTorch's nn.Linear layout); b: (out) optional; y: (..., out)
#pragma once
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

Tensor linear_fwd(const Tensor& x, const Tensor& W, const Tensor& b);
// Returns dx (..., in) = dy W. Accumulates dW += dy^T x (out, in) and db += sum(dy) (out)
// when the pointers are not null (parameter gradients accumulate, see ARCHITECTURE.md).
Tensor linear_bwd(const Tensor& x, const Tensor& W, const Tensor& dy, Tensor* dW, Tensor* db);
Tensor linear_ref(const Tensor& x, const Tensor& W, const Tensor& b);
// The reference evaluated and returned in double (y's element order), for finite differences.
std::vector<double> linear_ref_f64(const Tensor& x, const Tensor& W, const Tensor& b);

}  // namespace mamba::ops
