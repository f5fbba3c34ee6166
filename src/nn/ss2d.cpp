// VMamba's SS2D layer: forward (optionally saving activations) and backward, built from ops
// (in_proj, depthwise conv2d, the 2-D cross scan, LayerNorm, GELU, gate, out_proj). Channel-last
// inside; channel-first tensors are transposed at the boundary.
#include "mamba/nn/ss2d.h"

#include <algorithm>
#include <cmath>

#include "mamba/rng.h"
#include "mamba/safetensors.h"
#include "mamba/trace.h"
#include "nn/ssm_init.h"
#include "ops/act.h"
#include "ops/conv2d.h"
#include "ops/cross_scan.h"
#include "ops/elementwise.h"
#include "ops/gelu.h"
#include "ops/layernorm.h"
#include "ops/linear.h"

namespace mamba {

namespace {
constexpr float kNormEps = 1e-5f;  // nn.LayerNorm / LayerNorm2d default
constexpr int64_t K = SS2D::kDirections;

// VMamba's checkpostfix: strips tag from the end of v when present.
bool strip(std::string& v, const std::string& tag) {
  if (v.size() >= tag.size() && v.compare(v.size() - tag.size(), tag.size(), tag) == 0) {
    v.resize(v.size() - tag.size());
    return true;
  }
  return false;
}

struct ForwardType {
  bool v0 = false, no32 = false, oact = false, noz = false, nozact = false, onnone = false;
  std::string core;
  std::string unsupported;  // a recognised postfix or core we do not implement
};

// Parses forward_type the way VMamba's SS2D.__initv2__ does (postfixes stripped in its order).
ForwardType parse_forward_type(const std::string& ft) {
  ForwardType t;
  if (ft == "v0") {
    t.v0 = true;
    t.core = "v0";
    return t;
  }
  std::string v = ft;
  t.no32 = strip(v, "_no32");
  t.oact = strip(v, "_oact");
  t.noz = strip(v, "_noz");
  t.nozact = strip(v, "_nozact");
  t.onnone = strip(v, "_onnone");
  for (const char* tag : {"_ondwconv3", "_oncnorm", "_onsoftmax", "_onsigmoid"})
    if (strip(v, tag)) t.unsupported = tag;
  t.core = v;
  return t;
}

bool is_cross2d_core(const std::string& c) {
  for (const char* k : {"v01", "v02", "v03", "v04", "v05", "v2", "v3"})
    if (c == k) return true;
  return false;
}

ops::CrossScanImpl impl_of(SS2DScan s) {
  return s == SS2DScan::copy ? ops::CrossScanImpl::Copy : ops::CrossScanImpl::Strided;
}

}  // namespace

Tensor nchw_to_nhwc(const Tensor& x) {
  check_defined(x, "nchw_to_nhwc: x");
  MAMBA_CHECK(x.ndim() == 4, "nchw_to_nhwc: x must be (B, C, H, W), got ", x.shape_str());
  const int64_t B = x.dim(0), C = x.dim(1), H = x.dim(2), W = x.dim(3);
  return ops::transpose_last2(x.reshape({B, C, H * W})).reshape({B, H, W, C});
}

Tensor nhwc_to_nchw(const Tensor& x) {
  check_defined(x, "nhwc_to_nchw: x");
  MAMBA_CHECK(x.ndim() == 4, "nhwc_to_nchw: x must be (B, H, W, C), got ", x.shape_str());
  const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  return ops::transpose_last2(x.reshape({B, H * W, C})).reshape({B, C, H, W});
}

// ---- config -------------------------------------------------------------------------------------

void SS2DConfig::validate() const {
  MAMBA_CHECK(d_model >= 1, "SS2DConfig: d_model must be >= 1, got ", d_model);
  MAMBA_CHECK(d_state >= 1, "SS2DConfig: d_state must be >= 1, got ", d_state);
  MAMBA_CHECK(std::isfinite(ssm_ratio) && ssm_ratio > 0, "SS2DConfig: ssm_ratio must be > 0, got ",
              ssm_ratio);
  MAMBA_CHECK(d_inner() >= 1, "SS2DConfig: ssm_ratio * d_model must be >= 1 (d_inner), got ",
              ssm_ratio, " * ", d_model);
  MAMBA_CHECK(dt_rank == -1 || dt_rank >= 1,
              "SS2DConfig: dt_rank must be >= 1 or -1 (\"auto\"), got ", dt_rank);
  MAMBA_CHECK(act_layer == "silu", "SS2DConfig: act_layer must be \"silu\" (nn.SiLU), got \"",
              act_layer, "\"");
  MAMBA_CHECK(d_conv < 2 || d_conv % 2 == 1,
              "SS2DConfig: d_conv must be odd (padding (d_conv-1)/2 keeps H x W) or < 2 (no conv), "
              "got ",
              d_conv);
  MAMBA_CHECK(dropout == 0.0, "SS2DConfig: dropout must be 0 (not implemented), got ", dropout);
  MAMBA_CHECK(std::isfinite(dt_min) && dt_min > 0, "SS2DConfig: dt_min must be > 0, got ", dt_min);
  MAMBA_CHECK(std::isfinite(dt_max) && dt_max >= dt_min, "SS2DConfig: dt_max must be >= dt_min (",
              dt_min, "), got ", dt_max);
  MAMBA_CHECK(dt_init == "random" || dt_init == "constant",
              "SS2DConfig: dt_init must be \"random\" or \"constant\", got \"", dt_init, "\"");
  MAMBA_CHECK(std::isfinite(dt_scale), "SS2DConfig: dt_scale must be finite, got ", dt_scale);
  MAMBA_CHECK(std::isfinite(dt_init_floor) && dt_init_floor >= 0,
              "SS2DConfig: dt_init_floor must be >= 0, got ", dt_init_floor);
  MAMBA_CHECK(initialize == "v0" || initialize == "v1" || initialize == "v2",
              "SS2DConfig: initialize must be \"v0\", \"v1\" or \"v2\", got \"", initialize, "\"");
  const ForwardType t = parse_forward_type(forward_type);
  MAMBA_CHECK(t.unsupported.empty(), "SS2DConfig: forward_type \"", forward_type,
              "\": the out_norm variant ", t.unsupported,
              " is not implemented (LayerNorm or _onnone)");
  MAMBA_CHECK(t.v0 || is_cross2d_core(t.core), "SS2DConfig: forward_type \"", forward_type,
              "\" is not supported (\"v0\", or v01..v05 / v2 / v3 with the postfixes _noz, "
              "_nozact, _oact, _no32, _onnone)");
  if (t.v0) {
    // VMamba's __initv0__ hard-codes these (and asserts channel_first is false).
    MAMBA_CHECK(!channel_first, "SS2DConfig: forward_type \"v0\" needs channel_first = false");
    MAMBA_CHECK(d_conv == 3, "SS2DConfig: forward_type \"v0\" fixes d_conv = 3, got ", d_conv);
    MAMBA_CHECK(conv_bias, "SS2DConfig: forward_type \"v0\" fixes conv_bias = true");
    MAMBA_CHECK(!bias, "SS2DConfig: forward_type \"v0\" fixes bias = false");
    MAMBA_CHECK(initialize == "v0", "SS2DConfig: forward_type \"v0\" fixes initialize = \"v0\"");
  }
}

int64_t SS2DConfig::d_inner() const {
  return static_cast<int64_t>(ssm_ratio * static_cast<double>(d_model));
}
int64_t SS2DConfig::rank() const { return dt_rank == -1 ? (d_model + 15) / 16 : dt_rank; }
bool SS2DConfig::is_v0() const { return parse_forward_type(forward_type).v0; }
bool SS2DConfig::has_z() const { return !parse_forward_type(forward_type).noz; }
bool SS2DConfig::z_act() const { return !parse_forward_type(forward_type).nozact; }
bool SS2DConfig::out_act() const { return parse_forward_type(forward_type).oact; }
bool SS2DConfig::has_out_norm() const { return !parse_forward_type(forward_type).onnone; }

// ---- construction -------------------------------------------------------------------------------

SS2D::SS2D(const Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  const int64_t D = d_inner_ = cfg_.d_inner();
  const int64_t N = d_state_ = cfg_.d_state;
  const int64_t R = dt_rank_ = cfg_.rank();
  const int64_t dm = cfg_.d_model, kc = cfg_.d_conv;
  const bool conv = kc > 1;
  const int64_t d_proj = cfg_.has_z() ? 2 * D : D;
  // Declared in VMamba's state_dict order: the module's own parameters, then its submodules in
  // registration order (v0: in_proj, conv2d, out_norm, out_proj; v2: out_norm first).
  xproj_w_ = &params_.add("x_proj_weight", {K, R + 2 * N, D});
  A_logs_ = &params_.add("A_logs", {K * D, N}, true);
  Ds_ = &params_.add("Ds", {K * D}, true);
  dt_w_ = &params_.add("dt_projs_weight", {K, D, R});
  dt_b_ = &params_.add("dt_projs_bias", {K, D}, true);
  auto add_norm = [&] {
    if (!cfg_.has_out_norm()) return;
    norm_w_ = &params_.add("out_norm.weight", {D}, true);
    norm_b_ = &params_.add("out_norm.bias", {D}, true);
  };
  if (!cfg_.is_v0()) add_norm();
  in_w_ = &params_.add_matrix("in_proj.weight", {d_proj, dm});
  if (cfg_.bias) in_b_ = &params_.add("in_proj.bias", {d_proj}, true);
  if (conv) {
    conv_w_ = &params_.add("conv2d.weight", {D, 1, kc, kc});
    if (cfg_.conv_bias) conv_b_ = &params_.add("conv2d.bias", {D}, true);
  }
  if (cfg_.is_v0()) add_norm();
  out_w_ = &params_.add_matrix("out_proj.weight", {dm, D});
  if (cfg_.bias) out_b_ = &params_.add("out_proj.bias", {dm}, true);

  // VMamba's init: nn.Linear / nn.Conv2d defaults uniform(+-1/sqrt(fan_in)); x_proj_weight
  // stacks K such Linear(D, R + 2N) weights; dt/A/D by `initialize`; LayerNorm 1 / 0.
  Rng rng(seed);
  auto uni = [&](Param* p, double fan_in) {
    const double b = 1.0 / std::sqrt(fan_in);
    rng.fill_uniform(p->value.f32(), -b, b);
  };
  uni(in_w_, static_cast<double>(dm));
  if (in_b_) uni(in_b_, static_cast<double>(dm));
  if (conv_w_) uni(conv_w_, static_cast<double>(kc * kc));
  if (conv_b_) uni(conv_b_, static_cast<double>(kc * kc));
  uni(xproj_w_, static_cast<double>(D));
  Tensor& A_logs = A_logs_->value.f32();
  Tensor& dtw = dt_w_->value.f32();
  Tensor& dtb = dt_b_->value.f32();
  if (cfg_.initialize == "v0") {
    for (int64_t k = 0; k < K; ++k) {
      Tensor wk = dtw.select(k);
      nn_init::dt_proj_weight(rng, wk, R, cfg_.dt_scale, cfg_.dt_init);
      nn_init::dt_bias(rng, dtb.data() + k * D, D, cfg_.dt_min, cfg_.dt_max, cfg_.dt_init_floor);
    }
    nn_init::a_log_s4d(A_logs.data(), K * D, N);
  } else if (cfg_.initialize == "v1") {
    rng.fill_normal(A_logs);
    rng.fill_normal(dtw, 0, 0.1);
    rng.fill_normal(dtb, 0, 0.1);
  } else {  // v2
    A_logs.fill(0.f);
    rng.fill_uniform(dtw, 0, 0.1);
    rng.fill_uniform(dtb, 0, 0.1);
  }
  Ds_->value.f32().fill(1.f);
  if (norm_w_) norm_w_->value.f32().fill(1.f);
  uni(out_w_, static_cast<double>(D));
  if (out_b_) uni(out_b_, static_cast<double>(D));
}

// ---- forward ------------------------------------------------------------------------------------

Tensor SS2D::forward(const Tensor& x, Saved* saved) const {
  if (!cfg_.channel_first) return forward_cl(x, saved);
  check_defined(x, "SS2D::forward: x");
  MAMBA_CHECK(x.ndim() == 4, "SS2D::forward: x must be (B, d_model=", cfg_.d_model,
              ", H, W) (channel_first), got ", x.shape_str());
  check_shape(x, "SS2D::forward: x", {-1, cfg_.d_model, -1, -1});
  return nhwc_to_nchw(forward_cl(nchw_to_nhwc(x), saved));
}

Tensor SS2D::backward(const Saved& s, const Tensor& dy) {
  if (!cfg_.channel_first) return backward_cl(s, dy);
  check_defined(s.hidden, "SS2D::backward: saved.hidden (forward called without saved?)");
  const int64_t B = s.hidden.dim(0), H = s.hidden.dim(1), W = s.hidden.dim(2);
  check_shape(dy, "SS2D::backward: dy", {B, cfg_.d_model, H, W});
  return nhwc_to_nchw(backward_cl(s, nchw_to_nhwc(dy)));
}

Tensor SS2D::forward_cl(const Tensor& hidden, Saved* saved) const {
  const int64_t dm = cfg_.d_model, D = d_inner_, N = d_state_, R = dt_rank_, E = R + 2 * N;
  check_defined(hidden, "SS2D::forward: x");
  MAMBA_CHECK(hidden.ndim() == 4, "SS2D::forward: x must be (B, H, W, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, "SS2D::forward: x", {-1, -1, -1, dm});
  const int64_t B = hidden.dim(0), H = hidden.dim(1), W = hidden.dim(2);
  MAMBA_CHECK(B >= 1 && H >= 1 && W >= 1, "SS2D::forward: x needs B, H, W >= 1, got ",
              hidden.shape_str());
  if (saved) params_.check_f32("SS2D::forward");
  const bool tr = trace::enabled();
  const Tensor& in_b = optional_f32(in_b_);

  // in_proj (Linear2d in channel-first mode: the same 1x1 product)
  Tensor x = Tensor::empty({B, H, W, D}), z, zs;
  ops::linear_into(hidden, in_w_->value.rows(0, D), in_b.defined() ? in_b.narrow(0, D) : Tensor(),
                   x);
  if (cfg_.has_z()) {
    z = Tensor::empty({B, H, W, D});
    ops::linear_into(hidden, in_w_->value.rows(D, D), in_b.defined() ? in_b.narrow(D, D) : Tensor(),
                     z);
    zs = cfg_.z_act() ? ops::silu(z) : z;
  }
  if (tr) trace::op("in_proj", {hidden.shape()}, {{B, H, W, cfg_.has_z() ? 2 * D : D}});

  // depthwise conv2d + SiLU
  Tensor xc = x;
  if (conv_w_) {
    const int64_t kc = cfg_.d_conv;
    xc = ops::dwconv2d_fwd(x, f32(conv_w_).reshape({D, kc, kc}), optional_f32(conv_b_));
    if (tr) trace::op("conv2d", {x.shape()}, {xc.shape()});
  }
  Tensor u = ops::silu(xc);  // (B, H, W, D)

  // x_proj of the four directions as one GEMM over the pixels: (B, H, W, K, R + 2N)
  const Weight wx(f32(xproj_w_).reshape({K * E, D}));
  Tensor x_dbl = ops::linear(u, wx).reshape({B, H, W, K, E});
  if (tr) trace::op("x_proj", {u.shape()}, {x_dbl.shape()});
  // dt_projs: direction k's dt_r columns -> its delta columns, views both
  Tensor delta = Tensor::empty({B, H, W, K, D});
  {
    const Tensor xd2 = x_dbl.reshape({B * H * W, K * E}), dl2 = delta.reshape({B * H * W, K * D});
    for (int64_t k = 0; k < K; ++k)
      ops::linear_into(xd2.cols(k * E, R), Weight(f32(dt_w_).select(k)), Tensor(),
                       dl2.cols(k * D, D));
  }
  if (tr) trace::op("dt_projs", {{B, H, W, K, R}}, {delta.shape()});

  ops::CrossScanArgs a;
  a.u = u;
  a.delta = delta;
  a.x_dbl = x_dbl;
  a.A = ops::neg_exp(f32(A_logs_));
  a.Ds = f32(Ds_);
  a.delta_bias = f32(dt_b_).reshape({K * D});
  a.dt_rank = R;
  a.delta_softplus = true;
  Tensor y = ops::cross_scan_fwd(a, impl_of(scan_));  // (B, H, W, D)
  if (tr) trace::op("cross_scan(4 directions)+merge", {u.shape(), delta.shape()}, {y.shape()});

  Tensor yn = y;
  if (norm_w_) {
    yn = ops::layer_norm_fwd(y, f32(norm_w_), f32(norm_b_), kNormEps);
    if (tr) trace::op("out_norm", {y.shape()}, {yn.shape()});
  }
  Tensor yo = cfg_.out_act() ? ops::gelu(yn) : yn;
  Tensor yg = cfg_.has_z() ? ops::mul(yo, zs) : yo;
  Tensor out = ops::linear(yg, out_w_->value, optional_f32(out_b_));  // (B, H, W, d_model)
  if (tr) trace::op("out_proj", {yg.shape()}, {out.shape()});

  if (saved) {
    saved->hidden = hidden;
    saved->x = x;
    saved->z = z;
    saved->zs = zs;
    saved->xc = xc;
    saved->u = u;
    saved->x_dbl = x_dbl;
    saved->delta = delta;
    saved->y = y;
    saved->yn = yn;
    saved->yo = yo;
    saved->yg = yg;
  }
  return out;
}

// ---- backward -----------------------------------------------------------------------------------

Tensor SS2D::backward_cl(const Saved& s, const Tensor& dout) {
  const int64_t dm = cfg_.d_model, D = d_inner_, N = d_state_, R = dt_rank_, E = R + 2 * N;
  params_.check_f32("SS2D::backward");
  check_defined(s.hidden, "SS2D::backward: saved.hidden (forward called without saved?)");
  const int64_t B = s.hidden.dim(0), H = s.hidden.dim(1), W = s.hidden.dim(2);
  check_shape(dout, "SS2D::backward: dy", {B, H, W, dm});
  check_shape(s.y, "SS2D::backward: saved.y", {B, H, W, D});

  Tensor dyg = ops::linear_bwd(s.yg, out_w_->value, dout, &out_w_->grad(), optional_grad(out_b_));
  Tensor dyo = dyg, dz;
  if (cfg_.has_z()) {
    dyo = ops::mul(dyg, s.zs);
    Tensor dzs = ops::mul(dyg, s.yo);
    dz = cfg_.z_act() ? ops::silu_bwd(s.z, dzs) : dzs;
  }
  Tensor dyn = cfg_.out_act() ? ops::gelu_bwd(s.yn, dyo) : dyo;
  Tensor dy = dyn;
  if (norm_w_) {
    ops::LayerNormGrads lg = ops::layer_norm_bwd(s.y, f32(norm_w_), f32(norm_b_), kNormEps, dyn);
    ops::add_into(norm_w_->grad(), lg.dweight);
    ops::add_into(norm_b_->grad(), lg.dbias);
    dy = lg.dx;
  }

  ops::CrossScanArgs a;
  a.u = s.u;
  a.delta = s.delta;
  a.x_dbl = s.x_dbl;
  a.A = ops::neg_exp(f32(A_logs_));
  a.Ds = f32(Ds_);
  a.delta_bias = f32(dt_b_).reshape({K * D});
  a.dt_rank = R;
  a.delta_softplus = true;
  ops::CrossScanGrads g = ops::cross_scan_bwd(a, dy, impl_of(scan_));
  ops::add_mul_into(A_logs_->grad(), g.dA, a.A);  // A = -exp(A_log)  =>  dA_log = dA * A
  ops::add_into(Ds_->grad(), g.dDs);
  ops::add_into(dt_b_->grad().reshape({K * D}), g.ddelta_bias);

  // dt_projs: fills the dt_r columns of dx_dbl (the kernel wrote B and C)
  {
    const Tensor xd2 = s.x_dbl.reshape({B * H * W, K * E});
    const Tensor dxd2 = g.dx_dbl.reshape({B * H * W, K * E});
    const Tensor dd2 = g.ddelta.reshape({B * H * W, K * D});
    for (int64_t k = 0; k < K; ++k) {
      Tensor gk = dt_w_->grad().select(k);
      ops::linear_bwd_into(xd2.cols(k * E, R), Weight(f32(dt_w_).select(k)), dd2.cols(k * D, D),
                           dxd2.cols(k * E, R), false, &gk, nullptr);
    }
  }
  // x_proj; u is also the scan input
  const Weight wx(f32(xproj_w_).reshape({K * E, D}));
  Tensor gwx = xproj_w_->grad().reshape({K * E, D});
  Tensor du = ops::linear_bwd(s.u, wx, g.dx_dbl.reshape({B, H, W, K * E}), &gwx, nullptr);
  ops::add_into(du, g.du);
  Tensor dxc = ops::silu_bwd(s.xc, du);

  Tensor dx = dxc;
  if (conv_w_) {
    const int64_t kc = cfg_.d_conv;
    ops::Conv2dGrads cg =
        ops::dwconv2d_bwd(s.x, f32(conv_w_).reshape({D, kc, kc}), optional_f32(conv_b_), dxc);
    ops::add_into(conv_w_->grad(), cg.dweight.reshape(conv_w_->grad().shape()));
    if (conv_b_) ops::add_into(conv_b_->grad(), cg.dbias);
    dx = cg.dx;
  }

  // in_proj: rows [0, D) produced x, rows [D, 2D) z
  Tensor dhidden = Tensor::empty({B, H, W, dm});
  Tensor gW = in_w_->grad();
  Tensor db0 = in_b_ ? in_b_->grad().narrow(0, D) : Tensor();
  Tensor gW0 = gW.narrow(0, D);
  ops::linear_bwd_into(s.hidden, in_w_->value.rows(0, D), dx, dhidden, false, &gW0,
                       in_b_ ? &db0 : nullptr);
  if (cfg_.has_z()) {
    Tensor db1 = in_b_ ? in_b_->grad().narrow(D, D) : Tensor();
    Tensor gW1 = gW.narrow(D, D);
    ops::linear_bwd_into(s.hidden, in_w_->value.rows(D, D), dz, dhidden, true, &gW1,
                         in_b_ ? &db1 : nullptr);
  }
  return dhidden;
}

void load_vmamba_params(ParamList& pl, const SafetensorsFile& f, const std::string& prefix) {
  auto linear2d = [](const std::string& n) {
    return n == "in_proj.weight" || n == "out_proj.weight" || n == "mlp.fc1.weight" ||
           n == "mlp.fc2.weight";
  };
  for (auto& p : pl.all()) {
    const std::string key = prefix + p.name;
    const Shape want = p.value.shape();
    if (want.size() == 2 && linear2d(p.name) && f.has(key) &&
        f.info(key).shape == Shape{want[0], want[1], 1, 1}) {
      p.value.assign(f.tensor(key).reshape(want));  // Linear2d stored as a 1x1 conv kernel
      continue;
    }
    f.read_into(key, p.value);  // checks the shape
  }
}

void SS2D::load(const SafetensorsFile& f, const std::string& prefix) {
  load_vmamba_params(params_, f, prefix);
}
}  // namespace mamba
