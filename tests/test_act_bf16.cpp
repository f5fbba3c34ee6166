// Opt-in bf16 activations for bf16 weights (ops/gemm_bf16.h, ActivationType::bf16): the
// vdpbf16ps tile against the portable kernel (the same operations: the same bits) and against the
// double reference with a bound derived from the fp32 roundings of the sequential sum, awkward
// shapes, non-finite values, split outputs, thread counts, the routing in ops::linear (prefill
// only; decode and other weight types unchanged bit for bit), whole tiny LMs against their
// fp32-activation logits, and the CLI.
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
#include "ops/gemm_bf16.h"
#include "ops/gemm_nt.h"
#include "ops/gemm_q8.h"
#include "ops/linear.h"
#include "test_util.h"

using namespace mamba;

namespace {
using test::ActivationScope;
using test::ThreadScope;

// The exact sum (double: each product of two bf16 values is exact, the sum of at most 800 of them
// within ~2^-50 relative) and the sum of the products' magnitudes.
struct Exact {
  std::vector<double> sum, mag;
};
Exact exact_terms(const float* x, int64_t M, int64_t ldx, const ops::WeightRows& W, int64_t N,
                  int64_t K) {
  const uint16_t* w = static_cast<const uint16_t*>(W.data);
  Exact e{std::vector<double>(M * N), std::vector<double>(M * N)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        const double t = static_cast<double>(bf16_to_f32(f32_to_bf16(x[m * ldx + k]))) *
                         bf16_to_f32(w[n * W.ld + k]);
        e.sum[m * N + n] += t, e.mag[m * N + n] += std::fabs(t);
      }
  return e;
}

// |y - exact| <= gamma_{n + 1} (sum_k |x_k w_k| + |y0|), n = 2 ceil(K / 2): one fp32 rounding
// per product added (each product is exact) plus one for adding the previous y (accumulate);
// gamma_n = n u / (1 - n u), u = 2^-24.
double bound(int64_t K, double mag, double y0) {
  const double nu = static_cast<double>(2 * ((K + 1) / 2) + 1) * 0x1p-24;
  return nu / (1 - nu) * (mag + std::fabs(y0));
}

}  // namespace

// The vdpbf16ps tile (where this CPU has it) against the portable kernel (bits) and the exact sum
// (the bound above); the reference against the exact sum; M around the 32-row panel and below it,
// N around the 12-row tile, odd and even K, padded leading dimensions, accumulate; y's padding
// untouched. The bound must be tight enough to fail: fp32 activations (gemm_nt_ref) break it.
TEST(ActBf16Gemm, KernelsMatchReferenceOnAwkwardShapes) {
  Rng rng(31);
  std::printf("vdpbf16ps kernel: %s\n", ops::gemm_bf16_dp_available() ? "yes" : "no (portable)");
  int64_t fp32_breaks = 0, checked = 0;
  for (int64_t K : {1, 2, 7, 64, 97, 256, 800})
    for (int64_t M : {1, 5, 17, 31, 32, 33, 70})
      for (int64_t N : {1, 5, 11, 12, 13, 37}) {
        const int64_t ldx = K + 5, ldw = K + 3, ldy = N + 3;
        Weight Wb(test::randn({N, ldw}, rng), WeightDType::bf16);
        const ops::WeightRows W{Wb.row_ptr(0), WeightDType::bf16, ldw};
        Tensor x = test::randn({M, ldx}, rng, 2.0);
        for (bool acc : {false, true}) {
          Tensor y0 = test::randn({M, ldy}, rng);
          Tensor y = y0.clone(), yp = y0.clone(), yr = y0.clone(), yf = y0.clone();
          ops::gemm_nt_bf16(x.data(), M, ldx, W, N, K, y.data(), ldy, acc);
          ops::gemm_nt_bf16_portable(x.data(), M, ldx, W, N, K, yp.data(), ldy, acc);
          ops::gemm_nt_bf16_ref(x.data(), M, ldx, W, N, K, yr.data(), ldy, acc);
          ops::gemm_nt_ref(x.data(), M, ldx, W, N, K, yf.data(), ldy, acc);
          const Exact e = exact_terms(x.data(), M, ldx, W, N, K);
          const std::string what = str("M ", M, " N ", N, " K ", K, acc ? " acc" : "");
          ASSERT_EQ(std::memcmp(y.data(), yp.data(), y.numel() * sizeof(float)), 0)
              << what << ": vdpbf16ps and portable kernels differ";
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t n = 0; n < N; ++n) {
              const double b0 = acc ? y0[m * ldy + n] : 0.0;
              const double ex = b0 + e.sum[m * N + n];
              const double bd = bound(K, e.mag[m * N + n], b0);
              ASSERT_LE(std::fabs(y[m * ldy + n] - ex), bd) << what << " (" << m << "," << n << ")";
              ASSERT_LE(std::fabs(yr[m * ldy + n] - ex), std::fabs(ex) * 0x1p-24 + 1e-30) << what;
              fp32_breaks += std::fabs(yf[m * ldy + n] - ex) > bd;
              ++checked;
            }
            for (int64_t j = N; j < ldy; ++j)
              ASSERT_EQ(y[m * ldy + j], y0[m * ldy + j]) << what << ": padding overwritten";
          }
        }
      }
  std::printf("fp32 activations outside the bf16 bound: %lld of %lld outputs\n",
              (long long)fp32_breaks, (long long)checked);
  EXPECT_GT(fp32_breaks, checked / 2);
}

// Hand-worked values (bf16's step at 1 is 2^-7): x = 1 + 2^-9 + 2^-12 rounds to 1 (nearest),
// 1 + 2^-7 + 2^-8 (a tie) to 1 + 2^-6 (even); with w = 1 the output is their sum, 2 + 2^-6. A NaN
// or an infinity in x reaches exactly the outputs of its row; a denormal x or w counts as zero
// (DAZ).
TEST(ActBf16Gemm, RoundingNonFiniteAndDenormals) {
  for (bool portable : {false, true}) {
    auto run = [&](const float* x, int64_t M, const uint16_t* w, int64_t N, int64_t K, float* y) {
      const ops::WeightRows W{w, WeightDType::bf16, K};
      if (portable)
        ops::gemm_nt_bf16_portable(x, M, K, W, N, K, y, N, false);
      else
        ops::gemm_nt_bf16(x, M, K, W, N, K, y, N, false);
    };
    {
      const float x[2] = {1.f + 0x1p-9f + 0x1p-12f, 1.f + 0x1p-7f + 0x1p-8f};
      const uint16_t w[2] = {f32_to_bf16(1.f), f32_to_bf16(1.f)};
      float y = 0;
      run(x, 1, w, 1, 2, &y);
      EXPECT_EQ(y, 2.f + 0x1p-6f) << portable;
    }
    {
      const float x[2] = {0x1p-130f, 3.f};                    // a denormal (also as bf16)
      const uint16_t w[2] = {f32_to_bf16(0x1p100f), 0x0001};  // w[1]: a bf16 denormal
      float y = 1;
      run(x, 1, w, 1, 2, &y);
      EXPECT_EQ(y, 0.f) << portable << ": denormals are zeros";
    }
    const int64_t M = 40, N = 9, K = 64;
    Rng rng(32);
    Weight Wb(test::randn({N, K}, rng), WeightDType::bf16);
    Tensor x = test::randn({M, K}, rng);
    x[5 * K + 40] = std::numeric_limits<float>::quiet_NaN();
    x[9 * K + 3] = std::numeric_limits<float>::infinity();
    Tensor y({M, N});
    run(x.data(), M, static_cast<const uint16_t*>(Wb.row_ptr(0)), N, K, y.data());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        EXPECT_EQ(std::isfinite(y[m * N + n]), m != 5 && m != 9) << m << "," << n;
  }
}

// Split outputs are the plain product's columns bit for bit (a block boundary inside a 12-row tile
// and an empty block); 1, 2 and 3 threads and repeated runs give the same bits.
TEST(ActBf16Gemm, SplitOutputsAndThreadCountsGiveTheSameBits) {
  Rng rng(33);
  const int64_t M = 75, K = 256, N = 3 * 64 + 17;
  Weight Wb(test::randn({N, K}, rng), WeightDType::bf16);
  const ops::WeightRows W{Wb.row_ptr(0), WeightDType::bf16, K};
  Tensor x = test::randn({M, K}, rng);
  Tensor y1({M, N});
  {
    ThreadScope one(1);
    ops::gemm_nt_bf16(x.data(), M, K, W, N, K, y1.data(), N, false);
  }
  for (int threads : {2, 3, 2})
    for (int rep = 0; rep < 2; ++rep) {
      ThreadScope ts(threads);
      Tensor y({M, N});
      ops::gemm_nt_bf16(x.data(), M, K, W, N, K, y.data(), N, false);
      ASSERT_EQ(std::memcmp(y.data(), y1.data(), y.numel() * sizeof(float)), 0)
          << "threads " << threads;
    }
  const int64_t widths[] = {64, 0, 67, 78};
  std::vector<Tensor> ys;
  std::vector<ops::GemmNtOut> outs;
  for (int64_t w : widths) {
    ys.push_back(Tensor::full({M, w + 2}, 5.f));
    outs.push_back({w, ys.back().data(), w + 2});
  }
  ops::gemm_nt_bf16(x.data(), M, K, W, N, K, nullptr, 0, false, outs.data(), 4);
  for (int64_t i = 0, c = 0; i < 4; c += widths[i++])
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t j = 0; j < widths[i]; ++j)
        ASSERT_EQ(ys[i][m * (widths[i] + 2) + j], y1[m * N + c + j]) << "split " << i;
      ASSERT_EQ(ys[i][m * (widths[i] + 2) + widths[i]], 5.f) << "padding";
    }
  Tensor xf = Tensor::zeros({20, 32});
  Weight wf(Tensor::zeros({4, 32}));
  float y = 0;
  test::expect_error(
      [&] {
        ops::gemm_nt_bf16(xf.data(), 20, 32, ops::WeightRows{wf.row_ptr(0), WeightDType::f32, 32},
                          1, 32, &y, 1, false);
      },
      {"bf16 weights", "f32"});
}

// ops::linear / linear_split take the bf16 kernel only when asked, only for bf16 weights and only
// for M > 16 (the prefill): decode (M <= 16) and f32 / f16 / q8_0 weights are bit for bit the
// fp32-activation path.
TEST(ActBf16Gemm, LinearRoutesOnlyPrefillOfBf16Weights) {
  Rng rng(34);
  const int64_t K = 96, N = 40;
  for (WeightDType t : {WeightDType::bf16, WeightDType::f16, WeightDType::q8_0, WeightDType::f32})
    for (int64_t M : {1, 3, 16, 17, 50}) {
      Weight Wb(test::randn({N, K}, rng), t);
      Tensor x = test::randn({M, K}, rng), b = test::randn({N}, rng);
      Tensor y_f32 = ops::linear(x, Wb, b);
      std::vector<Tensor> s_f32 = ops::linear_split(x, Wb, {10, 30});
      ActivationScope bf(ActivationType::bf16);
      Tensor y_bf = ops::linear(x, Wb, b);
      std::vector<Tensor> s_bf = ops::linear_split(x, Wb, {10, 30});
      const bool routed = t == WeightDType::bf16 && M > 16;
      const std::string what = str(weight_dtype_name(t), " M ", M);
      if (!routed) {
        EXPECT_EQ(std::memcmp(y_f32.data(), y_bf.data(), y_bf.numel() * 4), 0) << what;
        EXPECT_EQ(std::memcmp(s_f32[1].data(), s_bf[1].data(), s_bf[1].numel() * 4), 0) << what;
        continue;
      }
      Tensor ye({M, N});
      ops::gemm_nt_bf16(x.data(), M, K, ops::WeightRows{Wb.row_ptr(0), t, K}, N, K, ye.data(), N,
                        false);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) {
          ASSERT_EQ(y_bf[m * N + n], ye[m * N + n] + b[n]) << what;  // bias added after
          ASSERT_EQ((n < 10 ? s_bf[0][m * 10 + n] : s_bf[1][m * 30 + n - 10]), ye[m * N + n])
              << what;
        }
      EXPECT_NE(std::memcmp(y_f32.data(), y_bf.data(), y_bf.numel() * 4), 0) << what;
    }
  EXPECT_EQ(activation_type(), ActivationType::f32);
  EXPECT_EQ(parse_activation_type("bf16"), ActivationType::bf16);
  EXPECT_EQ(std::string(activation_type_name(ActivationType::bf16)), "bf16");
  test::expect_error([] { parse_activation_type("f16"); }, {"f16", "bf16"});
}

// ---- whole models -------------------------------------------------------------------------------

namespace {

ModelConfig tiny_config(const std::string& layer) {
  return ModelConfig::parse(
      std::string(
          R"({"d_model":64,"n_layer":2,"vocab_size":203,"pad_vocab_size_multiple":8,"ssm_cfg":{"layer":")") +
      layer + R"(","d_state":8,"d_conv":4,"expand":2)" +
      (layer == "Mamba2" ? R"(,"headdim":16,"chunk_size":8)" : "") + "}}");
}

MambaLM make_lm(const std::string& layer) {
  MambaLM lm(tiny_config(layer), 3);
  Rng rng(9);
  for (auto& [n, p] : lm.named_parameters())
    for (int64_t i = 0; i < p->value.numel(); ++i) p->value.f32()[i] += 0.05f * (float)rng.normal();
  lm.set_weight_dtype(WeightDType::bf16);
  return lm;
}

}  // namespace

class ActBf16LM : public ::testing::TestWithParam<const char*> {};

// The same bf16-weight model with bf16 and with fp32 activations: forward over B * L = 40 rows
// (the prefill GEMM) within tol::kBf16ActVsF32Act, and not within the fp32 kernels' tolerance
// (the option does change the numbers); the bf16-activation logits are the same bits with 1 and 2
// threads and on a repeated run. A decode step (B = 2 rows) with bf16 activations set is bit for
// bit the fp32-activation step (decode keeps fp32 activations).
TEST_P(ActBf16LM, LogitsNearFp32ActivationsAndDeterministic) {
  const std::string layer = GetParam();
  const int64_t B = 2, L = 20;
  const MambaLM lm = make_lm(layer);
  Rng rng(4);
  std::vector<int32_t> ids(B * L);
  for (auto& v : ids) v = static_cast<int32_t>(rng.below(203));
  Tensor l32 = lm.forward(ids, B, L);
  LMState s32, s32b;
  (void)lm.forward_last(ids, B, L, &s32);
  (void)lm.forward_last(ids, B, L, &s32b);
  const std::vector<int32_t> tok = {7, 11};
  const Tensor step32 = lm.step(tok, s32);
  ActivationScope bf(ActivationType::bf16);
  Tensor lb = lm.forward(ids, B, L);
  double lmax = 0;
  for (int64_t i = 0; i < l32.numel(); ++i) lmax = std::max(lmax, (double)std::fabs(l32[i]));
  std::printf("%s: max |logit| %.3g, max |bf16 act - f32 act| %.3g\n", layer.c_str(), lmax,
              test::max_abs_diff(lb, l32));
  EXPECT_TRUE(test::all_close(lb, l32, tol::kBf16ActVsF32Act, layer + " bf16 vs f32 activations"));
  EXPECT_FALSE(test::all_close(lb, l32, tol::kFastVsRef))
      << layer << ": the option changed nothing";
  for (int threads : {1, 2}) {
    ThreadScope ts(threads);
    Tensor again = lm.forward(ids, B, L);
    ASSERT_EQ(std::memcmp(again.data(), lb.data(), lb.numel() * 4), 0) << layer << " " << threads;
  }
  // decode (2 rows) with bf16 activations set, from the same fp32-activation prefill state
  const Tensor stepb = lm.step(tok, s32b);
  ASSERT_EQ(std::memcmp(stepb.data(), step32.data(), step32.numel() * 4), 0) << layer;
}

INSTANTIATE_TEST_SUITE_P(Layers, ActBf16LM, ::testing::Values("Mamba1", "Mamba2"));

// The CLI: `score --dtype bf16 --activations bf16` writes the logits the library computes with
// bf16 activations (24 tokens: the prefill GEMM), bit for bit; --activations bf16 with another
// --dtype is refused with a message naming the fix; bench prints the activations it ran with.
TEST(ActBf16Cli, ScoreBenchAndErrors) {
  namespace fs = std::filesystem;
  const std::string dir = test::golden_path("lm_mamba1_ckpt");
  const fs::path tmp =
      fs::temp_directory_path() / ("mamba_test_act_bf16_" + std::to_string(getpid()));
  fs::create_directories(tmp);
  const std::string ids = (tmp / "ids.npy").string(), out = (tmp / "logits.npy").string();
  std::vector<int64_t> v;
  for (int i = 0; i < 24; ++i) v.push_back((i * 37 + 5) % 50);
  write_npy_i64(ids, {1, 24}, v);
  const std::vector<int32_t> v32(v.begin(), v.end());
  auto r = test::run_cli(str("score --model ", dir, " --ids ", ids, " --out ", out,
                             " --threads 1 --activations bf16 --dtype bf16"));
  ASSERT_EQ(r.status, 0) << r.out;
  MambaLM lm = MambaLM::load(dir, WeightDType::bf16);
  Tensor f32act = lm.forward(v32, 1, 24);
  {
    ActivationScope bf(ActivationType::bf16);
    const Tensor expect = lm.forward(v32, 1, 24);
    NpyArray a = read_npy(out);
    ASSERT_EQ(a.shape, expect.shape());
    EXPECT_EQ(std::memcmp(a.data.data(), expect.data(), expect.numel() * 4), 0);
    EXPECT_NE(std::memcmp(f32act.data(), expect.data(), expect.numel() * 4), 0);
  }
  for (const char* dt : {"f32", "q8_0"}) {
    r = test::run_cli(str("score --model ", dir, " --ids ", ids, " --out ", out, " --dtype ", dt,
                          " --activations bf16"));
    EXPECT_NE(r.status, 0) << dt;
    EXPECT_NE(r.out.find("--dtype bf16"), std::string::npos) << r.out;
  }
  r = test::run_cli(
      "bench --preset tiny --prompt 20 --gen 2 --reps 1 --threads 1 --dtype bf16 --activations "
      "bf16");
  EXPECT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("bf16 weights, bf16 activations"), std::string::npos) << r.out;
  fs::remove_all(tmp);
}
