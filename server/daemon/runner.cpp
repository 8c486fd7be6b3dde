#include "runner.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>

extern char** environ;

namespace memfit::daemon {

WorkerProcess WorkerProcess::start(const WorkerLaunch& l) {
  const std::string out = l.dir + "/worker.out", err = l.dir + "/worker.err";
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&fa, STDOUT_FILENO, out.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_addopen(&fa, STDERR_FILENO, err.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  // Its own session: signals to the daemon's group do not reach it, and it survives the
  // daemon.
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  posix_spawnattr_setsigmask(&attr, &none);
  posix_spawnattr_setsigdefault(&attr, &all);
  std::vector<std::string> argv_s{l.binary};
  argv_s.insert(argv_s.end(), l.args.begin(), l.args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> env_s;
  for (char** e = environ; *e != nullptr; ++e) env_s.emplace_back(*e);
  env_s.insert(env_s.end(), l.env.begin(), l.env.end());
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);
  // The stdout file may hold an earlier attempt's lines: read from its current end.
  struct stat st {};
  const int64_t start_offset = ::stat(out.c_str(), &st) == 0 ? st.st_size : 0;
  pid_t pid = 0;
  const int rc = posix_spawn(&pid, l.binary.c_str(), &fa, &attr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&fa);
  posix_spawnattr_destroy(&attr);
  if (rc != 0) throw std::runtime_error("starting " + l.binary + ": " + std::strerror(rc));
  WorkerProcess w;
  w.pid_ = pid;
  w.out_path_ = out;
  w.offset_ = start_offset;
  w.child_ = true;
  return w;
}

std::optional<WorkerProcess> WorkerProcess::adopt(int64_t pid, const std::string& out_path, int64_t offset) {
  if (pid <= 0 || ::kill(static_cast<pid_t>(pid), 0) != 0) return std::nullopt;
  // The pid must still be a memfit-worker (pids are reused).
  std::ifstream cmd("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string argv0;
  std::getline(cmd, argv0, '\0');
  if (argv0.find("memfit-worker") == std::string::npos) return std::nullopt;
  WorkerProcess w;
  w.pid_ = pid;
  w.out_path_ = out_path;
  w.offset_ = offset;
  w.child_ = false;
  return w;
}

WorkerProcess WorkerProcess::gone(const std::string& out_path, int64_t offset) {
  WorkerProcess w;
  w.out_path_ = out_path;
  w.offset_ = offset;
  w.child_ = false;
  w.gone_ = true;
  return w;
}

std::vector<std::string> WorkerProcess::read_lines() {
  std::vector<std::string> out;
  const int fd = ::open(out_path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return out;
  if (::lseek(fd, static_cast<off_t>(offset_ + static_cast<int64_t>(partial_.size())), SEEK_SET) < 0) {
    ::close(fd);
    return out;
  }
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    partial_.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  size_t start = 0;
  for (size_t nl = partial_.find('\n'); nl != std::string::npos; nl = partial_.find('\n', start)) {
    out.push_back(partial_.substr(start, nl - start));
    start = nl + 1;
  }
  offset_ += static_cast<int64_t>(start);
  partial_.erase(0, start);
  return out;
}

bool WorkerProcess::exited() {
  if (gone_) return true;
  if (child_) {
    int status = 0;
    const pid_t r = ::waitpid(static_cast<pid_t>(pid_), &status, WNOHANG);
    if (r == static_cast<pid_t>(pid_)) {
      gone_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    } else if (r < 0 && errno == ECHILD) {
      gone_ = true;
    }
    return gone_;
  }
  if (::kill(static_cast<pid_t>(pid_), 0) != 0 && errno == ESRCH) gone_ = true;
  // A zombie of an adopted worker belongs to init; /proc shows it as state Z.
  if (!gone_) {
    std::ifstream stat("/proc/" + std::to_string(pid_) + "/stat");
    std::string s;
    std::getline(stat, s);
    const size_t close = s.rfind(')');
    if (close != std::string::npos && close + 2 < s.size() && s[close + 2] == 'Z') gone_ = true;
  }
  return gone_;
}

void WorkerProcess::terminate() {
  if (!gone_) ::kill(static_cast<pid_t>(pid_), SIGTERM);
}

void WorkerProcess::kill() {
  if (!gone_) ::kill(static_cast<pid_t>(pid_), SIGKILL);
}

}  // namespace memfit::daemon
