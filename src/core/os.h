// The only place that touches the operating system's file APIs, so the rest stays portable.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace mamba::os {

// Reads a whole file; throws mamba::Error naming the path on failure or when it exceeds max_bytes.
std::vector<uint8_t> read_file(const std::string& path, uint64_t max_bytes = (1ull << 40));
uint64_t file_size(const std::string& path);  // throws if missing
bool exists(const std::string& path);
// Writes atomically: a temporary file in the same folder, flushed to disk (fsync), then
// renamed over `path`. A crash leaves either the old file or the new one, never half of one.
void write_file_atomic(const std::string& path, const void* data, size_t size);
void write_file_atomic(const std::string& path,
                       const std::vector<std::pair<const void*, size_t>>& parts);
// Renames `from` to `to` (replacing it; same file system), then flushes the folder of `to`, so
// the rename survives a power cut. Throws mamba::Error naming both paths.
void rename_durable(const std::string& from, const std::string& to);
// A read-only view of a whole file, memory-mapped where the platform allows (so a checkpoint
// of several GB is not read into memory twice); falls back to reading the file.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }
  // Drops the whole pages within bytes [offset, offset + n) from this process's resident memory
  // (madvise MADV_DONTNEED: a read-only private map of an unchanged file reads them back from the
  // page cache on the next access). No-op when the file was read rather than mapped.
  void drop_pages(uint64_t offset, uint64_t n) const;

 private:
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
  void* handle_ = nullptr;         // platform mapping handle
  std::vector<uint8_t> fallback_;  // when mapping is not available
};

// Programs that allocate and free the same large buffers over and over (every training step,
// every prefill, every benchmark repetition) call this once at start: freed memory stays in
// the process instead of going back to the OS. Without it glibc unmaps blocks >= 128 KiB (up to
// 32 MiB) on free and the next call page-faults them back in zeroed, which cost half of a small
// training step and 40% of an SSD forward at L = 8192 here (docs/PERFORMANCE.md). A no-op
// outside glibc. A library never calls it by itself: it changes the process's allocator.
void keep_freed_memory();
// Hands memory freed so far back to the OS once (e.g. after a model's fp32 weights were
// converted to 16 bits and released, which keep_freed_memory would otherwise keep resident).
// Also empties the tensor cache below.
void release_freed_memory();
// The same without touching the tensor cache: only the allocator's free memory goes back (glibc
// malloc_trim, a walk over the free lists; a no-op elsewhere). For a
// long-running process (the server) after a peak, so its resident memory follows what it holds
// now rather than the most it ever held.
void trim_freed_memory();

// The tensor cache: the storage of freed tensors of 128 KiB and more is kept, up to a limit, and
// reused by the next tensor it fits (at most 1/8 larger), so the activations of repeated calls
// (a layer's forward + backward, a training step) do not page-fault fresh memory in every time.
// Unlike keep_freed_memory it holds only the library's own tensors, never the rest of the
// process's memory. Default limit: 1 GiB or 1/8 of the physical memory, whichever is smaller;
// 0 in AddressSanitizer builds (reuse would hide a use after free). Thread-safe.
void set_tensor_cache_limit(uint64_t bytes);  // 0 turns the cache off and empties it
uint64_t tensor_cache_limit();
uint64_t tensor_cache_bytes();  // held now (freed tensors' storage awaiting reuse)
void clear_tensor_cache();      // hands every cached block back to the system

// Memory this process can still take, in bytes: the smallest of the system's available memory
// (Linux: MemAvailable), the room left under a cgroup v2 memory.max, and the room left under an
// address-space rlimit; plus what the process freed but keeps for reuse (glibc's free heap
// blocks, see keep_freed_memory, and the tensor cache's blocks). 0 where none of them is known
// (then checks below pass).
uint64_t available_memory_bytes();
// Throws mamba::Error "<what> needs N bytes (X GiB), but only M bytes (Y GiB) are available"
// when `bytes` is more than available_memory_bytes() (known), before anything is allocated.
void check_memory(uint64_t bytes, const std::string& what);

// Peak resident memory of this process in bytes (0 where unknown).
uint64_t peak_rss_bytes();
uint64_t current_rss_bytes();

}  // namespace mamba::os
