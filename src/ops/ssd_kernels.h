// The SSD forward's per-head chunk products (src/ops/ssd.cpp), written for these small shapes
// (Q = 64 tokens, P = 64, N = 128 in every released Mamba-2) instead of three BLAS calls per head
// and chunk, whose call overhead and packing dominated at this size. Internal header (the tests
// compare the kernels with the plain-loop references below on every compiled SIMD target).
//
// A register tile of R output rows x up to V vectors of columns (AVX-512: 6 x 4, 24
// accumulators; narrower targets 4 x 2) runs over the whole inner dimension, each output element
// one sequential fp32 sum over k; columns past the last whole vector run in plain loops with the
// same sums in the same order.
#pragma once
#include <cstdint>

namespace mamba::ops {

// One head's chunk output, rows i < Qc, columns p < P:
//   Y[i][p] = ecs[i] * sum_{n<N} C[i][n] ST[n][p]  +  sum_{j<=i} M[i][j] X[j][p]
// C: (Qc, N) [ldc], ST: the entering state transposed (N, P) contiguous, or nullptr for a zero
// state (the first term is skipped); M: (Qc, Qc) [ldm], the decay-masked C B^T (diagonal
// included), which must be zero above its diagonal (a row tile reads up to its last row's
// diagonal); X: (Qc, P) [ldx]; Y: (Qc, P) [ldy], overwritten.
void ssd_chunk_y(int64_t Qc, int64_t P, int64_t N, const float* C, int64_t ldc, const float* ST,
                 const float* ecs, const float* M, int64_t ldm, const float* X, int64_t ldx,
                 float* Y, int64_t ldy);
// The state's update over one chunk, in place:
//   ST[n][p] = decay * ST[n][p] + sum_{j<Qc} B[j][n] Xw[j][p]
// B: (Qc, N) [ldb]; Xw: (Qc, P) [ldxw] (X with row j scaled by w_j); ST: (N, P) contiguous.
void ssd_chunk_state(int64_t Qc, int64_t P, int64_t N, const float* B, int64_t ldb, const float* Xw,
                     int64_t ldxw, float decay, float* ST);

// One head's chunk of decay factors: from the cumulative log-decay cs_i = sum_{k<=i} dt_k A
// (double), dt and the chunk's C B^T rows cb (Qc, Qc) [ldcb], with e_ij = exp(float(min(cs_i -
// cs_j, 88))) (the difference in double, the exponential the vectorised fp32 one):
//   M[i][j] = cb[i][j] e_ij dt_j (j <= i), 0 above the diagonal up to Qc, + dself on the diagonal
//   w[j] = e_{Qc-1,j} dt_j,   ecs[i] = exp(float(min(cs_i, 88)))
// cs, dt, cb's rows and M's rows are read / written up to one vector of doubles past their end
// (the caller pads its buffers by kSsdPad floats / doubles); M (Qc, Qc) [ldm], w and ecs (Qc).
constexpr int64_t kSsdPad = 16;
void ssd_chunk_decay(int64_t Qc, const double* cs, const float* dt, const float* cb, int64_t ldcb,
                     float dself, float* M, int64_t ldm, float* w, float* ecs);

// The references: plain loops, double accumulation, same arguments.
void ssd_chunk_y_ref(int64_t Qc, int64_t P, int64_t N, const float* C, int64_t ldc, const float* ST,
                     const float* ecs, const float* M, int64_t ldm, const float* X, int64_t ldx,
                     float* Y, int64_t ldy);
void ssd_chunk_state_ref(int64_t Qc, int64_t P, int64_t N, const float* B, int64_t ldb,
                         const float* Xw, int64_t ldxw, float decay, float* ST);
// (std::exp in place of the vectorised one: equal within fp32 rounding, not bit for bit)
void ssd_chunk_decay_ref(int64_t Qc, const double* cs, const float* dt, const float* cb,
                         int64_t ldcb, float dself, float* M, int64_t ldm, float* w, float* ecs);

}  // namespace mamba::ops
