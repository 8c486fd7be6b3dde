#include "events.h"

#include "confined.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <iostream>

namespace memfit::train {

void Events::open_log(const std::string& path) {
  if (log_ != nullptr) std::fclose(log_);
  log_ = nullptr;
  const int fd = fsx::open_output(path, O_WRONLY | O_CREAT | O_APPEND, 0640);  // never through a link
  log_ = ::fdopen(fd, "a");
  if (log_ == nullptr) {
    ::close(fd);
    throw fsx::OutputError(path + ": cannot open", errno);
  }
}

Events::~Events() {
  if (log_ != nullptr) std::fclose(log_);
}

void Events::emit(nlohmann::json event) {
  event["time"] = now_seconds();
  const std::string line = event.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::fwrite(line.data(), 1, line.size(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
  if (log_ != nullptr) {
    std::fwrite(line.data(), 1, line.size(), log_);
    std::fputc('\n', log_);
    std::fflush(log_);
  }
}

double now_seconds() {
  using namespace std::chrono;
  return duration_cast<duration<double>>(system_clock::now().time_since_epoch()).count();
}

}  // namespace memfit::train
