// bf16 activations for bf16 weights (see ops/gemm_bf16.h): the AVX-512 BF16 prefill tile, the
// portable kernel with the same operations, and the reference. The vdpbf16ps code is raw
// intrinsics in functions compiled for AVX-512 F / BW / BF16 (Highway 1.0.3 has no target with
// BF16), called only after a run-time CPU check.
#include "ops/gemm_bf16.h"

#include "ops/aligned_buffer.h"

// GCC 12's AVX-512 headers build _mm512_undefined_*() from a self-initialised variable, which
// -Wmaybe-uninitialized reports inside every intrinsic that uses one (a false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <hwy/aligned_allocator.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "mamba/error.h"
#include "mamba/parallel.h"
#include "mamba/weight.h"

namespace mamba::ops {
namespace {

constexpr int64_t kMP = 32;  // x rows per panel (2 vectors of 16 fp32 lanes)
constexpr int kNB = 12;      // weight rows per tile: 2 x 12 fp32 accumulators

void check_bf16(const char* what, const float* x, int64_t M, int64_t ldx, const WeightRows& W,
                int64_t N, int64_t K, const float* y, int64_t ldy, const GemmNtOut* outs,
                int64_t nouts) {
  MAMBA_CHECK(W.dtype == WeightDType::bf16, what, ": bf16 activations need bf16 weights, got ",
              weight_dtype_name(W.dtype));
  check_gemm_nt_args(what, x, M, ldx, W, N, K, y, ldy, outs, nouts);
}

// ---- the portable kernel: vdpbf16ps's operations, one element at a time -------------------------

// Denormals to zero of the same sign (the instruction's DAZ on inputs, FTZ on results).
inline float flush(float v) { return std::fabs(v) < FLT_MIN ? std::copysign(0.f, v) : v; }
// One step of the instruction: acc + a * b, the product exact (both bf16), rounded once.
inline float dp_step(float acc, float a, float b) {
  return flush(std::fma(flush(a), flush(b), acc));
}

void gemm_bf16_portable_impl(const float* x, int64_t M, int64_t ldx, const WeightRows& W, int64_t N,
                             int64_t K, float* y, int64_t ldy, bool accumulate,
                             const GemmNtOut* outs, int64_t nouts) {
  std::vector<float> xb(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xb[m * K + k] = bf16_to_f32(f32_to_bf16(x[m * ldx + k]));
  const uint16_t* wbase = static_cast<const uint16_t*>(W.data);
  parallel_for(N, 8, [&](int64_t nb, int64_t ne) {
    std::vector<float> w(static_cast<size_t>(K));
    for (int64_t n = nb; n < ne; ++n) {
      for (int64_t k = 0; k < K; ++k) w[k] = bf16_to_f32(wbase[n * W.ld + k]);
      const GemmNtCol oc = gemm_nt_out_col(n, y, ldy, outs, nouts);
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xb.data() + m * K;
        float f = 0.f;
        int64_t k = 0;
        for (; k + 1 < K; k += 2) {
          f = dp_step(f, xm[k + 1], w[k + 1]);
          f = dp_step(f, xm[k], w[k]);
        }
        if (k < K) {  // the last pair of an odd K: (x[K - 1], 0)
          f = dp_step(f, 0.f, 0.f);
          f = dp_step(f, xm[k], w[k]);
        }
        float& out = oc.p[m * oc.ld];
        out = accumulate && !outs ? out + f : f;
      }
    }
  });
}

// ---- the vdpbf16ps tile -------------------------------------------------------------------------
// x is rounded and packed once per call into panels of kMP rows: for panel p and pair g the 32-bit
// word (x[2g] low, x[2g + 1] high) of each row i at xp[p][g][i]; rows past M are zeros. A tile
// broadcasts the 32-bit pair of each of its kNB weight rows, read where the row is stored.

bool cpu_has_bf16() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
}

// T[j][i] (kNB x kMP) = the sum of panel row i with tile weight row j.
__attribute__((target("avx512f,avx512bw,avx512bf16"))) inline void tile_bf16(
    const uint32_t* __restrict xp, const uint16_t* const* wr, int64_t K, float* __restrict T) {
  __m512 f0[kNB], f1[kNB];
#pragma GCC unroll 12
  for (int j = 0; j < kNB; ++j) f0[j] = f1[j] = _mm512_setzero_ps();
  const int64_t full = K / 2;
  for (int64_t g = 0; g < full; ++g) {
    const __m512bh x0 = (__m512bh)_mm512_load_si512(xp + g * kMP);
    const __m512bh x1 = (__m512bh)_mm512_load_si512(xp + g * kMP + 16);
#pragma GCC unroll 12
    for (int j = 0; j < kNB; ++j) {
      uint32_t w2;
      std::memcpy(&w2, wr[j] + 2 * g, 4);
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(w2));
      f0[j] = _mm512_dpbf16_ps(f0[j], x0, w);
      f1[j] = _mm512_dpbf16_ps(f1[j], x1, w);
    }
  }
  if (K % 2) {  // the last pair: (w[K - 1], 0)
    const __m512bh x0 = (__m512bh)_mm512_load_si512(xp + full * kMP);
    const __m512bh x1 = (__m512bh)_mm512_load_si512(xp + full * kMP + 16);
#pragma GCC unroll 12
    for (int j = 0; j < kNB; ++j) {
      const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(wr[j][K - 1]));
      f0[j] = _mm512_dpbf16_ps(f0[j], x0, w);
      f1[j] = _mm512_dpbf16_ps(f1[j], x1, w);
    }
  }
#pragma GCC unroll 12
  for (int j = 0; j < kNB; ++j) {
    _mm512_store_ps(T + j * kMP, f0[j]);
    _mm512_store_ps(T + j * kMP + 16, f1[j]);
  }
}

struct DpJob {
  const uint32_t* xp;  // (np, ceil(K / 2), kMP)
  int64_t M, N, K, np, G;
  const uint16_t* wbase;
  int64_t ldw;
  float* y;
  int64_t ldy;
  bool accumulate;
  const GemmNtOut* outs;
  int64_t nouts;
};

// Tiles [c0, c1) (kNB weight rows each) against every panel, panels in groups of G (L2-resident).
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dp_run(const DpJob& J, int64_t c0,
                                                                   int64_t c1) {
  static thread_local AlignedBuffer<float> tile_buf;
  float* tile = tile_buf.get(static_cast<size_t>(kNB * kMP));
  const int64_t pp = (J.K + 1) / 2 * kMP;  // words per panel
  for (int64_t g0 = 0; g0 < J.np; g0 += J.G)
    for (int64_t b = c0; b < c1; ++b) {
      const int64_t n0 = b * kNB, nr = std::min<int64_t>(kNB, J.N - n0);
      const uint16_t* wr[kNB];
      for (int j = 0; j < kNB; ++j)  // rows past nr repeat the last (not stored)
        wr[j] = J.wbase + (n0 + std::min<int64_t>(j, nr - 1)) * J.ldw;
      int64_t nrun = 0, rja[kNB + 1];
      float* ry[kNB];
      int64_t rld[kNB];
      if (J.outs) {
        for (int64_t j = 0, o = 0, ob = 0; j < nr;) {
          while (o + 1 < J.nouts && n0 + j >= ob + J.outs[o].n) ob += J.outs[o++].n;
          const int64_t je = std::min(nr, ob + J.outs[o].n - n0);
          rja[nrun] = j, ry[nrun] = J.outs[o].y + (n0 + j - ob), rld[nrun] = J.outs[o].ldy;
          ++nrun, j = je;
        }
        rja[nrun] = nr;
      }
      for (int64_t p = g0; p < std::min(J.np, g0 + J.G); ++p) {
        tile_bf16(J.xp + p * pp, wr, J.K, tile);
        const int64_t mr = std::min(kMP, J.M - p * kMP);
        if (!J.outs) {
          for (int64_t i = 0; i < mr; ++i) {
            float* yr = J.y + (p * kMP + i) * J.ldy + n0;
            if (J.accumulate)
              for (int64_t j = 0; j < nr; ++j) yr[j] += tile[j * kMP + i];
            else
              for (int64_t j = 0; j < nr; ++j) yr[j] = tile[j * kMP + i];
          }
        } else {
          for (int64_t r = 0; r < nrun; ++r)
            for (int64_t i = 0; i < mr; ++i) {
              float* yr = ry[r] + (p * kMP + i) * rld[r];
              for (int64_t j = rja[r]; j < rja[r + 1]; ++j) yr[j - rja[r]] = tile[j * kMP + i];
            }
        }
      }
    }
}

void gemm_bf16_dp_impl(const float* x, int64_t M, int64_t ldx, const WeightRows& W, int64_t N,
                       int64_t K, float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs,
                       int64_t nouts) {
  const int64_t np = (M + kMP - 1) / kMP, npair = (K + 1) / 2, pp = npair * kMP;
  static thread_local AlignedBuffer<uint32_t> xp_buf;
  uint32_t* xp = xp_buf.get(static_cast<size_t>(np * pp));
  parallel_for(np, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      uint32_t* dst = xp + p * pp;
      const int64_t mr = std::min(kMP, M - p * kMP);
      for (int64_t i = 0; i < kMP; ++i) {
        if (i >= mr) {  // rows past M: zeros
          for (int64_t g = 0; g < npair; ++g) dst[g * kMP + i] = 0;
          continue;
        }
        const float* xr = x + (p * kMP + i) * ldx;
        for (int64_t g = 0; g < npair; ++g) {
          const uint32_t lo = f32_to_bf16(xr[2 * g]);
          const uint32_t hi = 2 * g + 1 < K ? f32_to_bf16(xr[2 * g + 1]) : 0u;
          dst[g * kMP + i] = lo | (hi << 16);
        }
      }
    }
  });
  DpJob J{xp,
          M,
          N,
          K,
          np,
          std::max<int64_t>(1, (384 << 10) / (2 * kMP * std::max<int64_t>(K, 1))),
          static_cast<const uint16_t*>(W.data),
          W.ld,
          y,
          ldy,
          accumulate,
          outs,
          nouts};
  const int64_t nb = (N + kNB - 1) / kNB;
  const int64_t T = std::max(1, num_threads());
  const int64_t chunk = std::max<int64_t>(1, (1 << 20) / (kNB * K));
  const int64_t run = std::max<int64_t>(1, std::min(chunk, nb / (8 * T)));
  parallel_for_dynamic(nb, run, 1, [&](int64_t c0, int64_t c1) { dp_run(J, c0, c1); });
}

bool trivial(int64_t M, int64_t N, int64_t K, float* y, int64_t ldy, bool accumulate,
             const GemmNtOut* outs, int64_t nouts) {
  if (M == 0 || N == 0) return true;
  if (K > 0) return false;
  if (outs) {
    for (int64_t i = 0; i < nouts; ++i)
      for (int64_t m = 0; m < M; ++m)
        std::fill(outs[i].y + m * outs[i].ldy, outs[i].y + m * outs[i].ldy + outs[i].n, 0.f);
  } else if (!accumulate) {
    for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy, y + m * ldy + N, 0.f);
  }
  return true;
}

}  // namespace

bool gemm_bf16_dp_available() {
  static const bool ok = [] {
    const char* e = std::getenv("MAMBA_ACT_BF16");
    if (e && std::string(e) == "portable") return false;
    return cpu_has_bf16();
  }();
  return ok;
}

void gemm_nt_bf16(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                  float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs, int64_t nouts) {
  check_bf16("gemm_nt_bf16", x, M, ldx, W, N, K, y, ldy, outs, nouts);
  if (trivial(M, N, K, y, ldy, accumulate, outs, nouts)) return;
  if (gemm_bf16_dp_available())
    gemm_bf16_dp_impl(x, M, ldx, W, N, K, y, ldy, accumulate, outs, nouts);
  else
    gemm_bf16_portable_impl(x, M, ldx, W, N, K, y, ldy, accumulate, outs, nouts);
}

void gemm_nt_bf16_portable(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N,
                           int64_t K, float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs,
                           int64_t nouts) {
  check_bf16("gemm_nt_bf16_portable", x, M, ldx, W, N, K, y, ldy, outs, nouts);
  if (trivial(M, N, K, y, ldy, accumulate, outs, nouts)) return;
  gemm_bf16_portable_impl(x, M, ldx, W, N, K, y, ldy, accumulate, outs, nouts);
}

void gemm_nt_bf16_ref(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                      float* y, int64_t ldy, bool accumulate) {
  check_bf16("gemm_nt_bf16_ref", x, M, ldx, W, N, K, y, ldy, nullptr, 0);
  const uint16_t* w = static_cast<const uint16_t*>(W.data);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t m = 0; m < M; ++m) {
      double acc = accumulate ? y[m * ldy + n] : 0.0;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<double>(bf16_to_f32(f32_to_bf16(x[m * ldx + k]))) *
               bf16_to_f32(w[n * W.ld + k]);
      y[m * ldy + n] = static_cast<float>(acc);
    }
}

}  // namespace mamba::ops
