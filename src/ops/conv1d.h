// Causal depthwise conv1d (+ optional bias and SiLU): forward, backward, single-token update.
// Channel-last: x, y: (B, L, D); weight: (D, K) (the checkpoint's (D, 1, K) reshaped);
// bias: (D) optional.  y[b,t,d] = act(bias[d] + sum_k weight[d,k] * x[b, t-K+1+k, d]),
// with x = 0 before t = 0 (or taken from an initial conv_state).
// conv_state: (B, D, K), mamba_ssm's layout: the last K inputs, oldest first.
// initial_state (optional, causal only): a conv_state (B, D, K) the sequence continues from: the
// taps before t = 0 read its last K-1 inputs instead of zeros (chunked prefill: the forward of
// a chunk after a prefix equals the forward of prefix + chunk at the chunk's positions).
// reverse = true: the anti-causal conv, y[b,t,d] = act(bias[d] + sum_k weight[d,k] * x[b, t+K-1-k,
// d]) with x = 0 after t = L-1: flip(conv(flip(x))) over time, read in place (Vim's backward
// direction).
#pragma once
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

Tensor causal_conv1d_fwd(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu,
                         bool reverse = false, const Tensor& initial_state = Tensor());
// causal_conv1d_fwd (causal) with its output channels in column blocks: out[i] is channels
// [w_0 + ... + w_{i-1}, + widths[i]) as its own contiguous (B, L, widths[i]) tensor (the widths
// sum to D): the split of the output without copying it (Mamba-2's x | B | C). Each block's
// values are those of causal_conv1d_fwd's columns up to the rounding of a vector's tail.
std::vector<Tensor> causal_conv1d_fwd_split(const Tensor& x, const Tensor& weight,
                                            const Tensor& bias, bool silu,
                                            const Tensor& initial_state,
                                            const std::vector<int64_t>& widths);
struct Conv1dGrads {
  Tensor dx, dweight, dbias;  // dbias undefined when bias is
};
// Gradients of sum(y * dy), fresh tensors.
Conv1dGrads causal_conv1d_bwd(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu,
                              const Tensor& dy, bool reverse = false);
// Naive references (plain loops, double accumulation).
Tensor causal_conv1d_ref(const Tensor& x, const Tensor& weight, const Tensor& bias, bool silu,
                         bool reverse = false, const Tensor& initial_state = Tensor());
// The reference forward evaluated and returned in double (B*L*D values, (B, L, D) order), for
// finite-difference tests.
std::vector<double> causal_conv1d_ref_f64(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                          bool silu, bool reverse = false,
                                          const Tensor& initial_state = Tensor());
Conv1dGrads causal_conv1d_bwd_ref(const Tensor& x, const Tensor& weight, const Tensor& bias,
                                  bool silu, const Tensor& dy, bool reverse = false);

// One decode step: shifts conv_state (B, D, K) left, appends x (B, D), returns y (B, D).
Tensor causal_conv1d_update(Tensor& conv_state, const Tensor& x, const Tensor& weight,
                            const Tensor& bias, bool silu);
// Its rows [i0, i1) of the (B, D) (batch, channel) rows on the calling thread, raw arrays
// (conv_state (B, D, K), x, y (B, D), weight (D, K), bias (D) or null): what
// causal_conv1d_update runs per thread range, for a caller that splits the channels itself.
void causal_conv1d_update_rows(float* conv_state, const float* x, const float* weight,
                               const float* bias, float* y, int64_t D, int64_t K, int64_t i0,
                               int64_t i1, bool silu);
// The conv_state a prefill over x (B, L, D) leaves: the last K inputs, zero-padded on the left
// when L < K. Writes conv_state (B, D, K).
void causal_conv1d_final_state(const Tensor& x, Tensor& conv_state);
// The same from a state the sequence continues from: conv_state (B, D, K) becomes the last K
// inputs of [its own K, x (B, L, D)] (for L < K it keeps its newest K - L).
// causal_conv1d_final_state is this applied to a zero state; applied to a prefill's state it
// gives the state of the longer sequence (chunked prefill).
void causal_conv1d_advance_state(Tensor& conv_state, const Tensor& x);

}  // namespace mamba::ops
