// libFuzzer target: tokenizer.json loading (model, added tokens, normalizer, pre-tokenizer,
// post-processor, decoder); an accepted tokenizer then encodes and decodes a fixed text.
#include <string_view>

#include "fuzz_util.h"
#include "mamba/tokenizer.h"

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  const auto tok = mamba::Tokenizer::from_json_string(
      std::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  const auto ids = tok.encode("Hello world! <|endoftext|> caf\xC3\xA9 123  \n\tx", true);
  (void)tok.decode(ids, false);
  (void)tok.decode(ids, true);
  (void)tok.eos_id();
  (void)tok.vocab_size();
}
