// Chat templates: the subset of Jinja2 that Hugging Face chat templates use, rendered the way
// transformers' apply_chat_template renders them (a sandboxed Jinja2 environment with
// trim_blocks, lstrip_blocks and the loop controls; raise_exception, strftime_now and a tojson
// that keeps non-ASCII text), so /v1/chat/completions turns `messages` into the prompt the model
// was trained on. Self-contained: no template engine dependency.
//
// Supported:
//   {{ expr }}, {% if / elif / else / endif %}, {% for x in xs [if cond] %} ... {% else %} ...
//   {% endfor %} (loop.index, index0, revindex, revindex0, first, last, length, previtem,
//   nextitem; tuple targets `k, v`), {% set x = ... %}, {% set ns.attr = ... %}, {% set x %}
//   ... {% endset %}, {% break %}, {% continue %}, {# comments #}, whitespace control `-` / `+`,
//   trim_blocks and lstrip_blocks.
//   Expressions: none/true/false (either case), integers, floats, strings (adjacent ones
//   joined), lists, tuples, dicts, names, `.attr`, `[index]`, `[a:b:c]` slices, calls,
//   + - * / // % ** ~, unary - +, == != < > <= >=, in, not in, and, or, not, `a if c else b`,
//   filters (`|f` or `|f(args)`) and tests (`is [not] t`).
//   Filters: trim, length, count, upper, lower, capitalize, title, default (d), first, last,
//   join, tojson, string, int, float, abs, list, reverse, replace, safe, items, round, map
//   (attribute=), selectattr, rejectattr, select, reject.
//   Tests: defined, undefined, none, string, number, integer, float, boolean, mapping,
//   iterable, sequence, true, false, even, odd, divisibleby, eq/equalto/==, ne/!=, lt/<, le/<=,
//   gt/>, ge/>=, in.
//   Methods: str.strip/lstrip/rstrip/upper/lower/title/capitalize/startswith/endswith/split/
//   replace/find/count/join, dict.items/keys/values/get.
//   Globals: raise_exception(msg), namespace(...), range(...), strftime_now(fmt).
// Anything else (macros, includes, filters or tests not listed, ...) is refused when the template
// is parsed, with the construct and its line and column, never rendered wrongly.
//
// Templates are untrusted: parsing depth, rendered size, every string and list built, and the
// total number of loop iterations are bounded (ChatTemplateLimits); going over is an error.
#pragma once
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "mamba/error.h"

namespace mamba::serve {

struct ChatTemplateLimits {
  int max_depth = 64;                       // nesting of expressions and blocks
  size_t max_output_bytes = 4 << 20;        // the rendered text, and any one string built
  int64_t max_loop_iterations = 1'000'000;  // all loops of one render together; also list sizes
};

// A template that failed to render. `raised` is true for raise_exception() (the template refused
// the conversation: the message is the template's own); false for anything else (a type error,
// an undefined value used where one is needed, a limit).
class ChatTemplateError : public Error {
 public:
  ChatTemplateError(const std::string& msg, bool raised) : Error(msg), raised_(raised) {}
  bool raised() const { return raised_; }

 private:
  bool raised_;
};

class ChatTemplate {
 public:
  // Parses the template; throws mamba::Error "chat template line L, column C: ..." for a syntax
  // error or an unsupported construct. `origin` names the template's source in messages.
  static ChatTemplate parse(std::string_view source, const std::string& origin = "chat template",
                            ChatTemplateLimits limits = {});
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;
  ~ChatTemplate();

  // Renders with the given variables (a JSON object: messages, add_generation_prompt,
  // bos_token, eos_token, ...). Throws ChatTemplateError. Thread-safe (the template is not
  // modified).
  std::string render(const nlohmann::ordered_json& vars) const;

  struct Impl;

 private:
  explicit ChatTemplate(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// What a model folder says about chat: its template source and the special tokens the template
// may use (bos_token, eos_token, unk_token, pad_token, ... as strings).
struct ChatTemplateSource {
  std::string source;  // the Jinja text
  std::string origin;  // where it came from (for messages)
  nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object();
};

// Reads DIR/chat_template.jinja if present, else DIR/tokenizer_config.json's chat_template (a
// string, or a list of {name, template} where "default" is used); the special tokens come from
// tokenizer_config.json (a string or an {"content": ...} object each). nullopt when the folder
// has no template; mamba::Error when a file is malformed (e.g. a template list with no
// "default").
std::optional<ChatTemplateSource> find_chat_template(const std::string& model_dir);

}  // namespace mamba::serve
