#include "core/gemm.h"

#include <algorithm>
#include <vector>

#include "mamba/error.h"
#include "mamba/parallel.h"

#ifdef MAMBA_HAVE_CBLAS
#include <cblas.h>
extern "C" void openblas_set_num_threads(int) __attribute__((weak));
extern "C" int openblas_get_num_threads(void) __attribute__((weak));
extern "C" int openblas_get_parallel(void) __attribute__((weak));
#endif

namespace mamba {

const char* blas_name() { return MAMBA_BLAS_KIND; }

namespace detail {
void set_blas_threads(int n) {
#ifdef MAMBA_HAVE_CBLAS
  if (openblas_set_num_threads) openblas_set_num_threads(n);
#else
  (void)n;
#endif
}
}  // namespace detail

#ifndef MAMBA_HAVE_CBLAS
namespace {
// Fallback: C = alpha*op(A)op(B) + beta*C with rows of C split across threads.
void gemm_builtin(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                  int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  parallel_for(M, 4, [&](int64_t m0, int64_t m1) {
    std::vector<float> acc(static_cast<size_t>(N));
    for (int64_t m = m0; m < m1; ++m) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k = 0; k < K; ++k) {
        float a = ta ? A[k * lda + m] : A[m * lda + k];
        if (a == 0.f) continue;
        if (!tb) {
          const float* b = B + k * ldb;
          for (int64_t n = 0; n < N; ++n) acc[n] += a * b[n];
        } else {
          for (int64_t n = 0; n < N; ++n) acc[n] += a * B[n * ldb + k];
        }
      }
      float* c = C + m * ldc;
      for (int64_t n = 0; n < N; ++n) c[n] = alpha * acc[n] + (beta == 0.f ? 0.f : beta * c[n]);
    }
  });
}
}  // namespace
#endif

#ifdef MAMBA_HAVE_CBLAS
namespace {
void sgemm_block(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                 int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, A,
              static_cast<int>(lda), B, static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
}

// Below this many multiply-adds one BLAS call on one thread is as fast as splitting it.
constexpr int64_t kSplitMinWork = int64_t{1} << 21;

// The OpenBLAS we link is the OpenMP one (it shares our OpenMP pool), but the library actually
// loaded is whichever libopenblas.so.0 the process loaded first: in a Python process that
// imported Debian's torch before mambacpp it is the pthreads OpenBLAS. Its worker threads
// busy-wait for the next call long after each call returns, so they and our OpenMP threads
// (which spin the same way) would fight over the cores: the layer's backward ran about 2x
// slower. openblas_get_parallel(): 0 sequential, 1 pthreads, 2 OpenMP.
bool blas_has_own_thread_pool() {
  static const bool own =
      openblas_get_parallel && openblas_set_num_threads && openblas_get_parallel() == 1;
  return own;
}
}  // namespace
#endif

void gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
          int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  MAMBA_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm: negative size M=", M, " N=", N, " K=", K);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = beta == 0.f ? 0.f : beta * C[m * ldc + n];
    return;
  }
#ifdef MAMBA_HAVE_CBLAS
  if (M == 1) {
    // One row (decode): a GEMV. sgemm would pack the whole of B for a single row, which
    // costs more than the multiply; sgemv streams B once.
    const int incx = ta ? static_cast<int>(lda) : 1;
    if (tb)  // C (1, N) = a (1, K) . B^T, B stored (N, K): y = B a
      cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(N), static_cast<int>(K), alpha, B,
                  static_cast<int>(ldb), A, incx, beta, C, 1);
    else  // B stored (K, N): y = B^T a
      cblas_sgemv(CblasRowMajor, CblasTrans, static_cast<int>(K), static_cast<int>(N), alpha, B,
                  static_cast<int>(ldb), A, incx, beta, C, 1);
    return;
  }
  if (blas_has_own_thread_pool() && num_threads() > 1 && !in_parallel() &&
      M * N * K >= kSplitMinWork) {
    // A BLAS with its own pthreads pool (see blas_has_own_thread_pool): run it on one thread
    // per block of C, inside our pool, and restore its thread count for the other users of
    // that library (torch's matmuls) afterwards.
    const int saved = openblas_get_num_threads ? openblas_get_num_threads() : 1;
    openblas_set_num_threads(1);
    const int64_t parts = num_threads();
    if (M >= N) {  // blocks of rows of C: rows of op(A)
      parallel_for(parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t m0 = M * p / parts, m1 = M * (p + 1) / parts;
          if (m1 > m0)
            sgemm_block(ta, tb, m1 - m0, N, K, alpha, ta ? A + m0 : A + m0 * lda, lda, B, ldb, beta,
                        C + m0 * ldc, ldc);
        }
      });
    } else {  // blocks of columns of C: columns of op(B), 16 at a time
      const int64_t tiles = (N + 15) / 16;
      parallel_for(parts, 1, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n0 = std::min(N, tiles * p / parts * 16);
          const int64_t n1 = std::min(N, tiles * (p + 1) / parts * 16);
          if (n1 > n0)
            sgemm_block(ta, tb, M, n1 - n0, K, alpha, A, lda, tb ? B + n0 * ldb : B + n0, ldb, beta,
                        C + n0, ldc);
        }
      });
    }
    openblas_set_num_threads(saved);
    return;
  }
  sgemm_block(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#else
  gemm_builtin(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
#endif
}

}  // namespace mamba
