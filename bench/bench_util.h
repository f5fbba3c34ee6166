// Shared helpers for the benchmark programs: timing, median, JSON lines, argv options.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "core/os.h"

namespace mamba::bench {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Runs fn `reps` times (after one warm-up unless reps == 1) and returns the median seconds.
template <class F>
double median_seconds(int reps, F&& fn) {
  if (reps > 1) fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    double t0 = now_s();
    fn();
    t.push_back(now_s() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Tiny argv parser: --name value; --help prints `usage` and exits. Constructing it also sets
// the allocator policy mambacpp uses (os::keep_freed_memory), so that repetitions measure the
// kernels, not page faults of buffers freed by the previous repetition.
class Args {
 public:
  Args(int argc, char** argv, const char* usage) {
    mamba::os::keep_freed_memory();
    for (int i = 1; i < argc; ++i) {
      if (!std::strcmp(argv[i], "--help") || !std::strcmp(argv[i], "-h")) {
        std::printf("%s", usage);
        std::exit(0);
      }
      if (std::strncmp(argv[i], "--", 2) != 0 || i + 1 >= argc) {
        std::fprintf(stderr, "bad argument '%s' (see --help)\n", argv[i]);
        std::exit(2);
      }
      kv_.emplace_back(argv[i] + 2, argv[i + 1]);
      ++i;
    }
  }
  std::string get_str(const char* name, const std::string& def) const {
    for (auto& [k, v] : kv_)
      if (k == name) return v;
    return def;
  }
  long get(const char* name, long def) const {
    for (auto& [k, v] : kv_)
      if (k == name) return std::strtol(v.c_str(), nullptr, 10);
    return def;
  }

 private:
  std::vector<std::pair<std::string, std::string>> kv_;
};

}  // namespace mamba::bench
