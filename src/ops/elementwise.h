// Small element-wise and gather/scatter ops: the host math of the layers and the model, written
// once here (and tested against the *_ref loops in tests/test_elementwise.cpp) so that src/nn and
// src/model hold no loops over .data().
//   2-D arguments (M, n) may be strided views (Tensor::cols): rows of n values, row_stride() apart.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "mamba/tensor.h"
#include "mamba/weight.h"

namespace mamba::ops {

// dst += src (same shape; either may be a strided view).
void add_into(const Tensor& dst, const Tensor& src);
// dst += a * b, element-wise (same shapes, contiguous).
void add_mul_into(const Tensor& dst, const Tensor& a, const Tensor& b);
// a * b element-wise, a new tensor (same shapes, contiguous).
Tensor mul(const Tensor& a, const Tensor& b);
// dst = src (same shape; either may be a strided view: put_cols-style writes into column blocks).
void copy_into(const Tensor& dst, const Tensor& src);
// -exp(x): neg_exp with libm's expf; neg_exp_fast with the vectorised exp (ops::exp_inplace,
// ~1 ulp from libm; Mamba-1's A = -exp(A_log) on every decode step).
Tensor neg_exp(const Tensor& x);
Tensor neg_exp_fast(const Tensor& x);
// y[0, n) = -exp(x[0, n)) on the calling thread: neg_exp_fast's arithmetic (the same bits when x
// starts at a multiple of 16 values from the tensor's start, as its own thread ranges do).
void neg_exp_fast_into(const float* x, float* y, int64_t n);
// log(-x), neg_exp's inverse (A_log from A = -exp(A_log), computed in double); throws naming
// `what` and the index when an element is not finite and negative.
Tensor log_neg(const Tensor& x, const std::string& what);

// Bias over the rows of y (M, n): y[m, :] += b (bias_add) or = b (bias_fill). b: (n).
void bias_add(const Tensor& y, const Tensor& b);
void bias_fill(const Tensor& y, const Tensor& b);
// Bias gradient: db (n) += sum over the rows of dy (M, n), rows in order.
void bias_grad(const Tensor& db, const Tensor& dy);

// t *= s, every element (t contiguous or a strided view).
void scale_inplace(const Tensor& t, float s);
// Per-column scale over the rows of y (M, n): y[m, j] *= s[j] (a layer scale). s: (n).
void mul_cols_inplace(const Tensor& y, const Tensor& s);
// Its gradient: ds (n) += sum over the rows of dy[m, :] * x[m, :], rows in order (x the
// unscaled input, same shape as dy).
void mul_cols_grad(const Tensor& ds, const Tensor& dy, const Tensor& x);

// Embedding forward: out (n, d) row i = W row ids[i] (fp32 or converted exactly from 16 bits).
// W: (V, d). Throws naming the first id outside [0, V).
Tensor embedding_fwd(const Weight& W, std::span<const int32_t> ids);
// Embedding backward: dW (V, d) row ids[i] += dy (n, d) row i, for i in order (deterministic:
// one thread, repeated ids add in sequence order).
void embedding_bwd(const Tensor& dW, std::span<const int32_t> ids, const Tensor& dy);

// References (plain loops over contiguous tensors).
void bias_grad_ref(Tensor& db, const Tensor& dy);
Tensor embedding_fwd_ref(const Tensor& W, std::span<const int32_t> ids);
void embedding_bwd_ref(Tensor& dW, std::span<const int32_t> ids, const Tensor& dy);

}  // namespace mamba::ops
