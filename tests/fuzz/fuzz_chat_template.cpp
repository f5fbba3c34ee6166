// libFuzzer target: chat template text (untrusted: it comes with a downloaded model folder) ->
// ChatTemplate::parse, then render over a small conversation. Parse errors are mamba::Error,
// render errors ChatTemplateError (a mamba::Error); anything else, a crash, a leak or a
// timeout is a finding. Small limits keep each input fast.
#include <nlohmann/json.hpp>
#include <string>

#include "fuzz_util.h"
#include "serve/chat_template.h"

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  mamba::serve::ChatTemplateLimits lim;
  lim.max_output_bytes = 1 << 16;
  lim.max_loop_iterations = 20000;
  const auto t = mamba::serve::ChatTemplate::parse(text, "fuzz", lim);
  static const nlohmann::ordered_json vars = {
      {"messages",
       {{{"role", "system"}, {"content", " Be brief. "}},
        {{"role", "user"}, {"content", "Hi \xC3\xA9 {{ x }}"}, {"name", "bob"}},
        {{"role", "assistant"}, {"content", "Hello."}}}},
      {"add_generation_prompt", true},
      {"bos_token", "<s>"},
      {"eos_token", "</s>"}};
  (void)t.render(vars);
}
