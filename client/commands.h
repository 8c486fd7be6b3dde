// The verbs of the `memfit` command line. Each returns the process exit code:
//   0 done; 1 anything else; 2 bad input (the message names the flag, file or field);
//   3 memfitd unreachable; 4 refused (no or wrong token, another user's job);
//   5 no such job; `watch` (and `submit --watch`): 0 succeeded, 10 failed, 11 cancelled.
#pragma once

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

// memfit estimate -f SPEC [--device-memory SIZE] [--device cpu|cuda] [--threads N]
//                 [--cuda-context SIZE] [--reserved-overhead FRACTION] [-o json|text]
//                 [--server ADDR]   (asks memfitd: its devices and calibration apply)
int estimate_cmd(const std::vector<std::string>& args);

// Daemon verbs (jobs_cmd.cpp): submit, get, list, cancel, watch, events, logs, devices.
// Returns -1 for a verb it does not know.
int remote_cmd(const std::string& verb, std::vector<std::string> args);
// The help text of a daemon verb ("" if unknown).
std::string remote_help(const std::string& verb);

}  // namespace memfit::cli
