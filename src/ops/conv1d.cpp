// Causal depthwise conv1d, channel-last: forward, backward, decode update, prefill final state,
// and the naive references. The fast kernels vectorise across D with Highway: every tap is a
// contiguous multiply-add of a weight row wT[k, :] (the weight transposed to (K, D)) with an
// input row x[b, t-K+1+k, :].
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/conv1d.cpp"
#include "ops/conv1d.h"

#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// out[d] = (bias ? bias[d] : 0) + sum_k wT[k*ld + d] * src[k][d], skipping taps whose src is null.
// src: K row pointers; wT: (K, ld) rows; d in [0, n).
void TapsKernel(const float* const* src, const float* wT, int64_t ld, int64_t K, const float* bias,
                float* out, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    auto acc = bias ? hn::LoadU(d, bias + i) : hn::Zero(d);
    for (int64_t k = 0; k < K; ++k)
      if (src[k]) acc = hn::MulAdd(hn::LoadU(d, wT + k * ld + i), hn::LoadU(d, src[k] + i), acc);
    hn::StoreU(acc, d, out + i);
  }
  for (; i < n; ++i) {
    float acc = bias ? bias[i] : 0.f;
    for (int64_t k = 0; k < K; ++k)
      if (src[k]) acc += wT[k * ld + i] * src[k][i];
    out[i] = acc;
  }
}

// acc[i] += a[i] * b[i]
void MulAccKernel(float* acc, const float* a, const float* b, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    hn::StoreU(hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), hn::LoadU(d, acc + i)), d,
               acc + i);
  for (; i < n; ++i) acc[i] += a[i] * b[i];
}

// acc[i] += a[i]
void AddKernel(float* acc, const float* a, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N)
    hn::StoreU(hn::Add(hn::LoadU(d, a + i), hn::LoadU(d, acc + i)), d, acc + i);
  for (; i < n; ++i) acc[i] += a[i];
}

// The decode update of n channels with K = 4 taps (state rows of 4 values, channel-major):
// state <- [s1, s2, s3, x], y = (bias or 0) + w0 s1 + w1 s2 + w2 s3 + w3 x, summed in that order
// with each product and sum rounded (no fused multiply-add, Rounded): per lane the scalar loop's
// arithmetic (causal_conv1d_update_rows), 4 state rows de-interleaved per lane group. Handles
// the whole vectors of [0, n) and returns how many channels it did; the caller does the rest.
// v unchanged, but opaque to the compiler: a product passed through it is not contracted with
// the following add into a fused multiply-add (GCC contracts vector mul + add too on targets
// with FMA; clang contracts only within one source expression, and does not need it).
template <class V>
HWY_INLINE V Rounded(V v) {
#if HWY_TARGET != HWY_SCALAR && HWY_ARCH_X86 && defined(__GNUC__) && !defined(__clang__)
  asm("" : "+v"(v.raw));
#endif
  return v;
}

int64_t Update4Kernel(float* st, const float* x, const float* w, const float* bias, float* y,
                      int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    hn::Vec<decltype(d)> s0, s1, s2, s3, w0, w1, w2, w3;
    hn::LoadInterleaved4(d, st + 4 * i, s0, s1, s2, s3);
    hn::LoadInterleaved4(d, w + 4 * i, w0, w1, w2, w3);
    (void)s0;  // rolled out
    const auto xv = hn::LoadU(d, x + i);
    auto acc = bias ? hn::LoadU(d, bias + i) : hn::Zero(d);
    acc = hn::Add(acc, Rounded(hn::Mul(w0, s1)));
    acc = hn::Add(acc, Rounded(hn::Mul(w1, s2)));
    acc = hn::Add(acc, Rounded(hn::Mul(w2, s3)));
    acc = hn::Add(acc, Rounded(hn::Mul(w3, xv)));
    hn::StoreInterleaved4(s1, s2, s3, xv, d, st + 4 * i);
    hn::StoreU(acc, d, y + i);
  }
  return i;
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <algorithm>
#include <cmath>
#include <vector>

#include "mamba/parallel.h"
#include "ops/act.h"

namespace mamba::ops {
HWY_EXPORT(TapsKernel);
HWY_EXPORT(MulAccKernel);
HWY_EXPORT(AddKernel);
HWY_EXPORT(Update4Kernel);

namespace {

struct ConvDims {
  int64_t B, L, D, K;
  bool reverse = false;
  bool has_init = false;  // an initial conv_state: taps before t = 0 read it (causal only)
  // Source time of tap k for output time t (causal: t-K+1+k; reverse: t+K-1-k); may fall
  // outside [0, L) (a zero tap).
  int64_t src(int64_t t, int64_t k) const { return reverse ? t + K - 1 - k : t - K + 1 + k; }
  // The output time whose tap k reads source time s (the inverse of src).
  int64_t dst(int64_t s, int64_t k) const { return reverse ? s - K + 1 + k : s + K - 1 - k; }
  bool in(int64_t t) const { return t >= 0 && t < L; }
};

// Validates x (B, L, D), weight (D, K), bias (D) optional, initial_state (B, D, K) optional;
// names the offending tensor.
ConvDims check_conv(const char* what, const Tensor& x, const Tensor& weight, const Tensor& bias,
                    bool reverse, const Tensor& initial_state = Tensor()) {
  check_defined(x, str(what, ": x").c_str());
  check_defined(weight, str(what, ": weight").c_str());
  MAMBA_CHECK(x.ndim() == 3, what, ": x must be (B, L, D), got ", x.shape_str());
  MAMBA_CHECK(weight.ndim() == 2, what, ": weight must be (D, K), got ", weight.shape_str());
  ConvDims c{x.dim(0), x.dim(1), x.dim(2), weight.dim(1), reverse};
  MAMBA_CHECK(c.K >= 1, what, ": d_conv K must be >= 1, got weight ", weight.shape_str());
  check_shape(weight, str(what, ": weight").c_str(), {c.D, c.K});
  if (bias.defined()) check_shape(bias, str(what, ": bias").c_str(), {c.D});
  if (initial_state.defined()) {
    MAMBA_CHECK(!reverse, what, ": an initial state needs the causal direction (reverse = false)");
    check_shape(initial_state, str(what, ": initial_state").c_str(), {c.B, c.D, c.K});
    c.has_init = true;
  }
  return c;
}

// The inputs before t = 0 an initial conv_state (B, D, K) provides, channel-last: (B, K-1, D),
// row j = input at time j - (K-1), i.e. state[b, :, j + 1] (state[b, :, 0] is the oldest input,
// which no tap of the continued sequence reaches).
std::vector<float> history_rows(const Tensor& state, int64_t B, int64_t D, int64_t K) {
  std::vector<float> h(static_cast<size_t>(B * (K - 1) * D));
  const float* s = state.data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j + 1 < K; ++j)
      for (int64_t d = 0; d < D; ++d) h[(b * (K - 1) + j) * D + d] = s[(b * D + d) * K + j + 1];
  return h;
}

// weight (D, K) -> wT (K, D)
std::vector<float> transpose_weight(const Tensor& weight, int64_t D, int64_t K) {
  std::vector<float> wT(static_cast<size_t>(D * K));
  for (int64_t d = 0; d < D; ++d)
    for (int64_t k = 0; k < K; ++k) wT[k * D + d] = weight[d * K + k];
  return wT;
}

// One output column block: channels [c0, c0 + n) to y (B, L, n).
struct OutBlock {
  float* y;
  int64_t c0, n;
};

// pre-activation forward (no SiLU): y (B, L, D). hist: history_rows of an initial state, or null
// (zeros before t = 0). With `blocks`, the output goes to those column blocks instead of y.
void conv_pre(const ConvDims& c, const float* x, const float* wT, const float* bias, float* y,
              const float* hist = nullptr, bool silu = false,
              const std::vector<OutBlock>* blocks = nullptr) {
  const int64_t rows = c.B * c.L;
  parallel_for(rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(c.D * c.K, 1)),
               [&](int64_t r0, int64_t r1) {
                 std::vector<const float*> src(static_cast<size_t>(c.K)), sb(src);
                 for (int64_t r = r0; r < r1; ++r) {
                   const int64_t t = r % c.L;
                   for (int64_t k = 0; k < c.K; ++k) {
                     const int64_t s = c.src(t, k);  // source time of tap k
                     src[k] = c.in(s) ? x + (r - t + s) * c.D
                              : (hist && s < 0)
                                  ? hist + ((r / c.L) * (c.K - 1) + (c.K - 1 + s)) * c.D
                                  : nullptr;
                   }
                   if (blocks) {
                     for (const OutBlock& o : *blocks) {
                       for (int64_t k = 0; k < c.K; ++k) sb[k] = src[k] ? src[k] + o.c0 : nullptr;
                       float* yr = o.y + r * o.n;
                       HWY_DYNAMIC_DISPATCH(TapsKernel)
                       (sb.data(), wT + o.c0, c.D, c.K, bias ? bias + o.c0 : nullptr, yr, o.n);
                       if (silu) ops::silu(yr, yr, o.n);
                     }
                     continue;
                   }
                   HWY_DYNAMIC_DISPATCH(TapsKernel)
                   (src.data(), wT, c.D, c.K, bias, y + r * c.D, c.D);
                   // the activation on the row while it is in cache (and on every thread)
                   if (silu) ops::silu(y + r * c.D, y + r * c.D, c.D);
                 }
               });
}

}  // namespace

Tensor causal_conv1d_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu,
                         bool reverse, const Tensor& initial_state) {
  const ConvDims c = check_conv("causal_conv1d_fwd", x, weight, bias, reverse, initial_state);
  Tensor y = Tensor::empty({c.B, c.L, c.D});
  const std::vector<float> wT = transpose_weight(weight, c.D, c.K);
  const std::vector<float> hist =
      c.has_init ? history_rows(initial_state, c.B, c.D, c.K) : std::vector<float>();
  conv_pre(c, x.data(), wT.data(), bias.defined() ? bias.data() : nullptr, y.data(),
           c.has_init ? hist.data() : nullptr, silu);
  return y;
}

std::vector<Tensor> causal_conv1d_fwd_split(const Tensor& x, const Tensor& weight,
                                            const Tensor& bias, bool silu,
                                            const Tensor& initial_state,
                                            const std::vector<int64_t>& widths) {
  const ConvDims c = check_conv("causal_conv1d_fwd_split", x, weight, bias, false, initial_state);
  int64_t total = 0;
  for (int64_t w : widths) {
    MAMBA_CHECK(w >= 0, "causal_conv1d_fwd_split: negative width ", w);
    total += w;
  }
  MAMBA_CHECK(total == c.D, "causal_conv1d_fwd_split: the widths sum to ", total,
              ", not D = ", c.D);
  std::vector<Tensor> out;
  std::vector<OutBlock> blocks;
  int64_t c0 = 0;
  for (int64_t w : widths) {
    out.push_back(Tensor::empty({c.B, c.L, w}));
    if (w > 0) blocks.push_back({out.back().data(), c0, w});
    c0 += w;
  }
  const std::vector<float> wT = transpose_weight(weight, c.D, c.K);
  const std::vector<float> hist =
      c.has_init ? history_rows(initial_state, c.B, c.D, c.K) : std::vector<float>();
  conv_pre(c, x.data(), wT.data(), bias.defined() ? bias.data() : nullptr, nullptr,
           c.has_init ? hist.data() : nullptr, silu, &blocks);
  return out;
}

Conv1dGrads causal_conv1d_bwd(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu,
                              const Tensor& dy, bool reverse) {
  const ConvDims c = check_conv("causal_conv1d_bwd", x, weight, bias, reverse);
  check_shape(dy, "causal_conv1d_bwd: dy", {c.B, c.L, c.D});
  const std::vector<float> wT = transpose_weight(weight, c.D, c.K);
  // dpre = dy * act'(pre): (B, L, D)
  Tensor dpre;
  if (silu) {
    dpre = Tensor::empty({c.B, c.L, c.D});
    conv_pre(c, x.data(), wT.data(), bias.defined() ? bias.data() : nullptr, dpre.data());
    ops::silu_bwd(dpre.data(), dy.data(), dpre.data(), dpre.numel());
  } else {
    dpre = dy;
  }
  const float* g = dpre.data();
  const float* xp = x.data();
  Conv1dGrads out;
  // dx[b, s, :] = sum_k wT[k, :] * dpre[b, dst(s, k), :]   (dst = s+K-1-k causal, s-K+1+k
  // reverse; taps outside [0, L) are absent)
  out.dx = Tensor::empty({c.B, c.L, c.D});
  float* dx = out.dx.data();
  parallel_for(c.B * c.L, std::max<int64_t>(1, 4096 / std::max<int64_t>(c.D * c.K, 1)),
               [&](int64_t r0, int64_t r1) {
                 std::vector<const float*> src(static_cast<size_t>(c.K));
                 for (int64_t r = r0; r < r1; ++r) {
                   const int64_t s = r % c.L;
                   for (int64_t k = 0; k < c.K; ++k) {
                     const int64_t t = c.dst(s, k);
                     src[k] = c.in(t) ? g + (r - s + t) * c.D : nullptr;
                   }
                   HWY_DYNAMIC_DISPATCH(TapsKernel)
                   (src.data(), wT.data(), c.D, c.K, nullptr, dx + r * c.D, c.D);
                 }
               });
  // dwT[k, :] = sum_{b,t} dpre[b,t,:] * x[b, src(t, k), :]; dbias = sum dpre. Split over
  // channel blocks so each thread owns its outputs (no reduction, deterministic).
  std::vector<float> dwT(static_cast<size_t>(c.K * c.D), 0.f);
  std::vector<float> db(static_cast<size_t>(c.D), 0.f);
  const int64_t blk = 64;
  const int64_t nblk = (c.D + blk - 1) / blk;
  parallel_for(nblk, 1, [&](int64_t q0, int64_t q1) {
    const int64_t d0 = q0 * blk, n = std::min(c.D, q1 * blk) - d0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t t = 0; t < c.L; ++t) {
        const float* gr = g + (b * c.L + t) * c.D + d0;
        for (int64_t k = 0; k < c.K; ++k) {
          const int64_t s = c.src(t, k);
          if (c.in(s)) {
            HWY_DYNAMIC_DISPATCH(MulAccKernel)
            (dwT.data() + k * c.D + d0, gr, xp + (b * c.L + s) * c.D + d0, n);
          }
        }
        HWY_DYNAMIC_DISPATCH(AddKernel)(db.data() + d0, gr, n);
      }
  });
  out.dweight = Tensor::empty({c.D, c.K});
  for (int64_t d = 0; d < c.D; ++d)
    for (int64_t k = 0; k < c.K; ++k) out.dweight[d * c.K + k] = dwT[k * c.D + d];
  if (bias.defined()) out.dbias = Tensor::from({c.D}, db);
  return out;
}

std::vector<double> causal_conv1d_ref_f64(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                          bool silu, bool reverse, const Tensor& initial_state) {
  const ConvDims c = check_conv("causal_conv1d_ref", x, weight, bias, reverse, initial_state);
  std::vector<double> y(static_cast<size_t>(c.B * c.L * c.D));
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.L; ++t)
      for (int64_t d = 0; d < c.D; ++d) {
        double acc = bias.defined() ? bias[d] : 0.0;
        for (int64_t k = 0; k < c.K; ++k) {
          const int64_t s = c.src(t, k);
          if (c.in(s)) {
            acc += (double)weight[d * c.K + k] * x[(b * c.L + s) * c.D + d];
          } else if (c.has_init && s < 0) {  // input at time s < 0: the state's entry K + s
            acc += (double)weight[d * c.K + k] * initial_state[(b * c.D + d) * c.K + c.K + s];
          }
        }
        if (silu) acc = acc / (1.0 + std::exp(-acc));
        y[(b * c.L + t) * c.D + d] = acc;
      }
  return y;
}

Tensor causal_conv1d_ref(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu,
                         bool reverse, const Tensor& initial_state) {
  const std::vector<double> y =
      causal_conv1d_ref_f64(x, weight, bias, silu, reverse, initial_state);
  Tensor out = Tensor::empty({x.dim(0), x.dim(1), x.dim(2)});
  for (int64_t i = 0; i < out.numel(); ++i) out[i] = static_cast<float>(y[i]);
  return out;
}

Conv1dGrads causal_conv1d_bwd_ref(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  bool silu, const Tensor& dy, bool reverse) {
  const ConvDims c = check_conv("causal_conv1d_bwd_ref", x, weight, bias, reverse);
  check_shape(dy, "causal_conv1d_bwd_ref: dy", {c.B, c.L, c.D});
  std::vector<double> dx(x.numel(), 0.0), dw(weight.numel(), 0.0), db(c.D, 0.0);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.L; ++t)
      for (int64_t d = 0; d < c.D; ++d) {
        double pre = bias.defined() ? bias[d] : 0.0;
        for (int64_t k = 0; k < c.K; ++k) {
          const int64_t s = c.src(t, k);
          if (c.in(s)) pre += (double)weight[d * c.K + k] * x[(b * c.L + s) * c.D + d];
        }
        double g = dy[(b * c.L + t) * c.D + d];
        if (silu) {
          const double sg = 1.0 / (1.0 + std::exp(-pre));
          g *= sg * (1.0 + pre * (1.0 - sg));
        }
        db[d] += g;
        for (int64_t k = 0; k < c.K; ++k) {
          const int64_t s = c.src(t, k);
          if (!c.in(s)) continue;
          dw[d * c.K + k] += g * x[(b * c.L + s) * c.D + d];
          dx[(b * c.L + s) * c.D + d] += g * weight[d * c.K + k];
        }
      }
  auto to_f = [](const std::vector<double>& v, Shape s) {
    Tensor t = Tensor::empty(std::move(s));
    for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(v[i]);
    return t;
  };
  Conv1dGrads out;
  out.dx = to_f(dx, x.shape());
  out.dweight = to_f(dw, weight.shape());
  if (bias.defined()) out.dbias = to_f(db, {c.D});
  return out;
}

Tensor causal_conv1d_update(Tensor& conv_state, const Tensor& x, const Tensor& weight,
                            const Tensor& bias, bool silu) {
  check_defined(x, "causal_conv1d_update: x");
  check_defined(weight, "causal_conv1d_update: weight");
  MAMBA_CHECK(x.ndim() == 2, "causal_conv1d_update: x must be (B, D), got ", x.shape_str());
  MAMBA_CHECK(weight.ndim() == 2, "causal_conv1d_update: weight must be (D, K), got ",
              weight.shape_str());
  const int64_t B = x.dim(0), D = x.dim(1), K = weight.dim(1);
  MAMBA_CHECK(K >= 1, "causal_conv1d_update: d_conv K must be >= 1, got weight ",
              weight.shape_str());
  check_shape(weight, "causal_conv1d_update: weight", {D, K});
  check_shape(conv_state, "causal_conv1d_update: conv_state", {B, D, K});
  if (bias.defined()) check_shape(bias, "causal_conv1d_update: bias", {D});
  Tensor y = Tensor::empty({B, D});
  float* st = conv_state.data();
  const float *xp = x.data(), *wp = weight.data(), *bp = bias.defined() ? bias.data() : nullptr;
  float* yp = y.data();
  // (batch, channel) rows are independent: pieces of >= 1024 rows (a few us; a decode step runs
  // in a team, mamba/parallel.h, where a hand-off costs well under that).
  parallel_for(B * D, 1024, [&](int64_t i0, int64_t i1) {
    causal_conv1d_update_rows(st, xp, wp, bp, yp, D, K, i0, i1, silu);
  });
  return y;
}

void causal_conv1d_update_rows(float* conv_state, const float* x, const float* weight,
                               const float* bias, float* y, int64_t D, int64_t K, int64_t i0,
                               int64_t i1, bool silu) {
  // Segments of [i0, i1) within one batch row: K = 4 (the usual d_conv) by vectors over the
  // channels first, then (and for other K) one channel at a time; the same arithmetic.
  for (int64_t i = i0; i < i1;) {
    const int64_t d0 = i % D, e = std::min(i1, i - d0 + D);
    if (K == 4)
      i += HWY_DYNAMIC_DISPATCH(Update4Kernel)(conv_state + 4 * i, x + i, weight + 4 * d0,
                                               bias ? bias + d0 : nullptr, y + i, e - i);
    for (int64_t d = i % D; i < e; ++i, ++d) {
      float* s = conv_state + i * K;
      for (int64_t k = 0; k + 1 < K; ++k) s[k] = s[k + 1];  // roll left by one
      s[K - 1] = x[i];
      float acc = bias ? bias[d] : 0.f;
      for (int64_t k = 0; k < K; ++k) acc += weight[d * K + k] * s[k];
      y[i] = acc;
    }
  }
  if (silu && i1 > i0) ops::silu(y + i0, y + i0, i1 - i0);
}

// The state after x from a zero (left-padded) window: the window advanced past x.
void causal_conv1d_final_state(const Tensor& x, Tensor& conv_state) {
  check_defined(conv_state, "causal_conv1d_final_state: conv_state");
  conv_state.zero();
  causal_conv1d_advance_state(conv_state, x);
}

void causal_conv1d_advance_state(Tensor& conv_state, const Tensor& x) {
  check_defined(x, "causal_conv1d_advance_state: x");
  MAMBA_CHECK(x.ndim() == 3, "causal_conv1d_advance_state: x must be (B, L, D), got ",
              x.shape_str());
  const int64_t B = x.dim(0), L = x.dim(1), D = x.dim(2);
  check_defined(conv_state, "causal_conv1d_advance_state: conv_state");
  MAMBA_CHECK(conv_state.ndim() == 3 && conv_state.dim(2) >= 1,
              "causal_conv1d_advance_state: conv_state must be (B, D, K) with K >= 1, got ",
              conv_state.shape_str());
  const int64_t K = conv_state.dim(2);
  check_shape(conv_state, "causal_conv1d_advance_state: conv_state", {B, D, K});
  float* st = conv_state.data();
  const float* xp = x.data();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d) {
      float* s = st + (b * D + d) * K;
      // Entry k of the new state is the input at time L - K + k of the continued sequence: from
      // x when that time is >= 0, else the old state's entry k + L (ascending k reads ahead of
      // where it writes, so the shift is in place).
      for (int64_t k = 0; k < K; ++k) {
        const int64_t t = L - K + k;
        s[k] = t >= 0 ? xp[(b * L + t) * D + d] : s[k + L];
      }
    }
}

}  // namespace mamba::ops
#endif  // HWY_ONCE
