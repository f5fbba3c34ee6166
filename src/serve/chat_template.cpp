// The Jinja2 subset of chat templates (see chat_template.h for what is supported and why).
// Three stages: the source is cut into text and tags (whitespace control, trim_blocks and
// lstrip_blocks applied as Jinja2's lexer does), each tag's inside is tokenized and parsed into
// a tree (statements, expressions), and render() walks the tree over values built from the JSON
// variables. Values follow Python's semantics where templates can see them: truthiness, ==
// across int/float/bool, floor division and modulo, slicing by code points, str() and repr()
// of None/True/lists/dicts/floats, and Jinja2's Undefined (prints as nothing, is false, has
// length 0, but is an error when added to or looked into).
#include "serve/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <vector>

#include "core/os.h"
#include "model/tokenizer_text.h"

namespace mamba::serve {

using ojson = nlohmann::ordered_json;

namespace {

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

struct Value;
using List = std::vector<Value>;
using Dict = std::vector<std::pair<std::string, Value>>;  // insertion order, as Python's dict

struct Value {
  enum class K { undef, none, boolean, integer, number, string, list, tuple, dict, ns, func };
  K k = K::undef;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // string; the name of an undefined value; the function's name
  std::shared_ptr<List> l;
  std::shared_ptr<Dict> d;

  static Value undef(std::string name = {}) {
    Value v;
    v.s = std::move(name);
    return v;
  }
  static Value none() { return make(K::none); }
  static Value boolean(bool x) {
    Value v = make(K::boolean);
    v.b = x;
    return v;
  }
  static Value integer(int64_t x) {
    Value v = make(K::integer);
    v.i = x;
    return v;
  }
  static Value number(double x) {
    Value v = make(K::number);
    v.f = x;
    return v;
  }
  static Value str(std::string x) {
    Value v = make(K::string);
    v.s = std::move(x);
    return v;
  }
  static Value list(List x, K kind = K::list) {
    Value v = make(kind);
    v.l = std::make_shared<List>(std::move(x));
    return v;
  }
  static Value dict(Dict x, K kind = K::dict) {
    Value v = make(kind);
    v.d = std::make_shared<Dict>(std::move(x));
    return v;
  }
  static Value func(std::string name) {
    Value v = make(K::func);
    v.s = std::move(name);
    return v;
  }
  static Value make(K k) {
    Value v;
    v.k = k;
    return v;
  }
  bool is_undef() const { return k == K::undef; }
  bool is_num() const { return k == K::integer || k == K::number || k == K::boolean; }
  bool is_seq() const { return k == K::list || k == K::tuple; }
  bool is_map() const { return k == K::dict || k == K::ns; }
  double as_double() const {
    return k == K::number ? f : static_cast<double>(k == K::boolean ? b : i);
  }
  int64_t as_int() const { return k == K::boolean ? b : i; }
  const Value* find(std::string_view key) const {
    if (!d) return nullptr;
    for (auto& [kk, vv] : *d)
      if (kk == key) return &vv;
    return nullptr;
  }
};

const char* kind_name(const Value& v) {
  switch (v.k) {
    case Value::K::undef:
      return "undefined";
    case Value::K::none:
      return "none";
    case Value::K::boolean:
      return "a boolean";
    case Value::K::integer:
      return "an integer";
    case Value::K::number:
      return "a float";
    case Value::K::string:
      return "a string";
    case Value::K::list:
      return "a list";
    case Value::K::tuple:
      return "a tuple";
    case Value::K::dict:
      return "a dict";
    case Value::K::ns:
      return "a namespace";
    case Value::K::func:
      return "a function";
  }
  return "?";
}

Value from_json(const ojson& j) {
  switch (j.type()) {
    case ojson::value_t::null:
      return Value::none();
    case ojson::value_t::boolean:
      return Value::boolean(j.get<bool>());
    case ojson::value_t::number_integer:
      return Value::integer(j.get<int64_t>());
    case ojson::value_t::number_unsigned:
      if (j.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        return Value::number(j.get<double>());
      return Value::integer(static_cast<int64_t>(j.get<uint64_t>()));
    case ojson::value_t::number_float:
      return Value::number(j.get<double>());
    case ojson::value_t::string:
      return Value::str(j.get<std::string>());
    case ojson::value_t::array: {
      List l;
      for (auto& x : j) l.push_back(from_json(x));
      return Value::list(std::move(l));
    }
    case ojson::value_t::object: {
      Dict d;
      for (auto& [k, v] : j.items()) d.emplace_back(k, from_json(v));
      return Value::dict(std::move(d));
    }
    default:
      return Value::none();
  }
}

// ---- UTF-8 and Python's string helpers ----

// Byte offsets of each code point (and the end) of valid-or-not UTF-8 (a stray byte is one).
std::vector<size_t> cp_offsets(const std::string& s) {
  std::vector<size_t> o;
  for (size_t p = 0; p < s.size();) {
    o.push_back(p);
    const unsigned char c = static_cast<unsigned char>(s[p]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    p = std::min(s.size(), p + n);
  }
  o.push_back(s.size());
  return o;
}

uint32_t decode_cp(const std::string& s, size_t p, size_t* len) {
  const unsigned char c = static_cast<unsigned char>(s[p]);
  int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (p + static_cast<size_t>(n) > s.size()) n = 1;
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[p + k]) & 0x3F);
  *len = static_cast<size_t>(n);
  return cp;
}

// Python's str.isspace() for a code point.
bool py_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

std::string py_strip(const std::string& s, bool left, bool right,
                     const std::string* chars = nullptr) {
  auto is_strip = [&](uint32_t cp) {
    if (!chars) return py_space(cp);
    for (size_t p = 0; p < chars->size();) {
      size_t n = 0;
      if (decode_cp(*chars, p, &n) == cp) return true;
      p += n;
    }
    return false;
  };
  size_t b = 0, e = s.size();
  if (left)
    while (b < e) {
      size_t n = 0;
      if (!is_strip(decode_cp(s, b, &n))) break;
      b += n;
    }
  if (right)
    while (e > b) {
      size_t p = e - 1;
      while (p > b && (static_cast<unsigned char>(s[p]) & 0xC0) == 0x80) --p;
      size_t n = 0;
      if (!is_strip(decode_cp(s, p, &n)) || p + n != e) break;
      e = p;
    }
  return s.substr(b, e - b);
}

// Simple case mapping: ASCII, Latin-1, Latin Extended-A, basic Greek and Cyrillic (what
// templates apply upper/lower to: role names and fixed words). Other letters are unchanged.
uint32_t cp_upper(uint32_t c) {
  if (c >= 'a' && c <= 'z') return c - 32;
  if (c < 0x80) return c;
  if ((c >= 0xE0 && c <= 0xFE && c != 0xF7)) return c - 32;
  if (c == 0xFF) return 0x178;
  if (c >= 0x100 && c <= 0x17F && c != 0x130 && c != 0x131 && c != 0x138 && c != 0x149 &&
      c != 0x17F) {
    const bool odd_lower = (c <= 0x137) || (c >= 0x14A && c <= 0x177);
    if (odd_lower ? (c & 1) : !(c & 1) && c != 0x178) return c - 1;
    return c;
  }
  if (c >= 0x3B1 && c <= 0x3C9 && c != 0x3C2) return c - 32;
  if (c >= 0x430 && c <= 0x44F) return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  return c;
}
uint32_t cp_lower(uint32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c < 0x80) return c;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  if (c == 0x178) return 0xFF;
  if (c >= 0x100 && c <= 0x17F && c != 0x130 && c != 0x131 && c != 0x138 && c != 0x149 &&
      c != 0x17F) {
    const bool even_upper = (c <= 0x137) || (c >= 0x14A && c <= 0x177);
    if (even_upper ? !(c & 1) : (c & 1)) return c + 1;
    return c;
  }
  if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}
bool cp_cased_letter(uint32_t c) { return cp_upper(c) != c || cp_lower(c) != c; }

// mode: 'u' upper, 'l' lower, 'c' capitalize (first upper, rest lower), 't' title.
std::string py_case(const std::string& s, char mode) {
  std::string out;
  out.reserve(s.size());
  bool first = true, prev_cased = false;
  for (size_t p = 0; p < s.size();) {
    size_t n = 0;
    uint32_t c = decode_cp(s, p, &n);
    if (n == 1 && static_cast<unsigned char>(s[p]) >= 0x80) {  // a stray byte: kept as is
      out += s[p];
      p += n;
      continue;
    }
    uint32_t r = c;
    if (mode == 'u' && c == 0xDF) {  // ß -> SS
      out += "SS";
      p += n;
      continue;
    }
    if (mode == 'u') r = cp_upper(c);
    if (mode == 'l') r = cp_lower(c);
    if (mode == 'c') r = first ? cp_upper(c) : cp_lower(c);
    if (mode == 't') {
      r = prev_cased ? cp_lower(c) : cp_upper(c);
      prev_cased = cp_cased_letter(c);
    }
    first = false;
    tok::utf8_append(out, static_cast<char32_t>(r));
    p += n;
  }
  return out;
}

// Python's repr() of a float.
std::string py_float(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x < 0 ? "-inf" : "inf";
  if (x == 0) return std::signbit(x) ? "-0.0" : "0.0";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, x, std::chars_format::scientific);
  std::string sci(buf, r.ptr);  // [-]d[.ddd]e[+-]XX
  const bool neg = sci[0] == '-';
  if (neg) sci.erase(0, 1);
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp = std::stoi(sci.substr(e + 1));
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    } else if (static_cast<size_t>(exp) + 1 >= digits.size()) {
      out = digits + std::string(static_cast<size_t>(exp) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, static_cast<size_t>(exp) + 1) + "." +
            digits.substr(static_cast<size_t>(exp) + 1);
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += eb;
  }
  return neg ? "-" + out : out;
}

std::string py_repr(const Value& v);

// Python's str() of a value (what {{ }} prints).
std::string py_str(const Value& v) {
  switch (v.k) {
    case Value::K::undef:
      return "";
    case Value::K::none:
      return "None";
    case Value::K::boolean:
      return v.b ? "True" : "False";
    case Value::K::integer:
      return std::to_string(v.i);
    case Value::K::number:
      return py_float(v.f);
    case Value::K::string:
      return v.s;
    default:
      return py_repr(v);
  }
}

std::string py_str_repr(const std::string& s) {
  const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (size_t p = 0; p < s.size();) {
    size_t n = 0;
    uint32_t c = decode_cp(s, p, &n);
    if (c == static_cast<uint32_t>(q) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F || (c >= 0x80 && c <= 0xA0) || c == 0xAD) {
      char b[16];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    } else {
      out.append(s, p, n);
    }
    p += n;
  }
  out += q;
  return out;
}

std::string py_repr(const Value& v) {
  switch (v.k) {
    case Value::K::string:
      return py_str_repr(v.s);
    case Value::K::list:
    case Value::K::tuple: {
      std::string o = v.k == Value::K::list ? "[" : "(";
      for (size_t i = 0; i < v.l->size(); ++i) {
        if (i) o += ", ";
        o += py_repr((*v.l)[i]);
      }
      if (v.k == Value::K::tuple && v.l->size() == 1) o += ",";
      return o + (v.k == Value::K::list ? "]" : ")");
    }
    case Value::K::dict: {
      std::string o = "{";
      bool first = true;
      for (auto& [k, x] : *v.d) {
        if (!first) o += ", ";
        first = false;
        o += py_str_repr(k) + ": " + py_repr(x);
      }
      return o + "}";
    }
    case Value::K::ns:
      return "<Namespace>";
    case Value::K::func:
      return "<function " + v.s + ">";
    default:
      return py_str(v);
  }
}

bool truthy(const Value& v) {
  switch (v.k) {
    case Value::K::undef:
    case Value::K::none:
      return false;
    case Value::K::boolean:
      return v.b;
    case Value::K::integer:
      return v.i != 0;
    case Value::K::number:
      return v.f != 0;
    case Value::K::string:
      return !v.s.empty();
    case Value::K::list:
    case Value::K::tuple:
      return !v.l->empty();
    case Value::K::dict:
      return !v.d->empty();
    default:
      return true;
  }
}

bool equal(const Value& a, const Value& b) {
  if (a.is_num() && b.is_num()) {
    if (a.k == Value::K::number || b.k == Value::K::number) return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.is_seq() && b.is_seq()) {
    if (a.k != b.k || a.l->size() != b.l->size()) return false;
    for (size_t i = 0; i < a.l->size(); ++i)
      if (!equal((*a.l)[i], (*b.l)[i])) return false;
    return true;
  }
  if (a.k != b.k) return false;
  switch (a.k) {
    case Value::K::undef:
    case Value::K::none:
      return true;
    case Value::K::string:
      return a.s == b.s;
    case Value::K::dict: {
      if (a.d->size() != b.d->size()) return false;
      for (auto& [k, x] : *a.d) {
        const Value* y = b.find(k);
        if (!y || !equal(x, *y)) return false;
      }
      return true;
    }
    case Value::K::ns:
      return a.d == b.d;
    case Value::K::func:
      return a.s == b.s;
    default:
      return false;
  }
}

// json.dumps(x, ensure_ascii=False, indent=indent) (what transformers' tojson filter does).
void to_json(const Value& v, int indent, int level, std::string& out, const std::string& where) {
  auto nl = [&](int lv) {
    out += '\n';
    out.append(static_cast<size_t>(indent * lv), ' ');
  };
  switch (v.k) {
    case Value::K::none:
      out += "null";
      return;
    case Value::K::boolean:
      out += v.b ? "true" : "false";
      return;
    case Value::K::integer:
      out += std::to_string(v.i);
      return;
    case Value::K::number:
      out += std::isnan(v.f)   ? "NaN"
             : std::isinf(v.f) ? (v.f < 0 ? "-Infinity" : "Infinity")
                               : py_float(v.f);
      return;
    case Value::K::string: {
      out += '"';
      for (char ch : v.s) {
        const unsigned char c = static_cast<unsigned char>(ch);
        switch (c) {
          case '"':
            out += "\\\"";
            break;
          case '\\':
            out += "\\\\";
            break;
          case '\n':
            out += "\\n";
            break;
          case '\r':
            out += "\\r";
            break;
          case '\t':
            out += "\\t";
            break;
          case '\b':
            out += "\\b";
            break;
          case '\f':
            out += "\\f";
            break;
          default:
            if (c < 0x20) {
              char b[16];
              std::snprintf(b, sizeof b, "\\u%04x", c);
              out += b;
            } else {
              out += ch;
            }
        }
      }
      out += '"';
      return;
    }
    case Value::K::list:
    case Value::K::tuple: {
      if (v.l->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t i = 0; i < v.l->size(); ++i) {
        if (i) out += indent >= 0 ? "," : ", ";
        if (indent >= 0) nl(level + 1);
        to_json((*v.l)[i], indent, level + 1, out, where);
      }
      if (indent >= 0) nl(level);
      out += ']';
      return;
    }
    case Value::K::dict: {
      if (v.d->empty()) {
        out += "{}";
        return;
      }
      out += '{';
      bool first = true;
      for (auto& [k, x] : *v.d) {
        if (!first) out += indent >= 0 ? "," : ", ";
        first = false;
        if (indent >= 0) nl(level + 1);
        to_json(Value::str(k), indent, level + 1, out, where);
        out += ": ";
        to_json(x, indent, level + 1, out, where);
      }
      if (indent >= 0) nl(level);
      out += '}';
      return;
    }
    default:
      throw ChatTemplateError(where + ": tojson: " + kind_name(v) + " is not JSON serializable",
                              false);
  }
}

// ---------------------------------------------------------------------------------------------
// Syntax tree
// ---------------------------------------------------------------------------------------------

struct Expr;
using ExprP = std::unique_ptr<Expr>;

struct Expr {
  enum class T {
    constant,
    name,
    list,
    tuple,
    dict,
    attr,
    index,
    slice,
    call,
    filter,
    test,
    neg,
    pos,
    binop,
    concat,
    compare,
    and_,
    or_,
    not_,
    cond
  };
  T t;
  int line = 0, col = 0;
  int height = 1;    // of the subtree (bounded: evaluating and freeing it recurse)
  Value value;       // constant
  std::string name;  // name, attr, filter, test, binop operator
  bool negated = false;
  std::vector<ExprP> args;  // children / positional arguments (the callee or target is args[0])
  std::vector<std::pair<std::string, ExprP>> kwargs;
  std::vector<std::string> ops;  // compare
};

struct Stmt;
using StmtP = std::unique_ptr<Stmt>;
using Body = std::vector<StmtP>;

struct Stmt {
  enum class T { text, output, if_, for_, set, set_block, brk, cont };
  T t;
  int line = 0, col = 0;
  std::string text;                              // text
  ExprP expr;                                    // output, set value, for iterable
  std::vector<std::pair<ExprP, Body>> branches;  // if / elif conditions and bodies
  Body body, else_body;                          // for / set_block / if's else
  std::vector<std::string> targets;              // for targets; set: name (and attr in targets[1])
  ExprP filter;                                  // for ... if filter
};

// ---------------------------------------------------------------------------------------------
// Lexing
// ---------------------------------------------------------------------------------------------

struct Tok {
  enum class T { name, integer, number, string, op, end };
  T t;
  std::string s;  // name, op, string contents
  int64_t i = 0;
  double f = 0;
  size_t pos = 0;
};

// A piece of the template: text, or a tag with its tokens.
struct Piece {
  enum class T { text, var, block };
  T t;
  std::string text;
  std::vector<Tok> toks;
  size_t pos = 0;
};

class Source {
 public:
  Source(std::string_view src, std::string origin) : origin_(std::move(origin)) {
    // Jinja2 normalises newlines to \n and drops one trailing newline (keep_trailing_newline off)
    text_.reserve(src.size());
    for (size_t p = 0; p < src.size(); ++p) {
      if (src[p] == '\r') {
        text_ += '\n';
        if (p + 1 < src.size() && src[p + 1] == '\n') ++p;
      } else {
        text_ += src[p];
      }
    }
    if (!text_.empty() && text_.back() == '\n') text_.pop_back();
    line_starts_.push_back(0);
    for (size_t p = 0; p < text_.size(); ++p)
      if (text_[p] == '\n') line_starts_.push_back(p + 1);
  }
  const std::string& text() const { return text_; }
  std::pair<int, int> where(size_t pos) const {
    auto it = std::upper_bound(line_starts_.begin(), line_starts_.end(), pos);
    const size_t line = static_cast<size_t>(it - line_starts_.begin());
    return {static_cast<int>(line), static_cast<int>(pos - line_starts_[line - 1] + 1)};
  }
  [[noreturn]] void fail(size_t pos, const std::string& msg) const {
    auto [l, c] = where(pos);
    throw Error(origin_ + " line " + std::to_string(l) + ", column " + std::to_string(c) + ": " +
                msg);
  }
  const std::string& origin() const { return origin_; }

 private:
  std::string text_, origin_;
  std::vector<size_t> line_starts_;
};

bool is_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}
bool is_name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// Cuts the source into pieces, with Jinja2's whitespace rules (trim_blocks, lstrip_blocks).
std::vector<Piece> lex(const Source& src) {
  const std::string& s = src.text();
  std::vector<Piece> out;
  size_t pos = 0;
  bool line_starting = true;
  const size_t n = s.size();
  auto emit_text = [&](std::string t, size_t at) {
    if (!t.empty()) out.push_back(Piece{Piece::T::text, std::move(t), {}, at});
  };
  while (pos < n) {
    size_t t = pos;
    while (true) {
      t = s.find('{', t);
      if (t == std::string::npos || t + 1 >= n) {
        t = std::string::npos;
        break;
      }
      if (s[t + 1] == '{' || s[t + 1] == '%' || s[t + 1] == '#') break;
      ++t;
    }
    if (t == std::string::npos) {
      emit_text(s.substr(pos), pos);
      break;
    }
    const char kind = s[t + 1];
    const char mod = t + 2 < n && (s[t + 2] == '-' || s[t + 2] == '+') ? s[t + 2] : 0;
    std::string text = s.substr(pos, t - pos);
    if (mod == '-') {
      size_t e = text.size();
      while (e > 0 && is_ws(text[e - 1])) --e;
      text.resize(e);
    } else if (mod != '+' && kind != '{') {  // lstrip_blocks
      const size_t lpos = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
      if ((lpos > 0 || line_starting) && lpos < text.size() &&
          std::all_of(text.begin() + static_cast<std::ptrdiff_t>(lpos), text.end(),
                      [](char c) { return c == ' ' || c == '\t' || c == '\v' || c == '\f'; }))
        text.resize(lpos);
    }
    emit_text(std::move(text), pos);
    size_t p = t + 2 + (mod ? 1 : 0);
    // after the closing delimiter: '-' strips all whitespace, plain block/comment ends eat one
    // newline (trim_blocks); line_starting records whether what was consumed ended with \n
    auto after_close = [&](size_t q, char close_mod, bool block_like) {
      if (close_mod == '-') {
        while (q < n && is_ws(s[q])) ++q;
        line_starting = q > 0 && s[q - 1] == '\n';
      } else if (close_mod == 0 && block_like && q < n && s[q] == '\n') {
        ++q;
        line_starting = true;
      } else {
        line_starting = false;
      }
      return q;
    };
    if (kind == '#') {
      size_t q = s.find("#}", p);
      if (q == std::string::npos) src.fail(t, "a comment '{#' is not closed with '#}'");
      char cm = q > p && (s[q - 1] == '-' || s[q - 1] == '+') ? s[q - 1] : 0;
      pos = after_close(q + 2, cm, true);
      continue;
    }
    Piece piece{kind == '{' ? Piece::T::var : Piece::T::block, {}, {}, t};
    const std::string close = kind == '{' ? "}}" : "%}";
    bool closed = false;
    int depth = 0;  // brackets: a '}' inside a dict literal does not end '{{ ... }}'
    while (p < n) {
      while (p < n && is_ws(s[p])) ++p;
      if (p >= n) break;
      // the end of the tag: [-+]?close
      if (depth == 0 || kind == '%') {
        char cm = 0;
        size_t q = p;
        if ((s[q] == '-' || (s[q] == '+' && kind == '%')) && s.compare(q + 1, 2, close) == 0) {
          cm = s[q];
          ++q;
        }
        if (s.compare(q, 2, close) == 0) {
          pos = after_close(q + 2, cm, kind == '%');
          closed = true;
          break;
        }
      }
      Tok tok;
      tok.pos = p;
      const char c = s[p];
      if (is_name_start(c)) {
        size_t e = p;
        while (e < n && is_name_char(s[e])) ++e;
        tok.t = Tok::T::name;
        tok.s = s.substr(p, e - p);
        p = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t e = p;
        bool is_float = false;
        while (e < n && (std::isdigit(static_cast<unsigned char>(s[e])) || s[e] == '_')) ++e;
        if (e + 1 < n && s[e] == '.' && std::isdigit(static_cast<unsigned char>(s[e + 1]))) {
          is_float = true;
          ++e;
          while (e < n && (std::isdigit(static_cast<unsigned char>(s[e])) || s[e] == '_')) ++e;
        }
        if (e < n && (s[e] == 'e' || s[e] == 'E')) {
          size_t q = e + 1;
          if (q < n && (s[q] == '+' || s[q] == '-')) ++q;
          if (q < n && std::isdigit(static_cast<unsigned char>(s[q]))) {
            is_float = true;
            e = q;
            while (e < n && std::isdigit(static_cast<unsigned char>(s[e]))) ++e;
          }
        }
        std::string num = s.substr(p, e - p);
        num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
        if (is_float) {
          tok.t = Tok::T::number;
          tok.f = std::strtod(num.c_str(), nullptr);
        } else {
          tok.t = Tok::T::integer;
          auto r = std::from_chars(num.data(), num.data() + num.size(), tok.i);
          if (r.ec != std::errc()) src.fail(p, "integer literal " + num + " is out of range");
        }
        p = e;
      } else if (c == '\'' || c == '"') {
        size_t e = p + 1;
        std::string v;
        bool ok = false;
        while (e < n) {
          if (s[e] == c) {
            ok = true;
            break;
          }
          if (s[e] == '\\' && e + 1 < n) {
            const char x = s[e + 1];
            switch (x) {
              case 'n':
                v += '\n';
                break;
              case 't':
                v += '\t';
                break;
              case 'r':
                v += '\r';
                break;
              case '\\':
              case '\'':
              case '"':
                v += x;
                break;
              case '\n':  // a line continuation
                break;
              default:
                src.fail(e, std::string("unsupported escape sequence '\\") + x +
                                "' in a string literal (supported: \\n \\t \\r \\\\ \\' \\\")");
            }
            e += 2;
            continue;
          }
          v += s[e++];
        }
        if (!ok) src.fail(p, "a string literal is not closed");
        tok.t = Tok::T::string;
        tok.s = std::move(v);
        p = e + 1;
      } else {
        static const char* ops[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                    "/",  "%",  "~",  "<",  ">",  "=",  "(", ")", "[",
                                    "]",  "{",  "}",  ".",  ",",  ":",  "|"};
        const char* hit = nullptr;
        for (const char* o : ops)
          if (s.compare(p, std::strlen(o), o) == 0) {
            hit = o;
            break;
          }
        if (!hit) src.fail(p, std::string("unexpected character '") + c + "' in a tag");
        tok.t = Tok::T::op;
        tok.s = hit;
        p += tok.s.size();
        if (tok.s == "(" || tok.s == "[" || tok.s == "{") ++depth;
        if ((tok.s == ")" || tok.s == "]" || tok.s == "}") && depth > 0) --depth;
      }
      piece.toks.push_back(std::move(tok));
    }
    if (!closed)
      src.fail(t, kind == '{' ? "'{{' is not closed with '}}'" : "'{%' is not closed with '%}'");
    Tok end;
    end.t = Tok::T::end;
    end.pos = pos > 0 ? pos - 1 : 0;
    piece.toks.push_back(end);
    out.push_back(std::move(piece));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

const char* const kFilters[] = {
    "trim",    "length", "count", "upper",      "lower",      "capitalize", "title",
    "default", "d",      "first", "last",       "join",       "tojson",     "string",
    "int",     "float",  "abs",   "list",       "reverse",    "replace",    "safe",
    "items",   "round",  "map",   "selectattr", "rejectattr", "select",     "reject"};
const char* const kTests[] = {
    "defined", "undefined", "none",     "string", "number", "integer", "float", "boolean",
    "mapping", "iterable",  "sequence", "true",   "false",  "even",    "odd",   "divisibleby",
    "eq",      "equalto",   "==",       "ne",     "!=",     "lt",      "<",     "le",
    "<=",      "gt",        ">",        "ge",     ">=",     "in"};
const char* const kMethods[] = {"strip",      "lstrip",     "rstrip",   "upper", "lower",   "title",
                                "capitalize", "startswith", "endswith", "split", "replace", "find",
                                "count",      "join",       "items",    "keys",  "values",  "get"};
const char* const kGlobals[] = {"raise_exception", "namespace", "range", "strftime_now"};

template <size_t N>
bool in_list(const char* const (&list)[N], const std::string& s) {
  for (const char* x : list)
    if (s == x) return true;
  return false;
}

class Parser {
 public:
  Parser(const Source& src, std::vector<Piece> pieces, int max_depth)
      : src_(src), pieces_(std::move(pieces)), max_depth_(max_depth) {}

  Body parse_all() {
    Body b = parse_body({});
    if (pi_ < pieces_.size()) {
      const Piece& p = pieces_[pi_];
      src_.fail(p.pos, "unexpected '" + p.toks[0].s + "' (no block is open)");
    }
    return b;
  }

 private:
  const Source& src_;
  std::vector<Piece> pieces_;
  size_t pi_ = 0;  // current piece
  size_t ti_ = 0;  // current token of the current tag
  int depth_ = 0, max_depth_;

  struct Depth {
    Parser& p;
    explicit Depth(Parser& pp, size_t pos) : p(pp) {
      if (++p.depth_ > p.max_depth_)
        p.src_.fail(pos,
                    "the template nests deeper than " + std::to_string(p.max_depth_) + " levels");
    }
    ~Depth() { --p.depth_; }
  };

  const std::vector<Tok>& toks() const { return pieces_[pi_].toks; }
  const Tok& cur() const { return toks()[ti_]; }
  const Tok& peek(size_t k = 1) const { return toks()[std::min(ti_ + k, toks().size() - 1)]; }
  bool is_op(const char* o) const { return cur().t == Tok::T::op && cur().s == o; }
  bool is_name(const char* nm) const { return cur().t == Tok::T::name && cur().s == nm; }
  std::string desc(const Tok& t) const {
    switch (t.t) {
      case Tok::T::end:
        return "the end of the tag";
      case Tok::T::string:
        return "a string";
      case Tok::T::integer:
      case Tok::T::number:
        return "a number";
      default:
        return "'" + t.s + "'";
    }
  }
  [[noreturn]] void fail_here(const std::string& msg) const { src_.fail(cur().pos, msg); }
  void expect_op(const char* o) {
    if (!is_op(o)) fail_here(std::string("expected '") + o + "', got " + desc(cur()));
    ++ti_;
  }
  std::string expect_name() {
    if (cur().t != Tok::T::name) fail_here("expected a name, got " + desc(cur()));
    return toks()[ti_++].s;
  }
  void expect_end() {
    if (cur().t != Tok::T::end) fail_here("expected the end of the tag, got " + desc(cur()));
  }
  ExprP node(Expr::T t, const Tok& at) {
    auto e = std::make_unique<Expr>();
    e->t = t;
    auto [l, c] = src_.where(at.pos);
    e->line = l;
    e->col = c;
    return e;
  }
  // Computes e's height from its children and refuses a tree too deep to walk safely
  // (`1+1+1+...` is parsed by a loop, so the nesting guard alone does not bound it).
  ExprP seal(ExprP e) {
    int h = 0;
    for (auto& a : e->args)
      if (a) h = std::max(h, a->height);
    for (auto& kv : e->kwargs) h = std::max(h, kv.second->height);
    e->height = h + 1;
    if (e->height > 4 * max_depth_)
      src_.fail(cur().pos, "an expression is nested deeper than " + std::to_string(4 * max_depth_) +
                               " operations");
    return e;
  }

  // ---- statements ----

  // Parses pieces until a block tag whose first word is in `ends` (left current) or the end.
  Body parse_body(const std::vector<std::string>& ends) {
    Body body;
    while (pi_ < pieces_.size()) {
      const Piece& p = pieces_[pi_];
      auto st = std::make_unique<Stmt>();
      auto [l, c] = src_.where(p.pos);
      st->line = l;
      st->col = c;
      if (p.t == Piece::T::text) {
        st->t = Stmt::T::text;
        st->text = p.text;
        body.push_back(std::move(st));
        ++pi_;
        continue;
      }
      ti_ = 0;
      if (p.t == Piece::T::var) {
        Depth d(*this, p.pos);
        st->t = Stmt::T::output;
        st->expr = parse_tuple_expr(true);
        expect_end();
        body.push_back(std::move(st));
        ++pi_;
        continue;
      }
      if (cur().t != Tok::T::name) fail_here("expected a tag name after '{%', got " + desc(cur()));
      const std::string word = cur().s;
      if (std::find(ends.begin(), ends.end(), word) != ends.end()) return body;
      Depth d(*this, p.pos);
      ++ti_;
      if (word == "if") {
        parse_if(*st);
      } else if (word == "for") {
        parse_for(*st);
      } else if (word == "set") {
        parse_set(*st);
      } else if (word == "break" || word == "continue") {
        st->t = word == "break" ? Stmt::T::brk : Stmt::T::cont;
        expect_end();
        ++pi_;
      } else if (word == "elif" || word == "else" || word == "endif" || word == "endfor" ||
                 word == "endset") {
        src_.fail(p.pos, "unexpected '" + word + "' (no block that it ends is open)");
      } else if (word == "macro" || word == "call" || word == "filter" || word == "with" ||
                 word == "include" || word == "import" || word == "from" || word == "extends" ||
                 word == "block" || word == "raw" || word == "autoescape" || word == "do" ||
                 word == "generation" || word == "trans") {
        src_.fail(p.pos, "the '{% " + word +
                             " %}' tag is not supported by this server's chat template renderer");
      } else {
        src_.fail(p.pos, "unknown tag '" + word + "'");
      }
      body.push_back(std::move(st));
    }
    if (!ends.empty()) {
      std::string want;
      for (auto& e : ends) want += (want.empty() ? "'" : " or '") + e + "'";
      throw Error(src_.origin() + ": unexpected end of template: expected " + want);
    }
    return body;
  }

  // current piece is `{% if cond %}` with ti_ after "if"
  void parse_if(Stmt& st) {
    st.t = Stmt::T::if_;
    while (true) {
      ExprP cond = parse_expr();
      expect_end();
      ++pi_;
      Body b = parse_body({"elif", "else", "endif"});
      st.branches.emplace_back(std::move(cond), std::move(b));
      ti_ = 0;
      const std::string w = cur().s;
      ++ti_;
      if (w == "elif") continue;
      if (w == "else") {
        expect_end();
        ++pi_;
        st.else_body = parse_body({"endif"});
        ti_ = 1;
      }
      expect_end();
      ++pi_;
      return;
    }
  }

  void parse_for(Stmt& st) {
    st.t = Stmt::T::for_;
    st.targets.push_back(expect_name());
    while (is_op(",")) {
      ++ti_;
      st.targets.push_back(expect_name());
    }
    if (!is_name("in")) fail_here("expected 'in' in the for loop, got " + desc(cur()));
    ++ti_;
    st.expr = parse_tuple_expr(false);
    if (is_name("if")) {
      ++ti_;
      st.filter = parse_expr();
    }
    if (is_name("recursive")) fail_here("recursive for loops are not supported");
    expect_end();
    ++pi_;
    st.body = parse_body({"endfor", "else"});
    ti_ = 0;
    if (cur().s == "else") {
      ti_ = 1;
      expect_end();
      ++pi_;
      st.else_body = parse_body({"endfor"});
    }
    ti_ = 1;
    expect_end();
    ++pi_;
  }

  void parse_set(Stmt& st) {
    st.targets.push_back(expect_name());
    if (is_op(".")) {
      ++ti_;
      st.targets.push_back(expect_name());
    }
    if (is_op(",")) fail_here("'{% set a, b = ... %}' (unpacking) is not supported");
    if (is_op("=")) {
      ++ti_;
      st.t = Stmt::T::set;
      st.expr = parse_tuple_expr(true);
      expect_end();
      ++pi_;
      return;
    }
    if (st.targets.size() != 1) fail_here("expected '=' after the attribute to set");
    if (is_op("|")) fail_here("filters on a block '{% set %}' are not supported");
    expect_end();
    st.t = Stmt::T::set_block;
    ++pi_;
    st.body = parse_body({"endset"});
    ti_ = 1;
    expect_end();
    ++pi_;
  }

  // ---- expressions ----

  // expr [, expr ...] (a tuple without parentheses when there is a comma)
  ExprP parse_tuple_expr(bool with_cond) {
    const Tok& at = cur();
    ExprP first = with_cond ? parse_expr() : parse_or();
    if (!is_op(",")) return first;
    auto t = node(Expr::T::tuple, at);
    t->args.push_back(std::move(first));
    while (is_op(",")) {
      ++ti_;
      if (cur().t == Tok::T::end || is_name("if")) break;
      t->args.push_back(with_cond ? parse_expr() : parse_or());
    }
    return seal(std::move(t));
  }

  ExprP parse_expr() {
    Depth d(*this, cur().pos);
    ExprP e = parse_or();
    while (is_name("if")) {
      const Tok& at = cur();
      ++ti_;
      auto c = node(Expr::T::cond, at);
      c->args.push_back(std::move(e));
      c->args.push_back(parse_or());
      if (is_name("else")) {
        ++ti_;
        c->args.push_back(parse_expr());
      }
      e = seal(std::move(c));
    }
    return e;
  }
  ExprP parse_or() {
    ExprP e = parse_and();
    while (is_name("or")) {
      auto o = node(Expr::T::or_, cur());
      ++ti_;
      o->args.push_back(std::move(e));
      o->args.push_back(parse_and());
      e = seal(std::move(o));
    }
    return e;
  }
  ExprP parse_and() {
    ExprP e = parse_not();
    while (is_name("and")) {
      auto o = node(Expr::T::and_, cur());
      ++ti_;
      o->args.push_back(std::move(e));
      o->args.push_back(parse_not());
      e = seal(std::move(o));
    }
    return e;
  }
  ExprP parse_not() {
    if (is_name("not")) {
      Depth d(*this, cur().pos);
      auto o = node(Expr::T::not_, cur());
      ++ti_;
      o->args.push_back(parse_not());
      return seal(std::move(o));
    }
    return parse_compare();
  }
  ExprP parse_compare() {
    const Tok& at = cur();
    ExprP e = parse_math1();
    ExprP cmp;
    while (true) {
      std::string op;
      if (cur().t == Tok::T::op && (cur().s == "==" || cur().s == "!=" || cur().s == "<" ||
                                    cur().s == ">" || cur().s == "<=" || cur().s == ">=")) {
        op = cur().s;
        ++ti_;
      } else if (is_name("in")) {
        op = "in";
        ++ti_;
      } else if (is_name("not") && peek().t == Tok::T::name && peek().s == "in") {
        op = "notin";
        ti_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(Expr::T::compare, at);
        cmp->args.push_back(std::move(e));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? seal(std::move(cmp)) : std::move(e);
  }
  ExprP binop(ExprP l, const std::string& op, ExprP r, const Tok& at) {
    auto b = node(Expr::T::binop, at);
    b->name = op;
    b->args.push_back(std::move(l));
    b->args.push_back(std::move(r));
    return seal(std::move(b));
  }
  ExprP parse_math1() {
    ExprP e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Tok& at = cur();
      const std::string op = at.s;
      ++ti_;
      e = binop(std::move(e), op, parse_concat(), at);
    }
    return e;
  }
  ExprP parse_concat() {
    const Tok& at = cur();
    ExprP e = parse_math2();
    if (!is_op("~")) return e;
    auto c = node(Expr::T::concat, at);
    c->args.push_back(std::move(e));
    while (is_op("~")) {
      ++ti_;
      c->args.push_back(parse_math2());
    }
    return seal(std::move(c));
  }
  ExprP parse_math2() {
    ExprP e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Tok& at = cur();
      const std::string op = at.s;
      ++ti_;
      e = binop(std::move(e), op, parse_pow(), at);
    }
    return e;
  }
  ExprP parse_pow() {
    ExprP e = parse_unary(true);
    while (is_op("**")) {
      const Tok& at = cur();
      ++ti_;
      e = binop(std::move(e), "**", parse_unary(true), at);
    }
    return e;
  }
  ExprP parse_unary(bool with_filter) {
    Depth d(*this, cur().pos);
    ExprP e;
    if (is_op("-") || is_op("+")) {
      auto u = node(is_op("-") ? Expr::T::neg : Expr::T::pos, cur());
      ++ti_;
      u->args.push_back(parse_unary(false));
      e = seal(std::move(u));
    } else {
      e = parse_postfix(parse_primary());
    }
    return with_filter ? parse_filter_expr(std::move(e)) : std::move(e);
  }
  ExprP parse_primary() {
    const Tok& t = cur();
    switch (t.t) {
      case Tok::T::name: {
        ++ti_;
        if (t.s == "true" || t.s == "True" || t.s == "false" || t.s == "False") {
          auto c = node(Expr::T::constant, t);
          c->value = Value::boolean(t.s[0] == 't' || t.s[0] == 'T');
          return c;
        }
        if (t.s == "none" || t.s == "None") {
          auto c = node(Expr::T::constant, t);
          c->value = Value::none();
          return c;
        }
        auto nm = node(Expr::T::name, t);
        nm->name = t.s;
        return nm;
      }
      case Tok::T::string: {
        auto c = node(Expr::T::constant, t);
        std::string s;
        while (cur().t == Tok::T::string) s += toks()[ti_++].s;
        c->value = Value::str(std::move(s));
        return c;
      }
      case Tok::T::integer: {
        auto c = node(Expr::T::constant, t);
        c->value = Value::integer(t.i);
        ++ti_;
        return c;
      }
      case Tok::T::number: {
        auto c = node(Expr::T::constant, t);
        c->value = Value::number(t.f);
        ++ti_;
        return c;
      }
      case Tok::T::op:
        if (t.s == "(") {
          ++ti_;
          if (is_op(")")) {
            ++ti_;
            return node(Expr::T::tuple, t);
          }
          ExprP e = parse_expr();
          if (is_op(",")) {
            auto tu = node(Expr::T::tuple, t);
            tu->args.push_back(std::move(e));
            while (is_op(",")) {
              ++ti_;
              if (is_op(")")) break;
              tu->args.push_back(parse_expr());
            }
            e = seal(std::move(tu));
          }
          expect_op(")");
          return e;
        }
        if (t.s == "[") {
          ++ti_;
          auto l = node(Expr::T::list, t);
          while (!is_op("]")) {
            if (!l->args.empty()) {
              expect_op(",");
              if (is_op("]")) break;
            }
            l->args.push_back(parse_expr());
          }
          ++ti_;
          return seal(std::move(l));
        }
        if (t.s == "{") {
          ++ti_;
          auto dct = node(Expr::T::dict, t);
          while (!is_op("}")) {
            if (!dct->args.empty()) {
              expect_op(",");
              if (is_op("}")) break;
            }
            dct->args.push_back(parse_expr());
            expect_op(":");
            dct->args.push_back(parse_expr());
          }
          ++ti_;
          return seal(std::move(dct));
        }
        break;
      default:
        break;
    }
    fail_here("unexpected " + desc(t) + " in an expression");
  }
  ExprP parse_postfix(ExprP e) {
    while (true) {
      const Tok& at = cur();
      if (is_op(".")) {
        ++ti_;
        if (cur().t == Tok::T::integer) {
          auto ix = node(Expr::T::index, at);
          auto c = node(Expr::T::constant, cur());
          c->value = Value::integer(cur().i);
          ++ti_;
          ix->args.push_back(std::move(e));
          ix->args.push_back(std::move(c));
          e = seal(std::move(ix));
          continue;
        }
        auto a = node(Expr::T::attr, at);
        a->name = expect_name();
        a->args.push_back(std::move(e));
        e = seal(std::move(a));
      } else if (is_op("[")) {
        ++ti_;
        ExprP parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!is_op(":") && !is_op("]")) parts[k] = parse_expr();
          if (k < 2 && is_op(":")) {
            slice = true;
            ++ti_;
          } else {
            break;
          }
        }
        expect_op("]");
        if (slice) {
          auto s = node(Expr::T::slice, at);
          s->args.push_back(std::move(e));
          for (auto& p : parts) s->args.push_back(std::move(p));
          e = seal(std::move(s));
        } else {
          if (!parts[0]) src_.fail(at.pos, "empty subscript '[]'");
          auto ix = node(Expr::T::index, at);
          ix->args.push_back(std::move(e));
          ix->args.push_back(std::move(parts[0]));
          e = seal(std::move(ix));
        }
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
  ExprP parse_call(ExprP callee) {
    const Tok& at = cur();
    // what may be called: the globals, and methods of strings and dicts
    if (callee->t == Expr::T::name && !in_list(kGlobals, callee->name))
      src_.fail(at.pos, "unknown function '" + callee->name +
                            "' (supported: raise_exception, namespace, range, strftime_now)");
    if (callee->t == Expr::T::attr && !in_list(kMethods, callee->name))
      src_.fail(at.pos, "unsupported method '." + callee->name + "()'");
    if (callee->t != Expr::T::name && callee->t != Expr::T::attr)
      src_.fail(at.pos, "only functions and methods can be called");
    auto c = node(Expr::T::call, at);
    c->args.push_back(std::move(callee));
    parse_args(*c);
    return seal(std::move(c));
  }
  // '(' args ')' into e.args (after what is already there) and e.kwargs
  void parse_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) {
        expect_op(",");
        if (is_op(")")) break;
      }
      first = false;
      if (is_op("*") || is_op("**")) fail_here("'*args' and '**kwargs' are not supported");
      if (cur().t == Tok::T::name && peek().t == Tok::T::op && peek().s == "=") {
        std::string k = cur().s;
        ti_ += 2;
        e.kwargs.emplace_back(std::move(k), parse_expr());
      } else {
        if (!e.kwargs.empty()) fail_here("a positional argument after a keyword argument");
        e.args.push_back(parse_expr());
      }
    }
    ++ti_;
  }
  ExprP parse_filter_expr(ExprP e) {
    while (true) {
      const Tok& at = cur();
      if (is_op("|")) {
        ++ti_;
        auto f = node(Expr::T::filter, at);
        f->name = expect_name();
        if (!in_list(kFilters, f->name)) src_.fail(at.pos, "unsupported filter '" + f->name + "'");
        f->args.push_back(std::move(e));
        if (is_op("(")) parse_args(*f);
        e = seal(std::move(f));
      } else if (is_name("is")) {
        ++ti_;
        auto t = node(Expr::T::test, at);
        if (is_name("not")) {
          t->negated = true;
          ++ti_;
        }
        if (cur().t == Tok::T::name) {
          t->name = cur().s;
        } else if (cur().t == Tok::T::op) {
          t->name = cur().s;  // `is ==`, `is <` ...
        } else {
          fail_here("expected a test name after 'is', got " + desc(cur()));
        }
        if (!in_list(kTests, t->name)) fail_here("unsupported test '" + t->name + "'");
        ++ti_;
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          parse_args(*t);
        } else if ((cur().t == Tok::T::name || cur().t == Tok::T::string ||
                    cur().t == Tok::T::integer || cur().t == Tok::T::number || is_op("[") ||
                    is_op("{")) &&
                   !is_name("else") && !is_name("or") && !is_name("and")) {
          if (is_name("is")) fail_here("tests cannot be chained with 'is'");
          t->args.push_back(parse_postfix(parse_primary()));
        }
        e = seal(std::move(t));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

struct BreakSignal {};
struct ContinueSignal {};

class Renderer {
 public:
  Renderer(const ChatTemplateLimits& lim, const std::string& origin) : lim_(lim), origin_(origin) {
    scopes_.emplace_back();
  }

  void define(const std::string& k, Value v) { scopes_.front()[k] = std::move(v); }

  void run(const Body& body, std::string& out) {
    for (auto& st : body) exec(*st, out);
  }

 private:
  const ChatTemplateLimits& lim_;
  const std::string& origin_;
  std::vector<std::map<std::string, Value>> scopes_;
  int64_t iterations_ = 0;

  template <class N>
  [[noreturn]] void fail(const N& at, const std::string& msg) const {
    throw ChatTemplateError(origin_ + " line " + std::to_string(at.line) + ", column " +
                                std::to_string(at.col) + ": " + msg,
                            false);
  }
  template <class N>
  void check_size(const N& at, size_t bytes) const {
    if (bytes > lim_.max_output_bytes)
      fail(at, "the template builds a string longer than the limit of " +
                   std::to_string(lim_.max_output_bytes) + " bytes");
  }
  template <class N>
  void count_items(const N& at, int64_t k) {
    iterations_ += k;
    if (iterations_ > lim_.max_loop_iterations)
      fail(at, "the template runs more than " + std::to_string(lim_.max_loop_iterations) +
                   " loop iterations or list items (the limit)");
  }

  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    if (in_list(kGlobals, name)) return Value::func(name);
    return Value::undef(name);
  }

  void append(const Stmt& at, std::string& out, const std::string& s) {
    check_size(at, out.size() + s.size());
    out += s;
  }

  void exec(const Stmt& st, std::string& out) {
    switch (st.t) {
      case Stmt::T::text:
        append(st, out, st.text);
        return;
      case Stmt::T::output:
        append(st, out, py_str(eval(*st.expr)));
        return;
      case Stmt::T::if_:
        for (auto& [cond, body] : st.branches)
          if (truthy(eval(*cond))) {
            run(body, out);
            return;
          }
        run(st.else_body, out);
        return;
      case Stmt::T::for_:
        exec_for(st, out);
        return;
      case Stmt::T::set: {
        Value v = eval(*st.expr);
        if (st.targets.size() == 2) {
          Value ns = lookup(st.targets[0]);
          if (ns.k != Value::K::ns)
            fail(st, "'{% set " + st.targets[0] + "." + st.targets[1] + " %}': '" + st.targets[0] +
                         "' is " + kind_name(ns) + ", not a namespace()");
          for (auto& [k, x] : *ns.d)
            if (k == st.targets[1]) {
              x = std::move(v);
              return;
            }
          ns.d->emplace_back(st.targets[1], std::move(v));
          return;
        }
        scopes_.back()[st.targets[0]] = std::move(v);
        return;
      }
      case Stmt::T::set_block: {
        std::string s;
        run(st.body, s);
        scopes_.back()[st.targets[0]] = Value::str(std::move(s));
        return;
      }
      case Stmt::T::brk:
        throw BreakSignal{};
      case Stmt::T::cont:
        throw ContinueSignal{};
    }
  }

  List items_of(const Value& v, const Stmt& at) {
    switch (v.k) {
      case Value::K::list:
      case Value::K::tuple:
        return *v.l;
      case Value::K::dict: {
        List keys;
        for (auto& [k, x] : *v.d) keys.push_back(Value::str(k));
        return keys;
      }
      case Value::K::string: {
        List chars;
        auto o = cp_offsets(v.s);
        for (size_t i = 0; i + 1 < o.size(); ++i)
          chars.push_back(Value::str(v.s.substr(o[i], o[i + 1] - o[i])));
        return chars;
      }
      case Value::K::undef:
        return {};
      default:
        fail(at, std::string("cannot loop over ") + kind_name(v));
    }
  }

  void assign_targets(const Stmt& st, const Value& item) {
    auto& sc = scopes_.back();
    if (st.targets.size() == 1) {
      sc[st.targets[0]] = item;
      return;
    }
    if (!item.is_seq() || item.l->size() != st.targets.size())
      fail(st, "cannot unpack " + std::string(kind_name(item)) + " into " +
                   std::to_string(st.targets.size()) + " loop variables");
    for (size_t i = 0; i < st.targets.size(); ++i) sc[st.targets[i]] = (*item.l)[i];
  }

  void exec_for(const Stmt& st, std::string& out) {
    List all = items_of(eval(*st.expr), st);
    if (st.filter) {  // `for x in xs if cond`: the loop sees only the items that pass
      List kept;
      for (auto& it : all) {
        count_items(st, 1);
        scopes_.emplace_back();
        assign_targets(st, it);
        const bool keep = truthy(eval(*st.filter));
        scopes_.pop_back();
        if (keep) kept.push_back(it);
      }
      all = std::move(kept);
    }
    if (all.empty()) {
      run(st.else_body, out);
      return;
    }
    const int64_t n = static_cast<int64_t>(all.size());
    for (int64_t i = 0; i < n; ++i) {
      count_items(st, 1);
      scopes_.emplace_back();
      Dict loop = {
          {"index", Value::integer(i + 1)},
          {"index0", Value::integer(i)},
          {"revindex", Value::integer(n - i)},
          {"revindex0", Value::integer(n - i - 1)},
          {"first", Value::boolean(i == 0)},
          {"last", Value::boolean(i == n - 1)},
          {"length", Value::integer(n)},
          {"previtem", i > 0 ? all[static_cast<size_t>(i - 1)] : Value::undef("previtem")},
          {"nextitem", i + 1 < n ? all[static_cast<size_t>(i + 1)] : Value::undef("nextitem")}};
      scopes_.back()["loop"] = Value::dict(std::move(loop));
      assign_targets(st, all[static_cast<size_t>(i)]);
      bool stop = false;
      try {
        run(st.body, out);
      } catch (const BreakSignal&) {
        stop = true;
      } catch (const ContinueSignal&) {
      }
      scopes_.pop_back();
      if (stop) break;
    }
  }

  // ---- expressions ----

  Value eval(const Expr& e) {
    switch (e.t) {
      case Expr::T::constant:
        return e.value;
      case Expr::T::name:
        return lookup(e.name);
      case Expr::T::list:
      case Expr::T::tuple: {
        count_items(e, static_cast<int64_t>(e.args.size()));
        List l;
        for (auto& a : e.args) l.push_back(eval(*a));
        return Value::list(std::move(l), e.t == Expr::T::list ? Value::K::list : Value::K::tuple);
      }
      case Expr::T::dict: {
        Dict d;
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k]);
          if (key.k != Value::K::string) fail(e, "dict keys must be strings here");
          Value v = eval(*e.args[k + 1]);
          bool found = false;
          for (auto& [kk, vv] : d)
            if (kk == key.s) {
              vv = v;
              found = true;
            }
          if (!found) d.emplace_back(key.s, std::move(v));
        }
        return Value::dict(std::move(d));
      }
      case Expr::T::attr:
        return get_attr(eval(*e.args[0]), e.name, e);
      case Expr::T::index:
        return get_item(eval(*e.args[0]), eval(*e.args[1]), e);
      case Expr::T::slice:
        return slice(e);
      case Expr::T::call:
        return call(e);
      case Expr::T::filter:
        return filter(e);
      case Expr::T::test: {
        const bool r = test(e);
        return Value::boolean(e.negated ? !r : r);
      }
      case Expr::T::neg:
      case Expr::T::pos: {
        Value v = eval(*e.args[0]);
        if (!v.is_num()) fail(e, std::string("unary '-' or '+' on ") + kind_name(v));
        if (e.t == Expr::T::pos) return v.k == Value::K::boolean ? Value::integer(v.b) : v;
        if (v.k == Value::K::number) return Value::number(-v.f);
        if (v.as_int() == INT64_MIN) fail(e, "integer overflow");
        return Value::integer(-v.as_int());
      }
      case Expr::T::binop:
        return binop(e);
      case Expr::T::concat: {
        std::string s;
        for (auto& a : e.args) {
          s += py_str(eval(*a));
          check_size(e, s.size());
        }
        return Value::str(std::move(s));
      }
      case Expr::T::compare: {
        Value left = eval(*e.args[0]);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k + 1]);
          if (!compare(e.ops[k], left, right, e)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case Expr::T::and_: {
        Value l = eval(*e.args[0]);
        return truthy(l) ? eval(*e.args[1]) : l;
      }
      case Expr::T::or_: {
        Value l = eval(*e.args[0]);
        return truthy(l) ? l : eval(*e.args[1]);
      }
      case Expr::T::not_:
        return Value::boolean(!truthy(eval(*e.args[0])));
      case Expr::T::cond:
        if (truthy(eval(*e.args[1]))) return eval(*e.args[0]);
        return e.args.size() > 2 ? eval(*e.args[2]) : Value::undef();
    }
    fail(e, "internal error: unknown expression");
  }

  [[noreturn]] void undefined_error(const Value& v, const Expr& e) const {
    fail(e, v.s.empty() ? std::string("an undefined value is used here")
                        : "'" + v.s + "' is undefined");
  }

  Value get_attr(const Value& obj, const std::string& name, const Expr& e) {
    if (obj.is_undef()) undefined_error(obj, e);
    if (obj.is_map()) {
      if (const Value* v = obj.find(name)) return *v;
      return Value::undef();
    }
    return Value::undef();  // e.g. a string's attribute that is not a method call
  }

  static int64_t norm_index(int64_t i, int64_t n) { return i < 0 ? i + n : i; }

  Value get_item(const Value& obj, const Value& key, const Expr& e) {
    if (obj.is_undef()) undefined_error(obj, e);
    if (obj.is_map()) {
      if (key.k == Value::K::string)
        if (const Value* v = obj.find(key.s)) return *v;
      return Value::undef();
    }
    if ((obj.is_seq() || obj.k == Value::K::string) &&
        (key.k == Value::K::integer || key.k == Value::K::boolean)) {
      if (obj.is_seq()) {
        const int64_t n = static_cast<int64_t>(obj.l->size());
        const int64_t i = norm_index(key.as_int(), n);
        if (i < 0 || i >= n) return Value::undef();
        return (*obj.l)[static_cast<size_t>(i)];
      }
      auto o = cp_offsets(obj.s);
      const int64_t n = static_cast<int64_t>(o.size()) - 1;
      const int64_t i = norm_index(key.as_int(), n);
      if (i < 0 || i >= n) return Value::undef();
      return Value::str(obj.s.substr(o[static_cast<size_t>(i)],
                                     o[static_cast<size_t>(i) + 1] - o[static_cast<size_t>(i)]));
    }
    return Value::undef();
  }

  Value slice(const Expr& e) {
    Value obj = eval(*e.args[0]);
    if (obj.is_undef()) undefined_error(obj, e);
    auto bound = [&](const ExprP& p, bool* given) -> int64_t {
      *given = false;
      if (!p) return 0;
      Value v = eval(*p);
      if (v.k == Value::K::none) return 0;
      if (v.k != Value::K::integer && v.k != Value::K::boolean)
        fail(e, std::string("slice indices must be integers, got ") + kind_name(v));
      *given = true;
      return v.as_int();
    };
    bool has_start = false, has_stop = false, has_step = false;
    int64_t start = bound(e.args[1], &has_start), stop = bound(e.args[2], &has_stop),
            step = bound(e.args[3], &has_step);
    if (!has_step) step = 1;
    if (step == 0) fail(e, "slice step cannot be zero");
    std::vector<size_t> offs;
    int64_t n = 0;
    if (obj.is_seq()) {
      n = static_cast<int64_t>(obj.l->size());
    } else if (obj.k == Value::K::string) {
      offs = cp_offsets(obj.s);
      n = static_cast<int64_t>(offs.size()) - 1;
    } else {
      fail(e, std::string("cannot slice ") + kind_name(obj));
    }
    // Python's slice.indices()
    auto clamp = [&](int64_t v, bool given, int64_t def) {
      if (!given) return def;
      if (v < 0) v += n;
      if (step > 0) return std::clamp<int64_t>(v, 0, n);
      return std::clamp<int64_t>(v, -1, n - 1);
    };
    start = clamp(start, has_start, step > 0 ? 0 : n - 1);
    stop = clamp(stop, has_stop, step > 0 ? n : -1);
    std::vector<int64_t> idx;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) idx.push_back(i);
    count_items(e, static_cast<int64_t>(idx.size()));
    if (obj.is_seq()) {
      List l;
      for (int64_t i : idx) l.push_back((*obj.l)[static_cast<size_t>(i)]);
      return Value::list(std::move(l), obj.k);
    }
    std::string s;
    for (int64_t i : idx)
      s.append(obj.s, offs[static_cast<size_t>(i)],
               offs[static_cast<size_t>(i) + 1] - offs[static_cast<size_t>(i)]);
    return Value::str(std::move(s));
  }

  Value binop(const Expr& e) {
    Value a = eval(*e.args[0]), b = eval(*e.args[1]);
    const std::string& op = e.name;
    if (a.is_undef()) undefined_error(a, e);
    if (b.is_undef()) undefined_error(b, e);
    if (op == "+") {
      if (a.k == Value::K::string && b.k == Value::K::string) {
        check_size(e, a.s.size() + b.s.size());
        return Value::str(a.s + b.s);
      }
      if (a.is_seq() && b.is_seq() && a.k == b.k) {
        count_items(e, static_cast<int64_t>(a.l->size() + b.l->size()));
        List l = *a.l;
        l.insert(l.end(), b.l->begin(), b.l->end());
        return Value::list(std::move(l), a.k);
      }
    }
    if (op == "*" && ((a.k == Value::K::string && b.is_num() && b.k != Value::K::number) ||
                      (b.k == Value::K::string && a.is_num() && a.k != Value::K::number))) {
      const std::string& s = a.k == Value::K::string ? a.s : b.s;
      const int64_t k = a.k == Value::K::string ? b.as_int() : a.as_int();
      if (k <= 0 || s.empty()) return Value::str("");
      if (static_cast<uint64_t>(k) > lim_.max_output_bytes / s.size())
        check_size(e, lim_.max_output_bytes + 1);
      std::string r;
      for (int64_t i = 0; i < k; ++i) r += s;
      return Value::str(std::move(r));
    }
    if (!a.is_num() || !b.is_num())
      fail(e,
           "unsupported operand types for '" + op + "': " + kind_name(a) + " and " + kind_name(b));
    const bool flt = a.k == Value::K::number || b.k == Value::K::number;
    if (op == "/") {
      if (b.as_double() == 0) fail(e, "division by zero");
      return Value::number(a.as_double() / b.as_double());
    }
    if (flt) {
      const double x = a.as_double(), y = b.as_double();
      if (op == "+") return Value::number(x + y);
      if (op == "-") return Value::number(x - y);
      if (op == "*") return Value::number(x * y);
      if (op == "**") return Value::number(std::pow(x, y));
      if (y == 0) fail(e, "division by zero");
      if (op == "//") return Value::number(std::floor(x / y));
      if (op == "%") {
        double m = std::fmod(x, y);
        if (m != 0 && ((m < 0) != (y < 0))) m += y;
        return Value::number(m);
      }
    }
    const int64_t x = a.as_int(), y = b.as_int();
    int64_t r = 0;
    if (op == "+") {
      if (__builtin_add_overflow(x, y, &r)) fail(e, "integer overflow");
      return Value::integer(r);
    }
    if (op == "-") {
      if (__builtin_sub_overflow(x, y, &r)) fail(e, "integer overflow");
      return Value::integer(r);
    }
    if (op == "*") {
      if (__builtin_mul_overflow(x, y, &r)) fail(e, "integer overflow");
      return Value::integer(r);
    }
    if (op == "**") {
      if (y < 0) return Value::number(std::pow(static_cast<double>(x), static_cast<double>(y)));
      r = 1;
      for (int64_t k = 0; k < y; ++k)
        if (__builtin_mul_overflow(r, x, &r)) fail(e, "integer overflow");
      return Value::integer(r);
    }
    if (y == 0) fail(e, "integer division or modulo by zero");
    if (x == INT64_MIN && y == -1) fail(e, "integer overflow");
    int64_t q = x / y, m = x % y;
    if (m != 0 && ((m < 0) != (y < 0))) {
      q -= 1;
      m += y;
    }
    return Value::integer(op == "//" ? q : m);
  }

  bool contains(const Value& hay, const Value& needle, const Expr& e) {
    switch (hay.k) {
      case Value::K::string:
        if (needle.k != Value::K::string)
          fail(e, std::string("'in <string>' requires a string on the left, got ") +
                      kind_name(needle));
        return hay.s.find(needle.s) != std::string::npos;
      case Value::K::list:
      case Value::K::tuple:
        for (auto& x : *hay.l)
          if (equal(x, needle)) return true;
        return false;
      case Value::K::dict:
        return needle.k == Value::K::string && hay.find(needle.s) != nullptr;
      case Value::K::undef:
        return false;
      default:
        fail(e,
             std::string("'in' needs a string, list or dict on the right, got ") + kind_name(hay));
    }
  }

  int order(const Value& a, const Value& b, const Expr& e) {
    if (a.is_num() && b.is_num()) {
      if (a.k == Value::K::number || b.k == Value::K::number) {
        const double x = a.as_double(), y = b.as_double();
        return x < y ? -1 : x > y ? 1 : 0;
      }
      return a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
    }
    if (a.k == Value::K::string && b.k == Value::K::string)
      return a.s.compare(b.s) < 0 ? -1 : a.s == b.s ? 0 : 1;
    if (a.is_seq() && b.is_seq() && a.k == b.k) {
      for (size_t i = 0; i < std::min(a.l->size(), b.l->size()); ++i) {
        if (equal((*a.l)[i], (*b.l)[i])) continue;
        return order((*a.l)[i], (*b.l)[i], e);
      }
      return a.l->size() < b.l->size() ? -1 : a.l->size() > b.l->size() ? 1 : 0;
    }
    fail(e, std::string("cannot order ") + kind_name(a) + " and " + kind_name(b));
  }

  bool compare(const std::string& op, const Value& a, const Value& b, const Expr& e) {
    if (op == "==") return equal(a, b);
    if (op == "!=") return !equal(a, b);
    if (op == "in") return contains(b, a, e);
    if (op == "notin") return !contains(b, a, e);
    const int c = order(a, b, e);
    if (op == "<") return c < 0;
    if (op == ">") return c > 0;
    if (op == "<=") return c <= 0;
    return c >= 0;
  }

  // positional args after the callee / target (args[1..]) and keyword args, evaluated
  struct Args {
    List pos;
    std::vector<std::pair<std::string, Value>> kw;
    const Value* get(size_t i, const char* name) const {
      if (i < pos.size()) return &pos[i];
      for (auto& [k, v] : kw)
        if (k == name) return &v;
      return nullptr;
    }
  };
  Args eval_args(const Expr& e) {
    Args a;
    for (size_t k = 1; k < e.args.size(); ++k) a.pos.push_back(eval(*e.args[k]));
    for (auto& [k, v] : e.kwargs) a.kw.emplace_back(k, eval(*v));
    return a;
  }
  void check_arity(const Expr& e, const Args& a, size_t max_pos, const std::string& what,
                   std::initializer_list<const char*> kw = {}) {
    if (a.pos.size() > max_pos)
      fail(e, what + " takes at most " + std::to_string(max_pos) + " positional arguments");
    for (auto& kv : a.kw) {
      const std::string& k = kv.first;
      if (std::find_if(kw.begin(), kw.end(), [&](const char* x) { return k == x; }) == kw.end())
        fail(e, what + " has no keyword argument '" + k + "'");
    }
  }
  const std::string& want_str(const Value* v, const Expr& e, const std::string& what) {
    if (!v || v->k != Value::K::string) fail(e, what + " needs a string argument");
    return v->s;
  }

  Value call(const Expr& e) {
    const Expr& callee = *e.args[0];
    Args a = eval_args(e);
    if (callee.t == Expr::T::name) {
      Value f = lookup(callee.name);
      if (f.k != Value::K::func) fail(e, "'" + callee.name + "' is not callable");
      return call_global(f.s, a, e);
    }
    // a method
    Value obj = eval(*callee.args[0]);
    if (obj.is_undef()) undefined_error(obj, e);
    const std::string& m = callee.name;
    const std::string what = "." + m + "()";
    if (obj.k == Value::K::string) {
      const std::string& s = obj.s;
      if (m == "strip" || m == "lstrip" || m == "rstrip") {
        check_arity(e, a, 1, what);
        const Value* chars = a.get(0, "chars");
        const std::string* cs = chars && chars->k == Value::K::string ? &chars->s : nullptr;
        if (chars && !cs && chars->k != Value::K::none) fail(e, what + " needs a string");
        return Value::str(py_strip(s, m != "rstrip", m != "lstrip", cs));
      }
      if (m == "upper" || m == "lower" || m == "title" || m == "capitalize") {
        check_arity(e, a, 0, what);
        return Value::str(py_case(s, m == "upper"   ? 'u'
                                     : m == "lower" ? 'l'
                                     : m == "title" ? 't'
                                                    : 'c'));
      }
      if (m == "startswith" || m == "endswith") {
        check_arity(e, a, 1, what);
        const Value* p = a.get(0, "prefix");
        List opts;
        if (p && p->is_seq())
          opts = *p->l;
        else if (p)
          opts.push_back(*p);
        for (auto& o : opts) {
          const std::string& x = want_str(&o, e, what);
          if (m == "startswith"
                  ? s.compare(0, x.size(), x) == 0 && s.size() >= x.size()
                  : s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0)
            return Value::boolean(true);
        }
        if (opts.empty()) fail(e, what + " needs an argument");
        return Value::boolean(false);
      }
      if (m == "split") {
        check_arity(e, a, 2, what, {"sep", "maxsplit"});
        const Value* sep = a.get(0, "sep");
        const Value* mx = a.get(1, "maxsplit");
        int64_t maxsplit = mx && mx->k == Value::K::integer ? mx->i : -1;
        List parts;
        if (!sep || sep->k == Value::K::none) {  // runs of whitespace
          auto o = cp_offsets(s);
          size_t ci = 0;
          auto space_at = [&](size_t i) {
            size_t n = 0;
            return py_space(decode_cp(s, o[i], &n));
          };
          const size_t ncp = o.size() - 1;
          while (ci < ncp) {
            while (ci < ncp && space_at(ci)) ++ci;
            if (ci >= ncp) break;
            if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
              size_t end = ncp;
              while (end > ci && space_at(end - 1)) --end;
              parts.push_back(Value::str(s.substr(o[ci], o[end] - o[ci])));
              break;
            }
            size_t b = ci;
            while (ci < ncp && !space_at(ci)) ++ci;
            parts.push_back(Value::str(s.substr(o[b], o[ci] - o[b])));
            count_items(e, 1);
          }
        } else {
          const std::string& x = want_str(sep, e, what);
          if (x.empty()) fail(e, ".split(): empty separator");
          size_t p = 0;
          while (true) {
            size_t q = s.find(x, p);
            if (q == std::string::npos ||
                (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit)) {
              parts.push_back(Value::str(s.substr(p)));
              break;
            }
            parts.push_back(Value::str(s.substr(p, q - p)));
            count_items(e, 1);
            p = q + x.size();
          }
        }
        return Value::list(std::move(parts));
      }
      if (m == "replace") {
        check_arity(e, a, 3, what);
        return Value::str(replace(s, want_str(a.get(0, "old"), e, what),
                                  want_str(a.get(1, "new"), e, what), a.get(2, "count"), e));
      }
      if (m == "find" || m == "count") {
        check_arity(e, a, 1, what);
        const std::string& x = want_str(a.get(0, "sub"), e, what);
        if (m == "find") {
          size_t q = s.find(x);
          if (q == std::string::npos) return Value::integer(-1);
          return Value::integer(static_cast<int64_t>(cp_offsets(s.substr(0, q)).size()) - 1);
        }
        if (x.empty()) return Value::integer(static_cast<int64_t>(cp_offsets(s).size()));
        int64_t c = 0;
        for (size_t q = s.find(x); q != std::string::npos; q = s.find(x, q + x.size())) ++c;
        return Value::integer(c);
      }
      if (m == "join") {
        check_arity(e, a, 1, what);
        const Value* it = a.get(0, "iterable");
        if (!it) fail(e, what + " needs an argument");
        return Value::str(join(items_of_expr(*it, e), s, e));
      }
    }
    if (obj.is_map() && obj.k == Value::K::dict) {
      if (m == "items" || m == "keys" || m == "values") {
        check_arity(e, a, 0, what);
        List l;
        count_items(e, static_cast<int64_t>(obj.d->size()));
        for (auto& [k, v] : *obj.d) {
          if (m == "items") l.push_back(Value::list({Value::str(k), v}, Value::K::tuple));
          if (m == "keys") l.push_back(Value::str(k));
          if (m == "values") l.push_back(v);
        }
        return Value::list(std::move(l));
      }
      if (m == "get") {
        check_arity(e, a, 2, what);
        const Value* k = a.get(0, "key");
        if (!k) fail(e, what + " needs a key");
        if (k->k == Value::K::string)
          if (const Value* v = obj.find(k->s)) return *v;
        const Value* def = a.get(1, "default");
        return def ? *def : Value::none();
      }
    }
    fail(e, std::string(kind_name(obj)) + " has no method " + what);
  }

  List items_of_expr(const Value& v, const Expr& e) {
    if (v.is_seq()) return *v.l;
    if (v.k == Value::K::string || v.k == Value::K::dict || v.k == Value::K::undef) {
      Stmt at;
      at.line = e.line;
      at.col = e.col;
      return items_of(v, at);
    }
    fail(e, std::string("expected a sequence, got ") + kind_name(v));
  }

  std::string join(const List& items, const std::string& sep, const Expr& e) {
    std::string out;
    for (size_t i = 0; i < items.size(); ++i) {
      if (i) out += sep;
      out += py_str(items[i]);
      check_size(e, out.size());
    }
    return out;
  }

  std::string replace(const std::string& s, const std::string& from, const std::string& to,
                      const Value* count, const Expr& e) {
    int64_t limit = count && count->k == Value::K::integer ? count->i : -1;
    std::string out;
    if (from.empty()) {  // Python inserts `to` between every code point (and at both ends)
      auto o = cp_offsets(s);
      int64_t done = 0;
      for (size_t i = 0; i + 1 < o.size(); ++i) {
        if (limit < 0 || done < limit) {
          out += to;
          ++done;
        }
        out.append(s, o[i], o[i + 1] - o[i]);
        check_size(e, out.size());
      }
      if (limit < 0 || done < limit) out += to;
      return out;
    }
    size_t p = 0;
    int64_t done = 0;
    while (true) {
      size_t q = s.find(from, p);
      if (q == std::string::npos || (limit >= 0 && done >= limit)) break;
      out.append(s, p, q - p);
      out += to;
      check_size(e, out.size());
      ++done;
      p = q + from.size();
    }
    out.append(s, p, std::string::npos);
    check_size(e, out.size());
    return out;
  }

  Value call_global(const std::string& name, const Args& a, const Expr& e) {
    if (name == "raise_exception") {
      const Value* m = a.get(0, "message");
      throw ChatTemplateError(m ? py_str(*m) : std::string("the chat template raised an error"),
                              true);
    }
    if (name == "namespace") {
      Dict d;
      for (auto& p : a.pos) {
        if (p.k != Value::K::dict) fail(e, "namespace() takes a dict or keyword arguments");
        for (auto& kv : *p.d) d.push_back(kv);
      }
      for (auto& kv : a.kw) d.push_back(kv);
      return Value::dict(std::move(d), Value::K::ns);
    }
    if (name == "range") {
      if (a.pos.empty() || a.pos.size() > 3 || !a.kw.empty())
        fail(e, "range() takes 1 to 3 integer arguments");
      for (auto& p : a.pos)
        if (p.k != Value::K::integer && p.k != Value::K::boolean)
          fail(e, std::string("range() arguments must be integers, got ") + kind_name(p));
      int64_t start = 0, stop = 0, step = 1;
      if (a.pos.size() == 1) {
        stop = a.pos[0].as_int();
      } else {
        start = a.pos[0].as_int();
        stop = a.pos[1].as_int();
        if (a.pos.size() == 3) step = a.pos[2].as_int();
      }
      if (step == 0) fail(e, "range() step must not be zero");
      List l;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        count_items(e, 1);
        l.push_back(Value::integer(i));
        if ((step > 0 && i > INT64_MAX - step) || (step < 0 && i < INT64_MIN - step)) break;
      }
      return Value::list(std::move(l));
    }
    if (name == "strftime_now") {
      const Value* f = a.get(0, "format");
      const std::string& fmt = want_str(f, e, "strftime_now()");
      if (fmt.size() > 256) fail(e, "strftime_now(): the format is too long");
      std::time_t t = std::time(nullptr);
      std::tm tm{};
      localtime_r(&t, &tm);
      char buf[1024];
      const size_t n = std::strftime(buf, sizeof buf, fmt.c_str(), &tm);
      return Value::str(std::string(buf, n));
    }
    fail(e, "unknown function '" + name + "'");
  }

  Value filter(const Expr& e) {
    const std::string& f = e.name;
    Value v = eval(*e.args[0]);
    Args a = eval_args(e);
    const std::string what = "the filter '" + f + "'";
    if (f == "default" || f == "d") {
      check_arity(e, a, 2, what, {"default_value", "boolean"});
      const Value* def = a.get(0, "default_value");
      const Value* boolean = a.get(1, "boolean");
      const bool use = v.is_undef() || (boolean && truthy(*boolean) && !truthy(v));
      if (use) return def ? *def : Value::str("");
      return v;
    }
    if (f == "safe" || f == "string") {
      check_arity(e, a, 0, what);
      if (f == "safe") return v;
      return Value::str(py_str(v));
    }
    if (f == "length" || f == "count") {
      check_arity(e, a, 0, what);
      switch (v.k) {
        case Value::K::undef:
          return Value::integer(0);
        case Value::K::string:
          return Value::integer(static_cast<int64_t>(cp_offsets(v.s).size()) - 1);
        case Value::K::list:
        case Value::K::tuple:
          return Value::integer(static_cast<int64_t>(v.l->size()));
        case Value::K::dict:
          return Value::integer(static_cast<int64_t>(v.d->size()));
        default:
          fail(e, std::string("the filter 'length' on ") + kind_name(v));
      }
    }
    if (f == "tojson") {
      check_arity(e, a, 1, what, {"indent", "ensure_ascii", "separators", "sort_keys"});
      for (auto& [k, x] : a.kw)
        if (k != "indent" && !(k == "ensure_ascii" && x.k == Value::K::boolean && !x.b) &&
            !(k == "sort_keys" && x.k == Value::K::boolean && !x.b))
          fail(e, "tojson(" + k + "=...) is not supported");
      const Value* ind = a.get(0, "indent");
      int indent = -1;
      if (ind && ind->k != Value::K::none) {
        if (ind->k != Value::K::integer || ind->i < 0 || ind->i > 16)
          fail(e, "tojson(indent=...) must be an integer in [0, 16]");
        indent = static_cast<int>(ind->i);
      }
      std::string out;
      to_json(v, indent, 0, out, origin_ + " line " + std::to_string(e.line));
      check_size(e, out.size());
      return Value::str(std::move(out));
    }
    if (v.is_undef() && f != "list" && f != "join" && f != "first" && f != "last" && f != "map" &&
        f != "selectattr" && f != "rejectattr" && f != "select" && f != "reject" &&
        f != "reverse" && f != "items" && f != "trim" && f != "upper" && f != "lower" &&
        f != "capitalize" && f != "title")
      undefined_error(v, e);
    if (f == "trim" || f == "upper" || f == "lower" || f == "capitalize" || f == "title") {
      check_arity(e, a, f == "trim" ? 1 : 0, what, {"chars"});
      const std::string s = py_str(v);
      if (f == "trim") {
        const Value* chars = a.get(0, "chars");
        return Value::str(
            py_strip(s, true, true, chars && chars->k == Value::K::string ? &chars->s : nullptr));
      }
      return Value::str(py_case(s, f == "upper"        ? 'u'
                                   : f == "lower"      ? 'l'
                                   : f == "capitalize" ? 'c'
                                                       : 't'));
    }
    if (f == "int") {
      check_arity(e, a, 1, what, {"default"});
      const Value* def = a.get(0, "default");
      if (v.k == Value::K::integer) return v;
      if (v.k == Value::K::boolean) return Value::integer(v.b);
      if (v.k == Value::K::number && std::isfinite(v.f) && std::fabs(v.f) < 9e18)
        return Value::integer(static_cast<int64_t>(v.f));
      if (v.k == Value::K::string) {
        std::string t = py_strip(v.s, true, true);
        int64_t r = 0;
        auto res = std::from_chars(t.data(), t.data() + t.size(), r);
        if (res.ec == std::errc() && res.ptr == t.data() + t.size() && !t.empty())
          return Value::integer(r);
      }
      return def ? *def : Value::integer(0);
    }
    if (f == "float") {
      check_arity(e, a, 1, what, {"default"});
      const Value* def = a.get(0, "default");
      if (v.is_num()) return Value::number(v.as_double());
      if (v.k == Value::K::string) {
        std::string t = py_strip(v.s, true, true);
        char* end = nullptr;
        double r = std::strtod(t.c_str(), &end);
        if (!t.empty() && end == t.c_str() + t.size()) return Value::number(r);
      }
      return def ? *def : Value::number(0);
    }
    if (f == "abs") {
      check_arity(e, a, 0, what);
      if (v.k == Value::K::number) return Value::number(std::fabs(v.f));
      if (v.is_num()) {
        if (v.as_int() == INT64_MIN) fail(e, "integer overflow");
        return Value::integer(std::llabs(v.as_int()));
      }
      fail(e, std::string("abs of ") + kind_name(v));
    }
    if (f == "round") {
      check_arity(e, a, 2, what, {"precision", "method"});
      const Value* pr = a.get(0, "precision");
      const Value* me = a.get(1, "method");
      if (!v.is_num()) fail(e, std::string("round of ") + kind_name(v));
      const int64_t prec = pr && pr->k == Value::K::integer ? pr->i : 0;
      if (prec < 0 || prec > 15) fail(e, "round(precision) must be in [0, 15]");
      const std::string method = me && me->k == Value::K::string ? me->s : "common";
      const double scale = std::pow(10.0, static_cast<double>(prec));
      const double x = v.as_double() * scale;
      double r = method == "floor"  ? std::floor(x)
                 : method == "ceil" ? std::ceil(x)
                                    : std::round(x);
      if (method != "common" && method != "floor" && method != "ceil")
        fail(e, "round(method) must be common, floor or ceil");
      return Value::number(r / scale);
    }
    if (f == "replace") {
      check_arity(e, a, 3, what);
      const std::string s = py_str(v);
      return Value::str(replace(s, py_str(*ensure(a.get(0, "old"), e, what)),
                                py_str(*ensure(a.get(1, "new"), e, what)), a.get(2, "count"), e));
    }
    // filters over sequences
    List items = items_of_expr(v, e);
    if (f == "list") {
      check_arity(e, a, 0, what);
      count_items(e, static_cast<int64_t>(items.size()));
      return Value::list(std::move(items));
    }
    if (f == "first" || f == "last") {
      check_arity(e, a, 0, what);
      if (items.empty()) return Value::undef();
      return f == "first" ? items.front() : items.back();
    }
    if (f == "reverse") {
      check_arity(e, a, 0, what);
      if (v.k == Value::K::string) {
        std::string s;
        for (auto it = items.rbegin(); it != items.rend(); ++it) s += it->s;
        return Value::str(std::move(s));
      }
      std::reverse(items.begin(), items.end());
      return Value::list(std::move(items));
    }
    if (f == "items") {
      check_arity(e, a, 0, what);
      if (v.is_undef()) return Value::list({});
      if (v.k != Value::K::dict) fail(e, std::string("the filter 'items' on ") + kind_name(v));
      List l;
      for (auto& [k, x] : *v.d) l.push_back(Value::list({Value::str(k), x}, Value::K::tuple));
      return Value::list(std::move(l));
    }
    if (f == "join") {
      check_arity(e, a, 2, what, {"d", "attribute"});
      const Value* sep = a.get(0, "d");
      const Value* attr = a.get(1, "attribute");
      if (attr) {
        for (auto& it : items) it = attribute(it, *attr, e);
      }
      return Value::str(join(items, sep ? py_str(*sep) : std::string(), e));
    }
    if (f == "map") {
      check_arity(e, a, 0, what, {"attribute", "default"});
      const Value* attr = a.get(0, "attribute");
      if (!attr) fail(e, "map() is supported with attribute=... only");
      const Value* def = a.get(1, "default");
      List l;
      for (auto& it : items) {
        Value x = attribute(it, *attr, e);
        l.push_back(x.is_undef() && def ? *def : x);
      }
      return Value::list(std::move(l));
    }
    if (f == "selectattr" || f == "rejectattr" || f == "select" || f == "reject") {
      const bool by_attr = f == "selectattr" || f == "rejectattr";
      const bool keep_if = f == "selectattr" || f == "select";
      if (by_attr && a.pos.empty()) fail(e, what + " needs an attribute name");
      const size_t t0 = by_attr ? 1 : 0;
      List l;
      for (auto& it : items) {
        Value x = by_attr ? attribute(it, a.pos[0], e) : it;
        bool r;
        if (a.pos.size() <= t0) {
          r = truthy(x);
        } else {
          if (a.pos[t0].k != Value::K::string) fail(e, what + ": the test name must be a string");
          List targs(a.pos.begin() + static_cast<std::ptrdiff_t>(t0) + 1, a.pos.end());
          r = apply_test(a.pos[t0].s, x, targs, e);
        }
        if (r == keep_if) l.push_back(it);
      }
      return Value::list(std::move(l));
    }
    fail(e, "unsupported filter '" + f + "'");
  }

  const Value* ensure(const Value* v, const Expr& e, const std::string& what) {
    if (!v) fail(e, what + ": a required argument is missing");
    return v;
  }

  // item.attr (a dotted path "a.b" as Jinja's attribute= allows)
  Value attribute(const Value& item, const Value& path, const Expr& e) {
    if (path.k == Value::K::integer) return get_item(item, path, e);
    if (path.k != Value::K::string) fail(e, "attribute= must be a string");
    Value cur = item;
    size_t p = 0;
    while (true) {
      size_t q = path.s.find('.', p);
      std::string part = path.s.substr(p, q == std::string::npos ? std::string::npos : q - p);
      if (cur.is_undef()) return cur;
      cur = get_item(cur, Value::str(part), e);
      if (q == std::string::npos) return cur;
      p = q + 1;
    }
  }

  bool test(const Expr& e) {
    const Expr& target = *e.args[0];
    Value v = eval(target);
    Args a = eval_args(e);
    if (!a.kw.empty()) fail(e, "tests take positional arguments only");
    return apply_test(e.name, v, a.pos, e);
  }

  bool apply_test(const std::string& t, const Value& v, const List& args, const Expr& e) {
    auto need = [&](size_t k) {
      if (args.size() != k)
        fail(e, "the test '" + t + "' takes " + std::to_string(k) + " argument(s)");
    };
    if (t == "defined" || t == "undefined") {
      need(0);
      return (t == "defined") != v.is_undef();
    }
    if (t == "none") return need(0), v.k == Value::K::none;
    if (t == "string") return need(0), v.k == Value::K::string;
    if (t == "boolean") return need(0), v.k == Value::K::boolean;
    if (t == "true") return need(0), v.k == Value::K::boolean && v.b;
    if (t == "false") return need(0), v.k == Value::K::boolean && !v.b;
    if (t == "number") return need(0), v.is_num();
    if (t == "integer") return need(0), v.k == Value::K::integer;
    if (t == "float") return need(0), v.k == Value::K::number;
    if (t == "mapping") return need(0), v.k == Value::K::dict;
    if (t == "iterable")
      return need(0), v.is_seq() || v.k == Value::K::string || v.k == Value::K::dict;
    if (t == "sequence")
      return need(0), v.is_seq() || v.k == Value::K::string || v.k == Value::K::dict;
    if (t == "even" || t == "odd") {
      need(0);
      if (v.k != Value::K::integer && v.k != Value::K::boolean)
        fail(e, "the test '" + t + "' needs an integer");
      const bool even = v.as_int() % 2 == 0;
      return t == "even" ? even : !even;
    }
    if (t == "divisibleby") {
      need(1);
      if (!v.is_num() || !args[0].is_num() || v.k == Value::K::number ||
          args[0].k == Value::K::number || args[0].as_int() == 0)
        fail(e, "the test 'divisibleby' needs non-zero integers");
      return v.as_int() % args[0].as_int() == 0;
    }
    need(1);
    const std::string op = t == "eq" || t == "equalto" || t == "==" ? "=="
                           : t == "ne" || t == "!="                 ? "!="
                           : t == "lt" || t == "<"                  ? "<"
                           : t == "le" || t == "<="                 ? "<="
                           : t == "gt" || t == ">"                  ? ">"
                           : t == "ge" || t == ">="                 ? ">="
                           : t == "in"                              ? "in"
                                                                    : "";
    if (op.empty()) fail(e, "unsupported test '" + t + "'");
    return compare(op, v, args[0], e);
  }
};

}  // namespace

struct ChatTemplate::Impl {
  std::string origin;
  ChatTemplateLimits limits;
  Body body;
};

ChatTemplate::ChatTemplate(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;
ChatTemplate::~ChatTemplate() = default;

ChatTemplate ChatTemplate::parse(std::string_view source, const std::string& origin,
                                 ChatTemplateLimits limits) {
  MAMBA_CHECK(source.size() <= limits.max_output_bytes, origin, ": the template is ", source.size(),
              " bytes, over the limit of ", limits.max_output_bytes);
  Source src(source, origin);
  auto impl = std::make_unique<Impl>();
  impl->origin = origin;
  impl->limits = limits;
  Parser p(src, lex(src), limits.max_depth);
  impl->body = p.parse_all();
  return ChatTemplate(std::move(impl));
}

std::string ChatTemplate::render(const nlohmann::ordered_json& vars) const {
  MAMBA_CHECK(vars.is_object(), "ChatTemplate::render: the variables must be a JSON object");
  Renderer r(impl_->limits, impl_->origin);
  for (auto& [k, v] : vars.items()) r.define(k, from_json(v));
  std::string out;
  try {
    r.run(impl_->body, out);
  } catch (const BreakSignal&) {
    throw ChatTemplateError(impl_->origin + ": '{% break %}' outside a for loop", false);
  } catch (const ContinueSignal&) {
    throw ChatTemplateError(impl_->origin + ": '{% continue %}' outside a for loop", false);
  }
  return out;
}

namespace {
std::string special_token_text(const ojson& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return {};
}
}  // namespace

std::optional<ChatTemplateSource> find_chat_template(const std::string& model_dir) {
  if (model_dir.empty()) return std::nullopt;
  ChatTemplateSource out;
  const std::string cfg_path = model_dir + "/tokenizer_config.json";
  ojson cfg = ojson::object();
  if (os::exists(cfg_path)) {
    try {
      cfg = ojson::parse(os::read_file(cfg_path, 64 << 20));
    } catch (const ojson::exception& e) {
      throw Error(cfg_path + ": not valid JSON: " + e.what());
    }
    MAMBA_CHECK(cfg.is_object(), cfg_path, ": must be a JSON object");
    for (const char* k : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                          "cls_token", "mask_token"})
      if (cfg.contains(k)) {
        const std::string t = special_token_text(cfg[k]);
        if (!t.empty()) out.special_tokens[k] = t;
      }
    if (cfg.contains("additional_special_tokens") && cfg["additional_special_tokens"].is_array()) {
      ojson extra = ojson::array();
      for (auto& t : cfg["additional_special_tokens"]) {
        const std::string s = special_token_text(t);
        if (!s.empty()) extra.push_back(s);
      }
      out.special_tokens["additional_special_tokens"] = extra;
    }
  }
  const std::string jinja = model_dir + "/chat_template.jinja";
  if (os::exists(jinja)) {
    const std::vector<uint8_t> bytes = os::read_file(jinja, 16 << 20);
    out.source.assign(bytes.begin(), bytes.end());
    out.origin = jinja;
    return out;
  }
  if (!cfg.contains("chat_template") || cfg["chat_template"].is_null()) return std::nullopt;
  const ojson& t = cfg["chat_template"];
  if (t.is_string()) {
    out.source = t.get<std::string>();
    out.origin = cfg_path + " chat_template";
    return out;
  }
  if (t.is_array()) {
    std::string names;
    for (auto& e : t) {
      MAMBA_CHECK(e.is_object() && e.contains("name") && e["name"].is_string() &&
                      e.contains("template") && e["template"].is_string(),
                  cfg_path,
                  ": chat_template list entries must be {\"name\": string, "
                  "\"template\": string}");
      if (e["name"] == "default") {
        out.source = e["template"].get<std::string>();
        out.origin = cfg_path + " chat_template 'default'";
        return out;
      }
      names += (names.empty() ? "" : ", ") + e["name"].get<std::string>();
    }
    throw Error(cfg_path + ": chat_template is a list of named templates (" + names +
                ") with none named 'default'");
  }
  throw Error(cfg_path + ": chat_template must be a string or a list of {name, template}");
}

}  // namespace mamba::serve
