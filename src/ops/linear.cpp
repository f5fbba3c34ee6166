// Linear layer through mamba::gemm: forward, backward, naive reference.
//   x: (..., in) flattened to (M, in); W: (out, in); b: (out) optional; y: (..., out)
#include "mamba/ops/linear.h"

#include "mamba/gemm.h"
#include "mamba/ops/xwt.h"

namespace mamba::ops {
namespace {

struct LinDims {
  int64_t M, in, out;
};

LinDims check_linear(const char* what, const Tensor& x, const Tensor& W) {
  check_defined(x, str(what, ": x").c_str());
  check_defined(W, str(what, ": W").c_str());
  MAMBA_CHECK(x.ndim() >= 1, what, ": x must be (..., in), got ", x.shape_str());
  MAMBA_CHECK(W.ndim() == 2, what, ": W must be (out, in), got ", W.shape_str());
  MAMBA_CHECK(W.dim(1) == x.dim(-1), what, ": W ", W.shape_str(), " expects in = ", W.dim(1),
              " but x is ", x.shape_str());
  const int64_t in = x.dim(-1);
  return {in ? x.numel() / in : 0, in, W.dim(0)};
}

Shape out_shape(const Tensor& x, int64_t out) {
  Shape s = x.shape();
  s.back() = out;
  return s;
}

}  // namespace

Tensor linear_fwd(const Tensor& x, const Tensor& W, const Tensor& b) {
  const LinDims d = check_linear("linear_fwd", x, W);
  if (b.defined()) check_shape(b, "linear_fwd: b", {d.out});
  Tensor y = Tensor::empty(out_shape(x, d.out));
  if (d.M == 0 || d.out == 0) return y;
  float* yp = y.data();
  if (b.defined()) {
    for (int64_t m = 0; m < d.M; ++m)
      for (int64_t o = 0; o < d.out; ++o) yp[m * d.out + o] = b[o];
  }
  if (d.in == 0) {
    if (!b.defined()) y.zero();
    return y;
  }
  if (d.M > kHalfGemvMaxM) {  // many rows (prefill, training): the packed kernel where it is faster
    xwt(x.data(), d.M, d.in, WeightRows{W.data(), WeightDType::f32, d.in}, d.out, d.in, yp, d.out,
        b.defined());
    return y;
  }
  gemm(false, true, d.M, d.out, d.in, 1.f, x.data(), d.in, W.data(), d.in,
       b.defined() ? 1.f : 0.f, yp, d.out);
  return y;
}

Tensor linear_bwd(const Tensor& x, const Tensor& W, const Tensor& dy, Tensor* dW, Tensor* db) {
  const LinDims d = check_linear("linear_bwd", x, W);
  check_shape(dy, "linear_bwd: dy", out_shape(x, d.out));
  if (dW) check_shape(*dW, "linear_bwd: dW", {d.out, d.in});
  if (db) check_shape(*db, "linear_bwd: db", {d.out});
  Tensor dx = Tensor::zeros(x.shape());
  if (d.M == 0 || d.out == 0 || d.in == 0) {
    return dx;
  }
  // dx (M, in) = dy (M, out) W (out, in)
  gemm(false, false, d.M, d.in, d.out, 1.f, dy.data(), d.out, W.data(), d.in, 0.f, dx.data(), d.in);
  // dW (out, in) += dy^T (out, M) x (M, in)
  if (dW)
    gemm(true, false, d.out, d.in, d.M, 1.f, dy.data(), d.out, x.data(), d.in, 1.f, dW->data(),
         d.in);
  if (db) {
    float* dbp = db->data();
    const float* g = dy.data();
    for (int64_t m = 0; m < d.M; ++m)
      for (int64_t o = 0; o < d.out; ++o) dbp[o] += g[m * d.out + o];
  }
  return dx;
}

std::vector<double> linear_ref_f64(const Tensor& x, const Tensor& W, const Tensor& b) {
  const LinDims d = check_linear("linear_ref", x, W);
  if (b.defined()) check_shape(b, "linear_ref: b", {d.out});
  std::vector<double> y(static_cast<size_t>(d.M * d.out));
  for (int64_t m = 0; m < d.M; ++m)
    for (int64_t o = 0; o < d.out; ++o) {
      double acc = b.defined() ? b[o] : 0.0;
      for (int64_t i = 0; i < d.in; ++i) acc += (double)x[m * d.in + i] * W[o * d.in + i];
      y[m * d.out + o] = acc;
    }
  return y;
}

Tensor linear_ref(const Tensor& x, const Tensor& W, const Tensor& b) {
  const std::vector<double> y = linear_ref_f64(x, W, b);
  Tensor out = Tensor::empty(out_shape(x, W.dim(0)));
  for (int64_t i = 0; i < out.numel(); ++i) out[i] = static_cast<float>(y[i]);
  return out;
}

}  // namespace mamba::ops
