// Mamba-3 scan: argument checks, the naive sequential reference (forward and backward, in
// double). See mamba3_scan.h for the recurrence. The backward runs the recurrence in reverse:
//   G_t = sum_r dy_r q_r^T + alpha_{t+1} G_{t+1}                     (dL/dS_t, (P, N))
//   dq_r = S_t^T dy_r;  dalpha_t = <G_t, S_{t-1}>;  dbeta_t = <G_t, KV_{t-1}>;  dgamma_t = <G_t,
//   KV_t> dv_{t,r} += gamma_t G_t k_{t,r} (+ beta_{t+1} G_{t+1} k_{t,r});  dk likewise with G^T v
// then through sigma / alpha / beta / gamma to Trap, ADT, DT, through the rotations to Q, K,
// their biases and theta, and through theta's running sum to Angles and DT.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/mamba3_scan.cpp"
#include "ops/mamba3_scan.h"

#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <type_traits>
#include <vector>

#include "core/gemm.h"
#include "mamba/parallel.h"
#include "ops/act.h"

// The row kernels (compiled once per SIMD target) of the decode step and of the fp32 backward:
// one token of the recurrence for one head's (P, N) state, one row of N at a time (fp32 lanes,
// each dot product summed across lanes at the end of its row: a fixed order).
HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Sout[p, :] = al Sin[p, :] + sum_r cp[r P + p] kp_r + sum_r cc[r P + p] k_r, then
// y[r P + p] = Sout[p, :] . q_r. kp, k, q: (R, N); cp, cc, y: (R, P). Sin may be Sout.
void StateStepKernel(const float* Sin, float* Sout, int64_t P, int64_t N, int64_t R, float al,
                     const float* kp, const float* cp, const float* k, const float* cc,
                     const float* q, float* y) {
  const hn::ScalableTag<float> d;
  const int64_t V = static_cast<int64_t>(hn::Lanes(d));
  const auto val = hn::Set(d, al);
  for (int64_t p = 0; p < P; ++p) {
    const float* si = Sin + p * N;
    float* so = Sout + p * N;
    auto acc = hn::Zero(d);
    int64_t n = 0;
    for (; n + V <= N; n += V) {
      auto sv = hn::Mul(hn::LoadU(d, si + n), val);
      for (int64_t r = 0; r < R; ++r) {
        sv = hn::MulAdd(hn::Set(d, cp[r * P + p]), hn::LoadU(d, kp + r * N + n), sv);
        sv = hn::MulAdd(hn::Set(d, cc[r * P + p]), hn::LoadU(d, k + r * N + n), sv);
      }
      hn::StoreU(sv, d, so + n);
      acc = hn::MulAdd(sv, hn::LoadU(d, q + n), acc);
    }
    float tail = 0.f;
    for (; n < N; ++n) {
      float sv = si[n] * al;
      for (int64_t r = 0; r < R; ++r)
        sv += cp[r * P + p] * kp[r * N + n] + cc[r * P + p] * k[r * N + n];
      so[n] = sv;
      tail += sv * q[n];
    }
    y[p] = hn::GetLane(hn::SumOfLanes(d, acc)) + tail;
    for (int64_t r = 1; r < R; ++r) {  // the other ranks' dot products (the row is in L1)
      const float* qr = q + r * N;
      auto a2 = hn::Zero(d);
      int64_t m = 0;
      for (; m + V <= N; m += V) a2 = hn::MulAdd(hn::LoadU(d, so + m), hn::LoadU(d, qr + m), a2);
      float t2 = 0.f;
      for (; m < N; ++m) t2 += so[m] * qr[m];
      y[r * P + p] = hn::GetLane(hn::SumOfLanes(d, a2)) + t2;
    }
  }
}

// One step of the reverse recurrence for one head, row by row (G = dL/dS_t, (P, N)):
//   G[p, :] = gscale G[p, :] + sum_r dy[r P + p] q_r       (gscale = alpha_{t+1})
//   *da = sum_p G[p, :] . Sp[p, :]
//   dq_r += dy[r P + p] Sc[p, :];  gk[r P + p] = G[p, :] . k_r;  gkp[r P + p] = G[p, :] . kp_r
//   dk_r += cv[r P + p] G[p, :];   dkp_r += cvp[r P + p] G[p, :]
// q, k, kp, dq, dk, dkp: (R, N); dy, cv, cvp, gk, gkp: (R, P).
void BwdStepKernel(float* G, float gscale, const float* Sc, const float* Sp, int64_t P, int64_t N,
                   int64_t R, const float* dy, const float* q, const float* k, const float* kp,
                   const float* cv, const float* cvp, float* dq, float* gk, float* gkp, float* dk,
                   float* dkp, float* da) {
  const hn::ScalableTag<float> d;
  const int64_t V = static_cast<int64_t>(hn::Lanes(d));
  const auto vs = hn::Set(d, gscale);
  float da_s = 0.f;
  for (int64_t p = 0; p < P; ++p) {
    float* g = G + p * N;
    const float* sc = Sc + p * N;
    const float* sp = Sp + p * N;
    auto acc = hn::Zero(d);
    int64_t n = 0;
    for (; n + V <= N; n += V) {
      auto gv = hn::Mul(hn::LoadU(d, g + n), vs);
      for (int64_t r = 0; r < R; ++r)
        gv = hn::MulAdd(hn::Set(d, dy[r * P + p]), hn::LoadU(d, q + r * N + n), gv);
      hn::StoreU(gv, d, g + n);
      acc = hn::MulAdd(gv, hn::LoadU(d, sp + n), acc);
    }
    float tail = 0.f;
    for (; n < N; ++n) {
      float gv = g[n] * gscale;
      for (int64_t r = 0; r < R; ++r) gv += dy[r * P + p] * q[r * N + n];
      g[n] = gv;
      tail += gv * sp[n];
    }
    da_s += hn::GetLane(hn::SumOfLanes(d, acc)) + tail;
    for (int64_t r = 0; r < R; ++r) {
      const auto vdy = hn::Set(d, dy[r * P + p]), vcv = hn::Set(d, cv[r * P + p]),
                 vcp = hn::Set(d, cvp[r * P + p]);
      const float *kr = k + r * N, *kpr = kp + r * N;
      float *dqr = dq + r * N, *dkr = dk + r * N, *dkpr = dkp + r * N;
      auto a1 = hn::Zero(d), a2 = hn::Zero(d);
      int64_t m = 0;
      for (; m + V <= N; m += V) {
        const auto gv = hn::LoadU(d, g + m);
        hn::StoreU(hn::MulAdd(vdy, hn::LoadU(d, sc + m), hn::LoadU(d, dqr + m)), d, dqr + m);
        a1 = hn::MulAdd(gv, hn::LoadU(d, kr + m), a1);
        a2 = hn::MulAdd(gv, hn::LoadU(d, kpr + m), a2);
        hn::StoreU(hn::MulAdd(vcv, gv, hn::LoadU(d, dkr + m)), d, dkr + m);
        hn::StoreU(hn::MulAdd(vcp, gv, hn::LoadU(d, dkpr + m)), d, dkpr + m);
      }
      float t1 = 0.f, t2 = 0.f;
      for (; m < N; ++m) {
        dqr[m] += dy[r * P + p] * sc[m];
        t1 += g[m] * kr[m];
        t2 += g[m] * kpr[m];
        dkr[m] += cv[r * P + p] * g[m];
        dkpr[m] += cvp[r * P + p] * g[m];
      }
      gk[r * P + p] = hn::GetLane(hn::SumOfLanes(d, a1)) + t1;
      gkp[r * P + p] = hn::GetLane(hn::SumOfLanes(d, a2)) + t2;
    }
  }
  *da = da_s;
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba::ops {
HWY_EXPORT(StateStepKernel);
HWY_EXPORT(BwdStepKernel);

namespace {

void need(const Tensor& t, const char* what, const char* name) {
  check_defined(t, str(what, ": ", name).c_str());
}

}  // namespace

Mamba3Dims mamba3_scan_check(const Mamba3ScanArgs& a, const char* what) {
  Mamba3Dims d;
  for (auto [t, n] : {std::pair{&a.Q, "Q"},
                      {&a.K, "K"},
                      {&a.V, "V"},
                      {&a.ADT, "ADT"},
                      {&a.DT, "DT"},
                      {&a.Trap, "Trap"},
                      {&a.Q_bias, "Q_bias"},
                      {&a.K_bias, "K_bias"},
                      {&a.Angles, "Angles"}})
    need(*t, what, n);
  MAMBA_CHECK(a.Q.ndim() == 5, what, ": Q must be (B, L, R, G, N), got ", a.Q.shape_str());
  MAMBA_CHECK(a.V.ndim() == 4, what, ": V must be (B, L, H, P), got ", a.V.shape_str());
  MAMBA_CHECK(a.Angles.ndim() == 3, what, ": Angles must be (B, L, S), got ", a.Angles.shape_str());
  d.batch = a.Q.dim(0), d.L = a.Q.dim(1), d.R = a.Q.dim(2), d.G = a.Q.dim(3), d.N = a.Q.dim(4);
  d.H = a.V.dim(2), d.P = a.V.dim(3), d.S = a.Angles.dim(2);
  MAMBA_CHECK(d.G >= 1 && d.H % d.G == 0, what, ": groups G=", d.G,
              " of Q must divide heads H=", d.H);
  MAMBA_CHECK(d.R >= 1 && d.N >= 1 && d.P >= 1, what, ": empty R, N or P in Q ", a.Q.shape_str(),
              " / V ", a.V.shape_str());
  auto shp = [&](const Tensor& t, const char* n, Shape s) {
    check_shape(t, str(what, ": ", n).c_str(), s);
  };
  shp(a.K, "K", {d.batch, d.L, d.R, d.G, d.N});
  shp(a.V, "V", {d.batch, d.L, d.H, d.P});
  shp(a.ADT, "ADT", {d.batch, d.L, d.H});
  shp(a.DT, "DT", {d.batch, d.L, d.H});
  shp(a.Trap, "Trap", {d.batch, d.L, d.H});
  shp(a.Q_bias, "Q_bias", {d.H, d.R, d.N});
  shp(a.K_bias, "K_bias", {d.H, d.R, d.N});
  shp(a.Angles, "Angles", {d.batch, d.L, d.S});
  MAMBA_CHECK(d.S <= d.N / 2, what, ": ", d.S, " rotary angles need 2*S <= N=", d.N);
  if (a.D.defined()) shp(a.D, "D", {d.H});
  if (a.Z.defined()) shp(a.Z, "Z", {d.batch, d.L, d.H, d.P});
  d.mimo = a.mimo_x.defined() || a.mimo_o.defined();
  if (d.mimo) {
    need(a.mimo_x, what, "mimo_x");
    need(a.mimo_o, what, "mimo_o");
    shp(a.mimo_x, "mimo_x", {d.H, d.R, d.P});
    shp(a.mimo_o, "mimo_o", {d.H, d.R, d.P});
    MAMBA_CHECK(a.Z.defined() == a.mimo_z.defined(), what,
                ": MIMO needs mimo_z exactly when Z is given");
    if (a.mimo_z.defined()) shp(a.mimo_z, "mimo_z", {d.H, d.R, d.P});
  } else {
    MAMBA_CHECK(d.R == 1, what, ": rank R=", d.R, " > 1 needs mimo_x and mimo_o (MIMO)");
    MAMBA_CHECK(!a.mimo_z.defined(), what, ": mimo_z without mimo_x / mimo_o");
  }
  if (a.norm_weight.defined()) shp(a.norm_weight, "norm_weight", {d.H * d.P});
  const Mamba3States& s = a.initial;
  const int n = s.angle.defined() + s.ssm.defined() + s.k.defined() + s.v.defined();
  MAMBA_CHECK(n == 0 || n == 4, what, ": initial states: give all four (angle, ssm, k, v) or none");
  if (n == 4) {
    shp(s.angle, "initial angle state", {d.batch, d.H, d.S});
    shp(s.ssm, "initial ssm state", {d.batch, d.H, d.P, d.N});
    shp(s.k, "initial k state", {d.batch, d.R, d.H, d.N});
    shp(s.v, "initial v state", {d.batch, d.H, d.P});
  }
  return d;
}

namespace {

// The kernels index raw rows: every tensor contiguous (a copy only where a view is strided).
Mamba3ScanArgs contiguous_args(const Mamba3ScanArgs& a) {
  Mamba3ScanArgs c = a;
  for (Tensor* t : {&c.Q, &c.K, &c.V, &c.ADT, &c.DT, &c.Trap, &c.Q_bias, &c.K_bias, &c.Angles, &c.D,
                    &c.Z, &c.mimo_x, &c.mimo_z, &c.mimo_o, &c.norm_weight, &c.initial.angle,
                    &c.initial.ssm, &c.initial.k, &c.initial.v})
    if (t->defined() && !t->is_contiguous()) *t = t->contiguous();
  return c;
}

constexpr double kPi = std::numbers::pi;

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The index pair rotated by angle j.
inline void pair_of(bool pairwise, int64_t N, int64_t j, int64_t* i0, int64_t* i1) {
  if (pairwise) {
    *i0 = 2 * j, *i1 = 2 * j + 1;
  } else {
    *i0 = j, *i1 = j + N / 2;
  }
}

// Everything the recurrence of one (b, h) computes, kept for the backward. T = double for the
// reference, float for the fast backward (the phases theta stay double in both).
template <class T>
struct SeqT {
  int64_t L, R, N, P, S;
  std::vector<T> sig, alp, bet, gam, dt;  // (L)
  std::vector<double> theta;              // (L, S) unwrapped
  std::vector<T> q, k;                    // (L, R, N) rotated, with bias
  std::vector<T> v;                       // (L, R, P) v_r
  std::vector<T> k0, v0;                  // (R, N), (R, P): k_{-1}, v_{-1}
  std::vector<T> St;                      // (L + 1, P, N): S_{-1}, S_0, ...
  std::vector<T> Y;                       // (L, R, P) S q + D v (before norm / gate)
  std::vector<T> rstd;                    // (L, R) with norm_weight
  std::vector<T> out;                     // (L, P)
  std::vector<T> cf;                      // fp32 path: the row kernel's coefficients (2, R, P)
};
using Seq = SeqT<double>;

struct Acc {  // read access to the inputs of one (b, h)
  const Mamba3ScanArgs& a;
  const Mamba3Dims& d;
  int64_t b, h, g;
  int64_t bl(int64_t t) const { return (b * d.L + t) * d.H + h; }
  const float* Qp(const Tensor& T, int64_t t, int64_t r) const {
    return T.data() + (((b * d.L + t) * d.R + r) * d.G + g) * d.N;
  }
  const float* Vp(const Tensor& T, int64_t t) const { return T.data() + bl(t) * d.P; }
};

template <class T>
void rotate(T* x, const double* theta, int64_t S, int64_t N, bool pairwise) {
  for (int64_t j = 0; j < S; ++j) {
    int64_t i0, i1;
    pair_of(pairwise, N, j, &i0, &i1);
    const double c = std::cos(theta[j]), s = std::sin(theta[j]);
    const double x0 = x[i0], x1 = x[i1];
    x[i0] = x0 * c - x1 * s;
    x[i1] = x0 * s + x1 * c;
  }
}

template <class T>
void run_forward(const Acc& c, SeqT<T>& q) {
  const Mamba3ScanArgs& a = c.a;
  const int64_t L = c.d.L, R = c.d.R, N = c.d.N, P = c.d.P, S = c.d.S, H = c.d.H, b = c.b, h = c.h;
  q.L = L, q.R = R, q.N = N, q.P = P, q.S = S;
  q.sig.resize(L), q.alp.resize(L), q.bet.resize(L), q.gam.resize(L), q.dt.resize(L);
  q.theta.assign(L * S, 0.0);
  q.q.assign(L * R * N, 0.0), q.k.assign(L * R * N, 0.0), q.v.assign(L * R * P, 0.0);
  q.k0.assign(R * N, 0.0), q.v0.assign(R * P, 0.0);
  q.St.assign((L + 1) * P * N, 0.0);
  q.Y.assign(L * R * P, 0.0), q.rstd.assign(L * R, 1.0), q.out.assign(L * P, 0.0);
  const bool init = a.initial.ssm.defined();
  auto mx = [&](int64_t r, int64_t p) {
    return c.d.mimo ? (double)a.mimo_x[(h * R + r) * P + p] : 1.0;
  };
  std::vector<double> th(S, 0.0);
  if (init) {
    for (int64_t j = 0; j < S; ++j) th[j] = a.initial.angle[(b * H + h) * S + j];
    for (int64_t i = 0; i < P * N; ++i) q.St[i] = a.initial.ssm[(b * H + h) * P * N + i];
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t n = 0; n < N; ++n) q.k0[r * N + n] = a.initial.k[((b * R + r) * H + h) * N + n];
      for (int64_t p = 0; p < P; ++p) q.v0[r * P + p] = a.initial.v[(b * H + h) * P + p] * mx(r, p);
    }
  }
  for (int64_t t = 0; t < L; ++t) {
    const int64_t i = c.bl(t);
    const double dt = a.DT[i], sg = sigmoid(a.Trap[i]), al = std::exp((double)a.ADT[i]);
    q.dt[t] = dt, q.sig[t] = sg, q.alp[t] = al;
    q.bet[t] = (1 - sg) * dt * al, q.gam[t] = sg * dt;
    for (int64_t j = 0; j < S; ++j) {
      th[j] += kPi * std::tanh((double)a.Angles[(b * L + t) * S + j]) * dt;
      q.theta[t * S + j] = th[j];
    }
    const float* Vt = c.Vp(a.V, t);
    for (int64_t r = 0; r < R; ++r) {
      T* qr = &q.q[(t * R + r) * N];
      T* kr = &q.k[(t * R + r) * N];
      const float *Qt = c.Qp(a.Q, t, r), *Kt = c.Qp(a.K, t, r);
      for (int64_t n = 0; n < N; ++n) {
        qr[n] = (double)Qt[n] + a.Q_bias[(h * R + r) * N + n];
        kr[n] = (double)Kt[n] + a.K_bias[(h * R + r) * N + n];
      }
      rotate(qr, &q.theta[t * S], S, N, a.rotate_pairwise);
      rotate(kr, &q.theta[t * S], S, N, a.rotate_pairwise);
      for (int64_t p = 0; p < P; ++p) q.v[(t * R + r) * P + p] = Vt[p] * mx(r, p);
    }
    // S_t = alpha S_{t-1} + beta sum_r v_{t-1} k_{t-1}^T + gamma sum_r v_t k_t^T
    const T* kp = t ? &q.k[(t - 1) * R * N] : q.k0.data();
    const T* vp = t ? &q.v[(t - 1) * R * P] : q.v0.data();
    const T* Sp = &q.St[t * P * N];
    T* Sn = &q.St[(t + 1) * P * N];
    if constexpr (std::is_same_v<T, float>) {
      // fp32: the vectorised row kernel (the decode step's), then + D v
      q.cf.resize(2 * R * P);
      for (int64_t j = 0; j < R * P; ++j)
        q.cf[j] = q.bet[t] * vp[j], q.cf[R * P + j] = q.gam[t] * q.v[t * R * P + j];
      HWY_DYNAMIC_DISPATCH(StateStepKernel)
      (Sp, Sn, P, N, R, q.alp[t], kp, q.cf.data(), &q.k[t * R * N], q.cf.data() + R * P,
       &q.q[t * R * N], &q.Y[t * R * P]);
      if (a.D.defined())
        for (int64_t j = 0; j < R * P; ++j) q.Y[t * R * P + j] += a.D[h] * q.v[t * R * P + j];
    } else {
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) {
          double kvp = 0, kvc = 0;
          for (int64_t r = 0; r < R; ++r) {
            kvp += vp[r * P + p] * kp[r * N + n];
            kvc += q.v[(t * R + r) * P + p] * q.k[(t * R + r) * N + n];
          }
          Sn[p * N + n] = al * Sp[p * N + n] + q.bet[t] * kvp + q.gam[t] * kvc;
        }
      for (int64_t r = 0; r < R; ++r) {
        T* y = &q.Y[(t * R + r) * P];
        const T* qr = &q.q[(t * R + r) * N];
        for (int64_t p = 0; p < P; ++p) {
          double s = 0;
          for (int64_t n = 0; n < N; ++n) s += Sn[p * N + n] * qr[n];
          if (a.D.defined()) s += (double)a.D[h] * q.v[(t * R + r) * P + p];
          y[p] = s;
        }
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      T* y = &q.Y[(t * R + r) * P];
      double ms = 0;
      if (a.norm_weight.defined()) {
        for (int64_t p = 0; p < P; ++p) ms += y[p] * y[p];
        q.rstd[t * R + r] = static_cast<T>(1.0 / std::sqrt(ms / P + a.norm_eps));
      }
      for (int64_t p = 0; p < P; ++p) {
        double o = y[p];
        if (a.norm_weight.defined()) o *= q.rstd[t * R + r] * a.norm_weight[h * P + p];
        if (a.Z.defined()) {
          double z = a.Z[i * P + p];
          if (a.mimo_z.defined()) z *= a.mimo_z[(h * R + r) * P + p];
          o *= z * sigmoid(z);
        }
        if (c.d.mimo) o *= a.mimo_o[(h * R + r) * P + p];
        q.out[t * P + p] += o;
      }
    }
  }
}

}  // namespace

std::vector<double> mamba3_scan_ref_f64(const Mamba3ScanArgs& a) {
  const Mamba3Dims d = mamba3_scan_check(a, "mamba3_scan_ref");
  std::vector<double> out(d.batch * d.L * d.H * d.P);
  Seq q;
  for (int64_t b = 0; b < d.batch; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      run_forward(Acc{a, d, b, h, h / (d.H / d.G)}, q);
      for (int64_t t = 0; t < d.L; ++t)
        for (int64_t p = 0; p < d.P; ++p)
          out[((b * d.L + t) * d.H + h) * d.P + p] = q.out[t * d.P + p];
    }
  return out;
}

Tensor mamba3_scan_ref(const Mamba3ScanArgs& a, Mamba3States* fs) {
  const Mamba3Dims d = mamba3_scan_check(a, "mamba3_scan_ref");
  const int64_t B = d.batch, L = d.L, H = d.H, P = d.P, N = d.N, R = d.R, S = d.S;
  Tensor out = Tensor::empty({B, L, H, P});
  if (fs) {
    fs->angle = Tensor::zeros({B, H, S});
    fs->ssm = Tensor::zeros({B, H, P, N});
    fs->k = Tensor::zeros({B, R, H, N});
    fs->v = Tensor::zeros({B, H, P});
  }
  Seq q;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      run_forward(Acc{a, d, b, h, h / (H / d.G)}, q);
      for (int64_t t = 0; t < L; ++t)
        for (int64_t p = 0; p < P; ++p)
          out[((b * L + t) * H + h) * P + p] = static_cast<float>(q.out[t * P + p]);
      if (!fs) continue;
      if (L == 0) {
        if (a.initial.ssm.defined()) {
          for (int64_t j = 0; j < S; ++j)
            fs->angle[(b * H + h) * S + j] = a.initial.angle[(b * H + h) * S + j];
          for (int64_t i = 0; i < P * N; ++i)
            fs->ssm[(b * H + h) * P * N + i] = a.initial.ssm[(b * H + h) * P * N + i];
          for (int64_t r = 0; r < R; ++r)
            for (int64_t n = 0; n < N; ++n)
              fs->k[((b * R + r) * H + h) * N + n] = a.initial.k[((b * R + r) * H + h) * N + n];
          for (int64_t p = 0; p < P; ++p)
            fs->v[(b * H + h) * P + p] = a.initial.v[(b * H + h) * P + p];
        }
        continue;
      }
      const double two_pi = 2 * kPi;
      for (int64_t j = 0; j < S; ++j) {
        const double th = q.theta[(L - 1) * S + j];
        fs->angle[(b * H + h) * S + j] = static_cast<float>(th - two_pi * std::floor(th / two_pi));
      }
      for (int64_t i = 0; i < P * N; ++i)
        fs->ssm[(b * H + h) * P * N + i] = static_cast<float>(q.St[L * P * N + i]);
      for (int64_t r = 0; r < R; ++r)
        for (int64_t n = 0; n < N; ++n)
          fs->k[((b * R + r) * H + h) * N + n] = static_cast<float>(q.k[((L - 1) * R + r) * N + n]);
      for (int64_t p = 0; p < P; ++p)
        fs->v[(b * H + h) * P + p] = a.V[((b * L + L - 1) * H + h) * P + p];
    }
  return out;
}

namespace {

// The gradients one (b, h) contributes to tensors other (b, h) pairs also reach, indexed locally
// (the caller adds them in a fixed order): Q, K (L, R, N) of its group, Angles (L, S), and the
// per-head parameters Q_bias, K_bias (R, N), D, mimo_x / mimo_z / mimo_o (R, P), norm (P).
template <class T>
struct ItemGrads {
  std::vector<T> dQ, dK, dAng, dQb, dKb, dD, dmx, dmz, dmo, dnw;
  void reset(int64_t L, int64_t R, int64_t N, int64_t P, int64_t S) {
    for (auto [v, n] : {std::pair{&dQ, L * R * N},
                        {&dK, L * R * N},
                        {&dAng, L * S},
                        {&dQb, R * N},
                        {&dKb, R * N},
                        {&dD, int64_t{1}},
                        {&dmx, R * P},
                        {&dmz, R * P},
                        {&dmo, R * P},
                        {&dnw, P}})
      v->assign(n, T(0));
  }
};
// The gradients only this (b, h) writes: rows (b, t, h) of V, Z (P each) and ADT, DT, Trap.
template <class T>
struct OwnGrads {
  T *dV, *dZ, *dADT, *dDT, *dTrap;
};
template <class T>
struct BwdWork {
  SeqT<T> q;
  std::vector<T> dY, dq, dk, dv, Gm, dal, dbe, dga, cf;
  std::vector<double> dth, suf, cs, sn;
};

// Backward of one token's output stage (the head-wise norm, the gate, the rank contraction) for
// row i = (b, t, h): from go (P), the gradient of out_t, to dy (R, P), the gradient of the rows
// y_r = S q_r + D v_r (R, P); adds the gate / norm / mimo_o gradients to it and own.dZ.
template <class T>
void finish_token_bwd(const Mamba3ScanArgs& a, const Mamba3Dims& d, int64_t h, int64_t i,
                      const T* yr, const float* go_row, T* dyr, ItemGrads<T>& it, OwnGrads<T> own) {
  const int64_t R = d.R, P = d.P;
  for (int64_t r = 0; r < R; ++r) {
    const T* y = yr + r * P;
    T* dy = dyr + r * P;
    double rs = 1.0;
    if (a.norm_weight.defined()) {
      double ms = 0;
      for (int64_t p = 0; p < P; ++p) ms += (double)y[p] * y[p];
      rs = static_cast<T>(1.0 / std::sqrt(ms / P + a.norm_eps));
    }
    for (int64_t p = 0; p < P; ++p) {
      double go = go_row[p];
      const int64_t m = (h * R + r) * P + p;
      double pre = y[p];
      if (a.norm_weight.defined()) pre *= rs * a.norm_weight[h * P + p];
      double gate = 1.0, zz = 0.0, sg = 0.0;
      if (a.Z.defined()) {
        zz = a.Z[i * P + p];
        if (a.mimo_z.defined()) zz *= a.mimo_z[m];
        sg = sigmoid(zz);
        gate = zz * sg;
      }
      if (d.mimo) {
        it.dmo[r * P + p] += static_cast<T>(go * pre * gate);
        go *= a.mimo_o[m];
      }
      if (a.Z.defined()) {
        const double dzz = go * pre * sg * (1.0 + zz * (1.0 - sg));
        if (a.mimo_z.defined()) {
          own.dZ[i * P + p] += static_cast<T>(dzz * a.mimo_z[m]);
          it.dmz[r * P + p] += static_cast<T>(dzz * a.Z[i * P + p]);
        } else {
          own.dZ[i * P + p] += static_cast<T>(dzz);
        }
        go *= gate;
      }
      dy[p] = static_cast<T>(go);  // d / d pre
    }
    if (a.norm_weight.defined()) {
      // pre = y * rs * w: dw += dpre * y * rs; dy = rs * u - y * rs^3 * <u, y> / P
      double uy = 0;
      for (int64_t p = 0; p < P; ++p) {
        it.dnw[p] += static_cast<T>(dy[p] * y[p] * rs);
        dy[p] *= a.norm_weight[h * P + p];
        uy += dy[p] * y[p];
      }
      for (int64_t p = 0; p < P; ++p)
        dy[p] = static_cast<T>(rs * dy[p] - y[p] * rs * rs * rs * uy / P);
    }
  }
}

// Backward of the prep stage of one (b, h) over all L tokens: from the gradients of the rotated
// q_r, k_r (L, R, N; overwritten with those of the unrotated ones) and of v_r (L, R, P) to Q, K,
// their biases, V, mimo_x, the phases and through their running sum to Angles and DT.
// theta: (L, S) unwrapped phases; q, k: (L, R, N) rotated; dt: (L). dth, suf, cs, sn: scratch.
template <class T>
void prep_bwd(const Acc& c, const double* theta, const T* q, const T* k, const T* dt, T* dq, T* dk,
              const T* dv, std::vector<double>& dth, std::vector<double>& suf,
              std::vector<double>& cs, std::vector<double>& sn, ItemGrads<T>& it, OwnGrads<T> own) {
  const Mamba3ScanArgs& a = c.a;
  const Mamba3Dims& d = c.d;
  const int64_t L = d.L, R = d.R, N = d.N, P = d.P, S = d.S, b = c.b, h = c.h;
  dth.assign(L * S, 0.0), suf.assign(S, 0.0), cs.resize(S), sn.resize(S);
  for (int64_t t = 0; t < L; ++t) {
    const int64_t i = c.bl(t);
    const float* Vt = c.Vp(a.V, t);
    for (int64_t j = 0; j < S; ++j)
      cs[j] = std::cos(theta[t * S + j]), sn[j] = std::sin(theta[t * S + j]);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t which = 0; which < 2; ++which) {
        T* gr = which ? &dk[(t * R + r) * N] : &dq[(t * R + r) * N];
        const T* xr = which ? &k[(t * R + r) * N] : &q[(t * R + r) * N];
        // undo the rotation: d(pre) = R(theta)^T d(rot); dtheta += -g0 x1 + g1 x0 (rotated x)
        for (int64_t j = 0; j < S; ++j) {
          int64_t i0, i1;
          pair_of(a.rotate_pairwise, N, j, &i0, &i1);
          const double g0 = gr[i0], g1 = gr[i1];
          dth[t * S + j] += -g0 * xr[i1] + g1 * xr[i0];
          gr[i0] = static_cast<T>(g0 * cs[j] + g1 * sn[j]);
          gr[i1] = static_cast<T>(-g0 * sn[j] + g1 * cs[j]);
        }
        T* dX = which ? &it.dK[(t * R + r) * N] : &it.dQ[(t * R + r) * N];
        T* dXb = which ? &it.dKb[r * N] : &it.dQb[r * N];
        for (int64_t n = 0; n < N; ++n) dX[n] += gr[n], dXb[n] += gr[n];
      }
      for (int64_t p = 0; p < P; ++p) {
        const T gv = dv[(t * R + r) * P + p];
        if (d.mimo) {
          own.dV[i * P + p] += gv * a.mimo_x[(h * R + r) * P + p];
          it.dmx[r * P + p] += gv * Vt[p];
        } else {
          own.dV[i * P + p] += gv;
        }
      }
    }
  }
  // theta_t = theta_{t-1} + pi tanh(Angles_t) DT_t: suffix sums of dtheta.
  for (int64_t t = L - 1; t >= 0; --t) {
    const int64_t i = c.bl(t);
    for (int64_t j = 0; j < S; ++j) {
      suf[j] += dth[t * S + j];
      const double th = std::tanh((double)a.Angles[(b * L + t) * S + j]);
      it.dAng[t * S + j] += static_cast<T>(suf[j] * kPi * (1 - th * th) * dt[t]);
      own.dDT[i] += static_cast<T>(suf[j] * kPi * th);
    }
  }
}

// Gradients of sum(out * dout) for one (b, h): the recurrence above, run backwards.
template <class T>
void bwd_one(const Acc& c, const Tensor& dout, BwdWork<T>& w, ItemGrads<T>& it, OwnGrads<T> own) {
  const Mamba3ScanArgs& a = c.a;
  const Mamba3Dims& d = c.d;
  const int64_t L = d.L, R = d.R, N = d.N, P = d.P, S = d.S, h = c.h;
  SeqT<T>& q = w.q;
  run_forward(c, q);
  it.reset(L, R, N, P, S);
  w.dY.assign(L * R * P, T(0)), w.dq.assign(L * R * N, T(0)), w.dk.assign(L * R * N, T(0));
  w.dv.assign(L * R * P, T(0)), w.Gm.assign(P * N, T(0));
  w.dal.assign(L, T(0)), w.dbe.assign(L, T(0)), w.dga.assign(L, T(0));
  w.dth.assign(L * S, 0.0), w.suf.assign(S, 0.0);
  w.cs.resize(S), w.sn.resize(S);
  const float* go_p = dout.data();
  // Gate, norm, rank contraction: dY (L, R, P).
  for (int64_t t = 0; t < L; ++t) {
    const int64_t i = c.bl(t);
    finish_token_bwd(a, d, h, i, &q.Y[t * R * P], go_p + i * P, &w.dY[t * R * P], it, own);
  }
  // The recurrence backwards.
  T* Gm = w.Gm.data();  // alpha_{t+1} G_{t+1}, then G_t
  if constexpr (std::is_same_v<T, float>) {
    // fp32: one pass of the vectorised row kernel per step; G_{t+1} is scaled by alpha_{t+1}
    // inside it. cf: gam v_t, bet v_{t-1}, gk, gkp (R, P) each; dk_{-1} goes to a scratch row.
    w.cf.assign(4 * R * P + R * N, 0.f);
    float *cv = w.cf.data(), *cvp = cv + R * P, *gk = cvp + R * P, *gkp = gk + R * P;
    float* dk_scratch = gkp + R * P;
    const bool hasD = a.D.defined();
    const float Dh = hasD ? a.D[h] : 0.f;
    for (int64_t t = L - 1; t >= 0; --t) {
      const float* kp = t ? &q.k[(t - 1) * R * N] : q.k0.data();
      const float* vp = t ? &q.v[(t - 1) * R * P] : q.v0.data();
      const float* vt = &q.v[t * R * P];
      const float* dy = &w.dY[t * R * P];
      for (int64_t j = 0; j < R * P; ++j) cv[j] = q.gam[t] * vt[j], cvp[j] = q.bet[t] * vp[j];
      float da = 0.f;
      HWY_DYNAMIC_DISPATCH(BwdStepKernel)
      (Gm, t + 1 < L ? q.alp[t + 1] : 0.f, &q.St[(t + 1) * P * N], &q.St[t * P * N], P, N, R, dy,
       &q.q[t * R * N], &q.k[t * R * N], kp, cv, cvp, &w.dq[t * R * N], gk, gkp, &w.dk[t * R * N],
       t ? &w.dk[(t - 1) * R * N] : dk_scratch, &da);
      float db = 0.f, dg = 0.f;
      float* dvt = &w.dv[t * R * P];
      for (int64_t j = 0; j < R * P; ++j) {
        dg += vt[j] * gk[j];
        db += vp[j] * gkp[j];
        dvt[j] += q.gam[t] * gk[j];
        if (hasD) it.dD[0] += dy[j] * vt[j], dvt[j] += Dh * dy[j];
      }
      if (t)
        for (int64_t j = 0; j < R * P; ++j) w.dv[(t - 1) * R * P + j] += q.bet[t] * gkp[j];
      w.dal[t] = da, w.dbe[t] = db, w.dga[t] = dg;
    }
  } else {
    for (int64_t t = L - 1; t >= 0; --t) {
      const T* Sc = &q.St[(t + 1) * P * N];
      const T* Sp = &q.St[t * P * N];
      const T* kp = t ? &q.k[(t - 1) * R * N] : q.k0.data();
      const T* vp = t ? &q.v[(t - 1) * R * P] : q.v0.data();
      for (int64_t r = 0; r < R; ++r) {
        const T* dy = &w.dY[(t * R + r) * P];
        const T* qr = &q.q[(t * R + r) * N];
        T* dqr = &w.dq[(t * R + r) * N];
        for (int64_t n = 0; n < N; ++n) {
          double sm = 0;
          for (int64_t p = 0; p < P; ++p) sm += Sc[p * N + n] * dy[p];
          dqr[n] = static_cast<T>(sm);
        }
        for (int64_t p = 0; p < P; ++p) {
          for (int64_t n = 0; n < N; ++n) Gm[p * N + n] += dy[p] * qr[n];
          if (a.D.defined()) {
            it.dD[0] += dy[p] * q.v[(t * R + r) * P + p];
            w.dv[(t * R + r) * P + p] += a.D[h] * dy[p];
          }
        }
      }
      double da = 0, db = 0, dg = 0;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t n = 0; n < N; ++n) {
          const double gpn = Gm[p * N + n];
          double kvp = 0, kvc = 0;
          for (int64_t r = 0; r < R; ++r) {
            kvp += vp[r * P + p] * kp[r * N + n];
            kvc += q.v[(t * R + r) * P + p] * q.k[(t * R + r) * N + n];
          }
          da += gpn * Sp[p * N + n];
          db += gpn * kvp;
          dg += gpn * kvc;
        }
      w.dal[t] = static_cast<T>(da), w.dbe[t] = static_cast<T>(db), w.dga[t] = static_cast<T>(dg);
      for (int64_t r = 0; r < R; ++r) {
        for (int64_t p = 0; p < P; ++p) {
          double sc = 0, sp = 0;
          for (int64_t n = 0; n < N; ++n) {
            sc += Gm[p * N + n] * q.k[(t * R + r) * N + n];
            sp += Gm[p * N + n] * kp[r * N + n];
          }
          w.dv[(t * R + r) * P + p] += static_cast<T>(q.gam[t] * sc);
          if (t) w.dv[((t - 1) * R + r) * P + p] += static_cast<T>(q.bet[t] * sp);
        }
        for (int64_t n = 0; n < N; ++n) {
          double sc = 0, sp = 0;
          for (int64_t p = 0; p < P; ++p) {
            sc += Gm[p * N + n] * q.v[(t * R + r) * P + p];
            sp += Gm[p * N + n] * vp[r * P + p];
          }
          w.dk[(t * R + r) * N + n] += static_cast<T>(q.gam[t] * sc);
          if (t) w.dk[((t - 1) * R + r) * N + n] += static_cast<T>(q.bet[t] * sp);
        }
      }
      const T al = q.alp[t];
      for (int64_t i = 0; i < P * N; ++i) Gm[i] *= al;
    }
  }
  // Per step: the scalars, then the rotations, the inputs.
  for (int64_t t = 0; t < L; ++t) {
    const int64_t i = c.bl(t);
    const double sg = q.sig[t], al = q.alp[t], dt = q.dt[t];
    own.dADT[i] += static_cast<T>(w.dal[t] * al + w.dbe[t] * q.bet[t]);
    own.dDT[i] += static_cast<T>(w.dbe[t] * (1 - sg) * al + w.dga[t] * sg);
    const double dsig = -w.dbe[t] * dt * al + w.dga[t] * dt;
    own.dTrap[i] += static_cast<T>(dsig * sg * (1 - sg));
  }
  prep_bwd(c, q.theta.data(), q.q.data(), q.k.data(), q.dt.data(), w.dq.data(), w.dk.data(),
           w.dv.data(), w.dth, w.suf, w.cs, w.sn, it, own);
}

// The shared gradients, as flat arrays in the inputs' layouts (T = double or float).
template <class T>
struct AllGrads {
  std::vector<T> dQ, dK, dV, dADT, dDT, dTrap, dQb, dKb, dAng, dD, dZ, dmx, dmz, dmo, dnw;
  AllGrads(const Mamba3ScanArgs& a, const Mamba3Dims& d) {
    const int64_t B = d.batch, L = d.L, H = d.H, P = d.P, N = d.N, R = d.R, S = d.S;
    dQ.assign(a.Q.numel(), 0), dK.assign(a.K.numel(), 0), dV.assign(a.V.numel(), 0);
    dADT.assign(B * L * H, 0), dDT.assign(B * L * H, 0), dTrap.assign(B * L * H, 0);
    dQb.assign(H * R * N, 0), dKb.assign(H * R * N, 0), dAng.assign(B * L * S, 0);
    dD.assign(H, 0), dZ.assign(a.Z.defined() ? a.Z.numel() : 0, 0);
    dmx.assign(H * R * P, 0), dmz.assign(H * R * P, 0), dmo.assign(H * R * P, 0);
    dnw.assign(H * P, 0);
  }
  OwnGrads<T> own() { return {dV.data(), dZ.data(), dADT.data(), dDT.data(), dTrap.data()}; }
  // Adds item (b, h)'s shared gradients.
  void add(const Mamba3Dims& d, int64_t b, int64_t h, const ItemGrads<T>& it) {
    const int64_t L = d.L, R = d.R, N = d.N, P = d.P, S = d.S, G = d.G, g = h / (d.H / G);
    for (int64_t t = 0; t < L; ++t)
      for (int64_t r = 0; r < R; ++r)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = (((b * L + t) * R + r) * G + g) * N + n, j = (t * R + r) * N + n;
          dQ[o] += it.dQ[j], dK[o] += it.dK[j];
        }
    for (int64_t i = 0; i < L * S; ++i) dAng[b * L * S + i] += it.dAng[i];
    for (int64_t i = 0; i < R * N; ++i)
      dQb[h * R * N + i] += it.dQb[i], dKb[h * R * N + i] += it.dKb[i];
    dD[h] += it.dD[0];
    for (int64_t i = 0; i < R * P; ++i) {
      dmx[h * R * P + i] += it.dmx[i], dmz[h * R * P + i] += it.dmz[i];
      dmo[h * R * P + i] += it.dmo[i];
    }
    for (int64_t p = 0; p < P; ++p) dnw[h * P + p] += it.dnw[p];
  }
  template <class V>
  static Tensor tensor(const std::vector<V>& v, Shape s) {
    Tensor t = Tensor::empty(std::move(s));
    for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(v[i]);
    return t;
  }
  Mamba3ScanGrads result(const Mamba3ScanArgs& a, const Mamba3Dims& d) const {
    Mamba3ScanGrads r;
    r.dQ = tensor(dQ, a.Q.shape()), r.dK = tensor(dK, a.K.shape()), r.dV = tensor(dV, a.V.shape());
    r.dADT = tensor(dADT, a.ADT.shape()), r.dDT = tensor(dDT, a.DT.shape());
    r.dTrap = tensor(dTrap, a.Trap.shape());
    r.dQ_bias = tensor(dQb, a.Q_bias.shape()), r.dK_bias = tensor(dKb, a.K_bias.shape());
    r.dAngles = tensor(dAng, a.Angles.shape());
    if (a.D.defined()) r.dD = tensor(dD, a.D.shape());
    if (a.Z.defined()) r.dZ = tensor(dZ, a.Z.shape());
    if (d.mimo) {
      r.dmimo_x = tensor(dmx, a.mimo_x.shape());
      r.dmimo_o = tensor(dmo, a.mimo_o.shape());
      if (a.mimo_z.defined()) r.dmimo_z = tensor(dmz, a.mimo_z.shape());
    }
    if (a.norm_weight.defined()) r.dnorm_weight = tensor(dnw, a.norm_weight.shape());
    return r;
  }
};

Mamba3Dims check_bwd(const Mamba3ScanArgs& a, const Tensor& dout, const char* what) {
  const Mamba3Dims d = mamba3_scan_check(a, what);
  MAMBA_CHECK(!a.initial.ssm.defined(), what,
              ": initial states are not differentiated; call without them");
  check_shape(dout, str(what, ": dout").c_str(), {d.batch, d.L, d.H, d.P});
  return d;
}

}  // namespace

Mamba3ScanGrads mamba3_scan_bwd_ref(const Mamba3ScanArgs& a, const Tensor& dout) {
  const Mamba3Dims d = check_bwd(a, dout, "mamba3_scan_bwd_ref");
  AllGrads<double> all(a, d);
  BwdWork<double> w;
  ItemGrads<double> it;
  for (int64_t b = 0; b < d.batch; ++b)
    for (int64_t h = 0; h < d.H; ++h) {
      bwd_one(Acc{a, d, b, h, h / (d.H / d.G)}, dout, w, it, all.own());
      all.add(d, b, h, it);
    }
  return all.result(a, d);
}

Mamba3ScanGrads mamba3_scan_bwd_seq(const Mamba3ScanArgs& a_in, const Tensor& dout_in) {
  const Mamba3Dims d = check_bwd(a_in, dout_in, "mamba3_scan_bwd_seq");
  const Mamba3ScanArgs a = contiguous_args(a_in);
  const Tensor dout = dout_in.contiguous();
  const int64_t items = d.batch * d.H;
  AllGrads<float> all(a, d);
  // Each (b, h) in parallel; its shared contributions are kept and added in (b, h) order after
  // the parallel region (bitwise the same for any thread count).
  std::vector<ItemGrads<float>> parts(static_cast<size_t>(items));
  parallel_for(items, 1, [&](int64_t i0, int64_t i1) {
    BwdWork<float> w;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / d.H, h = i % d.H;
      bwd_one(Acc{a, d, b, h, h / (d.H / d.G)}, dout, w, parts[i], all.own());
    }
  });
  for (int64_t i = 0; i < items; ++i) all.add(d, i / d.H, i % d.H, parts[i]);
  return all.result(a, d);
}

// ---- chunked forward (fp32) --------------------------------------------------------------------

namespace {

// Token t of head h (batch b): advances the phases theta (S, double) by pi tanh(Angles_t) DT_t,
// then writes the rotated q_r, k_r with their biases (R, N) and v_r = V_t * mimo_x_r (R, P).
// cs: (2 S) scratch.
void prep_token(const Mamba3ScanArgs& a, const Mamba3Dims& d, int64_t b, int64_t t, int64_t h,
                double* theta, float* cs, float* q, float* k, float* v) {
  const int64_t L = d.L, R = d.R, N = d.N, P = d.P, S = d.S, H = d.H, G = d.G;
  const int64_t g = h / (H / G), i = (b * L + t) * H + h;
  const double dt = a.DT.data()[i];
  const float* ang = a.Angles.data() + (b * L + t) * S;
  float* sn = cs + S;
  for (int64_t j = 0; j < S; ++j) {
    theta[j] += kPi * std::tanh((double)ang[j]) * dt;
    cs[j] = static_cast<float>(std::cos(theta[j])), sn[j] = static_cast<float>(std::sin(theta[j]));
  }
  const float* Vt = a.V.data() + i * P;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t off = (((b * L + t) * R + r) * G + g) * N;
    const float *Qt = a.Q.data() + off, *Kt = a.K.data() + off;
    const float *qb = a.Q_bias.data() + (h * R + r) * N, *kb = a.K_bias.data() + (h * R + r) * N;
    float* qr = q + r * N;
    float* kr = k + r * N;
    for (int64_t n = 0; n < N; ++n) qr[n] = Qt[n] + qb[n], kr[n] = Kt[n] + kb[n];
    for (int64_t j = 0; j < S; ++j) {
      int64_t i0, i1;
      pair_of(a.rotate_pairwise, N, j, &i0, &i1);
      const float q0 = qr[i0], q1 = qr[i1], k0 = kr[i0], k1 = kr[i1];
      qr[i0] = q0 * cs[j] - q1 * sn[j], qr[i1] = q0 * sn[j] + q1 * cs[j];
      kr[i0] = k0 * cs[j] - k1 * sn[j], kr[i1] = k0 * sn[j] + k1 * cs[j];
    }
    float* vr = v + r * P;
    if (d.mimo) {
      const float* mx = a.mimo_x.data() + (h * R + r) * P;
      for (int64_t p = 0; p < P; ++p) vr[p] = Vt[p] * mx[p];
    } else {
      std::copy_n(Vt, P, vr);
    }
  }
}

// One token's output row o (P) of head h from its R rows y (R, P) (= S q + D v): the head-wise
// norm, the gate, the rank contraction; i = (b, t, h) is the row of Z / out.
void finish_token(const Mamba3ScanArgs& a, const Mamba3Dims& d, int64_t h, int64_t i,
                  const float* yr, float* o) {
  const int64_t R = d.R, P = d.P;
  const float* Z = a.Z.defined() ? a.Z.data() + i * P : nullptr;
  const float* mz = a.mimo_z.defined() ? a.mimo_z.data() + h * R * P : nullptr;
  const float* mo = d.mimo ? a.mimo_o.data() + h * R * P : nullptr;
  const float* nw = a.norm_weight.defined() ? a.norm_weight.data() + h * P : nullptr;
  std::fill(o, o + P, 0.f);
  for (int64_t r = 0; r < R; ++r) {
    const float* y = yr + r * P;
    float rs = 1.f;
    if (nw) {
      double ms = 0;
      for (int64_t p = 0; p < P; ++p) ms += (double)y[p] * y[p];
      rs = static_cast<float>(1.0 / std::sqrt(ms / P + a.norm_eps));
    }
    for (int64_t p = 0; p < P; ++p) {
      float v = y[p];
      if (nw) v *= rs * nw[p];
      if (Z) {
        float z = Z[p];
        if (mz) z *= mz[r * P + p];
        v *= z / (1.f + std::exp(-z));
      }
      if (mo) v *= mo[r * P + p];
      o[p] += v;
    }
  }
}

struct ChunkScratch {
  std::vector<float> q, k, v;          // (L, R, N), (L, R, N), (L, R, P)
  std::vector<float> adt, dt, sig;     // (L)
  std::vector<double> theta;           // (S) running phase
  std::vector<float> cum, c, sc, ych;  // chunk: (T), (T, T), (T*R, T*R), (T*R, P)
  std::vector<float> S, kvp;           // (P, N) state; (R*N + R*P) previous token's k, v
  std::vector<float> vw;               // (T*R, P) the chunk's v rows times c_end,s
  std::vector<float> cs;               // (2 S) cos, sin of the phases
  // Kept for the chunked backward (keep = true): the phases of every token (L, S), the state
  // entering each chunk after its first token's beta term (S_eff, (chunks, P, N)), the rows
  // y = S q + D v (L, R, P), and the decays exp(cum_t - cum_s) of the current chunk (T, T).
  std::vector<double> th_all;
  std::vector<float> Seff, Y, E;
};

// The intra-chunk coefficients of tokens [t0, t0 + n) (w.cum must hold the chunk's cumulative
// decays): c_ts = exp(cum_t - cum_s) (gamma_s + (1 - sigma_{s+1}) DT_{s+1}) below the diagonal
// (one vector exp per row), gamma_t on it, 0 above, in w.c (rows of T); with E, the bare decays
// exp(cum_t - cum_s) (s < t) too.
void chunk_coeffs(ChunkScratch& w, int64_t t0, int64_t n, int64_t T, float* E) {
  for (int64_t t = 0; t < n; ++t) {
    float* ct = &w.c[t * T];
    for (int64_t s2 = 0; s2 < t; ++s2) ct[s2] = w.cum[t] - w.cum[s2];
    exp_inplace(ct, t);
    if (E) std::copy_n(ct, t, E + t * T);
    for (int64_t s2 = 0; s2 < t; ++s2) {
      const int64_t ts = t0 + s2;
      ct[s2] *= w.sig[ts] * w.dt[ts] + (1.f - w.sig[ts + 1]) * w.dt[ts + 1];
    }
    ct[t] = w.sig[t0 + t] * w.dt[t0 + t];
    std::fill(ct + t + 1, ct + n, 0.f);
  }
}

// The chunked forward of one (b, h). keep = false: writes out's rows (and fs). keep = true (the
// backward's recomputation): writes nothing out, keeps w.th_all, w.Seff and w.Y instead.
void chunked_one(const Mamba3ScanArgs& a, const Mamba3Dims& d, int64_t b, int64_t h, int64_t CS,
                 ChunkScratch& w, float* out, Mamba3States* fs, bool keep = false) {
  const int64_t L = d.L, R = d.R, N = d.N, P = d.P, S = d.S, H = d.H;
  w.q.resize(L * R * N), w.k.resize(L * R * N), w.v.resize(L * R * P);
  w.adt.resize(L), w.dt.resize(L), w.sig.resize(L);
  w.theta.assign(S, 0.0);
  w.S.assign(P * N, 0.f);
  w.kvp.assign(R * N + R * P, 0.f);
  float* kprev = w.kvp.data();
  float* vprev = w.kvp.data() + R * N;
  const bool init = a.initial.ssm.defined();
  auto mx = [&](int64_t r, int64_t p) { return d.mimo ? a.mimo_x[(h * R + r) * P + p] : 1.f; };
  if (init) {
    for (int64_t j = 0; j < S; ++j) w.theta[j] = a.initial.angle[(b * H + h) * S + j];
    for (int64_t i = 0; i < P * N; ++i) w.S[i] = a.initial.ssm[(b * H + h) * P * N + i];
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t n = 0; n < N; ++n) kprev[r * N + n] = a.initial.k[((b * R + r) * H + h) * N + n];
      for (int64_t p = 0; p < P; ++p)
        vprev[r * P + p] = a.initial.v[(b * H + h) * P + p] * mx(r, p);
    }
  }
  // Per token: scalars, rotated q / k (with bias), v_r.
  w.cs.resize(2 * S);
  if (keep) w.th_all.resize(L * S);
  for (int64_t t = 0; t < L; ++t) {
    const int64_t i = (b * L + t) * H + h;
    w.adt[t] = a.ADT.data()[i], w.dt[t] = a.DT.data()[i];
    w.sig[t] = static_cast<float>(sigmoid(a.Trap.data()[i]));
    prep_token(a, d, b, t, h, w.theta.data(), w.cs.data(), &w.q[t * R * N], &w.k[t * R * N],
               &w.v[t * R * P]);
    if (keep) std::copy_n(w.theta.data(), S, &w.th_all[t * S]);
  }
  const int64_t T = std::min(CS, L), TR = T * R;
  w.cum.resize(T), w.c.resize(T * T), w.sc.resize(TR * TR), w.ych.resize(TR * P);
  w.vw.resize(TR * P);
  if (keep) w.Seff.resize(((L + T - 1) / T) * P * N), w.Y.resize(L * R * P);
  const float Dh = a.D.defined() ? a.D[h] : 0.f;
  for (int64_t t0 = 0; t0 < L; t0 += T) {
    const int64_t n = std::min(T, L - t0), nr = n * R;
    // decay from the chunk's start: cum_j = sum_{i <= j} ADT_{t0+i}
    double acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += w.adt[t0 + j], w.cum[j] = static_cast<float>(acc);
    // S_eff = S + (1 - sigma_t0) DT_t0 * sum_r v_prev k_prev^T (the beta term of the first token)
    const float bsc = (1.f - w.sig[t0]) * w.dt[t0];
    for (int64_t p = 0; p < P; ++p)
      for (int64_t r = 0; r < R; ++r) {
        const float vv = bsc * vprev[r * P + p];
        float* Sr = &w.S[p * N];
        const float* kr = &kprev[r * N];
        for (int64_t nn = 0; nn < N; ++nn) Sr[nn] += vv * kr[nn];
      }
    if (keep) std::copy_n(w.S.data(), P * N, &w.Seff[(t0 / T) * P * N]);
    chunk_coeffs(w, t0, n, T, nullptr);
    const float* qc = &w.q[t0 * R * N];
    const float* kc = &w.k[t0 * R * N];
    const float* vc = &w.v[t0 * R * P];
    // scores (t r, s r') = c_ts (q_tr . k_sr'): one GEMM, then the mask and the decays
    gemm(false, true, nr, nr, N, 1.f, qc, N, kc, N, 0.f, w.sc.data(), TR);
    for (int64_t i = 0; i < nr; ++i) {
      const float* ct = &w.c[(i / R) * T];
      float* si = &w.sc[i * TR];
      for (int64_t j = 0; j < nr; ++j) si[j] *= ct[j / R];
    }
    // y (t r) = exp(cum_t) q_tr S_eff^T + D v_tr + scores V
    float* ych = keep ? &w.Y[t0 * R * P] : w.ych.data();
    gemm(false, true, nr, P, N, 1.f, qc, N, w.S.data(), N, 0.f, ych, P);
    for (int64_t i = 0; i < nr; ++i) {
      const float e = std::exp(w.cum[i / R]);
      float* y = &ych[i * P];
      const float* vi = &vc[i * P];
      for (int64_t p = 0; p < P; ++p) y[p] = e * y[p] + Dh * vi[p];
    }
    gemm(false, false, nr, P, nr, 1.f, w.sc.data(), TR, vc, P, 1.f, ych, P);
    // The state at the chunk's end: exp(cum_end) S_eff + sum_s c_end,s V_s^T K_s (one GEMM)
    const int64_t e = n - 1;
    const float de = std::exp(w.cum[e]);
    for (int64_t i = 0; i < P * N; ++i) w.S[i] *= de;
    for (int64_t j = 0; j < nr; ++j) {
      const float cj = w.c[e * T + j / R];
      for (int64_t p = 0; p < P; ++p) w.vw[j * P + p] = cj * vc[j * P + p];
    }
    gemm(true, false, P, N, nr, 1.f, w.vw.data(), P, kc, N, 1.f, w.S.data(), N);
    std::copy_n(&kc[e * R * N], R * N, kprev);
    std::copy_n(&vc[e * R * P], R * P, vprev);
    if (keep) continue;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t i = (b * L + t0 + t) * H + h;
      finish_token(a, d, h, i, &w.ych[t * R * P], out + i * P);
    }
  }
  if (!fs) return;
  const double two_pi = 2 * kPi;
  for (int64_t j = 0; j < S; ++j)
    fs->angle[(b * H + h) * S + j] =
        static_cast<float>(w.theta[j] - two_pi * std::floor(w.theta[j] / two_pi));
  for (int64_t i = 0; i < P * N; ++i) fs->ssm[(b * H + h) * P * N + i] = w.S[i];
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) fs->k[((b * R + r) * H + h) * N + n] = kprev[r * N + n];
  for (int64_t p = 0; p < P; ++p)
    fs->v[(b * H + h) * P + p] = a.V[((b * L + L - 1) * H + h) * P + p];
}

}  // namespace

Tensor mamba3_scan_fwd(const Mamba3ScanArgs& a_in, int64_t chunk_size, Mamba3States* fs) {
  const Mamba3Dims d = mamba3_scan_check(a_in, "mamba3_scan_fwd");
  const Mamba3ScanArgs a = contiguous_args(a_in);
  MAMBA_CHECK(chunk_size >= 1, "mamba3_scan_fwd: chunk_size must be >= 1, got ", chunk_size);
  const int64_t B = d.batch, L = d.L, H = d.H, P = d.P, N = d.N, R = d.R, S = d.S;
  MAMBA_CHECK(L >= 1, "mamba3_scan_fwd: needs L >= 1, got Q ", a.Q.shape_str());
  Tensor out = Tensor::empty({B, L, H, P});
  if (fs) {
    // Every (b, h) writes its whole slice of each state, after reading its slice of the initial
    // state: final_states may be the initial states' own tensors (decode updates in place).
    auto fit = [](Tensor& t, Shape s) {
      if (!t.defined() || t.shape() != s || !t.is_contiguous()) t = Tensor::empty(std::move(s));
    };
    fit(fs->angle, {B, H, S});
    fit(fs->ssm, {B, H, P, N});
    fit(fs->k, {B, R, H, N});
    fit(fs->v, {B, H, P});
  }
  float* op = out.data();
  const int64_t work = std::max<int64_t>(1, L * R * (N + P) * std::min(chunk_size, L));
  parallel_for(B * H, std::max<int64_t>(1, (1 << 16) / work), [&](int64_t i0, int64_t i1) {
    ChunkScratch w;
    for (int64_t i = i0; i < i1; ++i) chunked_one(a, d, i / H, i % H, chunk_size, w, op, fs);
  });
  return out;
}

// ---- chunked backward (fp32) -------------------------------------------------------------------
//
// Per chunk of tokens t0..t0+n-1 (rows i = (t, r), as the forward's), with E_ts = exp(cum_t -
// cum_s), u_t = (1 - sigma_t) DT_t, c the forward's coefficients and S_eff the state entering
// the chunk after its first token's beta term:
//   Y     = diag(exp(cum)) Q S_eff^T + D V + (c o Q K^T) V
//   S_end = exp(cum_e) S_eff + V^T diag(c_e,.) K,     S_eff = S_in + u_t0 sum_r v_{t0-1,r}
//   k_{t0-1,r}^T
// Given dY and dS_end (the gradient carried back from the next chunk; zero after the last), the
// GEMMs: dM = dY V^T, dV += (c o QK^T)^T dY, dQ += (c o dM) K, dK += (c o dM)^T Q (the masked
// products), dQ += diag(exp(cum)) dY S_eff, dK += diag(c_e,.) V dS_end, dV += diag(c_e,.) K
// dS_end^T, dS_eff = exp(cum_e) dS_end + dY^T diag(exp(cum)) Q; the coefficients' gradients dc_ts =
// sum_{r, r'} dM o QK^T (+ the S_end term's row) go to cum (then ADT by suffix sums), gamma and u;
// the S_eff term gives the previous token's k, v and u_t0. dS_in = dS_eff.

namespace {

struct ChunkBwdWork {
  ChunkScratch f;                       // the recomputed forward (keep = true)
  std::vector<float> dY, dq, dk, dv;    // (L, R, P), (L, R, N) x2, (L, R, P)
  std::vector<float> dgam, du, dadt;    // (L): gradients of gamma_t, u_t, ADT_t
  std::vector<float> dS, dSn;           // (P, N): of the state leaving / entering the chunk
  std::vector<float> A, dM, dcc, dcum;  // (T R, T R) x2, (T, T), (T)
  std::vector<float> tN, tP, qe;        // (T R, N), (T R, P), (T R, N) scratch
  std::vector<double> dth, suf, cs, sn;
};

void chunked_bwd_one(const Acc& c, int64_t CS, const float* go, ChunkBwdWork& w,
                     ItemGrads<float>& it, OwnGrads<float> own) {
  const Mamba3ScanArgs& a = c.a;
  const Mamba3Dims& d = c.d;
  const int64_t L = d.L, R = d.R, N = d.N, P = d.P, S = d.S, b = c.b, h = c.h;
  it.reset(L, R, N, P, S);
  if (L == 0) return;
  ChunkScratch& f = w.f;
  chunked_one(a, d, b, h, CS, f, nullptr, nullptr, true);
  const int64_t T = std::min(CS, L), TR = T * R;
  w.dY.resize(L * R * P), w.dq.assign(L * R * N, 0.f), w.dk.assign(L * R * N, 0.f);
  w.dv.assign(L * R * P, 0.f);
  w.dgam.assign(L, 0.f), w.du.assign(L, 0.f), w.dadt.assign(L, 0.f);
  w.dS.assign(P * N, 0.f), w.dSn.resize(P * N);
  w.A.resize(TR * TR), w.dM.resize(TR * TR), w.dcc.resize(T * T), w.dcum.resize(T);
  w.tN.resize(TR * N), w.tP.resize(TR * P), w.qe.resize(TR * N);
  f.E.resize(T * T);
  for (int64_t t = 0; t < L; ++t) {
    const int64_t i = c.bl(t);
    finish_token_bwd(a, d, h, i, &f.Y[t * R * P], go + i * P, &w.dY[t * R * P], it, own);
  }
  const bool hasD = a.D.defined();
  const float Dh = hasD ? a.D[h] : 0.f;
  double dD = 0;
  float *A = w.A.data(), *dM = w.dM.data(), *dcc = w.dcc.data(), *dcum = w.dcum.data();
  float *tN = w.tN.data(), *tP = w.tP.data(), *qe = w.qe.data();
  const int64_t nch = (L + T - 1) / T;
  for (int64_t ci = nch - 1; ci >= 0; --ci) {
    const int64_t t0 = ci * T, n = std::min(T, L - t0), nr = n * R, e = n - 1;
    double acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += f.adt[t0 + j], f.cum[j] = static_cast<float>(acc);
    chunk_coeffs(f, t0, n, T, f.E.data());
    const float *qc = &f.q[t0 * R * N], *kc = &f.k[t0 * R * N], *vc = &f.v[t0 * R * P];
    const float *Se = &f.Seff[ci * P * N], *dy = &w.dY[t0 * R * P];
    float *dqc = &w.dq[t0 * R * N], *dkc = &w.dk[t0 * R * N], *dvc = &w.dv[t0 * R * P];
    float *dS = w.dS.data(), *dSn = w.dSn.data();
    std::fill(dcum, dcum + n, 0.f);
    std::fill(dcc, dcc + n * T, 0.f);
    // The masked intra-chunk products: A = Q K^T, dM = dY V^T; dc_ts += sum dM o A; then
    // A <- c o A (the forward's scores), dM <- c o dM (the gradient of Q K^T).
    gemm(false, true, nr, nr, N, 1.f, qc, N, kc, N, 0.f, A, TR);
    gemm(false, true, nr, nr, P, 1.f, dy, P, vc, P, 0.f, dM, TR);
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t ti = i / R, jn = (ti + 1) * R;
      const float* ct = &f.c[ti * T];
      float *Ai = A + i * TR, *dMi = dM + i * TR, *dci = dcc + ti * T;
      for (int64_t j = 0; j < jn; ++j) {
        dci[j / R] += dMi[j] * Ai[j];
        Ai[j] *= ct[j / R], dMi[j] *= ct[j / R];
      }
      std::fill(Ai + jn, Ai + nr, 0.f);
      std::fill(dMi + jn, dMi + nr, 0.f);
    }
    gemm(true, false, nr, P, nr, 1.f, A, TR, dy, P, 1.f, dvc, P);
    gemm(false, false, nr, N, nr, 1.f, dM, TR, kc, N, 1.f, dqc, N);
    gemm(true, false, nr, N, nr, 1.f, dM, TR, qc, N, 1.f, dkc, N);
    // y += exp(cum_t) q S_eff^T: dQ += exp(cum) dY S_eff, dcum_t += exp(cum_t) (dY S_eff) . q
    gemm(false, false, nr, N, P, 1.f, dy, P, Se, N, 0.f, tN, N);
    for (int64_t i = 0; i < nr; ++i) {
      const float et = std::exp(f.cum[i / R]);
      const float *ti = tN + i * N, *qi = qc + i * N;
      float *dqi = dqc + i * N, *qei = qe + i * N;
      double s = 0;
      for (int64_t k = 0; k < N; ++k) {
        s += double(ti[k]) * qi[k];
        dqi[k] += et * ti[k];
        qei[k] = et * qi[k];
      }
      dcum[i / R] += static_cast<float>(et * s);
    }
    if (hasD)
      for (int64_t j = 0; j < nr * P; ++j) dD += double(dy[j]) * vc[j], dvc[j] += Dh * dy[j];
    // S_end = exp(cum_e) S_eff + sum_j c_e,t(j) v_j k_j^T
    const float de = std::exp(f.cum[e]);
    {
      double s = 0;
      for (int64_t k = 0; k < P * N; ++k) s += double(dS[k]) * Se[k];
      dcum[e] += static_cast<float>(de * s);
    }
    gemm(false, false, nr, N, P, 1.f, vc, P, dS, N, 0.f, tN, N);  // V dS_end
    gemm(false, true, nr, P, N, 1.f, kc, N, dS, N, 0.f, tP, P);   // K dS_end^T
    for (int64_t j = 0; j < nr; ++j) {
      const float cj = f.c[e * T + j / R];
      const float *tj = tN + j * N, *kj = kc + j * N;
      float* dkj = dkc + j * N;
      double s = 0;
      for (int64_t k = 0; k < N; ++k) s += double(tj[k]) * kj[k], dkj[k] += cj * tj[k];
      dcc[e * T + j / R] += static_cast<float>(s);
      for (int64_t p = 0; p < P; ++p) dvc[j * P + p] += cj * tP[j * P + p];
    }
    // dS_eff = exp(cum_e) dS_end + dY^T diag(exp(cum)) Q
    for (int64_t k = 0; k < P * N; ++k) dSn[k] = de * dS[k];
    gemm(true, false, P, N, nr, 1.f, dy, P, qe, N, 1.f, dSn, N);
    // c_ts = E_ts (gamma_s + u_{s+1}) below the diagonal, gamma_t on it
    for (int64_t t = 0; t < n; ++t) {
      const float *ct = &f.c[t * T], *Et = &f.E[t * T], *gt = dcc + t * T;
      for (int64_t s2 = 0; s2 < t; ++s2) {
        const float v = gt[s2] * ct[s2], df = gt[s2] * Et[s2];
        dcum[t] += v, dcum[s2] -= v;
        w.dgam[t0 + s2] += df, w.du[t0 + s2 + 1] += df;
      }
      w.dgam[t0 + t] += gt[t];
    }
    // cum_j = sum_{i <= j} ADT_{t0+i}: suffix sums
    float sfx = 0.f;
    for (int64_t k = n - 1; k >= 0; --k) sfx += dcum[k], w.dadt[t0 + k] = sfx;
    // S_eff = S_in + u_t0 sum_r v_{t0-1,r} k_{t0-1,r}^T (initial states are not differentiated:
    // for t0 = 0 the previous token is the zero initial state and u_0 gets nothing)
    if (t0 > 0) {
      const float u0 = (1.f - f.sig[t0]) * f.dt[t0];
      const float *kp = &f.k[(t0 - 1) * R * N], *vp = &f.v[(t0 - 1) * R * P];
      float *dkp = &w.dk[(t0 - 1) * R * N], *dvp = &w.dv[(t0 - 1) * R * P];
      gemm(false, false, R, N, P, 1.f, vp, P, dSn, N, 0.f, tN, N);  // v dS_eff (R, N)
      gemm(false, true, R, P, N, 1.f, kp, N, dSn, N, 0.f, tP, P);   // k dS_eff^T (R, P)
      double s = 0;
      for (int64_t k = 0; k < R * N; ++k) s += double(tN[k]) * kp[k], dkp[k] += u0 * tN[k];
      for (int64_t k = 0; k < R * P; ++k) dvp[k] += u0 * tP[k];
      w.du[t0] += static_cast<float>(s);
    }
    std::swap(w.dS, w.dSn);
  }
  if (hasD) it.dD[0] += static_cast<float>(dD);
  // gamma = sigma DT, u = (1 - sigma) DT, sigma = sigmoid(Trap)
  for (int64_t t = 0; t < L; ++t) {
    const int64_t i = c.bl(t);
    const float sg = f.sig[t], dt = f.dt[t];
    own.dADT[i] += w.dadt[t];
    own.dDT[i] += w.dgam[t] * sg + w.du[t] * (1.f - sg);
    own.dTrap[i] += (w.dgam[t] - w.du[t]) * dt * sg * (1.f - sg);
  }
  prep_bwd(c, f.th_all.data(), f.q.data(), f.k.data(), f.dt.data(), w.dq.data(), w.dk.data(),
           w.dv.data(), w.dth, w.suf, w.cs, w.sn, it, own);
}

}  // namespace

Mamba3ScanGrads mamba3_scan_bwd(const Mamba3ScanArgs& a_in, const Tensor& dout_in,
                                int64_t chunk_size) {
  const Mamba3Dims d = check_bwd(a_in, dout_in, "mamba3_scan_bwd");
  MAMBA_CHECK(chunk_size >= 1, "mamba3_scan_bwd: chunk_size must be >= 1, got ", chunk_size);
  const Mamba3ScanArgs a = contiguous_args(a_in);
  const Tensor dout = dout_in.contiguous();
  const int64_t items = d.batch * d.H;
  AllGrads<float> all(a, d);
  // Each (b, h) in parallel, writing only its own rows of V, Z, ADT, DT, Trap; its shared
  // contributions are kept and added in (b, h) order after the parallel region.
  std::vector<ItemGrads<float>> parts(static_cast<size_t>(items));
  parallel_for(items, 1, [&](int64_t i0, int64_t i1) {
    ChunkBwdWork w;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / d.H, h = i % d.H;
      chunked_bwd_one(Acc{a, d, b, h, h / (d.H / d.G)}, chunk_size, dout.data(), w, parts[i],
                      all.own());
    }
  });
  for (int64_t i = 0; i < items; ++i) all.add(d, i / d.H, i % d.H, parts[i]);
  return all.result(a, d);
}

// ---- decode step (fp32) ------------------------------------------------------------------------

namespace {

struct StepScratch {
  std::vector<double> theta;                  // (S)
  std::vector<float> cs, q, k, kp, v, cf, y;  // (2S), (R,N) x3, (R,P), (2,R,P), (R,P)
};

// One token of head h (batch b) from the initial states into the final ones (may be the same
// tensors: this (b, h)'s slices are read before they are written).
void step_one(const Mamba3ScanArgs& a, const Mamba3Dims& d, int64_t b, int64_t h, StepScratch& w,
              float* out, Mamba3States& fs) {
  const int64_t R = d.R, N = d.N, P = d.P, S = d.S, H = d.H, bh = b * H + h;
  const Mamba3States& in = a.initial;
  w.theta.resize(S), w.cs.resize(2 * S), w.q.resize(R * N), w.k.resize(R * N);
  w.kp.resize(R * N), w.v.resize(R * P), w.cf.resize(2 * R * P), w.y.resize(R * P);
  for (int64_t j = 0; j < S; ++j) w.theta[j] = in.angle.data()[bh * S + j];
  for (int64_t r = 0; r < R; ++r)
    std::copy_n(in.k.data() + ((b * R + r) * H + h) * N, N, &w.kp[r * N]);
  const int64_t i = b * H + h;  // row (b, t = 0, h) of the (B, 1, H) inputs
  const float dt = a.DT.data()[i], sg = static_cast<float>(sigmoid(a.Trap.data()[i]));
  const float al = std::exp(a.ADT.data()[i]);
  const float bet = (1.f - sg) * dt * al, gam = sg * dt;
  const float* v0 = in.v.data() + bh * P;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t p = 0; p < P; ++p)
      w.cf[r * P + p] = bet * v0[p] * (d.mimo ? a.mimo_x.data()[(h * R + r) * P + p] : 1.f);
  prep_token(a, d, b, 0, h, w.theta.data(), w.cs.data(), w.q.data(), w.k.data(), w.v.data());
  for (int64_t j = 0; j < R * P; ++j) w.cf[R * P + j] = gam * w.v[j];
  HWY_DYNAMIC_DISPATCH(StateStepKernel)
  (in.ssm.data() + bh * P * N, fs.ssm.data() + bh * P * N, P, N, R, al, w.kp.data(), w.cf.data(),
   w.k.data(), w.cf.data() + R * P, w.q.data(), w.y.data());
  if (a.D.defined())
    for (int64_t j = 0; j < R * P; ++j) w.y[j] += a.D.data()[h] * w.v[j];
  finish_token(a, d, h, i, w.y.data(), out + i * P);
  const double two_pi = 2 * kPi;
  for (int64_t j = 0; j < S; ++j)
    fs.angle.data()[bh * S + j] =
        static_cast<float>(w.theta[j] - two_pi * std::floor(w.theta[j] / two_pi));
  for (int64_t r = 0; r < R; ++r)
    std::copy_n(&w.k[r * N], N, fs.k.data() + ((b * R + r) * H + h) * N);
  std::copy_n(a.V.data() + i * P, P, fs.v.data() + bh * P);
}

}  // namespace

Tensor mamba3_scan_step(const Mamba3ScanArgs& a_in, Mamba3States& fs) {
  const Mamba3Dims d = mamba3_scan_check(a_in, "mamba3_scan_step");
  const int64_t B = d.batch, H = d.H, P = d.P, N = d.N, R = d.R, S = d.S;
  MAMBA_CHECK(d.L == 1, "mamba3_scan_step: one token (L = 1), got Q ", a_in.Q.shape_str());
  MAMBA_CHECK(a_in.initial.ssm.defined(),
              "mamba3_scan_step: needs the initial states (angle, ssm, k, v)");
  const Mamba3ScanArgs a = contiguous_args(a_in);
  auto fit = [](Tensor& t, Shape s) {
    if (!t.defined() || t.shape() != s || !t.is_contiguous()) t = Tensor::empty(std::move(s));
  };
  fit(fs.angle, {B, H, S});
  fit(fs.ssm, {B, H, P, N});
  fit(fs.k, {B, R, H, N});
  fit(fs.v, {B, H, P});
  Tensor out = Tensor::empty({B, 1, H, P});
  float* op = out.data();
  parallel_for(B * H, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, R * P * N)),
               [&](int64_t i0, int64_t i1) {
                 StepScratch w;
                 for (int64_t i = i0; i < i1; ++i) step_one(a, d, i / H, i % H, w, op, fs);
               });
  return out;
}

// ---- discretisation
// ------------------------------------------------------------------------------

namespace {
double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
// mamba_ssm's heavy_tail_activation (the data-dependent A at e9594ce): 1 + x for x >= 0,
// 1 / (1 - x) below; positive, continuous and differentiable at 0.
double heavy_tail(double x) { return x >= 0 ? 1.0 + x : 1.0 / (1.0 - x); }
double heavy_tail_grad(double x) { return x >= 0 ? 1.0 : 1.0 / ((1.0 - x) * (1.0 - x)); }
void check_disc(const char* what, const Tensor& dd_dt, const Tensor& dd_A, const Tensor& dt_bias) {
  check_defined(dd_dt, str(what, ": dd_dt").c_str());
  check_defined(dd_A, str(what, ": dd_A").c_str());
  check_defined(dt_bias, str(what, ": dt_bias").c_str());
  MAMBA_CHECK(dd_dt.ndim() == 2, what, ": dd_dt must be (M, H), got ", dd_dt.shape_str());
  check_shape(dd_A, str(what, ": dd_A").c_str(), dd_dt.shape());
  check_shape(dt_bias, str(what, ": dt_bias").c_str(), {dd_dt.dim(1)});
}
}  // namespace

void mamba3_discretize_fwd(const Tensor& dd_dt_v, const Tensor& dd_A_v, const Tensor& dt_bias,
                           double A_floor, Tensor& DT, Tensor& ADT) {
  check_disc("mamba3_discretize_fwd", dd_dt_v, dd_A_v, dt_bias);
  const Tensor dd_dt = dd_dt_v.contiguous(), dd_A = dd_A_v.contiguous();
  const int64_t M = dd_dt.dim(0), H = dd_dt.dim(1);
  DT = Tensor::empty({M, H});
  ADT = Tensor::empty({M, H});
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t i = m * H + h;
      // fp32 sums as the module's (dd_dt + dt_bias in fp32, then softplus)
      const double dt = softplus(static_cast<float>(dd_dt[i] + dt_bias[h]));
      const double A = std::min(-heavy_tail(dd_A[i]), -A_floor);
      DT[i] = static_cast<float>(dt);
      ADT[i] = static_cast<float>(static_cast<float>(A) * static_cast<float>(dt));
    }
}

void mamba3_discretize_bwd(const Tensor& dd_dt_v, const Tensor& dd_A_v, const Tensor& dt_bias,
                           double A_floor, const Tensor& dDT, const Tensor& dADT,
                           const Tensor& d_dd_dt, const Tensor& d_dd_A, const Tensor& d_dt_bias) {
  const char* w = "mamba3_discretize_bwd";
  check_disc(w, dd_dt_v, dd_A_v, dt_bias);
  const Tensor dd_dt = dd_dt_v.contiguous(), dd_A = dd_A_v.contiguous();
  const int64_t M = dd_dt.dim(0), H = dd_dt.dim(1);
  check_shape(dDT, str(w, ": dDT").c_str(), {M, H});
  check_shape(dADT, str(w, ": dADT").c_str(), {M, H});
  check_shape(d_dd_dt, str(w, ": d_dd_dt").c_str(), {M, H});
  check_shape(d_dd_A, str(w, ": d_dd_A").c_str(), {M, H});
  check_shape(d_dt_bias, str(w, ": d_dt_bias").c_str(), {H});
  Tensor gdt = Tensor::empty({M, H}), gA = Tensor::empty({M, H});
  std::vector<double> db(H, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t i = m * H + h;
      const double pre = static_cast<float>(dd_dt[i] + dt_bias[h]);
      const double dt = softplus(pre), f = heavy_tail(dd_A[i]);
      const bool clamped = -f > -A_floor;
      const double A = clamped ? -A_floor : -f;
      const double ddt = dDT[i] + dADT[i] * A;
      const double g = ddt * (pre > 20.0 ? 1.0 : sigmoid(pre));
      gdt[i] = static_cast<float>(g);
      db[h] += g;
      gA[i] = clamped ? 0.f : static_cast<float>(-dADT[i] * dt * heavy_tail_grad(dd_A[i]));
    }
  Tensor(d_dd_dt).copy_from(gdt);
  Tensor(d_dd_A).copy_from(gA);
  Tensor dbt = Tensor(d_dt_bias);
  for (int64_t h = 0; h < H; ++h) dbt[h] += static_cast<float>(db[h]);
}

}  // namespace mamba::ops
#endif  // HWY_ONCE
