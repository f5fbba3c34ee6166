// A grow-only, vector-aligned scratch buffer, kept per thread across calls by the GEMM kernels
// (static thread_local AlignedBuffer<float> buf; float* p = buf.get(n);): it only reallocates
// when a call needs more than any call before it on that thread.
#pragma once
#include <hwy/aligned_allocator.h>

#include <cstddef>

namespace mamba::ops {

template <class T>
struct AlignedBuffer {
  hwy::AlignedFreeUniquePtr<T[]> p;
  size_t n = 0;
  T* get(size_t want) {
    if (want > n) {
      p = hwy::AllocateAligned<T>(want);
      n = want;
    }
    return p.get();
  }
};

}  // namespace mamba::ops
