// The vectorised math the Highway kernels share, defined once: exp, sigmoid, softplus and its
// derivative, silu and its derivative. A private per-target header (Highway's -inl.h pattern):
// a kernel file includes it after hwy/foreach_target.h and hwy/highway.h, and the
// HWY_TARGET_TOGGLE guard below lets foreach_target compile it once per SIMD target inside that
// file. Used by act.cpp (silu, softplus, exp_inplace: what conv1d, norm and ssd call) and
// selective_scan.cpp.
//
// One NaN rule, in vector lanes as in the scalar tails (act.h's *_ref) and the references:
// NaN in -> NaN out. (hn::Exp maps NaN to 0, and a Min with a NaN argument returns the other
// operand on x86 but NaN on Arm, so every helper selects NaN lanes explicitly.)
// Call them qualified (simd_math::Exp): unqualified, argument-dependent lookup would also find
// Highway's own functions of the same name.
//
//   Exp(x)          = exp(x), inf past fp32 overflow like expf (hn::Exp is valid up to 104)
//   ExpInRange(x)   = hn::Exp itself, for arguments known finite and <= 88 (no checks)
//   Sigmoid(x)      = 1 / (1 + exp(-x)), the argument of exp clamped to 88 (for x < -88
//                     sigmoid(x) < 1e-38 anyway)
//   Softplus(x)     = x for x > 20 (torch's threshold), log1p(exp(x)) otherwise
//   SoftplusGrad(x) = d softplus / dx = sigmoid(x), 1 past the threshold
//   Silu(x)         = x sigmoid(x);   SiluGrad(x) = d silu / dx = s (1 + x (1 - s)), s = sigmoid(x)
//                     (SiluGradOfSigmoid(x, s) when s is at hand)
#if defined(MAMBA_OPS_SIMD_MATH_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MAMBA_OPS_SIMD_MATH_INL_H_
#undef MAMBA_OPS_SIMD_MATH_INL_H_
#else
#define MAMBA_OPS_SIMD_MATH_INL_H_
#endif

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace simd_math {
namespace hn = hwy::HWY_NAMESPACE;

template <class D, class V>
HWY_INLINE V ExpInRange(D d, V x) {
  return hn::Exp(d, x);
}

template <class D, class V>
HWY_INLINE V Exp(D d, V x) {
  const V e = hn::Exp(d, hn::Min(x, hn::Set(d, 100.0f)));
  return hn::IfThenElse(hn::IsNaN(x), x, e);
}

template <class D, class V>
HWY_INLINE V Sigmoid(D d, V x) {
  const V one = hn::Set(d, 1.0f);
  const V s = hn::Div(one, hn::Add(one, hn::Exp(d, hn::Min(hn::Neg(x), hn::Set(d, 88.0f)))));
  return hn::IfThenElse(hn::IsNaN(x), x, s);
}

template <class D, class V>
HWY_INLINE V Softplus(D d, V x) {
  const V thr = hn::Set(d, 20.0f);
  const V sp = hn::Log1p(d, hn::Exp(d, hn::Min(x, thr)));
  return hn::IfThenElse(hn::Le(x, thr), sp, x);  // NaN fails Le: x itself
}

template <class D, class V>
HWY_INLINE V SoftplusGrad(D d, V x) {
  return hn::IfThenElse(hn::Gt(x, hn::Set(d, 20.0f)), hn::Set(d, 1.0f), simd_math::Sigmoid(d, x));
}

template <class D, class V>
HWY_INLINE V Silu(D d, V x) {
  return hn::Mul(x, simd_math::Sigmoid(d, x));
}

// SiluGrad from s = Sigmoid(d, x) already at hand.
template <class D, class V>
HWY_INLINE V SiluGradOfSigmoid(D d, V x, V s) {
  const V one = hn::Set(d, 1.0f);
  return hn::Mul(s, hn::MulAdd(x, hn::Sub(one, s), one));
}

template <class D, class V>
HWY_INLINE V SiluGrad(D d, V x) {
  return simd_math::SiluGradOfSigmoid(d, x, simd_math::Sigmoid(d, x));
}

}  // namespace simd_math
}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#endif  // MAMBA_OPS_SIMD_MATH_INL_H_ toggle
