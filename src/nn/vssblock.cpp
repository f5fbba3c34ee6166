// VMamba's VSSBlock: residual SS2D branch and residual MLP branch, forward and backward, from ops.
#include "mamba/nn/vssblock.h"

#include <cmath>

#include "mamba/rng.h"
#include "mamba/safetensors.h"
#include "mamba/trace.h"
#include "ops/elementwise.h"
#include "ops/gelu.h"
#include "ops/layernorm.h"
#include "ops/linear.h"

namespace mamba {

namespace {
constexpr float kNormEps = 1e-5f;
}

void VSSBlockConfig::validate() const {
  MAMBA_CHECK(hidden_dim >= 1, "VSSBlockConfig: hidden_dim must be >= 1, got ", hidden_dim);
  MAMBA_CHECK(drop_path == 0.0,
              "VSSBlockConfig: drop_path must be 0 (stochastic depth is not "
              "implemented), got ",
              drop_path);
  MAMBA_CHECK(std::isfinite(ssm_ratio) && ssm_ratio >= 0,
              "VSSBlockConfig: ssm_ratio must be >= 0, got ", ssm_ratio);
  MAMBA_CHECK(std::isfinite(mlp_ratio) && mlp_ratio >= 0,
              "VSSBlockConfig: mlp_ratio must be >= 0, got ", mlp_ratio);
  MAMBA_CHECK(mlp_act_layer == "gelu", "VSSBlockConfig: mlp_act_layer must be \"gelu\", got \"",
              mlp_act_layer, "\"");
  MAMBA_CHECK(mlp_drop_rate == 0.0, "VSSBlockConfig: mlp_drop_rate must be 0, got ", mlp_drop_rate);
  MAMBA_CHECK(!gmlp, "VSSBlockConfig: gmlp = true is not implemented");
  MAMBA_CHECK(!mlp_branch() || mlp_hidden() >= 1,
              "VSSBlockConfig: int(hidden_dim * mlp_ratio) must be >= 1, got ", mlp_hidden());
  if (ssm_branch()) {
    try {
      ss2d().validate();
    } catch (const Error& e) {
      throw Error(str("VSSBlockConfig (the SS2D's ssm_* / forward_type arguments): ", e.what()));
    }
  }
}

int64_t VSSBlockConfig::mlp_hidden() const {
  return static_cast<int64_t>(static_cast<double>(hidden_dim) * mlp_ratio);
}

SS2DConfig VSSBlockConfig::ss2d() const {
  SS2DConfig c;
  c.d_model = hidden_dim;
  c.d_state = ssm_d_state;
  c.ssm_ratio = ssm_ratio;
  c.dt_rank = ssm_dt_rank;
  c.act_layer = ssm_act_layer;
  c.d_conv = ssm_conv;
  c.conv_bias = ssm_conv_bias;
  c.dropout = ssm_drop_rate;
  c.initialize = ssm_init;
  c.forward_type = forward_type;
  c.channel_first = channel_first;
  return c;
}

VSSBlock::VSSBlock(const Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  const int64_t C = cfg_.hidden_dim;
  if (cfg_.ssm_branch()) {
    n1w_ = &own_.add("norm.weight", {C}, true);
    n1b_ = &own_.add("norm.bias", {C}, true);
    n1w_->value.f32().fill(1.f);
    op_.emplace(cfg_.ss2d(), seed);
  }
  if (cfg_.mlp_branch()) {
    const int64_t Hd = cfg_.mlp_hidden();
    n2w_ = &own_.add("norm2.weight", {C}, true);
    n2b_ = &own_.add("norm2.bias", {C}, true);
    n2w_->value.f32().fill(1.f);
    fc1w_ = &own_.add_matrix("mlp.fc1.weight", {Hd, C});
    fc1b_ = &own_.add("mlp.fc1.bias", {Hd}, true);
    fc2w_ = &own_.add_matrix("mlp.fc2.weight", {C, Hd});
    fc2b_ = &own_.add("mlp.fc2.bias", {C}, true);
    Rng rng(seed ^ 0x9E3779B97F4A7C15ull);
    auto uni = [&](Param* p, double fan_in) {
      const double b = 1.0 / std::sqrt(fan_in);
      rng.fill_uniform(p->value.f32(), -b, b);
    };
    uni(fc1w_, static_cast<double>(C));
    uni(fc1b_, static_cast<double>(C));
    uni(fc2w_, static_cast<double>(Hd));
    uni(fc2b_, static_cast<double>(Hd));
  }
}

std::vector<std::pair<std::string, Param*>> VSSBlock::named_params() {
  std::vector<std::pair<std::string, Param*>> v;
  for (auto& p : own_.all()) {
    if (p.name.rfind("norm.", 0) == 0) v.emplace_back(p.name, &p);
  }
  if (op_)
    for (auto& p : op_->params().all()) v.emplace_back("op." + p.name, &p);
  for (auto& p : own_.all())
    if (p.name.rfind("norm.", 0) != 0) v.emplace_back(p.name, &p);
  return v;
}

std::vector<std::pair<std::string, const Param*>> VSSBlock::named_params() const {
  std::vector<std::pair<std::string, const Param*>> v;
  for (auto& [n, p] : const_cast<VSSBlock*>(this)->named_params()) v.emplace_back(n, p);
  return v;
}

int64_t VSSBlock::param_count() const { return own_.count() + (op_ ? op_->params().count() : 0); }

void VSSBlock::zero_grad() {
  own_.zero_grad();
  if (op_) op_->params().zero_grad();
}

void VSSBlock::load(const SafetensorsFile& f, const std::string& prefix) {
  load_vmamba_params(own_, f, prefix);
  if (op_) op_->load(f, prefix + "op.");
}

Tensor VSSBlock::forward(const Tensor& x, Saved* saved) const {
  if (!cfg_.channel_first) return forward_cl(x, saved);
  check_defined(x, "VSSBlock::forward: x");
  MAMBA_CHECK(x.ndim() == 4, "VSSBlock::forward: x must be (B, C=", cfg_.hidden_dim,
              ", H, W) (channel_first), got ", x.shape_str());
  check_shape(x, "VSSBlock::forward: x", {-1, cfg_.hidden_dim, -1, -1});
  return nhwc_to_nchw(forward_cl(nchw_to_nhwc(x), saved));
}

Tensor VSSBlock::backward(const Saved& s, const Tensor& dy) {
  if (!cfg_.channel_first) return backward_cl(s, dy);
  check_defined(s.x, "VSSBlock::backward: saved.x (forward called without saved?)");
  check_shape(dy, "VSSBlock::backward: dy", {s.x.dim(0), cfg_.hidden_dim, s.x.dim(1), s.x.dim(2)});
  return nhwc_to_nchw(backward_cl(s, nchw_to_nhwc(dy)));
}

Tensor VSSBlock::forward_cl(const Tensor& x, Saved* saved) const {
  const int64_t C = cfg_.hidden_dim;
  check_defined(x, "VSSBlock::forward: x");
  MAMBA_CHECK(x.ndim() == 4, "VSSBlock::forward: x must be (B, H, W, C=", C, "), got ",
              x.shape_str());
  check_shape(x, "VSSBlock::forward: x", {-1, -1, -1, C});
  const bool tr = trace::enabled();
  Tensor x1 = x;
  if (op_) {
    trace::Scope sc("op.");
    if (cfg_.post_norm) {
      Tensor o = op_->forward_cl(x, saved ? &saved->op : nullptr);
      Tensor n = ops::layer_norm_fwd(o, n1w_->value.f32(), n1b_->value.f32(), kNormEps);
      x1 = x.clone();
      ops::add_into(x1, n);
      if (saved) saved->n1 = o;
    } else {
      Tensor n = ops::layer_norm_fwd(x, n1w_->value.f32(), n1b_->value.f32(), kNormEps);
      if (tr) trace::op("norm", {x.shape()}, {n.shape()});
      Tensor o = op_->forward_cl(n, saved ? &saved->op : nullptr);
      x1 = x.clone();
      ops::add_into(x1, o);
      if (saved) saved->n1 = n;
    }
  }
  Tensor out = x1;
  if (fc1w_) {
    const Tensor& in =
        cfg_.post_norm ? x1
                       : ops::layer_norm_fwd(x1, n2w_->value.f32(), n2b_->value.f32(), kNormEps);
    if (tr && !cfg_.post_norm) trace::op("norm2", {x1.shape()}, {in.shape()});
    Tensor h = ops::linear(in, fc1w_->value, fc1b_->value.f32());
    Tensor a = ops::gelu(h);
    Tensor m = ops::linear(a, fc2w_->value, fc2b_->value.f32());
    if (tr) trace::op("mlp.fc1+gelu+fc2", {in.shape()}, {h.shape(), m.shape()});
    out = x1.clone();
    if (cfg_.post_norm) {
      ops::add_into(out, ops::layer_norm_fwd(m, n2w_->value.f32(), n2b_->value.f32(), kNormEps));
      if (saved) saved->n2 = m;
    } else {
      ops::add_into(out, m);
      if (saved) saved->n2 = in;
    }
    if (saved) saved->h = h, saved->a = a;
  }
  if (saved) saved->x = x, saved->x1 = x1;
  return out;
}

Tensor VSSBlock::backward_cl(const Saved& s, const Tensor& dy) {
  check_defined(s.x, "VSSBlock::backward: saved.x (forward called without saved?)");
  check_shape(dy, "VSSBlock::backward: dy", s.x.shape());
  own_.check_f32("VSSBlock::backward");
  Tensor dx1 = dy.clone();  // the residual path
  if (fc1w_) {
    Tensor dm = dy;
    if (cfg_.post_norm) {
      ops::LayerNormGrads g =
          ops::layer_norm_bwd(s.n2, n2w_->value.f32(), n2b_->value.f32(), kNormEps, dy);
      ops::add_into(n2w_->grad(), g.dweight);
      ops::add_into(n2b_->grad(), g.dbias);
      dm = g.dx;
    }
    Tensor da = ops::linear_bwd(s.a, fc2w_->value, dm, &fc2w_->grad(), &fc2b_->grad());
    Tensor dh = ops::gelu_bwd(s.h, da);
    const Tensor& in = cfg_.post_norm ? s.x1 : s.n2;
    Tensor din = ops::linear_bwd(in, fc1w_->value, dh, &fc1w_->grad(), &fc1b_->grad());
    if (cfg_.post_norm) {
      ops::add_into(dx1, din);
    } else {
      ops::LayerNormGrads g =
          ops::layer_norm_bwd(s.x1, n2w_->value.f32(), n2b_->value.f32(), kNormEps, din);
      ops::add_into(n2w_->grad(), g.dweight);
      ops::add_into(n2b_->grad(), g.dbias);
      ops::add_into(dx1, g.dx);
    }
  }
  Tensor dx = dx1;
  if (op_) {
    dx = dx1.clone();
    if (cfg_.post_norm) {
      ops::LayerNormGrads g =
          ops::layer_norm_bwd(s.n1, n1w_->value.f32(), n1b_->value.f32(), kNormEps, dx1);
      ops::add_into(n1w_->grad(), g.dweight);
      ops::add_into(n1b_->grad(), g.dbias);
      ops::add_into(dx, op_->backward_cl(s.op, g.dx));
    } else {
      Tensor dn = op_->backward_cl(s.op, dx1);
      ops::LayerNormGrads g =
          ops::layer_norm_bwd(s.x, n1w_->value.f32(), n1b_->value.f32(), kNormEps, dn);
      ops::add_into(n1w_->grad(), g.dweight);
      ops::add_into(n1b_->grad(), g.dbias);
      ops::add_into(dx, g.dx);
    }
  }
  return dx;
}

}  // namespace mamba
