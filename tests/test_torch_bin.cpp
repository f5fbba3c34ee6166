// torch.save checkpoints: fixtures written once by Debian's python3-torch
// (scripts/make_torch_fixture.py) must load bit-for-bit; hostile archives and pickles
// (arbitrary globals, truncation, offsets past the end, compressed entries, wrong storage
// sizes, fuzzed bytes) must give a clear mamba::Error and never crash or read out of bounds.
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/torch_bin.h"
#include "test_util.h"

using namespace mamba;

namespace {

std::string torch_path(const std::string& f) { return test::data_path("torch/" + f); }

// Expects parse/read to throw mamba::Error whose message contains every fragment.
using test::expect_error;

uint32_t crc32_bitwise(const std::vector<uint8_t>& d) {
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

// A minimal stored-entry zip writer, independent of the reader under test.
// With zip64, sizes and offsets go in the zip64 extra field and end record, as for
// checkpoints over 4 GiB (mamba-2.8b's pytorch_model.bin is 11 GB).
std::vector<uint8_t> make_zip(
    const std::vector<std::pair<std::string, std::vector<uint8_t>>>& entries, bool zip64 = false) {
  std::vector<uint8_t> out, cd;
  const uint64_t big = 0xFFFFFFFFu;
  for (const auto& [name, data] : entries) {
    uint32_t crc = crc32_bitwise(data);
    uint64_t off = out.size();
    put(out, 0x04034b50u, 4), put(out, 20, 2), put(out, 0, 2), put(out, 0, 2), put(out, 0, 4);
    put(out, crc, 4), put(out, data.size(), 4), put(out, data.size(), 4), put(out, name.size(), 2),
        put(out, 0, 2);
    out.insert(out.end(), name.begin(), name.end());
    out.insert(out.end(), data.begin(), data.end());
    put(cd, 0x02014b50u, 4), put(cd, 45, 2), put(cd, 45, 2), put(cd, 0, 2), put(cd, 0, 2),
        put(cd, 0, 4);
    put(cd, crc, 4), put(cd, zip64 ? big : data.size(), 4), put(cd, zip64 ? big : data.size(), 4);
    put(cd, name.size(), 2), put(cd, zip64 ? 28 : 0, 2), put(cd, 0, 2), put(cd, 0, 2),
        put(cd, 0, 2), put(cd, 0, 4);
    put(cd, zip64 ? big : off, 4);
    cd.insert(cd.end(), name.begin(), name.end());
    if (zip64) {
      put(cd, 0x0001, 2), put(cd, 24, 2);
      put(cd, data.size(), 8), put(cd, data.size(), 8), put(cd, off, 8);
    }
  }
  const uint64_t cd_off = out.size();
  out.insert(out.end(), cd.begin(), cd.end());
  if (zip64) {
    const uint64_t z = out.size();
    put(out, 0x06064b50u, 4), put(out, 44, 8), put(out, 45, 2), put(out, 45, 2), put(out, 0, 4),
        put(out, 0, 4);
    put(out, entries.size(), 8), put(out, entries.size(), 8), put(out, cd.size(), 8),
        put(out, cd_off, 8);
    put(out, 0x07064b50u, 4), put(out, 0, 4), put(out, z, 8), put(out, 1, 4);
  }
  put(out, 0x06054b50u, 4), put(out, 0, 2), put(out, 0, 2),
      put(out, zip64 ? 0xFFFF : entries.size(), 2);
  put(out, zip64 ? 0xFFFF : entries.size(), 2), put(out, zip64 ? big : cd.size(), 4);
  put(out, zip64 ? big : cd_off, 4), put(out, 0, 2);
  return out;
}

// Pickle builder: just enough to write what torch.save writes, by hand.
struct Pkl {
  std::vector<uint8_t> b{0x80, 0x02};
  Pkl& op(uint8_t o) { return b.push_back(o), *this; }
  Pkl& global(const std::string& m, const std::string& n) {
    op('c');
    for (char c : m + "\n" + n + "\n") b.push_back(static_cast<uint8_t>(c));
    return *this;
  }
  Pkl& s(const std::string& v) {
    op('X'), put(b, v.size(), 4);
    b.insert(b.end(), v.begin(), v.end());
    return *this;
  }
  Pkl& i(int v) {  // BININT1, or BININT for what does not fit a byte
    if (v >= 0 && v < 256) return op('K'), op(static_cast<uint8_t>(v));
    op('J'), put(b, static_cast<uint32_t>(v), 4);
    return *this;
  }
  Pkl& tuple(const std::vector<int>& v) {
    op('(');
    for (int x : v) i(x);
    return op('t');
  }
};

// {name: float32 tensor over storage "0" of storage_numel elements, offset, size, stride}
std::vector<uint8_t> state_dict_pickle(const std::string& name, int storage_numel, int offset,
                                       const std::vector<int>& size, const std::vector<int>& stride,
                                       const std::string& module = "torch._utils",
                                       const std::string& fn = "_rebuild_tensor_v2") {
  Pkl p;
  p.global("collections", "OrderedDict").op('q').op(0).op(')').op('R').op('q').op(1);
  p.op('(').s(name).global(module, fn).op('(');
  p.op('(')
      .s("storage")
      .global("torch", "FloatStorage")
      .s("0")
      .s("cpu")
      .i(storage_numel)
      .op('t')
      .op('Q');
  p.i(offset).tuple(size).tuple(stride).op(0x89);
  p.global("collections", "OrderedDict").op(')').op('R').op('t').op('R');
  p.op('u').op('}').s("_metadata").op('}').op('s').op('b').op('.');
  return p.b;
}

std::vector<uint8_t> floats_le(int n, float start = 0.5f) {
  std::vector<uint8_t> o;
  for (int k = 0; k < n; ++k) {
    float f = start + static_cast<float>(k);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    put(o, u, 4);
  }
  return o;
}

std::vector<uint8_t> archive(const std::vector<uint8_t>& pkl, const std::vector<uint8_t>& storage,
                             bool zip64 = false) {
  return make_zip(
      {{"archive/data.pkl", pkl}, {"archive/data/0", storage}, {"archive/version", {'3', '\n'}}},
      zip64);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<size_t>(a.numel()) * 4) == 0;
}

}  // namespace

TEST(TorchBin, GoldenMamba1CheckpointLoadsBitExact) {
  TorchStateDict sd = read_torch_state_dict(torch_path("lm_mamba1.bin"));
  SafetensorsFile st = SafetensorsFile::open(test::golden_path("lm_mamba1_ckpt/model.safetensors"));
  auto names = st.names();
  ASSERT_EQ(names.size(), 33u);  // embedding + 3 layers x 10 + norm_f
  EXPECT_EQ(sd.tensors.size(),
            names.size());  // lm_head.weight shares the embedding storage in the .bin
  EXPECT_TRUE(sd.int_tensors.empty());
  for (const auto& n : names) {
    ASSERT_TRUE(sd.tensors.count(n)) << n;
    EXPECT_EQ(sd.dtypes.at(n), "float32") << n;
    EXPECT_TRUE(same_bits(sd.tensors.at(n), st.tensor(n)))
        << n << " differs from the safetensors file";
  }
  // mamba_ssm ties lm_head to the embedding: one storage, two keys.
  EXPECT_TRUE(same_bits(sd.tensors.at("lm_head.weight"), st.tensor("backbone.embedding.weight")));
  EXPECT_EQ(sd.order.front(), names.front());
  auto plain = load_torch_state_dict(torch_path("lm_mamba1.bin"));
  EXPECT_EQ(plain.size(), sd.tensors.size());
}

TEST(TorchBin, MixedDtypesViewsAndParametersMatchTorch) {
  TorchStateDict sd = read_torch_state_dict(torch_path("mixed.bin"));
  std::ifstream f(torch_path("mixed_expected.json"));
  nlohmann::json exp = nlohmann::json::parse(f);
  ASSERT_EQ(sd.dtypes.size(), exp.size());
  int floats = 0, ints = 0;
  for (auto it = exp.begin(); it != exp.end(); ++it) {
    const std::string& n = it.key();
    const auto& e = it.value();
    ASSERT_TRUE(sd.dtypes.count(n)) << n;
    EXPECT_EQ(sd.dtypes.at(n), e["dtype"].get<std::string>()) << n;
    Shape shape = e["shape"].get<Shape>();
    if (e.contains("f32_bits")) {
      const Tensor& t = sd.tensors.at(n);
      ASSERT_EQ(t.shape(), shape) << n;
      auto bits = e["f32_bits"].get<std::vector<int64_t>>();
      ASSERT_EQ(static_cast<int64_t>(bits.size()), t.numel()) << n;
      for (int64_t k = 0; k < t.numel(); ++k) {
        uint32_t u;
        std::memcpy(&u, t.data() + k, 4);
        ASSERT_EQ(u, static_cast<uint32_t>(bits[k])) << n << "[" << k << "]";
      }
      ++floats;
    } else {
      const auto& t = sd.int_tensors.at(n);
      EXPECT_EQ(t.shape, shape) << n;
      EXPECT_EQ(t.values, e["values"].get<std::vector<int64_t>>()) << n;
      ++ints;
    }
  }
  EXPECT_EQ(floats,
            10);       // f16, bf16, f64, transposed, offset_view, shared_a/b, scalar, empty, param
  EXPECT_EQ(ints, 2);  // i64, flags (bool)
  EXPECT_EQ(sd.dtypes.at("f16"), "float16");
  EXPECT_EQ(sd.dtypes.at("bf16"), "bfloat16");
  // The transposed view is gathered through its strides: (24, 16) over a (16, 24) storage.
  const Tensor& tr = sd.tensors.at("transposed");
  const Tensor& base = sd.tensors.at("shared_a");
  for (int r = 0; r < 24; ++r)
    for (int c = 0; c < 16; ++c) ASSERT_EQ(tr[r * 16 + c], base[c * 24 + r]);
}

TEST(TorchBin, HandBuiltPickleLoadsAndHonoursOffsetAndStride) {
  // (2, 3) view at offset 1 with stride (1, 2) over 8 floats: element (i, j) = storage[1 + i + 2
  // j].
  auto sd = parse_torch_state_dict(
      archive(state_dict_pickle("w", 8, 1, {2, 3}, {1, 2}), floats_le(8)), "mem");
  const Tensor& w = sd.tensors.at("w");
  ASSERT_EQ(w.shape(), (Shape{2, 3}));
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 3; ++j) EXPECT_EQ(w[i * 3 + j], 0.5f + static_cast<float>(1 + i + 2 * j));
}

TEST(TorchBin, ReadsZip64Archives) {
  auto zip = archive(state_dict_pickle("w", 6, 0, {3, 2}, {2, 1}), floats_le(6), /*zip64=*/true);
  auto sd = parse_torch_state_dict(zip, "zip64");
  const Tensor& w = sd.tensors.at("w");
  ASSERT_EQ(w.shape(), (Shape{3, 2}));
  for (int k = 0; k < 6; ++k) EXPECT_EQ(w[k], 0.5f + static_cast<float>(k));
  // The zip64 end record pointing past the locator, and a short zip64 extra field.
  auto bad = zip;
  const size_t loc = bad.size() - 22 - 20;
  bad[loc + 8] = 0xF0, bad[loc + 9] = 0xFF;
  expect_error([&] { parse_torch_state_dict(bad, "z"); }, {"zip64 end record"});
  for (size_t n = 0; n + 1 < zip.size(); n += 3)
    EXPECT_THROW(
        parse_torch_state_dict(
            std::vector<uint8_t>(zip.begin(), zip.begin() + static_cast<std::ptrdiff_t>(n)), "cut"),
        Error);
}

TEST(TorchBin, RefusesArbitraryGlobals) {
  // Made with Python's pickle from objects whose __reduce__ calls os.system / eval.
  expect_error([] { read_torch_state_dict(torch_path("evil_os_system.bin")); },
               {"evil_os_system.bin", "system'", "refusing"});
  expect_error([] { read_torch_state_dict(torch_path("evil_eval.bin")); }, {"eval'", "refusing"});
  // The same through hand-built pickles, in the place torch puts _rebuild_tensor_v2.
  for (auto [m, n] : {std::pair<std::string, std::string>{"os", "system"},
                      {"builtins", "eval"},
                      {"builtins", "getattr"},
                      {"torch", "load"},
                      {"subprocess", "Popen"},
                      {"torch._utils", "_rebuild_tensor"}}) {
    auto zip = archive(state_dict_pickle("w", 6, 0, {2, 3}, {3, 1}, m, n), floats_le(6));
    expect_error([&] { parse_torch_state_dict(zip, "mem"); },
                 {("'" + m + "." + n + "'").c_str(), "refusing"});
  }
}

TEST(TorchBin, RefusesCompressedEntriesAndWrongStorageSize) {
  expect_error([] { read_torch_state_dict(torch_path("compressed.bin")); },
               {"compressed", "deflate", "data.pkl"});
  expect_error([] { read_torch_state_dict(torch_path("wrong_storage_size.bin")); },
               {"data/0", "bytes, but the pickle says"});
  // Hand-built: 5 floats of data for a storage the pickle says holds 6.
  auto zip = archive(state_dict_pickle("w", 6, 0, {2, 3}, {3, 1}), floats_le(5));
  expect_error([&] { parse_torch_state_dict(zip, "mem"); }, {"20 bytes", "6 elements of float32"});
}

TEST(TorchBin, RefusesViewsPastTheirStorage) {
  // (3, 3) contiguous needs 9 elements; the storage has 6.
  auto z1 = archive(state_dict_pickle("w", 6, 0, {3, 3}, {3, 1}), floats_le(6));
  expect_error([&] { parse_torch_state_dict(z1, "mem"); }, {"'w'", "storage of 6 elements"});
  auto z2 = archive(state_dict_pickle("w", 6, 5, {2}, {1}), floats_le(6));  // offset 5 + 1
  expect_error([&] { parse_torch_state_dict(z2, "mem"); }, {"'w'", "reaches element 6"});
  auto z3 = archive(state_dict_pickle("w", 6, 0, {2, 200}, {200, 200}), floats_le(6));
  expect_error([&] { parse_torch_state_dict(z3, "mem"); }, {"'w'"});
}

// Issue 18: a 521-byte file whose storage holds one float, viewed with size (2^20, 2^20) and
// stride (0, 0), passed the bounds check (every element is storage[0]) and asked for a 4 TiB
// tensor (std::bad_alloc escaped; a few-GB view would really have been allocated and filled).
// The elements a file may yield are now capped by its size, before anything is allocated.
TEST(TorchBin, RefusesBroadcastViewsTheFileCannotBack) {
  auto huge = archive(state_dict_pickle("w", 1, 0, {1 << 20, 1 << 20}, {0, 0}), floats_le(1));
  EXPECT_LT(huge.size(), 600u);
  expect_error([&] { parse_torch_state_dict(huge, "mem"); },
               {"'w'", "(1048576,1048576)", "stride (0,0)", "more than a file of"});
  // Just past the cap (4 elements per file byte + 2^24) is refused too; a broadcast within it
  // (an expanded tensor, which torch.save can write) loads, every element the stored one.
  auto past = archive(state_dict_pickle("w", 1, 0, {(1 << 24) + 4096}, {0}), floats_le(1));
  expect_error([&] { parse_torch_state_dict(past, "mem"); }, {"'w'", "more than a file of"});
  auto ok = archive(state_dict_pickle("w", 1, 0, {1000, 3}, {0, 0}), floats_le(1));
  auto sd = parse_torch_state_dict(ok, "mem");
  const Tensor& w = sd.tensors.at("w");
  ASSERT_EQ(w.shape(), (Shape{1000, 3}));
  for (int64_t e = 0; e < w.numel(); ++e) ASSERT_EQ(w.data()[e], 0.5f) << e;
}

TEST(TorchBin, RefusesMissingStorageAndNonZipAndLegacyFormat) {
  auto pkl = state_dict_pickle("w", 6, 0, {2, 3}, {3, 1});
  expect_error(
      [&] {
        parse_torch_state_dict(make_zip({{"archive/data.pkl", pkl}}), "mem");
      },
      {"no entry 'archive/data/0'"});
  expect_error(
      [&] {
        parse_torch_state_dict(make_zip({{"archive/other", pkl}}), "mem");
      },
      {"data.pkl"});
  expect_error([] { parse_torch_state_dict({}, "empty"); }, {"empty", "not a torch.save zip"});
  std::vector<uint8_t> legacy = {0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc,
                                 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8};
  expect_error([&] { parse_torch_state_dict(legacy, "old.bin"); }, {"legacy"});
  expect_error([] { read_torch_state_dict(test::golden_path("lm_mamba1_ckpt/config.json")); },
               {"not a torch.save"});
  expect_error([] { read_torch_state_dict("/nonexistent/pytorch_model.bin"); },
               {"/nonexistent/pytorch_model.bin"});
}

TEST(TorchBin, RefusesMalformedPickles) {
  auto storage = floats_le(6);
  auto run = [&](std::vector<uint8_t> pkl) {
    parse_torch_state_dict(archive(pkl, storage), "mem");
  };
  expect_error([&] { run({0x80, 0x02, '}'}); }, {"without a STOP"});        // truncated
  expect_error([&] { run({0x80, 0x02, 'h', 7, '.'}); }, {"memo index 7"});  // BINGET of nothing
  expect_error([&] { run({0x80, 0x02, 's', '.'}); }, {"underflow"});
  expect_error([&] { run({0x80, 0x02, ')', '.'}); }, {"tuple, not a state dict"});
  expect_error([&] { run({0x80, 0x02, 'I', '1', '\n', '.'}); }, {"opcode 0x49"});  // text INT
  expect_error([&] { run({0x80, 0x02, 'X', 0xff, 0xff, 0xff, 0x7f, 'a'}); }, {"truncated"});
  expect_error(
      [&] {
        run({0x80, 0x02, '}', 'X', 1, 0, 0, 0, 'k', 'K', 3, 's', '.'});
      },
      {"'k'", "not a tensor"});
  // 50000 nested 1-tuples: no recursion anywhere, so no stack overflow; just "not a state dict".
  std::vector<uint8_t> deep = {0x80, 0x02, ')'};
  for (int k = 0; k < 50000; ++k) deep.push_back(0x85);
  deep.push_back('.');
  expect_error([&] { run(deep); }, {"not a state dict"});
  // A dict that contains itself (through the memo) is harmless.
  expect_error(
      [&] {
        run({0x80, 0x02, '}', 'q', 0, 'X', 1, 0, 0, 0, 'k', 'h', 0, 's', '.'});
      },
      {"not a tensor"});
}

TEST(TorchBin, TruncatedAndOutOfRangeZipsGiveErrors) {
  auto good = os::read_file(torch_path("mixed.bin"));
  ASSERT_NO_THROW(parse_torch_state_dict(good, "mixed.bin"));
  // Every prefix of the file (the end record is lost, or offsets point past the end).
  for (size_t n = 0; n < good.size(); n += (n < 64 || good.size() - n < 256) ? 1 : 13) {
    std::vector<uint8_t> cut(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(parse_torch_state_dict(cut, "cut"), Error) << "prefix " << n;
  }
  // Central directory offset / local header offset / entry size past the end.
  auto zip = archive(state_dict_pickle("w", 6, 0, {2, 3}, {3, 1}), floats_le(6));
  const size_t eocd = zip.size() - 22;
  auto patch = [&](size_t at, uint32_t v) {
    auto z = zip;
    for (int k = 0; k < 4; ++k) z[at + static_cast<size_t>(k)] = static_cast<uint8_t>(v >> (8 * k));
    return z;
  };
  expect_error([&] { parse_torch_state_dict(patch(eocd + 16, 0xFFFFFF00u), "m"); },
               {"central directory"});
  expect_error([&] { parse_torch_state_dict(patch(eocd + 12, 0x7FFFFFFFu), "m"); },
               {"central directory"});
  size_t cd = zip[eocd + 16] | zip[eocd + 17] << 8 | zip[eocd + 18] << 16;
  expect_error([&] { parse_torch_state_dict(patch(cd + 42, 0x7FFFFF00u), "m"); }, {"local header"});
  expect_error([&] { parse_torch_state_dict(patch(cd + 24, 0x7FFFFF00u), "m"); }, {"data.pkl"});
  // A flipped data byte fails the CRC.
  auto flipped = zip;
  flipped[50] ^= 0x20;  // inside data.pkl (local header 30 + name 16)
  expect_error([&] { parse_torch_state_dict(flipped, "m"); }, {"CRC-32"});
}

TEST(TorchBin, FuzzedArchivesAndPicklesNeverCrash) {
  // Random byte edits: the reader must either load or throw mamba::Error (any other
  // exception fails the test; a crash or out-of-bounds read fails it under the sanitizers).
  Rng rng(1234);
  auto pkl = state_dict_pickle("w", 6, 0, {2, 3}, {3, 1});
  auto storage = floats_le(6);
  auto mixed = os::read_file(torch_path("mixed.bin"));
  int loaded = 0, refused = 0;
  for (int it = 0; it < 3000; ++it) {
    std::vector<uint8_t> bytes;
    if (it % 2 == 0) {  // the pickle, re-zipped with a valid CRC so the VM sees the damage
      auto p = pkl;
      int edits = 1 + static_cast<int>(rng.next() % 3);
      for (int e = 0; e < edits; ++e) p[rng.next() % p.size()] = static_cast<uint8_t>(rng.next());
      bytes = archive(p, storage);
    } else {  // the zip structure of a real torch file (central directory and end record)
      bytes = mixed;
      size_t tail = 1200;
      bytes[bytes.size() - 1 - rng.next() % tail] = static_cast<uint8_t>(rng.next());
    }
    try {
      parse_torch_state_dict(bytes, "fuzz");
      ++loaded;
    } catch (const Error&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 1000);
  EXPECT_EQ(loaded + refused, 3000);
}
