// Element-wise activations with their derivatives (vectorised with Highway).
//   silu(x) = x * sigmoid(x);  softplus(x) = log1p(exp(x)), = x for x > 20 (torch's threshold)
#pragma once
#include <cmath>
#include <cstdint>

#include "mamba/tensor.h"

namespace mamba::ops {

void silu(const float* x, float* y, int64_t n);
// dx = dy * silu'(x)
void silu_bwd(const float* x, const float* dy, float* dx, int64_t n);
void softplus(const float* x, float* y, int64_t n);
// dx = dy * sigmoid(x) (= dy for x > 20)
void softplus_bwd(const float* x, const float* dy, float* dx, int64_t n);
void exp_inplace(float* x, int64_t n);

Tensor silu(const Tensor& x);
Tensor silu_bwd(const Tensor& x, const Tensor& dy);  // dy * silu'(x), same shape
Tensor softplus(const Tensor& x);

// Scalar references (the spec).
inline float silu_ref(float x) { return x / (1.f + std::exp(-x)); }
inline float softplus_ref(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }

}  // namespace mamba::ops
