// The Mamba-1 mixer layer: forward (with saved activations and prefill state), backward, step.
// Semantics of mamba_ssm.modules.mamba_simple.Mamba (slow path and step()); channel-last.
#include "mamba/nn/mamba1.h"

#include <algorithm>
#include <cmath>

#include "mamba/gemm.h"
#include "mamba/ops/act.h"
#include "mamba/ops/conv1d.h"
#include "mamba/ops/linear.h"
#include "mamba/ops/selective_scan.h"
#include "mamba/rng.h"
#include "mamba/trace.h"

namespace mamba {

// ---- config -------------------------------------------------------------------------------------

void Mamba1Config::validate() const {
  MAMBA_CHECK(d_model >= 1, "Mamba1Config: d_model must be >= 1, got ", d_model);
  MAMBA_CHECK(d_state >= 1, "Mamba1Config: d_state must be >= 1, got ", d_state);
  MAMBA_CHECK(d_conv >= 1, "Mamba1Config: d_conv must be >= 1, got ", d_conv);
  MAMBA_CHECK(std::isfinite(expand) && expand > 0, "Mamba1Config: expand must be > 0, got ", expand);
  MAMBA_CHECK(d_inner() >= 1, "Mamba1Config: expand * d_model must be >= 1 (d_inner), got expand ",
              expand, " * d_model ", d_model);
  MAMBA_CHECK(dt_rank == -1 || dt_rank >= 1,
              "Mamba1Config: dt_rank must be >= 1 or -1 (\"auto\"), got ", dt_rank);
  MAMBA_CHECK(std::isfinite(dt_min) && dt_min > 0, "Mamba1Config: dt_min must be > 0, got ", dt_min);
  MAMBA_CHECK(std::isfinite(dt_max) && dt_max >= dt_min,
              "Mamba1Config: dt_max must be >= dt_min (", dt_min, "), got ", dt_max);
  MAMBA_CHECK(dt_init == "random" || dt_init == "constant",
              "Mamba1Config: dt_init must be \"random\" or \"constant\", got \"", dt_init, "\"");
  MAMBA_CHECK(std::isfinite(dt_scale), "Mamba1Config: dt_scale must be finite, got ", dt_scale);
  MAMBA_CHECK(std::isfinite(dt_init_floor) && dt_init_floor >= 0,
              "Mamba1Config: dt_init_floor must be >= 0, got ", dt_init_floor);
}

// Python's int(expand * d_model) truncates.
int64_t Mamba1Config::d_inner() const { return static_cast<int64_t>(expand * static_cast<double>(d_model)); }

int64_t Mamba1Config::rank() const { return dt_rank == -1 ? (d_model + 15) / 16 : dt_rank; }

// ---- construction -------------------------------------------------------------------------------

Mamba1::Mamba1(const Mamba1Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  D_ = cfg_.d_inner();
  N_ = cfg_.d_state;
  K_ = cfg_.d_conv;
  R_ = cfg_.rank();
  const int64_t dm = cfg_.d_model;
  // Declared in mamba_ssm's state_dict order.
  A_log_ = params_.add("A_log", {D_, N_}, true);
  Dp_ = params_.add("D", {D_}, true);
  in_w_ = params_.add("in_proj.weight", {2 * D_, dm});
  if (cfg_.bias) in_b_ = params_.add("in_proj.bias", {2 * D_}, true);
  conv_w_ = params_.add("conv1d.weight", {D_, 1, K_});
  if (cfg_.conv_bias) conv_b_ = params_.add("conv1d.bias", {D_}, true);
  if (cfg_.selective) {
    xproj_w_ = params_.add("x_proj.weight", {R_ + 2 * N_, D_});
    dt_w_ = params_.add("dt_proj.weight", {D_, R_});
  } else {
    B_ssm_ = params_.add("B_ssm", {D_, N_}, true);
    C_ssm_ = params_.add("C_ssm", {D_, N_}, true);
  }
  dt_b_ = params_.add("dt_proj.bias", {D_}, true);
  out_w_ = params_.add("out_proj.weight", {dm, D_});
  if (cfg_.bias) out_b_ = params_.add("out_proj.bias", {dm}, true);

  // mamba_ssm's init: nn.Linear / nn.Conv1d defaults are uniform(+-1/sqrt(fan_in)) for weight
  // and bias (the depthwise conv's fan_in is K); dt_proj is re-initialised, A is S4D-real, D = 1.
  Rng rng(seed);
  auto uni = [&](Tensor& t, double fan_in) {
    const double b = 1.0 / std::sqrt(fan_in);
    rng.fill_uniform(t, -b, b);
  };
  uni(in_w_, static_cast<double>(dm));
  if (in_b_.defined()) uni(in_b_, static_cast<double>(dm));
  uni(conv_w_, static_cast<double>(K_));
  if (conv_b_.defined()) uni(conv_b_, static_cast<double>(K_));
  if (cfg_.selective) {
    uni(xproj_w_, static_cast<double>(D_));
    const double dt_std = std::pow(static_cast<double>(R_), -0.5) * cfg_.dt_scale;
    if (cfg_.dt_init == "constant")
      dt_w_.fill(static_cast<float>(dt_std));
    else
      rng.fill_uniform(dt_w_, -dt_std, dt_std);
  }
  // dt ~ exp(U(log dt_min, log dt_max)) clamped below at dt_init_floor; bias = softplus^-1(dt).
  const double lmin = std::log(cfg_.dt_min), lmax = std::log(cfg_.dt_max);
  for (int64_t d = 0; d < D_; ++d) {
    const double dt = std::max(std::exp(rng.uniform() * (lmax - lmin) + lmin), cfg_.dt_init_floor);
    dt_b_[d] = static_cast<float>(dt + std::log(-std::expm1(-dt)));
  }
  for (int64_t d = 0; d < D_; ++d)
    for (int64_t n = 0; n < N_; ++n) A_log_[d * N_ + n] = static_cast<float>(std::log(double(n + 1)));
  Dp_.fill(1.f);
  uni(out_w_, static_cast<double>(D_));
  if (out_b_.defined()) uni(out_b_, static_cast<double>(D_));
  if (!cfg_.selective) {
    // The ablation's constant B and C, O(1) as S4D's (B = 1, C ~ N(0, 1)): uniform(-1, 1).
    rng.fill_uniform(B_ssm_, -1.0, 1.0);
    rng.fill_uniform(C_ssm_, -1.0, 1.0);
  }
}

Tensor Mamba1::A() const {
  Tensor a = A_log_.clone();
  float* p = a.data();
  ops::exp_inplace(p, a.numel());  // vectorised: this runs once per step of decode
  for (int64_t i = 0; i < a.numel(); ++i) p[i] = -p[i];
  return a;
}

Mamba1State Mamba1::new_state(int64_t batch) const {
  MAMBA_CHECK(batch >= 1, "Mamba1::new_state: batch must be >= 1, got ", batch);
  return {Tensor::zeros({batch, D_, K_}), Tensor::zeros({batch, D_, N_})};
}

void Mamba1::check_state(const Mamba1State& s, int64_t batch) const {
  check_shape(s.conv_state, "Mamba1 state: conv_state", {batch, D_, K_});
  check_shape(s.ssm_state, "Mamba1 state: ssm_state", {batch, D_, N_});
}

namespace {

// dst (M, n) <- src columns [c0, c0 + n) of a (M, ld) row-major matrix.
Tensor take_cols(const Tensor& src, int64_t M, int64_t ld, int64_t c0, int64_t n, Shape shape) {
  Tensor dst = Tensor::empty(std::move(shape));
  const float* s = src.data();
  float* d = dst.data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) d[m * n + j] = s[m * ld + c0 + j];
  return dst;
}

// y (M, n) += bias (n) broadcast over rows (bias may be a view at an offset).
void add_bias(float* y, const float* bias, int64_t M, int64_t n) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) y[m * n + j] += bias[j];
}

// db (n) += sum over rows of g (M, n)
void sum_rows_into(float* db, const float* g, int64_t M, int64_t n) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) db[j] += g[m * n + j];
}

}  // namespace

// ---- weight storage -----------------------------------------------------------------------------

namespace {
// The (name, fp32 member, 16-bit member) triples of the projection weights that may be 16-bit.
struct HalfSlot {
  const char* name;
  Tensor* f;
  ops::HalfWeight* h;
};
}  // namespace

void Mamba1::set_weight_dtype(WeightDType t) {
  if (t == wdtype_) return;
  std::vector<HalfSlot> slots = {{"in_proj.weight", &in_w_, &in_h_}, {"out_proj.weight", &out_w_, &out_h_}};
  if (cfg_.selective) {
    slots.push_back({"x_proj.weight", &xproj_w_, &xproj_h_});
    slots.push_back({"dt_proj.weight", &dt_w_, &dt_h_});
  }
  for (const HalfSlot& s : slots) {
    Param& p = params_.get(s.name);
    ops::move_weight_storage(p.value, p.grad, *s.f, *s.h, t);
  }
  wdtype_ = t;
}

int64_t Mamba1::num_parameters() const {
  return params_.count() + in_h_.rows() * in_h_.cols() + out_h_.rows() * out_h_.cols() +
         xproj_h_.rows() * xproj_h_.cols() + dt_h_.rows() * dt_h_.cols();
}

ops::HalfWeight* Mamba1::half_weight(const std::string& name) {
  ops::HalfWeight* h = name == "in_proj.weight"    ? &in_h_
                       : name == "out_proj.weight" ? &out_h_
                       : name == "x_proj.weight"   ? &xproj_h_
                       : name == "dt_proj.weight"  ? &dt_h_
                                                   : nullptr;
  return h && h->defined() ? h : nullptr;
}

Tensor Mamba1::param_f32(const std::string& name) const {
  if (name == "in_proj.weight" && in_h_.defined()) return in_h_.to_f32();
  if (name == "out_proj.weight" && out_h_.defined()) return out_h_.to_f32();
  if (name == "x_proj.weight" && xproj_h_.defined()) return xproj_h_.to_f32();
  if (name == "dt_proj.weight" && dt_h_.defined()) return dt_h_.to_f32();
  return params_.get(name).value;
}

// ---- forward ------------------------------------------------------------------------------------

Tensor Mamba1::forward(const Tensor& hidden, Mamba1Saved* saved, Mamba1State* state) {
  const int64_t dm = cfg_.d_model;
  check_defined(hidden, "Mamba1::forward: hidden");
  MAMBA_CHECK(hidden.ndim() == 3, "Mamba1::forward: hidden must be (B, L, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, "Mamba1::forward: hidden", {-1, -1, dm});
  const int64_t Bsz = hidden.dim(0), L = hidden.dim(1), M = Bsz * L;
  MAMBA_CHECK(Bsz >= 1 && L >= 1, "Mamba1::forward: hidden needs B >= 1 and L >= 1, got ",
              hidden.shape_str());
  MAMBA_CHECK(!saved || wdtype_ == WeightDType::f32, "Mamba1::forward: weights are ",
              weight_dtype_name(wdtype_), ": inference only; load in f32 to train");
  const bool tr = trace::enabled();
  const int64_t E = R_ + 2 * N_;

  // in_proj, written straight into the x and z halves (the two row blocks of in_proj.weight).
  Tensor x = Tensor::empty({Bsz, L, D_});  // (B, L, D)
  Tensor z = Tensor::empty({Bsz, L, D_});  // (B, L, D)
  ops::matmul_wt(hidden.data(), M, dm, in_w_, in_h_, 0, D_, x.data(), D_);
  ops::matmul_wt(hidden.data(), M, dm, in_w_, in_h_, D_, D_, z.data(), D_);
  if (in_b_.defined()) {
    add_bias(x.data(), in_b_.data(), M, D_);
    add_bias(z.data(), in_b_.data() + D_, M, D_);
  }
  if (tr) trace::op("in_proj", {hidden.shape()}, {{Bsz, L, 2 * D_}});

  // causal depthwise conv + SiLU
  const Tensor conv_w2 = conv_w_.reshape({D_, K_});
  Tensor xc = ops::causal_conv1d_fwd(x, conv_w2, conv_b_, true);  // (B, L, D)
  if (tr) trace::op("conv1d", {x.shape()}, {xc.shape()});

  Tensor x_dbl, Bm, Cm;                    // selective only
  Tensor delta = Tensor::zeros({Bsz, L, D_});  // (B, L, D); stays 0 when not selective
  if (cfg_.selective) {
    // x_proj -> [dt_low | B | C]
    x_dbl = ops::linear_any(xc, xproj_w_, xproj_h_, Tensor());  // (B, L, R + 2N)
    if (tr) trace::op("x_proj", {xc.shape()}, {x_dbl.shape()});

    // dt_proj.weight on the dt_low columns (leading dimension R + 2N, no copy); bias goes to the scan.
    ops::matmul_wt(x_dbl.data(), M, E, dt_w_, dt_h_, 0, D_, delta.data(), D_);
    if (tr) trace::op("dt_proj", {{Bsz, L, R_}}, {delta.shape()});

    Bm = take_cols(x_dbl, M, E, R_, N_, {Bsz, L, N_});       // (B, L, N)
    Cm = take_cols(x_dbl, M, E, R_ + N_, N_, {Bsz, L, N_});  // (B, L, N)
  }

  ops::ScanArgs args;
  args.u = xc;
  args.delta = delta;
  args.A = A();
  args.B = Bm;
  args.C = Cm;
  args.D = Dp_;
  args.z = z;
  args.delta_bias = dt_b_;
  args.delta_softplus = true;
  if (!cfg_.selective) args.B = B_ssm_, args.C = C_ssm_;  // const (D, N): time-invariant
  Tensor last;
  Tensor y = ops::selective_scan_fwd(args, state ? &last : nullptr);  // (B, L, D)
  if (tr)
    trace::op("selective_scan", {xc.shape(), delta.shape(), args.A.shape(), args.B.shape(), args.C.shape(), z.shape()},
              {y.shape()});

  Tensor out = ops::linear_any(y, out_w_, out_h_, out_b_);  // (B, L, d_model)
  if (tr) trace::op("out_proj", {y.shape()}, {out.shape()});

  if (state) {
    state->conv_state = Tensor::zeros({Bsz, D_, K_});
    ops::causal_conv1d_final_state(x, state->conv_state);
    state->ssm_state = last;
  }
  if (saved) {
    saved->hidden = hidden;
    saved->x = x;
    saved->z = z;
    saved->xc = xc;
    saved->x_dbl = x_dbl;
    saved->delta = delta;
    saved->Bm = Bm;
    saved->Cm = Cm;
    saved->y = y;
  }
  return out;
}

// ---- backward -----------------------------------------------------------------------------------

Tensor Mamba1::backward(const Mamba1Saved& s, const Tensor& dy) {
  const int64_t dm = cfg_.d_model;
  MAMBA_CHECK(wdtype_ == WeightDType::f32, "Mamba1::backward: weights are ", weight_dtype_name(wdtype_),
              ": inference only; load in f32 to train");
  check_defined(s.hidden, "Mamba1::backward: saved.hidden (forward called without saved?)");
  const int64_t Bsz = s.hidden.dim(0), L = s.hidden.dim(1), M = Bsz * L;
  const int64_t E = R_ + 2 * N_;
  check_shape(dy, "Mamba1::backward: dy", {Bsz, L, dm});
  check_shape(s.x, "Mamba1::backward: saved.x", {Bsz, L, D_});
  if (cfg_.selective) check_shape(s.x_dbl, "Mamba1::backward: saved.x_dbl", {Bsz, L, E});

  auto grad = [&](const char* name) -> Tensor& { return params_.get(name).grad; };

  // out_proj
  Tensor* dob = cfg_.bias ? &grad("out_proj.bias") : nullptr;
  Tensor dyy = ops::linear_bwd(s.y, out_w_, dy, &grad("out_proj.weight"), dob);  // (B, L, D)

  // selective scan
  ops::ScanArgs args;
  args.u = s.xc;
  args.delta = s.delta;
  args.A = A();
  args.B = cfg_.selective ? s.Bm : B_ssm_;
  args.C = cfg_.selective ? s.Cm : C_ssm_;
  args.D = Dp_;
  args.z = s.z;
  args.delta_bias = dt_b_;
  args.delta_softplus = true;
  ops::ScanGrads sg = ops::selective_scan_bwd(args, dyy);
  {
    // A = -exp(A_log)  =>  dA_log = dA * A
    Tensor& gA = grad("A_log");
    for (int64_t i = 0; i < gA.numel(); ++i) gA[i] += sg.dA[i] * args.A[i];
    Tensor& gD = grad("D");
    for (int64_t i = 0; i < gD.numel(); ++i) gD[i] += sg.dD[i];
    Tensor& gb = grad("dt_proj.bias");
    for (int64_t i = 0; i < gb.numel(); ++i) gb[i] += sg.ddelta_bias[i];
  }

  Tensor dxc;  // (B, L, D) gradient of the conv output xc
  if (cfg_.selective) {
    // dt_proj.weight: delta = dt_low W^T with dt_low the first R columns of x_dbl.
    Tensor dx_dbl = Tensor::empty({Bsz, L, E});  // (B, L, R + 2N)
    gemm(false, false, M, R_, D_, 1.f, sg.ddelta.data(), D_, dt_w_.data(), R_, 0.f, dx_dbl.data(), E);
    gemm(true, false, D_, R_, M, 1.f, sg.ddelta.data(), D_, s.x_dbl.data(), E, 1.f,
         grad("dt_proj.weight").data(), R_);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N_; ++n) {
        dx_dbl[m * E + R_ + n] = sg.dB[m * N_ + n];
        dx_dbl[m * E + R_ + N_ + n] = sg.dC[m * N_ + n];
      }

    // x_proj; the scan input u is also xc
    dxc = ops::linear_bwd(s.xc, xproj_w_, dx_dbl, &grad("x_proj.weight"), nullptr);  // (B, L, D)
    for (int64_t i = 0; i < dxc.numel(); ++i) dxc[i] += sg.du[i];
  } else {
    // Time-invariant B and C: their (D, N) gradients; xc reaches the output only through u.
    Tensor& gB = grad("B_ssm");
    Tensor& gC = grad("C_ssm");
    for (int64_t i = 0; i < gB.numel(); ++i) gB[i] += sg.dB[i], gC[i] += sg.dC[i];
    dxc = sg.du;
  }

  // conv1d + SiLU
  ops::Conv1dGrads cg = ops::causal_conv1d_bwd(s.x, conv_w_.reshape({D_, K_}), conv_b_, true, dxc);
  {
    Tensor& gw = grad("conv1d.weight");
    for (int64_t i = 0; i < gw.numel(); ++i) gw[i] += cg.dweight[i];
    if (cfg_.conv_bias) {
      Tensor& gb = grad("conv1d.bias");
      for (int64_t i = 0; i < gb.numel(); ++i) gb[i] += cg.dbias[i];
    }
  }

  // in_proj: the x half got cg.dx, the z half sg.dz.
  Tensor dhidden = Tensor::empty({Bsz, L, dm});  // (B, L, d_model)
  Tensor& gWin = grad("in_proj.weight");
  gemm(false, false, M, dm, D_, 1.f, cg.dx.data(), D_, in_w_.data(), dm, 0.f, dhidden.data(), dm);
  gemm(false, false, M, dm, D_, 1.f, sg.dz.data(), D_, in_w_.data() + D_ * dm, dm, 1.f,
       dhidden.data(), dm);
  gemm(true, false, D_, dm, M, 1.f, cg.dx.data(), D_, s.hidden.data(), dm, 1.f, gWin.data(), dm);
  gemm(true, false, D_, dm, M, 1.f, sg.dz.data(), D_, s.hidden.data(), dm, 1.f,
       gWin.data() + D_ * dm, dm);
  if (cfg_.bias) {
    Tensor& gb = grad("in_proj.bias");
    sum_rows_into(gb.data(), cg.dx.data(), M, D_);
    sum_rows_into(gb.data() + D_, sg.dz.data(), M, D_);
  }
  return dhidden;
}

// ---- step ---------------------------------------------------------------------------------------

Tensor Mamba1::step(const Tensor& hidden, Mamba1State& state) {
  const int64_t dm = cfg_.d_model;
  check_defined(hidden, "Mamba1::step: x");
  MAMBA_CHECK(hidden.ndim() == 2, "Mamba1::step: x must be (B, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, "Mamba1::step: x", {-1, dm});
  const int64_t Bsz = hidden.dim(0);
  MAMBA_CHECK(Bsz >= 1, "Mamba1::step: x needs B >= 1, got ", hidden.shape_str());
  check_state(state, Bsz);
  const bool tr = trace::enabled();
  const int64_t E = R_ + 2 * N_;

  Tensor x = Tensor::empty({Bsz, D_});  // (B, D)
  Tensor z = Tensor::empty({Bsz, D_});  // (B, D)
  ops::matmul_wt(hidden.data(), Bsz, dm, in_w_, in_h_, 0, D_, x.data(), D_);
  ops::matmul_wt(hidden.data(), Bsz, dm, in_w_, in_h_, D_, D_, z.data(), D_);
  if (in_b_.defined()) {
    add_bias(x.data(), in_b_.data(), Bsz, D_);
    add_bias(z.data(), in_b_.data() + D_, Bsz, D_);
  }
  if (tr) trace::op("in_proj", {hidden.shape()}, {{Bsz, 2 * D_}});

  Tensor xc = ops::causal_conv1d_update(state.conv_state, x, conv_w_.reshape({D_, K_}), conv_b_, true);
  if (tr) trace::op("conv1d_update", {x.shape(), state.conv_state.shape()}, {xc.shape()});

  Tensor dt, Bt, Ct;
  if (cfg_.selective) {
    Tensor x_db = ops::linear_any(xc, xproj_w_, xproj_h_, Tensor());  // (B, R + 2N)
    if (tr) trace::op("x_proj", {xc.shape()}, {x_db.shape()});

    dt = Tensor::empty({Bsz, D_});  // (B, D)
    ops::matmul_wt(x_db.data(), Bsz, E, dt_w_, dt_h_, 0, D_, dt.data(), D_);
    if (tr) trace::op("dt_proj", {{Bsz, R_}}, {dt.shape()});

    Bt = take_cols(x_db, Bsz, E, R_, N_, {Bsz, N_});       // (B, N)
    Ct = take_cols(x_db, Bsz, E, R_ + N_, N_, {Bsz, N_});  // (B, N)
  } else {
    // Time-invariant: delta = softplus(0 + dt_proj.bias); the (D, N) B and C passed as D groups of
    // one channel each, (B, G = D, N), the layout selective_state_update takes.
    dt = Tensor::zeros({Bsz, D_});  // (B, D)
    Bt = Tensor::empty({Bsz, D_, N_});
    Ct = Tensor::empty({Bsz, D_, N_});
    for (int64_t b = 0; b < Bsz; ++b) {
      std::copy(B_ssm_.data(), B_ssm_.data() + D_ * N_, Bt.data() + b * D_ * N_);
      std::copy(C_ssm_.data(), C_ssm_.data() + D_ * N_, Ct.data() + b * D_ * N_);
    }
  }
  Tensor y = ops::selective_state_update(state.ssm_state, xc, dt, A(), Bt, Ct, Dp_, z, dt_b_, true);
  if (tr)
    trace::op("selective_state_update", {xc.shape(), dt.shape(), Bt.shape(), Ct.shape(), z.shape()},
              {y.shape(), state.ssm_state.shape()});

  Tensor out = ops::linear_any(y, out_w_, out_h_, out_b_);  // (B, d_model)
  if (tr) trace::op("out_proj", {y.shape()}, {out.shape()});
  return out;
}

}  // namespace mamba
