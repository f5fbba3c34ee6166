// Shape trace: when enabled, layers print every op they run with its input and output
// shapes, in order, e.g. "in_proj (2,32,16) -> (2,32,128)". Off by default; zero cost then.
#pragma once
#include <initializer_list>
#include <iosfwd>
#include <string_view>

#include "mamba/tensor.h"

namespace mamba::trace {

bool enabled();
void set_enabled(bool on);
void set_stream(std::ostream* os);  // default std::cerr
// Prints "<prefix><name> in0, in1 -> out0, out1" (shapes only) when enabled.
void op(std::string_view name, std::initializer_list<Shape> in, std::initializer_list<Shape> out);
// Scoped name prefix for nested modules: "layers.3.mixer." ...
class Scope {
 public:
  explicit Scope(std::string_view prefix);
  ~Scope();
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  size_t old_len_;
};

}  // namespace mamba::trace
