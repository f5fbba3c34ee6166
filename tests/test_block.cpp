// The Block / mixer registry and the embeddable model API:
//  - the mixer kind is parsed once from ssm_cfg "layer" into the config variant, the Block holds
//  the
//    matching mixer, and its state / saved activations are of the same kind;
//  - a Block's forward equals add -> rms_norm -> mixer written out by hand, and its step equals the
//    forward token by token;
//  - one const MambaLM shared by several threads, each with its own state, gives bit-identical
//    logits and decodes to a single-threaded run (the "share a const model, one state per thread"
//    contract of include/mamba/lm.h);
//  - LMSaved is a value: backward from it, reuse it, and the errors for an empty one.
#include <cstring>
#include <filesystem>
#include <map>
#include <thread>

#include "mamba/generate.h"
#include "mamba/lm.h"
#include "mamba/rng.h"
#include "ops/norm.h"
#include "test_util.h"

using namespace mamba;

namespace {

ModelConfig tiny(const std::string& layer, int64_t n_layer = 2) {
  const std::string m2 = layer == "Mamba2" ? R"(, "headdim": 16, "chunk_size": 8)" : "";
  return ModelConfig::parse(
      str(R"({"d_model": 32, "n_layer": )", n_layer,
          R"(, "vocab_size": 50, "pad_vocab_size_multiple": 8, "ssm_cfg": {"layer": ")", layer,
          R"(", "d_state": 8)", m2, "}}"));
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && std::memcmp(a.data(), b.data(), sizeof(float) * a.numel()) == 0;
}

std::vector<int32_t> random_ids(int64_t n, int64_t V, uint64_t seed) {
  Rng rng(seed);
  std::vector<int32_t> ids(n);
  for (auto& t : ids) t = static_cast<int32_t>(rng.below(static_cast<uint64_t>(V)));
  return ids;
}

}  // namespace

class BlockKinds : public ::testing::TestWithParam<const char*> {};

TEST_P(BlockKinds, KindIsParsedOnceAndCarriedByStateAndSaved) {
  const std::string layer = GetParam();
  ModelConfig cfg = tiny(layer);
  EXPECT_EQ(mixer_name(cfg.ssm_cfg), layer);
  MambaLM lm(cfg, 3);
  ASSERT_EQ(lm.blocks().size(), 2u);
  for (const Block& b : lm.blocks()) {
    EXPECT_EQ(b.mixer_name(), layer);
    EXPECT_EQ(b.mixer().index(), cfg.ssm_cfg.index());
  }
  LMState st = lm.new_state(2);
  for (const BlockState& s : st.layers) EXPECT_EQ(s.index(), cfg.ssm_cfg.index());
  LMSaved sv;
  std::vector<int32_t> ids = random_ids(2 * 5, 50, 1);
  lm.forward(ids, 2, 5, &sv);
  ASSERT_EQ(sv.blocks.size(), 2u);
  for (const BlockSaved& s : sv.blocks) EXPECT_EQ(s.mixer.index(), cfg.ssm_cfg.index());
  // Parameter names are mamba_ssm's, norm and mixer under each layer.
  auto np = lm.named_parameters();
  auto has = [&](const std::string& n) {
    return std::any_of(np.begin(), np.end(), [&](const auto& p) { return p.first == n; });
  };
  EXPECT_TRUE(has("backbone.layers.1.norm.weight"));
  EXPECT_TRUE(has("backbone.layers.1.mixer.in_proj.weight"));
  EXPECT_TRUE(has("backbone.layers.0.mixer.A_log"));
}

TEST_P(BlockKinds, ForwardIsAddNormMixerAndStepMatchesIt) {
  const std::string layer = GetParam();
  ModelConfig cfg = tiny(layer, 1);
  Block block(cfg.mixer(), cfg.d_model, cfg.norm_epsilon, 11);
  Rng rng(5);
  const int64_t B = 2, L = 6, d = cfg.d_model;
  Tensor h = test::randn({B, L, d}, rng), r0 = test::randn({B, L, d}, rng);
  // By hand: residual = h + r0; y = mixer(rms_norm(residual) * w).
  Tensor res_hand = r0.clone();
  for (int64_t i = 0; i < res_hand.numel(); ++i) res_hand[i] += h[i];
  Tensor normed = ops::rms_norm_fwd(res_hand, block.norm_params().get("norm.weight").value.f32(),
                                    static_cast<float>(cfg.norm_epsilon));
  Tensor y_hand = std::visit([&](auto& m) { return m.forward(normed); }, block.mixer());
  Tensor residual = r0.clone();
  Tensor y = block.forward(h, residual);
  EXPECT_TRUE(same_bits(residual, res_hand));
  EXPECT_TRUE(same_bits(y, y_hand));
  // Step, token by token, from a zero state.
  BlockState st = block.new_state(B);
  for (int64_t t = 0; t < L; ++t) {
    Tensor ht({B, d}), rt({B, d});
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < d; ++j)
        ht[b * d + j] = h[(b * L + t) * d + j], rt[b * d + j] = r0[(b * L + t) * d + j];
    Tensor yt = block.step(ht, rt, st);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < d; ++j)
        EXPECT_NEAR(yt[b * d + j], y[(b * L + t) * d + j], 1e-4) << layer << " t=" << t;
  }
  // A state of another mixer kind is refused.
  BlockState other = std::visit(
      [&](const auto& m) -> BlockState {
        if constexpr (std::is_same_v<std::decay_t<decltype(m)>, Mamba1>)
          return Mamba2State{};
        else
          return Mamba1State{};
      },
      block.mixer());
  Tensor h1({B, d}), r1;
  test::expect_error([&] { block.step(h1, r1, other); }, {"Block::step", "state"});
}

TEST_P(BlockKinds, ConstModelSharedByThreadsGivesIdenticalResults) {
  const std::string layer = GetParam();
  const MambaLM lm(tiny(layer), 7);  // const: only const methods are reachable
  const int64_t B = 2, L = 12;
  const int kThreads = 4, kSteps = 6;
  // Per thread: its own prompt; the single-threaded reference first.
  struct Result {
    Tensor logits, last;
    std::vector<Tensor> steps;
  };
  auto run = [&](int k) {
    Result r;
    std::vector<int32_t> ids = random_ids(B * L, 50, 100 + k);
    LMState st;
    r.logits = lm.forward(ids, B, L, nullptr, &st);
    r.last = lm.forward_last(ids, B, L);
    std::vector<int32_t> next = {static_cast<int32_t>(k), static_cast<int32_t>(k + 1)};
    for (int s = 0; s < kSteps; ++s) {
      r.steps.push_back(lm.step(next, st));
      next = {static_cast<int32_t>((next[0] * 7 + 3) % 50),
              static_cast<int32_t>((next[1] * 5 + 1) % 50)};
    }
    return r;
  };
  std::vector<Result> ref;
  for (int k = 0; k < kThreads; ++k) ref.push_back(run(k));
  for (int rep = 0; rep < 2; ++rep) {
    std::vector<Result> got(kThreads);
    std::vector<std::thread> th;
    for (int k = 0; k < kThreads; ++k) th.emplace_back([&, k] { got[k] = run(k); });
    for (auto& t : th) t.join();
    for (int k = 0; k < kThreads; ++k) {
      EXPECT_TRUE(same_bits(got[k].logits, ref[k].logits)) << "thread " << k;
      EXPECT_TRUE(same_bits(got[k].last, ref[k].last)) << "thread " << k;
      for (int s = 0; s < kSteps; ++s)
        EXPECT_TRUE(same_bits(got[k].steps[s], ref[k].steps[s])) << "thread " << k;
    }
  }
  // generate() from several threads at once: the same tokens as alone.
  GenerateOptions opt;
  opt.max_new_tokens = 5;
  opt.sampling.greedy = true;
  const std::vector<std::vector<int32_t>> prompts = {random_ids(7, 50, 1), random_ids(3, 50, 2)};
  const GenerateResult alone = generate(lm, prompts, opt);
  std::vector<GenerateResult> res(kThreads);
  std::vector<std::thread> th;
  for (int k = 0; k < kThreads; ++k)
    th.emplace_back([&, k] { res[k] = generate(lm, prompts, opt); });
  for (auto& t : th) t.join();
  for (int k = 0; k < kThreads; ++k) EXPECT_EQ(res[k].tokens, alone.tokens) << "thread " << k;
}

TEST_P(BlockKinds, SavedActivationsAreAValue) {
  const std::string layer = GetParam();
  MambaLM lm(tiny(layer), 2);
  const int64_t B = 2, L = 5;
  std::vector<int32_t> ids = random_ids(B * L, 50, 9);
  LMSaved sv;
  test::expect_error(
      [&] {
        lm.backward(sv, Tensor({B, L, lm.vocab()}));
      },
      {"no saved activations"});
  Tensor logits = lm.forward(ids, B, L, &sv);
  Rng rng(4);
  Tensor g = test::randn(logits.shape(), rng);
  lm.zero_grad();
  lm.backward(sv, g);
  std::vector<Tensor> g1;
  for (auto& [n, p] : lm.named_parameters()) g1.push_back(p->grad().clone());
  // The same saved activations again: the same gradients, bit for bit.
  lm.zero_grad();
  lm.backward(sv, g);
  size_t i = 0;
  for (auto& [n, p] : lm.named_parameters()) EXPECT_TRUE(same_bits(p->grad(), g1[i++])) << n;
  // A moved-from LMSaved is empty; the moved-to one still works.
  LMSaved moved = std::move(sv);
  lm.backward(moved, g);
  test::expect_error([&] { lm.backward(LMSaved{}, g); }, {"no saved activations"});
  test::expect_error([&] { lm.backward(moved, Tensor({B, L + 1, lm.vocab()})); }, {"dlogits"});
}

INSTANTIATE_TEST_SUITE_P(Mixers, BlockKinds, ::testing::Values("Mamba1", "Mamba2"));

TEST(Block, UnknownMixerIsAnError) {
  test::expect_error(
      [] { ModelConfig::parse(R"({"d_model": 32, "ssm_cfg": {"layer": "Mamba9"}})"); },
      {"'ssm_cfg.layer'", "Mamba9", "\"Mamba1\", \"Mamba2\""});
}

// d_intermediate > 0: every Block gets norm2 and a GatedMLP after its mixer (mamba_ssm's
// create_block with an MLP). Names and shapes as mamba_ssm's state_dict, the count, prefill +
// steps == the full forward, and a save/load round trip with the same logits bit for bit.
TEST_P(BlockKinds, MlpAfterTheMixer) {
  const std::string layer = GetParam();
  const std::string m2 = layer == "Mamba2" ? R"(, "headdim": 16, "chunk_size": 8)" : "";
  ModelConfig cfg = ModelConfig::parse(
      str(R"({"d_model": 32, "n_layer": 2, "d_intermediate": 40, "vocab_size": 50, )",
          R"("pad_vocab_size_multiple": 8, "ssm_cfg": {"layer": ")", layer, R"(", "d_state": 8)",
          m2, "}}"));
  MambaLM lm(cfg, 5);
  MambaLM plain(tiny(layer), 5);
  std::map<std::string, Shape> shapes;
  for (auto& [n, p] : lm.named_parameters()) shapes[n] = p->value.shape();
  // hidden 40 rounds up to 128 (multiple_of 128)
  EXPECT_EQ(shapes.at("backbone.layers.1.norm2.weight"), (Shape{32}));
  EXPECT_EQ(shapes.at("backbone.layers.1.mlp.fc1.weight"), (Shape{256, 32}));
  EXPECT_EQ(shapes.at("backbone.layers.0.mlp.fc2.weight"), (Shape{32, 128}));
  EXPECT_EQ(lm.num_parameters(), plain.num_parameters() + 2 * (32 + 256 * 32 + 32 * 128));
  // The mixers are initialised as without the MLP (the MLP draws from its own stream).
  auto pn = plain.named_parameters();
  for (auto& [n, p] : pn)
    if (n.find(".mixer.") != std::string::npos) {
      const Tensor& a = p->value.f32();
      for (auto& [n2, p2] : lm.named_parameters())
        if (n2 == n) {
          EXPECT_TRUE(same_bits(a, p2->value.f32())) << n;
        }
    }
  const int64_t B = 2, L = 9, V = lm.vocab();
  std::vector<int32_t> ids = random_ids(B * L, 50, 3);
  Tensor full = lm.forward(ids, B, L);
  // Prefill the first 5 tokens, then step.
  std::vector<int32_t> pre;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < 5; ++t) pre.push_back(ids[b * L + t]);
  LMState st;
  Tensor lp = lm.forward(pre, B, 5, nullptr, &st);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < 5; ++t)
      for (int64_t v = 0; v < V; ++v)
        EXPECT_NEAR(lp[(b * 5 + t) * V + v], full[(b * L + t) * V + v], 1e-4);
  for (int64_t t = 5; t < L; ++t) {
    std::vector<int32_t> tok = {ids[t], ids[L + t]};
    Tensor lt = lm.step(tok, st);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t v = 0; v < V; ++v)
        EXPECT_NEAR(lt[b * V + v], full[(b * L + t) * V + v], 1e-4) << layer << " t=" << t;
  }
  // Save (mamba_ssm's config.json carries d_intermediate) and load back: the same logits.
  const std::string dir =
      (std::filesystem::temp_directory_path() / str("mambacpp_mlp_", layer)).string();
  lm.save(dir);
  MambaLM back = MambaLM::load(dir);
  EXPECT_EQ(back.config().d_intermediate, 40);
  EXPECT_TRUE(same_bits(back.forward(ids, B, L), full));
  std::filesystem::remove_all(dir);
  // transformers' config classes have no MLP: saving in that layout is refused, not lossy.
  test::expect_error([&] { lm.save(dir + "_hf", true); }, {"MLPs"});
}
