// torch.save checkpoints (zip + pickle) for state dicts: a bounds-checked zip reader
// (stored entries, zip64) and a pickle VM restricted to what torch.save writes for a
// state dict. Objects live in one arena and refer to each other by index, so hostile
// nesting or cycles cannot recurse or leak; nothing from the file is ever executed.
#include "model/torch_bin.h"

#include <array>
#include <bit>
#include <cctype>
#include <cstring>
#include <set>
#include <unordered_map>

#include "core/os.h"
#include "mamba/safetensors.h"

namespace mamba {

namespace {

constexpr uint64_t kMaxPickle = 64ull << 20;  // a state dict's data.pkl is a few hundred KB
constexpr uint64_t kMaxNumel = 1ull << 40;
constexpr size_t kMaxDims = 8;
// A view may repeat storage elements (zero or overlapping strides: an expanded tensor, weights
// tied to one storage), so the elements a file yields are not bounded by its storage bytes alone.
// The state dict may hold at most kElemsPerFileByte elements per byte of the file plus
// kFreeElems: plenty for any real checkpoint (fp32 storage is 1/4 element per byte; a bf16
// storage shared by two tied names, 1), while a 521-byte file cannot ask for a 4 TiB broadcast.
constexpr uint64_t kElemsPerFileByte = 4;
constexpr uint64_t kFreeElems = 1ull << 24;

// ---- little-endian reads with bounds checks -----------------------------------------------

struct Bytes {
  const uint8_t* p;
  uint64_t n;
  const std::string& origin;

  void need(uint64_t off, uint64_t len, const char* what) const {
    MAMBA_CHECK(off <= n && len <= n - off, origin, ": truncated or corrupt zip: ", what,
                " at offset ", off, " (+", len, " bytes) lies past the end of the ", n,
                "-byte file");
  }
  uint64_t le(uint64_t off, int bytes, const char* what) const {
    need(off, static_cast<uint64_t>(bytes), what);
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[off + static_cast<uint64_t>(i)];
    return v;
  }
};

// ---- CRC-32 (zip's polynomial), slicing by 8 -----------------------------------------------

struct CrcTables {
  std::array<std::array<uint32_t, 256>, 8> t{};
  CrcTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};

uint32_t crc32(const uint8_t* p, uint64_t n) {
  static const CrcTables tb;
  const auto& t = tb.t;
  uint32_t c = 0xFFFFFFFFu;
  while (n >= 8) {
    uint32_t a =
        c ^ (uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24);
    c = t[7][a & 0xFF] ^ t[6][(a >> 8) & 0xFF] ^ t[5][(a >> 16) & 0xFF] ^ t[4][a >> 24] ^
        t[3][p[4]] ^ t[2][p[5]] ^ t[1][p[6]] ^ t[0][p[7]];
    p += 8, n -= 8;
  }
  while (n--) c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

// ---- zip ------------------------------------------------------------------------------------

struct ZipEntry {
  uint64_t data = 0, size = 0;
  uint32_t crc = 0;
};

class Zip {
 public:
  Zip(const uint8_t* data, size_t size, const std::string& origin)
      : b_{data, size, origin}, origin_(origin) {
    parse();
  }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  const std::vector<std::string>& names() const { return names_; }
  // The bytes of a stored entry, CRC-checked once.
  const uint8_t* data(const std::string& name, uint64_t* size) {
    auto it = entries_.find(name);
    MAMBA_CHECK(it != entries_.end(), origin_, ": the archive has no entry '", name, "'");
    const ZipEntry& e = it->second;
    if (!crc_ok_.count(name)) {
      uint32_t c = crc32(b_.p + e.data, e.size);
      MAMBA_CHECK(c == e.crc, origin_, ": zip entry '", name, "' fails its CRC-32 check (stored ",
                  e.crc, ", computed ", c, "): the file is corrupt");
      crc_ok_.insert(name);
    }
    *size = e.size;
    return b_.p + e.data;
  }

 private:
  void parse() {
    const uint64_t n = b_.n;
    MAMBA_CHECK(n >= 22, origin_, ": not a zip archive (", n,
                " bytes, too short for the end record)");
    // End of central directory: the last 22 + comment bytes. Scan back at most 64 KiB.
    uint64_t eocd = UINT64_MAX;
    const uint64_t lo = n - 22 > 65535 ? n - 22 - 65535 : 0;
    for (uint64_t pos = n - 22 + 1; pos-- > lo;) {
      if (b_.le(pos, 4, "end record") == 0x06054b50u &&
          pos + 22 + b_.le(pos + 20, 2, "comment") == n) {
        eocd = pos;
        break;
      }
    }
    MAMBA_CHECK(eocd != UINT64_MAX, origin_,
                ": no zip end-of-central-directory record (truncated file, or not a zip archive)");
    uint64_t disk = b_.le(eocd + 4, 2, "end record"), cd_disk = b_.le(eocd + 6, 2, "end record");
    uint64_t count = b_.le(eocd + 10, 2, "end record");
    uint64_t cd_size = b_.le(eocd + 12, 4, "end record"),
             cd_off = b_.le(eocd + 16, 4, "end record");
    uint64_t cd_end_limit = eocd;
    if (eocd >= 20 && b_.le(eocd - 20, 4, "zip64 locator") == 0x07064b50u) {
      uint64_t z = b_.le(eocd - 20 + 8, 8, "zip64 locator");
      MAMBA_CHECK(z <= eocd - 20 && eocd - 20 - z >= 56, origin_, ": zip64 end record offset ", z,
                  " is out of range");
      MAMBA_CHECK(b_.le(z, 4, "zip64 end record") == 0x06064b50u, origin_,
                  ": bad zip64 end record signature at offset ", z);
      disk = b_.le(z + 16, 4, "zip64 end record");
      cd_disk = b_.le(z + 20, 4, "zip64 end record");
      count = b_.le(z + 32, 8, "zip64 end record");
      cd_size = b_.le(z + 40, 8, "zip64 end record");
      cd_off = b_.le(z + 48, 8, "zip64 end record");
      cd_end_limit = z;
    } else {
      MAMBA_CHECK(count != 0xFFFF && cd_size != 0xFFFFFFFFu && cd_off != 0xFFFFFFFFu, origin_,
                  ": zip end record needs zip64 but the zip64 locator is missing (truncated?)");
    }
    MAMBA_CHECK(disk == 0 && cd_disk == 0, origin_,
                ": multi-volume zip archives are not supported");
    MAMBA_CHECK(cd_off <= cd_end_limit && cd_size <= cd_end_limit - cd_off, origin_,
                ": central directory [", cd_off, ", +", cd_size,
                ") lies outside the file (truncated?)");
    MAMBA_CHECK(count <= cd_size / 46, origin_, ": zip says ", count,
                " entries but its central directory has room for at most ", cd_size / 46);
    uint64_t pos = cd_off;
    const uint64_t cd_end = cd_off + cd_size;
    for (uint64_t i = 0; i < count; ++i) {
      MAMBA_CHECK(pos <= cd_end && cd_end - pos >= 46, origin_, ": central directory entry ", i,
                  " runs past the directory");
      MAMBA_CHECK(b_.le(pos, 4, "central entry") == 0x02014b50u, origin_,
                  ": bad central directory signature for entry ", i, " at offset ", pos);
      uint64_t flags = b_.le(pos + 8, 2, "central entry"),
               method = b_.le(pos + 10, 2, "central entry");
      uint32_t crc = static_cast<uint32_t>(b_.le(pos + 16, 4, "central entry"));
      uint64_t csize = b_.le(pos + 20, 4, "central entry"),
               usize = b_.le(pos + 24, 4, "central entry");
      uint64_t nlen = b_.le(pos + 28, 2, "central entry"),
               xlen = b_.le(pos + 30, 2, "central entry");
      uint64_t clen = b_.le(pos + 32, 2, "central entry");
      uint64_t local = b_.le(pos + 42, 4, "central entry");
      MAMBA_CHECK(cd_end - pos - 46 >= nlen + xlen + clen, origin_, ": central directory entry ", i,
                  " has names/extras past the directory");
      std::string name(reinterpret_cast<const char*>(b_.p + pos + 46), nlen);
      // zip64 extra field: the 8-byte values of the fields that hold 0xFFFFFFFF, in order.
      uint64_t x = pos + 46 + nlen, xend = x + xlen;
      while (xend - x >= 4) {
        uint64_t id = b_.le(x, 2, "extra"), len = b_.le(x + 2, 2, "extra");
        MAMBA_CHECK(len <= xend - x - 4, origin_, ": entry '", name,
                    "' has a malformed extra field");
        if (id == 1) {
          uint64_t q = x + 4, qend = q + len;
          auto next = [&](uint64_t& field) {
            if (field != 0xFFFFFFFFu) return;
            MAMBA_CHECK(qend - q >= 8, origin_, ": entry '", name,
                        "' has a short zip64 extra field");
            field = b_.le(q, 8, "zip64 extra");
            q += 8;
          };
          next(usize), next(csize), next(local);
        }
        x += 4 + len;
      }
      MAMBA_CHECK(!(flags & 1), origin_, ": zip entry '", name, "' is encrypted; not supported");
      MAMBA_CHECK(method == 0, origin_, ": zip entry '", name, "' is compressed (method ", method,
                  method == 8 ? ", deflate" : "",
                  "); torch.save writes stored (uncompressed) entries: re-save the checkpoint with "
                  "torch.save, or unzip and re-zip it with -0");
      MAMBA_CHECK(csize == usize, origin_, ": stored zip entry '", name, "' has compressed size ",
                  csize, " != uncompressed size ", usize);
      MAMBA_CHECK(b_.le(local, 4, "local header") == 0x04034b50u, origin_, ": zip entry '", name,
                  "' has a bad local header at offset ", local);
      uint64_t lnlen = b_.le(local + 26, 2, "local header"),
               lxlen = b_.le(local + 28, 2, "local header");
      uint64_t data = local + 30 + lnlen + lxlen;
      MAMBA_CHECK(data <= cd_off && usize <= cd_off - data, origin_, ": zip entry '", name,
                  "' data [", data, ", +", usize,
                  ") runs past the start of the central directory (", cd_off,
                  "): truncated or corrupt file");
      MAMBA_CHECK(lnlen == nlen && std::memcmp(b_.p + local + 30, name.data(), nlen) == 0, origin_,
                  ": zip entry '", name, "' has a different name in its local header");
      MAMBA_CHECK(entries_.emplace(name, ZipEntry{data, usize, crc}).second, origin_,
                  ": duplicate zip entry '", name, "'");
      names_.push_back(name);
      pos += 46 + nlen + xlen + clen;
    }
  }

  Bytes b_;
  const std::string& origin_;
  std::unordered_map<std::string, ZipEntry> entries_;
  std::vector<std::string> names_;
  std::set<std::string> crc_ok_;
};

// ---- storage dtypes -------------------------------------------------------------------------

struct StorageType {
  const char* global;  // torch.<global>
  const char* dtype;   // torch's dtype name
  int size;
  bool is_float;
};
constexpr StorageType kStorageTypes[] = {
    {"FloatStorage", "float32", 4, true},     {"HalfStorage", "float16", 2, true},
    {"BFloat16Storage", "bfloat16", 2, true}, {"DoubleStorage", "float64", 8, true},
    {"LongStorage", "int64", 8, false},       {"IntStorage", "int32", 4, false},
    {"ShortStorage", "int16", 2, false},      {"CharStorage", "int8", 1, false},
    {"ByteStorage", "uint8", 1, false},       {"BoolStorage", "bool", 1, false},
};

const StorageType* storage_type(const std::string& global) {
  for (const auto& s : kStorageTypes)
    if (global == std::string("torch.") + s.global) return &s;
  return nullptr;
}

// ---- the pickle VM --------------------------------------------------------------------------

enum class Kind { None, Bool, Int, Float, Str, Tuple, List, Dict, Global, Storage, Tensor };

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::None:
      return "None";
    case Kind::Bool:
      return "bool";
    case Kind::Int:
      return "int";
    case Kind::Float:
      return "float";
    case Kind::Str:
      return "str";
    case Kind::Tuple:
      return "tuple";
    case Kind::List:
      return "list";
    case Kind::Dict:
      return "dict";
    case Kind::Global:
      return "global";
    case Kind::Storage:
      return "storage";
    case Kind::Tensor:
      return "tensor";
  }
  return "?";
}

using Ref = uint32_t;

struct Obj {
  Kind kind = Kind::None;
  int64_t i = 0;                    // Bool, Int; Storage: numel; Tensor: storage offset
  double f = 0;                     // Float
  std::string s;                    // Str; Global "module.name"; Storage: key
  std::vector<Ref> items;           // Tuple, List; Dict: k0, v0, k1, v1, ...
  const StorageType* st = nullptr;  // Storage
  Ref storage = 0;                  // Tensor
  Shape size, stride;               // Tensor
};

const char* const kAllowedGlobals[] = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                                       "torch._utils._rebuild_parameter"};

class Unpickler {
 public:
  Unpickler(const uint8_t* p, uint64_t n, const std::string& origin)
      : p_(p), n_(n), origin_(origin) {}

  Ref run() {
    while (true) {
      const uint64_t at = pos_;
      const uint8_t op = u8();
      switch (op) {
        case 0x80: {  // PROTO
          uint8_t v = u8();
          MAMBA_CHECK(v >= 2 && v <= 5, where(at), "unsupported pickle protocol ", int(v));
          break;
        }
        case 0x95:
          skip(8);
          break;     // FRAME (length is advisory)
        case '.': {  // STOP
          Ref r = pop(at);
          return r;
        }
        case '(':
          marks_.push_back(stack_.size());
          break;  // MARK
        case 'N':
          push(make(Kind::None));
          break;
        case 0x88:
        case 0x89: {  // NEWTRUE / NEWFALSE
          Ref r = make(Kind::Bool);
          objs_[r].i = op == 0x88;
          push(r);
          break;
        }
        case 'K':
          push_int(static_cast<int64_t>(le(1)));
          break;  // BININT1
        case 'M':
          push_int(static_cast<int64_t>(le(2)));
          break;  // BININT2
        case 'J':
          push_int(static_cast<int32_t>(static_cast<uint32_t>(le(4))));
          break;      // BININT
        case 0x8a: {  // LONG1: n-byte two's complement
          uint8_t len = u8();
          MAMBA_CHECK(len <= 8, where(at), "integer of ", int(len), " bytes is too large");
          uint64_t v = len ? le(len) : 0;
          if (len && len < 8 && (v >> (8 * len - 1)) & 1) v |= ~0ull << (8 * len);  // sign-extend
          push_int(static_cast<int64_t>(v));
          break;
        }
        case 'G': {  // BINFLOAT: big-endian double
          uint64_t v = 0;
          for (int k = 0; k < 8; ++k) v = (v << 8) | u8();
          Ref r = make(Kind::Float);
          objs_[r].f = std::bit_cast<double>(v);
          push(r);
          break;
        }
        case 'X':
          push_str(le(4));
          break;  // BINUNICODE
        case 0x8c:
          push_str(le(1));
          break;  // SHORT_BINUNICODE
        case 0x8d:
          push_str(le(8));
          break;  // BINUNICODE8
        case ')':
          push(make(Kind::Tuple));
          break;  // EMPTY_TUPLE
        case 't':
          push_seq(Kind::Tuple, pop_mark(at));
          break;  // TUPLE
        case 0x85:
        case 0x86:
        case 0x87: {  // TUPLE1..3
          size_t k = static_cast<size_t>(op - 0x84);
          MAMBA_CHECK(stack_.size() >= k + base(), where(at), "stack underflow building a tuple");
          std::vector<Ref> items(stack_.end() - static_cast<std::ptrdiff_t>(k), stack_.end());
          stack_.resize(stack_.size() - k);
          push_seq(Kind::Tuple, std::move(items));
          break;
        }
        case ']':
          push(make(Kind::List));
          break;     // EMPTY_LIST
        case 'a': {  // APPEND
          Ref v = pop(at);
          container(at, Kind::List).items.push_back(v);
          break;
        }
        case 'e': {  // APPENDS
          auto items = pop_mark(at);
          auto& l = container(at, Kind::List).items;
          l.insert(l.end(), items.begin(), items.end());
          break;
        }
        case '}':
          push(make(Kind::Dict));
          break;     // EMPTY_DICT
        case 'd': {  // DICT
          auto items = pop_mark(at);
          MAMBA_CHECK(items.size() % 2 == 0, where(at), "odd number of items for a dict");
          push_seq(Kind::Dict, std::move(items));
          break;
        }
        case 's': {  // SETITEM
          Ref v = pop(at), k = pop(at);
          auto& d = container(at, Kind::Dict).items;
          d.push_back(k), d.push_back(v);
          break;
        }
        case 'u': {  // SETITEMS
          auto items = pop_mark(at);
          MAMBA_CHECK(items.size() % 2 == 0, where(at), "odd number of items for SETITEMS");
          auto& d = container(at, Kind::Dict).items;
          d.insert(d.end(), items.begin(), items.end());
          break;
        }
        case 'c': {  // GLOBAL "module\nname\n"
          std::string module = line(at), name = line(at);
          push_global(at, module + "." + name);
          break;
        }
        case 0x93: {  // STACK_GLOBAL
          Ref name = pop(at), module = pop(at);
          MAMBA_CHECK(objs_[name].kind == Kind::Str && objs_[module].kind == Kind::Str, where(at),
                      "STACK_GLOBAL needs two strings");
          push_global(at, objs_[module].s + "." + objs_[name].s);
          break;
        }
        case 'Q':
          push(persistent_load(at, pop(at)));
          break;     // BINPERSID
        case 'R': {  // REDUCE
          Ref args = pop(at), fn = pop(at);
          push(reduce(at, fn, args));
          break;
        }
        case 'b': {  // BUILD: OrderedDict's state (its _metadata) is ignored
          pop(at);
          MAMBA_CHECK(stack_.size() > base(), where(at), "BUILD on an empty stack");
          Kind k = objs_[stack_.back()].kind;
          MAMBA_CHECK(k == Kind::Dict || k == Kind::Tensor, where(at), "BUILD on a ", kind_name(k),
                      " (only dicts and tensors are expected)");
          break;
        }
        case 'q':
          memo_put(at, le(1));
          break;  // BINPUT
        case 'r':
          memo_put(at, le(4));
          break;  // LONG_BINPUT
        case 0x94:
          memo_put(at, memo_.size());
          break;  // MEMOIZE
        case 'h':
          memo_get(at, le(1));
          break;  // BINGET
        case 'j':
          memo_get(at, le(4));
          break;  // LONG_BINGET
        default:
          throw Error(str(where(at), "pickle opcode 0x", std::hex, int(op), std::dec,
                          " is not one torch.save uses for a state dict; refusing to load"));
      }
    }
  }

  const Obj& obj(Ref r) const { return objs_[r]; }

 private:
  std::string where(uint64_t at) const { return str(origin_, ": data.pkl offset ", at, ": "); }

  uint8_t u8() {
    MAMBA_CHECK(pos_ < n_, origin_, ": data.pkl ends at offset ", n_,
                " without a STOP opcode (truncated)");
    return p_[pos_++];
  }
  void skip(uint64_t k) {
    MAMBA_CHECK(k <= n_ - pos_, origin_, ": data.pkl is truncated at offset ", pos_);
    pos_ += k;
  }
  uint64_t le(int bytes) {
    skip(static_cast<uint64_t>(bytes));
    uint64_t v = 0;
    for (int i = bytes - 1; i >= 0; --i)
      v = (v << 8) | p_[pos_ - static_cast<uint64_t>(bytes) + static_cast<uint64_t>(i)];
    return v;
  }
  std::string line(uint64_t at) {
    uint64_t start = pos_;
    while (pos_ < n_ && p_[pos_] != '\n') {
      MAMBA_CHECK(pos_ - start < 256, where(at), "GLOBAL name is too long");
      ++pos_;
    }
    MAMBA_CHECK(pos_ < n_, where(at), "GLOBAL name is truncated");
    std::string s(reinterpret_cast<const char*>(p_ + start), pos_ - start);
    ++pos_;
    return s;
  }

  Ref make(Kind k) {
    MAMBA_CHECK(objs_.size() < (1u << 30), origin_, ": data.pkl creates too many objects");
    objs_.push_back(Obj{});
    objs_.back().kind = k;
    return static_cast<Ref>(objs_.size() - 1);
  }
  void push(Ref r) { stack_.push_back(r); }
  void push_int(int64_t v) {
    Ref r = make(Kind::Int);
    objs_[r].i = v;
    push(r);
  }
  void push_str(uint64_t len) {
    uint64_t start = pos_;
    skip(len);
    Ref r = make(Kind::Str);
    objs_[r].s.assign(reinterpret_cast<const char*>(p_ + start), len);
    push(r);
  }
  void push_seq(Kind k, std::vector<Ref> items) {
    Ref r = make(k);
    objs_[r].items = std::move(items);
    push(r);
  }
  size_t base() const { return marks_.empty() ? 0 : marks_.back(); }
  Ref pop(uint64_t at) {
    MAMBA_CHECK(stack_.size() > base(), where(at), "pickle stack underflow");
    Ref r = stack_.back();
    stack_.pop_back();
    return r;
  }
  std::vector<Ref> pop_mark(uint64_t at) {
    MAMBA_CHECK(!marks_.empty(), where(at), "no MARK on the pickle stack");
    size_t m = marks_.back();
    marks_.pop_back();
    std::vector<Ref> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  Obj& container(uint64_t at, Kind k) {
    MAMBA_CHECK(stack_.size() > base(), where(at), "pickle stack underflow");
    Obj& o = objs_[stack_.back()];
    MAMBA_CHECK(o.kind == k, where(at), "expected a ", kind_name(k), " on the stack, found a ",
                kind_name(o.kind));
    return o;
  }
  void memo_put(uint64_t at, uint64_t idx) {
    MAMBA_CHECK(stack_.size() > base(), where(at), "memo put with an empty stack");
    memo_[idx] = stack_.back();
  }
  void memo_get(uint64_t at, uint64_t idx) {
    auto it = memo_.find(idx);
    MAMBA_CHECK(it != memo_.end(), where(at), "memo index ", idx, " was never stored");
    push(it->second);
  }

  void push_global(uint64_t at, const std::string& name) {
    bool ok = storage_type(name) != nullptr;
    for (const char* g : kAllowedGlobals) ok = ok || name == g;
    if (!ok) {
      std::string allowed =
          "collections.OrderedDict, torch._utils._rebuild_tensor_v2, "
          "torch._utils._rebuild_parameter, torch.*Storage";
      throw Error(str(
          where(at), "the pickle asks for the Python global '", name,
          "', which a state dict of tensors never needs; refusing to load it (allowed: ", allowed,
          ")"));
    }
    Ref r = make(Kind::Global);
    objs_[r].s = name;
    push(r);
  }

  int64_t as_int(uint64_t at, Ref r, const char* what) const {
    MAMBA_CHECK(objs_[r].kind == Kind::Int, where(at), what, " must be an int, found a ",
                kind_name(objs_[r].kind));
    return objs_[r].i;
  }
  Shape as_shape(uint64_t at, Ref r, const char* what) const {
    const Obj& o = objs_[r];
    MAMBA_CHECK(o.kind == Kind::Tuple, where(at), what, " must be a tuple, found a ",
                kind_name(o.kind));
    MAMBA_CHECK(o.items.size() <= kMaxDims, where(at), what, " has ", o.items.size(),
                " dimensions");
    Shape s;
    for (Ref x : o.items) {
      int64_t v = as_int(at, x, what);
      MAMBA_CHECK(v >= 0 && static_cast<uint64_t>(v) <= kMaxNumel, where(at), what,
                  " has a bad entry ", v);
      s.push_back(v);
    }
    return s;
  }

  // ('storage', torch.XStorage, key, location, numel)
  Ref persistent_load(uint64_t at, Ref pid) {
    const Obj& t = objs_[pid];
    MAMBA_CHECK(t.kind == Kind::Tuple && t.items.size() == 5 &&
                    objs_[t.items[0]].kind == Kind::Str && objs_[t.items[0]].s == "storage",
                where(at), "persistent id is not a ('storage', type, key, location, numel) tuple");
    const Obj& type = objs_[t.items[1]];
    const Obj& key = objs_[t.items[2]];
    MAMBA_CHECK(type.kind == Kind::Global && storage_type(type.s), where(at),
                "persistent id names an unknown storage type");
    MAMBA_CHECK(key.kind == Kind::Str && !key.s.empty() && key.s.size() < 64, where(at),
                "bad storage key");
    for (char c : key.s)
      MAMBA_CHECK(std::isalnum(static_cast<unsigned char>(c)) || c == '_', where(at),
                  "storage key '", key.s, "' has a character outside [A-Za-z0-9_]");
    MAMBA_CHECK(objs_[t.items[3]].kind == Kind::Str, where(at),
                "storage location must be a string");
    int64_t numel = as_int(at, t.items[4], "storage numel");
    MAMBA_CHECK(numel >= 0 && static_cast<uint64_t>(numel) <= kMaxNumel, where(at), "storage '",
                key.s, "' has a bad element count ", numel);
    Ref r = make(Kind::Storage);
    Obj& s = objs_[r];
    s.st = storage_type(objs_[objs_[pid].items[1]].s);
    s.s = objs_[objs_[pid].items[2]].s;
    s.i = numel;
    return r;
  }

  Ref reduce(uint64_t at, Ref fn, Ref args) {
    MAMBA_CHECK(objs_[fn].kind == Kind::Global, where(at), "REDUCE calls a ",
                kind_name(objs_[fn].kind), ", not a global");
    MAMBA_CHECK(objs_[args].kind == Kind::Tuple, where(at), "REDUCE arguments are not a tuple");
    const std::string name = objs_[fn].s;
    const std::vector<Ref> a = objs_[args].items;
    if (name == "collections.OrderedDict") {
      MAMBA_CHECK(a.empty(), where(at), "OrderedDict(...) with arguments is not supported");
      return make(Kind::Dict);
    }
    if (name == "torch._utils._rebuild_parameter") {
      MAMBA_CHECK(a.size() == 3 && objs_[a[0]].kind == Kind::Tensor, where(at),
                  "_rebuild_parameter expects (tensor, requires_grad, hooks)");
      return a[0];
    }
    if (name == "torch._utils._rebuild_tensor_v2") {
      // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
      MAMBA_CHECK(a.size() == 6 || a.size() == 7, where(at),
                  "_rebuild_tensor_v2 expects 6 or 7 arguments, got ", a.size());
      MAMBA_CHECK(objs_[a[0]].kind == Kind::Storage, where(at),
                  "_rebuild_tensor_v2: first argument is a ", kind_name(objs_[a[0]].kind),
                  ", not a storage");
      int64_t offset = as_int(at, a[1], "storage offset");
      MAMBA_CHECK(offset >= 0 && static_cast<uint64_t>(offset) <= kMaxNumel, where(at),
                  "bad storage offset ", offset);
      Shape size = as_shape(at, a[2], "tensor size");
      Shape stride = as_shape(at, a[3], "tensor stride");
      MAMBA_CHECK(size.size() == stride.size(), where(at), "tensor size ", shape_str(size),
                  " and stride ", shape_str(stride), " differ in length");
      Ref r = make(Kind::Tensor);
      Obj& t = objs_[r];
      t.storage = a[0], t.i = offset, t.size = std::move(size), t.stride = std::move(stride);
      return r;
    }
    throw Error(str(where(at), "calling '", name, "' is not supported"));
  }

  const uint8_t* p_;
  uint64_t n_;
  uint64_t pos_ = 0;
  const std::string& origin_;
  std::vector<Obj> objs_;
  std::vector<Ref> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint64_t, Ref> memo_;
};

// Little-endian element k of a storage as double / int64.
double load_float(const uint8_t* p, const StorageType& st, uint64_t k) {
  const uint8_t* q = p + k * static_cast<uint64_t>(st.size);
  switch (st.size) {
    case 2: {
      uint16_t v = static_cast<uint16_t>(q[0] | (q[1] << 8));
      return st.dtype[0] == 'b' ? bf16_to_f32(v) : f16_to_f32(v);  // "bfloat16" | "float16"
    }
    case 4: {
      uint32_t v =
          uint32_t(q[0]) | uint32_t(q[1]) << 8 | uint32_t(q[2]) << 16 | uint32_t(q[3]) << 24;
      return std::bit_cast<float>(v);
    }
    default: {
      uint64_t v = 0;
      for (int i = 7; i >= 0; --i) v = (v << 8) | q[i];
      return std::bit_cast<double>(v);
    }
  }
}

int64_t load_int(const uint8_t* p, const StorageType& st, uint64_t k) {
  const uint8_t* q = p + k * static_cast<uint64_t>(st.size);
  uint64_t v = 0;
  for (int i = st.size - 1; i >= 0; --i) v = (v << 8) | q[i];
  const std::string d = st.dtype;
  if (d == "int64") return static_cast<int64_t>(v);
  if (d == "int32") return static_cast<int32_t>(static_cast<uint32_t>(v));
  if (d == "int16") return static_cast<int16_t>(static_cast<uint16_t>(v));
  if (d == "int8") return static_cast<int8_t>(static_cast<uint8_t>(v));
  return static_cast<int64_t>(v);  // uint8, bool
}

}  // namespace

TorchStateDict parse_torch_state_dict(const std::vector<uint8_t>& bytes,
                                      const std::string& origin) {
  return parse_torch_state_dict(bytes.data(), bytes.size(), origin);
}

TorchStateDict parse_torch_state_dict(const uint8_t* bytes, size_t size,
                                      const std::string& origin) {
  static const uint8_t kLegacyMagic[] = {0x80, 0x02, 0x8a, 0x0a, 0x6c,
                                         0xfc, 0x9c, 0x46, 0xf9, 0x20};
  if (size >= sizeof kLegacyMagic && std::memcmp(bytes, kLegacyMagic, sizeof kLegacyMagic) == 0)
    throw Error(str(origin,
                    ": this is the legacy (torch < 1.6) torch.save format, which is not supported; "
                    "re-save it with a newer torch"));
  MAMBA_CHECK(size >= 4 && bytes[0] == 'P' && bytes[1] == 'K', origin,
              ": not a torch.save zip archive (does not start with 'PK')");
  Zip zip(bytes, size, origin);
  // torch.save puts everything under one folder: <name>/data.pkl, <name>/data/<key>, ...
  std::string prefix;
  int found = 0;
  for (const auto& n : zip.names()) {
    if (n.size() >= 8 && n.compare(n.size() - 8, 8, "data.pkl") == 0) {
      std::string pre = n.substr(0, n.size() - 8);
      if (pre.empty() || (pre.back() == '/' && pre.find('/') == pre.size() - 1))
        prefix = pre, ++found;
    }
  }
  MAMBA_CHECK(found == 1, origin, ": expected exactly one data.pkl in the archive, found ", found,
              " (not a torch.save checkpoint?)");
  if (zip.has(prefix + "byteorder")) {
    uint64_t len;
    const uint8_t* p = zip.data(prefix + "byteorder", &len);
    std::string order(reinterpret_cast<const char*>(p), len);
    MAMBA_CHECK(order == "little", origin, ": checkpoint byte order is '", order,
                "'; only 'little' is supported");
  }
  uint64_t plen;
  const uint8_t* pkl = zip.data(prefix + "data.pkl", &plen);
  MAMBA_CHECK(plen <= kMaxPickle, origin, ": data.pkl is ", plen, " bytes, over the limit of ",
              kMaxPickle);
  Unpickler vm(pkl, plen, origin);
  Ref root = vm.run();
  const auto& top = vm.obj(root);
  MAMBA_CHECK(top.kind == Kind::Dict, origin, ": the pickle holds a ", kind_name(top.kind),
              ", not a state dict (a dict of tensors)");

  TorchStateDict out;
  const uint64_t max_total = kElemsPerFileByte * static_cast<uint64_t>(size) + kFreeElems;
  uint64_t total = 0;  // elements of the entries so far
  for (size_t k = 0; k + 1 < top.items.size(); k += 2) {
    const Obj& key = vm.obj(top.items[k]);
    MAMBA_CHECK(key.kind == Kind::Str, origin, ": state dict key ", k / 2, " is a ",
                kind_name(key.kind), ", not a string");
    const std::string& name = key.s;
    const Obj& t = vm.obj(top.items[k + 1]);
    MAMBA_CHECK(t.kind == Kind::Tensor, origin, ": state dict entry '", name, "' is a ",
                kind_name(t.kind), ", not a tensor");
    MAMBA_CHECK(!out.dtypes.count(name), origin, ": state dict key '", name, "' appears twice");
    const Obj& s = vm.obj(t.storage);
    const StorageType& st = *s.st;
    const std::string entry = prefix + "data/" + s.s;
    MAMBA_CHECK(zip.has(entry), origin, ": tensor '", name, "' refers to storage '", s.s,
                "', but the archive has no entry '", entry, "'");
    uint64_t nbytes;
    const uint8_t* data = zip.data(entry, &nbytes);
    const uint64_t snumel = static_cast<uint64_t>(s.i);
    MAMBA_CHECK(nbytes == snumel * static_cast<uint64_t>(st.size), origin, ": storage '", entry,
                "' has ", nbytes, " bytes, but the pickle says ", snumel, " elements of ", st.dtype,
                " (", snumel * static_cast<uint64_t>(st.size), " bytes)");
    // The view [offset + sum((size_i - 1) * stride_i)] must lie inside the storage.
    uint64_t numel = 1;
    for (int64_t d : t.size) {
      MAMBA_CHECK(d == 0 || numel <= kMaxNumel / static_cast<uint64_t>(d), origin, ": tensor '",
                  name, "' is too large");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel > 0) {
      uint64_t last = static_cast<uint64_t>(t.i);
      for (size_t d = 0; d < t.size.size(); ++d) {
        uint64_t sz = static_cast<uint64_t>(t.size[d]) - 1, sd = static_cast<uint64_t>(t.stride[d]);
        MAMBA_CHECK(sz == 0 || sd <= snumel / sz, origin, ": tensor '", name, "' (size ",
                    shape_str(t.size), ", stride ", shape_str(t.stride),
                    ") reaches past its storage of ", snumel, " elements");
        last += sz * sd;
      }
      MAMBA_CHECK(last < snumel, origin, ": tensor '", name, "' (offset ", t.i, ", size ",
                  shape_str(t.size), ", stride ", shape_str(t.stride), ") reaches element ", last,
                  " of a storage of ", snumel, " elements");
    }
    total += numel;  // numel <= kMaxNumel (2^40): no overflow in any realistic number of entries
    MAMBA_CHECK(total <= max_total, origin, ": tensor '", name, "' (size ", shape_str(t.size),
                ", stride ", shape_str(t.stride), ") brings the state dict to ", total,
                " elements, more than a file of ", size, " bytes can back (at most ",
                kElemsPerFileByte, " per byte + ", kFreeElems,
                "; views repeating storage elements through zero or overlapping strides)");
    os::check_memory(numel * (st.is_float ? sizeof(float) : sizeof(int64_t)),
                     str(origin, ": tensor '", name, "' ", shape_str(t.size)));
    // Storage index of each element in row-major order (strided views are gathered).
    const size_t nd = t.size.size();
    std::vector<int64_t> idx(nd, 0);
    uint64_t lin = static_cast<uint64_t>(t.i);
    auto advance = [&]() {
      for (size_t d = nd; d-- > 0;) {
        lin += static_cast<uint64_t>(t.stride[d]);
        if (++idx[d] < t.size[d]) return;
        lin -= static_cast<uint64_t>(t.stride[d]) * static_cast<uint64_t>(t.size[d]);
        idx[d] = 0;
      }
    };
    bool contiguous = true;
    for (size_t d = nd, expect = 1; d-- > 0;) {
      if (t.size[d] != 1 && static_cast<uint64_t>(t.stride[d]) != expect) contiguous = false;
      expect *= static_cast<uint64_t>(t.size[d]);
    }
    out.dtypes[name] = st.dtype;
    out.order.push_back(name);
    if (st.is_float) {
      Tensor x = Tensor::empty(t.size);
      float* o = x.data();
      if (contiguous && std::strcmp(st.dtype, "float32") == 0 &&
          std::endian::native == std::endian::little) {
        if (numel) std::memcpy(o, data + static_cast<uint64_t>(t.i) * 4, numel * 4);
      } else if (contiguous) {
        for (uint64_t e = 0; e < numel; ++e)
          o[e] = static_cast<float>(load_float(data, st, lin + e));
      } else {
        for (uint64_t e = 0; e < numel; ++e, advance())
          o[e] = static_cast<float>(load_float(data, st, lin));
      }
      out.tensors[name] = x;
    } else {
      TorchStateDict::IntTensor it;
      it.shape = t.size;
      it.values.resize(numel);
      for (uint64_t e = 0; e < numel; ++e, advance()) it.values[e] = load_int(data, st, lin);
      out.int_tensors[name] = std::move(it);
    }
  }
  return out;
}

TorchStateDict read_torch_state_dict(const std::string& path) {
  os::MappedFile m(path);  // memory-mapped: an 11 GB checkpoint is not read into memory twice
  return parse_torch_state_dict(m.data(), static_cast<size_t>(m.size()), path);
}

std::map<std::string, Tensor> load_torch_state_dict(const std::string& path) {
  return read_torch_state_dict(path).tensors;
}

}  // namespace mamba
