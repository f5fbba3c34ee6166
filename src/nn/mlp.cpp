// mamba_ssm's GatedMLP: forward (optionally saving what backward needs) and backward, built from
// ops only. fc1's value and gate halves are the two row blocks of fc1.weight (Weight::rows views),
// so each half is written straight into its own contiguous tensor: no copy and no split.
#include "mamba/nn/mlp.h"

#include <cmath>

#include "mamba/rng.h"
#include "mamba/trace.h"
#include "ops/act.h"
#include "ops/elementwise.h"
#include "ops/linear.h"

namespace mamba {

namespace {
// Sizes above this are refused before any arithmetic (8 * in and the rounding stay far from
// int64 overflow; no real layer comes near).
constexpr int64_t kMaxFeatures = int64_t{1} << 40;

// shape with its last dimension replaced by n
Shape with_last(Shape s, int64_t n) {
  s.back() = n;
  return s;
}
}  // namespace

// ---- config -------------------------------------------------------------------------------------

void GatedMLPConfig::validate() const {
  MAMBA_CHECK(in_features >= 1 && in_features <= kMaxFeatures,
              "GatedMLPConfig: in_features must be in [1, 2^40], got ", in_features);
  MAMBA_CHECK(hidden_features >= 0 && hidden_features <= kMaxFeatures,
              "GatedMLPConfig: hidden_features must be in [0 (default), 2^40], got ",
              hidden_features);
  MAMBA_CHECK(out_features >= 0 && out_features <= kMaxFeatures,
              "GatedMLPConfig: out_features must be in [0 (= in_features), 2^40], got ",
              out_features);
  MAMBA_CHECK(multiple_of >= 1 && multiple_of <= kMaxFeatures,
              "GatedMLPConfig: multiple_of must be in [1, 2^40], got ", multiple_of);
}

// Python: hidden = hidden_features or int(8 * in_features / 3) (the exact quotient truncated, as
// integer division gives for positive sizes); then rounded up to a multiple of multiple_of.
int64_t GatedMLPConfig::hidden() const {
  const int64_t h = hidden_features != 0 ? hidden_features : 8 * in_features / 3;
  return (h + multiple_of - 1) / multiple_of * multiple_of;
}

// ---- construction -------------------------------------------------------------------------------

GatedMLP::GatedMLP(const Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  const int64_t in = cfg_.in_features, H = hidden_ = cfg_.hidden(), out = cfg_.out();
  MAMBA_CHECK(H >= 1, "GatedMLPConfig: the hidden size must be >= 1, got ", H, " (in_features ", in,
              " gives int(8 * in / 3) = 0; set hidden_features)");
  // mamba_ssm's state_dict order.
  fc1_w_ = &params_.add_matrix("fc1.weight", {2 * H, in});
  if (cfg_.bias) fc1_b_ = &params_.add("fc1.bias", {2 * H}, true);
  fc2_w_ = &params_.add_matrix("fc2.weight", {out, H});
  if (cfg_.bias) fc2_b_ = &params_.add("fc2.bias", {out}, true);

  // nn.Linear's reset_parameters: weight and bias uniform(+-1/sqrt(fan_in)).
  Rng rng(seed);
  auto uni = [&](Param* p, int64_t fan_in) {
    const double b = 1.0 / std::sqrt(static_cast<double>(fan_in));
    rng.fill_uniform(p->value.f32(), -b, b);
  };
  uni(fc1_w_, in);
  if (fc1_b_) uni(fc1_b_, in);
  uni(fc2_w_, H);
  if (fc2_b_) uni(fc2_b_, H);
}

// ---- forward ------------------------------------------------------------------------------------

Tensor GatedMLP::forward(const Tensor& x, Saved* saved) const {
  const int64_t in = cfg_.in_features, H = hidden_;
  check_defined(x, "GatedMLP::forward: x");
  MAMBA_CHECK(x.ndim() >= 1 && x.dim(-1) == in,
              "GatedMLP::forward: x must be (..., in_features=", in, "), got ", x.shape_str());
  MAMBA_CHECK(x.numel() >= 1, "GatedMLP::forward: x is empty: ", x.shape_str());
  if (saved) params_.check_f32("GatedMLP::forward");  // "inference only" for 16-bit weights
  const bool tr = trace::enabled();
  const Tensor& b1 = optional_f32(fc1_b_);

  // fc1, its two row blocks written straight into value and gate.
  Tensor value = Tensor::empty(with_last(x.shape(), H));  // (..., H)
  Tensor gate = Tensor::empty(with_last(x.shape(), H));   // (..., H)
  ops::linear_into(x, fc1_w_->value.rows(0, H), b1.defined() ? b1.narrow(0, H) : Tensor(), value);
  ops::linear_into(x, fc1_w_->value.rows(H, H), b1.defined() ? b1.narrow(H, H) : Tensor(), gate);
  if (tr) trace::op("fc1", {x.shape()}, {with_last(x.shape(), 2 * H)});

  Tensor act = ops::silu(gate);                                    // (..., H)
  Tensor h = ops::mul(value, act);                                 // (..., H)
  Tensor y = ops::linear(h, fc2_w_->value, optional_f32(fc2_b_));  // (..., out)
  if (tr) trace::op("fc2", {h.shape()}, {y.shape()});

  if (saved) {
    saved->x = x;
    saved->value = value;
    saved->gate = gate;
    saved->act = act;
    saved->h = h;
  }
  return y;
}

// ---- backward -----------------------------------------------------------------------------------

Tensor GatedMLP::backward(const Saved& s, const Tensor& dy) {
  const int64_t in = cfg_.in_features, H = hidden_, out = cfg_.out();
  params_.check_f32("GatedMLP::backward");  // "inference only" for 16-bit weights
  check_defined(s.x, "GatedMLP::backward: saved.x (forward called without saved?)");
  MAMBA_CHECK(s.x.ndim() >= 1 && s.x.dim(-1) == in,
              "GatedMLP::backward: saved.x must be (..., in_features=", in, "), got ",
              s.x.shape_str());
  const Shape hshape = with_last(s.x.shape(), H);
  check_defined(dy, "GatedMLP::backward: dy");
  check_shape(dy, "GatedMLP::backward: dy", with_last(s.x.shape(), out));
  check_shape(s.value, "GatedMLP::backward: saved.value", hshape);
  check_shape(s.gate, "GatedMLP::backward: saved.gate", hshape);
  check_shape(s.act, "GatedMLP::backward: saved.act", hshape);
  check_shape(s.h, "GatedMLP::backward: saved.h", hshape);

  // fc2
  Tensor dh = ops::linear_bwd(s.h, fc2_w_->value, dy, &fc2_w_->grad(), optional_grad(fc2_b_));
  // h = value * silu(gate)
  Tensor dvalue = ops::mul(dh, s.act);                          // (..., H)
  Tensor dgate = ops::silu_bwd(s.gate, ops::mul(dh, s.value));  // (..., H)

  // fc1: the value half (rows [0, H) of the weight) got dvalue, the gate half dgate.
  Tensor dx = Tensor::empty(s.x.shape());  // (..., in)
  Tensor gW0 = fc1_w_->grad().narrow(0, H), gW1 = fc1_w_->grad().narrow(H, H);
  Tensor db0 = fc1_b_ ? fc1_b_->grad().narrow(0, H) : Tensor(),
         db1 = fc1_b_ ? fc1_b_->grad().narrow(H, H) : Tensor();
  ops::linear_bwd_into(s.x, fc1_w_->value.rows(0, H), dvalue, dx, false, &gW0,
                       fc1_b_ ? &db0 : nullptr);
  ops::linear_bwd_into(s.x, fc1_w_->value.rows(H, H), dgate, dx, true, &gW1,
                       fc1_b_ ? &db1 : nullptr);
  return dx;
}

}  // namespace mamba
