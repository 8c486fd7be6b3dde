#include "slurm.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "metrics_view.h"

extern char** environ;

namespace memfit::daemon {

using json = nlohmann::json;

int ShardsFor(int64_t reservation_bytes, const SlurmConfig& s) {
  if (s.shard_memory <= 0) throw std::invalid_argument("slurm.shard_memory must be positive");
  const int64_t n = reservation_bytes <= 0 ? 1 : (reservation_bytes + s.shard_memory - 1) / s.shard_memory;
  return n > 1000000 ? 1000000 : static_cast<int>(n);
}

std::string ShellQuote(const std::string& word) {
  std::string o = "'";
  for (char c : word) {
    if (c == '\'') o += "'\\''";
    else o += c;
  }
  return o + "'";
}

std::string SlurmBatchScript(const WorkerLaunch& l) {
  std::string s = "#!/bin/sh\n# memfit job " + l.job_id + ": written by memfitd, one worker attempt\n";
  for (const auto& kv : l.env) {
    const size_t eq = kv.find('=');
    if (eq == std::string::npos || eq == 0) continue;
    const std::string name = kv.substr(0, eq);
    bool ok = true;
    for (char c : name) ok = ok && (std::isalnum(static_cast<unsigned char>(c)) || c == '_');
    if (!ok) continue;  // not a shell variable name: never reaches the script
    s += "export " + name + "=" + ShellQuote(kv.substr(eq + 1)) + "\n";
  }
  s += "exec " + ShellQuote(l.binary);
  for (const auto& a : l.args) s += " " + ShellQuote(a);
  return s + "\n";
}

std::vector<std::string> SbatchArgs(const WorkerLaunch& l, const SlurmConfig& s, const std::string& script_path) {
  std::vector<std::string> a = {"--parsable",
                                "--job-name=memfit-" + l.job_id,
                                "--partition=" + s.partition,
                                "--gres=shard:" + std::to_string(ShardsFor(l.reservation_bytes, s)),
                                "--ntasks=1",
                                "--output=" + l.dir + "/worker.out",
                                "--error=" + l.dir + "/worker.err",
                                "--open-mode=append",
                                "--chdir=" + l.dir,
                                "--no-requeue",
                                "--export=NONE"};
  if (l.confine.memory_limit_bytes > 0) {
    a.push_back("--mem=" + std::to_string((l.confine.memory_limit_bytes + (int64_t{1} << 20) - 1) >> 20) + "M");
  }
  if (l.confine.uid >= 0) a.push_back("--uid=" + std::to_string(l.confine.uid));
  if (l.confine.gid >= 0) a.push_back("--gid=" + std::to_string(l.confine.gid));
  a.insert(a.end(), s.sbatch_args.begin(), s.sbatch_args.end());
  a.push_back(script_path);
  return a;
}

namespace {

// sbatch 22.05's options (sbatch(1), and the aliases its option table adds): the long
// name, the short letter (0: none), and whether a value is needed (1), optional (2) or
// not taken (0).
struct SbatchOption {
  const char* name;
  char letter;
  int has_arg;
};
constexpr SbatchOption kSbatchOptions[] = {
    {"account", 'A', 1}, {"acctg-freq", 0, 1}, {"array", 'a', 1}, {"batch", 0, 1}, {"bb", 0, 1}, {"bbf", 0, 1},
    {"begin", 'b', 1}, {"chdir", 'D', 1}, {"cluster", 0, 1}, {"cluster-constraint", 0, 1}, {"clusters", 'M', 1},
    {"comment", 0, 1}, {"constraint", 'C', 1}, {"container", 0, 1}, {"context", 0, 1}, {"contiguous", 0, 0},
    {"core-spec", 'S', 1}, {"cores-per-socket", 0, 1}, {"cpu-freq", 0, 1}, {"cpus-per-gpu", 0, 1},
    {"cpus-per-task", 'c', 1}, {"deadline", 0, 1}, {"delay-boot", 0, 1}, {"dependency", 'd', 1},
    {"distribution", 'm', 1}, {"error", 'e', 1}, {"exclude", 'x', 1}, {"exclusive", 0, 2}, {"export", 0, 1},
    {"export-file", 0, 1}, {"extra-node-info", 'B', 1}, {"get-user-env", 0, 2}, {"gid", 0, 1}, {"gpu-bind", 0, 1},
    {"gpu-freq", 0, 1}, {"gpus", 'G', 1}, {"gpus-per-node", 0, 1}, {"gpus-per-socket", 0, 1},
    {"gpus-per-task", 0, 1}, {"gres", 0, 1}, {"gres-flags", 0, 1}, {"help", 'h', 0}, {"hint", 0, 1},
    {"hold", 'H', 0}, {"ignore-pbs", 0, 0}, {"input", 'i', 1}, {"job-name", 'J', 1}, {"kill-on-invalid-dep", 0, 1},
    {"licenses", 'L', 1}, {"mail-type", 0, 1}, {"mail-user", 0, 1}, {"mcs-label", 0, 1}, {"mem", 0, 1},
    {"mem-bind", 0, 1}, {"mem-per-cpu", 0, 1}, {"mem-per-gpu", 0, 1}, {"mincpus", 0, 1}, {"network", 0, 1},
    {"nice", 0, 2}, {"no-kill", 'k', 2}, {"no-requeue", 0, 0}, {"nodefile", 'F', 1}, {"nodelist", 'w', 1},
    {"nodes", 'N', 1}, {"ntasks", 'n', 1}, {"ntasks-per-core", 0, 1}, {"ntasks-per-gpu", 0, 1},
    {"ntasks-per-node", 0, 1}, {"ntasks-per-socket", 0, 1}, {"ntasks-per-tres", 0, 1}, {"open-mode", 0, 1},
    {"output", 'o', 1}, {"overcommit", 'O', 0}, {"oversubscribe", 's', 0}, {"parsable", 0, 0},
    {"partition", 'p', 1}, {"power", 0, 1}, {"prefer", 0, 1}, {"priority", 0, 1}, {"profile", 0, 1},
    {"propagate", 0, 2}, {"qos", 'q', 1}, {"quiet", 'Q', 0}, {"reboot", 0, 0}, {"requeue", 0, 0},
    {"reservation", 0, 1}, {"signal", 0, 1}, {"sockets-per-node", 0, 1}, {"spread-job", 0, 0}, {"switches", 0, 1},
    {"tasks-per-node", 0, 1}, {"test-only", 0, 0}, {"thread-spec", 0, 1}, {"threads-per-core", 0, 1},
    {"time", 't', 1}, {"time-min", 0, 1}, {"tmp", 0, 1}, {"uid", 0, 1}, {"usage", 0, 0}, {"use-min-nodes", 0, 0},
    {"verbose", 'v', 0}, {"version", 'V', 0}, {"wait", 'W', 0}, {"wait-all-nodes", 0, 1}, {"wckey", 0, 1},
    {"wrap", 0, 1}};

constexpr const char* kOwn = "would replace what memfitd sets itself";
constexpr const char* kShape =
    "would change how many nodes or GPUs the job gets (memfitd asks for shards of one GPU on one node)";
constexpr const char* kStart =
    "would delay, hold or repeat the job, or make sbatch wait (memfitd submits one job that starts when its shards are "
    "free)";

bool one_of(const std::string& v, std::initializer_list<const char*> options) {
  for (const char* o : options) {
    if (v == o) return true;
  }
  return false;
}

// Why option `name` (resolved), with `value` (nullptr: none given), may not be added.
std::string option_problem(const std::string& name, const std::string* value, const std::string& device) {
  const std::string v = value != nullptr ? *value : "";
  std::string lower = v;
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  const std::string shown = " (--" + name + (value != nullptr ? "=" + v : "") + ")";
  // Several options list their choices for a value of "help" (--hint=help,
  // --mem-bind=verbose,help) and exit without submitting.
  for (size_t b = 0; b <= lower.size();) {
    const size_t e = std::min(lower.find(',', b), lower.size());
    if (lower.substr(b, e - b) == "help") return "would make sbatch print and submit nothing" + shown;
    b = e + 1;
  }
  if (one_of(name, {"partition", "gres", "uid", "gid", "output", "error", "chdir", "export", "export-file", "wrap",
                    "job-name", "parsable", "open-mode", "requeue", "no-requeue"}) ||
      (name == "ntasks" && v != "1")) {
    return kOwn + shown;
  }
  if (one_of(name, {"gpus", "gpus-per-node", "gpus-per-task", "gpus-per-socket", "cpus-per-gpu", "mem-per-gpu",
                    "ntasks-per-gpu", "ntasks-per-tres", "nodefile"}) ||
      (name == "nodes" && v != "1" && v != "1-1") ||
      (name == "exclusive" && lower != "user" && lower != "mcs")) {
    return kShape + shown;
  }
  if (name == "constraint" && v.find('*') != std::string::npos) {
    return "asks for node counts (feature*N), which changes how many nodes the job gets" + shown;
  }
  if (name == "nodelist") {
    // One host, maybe in bracket form (gpu[07]); a list, a range or a file names several.
    bool several = v.empty() || v.find_first_of(", \t/") != std::string::npos;
    const size_t lb = v.find('[');
    if (lb != std::string::npos && v.find_first_of(",-", lb) != std::string::npos) several = true;
    if (several) {
      return "names more than one node (or a file of nodes): memfitd's jobs run on one node; pick nodes with a "
             "partition or --constraint" + shown;
    }
    return "";
  }
  // A priority is a positive whole number or TOP; sbatch reads anything else (00, +0,
  // abc) as 0, which holds the job.
  const bool positive = !v.empty() && v.find_first_not_of("0123456789") == std::string::npos &&
                        v.find_first_not_of('0') != std::string::npos;
  if (one_of(name, {"hold", "dependency", "array", "begin", "test-only", "wait", "clusters", "cluster"}) ||
      (name == "priority" && !positive && lower != "top")) {
    return kStart + shown;
  }
  const std::string digits = v.substr(0, v.find_first_not_of("0123456789"));
  if (name == "mem" && !digits.empty() && digits.find_first_not_of('0') == std::string::npos) {
    return "asks for all of a node's memory, so no other job could share the node" + shown;
  }
  if (name == "reboot") return "would reboot the shared node before each job" + shown;
  if (name == "no-kill" && value != nullptr && lower != "off") return "takes no value but off" + shown;
  if (one_of(name, {"help", "usage", "version"})) return "would make sbatch print and submit nothing" + shown;
  if (name == "quiet") return "would keep sbatch from printing the job id memfitd reads" + shown;
  if (device == "cpu" && one_of(name, {"mem", "mem-per-cpu"})) {
    return "would replace the host memory memfitd sets from the reservation for cpu workers" + shown;
  }
  return "";
}

}  // namespace

std::string SbatchArgProblem(const std::string& arg, const std::string& device) {
  for (char c : arg) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return "holds a control character";
  }
  if (arg.empty() || arg[0] != '-') {
    return "is not an option: sbatch would take it as the batch script; give each option with its value in one item "
           "(--account=ml)";
  }
  if (arg == "-" || arg == "--") return "would end sbatch's options";
  // The kernel limits one argument to 128 KiB; nothing memfitd's jobs need comes near 4 KiB.
  if (arg.size() > 4096) return "is over 4096 bytes";
  if (arg[1] == '-') {
    // A long option, resolved as getopt_long resolves it: the exact name, else the one
    // option the name begins.
    const size_t eq = arg.find('=');
    const std::string name = arg.substr(2, eq == std::string::npos ? std::string::npos : eq - 2);
    if (name.find_first_of(" \t") != std::string::npos) {
      return "holds an option and its value apart: one item is one argument, write --option=value";
    }
    const SbatchOption* found = nullptr;
    int prefixed = 0;
    std::string candidates;
    for (const auto& o : kSbatchOptions) {
      if (name == o.name) {
        found = &o;
        prefixed = 1;
        break;
      }
      if (!name.empty() && std::string(o.name).rfind(name, 0) == 0) {
        found = &o;
        ++prefixed;
        candidates += std::string(candidates.empty() ? "" : ", ") + "--" + o.name;
      }
    }
    if (prefixed == 0) return "is not an sbatch option (sbatch 22.05's options are known; misspelt?)";
    if (prefixed > 1) return "is ambiguous: sbatch could read it as " + candidates + "; write the option in full";
    const std::string value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    if (found->has_arg == 1 && eq == std::string::npos) {
      return "has no '=value': sbatch would take the next argument, the batch script, as its value; write "
             "--" + std::string(found->name) + "=value in one item";
    }
    if (found->has_arg == 0 && eq != std::string::npos) return "gives a value to --" + std::string(found->name) + ", which takes none";
    return option_problem(found->name, eq == std::string::npos ? nullptr : &value, device);
  }
  // Short options, bundled as getopt reads them: flags until one that takes a value, which
  // takes the rest of the item.
  for (size_t i = 1; i < arg.size(); ++i) {
    const char c = arg[i];
    const SbatchOption* found = nullptr;
    for (const auto& o : kSbatchOptions) {
      if (o.letter == c) found = &o;
    }
    if (found == nullptr) return std::string("has -") + c + ", which is not an sbatch option";
    if (found->has_arg == 0) {
      if (const std::string why = option_problem(found->name, nullptr, device); !why.empty()) return why;
      continue;
    }
    const std::string rest = arg.substr(i + 1);
    if (found->has_arg == 1 && rest.empty()) {
      return std::string("needs its value in the same item (-") + c +
             "value): sbatch would take the next argument, the batch script, as the value";
    }
    if (!rest.empty() && (rest[0] == ' ' || rest[0] == '\t')) {
      return "holds an option and its value apart: one item is one argument, write -Xvalue or --option=value";
    }
    return option_problem(found->name, rest.empty() ? nullptr : &rest, device);
  }
  return "";
}

namespace {

int64_t int_of(const json& v) {
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_unsigned()) return static_cast<int64_t>(v.get<uint64_t>());
  if (v.is_object() && v.contains("number")) return int_of(v["number"]);  // 23.x: {set, infinite, number}
  return -1;
}

}  // namespace

std::map<int64_t, SlurmJob> ParseSqueueJson(const std::string& text) {
  json doc;
  try {
    // Every job of the cluster comes back, any user's: one name or folder with a byte
    // that is not UTF-8 must not make the whole answer unreadable (no job would end).
    doc = json::parse(ValidUtf8(text));
  } catch (const json::exception& e) {
    throw std::runtime_error(std::string("squeue --json: not JSON (") + e.what() + ")");
  }
  if (!doc.is_object() || !doc.contains("jobs") || !doc["jobs"].is_array()) {
    throw std::runtime_error("squeue --json: no \"jobs\" list");
  }
  std::map<int64_t, SlurmJob> out;
  for (const json& j : doc["jobs"]) {
    if (!j.is_object() || !j.contains("job_id")) continue;
    SlurmJob s;
    s.id = int_of(j["job_id"]);
    if (s.id <= 0) continue;
    if (j.contains("name") && j["name"].is_string()) s.name = j["name"];
    if (j.contains("job_state")) {
      const json& st = j["job_state"];
      if (st.is_string()) s.state = st;
      else if (st.is_array() && !st.empty() && st[0].is_string()) s.state = st[0];
    }
    if (j.contains("state_reason") && j["state_reason"].is_string()) s.reason = j["state_reason"];
    if (j.contains("nodes") && j["nodes"].is_string()) s.nodes = j["nodes"];
    if (SlurmStateFinal(s.state) && j.contains("exit_code")) {
      const json& e = j["exit_code"];
      if (e.is_object()) {  // 23.x and later: {status, return_code, signal: {id}}
        if (e.contains("return_code")) s.exit_code = static_cast<int>(int_of(e["return_code"]));
        if (e.contains("signal") && e["signal"].is_object() && e["signal"].contains("id")) {
          const int64_t sig = int_of(e["signal"]["id"]);
          s.signal = sig > 0 ? static_cast<int>(sig) : 0;
        }
      } else {  // 22.05: the raw wait status (768 for exit 3)
        const int64_t w = int_of(e);
        if (w >= 0) {
          const int status = static_cast<int>(w);
          if (WIFSIGNALED(status)) s.signal = WTERMSIG(status);
          else s.exit_code = WEXITSTATUS(status);
        }
      }
    }
    out[s.id] = s;
  }
  return out;
}

std::map<int64_t, SlurmJob> ParseSacctLines(const std::string& text) {
  std::map<int64_t, SlurmJob> out;
  size_t start = 0;
  while (start < text.size()) {
    size_t nl = text.find('\n', start);
    if (nl == std::string::npos) nl = text.size();
    const std::string line = text.substr(start, nl - start);
    start = nl + 1;
    const size_t a = line.find('|'), b = a == std::string::npos ? a : line.find('|', a + 1);
    if (b == std::string::npos) continue;
    SlurmJob s;
    try {
      size_t used = 0;
      s.id = std::stoll(line.substr(0, a), &used);
      if (used != a) continue;  // "12.batch", "12.0": steps, not the job
    } catch (const std::exception&) {
      continue;
    }
    s.state = line.substr(a + 1, b - a - 1);
    const size_t sp = s.state.find(' ');  // "CANCELLED by 0"
    if (sp != std::string::npos) s.state.resize(sp);
    const std::string code = line.substr(b + 1);
    const size_t colon = code.find(':');
    try {
      s.exit_code = std::stoi(code.substr(0, colon));
      if (colon != std::string::npos) s.signal = std::stoi(code.substr(colon + 1));
    } catch (const std::exception&) {
    }
    out[s.id] = s;
  }
  return out;
}

bool SlurmStateFinal(const std::string& st) {
  return st == "COMPLETED" || st == "FAILED" || st == "CANCELLED" || st == "TIMEOUT" || st == "NODE_FAIL" ||
         st == "OUT_OF_MEMORY" || st == "BOOT_FAIL" || st == "DEADLINE" || st == "PREEMPTED" || st == "SPECIAL_EXIT" ||
         st == "REVOKED";
}

CommandResult RunCommand(const std::vector<std::string>& argv, int timeout_ms) {
  CommandResult r;
  if (argv.empty()) return r;
  int out[2], err[2];
  if (::pipe2(out, O_CLOEXEC) != 0) {
    r.err = std::string("pipe: ") + std::strerror(errno);
    return r;
  }
  if (::pipe2(err, O_CLOEXEC) != 0) {
    r.err = std::string("pipe: ") + std::strerror(errno);
    ::close(out[0]);
    ::close(out[1]);
    return r;
  }
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) {
    r.err = std::string("fork: ") + std::strerror(errno);
    for (int fd : {out[0], out[1], err[0], err[1]}) ::close(fd);
    return r;
  }
  if (pid == 0) {
    ::setpgid(0, 0);
    const int in = ::open("/dev/null", O_RDONLY);
    if (in < 0 || ::dup2(in, 0) < 0 || ::dup2(out[1], 1) < 0 || ::dup2(err[1], 2) < 0) ::_exit(127);
#ifdef SYS_close_range
    ::syscall(SYS_close_range, 3, ~0U, 0);
#endif
    ::execve(args[0], args.data(), environ);
    if (std::strchr(args[0], '/') == nullptr) ::execvp(args[0], args.data());
    const char* m = "cannot run the command\n";
    (void)!::write(2, m, std::strlen(m));
    ::_exit(127);
  }
  ::close(out[1]);
  ::close(err[1]);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
  std::string* bufs[2] = {&r.out, &r.err};
  int open_fds = 2;
  bool timed_out = false;
  // squeue --json lists every job of the cluster (22.05 ignores its filters): a few KiB
  // each, so a busy cluster's answer passes 16 MiB. A cut answer is not JSON, and a
  // squeue that never parses ends no job: memfitd would wait forever.
  constexpr size_t kMaxOutput = size_t{512} << 20;
  bool truncated[2] = {false, false};
  while (open_fds > 0) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      timed_out = true;
      break;
    }
    const int n = ::poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) continue;
    for (int i = 0; i < 2; ++i) {
      if (fds[i].fd < 0 || !(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      char buf[65536];
      const ssize_t k = ::read(fds[i].fd, buf, sizeof buf);
      if (k > 0) {
        if (bufs[i]->size() < kMaxOutput) bufs[i]->append(buf, static_cast<size_t>(k));
        else truncated[i] = true;
      } else if (k == 0 || (errno != EINTR && errno != EAGAIN)) {
        ::close(fds[i].fd);
        fds[i].fd = -1;
        --open_fds;
      }
    }
  }
  for (auto& f : fds) {
    if (f.fd >= 0) ::close(f.fd);
  }
  if (timed_out) ::kill(-pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (timed_out) {
    r.status = -1;
    r.err += "\n(killed after " + std::to_string(timeout_ms) + " ms)";
  } else {
    r.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  if (truncated[0]) {
    r.status = -1;
    r.err += "\n(output over " + std::to_string(kMaxOutput >> 20) + " MiB, cut)";
  }
  return r;
}

// The launcher's state, shared with its workers. Two modes:
// - background (memfitd): a thread of the launcher's own runs squeue, sacct and scancel,
//   so a slow or unreachable controller never holds memfitd's lock: a worker's exited()
//   reads the last answer, and a call that needs a newer one asks the thread for it;
// - inline (unit tests, `background` false): the same steps run in the calling thread,
//   at the same moments, so a test can script Slurm call by call.
// Only sbatch (start), and the squeue of adopt() and withdraw() at memfitd's start, run in
// the caller's thread in both modes.
struct SlurmLauncher::Shared {
  SlurmConfig cfg;
  CommandRunner run;
  std::function<int64_t()> clock;  // also called in callers' threads, with `mu` held
  bool background = false;

  absl::Mutex mu;
  // squeue runs are numbered: `started` counts those begun, `answered` is the number of the
  // run whose answer `jobs` holds (0: none). A worker made after run N began trusts only
  // answers of runs after N: an earlier run may have asked before its job existed.
  std::map<int64_t, SlurmJob> jobs ABSL_GUARDED_BY(mu);
  int64_t started ABSL_GUARDED_BY(mu) = 0;
  int64_t answered ABSL_GUARDED_BY(mu) = 0;
  int64_t wanted ABSL_GUARDED_BY(mu) = 0;    // a caller needs the answer of run `wanted` or later
  bool asked ABSL_GUARDED_BY(mu) = false;    // a worker asked since the last run began
  int64_t tried_ms ABSL_GUARDED_BY(mu) = -1;  // when the last run began (paces runs)
  // Jobs squeue no longer lists that a worker asked about: what sacct said (nullopt: it
  // did not know them), each taken by its worker once; and those still to ask.
  std::map<int64_t, std::optional<SlurmJob>> ended ABSL_GUARDED_BY(mu);
  std::set<int64_t> ask_sacct ABSL_GUARDED_BY(mu);
  std::map<int64_t, bool> cancels ABSL_GUARDED_BY(mu);  // Slurm id -> TERM to the batch step (else kill)
  bool stop ABSL_GUARDED_BY(mu) = false;
  bool failing ABSL_GUARDED_BY(mu) = false;  // the last squeue failed (logged once)
  int64_t adoption_run ABSL_GUARDED_BY(mu) = 0;  // the failed squeue adoptions rely on

  std::string bin(const char* name) const { return cfg.bin_dir.empty() ? name : cfg.bin_dir + "/" + name; }

  // A run is due when a caller needs a newer answer than any run begun, or, while workers
  // keep asking, every poll_seconds (also while squeue fails: a controller that is down is
  // asked once per interval, not once per worker per tick). A clock that stepped back
  // makes one run due at once rather than none until it catches up. No worker asking: no
  // runs at all.
  bool squeue_due(int64_t now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    if (started < wanted) return true;
    return asked && (tried_ms < 0 || now < tried_ms || now - tried_ms >= static_cast<int64_t>(cfg.poll_seconds * 1000));
  }

  // One squeue run, outside `mu`; its answer replaces an older one (a failure keeps the
  // last: a job is never declared gone because squeue failed). Returns its number.
  int64_t squeue() ABSL_LOCKS_EXCLUDED(mu) {
    int64_t seq = 0;
    {
      absl::MutexLock l(&mu);
      seq = ++started;
      tried_ms = clock();
      asked = false;
    }
    // 22.05 ignores -j and -u with --json (docs/SLURM.md): every job comes back; filtered here.
    const CommandResult r = run({bin("squeue"), "--json", "--states=all"});
    std::map<int64_t, SlurmJob> got;
    std::string failure;
    if (r.status != 0) {
      failure = "exit " + std::to_string(r.status) + ": " + r.err.substr(0, 500);
    } else {
      try {
        got = ParseSqueueJson(r.out);
      } catch (const std::exception& e) {
        failure = e.what();
      }
    }
    absl::MutexLock l(&mu);
    // Said once when squeue starts failing and once when it answers again: while it fails
    // no Slurm job of memfitd's can be seen to end.
    if (!failure.empty()) {
      if (!failing) std::fprintf(stderr, "memfitd: squeue failed (no Slurm job can be seen to end until it answers): %s\n", failure.c_str());
      failing = true;
      return seq;
    }
    if (failing) std::fprintf(stderr, "memfitd: squeue answers again\n");
    failing = false;
    if (seq > answered) {  // adopt() may run one beside the thread's
      jobs = std::move(got);
      answered = seq;
    }
    return seq;
  }

  // Adoption happens at memfitd's start, in its thread: the first squeue that answers
  // serves every job adopted then (one run, not one per job). Returns its number, with
  // *ok false when it failed: then it is not run again for each job (a controller that
  // hangs would cost 30 s per job), and the jobs are adopted unverified.
  int64_t answer_for_adoption(bool* ok) ABSL_LOCKS_EXCLUDED(mu) {
    {
      absl::MutexLock l(&mu);
      *ok = answered > 0;
      if (answered > 0) return answered;
      if (adoption_run > 0) return adoption_run;
    }
    const int64_t run = squeue();
    absl::MutexLock l(&mu);
    *ok = answered > 0;
    if (answered > 0) return answered;
    adoption_run = run;
    return run;
  }

  int64_t runs_started() ABSL_LOCKS_EXCLUDED(mu) {
    absl::MutexLock l(&mu);
    return started;
  }

  // One round of what callers asked for: the scancels, a squeue when due, sacct for the
  // jobs squeue stopped listing. Commands run outside `mu`.
  void pump() ABSL_LOCKS_EXCLUDED(mu) {
    std::map<int64_t, bool> todo;
    bool due = false;
    {
      absl::MutexLock l(&mu);
      todo.swap(cancels);
      due = squeue_due(clock());
    }
    for (const auto& [id, term] : todo) run(scancel_argv(id, term));
    if (due) squeue();
    std::set<int64_t> ask;
    {
      absl::MutexLock l(&mu);
      ask.swap(ask_sacct);
    }
    for (int64_t id : ask) {
      std::optional<SlurmJob> j = sacct(id);
      if (j && !SlurmStateFinal(j->state)) continue;  // not over by sacct's account: asked again
      absl::MutexLock l(&mu);
      ended[id] = std::move(j);
    }
  }

  // Callers (under memfitd's lock): inline, the round runs now; in background mode the
  // thread sees the work when the caller releases `mu`.
  void request() ABSL_LOCKS_EXCLUDED(mu) {
    if (!background) pump();
  }

  // sacct's answer for `id` if there is one, taken (a worker asks until it has it, then
  // never again; a Slurm id given out again later starts clean).
  std::optional<std::optional<SlurmJob>> take_ended(int64_t id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    const auto e = ended.find(id);
    if (e == ended.end()) return std::nullopt;
    std::optional<SlurmJob> j = std::move(e->second);
    ended.erase(e);
    return j;
  }

  // What the worker of Slurm job `id`, made after squeue run `since` began, knows now: its
  // state (nullopt: not known yet), after asking for a newer squeue when needed, and for
  // sacct when squeue stopped listing it. `gone`: neither squeue nor sacct knows it.
  std::optional<SlurmJob> state_of(int64_t id, int64_t since, bool* gone) ABSL_LOCKS_EXCLUDED(mu) {
    *gone = false;
    {
      absl::MutexLock l(&mu);
      wanted = std::max(wanted, since + 1);
      asked = true;
    }
    request();
    for (int round = 0; round < 2; ++round) {
      {
        absl::MutexLock l(&mu);
        const auto it = jobs.find(id);
        if (it != jobs.end()) return it->second;
        if (answered <= since) return std::nullopt;  // no answer from a run begun after the job was
        if (auto e = take_ended(id)) {
          if (!*e) *gone = true;
          return *e;
        }
        if (round == 1) return std::nullopt;  // the thread has not asked sacct yet
        ask_sacct.insert(id);
      }
      request();
    }
    return std::nullopt;
  }

  std::optional<SlurmJob> cached(int64_t id) ABSL_LOCKS_EXCLUDED(mu) {
    absl::MutexLock l(&mu);
    const auto it = jobs.find(id);
    if (it == jobs.end()) return std::nullopt;
    return it->second;
  }

  bool has_work() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    return stop || !cancels.empty() || !ask_sacct.empty() || squeue_due(clock());
  }

  // The thread: a round whenever there is work.
  void loop() ABSL_LOCKS_EXCLUDED(mu) {
    for (;;) {
      {
        absl::MutexLock l(&mu);
        // Woken when a caller's change makes has_work() true (absl re-checks it whenever
        // `mu` is released), or after a second to see poll_seconds pass on the clock.
        mu.AwaitWithTimeout(absl::Condition(this, &Shared::has_work), absl::Seconds(1));
        if (stop) break;
        if (!has_work()) continue;
      }
      pump();
    }
    // memfitd is stopping: the cancels asked for are still sent, once each.
    std::map<int64_t, bool> todo;
    {
      absl::MutexLock l(&mu);
      todo.swap(cancels);
    }
    for (const auto& [id, term] : todo) run(scancel_argv(id, term));
  }

  // A job that squeue no longer lists (MinJobAge passed, or the controller lost it): the
  // jobcomp file (sacct -c) may know how it ended.
  std::optional<SlurmJob> sacct(int64_t id) {
    const CommandResult r =
        run({bin("sacct"), "-c", "-P", "-n", "-j", std::to_string(id), "-o", "JobID,State,ExitCode"});
    if (r.status != 0) return std::nullopt;
    const auto m = ParseSacctLines(r.out);
    const auto it = m.find(id);
    if (it == m.end()) return std::nullopt;
    return it->second;
  }

  // scancel of every unfinished job named memfit-<id> for those ids, from one fresh squeue
  // (run in the caller's thread); per id, what was cancelled. `checked`: whether squeue
  // answered.
  std::map<std::string, std::string> withdraw(const std::set<std::string>& ids, bool* checked) {
    *checked = false;
    std::map<std::string, std::string> out;
    const CommandResult q = run({bin("squeue"), "--json", "--states=all"});
    if (q.status != 0) return out;
    try {
      for (const auto& [sid, sj] : ParseSqueueJson(q.out)) {
        if (sj.name.rfind("memfit-", 0) != 0 || SlurmStateFinal(sj.state)) continue;
        const std::string id = sj.name.substr(7);
        if (!ids.count(id)) continue;
        run(scancel_argv(sid, false));
        std::string& m = out[id];
        m += (m.empty() ? "" : ", ") + std::string("Slurm job ") + std::to_string(sid);
      }
      *checked = true;
    } catch (const std::exception&) {
      return {};
    }
    for (auto& [id, m] : out) m += " of an unrecorded submission cancelled";
    return out;
  }

  std::vector<std::string> scancel_argv(int64_t id, bool term) const {
    std::vector<std::string> a = {bin("scancel")};
    if (term) a.insert(a.end(), {"--batch", "--signal=TERM"});
    a.push_back(std::to_string(id));
    return a;
  }
  // Inline: now. Background: queued for the thread, one per job, a kill winning over TERM
  // (memfitd's stop repeats kill() while it waits for its jobs to end).
  void scancel(int64_t id, bool term) ABSL_LOCKS_EXCLUDED(mu) {
    if (!background) {
      run(scancel_argv(id, term));
      return;
    }
    absl::MutexLock l(&mu);
    const auto [it, fresh] = cancels.emplace(id, term);
    if (!fresh) it->second = it->second && term;
  }
};

namespace {

class SlurmWorker : public Worker {
 public:
  // `since`: the number of the last squeue run begun before the job existed (submitted) or
  // of the run that listed it (adopted); only later runs tell whether it is still there.
  // `unverified_name`: adopted while squeue did not answer: the name the job must have
  // when squeue first lists it (another name: not memfitd's job, let go, never cancelled;
  // a cancel asked for before that waits for it).
  SlurmWorker(std::shared_ptr<SlurmLauncher::Shared> s, int64_t id, std::string out, int64_t offset, int64_t since,
              bool gone, std::string unverified_name = "")
      : s_(std::move(s)),
        id_(id),
        tail_(std::move(out), offset),
        since_(since),
        gone_(gone),
        unverified_(std::move(unverified_name)) {}
  int64_t pid() const override { return id_; }
  const std::string& out_path() const override { return tail_.path(); }
  int64_t offset() const override { return tail_.offset(); }
  std::vector<std::string> read_lines() override { return tail_.read(); }
  bool exited() override {
    if (gone_) return true;
    bool gone = false;
    const std::optional<SlurmJob> j = s_->state_of(id_, since_, &gone);
    if (gone) {
      gone_ = true;  // neither squeue nor sacct knows it: ended, how unknown
      return true;
    }
    if (j && !unverified_.empty() && !verified(*j)) return true;
    if (!j || !SlurmStateFinal(j->state)) return false;
    end(*j);
    return true;
  }
  int exit_code() const override { return exit_code_; }
  int exit_signal() const override { return signal_; }
  void terminate() override {
    if (gone_) return;
    // A pending job has no process to checkpoint: it is simply withdrawn.
    const auto j = s_->cached(id_);
    if (!unverified_.empty() && (!j || !verified(*j))) {
      pending_ = std::max(pending_, 1);  // sent once squeue lists it as memfitd's
      return;
    }
    s_->scancel(id_, !(j && j->state == "PENDING"));
  }
  void kill() override {
    if (gone_) return;
    if (!unverified_.empty()) {
      const auto j = s_->cached(id_);
      if (!j || !verified(*j)) {
        pending_ = 2;  // sent once squeue lists it as memfitd's
        return;
      }
    }
    s_->scancel(id_, false);
  }
  std::string status_change() override {
    if (gone_) return "";
    const auto cached = s_->cached(id_);
    if (!cached || (!unverified_.empty() && !verified(*cached))) return "";
    const SlurmJob& j = *cached;
    std::string now;
    if (j.state == "PENDING") {
      now = "Slurm job " + std::to_string(id_) + " is waiting" + (j.reason.empty() || j.reason == "None" ? "" : " (" + j.reason + ")");
    } else if (j.state == "RUNNING") {
      now = "Slurm job " + std::to_string(id_) + " is running" + (j.nodes.empty() ? "" : " on " + j.nodes);
    } else {
      return "";
    }
    if (now == last_note_) return "";
    last_note_ = now;
    return now;
  }

 private:
  std::string last_note_;
  // Whether a job squeue lists under this id has the name it must have; false: it is
  // another job (the id given out again), and this attempt is over, its end unknown.
  // A cancel asked for meanwhile is sent then. (sacct's answers carry no name: a job only
  // sacct knows has ended, so it is taken as is.)
  bool verified(const SlurmJob& j) {
    if (!j.name.empty() && j.name != unverified_) {
      gone_ = true;
      return false;
    }
    unverified_.clear();
    if (pending_ > 0 && !SlurmStateFinal(j.state)) s_->scancel(id_, pending_ == 1 && j.state != "PENDING");
    pending_ = 0;
    return true;
  }
  void end(const SlurmJob& j) {
    gone_ = true;
    exit_code_ = j.exit_code;
    signal_ = j.signal;
    // Cancelled by scancel without a code of its own: report the signal Slurm sent.
    if (j.state == "CANCELLED" && exit_code_ <= 0 && signal_ == 0) signal_ = SIGTERM;
  }
  std::shared_ptr<SlurmLauncher::Shared> s_;
  int64_t id_;
  LineTail tail_;
  int64_t since_;
  bool gone_;
  std::string unverified_;
  int pending_ = 0;  // a cancel asked for while unverified: 1 TERM, 2 kill
  int exit_code_ = -1;
  int signal_ = 0;
};

}  // namespace

SlurmLauncher::SlurmLauncher(SlurmConfig cfg, CommandRunner run, std::function<int64_t()> clock_ms, bool background)
    : shared_(std::make_shared<Shared>()) {
  shared_->cfg = std::move(cfg);
  shared_->run = std::move(run);
  shared_->clock = std::move(clock_ms);
  shared_->background = background;
  if (background) thread_ = std::thread([s = shared_] { s->loop(); });
}

SlurmLauncher::~SlurmLauncher() {
  if (!thread_.joinable()) return;
  {
    absl::MutexLock l(&shared_->mu);
    shared_->stop = true;
  }
  thread_.join();  // after the command it may be running (each has a time limit)
}

std::unique_ptr<Worker> SlurmLauncher::start(const WorkerLaunch& l) {
  const SlurmConfig& c = shared_->cfg;
  const int shards = ShardsFor(l.reservation_bytes, c);
  if (shards > c.shards_per_gpu) {
    throw std::runtime_error("the reservation needs " + std::to_string(shards) + " shards; one GPU of partition " +
                             c.partition + " has " + std::to_string(c.shards_per_gpu));
  }
  // The script and the two output files, in the job's folder (shared with the nodes). The
  // output files belong to the user the job runs as: slurmd opens them as that user (who
  // may hold a lease on them: O_NONBLOCK fails the open rather than waiting on it).
  const std::string script = l.dir + "/slurm.sh";
  const std::string text = SlurmBatchScript(l);
  {
    const int fd = ::open(script.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) throw std::runtime_error("writing " + script + ": " + std::strerror(errno));
    const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
    ::fchmod(fd, 0755);
    ::close(fd);
    if (!ok) throw std::runtime_error("writing " + script + ": short write");
  }
  int64_t out_size = 0;
  for (const char* name : {"/worker.out", "/worker.err"}) {
    const std::string p = l.dir + name;
    const int fd = ::open(p.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK, 0640);
    if (fd < 0) throw std::runtime_error("creating " + p + ": " + std::strerror(errno));
    if (l.confine.uid >= 0 && ::fchown(fd, static_cast<uid_t>(l.confine.uid), static_cast<gid_t>(l.confine.gid)) != 0) {
      const int e = errno;
      ::close(fd);
      throw std::runtime_error("giving " + p + " to uid " + std::to_string(l.confine.uid) + ": " + std::strerror(e));
    }
    struct stat st {};
    if (std::strcmp(name, "/worker.out") == 0 && ::fstat(fd, &st) == 0) out_size = st.st_size;
    ::close(fd);
  }
  std::vector<std::string> argv = {shared_->bin("sbatch")};
  for (auto& a : SbatchArgs(l, c, script)) argv.push_back(std::move(a));
  const CommandResult r = shared_->run(argv);
  std::string id_text = r.out;
  while (!id_text.empty() && (id_text.back() == '\n' || id_text.back() == ' ')) id_text.pop_back();
  const size_t semi = id_text.find(';');  // "ID;cluster" on federated clusters
  if (semi != std::string::npos) id_text.resize(semi);
  int64_t id = 0;
  try {
    size_t used = 0;
    id = std::stoll(id_text, &used);
    if (used != id_text.size()) id = 0;
  } catch (const std::exception&) {
    id = 0;
  }
  if (r.status != 0 || id <= 0) {
    std::string why = r.err.empty() ? r.out : r.err;
    while (!why.empty() && why.back() == '\n') why.pop_back();
    // sbatch killed at its time limit, or an answer that is not an id: the controller may
    // have queued the job all the same. Left alone it would run untracked beside the
    // job's next attempt (or after the job failed), on shards memfitd counts as free.
    // Withdraw whatever unfinished job carries this job's name (earlier attempts have
    // all ended before a new one is submitted).
    bool checked = false;
    const auto stopped = shared_->withdraw({l.job_id}, &checked);
    if (!stopped.empty()) why += " (" + stopped.begin()->second + ")";
    if (!checked) why += " (squeue could not tell whether Slurm queued it anyway: look for memfit-" + l.job_id + ")";
    throw std::runtime_error("sbatch (partition " + c.partition + ", shard:" + std::to_string(shards) + ") failed: " +
                             (why.empty() ? "exit " + std::to_string(r.status) : why));
  }
  // Taken after sbatch answered: a squeue run begun earlier may not list the job yet.
  return std::make_unique<SlurmWorker>(shared_, id, l.dir + "/worker.out", out_size, shared_->runs_started(), false);
}

std::unique_ptr<Worker> SlurmLauncher::adopt(int64_t pid, const std::string& out_path, int64_t offset) {
  if (pid <= 0) return nullptr;
  bool ok = false;
  const int64_t run = shared_->answer_for_adoption(&ok);
  // Slurm ids are not reused while a job is listed, but the job must still be this one:
  // memfit-<job id>, the id being the name of the job's folder (out_path's parent). A
  // stored id that is not this job's Slurm job (a pid from the local executor, another
  // memfitd's job, an id Slurm gave out again) is never adopted, cancelled or waited on.
  const std::string folder = out_path.substr(0, out_path.find_last_of('/') == std::string::npos ? 0 : out_path.find_last_of('/'));
  const std::string job_id = folder.substr(folder.find_last_of('/') == std::string::npos ? 0 : folder.find_last_of('/') + 1);
  if (job_id.empty()) return nullptr;
  if (!ok) {
    // squeue did not answer (the controller down or slow at memfitd's start): the job may
    // well run on, so it is not declared gone for that (its next attempt would run beside
    // it). Adopted unverified: the first squeue that answers checks its name.
    return std::make_unique<SlurmWorker>(shared_, pid, out_path, offset, run, false, "memfit-" + job_id);
  }
  const auto job = shared_->cached(pid);
  if (!job || SlurmStateFinal(job->state) || job->name != "memfit-" + job_id) return nullptr;
  return std::make_unique<SlurmWorker>(shared_, pid, out_path, offset, run, false);
}

std::map<std::string, std::string> SlurmLauncher::withdraw(const std::set<std::string>& job_ids) {
  bool checked = false;
  if (job_ids.empty()) return {};
  auto out = shared_->withdraw(job_ids, &checked);
  if (!checked) {
    std::fprintf(stderr,
                 "memfitd: squeue failed, so Slurm could not be asked whether a submission of a queued or cancelled "
                 "job was left from before this start; look for unfinished jobs named memfit-<job id> of jobs "
                 "memfit does not show running\n");
  }
  return out;
}

std::unique_ptr<Worker> SlurmLauncher::gone(const std::string& out_path, int64_t offset) {
  return std::make_unique<SlurmWorker>(shared_, 0, out_path, offset, 0, true);
}

}  // namespace memfit::daemon
