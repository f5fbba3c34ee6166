// Mamba-3 scan (mamba_ssm.modules.mamba3's kernel, SISO and MIMO): the trapezoidal recurrence
// with data-dependent decay and rotary angles accumulated over time. Channel-last, like every
// op here (mamba_ssm's ADT / DT / Trap are (B, H, L); ours are (B, L, H)).
//
//   Q, K    : (B, L, R, G, N)  C and B after their RMSNorm, before bias and rotation
//   V       : (B, L, H, P)     x;   Z: (B, L, H, P) optional gate
//   ADT, DT, Trap : (B, L, H)  A*dt, dt, trap before its sigmoid
//   Q_bias, K_bias: (H, R, N)  per head (head h reads group h / (H / G))
//   Angles  : (B, L, S)        angle projections before tanh*pi, shared by the heads
//   D       : (H) optional
//   mimo_x, mimo_z, mimo_o : (H, R, P)   MIMO (R > 1, or R = 1 with them given)
//   norm_weight : (H * P) optional: a head-wise RMSNorm over P before the gate (MIMO's fused
//                 is_outproj_norm path)
//
// Per batch b and head h, with sigma = sigmoid(trap_t), alpha = exp(ADT_t),
// beta = (1 - sigma) DT_t alpha, gamma = sigma DT_t:
//   theta_t = theta_{t-1} + pi * tanh(Angles_t) * DT_t                          (S angles)
//   q_r = rot(Q_r + Q_bias_r, theta_t),  k_r = rot(K_r + K_bias_r, theta_t)     (N)
//   v_r = V_t * mimo_x_r (SISO: V_t)                                            (P)
//   S_t = alpha S_{t-1} + beta sum_r v_{t-1,r} k_{t-1,r}^T + gamma sum_r v_{t,r} k_{t,r}^T   (P, N)
//   y_r = S_t q_r + D v_r;  y_r = rmsnorm_P(y_r) * w_h if norm_weight
//   y_r *= silu(Z_t * mimo_z_r) if Z (SISO: silu(Z_t))
//   out_t = sum_r y_r * mimo_o_r (SISO: y_1)                                    (P)
// rot rotates S pairs by theta: SISO pairs (2i, 2i+1), MIMO pairs (i, i + N/2) (rotate_pairwise
// false); the other entries are not rotated. k_{-1}, v_{-1}, S_{-1}, theta_{-1} are the initial
// states (zero when absent).
//
// States (mamba_ssm's decode layouts): angle (B, H, S) (wrapped to [0, 2 pi) as mamba_ssm's
// forward returns it), ssm (B, H, P, N), k (B, R, H, N) = the last token's rotated k_r,
// v (B, H, P) = the last token's V (before mimo_x).
#pragma once
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

struct Mamba3States {
  Tensor angle, ssm, k, v;  // (B, H, S), (B, H, P, N), (B, R, H, N), (B, H, P)
};

struct Mamba3ScanArgs {
  Tensor Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles;
  Tensor D, Z, mimo_x, mimo_z, mimo_o, norm_weight;  // optional
  float norm_eps = 1e-5f;
  bool rotate_pairwise = true;  // SISO (2i, 2i+1); false: MIMO (i, i + N/2)
  Mamba3States initial;         // optional (all four or none)
};

struct Mamba3ScanGrads {  // each defined iff the matching input is
  Tensor dQ, dK, dV, dADT, dDT, dTrap, dQ_bias, dK_bias, dAngles;
  Tensor dD, dZ, dmimo_x, dmimo_z, dmimo_o, dnorm_weight;
};

struct Mamba3Dims {
  int64_t batch = 0, L = 0, R = 1, G = 1, N = 0, H = 0, P = 0, S = 0;
  bool mimo = false;
};
// Validates every tensor (throws mamba::Error naming it, the expected and the actual shape).
Mamba3Dims mamba3_scan_check(const Mamba3ScanArgs& a, const char* what = "mamba3_scan");

// The naive sequential reference (the recurrence above, in double): out (B, L, H, P) and the
// final states. The readable spec and the oracle of the layer and of any faster kernel.
Tensor mamba3_scan_ref(const Mamba3ScanArgs& a, Mamba3States* final_states = nullptr);
std::vector<double> mamba3_scan_ref_f64(const Mamba3ScanArgs& a);
// The chunked forward in fp32 (the fast path of forward / prefill): per (batch, head),
// the sequence in chunks of chunk_size tokens; inside a chunk the output is the masked
// "attention" form  y_t = sum_{s<=t} c_ts (q_t . k_s) v_s  with c_ts = exp(cum_t - cum_s) *
// (gamma_s + (1 - sigma_{s+1}) DT_{s+1}) for s < t and c_tt = gamma_t, plus the state carried
// in from the previous chunk; the state is then advanced to the chunk's end. Three GEMMs per
// chunk over its T*R rows (project gemm(): scores Q K^T, y = Q S^T + scores V, the state update
// V^T diag(c_end) K) and a vector exp for the decays, as the SSD. Same result as the reference for
// any chunk_size >= 1 (tested for ragged sizes); (batch, head) pairs run in parallel, each writing
// its own rows (deterministic). final_states' tensors are reused when they have the right shapes,
// and may be a.initial's own (each (batch, head) reads its initial slice before writing its final
// one): an in-place decode.
Tensor mamba3_scan_fwd(const Mamba3ScanArgs& a, int64_t chunk_size,
                       Mamba3States* final_states = nullptr);
// The decode step (fp32): one token (L = 1) from a.initial (required), the states advanced into
// `state` (its tensors reused when they fit; they may be a.initial's own: an in-place update, each
// (batch, head) reading its slices before writing them). Returns out (B, 1, H, P). Per (batch,
// head) one pass over the (P, N) state with a Highway row kernel (update, then the R dot
// products with q); same result as mamba3_scan_fwd over that token, any G dividing H (tested).
Tensor mamba3_scan_step(const Mamba3ScanArgs& a, Mamba3States& state);
// Gradients of sum(out * dout) by the recurrence run backwards (in double). Initial states are
// not differentiated (refused).
Mamba3ScanGrads mamba3_scan_bwd_ref(const Mamba3ScanArgs& a, const Tensor& dout);
// The fast backward (fp32), chunked like the forward: per (batch, head) the forward is
// recomputed in chunks of chunk_size tokens (keeping each chunk's entering state and the rows
// S q + D v), then the chunks are walked backwards carrying the state's gradient: per chunk the
// gradients of Q, K, V and of the decay / trapezoid coefficients by GEMMs over its T*R rows
// (Q K^T, dY V^T, the masked products and their transposes, dY S_eff, V dS, K dS^T, the state
// gradient dY^T Q), then the prep stage backwards per token (rotations, biases, mimo_x, the
// phases' running sum to Angles and DT) as the reference does. O(L T R (N + P) + L R N P) per
// (batch, head). (batch, head) pairs run in parallel; the gradients several pairs reach (Q, K of
// a group, Angles, the per-head parameters over the batch) are added in (batch, head) order after
// the parallel region, so the result does not depend on the thread count. Same gradients as
// mamba3_scan_bwd_ref for any chunk_size >= 1 (tested for ragged sizes). Initial states are not
// differentiated (refused), as in the reference.
Mamba3ScanGrads mamba3_scan_bwd(const Mamba3ScanArgs& a, const Tensor& dout, int64_t chunk_size);
// The fp32 recurrence run backwards token by token (the reference's, in float, the per-step
// state update and the reverse step through Highway row kernels), (batch, head) pairs in parallel
// with the same fixed-order reduction: O(L P N R) per (batch, head) but one pass over the (P, N)
// state per token. Kept as a second fast-path reference for mamba3_scan_bwd (tested against both).
Mamba3ScanGrads mamba3_scan_bwd_seq(const Mamba3ScanArgs& a, const Tensor& dout);

// Mamba-3's per-head discretisation (the module's preprocessing), M = B * L rows:
//   DT = softplus(dd_dt + dt_bias),  A = min(-f(dd_A), -A_floor),  ADT = A * DT
// with mamba_ssm's heavy_tail_activation f(x) = 1 + x (x >= 0), 1 / (1 - x) (x < 0) (the commit
// the golden files come from, e9594ce; later upstream code uses softplus for f)
// dd_dt, dd_A: (M, H) (strided views allowed); dt_bias: (H). Writes DT, ADT (M, H), fresh.
void mamba3_discretize_fwd(const Tensor& dd_dt, const Tensor& dd_A, const Tensor& dt_bias,
                           double A_floor, Tensor& DT, Tensor& ADT);
// Gradients from dDT, dADT (M, H): writes d_dd_dt, d_dd_A (M, H) (= , strided views allowed) and
// adds into d_dt_bias (H). Where A is clamped at -A_floor its gradient is 0 (as torch.clamp's).
void mamba3_discretize_bwd(const Tensor& dd_dt, const Tensor& dd_A, const Tensor& dt_bias,
                           double A_floor, const Tensor& dDT, const Tensor& dADT,
                           const Tensor& d_dd_dt, const Tensor& d_dd_A, const Tensor& d_dt_bias);

}  // namespace mamba::ops
