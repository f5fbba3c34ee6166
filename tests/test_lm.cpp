// The language model against mamba_ssm's MambaLMHeadModel (golden files, random weights,
// Mamba1 and Mamba2 mixers): checkpoint loading, logits, greedy generation token for token,
// prefill + step == full forward, save/load round trip, bad checkpoints, gradient checks.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <sstream>

#include "mamba/generate.h"
#include "mamba/lm.h"
#include "mamba/trace.h"
#include "mamba/train.h"
#include "test_util.h"

// MAMBA_TEST_ASAN: built with AddressSanitizer (gcc defines __SANITIZE_ADDRESS__; clang 14 only
// answers __has_feature(address_sanitizer)).
#if defined(__SANITIZE_ADDRESS__)
#define MAMBA_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MAMBA_TEST_ASAN 1
#endif
#endif

using namespace mamba;

namespace {
struct LMCase {
  const char* name;
  int64_t params;
};
const LMCase kCases[] = {{"lm_mamba1", 104832}, {"lm_mamba2", 91176}};

std::vector<int32_t> to_i32(const std::vector<int64_t>& v) { return {v.begin(), v.end()}; }
}  // namespace

class LMGolden : public ::testing::TestWithParam<LMCase> {};

TEST_P(LMGolden, LoadsCheckpointAndReproducesLogits) {
  const LMCase c = GetParam();
  MambaLM lm = MambaLM::load(test::golden_path(std::string(c.name) + "_ckpt"));
  EXPECT_EQ(lm.num_parameters(), c.params);
  EXPECT_EQ(lm.vocab(), 104);
  auto f = SafetensorsFile::open(test::golden_path(std::string(c.name) + ".safetensors"));
  Shape s;
  auto ids = to_i32(f.tensor_i64("input_ids", &s));
  Tensor logits = lm.forward(ids, s[0], s[1]);
  EXPECT_TRUE(test::all_close(logits, f.tensor("logits"), tol::kGoldenLogits, "logits"));
}

TEST_P(LMGolden, GreedyGenerationMatchesTokenForToken) {
  const LMCase c = GetParam();
  MambaLM lm = MambaLM::load(test::golden_path(std::string(c.name) + "_ckpt"));
  auto f = SafetensorsFile::open(test::golden_path(std::string(c.name) + ".safetensors"));
  Shape s, gs;
  auto ids = to_i32(f.tensor_i64("input_ids", &s));
  auto gen = f.tensor_i64("generated_ids", &gs);
  Tensor scores = f.tensor("gen_scores");  // (B, 8, 101)
  std::vector<std::vector<int32_t>> prompts;
  for (int64_t b = 0; b < s[0]; ++b) {
    prompts.emplace_back();
    for (int64_t t = 0; t < s[1]; ++t) prompts.back().push_back(ids[b * s[1] + t]);
  }
  GenerateOptions opt;
  opt.max_new_tokens = gs[1];
  opt.sampling.greedy = true;
  opt.vocab_limit = 101;
  opt.keep_scores = true;
  GenerateResult r = generate(lm, prompts, opt);
  for (int64_t b = 0; b < s[0]; ++b) {
    ASSERT_EQ((int64_t)r.tokens[b].size(), gs[1]);
    for (int64_t i = 0; i < gs[1]; ++i) {
      EXPECT_EQ(r.tokens[b][i], gen[b * gs[1] + i]) << "sequence " << b << " token " << i;
      Tensor got = Tensor::from({101}, r.scores[b][i]);
      Tensor want =
          Tensor::from({101}, std::vector<float>(scores.data() + (b * gs[1] + i) * 101,
                                                 scores.data() + (b * gs[1] + i + 1) * 101));
      EXPECT_TRUE(test::all_close(got, want, tol::kGoldenLogits, "gen_scores"));
    }
  }
}

TEST_P(LMGolden, PrefillThenStepEqualsFullForward) {
  const LMCase c = GetParam();
  MambaLM lm = MambaLM::load(test::golden_path(std::string(c.name) + "_ckpt"));
  Rng rng(3);
  const int64_t B = 2, L = 11, P = 4;
  std::vector<int32_t> ids(B * L);
  for (auto& v : ids) v = (int32_t)rng.below(101);
  Tensor full = lm.forward(ids, B, L);
  std::vector<int32_t> pre;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < P; ++t) pre.push_back(ids[b * L + t]);
  LMState st;
  Tensor lp = lm.forward(pre, B, P, nullptr, &st);
  const int64_t V = lm.vocab();
  for (int64_t t = P; t < L; ++t) {
    std::vector<int32_t> tok = {ids[t], ids[L + t]};
    Tensor lt = lm.step(tok, st);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t v = 0; v < V; ++v)
        ASSERT_NEAR(lt[b * V + v], full[(b * L + t) * V + v], 1e-4) << "t=" << t << " b=" << b;
  }
  (void)lp;
}

TEST_P(LMGolden, SaveLoadRoundTrip) {
  const LMCase c = GetParam();
  MambaLM lm = MambaLM::load(test::golden_path(std::string(c.name) + "_ckpt"));
  auto dir = std::filesystem::temp_directory_path() / (std::string("mamba_lm_rt_") + c.name);
  lm.save(dir.string());
  MambaLM back = MambaLM::load(dir.string());
  std::vector<int32_t> ids = {1, 5, 9, 100, 3};
  EXPECT_TRUE(test::all_close(back.forward(ids, 1, 5), lm.forward(ids, 1, 5), {0, 0},
                              "logits after reload"));
  auto f = SafetensorsFile::open((dir / "model.safetensors").string());
  EXPECT_TRUE(f.has("lm_head.weight"));  // tied head stored twice, as save_pretrained does
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Golden, LMGolden, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(LM, BadCheckpointsGiveClearErrors) {
  MambaLM lm = MambaLM::load(test::golden_path("lm_mamba1_ckpt"));
  auto f = SafetensorsFile::open(test::golden_path("lm_mamba1_ckpt/model.safetensors"));
  std::map<std::string, Tensor> sd;
  for (auto& n : f.names()) sd[n] = f.tensor(n);
  auto expect_msg = [&](std::map<std::string, Tensor> m, const std::string& needle) {
    try {
      lm.load_state_dict(m, "test");
      ADD_FAILURE() << "no error, expected '" << needle << "'";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto missing = sd;
  missing.erase("backbone.layers.1.mixer.A_log");
  expect_msg(missing, "missing tensor 'backbone.layers.1.mixer.A_log'");
  auto wrong = sd;
  wrong["backbone.norm_f.weight"] = Tensor({63});
  expect_msg(wrong, "backbone.norm_f.weight");
  auto extra = sd;
  extra["backbone.layers.9.mixer.D"] = Tensor({128});
  expect_msg(extra, "unexpected tensor");
  EXPECT_THROW(lm.forward(std::vector<int32_t>{1, 2, 104}, 1, 3),
               Error);                                                // id outside the vocabulary
  EXPECT_THROW(lm.forward(std::vector<int32_t>{1, 2}, 1, 3), Error);  // wrong count
  EXPECT_THROW(MambaLM::load("/nonexistent/model"), Error);
}

// Whole-LM gradient check: every parameter tensor, central differences on sampled elements.
TEST(LM, BackwardMatchesFiniteDifferences) {
  // d_intermediate 24: a GatedMLP (hidden 24 -> 128) after every mixer, with norm2.
  for (int d_intermediate : {0, 24})
    for (const char* layer : {"Mamba1", "Mamba2"}) {
      ModelConfig cfg = ModelConfig::parse(
          std::string(
              R"({"d_model":16,"n_layer":2,"vocab_size":11,"pad_vocab_size_multiple":4,"d_intermediate":)") +
          std::to_string(d_intermediate) + R"(,"ssm_cfg":{"layer":")" + layer +
          R"(","d_state":4,"d_conv":3,"expand":2)" +
          (std::string(layer) == "Mamba2" ? R"(,"headdim":8,"chunk_size":4)" : "") + "}}");
      MambaLM lm(cfg, 1);
      Rng rng(5);
      for (auto& [n, p] : lm.named_parameters())
        for (int64_t i = 0; i < p->value.numel(); ++i)
          p->value.f32()[i] += 0.1f * (float)rng.normal();
      const int64_t B = 2, L = 7, V = lm.vocab();
      std::vector<int32_t> ids(B * L);
      for (auto& v : ids) v = (int32_t)rng.below(11);
      Tensor g({B, L, V});
      rng.fill_normal(g);
      auto loss = [&] {
        Tensor y = lm.forward(ids, B, L);
        double s = 0;
        for (int64_t i = 0; i < y.numel(); ++i) s += (double)y[i] * g[i];
        return s;
      };
      lm.zero_grad();
      LMSaved sv;
      lm.forward(ids, B, L, &sv);
      lm.backward(sv, g);
      for (auto& [name, p] : lm.named_parameters()) {
        for (int k = 0; k < 3; ++k) {
          int64_t i = (int64_t)rng.below((uint64_t)p->value.numel());
          float orig = p->value.f32()[i];
          const float eps = 1e-2f;
          p->value.f32()[i] = orig + eps;
          double lp = loss();
          float hi = p->value.f32()[i];
          p->value.f32()[i] = orig - eps;
          double lm_ = loss();
          float lo = p->value.f32()[i];
          p->value.f32()[i] = orig;
          double fd = (lp - lm_) / ((double)hi - lo);
          EXPECT_NEAR(p->grad()[i], fd,
                      tol::kLMFiniteDiff.atol + tol::kLMFiniteDiff.rtol * std::fabs(fd))
              << layer << " d_intermediate " << d_intermediate << " " << name << "[" << i << "]";
        }
      }
    }
}

// A transformers-format folder (MambaForCausalLM names and config keys) of the same weights
// loads to the same model: the golden checkpoint rewritten with HF names and an HF config.
TEST(LM, TransformersFolderLoadsToSameLogits) {
  auto dir = std::filesystem::temp_directory_path() / "mamba_lm_hf";
  std::filesystem::create_directories(dir);
  auto f = SafetensorsFile::open(test::golden_path("lm_mamba1_ckpt/model.safetensors"));
  std::vector<std::pair<std::string, Tensor>> hf;
  for (auto& n : f.names()) hf.emplace_back(mamba_ssm_to_hf_name(n), f.tensor(n));
  save_safetensors((dir / "model.safetensors").string(), hf, {{"format", "pt"}});
  std::string cfg = R"({"architectures":["MambaForCausalLM"],"model_type":"mamba","hidden_size":64,
    "num_hidden_layers":3,"vocab_size":104,"pad_vocab_size_multiple":8,"state_size":16,"conv_kernel":4,
    "expand":2,"time_step_rank":4,"use_bias":false,"use_conv_bias":true,"residual_in_fp32":true,
    "tie_word_embeddings":true,"layer_norm_epsilon":1e-5,"torch_dtype":"float32"})";
  os::write_file_atomic((dir / "config.json").string(), cfg.data(), cfg.size());
  MambaLM a = MambaLM::load(test::golden_path("lm_mamba1_ckpt"));
  MambaLM b = MambaLM::load(dir.string());
  std::vector<int32_t> ids = {3, 1, 4, 1, 5, 9, 2, 6};
  EXPECT_TRUE(test::all_close(b.forward(ids, 2, 4), a.forward(ids, 2, 4), {0, 0},
                              "hf vs mamba_ssm folder"));
  std::filesystem::remove_all(dir);
}

// Decode memory is constant per token: RSS after 5000 steps is that after 100 (no growth
// beyond allocator noise), because the state (conv + ssm per layer) has a fixed size.
TEST(LM, DecodeMemoryDoesNotGrowWithTokens) {
  if (os::current_rss_bytes() == 0) GTEST_SKIP() << "RSS is not measurable on this platform";
#if defined(MAMBA_TEST_ASAN)
  // AddressSanitizer keeps freed blocks in a quarantine (256 MiB by default) instead of
  // reusing them, so RSS grows with every temporary until the quarantine is full.
  GTEST_SKIP() << "RSS is meaningless under AddressSanitizer's quarantine (run the Release build)";
#endif
  MambaLM lm = MambaLM::load(test::golden_path("lm_mamba2_ckpt"));
  LMState st = lm.new_state(1);
  std::vector<int32_t> tok = {7};
  auto run = [&](int n) {
    for (int i = 0; i < n; ++i) {
      Tensor l = lm.step(tok, st);
      tok[0] = (int32_t)(std::max_element(l.data(), l.data() + 101) - l.data());
    }
  };
  run(100);
  const uint64_t after100 = os::current_rss_bytes();
  run(4900);
  const uint64_t after5000 = os::current_rss_bytes();
  std::printf("RSS after 100 tokens: %.2f MiB, after 5000: %.2f MiB\n", after100 / 1048576.0,
              after5000 / 1048576.0);
  EXPECT_LT(after5000, after100 + 512 * 1024) << "decode memory grew with the number of tokens";
}

// Writing a transformers-layout folder: our HF reader (built from transformers' config keys)
// loads it to the same logits, for both mixers; the names are transformers'.
TEST(LM, SavesTransformersLayoutThatLoadsBack) {
  for (const char* name : {"lm_mamba1_ckpt", "lm_mamba2_ckpt"}) {
    MambaLM lm = MambaLM::load(test::golden_path(name));
    auto dir = std::filesystem::temp_directory_path() / (std::string("mamba_lm_hf_out_") + name);
    lm.save(dir.string(), /*hf=*/true);
    auto f = SafetensorsFile::open((dir / "model.safetensors").string());
    EXPECT_TRUE(f.has("backbone.embeddings.weight"));
    EXPECT_FALSE(f.has("backbone.embedding.weight"));
    MambaLM back = MambaLM::load(dir.string());
    EXPECT_EQ(back.config().source_format, "hf");
    EXPECT_EQ(back.vocab(), lm.vocab());
    std::vector<int32_t> ids = {3, 1, 4, 1, 5, 9, 2, 6};
    EXPECT_TRUE(test::all_close(back.forward(ids, 2, 4), lm.forward(ids, 2, 4), {0, 0}, name));
    std::filesystem::remove_all(dir);
  }
}

// count_parameters (from the config alone) equals what the constructor allocates, for every
// option that adds or resizes a parameter: the memory check before allocation relies on it.
TEST(LM, CountParametersFromConfigMatchesTheModel) {
  const char* mixers[] = {
      R"("layer":"Mamba1","d_state":4,"d_conv":3,"expand":2)",
      R"("layer":"Mamba1","d_state":5,"d_conv":4,"expand":3,"dt_rank":3,"bias":true,"conv_bias":false)",
      R"("layer":"Mamba2","d_state":4,"d_conv":3,"expand":2,"headdim":8,"ngroups":2)",
      R"("layer":"Mamba2","d_state":8,"d_conv":4,"expand":2,"headdim":4,"d_ssm":16,"bias":true,"rmsnorm":false,"D_has_hdim":true)",
      R"("layer":"Mamba3","d_state":8,"expand":2,"headdim":8,"ngroups":2)",
      R"("layer":"Mamba3","d_state":8,"expand":2,"headdim":8,"is_mimo":true,"mimo_rank":2,"rope_fraction":1.0,"is_outproj_norm":true)",
  };
  for (const char* m : mixers)
    for (int d_intermediate : {0, 40})
      for (bool tie : {true, false}) {
        const std::string json =
            std::string(
                R"({"d_model":16,"n_layer":2,"vocab_size":11,"pad_vocab_size_multiple":4,)") +
            R"("tie_embeddings":)" + (tie ? "true" : "false") + R"(,"d_intermediate":)" +
            std::to_string(d_intermediate) + R"(,"ssm_cfg":{)" + m + "}}";
        ModelConfig cfg = ModelConfig::parse(json);
        MambaLM lm(cfg, 1);
        EXPECT_EQ(MambaLM::count_parameters(cfg), lm.num_parameters()) << json;
      }
  // Hybrids: attention layers (with and without the qkv conv, biases and fused MLP columns).
  const char* attn[] = {
      R"("attn_layer_idx":[1],"attn_cfg":{"num_heads":4,"num_heads_kv":2,"head_dim":8,"rotary_emb_dim":4})",
      R"("attn_layer_idx":[0,2],"attn_cfg":{"num_heads":2,"d_conv":3,"mlp_dim":40,"qkv_proj_bias":false,"out_proj_bias":false})",
  };
  for (const char* a : attn) {
    const std::string json =
        std::string(R"({"d_model":16,"n_layer":3,"vocab_size":11,"d_intermediate":24,)") + a +
        R"(,"ssm_cfg":{"layer":"Mamba2","d_state":4,"headdim":8}})";
    ModelConfig cfg = ModelConfig::parse(json);
    EXPECT_EQ(MambaLM::count_parameters(cfg), MambaLM(cfg, 1).num_parameters()) << json;
  }
  // The non-selective ablation (B and C as parameters instead of x_proj / dt_proj).
  ModelConfig cfg = ModelConfig::parse(
      R"({"d_model":16,"n_layer":1,"vocab_size":8,"ssm_cfg":{"d_state":4,"selective":false}})");
  EXPECT_EQ(MambaLM::count_parameters(cfg), MambaLM(cfg, 1).num_parameters());
}

// Issue 18, item 3: a model that cannot fit is refused before anything is allocated (it used to
// spend half a minute initialising the embedding before running out of memory).
TEST(LM, ModelTooLargeForMemoryFailsAtOnce) {
  ModelConfig cfg = ModelConfig::parse(R"({"d_model":65536,"n_layer":64,"vocab_size":50277})");
  // (Without the check this would allocate and initialise a 13 GB embedding first.)
  test::expect_error([&] { MambaLM lm(cfg, 0); },
                     {"d_model 65536, n_layer 64", "parameters", "needs", "bytes", "available"});
  test::expect_error([&] { MambaLM lm(cfg, 0, WeightDType::bf16); }, {"needs", "available"});
}

// Issue 18 item 3, batches: a batch whose activations cannot fit is refused before the forward
// starts (the logits alone of 2^24 tokens x 65536 ids are 4 PiB here), naming the bytes.
TEST(LM, BatchTooLargeForMemoryFailsAtOnce) {
  ModelConfig cfg = ModelConfig::parse(
      R"({"d_model":16,"n_layer":1,"vocab_size":65536,"ssm_cfg":{"d_state":4,"expand":2}})");
  MambaLM lm(cfg, 1);
  const int64_t L = int64_t{1} << 24;
  std::vector<int32_t> ids(static_cast<size_t>(L), 1);
  EXPECT_GE(lm.activation_bytes(1, L, true, false), double(L) * 65536 * 4);
  test::expect_error([&] { lm.forward(ids, 1, L); },
                     {"a batch of 1 x 16777216 tokens", "needs", "bytes", "available"});
  LMSaved sv;
  test::expect_error([&] { lm.forward(ids, 1, L, &sv); }, {"needs", "available"});
  // forward_last needs only the last position's logits: L - 1 rows of V_pad floats fewer.
  EXPECT_EQ(lm.activation_bytes(1, L, true, false) - lm.activation_bytes(1, L, false, false),
            double(L - 1) * 65536 * 4);
  // Saved activations (training) count every layer on top of the working set.
  EXPECT_GT(lm.activation_bytes(2, 8, true, true), lm.activation_bytes(2, 8, true, false));
}

// Issue 18 item 4 / issue 19 item 3: inference (forward, decode, generation, a loaded model)
// allocates no gradient; gradients come with training (the optimiser allocates them all at once,
// a backward pass allocates those it touches) and start at zero.
TEST(LM, InferenceHoldsNoGradientsTrainingAllocatesThem) {
  for (const char* layer : {"Mamba1", "Mamba2"}) {
    ModelConfig cfg = ModelConfig::parse(
        std::string(R"({"d_model":16,"n_layer":2,"vocab_size":11,"ssm_cfg":{"layer":")") + layer +
        R"(","d_state":4,"d_conv":3,"expand":2)" +
        (std::string(layer) == "Mamba2" ? R"(,"headdim":8,"chunk_size":4)" : "") + "}}");
    auto grad_bytes = [](MambaLM& lm) {
      int64_t n = 0, with = 0;
      for (auto& [name, p] : lm.named_parameters()) n += p->grad_bytes(), with += p->has_grad();
      return std::pair<int64_t, int64_t>{n, with};
    };
    MambaLM lm(cfg, 1);
    EXPECT_EQ(grad_bytes(lm), (std::pair<int64_t, int64_t>{0, 0})) << layer << " constructed";
    const std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6};
    lm.forward(ids, 2, 3);
    lm.forward_last(ids, 1, 6);
    GenerateOptions opt;
    opt.max_new_tokens = 5;
    generate(lm, {{1, 2, 3}, {4}}, opt);
    lm.zero_grad();  // nothing to zero: allocates nothing
    EXPECT_EQ(grad_bytes(lm), (std::pair<int64_t, int64_t>{0, 0})) << layer << " after inference";
    const auto dir = std::filesystem::temp_directory_path() /
                     ("mamba_test_lean_" + std::string(layer) + std::to_string(::getpid()));
    lm.save(dir.string());
    MambaLM loaded = MambaLM::load(dir.string());
    loaded.forward(ids, 1, 6);
    EXPECT_EQ(grad_bytes(loaded), (std::pair<int64_t, int64_t>{0, 0})) << layer << " loaded";
    std::filesystem::remove_all(dir);

    // A backward pass allocates the gradients it accumulates into, zeroed first: one backward
    // gives the same gradients whether they existed before or not.
    LMSaved sv;
    Tensor y = lm.forward(ids, 2, 3, &sv);
    Tensor g = Tensor::full(y.shape(), 0.5f);
    lm.backward(sv, g);
    const auto [bytes, with] = grad_bytes(lm);
    EXPECT_EQ(bytes, 4 * lm.num_parameters()) << layer;  // every parameter gets a gradient
    std::vector<Tensor> first;
    for (auto& [name, p] : lm.named_parameters()) first.push_back(p->grad().clone());
    lm.zero_grad();
    lm.forward(ids, 2, 3, &sv);
    lm.backward(sv, g);
    size_t i = 0;
    for (auto& [name, p] : lm.named_parameters())
      EXPECT_EQ(test::max_abs_diff(p->grad(), first[i++]), 0.0) << layer << " " << name;

    // The optimiser allocates every gradient up front (training: checked against the memory).
    MambaLM fresh(cfg, 1);
    train::AdamW adam(fresh.named_parameters(), train::AdamWConfig{});
    EXPECT_EQ(grad_bytes(fresh).first, 4 * fresh.num_parameters()) << layer;
    EXPECT_EQ(grad_bytes(fresh).second, static_cast<int64_t>(fresh.named_parameters().size()));

    // 16-bit weights: no gradient to allocate, and asking for one says why.
    MambaLM half(cfg, 1, WeightDType::bf16);
    test::expect_error([&] { half.named_parameters().front().second->grad(); },
                       {"backbone.embedding.weight", "bf16", "inference only"});
  }
}

// bench --profile's op timing (trace.h): every traced op of the prefill and of a decode step is
// charged once per call under its name with the layer index as "*", nothing is printed, the
// charged time is within the wall time, and a taken table is cleared; off, nothing is recorded.
TEST(LM, OpProfileChargesEveryTracedOpOnce) {
  for (const char* layer : {"Mamba1", "Mamba2"}) {
    SCOPED_TRACE(layer);
    ModelConfig cfg = ModelConfig::parse(
        std::string(R"({"d_model":16,"n_layer":3,"vocab_size":11,"ssm_cfg":{"layer":")") + layer +
        R"(","d_state":4,"d_conv":3,"expand":2)" +
        (std::string(layer) == "Mamba2" ? R"(,"headdim":8,"chunk_size":4)" : "") + "}}");
    MambaLM lm(cfg, 1);
    const std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6, 7};
    std::ostringstream printed;
    trace::set_stream(&printed);
    trace::set_profile(true);
    LMState st = lm.new_state(1);
    const auto t0 = std::chrono::steady_clock::now();
    trace::profile_mark();
    lm.prefill(ids, 1, 7, st, 0);
    const double wall =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::vector<trace::ProfileEntry> pre = trace::profile_take();
    EXPECT_TRUE(trace::profile_take().empty());  // taken: cleared
    trace::profile_mark();
    const int32_t tok = 3;
    lm.step(std::span<const int32_t>(&tok, 1), st);
    lm.step(std::span<const int32_t>(&tok, 1), st);
    std::vector<trace::ProfileEntry> dec = trace::profile_take();
    trace::set_profile(false);
    lm.step(std::span<const int32_t>(&tok, 1), st);
    EXPECT_TRUE(trace::profile_take().empty());  // off: nothing recorded
    trace::set_stream(nullptr);
    EXPECT_EQ(printed.str(), "");  // profiling prints nothing

    auto find = [](const std::vector<trace::ProfileEntry>& rows, const std::string& op) {
      for (const auto& r : rows)
        if (r.op == op) return r;
      ADD_FAILURE() << "no profile row " << op;
      return trace::ProfileEntry{};
    };
    double sum = 0;
    for (const auto& r : pre) {
      EXPECT_GE(r.seconds, 0.0) << r.op;
      EXPECT_EQ(r.op.find("layers.0"), std::string::npos) << r.op;  // indices folded to "*"
      sum += r.seconds;
    }
    EXPECT_LE(sum, wall);
    EXPECT_EQ(find(pre, "embedding").calls, 1);
    EXPECT_EQ(find(pre, "layers.*.add+norm").calls, 3);
    EXPECT_EQ(find(pre, "layers.*.mixer.in_proj").calls, 3);
    EXPECT_EQ(find(pre, "layers.*.mixer.out_proj").calls, 3);
    EXPECT_EQ(find(pre, "lm_head").calls, 1);
    EXPECT_EQ(find(dec, "embedding").calls, 2);
    // a single sequence's step fuses in_proj with the conv update ("in_proj+conv1d_update...")
    int64_t in_proj_calls = 0;
    for (const auto& r : dec)
      if (r.op.rfind("layers.*.mixer.in_proj", 0) == 0) in_proj_calls += r.calls;
    EXPECT_EQ(in_proj_calls, 6);
    EXPECT_EQ(find(dec, "layers.*.mixer.out_proj").calls, 6);
    EXPECT_EQ(find(dec, "add+norm_f").calls, 2);
    EXPECT_EQ(find(dec, "lm_head").calls, 2);
  }
}
