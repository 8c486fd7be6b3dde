// The verbs of the `memfit` command line. Each returns the process exit code: 0 done,
// 2 bad input (the message names the flag, file or field), 1 anything else.
#pragma once

#include <string>
#include <vector>

namespace memfit::cli {

constexpr int kExitOk = 0;
constexpr int kExitError = 1;
constexpr int kExitBadInput = 2;

// memfit estimate -f SPEC [--device-memory SIZE] [--device cpu|cuda] [--threads N]
//                 [--cuda-context SIZE] [--reserved-overhead FRACTION] [-o json|text]
int estimate_cmd(const std::vector<std::string>& args);

}  // namespace memfit::cli
