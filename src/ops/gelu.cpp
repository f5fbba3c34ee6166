// Exact-erf GELU, forward and backward: element-wise, split across threads. The scalar erf is the
// cost; the MLP around it (two GEMMs of 4x the width) dominates anyway.
#include "ops/gelu.h"

#include "mamba/parallel.h"

namespace mamba::ops {

Tensor gelu(const Tensor& x_) {
  check_defined(x_, "gelu: x");
  const Tensor x = x_.contiguous();
  Tensor y = Tensor::empty(x.shape());
  const float* xp = x.data();
  float* yp = y.data();
  parallel_for(x.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) yp[i] = gelu_ref<float>(xp[i]);
  });
  return y;
}

Tensor gelu_bwd(const Tensor& x_, const Tensor& dy_) {
  check_defined(x_, "gelu_bwd: x");
  check_shape(dy_, "gelu_bwd: dy", x_.shape());
  const Tensor x = x_.contiguous(), dy = dy_.contiguous();
  Tensor dx = Tensor::empty(x.shape());
  const float* xp = x.data();
  const float* dp = dy.data();
  float* op = dx.data();
  parallel_for(x.numel(), 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) op[i] = dp[i] * gelu_grad_ref<float>(xp[i]);
  });
  return dx;
}

}  // namespace mamba::ops
