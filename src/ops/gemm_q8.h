// Opt-in 8-bit activations for q8_0 / q4_0 weights (mamba::set_activation_type(ActivationType::q8),
// the CLI's --activations q8): llama.cpp's numerics for the projections' products, prefill and
// decode.
//   x (M, K) is quantised once per call into q8_0 blocks along K, exactly as ggml's reference
//   quantize_row_q8_0 (and mamba::quantise_blocks): per block of 32 values d_x = max|x| / 127
//   (stored as f16, round to nearest even), q = round(x / d_x) with 1 / d_x taken from the fp32
//   d_x, halves away from zero, q in [-127, 127]. A block holding a NaN or an infinity gets
//   d_x = NaN and q = 0, so the outputs it reaches are NaN, as with fp32 activations.
//   Each block's dot product with the weight block is an exact integer:
//     q8_0: isum = sum_j w_j q_j,            w_j in [-128, 127]
//     q4_0: isum = sum_j (nib_j - 8) q_j,    nib_j in [0, 15]
//   and y[m][n] = sum over the K / 32 blocks b, in order, of isum_b * (d_w,b * d_x,b) in fp32: one
//   fused multiply-add per block (d_w * d_x is exact in fp32: two f16 values), so each output is
//   one sequential fp32 sum over the blocks whatever the thread count.
// Kernels: gemm_nt_q8 runs, where the CPU has AVX-512 VNNI (gemm_q8_vnni_available), the prefill
// tile for M > 16 (vpdpbusd: the weights as u8, w + 128 or the nibble, times x as s8, the offset
// 128 * sum(q) or 8 * sum(q) subtracted exactly in int32) or for M <= 16 (decode) a streaming
// kernel that reads the weight rows in place (1-2 rows of x: k in the lanes and the 16 weight
// rows' block sums added by a transposition tree; 3-16 rows: the rows of x in the lanes), every
// element by the same operations; otherwise the portable scalar kernel
// gemm_nt_q8_portable, which does the same fp32 operations in the same order (std::fma): both
// give the same bits. gemm_nt_q8_ref is the reference: the same quantisation, the integer dot per
// block, the sum in double.
#pragma once
#include <cstdint>

#include "ops/gemm_nt.h"

namespace mamba::ops {

// n values of x (n a multiple of 32) as q8_0 blocks (34 bytes each: f16 d, 32 int8), the rules
// above; vectorised where the CPU has AVX-512. quantise_activations_ref: plain scalar loops.
void quantise_activations(const float* x, int64_t n, uint8_t* dst);
void quantise_activations_ref(const float* x, int64_t n, uint8_t* dst);

// Whether this CPU runs the VNNI tile (AVX-512 F, BW and VNNI) and MAMBA_ACT_Q8 != "portable".
bool gemm_q8_vnni_available();

// y (M, N) [ldy] (+)= q8(x) (M, K) [ldx] W^T for q8_0 / q4_0 W (K a multiple of 32); outs
// (nouts > 0): y's columns in blocks as gemm_nt_split (y, ldy and accumulate unused). Throws for
// another dtype or bad sizes.
void gemm_nt_q8(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs = nullptr,
                int64_t nouts = 0);
// The same on the portable kernel (any CPU; slow: scalar integer dot products).
void gemm_nt_q8_portable(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                         float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs = nullptr,
                         int64_t nouts = 0);
// The reference (y only, no outs): sum in double of the exact per-block terms.
void gemm_nt_q8_ref(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                    float* y, int64_t ldy, bool accumulate);

}  // namespace mamba::ops
