// Opt-in 8-bit activations for q8_0 / q4_0 weights (ops/gemm_q8.h, mamba::set_activation_type):
// the activation quantiser on hand-worked blocks (ties, zero, largest magnitude, non-finite) and
// against ggml's reference rounding (mamba::quantise_blocks), the VNNI kernel against the portable
// kernel (the same operations: the same bits) and against the double reference with a bound
// derived from the fp32 rounding of the per-block sums, awkward shapes, split outputs, thread
// counts, the routing in ops::linear, and whole tiny LMs against their fp32-activation logits.
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <vector>

#include "mamba/lm.h"
#include "mamba/parallel.h"
#include "model/npy.h"
#include "ops/gemm_nt.h"
#include "ops/gemm_q8.h"
#include "ops/linear.h"
#include "test_util.h"

using namespace mamba;

namespace {
using test::ActivationScope;
using test::ThreadScope;

constexpr WeightDType kQuant[] = {WeightDType::q8_0, WeightDType::q4_0};

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

// Both quantisers (vectorised where the CPU allows, scalar) on one block.
std::vector<std::vector<uint8_t>> quant_both(const std::vector<float>& x) {
  std::vector<uint8_t> a(34 * x.size() / 32), b(a.size());
  ops::quantise_activations(x.data(), static_cast<int64_t>(x.size()), a.data());
  ops::quantise_activations_ref(x.data(), static_cast<int64_t>(x.size()), b.data());
  return {a, b};
}

}  // namespace

// ---- the quantiser --------------------------------------------------------------------------

// A block whose largest magnitude is 127/16: d = 1/16 exactly (f16 0x2C00), 1/d = 16, so the
// codes are x * 16 rounded half away from zero (C's roundf, as ggml's quantize_row_q8_0).
TEST(ActQ8Quantiser, KnownBlockTiesAndLargestMagnitude) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16) / 16.f;  // codes -16..15
  x[0] = -127.f / 16;                                                     // amax: code -127
  x[1] = 2.5f / 16;                                                       // tie: code 3
  x[2] = -2.5f / 16;                                                      // tie: code -3
  x[3] = 0.3f / 16;                                                       // code 0
  x[4] = 0.5f / 16;                                                       // tie at 0.5: code 1
  x[5] = -126.5f / 16;                                                    // tie: code -127
  x[6] = 0.49999997f / 16;                                                // below the tie: 0
  for (const auto& q : quant_both(x)) {
    EXPECT_EQ(rd16(q.data()), 0x2C00);
    const int8_t* c = reinterpret_cast<const int8_t*>(q.data() + 2);
    EXPECT_EQ(c[0], -127);
    EXPECT_EQ(c[1], 3);
    EXPECT_EQ(c[2], -3);
    EXPECT_EQ(c[3], 0);
    EXPECT_EQ(c[4], 1);
    EXPECT_EQ(c[5], -127);
    EXPECT_EQ(c[6], 0);
    for (int j = 7; j < 32; ++j) EXPECT_EQ(c[j], j - 16) << j;
  }
}

// A zero block: d = 0, every code 0. A block holding a NaN or an infinity: d = NaN (f16 0x7E00),
// codes 0 (the outputs it reaches become NaN). The largest magnitude positive: code +127.
TEST(ActQ8Quantiser, ZeroNonFiniteAndPositiveMax) {
  for (const auto& q : quant_both(std::vector<float>(32, 0.f))) {
    EXPECT_EQ(rd16(q.data()), 0);
    for (int j = 0; j < 32; ++j) EXPECT_EQ(q[2 + j], 0);
  }
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<float> x(64, 1.f);
    x[40] = bad;  // second block
    for (const auto& q : quant_both(x)) {
      std::vector<uint8_t> first(34);  // the first block as ggml's reference quantises it
      quantise_blocks(x.data(), first.data(), 32, WeightDType::q8_0);
      EXPECT_EQ(std::memcmp(q.data(), first.data(), 34), 0) << "first block";
      EXPECT_EQ(rd16(q.data() + 34), 0x7E00);
      for (int j = 0; j < 32; ++j) EXPECT_EQ(q[34 + 2 + j], 0);
      EXPECT_EQ(static_cast<int8_t>(q[2]), 127);  // the first block: all ones, amax 1
    }
  }
  std::vector<float> x(32, -0.25f);
  x[17] = 3.f;
  for (const auto& q : quant_both(x)) {
    EXPECT_EQ(static_cast<int8_t>(q[2 + 17]), 127);
    EXPECT_EQ(static_cast<int8_t>(q[2]), -11);  // -0.25 * 127 / 3 = -10.58
  }
}

// On random blocks at many scales (and blocks with f16-subnormal and f16-overflowing d), both
// quantisers give ggml's reference q8_0 bytes (mamba::quantise_blocks) exactly.
TEST(ActQ8Quantiser, MatchesGgmlReferenceRounding) {
  Rng rng(5);
  const int64_t n = 32 * 300;
  std::vector<float> x(n);
  for (int64_t b = 0; b < n / 32; ++b) {
    const double scale = std::ldexp(1.0, static_cast<int>(b % 60) - 40);  // 2^-40 .. 2^19
    for (int j = 0; j < 32; ++j) x[b * 32 + j] = static_cast<float>(rng.normal() * scale);
  }
  for (int j = 0; j < 32; ++j) x[7 * 32 + j] = static_cast<float>(j % 5) * 0.5f;  // ties
  std::vector<uint8_t> g(34 * n / 32);
  quantise_blocks(x.data(), g.data(), n, WeightDType::q8_0);
  std::vector<uint8_t> a(g.size()), r(g.size());
  ops::quantise_activations(x.data(), n, a.data());
  ops::quantise_activations_ref(x.data(), n, r.data());
  EXPECT_EQ(std::memcmp(a.data(), g.data(), g.size()), 0);
  EXPECT_EQ(std::memcmp(r.data(), g.data(), g.size()), 0);
  test::expect_error([&] { ops::quantise_activations(x.data(), 31, a.data()); }, {"31", "32"});
}

// ---- the kernels ----------------------------------------------------------------------------

namespace {

// The exact per-element sum of the terms and of their magnitudes, from the dequantised
// activations (d_x * q, exact in fp32) and weights (exact): sum_b t_b and sum_b |t_b| in double
// (each t_b = d_w d_x isum_b is exact in double: at most 42 significant bits).
struct Exact {
  std::vector<double> sum, mag;
};
Exact exact_terms(const float* x, int64_t M, int64_t ldx, const ops::WeightRows& W, int64_t N,
                  int64_t K) {
  const int64_t nbk = K / 32;
  std::vector<uint8_t> q(static_cast<size_t>(34 * nbk));
  std::vector<float> xd(static_cast<size_t>(M * K)), wd(static_cast<size_t>(N * K));
  for (int64_t m = 0; m < M; ++m) {
    ops::quantise_activations_ref(x + m * ldx, K, q.data());
    dequantise_blocks_ref(q.data(), xd.data() + m * K, K, WeightDType::q8_0);
  }
  const int64_t wrow = weight_row_bytes(W.dtype, W.ld);
  for (int64_t n = 0; n < N; ++n)
    dequantise_blocks_ref(static_cast<const uint8_t*>(W.data) + n * wrow, wd.data() + n * K, K,
                          W.dtype);
  Exact e{std::vector<double>(M * N), std::vector<double>(M * N)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t b = 0; b < nbk; ++b) {
        double t = 0;
        for (int64_t j = 32 * b; j < 32 * b + 32; ++j)
          t += static_cast<double>(xd[m * K + j]) * wd[n * K + j];
        e.sum[m * N + n] += t, e.mag[m * N + n] += std::fabs(t);
      }
  return e;
}

// |y - exact| <= gamma_{nbk + 1} (sum_b |t_b| + |y0|): nbk fp32 roundings of the sequential sum
// over the blocks (each fused multiply-add rounds once; its term is exact) plus one for adding
// the previous y (accumulate); gamma_n = n u / (1 - n u), u = 2^-24. The double reference's own
// rounding (~2^-53 relative per term) is covered by the same bound many times over.
double bound(int64_t nbk, double mag, double y0) {
  const double nu = static_cast<double>(nbk + 1) * 0x1p-24;
  return nu / (1 - nu) * (mag + std::fabs(y0));
}

}  // namespace

// The VNNI kernels (where this CPU has it: the streaming one for M <= 16, the tile above) against
// the portable kernel (bits) and the double reference (the bound above), and the reference against
// the exact sum of the dequantised products; awkward M (decode sizes, around the 32-row panel), N
// (around the 6-row tile and the 16-row streaming step), K (odd and even block counts), padded
// leading dimensions, accumulate; the padding of y stays untouched. The bound must be tight enough
// to fail: fp32 activations (gemm_nt_ref) break it.
TEST(ActQ8Gemm, KernelsMatchReferenceOnAwkwardShapes) {
  Rng rng(21);
  std::printf("VNNI kernel: %s\n", ops::gemm_q8_vnni_available() ? "yes" : "no (portable only)");
  int64_t fp32_breaks = 0, checked = 0;
  for (WeightDType t : kQuant)
    for (int64_t K : {32, 64, 96, 160, 256, 800})
      for (int64_t M : {1, 2, 5, 16, 17, 31, 32, 33, 70})
        for (int64_t N : {1, 5, 6, 7, 13, 37}) {
          const int64_t ldx = K + 5, ldw = K + 32, ldy = N + 3;
          Weight Wq(test::randn({N, ldw}, rng), t);
          const ops::WeightRows W{Wq.row_ptr(0), t, ldw};
          Tensor x = test::randn({M, ldx}, rng, 2.0);
          for (bool acc : {false, true}) {
            Tensor y0 = test::randn({M, ldy}, rng);
            Tensor y = y0.clone(), yp = y0.clone(), yr = y0.clone(), yf = y0.clone();
            ops::gemm_nt_q8(x.data(), M, ldx, W, N, K, y.data(), ldy, acc);
            ops::gemm_nt_q8_portable(x.data(), M, ldx, W, N, K, yp.data(), ldy, acc);
            ops::gemm_nt_q8_ref(x.data(), M, ldx, W, N, K, yr.data(), ldy, acc);
            ops::gemm_nt_ref(x.data(), M, ldx, W, N, K, yf.data(), ldy, acc);
            const Exact e = exact_terms(x.data(), M, ldx, W, N, K);
            const std::string what =
                str(weight_dtype_name(t), " M ", M, " N ", N, " K ", K, acc ? " acc" : "");
            ASSERT_EQ(std::memcmp(y.data(), yp.data(), y.numel() * sizeof(float)), 0)
                << what << ": VNNI and portable kernels differ";
            for (int64_t m = 0; m < M; ++m) {
              for (int64_t n = 0; n < N; ++n) {
                const double b0 = acc ? y0[m * ldy + n] : 0.0;
                const double ex = b0 + e.sum[m * N + n];
                const double bd = bound(K / 32, e.mag[m * N + n], b0);
                ASSERT_LE(std::fabs(y[m * ldy + n] - ex), bd)
                    << what << " (" << m << "," << n << ")";
                // the reference: the same sum in double, rounded once to fp32
                ASSERT_LE(std::fabs(yr[m * ldy + n] - ex), std::fabs(ex) * 0x1p-24 + 1e-30) << what;
                fp32_breaks += std::fabs(yf[m * ldy + n] - ex) > bd;
                ++checked;
              }
              for (int64_t j = N; j < ldy; ++j)
                ASSERT_EQ(y[m * ldy + j], y0[m * ldy + j]) << what << ": padding overwritten";
            }
          }
        }
  std::printf("fp32 activations outside the 8-bit bound: %lld of %lld outputs\n",
              (long long)fp32_breaks, (long long)checked);
  EXPECT_GT(fp32_breaks, checked / 2);
}

// A NaN in x reaches exactly the outputs of its row (as with fp32 activations).
TEST(ActQ8Gemm, NonFiniteActivationsPropagate) {
  Rng rng(22);
  for (WeightDType t : kQuant) {
    const int64_t M = 40, N = 9, K = 64;
    Weight Wq(test::randn({N, K}, rng), t);
    Tensor x = test::randn({M, K}, rng);
    x[5 * K + 40] = std::numeric_limits<float>::quiet_NaN();
    x[9 * K + 3] = std::numeric_limits<float>::infinity();
    Tensor y({M, N});
    ops::gemm_nt_q8(x.data(), M, K, ops::WeightRows{Wq.row_ptr(0), t, K}, N, K, y.data(), N, false);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        EXPECT_EQ(std::isnan(y[m * N + n]), m == 5 || m == 9) << m << "," << n;
  }
}

// Split outputs are the plain product's columns bit for bit (including a block boundary inside a
// 6-row tile and an empty block); 1, 2 and 3 threads and repeated runs give the same bits.
TEST(ActQ8Gemm, SplitOutputsAndThreadCountsGiveTheSameBits) {
  Rng rng(23);
  for (WeightDType t : kQuant) {
    const int64_t M = 75, K = 256, N = 3 * 64 + 17;
    Weight Wq(test::randn({N, K}, rng), t);
    const ops::WeightRows W{Wq.row_ptr(0), t, K};
    Tensor x = test::randn({M, K}, rng);
    Tensor y1({M, N});
    {
      ThreadScope one(1);
      ops::gemm_nt_q8(x.data(), M, K, W, N, K, y1.data(), N, false);
    }
    for (int threads : {2, 3, 2})
      for (int rep = 0; rep < 2; ++rep) {
        ThreadScope ts(threads);
        Tensor y({M, N});
        ops::gemm_nt_q8(x.data(), M, K, W, N, K, y.data(), N, false);
        ASSERT_EQ(std::memcmp(y.data(), y1.data(), y.numel() * sizeof(float)), 0)
            << weight_dtype_name(t) << " threads " << threads;
      }
    const int64_t widths[] = {64, 0, 67, 78};
    std::vector<Tensor> ys;
    std::vector<ops::GemmNtOut> outs;
    for (int64_t w : widths) {
      ys.push_back(Tensor::full({M, w + 2}, 5.f));
      outs.push_back({w, ys.back().data(), w + 2});
    }
    ops::gemm_nt_q8(x.data(), M, K, W, N, K, nullptr, 0, false, outs.data(), 4);
    for (int64_t i = 0, c = 0; i < 4; c += widths[i++])
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t j = 0; j < widths[i]; ++j)
          ASSERT_EQ(ys[i][m * (widths[i] + 2) + j], y1[m * N + c + j]) << "split " << i;
        ASSERT_EQ(ys[i][m * (widths[i] + 2) + widths[i]], 5.f) << "padding";
      }
  }
  Tensor xf = Tensor::zeros({20, 32});
  Weight wf(Tensor::zeros({4, 32}));
  float y = 0;
  test::expect_error(
      [&] {
        ops::gemm_nt_q8(xf.data(), 20, 32, ops::WeightRows{wf.row_ptr(0), WeightDType::f32, 32}, 1,
                        32, &y, 1, false);
      },
      {"q8_0 or q4_0", "f32"});
}

// ops::linear / linear_split take the 8-bit kernels only when asked and only for q8_0 / q4_0
// weights (any M): the default and other dtypes are bit for bit the fp32 path.
TEST(ActQ8Gemm, LinearRoutesOnlyWhenAsked) {
  Rng rng(24);
  const int64_t K = 96, N = 40;
  for (WeightDType t : {WeightDType::q8_0, WeightDType::q4_0, WeightDType::bf16, WeightDType::f32})
    for (int64_t M : {3, 16, 17, 50}) {
      Weight Wq(test::randn({N, K}, rng), t);
      Tensor x = test::randn({M, K}, rng), b = test::randn({N}, rng);
      Tensor y_f32 = ops::linear(x, Wq, b);
      std::vector<Tensor> s_f32 = ops::linear_split(x, Wq, {10, 30});
      ActivationScope q8(ActivationType::q8);
      Tensor y_q8 = ops::linear(x, Wq, b);
      std::vector<Tensor> s_q8 = ops::linear_split(x, Wq, {10, 30});
      const bool routed = is_quantised(t);
      const std::string what = str(weight_dtype_name(t), " M ", M);
      if (!routed) {
        EXPECT_EQ(std::memcmp(y_f32.data(), y_q8.data(), y_q8.numel() * 4), 0) << what;
        EXPECT_EQ(std::memcmp(s_f32[1].data(), s_q8[1].data(), s_q8[1].numel() * 4), 0) << what;
        continue;
      }
      Tensor ye({M, N});
      ops::gemm_nt_q8(x.data(), M, K, ops::WeightRows{Wq.row_ptr(0), t, K}, N, K, ye.data(), N,
                      false);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          ASSERT_EQ(y_q8[m * N + n], ye[m * N + n] + b[n]) << what;  // bias added after
          ASSERT_EQ((n < 10 ? s_q8[0][m * 10 + n] : s_q8[1][m * 30 + n - 10]), ye[m * N + n])
              << what;
        }
      EXPECT_NE(std::memcmp(y_f32.data(), y_q8.data(), y_q8.numel() * 4), 0) << what;
    }
  EXPECT_EQ(activation_type(), ActivationType::f32);
  EXPECT_EQ(parse_activation_type("q8"), ActivationType::q8);
  EXPECT_EQ(parse_activation_type("f32"), ActivationType::f32);
  EXPECT_EQ(std::string(activation_type_name(ActivationType::q8)), "q8");
  test::expect_error([] { parse_activation_type("q4"); }, {"q4", "f32 or q8"});
}

// Decode and prefill agree: a row of x gives the same bits through ops::linear with M = 1, 5 or 16
// (the streaming kernel) as inside an M = 40 product (the tile).
TEST(ActQ8Gemm, DecodeRowsEqualPrefillRowsBitForBit) {
  Rng rng(25);
  ActivationScope q8(ActivationType::q8);
  for (WeightDType t : kQuant)
    for (int64_t K : {96, 768}) {
      const int64_t N = 53;
      Weight Wq(test::randn({N, K}, rng), t);
      Tensor x = test::randn({40, K}, rng), b = test::randn({N}, rng);
      const Tensor full = ops::linear(x, Wq, b);
      for (int64_t M : {1, 5, 16})
        for (int64_t r0 : {int64_t{0}, 40 - M}) {
          const Tensor part = ops::linear(x.narrow(r0, M).contiguous(), Wq, b);
          ASSERT_EQ(std::memcmp(part.data(), full.data() + r0 * N, M * N * 4), 0)
              << weight_dtype_name(t) << " K " << K << " M " << M << " rows from " << r0;
        }
    }
}

// ---- whole models -------------------------------------------------------------------------------

namespace {

// As test_quant_weights.cpp: widths that are whole blocks (d_model 64, d_inner 128).
ModelConfig tiny_config(const std::string& layer) {
  return ModelConfig::parse(
      std::string(
          R"({"d_model":64,"n_layer":2,"vocab_size":203,"pad_vocab_size_multiple":8,"ssm_cfg":{"layer":")") +
      layer + R"(","d_state":8,"d_conv":4,"expand":2)" +
      (layer == "Mamba2" ? R"(,"headdim":16,"chunk_size":8)" : "") + "}}");
}

MambaLM make_lm(const std::string& layer, WeightDType t) {
  MambaLM lm(tiny_config(layer), 3);
  Rng rng(9);
  for (auto& [n, p] : lm.named_parameters())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] += 0.05f * (float)rng.normal();
  lm.set_weight_dtype(t);
  return lm;
}

}  // namespace

class ActQ8LM : public ::testing::TestWithParam<const char*> {};

// The same q8_0 / q4_0 model with 8-bit and with fp32 activations: forward over B * L = 24 rows
// (the prefill GEMM) within tol::kQ8ActVsF32Act, and not within the fp32 kernels' tolerance (the
// option does change the numbers); the 8-bit logits are the same bits with 1 and 2 threads and on
// a repeated run. Decode with 8-bit activations (2 rows: the streaming kernel) after an 8-bit
// forward_last of the first 13 tokens (26 rows) against the 8-bit forward at the same positions:
// within kStepVsFull (measured: 0, the same bits), which fp32-activation decode (off by ~0.03)
// would fail. (Were the step's and the full sequence's scans to differ in the last bits, an
// activation next to a rounding boundary of its q8 grid could take the neighbouring code.)
TEST_P(ActQ8LM, LogitsNearFp32ActivationsAndDeterministic) {
  const std::string layer = GetParam();
  const int64_t B = 2, L = 20, L0 = 13;
  for (WeightDType t : kQuant) {
    const MambaLM lm = make_lm(layer, t);
    Rng rng(4);
    std::vector<int32_t> ids(B * L);
    for (auto& v : ids) v = static_cast<int32_t>(rng.below(203));
    const std::string what = str(layer, " ", weight_dtype_name(t));
    Tensor l32 = lm.forward(ids, B, L);
    ActivationScope q8(ActivationType::q8);
    Tensor l8 = lm.forward(ids, B, L);
    double lmax = 0;
    for (int64_t i = 0; i < l32.numel(); ++i) lmax = std::max(lmax, (double)std::fabs(l32[i]));
    std::printf("%s: max |logit| %.3g, max |q8 act - f32 act| %.3g\n", what.c_str(), lmax,
                test::max_abs_diff(l8, l32));
    EXPECT_TRUE(test::all_close(l8, l32, tol::kQ8ActVsF32Act, what + " q8 vs f32 activations"));
    EXPECT_FALSE(test::all_close(l8, l32, tol::kFastVsRef))
        << what << ": the option changed nothing";
    for (int threads : {1, 2}) {
      ThreadScope ts(threads);
      Tensor again = lm.forward(ids, B, L);
      ASSERT_EQ(std::memcmp(again.data(), l8.data(), l8.numel() * 4), 0)
          << what << " threads " << threads;
    }
    std::vector<int32_t> pre;
    for (int64_t b = 0; b < B; ++b)
      pre.insert(pre.end(), ids.begin() + b * L, ids.begin() + b * L + L0);
    LMState st;
    (void)lm.forward_last(pre, B, L0, &st);
    double worst = 0;
    for (int64_t s = L0; s < L; ++s) {
      std::vector<int32_t> tok;
      for (int64_t b = 0; b < B; ++b) tok.push_back(ids[b * L + s]);
      const Tensor a = lm.step(tok, st);
      Tensor full = Tensor::empty({B, a.dim(1)});
      for (int64_t b = 0; b < B; ++b)
        std::copy_n(l8.data() + (b * L + s) * a.dim(1), a.dim(1), full.data() + b * a.dim(1));
      worst = std::max(worst, test::max_abs_diff(a, full));
      EXPECT_TRUE(test::all_close(a, full, tol::kStepVsFull, str(what, " step ", s)));
    }
    std::printf("%s: 8-bit step vs 8-bit forward, max |diff| %.3g\n", what.c_str(), worst);
  }
}

INSTANTIATE_TEST_SUITE_P(Layers, ActQ8LM, ::testing::Values("Mamba1", "Mamba2"));

// The CLI: `score --dtype q8_0|q4_0 --activations q8` on the golden Mamba-1 checkpoint writes the
// logits the library computes with 8-bit activations (24 tokens: the prefill GEMM), bit for bit;
// --activations q8 with another --dtype is refused with a message naming the fix; bench prints the
// activations it ran with.
TEST(ActQ8Cli, ScoreBenchAndErrors) {
  namespace fs = std::filesystem;
  const std::string dir = test::golden_path("lm_mamba1_ckpt");
  const fs::path tmp =
      fs::temp_directory_path() / ("mamba_test_act_q8_" + std::to_string(getpid()));
  fs::create_directories(tmp);
  const std::string ids = (tmp / "ids.npy").string(), out = (tmp / "logits.npy").string();
  std::vector<int64_t> v;
  for (int i = 0; i < 24; ++i) v.push_back((i * 37 + 5) % 50);
  write_npy_i64(ids, {1, 24}, v);
  const std::vector<int32_t> v32(v.begin(), v.end());
  for (WeightDType t : kQuant) {
    auto r = test::run_cli(str("score --model ", dir, " --ids ", ids, " --out ", out,
                               " --threads 1 --activations q8 --dtype ", weight_dtype_name(t)));
    ASSERT_EQ(r.status, 0) << r.out;
    MambaLM lm = MambaLM::load(dir, t);
    Tensor f32act = lm.forward(v32, 1, 24);
    ActivationScope q8(ActivationType::q8);
    const Tensor expect = lm.forward(v32, 1, 24);
    NpyArray a = read_npy(out);
    ASSERT_EQ(a.shape, expect.shape());
    EXPECT_EQ(std::memcmp(a.data.data(), expect.data(), expect.numel() * 4), 0)
        << weight_dtype_name(t);
    EXPECT_NE(std::memcmp(f32act.data(), expect.data(), expect.numel() * 4), 0)
        << weight_dtype_name(t);
  }
  auto r = test::run_cli(
      str("score --model ", dir, " --ids ", ids, " --out ", out, " --activations q8"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.out.find("--dtype q8_0"), std::string::npos) << r.out;
  r = test::run_cli(
      str("score --model ", dir, " --ids ", ids, " --out ", out, " --dtype q8_0 --activations q4"));
  EXPECT_NE(r.status, 0);
  r = test::run_cli(
      "bench --preset tiny --prompt 20 --gen 2 --reps 1 --threads 1 --dtype q4_0 --activations q8");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("q4_0 weights, q8 activations"), std::string::npos) << r.out;
  r = test::run_cli("bench --help");
  EXPECT_NE(r.out.find("--activations"), std::string::npos) << r.out;
  fs::remove_all(tmp);
}
