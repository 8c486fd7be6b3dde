#include "text.h"

#include <cstdint>
#include <cstdio>

namespace memfit::cli {
namespace {

void escape_byte(std::string& out, unsigned char c) {
  switch (c) {
    case '\n': out += "\\n"; return;
    case '\r': out += "\\r"; return;
    case '\t': out += "\\t"; return;
    default: break;
  }
  char buf[8];
  std::snprintf(buf, sizeof buf, "\\x%02x", c);
  out += buf;
}

// Code points that are invisible but move or reorder what a terminal shows.
bool is_control(uint32_t cp) {
  return (cp >= 0x80 && cp <= 0x9F)            // C1: CSI (U+009B), OSC (U+009D), ...
         || cp == 0x061C                         // Arabic letter mark
         || cp == 0x200E || cp == 0x200F         // left-to-right, right-to-left marks
         || cp == 0x2028 || cp == 0x2029         // line, paragraph separators
         || (cp >= 0x202A && cp <= 0x202E)       // bidi embeddings and overrides
         || (cp >= 0x2066 && cp <= 0x2069);      // bidi isolates
}

// The length of the valid UTF-8 sequence at s[i] (2..4) and its code point; 0 if the
// bytes there are not one (a stray continuation byte, an overlong form, a surrogate,
// beyond U+10FFFF, or cut short by the end of s).
size_t utf8_sequence(std::string_view s, size_t i, uint32_t* cp) {
  const auto c = static_cast<unsigned char>(s[i]);
  size_t n;
  uint32_t v, min;
  if ((c & 0xE0) == 0xC0) n = 2, v = c & 0x1Fu, min = 0x80;
  else if ((c & 0xF0) == 0xE0) n = 3, v = c & 0x0Fu, min = 0x800;
  else if ((c & 0xF8) == 0xF0) n = 4, v = c & 0x07u, min = 0x10000;
  else return 0;
  if (i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    const auto cc = static_cast<unsigned char>(s[i + k]);
    if ((cc & 0xC0) != 0x80) return 0;
    v = (v << 6) | (cc & 0x3Fu);
  }
  if (v < min || v > 0x10FFFF || (v >= 0xD800 && v <= 0xDFFF)) return 0;
  *cp = v;
  return n;
}

std::string escape(std::string_view s, bool keep_lines) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      if ((c >= 0x20 && c != 0x7F) || (keep_lines && (c == '\n' || c == '\t'))) out += static_cast<char>(c);
      else escape_byte(out, c);
      ++i;
      continue;
    }
    uint32_t cp = 0;
    const size_t n = utf8_sequence(s, i, &cp);
    if (n == 0) {
      escape_byte(out, c);
      ++i;
      continue;
    }
    if (is_control(cp)) {
      char buf[12];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(cp));
      out += buf;
    } else {
      out.append(s.substr(i, n));
    }
    i += n;
  }
  return out;
}

}  // namespace

std::string printable(std::string_view s) { return escape(s, false); }

std::string printable_lines(std::string_view s) { return escape(s, true); }

size_t utf8_complete_prefix(std::string_view s) {
  // A lead byte in the last three bytes whose sequence runs past the end: cut before it.
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    const auto c = static_cast<unsigned char>(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // a continuation byte: look further back
    size_t n = 1;
    if ((c & 0xE0) == 0xC0) n = 2;
    else if ((c & 0xF0) == 0xE0) n = 3;
    else if ((c & 0xF8) == 0xF0) n = 4;
    return n > back ? s.size() - back : s.size();
  }
  return s.size();
}

size_t display_width(std::string_view s) {
  size_t w = 0;
  for (char ch : s) w += (static_cast<unsigned char>(ch) & 0xC0) != 0x80;
  return w;
}

}  // namespace memfit::cli
