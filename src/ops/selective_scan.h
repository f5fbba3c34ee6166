// Selective scan (Mamba-1): forward, backward, single-token step and the naive reference.
// Semantics of mamba_ssm's selective_scan_ref / selective_state_update_ref; memory layout is
// channel-last (see docs/ARCHITECTURE.md: the layer never transposes and the kernel
// vectorises across D).
//
//   u, delta, z, out : (B, L, D)
//   A                : (D, N)
//   B, C             : (D, N) "const" | (B, L, N) "var" | (B, L, G, N) "group"
//                      (group g serves channels [g*D/G, (g+1)*D/G))
//   D (skip), delta_bias : (D)
//   initial_state, last_state : (B, D, N)
//
//   dt    = softplus?(delta + delta_bias)                 (B, L, D)
//   h_t   = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t     (B, D, N)
//   out_t = <h_t, C_t> + D * u_t;   out_t *= silu(z_t) if z
//
// reverse: the scan runs from t = L-1 down to 0 (h_{t+1} takes the place of h_{t-1}; last_state
// is the state after t = 0), reading the tensors in place with a negative time stride. This is
// flip(scan(flip(u), flip(delta), ...)) over time without the flipped copies (Vim's backward
// direction).
#pragma once
#include <cstdint>
#include <vector>

#include "mamba/tensor.h"

namespace mamba::ops {

struct ScanArgs {
  Tensor u, delta, A, B, C;
  Tensor D, z, delta_bias, initial_state;  // optional: leave undefined when absent
  bool delta_softplus = false;
  bool reverse = false;  // scan over time from the end (see the top of this file)
};

struct ScanGrads {  // each defined iff the matching input is defined
  Tensor du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state;
};

// Validates shapes (throws mamba::Error naming the tensor) and returns out (B, L, D).
// If last_state is not null it receives the state after the last step, (B, D, N).
Tensor selective_scan_fwd(const ScanArgs& a, Tensor* last_state = nullptr);
// Gradients of sum(out * dout), fresh tensors (nothing accumulated).
ScanGrads selective_scan_bwd(const ScanArgs& a, const Tensor& dout);

// Naive references: plain loops, accumulating in double. The readable spec and test oracle.
Tensor selective_scan_ref(const ScanArgs& a, Tensor* last_state = nullptr);
ScanGrads selective_scan_bwd_ref(const ScanArgs& a, const Tensor& dout);

// One decode step (selective_state_update): state (B, D, N) is updated in place.
//   x, dt, z: (B, D); A: (D, N); B, C: (B, N) or (B, G, N); D, dt_bias: (D) optional.
// Returns y (B, D).
Tensor selective_state_update(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                              const Tensor& B, const Tensor& C, const Tensor& D, const Tensor& z,
                              const Tensor& dt_bias, bool dt_softplus);
// Channels [c0, c1) of one single-sequence step (batch 1) on the calling thread, with the same
// arithmetic per channel as selective_state_update (the same bits whatever the split, when c0 is
// a multiple of 16), for a caller that runs other per-channel work in the same thread range
// (Mamba1::step). Raw arrays: state, A (D, N); x, dt, z, y (D); B, C (N); Dskip, dt_bias (D);
// Dskip, z, dt_bias may be null. Indices are of the whole arrays: only [c0, c1) is read or written.
void selective_state_update_channels(float* state, const float* x, const float* dt, const float* A,
                                     const float* B, const float* C, const float* Dskip,
                                     const float* z, const float* dt_bias, bool dt_softplus,
                                     int64_t D, int64_t N, int64_t c0, int64_t c1, float* y);

// ---- argument checks, the double reference and the step reference -------------------------

// How B or C is laid out (see the table at the top of this file).
enum class ScanBCKind { Const, Var, Group };

// The dimensions selective_scan_fwd/bwd read from their arguments.
struct ScanDims {
  int64_t batch = 0, L = 0, D = 0, N = 0;
  ScanBCKind b_kind = ScanBCKind::Const, c_kind = ScanBCKind::Const;
  int64_t b_groups = 1, c_groups = 1;  // G for the group kind, 1 otherwise
};
// Validates every tensor of `a` (ranks, shapes, G dividing D); throws mamba::Error naming the
// tensor, the expected and the actual shape. `what` prefixes messages ("selective_scan").
ScanDims selective_scan_check(const ScanArgs& a, const char* what = "selective_scan");

// The reference computed and returned in double, for finite-difference tests:
// out (B*L*D values, (B, L, D) order); last_state (B*D*N) if not null.
std::vector<double> selective_scan_ref_f64(const ScanArgs& a,
                                           std::vector<double>* last_state = nullptr);

// Naive reference of selective_state_update (scalar loops, double sum over N): the oracle
// for the vectorised step above. Same arguments and semantics.
Tensor selective_state_update_ref(Tensor& state, const Tensor& x, const Tensor& dt, const Tensor& A,
                                  const Tensor& B, const Tensor& C, const Tensor& D,
                                  const Tensor& z, const Tensor& dt_bias, bool dt_softplus);

// Dimensions of a selective_state_update call, validated (throws mamba::Error naming the
// tensor). b_groups / c_groups: G of a (B, G, N) B or C, 1 for (B, N).
struct StepDims {
  int64_t batch = 0, D = 0, N = 0, b_groups = 1, c_groups = 1;
};
StepDims selective_state_update_check(const Tensor& state, const Tensor& x, const Tensor& dt,
                                      const Tensor& A, const Tensor& B, const Tensor& C,
                                      const Tensor& D, const Tensor& z, const Tensor& dt_bias);

}  // namespace mamba::ops
