// The Slurm executor's pure parts and its launcher against a scripted Slurm (the commands
// it runs are recorded, their answers given): the shard request, the batch script's
// quoting, sbatch's arguments, squeue's JSON of 22.05 and later, sacct's jobcomp lines,
// submit / adopt / end / cancel. tests/slurm/ runs memfitd against a real Slurm.
#include <getopt.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <mutex>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"

#include "slurm.h"

namespace {

namespace fs = std::filesystem;
using namespace memfit::daemon;
constexpr int64_t MiB = int64_t{1} << 20;

// A folder of the test's own, removed with everything in it when the test ends.
struct TmpDir {
  TmpDir() {
    char tmpl[] = "/tmp/memfit-slurm-XXXXXX";
    path = mkdtemp(tmpl);
  }
  ~TmpDir() { fs::remove_all(path); }
  TmpDir(const TmpDir&) = delete;
  TmpDir& operator=(const TmpDir&) = delete;
  std::string path;
};

SlurmConfig Cfg() {
  SlurmConfig s;
  s.partition = "gpu-shared";
  s.shard_memory = 64 * MiB;
  s.shards_per_gpu = 4;
  s.gpus = 2;
  s.poll_seconds = 1;
  return s;
}

TEST(Slurm, ShardsCoverTheReservation) {
  const SlurmConfig s = Cfg();
  EXPECT_EQ(ShardsFor(1, s), 1);
  EXPECT_EQ(ShardsFor(64 * MiB, s), 1);
  EXPECT_EQ(ShardsFor(64 * MiB + 1, s), 2);
  EXPECT_EQ(ShardsFor(256 * MiB, s), 4);
  EXPECT_EQ(ShardsFor(0, s), 1);
}

TEST(Slurm, ScriptQuotesEveryWord) {
  EXPECT_EQ(ShellQuote("a b"), "'a b'");
  EXPECT_EQ(ShellQuote("it's"), "'it'\\''s'");
  EXPECT_EQ(ShellQuote("$(rm -rf /)`x`"), "'$(rm -rf /)`x`'");
  WorkerLaunch l;
  l.binary = "/opt/memfit/memfit-worker";
  l.args = {"run", "--spec", "/state/jobs/j1/spec.json", "--input-root", "/data/o'brien; rm -rf ~"};
  l.env = {"CUDA_DEVICE_ORDER=PCI_BUS_ID", "BAD NAME=x", "=nothing", "X=$HOME"};
  l.job_id = "j1";
  const std::string s = SlurmBatchScript(l);
  EXPECT_EQ(s.rfind("#!/bin/sh\n", 0), 0u);
  EXPECT_NE(s.find("export CUDA_DEVICE_ORDER='PCI_BUS_ID'\n"), std::string::npos);
  EXPECT_NE(s.find("export X='$HOME'\n"), std::string::npos);
  EXPECT_EQ(s.find("BAD NAME"), std::string::npos);
  EXPECT_NE(s.find("exec '/opt/memfit/memfit-worker' 'run' '--spec' '/state/jobs/j1/spec.json' '--input-root' "
                   "'/data/o'\\''brien; rm -rf ~'\n"),
            std::string::npos);
  // The script as sh runs it: every argument arrives as one word, nothing is expanded.
  const TmpDir tmp;  // removed at the end, also when an assertion stops the test
  const std::string& dir = tmp.path;
  WorkerLaunch echo = l;
  echo.binary = "/usr/bin/printf";
  echo.args = {"[%s]", "a b", "o'brien; rm -rf ~", "$(id)", "`id`"};
  std::ofstream(dir + "/s.sh") << SlurmBatchScript(echo);
  const std::string cmd = "sh " + dir + "/s.sh > " + dir + "/out";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::stringstream got;
  got << std::ifstream(dir + "/out").rdbuf();
  EXPECT_EQ(got.str(), "[a b][o'brien; rm -rf ~][$(id)][`id`]");
}

TEST(Slurm, SbatchArguments) {
  SlurmConfig s = Cfg();
  s.sbatch_args = {"--account=ml", "--qos=normal"};
  WorkerLaunch l;
  l.job_id = "j1";
  l.dir = "/state/jobs/j1";
  l.reservation_bytes = 100 * MiB;
  l.confine.memory_limit_bytes = 2 * 1024 * MiB + 1;
  l.confine.uid = 1001;
  l.confine.gid = 1002;
  const std::vector<std::string> want = {
      "--parsable", "--job-name=memfit-j1", "--partition=gpu-shared", "--gres=shard:2", "--ntasks=1",
      "--output=/state/jobs/j1/worker.out", "--error=/state/jobs/j1/worker.err", "--open-mode=append",
      "--chdir=/state/jobs/j1", "--no-requeue", "--export=NONE", "--mem=2049M", "--uid=1001", "--gid=1002",
      "--account=ml", "--qos=normal", "/state/jobs/j1/slurm.sh"};
  EXPECT_EQ(SbatchArgs(l, s, "/state/jobs/j1/slurm.sh"), want);
  l.confine = {};
  const auto a = SbatchArgs(l, s, "x.sh");
  for (const auto& x : a) {
    EXPECT_EQ(x.rfind("--uid", 0), std::string::npos);
    EXPECT_EQ(x.rfind("--mem", 0), std::string::npos);
  }
}

// slurm.sbatch_args items, one by one: whole options that leave the job as memfitd asks
// for it pass; the rest are refused with the reason.
TEST(Slurm, SbatchArgProblems) {
  const struct {
    std::string arg;
    const char* device;
    const char* want;  // "" = accepted, else a piece of the reason
  } cases[] = {
      {"--account=ml", "cuda", ""},
      {"-Aml", "cuda", ""},
      {"--qos=high", "cuda", ""},
      {"--time=02:00:00", "cuda", ""},
      {"-t120", "cuda", ""},
      {"--comment=a b c", "cuda", ""},
      {"--constraint=h200", "cuda", ""},
      {"--mem=64G", "cuda", ""},  // host memory: the operator's for CUDA workers
      {"--mem-per-cpu=4G", "cuda", ""},
      {"--mem=64G", "cpu", "host memory memfitd sets"},
      {"--mem-per", "cpu", "ambiguous"},
      {"--mem-per-c=1G", "cpu", "host memory"},
      {"--contig", "cuda", ""},  // --contiguous, abbreviated as sbatch allows
      {"--gres-flags=enforce-binding", "cuda", ""},
      {"--gpu-bind=closest", "cuda", ""},
      {"--nodelist=node3", "cuda", ""},
      {"-wnode3", "cuda", ""},
      {"--nodelist=node[1-2]", "cuda", "more than one node"},
      {"-wnode1,node2", "cuda", "more than one node"},
      {"--nodel=a,b", "cuda", "more than one node"},
      {"--nodelist", "cuda", "has no '=value'"},
      {"--verbose", "cuda", ""},
      {"-vO", "cuda", ""},
      {"-kH", "cuda", "takes no value but off"},  // -k's optional value is "H", not --hold
      {"-koff", "cuda", ""},
      {"--hint=help", "cuda", "print and submit nothing"},
      {"--mem-bind=verbose,help", "cuda", "print and submit nothing"},
      {"--hint=compute_bound", "cuda", ""},
      {"--mem=0", "cuda", "all of a node's memory"},
      {"--mem=0G", "cuda", "all of a node's memory"},
      {"--reboot", "cuda", "reboot the shared node"},
      {"--exclusive=USER", "cuda", ""},
      {"--priority=00", "cuda", "delay, hold"},
      {"--priority=abc", "cuda", "delay, hold"},
      {"--priority=TOP", "cuda", ""},
      {"--uid=0", "cuda", "would replace what memfitd sets itself (--uid=0)"},
      {"-pother", "cuda", "(--partition=other)"},
      {"--part=other", "cuda", "(--partition=other)"},
      {"--gre=gpu:8", "cuda", "ambiguous: sbatch could read it as --gres, --gres-flags"},
      {"--gres=gpu:8", "cuda", "(--gres=gpu:8)"},
      {"--gpus=1", "cuda", "nodes or GPUs"},
      {"-G1", "cuda", "nodes or GPUs"},
      {"--gpus-per-node=1", "cuda", "nodes or GPUs"},
      {"-N2", "cuda", "nodes or GPUs"},
      {"--nodes=2", "cuda", "nodes or GPUs"},
      {"--nodes=1", "cuda", ""},  // what memfitd asks anyway
      {"-N1", "cuda", ""},
      {"--ntasks=1", "cuda", ""},
      {"--exclusive", "cuda", "nodes or GPUs"},
      {"--exclusive=user", "cuda", ""},
      {"--ntasks=4", "cuda", "memfitd sets itself"},
      {"--ntasks-per-tres=2", "cuda", "nodes or GPUs"},
      {"--constraint=h200*2", "cuda", "node counts"},
      {"--nodelist=n1 n2", "cuda", "more than one node"},
      {"--nodelist=gpu[07]", "cuda", ""},
      {"--nodelist=gpu[07-08]", "cuda", "more than one node"},
      {"--priority=0", "cuda", "delay, hold"},
      {"--priority=10", "cuda", ""},
      {"-Q", "cuda", "job id memfitd reads"},
      {"--qu", "cuda", "job id memfitd reads"},
      {"--acount=ml", "cuda", "not an sbatch option"},
      {"--acc=ml", "cuda", "ambiguous"},
      {"-X", "cuda", "not an sbatch option"},
      {"--hold=yes", "cuda", "takes none"},
      {"--hold", "cuda", "delay, hold"},
      {"-vH", "cuda", "(--hold)"},
      {"--depend=afterok:1", "cuda", "(--dependency=afterok:1)"},
      {"--array=0-9", "cuda", "delay, hold"},
      {"--begin=now+1hour", "cuda", "delay, hold"},
      {"--test-only", "cuda", "delay, hold"},
      {"-W", "cuda", "make sbatch wait"},
      {"--clusters=other", "cuda", "delay, hold"},
      {"--help", "cuda", "print and submit nothing"},
      {"-V", "cuda", "print and submit nothing"},
      {"--account ml", "cuda", "one item is one argument"},
      {"-A ml", "cuda", "one item is one argument"},
      {"--account", "cuda", "has no '=value'"},
      {"-A", "cuda", "needs its value in the same item"},
      {"ml", "cuda", "is not an option"},
      {"", "cuda", "is not an option"},
      {"--", "cuda", "end sbatch's options"},
      {"--comment=a\nb", "cuda", "control character"},
      {"--comment=" + std::string(5000, 'x'), "cuda", "over 4096 bytes"},
  };
  for (const auto& c : cases) {
    const std::string got = SbatchArgProblem(c.arg, c.device);
    if (std::string(c.want).empty()) {
      EXPECT_EQ(got, "") << c.arg << " (" << c.device << ")";
    } else {
      EXPECT_NE(got.find(c.want), std::string::npos) << c.arg << " (" << c.device << ") -> '" << got << "'";
    }
  }
}

// The same question asked of glibc's getopt_long, the parser sbatch itself uses, over
// sbatch 22.05's whole option table (sbatch(1)): seeded random items (options in full,
// abbreviated, bundled, with and without values, bare words) are parsed as
// `sbatch ITEM job.sh` would parse them. Whatever getopt reads as an option memfitd owns
// or one that changes the job's shape or start, or that swallows the script as a value,
// must be refused; an item getopt reads cleanly as allowed options must pass.
TEST(Slurm, SbatchArgProblemsAgreeWithGetopt) {
  struct Opt {
    const char* name;
    int has_arg;
    char letter;
  };
  const std::vector<Opt> table = {
      {"account", 1, 'A'}, {"acctg-freq", 1, 0}, {"array", 1, 'a'}, {"batch", 1, 0}, {"bb", 1, 0}, {"bbf", 1, 0},
      {"begin", 1, 'b'}, {"chdir", 1, 'D'}, {"cluster", 1, 0}, {"cluster-constraint", 1, 0}, {"clusters", 1, 'M'},
      {"comment", 1, 0}, {"constraint", 1, 'C'}, {"container", 1, 0}, {"context", 1, 0}, {"contiguous", 0, 0},
      {"core-spec", 1, 'S'},
      {"cores-per-socket", 1, 0}, {"cpu-freq", 1, 0}, {"cpus-per-gpu", 1, 0}, {"cpus-per-task", 1, 'c'},
      {"deadline", 1, 0}, {"delay-boot", 1, 0}, {"dependency", 1, 'd'}, {"distribution", 1, 'm'}, {"error", 1, 'e'},
      {"exclude", 1, 'x'}, {"exclusive", 2, 0}, {"export", 1, 0}, {"export-file", 1, 0}, {"extra-node-info", 1, 'B'},
      {"get-user-env", 2, 0}, {"gid", 1, 0}, {"gpu-bind", 1, 0}, {"gpu-freq", 1, 0}, {"gpus", 1, 'G'},
      {"gpus-per-node", 1, 0}, {"gpus-per-socket", 1, 0}, {"gpus-per-task", 1, 0}, {"gres", 1, 0},
      {"gres-flags", 1, 0}, {"help", 0, 'h'}, {"hint", 1, 0}, {"hold", 0, 'H'}, {"ignore-pbs", 0, 0},
      {"input", 1, 'i'}, {"job-name", 1, 'J'}, {"kill-on-invalid-dep", 1, 0}, {"licenses", 1, 'L'},
      {"mail-type", 1, 0}, {"mail-user", 1, 0}, {"mcs-label", 1, 0}, {"mem", 1, 0}, {"mem-bind", 1, 0},
      {"mem-per-cpu", 1, 0}, {"mem-per-gpu", 1, 0}, {"mincpus", 1, 0}, {"network", 1, 0}, {"nice", 2, 0},
      {"no-kill", 2, 'k'}, {"no-requeue", 0, 0}, {"nodefile", 1, 'F'}, {"nodelist", 1, 'w'}, {"nodes", 1, 'N'},
      {"ntasks", 1, 'n'}, {"ntasks-per-core", 1, 0}, {"ntasks-per-gpu", 1, 0}, {"ntasks-per-node", 1, 0},
      {"ntasks-per-socket", 1, 0}, {"ntasks-per-tres", 1, 0}, {"open-mode", 1, 0}, {"output", 1, 'o'}, {"overcommit", 0, 'O'},
      {"oversubscribe", 0, 's'}, {"parsable", 0, 0}, {"partition", 1, 'p'}, {"power", 1, 0}, {"prefer", 1, 0},
      {"priority", 1, 0}, {"profile", 1, 0}, {"propagate", 2, 0}, {"qos", 1, 'q'}, {"quiet", 0, 'Q'},
      {"reboot", 0, 0}, {"requeue", 0, 0}, {"reservation", 1, 0}, {"signal", 1, 0}, {"sockets-per-node", 1, 0},
      {"spread-job", 0, 0}, {"switches", 1, 0}, {"tasks-per-node", 1, 0}, {"test-only", 0, 0}, {"thread-spec", 1, 0},
      {"threads-per-core", 1, 0}, {"time", 1, 't'}, {"time-min", 1, 0}, {"tmp", 1, 0}, {"uid", 1, 0},
      {"usage", 0, 0}, {"use-min-nodes", 0, 0}, {"verbose", 0, 'v'}, {"version", 0, 'V'}, {"wait", 0, 'W'},
      {"wait-all-nodes", 1, 0}, {"wckey", 1, 0}, {"wrap", 1, 0}};
  // What the job may not get from an operator's argument: written here from the
  // executor's contract (docs/SLURM.md), not from the code under test. `value` is null
  // when the option was given none.
  const std::set<std::string> never = {
      "partition", "gres", "uid", "gid", "output", "error", "chdir", "export", "export-file", "wrap", "job-name",
      "parsable", "open-mode", "requeue", "no-requeue", "gpus", "gpus-per-node", "gpus-per-task", "gpus-per-socket",
      "cpus-per-gpu", "mem-per-gpu", "ntasks-per-gpu", "ntasks-per-tres", "nodefile", "hold", "dependency", "array",
      "begin", "test-only", "wait", "clusters", "cluster", "help", "usage", "version", "quiet"};
  auto refused = [&](const std::string& name, const char* value, const std::string& device) {
    const std::string v = value != nullptr ? value : "";
    std::string lower = v;
    for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    std::stringstream parts(lower);
    for (std::string part; std::getline(parts, part, ',');) {
      if (part == "help") return true;  // sbatch lists the choices and submits nothing
    }
    if (never.count(name) || name == "reboot") return true;
    if (name == "no-kill") return value != nullptr && lower != "off";
    if (name == "mem" && !v.empty() && v[0] == '0' && std::stoll("0" + v.substr(0, v.find_first_not_of("0123456789"))) == 0) {
      return true;  // 0: all of a node's memory
    }
    if (device == "cpu" && (name == "mem" || name == "mem-per-cpu")) return true;
    if (name == "ntasks") return v != "1";
    if (name == "nodes") return v != "1" && v != "1-1";
    if (name == "exclusive") return lower != "user" && lower != "mcs";
    if (name == "priority") {  // sbatch reads anything but a positive number (or TOP) as 0
      return lower != "top" && (v.empty() || v.find_first_not_of("0123456789") != std::string::npos ||
                                std::stoll(v.substr(0, 18)) == 0);
    }
    if (name == "constraint") return v.find('*') != std::string::npos;
    if (name == "nodelist") {  // several hosts: a list, a bracket range or list, a file
      const size_t lb = v.find('[');
      return v.empty() || v.find_first_of(", \t/") != std::string::npos ||
             (lb != std::string::npos && v.find_first_of(",-", lb) != std::string::npos);
    }
    return false;
  };
  std::vector<option> longopts;
  std::string shortopts = "+";
  for (size_t i = 0; i < table.size(); ++i) {
    longopts.push_back({table[i].name, table[i].has_arg, nullptr, static_cast<int>(1000 + i)});
    if (table[i].letter != 0) {
      shortopts += table[i].letter;
      shortopts += table[i].has_arg == 1 ? ":" : table[i].has_arg == 2 ? "::" : "";
    }
  }
  longopts.push_back({nullptr, 0, nullptr, 0});
  std::mt19937_64 rng(20261205);
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  const std::vector<std::string> values = {"1",    "ml", "node1", "node1,node2", "node[1-3]", "a b",     "0-9",
                                           "gpu:1", "afterok:5", "", "off", "H", "1-1", "user", "f*2", "0",
                                           "n1 n2", "gpu[07]", "2", "help", "verbose,help", "USER", "00", "TOP", "0G"};
  int refused_n = 0, rejected = 0, accepted = 0, either = 0;
  for (int n = 0; n < 20000; ++n) {
    const Opt& o = table[pick(table.size())];
    std::string item;
    const int form = static_cast<int>(pick(6));
    const std::string value = values[pick(values.size())];
    if (form == 0) {
      item = "--" + std::string(o.name);
    } else if (form == 1) {
      item = "--" + std::string(o.name) + "=" + value;
    } else if (form == 2) {  // an abbreviation
      const std::string name = o.name;
      item = "--" + name.substr(0, 1 + pick(name.size())) + (pick(2) ? "=" + value : "");
    } else if (form == 3) {  // short options bundled, maybe with a value
      item = "-";
      for (size_t k = 0, m = 1 + pick(3); k < m; ++k) {
        const Opt& b = table[pick(table.size())];
        item += b.letter != 0 ? b.letter : 'v';
      }
      if (pick(2)) item += value;
    } else if (form == 4) {
      item = value;  // a bare word
    } else {
      item = "--" + std::string(o.name) + " " + value;  // an option and its value in one item
    }
    for (const char* device : {"cuda", "cpu"}) {
      // getopt_long over {sbatch, item, job.sh}, from a fresh start.
      std::vector<std::string> words = {"sbatch", item, "job.sh"};
      std::vector<char*> argv;
      for (auto& w : words) argv.push_back(w.data());
      argv.push_back(nullptr);
      optind = 0;
      opterr = 0;
      bool error = false, bad = false;
      int c;
      while ((c = getopt_long(3, argv.data(), shortopts.c_str(), longopts.data(), nullptr)) != -1) {
        std::string name;
        if (c == '?' || c == ':') {
          error = true;
          continue;
        }
        if (c >= 1000) {
          name = table[c - 1000].name;
        } else {
          for (const auto& t : table) {
            if (t.letter == c) name = t.name;
          }
        }
        if (refused(name, optarg, device)) bad = true;
      }
      // The script must be the first word getopt leaves: otherwise the item is a bare
      // word (sbatch's script) or an option swallowed job.sh as its value.
      if (optind != 2) bad = true;
      const bool spaced = item.size() > 1 && item[1] != '-' && item.find(' ') != std::string::npos;
      const std::string got = SbatchArgProblem(item, device);
      if (bad || error) {
        // Refused by the contract, or by sbatch itself at every submission.
        EXPECT_NE(got, "") << "'" << item << "' (" << device << ") passed, but sbatch "
                           << (error ? "rejects it" : "reads it as refused");
        ++(error ? rejected : refused_n);
      } else if (!spaced) {
        EXPECT_EQ(got, "") << "'" << item << "' (" << device << ") refused, but sbatch reads it cleanly";
        ++accepted;
      } else {
        ++either;  // a value with a space after a short option: memfitd asks for the long form
      }
    }
  }
  // The sweep reached every outcome often enough to mean something.
  EXPECT_GT(refused_n, 3000);
  EXPECT_GT(rejected, 3000);
  EXPECT_GT(accepted, 5000);
  EXPECT_GT(either, 20);
}

// squeue --json of Slurm 22.05 (trimmed from a real answer): job_state a string,
// exit_code the raw wait status.
const char* kSqueue2205 = R"({"meta": {"plugin": {"type": "openapi/v0.0.38"}, "Slurm": {"version": {"major": 22}}},
 "errors": [],
 "jobs": [
  {"account": "", "job_id": 1, "name": "memfit-j1", "job_state": "FAILED", "state_reason": "NonZeroExitCode",
   "nodes": "node0", "exit_code": 768, "gres_detail": []},
  {"job_id": 2, "name": "memfit-j2", "job_state": "RUNNING", "state_reason": "None", "nodes": "node0", "exit_code": 0},
  {"job_id": 3, "name": "memfit-j3", "job_state": "PENDING", "state_reason": "Resources", "nodes": "", "exit_code": 0},
  {"job_id": 4, "name": "memfit-j4", "job_state": "CANCELLED", "state_reason": "None", "nodes": "node1", "exit_code": 15},
  {"job_id": 5, "name": "other", "job_state": "COMPLETED", "state_reason": "None", "nodes": "node1", "exit_code": 0}
 ]})";

TEST(Slurm, ParsesSqueueJsonOf2205AndLater) {
  const auto m = ParseSqueueJson(kSqueue2205);
  ASSERT_EQ(m.size(), 5u);
  EXPECT_EQ(m.at(1).state, "FAILED");
  EXPECT_EQ(m.at(1).exit_code, 3);
  EXPECT_EQ(m.at(1).signal, 0);
  EXPECT_EQ(m.at(2).state, "RUNNING");
  EXPECT_EQ(m.at(2).exit_code, -1);  // not final: no exit code yet
  EXPECT_EQ(m.at(3).reason, "Resources");
  EXPECT_EQ(m.at(4).signal, SIGTERM);
  EXPECT_EQ(m.at(5).exit_code, 0);
  EXPECT_EQ(m.at(1).name, "memfit-j1");
  // 23.x and later: job_state a list, exit_code an object.
  const auto n = ParseSqueueJson(R"({"jobs": [{"job_id": {"set": true, "number": 7}, "name": "memfit-x",
      "job_state": ["FAILED"], "exit_code": {"status": ["EXITED"], "return_code": {"set": true, "number": 2},
      "signal": {"id": {"set": false, "number": 0}}}}]})");
  ASSERT_EQ(n.count(7), 1u);
  EXPECT_EQ(n.at(7).state, "FAILED");
  EXPECT_EQ(n.at(7).exit_code, 2);
  EXPECT_EQ(n.at(7).signal, 0);
  EXPECT_THROW(ParseSqueueJson("squeue: error: slurm_load_jobs error"), std::runtime_error);
  EXPECT_THROW(ParseSqueueJson(R"({"errors": []})"), std::runtime_error);
  EXPECT_TRUE(ParseSqueueJson(R"({"jobs": [1, "x", {"name": "no id"}]})").empty());
}

TEST(Slurm, ParsesSacctJobcompLines) {
  const auto m = ParseSacctLines("12|FAILED|3:0\n12.batch|FAILED|3:0\n13|CANCELLED by 0|0:15\nnonsense\n14|COMPLETED|0:0");
  ASSERT_EQ(m.size(), 3u);
  EXPECT_EQ(m.at(12).state, "FAILED");
  EXPECT_EQ(m.at(12).exit_code, 3);
  EXPECT_EQ(m.at(13).state, "CANCELLED");
  EXPECT_EQ(m.at(13).signal, 15);
  EXPECT_EQ(m.at(14).exit_code, 0);
}

// A scripted Slurm: sbatch hands out ids, squeue answers from `jobs`, every command is kept.
struct FakeSlurm {
  std::vector<std::vector<std::string>> calls;
  std::map<int64_t, std::string> states;  // id -> job_state
  std::map<int64_t, std::string> names;   // id -> --job-name
  int64_t next_id = 40;
  bool sbatch_fails = false;
  bool sbatch_times_out = false;  // queued, but sbatch killed before it answered
  bool squeue_fails = false;
  CommandResult operator()(const std::vector<std::string>& argv) {
    calls.push_back(argv);
    const std::string cmd = fs::path(argv[0]).filename();
    if (cmd == "squeue" && squeue_fails) return {1, "", "slurm_load_jobs error: Unable to contact slurm controller\n"};
    if (cmd == "sbatch") {
      if (sbatch_fails) return {1, "", "sbatch: error: Batch job submission failed: Invalid partition name specified\n"};
      for (const auto& a : argv) {
        if (a.rfind("--job-name=", 0) == 0) names[next_id] = a.substr(11);
      }
      states[next_id] = "PENDING";
      if (sbatch_times_out) {
        ++next_id;
        return {-1, "", "\n(killed after 30000 ms)"};
      }
      return {0, std::to_string(next_id++) + "\n", ""};
    }
    if (cmd == "squeue") {
      std::string j = R"({"jobs": [)";
      bool first = true;
      for (const auto& [id, st] : states) {
        j += (first ? "" : ",") + std::string(R"({"job_id": )") + std::to_string(id) + R"(, "name": ")" + (names.count(id) ? names[id] : "memfit-j") + R"(", "job_state": ")" +
             st + R"(", "exit_code": )" + (st == "FAILED" ? "768" : "0") + "}";
        first = false;
      }
      return {0, j + "]}", ""};
    }
    if (cmd == "sacct") return {0, "", ""};
    if (cmd == "scancel") return {0, "", ""};
    return {127, "", "unknown command"};
  }
};

TEST(Slurm, LauncherSubmitsFollowsAndCancels) {
  const TmpDir tmp;  // removed at the end, also when an assertion stops the test
  const std::string& dir = tmp.path;
  FakeSlurm slurm;
  int64_t now = 1000;
  SlurmConfig cfg = Cfg();
  cfg.bin_dir = "/usr/local/slurm/bin";
  SlurmLauncher L(cfg, [&](const std::vector<std::string>& a) { return slurm(a); }, [&] { return now; });
  WorkerLaunch l;
  l.binary = "/bin/memfit-worker";
  l.args = {"run"};
  l.dir = dir;
  l.job_id = "j1";
  l.reservation_bytes = 130 * MiB;  // 3 shards of 64 MiB
  auto w = L.start(l);
  EXPECT_EQ(w->pid(), 40);
  ASSERT_EQ(slurm.calls.size(), 1u);
  EXPECT_EQ(slurm.calls[0][0], "/usr/local/slurm/bin/sbatch");
  EXPECT_NE(std::find(slurm.calls[0].begin(), slurm.calls[0].end(), "--gres=shard:3"), slurm.calls[0].end());
  EXPECT_TRUE(fs::exists(dir + "/slurm.sh"));
  EXPECT_TRUE(fs::exists(dir + "/worker.out"));
  // Pending, then running: not exited; squeue at most once per poll interval.
  EXPECT_FALSE(w->exited());
  EXPECT_EQ(w->status_change(), "Slurm job 40 is waiting");
  EXPECT_EQ(w->status_change(), "");  // once per change
  const size_t squeues = slurm.calls.size();
  EXPECT_FALSE(w->exited());
  EXPECT_EQ(slurm.calls.size(), squeues);
  slurm.states[40] = "RUNNING";
  now += 1000;
  EXPECT_FALSE(w->exited());
  EXPECT_EQ(w->status_change(), "Slurm job 40 is running");
  // The worker's lines arrive through worker.out.
  std::ofstream(dir + "/worker.out", std::ios::app) << R"({"event":"step","step":1})" << "\n" << "partial";
  EXPECT_EQ(w->read_lines(), std::vector<std::string>{R"({"event":"step","step":1})"});
  // terminate: SIGTERM to the batch step of a running job.
  w->terminate();
  EXPECT_EQ(slurm.calls.back(), (std::vector<std::string>{"/usr/local/slurm/bin/scancel", "--batch", "--signal=TERM", "40"}));
  slurm.states[40] = "FAILED";
  now += 1000;
  EXPECT_TRUE(w->exited());
  EXPECT_EQ(w->exit_code(), 3);
  // A pending job is withdrawn outright.
  auto w2 = L.start(l);
  now += 1000;
  EXPECT_FALSE(w2->exited());
  w2->terminate();
  EXPECT_EQ(slurm.calls.back(), (std::vector<std::string>{"/usr/local/slurm/bin/scancel", "41"}));
  // Adoption after a restart: only a listed, unfinished memfit job.
  EXPECT_NE(L.adopt(41, "/state/jobs/j1/worker.out", 0), nullptr);
  EXPECT_EQ(L.adopt(41, "/state/jobs/j2/worker.out", 0), nullptr);  // another memfit job's
  EXPECT_EQ(L.adopt(40, "/state/jobs/j1/worker.out", 0), nullptr);  // failed
  EXPECT_EQ(L.adopt(99, "/state/jobs/j1/worker.out", 0), nullptr);  // unknown
  // A job squeue no longer lists (MinJobAge) and sacct does not know: gone, status unknown.
  slurm.states.erase(41);
  now += 1000;
  EXPECT_TRUE(w2->exited());
  EXPECT_EQ(w2->exit_code(), -1);
  // More shards than one GPU has never start on Slurm 22.05: refused before sbatch.
  l.reservation_bytes = 5 * 64 * MiB;
  const size_t before = slurm.calls.size();
  EXPECT_THROW(L.start(l), std::runtime_error);
  EXPECT_EQ(slurm.calls.size(), before);
  // sbatch's own message reaches the error.
  l.reservation_bytes = MiB;
  slurm.sbatch_fails = true;
  try {
    L.start(l);
    FAIL() << "a failed sbatch was not reported";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("Invalid partition name"), std::string::npos) << e.what();
  }
}

// A restart while squeue does not answer: the jobs on record are adopted unverified, not
// declared gone (a next attempt would run beside them), with one squeue for all of them;
// nothing is cancelled until squeue lists the job as memfitd's. The first answer checks
// each name: memfitd's job runs on and ends as Slurm says; a job listed under another
// name is let go, never cancelled.
TEST(Slurm, AdoptionWhileSqueueFailsWaitsForAnAnswer) {
  FakeSlurm slurm;
  slurm.states = {{7, "RUNNING"}, {8, "RUNNING"}};
  slurm.names = {{7, "memfit-a"}, {8, "someone-else"}};
  slurm.squeue_fails = true;
  int64_t now = 0;
  SlurmLauncher L(Cfg(), [&](const std::vector<std::string>& a) { return slurm(a); }, [&] { return now; });
  auto a = L.adopt(7, "/state/jobs/a/worker.out", 0);
  auto b = L.adopt(8, "/state/jobs/b/worker.out", 0);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  auto count = [&](const std::string& cmd) {
    return std::count_if(slurm.calls.begin(), slurm.calls.end(),
                         [&](const auto& c) { return fs::path(c[0]).filename() == cmd; });
  };
  EXPECT_EQ(count("squeue"), 1);
  now += 10000;
  EXPECT_FALSE(a->exited());
  EXPECT_FALSE(b->exited());
  a->terminate();
  b->kill();
  EXPECT_EQ(count("scancel"), 0);
  EXPECT_EQ(a->status_change(), "");
  slurm.squeue_fails = false;
  now += 10000;
  EXPECT_FALSE(a->exited());
  // The TERM asked for before the answer is sent now, to memfitd's job only.
  EXPECT_EQ(count("scancel"), 1);
  EXPECT_EQ(slurm.calls.back(), (std::vector<std::string>{"scancel", "--batch", "--signal=TERM", "7"}));
  EXPECT_EQ(a->status_change(), "Slurm job 7 is running");
  EXPECT_TRUE(b->exited());
  EXPECT_EQ(b->exit_code(), -1);
  b->kill();
  EXPECT_EQ(count("scancel"), 1);
  a->kill();
  EXPECT_EQ(slurm.calls.back(), (std::vector<std::string>{"scancel", "7"}));
  slurm.states[7] = "COMPLETED";
  now += 10000;
  EXPECT_TRUE(a->exited());
  EXPECT_EQ(a->exit_code(), 0);
}

// squeue lists every job of the cluster, any user's: a byte that is not UTF-8 in one
// name must not make the whole answer unreadable (no job of memfitd's would end).
TEST(Slurm, SqueueAnswerWithBytesThatAreNotUtf8IsRead) {
  const auto got = ParseSqueueJson(R"({"jobs": [{"job_id": 5, "name": "x)" "\xff\xc3" R"(", "job_state": "RUNNING"},)"
                                   R"( {"job_id": 6, "name": "memfit-a", "job_state": "COMPLETED"}]})");
  ASSERT_EQ(got.size(), 2u);
  EXPECT_EQ(got.at(6).state, "COMPLETED");
  EXPECT_EQ(got.at(5).name, "x\xEF\xBF\xBD\xEF\xBF\xBD");
}

// After a restart: a queued job's submission that memfitd never recorded is withdrawn,
// one squeue for all queued jobs, finished and foreign jobs left alone.
TEST(Slurm, WithdrawCancelsUnrecordedSubmissionsOfQueuedJobs) {
  FakeSlurm slurm;
  slurm.states = {{1, "RUNNING"}, {2, "PENDING"}, {3, "COMPLETED"}, {4, "RUNNING"}, {5, "RUNNING"}};
  slurm.names = {{1, "memfit-a"}, {2, "memfit-b"}, {3, "memfit-a"}, {4, "memfit-zz"}, {5, "other-a"}};
  int64_t now = 0;
  SlurmLauncher L(Cfg(), [&](const std::vector<std::string>& a) { return slurm(a); }, [&] { return now; });
  const auto got = L.withdraw({"a", "b", "c"});
  EXPECT_EQ(got.size(), 2u);
  EXPECT_EQ(got.at("a"), "Slurm job 1 of an unrecorded submission cancelled");
  EXPECT_EQ(got.at("b"), "Slurm job 2 of an unrecorded submission cancelled");
  int squeues = 0;
  std::vector<std::string> cancelled;
  for (const auto& c : slurm.calls) {
    if (c[0] == "squeue") ++squeues;
    if (c[0] == "scancel") cancelled.push_back(c.back());
  }
  EXPECT_EQ(squeues, 1);
  EXPECT_EQ(cancelled, (std::vector<std::string>{"1", "2"}));
  EXPECT_TRUE(L.withdraw({}).empty());
  EXPECT_EQ(slurm.calls.size(), 3u);  // nothing queued: no squeue at all
}

// A launch of job "j" reserving 1 MiB (one shard) in `dir`.
WorkerLaunch TinyLaunch(const std::string& dir) {
  WorkerLaunch l;
  l.binary = "/bin/true";
  l.dir = dir;
  l.job_id = "j";
  l.reservation_bytes = MiB;
  return l;
}

TEST(Slurm, SqueueFailingNeverEndsAJob) {
  const TmpDir tmp;  // removed at the end, also when an assertion stops the test
  const std::string& dir = tmp.path;
  FakeSlurm slurm;
  bool down = false;
  int64_t now = 1000;
  SlurmLauncher L(Cfg(),
                  [&](const std::vector<std::string>& a) {
                    if (down && fs::path(a[0]).filename() == "squeue") return CommandResult{1, "", "slurm_load_jobs error: Unable to contact slurm controller"};
                    return slurm(a);
                  },
                  [&] { return now; });
  const WorkerLaunch l = TinyLaunch(dir);
  auto w = L.start(l);
  slurm.states[40] = "RUNNING";
  now += 1000;
  EXPECT_FALSE(w->exited());
  down = true;
  slurm.states.clear();  // whatever Slurm knows, memfitd cannot ask
  for (int i = 0; i < 5; ++i) {
    now += 1000;
    EXPECT_FALSE(w->exited());
  }
}

TEST(Slurm, SqueueDownIsAskedOncePerPollInterval) {
  const TmpDir tmp;  // removed at the end, also when an assertion stops the test
  const std::string& dir = tmp.path;
  FakeSlurm slurm;
  bool down = false;
  int squeues = 0;
  int64_t now = 1000;
  SlurmLauncher L(Cfg(),
                  [&](const std::vector<std::string>& a) {
                    if (fs::path(a[0]).filename() == "squeue") {
                      ++squeues;
                      if (down) return CommandResult{1, "", "Unable to contact slurm controller"};
                    }
                    return slurm(a);
                  },
                  [&] { return now; });
  const WorkerLaunch l = TinyLaunch(dir);
  std::vector<std::unique_ptr<Worker>> ws;
  down = true;
  for (int i = 0; i < 5; ++i) ws.push_back(L.start(l));
  now += 10;
  // One tick over five workers, then another: one squeue each poll interval, not one per
  // worker per tick (each may take 30 s with memfitd's lock held).
  for (auto& w : ws) EXPECT_FALSE(w->exited());
  for (auto& w : ws) EXPECT_FALSE(w->exited());
  EXPECT_EQ(squeues, 1);
  now += 1000;
  down = false;
  for (auto& w : ws) EXPECT_FALSE(w->exited());
  EXPECT_EQ(squeues, 2);
}

TEST(Slurm, SbatchKilledAfterQueueingLeavesNoJobBehind) {
  const TmpDir tmp;  // removed at the end, also when an assertion stops the test
  const std::string& dir = tmp.path;
  FakeSlurm slurm;
  int64_t now = 1000;
  SlurmLauncher L(Cfg(), [&](const std::vector<std::string>& a) { return slurm(a); }, [&] { return now; });
  WorkerLaunch l = TinyLaunch(dir);
  l.job_id = "j7";
  slurm.sbatch_times_out = true;
  EXPECT_THROW(L.start(l), std::runtime_error);
  // The controller queued it as 40: withdrawn, since memfitd fails (or retries) the attempt.
  EXPECT_EQ(slurm.calls.back(), (std::vector<std::string>{"scancel", "40"}));
}

// memfitd's mode: squeue, sacct and scancel run in the launcher's thread. A controller
// that does not answer never holds up the caller (memfitd's loop, with its lock held):
// exited(), status_change() and terminate() return while squeue hangs, and the answers
// arrive once it comes back.
TEST(Slurm, BackgroundModeNeverWaitsForAHungController) {
  const TmpDir tmp;  // removed at the end, also when an assertion stops the test
  const std::string& dir = tmp.path;
  FakeSlurm slurm;
  std::mutex m;  // the fake is called from two threads
  absl::Notification in_squeue, release;
  std::atomic<bool> hang{false};
  std::atomic<int64_t> now{1000};
  auto L = std::make_unique<SlurmLauncher>(
      Cfg(),
      [&](const std::vector<std::string>& a) {
        if (hang && fs::path(a[0]).filename() == "squeue") {
          if (!in_squeue.HasBeenNotified()) in_squeue.Notify();
          release.WaitForNotification();
        }
        std::lock_guard<std::mutex> g(m);
        return slurm(a);
      },
      [&] { return now.load(); }, /*background=*/true);
  auto w = L->start(TinyLaunch(dir));  // sbatch in the caller's thread: id 40
  EXPECT_EQ(w->pid(), 40);
  hang = true;
  // Each call runs on its own thread, so that a call that blocked fails the test (and is
  // then let go) instead of hanging it.
  auto returns = [&](std::function<void()> f) {
    auto done = std::async(std::launch::async, std::move(f));
    const bool ok = done.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
    if (!ok && !release.HasBeenNotified()) release.Notify();
    return ok;
  };
  bool exited = true;
  EXPECT_TRUE(returns([&] { exited = w->exited(); }));  // asks the thread for squeue
  EXPECT_FALSE(exited);
  if (!in_squeue.WaitForNotificationWithTimeout(absl::Seconds(20))) {
    release.Notify();  // so that the launcher's thread can be joined
    FAIL() << "the launcher's thread never ran squeue";
  }
  // The thread is inside squeue now.
  EXPECT_TRUE(returns([&] { exited = w->exited(); }));
  EXPECT_FALSE(exited);
  EXPECT_TRUE(returns([&] { EXPECT_EQ(w->status_change(), ""); }));  // nothing known yet
  EXPECT_TRUE(returns([&] { w->terminate(); }));                       // queued for the thread
  {
    std::lock_guard<std::mutex> g(m);
    slurm.states[40] = "CANCELLED";
  }
  release.Notify();
  // The controller answers: the cancel reaches it and the job's end arrives.
  bool ended = false;
  for (int i = 0; i < 2000 && !ended; ++i) {
    now += 1000;  // past poll_seconds each time
    ended = w->exited();
    if (!ended) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(ended);
  EXPECT_EQ(w->exit_signal(), SIGTERM);
  L.reset();  // stops and joins the thread
  std::lock_guard<std::mutex> g(m);
  int cancels = 0;
  for (const auto& c : slurm.calls) cancels += c[0] == "scancel" && c.back() == "40";
  EXPECT_EQ(cancels, 1);
}

// A squeue begun while sbatch was still submitting does not list the new job: the job must
// not be taken for one that ended (sacct, which knows finished jobs only, would not know it
// either, and the attempt would count as lost while it runs on Slurm).
TEST(Slurm, BackgroundSqueueBegunBeforeTheSubmissionNeverEndsIt) {
  const TmpDir tmp;  // removed at the end, also when an assertion stops the test
  const std::string& dir = tmp.path;
  FakeSlurm slurm;
  std::mutex m;
  std::atomic<int> squeues{0};
  std::atomic<int64_t> now{1000};
  std::function<void()> during_sbatch;
  auto L = std::make_unique<SlurmLauncher>(
      Cfg(),
      [&](const std::vector<std::string>& a) {
        const std::string cmd = fs::path(a[0]).filename();
        if (cmd == "sbatch" && during_sbatch) during_sbatch();
        std::lock_guard<std::mutex> g(m);
        if (cmd == "squeue") ++squeues;
        return slurm(a);
      },
      [&] { return now.load(); }, /*background=*/true);
  auto w0 = L->start(TinyLaunch(dir));  // Slurm job 40
  auto wait_for = [](const std::function<bool()>& f) {  // f true within 20 s (f asked once per try)
    for (int i = 0; i < 2000; ++i) {
      if (f()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return false;
  };
  ASSERT_TRUE(wait_for([&] { return !w0->exited() && squeues > 0; }));
  // While job 41's sbatch runs, the thread answers w0's next question with a squeue that
  // cannot list 41 yet.
  during_sbatch = [&] {
    const int before = squeues;
    now += 1000;
    w0->exited();
    wait_for([&] { return squeues > before; });
  };
  auto w1 = L->start(TinyLaunch(dir));
  during_sbatch = nullptr;
  EXPECT_EQ(w1->pid(), 41);
  for (int i = 0; i < 5; ++i) EXPECT_FALSE(w1->exited());
  // The next squeue lists it, and its end is seen.
  ASSERT_TRUE(wait_for([&] { return w1->status_change() == "Slurm job 41 is waiting"; }));
  {
    std::lock_guard<std::mutex> g(m);
    slurm.states[41] = "FAILED";
  }
  ASSERT_TRUE(wait_for([&] {
    now += 1000;
    return w1->exited();
  }));
  EXPECT_EQ(w1->exit_code(), 3);
  L.reset();
  std::lock_guard<std::mutex> g(m);
  for (const auto& c : slurm.calls) EXPECT_NE(c[0], "sacct");  // never looked for as ended
}

// memfitd repeats kill() every tick while it waits for a job to end: with a slow
// controller the queued cancels stay one per job, not one per call.
TEST(Slurm, BackgroundCancelsAreOnePerJob) {
  const TmpDir tmp;  // removed at the end, also when an assertion stops the test
  const std::string& dir = tmp.path;
  FakeSlurm slurm;
  std::mutex m;
  absl::Notification release;
  std::atomic<bool> hold{false};
  auto L = std::make_unique<SlurmLauncher>(
      Cfg(),
      [&](const std::vector<std::string>& a) {
        if (hold && fs::path(a[0]).filename() == "scancel") release.WaitForNotification();
        std::lock_guard<std::mutex> g(m);
        return slurm(a);
      },
      [] { return int64_t{1000}; }, /*background=*/true);
  auto w = L->start(TinyLaunch(dir));
  hold = true;
  w->terminate();
  for (int i = 0; i < 1000; ++i) w->kill();
  release.Notify();
  L.reset();  // sends what is queued, then stops
  std::lock_guard<std::mutex> g(m);
  std::vector<std::vector<std::string>> cancels;
  for (const auto& c : slurm.calls) {
    if (c[0] == "scancel") cancels.push_back(c);
  }
  // The TERM may have gone out before the kills were queued; then one kill follows it.
  ASSERT_GE(cancels.size(), 1u);
  ASSERT_LE(cancels.size(), 2u);
  EXPECT_EQ(cancels.back(), (std::vector<std::string>{"scancel", "40"}));
}

TEST(Slurm, RunCommandCapturesAndTimesOut) {
  const CommandResult r = RunCommand({"/bin/sh", "-c", "echo out; echo err >&2; exit 4"}, 5000);
  EXPECT_EQ(r.status, 4);
  EXPECT_EQ(r.out, "out\n");
  EXPECT_EQ(r.err, "err\n");
  const CommandResult t = RunCommand({"/bin/sh", "-c", "sleep 30"}, 200);
  EXPECT_EQ(t.status, -1);
  EXPECT_NE(t.err.find("killed after 200 ms"), std::string::npos);
  const CommandResult m = RunCommand({"/nonexistent/sbatch"}, 1000);
  EXPECT_EQ(m.status, 127);
}

}  // namespace
