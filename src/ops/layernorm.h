// LayerNorm over the last dimension (torch.nn.LayerNorm; VMamba's LayerNorm2d is the same op on
// its channel-first tensors, and our 2-D layers keep images channel-last, so it is this op too):
//   x, y: (M, d) rows (any leading shape flattened); weight, bias: (d), optional (undefined =
//   no affine part)
//   y = (x - mean) * rstd * weight + bias,  mean = sum(x) / d,  rstd = 1 / sqrt(var + eps),
//   var = sum((x - mean)^2) / d (biased, as torch)
// Backward, with xhat = (x - mean) * rstd and g = dy * weight:
//   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  dweight = sum_rows dy * xhat,
//   dbias = sum_rows dy  (row sums in a fixed order: per-part partials reduced in part order)
#pragma once
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

Tensor layer_norm_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps);
struct LayerNormGrads {
  Tensor dx, dweight, dbias;  // dweight / dbias undefined when weight / bias are
};
// Gradients of sum(y * dy), fresh tensors.
LayerNormGrads layer_norm_bwd(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps,
                              const Tensor& dy);
// Naive references (double accumulation): the spec and the test oracle.
Tensor layer_norm_ref(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps);
// The reference evaluated and returned in double (x's element order), for finite differences.
std::vector<double> layer_norm_ref_f64(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                       float eps);
LayerNormGrads layer_norm_bwd_ref(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  float eps, const Tensor& dy);

}  // namespace mamba::ops
