// One small GEMM interface over the BLAS (row-major). With no BLAS at build time a blocked
// built-in kernel is used, so the library still builds on any platform.
#pragma once
#include <cstdint>

namespace mamba {

// C (M, N) = alpha * op(A) (M, K) * op(B) (K, N) + beta * C, all row-major.
// op(A) = A (M, K), lda >= K  or, if trans_a, A is stored (K, M), lda >= M. Same for B.
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

const char* blas_name();  // which GEMM this build uses

namespace detail {
void set_blas_threads(int n);
}

}  // namespace mamba
