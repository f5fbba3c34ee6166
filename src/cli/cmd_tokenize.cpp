// mambacpp tokenize / detokenize: text <-> token ids with a tokenizer.json.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/json_reader.h"
#include "core/os.h"
#include "mamba/error.h"
#include "mamba/tokenizer.h"

namespace mamba::cli {

namespace {

struct TokOpts {
  std::string tokenizer, model, text, ids, file;
  bool jsonl = false, add_special = false, skip_special = false;
};

void add_source(CLI::App* sub, TokOpts& o) {
  auto* t = sub->add_option("--tokenizer", o.tokenizer, "tokenizer.json file");
  auto* m = sub->add_option("--model", o.model,
                            "model folder containing tokenizer.json, or a .gguf file");
  t->excludes(m);
  m->excludes(t);
}

Tokenizer load(const TokOpts& o) {
  MAMBA_CHECK(!o.tokenizer.empty() || !o.model.empty(), "give --tokenizer FILE or --model DIR");
  return o.tokenizer.empty() ? Tokenizer::from_model_dir(o.model)
                             : Tokenizer::from_file(o.tokenizer);
}

std::string read_input(const std::string& file) {
  if (file == "-") return std::string(std::istreambuf_iterator<char>(std::cin), {});
  std::vector<uint8_t> b = os::read_file(file);
  return std::string(b.begin(), b.end());
}

// Lines split on '\n'; a trailing "\r" stays part of the line; no empty last line after a final
// '\n'.
std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> lines;
  size_t a = 0;
  while (a < s.size()) {
    size_t e = s.find('\n', a);
    if (e == std::string::npos) e = s.size();
    lines.push_back(s.substr(a, e - a));
    a = e + 1;
  }
  return lines;
}

void print_ids(const std::vector<int32_t>& ids) {
  std::string out = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) out += ',';
    out += std::to_string(ids[i]);
  }
  out += "]\n";
  std::fwrite(out.data(), 1, out.size(), stdout);
}

// "[1, 2, 3]" (JSON) or "1 2 3" / "1,2,3".
std::vector<int32_t> parse_ids(const std::string& s, const std::string& where) {
  std::vector<int32_t> ids;
  size_t p = s.find_first_not_of(" \t\r\n");
  if (p != std::string::npos && s[p] == '[') {
    nlohmann::json j;
    try {
      j = json_io::parse_depth_limited(s.data(), s.data() + s.size());
    } catch (const Error& e) {  // nested too deep
      throw Error(where + ": " + e.what());
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": not a JSON array of token ids: " + e.what());
    }
    MAMBA_CHECK(j.is_array(), where, ": expected a JSON array of token ids");
    for (size_t i = 0; i < j.size(); ++i) {
      MAMBA_CHECK(j[i].is_number_integer(), where, ": element ", i,
                  " is not an integer: ", j[i].dump());
      const int64_t v =
          j[i].is_number_unsigned()
              ? static_cast<int64_t>(std::min<uint64_t>(j[i].get<uint64_t>(), INT64_MAX))
              : j[i].get<int64_t>();
      MAMBA_CHECK(v >= 0 && v <= INT32_MAX, where, ": token id ", j[i].dump(), " out of range");
      ids.push_back(static_cast<int32_t>(v));
    }
    return ids;
  }
  std::string tok;
  auto flush = [&] {
    if (tok.empty()) return;
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(tok, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    MAMBA_CHECK(used == tok.size() && v >= 0 && v <= INT32_MAX, where, ": bad token id '", tok,
                "'");
    ids.push_back(static_cast<int32_t>(v));
    tok.clear();
  };
  for (char c : s) {
    if (c == ',' || c == ' ' || c == '\t' || c == '\n' || c == '\r')
      flush();
    else
      tok += c;
  }
  flush();
  return ids;
}

}  // namespace

Command add_tokenize(CLI::App& app) {
  auto o = std::make_shared<TokOpts>();
  auto* sub =
      app.add_subcommand("tokenize", "Text -> token ids (a JSON array; one per line with --jsonl)");
  add_source(sub, *o);
  auto* t = sub->add_option("--text", o->text, "the text");
  auto* f = sub->add_option("--file", o->file, "read the text from this file ('-' = stdin)");
  t->excludes(f);
  f->excludes(t);
  sub->add_flag("--jsonl", o->jsonl,
                "one JSON array per input line (the newline is not tokenized)");
  sub->add_flag("--add-special-tokens", o->add_special,
                "apply the post-processor's special tokens");
  return {sub, [o, t] {
            Tokenizer tok = load(*o);
            std::string text = t->count() ? o->text : read_input(o->file.empty() ? "-" : o->file);
            if (o->jsonl) {
              for (const auto& line : split_lines(text))
                print_ids(tok.encode(line, o->add_special));
            } else {
              print_ids(tok.encode(text, o->add_special));
            }
            return 0;
          }};
}

Command add_detokenize(CLI::App& app) {
  auto o = std::make_shared<TokOpts>();
  auto* sub = app.add_subcommand(
      "detokenize",
      "Token ids -> text (with --jsonl: one JSON array per line in, one JSON string per line out)");
  add_source(sub, *o);
  auto* i = sub->add_option("--ids", o->ids, "the ids: \"[1,2,3]\" or \"1 2 3\"");
  auto* f = sub->add_option("--file", o->file, "read the ids from this file ('-' = stdin)");
  i->excludes(f);
  f->excludes(i);
  sub->add_flag("--jsonl", o->jsonl,
                "one array per input line; prints each text as a JSON string on its own line");
  sub->add_flag("--skip-special-tokens", o->skip_special,
                "leave out special tokens such as <|endoftext|>");
  return {sub, [o, i] {
            Tokenizer tok = load(*o);
            const std::string where = i->count()
                                          ? std::string("--ids")
                                          : (o->file.empty() ? std::string("stdin") : o->file);
            std::string in = i->count() ? o->ids : read_input(o->file.empty() ? "-" : o->file);
            if (o->jsonl) {
              size_t n = 0;
              for (const auto& line : split_lines(in)) {
                ++n;
                if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
                const std::string text =
                    tok.decode(parse_ids(line, where + ":" + std::to_string(n)), o->skip_special);
                const std::string js = nlohmann::json(text).dump() + "\n";
                std::fwrite(js.data(), 1, js.size(), stdout);
              }
            } else {
              const std::string text = tok.decode(parse_ids(in, where), o->skip_special);
              std::fwrite(text.data(), 1, text.size(), stdout);
            }
            return 0;
          }};
}

}  // namespace mamba::cli
