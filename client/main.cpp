// memfit: the command line. `estimate` works without a daemon; the other verbs talk to
// memfitd over gRPC (jobs_cmd.cpp).
#include <iostream>
#include <string>
#include <vector>

#include "commands.h"

namespace {

const char* kUsage =
    "usage: memfit <command> [options]\n"
    "\n"
    "commands:\n"
    "  submit -f SPEC [--watch]      send a job to memfitd (--watch: follow it to the end)\n"
    "  get JOB [-o yaml]             one job (yaml: its spec as memfitd runs it)\n"
    "  list [--state S] [--all-users]  jobs, newest first\n"
    "  cancel JOB                    stop a job (it checkpoints)\n"
    "  watch JOB                     live progress until the job ends (exit code = its state)\n"
    "  events JOB                    everything that happened to a job\n"
    "  logs JOB [-f]                 the worker's output\n"
    "  devices                       each device's memory: total, reserved, used, jobs\n"
    "  estimate -f SPEC [--device-memory SIZE] [--device cpu|cuda] [--threads N]\n"
    "           [--cuda-context SIZE] [--reserved-overhead FRACTION] [-o json|text]\n"
    "      Predict the job's peak device memory, with a breakdown; with --device-memory,\n"
    "      also the largest micro-batch and the cheapest memory options that fit.\n"
    "      CUDA defaults: 512MiB context, 8% reserved beyond allocated.\n"
    "      Sizes: 16GiB, 800MiB, 80GB or plain bytes.\n";

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
    std::cout << kUsage;
    return args.empty() ? memfit::cli::kExitBadInput : memfit::cli::kExitOk;
  }
  const std::string cmd = args[0];
  args.erase(args.begin());
  if (cmd == "estimate") return memfit::cli::estimate_cmd(args);
  const int rc = memfit::cli::remote_cmd(cmd, args);
  if (rc >= 0) return rc;
  std::cerr << "memfit: unknown command '" << cmd << "'\n\n" << kUsage;
  return memfit::cli::kExitBadInput;
}
