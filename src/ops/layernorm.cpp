// LayerNorm: forward, backward and the naive references. Row by row in fp32 (two passes for the
// variance, as torch's CPU kernel), rows split across threads; the loops are plain contiguous
// loops the compiler vectorises. Parameter gradients: per-part partial sums over fixed row
// ranges, added in part order (deterministic for a given thread count).
#include "ops/layernorm.h"

#include <algorithm>
#include <cmath>

#include "mamba/parallel.h"

namespace mamba::ops {
namespace {

struct Rows {
  int64_t M, d;
};

Rows check_args(const char* what, const Tensor& x, const Tensor& weight, const Tensor& bias,
                float eps) {
  check_defined(x, str(what, ": x").c_str());
  MAMBA_CHECK(x.ndim() >= 1 && x.dim(-1) >= 1, what, ": x must be (..., d) with d >= 1, got ",
              x.shape_str());
  const int64_t d = x.dim(-1);
  if (weight.defined()) check_shape(weight, str(what, ": weight").c_str(), {d});
  if (bias.defined()) check_shape(bias, str(what, ": bias").c_str(), {d});
  MAMBA_CHECK(eps >= 0.f && std::isfinite(eps), what, ": eps must be finite and >= 0, got ", eps);
  return {x.numel() / d, d};
}

int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

// mean and rstd of one row.
void row_stats(const float* x, int64_t d, float eps, float& mean, float& rstd) {
  float s = 0.f;
  for (int64_t i = 0; i < d; ++i) s += x[i];
  mean = s / static_cast<float>(d);
  float v = 0.f;
  for (int64_t i = 0; i < d; ++i) v += (x[i] - mean) * (x[i] - mean);
  rstd = 1.f / std::sqrt(v / static_cast<float>(d) + eps);
}

}  // namespace

Tensor layer_norm_fwd(const Tensor& x_, const Tensor& weight, const Tensor& bias, float eps) {
  const Rows r = check_args("layer_norm", x_, weight, bias, eps);
  const Tensor x = x_.contiguous();
  Tensor y = Tensor::empty(x.shape());
  const float* xp = x.data();
  float* yp = y.data();
  const float* w = weight.defined() ? weight.data() : nullptr;
  const float* b = bias.defined() ? bias.data() : nullptr;
  const int64_t d = r.d;
  parallel_for(r.M, row_grain(d), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr = xp + m * d;
      float* yr = yp + m * d;
      float mean, rstd;
      row_stats(xr, d, eps, mean, rstd);
      for (int64_t i = 0; i < d; ++i) {
        float v = (xr[i] - mean) * rstd;
        if (w) v *= w[i];
        if (b) v += b[i];
        yr[i] = v;
      }
    }
  });
  return y;
}

LayerNormGrads layer_norm_bwd(const Tensor& x_, const Tensor& weight, const Tensor& bias, float eps,
                              const Tensor& dy_) {
  const Rows r = check_args("layer_norm_bwd", x_, weight, bias, eps);
  check_shape(dy_, "layer_norm_bwd: dy", x_.shape());
  const Tensor x = x_.contiguous(), dy = dy_.contiguous();
  const int64_t M = r.M, d = r.d;
  LayerNormGrads g;
  g.dx = Tensor::empty(x.shape());
  const float* w = weight.defined() ? weight.data() : nullptr;
  const bool want_w = weight.defined(), want_b = bias.defined();
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(num_threads(), (M + 63) / 64));
  std::vector<float> pw(want_w ? nparts * d : 0, 0.f), pb(want_b ? nparts * d : 0, 0.f);
  const float* xp = x.data();
  const float* dyp = dy.data();
  float* dxp = g.dx.data();
  parallel_for(nparts, 1, [&](int64_t q0, int64_t q1) {
    std::vector<float> gw(static_cast<size_t>(d)), xh(static_cast<size_t>(d));
    for (int64_t q = q0; q < q1; ++q) {
      float* aw = want_w ? pw.data() + q * d : nullptr;
      float* ab = want_b ? pb.data() + q * d : nullptr;
      for (int64_t m = M * q / nparts; m < M * (q + 1) / nparts; ++m) {
        const float* xr = xp + m * d;
        const float* dr = dyp + m * d;
        float mean, rstd;
        row_stats(xr, d, eps, mean, rstd);
        float sg = 0.f, sgx = 0.f;
        for (int64_t i = 0; i < d; ++i) {
          xh[i] = (xr[i] - mean) * rstd;
          gw[i] = w ? dr[i] * w[i] : dr[i];
          sg += gw[i];
          sgx += gw[i] * xh[i];
        }
        const float mg = sg / static_cast<float>(d), mgx = sgx / static_cast<float>(d);
        float* dxr = dxp + m * d;
        for (int64_t i = 0; i < d; ++i) dxr[i] = rstd * (gw[i] - mg - xh[i] * mgx);
        if (aw)
          for (int64_t i = 0; i < d; ++i) aw[i] += dr[i] * xh[i];
        if (ab)
          for (int64_t i = 0; i < d; ++i) ab[i] += dr[i];
      }
    }
  });
  auto reduce = [&](const std::vector<float>& part) {
    Tensor t = Tensor::zeros({d});
    for (int64_t q = 0; q < nparts; ++q)
      for (int64_t i = 0; i < d; ++i) t[i] += part[q * d + i];
    return t;
  };
  if (want_w) g.dweight = reduce(pw);
  if (want_b) g.dbias = reduce(pb);
  return g;
}

// ---- references ---------------------------------------------------------------------------

namespace {
template <class T>
void ref_rows(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps, T* y) {
  const int64_t d = x.dim(-1), M = x.numel() / d;
  for (int64_t m = 0; m < M; ++m) {
    T mean = 0, var = 0;
    for (int64_t i = 0; i < d; ++i) mean += static_cast<T>(x[m * d + i]);
    mean /= static_cast<T>(d);
    for (int64_t i = 0; i < d; ++i) {
      const T c = static_cast<T>(x[m * d + i]) - mean;
      var += c * c;
    }
    var /= static_cast<T>(d);
    const T rstd = T(1) / std::sqrt(var + static_cast<T>(eps));
    for (int64_t i = 0; i < d; ++i) {
      T v = (static_cast<T>(x[m * d + i]) - mean) * rstd;
      if (weight.defined()) v *= static_cast<T>(weight[i]);
      if (bias.defined()) v += static_cast<T>(bias[i]);
      y[m * d + i] = v;
    }
  }
}
}  // namespace

std::vector<double> layer_norm_ref_f64(const Tensor& x_, const Tensor& weight, const Tensor& bias,
                                       float eps) {
  check_args("layer_norm_ref", x_, weight, bias, eps);
  const Tensor x = x_.contiguous();
  std::vector<double> y(static_cast<size_t>(x.numel()));
  ref_rows<double>(x, weight, bias, eps, y.data());
  return y;
}

Tensor layer_norm_ref(const Tensor& x, const Tensor& weight, const Tensor& bias, float eps) {
  const std::vector<double> y = layer_norm_ref_f64(x, weight, bias, eps);
  Tensor o = Tensor::empty(x.shape());
  for (int64_t i = 0; i < o.numel(); ++i) o[i] = static_cast<float>(y[i]);
  return o;
}

LayerNormGrads layer_norm_bwd_ref(const Tensor& x_, const Tensor& weight, const Tensor& bias,
                                  float eps, const Tensor& dy_) {
  check_args("layer_norm_bwd_ref", x_, weight, bias, eps);
  const Tensor x = x_.contiguous(), dy = dy_.contiguous();
  const int64_t d = x.dim(-1), M = x.numel() / d;
  std::vector<double> dw(d, 0), db(d, 0), xh(d), gw(d);
  LayerNormGrads g;
  g.dx = Tensor::empty(x.shape());
  for (int64_t m = 0; m < M; ++m) {
    double mean = 0, var = 0;
    for (int64_t i = 0; i < d; ++i) mean += x[m * d + i];
    mean /= d;
    for (int64_t i = 0; i < d; ++i) var += (x[m * d + i] - mean) * (x[m * d + i] - mean);
    const double rstd = 1.0 / std::sqrt(var / d + eps);
    double sg = 0, sgx = 0;
    for (int64_t i = 0; i < d; ++i) {
      xh[i] = (x[m * d + i] - mean) * rstd;
      gw[i] = dy[m * d + i] * (weight.defined() ? (double)weight[i] : 1.0);
      sg += gw[i];
      sgx += gw[i] * xh[i];
      dw[i] += dy[m * d + i] * xh[i];
      db[i] += dy[m * d + i];
    }
    for (int64_t i = 0; i < d; ++i)
      g.dx[m * d + i] = static_cast<float>(rstd * (gw[i] - sg / d - xh[i] * sgx / d));
  }
  if (weight.defined()) {
    g.dweight = Tensor::empty({d});
    for (int64_t i = 0; i < d; ++i) g.dweight[i] = static_cast<float>(dw[i]);
  }
  if (bias.defined()) {
    g.dbias = Tensor::empty({d});
    for (int64_t i = 0; i < d; ++i) g.dbias[i] = static_cast<float>(db[i]);
  }
  return g;
}

}  // namespace mamba::ops
