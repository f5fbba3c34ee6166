// Core: tensor views and shape checks, GEMM against a naive loop, parallel_for coverage,
// safetensors round trip and hostile files, atomic writes.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <thread>
#include <vector>

#include "core/gemm.h"
#include "mamba/parallel.h"
#include "test_util.h"

using namespace mamba;

TEST(Tensor, ViewsShareStorageAndCheckBounds) {
  Tensor t = Tensor::from({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor r = t.select(1);
  EXPECT_EQ(r.shape(), (Shape{3}));
  EXPECT_EQ(r[0], 4.f);
  r[0] = 40.f;
  EXPECT_EQ(t[3], 40.f);
  EXPECT_EQ(t.reshape({3, -1}).shape(), (Shape{3, 2}));
  EXPECT_THROW(t.reshape({4, -1}), Error);
  EXPECT_THROW(t.select(2), Error);
  EXPECT_THROW(t.narrow(1, 2), Error);
  Tensor c = t.clone();
  c[0] = -1;
  EXPECT_EQ(t[0], 1.f);
}

TEST(Tensor, ShapeCheckMessageNamesTensorAndShapes) {
  Tensor t({2, 4, 7});
  EXPECT_NO_THROW(check_shape(t, "x", {2, -1, 7}));
  try {
    check_shape(t, "selective_scan: delta", {2, 4, 8});
    FAIL() << "no throw";
  } catch (const Error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("delta"), std::string::npos) << m;
    EXPECT_NE(m.find("(2,4,8)"), std::string::npos) << m;
    EXPECT_NE(m.find("(2,4,7)"), std::string::npos) << m;
  }
  EXPECT_THROW(check_shape(Tensor(), "absent", {1}), Error);
  Tensor n = Tensor::from({2}, {1.f, NAN});
  EXPECT_THROW(check_finite(n, "n"), Error);
}

TEST(Gemm, MatchesNaiveLoopAllTransposes) {
  Rng rng(1);
  for (bool ta : {false, true})
    for (bool tb : {false, true}) {
      for (int64_t M : {17, 1}) {
        const int64_t N = 33, K = 15;
        Tensor A = test::randn(ta ? Shape{K, M} : Shape{M, K}, rng);
        Tensor B = test::randn(tb ? Shape{N, K} : Shape{K, N}, rng);
        Tensor C = test::randn({M, N}, rng), C0 = C.clone();
        gemm(ta, tb, M, N, K, 0.5f, A.data(), ta ? M : K, B.data(), tb ? K : N, 2.f, C.data(), N);
        Tensor E({M, N});
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) {
            double s = 0;
            for (int64_t k = 0; k < K; ++k)
              s += (double)(ta ? A[k * M + m] : A[m * K + k]) * (tb ? B[n * K + k] : B[k * N + n]);
            E[m * N + n] = (float)(0.5 * s + 2.0 * C0[m * N + n]);
          }
        EXPECT_TRUE(test::all_close(C, E, {1e-5, 1e-5}, "gemm"));
      }  // M = 1 takes the GEMV path
    }
}

TEST(Parallel, CoversRangeExactlyOnce) {
  for (int64_t n : {0, 1, 7, 1000}) {
    std::vector<int> hits(n, 0);
    parallel_for(n, 3, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[i], 1);
  }
}

// parallel_for_dynamic: every item in exactly one range, each range a run [k * run, ...) (the last
// cut at n), whatever the run, grain and thread count; inside with_team too.
TEST(Parallel, DynamicCoversRangeExactlyOnceInRuns) {
  for (int64_t n : {0, 1, 7, 1000})
    for (int64_t run : {0, 1, 3, 64, 5000})
      for (int64_t grain : {1, 100}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::atomic<int> bad{0};
        auto body = [&] {
          parallel_for_dynamic(n, run, grain, [&](int64_t b, int64_t e) {
            const int64_t r = std::max<int64_t>(run, 1);
            if (b % r != 0 || e != std::min(n, b + r)) ++bad;
            for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)]++;
          });
        };
        body();
        with_team(body);
        EXPECT_EQ(bad.load(), 0) << "n " << n << " run " << run;
        for (int64_t i = 0; i < n; ++i) EXPECT_EQ(hits[static_cast<size_t>(i)].load(), 2) << i;
      }
}

// with_team (a decode step's threads): parallel_for inside it cuts the same ranges and runs range
// c on thread c, as an OpenMP region does; many calls in a row, nested calls, calls from inside a
// range, one thread, and an exception from the body (rethrown after the team stopped, the team
// usable again).
TEST(Parallel, TeamRunsTheSameRangesOnTheSameThreads) {
  const int threads = num_threads();
  auto ranges = [](int64_t n, int64_t grain) {
    std::vector<std::pair<int64_t, int64_t>> r;
    std::vector<int> tid;
    std::mutex mu;
    parallel_for(n, grain, [&](int64_t b, int64_t e) {
      std::lock_guard<std::mutex> lock(mu);
      r.emplace_back(b, e);
    });
    std::sort(r.begin(), r.end());
    return r;
  };
  std::vector<std::vector<std::pair<int64_t, int64_t>>> outside, inside;
  const std::vector<std::pair<int64_t, int64_t>> cases{{1, 1}, {7, 3},   {1000, 3}, {1000, 600},
                                                       {5, 1}, {64, 64}, {65, 64}};
  for (auto [n, g] : cases) outside.push_back(ranges(n, g));
  int64_t calls = 0;
  with_team([&] {
    EXPECT_TRUE(in_parallel() || threads == 1);
    for (int rep = 0; rep < 200; ++rep)  // many hand-offs in a row
      for (size_t c = 0; c < cases.size(); ++c) {
        auto r = ranges(cases[c].first, cases[c].second);
        if (rep == 0) inside.push_back(r);
        ASSERT_EQ(r, inside[c]) << "rep " << rep;
        ++calls;
      }
    // A parallel_for inside a range runs inline on that range's thread.
    std::vector<int> hits(100, 0);
    parallel_for(4, 1, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q)
        parallel_for(25, 1, [&](int64_t b2, int64_t e2) {
          EXPECT_EQ(b2, 0);
          EXPECT_EQ(e2, 25);
          for (int64_t i = b2; i < e2; ++i) hits[q * 25 + i]++;
        });
    });
    for (int h : hits) EXPECT_EQ(h, 1);
    // A nested with_team runs its body directly.
    bool ran = false;
    with_team([&] { ran = true; });
    EXPECT_TRUE(ran);
  });
  EXPECT_EQ(calls, 200 * static_cast<int64_t>(cases.size()));
  EXPECT_EQ(inside, outside);
  // The first range runs on the calling thread, inside the team as outside; the others not.
  auto first_range_here = [&] {
    const auto me = std::this_thread::get_id();
    std::vector<int> here(static_cast<size_t>(threads), -1);
    parallel_for(threads, 1, [&](int64_t b, int64_t) {
      here[static_cast<size_t>(b)] = std::this_thread::get_id() == me;
    });
    return here;
  };
  std::vector<int> h_in;
  with_team([&] { h_in = first_range_here(); });
  EXPECT_EQ(h_in, first_range_here());
  EXPECT_EQ(h_in[0], 1);
  // An exception from the body comes out after the team stopped; the next team works.
  test::expect_error([] { with_team([] { throw Error("body failed"); }); }, {"body failed"});
  std::atomic<int64_t> sum{0};
  with_team([&] {
    parallel_for(1000, 10, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) sum += i;
    });
  });
  EXPECT_EQ(sum.load(), 999 * 1000 / 2);
  // One thread: the body runs directly.
  set_num_threads(1);
  bool ran = false;
  with_team([&] {
    ran = true;
    EXPECT_EQ(detail::parallel_chunks(1000, 1), 1);
  });
  EXPECT_TRUE(ran);
  set_num_threads(threads);
}

namespace {
std::string tmp_path(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("mamba_test_" + name)).string();
}
std::vector<uint8_t> read_all(const std::string& p) { return os::read_file(p); }
void write_all(const std::string& p, const std::vector<uint8_t>& b) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), (std::streamsize)b.size());
}
std::vector<uint8_t> with_header(const std::string& json, size_t data_bytes) {
  std::vector<uint8_t> b;
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) b.push_back((uint8_t)(n >> (8 * i)));
  for (char c : json) b.push_back((uint8_t)c);
  for (size_t i = 0; i < data_bytes; ++i) b.push_back(0);
  return b;
}
}  // namespace

TEST(Safetensors, RoundTripKeepsValuesOrderAndMetadata) {
  Rng rng(2);
  Tensor a = test::randn({3, 4}, rng), b = test::randn({5}, rng);
  std::string p = tmp_path("rt.safetensors");
  save_safetensors(p, {{"w.b", b}, {"w.a", a}}, {{"format", "pt"}});
  auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"w.b", "w.a"}));
  EXPECT_EQ(f.meta("format"), "pt");
  EXPECT_TRUE(test::all_close(f.tensor("w.a"), a, {0, 0}));
  EXPECT_TRUE(test::all_close(f.tensor("w.b", {5}), b, {0, 0}));
  EXPECT_THROW(f.tensor("w.b", {6}), Error);
  EXPECT_THROW(f.tensor("missing"), Error);
  EXPECT_FALSE(os::exists(p + ".tmp"));
  std::remove(p.c_str());
}

// Loading without an intermediate copy (issue 19 item 3): read_into converts a tensor straight
// into an fp32 weight (the same values as tensor()) or rounds it into a 16-bit one; release_pages
// drops the mapped pages (a large tensor here: several whole pages) and the file still reads the
// same afterwards (the kernel's page cache serves them again).
TEST(Safetensors, ReadIntoAWeightAndReleasePages) {
  Rng rng(4);
  Tensor a = test::randn({64, 300}, rng), b = test::randn({7}, rng);
  std::string p = tmp_path("into.safetensors");
  save_safetensors(p, {{"a", a}, {"b", b}});
  auto f = SafetensorsFile::open(p);
  Weight wa = Weight::zeros({64, 300}), wb = Weight::zeros({7});
  f.read_into("a", wa);
  f.read_into("b", wb);
  EXPECT_EQ(test::max_abs_diff(wa.f32(), a), 0.0);
  EXPECT_EQ(test::max_abs_diff(wb.f32(), b), 0.0);
  Weight half(Tensor({64, 300}), WeightDType::bf16);
  f.read_into("a", half);
  Weight want(a, WeightDType::bf16);
  EXPECT_EQ(test::max_abs_diff(half.to_f32(), want.to_f32()), 0.0);  // the same rounding
  Weight wrong = Weight::zeros({300, 64});
  test::expect_error([&] { f.read_into("a", wrong); }, {"'a'", "(64,300)", "(300,64)"});
  f.release_pages("a");
  f.release_pages("b");
  EXPECT_EQ(test::max_abs_diff(f.tensor("a"), a), 0.0);
  EXPECT_EQ(test::max_abs_diff(f.tensor("b"), b), 0.0);
  // A file parsed from memory (not mapped): release_pages leaves its bytes alone.
  std::ifstream in(p, std::ios::binary);
  std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                             std::istreambuf_iterator<char>());
  auto g = SafetensorsFile::parse(std::move(bytes), "in memory");
  g.release_pages("a");
  EXPECT_EQ(test::max_abs_diff(g.tensor("a"), a), 0.0);
  std::filesystem::remove(p);
}

TEST(Safetensors, ReadsGoldenFile) {
  auto f = SafetensorsFile::open(test::golden_path("mamba1_d16_n64.safetensors"));
  EXPECT_EQ(f.meta("param_count"), "7968");
  EXPECT_EQ(f.info("params.x_proj.weight").shape, (Shape{129, 32}));
  Tensor x = f.tensor("x");
  EXPECT_EQ(x.shape(), (Shape{2, 33, 16}));
}

TEST(Safetensors, HostileFilesGiveClearErrors) {
  std::string p = tmp_path("bad.safetensors");
  auto expect_error = [&](const std::vector<uint8_t>& bytes, const std::string& needle) {
    write_all(p, bytes);
    try {
      SafetensorsFile::open(p);
      ADD_FAILURE() << "no error for case expecting '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_error({1, 2, 3}, "not a safetensors file");
  expect_error({255, 255, 255, 255, 255, 255, 255, 127}, "exceeds the limit");
  {
    auto b = with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8);
    b.resize(b.size() - 4);  // truncated data
    expect_error(b, "outside");
  }
  {
    auto b = with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 0);
    b.resize(12);  // truncated header
    expect_error(b, "truncated");
  }
  expect_error(with_header(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
               "need 12");
  expect_error(with_header(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8),
               "unknown dtype");
  expect_error(with_header(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
               "bad dimension");
  expect_error(with_header(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
               "outside");
  expect_error(
      with_header(
          R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
          8),
      "overlap");
  expect_error(with_header(R"({"a":)", 8), "not valid JSON");
  // 300,000 levels of nesting: refused while parsing (no deep value is ever built, so nothing
  // recursive overflows the stack afterwards).
  expect_error(
      with_header("{\"a\":" + std::string(300000, '[') + std::string(300000, ']') + "}", 8),
      "nested deeper than 256");
  expect_error(
      with_header(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                  8),
      "too large");
  {
    auto b = with_header(R"({"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}})", 8);
    write_all(p, b);
    auto f = SafetensorsFile::open(p);
    EXPECT_THROW(f.tensor("a"), Error);  // not a float tensor
    EXPECT_EQ(f.tensor_i64("a").size(), 1u);
  }
  {  // empty integer tensors (found by fuzz_safetensors: a null memcpy, UBSan)
    auto b = with_header(
        R"({"a":{"dtype":"I64","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"I32","shape":[2,0],"data_offsets":[0,0]}})",
        0);
    write_all(p, b);
    auto f = SafetensorsFile::open(p);
    Shape s;
    EXPECT_TRUE(f.tensor_i64("a", &s).empty());
    EXPECT_EQ(s, Shape{0});
    EXPECT_TRUE(f.tensor_i64("b").empty());
  }
  std::remove(p.c_str());
}

TEST(Safetensors, HalfConversionsRoundTrip) {
  for (float v : {0.f, 1.f, -2.5f, 65504.f, 6.1035156e-05f, 5.9604645e-08f, 0.333251953125f}) {
    EXPECT_EQ(f16_to_f32(f32_to_f16(v)), v) << v;
  }
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.5f)), 1.5f);
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(3.140625f)), 3.140625f);
  EXPECT_TRUE(std::isinf(f16_to_f32(f32_to_f16(1e6f))));
}

TEST(Os, AtomicWriteReplacesWholeFile) {
  std::string p = tmp_path("atomic.bin");
  std::string a(1000, 'a'), b = "short";
  os::write_file_atomic(p, a.data(), a.size());
  os::write_file_atomic(p, b.data(), b.size());
  auto got = read_all(p);
  EXPECT_EQ(std::string(got.begin(), got.end()), b);
  EXPECT_THROW(os::read_file(p + ".does-not-exist"), Error);
  std::remove(p.c_str());
}

// Issue 18, item 3: memory is checked before it is taken. A tensor larger than the memory this
// process can get fails at once with a mamba::Error naming the bytes needed and available (never
// std::bad_alloc, never an overcommitted buffer the OOM killer ends later).
TEST(Os, HugeAllocationsFailWithBytesNeededAndAvailable) {
  const uint64_t avail = os::available_memory_bytes();
  ASSERT_GT(avail, 0u) << "this platform should report its available memory";
  test::expect_error(
      [] {
        Tensor::empty({1 << 20, 1 << 20, 1 << 10});
      },
      {"(1048576,1048576,1024)", "needs 4503599627370496 bytes", "available"});
  test::expect_error([&] { os::check_memory(avail + (1ull << 30), "a thing"); },
                     {"a thing needs", "bytes", "are available"});
  os::check_memory(1 << 20, "a small thing");  // fits
  // Large allocations that fit still work (64 MiB: past the size from which they are checked).
  Tensor t = Tensor::empty({16 << 20});
  EXPECT_EQ(t.numel(), 16 << 20);
  // Past the shape arithmetic's own limit: a clear error too.
  test::expect_error([] { Tensor::empty({int64_t{1} << 62}); }, {"too large to allocate"});
}

// The tensor cache (os::set_tensor_cache_limit): freed storage of 128 KiB and more is reused by
// the next tensor it fits (at most 1/8 larger), the bytes it holds never exceed the limit (oldest
// blocks go first), reused storage handed out by zeros() is zeroed, and limit 0 empties it.
TEST(TensorCache, ReusesFreedStorageWithinTheLimit) {
  const uint64_t saved_limit = os::tensor_cache_limit();
  os::set_tensor_cache_limit(0);  // start empty
  EXPECT_EQ(os::tensor_cache_bytes(), 0u);
  os::set_tensor_cache_limit(uint64_t{3} << 20);  // 3 MiB
  const int64_t n = 1 << 18;                      // 1 MiB of floats
  const float* first = nullptr;
  {
    Tensor a = Tensor::empty({n});
    first = a.data();
    a.fill(7.f);
  }
  EXPECT_EQ(os::tensor_cache_bytes(), uint64_t{1} << 20);
  {
    Tensor b = Tensor::zeros({n});  // the same block, zeroed
    EXPECT_EQ(b.data(), first);
    EXPECT_EQ(os::tensor_cache_bytes(), 0u);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(b.data()[i], 0.f) << i;
  }
  {
    Tensor c = Tensor::empty({n + n / 8 + 64});  // more than 1/8 larger: not this block
    EXPECT_NE(c.data(), first);
    Tensor d = Tensor::empty({n - n / 16});  // the block is at most 1/8 larger: takes it
    EXPECT_EQ(d.data(), first);
  }
  // Small tensors are never cached.
  const uint64_t held = os::tensor_cache_bytes();
  { Tensor s = Tensor::empty({1000}); }
  EXPECT_EQ(os::tensor_cache_bytes(), held);
  // The limit holds: five 1 MiB blocks freed, at most three kept.
  {
    std::vector<Tensor> ts;
    for (int i = 0; i < 5; ++i) ts.push_back(Tensor::empty({n}));
  }
  EXPECT_LE(os::tensor_cache_bytes(), uint64_t{3} << 20);
  EXPECT_GE(os::tensor_cache_bytes(), uint64_t{2} << 20);
  // A block larger than the limit is handed back at once.
  { Tensor big = Tensor::empty({4 * n}); }
  EXPECT_LE(os::tensor_cache_bytes(), uint64_t{3} << 20);
  os::clear_tensor_cache();
  EXPECT_EQ(os::tensor_cache_bytes(), 0u);
  EXPECT_EQ(os::tensor_cache_limit(), uint64_t{3} << 20);
  os::set_tensor_cache_limit(saved_limit);
}

// Large tensors (mapped straight from the kernel, >= 32 MiB) are cached too; zeros() must clear
// a reused mapping (fresh mappings are zero already and skip the memset).
TEST(TensorCache, ReusedLargeMappingIsZeroedByZeros) {
  const uint64_t saved_limit = os::tensor_cache_limit();
  os::set_tensor_cache_limit(uint64_t{64} << 20);
  const int64_t n = int64_t{8} << 20;  // 32 MiB
  const float* first = nullptr;
  {
    Tensor a = Tensor::full({n}, 3.f);
    first = a.data();
  }
  Tensor b({n});
  EXPECT_EQ(b.data(), first);
  int64_t nonzero = 0;
  for (int64_t i = 0; i < n; ++i) nonzero += b.data()[i] != 0.f;
  EXPECT_EQ(nonzero, 0);
  os::set_tensor_cache_limit(saved_limit);
}

// Several threads allocating and freeing through the cache at once: every tensor keeps its own
// values (no block handed out twice).
TEST(TensorCache, ThreadsShareTheCacheSafely) {
  const uint64_t saved_limit = os::tensor_cache_limit();
  os::set_tensor_cache_limit(uint64_t{8} << 20);
  std::vector<std::thread> th;
  std::atomic<int> bad{0};
  for (int k = 0; k < 4; ++k)
    th.emplace_back([k, &bad] {
      for (int it = 0; it < 50; ++it) {
        Tensor a = Tensor::full({(1 << 16) + 16 * (it % 3)}, static_cast<float>(k));
        Tensor b = Tensor::full({1 << 16}, static_cast<float>(k + 10));
        std::this_thread::yield();
        if (a.data()[a.numel() - 1] != static_cast<float>(k) || b.data()[0] != k + 10.f) ++bad;
      }
    });
  for (auto& t : th) t.join();
  EXPECT_EQ(bad.load(), 0);
  os::set_tensor_cache_limit(saved_limit);
}
