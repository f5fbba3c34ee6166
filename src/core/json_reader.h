// Reading and writing the JSON of config files (config.json's keys, ssm_cfg, attn_cfg): a KeyReader
// records which keys were consumed, so any key left over is reported by name as unknown, and every
// value is type- and range-checked with the key in the message. Python's json module writes
// Infinity / -Infinity / NaN, which standard JSON lacks: parse_python_json / dump_python_json map
// them. Private to the library (nlohmann::json is not part of the public API).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>

namespace mamba::json_io {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

// The deepest nesting any reader accepts. The files we read nest a few levels; a hostile one with
// hundreds of thousands would overflow the stack in nlohmann::json's recursive copies, dumps and
// destructors, so parsing stops at this depth with a mamba::Error instead.
constexpr int kMaxJsonDepth = 256;
// nlohmann's parse of [begin, end) with the nesting limited to max_depth: deeper input throws
// mamba::Error("JSON nested deeper than N levels") before anything deeper is built; syntax errors
// propagate as nlohmann's exceptions, for the caller to word.
json parse_depth_limited(const char* begin, const char* end, int max_depth = kMaxJsonDepth);
ojson parse_depth_limited_ordered(const char* begin, const char* end,
                                  int max_depth = kMaxJsonDepth);
template <class Bytes>
json parse_depth_limited(const Bytes& b, int max_depth = kMaxJsonDepth) {
  const char* p = reinterpret_cast<const char*>(b.data());
  return parse_depth_limited(p, p + b.size(), max_depth);
}

// Parses text that may hold Python's Infinity / -Infinity / NaN outside strings. Throws
// mamba::Error prefixed with `origin` for invalid JSON.
json parse_python_json(const std::string& text, const std::string& origin);
ojson parse_python_ojson(const std::string& text, const std::string& origin);  // keeps key order
// dump(indent) with infinite numbers written as Python's Infinity / -Infinity.
std::string dump_python_json(const ojson& j, int indent);
// A number for writing: integral values as integers, infinities as the markers dump_python_json
// maps.
ojson number(double v);

class KeyReader {
 public:
  // prefix: the key path in messages, e.g. "ssm_cfg." ("" for the top level).
  KeyReader(const json& j, std::string prefix);
  bool has(const std::string& k) const;  // present and not null
  const json& raw(const std::string& k);
  std::string name(const std::string& k) const { return prefix_ + k; }
  int64_t integer(const std::string& k, int64_t def);
  double number(const std::string& k, double def);
  bool boolean(const std::string& k, bool def);
  std::string string(const std::string& k, const std::string& def);
  std::pair<double, double> pair(const std::string& k, std::pair<double, double> def);  // [lo, hi]
  void ignore(std::initializer_list<const char*> keys);
  // The keys not consumed so far.
  std::set<std::string> unused() const;
  // Throws for the first key nobody consumed: "unknown key 'prefix.k' in <context>".
  void finish(const std::string& context) const;
  static double to_number(const json& v, const std::string& what);

 private:
  const json& j_;
  std::string prefix_;
  std::set<std::string> used_;
};

// Throws "'key' = v is out of range [lo, hi]" unless lo <= v <= hi.
void check_range(int64_t v, int64_t lo, int64_t hi, const std::string& key);

}  // namespace mamba::json_io
