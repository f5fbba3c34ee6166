// Selective scan (Mamba-1): argument checks, the naive reference forward and backward (plain
// loops, double accumulation: the readable spec and the test oracle) and the single-token
// step selective_state_update. The fast Highway kernels are in selective_scan.cpp.
#include <cmath>
#include <vector>

#include "ops/act.h"
#include "ops/selective_scan.h"

namespace mamba::ops {

namespace {

// B or C of any kind, seen as "the N values channel d uses at (b, t)".
struct BCView {
  const float* p = nullptr;
  ScanBCKind kind = ScanBCKind::Const;
  int64_t L = 0, D = 0, N = 0, G = 1;
  int64_t offset(int64_t b, int64_t t, int64_t d) const {
    switch (kind) {
      case ScanBCKind::Const:
        return d * N;
      case ScanBCKind::Var:
        return (b * L + t) * N;
      default:
        return ((b * L + t) * G + d / (D / G)) * N;
    }
  }
  const float* at(int64_t b, int64_t t, int64_t d) const { return p + offset(b, t, d); }
};

BCView bc_view(const Tensor& t, ScanBCKind kind, int64_t G, const ScanDims& s) {
  return BCView{t.data(), kind, s.L, s.D, s.N, G};
}

void check_bc(const Tensor& t, const char* name, const char* what, const ScanDims& s,
              ScanBCKind* kind, int64_t* G) {
  check_defined(t, str(what, ": ", name).c_str());
  std::string nm = str(what, ": ", name);
  if (t.ndim() == 2) {
    *kind = ScanBCKind::Const, *G = 1;
    check_shape(t, nm.c_str(), {s.D, s.N});
  } else if (t.ndim() == 3) {
    *kind = ScanBCKind::Var, *G = 1;
    check_shape(t, nm.c_str(), {s.batch, s.L, s.N});
  } else if (t.ndim() == 4) {
    *kind = ScanBCKind::Group;
    *G = t.dim(2);
    check_shape(t, nm.c_str(), {s.batch, s.L, -1, s.N});
    MAMBA_CHECK(*G >= 1 && s.D % *G == 0, nm, ": groups G=", *G, " must divide D=", s.D, " (shape ",
                t.shape_str(), ")");
  } else {
    throw Error(str(nm, ": expected (D, N)=(", s.D, ",", s.N,
                    "), (B, L, N) or (B, L, G, N), got rank ", t.ndim(), " shape ", t.shape_str()));
  }
}

double softplus_d(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
double softplus_grad_d(double x) { return x > 20.0 ? 1.0 : 1.0 / (1.0 + std::exp(-x)); }
double sigmoid_d(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// dt for (b, t, d): delta + bias, then softplus if asked; also d dt / d delta.
void ref_dt(const ScanArgs& a, int64_t idx, int64_t d, double* dt, double* ddt_ddelta) {
  double v = a.delta[idx];
  // The reference adds the bias in fp32 before softplus; so do we (it matters only by rounding).
  if (a.delta_bias.defined()) v = static_cast<float>(a.delta[idx] + a.delta_bias[d]);
  if (a.delta_softplus) {
    *dt = softplus_d(v);
    *ddt_ddelta = softplus_grad_d(v);
  } else {
    *dt = v;
    *ddt_ddelta = 1.0;
  }
}

// The shared double forward: writes out (B*L*D) and last (B*D*N).
void ref_forward(const ScanArgs& a, const ScanDims& s, std::vector<double>& out,
                 std::vector<double>* last) {
  const int64_t batch = s.batch, L = s.L, D = s.D, N = s.N;
  BCView Bv = bc_view(a.B, s.b_kind, s.b_groups, s), Cv = bc_view(a.C, s.c_kind, s.c_groups, s);
  out.assign(batch * L * D, 0.0);
  if (last) last->assign(batch * D * N, 0.0);
  std::vector<double> h(N);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t n = 0; n < N; ++n)
        h[n] = a.initial_state.defined() ? a.initial_state[(b * D + d) * N + n] : 0.0;
      for (int64_t step = 0; step < L; ++step) {
        const int64_t t = a.reverse ? L - 1 - step : step;  // the time of this step
        const int64_t idx = (b * L + t) * D + d;
        double dt, unused;
        ref_dt(a, idx, d, &dt, &unused);
        const double u = a.u[idx];
        const float* Bp = Bv.at(b, t, d);
        const float* Cp = Cv.at(b, t, d);
        double y = 0;
        for (int64_t n = 0; n < N; ++n) {
          h[n] = std::exp(dt * a.A[d * N + n]) * h[n] + dt * Bp[n] * u;
          y += h[n] * Cp[n];
        }
        if (a.D.defined()) y += u * a.D[d];
        if (a.z.defined()) {
          const double z = a.z[idx];
          y *= z * sigmoid_d(z);
        }
        out[idx] = y;
      }
      if (last)
        for (int64_t n = 0; n < N; ++n) (*last)[(b * D + d) * N + n] = h[n];
    }
}

Tensor to_tensor(const std::vector<double>& v, Shape shape) {
  Tensor t = Tensor::empty(std::move(shape));
  for (int64_t i = 0; i < t.numel(); ++i) t[i] = static_cast<float>(v[i]);
  return t;
}

}  // namespace

ScanDims selective_scan_check(const ScanArgs& a, const char* what) {
  ScanDims s;
  std::string w = what;
  check_defined(a.u, (w + ": u").c_str());
  MAMBA_CHECK(a.u.ndim() == 3, w, ": u: expected (B, L, D), got shape ", a.u.shape_str());
  s.batch = a.u.dim(0), s.L = a.u.dim(1), s.D = a.u.dim(2);
  check_defined(a.A, (w + ": A").c_str());
  MAMBA_CHECK(a.A.ndim() == 2, w, ": A: expected (D, N)=(", s.D, ",N), got shape ",
              a.A.shape_str());
  s.N = a.A.dim(1);
  check_shape(a.A, (w + ": A").c_str(), {s.D, s.N});
  check_defined(a.delta, (w + ": delta").c_str());
  check_shape(a.delta, (w + ": delta").c_str(), {s.batch, s.L, s.D});
  check_bc(a.B, "B", what, s, &s.b_kind, &s.b_groups);
  check_bc(a.C, "C", what, s, &s.c_kind, &s.c_groups);
  if (a.D.defined()) check_shape(a.D, (w + ": D").c_str(), {s.D});
  if (a.delta_bias.defined()) check_shape(a.delta_bias, (w + ": delta_bias").c_str(), {s.D});
  if (a.z.defined()) check_shape(a.z, (w + ": z").c_str(), {s.batch, s.L, s.D});
  if (a.initial_state.defined())
    check_shape(a.initial_state, (w + ": initial_state").c_str(), {s.batch, s.D, s.N});
  return s;
}

std::vector<double> selective_scan_ref_f64(const ScanArgs& a, std::vector<double>* last_state) {
  ScanDims s = selective_scan_check(a, "selective_scan_ref");
  std::vector<double> out;
  ref_forward(a, s, out, last_state);
  return out;
}

// u, delta: (B, L, D) -> out (B, L, D); last_state (B, D, N)
Tensor selective_scan_ref(const ScanArgs& a, Tensor* last_state) {
  ScanDims s = selective_scan_check(a, "selective_scan_ref");
  std::vector<double> out, last;
  ref_forward(a, s, out, last_state ? &last : nullptr);
  if (last_state) *last_state = to_tensor(last, {s.batch, s.D, s.N});
  return to_tensor(out, {s.batch, s.L, s.D});
}

// Gradients of sum(out * dout). Per (b, d): recompute and keep every state h_t, then run
// the recurrence backwards:
//   g_t = dy_t * C_t + exp(dt_{t+1} A) * g_{t+1}          (dL/dh_t)
//   dC_t += dy_t h_t;  dB_t += g_t dt_t u_t;  du_t += sum_n g_t dt_t B_t + dy_t D
//   d dt_t = sum_n g_t (A h_{t-1} exp(dt_t A) + B_t u_t);  dA += g_t h_{t-1} exp(dt_t A) dt_t
//   dinitial_state = exp(dt_0 A) g_0
ScanGrads selective_scan_bwd_ref(const ScanArgs& a, const Tensor& dout) {
  ScanDims s = selective_scan_check(a, "selective_scan_bwd_ref");
  const int64_t batch = s.batch, L = s.L, D = s.D, N = s.N;
  check_shape(dout, "selective_scan_bwd_ref: dout", {batch, L, D});
  BCView Bv = bc_view(a.B, s.b_kind, s.b_groups, s), Cv = bc_view(a.C, s.c_kind, s.c_groups, s);

  std::vector<double> du(batch * L * D, 0), ddelta(batch * L * D, 0),
      dz(a.z.defined() ? batch * L * D : 0, 0);
  std::vector<double> dA(D * N, 0), dB(a.B.numel(), 0), dC(a.C.numel(), 0), dD(D, 0), dbias(D, 0);
  std::vector<double> dinit(a.initial_state.defined() ? batch * D * N : 0, 0);
  std::vector<double> H((L + 1) * N), dts(L), dsp(L), dys(L), g(N);
  auto mt = [&](int64_t step) { return a.reverse ? L - 1 - step : step; };  // memory time

  for (int64_t b = 0; b < batch; ++b)
    for (int64_t d = 0; d < D; ++d) {
      // Forward, keeping h_t in H[(t+1)*N ...], h_{-1} = initial state in H[0 ...].
      for (int64_t n = 0; n < N; ++n)
        H[n] = a.initial_state.defined() ? a.initial_state[(b * D + d) * N + n] : 0.0;
      // H, dts, dsp, dys are indexed by step (reverse: step j is time L-1-j).
      for (int64_t t = 0; t < L; ++t) {
        const int64_t idx = (b * L + mt(t)) * D + d;
        ref_dt(a, idx, d, &dts[t], &dsp[t]);
        const double u = a.u[idx];
        const float* Bp = Bv.at(b, mt(t), d);
        const float* Cp = Cv.at(b, mt(t), d);
        double y = 0;
        for (int64_t n = 0; n < N; ++n) {
          double hn = std::exp(dts[t] * a.A[d * N + n]) * H[t * N + n] + dts[t] * Bp[n] * u;
          H[(t + 1) * N + n] = hn;
          y += hn * Cp[n];
        }
        if (a.D.defined()) y += u * a.D[d];
        double dy = dout[idx];
        if (a.z.defined()) {
          const double z = a.z[idx], sg = sigmoid_d(z);
          dz[idx] = dy * y * sg * (1.0 + z * (1.0 - sg));
          dy *= z * sg;
        }
        dys[t] = dy;
        if (a.D.defined()) {
          dD[d] += dy * u;
          du[idx] += dy * a.D[d];
        }
      }
      // Backward.
      std::fill(g.begin(), g.end(), 0.0);  // carry: exp(dt_{t+1} A) g_{t+1}
      for (int64_t t = L - 1; t >= 0; --t) {
        const int64_t idx = (b * L + mt(t)) * D + d;
        const double u = a.u[idx], dt = dts[t], dy = dys[t];
        const int64_t bo = Bv.offset(b, mt(t), d), co = Cv.offset(b, mt(t), d);
        double ddt = 0, dus = 0;
        for (int64_t n = 0; n < N; ++n) {
          const double An = a.A[d * N + n], e = std::exp(dt * An);
          const double gn = dy * a.C[co + n] + g[n];
          const double hprev = H[t * N + n];
          dC[co + n] += dy * H[(t + 1) * N + n];
          dB[bo + n] += gn * dt * u;
          dus += gn * dt * a.B[bo + n];
          ddt += gn * (An * hprev * e + a.B[bo + n] * u);
          dA[d * N + n] += gn * hprev * e * dt;
          g[n] = e * gn;
        }
        du[idx] += dus;
        ddelta[idx] = ddt * dsp[t];
        dbias[d] += ddt * dsp[t];
      }
      if (a.initial_state.defined())
        for (int64_t n = 0; n < N; ++n) dinit[(b * D + d) * N + n] = g[n];
    }

  ScanGrads r;
  r.du = to_tensor(du, a.u.shape());
  r.ddelta = to_tensor(ddelta, a.delta.shape());
  r.dA = to_tensor(dA, a.A.shape());
  r.dB = to_tensor(dB, a.B.shape());
  r.dC = to_tensor(dC, a.C.shape());
  if (a.D.defined()) r.dD = to_tensor(dD, a.D.shape());
  if (a.z.defined()) r.dz = to_tensor(dz, a.z.shape());
  if (a.delta_bias.defined()) r.ddelta_bias = to_tensor(dbias, a.delta_bias.shape());
  if (a.initial_state.defined()) r.dinitial_state = to_tensor(dinit, a.initial_state.shape());
  return r;
}

// Checks of a decode step's arguments. state: (B, D, N); x, dt, z: (B, D); A: (D, N);
// B, C: (B, N) or (B, G, N); D, dt_bias: (D).
StepDims selective_state_update_check(const Tensor& state, const Tensor& x, const Tensor& dt,
                                      const Tensor& A, const Tensor& B, const Tensor& C,
                                      const Tensor& D, const Tensor& z, const Tensor& dt_bias) {
  const char* w = "selective_state_update";
  StepDims s;
  check_defined(x, "selective_state_update: x");
  MAMBA_CHECK(x.ndim() == 2, w, ": x: expected (B, D), got shape ", x.shape_str());
  s.batch = x.dim(0), s.D = x.dim(1);
  check_defined(A, "selective_state_update: A");
  MAMBA_CHECK(A.ndim() == 2, w, ": A: expected (D, N), got shape ", A.shape_str());
  s.N = A.dim(1);
  check_shape(A, "selective_state_update: A", {s.D, s.N});
  check_shape(state, "selective_state_update: state", {s.batch, s.D, s.N});
  check_shape(dt, "selective_state_update: dt", {s.batch, s.D});
  auto check_bc_step = [&](const Tensor& t, const char* name, int64_t* G) {
    std::string nm = str(w, ": ", name);
    check_defined(t, nm.c_str());
    if (t.ndim() == 2) {
      check_shape(t, nm.c_str(), {s.batch, s.N});
    } else {
      MAMBA_CHECK(t.ndim() == 3, nm, ": expected (B, N)=(", s.batch, ",", s.N,
                  ") or (B, G, N), got shape ", t.shape_str());
      check_shape(t, nm.c_str(), {s.batch, -1, s.N});
      *G = t.dim(1);
      MAMBA_CHECK(*G >= 1 && s.D % *G == 0, nm, ": groups G=", *G, " must divide D=", s.D);
    }
  };
  check_bc_step(B, "B", &s.b_groups);
  check_bc_step(C, "C", &s.c_groups);
  if (D.defined()) check_shape(D, "selective_state_update: D", {s.D});
  if (z.defined()) check_shape(z, "selective_state_update: z", {s.batch, s.D});
  if (dt_bias.defined()) check_shape(dt_bias, "selective_state_update: dt_bias", {s.D});
  return s;
}

// One decode step, plain loops. state: (B, D, N) in place; returns y: (B, D).
Tensor selective_state_update_ref(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                                  const Tensor& B, const Tensor& C, const Tensor& D,
                                  const Tensor& z, const Tensor& dt_bias, bool dt_softplus) {
  const StepDims s = selective_state_update_check(state, x, dt, A, B, C, D, z, dt_bias);
  const int64_t N = s.N, Dd = s.D, GB = s.b_groups, GC = s.c_groups;
  Tensor y = Tensor::empty({s.batch, Dd});
  float* st = state.data();
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t d = 0; d < Dd; ++d) {
      const int64_t i = b * Dd + d;
      float v = dt[i];
      if (dt_bias.defined()) v += dt_bias[d];
      if (dt_softplus) v = v > 20.f ? v : std::log1p(std::exp(v));
      const float xv = x[i];
      const float* Bp = B.data() + (b * GB + d / (Dd / GB)) * N;
      const float* Cp = C.data() + (b * GC + d / (Dd / GC)) * N;
      float* h = st + i * N;
      double acc = 0;
      for (int64_t n = 0; n < N; ++n) {
        h[n] = std::exp(v * A[d * N + n]) * h[n] + v * Bp[n] * xv;
        acc += static_cast<double>(h[n]) * Cp[n];
      }
      if (D.defined()) acc += static_cast<double>(xv) * D[d];
      if (z.defined()) acc *= static_cast<double>(silu_ref(z[i]));
      y[i] = static_cast<float>(acc);
    }
  return y;
}

}  // namespace mamba::ops
