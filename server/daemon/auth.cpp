#include "auth.h"

#include <fstream>
#include <sstream>

namespace memfit::daemon {

Auth Auth::load(const std::string& tokens_file) {
  Auth a;
  if (tokens_file.empty()) return a;
  std::ifstream f(tokens_file);
  if (!f) throw ConfigError("tokens_file: cannot read " + tokens_file);
  a.enabled_ = true;
  std::string line;
  int n = 0;
  while (std::getline(f, line)) {
    ++n;
    const size_t hash = line.find('#');
    if (hash != std::string::npos) line.erase(hash);
    std::istringstream in(line);
    std::string token, user, role, extra;
    if (!(in >> token)) continue;
    if (!(in >> user)) throw ConfigError(tokens_file + ":" + std::to_string(n) + ": expected TOKEN USER [admin]");
    in >> role;
    if ((!role.empty() && role != "admin") || (in >> extra)) {
      throw ConfigError(tokens_file + ":" + std::to_string(n) + ": expected TOKEN USER [admin]");
    }
    if (token.size() < 16) throw ConfigError(tokens_file + ":" + std::to_string(n) + ": tokens need at least 16 characters");
    a.tokens_[token] = Caller{user, role == "admin"};
  }
  if (a.tokens_.empty()) throw ConfigError(tokens_file + ": no tokens");
  return a;
}

std::optional<Caller> Auth::caller(const std::string& authorization) const {
  if (!enabled_) return Caller{};
  const std::string prefix = "Bearer ";
  if (authorization.rfind(prefix, 0) != 0) return std::nullopt;
  const auto it = tokens_.find(authorization.substr(prefix.size()));
  if (it == tokens_.end()) return std::nullopt;
  return it->second;
}

}  // namespace memfit::daemon
