// libFuzzer target: arbitrary bytes through a real tokenizer (GPT-NeoX-20B's from ../shared
// when present, else the small test tokenizer): encode the bytes as text (invalid UTF-8 must be
// refused with a mamba::Error), decode them read as int32 ids (any value, negative included),
// and decode what valid text encodes to.
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

#include "fuzz_util.h"
#include "mamba/tokenizer.h"

namespace {
const mamba::Tokenizer& tokenizer() {
  static const mamba::Tokenizer tok = [] {
    const char* env = std::getenv("MAMBA_FUZZ_TOKENIZER");
    std::string path =
        env ? env : MAMBA_TEST_DATA "/../../../shared/tokenizers/gpt-neox-20b-tokenizer.json";
    if (!std::ifstream(path)) path = MAMBA_TEST_DATA "/tokenizer/tiny_bpe_tokenizer.json";
    return mamba::Tokenizer::from_file(path);
  }();
  return tok;
}
}  // namespace

// Loads the tokenizer before the first input (a 2.4 MB tokenizer.json takes over a second to load
// under ASan, which would count as a timeout of that input).
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  (void)tokenizer();
  return 0;
}

void mamba_fuzz::fuzz_one(const uint8_t* data, size_t size) {
  const auto& tok = tokenizer();
  std::vector<int32_t> ids(size / 4);
  if (!ids.empty()) std::memcpy(ids.data(), data, ids.size() * 4);
  (void)tok.decode(ids, false);
  (void)tok.decode(ids, true);
  for (int32_t id : ids) (void)tok.token_bytes(id);
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  const auto enc = tok.encode(text, false);  // throws mamba::Error for invalid UTF-8
  (void)tok.encode(text, true);
  (void)tok.decode(enc, false);
}
