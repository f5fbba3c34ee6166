// The Mamba-3 mixer layer: forward (saved activations, prefill state), backward, step.
// Semantics of mamba_ssm.modules.mamba3.Mamba3; channel-last. The scan is ops/mamba3_scan.
#include "mamba/nn/mamba3.h"

#include <algorithm>
#include <cmath>

#include "mamba/rng.h"
#include "mamba/trace.h"
#include "ops/elementwise.h"
#include "ops/linear.h"
#include "ops/mamba3_scan.h"
#include "ops/norm.h"

namespace mamba {

namespace {
constexpr float kNormEps = 1e-5f;  // B_norm, C_norm and norm (mamba_ssm's eps=1e-5)
}

// ---- config -------------------------------------------------------------------------------------

void Mamba3Config::validate() const {
  MAMBA_CHECK(d_model >= 1, "Mamba3Config: d_model must be >= 1, got ", d_model);
  MAMBA_CHECK(d_state >= 2, "Mamba3Config: d_state must be >= 2, got ", d_state);
  MAMBA_CHECK(std::isfinite(expand) && expand > 0 && expand * double(d_model) < 1e15,
              "Mamba3Config: expand must be > 0 (and expand * d_model finite), got ", expand);
  MAMBA_CHECK(d_inner() >= 1, "Mamba3Config: expand * d_model must be >= 1 (d_inner), got expand ",
              expand, " * d_model ", d_model);
  MAMBA_CHECK(headdim >= 1 && d_inner() % headdim == 0, "Mamba3Config: headdim (", headdim,
              ") must divide d_inner = expand * d_model (", d_inner(), ")");
  MAMBA_CHECK(ngroups >= 1 && nheads() % ngroups == 0, "Mamba3Config: ngroups (", ngroups,
              ") must divide nheads = d_inner / headdim (", nheads(), ")");
  MAMBA_CHECK(rope_fraction == 0.5 || rope_fraction == 1.0,
              "Mamba3Config: rope_fraction must be 0.5 or 1.0, got ", rope_fraction);
  MAMBA_CHECK(num_rope_angles() >= 1, "Mamba3Config: d_state (", d_state,
              ") * rope_fraction gives no rotary angle (num_rope_angles = 0)");
  MAMBA_CHECK(std::isfinite(dt_min) && dt_min > 0, "Mamba3Config: dt_min must be > 0, got ",
              dt_min);
  MAMBA_CHECK(std::isfinite(dt_max) && dt_max >= dt_min, "Mamba3Config: dt_max must be >= dt_min (",
              dt_min, "), got ", dt_max);
  MAMBA_CHECK(std::isfinite(dt_init_floor) && dt_init_floor >= 0,
              "Mamba3Config: dt_init_floor must be >= 0, got ", dt_init_floor);
  MAMBA_CHECK(std::isfinite(A_floor) && A_floor >= 0, "Mamba3Config: A_floor must be >= 0, got ",
              A_floor);
  MAMBA_CHECK(!is_mimo || mimo_rank >= 1, "Mamba3Config: mimo_rank must be >= 1, got ", mimo_rank);
  MAMBA_CHECK(chunk_size >= 1, "Mamba3Config: chunk_size must be >= 1, got ", chunk_size);
}

int64_t Mamba3Config::d_inner() const {
  return static_cast<int64_t>(expand * static_cast<double>(d_model));
}
int64_t Mamba3Config::nheads() const { return headdim >= 1 ? d_inner() / headdim : 0; }
int64_t Mamba3Config::rank() const { return is_mimo ? mimo_rank : 1; }
int64_t Mamba3Config::num_rope_angles() const {
  int64_t split = static_cast<int64_t>(static_cast<double>(d_state) * rope_fraction);
  if (split % 2) --split;
  return split / 2;
}
int64_t Mamba3Config::d_in_proj() const {
  return 2 * d_inner() + 2 * rank() * ngroups * d_state + 3 * nheads() + num_rope_angles();
}

// ---- construction -------------------------------------------------------------------------------

Mamba3::Mamba3(const Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  D_ = cfg_.d_inner(), H_ = cfg_.nheads(), P_ = cfg_.headdim, N_ = cfg_.d_state;
  G_ = cfg_.ngroups, R_ = cfg_.rank(), S_ = cfg_.num_rope_angles(), E_ = cfg_.d_in_proj();
  const int64_t dm = cfg_.d_model;
  // mamba_ssm's state_dict order.
  dt_bias_ = &params_.add("dt_bias", {H_}, true);
  B_bias_ = &params_.add("B_bias", {H_, R_, N_});
  C_bias_ = &params_.add("C_bias", {H_, R_, N_});
  if (cfg_.is_mimo) {
    mimo_x_ = &params_.add("mimo_x", {H_, R_, P_});
    mimo_z_ = &params_.add("mimo_z", {H_, R_, P_});
    mimo_o_ = &params_.add("mimo_o", {H_, R_, P_});
  }
  Dp_ = &params_.add("D", {H_}, true);
  in_w_ = &params_.add_matrix("in_proj.weight", {E_, dm});
  B_norm_ = &params_.add("B_norm.weight", {N_}, true);
  C_norm_ = &params_.add("C_norm.weight", {N_}, true);
  if (cfg_.is_outproj_norm) norm_ = &params_.add("norm.weight", {D_}, true);
  out_w_ = &params_.add_matrix("out_proj.weight", {dm, D_});

  // mamba_ssm's init: dt_bias = softplus^-1(dt), dt ~ exp(U(log dt_min, log dt_max)) floored;
  // B_bias = C_bias = 1; norms 1; mimo_x = mimo_o = 1/R, mimo_z = 1; D = 1; nn.Linear's default
  // uniform(+-1/sqrt(fan_in)) for in_proj and out_proj (no biases).
  Rng rng(seed);
  const double lmin = std::log(cfg_.dt_min), lmax = std::log(cfg_.dt_max);
  Tensor& dtb = dt_bias_->value.f32();
  for (int64_t h = 0; h < H_; ++h) {
    const double dt = std::max(std::exp(rng.uniform() * (lmax - lmin) + lmin), cfg_.dt_init_floor);
    dtb[h] = static_cast<float>(dt + std::log(-std::expm1(-dt)));
  }
  B_bias_->value.f32().fill(1.f);
  C_bias_->value.f32().fill(1.f);
  if (cfg_.is_mimo) {
    mimo_x_->value.f32().fill(1.f / static_cast<float>(R_));
    mimo_z_->value.f32().fill(1.f);
    mimo_o_->value.f32().fill(1.f / static_cast<float>(R_));
  }
  Dp_->value.f32().fill(1.f);
  B_norm_->value.f32().fill(1.f);
  C_norm_->value.f32().fill(1.f);
  if (norm_) norm_->value.f32().fill(1.f);
  const double bi = 1.0 / std::sqrt(static_cast<double>(dm));
  rng.fill_uniform(in_w_->value.f32(), -bi, bi);
  const double bo = 1.0 / std::sqrt(static_cast<double>(D_));
  rng.fill_uniform(out_w_->value.f32(), -bo, bo);
}

Mamba3State Mamba3::new_state(int64_t batch) const {
  MAMBA_CHECK(batch >= 1, "Mamba3::new_state: batch must be >= 1, got ", batch);
  return {Tensor::zeros({batch, H_, S_}), Tensor::zeros({batch, H_, P_, N_}),
          Tensor::zeros({batch, R_, H_, N_}), Tensor::zeros({batch, H_, P_})};
}

void Mamba3::check_state(const State& s, int64_t batch) const {
  check_shape(s.angle, "Mamba3 state: angle", {batch, H_, S_});
  check_shape(s.ssm, "Mamba3 state: ssm", {batch, H_, P_, N_});
  check_shape(s.k, "Mamba3 state: k", {batch, R_, H_, N_});
  check_shape(s.v, "Mamba3 state: v", {batch, H_, P_});
}

// ---- forward ------------------------------------------------------------------------------------

Tensor Mamba3::run(const Tensor& hidden, Saved* saved, const State* init, State* fin) const {
  const int64_t B = hidden.dim(0), L = hidden.dim(1), dm = cfg_.d_model;
  const int64_t RGN = R_ * G_ * N_;
  const bool tr = trace::enabled();
  Tensor proj = ops::linear(hidden, in_w_->value);  // (B, L, E)
  if (tr) trace::op("in_proj", {hidden.shape()}, {proj.shape()});
  int64_t c = 0;
  auto take = [&](int64_t n) {
    Tensor v = proj.cols(c, n);
    c += n;
    return v;
  };
  Tensor z = take(D_), x = take(D_), Bc = take(RGN), Cc = take(RGN), dd_dt = take(H_),
         dd_A = take(H_), trap = take(H_), ang = take(S_);

  Tensor DT, ADT;  // (B*L, H)
  ops::mamba3_discretize_fwd(dd_dt.reshape({B * L, H_}), dd_A.reshape({B * L, H_}), f32(dt_bias_),
                             cfg_.A_floor, DT, ADT);
  if (tr) trace::op("discretize (DT, A*DT)", {{B, L, H_}, {B, L, H_}}, {{B, L, H_}, {B, L, H_}});
  Tensor Bn =
      ops::rms_norm_fwd(Bc.contiguous().reshape({B * L * R_ * G_, N_}), f32(B_norm_), kNormEps)
          .reshape({B, L, R_, G_, N_});
  Tensor Cn =
      ops::rms_norm_fwd(Cc.contiguous().reshape({B * L * R_ * G_, N_}), f32(C_norm_), kNormEps)
          .reshape({B, L, R_, G_, N_});
  if (tr) trace::op("B_norm, C_norm", {{B, L, RGN}, {B, L, RGN}}, {Bn.shape(), Cn.shape()});

  ops::Mamba3ScanArgs a;
  a.Q = Cn, a.K = Bn;
  a.V = x.contiguous().reshape({B, L, H_, P_});
  a.ADT = ADT.reshape({B, L, H_}), a.DT = DT.reshape({B, L, H_});
  a.Trap = trap.contiguous().reshape({B, L, H_});
  a.Angles = ang.contiguous().reshape({B, L, S_});
  a.Q_bias = f32(C_bias_), a.K_bias = f32(B_bias_), a.D = f32(Dp_);
  const bool siso_norm = !cfg_.is_mimo && cfg_.is_outproj_norm;
  Tensor zc = z.contiguous();  // (B, L, D)
  if (!siso_norm) a.Z = zc.reshape({B, L, H_, P_});
  if (cfg_.is_mimo) {
    a.mimo_x = f32(mimo_x_), a.mimo_z = f32(mimo_z_), a.mimo_o = f32(mimo_o_);
    if (norm_) a.norm_weight = f32(norm_);
  }
  a.rotate_pairwise = !cfg_.is_mimo;
  if (init) a.initial = {init->angle, init->ssm, init->k, init->v};
  ops::Mamba3States st;
  if (fin && fin == init) st = {fin->angle, fin->ssm, fin->k, fin->v};  // step: in place
  // Decode (one token from the state, updated in place): the dedicated step kernel.
  Tensor ys =
      (L == 1 && init && fin == init)
          ? ops::mamba3_scan_step(a, st).reshape({B, L, D_})
          : ops::mamba3_scan_fwd(a, cfg_.chunk_size, fin ? &st : nullptr).reshape({B, L, D_});
  if (tr)
    trace::op(cfg_.is_mimo ? "mamba3_scan (MIMO)" : "mamba3_scan (SISO)",
              {a.Q.shape(), a.K.shape(), a.V.shape(), a.ADT.shape(), a.Angles.shape()},
              {{B, L, H_, P_}});
  Tensor y = ys;
  if (siso_norm) {
    y = ops::gated_rms_norm_fwd(ys, zc, f32(norm_), kNormEps, P_, true);
    if (tr) trace::op("norm (gated, per head)", {ys.shape(), zc.shape()}, {y.shape()});
  }
  Tensor out = ops::linear(y, out_w_->value);  // (B, L, d_model)
  if (tr) trace::op("out_proj", {y.shape()}, {{B, L, dm}});
  if (fin) *fin = {st.angle, st.ssm, st.k, st.v};
  if (saved) {
    saved->hidden = hidden;
    saved->proj = proj;
    saved->Bn = Bn, saved->Cn = Cn;
    saved->DT = a.DT, saved->ADT = a.ADT;
    saved->y_scan = ys;
    saved->y = y;
  }
  return out;
}

namespace {
// hidden must be (B, L, d_model) with B, L >= 1; `what` names the caller.
void check_hidden(const Tensor& hidden, int64_t dm, const char* what) {
  check_defined(hidden, str(what, ": hidden").c_str());
  MAMBA_CHECK(hidden.ndim() == 3, what, ": hidden must be (B, L, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, str(what, ": hidden").c_str(), {-1, -1, dm});
  MAMBA_CHECK(hidden.dim(0) >= 1 && hidden.dim(1) >= 1, what,
              ": hidden needs B >= 1 and L >= 1, got ", hidden.shape_str());
}
}  // namespace

Tensor Mamba3::forward(const Tensor& hidden, Saved* saved, State* state) const {
  check_hidden(hidden, cfg_.d_model, "Mamba3::forward");
  if (saved) params_.check_f32("Mamba3::forward");
  return run(hidden, saved, nullptr, state);
}

Tensor Mamba3::prefill(const Tensor& hidden, State& state) const {
  check_hidden(hidden, cfg_.d_model, "Mamba3::prefill");
  check_state(state, hidden.dim(0));
  // The sequence path from the state, advancing it in place (the scan reads each (batch, head)'s
  // initial slice before it writes the final one).
  return run(hidden, nullptr, &state, &state);
}

Tensor Mamba3::step(const Tensor& x, State& state) const {
  const int64_t dm = cfg_.d_model;
  check_defined(x, "Mamba3::step: x");
  MAMBA_CHECK(x.ndim() == 2, "Mamba3::step: x must be (B, d_model=", dm, "), got ", x.shape_str());
  check_shape(x, "Mamba3::step: x", {-1, dm});
  const int64_t B = x.dim(0);
  MAMBA_CHECK(B >= 1, "Mamba3::step: x needs B >= 1, got ", x.shape_str());
  check_state(state, B);
  // One token through the same path, the state updated in place (any ngroups dividing nheads).
  Tensor y = run(x.reshape({B, 1, dm}), nullptr, &state, &state);
  return y.reshape({B, dm});
}

// ---- backward -----------------------------------------------------------------------------------

Tensor Mamba3::backward(const Saved& s, const Tensor& dy) {
  const int64_t dm = cfg_.d_model, RGN = R_ * G_ * N_;
  params_.check_f32("Mamba3::backward");
  check_defined(s.hidden, "Mamba3::backward: saved.hidden (forward called without saved?)");
  const int64_t B = s.hidden.dim(0), L = s.hidden.dim(1);
  check_shape(dy, "Mamba3::backward: dy", {B, L, dm});
  check_shape(s.proj, "Mamba3::backward: saved.proj", {B, L, E_});

  Tensor dyy = ops::linear_bwd(s.y, out_w_->value, dy, &out_w_->grad(), nullptr);  // (B, L, D)
  Tensor dproj = Tensor::empty({B, L, E_});
  int64_t c = 0;
  auto take = [&](const Tensor& t, int64_t n) {
    Tensor v = t.cols(c, n);
    c += n;
    return v;
  };
  Tensor z = take(s.proj, D_), x = take(s.proj, D_);
  c = 0;
  Tensor dz = take(dproj, D_), dx = take(dproj, D_), dBc = take(dproj, RGN), dCc = take(dproj, RGN),
         d_dd_dt = take(dproj, H_), d_dd_A = take(dproj, H_), dtrap = take(dproj, H_),
         dang = take(dproj, S_);
  c = 2 * D_;
  Tensor Bc = take(s.proj, RGN), Cc = take(s.proj, RGN), dd_dt = take(s.proj, H_),
         dd_A = take(s.proj, H_), trap = take(s.proj, H_), ang = take(s.proj, S_);

  const bool siso_norm = !cfg_.is_mimo && cfg_.is_outproj_norm;
  Tensor zc = z.contiguous();
  Tensor dys = dyy;  // gradient of the scan output
  if (siso_norm) {
    ops::GatedRmsNormGrads ng =
        ops::gated_rms_norm_bwd(s.y_scan, zc, f32(norm_), kNormEps, P_, true, dyy);
    ops::add_into(norm_->grad(), ng.dweight);
    ops::copy_into(dz, ng.dz);
    dys = ng.dx;
  }

  ops::Mamba3ScanArgs a;
  a.Q = s.Cn, a.K = s.Bn;
  a.V = x.contiguous().reshape({B, L, H_, P_});
  a.ADT = s.ADT, a.DT = s.DT;
  a.Trap = trap.contiguous().reshape({B, L, H_});
  a.Angles = ang.contiguous().reshape({B, L, S_});
  a.Q_bias = f32(C_bias_), a.K_bias = f32(B_bias_), a.D = f32(Dp_);
  if (!siso_norm) a.Z = zc.reshape({B, L, H_, P_});
  if (cfg_.is_mimo) {
    a.mimo_x = f32(mimo_x_), a.mimo_z = f32(mimo_z_), a.mimo_o = f32(mimo_o_);
    if (norm_) a.norm_weight = f32(norm_);
  }
  a.rotate_pairwise = !cfg_.is_mimo;
  ops::Mamba3ScanGrads g = ops::mamba3_scan_bwd(a, dys.reshape({B, L, H_, P_}), cfg_.chunk_size);
  ops::add_into(C_bias_->grad(), g.dQ_bias);
  ops::add_into(B_bias_->grad(), g.dK_bias);
  ops::add_into(Dp_->grad(), g.dD);
  if (cfg_.is_mimo) {
    ops::add_into(mimo_x_->grad(), g.dmimo_x);
    ops::add_into(mimo_z_->grad(), g.dmimo_z);
    ops::add_into(mimo_o_->grad(), g.dmimo_o);
    if (norm_) ops::add_into(norm_->grad(), g.dnorm_weight);
  }
  if (!siso_norm) ops::copy_into(dz, g.dZ.reshape({B, L, D_}));
  ops::copy_into(dx, g.dV.reshape({B, L, D_}));
  ops::copy_into(dtrap, g.dTrap);
  ops::copy_into(dang, g.dAngles);
  ops::mamba3_discretize_bwd(dd_dt.reshape({B * L, H_}), dd_A.reshape({B * L, H_}), f32(dt_bias_),
                             cfg_.A_floor, g.dDT.reshape({B * L, H_}), g.dADT.reshape({B * L, H_}),
                             d_dd_dt.reshape({B * L, H_}), d_dd_A.reshape({B * L, H_}),
                             dt_bias_->grad());
  // RMSNorm of B and C over N.
  ops::RmsNormGrads bg =
      ops::rms_norm_bwd(Bc.contiguous().reshape({B * L * R_ * G_, N_}), f32(B_norm_), kNormEps,
                        g.dK.reshape({B * L * R_ * G_, N_}));
  ops::RmsNormGrads cg =
      ops::rms_norm_bwd(Cc.contiguous().reshape({B * L * R_ * G_, N_}), f32(C_norm_), kNormEps,
                        g.dQ.reshape({B * L * R_ * G_, N_}));
  ops::add_into(B_norm_->grad(), bg.dweight);
  ops::add_into(C_norm_->grad(), cg.dweight);
  ops::copy_into(dBc, bg.dx.reshape({B, L, RGN}));
  ops::copy_into(dCc, cg.dx.reshape({B, L, RGN}));
  return ops::linear_bwd(s.hidden, in_w_->value, dproj, &in_w_->grad(), nullptr);
}

}  // namespace mamba
