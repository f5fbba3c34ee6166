#include "mamba/gguf.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "core/os.h"
#include "mamba/error.h"
#include "mamba/weight.h"

namespace mamba {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read little-endian
constexpr uint64_t kMaxString = 1ull << 30;
constexpr uint64_t kMaxDims = 4;  // ggml's GGML_MAX_DIMS
constexpr int64_t kMaxNumel = int64_t{1} << 40;

const char* value_type_name(uint32_t t) {
  static const char* names[] = {"UINT8",  "INT8",    "UINT16", "INT16",  "UINT32",
                                "INT32",  "FLOAT32", "BOOL",   "STRING", "ARRAY",
                                "UINT64", "INT64",   "FLOAT64"};
  return t < 13 ? names[t] : "unknown";
}

// Size of a scalar value type (0 for STRING / ARRAY / unknown).
uint64_t scalar_size(uint32_t t) {
  switch (static_cast<GGUFType>(t)) {
    case GGUFType::U8:
    case GGUFType::I8:
    case GGUFType::BOOL:
      return 1;
    case GGUFType::U16:
    case GGUFType::I16:
      return 2;
    case GGUFType::U32:
    case GGUFType::I32:
    case GGUFType::F32:
      return 4;
    case GGUFType::U64:
    case GGUFType::I64:
    case GGUFType::F64:
      return 8;
    default:
      return 0;
  }
}

// A bounds-checked little-endian reader over the file's bytes.
struct Cursor {
  const uint8_t* p;
  uint64_t size, pos = 0;
  const std::string& origin;
  uint64_t left() const { return size - pos; }
  void need(uint64_t n, const std::string& what) const {
    MAMBA_CHECK(n <= left(), origin, ": truncated: ", what, " needs ", n, " bytes at offset ", pos,
                ", the file has ", left(), " left");
  }
  uint64_t le(int n, const std::string& what) {
    need(static_cast<uint64_t>(n), what);
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[pos + i];
    pos += static_cast<uint64_t>(n);
    return v;
  }
  uint32_t u32(const std::string& what) { return static_cast<uint32_t>(le(4, what)); }
  uint64_t u64(const std::string& what) { return le(8, what); }
  std::string string(const std::string& what) {
    const uint64_t n = u64(what + " (length)");
    MAMBA_CHECK(n <= kMaxString, origin, ": ", what, ": string length ", n, " exceeds the limit");
    need(n, what);
    std::string s(reinterpret_cast<const char*>(p + pos), static_cast<size_t>(n));
    pos += n;
    return s;
  }
  // One scalar of type t into v (ints in i / u, floats in f).
  void scalar(uint32_t t, GGUFValue& v, const std::string& what) {
    const uint64_t raw = le(static_cast<int>(scalar_size(t)), what);
    switch (static_cast<GGUFType>(t)) {
      case GGUFType::U8:
      case GGUFType::U16:
      case GGUFType::U32:
      case GGUFType::U64:
        v.u = raw;
        v.i = raw > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(raw);
        break;
      case GGUFType::I8:
        v.i = static_cast<int8_t>(raw);
        break;
      case GGUFType::I16:
        v.i = static_cast<int16_t>(raw);
        break;
      case GGUFType::I32:
        v.i = static_cast<int32_t>(raw);
        break;
      case GGUFType::I64:
        v.i = static_cast<int64_t>(raw);
        break;
      case GGUFType::BOOL:
        MAMBA_CHECK(raw <= 1, origin, ": ", what, ": bool value ", raw, " is not 0 or 1");
        v.i = static_cast<int64_t>(raw);
        break;
      case GGUFType::F32: {
        const uint32_t b = static_cast<uint32_t>(raw);
        float f;
        std::memcpy(&f, &b, 4);
        v.f = f;
        break;
      }
      case GGUFType::F64:
        std::memcpy(&v.f, &raw, 8);
        break;
      default:
        break;
    }
    if (t != static_cast<uint32_t>(GGUFType::F32) && t != static_cast<uint32_t>(GGUFType::F64))
      v.f = static_cast<double>(v.i);
  }
};

bool is_float_type(GGUFType t) { return t == GGUFType::F32 || t == GGUFType::F64; }
bool is_int_type(GGUFType t) {
  return scalar_size(static_cast<uint32_t>(t)) > 0 && !is_float_type(t);
}

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// The read-only block types, from ggml's published block layouts (docs/GGUF.md). Each value is
// d * q (minus m for Q4_K) with the scale products formed in fp32, as ggml's reference
// dequantisation does, so the result is the same fp32 value.
//
// Q5_0: 32 values; f16 d, 4 bytes holding the 5th bit of each value (bit j of value j), 16 bytes
// of low nibbles (byte j: value j in the low half, value j + 16 in the high half); q - 16.
void dequant_q5_0(const uint8_t* b, float* y) {
  const float d = f16_to_f32(rd16(b));
  const uint32_t hi = static_cast<uint32_t>(b[2]) | static_cast<uint32_t>(b[3]) << 8 |
                      static_cast<uint32_t>(b[4]) << 16 | static_cast<uint32_t>(b[5]) << 24;
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int lo = (qs[j] & 0xF) | static_cast<int>((hi >> j) & 1u) << 4;
    const int up = (qs[j] >> 4) | static_cast<int>((hi >> (j + 16)) & 1u) << 4;
    y[j] = d * static_cast<float>(lo - 16);
    y[j + 16] = d * static_cast<float>(up - 16);
  }
}

// Q4_K: 256 values in 8 sub-blocks of 32; f16 d, f16 dmin, 12 bytes packing 8 six-bit scales and
// 8 six-bit mins, 128 bytes of nibbles. Sub-blocks 2i and 2i+1 share 32 bytes: the low nibbles
// are sub-block 2i, the high nibbles 2i+1. value = d * scale * q - dmin * min.
void q4_k_scale_min(int j, const uint8_t* s, int& sc, int& m) {
  if (j < 4) {
    sc = s[j] & 63, m = s[j + 4] & 63;
  } else {  // low 4 bits in bytes 8..11, the top 2 bits in the top bits of bytes 0..7
    sc = (s[j + 4] & 0xF) | (s[j - 4] >> 6) << 4;
    m = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
  }
}
void dequant_q4_k(const uint8_t* b, float* y) {
  const float d = f16_to_f32(rd16(b)), dmin = f16_to_f32(rd16(b + 2));
  const uint8_t* sc = b + 4;
  const uint8_t* q = b + 16;
  for (int i = 0; i < 4; ++i, q += 32, y += 64) {
    int s0, m0, s1, m1;
    q4_k_scale_min(2 * i, sc, s0, m0);
    q4_k_scale_min(2 * i + 1, sc, s1, m1);
    const float d0 = d * static_cast<float>(s0), c0 = dmin * static_cast<float>(m0);
    const float d1 = d * static_cast<float>(s1), c1 = dmin * static_cast<float>(m1);
    for (int l = 0; l < 32; ++l) {
      y[l] = d0 * static_cast<float>(q[l] & 0xF) - c0;
      y[l + 32] = d1 * static_cast<float>(q[l] >> 4) - c1;
    }
  }
}

// Q6_K: 256 values in two halves of 128; 128 bytes of low nibbles (ql), 64 bytes of 2-bit highs
// (qh), 16 int8 scales (one per 16 values), f16 d; q - 32. In each half, for l < 32: ql[l] low /
// high nibble are values l / l + 64, ql[l + 32] low / high are l + 32 / l + 96, and qh[l] bits
// 0-1, 2-3, 4-5, 6-7 are the top bits of values l, l + 32, l + 64, l + 96.
void dequant_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = f16_to_f32(rd16(b + 208));
  for (int h = 0; h < 2; ++h, ql += 64, qh += 32, sc += 8, y += 128)
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q0 = ((ql[l] & 0xF) | ((qh[l] >> 0) & 3) << 4) - 32;
      const int q1 = ((ql[l + 32] & 0xF) | ((qh[l] >> 2) & 3) << 4) - 32;
      const int q2 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) - 32;
      const int q3 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) - 32;
      y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q0);
      y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q1);
      y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q2);
      y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q3);
    }
}

}  // namespace

std::string ggml_type_name(uint32_t type) {
  static const char* names[] = {"F32",
                                "F16",
                                "Q4_0",
                                "Q4_1",
                                "Q4_2 (removed)",
                                "Q4_3 (removed)",
                                "Q5_0",
                                "Q5_1",
                                "Q8_0",
                                "Q8_1",
                                "Q2_K",
                                "Q3_K",
                                "Q4_K",
                                "Q5_K",
                                "Q6_K",
                                "Q8_K",
                                "IQ2_XXS",
                                "IQ2_XS",
                                "IQ3_XXS",
                                "IQ1_S",
                                "IQ4_NL",
                                "IQ3_S",
                                "IQ2_S",
                                "IQ4_XS",
                                "I8",
                                "I16",
                                "I32",
                                "I64",
                                "F64",
                                "IQ1_M",
                                "BF16",
                                "Q4_0_4_4 (removed)",
                                "Q4_0_4_8 (removed)",
                                "Q4_0_8_8 (removed)",
                                "TQ1_0",
                                "TQ2_0"};
  if (type < sizeof(names) / sizeof(names[0])) return names[type];
  return "type " + std::to_string(type);
}

GGMLType parse_ggml_type(const std::string& s) {
  std::string l = s;
  for (char& c : l) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (l == "f32") return GGMLType::F32;
  if (l == "f16") return GGMLType::F16;
  if (l == "bf16") return GGMLType::BF16;
  if (l == "q8_0") return GGMLType::Q8_0;
  if (l == "q4_0") return GGMLType::Q4_0;
  throw Error(str("GGUF tensor type '", s, "' is not one of f32, f16, bf16, q8_0, q4_0"));
}

int64_t ggml_block_size(GGMLType t) {
  switch (t) {
    case GGMLType::F32:
    case GGMLType::F16:
    case GGMLType::BF16:
      return 1;
    case GGMLType::Q8_0:
    case GGMLType::Q4_0:
    case GGMLType::Q5_0:
      return 32;
    case GGMLType::Q4_K:
    case GGMLType::Q6_K:
      return 256;
  }
  throw Error(str("ggml_block_size: unsupported type ", ggml_type_name(static_cast<uint32_t>(t))));
}

uint64_t ggml_nbytes(GGMLType t, int64_t n) {
  const uint64_t un = static_cast<uint64_t>(n);
  switch (t) {
    case GGMLType::F32:
      return un * 4;
    case GGMLType::F16:
    case GGMLType::BF16:
      return un * 2;
    case GGMLType::Q8_0:
      return un / 32 * 34;  // f16 scale + 32 int8
    case GGMLType::Q4_0:
      return un / 32 * 18;  // f16 scale + 16 bytes of nibbles
    case GGMLType::Q5_0:
      return un / 32 * 22;  // f16 scale + 4 bytes of 5th bits + 16 bytes of nibbles
    case GGMLType::Q4_K:
      return un / 256 * 144;  // f16 d, f16 dmin, 12 bytes of 6-bit scales / mins, 128 of nibbles
    case GGMLType::Q6_K:
      return un / 256 * 210;  // 128 bytes low nibbles, 64 of 2-bit highs, 16 int8 scales, f16 d
  }
  throw Error(str("ggml_nbytes: unsupported type ", ggml_type_name(static_cast<uint32_t>(t))));
}

std::vector<uint8_t> ggml_quantize(GGMLType t, const float* x, int64_t n) {
  MAMBA_CHECK(n % ggml_block_size(t) == 0, "GGUF ", ggml_type_name(static_cast<uint32_t>(t)), ": ",
              n, " values are not a whole number of blocks of ", ggml_block_size(t));
  if (t == GGMLType::Q8_0 || t == GGMLType::Q4_0)
    for (int64_t i = 0; i < n; ++i)
      MAMBA_CHECK(std::isfinite(x[i]), "GGUF ", ggml_type_name(static_cast<uint32_t>(t)),
                  ": value #", i, " is not finite (", x[i], ")");
  std::vector<uint8_t> out(static_cast<size_t>(ggml_nbytes(t, n)));
  uint8_t* o = out.data();
  auto put16 = [](uint8_t* p, uint16_t v) {
    p[0] = static_cast<uint8_t>(v), p[1] = static_cast<uint8_t>(v >> 8);
  };
  switch (t) {
    case GGMLType::F32:
      std::memcpy(o, x, static_cast<size_t>(n) * 4);
      break;
    case GGMLType::F16:
      for (int64_t i = 0; i < n; ++i) put16(o + 2 * i, f32_to_f16(x[i]));
      break;
    case GGMLType::BF16:
      for (int64_t i = 0; i < n; ++i) put16(o + 2 * i, f32_to_bf16(x[i]));
      break;
    case GGMLType::Q8_0:  // ggml's reference rounding: mamba/weight.h
      quantise_blocks(x, o, n, WeightDType::q8_0);
      break;
    case GGMLType::Q4_0:
      quantise_blocks(x, o, n, WeightDType::q4_0);
      break;
    case GGMLType::Q5_0:
    case GGMLType::Q4_K:
    case GGMLType::Q6_K:
      throw Error(str("GGUF ", ggml_type_name(static_cast<uint32_t>(t)),
                      " is read only; the writer stores f32, f16, bf16, q8_0 or q4_0"));
  }
  return out;
}

void ggml_dequantize(GGMLType t, const uint8_t* p, int64_t n, float* out) {
  switch (t) {
    case GGMLType::F32:
      std::memcpy(out, p, static_cast<size_t>(n) * 4);
      return;
    case GGMLType::F16:
      for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(rd16(p + 2 * i));
      return;
    case GGMLType::BF16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(rd16(p + 2 * i));
      return;
    case GGMLType::Q8_0:
      dequantise_blocks(p, out, n, WeightDType::q8_0);
      return;
    case GGMLType::Q4_0:
      dequantise_blocks(p, out, n, WeightDType::q4_0);
      return;
    case GGMLType::Q5_0:
      for (int64_t b = 0; b < n / 32; ++b) dequant_q5_0(p + 22 * b, out + 32 * b);
      return;
    case GGMLType::Q4_K:
      for (int64_t b = 0; b < n / 256; ++b) dequant_q4_k(p + 144 * b, out + 256 * b);
      return;
    case GGMLType::Q6_K:
      for (int64_t b = 0; b < n / 256; ++b) dequant_q6_k(p + 210 * b, out + 256 * b);
      return;
  }
  throw Error(str("ggml_dequantize: unsupported type ", ggml_type_name(static_cast<uint32_t>(t))));
}

uint64_t GGUFValue::array_size() const {
  if (elem == GGUFType::STRING) return strs.size();
  return is_float_type(elem) ? floats.size() : ints.size();
}

GGUFFile GGUFFile::open(const std::string& path) {
  auto m = std::make_shared<os::MappedFile>(path);
  return parse_view(m, m->data(), m->size(), path);
}

GGUFFile GGUFFile::parse(std::vector<uint8_t> bytes, const std::string& origin) {
  auto v = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  return parse_view(v, v->data(), v->size(), origin);
}

GGUFFile GGUFFile::parse_view(std::shared_ptr<const void> keep, const uint8_t* data, uint64_t size,
                              const std::string& origin) {
  GGUFFile f;
  f.keep_ = std::move(keep);
  f.base_ = data;
  f.size_ = size;
  f.origin_ = origin;
  Cursor c{data, size, 0, f.origin_};
  MAMBA_CHECK(size >= 4 && c.u32("magic") == kMagic, origin,
              ": not a GGUF file (the first 4 bytes are not \"GGUF\")");
  f.version_ = c.u32("version");
  MAMBA_CHECK(f.version_ == 2 || f.version_ == 3, origin, ": GGUF version ", f.version_,
              " is not supported (2 and 3 are; a byte-swapped number means a big-endian file)");
  const uint64_t n_tensors = c.u64("tensor count"), n_kv = c.u64("metadata count");
  // Each metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes, each tensor entry
  // 8 + 4 + 8 + 4 + 8: counts beyond what the file can hold are refused before any allocation.
  MAMBA_CHECK(n_kv <= c.left() / 13, origin, ": metadata count ", n_kv,
              " is more than the file can hold (corrupt file)");
  MAMBA_CHECK(n_tensors <= c.left() / 32, origin, ": tensor count ", n_tensors,
              " is more than the file can hold (corrupt file)");

  for (uint64_t k = 0; k < n_kv; ++k) {
    const std::string key = c.string(str("metadata key #", k));
    MAMBA_CHECK(!key.empty(), origin, ": metadata key #", k, " is empty");
    MAMBA_CHECK(!f.kv_.count(key), origin, ": metadata key '", key, "' appears twice");
    const std::string what = "metadata '" + key + "'";
    GGUFValue v;
    const uint32_t t = c.u32(what + " type");
    MAMBA_CHECK(t <= 12, origin, ": ", what, " has unknown value type ", t);
    v.type = static_cast<GGUFType>(t);
    if (v.type == GGUFType::STRING) {
      v.s = c.string(what);
    } else if (v.type == GGUFType::ARRAY) {
      const uint32_t et = c.u32(what + " element type");
      MAMBA_CHECK(et <= 12, origin, ": ", what, " has unknown element type ", et);
      MAMBA_CHECK(et != static_cast<uint32_t>(GGUFType::ARRAY), origin, ": ", what,
                  " is an array of arrays (not supported)");
      v.elem = static_cast<GGUFType>(et);
      const uint64_t n = c.u64(what + " length");
      const uint64_t min_elem = v.elem == GGUFType::STRING ? 8 : scalar_size(et);
      MAMBA_CHECK(n <= c.left() / min_elem, origin, ": ", what, " claims ", n, " elements of ",
                  value_type_name(et), ", more than the file holds (truncated or corrupt)");
      if (v.elem == GGUFType::STRING) {
        v.strs.reserve(static_cast<size_t>(n));
        for (uint64_t i = 0; i < n; ++i) v.strs.push_back(c.string(str(what, "[", i, "]")));
      } else {
        const bool fl = is_float_type(v.elem);
        (fl ? v.floats.reserve(static_cast<size_t>(n)) : v.ints.reserve(static_cast<size_t>(n)));
        GGUFValue e;
        for (uint64_t i = 0; i < n; ++i) {
          c.scalar(et, e, what);
          if (fl)
            v.floats.push_back(e.f);
          else
            v.ints.push_back(e.i);
        }
      }
    } else {
      c.scalar(t, v, what);
    }
    f.kv_.emplace(key, std::move(v));
    f.kv_order_.push_back(key);
  }

  if (f.kv_.count("general.alignment")) {
    const GGUFValue& a = f.kv_.at("general.alignment");
    MAMBA_CHECK(is_int_type(a.type) && a.type != GGUFType::BOOL, origin,
                ": general.alignment is not an integer");
    MAMBA_CHECK(a.i >= 1 && a.i <= (1 << 20) && (a.i & (a.i - 1)) == 0, origin,
                ": general.alignment ", a.i, " is not a power of two up to 2^20");
    f.alignment_ = static_cast<uint64_t>(a.i);
  }

  for (uint64_t k = 0; k < n_tensors; ++k) {
    const std::string name = c.string(str("tensor name #", k));
    MAMBA_CHECK(!f.info_.count(name), origin, ": tensor '", name, "' appears twice");
    const std::string what = "tensor '" + name + "'";
    GGUFTensorInfo in;
    const uint32_t nd = c.u32(what + " dimension count");
    MAMBA_CHECK(nd >= 1 && nd <= kMaxDims, origin, ": ", what, " has ", nd,
                " dimensions (1 to 4 are allowed)");
    int64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t n = c.u64(what + " dimension");
      MAMBA_CHECK(n >= 1 && n <= static_cast<uint64_t>(kMaxNumel) &&
                      static_cast<uint64_t>(numel) <= static_cast<uint64_t>(kMaxNumel) / n,
                  origin, ": ", what, " has a bad or too large dimension ", n);
      numel *= static_cast<int64_t>(n);
      in.ne.push_back(static_cast<int64_t>(n));
    }
    in.shape.assign(in.ne.rbegin(), in.ne.rend());
    in.type = c.u32(what + " type");
    in.offset = c.u64(what + " offset");
    MAMBA_CHECK(in.offset % f.alignment_ == 0, origin, ": ", what, " data offset ", in.offset,
                " is not a multiple of the alignment ", f.alignment_);
    // Every ggml type's block (values) and its bytes, so that the data of a type we cannot
    // convert is still bounds-checked; tensor() converts only the supported ones.
    struct BT {
      uint32_t block, bytes;
    };
    static const BT sizes[] = {
        {1, 4},    {1, 2},    {32, 18},  {32, 20},   {0, 0},     {0, 0},     {32, 22},   {32, 24},
        {32, 34},  {32, 36},  {256, 84}, {256, 110}, {256, 144}, {256, 176}, {256, 210}, {256, 292},
        {256, 66}, {256, 74}, {256, 98}, {256, 50},  {32, 18},   {256, 110}, {256, 82},  {256, 136},
        {1, 1},    {1, 2},    {1, 4},    {1, 8},     {1, 8},     {256, 56},  {1, 2},     {0, 0},
        {0, 0},    {0, 0},    {256, 54}, {256, 66}};
    MAMBA_CHECK(in.type < sizeof(sizes) / sizeof(sizes[0]) && sizes[in.type].block > 0, origin,
                ": ", what, " has unknown or removed ggml type ", ggml_type_name(in.type));
    const BT bt = sizes[in.type];
    MAMBA_CHECK(in.ne[0] % bt.block == 0, origin, ": ", what, " of type ", ggml_type_name(in.type),
                " has rows of ", in.ne[0], " values, not a multiple of its block size ", bt.block);
    in.nbytes = static_cast<uint64_t>(numel) / bt.block * bt.bytes;  // numel < 2^40: no overflow
    f.info_.emplace(name, std::move(in));
    f.order_.push_back(name);
  }
  // The data section starts at the next multiple of the alignment.
  const uint64_t pad = (f.alignment_ - c.pos % f.alignment_) % f.alignment_;
  f.data_start_ = std::min(size, c.pos + pad);
  const uint64_t data_size = size - f.data_start_;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& [name, in] : f.info_) {
    MAMBA_CHECK(in.offset <= data_size && in.nbytes <= data_size - in.offset, origin, ": tensor '",
                name, "' data [", in.offset, ", +", in.nbytes, ") lies outside the ", data_size,
                "-byte data section (truncated or corrupt file)");
    ranges.emplace_back(in.offset, in.offset + in.nbytes);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    MAMBA_CHECK(ranges[i].first >= ranges[i - 1].second, origin,
                ": tensors overlap in the data section (corrupt file)");
  return f;
}

const GGUFValue& GGUFFile::value(const std::string& key) const {
  auto it = kv_.find(key);
  MAMBA_CHECK(it != kv_.end(), origin_, ": missing metadata key '", key, "'");
  return it->second;
}

std::vector<std::string> GGUFFile::keys() const { return kv_order_; }

std::string GGUFFile::get_string(const std::string& key) const {
  const GGUFValue& v = value(key);
  MAMBA_CHECK(v.type == GGUFType::STRING, origin_, ": metadata '", key, "' is ",
              value_type_name(static_cast<uint32_t>(v.type)), ", expected a string");
  return v.s;
}

int64_t GGUFFile::get_int(const std::string& key) const {
  const GGUFValue& v = value(key);
  MAMBA_CHECK(is_int_type(v.type), origin_, ": metadata '", key, "' is ",
              value_type_name(static_cast<uint32_t>(v.type)), ", expected an integer");
  MAMBA_CHECK(v.type != GGUFType::U64 || v.u <= static_cast<uint64_t>(INT64_MAX), origin_,
              ": metadata '", key, "' = ", v.u, " is out of range");
  return v.i;
}

double GGUFFile::get_float(const std::string& key) const {
  const GGUFValue& v = value(key);
  MAMBA_CHECK(is_int_type(v.type) || is_float_type(v.type), origin_, ": metadata '", key, "' is ",
              value_type_name(static_cast<uint32_t>(v.type)), ", expected a number");
  return v.f;
}

bool GGUFFile::get_bool(const std::string& key) const {
  const GGUFValue& v = value(key);
  MAMBA_CHECK(v.type == GGUFType::BOOL, origin_, ": metadata '", key, "' is ",
              value_type_name(static_cast<uint32_t>(v.type)), ", expected a bool");
  return v.i != 0;
}

const std::vector<std::string>& GGUFFile::get_strings(const std::string& key) const {
  const GGUFValue& v = value(key);
  MAMBA_CHECK(v.type == GGUFType::ARRAY && v.elem == GGUFType::STRING, origin_, ": metadata '", key,
              "' is not an array of strings");
  return v.strs;
}

const std::vector<int64_t>& GGUFFile::get_ints(const std::string& key) const {
  const GGUFValue& v = value(key);
  MAMBA_CHECK(v.type == GGUFType::ARRAY && is_int_type(v.elem), origin_, ": metadata '", key,
              "' is not an array of integers");
  return v.ints;
}

const GGUFTensorInfo& GGUFFile::info(const std::string& name) const {
  auto it = info_.find(name);
  MAMBA_CHECK(it != info_.end(), origin_, ": missing tensor '", name, "'");
  return it->second;
}

Tensor GGUFFile::tensor(const std::string& name) const {
  const GGUFTensorInfo& in = info(name);
  const GGMLType gt = static_cast<GGMLType>(in.type);
  const bool supported = gt == GGMLType::F32 || gt == GGMLType::F16 || gt == GGMLType::BF16 ||
                         gt == GGMLType::Q8_0 || gt == GGMLType::Q4_0 || gt == GGMLType::Q5_0 ||
                         gt == GGMLType::Q4_K || gt == GGMLType::Q6_K;
  MAMBA_CHECK(supported, origin_, ": tensor '", name, "' has type ", ggml_type_name(in.type),
              ", which is not supported (F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K and Q6_K are; "
              "re-quantise the model to one of them, e.g. with llama-quantize)");
  Tensor t = Tensor::empty(in.shape);
  ggml_dequantize(static_cast<GGMLType>(in.type), base_ + data_start_ + in.offset, t.numel(),
                  t.data());
  return t;
}

const uint8_t* GGUFFile::raw(const std::string& name) const {
  return base_ + data_start_ + info(name).offset;
}

// ---- writer ----

void GGUFWriter::key(const std::string& k, GGUFType type) {
  MAMBA_CHECK(std::find(keys_.begin(), keys_.end(), k) == keys_.end(), "GGUFWriter: key '", k,
              "' added twice");
  keys_.push_back(k);
  auto u64 = [&](uint64_t v) {
    for (int i = 0; i < 8; ++i) meta_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  };
  u64(k.size());
  meta_.insert(meta_.end(), k.begin(), k.end());
  const uint32_t t = static_cast<uint32_t>(type);
  for (int i = 0; i < 4; ++i) meta_.push_back(static_cast<uint8_t>(t >> (8 * i)));
  ++n_kv_;
}

namespace {
void put_le(std::vector<uint8_t>& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void put_str(std::vector<uint8_t>& b, const std::string& s) {
  put_le(b, s.size(), 8);
  b.insert(b.end(), s.begin(), s.end());
}
}  // namespace

void GGUFWriter::add_string(const std::string& k, const std::string& v) {
  key(k, GGUFType::STRING);
  put_str(meta_, v);
}
void GGUFWriter::add_u32(const std::string& k, uint32_t v) {
  key(k, GGUFType::U32);
  put_le(meta_, v, 4);
}
void GGUFWriter::add_i32(const std::string& k, int32_t v) {
  key(k, GGUFType::I32);
  put_le(meta_, static_cast<uint32_t>(v), 4);
}
void GGUFWriter::add_f32(const std::string& k, float v) {
  key(k, GGUFType::F32);
  uint32_t b;
  std::memcpy(&b, &v, 4);
  put_le(meta_, b, 4);
}
void GGUFWriter::add_bool(const std::string& k, bool v) {
  key(k, GGUFType::BOOL);
  meta_.push_back(v ? 1 : 0);
}
void GGUFWriter::add_strings(const std::string& k, const std::vector<std::string>& v) {
  key(k, GGUFType::ARRAY);
  put_le(meta_, static_cast<uint32_t>(GGUFType::STRING), 4);
  put_le(meta_, v.size(), 8);
  for (const auto& s : v) put_str(meta_, s);
}
void GGUFWriter::add_i32s(const std::string& k, const std::vector<int32_t>& v) {
  key(k, GGUFType::ARRAY);
  put_le(meta_, static_cast<uint32_t>(GGUFType::I32), 4);
  put_le(meta_, v.size(), 8);
  for (int32_t x : v) put_le(meta_, static_cast<uint32_t>(x), 4);
}

void GGUFWriter::add_tensor(const std::string& name, const Tensor& t, GGMLType type) {
  check_defined(t, name.c_str());
  MAMBA_CHECK(t.ndim() >= 1 && t.ndim() <= 4, "GGUFWriter: tensor '", name, "' has ", t.ndim(),
              " dimensions (1 to 4 are allowed)");
  for (const auto& x : tensors_)
    MAMBA_CHECK(x.name != name, "GGUFWriter: tensor '", name, "' added twice");
  const Tensor c = t.contiguous();
  T e{name, std::vector<int64_t>(c.shape().rbegin(), c.shape().rend()), type,
      ggml_quantize(type, c.data(), c.numel())};
  MAMBA_CHECK(e.ne[0] % ggml_block_size(type) == 0, "GGUFWriter: tensor '", name, "' rows of ",
              e.ne[0], " values are not a multiple of ",
              ggml_type_name(static_cast<uint32_t>(type)), "'s block size");
  tensors_.push_back(std::move(e));
}

void GGUFWriter::write(const std::string& path) const {
  constexpr uint64_t kAlign = 32;
  std::vector<uint8_t> head;
  put_le(head, kMagic, 4);
  put_le(head, 3, 4);
  put_le(head, tensors_.size(), 8);
  put_le(head, n_kv_, 8);
  head.insert(head.end(), meta_.begin(), meta_.end());
  uint64_t off = 0;
  std::vector<uint64_t> offs;
  for (const auto& t : tensors_) {
    put_str(head, t.name);
    put_le(head, t.ne.size(), 4);
    for (int64_t d : t.ne) put_le(head, static_cast<uint64_t>(d), 8);
    put_le(head, static_cast<uint32_t>(t.type), 4);
    put_le(head, off, 8);
    offs.push_back(off);
    off += (t.data.size() + kAlign - 1) / kAlign * kAlign;
  }
  head.resize((head.size() + kAlign - 1) / kAlign * kAlign, 0);
  static const uint8_t zeros[kAlign] = {};
  std::vector<std::pair<const void*, size_t>> parts{{head.data(), head.size()}};
  for (const auto& t : tensors_) {
    parts.emplace_back(t.data.data(), t.data.size());
    const size_t pad = (kAlign - t.data.size() % kAlign) % kAlign;
    if (pad) parts.emplace_back(zeros, pad);
  }
  os::write_file_atomic(path, parts);
}

}  // namespace mamba
