// SIMD is done with Highway: each kernel file is compiled once per target (SSE4, AVX2,
// AVX-512, NEON, SVE, ...) via hwy/foreach_target.h, and the best target the running CPU
// supports is chosen at run time (HWY_DYNAMIC_DISPATCH). src/ops/act.cpp is the pattern.
#pragma once

namespace mamba {
const char* simd_target_name();  // the target dynamic dispatch picks on this machine
}
