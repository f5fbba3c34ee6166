// The machine's two limits that prefill and decode speed are measured against (issue 19 item 5):
// the fp32 FMA peak (GFLOP/s) and the read bandwidth of main memory (GB/s), measured here, now,
// with the threads parallel_for uses. `mambacpp info --measure` prints them and
// scripts/bench-llamacpp.py divides a model's FLOPs and bytes per token by them.
#pragma once
#include <cstdint>

namespace mamba {

// fp32 multiply-adds per second x 2, on the widest SIMD target Highway dispatches to: every
// thread runs independent vector FMA chains (enough to cover the FMA latency) entirely in
// registers for about `seconds`; the best of `reps` timings. GFLOP/s.
double measure_fma_gflops(double seconds = 0.2, int reps = 3);

// Bytes read per second: every thread sums its contiguous share of a `mib` MiB buffer (filled
// beforehand, so its pages exist) with vector loads; the best of `reps` passes. GB/s (1e9 bytes).
double measure_read_gbs(int64_t mib = 512, int reps = 5);

}  // namespace mamba
