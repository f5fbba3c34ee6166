#include "mamba/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "core/os.h"
#include "mamba/parallel.h"

namespace mamba {

std::string shape_str(const Shape& s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ",";
    out += std::to_string(s[i]);
  }
  return out + ")";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    MAMBA_CHECK(d >= 0, "negative dimension in shape ", shape_str(s));
    MAMBA_CHECK(d == 0 || n <= INT64_MAX / d, "shape ", shape_str(s), " overflows");
    n *= d;
  }
  return n;
}

namespace {
constexpr size_t kAlign = 64;
// Allocations from this size on first check that the memory is there (os::check_memory: reading
// /proc/meminfo costs microseconds, nothing next to touching 64 MiB), so a hostile header or an
// oversized config fails with the bytes needed and available instead of an overcommitted buffer
// that the OOM killer ends later; one the allocator still refuses is a mamba::Error too, never
// std::bad_alloc.
constexpr size_t kCheckedBytes = size_t{64} << 20;
// Large tensors (>= 32 MiB; Linux) are mapped straight from the kernel on huge-page (2 MiB)
// boundaries with transparent huge pages requested (madvise: the setting Debian ships), and
// unmapped when freed. glibc serves them with fresh 4 KiB pages on every call (32 MiB is the
// most its adaptive mmap threshold reaches), one page fault per 4 KiB on first touch: a Mamba
// layer's forward + backward at B 4, L 2048, d_model 768 took 374,080 faults and 2.5x the time
// from Python. Smaller tensors stay with malloc, which reuses freed memory without any fault
// (mapping them too halved an LM's one-shot prefill at 512 tokens: fresh huge pages to zero for
// every 3-6 MiB activation). docs/PERFORMANCE.md, "Stop 23". Pages the kernel maps are zero, so
// zeros() of such a tensor skips its memset (`*zeroed` = true).
constexpr size_t kHugeBytes = size_t{2} << 20;
constexpr size_t kMapBytes = size_t{32} << 20;

// ---- the cache of freed storage ----
// Freed blocks of kCacheMin bytes and more are kept, up to a limit in bytes, and handed to the
// next tensor whose size they fit (at most 1/8 larger): the same shapes come back on every call
// of a layer, a training step or a benchmark repetition, and each fresh block costs one page
// fault per 4 KiB on first touch (glibc unmaps blocks >= 128 KiB on free unless the process opted
// into os::keep_freed_memory). A Mamba-1 layer's forward + backward from Python (d_model 768,
// B 4, L 1024) took ~49,000 faults per call without it (docs/PERFORMANCE.md, "Stop 25"). Oldest
// blocks go first when the limit is reached. Off in sanitizer builds: a reused block would hide
// a use after free from AddressSanitizer.
constexpr size_t kCacheMin = size_t{128} << 10;
#if defined(__SANITIZE_ADDRESS__)
#define MAMBA_TENSOR_CACHE_DEFAULT_OFF 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(memory_sanitizer)
#define MAMBA_TENSOR_CACHE_DEFAULT_OFF 1
#endif
#endif

uint64_t default_cache_limit() {
#if defined(MAMBA_TENSOR_CACHE_DEFAULT_OFF)
  return 0;
#else
  uint64_t lim = uint64_t{1} << 30;  // 1 GiB, at most 1/8 of the physical memory
#if defined(__linux__)
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0)
    lim = std::min(lim, static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) / 8);
#endif
  return lim;
#endif
}

// A block of storage: `bytes` is its capacity; `mapped` = from mmap (else operator new).
struct Block {
  void* p = nullptr;
  size_t bytes = 0;
  bool mapped = false;
};

void release_block(const Block& b) {
#if defined(__linux__)
  if (b.mapped) {
    ::munmap(b.p, b.bytes);
    return;
  }
#endif
  ::operator delete(b.p, std::align_val_t(kAlign));
}

class StorageCache {
 public:
  // A cached block of capacity in [bytes, bytes + bytes / 8] (the smallest), or p == nullptr.
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    size_t best = blocks_.size();
    for (size_t i = 0; i < blocks_.size(); ++i) {
      const size_t c = blocks_[i].bytes;
      if (c >= bytes && c - bytes <= bytes / 8 &&
          (best == blocks_.size() || c < blocks_[best].bytes))
        best = i;
    }
    if (best == blocks_.size()) return {};
    const Block b = blocks_[best];
    blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(best));
    held_ -= b.bytes;
    return b;
  }
  // Keeps b (evicting the oldest blocks to stay within the limit) or releases it.
  void give(const Block& b) {
    std::vector<Block> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (b.bytes > limit_) {
        out.push_back(b);
      } else {
        size_t drop = 0;
        while (held_ + b.bytes > limit_)
          held_ -= blocks_[drop].bytes, out.push_back(blocks_[drop++]);
        blocks_.erase(blocks_.begin(), blocks_.begin() + static_cast<std::ptrdiff_t>(drop));
        blocks_.push_back(b);
        held_ += b.bytes;
      }
    }
    for (const Block& o : out) release_block(o);  // outside the lock
  }
  void set_limit(uint64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      limit_ = bytes;
    }
    trim();
  }
  uint64_t limit() {
    std::lock_guard<std::mutex> lock(mu_);
    return limit_;
  }
  uint64_t held() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }
  // Releases the oldest blocks until at most `keep` bytes are held.
  void trim(uint64_t keep = UINT64_MAX) {
    std::vector<Block> out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      keep = std::min(keep, limit_);
      size_t drop = 0;
      while (held_ > keep) held_ -= blocks_[drop].bytes, out.push_back(blocks_[drop++]);
      blocks_.erase(blocks_.begin(), blocks_.begin() + static_cast<std::ptrdiff_t>(drop));
    }
    for (const Block& o : out) release_block(o);
  }

 private:
  std::mutex mu_;
  std::vector<Block> blocks_;  // oldest first
  uint64_t held_ = 0, limit_ = default_cache_limit();
};

// Never destroyed: tensors with static storage duration may be freed after main returns.
StorageCache& storage_cache() {
  static StorageCache* c = new StorageCache;
  return *c;
}

std::shared_ptr<float> own(const Block& b) {
  if (b.bytes < kCacheMin)
    return std::shared_ptr<float>(static_cast<float*>(b.p),
                                  [](float* q) { ::operator delete(q, std::align_val_t(kAlign)); });
  return std::shared_ptr<float>(static_cast<float*>(b.p), [b](float*) { storage_cache().give(b); });
}

std::shared_ptr<float> allocate(const Shape& shape, int64_t n, bool* zeroed = nullptr) {
  MAMBA_CHECK(static_cast<uint64_t>(n) <= (uint64_t{1} << 61), "tensor of shape ", shape_str(shape),
              " is too large to allocate");
  size_t bytes = static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(float);
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  if (zeroed) *zeroed = false;
  if (bytes >= kCacheMin) {
    const Block b = storage_cache().take(bytes);
    if (b.p) return own(b);
  }
  if (bytes >= kCheckedBytes) {
    // Memory the cache holds is counted as available; hand it back first if it is needed.
    const uint64_t held = storage_cache().held();
    if (held > 0) {
      const uint64_t avail = os::available_memory_bytes();
      if (avail != 0 && avail < bytes + held) storage_cache().trim(0);
    }
    os::check_memory(bytes, str("a tensor of shape ", shape_str(shape)));
  }
  auto oom = [&] {
    return Error(str("out of memory: a tensor of shape ", shape_str(shape), " needs ", bytes,
                     " bytes; ", os::available_memory_bytes(), " bytes are available"));
  };
#if defined(__linux__)
  if (bytes >= kMapBytes) {
    const size_t len = (bytes + 4095) / 4096 * 4096, mapped = len + kHugeBytes;
    void* base =
        ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) throw oom();
    // Keep [a, a + len) with `a` on a huge-page boundary; unmap the slack before and after.
    const uintptr_t b = reinterpret_cast<uintptr_t>(base);
    const uintptr_t a = (b + kHugeBytes - 1) / kHugeBytes * kHugeBytes;
    if (a > b) ::munmap(base, a - b);
    if (b + mapped > a + len) ::munmap(reinterpret_cast<void*>(a + len), b + mapped - (a + len));
    ::madvise(reinterpret_cast<void*>(a), len, MADV_HUGEPAGE);  // a hint: no error if refused
    if (zeroed) *zeroed = true;
    return own({reinterpret_cast<void*>(a), len, true});
  }
#endif
  void* p = nullptr;
  try {
    p = ::operator new(bytes, std::align_val_t(kAlign));
  } catch (const std::bad_alloc&) {
    throw oom();
  }
  return own({p, bytes, false});
}
}  // namespace

void os::set_tensor_cache_limit(uint64_t bytes) { storage_cache().set_limit(bytes); }
uint64_t os::tensor_cache_limit() { return storage_cache().limit(); }
uint64_t os::tensor_cache_bytes() { return storage_cache().held(); }
void os::clear_tensor_cache() { storage_cache().trim(0); }

Tensor Tensor::empty(Shape shape) {
  Tensor t;
  t.numel_ = shape_numel(shape);
  t.shape_ = std::move(shape);
  t.storage_ = allocate(t.shape_, t.numel_);
  return t;
}

Tensor::Tensor(Shape shape) {
  numel_ = shape_numel(shape);
  shape_ = std::move(shape);
  bool zeroed = false;
  storage_ = allocate(shape_, numel_, &zeroed);
  if (!zeroed) zero();
}

Tensor Tensor::full(Shape shape, float value) {
  Tensor t = empty(std::move(shape));
  t.fill(value);
  return t;
}

Tensor Tensor::from(Shape shape, const std::vector<float>& values) {
  Tensor t = empty(std::move(shape));
  MAMBA_CHECK(static_cast<int64_t>(values.size()) == t.numel_, "Tensor::from: ", values.size(),
              " values for shape ", t.shape_str());
  std::copy(values.begin(), values.end(), t.data());
  return t;
}

Tensor Tensor::wrap(float* ptr, Shape shape, std::function<void(float*)> deleter) {
  MAMBA_CHECK(ptr != nullptr, "Tensor::wrap: null pointer for shape ", mamba::shape_str(shape));
  Tensor t;
  t.numel_ = shape_numel(shape);
  t.shape_ = std::move(shape);
  if (deleter)
    t.storage_ = std::shared_ptr<float>(ptr, std::move(deleter));
  else
    t.storage_ = std::shared_ptr<float>(ptr, [](float*) {});
  return t;
}

void Tensor::throw_not_contiguous() const {
  if (!storage_) throw Error("access to an undefined tensor");
  throw Error(str("data() of a strided view ", shape_str(), " (rows of ", row_len_, " values, ",
                  row_stride_, " apart): call contiguous() or an op that takes strided views"));
}

float* Tensor::view_data() const {
  if (!storage_) [[unlikely]]
    throw Error("access to an undefined tensor");
  return storage_.get() + offset_;
}

int64_t Tensor::row_len() const {
  if (row_stride_) return row_len_;
  return shape_.empty() ? 1 : shape_.back();
}

namespace {
// Calls fn(offset in t's storage from view_data(), index of the first element, count) for each
// run of contiguous elements of t, in order; runs are at most `chunk` long when t is contiguous.
template <class Fn>
void for_each_run(const Tensor& t, int64_t chunk, Fn&& fn) {
  if (t.numel() == 0) return;
  if (t.is_contiguous()) {
    for (int64_t i = 0; i < t.numel(); i += chunk) fn(i, i, std::min(chunk, t.numel() - i));
    return;
  }
  const int64_t n = t.row_len(), ld = t.row_stride();
  for (int64_t r = 0; r < t.rows(); ++r)
    for (int64_t c = 0; c < n; c += chunk) fn(r * ld + c, r * n + c, std::min(chunk, n - c));
}
}  // namespace

int64_t Tensor::dim(int i) const {
  int n = ndim();
  int j = i < 0 ? i + n : i;
  MAMBA_CHECK(j >= 0 && j < n, "dim ", i, " out of range for shape ", shape_str());
  return shape_[j];
}

Tensor Tensor::reshape(Shape shape) const {
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      MAMBA_CHECK(infer < 0, "reshape: more than one -1 in ", mamba::shape_str(shape));
      infer = static_cast<int>(i);
    } else {
      MAMBA_CHECK(shape[i] >= 0, "reshape: bad shape ", mamba::shape_str(shape));
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    MAMBA_CHECK(known > 0 && numel_ % known == 0, "reshape: cannot view ", shape_str(), " as ",
                mamba::shape_str(shape));
    shape[infer] = numel_ / known;
  }
  MAMBA_CHECK(shape_numel(shape) == numel_, "reshape: cannot view ", shape_str(), " as ",
              mamba::shape_str(shape));
  if (row_stride_) {  // the rows must stay whole: a suffix of shape spans exactly one row
    int64_t suffix = 1;
    bool ok = suffix == row_len_;
    for (size_t i = shape.size(); i-- > 0 && !ok;) ok = (suffix *= shape[i]) == row_len_;
    MAMBA_CHECK(ok, "reshape: cannot view the strided view ", shape_str(), " (rows of ", row_len_,
                " values) as ", mamba::shape_str(shape), ": call contiguous() first");
  }
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::narrow(int64_t start, int64_t len) const {
  MAMBA_CHECK(ndim() >= 1, "narrow on a 0-d tensor");
  MAMBA_CHECK(start >= 0 && len >= 0 && start + len <= shape_[0], "narrow [", start, ", ",
              start + len, ") out of range for shape ", shape_str());
  int64_t inner = shape_[0] ? numel_ / shape_[0] : 0;
  Tensor t = *this;
  t.shape_[0] = len;
  t.numel_ = len * inner;
  if (!row_stride_) {
    t.offset_ += start * inner;
    return t;
  }
  MAMBA_CHECK(inner % row_len_ == 0, "narrow: dim 0 of the strided view ", shape_str(),
              " splits its rows of ", row_len_, " values");
  t.offset_ += start * (inner / row_len_) * row_stride_;
  if (t.rows() <= 1) t.row_stride_ = t.row_len_ = 0;  // one row: contiguous
  return t;
}

Tensor Tensor::cols(int64_t c0, int64_t n) const {
  check_defined(*this, "cols");
  MAMBA_CHECK(ndim() >= 1, "cols on a 0-d tensor");
  const int64_t W = shape_.back();
  MAMBA_CHECK(c0 >= 0 && n >= 0 && c0 + n <= W, "cols [", c0, ", ", c0 + n,
              ") out of range for shape ", shape_str());
  MAMBA_CHECK(row_len() == W, "cols: the last dimension of the strided view ", shape_str(),
              " is not its row (rows of ", row_len_, " values): call contiguous() first");
  if (c0 == 0 && n == W) return *this;
  Tensor t = *this;
  const int64_t R = rows();
  t.row_stride_ = row_stride();
  t.row_len_ = n;
  t.offset_ += c0;
  t.shape_.back() = n;
  t.numel_ = R * n;
  if (R <= 1 || n == 0) t.row_stride_ = t.row_len_ = 0;  // one row (or nothing): contiguous
  return t;
}

Tensor Tensor::contiguous() const {
  if (row_stride_ == 0) return *this;
  return clone();
}

Tensor Tensor::select(int64_t i) const {
  Tensor t = narrow(i, 1);
  t.shape_.erase(t.shape_.begin());
  return t;
}

Tensor Tensor::clone() const {
  if (!defined()) return Tensor();
  Tensor t = empty(shape_);
  t.copy_from(*this);
  return t;
}

void Tensor::zero() { fill(0.f); }

void Tensor::fill(float v) {
  if (!numel_) return;
  float* p = view_data();
  for_each_run(*this, numel_, [&](int64_t off, int64_t, int64_t n) {
    if (v == 0.f && !std::signbit(v))
      std::memset(p + off, 0, n * sizeof(float));
    else
      std::fill(p + off, p + off + n, v);
  });
}

void Tensor::copy_from(const Tensor& other) {
  MAMBA_CHECK(shape_ == other.shape_, "copy_from: shape ", other.shape_str(), " into ",
              shape_str());
  if (!numel_) return;
  float* d = view_data();
  const float* s = other.view_data();
  if (is_contiguous() && other.is_contiguous()) {
    std::memmove(d, s, numel_ * sizeof(float));
    return;
  }
  // Runs of the strided side; the other side is cut to the same runs (it is contiguous, or has
  // the same rows).
  const Tensor& a = is_contiguous() ? other : *this;
  const Tensor& b = is_contiguous() ? *this : other;
  MAMBA_CHECK(b.is_contiguous() || b.row_len() == a.row_len(), "copy_from: strided views ",
              other.shape_str(), " and ", shape_str(), " have different rows (", other.row_len(),
              " and ", row_len(), " values)");
  const int64_t n = a.row_len(), lda = a.row_stride(), ldb = b.row_stride();
  float* pa = a.view_data();
  float* pb = b.view_data();
  const bool into_a = &a == this, b_contiguous = b.is_contiguous();
  // Rows split over threads (a layer's column blocks are a few MB per call: memory bound).
  parallel_for(a.rows(), std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)),
               [&](int64_t r0, int64_t r1) {
                 for (int64_t r = r0; r < r1; ++r) {
                   float* ra = pa + r * lda;
                   float* rb = b_contiguous ? pb + r * n : pb + r * ldb;
                   if (into_a)
                     std::memmove(ra, rb, n * sizeof(float));
                   else
                     std::memmove(rb, ra, n * sizeof(float));
                 }
               });
}

void check_defined(const Tensor& t, const char* what) {
  MAMBA_CHECK(t.defined(), what, ": tensor is required but was not given");
}

void check_shape(const Tensor& t, const char* what, const Shape& expected) {
  check_defined(t, what);
  bool ok = t.ndim() == static_cast<int>(expected.size());
  for (size_t i = 0; ok && i < expected.size(); ++i)
    ok = expected[i] == -1 || expected[i] == t.shape()[i];
  if (!ok) {
    std::string e = "(";
    for (size_t i = 0; i < expected.size(); ++i) {
      if (i) e.push_back(',');
      e.append(expected[i] == -1 ? std::string("*") : std::to_string(expected[i]));
    }
    throw Error(str(what, ": expected shape ", e, ")", ", got ", t.shape_str()));
  }
}

void check_finite(const Tensor& t, const char* what) {
  check_defined(t, what);
  const Tensor c = t.contiguous();
  const float* p = c.data();
  for (int64_t i = 0; i < t.numel(); ++i)
    MAMBA_CHECK(std::isfinite(p[i]), what, ": non-finite value ", p[i], " at flat index ", i,
                " of shape ", t.shape_str());
}

}  // namespace mamba
