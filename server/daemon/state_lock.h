// One memfitd per state folder: an exclusive flock on <state_dir>/memfitd.lock, taken
// before anything else touches the state, held until the process exits (the kernel drops
// it even after SIGKILL). The file holds the holder's pid, for the message a second daemon
// gives. Not inherited by workers (O_CLOEXEC): a worker that outlives its daemon does not
// keep the next one out.
#pragma once

#include <stdexcept>
#include <string>

namespace memfit::daemon {

class StateLocked : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class StateLock {
 public:
  // Throws StateLocked naming the holder's pid, or std::runtime_error when the folder or
  // the file cannot be made.
  static StateLock acquire(const std::string& state_dir);
  StateLock(StateLock&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  StateLock(const StateLock&) = delete;
  StateLock& operator=(const StateLock&) = delete;
  ~StateLock();

 private:
  explicit StateLock(int fd) : fd_(fd) {}
  int fd_ = -1;
};

}  // namespace memfit::daemon
