// The mambacpp executable, run as a user would: --help everywhere, shapes, score and
// generate against the golden LM, and clear errors with a non-zero exit status.
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "mamba/lm.h"
#include "mamba/tokenizer.h"
#include "model/npy.h"
#include "test_util.h"

using namespace mamba;

namespace {
using test::CliRun;
CliRun run(const std::string& args) { return test::run_cli(args); }
std::string tmp(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("mamba_cli_" + name)).string();
}
}  // namespace

TEST(Cli, HelpOnEveryCommand) {
  CliRun r = run("--help");
  ASSERT_EQ(r.status, 0) << r.out;
  for (const char* c : {"demo", "info", "shapes", "generate", "score", "perplexity", "bench",
                        "tokenize", "detokenize", "convert", "train", "eval-task"}) {
    EXPECT_NE(r.out.find(c), std::string::npos) << c << " missing from --help";
    CliRun h = run(std::string(c) + " --help");
    EXPECT_EQ(h.status, 0) << c << ": " << h.out;
    EXPECT_NE(h.out.find("Usage"), std::string::npos) << c;
  }
}

TEST(Cli, ShapesTracesEveryOpAndCountsParameters) {
  CliRun r = run("shapes --d_model 16 --d_state 64 --batch 2 --seqlen 32");
  ASSERT_EQ(r.status, 0) << r.out;
  EXPECT_NE(r.out.find("7968 parameters"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("in_proj (2,32,16) -> (2,32,64)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("out_proj (2,32,32) -> (2,32,16)"), std::string::npos) << r.out;
  CliRun r2 = run("shapes --layer mamba2 --d_model 1024 --d_state 64 --batch 1 --seqlen 4");
  ASSERT_EQ(r2.status, 0) << r2.out;
  EXPECT_NE(r2.out.find("6468320 parameters"), std::string::npos) << r2.out;
  // Vim's bidirectional Mamba: both directions, no decode step.
  CliRun r3 = run("shapes --layer bimamba --d_model 16 --batch 2 --seqlen 32");
  ASSERT_EQ(r3.status, 0) << r3.out;
  EXPECT_NE(r3.out.find("5184 parameters"), std::string::npos) << r3.out;
  EXPECT_NE(r3.out.find("selective_scan_b (reverse)"), std::string::npos) << r3.out;
  EXPECT_NE(r3.out.find("no decode step"), std::string::npos) << r3.out;
  // Mamba-3: SISO (its in_proj width 2D + 2GN + 3H + S) and MIMO rank 2 (10032 = golden count).
  CliRun r4 = run("shapes --layer mamba3 --d_model 32 --d_state 16 --headdim 8 --seqlen 5");
  ASSERT_EQ(r4.status, 0) << r4.out;
  EXPECT_NE(r4.out.find("in_proj (2,5,32) -> (2,5,188)"), std::string::npos) << r4.out;
  EXPECT_NE(r4.out.find("step (one token of decode)"), std::string::npos) << r4.out;
  CliRun r5 =
      run("shapes --layer mamba3 --mimo --rank 2 --d_model 32 --d_state 16 --headdim 8 --seqlen 5");
  ASSERT_EQ(r5.status, 0) << r5.out;
  EXPECT_NE(r5.out.find("10032 parameters"), std::string::npos) << r5.out;
  EXPECT_NE(r5.out.find("mamba3_scan (MIMO)"), std::string::npos) << r5.out;
  CliRun bad = run("shapes --d_model 16 --d_conv 0");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.out.find("d_conv"), std::string::npos) << bad.out;
}

TEST(Cli, ScoreAndGenerateReproduceGoldenLM) {
  for (const char* name : {"lm_mamba1", "lm_mamba2"}) {
    auto f = SafetensorsFile::open(test::golden_path(std::string(name) + ".safetensors"));
    Shape s, gs;
    auto ids = f.tensor_i64("input_ids", &s);
    auto gen = f.tensor_i64("generated_ids", &gs);
    std::string ids_path = tmp("ids.npy"), out = tmp("logits.npy"), out_ids = tmp("gen.npy");
    write_npy_i64(ids_path, s, ids);
    std::string model = test::golden_path(std::string(name) + "_ckpt");
    CliRun r = run("score --model " + model + " --ids " + ids_path + " --out " + out);
    ASSERT_EQ(r.status, 0) << r.out;
    EXPECT_TRUE(test::all_close(npy_to_tensor(read_npy(out)), f.tensor("logits"),
                                tol::kGoldenLogits, "score"));
    CliRun g = run("generate --model " + model + " --ids " + ids_path +
                   " --greedy -n 8 --out-ids " + out_ids);
    ASSERT_EQ(g.status, 0) << g.out;
    EXPECT_NE(g.out.find("decode:"), std::string::npos) << g.out;  // the timing line
    NpyArray a = read_npy(out_ids);
    EXPECT_EQ(a.shape, gs);
    EXPECT_EQ(npy_to_i64(a), gen) << name;
    std::remove(ids_path.c_str()), std::remove(out.c_str()), std::remove(out_ids.c_str());
  }
}

TEST(Cli, ErrorsAreClearAndExitNonZero) {
  CliRun r = run("generate --model /nonexistent --prompt hi");
  EXPECT_EQ(r.status, 1);
  EXPECT_NE(r.out.find("error: model folder '/nonexistent' does not exist"), std::string::npos)
      << r.out;
  CliRun u = run("generate --unknown-flag");
  EXPECT_NE(u.status, 0);
  CliRun n = run("");
  EXPECT_NE(n.status, 0);
  std::string bad = tmp("bad_ids.npy");
  write_npy_i64(bad, {1, 3}, {1, 2, 999});
  CliRun v = run("score --model " + test::golden_path("lm_mamba1_ckpt") + " --ids " + bad +
                 " --out " + tmp("x.npy"));
  EXPECT_EQ(v.status, 1);
  EXPECT_NE(v.out.find("outside the vocabulary"), std::string::npos) << v.out;
  std::remove(bad.c_str());
}

// perplexity: with one window it must equal exp(mean NLL) of a full forward computed here;
// with overlapping windows every token after the first is still scored exactly once.
TEST(Cli, PerplexityMatchesInProcessNll) {
  ModelConfig cfg = ModelConfig::parse(
      R"({"d_model":32,"n_layer":2,"vocab_size":267,"ssm_cfg":{"layer":"Mamba1","d_state":8}})");
  MambaLM lm(cfg, 3);
  std::string dir = tmp("ppl_model");
  lm.save(dir);
  std::string tokp = test::data_path("tokenizer/tiny_bpe_tokenizer.json");
  std::string text = "the cat sat on the mat and the dog sat on the log. ";
  std::string textp = tmp("ppl.txt");
  os::write_file_atomic(textp, text.data(), text.size());
  Tokenizer tok = Tokenizer::from_file(tokp);
  std::vector<int32_t> ids = tok.encode(text);
  const int64_t n = (int64_t)ids.size(), V = lm.vocab();
  ASSERT_GT(n, 8);
  Tensor logits = lm.forward(ids, 1, n);
  double nll = 0;
  for (int64_t t = 1; t < n; ++t) {
    const float* l = logits.data() + (t - 1) * V;
    double mx = *std::max_element(l, l + V), s = 0;
    for (int64_t v = 0; v < V; ++v) s += std::exp(l[v] - mx);
    nll += std::log(s) + mx - l[ids[t]];
  }
  CliRun r = run("perplexity --model " + dir + " --tokenizer " + tokp + " --text " + textp +
                 " --context 4096");
  ASSERT_EQ(r.status, 0) << r.out;
  auto j = nlohmann::json::parse(r.out.substr(r.out.find('{')));
  EXPECT_EQ(j["tokens"].get<int64_t>(), n - 1);
  EXPECT_NEAR(j["nll_per_token"].get<double>(), nll / (n - 1), 1e-5);
  CliRun w = run("perplexity --model " + dir + " --tokenizer " + tokp + " --text " + textp +
                 " --context 8 --stride 3");
  ASSERT_EQ(w.status, 0) << w.out;
  auto jw = nlohmann::json::parse(w.out.substr(w.out.find('{')));
  EXPECT_EQ(jw["tokens"].get<int64_t>(), n - 1);
  EXPECT_TRUE(std::isfinite(jw["perplexity"].get<double>()));
  CliRun bad = run("perplexity --model " + dir + " --tokenizer " + tokp + " --text " + textp +
                   " --context 4 --stride 5");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.out.find("--stride"), std::string::npos) << bad.out;
  std::filesystem::remove_all(dir);
  std::remove(textp.c_str());
}

// convert: a torch .bin folder -> transformers layout -> back to mamba_ssm's: same logits.
TEST(Cli, ConvertRoundTripsLayouts) {
  std::string hf = tmp("conv_hf"), back = tmp("conv_back");
  CliRun a = run("convert --model " + test::golden_path("lm_mamba2_ckpt") + " --out " + hf +
                 " --format hf");
  ASSERT_EQ(a.status, 0) << a.out;
  CliRun b = run("convert --model " + hf + " --out " + back);
  ASSERT_EQ(b.status, 0) << b.out;
  MambaLM ref = MambaLM::load(test::golden_path("lm_mamba2_ckpt")), got = MambaLM::load(back);
  std::vector<int32_t> ids = {1, 2, 3, 50, 7};
  EXPECT_TRUE(test::all_close(got.forward(ids, 1, 5), ref.forward(ids, 1, 5), {0, 0},
                              "convert round trip"));
  CliRun bad = run("convert --model " + hf + " --out " + back + " --format onnx");
  EXPECT_NE(bad.status, 0);
  std::filesystem::remove_all(hf);
  std::filesystem::remove_all(back);
}

// convert --preset writes a random model of a preset's shapes (here as a GGUF file); bench --json
// reports what one token costs it. The expected bytes and FLOPs are counted here from the tiny
// preset's hyper-parameters (d_model 64, 2 Mamba-1 layers, vocab 256, mamba_ssm's defaults).
TEST(Cli, ConvertPresetAndBenchTokenCost) {
  const std::string gguf = tmp("preset_tiny.gguf");
  CliRun c = run("convert --preset tiny --format gguf --out " + gguf);
  ASSERT_EQ(c.status, 0) << c.out;
  MambaLM lm = MambaLM::load_gguf(gguf);
  EXPECT_EQ(lm.config().d_model, 64);
  EXPECT_EQ(lm.blocks().size(), 2u);
  CliRun b = run("bench --model " + gguf + " --prompt 8 --gen 2 --reps 1 --threads 1 --json");
  ASSERT_EQ(b.status, 0) << b.out;
  const auto j = nlohmann::json::parse(b.out.substr(b.out.find('{')));
  const int64_t d = 64, di = 128, N = 16, R = 4, K = 4, V = 256, layers = 2;
  const int64_t proj = d * 2 * di + di * (R + 2 * N) + di * R + di * d;  // in, x, dt, out
  const int64_t layer =
      proj + di * K + di /*conv bias*/ + di * N /*A_log*/ + di /*D*/ + di /*dt bias*/ + d /*norm*/;
  EXPECT_EQ(j["prefill_flops_per_token"].get<int64_t>(), 2 * proj * layers);
  EXPECT_EQ(j["decode_flops_per_token"].get<int64_t>(), 2 * proj * layers + 2 * V * d);
  // f32 weights, the tied head read whole: every parameter's 4 bytes.
  EXPECT_EQ(j["decode_weight_bytes"].get<int64_t>(), 4 * (layers * layer + V * d + d));
  EXPECT_EQ(j["decode_weight_bytes"].get<int64_t>(), 4 * j["params"].get<int64_t>());
  EXPECT_EQ(j["state_bytes"].get<int64_t>(), 4 * layers * (di * K + di * N));
  CliRun both = run("convert --preset tiny --model x --out " + gguf);
  EXPECT_NE(both.status, 0);
  CliRun unknown = run("convert --preset mamba-9b --out " + gguf);
  EXPECT_NE(unknown.status, 0);
  EXPECT_NE(unknown.out.find("unknown --preset 'mamba-9b'"), std::string::npos) << unknown.out;
  std::filesystem::remove(gguf);
}

// info --measure: the machine's FMA peak and read bandwidth, as numbers (their size is the
// machine's; a small buffer keeps this quick).
TEST(Cli, InfoMeasuresBounds) {
  CliRun r = run("info --measure --mib 16 --threads 1 --json");
  ASSERT_EQ(r.status, 0) << r.out;
  const auto j = nlohmann::json::parse(r.out.substr(r.out.find('{')));
  EXPECT_GT(j["fma_gflops"].get<double>(), 0.1);
  EXPECT_GT(j["read_gbs"].get<double>(), 0.1);
  EXPECT_EQ(j["threads"].get<int>(), 1);
}

// Issue 18, item 3: `bench --config` with a model far larger than memory used to run for half a
// minute with no output; now it stops at once with the bytes needed and available.
TEST(Cli, ModelLargerThanMemoryIsRefusedWithBytesNeeded) {
  const std::string cfg = tmp("huge_config.json");
  {
    std::ofstream f(cfg);
    f << R"({"d_model": 65536, "n_layer": 64, "vocab_size": 50277})";
  }
  CliRun r = run("bench --config " + cfg);
  EXPECT_EQ(r.status, 1) << r.out;
  EXPECT_NE(r.out.find("d_model 65536, n_layer 64"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("are available"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" bytes ("), std::string::npos) << r.out;
  std::remove(cfg.c_str());
}

// Issue 18: `mambacpp convert` of a folder whose config.json nests 200,000 levels (400 KB) and
// `mambacpp tokenize` with a tokenizer.json nesting 300,000 levels crashed (exit 139, stack
// overflow); both now stop with an error naming the nesting limit.
TEST(Cli, DeeplyNestedJsonFilesGiveAnErrorNotACrash) {
  namespace fs = std::filesystem;
  const std::string dir = tmp("deep_model"), tok = tmp("deep_tokenizer.json");
  fs::remove_all(dir);
  fs::create_directories(dir);
  {
    std::ofstream f(dir + "/config.json");
    f << R"({"ssm_cfg": )" << std::string(200000, '[') << std::string(200000, ']') << "}";
    std::ofstream t(tok);
    t << std::string(300000, '[') << std::string(300000, ']');
  }
  CliRun c = run("convert --model " + dir + " --out " + tmp("deep_out"));
  EXPECT_EQ(c.status, 1) << c.out;
  EXPECT_NE(c.out.find("nested deeper than 256"), std::string::npos) << c.out;
  CliRun t = run("tokenize --tokenizer " + tok + " --text hello");
  EXPECT_EQ(t.status, 1) << t.out;
  EXPECT_NE(t.out.find("nested deeper than 256"), std::string::npos) << t.out;
  fs::remove_all(dir);
  std::remove(tok.c_str());
}
