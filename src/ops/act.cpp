// Element-wise activations, vectorised with Highway and dispatched at run time.
// This file is also the pattern for every Highway kernel: the code between
// HWY_BEFORE_NAMESPACE and HWY_AFTER_NAMESPACE is compiled once per SIMD target.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/act.cpp"
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>

#include "mamba/ops/act.h"

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// sigmoid(v) = 1 / (1 + exp(-v)); the argument of Exp is clamped to keep it in range
// (exp(88) is near FLT_MAX; for v < -88 sigmoid(v) < 1e-38 anyway).
template <class D, class V>
HWY_INLINE V Sigmoid(D d, V v) {
  const V one = hn::Set(d, 1.0f);
  const V e = hn::Exp(d, hn::Min(hn::Neg(v), hn::Set(d, 88.0f)));
  return hn::Div(one, hn::Add(one, e));
}

void SiluKernel(const float* x, float* y, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto v = hn::LoadU(d, x + i);
    hn::StoreU(hn::Mul(v, Sigmoid(d, v)), d, y + i);
  }
  for (; i < n; ++i) y[i] = silu_ref(x[i]);
}

void SiluBwdKernel(const float* x, const float* dy, float* dx, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto one = hn::Set(d, 1.0f);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto v = hn::LoadU(d, x + i);
    const auto s = Sigmoid(d, v);
    // silu'(v) = s * (1 + v * (1 - s))
    const auto g = hn::Mul(s, hn::MulAdd(v, hn::Sub(one, s), one));
    hn::StoreU(hn::Mul(hn::LoadU(d, dy + i), g), d, dx + i);
  }
  for (; i < n; ++i) {
    float s = 1.f / (1.f + std::exp(-x[i]));
    dx[i] = dy[i] * s * (1.f + x[i] * (1.f - s));
  }
}

void SoftplusKernel(const float* x, float* y, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto thr = hn::Set(d, 20.0f);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto v = hn::LoadU(d, x + i);
    const auto sp = hn::Log1p(d, hn::Exp(d, hn::Min(v, thr)));
    hn::StoreU(hn::IfThenElse(hn::Gt(v, thr), v, sp), d, y + i);
  }
  for (; i < n; ++i) y[i] = softplus_ref(x[i]);
}

void SoftplusBwdKernel(const float* x, const float* dy, float* dx, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto thr = hn::Set(d, 20.0f);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto v = hn::LoadU(d, x + i);
    const auto g = hn::LoadU(d, dy + i);
    hn::StoreU(hn::IfThenElse(hn::Gt(v, thr), g, hn::Mul(g, Sigmoid(d, v))), d, dx + i);
  }
  for (; i < n; ++i) dx[i] = x[i] > 20.f ? dy[i] : dy[i] / (1.f + std::exp(-x[i]));
}

void ExpKernel(float* x, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Exp(d, hn::LoadU(d, x + i)), d, x + i);
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
void softplus(const float* x, float* y, int64_t n) { HWY_DYNAMIC_DISPATCH(SoftplusKernel)(x, y, n); }
void softplus_bwd(const float* x, const float* dy, float* dx, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SoftplusBwdKernel)(x, dy, dx, n);
}
void exp_inplace(float* x, int64_t n) { HWY_DYNAMIC_DISPATCH(ExpKernel)(x, n); }

Tensor silu(const Tensor& x) {
  Tensor y = Tensor::empty(x.shape());
  silu(x.data(), y.data(), x.numel());
  return y;
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
