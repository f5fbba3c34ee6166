// Gated fusion, dimension swap and broadcast add of the spatio-temporal block (ops/gated_fusion.h).
#include "ops/gated_fusion.h"

#include <cmath>

#include "mamba/error.h"
#include "mamba/parallel.h"

namespace mamba::ops {

FusionOut gated_fusion_fwd(const Tensor& pre, const Tensor& hs, const Tensor& ht) {
  check_shape(hs, "gated_fusion: hs", pre.shape());
  check_shape(ht, "gated_fusion: ht", pre.shape());
  FusionOut o{Tensor::empty(pre.shape()), Tensor::empty(pre.shape())};
  const float *p = pre.data(), *a = hs.data(), *b = ht.data();
  float *h = o.h.data(), *z = o.z.data();
  parallel_for(pre.numel(), 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float zi = 1.f / (1.f + std::exp(-p[i]));
      z[i] = zi;
      h[i] = zi * a[i] + (1.f - zi) * b[i];
    }
  });
  return o;
}

FusionGrads gated_fusion_bwd(const Tensor& z, const Tensor& hs, const Tensor& ht,
                             const Tensor& dh) {
  check_shape(hs, "gated_fusion_bwd: hs", z.shape());
  check_shape(ht, "gated_fusion_bwd: ht", z.shape());
  check_shape(dh, "gated_fusion_bwd: dh", z.shape());
  FusionGrads g{Tensor::empty(z.shape()), Tensor::empty(z.shape()), Tensor::empty(z.shape())};
  const float *zp = z.data(), *a = hs.data(), *b = ht.data(), *d = dh.data();
  float *dp = g.dpre.data(), *da = g.dhs.data(), *db = g.dht.data();
  parallel_for(z.numel(), 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float zi = zp[i];
      dp[i] = d[i] * (a[i] - b[i]) * zi * (1.f - zi);
      da[i] = d[i] * zi;
      db[i] = d[i] * (1.f - zi);
    }
  });
  return g;
}

std::vector<double> gated_fusion_ref_f64(const std::vector<double>& pre,
                                         const std::vector<double>& hs,
                                         const std::vector<double>& ht) {
  std::vector<double> h(pre.size());
  for (size_t i = 0; i < pre.size(); ++i) {
    const double z = 1.0 / (1.0 + std::exp(-pre[i]));
    h[i] = z * hs[i] + (1.0 - z) * ht[i];
  }
  return h;
}

Tensor swap_dims12(const Tensor& x) {
  MAMBA_CHECK(x.ndim() == 4, "swap_dims12: x must be (B, X, Y, C), got ", x.shape_str());
  const int64_t B = x.dim(0), X = x.dim(1), Y = x.dim(2), C = x.dim(3);
  Tensor o = Tensor::empty({B, Y, X, C});
  const float* s = x.data();
  float* d = o.data();
  parallel_for(B * X, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / X, i = r % X;
      for (int64_t j = 0; j < Y; ++j) {
        const float* src = s + ((b * X + i) * Y + j) * C;
        float* dst = d + ((b * Y + j) * X + i) * C;
        for (int64_t c = 0; c < C; ++c) dst[c] = src[c];
      }
    }
  });
  return o;
}

Tensor add_broadcast(const Tensor& x, const Tensor& e) {
  MAMBA_CHECK(x.ndim() == 3, "add_broadcast: x must be (M, N, C), got ", x.shape_str());
  check_shape(e, "add_broadcast: e", {x.dim(1), x.dim(2)});
  Tensor o = Tensor::empty(x.shape());
  const int64_t M = x.dim(0), NC = e.numel();
  const float *s = x.data(), *ep = e.data();
  float* d = o.data();
  parallel_for(M, 4, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t i = 0; i < NC; ++i) d[m * NC + i] = s[m * NC + i] + ep[i];
  });
  return o;
}

void broadcast_grad(const Tensor& de, const Tensor& dx) {
  MAMBA_CHECK(dx.ndim() == 3, "broadcast_grad: dx must be (M, N, C), got ", dx.shape_str());
  check_shape(de, "broadcast_grad: de", {dx.dim(1), dx.dim(2)});
  const int64_t M = dx.dim(0), NC = de.numel();
  const float* s = dx.data();
  float* d = const_cast<Tensor&>(de).data();
  parallel_for(NC, 256, [&](int64_t i0, int64_t i1) {  // each element summed over m in order
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = i0; i < i1; ++i) d[i] += s[m * NC + i];
  });
}

}  // namespace mamba::ops
