#include "core/os.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "mamba/error.h"

#if defined(_WIN32)
#include <io.h>
#include <psapi.h>
#include <windows.h>
#else
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#endif

namespace mamba::os {

bool exists(const std::string& path) { return std::filesystem::exists(path); }

uint64_t file_size(const std::string& path) {
  std::error_code ec;
  auto n = std::filesystem::file_size(path, ec);
  MAMBA_CHECK(!ec, "cannot read '", path, "': ", ec.message());
  return n;
}

std::vector<uint8_t> read_file(const std::string& path, uint64_t max_bytes) {
  std::error_code ec;
  MAMBA_CHECK(!std::filesystem::is_directory(path, ec), "'", path, "' is a directory, not a file");
  uint64_t n = file_size(path);
  MAMBA_CHECK(n <= max_bytes, "'", path, "' is ", n, " bytes, more than the limit of ", max_bytes);
  std::ifstream f(path, std::ios::binary);
  MAMBA_CHECK(f.good(), "cannot open '", path, "': ", std::strerror(errno));
  std::vector<uint8_t> buf(static_cast<size_t>(n));
  if (n) f.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(n));
  MAMBA_CHECK(f.gcount() == static_cast<std::streamsize>(n), "short read from '", path, "'");
  return buf;
}

void write_file_atomic(const std::string& path,
                       const std::vector<std::pair<const void*, size_t>>& parts) {
  std::filesystem::path p(path);
  std::string tmp = path + ".tmp";
#if defined(_WIN32)
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    MAMBA_CHECK(f.good(), "cannot write '", tmp, "'");
    for (auto& [d, n] : parts)
      f.write(static_cast<const char*>(d), static_cast<std::streamsize>(n));
    f.flush();
    MAMBA_CHECK(f.good(), "write to '", tmp, "' failed");
  }
  MAMBA_CHECK(
      MoveFileExA(tmp.c_str(), path.c_str(), MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH),
      "cannot rename '", tmp, "' to '", path, "'");
#else
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  MAMBA_CHECK(fd >= 0, "cannot write '", tmp, "': ", std::strerror(errno));
  for (auto& [d, n] : parts) {
    const char* c = static_cast<const char*>(d);
    size_t left = n;
    while (left > 0) {
      ssize_t w = ::write(fd, c, left);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) {
        int e = errno;
        ::close(fd);
        std::remove(tmp.c_str());
        throw Error(str("write to '", tmp, "' failed: ", std::strerror(e)));
      }
      c += w, left -= static_cast<size_t>(w);
    }
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    std::remove(tmp.c_str());
    throw Error(str("cannot flush '", tmp, "': ", std::strerror(errno)));
  }
  MAMBA_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename '", tmp, "' to '", path,
              "': ", std::strerror(errno));
  // Make the rename itself durable.
  std::string dir = p.has_parent_path() ? p.parent_path().string() : std::string(".");
  int dfd = ::open(dir.c_str(), O_RDONLY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
#endif
}

void rename_durable(const std::string& from, const std::string& to) {
  std::error_code ec;
  std::filesystem::rename(from, to, ec);
  MAMBA_CHECK(!ec, "cannot rename '", from, "' to '", to, "': ", ec.message());
#if !defined(_WIN32)
  std::filesystem::path p(to);
  std::string dir = p.has_parent_path() ? p.parent_path().string() : std::string(".");
  int dfd = ::open(dir.c_str(), O_RDONLY);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
#endif
}

void write_file_atomic(const std::string& path, const void* data, size_t size) {
  write_file_atomic(path, {{data, size}});
}

MappedFile::MappedFile(const std::string& path) {
  std::error_code ec;
  MAMBA_CHECK(!std::filesystem::is_directory(path, ec), "'", path, "' is a directory, not a file");
#if defined(_WIN32)
  fallback_ = read_file(path);
  data_ = fallback_.data();
  size_ = fallback_.size();
#else
  int fd = ::open(path.c_str(), O_RDONLY);
  MAMBA_CHECK(fd >= 0, "cannot open '", path, "': ", std::strerror(errno));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    throw Error(str("cannot stat '", path, "': ", std::strerror(e)));
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {  // e.g. a pipe or a file system without mmap: read it instead
      ::close(fd);
      fallback_ = read_file(path);
      data_ = fallback_.data();
      size_ = fallback_.size();
      return;
    }
    handle_ = p;
    data_ = static_cast<const uint8_t*>(p);
  }
  ::close(fd);
#endif
}

void MappedFile::drop_pages([[maybe_unused]] uint64_t offset, [[maybe_unused]] uint64_t n) const {
#if !defined(_WIN32)
  if (!handle_ || offset >= size_) return;
  n = std::min(n, size_ - offset);
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t b = (offset + page - 1) / page * page, e = (offset + n) / page * page;
  if (e > b) ::madvise(static_cast<uint8_t*>(handle_) + b, e - b, MADV_DONTNEED);
#endif
}

MappedFile::~MappedFile() {
#if !defined(_WIN32)
  if (handle_) ::munmap(handle_, size_);
#endif
}

void keep_freed_memory() {
#if defined(__GLIBC__)
  mallopt(M_MMAP_THRESHOLD, 1 << 30);  // blocks below 1 GiB come from the heap...
  mallopt(M_TRIM_THRESHOLD, 1 << 30);  // ...and the heap is not trimmed below 1 GiB free
#endif
}

void release_freed_memory() {
  clear_tensor_cache();
  trim_freed_memory();
}

void trim_freed_memory() {
#if defined(__GLIBC__)
  malloc_trim(0);
#endif
}

namespace {
// The first number on the line of /proc/meminfo starting with `key`, in bytes (0 if absent).
uint64_t meminfo_bytes([[maybe_unused]] const char* key) {
#if defined(__linux__)
  std::ifstream f("/proc/meminfo");
  std::string k;
  uint64_t v = 0;
  std::string unit;
  while (f >> k >> v) {
    std::getline(f, unit);
    if (k == key) return v * 1024;  // the kernel writes kB
  }
#endif
  return 0;
}
#if defined(__linux__)
// A cgroup v2 file holding one number (or "max"); false when absent or unlimited.
bool read_cgroup_number(const std::string& path, uint64_t* v) {
  std::ifstream f(path);
  std::string s;
  if (!(f >> s) || s == "max") return false;
  try {
    *v = std::stoull(s);
  } catch (const std::exception&) {
    return false;
  }
  return true;
}
#endif
}  // namespace

uint64_t available_memory_bytes() {
  uint64_t avail = meminfo_bytes("MemAvailable:");
  auto take_min = [&](uint64_t v) { avail = avail == 0 ? v : std::min(avail, v); };
#if defined(__linux__)
  uint64_t limit = 0, used = 0;
  if (read_cgroup_number("/sys/fs/cgroup/memory.max", &limit) &&
      read_cgroup_number("/sys/fs/cgroup/memory.current", &used))
    take_min(limit > used ? limit - used : 0);
#endif
#if !defined(_WIN32)
  struct rlimit rl;
  if (getrlimit(RLIMIT_AS, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
    uint64_t vm = 0;
#if defined(__linux__)
    std::ifstream f("/proc/self/statm");
    if (f >> vm) vm *= static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
#endif
    const uint64_t lim = static_cast<uint64_t>(rl.rlim_cur);
    take_min(lim > vm ? lim - vm : 1);
  }
#endif
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
  // Memory this process freed but keeps (keep_freed_memory) is reused by the next allocation
  // without asking the system: count it as available too.
  if (avail > 0) {
    const struct mallinfo2 mi = mallinfo2();
    avail += mi.fordblks + mi.fsmblks;
  }
#endif
  if (avail > 0) avail += tensor_cache_bytes();  // reused (or handed back) before asking for more
  return avail;
}

void check_memory(uint64_t bytes, const std::string& what) {
  const uint64_t avail = available_memory_bytes();
  if (avail == 0 || bytes <= avail) return;
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
  char buf[160];
  std::snprintf(buf, sizeof buf,
                " needs %llu bytes (%.2f GiB), but only %llu bytes (%.2f GiB) are available",
                static_cast<unsigned long long>(bytes), static_cast<double>(bytes) / kGiB,
                static_cast<unsigned long long>(avail), static_cast<double>(avail) / kGiB);
  throw Error(what + buf);
}

uint64_t peak_rss_bytes() {
#if defined(_WIN32)
  PROCESS_MEMORY_COUNTERS pmc;
  if (GetProcessMemoryInfo(GetCurrentProcess(), &pmc, sizeof(pmc))) return pmc.PeakWorkingSetSize;
  return 0;
#else
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0) return 0;
#if defined(__APPLE__)
  return static_cast<uint64_t>(ru.ru_maxrss);
#else
  return static_cast<uint64_t>(ru.ru_maxrss) * 1024;
#endif
#endif
}

uint64_t current_rss_bytes() {
#if defined(__linux__)
  std::ifstream f("/proc/self/statm");
  uint64_t pages = 0, resident = 0;
  if (f >> pages >> resident) return resident * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
#endif
  return 0;
}

}  // namespace mamba::os
