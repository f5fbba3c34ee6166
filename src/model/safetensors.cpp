#include "mamba/safetensors.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>

#include "core/json_reader.h"
#include "core/os.h"

namespace mamba {

namespace {
constexpr uint64_t kMaxHeader = 100ull << 20;  // 100 MiB of JSON is far beyond any real model

int dtype_size(const std::string& d) {
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "I8" || d == "U8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

uint64_t read_le64(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}
}  // namespace

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  auto m = std::make_shared<os::MappedFile>(path);
  SafetensorsFile f = parse_view(m, m->data(), m->size(), path);
  f.map_ = m.get();
  return f;
}

SafetensorsFile SafetensorsFile::parse(std::vector<uint8_t> bytes, const std::string& origin) {
  auto v = std::make_shared<std::vector<uint8_t>>(std::move(bytes));
  return parse_view(v, v->data(), v->size(), origin);
}

SafetensorsFile SafetensorsFile::parse_view(std::shared_ptr<const void> keep, const uint8_t* data,
                                            uint64_t size, const std::string& origin) {
  SafetensorsFile f;
  f.origin_ = origin;
  f.keep_ = std::move(keep);
  f.base_ = data;
  f.size_ = size;
  const uint8_t* bytes = data;
  MAMBA_CHECK(size >= 8, origin, ": not a safetensors file (", size, " bytes, need at least 8)");
  uint64_t hlen = read_le64(bytes);
  MAMBA_CHECK(hlen <= kMaxHeader, origin, ": header length ", hlen, " exceeds the limit of ",
              kMaxHeader, " bytes (corrupt or not a safetensors file)");
  MAMBA_CHECK(hlen <= size - 8, origin, ": truncated: header says ", hlen,
              " bytes but the file has only ", size - 8, " after the length field");
  nlohmann::json header;
  try {
    header = json_io::parse_depth_limited(reinterpret_cast<const char*>(bytes) + 8,
                                          reinterpret_cast<const char*>(bytes) + 8 + hlen);
  } catch (const std::exception& e) {
    throw Error(str(origin, ": header is not valid JSON: ", e.what()));
  }
  MAMBA_CHECK(header.is_object(), origin, ": header is not a JSON object");
  f.data_start_ = 8 + hlen;
  const uint64_t data_size = size - f.data_start_;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const auto& v = it.value();
    if (name == "__metadata__") {
      MAMBA_CHECK(v.is_object(), origin, ": __metadata__ is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        MAMBA_CHECK(m.value().is_string(), origin, ": metadata value '", m.key(),
                    "' is not a string");
        f.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    MAMBA_CHECK(
        v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
        origin, ": tensor '", name, "' lacks dtype, shape or data_offsets");
    const auto& jd = v["dtype"];
    const auto& js = v["shape"];
    const auto& jo = v["data_offsets"];
    MAMBA_CHECK(jd.is_string() && js.is_array() && jo.is_array() && jo.size() == 2, origin,
                ": tensor '", name, "' has a malformed entry");
    SafetensorInfo info;
    info.dtype = jd.get<std::string>();
    int esize = dtype_size(info.dtype);
    MAMBA_CHECK(esize > 0, origin, ": tensor '", name, "' has unknown dtype '", info.dtype, "'");
    MAMBA_CHECK(js.size() <= 8, origin, ": tensor '", name, "' has ", js.size(), " dimensions");
    uint64_t numel = 1;
    for (const auto& d : js) {
      MAMBA_CHECK(d.is_number_unsigned() || (d.is_number_integer() && d.get<int64_t>() >= 0),
                  origin, ": tensor '", name, "' has a bad dimension ", d.dump());
      uint64_t n = d.get<uint64_t>();
      MAMBA_CHECK(n < (1ull << 40) && (n == 0 || numel <= (1ull << 40) / n), origin, ": tensor '",
                  name, "' shape is too large");
      numel *= n;
      info.shape.push_back(static_cast<int64_t>(n));
    }
    for (const auto& o : jo)
      MAMBA_CHECK(o.is_number_unsigned() || (o.is_number_integer() && o.get<int64_t>() >= 0),
                  origin, ": tensor '", name, "' has a bad data offset ", o.dump());
    info.begin = jo[0].get<uint64_t>();
    info.end = jo[1].get<uint64_t>();
    MAMBA_CHECK(info.begin <= info.end && info.end <= data_size, origin, ": tensor '", name,
                "' data [", info.begin, ", ", info.end, ") lies outside the ", data_size,
                "-byte data section (truncated or corrupt file)");
    MAMBA_CHECK(info.end - info.begin == numel * static_cast<uint64_t>(esize), origin, ": tensor '",
                name, "' has ", info.end - info.begin, " bytes, but dtype ", info.dtype,
                " and shape ", shape_str(info.shape), " need ", numel * esize);
    ranges.emplace_back(info.begin, info.end);
    f.info_[name] = std::move(info);
    f.order_.push_back(name);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i)
    MAMBA_CHECK(ranges[i].first >= ranges[i - 1].second, origin,
                ": tensors overlap in the data section (corrupt file)");
  std::sort(f.order_.begin(), f.order_.end(), [&](const std::string& a, const std::string& b) {
    return f.info_[a].begin < f.info_[b].begin;
  });
  return f;
}

std::vector<std::string> SafetensorsFile::names() const { return order_; }

const SafetensorInfo& SafetensorsFile::info(const std::string& name) const {
  auto it = info_.find(name);
  MAMBA_CHECK(it != info_.end(), origin_, ": missing tensor '", name, "'");
  return it->second;
}

std::string SafetensorsFile::meta(const std::string& key) const {
  auto it = metadata_.find(key);
  MAMBA_CHECK(it != metadata_.end(), origin_, ": missing metadata key '", key, "'");
  return it->second;
}

Tensor SafetensorsFile::tensor(const std::string& name) const {
  const SafetensorInfo& in = info(name);
  Tensor t = Tensor::empty(in.shape);
  convert(name, t.data(), t.numel());
  return t;
}

void SafetensorsFile::read_into(const std::string& name, Weight& dst) const {
  const SafetensorInfo& in = info(name);
  MAMBA_CHECK(dst.defined() && in.shape == dst.shape(), origin_, ": tensor '", name, "' has shape ",
              shape_str(in.shape), ", expected ", dst.shape_str());
  if (dst.is_f32()) {
    Tensor& t = dst.f32();
    convert(name, t.data(), t.numel());
  } else {
    dst.assign(tensor(name));
  }
}

void SafetensorsFile::release_pages(const std::string& name) const {
  if (!map_) return;
  const SafetensorInfo& in = info(name);
  static_cast<const os::MappedFile*>(map_)->drop_pages(data_start_ + in.begin, in.end - in.begin);
}

void SafetensorsFile::convert(const std::string& name, float* out, int64_t n) const {
  const SafetensorInfo& in = info(name);
  const uint8_t* p = base_ + data_start_ + in.begin;
  if (in.dtype == "F32") {
    std::memcpy(out, p, static_cast<size_t>(n) * 4);
  } else if (in.dtype == "BF16" || in.dtype == "F16") {
    bool bf = in.dtype == "BF16";
    for (int64_t i = 0; i < n; ++i) {
      uint16_t v = static_cast<uint16_t>(p[2 * i] | (p[2 * i + 1] << 8));
      out[i] = bf ? bf16_to_f32(v) : f16_to_f32(v);
    }
  } else if (in.dtype == "F64") {
    for (int64_t i = 0; i < n; ++i) {
      double d;
      std::memcpy(&d, p + 8 * i, 8);
      out[i] = static_cast<float>(d);
    }
  } else {
    throw Error(str(origin_, ": tensor '", name, "' has dtype ", in.dtype,
                    ", expected a float type (F32, F16, BF16, F64)"));
  }
}

Tensor SafetensorsFile::tensor(const std::string& name, const Shape& expected) const {
  const SafetensorInfo& in = info(name);
  if (in.shape != expected)
    throw Error(str(origin_, ": tensor '", name, "' has shape ", shape_str(in.shape), ", expected ",
                    shape_str(expected)));
  return tensor(name);
}

std::vector<int64_t> SafetensorsFile::tensor_i64(const std::string& name, Shape* shape) const {
  const SafetensorInfo& in = info(name);
  const uint8_t* p = base_ + data_start_ + in.begin;
  int64_t n = shape_numel(in.shape);
  std::vector<int64_t> out(static_cast<size_t>(n));
  if (in.dtype == "I64") {
    // n may be 0 (shape [0]): out.data() is then null, which memcpy must not get (found by
    // fuzz_safetensors; Safetensors.HostileFilesGiveClearErrors reads such tensors).
    if (n > 0) std::memcpy(out.data(), p, static_cast<size_t>(n) * 8);
  } else if (in.dtype == "I32") {
    for (int64_t i = 0; i < n; ++i) {
      int32_t v;
      std::memcpy(&v, p + 4 * i, 4);
      out[i] = v;
    }
  } else {
    throw Error(
        str(origin_, ": tensor '", name, "' has dtype ", in.dtype, ", expected I64 or I32"));
  }
  if (shape) *shape = in.shape;
  return out;
}

void save_safetensors(const std::string& path,
                      const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    check_defined(t, name.c_str());
    MAMBA_CHECK(name != "__metadata__" && !header.contains(name),
                "save_safetensors: duplicate name '", name, "'");
    uint64_t bytes = static_cast<uint64_t>(t.numel()) * 4;
    header[name] = {
        {"dtype", "F32"}, {"shape", t.shape()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8 != 0) h += ' ';
  uint8_t len[8];
  uint64_t hl = h.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(hl >> (8 * i));
  std::vector<std::pair<const void*, size_t>> parts{{len, 8}, {h.data(), h.size()}};
  for (const auto& [name, t] : tensors)
    parts.emplace_back(t.data(), static_cast<size_t>(t.numel()) * 4);
  os::write_file_atomic(path, parts);
}

}  // namespace mamba
