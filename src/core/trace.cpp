#include "mamba/trace.h"

#include <iostream>
#include <string>

namespace mamba::trace {
namespace {
bool g_enabled = false;
std::ostream* g_stream = nullptr;
thread_local std::string g_prefix;
}  // namespace

bool enabled() { return g_enabled; }
void set_enabled(bool on) { g_enabled = on; }
void set_stream(std::ostream* os) { g_stream = os; }

void op(std::string_view name, std::initializer_list<Shape> in, std::initializer_list<Shape> out) {
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
