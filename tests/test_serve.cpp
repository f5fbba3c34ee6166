// `mambacpp serve` end to end over loopback: each test suite starts the server on a free port
// (--port 0, the port read from its first line), talks to it with cpp-httplib's client, curl and
// the official `openai` npm package, and stops it with SIGTERM (exit status 0 checked).
// The model is the small golden Mamba-1 LM (tests/data/golden/lm_mamba1_ckpt, vocab 101) with a
// tokenizer.json written here: printable ASCII characters and the space, no merges.
#include <gtest/gtest.h>

#if !MAMBA_HAVE_SERVE
TEST(Serve, NeedsHttplib) {
  GTEST_SKIP() << "built without cpp-httplib (libcpp-httplib-dev): mambacpp serve is not built";
}
#else
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "mamba/tokenizer.h"
#include "model/npy.h"
#include "serve/engine.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

fs::path scratch() {
  static const fs::path d = [] {
    fs::path p = fs::temp_directory_path() / ("mamba_serve_test_" + std::to_string(::getpid()));
    fs::create_directories(p);
    return p;
  }();
  return d;
}

// The golden LM with a character-level tokenizer (ids < 101).
std::string model_dir() {
  static const std::string dir = [] {
    fs::path d = scratch() / "lm_mamba1";
    fs::create_directories(d);
    const fs::path src = fs::path(MAMBA_TEST_DATA) / "golden" / "lm_mamba1_ckpt";
    fs::copy_file(src / "config.json", d / "config.json", fs::copy_options::overwrite_existing);
    fs::copy_file(src / "model.safetensors", d / "model.safetensors",
                  fs::copy_options::overwrite_existing);
    json vocab = json::object();
    for (int c = 33; c <= 126; ++c) vocab[std::string(1, static_cast<char>(c))] = c - 32;
    vocab["\xC4\xA0"] = 95;  // "Ġ": the byte-level alphabet's space
    vocab["<|endoftext|>"] = 0;
    json tok = {{"version", "1.0"},
                {"added_tokens", json::array({{{"id", 0},
                                               {"content", "<|endoftext|>"},
                                               {"single_word", false},
                                               {"lstrip", false},
                                               {"rstrip", false},
                                               {"normalized", false},
                                               {"special", true}}})},
                {"normalizer", nullptr},
                {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
                {"post_processor", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
                {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
                {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array()}}}};
    std::ofstream(d / "tokenizer.json") << tok.dump();
    return d.string();
  }();
  return dir;
}

// The same model as a chat model: ChatML's <|im_start|> / <|im_end|> as special added tokens
// (ids 96, 97; the golden vocabulary has 101 rows), the newline ("Ċ", 98), and a
// tokenizer_config.json with a ChatML template (plus a role check that raises) and
// eos_token <|im_end|>.
const char* const kChatML =
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

std::string chat_model_dir() {
  static const std::string dir = [] {
    fs::path d = scratch() / "lm_mamba1_chat";
    fs::create_directories(d);
    const fs::path base = model_dir();
    for (const char* f : {"config.json", "model.safetensors"})
      fs::copy_file(base / f, d / f, fs::copy_options::overwrite_existing);
    std::ifstream in(base / "tokenizer.json");
    json tok = json::parse(in);
    tok["model"]["vocab"]["\xC4\x8A"] = 98;  // "Ċ": the byte-level alphabet's newline
    int id = 96;
    for (const char* t : {"<|im_start|>", "<|im_end|>"}) {
      tok["model"]["vocab"][t] = id;
      tok["added_tokens"].push_back({{"id", id++},
                                     {"content", t},
                                     {"single_word", false},
                                     {"lstrip", false},
                                     {"rstrip", false},
                                     {"normalized", false},
                                     {"special", true}});
    }
    std::ofstream(d / "tokenizer.json") << tok.dump();
    json cfg = {{"bos_token", "<|endoftext|>"},
                {"eos_token", {{"__type", "AddedToken"}, {"content", "<|im_end|>"}}},
                {"chat_template", kChatML}};
    std::ofstream(d / "tokenizer_config.json") << cfg.dump();
    return d.string();
  }();
  return dir;
}

// What kChatML renders for these messages with the generation prompt.
std::string chatml(const std::vector<std::pair<std::string, std::string> >& msgs) {
  std::string s;
  for (auto& [role, content] : msgs) s += "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
  return s + "<|im_start|>assistant\n";
}

struct ServerProc {
  pid_t pid = -1;
  int port = 0;
  std::string log;
  ServerProc() = default;
  ServerProc(const ServerProc&) = delete;
  ServerProc& operator=(const ServerProc&) = delete;
  ~ServerProc() { stop(); }  // a failed assertion must not leave a server running
  // Starts `mambacpp serve --model <dir> --port 0 <args>` and waits for its "listening" line.
  void start(const std::string& args, const std::string& dir = model_dir()) {
    static int count = 0;
    log = (scratch() / ("server" + std::to_string(count++) + ".log")).string();
    const std::string cmd = std::string("exec \"") + MAMBA_CLI_PATH + "\" serve --model \"" + dir +
                            "\" --port 0 --threads 1 " + args + " > \"" + log + "\" 2>&1";
    pid = fork();
    if (pid == 0) {
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    for (int i = 0; i < 300 && port == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      std::ifstream f(log);
      std::string line;
      std::getline(f, line);
      auto p = line.find("listening on http://127.0.0.1:");
      if (p != std::string::npos) port = std::stoi(line.substr(p + 30));
    }
    ASSERT_GT(port, 0) << "the server did not start; its output: " << read_log();
  }
  std::string read_log() const {
    std::ifstream f(log);
    return std::string(std::istreambuf_iterator<char>(f), {});
  }
  // SIGTERM, then the exit status (-1 if it did not exit within 10 s).
  int stop() {
    if (pid <= 0) return -1;
    ::kill(pid, SIGTERM);
    int st = 0;
    for (int i = 0; i < 500; ++i) {
      if (waitpid(pid, &st, WNOHANG) == pid) {
        pid = -1;
        return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ::kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    pid = -1;
    return -1;
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30);
    return c;
  }
  std::string url() const { return "http://127.0.0.1:" + std::to_string(port); }
};

struct Reply {
  int status = 0;
  json body;
  std::string raw;
};

Reply post(const ServerProc& s, const std::string& path, const std::string& body,
           const httplib::Headers& h = {}) {
  auto c = s.client();
  auto r = c.Post(path, h, body, "application/json");
  Reply out;
  if (!r) {  // no answer: say why (connection, read, ...) where the test prints raw
    out.raw = "no HTTP answer: " + httplib::to_string(r.error());
    return out;
  }
  out.status = r->status;
  out.raw = r->body;
  out.body = json::parse(r->body, nullptr, false);
  return out;
}

Reply get(const ServerProc& s, const std::string& path, const httplib::Headers& h = {}) {
  auto c = s.client();
  auto r = c.Get(path, h);
  Reply out;
  if (!r) return out;
  out.status = r->status;
  out.raw = r->body;
  out.body = json::parse(r->body, nullptr, false);
  return out;
}

std::string sh(const std::string& cmd, int* rc = nullptr) {
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  const int st = pclose(p);
  if (rc) *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

// A completion's OpenAI error object: status, error.param, error.code.
void expect_error(const Reply& r, int status, const std::string& param, const std::string& what) {
  EXPECT_EQ(r.status, status) << what << ": " << r.raw;
  ASSERT_TRUE(r.body.is_object() && r.body.contains("error")) << what << ": " << r.raw;
  const json& e = r.body["error"];
  EXPECT_TRUE(e["message"].is_string() && !e["message"].get<std::string>().empty()) << what;
  EXPECT_TRUE(e.contains("type") && e.contains("param") && e.contains("code")) << what;
  if (!param.empty()) {
    EXPECT_EQ(e["param"], param) << what << ": " << r.raw;
  }
}

// `mambacpp generate --greedy --no-eos` ids for one prompt of ids.
std::vector<int32_t> generate_ids(const std::vector<int32_t>& prompt, int n) {
  static int count = 0;
  const fs::path in = scratch() / ("gen_in" + std::to_string(count) + ".npy");
  const fs::path out = scratch() / ("gen_out" + std::to_string(count++) + ".npy");
  std::vector<int64_t> flat(prompt.begin(), prompt.end());
  mamba::write_npy_i64(in.string(), {1, static_cast<int64_t>(prompt.size())}, flat);
  auto r = mamba::test::run_cli("generate --model \"" + model_dir() + "\" --ids \"" + in.string() +
                                "\" --out-ids \"" + out.string() +
                                "\" --greedy --no-eos -q --threads 1 -n " + std::to_string(n));
  EXPECT_EQ(r.status, 0) << r.out;
  mamba::NpyArray a = mamba::read_npy(out.string());
  std::vector<int64_t> v = mamba::npy_to_i64(a, out.string());
  return std::vector<int32_t>(v.begin(), v.end());
}

// The same for several prompts of one length, in one `generate` run (B, L).
std::vector<std::vector<int32_t> > generate_batch_ids(const std::vector<std::vector<int32_t> >& ps,
                                                      int n) {
  const fs::path in = scratch() / "gen_batch_in.npy", out = scratch() / "gen_batch_out.npy";
  std::vector<int64_t> flat;
  for (auto& p : ps) flat.insert(flat.end(), p.begin(), p.end());
  mamba::write_npy_i64(in.string(),
                       {static_cast<int64_t>(ps.size()), static_cast<int64_t>(ps[0].size())}, flat);
  auto r = mamba::test::run_cli("generate --model \"" + model_dir() + "\" --ids \"" + in.string() +
                                "\" --out-ids \"" + out.string() +
                                "\" --greedy --no-eos -q --threads 1 -n " + std::to_string(n));
  EXPECT_EQ(r.status, 0) << r.out;
  mamba::NpyArray a = mamba::read_npy(out.string());
  std::vector<int64_t> v = mamba::npy_to_i64(a, out.string());
  std::vector<std::vector<int32_t> > res(ps.size());
  for (size_t b = 0; b < ps.size(); ++b)
    for (int t = 0; t < n; ++t) res[b].push_back(static_cast<int32_t>(v[b * n + t]));
  return res;
}

std::vector<int32_t> ids_of(const json& choice) {
  return choice["token_ids"].get<std::vector<int32_t> >();
}

json completion_body(const json& prompt, int max_tokens, json extra = json::object()) {
  json b = {
      {"prompt", prompt}, {"max_tokens", max_tokens}, {"temperature", 0}, {"ignore_eos", true}};
  for (auto& [k, v] : extra.items()) b[k] = v;
  return b;
}

// Server-sent events: the JSON of every data line; `done` is set by "data: [DONE]".
std::vector<json> sse(const std::string& text, bool* done) {
  std::vector<json> out;
  *done = false;
  size_t p = 0;
  while ((p = text.find("data: ", p)) != std::string::npos) {
    size_t e = text.find("\n\n", p);
    if (e == std::string::npos) break;
    std::string d = text.substr(p + 6, e - p - 6);
    if (d == "[DONE]")
      *done = true;
    else
      out.push_back(json::parse(d));
    p = e + 2;
  }
  return out;
}

class Serve : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    main_ = new ServerProc;
    main_->start(
        "--max-batch 8 --max-queue 40 --prefix-cache-mib 16 --max-body-kib 4 --max-tokens-limit "
        "1000000");
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(main_->stop(), 0) << main_->read_log();
    delete main_;
  }
  static ServerProc* main_;
};
ServerProc* Serve::main_ = nullptr;

TEST_F(Serve, HealthModelsMetrics) {
  auto h = get(*main_, "/health");
  EXPECT_EQ(h.status, 200);
  EXPECT_EQ(h.body["status"], "ok");
  auto m = get(*main_, "/v1/models");
  ASSERT_EQ(m.status, 200) << m.raw;
  EXPECT_EQ(m.body["object"], "list");
  ASSERT_EQ(m.body["data"].size(), 1u);
  EXPECT_EQ(m.body["data"][0]["id"], "lm_mamba1");
  EXPECT_EQ(m.body["data"][0]["object"], "model");
  EXPECT_EQ(get(*main_, "/v1/models/lm_mamba1").status, 200);
  expect_error(get(*main_, "/v1/models/gpt-4"), 404, "model", "unknown model");
  ASSERT_EQ(post(*main_, "/v1/completions", completion_body("ab", 2).dump()).status, 200);
  // the request is counted after its response is written: wait for it
  Reply x;
  for (int i = 0; i < 100; ++i) {
    x = get(*main_, "/metrics");
    if (x.raw.find("endpoint=\"/v1/completions\",status=\"200\"") != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(x.status, 200);
  for (const char* name :
       {"mambacpp_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
        "mambacpp_generated_tokens_total", "mambacpp_queue_depth", "mambacpp_batch_size",
        "mambacpp_prefill_tokens_per_second", "mambacpp_decode_tokens_per_second",
        "mambacpp_prefix_cache_hits_total", "# TYPE mambacpp_requests_total counter"})
    EXPECT_NE(x.raw.find(name), std::string::npos) << name << "\n" << x.raw;
}

TEST_F(Serve, GreedyEqualsGenerate) {
  // token-id prompts and a text prompt, each against `mambacpp generate` on the same ids
  const mamba::Tokenizer tok = mamba::Tokenizer::from_file(model_dir() + "/tokenizer.json");
  const std::vector<std::vector<int32_t> > prompts = {
      {5, 17, 42}, {1}, {99, 3, 3, 3, 64, 12, 80, 7}, tok.encode("Hello mamba")};
  for (size_t i = 0; i < prompts.size(); ++i) {
    const json prompt = i == 3 ? json("Hello mamba") : json(prompts[i]);
    auto r = post(*main_, "/v1/completions", completion_body(prompt, 10).dump());
    ASSERT_EQ(r.status, 200) << r.raw;
    const json& c = r.body["choices"][0];
    EXPECT_EQ(ids_of(c), generate_ids(prompts[i], 10)) << "prompt " << i;
    EXPECT_EQ(c["text"], tok.decode(ids_of(c)));
    EXPECT_EQ(c["finish_reason"], "length");
    EXPECT_EQ(r.body["object"], "text_completion");
    EXPECT_EQ(r.body["usage"]["prompt_tokens"], prompts[i].size());
    EXPECT_EQ(r.body["usage"]["completion_tokens"], 10);
    EXPECT_EQ(r.body["usage"]["total_tokens"], prompts[i].size() + 10);
  }
}

TEST_F(Serve, StreamEqualsNonStream) {
  const json body = completion_body("The cat", 16);
  auto whole = post(*main_, "/v1/completions", body.dump());
  ASSERT_EQ(whole.status, 200) << whole.raw;
  json sb = body;
  sb["stream"] = true;
  sb["stream_options"] = {{"include_usage", true}};
  auto r = post(*main_, "/v1/completions", sb.dump());
  ASSERT_EQ(r.status, 200);
  bool done = false;
  auto events = sse(r.raw, &done);
  EXPECT_TRUE(done) << r.raw;
  std::string text;
  std::vector<int32_t> ids;
  std::string finish;
  json usage;
  for (auto& e : events) {
    EXPECT_EQ(e["object"], "text_completion");
    if (e.contains("usage")) usage = e["usage"];
    for (auto& c : e["choices"]) {
      text += c["text"].get<std::string>();
      for (auto id : c["token_ids"]) ids.push_back(id.get<int32_t>());
      if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
    }
  }
  EXPECT_GT(events.size(), 2u);
  EXPECT_EQ(text, whole.body["choices"][0]["text"]);
  EXPECT_EQ(ids, ids_of(whole.body["choices"][0]));
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(usage["completion_tokens"], 16);
}

TEST_F(Serve, ErrorsAreOpenAIErrorObjects) {
  auto p = [&](const std::string& b) { return post(*main_, "/v1/completions", b); };
  expect_error(p("{not json"), 400, "", "invalid JSON");
  expect_error(p("[1,2]"), 400, "", "not an object");
  expect_error(p(R"({"max_tokens":3})"), 400, "prompt", "no prompt");
  expect_error(p(R"({"prompt":""})"), 400, "prompt", "empty prompt");
  expect_error(p(R"({"prompt":[]})"), 400, "prompt", "empty ids");
  expect_error(p(R"({"prompt":[1, 500]})"), 400, "prompt", "id outside the vocabulary");
  expect_error(p(R"({"prompt":[1, -1]})"), 400, "prompt", "negative id");
  expect_error(p(R"({"prompt":"ab","temperature":"hot"})"), 400, "temperature", "type");
  expect_error(p(R"({"prompt":"ab","temperature":3})"), 400, "temperature", "range");
  expect_error(p(R"({"prompt":"ab","top_p":1.5})"), 400, "top_p", "range");
  expect_error(p(R"({"prompt":"ab","max_tokens":-1})"), 400, "max_tokens", "negative");
  expect_error(p(R"({"prompt":"ab","max_tokens":2.5})"), 400, "max_tokens", "not integer");
  expect_error(p(R"({"prompt":"ab","max_tokens":100000000000})"), 400, "max_tokens", "huge");
  expect_error(p(R"({"prompt":"ab","n":0})"), 400, "n", "n = 0");
  expect_error(p(R"({"prompt":"ab","stop":5})"), 400, "stop", "stop type");
  expect_error(p(R"({"prompt":"ab","stop":["a","b","c","d","e"]})"), 400, "stop", "5 stops");
  expect_error(p(R"({"prompt":"ab","logprobs":9})"), 400, "logprobs", "logprobs range");
  expect_error(p(R"({"prompt":"ab","seed":"x"})"), 400, "seed", "seed type");
  expect_error(p(R"({"prompt":"ab","stream":"yes"})"), 400, "stream", "stream type");
  expect_error(p(R"({"prompt":"ab","model":"gpt-4"})"), 404, "model", "unknown model");
  expect_error(post(*main_, "/v1/chat/completions", R"({"messages":[]})"), 404, "",
               "chat without a template");
  expect_error(get(*main_, "/v2/nothing"), 404, "", "unknown path");
  // over --max-body-kib 4
  const std::string big = R"({"prompt":")" + std::string(5000, 'a') + "\"}";
  expect_error(p(big), 413, "", "body over the limit");
  // the server is still fine
  EXPECT_EQ(p(completion_body("ab", 3).dump()).status, 200);
  EXPECT_EQ(get(*main_, "/health").status, 200);
}

TEST_F(Serve, MaxTokensZeroEchoStopNLogprobs) {
  auto z = post(*main_, "/v1/completions", completion_body("abc", 0, {{"echo", true}}).dump());
  ASSERT_EQ(z.status, 200) << z.raw;
  EXPECT_EQ(z.body["choices"][0]["text"], "abc");
  EXPECT_EQ(z.body["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(z.body["usage"]["completion_tokens"], 0);

  // stop: cut before the first occurrence of a piece of the greedy text
  auto full = post(*main_, "/v1/completions", completion_body("xyz", 24).dump());
  ASSERT_EQ(full.status, 200);
  const std::string text = full.body["choices"][0]["text"];
  ASSERT_GE(text.size(), 8u);
  const std::string stop = text.substr(5, 2);
  auto s = post(*main_, "/v1/completions", completion_body("xyz", 24, {{"stop", stop}}).dump());
  ASSERT_EQ(s.status, 200);
  EXPECT_EQ(s.body["choices"][0]["text"], text.substr(0, text.find(stop)));
  EXPECT_EQ(s.body["choices"][0]["finish_reason"], "stop");
  // the same through the stream
  auto ss = post(*main_, "/v1/completions",
                 completion_body("xyz", 24, {{"stop", stop}, {"stream", true}}).dump());
  bool done = false;
  std::string st;
  for (auto& e : sse(ss.raw, &done)) st += e["choices"][0]["text"].get<std::string>();
  EXPECT_TRUE(done);
  EXPECT_EQ(st, text.substr(0, text.find(stop)));

  // n = 3 sampled choices with a seed: reproducible, and two prompts give 2 x n choices
  const json sampled = {{"prompt", json::array({"ab", "cd"})},
                        {"max_tokens", 8},
                        {"temperature", 1.0},
                        {"n", 3},
                        {"seed", 7},
                        {"ignore_eos", true}};
  auto a = post(*main_, "/v1/completions", sampled.dump());
  auto b = post(*main_, "/v1/completions", sampled.dump());
  ASSERT_EQ(a.status, 200) << a.raw;
  ASSERT_EQ(a.body["choices"].size(), 6u);
  for (size_t i = 0; i < 6; ++i) {
    EXPECT_EQ(a.body["choices"][i]["index"], i);
    EXPECT_EQ(ids_of(a.body["choices"][i]), ids_of(b.body["choices"][i]));
  }
  EXPECT_EQ(a.body["usage"]["completion_tokens"], 48);

  // logprobs: the chosen token's log-probability and the 2 best; greedy picks the best
  auto l = post(*main_, "/v1/completions", completion_body("ab", 5, {{"logprobs", 2}}).dump());
  ASSERT_EQ(l.status, 200) << l.raw;
  const json& lp = l.body["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), 5u);
  ASSERT_EQ(lp["token_logprobs"].size(), 5u);
  ASSERT_EQ(lp["top_logprobs"].size(), 5u);
  ASSERT_EQ(lp["text_offset"].size(), 5u);
  for (size_t i = 0; i < 5; ++i) {
    const double chosen = lp["token_logprobs"][i];
    EXPECT_LE(chosen, 0.0);
    ASSERT_EQ(lp["top_logprobs"][i].size(), 2u);
    double best = -1e30;
    for (auto& [k, v] : lp["top_logprobs"][i].items()) best = std::max(best, v.get<double>());
    EXPECT_EQ(chosen, best);
    if (i > 0) {  // each token's text starts where the previous one's ends
      EXPECT_EQ(
          lp["text_offset"][i].get<size_t>(),
          lp["text_offset"][i - 1].get<size_t>() + lp["tokens"][i - 1].get<std::string>().size());
    }
  }
}

TEST_F(Serve, PrefixCacheGivesTheSameIds) {
  ServerProc nocache;
  nocache.start("--prefix-cache-mib 0");
  const std::vector<int32_t> sys = {12, 40, 41, 77, 3, 3, 9, 60, 61, 62, 63, 18, 19, 20, 88, 5};
  std::vector<json> prompts = {json(sys)};
  auto longer = sys;
  longer.insert(longer.end(), {33, 34});  // a partial hit: 2 tokens prefilled after the cached 16
  prompts.push_back(json(longer));
  prompts.push_back(json(sys));  // an exact hit: state and logits from the cache
  auto before = get(*main_, "/metrics").raw;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto a = post(*main_, "/v1/completions", completion_body(prompts[i], 12).dump());
    auto b = post(nocache, "/v1/completions", completion_body(prompts[i], 12).dump());
    ASSERT_EQ(a.status, 200);
    ASSERT_EQ(b.status, 200);
    EXPECT_EQ(ids_of(a.body["choices"][0]), ids_of(b.body["choices"][0])) << "prompt " << i;
  }
  auto hits = [](const std::string& m) {
    auto p = m.find("\nmambacpp_prefix_cache_hits_total ");
    return p == std::string::npos ? -1.0 : std::stod(m.substr(p + 34));
  };
  EXPECT_GE(hits(get(*main_, "/metrics").raw) - hits(before), 2.0);
  EXPECT_EQ(hits(get(nocache, "/metrics").raw), 0.0);
  EXPECT_EQ(nocache.stop(), 0);
}

TEST_F(Serve, ConcurrentClientsGetTheirOwnAnswers) {
  // 32 clients at once (batch 8, the rest queued); every answer equals the same prompt alone
  constexpr int kClients = 32;
  std::vector<json> prompts;
  for (int i = 0; i < kClients; ++i) prompts.push_back(json({1 + i, 2 + 2 * i, 90 - i}));
  std::vector<std::vector<int32_t> > alone(kClients);
  for (int i = 0; i < kClients; i += 8) {  // a sample of them one by one
    auto r = post(*main_, "/v1/completions", completion_body(prompts[i], 12).dump());
    ASSERT_EQ(r.status, 200);
    alone[i] = ids_of(r.body["choices"][0]);
  }
  std::vector<Reply> got(kClients);
  std::vector<std::thread> th;
  for (int i = 0; i < kClients; ++i)
    th.emplace_back([&, i] {
      json b = completion_body(prompts[i], 12);
      if (i % 2) b["stream"] = true;
      got[i] = post(*main_, "/v1/completions", b.dump());
    });
  for (auto& t : th) t.join();
  std::vector<std::vector<int32_t> > ps;
  for (auto& p : prompts) ps.push_back(p.get<std::vector<int32_t> >());
  const auto expected = generate_batch_ids(ps, 12);
  for (int i = 0; i < kClients; ++i) {
    ASSERT_EQ(got[i].status, 200) << i << ": " << got[i].raw
                                  << "\nserver log: " << main_->read_log();
    std::vector<int32_t> ids;
    if (i % 2) {
      bool done = false;
      for (auto& e : sse(got[i].raw, &done))
        for (auto id : e["choices"][0]["token_ids"]) ids.push_back(id.get<int32_t>());
      EXPECT_TRUE(done);
    } else {
      ids = ids_of(got[i].body["choices"][0]);
    }
    EXPECT_EQ(ids.size(), 12u) << i;
    if (!alone[i].empty()) {
      EXPECT_EQ(ids, alone[i]) << "client " << i;
    }
    EXPECT_EQ(ids, expected[i]) << "client " << i;
  }
}

double metric(const std::string& text, const std::string& name) {
  auto p = text.find("\n" + name + " ");
  return p == std::string::npos ? -1.0 : std::stod(text.substr(p + name.size() + 2));
}

TEST_F(Serve, DisconnectFreesTheSequence) {
  // a 1,000,000-token stream; curl hangs up after 0.5 s; the sequence leaves the batch
  const double c0 = metric(get(*main_, "/metrics").raw, "mambacpp_sequences_cancelled_total");
  const json b = completion_body("ab", 1000000, {{"stream", true}});
  int rc = 0;
  const std::string out = sh("curl -sS -N --max-time 0.5 -H 'Content-Type: application/json' -d '" +
                                 b.dump() + "' " + main_->url() + "/v1/completions",
                             &rc);
  EXPECT_EQ(rc, 28) << "curl should have timed out mid-stream: " << out.substr(0, 300);
  EXPECT_NE(out.find("data: {"), std::string::npos);
  double c1 = c0, batch = 1;
  for (int i = 0; i < 200 && (c1 <= c0 || batch != 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    const std::string m = get(*main_, "/metrics").raw;
    c1 = metric(m, "mambacpp_sequences_cancelled_total");
    batch = metric(m, "mambacpp_batch_size");
  }
  EXPECT_GT(c1, c0);
  EXPECT_EQ(batch, 0);
}

TEST_F(Serve, CurlClient) {
  int rc = 0;
  const std::string out =
      sh("curl -sS " + main_->url() + "/v1/completions -H 'Content-Type: application/json' -d '" +
             completion_body("Hi", 6).dump() + "'",
         &rc);
  ASSERT_EQ(rc, 0) << out;
  json j = json::parse(out, nullptr, false);
  ASSERT_TRUE(j.is_object()) << out;
  EXPECT_EQ(j["usage"]["completion_tokens"], 6);
  const std::string s = sh("curl -sS -N " + main_->url() +
                               "/v1/completions -H 'Content-Type: application/json' -d '" +
                               completion_body("Hi", 6, {{"stream", true}}).dump() + "'",
                           &rc);
  ASSERT_EQ(rc, 0);
  bool done = false;
  std::string text;
  for (auto& e : sse(s, &done)) text += e["choices"][0]["text"].get<std::string>();
  EXPECT_TRUE(done);
  EXPECT_EQ(text, j["choices"][0]["text"]);
}

TEST_F(Serve, OfficialOpenAINodeClient) {
  int rc = 0;
  sh("command -v node && command -v npm", &rc);
  if (rc != 0) GTEST_SKIP() << "node / npm not installed: the openai client test is skipped";
  const fs::path dir = fs::temp_directory_path() / "mamba_serve_openai_npm";
  fs::create_directories(dir);
  if (!fs::exists(dir / "node_modules" / "openai" / "package.json")) {
    const std::string out = sh("cd '" + dir.string() +
                                   "' && timeout 120 npm install --no-audit --no-fund "
                                   "--loglevel=error openai@4",
                               &rc);
    if (rc != 0) GTEST_SKIP() << "npm could not install the openai package (no network?): " << out;
  }
  fs::copy_file(fs::path(MAMBA_SERVE_SCRIPTS) / "openai_client.mjs", dir / "client.mjs",
                fs::copy_options::overwrite_existing);
  const std::string out =
      sh("cd '" + dir.string() + "' && BASE_URL=" + main_->url() +
             "/v1 MODEL=lm_mamba1 PROMPT='Once upon' timeout 60 node client.mjs",
         &rc);
  ASSERT_EQ(rc, 0) << out;
  json j = json::parse(out.substr(out.find('{')), nullptr, false);
  ASSERT_TRUE(j.is_object()) << out;
  EXPECT_EQ(j["finish"], "length");
  EXPECT_EQ(j["status"], 400);
  EXPECT_GT(j["chunks"].get<int>(), 1);
}

TEST(ServeLimits, ApiKeyAndQueueFull) {
  ServerProc s;
  s.start("--api-key sekrit --max-batch 1 --max-queue 0 --max-tokens-limit 1000000");
  const httplib::Headers key = {{"Authorization", "Bearer sekrit"}};
  expect_error(get(s, "/v1/models"), 401, "", "no key");
  expect_error(get(s, "/v1/models", {{"Authorization", "Bearer nope"}}), 401, "", "wrong key");
  expect_error(post(s, "/v1/completions", completion_body("ab", 2).dump()), 401, "", "no key");
  EXPECT_EQ(get(s, "/health").status, 200);  // health needs no key
  EXPECT_EQ(get(s, "/v1/models", key).status, 200);
  EXPECT_EQ(post(s, "/v1/completions", completion_body("ab", 2).dump(), key).status, 200);
  // one long stream holds the only slot: the next request is refused with 429
  std::thread holder([&] {
    sh("curl -sS -N --max-time 1.5 -H 'Authorization: Bearer sekrit' -H 'Content-Type: "
       "application/json' -d '" +
       completion_body("ab", 1000000, {{"stream", true}}).dump() + "' " + s.url() +
       "/v1/completions > /dev/null");
  });
  double batch = 0;
  for (int i = 0; i < 100 && batch < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    batch = metric(get(s, "/metrics", key).raw, "mambacpp_batch_size");
  }
  EXPECT_EQ(batch, 1);
  auto r = post(s, "/v1/completions", completion_body("ab", 2).dump(), key);
  expect_error(r, 429, "", "queue full");
  EXPECT_EQ(r.body["error"]["code"], "queue_full");
  holder.join();
  EXPECT_EQ(s.stop(), 0) << s.read_log();
}

TEST(ServeLimits, SigtermEndsStreamsWithAFinalEventAndExitsZero) {
  ServerProc s;
  s.start("--max-tokens-limit 1000000");
  std::string out;
  std::thread client([&] {
    out = sh("curl -sS -N --max-time 20 -H 'Content-Type: application/json' -d '" +
             completion_body("ab", 1000000, {{"stream", true}}).dump() + "' " + s.url() +
             "/v1/completions");
  });
  double batch = 0;
  for (int i = 0; i < 200 && batch < 1; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    batch = metric(get(s, "/metrics").raw, "mambacpp_batch_size");
  }
  EXPECT_EQ(batch, 1);
  EXPECT_EQ(s.stop(), 0) << s.read_log();
  client.join();
  bool done = false;
  auto ev = sse(out, &done);
  ASSERT_FALSE(ev.empty()) << out.substr(0, 300);
  EXPECT_EQ(ev.back()["choices"][0]["finish_reason"], "abort");
  EXPECT_TRUE(done);
}

// ---- /v1/chat/completions (the chat model folder: ChatML template, <|im_end|> ends a turn) ----

class ServeChat : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    chat_ = new ServerProc;
    chat_->start("--max-batch 4 --max-queue 8", chat_model_dir());
  }
  static void TearDownTestSuite() {
    EXPECT_EQ(chat_->stop(), 0) << chat_->read_log();
    delete chat_;
  }
  static ServerProc* chat_;
};
ServerProc* ServeChat::chat_ = nullptr;

json chat_body(const json& messages, int max_tokens, json extra = json::object()) {
  json b = {
      {"messages", messages}, {"max_tokens", max_tokens}, {"temperature", 0}, {"ignore_eos", true}};
  for (auto& [k, v] : extra.items()) b[k] = v;
  return b;
}

TEST_F(ServeChat, GreedyChatEqualsCompletionOfTheRenderedPrompt) {
  EXPECT_NE(chat_->read_log().find("/v1/chat/completions: on, chat template from"),
            std::string::npos)
      << chat_->read_log();
  const mamba::Tokenizer tok = mamba::Tokenizer::from_file(chat_model_dir() + "/tokenizer.json");
  const json messages = json::array({{{"role", "system"}, {"content", "Be brief."}},
                                     {{"role", "user"}, {"content", "Hi there"}}});
  const std::string rendered = chatml({{"system", "Be brief."}, {"user", "Hi there"}});
  const std::vector<int32_t> prompt = tok.encode(rendered);
  ASSERT_EQ(std::count(prompt.begin(), prompt.end(), 96), 3) << "<|im_start|> is one token";
  ASSERT_EQ(std::count(prompt.begin(), prompt.end(), 97), 2) << "<|im_end|> is one token";
  auto r = post(*chat_, "/v1/chat/completions", chat_body(messages, 12).dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["object"], "chat.completion");
  EXPECT_EQ(r.body["id"].get<std::string>().rfind("chatcmpl-", 0), 0u);
  EXPECT_EQ(r.body["model"], "lm_mamba1_chat");
  ASSERT_EQ(r.body["choices"].size(), 1u);
  const json& c = r.body["choices"][0];
  EXPECT_EQ(c["index"], 0);
  EXPECT_EQ(c["message"]["role"], "assistant");
  EXPECT_EQ(c["finish_reason"], "length");
  EXPECT_TRUE(c["logprobs"].is_null());
  EXPECT_EQ(r.body["usage"]["prompt_tokens"], prompt.size());
  EXPECT_EQ(r.body["usage"]["completion_tokens"], 12);
  // the same ids as /v1/completions on the rendered text, and as `mambacpp generate`
  auto p = post(*chat_, "/v1/completions", completion_body(rendered, 12).dump());
  ASSERT_EQ(p.status, 200) << p.raw;
  EXPECT_EQ(ids_of(c), ids_of(p.body["choices"][0]));
  EXPECT_EQ(c["message"]["content"], p.body["choices"][0]["text"]);
  EXPECT_EQ(ids_of(c), generate_ids(prompt, 12));
  // content as text parts is the same conversation
  const json parts = json::array(
      {{{"role", "system"}, {"content", json::array({{{"type", "text"}, {"text", "Be brief."}}})}},
       {{"role", "user"}, {"content", "Hi there"}}});
  auto q = post(*chat_, "/v1/chat/completions", chat_body(parts, 12).dump());
  ASSERT_EQ(q.status, 200) << q.raw;
  EXPECT_EQ(ids_of(q.body["choices"][0]), ids_of(c));
}

TEST_F(ServeChat, StreamEqualsNonStream) {
  const json messages = json::array({{{"role", "user"}, {"content", "Tell me a story"}}});
  auto whole = post(*chat_, "/v1/chat/completions", chat_body(messages, 16).dump());
  ASSERT_EQ(whole.status, 200) << whole.raw;
  auto r = post(
      *chat_, "/v1/chat/completions",
      chat_body(messages, 16, {{"stream", true}, {"stream_options", {{"include_usage", true}}}})
          .dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  bool done = false;
  auto events = sse(r.raw, &done);
  EXPECT_TRUE(done);
  ASSERT_GT(events.size(), 3u) << r.raw;
  // the first chunk carries the role; then content deltas; the last choice chunk the reason
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  std::string text, finish;
  std::vector<int32_t> ids;
  json usage;
  std::set<std::string> chunk_ids;
  for (auto& e : events) {
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    chunk_ids.insert(e["id"].get<std::string>());
    if (e.contains("usage")) usage = e["usage"];
    for (auto& c : e["choices"]) {
      EXPECT_FALSE(c.contains("text"));
      if (c["delta"].contains("content")) text += c["delta"]["content"].get<std::string>();
      if (c.contains("token_ids"))
        for (auto id : c["token_ids"]) ids.push_back(id.get<int32_t>());
      if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
    }
  }
  EXPECT_EQ(chunk_ids.size(), 1u);
  EXPECT_EQ(text, whole.body["choices"][0]["message"]["content"]);
  EXPECT_EQ(ids, ids_of(whole.body["choices"][0]));
  EXPECT_EQ(finish, "length");
  EXPECT_EQ(usage["completion_tokens"], 16);
  EXPECT_EQ(usage["prompt_tokens"], whole.body["usage"]["prompt_tokens"]);
}

TEST_F(ServeChat, SamplingNAndLogprobs) {
  const json messages = json::array({{{"role", "user"}, {"content", "ab"}}});
  const json b = {{"messages", messages}, {"max_completion_tokens", 6},
                  {"temperature", 1.0},   {"n", 2},
                  {"seed", 11},           {"logprobs", true},
                  {"top_logprobs", 2},    {"ignore_eos", true}};
  auto x = post(*chat_, "/v1/chat/completions", b.dump());
  auto y = post(*chat_, "/v1/chat/completions", b.dump());
  ASSERT_EQ(x.status, 200) << x.raw;
  ASSERT_EQ(x.body["choices"].size(), 2u);
  EXPECT_EQ(x.body["usage"]["completion_tokens"], 12);
  for (size_t i = 0; i < 2; ++i) {
    const json& c = x.body["choices"][i];
    EXPECT_EQ(c["index"], i);
    EXPECT_EQ(ids_of(c), ids_of(y.body["choices"][i])) << "seeded: reproducible";
    const json& lp = c["logprobs"]["content"];
    ASSERT_EQ(lp.size(), 6u) << c.dump();
    for (auto& t : lp) {
      EXPECT_LE(t["logprob"].get<double>(), 0.0);
      EXPECT_EQ(t["top_logprobs"].size(), 2u);
      EXPECT_TRUE(t["bytes"].is_array());
      EXPECT_EQ(t["token"].get<std::string>().size(), t["bytes"].size());
    }
  }
}

TEST_F(ServeChat, ErrorsNameTheField) {
  auto p = [&](const json& b) { return post(*chat_, "/v1/chat/completions", b.dump()); };
  const json ok = json::array({{{"role", "user"}, {"content", "hi"}}});
  expect_error(post(*chat_, "/v1/chat/completions", "{nope"), 400, "", "invalid JSON");
  expect_error(p(json::array()), 400, "", "not an object");
  expect_error(p({{"max_tokens", 2}}), 400, "messages", "no messages");
  expect_error(p({{"messages", json::array()}}), 400, "messages", "empty messages");
  expect_error(p({{"messages", "hi"}}), 400, "messages", "messages a string");
  expect_error(p({{"messages", json::array({{{"content", "x"}}})}}), 400, "messages", "no role");
  expect_error(p({{"messages", json::array({{{"role", "user"}}})}}), 400, "messages", "no content");
  expect_error(p({{"messages", json::array({{{"role", "user"}, {"content", 5}}})}}), 400,
               "messages", "content a number");
  expect_error(p({{"messages",
                   json::array({{{"role", "user"},
                                 {"content", json::array({{{"type", "image_url"},
                                                           {"image_url", {{"url", "x"}}}}})}}})}}),
               400, "messages", "an image part");
  // the template's own raise_exception, with its message
  auto r = p({{"messages", json::array({{{"role", "wizard"}, {"content", "x"}}})}});
  expect_error(r, 400, "messages", "template raise_exception");
  EXPECT_NE(r.raw.find("Unknown role: wizard"), std::string::npos) << r.raw;
  EXPECT_EQ(r.body["error"]["code"], "chat_template_error");
  // the sampling fields, as in /v1/completions
  expect_error(p(chat_body(ok, 2, {{"temperature", "hot"}})), 400, "temperature", "type");
  expect_error(p(chat_body(ok, 2, {{"top_p", 2}})), 400, "top_p", "range");
  expect_error(p(chat_body(ok, 2, {{"n", 0}})), 400, "n", "n = 0");
  expect_error(p(chat_body(ok, 2, {{"stop", 5}})), 400, "stop", "stop type");
  expect_error(p(chat_body(ok, 2, {{"max_completion_tokens", -1}})), 400, "max_completion_tokens",
               "negative max_completion_tokens");
  expect_error(p(chat_body(ok, -1)), 400, "max_tokens", "negative max_tokens");
  expect_error(p(chat_body(ok, 2, {{"logprobs", 3}})), 400, "logprobs", "logprobs not a bool");
  expect_error(p(chat_body(ok, 2, {{"top_logprobs", 2}})), 400, "top_logprobs",
               "top_logprobs without logprobs");
  expect_error(p(chat_body(ok, 2, {{"logprobs", true}, {"top_logprobs", 21}})), 400, "top_logprobs",
               "top_logprobs range");
  expect_error(p(chat_body(ok, 2, {{"tools", json::array({{{"type", "function"}}})}})), 400,
               "tools", "tools");
  expect_error(p(chat_body(ok, 2, {{"response_format", {{"type", "json_object"}}}})), 400,
               "response_format", "json mode");
  expect_error(p(chat_body(ok, 2, {{"model", "gpt-4"}})), 404, "model", "unknown model");
  // too long once rendered (the limit is on the rendered prompt's tokens)
  expect_error(
      p(chat_body(json::array({{{"role", "user"}, {"content", std::string(9000, 'a')}}}), 2)), 400,
      "messages", "too many tokens");
  // max_tokens 0 answers without generating
  auto z = p(chat_body(ok, 0));
  ASSERT_EQ(z.status, 200) << z.raw;
  EXPECT_EQ(z.body["choices"][0]["message"]["content"], "");
  EXPECT_EQ(z.body["usage"]["completion_tokens"], 0);
  EXPECT_EQ(get(*chat_, "/health").status, 200);
}

TEST_F(ServeChat, OfficialOpenAINodeClient) {
  int rc = 0;
  sh("command -v node && command -v npm", &rc);
  if (rc != 0) GTEST_SKIP() << "node / npm not installed: the openai client test is skipped";
  const fs::path dir = fs::temp_directory_path() / "mamba_serve_openai_npm";
  fs::create_directories(dir);
  if (!fs::exists(dir / "node_modules" / "openai" / "package.json")) {
    const std::string out = sh("cd '" + dir.string() +
                                   "' && timeout 120 npm install --no-audit --no-fund "
                                   "--loglevel=error openai@4",
                               &rc);
    if (rc != 0) GTEST_SKIP() << "npm could not install the openai package (no network?): " << out;
  }
  fs::copy_file(fs::path(MAMBA_SERVE_SCRIPTS) / "openai_chat_client.mjs", dir / "chat_client.mjs",
                fs::copy_options::overwrite_existing);
  const std::string out = sh("cd '" + dir.string() + "' && BASE_URL=" + chat_->url() +
                                 "/v1 MODEL=lm_mamba1_chat timeout 60 node chat_client.mjs",
                             &rc);
  ASSERT_EQ(rc, 0) << out;
  json j = json::parse(out.substr(out.find('{')), nullptr, false);
  ASSERT_TRUE(j.is_object()) << out;
  // the client's answer equals ours for the same request
  const json messages = json::array({{{"role", "system"}, {"content", "You are terse."}},
                                     {{"role", "user"}, {"content", "Say something"}}});
  auto r = post(*chat_, "/v1/chat/completions", chat_body(messages, 10).dump());
  ASSERT_EQ(r.status, 200);
  EXPECT_EQ(j["content"], r.body["choices"][0]["message"]["content"]);
  EXPECT_EQ(j["finish"], "length");
  EXPECT_EQ(j["status"], 400);
  EXPECT_GT(j["chunks"].get<int>(), 2);
}

TEST(ServeChatTemplate, UnusableTemplatesAreReported) {
  // a folder whose template uses a construct the renderer does not support: the server starts,
  // says why chat is off, answers 501 naming the construct, and completions still work
  const fs::path d = scratch() / "lm_mamba1_macro";
  fs::create_directories(d);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
    fs::copy_file(fs::path(chat_model_dir()) / f, d / f, fs::copy_options::overwrite_existing);
  std::ofstream(d / "tokenizer_config.json")
      << json{{"chat_template", "{% macro turn(m) %}{{ m.content }}{% endmacro %}"}}.dump();
  ServerProc s;
  s.start("", d.string());
  EXPECT_NE(s.read_log().find("/v1/chat/completions: off (501)"), std::string::npos)
      << s.read_log();
  auto r = post(s, "/v1/chat/completions",
                chat_body(json::array({{{"role", "user"}, {"content", "x"}}}), 2).dump());
  expect_error(r, 501, "", "unsupported template");
  EXPECT_EQ(r.body["error"]["code"], "chat_template_unsupported");
  EXPECT_NE(r.raw.find("macro"), std::string::npos) << r.raw;
  EXPECT_NE(r.raw.find("line 1, column 1"), std::string::npos) << r.raw;
  EXPECT_EQ(post(s, "/v1/completions", completion_body("ab", 2).dump()).status, 200);
  EXPECT_EQ(s.stop(), 0) << s.read_log();

  // --chat-template FILE: a good one turns chat on for the base folder (no template of its own)
  const fs::path good = scratch() / "chatml.jinja", broken = scratch() / "broken.jinja";
  std::ofstream(good) << kChatML;
  std::ofstream(broken) << "{% for m in messages %}{{ m.content | wordwrap }}{% endfor %}";
  ServerProc t;
  t.start("--chat-template '" + good.string() + "'");
  auto c = post(t, "/v1/chat/completions",
                chat_body(json::array({{{"role", "user"}, {"content", "x"}}}), 3).dump());
  EXPECT_EQ(c.status, 200) << c.raw;
  EXPECT_EQ(t.stop(), 0) << t.read_log();
  // a broken --chat-template is an error at start, naming the construct and where it is
  auto bad_start = mamba::test::run_cli("serve --model \"" + model_dir() +
                                        "\" --port 0 --chat-template \"" + broken.string() + "\"");
  EXPECT_NE(bad_start.status, 0);
  EXPECT_NE(bad_start.out.find("filter 'wordwrap'"), std::string::npos) << bad_start.out;
  EXPECT_NE(bad_start.out.find("line 1, column 37"), std::string::npos) << bad_start.out;
}

// ---- the engine itself (no HTTP): batched prefill and the block-boundary cache ---------------

struct SeqRun {
  std::vector<int32_t> ids;
  int64_t cached = 0;
};

// Waits for the sequence to finish; its ids and the prompt tokens it took from the cache.
SeqRun finish_ids(const std::shared_ptr<mamba::serve::Sequence>& seq) {
  std::vector<mamba::serve::TokenEvent> ev;
  while (seq->wait(ev, std::chrono::milliseconds(100)) == mamba::serve::Finish::running) {
  }
  SeqRun r;
  for (auto& e : ev) r.ids.push_back(e.id);
  r.cached = seq->cached_tokens();
  return r;
}

mamba::serve::SeqRequest greedy_request(const std::vector<int32_t>& prompt, int64_t n) {
  mamba::serve::SeqRequest r;
  r.prompt = prompt;
  r.max_tokens = n;
  r.sampling.greedy = true;
  r.vocab_limit = 101;
  return r;
}

std::vector<int32_t> random_prompt(size_t n, uint64_t seed) {
  mamba::Rng rng(seed);
  std::vector<int32_t> p(n);
  for (auto& t : p) t = static_cast<int32_t>(1 + rng.below(100));
  return p;
}

std::vector<int32_t> generate_ids(const mamba::MambaLM& lm, const std::vector<int32_t>& prompt,
                                  int64_t n) {
  mamba::GenerateOptions g;
  g.max_new_tokens = n, g.sampling.greedy = true, g.vocab_limit = 101;
  return mamba::generate(lm, {prompt}, g).tokens[0];
}

TEST(ServeEngine, PrefixCacheBlockBoundariesGiveTheSameIds) {
  const mamba::MambaLM lm = mamba::MambaLM::load(model_dir());
  mamba::serve::EngineOptions with;
  with.prefix_cache_bytes = 64 << 20, with.prefill_chunk = 3, with.cache_block = 8;
  mamba::serve::EngineOptions without = with;
  without.prefix_cache_bytes = 0;
  mamba::serve::Engine cached(lm, with), plain(lm, without);
  const std::vector<int32_t> P = random_prompt(21, 1);  // boundaries at 8 and 16, end at 21
  auto extend = [&](size_t keep, const std::vector<int32_t>& more) {
    std::vector<int32_t> q(P.begin(), P.begin() + static_cast<std::ptrdiff_t>(keep));
    q.insert(q.end(), more.begin(), more.end());
    return q;
  };
  struct Case {
    const char* what;
    std::vector<int32_t> prompt;
    int64_t cached;  // prompt tokens taken from the cache
  };
  const std::vector<Case> cases = {
      {"miss (fills the cache)", P, 0},
      {"exact hit", P, 21},
      {"boundary hit: shares 19 tokens, continues from 16", extend(19, {7, 8, 9, 10}), 16},
      {"partial hit: extends the prompt", extend(21, {5, 6, 7, 8, 9}), 21},
      {"boundary hit inside the extension's own first block", extend(10, {90}), 8},
      {"prompt = a boundary (no logits there): continues from the boundary before", extend(16, {}),
       8},
      {"shares 5 tokens: below the first boundary, a miss", extend(5, {3, 3, 3}), 0},
  };
  for (const auto& c : cases) {
    SeqRun a = finish_ids(cached.submit({greedy_request(c.prompt, 10)})[0]);
    SeqRun b = finish_ids(plain.submit({greedy_request(c.prompt, 10)})[0]);
    ASSERT_EQ(a.ids.size(), 10u) << c.what;
    EXPECT_EQ(a.ids, b.ids) << c.what;
    EXPECT_EQ(a.cached, c.cached) << c.what;
    EXPECT_EQ(b.cached, 0) << c.what;
    EXPECT_EQ(a.ids, generate_ids(lm, c.prompt, 10)) << c.what;
  }
  // the boundary at 16 gained its logits when the prompt ending there ran: now an exact hit
  EXPECT_EQ(finish_ids(cached.submit({greedy_request(extend(16, {}), 10)})[0]).cached, 16);
  const auto m = cached.metrics();
  EXPECT_GE(m.cache_entries, 4);
  EXPECT_LE(m.cache_bytes, with.prefix_cache_bytes);
  EXPECT_EQ(plain.metrics().cache_entries, 0);
}

TEST(ServeEngine, PromptsPrefilledTogetherGiveTheirOwnIds) {
  const mamba::MambaLM lm = mamba::MambaLM::load(model_dir());
  // Submitted at once, the prompts are prefilled together: rows leave as their prompt ends.
  std::vector<std::vector<int32_t> > prompts;
  for (size_t n : {7, 12, 7, 7, 12, 7}) prompts.push_back(random_prompt(n, 10 + prompts.size()));
  std::vector<mamba::serve::SeqRequest> reqs;
  for (const auto& p : prompts) reqs.push_back(greedy_request(p, 6));
  mamba::serve::EngineOptions o;
  o.max_batch = 8, o.prefill_chunk = 3, o.prefill_batch_tokens = 64;
  {
    mamba::serve::Engine e(lm, o);
    auto seqs = e.submit(reqs);
    for (size_t i = 0; i < prompts.size(); ++i)
      EXPECT_EQ(finish_ids(seqs[i]).ids, generate_ids(lm, prompts[i], 6)) << "prompt " << i;
    // one call for the six rows up to 7 tokens, one for the two left (not one per prompt)
    EXPECT_EQ(e.metrics().prefill_calls, 2);
    EXPECT_EQ(e.metrics().prefill_tokens, 4 * 7 + 2 * 12);
  }
  // With the cache (blocks of 4) and a budget of 8 tokens per chunk: groups of at most 2-3 rows,
  // segments cut at the block boundaries; a second round takes every prompt from the cache.
  o.prefill_batch_tokens = 8, o.prefix_cache_bytes = 64 << 20, o.cache_block = 4;
  prompts.push_back(random_prompt(1, 30));
  prompts.push_back(random_prompt(5, 31));
  reqs.push_back(greedy_request(prompts[6], 6));
  reqs.push_back(greedy_request(prompts[7], 6));
  mamba::serve::Engine e(lm, o);
  for (int round = 0; round < 2; ++round) {
    auto seqs = e.submit(reqs);
    for (size_t i = 0; i < prompts.size(); ++i) {
      SeqRun r = finish_ids(seqs[i]);
      EXPECT_EQ(r.ids, generate_ids(lm, prompts[i], 6)) << "round " << round << " prompt " << i;
      if (round == 1) {
        EXPECT_EQ(r.cached, static_cast<int64_t>(prompts[i].size())) << i;
      }
    }
  }
}

}  // namespace
#endif
