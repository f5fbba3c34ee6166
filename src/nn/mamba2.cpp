// The Mamba-2 mixer layer: forward, backward and single-token step over one parameter list.
// See include/mamba/nn/mamba2.h for the data path.
#include "mamba/nn/mamba2.h"

#include <algorithm>
#include <cmath>

#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/trace.h"
#include "ops/act.h"
#include "ops/conv1d.h"
#include "ops/elementwise.h"
#include "ops/half_matmul.h"
#include "ops/linear.h"
#include "ops/norm.h"

namespace mamba {
namespace {

constexpr float kNormEps = 1e-5f;  // mamba_ssm's RMSNormGated default in Mamba2

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
  MAMBA_CHECK(d_ssm >= 0, "Mamba2Config: d_ssm must be 0 (None: = d_inner) or > 0, got ", d_ssm);
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

Mamba2::Mamba2(const Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  const int64_t H = cfg_.nheads(), din = cfg_.d_inner(), dssm = cfg_.ssm_dim();
  const int64_t cd = cfg_.conv_dim(), K = cfg_.d_conv, dm = cfg_.d_model;
  // state_dict order of mamba_ssm: own parameters first, then the submodules'.
  dt_bias_ = &params_.add("dt_bias", {H}, true);
  A_log_ = &params_.add("A_log", {H}, true);
  D_ = &params_.add("D", {cfg_.D_has_hdim ? dssm : H}, true);
  in_w_ = &params_.add_matrix("in_proj.weight", {cfg_.d_in_proj(), dm});
  if (cfg_.bias) in_b_ = &params_.add("in_proj.bias", {cfg_.d_in_proj()}, true);
  conv_w_ = &params_.add("conv1d.weight", {cd, 1, K});
  if (cfg_.conv_bias) conv_b_ = &params_.add("conv1d.bias", {cd}, true);
  if (cfg_.rmsnorm) norm_w_ = &params_.add("norm.weight", {dssm}, true);
  out_w_ = &params_.add_matrix("out_proj.weight", {dm, din});
  if (cfg_.bias) out_b_ = &params_.add("out_proj.bias", {dm}, true);

  // mamba_ssm's initialisation (same distributions; our own deterministic generator).
  Rng rng(seed);
  const double bin = 1.0 / std::sqrt(static_cast<double>(dm));
  rng.fill_uniform(in_w_->value.f32(), -bin, bin);
  if (in_b_) rng.fill_uniform(in_b_->value.f32(), -bin, bin);
  const double bconv = 1.0 / std::sqrt(static_cast<double>(K));  // fan_in = (cd / groups) * K
  rng.fill_uniform(conv_w_->value.f32(), -bconv, bconv);
  if (conv_b_) rng.fill_uniform(conv_b_->value.f32(), -bconv, bconv);
  const double lmin = std::log(cfg_.dt_min), lmax = std::log(cfg_.dt_max);
  Tensor& dt_bias = dt_bias_->value.f32();
  for (int64_t h = 0; h < H; ++h) {
    double dt = std::exp(rng.uniform() * (lmax - lmin) + lmin);
    dt = std::max(dt, cfg_.dt_init_floor);
    dt_bias[h] = static_cast<float>(dt + std::log(-std::expm1(-dt)));  // inverse softplus
  }
  Tensor& A_log = A_log_->value.f32();
  for (int64_t h = 0; h < H; ++h)
    A_log[h] = static_cast<float>(
        std::log(rng.uniform(cfg_.A_init_range.first, cfg_.A_init_range.second)));
  D_->value.f32().fill(1.f);
  if (norm_w_) norm_w_->value.f32().fill(1.f);
  const double bout = 1.0 / std::sqrt(static_cast<double>(din));
  rng.fill_uniform(out_w_->value.f32(), -bout, bout);
  if (out_b_) rng.fill_uniform(out_b_->value.f32(), -bout, bout);
}

Tensor Mamba2::A() const { return ops::neg_exp(f32(A_log_)); }

ops::SsdArgs Mamba2::ssd_args(const Tensor& x, const Tensor& dt, const Tensor& B, const Tensor& C,
                              const Tensor& z) const {
  ops::SsdArgs a;
  a.x = x, a.dt = dt, a.B = B, a.C = C, a.A = A();
  a.D = cfg_.D_has_hdim ? f32(D_).reshape({cfg_.nheads(), cfg_.headdim}) : f32(D_);
  if (!cfg_.rmsnorm) a.z = z;
  a.dt_bias = f32(dt_bias_);
  a.dt_softplus = true;
  a.dt_min = static_cast<float>(cfg_.dt_limit.first);
  a.dt_max = static_cast<float>(cfg_.dt_limit.second);
  a.chunk_size = cfg_.ssd_chunk();
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
  ops::copy_into(y_out.cols(0, dmlp), ops::mul(ops::silu(z0), x0));
  ops::copy_into(y_out.cols(dmlp, yn.dim(-1)), yn);
  trace::op("mlp_gate_cat", {z0.shape(), x0.shape(), yn.shape()}, {y_out.shape()});
  return y_out;
}

void Mamba2::check_input(const Tensor& hidden, const char* what) const {
  check_defined(hidden, str(what, ": hidden").c_str());
  MAMBA_CHECK(hidden.ndim() == 3, what, ": hidden must be (B, L, d_model), got ",
              hidden.shape_str());
  check_shape(hidden, str(what, ": hidden").c_str(), {hidden.dim(0), hidden.dim(1), cfg_.d_model});
  MAMBA_CHECK(hidden.dim(0) > 0 && hidden.dim(1) > 0, what, ": empty input ", hidden.shape_str());
}

void Mamba2::check_state(const State& s, int64_t batch, const char* what) const {
  check_shape(s.conv_state, str(what, ": conv_state").c_str(),
              {batch, cfg_.conv_dim(), cfg_.d_conv});
  check_shape(s.ssm_state, str(what, ": ssm_state").c_str(),
              {batch, cfg_.nheads(), cfg_.headdim, cfg_.d_state});
}

Tensor Mamba2::forward(const Tensor& hidden, Saved* saved, State* state) const {
  check_input(hidden, "Mamba2::forward");
  if (saved) params_.check_f32("Mamba2::forward");  // "inference only" for 16-bit weights
  return run(hidden, saved, nullptr, state);
}

Tensor Mamba2::prefill(const Tensor& hidden, State& state) const {
  check_input(hidden, "Mamba2::prefill");
  check_state(state, hidden.dim(0), "Mamba2::prefill");
  return run(hidden, nullptr, &state, &state);
}

Tensor Mamba2::run(const Tensor& hidden, Saved* saved, const State* init, State* state) const {
  const int64_t B = hidden.dim(0), L = hidden.dim(1);
  const int64_t H = cfg_.nheads(), P = cfg_.headdim, G = cfg_.ngroups, N = cfg_.d_state;
  const int64_t dmlp = cfg_.d_mlp(), dssm = cfg_.ssm_dim(), cd = cfg_.conv_dim();
  const bool tr = trace::enabled();

  // in_proj: (B, L, d_model) -> (B, L, d_in_proj) = [z0, x0, z, xBC, dt], each column block its
  // own contiguous tensor (no split copies of a (L, d_in_proj) output): one GEMM writing the
  // blocks (ops::linear_split), or with a bias one product per block (the weight's row blocks).
  auto in_proj = [&](int64_t c0, int64_t n) {
    Tensor b = in_b_
                   ? f32(in_b_).reshape({1, cfg_.d_in_proj()}).cols(c0, n).contiguous().reshape({n})
                   : Tensor();
    return ops::linear(hidden, in_w_->value.rows(c0, n), b);
  };
  Tensor z0, x0, z, xbc_raw, dt;
  if (!in_b_) {
    std::vector<Tensor> p = ops::linear_split(hidden, in_w_->value, {dmlp, dmlp, dssm, cd, H});
    if (dmlp > 0) z0 = p[0], x0 = p[1];
    z = p[2], xbc_raw = p[3], dt = p[4];
  } else {
    if (dmlp > 0) z0 = in_proj(0, dmlp), x0 = in_proj(dmlp, dmlp);
    z = in_proj(2 * dmlp, dssm);
    xbc_raw = in_proj(2 * dmlp + dssm, cd);
    dt = in_proj(2 * dmlp + dssm + cd, H);
  }
  if (tr) trace::op("in_proj", {hidden.shape()}, {{B, L, cfg_.d_in_proj()}});  // in column blocks
  // conv1d + SiLU over x || B || C: (B, L, d_ssm + 2GN), continued from init's window if given
  // (written straight to its x, B and C blocks)
  std::vector<Tensor> xbc = ops::causal_conv1d_fwd_split(
      xbc_raw, f32(conv_w_).reshape({cd, cfg_.d_conv}), optional_f32(conv_b_), true,
      init ? init->conv_state : Tensor(), {dssm, G * N, G * N});
  if (state) {
    // The window advanced past xbc_raw: from init's (state may be init itself) or from zeros.
    if (state != init)
      state->conv_state = init ? init->conv_state.clone() : Tensor::zeros({B, cd, cfg_.d_conv});
    ops::causal_conv1d_advance_state(state->conv_state, xbc_raw);
  }
  if (tr) trace::op("conv1d_silu", {xbc_raw.shape()}, {xbc_raw.shape()});  // in column blocks
  Tensor x = xbc[0].reshape({B, L, H, P});
  Tensor Bm = xbc[1].reshape({B, L, G, N});
  Tensor Cm = xbc[2].reshape({B, L, G, N});
  // ssd: y (B, L, H, P)
  ops::SsdArgs args = ssd_args(x, dt, Bm, Cm, z.reshape({B, L, H, P}));
  if (init) args.initial_states = init->ssm_state;
  Tensor fin;
  Tensor y = ops::ssd_chunked(args, state ? &fin : nullptr).reshape({B, L, dssm});
  if (tr)
    trace::op(str("ssd[chunk=", args.chunk_size, "]"),
              {x.shape(), dt.shape(), Bm.shape(), Cm.shape()}, {y.shape()});
  if (state) state->ssm_state = fin;
  Tensor yn = y;
  if (cfg_.rmsnorm) {
    yn = ops::gated_rms_norm_fwd(y, z, f32(norm_w_), kNormEps, dssm / G, cfg_.norm_before_gate);
    if (tr) trace::op("norm", {y.shape(), z.shape()}, {yn.shape()});
  }
  Tensor y_out = dmlp > 0 ? mlp_gate_cat(yn, z0, x0) : yn;
  Tensor out = ops::linear(y_out, out_w_->value, optional_f32(out_b_));
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

Tensor Mamba2::backward(const Saved& s, const Tensor& dy) {
  params_.check_f32("Mamba2::backward");  // "inference only" for 16-bit weights
  check_defined(s.hidden, "Mamba2::backward: saved (forward was not called with saved)");
  check_shape(dy, "Mamba2::backward: dy", s.hidden.shape());
  const int64_t B = s.hidden.dim(0), L = s.hidden.dim(1);
  const int64_t G = cfg_.ngroups, N = cfg_.d_state;
  const int64_t dmlp = cfg_.d_mlp(), dssm = cfg_.ssm_dim(), cd = cfg_.conv_dim();

  // out_proj
  Tensor dy_out =
      ops::linear_bwd(s.y_out, out_w_->value, dy, &out_w_->grad(), optional_grad(out_b_));
  // The gradient of in_proj's output, assembled in its column blocks [z0, x0, z, xBC, dt].
  Tensor dzxbcdt = Tensor::empty({B, L, cfg_.d_in_proj()});
  Tensor dyn = dy_out;
  if (dmlp > 0) {
    Tensor dg = dy_out.cols(0, dmlp).contiguous();
    dyn = dy_out.cols(dmlp, dssm).contiguous();
    // g = silu(z0) * x0
    Tensor t = ops::mul(dg, s.x0), dx0 = ops::mul(dg, ops::silu(s.z0));
    Tensor dz0 = ops::silu_bwd(s.z0, t);
    ops::copy_into(dzxbcdt.cols(0, dmlp), dz0);
    ops::copy_into(dzxbcdt.cols(dmlp, dmlp), dx0);
  }
  // norm
  Tensor dyscan = dyn, dz;
  if (cfg_.rmsnorm) {
    ops::GatedRmsNormGrads ng = ops::gated_rms_norm_bwd(s.y, s.z, f32(norm_w_), kNormEps, dssm / G,
                                                        cfg_.norm_before_gate, dyn);
    dyscan = ng.dx, dz = ng.dz;
    ops::add_into(norm_w_->grad(), ng.dweight);
  }
  // ssd
  ops::SsdGrads sg = ops::ssd_chunked_bwd(s.ssd, dyscan.reshape(s.ssd.x.shape()));
  if (!cfg_.rmsnorm) dz = sg.dz.reshape({B, L, dssm});
  ops::add_mul_into(A_log_->grad(), sg.dA, s.ssd.A);  // A = -exp(A_log): dA_log = dA * A
  ops::add_into(D_->grad(), sg.dD.reshape(D_->grad().shape()));
  ops::add_into(dt_bias_->grad(), sg.ddt_bias);
  // conv1d + SiLU
  Tensor dxbc = Tensor::empty({B, L, cd});
  ops::copy_into(dxbc.cols(0, dssm), sg.dx.reshape({B, L, dssm}));
  ops::copy_into(dxbc.cols(dssm, G * N), sg.dB.reshape({B, L, G * N}));
  ops::copy_into(dxbc.cols(dssm + G * N, G * N), sg.dC.reshape({B, L, G * N}));
  ops::Conv1dGrads cg = ops::causal_conv1d_bwd(s.xbc_raw, f32(conv_w_).reshape({cd, cfg_.d_conv}),
                                               optional_f32(conv_b_), true, dxbc);
  ops::add_into(conv_w_->grad(), cg.dweight.reshape(conv_w_->grad().shape()));
  if (conv_b_) ops::add_into(conv_b_->grad(), cg.dbias);
  ops::copy_into(dzxbcdt.cols(2 * dmlp, dssm), dz.reshape({B, L, dssm}));
  ops::copy_into(dzxbcdt.cols(2 * dmlp + dssm, cd), cg.dx);
  ops::copy_into(dzxbcdt.cols(2 * dmlp + dssm + cd, cfg_.nheads()),
                 sg.ddt.reshape({B, L, cfg_.nheads()}));
  // in_proj
  return ops::linear_bwd(s.hidden, in_w_->value, dzxbcdt, &in_w_->grad(), optional_grad(in_b_));
}

Tensor Mamba2::step(const Tensor& xin, State& state) const {
  check_defined(xin, "Mamba2::step: x");
  MAMBA_CHECK(xin.ndim() == 2, "Mamba2::step: x must be (B, d_model), got ", xin.shape_str());
  const int64_t B = xin.dim(0);
  check_shape(xin, "Mamba2::step: x", {B, cfg_.d_model});
  const int64_t H = cfg_.nheads(), P = cfg_.headdim, G = cfg_.ngroups, N = cfg_.d_state;
  const int64_t dmlp = cfg_.d_mlp(), dssm = cfg_.ssm_dim(), cd = cfg_.conv_dim();
  check_state(state, B, "Mamba2::step");
  const bool tr = trace::enabled();

  Tensor zxbcdt, xbc;
  if (B == 1 && !trace::printing()) {
    in_proj_conv_one(xin, state, zxbcdt, xbc);
    if (tr) trace::op("in_proj+conv1d_update_silu", {xin.shape()}, {zxbcdt.shape(), xbc.shape()});
  } else {
    zxbcdt = ops::linear(xin, in_w_->value, optional_f32(in_b_));
    if (tr) trace::op("in_proj", {xin.shape()}, {zxbcdt.shape()});
  }
  Tensor z0, x0;
  if (dmlp > 0) z0 = zxbcdt.cols(0, dmlp).contiguous(), x0 = zxbcdt.cols(dmlp, dmlp).contiguous();
  Tensor z = zxbcdt.cols(2 * dmlp, dssm).contiguous();
  Tensor xbc_raw = xbc.defined() ? Tensor() : zxbcdt.cols(2 * dmlp + dssm, cd).contiguous();
  Tensor dt = zxbcdt.cols(2 * dmlp + dssm + cd, H).contiguous();
  if (tr) trace::op("split", {zxbcdt.shape()}, {z.shape(), xbc_raw.shape(), dt.shape()});
  if (!xbc.defined())
    xbc = ops::causal_conv1d_update(state.conv_state, xbc_raw,
                                    f32(conv_w_).reshape({cd, cfg_.d_conv}), optional_f32(conv_b_),
                                    true);
  if (tr)
    trace::op("conv1d_update_silu", {xbc_raw.shape(), state.conv_state.shape()}, {xbc.shape()});
  Tensor x = xbc.cols(0, dssm).contiguous().reshape({B, H, P});
  Tensor Bm = xbc.cols(dssm, G * N).contiguous().reshape({B, G, N});
  Tensor Cm = xbc.cols(dssm + G * N, G * N).contiguous().reshape({B, G, N});
  ops::SsdArgs a = ssd_args(x, dt, Bm, Cm, Tensor());
  Tensor y = ops::ssd_state_update(state.ssm_state, x, dt, a.A, Bm, Cm, a.D,
                                   cfg_.rmsnorm ? Tensor() : z.reshape({B, H, P}), f32(dt_bias_),
                                   true, a.dt_min, a.dt_max)
                 .reshape({B, dssm});
  if (tr)
    trace::op("ssd_update",
              {x.shape(), dt.shape(), Bm.shape(), Cm.shape(), state.ssm_state.shape()},
              {y.shape()});
  Tensor yn = y;
  if (cfg_.rmsnorm) {
    yn = ops::gated_rms_norm_fwd(y, z, f32(norm_w_), kNormEps, dssm / G, cfg_.norm_before_gate);
    if (tr) trace::op("norm", {y.shape(), z.shape()}, {yn.shape()});
  }
  Tensor y_out = dmlp > 0 ? mlp_gate_cat(yn, z0, x0) : yn;
  Tensor out = ops::linear(y_out, out_w_->value, optional_f32(out_b_));
  if (tr) trace::op("out_proj", {y_out.shape()}, {out.shape()});
  return out;
}

// A single sequence's in_proj and conv update (B = 1) in one pass over the threads instead of
// two: the conv channels are split in pieces of 64 (so the conv's vectorised SiLU starts its
// lanes where the unsplit op does), each thread computes in_proj's xBC rows of its channels and
// their conv update, and a proportional share of in_proj's other rows (z, dt; z0, x0). Every
// row is the row ops::linear computes (ops::matmul_rows: the same whatever the split), so zxbcdt,
// xbc and the conv state are the bits of the general path (test_mamba2).
void Mamba2::in_proj_conv_one(const Tensor& xin, State& state, Tensor& zxbcdt, Tensor& xbc) const {
  const int64_t dm = cfg_.d_model, cd = cfg_.conv_dim(), K = cfg_.d_conv;
  const Weight& in_w = in_w_->value;
  const int64_t total = in_w.rows(), before = 2 * cfg_.d_mlp() + cfg_.ssm_dim();
  const int64_t other = total - cd;  // rows outside xBC: [0, before) and [before + cd, total)
  const Tensor h = xin.contiguous();
  const float* hp = h.data();
  const float* in_b = in_b_ ? f32(in_b_).data() : nullptr;
  const float* conv_w = f32(conv_w_).data();
  const float* conv_b = conv_b_ ? f32(conv_b_).data() : nullptr;
  zxbcdt = Tensor::empty({1, total});
  xbc = Tensor::empty({1, cd});
  float* zp = zxbcdt.data();
  float* xcp = xbc.data();
  float* conv_st = state.conv_state.data();
  constexpr int64_t kPiece = 64;
  const int64_t pieces = (cd + kPiece - 1) / kPiece;
  // Pieces per thread task: >= ~16K weights of in_proj (64 xBC rows of d_model, plus the share).
  const int64_t per_piece = (kPiece + other / pieces) * std::max<int64_t>(dm, 1);
  const int64_t grain = std::max<int64_t>(1, 16384 / per_piece);
  auto rows = [&](int64_t r0, int64_t r1) {  // in_proj rows [r0, r1) into zxbcdt, bias added
    if (r1 <= r0) return;
    ops::matmul_rows(hp, 1, dm, in_w.rows(r0, r1 - r0), zp + r0, r1 - r0,
                     in_b ? in_b + r0 : nullptr);
  };
  parallel_for(pieces, grain, [&](int64_t pb, int64_t pe) {
    const int64_t b = pb * kPiece, e = std::min(cd, pe * kPiece);
    rows(before + b, before + e);
    ops::causal_conv1d_update_rows(conv_st, zp + before, conv_w, conv_b, xcp, cd, K, b, e, true);
    // The share of the other rows: [o0, o1) of them, in the order z0, x0, z, then dt.
    const int64_t o0 = other * pb / pieces, o1 = other * pe / pieces;
    rows(std::min(o0, before), std::min(o1, before));
    rows(std::max(o0, before) + cd, std::max(o1, before) + cd);
  });
}

}  // namespace mamba
