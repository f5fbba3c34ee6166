// Weight storage: fp32 / bf16 / f16 / q8_0 / q4_0 and the conversions between them (scalar, and
// arrays with Highway kernels following the dispatch pattern of src/ops/act.cpp).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "core/weight.cpp"
#include "mamba/weight.h"

#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <new>

#include "mamba/parallel.h"

HWY_BEFORE_NAMESPACE();
namespace mamba {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

template <bool kBF16>
void FromHalfT(const uint16_t* src, float* dst, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + NL <= n; i += NL) {
    if constexpr (kBF16) {
      const hn::Rebind<hwy::bfloat16_t, decltype(df)> dh;
      hn::StoreU(
          hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::bfloat16_t*>(src + i))), df,
          dst + i);
    } else {
      const hn::Rebind<hwy::float16_t, decltype(df)> dh;
      hn::StoreU(hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(src + i))),
                 df, dst + i);
    }
  }
  for (; i < n; ++i) dst[i] = kBF16 ? bf16_to_f32(src[i]) : f16_to_f32(src[i]);
}

void FromHalfKernel(const uint16_t* src, float* dst, int64_t n, bool bf16) {
  if (bf16)
    FromHalfT<true>(src, dst, n);
  else
    FromHalfT<false>(src, dst, n);
}

// nb blocks of q8_0 / q4_0 at src to 32 * nb fp32 values: integers widened to int32, converted,
// times the block's scale (exact: an 11-bit scale times an integer of at most 8 bits).
template <bool kQ4>
void DequantT(const uint8_t* src, float* dst, int64_t nb) {
  const hn::CappedTag<float, 16> df;  // at most 16 lanes: a vector never spans two blocks
  const hn::RebindToSigned<decltype(df)> di;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(df));
  constexpr int64_t kBytes = kQ4 ? 18 : 34;
  // The f16 scales of 16 blocks at a time, widened by one vector conversion (exact, as the
  // scalar f16_to_f32 is) instead of a call per block.
  const hn::Rebind<hwy::float16_t, decltype(df)> dh;
  HWY_ALIGN uint16_t sh[16];
  HWY_ALIGN float sf[16];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* q = src + b * kBytes;
    float* o = dst + 32 * b;
    if (b % 16 == 0) {
      const int64_t bn = std::min<int64_t>(16, nb - b);
      for (int64_t j = 0; j < 16; ++j) {
        const uint8_t* qj = q + std::min(j, bn - 1) * kBytes;
        sh[j] = static_cast<uint16_t>(qj[0] | (qj[1] << 8));
      }
      for (int64_t j = 0; j < 16; j += NL)
        hn::StoreU(
            hn::PromoteTo(df, hn::LoadU(dh, reinterpret_cast<const hwy::float16_t*>(sh + j))), df,
            sf + j);
    }
    const auto d = hn::Set(df, sf[b % 16]);
    if constexpr (kQ4) {
      const hn::Rebind<uint8_t, decltype(df)> du8;
      const auto lo = hn::Set(di, 15), eight = hn::Set(di, 8);
      for (int64_t j = 0; j < 16; j += NL) {
        const auto u = hn::PromoteTo(di, hn::LoadU(du8, q + 2 + j));
        hn::StoreU(hn::Mul(hn::ConvertTo(df, hn::Sub(hn::And(u, lo), eight)), d), df, o + j);
        hn::StoreU(hn::Mul(hn::ConvertTo(df, hn::Sub(hn::ShiftRight<4>(u), eight)), d), df,
                   o + 16 + j);
      }
    } else {
      const hn::Rebind<int8_t, decltype(df)> d8;
      for (int64_t j = 0; j < 32; j += NL)
        hn::StoreU(
            hn::Mul(hn::ConvertTo(
                        df, hn::PromoteTo(
                                di, hn::LoadU(d8, reinterpret_cast<const int8_t*>(q + 2 + j)))),
                    d),
            df, o + j);
    }
  }
}

void DequantKernel(const uint8_t* src, float* dst, int64_t nb, bool q4) {
  if (q4)
    DequantT<true>(src, dst, nb);
  else
    DequantT<false>(src, dst, nb);
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba {
HWY_EXPORT(FromHalfKernel);
HWY_EXPORT(DequantKernel);

const char* weight_dtype_name(WeightDType t) {
  switch (t) {
    case WeightDType::f32:
      return "f32";
    case WeightDType::bf16:
      return "bf16";
    case WeightDType::f16:
      return "f16";
    case WeightDType::q8_0:
      return "q8_0";
    case WeightDType::q4_0:
      return "q4_0";
  }
  return "?";
}

WeightDType parse_weight_dtype(const std::string& s) {
  if (s == "f32" || s == "fp32" || s == "float32") return WeightDType::f32;
  if (s == "bf16" || s == "bfloat16") return WeightDType::bf16;
  if (s == "f16" || s == "fp16" || s == "float16") return WeightDType::f16;
  if (s == "q8_0" || s == "q8") return WeightDType::q8_0;
  if (s == "q4_0" || s == "q4") return WeightDType::q4_0;
  throw Error(str("weight dtype: expected f32, bf16, f16, q8_0 or q4_0, got '", s, "'"));
}

namespace {
std::atomic<int> g_activation_type{static_cast<int>(ActivationType::f32)};
}  // namespace

void set_activation_type(ActivationType t) {
  g_activation_type.store(static_cast<int>(t), std::memory_order_relaxed);
}
ActivationType activation_type() {
  return static_cast<ActivationType>(g_activation_type.load(std::memory_order_relaxed));
}
const char* activation_type_name(ActivationType t) {
  return t == ActivationType::q8 ? "q8" : t == ActivationType::bf16 ? "bf16" : "f32";
}
ActivationType parse_activation_type(const std::string& s) {
  if (s == "f32" || s == "fp32") return ActivationType::f32;
  if (s == "q8" || s == "q8_0") return ActivationType::q8;
  if (s == "bf16") return ActivationType::bf16;
  throw Error(str("activations: expected f32 or q8 or bf16, got '", s, "'"));
}

int64_t weight_dtype_size(WeightDType t) {
  MAMBA_CHECK(!is_quantised(t), "weight_dtype_size: ", weight_dtype_name(t),
              " is a block format (use weight_row_bytes)");
  return t == WeightDType::f32 ? 4 : 2;
}

int64_t weight_row_bytes(WeightDType t, int64_t n) {
  switch (t) {
    case WeightDType::f32:
      return 4 * n;
    case WeightDType::bf16:
    case WeightDType::f16:
      return 2 * n;
    case WeightDType::q8_0:
      return n / 32 * 34;
    case WeightDType::q4_0:
      return n / 32 * 18;
  }
  return 0;
}

// ---- scalar conversions -------------------------------------------------------------------------

float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal
      int e = -1;
      do {
        ++e, man <<= 1;
      } while (!(man & 0x400));
      u = sign | ((127 - 15 - e) << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7F800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((u >> 23) & 0xFF) - 127 + 15;
  uint32_t man = u & 0x7FFFFF;
  if (((u >> 23) & 0xFF) == 0xFF) return static_cast<uint16_t>(sign | 0x7C00 | (man ? 0x200 : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t h = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (man >> 13), rem = man & 0x1FFF;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

namespace {
void check_kind(WeightDType kind, const char* what) {
  MAMBA_CHECK(kind == WeightDType::bf16 || kind == WeightDType::f16, what,
              ": 16-bit kind must be bf16 or f16, got ", weight_dtype_name(kind));
}
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

// ---- block quantisation (ggml's q8_0 / q4_0; the rules are at the top of mamba/weight.h) -------

namespace {
void check_blocks(const char* what, int64_t n, WeightDType t) {
  MAMBA_CHECK(is_quantised(t), what, ": ", weight_dtype_name(t), " is not a block format");
  MAMBA_CHECK(n >= 0 && n % 32 == 0, what, ": ", n, " values are not whole blocks of 32");
}
uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
void wr16(uint8_t* p, uint16_t v) {
  p[0] = static_cast<uint8_t>(v), p[1] = static_cast<uint8_t>(v >> 8);
}

// One block of 32 values x into o (34 or 18 bytes).
void quantise_block(const float* x, uint8_t* o, bool q4) {
  if (!q4) {
    float amax = 0.f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    wr16(o, f32_to_f16(d));
    for (int j = 0; j < 32; ++j)
      o[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
    return;
  }
  float amax = 0.f, mx = 0.f;  // the value of largest magnitude (the first one), with its sign
  for (int j = 0; j < 32; ++j)
    if (amax < std::fabs(x[j])) amax = std::fabs(x[j]), mx = x[j];
  const float d = mx / -8.f, id = d != 0.f ? 1.f / d : 0.f;
  wr16(o, f32_to_f16(d));
  for (int j = 0; j < 16; ++j) {
    // x * id + 8.5 lies in [0.5, 16.5]: truncation rounds x * id + 8 to nearest (halves up).
    const int lo = std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f)));
    const int hi = std::min(15, static_cast<int>(static_cast<int8_t>(x[j + 16] * id + 8.5f)));
    o[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
  }
}
}  // namespace

void quantise_blocks(const float* src, void* dst, int64_t n, WeightDType t) {
  check_blocks("quantise_blocks", n, t);
  for (int64_t i = 0; i < n; ++i)
    MAMBA_CHECK(std::isfinite(src[i]), "quantise_blocks: ", weight_dtype_name(t), " value #", i,
                " is not finite (", src[i], ")");
  const bool q4 = t == WeightDType::q4_0;
  const int64_t bb = q4 ? 18 : 34;
  uint8_t* o = static_cast<uint8_t*>(dst);
  parallel_for(n / 32, 2048, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) quantise_block(src + 32 * i, o + bb * i, q4);
  });
}

void dequantise_blocks(const void* src, float* dst, int64_t n, WeightDType t) {
  check_blocks("dequantise_blocks", n, t);
  HWY_DYNAMIC_DISPATCH(DequantKernel)
  (static_cast<const uint8_t*>(src), dst, n / 32, t == WeightDType::q4_0);
}

void dequantise_blocks_ref(const void* src, float* dst, int64_t n, WeightDType t) {
  check_blocks("dequantise_blocks_ref", n, t);
  const uint8_t* p = static_cast<const uint8_t*>(src);
  for (int64_t b = 0; b < n / 32; ++b) {
    if (t == WeightDType::q8_0) {
      const uint8_t* q = p + 34 * b;
      const float d = f16_to_f32(rd16(q));
      for (int j = 0; j < 32; ++j)
        dst[32 * b + j] = d * static_cast<float>(static_cast<int8_t>(q[2 + j]));
    } else {
      const uint8_t* q = p + 18 * b;
      const float d = f16_to_f32(rd16(q));
      for (int j = 0; j < 16; ++j) {
        dst[32 * b + j] = d * static_cast<float>((q[2 + j] & 0x0F) - 8);
        dst[32 * b + j + 16] = d * static_cast<float>((q[2 + j] >> 4) - 8);
      }
    }
  }
}

void weight_row_to_f32(const void* row, WeightDType t, int64_t n, float* dst) {
  if (t == WeightDType::f32)
    std::memcpy(dst, row, static_cast<size_t>(n) * sizeof(float));
  else if (is_quantised(t))
    dequantise_blocks(row, dst, n, t);
  else
    from_half(static_cast<const uint16_t*>(row), dst, n, t);
}

// ---- Weight -------------------------------------------------------------------------------------

namespace {
std::shared_ptr<uint8_t> allocate_bytes(int64_t n) {
  constexpr size_t kAlign = 64;
  size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1));
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = ::operator new(bytes, std::align_val_t(kAlign));
  return std::shared_ptr<uint8_t>(
      static_cast<uint8_t*>(p), [](uint8_t* q) { ::operator delete(q, std::align_val_t(kAlign)); });
}
}  // namespace

Weight::Weight(Tensor values) {
  check_defined(values, "Weight: values");
  if (!values.is_contiguous()) values = values.contiguous();
  shape_ = values.shape();
  numel_ = values.numel();
  f32_ = std::move(values);
}

Weight::Weight(const Tensor& values, WeightDType dtype) : Weight(values) { set_dtype(dtype); }

const Tensor& Weight::f32(const char* what) const {
  MAMBA_CHECK(defined(), what, ": weight is undefined");
  MAMBA_CHECK(is_f32(), what, ": weights are ", weight_dtype_name(dtype_),
              ": inference only; load in f32 to train");
  return f32_;
}

Tensor& Weight::f32(const char* what) {
  return const_cast<Tensor&>(static_cast<const Weight*>(this)->f32(what));
}

Tensor Weight::to_f32() const {
  MAMBA_CHECK(defined(), "Weight::to_f32: weight is undefined");
  if (is_f32()) return f32_;
  Tensor t = Tensor::empty(shape_);
  weight_row_to_f32(buf_.get() + offset_, dtype_, numel_, t.data());  // rows are contiguous
  return t;
}

void Weight::row_to_f32(int64_t r, float* dst) const {
  MAMBA_CHECK(defined() && r >= 0 && r < rows(), "Weight::row_to_f32: row ", r,
              " out of range [0, ", rows(), ")");
  weight_row_to_f32(row_ptr(r), dtype_, cols(), dst);
}

void Weight::assign(const Tensor& values) {
  MAMBA_CHECK(defined(), "Weight::assign: weight is undefined");
  check_defined(values, "Weight::assign: values");
  MAMBA_CHECK(values.shape() == shape_, "Weight::assign: values have shape ", values.shape_str(),
              ", expected ", shape_str());
  if (is_f32()) {
    f32_.copy_from(values);
    return;
  }
  const Tensor v = values.is_contiguous() ? values : values.contiguous();
  uint8_t* dst = buf_.get() + offset_;
  if (is_quantised(dtype_))
    quantise_blocks(v.data(), dst, numel_, dtype_);
  else
    to_half(v.data(), reinterpret_cast<uint16_t*>(dst), numel_, dtype_);
}

void Weight::assign_raw(const void* data, int64_t nbytes) {
  MAMBA_CHECK(defined(), "Weight::assign_raw: weight is undefined");
  MAMBA_CHECK(nbytes == bytes(), "Weight::assign_raw: ", nbytes, " bytes for a ",
              weight_dtype_name(dtype_), " weight of shape ", shape_str(), " (", bytes(),
              " bytes)");
  void* dst = is_f32() ? static_cast<void*>(f32_.data()) : buf_.get() + offset_;
  std::memcpy(dst, data, static_cast<size_t>(nbytes));
}

void Weight::set_dtype(WeightDType t, const std::string& what) {
  MAMBA_CHECK(defined(), what, ": Weight::set_dtype: weight is undefined");
  if (t == dtype_) return;
  if (is_quantised(t))
    MAMBA_CHECK(!shape_.empty() && cols() % 32 == 0, what, ": ", weight_dtype_name(t),
                " stores rows of whole blocks of 32 values; shape ", shape_str(), " has rows of ",
                cols(), " values");
  if (t == WeightDType::f32) {
    f32_ = to_f32();  // exact
    buf_.reset();
    offset_ = 0;
  } else {
    const Tensor src = to_f32();  // fp32 itself, or the exact values of another storage
    std::shared_ptr<uint8_t> b = allocate_bytes(rows() * weight_row_bytes(t, cols()));
    if (is_quantised(t))
      quantise_blocks(src.data(), b.get(), numel_, t);
    else
      to_half(src.data(), reinterpret_cast<uint16_t*>(b.get()), numel_, t);
    buf_ = std::move(b);
    offset_ = 0;
    f32_ = Tensor();  // releases the fp32 memory (if nothing else holds it)
  }
  dtype_ = t;
}

Weight Weight::rows(int64_t r0, int64_t n) const {
  MAMBA_CHECK(defined(), "Weight::rows: weight is undefined");
  MAMBA_CHECK(!shape_.empty() && r0 >= 0 && n >= 0 && r0 + n <= rows(), "Weight::rows: [", r0, ", ",
              r0 + n, ") out of range for shape ", shape_str());
  Weight w = *this;
  w.shape_[0] = n;
  w.numel_ = n * cols();
  if (is_f32())
    w.f32_ = f32_.narrow(r0, n);
  else
    w.offset_ = offset_ + r0 * row_bytes();
  return w;
}

const void* Weight::row_ptr(int64_t r) const {
  if (is_f32()) return f32_.data() + r * cols();
  return buf_.get() + offset_ + r * row_bytes();
}

}  // namespace mamba
#endif  // HWY_ONCE
