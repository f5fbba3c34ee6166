// See json_reader.h.
#include "core/json_reader.h"

#include <cmath>

#include "mamba/error.h"

namespace mamba::json_io {

namespace {

const char* const kInf = "__mamba_json_Infinity__";
const char* const kNegInf = "__mamba_json_-Infinity__";
const char* const kNaN = "__mamba_json_NaN__";

// Outside strings, Infinity / -Infinity / NaN become sentinel strings.
std::string replace_python_constants(const std::string& t) {
  std::string out;
  out.reserve(t.size());
  bool in_str = false;
  for (size_t i = 0; i < t.size(); ++i) {
    char c = t[i];
    if (in_str) {
      out += c;
      if (c == '\\' && i + 1 < t.size())
        out += t[++i];
      else if (c == '"')
        in_str = false;
      continue;
    }
    if (c == '"') {
      in_str = true;
      out += c;
    } else if (t.compare(i, 8, "Infinity") == 0) {
      out += str('"', kInf, '"'), i += 7;
    } else if (t.compare(i, 9, "-Infinity") == 0) {
      out += str('"', kNegInf, '"'), i += 8;
    } else if (t.compare(i, 3, "NaN") == 0) {
      out += str('"', kNaN, '"'), i += 2;
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace

namespace {

struct TooDeep {};

template <class J>
J parse_limited(const char* begin, const char* end, int max_depth) {
  typename J::parser_callback_t cb = [max_depth](int depth, typename J::parse_event_t, J&) {
    if (depth > max_depth) throw TooDeep{};
    return true;
  };
  try {
    return J::parse(begin, end, cb);
  } catch (const TooDeep&) {
    throw Error(str("JSON nested deeper than ", max_depth, " levels"));
  }
}

template <class J>
J parse_python(const std::string& text, const std::string& origin) {
  const std::string t = replace_python_constants(text);
  try {
    return parse_limited<J>(t.data(), t.data() + t.size(), kMaxJsonDepth);
  } catch (const Error& e) {
    throw Error(str(origin, ": ", e.what()));
  } catch (const typename J::exception& e) {
    throw Error(str(origin, ": not valid JSON: ", e.what()));
  }
}

}  // namespace

json parse_depth_limited(const char* begin, const char* end, int max_depth) {
  return parse_limited<json>(begin, end, max_depth);
}
ojson parse_depth_limited_ordered(const char* begin, const char* end, int max_depth) {
  return parse_limited<ojson>(begin, end, max_depth);
}

json parse_python_json(const std::string& text, const std::string& origin) {
  return parse_python<json>(text, origin);
}

ojson parse_python_ojson(const std::string& text, const std::string& origin) {
  return parse_python<ojson>(text, origin);
}

std::string dump_python_json(const ojson& j, int indent) {
  std::string out = j.dump(indent);
  for (auto [from, to] : {std::pair<std::string, std::string>{str('"', kInf, '"'), "Infinity"},
                          {str('"', kNegInf, '"'), "-Infinity"}})
    for (size_t p; (p = out.find(from)) != std::string::npos;) out.replace(p, from.size(), to);
  return out;
}

ojson number(double v) {
  if (std::isinf(v)) return v > 0 ? kInf : kNegInf;
  if (v == std::floor(v) && std::fabs(v) < 9e15) return static_cast<int64_t>(v);
  return v;
}

KeyReader::KeyReader(const json& j, std::string prefix) : j_(j), prefix_(std::move(prefix)) {
  MAMBA_CHECK(j_.is_object(), "'",
              prefix_.empty() ? "config" : prefix_.substr(0, prefix_.size() - 1),
              "' must be a JSON object, got ", j_.type_name());
}

bool KeyReader::has(const std::string& k) const { return j_.contains(k) && !j_.at(k).is_null(); }

const json& KeyReader::raw(const std::string& k) {
  used_.insert(k);
  return j_.at(k);
}

int64_t KeyReader::integer(const std::string& k, int64_t def) {
  used_.insert(k);
  if (!has(k)) return def;
  const json& v = j_.at(k);
  if (v.is_number_float()) {
    double d = v.get<double>();
    MAMBA_CHECK(std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15, "'", name(k),
                "' must be an integer, got ", v.dump());
    return static_cast<int64_t>(d);
  }
  MAMBA_CHECK(v.is_number_integer(), "'", name(k), "' must be an integer, got ", v.dump());
  MAMBA_CHECK(v.is_number_unsigned() || v.get<int64_t>() > INT64_MIN, "'", name(k),
              "' is out of range");
  MAMBA_CHECK(!v.is_number_unsigned() || v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX), "'",
              name(k), "' is out of range");
  return v.get<int64_t>();
}

double KeyReader::number(const std::string& k, double def) {
  used_.insert(k);
  if (!has(k)) return def;
  return to_number(j_.at(k), name(k));
}

double KeyReader::to_number(const json& v, const std::string& what) {
  if (v.is_string() && v.get<std::string>() == kInf) return INFINITY;
  if (v.is_string() && v.get<std::string>() == kNegInf) return -INFINITY;
  MAMBA_CHECK(v.is_number(), "'", what, "' must be a number, got ", v.dump());
  return v.get<double>();
}

bool KeyReader::boolean(const std::string& k, bool def) {
  used_.insert(k);
  if (!has(k)) return def;
  const json& v = j_.at(k);
  MAMBA_CHECK(v.is_boolean(), "'", name(k), "' must be true or false, got ", v.dump());
  return v.get<bool>();
}

std::string KeyReader::string(const std::string& k, const std::string& def) {
  used_.insert(k);
  if (!has(k)) return def;
  const json& v = j_.at(k);
  MAMBA_CHECK(v.is_string(), "'", name(k), "' must be a string, got ", v.dump());
  return v.get<std::string>();
}

std::pair<double, double> KeyReader::pair(const std::string& k, std::pair<double, double> def) {
  used_.insert(k);
  if (!has(k)) return def;
  const json& v = j_.at(k);
  MAMBA_CHECK(v.is_array() && v.size() == 2, "'", name(k), "' must be a list of two numbers, got ",
              v.dump());
  return {to_number(v[0], name(k)), to_number(v[1], name(k))};
}

void KeyReader::ignore(std::initializer_list<const char*> keys) {
  for (const char* k : keys) used_.insert(k);
}

std::set<std::string> KeyReader::unused() const {
  std::set<std::string> out;
  for (auto it = j_.begin(); it != j_.end(); ++it)
    if (!used_.count(it.key())) out.insert(it.key());
  return out;
}

void KeyReader::finish(const std::string& context) const {
  for (auto it = j_.begin(); it != j_.end(); ++it)
    MAMBA_CHECK(used_.count(it.key()), "unknown key '", name(it.key()), "' in ", context);
}

void check_range(int64_t v, int64_t lo, int64_t hi, const std::string& key) {
  MAMBA_CHECK(v >= lo && v <= hi, "'", key, "' = ", v, " is out of range [", lo, ", ", hi, "]");
}

}  // namespace mamba::json_io
