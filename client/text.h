// Text from elsewhere (memfitd's job names, event messages, failures, errors; a spec
// file's strings) made safe to print on a terminal: the CLI never prints a control
// character it did not write itself, so a job named "\x1b]0;pwned\a" or "\x1b[2J" cannot
// retitle, clear or recolour the user's terminal. JSON output needs none of this (JSON
// escapes control characters); YAML output is escaped by yaml-cpp.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace memfit::cli {

// s with every control character written as a visible escape: ESC and the other C0
// characters and DEL as \xNN (\n, \r, \t as such), the C1 controls (U+0080..U+009F),
// Unicode's line and paragraph separators and its bidirectional marks, embeddings,
// overrides and isolates as \uNNNN, and every byte that is not part of valid UTF-8 as
// \xNN. Everything else (printable ASCII, valid UTF-8 text) is kept as it is.
std::string printable(std::string_view s);

// The same for a log stream shown on a terminal: line feeds and tabs are kept, so lines
// stay lines.
std::string printable_lines(std::string_view s);

// The length of the longest prefix of s that does not end inside a UTF-8 sequence which
// more bytes could still complete (for text that arrives in chunks).
size_t utf8_complete_prefix(std::string_view s);

// Terminal columns of printable() text: one per code point (wide characters are rare in
// job names; combining marks rarer).
size_t display_width(std::string_view s);

}  // namespace memfit::cli
