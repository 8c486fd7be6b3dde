// The `memfit` command line: every verb, flag, help text and check on a flag's value is
// defined once, in cli.cpp, on CLI11. parse() turns the arguments into an Invocation (or
// into help, or a usage error); run() prints what parse() decided or runs the verb.
#pragma once

#include <string>
#include <vector>

#include "commands.h"

namespace memfit::cli {

struct Parsed {
  bool run = false;   // true: `invocation` is ready for the verb; false: print and exit
  int code = 0;       // the exit code when !run (0 help, 2 usage error)
  std::string out;    // for stdout (help)
  std::string err;    // for stderr (the usage error, one line: "memfit get: JOB is required")
  Invocation invocation;
};

// args: the command line without the program's name. Reads MEMFIT_SERVER, MEMFIT_TOKEN
// and MEMFIT_TLS_CA for what the flags do not give. Prints nothing.
Parsed parse(const std::vector<std::string>& args);

// parse(), then print its text or run the verb; the process's exit code.
int run(const std::vector<std::string>& args);

}  // namespace memfit::cli
