// GGUF files written by llama.cpp (tests/data/llamacpp, README there): tiny trained Mamba-1 /
// Mamba-2 models quantised by llama-quantize into F32, F16, BF16, Q8_0, Q4_0, Q4_K_M (d_model 64:
// Q5_0 / Q8_0 / F16 tensors) and a d_model 256 Mamba-1 in Q4_K_M / Q6_K (Q4_K / Q6_K tensors),
// with the greedy ids and the logits llama.cpp itself produced for a fixed prompt. We load each
// file, generate greedily and compare ids and the logits that chose them against llama.cpp's.
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "mamba/generate.h"
#include "mamba/gguf.h"
#include "mamba/lm.h"
#include "model/npy.h"
#include "test_util.h"

namespace mamba {
namespace {

nlohmann::json reference() {
  std::ifstream f(test::data_path("llamacpp/reference.json"));
  return nlohmann::json::parse(f);
}

tol::Tol tolerance_of(const std::string& type) {
  if (type == "F32") return tol::kLlamaCppF32;
  if (type == "F16") return tol::kLlamaCppF16;
  if (type == "BF16") return tol::kLlamaCppBF16;
  return tol::kLlamaCppQuant;  // Q8_0, Q4_0, Q4_K_M, Q6_K files
}

// Our greedy ids for the prompt and the logits each was chosen from, against llama.cpp's.
void expect_like_llamacpp(const std::string& model, const std::string& type, WeightDType dtype) {
  const nlohmann::json ref = reference();
  const std::string stem = test::data_path("llamacpp/" + model + "." + type);
  const std::vector<int32_t> prompt = ref["prompt_ids"].get<std::vector<int32_t>>();
  const std::vector<int32_t> want = ref["models"][model][type]["ids"].get<std::vector<int32_t>>();
  const Tensor theirs = npy_to_tensor(read_npy(stem + ".logits.npy"), stem + ".logits.npy");
  MambaLM lm = MambaLM::load_gguf(stem + ".gguf", dtype);
  GenerateOptions opt;
  opt.sampling.greedy = true;
  opt.max_new_tokens = ref["n_new"].get<int64_t>();
  opt.keep_scores = true;
  const GenerateResult r = generate(lm, {prompt}, opt);
  const std::string what = model + "." + type + " as " + weight_dtype_name(dtype);
  EXPECT_EQ(r.tokens[0], want) << what << ": greedy ids differ from llama.cpp's";
  ASSERT_EQ(theirs.dim(0), static_cast<int64_t>(r.scores[0].size())) << what;
  const int64_t V = theirs.dim(1);
  Tensor ours({theirs.dim(0), V});
  for (int64_t s = 0; s < theirs.dim(0); ++s) {
    ASSERT_GE(static_cast<int64_t>(r.scores[0][s].size()), V) << what;
    std::copy_n(r.scores[0][s].begin(), V, ours.data() + s * V);
  }
  EXPECT_TRUE(test::close_report(ours, theirs, tolerance_of(type), what + " logits"));
}

struct Case {
  std::string model, type;
};

class LlamaCppFixture : public ::testing::TestWithParam<Case> {};

TEST_P(LlamaCppFixture, GreedyIdsAndLogitsAsLlamaCpp) {
  const Case& c = GetParam();
  expect_like_llamacpp(c.model, c.type, WeightDType::f32);
  // Q8_0 / Q4_0 files also through our quantised weights (the blocks kept as they are).
  if (c.type == "Q8_0") expect_like_llamacpp(c.model, c.type, WeightDType::q8_0);
  // Q4_0 / Q4_K_M / Q6_K files (Q8_0, Q6_K, Q5_0, Q4_K, F16 tensors beside the Q4_0 ones) with
  // --dtype q4_0: tensors of another type keep it or become q8_0, never requantised to q4_0.
  if (c.type == "Q4_0" || c.type == "Q4_K_M" || c.type == "Q6_K")
    expect_like_llamacpp(c.model, c.type, WeightDType::q4_0);
}

std::vector<Case> cases() {
  std::vector<Case> v;
  for (const char* m : {"m1", "m2"})
    for (const char* t : {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M"}) v.push_back({m, t});
  v.push_back({"k1", "Q4_K_M"});
  v.push_back({"k1", "Q6_K"});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Files, LlamaCppFixture, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) {
                           return i.param.model + "_" + i.param.type;
                         });

// The tensor types llama-quantize chose are the ones the fixture is meant to cover.
TEST(LlamaCppFixture, FilesHoldTheExpectedTensorTypes) {
  auto types_of = [](const std::string& file) {
    GGUFFile f = GGUFFile::open(test::data_path("llamacpp/" + file));
    std::set<std::string> s;
    for (const auto& n : f.names()) s.insert(ggml_type_name(f.info(n).type));
    return s;
  };
  EXPECT_EQ(types_of("m1.Q4_K_M.gguf"), (std::set<std::string>{"F32", "F16", "Q5_0", "Q8_0"}));
  EXPECT_EQ(types_of("m1.Q4_0.gguf"), (std::set<std::string>{"F32", "F16", "Q4_0", "Q8_0"}));
  EXPECT_EQ(types_of("k1.Q4_K_M.gguf"), (std::set<std::string>{"F32", "F16", "Q4_K", "Q6_K"}));
  EXPECT_EQ(types_of("k1.Q6_K.gguf"), (std::set<std::string>{"F32", "F16", "Q6_K"}));
}

}  // namespace

// With 8-bit activations (--activations q8, ops/gemm_q8.h) our Mamba-2 Q8_0 / Q4_0 logits are
// llama.cpp's up to fp32 sum order: one forward over the prompt and the greedy continuation (every
// product through the 8-bit prefill GEMM: 40 rows), and generate() (prefill, then 1-row decode
// steps on the 8-bit streaming kernel), against the 16 logits llama.cpp chose its ids from (its
// prompt's last position and 15 decode steps, all with q8_0 activations). With fp32
// activations the same comparison fails (kLlamaCppQuant is what covers those). Mamba-1's files are
// left out: their F16 dt_proj, for which llama.cpp rounds the activations to f16 and we do not.
TEST(LlamaCppFixture, EightBitActivationsGiveLlamaCppsQuantisedLogits) {
  const nlohmann::json ref = reference();
  const std::vector<int32_t> prompt = ref["prompt_ids"].get<std::vector<int32_t>>();
  const int64_t P = static_cast<int64_t>(prompt.size());
  for (const auto& [type, dtype] : {std::pair{std::string("Q8_0"), WeightDType::q8_0},
                                    {std::string("Q4_0"), WeightDType::q4_0}}) {
    const std::string stem = test::data_path("llamacpp/m2." + type);
    const std::vector<int32_t> want = ref["models"]["m2"][type]["ids"].get<std::vector<int32_t>>();
    const Tensor theirs = npy_to_tensor(read_npy(stem + ".logits.npy"), stem + ".logits.npy");
    std::vector<int32_t> ids = prompt;
    ids.insert(ids.end(), want.begin(), want.end() - 1);
    const int64_t L = static_cast<int64_t>(ids.size()), n = theirs.dim(0), V = theirs.dim(1);
    ASSERT_EQ(L, P + n - 1);
    MambaLM lm = MambaLM::load_gguf(stem + ".gguf", dtype);
    auto logits_at_new = [&] {
      const Tensor all = lm.forward(ids, 1, L);  // (1, L, V_pad)
      Tensor o({n, V});
      for (int64_t s = 0; s < n; ++s)
        std::copy_n(all.data() + (P - 1 + s) * all.dim(2), V, o.data() + s * V);
      return o;
    };
    const Tensor f32act = logits_at_new();
    set_activation_type(ActivationType::q8);
    const Tensor q8act = logits_at_new();
    set_activation_type(ActivationType::f32);
    const std::string what = "m2." + type + " --activations q8";
    EXPECT_TRUE(test::close_report(q8act, theirs, tol::kLlamaCppQ8Act, what));
    EXPECT_FALSE(test::all_close(f32act, theirs, tol::kLlamaCppQ8Act)) << what;
    // The same through generate(): the prompt's prefill (25 rows) and 15 decode steps (1 row: the
    // streaming kernel), greedy, as llama.cpp ran it.
    set_activation_type(ActivationType::q8);
    GenerateOptions opt;
    opt.sampling.greedy = true;
    opt.max_new_tokens = n;
    opt.keep_scores = true;
    const GenerateResult r = generate(lm, {prompt}, opt);
    set_activation_type(ActivationType::f32);
    EXPECT_EQ(r.tokens[0], want) << what;
    ASSERT_EQ(static_cast<int64_t>(r.scores[0].size()), n) << what;
    Tensor gen({n, V});
    for (int64_t s = 0; s < n; ++s) std::copy_n(r.scores[0][s].begin(), V, gen.data() + s * V);
    EXPECT_TRUE(test::close_report(gen, theirs, tol::kLlamaCppQ8Act, what + " generate"));
  }
}

}  // namespace mamba
