#include "mamba/trace.h"

#include <cctype>
#include <chrono>
#include <iostream>
#include <string>
#include <unordered_map>

namespace mamba::trace {
namespace {
bool g_enabled = false;  // printing
bool g_profile = false;
std::ostream* g_stream = nullptr;
thread_local std::string g_prefix;

using Clock = std::chrono::steady_clock;
struct Profile {
  Clock::time_point last = Clock::now();
  std::vector<ProfileEntry> rows;
  std::unordered_map<std::string, size_t> index;
};
thread_local Profile g_prof;

// "layers.12.mixer." + "in_proj" -> "layers.*.mixer.in_proj": a dot-separated component made of
// digits only becomes "*".
std::string profile_key(std::string_view prefix, std::string_view name) {
  std::string key;
  key.reserve(prefix.size() + name.size());
  size_t i = 0;
  while (i < prefix.size()) {
    size_t j = prefix.find('.', i);
    if (j == std::string_view::npos) j = prefix.size();
    const std::string_view part = prefix.substr(i, j - i);
    bool digits = !part.empty();
    for (char c : part) digits = digits && std::isdigit(static_cast<unsigned char>(c));
    key += digits ? std::string_view("*") : part;
    if (j < prefix.size()) key += '.';
    i = j + 1;
  }
  key += name;
  return key;
}

void profile_add(std::string_view name) {
  const Clock::time_point now = Clock::now();
  const double dt = std::chrono::duration<double>(now - g_prof.last).count();
  g_prof.last = now;
  std::string key = profile_key(g_prefix, name);
  auto it = g_prof.index.find(key);
  if (it == g_prof.index.end()) {
    it = g_prof.index.emplace(key, g_prof.rows.size()).first;
    g_prof.rows.push_back(ProfileEntry{std::move(key), 0.0, 0});
  }
  ProfileEntry& e = g_prof.rows[it->second];
  e.seconds += dt;
  e.calls += 1;
}
}  // namespace

bool enabled() { return g_enabled || g_profile; }
void set_enabled(bool on) { g_enabled = on; }
bool printing() { return g_enabled; }
void set_stream(std::ostream* os) { g_stream = os; }

void set_profile(bool on) {
  g_profile = on;
  g_prof.last = Clock::now();
}
bool profiling() { return g_profile; }
void profile_mark() { g_prof.last = Clock::now(); }
std::vector<ProfileEntry> profile_take() {
  std::vector<ProfileEntry> rows = std::move(g_prof.rows);
  g_prof.rows.clear();
  g_prof.index.clear();
  return rows;
}

void op(std::string_view name, std::initializer_list<Shape> in, std::initializer_list<Shape> out) {
  if (g_profile) profile_add(name);
  if (!g_enabled) return;
  std::string line = g_prefix + std::string(name) + " ";
  bool first = true;
  for (const Shape& s : in) line += (first ? "" : ", ") + shape_str(s), first = false;
  line += " -> ";
  first = true;
  for (const Shape& s : out) line += (first ? "" : ", ") + shape_str(s), first = false;
  std::ostream& os = g_stream ? *g_stream : std::cerr;
  os << line << '\n';
}

Scope::Scope(std::string_view prefix) : old_len_(g_prefix.size()) { g_prefix += prefix; }
Scope::~Scope() { g_prefix.resize(old_len_); }

}  // namespace mamba::trace
