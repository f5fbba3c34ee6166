// UTF-8, Unicode classes (from utf8proc), normalisation and the GPT-2 split, done by hand.
#include "model/tokenizer_text.h"

#include <utf8proc.h>

#include <cstdlib>
#include <memory>

#include "mamba/error.h"

namespace mamba::tok {

int utf8_decode(std::string_view s, size_t i, char32_t* cp) {
  const size_t n = s.size();
  const auto b0 = static_cast<uint8_t>(s[i]);
  if (b0 < 0x80) {
    *cp = b0;
    return 1;
  }
  int len;
  char32_t c;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    len = 2, c = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    len = 3, c = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;  // overlong
    if (b0 == 0xED) hi = 0x9F;  // surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    len = 4, c = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;  // overlong
    if (b0 == 0xF4) hi = 0x8F;  // > U+10FFFF
  } else {
    return 0;
  }
  if (i + len > n) return 0;
  for (int k = 1; k < len; ++k) {
    const auto b = static_cast<uint8_t>(s[i + k]);
    const uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (b < l || b > h) return 0;
    c = (c << 6) | (b & 0x3F);
  }
  *cp = c;
  return len;
}

void utf8_append(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

void check_utf8(std::string_view s, const char* what) {
  for (size_t i = 0; i < s.size();) {
    if (static_cast<uint8_t>(s[i]) < 0x80) {
      ++i;
      continue;
    }
    char32_t cp;
    const int len = utf8_decode(s, i, &cp);
    MAMBA_CHECK(len > 0, what, ": invalid UTF-8 at byte ", i, " (byte 0x", std::hex,
                static_cast<int>(static_cast<uint8_t>(s[i])), ")");
    i += len;
  }
}

bool is_whitespace(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D);
  return c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 ||
         c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

namespace {

struct AsciiClasses {
  std::array<CharClass, 128> c{};
  AsciiClasses() {
    for (int i = 0; i < 128; ++i) {
      CharClass k = CharClass::Other;
      if ((i >= 'a' && i <= 'z') || (i >= 'A' && i <= 'Z'))
        k = CharClass::Letter;
      else if (i >= '0' && i <= '9')
        k = CharClass::Number;
      else if (i == ' ' || (i >= 0x09 && i <= 0x0D))
        k = CharClass::Space;
      c[i] = k;
    }
  }
};
const AsciiClasses kAscii;

}  // namespace

CharClass char_class(char32_t cp) {
  if (cp < 0x80) return kAscii.c[cp];
  if (is_whitespace(cp)) return CharClass::Space;
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
      return CharClass::Letter;
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO:
      return CharClass::Number;
    default:
      return CharClass::Other;
  }
}

bool is_word_char(char32_t cp) {
  const CharClass k = char_class(cp);
  return k == CharClass::Letter || k == CharClass::Number || cp == '_';
}

std::string normalize(std::string_view s, NormForm form) {
  bool ascii = true;
  for (char ch : s)
    if (static_cast<uint8_t>(ch) >= 0x80) {
      ascii = false;
      break;
    }
  if (ascii) return std::string(s);
  int opts = UTF8PROC_STABLE;
  switch (form) {
    case NormForm::NFC:
      opts |= UTF8PROC_COMPOSE;
      break;
    case NormForm::NFD:
      opts |= UTF8PROC_DECOMPOSE;
      break;
    case NormForm::NFKC:
      opts |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT;
      break;
    case NormForm::NFKD:
      opts |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT;
      break;
  }
  utf8proc_uint8_t* dst = nullptr;
  const utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                          static_cast<utf8proc_ssize_t>(s.size()), &dst,
                                          static_cast<utf8proc_option_t>(opts));
  std::unique_ptr<utf8proc_uint8_t, decltype(&std::free)> guard(dst, &std::free);
  MAMBA_CHECK(n >= 0, "Unicode normalisation failed: ", utf8proc_errmsg(n));
  return std::string(reinterpret_cast<const char*>(dst), static_cast<size_t>(n));
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// with the alternatives tried in order at each position, as a backtracking regex engine does.
void split_gpt2(std::string_view s, std::vector<std::pair<uint32_t, uint32_t>>& out) {
  MAMBA_CHECK(s.size() < (1ull << 32) - 1, "text too long to tokenize in one piece: ", s.size(),
              " bytes");
  // Code points with their classes and byte offsets (offs has one extra entry: the end).
  thread_local std::vector<char32_t> cps;
  thread_local std::vector<CharClass> cls;
  thread_local std::vector<uint32_t> offs;
  cps.clear(), cls.clear(), offs.clear();
  for (size_t i = 0; i < s.size();) {
    char32_t cp;
    const int len = utf8_decode(s, i, &cp);
    MAMBA_CHECK(len > 0, "text: invalid UTF-8 at byte ", i);
    cps.push_back(cp);
    cls.push_back(char_class(cp));
    offs.push_back(static_cast<uint32_t>(i));
    i += len;
  }
  offs.push_back(static_cast<uint32_t>(s.size()));
  const size_t n = cps.size();
  auto emit = [&](size_t a, size_t b) { out.emplace_back(offs[a], offs[b]); };
  size_t i = 0;
  while (i < n) {
    const char32_t c = cps[i];
    // 's 't 're 've 'm 'll 'd (case-sensitive, ASCII apostrophe only)
    if (c == '\'' && i + 1 < n) {
      const char32_t a = cps[i + 1];
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < n) {
        const char32_t b = cps[i + 2];
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
          emit(i, i + 3);
          i += 3;
          continue;
        }
      }
    }
    // ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+'
    size_t j = i;
    CharClass kind = cls[i];
    if (c == ' ' && i + 1 < n && cls[i + 1] != CharClass::Space) kind = cls[i + 1], j = i + 1;
    if (kind != CharClass::Space) {
      while (j < n && cls[j] == kind) ++j;
      emit(i, j);
      i = j;
      continue;
    }
    // '\s+(?!\S)' then '\s+'
    size_t k = i;
    while (k < n && cls[k] == CharClass::Space) ++k;
    size_t e = k;
    if (k < n && k - 1 > i) e = k - 1;  // leave the last space to prefix the next word
    emit(i, e);
    i = e;
  }
}

namespace {

struct ByteMap {
  std::array<char32_t, 256> fwd{};
  std::array<int16_t, 324> inv{};
  ByteMap() {
    inv.fill(-1);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      fwd[b] = printable ? static_cast<char32_t>(b) : next++;
      inv[fwd[b]] = static_cast<int16_t>(b);
    }
  }
};
const ByteMap kByteMap;

}  // namespace

const std::array<char32_t, 256>& byte_to_cp() { return kByteMap.fwd; }
int cp_to_byte(char32_t cp) { return cp < 324 ? kByteMap.inv[cp] : -1; }

}  // namespace mamba::tok
