// 8-bit activations for q8_0 / q4_0 weights (see ops/gemm_q8.h): the activation quantiser, the
// AVX-512 VNNI prefill tile, the portable kernel with the same operations, and the reference.
// The VNNI code is raw intrinsics in functions compiled for AVX-512 F / BW / VNNI (Highway 1.0.3
// has no target with VNNI), called only after a run-time CPU check.
#include "ops/gemm_q8.h"

#include "ops/aligned_buffer.h"

// GCC 12's AVX-512 headers build _mm512_undefined_*() from a self-initialised variable, which
// -Wmaybe-uninitialized reports inside every intrinsic that uses one (a false positive).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <hwy/aligned_allocator.h>
#include <immintrin.h>

#include <algorithm>
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

constexpr int64_t kMP = 32;  // x rows per panel (2 vectors of 16 int32 lanes)
constexpr int kNB = 6;       // weight rows per tile: 2 x 6 int32 + 2 x 6 fp32 accumulators
constexpr int64_t kQB = 34;  // bytes of a q8_0 block

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
void wr16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v), p[1] = static_cast<uint8_t>(v >> 8);
}
constexpr uint16_t kF16NaN = 0x7E00;

// ---- the activation quantiser -------------------------------------------------------------------

// One block of 32 values into o (34 bytes): ggml's quantize_row_q8_0_reference, plus the
// non-finite rule (d = NaN, q = 0).
void quant_block_scalar(const float* x, uint8_t* o) {
  float amax = 0.f;
  bool finite = true;
  for (int j = 0; j < 32; ++j) {
    finite = finite && std::isfinite(x[j]);
    amax = std::max(amax, std::fabs(x[j]));
  }
  if (!finite) {
    wr16(o, kF16NaN);
    std::memset(o + 2, 0, 32);
    return;
  }
  const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
  wr16(o, f32_to_f16(d));
  for (int j = 0; j < 32; ++j)
    o[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
}

bool cpu_has_avx512bw() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

// x rounded half away from zero (std::round's rule): truncated, then moved one away from zero
// where the exact remainder is at least one half.
__attribute__((target("avx512f,avx512bw"))) inline __m512 round_away(__m512 v) {
  const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
  const __m512i one = _mm512_castps_si512(_mm512_set1_ps(1.f));
  const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask16 up =
      _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(v, t)), _mm512_set1_ps(0.5f), _CMP_GE_OQ);
  const __m512 s1 = _mm512_castsi512_ps(
      _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v), sign), one));  // copysign(1, v)
  return _mm512_mask_add_ps(t, up, t, s1);
}

// quant_block_scalar on 16 lanes: |x|, its maximum and x * id as above, then round_away.
__attribute__((target("avx512f,avx512bw"))) void quant_blocks_avx512(const float* x, int64_t nblk,
                                                                     uint8_t* o) {
  const __m512 inf = _mm512_set1_ps(INFINITY);
  for (int64_t b = 0; b < nblk; ++b, x += 32, o += kQB) {
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);
    const __mmask16 f0 = _mm512_cmp_ps_mask(a0, inf, _CMP_LT_OQ),
                    f1 = _mm512_cmp_ps_mask(a1, inf, _CMP_LT_OQ);
    if ((f0 & f1) != 0xFFFF) {  // a NaN or an infinity
      wr16(o, kF16NaN);
      std::memset(o + 2, 0, 32);
      continue;
    }
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(a0, a1));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    wr16(o, f32_to_f16(d));
    const __m512 s = _mm512_set1_ps(id);
    const __m512i q0 = _mm512_cvttps_epi32(round_away(_mm512_mul_ps(v0, s)));
    const __m512i q1 = _mm512_cvttps_epi32(round_away(_mm512_mul_ps(v1, s)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 18), _mm512_cvtepi32_epi8(q1));
  }
}

void check_q8(const char* what, const float* x, int64_t M, int64_t ldx, const WeightRows& W,
              int64_t N, int64_t K, const float* y, int64_t ldy, const GemmNtOut* outs,
              int64_t nouts) {
  MAMBA_CHECK(is_quantised(W.dtype), what, ": 8-bit activations need q8_0 or q4_0 weights, got ",
              weight_dtype_name(W.dtype));
  check_gemm_nt_args(what, x, M, ldx, W, N, K, y, ldy, outs, nouts);
}

// Weight row n's blocks as signed int8 values (q8_0: q; q4_0: nibble - 8) and fp32 scales.
void weight_row_s8(const uint8_t* row, WeightDType t, int64_t nbk, int8_t* q, float* d) {
  const bool q4 = t == WeightDType::q4_0;
  for (int64_t b = 0; b < nbk; ++b) {
    const uint8_t* s = row + b * (q4 ? 18 : 34);
    d[b] = f16_to_f32(rd16(s));
    for (int j = 0; j < (q4 ? 16 : 32); ++j) {
      if (q4) {
        q[32 * b + j] = static_cast<int8_t>((s[2 + j] & 0x0F) - 8);
        q[32 * b + j + 16] = static_cast<int8_t>((s[2 + j] >> 4) - 8);
      } else {
        q[32 * b + j] = static_cast<int8_t>(s[2 + j]);
      }
    }
  }
}

// x's rows as q8_0 blocks, row-major: row m at xq + m * nbk * 34.
void quantise_x_rows(const float* x, int64_t M, int64_t ldx, int64_t K, uint8_t* xq) {
  const int64_t rb = K / 32 * kQB;
  parallel_for(M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantise_activations(x + m * ldx, K, xq + m * rb);
  });
}

// ---- the portable kernel: the VNNI tile's operations, one element at a time
// ------------------------

void gemm_q8_portable_impl(const float* x, int64_t M, int64_t ldx, const WeightRows& W, int64_t N,
                           int64_t K, float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs,
                           int64_t nouts) {
  const int64_t nbk = K / 32, rb = nbk * kQB;
  std::vector<uint8_t> xq(static_cast<size_t>(M * rb));
  quantise_x_rows(x, M, ldx, K, xq.data());
  std::vector<float> dx(static_cast<size_t>(M * nbk));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nbk; ++b) dx[m * nbk + b] = f16_to_f32(rd16(&xq[m * rb + b * kQB]));
  const int64_t wrow = weight_row_bytes(W.dtype, W.ld);
  const uint8_t* wbase = static_cast<const uint8_t*>(W.data);
  parallel_for(N, 8, [&](int64_t nb, int64_t ne) {
    std::vector<int8_t> wq(static_cast<size_t>(K));
    std::vector<float> dw(static_cast<size_t>(nbk));
    for (int64_t n = nb; n < ne; ++n) {
      weight_row_s8(wbase + n * wrow, W.dtype, nbk, wq.data(), dw.data());
      const GemmNtCol oc = gemm_nt_out_col(n, y, ldy, outs, nouts);
      for (int64_t m = 0; m < M; ++m) {
        float f = 0.f;
        for (int64_t b = 0; b < nbk; ++b) {
          const int8_t* q = reinterpret_cast<const int8_t*>(&xq[m * rb + b * kQB + 2]);
          int32_t isum = 0;
          for (int j = 0; j < 32; ++j) isum += int32_t{wq[32 * b + j]} * q[j];
          const float s = dw[b] * dx[m * nbk + b];  // exact: two f16 values
          f = std::fma(static_cast<float>(isum), s, f);
        }
        float& out = oc.p[m * oc.ld];
        out = accumulate && !outs ? out + f : f;
      }
    }
  });
}

// ---- the VNNI kernel
// ------------------------------------------------------------------------------ x is quantised and
// packed once per call into panels of kMP rows: for panel p, k-group g (4 consecutive k) the 4
// bytes of each row i at xq[p][g][i] (128 bytes per group: 2 vectors of 16 int32 lanes), and per
// block b the rows' scales dx[p][b][i] (fp32 of the f16 d_x) and the offsets -off * sum_j q[i][32 b
// + j] (off = 128 for q8_0 weights, 8 for q4_0) that start each block's int32 accumulators. The
// weights are converted a run of tiles at a time into u8 rows (q8_0: w + 128; q4_0: the nibbles in
// k order) and fp32 scales; a tile broadcasts 4 bytes of each of its kNB rows against the 2 vectors
// of x.

struct Panels {
  const int8_t* xq;   // (np, K / 4, kMP, 4)
  const float* dx;    // (np, nbk, kMP)
  const int32_t* cr;  // (np, nbk, kMP)
  int64_t K, nbk;
};

__attribute__((target("avx512f,avx512bw,avx512vnni"))) void convert_weight_rows(
    const uint8_t* wbase, int64_t wrow, WeightDType t, int64_t r0, int64_t r1, int64_t K,
    uint8_t* wu, float* ws) {
  const int64_t nbk = K / 32;
  const __m128i lo4 = _mm_set1_epi8(0x0F);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* s = wbase + n * wrow;
    uint8_t* du = wu + (n - r0) * K;
    float* ds = ws + (n - r0) * nbk;
    if (t == WeightDType::q8_0) {
      for (int64_t b = 0; b < nbk; ++b, s += 34) {
        ds[b] = f16_to_f32(rd16(s));
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 2));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(du + 32 * b), _mm256_xor_si256(v, flip));
      }
    } else {
      for (int64_t b = 0; b < nbk; ++b, s += 18) {
        ds[b] = f16_to_f32(rd16(s));
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 2));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(du + 32 * b), _mm_and_si128(v, lo4));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(du + 32 * b + 16),
                         _mm_and_si128(_mm_srli_epi16(v, 4), lo4));
      }
    }
  }
}

// T[j][i] (kNB x kMP) = y of panel row i, tile weight row j: per block b the exact int32 dot
// (started at the offset), then f = fma(float(isum), dx * dw, f).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void tile_q8(
    const int8_t* __restrict xq, const float* __restrict dx, const int32_t* __restrict cr,
    const uint8_t* const* wr, const float* const* ws, int64_t nbk, float* __restrict T) {
  __m512 f0[kNB], f1[kNB];
#pragma GCC unroll 8
  for (int j = 0; j < kNB; ++j) f0[j] = f1[j] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nbk; ++b) {
    const __m512i c0 = _mm512_load_si512(cr + b * kMP), c1 = _mm512_load_si512(cr + b * kMP + 16);
    __m512i i0[kNB], i1[kNB];
#pragma GCC unroll 8
    for (int j = 0; j < kNB; ++j) i0[j] = c0, i1[j] = c1;
    const int8_t* xb = xq + b * 8 * 128;
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
      const __m512i x0 = _mm512_load_si512(xb + g * 128), x1 = _mm512_load_si512(xb + g * 128 + 64);
#pragma GCC unroll 8
      for (int j = 0; j < kNB; ++j) {
        int32_t w4;
        std::memcpy(&w4, wr[j] + b * 32 + g * 4, 4);
        const __m512i w = _mm512_set1_epi32(w4);
        i0[j] = _mm512_dpbusd_epi32(i0[j], w, x0);
        i1[j] = _mm512_dpbusd_epi32(i1[j], w, x1);
      }
    }
    const __m512 d0 = _mm512_load_ps(dx + b * kMP), d1 = _mm512_load_ps(dx + b * kMP + 16);
#pragma GCC unroll 8
    for (int j = 0; j < kNB; ++j) {
      const __m512 s = _mm512_set1_ps(ws[j][b]);
      f0[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0[j]), _mm512_mul_ps(d0, s), f0[j]);
      f1[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1[j]), _mm512_mul_ps(d1, s), f1[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < kNB; ++j) {
    _mm512_store_ps(T + j * kMP, f0[j]);
    _mm512_store_ps(T + j * kMP + 16, f1[j]);
  }
}

struct VnniJob {
  Panels P;
  int64_t M, N, np, G;
  const uint8_t* wbase;
  int64_t wrow;
  WeightDType dt;
  float* y;
  int64_t ldy;
  bool accumulate;
  const GemmNtOut* outs;
  int64_t nouts;
};

// Tiles [c0, c1) (kNB weight rows each) against every panel; as GemmNtKernel's sweep.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_run(const VnniJob& J, int64_t c0,
                                                                     int64_t c1) {
  static thread_local AlignedBuffer<uint8_t> wu_buf;
  static thread_local AlignedBuffer<float> ws_buf, tile_buf;
  const int64_t K = J.P.K, nbk = J.P.nbk;
  const int64_t r0 = c0 * kNB, r1 = std::min(J.N, c1 * kNB);
  uint8_t* wu = wu_buf.get(static_cast<size_t>((r1 - r0) * K));
  float* ws = ws_buf.get(static_cast<size_t>((r1 - r0) * nbk));
  float* tile = tile_buf.get(static_cast<size_t>(kNB * kMP));
  convert_weight_rows(J.wbase, J.wrow, J.dt, r0, r1, K, wu, ws);
  for (int64_t g0 = 0; g0 < J.np; g0 += J.G)
    for (int64_t b = c0; b < c1; ++b) {
      const int64_t n0 = b * kNB, nr = std::min<int64_t>(kNB, J.N - n0);
      const uint8_t* wr[kNB];
      const float* wsr[kNB];
      for (int j = 0; j < kNB; ++j) {  // rows past nr repeat the last (not stored)
        const int64_t r = n0 + std::min<int64_t>(j, nr - 1) - r0;
        wr[j] = wu + r * K, wsr[j] = ws + r * nbk;
      }
      // The tile's columns as runs [rja[r], rja[r + 1]) within one output (as GemmNtKernel).
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
        tile_q8(J.P.xq + p * kMP * K, J.P.dx + p * nbk * kMP, J.P.cr + p * nbk * kMP, wr, wsr, nbk,
                tile);
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

void gemm_q8_vnni_impl(const float* x, int64_t M, int64_t ldx, const WeightRows& W, int64_t N,
                       int64_t K, float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs,
                       int64_t nouts) {
  const int64_t nbk = K / 32, np = (M + kMP - 1) / kMP, rb = nbk * kQB;
  const int32_t off = W.dtype == WeightDType::q8_0 ? 128 : 8;
  static thread_local AlignedBuffer<int8_t> xq_buf;
  static thread_local AlignedBuffer<float> dx_buf;
  static thread_local AlignedBuffer<int32_t> cr_buf;
  int8_t* xq = xq_buf.get(static_cast<size_t>(np * kMP * K));
  float* dx = dx_buf.get(static_cast<size_t>(np * nbk * kMP));
  int32_t* cr = cr_buf.get(static_cast<size_t>(np * nbk * kMP));
  parallel_for(np, 1, [&](int64_t pb, int64_t pe) {
    static thread_local std::vector<uint8_t> row;
    row.resize(static_cast<size_t>(rb));
    for (int64_t p = pb; p < pe; ++p) {
      int8_t* xp = xq + p * kMP * K;
      float* dp = dx + p * nbk * kMP;
      int32_t* cp = cr + p * nbk * kMP;
      const int64_t mr = std::min(kMP, M - p * kMP);
      for (int64_t i = 0; i < kMP; ++i) {
        if (i < mr) {
          quantise_activations(x + (p * kMP + i) * ldx, K, row.data());
        } else {
          std::memset(row.data(), 0, row.size());  // rows past M: d_x = 0, q = 0
        }
        for (int64_t b = 0; b < nbk; ++b) {
          const uint8_t* blk = row.data() + b * kQB;
          int32_t sum = 0;
          for (int j = 0; j < 32; ++j) sum += static_cast<int8_t>(blk[2 + j]);
          dp[b * kMP + i] = f16_to_f32(rd16(blk));
          cp[b * kMP + i] = -off * sum;
          for (int g = 0; g < 8; ++g)
            std::memcpy(xp + ((b * 8 + g) * kMP + i) * 4, blk + 2 + 4 * g, 4);
        }
      }
    }
  });
  VnniJob J{Panels{xq, dx, cr, K, nbk},
            M,
            N,
            np,
            std::max<int64_t>(1, (384 << 10) / (40 * K)),
            static_cast<const uint8_t*>(W.data),
            weight_row_bytes(W.dtype, W.ld),
            W.dtype,
            y,
            ldy,
            accumulate,
            outs,
            nouts};
  const int64_t nb = (N + kNB - 1) / kNB;
  const int64_t T = std::max(1, num_threads());
  const int64_t chunk = std::max<int64_t>(1, (1 << 20) / (kNB * K));
  const int64_t run = std::max<int64_t>(1, std::min(chunk, nb / (8 * T)));
  parallel_for_dynamic(nb, run, 1, [&](int64_t c0, int64_t c1) { vnni_run(J, c0, c1); });
}

// ---- the VNNI streaming kernel for M <= 16 rows (decode)
// ------------------------------------------- Each weight row is read where it is stored, two
// blocks at a time (64 bytes: q8_0 w + 128, q4_0 the nibbles), against one row of x: one vpdpbusd
// leaves 8 int32 partial sums per block; 16 weight rows' partials are added by a transposition tree
// (exact: integers) into one vector of the 16 rows' block sums, and the fp32 step is the tile's: f
// = fma(float(isum), d_w * d_x, f) per block in order. So every output has the same bits as in
// gemm_nt_q8's tile (and the portable kernel) for the same row of x, whatever M: decode agrees with
// prefill exactly. x per row: q8_0 weights: blocks in k order; q4_0: each pair of blocks (b, b+1)
// as [b k0-15, b+1 k0-15, b k16-31, b+1 k16-31], the order in which a pair's nibbles widen.
constexpr int64_t kSR = 16;  // weight rows per step (the lanes of the result)

template <bool kQ4>
__attribute__((target("avx512f,avx512bw,avx512vnni,f16c"))) inline __m512i load_pair(
    const uint8_t* row, int64_t b, bool two) {
  if constexpr (kQ4) {
    const uint8_t* s = row + b * 18 + 2;
    const __m128i v0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
    const __m128i v1 =
        two ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 18)) : _mm_setzero_si128();
    const __m256i v = _mm256_inserti128_si256(_mm256_castsi128_si256(v0), v1, 1);
    const __m256i lo4 = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(v, lo4),
                  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4);
    return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
  } else {
    const uint8_t* s = row + b * 34 + 2;
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    const __m256i v0 =
        _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)), flip);
    const __m256i v1 =
        two ? _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 34)), flip)
            : _mm256_setzero_si256();
    return _mm512_inserti64x4(_mm512_castsi256_si512(v0), v1, 1);
  }
}

template <bool kQ4>
__attribute__((target("avx512f,avx512bw,avx512vnni,f16c"))) void stream_rows_vnni(
    const int8_t* __restrict xs, const float* __restrict dx, const int32_t* __restrict cr,
    int64_t M, int64_t K, const uint8_t* wbase, int64_t wrow, int64_t r0, int64_t r1, float* y,
    int64_t ldy) {
  const int64_t nbk = K / 32, bb = kQ4 ? 18 : 34, xpitch = (nbk + 1) / 2 * 64;
  for (int64_t n0 = r0; n0 < r1; n0 += kSR) {
    const int64_t nr = std::min<int64_t>(kSR, r1 - n0);
    const uint8_t* w[kSR];
    alignas(64) int32_t idx[kSR];
    for (int j = 0; j < kSR; ++j) {
      const int64_t r = std::min<int64_t>(j, nr - 1);
      w[j] = wbase + (n0 + r) * wrow;
      idx[j] = static_cast<int32_t>(r * wrow);
    }
    const __m512i vidx = _mm512_load_si512(idx);
    const __mmask16 store = static_cast<__mmask16>((1u << nr) - 1);
    const uint8_t* wb0 = wbase + n0 * wrow;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* xm = xs + m * xpitch;
      __m512 f = _mm512_setzero_ps();
      for (int64_t b = 0; b < nbk; b += 2) {
        const bool two = b + 1 < nbk;
        const __m512i xv = _mm512_load_si512(xm + b * 32);
        __m512i q[8];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {  // level 1: row pairs (2j, 2j + 1)
          const __m512i p0 =
              _mm512_dpbusd_epi32(_mm512_setzero_si512(), load_pair<kQ4>(w[2 * j], b, two), xv);
          const __m512i p1 =
              _mm512_dpbusd_epi32(_mm512_setzero_si512(), load_pair<kQ4>(w[2 * j + 1], b, two), xv);
          q[j] = _mm512_add_epi32(_mm512_unpacklo_epi32(p0, p1), _mm512_unpackhi_epi32(p0, p1));
        }
        __m512i s4[4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j)  // level 2: rows 4j..4j+3 in each 128-bit lane
          s4[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(q[2 * j], q[2 * j + 1]),
                                   _mm512_unpackhi_epi64(q[2 * j], q[2 * j + 1]));
        // level 3: the 128-bit lanes of block b and of block b + 1 added; u = [rows 0-3 of b,
        // of b + 1, rows 4-7 of b, of b + 1] (and rows 8-15)
        __m512i u01, u23;
        if constexpr (kQ4) {  // lanes 0, 2: block b; 1, 3: block b + 1
          u01 = _mm512_add_epi32(_mm512_shuffle_i32x4(s4[0], s4[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_i32x4(s4[0], s4[1], _MM_SHUFFLE(3, 2, 3, 2)));
          u23 = _mm512_add_epi32(_mm512_shuffle_i32x4(s4[2], s4[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_i32x4(s4[2], s4[3], _MM_SHUFFLE(3, 2, 3, 2)));
        } else {  // lanes 0, 1: block b; 2, 3: block b + 1
          u01 = _mm512_add_epi32(_mm512_shuffle_i32x4(s4[0], s4[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_i32x4(s4[0], s4[1], _MM_SHUFFLE(3, 1, 3, 1)));
          u23 = _mm512_add_epi32(_mm512_shuffle_i32x4(s4[2], s4[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_i32x4(s4[2], s4[3], _MM_SHUFFLE(3, 1, 3, 1)));
        }
        const __m512i sum[2] = {_mm512_shuffle_i32x4(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)),
                                _mm512_shuffle_i32x4(u01, u23, _MM_SHUFFLE(3, 1, 3, 1))};
        for (int h = 0; h < (two ? 2 : 1); ++h) {
          const int64_t bh = b + h;
          const __m512i isum = _mm512_add_epi32(sum[h], _mm512_set1_epi32(cr[m * nbk + bh]));
          const __m512i d16 = _mm512_and_si512(
              _mm512_i32gather_epi32(vidx, static_cast<const void*>(wb0 + bh * bb), 1),
              _mm512_set1_epi32(0xFFFF));
          const __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(d16));
          f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum),
                              _mm512_mul_ps(dw, _mm512_set1_ps(dx[m * nbk + bh])), f);
        }
      }
      _mm512_mask_storeu_ps(y + m * ldy + n0, store, f);
    }
  }
}

// For M >= kMLanesMinM rows the lanes hold the rows of x instead (one vector of 16 x rows per
// 4 k; 4 bytes of each weight row broadcast and widened in registers, as the tile but with
// weights read in place), so a weight row costs the same for 3 or 16 rows of x; the per-element
// operations are the same again.
constexpr int64_t kMLanesMinM = 3;
constexpr int kSB = 4;  // weight rows per step

__attribute__((target("avx512f,avx512bw,avx512vnni,f16c"))) void stream_mlanes_vnni(
    const int8_t* __restrict xq, const float* __restrict dx, const int32_t* __restrict cr,
    int64_t M, int64_t nbk, const uint8_t* wbase, int64_t wrow, bool q4, int64_t r0, int64_t r1,
    float* y, int64_t ldy) {
  const __m512i lo4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t bb = q4 ? 18 : 34;
  alignas(64) float t[kSB][kSR];
  for (int64_t n0 = r0; n0 < r1; n0 += kSB) {
    const int64_t nr = std::min<int64_t>(kSB, r1 - n0);
    const uint8_t* w[kSB];
    for (int j = 0; j < kSB; ++j) w[j] = wbase + (n0 + std::min<int64_t>(j, nr - 1)) * wrow;
    __m512 f[kSB];
#pragma GCC unroll 4
    for (int j = 0; j < kSB; ++j) f[j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nbk; ++b) {
      const __m512i c = _mm512_load_si512(cr + b * kSR);
      __m512i acc[kSB];
#pragma GCC unroll 4
      for (int j = 0; j < kSB; ++j) acc[j] = c;
      const int8_t* xb = xq + b * 8 * 64;
      if (q4) {
#pragma GCC unroll 4
        for (int g = 0; g < 4; ++g) {
          const __m512i xl = _mm512_load_si512(xb + g * 64),
                        xh = _mm512_load_si512(xb + (g + 4) * 64);
#pragma GCC unroll 4
          for (int j = 0; j < kSB; ++j) {
            int32_t r;
            std::memcpy(&r, w[j] + b * bb + 2 + 4 * g, 4);
            const __m512i raw = _mm512_set1_epi32(r);  // elements 4g..4g+3 and 16+4g..
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_and_si512(raw, lo4), xl);
            acc[j] =
                _mm512_dpbusd_epi32(acc[j], _mm512_and_si512(_mm512_srli_epi32(raw, 4), lo4), xh);
          }
        }
      } else {
#pragma GCC unroll 8
        for (int g = 0; g < 8; ++g) {
          const __m512i xg = _mm512_load_si512(xb + g * 64);
#pragma GCC unroll 4
          for (int j = 0; j < kSB; ++j) {
            int32_t r;
            std::memcpy(&r, w[j] + b * bb + 2 + 4 * g, 4);
            acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_xor_si512(_mm512_set1_epi32(r), flip), xg);
          }
        }
      }
      const __m512 d = _mm512_load_ps(dx + b * kSR);
#pragma GCC unroll 4
      for (int j = 0; j < kSB; ++j) {
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(rd16(w[j] + b * bb)));
        f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[j]), _mm512_mul_ps(d, s), f[j]);
      }
    }
    for (int j = 0; j < kSB; ++j) _mm512_store_ps(t[j], f[j]);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nr; ++j) y[m * ldy + n0 + j] = t[j][m];
  }
}

void stream_mlanes_impl(const float* x, int64_t M, int64_t ldx, const WeightRows& W, int64_t N,
                        int64_t K, float* y, int64_t ldy) {
  const int64_t nbk = K / 32;
  const int32_t off = W.dtype == WeightDType::q8_0 ? 128 : 8;
  static thread_local AlignedBuffer<int8_t> xq_buf;
  static thread_local AlignedBuffer<float> dx_buf;
  static thread_local AlignedBuffer<int32_t> cr_buf;
  static thread_local std::vector<uint8_t> row;
  int8_t* xq = xq_buf.get(static_cast<size_t>(kSR * K));
  float* dx = dx_buf.get(static_cast<size_t>(nbk * kSR));
  int32_t* cr = cr_buf.get(static_cast<size_t>(nbk * kSR));
  row.resize(static_cast<size_t>(nbk * kQB));
  for (int64_t i = 0; i < kSR; ++i) {
    if (i < M)
      quantise_activations(x + i * ldx, K, row.data());
    else
      std::memset(row.data(), 0, row.size());  // rows past M: d_x = 0, q = 0
    for (int64_t b = 0; b < nbk; ++b) {
      const uint8_t* blk = row.data() + b * kQB;
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) sum += static_cast<int8_t>(blk[2 + j]);
      dx[b * kSR + i] = f16_to_f32(rd16(blk));
      cr[b * kSR + i] = -off * sum;
      for (int g = 0; g < 8; ++g) std::memcpy(xq + ((b * 8 + g) * kSR + i) * 4, blk + 2 + 4 * g, 4);
    }
  }
  const uint8_t* wbase = static_cast<const uint8_t*>(W.data);
  const int64_t wrow = weight_row_bytes(W.dtype, W.ld);
  const bool q4 = W.dtype == WeightDType::q4_0;
  const int64_t steps = (N + kSB - 1) / kSB;
  const int64_t grain = std::max<int64_t>(1, (16384 + kSB * K - 1) / (kSB * K));
  parallel_for(steps, grain, [&](int64_t b, int64_t e) {
    stream_mlanes_vnni(xq, dx, cr, M, nbk, wbase, wrow, q4, b * kSB, std::min(N, e * kSB), y, ldy);
  });
}

// y (M, N) [ldy] = q8(x) W^T for M <= 16 rows (no accumulate, no split outputs).
void stream_q8_vnni_impl(const float* x, int64_t M, int64_t ldx, const WeightRows& W, int64_t N,
                         int64_t K, float* y, int64_t ldy) {
  if (M >= kMLanesMinM) return stream_mlanes_impl(x, M, ldx, W, N, K, y, ldy);
  const int64_t nbk = K / 32, xpitch = (nbk + 1) / 2 * 64;
  const int32_t off = W.dtype == WeightDType::q8_0 ? 128 : 8;
  const bool q4 = W.dtype == WeightDType::q4_0;
  static thread_local AlignedBuffer<int8_t> xs_buf;
  static thread_local AlignedBuffer<float> dx_buf;
  static thread_local AlignedBuffer<int32_t> cr_buf;
  static thread_local std::vector<uint8_t> row;
  int8_t* xs = xs_buf.get(static_cast<size_t>(M * xpitch));
  float* dx = dx_buf.get(static_cast<size_t>(M * nbk));
  int32_t* cr = cr_buf.get(static_cast<size_t>(M * nbk));
  row.resize(static_cast<size_t>(nbk * kQB));
  for (int64_t m = 0; m < M; ++m) {
    quantise_activations(x + m * ldx, K, row.data());
    int8_t* xm = xs + m * xpitch;
    std::memset(xm, 0, static_cast<size_t>(xpitch));  // an odd last block's partner: zeros
    for (int64_t b = 0; b < nbk; ++b) {
      const uint8_t* blk = row.data() + b * kQB;
      int32_t sum = 0;
      for (int j = 0; j < 32; ++j) sum += static_cast<int8_t>(blk[2 + j]);
      dx[m * nbk + b] = f16_to_f32(rd16(blk));
      cr[m * nbk + b] = -off * sum;
      int8_t* pair = xm + (b / 2) * 64;
      if (q4) {  // [b lo | b+1 lo | b hi | b+1 hi]
        std::memcpy(pair + (b % 2) * 16, blk + 2, 16);
        std::memcpy(pair + 32 + (b % 2) * 16, blk + 18, 16);
      } else {
        std::memcpy(pair + (b % 2) * 32, blk + 2, 32);
      }
    }
  }
  const uint8_t* wbase = static_cast<const uint8_t*>(W.data);
  const int64_t wrow = weight_row_bytes(W.dtype, W.ld);
  const int64_t tiles = (N + kSR - 1) / kSR;
  const int64_t grain = std::max<int64_t>(1, (16384 + kSR * K - 1) / (kSR * K));
  parallel_for(tiles, grain, [&](int64_t b, int64_t e) {
    if (q4)
      stream_rows_vnni<true>(xs, dx, cr, M, K, wbase, wrow, b * kSR, std::min(N, e * kSR), y, ldy);
    else
      stream_rows_vnni<false>(xs, dx, cr, M, K, wbase, wrow, b * kSR, std::min(N, e * kSR), y, ldy);
  });
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

void quantise_activations(const float* x, int64_t n, uint8_t* dst) {
  MAMBA_CHECK(n >= 0 && n % 32 == 0, "quantise_activations: ", n,
              " values are not whole blocks of 32");
  if (cpu_has_avx512bw()) return quant_blocks_avx512(x, n / 32, dst);
  for (int64_t b = 0; b < n / 32; ++b) quant_block_scalar(x + 32 * b, dst + kQB * b);
}

void quantise_activations_ref(const float* x, int64_t n, uint8_t* dst) {
  MAMBA_CHECK(n >= 0 && n % 32 == 0, "quantise_activations_ref: ", n,
              " values are not whole blocks of 32");
  for (int64_t b = 0; b < n / 32; ++b) quant_block_scalar(x + 32 * b, dst + kQB * b);
}

bool gemm_q8_vnni_available() {
  static const bool ok = [] {
    const char* e = std::getenv("MAMBA_ACT_Q8");
    if (e && std::string(e) == "portable") return false;
    return cpu_has_avx512bw() && __builtin_cpu_supports("avx512vnni");
  }();
  return ok;
}

void gemm_nt_q8(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs, int64_t nouts) {
  check_q8("gemm_nt_q8", x, M, ldx, W, N, K, y, ldy, outs, nouts);
  if (trivial(M, N, K, y, ldy, accumulate, outs, nouts)) return;
  if (!gemm_q8_vnni_available()) {
    gemm_q8_portable_impl(x, M, ldx, W, N, K, y, ldy, accumulate, outs, nouts);
  } else if (M <= kSR && !outs && !accumulate) {
    stream_q8_vnni_impl(x, M, ldx, W, N, K, y, ldy);
  } else if (M <= kSR && !outs) {  // y += the product, added after (as the tile does)
    std::vector<float> t(static_cast<size_t>(M * N));
    stream_q8_vnni_impl(x, M, ldx, W, N, K, t.data(), N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * ldy + n] += t[m * N + n];
  } else {
    gemm_q8_vnni_impl(x, M, ldx, W, N, K, y, ldy, accumulate, outs, nouts);
  }
}

void gemm_nt_q8_portable(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                         float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs,
                         int64_t nouts) {
  check_q8("gemm_nt_q8_portable", x, M, ldx, W, N, K, y, ldy, outs, nouts);
  if (trivial(M, N, K, y, ldy, accumulate, outs, nouts)) return;
  gemm_q8_portable_impl(x, M, ldx, W, N, K, y, ldy, accumulate, outs, nouts);
}

void gemm_nt_q8_ref(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                    float* y, int64_t ldy, bool accumulate) {
  check_q8("gemm_nt_q8_ref", x, M, ldx, W, N, K, y, ldy, nullptr, 0);
  const int64_t nbk = K / 32, rb = nbk * kQB;
  std::vector<uint8_t> xq(static_cast<size_t>(std::max<int64_t>(1, M * rb)));
  for (int64_t m = 0; m < M; ++m) quantise_activations_ref(x + m * ldx, K, xq.data() + m * rb);
  std::vector<int8_t> wq(static_cast<size_t>(std::max<int64_t>(1, K)));
  std::vector<float> dw(static_cast<size_t>(std::max<int64_t>(1, nbk)));
  const int64_t wrow = weight_row_bytes(W.dtype, W.ld);
  for (int64_t n = 0; n < N; ++n) {
    weight_row_s8(static_cast<const uint8_t*>(W.data) + n * wrow, W.dtype, nbk, wq.data(),
                  dw.data());
    for (int64_t m = 0; m < M; ++m) {
      double acc = accumulate ? y[m * ldy + n] : 0.0;
      for (int64_t b = 0; b < nbk; ++b) {
        const uint8_t* blk = xq.data() + m * rb + b * kQB;
        int64_t isum = 0;
        for (int j = 0; j < 32; ++j)
          isum += int64_t{wq[32 * b + j]} * static_cast<int8_t>(blk[2 + j]);
        acc += static_cast<double>(isum) * dw[b] * f16_to_f32(rd16(blk));
      }
      y[m * ldy + n] = static_cast<float>(acc);
    }
  }
}

}  // namespace mamba::ops
