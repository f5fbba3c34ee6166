// Block-quantised weight storage (q8_0 / q4_0, ggml's formats) for inference: the byte layout and
// ggml's reference rounding on hand-worked blocks, the vectorised decoder against the scalar one
// on every compiled SIMD target, the decode kernel (M <= 16) and the packed prefill GEMM against
// the double reference on the dequantised weights (awkward sizes, views, padded leading
// dimensions), the embedding, whole tiny LMs (Mamba1, Mamba2) against the fp32 model holding the
// same dequantised weights and against the original fp32 model, a Q8_0 / Q4_0 GGUF round trip
// that keeps the blocks as they are, and the errors (row lengths, training).
#include <hwy/targets.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "mamba/gguf.h"
#include "mamba/lm.h"
#include "model/npy.h"
#include "ops/elementwise.h"
#include "ops/gemm_nt.h"
#include "ops/half_matmul.h"
#include "ops/linear.h"
#include "test_util.h"

using namespace mamba;

namespace {

constexpr WeightDType kQuant[] = {WeightDType::q8_0, WeightDType::q4_0};

uint16_t rd16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

std::vector<uint8_t> quantise(const std::vector<float>& x, WeightDType t) {
  std::vector<uint8_t> q(static_cast<size_t>(weight_row_bytes(t, static_cast<int64_t>(x.size()))));
  quantise_blocks(x.data(), q.data(), static_cast<int64_t>(x.size()), t);
  return q;
}

}  // namespace

// ---- formats and rounding ----------------------------------------------------------------------

// q8_0 on a block whose largest magnitude is 127/16: d = 1/16 exactly (f16 0x2C00), so every
// value that is a multiple of 1/16 is stored exactly as that multiple, and values halfway
// between two codes round away from zero (C's roundf, as ggml's reference).
TEST(QuantFormat, Q8_0KnownBlock) {
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = static_cast<float>(j - 16) / 16.f;  // codes -16..15
  x[0] = -127.f / 16;                                                     // amax: code -127
  x[1] = 2.5f / 16;                                                       // tie: code 3
  x[2] = -2.5f / 16;                                                      // tie: code -3
  x[3] = 0.3f / 16;                                                       // code 0
  const std::vector<uint8_t> q = quantise(x, WeightDType::q8_0);
  ASSERT_EQ(q.size(), 34u);
  EXPECT_EQ(rd16(q.data()), 0x2C00);  // f16 of 1/16
  EXPECT_EQ(q[0], 0x00);              // little-endian
  EXPECT_EQ(q[1], 0x2C);
  EXPECT_EQ(static_cast<int8_t>(q[2 + 0]), -127);
  EXPECT_EQ(static_cast<int8_t>(q[2 + 1]), 3);
  EXPECT_EQ(static_cast<int8_t>(q[2 + 2]), -3);
  EXPECT_EQ(static_cast<int8_t>(q[2 + 3]), 0);
  for (int j = 4; j < 32; ++j) EXPECT_EQ(static_cast<int8_t>(q[2 + j]), j - 16) << j;
  std::vector<float> y(32), yr(32);
  dequantise_blocks(q.data(), y.data(), 32, WeightDType::q8_0);
  dequantise_blocks_ref(q.data(), yr.data(), 32, WeightDType::q8_0);
  EXPECT_EQ(y[0], -127.f / 16);
  EXPECT_EQ(y[1], 3.f / 16);
  for (int j = 4; j < 32; ++j) EXPECT_EQ(y[j], x[j]) << j;
  EXPECT_EQ(0, std::memcmp(y.data(), yr.data(), sizeof(float) * 32));
  // An all-zero block: scale 0, codes 0.
  const std::vector<uint8_t> z = quantise(std::vector<float>(32, 0.f), WeightDType::q8_0);
  for (uint8_t b : z) EXPECT_EQ(b, 0);
}

// q4_0: d = max / -8 with max the (first) value of largest magnitude, sign kept; element j is the
// low nibble of byte j, element j + 16 its high nibble; nibble = min(15, trunc(x/d + 8.5)).
TEST(QuantFormat, Q4_0KnownBlockNibbleOrderAndClipping) {
  std::vector<float> x(32, 0.f);
  x[0] = -1.f;       // largest magnitude, negative: d = 1/8 (f16 0x3000), nibble 0
  x[1] = 0.875f;     // 7/8: nibble 15
  x[2] = 1.f;        // the same magnitude, opposite sign, later: 8 + 8.5 -> 16 -> clipped to 15
  x[3] = 2.5f / 8;   // tie: 2.5 + 8.5 = 11 -> nibble 11 (halves round up)
  x[4] = -2.5f / 8;  // -2.5 + 8.5 = 6 -> nibble 6 (up: towards +inf)
  x[16] = -3.f / 8;  // high nibble of byte 0: 5
  x[31] = 5.f / 8;   // high nibble of byte 15: 13
  const std::vector<uint8_t> q = quantise(x, WeightDType::q4_0);
  ASSERT_EQ(q.size(), 18u);
  EXPECT_EQ(rd16(q.data()), 0x3000);  // f16 of 1/8
  EXPECT_EQ(q[2 + 0], 0x0 | (5 << 4));
  EXPECT_EQ(q[2 + 1], 15 | (8 << 4));
  EXPECT_EQ(q[2 + 2], 15 | (8 << 4));
  EXPECT_EQ(q[2 + 3], 11 | (8 << 4));
  EXPECT_EQ(q[2 + 4], 6 | (8 << 4));
  EXPECT_EQ(q[2 + 15], 8 | (13 << 4));
  std::vector<float> y(32);
  dequantise_blocks(q.data(), y.data(), 32, WeightDType::q4_0);
  EXPECT_EQ(y[0], -1.f);
  EXPECT_EQ(y[1], 0.875f);
  EXPECT_EQ(y[2], 0.875f);  // clipped
  EXPECT_EQ(y[3], 3.f / 8);
  EXPECT_EQ(y[4], -2.f / 8);
  EXPECT_EQ(y[16], -3.f / 8);
  EXPECT_EQ(y[31], 5.f / 8);
  EXPECT_EQ(y[5], 0.f);
  // A positive maximum gives a negative scale: 1.0 -> nibble 0 (value -8 * -1/8).
  std::vector<float> p(32, 0.f);
  p[7] = 1.f;
  p[8] = -0.25f;
  const std::vector<uint8_t> qp = quantise(p, WeightDType::q4_0);
  EXPECT_EQ(f16_to_f32(rd16(qp.data())), -0.125f);
  EXPECT_EQ(qp[2 + 7] & 0xF, 0);
  EXPECT_EQ(qp[2 + 8] & 0xF, 10);  // -0.25 / -0.125 + 8.5 = 10.5 -> 10
}

// Random data: the rounding bound of each format, bytes equal to the GGUF writer's (one
// quantiser), and errors for a non-finite value or a partial block.
TEST(QuantFormat, BoundsAndErrors) {
  Rng rng(5);
  Tensor xt = test::randn({32 * 40}, rng);
  std::vector<float> x(xt.data(), xt.data() + xt.numel());
  for (WeightDType t : kQuant) {
    const std::vector<uint8_t> q = quantise(x, t);
    const GGMLType gt = t == WeightDType::q8_0 ? GGMLType::Q8_0 : GGMLType::Q4_0;
    EXPECT_EQ(q, ggml_quantize(gt, x.data(), static_cast<int64_t>(x.size())));
    std::vector<float> y(x.size());
    dequantise_blocks(q.data(), y.data(), static_cast<int64_t>(x.size()), t);
    for (size_t b = 0; b < x.size() / 32; ++b) {
      const float d = f16_to_f32(rd16(q.data() + b * (t == WeightDType::q8_0 ? 34 : 18)));
      for (int j = 0; j < 32; ++j) {
        // q8_0: half a step, plus the scale's own f16 rounding (2^-11 relative) times 127.
        // q4_0: one step (a value of the opposite sign to the maximum may be clipped to 7).
        const double step = std::fabs(d);
        const double bound = t == WeightDType::q8_0 ? 0.5 * step + 127 * step * 0x1p-11
                                                    : 1.0 * step + 8 * step * 0x1p-11;
        ASSERT_LE(std::fabs(y[32 * b + j] - x[32 * b + j]), bound + 1e-7)
            << weight_dtype_name(t) << " block " << b << " value " << j;
      }
    }
  }
  std::vector<float> bad(32, 1.f);
  bad[9] = INFINITY;
  std::vector<uint8_t> out(34);
  test::expect_error([&] { quantise_blocks(bad.data(), out.data(), 32, WeightDType::q8_0); },
                     {"not finite", "#9"});
  test::expect_error([&] { quantise_blocks(bad.data(), out.data(), 31, WeightDType::q8_0); },
                     {"31", "blocks of 32"});
  test::expect_error([&] { (void)weight_dtype_size(WeightDType::q4_0); }, {"q4_0", "block"});
  EXPECT_EQ(parse_weight_dtype("q8_0"), WeightDType::q8_0);
  EXPECT_EQ(parse_weight_dtype("q4_0"), WeightDType::q4_0);
  EXPECT_EQ(std::string(weight_dtype_name(WeightDType::q4_0)), "q4_0");
  test::expect_error([] { parse_weight_dtype("q5_0"); }, {"q5_0", "q8_0 or q4_0"});
  EXPECT_EQ(weight_row_bytes(WeightDType::q8_0, 96), 3 * 34);
  EXPECT_EQ(weight_row_bytes(WeightDType::q4_0, 96), 3 * 18);
}

// The vectorised decoder equals the scalar one bit for bit on arbitrary codes and scales
// (normal, subnormal, negative), on every SIMD target compiled and supported here.
TEST(QuantFormat, DecoderMatchesScalarOnEveryTarget) {
  Rng rng(6);
  const int64_t nb = 37;
  std::vector<uint8_t> bytes(static_cast<size_t>(nb * 34));
  for (auto& b : bytes) b = static_cast<uint8_t>(rng.below(256));
  const int64_t avail = hwy::SupportedTargets();
  int tested = 0;
  for (int64_t tg = 1; tg != 0 && tg <= avail; tg <<= 1) {
    if (!(avail & tg)) continue;
    hwy::SetSupportedTargetsForTest(tg);
    ++tested;
    for (WeightDType t : kQuant) {
      const int64_t bb = t == WeightDType::q8_0 ? 34 : 18;
      std::vector<uint8_t> q(bytes.begin(), bytes.begin() + nb * bb);
      for (int64_t b = 0; b < nb; ++b) {  // finite scales: exponent field not all ones
        uint16_t d = static_cast<uint16_t>(rng.below(0x7C00));
        if (b % 2) d |= 0x8000;
        q[b * bb] = static_cast<uint8_t>(d), q[b * bb + 1] = static_cast<uint8_t>(d >> 8);
      }
      std::vector<float> y(static_cast<size_t>(32 * nb)), yr(y.size());
      dequantise_blocks(q.data(), y.data(), 32 * nb, t);
      dequantise_blocks_ref(q.data(), yr.data(), 32 * nb, t);
      for (size_t i = 0; i < y.size(); ++i)
        ASSERT_EQ(y[i], yr[i]) << hwy::TargetName(tg) << " " << weight_dtype_name(t) << " " << i;
    }
  }
  hwy::SetSupportedTargetsForTest(0);
  EXPECT_GE(tested, 1);
}

// ---- Weight
// --------------------------------------------------------------------------------------

TEST(QuantWeight, StorageViewsAssignAndErrors) {
  Rng rng(7);
  for (WeightDType t : kQuant) {
    Tensor W = test::randn({9, 96}, rng);
    Weight Wq(W, t);
    const int64_t rb = t == WeightDType::q8_0 ? 3 * 34 : 3 * 18;
    EXPECT_EQ(Wq.dtype(), t);
    EXPECT_EQ(Wq.row_bytes(), rb);
    EXPECT_EQ(Wq.bytes(), 9 * rb);
    // The storage is the quantiser's bytes, row after row.
    const std::vector<uint8_t> q = quantise(std::vector<float>(W.data(), W.data() + 9 * 96), t);
    EXPECT_EQ(0, std::memcmp(Wq.row_ptr(0), q.data(), q.size()));
    // to_f32 / row_to_f32 / a rows() view agree with the scalar decoder.
    std::vector<float> ref(9 * 96);
    dequantise_blocks_ref(q.data(), ref.data(), 9 * 96, t);
    const Tensor back = Wq.to_f32();
    for (int64_t i = 0; i < 9 * 96; ++i) ASSERT_EQ(back[i], ref[i]);
    const Weight v = Wq.rows(4, 3);
    EXPECT_EQ(v.bytes(), 3 * rb);
    std::vector<float> row(96);
    v.row_to_f32(1, row.data());
    for (int64_t k = 0; k < 96; ++k) ASSERT_EQ(row[k], ref[5 * 96 + k]);
    // Embedding rows come out exactly.
    const std::vector<int32_t> ids{8, 0, 5, 5};
    Tensor e = ops::embedding_fwd(Wq, ids), er = ops::embedding_fwd_ref(back, ids);
    EXPECT_EQ(test::max_abs_diff(e, er), 0.0);
    // assign quantises; assign_raw copies bytes; set_dtype(f32) is exact.
    Weight w2(Tensor::zeros({9, 96}), t);
    w2.assign(W);
    EXPECT_EQ(0, std::memcmp(w2.row_ptr(0), q.data(), q.size()));
    Weight w3(Tensor::zeros({9, 96}), t);
    w3.assign_raw(q.data(), static_cast<int64_t>(q.size()));
    EXPECT_EQ(test::max_abs_diff(w3.to_f32(), back), 0.0);
    test::expect_error([&] { w3.assign_raw(q.data(), 5); }, {"5 bytes", weight_dtype_name(t)});
    w3.set_dtype(WeightDType::f32);
    EXPECT_EQ(test::max_abs_diff(w3.f32(), back), 0.0);
    test::expect_error([&] { (void)Wq.f32("in_proj"); },
                       {"in_proj", weight_dtype_name(t), "inference only", "load in f32 to train"});
    // A row length that is not whole blocks: refused, naming the tensor.
    Weight dt(test::randn({16, 48}, rng));
    test::expect_error([&] { dt.set_dtype(t, "backbone.layers.0.mixer.dt_proj.weight"); },
                       {"dt_proj.weight", weight_dtype_name(t), "blocks of 32", "(16,48)", "48"});
  }
}

// ---- kernels: decode (M <= 16, streaming) and prefill (M > 16, packed GEMM) ---------------------

// ops::linear on quantised weights vs the double reference on the dequantised weights: a row
// range view, padded leading dimensions, a row count that is not a multiple of the 4-row tile,
// M on both sides of the streaming / GEMM switch; the padding of y stays untouched.
TEST(QuantMatmul, LinearMatchesReferenceOnDequantisedWeights) {
  Rng rng(11);
  for (WeightDType t : kQuant)
    for (int64_t cols : {32, 96, 800})
      for (int64_t M : {1, 3, 4, 5, 16, 17, 40}) {
        const int64_t rows = 37, r0 = 5, n = 29, ldx = cols + 3, ldy = n + 2;
        Tensor W = test::rand_uniform({rows, cols}, rng, -1.0, 1.0);
        Weight Wq(W, t);
        const Tensor Wd = Wq.rows(r0, n).to_f32();  // the dequantised rows, fp32
        Tensor x = test::randn({M, ldx}, rng), b = test::randn({n}, rng);
        Tensor y = Tensor::full({M, ldy}, 7.f);
        ops::linear_into(x.cols(0, cols), Wq.rows(r0, n), b, y.cols(0, n));
        Tensor yr = ops::linear_ref(x.cols(0, cols).contiguous(), Wd, b);
        EXPECT_TRUE(test::all_close(y.cols(0, n).contiguous(), yr, tol::kFastVsRef,
                                    str(weight_dtype_name(t), " cols ", cols, " M ", M)));
        for (int64_t m = 0; m < M; ++m)
          for (int64_t j = n; j < ldy; ++j) ASSERT_EQ(y[m * ldy + j], 7.f) << "padding overwritten";
        // The streaming kernel's own reference agrees too (it dequantises row by row).
        if (M <= ops::kHalfGemvMaxM) {
          Tensor ys({M, n}), ysr({M, n});
          ops::stream_matmul(x.data(), M, ldx, Wq.rows(r0, n), ys.data(), n);
          ops::stream_matmul_ref(x.data(), M, ldx, Wq.rows(r0, n), ysr.data(), n);
          EXPECT_TRUE(test::all_close(ys, ysr, tol::kFastVsRef, "stream_matmul"));
        }
      }
}

// The packed prefill GEMM itself (whatever this machine's dispatch picks for ops::gemm_nt) and the
// streaming kernel, on every compiled target, against gemm_nt_ref / stream_matmul_ref; with
// accumulate (a bias already in y) and a leading dimension of W larger than K (a column block).
TEST(QuantMatmul, PackedGemmAndStreamingOnEveryTarget) {
  Rng rng(12);
  const int64_t avail = hwy::SupportedTargets();
  int tested = 0;
  for (int64_t tg = 1; tg != 0 && tg <= avail; tg <<= 1) {
    if (!(avail & tg)) continue;
    hwy::SetSupportedTargetsForTest(tg);
    ++tested;
    for (WeightDType t : kQuant)
      for (int64_t K : {32, 160})
        for (int64_t M : {2, 9, 33}) {
          const int64_t N = 13, ldw = K + 64;
          Weight Wq(test::randn({N, ldw}, rng), t);  // W = its first K columns: ld = K + 64
          const ops::WeightRows rows{Wq.row_ptr(0), t, ldw};
          Tensor x = test::randn({M, K}, rng), y0 = test::randn({M, N}, rng);
          Tensor y = y0.clone(), yr = y0.clone();
          ops::gemm_nt_packed(x.data(), M, K, rows, N, K, y.data(), N, true);
          ops::gemm_nt_ref(x.data(), M, K, rows, N, K, yr.data(), N, true);
          const std::string what =
              str(hwy::TargetName(tg), " ", weight_dtype_name(t), " K ", K, " M ", M);
          EXPECT_TRUE(test::all_close(y, yr, tol::kFastVsRef, what + " packed"));
          Tensor y2({M, N}), y2r({M, N});
          ops::gemm_nt(x.data(), M, K, rows, N, K, y2.data(), N, false);
          ops::gemm_nt_ref(x.data(), M, K, rows, N, K, y2r.data(), N, false);
          EXPECT_TRUE(test::all_close(y2, y2r, tol::kFastVsRef, what + " gemm_nt"));
          Weight Wk(test::randn({N, K}, rng), t);
          Tensor ys({M, N}), ysr({M, N});
          ops::stream_matmul(x.data(), M, K, Wk, ys.data(), N);
          ops::stream_matmul_ref(x.data(), M, K, Wk, ysr.data(), N);
          EXPECT_TRUE(test::all_close(ys, ysr, tol::kFastVsRef, what + " streaming"));
        }
  }
  hwy::SetSupportedTargetsForTest(0);
  EXPECT_GE(tested, 1);
  Weight Wq(test::randn({4, 64}, rng), WeightDType::q8_0);
  float x[40] = {}, y[4];
  test::expect_error(
      [&] {
        ops::gemm_nt_ref(x, 1, 40, ops::WeightRows{Wq.row_ptr(0), WeightDType::q8_0, 40}, 4, 40, y,
                         4, false);
      },
      {"q8_0", "K 40", "blocks of 32"});
}

// ---- whole models
// --------------------------------------------------------------------------------

namespace {

// Widths that are whole blocks (d_model 64, d_inner 128); Mamba-1's dt_proj rows are dt_rank = 4
// values, so it stays fp32 (ParamList::set_weight_dtype).
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
  return lm;
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> ids(static_cast<size_t>(n));
  for (auto& v : ids) v = static_cast<int32_t>(rng.below(static_cast<uint64_t>(V)));
  return ids;
}

Tensor at_position(const Tensor& logits, int64_t t) {
  const int64_t B = logits.dim(0), L = logits.dim(1), V = logits.dim(2);
  Tensor o = Tensor::empty({B, V});
  for (int64_t b = 0; b < B; ++b) std::copy_n(logits.data() + (b * L + t) * V, V, o.data() + b * V);
  return o;
}

std::string tmp_path(const std::string& name) {
  namespace fs = std::filesystem;
  const fs::path d = fs::temp_directory_path() / ("mamba_test_quant_" + std::to_string(getpid()));
  fs::create_directories(d);
  return (d / name).string();
}

}  // namespace

class QuantLM : public ::testing::TestWithParam<const char*> {};

// A q8_0 / q4_0 model against (a) the fp32 model holding the same dequantised weights (only the
// order of the fp32 sums differs: tight) and (b) the original fp32 model (the quantisation error
// itself: looser, tolerances.h), for forward (B*L = 24 rows: the packed GEMM), forward_last and
// step (2 rows: the streaming kernel), and step == forward on the quantised model.
TEST_P(QuantLM, LogitsMatchDequantisedAndOriginalF32) {
  const std::string layer = GetParam();
  const int64_t B = 2, L = 12;
  for (WeightDType t : kQuant) {
    MambaLM orig = make_lm(layer);
    MambaLM deq = make_lm(layer);
    deq.set_weight_dtype(t);
    deq.set_weight_dtype(WeightDType::f32);  // fp32 storage of the dequantised values (exact)
    MambaLM q = make_lm(layer);
    q.set_weight_dtype(t);
    EXPECT_EQ(q.weight_dtype(), t);
    int64_t nq = 0, nf = 0;  // which matrices were quantised
    for (auto& [name, p] : q.named_parameters())
      if (p->matrix) (p->value.dtype() == t ? nq : nf) += 1;
    EXPECT_EQ(nq, layer == "Mamba1" ? 2 * 3 + 1 : 2 * 2 + 1);  // in, x, out (+ the embedding)
    EXPECT_EQ(nf, layer == "Mamba1" ? 2 : 0);                  // dt_proj (rows of 4)
    const auto ids = random_ids(B * L, 203, 4);
    const std::string what = str(layer, " ", weight_dtype_name(t));

    Tensor lq = q.forward(ids, B, L), ld = deq.forward(ids, B, L), lo = orig.forward(ids, B, L);
    EXPECT_TRUE(test::all_close(lq, ld, tol::kQuantVsDequantF32, what + " forward vs dequantised"));
    const tol::Tol loose = t == WeightDType::q8_0 ? tol::kQ8_0VsF32Logits : tol::kQ4_0VsF32Logits;
    EXPECT_TRUE(test::all_close(lq, lo, loose, what + " forward vs original f32"));
    double lmax = 0;
    for (int64_t i = 0; i < lo.numel(); ++i) lmax = std::max(lmax, (double)std::fabs(lo[i]));
    double se = 0, so = 0;
    for (int64_t i = 0; i < lo.numel(); ++i)
      se += (double(lq[i]) - lo[i]) * (double(lq[i]) - lo[i]), so += double(lo[i]) * lo[i];
    std::printf(
        "%s: max |logit| %.3g, max |err| vs dequantised f32 %.3g, vs original f32 %.3g (relative "
        "rms %.3g)\n",
        what.c_str(), lmax, test::max_abs_diff(lq, ld), test::max_abs_diff(lq, lo),
        std::sqrt(se / so));
    // The tight comparison must be able to fail: quantisation moves the logits by more.
    EXPECT_FALSE(test::all_close(lq, lo, tol::kQuantVsDequantF32));

    const int64_t L0 = 5;
    std::vector<int32_t> pre;
    for (int64_t b = 0; b < B; ++b)
      pre.insert(pre.end(), ids.begin() + b * L, ids.begin() + b * L + L0);
    LMState st, sd;
    Tensor last = q.forward_last(pre, B, L0, &st), last_d = deq.forward_last(pre, B, L0, &sd);
    EXPECT_TRUE(
        test::all_close(last, at_position(lq, L0 - 1), tol::kStepVsFull, what + " forward_last"));
    EXPECT_TRUE(test::all_close(last, last_d, tol::kQuantVsDequantF32, what + " last vs deq"));
    for (int64_t s = L0; s < L; ++s) {
      std::vector<int32_t> tok;
      for (int64_t b = 0; b < B; ++b) tok.push_back(ids[b * L + s]);
      Tensor a = q.step(tok, st), ad = deq.step(tok, sd);
      EXPECT_TRUE(test::all_close(a, at_position(lq, s), tol::kStepVsFull,
                                  str(what, " step ", s, " vs forward")));
      EXPECT_TRUE(
          test::all_close(a, ad, tol::kQuantVsDequantF32, str(what, " step ", s, " vs deq")));
    }
  }
}

// Training a quantised model is refused with a clear message, by the model and by the layers.
TEST_P(QuantLM, TrainingIsRefused) {
  const std::string layer = GetParam();
  MambaLM lm = make_lm(layer);
  const int64_t B = 1, L = 4;
  const auto ids = random_ids(B * L, 203, 5);
  LMSaved sv;
  Tensor logits = lm.forward(ids, B, L, &sv);
  for (WeightDType t : kQuant) {
    lm.set_weight_dtype(t);
    Tensor g = Tensor::zeros(logits.shape());
    const std::string msg = str("weights are ", weight_dtype_name(t));
    test::expect_error([&] { lm.backward(sv, g); },
                       {msg.c_str(), "inference only", "load in f32 to train"});
    test::expect_error([&] { lm.forward(ids, B, L, &sv); }, {msg.c_str(), "inference only"});
  }
}

// A Q8_0 (and Q4_0) GGUF file: loaded with the same --dtype its blocks are kept byte for byte;
// loaded as f32 it holds exactly the dequantised values; the two give the same logits up to the
// order of sums; saving the quantised model again writes the same blocks (requantising
// dequantised blocks is exact).
TEST_P(QuantLM, GgufRoundTripKeepsBlocks) {
  const std::string layer = GetParam();
  const struct {
    GGMLType g;
    WeightDType w;
  } kinds[] = {{GGMLType::Q8_0, WeightDType::q8_0}, {GGMLType::Q4_0, WeightDType::q4_0}};
  for (auto [g, wt] : kinds) {
    MambaLM orig = make_lm(layer);
    const std::string p = tmp_path(str(layer, "_", weight_dtype_name(wt), ".gguf"));
    orig.save_gguf(p, g, "");
    GGUFFile f = GGUFFile::open(p);
    MambaLM q = MambaLM::load_gguf(p, wt);
    MambaLM full = MambaLM::load_gguf(p, WeightDType::f32);
    int64_t kept = 0;
    for (auto& [name, prm] : q.named_parameters()) {
      if (prm->value.dtype() != wt) continue;
      // the GGUF name of this parameter: compare through the writer's own tensor set
      for (const std::string& gname : f.names()) {
        const GGUFTensorInfo& in = f.info(gname);
        if (in.type != static_cast<uint32_t>(g) || in.shape != prm->value.shape()) continue;
        if (static_cast<int64_t>(in.nbytes) == prm->value.bytes() &&
            std::memcmp(f.raw(gname), prm->value.row_ptr(0), in.nbytes) == 0) {
          ++kept;
          break;
        }
      }
    }
    int64_t quantised_in_file = 0;
    for (const std::string& gname : f.names())
      if (f.info(gname).type == static_cast<uint32_t>(g)) ++quantised_in_file;
    EXPECT_GT(quantised_in_file, 0);
    EXPECT_EQ(kept, quantised_in_file) << "every quantised tensor's blocks kept as they are";
    // The f32 load holds the dequantised values.
    for (auto& [name, prm] : full.named_parameters()) {
      auto qs = q.named_parameters();
      for (auto& [n2, p2] : qs) {
        if (n2 != name) continue;
        ASSERT_EQ(test::max_abs_diff(prm->value.to_f32(), p2->value.to_f32()), 0.0) << name;
      }
    }
    const auto ids = random_ids(2 * 9, 203, 8);
    EXPECT_TRUE(test::all_close(q.forward(ids, 2, 9), full.forward(ids, 2, 9),
                                tol::kQuantVsDequantF32, "gguf q vs f32 load"));
    // Save the quantised model again: the same blocks.
    const std::string p2 = tmp_path(str(layer, "_", weight_dtype_name(wt), "_again.gguf"));
    q.save_gguf(p2, g, "");
    GGUFFile f2 = GGUFFile::open(p2);
    for (const std::string& gname : f.names()) {
      const GGUFTensorInfo &a = f.info(gname), &b = f2.info(gname);
      ASSERT_EQ(a.type, b.type) << gname;
      if (a.type != static_cast<uint32_t>(g)) continue;  // F32 A = -exp(A_log) may move an ulp
      ASSERT_EQ(a.nbytes, b.nbytes) << gname;
      EXPECT_EQ(0, std::memcmp(f.raw(gname), f2.raw(gname), a.nbytes)) << gname;
    }
    std::filesystem::remove(p);
    std::filesystem::remove(p2);
  }
}

INSTANTIATE_TEST_SUITE_P(Layers, QuantLM, ::testing::Values("Mamba1", "Mamba2"));

// The CLI: `score --dtype q8_0 / q4_0` on the golden Mamba-1 checkpoint writes the logits of the
// model quantised in memory (the same kernels, so the same numbers up to the order of sums), and
// `generate` runs; `train` has no --dtype (training is fp32).
TEST(QuantCli, ScoreAndGenerate) {
  const std::string dir = test::golden_path("lm_mamba1_ckpt");
  const std::string ids = tmp_path("ids.npy"), out = tmp_path("logits.npy");
  const std::vector<int64_t> v{3, 14, 15, 92, 65, 35, 89, 79};
  write_npy_i64(ids, {1, 8}, v);
  const std::vector<int32_t> v32(v.begin(), v.end());
  for (WeightDType t : kQuant) {
    auto r = test::run_cli(str("score --model ", dir, " --ids ", ids, " --out ", out,
                               " --threads 1 --dtype ", weight_dtype_name(t)));
    ASSERT_EQ(r.status, 0) << r.out;
    MambaLM lm = MambaLM::load(dir, t);
    EXPECT_EQ(lm.weight_dtype(), t);
    const Tensor expect = lm.forward(v32, 1, 8);
    NpyArray a = read_npy(out);
    ASSERT_EQ(a.shape, expect.shape());
    Tensor got = Tensor::wrap(reinterpret_cast<float*>(a.data.data()), expect.shape()).clone();
    EXPECT_TRUE(test::all_close(got, expect, tol::kQuantVsDequantF32, weight_dtype_name(t)));
    r = test::run_cli(str("generate --model ", dir, " --ids ", ids, " -n 3 --greedy -q --dtype ",
                          weight_dtype_name(t)));
    EXPECT_EQ(r.status, 0) << r.out;
  }
  auto r =
      test::run_cli(str("score --model ", dir, " --ids ", ids, " --out ", out, " --dtype q5_0"));
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.out.find("q5_0"), std::string::npos) << r.out;
  std::filesystem::remove(ids), std::filesystem::remove(out);
}
