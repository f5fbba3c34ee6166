// Linear layer on any Weight: the kernel choice (see include/mamba/ops/linear.h), forward,
// backward, naive reference.
//   x: (..., in) flattened to (M, in); W: (out, in); b: (out) optional; y: (..., out)
#include "ops/linear.h"

#include "core/gemm.h"
#include "ops/elementwise.h"
#include "ops/gemm_bf16.h"
#include "ops/gemm_nt.h"
#include "ops/gemm_q8.h"
#include "ops/half_matmul.h"

namespace mamba::ops {
namespace {

struct LinDims {
  int64_t M, in, out;
};

// x as a 2-D (M, in) matrix: its rows must be whole rows of `in` values.
void check_rows(const Tensor& t, const char* what, int64_t n) {
  MAMBA_CHECK(t.row_len() == n, what, ": a strided view ", t.shape_str(), " whose rows (",
              t.row_len(), " values) are not its last dimension");
}

LinDims check_linear(const char* what, const Tensor& x, const Weight& W) {
  check_defined(x, str(what, ": x").c_str());
  MAMBA_CHECK(W.defined(), what, ": W is undefined");
  MAMBA_CHECK(x.ndim() >= 1, what, ": x must be (..., in), got ", x.shape_str());
  MAMBA_CHECK(W.shape().size() == 2, what, ": W must be (out, in), got ", W.shape_str());
  MAMBA_CHECK(W.cols() == x.dim(-1), what, ": W ", W.shape_str(), " expects in = ", W.cols(),
              " but x is ", x.shape_str());
  const int64_t in = x.dim(-1);
  if (!x.is_contiguous()) check_rows(x, str(what, ": x").c_str(), in);
  return {in ? x.numel() / in : 0, in, W.rows()};
}

Shape out_shape(const Tensor& x, int64_t out) {
  Shape s = x.shape();
  s.back() = out;
  return s;
}

// Whether products with W take 8-bit activations (mamba::set_activation_type; q8_0 / q4_0 only).
bool q8_activations(const Weight& W) {
  return is_quantised(W.dtype()) && activation_type() == ActivationType::q8;
}

// Whether the prefill products with W take bf16 activations (ActivationType::bf16; bf16 weights,
// M > kHalfGemvMaxM only).
bool bf16_activations(const Weight& W, int64_t M) {
  return W.dtype() == WeightDType::bf16 && M > kHalfGemvMaxM &&
         activation_type() == ActivationType::bf16;
}

// y (M, out) [ldy] (+)= x (M, in) [ldx] W^T: the kernel for this M and storage, no bias.
void matmul(const float* x, const LinDims& d, int64_t ldx, const Weight& W, float* y, int64_t ldy,
            bool accumulate) {
  if (q8_activations(W)) {  // opt-in: llama.cpp's 8-bit activations (prefill and decode)
    gemm_nt_q8(x, d.M, ldx, WeightRows{W.row_ptr(0), W.dtype(), W.row_pitch()}, d.out, d.in, y, ldy,
               accumulate);
    return;
  }
  if (bf16_activations(W, d.M)) {  // opt-in: bf16 activations, vdpbf16ps (prefill only)
    gemm_nt_bf16(x, d.M, ldx, WeightRows{W.row_ptr(0), W.dtype(), W.row_pitch()}, d.out, d.in, y,
                 ldy, accumulate);
    return;
  }
  if (d.M >
      kHalfGemvMaxM) {  // prefill, training: the packed kernel (the BLAS where it is not faster)
    gemm_nt(x, d.M, ldx, WeightRows{W.row_ptr(0), W.dtype(), W.row_pitch()}, d.out, d.in, y, ldy,
            accumulate);
    return;
  }
  // decode, batched decode: stream each weight row once for all M rows (M = 1 too: the BLAS's
  // GEMV opened its own parallel region and reached ~60% of the read bandwidth; see
  // docs/PERFORMANCE.md, "Decode: one thread team per token")
  if (!accumulate) {
    stream_matmul(x, d.M, ldx, W, y, ldy);
    return;
  }
  Tensor t = Tensor::empty({d.M, d.out});
  stream_matmul(x, d.M, ldx, W, t.data(), d.out);
  add_into(Tensor::wrap(y, {d.M, ldy}).cols(0, d.out), t);
}

}  // namespace

void matmul_rows(const float* x, int64_t M, int64_t ldx, const Weight& W, float* y, int64_t ldy,
                 const float* b) {
  MAMBA_CHECK(W.defined() && W.shape().size() == 2, "matmul_rows: W must be (out, in)");
  MAMBA_CHECK(M >= 0 && ldx >= W.cols() && ldy >= W.rows(), "matmul_rows: M ", M, ", ldx ", ldx,
              ", ldy ", ldy, " for W ", W.shape_str());
  matmul(x, LinDims{M, W.cols(), W.rows()}, ldx, W, y, ldy, false);
  if (b)  // after the product, as linear() adds its bias for M <= 16
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < W.rows(); ++n) y[m * ldy + n] += b[n];
}

void linear_into(const Tensor& x, const Weight& W, const Tensor& b, const Tensor& y,
                 bool accumulate) {
  const LinDims d = check_linear("linear", x, W);
  if (b.defined()) check_shape(b, "linear: b", {d.out});
  check_shape(y, "linear: y", out_shape(x, d.out));
  if (!y.is_contiguous()) check_rows(y, "linear: y", d.out);
  if (d.M == 0 || d.out == 0) return;
  Tensor y2 = y.reshape({d.M, d.out});  // keeps the row stride
  float* yp = y.view_data();
  const int64_t ldy = y.row_stride(), ldx = x.row_stride();
  if (d.in == 0) {
    if (!accumulate) y2.zero();
    if (b.defined()) bias_add(y2, b);
    return;
  }
  // fp32 weights with M > 16: the bias goes in first and the product is accumulated; everywhere
  // else the bias is added after the product.
  const bool bias_first = b.defined() && W.is_f32() && d.M > kHalfGemvMaxM;
  if (bias_first) {
    if (accumulate)
      bias_add(y2, b);
    else
      bias_fill(y2, b);
  }
  matmul(x.view_data(), d, ldx, W, yp, ldy, accumulate || bias_first);
  if (b.defined() && !bias_first) bias_add(y2, b);
}

Tensor linear(const Tensor& x, const Weight& W, const Tensor& b) {
  const LinDims d = check_linear("linear", x, W);
  Tensor y = Tensor::empty(out_shape(x, d.out));
  linear_into(x, W, b, y);
  return y;
}

std::vector<Tensor> linear_split(const Tensor& x, const Weight& W,
                                 const std::vector<int64_t>& widths) {
  const LinDims d = check_linear("linear_split", x, W);
  int64_t total = 0;
  for (int64_t w : widths) {
    MAMBA_CHECK(w >= 0, "linear_split: negative width ", w);
    total += w;
  }
  MAMBA_CHECK(total == d.out, "linear_split: the widths sum to ", total, ", W has ", d.out,
              " rows");
  std::vector<Tensor> ys;
  for (int64_t w : widths) ys.push_back(Tensor::empty(out_shape(x, w)));
  if (d.M == 0) return ys;
  if (d.M <= kHalfGemvMaxM || d.in == 0 ||
      (!gemm_nt_packed_active() && !q8_activations(W) && !bf16_activations(W, d.M))) {
    for (int64_t i = 0, r = 0; i < static_cast<int64_t>(widths.size()); r += widths[i++])
      if (widths[i] > 0) linear_into(x, W.rows(r, widths[i]), Tensor(), ys[i]);
    return ys;
  }
  std::vector<GemmNtOut> outs;
  for (size_t i = 0; i < widths.size(); ++i) outs.push_back({widths[i], ys[i].data(), widths[i]});
  if (q8_activations(W)) {  // one call of the 8-bit kernel, x quantised once
    gemm_nt_q8(x.view_data(), d.M, x.row_stride(),
               WeightRows{W.row_ptr(0), W.dtype(), W.row_pitch()}, d.out, d.in, nullptr, 0, false,
               outs.data(), static_cast<int64_t>(outs.size()));
    return ys;
  }
  if (bf16_activations(W, d.M)) {  // one call of the bf16 kernel, x rounded once
    gemm_nt_bf16(x.view_data(), d.M, x.row_stride(),
                 WeightRows{W.row_ptr(0), W.dtype(), W.row_pitch()}, d.out, d.in, nullptr, 0, false,
                 outs.data(), static_cast<int64_t>(outs.size()));
    return ys;
  }
  gemm_nt_split(x.view_data(), d.M, x.row_stride(),
                WeightRows{W.row_ptr(0), W.dtype(), W.row_pitch()}, d.in, outs.data(),
                static_cast<int64_t>(outs.size()));
  return ys;
}

void linear_bwd_into(const Tensor& x, const Weight& W, const Tensor& dy, const Tensor& dx,
                     bool accumulate_dx, Tensor* dW, Tensor* db) {
  const LinDims d = check_linear("linear_bwd", x, W);
  const Tensor& Wf = W.f32("linear_bwd");
  check_shape(dy, "linear_bwd: dy", out_shape(x, d.out));
  if (!dy.is_contiguous()) check_rows(dy, "linear_bwd: dy", d.out);
  check_shape(dx, "linear_bwd: dx", x.shape());
  if (!dx.is_contiguous()) check_rows(dx, "linear_bwd: dx", d.in);
  if (dW) check_shape(*dW, "linear_bwd: dW", {d.out, d.in});
  if (db) check_shape(*db, "linear_bwd: db", {d.out});
  if (d.M == 0 || d.in == 0) return;
  if (d.out == 0) {
    if (!accumulate_dx) dx.reshape({d.M, d.in}).zero();
    return;
  }
  // dx (M, in) = dy (M, out) W (out, in)
  gemm_nn(d.M, d.in, d.out, dy.view_data(), dy.row_stride(), Wf.data(), d.in, dx.view_data(),
          dx.row_stride(), accumulate_dx);
  // dW (out, in) += dy^T (out, M) x (M, in)
  if (dW)
    gemm_tn(d.out, d.in, d.M, dy.view_data(), dy.row_stride(), x.view_data(), x.row_stride(),
            dW->data(), d.in, true);
  if (db) bias_grad(*db, dy.reshape({d.M, d.out}));
}

Tensor linear_bwd(const Tensor& x, const Weight& W, const Tensor& dy, Tensor* dW, Tensor* db) {
  check_defined(x, "linear_bwd: x");
  Tensor dx = Tensor::empty(x.shape());  // every element written (accumulate_dx = false)
  linear_bwd_into(x, W, dy, dx, false, dW, db);
  return dx;
}

std::vector<double> linear_ref_f64(const Tensor& x, const Tensor& W, const Tensor& b) {
  check_defined(W, "linear_ref: W");
  const LinDims d = check_linear("linear_ref", x, Weight(W));
  if (b.defined()) check_shape(b, "linear_ref: b", {d.out});
  std::vector<double> y(static_cast<size_t>(d.M * d.out));
  for (int64_t m = 0; m < d.M; ++m)
    for (int64_t o = 0; o < d.out; ++o) {
      double acc = b.defined() ? b[o] : 0.0;
      for (int64_t i = 0; i < d.in; ++i) acc += (double)x[m * d.in + i] * W[o * d.in + i];
      y[m * d.out + o] = acc;
    }
  return y;
}

Tensor linear_ref(const Tensor& x, const Tensor& W, const Tensor& b) {
  const std::vector<double> y = linear_ref_f64(x, W, b);
  Tensor out = Tensor::empty(out_shape(x, W.dim(0)));
  for (int64_t i = 0; i < out.numel(); ++i) out[i] = static_cast<float>(y[i]);
  return out;
}

}  // namespace mamba::ops
