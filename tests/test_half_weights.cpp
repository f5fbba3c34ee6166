// 16-bit weight storage (bf16 / f16) for inference: conversions and their rounding, the
// 16-bit x fp32 matmul against its double reference on awkward sizes, and whole tiny LMs
// (Mamba1 and Mamba2) with 16-bit weights against fp32 models: forward, forward_last, step,
// save / load, BF16 / F16 safetensors checkpoints, and the errors of training a 16-bit model.
#include <hwy/targets.h>
#include <sys/wait.h>

#include <bit>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "mamba/lm.h"
#include "mamba/parallel.h"
#include "model/npy.h"
#include "ops/half_matmul.h"
#include "ops/linear.h"
#include "test_util.h"

using namespace mamba;

namespace {

float f(uint32_t bits) { return std::bit_cast<float>(bits); }
constexpr WeightDType kKinds[] = {WeightDType::bf16, WeightDType::f16};

}  // namespace

// ---- conversions -------------------------------------------------------------------------------

TEST(HalfConvert, Bf16ExactValuesTiesAndSpecials) {
  const WeightDType k = WeightDType::bf16;
  EXPECT_EQ(f32_to_half(1.f, k), 0x3F80);
  EXPECT_EQ(f32_to_half(-2.f, k), 0xC000);
  EXPECT_EQ(f32_to_half(0.f, k), 0x0000);
  EXPECT_EQ(f32_to_half(-0.f, k), 0x8000);
  // 1 + 2^-8 is halfway between 1 (0x3F80, even) and 1 + 2^-7 (0x3F81): ties to even -> down.
  EXPECT_EQ(f32_to_half(1.f + std::ldexp(1.f, -8), k), 0x3F80);
  // 1 + 3 * 2^-8 is halfway between 0x3F81 (odd) and 0x3F82: ties to even -> up.
  EXPECT_EQ(f32_to_half(1.f + 3 * std::ldexp(1.f, -8), k), 0x3F82);
  // Just above the halfway point rounds up, just below rounds down.
  EXPECT_EQ(f32_to_half(f(0x3F808001u), k), 0x3F81);
  EXPECT_EQ(f32_to_half(f(0x3F807FFFu), k), 0x3F80);
  EXPECT_EQ(f32_to_half(INFINITY, k), 0x7F80);
  EXPECT_EQ(f32_to_half(-INFINITY, k), 0xFF80);
  EXPECT_EQ(f32_to_half(std::numeric_limits<float>::max(), k), 0x7F80);  // beyond max + ulp/2
  EXPECT_TRUE(std::isnan(half_to_f32(f32_to_half(NAN, k), k)));
  EXPECT_TRUE(std::isnan(half_to_f32(f32_to_half(f(0x7F800001u), k), k)))
      << "a signalling NaN whose payload is in the low bits must not become inf";
  EXPECT_EQ(half_to_f32(0x3F80, k), 1.f);
  EXPECT_EQ(half_to_f32(0x0001, k), f(0x00010000u));  // bf16 subnormal, exact
}

TEST(HalfConvert, F16ExactValuesTiesOverflowAndSubnormals) {
  const WeightDType k = WeightDType::f16;
  EXPECT_EQ(f32_to_half(1.f, k), 0x3C00);
  EXPECT_EQ(f32_to_half(-2.f, k), 0xC000);
  EXPECT_EQ(f32_to_half(-0.f, k), 0x8000);
  EXPECT_EQ(f32_to_half(65504.f, k), 0x7BFF);  // largest finite f16
  EXPECT_EQ(f32_to_half(65519.f, k), 0x7BFF);  // below the midpoint 65520
  EXPECT_EQ(f32_to_half(65520.f, k), 0x7C00);  // the tie goes to the even "next" = inf
  EXPECT_EQ(f32_to_half(1e6f, k), 0x7C00);     // overflow -> +inf
  EXPECT_EQ(f32_to_half(-1e6f, k), 0xFC00);    // -> -inf
  EXPECT_EQ(f32_to_half(INFINITY, k), 0x7C00);
  EXPECT_EQ(f32_to_half(1.f + std::ldexp(1.f, -11), k), 0x3C00);      // tie -> even (down)
  EXPECT_EQ(f32_to_half(1.f + 3 * std::ldexp(1.f, -11), k), 0x3C02);  // tie -> even (up)
  EXPECT_EQ(f32_to_half(std::ldexp(1.f, -24), k), 0x0001);            // smallest subnormal
  EXPECT_EQ(f32_to_half(std::ldexp(1.f, -25), k), 0x0000);            // tie -> even (0)
  EXPECT_EQ(f32_to_half(3 * std::ldexp(1.f, -26), k), 0x0001);        // above the tie
  EXPECT_EQ(half_to_f32(0x0001, k), std::ldexp(1.f, -24));
  EXPECT_EQ(half_to_f32(0x7BFF, k), 65504.f);
  EXPECT_TRUE(std::isinf(half_to_f32(0x7C00, k)));
  EXPECT_TRUE(std::isnan(half_to_f32(f32_to_half(NAN, k), k)));
}

// Every 16-bit pattern that is not a NaN survives half -> f32 -> half unchanged (the widening is
// exact), and the vectorised array conversion agrees with the scalar one bit for bit.
TEST(HalfConvert, AllPatternsRoundTripAndArraysMatchScalar) {
  for (WeightDType k : kKinds) {
    std::vector<uint16_t> h(65536);
    for (uint32_t i = 0; i < 65536; ++i) h[i] = static_cast<uint16_t>(i);
    std::vector<float> v(65536);
    from_half(h.data(), v.data(), 65536, k);
    std::vector<uint16_t> back(65536);
    to_half(v.data(), back.data(), 65536, k);
    int64_t bad = 0;
    for (uint32_t i = 0; i < 65536; ++i) {
      const float s = half_to_f32(h[i], k);
      if (std::isnan(s)) {
        bad += !std::isnan(v[i]);
        continue;
      }
      bad += std::bit_cast<uint32_t>(s) != std::bit_cast<uint32_t>(v[i]);
      bad += back[i] != h[i];
    }
    EXPECT_EQ(bad, 0) << weight_dtype_name(k);
  }
}

// Random fp32 values: the rounding error is at most half a unit in the last place,
// 2^(e - p) for |x| in [2^e, 2^(e+1)) with p = 8 significant bits (bf16) or 11 (f16).
TEST(HalfConvert, RoundingErrorIsAtMostHalfAnUlp) {
  Rng rng(3);
  Tensor x = test::randn({4097}, rng, 10.0);
  for (WeightDType k : kKinds) {
    const int p = k == WeightDType::bf16 ? 8 : 11;
    std::vector<uint16_t> h(4097);
    to_half(x.data(), h.data(), 4097, k);
    for (int64_t i = 0; i < 4097; ++i) {
      if (std::fabs(x[i]) < 1e-3) continue;  // f16 subnormals have absolute, not relative, steps
      const double e = std::fabs((double)half_to_f32(h[i], k) - x[i]);
      const double half_ulp = std::ldexp(1.0, std::ilogb(x[i]) - p);
      ASSERT_LE(e, half_ulp) << weight_dtype_name(k) << " at " << x[i];
    }
  }
}

TEST(HalfConvert, ParsesDtypeNames) {
  EXPECT_EQ(parse_weight_dtype("bf16"), WeightDType::bf16);
  EXPECT_EQ(parse_weight_dtype("f16"), WeightDType::f16);
  EXPECT_EQ(parse_weight_dtype("f32"), WeightDType::f32);
  test::expect_error([] { parse_weight_dtype("int8"); }, {"int8", "bf16"});
  test::expect_error([] { f32_to_half(1.f, WeightDType::f32); }, {"bf16 or f16"});
}

// ---- the matmul --------------------------------------------------------------------------------

// Fast kernel (streaming for M <= 16, convert + GEMM above) vs the double reference on awkward
// sizes around the vector width, with a row range, padded leading dimensions and a row count
// that is not a multiple of the 4-row tile; the padding of y must stay untouched.
TEST(HalfMatmul, FastMatchesReferenceOnAwkwardSizes) {
  Rng rng(11);
  for (WeightDType k : kKinds)
    for (int64_t cols : {1, 15, 16, 17, 33, 768})
      for (int64_t M : {1, 3, 16, 17, 40}) {
        const int64_t rows = 37, r0 = 5, n = 29, ldx = cols + 3, ldy = n + 2;
        Tensor W = test::rand_uniform({rows, cols}, rng, -1.0, 1.0);
        for (int64_t i = 0; i < W.numel(); ++i) W[i] /= std::sqrt((float)cols);
        Weight Wh(W, k);
        Tensor x = test::randn({M, ldx}, rng);
        Tensor y = Tensor::full({M, ldy}, 7.f), yr = Tensor::full({M, ldy}, 7.f);
        // the row range as a Weight view, x and y as column views with their leading dimensions
        ops::linear_into(x.cols(0, cols), Wh.rows(r0, n), Tensor(), y.cols(0, n));
        ops::stream_matmul_ref(x.data(), M, ldx, Wh.rows(r0, n), yr.data(), ldy);
        EXPECT_TRUE(test::all_close(y, yr, tol::kFastVsRef,
                                    str(weight_dtype_name(k), " cols ", cols, " M ", M)));
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = n; j < ldy; ++j) ASSERT_EQ(y[m * ldy + j], 7.f) << "padding overwritten";
      }
}

// The same on every SIMD target this build compiled and this CPU runs (vector widths 4, 8, 16
// lanes: the tails differ), forcing each in turn through Highway's dispatch.
TEST(HalfMatmul, EveryCompiledTargetMatchesReference) {
  Rng rng(12);
  const int64_t avail = hwy::SupportedTargets();
  int tested = 0;
  for (int64_t t = 1; t != 0 && t <= avail; t <<= 1) {
    if (!(avail & t)) continue;
    hwy::SetSupportedTargetsForTest(t);
    ++tested;
    std::printf("target %s\n", hwy::TargetName(t));
    for (WeightDType k : kKinds)
      for (int64_t cols : {3, 17, 40})
        for (int64_t M : {1, 5, 20}) {
          Tensor W = test::rand_uniform({11, cols}, rng, -1.0, 1.0);
          Weight Wh(W, k);
          Tensor x = test::randn({M, cols}, rng), y({M, 11}), yr({M, 11});
          ops::linear_into(x, Wh, Tensor(), y);
          ops::stream_matmul_ref(x.data(), M, cols, Wh, yr.data(), 11);
          EXPECT_TRUE(test::all_close(
              y, yr, tol::kFastVsRef,
              str(hwy::TargetName(t), " ", weight_dtype_name(k), " cols ", cols, " M ", M)));
          std::vector<float> back(static_cast<size_t>(11 * cols));
          const uint16_t* hd = static_cast<const uint16_t*>(Wh.row_ptr(0));
          from_half(hd, back.data(), 11 * cols, k);
          for (int64_t i = 0; i < 11 * cols; ++i)
            ASSERT_EQ(back[i], half_to_f32(hd[i], k)) << hwy::TargetName(t);
        }
  }
  hwy::SetSupportedTargetsForTest(0);
  EXPECT_GE(tested, 1);
}

// The single-sequence decode product (M = 1) for every storage: rows split over threads, so it is
// run repeatedly, with 1 and with all threads, and inside a decode team (with_team): every row's
// sum is formed the same way whatever the split (4-row tiles and single rows accumulate alike),
// so all give the same bits; and it matches the double reference. Rows n = 301 (odd, several
// tasks per thread), cols 96 (whole blocks of 32 for q8_0 / q4_0).
TEST(HalfMatmul, SingleRowIsBitwiseReproducibleAcrossRunsAndThreads) {
  Rng rng(21);
  const int threads = num_threads();
  const int64_t n = 301, cols = 96;
  for (WeightDType t : {WeightDType::f32, WeightDType::bf16, WeightDType::f16, WeightDType::q8_0,
                        WeightDType::q4_0}) {
    Weight W(test::rand_uniform({n, cols}, rng, -1.0, 1.0), t);
    Tensor x = test::randn({1, cols}, rng);
    Tensor y0({1, n}), y({1, n}), yr({1, n});
    ops::stream_matmul(x.data(), 1, cols, W, y0.data(), n);
    ops::stream_matmul_ref(x.data(), 1, cols, W, yr.data(), n);
    EXPECT_TRUE(test::all_close(y0, yr, tol::kFastVsRef, weight_dtype_name(t)));
    for (int rep = 0; rep < 10; ++rep) {
      ops::stream_matmul(x.data(), 1, cols, W, y.data(), n);
      ASSERT_EQ(0, std::memcmp(y.data(), y0.data(), sizeof(float) * n)) << weight_dtype_name(t);
    }
    with_team([&] { ops::stream_matmul(x.data(), 1, cols, W, y.data(), n); });
    EXPECT_EQ(0, std::memcmp(y.data(), y0.data(), sizeof(float) * n)) << weight_dtype_name(t);
    set_num_threads(1);
    ops::stream_matmul(x.data(), 1, cols, W, y.data(), n);
    set_num_threads(threads);
    EXPECT_EQ(0, std::memcmp(y.data(), y0.data(), sizeof(float) * n)) << weight_dtype_name(t);
  }
}

TEST(HalfMatmul, LinearAndBadArguments) {
  Rng rng(2);
  Tensor W = test::randn({9, 20}, rng), b = test::randn({9}, rng), x = test::randn({2, 3, 20}, rng);
  Weight Wh(W, WeightDType::bf16);
  EXPECT_EQ(Wh.rows(), 9);
  EXPECT_EQ(Wh.cols(), 20);
  EXPECT_EQ(Wh.bytes(), 9 * 20 * 2);
  Tensor y = ops::linear(x, Wh, b);
  ASSERT_EQ(y.shape(), (Shape{2, 3, 9}));
  // Against the fp32 linear on the exactly widened weights.
  Tensor yr = ops::linear_ref(x, Wh.to_f32(), b);
  EXPECT_TRUE(test::all_close(y, yr, tol::kFastVsRef, "linear bf16"));
  float out[9];
  test::expect_error([&] { Wh.rows(5, 5); }, {"[5, 10)", "(9,20)"});
  test::expect_error([&] { ops::stream_matmul(x.data(), 1, 19, Wh.rows(0, 5), out, 5); }, {"ldx"});
  test::expect_error(
      [&] {
        ops::linear(test::randn({2, 7}, rng), Wh, Tensor());
      },
      {"linear", "(2,7)"});
}

// fp32 weights, small M (batched decode): ops::linear takes the streaming kernel.
TEST(HalfMatmul, F32StreamingPathMatchesReference) {
  Rng rng(4);
  for (int64_t cols : {1, 15, 16, 17, 33, 200})
    for (int64_t M : {1, 2, 3, 5, 16, 17}) {
      Tensor W = test::randn({13, cols}, rng), b = test::randn({13}, rng),
             x = test::randn({M, cols}, rng);
      Tensor y = ops::linear(x, Weight(W), b);
      Tensor yr = ops::linear_ref(x, W, b);
      EXPECT_TRUE(test::all_close(y, yr, tol::kFastVsRef, str("linear f32 M=", M, " cols=", cols)));
      // a row range with leading dimensions, as the layers call it
      Tensor out = Tensor::full({M, 8}, -7.f);
      ops::linear_into(x, Weight(W).rows(4, 6), Tensor(), out.cols(0, 6));
      for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < 8; ++j) {
          if (j >= 6) {
            EXPECT_EQ(out[m * 8 + j], -7.f);  // beyond n: untouched
            continue;
          }
          double e = 0;
          for (int64_t k = 0; k < cols; ++k) e += double(x[m * cols + k]) * W[(4 + j) * cols + k];
          EXPECT_NEAR(out[m * 8 + j], e,
                      tol::kFastVsRef.atol + tol::kFastVsRef.rtol * std::fabs(e));
        }
    }
  test::expect_error(
      [&] {
        ops::linear(test::randn({3, 7}, rng), Weight(test::randn({4, 6}, rng)), Tensor());
      },
      {"linear"});
}

// The multi-row register tiles (2 <= M <= 16) on every M, fp32 and 16-bit weights, column
// counts around the vector widths (the scalar column tail), a row count that no tile height
// divides, padded leading dimensions: against the double reference; then determinism: a second
// call is bitwise equal, and row m's outputs do not depend on M or on the tile it fell in (every
// output is the same per-lane k order, one lane sum, then the tail).
TEST(HalfMatmul, MultiRowTilesEveryM) {
  Rng rng(21);
  for (WeightDType k : {WeightDType::f32, WeightDType::bf16, WeightDType::f16})
    for (int64_t cols : {1, 7, 16, 31, 33, 47, 97}) {
      const int64_t n = 23, ldx = cols + 5, ldy = n + 3;
      Tensor W = test::rand_uniform({n, cols}, rng, -1.0, 1.0);
      const Weight Wk(W, k);
      Tensor x = test::randn({ops::kHalfGemvMaxM, ldx}, rng);
      std::vector<float> y16(static_cast<size_t>(ops::kHalfGemvMaxM * ldy), 7.f);
      ops::stream_matmul(x.data(), ops::kHalfGemvMaxM, ldx, Wk, y16.data(), ldy);
      for (int64_t M = 2; M <= ops::kHalfGemvMaxM; ++M) {
        const std::string what = str(weight_dtype_name(k), " cols ", cols, " M ", M);
        std::vector<float> y(static_cast<size_t>(M * ldy), 7.f), y2(y.size(), 7.f), yr(y.size());
        ops::stream_matmul(x.data(), M, ldx, Wk, y.data(), ldy);
        ops::stream_matmul(x.data(), M, ldx, Wk, y2.data(), ldy);
        ops::stream_matmul_ref(x.data(), M, ldx, Wk, yr.data(), ldy);
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = 0; j < ldy; ++j) {
            const size_t i = static_cast<size_t>(m * ldy + j);
            if (j >= n) {
              ASSERT_EQ(y[i], 7.f) << what << ": padding overwritten";
              continue;
            }
            const double e = yr[i];
            ASSERT_NEAR(y[i], e, tol::kFastVsRef.atol + tol::kFastVsRef.rtol * std::fabs(e))
                << what << " m " << m << " j " << j;
            ASSERT_EQ(std::bit_cast<uint32_t>(y[i]), std::bit_cast<uint32_t>(y2[i]))
                << what << ": a repeated call differs";
            ASSERT_EQ(std::bit_cast<uint32_t>(y[i]), std::bit_cast<uint32_t>(y16[i]))
                << what << " m " << m << ": differs from the same row in a 16-row call";
          }
      }
    }
}

// ---- whole models ------------------------------------------------------------------------------

namespace {

ModelConfig tiny_config(const std::string& layer) {
  return ModelConfig::parse(
      std::string(
          R"({"d_model":40,"n_layer":2,"vocab_size":203,"pad_vocab_size_multiple":8,"ssm_cfg":{"layer":")") +
      layer + R"(","d_state":8,"d_conv":4,"expand":2)" +
      (layer == "Mamba2" ? R"(,"headdim":16,"chunk_size":8)" : "") + "}}");
}

// A model with random weights, perturbed so that norms and biases are not all ones / zeros.
MambaLM make_lm(const std::string& layer) {
  MambaLM lm(tiny_config(layer), 3);
  Rng rng(9);
  for (auto& [n, p] : lm.named_parameters())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] += 0.05f * (float)rng.normal();
  return lm;
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& v : ids) v = static_cast<int32_t>(rng.below(static_cast<uint64_t>(V)));
  return ids;
}

// Logits (B, L, V) rows [t] of every sequence: (B, V).
Tensor at_position(const Tensor& logits, int64_t t) {
  const int64_t B = logits.dim(0), L = logits.dim(1), V = logits.dim(2);
  Tensor o = Tensor::empty({B, V});
  for (int64_t b = 0; b < B; ++b) std::copy_n(logits.data() + (b * L + t) * V, V, o.data() + b * V);
  return o;
}

// Writes the model's parameters as 16-bit safetensors (dtype "BF16" / "F16") plus config.json.
void save_16bit_checkpoint(MambaLM& lm, const std::string& dir, WeightDType k) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  nlohmann::json header = nlohmann::json::object();
  std::vector<uint8_t> data;
  for (auto& [name, p] : lm.named_parameters()) {
    const Tensor v = p->value.to_f32();
    const size_t begin = data.size();
    for (int64_t i = 0; i < v.numel(); ++i) {
      const uint16_t h = f32_to_half(v[i], k);
      data.push_back(static_cast<uint8_t>(h & 0xFF));
      data.push_back(static_cast<uint8_t>(h >> 8));
    }
    header[name] = {{"dtype", k == WeightDType::bf16 ? "BF16" : "F16"},
                    {"shape", v.shape()},
                    {"data_offsets", {begin, data.size()}}};
  }
  std::string hs = header.dump();
  while (hs.size() % 8) hs.push_back(' ');
  std::vector<uint8_t> file(8);
  const uint64_t hl = hs.size();
  for (int i = 0; i < 8; ++i) file[i] = static_cast<uint8_t>(hl >> (8 * i));
  file.insert(file.end(), hs.begin(), hs.end());
  file.insert(file.end(), data.begin(), data.end());
  os::write_file_atomic(dir + "/model.safetensors", file.data(), file.size());
  const std::string cfg = lm.config().to_json();
  os::write_file_atomic(dir + "/config.json", cfg.data(), cfg.size());
}

}  // namespace

class HalfLM : public ::testing::TestWithParam<const char*> {};

// A 16-bit model against (a) the fp32 model whose weights were rounded the same way (only the
// order of the fp32 sums differs) and (b) the original fp32 model (the rounding error itself),
// for forward (B*L = 24 rows: the convert + GEMM path), forward_last and step (2 rows: the
// streaming kernel), and step decode == forward on the 16-bit model.
TEST_P(HalfLM, LogitsMatchRoundedAndOriginalF32) {
  const std::string layer = GetParam();
  const int64_t B = 2, L = 12;
  for (WeightDType k : kKinds) {
    MambaLM orig = make_lm(layer);
    MambaLM rounded = make_lm(layer);
    rounded.set_weight_dtype(k);
    rounded.set_weight_dtype(WeightDType::f32);  // fp32 storage of the rounded values (exact)
    MambaLM half = make_lm(layer);
    const int64_t nparam = half.num_parameters();
    half.set_weight_dtype(k);
    EXPECT_EQ(half.weight_dtype(), k);
    EXPECT_EQ(half.num_parameters(), nparam);
    const auto ids = random_ids(B * L, 203, 4);
    const std::string what = str(layer, " ", weight_dtype_name(k));

    Tensor lh = half.forward(ids, B, L), lr = rounded.forward(ids, B, L),
           lo = orig.forward(ids, B, L);
    EXPECT_TRUE(test::all_close(lh, lr, tol::kHalfVsRoundedF32, what + " forward vs rounded f32"));
    const tol::Tol loose = k == WeightDType::bf16 ? tol::kBf16VsF32Logits : tol::kF16VsF32Logits;
    EXPECT_TRUE(test::all_close(lh, lo, loose, what + " forward vs original f32"));
    double lmax = 0;
    for (int64_t i = 0; i < lo.numel(); ++i) lmax = std::max(lmax, (double)std::fabs(lo[i]));
    std::printf("%s: max |logit| %.3g, max |err| vs rounded f32 %.3g, vs original f32 %.3g\n",
                what.c_str(), lmax, test::max_abs_diff(lh, lr), test::max_abs_diff(lh, lo));
    // The comparison must be able to fail: bf16 rounding moves the logits by more than the
    // tight tolerance, so comparing with the original model under it would not pass.
    if (k == WeightDType::bf16) {
      EXPECT_FALSE(test::all_close(lh, lo, tol::kHalfVsRoundedF32));
    }

    // forward_last with the prefill state, then step through the remaining tokens.
    const int64_t L0 = 5;
    std::vector<int32_t> pre;
    for (int64_t b = 0; b < B; ++b)
      pre.insert(pre.end(), ids.begin() + b * L, ids.begin() + b * L + L0);
    LMState st;
    Tensor last = half.forward_last(pre, B, L0, &st);
    EXPECT_TRUE(
        test::all_close(last, at_position(lh, L0 - 1), tol::kStepVsFull, what + " forward_last"));
    LMState sr;
    Tensor last_r = rounded.forward_last(pre, B, L0, &sr);
    EXPECT_TRUE(
        test::all_close(last, last_r, tol::kHalfVsRoundedF32, what + " forward_last vs rounded"));
    for (int64_t t = L0; t < L; ++t) {
      std::vector<int32_t> tok;
      for (int64_t b = 0; b < B; ++b) tok.push_back(ids[b * L + t]);
      Tensor s = half.step(tok, st), s_r = rounded.step(tok, sr);
      EXPECT_TRUE(test::all_close(s, at_position(lh, t), tol::kStepVsFull,
                                  str(what, " step ", t, " vs forward")));
      EXPECT_TRUE(
          test::all_close(s, s_r, tol::kHalfVsRoundedF32, str(what, " step ", t, " vs rounded")));
      EXPECT_TRUE(
          test::all_close(s, at_position(lo, t), loose, str(what, " step ", t, " vs original")));
    }
  }
}

// Training a 16-bit model is refused with a clear message. Converting
// back to f32 gives the rounded values exactly and the model trains again.
TEST_P(HalfLM, TrainingIsRefused) {
  const std::string layer = GetParam();
  MambaLM lm = make_lm(layer);
  const int64_t B = 1, L = 4;
  const auto ids = random_ids(B * L, 203, 5);
  LMSaved sv;
  Tensor logits = lm.forward(ids, B, L, &sv);  // saved while still fp32
  lm.set_weight_dtype(WeightDType::bf16);
  Tensor g = Tensor::zeros(logits.shape());
  test::expect_error([&] { lm.backward(sv, g); },
                     {"weights are bf16", "inference only", "load in f32 to train"});
  test::expect_error([&] { lm.forward(ids, B, L, &sv); }, {"weights are bf16", "inference only"});
  // The layers refuse on their own too.
  if (layer == "Mamba1") {
    Mamba1 m(std::get<Mamba1Config>(tiny_config(layer).mixer()), 1);
    Mamba1Saved s;
    Tensor h = Tensor::zeros({1, 3, 40});
    m.forward(h, &s);
    m.params().set_weight_dtype(WeightDType::f16);
    test::expect_error([&] { m.backward(s, h); }, {"Mamba1::backward", "weights are f16"});
    test::expect_error([&] { m.forward(h, &s); }, {"Mamba1::forward", "inference only"});
  } else {
    Mamba2 m(std::get<Mamba2Config>(tiny_config(layer).mixer()), 1);
    Mamba2Saved s;
    Tensor h = Tensor::zeros({1, 3, 40});
    m.forward(h, &s);
    m.params().set_weight_dtype(WeightDType::f16);
    test::expect_error([&] { m.backward(s, h); }, {"Mamba2::backward", "weights are f16"});
    test::expect_error([&] { m.forward(h, &s); }, {"Mamba2::forward", "inference only"});
  }
  // Back to f32: trainable again (forward with saved + backward run).
  lm.set_weight_dtype(WeightDType::f32);
  LMSaved sv2;
  lm.forward(ids, B, L, &sv2);
  lm.backward(sv2, g);
}

// save() of a 16-bit model writes its rounded values exactly as F32; loading that folder gives
// bit-identical parameters to the rounded fp32 model. A checkpoint stored as BF16 / F16
// safetensors loads, and loading it with its own dtype re-packs the same bits: same logits as
// the model converted in memory, bit for bit.
TEST_P(HalfLM, SaveAndSixteenBitCheckpointsRoundTripExactly) {
  namespace fs = std::filesystem;
  const std::string layer = GetParam();
  const std::string base =
      (fs::temp_directory_path() /
       str("mamba_half_", layer, "_", std::chrono::steady_clock::now().time_since_epoch().count()))
          .string();
  const int64_t B = 2, L = 6;
  const auto ids = random_ids(B * L, 203, 6);
  for (WeightDType k : kKinds) {
    MambaLM half = make_lm(layer);
    half.set_weight_dtype(k);
    MambaLM rounded = make_lm(layer);
    rounded.set_weight_dtype(k);
    rounded.set_weight_dtype(WeightDType::f32);

    half.save(base + "/saved");
    MambaLM back = MambaLM::load(base + "/saved");
    auto a = back.named_parameters(), e = rounded.named_parameters();
    ASSERT_EQ(a.size(), e.size());
    for (size_t i = 0; i < a.size(); ++i) {
      ASSERT_EQ(a[i].first, e[i].first);
      ASSERT_EQ(a[i].second->value.shape(), e[i].second->value.shape()) << a[i].first;
      EXPECT_EQ(std::memcmp(a[i].second->value.f32().data(), e[i].second->value.f32().data(),
                            e[i].second->value.numel() * sizeof(float)),
                0)
          << a[i].first << " not saved exactly";
    }

    // A checkpoint stored in 16 bits rounds every tensor (norms, conv, A_log, ... too): the
    // reference is the model with every parameter rounded in place.
    MambaLM all_rounded = make_lm(layer);
    for (auto& [n, p] : all_rounded.named_parameters())
      for (int64_t i = 0; i < p->value.numel(); ++i)
        p->value.f32()[i] = half_to_f32(f32_to_half(p->value.f32()[i], k), k);
    save_16bit_checkpoint(all_rounded, base + "/ckpt16", k);
    MambaLM from16_f32 = MambaLM::load(base + "/ckpt16");
    EXPECT_TRUE(test::all_close(from16_f32.forward(ids, B, L), all_rounded.forward(ids, B, L),
                                tol::Tol{0, 0}, "16-bit checkpoint loaded as f32"));
    MambaLM from16 = MambaLM::load(base + "/ckpt16", k);
    EXPECT_EQ(from16.weight_dtype(), k);
    all_rounded.set_weight_dtype(k);
    Tensor l16 = from16.forward(ids, B, L), lh = all_rounded.forward(ids, B, L);
    EXPECT_EQ(std::memcmp(l16.data(), lh.data(), lh.numel() * sizeof(float)), 0)
        << weight_dtype_name(k) << " checkpoint loaded as " << weight_dtype_name(k) << " differs";
  }
  fs::remove_all(base);
}

// Building a model with a dtype (each weight converted as soon as it is initialised) equals
// converting afterwards, bit for bit; a state dict loads into a 16-bit model (rounded into its
// storage) and then computes as the model converted from those weights.
TEST_P(HalfLM, ConstructWithDtypeAndLoadStateDictInto16Bit) {
  const std::string layer = GetParam();
  const int64_t B = 2, L = 20;  // 40 rows: the convert + GEMM path
  const auto ids = random_ids(B * L, 203, 8);
  for (WeightDType k : kKinds) {
    MambaLM a(tiny_config(layer), 3, k), b(tiny_config(layer), 3);
    b.set_weight_dtype(k);
    EXPECT_EQ(a.weight_dtype(), k);
    EXPECT_EQ(a.num_parameters(), MambaLM(tiny_config(layer), 3).num_parameters());
    Tensor la = a.forward(ids, B, L), lb = b.forward(ids, B, L);
    EXPECT_EQ(std::memcmp(la.data(), lb.data(), la.numel() * sizeof(float)), 0)
        << weight_dtype_name(k);

    MambaLM src = make_lm(layer);
    std::map<std::string, Tensor> sd;
    for (auto& [n, p] : src.named_parameters()) sd[n] = p->value.to_f32();
    MambaLM dst(tiny_config(layer), 77, k);
    dst.load_state_dict(sd, "sd");
    src.set_weight_dtype(k);
    Tensor ld = dst.forward(ids, B, L), ls = src.forward(ids, B, L);
    EXPECT_EQ(std::memcmp(ld.data(), ls.data(), ld.numel() * sizeof(float)), 0)
        << weight_dtype_name(k);
    // Shapes are still checked for 16-bit weights.
    sd["backbone.embedding.weight"] = Tensor::zeros({3, 40});
    test::expect_error([&] { dst.load_state_dict(sd, "sd"); },
                       {"backbone.embedding.weight", "(3,40)", "(208,40)"});
  }
}

INSTANTIATE_TEST_SUITE_P(Mixers, HalfLM, ::testing::Values("Mamba1", "Mamba2"),
                         [](const auto& info) { return std::string(info.param); });

// ---- the command line ---------------------------------------------------------------------------

namespace {
using test::CliRun;
using test::run_cli;
}  // namespace

// --dtype on score, generate and bench: score's logits are those of the library's 16-bit model
// (the rounding error against the golden fp32 logits is printed: it depends on the model's
// weights, the tiny random models above bound it); an unknown dtype is refused.
TEST(HalfCli, DtypeOptionOnScoreGenerateAndBench) {
  namespace fs = std::filesystem;
  const std::string dir =
      (fs::temp_directory_path() /
       str("mamba_half_cli_", std::chrono::steady_clock::now().time_since_epoch().count()))
          .string();
  fs::create_directories(dir);
  for (const char* name : {"lm_mamba1", "lm_mamba2"}) {
    auto f = SafetensorsFile::open(test::golden_path(std::string(name) + ".safetensors"));
    Shape s;
    auto ids = f.tensor_i64("input_ids", &s);
    const std::string ids_path = dir + "/ids.npy", out = dir + "/logits.npy";
    write_npy_i64(ids_path, s, ids);
    const std::string model = test::golden_path(std::string(name) + "_ckpt");
    for (WeightDType k : kKinds) {
      CliRun r = run_cli("score --model " + model + " --ids " + ids_path + " --out " + out +
                         " --dtype " + weight_dtype_name(k));
      ASSERT_EQ(r.status, 0) << r.out;
      Tensor got = npy_to_tensor(read_npy(out));
      MambaLM lm = MambaLM::load(model, k);
      std::vector<int32_t> ids32(ids.begin(), ids.end());
      EXPECT_TRUE(test::all_close(got, lm.forward(ids32, s[0], s[1]), tol::kHalfVsRoundedF32,
                                  "score --dtype"));
      Tensor golden = f.tensor("logits");
      double lmax = 0;
      for (int64_t i = 0; i < golden.numel(); ++i)
        lmax = std::max(lmax, (double)std::fabs(golden[i]));
      std::printf("%s score --dtype %s: max |err| vs golden fp32 logits %.3g (max |logit| %.3g)\n",
                  name, weight_dtype_name(k), test::max_abs_diff(got, golden), lmax);
    }
    CliRun g =
        run_cli("generate --model " + model + " --ids " + ids_path + " --greedy -n 4 --dtype bf16");
    EXPECT_EQ(g.status, 0) << g.out;
  }
  CliRun b = run_cli(
      "bench --preset tiny --prompt 8 --gen 4 --reps 1 --batch 2 --threads 1 --json --dtype bf16");
  ASSERT_EQ(b.status, 0) << b.out;
  EXPECT_NE(b.out.find("\"dtype\":\"bf16\""), std::string::npos) << b.out;
  CliRun bad = run_cli("bench --preset tiny --dtype int8");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.out.find("int8"), std::string::npos) << bad.out;
  CliRun help = run_cli("score --help");
  EXPECT_NE(help.out.find("--dtype"), std::string::npos) << help.out;
  fs::remove_all(dir);
}
