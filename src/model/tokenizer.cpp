// tokenizer.json loading (hostile input: every field checked), byte-level BPE encode, decode.
#include "mamba/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <unordered_map>

#include "core/json_reader.h"
#include "core/os.h"
#include "mamba/error.h"
#include "model/tokenizer_text.h"

namespace mamba {

using nlohmann::json;

namespace {

constexpr int64_t kMaxId = int64_t(1) << 21;  // ids beyond 2M are refused (tables are per id)
constexpr uint64_t kMaxFileBytes = uint64_t(1) << 30;  // 1 GiB
constexpr size_t kCacheLimit = 1 << 18;                // words kept in the BPE cache
constexpr size_t kCacheMaxWord = 256;                  // longer words are not cached

struct StrHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StrMap = std::unordered_map<std::string, V, StrHash, std::equal_to<>>;

struct AddedToken {
  int32_t id = -1;
  std::string content;  // as matched (normalised when `normalized`)
  bool special = false, normalized = true, lstrip = false, rstrip = false, single_word = false;
};

// A byte trie over added-token contents: leftmost-longest matching.
struct Trie {
  struct Node {
    std::vector<std::pair<uint8_t, int32_t>> next;  // byte -> node
    int32_t token = -1;                             // index into added tokens
  };
  std::vector<Node> nodes{Node{}};
  void insert(std::string_view s, int32_t token) {
    int32_t cur = 0;
    for (char ch : s) {
      const auto b = static_cast<uint8_t>(ch);
      int32_t nx = -1;
      for (auto& [k, v] : nodes[cur].next)
        if (k == b) nx = v;
      if (nx < 0) {
        nx = static_cast<int32_t>(nodes.size());
        nodes[cur].next.emplace_back(b, nx);
        nodes.emplace_back();
      }
      cur = nx;
    }
    nodes[cur].token = token;
  }
  bool empty() const { return nodes.size() == 1; }
  // Longest match starting at s[i]: (token index, length) or (-1, 0).
  std::pair<int32_t, size_t> longest(std::string_view s, size_t i) const {
    int32_t cur = 0, best = -1;
    size_t best_len = 0;
    for (size_t j = i; j < s.size(); ++j) {
      const auto b = static_cast<uint8_t>(s[j]);
      int32_t nx = -1;
      for (auto& [k, v] : nodes[cur].next)
        if (k == b) nx = v;
      if (nx < 0) break;
      cur = nx;
      if (nodes[cur].token >= 0) best = nodes[cur].token, best_len = j + 1 - i;
    }
    return {best, best_len};
  }
};

std::string json_path(const std::string& parent, const std::string& key) {
  return parent.empty() ? key : parent + "." + key;
}

// Field accessors that name the field in their errors.
struct Reader {
  std::string origin;
  [[noreturn]] void fail(const std::string& msg) const { throw Error(origin + ": " + msg); }
  const json* find(const json& obj, const char* key) const {
    auto it = obj.find(key);
    return it == obj.end() ? nullptr : &*it;
  }
  const json& need(const json& obj, const char* key, const std::string& path) const {
    const json* v = find(obj, key);
    if (!v) fail("missing field '" + json_path(path, key) + "'");
    return *v;
  }
  const json& need_object(const json& obj, const char* key, const std::string& path) const {
    const json& v = need(obj, key, path);
    if (!v.is_object())
      fail("'" + json_path(path, key) + "' must be an object, got " + v.type_name());
    return v;
  }
  std::string str(const json& v, const std::string& path) const {
    if (!v.is_string()) fail("'" + path + "' must be a string, got " + v.type_name());
    return v.get<std::string>();
  }
  bool flag(const json& obj, const char* key, bool dflt, const std::string& path) const {
    const json* v = find(obj, key);
    if (!v || v->is_null()) return dflt;
    if (!v->is_boolean())
      fail("'" + json_path(path, key) + "' must be true or false, got " + v->type_name());
    return v->get<bool>();
  }
  int32_t id(const json& v, const std::string& path) const {
    if (!v.is_number_integer())
      fail("'" + path + "' must be an integer token id, got " + v.type_name());
    const int64_t x = v.is_number_unsigned()
                          ? static_cast<int64_t>(std::min<uint64_t>(v.get<uint64_t>(), kMaxId))
                          : v.get<int64_t>();
    if (x < 0 || x >= kMaxId)
      fail("'" + path + "' = " + v.dump() + " is out of range [0, " + std::to_string(kMaxId) + ")");
    return static_cast<int32_t>(x);
  }
  std::string type_of(const json& obj, const std::string& path) const {
    if (!obj.is_object()) fail("'" + path + "' must be an object or null, got " + obj.type_name());
    const json* t = find(obj, "type");
    if (!t) fail("missing field '" + json_path(path, "type") + "'");
    return str(*t, json_path(path, "type"));
  }
};

}  // namespace

struct Tokenizer::Impl {
  // Vocabulary: id -> token string (byte-level alphabet), token -> id, id -> decoded bytes.
  std::vector<std::string> id_tok;
  std::vector<uint8_t> has_id;  // 1 where id_tok[id] is a token
  StrMap<int32_t> vocab;        // model vocab
  std::vector<std::string> id_bytes;
  // BPE
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, merged id)
  std::array<int32_t, 256> byte_id{};                                // -1 when not in vocab
  int32_t unk_id = -1;
  bool ignore_merges = false;
  // Pipeline
  std::vector<tok::NormForm> norms;
  bool add_prefix_space = false, use_regex = true;
  enum class Dec { ByteLevel, None } decoder = Dec::ByteLevel;
  std::vector<int32_t> prefix_ids, suffix_ids;  // post-processor
  // Added tokens
  std::vector<AddedToken> added;
  StrMap<int32_t> added_by_content;  // original content -> id
  std::vector<uint8_t> special;      // per id
  Trie raw_trie, norm_trie;
  std::optional<int32_t> eos;
  // Per-word cache
  mutable std::mutex mu;
  mutable StrMap<std::vector<int32_t>> cache;

  std::string normalize(std::string_view s) const {
    std::string out(s);
    for (auto f : norms) out = tok::normalize(out, f);
    return out;
  }
  void bpe(std::string_view word, std::vector<int32_t>& out) const;
  void encode_plain(std::string_view text, std::vector<int32_t>& out) const;
  void encode_normalized(std::string_view text, std::vector<int32_t>& out) const;
  void split_added(std::string_view text, const Trie& trie, std::vector<int32_t>& out,
                   void (Impl::*rest)(std::string_view, std::vector<int32_t>&) const) const;
};

// ---- loading ---------------------------------------------------------------------------

namespace {

void parse_normalizer(const Reader& r, const json& n, const std::string& path,
                      std::vector<tok::NormForm>& out, int depth) {
  if (n.is_null()) return;
  if (depth > 8) r.fail("'" + path + "' nests Sequence normalizers too deeply");
  const std::string t = r.type_of(n, path);
  if (t == "NFC")
    out.push_back(tok::NormForm::NFC);
  else if (t == "NFD")
    out.push_back(tok::NormForm::NFD);
  else if (t == "NFKC")
    out.push_back(tok::NormForm::NFKC);
  else if (t == "NFKD")
    out.push_back(tok::NormForm::NFKD);
  else if (t == "Sequence") {
    const json& seq = r.need(n, "normalizers", path);
    if (!seq.is_array()) r.fail("'" + path + ".normalizers' must be an array");
    for (size_t i = 0; i < seq.size(); ++i)
      parse_normalizer(r, seq[i], path + ".normalizers[" + std::to_string(i) + "]", out, depth + 1);
  } else {
    r.fail("normalizer type '" + t + "' at '" + path +
           "' is not supported (supported: NFC, NFD, NFKC, NFKD, Sequence)");
  }
}

// The post-processor's tokens around a single sequence.
void parse_post(const Reader& r, const json& p, Tokenizer::Impl& im) {
  if (p.is_null()) return;
  const std::string t = r.type_of(p, "post_processor");
  auto pair_id = [&](const char* key) {
    const json& v = r.need(p, key, "post_processor");
    if (!v.is_array() || v.size() != 2)
      r.fail(std::string("'post_processor.") + key + "' must be [token, id]");
    return r.id(v[1], std::string("post_processor.") + key + "[1]");
  };
  if (t == "ByteLevel") return;
  if (t == "RobertaProcessing" || t == "BertProcessing") {
    im.prefix_ids = {pair_id("cls")};
    im.suffix_ids = {pair_id("sep")};
    return;
  }
  if (t == "TemplateProcessing") {
    const json& single = r.need(p, "single", "post_processor");
    if (!single.is_array()) r.fail("'post_processor.single' must be an array");
    const json& specials = r.need_object(p, "special_tokens", "post_processor");
    bool seen_a = false;
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string path = "post_processor.single[" + std::to_string(i) + "]";
      const json& piece = single[i];
      if (!piece.is_object()) r.fail("'" + path + "' must be an object");
      if (const json* sq = r.find(piece, "Sequence")) {
        if (!sq->is_object()) r.fail("'" + path + ".Sequence' must be an object");
        seen_a = true;
      } else if (const json* sp = r.find(piece, "SpecialToken")) {
        if (!sp->is_object()) r.fail("'" + path + ".SpecialToken' must be an object");
        const std::string name =
            r.str(r.need(*sp, "id", path + ".SpecialToken"), path + ".SpecialToken.id");
        auto it = specials.find(name);
        if (it == specials.end())
          r.fail("'" + path + "' names special token '" + name +
                 "' missing from 'post_processor.special_tokens'");
        if (!it->is_object())
          r.fail("'post_processor.special_tokens." + name + "' must be an object");
        const json& ids = r.need(*it, "ids", "post_processor.special_tokens." + name);
        if (!ids.is_array())
          r.fail("'post_processor.special_tokens." + name + ".ids' must be an array");
        auto& dst = seen_a ? im.suffix_ids : im.prefix_ids;
        for (size_t k = 0; k < ids.size(); ++k)
          dst.push_back(r.id(
              ids[k], "post_processor.special_tokens." + name + ".ids[" + std::to_string(k) + "]"));
      } else {
        r.fail("'" + path + "' must hold 'Sequence' or 'SpecialToken'");
      }
    }
    return;
  }
  r.fail("post_processor type '" + t +
         "' is not supported (supported: ByteLevel, TemplateProcessing, RobertaProcessing, "
         "BertProcessing)");
}

std::string bytes_of_token(std::string_view tok) {
  // ByteLevel decoder: every code point back to its byte; a token holding any code point
  // outside the byte alphabet (an added token such as "  ") stands for its own UTF-8 bytes.
  std::string out;
  for (size_t i = 0; i < tok.size();) {
    char32_t cp;
    const int len = tok::utf8_decode(tok, i, &cp);
    const int b = len > 0 ? tok::cp_to_byte(cp) : -1;
    if (b < 0) return std::string(tok);
    out += static_cast<char>(b);
    i += len;
  }
  return out;
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_file(const std::string& path) {
  MAMBA_CHECK(os::exists(path), "tokenizer file not found: ", path);
  std::vector<uint8_t> bytes = os::read_file(path, kMaxFileBytes);
  return from_json_string(
      std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size()), path);
}

Tokenizer Tokenizer::from_model_dir(const std::string& dir) {
  if (std::filesystem::is_regular_file(dir)) return from_gguf(dir);
  const std::string path = dir + "/tokenizer.json";
  MAMBA_CHECK(os::exists(path), "no tokenizer.json in model folder '", dir,
              "' (state-spaces/mamba-* checkpoints ship none: they use the GPT-NeoX-20B tokenizer; "
              "pass its tokenizer.json with --tokenizer)");
  return from_file(path);
}

Tokenizer Tokenizer::from_json_string(std::string_view text, const std::string& origin) {
  Reader r{origin};
  json j;
  try {
    j = json_io::parse_depth_limited(text.data(), text.data() + text.size());
  } catch (const Error& e) {  // nested too deep
    r.fail(e.what());
  } catch (const json::exception& e) {
    r.fail(std::string("not valid JSON: ") + e.what());
  }
  try {
    if (!j.is_object())
      r.fail(std::string("the top level must be a JSON object, got ") + j.type_name());
    auto im = std::make_unique<Impl>();

    // -- model
    const json& m = r.need_object(j, "model", "");
    if (const json* t = r.find(m, "type")) {
      const std::string type = r.str(*t, "model.type");
      if (type != "BPE") r.fail("model type '" + type + "' is not supported (only BPE)");
    }
    const json& vocab = r.need_object(m, "vocab", "model");
    const json& merges = r.need(m, "merges", "model");
    if (!merges.is_array())
      r.fail(std::string("'model.merges' must be an array, got ") + merges.type_name());
    if (const json* d = r.find(m, "dropout"); d && !d->is_null()) {
      if (!d->is_number()) r.fail("'model.dropout' must be a number or null");
      if (d->get<double>() != 0.0) r.fail("'model.dropout' (BPE dropout) is not supported");
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
      if (const json* v = r.find(m, key);
          v && !v->is_null() && !(v->is_string() && v->get<std::string>().empty()))
        r.fail(std::string("'model.") + key + "' is not supported");
    if (r.flag(m, "byte_fallback", false, "model"))
      r.fail("'model.byte_fallback' is not supported");
    im->ignore_merges = r.flag(m, "ignore_merges", false, "model");

    int64_t max_id = -1;
    im->vocab.reserve(vocab.size());
    for (auto it = vocab.begin(); it != vocab.end(); ++it) {
      const int32_t id = r.id(it.value(), "model.vocab[\"" + it.key() + "\"]");
      tok::check_utf8(it.key(), (origin + ": model.vocab key").c_str());
      im->vocab.emplace(it.key(), id);
      max_id = std::max<int64_t>(max_id, id);
    }
    // -- added tokens (their ids may lie beyond the model vocab)
    std::vector<AddedToken> added;
    if (const json* at = r.find(j, "added_tokens"); at && !at->is_null()) {
      if (!at->is_array()) r.fail("'added_tokens' must be an array");
      for (size_t i = 0; i < at->size(); ++i) {
        const std::string path = "added_tokens[" + std::to_string(i) + "]";
        const json& a = (*at)[i];
        if (!a.is_object()) r.fail("'" + path + "' must be an object");
        AddedToken t;
        t.id = r.id(r.need(a, "id", path), path + ".id");
        t.content = r.str(r.need(a, "content", path), path + ".content");
        if (t.content.empty()) r.fail("'" + path + ".content' is empty");
        tok::check_utf8(t.content, (origin + ": " + path + ".content").c_str());
        t.special = r.flag(a, "special", false, path);
        t.normalized = r.flag(a, "normalized", !t.special, path);
        t.lstrip = r.flag(a, "lstrip", false, path);
        t.rstrip = r.flag(a, "rstrip", false, path);
        t.single_word = r.flag(a, "single_word", false, path);
        max_id = std::max<int64_t>(max_id, t.id);
        added.push_back(std::move(t));
      }
    }
    const size_t V = static_cast<size_t>(max_id + 1);
    im->id_tok.assign(V, std::string());
    im->has_id.assign(V, 0);
    im->special.assign(V, 0);
    for (const auto& [tok, id] : im->vocab) {
      if (im->has_id[id])
        r.fail("model.vocab: id " + std::to_string(id) + " is given to both '" + im->id_tok[id] +
               "' and '" + tok + "'");
      im->id_tok[id] = tok;
      im->has_id[id] = 1;
    }
    // -- merges
    im->merges.reserve(merges.size());
    for (size_t i = 0; i < merges.size(); ++i) {
      const std::string path = "model.merges[" + std::to_string(i) + "]";
      const json& mg = merges[i];
      std::string a, b;
      if (mg.is_string()) {
        const std::string s = mg.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || sp == 0 || sp + 1 >= s.size() ||
            s.find(' ', sp + 1) != std::string::npos)
          r.fail("'" + path + "' = " + mg.dump() + " must be two tokens separated by one space");
        a = s.substr(0, sp), b = s.substr(sp + 1);
      } else if (mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string()) {
        a = mg[0].get<std::string>(), b = mg[1].get<std::string>();
      } else {
        r.fail("'" + path + "' must be \"a b\" or [\"a\", \"b\"], got " + mg.dump().substr(0, 80));
      }
      auto ia = im->vocab.find(a), ib = im->vocab.find(b), iab = im->vocab.find(a + b);
      if (ia == im->vocab.end() || ib == im->vocab.end() || iab == im->vocab.end())
        r.fail("'" + path + "' merges '" + a + "' + '" + b + "', but '" +
               (ia == im->vocab.end()   ? a
                : ib == im->vocab.end() ? b
                                        : a + b) +
               "' is not in model.vocab");
      const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
      im->merges.emplace(key,
                         std::make_pair(static_cast<int32_t>(i), iab->second));  // first rank wins
    }
    if (const json* u = r.find(m, "unk_token"); u && !u->is_null()) {
      const std::string unk = r.str(*u, "model.unk_token");
      auto it = im->vocab.find(unk);
      if (it == im->vocab.end()) r.fail("'model.unk_token' '" + unk + "' is not in model.vocab");
      im->unk_id = it->second;
    }

    // -- pipeline
    if (const json* n = r.find(j, "normalizer"))
      parse_normalizer(r, *n, "normalizer", im->norms, 0);
    const json* pre = r.find(j, "pre_tokenizer");
    if (!pre || pre->is_null()) r.fail("'pre_tokenizer' is missing (only ByteLevel is supported)");
    {
      const std::string t = r.type_of(*pre, "pre_tokenizer");
      if (t != "ByteLevel")
        r.fail("pre_tokenizer type '" + t + "' is not supported (only ByteLevel)");
      im->add_prefix_space = r.flag(*pre, "add_prefix_space", true, "pre_tokenizer");
      im->use_regex = r.flag(*pre, "use_regex", true, "pre_tokenizer");
    }
    if (const json* d = r.find(j, "decoder"); d && !d->is_null()) {
      const std::string t = r.type_of(*d, "decoder");
      if (t != "ByteLevel") r.fail("decoder type '" + t + "' is not supported (only ByteLevel)");
    } else {
      im->decoder = Impl::Dec::None;
    }
    if (const json* p = r.find(j, "post_processor")) parse_post(r, *p, *im);

    const auto& b2c = tok::byte_to_cp();
    for (int b = 0; b < 256; ++b) {
      std::string s;
      tok::utf8_append(s, b2c[b]);
      auto it = im->vocab.find(s);
      im->byte_id[b] = it == im->vocab.end() ? -1 : it->second;
    }

    // -- added tokens into the tables (they override the model's strings for their ids)
    for (size_t i = 0; i < added.size(); ++i) {
      AddedToken& t = added[i];
      im->id_tok[t.id] = t.content;
      im->has_id[t.id] = 1;
      im->special[t.id] = t.special ? 1 : 0;
      im->added_by_content[t.content] = t.id;
      if (t.normalized) {
        t.content = im->normalize(t.content);
        if (t.content.empty()) continue;
        im->norm_trie.insert(t.content, static_cast<int32_t>(i));
      } else {
        im->raw_trie.insert(t.content, static_cast<int32_t>(i));
      }
    }
    im->added = std::move(added);
    for (int32_t id : im->prefix_ids)
      if (size_t(id) >= V || !im->has_id[id])
        r.fail("post_processor token id " + std::to_string(id) + " is not in the vocabulary");
    for (int32_t id : im->suffix_ids)
      if (size_t(id) >= V || !im->has_id[id])
        r.fail("post_processor token id " + std::to_string(id) + " is not in the vocabulary");

    im->id_bytes.resize(V);
    for (size_t id = 0; id < V; ++id)
      if (im->has_id[id]) im->id_bytes[id] = bytes_of_token(im->id_tok[id]);

    for (const char* name :
         {"<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>"}) {
      auto it = im->added_by_content.find(std::string_view(name));
      if (it != im->added_by_content.end() && im->special[it->second]) {
        im->eos = it->second;
        break;
      }
    }
    return Tokenizer(std::move(im));
  } catch (const json::exception& e) {
    r.fail(std::string("malformed tokenizer: ") + e.what());
  }
}

// ---- encoding ----------------------------------------------------------------------------

// Merges a word's bytes by rank, lowest rank first and leftmost among equals (as Hugging Face).
void Tokenizer::Impl::bpe(std::string_view word, std::vector<int32_t>& out) const {
  if (word.size() == 1) {
    const int32_t id = byte_id[static_cast<uint8_t>(word[0])];
    if (id >= 0)
      out.push_back(id);
    else if (unk_id >= 0)
      out.push_back(unk_id);
    return;
  }
  const bool cacheable = word.size() <= kCacheMaxWord;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(word);
    if (it != cache.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> res;
  bool done = false;
  if (ignore_merges) {
    std::string mapped;
    for (char ch : word) tok::utf8_append(mapped, tok::byte_to_cp()[static_cast<uint8_t>(ch)]);
    if (auto it = vocab.find(mapped); it != vocab.end()) res.push_back(it->second), done = true;
  }
  if (!done) {
    struct Sym {
      int32_t id, prev, next;
    };
    std::vector<Sym> sy;
    sy.reserve(word.size());
    for (char ch : word) {
      int32_t id = byte_id[static_cast<uint8_t>(ch)];
      if (id < 0) id = unk_id;
      if (id < 0) continue;  // no such byte and no unk token: dropped, as Hugging Face does
      const int32_t k = static_cast<int32_t>(sy.size());
      sy.push_back({id, k - 1, k + 1});
    }
    if (!sy.empty()) sy.back().next = -1;
    struct Cand {
      int32_t rank, pos, new_id;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    auto lookup = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
      auto it = merges.find((uint64_t(uint32_t(a)) << 32) | uint32_t(b));
      return it == merges.end() ? nullptr : &it->second;
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> q;
    for (int32_t k = 0; k + 1 < static_cast<int32_t>(sy.size()); ++k)
      if (auto* mg = lookup(sy[k].id, sy[k + 1].id)) q.push({mg->first, k, mg->second});
    std::vector<uint8_t> dead(sy.size(), 0);
    while (!q.empty()) {
      const Cand c = q.top();
      q.pop();
      if (dead[c.pos] || sy[c.pos].next < 0) continue;
      const int32_t nx = sy[c.pos].next;
      auto* mg = lookup(sy[c.pos].id, sy[nx].id);
      if (!mg || mg->second != c.new_id || mg->first != c.rank) continue;  // stale
      sy[c.pos].id = c.new_id;
      sy[c.pos].next = sy[nx].next;
      if (sy[nx].next >= 0) sy[sy[nx].next].prev = c.pos;
      dead[nx] = 1;
      if (sy[c.pos].prev >= 0)
        if (auto* m2 = lookup(sy[sy[c.pos].prev].id, sy[c.pos].id))
          q.push({m2->first, sy[c.pos].prev, m2->second});
      if (sy[c.pos].next >= 0)
        if (auto* m2 = lookup(sy[c.pos].id, sy[sy[c.pos].next].id))
          q.push({m2->first, c.pos, m2->second});
    }
    for (int32_t k = sy.empty() ? -1 : 0; k >= 0; k = sy[k].next) res.push_back(sy[k].id);
  }
  out.insert(out.end(), res.begin(), res.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(mu);
    if (cache.size() >= kCacheLimit) cache.clear();
    cache.emplace(std::string(word), std::move(res));
  }
}

// Pre-tokenizes already-normalised text and runs BPE on each word.
void Tokenizer::Impl::encode_plain(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  std::string prefixed;
  if (add_prefix_space && text[0] != ' ') {
    prefixed.reserve(text.size() + 1);
    prefixed = " ";
    prefixed += text;
    text = prefixed;
  }
  if (!use_regex) {
    tok::check_utf8(text, "text");
    bpe(text, out);
    return;
  }
  thread_local std::vector<std::pair<uint32_t, uint32_t>> words;
  words.clear();
  tok::split_gpt2(text, words);
  for (auto [a, b] : words) bpe(text.substr(a, b - a), out);
}

// Cuts out the added tokens of `trie` (leftmost-longest, with lstrip/rstrip/single_word) and
// hands the text between them to `rest`.
void Tokenizer::Impl::split_added(std::string_view s, const Trie& trie, std::vector<int32_t>& out,
                                  void (Impl::*rest)(std::string_view, std::vector<int32_t>&)
                                      const) const {
  if (trie.empty()) {
    (this->*rest)(s, out);
    return;
  }
  auto prev_cp = [&](size_t pos, size_t* start) -> char32_t {  // code point ending at pos
    size_t k = pos;
    do --k;
    while (k > 0 && (static_cast<uint8_t>(s[k]) & 0xC0) == 0x80);
    char32_t cp = 0;
    if (tok::utf8_decode(s, k, &cp) == 0) cp = 0xFFFD;
    if (start) *start = k;
    return cp;
  };
  size_t done = 0;  // text before this is consumed
  size_t i = 0;
  while (i < s.size()) {
    auto [t, len] = trie.longest(s, i);
    if (t < 0) {
      ++i;
      continue;
    }
    const AddedToken& at = added[t];
    size_t start = i, stop = i + len;
    if (at.single_word) {
      char32_t cp;
      const bool left_ok = start == 0 || !tok::is_word_char(prev_cp(start, nullptr));
      const bool right_ok =
          stop == s.size() || tok::utf8_decode(s, stop, &cp) == 0 || !tok::is_word_char(cp);
      if (!left_ok || !right_ok) {
        i = stop;
        continue;
      }
    }
    if (at.lstrip)
      while (start > done) {
        size_t k;
        if (!tok::is_whitespace(prev_cp(start, &k))) break;
        start = k;
      }
    if (at.rstrip)
      while (stop < s.size()) {
        char32_t cp;
        const int l = tok::utf8_decode(s, stop, &cp);
        if (l == 0 || !tok::is_whitespace(cp)) break;
        stop += l;
      }
    (this->*rest)(s.substr(done, start - done), out);
    out.push_back(at.id);
    done = i = stop;
  }
  (this->*rest)(s.substr(done), out);
}

void Tokenizer::Impl::encode_normalized(std::string_view text, std::vector<int32_t>& out) const {
  if (text.empty()) return;
  if (norms.empty()) {
    split_added(text, norm_trie, out, &Impl::encode_plain);
  } else {
    const std::string n = normalize(text);
    split_added(n, norm_trie, out, &Impl::encode_plain);
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  tok::check_utf8(text, "text");
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special_tokens) out.insert(out.end(), impl_->prefix_ids.begin(), impl_->prefix_ids.end());
  impl_->split_added(text, impl_->raw_trie, out, &Impl::encode_normalized);
  if (add_special_tokens) out.insert(out.end(), impl_->suffix_ids.begin(), impl_->suffix_ids.end());
  return out;
}

// ---- decoding ----------------------------------------------------------------------------

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& im = *impl_;
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (id < 0 || size_t(id) >= im.has_id.size() || !im.has_id[id]) continue;
    if (skip_special_tokens && im.special[id]) continue;
    if (im.decoder == Impl::Dec::ByteLevel) {
      bytes += im.id_bytes[id];
    } else {  // no decoder: the token strings joined by spaces (as Hugging Face does)
      if (!first) bytes += ' ';
      bytes += im.id_tok[id];
    }
    first = false;
  }
  return utf8_lossy(bytes);
}

std::string Tokenizer::token_bytes(int32_t id) const {
  const Impl& im = *impl_;
  if (id < 0 || size_t(id) >= im.has_id.size() || !im.has_id[id]) return {};
  return im.decoder == Impl::Dec::ByteLevel ? im.id_bytes[id] : im.id_tok[id];
}

const std::string& Tokenizer::id_to_token(int32_t id) const {
  const Impl& im = *impl_;
  MAMBA_CHECK(id >= 0 && size_t(id) < im.has_id.size() && im.has_id[id], "token id ", id,
              " is not in the vocabulary (size ", im.has_id.size(), ")");
  return im.id_tok[id];
}

std::optional<int32_t> Tokenizer::find_token(std::string_view token) const {
  if (auto it = impl_->added_by_content.find(token); it != impl_->added_by_content.end())
    return it->second;
  if (auto it = impl_->vocab.find(token); it != impl_->vocab.end()) return it->second;
  return std::nullopt;
}

int32_t Tokenizer::token_to_id(std::string_view token) const {
  auto id = find_token(token);
  MAMBA_CHECK(id.has_value(), "token '", token, "' is not in the vocabulary");
  return *id;
}

std::optional<int32_t> Tokenizer::eos_id() const { return impl_->eos; }
bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && size_t(id) < impl_->special.size() && impl_->special[id];
}
size_t Tokenizer::vocab_size() const { return impl_->has_id.size(); }

std::vector<std::string> Tokenizer::split_words(std::string_view text) {
  std::vector<std::pair<uint32_t, uint32_t>> w;
  tok::split_gpt2(text, w);
  std::vector<std::string> out;
  out.reserve(w.size());
  for (auto [a, b] : w) out.emplace_back(text.substr(a, b - a));
  return out;
}

std::string Tokenizer::nfc(std::string_view text) {
  tok::check_utf8(text, "text");
  return tok::normalize(text, tok::NormForm::NFC);
}

// ---- UTF-8 repair and streaming --------------------------------------------------------------

std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    char32_t cp;
    const int len = tok::utf8_decode(s, i, &cp);
    if (len > 0) {
      out.append(s.substr(i, len));
      i += len;
      continue;
    }
    // Skip the maximal prefix of a valid sequence (at least one byte), emit one U+FFFD.
    const auto b0 = static_cast<uint8_t>(s[i]);
    size_t skip = 1;
    int need = b0 >= 0xC2 && b0 <= 0xDF   ? 2
               : b0 >= 0xE0 && b0 <= 0xEF ? 3
               : b0 >= 0xF0 && b0 <= 0xF4 ? 4
                                          : 1;
    for (int k = 1; k < need && i + k < s.size(); ++k) {
      const auto b = static_cast<uint8_t>(s[i + k]);
      uint8_t lo = 0x80, hi = 0xBF;
      if (k == 1) {
        if (b0 == 0xE0) lo = 0xA0;
        if (b0 == 0xED) hi = 0x9F;
        if (b0 == 0xF0) lo = 0x90;
        if (b0 == 0xF4) hi = 0x8F;
      }
      if (b < lo || b > hi) break;
      skip = k + 1;
    }
    out += "\xEF\xBF\xBD";
    i += skip;
  }
  return out;
}

namespace {
// Length of the tail of `s` that is the start of a UTF-8 sequence still waiting for bytes.
size_t incomplete_tail(const std::string& s) {
  const size_t n = s.size();
  for (size_t back = 1; back <= 3 && back <= n; ++back) {
    const auto b = static_cast<uint8_t>(s[n - back]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte: look further back
    const size_t need = b >= 0xC2 && b <= 0xDF   ? 2
                        : b >= 0xE0 && b <= 0xEF ? 3
                        : b >= 0xF0 && b <= 0xF4 ? 4
                                                 : 0;
    if (need > back) {
      // Only hold back if what is there is a valid prefix.
      std::string probe = s.substr(n - back);
      while (probe.size() < need) probe += '\x80';  // the smallest continuation...
      // ...may be out of range for E0/F0 second bytes; use the lowest allowed second byte.
      if (back == 1 && (b == 0xE0 || b == 0xF0))
        probe[1] = static_cast<char>(b == 0xE0 ? 0xA0 : 0x90);
      char32_t cp;
      if (tok::utf8_decode(probe, 0, &cp) > 0) return back;
    }
    return 0;
  }
  return 0;
}
}  // namespace

std::string TokenStreamDecoder::push(int32_t id) {
  if (skip_special_ && tok_->is_special(id)) return {};
  pending_ += tok_->token_bytes(id);
  const size_t hold = incomplete_tail(pending_);
  std::string ready = utf8_lossy(std::string_view(pending_).substr(0, pending_.size() - hold));
  pending_.erase(0, pending_.size() - hold);
  return ready;
}

std::string TokenStreamDecoder::flush() {
  std::string out = utf8_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace mamba
