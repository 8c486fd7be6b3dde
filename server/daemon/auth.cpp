#include "auth.h"

#include <sys/stat.h>

#include <cstdio>
#include <fstream>
#include <sstream>

namespace memfit::daemon {

Auth Auth::load(const std::string& tokens_file) {
  Auth a;
  if (tokens_file.empty()) return a;
  struct stat st {};
  if (::stat(tokens_file.c_str(), &st) != 0) throw ConfigError("tokens_file: cannot read " + tokens_file);
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%03o", st.st_mode & 0777);
    throw ConfigError("tokens_file: " + tokens_file + " is readable by others (mode " + mode +
                      "); it holds secrets: chmod 600 it");
  }
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
    if (a.tokens_.count(token)) {
      throw ConfigError(tokens_file + ":" + std::to_string(n) + ": this token is already given on an earlier line; "
                        "each token must be unique");
    }
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
