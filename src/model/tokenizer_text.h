// Internal to the tokenizer: UTF-8, Unicode classes, normalisation, the GPT-2 split and the
// byte-level alphabet. Not installed; include/mamba/tokenizer.h is the public API.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace mamba::tok {

// Decodes one code point at s[i]; returns its length in bytes, 0 for invalid UTF-8
// (overlong, surrogate, > U+10FFFF, truncated).
int utf8_decode(std::string_view s, size_t i, char32_t* cp);
void utf8_append(std::string& out, char32_t cp);
// Throws mamba::Error naming the first invalid byte offset.
void check_utf8(std::string_view s, const char* what);

// The character classes of the GPT-2 split rule.
enum class CharClass : uint8_t { Letter, Number, Space, Other };
CharClass char_class(char32_t cp);
bool is_whitespace(char32_t cp);  // Unicode White_Space (Rust char::is_whitespace)
bool is_word_char(char32_t cp);   // letter, number or '_' (added tokens' single_word)

enum class NormForm : uint8_t { NFC, NFD, NFKC, NFKD };
// Normalises valid UTF-8 (ASCII passes through untouched).
std::string normalize(std::string_view s, NormForm form);

// The GPT-2 split of valid UTF-8: (begin, end) byte ranges covering `s` in order.
void split_gpt2(std::string_view s, std::vector<std::pair<uint32_t, uint32_t>>& out);

// GPT-2's bytes_to_unicode: byte -> code point of the printable stand-in.
const std::array<char32_t, 256>& byte_to_cp();
// The inverse: code point -> byte, or -1 (for code points < 324; larger ones are never in it).
int cp_to_byte(char32_t cp);

}  // namespace mamba::tok
