// Measured machine limits (see roofline.h). Highway kernels follow src/ops/act.cpp's dispatch
// pattern; the threads come from parallel_for, one contiguous range per thread.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "core/roofline.cpp"
#include "core/roofline.h"

#include <hwy/aligned_allocator.h>
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <vector>

#include "mamba/error.h"
#include "mamba/parallel.h"

HWY_BEFORE_NAMESPACE();
namespace mamba {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// `iters` rounds of 16 independent FMA chains on registers; returns a value derived from all of
// them so the compiler cannot drop the work. Flops = iters * 16 * lanes * 2.
float FmaChains(int64_t iters, float seed) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  constexpr int kC = 16;
  V acc[kC];
  for (int c = 0; c < kC; ++c) acc[c] = hn::Set(d, seed + 0.001f * static_cast<float>(c));
  const V m = hn::Set(d, 0.999999f), a = hn::Set(d, 1e-7f);
  for (int64_t i = 0; i < iters; ++i)
    for (int c = 0; c < kC; ++c) acc[c] = hn::MulAdd(acc[c], m, a);
  V s = acc[0];
  for (int c = 1; c < kC; ++c) s = hn::Add(s, acc[c]);
  return hn::GetLane(hn::SumOfLanes(d, s));
}

int64_t FloatLanes() { return static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>())); }

// Sum of n floats (n a multiple of 4 vectors; the caller hands aligned ranges) with 4 vector
// accumulators: one read of every byte.
float SumFloats(const float* p, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t NL = static_cast<int64_t>(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d), s2 = hn::Zero(d), s3 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 4 * NL <= n; i += 4 * NL) {
    s0 = hn::Add(s0, hn::Load(d, p + i));
    s1 = hn::Add(s1, hn::Load(d, p + i + NL));
    s2 = hn::Add(s2, hn::Load(d, p + i + 2 * NL));
    s3 = hn::Add(s3, hn::Load(d, p + i + 3 * NL));
  }
  float t = hn::GetLane(hn::SumOfLanes(d, hn::Add(hn::Add(s0, s1), hn::Add(s2, s3))));
  for (; i < n; ++i) t += p[i];
  return t;
}

}  // namespace HWY_NAMESPACE
}  // namespace mamba
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace mamba {
HWY_EXPORT(FmaChains);
HWY_EXPORT(FloatLanes);
HWY_EXPORT(SumFloats);

namespace {
double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
std::atomic<float> g_sink{0.f};  // keeps the measured work observable

// Runs work(t) on every thread t = 0..T-1 at once, `reps` times; the shortest wall time (the
// results go to g_sink so the work cannot be dropped).
template <class F>
double best_parallel_seconds(int64_t T, int reps, F&& work) {
  double best = 1e300;
  for (int r = 0; r < reps; ++r) {
    std::vector<float> out(static_cast<size_t>(T));
    const double t0 = now_s();
    parallel_for(T, 1, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) out[static_cast<size_t>(t)] = work(t);
    });
    best = std::min(best, now_s() - t0);
    for (float v : out) g_sink = g_sink + v;
  }
  return best;
}
}  // namespace

double measure_fma_gflops(double seconds, int reps) {
  MAMBA_CHECK(seconds > 0 && reps > 0, "measure_fma_gflops: seconds and reps must be > 0");
  const int64_t T = std::max(1, num_threads());
  const int64_t lanes = HWY_DYNAMIC_DISPATCH(FloatLanes)();
  // Calibrate: iterations per thread for about `seconds` on one thread.
  int64_t iters = 1 << 16;
  for (;;) {
    const double t0 = now_s();
    g_sink = g_sink + HWY_DYNAMIC_DISPATCH(FmaChains)(iters, 1.f);
    if (now_s() - t0 > seconds / 8 || iters > (int64_t{1} << 40)) break;
    iters *= 2;
  }
  iters *= 8;
  const double dt = best_parallel_seconds(T, reps, [&](int64_t t) {
    return HWY_DYNAMIC_DISPATCH(FmaChains)(iters, 1.f + static_cast<float>(t));
  });
  return static_cast<double>(T) * iters * 16 * lanes * 2 / dt / 1e9;
}

double measure_read_gbs(int64_t mib, int reps) {
  MAMBA_CHECK(mib > 0 && reps > 0, "measure_read_gbs: mib and reps must be > 0");
  const int64_t n = mib * (int64_t{1} << 20) / 4;
  auto buf = hwy::AllocateAligned<float>(static_cast<size_t>(n));
  MAMBA_CHECK(buf != nullptr, "measure_read_gbs: cannot allocate ", mib, " MiB");
  const int64_t T = std::max(1, num_threads());
  const int64_t per = (n / T) / 64 * 64;          // whole cache lines per thread, 64-byte aligned
  parallel_for(T, 1, [&](int64_t b, int64_t e) {  // each thread touches its own pages first
    for (int64_t t = b; t < e; ++t)
      std::fill(buf.get() + t * per, buf.get() + (t + 1) * per, 1.f / static_cast<float>(t + 1));
  });
  const double dt = best_parallel_seconds(T, reps, [&](int64_t t) {
    return HWY_DYNAMIC_DISPATCH(SumFloats)(buf.get() + t * per, per);
  });
  return static_cast<double>(T * per) * 4 / dt / 1e9;
}

}  // namespace mamba
#endif  // HWY_ONCE
