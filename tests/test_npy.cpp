// .npy: files written by numpy itself (fixtures from scripts/make_torch_fixture.py) read back
// exactly and re-encode byte for byte; our writer round-trips; hostile headers give errors.
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "model/npy.h"
#include "test_util.h"

using namespace mamba;

namespace {

std::string npy_path(const std::string& f) { return test::data_path("torch/" + f); }

std::string tmp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() /
          ("mamba_test_npy_" +
           std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()) + "_" +
           name))
      .string();
}

std::vector<uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }

// A v1.0 file with the given header text (padded like numpy) and data bytes.
std::vector<uint8_t> npy_with_header(std::string header, const std::vector<uint8_t>& data) {
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::string s = "\x93NUMPY";
  s += '\x01', s += '\x00';
  s += static_cast<char>(header.size() & 0xFF), s += static_cast<char>(header.size() >> 8);
  s += header;
  s.append(data.begin(), data.end());
  return bytes_of(s);
}

using test::expect_error;

}  // namespace

TEST(Npy, ReadsFilesWrittenByNumpy) {
  std::ifstream f(npy_path("npy_expected.json"));
  nlohmann::json exp = nlohmann::json::parse(f);
  ASSERT_EQ(exp.size(), 4u);
  for (auto it = exp.begin(); it != exp.end(); ++it) {
    NpyArray a = read_npy(npy_path(it.key()));
    const auto& e = it.value();
    EXPECT_EQ(a.dtype, e["dtype"].get<std::string>()) << it.key();
    EXPECT_EQ(a.shape, e["shape"].get<Shape>()) << it.key();
    if (a.dtype == "<f4") {
      Tensor t = npy_to_tensor(a, it.key());
      auto v = e["values"].get<std::vector<double>>();
      ASSERT_EQ(static_cast<int64_t>(v.size()), t.numel());
      for (size_t k = 0; k < v.size(); ++k)
        EXPECT_EQ(t[static_cast<int64_t>(k)], static_cast<float>(v[k])) << it.key();
      EXPECT_THROW(npy_to_i64(a, it.key()), Error);
    } else {
      EXPECT_EQ(npy_to_i64(a, it.key()), e["values"].get<std::vector<int64_t>>()) << it.key();
      EXPECT_THROW(npy_to_tensor(a, it.key()), Error);
    }
  }
}

TEST(Npy, EncodesExactlyAsNumpyDoes) {
  // numpy's own v1.0 files re-encode to the same bytes (header text and 64-byte padding).
  for (const char* f : {"npy_f32_2x3.npy", "npy_i64_3.npy", "npy_i32_2x2.npy"}) {
    auto file = os::read_file(npy_path(f));
    EXPECT_EQ(encode_npy(parse_npy(file, f)), file) << f;
  }
  // The version 2.0 file reads; we write it back as 1.0 with the same content.
  auto v2 = read_npy(npy_path("npy_f32_v2.npy"));
  EXPECT_EQ(v2.shape, (Shape{1, 2, 3}));
  EXPECT_EQ(parse_npy(encode_npy(v2), "re").data, v2.data);
}

TEST(Npy, WriteReadRoundTrip) {
  Rng rng(7);
  for (Shape s : {Shape{2, 3, 5}, Shape{17}, Shape{}, Shape{0, 4}, Shape{1, 1, 1, 33}}) {
    Tensor t = test::randn(s, rng);
    std::string p = tmp_path("f32.npy");
    write_npy(p, t);
    NpyArray a = read_npy(p);
    EXPECT_EQ(a.dtype, "<f4");
    EXPECT_EQ(a.shape, s);
    Tensor back = npy_to_tensor(a);
    ASSERT_EQ(back.shape(), s);
    EXPECT_EQ(std::memcmp(back.data(), t.data(), static_cast<size_t>(t.numel()) * 4), 0);
    std::filesystem::remove(p);
  }
  std::vector<int64_t> ids = {0, 1, -1, 50279, INT64_MAX, INT64_MIN};
  std::string p = tmp_path("i64.npy");
  write_npy_i64(p, {2, 3}, ids);
  NpyArray a = read_npy(p);
  EXPECT_EQ(a.dtype, "<i8");
  EXPECT_EQ(a.shape, (Shape{2, 3}));
  EXPECT_EQ(npy_to_i64(a), ids);
  EXPECT_THROW(write_npy_i64(p, {4}, ids), Error);  // 6 values for 4 elements
  std::filesystem::remove(p);
}

TEST(Npy, HostileHeadersGiveClearErrors) {
  auto hdr = [](const std::string& h, size_t n = 24) {
    return npy_with_header(h, std::vector<uint8_t>(n, 0));
  };
  const std::string ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  ASSERT_NO_THROW(parse_npy(hdr(ok), "ok"));
  expect_error(
      [&] {
        parse_npy(hdr("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }"), "be.npy");
      },
      {"be.npy", "'>f4'", "big-endian"});
  expect_error(
      [&] { parse_npy(hdr("{'descr': '<f8', 'fortran_order': False, 'shape': (3,), }"), "x"); },
      {"'<f8'", "not supported"});
  expect_error(
      [&] { parse_npy(hdr("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }"), "x"); },
      {"Fortran"});
  expect_error(
      [&] {
        parse_npy(hdr("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}"), "x");
      },
      {"'x'"});
  expect_error(
      [&] {
        parse_npy(hdr("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}"),
                  "x");
      },
      {"repeated key 'descr'"});
  expect_error([&] { parse_npy(hdr("{'descr': '<f4', 'shape': (2, 3), }"), "x"); },
               {"fortran_order"});
  expect_error(
      [&] { parse_npy(hdr("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }"), "x"); },
      {"bad .npy header"});
  expect_error(
      [&] {
        parse_npy(hdr("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, "
                      "1099511627776), }"),
                  "x");
      },
      {"too large"});
  expect_error([&] { parse_npy(hdr(ok, 20), "short.npy"); }, {"short.npy", "truncated"});
  expect_error([&] { parse_npy(hdr(ok, 28), "long.npy"); }, {"28 bytes", "need 24"});
  expect_error([&] { parse_npy(bytes_of("PK\x03\x04 not npy at all"), "z"); }, {"not a .npy file"});
  auto bad_len = hdr(ok);
  bad_len[8] = 0xFF, bad_len[9] = 0xFF;  // header length past the end
  expect_error([&] { parse_npy(bad_len, "x"); }, {"truncated"});
  auto bad_ver = hdr(ok);
  bad_ver[6] = 9;
  expect_error([&] { parse_npy(bad_ver, "x"); }, {"version 9"});
  // Every prefix of a real numpy file is refused.
  auto file = os::read_file(npy_path("npy_f32_2x3.npy"));
  for (size_t n = 0; n < file.size(); ++n)
    EXPECT_THROW(
        parse_npy(std::vector<uint8_t>(file.begin(), file.begin() + static_cast<std::ptrdiff_t>(n)),
                  "cut"),
        Error)
        << n;
  // Random edits of the header: load or throw mamba::Error, nothing else.
  Rng rng(3);
  for (int it = 0; it < 2000; ++it) {
    auto b = file;
    b[rng.below(80)] = static_cast<uint8_t>(rng.next());
    try {
      parse_npy(b, "fuzz");
    } catch (const Error&) {
    }
  }
  expect_error([] { read_npy("/nonexistent/x.npy"); }, {"/nonexistent/x.npy"});
}
