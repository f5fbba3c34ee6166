// 16-bit weights (bf16 / f16) times fp32 activations with fp32 accumulation: conversions, the
// streaming kernel for small M (decode), the convert-and-GEMM path for large M (prefill), and the
// naive reference. Highway kernels follow the dispatch pattern of src/ops/act.cpp.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "ops/half_matmul.cpp"
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/cache_control.h>
#include <hwy/highway.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#include "mamba/gemm.h"
#include "mamba/ops/half_matmul.h"
#include "mamba/ops/linear.h"
#include "mamba/ops/xwt.h"
#include "mamba/parallel.h"
#include "mamba/safetensors.h"  // the scalar bf16 / f16 conversions (round to nearest even)

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

template <bool kBF16>
void FromHalfT(const uint16_t* src, float* dst, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + NL <= n; i += NL) hn::StoreU(LoadHalf<kBF16>(df, src + i), df, dst + i);
  for (; i < n; ++i) dst[i] = kBF16 ? bf16_to_f32(src[i]) : f16_to_f32(src[i]);
}

void FromHalfKernel(const uint16_t* src, float* dst, int64_t n, bool bf16) {
  if (bf16)
    FromHalfT<true>(src, dst, n);
  else
    FromHalfT<false>(src, dst, n);
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

template <int K, int MT, int RT>
HWY_INLINE void Tile(const GemvArgs& a, const float* x, const float* xd, const WElem<K>* w, float* y) {
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
      for (int r = 0; r < RT; ++r) hwy::Prefetch(w + (RT + r) * cols + k);
      for (int r = 0; r < RT; ++r) {
        const auto u = hn::BitCast(du32, hn::LoadU(du16, w + r * cols + k));
        we[r] = hn::BitCast(df, hn::ShiftLeft<16>(u));
        wo[r] = hn::BitCast(df, hn::And(u, hi_mask));
      }
      for (int m = 0; m < MT; ++m) {
        const V xe = hn::LoadU(df, xd + m * a.ldxd + k), xo = hn::LoadU(df, xd + m * a.ldxd + k + NL);
        for (int r = 0; r < RT; ++r) acc[m][r] = hn::MulAdd(xo, wo[r], hn::MulAdd(xe, we[r], acc[m][r]));
      }
    }
  } else
#endif
  {
    for (; k + NL <= cols; k += NL) {
      V wv[RT];
      for (int r = 0; r < RT; ++r) hwy::Prefetch(w + (RT + r) * cols + k);
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

template <int K, int RT>
HWY_INLINE void RowBlock(const GemvArgs& a, int64_t M, const WElem<K>* w, float* y) {
  int64_t m = 0;
  auto tile = [&](auto mt) {
    Tile<K, decltype(mt)::value, RT>(a, a.x + m * a.ldx, a.xd + m * a.ldxd, w, y + m * a.ldy);
  };
  for (; m + 4 <= M; m += 4) tile(std::integral_constant<int, 4>());
  switch (M - m) {
    case 3: tile(std::integral_constant<int, 3>()); break;
    case 2: tile(std::integral_constant<int, 2>()); break;
    case 1: tile(std::integral_constant<int, 1>()); break;
    default: break;
  }
}

// Output columns [rb, re) (W points at the range's first row, y at its first column).
template <int K>
void GemvRowsT(const GemvArgs& a, int64_t M, const WElem<K>* W, int64_t rb, int64_t re) {
  int64_t r = rb;
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

}  // namespace HWY_NAMESPACE
}  // namespace mamba::ops
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba {

const char* weight_dtype_name(WeightDType t) {
  switch (t) {
    case WeightDType::f32: return "f32";
    case WeightDType::bf16: return "bf16";
    case WeightDType::f16: return "f16";
  }
  return "?";
}

WeightDType parse_weight_dtype(const std::string& s) {
  if (s == "f32" || s == "fp32" || s == "float32") return WeightDType::f32;
  if (s == "bf16" || s == "bfloat16") return WeightDType::bf16;
  if (s == "f16" || s == "fp16" || s == "float16") return WeightDType::f16;
  throw Error(str("weight dtype: expected f32, bf16 or f16, got '", s, "'"));
}

namespace ops {
HWY_EXPORT(FromHalfKernel);
HWY_EXPORT(GemvKernel);
HWY_EXPORT(GemvF32Kernel);

namespace {
void check_kind(WeightDType kind, const char* what) {
  MAMBA_CHECK(kind == WeightDType::bf16 || kind == WeightDType::f16, what,
              ": 16-bit kind must be bf16 or f16, got ", weight_dtype_name(kind));
}

void check_args(const char* what, int64_t M, int64_t ldx, const HalfWeight& W, int64_t r0,
                int64_t n, int64_t ldy) {
  MAMBA_CHECK(W.defined(), what, ": W is undefined");
  MAMBA_CHECK(M >= 0 && n >= 0, what, ": negative size M=", M, " n=", n);
  MAMBA_CHECK(r0 >= 0 && r0 + n <= W.rows(), what, ": rows [", r0, ", ", r0 + n,
              ") out of range for W (", W.rows(), ", ", W.cols(), ")");
  MAMBA_CHECK(ldx >= W.cols(), what, ": ldx ", ldx, " < cols ", W.cols());
  MAMBA_CHECK(ldy >= n, what, ": ldy ", ldy, " < n ", n);
}

// Rows per thread task of the streaming kernel: at least ~16K weights, so small matrices
// (dt_proj, x_proj) are not split into tasks costlier than their work.
int64_t gemv_grain(int64_t cols) { return std::max<int64_t>(4, (16384 + cols - 1) / std::max<int64_t>(cols, 1)); }

}  // namespace

uint16_t f32_to_half(float v, WeightDType kind) {
  check_kind(kind, "f32_to_half");
  return kind == WeightDType::bf16 ? f32_to_bf16(v) : f32_to_f16(v);
}

float half_to_f32(uint16_t h, WeightDType kind) {
  check_kind(kind, "half_to_f32");
  return kind == WeightDType::bf16 ? bf16_to_f32(h) : f16_to_f32(h);
}

void to_half(const float* src, uint16_t* dst, int64_t n, WeightDType kind) {
  check_kind(kind, "to_half");
  const bool bf = kind == WeightDType::bf16;
  parallel_for(n, 1 << 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = bf ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
  });
}

void from_half(const uint16_t* src, float* dst, int64_t n, WeightDType kind) {
  check_kind(kind, "from_half");
  HWY_DYNAMIC_DISPATCH(FromHalfKernel)(src, dst, n, kind == WeightDType::bf16);
}

HalfWeight::HalfWeight(const Tensor& W, WeightDType kind) {
  check_kind(kind, "HalfWeight");
  check_defined(W, "HalfWeight: W");
  MAMBA_CHECK(W.ndim() == 2, "HalfWeight: W must be (rows, cols), got ", W.shape_str());
  rows_ = W.dim(0), cols_ = W.dim(1), kind_ = kind;
  constexpr size_t kAlign = 64;
  size_t bytes = static_cast<size_t>(std::max<int64_t>(rows_ * cols_, 1)) * 2;
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = ::operator new(bytes, std::align_val_t(kAlign));
  storage_ = std::shared_ptr<uint16_t>(static_cast<uint16_t*>(p), [](uint16_t* q) {
    ::operator delete(q, std::align_val_t(kAlign));
  });
  to_half(W.data(), storage_.get(), rows_ * cols_, kind);
}

Tensor HalfWeight::to_f32() const {
  MAMBA_CHECK(defined(), "HalfWeight::to_f32: undefined weight");
  Tensor t = Tensor::empty({rows_, cols_});
  from_half(data(), t.data(), rows_ * cols_, kind_);
  return t;
}

void HalfWeight::row_to_f32(int64_t r, float* dst) const {
  MAMBA_CHECK(defined() && r >= 0 && r < rows_, "HalfWeight::row_to_f32: row ", r,
              " out of range [0, ", rows_, ")");
  from_half(row(r), dst, cols_, kind_);
}

void move_weight_storage(Tensor& value, Tensor& grad, Tensor& view, HalfWeight& h, WeightDType t) {
  Tensor f32 = h.defined() ? h.to_f32() : view;  // exact when coming back from 16 bits
  check_defined(f32, "move_weight_storage: weight");
  if (t == WeightDType::f32) {
    value = view = f32;
    grad = Tensor(f32.shape());
    h = HalfWeight();
  } else {
    h = HalfWeight(f32, t);
    value = grad = view = Tensor();  // the last references: the fp32 memory is freed
  }
}

void half_matmul(const float* x, int64_t M, int64_t ldx, const HalfWeight& W, int64_t r0, int64_t n,
                 float* y, int64_t ldy) {
  check_args("half_matmul", M, ldx, W, r0, n, ldy);
  if (M == 0 || n == 0) return;
  const int64_t cols = W.cols();
  const bool bf = W.kind() == WeightDType::bf16;
  if (M <= kHalfGemvMaxM) {
    // Decode: stream each weight row once, all M inputs against it.
    HWY_DYNAMIC_DISPATCH(GemvKernel)(x, M, ldx, W.row(r0), cols, n, y, ldy, bf, gemv_grain(cols));
    return;
  }
  // Prefill: compute bound; the packed kernel converts the rows as it packs them (ops/xwt.h).
  xwt(x, M, ldx, WeightRows{W.row(r0), W.kind(), cols}, n, cols, y, ldy, false);
}

void half_matmul_ref(const float* x, int64_t M, int64_t ldx, const HalfWeight& W, int64_t r0,
                     int64_t n, float* y, int64_t ldy) {
  check_args("half_matmul_ref", M, ldx, W, r0, n, ldy);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      const uint16_t* w = W.row(r0 + j);
      for (int64_t k = 0; k < W.cols(); ++k)
        acc += static_cast<double>(x[m * ldx + k]) * half_to_f32(w[k], W.kind());
      y[m * ldy + j] = static_cast<float>(acc);
    }
}

namespace {
// y (M, n) += b (n) on every row (b optional).
void add_row_bias(float* y, const Tensor& b, int64_t M, int64_t n) {
  if (!b.defined()) return;
  const float* bp = b.data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < n; ++j) y[m * n + j] += bp[j];
}
}  // namespace

Tensor half_linear(const Tensor& x, const HalfWeight& W, const Tensor& b) {
  check_defined(x, "half_linear: x");
  MAMBA_CHECK(W.defined(), "half_linear: W is undefined");
  MAMBA_CHECK(x.ndim() >= 1 && x.dim(-1) == W.cols(), "half_linear: W (", W.rows(), ", ", W.cols(),
              ") expects in = ", W.cols(), " but x is ", x.shape_str());
  if (b.defined()) check_shape(b, "half_linear: b", {W.rows()});
  Shape s = x.shape();
  s.back() = W.rows();
  Tensor y = Tensor::empty(s);
  const int64_t M = W.cols() ? x.numel() / W.cols() : 0, n = W.rows();
  if (W.cols() == 0) {
    y.zero();
  } else {
    half_matmul(x.data(), M, W.cols(), W, 0, n, y.data(), n);
  }
  add_row_bias(y.data(), b, M, n);
  return y;
}

void matmul_wt(const float* x, int64_t M, int64_t ldx, const Tensor& Wf, const HalfWeight& Wh,
               int64_t r0, int64_t n, float* y, int64_t ldy) {
  if (Wh.defined()) {
    half_matmul(x, M, ldx, Wh, r0, n, y, ldy);
    return;
  }
  check_defined(Wf, "matmul_wt: W");
  MAMBA_CHECK(Wf.ndim() == 2 && r0 >= 0 && n >= 0 && r0 + n <= Wf.dim(0), "matmul_wt: rows [", r0,
              ", ", r0 + n, ") out of range for W ", Wf.shape_str());
  const int64_t cols = Wf.dim(1);
  if (M >= 2 && M <= kHalfGemvMaxM) {  // batched decode: stream the weights once for all M rows
    MAMBA_CHECK(ldx >= cols && ldy >= n, "matmul_wt: ldx ", ldx, " < cols ", cols, " or ldy ", ldy, " < n ", n);
    HWY_DYNAMIC_DISPATCH(GemvF32Kernel)(x, M, ldx, Wf.data() + r0 * cols, cols, n, y, ldy, gemv_grain(cols));
    return;
  }
  if (M > kHalfGemvMaxM) {  // prefill: the packed kernel (or the BLAS where it is not faster); xwt checks ld
    xwt(x, M, ldx, WeightRows{Wf.data() + r0 * cols, WeightDType::f32, cols}, n, cols, y, ldy, false);
    return;
  }
  gemm(false, true, M, n, cols, 1.f, x, ldx, Wf.data() + r0 * cols, cols, 0.f, y, ldy);
}

Tensor linear_any(const Tensor& x, const Tensor& Wf, const HalfWeight& Wh, const Tensor& b) {
  if (Wh.defined()) return half_linear(x, Wh, b);
  const int64_t cols = Wf.defined() && Wf.ndim() == 2 ? Wf.dim(1) : 0;
  const int64_t M = x.defined() && cols > 0 && x.ndim() >= 1 && x.dim(-1) == cols ? x.numel() / cols : 0;
  if (M < 2 || M > kHalfGemvMaxM) return linear_fwd(x, Wf, b);  // checks every shape
  // batched decode on fp32 weights: the streaming kernel (matmul_wt)
  if (b.defined()) check_shape(b, "linear: b", {Wf.dim(0)});
  Shape s = x.shape();
  s.back() = Wf.dim(0);
  Tensor y = Tensor::empty(s);
  const int64_t n = Wf.dim(0);
  matmul_wt(x.data(), M, cols, Wf, Wh, 0, n, y.data(), n);
  add_row_bias(y.data(), b, M, n);
  return y;
}

}  // namespace ops
}  // namespace mamba
#endif  // HWY_ONCE
