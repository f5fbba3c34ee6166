// Element-wise activations, vectorised with Highway and dispatched at run time.
// This file is also the pattern for every Highway kernel: the code between
// HWY_BEFORE_NAMESPACE and HWY_AFTER_NAMESPACE is compiled once per SIMD target, and the vector
// math shared between kernels (exp, sigmoid, softplus, silu: one definition each, one NaN rule)
// comes from the per-target header ops/simd_math-inl.h. Scalar tails use act.h's references.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/act.cpp"
#include "ops/act.h"

#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include "ops/simd_math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace sm = simd_math;  // called qualified: see simd_math-inl.h

void SiluKernel(const float* x, float* y, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(sm::Silu(d, hn::LoadU(d, x + i)), d, y + i);
  for (; i < n; ++i) y[i] = silu_ref(x[i]);
}

void SiluBwdKernel(const float* x, const float* dy, float* dx, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    hn::StoreU(hn::Mul(hn::LoadU(d, dy + i), sm::SiluGrad(d, hn::LoadU(d, x + i))), d, dx + i);
  for (; i < n; ++i) {
    const float s = 1.f / (1.f + std::exp(-x[i]));
    dx[i] = dy[i] * s * (1.f + x[i] * (1.f - s));
  }
}

void SoftplusKernel(const float* x, float* y, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(sm::Softplus(d, hn::LoadU(d, x + i)), d, y + i);
  for (; i < n; ++i) y[i] = softplus_ref(x[i]);
}

void SoftplusBwdKernel(const float* x, const float* dy, float* dx, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    hn::StoreU(hn::Mul(hn::LoadU(d, dy + i), sm::SoftplusGrad(d, hn::LoadU(d, x + i))), d, dx + i);
  for (; i < n; ++i) dx[i] = x[i] > 20.f ? dy[i] : dy[i] / (1.f + std::exp(-x[i]));
}

void ExpKernel(float* x, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(sm::Exp(d, hn::LoadU(d, x + i)), d, x + i);
  for (; i < n; ++i) x[i] = std::exp(x[i]);
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba {
namespace ops {
HWY_EXPORT(SiluKernel);
HWY_EXPORT(SiluBwdKernel);
HWY_EXPORT(SoftplusKernel);
HWY_EXPORT(SoftplusBwdKernel);
HWY_EXPORT(ExpKernel);

void silu(const float* x, float* y, int64_t n) { HWY_DYNAMIC_DISPATCH(SiluKernel)(x, y, n); }
void silu_bwd(const float* x, const float* dy, float* dx, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SiluBwdKernel)(x, dy, dx, n);
}
void softplus(const float* x, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SoftplusKernel)(x, y, n);
}
void softplus_bwd(const float* x, const float* dy, float* dx, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SoftplusBwdKernel)(x, dy, dx, n);
}
void exp_inplace(float* x, int64_t n) { HWY_DYNAMIC_DISPATCH(ExpKernel)(x, n); }

Tensor silu(const Tensor& x) {
  Tensor y = Tensor::empty(x.shape());
  silu(x.data(), y.data(), x.numel());
  return y;
}
Tensor silu_bwd(const Tensor& x, const Tensor& dy) {
  check_shape(dy, "silu_bwd: dy", x.shape());
  Tensor dx = Tensor::empty(x.shape());
  silu_bwd(x.data(), dy.data(), dx.data(), x.numel());
  return dx;
}
Tensor softplus(const Tensor& x) {
  Tensor y = Tensor::empty(x.shape());
  softplus(x.data(), y.data(), x.numel());
  return y;
}
}  // namespace ops

const char* simd_target_name() {
  const int64_t bits = HWY_TARGETS & hwy::SupportedTargets();
  return hwy::TargetName(bits & -bits);  // lowest bit = best target
}
}  // namespace mamba
#endif  // HWY_ONCE
