// GELU with the exact erf (torch.nn.GELU(approximate="none"), VMamba's MLP activation):
//   gelu(x)  = 0.5 x (1 + erf(x / sqrt(2)))
//   gelu'(x) = 0.5 (1 + erf(x / sqrt(2))) + x exp(-x^2 / 2) / sqrt(2 pi)
// NaN in, NaN out.
#pragma once
#include <cmath>

#include "mamba/tensor.h"

namespace mamba::ops {

Tensor gelu(const Tensor& x);                        // same shape (any; contiguous copy if strided)
Tensor gelu_bwd(const Tensor& x, const Tensor& dy);  // dy * gelu'(x), same shape
// Scalar references (the spec), templated so the tests evaluate them in double.
template <class T>
T gelu_ref(T x) {
  return T(0.5) * x * (T(1) + std::erf(x / std::sqrt(T(2))));
}
template <class T>
T gelu_grad_ref(T x) {
  const T kInvSqrt2Pi = T(0.398942280401432677939946059934);
  return T(0.5) * (T(1) + std::erf(x / std::sqrt(T(2)))) +
         x * std::exp(-x * x / T(2)) * kInvSqrt2Pi;
}

}  // namespace mamba::ops
