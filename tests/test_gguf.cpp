// GGUF: the reader against a file written independently (scripts/make_gguf_fixture.py), hostile
// files, the Q8_0 / Q4_0 rounding bounds, and MambaLM / Tokenizer round trips through GGUF.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "mamba/gguf.h"
#include "mamba/lm.h"
#include "mamba/tokenizer.h"
#include "model/npy.h"
#include "test_util.h"

namespace mamba {
namespace {

namespace fs = std::filesystem;

std::vector<uint8_t> read_bytes(const std::string& p) { return os::read_file(p, 1ull << 30); }

// This process's scratch folder, removed with everything in it when the process exits.
struct ScratchDir {
  fs::path d = fs::temp_directory_path() / ("mamba_test_gguf_" + std::to_string(getpid()));
  ScratchDir() { fs::create_directories(d); }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(d, ec);
  }
};

std::string tmp_path(const std::string& name) {
  static const ScratchDir dir;
  return (dir.d / name).string();
}

// A GGUF parse that must fail with a mamba::Error mentioning `frag`.
void expect_refused(const std::vector<uint8_t>& bytes, const std::string& frag) {
  try {
    GGUFFile f = GGUFFile::parse(bytes, "hostile.gguf");
    for (const auto& n : f.names()) (void)f.tensor(n);
    ADD_FAILURE() << "accepted a file that should fail with '" << frag << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
  }
}

// Little-endian helpers to build hostile files by hand.
struct Bytes {
  std::vector<uint8_t> b;
  Bytes& u32(uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
    return *this;
  }
  Bytes& u64(uint64_t v) {
    for (int i = 0; i < 8; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
    return *this;
  }
  Bytes& s(const std::string& x) {
    u64(x.size());
    b.insert(b.end(), x.begin(), x.end());
    return *this;
  }
  Bytes& head(uint64_t nt, uint64_t nkv) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return u32(3).u64(nt).u64(nkv);
  }
  Bytes& pad(size_t to = 32) {
    while (b.size() % to) b.push_back(0);
    return *this;
  }
  Bytes& zeros(size_t n) {
    b.insert(b.end(), n, 0);
    return *this;
  }
};

TEST(Gguf, ReadsIndependentlyWrittenFile) {
  GGUFFile f = GGUFFile::open(test::data_path("gguf/types.gguf"));
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.get_string("general.architecture"), "fixture");
  EXPECT_EQ(f.get_int("u8"), 200);
  EXPECT_EQ(f.get_int("i8"), -100);
  EXPECT_EQ(f.get_int("u16"), 60000);
  EXPECT_EQ(f.get_int("i16"), -30000);
  EXPECT_EQ(f.get_int("u32"), 4000000000ll);
  EXPECT_EQ(f.get_int("i32"), -2000000000ll);
  EXPECT_EQ(f.get_float("f32"), 0.5);
  EXPECT_TRUE(f.get_bool("bool"));
  EXPECT_EQ(f.get_int("u64"), int64_t{1} << 40);
  EXPECT_EQ(f.get_int("i64"), -(int64_t{1} << 40));
  EXPECT_EQ(f.get_float("f64"), 0.25);
  EXPECT_EQ(f.get_ints("arr.i32"), (std::vector<int64_t>{1, -2, 3}));
  EXPECT_EQ(f.value("arr.f32").floats, (std::vector<double>{1.5, -0.5}));
  EXPECT_EQ(f.get_strings("arr.str"), (std::vector<std::string>{"a b", "\xc3\xa9"}));
  test::expect_error([&] { (void)f.get_string("u8"); }, {"'u8'", "expected a string"});
  test::expect_error([&] { (void)f.get_int("nope"); }, {"missing metadata key 'nope'"});

  auto check = [&](const std::string& name, const Shape& shape, auto value) {
    Tensor t = f.tensor(name);
    ASSERT_EQ(t.shape(), shape) << name;
    for (int64_t i = 0; i < t.numel(); ++i) ASSERT_EQ(t[i], value(i)) << name << "[" << i << "]";
  };
  check("f32", {3, 5}, [](int64_t i) { return static_cast<float>(i) * 0.25f - 1; });
  check("f16", {2, 4}, [](int64_t i) { return static_cast<float>(i) * 0.5f - 2; });
  check("bf16", {4}, [](int64_t i) { return static_cast<float>(i) - 1.5f; });
  check("q8", {2, 32}, [](int64_t i) {
    return std::ldexp(1.0f, -static_cast<int>(i / 32 + 1)) * static_cast<float>(i % 32 - 16);
  });
  check("q4", {1, 64}, [](int64_t i) {
    return 0.5f * static_cast<float>(i / 32 + 1) * static_cast<float>(i % 32 % 16 - 8);
  });
  EXPECT_EQ(f.info("q4k").type, 12u);
  // Q4_K is read (dequantised); its all-zero block (d = dmin = 0) is 256 zeros. Its values are
  // checked against llama.cpp's in test_llamacpp_fixtures.cpp.
  const Tensor q4k = f.tensor("q4k");
  ASSERT_EQ(q4k.numel(), 256);
  for (int64_t i = 0; i < 256; ++i) EXPECT_EQ(q4k.data()[i], 0.0f);
  // The same file with that tensor's type changed to Q2_K (84 bytes a block: still inside the
  // data) is listed and refused by name.
  std::vector<uint8_t> bytes = read_bytes(test::data_path("gguf/types.gguf"));
  const std::string key = std::string("\x03\0\0\0\0\0\0\0q4k", 11);
  auto at = std::search(bytes.begin(), bytes.end(), key.begin(), key.end());
  ASSERT_NE(at, bytes.end());
  const size_t type_at = static_cast<size_t>(at - bytes.begin()) + 11 + 4 + 2 * 8;
  ASSERT_EQ(bytes[type_at], 12);
  bytes[type_at] = 10;
  GGUFFile g = GGUFFile::parse(bytes, "q2k.gguf");
  EXPECT_EQ(g.info("q4k").type, 10u);
  test::expect_error([&] { (void)g.tensor("q4k"); }, {"'q4k'", "Q2_K", "not supported"});
}

TEST(Gguf, EveryTruncationIsRefused) {
  const std::vector<uint8_t> full = read_bytes(test::data_path("gguf/types.gguf"));
  // The file ends with the last tensor's 144 bytes of Q4_K data and 16 bytes of padding (to the
  // 32-byte alignment): any prefix that cuts the header or a tensor's data must be refused,
  // never read past; dropping only the final padding is harmless.
  const size_t data_end = full.size() - 16;
  for (size_t n = 0; n < full.size(); ++n) {
    std::vector<uint8_t> cut(full.begin(), full.begin() + static_cast<ptrdiff_t>(n));
    bool accepted = false;
    try {
      GGUFFile f = GGUFFile::parse(cut, "cut.gguf");
      for (const auto& name : f.names())
        if (f.info(name).type != 12) (void)f.tensor(name);
      accepted = true;
    } catch (const Error&) {
    }
    EXPECT_EQ(accepted, n >= data_end) << "a " << n << "-byte prefix of " << full.size();
  }
}

TEST(Gguf, HostileHeaders) {
  expect_refused({'G', 'G', 'U'}, "not a GGUF file");
  expect_refused(Bytes{}.zeros(24).b, "not a GGUF file");
  {
    Bytes b;
    b.b = {'G', 'G', 'U', 'F'};
    expect_refused(b.u32(1).u64(0).u64(0).b, "version 1");
    Bytes c;
    c.b = {'G', 'G', 'U', 'F'};
    expect_refused(c.u32(0x03000000).u64(0).u64(0).b, "big-endian");
  }
  expect_refused(Bytes{}.head(0, 1ull << 60).b, "metadata count");
  expect_refused(Bytes{}.head(1ull << 60, 0).b, "tensor count");
  expect_refused(Bytes{}.head(0, 1).u64(1ull << 62).zeros(16).b, "string length");
  expect_refused(Bytes{}.head(0, 1).s("k").u32(99).zeros(16).b, "unknown value type 99");
  expect_refused(Bytes{}.head(0, 1).s("k").u32(9).u32(9).u64(1).zeros(16).b, "array of arrays");
  expect_refused(Bytes{}.head(0, 1).s("k").u32(9).u32(4).u64(1ull << 61).zeros(16).b,
                 "more than the file holds");
  expect_refused(Bytes{}.head(0, 1).s("k").u32(9).u32(8).u64(1ull << 40).zeros(16).b,
                 "more than the file holds");
  expect_refused(Bytes{}.head(0, 1).s("k").u32(6).zeros(3).b, "truncated");
  {
    Bytes b;
    b.head(0, 1).s("k").u32(7).b.push_back(2);
    expect_refused(b.zeros(16).b, "bool value 2");
  }
  expect_refused(Bytes{}.head(0, 2).s("k").u32(4).u32(1).s("k").u32(4).u32(1).zeros(16).b,
                 "appears twice");
  expect_refused(Bytes{}.head(0, 1).s("").u32(4).u32(1).zeros(16).b, "is empty");
  expect_refused(Bytes{}.head(0, 1).s("general.alignment").u32(4).u32(24).zeros(16).b,
                 "power of two");
}

// One tensor entry: name, dims (fastest first), type, offset; then `data` bytes of data.
std::vector<uint8_t> one_tensor(const std::vector<uint64_t>& ne, uint32_t type, uint64_t offset,
                                size_t data) {
  Bytes b;
  b.head(1, 0).s("t").u32(static_cast<uint32_t>(ne.size()));
  for (uint64_t n : ne) b.u64(n);
  b.u32(type).u64(offset).pad().zeros(data);
  return b.b;
}

TEST(Gguf, HostileTensors) {
  EXPECT_NO_THROW(GGUFFile::parse(one_tensor({4, 2}, 0, 0, 32), "ok"));
  expect_refused(one_tensor({4, 2}, 0, 0, 31), "outside");
  expect_refused(one_tensor({4, 2}, 0, 32, 32), "outside");
  expect_refused(one_tensor({4, 2}, 0, 8, 64), "not a multiple of the alignment");
  expect_refused(one_tensor({4, 2}, 0, 1ull << 63, 32), "outside");
  expect_refused(one_tensor({4, 0}, 0, 0, 32), "bad or too large dimension");
  expect_refused(one_tensor({1ull << 32, 1ull << 32}, 0, 0, 32), "bad or too large dimension");
  expect_refused(one_tensor({1, 1, 1, 1, 1}, 0, 0, 32), "5 dimensions");
  expect_refused(one_tensor({}, 0, 0, 32), "0 dimensions");
  expect_refused(one_tensor({16}, 8, 0, 64), "block size");    // Q8_0 rows of 16
  expect_refused(one_tensor({32}, 8, 0, 33), "outside");       // one Q8_0 block needs 34 bytes
  expect_refused(one_tensor({256}, 13, 0, 256), "Q5_K");       // listed, refused when read
  expect_refused(one_tensor({256}, 13, 0, 170), "outside");    // its 176 bytes still checked
  expect_refused(one_tensor({256}, 14, 0, 200), "outside");    // Q6_K: 210 bytes a block
  expect_refused(one_tensor({64}, 12, 0, 256), "block size");  // Q4_K rows of 64
  expect_refused(one_tensor({32}, 99, 0, 256), "unknown or removed ggml type type 99");
  {
    Bytes b;  // two tensors sharing bytes
    b.head(2, 0).s("a").u32(1).u64(8).u32(0).u64(0).s("b").u32(1).u64(8).u32(0).u64(0);
    expect_refused(b.pad().zeros(64).b, "overlap");
    Bytes c;
    c.head(2, 0).s("a").u32(1).u64(8).u32(0).u64(0).s("a").u32(1).u64(8).u32(0).u64(32);
    expect_refused(c.pad().zeros(64).b, "appears twice");
  }
}

// ggml's Q8_0 / Q4_0 rounding: each value within half a step of its block's scale (plus the
// scale's own f16 rounding, 2^-11 relative, times the largest code: 127 or 8). Q4_0's codes are
// -8..7 with the largest magnitude mapped to -8, so a value of the other sign near it is clipped
// to code 7: there the error reaches one whole step.
TEST(Gguf, QuantisationBounds) {
  Rng rng(3);
  Tensor xt({32 * 64});
  rng.fill_normal(xt, 0, 1);
  std::vector<float> x(xt.data(), xt.data() + xt.numel());
  for (int j = 0; j < 32; ++j) x[32 * 5 + j] = 0;  // an all-zero block
  for (GGMLType t : {GGMLType::Q8_0, GGMLType::Q4_0}) {
    const std::vector<uint8_t> q = ggml_quantize(t, x.data(), static_cast<int64_t>(x.size()));
    ASSERT_EQ(q.size(), ggml_nbytes(t, static_cast<int64_t>(x.size())));
    std::vector<float> y(x.size());
    ggml_dequantize(t, q.data(), static_cast<int64_t>(x.size()), y.data());
    for (size_t b = 0; b < x.size() / 32; ++b) {
      float amax = 0;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[32 * b + j]));
      const float step = t == GGMLType::Q8_0 ? amax / 127 : amax / 8;
      const float codes = t == GGMLType::Q8_0 ? 127 : 8;
      for (int j = 0; j < 32; ++j) {
        const float e = std::fabs(y[32 * b + j] - x[32 * b + j]);
        const float steps = t == GGMLType::Q8_0 ? 0.5f : 1.0f;
        ASSERT_LE(e, steps * step + step * codes * 0x1p-11f + 1e-7f)
            << ggml_type_name(static_cast<uint32_t>(t)) << " block " << b << " value " << j;
      }
    }
  }
  const float nan = std::nanf("");
  std::vector<float> bad(32, 1.0f);
  bad[7] = nan;
  test::expect_error([&] { (void)ggml_quantize(GGMLType::Q8_0, bad.data(), 32); }, {"not finite"});
}

// ours -> GGUF -> ours for the golden checkpoints.
Tensor logits_of(const MambaLM& lm) {
  std::vector<int32_t> ids;
  for (int i = 0; i < 12; ++i) ids.push_back((i * 37 + 5) % 101);
  return lm.forward(ids, 2, 6);
}

// The model with each weight that GGUF stores as `type` replaced by its rounded value.
MambaLM rounded_like_gguf(const std::string& dir, GGMLType type) {
  MambaLM lm = MambaLM::load(dir);
  std::map<std::string, Tensor> sd;
  for (auto& [name, p] : lm.named_parameters()) {
    Tensor v = p->value.to_f32().clone();
    const bool matrix = v.ndim() == 2 && name.find(".norm") == std::string::npos &&
                        name.find("A_log") == std::string::npos;
    if (matrix) {
      GGMLType t = type;
      if ((t == GGMLType::Q8_0 || t == GGMLType::Q4_0) && v.shape().back() % 32) t = GGMLType::F16;
      auto q = ggml_quantize(t, v.data(), v.numel());
      ggml_dequantize(t, q.data(), v.numel(), v.data());
    }
    sd[name] = v;
  }
  lm.load_state_dict(sd, "rounded");
  return lm;
}

class GgufLM : public ::testing::TestWithParam<std::string> {};

TEST_P(GgufLM, RoundTripF32) {
  const std::string dir = test::golden_path(GetParam());
  MambaLM lm = MambaLM::load(dir);
  const std::string p = tmp_path(GetParam() + "_f32.gguf");
  lm.save_gguf(p, GGMLType::F32);
  MambaLM back = MambaLM::load(p);  // a file: loaded as GGUF
  EXPECT_EQ(back.config().d_model, lm.config().d_model);
  EXPECT_EQ(back.vocab(), lm.vocab());
  EXPECT_EQ(back.num_parameters(), lm.num_parameters());
  // Every weight is bit for bit the same except A_log, which goes through A = -exp(A_log) and
  // back (log(-A) in double: within an ulp or two).
  auto a = lm.named_parameters(), b = back.named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].first, b[i].first);
    const Tensor x = a[i].second->value.to_f32(), y = b[i].second->value.to_f32();
    if (a[i].first.find("A_log") != std::string::npos)
      EXPECT_TRUE(test::all_close(y, x, {1e-6, 1e-6}, a[i].first));
    else
      EXPECT_EQ(std::memcmp(x.data(), y.data(), static_cast<size_t>(x.numel()) * 4), 0)
          << a[i].first;
  }
  EXPECT_TRUE(test::close_report(logits_of(back), logits_of(lm), tol::kGoldenF32, "f32 logits"));
  fs::remove(p);
}

// 16-bit and Q8_0 / Q4_0 files against the fp32 model holding the same rounded weights: only
// A_log's exp/log trip and the order of fp32 sums differ (kHalfVsRoundedF32).
TEST_P(GgufLM, RoundTripQuantisedAgainstRoundedModel) {
  const std::string dir = test::golden_path(GetParam());
  MambaLM lm = MambaLM::load(dir);
  for (GGMLType t : {GGMLType::F16, GGMLType::BF16, GGMLType::Q8_0, GGMLType::Q4_0}) {
    const std::string name = ggml_type_name(static_cast<uint32_t>(t));
    const std::string p = tmp_path(GetParam() + "_" + name + ".gguf");
    lm.save_gguf(p, t);
    MambaLM back = MambaLM::load_gguf(p);
    MambaLM ref = rounded_like_gguf(dir, t);
    EXPECT_TRUE(test::close_report(logits_of(back), logits_of(ref), tol::kHalfVsRoundedF32, name));
    // and loaded as f16 weights (stored exactly when the file is F16)
    if (t == GGMLType::F16) {
      MambaLM h = MambaLM::load(p, WeightDType::f16);
      EXPECT_TRUE(test::close_report(logits_of(h), logits_of(ref), tol::kHalfVsRoundedF32,
                                     "F16 file as f16 weights"));
    }
    fs::remove(p);
  }
}

INSTANTIATE_TEST_SUITE_P(Golden, GgufLM, ::testing::Values("lm_mamba1_ckpt", "lm_mamba2_ckpt"));

// Mamba-2 with 2 groups: the norm's (G, d_inner / G) layout and the group count.
TEST(Gguf, Mamba2GroupsAndUntiedHead) {
  ModelConfig c;
  c.d_model = 32, c.n_layer = 2, c.vocab_size = 40, c.tie_embeddings = false;
  Mamba2Config m;
  m.d_state = 8, m.headdim = 16, m.ngroups = 2, m.chunk_size = 8;
  c.ssm_cfg = m;
  MambaLM lm(c, 7);
  const std::string p = tmp_path("m2g2.gguf");
  lm.save_gguf(p, GGMLType::F32);
  GGUFFile f = GGUFFile::open(p);
  EXPECT_EQ(f.get_string("general.architecture"), "mamba2");
  EXPECT_EQ(f.get_int("mamba2.ssm.group_count"), 2);
  EXPECT_EQ(f.get_int("mamba2.ssm.time_step_rank"), 4);  // heads
  EXPECT_EQ(f.info("blk.1.ssm_norm.weight").ne, (std::vector<int64_t>{32, 2}));
  EXPECT_EQ(f.info("blk.0.ssm_a").ne, (std::vector<int64_t>{1, 4}));
  EXPECT_EQ(f.info("blk.0.ssm_conv1d.weight").ne, (std::vector<int64_t>{4, 64 + 32}));
  EXPECT_TRUE(f.has("output.weight"));
  EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "none");
  MambaLM back = MambaLM::load_gguf(p);
  EXPECT_FALSE(back.config().tie_embeddings);
  std::vector<int32_t> ids{1, 5, 9, 2, 33, 39};
  EXPECT_TRUE(test::all_close(back.forward(ids, 1, 6), lm.forward(ids, 1, 6), tol::kGoldenF32,
                              "m2 g2 logits"));
  test::expect_error([&] { (void)Tokenizer::from_gguf(p); }, {"'none'", "--tokenizer"});
  fs::remove(p);
}

TEST(Gguf, RefusesWhatLlamaCppCannotHold) {
  ModelConfig c;
  c.d_model = 16, c.n_layer = 1, c.vocab_size = 16, c.d_intermediate = 32;
  Mamba1Config m;
  c.ssm_cfg = m;
  MambaLM lm(c, 1);
  test::expect_error([&] { lm.save_gguf(tmp_path("x.gguf"), GGMLType::F32); }, {"MLP layers"});
  // llama.cpp's Mamba-1 graph takes d_inner = 2 * d_model only
  c.d_intermediate = 0;
  m.expand = 3;
  c.ssm_cfg = m;
  MambaLM e3(c, 1);
  test::expect_error([&] { e3.save_gguf(tmp_path("x.gguf"), GGMLType::F32); }, {"expand=2"});
}

TEST(Gguf, LoaderRefusesWrongArchitectureAndNames) {
  const std::string dir = test::golden_path("lm_mamba1_ckpt");
  const std::string p = tmp_path("arch.gguf");
  MambaLM::load(dir).save_gguf(p, GGMLType::F32);
  std::vector<uint8_t> b = read_bytes(p);
  // "mamba" -> "llama" in general.architecture (same length).
  const std::string from = "mamba", to = "llama";
  auto it = std::search(b.begin(), b.end(), from.begin(), from.end());
  ASSERT_NE(it, b.end());
  std::copy(to.begin(), to.end(), it);
  const std::string q = tmp_path("arch2.gguf");
  std::ofstream(q, std::ios::binary)
      .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  test::expect_error([&] { (void)MambaLM::load_gguf(q); }, {"'llama'", "mamba2"});
  // A renamed tensor: "blk.0.ssm_x" -> "blk.0.ssm_y".
  b = read_bytes(p);
  const std::string t = "blk.0.ssm_x";
  it = std::search(b.begin(), b.end(), t.begin(), t.end());
  ASSERT_NE(it, b.end());
  it[10] = 'y';
  std::ofstream(q, std::ios::binary)
      .write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  test::expect_error([&] { (void)MambaLM::load_gguf(q); },
                     {"unexpected tensor 'blk.0.ssm_y.weight'"});
  fs::remove(p), fs::remove(q);
}

// The vocabulary embedded as llama.cpp does, read back: the same ids and text as tokenizer.json.
void expect_same_tokenizer(const std::string& json_path, int64_t vocab,
                           const std::vector<std::string>& texts) {
  ModelConfig c;
  c.d_model = 8, c.n_layer = 1, c.vocab_size = vocab;
  Mamba1Config m;
  m.d_state = 4;
  c.ssm_cfg = m;
  MambaLM lm(c, 1);
  const std::string p = tmp_path("tok.gguf");
  lm.save_gguf(p, GGMLType::F32, json_path);
  Tokenizer a = Tokenizer::from_file(json_path), b = Tokenizer::from_model_dir(p);
  GGUFFile f = GGUFFile::open(p);
  const auto& types = f.get_ints("tokenizer.ggml.token_type");
  EXPECT_EQ(types.size(), static_cast<size_t>(lm.vocab()));
  EXPECT_EQ(types.back(), 5);  // padding rows: UNUSED "[PADn]"
  EXPECT_EQ(a.eos_id(), b.eos_id());
  for (const auto& t : texts) {
    EXPECT_EQ(b.encode(t), a.encode(t)) << t;
    EXPECT_EQ(b.decode(a.encode(t)), a.decode(a.encode(t))) << t;
  }
  // Another pre-tokenizer split (same length, so the file stays valid) is refused by name.
  std::vector<uint8_t> bytes = read_bytes(p);
  const std::string pre = std::string("\x05\0\0\0\0\0\0\0gpt-2", 13);
  auto at = std::search(bytes.begin(), bytes.end(), pre.begin(), pre.end());
  ASSERT_NE(at, bytes.end());
  std::memcpy(&*(at + 8), "qwen2", 5);
  const std::string q = tmp_path("tok_qwen2.gguf");
  std::ofstream(q, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
  test::expect_error([&] { (void)Tokenizer::from_model_dir(q); }, {"'qwen2'", "--tokenizer"});
  fs::remove(q);
  fs::remove(p);
}

TEST(Gguf, TokenizerRoundTripTiny) {
  expect_same_tokenizer(test::data_path("tokenizer/tiny_bpe_tokenizer.json"), 267,
                        {"the lower low", " the  lower<|endoftext|>x", "caf\xc3\xa9 er<mask>"});
}

TEST(Gguf, TokenizerRoundTripNeoX) {
  const std::string tok = test::shared_path("tokenizers/gpt-neox-20b-tokenizer.json");
  const std::string cases = test::shared_path("golden/tokenizer_gpt_neox_cases.json");
  if (tok.empty() || cases.empty()) GTEST_SKIP() << "../shared tokenizer files are absent";
  std::vector<std::string> texts;
  const auto bytes = read_bytes(cases);
  for (const auto& c : nlohmann::json::parse(bytes.begin(), bytes.end()))
    texts.push_back(c["text"].get<std::string>());
  ASSERT_GT(texts.size(), 5u);
  expect_same_tokenizer(tok, 50277, texts);
}

TEST(Gguf, CliConvertAndRun) {
  const std::string p = tmp_path("cli.gguf");
  auto r = test::run_cli("convert --model " + test::golden_path("lm_mamba2_ckpt") +
                         " --format gguf --gguf-type q8_0 --out " + p);
  ASSERT_EQ(r.status, 0) << r.out;
  GGUFFile f = GGUFFile::open(p);
  EXPECT_EQ(f.info("blk.0.ssm_in.weight").type, static_cast<uint32_t>(GGMLType::Q8_0));
  EXPECT_EQ(f.info("blk.0.ssm_conv1d.weight").type, 0u);
  const std::string ids = tmp_path("ids.npy");
  write_npy_i64(ids, {1, 4}, {3, 14, 15, 92});
  const std::string logits = tmp_path("logits.npy");
  r = test::run_cli("score --model " + p + " --ids " + ids + " --out " + logits);
  EXPECT_EQ(r.status, 0) << r.out;
  r = test::run_cli("generate --model " + p + " --ids " + ids + " -n 3 --greedy -q");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_EQ(read_npy(logits).shape, (Shape{1, 4, 104}));
  fs::remove(p), fs::remove(ids), fs::remove(logits);
}

}  // namespace
}  // namespace mamba
