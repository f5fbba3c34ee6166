// SSD, the state-space dual scan of Mamba-2: forward, backward, single-token step and the naive
// reference. Semantics of mamba_ssm's mamba_chunk_scan_combined / ssd_minimal_discrete and
// selective_state_update (Mamba-2 form, scalar A per head). Layout is channel-last.
//
//   x, z, out        : (B, L, H, P)
//   dt               : (B, L, H)
//   A, dt_bias       : (H)              (A is one scalar per head, usually -exp(A_log))
//   B, C             : (B, L, G, N)     (G divides H; head h reads group h / (H / G))
//   D                : (H) or (H, P)    (the skip connection)
//   initial_states, final_states : (B, H, P, N)
//
//   dt'   = clamp(softplus?(dt + dt_bias), dt_min, dt_max)   (clamp only if the limit is set)
//   h_t   = exp(dt'_t * A) * h_{t-1} + dt'_t * x_t (outer) B_t       (B, H, P, N)
//   y_t   = h_t C_t + D * x_t;   out_t = y_t * silu(z_t) if z
//
// Two algorithms: ssd_ref is the sequential recurrence in double (the spec and the oracle);
// ssd_chunked cuts L into chunks of chunk_size (the last one may be ragged) and computes
// inside a chunk the "attention-like" quadratic form (C B^T o decay) (dt x) with GEMMs, the
// chunk states by GEMM, and passes states sequentially from chunk to chunk. O(L * chunk_size).
#pragma once
#include <cstdint>
#include <limits>

#include "mamba/tensor.h"

namespace mamba::ops {

struct SsdArgs {
  Tensor x, dt, A, B, C;                 // required
  Tensor D, z, dt_bias, initial_states;  // optional: leave undefined when absent
  bool dt_softplus = false;
  float dt_min = 0.f;  // dt_limit (dt_min, dt_max); (0, inf) = no clamp
  float dt_max = std::numeric_limits<float>::infinity();
  int64_t chunk_size = 256;  // ssd_chunked only
};

struct SsdGrads {  // each defined iff the matching input is defined
  Tensor dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states;
};

// Validates every shape, chunk_size >= 1 and dt_min <= dt_max; throws mamba::Error naming the
// tensor, the expected and the actual value. Returns nothing (the dimensions are the tensors'):
// exposed so a layer can check its arguments before it computes anything.
void ssd_check(const SsdArgs& a);

// Chunked CPU algorithm (fp32, parallel over batch x heads; the forward's per-head chunk
// products on register-tile kernels (src/ops/ssd_kernels.h), C B^T and the backward's products
// through mamba::gemm; the backward's sums over the heads of a group are added in a fixed order:
// bitwise reproducible for a given thread count). Returns out (B, L, H, P); final_states (optional
// out) receives (B, H, P, N).
Tensor ssd_chunked(const SsdArgs& a, Tensor* final_states = nullptr);
// Gradients of sum(out * dout) + sum(final_states * dfinal_states) (dfinal_states optional,
// (B, H, P, N)); fresh tensors, nothing accumulated.
SsdGrads ssd_chunked_bwd(const SsdArgs& a, const Tensor& dout,
                         const Tensor& dfinal_states = Tensor());

// Naive sequential references, accumulating in double. The readable spec and test oracle.
Tensor ssd_ref(const SsdArgs& a, Tensor* final_states = nullptr);
SsdGrads ssd_bwd_ref(const SsdArgs& a, const Tensor& dout, const Tensor& dfinal_states = Tensor());
// sum(out * g) [+ sum(final_states * g_final)] evaluated entirely in double (for finite
// differences: the fp32 rounding of out would swamp the difference quotient).
double ssd_ref_loss(const SsdArgs& a, const Tensor& g, const Tensor& g_final = Tensor());
// The same sequential recurrence with fp32 state and accumulation: a plain baseline (bench).
Tensor ssd_sequential_f32(const SsdArgs& a, Tensor* final_states = nullptr);

// One decode step (selective_state_update, Mamba-2 form). state (B, H, P, N) is updated in
// place. x, z: (B, H, P) (z optional); dt: (B, H); A, dt_bias: (H); B, C: (B, G, N);
// D: (H) or (H, P) optional. dt_limit is applied as in the full forward (mamba_ssm's step
// ignores it; with the default (0, inf) the two agree). Returns y (B, H, P).
Tensor ssd_state_update(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                        const Tensor& B, const Tensor& C, const Tensor& D, const Tensor& z,
                        const Tensor& dt_bias, bool dt_softplus, float dt_min = 0.f,
                        float dt_max = std::numeric_limits<float>::infinity());

}  // namespace mamba::ops
