// y = x W^T with fp32 / bf16 / f16 weights: the packed prefill kernel (see
// include/mamba/ops/gemm_nt.h), the dispatch between it and the BLAS, and the reference. Highway
// kernels follow the dispatch pattern of src/ops/act.cpp.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/gemm_nt.cpp"
#include "ops/gemm_nt.h"

#include <hwy/aligned_allocator.h>
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/gemm.h"
#include "mamba/error.h"
#include "mamba/parallel.h"
#include "ops/aligned_buffer.h"

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

constexpr int64_t kNB = 12;  // weight rows per tile (with 2 vectors of x rows: 24 accumulators)

// Vector width in bytes of this target (the dispatcher enables the kernel for >= 64).
int64_t VectorBytes() {
  return static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>()) * sizeof(float));
}

// acc[j] (2 vectors: x rows i = 0..2*lanes-1 of the panel) = sum_k xp[k][i] * wk[k][j]; stored
// to T[j][i]. xp: (K, 2*lanes) packed x^T, wk: (K, kNB) packed W^T, both fp32 and aligned.
HWY_INLINE void Tile(const float* HWY_RESTRICT xp, const float* HWY_RESTRICT wk, int64_t K,
                     float* HWY_RESTRICT T) {
  const hn::ScalableTag<float> df;
  using V = hn::Vec<decltype(df)>;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df));
  V a0[kNB], a1[kNB];
  for (int j = 0; j < kNB; ++j) a0[j] = a1[j] = hn::Zero(df);
  for (int64_t k = 0; k < K; ++k) {
    const V x0 = hn::Load(df, xp + k * 2 * NL), x1 = hn::Load(df, xp + k * 2 * NL + NL);
    for (int j = 0; j < kNB; ++j) {
      const V w = hn::Set(df, wk[k * kNB + j]);
      a0[j] = hn::MulAdd(x0, w, a0[j]);
      a1[j] = hn::MulAdd(x1, w, a1[j]);
    }
  }
  for (int j = 0; j < kNB; ++j) {
    hn::Store(a0[j], df, T + j * 2 * NL);
    hn::Store(a1[j], df, T + j * 2 * NL + NL);
  }
}

// Tile with fp32 weight rows read where they are stored: weight row j of the block at
// w + j * ldw (no packed copy: the prefill no longer re-packs every weight per call, i.e. per
// chunk). The same products and sums, in the same order, as Tile on a packed block.
// Rows past nr (a partial last block) repeat row nr - 1; their results are not stored.
HWY_INLINE void TileRows(const float* HWY_RESTRICT xp, const float* HWY_RESTRICT w, int64_t ldw,
                         int64_t nr, int64_t K, float* HWY_RESTRICT T) {
  const hn::ScalableTag<float> df;
  using V = hn::Vec<decltype(df)>;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df));
  const float* r[kNB];
  for (int j = 0; j < kNB; ++j) r[j] = w + std::min<int64_t>(j, nr - 1) * ldw;
  V a0[kNB], a1[kNB];
  for (int j = 0; j < kNB; ++j) a0[j] = a1[j] = hn::Zero(df);
  for (int64_t k = 0; k < K; ++k) {
    const V x0 = hn::Load(df, xp + k * 2 * NL), x1 = hn::Load(df, xp + k * 2 * NL + NL);
    for (int j = 0; j < kNB; ++j) {
      const V wv = hn::Set(df, r[j][k]);
      a0[j] = hn::MulAdd(x0, wv, a0[j]);
      a1[j] = hn::MulAdd(x1, wv, a1[j]);
    }
  }
  for (int j = 0; j < kNB; ++j) {
    hn::Store(a0[j], df, T + j * 2 * NL);
    hn::Store(a1[j], df, T + j * 2 * NL + NL);
  }
}

// fp32 copy of `n` weights of one row (16-bit ones widened, q8_0 / q4_0 blocks dequantised,
// exactly: mamba::weight_row_to_f32).
HWY_INLINE void RowToF32(const void* row, WeightDType t, int64_t n, float* dst) {
  weight_row_to_f32(row, t, n, dst);
}

// outs (nouts > 0): y's columns in blocks, columns [n_0 + ... + n_{i-1}, + n_i) to outs[i] (y and
// ldy unused); else y (M, N) [ldy].
void GemmNtKernel(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                  float* y, int64_t ldy, bool accumulate, const GemmNtOut* outs, int64_t nouts) {
  const hn::ScalableTag<float> df;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df)), MP = 2 * NL;
  const int64_t np = (M + MP - 1) / MP;                  // panels of x rows
  const int64_t wrow = weight_row_bytes(W.dtype, W.ld);  // bytes from one weight row to the next
  const char* wbase = static_cast<const char*>(W.data);

  // 1. x^T in panels: xp[p][k][i] = x[p*MP + i][k], rows past M zero. Blocks of 8 rows x 16 k
  //    keep both sides in L1 (32 rows at once would alias in the cache when ldx is 4K-ish).
  static thread_local AlignedBuffer<float> xp_buf;
  float* xp = xp_buf.get(static_cast<size_t>(np * MP * K));
  parallel_for(np, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      float* d = xp + p * MP * K;
      const int64_t mr = std::min(MP, M - p * MP);
      for (int64_t i0 = 0; i0 < mr; i0 += 8)
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
          const int64_t kn = std::min<int64_t>(16, K - k0);
          for (int64_t i = i0; i < std::min(mr, i0 + 8); ++i) {
            const float* xr = x + (p * MP + i) * ldx + k0;
            for (int64_t kk = 0; kk < kn; ++kk) d[(k0 + kk) * MP + i] = xr[kk];
          }
        }
      if (mr < MP)
        for (int64_t k = 0; k < K; ++k) std::fill(d + k * MP + mr, d + (k + 1) * MP, 0.f);
    }
  });

  // 2. Threads split the blocks of kNB weight rows; x is swept in groups of panels (~384 KB or
  //    ~1 MB, L2)
  //    against every block of the thread's rows, a block (kNB rows) staying in L1 / L2 across the
  //    group. fp32 weights are read where they are stored; other types are converted to fp32 a
  //    chunk of blocks at a time (~2 MB, rows kept row-major: a vectorised conversion, no
  //    transposition), then swept the same way. Both on TileRows.
  //    fp32 weights read in place come from memory once per group, so their groups are larger
  //    (~1 MB of x; a 192-row prefill chunk is then one group at d_model 768): with ~384 KB the
  //    in_proj of a 192-row chunk (two groups) ran at ~115-125 GFLOP/s on one thread, with 1 MB
  //    at ~140-150, as the converted types do.
  const int64_t nb = (N + kNB - 1) / kNB;
  const bool direct = W.dtype == WeightDType::f32;
  const int64_t G = std::max<int64_t>(1, ((direct ? 1024 : 384) << 10) / (K * MP * 4));
  const int64_t T = std::max(1, num_threads());
  const int64_t chunk = direct ? nb : std::max<int64_t>(1, (2 << 20) / (kNB * K * 4));
  //    The threads take runs of blocks from a shared counter (about 8 runs per thread) instead of
  //    one fixed range each: on a machine shared with other processes a thread that was
  //    descheduled no longer holds up the others at the end of the call. Which thread computes a
  //    block never changes its values (each is the same sequential sum).
  const int64_t run = std::max<int64_t>(1, std::min(chunk, nb / (8 * T)));
  parallel_for_dynamic(nb, run, 1, [&](int64_t c0, int64_t c1) {
    static thread_local AlignedBuffer<float> wf_buf, tile_buf;
    float* tile = tile_buf.get(static_cast<size_t>(kNB * MP));
    {
      const int64_t r0 = c0 * kNB, r1 = std::min(N, c1 * kNB);
      // rows [r0, r1) as fp32: row n at w0 + (n - r0) * ldw
      const float* w0 = nullptr;
      int64_t ldw = W.ld;
      if (direct) {
        w0 = static_cast<const float*>(W.data) + r0 * W.ld;
      } else {
        float* wf = wf_buf.get(static_cast<size_t>((r1 - r0) * K));
        for (int64_t n = r0; n < r1; ++n) RowToF32(wbase + n * wrow, W.dtype, K, wf + (n - r0) * K);
        w0 = wf, ldw = K;
      }
      for (int64_t g0 = 0; g0 < np; g0 += G)
        for (int64_t b = c0; b < c1; ++b) {
          const int64_t n0 = b * kNB, nr = std::min(kNB, N - n0);
          // The block's columns as runs [ja, jb) within one output: column n0 + j of y at
          // ry[r] + (j - ja) + m * rld[r] (one run unless the block straddles outputs).
          int64_t nrun = 0, rja[kNB + 1];
          float* ry[kNB];
          int64_t rld[kNB];
          if (outs) {
            for (int64_t j = 0, o = 0, ob = 0; j < nr;) {
              while (o + 1 < nouts && n0 + j >= ob + outs[o].n) ob += outs[o++].n;
              const int64_t je = std::min(nr, ob + outs[o].n - n0);
              rja[nrun] = j, ry[nrun] = outs[o].y + (n0 + j - ob), rld[nrun] = outs[o].ldy;
              ++nrun, j = je;
            }
            rja[nrun] = nr;
          }
          for (int64_t p = g0; p < std::min(np, g0 + G); ++p) {
            TileRows(xp + p * MP * K, w0 + (n0 - r0) * ldw, ldw, nr, K, tile);
            const int64_t mr = std::min(MP, M - p * MP);  // tile[j][i] -> y[p*MP + i][n0 + j]
            if (!outs) {
              for (int64_t i = 0; i < mr; ++i) {
                float* yr = y + (p * MP + i) * ldy + n0;
                if (accumulate)
                  for (int64_t j = 0; j < nr; ++j) yr[j] += tile[j * MP + i];
                else
                  for (int64_t j = 0; j < nr; ++j) yr[j] = tile[j * MP + i];
              }
            } else {  // row by row, as above (a column at a time would revisit 32 rows'
                      // cache lines 12 times, and rows 2^k floats apart share a few L1 sets)
              for (int64_t r = 0; r < nrun; ++r)
                for (int64_t i = 0; i < mr; ++i) {
                  float* yr = ry[r] + (p * MP + i) * rld[r];
                  for (int64_t j = rja[r]; j < rja[r + 1]; ++j) yr[j - rja[r]] = tile[j * MP + i];
                }
            }
          }
        }
    }
  });
}

// ---- fp32 products of the backward pass (gemm_nn, gemm_tn) on the same tile -------------------
// C (R, S) = sum_k A(r, k) B(k, s). Each operand is seen through its free index f (r of A, s of
// B) and the contraction index k; element (f, k) sits at p[k * ld + f] when f is the contiguous
// index, at p[f * ld + k] otherwise.
struct Operand {
  const float* p;
  int64_t ld;
  bool f_contig;
};

// d[k * W + i] = X(f0 + i, k) for i < fn, 0 for fn <= i < W, k in [0, K): a panel (W = 2 vectors)
// or a block (W = kNB) as Tile reads them. A contiguous free index is copied row by row; a
// contiguous k is transposed in blocks of 8 x 16 that stay in L1 (as GemmNtKernel packs x).
HWY_INLINE void PackOperand(const Operand& X, int64_t f0, int64_t fn, int64_t W, int64_t K,
                            float* HWY_RESTRICT d) {
  if (X.f_contig) {
    for (int64_t k = 0; k < K; ++k) {
      const float* s = X.p + k * X.ld + f0;
      float* dk = d + k * W;
      for (int64_t i = 0; i < fn; ++i) dk[i] = s[i];
      for (int64_t i = fn; i < W; ++i) dk[i] = 0.f;
    }
    return;
  }
  for (int64_t i0 = 0; i0 < fn; i0 += 8)
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t kn = std::min<int64_t>(16, K - k0);
      for (int64_t i = i0; i < std::min(fn, i0 + 8); ++i) {
        const float* xr = X.p + (f0 + i) * X.ld + k0;
        for (int64_t kk = 0; kk < kn; ++kk) d[(k0 + kk) * W + i] = xr[kk];
      }
    }
  if (fn < W)
    for (int64_t k = 0; k < K; ++k) std::fill(d + k * W + fn, d + (k + 1) * W, 0.f);
}

// C (R, S) [ldc] (+)= A B with the loop structure of GemmNtKernel: one operand in panels of
// 2 * lanes (all packed up front), the other in blocks of kNB that the threads split, each C
// element one sequential fp32 sum over k (so the result does not depend on the thread count or
// on which operand is paneled). The operand whose split wastes less padding per thread becomes
// the panels; when that is B, a tile holds C^T and is stored row by row.
void GemmF32Kernel(Operand A, int64_t R, Operand B, int64_t S, int64_t K, float* C, int64_t ldc,
                   bool accumulate) {
  const hn::ScalableTag<float> df;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df)), MP = 2 * NL;
  const int64_t T = std::max(1, num_threads());
  // Tiles the busiest thread computes with P on the panels and Q on the blocks.
  auto cost = [&](int64_t P, int64_t Q) {
    const int64_t nb = (Q + kNB - 1) / kNB;
    return ((nb + T - 1) / T) * ((P + MP - 1) / MP) * (MP * kNB);
  };
  const bool swap = cost(S, R) < cost(R, S);
  const Operand& Pop = swap ? B : A;
  const Operand& Qop = swap ? A : B;
  const int64_t P = swap ? S : R, Q = swap ? R : S;

  const int64_t np = (P + MP - 1) / MP;
  static thread_local AlignedBuffer<float> pp_buf;
  float* pp = pp_buf.get(static_cast<size_t>(np * MP * K));
  parallel_for(np, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p)
      PackOperand(Pop, p * MP, std::min(MP, P - p * MP), MP, K, pp + p * MP * K);
  });

  const int64_t nb = (Q + kNB - 1) / kNB;
  const int64_t G = std::max<int64_t>(1, (384 << 10) / (K * MP * 4));
  const int64_t chunk = std::max<int64_t>(1, (2 << 20) / (kNB * K * 4));
  parallel_for(nb, (nb + T - 1) / T, [&](int64_t bb, int64_t be) {
    static thread_local AlignedBuffer<float> qk_buf, tile_buf;
    float* tile = tile_buf.get(static_cast<size_t>(kNB * MP));
    for (int64_t c0 = bb; c0 < be; c0 += chunk) {
      const int64_t c1 = std::min(be, c0 + chunk);
      float* qk = qk_buf.get(static_cast<size_t>((c1 - c0) * kNB * K));
      for (int64_t b = c0; b < c1; ++b)
        PackOperand(Qop, b * kNB, std::min(kNB, Q - b * kNB), kNB, K, qk + (b - c0) * kNB * K);
      for (int64_t g0 = 0; g0 < np; g0 += G)
        for (int64_t b = c0; b < c1; ++b) {
          const int64_t q0 = b * kNB, nr = std::min(kNB, Q - q0);
          for (int64_t p = g0; p < std::min(np, g0 + G); ++p) {
            Tile(pp + p * MP * K, qk + (b - c0) * kNB * K, K, tile);
            const int64_t p0 = p * MP, mr = std::min(MP, P - p0);
            if (!swap) {  // tile[j][i] = C(p0 + i, q0 + j)
              for (int64_t i = 0; i < mr; ++i) {
                float* cr = C + (p0 + i) * ldc + q0;
                if (accumulate)
                  for (int64_t j = 0; j < nr; ++j) cr[j] += tile[j * MP + i];
                else
                  for (int64_t j = 0; j < nr; ++j) cr[j] = tile[j * MP + i];
              }
            } else {  // tile[j][i] = C(q0 + j, p0 + i)
              for (int64_t j = 0; j < nr; ++j) {
                float* cr = C + (q0 + j) * ldc + p0;
                const float* tj = tile + j * MP;
                if (accumulate)
                  for (int64_t i = 0; i < mr; ++i) cr[i] += tj[i];
                else
                  for (int64_t i = 0; i < mr; ++i) cr[i] = tj[i];
              }
            }
          }
        }
    }
  });
}

// C (M, N) (+)= A (M, K) [lda] B (K, N) [ldb]
void GemmNnKernel(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  GemmF32Kernel(Operand{A, lda, false}, M, Operand{B, ldb, true}, N, K, C, ldc, accumulate);
}

// C (M, N) (+)= A^T B, A stored (K, M) [lda], B (K, N) [ldb]
void GemmTnKernel(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  GemmF32Kernel(Operand{A, lda, true}, M, Operand{B, ldb, true}, N, K, C, ldc, accumulate);
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba::ops {
HWY_EXPORT(GemmNtKernel);
HWY_EXPORT(VectorBytes);

void check_gemm_nt_args(const char* what, const float* x, int64_t M, int64_t ldx,
                        const WeightRows& W, int64_t N, int64_t K, const float* y, int64_t ldy,
                        const GemmNtOut* outs, int64_t nouts) {
  MAMBA_CHECK(M >= 0 && N >= 0 && K >= 0, what, ": negative size M=", M, " N=", N, " K=", K);
  MAMBA_CHECK(ldx >= K && W.ld >= K, what, ": leading dimensions ldx ", ldx, ", ldw ", W.ld,
              " must be >= K ", K);
  MAMBA_CHECK(x || M == 0 || K == 0, what, ": null x");
  MAMBA_CHECK(W.data || N == 0 || K == 0, what, ": null W");
  MAMBA_CHECK(K % weight_block_size(W.dtype) == 0 && W.ld % weight_block_size(W.dtype) == 0, what,
              ": ", weight_dtype_name(W.dtype), " weights need K ", K, " and ldw ", W.ld,
              " to be whole blocks of ", weight_block_size(W.dtype));
  if (outs) {
    MAMBA_CHECK(nouts >= 0, what, ": ", nouts, " outputs");
    int64_t total = 0;
    for (int64_t i = 0; i < nouts; ++i) {
      MAMBA_CHECK(
          outs[i].n >= 0 && outs[i].ldy >= outs[i].n && (outs[i].y || outs[i].n == 0 || M == 0),
          what, ": output ", i, " has n ", outs[i].n, ", ldy ", outs[i].ldy);
      total += outs[i].n;
    }
    MAMBA_CHECK(total == N, what, ": the outputs have ", total, " columns, W has ", N, " rows");
  } else {
    MAMBA_CHECK(ldy >= N, what, ": ldy ", ldy, " < N ", N);
    MAMBA_CHECK(y || M == 0 || N == 0, what, ": null y");
  }
}

GemmNtCol gemm_nt_out_col(int64_t n, float* y, int64_t ldy, const GemmNtOut* outs, int64_t nouts) {
  if (!outs) return {y + n, ldy};
  for (int64_t i = 0, ob = 0; i < nouts; ob += outs[i++].n)
    if (n < ob + outs[i].n) return {outs[i].y + (n - ob), outs[i].ldy};
  return {nullptr, 0};  // not reached (checked)
}

namespace {

const void* row_ptr(const WeightRows& W, int64_t r) {
  return static_cast<const char*>(W.data) + r * weight_row_bytes(W.dtype, W.ld);
}

void zero_or_keep(float* y, int64_t M, int64_t N, int64_t ldy, bool accumulate) {
  if (accumulate) return;
  for (int64_t m = 0; m < M; ++m) std::fill(y + m * ldy, y + m * ldy + N, 0.f);
}
}  // namespace

bool gemm_nt_packed_active() {
  static const bool blas_forced = [] {
    const char* e = std::getenv("MAMBA_GEMM");
    return e && std::string(e) == "blas";
  }();
  // The target is asked on every call (one indirect call), not cached: a test that restricts
  // the dispatch to another target (hwy::SetSupportedTargetsForTest) gets that target's choice.
  return !blas_forced && HWY_DYNAMIC_DISPATCH(VectorBytes)() >= 64;
}

void gemm_nt_packed(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                    float* y, int64_t ldy, bool accumulate) {
  check_gemm_nt_args("gemm_nt_packed", x, M, ldx, W, N, K, y, ldy);
  if (M == 0 || N == 0) return;
  if (K == 0) return zero_or_keep(y, M, N, ldy, accumulate);
  HWY_DYNAMIC_DISPATCH(GemmNtKernel)(x, M, ldx, W, N, K, y, ldy, accumulate, nullptr, 0);
}

void gemm_nt(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K, float* y,
             int64_t ldy, bool accumulate) {
  check_gemm_nt_args("gemm_nt", x, M, ldx, W, N, K, y, ldy);
  if (M == 0 || N == 0) return;
  if (K == 0) return zero_or_keep(y, M, N, ldy, accumulate);
  if (gemm_nt_packed_active()) {
    HWY_DYNAMIC_DISPATCH(GemmNtKernel)(x, M, ldx, W, N, K, y, ldy, accumulate, nullptr, 0);
    return;
  }
  if (W.dtype == WeightDType::f32) {
    gemm(false, true, M, N, K, 1.f, x, ldx, static_cast<const float*>(W.data), W.ld,
         accumulate ? 1.f : 0.f, y, ldy);
    return;
  }
  // 16-bit weights on the BLAS: blocks of rows converted to fp32, one single-threaded GEMM each
  // (OpenMP OpenBLAS inside a parallel region); the conversion is O(N K), the GEMM O(M N K).
  const int64_t block = std::max<int64_t>(16, (int64_t{1} << 20) / K);
  const int64_t tasks = std::max<int64_t>(1, std::min<int64_t>(num_threads(), (N + 15) / 16));
  parallel_for(N, (N + tasks - 1) / tasks, [&](int64_t b, int64_t e) {
    static thread_local std::vector<float> s;
    s.resize(static_cast<size_t>(std::min(block, e - b) * K));
    for (int64_t rb = b; rb < e; rb += block) {
      const int64_t nb = std::min(block, e - rb);
      if (W.ld == K)
        weight_row_to_f32(row_ptr(W, rb), W.dtype, nb * K, s.data());
      else
        for (int64_t r = 0; r < nb; ++r)
          weight_row_to_f32(row_ptr(W, rb + r), W.dtype, K, s.data() + r * K);
      gemm(false, true, M, nb, K, 1.f, x, ldx, s.data(), K, accumulate ? 1.f : 0.f, y + rb, ldy);
    }
  });
}

void gemm_nt_split(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t K,
                   const GemmNtOut* outs, int64_t nouts) {
  MAMBA_CHECK(nouts >= 0 && (outs || nouts == 0), "gemm_nt_split: no outputs");
  int64_t N = 0;
  for (int64_t i = 0; i < nouts; ++i) N += outs[i].n;
  check_gemm_nt_args("gemm_nt_split", x, M, ldx, W, N, K, nullptr, 0, outs, nouts);
  if (M == 0 || N == 0) return;
  if (K > 0 && gemm_nt_packed_active()) {
    HWY_DYNAMIC_DISPATCH(GemmNtKernel)(x, M, ldx, W, N, K, nullptr, 0, false, outs, nouts);
    return;
  }
  for (int64_t i = 0, r = 0; i < nouts; r += outs[i++].n)  // one product per block
    if (outs[i].n > 0)
      gemm_nt(x, M, ldx, WeightRows{row_ptr(W, r), W.dtype, W.ld}, outs[i].n, K, outs[i].y,
              outs[i].ldy, false);
}

void gemm_nt_ref(const float* x, int64_t M, int64_t ldx, WeightRows W, int64_t N, int64_t K,
                 float* y, int64_t ldy, bool accumulate) {
  check_gemm_nt_args("gemm_nt_ref", x, M, ldx, W, N, K, y, ldy);
  std::vector<float> w(static_cast<size_t>(std::max<int64_t>(K, 1)));
  for (int64_t n = 0; n < N; ++n) {
    if (is_quantised(W.dtype))
      dequantise_blocks_ref(row_ptr(W, n), w.data(), K, W.dtype);  // the scalar decoder
    else
      for (int64_t k = 0; k < K; ++k)
        w[k] = W.dtype == WeightDType::f32
                   ? static_cast<const float*>(row_ptr(W, n))[k]
                   : half_to_f32(static_cast<const uint16_t*>(row_ptr(W, n))[k], W.dtype);
    for (int64_t m = 0; m < M; ++m) {
      double acc = accumulate ? y[m * ldy + n] : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += static_cast<double>(x[m * ldx + k]) * w[k];
      y[m * ldy + n] = static_cast<float>(acc);
    }
  }
}

// ---- gemm_nn / gemm_tn -------------------------------------------------------------------------

HWY_EXPORT(GemmNnKernel);
HWY_EXPORT(GemmTnKernel);

namespace {
// trans_a: A stored (K, M) (gemm_tn), else (M, K) (gemm_nn); B (K, N); C (M, N).
void check_gemm_f32(const char* what, bool trans_a, int64_t M, int64_t N, int64_t K, const float* A,
                    int64_t lda, const float* B, int64_t ldb, const float* C, int64_t ldc) {
  MAMBA_CHECK(M >= 0 && N >= 0 && K >= 0, what, ": negative size M=", M, " N=", N, " K=", K);
  const int64_t arow = trans_a ? M : K;
  MAMBA_CHECK(lda >= arow && ldb >= N && ldc >= N, what, ": leading dimensions lda ", lda, ", ldb ",
              ldb, ", ldc ", ldc, " must be >= ", arow, ", N ", N, ", N ", N);
  MAMBA_CHECK((A && B && C) || M == 0 || N == 0 || K == 0, what, ": null pointer");
  MAMBA_CHECK(C || M == 0 || N == 0, what, ": null pointer");
}

void gemm_f32_dispatch(const char* what, bool trans_a, bool packed, int64_t M, int64_t N, int64_t K,
                       const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                       int64_t ldc, bool accumulate) {
  check_gemm_f32(what, trans_a, M, N, K, A, lda, B, ldb, C, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0) return zero_or_keep(C, M, N, ldc, accumulate);
  if (!packed) {
    gemm(trans_a, false, M, N, K, 1.f, A, lda, B, ldb, accumulate ? 1.f : 0.f, C, ldc);
    return;
  }
  if (trans_a)
    HWY_DYNAMIC_DISPATCH(GemmTnKernel)(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else
    HWY_DYNAMIC_DISPATCH(GemmNnKernel)(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm_f32_ref(const char* what, bool trans_a, int64_t M, int64_t N, int64_t K, const float* A,
                  int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                  bool accumulate) {
  check_gemm_f32(what, trans_a, M, N, K, A, lda, B, ldb, C, ldc);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = accumulate ? C[m * ldc + n] : 0.0;
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<double>(trans_a ? A[k * lda + m] : A[m * lda + k]) * B[k * ldb + n];
      C[m * ldc + n] = static_cast<float>(acc);
    }
}
}  // namespace

void gemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32_dispatch("gemm_nn", false, gemm_nt_packed_active(), M, N, K, A, lda, B, ldb, C, ldc,
                    accumulate);
}
void gemm_tn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
             int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32_dispatch("gemm_tn", true, gemm_nt_packed_active(), M, N, K, A, lda, B, ldb, C, ldc,
                    accumulate);
}
void gemm_nn_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32_dispatch("gemm_nn_packed", false, true, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm_tn_packed(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32_dispatch("gemm_tn_packed", true, true, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm_nn_ref(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32_ref("gemm_nn_ref", false, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
void gemm_tn_ref(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_f32_ref("gemm_tn_ref", true, M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

}  // namespace mamba::ops
#endif  // HWY_ONCE
