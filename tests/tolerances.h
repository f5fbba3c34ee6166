// Every tolerance the tests use, in one place, with the reason for it.
// A comparison passes when |a - e| <= atol + rtol * |e| for every element.
#pragma once

namespace mamba::tol {

struct Tol {
  double atol, rtol;
};

// Our fp32 kernels vs the official mamba_ssm reference (fp32 PyTorch, golden files).
// Both sides round in fp32 but sum in different orders; a scan of L steps accumulates
// O(L * 6e-8) relative error in the state. 1e-4 relative (the figure) plus an
// absolute floor of 1e-5 for elements that cancel to near zero.
constexpr Tol kGoldenF32{1e-5, 1e-4};
// Gradients vs golden: backward sums over L and over batch*L for parameters, so the same
// rounding argument gives a few times more; atol scales with those sums.
constexpr Tol kGoldenGradF32{5e-5, 2e-4};
// Fast fp32 kernel vs the naive reference (double accumulation) on random data.
constexpr Tol kFastVsRef{1e-5, 1e-4};
// Full-sequence forward vs step-by-step decode, both fp32.
constexpr Tol kStepVsFull{1e-5, 1e-4};
// Central finite differences in double (eps 1e-3 on fp32-representable inputs, f in double):
// truncation error O(eps^2 * f''') ~ 1e-6 relative plus fp32 rounding of the inputs.
constexpr Tol kFiniteDiff{1e-4, 1e-3};

}  // namespace mamba::tol
