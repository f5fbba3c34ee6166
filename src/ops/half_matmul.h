// The streaming matmul for few rows (decode, batched decode): y (M, n) = x (M, cols) W^T with
// each weight row read once for all M inputs (decode is bound by the weight bytes), converted in
// registers for 16-bit and q8_0 / q4_0 storage; fp32 accumulation. ops::linear (mamba/ops/linear.h)
// chooses it for M <= kHalfGemvMaxM (any storage);
// larger M goes to ops::gemm_nt. Callers normally use ops::linear.
#pragma once
#include <cstdint>

#include "mamba/tensor.h"
#include "mamba/weight.h"

namespace mamba::ops {

// Largest M that takes the streaming kernel; larger M goes to ops::gemm_nt.
constexpr int64_t kHalfGemvMaxM = 16;

// y (M, W.rows()) [ldy] = x (M, W.cols()) [ldx] W^T, any dtype (W may be a rows() view). Throws on
// a bad leading dimension or an undefined W.
void stream_matmul(const float* x, int64_t M, int64_t ldx, const Weight& W, float* y, int64_t ldy);
// The reference: plain loops, double accumulation, same arguments.
void stream_matmul_ref(const float* x, int64_t M, int64_t ldx, const Weight& W, float* y,
                       int64_t ldy);

}  // namespace mamba::ops
