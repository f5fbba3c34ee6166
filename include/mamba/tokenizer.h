// Byte-level BPE tokenizer read from a Hugging Face tokenizer.json (the GPT-NeoX-20B tokenizer
// used by every state-spaces Mamba model, and others of the same kind).
//
// Pipeline of encode(), as Hugging Face's `tokenizers` runs it:
//   1. added tokens with normalized=false (e.g. <|endoftext|>) are cut out of the raw text
//      (leftmost, then longest match);
//   2. the pieces between them are normalised (NFC / NFD / NFKC / NFKD / Sequence / none);
//   3. added tokens with normalized=true (NeoX's runs of 2..24 spaces) are cut out of those;
//   4. the rest is split by the GPT-2 rule
//        's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//      (matched by hand with Unicode categories, no regex engine), each word's bytes are mapped
//      to the byte-level alphabet and merged by BPE rank (results cached per word).
// decode() is the ByteLevel decoder: token strings back to bytes, then UTF-8 with invalid
// sequences replaced by U+FFFD (as Rust's from_utf8_lossy does).
//
// tokenizer.json is treated as hostile: every malformed, missing or unsupported field is a
// mamba::Error naming it, never a crash.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace mamba {

class Tokenizer {
 public:
  // Reads a tokenizer.json file.
  static Tokenizer from_file(const std::string& path);
  // The same from the file's contents; `origin` names it in error messages.
  static Tokenizer from_json_string(std::string_view json,
                                    const std::string& origin = "tokenizer.json");
  // `dir`/tokenizer.json (a model folder); a clear error when the folder has none.
  // (`dir` may also be a .gguf file: from_gguf.)
  static Tokenizer from_model_dir(const std::string& dir);
  // The vocabulary a GGUF file embeds (tokenizer.ggml.model = "gpt2": tokens, token_type,
  // merges), as the equivalent tokenizer.json (NFC, ByteLevel; CONTROL tokens special added
  // tokens, USER_DEFINED ones normalised added tokens, UNUSED padding tokens left out).
  static Tokenizer from_gguf(const std::string& path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Text (UTF-8; invalid UTF-8 is a mamba::Error naming the byte offset) -> token ids.
  // add_special_tokens applies the post-processor's template (ByteLevel: nothing to add;
  // TemplateProcessing / RobertaProcessing / BertProcessing: the tokens around the sequence).
  // Thread-safe.
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = false) const;

  // Token ids -> text. Ids with no token (e.g. the padded rows of an embedding) are skipped,
  // as Hugging Face does; skip_special_tokens drops added tokens marked special.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  // The raw bytes one token stands for (the ByteLevel decoder applied to that token alone);
  // may be an incomplete UTF-8 sequence. Empty for an id with no token.
  std::string token_bytes(int32_t id) const;

  // The token's string as written in tokenizer.json (byte-level alphabet, e.g. "Ġworld").
  // Throws for an id with no token.
  const std::string& id_to_token(int32_t id) const;
  // Throws mamba::Error when the token is not in the vocabulary (model vocab or added tokens).
  int32_t token_to_id(std::string_view token) const;
  std::optional<int32_t> find_token(std::string_view token) const;

  // The end-of-sequence token: the first special added token among <|endoftext|>, </s>,
  // <|end_of_text|>, <eos>, <|eot_id|>, <|im_end|>; nullopt when there is none.
  std::optional<int32_t> eos_id() const;
  bool is_special(int32_t id) const;

  // 1 + the largest id (model vocab and added tokens): 50277 for GPT-NeoX-20B.
  size_t vocab_size() const;

  // The GPT-2 pre-tokenizer split (step 4 above) of already-normalised UTF-8 text, exposed
  // for tests. Throws on invalid UTF-8.
  static std::vector<std::string> split_words(std::string_view text);
  // Unicode normalisation form C of valid UTF-8 (throws on invalid UTF-8).
  static std::string nfc(std::string_view text);

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Turns a stream of token ids into UTF-8 text as they arrive (for generation): holds back the
// bytes of a character split across tokens until it is complete.
class TokenStreamDecoder {
 public:
  explicit TokenStreamDecoder(const Tokenizer& tok, bool skip_special_tokens = false)
      : tok_(&tok), skip_special_(skip_special_tokens) {}
  // Appends one token; returns the text that is now complete (possibly empty).
  std::string push(int32_t id);
  // Whatever is still held back (invalid bytes become U+FFFD).
  std::string flush();

 private:
  const Tokenizer* tok_;
  bool skip_special_;
  std::string pending_;
};

// Replaces invalid UTF-8 with U+FFFD, one per maximal invalid subpart (Rust from_utf8_lossy).
std::string utf8_lossy(std::string_view bytes);

}  // namespace mamba
