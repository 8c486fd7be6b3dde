#include "runner.h"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <stdexcept>

extern char** environ;

namespace memfit::daemon {
namespace {

class WorkerProcess : public Worker {
 public:
  WorkerProcess(int64_t pid, std::string out_path, int64_t offset, bool child, bool gone, std::string cgroup = "")
      : pid_(pid), tail_(std::move(out_path), offset), child_(child), gone_(gone), cgroup_(std::move(cgroup)) {}
  int64_t pid() const override { return pid_; }
  const std::string& out_path() const override { return tail_.path(); }
  int64_t offset() const override { return tail_.offset(); }
  std::vector<std::string> read_lines() override { return tail_.read(); }
  bool exited() override;
  int exit_code() const override { return exit_code_; }
  int exit_signal() const override { return exit_signal_; }
  void terminate() override {
    if (!gone_) ::kill(static_cast<pid_t>(pid_), SIGTERM);
  }
  void kill() override {
    if (!gone_) ::kill(static_cast<pid_t>(pid_), SIGKILL);
  }

 private:
  int64_t pid_ = 0;
  LineTail tail_;
  bool child_ = true;
  bool gone_ = false;
  int exit_code_ = -1;
  int exit_signal_ = 0;
  std::string cgroup_;  // the worker's own cgroup, removed once it is gone
};

bool WorkerProcess::exited() {
  if (gone_) return true;
  if (child_) {
    int status = 0;
    const pid_t r = ::waitpid(static_cast<pid_t>(pid_), &status, WNOHANG);
    if (r == static_cast<pid_t>(pid_)) {
      gone_ = true;
      if (WIFEXITED(status)) exit_code_ = WEXITSTATUS(status);
      if (WIFSIGNALED(status)) exit_signal_ = WTERMSIG(status);
      if (!cgroup_.empty()) ::rmdir(cgroup_.c_str());  // empty now: its only process is gone
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

bool write_file(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  return ok;
}

// In the child between fork and exec: only async-signal-safe calls. On failure, the step
// and errno go to the parent through the pipe.
[[noreturn]] void child_fail(int pipe_fd, const char* step) {
  const int e = errno;
  (void)!::write(pipe_fd, &e, sizeof e);
  (void)!::write(pipe_fd, step, std::strlen(step));
  _exit(127);
}

void close_from(int lo, int except) {
  // close_range(2) where the kernel has it; the loop elsewhere.
#ifdef SYS_close_range
  if (except > lo) ::syscall(SYS_close_range, lo, except - 1, 0);
  if (::syscall(SYS_close_range, except + 1, ~0U, 0) == 0) return;
#endif
  const long max = ::sysconf(_SC_OPEN_MAX);
  for (int fd = lo; fd < (max > 0 ? max : 65536); ++fd) {
    if (fd != except) ::close(fd);
  }
}

}  // namespace

std::vector<std::string> LineTail::read() {
  std::vector<std::string> out;
  // A worker that floods its output (or, under Slurm's run_as: submitter, a job's owner
  // writing to it) cannot stall the loop or grow memfitd: at most 16 MiB is held, read
  // only as it is used up, and at most kMaxLines lines are handed out per call.
  constexpr size_t kMaxHeld = size_t{16} << 20;
  if (partial_.size() < kMaxHeld) {
    const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
    if (fd < 0) return out;
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) ||
        ::lseek(fd, static_cast<off_t>(offset_ + static_cast<int64_t>(partial_.size())), SEEK_SET) < 0) {
      ::close(fd);
      return out;
    }
    char buf[65536];
    while (partial_.size() < kMaxHeld) {
      const ssize_t n = ::read(fd, buf, sizeof buf);
      if (n <= 0) break;
      partial_.append(buf, static_cast<size_t>(n));
    }
    ::close(fd);
  }
  size_t start = 0;
  bool more = false;  // complete lines left for the next call
  for (size_t nl = partial_.find('\n'); nl != std::string::npos; nl = partial_.find('\n', start)) {
    if (out.size() >= kMaxLines) {
      more = true;
      break;
    }
    // Only a line that begins with '{' (after blanks or a UTF-8 BOM, which the JSON parser
    // skips too) can be an event; others are dropped here, cheaply.
    size_t first = start;
    if (partial_.compare(first, 3, "\xEF\xBB\xBF") == 0 && first + 3 <= nl) first += 3;
    while (first < nl && (partial_[first] == ' ' || partial_[first] == '\t')) ++first;
    if (first < nl && partial_[first] == '{') out.push_back(partial_.substr(start, nl - start));
    start = nl + 1;
  }
  // An event line is small; a longer unterminated one is not an event: drop it.
  if (!more && partial_.size() - start > (size_t{1} << 20)) start = partial_.size();
  offset_ += static_cast<int64_t>(start);
  partial_.erase(0, start);
  return out;
}

bool CgroupUsable(const std::string& dir, std::string* why) {
  std::ifstream c(dir + "/cgroup.controllers");
  if (!c) {
    *why = dir + ": not a cgroup v2 folder (no cgroup.controllers)";
    return false;
  }
  std::string controllers((std::istreambuf_iterator<char>(c)), std::istreambuf_iterator<char>());
  if (controllers.find("memory") == std::string::npos) {
    *why = dir + ": the memory controller is not available there (cgroup.controllers: " + controllers + ")";
    return false;
  }
  std::ifstream st(dir + "/cgroup.subtree_control");
  std::string sub((std::istreambuf_iterator<char>(st)), std::istreambuf_iterator<char>());
  if (sub.find("memory") == std::string::npos && !write_file(dir + "/cgroup.subtree_control", "+memory")) {
    *why = dir + ": cannot enable the memory controller for children (cgroup.subtree_control: " +
           std::strerror(errno) + ")";
    return false;
  }
  if (::access(dir.c_str(), W_OK) != 0) {
    *why = dir + ": not writable by memfitd (delegate it to memfitd's user)";
    return false;
  }
  return true;
}

std::vector<std::string> merge_env(const std::vector<std::string>& base, const std::vector<std::string>& extra) {
  const auto name = [](const std::string& kv) { return kv.substr(0, kv.find('=')); };
  std::vector<std::string> out;
  for (const std::string& kv : base) {
    bool replaced = false;
    for (const std::string& e : extra) replaced = replaced || name(e) == name(kv);
    if (!replaced) out.push_back(kv);
  }
  out.insert(out.end(), extra.begin(), extra.end());
  return out;
}

std::unique_ptr<Worker> ProcessLauncher::start(const WorkerLaunch& l) {
  const std::string out = l.dir + "/worker.out", err = l.dir + "/worker.err";
  std::vector<std::string> argv_s{l.binary};
  argv_s.insert(argv_s.end(), l.args.begin(), l.args.end());
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<std::string> inherited;
  for (char** e = environ; *e != nullptr; ++e) inherited.emplace_back(*e);
  std::vector<std::string> env_s = merge_env(inherited, l.env);
  std::vector<char*> envp;
  for (auto& e : env_s) envp.push_back(e.data());
  envp.push_back(nullptr);

  // The worker's own cgroup, limited before the worker joins it.
  std::string procs, cg;
  if (!l.confine.cgroup_dir.empty() && l.confine.memory_limit_bytes > 0) {
    cg = l.confine.cgroup_dir + "/memfit-" + l.job_id;
    if (::mkdir(cg.c_str(), 0755) != 0 && errno != EEXIST) {
      throw std::runtime_error("worker cgroup " + cg + ": " + std::strerror(errno));
    }
    if (!write_file(cg + "/memory.max", std::to_string(l.confine.memory_limit_bytes))) {
      throw std::runtime_error("worker cgroup " + cg + "/memory.max: " + std::strerror(errno));
    }
    (void)write_file(cg + "/memory.swap.max", "0");
    procs = cg + "/cgroup.procs";
  }
  if (l.confine.uid >= 0 && ::geteuid() != 0) {
    throw std::runtime_error("workers.user: memfitd must run as root to start workers as another user");
  }

  // The stdout file may hold an earlier attempt's lines: read from its current end.
  struct stat st {};
  const int64_t start_offset = ::lstat(out.c_str(), &st) == 0 && S_ISREG(st.st_mode) ? st.st_size : 0;
  int pipefd[2];
  if (::pipe2(pipefd, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int e = errno;
    ::close(pipefd[0]);
    ::close(pipefd[1]);
    throw std::runtime_error(std::string("fork: ") + std::strerror(e));
  }
  if (pid == 0) {
    const int wfd = pipefd[1];
    ::setsid();  // its own session: outlives the daemon, untouched by signals to its group
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    for (int s = 1; s < NSIG; ++s) ::sigaction(s, &dfl, nullptr);
    if (!procs.empty()) {
      const int fd = ::open(procs.c_str(), O_WRONLY | O_CLOEXEC);
      if (fd < 0 || ::write(fd, "0", 1) != 1) child_fail(wfd, "joining the worker cgroup");
      ::close(fd);
    }
    if (l.confine.memory_limit_bytes > 0) {
      const rlimit r{static_cast<rlim_t>(l.confine.memory_limit_bytes), static_cast<rlim_t>(l.confine.memory_limit_bytes)};
      if (::setrlimit(RLIMIT_DATA, &r) != 0) child_fail(wfd, "setting RLIMIT_DATA");
    }
    // Output files are opened before privileges are dropped: they stay the daemon's.
    const int in = ::open("/dev/null", O_RDONLY);
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW, 0640);
    if (o < 0) child_fail(wfd, "opening worker.out in the job folder");
    const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW, 0640);
    if (e < 0) child_fail(wfd, "opening worker.err in the job folder");
    if (in < 0 || ::dup2(in, 0) < 0 || ::dup2(o, 1) < 0 || ::dup2(e, 2) < 0) child_fail(wfd, "redirecting output");
    if (l.confine.gid >= 0) {
      if (::setgroups(0, nullptr) != 0) child_fail(wfd, "dropping supplementary groups");
      if (::setgid(static_cast<gid_t>(l.confine.gid)) != 0) child_fail(wfd, "setgid");
    }
    if (l.confine.uid >= 0 && ::setuid(static_cast<uid_t>(l.confine.uid)) != 0) child_fail(wfd, "setuid");
    if (::chdir(l.dir.c_str()) != 0) child_fail(wfd, "entering the job folder");
    close_from(3, wfd);  // nothing of the daemon's (database, sockets, lock) reaches the worker
    ::execve(l.binary.c_str(), argv.data(), envp.data());
    child_fail(wfd, "exec");
  }
  ::close(pipefd[1]);
  int child_errno = 0;
  char step[128] = {0};
  ssize_t n = 0;
  do {
    n = ::read(pipefd[0], &child_errno, sizeof child_errno);
  } while (n < 0 && errno == EINTR);
  if (n == static_cast<ssize_t>(sizeof child_errno)) {
    const ssize_t m = ::read(pipefd[0], step, sizeof step - 1);
    step[m > 0 ? m : 0] = '\0';
    ::close(pipefd[0]);
    int status = 0;
    ::waitpid(pid, &status, 0);
    throw std::runtime_error("starting " + l.binary + " for " + l.dir + ": " + step + ": " + std::strerror(child_errno));
  }
  ::close(pipefd[0]);
  return std::make_unique<WorkerProcess>(pid, out, start_offset, /*child=*/true, /*gone=*/false, cg);
}

std::unique_ptr<Worker> ProcessLauncher::adopt(int64_t pid, const std::string& out_path, int64_t offset) {
  if (pid <= 0 || ::kill(static_cast<pid_t>(pid), 0) != 0) return nullptr;
  // The pid must still be a memfit-worker (pids are reused).
  std::ifstream cmd("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  std::string argv0;
  std::getline(cmd, argv0, '\0');
  if (argv0.find("memfit-worker") == std::string::npos) return nullptr;
  return std::make_unique<WorkerProcess>(pid, out_path, offset, /*child=*/false, /*gone=*/false);
}

std::unique_ptr<Worker> ProcessLauncher::gone(const std::string& out_path, int64_t offset) {
  return std::make_unique<WorkerProcess>(0, out_path, offset, /*child=*/false, /*gone=*/true);
}

}  // namespace memfit::daemon
