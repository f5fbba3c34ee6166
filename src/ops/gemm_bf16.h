// Opt-in bf16 activations for bf16 weights (mamba::set_activation_type(ActivationType::bf16), the
// CLI's --activations bf16): the prefill GEMM (M > 16 rows) on AVX-512 BF16's vdpbf16ps.
//   x (M, K) is rounded once per call to bf16 (mamba::f32_to_bf16: round to nearest even, a NaN
//   stays a NaN). Each output is one fp32 accumulator that runs over k in pairs (2g, 2g + 1),
//   g = 0, 1, ..., in order (an odd K's last pair has a zero in place of k = K); per pair, as
//   Intel's pseudo-code for VDPBF16PS:
//       acc = acc + x[2g + 1] * w[2g + 1]      (rounded to fp32, nearest even)
//       acc = acc + x[2g] * w[2g]
//   Products of two bf16 values are exact in fp32 (8-bit significands) unless they leave fp32's
//   normal range; the instruction treats denormal inputs as zero and flushes denormal results to
//   zero (DAZ / FTZ, MXCSR ignored), which the portable kernel does too (std::fma, then flush).
//   So each output is one sequential fp32 sum whatever the thread count.
// Kernels: gemm_nt_bf16 runs the vdpbf16ps tile where the CPU has AVX-512 BF16
// (gemm_bf16_dp_available; x packed in panels of 32 rows, the weight pairs broadcast from the rows
// where they are stored, no conversion), otherwise the portable scalar kernel gemm_nt_bf16_portable
// with the same operations in the same order (the same bits; the tests compare them).
// gemm_nt_bf16_ref is the reference: the same bf16 x, products and sum in double.
// Decode (M <= 16, ops::linear's streaming kernel) is not changed: fp32 activations there.
#pragma once
#include <cstdint>

#include "ops/gemm_nt.h"

namespace mamba::ops {

// Whether this CPU runs the vdpbf16ps tile (AVX-512 F, BW and BF16) and MAMBA_ACT_BF16 !=
// "portable".
bool gemm_bf16_dp_available();

// y (M, N) [ldy] (+)= bf16(x) (M, K) [ldx] W^T for bf16 W; outs (nouts > 0): y's columns in blocks
// as gemm_nt_split (y, ldy and accumulate unused). Throws for another dtype or bad sizes.
void gemm_nt_bf16(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                  float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs = nullptr,
                  int64_t nouts = 0);
// The same on the portable kernel (any CPU; slow: scalar).
void gemm_nt_bf16_portable(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N,
                           int64_t K, float* y, int64_t ldy, bool accumulate,
                           const GemmNtOut* outs = nullptr, int64_t nouts = 0);
// The reference (y only): bf16(x) times W, summed in double, rounded once.
void gemm_nt_bf16_ref(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                      float* y, int64_t ldy, bool accumulate);

}  // namespace mamba::ops
