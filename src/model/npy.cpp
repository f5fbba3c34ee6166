// .npy reader/writer. The header is a Python dict literal; it is parsed by a small strict
// scanner that accepts exactly the three keys numpy writes (descr, fortran_order, shape).
#include "model/npy.h"

#include <bit>
#include <cstring>

#include "core/os.h"

namespace mamba {

namespace {

constexpr uint64_t kMaxHeader = 1u << 20;
constexpr uint64_t kMaxNumel = 1ull << 40;

int itemsize(const std::string& dtype) {
  if (dtype == "<f4" || dtype == "<i4") return 4;
  if (dtype == "<i8") return 8;
  return 0;
}

// Scanner over the header text; every error names the file.
struct Header {
  const std::string& s;
  const std::string& origin;
  size_t i = 0;

  [[noreturn]] void fail(const std::string& why) const {
    throw Error(
        str(origin, ": bad .npy header (", why, " at character ", i, "): ", s.substr(0, 200)));
  }
  void ws() {
    while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) ++i;
  }
  bool eat(char c) {
    ws();
    if (i < s.size() && s[i] == c) return ++i, true;
    return false;
  }
  void expect(char c) {
    if (!eat(c)) fail(str("expected '", c, "'"));
  }
  std::string string_lit() {
    ws();
    if (i >= s.size() || (s[i] != '\'' && s[i] != '"')) fail("expected a string");
    char q = s[i++];
    size_t start = i;
    while (i < s.size() && s[i] != q) {
      if (s[i] == '\\') fail("escape sequences are not supported");
      ++i;
    }
    if (i >= s.size()) fail("unterminated string");
    return s.substr(start, i++ - start);
  }
  bool bool_lit() {
    ws();
    if (s.compare(i, 4, "True") == 0) return i += 4, true;
    if (s.compare(i, 5, "False") == 0) return i += 5, false;
    fail("expected True or False");
  }
  int64_t int_lit() {
    ws();
    size_t start = i;
    uint64_t v = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') {
      v = v * 10 + static_cast<uint64_t>(s[i] - '0');
      if (v > kMaxNumel) fail("dimension too large");
      ++i;
    }
    if (i == start) fail("expected a non-negative integer");
    if (i < s.size() && s[i] == 'L') ++i;  // Python 2 long suffix
    return static_cast<int64_t>(v);
  }
  Shape shape_lit() {
    expect('(');
    Shape shape;
    while (!eat(')')) {
      if (shape.size() >= 32) fail("too many dimensions");
      shape.push_back(int_lit());
      if (!eat(',')) {
        expect(')');
        break;
      }
    }
    return shape;
  }
};

void put_le(std::vector<uint8_t>& out, uint64_t v, int bytes) {
  for (int k = 0; k < bytes; ++k) out.push_back(static_cast<uint8_t>(v >> (8 * k)));
}

}  // namespace

NpyArray parse_npy(const std::vector<uint8_t>& b, const std::string& origin) {
  static const uint8_t kMagic[] = {0x93, 'N', 'U', 'M', 'P', 'Y'};
  MAMBA_CHECK(b.size() >= 10 && std::memcmp(b.data(), kMagic, 6) == 0, origin,
              ": not a .npy file (no \\x93NUMPY magic)");
  const int major = b[6];
  MAMBA_CHECK(major >= 1 && major <= 3, origin, ": unsupported .npy format version ", major, ".",
              int(b[7]));
  uint64_t hlen, hstart;
  if (major == 1) {
    hlen = b[8] | (uint64_t(b[9]) << 8), hstart = 10;
  } else {
    MAMBA_CHECK(b.size() >= 12, origin, ": truncated .npy header");
    hlen = b[8] | (uint64_t(b[9]) << 8) | (uint64_t(b[10]) << 16) | (uint64_t(b[11]) << 24),
    hstart = 12;
  }
  MAMBA_CHECK(hlen <= kMaxHeader, origin, ": .npy header length ", hlen, " exceeds the limit of ",
              kMaxHeader);
  MAMBA_CHECK(hlen <= b.size() - hstart, origin, ": truncated .npy file: header says ", hlen,
              " bytes but only ", b.size() - hstart, " follow");
  const std::string text(reinterpret_cast<const char*>(b.data() + hstart), hlen);
  Header h{text, origin};
  NpyArray a;
  bool has_descr = false, has_order = false, has_shape = false, fortran = false;
  h.expect('{');
  while (!h.eat('}')) {
    std::string key = h.string_lit();
    h.expect(':');
    if (key == "descr" && !has_descr) {
      a.dtype = h.string_lit(), has_descr = true;
    } else if (key == "fortran_order" && !has_order) {
      fortran = h.bool_lit(), has_order = true;
    } else if (key == "shape" && !has_shape) {
      a.shape = h.shape_lit(), has_shape = true;
    } else {
      h.fail(str("unexpected or repeated key '", key, "'"));
    }
    if (!h.eat(',')) {
      h.expect('}');
      break;
    }
  }
  h.ws();
  if (h.i != text.size()) h.fail("trailing characters after the dict");
  MAMBA_CHECK(has_descr && has_order && has_shape, origin,
              ": .npy header lacks one of 'descr', 'fortran_order', 'shape'");
  if (itemsize(a.dtype) == 0) {
    bool big = !a.dtype.empty() && a.dtype[0] == '>';
    throw Error(str(origin, ": .npy dtype '", a.dtype, "' is not supported",
                    big ? " (big-endian)" : "", "; expected '<f4', '<i8' or '<i4'"));
  }
  MAMBA_CHECK(!fortran, origin,
              ": .npy array is in Fortran order; save it in C order (np.ascontiguousarray)");
  uint64_t numel = 1;
  for (int64_t d : a.shape) {
    MAMBA_CHECK(d == 0 || numel <= kMaxNumel / static_cast<uint64_t>(d), origin, ": .npy shape ",
                shape_str(a.shape), " is too large");
    numel *= static_cast<uint64_t>(d);
  }
  const uint64_t nbytes = numel * static_cast<uint64_t>(itemsize(a.dtype));
  const uint64_t have = b.size() - hstart - hlen;
  MAMBA_CHECK(have == nbytes, origin, ": .npy data is ", have, " bytes, but dtype ", a.dtype,
              " and shape ", shape_str(a.shape), " need ", nbytes,
              have < nbytes ? " (truncated file)" : "");
  a.data.assign(b.begin() + static_cast<std::ptrdiff_t>(hstart + hlen), b.end());
  return a;
}

NpyArray read_npy(const std::string& path) { return parse_npy(os::read_file(path), path); }

std::vector<uint8_t> encode_npy(const NpyArray& a) {
  const int isz = itemsize(a.dtype);
  MAMBA_CHECK(isz > 0, "encode_npy: dtype '", a.dtype, "' is not one of '<f4', '<i8', '<i4'");
  for (int64_t d : a.shape)
    MAMBA_CHECK(d >= 0, "encode_npy: negative dimension in ", shape_str(a.shape));
  MAMBA_CHECK(static_cast<uint64_t>(a.numel()) * static_cast<uint64_t>(isz) == a.data.size(),
              "encode_npy: ", a.data.size(), " data bytes for dtype ", a.dtype, " and shape ",
              shape_str(a.shape));
  std::string shape = "(";
  for (size_t k = 0; k < a.shape.size(); ++k) shape += (k ? ", " : "") + std::to_string(a.shape[k]);
  if (a.shape.size() == 1) shape += ",";
  shape += ")";
  std::string header =
      "{'descr': '" + a.dtype + "', 'fortran_order': False, 'shape': " + shape + ", }";
  const bool v2 = header.size() + 11 > 65535;
  const size_t pre = v2 ? 12 : 10;
  size_t total = pre + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::vector<uint8_t> out = {0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<uint8_t>(v2 ? 2 : 1), 0};
  put_le(out, header.size(), v2 ? 4 : 2);
  out.insert(out.end(), header.begin(), header.end());
  out.insert(out.end(), a.data.begin(), a.data.end());
  return out;
}

void write_npy(const std::string& path, const Tensor& t) {
  check_defined(t, "write_npy: tensor");
  NpyArray a;
  a.dtype = "<f4";
  a.shape = t.shape();
  a.data.resize(static_cast<size_t>(t.numel()) * 4);
  const float* p = t.data();
  for (int64_t i = 0; i < t.numel(); ++i) {
    uint32_t u = std::bit_cast<uint32_t>(p[i]);
    for (int k = 0; k < 4; ++k)
      a.data[static_cast<size_t>(4 * i + k)] = static_cast<uint8_t>(u >> (8 * k));
  }
  std::vector<uint8_t> bytes = encode_npy(a);
  os::write_file_atomic(path, bytes.data(), bytes.size());
}

void write_npy_i64(const std::string& path, const Shape& shape,
                   const std::vector<int64_t>& values) {
  for (int64_t d : shape)
    MAMBA_CHECK(d >= 0, "write_npy_i64: negative dimension in ", shape_str(shape));
  MAMBA_CHECK(shape_numel(shape) == static_cast<int64_t>(values.size()),
              "write_npy_i64: ", values.size(), " values for shape ", shape_str(shape));
  NpyArray a;
  a.dtype = "<i8";
  a.shape = shape;
  a.data.reserve(values.size() * 8);
  for (int64_t v : values) put_le(a.data, static_cast<uint64_t>(v), 8);
  std::vector<uint8_t> bytes = encode_npy(a);
  os::write_file_atomic(path, bytes.data(), bytes.size());
}

Tensor npy_to_tensor(const NpyArray& a, const std::string& what) {
  MAMBA_CHECK(a.dtype == "<f4", what, ": expected a float32 ('<f4') array, got '", a.dtype, "'");
  MAMBA_CHECK(a.data.size() == static_cast<size_t>(a.numel()) * 4, what,
              ": data size does not match shape");
  Tensor t = Tensor::empty(a.shape);
  float* o = t.data();
  for (int64_t i = 0; i < a.numel(); ++i) {
    const uint8_t* q = a.data.data() + 4 * i;
    o[i] = std::bit_cast<float>(uint32_t(q[0]) | uint32_t(q[1]) << 8 | uint32_t(q[2]) << 16 |
                                uint32_t(q[3]) << 24);
  }
  return t;
}

std::vector<int64_t> npy_to_i64(const NpyArray& a, const std::string& what) {
  const int isz = a.dtype == "<i8" ? 8 : a.dtype == "<i4" ? 4 : 0;
  MAMBA_CHECK(isz, what, ": expected an integer ('<i8' or '<i4') array, got '", a.dtype, "'");
  MAMBA_CHECK(a.data.size() == static_cast<size_t>(a.numel()) * static_cast<size_t>(isz), what,
              ": data size does not match shape");
  std::vector<int64_t> v(static_cast<size_t>(a.numel()));
  for (size_t i = 0; i < v.size(); ++i) {
    uint64_t u = 0;
    for (int k = isz - 1; k >= 0; --k)
      u = (u << 8) | a.data[i * static_cast<size_t>(isz) + static_cast<size_t>(k)];
    v[i] = isz == 8 ? static_cast<int64_t>(u) : static_cast<int32_t>(static_cast<uint32_t>(u));
  }
  return v;
}

}  // namespace mamba
