// RMSNorm and Mamba-2's gated RMSNorm: forward, backward, reference.
//   x, y: (M, d) rows (any leading shape flattened); weight: (d)
//   rms_norm:  y = x * rstd * weight,  rstd = 1 / sqrt(mean(x^2) + eps)
//   gated (norm_before_gate=false):  y = rms_norm_groups(x * silu(z)) * weight, with the
//   mean taken over groups of group_size consecutive channels.
//   (norm_before_gate=true):         y = rms_norm_groups(x) * weight * silu(z)
#pragma once
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

// rstd (optional out): (M) saved for the backward.
Tensor rms_norm_fwd(const Tensor& x, const Tensor& weight, float eps, Tensor* rstd = nullptr);
struct RmsNormGrads {
  Tensor dx, dweight;
};
RmsNormGrads rms_norm_bwd(const Tensor& x, const Tensor& weight, float eps, const Tensor& dy);
Tensor rms_norm_ref(const Tensor& x, const Tensor& weight, float eps);
// The references evaluated and returned in double (x's element order), for finite differences.
std::vector<double> rms_norm_ref_f64(const Tensor& x, const Tensor& weight, float eps);

// Fused residual add + norm (mamba_ssm Block with fused_add_norm order):
//   residual = residual + x (in place; residual may be undefined -> becomes a copy of x)
//   returns rms_norm(residual)
Tensor add_rms_norm_fwd(const Tensor& x, Tensor& residual, const Tensor& weight, float eps);

// Gated RMSNorm (Mamba-2). z: same shape as x. group_size divides d.
Tensor gated_rms_norm_fwd(const Tensor& x, const Tensor& z, const Tensor& weight, float eps,
                          int64_t group_size, bool norm_before_gate);
struct GatedRmsNormGrads {
  Tensor dx, dz, dweight;
};
GatedRmsNormGrads gated_rms_norm_bwd(const Tensor& x, const Tensor& z, const Tensor& weight,
                                     float eps, int64_t group_size, bool norm_before_gate,
                                     const Tensor& dy);
Tensor gated_rms_norm_ref(const Tensor& x, const Tensor& z, const Tensor& weight, float eps,
                          int64_t group_size, bool norm_before_gate);
// z may be undefined in the gated functions: then the norm is only grouped, with no gate.
std::vector<double> gated_rms_norm_ref_f64(const Tensor& x, const Tensor& z, const Tensor& weight,
                                           float eps, int64_t group_size, bool norm_before_gate);

}  // namespace mamba::ops
