// libFuzzer target: the torch .bin pickle VM and the tensor views behind it, without the zip
// container's CRC in the way (random bytes almost never pass a CRC-32 check, so fuzz_torch_bin
// alone rarely reaches the pickle). The input is [n: 2 bytes, little-endian][pickle][storage:
// the last n bytes]; this harness wraps it in a valid archive with correct CRCs: data.pkl,
// storages "0" (the first half of the storage bytes) and "1" (the rest), byteorder, version.
#include <string>
#include <utility>
#include <vector>

#include "fuzz_util.h"
#include "model/torch_bin.h"

namespace {
uint32_t crc32(const std::vector<uint8_t>& d) {
  uint32_t c = 0xFFFFFFFFu;
  for (uint8_t b : d) {
    c ^= b;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
  }
  return ~c;
}
void put(std::vector<uint8_t>& o, uint64_t v, int n) {
  for (int k = 0; k < n; ++k) o.push_back(static_cast<uint8_t>(v >> (8 * k)));
}
std::vector<uint8_t> zip(const std::vector<std::pair<std::string, std::vector<uint8_t>>>& entries) {
  std::vector<uint8_t> out, cd;
  for (const auto& [name, data] : entries) {
    const uint32_t crc = crc32(data);
    const uint64_t off = out.size();
    put(out, 0x04034b50u, 4), put(out, 20, 2), put(out, 0, 2), put(out, 0, 2), put(out, 0, 4);
    put(out, crc, 4), put(out, data.size(), 4), put(out, data.size(), 4);
    put(out, name.size(), 2), put(out, 0, 2);
    out.insert(out.end(), name.begin(), name.end());
    out.insert(out.end(), data.begin(), data.end());
    put(cd, 0x02014b50u, 4), put(cd, 20, 2), put(cd, 20, 2), put(cd, 0, 2), put(cd, 0, 2);
    put(cd, 0, 4), put(cd, crc, 4), put(cd, data.size(), 4), put(cd, data.size(), 4);
    put(cd, name.size(), 2), put(cd, 0, 2), put(cd, 0, 2), put(cd, 0, 2), put(cd, 0, 2);
    put(cd, 0, 4), put(cd, off, 4);
    cd.insert(cd.end(), name.begin(), name.end());
  }
  const uint64_t cd_off = out.size();
  out.insert(out.end(), cd.begin(), cd.end());
  put(out, 0x06054b50u, 4), put(out, 0, 2), put(out, 0, 2), put(out, entries.size(), 2);
  put(out, entries.size(), 2), put(out, cd.size(), 4), put(out, cd_off, 4), put(out, 0, 2);
  return out;
}
}  // namespace

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  if (size < 2) return;
  size_t n = static_cast<size_t>(data[0]) | (static_cast<size_t>(data[1]) << 8);
  if (n > size - 2) n = size - 2;
  const uint8_t* pkl = data + 2;
  const size_t plen = size - 2 - n;
  const uint8_t* st = pkl + plen;
  const auto archive = zip({{"archive/data.pkl", {pkl, pkl + plen}},
                            {"archive/data/0", {st, st + n / 2}},
                            {"archive/data/1", {st + n / 2, st + n}},
                            {"archive/byteorder", {'l', 'i', 't', 't', 'l', 'e'}},
                            {"archive/version", {'3', '\n'}}});
  (void)mamba::parse_torch_state_dict(archive, "fuzz");
}
