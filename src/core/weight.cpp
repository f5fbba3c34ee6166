// Weight storage: fp32 / bf16 / f16 and the conversions between them (scalar, and arrays with a
// Highway kernel following the dispatch pattern of src/ops/act.cpp).
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "core/weight.cpp"
#include "mamba/weight.h"

#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include <algorithm>
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

}  // namespace HWY_NAMESPACE
}  // namespace mamba
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba {
HWY_EXPORT(FromHalfKernel);

const char* weight_dtype_name(WeightDType t) {
  switch (t) {
    case WeightDType::f32:
      return "f32";
    case WeightDType::bf16:
      return "bf16";
    case WeightDType::f16:
      return "f16";
  }
  return "?";
}

WeightDType parse_weight_dtype(const std::string& s) {
  if (s == "f32" || s == "fp32" || s == "float32") return WeightDType::f32;
  if (s == "bf16" || s == "bfloat16") return WeightDType::bf16;
  if (s == "f16" || s == "fp16" || s == "float16") return WeightDType::f16;
  throw Error(str("weight dtype: expected f32, bf16 or f16, got '", s, "'"));
}

int64_t weight_dtype_size(WeightDType t) { return t == WeightDType::f32 ? 4 : 2; }

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

// ---- Weight -------------------------------------------------------------------------------------

namespace {
std::shared_ptr<uint16_t> allocate_half(int64_t n) {
  constexpr size_t kAlign = 64;
  size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * 2;
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  void* p = ::operator new(bytes, std::align_val_t(kAlign));
  return std::shared_ptr<uint16_t>(static_cast<uint16_t*>(p), [](uint16_t* q) {
    ::operator delete(q, std::align_val_t(kAlign));
  });
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
  from_half(half_.get() + offset_, t.data(), numel_, dtype_);
  return t;
}

void Weight::row_to_f32(int64_t r, float* dst) const {
  MAMBA_CHECK(defined() && r >= 0 && r < rows(), "Weight::row_to_f32: row ", r,
              " out of range [0, ", rows(), ")");
  const int64_t c = cols();
  if (is_f32())
    std::copy_n(f32_.data() + r * c, c, dst);
  else
    from_half(half_.get() + offset_ + r * c, dst, c, dtype_);
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
  to_half(v.data(), half_.get() + offset_, numel_, dtype_);
}

void Weight::set_dtype(WeightDType t) {
  MAMBA_CHECK(defined(), "Weight::set_dtype: weight is undefined");
  if (t == dtype_) return;
  if (t == WeightDType::f32) {
    f32_ = to_f32();  // exact
    half_.reset();
    offset_ = 0;
  } else {
    const Tensor src = to_f32();  // fp32 itself, or the exact values of the other 16-bit kind
    std::shared_ptr<uint16_t> h = allocate_half(numel_);
    to_half(src.data(), h.get(), numel_, t);
    half_ = std::move(h);
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
    w.offset_ = offset_ + r0 * cols();
  return w;
}

const void* Weight::row_ptr(int64_t r) const {
  if (is_f32()) return f32_.data() + r * cols();
  return half_.get() + offset_ + r * cols();
}

}  // namespace mamba
#endif  // HWY_ONCE
