// Benchmark of the Mamba-1 selective scan: fast Highway kernel vs the naive reference, forward
// and backward, at the mamba-130m layer shape by default (B=1, D=1536, N=16, L=2048; var B/C,
// z, D, delta_bias, softplus). Prints one JSON line per (op, impl). The reference is timed
// once (it is slow) in the same run as the baseline; the fast kernel is the median of --reps.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <string>
#include <vector>

#include "mamba/parallel.h"
#include "mamba/rng.h"
#include "ops/selective_scan.h"
#include "ops/simd.h"

using namespace mamba;
using namespace mamba::ops;

namespace {

struct Opts {
  int threads = 0;  // 0: leave as is (OMP_NUM_THREADS or all cores)
  int64_t B = 1, L = 2048, D = 1536, N = 16;
  int reps = 5;
  bool ref = true;
};

void usage(const char* prog) {
  std::printf(
      "usage: %s [--threads n] [--B n] [--L n] [--D n] [--N n] [--reps n] [--no-ref]\n"
      "  Times selective_scan_fwd/bwd (fast) against selective_scan_ref/bwd_ref (naive, timed "
      "once)\n"
      "  at (B, L, D, N) = (1, 2048, 1536, 16) by default: var B/C, z, D, delta_bias, softplus.\n"
      "  Prints JSON lines {op, impl, shape, threads, ms, elems_per_s, speedup_vs_ref}, elems = "
      "B*L*D*N.\n"
      "  Also one decode step (selective_state_update, L=1) at the same B, D, N, ms per step.\n",
      prog);
}

double now_ms() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// CPU time of the whole process (all threads), ms.
double cpu_ms() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

// The 1-minute load average: on a shared machine, wall times above ~1 per core are inflated.
double load_avg() {
  std::ifstream f("/proc/loadavg");
  double l = -1;
  f >> l;
  return l;
}

struct Timing {
  double ms = 0, ms_min = 0, cpu_ms = 0;  // wall median, wall min, CPU (all threads) median
};

template <class F>
Timing time_once(F&& f) {
  double t0 = now_ms(), c0 = cpu_ms();
  f();
  double t = now_ms() - t0;
  return {t, t, cpu_ms() - c0};
}

template <class F>
Timing time_median(int reps, F&& f) {
  std::vector<double> w, c;
  f();  // warm-up
  for (int i = 0; i < reps; ++i) {
    Timing t = time_once(f);
    w.push_back(t.ms);
    c.push_back(t.cpu_ms);
  }
  std::sort(w.begin(), w.end());
  std::sort(c.begin(), c.end());
  return {w[w.size() / 2], w[0], c[c.size() / 2]};
}

void print(const char* op, const char* impl, const Opts& o, Timing t, double ref_ms) {
  const double elems = static_cast<double>(o.B) * o.L * o.D * o.N;
  std::printf(
      "{\"op\":\"%s\",\"impl\":\"%s\",\"shape\":{\"B\":%lld,\"L\":%lld,\"D\":%lld,\"N\":%lld},"
      "\"threads\":%d,\"simd\":\"%s\",\"ms\":%.3f,\"ms_min\":%.3f,\"cpu_ms\":%.3f,"
      "\"elems_per_s\":%.4g",
      op, impl, (long long)o.B, (long long)o.L, (long long)o.D, (long long)o.N, num_threads(),
      simd_target_name(), t.ms, t.ms_min, t.cpu_ms, elems / (t.ms * 1e-3));
  if (ref_ms > 0) std::printf(",\"speedup_vs_ref\":%.2f", ref_ms / t.ms);
  std::printf(",\"load_avg\":%.2f}\n", load_avg());
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  Opts o;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> long long {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      char* end = nullptr;
      long long v = std::strtoll(argv[++i], &end, 10);
      if (!end || *end || v < 0) {
        std::fprintf(stderr, "%s: bad value '%s'\n", a.c_str(), argv[i]);
        std::exit(2);
      }
      return v;
    };
    if (a == "--help" || a == "-h") {
      usage(argv[0]);
      return 0;
    } else if (a == "--threads") {
      o.threads = static_cast<int>(next());
    } else if (a == "--B") {
      o.B = next();
    } else if (a == "--L") {
      o.L = next();
    } else if (a == "--D") {
      o.D = next();
    } else if (a == "--N") {
      o.N = next();
    } else if (a == "--reps") {
      o.reps = std::max<int>(1, static_cast<int>(next()));
    } else if (a == "--no-ref") {
      o.ref = false;
    } else {
      std::fprintf(stderr, "unknown option %s\n", a.c_str());
      usage(argv[0]);
      return 2;
    }
  }
  if (o.threads > 0) set_num_threads(o.threads);

  Rng rng(0);
  ScanArgs a;
  auto randn = [&](Shape s, double sd) {
    Tensor t(std::move(s));
    rng.fill_normal(t, 0, sd);
    return t;
  };
  a.u = randn({o.B, o.L, o.D}, 1.0);
  a.delta = randn({o.B, o.L, o.D}, 0.5);
  a.A = Tensor({o.D, o.N});
  for (int64_t d = 0; d < o.D; ++d)  // S4D-real init, as Mamba: A = -(n+1)
    for (int64_t n = 0; n < o.N; ++n) a.A[d * o.N + n] = -static_cast<float>(n + 1);
  a.B = randn({o.B, o.L, o.N}, 1.0);
  a.C = randn({o.B, o.L, o.N}, 1.0);
  a.D = randn({o.D}, 1.0);
  a.z = randn({o.B, o.L, o.D}, 1.0);
  a.delta_bias = randn({o.D}, 0.5);
  a.delta_softplus = true;
  Tensor dout = randn({o.B, o.L, o.D}, 1.0);

  double ref_fwd = 0, ref_bwd = 0;
  if (o.ref) {
    Timing t = time_once([&] { selective_scan_ref(a); });
    ref_fwd = t.ms;
    print("selective_scan_fwd", "ref", o, t, 0);
  }
  Tensor last;
  print("selective_scan_fwd", "fast", o, time_median(o.reps, [&] { selective_scan_fwd(a, &last); }),
        ref_fwd);
  if (o.ref) {
    Timing t = time_once([&] { selective_scan_bwd_ref(a, dout); });
    ref_bwd = t.ms;
    print("selective_scan_bwd", "ref", o, t, 0);
  }
  print("selective_scan_bwd", "fast", o, time_median(o.reps, [&] { selective_scan_bwd(a, dout); }),
        ref_bwd);

  // One decode step (selective_state_update) at the same B, D, N; elems = B*D*N, L = 1.
  Opts so = o;
  so.L = 1;
  Tensor state = randn({o.B, o.D, o.N}, 1.0), x = randn({o.B, o.D}, 1.0),
         dt = randn({o.B, o.D}, 0.5);
  Tensor Bs = randn({o.B, o.N}, 1.0), Cs = randn({o.B, o.N}, 1.0), zs = randn({o.B, o.D}, 1.0);
  const int step_reps = 200;
  auto steps = [&](auto&& fn) {
    Timing t = time_median(o.reps, [&] {
      for (int i = 0; i < step_reps; ++i) fn();
    });
    t.ms /= step_reps, t.ms_min /= step_reps, t.cpu_ms /= step_reps;
    return t;
  };
  double ref_step_ms = 0;
  if (o.ref) {
    Timing t = steps([&] {
      selective_state_update_ref(state, x, dt, a.A, Bs, Cs, a.D, zs, a.delta_bias, true);
    });
    ref_step_ms = t.ms;
    print("selective_state_update", "ref", so, t, 0);
  }
  Timing step = steps(
      [&] { selective_state_update(state, x, dt, a.A, Bs, Cs, a.D, zs, a.delta_bias, true); });
  print("selective_state_update", "fast", so, step, ref_step_ms);
  return 0;
}
