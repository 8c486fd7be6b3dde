#include "args.h"

#include <algorithm>
#include <cctype>

namespace memfit::cli {

size_t edit_distance(std::string_view a, std::string_view b) {
  const size_t n = a.size(), m = b.size();
  std::vector<std::vector<size_t>> d(n + 1, std::vector<size_t>(m + 1, 0));
  for (size_t i = 0; i <= n; ++i) d[i][0] = i;
  for (size_t j = 0; j <= m; ++j) d[0][j] = j;
  for (size_t i = 1; i <= n; ++i) {
    for (size_t j = 1; j <= m; ++j) {
      const size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[n][m];
}

std::string closest(std::string_view typed, const std::vector<std::string>& names) {
  std::string best;
  size_t best_d = SIZE_MAX;
  for (const auto& name : names) {
    const size_t limit = name.size() <= 4 ? 1 : 2;
    const size_t d = edit_distance(typed, name);
    const size_t dashes = std::min(name.find_first_not_of('-'), name.size());
    // Less than half of the name's own letters changed: "-x" is no typo of "-o".
    if (d <= limit && d < best_d && 2 * d < name.size() - dashes) {
      best = name;
      best_d = d;
    }
  }
  if (!best.empty()) return best;
  // A prefix of exactly one name ("sub" -> "submit"); "--" alone is no prefix.
  const size_t dashes = typed.find_first_not_of('-');
  if (dashes == std::string_view::npos || typed.size() - dashes < 2) return "";
  std::string only;
  for (const auto& name : names) {
    if (name.size() > typed.size() && name.compare(0, typed.size(), typed) == 0) {
      if (!only.empty()) return "";
      only = name;
    }
  }
  return only;
}

namespace {

const char* kAccepted = "expected host, host:port, [v6]:port, grpc://host[:port] or dns:///host[:port]";

bool host_ok(std::string_view h) {
  if (h.empty()) return false;
  return std::all_of(h.begin(), h.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_';
  });
}

bool v6_ok(std::string_view h) {
  if (h.find(':') == std::string_view::npos) return false;
  return std::all_of(h.begin(), h.end(), [](char c) {
    return std::isxdigit(static_cast<unsigned char>(c)) || c == ':' || c == '.' || c == '%' ||
           std::isalnum(static_cast<unsigned char>(c));
  });
}

bool port_ok(std::string_view p) {
  if (p.empty() || p.size() > 5) return false;
  if (!std::all_of(p.begin(), p.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
  const int x = std::stoi(std::string(p));
  return x >= 1 && x <= 65535;
}

// host, host:port, [v6], [v6]:port, bare v6 -> host:port with the default port added.
std::string host_port(std::string_view s, const std::string& value) {
  auto bad = [&]() { return std::invalid_argument(std::string(kAccepted) + ", got '" + value + "'"); };
  const std::string dflt = std::to_string(kDefaultPort);
  if (!s.empty() && s[0] == '[') {
    const size_t close = s.find(']');
    if (close == std::string_view::npos || !v6_ok(s.substr(1, close - 1))) throw bad();
    const std::string_view rest = s.substr(close + 1);
    if (rest.empty()) return std::string(s) + ":" + dflt;
    if (rest[0] != ':' || !port_ok(rest.substr(1))) throw bad();
    return std::string(s);
  }
  const size_t colons = static_cast<size_t>(std::count(s.begin(), s.end(), ':'));
  if (colons >= 2) {  // a bare IPv6 address: no port can follow without brackets
    if (!v6_ok(s)) throw bad();
    return "[" + std::string(s) + "]:" + dflt;
  }
  if (colons == 1) {
    const size_t c = s.find(':');
    if (!host_ok(s.substr(0, c)) || !port_ok(s.substr(c + 1))) throw bad();
    return std::string(s);
  }
  if (!host_ok(s)) throw bad();
  return std::string(s) + ":" + dflt;
}

}  // namespace

std::string server_target(const std::string& value) {
  std::string_view s = value;
  if (s.rfind("grpc://", 0) == 0) {
    s.remove_prefix(7);
    if (!s.empty() && s.back() == '/') s.remove_suffix(1);
    return host_port(s, value);
  }
  if (s.rfind("dns:///", 0) == 0) return "dns:///" + host_port(s.substr(7), value);
  return host_port(s, value);
}

size_t tail_start(std::string_view data, int64_t n, bool at_start) {
  if (n <= 0) return data.size();
  size_t end = data.size();
  if (end > 0 && data[end - 1] == '\n') --end;  // the last line's own line feed
  int64_t found = 0;
  while (end > 0) {
    const size_t nl = data.rfind('\n', end - 1);
    if (nl == std::string_view::npos) break;
    if (++found == n) return nl + 1;
    end = nl;
  }
  return at_start ? 0 : std::string_view::npos;
}

}  // namespace memfit::cli
