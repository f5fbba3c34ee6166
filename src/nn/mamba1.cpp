// The Mamba-1 mixer layer: forward (with saved activations and prefill state), backward, step.
// Semantics of mamba_ssm.modules.mamba_simple.Mamba (slow path and step()); channel-last.
#include "mamba/nn/mamba1.h"

#include <algorithm>
#include <cmath>

#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "mamba/trace.h"
#include "nn/ssm_init.h"
#include "ops/conv1d.h"
#include "ops/elementwise.h"
#include "ops/half_matmul.h"
#include "ops/linear.h"
#include "ops/selective_scan.h"

namespace mamba {

// ---- config -------------------------------------------------------------------------------------

void Mamba1Config::validate() const {
  MAMBA_CHECK(d_model >= 1, "Mamba1Config: d_model must be >= 1, got ", d_model);
  MAMBA_CHECK(d_state >= 1, "Mamba1Config: d_state must be >= 1, got ", d_state);
  MAMBA_CHECK(d_conv >= 1, "Mamba1Config: d_conv must be >= 1, got ", d_conv);
  MAMBA_CHECK(std::isfinite(expand) && expand > 0, "Mamba1Config: expand must be > 0, got ",
              expand);
  MAMBA_CHECK(d_inner() >= 1, "Mamba1Config: expand * d_model must be >= 1 (d_inner), got expand ",
              expand, " * d_model ", d_model);
  MAMBA_CHECK(dt_rank == -1 || dt_rank >= 1,
              "Mamba1Config: dt_rank must be >= 1 or -1 (\"auto\"), got ", dt_rank);
  MAMBA_CHECK(std::isfinite(dt_min) && dt_min > 0, "Mamba1Config: dt_min must be > 0, got ",
              dt_min);
  MAMBA_CHECK(std::isfinite(dt_max) && dt_max >= dt_min, "Mamba1Config: dt_max must be >= dt_min (",
              dt_min, "), got ", dt_max);
  MAMBA_CHECK(dt_init == "random" || dt_init == "constant",
              "Mamba1Config: dt_init must be \"random\" or \"constant\", got \"", dt_init, "\"");
  MAMBA_CHECK(std::isfinite(dt_scale), "Mamba1Config: dt_scale must be finite, got ", dt_scale);
  MAMBA_CHECK(std::isfinite(dt_init_floor) && dt_init_floor >= 0,
              "Mamba1Config: dt_init_floor must be >= 0, got ", dt_init_floor);
}

// Python's int(expand * d_model) truncates.
int64_t Mamba1Config::d_inner() const {
  return static_cast<int64_t>(expand * static_cast<double>(d_model));
}

int64_t Mamba1Config::rank() const { return dt_rank == -1 ? (d_model + 15) / 16 : dt_rank; }

// ---- construction -------------------------------------------------------------------------------

Mamba1::Mamba1(const Config& cfg, uint64_t seed) : cfg_(cfg) {
  cfg_.validate();
  const int64_t D = d_inner_ = cfg_.d_inner();
  const int64_t N = d_state_ = cfg_.d_state;
  const int64_t K = d_conv_ = cfg_.d_conv;
  const int64_t R = dt_rank_ = cfg_.rank();
  const int64_t dm = cfg_.d_model;
  // Declared in mamba_ssm's state_dict order.
  A_log_ = &params_.add("A_log", {D, N}, true);
  Dp_ = &params_.add("D", {D}, true);
  in_w_ = &params_.add_matrix("in_proj.weight", {2 * D, dm});
  if (cfg_.bias) in_b_ = &params_.add("in_proj.bias", {2 * D}, true);
  conv_w_ = &params_.add("conv1d.weight", {D, 1, K});
  if (cfg_.conv_bias) conv_b_ = &params_.add("conv1d.bias", {D}, true);
  if (cfg_.selective) {
    xproj_w_ = &params_.add_matrix("x_proj.weight", {R + 2 * N, D});
    dt_w_ = &params_.add_matrix("dt_proj.weight", {D, R});
  } else {
    B_ssm_ = &params_.add("B_ssm", {D, N}, true);
    C_ssm_ = &params_.add("C_ssm", {D, N}, true);
  }
  dt_b_ = &params_.add("dt_proj.bias", {D}, true);
  out_w_ = &params_.add_matrix("out_proj.weight", {dm, D});
  if (cfg_.bias) out_b_ = &params_.add("out_proj.bias", {dm}, true);

  // mamba_ssm's init: nn.Linear / nn.Conv1d defaults are uniform(+-1/sqrt(fan_in)) for weight
  // and bias (the depthwise conv's fan_in is K); dt_proj is re-initialised, A is S4D-real, D = 1.
  Rng rng(seed);
  auto uni = [&](Param* p, double fan_in) {
    const double b = 1.0 / std::sqrt(fan_in);
    rng.fill_uniform(p->value.f32(), -b, b);
  };
  uni(in_w_, static_cast<double>(dm));
  if (in_b_) uni(in_b_, static_cast<double>(dm));
  uni(conv_w_, static_cast<double>(K));
  if (conv_b_) uni(conv_b_, static_cast<double>(K));
  if (cfg_.selective) {
    uni(xproj_w_, static_cast<double>(D));
    nn_init::dt_proj_weight(rng, dt_w_->value.f32(), R, cfg_.dt_scale, cfg_.dt_init);
  }
  nn_init::dt_bias(rng, dt_b_->value.f32().data(), D, cfg_.dt_min, cfg_.dt_max, cfg_.dt_init_floor);
  nn_init::a_log_s4d(A_log_->value.f32().data(), D, N);
  Dp_->value.f32().fill(1.f);
  uni(out_w_, static_cast<double>(D));
  if (out_b_) uni(out_b_, static_cast<double>(D));
  if (!cfg_.selective) {
    // The ablation's constant B and C, O(1) as S4D's (B = 1, C ~ N(0, 1)): uniform(-1, 1).
    rng.fill_uniform(B_ssm_->value.f32(), -1.0, 1.0);
    rng.fill_uniform(C_ssm_->value.f32(), -1.0, 1.0);
  }
}

Tensor Mamba1::A() const {
  return ops::neg_exp_fast(f32(A_log_));
}  // vectorised: every decode step

Mamba1State Mamba1::new_state(int64_t batch) const {
  MAMBA_CHECK(batch >= 1, "Mamba1::new_state: batch must be >= 1, got ", batch);
  return {Tensor::zeros({batch, d_inner_, d_conv_}), Tensor::zeros({batch, d_inner_, d_state_})};
}

void Mamba1::check_state(const Mamba1State& s, int64_t batch) const {
  check_shape(s.conv_state, "Mamba1 state: conv_state", {batch, d_inner_, d_conv_});
  check_shape(s.ssm_state, "Mamba1 state: ssm_state", {batch, d_inner_, d_state_});
}

// ---- forward ------------------------------------------------------------------------------------

void Mamba1::check_input(const Tensor& hidden, const char* what) const {
  const int64_t dm = cfg_.d_model;
  check_defined(hidden, str(what, ": hidden").c_str());
  MAMBA_CHECK(hidden.ndim() == 3, what, ": hidden must be (B, L, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, str(what, ": hidden").c_str(), {-1, -1, dm});
  MAMBA_CHECK(hidden.dim(0) >= 1 && hidden.dim(1) >= 1, what,
              ": hidden needs B >= 1 and L >= 1, got ", hidden.shape_str());
}

Tensor Mamba1::forward(const Tensor& hidden, Saved* saved, State* state) const {
  check_input(hidden, "Mamba1::forward");
  if (saved) params_.check_f32("Mamba1::forward");  // "inference only" for 16-bit weights
  return run(hidden, saved, nullptr, state);
}

Tensor Mamba1::prefill(const Tensor& hidden, State& state) const {
  check_input(hidden, "Mamba1::prefill");
  check_state(state, hidden.dim(0));
  return run(hidden, nullptr, &state, &state);
}

Tensor Mamba1::run(const Tensor& hidden, Saved* saved, const State* init, State* state) const {
  const int64_t D = d_inner_, N = d_state_, K = d_conv_, R = dt_rank_;
  const int64_t B = hidden.dim(0), L = hidden.dim(1);
  const bool tr = trace::enabled();
  const Tensor& in_b = optional_f32(in_b_);

  // in_proj, written straight into the x and z halves (the two row blocks of in_proj.weight).
  Tensor x = Tensor::empty({B, L, D});  // (B, L, D)
  Tensor z = Tensor::empty({B, L, D});  // (B, L, D)
  ops::linear_into(hidden, in_w_->value.rows(0, D), in_b.defined() ? in_b.narrow(0, D) : Tensor(),
                   x);
  ops::linear_into(hidden, in_w_->value.rows(D, D), in_b.defined() ? in_b.narrow(D, D) : Tensor(),
                   z);
  if (tr) trace::op("in_proj", {hidden.shape()}, {{B, L, 2 * D}});

  // causal depthwise conv + SiLU
  const Tensor conv_w2 = f32(conv_w_).reshape({D, K});
  Tensor xc = ops::causal_conv1d_fwd(x, conv_w2, optional_f32(conv_b_), true, false,
                                     init ? init->conv_state : Tensor());  // (B, L, D)
  if (tr) trace::op("conv1d", {x.shape()}, {xc.shape()});

  Tensor x_dbl, Bm, Cm;  // selective only
  // (B, L, D): written by dt_proj when selective, 0 otherwise
  Tensor delta = cfg_.selective ? Tensor::empty({B, L, D}) : Tensor::zeros({B, L, D});
  if (cfg_.selective) {
    // x_proj -> [dt_low | B | C]
    x_dbl = ops::linear(xc, xproj_w_->value);  // (B, L, R + 2N)
    if (tr) trace::op("x_proj", {xc.shape()}, {x_dbl.shape()});

    // dt_proj.weight on the dt_low columns (a view, no copy); the bias goes to the scan.
    ops::linear_into(x_dbl.cols(0, R), dt_w_->value, Tensor(), delta);
    if (tr) trace::op("dt_proj", {{B, L, R}}, {delta.shape()});

    Bm = x_dbl.cols(R, N).contiguous();      // (B, L, N): the scan reads contiguous B, C
    Cm = x_dbl.cols(R + N, N).contiguous();  // (B, L, N)
  }

  ops::ScanArgs args;
  args.u = xc;
  args.delta = delta;
  args.A = A();
  args.B = Bm;
  args.C = Cm;
  args.D = f32(Dp_);
  args.z = z;
  args.delta_bias = f32(dt_b_);
  args.delta_softplus = true;
  if (init) args.initial_state = init->ssm_state;
  if (!cfg_.selective) args.B = f32(B_ssm_), args.C = f32(C_ssm_);  // const (D, N): time-invariant
  Tensor last;
  Tensor y = ops::selective_scan_fwd(args, state ? &last : nullptr);  // (B, L, D)
  if (tr)
    trace::op(
        "selective_scan",
        {xc.shape(), delta.shape(), args.A.shape(), args.B.shape(), args.C.shape(), z.shape()},
        {y.shape()});

  Tensor out = ops::linear(y, out_w_->value, optional_f32(out_b_));  // (B, L, d_model)
  if (tr) trace::op("out_proj", {y.shape()}, {out.shape()});

  if (state) {
    // The window advanced past x: from init's (state may be init itself) or from zeros.
    if (state != init)
      state->conv_state = init ? init->conv_state.clone() : Tensor::zeros({B, D, K});
    ops::causal_conv1d_advance_state(state->conv_state, x);
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

Tensor Mamba1::backward(const Saved& s, const Tensor& dy) {
  const int64_t dm = cfg_.d_model, D = d_inner_, N = d_state_, K = d_conv_, R = dt_rank_;
  params_.check_f32("Mamba1::backward");  // "inference only" for 16-bit weights
  check_defined(s.hidden, "Mamba1::backward: saved.hidden (forward called without saved?)");
  const int64_t B = s.hidden.dim(0), L = s.hidden.dim(1);
  const int64_t E = R + 2 * N;
  check_shape(dy, "Mamba1::backward: dy", {B, L, dm});
  check_shape(s.x, "Mamba1::backward: saved.x", {B, L, D});
  if (cfg_.selective) check_shape(s.x_dbl, "Mamba1::backward: saved.x_dbl", {B, L, E});

  // out_proj
  Tensor dyy =
      ops::linear_bwd(s.y, out_w_->value, dy, &out_w_->grad(), optional_grad(out_b_));  // (B, L, D)

  // selective scan
  ops::ScanArgs args;
  args.u = s.xc;
  args.delta = s.delta;
  args.A = A();
  args.B = cfg_.selective ? s.Bm : f32(B_ssm_);
  args.C = cfg_.selective ? s.Cm : f32(C_ssm_);
  args.D = f32(Dp_);
  args.z = s.z;
  args.delta_bias = f32(dt_b_);
  args.delta_softplus = true;
  ops::ScanGrads sg = ops::selective_scan_bwd(args, dyy);
  ops::add_mul_into(A_log_->grad(), sg.dA, args.A);  // A = -exp(A_log)  =>  dA_log = dA * A
  ops::add_into(Dp_->grad(), sg.dD);
  ops::add_into(dt_b_->grad(), sg.ddelta_bias);

  Tensor dxc;  // (B, L, D) gradient of the conv output xc
  if (cfg_.selective) {
    // dt_proj.weight: delta = dt_low W^T with dt_low the first R columns of x_dbl.
    Tensor dx_dbl = Tensor::empty({B, L, E});  // (B, L, R + 2N)
    ops::linear_bwd_into(s.x_dbl.cols(0, R), dt_w_->value, sg.ddelta, dx_dbl.cols(0, R), false,
                         &dt_w_->grad(), nullptr);
    ops::copy_into(dx_dbl.cols(R, N), sg.dB);
    ops::copy_into(dx_dbl.cols(R + N, N), sg.dC);

    // x_proj; the scan input u is also xc: its gradient is added to the scan's du in place.
    ops::linear_bwd_into(s.xc, xproj_w_->value, dx_dbl, sg.du, true, &xproj_w_->grad(), nullptr);
    dxc = sg.du;  // (B, L, D)
  } else {
    // Time-invariant B and C: their (D, N) gradients; xc reaches the output only through u.
    ops::add_into(B_ssm_->grad(), sg.dB);
    ops::add_into(C_ssm_->grad(), sg.dC);
    dxc = sg.du;
  }

  // conv1d + SiLU
  ops::Conv1dGrads cg =
      ops::causal_conv1d_bwd(s.x, f32(conv_w_).reshape({D, K}), optional_f32(conv_b_), true, dxc);
  ops::add_into(conv_w_->grad(), cg.dweight.reshape(conv_w_->grad().shape()));
  if (conv_b_) ops::add_into(conv_b_->grad(), cg.dbias);

  // in_proj: the x half (rows [0, D) of the weight) got cg.dx, the z half sg.dz.
  Tensor dhidden = Tensor::empty({B, L, dm});  // (B, L, d_model)
  Tensor gW = in_w_->grad();
  Tensor db0 = in_b_ ? in_b_->grad().narrow(0, D) : Tensor(),
         db1 = in_b_ ? in_b_->grad().narrow(D, D) : Tensor();
  Tensor gW0 = gW.narrow(0, D), gW1 = gW.narrow(D, D);
  ops::linear_bwd_into(s.hidden, in_w_->value.rows(0, D), cg.dx, dhidden, false, &gW0,
                       in_b_ ? &db0 : nullptr);
  ops::linear_bwd_into(s.hidden, in_w_->value.rows(D, D), sg.dz, dhidden, true, &gW1,
                       in_b_ ? &db1 : nullptr);
  return dhidden;
}

// ---- step ---------------------------------------------------------------------------------------

Tensor Mamba1::step(const Tensor& hidden, State& state) const {
  const int64_t dm = cfg_.d_model, D = d_inner_, N = d_state_, K = d_conv_, R = dt_rank_;
  check_defined(hidden, "Mamba1::step: x");
  MAMBA_CHECK(hidden.ndim() == 2, "Mamba1::step: x must be (B, d_model=", dm, "), got ",
              hidden.shape_str());
  check_shape(hidden, "Mamba1::step: x", {-1, dm});
  const int64_t B = hidden.dim(0);
  MAMBA_CHECK(B >= 1, "Mamba1::step: x needs B >= 1, got ", hidden.shape_str());
  check_state(state, B);
  const bool tr = trace::enabled();
  if (B == 1 && cfg_.selective && !trace::printing()) return step_one(hidden, state);
  const Tensor& in_b = optional_f32(in_b_);

  // One product for x and z (one pass over the threads instead of two; every row is computed as
  // it would be alone), then the halves as their own (B, D) tensors.
  const Tensor xz = ops::linear(hidden, in_w_->value, in_b);  // (B, 2D)
  const Tensor x = xz.cols(0, D).contiguous();                // (B, D)
  const Tensor z = xz.cols(D, D).contiguous();                // (B, D)
  if (tr) trace::op("in_proj", {hidden.shape()}, {{B, 2 * D}});

  Tensor xc = ops::causal_conv1d_update(state.conv_state, x, f32(conv_w_).reshape({D, K}),
                                        optional_f32(conv_b_), true);
  if (tr) trace::op("conv1d_update", {x.shape(), state.conv_state.shape()}, {xc.shape()});

  Tensor dt, Bt, Ct;
  if (cfg_.selective) {
    Tensor x_db = ops::linear(xc, xproj_w_->value);  // (B, R + 2N)
    if (tr) trace::op("x_proj", {xc.shape()}, {x_db.shape()});

    dt = Tensor::empty({B, D});  // (B, D)
    ops::linear_into(x_db.cols(0, R), dt_w_->value, Tensor(), dt);
    if (tr) trace::op("dt_proj", {{B, R}}, {dt.shape()});

    Bt = x_db.cols(R, N).contiguous();      // (B, N)
    Ct = x_db.cols(R + N, N).contiguous();  // (B, N)
  } else {
    // Time-invariant: delta = softplus(0 + dt_proj.bias); the (D, N) B and C passed as D groups of
    // one channel each, (B, G = D, N), the layout selective_state_update takes.
    dt = Tensor::zeros({B, D});  // (B, D)
    Bt = Tensor::empty({B, D, N});
    Ct = Tensor::empty({B, D, N});
    for (int64_t b = 0; b < B; ++b) {
      ops::copy_into(Bt.select(b), f32(B_ssm_));
      ops::copy_into(Ct.select(b), f32(C_ssm_));
    }
  }
  Tensor y = ops::selective_state_update(state.ssm_state, xc, dt, A(), Bt, Ct, f32(Dp_), z,
                                         f32(dt_b_), true);
  if (tr)
    trace::op("selective_state_update", {xc.shape(), dt.shape(), Bt.shape(), Ct.shape(), z.shape()},
              {y.shape(), state.ssm_state.shape()});

  Tensor out = ops::linear(y, out_w_->value, optional_f32(out_b_));  // (B, d_model)
  if (tr) trace::op("out_proj", {y.shape()}, {out.shape()});
  return out;
}

// A single sequence's step (B = 1) in four passes over the threads instead of seven: the
// per-channel work is split by channels once, in pieces of 64 (so every vectorised op starts its
// lanes where the unsplit op does: the same bits as `step` for any split), and each thread runs
// its channels' whole chain inside one hand-off:
//   1. in_proj's x and z rows of the thread's channels, then their conv update;
//   2. x_proj (its 80-odd rows need every channel of the conv output: its own pass);
//   3. dt_proj's rows of the thread's channels, A = -exp(A_log) of them, their state update;
//   4. out_proj (every channel of y: its own pass).
// Every row of a product is the row ops::linear computes (ops::matmul_rows: the same whatever the
// split), so logits and states are the bits of the general path (test_determinism, test_mamba1).
// Not taken while shapes are printed; under the op profile the passes are traced as fused ops.
Tensor Mamba1::step_one(const Tensor& hidden, State& state) const {
  const int64_t dm = cfg_.d_model, D = d_inner_, N = d_state_, K = d_conv_, R = dt_rank_;
  const Tensor h = hidden.contiguous();
  const float* hp = h.data();
  const Weight& in_w = in_w_->value;
  const float* in_b = in_b_ ? f32(in_b_).data() : nullptr;
  const float* conv_w = f32(conv_w_).data();
  const float* conv_b = conv_b_ ? f32(conv_b_).data() : nullptr;
  Tensor xz = Tensor::empty({1, 2 * D}), xc = Tensor::empty({1, D});
  float* xzp = xz.data();
  float* xcp = xc.data();
  float* conv_st = state.conv_state.data();
  constexpr int64_t kPiece = 64;
  const int64_t pieces = (D + kPiece - 1) / kPiece;
  // Pieces per thread task: >= ~16K weights of in_proj (2 x 64 rows of d_model per piece).
  const int64_t grain1 = std::max<int64_t>(1, 16384 / (2 * kPiece * std::max<int64_t>(dm, 1)));
  parallel_for(pieces, grain1, [&](int64_t pb, int64_t pe) {
    const int64_t b = pb * kPiece, e = std::min(D, pe * kPiece), n = e - b;
    ops::matmul_rows(hp, 1, dm, in_w.rows(b, n), xzp + b, n, in_b ? in_b + b : nullptr);
    ops::matmul_rows(hp, 1, dm, in_w.rows(D + b, n), xzp + D + b, n, in_b ? in_b + D + b : nullptr);
    ops::causal_conv1d_update_rows(conv_st, xzp, conv_w, conv_b, xcp, D, K, b, e, true);
  });
  const bool tr = trace::enabled();  // the op profile (step() does not come here when printing)
  if (tr) trace::op("in_proj+conv1d_update", {hidden.shape()}, {xz.shape(), xc.shape()});

  const Tensor x_db = ops::linear(xc, xproj_w_->value);  // (1, R + 2N)
  if (tr) trace::op("x_proj", {xc.shape()}, {x_db.shape()});
  const float* xdbp = x_db.data();
  const Weight& dt_w = dt_w_->value;
  const float* A_log = f32(A_log_).data();
  const float* Dp = f32(Dp_).data();
  const float* dt_b = f32(dt_b_).data();
  Tensor dt = Tensor::empty({1, D}), A = Tensor::empty({D, N}), y = Tensor::empty({1, D});
  float* dtp = dt.data();
  float* Ap = A.data();
  float* yp = y.data();
  float* ssm_st = state.ssm_state.data();
  // Pieces per task: >= 8192 state updates (selective_state_update's grain).
  const int64_t grain3 = std::max<int64_t>(1, 8192 / (kPiece * N));
  parallel_for(pieces, grain3, [&](int64_t pb, int64_t pe) {
    const int64_t b = pb * kPiece, e = std::min(D, pe * kPiece), n = e - b;
    ops::matmul_rows(xdbp, 1, R, dt_w.rows(b, n), dtp + b, n);
    ops::neg_exp_fast_into(A_log + b * N, Ap + b * N, n * N);
    ops::selective_state_update_channels(ssm_st, xcp, dtp, Ap, xdbp + R, xdbp + R + N, Dp, xzp + D,
                                         dt_b, true, D, N, b, e, yp);
  });
  if (tr) trace::op("dt_proj+selective_state_update", {x_db.shape()}, {y.shape()});
  Tensor out = ops::linear(y, out_w_->value, optional_f32(out_b_));  // (1, d_model)
  if (tr) trace::op("out_proj", {y.shape()}, {out.shape()});
  return out;
}

}  // namespace mamba
