// Depthwise conv2d, channel-last: the inner loops run over the D contiguous channels of a pixel
// (the compiler vectorises them) with the weight staged as (k, k, D). Forward: threads over
// output rows (b, i). Backward: dx gathers over the taps for each input pixel (threads over
// input rows, no scatter races); dweight and dbias are per-part partial sums over fixed row
// ranges, added in part order (deterministic for a given thread count).
#include "ops/conv2d.h"

#include <algorithm>

#include "mamba/parallel.h"

namespace mamba::ops {
namespace {

struct Dims {
  int64_t B, H, W, D, k, p;
};

Dims check_args(const char* what, const Tensor& x, const Tensor& weight, const Tensor& bias) {
  check_defined(x, str(what, ": x").c_str());
  check_defined(weight, str(what, ": weight").c_str());
  MAMBA_CHECK(x.ndim() == 4, what, ": x must be (B, H, W, D), got ", x.shape_str());
  MAMBA_CHECK(weight.ndim() == 3 && weight.dim(1) == weight.dim(2), what,
              ": weight must be (D, k, k), got ", weight.shape_str());
  Dims s{x.dim(0), x.dim(1), x.dim(2), x.dim(3), weight.dim(1), 0};
  MAMBA_CHECK(s.k >= 1 && s.k % 2 == 1, what,
              ": kernel size k must be odd (same-size output), got ", s.k);
  s.p = (s.k - 1) / 2;
  check_shape(weight, str(what, ": weight").c_str(), {s.D, s.k, s.k});
  if (bias.defined()) check_shape(bias, str(what, ": bias").c_str(), {s.D});
  return s;
}

// weight (D, k, k) -> (k, k, D)
std::vector<float> taps_last(const Tensor& w, const Dims& s) {
  std::vector<float> t(static_cast<size_t>(s.k * s.k * s.D));
  for (int64_t d = 0; d < s.D; ++d)
    for (int64_t a = 0; a < s.k * s.k; ++a) t[a * s.D + d] = w[d * s.k * s.k + a];
  return t;
}

}  // namespace

Tensor dwconv2d_fwd(const Tensor& x_, const Tensor& weight_, const Tensor& bias_) {
  const Dims s = check_args("dwconv2d", x_, weight_, bias_);
  const Tensor x = x_.contiguous(), weight = weight_.contiguous();
  const Tensor bias = bias_.defined() ? bias_.contiguous() : Tensor();
  Tensor y = Tensor::empty(x.shape());
  const std::vector<float> wt = taps_last(weight, s);
  const float* xp = x.data();
  const float* bp = bias.defined() ? bias.data() : nullptr;
  float* yp = y.data();
  const int64_t H = s.H, W = s.W, D = s.D, k = s.k, p = s.p;
  parallel_for(s.B * H, std::max<int64_t>(1, 4096 / std::max<int64_t>(W * D, 1)),
               [&](int64_t r0, int64_t r1) {
                 for (int64_t r = r0; r < r1; ++r) {
                   const int64_t b = r / H, i = r % H;
                   for (int64_t j = 0; j < W; ++j) {
                     float* yr = yp + ((b * H + i) * W + j) * D;
                     if (bp)
                       std::copy(bp, bp + D, yr);
                     else
                       std::fill(yr, yr + D, 0.f);
                     for (int64_t a = 0; a < k; ++a) {
                       const int64_t ii = i + a - p;
                       if (ii < 0 || ii >= H) continue;
                       for (int64_t c = 0; c < k; ++c) {
                         const int64_t jj = j + c - p;
                         if (jj < 0 || jj >= W) continue;
                         const float* xr = xp + ((b * H + ii) * W + jj) * D;
                         const float* w = wt.data() + (a * k + c) * D;
                         for (int64_t d = 0; d < D; ++d) yr[d] += w[d] * xr[d];
                       }
                     }
                   }
                 }
               });
  return y;
}

Conv2dGrads dwconv2d_bwd(const Tensor& x_, const Tensor& weight_, const Tensor& bias_,
                         const Tensor& dy_) {
  const Dims s = check_args("dwconv2d_bwd", x_, weight_, bias_);
  check_shape(dy_, "dwconv2d_bwd: dy", x_.shape());
  const Tensor x = x_.contiguous(), weight = weight_.contiguous(), dy = dy_.contiguous();
  const int64_t H = s.H, W = s.W, D = s.D, k = s.k, p = s.p, kk = k * k;
  const std::vector<float> wt = taps_last(weight, s);
  const float* xp = x.data();
  const float* gp = dy.data();
  Conv2dGrads g;
  g.dx = Tensor::empty(x.shape());
  float* dxp = g.dx.data();
  const int64_t rows = s.B * H;
  const int64_t nparts = std::max<int64_t>(1, std::min<int64_t>(num_threads(), rows));
  // per part: dweight as (k, k, D) then dbias (D)
  std::vector<float> part(static_cast<size_t>(nparts * (kk + 1) * D), 0.f);
  parallel_for(nparts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      float* pw = part.data() + q * (kk + 1) * D;
      float* pb = pw + kk * D;
      for (int64_t r = rows * q / nparts; r < rows * (q + 1) / nparts; ++r) {
        const int64_t b = r / H, i = r % H;
        for (int64_t j = 0; j < W; ++j) {
          // dx at input pixel (i, j): the outputs (i - a + p, j - c + p) that read it
          float* dxr = dxp + ((b * H + i) * W + j) * D;
          std::fill(dxr, dxr + D, 0.f);
          for (int64_t a = 0; a < k; ++a) {
            const int64_t oi = i - a + p;
            if (oi < 0 || oi >= H) continue;
            for (int64_t c = 0; c < k; ++c) {
              const int64_t oj = j - c + p;
              if (oj < 0 || oj >= W) continue;
              const float* gr = gp + ((b * H + oi) * W + oj) * D;
              const float* w = wt.data() + (a * k + c) * D;
              for (int64_t d = 0; d < D; ++d) dxr[d] += w[d] * gr[d];
            }
          }
          // dweight, dbias from output pixel (i, j)
          const float* gr = gp + ((b * H + i) * W + j) * D;
          for (int64_t d = 0; d < D; ++d) pb[d] += gr[d];
          for (int64_t a = 0; a < k; ++a) {
            const int64_t ii = i + a - p;
            if (ii < 0 || ii >= H) continue;
            for (int64_t c = 0; c < k; ++c) {
              const int64_t jj = j + c - p;
              if (jj < 0 || jj >= W) continue;
              const float* xr = xp + ((b * H + ii) * W + jj) * D;
              float* w = pw + (a * k + c) * D;
              for (int64_t d = 0; d < D; ++d) w[d] += gr[d] * xr[d];
            }
          }
        }
      }
    }
  });
  g.dweight = Tensor::zeros({D, k, k});
  if (bias_.defined()) g.dbias = Tensor::zeros({D});
  for (int64_t q = 0; q < nparts; ++q) {
    const float* pw = part.data() + q * (kk + 1) * D;
    for (int64_t a = 0; a < kk; ++a)
      for (int64_t d = 0; d < D; ++d) g.dweight[d * kk + a] += pw[a * D + d];
    if (bias_.defined())
      for (int64_t d = 0; d < D; ++d) g.dbias[d] += pw[kk * D + d];
  }
  return g;
}

// ---- references ---------------------------------------------------------------------------

std::vector<double> dwconv2d_ref_f64(const Tensor& x_, const Tensor& weight_, const Tensor& bias) {
  const Dims s = check_args("dwconv2d_ref", x_, weight_, bias);
  const Tensor x = x_.contiguous(), weight = weight_.contiguous();
  std::vector<double> y(static_cast<size_t>(x.numel()));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t i = 0; i < s.H; ++i)
      for (int64_t j = 0; j < s.W; ++j)
        for (int64_t d = 0; d < s.D; ++d) {
          double acc = bias.defined() ? bias[d] : 0.0;
          for (int64_t a = 0; a < s.k; ++a)
            for (int64_t c = 0; c < s.k; ++c) {
              const int64_t ii = i + a - s.p, jj = j + c - s.p;
              if (ii < 0 || ii >= s.H || jj < 0 || jj >= s.W) continue;
              acc += (double)weight[(d * s.k + a) * s.k + c] *
                     x[((b * s.H + ii) * s.W + jj) * s.D + d];
            }
          y[((b * s.H + i) * s.W + j) * s.D + d] = acc;
        }
  return y;
}

Tensor dwconv2d_ref(const Tensor& x, const Tensor& weight, const Tensor& bias) {
  const std::vector<double> y = dwconv2d_ref_f64(x, weight, bias);
  Tensor o = Tensor::empty(x.shape());
  for (int64_t i = 0; i < o.numel(); ++i) o[i] = static_cast<float>(y[i]);
  return o;
}

Conv2dGrads dwconv2d_bwd_ref(const Tensor& x_, const Tensor& weight_, const Tensor& bias,
                             const Tensor& dy_) {
  const Dims s = check_args("dwconv2d_bwd_ref", x_, weight_, bias);
  const Tensor x = x_.contiguous(), weight = weight_.contiguous(), dy = dy_.contiguous();
  std::vector<double> dx(x.numel(), 0), dw(weight.numel(), 0), db(s.D, 0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t i = 0; i < s.H; ++i)
      for (int64_t j = 0; j < s.W; ++j)
        for (int64_t d = 0; d < s.D; ++d) {
          const double g = dy[((b * s.H + i) * s.W + j) * s.D + d];
          db[d] += g;
          for (int64_t a = 0; a < s.k; ++a)
            for (int64_t c = 0; c < s.k; ++c) {
              const int64_t ii = i + a - s.p, jj = j + c - s.p;
              if (ii < 0 || ii >= s.H || jj < 0 || jj >= s.W) continue;
              const int64_t xi = ((b * s.H + ii) * s.W + jj) * s.D + d;
              const int64_t wi = (d * s.k + a) * s.k + c;
              dx[xi] += g * weight[wi];
              dw[wi] += g * x[xi];
            }
        }
  Conv2dGrads g;
  auto to_t = [](const std::vector<double>& v, Shape sh) {
    Tensor t = Tensor::empty(std::move(sh));
    for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(v[i]);
    return t;
  };
  g.dx = to_t(dx, x.shape());
  g.dweight = to_t(dw, weight.shape());
  if (bias.defined()) g.dbias = to_t(db, {s.D});
  return g;
}

Tensor transpose_last2(const Tensor& x_) {
  check_defined(x_, "transpose_last2: x");
  MAMBA_CHECK(x_.ndim() == 3, "transpose_last2: x must be (B, X, Y), got ", x_.shape_str());
  const Tensor x = x_.contiguous();
  const int64_t B = x.dim(0), X = x.dim(1), Y = x.dim(2);
  Tensor o = Tensor::empty({B, Y, X});
  const float* xp = x.data();
  float* op = o.data();
  constexpr int64_t T = 32;
  const int64_t tx = (X + T - 1) / T;
  parallel_for(B * tx, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / tx, x0 = (r % tx) * T, x1 = std::min(X, x0 + T);
      const float* src = xp + b * X * Y;
      float* dst = op + b * X * Y;
      for (int64_t y0 = 0; y0 < Y; y0 += T) {
        const int64_t y1 = std::min(Y, y0 + T);
        for (int64_t xi = x0; xi < x1; ++xi)
          for (int64_t yi = y0; yi < y1; ++yi) dst[yi * X + xi] = src[xi * Y + yi];
      }
    }
  });
  return o;
}

}  // namespace mamba::ops
