// SSD (Mamba-2 scan): the sequential reference, the chunked CPU algorithm (forward and backward
// side by side) and the single-token state update. See include/mamba/ops/ssd.h for the math.
//
// Chunked algorithm, per (batch b, head h), chunk c of Q positions starting at t0, with the
// local cumulative log-decay cs_i = sum_{k<=i} dt_k A (i = 0..Q-1) and the entering state S:
//   y_i   = exp(cs_i) C_i S^T  +  sum_{j<=i} (C_i . B_j) exp(cs_i - cs_j) dt_j x_j
//         = diag(exp(cs)) C S^T + M X,     M = (C B^T) o E o dt^T,  E_ij = exp(cs_i - cs_j), j <= i
//   S'    = exp(cs_last) S + X^T diag(w) B,  w_j = exp(cs_last - cs_j) dt_j
// C B^T is shared by the heads of one group and computed once per (b, g, chunk).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/ssd.cpp"
#include "mamba/ops/ssd.h"

#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "core/gemm.h"
#include "mamba/parallel.h"
#include "ops/act.h"
#include "ops/simd_math-inl.h"
#include "ops/ssd_kernels.h"

// The decode kernel (compiled once per SIMD target): for each of the P rows of one head's
// state, s = s * dA + (dt x_p) B and y_p = s . C, in one pass over the row.
HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// state: (P, N) rows; x: (P); y: (P) receives s . C (fp32 lanes, summed at the end)
void StateRowsKernel(float* state, const float* x, const float* Bv, const float* Cv, float dA,
                     float dt, int64_t P, int64_t N, float* y) {
  const hn::ScalableTag<float> d;
  const int64_t V = static_cast<int64_t>(hn::Lanes(d));
  const auto vdA = hn::Set(d, dA);
  for (int64_t p = 0; p < P; ++p) {
    float* s = state + p * N;
    const float dx = dt * x[p];
    const auto vdx = hn::Set(d, dx);
    auto acc = hn::Zero(d);
    int64_t n = 0;
    for (; n + V <= N; n += V) {
      const auto sv = hn::MulAdd(hn::LoadU(d, s + n), vdA, hn::Mul(vdx, hn::LoadU(d, Bv + n)));
      hn::StoreU(sv, d, s + n);
      acc = hn::MulAdd(sv, hn::LoadU(d, Cv + n), acc);
    }
    float tail = 0.f;
    for (; n < N; ++n) {
      s[n] = s[n] * dA + dx * Bv[n];
      tail += s[n] * Cv[n];
    }
    y[p] = hn::GetLane(hn::SumOfLanes(d, acc)) + tail;
  }
}

// ---- The chunk products of the prefill (src/ops/ssd_kernels.h) ------------------------------
// A register tile of kSsdRows output rows x NV vectors of columns, over the whole inner
// dimension. Rows past `rows` (the last tile of a block) repeat row rows - 1 and are not stored.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
constexpr int kSsdRows = 6, kSsdVecs = 4;  // 24 of the 32 vector registers accumulate
#else
constexpr int kSsdRows = 4, kSsdVecs = 2;
#endif

// acc[r][v] += sum over k < K of a[r][k] * Bm[k * ldb + v * lanes]: a row tile's rank-K update
// (row r's multipliers from its own row a[r], the K rows of Bm broadcast against them).
template <int R, int NV, class D, class V>
HWY_INLINE void TileRankK(D d, V (&acc)[R][NV], const float* const (&a)[R],
                          const float* HWY_RESTRICT Bm, int64_t ldb, int64_t K) {
  const int64_t NL = static_cast<int64_t>(hn::Lanes(d));
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = hn::LoadU(d, Bm + k * ldb + v * NL);
    for (int r = 0; r < R; ++r) {
      const V ar = hn::Set(d, a[r][k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = hn::MulAdd(ar, b[v], acc[r][v]);
    }
  }
}

// Y rows [0, rows) of one row tile, NV vectors of columns from column 0 of ST / X / Y (the
// caller offsets them): ecs[r] * (C ST)[r] + (M X)[r] over j < J (M zero above its diagonal).
template <int NV>
HWY_INLINE void SsdYTile(int64_t rows, int64_t N, const float* HWY_RESTRICT C, int64_t ldc,
                         const float* HWY_RESTRICT ST, int64_t P, const float* HWY_RESTRICT ecs,
                         const float* HWY_RESTRICT M, int64_t ldm, int64_t J,
                         const float* HWY_RESTRICT X, int64_t ldx, float* HWY_RESTRICT Y,
                         int64_t ldy) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  constexpr int R = kSsdRows;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(d));
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = hn::Zero(d);
  if (ST) {
    const float* c[R];
    for (int r = 0; r < R; ++r) c[r] = C + std::min<int64_t>(r, rows - 1) * ldc;
    TileRankK<R, NV>(d, acc, c, ST, P, N);
    for (int r = 0; r < R; ++r) {
      const V e = hn::Set(d, ecs[std::min<int64_t>(r, rows - 1)]);
      for (int v = 0; v < NV; ++v) acc[r][v] = hn::Mul(acc[r][v], e);
    }
  }
  const float* m[R];
  for (int r = 0; r < R; ++r) m[r] = M + std::min<int64_t>(r, rows - 1) * ldm;
  TileRankK<R, NV>(d, acc, m, X, ldx, J);
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    for (int v = 0; v < NV; ++v) hn::StoreU(acc[r][v], d, Y + r * ldy + v * NL);
  }
}

// ST rows [0, rows) of one row tile (the caller offsets B by the first row's n and ST by its row
// and column): decay * ST + sum_j B[j][r] Xw[j].
template <int NV>
HWY_INLINE void SsdStateTile(int64_t rows, int64_t Qc, const float* HWY_RESTRICT B, int64_t ldb,
                             const float* HWY_RESTRICT Xw, int64_t ldxw, float decay,
                             float* HWY_RESTRICT ST, int64_t P) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  constexpr int R = kSsdRows;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(d));
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = hn::Zero(d);
  int64_t off[R];
  for (int r = 0; r < R; ++r) off[r] = std::min<int64_t>(r, rows - 1);
  for (int64_t j = 0; j < Qc; ++j) {
    V b[NV];
    for (int v = 0; v < NV; ++v) b[v] = hn::LoadU(d, Xw + j * ldxw + v * NL);
    const float* bj = B + j * ldb;
    for (int r = 0; r < R; ++r) {
      const V a = hn::Set(d, bj[off[r]]);
      for (int v = 0; v < NV; ++v) acc[r][v] = hn::MulAdd(a, b[v], acc[r][v]);
    }
  }
  const V dec = hn::Set(d, decay);
  for (int r = 0; r < R; ++r) {
    if (r >= rows) break;
    for (int v = 0; v < NV; ++v) {
      float* s = ST + r * P + v * NL;
      hn::StoreU(hn::MulAdd(hn::LoadU(d, s), dec, acc[r][v]), d, s);
    }
  }
}

// Picks the widest tile <= nv vectors (NV = kSsdVecs first).
template <int NV, class F>
HWY_INLINE int64_t SsdColBlock(int64_t nv, const F& f) {
  if constexpr (NV > 1) {
    if (nv < NV) return SsdColBlock<NV - 1>(nv, f);
  }
  f(std::integral_constant<int, NV>());
  return NV;
}

// One head's chunk of decay factors, from its cumulative log-decay cs (double, Qc values, read up
// to Lanes - 1 past the end) and dt (idem), the chunk's C B^T rows cb [ldcb] (idem):
//   M[i][j] = cb[i][j] * e_ij * dt[j] for j <= i, 0 for i < j < Qc, plus dself on the diagonal
//   w[j] = e_{Qc-1,j} * dt[j],   ecs[i] = exp(min(cs_i, 88)),   e_ij = exp(float(min(cs_i - cs_j,
//   88)))
// (the differences in double, the exponentials in float); M rows are written up to a whole
// number of half vectors past j = i, so M needs that many floats past its last row.
void SsdChunkDecayKernel(int64_t Qc, const double* cs, const float* dt, const float* cb,
                         int64_t ldcb, float dself, float* M, int64_t ldm, float* w, float* ecs) {
  namespace sm = simd_math;
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> df;  // as many float lanes as double lanes
  const int64_t K = static_cast<int64_t>(hn::Lanes(dd));
  const auto v88 = hn::Set(dd, 88.0);
  for (int64_t i = 0; i < Qc; ++i) {
    const auto ci = hn::Set(dd, cs[i]);
    float* Mi = M + i * ldm;
    const float* cbi = cb + i * ldcb;
    int64_t j0 = 0;
    for (; j0 <= i; j0 += K) {
      const auto e =
          sm::Exp(df, hn::DemoteTo(df, hn::Min(hn::Sub(ci, hn::LoadU(dd, cs + j0)), v88)));
      const auto dtv = hn::LoadU(df, dt + j0);
      auto m = hn::Mul(hn::Mul(hn::LoadU(df, cbi + j0), e), dtv);
      if (i == Qc - 1) hn::StoreU(hn::Mul(e, dtv), df, w + j0);
      if (j0 + K > i + 1)
        m = hn::IfThenElseZero(hn::FirstN(df, static_cast<size_t>(i + 1 - j0)), m);
      hn::StoreU(m, df, Mi + j0);
    }
    for (int64_t j = j0; j < Qc; ++j) Mi[j] = 0.f;
    Mi[i] += dself;
  }
  int64_t i0 = 0;
  for (; i0 < Qc; i0 += K)
    hn::StoreU(sm::Exp(df, hn::DemoteTo(df, hn::Min(hn::LoadU(dd, cs + i0), v88))), df, ecs + i0);
}

void SsdChunkYKernel(int64_t Qc, int64_t P, int64_t N, const float* C, int64_t ldc, const float* ST,
                     const float* ecs, const float* M, int64_t ldm, const float* X, int64_t ldx,
                     float* Y, int64_t ldy) {
  const int64_t NL = static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>()));
  const int64_t nvec = P / NL, P0 = nvec * NL;
  for (int64_t i0 = 0; i0 < Qc; i0 += kSsdRows) {
    const int64_t rows = std::min<int64_t>(kSsdRows, Qc - i0), J = i0 + rows;
    for (int64_t v0 = 0; v0 < nvec;) {
      const int64_t p0 = v0 * NL;
      v0 += SsdColBlock<kSsdVecs>(nvec - v0, [&](auto tag) {
        SsdYTile<decltype(tag)::value>(rows, N, C + i0 * ldc, ldc, ST ? ST + p0 : nullptr, P,
                                       ecs + i0, M + i0 * ldm, ldm, J, X + p0, ldx,
                                       Y + i0 * ldy + p0, ldy);
      });
    }
  }
  // columns past the last whole vector: the same sums, plain loops
  for (int64_t i = 0; i < Qc; ++i)
    for (int64_t p = P0; p < P; ++p) {
      float acc = 0.f;
      if (ST) {
        for (int64_t n = 0; n < N; ++n) acc += C[i * ldc + n] * ST[n * P + p];
        acc *= ecs[i];
      }
      for (int64_t j = 0; j <= i; ++j) acc += M[i * ldm + j] * X[j * ldx + p];
      Y[i * ldy + p] = acc;
    }
}

void SsdChunkStateKernel(int64_t Qc, int64_t P, int64_t N, const float* B, int64_t ldb,
                         const float* Xw, int64_t ldxw, float decay, float* ST) {
  const int64_t NL = static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>()));
  const int64_t nvec = P / NL, P0 = nvec * NL;
  for (int64_t n0 = 0; n0 < N; n0 += kSsdRows) {
    const int64_t rows = std::min<int64_t>(kSsdRows, N - n0);
    for (int64_t v0 = 0; v0 < nvec;) {
      const int64_t p0 = v0 * NL;
      v0 += SsdColBlock<kSsdVecs>(nvec - v0, [&](auto tag) {
        SsdStateTile<decltype(tag)::value>(rows, Qc, B + n0, ldb, Xw + p0, ldxw, decay,
                                           ST + n0 * P + p0, P);
      });
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = P0; p < P; ++p) {
      float acc = 0.f;
      for (int64_t j = 0; j < Qc; ++j) acc += B[j * ldb + n] * Xw[j * ldxw + p];
      ST[n * P + p] = ST[n * P + p] * decay + acc;
    }
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba::ops {
HWY_EXPORT(StateRowsKernel);
HWY_EXPORT(SsdChunkYKernel);
HWY_EXPORT(SsdChunkStateKernel);
HWY_EXPORT(SsdChunkDecayKernel);

void ssd_chunk_decay(int64_t Qc, const double* cs, const float* dt, const float* cb, int64_t ldcb,
                     float dself, float* M, int64_t ldm, float* w, float* ecs) {
  HWY_DYNAMIC_DISPATCH(SsdChunkDecayKernel)(Qc, cs, dt, cb, ldcb, dself, M, ldm, w, ecs);
}

void ssd_chunk_decay_ref(int64_t Qc, const double* cs, const float* dt, const float* cb,
                         int64_t ldcb, float dself, float* M, int64_t ldm, float* w, float* ecs) {
  for (int64_t i = 0; i < Qc; ++i) {
    for (int64_t j = 0; j < Qc; ++j) {
      const float e = std::exp(static_cast<float>(std::min(cs[i] - cs[j], 88.0)));
      M[i * ldm + j] = j <= i ? cb[i * ldcb + j] * e * dt[j] : 0.f;
      if (i == Qc - 1) w[j] = e * dt[j];
    }
    M[i * ldm + i] += dself;
    ecs[i] = std::exp(static_cast<float>(std::min(cs[i], 88.0)));
  }
}

void ssd_chunk_y(int64_t Qc, int64_t P, int64_t N, const float* C, int64_t ldc, const float* ST,
                 const float* ecs, const float* M, int64_t ldm, const float* X, int64_t ldx,
                 float* Y, int64_t ldy) {
  HWY_DYNAMIC_DISPATCH(SsdChunkYKernel)(Qc, P, N, C, ldc, ST, ecs, M, ldm, X, ldx, Y, ldy);
}

void ssd_chunk_state(int64_t Qc, int64_t P, int64_t N, const float* B, int64_t ldb, const float* Xw,
                     int64_t ldxw, float decay, float* ST) {
  HWY_DYNAMIC_DISPATCH(SsdChunkStateKernel)(Qc, P, N, B, ldb, Xw, ldxw, decay, ST);
}

void ssd_chunk_y_ref(int64_t Qc, int64_t P, int64_t N, const float* C, int64_t ldc, const float* ST,
                     const float* ecs, const float* M, int64_t ldm, const float* X, int64_t ldx,
                     float* Y, int64_t ldy) {
  for (int64_t i = 0; i < Qc; ++i)
    for (int64_t p = 0; p < P; ++p) {
      double inter = 0, intra = 0;
      if (ST)
        for (int64_t n = 0; n < N; ++n) inter += double(C[i * ldc + n]) * ST[n * P + p];
      for (int64_t j = 0; j <= i; ++j) intra += double(M[i * ldm + j]) * X[j * ldx + p];
      Y[i * ldy + p] = static_cast<float>(double(ecs ? ecs[i] : 0.f) * inter + intra);
    }
}

void ssd_chunk_state_ref(int64_t Qc, int64_t P, int64_t N, const float* B, int64_t ldb,
                         const float* Xw, int64_t ldxw, float decay, float* ST) {
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < P; ++p) {
      double acc = double(decay) * ST[n * P + p];
      for (int64_t j = 0; j < Qc; ++j) acc += double(B[j * ldb + n]) * Xw[j * ldxw + p];
      ST[n * P + p] = static_cast<float>(acc);
    }
}

namespace {

struct Dims {
  int64_t B, L, H, P, G, N, hpg;  // hpg: heads per group
  bool d_hdim = false;            // D is (H, P)
};

Dims dims_of(const SsdArgs& a) {
  check_defined(a.x, "ssd: x");
  MAMBA_CHECK(a.x.ndim() == 4, "ssd: x must be (B, L, H, P), got ", a.x.shape_str());
  Dims d;
  d.B = a.x.dim(0), d.L = a.x.dim(1), d.H = a.x.dim(2), d.P = a.x.dim(3);
  check_defined(a.B, "ssd: B");
  MAMBA_CHECK(a.B.ndim() == 4, "ssd: B must be (B, L, G, N), got ", a.B.shape_str());
  d.G = a.B.dim(2), d.N = a.B.dim(3);
  MAMBA_CHECK(d.G > 0 && d.H % d.G == 0, "ssd: ngroups G=", d.G, " (from B ", a.B.shape_str(),
              ") must divide the number of heads H=", d.H);
  d.hpg = d.H / d.G;
  return d;
}

// parallel_for grain for tasks of `work` multiply-adds each: at least ~32K per task, so tiny
// problems run inline instead of paying for a thread wake-up.
int64_t grain_for(int64_t work) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work, 1)); }

bool has_limit(const SsdArgs& a) {
  return !(a.dt_min == 0.f && a.dt_max == std::numeric_limits<float>::infinity());
}

template <class T>
T softplus_t(T v) {
  return v > T(20) ? v : std::log1p(std::exp(v));
}

// dt' = clamp(softplus?(dt + bias)); also the factor d dt' / d dt (0 where clamped).
template <class T>
T process_dt(T v, T bias, bool sp, bool limit, T lo, T hi, T* deriv) {
  v += bias;
  T dv = 1;
  if (sp) {
    dv = v > T(20) ? T(1) : T(1) / (T(1) + std::exp(-v));
    v = softplus_t(v);
  }
  if (limit) {
    if (v < lo)
      v = lo, dv = 0;
    else if (v > hi)
      v = hi, dv = 0;
  }
  if (deriv) *deriv = dv;
  return v;
}

// Sigmoid and silu' in type T.
template <class T>
T sigmoid_t(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// ---------------------------------------------------------------------------------------------
// Reference: the sequential recurrence, accumulating in T (double for the spec).
// out: (B, L, H, P) after gating; fin: (B, H, P, N); ypre: (B, L, H, P) before gating.
template <class T>
void ref_forward(const SsdArgs& a, const Dims& d, std::vector<T>& out, std::vector<T>* fin,
                 std::vector<T>* ypre) {
  const int64_t B = d.B, L = d.L, H = d.H, P = d.P, G = d.G, N = d.N;
  out.assign(B * L * H * P, T(0));
  if (fin) fin->assign(B * H * P * N, T(0));
  if (ypre) ypre->assign(B * L * H * P, T(0));
  const bool limit = has_limit(a);
  parallel_for(B * H, grain_for(L * P * N), [&](int64_t begin, int64_t end) {
    std::vector<T> h(P * N);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, hd = bh % H, g = hd / d.hpg;
      for (int64_t i = 0; i < P * N; ++i)
        h[i] = a.initial_states.defined() ? T(a.initial_states[bh * P * N + i]) : T(0);
      const T A = a.A[hd];
      const T bias = a.dt_bias.defined() ? T(a.dt_bias[hd]) : T(0);
      for (int64_t t = 0; t < L; ++t) {
        const T dt = process_dt<T>(a.dt[(b * L + t) * H + hd], bias, a.dt_softplus, limit, a.dt_min,
                                   a.dt_max, nullptr);
        const T dA = std::exp(dt * A);
        const float* x = a.x.data() + ((b * L + t) * H + hd) * P;
        const float* Bt = a.B.data() + ((b * L + t) * G + g) * N;
        const float* Ct = a.C.data() + ((b * L + t) * G + g) * N;
        for (int64_t p = 0; p < P; ++p) {
          T y = 0;
          for (int64_t n = 0; n < N; ++n) {
            T& s = h[p * N + n];
            s = dA * s + dt * T(x[p]) * T(Bt[n]);
            y += s * T(Ct[n]);
          }
          if (a.D.defined()) y += T(a.D[d.d_hdim ? hd * P + p : hd]) * T(x[p]);
          const int64_t o = ((b * L + t) * H + hd) * P + p;
          if (ypre) (*ypre)[o] = y;
          if (a.z.defined()) {
            const T zz = a.z[o];
            y *= zz * sigmoid_t(zz);
          }
          out[o] = y;
        }
      }
      if (fin)
        for (int64_t i = 0; i < P * N; ++i) (*fin)[bh * P * N + i] = h[i];
    }
  });
}

Tensor to_tensor(const std::vector<double>& v, const Shape& s) {
  Tensor t = Tensor::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(v[i]);
  return t;
}

// ---------------------------------------------------------------------------------------------
// Chunked forward. Writes ypre (B, L, H, P) (before gating, D term included), optionally the
// states entering every chunk plus the final one, states (B, H, nc + 1, P, N), and returns the
// C B^T blocks cb (B, G, nc, Q, Q) for reuse by the backward. dtp: processed dt (B, L, H).
struct ChunkFwd {
  Tensor cb;      // (B, G, nc, Q, Q), uninitialised beyond each ragged chunk's Qc x Qc
  Tensor states;  // (B, H, nc + 1, P, N) if requested
};

// Cumulative log-decay of one chunk in double, and the decay matrix E (Qc, Qc) lower triangle
// (exp(cs_i - cs_j), j <= i; zero above), through the vectorised exp: one call over the whole
// block (the exponent clamped at 88, so the entries above the diagonal, zeroed after, stay finite)
// rather than one per row, whose short rows ended in scalar exps (most of the cost).
void chunk_decay(const float* dtp, int64_t stride, int64_t Qc, float A, std::vector<double>& cs,
                 float* E, int64_t Q) {
  double acc = 0;
  for (int64_t i = 0; i < Qc; ++i) acc += double(dtp[i * stride]) * A, cs[i] = acc;
  for (int64_t i = 0; i < Qc; ++i) {
    float* row = E + i * Q;
    const double ci = cs[i];
    for (int64_t j = 0; j < Qc; ++j) row[j] = static_cast<float>(std::min(ci - cs[j], 88.0));
    for (int64_t j = Qc; j < Q; ++j) row[j] = 0.f;  // the gap of a ragged chunk, kept finite
  }
  exp_inplace(E, Qc * Q);
  for (int64_t i = 0; i < Qc; ++i) std::fill(E + i * Q + i + 1, E + i * Q + Qc, 0.f);
}

void compute_cb(const SsdArgs& a, const Dims& d, int64_t Q, int64_t nc, Tensor& cb) {
  const int64_t G = d.G, N = d.N, L = d.L;
  cb = Tensor::zeros({d.B * G * nc * Q * Q + kSsdPad});  // padded for ssd_chunk_decay
  parallel_for(d.B * G * nc, grain_for(Q * Q * N), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t c = i % nc, g = (i / nc) % G, b = i / (nc * G);
      const int64_t t0 = c * Q, Qc = std::min(Q, L - t0);
      const float* Cp = a.C.data() + ((b * L + t0) * G + g) * N;
      const float* Bp = a.B.data() + ((b * L + t0) * G + g) * N;
      gemm(false, true, Qc, Qc, N, 1.f, Cp, G * N, Bp, G * N, 0.f, cb.data() + i * Q * Q, Q);
    }
  });
}

// dst (cols, rows) = src (rows, cols)^T: 4 x 4 blocks through SSE registers (x86-64 has SSE2
// everywhere) within 16 x 16 tiles, the edges in plain loops; a copy, exact.
void transpose_f32(const float* src, float* dst, int64_t rows, int64_t cols) {
  constexpr int64_t T = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += T)
    for (int64_t q0 = 0; q0 < cols; q0 += T) {
      const int64_t r1 = std::min(rows, r0 + T), q1 = std::min(cols, q0 + T);
      int64_t rv = r0, qv = q0;  // [r0, rv) x [q0, qv) done with 4 x 4 blocks
#if defined(__SSE2__)
      rv = r0 + (r1 - r0) / 4 * 4, qv = q0 + (q1 - q0) / 4 * 4;
      for (int64_t r = r0; r < rv; r += 4)
        for (int64_t q = q0; q < qv; q += 4) {
          __m128 a = _mm_loadu_ps(src + r * cols + q), b = _mm_loadu_ps(src + (r + 1) * cols + q);
          __m128 c = _mm_loadu_ps(src + (r + 2) * cols + q),
                 e = _mm_loadu_ps(src + (r + 3) * cols + q);
          _MM_TRANSPOSE4_PS(a, b, c, e);
          _mm_storeu_ps(dst + q * rows + r, a);
          _mm_storeu_ps(dst + (q + 1) * rows + r, b);
          _mm_storeu_ps(dst + (q + 2) * rows + r, c);
          _mm_storeu_ps(dst + (q + 3) * rows + r, e);
        }
#endif
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t q = (r < rv ? qv : q0); q < q1; ++q) dst[q * rows + r] = src[r * cols + q];
    }
}

// Chunks at a time: the chunks are taken in runs of kRunChunks; for each run, C B^T of its
// chunks (every (b, g)) in one parallel region, then every (b, h) in parallel over the run's
// chunks in order. One run's C B^T, B, C and X stay in cache for all heads, so the cost per token
// does not grow with L (a head-major loop over the whole sequence re-reads its C B^T once per
// head), and a prefill chunk of up to kRunChunks * Q tokens opens two parallel regions per layer
// (three with the entering states' transposition), not two per chunk (the C B^T of one (b, g)
// alone, outside a region, also ran the BLAS's own threads on a 64 x 64 x 128 product). The
// forward alone keeps one run's C B^T; the backward (keep_states) keeps all of them and the
// states.
constexpr int64_t kRunChunks = 4;

void chunked_forward(const SsdArgs& a, const Dims& d, const std::vector<float>& dtp, float* ypre,
                     float* fin, ChunkFwd& cf, bool keep_states) {
  const int64_t B = d.B, L = d.L, H = d.H, P = d.P, G = d.G, N = d.N;
  const int64_t Q = std::max<int64_t>(1, std::min(a.chunk_size, L));
  const int64_t nc = (L + Q - 1) / Q;
  const int64_t HP = H * P, GN = G * N;
  Tensor cb_run;  // (B, G, kRunChunks, Q, Q): the run's C B^T (lower triangles) when not keeping
  if (keep_states) {
    compute_cb(a, d, Q, nc, cf.cb);
    cf.states = Tensor::empty({B * H * (nc + 1) * P * N});
  } else {
    cb_run = Tensor::zeros({B * G * kRunChunks * Q * Q + kSsdPad});  // padded for ssd_chunk_decay
  }
  // The running state of every (b, h), stored transposed, (B, H, N, P): the chunk kernels then
  // read and write whole rows of P. Set from the entering state inside the heads' region (each
  // (b, h) by the thread that runs it), in a buffer of the calling thread kept across calls (a
  // fresh one per call was a separate parallel region and page faults on every prefill chunk).
  // When one run covers every chunk (a prefill chunk of up to kRunChunks * Q tokens), each
  // (b, h)'s state lives in its thread's scratch instead, which stays in cache.
  const bool one_run = nc <= kRunChunks;
  thread_local std::vector<float> hs_buf;
  if (!one_run && hs_buf.size() < static_cast<size_t>(B * H * N * P)) hs_buf.resize(B * H * N * P);
  float* const hs_all = one_run ? nullptr : hs_buf.data();
  const Tensor init = a.initial_states.defined() ? a.initial_states.contiguous() : Tensor();
  auto transpose = [](const float* src, float* dst, int64_t rows, int64_t cols) {
    transpose_f32(src, dst, rows, cols);
  };
  // D is folded into the diagonal of M (y += (M + D I) X) when it is one scalar per head.
  const bool d_in_m = a.D.defined() && !d.d_hdim;

  for (int64_t r0 = 0; r0 < nc; r0 += kRunChunks) {
    const int64_t r1 = std::min(nc, r0 + kRunChunks), nr = r1 - r0;
    if (!keep_states) {
      // C B^T, rows i and columns j <= i only (M reads nothing above the diagonal); each chunk
      // in two row blocks of about equal triangle area, so a run of one chunk uses 2 threads.
      parallel_for(B * G * nr * 2, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t half = i % 2, c = r0 + (i / 2) % nr, bg = i / (2 * nr);
          const int64_t b = bg / G, g = bg % G;
          const int64_t t0 = c * Q, Qc = std::min(Q, L - t0);
          const int64_t split = std::min(Qc, static_cast<int64_t>(std::lround(Qc * 0.7071)));
          const int64_t i0 = half ? split : 0, i1 = half ? Qc : split;
          if (i1 <= i0) continue;
          const float* Cp = a.C.data() + ((b * L + t0 + i0) * G + g) * N;
          const float* Bp = a.B.data() + ((b * L + t0) * G + g) * N;
          float* out = cb_run.data() + ((bg * kRunChunks + (c - r0)) * Q + i0) * Q;
          gemm(false, true, i1 - i0, i1, N, 1.f, Cp, GN, Bp, GN, 0.f, out, Q);
        }
      });
    }
    // The (b, h) pairs are taken one at a time from a shared counter (not one fixed range per
    // thread): a thread descheduled by another process no longer holds the others up at the
    // region's end. Each pair's outputs and state are computed the same way by any thread.
    parallel_for_dynamic(B * H, 1, grain_for(nr * Q * P * N), [&](int64_t bh0, int64_t bh1) {
      // per-thread scratch, kept across chunks and calls (no allocation in the chunk loop)
      // (padded: ssd_chunk_decay reads and writes up to kSsdPad past their ends)
      thread_local std::vector<double> cs;
      thread_local std::vector<float> M, Xw, dtv, ecs, w, hs1;
      if (one_run) hs1.resize(N * P);
      cs.resize(Q + kSsdPad), M.resize(Q * Q + kSsdPad), Xw.resize(Q * P), dtv.resize(Q + kSsdPad),
          ecs.resize(Q + kSsdPad), w.resize(Q + kSsdPad);
      for (int64_t bh = bh0; bh < bh1; ++bh) {
        const int64_t b = bh / H, hd = bh % H, g = hd / d.hpg;
        const float A = a.A[hd];
        const float* Dp = a.D.defined() ? a.D.data() + (d.d_hdim ? hd * P : hd) : nullptr;
        float* hs = one_run ? hs1.data() : hs_all + bh * N * P;  // S^T: (N, P)
        if (r0 == 0) {
          if (init.defined())
            transpose(init.data() + bh * P * N, hs, P, N);
          else
            std::fill(hs, hs + N * P, 0.f);
        }
        for (int64_t c = r0; c < r1; ++c) {
          const int64_t t0 = c * Q, Qc = std::min(Q, L - t0);
          if (keep_states) transpose(hs, cf.states.data() + (bh * (nc + 1) + c) * P * N, N, P);
          const float* dtc = dtp.data() + (b * L + t0) * H + hd;
          for (int64_t j = 0; j < Qc; ++j) dtv[j] = dtc[j * H];
          {
            double acc = 0;  // the cumulative log-decay, in double
            for (int64_t j = 0; j < Qc; ++j) acc += double(dtv[j]) * A, cs[j] = acc;
          }
          const float* cbp = keep_states
                                 ? cf.cb.data() + ((b * G + g) * nc + c) * Q * Q
                                 : cb_run.data() + ((b * G + g) * kRunChunks + (c - r0)) * Q * Q;
          // M = (C B^T) o E o dt^T (+ D on the diagonal when D is in M), w_j = exp(cs_last -
          // cs_j) dt_j (the last row of E times dt), exp(cs_i) (the last one is the chunk's decay
          // of the entering state): one vectorised pass over the lower triangle
          ssd_chunk_decay(Qc, cs.data(), dtv.data(), cbp, Q, d_in_m ? Dp[0] : 0.f, M.data(), Q,
                          w.data(), ecs.data());
          const float* xp = a.x.data() + ((b * L + t0) * H + hd) * P;
          const float* Bp = a.B.data() + ((b * L + t0) * G + g) * N;
          const float* Cp = a.C.data() + ((b * L + t0) * G + g) * N;
          float* yp = ypre + ((b * L + t0) * H + hd) * P;
          // y = diag(exp(cs)) C S^T (inter-chunk; skipped while the state is still zero) + M X
          // (intra-chunk, and the skip connection when D is in M), one pass per row tile
          const bool zero_state = c == 0 && !a.initial_states.defined();
          ssd_chunk_y(Qc, P, N, Cp, GN, zero_state ? nullptr : hs, ecs.data(), M.data(), Q, xp, HP,
                      yp, HP);
          // skip connection with D (H, P): y += D x
          if (Dp && !d_in_m) {
            for (int64_t i = 0; i < Qc; ++i)
              for (int64_t p = 0; p < P; ++p) yp[i * HP + p] += Dp[p] * xp[i * HP + p];
          }
          // state: S^T = exp(cs_last) S^T + B^T diag(w) X
          for (int64_t j = 0; j < Qc; ++j) {
            const float wj = w[j];
            for (int64_t p = 0; p < P; ++p) Xw[j * P + p] = xp[j * HP + p] * wj;
          }
          ssd_chunk_state(Qc, P, N, Bp, GN, Xw.data(), P, ecs[Qc - 1], hs);
          if (c == nc - 1) {
            if (keep_states) transpose(hs, cf.states.data() + (bh * (nc + 1) + nc) * P * N, N, P);
            if (fin) transpose(hs, fin + bh * P * N, N, P);
          }
        }
      }
    });
  }
}

// dtp (B, L, H) and optionally the derivative factor d dtp / d dt.
void process_all_dt(const SsdArgs& a, const Dims& d, std::vector<float>& dtp,
                    std::vector<float>* dfac) {
  const int64_t n = d.B * d.L * d.H;
  dtp.resize(n);
  if (dfac) dfac->resize(n);
  const bool limit = has_limit(a);
  for (int64_t i = 0; i < n; ++i) {
    const float bias = a.dt_bias.defined() ? a.dt_bias[i % d.H] : 0.f;
    float f;
    dtp[i] = process_dt<float>(a.dt[i], bias, a.dt_softplus, limit, a.dt_min, a.dt_max, &f);
    if (dfac) (*dfac)[i] = f;
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void ssd_check(const SsdArgs& a) {
  Dims d = dims_of(a);
  const int64_t B = d.B, L = d.L, H = d.H, P = d.P, G = d.G, N = d.N;
  MAMBA_CHECK(L >= 1 && H >= 1 && P >= 1 && N >= 1, "ssd: empty dimension in x ", a.x.shape_str(),
              " or B ", a.B.shape_str());
  check_shape(a.dt, "ssd: dt", {B, L, H});
  check_shape(a.A, "ssd: A", {H});
  check_shape(a.B, "ssd: B", {B, L, G, N});
  check_shape(a.C, "ssd: C", {B, L, G, N});
  if (a.D.defined()) {
    MAMBA_CHECK(a.D.shape() == Shape({H}) || a.D.shape() == Shape({H, P}), "ssd: D must be (", H,
                ") or (", H, ",", P, "), got ", a.D.shape_str());
  }
  if (a.z.defined()) check_shape(a.z, "ssd: z", {B, L, H, P});
  if (a.dt_bias.defined()) check_shape(a.dt_bias, "ssd: dt_bias", {H});
  if (a.initial_states.defined())
    check_shape(a.initial_states, "ssd: initial_states", {B, H, P, N});
  MAMBA_CHECK(a.chunk_size >= 1, "ssd: chunk_size must be >= 1, got ", a.chunk_size);
  MAMBA_CHECK(a.dt_min <= a.dt_max, "ssd: dt_limit (", a.dt_min, ", ", a.dt_max,
              ") must have min <= max");
}

static Dims checked_dims(const SsdArgs& a) {
  ssd_check(a);
  Dims d = dims_of(a);
  d.d_hdim = a.D.defined() && a.D.ndim() == 2;
  return d;
}

Tensor ssd_ref(const SsdArgs& a, Tensor* final_states) {
  Dims d = checked_dims(a);
  std::vector<double> out, fin;
  ref_forward<double>(a, d, out, final_states ? &fin : nullptr, nullptr);
  if (final_states) *final_states = to_tensor(fin, {d.B, d.H, d.P, d.N});
  return to_tensor(out, a.x.shape());
}

Tensor ssd_sequential_f32(const SsdArgs& a, Tensor* final_states) {
  Dims d = checked_dims(a);
  std::vector<float> out, fin;
  ref_forward<float>(a, d, out, final_states ? &fin : nullptr, nullptr);
  if (final_states) {
    *final_states = Tensor::empty({d.B, d.H, d.P, d.N});
    std::copy(fin.begin(), fin.end(), final_states->data());
  }
  Tensor o = Tensor::empty(a.x.shape());
  std::copy(out.begin(), out.end(), o.data());
  return o;
}

double ssd_ref_loss(const SsdArgs& a, const Tensor& g, const Tensor& g_final) {
  Dims d = checked_dims(a);
  check_shape(g, "ssd_ref_loss: g", a.x.shape());
  std::vector<double> out, fin;
  ref_forward<double>(a, d, out, g_final.defined() ? &fin : nullptr, nullptr);
  double s = 0;
  for (int64_t i = 0; i < g.numel(); ++i) s += out[i] * double(g[i]);
  if (g_final.defined()) {
    check_shape(g_final, "ssd_ref_loss: g_final", {d.B, d.H, d.P, d.N});
    for (int64_t i = 0; i < g_final.numel(); ++i) s += fin[i] * double(g_final[i]);
  }
  return s;
}

SsdGrads ssd_bwd_ref(const SsdArgs& a, const Tensor& dout, const Tensor& dfinal) {
  Dims d = checked_dims(a);
  const int64_t B = d.B, L = d.L, H = d.H, P = d.P, G = d.G, N = d.N;
  check_shape(dout, "ssd_bwd_ref: dout", a.x.shape());
  if (dfinal.defined()) check_shape(dfinal, "ssd_bwd_ref: dfinal_states", {B, H, P, N});
  const bool limit = has_limit(a);
  // Everything in double; per-(b, h) partials for the shared gradients.
  std::vector<double> dx(B * L * H * P, 0), ddt(B * L * H, 0), dBh(B * L * H * N, 0),
      dCh(B * L * H * N, 0), dz(a.z.defined() ? B * L * H * P : 0, 0), dinit(B * H * P * N, 0),
      dAp(B * H, 0), dDp(B * H * P, 0), dbias(B * L * H, 0);
  parallel_for(B * H, grain_for(L * P * N), [&](int64_t begin, int64_t end) {
    std::vector<double> hs((L + 1) * P * N), dtv(L), dfac(L), dh(P * N), dy(L * P);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, hd = bh % H, g = hd / d.hpg;
      const double A = a.A[hd];
      const double bias = a.dt_bias.defined() ? double(a.dt_bias[hd]) : 0.0;
      for (int64_t i = 0; i < P * N; ++i)
        hs[i] = a.initial_states.defined() ? double(a.initial_states[bh * P * N + i]) : 0.0;
      auto xat = [&](int64_t t, int64_t p) { return double(a.x[((b * L + t) * H + hd) * P + p]); };
      auto Bat = [&](int64_t t, int64_t n) { return double(a.B[((b * L + t) * G + g) * N + n]); };
      auto Cat = [&](int64_t t, int64_t n) { return double(a.C[((b * L + t) * G + g) * N + n]); };
      auto Dat = [&](int64_t p) { return double(a.D[d.d_hdim ? hd * P + p : hd]); };
      // forward, keeping every state
      for (int64_t t = 0; t < L; ++t) {
        double f;
        dtv[t] = process_dt<double>(a.dt[(b * L + t) * H + hd], bias, a.dt_softplus, limit,
                                    a.dt_min, a.dt_max, &f);
        dfac[t] = f;
        const double e = std::exp(dtv[t] * A);
        const double* hp = &hs[t * P * N];
        double* hn = &hs[(t + 1) * P * N];
        for (int64_t p = 0; p < P; ++p)
          for (int64_t n = 0; n < N; ++n)
            hn[p * N + n] = e * hp[p * N + n] + dtv[t] * xat(t, p) * Bat(t, n);
      }
      // gate: dy = dout * silu(z); dz = dout * y * silu'(z)
      for (int64_t t = 0; t < L; ++t)
        for (int64_t p = 0; p < P; ++p) {
          const int64_t o = ((b * L + t) * H + hd) * P + p;
          double go = dout[o];
          if (a.z.defined()) {
            double y = 0;
            for (int64_t n = 0; n < N; ++n) y += hs[(t + 1) * P * N + p * N + n] * Cat(t, n);
            if (a.D.defined()) y += Dat(p) * xat(t, p);
            const double zz = a.z[o], s = sigmoid_t(zz);
            dz[o] = go * y * s * (1 + zz * (1 - s));
            go *= zz * s;
          }
          dy[t * P + p] = go;
        }
      for (int64_t i = 0; i < P * N; ++i)
        dh[i] = dfinal.defined() ? double(dfinal[bh * P * N + i]) : 0.0;
      double dA = 0;
      for (int64_t t = L - 1; t >= 0; --t) {
        const double* hcur = &hs[(t + 1) * P * N];
        const double* hprev = &hs[t * P * N];
        double ddt_t = 0, de = 0;
        for (int64_t p = 0; p < P; ++p) {
          const double g_ = dy[t * P + p];
          const int64_t o = ((b * L + t) * H + hd) * P + p;
          if (a.D.defined()) {
            dx[o] += Dat(p) * g_;
            dDp[bh * P + (d.d_hdim ? p : 0)] += g_ * xat(t, p);
          }
          double dxp = 0;
          for (int64_t n = 0; n < N; ++n) {
            double& s = dh[p * N + n];
            s += g_ * Cat(t, n);
            dCh[((b * L + t) * H + hd) * N + n] += g_ * hcur[p * N + n];
            dxp += s * Bat(t, n);
            dBh[((b * L + t) * H + hd) * N + n] += dtv[t] * s * xat(t, p);
            ddt_t += s * xat(t, p) * Bat(t, n);
            de += s * hprev[p * N + n];
          }
          dx[o] += dtv[t] * dxp;
        }
        const double e = std::exp(dtv[t] * A);
        const double da = de * e;
        ddt_t += da * A;
        dA += da * dtv[t];
        for (auto& s : dh) s *= e;
        ddt[(b * L + t) * H + hd] = ddt_t * dfac[t];
      }
      dAp[bh] = dA;
      for (int64_t i = 0; i < P * N; ++i) dinit[bh * P * N + i] = dh[i];
    }
  });
  SsdGrads gr;
  gr.dx = to_tensor(dx, a.x.shape());
  gr.ddt = to_tensor(ddt, a.dt.shape());
  std::vector<double> dA(H, 0), dB(B * L * G * N, 0), dC(B * L * G * N, 0);
  for (int64_t bh = 0; bh < B * H; ++bh) dA[bh % H] += dAp[bh];
  for (int64_t bl = 0; bl < B * L; ++bl)
    for (int64_t hd = 0; hd < H; ++hd)
      for (int64_t n = 0; n < N; ++n) {
        dB[(bl * G + hd / d.hpg) * N + n] += dBh[(bl * H + hd) * N + n];
        dC[(bl * G + hd / d.hpg) * N + n] += dCh[(bl * H + hd) * N + n];
      }
  gr.dA = to_tensor(dA, a.A.shape());
  gr.dB = to_tensor(dB, a.B.shape());
  gr.dC = to_tensor(dC, a.C.shape());
  if (a.D.defined()) {
    std::vector<double> dD(a.D.numel(), 0);
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t p = 0; p < (d.d_hdim ? P : 1); ++p)
        dD[d.d_hdim ? (bh % H) * P + p : bh % H] += dDp[bh * P + p];
    gr.dD = to_tensor(dD, a.D.shape());
  }
  if (a.z.defined()) gr.dz = to_tensor(dz, a.z.shape());
  if (a.dt_bias.defined()) {
    std::vector<double> db(H, 0);
    for (int64_t i = 0; i < B * L * H; ++i) db[i % H] += gr.ddt[i];
    gr.ddt_bias = to_tensor(db, a.dt_bias.shape());
  }
  if (a.initial_states.defined()) gr.dinitial_states = to_tensor(dinit, a.initial_states.shape());
  return gr;
}

// ---------------------------------------------------------------------------------------------
Tensor ssd_chunked(const SsdArgs& a, Tensor* final_states) {
  Dims d = checked_dims(a);
  std::vector<float> dtp;
  process_all_dt(a, d, dtp, nullptr);
  Tensor out = Tensor::empty(a.x.shape());
  if (final_states) *final_states = Tensor::empty({d.B, d.H, d.P, d.N});
  ChunkFwd cf;
  chunked_forward(a, d, dtp, out.data(), final_states ? final_states->data() : nullptr, cf, false);
  if (a.z.defined()) {  // out *= silu(z), in cache-sized blocks (no (B, L, H, P) temporary)
    const int64_t n = out.numel(), blk = 4096;
    parallel_for((n + blk - 1) / blk, 16, [&](int64_t begin, int64_t end) {
      float sz[blk];
      for (int64_t k = begin; k < end; ++k) {
        const int64_t o = k * blk, m = std::min(blk, n - o);
        silu(a.z.data() + o, sz, m);
        float* op = out.data() + o;
        for (int64_t i = 0; i < m; ++i) op[i] *= sz[i];
      }
    });
  }
  return out;
}

SsdGrads ssd_chunked_bwd(const SsdArgs& a, const Tensor& dout, const Tensor& dfinal) {
  Dims d = checked_dims(a);
  const int64_t B = d.B, L = d.L, H = d.H, P = d.P, G = d.G, N = d.N;
  check_shape(dout, "ssd_chunked_bwd: dout", a.x.shape());
  if (dfinal.defined()) check_shape(dfinal, "ssd_chunked_bwd: dfinal_states", {B, H, P, N});
  const int64_t Q = std::max<int64_t>(1, std::min(a.chunk_size, L));
  const int64_t nc = (L + Q - 1) / Q;
  const int64_t HP = H * P, GN = G * N;

  std::vector<float> dtp, dfac;
  process_all_dt(a, d, dtp, &dfac);
  // Recompute the forward: pre-gate y (for dz), the states entering each chunk, C B^T.
  Tensor ypre = Tensor::empty(a.x.shape());
  ChunkFwd cf;
  chunked_forward(a, d, dtp, ypre.data(), nullptr, cf, true);

  SsdGrads gr;
  // dy = dout * silu(z); dz = dout * y * silu'(z)
  Tensor dy = dout;
  if (a.z.defined()) {
    const int64_t n = dout.numel();
    dy = Tensor::empty(dout.shape());
    silu(a.z.data(), dy.data(), n);
    Tensor gy = Tensor::empty(dout.shape());
    for (int64_t i = 0; i < n; ++i) gy[i] = dout[i] * ypre[i], dy[i] *= dout[i];
    gr.dz = Tensor::empty(a.z.shape());
    silu_bwd(a.z.data(), gy.data(), gr.dz.data(), n);
  }
  gr.dx = Tensor::empty(a.x.shape());
  Tensor ddtp = Tensor::empty(a.dt.shape());
  // dB, dC sum over the heads of a group. The (b, h) pairs are cut into nparts contiguous
  // parts (at most one per thread); part q sums its heads, in order, into its own rows for the
  // batches it touches (GEMMs with beta = 1), and after the parallel region every row is the sum
  // of the parts' rows in part order: the result depends on the thread count, never on timing.
  struct Part {
    int64_t b_lo = 0, b_hi = 0;  // the batches [b_lo, b_hi) its (b, h) range touches
    std::vector<float> dB, dC;   // (b_hi - b_lo, L, G, N)
  };
  const int64_t BH = B * H, grain = grain_for(L * P * N);
  const int64_t nparts =
      std::max<int64_t>(1, std::min<int64_t>((BH + grain - 1) / grain, num_threads()));
  std::vector<Part> parts(nparts);
  std::vector<float> dDp(B * H * P, 0.f);
  std::vector<double> dAp(B * H, 0.0);
  if (a.initial_states.defined()) gr.dinitial_states = Tensor::empty(a.initial_states.shape());

  auto run_part = [&](int64_t begin, int64_t end, Part& part) {
    std::vector<double> cs(Q), dcs(Q);
    std::vector<float> E(Q * Q), M(Q * Q), Gm(Q * Q), dCB(Q * Q), tmp(Q * N), tqp(Q * P), dh(P * N),
        ecs(Q), w(Q), ddt(Q);
    const int64_t b_lo = begin / H, b_hi = (end - 1) / H + 1;
    part.b_lo = b_lo, part.b_hi = b_hi;
    part.dB.assign((b_hi - b_lo) * L * GN, 0.f);  // allocated (first touched) by its thread
    part.dC.assign((b_hi - b_lo) * L * GN, 0.f);
    std::vector<float>& dBacc = part.dB;
    std::vector<float>& dCacc = part.dC;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, hd = bh % H, g = hd / d.hpg;
      const float A = a.A[hd];
      double dA = 0;
      // skip term: dx = D dy, dD += sum dy x
      for (int64_t t = 0; t < L; ++t) {
        const int64_t o = ((b * L + t) * H + hd) * P;
        for (int64_t p = 0; p < P; ++p) {
          if (a.D.defined()) {
            gr.dx[o + p] = a.D[d.d_hdim ? hd * P + p : hd] * dy[o + p];
            dDp[bh * P + (d.d_hdim ? p : 0)] += dy[o + p] * a.x[o + p];
          } else {
            gr.dx[o + p] = 0.f;
          }
        }
      }
      if (dfinal.defined())
        std::copy_n(dfinal.data() + bh * P * N, P * N, dh.data());
      else
        std::fill(dh.begin(), dh.end(), 0.f);
      for (int64_t c = nc - 1; c >= 0; --c) {
        const int64_t t0 = c * Q, Qc = std::min(Q, L - t0);
        const float* dtc = dtp.data() + (b * L + t0) * H + hd;
        chunk_decay(dtc, H, Qc, A, cs, E.data(), Q);
        const float* cbp = cf.cb.data() + ((b * G + g) * nc + c) * Q * Q;
        const float* hprev = cf.states.data() + (bh * (nc + 1) + c) * P * N;
        const float* hend = cf.states.data() + (bh * (nc + 1) + c + 1) * P * N;
        const float* xp = a.x.data() + ((b * L + t0) * H + hd) * P;
        const float* Bp = a.B.data() + ((b * L + t0) * G + g) * N;
        const float* Cp = a.C.data() + ((b * L + t0) * G + g) * N;
        const float* dyp = dy.data() + ((b * L + t0) * H + hd) * P;
        float* dxp = gr.dx.data() + ((b * L + t0) * H + hd) * P;
        float* dBp = dBacc.data() + (((b - b_lo) * L + t0) * G + g) * N;
        float* dCp = dCacc.data() + (((b - b_lo) * L + t0) * G + g) * N;
        const double last = cs[Qc - 1];
        const float el = static_cast<float>(std::exp(std::min(last, 88.0)));
        for (int64_t i = 0; i < Qc; ++i) {
          ecs[i] = static_cast<float>(std::exp(std::min(cs[i], 88.0)));
          w[i] = static_cast<float>(std::exp(std::min(last - cs[i], 88.0))) * dtc[i * H];
          dcs[i] = 0, ddt[i] = 0;
        }
        // G = dY X^T (Qc, Qc)
        gemm(false, true, Qc, Qc, P, 1.f, dyp, HP, xp, HP, 0.f, Gm.data(), Q);
        // M, dCB = G o E o dt^T, and the decay / dt gradients of the intra-chunk term
        for (int64_t i = 0; i < Qc; ++i) {
          double rowT = 0;
          for (int64_t j = 0; j < Qc; ++j) {
            const int64_t ij = i * Q + j;
            if (j > i) {
              M[ij] = 0.f, dCB[ij] = 0.f;
              continue;
            }
            const float ge = Gm[ij] * E[ij];
            M[ij] = cbp[ij] * E[ij] * dtc[j * H];
            dCB[ij] = ge * dtc[j * H];
            const float S = ge * cbp[ij];  // d/d dt_j of this term
            ddt[j] += S;
            const float T = S * dtc[j * H];  // d/d cs_i (and -d/d cs_j)
            rowT += T;
            dcs[j] -= T;
          }
          dcs[i] += rowT;
        }
        // dX += M^T dY
        gemm(true, false, Qc, P, Qc, 1.f, M.data(), Q, dyp, HP, 1.f, dxp, HP);
        // dC = dCB B + diag(exp(cs)) dY S^T...: dC_i += exp(cs_i) (dY_i S)
        gemm(false, false, Qc, N, Qc, 1.f, dCB.data(), Q, Bp, GN, 1.f, dCp, GN);
        gemm(false, false, Qc, N, P, 1.f, dyp, HP, hprev, N, 0.f, tmp.data(), N);
        for (int64_t i = 0; i < Qc; ++i) {
          double s = 0;
          for (int64_t n = 0; n < N; ++n) {
            const float v = ecs[i] * tmp[i * N + n];
            s += double(v) * Cp[i * GN + n];
            dCp[i * GN + n] += v;
          }
          dcs[i] += s;
        }
        // dB = dCB^T C + diag(w) X dh
        gemm(true, false, Qc, N, Qc, 1.f, dCB.data(), Q, Cp, GN, 1.f, dBp, GN);
        gemm(false, false, Qc, N, P, 1.f, xp, HP, dh.data(), N, 0.f, tmp.data(), N);
        for (int64_t j = 0; j < Qc; ++j) {
          double r = 0;
          for (int64_t n = 0; n < N; ++n) {
            r += double(tmp[j * N + n]) * Bp[j * GN + n];
            dBp[j * GN + n] += w[j] * tmp[j * N + n];
          }
          ddt[j] += static_cast<float>(r * std::exp(std::min(last - cs[j], 88.0)));
          dcs[j] -= w[j] * r;
        }
        {
          double s = 0;
          for (int64_t i = 0; i < P * N; ++i) s += double(dh[i]) * hend[i];
          dcs[Qc - 1] += s;
        }
        // dX += diag(w) B dh^T
        gemm(false, true, Qc, P, N, 1.f, Bp, GN, dh.data(), N, 0.f, tqp.data(), P);
        for (int64_t j = 0; j < Qc; ++j)
          for (int64_t p = 0; p < P; ++p) dxp[j * HP + p] += w[j] * tqp[j * P + p];
        // dS_prev = exp(cs_last) dh + dY^T diag(exp(cs)) C
        for (int64_t i = 0; i < Qc; ++i)
          for (int64_t n = 0; n < N; ++n) tmp[i * N + n] = ecs[i] * Cp[i * GN + n];
        for (auto& v : dh) v *= el;
        gemm(true, false, P, N, Qc, 1.f, dyp, HP, tmp.data(), N, 1.f, dh.data(), N);
        // cs = cumsum(dt A): da_k = sum_{i >= k} dcs_i
        double acc = 0;
        for (int64_t k = Qc - 1; k >= 0; --k) {
          acc += dcs[k];
          ddtp[(b * L + t0 + k) * H + hd] = static_cast<float>(ddt[k] + acc * A);
          dA += acc * dtc[k * H];
        }
      }
      dAp[bh] = dA;
      if (a.initial_states.defined())
        std::copy_n(dh.data(), P * N, gr.dinitial_states.data() + bh * P * N);
    }
  };
  parallel_for(nparts, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) run_part(BH * q / nparts, BH * (q + 1) / nparts, parts[q]);
  });
  // dB, dC = the parts' rows summed in part order (parallel over the rows).
  gr.dB = Tensor::zeros(a.B.shape());
  gr.dC = Tensor::zeros(a.C.shape());
  const int64_t row = L * GN;  // floats per batch
  parallel_for(B * row, 1 << 14, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1;) {  // segments inside one batch
      const int64_t b = i / row, e = std::min(i1, (b + 1) * row), o = i - b * row;
      float* db = gr.dB.data() + i;
      float* dc = gr.dC.data() + i;
      for (const Part& part : parts) {
        if (b < part.b_lo || b >= part.b_hi) continue;
        const float* sb = part.dB.data() + (b - part.b_lo) * row + o;
        const float* sc = part.dC.data() + (b - part.b_lo) * row + o;
        for (int64_t k = 0; k < e - i; ++k) db[k] += sb[k], dc[k] += sc[k];
      }
      i = e;
    }
  });

  // Reductions over heads of a group, batch, and the dt chain rule.
  gr.ddt = Tensor::empty(a.dt.shape());
  for (int64_t i = 0; i < B * L * H; ++i) gr.ddt[i] = ddtp[i] * dfac[i];
  gr.dA = Tensor::zeros({H});
  {
    std::vector<double> s(H, 0.0);
    for (int64_t bh = 0; bh < B * H; ++bh) s[bh % H] += dAp[bh];
    for (int64_t hd = 0; hd < H; ++hd) gr.dA[hd] = static_cast<float>(s[hd]);
  }
  if (a.D.defined()) {
    gr.dD = Tensor::zeros(a.D.shape());
    for (int64_t bh = 0; bh < B * H; ++bh)
      for (int64_t p = 0; p < (d.d_hdim ? P : 1); ++p)
        gr.dD[d.d_hdim ? (bh % H) * P + p : bh % H] += dDp[bh * P + p];
  }
  if (a.dt_bias.defined()) {
    std::vector<double> s(H, 0.0);
    for (int64_t i = 0; i < B * L * H; ++i) s[i % H] += gr.ddt[i];
    gr.ddt_bias = Tensor::empty({H});
    for (int64_t hd = 0; hd < H; ++hd) gr.ddt_bias[hd] = static_cast<float>(s[hd]);
  }
  return gr;
}

// ---------------------------------------------------------------------------------------------
Tensor ssd_state_update(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                        const Tensor& B, const Tensor& C, const Tensor& D, const Tensor& z,
                        const Tensor& dt_bias, bool dt_softplus, float dt_min, float dt_max) {
  check_defined(state, "ssd_state_update: state");
  MAMBA_CHECK(state.ndim() == 4, "ssd_state_update: state must be (B, H, P, N), got ",
              state.shape_str());
  const int64_t batch = state.dim(0), H = state.dim(1), P = state.dim(2), N = state.dim(3);
  check_shape(x, "ssd_state_update: x", {batch, H, P});
  check_shape(dt, "ssd_state_update: dt", {batch, H});
  check_shape(A, "ssd_state_update: A", {H});
  check_defined(B, "ssd_state_update: B");
  MAMBA_CHECK(B.ndim() == 3, "ssd_state_update: B must be (B, G, N), got ", B.shape_str());
  const int64_t G = B.dim(1);
  MAMBA_CHECK(G > 0 && H % G == 0, "ssd_state_update: ngroups G=", G, " must divide H=", H);
  check_shape(B, "ssd_state_update: B", {batch, G, N});
  check_shape(C, "ssd_state_update: C", {batch, G, N});
  const bool d_hdim = D.defined() && D.ndim() == 2;
  if (D.defined())
    MAMBA_CHECK(D.shape() == Shape({H}) || D.shape() == Shape({H, P}),
                "ssd_state_update: D must be (", H, ") or (", H, ",", P, "), got ", D.shape_str());
  if (z.defined()) check_shape(z, "ssd_state_update: z", {batch, H, P});
  if (dt_bias.defined()) check_shape(dt_bias, "ssd_state_update: dt_bias", {H});
  const bool limit = !(dt_min == 0.f && dt_max == std::numeric_limits<float>::infinity());
  const int64_t hpg = H / G;
  Tensor y = Tensor::empty({batch, H, P});
  const float* Dp = D.defined() ? D.data() : nullptr;
  const float* zp = z.defined() ? z.data() : nullptr;
  // grain: at least ~32K multiply-adds per task, so that tiny decode steps run inline
  parallel_for(batch * H, std::max<int64_t>(1, 32768 / (P * N)), [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, hd = bh % H, g = hd / hpg;
      const float dtv = process_dt<float>(dt[bh], dt_bias.defined() ? dt_bias[hd] : 0.f,
                                          dt_softplus, limit, dt_min, dt_max, nullptr);
      const float dA = std::exp(dtv * A[hd]);
      const float* Bp = B.data() + (b * G + g) * N;
      const float* Cp = C.data() + (b * G + g) * N;
      const float* xp = x.data() + bh * P;
      float* yp = y.data() + bh * P;
      HWY_DYNAMIC_DISPATCH(StateRowsKernel)
      (state.data() + bh * P * N, xp, Bp, Cp, dA, dtv, P, N, yp);
      for (int64_t p = 0; p < P; ++p) {
        float acc = yp[p];
        if (D.defined()) acc += Dp[d_hdim ? hd * P + p : hd] * xp[p];
        if (z.defined()) acc *= silu_ref(zp[bh * P + p]);
        yp[p] = acc;
      }
    }
  });
  return y;
}

}  // namespace mamba::ops
#endif  // HWY_ONCE
