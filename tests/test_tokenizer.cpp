// Tokenizer: the GPT-2 split, byte-level BPE by rank, added tokens, NFC, decode, hostile
// tokenizer.json files, the Hugging Face golden ids for GPT-NeoX-20B, and the CLI.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "mamba/error.h"
#include "mamba/tokenizer.h"
#include "test_util.h"

namespace mamba {
namespace {

using Ids = std::vector<int32_t>;
using nlohmann::json;

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}
const std::string& tiny_text() {
  static const std::string s = read_text(test::data_path("tokenizer/tiny_bpe_tokenizer.json"));
  return s;
}
const Tokenizer& tiny() {
  static const Tokenizer t =
      Tokenizer::from_file(test::data_path("tokenizer/tiny_bpe_tokenizer.json"));
  return t;
}
std::string neox_path() { return test::shared_path("tokenizers/gpt-neox-20b-tokenizer.json"); }
const Tokenizer& neox() {
  static const Tokenizer t = Tokenizer::from_file(neox_path());
  return t;
}
#define NEED_NEOX()                                                                          \
  if (neox_path().empty())                                                                   \
  GTEST_SKIP() << "../shared/tokenizers/gpt-neox-20b-tokenizer.json is absent (it is data, " \
                  "never committed); the GPT-NeoX tests need it"

std::filesystem::path temp_dir() {
  auto d =
      std::filesystem::temp_directory_path() / ("mamba_tok_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(d);
  return d;
}

// Random valid UTF-8 drawn from ASCII, spaces, Latin with combining marks, CJK, emoji...
std::string random_text(std::mt19937& rng, int max_chars) {
  static const std::vector<std::pair<char32_t, char32_t>> ranges = {
      {0x20, 0x7E},     {0x20, 0x20},     {0x09, 0x0D},       {0xA0, 0x17F},
      {0x300, 0x36F},   {0x391, 0x3C9},   {0x410, 0x44F},     {0x600, 0x64A},
      {0x3040, 0x30FF}, {0x4E00, 0x9FFF}, {0xAC00, 0xD7A3},   {0x1F300, 0x1F6FF},
      {0x2000, 0x206F}, {0xFFF0, 0xFFFD}, {0x10000, 0x10FFFF}};
  std::string s;
  const int n = std::uniform_int_distribution<int>(0, max_chars)(rng);
  for (int i = 0; i < n; ++i) {
    auto [lo, hi] = ranges[std::uniform_int_distribution<size_t>(0, ranges.size() - 1)(rng)];
    char32_t cp = std::uniform_int_distribution<uint32_t>(lo, hi)(rng);
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 'x';
    // append as UTF-8
    if (cp < 0x80)
      s += char(cp);
    else if (cp < 0x800)
      s += char(0xC0 | (cp >> 6)), s += char(0x80 | (cp & 0x3F));
    else if (cp < 0x10000)
      s += char(0xE0 | (cp >> 12)), s += char(0x80 | ((cp >> 6) & 0x3F)),
          s += char(0x80 | (cp & 0x3F));
    else
      s += char(0xF0 | (cp >> 18)), s += char(0x80 | ((cp >> 12) & 0x3F)),
          s += char(0x80 | ((cp >> 6) & 0x3F)), s += char(0x80 | (cp & 0x3F));
  }
  return s;
}

// ---- the GPT-2 split ----------------------------------------------------------------------

TEST(TokenizerSplit, MatchesTheRegex) {
  // Expected splits from Python's `regex` module with the GPT-2 pattern.
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"I'm  here\n\n now's", {"I", "'m", " ", " here", "\n\n", " now", "'s"}},
      {"x  = 42;\t\ty", {"x", " ", " =", " 42", ";", "\t", "\t", "y"}},
      {"He'LL 'll ''s", {"He", "'", "LL", " '", "ll", " ''", "s"}},
      {"  ", {"  "}},
      {"a\u3000b\u00a0 c", {"a", "\u3000", "b", "\u00a0", " c"}},
      {"\u65e5\u672c\u8a9e 123 \u00b2\u00b3 \u216b",
       {"\u65e5\u672c\u8a9e", " 123", " \u00b2\u00b3", " \u216b"}},
      {" !? ...a", {" !?", " ...", "a"}},
      {"end   ", {"end", "   "}},
      {"we're they've you'd", {"we", "'re", " they", "'ve", " you", "'d"}},
      {"", {}},
  };
  for (const auto& [text, want] : cases) EXPECT_EQ(Tokenizer::split_words(text), want) << text;
}

TEST(TokenizerSplit, CoversTheTextExactly) {
  std::mt19937 rng(7);
  for (int t = 0; t < 300; ++t) {
    const std::string s = random_text(rng, 40);
    std::string joined;
    for (const auto& w : Tokenizer::split_words(s)) {
      EXPECT_FALSE(w.empty());
      joined += w;
    }
    EXPECT_EQ(joined, s);
  }
}

TEST(TokenizerSplit, InvalidUtf8Throws) {
  EXPECT_THROW(Tokenizer::split_words("ab\xC3"), Error);
  EXPECT_THROW(Tokenizer::split_words("\xED\xA0\x80"), Error);  // surrogate
  EXPECT_THROW(Tokenizer::split_words("\xC0\xAF"), Error);      // overlong
}

// ---- the tiny hand-made tokenizer ------------------------------------------------------------

TEST(TokenizerTiny, EncodeByHand) {
  const Tokenizer& t = tiny();
  // Byte ids are the byte values; merges are ids 256.. in rank order (see
  // tests/data/tokenizer/README.md).
  EXPECT_EQ(t.encode("the lower"), (Ids{'t', 257, ' ', 262}));  // " lower" -> Ġ + lower, by rank
  EXPECT_EQ(t.encode(" the"), (Ids{258}));
  EXPECT_EQ(t.encode(" low"), (Ids{263}));
  EXPECT_EQ(t.encode("lowlow"), (Ids{260, 260}));
  EXPECT_EQ(t.encode("a  b"), (Ids{'a', 265, 'b'}));  // normalised added token "  "
  EXPECT_EQ(t.encode("   "), (Ids{265, ' '}));        // leftmost-longest
  EXPECT_EQ(t.encode("x<|endoftext|>y"), (Ids{'x', 264, 'y'}));
  EXPECT_EQ(t.encode("<|endoftext|><|endoftext|>"), (Ids{264, 264}));
  EXPECT_EQ(t.encode("<|endoftext"), (Ids{'<', '|', 'e', 'n', 'd', 'o', 'f', 't', 'e', 'x', 't'}));
  EXPECT_EQ(t.encode("hi \t<mask>"), (Ids{'h', 'i', 266}));  // lstrip eats the whitespace
  EXPECT_EQ(t.encode("e\xCC\x81"), (Ids{0xC3, 0xA9}));       // NFC: e + U+0301 -> U+00E9
  EXPECT_EQ(t.encode(""), Ids{});
  EXPECT_EQ(t.encode("the", /*add_special_tokens=*/true), (Ids{'t', 257}));  // ByteLevel adds none
}

TEST(TokenizerTiny, Metadata) {
  const Tokenizer& t = tiny();
  EXPECT_EQ(t.vocab_size(), 267u);
  ASSERT_TRUE(t.eos_id().has_value());
  EXPECT_EQ(*t.eos_id(), 264);
  EXPECT_EQ(t.token_to_id("\xC4\xA0the"), 258);  // "Ġthe"
  EXPECT_EQ(t.token_to_id("<mask>"), 266);
  EXPECT_EQ(t.id_to_token(262), "lower");
  EXPECT_FALSE(t.find_token("nope").has_value());
  EXPECT_THROW(t.token_to_id("nope"), Error);
  EXPECT_THROW(t.id_to_token(267), Error);
  EXPECT_THROW(t.id_to_token(-1), Error);
  EXPECT_TRUE(t.is_special(264));
  EXPECT_FALSE(t.is_special(265));
  EXPECT_EQ(t.token_bytes(265), "  ");
  EXPECT_EQ(t.token_bytes(258), " the");
}

TEST(TokenizerTiny, Decode) {
  const Tokenizer& t = tiny();
  EXPECT_EQ(t.decode({'t', 257, ' ', 262}), "the lower");
  EXPECT_EQ(t.decode({'a', 265, 'b', 264}), "a  b<|endoftext|>");
  EXPECT_EQ(t.decode({'a', 264, 'b'}, /*skip_special_tokens=*/true), "ab");
  EXPECT_EQ(t.decode({'a', 9999, -5, 'b'}), "ab");  // ids with no token are skipped
  EXPECT_EQ(t.decode({0xF0, 0x9F, 0x98, 'a'}),
            "\xEF\xBF\xBD"
            "a");  // cut emoji -> one U+FFFD
  EXPECT_EQ(t.decode({}), "");
}

TEST(TokenizerTiny, RoundTripRandomText) {
  const Tokenizer& t = tiny();
  std::mt19937 rng(1234);
  for (int i = 0; i < 400; ++i) {
    const std::string s = random_text(rng, 30);
    EXPECT_EQ(t.decode(t.encode(s)), Tokenizer::nfc(s)) << "case " << i;
  }
}

TEST(TokenizerTiny, InvalidUtf8TextThrows) {
  EXPECT_THROW(tiny().encode("abc\xFF"), Error);
  EXPECT_THROW(tiny().encode("\xE4\xB8"), Error);
}

TEST(TokenizerTiny, MergesAsArraysGiveTheSameIds) {
  json j = json::parse(tiny_text());
  json arr = json::array();
  for (const auto& m : j["model"]["merges"]) {
    const std::string s = m.get<std::string>();
    arr.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
  }
  j["model"]["merges"] = arr;
  const Tokenizer t2 = Tokenizer::from_json_string(j.dump(), "arrays");
  for (const char* s : {"the lower", " the lowlow", "a  b<|endoftext|>"})
    EXPECT_EQ(t2.encode(s), tiny().encode(s)) << s;
}

TEST(TokenizerTiny, TemplatePostProcessor) {
  json j = json::parse(tiny_text());
  j["post_processor"] = json::parse(R"({"type":"TemplateProcessing",
    "single":[{"SpecialToken":{"id":"<mask>","type_id":0}},{"Sequence":{"id":"A","type_id":0}},
              {"SpecialToken":{"id":"<|endoftext|>","type_id":0}}],
    "pair":[], "special_tokens":{"<mask>":{"id":"<mask>","ids":[266],"tokens":["<mask>"]},
              "<|endoftext|>":{"id":"<|endoftext|>","ids":[264],"tokens":["<|endoftext|>"]}}})");
  const Tokenizer t2 = Tokenizer::from_json_string(j.dump(), "template");
  EXPECT_EQ(t2.encode("the", true), (Ids{266, 't', 257, 264}));
  EXPECT_EQ(t2.encode("the", false), (Ids{'t', 257}));
}

TEST(TokenizerTiny, AddPrefixSpace) {
  json j = json::parse(tiny_text());
  j["pre_tokenizer"]["add_prefix_space"] = true;
  const Tokenizer t2 = Tokenizer::from_json_string(j.dump(), "prefix");
  EXPECT_EQ(t2.encode("the"), (Ids{258}));
  EXPECT_EQ(t2.encode(" the"), (Ids{258}));
}

TEST(TokenizerTiny, StreamDecoderHoldsBackSplitCharacters) {
  const Tokenizer& t = tiny();
  const std::string text = "a\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x98\x80 the end";  // aé中😀 the end
  const Ids ids = t.encode(text);
  TokenStreamDecoder sd(t);
  std::string all;
  for (int32_t id : ids) {
    const std::string piece = sd.push(id);
    EXPECT_EQ(utf8_lossy(piece), piece) << "a piece holds a broken character";
    all += piece;
  }
  all += sd.flush();
  EXPECT_EQ(all, text);
  TokenStreamDecoder sd2(t);
  EXPECT_EQ(sd2.push(0xF0), "");
  EXPECT_EQ(sd2.push('a'),
            "\xEF\xBF\xBD"
            "a");  // the cut character is replaced, not lost silently
  EXPECT_EQ(sd2.flush(), "");
}

TEST(TokenizerText, Utf8LossyAndNfc) {
  EXPECT_EQ(utf8_lossy("ok"), "ok");
  EXPECT_EQ(utf8_lossy("\xF0\x9F\x98"
                       "a"),
            "\xEF\xBF\xBD"
            "a");
  EXPECT_EQ(utf8_lossy("\xC0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(utf8_lossy("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  EXPECT_EQ(utf8_lossy("\xFF"), "\xEF\xBF\xBD");
  EXPECT_EQ(Tokenizer::nfc("Cafe\xCC\x81"), "Caf\xC3\xA9");
  EXPECT_EQ(Tokenizer::nfc("\xEF\xAC\x81"),
            "\xEF\xAC\x81");  // the fi ligature is NFKC's business, not NFC's
  EXPECT_THROW(Tokenizer::nfc("\xFF"), Error);
}

// ---- hostile tokenizer.json files ---------------------------------------------------------------

void expect_error(const std::string& text, const std::string& needle, const std::string& label) {
  try {
    Tokenizer::from_json_string(text, "bad.json");
    ADD_FAILURE() << label << ": loaded without error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << label << ": message '" << e.what() << "' lacks '" << needle << "'";
  } catch (const std::exception& e) {
    ADD_FAILURE() << label << ": threw a non-mamba exception: " << e.what();
  }
}

TEST(TokenizerHostile, MalformedFilesGiveClearErrors) {
  const json base = json::parse(tiny_text());
  auto with = [&](auto edit) {
    json j = base;
    edit(j);
    return j.dump();
  };
  expect_error("", "not valid JSON", "empty");
  expect_error("{\"model\": " + std::string(300000, '[') + std::string(300000, ']') + "}",
               "nested deeper than 256", "deep");
  expect_error("{\"model\": {", "not valid JSON", "truncated");
  expect_error("[1,2]", "top level", "array");
  expect_error(with([](json& j) { j.erase("model"); }), "missing field 'model'", "no model");
  expect_error(with([](json& j) { j["model"] = 3; }), "'model' must be an object", "model number");
  expect_error(with([](json& j) { j["model"]["type"] = "WordPiece"; }), "model type 'WordPiece'",
               "unknown model");
  expect_error(with([](json& j) { j["model"].erase("vocab"); }), "missing field 'model.vocab'",
               "no vocab");
  expect_error(with([](json& j) { j["model"].erase("merges"); }), "missing field 'model.merges'",
               "no merges");
  expect_error(with([](json& j) { j["model"]["merges"] = "a b"; }),
               "'model.merges' must be an array", "merges str");
  expect_error(with([](json& j) { j["model"]["merges"][0] = "abc"; }), "model.merges[0]",
               "merge no space");
  expect_error(with([](json& j) { j["model"]["merges"][0] = "a b c"; }), "model.merges[0]",
               "merge 3 parts");
  expect_error(with([](json& j) { j["model"]["merges"][1] = 5; }), "model.merges[1]",
               "merge number");
  expect_error(with([](json& j) { j["model"]["merges"][1] = json::array({"a"}); }),
               "model.merges[1]", "merge 1-array");
  expect_error(with([](json& j) { j["model"]["merges"][2] = "a qq"; }),
               "'qq' is not in model.vocab", "merge oov");
  expect_error(with([](json& j) { j["model"]["merges"][2] = "q q"; }), "'qq' is not in model.vocab",
               "merge result oov");
  expect_error(with([](json& j) { j["model"]["vocab"]["a"] = -1; }), "out of range", "negative id");
  expect_error(with([](json& j) { j["model"]["vocab"]["a"] = 1e12; }), "must be an integer",
               "float id");
  expect_error(with([](json& j) { j["model"]["vocab"]["a"] = 4000000000000ll; }), "out of range",
               "huge id");
  expect_error(with([](json& j) { j["model"]["vocab"]["a"] = "1"; }), "must be an integer",
               "string id");
  expect_error(with([](json& j) { j["model"]["vocab"]["a"] = 98; }), "is given to both",
               "duplicate id");
  expect_error(with([](json& j) { j["model"]["unk_token"] = "<unk>"; }), "'model.unk_token'",
               "unk oov");
  expect_error(with([](json& j) { j["model"]["dropout"] = 0.1; }), "dropout", "dropout");
  expect_error(with([](json& j) { j["model"]["byte_fallback"] = "yes"; }),
               "'model.byte_fallback' must be true or false", "flag type");
  expect_error(with([](json& j) { j["added_tokens"][0].erase("content"); }),
               "added_tokens[0].content", "added no content");
  expect_error(with([](json& j) { j["added_tokens"][1]["content"] = ""; }),
               "added_tokens[1].content' is empty", "added empty");
  expect_error(with([](json& j) { j["added_tokens"][1].erase("id"); }), "added_tokens[1].id",
               "added no id");
  expect_error(with([](json& j) { j["added_tokens"] = json::object(); }),
               "'added_tokens' must be an array", "added object");
  expect_error(with([](json& j) {
                 j["normalizer"] = {{"type", "Lowercase"}};
               }),
               "normalizer type 'Lowercase'", "normalizer");
  expect_error(with([](json& j) {
                 j["normalizer"] = {{"kind", "NFC"}};
               }),
               "missing field 'normalizer.type'", "normalizer no type");
  expect_error(with([](json& j) {
                 j["normalizer"] = {{"type", "Sequence"}, {"normalizers", 1}};
               }),
               "normalizers' must be an array", "norm seq");
  expect_error(with([](json& j) {
                 j["pre_tokenizer"] = {{"type", "Whitespace"}};
               }),
               "pre_tokenizer type 'Whitespace'", "pre");
  expect_error(with([](json& j) { j["pre_tokenizer"] = nullptr; }), "'pre_tokenizer' is missing",
               "pre null");
  expect_error(with([](json& j) {
                 j["decoder"] = {{"type", "WordPiece"}};
               }),
               "decoder type 'WordPiece'", "decoder");
  expect_error(with([](json& j) {
                 j["post_processor"] = {{"type", "Nope"}};
               }),
               "post_processor type 'Nope'", "post");
  expect_error(with([](json& j) { j["post_processor"] = 7; }), "'post_processor' must be an object",
               "post number");
  // Deep nesting must not blow the stack: refused while parsing (it used to parse, then fail as
  // "the top level must be a JSON object").
  expect_error(std::string(200000, '[') + std::string(200000, ']'), "nested deeper than 256",
               "deep nesting");
}

TEST(TokenizerHostile, MissingFilesAndFolders) {
  EXPECT_THROW(Tokenizer::from_file("/nonexistent/tokenizer.json"), Error);
  const auto dir = temp_dir() / "empty_model";
  std::filesystem::create_directories(dir);
  try {
    Tokenizer::from_model_dir(dir.string());
    ADD_FAILURE() << "no error for a folder without tokenizer.json";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--tokenizer"), std::string::npos) << e.what();
  }
  EXPECT_THROW(Tokenizer::from_file(dir.string()), Error);  // a folder, not a file
}

TEST(TokenizerHostile, EveryTruncationAndRandomByteFlipsNeverCrash) {
  const std::string& s = tiny_text();
  const size_t end = s.rfind('}');  // the prefix up to here is the whole JSON document
  for (size_t n = 0; n < end; ++n)
    EXPECT_THROW(Tokenizer::from_json_string(s.substr(0, n), "cut"), Error) << n;
  std::mt19937 rng(99);
  int loaded = 0;
  for (int k = 0; k < 1500; ++k) {
    std::string m = s;
    const int flips =
        1 + k % 3;  // printable ASCII keeps the JSON valid more often, reaching deeper checks
    for (int f = 0; f < flips; ++f)
      m[rng() % m.size()] = static_cast<char>(k % 2 ? 0x20 + rng() % 95 : rng() & 0xFF);
    try {
      Tokenizer t = Tokenizer::from_json_string(m, "flipped");
      ++loaded;
      (void)t.decode(t.encode("the lower  <|endoftext|> \xC3\xA9"));
    } catch (const Error&) {
    }
  }
  std::printf(
      "[ info ] %d of 1500 byte-flipped files still loaded (and encoded without crashing)\n",
      loaded);
}

// ---- GPT-NeoX-20B: Hugging Face's ids ---------------------------------------------------------

TEST(TokenizerNeox, GoldenIdsFromHuggingFace) {
  NEED_NEOX();
  const Tokenizer& t = neox();
  EXPECT_EQ(t.vocab_size(), 50277u);
  ASSERT_TRUE(t.eos_id().has_value());
  EXPECT_EQ(*t.eos_id(), 0);
  const json cases = json::parse(read_text(test::golden_path("tokenizer_gpt_neox_cases.json")));
  ASSERT_GE(cases.size(), 20u);
  for (const auto& c : cases) {
    const std::string text = c["text"].get<std::string>();
    const Ids want = c["ids"].get<Ids>();
    EXPECT_EQ(t.encode(text), want) << "text: " << text;
    EXPECT_EQ(t.decode(t.encode(text)), Tokenizer::nfc(text)) << "round trip: " << text;
    EXPECT_EQ(t.decode(want), Tokenizer::nfc(text)) << "decode of HF ids: " << text;
  }
}

TEST(TokenizerNeox, RoundTripRandomTextAndSpeed) {
  NEED_NEOX();
  const Tokenizer& t = neox();
  std::mt19937 rng(42);
  for (int i = 0; i < 300; ++i) {
    const std::string s = random_text(rng, 60);
    EXPECT_EQ(t.decode(t.encode(s)), Tokenizer::nfc(s)) << "case " << i;
  }
  // ~1 MB of varied text: the word cache must make this quick.
  const json cases = json::parse(read_text(test::golden_path("tokenizer_gpt_neox_cases.json")));
  std::string big;
  for (int rep = 0; big.size() < (1u << 20); ++rep)
    for (const auto& c : cases)
      big += c["text"].get<std::string>() + " " + std::to_string(rep) + "\n";
  const auto t0 = std::chrono::steady_clock::now();
  const Ids ids = t.encode(big);
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ info ] encoded %.2f MB into %zu tokens in %.3f s (%.1f MB/s)\n", big.size() / 1e6,
              ids.size(), sec, big.size() / 1e6 / sec);
  EXPECT_EQ(t.decode(ids), Tokenizer::nfc(big));
  EXPECT_LT(sec, 20.0);  // a sanity bound only (CI machines vary); typical figure is printed above
}

// ---- the CLI ---------------------------------------------------------------------------------

std::pair<int, std::string> run_cli(const std::string& args) {
  test::CliRun r = test::run_cli(args);
  return {r.status, r.out};
}

TEST(TokenizerCli, TokenizeAndDetokenize) {
  const std::string tok =
      "--tokenizer \"" + test::data_path("tokenizer/tiny_bpe_tokenizer.json") + "\"";
  auto [rc, out] = run_cli("tokenize " + tok + " --text 'the lower'");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(out, "[116,257,32,262]\n");

  const auto dir = temp_dir();
  const std::string in = (dir / "lines.txt").string();
  std::ofstream(in, std::ios::binary) << "the\n lower<|endoftext|>\n\nx";
  std::tie(rc, out) = run_cli("tokenize " + tok + " --jsonl --file \"" + in + "\"");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(out, "[116,257]\n[32,262,264]\n[]\n[120]\n");
  std::tie(rc, out) = run_cli("tokenize " + tok + " --file \"" + in + "\"");
  EXPECT_EQ(out, "[116,257,10,32,262,264,10,10,120]\n");

  std::tie(rc, out) = run_cli("detokenize " + tok + " --ids '[116,257,32,262,264]'");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(out, "the lower<|endoftext|>");
  std::tie(rc, out) = run_cli("detokenize " + tok + " --skip-special-tokens --ids '116 257 264'");
  EXPECT_EQ(out, "the");
  const std::string ids = (dir / "ids.jsonl").string();
  std::ofstream(ids, std::ios::binary) << "[116,257,10]\n[32,262]\n";
  std::tie(rc, out) = run_cli("detokenize " + tok + " --jsonl --file \"" + ids + "\"");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(out, "\"the\\n\"\n\" lower\"\n");

  // A model folder works through its tokenizer.json.
  const auto model = dir / "model";
  std::filesystem::create_directories(model);
  std::filesystem::copy_file(test::data_path("tokenizer/tiny_bpe_tokenizer.json"),
                             model / "tokenizer.json",
                             std::filesystem::copy_options::overwrite_existing);
  std::tie(rc, out) = run_cli("tokenize --model \"" + model.string() + "\" --text ' the'");
  EXPECT_EQ(out, "[258]\n");
}

TEST(TokenizerCli, ErrorsAreReportedNotCrashes) {
  const std::string tok =
      "--tokenizer \"" + test::data_path("tokenizer/tiny_bpe_tokenizer.json") + "\"";
  auto [rc, out] = run_cli("tokenize --tokenizer /nonexistent.json --text hi");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("error:"), std::string::npos) << out;
  std::tie(rc, out) = run_cli("detokenize " + tok + " --ids '[1,x]'");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("error:"), std::string::npos) << out;
  std::tie(rc, out) = run_cli("detokenize " + tok + " --ids '[-3]'");
  EXPECT_EQ(rc, 1);
  std::tie(rc, out) = run_cli("tokenize --text hi");
  EXPECT_EQ(rc, 1);
  EXPECT_NE(out.find("--tokenizer"), std::string::npos) << out;
}

TEST(TokenizerCli, NeoxGoldenThroughTheCli) {
  NEED_NEOX();
  const json cases = json::parse(read_text(test::golden_path("tokenizer_gpt_neox_cases.json")));
  const auto dir = temp_dir();
  const std::string in = (dir / "neox_lines.txt").string();
  std::string expect;
  {
    std::ofstream f(in, std::ios::binary);
    for (const auto& c : cases) {
      const std::string text = c["text"].get<std::string>();
      if (text.find('\n') != std::string::npos) continue;  // one case per line
      f << text << "\n";
      expect += json(c["ids"]).dump() + "\n";
    }
  }
  auto [rc, out] =
      run_cli("tokenize --tokenizer \"" + neox_path() + "\" --jsonl --file \"" + in + "\"");
  EXPECT_EQ(rc, 0) << out;
  EXPECT_EQ(out, expect);
}

}  // namespace
}  // namespace mamba
