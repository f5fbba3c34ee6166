// Vim's bidirectional Mamba (bimamba v2): forward and backward. Built from the Mamba-1 ops
// (conv1d, selective_scan, linear); the backward direction uses their reverse flag, so both
// directions read the same x and z in place.
#include "mamba/nn/bimamba.h"

#include <algorithm>
#include <cmath>

#include "mamba/rng.h"
#include "mamba/trace.h"
#include "nn/ssm_init.h"
#include "ops/conv1d.h"
#include "ops/elementwise.h"
#include "ops/linear.h"
#include "ops/selective_scan.h"

namespace mamba {

// ---- config -------------------------------------------------------------------------------------

void BiMambaConfig::validate() const {
  MAMBA_CHECK(d_model >= 1, "BiMambaConfig: d_model must be >= 1, got ", d_model);
  MAMBA_CHECK(d_state >= 1, "BiMambaConfig: d_state must be >= 1, got ", d_state);
  MAMBA_CHECK(d_conv >= 1, "BiMambaConfig: d_conv must be >= 1, got ", d_conv);
  MAMBA_CHECK(std::isfinite(expand) && expand > 0 && expand * double(d_model) < 1e15,
              "BiMambaConfig: expand must be > 0 (and expand * d_model finite), got ", expand);
  MAMBA_CHECK(d_inner() >= 1, "BiMambaConfig: expand * d_model must be >= 1 (d_inner), got expand ",
              expand, " * d_model ", d_model);
  MAMBA_CHECK(dt_rank == -1 || dt_rank >= 1,
              "BiMambaConfig: dt_rank must be >= 1 or -1 (\"auto\"), got ", dt_rank);
  MAMBA_CHECK(std::isfinite(dt_min) && dt_min > 0, "BiMambaConfig: dt_min must be > 0, got ",
              dt_min);
  MAMBA_CHECK(std::isfinite(dt_max) && dt_max >= dt_min,
              "BiMambaConfig: dt_max must be >= dt_min (", dt_min, "), got ", dt_max);
  MAMBA_CHECK(dt_init == "random" || dt_init == "constant",
              "BiMambaConfig: dt_init must be \"random\" or \"constant\", got \"", dt_init, "\"");
  MAMBA_CHECK(std::isfinite(dt_scale), "BiMambaConfig: dt_scale must be finite, got ", dt_scale);
  MAMBA_CHECK(std::isfinite(dt_init_floor) && dt_init_floor >= 0,
              "BiMambaConfig: dt_init_floor must be >= 0, got ", dt_init_floor);
  MAMBA_CHECK(bimamba_type == "v2",
              "BiMambaConfig: bimamba_type must be \"v2\" (separate backward-direction "
              "parameters; \"none\" is Mamba1), got \"",
              bimamba_type, "\"");
  MAMBA_CHECK(!init_layer_scale || std::isfinite(*init_layer_scale),
              "BiMambaConfig: init_layer_scale must be finite when set, got ",
              init_layer_scale ? *init_layer_scale : 0.0);
}

int64_t BiMambaConfig::d_inner() const {
  return static_cast<int64_t>(expand * static_cast<double>(d_model));
}

int64_t BiMambaConfig::rank() const { return dt_rank == -1 ? (d_model + 15) / 16 : dt_rank; }

// ---- construction -------------------------------------------------------------------------------

BiMamba::BiMamba(const Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  const int64_t D = d_inner_ = cfg_.d_inner();
  const int64_t N = d_state_ = cfg_.d_state;
  const int64_t K = d_conv_ = cfg_.d_conv;
  const int64_t R = dt_rank_ = cfg_.rank();
  const int64_t dm = cfg_.d_model;
  // Vim's state_dict order: the module's own parameters (gamma, A_log, D, A_b_log, D_b), then
  // the submodules in construction order.
  if (cfg_.init_layer_scale) gamma_ = &params_.add("gamma", {dm}, true);
  fwd_.A_log = &params_.add("A_log", {D, N}, true);
  fwd_.Dp = &params_.add("D", {D}, true);
  bwd_.A_log = &params_.add("A_b_log", {D, N}, true);
  bwd_.Dp = &params_.add("D_b", {D}, true);
  in_w_ = &params_.add_matrix("in_proj.weight", {2 * D, dm});
  if (cfg_.bias) in_b_ = &params_.add("in_proj.bias", {2 * D}, true);
  auto add_dir = [&](Dir& d, const std::string& sfx) {
    d.conv_w = &params_.add("conv1d" + sfx + ".weight", {D, 1, K});
    if (cfg_.conv_bias) d.conv_b = &params_.add("conv1d" + sfx + ".bias", {D}, true);
    d.xproj_w = &params_.add_matrix("x_proj" + sfx + ".weight", {R + 2 * N, D});
    d.dt_w = &params_.add_matrix("dt_proj" + sfx + ".weight", {D, R});
    d.dt_b = &params_.add("dt_proj" + sfx + ".bias", {D}, true);
  };
  add_dir(fwd_, "");
  add_dir(bwd_, "_b");
  bwd_.reverse = true;
  out_w_ = &params_.add_matrix("out_proj.weight", {dm, D});
  if (cfg_.bias) out_b_ = &params_.add("out_proj.bias", {dm}, true);

  // Vim's module init: nn.Linear / nn.Conv1d defaults (uniform(+-1/sqrt(fan_in)) for weight and
  // bias); dt_proj (forward direction only) re-initialised as in Mamba; A and A_b S4D-real; D and
  // D_b = 1; gamma = init_layer_scale. dt_proj_b keeps nn.Linear's default init, as in Vim's
  // module (Vim's model-level _init_weights later zeroes Linear biases; that is the model's
  // business, not the layer's).
  Rng rng(seed);
  auto uni = [&](Param* p, double fan_in) {
    const double b = 1.0 / std::sqrt(fan_in);
    rng.fill_uniform(p->value.f32(), -b, b);
  };
  if (gamma_) gamma_->value.f32().fill(static_cast<float>(*cfg_.init_layer_scale));
  uni(in_w_, static_cast<double>(dm));
  if (in_b_) uni(in_b_, static_cast<double>(dm));
  uni(fwd_.conv_w, static_cast<double>(K));
  if (fwd_.conv_b) uni(fwd_.conv_b, static_cast<double>(K));
  uni(fwd_.xproj_w, static_cast<double>(D));
  nn_init::dt_proj_weight(rng, fwd_.dt_w->value.f32(), R, cfg_.dt_scale, cfg_.dt_init);
  nn_init::dt_bias(rng, fwd_.dt_b->value.f32().data(), D, cfg_.dt_min, cfg_.dt_max,
                   cfg_.dt_init_floor);
  for (Param* a : {fwd_.A_log, bwd_.A_log}) nn_init::a_log_s4d(a->value.f32().data(), D, N);
  fwd_.Dp->value.f32().fill(1.f);
  bwd_.Dp->value.f32().fill(1.f);
  uni(bwd_.conv_w, static_cast<double>(K));
  if (bwd_.conv_b) uni(bwd_.conv_b, static_cast<double>(K));
  uni(bwd_.xproj_w, static_cast<double>(D));
  uni(bwd_.dt_w, static_cast<double>(R));
  uni(bwd_.dt_b, static_cast<double>(R));
  uni(out_w_, static_cast<double>(D));
  if (out_b_) uni(out_b_, static_cast<double>(D));
}

// ---- forward ------------------------------------------------------------------------------------

Tensor BiMamba::dir_forward(const Dir& dir, const Tensor& x, const Tensor& z,
                            BiMambaDirSaved& s) const {
  const int64_t D = d_inner_, N = d_state_, K = d_conv_, R = dt_rank_;
  const int64_t B = x.dim(0), L = x.dim(1);
  const bool tr = trace::enabled();
  const char* sfx = dir.reverse ? "_b" : "";
  // conv + SiLU (anti-causal for the reversed direction: reads x in place)
  s.xc = ops::causal_conv1d_fwd(x, f32(dir.conv_w).reshape({D, K}), optional_f32(dir.conv_b), true,
                                dir.reverse);  // (B, L, D)
  if (tr)
    trace::op(str("conv1d", sfx, dir.reverse ? " (reverse)" : ""), {x.shape()}, {s.xc.shape()});
  s.x_dbl = ops::linear(s.xc, dir.xproj_w->value);  // (B, L, R + 2N)
  if (tr) trace::op(str("x_proj", sfx), {s.xc.shape()}, {s.x_dbl.shape()});
  s.delta = Tensor::empty({B, L, D});
  ops::linear_into(s.x_dbl.cols(0, R), dir.dt_w->value, Tensor(), s.delta);
  if (tr) trace::op(str("dt_proj", sfx), {{B, L, R}}, {s.delta.shape()});
  s.Bm = s.x_dbl.cols(R, N).contiguous();      // (B, L, N)
  s.Cm = s.x_dbl.cols(R + N, N).contiguous();  // (B, L, N)
  ops::ScanArgs a;
  a.u = s.xc;
  a.delta = s.delta;
  a.A = ops::neg_exp_fast(f32(dir.A_log));  // as Mamba1::A()
  a.B = s.Bm;
  a.C = s.Cm;
  a.D = f32(dir.Dp);
  a.z = z;
  a.delta_bias = f32(dir.dt_b);
  a.delta_softplus = true;
  a.reverse = dir.reverse;
  Tensor y = ops::selective_scan_fwd(a);  // (B, L, D)
  if (tr)
    trace::op(str("selective_scan", sfx, dir.reverse ? " (reverse)" : ""),
              {s.xc.shape(), s.delta.shape(), a.A.shape(), a.B.shape(), a.C.shape(), z.shape()},
              {y.shape()});
  return y;
}

Tensor BiMamba::forward(const Tensor& hidden, Saved* saved) const {
  const int64_t dm = cfg_.d_model, D = d_inner_;
  check_defined(hidden, "BiMamba::forward: hidden");
  MAMBA_CHECK(hidden.ndim() == 3, "BiMamba::forward: hidden must be (B, L, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, "BiMamba::forward: hidden", {-1, -1, dm});
  const int64_t B = hidden.dim(0), L = hidden.dim(1);
  MAMBA_CHECK(B >= 1 && L >= 1, "BiMamba::forward: hidden needs B >= 1 and L >= 1, got ",
              hidden.shape_str());
  if (saved) params_.check_f32("BiMamba::forward");
  const bool tr = trace::enabled();
  const Tensor& in_b = optional_f32(in_b_);

  Tensor x = Tensor::empty({B, L, D});  // (B, L, D)
  Tensor z = Tensor::empty({B, L, D});  // (B, L, D)
  ops::linear_into(hidden, in_w_->value.rows(0, D), in_b.defined() ? in_b.narrow(0, D) : Tensor(),
                   x);
  ops::linear_into(hidden, in_w_->value.rows(D, D), in_b.defined() ? in_b.narrow(D, D) : Tensor(),
                   z);
  if (tr) trace::op("in_proj", {hidden.shape()}, {{B, L, 2 * D}});

  BiMambaDirSaved sf, sb;
  Tensor y = dir_forward(fwd_, x, z, sf);    // (B, L, D)
  Tensor y_b = dir_forward(bwd_, x, z, sb);  // (B, L, D), already in the original time order
  ops::add_into(y, y_b);
  if (cfg_.if_divide_out) ops::scale_inplace(y, 0.5f);
  if (tr)
    trace::op(cfg_.if_divide_out ? "merge (y_f + y_b) / 2" : "merge y_f + y_b",
              {y.shape(), y_b.shape()}, {y.shape()});

  Tensor o = ops::linear(y, out_w_->value, optional_f32(out_b_));  // (B, L, d_model)
  if (tr) trace::op("out_proj", {y.shape()}, {o.shape()});
  Tensor out = o;
  if (gamma_) {
    if (saved) out = o.clone();  // backward needs o (gamma may be 0)
    ops::mul_cols_inplace(out, f32(gamma_));
    if (tr) trace::op("layer_scale gamma", {o.shape()}, {out.shape()});
  }
  if (saved) {
    saved->hidden = hidden;
    saved->x = x;
    saved->z = z;
    saved->fwd = std::move(sf);
    saved->bwd = std::move(sb);
    saved->y = y;
    saved->o = gamma_ ? o : Tensor();
  }
  return out;
}

// ---- backward -----------------------------------------------------------------------------------

Tensor BiMamba::dir_backward(Dir& dir, const Tensor& x, const Tensor& z, const BiMambaDirSaved& s,
                             const Tensor& dy, Tensor& dz) {
  const int64_t D = d_inner_, N = d_state_, K = d_conv_, R = dt_rank_;
  const int64_t B = x.dim(0), L = x.dim(1), E = R + 2 * N;
  check_shape(s.x_dbl, "BiMamba::backward: saved x_dbl", {B, L, E});
  ops::ScanArgs a;
  a.u = s.xc;
  a.delta = s.delta;
  a.A = ops::neg_exp_fast(f32(dir.A_log));  // as Mamba1::A()
  a.B = s.Bm;
  a.C = s.Cm;
  a.D = f32(dir.Dp);
  a.z = z;
  a.delta_bias = f32(dir.dt_b);
  a.delta_softplus = true;
  a.reverse = dir.reverse;
  ops::ScanGrads sg = ops::selective_scan_bwd(a, dy);
  ops::add_mul_into(dir.A_log->grad(), sg.dA, a.A);  // A = -exp(A_log)  =>  dA_log = dA * A
  ops::add_into(dir.Dp->grad(), sg.dD);
  ops::add_into(dir.dt_b->grad(), sg.ddelta_bias);
  ops::add_into(dz, sg.dz);

  Tensor dx_dbl = Tensor::empty({B, L, E});  // (B, L, R + 2N)
  ops::linear_bwd_into(s.x_dbl.cols(0, R), dir.dt_w->value, sg.ddelta, dx_dbl.cols(0, R), false,
                       &dir.dt_w->grad(), nullptr);
  ops::copy_into(dx_dbl.cols(R, N), sg.dB);
  ops::copy_into(dx_dbl.cols(R + N, N), sg.dC);
  Tensor dxc = ops::linear_bwd(s.xc, dir.xproj_w->value, dx_dbl, &dir.xproj_w->grad(),
                               nullptr);  // (B, L, D)
  ops::add_into(dxc, sg.du);

  ops::Conv1dGrads cg = ops::causal_conv1d_bwd(x, f32(dir.conv_w).reshape({D, K}),
                                               optional_f32(dir.conv_b), true, dxc, dir.reverse);
  ops::add_into(dir.conv_w->grad(), cg.dweight.reshape(dir.conv_w->grad().shape()));
  if (dir.conv_b) ops::add_into(dir.conv_b->grad(), cg.dbias);
  return cg.dx;
}

Tensor BiMamba::backward(const Saved& s, const Tensor& dy) {
  const int64_t dm = cfg_.d_model, D = d_inner_;
  params_.check_f32("BiMamba::backward");
  check_defined(s.hidden, "BiMamba::backward: saved.hidden (forward called without saved?)");
  const int64_t B = s.hidden.dim(0), L = s.hidden.dim(1);
  check_shape(dy, "BiMamba::backward: dy", {B, L, dm});
  check_shape(s.x, "BiMamba::backward: saved.x", {B, L, D});
  check_shape(s.y, "BiMamba::backward: saved.y", {B, L, D});

  // layer scale: out = o * gamma
  Tensor dout = dy;
  if (gamma_) {
    check_shape(s.o, "BiMamba::backward: saved.o", {B, L, dm});
    ops::mul_cols_grad(gamma_->grad(), dy, s.o);
    dout = dy.clone();
    ops::mul_cols_inplace(dout, f32(gamma_));
  }
  // out_proj, then the merge: both directions receive dy_merge (halved with if_divide_out)
  Tensor dym =
      ops::linear_bwd(s.y, out_w_->value, dout, &out_w_->grad(), optional_grad(out_b_));  // (B,L,D)
  if (cfg_.if_divide_out) ops::scale_inplace(dym, 0.5f);

  Tensor dz = Tensor::zeros({B, L, D});
  Tensor dx = dir_backward(fwd_, s.x, s.z, s.fwd, dym, dz);  // (B, L, D)
  ops::add_into(dx, dir_backward(bwd_, s.x, s.z, s.bwd, dym, dz));

  // in_proj: rows [0, D) of the weight made x, rows [D, 2D) made z.
  Tensor dhidden = Tensor::empty({B, L, dm});
  Tensor gW = in_w_->grad();
  Tensor db0 = in_b_ ? in_b_->grad().narrow(0, D) : Tensor(),
         db1 = in_b_ ? in_b_->grad().narrow(D, D) : Tensor();
  Tensor gW0 = gW.narrow(0, D), gW1 = gW.narrow(D, D);
  ops::linear_bwd_into(s.hidden, in_w_->value.rows(0, D), dx, dhidden, false, &gW0,
                       in_b_ ? &db0 : nullptr);
  ops::linear_bwd_into(s.hidden, in_w_->value.rows(D, D), dz, dhidden, true, &gW1,
                       in_b_ ? &db1 : nullptr);
  return dhidden;
}

}  // namespace mamba
