// The Mamba-2 mixer layer: forward, backward and single-token step over one parameter list.
// See include/mamba/nn/mamba2.h for the data path.
#include "mamba/nn/mamba2.h"

#include <algorithm>
#include <cmath>

#include "mamba/ops/act.h"
#include "mamba/ops/conv1d.h"
#include "mamba/ops/linear.h"
#include "mamba/ops/norm.h"
#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/trace.h"

namespace mamba {
namespace {

constexpr float kNormEps = 1e-5f;  // mamba_ssm's RMSNormGated default in Mamba2

// Columns [start, start + len) of src viewed as rows of width W: (M, W) -> (M, len), a copy.
Tensor cols(const Tensor& src, int64_t start, int64_t len, Shape out_shape) {
  const int64_t W = src.dim(-1), M = src.numel() / W;
  Tensor o = Tensor::empty(std::move(out_shape));
  MAMBA_CHECK(o.numel() == M * len, "mamba2: internal column split size mismatch");
  const float* s = src.data();
  float* d = o.data();
  parallel_for(M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) std::copy_n(s + m * W + start, len, d + m * len);
  });
  return o;
}

// Writes src (M, len) into columns [start, start + len) of dst (M, W).
void put_cols(Tensor& dst, int64_t start, const Tensor& src) {
  const int64_t W = dst.dim(-1), M = dst.numel() / W, len = src.numel() / M;
  const float* s = src.data();
  float* d = dst.data();
  parallel_for(M, 64, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) std::copy_n(s + m * len, len, d + m * W + start);
  });
}

}  // namespace

void Mamba2Config::validate() const {
  MAMBA_CHECK(d_model > 0, "Mamba2Config: d_model must be > 0, got ", d_model);
  MAMBA_CHECK(d_state > 0, "Mamba2Config: d_state must be > 0, got ", d_state);
  MAMBA_CHECK(d_conv > 0, "Mamba2Config: d_conv must be > 0, got ", d_conv);
  MAMBA_CHECK(expand > 0 && d_inner() > 0,
              "Mamba2Config: expand must give d_inner = int(expand * d_model) > 0, got expand ",
              expand);
  MAMBA_CHECK(headdim > 0, "Mamba2Config: headdim must be > 0, got ", headdim);
  MAMBA_CHECK(ngroups > 0, "Mamba2Config: ngroups must be > 0, got ", ngroups);
  MAMBA_CHECK(chunk_size > 0, "Mamba2Config: chunk_size must be > 0, got ", chunk_size);
  MAMBA_CHECK(d_ssm == -1 || d_ssm > 0, "Mamba2Config: d_ssm must be -1 (= d_inner) or > 0, got ",
              d_ssm);
  MAMBA_CHECK(ssm_dim() <= d_inner(), "Mamba2Config: d_ssm (", ssm_dim(),
              ") must not exceed d_inner (", d_inner(), ")");
  MAMBA_CHECK(ssm_dim() % headdim == 0, "Mamba2Config: d_ssm (", ssm_dim(),
              d_ssm > 0 ? "" : " = d_inner", ") is not divisible by headdim (", headdim, ")");
  MAMBA_CHECK(nheads() % ngroups == 0, "Mamba2Config: ngroups (", ngroups,
              ") must divide the number of heads nheads = d_ssm / headdim (", nheads(), ")");
  MAMBA_CHECK(A_init_range.first > 0 && A_init_range.first <= A_init_range.second,
              "Mamba2Config: A_init_range must satisfy 0 < lo <= hi, got (", A_init_range.first,
              ", ", A_init_range.second, ")");
  MAMBA_CHECK(dt_min > 0 && dt_min <= dt_max,
              "Mamba2Config: dt_min/dt_max must satisfy 0 < dt_min <= dt_max, got (", dt_min, ", ",
              dt_max, ")");
  MAMBA_CHECK(dt_init_floor >= 0, "Mamba2Config: dt_init_floor must be >= 0, got ", dt_init_floor);
  MAMBA_CHECK(dt_limit.first <= dt_limit.second,
              "Mamba2Config: dt_limit must satisfy min <= max, got (", dt_limit.first, ", ",
              dt_limit.second, ")");
}

Mamba2::Mamba2(const Mamba2Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  const int64_t H = cfg_.nheads(), din = cfg_.d_inner(), dssm = cfg_.ssm_dim();
  const int64_t cd = cfg_.conv_dim(), K = cfg_.d_conv, dm = cfg_.d_model;
  // state_dict order of mamba_ssm: own parameters first, then the submodules'.
  dt_bias_ = params_.add("dt_bias", {H}, true);
  A_log_ = params_.add("A_log", {H}, true);
  D_ = params_.add("D", {cfg_.D_has_hdim ? dssm : H}, true);
  in_w_ = params_.add("in_proj.weight", {cfg_.d_in_proj(), dm});
  if (cfg_.bias) in_b_ = params_.add("in_proj.bias", {cfg_.d_in_proj()}, true);
  conv_w_ = params_.add("conv1d.weight", {cd, 1, K});
  if (cfg_.conv_bias) conv_b_ = params_.add("conv1d.bias", {cd}, true);
  if (cfg_.rmsnorm) norm_w_ = params_.add("norm.weight", {dssm}, true);
  out_w_ = params_.add("out_proj.weight", {dm, din});
  if (cfg_.bias) out_b_ = params_.add("out_proj.bias", {dm}, true);

  // mamba_ssm's initialisation (same distributions; our own deterministic generator).
  Rng rng(seed);
  const double bin = 1.0 / std::sqrt(static_cast<double>(dm));
  rng.fill_uniform(in_w_, -bin, bin);
  if (in_b_.defined()) rng.fill_uniform(in_b_, -bin, bin);
  const double bconv = 1.0 / std::sqrt(static_cast<double>(K));  // fan_in = (cd / groups) * K
  rng.fill_uniform(conv_w_, -bconv, bconv);
  if (conv_b_.defined()) rng.fill_uniform(conv_b_, -bconv, bconv);
  const double lmin = std::log(cfg_.dt_min), lmax = std::log(cfg_.dt_max);
  for (int64_t h = 0; h < H; ++h) {
    double dt = std::exp(rng.uniform() * (lmax - lmin) + lmin);
    dt = std::max(dt, cfg_.dt_init_floor);
    dt_bias_[h] = static_cast<float>(dt + std::log(-std::expm1(-dt)));  // inverse softplus
  }
  for (int64_t h = 0; h < H; ++h)
    A_log_[h] = static_cast<float>(
        std::log(rng.uniform(cfg_.A_init_range.first, cfg_.A_init_range.second)));
  D_.fill(1.f);
  if (norm_w_.defined()) norm_w_.fill(1.f);
  const double bout = 1.0 / std::sqrt(static_cast<double>(din));
  rng.fill_uniform(out_w_, -bout, bout);
  if (out_b_.defined()) rng.fill_uniform(out_b_, -bout, bout);
}

void Mamba2::set_weight_dtype(WeightDType t) {
  if (t == wdtype_) return;
  struct Slot {
    const char* name;
    Tensor* f;
    ops::HalfWeight* h;
  };
  for (const Slot& s : {Slot{"in_proj.weight", &in_w_, &in_h_}, Slot{"out_proj.weight", &out_w_, &out_h_}}) {
    Param& p = params_.get(s.name);
    ops::move_weight_storage(p.value, p.grad, *s.f, *s.h, t);
  }
  wdtype_ = t;
}

int64_t Mamba2::num_parameters() const {
  return params_.count() + in_h_.rows() * in_h_.cols() + out_h_.rows() * out_h_.cols();
}

ops::HalfWeight* Mamba2::half_weight(const std::string& name) {
  ops::HalfWeight* h = name == "in_proj.weight" ? &in_h_ : name == "out_proj.weight" ? &out_h_ : nullptr;
  return h && h->defined() ? h : nullptr;
}

Tensor Mamba2::param_f32(const std::string& name) const {
  if (name == "in_proj.weight" && in_h_.defined()) return in_h_.to_f32();
  if (name == "out_proj.weight" && out_h_.defined()) return out_h_.to_f32();
  return params_.get(name).value;
}

Tensor Mamba2::A() const {
  Tensor a = Tensor::empty(A_log_.shape());
  for (int64_t h = 0; h < a.numel(); ++h) a[h] = -std::exp(A_log_[h]);
  return a;
}

ops::SsdArgs Mamba2::ssd_args(const Tensor& x, const Tensor& dt, const Tensor& B, const Tensor& C,
                              const Tensor& z) const {
  ops::SsdArgs a;
  a.x = x, a.dt = dt, a.B = B, a.C = C, a.A = A();
  a.D = cfg_.D_has_hdim ? D_.reshape({cfg_.nheads(), cfg_.headdim}) : D_;
  if (!cfg_.rmsnorm) a.z = z;
  a.dt_bias = dt_bias_;
  a.dt_softplus = true;
  a.dt_min = static_cast<float>(cfg_.dt_limit.first);
  a.dt_max = static_cast<float>(cfg_.dt_limit.second);
  a.chunk_size = cfg_.chunk_size;
  return a;
}

Mamba2State Mamba2::new_state(int64_t batch) const {
  MAMBA_CHECK(batch > 0, "Mamba2::new_state: batch must be > 0, got ", batch);
  Mamba2State s;
  s.conv_state = Tensor::zeros({batch, cfg_.conv_dim(), cfg_.d_conv});
  s.ssm_state = Tensor::zeros({batch, cfg_.nheads(), cfg_.headdim, cfg_.d_state});
  return s;
}

// out_proj input when d_mlp > 0: [silu(z0) * x0 | yn] along the channels.
//   yn: (..., d_ssm), z0, x0: (..., d_mlp) -> (..., d_inner). Shared by forward and step.
Tensor Mamba2::mlp_gate_cat(const Tensor& yn, const Tensor& z0, const Tensor& x0) const {
  Shape shape = yn.shape();
  const int64_t dmlp = z0.dim(-1);
  shape.back() += dmlp;
  Tensor y_out = Tensor::empty(shape);
  Tensor g = ops::silu(z0);
  for (int64_t i = 0; i < g.numel(); ++i) g[i] *= x0[i];
  put_cols(y_out, 0, g);
  put_cols(y_out, dmlp, yn);
  trace::op("mlp_gate_cat", {z0.shape(), x0.shape(), yn.shape()}, {y_out.shape()});
  return y_out;
}

Tensor Mamba2::forward(const Tensor& hidden, Mamba2Saved* saved, Mamba2State* state) {
  check_defined(hidden, "Mamba2::forward: hidden");
  MAMBA_CHECK(hidden.ndim() == 3, "Mamba2::forward: hidden must be (B, L, d_model), got ",
              hidden.shape_str());
  const int64_t Bn = hidden.dim(0), L = hidden.dim(1);
  check_shape(hidden, "Mamba2::forward: hidden", {Bn, L, cfg_.d_model});
  MAMBA_CHECK(Bn > 0 && L > 0, "Mamba2::forward: empty input ", hidden.shape_str());
  MAMBA_CHECK(!saved || wdtype_ == WeightDType::f32, "Mamba2::forward: weights are ",
              weight_dtype_name(wdtype_), ": inference only; load in f32 to train");
  const int64_t H = cfg_.nheads(), P = cfg_.headdim, G = cfg_.ngroups, N = cfg_.d_state;
  const int64_t dmlp = cfg_.d_mlp(), dssm = cfg_.ssm_dim(), cd = cfg_.conv_dim();
  const bool tr = trace::enabled();

  // in_proj: (B, L, d_model) -> (B, L, d_in_proj) = [z0, x0, z, xBC, dt]
  Tensor zxbcdt = ops::linear_any(hidden, in_w_, in_h_, in_b_);
  if (tr) trace::op("in_proj", {hidden.shape()}, {zxbcdt.shape()});
  Tensor z0, x0;
  if (dmlp > 0)
    z0 = cols(zxbcdt, 0, dmlp, {Bn, L, dmlp}), x0 = cols(zxbcdt, dmlp, dmlp, {Bn, L, dmlp});
  Tensor z = cols(zxbcdt, 2 * dmlp, dssm, {Bn, L, dssm});
  Tensor xbc_raw = cols(zxbcdt, 2 * dmlp + dssm, cd, {Bn, L, cd});
  Tensor dt = cols(zxbcdt, 2 * dmlp + dssm + cd, H, {Bn, L, H});
  if (tr) trace::op("split", {zxbcdt.shape()}, {z.shape(), xbc_raw.shape(), dt.shape()});
  if (state) {
    state->conv_state = Tensor::zeros({Bn, cd, cfg_.d_conv});
    ops::causal_conv1d_final_state(xbc_raw, state->conv_state);
  }
  // conv1d + SiLU over x || B || C: (B, L, d_ssm + 2GN)
  Tensor xbc = ops::causal_conv1d_fwd(xbc_raw, conv_w_.reshape({cd, cfg_.d_conv}), conv_b_, true);
  if (tr) trace::op("conv1d_silu", {xbc_raw.shape()}, {xbc.shape()});
  Tensor x = cols(xbc, 0, dssm, {Bn, L, H, P});
  Tensor Bm = cols(xbc, dssm, G * N, {Bn, L, G, N});
  Tensor Cm = cols(xbc, dssm + G * N, G * N, {Bn, L, G, N});
  // ssd: y (B, L, H, P)
  ops::SsdArgs args = ssd_args(x, dt, Bm, Cm, z.reshape({Bn, L, H, P}));
  Tensor fin;
  Tensor y = ops::ssd_chunked(args, state ? &fin : nullptr).reshape({Bn, L, dssm});
  if (tr) trace::op("ssd", {x.shape(), dt.shape(), Bm.shape(), Cm.shape()}, {y.shape()});
  if (state) state->ssm_state = fin;
  Tensor yn = y;
  if (cfg_.rmsnorm) {
    yn = ops::gated_rms_norm_fwd(y, z, norm_w_, kNormEps, dssm / G, cfg_.norm_before_gate);
    if (tr) trace::op("norm", {y.shape(), z.shape()}, {yn.shape()});
  }
  Tensor y_out = dmlp > 0 ? mlp_gate_cat(yn, z0, x0) : yn;
  Tensor out = ops::linear_any(y_out, out_w_, out_h_, out_b_);
  if (tr) trace::op("out_proj", {y_out.shape()}, {out.shape()});
  if (saved) {
    saved->hidden = hidden;
    saved->xbc_raw = xbc_raw;
    saved->z0 = z0, saved->x0 = x0, saved->z = z;
    saved->ssd = args;
    saved->y = y;
    saved->y_out = y_out;
  }
  return out;
}

Tensor Mamba2::backward(const Mamba2Saved& s, const Tensor& dy) {
  MAMBA_CHECK(wdtype_ == WeightDType::f32, "Mamba2::backward: weights are ", weight_dtype_name(wdtype_),
              ": inference only; load in f32 to train");
  check_defined(s.hidden, "Mamba2::backward: saved (forward was not called with saved)");
  check_shape(dy, "Mamba2::backward: dy", s.hidden.shape());
  const int64_t Bn = s.hidden.dim(0), L = s.hidden.dim(1);
  const int64_t H = cfg_.nheads(), G = cfg_.ngroups, N = cfg_.d_state;
  const int64_t dmlp = cfg_.d_mlp(), dssm = cfg_.ssm_dim(), cd = cfg_.conv_dim();

  // out_proj
  Tensor dy_out = ops::linear_bwd(s.y_out, out_w_, dy, &params_.get("out_proj.weight").grad,
                                  cfg_.bias ? &params_.get("out_proj.bias").grad : nullptr);
  Tensor dzxbcdt = Tensor::empty({Bn, L, cfg_.d_in_proj()});
  Tensor dyn = dy_out;
  if (dmlp > 0) {
    Tensor dg = cols(dy_out, 0, dmlp, {Bn, L, dmlp});
    dyn = cols(dy_out, dmlp, dssm, {Bn, L, dssm});
    // g = silu(z0) * x0
    Tensor sz = ops::silu(s.z0), t = Tensor::empty(dg.shape()), dz0 = Tensor::empty(dg.shape());
    Tensor dx0 = Tensor::empty(dg.shape());
    for (int64_t i = 0; i < dg.numel(); ++i) t[i] = dg[i] * s.x0[i], dx0[i] = dg[i] * sz[i];
    ops::silu_bwd(s.z0.data(), t.data(), dz0.data(), dz0.numel());
    put_cols(dzxbcdt, 0, dz0);
    put_cols(dzxbcdt, dmlp, dx0);
  }
  // norm
  Tensor dyscan = dyn, dz;
  if (cfg_.rmsnorm) {
    ops::GatedRmsNormGrads ng =
        ops::gated_rms_norm_bwd(s.y, s.z, norm_w_, kNormEps, dssm / G, cfg_.norm_before_gate, dyn);
    dyscan = ng.dx, dz = ng.dz;
    Tensor& gw = params_.get("norm.weight").grad;
    for (int64_t i = 0; i < gw.numel(); ++i) gw[i] += ng.dweight[i];
  }
  // ssd
  ops::SsdGrads sg = ops::ssd_chunked_bwd(s.ssd, dyscan.reshape(s.ssd.x.shape()));
  if (!cfg_.rmsnorm) dz = sg.dz.reshape({Bn, L, dssm});
  {
    Tensor& gA = params_.get("A_log").grad;  // A = -exp(A_log): dA_log = dA * A
    for (int64_t h = 0; h < H; ++h) gA[h] += sg.dA[h] * s.ssd.A[h];
    Tensor& gD = params_.get("D").grad;
    for (int64_t i = 0; i < gD.numel(); ++i) gD[i] += sg.dD[i];
    Tensor& gb = params_.get("dt_bias").grad;
    for (int64_t h = 0; h < H; ++h) gb[h] += sg.ddt_bias[h];
  }
  // conv1d + SiLU
  Tensor dxbc = Tensor::empty({Bn, L, cd});
  put_cols(dxbc, 0, sg.dx);
  put_cols(dxbc, dssm, sg.dB);
  put_cols(dxbc, dssm + G * N, sg.dC);
  ops::Conv1dGrads cg =
      ops::causal_conv1d_bwd(s.xbc_raw, conv_w_.reshape({cd, cfg_.d_conv}), conv_b_, true, dxbc);
  {
    Tensor& gw = params_.get("conv1d.weight").grad;
    for (int64_t i = 0; i < gw.numel(); ++i) gw[i] += cg.dweight[i];
    if (cfg_.conv_bias) {
      Tensor& gb = params_.get("conv1d.bias").grad;
      for (int64_t i = 0; i < gb.numel(); ++i) gb[i] += cg.dbias[i];
    }
  }
  put_cols(dzxbcdt, 2 * dmlp, dz);
  put_cols(dzxbcdt, 2 * dmlp + dssm, cg.dx);
  put_cols(dzxbcdt, 2 * dmlp + dssm + cd, sg.ddt);
  // in_proj
  return ops::linear_bwd(s.hidden, in_w_, dzxbcdt, &params_.get("in_proj.weight").grad,
                         cfg_.bias ? &params_.get("in_proj.bias").grad : nullptr);
}

Tensor Mamba2::step(const Tensor& xin, Mamba2State& state) {
  check_defined(xin, "Mamba2::step: x");
  MAMBA_CHECK(xin.ndim() == 2, "Mamba2::step: x must be (B, d_model), got ", xin.shape_str());
  const int64_t Bn = xin.dim(0);
  check_shape(xin, "Mamba2::step: x", {Bn, cfg_.d_model});
  const int64_t H = cfg_.nheads(), P = cfg_.headdim, G = cfg_.ngroups, N = cfg_.d_state;
  const int64_t dmlp = cfg_.d_mlp(), dssm = cfg_.ssm_dim(), cd = cfg_.conv_dim();
  check_shape(state.conv_state, "Mamba2::step: conv_state", {Bn, cd, cfg_.d_conv});
  check_shape(state.ssm_state, "Mamba2::step: ssm_state", {Bn, H, P, N});
  const bool tr = trace::enabled();

  Tensor zxbcdt = ops::linear_any(xin, in_w_, in_h_, in_b_);
  if (tr) trace::op("in_proj", {xin.shape()}, {zxbcdt.shape()});
  Tensor z0, x0;
  if (dmlp > 0) z0 = cols(zxbcdt, 0, dmlp, {Bn, dmlp}), x0 = cols(zxbcdt, dmlp, dmlp, {Bn, dmlp});
  Tensor z = cols(zxbcdt, 2 * dmlp, dssm, {Bn, dssm});
  Tensor xbc_raw = cols(zxbcdt, 2 * dmlp + dssm, cd, {Bn, cd});
  Tensor dt = cols(zxbcdt, 2 * dmlp + dssm + cd, H, {Bn, H});
  if (tr) trace::op("split", {zxbcdt.shape()}, {z.shape(), xbc_raw.shape(), dt.shape()});
  Tensor xbc = ops::causal_conv1d_update(state.conv_state, xbc_raw,
                                         conv_w_.reshape({cd, cfg_.d_conv}), conv_b_, true);
  if (tr)
    trace::op("conv1d_update_silu", {xbc_raw.shape(), state.conv_state.shape()}, {xbc.shape()});
  Tensor x = cols(xbc, 0, dssm, {Bn, H, P});
  Tensor Bm = cols(xbc, dssm, G * N, {Bn, G, N});
  Tensor Cm = cols(xbc, dssm + G * N, G * N, {Bn, G, N});
  ops::SsdArgs a = ssd_args(x, dt, Bm, Cm, Tensor());
  Tensor y = ops::ssd_state_update(state.ssm_state, x, dt, a.A, Bm, Cm, a.D,
                                   cfg_.rmsnorm ? Tensor() : z.reshape({Bn, H, P}), dt_bias_, true,
                                   a.dt_min, a.dt_max)
                 .reshape({Bn, dssm});
  if (tr)
    trace::op("ssd_update",
              {x.shape(), dt.shape(), Bm.shape(), Cm.shape(), state.ssm_state.shape()},
              {y.shape()});
  Tensor yn = y;
  if (cfg_.rmsnorm) {
    yn = ops::gated_rms_norm_fwd(y, z, norm_w_, kNormEps, dssm / G, cfg_.norm_before_gate);
    if (tr) trace::op("norm", {y.shape(), z.shape()}, {yn.shape()});
  }
  Tensor y_out = dmlp > 0 ? mlp_gate_cat(yn, z0, x0) : yn;
  Tensor out = ops::linear_any(y_out, out_w_, out_h_, out_b_);
  if (tr) trace::op("out_proj", {y_out.shape()}, {out.shape()});
  return out;
}

}  // namespace mamba
