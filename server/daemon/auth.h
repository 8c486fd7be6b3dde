// Bearer-token authentication: a tokens file maps tokens to users ("TOKEN USER [admin]"
// per line, '#' comments). Without a tokens file every caller is the local admin.
#pragma once

#include <map>
#include <optional>
#include <string>

#include "core.h"

namespace memfit::daemon {

class Auth {
 public:
  // Throws ConfigError naming the file and line.
  static Auth load(const std::string& tokens_file);
  bool enabled() const { return enabled_; }
  // The caller for an `authorization` header value ("Bearer TOKEN"); nullopt if refused.
  std::optional<Caller> caller(const std::string& authorization) const;

 private:
  bool enabled_ = false;
  std::map<std::string, Caller> tokens_;
};

}  // namespace memfit::daemon
