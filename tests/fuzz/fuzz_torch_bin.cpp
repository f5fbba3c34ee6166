// libFuzzer target: a torch.save'd state dict as a whole file (zip container + pickle VM +
// storages and views). A custom mutator re-computes the CRC-32 of every entry the central
// directory lists after each mutation, so mutated entries still pass the reader's CRC check and
// the fuzzer gets past the container (fuzz_torch_pickle drives the pickle directly as well).
#include <cstring>

#include "fuzz_util.h"
#include "model/torch_bin.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

namespace {
uint32_t rd(const uint8_t* p, int n) {
  uint32_t v = 0;
  for (int k = 0; k < n; ++k) v |= static_cast<uint32_t>(p[k]) << (8 * k);
  return v;
}
void wr32(uint8_t* p, uint32_t v) {
  for (int k = 0; k < 4; ++k) p[k] = static_cast<uint8_t>(v >> (8 * k));
}
uint32_t crc32(const uint8_t* d, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= d[i];
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
  }
  return ~c;
}
// Best effort: whatever does not parse is left as the mutation made it.
void fix_crcs(uint8_t* d, size_t size) {
  if (size < 22) return;
  size_t e = size - 22;
  for (size_t back = 0; back <= 65535 && e >= back; ++back)
    if (rd(d + e - back, 4) == 0x06054b50u) {
      e -= back;
      break;
    }
  if (rd(d + e, 4) != 0x06054b50u) return;
  const uint32_t n = rd(d + e + 10, 2);
  size_t p = rd(d + e + 16, 4);
  for (uint32_t i = 0; i < n; ++i) {
    if (p + 46 > size || rd(d + p, 4) != 0x02014b50u) return;
    const uint32_t csize = rd(d + p + 20, 4);
    const size_t nl = rd(d + p + 28, 2), xl = rd(d + p + 30, 2), cl = rd(d + p + 32, 2);
    const size_t off = rd(d + p + 42, 4);
    if (off + 30 <= size && rd(d + off, 4) == 0x04034b50u) {
      const size_t start = off + 30 + rd(d + off + 26, 2) + rd(d + off + 28, 2);
      if (csize != 0xFFFFFFFFu && start <= size && csize <= size - start) {
        const uint32_t c = crc32(d + start, csize);
        wr32(d + p + 16, c);
        wr32(d + off + 14, c);
      }
    }
    p += 46 + nl + xl + cl;
  }
}
}  // namespace

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size,
                                          unsigned int /*seed*/) {
  size = LLVMFuzzerMutate(data, size, max_size);
  fix_crcs(data, size);
  return size;
}

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  (void)mamba::parse_torch_state_dict(data, size, "fuzz");
}
