// Shape trace: when enabled, layers print every op they run with its input and output
// shapes, in order, e.g. "in_proj (2,32,16) -> (2,32,128)". Off by default; zero cost then.
//
// Op profile (`mambacpp bench --profile`): the same calls, timed instead of printed. While the
// profile is on, each traced op is charged the wall time from the end of the previous traced op
// of the same thread (or from the last profile_mark()) to its own call, under its name with the
// layer index taken out ("layers.3.mixer.in_proj" -> "layers.*.mixer.in_proj"). The layers
// call op() right after each op's work, so that time is the op's, plus any untraced glue before
// it. Tables are per thread (the thread that runs the layers, not the workers of its parallel
// regions).
#pragma once
#include <cstdint>
#include <initializer_list>
#include <iosfwd>
#include <string>
#include <string_view>
#include <vector>

#include "mamba/tensor.h"

namespace mamba::trace {

// Whether ops are traced at all: printing (set_enabled) or profiling (set_profile).
bool enabled();
void set_enabled(bool on);  // print shapes
// Whether shapes are printed (set_enabled(true)); a path that fuses several ops and traces them
// coarsely may run while only the profile is on.
bool printing();
void set_stream(std::ostream* os);  // default std::cerr
// Prints "<prefix><name> in0, in1 -> out0, out1" (shapes only) when enabled.
void op(std::string_view name, std::initializer_list<Shape> in, std::initializer_list<Shape> out);
// The op profile (see above). set_profile(true) also restarts this thread's clock.
void set_profile(bool on);
bool profiling();
// Restarts this thread's clock: the time until the next traced op is charged to nothing.
void profile_mark();
struct ProfileEntry {
  std::string op;      // name with layer indices as "*"
  double seconds = 0;  // wall time charged to it
  int64_t calls = 0;
};
// This thread's table, in the order ops were first seen, and clears it.
std::vector<ProfileEntry> profile_take();

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
