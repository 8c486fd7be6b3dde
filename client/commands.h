// The verbs of the `memfit` command line: what cli.cpp parses the arguments into (one
// Invocation) and the functions that run it. Each returns the process exit code:
//   0 done; 1 anything else; 2 bad input (the message names the flag, file or field);
//   3 memfitd unreachable; 4 refused (no or wrong token, another user's job);
//   5 no such job; `watch` (and `submit --watch`): 0 succeeded, 10 failed, 11 cancelled.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace memfit::cli {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitBadInput = 2;
constexpr int kExitUnreachable = 3;
constexpr int kExitRefused = 4;
constexpr int kExitNotFound = 5;
constexpr int kExitJobFailed = 10;
constexpr int kExitJobCancelled = 11;

enum class Output { kTable, kJson, kYaml };

// How to reach memfitd (flags, else MEMFIT_SERVER / MEMFIT_TOKEN / MEMFIT_TLS_CA), and
// the output format of the daemon verbs.
struct Common {
  std::string server;   // host:port
  std::string token;
  std::string tls_ca;   // PEM file: TLS, trusting it
  bool tls = false;     // TLS with the system's roots
  Output output = Output::kTable;
};

struct SubmitArgs {
  std::string file;
  bool watch = false;
  int priority = 0;
  std::string request_id;
  std::string after;  // --after JOB: placed only once JOB succeeded
};

struct ListArgs {
  std::vector<std::string> states;  // lower-case state names, checked by the parser
  bool all_users = false;
  std::string owner;
  int64_t limit = 1000000;
};

// --tail: how much history before following. kTailAll: every event/line;
// kTailDefault (watch without --tail): every event but the steps before the last one.
constexpr int64_t kTailAll = -1;
constexpr int64_t kTailDefault = -2;

struct WatchArgs {
  int64_t tail = kTailDefault;
};

struct LogsArgs {
  int64_t tail = kTailAll;  // the last N lines first
  bool stderr_stream = false;
  bool follow = false;
  bool raw = false;  // bytes as they are even on a terminal
};

struct EstimateArgs {
  std::string spec;
  std::string device;               // "" = the spec's
  int64_t device_memory = 0;        // 0 = no fit plan
  std::string write_spec;           // the plan as a runnable spec, "" = none
  int threads = 0;
  bool json_out = false;
  int64_t cuda_context = -1;        // -1: DeviceModel's default
  double reserved_overhead = -1;    // -1: DeviceModel's default
  std::string gpu_model;            // NVML's name: that GPU's measured constants
  bool remote = false;              // a connection flag was given: ask memfitd
};

// One parsed command line.
struct Invocation {
  std::string verb;
  Common common;
  std::string job;  // JOB of get, cancel, watch, events, logs
  SubmitArgs submit;
  ListArgs list;
  LogsArgs logs;
  WatchArgs watch;
  EstimateArgs estimate;
  std::string shell;  // of `completion`
  std::string completion_script;  // `completion`: the script, rendered by parse()
};

// memfit estimate (estimate_cmd.cpp): locally, or memfitd's answer when remote.
int estimate_cmd(const Invocation& inv);

// The daemon verbs (jobs_cmd.cpp): submit, get, list, cancel, watch, events, logs,
// devices, version (which answers without a daemon too).
int remote_cmd(const Invocation& inv);

}  // namespace memfit::cli
