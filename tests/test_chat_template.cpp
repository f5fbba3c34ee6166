// The chat template renderer (src/serve/chat_template.h) against Jinja2 itself: real models'
// templates (tests/data/chat_templates: ChatML, Zephyr, Llama-2-chat, Mistral-instruct,
// Llama-3-instruct, Gemma-it, and features.jinja written for these tests) over several
// conversations, and small expressions, each rendered by both and compared byte for byte
// (tests/serve/render_chat_template.py runs Debian's python3-jinja2 configured as Hugging Face
// transformers configures it). Failures must agree too: when Jinja2 fails, so must we, and a
// raise_exception() must carry the template's own message. Then what only we check: unsupported
// constructs refused at parse time with their line and column, and the limits on untrusted
// templates.
#include <gtest/gtest.h>

#if !MAMBA_HAVE_SERVE
TEST(ChatTemplate, NeedsServe) {
  GTEST_SKIP() << "built without cpp-httplib: the serve library (and its chat templates) is not "
                  "built";
}
#else
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "serve/chat_template.h"

namespace fs = std::filesystem;
using mamba::serve::ChatTemplate;
using mamba::serve::ChatTemplateError;
using mamba::serve::ChatTemplateLimits;
using nlohmann::ordered_json;

namespace {

std::string read_text(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

fs::path scratch() {
  static const fs::path d = [] {
    fs::path p =
        fs::temp_directory_path() / ("mamba_chat_template_test_" + std::to_string(::getpid()));
    fs::create_directories(p);
    return p;
  }();
  return d;
}

struct Case {
  std::string what, tmpl;
  ordered_json vars;
};

struct Outcome {
  bool ok = false, raised = false;
  std::string text;  // the rendering, or the error message
};

Outcome ours(const Case& c) {
  Outcome o;
  try {
    ChatTemplate t = ChatTemplate::parse(c.tmpl, c.what);
    o.text = t.render(c.vars);
    o.ok = true;
  } catch (const ChatTemplateError& e) {
    o.text = e.what();
    o.raised = e.raised();
  } catch (const mamba::Error& e) {
    o.text = e.what();
  }
  return o;
}

// Jinja2's outcomes for all cases (one python run); an empty vector and `why` when it cannot run.
std::vector<Outcome> reference(const std::vector<Case>& cases, std::string* why) {
  ordered_json in = ordered_json::array();
  for (auto& c : cases) in.push_back({{"template", c.tmpl}, {"vars", c.vars}});
  const fs::path inp = scratch() / "cases.json", outp = scratch() / "out.json";
  std::ofstream(inp) << in.dump();
  const std::string py = fs::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
  const std::string cmd = py + " '" + MAMBA_SERVE_SCRIPTS + "/render_chat_template.py' '" +
                          inp.string() + "' '" + outp.string() + "' 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string log;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) log.append(buf, n);
  const int st = pclose(p);
  const int rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  if (rc != 0) {
    *why = rc == 3 ? log : "the reference script failed (exit " + std::to_string(rc) + "): " + log;
    return {};
  }
  ordered_json res = ordered_json::parse(read_text(outp));
  std::vector<Outcome> out;
  for (auto& r : res) {
    Outcome o;
    o.ok = r.contains("ok");
    o.text = o.ok ? r["ok"].get<std::string>() : r["error"].get<std::string>();
    o.raised = !o.ok && r["raised"].get<bool>();
    out.push_back(o);
  }
  return out;
}

// Renders every case with both and compares (without python3-jinja2 the test is skipped with
// the reason; the caller checks IsSkipped()).
void compare_with_jinja(const std::vector<Case>& cases, int* compared_ok, int* compared_err) {
  std::string why;
  const auto ref = reference(cases, &why);
  if (ref.empty()) GTEST_SKIP() << "no reference renderer: " << why;
  ASSERT_EQ(ref.size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    const Outcome mine = ours(cases[i]);
    const Outcome& theirs = ref[i];
    SCOPED_TRACE(cases[i].what + "\n--- template:\n" + cases[i].tmpl +
                 "\n--- vars: " + cases[i].vars.dump());
    if (theirs.ok) {
      ASSERT_TRUE(mine.ok) << "Jinja2 renders it, we fail: " << mine.text;
      EXPECT_EQ(mine.text, theirs.text);
      ++*compared_ok;
    } else {
      EXPECT_FALSE(mine.ok) << "Jinja2 fails (" << theirs.text << "), we render: " << mine.text;
      EXPECT_EQ(mine.raised, theirs.raised) << "ours: " << mine.text << "\nJinja2: " << theirs.text;
      if (theirs.raised) {
        EXPECT_EQ(mine.text, theirs.text);
      }
      ++*compared_err;
    }
  }
  std::printf("compared with Jinja2: %d renderings byte for byte, %d failures\n", *compared_ok,
              *compared_err);
}

ordered_json msg(const std::string& role, const std::string& content) {
  return ordered_json{{"role", role}, {"content", content}};
}

std::vector<ordered_json> conversations() {
  std::vector<ordered_json> c;
  c.push_back(ordered_json::array({msg("user", "Hello!")}));
  {
    ordered_json m = msg("user", "And the second question?");
    m["name"] = "alice";
    c.push_back(
        ordered_json::array({msg("system", "You are a helpful assistant.  "),
                             msg("user", "What is a state space model?"),
                             msg("assistant", "A recurrent model with a linear state."), m}));
  }
  c.push_back(ordered_json::array(
      {msg("user", "  padded content \n"), msg("assistant", "héllo — ünïcode ✓ 日本語 🐍"),
       msg("user", "quotes ' \" and \\ backslash, {{ not a tag }} {% nor this %}\nsecond line")}));
  c.push_back(ordered_json::array({msg("user", "one"), msg("user", "two in a row")}));
  c.push_back(ordered_json::array({msg("assistant", "I speak first"), msg("user", "ok")}));
  c.push_back(ordered_json::array({msg("system", "\tSystem only, tabbed\t")}));
  return c;
}

TEST(ChatTemplate, RealTemplatesMatchJinja2) {
  const fs::path dir = fs::path(MAMBA_TEST_DATA) / "chat_templates";
  std::vector<Case> cases;
  for (const char* name :
       {"chatml", "zephyr", "llama2", "mistral", "llama3", "gemma", "features"}) {
    const std::string tmpl = read_text(dir / (std::string(name) + ".jinja"));
    ASSERT_FALSE(tmpl.empty()) << name;
    int k = 0;
    for (const auto& conv : conversations())
      for (bool gen : {true, false}) {
        ordered_json vars = {{"messages", conv},
                             {"add_generation_prompt", gen},
                             {"bos_token", "<s>"},
                             {"eos_token", "</s>"}};
        cases.push_back({std::string(name) + " conversation " + std::to_string(k / 2) +
                             (gen ? " +generation prompt" : ""),
                         tmpl, vars});
        ++k;
      }
  }
  int ok = 0, err = 0;
  compare_with_jinja(cases, &ok, &err);
  if (IsSkipped()) return;
  // the role-order checks of llama2 / mistral / gemma must have fired, and most cases render
  EXPECT_GE(err, 10);
  EXPECT_GE(ok, 50);
}

TEST(ChatTemplate, ExpressionsAndWhitespaceMatchJinja2) {
  const ordered_json vars = {{"messages", ordered_json::array({msg("user", "x")})},
                             {"s", "  Mixed Case  "},
                             {"n", 7},
                             {"f", 2.5},
                             {"l", ordered_json::array({3, "a", nullptr, true})},
                             {"d", ordered_json{{"z", 1}, {"a", ordered_json::array({1, 2})}}}};
  const std::vector<std::string> exprs = {
      // whitespace control, trim_blocks, lstrip_blocks
      "a  \n  {%- if true %}x{% endif %}\n b",
      "  {% if true %}\n    y\n  {% endif %}\nz",
      "{% for i in [1, 2] %}\n  {{ i }}\n{% endfor %}\nend",
      "a {#- c -#} b",
      "a\n  {# comment #}\nb",
      "x {%+ if true %}y{% endif +%}\nz",
      "{{- ' lead' }} \n",
      "  {{ 'v' -}}  \n  w",
      "line\n\n",
      "\n{% if true %}\n\n{% endif %}\n",
      "{% if false %}no{% elif n > 5 %}elif{% else %}else{% endif %}",
      "{% for x in [] %}{{ x }}{% else %}empty{% endfor %}",
      "{% for x in l if x %}{{ loop.index0 }}:{{ x }}/{{ loop.length }} {% endfor %}",
      "{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}",
      "{% for k in d %}{{ k }}{% endfor %}{% for c in 'héj' %}[{{ c }}]{% endfor %}",
      "{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}",
      // expressions
      "{{ n // 2 }} {{ -n // 2 }} {{ n % -3 }} {{ n / 2 }} {{ f * 2 }} {{ f // 1 }} {{ -f % 1 }}",
      "{{ 2 ** 10 }} {{ 2 ** -1 }} {{ 1.0 }} {{ 1e16 }} {{ 123456.789 }} {{ 1e-4 }} {{ -0.0 }}",
      "{{ s | trim }}|{{ s.strip() }}|{{ s | upper }}|{{ s | lower }}|{{ s | title }}|{{ s | "
      "capitalize }}",
      "{{ s | length }} {{ l | length }} {{ d | length }} {{ l | count }}",
      "{{ l }} {{ d }} {{ (1,) }} {{ () }} {{ [] }} {{ {} }}",
      "{{ l[0] }} {{ l[-1] }} {{ l[1:3] }} {{ l[::2] }} {{ l[10] }}|{{ s[2:7] }}",
      "{{ d.z }} {{ d['a'][1] }} {{ d.missing }}|{{ d.missing is defined }} {{ d.get('z') }} {{ "
      "d.get('q') }}",
      "{{ d | tojson }} {{ l | tojson }} {{ 'é\"\\n' | tojson }} {{ d | tojson(indent=2) }}",
      "{{ d.items() | list }} {{ d.keys() | list }} {{ d.values() | list }} {{ d | items | list }}",
      "{{ 'a' if n > 1 else 'b' }} {{ 'a' if n > 10 }}|{{ n > 1 and 'yes' or 'no' }} {{ not n }}",
      "{{ 1 in [1, 2] }} {{ 'x' in 'abc' }} {{ 'z' in d }} {{ 'a' in d }} {{ 3 not in l }}",
      "{{ n is odd }} {{ n is even }} {{ n is divisibleby 7 }} {{ n is number }} {{ f is float }} "
      "{{ n is integer }}",
      "{{ s is string }} {{ l is sequence }} {{ d is mapping }} {{ none is none }} {{ n is not "
      "none }} {{ true is true }}",
      "{{ l | selectattr('x', 'defined') | list }} {{ [1, 0, 2] | select | list }} {{ [1, 0, 2] | "
      "reject | list }}",
      "{{ messages | map(attribute='role') | list }} {{ messages | map(attribute='zzz', "
      "default='-') | join }}",
      "{{ [1, 2, 3] | join(', ') }} {{ 'abc' | list }} {{ 'abc' | reverse }} {{ [1, 2] | last }} "
      "{{ '' | first }}|",
      "{{ '5' | int + 1 }} {{ 'x' | int }} {{ '2.5' | float }} {{ 3 | float }} {{ -3 | abs }} {{ "
      "2.567 | round(1) }} {{ 3.5 | round }}",
      "{{ 'a b  c'.split() }} {{ 'a,b'.split(',') }} {{ 'a b c'.split(' ', 1) }} {{ "
      "'aXbXc'.split('X', maxsplit=1) }}",
      "{{ 'Hello'.lower() }} {{ 'hello'.upper() }} {{ 'hello world'.title() }} {{ "
      "'hELLO'.capitalize() }}",
      "{{ 'abc'.find('c') }} {{ 'abc'.find('z') }} {{ 'aaa'.count('a') }} {{ ', '.join(['x', 'y']) "
      "}}",
      "{% set ns = namespace(a=1) %}{% set ns.a = ns.a + 1 %}{% set ns.b = 'new' %}{{ ns.a }}{{ "
      "ns.b }}",
      "{% set t %}block {{ n }}{% endset %}[{{ t }}]",
      "{{ 'a' 'b' \"c\" }} {{ 'tab\\there' }} {{ \"it's\" }} {{ 'say \"hi\"' }}",
      "{{ 1 == 1.0 }} {{ true == 1 }} {{ [1] == [1.0] }} {{ 'a' < 'b' }} {{ [1, 2] < [1, 3] }} {{ "
      "none == false }}",
      "{{ undefined_thing }}|{{ undefined_thing | default('d') }}|{{ undefined_thing ~ 'x' }}|{{ "
      "undefined_thing is undefined }}",
      "{{ range(3) | list }} {{ range(1, 10, 3) | list }} {{ range(5, 0, -2) | list }}",
      // failures both must report
      "{{ undefined_thing.attr }}",
      "{{ 'a' + 1 }}",
      "{{ 1 / 0 }}",
      "{{ n % 0 }}",
      "{{ 'a' < 1 }}",
      "{{ raise_exception('custom message: ' ~ n) }}",
      "{% if messages | length > 0 %}{{ raise_exception('bad ' + messages[0].role) }}{% endif %}",
      "{{ undefined_thing + 'x' }}",
  };
  std::vector<Case> cases;
  for (size_t i = 0; i < exprs.size(); ++i)
    cases.push_back({"expression " + std::to_string(i), exprs[i], vars});
  int ok = 0, err = 0;
  compare_with_jinja(cases, &ok, &err);
  if (IsSkipped()) return;
  EXPECT_EQ(err, 8);
}

// A parse error: a mamba::Error (not a render error) whose message has all of `parts`.
void expect_parse_error(const std::string& tmpl, const std::vector<std::string>& parts) {
  try {
    ChatTemplate::parse(tmpl, "t");
    ADD_FAILURE() << "parsed: " << tmpl;
  } catch (const ChatTemplateError& e) {
    ADD_FAILURE() << "a render error at parse time: " << e.what();
  } catch (const mamba::Error& e) {
    const std::string m = e.what();
    for (auto& p : parts) EXPECT_NE(m.find(p), std::string::npos) << "'" << p << "' not in: " << m;
  }
}

TEST(ChatTemplate, UnsupportedConstructsAreRefusedAtParseTime) {
  expect_parse_error("{% macro f() %}x{% endmacro %}",
                     {"line 1, column 1", "'{% macro %}'", "not supported"});
  expect_parse_error("hello\n  {{ x | wordwrap }}", {"line 2, column 8", "filter 'wordwrap'"});
  expect_parse_error("{{ foo() }}", {"column 7", "unknown function 'foo'"});
  expect_parse_error("{{ x.zfill(3) }}", {"method '.zfill()'"});
  expect_parse_error("{{ x is prime }}", {"test 'prime'"});
  expect_parse_error("{% include 'other.jinja' %}", {"'{% include %}'"});
  expect_parse_error("{% for x in y recursive %}{% endfor %}", {"recursive"});
  expect_parse_error("{% set a, b = 1, 2 %}", {"unpacking"});
  expect_parse_error("{{ '\\d' }}", {"escape sequence '\\d'"});
  expect_parse_error("{{ f(*args) }}", {"unknown function 'f'"});
  expect_parse_error("{{ range(*args) }}", {"'*args'"});
  // syntax errors
  expect_parse_error("{% if x %}open", {"unexpected end of template", "'endif'"});
  expect_parse_error("a\nb\n{% endfor %}", {"line 3, column 1", "unexpected 'endfor'"});
  expect_parse_error("{{ 'abc }}", {"string literal is not closed"});
  expect_parse_error("{{ x ", {"'{{' is not closed"});
  expect_parse_error("{# x", {"comment"});
  expect_parse_error("{{ x y }}", {"expected the end of the tag"});
  expect_parse_error("{% set x = [1, 2 %}", {"expected ','"});
  expect_parse_error("{% frobnicate %}", {"unknown tag 'frobnicate'"});
  expect_parse_error("{{ 99999999999999999999 }}", {"out of range"});
  expect_parse_error("{{ x @ y }}", {"unexpected character '@'"});
}

TEST(ChatTemplate, UntrustedTemplatesAreBounded) {
  // nesting: parentheses, blocks, and a long operator chain (built by a loop, freed recursively)
  expect_parse_error("{{ " + std::string(200, '(') + "1" + std::string(200, ')') + " }}",
                     {"nests deeper than 64"});
  std::string ifs;
  for (int i = 0; i < 100; ++i) ifs += "{% if true %}";
  expect_parse_error(ifs, {"nests deeper than 64"});
  std::string chain = "{{ 1";
  for (int i = 0; i < 5000; ++i) chain += " + 1";
  expect_parse_error(chain + " }}", {"nested deeper than 256 operations"});

  ChatTemplateLimits lim;
  lim.max_output_bytes = 1 << 16;
  lim.max_loop_iterations = 10000;
  const ordered_json vars = ordered_json::object();
  auto render_error = [&](const std::string& tmpl, const std::string& part) {
    ChatTemplate t = ChatTemplate::parse(tmpl, "t", lim);
    try {
      t.render(vars);
      ADD_FAILURE() << "rendered: " << tmpl;
    } catch (const ChatTemplateError& e) {
      EXPECT_FALSE(e.raised());
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  render_error("{% for i in range(1000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
               "more than 10000 loop iterations");
  render_error("{{ range(100000000) | length }}", "more than 10000");
  render_error("{{ 'x' * 100000000 }}", "longer than the limit of 65536 bytes");
  render_error("{% for i in range(100) %}{{ 'x' * 1000 }}{% endfor %}", "65536 bytes");
  render_error(
      "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
      "{% endfor %}",
      "65536 bytes");
  render_error(
      "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}"
      "{% endfor %}",
      "more than 10000");
  render_error("{{ 'a'.replace('', 'x' * 60000) ~ 'b' * 10000 }}", "65536 bytes");
  render_error("{{ 2 ** 64 }}", "integer overflow");
  EXPECT_THROW(ChatTemplate::parse(std::string((1 << 16) + 1, 'a'), "t", lim), mamba::Error);
}

TEST(ChatTemplate, FolderTemplateAndSpecialTokens) {
  const fs::path d = scratch() / "folder";
  fs::create_directories(d);
  EXPECT_FALSE(mamba::serve::find_chat_template(d.string()).has_value());
  // a list of named templates: "default" is used; tokens as strings or AddedToken objects
  ordered_json cfg = {
      {"bos_token", "<s>"},
      {"eos_token", {{"__type", "AddedToken"}, {"content", "</s>"}, {"special", true}}},
      {"chat_template", ordered_json::array({{{"name", "tool_use"}, {"template", "T"}},
                                             {{"name", "default"},
                                              {"template", "{{ bos_token }}D{{ eos_token }}"}}})}};
  std::ofstream(d / "tokenizer_config.json") << cfg.dump();
  auto src = mamba::serve::find_chat_template(d.string());
  ASSERT_TRUE(src.has_value());
  ordered_json vars = {{"messages", ordered_json::array()}};
  for (auto& [k, v] : src->special_tokens.items()) vars[k] = v;
  EXPECT_EQ(ChatTemplate::parse(src->source, src->origin).render(vars), "<s>D</s>");
  // chat_template.jinja wins over tokenizer_config.json
  std::ofstream(d / "chat_template.jinja") << "J{{ eos_token }}\n";
  src = mamba::serve::find_chat_template(d.string());
  ASSERT_TRUE(src.has_value());
  EXPECT_EQ(ChatTemplate::parse(src->source, src->origin).render({{"eos_token", "</s>"}}), "J</s>");
  fs::remove(d / "chat_template.jinja");
  // a list without "default" is an error naming the templates
  cfg["chat_template"] = ordered_json::array({{{"name", "tool_use"}, {"template", "T"}}});
  std::ofstream(d / "tokenizer_config.json") << cfg.dump();
  try {
    mamba::serve::find_chat_template(d.string());
    ADD_FAILURE() << "no error";
  } catch (const mamba::Error& e) {
    EXPECT_NE(std::string(e.what()).find("tool_use"), std::string::npos) << e.what();
  }
}

}  // namespace
#endif
