// mamba::Error — the one exception type the library throws on bad input.
// Messages name the tensor or key, the expected and the actual value.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace mamba {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// str(a, b, c) concatenates anything that has operator<<.
template <class... Args>
std::string str(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

}  // namespace mamba

// MAMBA_CHECK(cond, parts...) throws mamba::Error(str(parts...)) when cond is false.
#define MAMBA_CHECK(cond, ...)                                    \
  do {                                                            \
    if (!(cond)) throw ::mamba::Error(::mamba::str(__VA_ARGS__)); \
  } while (0)
