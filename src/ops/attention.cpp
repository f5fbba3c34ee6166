// Attention (GQA, causal / not), rotary embedding and the KV-cache decode step: the blocked
// online-softmax kernels, their backward, and the naive references. See ops/attention.h.
// The two inner loops (a row of scores against a transposed key block; y += a x over a head) are
// Highway kernels, compiled for every target and chosen at run time.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/attention.cpp"
#include "ops/attention.h"

#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// s[0, nb) = sum_p qs[p] * Kt[p * ld + j]: the key index j across the lanes, p summed in order.
void RowScoresKernel(const float* qs, const float* Kt, int64_t ld, int64_t P, int64_t nb,
                     float* s) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t j = 0;
  for (; j + 2 * N <= nb; j += 2 * N) {
    auto a0 = hn::Zero(d), a1 = hn::Zero(d);
    for (int64_t p = 0; p < P; ++p) {
      const auto q = hn::Set(d, qs[p]);
      a0 = hn::MulAdd(q, hn::LoadU(d, Kt + p * ld + j), a0);
      a1 = hn::MulAdd(q, hn::LoadU(d, Kt + p * ld + j + N), a1);
    }
    hn::StoreU(a0, d, s + j);
    hn::StoreU(a1, d, s + j + N);
  }
  for (; j + N <= nb; j += N) {
    auto a0 = hn::Zero(d);
    for (int64_t p = 0; p < P; ++p)
      a0 = hn::MulAdd(hn::Set(d, qs[p]), hn::LoadU(d, Kt + p * ld + j), a0);
    hn::StoreU(a0, d, s + j);
  }
  for (; j < nb; ++j) {
    float a = 0.f;
    for (int64_t p = 0; p < P; ++p) a += qs[p] * Kt[p * ld + j];
    s[j] = a;
  }
}

// Four rows at once: S[r * ss + j] = sum_p Q[r * qs + p] * Kt[p * ld + j] for r < 4, j < nb. Each
// key-block load serves four rows (one load per two FMAs instead of one per FMA); every element
// is summed over p in order from zero with fused multiply-adds, as RowScoresKernel sums it.
void Scores4Kernel(const float* Q, int64_t qs, const float* Kt, int64_t ld, int64_t P, int64_t nb,
                   float* S, int64_t ss) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t j = 0;
  for (; j + 2 * N <= nb; j += 2 * N) {
    auto a0 = hn::Zero(d), a1 = hn::Zero(d), b0 = hn::Zero(d), b1 = hn::Zero(d);
    auto c0 = hn::Zero(d), c1 = hn::Zero(d), e0 = hn::Zero(d), e1 = hn::Zero(d);
    for (int64_t p = 0; p < P; ++p) {
      const auto k0 = hn::LoadU(d, Kt + p * ld + j), k1 = hn::LoadU(d, Kt + p * ld + j + N);
      const auto q0 = hn::Set(d, Q[p]), q1 = hn::Set(d, Q[qs + p]);
      const auto q2 = hn::Set(d, Q[2 * qs + p]), q3 = hn::Set(d, Q[3 * qs + p]);
      a0 = hn::MulAdd(q0, k0, a0);
      a1 = hn::MulAdd(q0, k1, a1);
      b0 = hn::MulAdd(q1, k0, b0);
      b1 = hn::MulAdd(q1, k1, b1);
      c0 = hn::MulAdd(q2, k0, c0);
      c1 = hn::MulAdd(q2, k1, c1);
      e0 = hn::MulAdd(q3, k0, e0);
      e1 = hn::MulAdd(q3, k1, e1);
    }
    hn::StoreU(a0, d, S + j);
    hn::StoreU(a1, d, S + j + N);
    hn::StoreU(b0, d, S + ss + j);
    hn::StoreU(b1, d, S + ss + j + N);
    hn::StoreU(c0, d, S + 2 * ss + j);
    hn::StoreU(c1, d, S + 2 * ss + j + N);
    hn::StoreU(e0, d, S + 3 * ss + j);
    hn::StoreU(e1, d, S + 3 * ss + j + N);
  }
  if (j < nb)
    for (int64_t r = 0; r < 4; ++r)
      RowScoresKernel(Q + r * qs, Kt + j, ld, P, nb - j, S + r * ss + j);
}

// Two rows at once: acc[r * as + p] += sum_{i < n} w[r * ws + i] * X[i * xs + p] for r < 2 (the
// probability-weighted sum of value rows). The accumulators stay in registers over all n rows of
// X, 4 vectors of p at a time, and each X load serves both rows. Each element gets its terms in i
// order by fused multiply-adds, as n AxpyKernel calls add them.
void Accum2Kernel(const float* w, int64_t ws, const float* X, int64_t xs, int64_t n, int64_t P,
                  float* acc, int64_t as) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  float* acc1 = acc + as;
  int64_t p = 0;
  for (; p + 4 * N <= P; p += 4 * N) {
    auto a0 = hn::LoadU(d, acc + p), a1 = hn::LoadU(d, acc + p + N);
    auto a2 = hn::LoadU(d, acc + p + 2 * N), a3 = hn::LoadU(d, acc + p + 3 * N);
    auto b0 = hn::LoadU(d, acc1 + p), b1 = hn::LoadU(d, acc1 + p + N);
    auto b2 = hn::LoadU(d, acc1 + p + 2 * N), b3 = hn::LoadU(d, acc1 + p + 3 * N);
    for (int64_t i = 0; i < n; ++i) {
      const float* x = X + i * xs + p;
      const auto x0 = hn::LoadU(d, x), x1 = hn::LoadU(d, x + N);
      const auto x2 = hn::LoadU(d, x + 2 * N), x3 = hn::LoadU(d, x + 3 * N);
      const auto w0 = hn::Set(d, w[i]), w1 = hn::Set(d, w[ws + i]);
      a0 = hn::MulAdd(w0, x0, a0);
      a1 = hn::MulAdd(w0, x1, a1);
      a2 = hn::MulAdd(w0, x2, a2);
      a3 = hn::MulAdd(w0, x3, a3);
      b0 = hn::MulAdd(w1, x0, b0);
      b1 = hn::MulAdd(w1, x1, b1);
      b2 = hn::MulAdd(w1, x2, b2);
      b3 = hn::MulAdd(w1, x3, b3);
    }
    hn::StoreU(a0, d, acc + p);
    hn::StoreU(a1, d, acc + p + N);
    hn::StoreU(a2, d, acc + p + 2 * N);
    hn::StoreU(a3, d, acc + p + 3 * N);
    hn::StoreU(b0, d, acc1 + p);
    hn::StoreU(b1, d, acc1 + p + N);
    hn::StoreU(b2, d, acc1 + p + 2 * N);
    hn::StoreU(b3, d, acc1 + p + 3 * N);
  }
  for (; p + N <= P; p += N) {
    auto a0 = hn::LoadU(d, acc + p), b0 = hn::LoadU(d, acc1 + p);
    for (int64_t i = 0; i < n; ++i) {
      const auto x0 = hn::LoadU(d, X + i * xs + p);
      a0 = hn::MulAdd(hn::Set(d, w[i]), x0, a0);
      b0 = hn::MulAdd(hn::Set(d, w[ws + i]), x0, b0);
    }
    hn::StoreU(a0, d, acc + p);
    hn::StoreU(b0, d, acc1 + p);
  }
  for (; p < P; ++p)
    for (int64_t i = 0; i < n; ++i) {
      acc[p] += w[i] * X[i * xs + p];
      acc1[p] += w[ws + i] * X[i * xs + p];
    }
}

// y[0, n) += a * x[0, n)
void AxpyKernel(float a, const float* x, float* y, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto va = hn::Set(d, a);
  int64_t i = 0;
  for (; i + N <= n; i += N)
    hn::StoreU(hn::MulAdd(va, hn::LoadU(d, x + i), hn::LoadU(d, y + i)), d, y + i);
  for (; i < n; ++i) y[i] += a * x[i];
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>
#include <cmath>
#include <limits>

#include "mamba/error.h"
#include "mamba/parallel.h"
#include "ops/act.h"

namespace mamba::ops {
HWY_EXPORT(RowScoresKernel);
HWY_EXPORT(AxpyKernel);
HWY_EXPORT(Scores4Kernel);
HWY_EXPORT(Accum2Kernel);

namespace {

constexpr int64_t kBq = 32;  // queries per block
constexpr int64_t kBk = 64;  // keys per block

struct Dims {
  int64_t B, L, Lk, H, KV, P;
  int64_t group() const { return H / KV; }
};

Dims check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, const char* what) {
  check_defined(q, "attention: q");
  check_defined(k, "attention: k");
  check_defined(v, "attention: v");
  MAMBA_CHECK(q.ndim() == 4 && k.ndim() == 4 && v.ndim() == 4, what,
              ": q, k, v must be (B, L, H, P), (B, Lk, KV, P), (B, Lk, KV, P), got ", q.shape_str(),
              ", ", k.shape_str(), ", ", v.shape_str());
  Dims d{q.dim(0), q.dim(1), k.dim(1), q.dim(2), k.dim(2), q.dim(3)};
  check_shape(k, "attention: k", {d.B, -1, -1, d.P});
  check_shape(v, "attention: v", {d.B, d.Lk, d.KV, d.P});
  MAMBA_CHECK(d.B >= 1 && d.L >= 1 && d.Lk >= 1 && d.H >= 1 && d.KV >= 1 && d.P >= 1, what,
              ": empty dimension in q ", q.shape_str(), " / k ", k.shape_str());
  MAMBA_CHECK(d.H % d.KV == 0, what, ": the ", d.KV, " kv heads do not divide the ", d.H,
              " query heads");
  return d;
}

float scale_of(const AttnOpts& o, int64_t P) {
  return o.scale != 0 ? o.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(P)));
}

// Number of keys query row i (of L, over Lk keys) sees.
inline int64_t visible(int64_t i, int64_t L, int64_t Lk, bool causal) {
  return causal ? std::min<int64_t>(Lk, i + (Lk - L) + 1) : Lk;
}

// Kt (P, nb) = K rows [j0, j0 + nb) transposed; K row j at k + j * ks.
void transpose_block(const float* k, int64_t ks, int64_t j0, int64_t nb, int64_t P, float* Kt) {
  for (int64_t j = 0; j < nb; ++j) {
    const float* kr = k + (j0 + j) * ks;
    for (int64_t p = 0; p < P; ++p) Kt[p * kBk + j] = kr[p];
  }
}

// s[0, nb) = sum_p qs[p] * Kt[p, :]
inline void row_scores(const float* qs, const float* Kt, int64_t P, int64_t nb, float* s) {
  HWY_DYNAMIC_DISPATCH(RowScoresKernel)(qs, Kt, kBk, P, nb, s);
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(AxpyKernel)(a, x, y, n);
}

// out_r[0, P) += sum_{j < n_r} w[r * kBk + j] * x_j[0, P) for the nq rows r (out_r at out + r *
// os, x_j at x + j * xs): two rows per pass over the rows of x both use (Accum2Kernel), then each
// row's own remaining ones (the causal diagonal block); every row adds its terms in j order.
void accum_rows(const float* w, const int64_t* n, int64_t nq, const float* x, int64_t xs, int64_t P,
                float* out, int64_t os) {
  int64_t r = 0;
  for (; r + 2 <= nq; r += 2) {
    const int64_t both = std::min(n[r], n[r + 1]);
    if (both > 0)
      HWY_DYNAMIC_DISPATCH(Accum2Kernel)(w + r * kBk, kBk, x, xs, both, P, out + r * os, os);
    for (int64_t rr = r; rr < r + 2; ++rr)
      for (int64_t j = both; j < n[rr]; ++j) axpy(w[rr * kBk + j], x + j * xs, out + rr * os, P);
  }
  for (; r < nq; ++r)
    for (int64_t j = 0; j < n[r]; ++j) axpy(w[r * kBk + j], x + j * xs, out + r * os, P);
}

inline float dotf(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// One query block of one (batch, head): nq queries (rows of q, qs apart; first row index i0 among
// L) over Lk keys (rows of k / v, ks apart). Writes out rows (os apart) and lse[0, nq).
void attend_block(const float* q, int64_t qs, int64_t i0, int64_t nq, int64_t L, const float* k,
                  const float* v, int64_t ks, int64_t Lk, int64_t P, float scale, bool causal,
                  float* out, int64_t os, float* lse) {
  std::vector<float> buf(static_cast<size_t>(kBq * P * 2 + P * kBk + kBq * kBk + 2 * kBq));
  float* Q = buf.data();     // (nq, P) scaled queries
  float* acc = Q + kBq * P;  // (nq, P)
  float* Kt = acc + kBq * P;
  float* S = Kt + P * kBk;  // (nq, kBk)
  float* m = S + kBq * kBk;
  float* l = m + kBq;
  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t p = 0; p < P; ++p) Q[r * P + p] = q[r * qs + p] * scale;
    std::fill(acc + r * P, acc + (r + 1) * P, 0.f);
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = 0.f;
  }
  const int64_t jend = visible(i0 + nq - 1, L, Lk, causal);
  int64_t nvis[kBq];
  for (int64_t j0 = 0; j0 < jend; j0 += kBk) {
    const int64_t nb = std::min(kBk, jend - j0);
    transpose_block(k, ks, j0, nb, P, Kt);
    // Scores of four rows at a time over the whole block (a row that sees fewer keys ignores the
    // rest), the remaining rows one by one.
    int64_t r4 = 0;
    for (; r4 + 4 <= nq; r4 += 4)
      HWY_DYNAMIC_DISPATCH(Scores4Kernel)(Q + r4 * P, P, Kt, kBk, P, nb, S + r4 * kBk, kBk);
    for (int64_t r = 0; r < nq; ++r) {
      const int64_t nv = std::min(nb, visible(i0 + r, L, Lk, causal) - j0);
      nvis[r] = std::max<int64_t>(nv, 0);
      if (nv <= 0) continue;
      float* s = S + r * kBk;
      if (r >= r4) row_scores(Q + r * P, Kt, P, nv, s);
      float mx = m[r];
      for (int64_t j = 0; j < nv; ++j) mx = std::max(mx, s[j]);
      const float corr = std::exp(m[r] - mx);  // exp(-inf) = 0 on the first block
      for (int64_t j = 0; j < nv; ++j) s[j] -= mx;
      exp_inplace(s, nv);
      float sum = 0.f;
      for (int64_t j = 0; j < nv; ++j) sum += s[j];
      l[r] = l[r] * corr + sum;
      m[r] = mx;
      float* a = acc + r * P;
      if (corr != 1.f)
        for (int64_t p = 0; p < P; ++p) a[p] *= corr;
    }
    // acc_r += sum_j p_rj v_j
    accum_rows(S, nvis, nq, v + j0 * ks, ks, P, acc, P);
  }
  for (int64_t r = 0; r < nq; ++r) {
    const float inv = 1.f / l[r];
    for (int64_t p = 0; p < P; ++p) out[r * os + p] = acc[r * P + p] * inv;
    if (lse) lse[r] = m[r] + std::log(l[r]);
  }
}

}  // namespace

// ---- forward ------------------------------------------------------------------------------------

Tensor attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const AttnOpts& o,
                     Tensor* lse) {
  const Dims d = check_qkv(q, k, v, "attention_fwd");
  MAMBA_CHECK(!o.causal || d.Lk >= d.L, "attention_fwd: causal attention needs Lk (", d.Lk,
              ") >= L (", d.L, ")");
  const float scale = scale_of(o, d.P);
  Tensor out = Tensor::empty(q.shape());
  Tensor ls = Tensor::empty({d.B, d.H, d.L});
  const float *qp = q.data(), *kp = k.data(), *vp = v.data();
  float *op = out.data(), *lp = ls.data();
  const int64_t nqb = (d.L + kBq - 1) / kBq;
  const int64_t qs = d.H * d.P, ks = d.KV * d.P;
  parallel_for(d.B * d.H * nqb, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t qb = t % nqb, bh = t / nqb, h = bh % d.H, b = bh / d.H;
      const int64_t g = h / d.group(), i0 = qb * kBq, nq = std::min(kBq, d.L - i0);
      attend_block(qp + ((b * d.L + i0) * d.H + h) * d.P, qs, i0, nq, d.L,
                   kp + (b * d.Lk * d.KV + g) * d.P, vp + (b * d.Lk * d.KV + g) * d.P, ks, d.Lk,
                   d.P, scale, o.causal, op + ((b * d.L + i0) * d.H + h) * d.P, qs,
                   lp + (b * d.H + h) * d.L + i0);
    }
  });
  if (lse) *lse = ls;
  return out;
}

// ---- backward -----------------------------------------------------------------------------------

AttnGrads attention_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& dout, const AttnOpts& o) {
  const Dims d = check_qkv(q, k, v, "attention_bwd");
  check_shape(out, "attention_bwd: out", q.shape());
  check_shape(dout, "attention_bwd: dout", q.shape());
  check_shape(lse, "attention_bwd: lse", {d.B, d.H, d.L});
  MAMBA_CHECK(!o.causal || d.Lk >= d.L, "attention_bwd: causal attention needs Lk >= L");
  const float scale = scale_of(o, d.P);
  const int64_t P = d.P, G = d.group(), qs = d.H * P, ks = d.KV * P;
  AttnGrads g{Tensor::empty(q.shape()), Tensor::zeros(k.shape()), Tensor::zeros(v.shape())};
  // Per query head dk / dv (summed over the heads of a group afterwards, in head order).
  const bool direct = G == 1;
  Tensor dkp = direct ? g.dk : Tensor::zeros({d.B, d.H, d.Lk, P});
  Tensor dvp = direct ? g.dv : Tensor::zeros({d.B, d.H, d.Lk, P});
  const float *qp = q.data(), *kp = k.data(), *vp = v.data(), *opp = out.data(), *lp = lse.data(),
              *dop = dout.data();
  float *dqp = g.dq.data(), *dkpp = dkp.data(), *dvpp = dvp.data();
  parallel_for(d.B * d.H, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(static_cast<size_t>(2 * P * kBk + 4 * kBq * kBk + kBq * P + kBq));
    int64_t nvis[kBq];
    float* Kt = buf.data();
    float* Vt = Kt + P * kBk;
    float* S = Vt + P * kBk;  // probabilities (nq, kBk)
    float* dP = S + kBq * kBk;
    float* dS = dP + kBq * kBk;
    float* Wq = dS + kBq * kBk;  // scale * dS, the weights of dq
    float* Q = Wq + kBq * kBk;   // scaled queries
    float* Dsum = Q + kBq * P;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t % d.H, b = t / d.H, gk = h / G;
      const float* kb = kp + (b * d.Lk * d.KV + gk) * P;
      const float* vb = vp + (b * d.Lk * d.KV + gk) * P;
      // dk / dv rows of this head: (b, j, gk) in g.dk when direct, (b, h, j) in the partials.
      float* dkb = direct ? dkpp + (b * d.Lk * d.KV + gk) * P : dkpp + (b * d.H + h) * d.Lk * P;
      float* dvb = direct ? dvpp + (b * d.Lk * d.KV + gk) * P : dvpp + (b * d.H + h) * d.Lk * P;
      const int64_t kstride = direct ? ks : P;
      for (int64_t i0 = 0; i0 < d.L; i0 += kBq) {
        const int64_t nq = std::min(kBq, d.L - i0);
        const float* qr = qp + ((b * d.L + i0) * d.H + h) * P;
        const float* orow = opp + ((b * d.L + i0) * d.H + h) * P;
        const float* dor = dop + ((b * d.L + i0) * d.H + h) * P;
        float* dqr = dqp + ((b * d.L + i0) * d.H + h) * P;
        const float* lr = lp + (b * d.H + h) * d.L + i0;
        for (int64_t r = 0; r < nq; ++r) {
          for (int64_t p = 0; p < P; ++p) Q[r * P + p] = qr[r * qs + p] * scale;
          Dsum[r] = dotf(dor + r * qs, orow + r * qs, P);
          std::fill(dqr + r * qs, dqr + r * qs + P, 0.f);
        }
        const int64_t jend = visible(i0 + nq - 1, d.L, d.Lk, o.causal);
        for (int64_t j0 = 0; j0 < jend; j0 += kBk) {
          const int64_t nb = std::min(kBk, jend - j0);
          transpose_block(kb, ks, j0, nb, P, Kt);
          transpose_block(vb, ks, j0, nb, P, Vt);
          // Scores S = Q K^T and dP = dO V^T four rows at a time over the whole block, the
          // remaining rows one by one; lanes a row does not see are zeroed below.
          int64_t r4 = 0;
          for (; r4 + 4 <= nq; r4 += 4) {
            HWY_DYNAMIC_DISPATCH(Scores4Kernel)(Q + r4 * P, P, Kt, kBk, P, nb, S + r4 * kBk, kBk);
            HWY_DYNAMIC_DISPATCH(Scores4Kernel)
            (dor + r4 * qs, qs, Vt, kBk, P, nb, dP + r4 * kBk, kBk);
          }
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t nv =
                std::max<int64_t>(0, std::min(nb, visible(i0 + r, d.L, d.Lk, o.causal) - j0));
            nvis[r] = nv;
            float* s = S + r * kBk;
            float* dp = dP + r * kBk;
            float* ds = dS + r * kBk;
            std::fill(s + nv, s + nb, 0.f);
            std::fill(ds, ds + nb, 0.f);
            if (nv == 0) continue;
            if (r >= r4) {
              row_scores(Q + r * P, Kt, P, nv, s);
              row_scores(dor + r * qs, Vt, P, nv, dp);  // dP = dO V^T
            }
            for (int64_t j = 0; j < nv; ++j) s[j] -= lr[r];
            exp_inplace(s, nv);  // probabilities
            float* wq = Wq + r * kBk;
            for (int64_t j = 0; j < nv; ++j) {
              ds[j] = s[j] * (dp[j] - Dsum[r]);
              wq[j] = ds[j] * scale;
            }
          }
          // dq_r += sum_j scale dS[r, j] k_j
          accum_rows(Wq, nvis, nq, kb + j0 * ks, ks, P, dqr, qs);
          // dk_j += scale * sum_r dS[r, j] q_r; dv_j += sum_r P[r, j] dO_r (rows in order).
          for (int64_t j = 0; j < nb; ++j) {
            float* dk = dkb + (j0 + j) * kstride;
            float* dv = dvb + (j0 + j) * kstride;
            for (int64_t r = 0; r < nq; ++r) {
              if (dS[r * kBk + j] != 0.f) axpy(dS[r * kBk + j], Q + r * P, dk, P);
              if (S[r * kBk + j] != 0.f) axpy(S[r * kBk + j], dor + r * qs, dv, P);
            }
          }
        }
      }
    }
  });
  if (!direct) {
    float *dk = g.dk.data(), *dv = g.dv.data();
    parallel_for(d.B * d.Lk, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j = t % d.Lk, b = t / d.Lk;
        for (int64_t gk = 0; gk < d.KV; ++gk)
          for (int64_t h = gk * G; h < (gk + 1) * G; ++h) {
            const int64_t src = ((b * d.H + h) * d.Lk + j) * P,
                          dst = ((b * d.Lk + j) * d.KV + gk) * P;
            for (int64_t p = 0; p < P; ++p)
              dk[dst + p] += dkpp[src + p], dv[dst + p] += dvpp[src + p];
          }
      }
    });
  }
  return g;
}

// ---- decode -------------------------------------------------------------------------------------

Tensor attention_decode(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                        std::span<const int64_t> lens, const AttnOpts& o) {
  check_defined(q, "attention_decode: q");
  check_defined(k_cache, "attention_decode: k_cache");
  MAMBA_CHECK(q.ndim() == 3 && k_cache.ndim() == 4,
              "attention_decode: q (B, H, P) and k_cache (B, cap, KV, P) expected, got ",
              q.shape_str(), " and ", k_cache.shape_str());
  const int64_t B = q.dim(0), H = q.dim(1), P = q.dim(2), cap = k_cache.dim(1), KV = k_cache.dim(2);
  check_shape(k_cache, "attention_decode: k_cache", {B, -1, -1, P});
  check_shape(v_cache, "attention_decode: v_cache", k_cache.shape());
  MAMBA_CHECK(KV >= 1 && H % KV == 0, "attention_decode: the ", KV, " kv heads do not divide the ",
              H, " query heads");
  MAMBA_CHECK(static_cast<int64_t>(lens.size()) == B, "attention_decode: lens has ", lens.size(),
              " entries for batch ", B);
  for (int64_t b = 0; b < B; ++b)
    MAMBA_CHECK(lens[b] >= 1 && lens[b] <= cap, "attention_decode: lens[", b, "] = ", lens[b],
                " outside [1, cap = ", cap, "]");
  const float scale = scale_of(o, P);
  Tensor out = Tensor::empty({B, H, P});
  const float *qp = q.data(), *kp = k_cache.data(), *vp = v_cache.data();
  float* op = out.data();
  const int64_t G = H / KV;
  parallel_for(B * H, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t % H, b = t / H, g = h / G, n = lens[b];
      attend_block(qp + t * P, P, n - 1, 1, n, kp + (b * cap * KV + g) * P,
                   vp + (b * cap * KV + g) * P, KV * P, n, P, scale, true, op + t * P, P, nullptr);
    }
  });
  return out;
}

// ---- rotary -------------------------------------------------------------------------------------

namespace {

// inv_freq as flash_attn computes it in fp32: 1 / base ** (arange(0, R, 2) / R).
std::vector<float> inv_freq(const RotaryOpts& r) {
  std::vector<float> f(static_cast<size_t>(r.rot_dim / 2));
  const float base = static_cast<float>(r.base);
  for (int64_t i = 0; i < r.rot_dim / 2; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(r.rot_dim);
    f[i] = 1.f / std::pow(base, e);
  }
  return f;
}

void check_rotary(const Shape& s, std::span<const int64_t> pos0, const RotaryOpts& r) {
  MAMBA_CHECK(s.size() == 4, "rotary: x must be (B, L, nH, P), got ", shape_str(s));
  MAMBA_CHECK(r.rot_dim >= 0 && r.rot_dim % 2 == 0 && r.rot_dim <= s[3],
              "rotary: rot_dim must be even and in [0, P = ", s[3], "], got ", r.rot_dim);
  MAMBA_CHECK(pos0.size() == 1 || static_cast<int64_t>(pos0.size()) == s[0], "rotary: pos0 has ",
              pos0.size(), " entries, expected 1 or B = ", s[0]);
}

// The index pairs (a, b) of rotated dims i < R/2.
inline void pair_of(int64_t i, int64_t R, bool interleaved, int64_t& a, int64_t& b) {
  if (interleaved)
    a = 2 * i, b = 2 * i + 1;
  else
    a = i, b = i + R / 2;
}

}  // namespace

void rotary_inplace(Tensor& x, std::span<const int64_t> pos0, const RotaryOpts& r, bool inverse) {
  check_rotary(x.shape(), pos0, r);
  if (r.rot_dim == 0) return;
  const int64_t B = x.dim(0), L = x.dim(1), nH = x.dim(2), P = x.dim(3), R = r.rot_dim, R2 = R / 2;
  const std::vector<float> inv = inv_freq(r);
  float* xp = x.data();
  parallel_for(B * L, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> c(static_cast<size_t>(R2)), s(static_cast<size_t>(R2));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / L, l = t % L;
      const int64_t pos = (pos0.size() == 1 ? pos0[0] : pos0[b]) + l;
      const float fp = static_cast<float>(pos);
      for (int64_t i = 0; i < R2; ++i) {
        const double ang = static_cast<double>(fp * inv[i]);  // fp32 angle, as torch.outer
        c[i] = static_cast<float>(std::cos(ang));
        s[i] = static_cast<float>(inverse ? -std::sin(ang) : std::sin(ang));
      }
      for (int64_t h = 0; h < nH; ++h) {
        float* row = xp + (t * nH + h) * P;
        for (int64_t i = 0; i < R2; ++i) {
          int64_t ia, ib;
          pair_of(i, R, r.interleaved, ia, ib);
          const float a = row[ia], bb = row[ib];
          row[ia] = a * c[i] - bb * s[i];
          row[ib] = a * s[i] + bb * c[i];
        }
      }
    }
  });
}

// ---- references ---------------------------------------------------------------------------------

std::vector<double> rotary_ref_f64(const std::vector<double>& x, const Shape& shape,
                                   std::span<const int64_t> pos0, const RotaryOpts& r,
                                   bool inverse) {
  check_rotary(shape, pos0, r);
  const int64_t B = shape[0], L = shape[1], nH = shape[2], P = shape[3], R = r.rot_dim;
  std::vector<double> y = x;
  const std::vector<float> inv = inv_freq(r);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const float fp = static_cast<float>((pos0.size() == 1 ? pos0[0] : pos0[b]) + l);
      for (int64_t h = 0; h < nH; ++h)
        for (int64_t i = 0; i < R / 2; ++i) {
          const double ang = static_cast<double>(fp * inv[i]) * (inverse ? -1 : 1);
          int64_t ia, ib;
          pair_of(i, R, r.interleaved, ia, ib);
          const int64_t o = ((b * L + l) * nH + h) * P;
          const double a = x[o + ia], bb = x[o + ib];
          y[o + ia] = a * std::cos(ang) - bb * std::sin(ang);
          y[o + ib] = a * std::sin(ang) + bb * std::cos(ang);
        }
    }
  return y;
}

std::vector<double> attention_ref_f64(const std::vector<double>& q, const std::vector<double>& k,
                                      const std::vector<double>& v, const AttnDims& d,
                                      const AttnOpts& o) {
  const double scale = o.scale != 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(d.P));
  std::vector<double> out(static_cast<size_t>(d.B * d.L * d.H * d.P), 0.0);
  std::vector<double> s(static_cast<size_t>(d.Lk));
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t g = h / (d.H / d.KV);
      for (int64_t i = 0; i < d.L; ++i) {
        const int64_t n = visible(i, d.L, d.Lk, o.causal);
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          double a = 0;
          for (int64_t p = 0; p < d.P; ++p)
            a += q[((b * d.L + i) * d.H + h) * d.P + p] * k[((b * d.Lk + j) * d.KV + g) * d.P + p];
          s[j] = a * scale;
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (int64_t j = 0; j < n; ++j) z += (s[j] = std::exp(s[j] - mx));
        for (int64_t j = 0; j < n; ++j)
          for (int64_t p = 0; p < d.P; ++p)
            out[((b * d.L + i) * d.H + h) * d.P + p] +=
                s[j] / z * v[((b * d.Lk + j) * d.KV + g) * d.P + p];
      }
    }
  return out;
}

namespace {
std::vector<double> f64(const Tensor& t) {
  const Tensor c = t.contiguous();
  return std::vector<double>(c.data(), c.data() + c.numel());
}
Tensor f32_of(const std::vector<double>& v, const Shape& s) {
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(v[i]);
  return t;
}
}  // namespace

Tensor attention_ref(const Tensor& q, const Tensor& k, const Tensor& v, const AttnOpts& o) {
  const Dims d = check_qkv(q, k, v, "attention_ref");
  return f32_of(attention_ref_f64(f64(q), f64(k), f64(v), {d.B, d.L, d.Lk, d.H, d.KV, d.P}, o),
                q.shape());
}

AttnGrads attention_bwd_ref(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout,
                            const AttnOpts& o) {
  const Dims d = check_qkv(q, k, v, "attention_bwd_ref");
  const double scale = o.scale != 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(d.P));
  const std::vector<double> Q = f64(q), K = f64(k), V = f64(v), dO = f64(dout);
  std::vector<double> dq(Q.size(), 0.0), dk(K.size(), 0.0), dv(V.size(), 0.0);
  const int64_t P = d.P;
  std::vector<double> pr(static_cast<size_t>(d.L * d.Lk)), dp(static_cast<size_t>(d.Lk));
  auto qi = [&](int64_t b, int64_t i, int64_t h) { return ((b * d.L + i) * d.H + h) * P; };
  auto kj = [&](int64_t b, int64_t j, int64_t g) { return ((b * d.Lk + j) * d.KV + g) * P; };
  for (int64_t b = 0; b < d.B; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      const int64_t g = h / (d.H / d.KV);
      for (int64_t i = 0; i < d.L; ++i) {  // probabilities, row i (0 where masked)
        const int64_t n = visible(i, d.L, d.Lk, o.causal);
        double mx = -std::numeric_limits<double>::infinity(), z = 0;
        for (int64_t j = 0; j < d.Lk; ++j) {
          double a = 0;
          for (int64_t p = 0; p < P; ++p) a += Q[qi(b, i, h) + p] * K[kj(b, j, g) + p];
          pr[i * d.Lk + j] = a * scale;
          if (j < n) mx = std::max(mx, a * scale);
        }
        for (int64_t j = 0; j < d.Lk; ++j)
          z += (pr[i * d.Lk + j] = j < n ? std::exp(pr[i * d.Lk + j] - mx) : 0.0);
        for (int64_t j = 0; j < d.Lk; ++j) pr[i * d.Lk + j] /= z;
        // dP_j = dO_i . v_j; dS_j = P_j (dP_j - sum_l P_l dP_l)
        double dsum = 0;
        for (int64_t j = 0; j < d.Lk; ++j) {
          double a = 0;
          for (int64_t p = 0; p < P; ++p) a += dO[qi(b, i, h) + p] * V[kj(b, j, g) + p];
          dp[j] = a;
          dsum += pr[i * d.Lk + j] * a;
        }
        for (int64_t j = 0; j < d.Lk; ++j) {
          const double pj = pr[i * d.Lk + j], ds = pj * (dp[j] - dsum) * scale;
          for (int64_t p = 0; p < P; ++p) {
            dq[qi(b, i, h) + p] += ds * K[kj(b, j, g) + p];
            dk[kj(b, j, g) + p] += ds * Q[qi(b, i, h) + p];
            dv[kj(b, j, g) + p] += pj * dO[qi(b, i, h) + p];
          }
        }
      }
    }
  return {f32_of(dq, q.shape()), f32_of(dk, k.shape()), f32_of(dv, v.shape())};
}

}  // namespace mamba::ops
#endif  // HWY_ONCE
