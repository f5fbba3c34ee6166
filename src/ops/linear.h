// Linear layer y = x W^T + b for any Weight storage (fp32, bf16, f16), forward and backward.
//   x: (..., in) flattened to (M, in); W: (out, in) (PyTorch's nn.Linear layout); b: (out)
//   optional; y: (..., out).
// x, y, dx and dy may be strided 2-D views (Tensor::cols: rows of `in` / `out` values with a row
// stride), so a layer reads and writes column blocks of a projection's output without copies.
//
// The kernel, one choice for every caller (ops/gemm_nt.h, ops/half_matmul.h, mamba/gemm.h):
//   fp32 W:   M > 16: the packed prefill GEMM ops::gemm_nt, bias put in y first and accumulated;
//             M <= 16: the streaming kernel (decode: M = 1 too), then the bias added;
//   16-bit W: M <= 16: the streaming kernel; M > 16: ops::gemm_nt; then the bias added.
//   q8_0 / q4_0 W with mamba::activation_type() == q8 (opt-in), any M: ops::gemm_nt_q8 (x
//             quantised to q8_0 blocks, integer block dots; ops/gemm_q8.h), then the bias added.
// Backward (fp32 W only: 16-bit weights are inference only): dx = dy W and dW += dy^T x through
// ops::gemm_nn / ops::gemm_tn (the packed tile, or the BLAS where gemm_nt is on the BLAS),
// db += the row sums of dy (bias_grad).
#pragma once
#include <vector>

#include "mamba/tensor.h"
#include "mamba/weight.h"

namespace mamba::ops {

Tensor linear(const Tensor& x, const Weight& W, const Tensor& b = Tensor());
// The same into y, a (possibly strided) view of shape (..., out); accumulate: y += x W^T (+ b).
void linear_into(const Tensor& x, const Weight& W, const Tensor& b, const Tensor& y,
                 bool accumulate = false);

// y = x W^T (no bias) with y's columns in blocks of the given widths (summing to out): block i,
// weight rows [w_0 + ... + w_{i-1}, + w_i), as its own contiguous (..., w_i) tensor: linear() on
// W.rows() of each block, except that for M > 16 on the packed GEMM (or gemm_nt_q8) it is one call
// (ops::gemm_nt_split: x packed once; the same values bit for bit).
std::vector<Tensor> linear_split(const Tensor& x, const Weight& W,
                                 const std::vector<int64_t>& widths);

// y (M, out) [ldy] = x (M, in) [ldx] W^T (+ b: out values when not null, added after the product
// as linear() adds its bias for M <= 16), on the kernel linear() picks for this M and
// storage (for M <= 16 the streaming kernel, or gemm_nt_q8 under 8-bit activations). For callers
// that split a product's weight rows over their own threads (a decode step's fused passes): an
// element's value does not depend on which other rows are computed in the same call, so the
// pieces give linear()'s bits. Inside a parallel region the call runs on the calling thread.
void matmul_rows(const float* x, int64_t M, int64_t ldx, const Weight& W, float* y, int64_t ldy,
                 const float* b = nullptr);

// Returns dx (..., in) = dy W. Accumulates dW += dy^T x (out, in) and db += sum(dy) (out) when
// the pointers are not null (parameter gradients accumulate, see ARCHITECTURE.md). Throws the
// "inference only" error when W is not fp32. W may be a rows() view, dW then the matching
// narrow() of the gradient.
Tensor linear_bwd(const Tensor& x, const Weight& W, const Tensor& dy, Tensor* dW, Tensor* db);
// The same writing dx into a (possibly strided) view, or adding to it when accumulate_dx.
void linear_bwd_into(const Tensor& x, const Weight& W, const Tensor& dy, const Tensor& dx,
                     bool accumulate_dx, Tensor* dW, Tensor* db);

Tensor linear_ref(const Tensor& x, const Tensor& W, const Tensor& b);
// The reference evaluated and returned in double (y's element order), for finite differences.
std::vector<double> linear_ref_f64(const Tensor& x, const Tensor& W, const Tensor& b);

}  // namespace mamba::ops
