// The language model with Mamba-3 mixers (ssm_cfg "layer": "Mamba3", SISO and MIMO) against
// mamba_ssm's MambaLMHeadModel golden files: the checkpoint folder loads (mamba_ssm's
// config.json), logits, greedy generation token for token with its scores (our decode goes
// through the step path, which the official LM cannot run at this commit: its Mamba3.step
// refuses (B, 1, d_model), golden README "Found along the way"), prefill + step == the full
// forward, save / load round trip, config errors naming the key, training lowers the loss, 16-bit
// weights.
#include <filesystem>

#include "mamba/config.h"
#include "mamba/generate.h"
#include "mamba/lm.h"
#include "mamba/parallel.h"
#include "mamba/train.h"
#include "test_util.h"

using namespace mamba;

namespace {
struct Case {
  const char* name;
  int64_t params;
};
const Case kCases[] = {{"lm_mamba3", 18880}, {"lm_mamba3_mimo", 21040}};
std::vector<int32_t> to_i32(const std::vector<int64_t>& v) { return {v.begin(), v.end()}; }
}  // namespace

class LMMamba3Golden : public ::testing::TestWithParam<Case> {};

TEST_P(LMMamba3Golden, LogitsGenerationDecodeAndRoundTrip) {
  const Case c = GetParam();
  MambaLM lm = MambaLM::load(test::golden_path(std::string(c.name) + "_ckpt"));
  EXPECT_EQ(lm.num_parameters(), c.params);
  EXPECT_EQ(lm.vocab(), 64);
  auto f = SafetensorsFile::open(test::golden_path(std::string(c.name) + ".safetensors"));
  Shape s, gs;
  auto ids = to_i32(f.tensor_i64("input_ids", &s));
  const int64_t B = s[0], L = s[1], V = 64, Vr = 61;
  Tensor logits = lm.forward(ids, B, L);
  EXPECT_TRUE(test::close_report(logits, f.tensor("logits"), tol::kGoldenLogits, "logits"));

  // Greedy generation: prefill, then one step per token (the step path).
  auto gen = f.tensor_i64("generated_ids", &gs);
  Tensor scores = f.tensor("gen_scores");  // (B, 8, 61)
  std::vector<std::vector<int32_t>> prompts(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < L; ++t) prompts[b].push_back(ids[b * L + t]);
  GenerateOptions opt;
  opt.max_new_tokens = gs[1];
  opt.sampling.greedy = true;
  opt.vocab_limit = Vr;
  opt.keep_scores = true;
  GenerateResult r = generate(lm, prompts, opt);
  for (int64_t b = 0; b < B; ++b) {
    ASSERT_EQ((int64_t)r.tokens[b].size(), gs[1]);
    for (int64_t i = 0; i < gs[1]; ++i) {
      EXPECT_EQ(r.tokens[b][i], gen[b * gs[1] + i]) << "sequence " << b << " token " << i;
      Tensor got = Tensor::from({Vr}, r.scores[b][i]);
      Tensor want =
          Tensor::from({Vr}, std::vector<float>(scores.data() + (b * gs[1] + i) * Vr,
                                                scores.data() + (b * gs[1] + i + 1) * Vr));
      EXPECT_TRUE(test::all_close(got, want, tol::kGoldenLogits, "gen_scores"));
    }
  }

  // Prefill P tokens, then step: equal to the full forward at every position.
  for (int64_t P : {1, 5, 16}) {
    std::vector<int32_t> pre;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < P; ++t) pre.push_back(ids[b * L + t]);
    LMState st;
    lm.forward(pre, B, P, nullptr, &st);
    for (int64_t t = P; t < L; ++t) {
      std::vector<int32_t> tok = {ids[t], ids[L + t]};
      Tensor lt = lm.step(tok, st);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t v = 0; v < V; ++v)
          ASSERT_NEAR(lt[b * V + v], logits[(b * L + t) * V + v], 1e-4)
              << "P=" << P << " t=" << t << " b=" << b;
    }
  }

  // Save (mamba_ssm's layout) and load back: the same logits bit for bit, the same ssm_cfg.
  auto dir = std::filesystem::temp_directory_path() / (std::string("mamba3_lm_rt_") + c.name);
  lm.save(dir.string());
  MambaLM back = MambaLM::load(dir.string());
  EXPECT_TRUE(test::all_close(back.forward(ids, B, L), logits, {0, 0}, "logits after reload"));
  EXPECT_TRUE(back.config() == lm.config());
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Golden, LMMamba3Golden, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(LMMamba3, ConfigErrorsNameTheKey) {
  auto bad = [](const std::string& ssm, const char* frag) {
    const std::string js =
        R"({"d_model": 32, "n_layer": 1, "vocab_size": 16, "ssm_cfg": )" + ssm + "}";
    test::expect_error([&] { ModelConfig::parse(js); }, {frag});
  };
  bad(R"({"layer": "Mamba3", "headdim": 7})", "headdim");
  bad(R"({"layer": "Mamba3", "ngroups": 3, "headdim": 8})", "ngroups");
  bad(R"({"layer": "Mamba3", "rope_fraction": 0.3})", "rope_fraction");
  bad(R"({"layer": "Mamba3", "d_conv": 4})", "d_conv");  // a Mamba1/Mamba2 key
  bad(R"({"layer": "Mamba3", "is_mimo": true, "mimo_rank": 0})", "mimo_rank");
}

TEST(LMMamba3, TrainingLossGoesDown) {
  // The trainer with Mamba-3 mixers (what `mambacpp train --layer mamba3` runs) on a tiny
  // Selective Copying task, as test_train.cpp does for Mamba-1 / Mamba-2.
  set_num_threads(1);
  train::TrainConfig c;
  c.task.kind = train::TaskKind::SelectiveCopy;
  c.task.vocab = 6;
  c.task.seqlen = 16;
  c.task.n_copy = 2;
  c.model = ModelConfig::parse(
      R"({"d_model": 32, "n_layer": 2, "vocab_size": 8, "ssm_cfg": {"layer": "Mamba3",
          "d_state": 16, "headdim": 16, "chunk_size": 8}, "pad_vocab_size_multiple": 8})");
  c.batch = 16;
  c.steps = 60;
  c.warmup = 5;
  c.lr = 1e-2;
  c.seed = 3;
  train::Trainer tr(c);
  for (int i = 0; i < 60; ++i) tr.train_step();
  const auto& h = tr.history();
  auto mean = [&](size_t a, size_t b) {
    double s = 0;
    for (size_t i = a; i < b; ++i) s += h[i].loss;
    return s / static_cast<double>(b - a);
  };
  EXPECT_LT(mean(55, 60), 0.8 * mean(0, 3));
}

TEST(LMMamba3, SixteenBitWeights) {
  // bf16 / f16 storage of the projections and the embedding (inference only): the same logits as
  // the fp32 model holding the same rounded weights (only the order of fp32 sums differs), and
  // prefill + step == forward on the 16-bit model.
  for (WeightDType k : {WeightDType::bf16, WeightDType::f16})
    for (const char* name : {"lm_mamba3", "lm_mamba3_mimo"}) {
      const std::string dir = test::golden_path(std::string(name) + "_ckpt");
      MambaLM half = MambaLM::load(dir), rounded = MambaLM::load(dir), orig = MambaLM::load(dir);
      half.set_weight_dtype(k);
      rounded.set_weight_dtype(k);
      rounded.set_weight_dtype(WeightDType::f32);
      const int64_t B = 2, L = 9, V = 64;
      std::vector<int32_t> ids(B * L);
      Rng rng(5);
      for (auto& v : ids) v = static_cast<int32_t>(rng.below(61));
      Tensor lh = half.forward(ids, B, L), lr = rounded.forward(ids, B, L);
      const std::string what = str(name, " ", weight_dtype_name(k));
      EXPECT_TRUE(test::all_close(lh, lr, tol::kHalfVsRoundedF32, what + " vs rounded f32"));
      std::printf("  %s: max |err| vs rounded f32 %.3g, vs original f32 %.3g\n", what.c_str(),
                  test::max_abs_diff(lh, lr), test::max_abs_diff(lh, orig.forward(ids, B, L)));
      std::vector<int32_t> pre;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < 4; ++t) pre.push_back(ids[b * L + t]);
      LMState st;
      half.forward(pre, B, 4, nullptr, &st);
      for (int64_t t = 4; t < L; ++t) {
        Tensor lt = half.step({ids[t], ids[L + t]}, st);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t v = 0; v < V; ++v)
            ASSERT_NEAR(lt[b * V + v], lh[(b * L + t) * V + v], 1e-4) << what << " t=" << t;
      }
    }
}
