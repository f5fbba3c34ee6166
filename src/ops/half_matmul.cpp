// The streaming matmul for small M (decode): fp32, bf16, f16, q8_0 or q4_0 weights times fp32
// activations with fp32 accumulation, and its naive reference. Highway kernels follow the dispatch
// pattern of src/ops/act.cpp.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/half_matmul.cpp"
#include "ops/half_matmul.h"

#include <hwy/cache_control.h>
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "mamba/parallel.h"
#include "mamba/weight.h"  // the scalar bf16 / f16 conversions (round to nearest even)

HWY_BEFORE_NAMESPACE();
namespace mamba::ops {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// 16-bit lanes at p promoted to one vector of fp32 (exact).
template <bool kBF16, class DF>
HWY_INLINE hn::Vec<DF> LoadHalf(DF df, const uint16_t* p) {
  if constexpr (kBF16) {
    const hn::Rebind<hwy::bfloat16_t, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::bfloat16_t*>(p)));
  } else {
    const hn::Rebind<hwy::float16_t, DF> dh;
    return hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(p)));
  }
}

// The inputs of one streaming matmul: x (M, cols) with leading dimension ldx, and for bf16 the
// same values regrouped per block of 2 * lanes as [even k | odd k] (xd, leading dimension ldxd,
// full blocks only), to match how bf16 pairs widen (below).
struct GemvArgs {
  const float* x;
  int64_t ldx;
  const float* xd;
  int64_t ldxd;
  int64_t cols;
  float* y;
  int64_t ldy;
};

// bf16 pairs are widened two per 32-bit lane (below); the single-lane scalar target cannot.
#if HWY_TARGET == HWY_SCALAR
constexpr bool kPairedBF16 = false;
#else
constexpr bool kPairedBF16 = true;
#endif

// y[m * ldy + r] = sum_k x[m * ldx + k] * w[r * cols + k] for MT inputs and RT weight rows: the
// weight vectors are converted once per column block and used for all MT inputs.
// f16: each lane widened (vcvtph2ps). bf16: a 32-bit lane holds two bf16 values, w[2i] in its low
// half and w[2i+1] in its high half; the high one is already an fp32 with its low bits cleared
// (And), the low one is shifted up: two fp32 vectors of even / odd k from one load, no shuffle,
// multiplied with the regrouped inputs xd.
// Weight element types of the streaming kernel: 16-bit (f16 / bf16) or fp32 (batched decode).
enum WKind : int { kF16 = 0, kBF16K = 1, kF32 = 2 };
template <int K>
using WElem = std::conditional_t<K == kF32, float, uint16_t>;

template <int K, class DF>
HWY_INLINE hn::Vec<DF> LoadW(DF df, const WElem<K>* p) {
  if constexpr (K == kF32)
    return hn::LoadU(df, p);
  else
    return LoadHalf<K == kBF16K>(df, p);
}
template <int K>
HWY_INLINE float WToF32(WElem<K> h) {
  if constexpr (K == kF32)
    return h;
  else
    return K == kBF16K ? bf16_to_f32(h) : f16_to_f32(h);
}

// The weight prefetch of one tile. pf == nullptr (a single tile of inputs, e.g. M = 1): each
// k step prefetches the next RT rows at that k, so the next tile's rows arrive while this one is
// multiplied. Otherwise (several input tiles read the same RT rows: the first reads them from
// memory, the others from L1) every tile streams its own share of the next RT rows: pf is that
// share's start and each k step prefetches the adv bytes that follow, so the memory reads are
// spread over all the tiles instead of being bunched in the first one.
struct TilePrefetch {
  const char* pf = nullptr;
  int64_t adv = 0;
};

template <int K, int MT, int RT>
HWY_INLINE void Tile(const GemvArgs& a, const float* x, const float* xd, const WElem<K>* w,
                     float* y, TilePrefetch tp = {}) {
  [[maybe_unused]] constexpr bool kBF16 = K == kBF16K;
  const hn::ScalableTag<float> df;
  using V = hn::Vec<decltype(df)>;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df)), cols = a.cols;
  (void)xd;  // only the paired bf16 path reads the regrouped inputs
  V acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc[m][r] = hn::Zero(df);
  int64_t k = 0;
#if HWY_TARGET != HWY_SCALAR
  if constexpr (kBF16) {
    const hn::RebindToUnsigned<decltype(df)> du32;
    const hn::Repartition<uint16_t, decltype(df)> du16;
    const auto hi_mask = hn::Set(du32, 0xFFFF0000u);
    for (; k + 2 * NL <= cols; k += 2 * NL) {
      V we[RT], wo[RT];
      // The next tile's rows (RT rows further on) are fetched while this one is multiplied:
      // decode is bound by the weight bytes, and the rows are short (a few KB) streams.
      if (tp.pf == nullptr) {
        for (int r = 0; r < RT; ++r) hwy::Prefetch(w + (RT + r) * cols + k);
      } else {
        const char* q = tp.pf + (k / (2 * NL)) * tp.adv;
        for (int64_t o = 0; o < tp.adv; o += 64) hwy::Prefetch(q + o);
      }
      for (int r = 0; r < RT; ++r) {
        const auto u = hn::BitCast(du32, hn::LoadU(du16, w + r * cols + k));
        we[r] = hn::BitCast(df, hn::ShiftLeft<16>(u));
        wo[r] = hn::BitCast(df, hn::And(u, hi_mask));
      }
      for (int m = 0; m < MT; ++m) {
        const V xe = hn::LoadU(df, xd + m * a.ldxd + k),
                xo = hn::LoadU(df, xd + m * a.ldxd + k + NL);
        for (int r = 0; r < RT; ++r)
          acc[m][r] = hn::MulAdd(xo, wo[r], hn::MulAdd(xe, we[r], acc[m][r]));
      }
    }
  } else
#endif
  {
    for (; k + NL <= cols; k += NL) {
      V wv[RT];
      if (tp.pf == nullptr) {
        for (int r = 0; r < RT; ++r) hwy::Prefetch(w + (RT + r) * cols + k);
      } else {
        const char* q = tp.pf + (k / NL) * tp.adv;
        for (int64_t o = 0; o < tp.adv; o += 64) hwy::Prefetch(q + o);
      }
      for (int r = 0; r < RT; ++r) wv[r] = LoadW<K>(df, w + r * cols + k);
      for (int m = 0; m < MT; ++m) {
        const V xv = hn::LoadU(df, x + m * a.ldx + k);
        for (int r = 0; r < RT; ++r) acc[m][r] = hn::MulAdd(xv, wv[r], acc[m][r]);
      }
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) {
      float s = hn::GetLane(hn::SumOfLanes(df, acc[m][r]));
      for (int64_t j = k; j < cols; ++j) {
        s += x[m * a.ldx + j] * WToF32<K>(w[r * cols + j]);
      }
      y[m * a.ldy + r] = s;
    }
}

// The M input rows in tiles of 4, then one tile of the 3, 2 or 1 left: tile(m, rows) with rows a
// std::integral_constant (the tile kernels take the row count as a template argument).
template <class F>
HWY_INLINE void ForEachRowTile(int64_t M, F&& tile) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile(m, std::integral_constant<int, 4>());
  switch (M - m) {
    case 3:
      tile(m, std::integral_constant<int, 3>());
      break;
    case 2:
      tile(m, std::integral_constant<int, 2>());
      break;
    case 1:
      tile(m, std::integral_constant<int, 1>());
      break;
    default:
      break;
  }
}

template <int K, int RT>
HWY_INLINE void RowBlock(const GemvArgs& a, int64_t M, const WElem<K>* w, float* y) {
  const int64_t tiles = (M + 3) / 4;
  if (tiles <= 1) {
    ForEachRowTile(M, [&](int64_t m, auto mt) {
      Tile<K, decltype(mt)::value, RT>(a, a.x + m * a.ldx, a.xd + m * a.ldxd, w, y + m * a.ldy);
    });
    return;
  }
  // Several input tiles: the next RT rows (contiguous) split in `tiles` shares, one per tile,
  // each streamed over the tile's k steps (TilePrefetch).
  const hn::ScalableTag<float> df;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df));
  const int64_t kstep = (K == kBF16K && kPairedBF16) ? 2 * NL : NL;
  const int64_t steps = std::max<int64_t>(1, a.cols / kstep);
  const int64_t next = RT * a.cols * static_cast<int64_t>(sizeof(WElem<K>));
  const int64_t share = (next + tiles - 1) / tiles;
  const int64_t adv = std::max<int64_t>(1, (share + steps - 1) / steps);
  const char* nb = reinterpret_cast<const char*>(w + RT * a.cols);
  ForEachRowTile(M, [&](int64_t m, auto mt) {
    const TilePrefetch tp{nb + (m / 4) * share, adv};
    Tile<K, decltype(mt)::value, RT>(a, a.x + m * a.ldx, a.xd + m * a.ldxd, w, y + m * a.ldy, tp);
  });
}

// Output columns [rb, re) (W points at the range's first row, y at its first column).
template <int K>
void GemvRowsT(const GemvArgs& a, int64_t M, const WElem<K>* W, int64_t rb, int64_t re) {
  int64_t r = rb;
  if (K == kF32 && M > 4)
    for (; r + 6 <= re; r += 6) RowBlock<K, 6>(a, M, W + r * a.cols, a.y + r);
  for (; r + 4 <= re; r += 4) RowBlock<K, 4>(a, M, W + r * a.cols, a.y + r);
  for (; r < re; ++r) RowBlock<K, 1>(a, M, W + r * a.cols, a.y + r);
}

// y (M, n) = x (M, cols) W (n, cols)^T for small M, rows split over threads (tasks of >= grain).
void GemvKernel(const float* x, int64_t M, int64_t ldx, const uint16_t* W, int64_t cols, int64_t n,
                float* y, int64_t ldy, bool bf16, int64_t grain) {
  GemvArgs a{x, ldx, x, 0, cols, y, ldy};
  if (bf16 && kPairedBF16) {
    // Regroup the inputs once (they are read for every weight row).
    const hn::ScalableTag<float> df;
    const int64_t B2 = 2 * static_cast<int64_t>(hn::Lanes(df)), full = cols / B2 * B2;
    thread_local std::vector<float> xd;
    xd.resize(static_cast<size_t>(std::max<int64_t>(M * full, 1)));
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < full; b += B2)
        for (int64_t i = 0; i < B2 / 2; ++i) {
          xd[m * full + b + i] = x[m * ldx + b + 2 * i];
          xd[m * full + b + B2 / 2 + i] = x[m * ldx + b + 2 * i + 1];
        }
    a.xd = xd.data(), a.ldxd = full;
  }
  parallel_for(n, grain, [&](int64_t b, int64_t e) {
    if (bf16)
      GemvRowsT<kBF16K>(a, M, W, b, e);
    else
      GemvRowsT<kF16>(a, M, W, b, e);
  });
}

// The same streaming kernel on fp32 weights: batched decode (small M), where a BLAS sgemm
// packs the whole weight matrix for a handful of rows.
void GemvF32Kernel(const float* x, int64_t M, int64_t ldx, const float* W, int64_t cols, int64_t n,
                   float* y, int64_t ldy, int64_t grain) {
  GemvArgs a{x, ldx, x, 0, cols, y, ldy};
  parallel_for(n, grain, [&](int64_t b, int64_t e) { GemvRowsT<kF32>(a, M, W, b, e); });
}

// ---- M = 1 (single-sequence decode), fp32 / f16 / bf16 weights ---------------------------------
// Its own entry, beside the batched tiles above (M >= 2), so either can change without moving the
// other: y (n) = W (n, cols) x (cols), rows of 4 then single rows, split over threads in static
// ranges of >= grain rows (Tile<K, 1, RT>: every row's sum is formed the same whatever the split).
void Gemv1Kernel(const float* x, const void* W, int kind, int64_t cols, int64_t n, float* y,
                 int64_t grain) {
  GemvArgs a{x, cols, x, 0, cols, y, n};
  thread_local std::vector<float> xd;
  if (kind == kBF16K && kPairedBF16) {  // the inputs regrouped once, as in GemvKernel
    const hn::ScalableTag<float> df;
    const int64_t B2 = 2 * static_cast<int64_t>(hn::Lanes(df)), full = cols / B2 * B2;
    xd.resize(static_cast<size_t>(std::max<int64_t>(full, 1)));
    for (int64_t b = 0; b < full; b += B2)
      for (int64_t i = 0; i < B2 / 2; ++i) {
        xd[b + i] = x[b + 2 * i];
        xd[b + B2 / 2 + i] = x[b + 2 * i + 1];
      }
    a.xd = xd.data(), a.ldxd = full;
  }
  parallel_for(n, grain, [&](int64_t b, int64_t e) {
    if (kind == kF32)
      GemvRowsT<kF32>(a, 1, static_cast<const float*>(W), b, e);
    else if (kind == kBF16K)
      GemvRowsT<kBF16K>(a, 1, static_cast<const uint16_t*>(W), b, e);
    else
      GemvRowsT<kF16>(a, 1, static_cast<const uint16_t*>(W), b, e);
  });
}

// ---- q8_0 / q4_0 weights (blocks of 32, mamba/weight.h) ----------------------------------------
// The same streaming scheme: for each block of 32 columns, each of the RT rows' block is widened
// to fp32 in registers (integers promoted to int32, converted, times the block's f16 scale
// broadcast: exact) and used for all MT inputs. Vectors hold at most 16 lanes, so one never spans
// two blocks; every row is whole blocks (cols % 32 == 0, checked by the caller).

// The f16 scale at p (little-endian) in every lane.
template <class DF>
HWY_INLINE hn::Vec<DF> BlockScale(DF df, const uint8_t* p) {
  const hn::Rebind<uint16_t, DF> du16;
  const hn::Rebind<hwy::float16_t, DF> dh;
  uint16_t h;
  std::memcpy(&h, p, 2);  // one 16-bit load and broadcast (the format is little-endian, as x86)
#if HWY_IS_BIG_ENDIAN
  h = static_cast<uint16_t>((h >> 8) | (h << 8));
#endif
  return hn::PromoteTo(df, hn::BitCast(dh, hn::Set(du16, h)));
}

// q4_0 codes through a table where vectors hold 16 fp32 lanes (AVX-512): the 16 values
// (n - 8) * d of a block's scale d, so one lane permutation gives each weight already scaled
// (the same products as the widening path: (n - 8) * d is exact in fp32).
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
constexpr bool kQ4Table = true;
#else
constexpr bool kQ4Table = false;
#endif

template <bool kQ4, int MT, int RT>
HWY_INLINE void QTile(const GemvArgs& a, const float* x, const uint8_t* w, int64_t rowb, float* y) {
  const hn::CappedTag<float, 16> df;
  const hn::RebindToSigned<decltype(df)> di;
  using V = hn::Vec<decltype(df)>;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df)), nb = a.cols / 32;
  constexpr int64_t BB = kQ4 ? 18 : 34;  // bytes per block
  V acc[MT][RT];
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) acc[m][r] = hn::Zero(df);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const uint8_t* wb = w + blk * BB;
    for (int r = 0; r < RT; ++r) hwy::Prefetch(wb + (RT + r) * rowb);
    V d[RT];
    for (int r = 0; r < RT; ++r) d[r] = BlockScale(df, wb + r * rowb);
    const float* xb = x + blk * 32;
    if constexpr (kQ4 && kQ4Table) {
      // NL == 16: one load of the 16 code bytes, low nibbles (values 0..15) and high nibbles
      // (16..31) through the block's scaled table.
      const hn::Rebind<uint8_t, decltype(df)> du8;
      alignas(64) static constexpr float kCodes[16] = {-8, -7, -6, -5, -4, -3, -2, -1,
                                                       0,  1,  2,  3,  4,  5,  6,  7};
      const V codes = hn::Load(df, kCodes);
      V wl[RT], wh[RT];
      for (int r = 0; r < RT; ++r) {
        const V table = hn::Mul(codes, d[r]);
        const auto u = hn::PromoteTo(di, hn::LoadU(du8, wb + r * rowb + 2));
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
        // vpermps reads only the low 4 bits of each index: the low nibbles need no mask.
        wl[r] = V{_mm512_permutexvar_ps(u.raw, table.raw)};
        wh[r] = V{_mm512_permutexvar_ps(hn::ShiftRight<4>(u).raw, table.raw)};
#else
        wl[r] = hn::TableLookupLanes(table, hn::IndicesFromVec(df, hn::And(u, hn::Set(di, 15))));
        wh[r] = hn::TableLookupLanes(table, hn::IndicesFromVec(df, hn::ShiftRight<4>(u)));
#endif
      }
      for (int m = 0; m < MT; ++m) {
        const V xl = hn::LoadU(df, xb + m * a.ldx), xh = hn::LoadU(df, xb + m * a.ldx + 16);
        for (int r = 0; r < RT; ++r)
          acc[m][r] = hn::MulAdd(xh, wh[r], hn::MulAdd(xl, wl[r], acc[m][r]));
      }
    } else if constexpr (kQ4) {
      const hn::Rebind<uint8_t, decltype(df)> du8;
      const auto lo = hn::Set(di, 15), eight = hn::Set(di, 8);
      for (int64_t j = 0; j < 16; j += NL) {
        V wl[RT], wh[RT];
        for (int r = 0; r < RT; ++r) {
          const auto u = hn::PromoteTo(di, hn::LoadU(du8, wb + r * rowb + 2 + j));
          wl[r] = hn::Mul(hn::ConvertTo(df, hn::Sub(hn::And(u, lo), eight)), d[r]);
          wh[r] = hn::Mul(hn::ConvertTo(df, hn::Sub(hn::ShiftRight<4>(u), eight)), d[r]);
        }
        for (int m = 0; m < MT; ++m) {
          const V xl = hn::LoadU(df, xb + m * a.ldx + j),
                  xh = hn::LoadU(df, xb + m * a.ldx + 16 + j);
          for (int r = 0; r < RT; ++r)
            acc[m][r] = hn::MulAdd(xh, wh[r], hn::MulAdd(xl, wl[r], acc[m][r]));
        }
      }
    } else {
      // The block's codes (exact in fp32) times the inputs, summed in the block, then times the
      // block's scale into the accumulator: d * sum(x * q) instead of sum(x * (q * d)), one
      // multiply per block and row instead of one per 16 weights.
      const hn::Rebind<int8_t, decltype(df)> d8;
      V bs[MT][RT];
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < RT; ++r) bs[m][r] = hn::Zero(df);
      for (int64_t j = 0; j < 32; j += NL) {
        V wv[RT];
        for (int r = 0; r < RT; ++r)
          wv[r] = hn::ConvertTo(
              df, hn::PromoteTo(
                      di, hn::LoadU(d8, reinterpret_cast<const int8_t*>(wb + r * rowb + 2 + j))));
        for (int m = 0; m < MT; ++m) {
          const V xv = hn::LoadU(df, xb + m * a.ldx + j);
          for (int r = 0; r < RT; ++r)
            bs[m][r] = j == 0 ? hn::Mul(xv, wv[r]) : hn::MulAdd(xv, wv[r], bs[m][r]);
        }
      }
      for (int m = 0; m < MT; ++m)
        for (int r = 0; r < RT; ++r) acc[m][r] = hn::MulAdd(bs[m][r], d[r], acc[m][r]);
    }
  }
  for (int m = 0; m < MT; ++m)
    for (int r = 0; r < RT; ++r) y[m * a.ldy + r] = hn::GetLane(hn::SumOfLanes(df, acc[m][r]));
}

template <bool kQ4, int RT>
HWY_INLINE void QRowBlock(const GemvArgs& a, int64_t M, const uint8_t* w, int64_t rowb, float* y) {
  ForEachRowTile(M, [&](int64_t m, auto mt) {
    QTile<kQ4, decltype(mt)::value, RT>(a, a.x + m * a.ldx, w, rowb, y + m * a.ldy);
  });
}

template <bool kQ4>
void QGemvRowsT(const GemvArgs& a, int64_t M, const uint8_t* W, int64_t rowb, int64_t rb,
                int64_t re) {
  int64_t r = rb;
  for (; r + 4 <= re; r += 4) QRowBlock<kQ4, 4>(a, M, W + r * rowb, rowb, a.y + r);
  for (; r < re; ++r) QRowBlock<kQ4, 1>(a, M, W + r * rowb, rowb, a.y + r);
}

// y (M, n) = x (M, cols) W (n, cols)^T for q8_0 / q4_0 blocks (rows rowb bytes apart).
void QGemvKernel(const float* x, int64_t M, int64_t ldx, const uint8_t* W, int64_t rowb,
                 int64_t cols, int64_t n, float* y, int64_t ldy, bool q4, int64_t grain) {
  GemvArgs a{x, ldx, x, 0, cols, y, ldy};
  parallel_for(n, grain, [&](int64_t b, int64_t e) {
    if (q4)
      QGemvRowsT<true>(a, M, W, rowb, b, e);
    else
      QGemvRowsT<false>(a, M, W, rowb, b, e);
  });
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba::ops {
HWY_EXPORT(GemvKernel);
HWY_EXPORT(GemvF32Kernel);
HWY_EXPORT(QGemvKernel);
HWY_EXPORT(Gemv1Kernel);

namespace {
void check_args(const char* what, int64_t M, int64_t ldx, const Weight& W, int64_t ldy) {
  MAMBA_CHECK(W.defined(), what, ": W is undefined");
  MAMBA_CHECK(M >= 0, what, ": negative size M=", M);
  MAMBA_CHECK(ldx >= W.cols(), what, ": ldx ", ldx, " < cols ", W.cols());
  MAMBA_CHECK(ldy >= W.rows(), what, ": ldy ", ldy, " < n ", W.rows());
}

// Rows per thread task of the streaming kernel: at least ~16K weights, so small matrices
// (dt_proj, x_proj) are not split into tasks costlier than their work.
int64_t gemv_grain(int64_t cols) {
  return std::max<int64_t>(4, (16384 + cols - 1) / std::max<int64_t>(cols, 1));
}

}  // namespace

void stream_matmul(const float* x, int64_t M, int64_t ldx, const Weight& W, float* y, int64_t ldy) {
  check_args("stream_matmul", M, ldx, W, ldy);
  const int64_t n = W.rows(), cols = W.cols();
  if (M == 0 || n == 0) return;
  if (M == 1 && !is_quantised(W.dtype())) {  // single-sequence decode
    const int kind = W.is_f32() ? 2 : W.dtype() == WeightDType::bf16 ? 1 : 0;  // WKind
    HWY_DYNAMIC_DISPATCH(Gemv1Kernel)(x, W.row_ptr(0), kind, cols, n, y, gemv_grain(cols));
  } else if (W.is_f32()) {
    HWY_DYNAMIC_DISPATCH(GemvF32Kernel)
    (x, M, ldx, static_cast<const float*>(W.row_ptr(0)), cols, n, y, ldy, gemv_grain(cols));
  } else if (is_quantised(W.dtype())) {
    MAMBA_CHECK(cols % 32 == 0, "stream_matmul: ", weight_dtype_name(W.dtype()), " rows of ", cols,
                " values are not whole blocks of 32");
    HWY_DYNAMIC_DISPATCH(QGemvKernel)
    (x, M, ldx, static_cast<const uint8_t*>(W.row_ptr(0)), W.row_bytes(), cols, n, y, ldy,
     W.dtype() == WeightDType::q4_0, gemv_grain(cols));
  } else {
    HWY_DYNAMIC_DISPATCH(GemvKernel)
    (x, M, ldx, static_cast<const uint16_t*>(W.row_ptr(0)), cols, n, y, ldy,
     W.dtype() == WeightDType::bf16, gemv_grain(cols));
  }
}

void stream_matmul_ref(const float* x, int64_t M, int64_t ldx, const Weight& W, float* y,
                       int64_t ldy) {
  check_args("stream_matmul_ref", M, ldx, W, ldy);
  const int64_t cols = W.cols();
  std::vector<float> w(static_cast<size_t>(std::max<int64_t>(cols, 1)));
  for (int64_t j = 0; j < W.rows(); ++j) {
    W.row_to_f32(j, w.data());  // exact
    for (int64_t m = 0; m < M; ++m) {
      double acc = 0;
      for (int64_t k = 0; k < cols; ++k) acc += static_cast<double>(x[m * ldx + k]) * w[k];
      y[m * ldy + j] = static_cast<float>(acc);
    }
  }
}

}  // namespace mamba::ops
#endif  // HWY_ONCE
