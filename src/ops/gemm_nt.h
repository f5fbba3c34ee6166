// ops::gemm_nt, the projections' prefill GEMM ("NT": the second operand transposed, as BLAS names
// it): y (M, N) = x (M, K) W^T for a weight W (N, K) stored row-major in fp32, bf16, f16, q8_0 or
// q4_0, every product and sum in fp32.
//
// The kernel (src/ops/gemm_nt.cpp): x is packed once per call into panels of 2 vectors of rows,
// transposed (K, 2 * lanes); W is taken 12 rows at a time where it is stored (fp32: no copy; other
// types converted to fp32 rows a chunk at a time, row-major), each weight broadcast from its row;
// a tile of 2 x 12 vector accumulators (2 * lanes rows of x by 12 weight rows) runs over
// the whole K, so each y element is one sequential fp32 sum over k. Threads take runs of weight
// rows from a shared counter; x is swept in groups of panels that stay in the L2 cache. It needs 32
// vector registers: ops::gemm_nt uses it when Highway's dispatch picks a 512-bit target (AVX-512),
// where it is ~1.5x faster than OpenBLAS's AVX2 sgemm on the Mamba projections
// (docs/PERFORMANCE.md), and calls mamba::gemm (the BLAS) otherwise, or when the environment
// variable MAMBA_GEMM=blas is set.
#pragma once
#include <cstdint>

#include "ops/half_matmul.h"

namespace mamba::ops {

// The weight operand: rows [0, N) start at `data` (fp32 `float*` when dtype is f32, 16-bit
// `uint16_t*` for bf16 / f16, the blocks' bytes for q8_0 / q4_0), row r at data + r * ld elements
// (weight_row_bytes(dtype, r * ld) bytes; K and ld whole blocks for q8_0 / q4_0, which the
// kernel dequantises row by row with the 16-bit ones' conversion step).
struct WeightRows {
  const void* data = nullptr;
  WeightDType dtype = WeightDType::f32;
  int64_t ld = 0;
};

// y (M, N) [ldy] = x (M, K) [ldx] W^T, plus the previous y when accumulate is true (a bias put in
// y beforehand). Throws on negative sizes or leading dimensions smaller than the rows.
void gemm_nt(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K, float* y,
             int64_t ldy, bool accumulate);

// One output block of gemm_nt_split: n columns, to y (M, n) [ldy].
struct GemmNtOut {
  int64_t n = 0;
  float* y = nullptr;
  int64_t ldy = 0;
};
// y = x W^T with y's columns split into blocks: weight rows [n_0 + ... + n_{i-1}, + n_i) give
// outs[i] (no accumulation). One call of the kernel (x packed once, one parallel region) instead
// of one per block; on the packed kernel the values are gemm_nt's bit for bit (each element is
// the same sum), on the BLAS (where gemm_nt_packed_active() is false) it is one gemm_nt per block.
void gemm_nt_split(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t K,
                   const GemmNtOut* outs, int64_t nouts);

// The argument checks of every y = x W^T kernel (gemm_nt, gemm_nt_split, gemm_nt_q8,
// gemm_nt_bf16): non-negative sizes, leading dimensions, null pointers, K and ldw whole blocks for
// block-quantised W, and either y (ldy >= N) or, when outs is given, output blocks whose columns
// sum to N. Throws mamba::Error naming `what`.
void check_gemm_nt_args(const char* what, const float* x, int64_t M, int64_t ldx,
                        const WeightRows& W, int64_t N, int64_t K, const float* y, int64_t ldy,
                        const GemmNtOut* outs = nullptr, int64_t nouts = 0);
// Where column n of such a product goes: y + n with row stride ldy, or (outs given) the output
// block holding column n.
struct GemmNtCol {
  float* p;
  int64_t ld;
};
GemmNtCol gemm_nt_out_col(int64_t n, float* y, int64_t ldy, const GemmNtOut* outs, int64_t nouts);

// The packed kernel itself on the best compiled SIMD target, whatever its width (tests compare it
// with the reference on every machine; ops::gemm_nt only takes it where it is fast).
void gemm_nt_packed(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                    float* y, int64_t ldy, bool accumulate);

// Whether ops::gemm_nt runs the packed kernel here: the SIMD target dispatch picks now is 512-bit,
// and MAMBA_GEMM != "blas" (read once).
bool gemm_nt_packed_active();

// The reference: plain loops, double accumulation, same arguments.
void gemm_nt_ref(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                 float* y, int64_t ldy, bool accumulate);

// The backward pass's fp32 products on the same packed tile (the BLAS where gemm_nt_packed_active()
// is false), every C element one sequential fp32 sum over k, whatever the thread count:
//   gemm_nn: C (M, N) [ldc] = A (M, K) [lda] B (K, N) [ldb]      (a linear's dx = dy W)
//   gemm_tn: C (M, N) [ldc] = A^T B, A stored (K, M) [lda]        (a linear's dW = dy^T x)
// plus the previous C when accumulate is true. Throws on negative sizes or leading dimensions
// smaller than the rows. The _packed variants run the packed kernel on any SIMD target (for the
// tests), the _ref ones are plain loops with double accumulation.
void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm_nn_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm_tn_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm_nn_ref(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate);
void gemm_tn_ref(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate);

}  // namespace mamba::ops
