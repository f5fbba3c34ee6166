// SIMD is done with Highway: each kernel file is compiled once per target (SSE4, AVX2,
// AVX-512, NEON, SVE, ...) via hwy/foreach_target.h, and the best target the running CPU
// supports is chosen at run time (HWY_DYNAMIC_DISPATCH). src/ops/act.cpp is the pattern; the
// vector math kernels share (exp, sigmoid, softplus, silu and their derivatives, one NaN rule)
// is defined once, in the per-target header src/ops/simd_math-inl.h. Tests run the kernels on
// every compiled target (hwy::SupportedAndGeneratedTargets, hwy/tests/hwy_gtest.h).
#pragma once

namespace mamba {
const char* simd_target_name();  // the target dynamic dispatch picks on this machine
}
