// Depthwise 2-D convolution (nn.Conv2d(D, D, k, groups=D, padding=(k-1)/2), stride 1: VMamba's
// SS2D conv2d), forward, backward and the naive reference; and the image layout transposes.
// Channel-last: x, y: (B, H, W, D); weight: (D, k, k) (the checkpoint's (D, 1, k, k) reshaped),
// k odd; bias: (D) optional. p = (k - 1) / 2, zero padding:
//   y[b,i,j,d] = bias[d] + sum_{a,c < k} weight[d,a,c] * x[b, i+a-p, j+c-p, d]
#pragma once
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

Tensor dwconv2d_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias);
struct Conv2dGrads {
  Tensor dx, dweight, dbias;  // dbias undefined when bias is
};
// Gradients of sum(y * dy), fresh tensors.
Conv2dGrads dwconv2d_bwd(const Tensor& x, const Tensor& weight, const Tensor& bias,
                         const Tensor& dy);
// Naive references: plain loops, double accumulation.
Tensor dwconv2d_ref(const Tensor& x, const Tensor& weight, const Tensor& bias);
std::vector<double> dwconv2d_ref_f64(const Tensor& x, const Tensor& weight, const Tensor& bias);
Conv2dGrads dwconv2d_bwd_ref(const Tensor& x, const Tensor& weight, const Tensor& bias,
                             const Tensor& dy);

// Layout: (B, C, S) <-> (B, S, C) for images flattened S = H * W (channel-first <-> channel-last).
// A 3-D (B, X, Y) -> (B, Y, X) transpose, blocked for the cache.
Tensor transpose_last2(const Tensor& x);

}  // namespace mamba::ops
